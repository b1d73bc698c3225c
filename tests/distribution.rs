//! Bundles through the private registry, against real loopback Distribution registries: `bundle
//! publish` / `bundle fetch`; the node's sync — installs, rejections remembered (tampered blob, bad
//! signature, rollback, oversize), a stopped registry, 429 with Retry-After, rollout waves with an
//! injected clock, freeze detection; and the daemon syncing from the registry and answering its admin
//! API (Status, InstallBundle, Explain, WatchDecisions), refusing a caller that is not root.

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pullgate::node::metrics::SyncMetrics;
use pullgate::node::sync::{Clock, OffsetClock, Round, SystemClock};
use pullgate::registry::FetchCounters;
use serde_json::{Value, json};
use support::distribution::{
    ISSUER, Signed, Signer, SimNode, SimSettings, bundle_json, push_annotated, push_raw,
    registry_client, seed_at,
};
use support::process::wait_for_async;
use support::pullgate::{cli, cli_ok};
use support::stack::http_get;
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
        self.node_with(
            name,
            seed,
            settings,
            clock,
            Arc::new(SyncMetrics::default()),
        )
    }

    /// [`Env::node`], counting its rounds into `metrics`.
    fn node_with(
        &self,
        name: &str,
        seed: &str,
        settings: SimSettings,
        clock: Arc<dyn pullgate::node::sync::Clock>,
        metrics: Arc<SyncMetrics>,
    ) -> (SimNode, pullgate::node::sync::Syncer) {
        SimNode::new(
            &self.dir.path().join("nodes").join(name),
            seed,
            Arc::new(self.signer.trust()),
            &settings,
            clock,
            Arc::new(FetchCounters::default()),
            metrics,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_down_the_node_keeps_its_bundle_backs_off_goes_stale_and_recovers() {
    if !e2e_enabled("registry_down_the_node_keeps_its_bundle_backs_off_goes_stale_and_recovers") {
        return;
    }
    let mut env = Env::start("dist-down");
    let repo = "pullgate/bundles:prod";
    assert!(env.publish(&env.signed(1, 2, None), "v1", repo).success());
    let mut settings = SimSettings::new(&env.host(), repo);
    settings.max_backoff = Duration::from_secs(4);
    settings.max_staleness = Duration::from_secs(5);
    let metrics = Arc::new(SyncMetrics::default());
    let (node, sync) = env.node_with("n", "n", settings, Arc::new(SystemClock), metrics.clone());
    let handle = sync.handle();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(sync.run(async {
        let _ = stop_rx.await;
    }));
    wait_for_async("v1 installed", Duration::from_secs(10), || {
        (node.version() == Some(1)).then_some(())
    })
    .await;

    env.registry.stop();
    let down = Instant::now();
    // Failures back off: after two failures in a row the wait is past the interval (1 s ± 10 %).
    let gap = wait_for_async("two failed rounds", Duration::from_secs(15), || {
        let s = handle.status();
        (s.consecutive_failures >= 2).then(|| s.next_round_at.unwrap() - s.last_round_at.unwrap())
    })
    .await;
    assert!(
        gap >= time::Duration::milliseconds(1900),
        "no backoff after failures: the next round {gap} after the last"
    );
    let s = handle.status();
    assert!(
        s.backing_off
            && s.last_error
                .as_ref()
                .is_some_and(|(r, _)| *r == "unreachable"),
        "{s:?}"
    );
    assert_eq!(
        node.version(),
        Some(1),
        "the installed bundle stays in force"
    );

    // No round succeeds for max_staleness: stale, loudly.
    let stale = wait_for_async("stale", Duration::from_secs(15), || {
        let reason = handle.status().stale_reason(now())?;
        metrics.stale(now().unix_timestamp()).then_some(reason)
    })
    .await;
    assert!(
        down.elapsed() >= Duration::from_secs(4),
        "stale too early: {:?}",
        down.elapsed()
    );
    assert!(stale.contains("no round has succeeded since"), "{stale}");
    assert_eq!(handle.status().state(now()), "stale");
    let text = pullgate::node::metrics::Metrics::default().render(0, None, true);
    assert!(
        !text.contains("pullgate_bundle_sync_stale"),
        "sync series only once a sync runs"
    );
    let text = {
        let m = pullgate::node::metrics::Metrics::default();
        m.sync
            .start(now().unix_timestamp() - 60, Duration::from_secs(5));
        m.render(now().unix_timestamp(), None, true)
    };
    assert!(text.contains("pullgate_bundle_sync_stale 1"), "{text}");
    assert!(metrics.failures().get("unreachable").copied().unwrap_or(0) >= 2);

    // The registry comes back with a newer bundle: the node takes it up within the backoff limit.
    env.registry.restart();
    assert!(env.publish(&env.signed(2, 2, None), "v2", repo).success());
    let s = wait_for_async(
        "v2 installed after the registry returned",
        Duration::from_secs(12),
        || {
            let s = handle.status();
            (node.version() == Some(2) && s.last_result == "installed").then_some(s)
        },
    )
    .await;
    assert!(
        !s.stale(now()) && !s.backing_off && s.consecutive_failures == 0,
        "{s:?}"
    );
    let _ = stop_tx.send(());
    task.await.unwrap();
}

/// A loopback HTTP proxy in front of `upstream` that answers `429 Too Many Requests` with
/// `Retry-After: 3` to the first `throttle` requests (closing each such connection), and forwards
/// everything after. Returns its port and the times it answered 429 and forwarded.
async fn throttling_proxy(
    upstream: u16,
    throttle: usize,
) -> (u16, Arc<std::sync::Mutex<Vec<(Instant, bool)>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let log: Arc<std::sync::Mutex<Vec<(Instant, bool)>>> = Arc::default();
    let seen = log.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                // Read the request head.
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match client.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let throttled = {
                    let mut s = seen.lock().unwrap();
                    let throttled = s.iter().filter(|(_, t)| *t).count() < throttle;
                    s.push((Instant::now(), throttled));
                    throttled
                };
                if throttled {
                    let _ = client
                        .write_all(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .await;
                    return;
                }
                let Ok(mut up) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    return;
                };
                if up.write_all(&head).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
            });
        }
    });
    (port, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_by_the_registry_the_node_honours_retry_after() {
    if !e2e_enabled("throttled_by_the_registry_the_node_honours_retry_after") {
        return;
    }
    let env = Env::start("dist-429");
    let repo = "pullgate/bundles:prod";
    assert!(env.publish(&env.signed(1, 2, None), "v1", repo).success());
    let (port, log) = throttling_proxy(env.registry.port, 2).await;
    let proxy = format!("127.0.0.1:{port}");
    // Without Retry-After the backoff alone would come back within 2 s (max_backoff).
    let mut settings = SimSettings::new(&proxy, repo);
    settings.max_backoff = Duration::from_secs(2);
    let (node, sync) = env.node("n", "n", settings, Arc::new(SystemClock));
    let handle = sync.handle();
    let task = tokio::spawn(sync.run(std::future::pending()));
    // The round's end (its status), not the store's write in the middle of it.
    wait_for_async(
        "v1 installed through the throttling proxy",
        Duration::from_secs(20),
        || (handle.status().last_result == "installed").then_some(()),
    )
    .await;
    task.abort();
    assert_eq!(node.version(), Some(1));
    let seen = log.lock().unwrap().clone();
    assert!(
        seen.len() >= 3 && seen[0].1 && seen[1].1 && !seen[2].1,
        "{seen:?}"
    );
    for w in seen[..3].windows(2) {
        let gap = w[1].0 - w[0].0;
        assert!(
            gap >= Duration::from_secs(3),
            "came back {gap:?} after a 429 with Retry-After: 3"
        );
    }
    let s = handle.status();
    assert_eq!(s.consecutive_failures, 0, "{s:?}");
}

/// Log lines written to a buffer.
#[derive(Clone, Default)]
struct LogBuffer(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_round_that_ends_staleness_does_not_log_it() {
    if !e2e_enabled("a_round_that_ends_staleness_does_not_log_it") {
        return;
    }
    let env = Env::start("dist-stale-log");
    let repo = "pullgate/bundles:prod";
    assert!(env.publish(&env.signed(1, 2, None), "v1", repo).success());
    let mut settings = SimSettings::new(&env.host(), repo);
    settings.max_staleness = Duration::from_secs(5);
    let clock = Arc::new(OffsetClock::default());
    let (_node, mut sync) = env.node("n", "n", settings, clock.clone());
    installed(&sync.round().await, 1);
    // Past max_staleness since the last success: this round succeeds, so the sync is not stale.
    clock.advance(time::Duration::seconds(60));
    let log = LogBuffer::default();
    let sink = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    let round = {
        let _guard = tracing::subscriber::set_default(subscriber);
        sync.round().await
    };
    assert!(round.succeeded(), "{round:?}");
    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("bundle sync: unchanged"),
        "the round's log: {text}"
    );
    assert!(!text.contains("STALE"), "{text}");
}

#[tokio::test]
async fn rollout_waves_with_an_injected_clock() {
    if !e2e_enabled("rollout_waves_with_an_injected_clock") {
        return;
    }
    let env = Env::start("dist-waves");
    let repo = "pullgate/bundles:prod";
    let clock = Arc::new(OffsetClock::default());
    let early_seed = seed_at(0..50);
    let late_seed = seed_at(50..100);
    let (early, mut early_sync) = env.node(
        "early",
        &early_seed,
        SimSettings::new(&env.host(), repo),
        clock.clone(),
    );
    let (late, mut late_sync) = env.node(
        "late",
        &late_seed,
        SimSettings::new(&env.host(), repo),
        clock.clone(),
    );

    // v1 without a schedule goes everywhere at once.
    assert!(env.publish(&env.signed(1, 2, None), "v1", repo).success());
    for s in [&mut early_sync, &mut late_sync] {
        installed(&s.round().await, 1);
    }

    // v2: half the nodes at once, the rest an hour after issued_at.
    let issued = now() - time::Duration::minutes(1);
    let rollout = json!([{"after": "0s", "percent": 50}, {"after": "1h", "percent": 100}]);
    let v2 = Signed::new(
        &env.signer,
        bundle_json(2, issued, &env.host(), 2, Some(rollout)),
    );
    assert!(env.publish(&v2, "v2", repo).success());
    installed(&early_sync.round().await, 2);
    // The manifest announces the schedule: the late node reads the manifest and defers the
    // download of the blobs until its wave opens.
    let (mark, g) = (env.registry.mark(), gets(&late));
    let r = late_sync.round().await;
    let opens = issued + time::Duration::hours(1);
    assert!(
        matches!(r, Round::Pending { version: 2, opens_at } if opens_at == opens),
        "{r:?}"
    );
    assert_eq!(
        gets(&late) - g,
        1,
        "outside the open wave: the manifest only"
    );
    let blobs = "/v2/pullgate/bundles/blobs/";
    assert_eq!(
        env.registry.requests_under(mark, blobs),
        Vec::<String>::new()
    );
    assert_eq!(late.version(), Some(1), "outside the open wave: waits");
    let s = late_sync.handle().status();
    let p = s.pending.as_ref().expect("pending shown in the status");
    assert_eq!(
        (
            p.downloaded,
            p.version,
            p.wave_opens_at,
            p.step.map(|x| x.1)
        ),
        (false, 2, opens, Some(100))
    );
    assert!(p.position >= 50);
    assert_eq!(s.state(clock.now()), "waiting_for_wave");
    // Waiting costs one HEAD per round: nothing is downloaded, not even the manifest again.
    let (g, h) = (gets(&late), heads(&late));
    for _ in 0..3 {
        assert!(matches!(late_sync.round().await, Round::Pending { .. }));
    }
    assert_eq!((gets(&late) - g, heads(&late) - h), (0, 3));
    assert_eq!(
        env.registry.requests_under(mark, blobs),
        Vec::<String>::new()
    );

    // An hour later (time travel) the wave is open: downloaded (both layers) and installed.
    clock.advance(time::Duration::hours(1));
    installed(&late_sync.round().await, 2);
    assert_eq!(gets(&late) - g, 2);
    assert_eq!(early.version(), Some(2));
    assert!(late_sync.handle().status().pending.is_none());

    // An artifact without the announcement (published before it existed): downloaded and verified
    // at once, kept in memory, installed without another download when the signed wave opens.
    let registry = registry_client(&env.host());
    // Half the nodes at once, the rest `after` issued_at.
    let halves = |version, after: &str| {
        let rollout = json!([{"after": "0s", "percent": 50}, {"after": after, "percent": 100}]);
        Signed::new(
            &env.signer,
            bundle_json(version, issued, &env.host(), 2, Some(rollout)),
        )
    };
    let v3 = halves(3, "2h");
    push_annotated(&registry, &env.host(), repo, &v3, |a| {
        a.remove(pullgate::policy::artifact::ANNOTATION_ROLLOUT);
    })
    .await;
    let g = gets(&late);
    assert!(matches!(
        late_sync.round().await,
        Round::Pending { version: 3, .. }
    ));
    assert_eq!(gets(&late) - g, 3, "manifest and both layers");
    assert_eq!(
        late_sync.handle().status().pending.map(|p| p.downloaded),
        Some(true)
    );
    clock.advance(time::Duration::hours(1));
    installed(&late_sync.round().await, 3);
    assert_eq!(gets(&late) - g, 3, "installed from memory");

    // A registry that lies in the hint ("everyone now") only makes the late node download early:
    // the signed schedule still holds the install back.
    let v4 = halves(4, "3h");
    push_annotated(&registry, &env.host(), repo, &v4, |a| {
        a.insert(
            pullgate::policy::artifact::ANNOTATION_ROLLOUT.into(),
            r#"[{"after": "0s", "percent": 100}]"#.into(),
        );
    })
    .await;
    let g = gets(&late);
    let r = late_sync.round().await;
    let signed_opens = issued + time::Duration::hours(3);
    assert!(
        matches!(r, Round::Pending { version: 4, opens_at } if opens_at == signed_opens),
        "{r:?}"
    );
    assert_eq!(gets(&late) - g, 3);
    assert_eq!(
        late.version(),
        Some(3),
        "the signed schedule decides the install"
    );
}

/// `pullgate ARGS` run as uid/gid 65534 (nobody).
fn cli_as_nobody(args: &[&std::ffi::OsStr]) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    std::process::Command::new(support::Pullgate::binary())
        .args(args)
        .env("NO_COLOR", "1")
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run pullgate as nobody")
}

