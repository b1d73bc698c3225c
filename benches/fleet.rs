//! Fleet simulation (`cargo bench --bench fleet`): many simulated nodes — the real bundle sync
//! ([`pullgate::node::sync::Syncer`]), one instance per node, each with its own seed, HTTP client,
//! state directory and bundle store — in one process, against one loopback Distribution registry,
//! time compressed (sync interval 1 s instead of 60 s).
//!
//! Measured, each against a baseline from the same run:
//!
//! - steady state: requests/s and bytes/s the registry serves, against the ideal of one `HEAD` per
//!   node per interval; peak versus mean request rate, in 100 ms and in 1 s buckets (no thundering
//!   herd: ≤ 2×);
//!   the registry's CPU per 1,000 requests (its capacity per core);
//! - a new bundle without a rollout schedule: time until 50 %, 99 % and 100 % of the nodes installed
//!   it (against the interval), requests and bytes served meanwhile (against one artifact per node);
//! - a new bundle with a compressed schedule (10 % at once, 50 % after 5 intervals, 100 % after 10
//!   intervals): the same times, against the schedule, and the bytes served in each wave (downloads
//!   follow the waves: a node reads the schedule the manifest announces and downloads when its wave
//!   opens);
//! - failed rounds; and the requests one round costs with this client against `oci-client`'s HEAD.
//!
//! Settings: `BENCH_NODES` (default 1000; 10000 works), `BENCH_INTERVAL_MS` (the sync interval,
//! default 1000), `BENCH_IMAGES` (images in the bundle, default 200), `BENCH_STEADY_SECS` (default 10),
//! `BENCH_STORE` (`memory`, the default: verification as a node does it, installs in memory, so a
//! thousand nodes sharing one disk measure distribution, not fsync; `disk`: the daemon's bundle store
//! in each node's directory). Needs docker-registry.
//!
//! The registry, the simulated nodes and whatever else runs on the machine share its cores: when the
//! registry's CPU (printed) reaches what the machine can give it, the figures show a saturated
//! registry, not the sync; lower `BENCH_NODES` or raise `BENCH_INTERVAL_MS` to see the sync below
//! saturation.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pullgate::node::metrics::SyncMetrics;
use pullgate::node::sync::SystemClock;
use pullgate::registry::FetchCounters;
use support::distribution::{Signed, Signer, SimNode, SimSettings, bundle_json, registry_client};
use time::OffsetDateTime;

const REPO: &str = "pullgate/bundles:prod";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU seconds (user + system) this process has used.
fn own_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // Fields 14 and 15 of stat; `after` starts at field 3.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// The counters now.
fn snapshot(c: &FetchCounters) -> (u64, u64) {
    (c.requests(), c.bytes.load(Ordering::Relaxed))
}

/// The request rate over a stretch of steady state.
struct Sample {
    /// Requests/s over the whole stretch.
    mean: f64,
    /// Requests/s in the busiest 100 ms bucket.
    peak_100ms: f64,
    /// Requests/s in the busiest 1 s bucket (ten 100 ms buckets, back to back).
    peak_1s: f64,
    /// Body bytes/s.
    bytes: f64,
}

/// Requests counted in 100 ms buckets over `secs` seconds.
fn sample(c: &FetchCounters, secs: usize) -> Sample {
    let bucket = Duration::from_millis(100);
    let (start, (r0, b0)) = (Instant::now(), snapshot(c));
    let mut last = (Instant::now(), r0);
    let mut next = Instant::now() + bucket;
    let mut buckets: Vec<(f64, u64)> = Vec::new();
    while start.elapsed() < Duration::from_secs(secs as u64) {
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        next += bucket;
        let (t, (r, _)) = (Instant::now(), snapshot(c));
        buckets.push(((t - last.0).as_secs_f64(), r - last.1));
        last = (t, r);
    }
    let (r1, b1) = snapshot(c);
    let secs = start.elapsed().as_secs_f64();
    let rate = |b: &[(f64, u64)]| {
        b.iter().map(|x| x.1).sum::<u64>() as f64 / b.iter().map(|x| x.0).sum::<f64>().max(1e-9)
    };
    Sample {
        mean: (r1 - r0) as f64 / secs,
        peak_100ms: buckets.chunks(1).map(rate).fold(0.0, f64::max),
        peak_1s: buckets.chunks_exact(10).map(rate).fold(0.0, f64::max),
        bytes: (b1 - b0) as f64 / secs,
    }
}

