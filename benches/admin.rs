//! Administrators' side benchmarks (`cargo bench --bench admin`), each against a baseline measured in
//! the same run:
//!
//! 1. `approve`'s mirror copy ([`pullgate::registry::copy`]) of a ~100 MiB multi-layer image between two
//!    loopback Distribution registries, against `skopeo copy` of the same image (throughput, MiB/s).
//! 2. `bundle build` (catalog load + render) from a 100,000-image catalog (one file per repository),
//!    against the node's load of the resulting signed bundle from its JSON
//!    (`policy::verify_bundle_reader`: what a node does once per new bundle; its starts read the
//!    compiled form).
//! 3. `--check-mirror` of 10,000 approved manifests against a loopback registry (requests/s, total).
//!
//! Settings: `BENCH_ROUNDS` (default 3), `BENCH_LAYERS` (6) and `BENCH_LAYER_MIB` (16) for the copied
//! image, `BENCH_CATALOG_IMAGES` (100000), `BENCH_MIRROR_IMAGES` (10000), `BENCH_ONLY` (`copy`,
//! `build` or `mirror`). Needs docker-registry, skopeo, umoci and busybox-static (like the e2e tests).

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::fmt::Write as _;
use std::ops::ControlFlow;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use pullgate::admin::{build, catalog::Catalog};
use pullgate::policy::{Digest, PrivateKey, Reference, Trust, load};
use pullgate::registry::{self, ManifestKind, Registry, RegistryOptions};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// CPU time (user + system, every thread) this process has used so far: on a machine shared with
/// other work the wall-clock ratio depends on the load, the CPU-time ratio much less.
fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct it is given; a zeroed rusage is a valid value.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| Duration::new(v.tv_sec as u64, v.tv_usec as u32 * 1000);
    t(u.ru_utime) + t(u.ru_stime)
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

fn client(hosts: &[String]) -> Registry {
    Registry::new(RegistryOptions {
        plain_http: hosts.to_vec(),
        concurrency: 4,
        ..Default::default()
    })
    .expect("registry client")
}

fn bench_copy(rt: &tokio::runtime::Runtime, rounds: usize) {
    let dir = support::TestDir::new("bench-copy");
    let public = support::Registry::start(dir.path(), "public");
    let images = support::ImageFactory::new(dir.path());
    let tag = images.build_image("bench copy");
    support::images::add_layers(
        &images,
        &tag,
        env_usize("BENCH_LAYERS", 6),
        env_usize("BENCH_LAYER_MIB", 16) << 20,
    );
    let digest = images.push_tag(&tag, &public, "library/big:1");
    let reg = client(&[public.host()]);
    let src = Reference::parse(&format!("{}/library/big@{digest}", public.host())).unwrap();
    let manifest = rt.block_on(reg.resolve(&src)).expect("resolve");
    let ManifestKind::Image { config, layers } = &manifest.kind else {
        panic!("not an image")
    };
    let bytes: u64 = config.size + layers.iter().map(|l| l.size).sum::<u64>();
    println!(
        "copy: {:.1} MiB in {} blobs ({} layers), {} rounds, from {} to a fresh registry per tool and round",
        bytes as f64 / (1 << 20) as f64,
        layers.len() + 1,
        layers.len(),
        rounds,
        public.host()
    );
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        // A fresh destination registry for each tool and round: nothing is there to skip or mount
        // (skopeo's blob-info cache would otherwise mount blobs it copied in an earlier round).
        let to_skopeo = support::Registry::start(dir.path(), &format!("skopeo{r}"));
        let to_pullgate = support::Registry::start(dir.path(), &format!("pullgate{r}"));
        let reg = client(&[public.host(), to_pullgate.host()]);
        let t = Instant::now();
        let ok = Command::new("skopeo")
            .args([
                "copy",
                "--quiet",
                "--preserve-digests",
                "--src-tls-verify=false",
                "--dest-tls-verify=false",
            ])
            .arg(format!("docker://{}/library/big@{digest}", public.host()))
            .arg(format!(
                "docker://{}/approved/library/big@{digest}",
                to_skopeo.host()
            ))
            .status()
            .expect("run skopeo");
        assert!(ok.success(), "skopeo copy failed");
        let skopeo = t.elapsed();
        let t = Instant::now();
        let report = rt
            .block_on(registry::copy(
                &reg,
                &src,
                &to_pullgate.host(),
                "approved/library/big",
                &|_| ControlFlow::Continue(()),
            ))
            .expect("copy");
        let pullgate = t.elapsed();
        assert_eq!(report.bytes_copied, bytes, "every blob copied");
        println!(
            "  round {r}: skopeo {:.0} MiB/s ({skopeo:.2?}), pullgate {:.0} MiB/s ({pullgate:.2?}), ratio {:.2}",
            mib_s(bytes, skopeo),
            mib_s(bytes, pullgate),
            skopeo.as_secs_f64() / pullgate.as_secs_f64()
        );
        theirs.push(skopeo);
        ours.push(pullgate);
    }
    let (o, t) = (median(ours), median(theirs));
    println!(
        "copy (median): pullgate {:.0} MiB/s, skopeo {:.0} MiB/s: pullgate/skopeo throughput {:.2}× (target ≥ 0.8×)",
        mib_s(bytes, o),
        mib_s(bytes, t),
        t.as_secs_f64() / o.as_secs_f64()
    );
}

