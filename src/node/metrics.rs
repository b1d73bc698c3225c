//! Operator-facing counters in Prometheus text format, and the small HTTP endpoint that serves them
//! with `/healthz` and `/readyz`, apart from the CRI data path.
//!
//! The hot path only touches atomics in fixed arrays (calls by method and gRPC status, upstream
//! latency histograms); decision and bundle-install counters, which change at pull rate, sit behind
//! a mutex. Container starts of images with a lifecycle or an exception are also remembered (the last
//! [`RECENT_STARTS`] distinct ones) for `pullgate status`.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::policy::{Decision, ReasonCode, VerifiedBundle};
use crate::registry::FetchCounters;
use time::OffsetDateTime;

/// How many distinct recent lifecycle starts `pullgate status` can show.
pub const RECENT_STARTS: usize = 64;

/// CRI methods with their own label; everything else is `other`.
pub const METHODS: &[&str] = &[
    "Version",
    "RunPodSandbox",
    "StopPodSandbox",
    "RemovePodSandbox",
    "PodSandboxStatus",
    "ListPodSandbox",
    "CreateContainer",
    "StartContainer",
    "StopContainer",
    "RemoveContainer",
    "ListContainers",
    "ContainerStatus",
    "UpdateContainerResources",
    "ReopenContainerLog",
    "ExecSync",
    "Exec",
    "Attach",
    "PortForward",
    "ContainerStats",
    "ListContainerStats",
    "PodSandboxStats",
    "ListPodSandboxStats",
    "UpdateRuntimeConfig",
    "Status",
    "CheckpointContainer",
    "GetContainerEvents",
    "ListMetricDescriptors",
    "ListPodSandboxMetrics",
    "RuntimeConfig",
    "ListImages",
    "ImageStatus",
    "PullImage",
    "RemoveImage",
    "ImageFsInfo",
];
const OTHER: usize = METHODS.len();
/// gRPC codes 0..=16, plus one slot for calls that ended without any status (client went away).
const CODES: usize = 18;
const NO_STATUS: usize = 17;
/// Upstream latency histogram bucket bounds, in seconds.
const BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 10.0, 60.0,
];

/// Index of a method path's label (`/runtime.v1.ImageService/PullImage` → `PullImage`).
pub fn method_index(path: &str) -> usize {
    let name = path
        .strip_prefix("/runtime.v1.RuntimeService/")
        .or_else(|| path.strip_prefix("/runtime.v1.ImageService/"));
    match name {
        Some(n) => METHODS.iter().position(|m| *m == n).unwrap_or(OTHER),
        None => OTHER,
    }
}

fn method_label(i: usize) -> &'static str {
    METHODS.get(i).copied().unwrap_or("other")
}

struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            buckets: Default::default(),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| s <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

/// Why pullgate refused an intercepted request body (`pullgate_request_body_refusals_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyRefusal {
    /// The announced message is over the method's cap.
    MessageCap = 0,
    /// No room in the global body budget within the wait.
    Budget = 1,
    /// The body did not arrive within the read timeout.
    ReadTimeout = 2,
}

impl BodyRefusal {
    const ALL: [BodyRefusal; 3] = [
        BodyRefusal::MessageCap,
        BodyRefusal::Budget,
        BodyRefusal::ReadTimeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BodyRefusal::MessageCap => "message_cap",
            BodyRefusal::Budget => "budget",
            BodyRefusal::ReadTimeout => "read_timeout",
        }
    }
}

/// Why pullgate closed (or would not serve) a client connection
/// (`pullgate_connections_closed_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnClose {
    /// No open call for `server.limits.idle_timeout`.
    IdleTimeout = 0,
    /// Closed to make room for a new connection at `server.limits.max_connections`.
    Evicted = 1,
    /// A new connection refused: the cap was reached and no connection was idle.
    Refused = 2,
}

impl ConnClose {
    const ALL: [ConnClose; 3] = [
        ConnClose::IdleTimeout,
        ConnClose::Evicted,
        ConnClose::Refused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ConnClose::IdleTimeout => "idle_timeout",
            ConnClose::Evicted => "evicted",
            ConnClose::Refused => "refused",
        }
    }
}

/// The installed bundle as metrics see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BundleGauge {
    pub version: u64,
    pub issued_unix: i64,
    pub expires_unix: i64,
    /// When the soonest exception that has not expired yet expires (none: no such exception).
    pub next_exception_expiry_unix: Option<i64>,
}