#[tokio::test]
async fn the_daemon_syncs_from_the_registry_and_answers_its_admin_api() {
    use support::node::{Node, standard_bundle};
    if !e2e_enabled("the_daemon_syncs_from_the_registry_and_answers_its_admin_api") {
        return;
    }
    let mut node = Node::start_with("dist-daemon", "enforce", |stack| {
        format!(
            "[sync]\nsource = \"{p}/pullgate/bundles:prod\"\ninterval = \"1s\"\nplain_http = [\"{p}\"]\n\
             seed = \"test-node\"\nmax_staleness = \"6s\"\nmax_backoff = \"2s\"\n",
            p = stack.private.host()
        )
    });
    let cfg = node.config.clone();
    let private = node.private();
    let channel = format!("{private}/pullgate/bundles:prod");

    // Status through the admin API: the sync is there (the channel is still empty).
    let s = node.status_json();
    assert_eq!(s["sync"]["source"], channel.as_str(), "{s}");
    assert_eq!(
        s["sync"]["position"].as_u64(),
        Some(pullgate::policy::rollout::position(ISSUER, b"test-node").into())
    );

    // Published to the channel: the daemon takes it up, audits and counts it.
    let publish = |bundle: &std::path::Path| {
        cli_ok([
            "bundle".as_ref(),
            "publish".as_ref(),
            bundle.as_os_str(),
            "--to".as_ref(),
            channel.as_ref(),
            "--trust".as_ref(),
            node.keys.trust.as_os_str(),
            "--plain-http".as_ref(),
            private.as_ref(),
        ])
    };
    let from_channel = |r: &Value| {
        r["source"]
            .as_str()
            .is_some_and(|s| s.starts_with(&format!("{private}/pullgate/bundles@sha256:")))
    };
    let v2 = node
        .keys
        .sign(&standard_bundle(&node.stack, &node.fx, 2), "bundle-v2");
    publish(&v2);
    node.wait_for_bundle(2);
    // The bundle is in force before the audit record, the sync's status and its counter are
    // written: each is waited for (a bound, not a timing).
    let settle = Duration::from_secs(10);
    support::process::wait_for("the audit record of the synced install", settle, || {
        node.audit()
            .iter()
            .any(|r| r["kind"] == "bundle_installed" && r["version"] == 2 && from_channel(r))
            .then_some(())
    });
    support::process::wait_for("the sync's status", settle, || {
        let s = node.status_json();
        (s["sync"]["synced"]["version"] == 2).then_some(())
    });
    support::process::wait_for("the sync's counter", settle, || {
        let (_, metrics) = http_get(node.metrics_port, "/metrics");
        metrics
            .contains("pullgate_bundle_sync_rounds_total{result=\"installed\"} 1")
            .then_some(())
    });
    let text = cli_ok(["status".as_ref(), "--config".as_ref(), cfg.as_os_str()]);
    assert!(
        text.stdout
            .contains(&format!("sync:      OK from {channel}")),
        "{text}"
    );

    // InstallBundle: a synchronous answer from the daemon, installed or rejected with the reason.
    let v3 = node
        .keys
        .sign(&standard_bundle(&node.stack, &node.fx, 3), "bundle-v3");
    let out = node.install(&v3);
    assert!(
        out.success() && out.stdout.contains("the daemon now enforces v3"),
        "{out}"
    );
    assert_eq!(node.status_json()["bundle"]["version"], 3);
    let out = node.install(&node.bundle_v1.clone());
    assert!(!out.success(), "{out}");
    assert!(
        out.stderr.contains("rejected by the daemon (rollback)"),
        "{out}"
    );
    assert!(node.audit().iter().any(|r| r["kind"] == "bundle_rejected"
        && r["reason"] == "rollback"
        && r["source"] == "admin API"));

    // The channel moves to another v3: newer than the channel's v2, not than the installed v3. The
    // sync rejects it (rollback), audits it with the channel and digest, counts it, and v3 stays.
    let mut other = standard_bundle(&node.stack, &node.fx, 3);
    other.images.pop();
    publish(&node.keys.sign(&other, "bundle-v3-other"));
    support::process::wait_for(
        "the sync's rejection in the audit log",
        Duration::from_secs(15),
        || {
            node.audit()
                .iter()
                .any(|r| {
                    r["kind"] == "bundle_rejected" && r["reason"] == "rollback" && from_channel(r)
                })
                .then_some(())
        },
    );
    let (_, metrics) = http_get(node.metrics_port, "/metrics");
    assert!(
        metrics.contains("pullgate_bundle_sync_rounds_total{result=\"rejected\"}"),
        "{metrics}"
    );
    assert_eq!(node.status_json()["bundle"]["version"], 3);

    // Explain against the live bundle and mode.
    let ok = cli([
        "explain".as_ref(),
        "--live".as_ref(),
        "--config".as_ref(),
        cfg.as_os_str(),
        "busybox:1.36".as_ref(),
    ]);
    assert!(
        ok.success() && ok.stdout.contains("decision:    allow") && ok.stdout.contains("version 3"),
        "{ok}"
    );
    let no = cli([
        "explain".as_ref(),
        "--live".as_ref(),
        "--config".as_ref(),
        cfg.as_os_str(),
        "quay.io/acme/tools:2.0".as_ref(),
        "--json".as_ref(),
    ]);
    assert_eq!(no.code, Some(1), "{no}");
    let d: Value = serde_json::from_str(&no.stdout).expect("explain JSON");
    assert_eq!(d["decision"], "deny", "{d}");

    // WatchDecisions sees a real decision as it is made (deny-only: the allowed pull is not shown).
    let mut watch = std::process::Command::new(support::Pullgate::binary())
        .args(["watch", "--json", "--deny-only", "--config"])
        .arg(&cfg)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("pullgate watch");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut cri = support::Cri::connect(&node.pullgate_socket()).await;
    // The watcher subscribes asynchronously: repeat the denied pull until it is seen (bounded).
    let mut seen = None;
    for _ in 0..20 {
        cri.pull("busybox:1.36", "default")
            .await
            .expect("allowed pull");
        let denied = cri.pull("quay.io/acme/tools:2.0", "default").await;
        assert!(denied.is_err());
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(500)) {
            seen = Some(line);
            break;
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    let line = seen.expect("pullgate watch showed no decision");
    let rec: Value = serde_json::from_str(&line).expect("a JSON decision");
    assert_eq!(rec["method"], "PullImage", "{rec}");
    assert_eq!(rec["decision"], "deny", "{rec}");
    assert_eq!(rec["image"], "quay.io/acme/tools:2.0", "{rec}");
    assert_eq!(rec["bundle_version"], 3, "{rec}");

    // A caller that is not root: the socket (0600) refuses it...
    let sock = node.stack.dir.path().join("pullgate/admin.sock");
    let mode = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode, 0o600);
    let args = ["status".as_ref(), "--config".as_ref(), cfg.as_os_str()];
    let out = cli_as_nobody(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("permission denied"),
        "{err}"
    );
    // ...and with its mode loosened by mistake, the daemon refuses it by its credentials.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    }
    let out = cli_as_nobody(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("uid 65534 may not use it"),
        "{err}"
    );
    let out = cli_as_nobody(&[
        "explain".as_ref(),
        "--live".as_ref(),
        "--config".as_ref(),
        cfg.as_os_str(),
        "busybox:1.36".as_ref(),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("uid 65534 may not use it"));

    // The registry goes away: the bundle in force stays, and once no round succeeded for
    // max_staleness the daemon says so (readiness, status, metrics).
    node.stack.private.stop();
    let (code, body) = {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (code, body) = http_get(node.metrics_port, "/readyz");
            if code == 503 || Instant::now() > deadline {
                break (code, body);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("bundle sync from") && body.contains("is stale"),
        "{body}"
    );
    let s = node.status_json();
    assert_eq!(
        (s["sync"]["state"].as_str(), s["bundle"]["version"].as_u64()),
        (Some("stale"), Some(3)),
        "{s}"
    );
    let text = cli_ok(["status".as_ref(), "--config".as_ref(), cfg.as_os_str()]);
    assert!(text.stdout.contains("STALE"), "{text}");
    let (_, metrics) = http_get(node.metrics_port, "/metrics");
    assert!(
        metrics.contains("pullgate_bundle_sync_stale 1"),
        "{metrics}"
    );
    // Logged by the first round after the limit passed (rounds back off to at most 2 s here).
    support::process::wait_for("the stale sync logged", Duration::from_secs(10), || {
        node.pullgate_log()
            .contains("BUNDLE SYNC IS STALE")
            .then_some(())
    });
    // Frozen, not open: the bundle in force still refuses what it does not approve.
    let denied = cri.pull("quay.io/acme/tools:2.0", "default").await;
    assert!(denied.is_err(), "{denied:?}");
}
