//! A signed bundle as an OCI artifact in a registry: the manifest `pullgate bundle publish` writes and
//! the node's bundle sync reads (docs/bundle.md, *Distribution through a registry*).
//!
//! ```text
//! manifest  application/vnd.oci.image.manifest.v1+json, artifactType application/vnd.pullgate.bundle.v1+json
//!   config  application/vnd.oci.empty.v1+json  ({}, 2 bytes)
//!   layers  application/vnd.pullgate.bundle.layer.v1+json       the bundle, byte for byte
//!           application/vnd.pullgate.signatures.layer.v1+json   its detached signature file
//!   annotations  org.pullgate.bundle.{version,issued_at,expires_at,issuer}, org.opencontainers.image.created,
//!                org.pullgate.bundle.rollout (the bundle's rollout schedule as JSON, if it has one)
//! ```
//!
//! The annotations are not signed. Two things read them: `publish`'s guard against overwriting a
//! channel with an older bundle, and the node's sync, which takes the rollout schedule as a hint of
//! when to *download* ([`BundleArtifact::rollout_hint`]) so that a staged rollout also stages the
//! registry's load. What a node *installs*, and when, is decided from the signed bundle itself: a
//! false hint can only make a node download early or late.
//!
//! Pure: building and parsing the manifest JSON, no I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use time::OffsetDateTime;

use super::bundle::{Bundle, rfc3339};
use super::reference::{Digest, Reference};
use super::rollout::{self, RawStep, Step, Wave};

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
/// The bundle's rollout schedule, as the bundle writes it (JSON); absent without one.
pub const ANNOTATION_ROLLOUT: &str = "org.pullgate.bundle.rollout";
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
        let mut annotations = BTreeMap::from([
            (ANNOTATION_VERSION.to_owned(), meta.version.to_string()),
            (ANNOTATION_ISSUED_AT.to_owned(), issued.clone()),
            (ANNOTATION_EXPIRES_AT.to_owned(), rfc3339(meta.expires_at)),
            (ANNOTATION_ISSUER.to_owned(), meta.issuer.clone()),
            (ANNOTATION_CREATED.to_owned(), issued),
        ]);
        if let Some(steps) = meta.rollout() {
            let raw: Vec<RawStep> = steps.iter().map(RawStep::of).collect();
            annotations.insert(
                ANNOTATION_ROLLOUT.to_owned(),
                serde_json::to_string(&raw).expect("steps always serialise"),
            );
        }
        BundleArtifact {
            config: Descriptor::of(EMPTY_CONFIG_MEDIA_TYPE, EMPTY_CONFIG, None),
            bundle: Descriptor::of(BUNDLE_LAYER, bundle_bytes, Some("bundle.json")),
            signatures: Descriptor::of(SIGNATURES_LAYER, signatures, Some("bundle.json.sig")),
            annotations,
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

    /// The rollout schedule the annotations announce, with the version, issuer and `issued_at` it
    /// is relative to; `None` when they do not all parse (an artifact without a schedule, or
    /// published before schedules were annotated), in which case a node downloads at once.
    /// Unsigned: a hint of when to download, never of when to install.
    pub fn rollout_hint(&self) -> Option<RolloutHint> {
        let a = |key| self.annotations.get(key).map(String::as_str);
        let issued_at = OffsetDateTime::parse(
            a(ANNOTATION_ISSUED_AT)?,
            &time::format_description::well_known::Rfc3339,
        )
        .ok()?;
        let raw: Vec<RawStep> = serde_json::from_str(a(ANNOTATION_ROLLOUT)?).ok()?;
        Some(RolloutHint {
            version: self.claimed_version()?,
            issuer: a(ANNOTATION_ISSUER)?.to_owned(),
            issued_at,
            steps: rollout::parse(raw, time::Duration::MAX).ok()?,
        })
    }

    /// The bytes to fetch: the bundle and signature layers.
    pub fn total_size(&self) -> u64 {
        self.bundle.size.saturating_add(self.signatures.size)
    }
}

/// A rollout schedule as a manifest's (unsigned) annotations announce it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutHint {
    pub version: u64,
    pub issuer: String,
    pub issued_at: OffsetDateTime,
    pub steps: Box<[Step]>,
}

impl RolloutHint {
    /// The step (index and step) the node with `seed` belongs to and when it opens, as the signed
    /// schedule would place it if the hint is true.
    pub fn node_step(&self, seed: &[u8]) -> Option<(usize, Step, OffsetDateTime)> {
        rollout::step_in(&self.steps, &self.issuer, self.issued_at, seed)
    }

    /// Whether the node with `seed` downloads the bundle at `now`, or when it will.
    pub fn download_wave(&self, seed: &[u8], now: OffsetDateTime) -> Wave {
        rollout::wave_of(self.node_step(seed), now)
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
    fn the_rollout_schedule_is_announced_and_read_back_as_a_download_hint() {
        let (bytes, b) = bundle();
        let a = BundleArtifact::new(&bytes, b"{}", &b);
        let v: serde_json::Value = serde_json::from_slice(&a.manifest()).unwrap();
        let raw = v["annotations"][ANNOTATION_ROLLOUT].as_str().unwrap();
        assert!(raw.contains(r#""after":"1h""#), "{raw}");
        let hint = BundleArtifact::parse(&a.manifest())
            .unwrap()
            .rollout_hint()
            .unwrap();
        assert_eq!(&*hint.steps, b.rollout().unwrap());
        assert_eq!(
            (hint.version, hint.issuer.as_str(), hint.issued_at),
            (b.version, b.issuer.as_str(), b.issued_at)
        );
        // A true hint places every node exactly where the signed schedule does.
        for i in 0..200u32 {
            let seed = i.to_be_bytes();
            assert_eq!(hint.node_step(&seed), rollout::node_step(&b, &seed), "{i}");
        }
    }

    #[test]
    fn the_download_waits_for_the_hinted_wave_and_no_hint_means_now() {
        let (bytes, b) = bundle();
        let a = BundleArtifact::new(&bytes, b"{}", &b);
        let hint = a.rollout_hint().unwrap();
        // The fixture's schedule: 1 % at 0 s, 10 % at 1 h, ...; a node past the first step waits.
        let late = (0..1000u32)
            .map(|i| i.to_be_bytes())
            .find(|s| rollout::position(&b.issuer, s) >= 10)
            .unwrap();
        let (_, _, opens) = hint.node_step(&late).unwrap();
        assert!(opens > b.issued_at);
        let before = opens - time::Duration::seconds(1);
        assert_eq!(hint.download_wave(&late, before), Wave::OpensAt(opens));
        assert_eq!(hint.download_wave(&late, opens), Wave::Open);
        // Older artifacts (no schedule annotated) and unreadable hints: download at once.
        for (key, value) in [
            (ANNOTATION_ROLLOUT, None),
            (ANNOTATION_ROLLOUT, Some("soon")),
            (
                ANNOTATION_ROLLOUT,
                Some(r#"[{"after": "1h", "percent": 50}]"#),
            ),
            (ANNOTATION_ISSUED_AT, Some("yesterday")),
            (ANNOTATION_ISSUER, None),
            (ANNOTATION_VERSION, None),
        ] {
            let mut other = a.clone();
            match value {
                Some(v) => other.annotations.insert(key.to_owned(), v.to_owned()),
                None => other.annotations.remove(key),
            };
            let back = BundleArtifact::parse(&other.manifest()).unwrap();
            assert_eq!(back.rollout_hint(), None, "{key}={value:?}");
        }
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
