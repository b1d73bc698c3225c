//! The node's bundle sync: bundles taken from a channel (a tag) in the private registry, staged by
//! the bundle's own signed rollout schedule.
//!
//! Each round ([`Syncer::round`]):
//!
//! 1. `HEAD` the channel's manifest and compare its `Docker-Content-Digest` with the digest last in
//!    sync: unchanged is the usual round, one request.
//! 2. On a new digest: `GET` the manifest by digest (verified), check it is a bundle artifact
//!    ([`crate::policy::artifact`]) no larger than `sync.max_size`; if its bundle layer is the bundle
//!    already installed, note the digest and stop there. If the manifest's annotations announce a
//!    rollout schedule ([`BundleArtifact::rollout_hint`], unsigned) whose wave for this node is not
//!    open yet, keep the manifest as pending and download nothing until a round finds that wave
//!    open: a staged rollout stages the registry's load too. Else `GET` both layers (digests and
//!    sizes verified, capped).
//! 3. Verify exactly as `pullgate bundle install` does ([`SyncTarget::verify`]: the
//!    [`crate::node::enforce::store::BundleStore`]'s signatures, version and expiry checks).
//! 4. Staged rollout: if this node's wave in the *signed* schedule ([`crate::policy::rollout::wave`])
//!    is open, install ([`SyncTarget::install`], the same store path, atomic); otherwise keep the
//!    verified bytes in memory as pending and install them when the wave opens — the registry is not
//!    asked again. A hint that lied can thus make this node download early or late, never install
//!    early.
//!
//! Rounds keep a stable phase: each node's rounds fall on a grid of one interval, offset by a
//! fraction of the interval derived from its seed ([`phase`]), with a small jitter that does not
//! accumulate, so a fleet's requests stay spread evenly over the interval instead of drifting into
//! random bunches.
//!
//! A digest whose content was rejected (bad signature, rollback, tampered or oversize blob, not a
//! bundle) is remembered for [`REJECTION_MEMORY`] and not downloaded again meanwhile; a reload
//! forgets them. Registry failures back off exponentially with jitter, at least `Retry-After`; the
//! bundle in force keeps being enforced throughout. When no round has succeeded for
//! `sync.max_staleness`, the sync says so loudly: an error log each round, `/readyz`,
//! `pullgate_bundle_sync_stale`, and `pullgate status`.
//!
//! The wall clock is a [`Clock`] so tests can travel in time; sleeping uses tokio's timer.
//! [`SyncTarget`] is what the daemon implements with its bundle store, audit log and policy state.

mod status;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use time::OffsetDateTime;

use crate::node::config::{SeedSource, SyncConfig};
use crate::node::enforce::store::{BundleStore, StoreError};
use crate::node::metrics::SyncMetrics;
use crate::policy::artifact::{ArtifactError, BundleArtifact};
use crate::policy::rollout::{self, Wave};
use crate::policy::{Digest, Reference, VerifiedBundle};
use crate::registry::{AuthFile, FetchError, FetchOptions, Fetcher};

pub use status::{PendingView, RejectedView, SyncStatus};

/// Largest manifest accepted (a bundle artifact's is about 1 KiB).
const MANIFEST_LIMIT: u64 = 256 * 1024;
/// How long a rejected digest is not downloaded again.
pub const REJECTION_MEMORY: Duration = Duration::from_secs(3600);
/// Rejected digests remembered at most.
const REJECTIONS_KEPT: usize = 16;
/// Backoff and `Retry-After` waits are stretched by up to twice this fraction, at random.
const JITTER: f64 = 0.1;
/// Each round falls on its node's grid point ± this fraction of the interval, at random.
const PHASE_JITTER: f64 = 0.01;
/// Domain separation of the round phase hash.
const PHASE_CONTEXT: &[u8] = b"pullgate-sync-phase-v1\0";

/// Why the sync cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot read the node's rollout seed from {} (sync.seed_file): {source}; set sync.seed or sync.seed_file", path.display())]
    Seed {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the node's rollout seed file {} (sync.seed_file) is empty; set sync.seed or sync.seed_file", path.display())]
    EmptySeed { path: PathBuf },
    #[error("sync.auth_file: {0}")]
    Auth(#[from] crate::registry::AuthError),
    #[error("sync: {0}")]
    Client(FetchError),
}

/// What went wrong getting or taking up a bundle.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("{reference}: {source}")]
    NotABundle {
        reference: String,
        #[source]
        source: ArtifactError,
    },
    #[error(
        "{reference}: the bundle artifact is {size} bytes, over sync.max_size ({limit} bytes); raise it if the bundle is legitimately this large"
    )]
    TooLarge {
        reference: String,
        size: u64,
        limit: u64,
    },
    #[error("rejected, the bundle in force is unchanged: {0}")]
    Rejected(#[from] StoreError),
    #[error("{0}")]
    Task(String),
}

