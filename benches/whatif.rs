//! `pullgate bundle what-if` on a busy node: real containerd 1.6 (the test harness's, on loopback)
//! holding 100 images and 500 containers in 100 pods, and the what-if's own work — the inventory
//! (pods, containers, each image's repo digests proven from content) and the comparison of every
//! container's decision under two bundles — timed against a baseline measured in the same run: one
//! `ListContainers` call straight to containerd.
//!
//! Run with `cargo bench --bench whatif` (root, the packages of scripts/install-deps.sh). Setting up
//! the node takes a minute or two (100 images, 100 pods, 500 containers); `BENCH_ROUNDS` (default 5)
//! rounds are then timed, each on a fresh connection as the command makes. Target: ≤ 2 s.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pullgate::node::config::NodeMode;
use pullgate::node::enforce::lookup;
use pullgate::node::proxy::Upstream;
use pullgate::node::whatif;
use pullgate::policy::{PrivateKey, SignatureFile, Trust, VerifiedBundle, verify_bundle};
use serde_json::json;
use support::cri::host_pod_config;
use support::{Cri, Stack};

const IMAGES: usize = 100;
const PODS: usize = 100;
const CONTAINERS_PER_POD: usize = 5;
const NAMESPACES: [&str; 5] = ["checkout", "ledger", "search-index", "tools", "default"];

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// 100 images sharing one busybox layer, each with its own config (label), pushed as
/// `bench/img:N`; returns their manifest digests.
fn push_images(stack: &Stack) -> Vec<String> {
    let base = stack.images.build_image("what-if bench");
    let layout = stack.images.layout.display().to_string();
    (0..IMAGES)
        .map(|n| {
            let tag = format!("bench{n}");
            let status = Command::new("umoci")
                .args([
                    "config",
                    "--image",
                    &format!("{layout}:{base}"),
                    "--tag",
                    &tag,
                ])
                .args(["--config.label", &format!("pullgate.bench={n}")])
                .status()
                .expect("run umoci");
            assert!(status.success(), "umoci config {tag}");
            stack
                .images
                .push_tag(&tag, &stack.public, &format!("bench/img:{n}"))
        })
        .collect()
}

