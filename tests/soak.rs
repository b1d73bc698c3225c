//! Soak: kubelet-like load through pullgate against a real containerd for a while, with a containerd
//! restart and three bundle swaps in the middle, counting every call and watching pullgate's resident
//! memory and open file descriptors.
//!
//! Workers, each on its own CRI connection to pullgate's socket, as kubelet's loops would be:
//! - **relist**, once a second: `ListPodSandbox`, `ListContainers`, `PodSandboxStatus` and
//!   `ContainerStatus` of everything listed, `ImageFsInfo`, `Version` (`Status` every 5th round,
//!   `ListImages` every 10th);
//! - two **pod churners**: `RunPodSandbox` → `PullImage` (every other pod as `IfNotPresent`:
//!   `ImageStatus` first) → `CreateContainer` with the image ID, as kubelet sends it →
//!   `StartContainer` → `ContainerStatus` until it exits → `StopPodSandbox` → `RemoveContainer` →
//!   `RemovePodSandbox`; host network, empty hostname. One runs busybox:1.36 in namespace `default`,
//!   one payments-tool:1.0 in `checkout`; each container checks that it runs the image it was pulled as
//!   (the marker file of that build);
//! - a **puller**: approved and unapproved references in turn, four a second.
//!
//! In the middle, in this order: bundle v2 (busybox:1.36 moves to a rebuilt digest), a **containerd
//! restart** (SIGTERM, started again [`CONTAINERD_DOWN`] later, as its systemd unit does after an
//! exit; the window lasts from the stop to the first successful call after the start), bundle v3
//! through the drop directory (adds nginx:1.25), bundle v4 (drops nginx again, adds busybox:1.35). After each swap the run waits until the puller has tried every reference and each
//! churner has run a pod under the new version alone, so every version's decisions are observed.
//!
//! Every call is recorded with its latency and outcome: ok; a correct denial (`PERMISSION_DENIED` where
//! the bundle denies); gone (`NotFound` for a pod or container listed moments before and removed since
//! by a churner); or failed. A decision is checked against every bundle version that may have made it:
//! from the one in force when the call was sent to the newest one being installed when its answer
//! arrived. The test fails on any failed call outside the restart window; inside it, on anything but
//! UNAVAILABLE (pullgate's answer while containerd is down) and containerd's own answer while its CRI
//! plugin starts (UNKNOWN "server is not initialized yet", forwarded unchanged, as kubelet gets it
//! without pullgate: a client of containerd's socket probes it side by side and the summary shows both);
//! and on growth of pullgate's resident memory or open descriptors beyond [`RSS_GROWTH_MAX_KIB`] and
//! [`FD_GROWTH_MAX`] between the end of the warm-up and the end of the run.
//!
//! `PULLGATE_SOAK_SECS` sets the length (default 30 s, so the default suite keeps the soak working);
//! the 10-minute soak of the README is
//! `PULLGATE_SOAK_SECS=600 cargo test --release --test soak -- --nocapture`.
//! Needs root and the Debian packages of `scripts/install-deps.sh`, like `tests/e2e.rs`.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_cri::v1::{
    ContainerState, PodSandboxStatusRequest, RemovePodSandboxRequest, StopPodSandboxRequest,
};
use serde_json::Value;
use support::cri::host_pod_config;
use support::node::{Approval, BundleSpec, Node, ORG, PAYMENTS_NS, SEARCH_NS, standard_bundle};
use support::{Cri, e2e_enabled, loud};
use tokio::sync::watch;
use tonic::{Code, Status};

/// Length of the run when `PULLGATE_SOAK_SECS` is not set: long enough for every event to happen and
/// be observed, short enough for the default suite.
const DEFAULT_SECS: u64 = 30;
/// The shortest run accepted: the events themselves take about ten seconds.
const MIN_SECS: u64 = 20;
/// The longest run accepted (a day): every loop of the soak stays bounded in time.
const MAX_SECS: u64 = 86_400;
/// How long containerd stays down in the restart: the containerd.service units of Debian and of
/// containerd itself start it again `RestartSec=5` after it exits.
const CONTAINERD_DOWN: Duration = Duration::from_secs(5);
/// A call that takes longer is recorded as failed (DEADLINE_EXCEEDED).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the run waits for one of its own milestones (a worker's progress, recovery) before it
/// gives up and fails.
const MILESTONE_TIMEOUT: Duration = Duration::from_secs(90);
/// Allowed growth of pullgate's VmRSS between the end of the warm-up and the end. pullgate starts at
/// about 15 MiB; under this load its transient buffers (HTTP/2 windows of 512 KiB per call and 2 MiB per
/// connection, the upstream connection's 4 MiB stream window, allocator arenas of its worker threads)
/// come and go with the calls in flight, which are the same few at both samples. 32 MiB is about twice
/// the whole process: a leak of 2 KiB per call over the ~30,000 calls of the 10-minute run exceeds it.
const RSS_GROWTH_MAX_KIB: u64 = 32 * 1024;
/// Allowed growth of pullgate's open descriptors. The same six client connections are open at both
/// samples; a descriptor lost per pod, per reconnect to containerd or per bundle change over the run
/// would be caught once there are more than 16 of them (the 10-minute run has hundreds of pods).
const FD_GROWTH_MAX: usize = 16;

// ---------------------------------------------------------------------------------------------------
// Records

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Group {
    Relist,
    Churn,
    Pull,
    Probe,
}