impl SyncError {
    /// A short stable reason for metrics and status.
    pub fn reason(&self) -> &'static str {
        match self {
            SyncError::Fetch(e) => e.reason(),
            SyncError::NotABundle { .. } => "not_a_bundle",
            SyncError::TooLarge { .. } => "too_large",
            SyncError::Rejected(e) => e.reason(),
            SyncError::Task(_) => "internal",
        }
    }

    /// Whether the content behind the digest is at fault (remember it, do not download it again),
    /// rather than the registry or the network.
    fn blames_content(&self) -> bool {
        match self {
            SyncError::Fetch(e) => matches!(
                e,
                FetchError::DigestMismatch { .. } | FetchError::TooLarge { .. }
            ),
            SyncError::NotABundle { .. } | SyncError::TooLarge { .. } => true,
            // Not valid yet: it will be, so try again later; a local I/O problem is not the
            // bundle's fault either.
            SyncError::Rejected(e) => !matches!(e.reason(), "issued_in_future" | "io"),
            SyncError::Task(_) => false,
        }
    }
}

/// The wall clock the sync decides with (waves, expiry, staleness).
pub trait Clock: Send + Sync {
    fn now(&self) -> OffsetDateTime;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

/// The system clock moved by an adjustable offset: for tests that travel in time.
#[derive(Debug, Default)]
pub struct OffsetClock {
    offset: Mutex<time::Duration>,
}

impl OffsetClock {
    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: time::Duration) {
        *self.offset.lock().unwrap_or_else(|e| e.into_inner()) += by;
    }
}

impl Clock for OffsetClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc() + *self.offset.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Where synced bundles go. The daemon implements it with its bundle store, policy state and audit
/// log.
pub trait SyncTarget: Send + Sync + 'static {
    /// Verifies `bundle` + `signatures` exactly as an install would, without installing.
    fn verify(
        &self,
        bundle: &[u8],
        signatures: &[u8],
        now: OffsetDateTime,
        origin: &str,
    ) -> Result<VerifiedBundle, StoreError>;
    /// Verifies and installs atomically (and, in the daemon, puts it in force).
    fn install(
        &self,
        bundle: &[u8],
        signatures: &[u8],
        now: OffsetDateTime,
        origin: &str,
    ) -> Result<Arc<VerifiedBundle>, StoreError>;
    /// The SHA-256 of the installed bundle file, if a bundle is installed.
    fn installed_digest(&self) -> Option<Digest>;
    /// Where the sync keeps its own small state (the digest last in sync).
    fn state_dir(&self) -> &Path;
    /// A downloaded bundle was rejected by verification (count and audit it).
    fn rejected(&self, _origin: &str, _error: &StoreError) {}
}

/// The SHA-256 of `store`'s installed bundle file.
pub fn installed_digest(store: &BundleStore) -> Option<Digest> {
    use sha2::Digest as _;
    let path = store.current_bundle_path()?;
    let mut f = std::fs::File::open(path).ok()?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).ok()?;
    Some(Digest::Sha256(h.finalize().into()))
}

/// The sync's settings, validated.
#[derive(Debug, Clone)]
pub struct SyncSettings {
    /// The channel.
    pub source: Reference,
    pub interval: Duration,
    pub max_size: u64,
    pub max_staleness: Duration,
    pub max_backoff: Duration,
    /// This node's rollout seed.
    pub seed: Vec<u8>,
}

impl SyncSettings {
    /// The settings and the registry client options of a `[sync]` section (reads the seed and the
    /// auth file).
    pub fn from_config(c: &SyncConfig) -> Result<(SyncSettings, FetchOptions), SetupError> {
        let seed = match &c.seed {
            SeedSource::Value(v) => v.trim().as_bytes().to_vec(),
            SeedSource::File(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| SetupError::Seed {
                    path: p.clone(),
                    source,
                })?;
                let line = text.lines().next().unwrap_or("").trim();
                if line.is_empty() {
                    return Err(SetupError::EmptySeed { path: p.clone() });
                }
                line.as_bytes().to_vec()
            }
        };
        let auth = match &c.auth_file {
            Some(p) => AuthFile::load(p, true)?,
            None => AuthFile::empty(),
        };
        Ok((
            SyncSettings {
                source: c.source.clone(),
                interval: c.interval,
                max_size: c.max_size,
                max_staleness: c.max_staleness,
                max_backoff: c.max_backoff,
                seed,
            },
            FetchOptions {
                plain_http: c.plain_http.clone(),
                auth,
                endpoints: Default::default(),
                ca_file: c.ca_file.clone(),
                timeout: c.timeout,
            },
        ))
    }
}

/// A bundle artifact fetched and verified against its digests (not yet against a trust file).
#[derive(Debug, Clone)]
pub struct FetchedBundle {
    /// The manifest's digest.
    pub digest: Digest,
    pub artifact: BundleArtifact,
    pub bundle: Bytes,
    pub signatures: Bytes,
}

