//! A signed bundle as an OCI artifact in a registry: the manifest `pullgate bundle publish` writes and
//! the node's bundle sync reads (docs/bundle.md, *Distribution through a registry*).
//!
//! ```text
//! manifest  application/vnd.oci.image.manifest.v1+json, artifactType application/vnd.pullgate.bundle.v1+json
//!   config  application/vnd.oci.empty.v1+json  ({}, 2 bytes)
//!   layers  application/vnd.pullgate.bundle.layer.v1+json       the bundle, byte for byte
//!           application/vnd.pullgate.signatures.layer.v1+json   its detached signature file
//!   annotations  org.pullgate.bundle.{version,issued_at,expires_at,issuer}, org.opencontainers.image.created
//! ```
//!
//! The annotations are for people and registry UIs only: they are not signed, and nothing decides on
//! them except `publish`'s guard against overwriting a channel with an older bundle. What a node
//! takes up is decided from the signed bundle itself.
//!
//! Pure: building and parsing the manifest JSON, no I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::bundle::{Bundle, rfc3339};
use super::reference::{Digest, Reference};

/// The `artifactType` of a bundle artifact.
pub const ARTIFACT_TYPE: &str = "application/vnd.pullgate.bundle.v1+json";
/// The OCI manifest media type.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// The empty config of an artifact (image-spec 1.1).
pub const EMPTY_CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
/// The empty config's content.
pub const EMPTY_CONFIG: &[u8] = b"{}";
/// The layer holding the bundle bytes.
pub const BUNDLE_LAYER: &str = "application/vnd.pullgate.bundle.layer.v1+json";
/// The layer holding the detached signature file.
pub const SIGNATURES_LAYER: &str = "application/vnd.pullgate.signatures.layer.v1+json";
/// Manifest annotations (informational, unsigned).
pub const ANNOTATION_VERSION: &str = "org.pullgate.bundle.version";
pub const ANNOTATION_ISSUED_AT: &str = "org.pullgate.bundle.issued_at";
pub const ANNOTATION_EXPIRES_AT: &str = "org.pullgate.bundle.expires_at";
pub const ANNOTATION_ISSUER: &str = "org.pullgate.bundle.issuer";
const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";
const ANNOTATION_TITLE: &str = "org.opencontainers.image.title";

/// A channel as `publish --to` and `sync.source` name it: the registry written out
/// (`registry.corp/…`, `host:port/…`, `localhost/…`, never Docker Hub implied), a repository, and a
/// tag or digest written out (no implied `latest`). `None` for anything else.
pub fn parse_channel(s: &str) -> Option<Reference> {
    let first = s.split('/').next().unwrap_or("");
    let names_registry =
        s.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    let names_version = s
        .rsplit('/')
        .next()
        .is_some_and(|last| last.contains(':') || last.contains('@'));
    Reference::parse(s)
        .ok()
        .filter(|r| names_registry && names_version && r.domain() == first)
}

/// Why a manifest is not a usable bundle artifact.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArtifactError {
    #[error("the manifest is not JSON of an OCI manifest: {0}")]
    Malformed(String),
    #[error(
        "the manifest is not a pullgate bundle (artifactType {found:?}, expected {ARTIFACT_TYPE}); is the reference the right channel?"
    )]
    NotABundle { found: String },
    #[error("the bundle artifact has {found} {what} layer(s); it must have exactly one")]
    Layers { what: &'static str, found: usize },
}

/// One descriptor of the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    #[serde(with = "digest_string")]
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    fn of(media_type: &str, content: &[u8], title: Option<&str>) -> Descriptor {
        Descriptor {
            media_type: media_type.to_owned(),
            digest: Digest::sha256_of(content),
            size: content.len() as u64,
            annotations: title
                .map(|t| BTreeMap::from([(ANNOTATION_TITLE.to_owned(), t.to_owned())]))
                .unwrap_or_default(),
        }
    }
}

