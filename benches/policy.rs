//! Policy benchmarks (`cargo bench --bench policy`): decision latency with 100 and 100,000 images (and
//! the ratio, 1,000 images asked for), and the time and peak memory of loading a signed 100,000-image
//! bundle against a baseline measured in the same run — reading the same JSON file and hashing it with
//! SHA-256. Two loads are measured: the node's start (the installed bundle read back from its compiled
//! form in the state directory, signatures checked against the trust file) and the signed JSON (what
//! an install and the CLI read: verify, parse, index), with the phases of the latter apart.
//!
//! The benchmark runs with the malloc settings of the systemd unit (it re-executes itself with the
//! unit's `GLIBC_TUNABLES` unless that variable is set; `GLIBC_TUNABLES= cargo bench --bench policy`
//! measures glibc's defaults).
//!
//! Peak memory is measured in a fresh child process (this binary re-executed with
//! `PULLGATE_BENCH_LOAD=<dir>`), which loads the bundle once and reports `VmHWM` from /proc/self/status.

use std::path::Path;
use std::time::{Duration, Instant};

use pullgate::node::enforce::store::BundleStore;
use pullgate::policy::{self, ImageRequest, PodContext, Trust, VerifiedBundle, load};

#[path = "support/bundle.rs"]
mod bundle;
#[path = "support/malloc.rs"]
mod malloc;
use bundle::{PROGRAMS, PROJECTS, digest_of, write_signed};

const CHILD_ENV: &str = "PULLGATE_BENCH_LOAD";

/// The node's state directory of the fixture in `dir`, with its bundle installed.
fn state_of(dir: &Path) -> BundleStore {
    BundleStore::new(dir.join("state"))
}

/// Installs the fixture's bundle in its state directory (as `pullgate bundle install` does).
fn install(dir: &Path, trust: &Trust) {
    let json = dir.join("bundle.json");
    state_of(dir)
        .install(
            &std::fs::read(&json).unwrap(),
            &std::fs::read(load::signature_path(&json)).unwrap(),
            trust,
            time::OffsetDateTime::now_utc(),
            &json,
        )
        .unwrap();
}

/// The node's load at start: the installed bundle from its compiled form.
fn start_from(dir: &Path, trust: &Trust) -> VerifiedBundle {
    state_of(dir)
        .load_current(trust, time::OffsetDateTime::now_utc())
        .unwrap()
        .unwrap()
}

fn load_from(dir: &Path, trust: &Trust) -> VerifiedBundle {
    load::load_bundle(
        &dir.join("bundle.json"),
        None,
        trust,
        None,
        time::OffsetDateTime::now_utc(),
    )
    .unwrap()
}

fn vm_hwm_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// User + system CPU time of this process so far, in microseconds (less sensitive than wall time to
/// other load on a shared machine).
fn cpu_micros() -> u64 {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    let u = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr());
        u.assume_init()
    };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    us(u.ru_utime) + us(u.ru_stime)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

/// Times `decide` over a mix of approved tags, approved digests, mirror references and denials: 1000
/// requests about `distinct` different images of the bundle's `n`.
fn bench_decide(n: usize, distinct: usize, b: &VerifiedBundle) -> (Duration, Duration) {
    let mut requests = Vec::new();
    for k in 0..1000 {
        let i = ((k % distinct) * 7919) % n;
        let registry = ["docker.io", "ghcr.io", "registry.k8s.io"][i % 3];
        let target = ["approved", "approved-ghcr", "approved-k8s"][i % 3];
        requests.push(match k % 4 {
            0 => format!("{registry}/team{}/app{i}:v1.{}", i % 500, i % 40),
            1 => format!(
                "{registry}/team{}/app{i}@{}",
                i % 500,
                digest_of("image", i)
            ),
            2 => format!(
                "registry.corp/{target}/team{}/app{i}:v1.{}",
                i % 500,
                i % 40
            ),
            _ => format!("{registry}/team{}/app{i}:v9.9", i % 500),
        });
    }
    let pods: Vec<PodContext> = (0..16)
        .map(|j| {
            let mut pod = PodContext {
                namespace: Some(format!("ns-{}-{}", j % PROGRAMS, j % PROJECTS)),
                ..PodContext::default()
            };
            pod.labels
                .insert("corp.example/application".into(), "web".into());
            pod.labels
                .insert("app.kubernetes.io/name".into(), "x".into());
            pod
        })
        .collect();
    let now = b.issued_at + time::Duration::hours(1);
    // Warm up.
    for (k, r) in requests.iter().enumerate() {
        std::hint::black_box(policy::decide(
            &ImageRequest::Reference(r),
            b,
            &pods[k % pods.len()],
            now,
        ));
    }
    let rounds = 200;
    let mut samples = Vec::with_capacity(rounds * requests.len());
    for round in 0..rounds {
        for (k, r) in requests.iter().enumerate() {
            let pod = &pods[(k + round) % pods.len()];
            let t = Instant::now();
            let d = policy::decide(&ImageRequest::Reference(r), b, pod, now);
            let e = t.elapsed();
            std::hint::black_box(d);
            samples.push(e);
        }
    }
    samples.sort();
    (percentile(&samples, 0.5), percentile(&samples, 0.99))
}

