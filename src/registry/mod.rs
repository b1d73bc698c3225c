//! A thin, shared layer over the OCI distribution API (the `oci-client` crate): resolve a reference to
//! a verified manifest, ask whether a manifest exists, and copy an image by digest between registries.
//!
//! This module owns [`Registry`] (one client for every registry an operation touches, with the
//! credentials of a Docker-style auth file and the list of registries reached over plain HTTP),
//! [`Manifest`] (a parsed image manifest or index, with the exact bytes it was received as),
//! [`copy`] (copy by digest: index, manifests, config and layer blobs, streamed and verified),
//! [`artifact`] (push an artifact's blobs and manifest under a tag; which digest a tag points at) and
//! [`fetch`] (the lean client of the node's bundle sync: HEAD and GET by digest straight over HTTP,
//! verified, size-capped, one request per round; see there why it does not use `oci-client`).
//!
//! It knows nothing of catalogs, bundles or nodes: the administrators' tooling uses it to approve,
//! mirror and publish, and the node's bundle sync uses [`fetch`] to fetch bundles.
//!
//! - Every manifest's digest is computed from the bytes received and compared with the digest asked
//!   for and with the registry's `Docker-Content-Digest` header; any difference is
//!   [`RegistryError::DigestMismatch`].
//! - TLS (rustls, system roots) by default; plain HTTP only for the hosts listed in
//!   [`RegistryOptions::plain_http`].
//! - Credentials never reach a log or an error message.

pub mod artifact;
pub mod auth;
pub mod copy;
pub mod fetch;
mod head;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

use crate::policy::{Digest, Reference};

pub use auth::{AuthError, AuthFile, Credential};
pub use copy::{CopyEvent, CopyReport, copy};
pub use fetch::{FetchCounters, FetchError, FetchOptions, Fetcher};

/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker manifest list (schema 2).
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image manifest (schema 2).
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Every manifest media type accepted, in the `Accept` header of every manifest request.
pub const ACCEPTED_MANIFESTS: &[&str] = &[OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];

/// What went wrong talking to a registry. Every variant names the reference and what to do.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The HTTP client could not be built (TLS set-up).
    #[error("cannot set up the registry client: {0}")]
    Setup(String),
    /// The registry has no such manifest.
    #[error("{reference}: not found in the registry ({detail}); check the name, tag or digest")]
    NotFound { reference: String, detail: String },
    /// The registry refused the credentials, or asked for some.
    #[error(
        "{reference}: the registry refused access ({detail}); log in (`skopeo login --authfile FILE HOST`) and pass --authfile FILE{note}"
    )]
    Unauthorized {
        reference: String,
        detail: String,
        /// A hint about a credential helper, or empty.
        note: String,
    },
    /// The bytes received do not have the digest asked for or announced.
    #[error(
        "{reference}: digest mismatch: {detail}; the registry (or something between) served other content than it announced — do not approve this image, report it"
    )]
    DigestMismatch { reference: String, detail: String },
    /// The manifest is not an OCI or Docker schema 2 image manifest or index.
    #[error("{reference}: unsupported manifest: {detail}")]
    Unsupported { reference: String, detail: String },
    /// Any other failure of a request (network, TLS, server error).
    #[error("{reference}: {what} failed: {detail}")]
    Request {
        reference: String,
        what: &'static str,
        detail: String,
    },
    /// The copy was stopped by its caller ([`copy::CopyEvent`] callback); re-running it resumes.
    #[error("copy of {reference} stopped after {blobs_done} blobs; run it again to resume")]
    Stopped {
        reference: String,
        blobs_done: usize,
    },
}

/// How to reach registries.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Hosts (`host[:port]`, as in image references) reached over plain HTTP instead of TLS.
    pub plain_http: Vec<String>,
    /// Credentials by registry.
    pub auth: AuthFile,
    /// Blobs copied at the same time by [`copy`] (default 4).
    pub concurrency: usize,
    /// Registry name → the `host[:port]` actually contacted for it (a pull-through cache or internal
    /// mirror of a public registry; the tests' loopback registries). Repository paths are unchanged.
    pub endpoints: BTreeMap<String, String>,
}

