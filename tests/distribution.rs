//! Bundles through the private registry, against real loopback Distribution registries: `bundle
//! publish` / `bundle fetch`; the node's sync — installs, rejections remembered (tampered blob, bad
//! signature, rollback, oversize), a stopped registry, 429 with Retry-After, rollout waves with an
//! injected clock, freeze detection; and the daemon syncing from the registry and answering its admin
//! API (Status, InstallBundle, Explain, WatchDecisions), refusing a caller that is not root.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pullgate::node::metrics::SyncMetrics;
use pullgate::node::sync::{OffsetClock, Round, SystemClock};
use pullgate::registry::FetchCounters;
use serde_json::{Value, json};
use support::distribution::{
    ISSUER, Signed, Signer, SimNode, SimSettings, bundle_json, push_raw, registry_client, seed_at,
};
use support::pullgate::{cli, cli_ok};
use support::{Registry as Distribution, TestDir, e2e_enabled};
use time::OffsetDateTime;

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// A registry, a signer with its trust file written, and a place for files.
struct Env {
    registry: Distribution,
    signer: Signer,
    trust: std::path::PathBuf,
    files: std::path::PathBuf,
    dir: TestDir,
}

impl Env {
    fn start(name: &str) -> Env {
        let dir = TestDir::new(name);
        let registry = Distribution::start(dir.path(), "registry");
        let signer = Signer::generate(2);
        let files = dir.path().join("files");
        std::fs::create_dir_all(&files).unwrap();
        let trust = files.join("trust.toml");
        signer.write_trust(&trust);
        Env {
            registry,
            signer,
            trust,
            files,
            dir,
        }
    }

    fn host(&self) -> String {
        self.registry.host()
    }

    /// Bundle `version` (issued a minute ago, `images` entries), signed.
    fn signed(&self, version: u64, images: usize, rollout: Option<Value>) -> Signed {
        Signed::new(
            &self.signer,
            bundle_json(
                version,
                now() - time::Duration::minutes(1),
                &self.host(),
                images,
                rollout,
            ),
        )
    }

    /// `pullgate bundle publish` of `signed` to `repo_tag`; the CLI's output.
    fn publish(&self, signed: &Signed, name: &str, repo_tag: &str) -> support::pullgate::CliOutput {
        let path = signed.write(&self.files, name);
        cli([
            "bundle".as_ref(),
            "publish".as_ref(),
            path.as_os_str(),
            "--to".as_ref(),
            format!("{}/{repo_tag}", self.host()).as_ref(),
            "--trust".as_ref(),
            self.trust.as_os_str(),
            "--plain-http".as_ref(),
            self.host().as_ref(),
        ])
    }

    /// A simulated node syncing `repo_tag` with `seed`, its state under the test dir.
    fn node(
        &self,
        name: &str,
        seed: &str,
        settings: SimSettings,
        clock: Arc<dyn pullgate::node::sync::Clock>,
    ) -> (SimNode, pullgate::node::sync::Syncer) {
        SimNode::new(
            &self.dir.path().join("nodes").join(name),
            seed,
            Arc::new(self.signer.trust()),
            &settings,
            clock,
            Arc::new(FetchCounters::default()),
            Arc::new(SyncMetrics::default()),
        )
    }
}

fn gets(n: &SimNode) -> u64 {
    n.counters.gets.load(Ordering::Relaxed)
}

fn heads(n: &SimNode) -> u64 {
    n.counters.heads.load(Ordering::Relaxed)
}

#[track_caller]
fn installed(r: &Round, version: u64) {
    assert!(
        matches!(r, Round::Installed { version: v } if *v == version),
        "expected v{version} installed: {r:?}"
    );
}

#[track_caller]
fn rejected(r: &Round, reason: &str) {
    match r {
        Round::Rejected { reason: got, .. } => assert_eq!(*got, reason, "{r:?}"),
        other => panic!("expected a rejection ({reason}): {other:?}"),
    }
}

