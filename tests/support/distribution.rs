//! Bundles through a registry, in-process: signing keys and a trust file, format 2 bundles (with or
//! without a rollout schedule), publishing (through `pullgate::admin::publish`, or a raw push that
//! skips its checks, as a compromised registry could serve), and simulated nodes — the real sync
//! ([`pullgate::node::sync::Syncer`]) over a bundle store in a directory of their own. Used by
//! tests/distribution.rs and benches/fleet.rs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pullgate::node::enforce::store::{BundleStore, StoreError};
use pullgate::node::metrics::SyncMetrics;
use pullgate::node::sync::{self, Clock, SyncSettings, SyncTarget, Syncer};
use pullgate::policy::artifact::{BundleArtifact, EMPTY_CONFIG, MANIFEST_MEDIA_TYPE};
use pullgate::policy::{
    Digest, PrivateKey, Reference, SignatureFile, Trust, VerifiedBundle, parse_bundle,
};
use pullgate::registry::{FetchCounters, FetchOptions, Fetcher, Registry, RegistryOptions};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The issuer of every bundle made here.
pub const ISSUER: &str = "platform-security@corp.example";

/// Administrators' keys (in process) and the trust file that lists them.
pub struct Signer {
    keys: Vec<PrivateKey>,
    pub trust_toml: String,
}

impl Signer {
    /// `n` fresh keys, all of which must sign (threshold `n`).
    pub fn generate(n: usize) -> Signer {
        let keys: Vec<PrivateKey> = (0..n)
            .map(|_| PrivateKey::generate().expect("randomness"))
            .collect();
        let mut trust_toml = format!("threshold = {n}\n");
        for (i, k) in keys.iter().enumerate() {
            trust_toml += &format!(
                "\n[[keys]]\nname = \"admin{i}\"\npublic_key = \"{}\"\n",
                k.public()
            );
        }
        Signer { keys, trust_toml }
    }

    pub fn trust(&self) -> Trust {
        Trust::from_toml(&self.trust_toml).expect("trust file")
    }

    /// Writes the trust file to `path`.
    pub fn write_trust(&self, path: &Path) {
        std::fs::write(path, &self.trust_toml).expect("write trust file");
    }

    /// The signature file of `bundle`, signed by every key.
    pub fn sign(&self, bundle: &[u8]) -> Vec<u8> {
        let mut f = SignatureFile::new();
        for k in &self.keys {
            f.add(k.sign_bundle(bundle));
        }
        f.to_json().into_bytes()
    }
}

/// A format 2 bundle: `images` approved repositories (fake digests) for the organisation, issued at
/// `issued_at`, valid for a day, with `rollout` if given.
pub fn bundle_json(
    version: u64,
    issued_at: OffsetDateTime,
    private_registry: &str,
    images: usize,
    rollout: Option<Value>,
) -> Vec<u8> {
    let t = |d: OffsetDateTime| d.format(&Rfc3339).expect("format time");
    let scan = |scanner: &str, i: usize| json!({"scanner": scanner, "version": "1.0", "report": format!("sha256:{:064x}", i + 1), "worst_severity": "none"});
    let images: Vec<Value> = (0..images)
        .map(|i| {
            json!({
                "source": format!("docker.io/library/app{i}"),
                "scope": "corp",
                "tags": {"1.0": format!("sha256:{:064x}", 0x1000 + i)},
                "provenance": {
                    "license": "MIT",
                    "scans": [scan("trivy", i), scan("grype", i)],
                    "approved_by": "alice@corp.example",
                    "approved_at": t(issued_at - time::Duration::hours(1))
                }
            })
        })
        .collect();
    let mut v = json!({
        "format": 2,
        "version": version,
        "issued_at": t(issued_at),
        "expires_at": t(issued_at + time::Duration::days(1)),
        "issuer": ISSUER,
        "private_registry": private_registry,
        "mirrors": [{"source": "docker.io", "target": "approved"}],
        "governance": {
            "organization": "corp",
            "application_label": "corp.example/application",
            "mode": "enforce"
        },
        "images": images
    });
    if let Some(r) = rollout {
        v["rollout"] = r;
    }
    serde_json::to_vec_pretty(&v).expect("bundle json")
}

/// A bundle and its signatures.
pub struct Signed {
    pub bundle: Vec<u8>,
    pub signatures: Vec<u8>,
}

impl Signed {
    pub fn new(signer: &Signer, bundle: Vec<u8>) -> Signed {
        let signatures = signer.sign(&bundle);
        Signed { bundle, signatures }
    }

