//! Copy an image by digest from one repository to another: the index (if any), every manifest, and
//! every config and layer blob, so the copy has exactly the source's digest.
//!
//! - Manifests are fetched by digest and verified ([`Registry::resolve`]), and pushed unchanged.
//! - Blobs are streamed from source to destination (never held whole in memory) and verified twice:
//!   the client hashes the stream as it passes and fails it on a mismatch, and the destination
//!   registry checks the `digest` of the upload.
//! - Blobs already in the destination repository are skipped (a HEAD each); within one registry a blob
//!   is mounted from the source repository instead of copied.
//! - Children are pushed before their index, and a manifest only after all its blobs, so the
//!   destination never references missing content; a copy stopped half-way leaves only complete blobs
//!   behind, and running it again copies only what is missing. A destination that already has the
//!   top manifest is complete and is left alone.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use futures_util::{StreamExt as _, TryStreamExt as _, stream};

use super::{Manifest, ManifestKind, Registry, RegistryError};
use crate::policy::{Digest, Reference};

/// One step of a copy, reported to the caller as it happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyEvent {
    /// The destination already had this blob.
    BlobPresent { digest: Digest, size: u64 },
    /// The blob was mounted from the source repository (same registry).
    BlobMounted { digest: Digest, size: u64 },
    /// The blob was streamed from source to destination.
    BlobCopied { digest: Digest, size: u64 },
    /// The destination already had this manifest.
    ManifestPresent { digest: Digest },
    /// The manifest was pushed.
    ManifestPushed { digest: Digest },
}

/// What a copy did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyReport {
    /// Blobs streamed.
    pub blobs_copied: usize,
    /// Bytes streamed.
    pub bytes_copied: u64,
    /// Blobs mounted within the registry.
    pub blobs_mounted: usize,
    /// Blobs already there.
    pub blobs_present: usize,
    /// Manifests pushed.
    pub manifests_pushed: usize,
    /// Manifests already there.
    pub manifests_present: usize,
}

/// Copies `source` (which must carry a digest) to `dest_host/dest_repo` under the same digest.
///
/// `on_event` sees every step; returning `ControlFlow::Break` stops the copy after the blobs in flight
/// (the result is then [`RegistryError::Stopped`]; running the copy again resumes it).
pub async fn copy(
    registry: &Registry,
    source: &Reference,
    dest_host: &str,
    dest_repo: &str,
    on_event: &(dyn Fn(&CopyEvent) -> ControlFlow<()> + Sync),
) -> Result<CopyReport, RegistryError> {
    let shown = source.to_string();
    let Some(top_digest) = source.digest().cloned() else {
        return Err(RegistryError::Request {
            reference: shown,
            what: "copying",
            detail: "a copy needs a digest (REPOSITORY@sha256:…)".into(),
        });
    };
    let mut report = CopyReport::default();
    if registry
        .manifest_exists(dest_host, dest_repo, &top_digest)
        .await?
    {
        report.manifests_present += 1;
        let _ = on_event(&CopyEvent::ManifestPresent { digest: top_digest });
        return Ok(report);
    }

    // Every manifest, children before parents.
    let top = registry.resolve(source).await?;
    let mut manifests: Vec<Manifest> = Vec::new();
    if let ManifestKind::Index {
        manifests: children,
    } = &top.kind
    {
        for child in children {
            let m = registry
                .resolve(&source.with_digest_only(child.digest.clone()))
                .await?;
            if m.is_index() {
                return Err(RegistryError::Unsupported {
                    reference: shown,
                    detail: format!("index entry {} is itself an index", child.digest),
                });
            }
            manifests.push(m);
        }
    }
    manifests.push(top);

    // Every distinct blob, with its size.
    let mut blobs: BTreeMap<Digest, u64> = BTreeMap::new();
    for m in &manifests {
        if let ManifestKind::Image { config, layers } = &m.kind {
            for d in std::iter::once(config).chain(layers) {
                blobs.insert(d.digest.clone(), d.size);
            }
        }
    }

    let src = registry.oci_ref(source);
    let dst = oci_client::Reference::with_digest(
        registry.host(dest_host),
        dest_repo.to_owned(),
        top_digest.to_string(),
    );
    registry.authenticate(&src).await;
    registry.authenticate(&dst).await;
    let same_registry = registry.host(source.domain()) == registry.host(dest_host);
    let stop = AtomicBool::new(false);
    let (copied, bytes, mounted, present, done) = (
        AtomicUsize::new(0),
        AtomicU64::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    );
    let dest_shown = format!("{dest_host}/{dest_repo}");
    let results: Vec<Result<(), RegistryError>> = stream::iter(blobs)
        .map(|(digest, size)| {
            let (src, dst, stop, dest_shown) = (&src, &dst, &stop, &dest_shown);
            let (copied, bytes, mounted, present, done) =
                (&copied, &bytes, &mounted, &present, &done);
            async move {
                if stop.load(Ordering::SeqCst) {
                    return Ok(());
                }
                let event =
                    copy_blob(registry, src, dst, dest_shown, &digest, size, same_registry).await?;
                match &event {
                    CopyEvent::BlobPresent { .. } => present.fetch_add(1, Ordering::SeqCst),
                    CopyEvent::BlobMounted { .. } => mounted.fetch_add(1, Ordering::SeqCst),
                    _ => {
                        bytes.fetch_add(size, Ordering::SeqCst);
                        copied.fetch_add(1, Ordering::SeqCst)
                    }
                };
                done.fetch_add(1, Ordering::SeqCst);
                if on_event(&event).is_break() {
                    stop.store(true, Ordering::SeqCst);
                }
                Ok(())
            }
        })
        .buffer_unordered(registry.concurrency)
        .collect()
        .await;
    results.into_iter().collect::<Result<(), _>>()?;
    report.blobs_copied = copied.into_inner();
    report.bytes_copied = bytes.into_inner();
    report.blobs_mounted = mounted.into_inner();
    report.blobs_present = present.into_inner();
    if stop.into_inner() {
        return Err(RegistryError::Stopped {
            reference: shown,
            blobs_done: done.into_inner(),
        });
    }

    for m in manifests {
        if registry
            .manifest_exists(dest_host, dest_repo, &m.digest)
            .await?
        {
            report.manifests_present += 1;
            let _ = on_event(&CopyEvent::ManifestPresent { digest: m.digest });
            continue;
        }
        let target = dst.clone_with_digest(m.digest.to_string());
        let content_type =
            http::HeaderValue::from_str(&m.media_type).map_err(|_| RegistryError::Unsupported {
                reference: shown.clone(),
                detail: format!("media type {:?} is not a valid header value", m.media_type),
            })?;
        registry
            .client
            .push_manifest_raw(&target, m.bytes.clone(), content_type)
            .await
            .map_err(|e| {
                registry.error(
                    &format!("{dest_shown}@{}", m.digest),
                    "pushing the manifest",
                    dest_host,
                    e,
                )
            })?;
        report.manifests_pushed += 1;
        let _ = on_event(&CopyEvent::ManifestPushed { digest: m.digest });
    }
    if !registry
        .manifest_exists(dest_host, dest_repo, &top_digest)
        .await?
    {
        return Err(RegistryError::Request {
            reference: format!("{dest_shown}@{top_digest}"),
            what: "checking the copy",
            detail: "the destination does not serve the manifest just pushed".into(),
        });
    }
    Ok(report)
}