/// One round rejects the channel's artifact for `reason`; three more rounds remember it (one HEAD
/// each, nothing downloaded); the node keeps `version`.
async fn rejected_then_remembered(
    node: &SimNode,
    sync: &mut pullgate::node::sync::Syncer,
    reason: &str,
    version: u64,
) {
    rejected(&sync.round().await, reason);
    let (h, g) = (heads(node), gets(node));
    for _ in 0..3 {
        match sync.round().await {
            Round::Rejected { reason: got, error } => {
                assert_eq!(got, reason);
                assert!(error.contains("remembered"), "{error}");
            }
            other => panic!("expected a remembered rejection ({reason}): {other:?}"),
        }
    }
    assert_eq!(
        (heads(node) - h, gets(node) - g),
        (3, 0),
        "a remembered {reason} digest was downloaded again"
    );
    assert_eq!(node.version(), Some(version));
}

#[tokio::test]
async fn publish_and_fetch_round_trip() {
    if !e2e_enabled("publish_and_fetch_round_trip") {
        return;
    }
    let env = Env::start("dist-publish");
    let v1 = env.signed(1, 3, None);
    let out = env.publish(&v1, "v1", "pullgate/bundles:prod");
    assert!(out.success(), "{out}");
    assert!(out.stdout.contains("published bundle v1"), "{out}");

    // The artifact as a registry client sees it.
    let manifest_text = support::process::run(
        std::process::Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{}/pullgate/bundles:prod", env.host())),
    );
    let m: Value = serde_json::from_str(&manifest_text).expect("manifest JSON");
    assert_eq!(m["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(m["artifactType"], "application/vnd.pullgate.bundle.v1+json");
    assert_eq!(
        m["config"]["mediaType"],
        "application/vnd.oci.empty.v1+json"
    );
    assert_eq!(m["config"]["size"], 2);
    let types: Vec<&str> = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["mediaType"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "application/vnd.pullgate.bundle.layer.v1+json",
            "application/vnd.pullgate.signatures.layer.v1+json"
        ]
    );
    let a = &m["annotations"];
    assert_eq!(a["org.pullgate.bundle.version"], "1");
    assert_eq!(a["org.pullgate.bundle.issuer"], ISSUER);
    assert!(
        a["org.pullgate.bundle.issued_at"].is_string()
            && a["org.pullgate.bundle.expires_at"].is_string()
    );

    // Fetch writes exactly what was published.
    let out_dir = env.files.join("fetched");
    let out = cli_ok([
        "bundle".as_ref(),
        "fetch".as_ref(),
        format!("{}/pullgate/bundles:prod", env.host()).as_ref(),
        "--out".as_ref(),
        out_dir.as_os_str(),
        "--plain-http".as_ref(),
        env.host().as_ref(),
    ]);
    assert!(out.stdout.contains("bundle v1"), "{out}");
    assert_eq!(
        std::fs::read(out_dir.join("bundle.json")).unwrap(),
        v1.bundle
    );
    assert_eq!(
        std::fs::read(out_dir.join("bundle.json.sig")).unwrap(),
        v1.signatures
    );
    cli_ok([
        "bundle".as_ref(),
        "verify".as_ref(),
        "--trust".as_ref(),
        env.trust.as_os_str(),
        out_dir.join("bundle.json").as_os_str(),
    ]);

    // The same artifact again: nothing to push.
    let out = env.publish(&v1, "v1", "pullgate/bundles:prod");
    assert!(
        out.success() && out.stdout.contains("already holds bundle v1"),
        "{out}"
    );
    // Not newer than the channel's: refused, the channel unchanged.
    let other_v1 = env.signed(1, 4, None);
    let out = env.publish(&other_v1, "v1b", "pullgate/bundles:prod");
    assert!(!out.success(), "{out}");
    assert!(
        out.stderr.contains("holds bundle v1; v1 is not newer"),
        "{out}"
    );
    // Signed by someone the trust file does not list: refused before anything is pushed.
    let mallory = Signer::generate(2);
    let forged = Signed::new(
        &mallory,
        bundle_json(2, now() - time::Duration::minutes(1), &env.host(), 1, None),
    );
    let mark = env.registry.mark();
    let out = env.publish(&forged, "forged", "pullgate/bundles:prod");
    assert!(!out.success(), "{out}");
    assert!(
        out.stderr
            .contains("does not verify against the trust file"),
        "{out}"
    );
    assert!(
        env.registry.requests_since(mark).is_empty(),
        "a refused publish reached the registry: {:?}",
        env.registry.requests_since(mark)
    );
    // A newer one moves the channel; blobs it shares (the empty config) are not uploaded again.
    let v2 = env.signed(2, 3, None);
    let out = env.publish(&v2, "v2", "pullgate/bundles:prod");
    assert!(
        out.success() && out.stdout.contains("the channel held v1"),
        "{out}"
    );
    assert!(out.stdout.contains("2 blob(s) uploaded"), "{out}");
    // A tag that holds something else is not overwritten.
    support::images::ImageFactory::new(env.dir.path()).push_image(
        &env.registry,
        "pullgate/bundles:image",
        "x",
    );
    let v3 = env.signed(3, 1, None);
    let out = env.publish(&v3, "v3", "pullgate/bundles:image");
    assert!(
        !out.success() && out.stderr.contains("not a pullgate bundle"),
        "{out}"
    );
}

#[tokio::test]
async fn sync_installs_new_bundles_and_remembers_what_it_rejects() {
    if !e2e_enabled("sync_installs_new_bundles_and_remembers_what_it_rejects") {
        return;
    }
    let env = Env::start("dist-sync");
    let host = env.host();
    let registry = registry_client(&host);
    let repo = "pullgate/bundles:prod";
    let (node, mut sync) = env.node(
        "a",
        "a",
        SimSettings::new(&host, repo),
        Arc::new(SystemClock),
    );

    // Nothing published yet: a failed round, nothing installed.
    let r = sync.round().await;
    assert!(
        matches!(
            r,
            Round::Failed {
                reason: "not_found",
                ..
            }
        ),
        "{r:?}"
    );

    assert!(env.publish(&env.signed(1, 2, None), "v1", repo).success());
    installed(&sync.round().await, 1);
    assert_eq!(node.version(), Some(1));
    // At steady state a round is exactly one HEAD request.
    let (h, g) = (heads(&node), gets(&node));
    for _ in 0..3 {
        assert!(matches!(sync.round().await, Round::Unchanged));
    }
    assert_eq!((heads(&node) - h, gets(&node) - g), (3, 0));

    assert!(env.publish(&env.signed(2, 2, None), "v2", repo).success());
    installed(&sync.round().await, 2);

    // Each bad artifact is rejected once, then remembered: later rounds are one HEAD, no GET, and
    // the bundle in force stays.
    // 1. A tampered bundle blob (same size, other bytes): the digest check catches it.
    let v3 = env.signed(3, 2, None);
    push_raw(&registry, &host, repo, &v3).await;
    let blob = env
        .registry
        .blob_data(&pullgate::policy::Digest::sha256_of(&v3.bundle).to_string());
    let mut bytes = std::fs::read(&blob).unwrap();
    let i = bytes.iter().position(|b| *b == b'3').unwrap();
    bytes[i] = b'9';
    std::fs::write(&blob, &bytes).unwrap();
    rejected_then_remembered(&node, &mut sync, "digest_mismatch", 2).await;

    // 2. A bad signature: the trusted administrators' signatures over other bytes.
    let mut altered = env.signed(4, 2, None);
    altered.bundle.extend_from_slice(b"\n");
    push_raw(&registry, &host, repo, &altered).await;
    rejected_then_remembered(&node, &mut sync, "bad_signature", 2).await;

    // 3. A rollback: validly signed, older than the installed v2.
    push_raw(&registry, &host, repo, &env.signed(1, 5, None)).await;
    rejected_then_remembered(&node, &mut sync, "rollback", 2).await;

    // A good bundle clears the way.
    let out = env.publish(&env.signed(5, 2, None), "v5", repo);
    assert!(out.success(), "{out}");
    installed(&sync.round().await, 5);

    // 4. Oversize: refused from the manifest, before any blob is downloaded.
    let mut small = SimSettings::new(&host, repo);
    small.max_size = 8 * 1024;
    let (big_node, mut big_sync) = env.node("b", "b", small, Arc::new(SystemClock));
    push_raw(&registry, &host, repo, &env.signed(6, 200, None)).await;
    let r = big_sync.round().await;
    rejected(&r, "too_large");
    assert_eq!(gets(&big_node), 1, "only the manifest was fetched: {r:?}");
    assert_eq!(big_node.version(), None);
    let (h, g) = (heads(&big_node), gets(&big_node));
    for _ in 0..3 {
        rejected(&big_sync.round().await, "too_large");
    }
    assert_eq!((heads(&big_node) - h, gets(&big_node) - g), (3, 0));
    // The other node takes the same (signed, newer) bundle: the limit is the node's.
    installed(&sync.round().await, 6);
}