/// Writes the header, governance and trust files of a bench catalog; returns the two signing keys.
fn catalog_skeleton(dir: &Path, private: &str, plain: &[String]) -> [PrivateKey; 2] {
    std::fs::create_dir_all(dir.join("images")).unwrap();
    let plain: Vec<String> = plain.iter().map(|h| format!("\"{h}\"")).collect();
    std::fs::write(
        dir.join("catalog.toml"),
        format!("issuer = \"bench@corp.example\"\nprivate_registry = \"{private}\"\nvalidity = \"30d\"\nplain_http = [{}]\ntrust = \"trust.toml\"\n\n[[mirrors]]\nsource = \"docker.io\"\ntarget = \"approved\"\n", plain.join(", ")),
    )
    .unwrap();
    let mut g = String::from(
        "organization = \"corp\"\napplication_label = \"corp.example/application\"\n\n[rules]\nmin_scanners = 2\nmax_severity = \"high\"\n",
    );
    for p in 0..20 {
        let _ = write!(g, "\n[[programs]]\nname = \"prog{p}\"\n");
        for q in 0..10 {
            let _ = write!(
                g,
                "\n[[programs.projects]]\nname = \"proj{q}\"\nnamespaces = [\"ns-{p}-{q}\"]\napplications = [\"web\", \"api\"]\n"
            );
        }
    }
    std::fs::write(dir.join("governance.toml"), g).unwrap();
    let keys = [
        PrivateKey::from_seed([1; 32]),
        PrivateKey::from_seed([2; 32]),
    ];
    let mut trust = String::from("threshold = 2\n");
    for (i, k) in keys.iter().enumerate() {
        let _ = write!(
            trust,
            "\n[[keys]]\nname = \"admin{i}\"\npublic_key = \"{}\"\n",
            k.public()
        );
    }
    std::fs::write(dir.join("trust.toml"), trust).unwrap();
    keys
}

fn approval(out: &mut String, scope: &str, tag: Option<&str>, digest: &Digest, i: usize) {
    let licenses = [
        "Apache-2.0",
        "MIT",
        "BSD-3-Clause",
        "GPL-2.0-only",
        "MPL-2.0",
    ];
    let _ = write!(out, "\n[[approved]]\nscope = \"{scope}\"\n");
    if let Some(t) = tag {
        let _ = writeln!(out, "tag = \"{t}\"");
    }
    let _ = write!(
        out,
        "digest = \"{digest}\"\nlicense = \"{}\"\napproved_by = \"0123456789abcdef\"\napproved_at = 2026-01-10T09:30:00Z\n",
        licenses[i % licenses.len()]
    );
    for (s, v) in [("trivy", "0.58.1"), ("grype", "0.86.0")] {
        let _ = write!(
            out,
            "\n[[approved.scans]]\nscanner = \"{s}\"\nversion = \"{v}\"\nreport = \"{}\"\nworst_severity = \"low\"\nscanned_at = 2026-01-10T09:00:00Z\n",
            Digest::sha256_of(format!("{s}-{i}").as_bytes())
        );
    }
}