    /// Writes `<dir>/<name>.json` and `.json.sig`; returns the bundle path.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(format!("{name}.json"));
        std::fs::write(&p, &self.bundle).expect("write bundle");
        std::fs::write(dir.join(format!("{name}.json.sig")), &self.signatures).expect("write sig");
        p
    }
}

/// A registry client for the loopback registry `host` (plain HTTP).
pub fn registry_client(host: &str) -> Registry {
    Registry::new(RegistryOptions {
        plain_http: vec![host.to_owned()],
        ..Default::default()
    })
    .expect("registry client")
}

/// Pushes `signed` to `host/repo:tag` as a bundle artifact without any of publish's checks (what a
/// compromised registry, or a careless tool, could serve). Returns the manifest digest.
pub async fn push_raw(registry: &Registry, host: &str, repo_tag: &str, signed: &Signed) -> String {
    push_annotated(registry, host, repo_tag, signed, |_| {}).await
}

/// [`push_raw`] with the manifest's (unsigned) annotations changed by `edit`.
pub async fn push_annotated(
    registry: &Registry,
    host: &str,
    repo_tag: &str,
    signed: &Signed,
    edit: impl FnOnce(&mut std::collections::BTreeMap<String, String>),
) -> String {
    let (repo, tag) = repo_tag.split_once(':').expect("repo:tag");
    let meta = parse_bundle(&signed.bundle).expect("bundle parses");
    let mut artifact = BundleArtifact::new(&signed.bundle, &signed.signatures, &meta);
    edit(&mut artifact.annotations);
    let blobs = [
        Bytes::from_static(EMPTY_CONFIG),
        Bytes::from(signed.bundle.clone()),
        Bytes::from(signed.signatures.clone()),
    ];
    pullgate::registry::artifact::push_artifact(
        registry,
        host,
        repo,
        tag,
        &blobs,
        Bytes::from(artifact.manifest()),
        MANIFEST_MEDIA_TYPE,
    )
    .await
    .expect("raw push")
    .digest
    .to_string()
}

/// A seed whose rollout position for [`ISSUER`] lies in `range`.
pub fn seed_at(range: std::ops::Range<u8>) -> String {
    (0u32..)
        .map(|i| format!("node-{i}"))
        .find(|s| range.contains(&pullgate::policy::rollout::position(ISSUER, s.as_bytes())))
        .expect("a seed in range")
}

/// The daemon's bundle store in a directory, verified against a trust file, without the daemon's
/// policy state and audit log.
pub struct StoreTarget {
    pub store: BundleStore,
    pub trust: Arc<Trust>,
}

impl SyncTarget for StoreTarget {
    fn verify(
        &self,
        bundle: &[u8],
        signatures: &[u8],
        now: OffsetDateTime,
        origin: &str,
    ) -> Result<VerifiedBundle, StoreError> {
        self.store
            .verify_new(bundle, signatures, &self.trust, now, Path::new(origin))
    }

    fn install(
        &self,
        bundle: &[u8],
        signatures: &[u8],
        now: OffsetDateTime,
        origin: &str,
    ) -> Result<Arc<VerifiedBundle>, StoreError> {
        self.store
            .install(bundle, signatures, &self.trust, now, Path::new(origin))
            .map(Arc::new)
    }

    fn installed_digest(&self) -> Option<Digest> {
        sync::installed_digest(&self.store)
    }

    fn state_dir(&self) -> &Path {
        self.store.dir()
    }
}

/// An in-memory bundle store: the same verification as [`BundleStore::verify_new`] (signatures,
/// content, validity, newer than the installed version) without the disk writes, so thousands of
/// simulated nodes sharing one disk measure distribution rather than fsync. The sync's own state file
/// still goes to `dir`.
pub struct MemTarget {
    dir: PathBuf,
    trust: Arc<Trust>,
    installed: std::sync::Mutex<Option<(u64, pullgate::policy::Digest)>>,
}

impl MemTarget {
    pub fn new(dir: &Path, trust: Arc<Trust>) -> MemTarget {
        MemTarget {
            dir: dir.to_path_buf(),
            trust,
            installed: std::sync::Mutex::new(None),
        }
    }

    pub fn version(&self) -> Option<u64> {
        self.installed.lock().unwrap().as_ref().map(|(v, _)| *v)
    }
}

impl SyncTarget for MemTarget {
    fn verify(
        &self,
        bundle: &[u8],
        signatures: &[u8],
        now: OffsetDateTime,
        origin: &str,
    ) -> Result<pullgate::policy::VerifiedBundle, pullgate::node::enforce::store::StoreError> {
        use pullgate::node::enforce::store::StoreError;
        let sigs = SignatureFile::parse(signatures).map_err(|source| StoreError::Signatures {
            path: origin.into(),
            source,
        })?;
        pullgate::policy::verify_bundle(bundle, &sigs, &self.trust, self.version(), now).map_err(
            |source| StoreError::Rejected {
                path: origin.into(),
                source,
            },
        )
    }