/// `GET`s the manifest `digest` of `source`'s repository and reads it as a bundle artifact no larger
/// than `max_size`.
async fn get_artifact(
    fetcher: &Fetcher,
    source: &Reference,
    digest: &Digest,
    max_size: u64,
) -> Result<BundleArtifact, SyncError> {
    let shown = format!("{}@{digest}", source.name());
    let manifest = fetcher.get_manifest(source, digest, MANIFEST_LIMIT).await?;
    let artifact = BundleArtifact::parse(&manifest).map_err(|source| SyncError::NotABundle {
        reference: shown.clone(),
        source,
    })?;
    if artifact.total_size() > max_size {
        return Err(SyncError::TooLarge {
            reference: shown,
            size: artifact.total_size(),
            limit: max_size,
        });
    }
    Ok(artifact)
}

/// `GET`s the bundle and signature layers of `artifact`, each verified.
async fn get_layers(
    fetcher: &Fetcher,
    source: &Reference,
    artifact: &BundleArtifact,
    max_size: u64,
) -> Result<(Bytes, Bytes), SyncError> {
    let bundle = fetcher
        .get_blob(
            source,
            &artifact.bundle.digest,
            artifact.bundle.size,
            max_size,
        )
        .await?;
    let signatures = fetcher
        .get_blob(
            source,
            &artifact.signatures.digest,
            artifact.signatures.size,
            max_size.saturating_sub(artifact.bundle.size),
        )
        .await?;
    Ok((bundle, signatures))
}

/// Fetches the bundle artifact `source` names (tag or digest): the manifest's digest from a `HEAD`,
/// the manifest by digest, both layers; every digest and size verified, at most `max_size` bytes.
/// What `pullgate bundle fetch` runs; a node's round makes the same requests.
pub async fn fetch_bundle(
    fetcher: &Fetcher,
    source: &Reference,
    max_size: u64,
) -> Result<FetchedBundle, SyncError> {
    let digest = fetcher.head_manifest(source).await?.digest;
    let artifact = get_artifact(fetcher, source, &digest, max_size).await?;
    let (bundle, signatures) = get_layers(fetcher, source, &artifact, max_size).await?;
    Ok(FetchedBundle {
        digest,
        artifact,
        bundle,
        signatures,
    })
}

/// What one round did.
#[derive(Debug)]
pub enum Round {
    /// The channel still holds the digest in sync.
    Unchanged,
    /// The channel's bundle is the installed one (noted; nothing downloaded or installed).
    InSync { version: Option<u64> },
    /// A bundle was installed.
    Installed { version: u64 },
    /// A verified bundle waits for this node's wave.
    Pending {
        version: u64,
        opens_at: OffsetDateTime,
    },
    /// The channel holds a bundle this node rejects (now, or remembered from an earlier round).
    Rejected { error: String, reason: &'static str },
    /// The registry could not be asked (network, throttling, server errors).
    Failed {
        error: String,
        reason: &'static str,
        retry_after: Option<Duration>,
    },
}

impl Round {
    fn label(&self) -> &'static str {
        match self {
            Round::Unchanged | Round::InSync { .. } => "unchanged",
            Round::Installed { .. } => "installed",
            Round::Pending { .. } => "pending",
            Round::Rejected { .. } => "rejected",
            Round::Failed { .. } => "failed",
        }
    }

    /// Whether the node learnt the channel's state and is in step with it.
    pub fn succeeded(&self) -> bool {
        !matches!(self, Round::Rejected { .. } | Round::Failed { .. })
    }
}

/// A bundle waiting for this node's wave.
struct Pending {
    digest: Digest,
    /// Signed, or (not downloaded yet) as the annotations claim.
    version: u64,
    issuer: String,
    opens_at: OffsetDateTime,
    step: Option<(usize, u8)>,
    held: Held,
}

/// What a pending bundle holds.
enum Held {
    /// Downloaded and verified; its signed schedule said wait.
    Verified { bundle: Bytes, signatures: Bytes },
    /// The manifest only: its hint said this node's download waits.
    Manifest(Box<BundleArtifact>),
}

/// A digest whose content was rejected.
struct Rejection {
    digest: Digest,
    reason: &'static str,
    message: String,
    until: Instant,
    until_wall: OffsetDateTime,
}

/// The digest last in sync, persisted in the state directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Synced {
    source: String,
    digest: String,
    version: Option<u64>,
}

const STATE_FILE: &str = "sync-state.json";

/// What the daemon and the admin API see of a running sync, and how they nudge it.
pub struct SyncHandle {
    status: Mutex<SyncStatus>,
    /// Forget remembered rejections before the next round (set by a reload: the trust file may have
    /// changed).
    forget_rejections: AtomicBool,
    wake: tokio::sync::Notify,
    seed: Vec<u8>,
}