mod digest_string {
    use super::Digest;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Digest, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&d.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    artifact_type: Option<String>,
    config: Descriptor,
    layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

/// A bundle artifact: what a manifest says about its bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleArtifact {
    /// The config descriptor (the empty config).
    pub config: Descriptor,
    /// The bundle layer.
    pub bundle: Descriptor,
    /// The signature file layer.
    pub signatures: Descriptor,
    /// The manifest's annotations (unsigned).
    pub annotations: BTreeMap<String, String>,
}

impl BundleArtifact {
    /// The artifact of `bundle_bytes` (parsed as `meta`) and its signature file.
    pub fn new(bundle_bytes: &[u8], signatures: &[u8], meta: &Bundle) -> BundleArtifact {
        let issued = rfc3339(meta.issued_at);
        BundleArtifact {
            config: Descriptor::of(EMPTY_CONFIG_MEDIA_TYPE, EMPTY_CONFIG, None),
            bundle: Descriptor::of(BUNDLE_LAYER, bundle_bytes, Some("bundle.json")),
            signatures: Descriptor::of(SIGNATURES_LAYER, signatures, Some("bundle.json.sig")),
            annotations: BTreeMap::from([
                (ANNOTATION_VERSION.to_owned(), meta.version.to_string()),
                (ANNOTATION_ISSUED_AT.to_owned(), issued.clone()),
                (ANNOTATION_EXPIRES_AT.to_owned(), rfc3339(meta.expires_at)),
                (ANNOTATION_ISSUER.to_owned(), meta.issuer.clone()),
                (ANNOTATION_CREATED.to_owned(), issued),
            ]),
        }
    }

    /// The manifest JSON (the bytes pushed; their SHA-256 is the artifact's digest).
    pub fn manifest(&self) -> Vec<u8> {
        let raw = RawManifest {
            schema_version: 2,
            media_type: Some(MANIFEST_MEDIA_TYPE.to_owned()),
            artifact_type: Some(ARTIFACT_TYPE.to_owned()),
            config: self.config.clone(),
            layers: vec![self.bundle.clone(), self.signatures.clone()],
            annotations: self.annotations.clone(),
        };
        serde_json::to_vec(&raw).expect("a manifest always serialises")
    }