impl Group {
    fn name(self) -> &'static str {
        match self {
            Group::Relist => "relist",
            Group::Churn => "churn",
            Group::Pull => "pull",
            Group::Probe => "probe",
        }
    }
}

#[derive(Clone, Debug)]
enum Outcome {
    Ok,
    /// `PERMISSION_DENIED` where a bundle version that may have decided the call denies it.
    Denied,
    /// `NotFound` for a pod or container listed moments before (a churner removed it since).
    Gone,
    /// Anything else: the status code, or `None` when the call succeeded with a wrong answer.
    Failed {
        code: Option<Code>,
        message: String,
    },
}

#[derive(Clone, Debug)]
struct Rec {
    group: Group,
    method: &'static str,
    start: Instant,
    end: Instant,
    outcome: Outcome,
}

/// The calls one worker made.
struct Log {
    group: Group,
    recs: Vec<Rec>,
}

impl Log {
    fn new(group: Group) -> Log {
        Log {
            group,
            recs: Vec::new(),
        }
    }

    /// Makes one call (bounded by [`CALL_TIMEOUT`]) and records it: ok, or failed with its status.
    async fn call<T>(
        &mut self,
        method: &'static str,
        fut: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let start = Instant::now();
        let r = match tokio::time::timeout(CALL_TIMEOUT, fut).await {
            Ok(r) => r,
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no answer within {CALL_TIMEOUT:?}"
            ))),
        };
        let outcome = match &r {
            Ok(_) => Outcome::Ok,
            Err(s) => failed(Some(s.code()), s.message()),
        };
        self.recs.push(Rec {
            group: self.group,
            method,
            start,
            end: Instant::now(),
            outcome,
        });
        r
    }

    /// Replaces the outcome of the last call (a judgement of its answer).
    fn judge(&mut self, outcome: Outcome) {
        self.recs.last_mut().expect("a call was recorded").outcome = outcome;
    }
}

fn failed(code: Option<Code>, message: impl Into<String>) -> Outcome {
    Outcome::Failed {
        code,
        message: message.into(),
    }
}

// ---------------------------------------------------------------------------------------------------
// What each bundle version decides

/// The pulls of the soak and what each bundle version decides about them.
struct Plan {
    /// `versions[v - 1][(image, namespace)]`: the image ID (config digest) a pull resolves to under
    /// bundle v, or `None` when v denies it.
    versions: Vec<HashMap<(String, String), Option<String>>>,
    /// The first line of `/etc/pullgate-fixture` in each image, by image ID.
    markers: HashMap<String, String>,
    /// What the puller asks for, in turn: `(image, namespace)`.
    pulls: Vec<(String, String)>,
}

impl Plan {
    /// What bundle `version` decides for a pull of `image` in `ns`.
    fn expect(&self, version: usize, image: &str, ns: &str) -> Option<&str> {
        self.versions[version - 1]
            .get(&(image.to_string(), ns.to_string()))
            .unwrap_or_else(|| panic!("the plan has no expectation for {image} in {ns}"))
            .as_deref()
    }

    /// What the versions `lo..=hi` decide, for messages and judgements.
    fn allowed(&self, lo: usize, hi: usize, image: &str, ns: &str) -> Vec<Option<&str>> {
        (lo..=hi).map(|v| self.expect(v, image, ns)).collect()
    }

    /// Judges a `PullImage` answer against versions `lo..=hi`.
    fn judge_pull(
        &self,
        lo: usize,
        hi: usize,
        image: &str,
        ns: &str,
        r: &Result<String, Status>,
    ) -> Outcome {
        let allowed = self.allowed(lo, hi, image, ns);
        match r {
            Ok(id) if allowed.contains(&Some(id.as_str())) => Outcome::Ok,
            Ok(id) => failed(
                None,
                format!("{image} in {ns} pulled {id}; bundle v{lo}..=v{hi} decide {allowed:?}"),
            ),
            Err(s) if s.code() == Code::PermissionDenied && allowed.contains(&None) => {
                Outcome::Denied
            }
            Err(s) if s.code() == Code::PermissionDenied => failed(
                Some(s.code()),
                format!(
                    "{image} in {ns} denied although bundle v{lo}..=v{hi} approve it: {}",
                    s.message()
                ),
            ),
            Err(s) => failed(Some(s.code()), s.message()),
        }
    }

    /// Judges a `CreateContainer` of image ID `id` (pulled as `image` in `ns`) against `lo..=hi`.
    fn judge_create(
        &self,
        lo: usize,
        hi: usize,
        image: &str,
        ns: &str,
        id: &str,
        r: &Result<String, Status>,
    ) -> Outcome {
        let allowed = self.allowed(lo, hi, image, ns);
        match r {
            Ok(_) if allowed.contains(&Some(id)) => Outcome::Ok,
            Ok(_) => failed(
                None,
                format!("{image} ({id}) started in {ns}; bundle v{lo}..=v{hi} allow {allowed:?}"),
            ),
            Err(s)
                if s.code() == Code::PermissionDenied && allowed.iter().any(|a| *a != Some(id)) =>
            {
                Outcome::Denied
            }
            Err(s) => failed(Some(s.code()), s.message()),
        }
    }