impl BundleGauge {
    /// The gauges of `b` at `now`.
    pub fn of(b: &VerifiedBundle, now: OffsetDateTime) -> BundleGauge {
        BundleGauge {
            version: b.version,
            issued_unix: b.issued_at.unix_timestamp(),
            expires_unix: b.expires_at.unix_timestamp(),
            next_exception_expiry_unix: b
                .exceptions()
                .iter()
                .map(|e| e.expires_at)
                .filter(|t| *t > now)
                .min()
                .map(OffsetDateTime::unix_timestamp),
        }
    }
}

/// A container start of an image that is deprecated, has a sunset ahead, or runs by exception.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleStart {
    /// The image as the pod spec named it.
    pub image: String,
    /// `deprecated`, `approved` (with a sunset ahead) or `exception`.
    pub reason: &'static str,
    /// The pod's scope.
    pub scope: Option<String>,
    /// The sunset date, if any (RFC 3339).
    pub sunset_at: Option<String>,
    /// The replacement tag, if any.
    pub replacement: Option<String>,
    /// The exception's ticket and expiry, for `exception`.
    pub exception: Option<(String, String)>,
    /// Last start (Unix seconds) and how many starts since the daemon started.
    pub last_unix: i64,
    pub count: u64,
}

/// All of pullgate's metrics.
pub struct Metrics {
    calls: Vec<[AtomicU64; CODES]>,
    upstream_latency: Vec<Histogram>,
    decisions: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    installs: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// Clients refused at the protocol level, by reason: rare, so a mutex is fine.
    refusals: Mutex<BTreeMap<&'static str, u64>>,
    audit_errors: AtomicU64,
    /// 1 approved, 0 not approved, -1 not checked yet.
    sandbox_image_approved: AtomicI64,
    body_refusals: [AtomicU64; 3],
    body_bytes_reserved: AtomicI64,
    accept_errors: AtomicU64,
    connections_open: AtomicI64,
    connections_closed: [AtomicU64; 3],
    lockdown: LockdownMetrics,
    deprecated_starts: AtomicU64,
    /// Lookups container starts made in containerd: [sandbox, image].
    start_lookups: [AtomicU64; 2],
    /// Most recent first.
    lifecycle_starts: Mutex<VecDeque<LifecycleStart>>,
    /// The bundle sync's series (rendered once the sync runs).
    pub sync: Arc<SyncMetrics>,
}

/// The bundle sync's series (see [`crate::node::sync`]). Shared by many simulated nodes in the fleet
/// benchmark, so it holds counters only, no per-node state beyond the gauges.
#[derive(Debug, Default)]
pub struct SyncMetrics {
    /// Set when a sync runs: the series are rendered from then on.
    enabled: AtomicBool,
    /// Rounds by result: `unchanged`, `installed`, `pending`, `rejected`, `failed`.
    rounds: Mutex<BTreeMap<&'static str, u64>>,
    /// Failed and rejected rounds by reason.
    failures: Mutex<BTreeMap<&'static str, u64>>,
    /// Requests made and bytes received by the sync's registry client.
    pub requests: Arc<FetchCounters>,
    /// Unix time of the last successful round (0: none yet), of the start, and the staleness limit.
    last_success_unix: AtomicI64,
    started_unix: AtomicI64,
    max_staleness_secs: AtomicI64,
    /// The version waiting for this node's rollout wave (0: none).
    pending_version: AtomicU64,
}

impl SyncMetrics {
    /// The sync started at `now_unix`; it is stale once no round succeeded for `max_staleness`.
    pub fn start(&self, now_unix: i64, max_staleness: Duration) {
        self.started_unix.store(now_unix, Ordering::Relaxed);
        self.max_staleness_secs
            .store(max_staleness.as_secs() as i64, Ordering::Relaxed);
        self.enabled.store(true, Ordering::Relaxed);
    }

    /// One round's result, and its failure reason if it failed.
    pub fn round(&self, result: &'static str, failure: Option<&'static str>) {
        *lock(&self.rounds).entry(result).or_default() += 1;
        if let Some(reason) = failure {
            *lock(&self.failures).entry(reason).or_default() += 1;
        }
    }

    pub fn set_last_success(&self, unix: i64) {
        self.last_success_unix.store(unix, Ordering::Relaxed);
    }

