//! Push an OCI artifact — blobs, then a manifest under a tag — and read which digest a tag points at.
//!
//! The caller builds the manifest bytes (so their digest is what it expects); this module uploads
//! the blobs the repository does not have yet, then the manifest, and checks that the tag now
//! resolves to it.

use bytes::Bytes;

use super::{Registry, RegistryError};
use crate::policy::Digest;

/// What a push did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushReport {
    /// The manifest's digest.
    pub digest: Digest,
    /// Blobs uploaded.
    pub blobs_pushed: usize,
    /// Blobs the repository already had.
    pub blobs_present: usize,
}

/// Pushes `blobs` (skipping those `host/repository` has) and then `manifest` (of `media_type`) as
/// `host/repository:tag`.
pub async fn push_artifact(
    registry: &Registry,
    host: &str,
    repository: &str,
    tag: &str,
    blobs: &[Bytes],
    manifest: Bytes,
    media_type: &str,
) -> Result<PushReport, RegistryError> {
    let shown = format!("{host}/{repository}:{tag}");
    let target =
        oci_client::Reference::with_tag(registry.host(host), repository.to_owned(), tag.to_owned());
    registry.authenticate(&target).await;
    let mut report = PushReport {
        digest: Digest::sha256_of(&manifest),
        blobs_pushed: 0,
        blobs_present: 0,
    };
    for blob in blobs {
        let d = Digest::sha256_of(blob).to_string();
        let blob_ref = format!("{host}/{repository}@{d}");
        let exists = registry
            .client
            .blob_exists(&target, &d)
            .await
            .map_err(|e| registry.error(&blob_ref, "checking the blob", host, e))?;
        if exists {
            report.blobs_present += 1;
            continue;
        }
        registry
            .client
            .push_blob(&target, blob.clone(), &d)
            .await
            .map_err(|e| registry.error(&blob_ref, "uploading the blob", host, e))?;
        report.blobs_pushed += 1;
    }
    let content_type =
        http::HeaderValue::from_str(media_type).map_err(|_| RegistryError::Unsupported {
            reference: shown.clone(),
            detail: format!("media type {media_type:?} is not a valid header value"),
        })?;
    registry
        .client
        .push_manifest_raw(&target, manifest, content_type)
        .await
        .map_err(|e| registry.error(&shown, "pushing the manifest", host, e))?;
    match tag_digest(registry, host, repository, tag).await? {
        Some(d) if d == report.digest => Ok(report),
        other => Err(RegistryError::Request {
            reference: shown,
            what: "checking the push",
            detail: format!(
                "the tag points at {} instead of the manifest just pushed ({})",
                other.map_or("nothing".to_owned(), |d| d.to_string()),
                report.digest
            ),
        }),
    }
}

/// The digest `host/repository:tag` points at (a HEAD request), or `None` if there is no such tag.
pub async fn tag_digest(
    registry: &Registry,
    host: &str,
    repository: &str,
    tag: &str,
) -> Result<Option<Digest>, RegistryError> {
    let r =
        oci_client::Reference::with_tag(registry.host(host), repository.to_owned(), tag.to_owned());
    let auth = registry.authenticate(&r).await;
    let shown = format!("{host}/{repository}:{tag}");
    match registry.client.fetch_manifest_digest(&r, &auth).await {
        Ok(d) => Digest::parse(&d)
            .map(Some)
            .map_err(|e| RegistryError::DigestMismatch {
                reference: shown,
                detail: format!("the registry announced an invalid digest: {e}"),
            }),
        Err(e) => match registry.error(&shown, "checking the tag", host, e) {
            RegistryError::NotFound { .. } => Ok(None),
            other => Err(other),
        },
    }
}