    /// Judges the image ID `ImageStatus(image)` found (`None`: not on the node) against `lo..=hi`.
    fn judge_status(
        &self,
        lo: usize,
        hi: usize,
        image: &str,
        ns: &str,
        found: Option<&str>,
    ) -> Outcome {
        let allowed = self.allowed(lo, hi, image, ns);
        match found {
            None => Outcome::Ok,
            Some(id) if allowed.contains(&Some(id)) => Outcome::Ok,
            Some(id) => failed(
                None,
                format!(
                    "ImageStatus({image}) found {id}; bundle v{lo}..=v{hi} resolve it to {allowed:?}"
                ),
            ),
        }
    }
}

/// Bundle swaps in progress and done: the versions that may decide a call are
/// `in_force()` when it is sent ..= `newest()` when its answer arrives.
#[derive(Default)]
struct Swaps {
    started: AtomicUsize,
    done: AtomicUsize,
}

impl Swaps {
    fn in_force(&self) -> usize {
        1 + self.done.load(Ordering::SeqCst)
    }
    fn newest(&self) -> usize {
        1 + self.started.load(Ordering::SeqCst)
    }
}

/// Milestones the run waits for: `(what, bundle version) -> count`, counted only for work that one
/// version alone decided.
#[derive(Default)]
struct Progress(Mutex<BTreeMap<(String, usize), usize>>);

impl Progress {
    fn add(&self, what: &str, version: usize) {
        *self
            .0
            .lock()
            .unwrap()
            .entry((what.to_string(), version))
            .or_default() += 1;
    }
    fn get(&self, what: &str, version: usize) -> usize {
        self.0
            .lock()
            .unwrap()
            .get(&(what.to_string(), version))
            .copied()
            .unwrap_or(0)
    }
}

struct Shared {
    plan: Plan,
    swaps: Swaps,
    progress: Progress,
}

/// Sleeps `d`; `true` if the run is stopping (then it returns at once).
async fn pause(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

// ---------------------------------------------------------------------------------------------------
// Workers

/// Kubelet's relist: once a second, everything listed and its status.
async fn relist(mut cri: Cri, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) -> Log {
    let mut log = Log::new(Group::Relist);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Pods and containers a status call found gone: they must not be listed again.
    let mut gone: HashSet<String> = HashSet::new();
    for round in 0usize.. {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            break;
        }
        let pods = log
            .call("ListPodSandbox", cri.list_pod_sandbox())
            .await
            .map(|r| r.items)
            .unwrap_or_default();
        not_relisted(&mut log, "pod", pods.iter().map(|p| p.id.as_str()), &gone);
        let containers = log
            .call("ListContainers", cri.list_containers())
            .await
            .map(|r| r.containers)
            .unwrap_or_default();
        not_relisted(
            &mut log,
            "container",
            containers.iter().map(|c| c.id.as_str()),
            &gone,
        );
        gone.clear();
        for pod in &pods {
            let req = PodSandboxStatusRequest {
                pod_sandbox_id: pod.id.clone(),
                verbose: false,
            };
            let r = log
                .call("PodSandboxStatus", cri.rt.pod_sandbox_status(req))
                .await;
            if r.is_err_and(|s| s.code() == Code::NotFound) {
                log.judge(Outcome::Gone);
                gone.insert(pod.id.clone());
            }
        }
        for c in &containers {
            let r = log
                .call("ContainerStatus", cri.container_status(&c.id))
                .await;
            if r.is_err_and(|s| s.code() == Code::NotFound) {
                log.judge(Outcome::Gone);
                gone.insert(c.id.clone());
            }
        }
        let _ = log.call("ImageFsInfo", cri.image_fs_info()).await;
        let _ = log.call("Version", cri.version()).await;
        if round % 5 == 0 {
            let _ = log.call("Status", cri.status()).await;
        }
        if round % 10 == 0 {
            let _ = log.call("ListImages", cri.list_images()).await;
        }
        shared.progress.add("relist", 0);
    }
    log
}

/// Judges the last call, a list, failed if it lists one of the objects a status call found gone.
fn not_relisted<'a>(
    log: &mut Log,
    what: &str,
    mut listed: impl Iterator<Item = &'a str>,
    gone: &HashSet<String>,
) {
    if let Some(id) = listed.find(|id| gone.contains(*id)) {
        log.judge(failed(
            None,
            format!("lists {what} {id} after its status was NotFound"),
        ));
    }
}

/// The puller: every reference of the plan in turn, four a second, each answer judged.
async fn puller(mut cri: Cri, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) -> Log {
    let mut log = Log::new(Group::Pull);
    let plan = &shared.plan;
    for i in 0usize.. {
        let (image, ns) = &plan.pulls[i % plan.pulls.len()];
        let lo = shared.swaps.in_force();
        let r = log.call("PullImage", cri.pull(image, ns)).await;
        let hi = shared.swaps.newest();
        let outcome = plan.judge_pull(lo, hi, image, ns, &r);
        if lo == hi && matches!(outcome, Outcome::Ok | Outcome::Denied) {
            shared.progress.add(&format!("pull {image} in {ns}"), lo);
        }
        log.judge(outcome);
        if pause(&mut stop, Duration::from_millis(250)).await {
            break;
        }
    }
    log
}