/// A client for every registry an operation touches.
#[derive(Clone)]
pub struct Registry {
    client: oci_client::Client,
    auth: Arc<AuthFile>,
    concurrency: usize,
    endpoints: Arc<BTreeMap<String, String>>,
    /// Registries whose credentials were handed to the client.
    stored: Arc<Mutex<HashSet<String>>>,
    /// Manifest HEADs without a ping before each (registries that need no token).
    heads: Arc<head::Heads>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

/// A blob or manifest descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type, as written.
    #[serde(default)]
    pub media_type: String,
    /// Digest of the content.
    #[serde(deserialize_with = "de_digest")]
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
    /// The platform of an index entry.
    #[serde(default)]
    pub platform: Option<Platform>,
}

/// The platform of an index entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Platform {
    /// e.g. `linux`.
    pub os: String,
    /// e.g. `amd64`.
    pub architecture: String,
    /// e.g. `v8`.
    #[serde(default)]
    pub variant: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = self.variant.as_deref().filter(|v| !v.is_empty()) {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

fn de_digest<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
    let s = String::deserialize(d)?;
    Digest::parse(&s).map_err(serde::de::Error::custom)
}

/// What a manifest is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestKind {
    /// An image: its config and layers.
    Image {
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
    /// An index (multi-platform image): its manifests.
    Index { manifests: Vec<Descriptor> },
}

/// A manifest as received: exact bytes, media type, verified digest, and what it references.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The exact bytes received (pushed unchanged, so the digest is kept).
    pub bytes: bytes::Bytes,
    /// The media type (from the manifest; inferred for an OCI manifest that omits it).
    pub media_type: String,
    /// The digest of `bytes`.
    pub digest: Digest,
    /// What it references.
    pub kind: ManifestKind,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: Option<u32>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

impl Manifest {
    /// Parses manifest bytes received for `reference`, whose digest was already verified.
    pub fn parse(
        reference: &str,
        bytes: bytes::Bytes,
        digest: Digest,
    ) -> Result<Manifest, RegistryError> {
        let unsupported = |detail: String| RegistryError::Unsupported {
            reference: reference.to_owned(),
            detail,
        };
        let raw: RawManifest = serde_json::from_slice(&bytes)
            .map_err(|e| unsupported(format!("not a JSON manifest: {e}")))?;
        if raw.schema_version != Some(2) {
            return Err(unsupported(format!(
                "schemaVersion {:?}; only schema 2 (OCI and Docker) manifests are supported",
                raw.schema_version
            )));
        }
        let (media_type, kind) = match (
            raw.media_type.as_deref(),
            raw.manifests,
            raw.config,
            raw.layers,
        ) {
            (Some(OCI_INDEX | DOCKER_LIST) | None, Some(manifests), None, None) => (
                raw.media_type.unwrap_or_else(|| OCI_INDEX.to_owned()),
                ManifestKind::Index { manifests },
            ),
            (Some(OCI_MANIFEST | DOCKER_MANIFEST) | None, None, Some(config), layers) => (
                raw.media_type.unwrap_or_else(|| OCI_MANIFEST.to_owned()),
                ManifestKind::Image {
                    config,
                    layers: layers.unwrap_or_default(),
                },
            ),
            (Some(other), ..) if !ACCEPTED_MANIFESTS.contains(&other) => {
                return Err(unsupported(format!("media type {other}")));
            }
            _ => {
                return Err(unsupported(
                    "neither an image manifest (config, layers) nor an index (manifests)".into(),
                ));
            }
        };
        Ok(Manifest {
            bytes,
            media_type,
            digest,
            kind,
        })
    }

    /// True for an index (manifest list).
    pub fn is_index(&self) -> bool {
        matches!(self.kind, ManifestKind::Index { .. })
    }
}