    fn install(
        &self,
        bundle: &[u8],
        signatures: &[u8],
        now: OffsetDateTime,
        origin: &str,
    ) -> Result<Arc<pullgate::policy::VerifiedBundle>, pullgate::node::enforce::store::StoreError>
    {
        let b = self.verify(bundle, signatures, now, origin)?;
        *self.installed.lock().unwrap() =
            Some((b.version, pullgate::policy::Digest::sha256_of(bundle)));
        Ok(Arc::new(b))
    }

    fn installed_digest(&self) -> Option<pullgate::policy::Digest> {
        self.installed
            .lock()
            .unwrap()
            .as_ref()
            .map(|(_, d)| d.clone())
    }

    fn state_dir(&self) -> &Path {
        &self.dir
    }
}

/// Where a simulated node keeps its bundles.
pub enum SimStore {
    /// The daemon's bundle store in the node's directory.
    Disk(BundleStore),
    /// [`MemTarget`].
    Memory(Arc<MemTarget>),
}

/// One simulated node: the real sync over a bundle store of its own.
pub struct SimNode {
    pub store: SimStore,
    pub counters: Arc<FetchCounters>,
}

/// What a simulated node is built from.
pub struct SimSettings {
    pub source: String,
    pub registry_host: String,
    pub interval: Duration,
    pub max_size: u64,
    pub max_staleness: Duration,
    pub max_backoff: Duration,
    pub timeout: Duration,
}

impl SimSettings {
    pub fn new(registry_host: &str, repo_tag: &str) -> SimSettings {
        SimSettings {
            source: format!("{registry_host}/{repo_tag}"),
            registry_host: registry_host.to_owned(),
            interval: Duration::from_secs(1),
            max_size: 64 << 20,
            max_staleness: Duration::from_secs(3600),
            max_backoff: Duration::from_secs(4),
            timeout: Duration::from_secs(10),
        }
    }
}

impl SimNode {
    /// A node with state in `dir` (a bundle store there), rollout `seed`, counting its requests into
    /// `counters` and its rounds into `metrics`; returns it and its syncer.
    pub fn new(
        dir: &Path,
        seed: &str,
        trust: Arc<Trust>,
        s: &SimSettings,
        clock: Arc<dyn Clock>,
        counters: Arc<FetchCounters>,
        metrics: Arc<SyncMetrics>,
    ) -> (SimNode, Syncer) {
        Self::with_store(dir, seed, trust, s, clock, counters, metrics, false)
    }

    /// [`SimNode::new`], with the bundles in memory ([`MemTarget`]) if `in_memory`.
    #[allow(clippy::too_many_arguments)]
    pub fn with_store(
        dir: &Path,
        seed: &str,
        trust: Arc<Trust>,
        s: &SimSettings,
        clock: Arc<dyn Clock>,
        counters: Arc<FetchCounters>,
        metrics: Arc<SyncMetrics>,
        in_memory: bool,
    ) -> (SimNode, Syncer) {
        std::fs::create_dir_all(dir).expect("node dir");
        let (store, target): (SimStore, Arc<dyn SyncTarget>) = if in_memory {
            let m = Arc::new(MemTarget::new(dir, trust));
            (SimStore::Memory(m.clone()), m)
        } else {
            let store = BundleStore::new(dir);
            let target = Arc::new(StoreTarget {
                store: store.clone(),
                trust,
            });
            (SimStore::Disk(store), target)
        };
        let fetcher = Fetcher::new(
            FetchOptions {
                plain_http: vec![s.registry_host.clone()],
                timeout: s.timeout,
                ..Default::default()
            },
            counters.clone(),
        )
        .expect("fetcher");
        let settings = SyncSettings {
            source: Reference::parse(&s.source).expect("source"),
            interval: s.interval,
            max_size: s.max_size,
            max_staleness: s.max_staleness,
            max_backoff: s.max_backoff,
            seed: seed.as_bytes().to_vec(),
        };
        let syncer = Syncer::new(settings, fetcher, target, clock, metrics);
        (SimNode { store, counters }, syncer)
    }

    /// The version the node has installed.
    pub fn version(&self) -> Option<u64> {
        match &self.store {
            SimStore::Disk(s) => s.installed_version().ok().flatten(),
            SimStore::Memory(m) => m.version(),
        }
    }
}
