//! Operator-facing counters in Prometheus text format, and the small HTTP endpoint that serves them
//! with `/healthz` and `/readyz`, apart from the CRI data path.
//!
//! The hot path only touches atomics in fixed arrays (calls by method and gRPC status, upstream
//! latency histograms); decision and bundle-install counters, which change at pull rate, sit behind
//! a mutex.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

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
}

/// All of pullgate's metrics.
pub struct Metrics {
    calls: Vec<[AtomicU64; CODES]>,
    upstream_latency: Vec<Histogram>,
    decisions: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    installs: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    audit_errors: AtomicU64,
    /// 1 approved, 0 not approved, -1 not checked yet.
    sandbox_image_approved: AtomicI64,
    body_refusals: [AtomicU64; 3],
    body_bytes_reserved: AtomicI64,
    accept_errors: AtomicU64,
    connections_open: AtomicI64,
    connections_closed: [AtomicU64; 3],
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            calls: (0..=OTHER).map(|_| Default::default()).collect(),
            upstream_latency: (0..=OTHER).map(|_| Histogram::new()).collect(),
            decisions: Mutex::default(),
            installs: Mutex::default(),
            audit_errors: AtomicU64::new(0),
            sandbox_image_approved: AtomicI64::new(-1),
            body_refusals: Default::default(),
            body_bytes_reserved: AtomicI64::new(0),
            accept_errors: AtomicU64::new(0),
            connections_open: AtomicI64::new(0),
            connections_closed: Default::default(),
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

    pub fn bundle_install(&self, result: &'static str, reason: &'static str) {
        *lock(&self.installs).entry((result, reason)).or_default() += 1;
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
        o.push_str("# HELP pullgate_bundle_installs_total Bundle install attempts, by result and reason.\n");
        o.push_str("# TYPE pullgate_bundle_installs_total counter\n");
        for ((result, reason), n) in lock(&self.installs).iter() {
            let _ = writeln!(
                o,
                "pullgate_bundle_installs_total{{result=\"{result}\",reason=\"{reason}\"}} {n}"
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
        o
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
        m.body_refused(BodyRefusal::Budget);
        m.body_bytes_reserved(5000);
        m.body_bytes_reserved(-904);
        m.accept_error();
        m.connections_open(3);
        m.connections_open(-1);
        m.connection_closed(ConnClose::Evicted);
        let bundle = Some(BundleGauge {
            version: 7,
            issued_unix: 1000,
            expires_unix: 5000,
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
        ] {
            assert!(text.contains(want), "missing {want}\n{text}");
        }
        assert_eq!(m.decision_totals()["deny"], 1);
    }
}