impl Registry {
    /// A client with `options`.
    pub fn new(options: RegistryOptions) -> Result<Registry, RegistryError> {
        // reqwest is built without a default TLS provider; use ring (no OpenSSL, no C toolchain beyond
        // what ring needs). Installing twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (connect_timeout, read_timeout) = (
            std::time::Duration::from_secs(30),
            std::time::Duration::from_secs(300),
        );
        let user_agent = concat!("pullgate/", env!("CARGO_PKG_VERSION"));
        let heads = head::Heads::new(
            options.plain_http.clone(),
            user_agent,
            connect_timeout,
            read_timeout,
        )?;
        let config = oci_client::client::ClientConfig {
            protocol: oci_client::client::ClientProtocol::HttpsExcept(options.plain_http.clone()),
            // One PUT with the streamed body (POST + PUT), instead of 4 MiB PATCH requests.
            use_monolithic_push: true,
            connect_timeout: Some(connect_timeout),
            read_timeout: Some(read_timeout),
            user_agent,
            ..Default::default()
        };
        let client = oci_client::Client::try_from(config)
            .map_err(|e| RegistryError::Setup(e.to_string()))?;
        Ok(Registry {
            client,
            auth: Arc::new(options.auth),
            concurrency: options.concurrency.max(1),
            endpoints: Arc::new(options.endpoints),
            stored: Arc::default(),
            heads: Arc::new(heads),
        })
    }

    /// The credential handed to the client for `host`, registered once.
    async fn authenticate(&self, r: &oci_client::Reference) -> RegistryAuth {
        let host = r.resolve_registry().to_owned();
        let auth = match self.auth.credential(r.registry()) {
            Credential::Anonymous => RegistryAuth::Anonymous,
            Credential::Basic { username, password } => RegistryAuth::Basic(username, password),
        };
        let fresh = self
            .stored
            .lock()
            .map(|mut s| s.insert(host.clone()))
            .unwrap_or(true);
        if fresh {
            self.client.store_auth_if_needed(&host, &auth).await;
        }
        auth
    }

    /// Fetches the manifest `reference` names (by tag, or by digest), computes its digest from the bytes
    /// received and checks it against the digest asked for and the `Docker-Content-Digest` header.
    pub async fn resolve(&self, reference: &Reference) -> Result<Manifest, RegistryError> {
        let r = self.oci_ref(reference);
        let auth = self.authenticate(&r).await;
        let shown = reference.to_string();
        let (bytes, announced) = self
            .client
            .pull_manifest_raw(&r, &auth, ACCEPTED_MANIFESTS)
            .await
            .map_err(|e| self.error(&shown, "fetching the manifest", r.registry(), e))?;
        let digest = Digest::sha256_of(&bytes);
        // oci-client verified the bytes against the header and the reference already; check again with
        // our own digest type, so a change in the crate cannot weaken the rule.
        let announced = Digest::parse(&announced).map_err(|e| RegistryError::DigestMismatch {
            reference: shown.clone(),
            detail: format!("the registry announced an invalid digest: {e}"),
        })?;
        if announced.algorithm() == "sha256" && announced != digest {
            return Err(RegistryError::DigestMismatch {
                reference: shown,
                detail: format!(
                    "the bytes received hash to {digest}, the registry announced {announced}"
                ),
            });
        }
        if let Some(asked) = reference.digest().filter(|d| d.algorithm() == "sha256") {
            if *asked != digest {
                return Err(RegistryError::DigestMismatch {
                    reference: shown,
                    detail: format!("asked for {asked}, the bytes received hash to {digest}"),
                });
            }
        }
        Manifest::parse(&shown, bytes, digest)
    }

    /// Whether the manifest `repository@digest` exists in `host` (a HEAD request: sent directly to a
    /// registry that needs no token, see [`head`]; through `oci-client` otherwise).
    pub async fn manifest_exists(
        &self,
        host: &str,
        repository: &str,
        digest: &Digest,
    ) -> Result<bool, RegistryError> {
        let r = oci_client::Reference::with_digest(
            host.to_owned(),
            repository.to_owned(),
            digest.to_string(),
        );
        let shown = format!("{host}/{repository}@{digest}");
        let access = self.heads.access(r.resolve_registry()).await;
        if access != head::Access::Client {
            let credential = self.auth.credential(r.registry());
            let path = r.repository();
            match self
                .heads
                .head(
                    access,
                    credential,
                    r.resolve_registry(),
                    path,
                    digest,
                    &shown,
                )
                .await?
            {
                head::Head::Present => return Ok(true),
                head::Head::Missing => return Ok(false),
                head::Head::Ask => {}
            }
        }
        let auth = self.authenticate(&r).await;
        match self.client.fetch_manifest_digest(&r, &auth).await {
            Ok(_) => Ok(true),
            Err(e) => match self.error(&shown, "checking the manifest", host, e) {
                RegistryError::NotFound { .. } => Ok(false),
                other => Err(other),
            },
        }
    }

    /// Maps a client error to a [`RegistryError`] for `reference` (never including credentials: the
    /// client's errors carry URLs and registry messages only).
    fn error(
        &self,
        reference: &str,
        what: &'static str,
        host: &str,
        e: OciDistributionError,
    ) -> RegistryError {
        use oci_client::errors::OciErrorCode as C;
        enum Kind {
            Digest,
            Unauthorized,
            NotFound,
            Other,
        }
        let codes = |want: &[C]| match &e {
            OciDistributionError::RegistryError { envelope, .. } => {
                envelope.errors.iter().any(|c| want.contains(&c.code))
            }
            _ => false,
        };
        let kind = match &e {
            OciDistributionError::DigestError(_) => Kind::Digest,
            OciDistributionError::UnauthorizedError { .. }
            | OciDistributionError::AuthenticationFailure(_)
            | OciDistributionError::ServerError {
                code: 401 | 403, ..
            } => Kind::Unauthorized,
            OciDistributionError::ServerError { code: 404, .. }
            | OciDistributionError::ImageManifestNotFoundError(_) => Kind::NotFound,
            _ if codes(&[
                C::ManifestUnknown,
                C::NameUnknown,
                C::BlobUnknown,
                C::NotFound,
            ]) =>
            {
                Kind::NotFound
            }
            _ if codes(&[C::Unauthorized, C::Denied]) => Kind::Unauthorized,
            _ => Kind::Other,
        };
        let (reference, detail) = (reference.to_owned(), e.to_string());
        match kind {
            Kind::Digest => RegistryError::DigestMismatch { reference, detail },
            Kind::NotFound => RegistryError::NotFound { reference, detail },
            Kind::Unauthorized => RegistryError::Unauthorized {
                reference,
                detail,
                note: self
                    .auth
                    .helper_note(host)
                    .map(|n| format!("; {n}"))
                    .unwrap_or_default(),
            },
            Kind::Other => RegistryError::Request {
                reference,
                what,
                detail,
            },
        }
    }
}