impl SyncHandle {
    /// A snapshot of the sync's state.
    pub fn status(&self) -> SyncStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Forgets rejected digests and runs a round soon (after a reload).
    pub fn reset(&self) {
        self.forget_rejections.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// This node's rollout seed.
    pub fn seed(&self) -> &[u8] {
        &self.seed
    }

    fn update(&self, f: impl FnOnce(&mut SyncStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// One node's sync: its client, settings, target and state. Drive it with [`Syncer::run`], or round
/// by round with [`Syncer::round`].
pub struct Syncer {
    settings: SyncSettings,
    fetcher: Fetcher,
    target: Arc<dyn SyncTarget>,
    clock: Arc<dyn Clock>,
    metrics: Arc<SyncMetrics>,
    handle: Arc<SyncHandle>,
    rng: SplitMix,
    synced: Option<Synced>,
    pending: Option<Pending>,
    rejections: VecDeque<Rejection>,
    /// Consecutive registry failures (the backoff's exponent).
    failures: u32,
    /// Consecutive rounds that did not succeed (for status).
    unsuccessful: u32,
}

impl Syncer {
    /// A sync of `settings.source` into `target`; `metrics` may be shared by many syncers.
    pub fn new(
        settings: SyncSettings,
        fetcher: Fetcher,
        target: Arc<dyn SyncTarget>,
        clock: Arc<dyn Clock>,
        metrics: Arc<SyncMetrics>,
    ) -> Syncer {
        let now = clock.now();
        metrics.start(now.unix_timestamp(), settings.max_staleness);
        let synced = std::fs::read(target.state_dir().join(STATE_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice::<Synced>(&b).ok())
            .filter(|s| s.source == settings.source.to_string());
        let handle = Arc::new(SyncHandle {
            status: Mutex::new(SyncStatus::new(&settings, now, synced.as_ref())),
            forget_rejections: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
            seed: settings.seed.clone(),
        });
        let mut entropy = [0u8; 8];
        let _ = getrandom::fill(&mut entropy);
        Syncer {
            rng: SplitMix(u64::from_le_bytes(entropy) ^ (now.unix_timestamp_nanos() as u64)),
            settings,
            fetcher,
            target,
            clock,
            metrics,
            handle,
            synced,
            pending: None,
            rejections: VecDeque::new(),
            failures: 0,
            unsuccessful: 0,
        }
    }

    /// The handle status readers and reloads use.
    pub fn handle(&self) -> Arc<SyncHandle> {
        self.handle.clone()
    }

    /// Runs rounds until `stop` resolves.
    ///
    /// Rounds fall on this node's grid: `start + phase × interval + k × interval`, each ± 1 % of the
    /// interval at random, where `phase` ([`phase`]) comes from the node's seed. Nodes started
    /// together therefore ask at seed-spread points of the interval and keep doing so: the jitter
    /// does not accumulate, and rounds a busy registry slowed down return to their own grid points
    /// (the next one at least half an interval away). The first round comes at the first grid point
    /// — within the first second, scaled the same way, when nothing was ever in sync here. After a
    /// failure the backoff counts from the end of the round, and a verified bundle waiting for this
    /// node's wave wakes the sync when the wave opens; then the grid resumes.
    pub async fn run(mut self, stop: impl std::future::Future<Output = ()>) {
        use tokio::time::Instant as Tick;
        let interval = self.settings.interval;
        let unit = phase(&self.settings.seed);
        let offset = interval.mul_f64(unit);
        let origin = Tick::now();
        let mut due = if self.synced.is_some() {
            origin + offset
        } else {
            origin + interval.min(Duration::from_secs(1)).mul_f64(unit)
        };
        tokio::pin!(stop);
        loop {
            let at = self.clock.now() + due.saturating_duration_since(Tick::now());
            self.handle.update(|s| s.next_round_at = Some(at));
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep_until(due) => {}
                _ = self.handle.wake.notified() => {}
            }
            let round = self.round().await;
            let now = Tick::now();
            due = match &round {
                Round::Failed { retry_after, .. } => now + self.backoff_after(*retry_after),
                _ => {
                    // The next grid point at least half an interval away, ± PHASE_JITTER.
                    let slot = origin + next_slot(now - origin + interval / 2, offset, interval);
                    let jitter = interval.mul_f64(PHASE_JITTER * 2.0 * self.rng.unit());
                    (slot + jitter)
                        .checked_sub(interval.mul_f64(PHASE_JITTER))
                        .unwrap_or(slot)
                }
            };
            if let Some(until) = self.verified_wave_wait() {
                due = due.min(now + until);
            }
        }
    }

    /// One round (see the module documentation). Counted, logged and shown in the status.
    pub async fn round(&mut self) -> Round {
        if self.handle.forget_rejections.swap(false, Ordering::SeqCst) {
            self.rejections.clear();
        }
        let round = self.round_inner().await;
        let now = self.clock.now();
        let failure = match &round {
            Round::Rejected { reason, .. } | Round::Failed { reason, .. } => Some(*reason),
            _ => None,
        };
        self.metrics.round(round.label(), failure);
        if matches!(round, Round::Failed { .. }) {
            self.failures = self.failures.saturating_add(1);
        } else {
            self.failures = 0;
        }
        if round.succeeded() {
            self.unsuccessful = 0;
            self.metrics.set_last_success(now.unix_timestamp());
        } else {
            self.unsuccessful += 1;
        }
        self.metrics
            .set_pending_version(self.pending.as_ref().map(|p| p.version));
        // The status first: the log's staleness check reads it, this round included.
        self.publish_status(&round, now);
        self.log(&round, now);
        round
    }

    async fn round_inner(&mut self) -> Round {
        let source = self.settings.source.clone();
        let head = match self.fetcher.head_manifest(&source).await {
            Ok(h) => h,
            Err(e) => return failed(SyncError::Fetch(e)),
        };
        let digest = head.digest;
        self.handle
            .update(|s| s.channel_digest = Some(digest.to_string()));
        if self
            .synced
            .as_ref()
            .is_some_and(|s| s.digest == digest.to_string())
        {
            // The channel went back to what is in sync: a pending newer bundle is withdrawn.
            self.pending = None;
            return Round::Unchanged;
        }
        self.rejections.retain(|r| r.until > Instant::now());
        if let Some(r) = self.rejections.iter().find(|r| r.digest == digest) {
            return Round::Rejected {
                error: format!("{} (remembered; not downloaded again)", r.message),
                reason: r.reason,
            };
        }
        if self.pending.as_ref().is_some_and(|p| p.digest == digest) {
            return self.take_pending(&source).await;
        }
        match self.download(&source, &digest).await {
            Ok(r) => r,
            Err(e) => self.reject_or_fail(&digest, e),
        }
    }

    /// A new digest: manifest, layers, verification, then install or wait for the wave.
    async fn download(&mut self, source: &Reference, digest: &Digest) -> Result<Round, SyncError> {
        let artifact = get_artifact(&self.fetcher, source, digest, self.settings.max_size).await?;
        // Hashing the installed bundle is file work: off the async threads.
        let target = self.target.clone();
        let installed = tokio::task::spawn_blocking(move || target.installed_digest())
            .await
            .map_err(|e| SyncError::Task(format!("the hashing task failed: {e}")))?;
        if installed.as_ref() == Some(&artifact.bundle.digest) {
            self.note_synced(digest, artifact.claimed_version());
            self.pending = None;
            return Ok(Round::InSync {
                version: artifact.claimed_version(),
            });
        }
        if let Some(hint) = artifact.rollout_hint() {
            let step = hint.node_step(&self.settings.seed);
            if let Wave::OpensAt(opens_at) = rollout::wave_of(step, self.clock.now()) {
                self.pending = Some(Pending {
                    digest: digest.clone(),
                    version: hint.version,
                    issuer: hint.issuer,
                    opens_at,
                    step: step.map(|(i, s, _)| (i, s.percent)),
                    held: Held::Manifest(Box::new(artifact)),
                });
                return Ok(Round::Pending {
                    version: hint.version,
                    opens_at,
                });
            }
        }
        self.take_up(source, digest, &artifact).await
    }

    /// Downloads `artifact`'s layers, verifies them, then installs or waits for the signed wave.
    async fn take_up(
        &mut self,
        source: &Reference,
        digest: &Digest,
        artifact: &BundleArtifact,
    ) -> Result<Round, SyncError> {
        let (bundle, signatures) =
            get_layers(&self.fetcher, source, artifact, self.settings.max_size).await?;
        let origin = format!("{}@{digest}", source.name());
        let now = self.clock.now();
        let verified = {
            let (target, b, s, o) = (
                self.target.clone(),
                bundle.clone(),
                signatures.clone(),
                origin.clone(),
            );
            blocking(move || target.verify(&b, &s, now, &o)).await?
        };
        let (version, issuer) = (verified.version, verified.issuer.clone());
        match rollout::wave(&verified, &self.settings.seed, now) {
            Wave::Open => {
                drop(verified);
                self.install(digest, bundle, signatures, version).await
            }
            Wave::OpensAt(opens_at) => {
                let step = rollout::node_step(&verified, &self.settings.seed)
                    .map(|(i, s, _)| (i, s.percent));
                self.pending = Some(Pending {
                    digest: digest.clone(),
                    version,
                    issuer,
                    opens_at,
                    step,
                    held: Held::Verified { bundle, signatures },
                });
                Ok(Round::Pending { version, opens_at })
            }
        }
    }

    /// The channel still holds the pending bundle: once the wave is open, install it, or download
    /// it first if only its manifest is held.
    async fn take_pending(&mut self, source: &Reference) -> Round {
        let Some(p) = &self.pending else {
            return Round::Unchanged;
        };
        if self.clock.now() < p.opens_at {
            return Round::Pending {
                version: p.version,
                opens_at: p.opens_at,
            };
        }
        let digest = p.digest.clone();
        let result = match &p.held {
            // Kept until the download succeeds: a registry failure retries next round.
            Held::Manifest(artifact) => {
                let artifact = artifact.clone();
                self.take_up(source, &digest, &artifact).await
            }
            Held::Verified { bundle, signatures } => {
                let (bundle, signatures, version) = (bundle.clone(), signatures.clone(), p.version);
                self.pending = None;
                self.install(&digest, bundle, signatures, version).await
            }
        };
        match result {
            Ok(r) => r,
            Err(e) => self.reject_or_fail(&digest, e),
        }
    }

    async fn install(
        &mut self,
        digest: &Digest,
        bundle: Bytes,
        signatures: Bytes,
        version: u64,
    ) -> Result<Round, SyncError> {
        let origin = format!("{}@{digest}", self.settings.source.name());
        let now = self.clock.now();
        let target = self.target.clone();
        let installed =
            blocking(move || target.install(&bundle, &signatures, now, &origin)).await?;
        debug_assert_eq!(installed.version, version);
        self.note_synced(digest, Some(installed.version));
        self.pending = None;
        Ok(Round::Installed {
            version: installed.version,
        })
    }

    /// Turns an error into the round's result, remembering the digest when its content is at fault.
    fn reject_or_fail(&mut self, digest: &Digest, e: SyncError) -> Round {
        if !e.blames_content() {
            return failed(e);
        }
        let origin = format!("{}@{digest}", self.settings.source.name());
        if let SyncError::Rejected(store) = &e {
            self.target.rejected(&origin, store);
        }
        let (reason, message) = (e.reason(), e.to_string());
        if self.pending.as_ref().is_some_and(|p| p.digest == *digest) {
            self.pending = None;
        }
        self.rejections.push_back(Rejection {
            digest: digest.clone(),
            reason,
            message: message.clone(),
            until: Instant::now() + REJECTION_MEMORY,
            until_wall: self.clock.now() + REJECTION_MEMORY,
        });
        while self.rejections.len() > REJECTIONS_KEPT {
            self.rejections.pop_front();
        }
        Round::Rejected {
            error: message,
            reason,
        }
    }

    /// Remembers (and persists) `digest` as in sync.
    fn note_synced(&mut self, digest: &Digest, version: Option<u64>) {
        let synced = Synced {
            source: self.settings.source.to_string(),
            digest: digest.to_string(),
            version,
        };
        let dir = self.target.state_dir();
        let tmp = dir.join(format!(".{STATE_FILE}.tmp-{}", std::process::id()));
        let written = serde_json::to_vec(&synced)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|_| std::fs::rename(&tmp, dir.join(STATE_FILE)));
        if let Err(e) = written {
            // Only costs a download after a restart.
            tracing::warn!(dir = %dir.display(), error = %e, "cannot record the synced bundle digest");
        }
        self.synced = Some(synced);
    }

    /// The wait after a registry failure: exponential backoff with jitter, at least `Retry-After`.
    fn backoff_after(&mut self, retry_after: Option<Duration>) -> Duration {
        backoff(
            self.settings.interval,
            self.settings.max_backoff,
            self.failures,
            retry_after,
            [self.rng.unit(), self.rng.unit()],
        )
    }

    /// How long until the wave of a verified pending bundle opens: the sync wakes then (its install
    /// needs one HEAD: is it still the channel's?). A bundle only announced by its manifest does
    /// not wake it: its download waits for the node's next grid point past the opening, so the
    /// nodes of a wave download spread over an interval, not all at the opening. A wave already
    /// open changes nothing: this round just tried.
    fn verified_wave_wait(&self) -> Option<Duration> {
        let p = self.pending.as_ref()?;
        if !matches!(p.held, Held::Verified { .. }) {
            return None;
        }
        Duration::try_from(p.opens_at - self.clock.now())
            .ok()
            .map(|until| until + Duration::from_millis(10))
    }

    fn log(&self, round: &Round, now: OffsetDateTime) {
        let source = self.settings.source.to_string();
        match round {
            Round::Unchanged => tracing::debug!(%source, "bundle sync: unchanged"),
            Round::InSync { version } => {
                tracing::info!(%source, version = ?version, "bundle sync: the channel holds the installed bundle")
            }
            Round::Installed { version } => {
                tracing::info!(%source, version, "bundle sync: installed")
            }
            Round::Pending { version, opens_at } => tracing::info!(
                %source,
                version,
                wave_opens_at = %crate::policy::bundle::rfc3339(*opens_at),
                "bundle sync: verified; waiting for this node's rollout wave"
            ),
            Round::Rejected { error, reason } => {
                tracing::error!(%source, reason, error = %error, "bundle sync: rejected the channel's bundle; the bundle in force is unchanged")
            }
            Round::Failed { error, reason, .. } => {
                tracing::warn!(%source, reason, error = %error, failures = self.failures, "bundle sync: round failed; the bundle in force is unchanged")
            }
        }
        let status = self.handle.status();
        if status.stale_at(now, self.settings.max_staleness) {
            let since = status.last_success_at;
            tracing::error!(
                %source,
                last_success = since.map(crate::policy::bundle::rfc3339).unwrap_or_else(|| "never".into()),
                max_staleness = %humantime::format_duration(self.settings.max_staleness),
                "BUNDLE SYNC IS STALE: no round has succeeded for longer than sync.max_staleness; this node's bundle is frozen"
            );
        }
    }

    fn publish_status(&self, round: &Round, now: OffsetDateTime) {
        let pending = self.pending.as_ref().map(|p| PendingView {
            downloaded: matches!(p.held, Held::Verified { .. }),
            version: p.version,
            digest: p.digest.to_string(),
            issuer: p.issuer.clone(),
            wave_opens_at: p.opens_at,
            position: rollout::position(&p.issuer, &self.settings.seed),
            step: p.step,
        });
        let rejected = self
            .rejections
            .iter()
            .map(|r| RejectedView {
                digest: r.digest.to_string(),
                reason: r.reason,
                message: r.message.clone(),
                retry_after: r.until_wall,
            })
            .collect();
        let (succeeded, unsuccessful, failures) =
            (round.succeeded(), self.unsuccessful, self.failures);
        let synced = self.synced.clone();
        self.handle.update(|s| {
            s.last_round_at = Some(now);
            s.last_result = round.label();
            if succeeded {
                s.last_success_at = Some(now);
                s.last_error = None;
            } else if let Round::Rejected { error, reason } | Round::Failed { error, reason, .. } =
                round
            {
                s.last_error = Some((reason, error.clone()));
            }
            s.consecutive_failures = unsuccessful;
            s.backing_off = failures > 0;
            s.synced_digest = synced.as_ref().map(|x| x.digest.clone());
            s.synced_version = synced.as_ref().and_then(|x| x.version);
            s.pending = pending;
            s.rejected = rejected;
        });
    }
}

/// Where in each interval the rounds of the node with `seed` fall: a fraction in [0, 1) from the
/// first 53 bits of SHA-256(`pullgate-sync-phase-v1\0` ‖ seed). Stable across restarts, and
/// independent of the node's rollout position.
pub fn phase(seed: &[u8]) -> f64 {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(PHASE_CONTEXT);
    h.update(seed);
    let d = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    (u64::from_be_bytes(first) >> 11) as f64 / (1u64 << 53) as f64
}

/// The first point of the grid `offset + k × interval` (k ≥ 0) after `elapsed`.
fn next_slot(elapsed: Duration, offset: Duration, interval: Duration) -> Duration {
    if elapsed < offset {
        return offset;
    }
    let step = interval.as_nanos().max(1);
    let k = (elapsed - offset).as_nanos() / step + 1;
    let at = offset.as_nanos().saturating_add(k.saturating_mul(step));
    Duration::from_nanos(u64::try_from(at).unwrap_or(u64::MAX))
}

/// The wait after `failures` registry failures in a row: exponential from `interval`, capped at
/// `max_backoff`, with "equal jitter" (half fixed, half random by `unit[0]` in [0, 1)); at least
/// `retry_after` plus up to 20 % (by `unit[1]`) so that throttled nodes do not return together.
fn backoff(
    interval: Duration,
    max_backoff: Duration,
    failures: u32,
    retry_after: Option<Duration>,
    unit: [f64; 2],
) -> Duration {
    let factor = 1u32 << failures.min(16);
    let ceiling = interval
        .saturating_mul(factor)
        .min(max_backoff)
        .max(interval);
    let wait = ceiling / 2 + (ceiling / 2).mul_f64(unit[0]);
    match retry_after {
        Some(ra) => wait.max(ra.mul_f64(1.0 + 2.0 * JITTER * unit[1])),
        None => wait,
    }
}

fn failed(e: SyncError) -> Round {
    Round::Failed {
        retry_after: match &e {
            SyncError::Fetch(f) => f.retry_after(),
            _ => None,
        },
        reason: e.reason(),
        error: e.to_string(),
    }
}

/// Runs verification or installation (CPU and file work) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, SyncError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SyncError::Task(format!("the verification task failed: {e}")))?
        .map_err(SyncError::Rejected)
}

/// A small fast PRNG for jitter (splitmix64); seeded from the OS.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_is_spread_and_in_range() {
        let mut r = SplitMix(42);
        let xs: Vec<f64> = (0..10_000).map(|_| r.unit()).collect();
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
        let low = xs.iter().filter(|x| **x < 0.1).count();
        assert!((800..1200).contains(&low), "{low}");
    }