/// One pod churner: pods of `image` in `ns`, one after the other, until the run stops.
async fn churner(
    name: &'static str,
    image: &'static str,
    ns: &'static str,
    mut cri: Cri,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> Log {
    let mut log = Log::new(Group::Churn);
    for n in 0usize.. {
        let lo = shared.swaps.in_force();
        let completed = churn_once(&mut log, &mut cri, &shared, name, n, image, ns).await;
        let hi = shared.swaps.newest();
        if completed {
            shared.progress.add(name, 0);
            if lo == hi {
                shared.progress.add(name, lo);
            }
        }
        let rest = if completed { 50 } else { 300 };
        if pause(&mut stop, Duration::from_millis(rest)).await {
            break;
        }
    }
    log
}

/// One pod, from `RunPodSandbox` to `RemovePodSandbox`. `true` if the container ran to exit 0 and
/// everything was removed; a denial after a bundle swap, or a failure, ends the pod early.
async fn churn_once(
    log: &mut Log,
    cri: &mut Cri,
    shared: &Shared,
    name: &str,
    n: usize,
    image: &str,
    ns: &str,
) -> bool {
    let plan = &shared.plan;
    let cfg = host_pod_config(&format!("{name}-{n}"), ns);
    let Ok(pod) = log.call("RunPodSandbox", cri.run_pod(&cfg)).await else {
        return false;
    };
    let mut container = None;
    let ran = async {
        // Every other pod as `imagePullPolicy: IfNotPresent`: kubelet asks ImageStatus first.
        let mut id = None;
        if n % 2 == 1 {
            let lo = shared.swaps.in_force();
            let st = log
                .call("ImageStatus", cri.image_status(image))
                .await
                .ok()?;
            let hi = shared.swaps.newest();
            let found = st.image.map(|i| i.id);
            log.judge(plan.judge_status(lo, hi, image, ns, found.as_deref()));
            id = found;
        }
        let id = match id {
            Some(id) => id,
            None => {
                let lo = shared.swaps.in_force();
                let r = log.call("PullImage", cri.pull(image, ns)).await;
                let hi = shared.swaps.newest();
                log.judge(plan.judge_pull(lo, hi, image, ns, &r));
                r.ok()?
            }
        };
        let Some(marker) = plan.markers.get(&id) else {
            log.judge(failed(
                None,
                format!("{image} resolved to {id}, an image of no fixture"),
            ));
            return None;
        };
        let check = format!("grep -qxF '{marker}' /etc/pullgate-fixture");
        let lo = shared.swaps.in_force();
        let r = log
            .call(
                "CreateContainer",
                cri.create_container_as_kubelet(
                    &pod,
                    &cfg,
                    "main",
                    &id,
                    image,
                    &["/bin/sh", "-c", &check],
                ),
            )
            .await;
        let hi = shared.swaps.newest();
        log.judge(plan.judge_create(lo, hi, image, ns, &id, &r));
        let c = r.ok()?;
        container = Some(c.clone());
        log.call("StartContainer", cri.start_container(&c))
            .await
            .ok()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let st = log
                .call("ContainerStatus", cri.container_status(&c))
                .await
                .ok()?;
            let Some(st) = st.status else {
                log.judge(failed(
                    None,
                    format!("ContainerStatus of {c} has no status"),
                ));
                return None;
            };
            if st.state == ContainerState::ContainerExited as i32 {
                if st.exit_code != 0 {
                    log.judge(failed(
                        None,
                        format!(
                            "container of {image} ({id}) exited {}: not the image pulled",
                            st.exit_code
                        ),
                    ));
                    return None;
                }
                return Some(());
            }
            if Instant::now() > deadline {
                log.judge(failed(
                    None,
                    format!("container {c} still running after 60 s"),
                ));
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    .await
    .is_some();
    let removed = teardown(log, cri, &pod, container.as_deref()).await;
    ran && removed
}

/// `StopPodSandbox`, `RemoveContainer`, `RemovePodSandbox`, each retried (four times a second, up to
/// [`MILESTONE_TIMEOUT`]) while it fails — as kubelet's garbage collection keeps trying.
async fn teardown(log: &mut Log, cri: &mut Cri, pod: &str, container: Option<&str>) -> bool {
    let deadline = Instant::now() + MILESTONE_TIMEOUT;
    let mut step = 0;
    while step < 3 {
        let r = match step {
            0 => log
                .call(
                    "StopPodSandbox",
                    cri.rt.stop_pod_sandbox(StopPodSandboxRequest {
                        pod_sandbox_id: pod.to_string(),
                    }),
                )
                .await
                .map(drop),
            1 => match container {
                Some(c) => log.call("RemoveContainer", cri.remove_container(c)).await,
                None => Ok(()),
            },
            _ => log
                .call(
                    "RemovePodSandbox",
                    cri.rt.remove_pod_sandbox(RemovePodSandboxRequest {
                        pod_sandbox_id: pod.to_string(),
                    }),
                )
                .await
                .map(drop),
        };
        if r.is_ok() {
            step += 1;
        } else if Instant::now() > deadline {
            return false;
        } else {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    true
}

// ---------------------------------------------------------------------------------------------------
// pullgate's resources, the host

#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Duration,
    rss_kib: u64,
    hwm_kib: u64,
    fds: usize,
}

fn sample(pid: u32, t0: Instant) -> Sample {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status (has pullgate exited?): {e}"));
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("list /proc/{pid}/fd: {e}"))
        .count();
    Sample {
        at: t0.elapsed(),
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
        fds,
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn file_size(p: &Path) -> String {
    std::fs::metadata(p)
        .map(|m| mib(m.len() / 1024))
        .unwrap_or_else(|_| "-".into())
}

/// The image ID (config digest) of the manifest `digest`, read from the fixtures' OCI layout.
fn config_digest(node: &Node, digest: &str) -> String {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    let path = node.stack.images.layout.join("blobs/sha256").join(hex);
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display())),
    )
    .expect("manifest JSON");
    manifest["config"]["digest"]
        .as_str()
        .unwrap_or_else(|| panic!("manifest {digest} names no config"))
        .to_string()
}

fn soak_duration() -> Duration {
    let secs = match std::env::var("PULLGATE_SOAK_SECS") {
        Err(_) => DEFAULT_SECS,
        Ok(s) => {
            let n: u64 = s.trim().parse().unwrap_or_else(|_| {
                panic!(
                    "PULLGATE_SOAK_SECS={s:?} is not a whole number of seconds; \
                     set e.g. PULLGATE_SOAK_SECS=600 for the 10-minute soak, or unset it"
                )
            });
            assert!(
                (MIN_SECS..=MAX_SECS).contains(&n),
                "PULLGATE_SOAK_SECS={n} is out of range: the soak needs at least {MIN_SECS} s \
                 for its events and is bounded at {MAX_SECS} s"
            );
            n
        }
    };
    Duration::from_secs(secs)
}

/// Polls `done` every 100 ms until it holds; panics naming `what` after [`MILESTONE_TIMEOUT`].
async fn milestone(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + MILESTONE_TIMEOUT;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "soak: timed out after {MILESTONE_TIMEOUT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `p` quantile (nearest rank) of sorted latencies; `None` when there are none.
fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len().max(1)) - 1;
    sorted.get(i).copied()
}

/// One line of the summary table.
fn row(cols: [&str; 12]) -> String {
    format!(
        "{:<7} {:<17} {:>7} {:>7} {:>7} {:>5} {:>8} {:>8} {:>6} {:>8} {:>8} {:>8}\n",
        cols[0],
        cols[1],
        cols[2],
        cols[3],
        cols[4],
        cols[5],
        cols[6],
        cols[7],
        cols[8],
        cols[9],
        cols[10],
        cols[11]
    )
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.1}", d.as_secs_f64() * 1000.0))
}