    pub fn set_pending_version(&self, version: Option<u64>) {
        self.pending_version
            .store(version.unwrap_or(0), Ordering::Relaxed);
    }

    /// Rounds so far by result.
    pub fn rounds(&self) -> BTreeMap<&'static str, u64> {
        lock(&self.rounds).clone()
    }

    /// Failed and rejected rounds so far by reason.
    pub fn failures(&self) -> BTreeMap<&'static str, u64> {
        lock(&self.failures).clone()
    }

    /// Whether no round has succeeded for the staleness limit at `now_unix`.
    pub fn stale(&self, now_unix: i64) -> bool {
        let since = self
            .last_success_unix
            .load(Ordering::Relaxed)
            .max(self.started_unix.load(Ordering::Relaxed));
        self.enabled.load(Ordering::Relaxed)
            && now_unix - since > self.max_staleness_secs.load(Ordering::Relaxed)
    }

    fn render(&self, o: &mut String, now_unix: i64) {
        if !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        let head = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        head(
            o,
            "pullgate_bundle_sync_rounds_total",
            "counter",
            "Bundle sync rounds, by result: unchanged, installed, pending (waiting for this node's rollout wave), rejected, failed.",
        );
        for (result, n) in lock(&self.rounds).iter() {
            let _ = writeln!(
                o,
                "pullgate_bundle_sync_rounds_total{{result=\"{result}\"}} {n}"
            );
        }
        head(
            o,
            "pullgate_bundle_sync_failures_total",
            "counter",
            "Bundle sync rounds that failed or found a bundle to reject, by reason.",
        );
        for (reason, n) in lock(&self.failures).iter() {
            let _ = writeln!(
                o,
                "pullgate_bundle_sync_failures_total{{reason=\"{reason}\"}} {n}"
            );
        }
        head(
            o,
            "pullgate_bundle_sync_requests_total",
            "counter",
            "HTTP requests the bundle sync made to the registry, by method.",
        );
        let r = &self.requests;
        let _ = writeln!(
            o,
            "pullgate_bundle_sync_requests_total{{method=\"HEAD\"}} {}\npullgate_bundle_sync_requests_total{{method=\"GET\"}} {}",
            r.heads.load(Ordering::Relaxed),
            r.gets.load(Ordering::Relaxed)
        );
        head(
            o,
            "pullgate_bundle_sync_received_bytes_total",
            "counter",
            "Bytes the bundle sync received from the registry.",
        );
        let _ = writeln!(
            o,
            "pullgate_bundle_sync_received_bytes_total {}",
            r.bytes.load(Ordering::Relaxed)
        );
        let last = self.last_success_unix.load(Ordering::Relaxed);
        if last > 0 {
            head(
                o,
                "pullgate_bundle_sync_last_success_timestamp_seconds",
                "gauge",
                "Unix time of the last successful bundle sync round.",
            );
            let _ = writeln!(
                o,
                "pullgate_bundle_sync_last_success_timestamp_seconds {last}"
            );
        }
        head(
            o,
            "pullgate_bundle_sync_stale",
            "gauge",
            "1 when no bundle sync round has succeeded for sync.max_staleness: the node's bundle is frozen.",
        );
        let _ = writeln!(
            o,
            "pullgate_bundle_sync_stale {}",
            i64::from(self.stale(now_unix))
        );
        head(
            o,
            "pullgate_bundle_sync_pending_version",
            "gauge",
            "Version of a verified bundle waiting for this node's rollout wave (0: none).",
        );
        let _ = writeln!(
            o,
            "pullgate_bundle_sync_pending_version {}",
            self.pending_version.load(Ordering::Relaxed)
        );
    }
}

/// The lockdown watcher's and the node check's series (see [`crate::node::lockdown`]).
struct LockdownMetrics {
    /// Images in containerd by class (approved, out_of_band, unapproved); `None` until classified.
    images: Mutex<Option<[u64; 3]>>,
    /// Detections by kind: images, snapshots.
    out_of_band: [AtomicU64; 2],
    event_gaps: AtomicU64,
    /// 1 subscribed to containerd's events, 0 not, -1 the watcher is not running.
    watcher_up: AtomicI64,
    removals: Mutex<BTreeMap<&'static str, u64>>,
    /// Per check: findings, and whether it could not be checked.
    findings: Mutex<BTreeMap<&'static str, (u64, bool)>>,
}