    /// Reads a manifest: it must be an OCI manifest of `artifactType` [`ARTIFACT_TYPE`] with exactly
    /// one bundle layer and one signature layer.
    pub fn parse(manifest: &[u8]) -> Result<BundleArtifact, ArtifactError> {
        let raw: RawManifest = serde_json::from_slice(manifest)
            .map_err(|e| ArtifactError::Malformed(e.to_string()))?;
        if raw.schema_version != 2 {
            return Err(ArtifactError::Malformed(format!(
                "schemaVersion {}",
                raw.schema_version
            )));
        }
        if raw
            .media_type
            .as_deref()
            .is_some_and(|m| m != MANIFEST_MEDIA_TYPE)
        {
            return Err(ArtifactError::NotABundle {
                found: raw.media_type.unwrap_or_default(),
            });
        }
        // Registries that predate image-spec 1.1 may drop `artifactType`; the config's media type
        // then carries it (the 1.0 artifact convention).
        let kind = raw
            .artifact_type
            .clone()
            .unwrap_or_else(|| raw.config.media_type.clone());
        if kind != ARTIFACT_TYPE {
            return Err(ArtifactError::NotABundle { found: kind });
        }
        let pick = |media_type: &str, what: &'static str| {
            let found: Vec<&Descriptor> = raw
                .layers
                .iter()
                .filter(|l| l.media_type == media_type)
                .collect();
            match found.as_slice() {
                [one] => Ok((*one).clone()),
                _ => Err(ArtifactError::Layers {
                    what,
                    found: found.len(),
                }),
            }
        };
        Ok(BundleArtifact {
            bundle: pick(BUNDLE_LAYER, "bundle")?,
            signatures: pick(SIGNATURES_LAYER, "signature")?,
            config: raw.config,
            annotations: raw.annotations,
        })
    }

    /// The version the annotations claim (unsigned).
    pub fn claimed_version(&self) -> Option<u64> {
        self.annotations.get(ANNOTATION_VERSION)?.parse().ok()
    }

    /// The bytes to fetch: the bundle and signature layers.
    pub fn total_size(&self) -> u64 {
        self.bundle.size.saturating_add(self.signatures.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle() -> (Vec<u8>, Bundle) {
        let bytes = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/policy/example-bundle-v2.json"
        ))
        .unwrap();
        let b = super::super::parse_bundle(&bytes).unwrap();
        (bytes, b)
    }

    #[test]
    fn manifest_round_trips_with_annotations_and_empty_config() {
        let (bytes, b) = bundle();
        let a = BundleArtifact::new(&bytes, b"{\"signatures\":[]}", &b);
        let m = a.manifest();
        let v: serde_json::Value = serde_json::from_slice(&m).unwrap();
        assert_eq!(v["artifactType"], ARTIFACT_TYPE);
        assert_eq!(v["config"]["mediaType"], EMPTY_CONFIG_MEDIA_TYPE);
        assert_eq!(
            v["config"]["digest"],
            "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        assert_eq!(v["layers"][0]["mediaType"], BUNDLE_LAYER);
        assert_eq!(v["layers"][0]["size"], bytes.len());
        assert_eq!(
            v["annotations"][ANNOTATION_VERSION],
            b.version.to_string().as_str()
        );
        assert_eq!(v["annotations"][ANNOTATION_ISSUER], b.issuer.as_str());
        let back = BundleArtifact::parse(&m).unwrap();
        assert_eq!(back, a);
        assert_eq!(back.claimed_version(), Some(b.version));
    }

    #[test]
    fn channels_name_their_registry_and_version() {
        let r = parse_channel("registry.corp/pullgate/bundles:prod").unwrap();
        assert_eq!(
            (r.domain(), r.path(), r.tag()),
            ("registry.corp", "pullgate/bundles", Some("prod"))
        );
        assert!(parse_channel("127.0.0.1:5000/pullgate/bundles:canary").is_some());
        assert!(parse_channel("localhost/b@sha256:0000000000000000000000000000000000000000000000000000000000000000").is_some());
        for bad in [
            "pullgate/bundles:prod",
            "registry.corp/pullgate/bundles",
            "registry.corp:5000/pullgate/bundles",
            "registry.corp/Pullgate:prod",
            "",
        ] {
            assert!(parse_channel(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn other_manifests_are_refused_with_the_reason() {
        let (bytes, b) = bundle();
        let good: serde_json::Value =
            serde_json::from_slice(&BundleArtifact::new(&bytes, b"{}", &b).manifest()).unwrap();
        let edit = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = good.clone();
            f(&mut v);
            BundleArtifact::parse(&serde_json::to_vec(&v).unwrap())
                .unwrap_err()
                .to_string()
        };
        let e = edit(&|v| v["artifactType"] = "application/vnd.example+json".into());
        assert!(e.contains("not a pullgate bundle"), "{e}");
        let e = edit(&|v| {
            v.as_object_mut().unwrap().remove("artifactType");
        });
        assert!(e.contains("not a pullgate bundle"), "{e}");
        let e = edit(&|v| {
            v["layers"].as_array_mut().unwrap().pop();
        });
        assert!(e.contains("0 signature layer"), "{e}");
        let e = edit(&|v| v["layers"][1]["mediaType"] = BUNDLE_LAYER.into());
        assert!(e.contains("2 bundle layer"), "{e}");
        let e = edit(&|v| v["layers"][0]["digest"] = "sha256:00".into());
        assert!(e.contains("not JSON of an OCI manifest"), "{e}");
        // The 1.0 convention: the config's media type names the artifact.
        let mut v = good.clone();
        v.as_object_mut().unwrap().remove("artifactType");
        v["config"]["mediaType"] = ARTIFACT_TYPE.into();
        assert!(BundleArtifact::parse(&serde_json::to_vec(&v).unwrap()).is_ok());
    }
}