/// What containerd 1.6's CRI plugin answers (gRPC UNKNOWN) between its socket opening and the end of
/// its initialisation, right after a start; pullgate forwards it as containerd sent it.
const CONTAINERD_STARTING: &str = "server is not initialized yet";

/// Whether `r` is containerd's answer while its CRI plugin starts (see [`CONTAINERD_STARTING`]).
fn not_initialized(r: &Rec) -> bool {
    matches!(&r.outcome, Outcome::Failed { code: Some(Code::Unknown), message } if message == CONTAINERD_STARTING)
}

/// Calls `Version` every 20 ms until it succeeds; returns when the successful call ended.
async fn first_success(cri: &mut Cri, log: &mut Log, since: Instant) -> Instant {
    loop {
        if log.call("Version", cri.version()).await.is_ok() {
            return Instant::now();
        }
        assert!(
            since.elapsed() < MILESTONE_TIMEOUT,
            "no successful call to {} {MILESTONE_TIMEOUT:?} after containerd's restart",
            cri.socket.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How a bundle reaches the daemon.
#[derive(Clone, Copy)]
enum Via {
    /// `pullgate bundle install --config …`.
    Install,
    /// Copied into the drop directory, which the daemon polls.
    DropDir,
}

/// Puts signed bundle `v` in force and waits until the daemon reports it; returns the timeline line.
fn swap(node: &Node, shared: &Shared, bundle: &Path, v: usize, via: Via, t0: Instant) -> String {
    shared.swaps.started.fetch_add(1, Ordering::SeqCst);
    let started = Instant::now();
    let how = match via {
        Via::Install => {
            let out = node.install(bundle);
            assert!(out.success(), "install v{v}: {out}");
            "bundle install"
        }
        Via::DropDir => {
            let name = bundle.file_name().expect("bundle file name");
            let sig = bundle.with_extension("json.sig");
            // The signature first: the daemon takes a bundle only with its signatures beside it.
            std::fs::copy(
                &sig,
                node.drop_dir.join(sig.file_name().expect("sig file name")),
            )
            .expect("copy the signature to the drop directory");
            std::fs::copy(bundle, node.drop_dir.join(name))
                .expect("copy the bundle to the drop directory");
            "drop directory"
        }
    };
    node.wait_for_bundle(v as u64);
    shared.swaps.done.fetch_add(1, Ordering::SeqCst);
    format!(
        "bundle v{v} ({how}) at {:.1} s, in force after {:.2} s",
        (started - t0).as_secs_f64(),
        started.elapsed().as_secs_f64()
    )
}

// ---------------------------------------------------------------------------------------------------
// The soak

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_kubelet_load_with_containerd_restart_and_bundle_swaps() {
    if !e2e_enabled("soak_kubelet_load_with_containerd_restart_and_bundle_swaps") {
        return;
    }
    let total = soak_duration();
    let mut node = Node::start("soak", "enforce");
    let fx = node.fx.clone();
    let stack = &node.stack;

    // Set-up of the swaps, before the clock starts: a rebuilt busybox:1.36, and nginx mirrored.
    let rebuilt = stack
        .images
        .push_image(&stack.public, "library/busybox:1.36", "rebuilt");
    let rebuilt_marker = "rebuilt library/busybox:1.36".to_string();
    support::images::copy_by_digest(
        &stack.public.host(),
        "library/busybox",
        &rebuilt,
        &node.private(),
        "approved/library/busybox",
    );
    support::images::copy_by_digest(
        &stack.public.host(),
        "library/nginx",
        &fx.nginx.digest,
        &node.private(),
        "approved/library/nginx",
    );
    let mut fx2 = fx.clone();
    fx2.busybox.digest = rebuilt.clone();
    let v2 = standard_bundle(stack, &fx2, 2);
    let mut v3 = standard_bundle(stack, &fx2, 3);
    v3.images.push(Approval::tag(
        "docker.io/library/nginx",
        "1.25",
        &fx.nginx.digest,
        ORG,
    ));
    let mut v4: BundleSpec = standard_bundle(stack, &fx2, 4);
    v4.images[0]
        .tags
        .push(("1.35".into(), fx.busybox_old.digest.clone()));
    let signed: Vec<_> = [(2, &v2), (3, &v3), (4, &v4)]
        .into_iter()
        .map(|(v, spec)| node.keys.sign(spec, &format!("soak-v{v}")))
        .collect();

    // What each version decides.
    let cfg = |d: &str| config_digest(&node, d);
    let (bb1, bb2, bb_old, ngx, pay) = (
        cfg(&fx.busybox.digest),
        cfg(&rebuilt),
        cfg(&fx.busybox_old.digest),
        cfg(&fx.nginx.digest),
        cfg(&fx.paytool.digest),
    );
    let d1 = format!("busybox@{}", fx.busybox.digest);
    // (image, namespace, [decision of v1, v2, v3, v4])
    let table: Vec<(String, &str, [Option<&String>; 4])> = vec![
        (
            "busybox:1.36".into(),
            "default",
            [Some(&bb1), Some(&bb2), Some(&bb2), Some(&bb2)],
        ),
        (
            "docker.io/library/busybox:1.36".into(),
            SEARCH_NS,
            [Some(&bb1), Some(&bb2), Some(&bb2), Some(&bb2)],
        ),
        (d1, "default", [Some(&bb1), None, None, None]),
        (
            "nginx:1.25".into(),
            "default",
            [None, None, Some(&ngx), None],
        ),
        (
            "busybox:1.35".into(),
            "default",
            [None, None, None, Some(&bb_old)],
        ),
        ("quay.io/acme/tools:2.0".into(), "default", [None; 4]),
        (
            "docker.io/acme/payments-tool:1.0".into(),
            "default",
            [None; 4],
        ),
        (
            "docker.io/acme/payments-tool:1.0".into(),
            PAYMENTS_NS,
            [Some(&pay); 4],
        ),
    ];
    let plan = Plan {
        versions: (0..4)
            .map(|v| {
                table
                    .iter()
                    .map(|(image, ns, d)| ((image.clone(), ns.to_string()), d[v].cloned()))
                    .collect()
            })
            .collect(),
        markers: HashMap::from([
            (bb1.clone(), fx.busybox.marker.clone()),
            (bb2.clone(), rebuilt_marker),
            (pay.clone(), fx.paytool.marker.clone()),
        ]),
        pulls: table
            .iter()
            .map(|(i, ns, _)| (i.clone(), ns.to_string()))
            .collect(),
    };
    let churners: [(&'static str, &'static str, &'static str); 2] = [
        ("churn-default", "busybox:1.36", "default"),
        (
            "churn-checkout",
            "docker.io/acme/payments-tool:1.0",
            PAYMENTS_NS,
        ),
    ];
    let shared = Arc::new(Shared {
        plan,
        swaps: Swaps::default(),
        progress: Progress::default(),
    });

    // The clock starts: every worker on its own connection.
    let sock = node.pullgate_socket();
    let pg_pid = node.stack.pullgate.as_ref().expect("pullgate").pid();
    let load_start = loadavg();
    let t0 = Instant::now();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut workers = Vec::new();
    workers.push(tokio::spawn(relist(
        Cri::connect(&sock).await,
        shared.clone(),
        stop_rx.clone(),
    )));
    workers.push(tokio::spawn(puller(
        Cri::connect(&sock).await,
        shared.clone(),
        stop_rx.clone(),
    )));
    for (name, image, ns) in churners {
        workers.push(tokio::spawn(churner(
            name,
            image,
            ns,
            Cri::connect(&sock).await,
            shared.clone(),
            stop_rx.clone(),
        )));
    }
    let mut probe = Cri::connect(&sock).await;
    let mut plog = Log::new(Group::Probe);
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let sampler = {
        let (samples, mut stop) = (samples.clone(), stop_rx.clone());
        tokio::spawn(async move {
            loop {
                samples.lock().unwrap().push(sample(pg_pid, t0));
                if pause(&mut stop, Duration::from_secs(5)).await {
                    break;
                }
            }
        })
    };
    let mut timeline: Vec<String> = Vec::new();
    let at = |frac: f64| t0 + total.mul_f64(frac);
    let secs = |i: Instant| format!("{:.1} s", (i - t0).as_secs_f64());

    // Warm-up: every worker has gone round once (the first pod pulls the pause image, the first
    // connections are made); then the first sample.
    let p = &shared.progress;
    milestone("the warm-up (a relist and a pod per churner)", || {
        p.get("relist", 0) >= 2 && churners.iter().all(|(n, _, _)| p.get(n, 0) >= 1)
    })
    .await;
    tokio::time::sleep_until(at(0.1).into()).await;
    let first = sample(pg_pid, t0);
    timeline.push(format!("warm-up done at {}", secs(Instant::now())));

    // Waits until one version alone decided a pull of every reference and a pod of every churner.
    let observed = |v: usize| {
        let shared = shared.clone();
        move || {
            let p = &shared.progress;
            shared
                .plan
                .pulls
                .iter()
                .all(|(i, ns)| p.get(&format!("pull {i} in {ns}"), v) >= 1)
                && churners.iter().all(|(n, _, _)| p.get(n, v) >= 1)
        }
    };
    milestone("bundle v1's decisions", observed(1)).await;

    tokio::time::sleep_until(at(0.25).into()).await;
    timeline.push(swap(&node, &shared, &signed[0], 2, Via::Install, t0));
    milestone("bundle v2's decisions", observed(2)).await;

    // The containerd restart.
    tokio::time::sleep_until(at(0.4).into()).await;
    let done_before: Vec<usize> = churners.iter().map(|(n, _, _)| p.get(n, 0)).collect();
    // A client of containerd's own socket too, to show what containerd itself answers meanwhile.
    let mut direct = Cri::connect(&node.stack.containerd.socket).await;
    let mut dlog = Log::new(Group::Probe);
    let down_at = Instant::now();
    node.stack.containerd.stop_daemon();
    let stopped = down_at.elapsed();
    tokio::time::sleep(CONTAINERD_DOWN).await;
    let start_at = Instant::now();
    node.stack.containerd.start_again();
    let booted = start_at.elapsed();
    let (up_at, direct_up_at) = tokio::join!(
        first_success(&mut probe, &mut plog, down_at),
        first_success(&mut direct, &mut dlog, down_at)
    );
    let window = (down_at, up_at);
    let starting = |log: &Log| log.recs.iter().filter(|r| not_initialized(r)).count();
    timeline.push(format!(
        "containerd restart at {}: stopped in {:.2} s, started again {CONTAINERD_DOWN:?} later, \
         booted in {:.2} s; the first successful call through pullgate {:.2} s after the stop (before it, {} answers \"{CONTAINERD_STARTING}\"); \
         directly to containerd {:.2} s after the stop (before it, {} such answers)",
        secs(down_at),
        stopped.as_secs_f64(),
        booted.as_secs_f64(),
        (up_at - down_at).as_secs_f64(),
        starting(&plog),
        (direct_up_at - down_at).as_secs_f64(),
        starting(&dlog),
    ));
    milestone("two pods per churner after the restart", || {
        churners
            .iter()
            .zip(&done_before)
            .all(|((n, _, _), before)| p.get(n, 0) >= before + 2)
    })
    .await;

    tokio::time::sleep_until(at(0.6).into()).await;
    timeline.push(swap(&node, &shared, &signed[1], 3, Via::DropDir, t0));
    milestone("bundle v3's decisions", observed(3)).await;
    tokio::time::sleep_until(at(0.8).into()).await;
    timeline.push(swap(&node, &shared, &signed[2], 4, Via::Install, t0));
    milestone("bundle v4's decisions", observed(4)).await;

    // The end: the last sample under the same load as the first, then stop.
    tokio::time::sleep_until(at(1.0).into()).await;
    let last = sample(pg_pid, t0);
    let load_end = loadavg();
    let ran = t0.elapsed();
    let _ = stop_tx.send(true);
    let mut recs = plog.recs;
    for w in workers {
        recs.extend(w.await.expect("worker task").recs);
    }
    sampler.await.expect("sampler task");
    let status = node.status_json();
    {
        let pg = node.stack.pullgate.as_mut().expect("pullgate");
        assert!(pg.exited().is_none(), "pullgate exited during the soak");
        assert_eq!(pg.pid(), pg_pid, "pullgate was restarted");
    }
    probe.remove_all_pods().await;

    // ---- Summary ------------------------------------------------------------------------------------
    let in_window = |r: &Rec| r.start < window.1 && r.end > window.0;
    let mut rows: BTreeMap<(Group, &str), Vec<&Rec>> = BTreeMap::new();
    for r in &recs {
        rows.entry((r.group, r.method)).or_default().push(r);
    }
    let mut out = String::new();
    out += &format!(
        "\n===== soak: {:.0} s of kubelet-like load through pullgate (pid {pg_pid}), {} build =====\n",
        ran.as_secs_f64(),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    out += &format!(
        "host load average (1/5/15 min): {load_start} at the start, {load_end} at the end\n"
    );
    for t in &timeline {
        out += &format!("  {t}\n");
    }
    out += "calls by method; unavail and starting: inside the restart window only; latency in ms \
            over the calls outside it\n";
    out += &row([
        "group", "method", "calls", "ok", "denied", "gone", "unavail", "starting", "failed", "p50",
        "p99", "max",
    ]);
    let mut failures: Vec<&Rec> = Vec::new();
    let mut window_other: Vec<&Rec> = Vec::new();
    let (mut n_calls, mut n_unavail, mut n_starting) = (0, 0, 0);
    let mut group_lat: BTreeMap<Group, Vec<Duration>> = BTreeMap::new();
    for ((group, method), rs) in &rows {
        // ok, denied, gone, unavailable, starting, failed
        let mut n = [0usize; 6];
        let mut lat: Vec<Duration> = Vec::new();
        for r in rs {
            let i = match &r.outcome {
                Outcome::Ok => 0,
                Outcome::Denied => 1,
                Outcome::Gone => 2,
                Outcome::Failed { code, .. } if in_window(r) => {
                    if *code == Some(Code::Unavailable) {
                        3
                    } else if not_initialized(r) {
                        4
                    } else {
                        window_other.push(r);
                        5
                    }
                }
                Outcome::Failed { .. } => {
                    failures.push(r);
                    5
                }
            };
            n[i] += 1;
            if !in_window(r) {
                lat.push(r.end - r.start);
            }
        }
        lat.sort();
        group_lat.entry(*group).or_default().extend(&lat);
        n_calls += rs.len();
        n_unavail += n[3];
        n_starting += n[4];
        let c = n.map(|x| x.to_string());
        out += &row([
            group.name(),
            method,
            &rs.len().to_string(),
            &c[0],
            &c[1],
            &c[2],
            &c[3],
            &c[4],
            &c[5],
            &ms(percentile(&lat, 0.50)),
            &ms(percentile(&lat, 0.99)),
            &ms(lat.last().copied()),
        ]);
    }
    for (group, lat) in &mut group_lat {
        lat.sort();
        out += &row([
            group.name(),
            "(all)",
            &lat.len().to_string(),
            "",
            "",
            "",
            "",
            "",
            "",
            &ms(percentile(lat, 0.50)),
            &ms(percentile(lat, 0.99)),
            &ms(lat.last().copied()),
        ]);
    }
    out += &format!(
        "calls: {n_calls} ({:.1}/s); failed outside the restart window: {}; inside it: {n_unavail} \
         UNAVAILABLE, {n_starting} containerd's \"{CONTAINERD_STARTING}\", {} others\n",
        n_calls as f64 / ran.as_secs_f64(),
        failures.len(),
        window_other.len()
    );
    out += &format!(
        "pods run to completion: {}\n",
        churners
            .iter()
            .map(|(n, _, _)| format!("{n} {}", p.get(n, 0)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let decided: Vec<String> = (1..=4)
        .map(|v| {
            let pulls: usize = shared
                .plan
                .pulls
                .iter()
                .map(|(i, ns)| p.get(&format!("pull {i} in {ns}"), v))
                .sum();
            let pods: usize = churners.iter().map(|(n, _, _)| p.get(n, v)).sum();
            format!("v{v}: {pulls} pulls, {pods} pods")
        })
        .collect();
    out += &format!(
        "decided by one bundle version alone: {}; in force at the end: v{}\n",
        decided.join("; "),
        status["bundle"]["version"]
    );
    let samples = samples.lock().unwrap().clone();
    let peak_rss = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let max_fds = samples.iter().map(|s| s.fds).max().unwrap_or(0);
    out += &format!(
        "pullgate RSS: {} after the warm-up ({:.1} s), {} at the end ({:+.1} MiB; bound +{}); \
         highest sampled {}, VmHWM {}\n",
        mib(first.rss_kib),
        first.at.as_secs_f64(),
        mib(last.rss_kib),
        (last.rss_kib as f64 - first.rss_kib as f64) / 1024.0,
        mib(RSS_GROWTH_MAX_KIB),
        mib(peak_rss),
        mib(last.hwm_kib),
    );
    out += &format!(
        "pullgate open fds: {} after the warm-up, {} at the end ({:+}; bound +{FD_GROWTH_MAX}); highest sampled {max_fds}\n",
        first.fds,
        last.fds,
        last.fds as i64 - first.fds as i64
    );
    let every = (samples.len() / 12).max(1);
    out += &format!(
        "samples (s: RSS MiB / fds): {}\n",
        samples
            .iter()
            .step_by(every)
            .map(|s| format!(
                "{:.0}: {:.1}/{}",
                s.at.as_secs_f64(),
                s.rss_kib as f64 / 1024.0,
                s.fds
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let pg = node.stack.pullgate.as_ref().expect("pullgate");
    out += &format!(
        "files written: pullgate log {} (level pullgate=debug), audit log {}\n",
        file_size(&pg.log),
        file_size(&node.audit_log)
    );
    loud(&out);

    // ---- Verdict ------------------------------------------------------------------------------------
    let show = |rs: &[&Rec]| {
        rs.iter()
            .take(20)
            .map(|r| {
                let what = match &r.outcome {
                    Outcome::Failed { code, message } => format!("{code:?}: {message}"),
                    other => format!("{other:?}"),
                };
                format!(
                    "  {} {} at {:.2} s ({:.0} ms): {what}",
                    r.group.name(),
                    r.method,
                    (r.start - t0).as_secs_f64(),
                    (r.end - r.start).as_secs_f64() * 1000.0
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        failures.is_empty(),
        "{} calls failed outside containerd's restart window (first 20):\n{}",
        failures.len(),
        show(&failures)
    );
    assert!(
        window_other.is_empty(),
        "{} calls failed in containerd's restart window with something other than UNAVAILABLE \
         or containerd's own \"{CONTAINERD_STARTING}\":\n{}",
        window_other.len(),
        show(&window_other)
    );
    assert_eq!(status["bundle"]["version"], 4, "bundle in force at the end");
    assert!(
        last.rss_kib <= first.rss_kib + RSS_GROWTH_MAX_KIB,
        "pullgate's RSS grew from {} to {} (bound +{})",
        mib(first.rss_kib),
        mib(last.rss_kib),
        mib(RSS_GROWTH_MAX_KIB)
    );
    assert!(
        last.fds <= first.fds + FD_GROWTH_MAX,
        "pullgate's open fds grew from {} to {} (bound +{FD_GROWTH_MAX})",
        first.fds,
        last.fds
    );
}
