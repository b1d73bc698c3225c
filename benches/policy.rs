//! Policy benchmarks (`cargo bench --bench policy`): decision latency with 100 and 100,000 images, and
//! the time and peak memory of loading a signed 100,000-image bundle (read, verify, parse, index).
//!
//! Peak memory is measured in a fresh child process (this binary re-executed with
//! `PULLGATE_BENCH_LOAD=<dir>`), which loads the bundle once and reports `VmHWM` from /proc/self/status.

use std::path::Path;
use std::time::{Duration, Instant};

use pullgate::policy::{
    self, Digest, ImageRequest, PodContext, PrivateKey, Trust, VerifiedBundle, load,
};

const CHILD_ENV: &str = "PULLGATE_BENCH_LOAD";
const PROGRAMS: usize = 20;
const PROJECTS: usize = 10;

fn digest_of(kind: &str, i: usize) -> Digest {
    Digest::sha256_of(format!("{kind}-{i}").as_bytes())
}

/// A realistic bundle of `n` images spread over 20 programs × 10 projects.
fn generate(n: usize) -> String {
    use std::fmt::Write as _;
    let now = time::OffsetDateTime::now_utc();
    let fmt = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let mut s = String::with_capacity(n * 420 + 100_000);
    let _ = write!(
        s,
        r#"{{"format":1,"version":7,"issued_at":"{}","expires_at":"{}","issuer":"bench@corp.example","private_registry":"registry.corp","mirrors":[{{"source":"docker.io","target":"approved"}},{{"source":"ghcr.io","target":"approved-ghcr"}},{{"source":"registry.k8s.io","target":"approved-k8s"}}],"governance":{{"organization":"corp","application_label":"corp.example/application","programs":["#,
        fmt(now - time::Duration::hours(1)),
        fmt(now + time::Duration::days(30))
    );
    for p in 0..PROGRAMS {
        let _ = write!(
            s,
            r#"{}{{"name":"prog{p}","projects":["#,
            if p > 0 { "," } else { "" }
        );
        for q in 0..PROJECTS {
            let _ = write!(
                s,
                r#"{}{{"name":"proj{q}","namespaces":["ns-{p}-{q}"],"applications":["web","api"]}}"#,
                if q > 0 { "," } else { "" }
            );
        }
        s.push_str("]}");
    }
    s.push_str(r#"]},"first_party":[{"prefix":"registry.corp/apps/","scope":"corp","require_digest":true}],"images":["#);
    let licenses = [
        "Apache-2.0",
        "MIT",
        "BSD-3-Clause",
        "GPL-2.0-only",
        "MPL-2.0",
    ];
    let approvers = [
        "alice@corp.example",
        "bob@corp.example",
        "carol@corp.example",
    ];
    for i in 0..n {
        let registry = ["docker.io", "ghcr.io", "registry.k8s.io"][i % 3];
        let scope = match i % 4 {
            0 => "corp".to_owned(),
            1 => format!("corp/prog{}", i % PROGRAMS),
            2 => format!(
                "corp/prog{}/proj{}",
                i % PROGRAMS,
                (i / PROGRAMS) % PROJECTS
            ),
            _ => format!(
                "corp/prog{}/proj{}/web",
                i % PROGRAMS,
                (i / PROGRAMS) % PROJECTS
            ),
        };
        let _ = write!(
            s,
            r#"{}{{"source":"{registry}/team{}/app{i}","tags":{{"v1.{}":"{}"}},"scope":"{scope}","provenance":{{"license":"{}","scans":[{{"scanner":"trivy","version":"0.58.1","report":"{}","worst_severity":"low"}}],"approved_by":"{}","approved_at":"2026-01-15T10:00:00Z"}}}}"#,
            if i > 0 { "," } else { "" },
            i % 500,
            i % 40,
            digest_of("image", i),
            licenses[i % licenses.len()],
            digest_of("report", i),
            approvers[i % approvers.len()],
        );
    }
    s.push_str("]}");
    s
}

struct Fixture {
    dir: tempfile::TempDir,
    trust: Trust,
}

fn write_signed(n: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let json = generate(n);
    let bundle = dir.path().join("bundle.json");
    std::fs::write(&bundle, &json).unwrap();
    let keys = [
        PrivateKey::from_seed([1; 32]),
        PrivateKey::from_seed([2; 32]),
    ];
    let mut sigs = policy::SignatureFile::new();
    let mut trust = String::from("threshold = 2\n");
    for (i, k) in keys.iter().enumerate() {
        sigs.add(k.sign_bundle(json.as_bytes()));
        trust.push_str(&format!(
            "[[keys]]\nname = \"admin{i}\"\npublic_key = \"{}\"\n",
            k.public()
        ));
    }
    std::fs::write(load::signature_path(&bundle), sigs.to_json()).unwrap();
    std::fs::write(dir.path().join("trust.toml"), &trust).unwrap();
    Fixture {
        dir,
        trust: Trust::from_toml(&trust).unwrap(),
    }
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

fn main() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        let dir = Path::new(&dir);
        let trust = load::read_trust(&dir.join("trust.toml")).unwrap();
        let before = vm_hwm_kib();
        let cpu = cpu_micros();
        let t = Instant::now();
        let b = load_from(dir, &trust);
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
    let big_n = 100_000;
    println!("policy benchmarks (release build)");
    let small = write_signed(100);
    let big = write_signed(big_n);
    let size = std::fs::metadata(big.dir.path().join("bundle.json"))
        .unwrap()
        .len();

    let mut times = Vec::new();
    let mut big_bundle = None;
    for _ in 0..5 {
        let t = Instant::now();
        let b = load_from(big.dir.path(), &big.trust);
        times.push(t.elapsed());
        big_bundle = Some(b);
    }
    times.sort();
    let big_bundle = big_bundle.unwrap();
    println!(
        "load {big_n}-image bundle ({:.1} MiB, 2 signatures): median {:.1} ms, min {:.1} ms (budget 250 ms)",
        size as f64 / 1048576.0,
        times[2].as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3
    );

    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .env(CHILD_ENV, big.dir.path())
        .output()
        .unwrap();
    let line = String::from_utf8_lossy(&out.stdout);
    let f: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    if f.len() == 5 {
        println!(
            "load in a fresh process: {:.1} ms (CPU time, both threads: {:.1} ms); peak RSS (VmHWM) {:.1} MiB total, {:.1} MiB before loading (budget 64 MiB)",
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

    let small_bundle = load_from(small.dir.path(), &small.trust);
    // Alternate the cases and keep the best of three runs each, so a burst of load from other processes
    // on a shared machine does not land on one case only.
    let mut runs: [Vec<(Duration, Duration)>; 3] = Default::default();
    for _ in 0..3 {
        runs[0].push(bench_decide(100, 100, &small_bundle));
        runs[1].push(bench_decide(big_n, 100, &big_bundle));
        runs[2].push(bench_decide(big_n, 1000, &big_bundle));
    }
    let [(s50, s99), (h50, h99), (b50, b99)] = runs.map(|r| r.into_iter().min().unwrap());
    println!(
        "decide, 100 images:                      median {} ns, p99 {} ns",
        s50.as_nanos(),
        s99.as_nanos()
    );
    println!(
        "decide, {big_n} images, same 100 hot images: median {} ns, p99 {} ns (budget: median 1000 ns)",
        h50.as_nanos(),
        h99.as_nanos()
    );
    println!(
        "decide, {big_n} images, 1000 hot images:     median {} ns, p99 {} ns (budget: median 1000 ns)",
        b50.as_nanos(),
        b99.as_nanos()
    );
    println!(
        "ratio 100k/100 median: {:.2} with the same 100 hot images, {:.2} with 1000 hot images",
        h50.as_secs_f64() / s50.as_secs_f64(),
        b50.as_secs_f64() / s50.as_secs_f64()
    );
}