/// The classes of `pullgate_node_images`, in the order [`Metrics::set_node_images`] takes them.
pub const IMAGE_CLASSES: [&str; 3] = ["approved", "out_of_band", "unapproved"];
/// The kinds of `pullgate_out_of_band_total`.
pub const OUT_OF_BAND_KINDS: [&str; 2] = ["image", "snapshot"];

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            calls: (0..=OTHER).map(|_| Default::default()).collect(),
            upstream_latency: (0..=OTHER).map(|_| Histogram::new()).collect(),
            decisions: Mutex::default(),
            installs: Mutex::default(),
            refusals: Mutex::default(),
            audit_errors: AtomicU64::new(0),
            sandbox_image_approved: AtomicI64::new(-1),
            body_refusals: Default::default(),
            body_bytes_reserved: AtomicI64::new(0),
            accept_errors: AtomicU64::new(0),
            connections_open: AtomicI64::new(0),
            connections_closed: Default::default(),
            lockdown: LockdownMetrics {
                images: Mutex::new(None),
                out_of_band: Default::default(),
                event_gaps: AtomicU64::new(0),
                watcher_up: AtomicI64::new(-1),
                removals: Mutex::default(),
                findings: Mutex::default(),
            },
            deprecated_starts: AtomicU64::new(0),
            start_lookups: Default::default(),
            lifecycle_starts: Mutex::default(),
            sync: Arc::default(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Metrics {
    /// A finished call: its method index and the gRPC status it ended with (`None`: no status).
    pub fn call(&self, method: usize, code: Option<u32>) {
        let slot = match code {
            Some(c) if (c as usize) < NO_STATUS => c as usize,
            _ => NO_STATUS,
        };
        self.calls[method.min(OTHER)][slot].fetch_add(1, Ordering::Relaxed);
    }

    pub fn upstream_latency(&self, method: usize, d: Duration) {
        self.upstream_latency[method.min(OTHER)].observe(d);
    }

    pub fn decision(&self, result: &'static str, reason: &'static str) {
        *lock(&self.decisions).entry((result, reason)).or_default() += 1;
    }

    /// Remembers a container start from a deprecated, soon-to-sunset or excepted image (the
    /// decision itself is counted by [`Metrics::decision`]).
    pub fn lifecycle_start(&self, method: &str, d: &Decision) {
        if method != "CreateContainer" || !d.is_allowed() {
            return;
        }
        if d.reason == ReasonCode::Deprecated {
            self.deprecated_starts.fetch_add(1, Ordering::Relaxed);
        }
        let sunset = d
            .lifecycle
            .as_ref()
            .and_then(|l| l.lifecycle.sunset_at)
            .map(crate::policy::bundle::rfc3339);
        let remember =
            matches!(d.reason, ReasonCode::Deprecated | ReasonCode::Exception) || sunset.is_some();
        if !remember {
            return;
        }
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let mut recent = lock(&self.lifecycle_starts);
        let count = match recent
            .iter()
            .position(|s| s.image == d.image && s.reason == d.reason.as_str())
        {
            Some(i) => recent.remove(i).map_or(0, |s| s.count),
            None => 0,
        };
        recent.push_front(LifecycleStart {
            image: d.image.clone(),
            reason: d.reason.as_str(),
            scope: d.pod_scope.as_deref().map(str::to_owned),
            sunset_at: sunset,
            replacement: d
                .lifecycle
                .as_ref()
                .and_then(|l| l.lifecycle.replacement.as_deref().map(str::to_owned)),
            exception: d.exception.as_ref().map(|x| {
                (
                    x.exception.ticket.clone(),
                    crate::policy::bundle::rfc3339(x.exception.expires_at),
                )
            }),
            last_unix: now,
            count: count + 1,
        });
        recent.truncate(RECENT_STARTS);
    }

    /// Recent starts of deprecated, soon-to-sunset and excepted images, most recent first.
    pub fn lifecycle_starts(&self) -> Vec<LifecycleStart> {
        lock(&self.lifecycle_starts).iter().cloned().collect()
    }

    /// A container start looked up its pod's sandbox (`image == false`) or an image in containerd.
    pub fn start_lookup(&self, image: bool) {
        self.start_lookups[usize::from(image)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn bundle_install(&self, result: &'static str, reason: &'static str) {
        *lock(&self.installs).entry((result, reason)).or_default() += 1;
    }

    /// A request or connection refused at the protocol level (see `proxy::refusal` for the reasons).
    pub fn protocol_refusal(&self, reason: &'static str) {
        *lock(&self.refusals).entry(reason).or_default() += 1;
    }

    pub fn audit_error(&self) {
        self.audit_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn body_refused(&self, why: BodyRefusal) {
        self.body_refusals[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Bytes reserved for request bodies changed by `delta`.
    pub fn body_bytes_reserved(&self, delta: i64) {
        self.body_bytes_reserved.fetch_add(delta, Ordering::Relaxed);
    }

    pub fn accept_error(&self) {
        self.accept_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Client connections being served changed by `delta`.
    pub fn connections_open(&self, delta: i64) {
        self.connections_open.fetch_add(delta, Ordering::Relaxed);
    }

    pub fn connection_closed(&self, why: ConnClose) {
        self.connections_closed[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_sandbox_image_approved(&self, ok: bool) {
        self.sandbox_image_approved
            .store(i64::from(ok), Ordering::Relaxed);
    }

    /// Images in containerd now, by class (see [`IMAGE_CLASSES`]).
    pub fn set_node_images(&self, by_class: [u64; 3]) {
        *lock(&self.lockdown.images) = Some(by_class);
    }

    /// An image (`kind` 0) or snapshot (1) that entered containerd past pullgate.
    pub fn out_of_band(&self, kind: usize) {
        self.lockdown.out_of_band[kind.min(1)].fetch_add(1, Ordering::Relaxed);
    }

    /// containerd's event stream was lost and picked up again.
    pub fn event_gap(&self) {
        self.lockdown.event_gaps.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_watcher_up(&self, up: bool) {
        self.lockdown
            .watcher_up
            .store(i64::from(up), Ordering::Relaxed);
    }

    /// The outcome of removing an out-of-band image: `removed`, `in_use`, `failed`.
    pub fn out_of_band_removal(&self, result: &'static str) {
        *lock(&self.lockdown.removals).entry(result).or_default() += 1;
    }

    /// The node check's results: per check, its findings and whether it could not be checked.
    pub fn set_lockdown_findings(
        &self,
        checks: impl IntoIterator<Item = (&'static str, u64, bool)>,
    ) {
        let mut f = lock(&self.lockdown.findings);
        f.clear();
        for (check, n, unchecked) in checks {
            f.insert(check, (n, unchecked));
        }
    }

    /// Decision counts by result (`allow`/`deny`/`warn`), for `pullgate status`.
    pub fn decision_totals(&self) -> BTreeMap<&'static str, u64> {
        let mut out = BTreeMap::new();
        for ((result, _), n) in lock(&self.decisions).iter() {
            *out.entry(*result).or_default() += n;
        }
        out
    }

    /// Renders every metric in the Prometheus text exposition format. The gauges of the bundle in
    /// force and of the upstream connection are read from their owners at the time of the scrape.
    pub fn render(&self, now_unix: i64, bundle: Option<BundleGauge>, upstream_up: bool) -> String {
        let mut o = String::with_capacity(8192);
        o.push_str("# HELP pullgate_calls_total CRI calls handled, by method and final gRPC status code.\n");
        o.push_str("# TYPE pullgate_calls_total counter\n");
        for (m, codes) in self.calls.iter().enumerate() {
            for (c, n) in codes.iter().enumerate() {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    let code = if c == NO_STATUS {
                        "none".to_string()
                    } else {
                        c.to_string()
                    };
                    let _ = writeln!(
                        o,
                        "pullgate_calls_total{{method=\"{}\",code=\"{code}\"}} {n}",
                        method_label(m)
                    );
                }
            }
        }
        o.push_str("# HELP pullgate_upstream_latency_seconds Time from forwarding a call to containerd's response headers.\n");
        o.push_str("# TYPE pullgate_upstream_latency_seconds histogram\n");
        for (m, h) in self.upstream_latency.iter().enumerate() {
            let count = h.count.load(Ordering::Relaxed);
            if count == 0 {
                continue;
            }
            let label = method_label(m);
            let mut cumulative = 0;
            for (i, b) in BUCKETS.iter().enumerate() {
                cumulative += h.buckets[i].load(Ordering::Relaxed);
                let _ = writeln!(
                    o,
                    "pullgate_upstream_latency_seconds_bucket{{method=\"{label}\",le=\"{b}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                o,
                "pullgate_upstream_latency_seconds_bucket{{method=\"{label}\",le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(
                o,
                "pullgate_upstream_latency_seconds_sum{{method=\"{label}\"}} {}",
                h.sum_us.load(Ordering::Relaxed) as f64 / 1e6
            );
            let _ = writeln!(
                o,
                "pullgate_upstream_latency_seconds_count{{method=\"{label}\"}} {count}"
            );
        }
        o.push_str(
            "# HELP pullgate_decisions_total Policy decisions, by result and reason code.\n",
        );
        o.push_str("# TYPE pullgate_decisions_total counter\n");
        for ((result, reason), n) in lock(&self.decisions).iter() {
            let _ = writeln!(
                o,
                "pullgate_decisions_total{{result=\"{result}\",reason=\"{reason}\"}} {n}"
            );
        }
        o.push_str(
            "# HELP pullgate_deprecated_starts_total Containers started from a deprecated image.\n",
        );
        o.push_str("# TYPE pullgate_deprecated_starts_total counter\n");
        let _ = writeln!(
            o,
            "pullgate_deprecated_starts_total {}",
            self.deprecated_starts.load(Ordering::Relaxed)
        );
        o.push_str("# HELP pullgate_start_lookups_total Lookups container starts made in containerd (sandbox: PodSandboxStatus, for a pod not known yet; image: ImageStatus and the Content.Read of its manifests, per image of a start that no cached decision or content proof allowed).\n");
        o.push_str("# TYPE pullgate_start_lookups_total counter\n");
        for (kind, n) in ["sandbox", "image"].iter().zip(&self.start_lookups) {
            let _ = writeln!(
                o,
                "pullgate_start_lookups_total{{kind=\"{kind}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        o.push_str("# HELP pullgate_bundle_installs_total Bundle install attempts, by result and reason.\n");
        o.push_str("# TYPE pullgate_bundle_installs_total counter\n");
        for ((result, reason), n) in lock(&self.installs).iter() {
            let _ = writeln!(
                o,
                "pullgate_bundle_installs_total{{result=\"{result}\",reason=\"{reason}\"}} {n}"
            );
        }
        o.push_str("# HELP pullgate_protocol_refusals_total Requests and connections refused at the protocol level (before any CRI handling), by reason.\n");
        o.push_str("# TYPE pullgate_protocol_refusals_total counter\n");
        for (reason, n) in lock(&self.refusals).iter() {
            let _ = writeln!(
                o,
                "pullgate_protocol_refusals_total{{reason=\"{reason}\"}} {n}"
            );
        }
        o.push_str("# HELP pullgate_bundle_version Version of the bundle in force (0: none).\n");
        o.push_str("# TYPE pullgate_bundle_version gauge\n");
        let _ = writeln!(
            o,
            "pullgate_bundle_version {}",
            bundle.map_or(0, |b| b.version)
        );
        if let Some(b) = bundle {
            o.push_str("# HELP pullgate_bundle_age_seconds Seconds since the bundle in force was issued.\n");
            o.push_str("# TYPE pullgate_bundle_age_seconds gauge\n");
            let _ = writeln!(
                o,
                "pullgate_bundle_age_seconds {}",
                now_unix - b.issued_unix
            );
            o.push_str("# HELP pullgate_bundle_expiry_seconds Seconds until the bundle in force expires (negative: expired).\n");
            o.push_str("# TYPE pullgate_bundle_expiry_seconds gauge\n");
            let _ = writeln!(
                o,
                "pullgate_bundle_expiry_seconds {}",
                b.expires_unix - now_unix
            );
            if let Some(t) = b.next_exception_expiry_unix {
                o.push_str("# HELP pullgate_exception_expiry_seconds Seconds until the soonest active exception of the bundle in force expires (absent: none active).\n");
                o.push_str("# TYPE pullgate_exception_expiry_seconds gauge\n");
                let _ = writeln!(o, "pullgate_exception_expiry_seconds {}", t - now_unix);
            }
        }
        o.push_str("# HELP pullgate_audit_errors_total Audit records that could not be written.\n");
        o.push_str("# TYPE pullgate_audit_errors_total counter\n");
        let _ = writeln!(
            o,
            "pullgate_audit_errors_total {}",
            self.audit_errors.load(Ordering::Relaxed)
        );
        o.push_str("# HELP pullgate_sandbox_image_approved Whether containerd's sandbox (pause) image is approved (-1: not checked yet).\n");
        o.push_str("# TYPE pullgate_sandbox_image_approved gauge\n");
        let _ = writeln!(
            o,
            "pullgate_sandbox_image_approved {}",
            self.sandbox_image_approved.load(Ordering::Relaxed)
        );
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as i64;
        let refusals =
            BodyRefusal::ALL.map(|w| (w.as_str(), load(&self.body_refusals[w as usize])));
        write_metric(
            &mut o,
            "pullgate_request_body_refusals_total",
            "counter",
            "Intercepted calls refused while their request body was read, by the limit that refused them.",
            &refusals,
        );
        write_metric(
            &mut o,
            "pullgate_request_body_bytes_reserved",
            "gauge",
            "Bytes of intercepted request bodies being buffered (reserved in server.limits.body_budget).",
            &[("", self.body_bytes_reserved.load(Ordering::Relaxed))],
        );
        write_metric(
            &mut o,
            "pullgate_accept_errors_total",
            "counter",
            "Failed accept(2) calls on the CRI socket (such as EMFILE: out of file descriptors).",
            &[("", load(&self.accept_errors))],
        );
        write_metric(
            &mut o,
            "pullgate_connections",
            "gauge",
            "Client connections open on the CRI socket.",
            &[("", self.connections_open.load(Ordering::Relaxed))],
        );
        let closed =
            ConnClose::ALL.map(|w| (w.as_str(), load(&self.connections_closed[w as usize])));
        write_metric(
            &mut o,
            "pullgate_connections_closed_total",
            "counter",
            "Client connections pullgate closed or refused itself, by reason.",
            &closed,
        );
        o.push_str("# HELP pullgate_upstream_up Whether the connection to containerd is open.\n");
        o.push_str("# TYPE pullgate_upstream_up gauge\n");
        let _ = writeln!(o, "pullgate_upstream_up {}", i64::from(upstream_up));
        self.render_lockdown(&mut o);
        self.sync.render(&mut o, now_unix);
        o
    }

    fn render_lockdown(&self, o: &mut String) {
        let l = &self.lockdown;
        let head = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        if let Some(images) = *lock(&l.images) {
            head(
                o,
                "pullgate_node_images",
                "gauge",
                "Images in containerd (distinct namespace and digest), by class: approved, out_of_band (not pulled through pullgate), unapproved (digest not approved).",
            );
            for (class, n) in IMAGE_CLASSES.iter().zip(images) {
                let _ = writeln!(o, "pullgate_node_images{{class=\"{class}\"}} {n}");
            }
        }
        head(
            o,
            "pullgate_out_of_band_total",
            "counter",
            "Images and snapshots that entered containerd past pullgate, by kind.",
        );
        for (kind, n) in OUT_OF_BAND_KINDS.iter().zip(&l.out_of_band) {
            let n = n.load(Ordering::Relaxed);
            let _ = writeln!(o, "pullgate_out_of_band_total{{kind=\"{kind}\"}} {n}");
        }
        let up = l.watcher_up.load(Ordering::Relaxed);
        if up >= 0 {
            head(
                o,
                "pullgate_lockdown_watcher_up",
                "gauge",
                "Whether pullgate is subscribed to containerd's events.",
            );
            let _ = writeln!(o, "pullgate_lockdown_watcher_up {up}");
            head(
                o,
                "pullgate_lockdown_event_gaps_total",
                "counter",
                "Times containerd's event stream was lost (what arrived in the gap was found by re-reading every image).",
            );
            let gaps = l.event_gaps.load(Ordering::Relaxed);
            let _ = writeln!(o, "pullgate_lockdown_event_gaps_total {gaps}");
        }
        head(
            o,
            "pullgate_out_of_band_removals_total",
            "counter",
            "Out-of-band images pullgate tried to remove (lockdown.remove_out_of_band), by result.",
        );
        for (result, n) in lock(&l.removals).iter() {
            let _ = writeln!(
                o,
                "pullgate_out_of_band_removals_total{{result=\"{result}\"}} {n}"
            );
        }
        let findings = lock(&l.findings);
        if !findings.is_empty() {
            head(
                o,
                "pullgate_lockdown_findings",
                "gauge",
                "Problems the node check found in the node's lockdown, by check.",
            );
            for (check, (n, _)) in findings.iter() {
                let _ = writeln!(o, "pullgate_lockdown_findings{{check=\"{check}\"}} {n}");
            }
            head(
                o,
                "pullgate_lockdown_unchecked",
                "gauge",
                "Whether a check of the node's lockdown could not be made, by check.",
            );
            for (check, (_, unchecked)) in findings.iter() {
                let _ = writeln!(
                    o,
                    "pullgate_lockdown_unchecked{{check=\"{check}\"}} {}",
                    i64::from(*unchecked)
                );
            }
        }
    }
}

/// One metric in the text format: HELP, TYPE, and a sample per `(reason, value)`; an empty reason
/// writes the sample without labels.
fn write_metric(o: &mut String, name: &str, kind: &str, help: &str, samples: &[(&str, i64)]) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (reason, v) in samples {
        match reason {
            &"" => {
                let _ = writeln!(o, "{name} {v}");
            }
            r => {
                let _ = writeln!(o, "{name}{{reason=\"{r}\"}} {v}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_are_bounded() {
        assert_eq!(
            method_label(method_index("/runtime.v1.ImageService/PullImage")),
            "PullImage"
        );
        assert_eq!(
            method_label(method_index("/runtime.v1.RuntimeService/Version")),
            "Version"
        );
        assert_eq!(
            method_label(method_index("/runtime.v1.RuntimeService/NoSuch")),
            "other"
        );
        assert_eq!(method_label(method_index("/x.Y/PullImage")), "other");
    }

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.call(method_index("/runtime.v1.ImageService/PullImage"), Some(7));
        m.call(method_index("/runtime.v1.ImageService/PullImage"), Some(7));
        m.call(method_index("/runtime.v1.RuntimeService/Version"), None);
        m.upstream_latency(0, Duration::from_micros(300));
        m.decision("deny", "not_in_bundle");
        m.bundle_install("rejected", "rollback");
        m.protocol_refusal("http1");
        m.protocol_refusal("http1");
        m.body_refused(BodyRefusal::Budget);
        m.body_bytes_reserved(5000);
        m.body_bytes_reserved(-904);
        m.start_lookup(true);
        m.accept_error();
        m.connections_open(3);
        m.connections_open(-1);
        m.connection_closed(ConnClose::Evicted);
        let bundle = Some(BundleGauge {
            version: 7,
            issued_unix: 1000,
            expires_unix: 5000,
            next_exception_expiry_unix: Some(2600),
        });
        let text = m.render(2000, bundle, false);
        for want in [
            "pullgate_calls_total{method=\"PullImage\",code=\"7\"} 2",
            "pullgate_calls_total{method=\"Version\",code=\"none\"} 1",
            "pullgate_upstream_latency_seconds_bucket{method=\"Version\",le=\"0.0005\"} 1",
            "pullgate_upstream_latency_seconds_bucket{method=\"Version\",le=\"0.00025\"} 0",
            "pullgate_upstream_latency_seconds_count{method=\"Version\"} 1",
            "pullgate_decisions_total{result=\"deny\",reason=\"not_in_bundle\"} 1",
            "pullgate_bundle_installs_total{result=\"rejected\",reason=\"rollback\"} 1",
            "pullgate_protocol_refusals_total{reason=\"http1\"} 2",
            "pullgate_bundle_version 7",
            "pullgate_bundle_age_seconds 1000",
            "pullgate_bundle_expiry_seconds 3000",
            "pullgate_sandbox_image_approved -1",
            "pullgate_request_body_refusals_total{reason=\"budget\"} 1",
            "pullgate_request_body_refusals_total{reason=\"read_timeout\"} 0",
            "pullgate_request_body_bytes_reserved 4096",
            "pullgate_accept_errors_total 1",
            "pullgate_connections 2",
            "pullgate_connections_closed_total{reason=\"evicted\"} 1",
            "pullgate_connections_closed_total{reason=\"idle_timeout\"} 0",
            "pullgate_exception_expiry_seconds 600",
            "pullgate_deprecated_starts_total 0",
            "pullgate_start_lookups_total{kind=\"sandbox\"} 0",
            "pullgate_start_lookups_total{kind=\"image\"} 1",
        ] {
            assert!(text.contains(want), "missing {want}\n{text}");
        }
        assert_eq!(m.decision_totals()["deny"], 1);
    }
}