/// Median and minimum of `samples`.
fn median_min(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    (samples[samples.len() / 2], samples[0])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Times the load of the big bundle against the baseline (reading the same file and hashing it with
/// SHA-256), and the phases of a load measured apart: one SHA-512 pass (what the signatures cover),
/// the JSON syntax alone (streamed and from memory), and parsing and indexing from memory. Rounds are
/// interleaved so a burst of load from other processes does not land on one of them only.
fn bench_load(dir: &Path, trust: &Trust, n: usize, size: u64) -> VerifiedBundle {
    use sha2::Digest as _;
    let path = dir.join("bundle.json");
    let timed = |f: &mut dyn FnMut()| {
        let t = Instant::now();
        f();
        t.elapsed()
    };
    // Both loads give the same bundle.
    assert!(
        *start_from(dir, trust) == *load_from(dir, trust),
        "the compiled form read back differs from the signed JSON"
    );
    let mut phases: [Vec<Duration>; 7] = Default::default();
    // CPU time (all threads) of the baseline and of the loads: less sensitive to other processes.
    let mut cpu: [Vec<Duration>; 3] = Default::default();
    let mut bundle = None;
    for _ in 0..7 {
        let c = cpu_micros();
        phases[0].push(timed(&mut || {
            let bytes = std::fs::read(&path).unwrap();
            std::hint::black_box(sha2::Sha256::digest(&bytes));
        }));
        cpu[0].push(Duration::from_micros(cpu_micros() - c));
        // The previous bundle is dropped before the clock starts.
        bundle = None;
        let c = cpu_micros();
        phases[1].push(timed(&mut || bundle = Some(load_from(dir, trust))));
        cpu[1].push(Duration::from_micros(cpu_micros() - c));
        bundle = None;
        let c = cpu_micros();
        phases[6].push(timed(&mut || bundle = Some(start_from(dir, trust))));
        cpu[2].push(Duration::from_micros(cpu_micros() - c));
        phases[2].push(timed(&mut || {
            let bytes = std::fs::read(&path).unwrap();
            std::hint::black_box(sha2::Sha512::digest(&bytes));
        }));
        phases[3].push(timed(&mut || {
            let file =
                std::io::BufReader::with_capacity(1 << 17, std::fs::File::open(&path).unwrap());
            serde_json::from_reader::<_, serde::de::IgnoredAny>(file).unwrap();
        }));
        let bytes = std::fs::read(&path).unwrap();
        phases[4].push(timed(&mut || {
            serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).unwrap();
        }));
        let mut parsed = None;
        phases[5].push(timed(&mut || {
            parsed = Some(policy::parse_bundle(&bytes).unwrap())
        }));
        drop(parsed);
    }
    let [base, load, sha512, scan_stream, scan_mem, parse_mem, start] = phases.map(median_min);
    let [base_cpu, load_cpu, start_cpu] = cpu.map(median_min);
    let compiled_size = std::fs::metadata(dir.join("state/current/bundle.idx"))
        .unwrap()
        .len();
    println!(
        "{n}-image bundle: {:.1} MiB of signed JSON (2 signatures), compiled form {:.1} MiB",
        size as f64 / 1048576.0,
        compiled_size as f64 / 1048576.0
    );
    println!(
        "baseline, read the JSON file and SHA-256 it: median {:.1} ms, min {:.1} ms",
        ms(base.0),
        ms(base.1)
    );
    let ratio = |what: &str, load: (Duration, Duration), cpu: (Duration, Duration), target| {
        println!(
            "{what}: median {:.1} ms, min {:.1} ms; ratio to baseline {:.2} median, {:.2} min{target}; CPU time (all threads) {:.1} ms, ratio {:.2}",
            ms(load.0),
            ms(load.1),
            load.0.as_secs_f64() / base.0.as_secs_f64(),
            load.1.as_secs_f64() / base.1.as_secs_f64(),
            ms(cpu.0),
            cpu.0.as_secs_f64() / base_cpu.0.as_secs_f64()
        )
    };
    ratio(
        "node start, installed bundle from its compiled form",
        start,
        start_cpu,
        " (target <= 3)",
    );
    ratio(
        "signed JSON (install, CLI): verify, parse, index",
        load,
        load_cpu,
        "",
    );
    println!(
        "phases apart (median ms): read + SHA-512 {:.1}; JSON syntax only, streamed {:.1}, from memory {:.1}; parse + validate + index from memory {:.1}",
        ms(sha512.0),
        ms(scan_stream.0),
        ms(scan_mem.0),
        ms(parse_mem.0)
    );
    bundle.unwrap()
}

fn main() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        let dir = Path::new(&dir);
        let trust = load::read_trust(&dir.join("trust.toml")).unwrap();
        let before = vm_hwm_kib();
        let cpu = cpu_micros();
        let t = Instant::now();
        let b = match std::env::var("PULLGATE_BENCH_LOAD_FROM").as_deref() {
            Ok("json") => load_from(dir, &trust),
            _ => start_from(dir, &trust),
        };
        let elapsed = t.elapsed();
        println!(
            "{} {} {} {} {}",
            before,
            vm_hwm_kib(),
            elapsed.as_micros(),
            b.images().len(),
            cpu_micros() - cpu
        );
        return;
    }
    // `cargo bench` passes `--bench`; ignore arguments.
    malloc::run_as_deployed();
    let big_n = 100_000;
    println!("policy benchmarks (release build)");
    let small = write_signed(100);
    let big = write_signed(big_n);
    let size = std::fs::metadata(big.dir.path().join("bundle.json"))
        .unwrap()
        .len();

    install(big.dir.path(), &big.trust);
    let big_bundle = bench_load(big.dir.path(), &big.trust, big_n, size);

    let exe = std::env::current_exe().unwrap();
    for (what, from) in [("node start", "compiled"), ("signed JSON", "json")] {
        let out = std::process::Command::new(&exe)
            .env(CHILD_ENV, big.dir.path())
            .env("PULLGATE_BENCH_LOAD_FROM", from)
            .output()
            .unwrap();
        let line = String::from_utf8_lossy(&out.stdout);
        let f: Vec<u64> = line
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if f.len() == 5 {
            println!(
                "{what} in a fresh process: {:.1} ms (CPU time, all threads: {:.1} ms); peak RSS (VmHWM) {:.1} MiB total, {:.1} MiB before loading (budget 64 MiB)",
                f[2] as f64 / 1e3,
                f[4] as f64 / 1e3,
                f[1] as f64 / 1024.0,
                f[0] as f64 / 1024.0
            );
        } else {
            println!(
                "peak memory child failed: {}{}",
                line,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    let small_bundle = load_from(small.dir.path(), &small.trust);
    // Alternate the cases and keep the best of three runs each, so a burst of load from other processes
    // on a shared machine does not land on one case only.
    let mut runs: [Vec<(Duration, Duration)>; 3] = Default::default();
    for _ in 0..3 {
        // With 100 images every image is hot: the 1000 requests ask each of them ten ways.
        runs[0].push(bench_decide(100, 1000, &small_bundle));
        runs[1].push(bench_decide(big_n, 100, &big_bundle));
        runs[2].push(bench_decide(big_n, 1000, &big_bundle));
    }
    let [(s50, s99), (h50, h99), (b50, b99)] = runs.map(|r| r.into_iter().min().unwrap());
    println!(
        "decide, 100 images, 1000 requests:          median {} ns, p99 {} ns",
        s50.as_nanos(),
        s99.as_nanos()
    );
    println!(
        "decide, {big_n} images, 100 hot images:  median {} ns, p99 {} ns",
        h50.as_nanos(),
        h99.as_nanos()
    );
    println!(
        "decide, {big_n} images, 1000 hot images: median {} ns, p99 {} ns",
        b50.as_nanos(),
        b99.as_nanos()
    );
    println!(
        "ratio 100k/100 median: {:.2} with 1000 hot images (target <= 1.2), {:.2} with 100 hot images",
        b50.as_secs_f64() / s50.as_secs_f64(),
        h50.as_secs_f64() / s50.as_secs_f64()
    );
}