    #[test]
    fn rounds_keep_a_stable_seed_derived_phase_on_the_interval_grid() {
        let (i, ms) = (Duration::from_secs(5), Duration::from_millis);
        let off = ms(1200);
        assert_eq!(next_slot(ms(0), off, i), off);
        assert_eq!(next_slot(ms(1199), off, i), off);
        assert_eq!(next_slot(ms(1200), off, i), ms(6200));
        assert_eq!(next_slot(ms(6199), off, i), ms(6200));
        assert_eq!(next_slot(ms(123_456), off, i), ms(126_200));
        // A round that ran late (or early) does not move the grid.
        assert_eq!(next_slot(ms(6200 + 2600), off, i), ms(11_200));
        assert_eq!(phase(b"node-1"), phase(b"node-1"));
        // 1,000 seeds over 50 slices of the interval: every slice used, none crowded.
        let mut counts = [0u32; 50];
        for n in 0..1000u32 {
            let p = phase(format!("node-{n}").as_bytes());
            assert!((0.0..1.0).contains(&p));
            counts[(p * 50.0) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (5..=40).contains(&c)), "{counts:?}");
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_and_honours_retry_after() {
        let (i, max) = (Duration::from_secs(60), Duration::from_secs(900));
        let b = |failures, ra, u| backoff(i, max, failures, ra, [u, 0.0]);
        // Between half and all of interval × 2^failures, capped.
        assert_eq!(b(1, None, 0.0), Duration::from_secs(60));
        assert_eq!(b(1, None, 0.5), Duration::from_secs(90));
        assert_eq!(b(2, None, 0.0), Duration::from_secs(120));
        assert_eq!(b(3, None, 0.75), Duration::from_secs(420));
        assert_eq!(b(5, None, 0.0), Duration::from_secs(450));
        assert_eq!(b(40, None, 0.75), Duration::from_millis(787_500));
        // Never below half an interval, whatever max_backoff says.
        assert_eq!(
            backoff(i, Duration::from_secs(1), 3, None, [0.0, 0.0]),
            Duration::from_secs(30)
        );
        // Retry-After is a floor (plus up to 20 %), never shortened by the backoff.
        let ra = Some(Duration::from_secs(600));
        assert_eq!(b(1, ra, 0.0), Duration::from_secs(600));
        assert_eq!(backoff(i, max, 1, ra, [0.0, 0.5]), Duration::from_secs(660));
        assert_eq!(
            b(5, Some(Duration::from_secs(10)), 0.0),
            Duration::from_secs(450)
        );
        // Spread: nodes failing together come back at different times.
        let mut r = SplitMix(7);
        let waits: std::collections::BTreeSet<Duration> = (0..100)
            .map(|_| backoff(i, max, 2, None, [r.unit(), r.unit()]))
            .collect();
        assert!(waits.len() > 90, "{}", waits.len());
    }

    #[test]
    fn the_seed_from_the_config_or_the_first_line_of_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let config = |seed| SyncConfig {
            source: Reference::parse("registry.corp/pullgate/bundles:prod").unwrap(),
            interval: Duration::from_secs(60),
            auth_file: None,
            ca_file: None,
            plain_http: Vec::new(),
            timeout: Duration::from_secs(30),
            max_size: 1 << 20,
            max_staleness: Duration::from_secs(3600),
            max_backoff: Duration::from_secs(900),
            seed,
        };
        let seed_of = |seed| SyncSettings::from_config(&config(seed)).map(|(s, _)| s.seed);
        let id = dir.path().join("machine-id");
        std::fs::write(&id, "4c4c4544004a\nsecond line\n").unwrap();
        assert_eq!(
            seed_of(SeedSource::File(id.clone())).unwrap(),
            b"4c4c4544004a"
        );
        assert_eq!(
            seed_of(SeedSource::Value(" node-7 ".into())).unwrap(),
            b"node-7"
        );
        std::fs::write(&id, "\n").unwrap();
        let e = seed_of(SeedSource::File(id.clone())).unwrap_err();
        assert!(matches!(e, SetupError::EmptySeed { .. }), "{e}");
        assert!(
            e.to_string().contains("set sync.seed or sync.seed_file"),
            "{e}"
        );
        let e = seed_of(SeedSource::File(dir.path().join("missing"))).unwrap_err();
        assert!(matches!(e, SetupError::Seed { .. }), "{e}");
        assert!(e.to_string().contains("missing"), "{e}");
    }

    #[test]
    fn content_errors_are_remembered_registry_errors_are_not() {
        let url = || "http://r/v2/x".to_owned();
        assert!(
            SyncError::Fetch(FetchError::DigestMismatch {
                url: url(),
                detail: String::new()
            })
            .blames_content()
        );
        assert!(
            !SyncError::Fetch(FetchError::Throttled {
                url: url(),
                status: 429,
                retry_after: None
            })
            .blames_content()
        );
        assert!(
            !SyncError::Fetch(FetchError::Unreachable {
                url: url(),
                detail: String::new()
            })
            .blames_content()
        );
        assert!(
            SyncError::TooLarge {
                reference: url(),
                size: 2,
                limit: 1
            }
            .blames_content()
        );
    }
}
