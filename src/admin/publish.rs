//! `pullgate bundle publish`: a signed bundle pushed to a channel (a tag) of the private registry as an
//! OCI artifact ([`crate::policy::artifact`]), where every node's sync takes it from.
//!
//! Before anything is pushed the bundle must verify against the administrators' trust file (the
//! signatures, content and validity a node checks) and be newer than what the channel holds, so a
//! channel never moves backwards by mistake. What the channel holds is read from its manifest's
//! version annotation, which `publish` itself wrote: the guard is for people; nodes decide on the
//! signed version alone. Two administrators publishing to one channel at the same moment are not
//! serialised (a registry has no compare-and-swap): the later push wins, and nodes still refuse a
//! rollback.

use bytes::Bytes;
use time::OffsetDateTime;

use crate::policy::artifact::{BundleArtifact, EMPTY_CONFIG, MANIFEST_MEDIA_TYPE, parse_channel};
use crate::policy::{BundleError, Digest, Reference, SignatureFile, Trust, verify_bundle};
use crate::registry::artifact::{push_artifact, tag_digest};
use crate::registry::{Registry, RegistryError};

/// Why a bundle was not published. Nothing was pushed unless the error says so.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(
        "--to {0}: name the channel as REGISTRY/REPOSITORY:CHANNEL, e.g. registry.corp/pullgate/bundles:prod"
    )]
    Target(String),
    #[error("the signature file is unreadable: {0}")]
    Signatures(String),
    #[error("the bundle does not verify against the trust file, not publishing: {0}")]
    Rejected(#[from] BundleError),
    #[error(
        "{channel} holds bundle v{held}; v{offered} is not newer, not publishing (nodes would refuse it as a rollback); build the next version"
    )]
    NotNewer {
        channel: String,
        held: u64,
        offered: u64,
    },
    #[error(
        "{channel} holds something that is not a pullgate bundle ({detail}); not overwriting it: choose another channel"
    )]
    Occupied { channel: String, detail: String },
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// What was published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The channel, as given.
    pub channel: String,
    /// The artifact's manifest digest (what nodes compare).
    pub digest: Digest,
    pub version: u64,
    /// The version the channel held before, if any.
    pub previous: Option<u64>,
    /// The channel already held exactly this artifact: nothing was pushed.
    pub unchanged: bool,
    /// Blobs uploaded (the registry already had the others).
    pub blobs_pushed: usize,
}

/// Verifies `bundle` + `signatures` against `trust` at `now` and pushes them to `to`
/// (`REGISTRY/REPOSITORY:CHANNEL`) through `registry`.
pub async fn publish(
    registry: &Registry,
    bundle: &[u8],
    signatures: &[u8],
    trust: &Trust,
    to: &str,
    now: OffsetDateTime,
) -> Result<Published, PublishError> {
    let target = channel(to)?;
    let tag = target.tag().unwrap_or_default().to_owned();
    let sigs =
        SignatureFile::parse(signatures).map_err(|e| PublishError::Signatures(e.to_string()))?;
    let verified = verify_bundle(bundle, &sigs, trust, None, now)?;
    let artifact = BundleArtifact::new(bundle, signatures, &verified);
    let manifest = Bytes::from(artifact.manifest());
    let digest = Digest::sha256_of(&manifest);
    let (host, repo) = (target.domain(), target.path());

    let mut previous = None;
    if let Some(held) = tag_digest(registry, host, repo, &tag).await? {
        if held == digest {
            return Ok(Published {
                channel: to.to_owned(),
                digest,
                version: verified.version,
                previous: Some(verified.version),
                unchanged: true,
                blobs_pushed: 0,
            });
        }
        let held_manifest = registry.resolve(&target.with_digest_only(held)).await?;
        let occupied = |detail: String| PublishError::Occupied {
            channel: to.to_owned(),
            detail,
        };
        let held =
            BundleArtifact::parse(&held_manifest.bytes).map_err(|e| occupied(e.to_string()))?;
        let held_version = held.claimed_version().ok_or_else(|| {
            occupied("its manifest has no org.pullgate.bundle.version annotation".into())
        })?;
        if held_version >= verified.version {
            return Err(PublishError::NotNewer {
                channel: to.to_owned(),
                held: held_version,
                offered: verified.version,
            });
        }
        previous = Some(held_version);
    }
    let blobs = [
        Bytes::from_static(EMPTY_CONFIG),
        Bytes::copy_from_slice(bundle),
        Bytes::copy_from_slice(signatures),
    ];
    let report = push_artifact(
        registry,
        host,
        repo,
        &tag,
        &blobs,
        manifest,
        MANIFEST_MEDIA_TYPE,
    )
    .await?;
    Ok(Published {
        channel: to.to_owned(),
        digest: report.digest,
        version: verified.version,
        previous,
        unchanged: false,
        blobs_pushed: report.blobs_pushed,
    })
}

/// `REGISTRY/REPOSITORY:CHANNEL`: a channel with a tag (not a digest).
fn channel(to: &str) -> Result<Reference, PublishError> {
    parse_channel(to)
        .filter(|r| r.digest().is_none())
        .ok_or_else(|| PublishError::Target(to.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_name_registry_repository_and_tag() {
        assert!(channel("registry.corp/pullgate/bundles:prod").is_ok());
        assert!(channel("127.0.0.1:5000/pullgate/bundles:canary").is_ok());
        for bad in [
            "pullgate/bundles:prod",
            "registry.corp/pullgate/bundles",
            "registry.corp/pullgate/bundles@sha256:0000000000000000000000000000000000000000000000000000000000000000",
        ] {
            let e = channel(bad).unwrap_err().to_string();
            assert!(e.contains("REGISTRY/REPOSITORY:CHANNEL"), "{bad}: {e}");
        }
    }
}