/// What a rollout took.
struct Rollout {
    t50: Duration,
    t99: Duration,
    t100: Duration,
    requests: u64,
    bytes: u64,
    installed: usize,
    /// Body bytes received between consecutive `marks` (and from the last one to the end).
    bytes_between: Vec<u64>,
}

/// Runs `publish`, then waits (at most `limit`) until every node installed `version`, noting the
/// bytes received at each of `marks` (times after the publish).
fn rollout(
    nodes: &[SimNode],
    version: u64,
    counters: &FetchCounters,
    limit: Duration,
    marks: &[Duration],
    publish: impl FnOnce(),
) -> Rollout {
    let (r0, b0) = snapshot(counters);
    let t0 = Instant::now();
    publish();
    let mut done: Vec<Option<Duration>> = vec![None; nodes.len()];
    let mut left = nodes.len();
    let mut at_marks = vec![b0];
    while left > 0 && t0.elapsed() < limit {
        while at_marks.len() <= marks.len() && t0.elapsed() >= marks[at_marks.len() - 1] {
            at_marks.push(snapshot(counters).1);
        }
        for (i, n) in nodes.iter().enumerate() {
            if done[i].is_none() && n.version() >= Some(version) {
                done[i] = Some(t0.elapsed());
                left -= 1;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (r1, b1) = snapshot(counters);
    at_marks.push(b1);
    let mut times: Vec<Duration> = done.iter().flatten().copied().collect();
    times.sort();
    let at = |q: f64| {
        let k = ((nodes.len() as f64 * q).ceil() as usize).max(1);
        times.get(k - 1).copied().unwrap_or(limit)
    };
    Rollout {
        t50: at(0.5),
        t99: at(0.99),
        t100: if times.len() == nodes.len() {
            at(1.0)
        } else {
            limit
        },
        requests: r1 - r0,
        bytes: b1 - b0,
        installed: times.len(),
        bytes_between: at_marks.windows(2).map(|w| w[1] - w[0]).collect(),
    }
}

fn main() {
    let n = env_usize("BENCH_NODES", 1000);
    let interval = Duration::from_millis(env_usize("BENCH_INTERVAL_MS", 1000) as u64);
    let ideal = n as f64 / interval.as_secs_f64();
    let images = env_usize("BENCH_IMAGES", 200);
    let steady_secs = env_usize("BENCH_STEADY_SECS", 10);
    let in_memory = std::env::var("BENCH_STORE").as_deref() != Ok("disk");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = support::TestDir::new("bench-fleet");
    let registry = support::Registry::start(dir.path(), "registry");
    let host = registry.host();
    let signer = Signer::generate(2);
    let trust = Arc::new(signer.trust());
    let client = registry_client(&host);
    let publish = |version: u64, rollout: Option<serde_json::Value>| {
        let issued = OffsetDateTime::now_utc();
        let s = Signed::new(
            &signer,
            bundle_json(version, issued, &host, images, rollout),
        );
        rt.block_on(pullgate::admin::publish::publish(
            &client,
            &s.bundle,
            &s.signatures,
            &trust,
            &format!("{host}/{REPO}"),
            OffsetDateTime::now_utc(),
        ))
        .expect("publish");
        (s.bundle.len() + s.signatures.len()) as u64
    };
    let artifact = publish(1, None);
    println!(
        "fleet: {n} simulated nodes (the real sync, one client and {} bundle store each), sync interval {:.1} s, \
         one loopback Distribution registry, bundle of {images} images ({:.1} KiB with signatures); 2 runtime threads",
        if in_memory { "in-memory" } else { "on-disk" },
        interval.as_secs_f64(),
        artifact as f64 / 1024.0
    );

    // What one round's HEAD costs in requests: this client against oci-client's.
    let (repo, tag) = REPO.split_once(':').unwrap();
    let mark = registry.mark();
    rt.block_on(pullgate::registry::artifact::tag_digest(
        &client, &host, repo, tag,
    ))
    .expect("oci-client HEAD");
    let oci_requests = registry.requests_since(mark).len();
    let probe = Arc::new(FetchCounters::default());
    let fetcher = pullgate::registry::Fetcher::new(
        pullgate::registry::FetchOptions {
            plain_http: vec![host.clone()],
            ..Default::default()
        },
        probe.clone(),
    )
    .unwrap();
    let mark = registry.mark();
    let source = pullgate::policy::Reference::parse(&format!("{host}/{REPO}")).unwrap();
    rt.block_on(fetcher.head_manifest(&source)).expect("HEAD");
    let our_requests = registry.requests_since(mark).len();
    println!(
        "one round's HEAD at steady state: {our_requests} request(s) with pullgate's fetch client, \
         {oci_requests} with oci-client (it pings /v2/ first when the registry issues no token): {:.2}×",
        our_requests as f64 / oci_requests as f64
    );

    // The fleet.
    let counters = Arc::new(FetchCounters::default());
    let metrics = Arc::new(SyncMetrics::default());
    let mut settings = SimSettings::new(&host, REPO);
    settings.interval = interval;
    settings.max_backoff = interval * 8;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let nodes: Vec<SimNode> = (0..n)
        .map(|i| {
            let (node, syncer) = SimNode::with_store(
                &dir.path().join("nodes").join(i.to_string()),
                &format!("node-{i}"),
                trust.clone(),
                &settings,
                Arc::new(SystemClock),
                counters.clone(),
                metrics.clone(),
                in_memory,
            );
            let mut stop = stop_rx.clone();
            rt.spawn(syncer.run(async move {
                let _ = stop.wait_for(|s| *s).await;
            }));
            node
        })
        .collect();
    let first = rollout(&nodes, 1, &counters, Duration::from_secs(120), &[], || {});
    println!(
        "start: {}/{n} nodes took v1 up {:.2} s after the first was started (first rounds spread over one interval)",
        first.installed,
        started.elapsed().as_secs_f64()
    );

    // Steady state.
    std::thread::sleep(Duration::from_secs(2));
    let mark = registry.mark();
    let (cpu0, own0) = (cpu_seconds(registry.pid()), own_cpu_seconds());
    let wall = Instant::now();
    let Sample {
        mean,
        peak_100ms,
        peak_1s,
        bytes,
    } = sample(&counters, steady_secs);
    let cpu = cpu_seconds(registry.pid()) - cpu0;
    let own = own_cpu_seconds() - own0;
    let logged = registry.requests_since(mark).len() as f64;
    let secs = wall.elapsed().as_secs_f64();
    let served = logged / secs;
    println!(
        "steady state ({steady_secs} s): {mean:.0} requests/s (ideal: {ideal:.0}/s, one HEAD per node per interval: {:.2}×; \
         the registry's access log: {served:.0}/s), {:.1} KiB/s",
        mean / ideal,
        bytes / 1024.0
    );
    println!(
        "  peak per 100 ms bucket {peak_100ms:.0}/s = {:.2}× the mean; per 1 s bucket {peak_1s:.0}/s = {:.2}× the mean \
         (no thundering herd: ≤ 2×)",
        peak_100ms / mean,
        peak_1s / mean
    );
    println!(
        "  registry CPU: {cpu:.2} s over {secs:.1} s = {:.0}% of one core; {:.0} ms per 1,000 requests → about {:.0} requests/s per core",
        100.0 * cpu / secs,
        1e6 * cpu / logged.max(1.0),
        logged / cpu.max(1e-9)
    );
    println!(
        "  the simulated nodes' CPU: {:.0}% of one core ({:.0} µs per request, syncs and their HTTP clients together)",
        100.0 * own / secs,
        1e6 * own / logged.max(1.0)
    );

    // A new bundle without a schedule.
    let limit = Duration::from_secs(120).max(interval * 40);
    let cpu0 = cpu_seconds(registry.pid());
    let a = rollout(&nodes, 2, &counters, limit, &[], || {
        publish(2, None);
    });
    let cpu_a = cpu_seconds(registry.pid()) - cpu0;
    let report = |name: &str, r: &Rollout, baseline: &str| {
        println!(
            "{name}: {}/{n} installed; 50 % after {:.2} s, 99 % after {:.2} s, 100 % after {:.2} s ({baseline})",
            r.installed,
            r.t50.as_secs_f64(),
            r.t99.as_secs_f64(),
            r.t100.as_secs_f64()
        );
        println!(
            "  meanwhile {} requests ({:.0}/s) and {:.1} MiB ({:.1} MiB/s); {:.2}× one artifact per node",
            r.requests,
            r.requests as f64 / r.t100.as_secs_f64(),
            r.bytes as f64 / (1 << 20) as f64,
            r.bytes as f64 / (1 << 20) as f64 / r.t100.as_secs_f64(),
            r.bytes as f64 / (n as u64 * artifact) as f64
        );
    };
    report(
        "new bundle, no schedule",
        &a,
        &format!("interval: {:.1} s", interval.as_secs_f64()),
    );
    println!(
        "  registry CPU during it: {cpu_a:.2} s ({:.0} ms per MiB served)",
        1000.0 * cpu_a / (a.bytes as f64 / (1 << 20) as f64).max(1e-9)
    );

    // A new bundle with a compressed schedule: waves 5 intervals apart.
    let waves = [interval * 5, interval * 10];
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    let schedule = serde_json::json!([
        {"after": "0s", "percent": 10},
        {"after": ms(waves[0]), "percent": 50},
        {"after": ms(waves[1]), "percent": 100}
    ]);
    let b = rollout(&nodes, 3, &counters, limit, &waves, || {
        publish(3, Some(schedule));
    });
    let (w1, w2) = (waves[0].as_secs_f64(), waves[1].as_secs_f64());
    report(
        &format!("new bundle, schedule 10 % at 0 s, 50 % at {w1:.0} s, 100 % at {w2:.0} s"),
        &b,
        &format!("schedule: 50 % at {w1:.0} s, 100 % at {w2:.0} s, after issued_at"),
    );
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let windows = [
        (0.0, w1, 0.1),
        (w1, w2, 0.4),
        (w2, b.t100.as_secs_f64().max(w2 + 1e-3), 0.5),
    ];
    for ((from, to, share), got) in windows.iter().zip(&b.bytes_between) {
        println!(
            "  downloads {from:.0}–{to:.1} s: {:.1} MiB ({:.2}× {:.0} % of the nodes' artifacts), {:.2} MiB/s",
            mib(*got),
            *got as f64 / (share * (n as u64 * artifact) as f64),
            share * 100.0,
            mib(*got) / (to - from)
        );
    }

    let _ = stop_tx.send(true);
    let rounds = metrics.rounds();
    let failures = metrics.failures();
    let total: u64 = rounds.values().sum();
    println!(
        "rounds: {total} ({rounds:?}); failed or rejected: {} {failures:?}",
        failures.values().sum::<u64>()
    );
    rt.shutdown_timeout(Duration::from_secs(5));
}