fn bench_build(rounds: usize) {
    let n = env_usize("BENCH_CATALOG_IMAGES", 100_000);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("catalog");
    let keys = catalog_skeleton(&dir, "registry.corp", &[]);
    let t = Instant::now();
    for i in 0..n {
        let scope = match i % 4 {
            0 => "corp".to_owned(),
            1 => format!("corp/prog{}", i % 20),
            2 => format!("corp/prog{}/proj{}", i % 20, (i / 20) % 10),
            _ => format!("corp/prog{}/proj{}/web", i % 20, (i / 20) % 10),
        };
        let mut f = format!("source = \"docker.io/team{}/image{i}\"\n", i % 500);
        approval(
            &mut f,
            &scope,
            Some("1.0"),
            &Digest::sha256_of(format!("tag-{i}").as_bytes()),
            i,
        );
        let p = dir.join(format!("images/docker.io/team{}/image{i}.toml", i % 500));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, f).unwrap();
    }
    println!(
        "build: catalog of {n} images (one file per repository) written in {:.1?}",
        t.elapsed()
    );
    let trust = Trust::new(
        keys.iter()
            .enumerate()
            .map(|(i, k)| pullgate::policy::trust::TrustedKey {
                name: format!("admin{i}"),
                key: k.public(),
            })
            .collect(),
        2,
    )
    .unwrap();
    let bundle_path = tmp.path().join("bundle.json");
    let (mut builds, mut loads) = (Vec::new(), Vec::new());
    let (mut build_cpu, mut load_cpu) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let c = cpu_time();
        let t = Instant::now();
        let catalog = Catalog::load(&dir).expect("catalog loads");
        let loaded_at = t.elapsed();
        let bytes = build::render(&catalog, 2, 7 + r as u64, time::OffsetDateTime::now_utc());
        std::fs::write(&bundle_path, &bytes).unwrap();
        let b = t.elapsed();
        let bc = cpu_time() - c;
        println!(
            "  round {r}: catalog load {loaded_at:.2?}, render and write {:.2?}",
            b - loaded_at
        );
        drop(catalog);
        let mut sigs = pullgate::policy::SignatureFile::new();
        for k in &keys {
            sigs.add(k.sign_bundle(&bytes));
        }
        std::fs::write(load::signature_path(&bundle_path), sigs.to_json()).unwrap();
        let c = cpu_time();
        let t = Instant::now();
        // As the daemon loads its bundle (streamed, signatures first), with policy.max_bundle_size
        // raised to fit: the default (128 MiB) is only a default.
        let loaded = pullgate::policy::verify_bundle_reader(
            std::fs::File::open(&bundle_path).unwrap(),
            &load::read_signatures(&load::signature_path(&bundle_path)).unwrap(),
            &trust,
            None,
            time::OffsetDateTime::now_utc(),
            u64::MAX,
        )
        .unwrap()
        .expect("the node loads the built bundle");
        let l = t.elapsed();
        let lc = cpu_time() - c;
        assert_eq!(loaded.images().len(), n);
        println!(
            "  round {r}: build {b:.2?} ({:.1} MiB bundle), node load {l:.2?}, ratio {:.2}; CPU time: build {bc:.2?}, node load {lc:.2?}, ratio {:.2}",
            bytes.len() as f64 / (1 << 20) as f64,
            b.as_secs_f64() / l.as_secs_f64(),
            bc.as_secs_f64() / lc.as_secs_f64()
        );
        builds.push(b);
        loads.push(l);
        build_cpu.push(bc);
        load_cpu.push(lc);
    }
    let (b, l) = (median(builds), median(loads));
    let (bc, lc) = (median(build_cpu), median(load_cpu));
    println!(
        "build (median): {b:.2?} vs node load {l:.2?}: {:.2}× the load time (target ≤ 3×); CPU time {bc:.2?} vs {lc:.2?}: {:.2}×",
        b.as_secs_f64() / l.as_secs_f64(),
        bc.as_secs_f64() / lc.as_secs_f64()
    );
}