impl Registry {
    /// The host contacted for registry `name` (its endpoint, or itself).
    pub fn host(&self, name: &str) -> String {
        self.endpoints
            .get(name)
            .cloned()
            .unwrap_or_else(|| name.to_owned())
    }

    /// The `oci-client` reference for a policy reference (digest preferred over tag), addressed to the
    /// registry's endpoint.
    fn oci_ref(&self, r: &Reference) -> oci_client::Reference {
        let (host, path) = (self.host(r.domain()), r.path().to_owned());
        match (r.digest(), r.tag()) {
            (Some(d), _) => oci_client::Reference::with_digest(host, path, d.to_string()),
            (None, t) => oci_client::Reference::with_tag(
                host,
                path,
                t.unwrap_or(crate::policy::reference::DEFAULT_TAG)
                    .to_owned(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> String {
        format!("sha256:{}", hex::encode([n; 32]))
    }

    #[test]
    fn parses_image_and_index_of_both_media_type_families() {
        let image = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"c","digest":"{}","size":3}},"layers":[{{"mediaType":"l","digest":"{}","size":5}}]}}"#,
            d(1),
            d(2)
        );
        let m = Manifest::parse("x", image.into(), Digest::Sha256([9; 32])).unwrap();
        assert_eq!(m.media_type, DOCKER_MANIFEST);
        let ManifestKind::Image { config, layers } = &m.kind else {
            panic!()
        };
        assert_eq!(config.size, 3);
        assert_eq!(layers[0].digest.to_string(), d(2));

        // An OCI index without mediaType is recognised by its shape.
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":7,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}}]}}"#,
            d(3)
        );
        let m = Manifest::parse("x", index.into(), Digest::Sha256([9; 32])).unwrap();
        assert!(m.is_index());
        assert_eq!(m.media_type, OCI_INDEX);
        let ManifestKind::Index { manifests } = &m.kind else {
            panic!()
        };
        assert_eq!(
            manifests[0].platform.as_ref().unwrap().to_string(),
            "linux/arm64/v8"
        );
    }

    #[test]
    fn refuses_what_it_cannot_copy_faithfully() {
        for (body, want) in [
            (
                r#"{"schemaVersion":1,"name":"x"}"#.to_string(),
                "schemaVersion",
            ),
            (
                r#"{"schemaVersion":2,"mediaType":"application/x-other"}"#.to_string(),
                "application/x-other",
            ),
            ("not json".to_string(), "not a JSON manifest"),
            (
                r#"{"schemaVersion":2,"config":{"digest":"sha256:00","size":1}}"#.to_string(),
                "not a JSON manifest",
            ),
        ] {
            let e = Manifest::parse("ref", body.into(), Digest::Sha256([0; 32]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want) && e.contains("ref"), "{e}");
        }
    }
}