/// A signed, verified bundle approving every bench image for the organisation (format 2); with
/// `deprecate`, the even-numbered images are deprecated and ledger needs three scanners (so the
/// comparison has changes to report).
fn bundle(public: &str, digests: &[String], version: u64, deprecate: bool) -> VerifiedBundle {
    let now = time::OffsetDateTime::now_utc();
    let t = |d: time::OffsetDateTime| {
        d.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let tags: serde_json::Map<String, serde_json::Value> = digests
        .iter()
        .enumerate()
        .map(|(n, d)| {
            let v = if deprecate && n % 2 == 0 {
                json!({"digest": d, "deprecated_at": t(now - time::Duration::hours(1))})
            } else {
                json!(d)
            };
            (n.to_string(), v)
        })
        .collect();
    let scan = |name: &str, n: u8| json!({"scanner": name, "version": "1", "report": format!("sha256:{}", format!("{n:02x}").repeat(32)), "worst_severity": "low"});
    // The new bundle also asks for a third scanner in ledger: its containers are newly denied.
    let ledger_rules = if deprecate {
        json!({"min_scanners": 3})
    } else {
        json!({})
    };
    let doc = json!({
        "format": 2, "version": version,
        "issued_at": t(now - time::Duration::minutes(1)), "expires_at": t(now + time::Duration::days(1)),
        "issuer": "bench", "private_registry": "registry.corp",
        "mirrors": [{"source": public, "target": "approved"}],
        "governance": {"organization": "corp", "application_label": "app", "programs": [
            {"name": "payments", "projects": [
                {"name": "checkout", "namespaces": ["checkout"]},
                {"name": "ledger", "namespaces": ["ledger"], "rules": ledger_rules}]},
            {"name": "search", "projects": [{"name": "index", "namespaces": ["search-index"]}]}]},
        "images": [{"source": format!("{public}/bench/img"), "tags": tags, "scope": "corp",
            "provenance": {"license": "MIT", "scans": [scan("trivy", 1), scan("grype", 2)],
                "approved_by": "bench", "approved_at": t(now - time::Duration::hours(2))}}]
    });
    let bytes = serde_json::to_vec(&doc).unwrap();
    let key = PrivateKey::from_seed([7; 32]);
    let mut sigs = SignatureFile::new();
    sigs.add(key.sign_bundle(&bytes));
    let trust = Trust::new(
        vec![pullgate::policy::trust::TrustedKey {
            name: "bench".into(),
            key: key.public(),
        }],
        1,
    )
    .unwrap();
    verify_bundle(&bytes, &sigs, &trust, None, now).expect("bench bundle verifies")
}

fn main() {
    if !support::e2e_enabled("bench_whatif") {
        return;
    }
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let setup = Instant::now();
    let stack = Stack::start("bench-whatif");
    let digests = push_images(&stack);
    let public = stack.public.host();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut cri = Cri::connect(&stack.containerd.socket).await;
        for n in 0..IMAGES {
            cri.pull(&format!("{public}/bench/img:{n}"), "default")
                .await
                .unwrap_or_else(|s| panic!("pull bench/img:{n}: {}", s.message()));
        }
        for p in 0..PODS {
            let cfg = host_pod_config(&format!("pod{p}"), NAMESPACES[p % NAMESPACES.len()]);
            let pod = cri
                .run_pod(&cfg)
                .await
                .unwrap_or_else(|s| panic!("RunPodSandbox {p}: {}", s.message()));
            for c in 0..CONTAINERS_PER_POD {
                let image = format!(
                    "{public}/bench/img:{}",
                    (p * CONTAINERS_PER_POD + c) % IMAGES
                );
                cri.create_container(&pod, &cfg, &format!("c{c}"), &image, &["sleep", "600"])
                    .await
                    .unwrap_or_else(|s| panic!("CreateContainer {p}/{c}: {}", s.message()));
            }
        }
    });
    println!(
        "set up {IMAGES} images, {PODS} pods, {} containers in {:?}",
        PODS * CONTAINERS_PER_POD,
        setup.elapsed()
    );
    let installed = bundle(&public, &digests, 1, false);
    let new = bundle(&public, &digests, 2, true);

    let (mut whatifs, mut lists) = (Vec::new(), Vec::new());
    let mut reported = 0;
    for _ in 0..rounds {
        runtime.block_on(async {
            let upstream = Arc::new(Upstream::new(&stack.containerd.socket));
            let t0 = Instant::now();
            let resp: k8s_cri::v1::ListContainersResponse = lookup::unary(
                &upstream,
                "/runtime.v1.RuntimeService/ListContainers",
                &k8s_cri::v1::ListContainersRequest { filter: None },
            )
            .await
            .expect("ListContainers");
            lists.push(t0.elapsed());
            assert_eq!(resp.containers.len(), PODS * CONTAINERS_PER_POD);

            let upstream = Arc::new(Upstream::new(&stack.containerd.socket));
            let t0 = Instant::now();
            let inv = whatif::inventory(&upstream).await.expect("inventory");
            let report = whatif::compare(
                inv,
                Some(&installed),
                None,
                &new,
                NodeMode::Enforce,
                time::OffsetDateTime::now_utc(),
                14,
            );
            whatifs.push(t0.elapsed());
            reported = report.rows.len();
            let c = report.counts();
            // ledger pods need 3 scanners: newly denied; half the rest newly deprecated.
            assert!(c.get("newly_denied").copied().unwrap_or(0) > 0, "{c:?}");
            assert!(c.get("newly_deprecated").copied().unwrap_or(0) > 0, "{c:?}");
            assert!(
                report
                    .rows
                    .iter()
                    .all(|r| !r.container.repo_digests.is_empty())
            );
        });
    }
    let (w, l) = (median(whatifs), median(lists));
    println!(
        "what-if over {reported} containers on {IMAGES} images: median {w:?} ({rounds} rounds; target <= 2s: {})",
        if w <= Duration::from_secs(2) {
            "met"
        } else {
            "MISSED"
        }
    );
    println!("baseline, one ListContainers call: median {l:?}");
    println!(
        "ratio what-if / ListContainers: {:.1}x",
        w.as_secs_f64() / l.as_secs_f64()
    );
    runtime.block_on(async {
        let mut cri = Cri::connect(&stack.containerd.socket).await;
        cri.remove_all_pods().await;
    });
}