fn bench_mirror(rt: &tokio::runtime::Runtime, rounds: usize) {
    let n = env_usize("BENCH_MIRROR_IMAGES", 10_000);
    let dir = support::TestDir::new("bench-mirror");
    let private = support::Registry::start(dir.path(), "private");
    let images = support::ImageFactory::new(dir.path());
    // One small image's blobs in the repository, then n distinct manifests that reference them.
    let base =
        Digest::parse(&images.push_image(&private, "approved/library/many:base", "mirror bench"))
            .unwrap();
    let hosts = [private.host()];
    let reg = client(&hosts);
    let m = rt
        .block_on(reg.resolve(
            &Reference::parse(&format!("{}/approved/library/many@{base}", private.host())).unwrap(),
        ))
        .unwrap();
    let mut manifest: serde_json::Value = serde_json::from_slice(&m.bytes).unwrap();
    let oci = oci_client::Client::new(oci_client::client::ClientConfig {
        protocol: oci_client::client::ClientProtocol::HttpsExcept(hosts.to_vec()),
        ..Default::default()
    });
    let t = Instant::now();
    let mut bodies = Vec::with_capacity(n);
    for i in 0..n {
        manifest["annotations"] = serde_json::json!({"bench.index": i.to_string()});
        bodies.push(serde_json::to_vec(&manifest).unwrap());
    }
    let digests: Vec<Digest> = bodies.iter().map(|b| Digest::sha256_of(b)).collect();
    rt.block_on(async {
        use futures_util::StreamExt as _;
        futures_util::stream::iter(bodies.into_iter().zip(&digests))
            .for_each_concurrent(16, |(body, d)| {
                let oci = &oci;
                let host = private.host();
                async move {
                    let r = oci_client::Reference::with_digest(
                        host,
                        "approved/library/many".into(),
                        d.to_string(),
                    );
                    oci.push_manifest_raw(
                        &r,
                        body,
                        http::HeaderValue::from_static(
                            "application/vnd.oci.image.manifest.v1+json",
                        ),
                    )
                    .await
                    .expect("push manifest");
                }
            })
            .await;
    });
    println!(
        "mirror check: {n} manifests pushed to {} in {:.1?}",
        private.host(),
        t.elapsed()
    );
    let cat = dir.path().join("catalog");
    catalog_skeleton(&cat, &private.host(), &hosts);
    let mut f = String::from("source = \"docker.io/library/many\"\n");
    for (i, d) in digests.iter().enumerate() {
        approval(&mut f, "corp", None, d, i);
    }
    std::fs::write(cat.join("images/many.toml"), f).unwrap();
    let catalog = Catalog::load(&cat).expect("catalog loads");
    let mut times = Vec::new();
    for r in 0..rounds {
        let mark = private.mark();
        let t = Instant::now();
        let checked = rt
            .block_on(build::check_mirror(&catalog, &reg, 32))
            .expect("all present");
        let d = t.elapsed();
        let requests = private.requests_since(mark).len();
        assert_eq!(checked, n);
        println!(
            "  round {r}: {n} manifests checked in {d:.2?}: {:.0} images/s, {requests} HTTP requests ({:.0} requests/s)",
            n as f64 / d.as_secs_f64(),
            requests as f64 / d.as_secs_f64()
        );
        times.push(d);
    }
    let d = median(times);
    println!(
        "mirror check (median): {n} images in {d:.2?}, {:.0} images/s (32 concurrent HEADs)",
        n as f64 / d.as_secs_f64()
    );
}

fn main() {
    let rounds = env_usize("BENCH_ROUNDS", 3).max(1);
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let missing = support::missing_prerequisites()
        .into_iter()
        .filter(|m| !m.starts_with("root") && !m.contains("containerd") && !m.contains("runc"))
        .collect::<Vec<_>>();
    let registries = missing.is_empty();
    if !registries {
        println!(
            "copy and mirror benchmarks skipped: missing {}",
            missing.join(", ")
        );
    }
    if registries && (only.is_empty() || only == "copy") {
        bench_copy(&rt, rounds);
    }
    if only.is_empty() || only == "build" {
        bench_build(rounds);
    }
    if registries && (only.is_empty() || only == "mirror") {
        bench_mirror(&rt, rounds);
    }
}