/// Makes one blob present in the destination: already there, mounted, or streamed.
async fn copy_blob(
    registry: &Registry,
    src: &oci_client::Reference,
    dst: &oci_client::Reference,
    dest_shown: &str,
    digest: &Digest,
    size: u64,
    same_registry: bool,
) -> Result<CopyEvent, RegistryError> {
    let d = digest.to_string();
    let blob_ref = format!("{dest_shown}@{d}");
    let exists = registry
        .client
        .blob_exists(dst, &d)
        .await
        .map_err(|e| registry.error(&blob_ref, "checking the blob", dst.registry(), e))?;
    if exists {
        return Ok(CopyEvent::BlobPresent {
            digest: digest.clone(),
            size,
        });
    }
    if same_registry
        && registry.client.mount_blob(dst, src, &d).await.is_ok()
        && registry.client.blob_exists(dst, &d).await.unwrap_or(false)
    {
        return Ok(CopyEvent::BlobMounted {
            digest: digest.clone(),
            size,
        });
    }
    let source_blob = format!("{}/{}@{d}", src.registry(), src.repository());
    let body = registry
        .client
        .pull_blob_stream(src, d.as_str())
        .await
        .map_err(|e| registry.error(&source_blob, "fetching the blob", src.registry(), e))?;
    if let Some(len) = body.content_length.filter(|&l| l != size) {
        return Err(RegistryError::DigestMismatch {
            reference: source_blob,
            detail: format!(
                "the manifest gives its size as {size} bytes, the registry sends {len}"
            ),
        });
    }
    // The stream verifies the digest as it ends and fails the upload on a mismatch.
    let stream = body
        .stream
        .map_err(oci_client::errors::OciDistributionError::IoError);
    registry
        .client
        .push_blob_stream(dst, stream, &d, Some(size))
        .await
        .map_err(|e| registry.error(&blob_ref, "uploading the blob", dst.registry(), e))?;
    Ok(CopyEvent::BlobCopied {
        digest: digest.clone(),
        size,
    })
}
