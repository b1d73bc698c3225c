//! The node's lockdown on real parts (containerd 1.6, loopback Distribution registries, pullgate's
//! binary; see `tests/support/`): the containerd event watcher, `pullgate node check` and its
//! `--write-hosts`, and the shipped Prometheus rules and Grafana dashboard (checked with promtool
//! against the series pullgate really exports).
//!
//! "Within a second" is a functional bound: each detection is polled for with a one-second deadline
//! that starts when the out-of-band command has returned.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::cri::run_as_kubelet;
use support::cri::{host_pod_config, must};
use support::node::{Node, PAYMENTS_NS, standard_bundle};
use support::pullgate::{Pullgate, cli};
use support::stack::{Stack, sbin_path};
use support::{Cri, e2e_enabled, loud};

const WITHIN: Duration = Duration::from_secs(1);

/// The `[lockdown]` section every node here gets: the node check reads the stack's containerd
/// configuration, not the machine's.
fn lockdown_section(stack: &Stack) -> String {
    format!(
        "[lockdown]\ncontainerd_config = \"{}\"\n",
        stack.containerd.config.display()
    )
}

/// `/metrics` of the node's daemon.
fn metrics(node: &Node) -> String {
    let mut s = match TcpStream::connect(("127.0.0.1", node.metrics_port)) {
        Ok(s) => s,
        Err(_) => return String::new(),
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(s, "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body
}

/// The value of one series (`name{labels}` exactly as rendered), if exported.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

fn series(node: &Node, s: &str) -> f64 {
    metric(&metrics(node), s).unwrap_or(-1.0)
}

/// Waits until `f` holds, for at most `limit` (polling every 20 ms); panics with `what`.
#[track_caller]
fn within<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "not within {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Once pullgate's start-up learning pass is over, `ctr pull`s the busybox fixture's mirror copy on
/// containerd's own socket and waits (at most `bound`) until CRI's plugin knows it: (the pinned
/// reference, CRI's image ID).
async fn pull_past_pullgate(node: &Node, bound: Duration) -> (String, String) {
    within("the start-up learning pass", bound, || {
        node.pullgate_log()
            .contains("learned the pod sandboxes and images containerd holds")
            .then_some(())
    });
    let pinned = node.mirror_ref(&node.fx.busybox);
    ctr_ok(node, &["images", "pull", "--plain-http", &pinned]);
    let mut direct = Cri::connect(&node.stack.containerd.socket).await;
    let asked = Instant::now();
    loop {
        if let Some(img) = direct
            .image_status(&pinned)
            .await
            .ok()
            .and_then(|r| r.image)
        {
            return (pinned, img.id);
        }
        assert!(asked.elapsed() < bound, "CRI never took {pinned} in");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts the busybox fixture (image `id`) as kubelet does — by ID, with `busybox:1.36` as the pod
/// spec names it — in a new pod `pod_name` created through pullgate; returns the client, for the
/// clean-up.
async fn start_busybox_as_kubelet(node: &Node, pod_name: &str, id: &str) -> Cri {
    let mut cri = Cri::connect(&node.pullgate_socket()).await;
    let cfg = host_pod_config(pod_name, "default");
    let pod = must("RunPodSandbox", cri.run_pod(&cfg).await);
    must(
        "CreateContainer",
        cri.create_container_as_kubelet(&pod, &cfg, "c", id, "busybox:1.36", &[])
            .await,
    );
    cri
}

/// The lockdown records (`kind`) of the audit log.
fn records(node: &Node, kind: &str) -> Vec<Value> {
    node.audit()
        .into_iter()
        .filter(|r| r["kind"] == kind)
        .collect()
}

fn record_for(node: &Node, kind: &str, name: &str) -> Option<Value> {
    records(node, kind).into_iter().find(|r| r["name"] == name)
}

/// Waits (up to 10 s) until `pullgate_node_images{class}` counts at least `n` images.
fn wait_class_count(node: &Node, what: &str, class: &str, n: f64) {
    let s = format!("pullgate_node_images{{class=\"{class}\"}}");
    within(what, Duration::from_secs(10), || {
        (series(node, &s) >= n).then_some(())
    });
}

/// Asserts that no image was reported as out of band.
fn assert_none_reported(node: &Node, what: &str) {
    let r = records(node, "out_of_band_image");
    assert!(r.is_empty(), "{what} was reported: {r:?}");
}

/// `ctr -n k8s.io ARGS` against the stack's containerd; returns whether it succeeded and its output
/// (an import may lose a race with pullgate removing the image it creates).
fn ctr(node: &Node, args: &[&str]) -> (bool, String) {
    let out = Command::new("ctr")
        .arg("--address")
        .arg(&node.stack.containerd.socket)
        .args(["-n", "k8s.io"])
        .args(args)
        .env("PATH", sbin_path())
        .output()
        .expect("run ctr");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn ctr_ok(node: &Node, args: &[&str]) -> String {
    let (ok, out) = ctr(node, args);
    assert!(ok, "ctr {args:?} failed: {out}");
    out
}

/// The image names containerd's CRI namespace holds.
fn image_names(node: &Node) -> Vec<String> {
    ctr_ok(node, &["images", "ls", "-q"])
        .lines()
        .map(str::to_string)
        .collect()
}

/// Builds a fresh image and imports it past pullgate as `name` (`ctr images import`).
fn import(node: &Node, name: &str, marker: &str) {
    import_archive(node, &archive(node, name, marker));
}

/// Builds a fresh image and writes it as an archive to import as `name`; returns its path.
fn archive(node: &Node, name: &str, marker: &str) -> String {
    let tag = node.stack.images.build_image(marker);
    let tar = node
        .stack
        .dir
        .path()
        .join(format!("{}.tar", marker.replace(' ', "-")));
    node.stack.images.export_docker_archive(&tag, &tar, name);
    tar.to_string_lossy().into_owned()
}

/// `ctr images import` of an [`archive`].
fn import_archive(node: &Node, tar: &str) {
    let snapshotter = node.stack.containerd.snapshotter.clone();
    let (ok, out) = ctr(
        node,
        &["images", "import", "--snapshotter", &snapshotter, tar],
    );
    loud(&format!("ctr import {tar}: ok={ok} {}", out.trim()));
}

fn wait_watching(node: &Node) {
    within(
        "the watcher subscribed and classified containerd's images",
        Duration::from_secs(20),
        || {
            let m = metrics(node);
            (metric(&m, "pullgate_lockdown_watcher_up") == Some(1.0)
                && metric(&m, "pullgate_node_images{class=\"approved\"}").is_some())
            .then_some(())
        },
    );
}

/// A node with `extra` lockdown settings, its watcher running, and busybox:1.36 pulled through
/// pullgate; returns the node and the pinned reference containerd stores.
async fn node_with_a_pull(name: &str, extra: &str) -> (Node, String) {
    let node = Node::start_with(name, "enforce", |s| lockdown_section(s) + extra);
    wait_watching(&node);
    let mut cri = Cri::connect(&node.pullgate_socket()).await;
    cri.pull("busybox:1.36", "default")
        .await
        .unwrap_or_else(|s| panic!("pull through pullgate: {s:?}"));
    let pinned = node.mirror_ref(&node.fx.busybox);
    (node, pinned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_band_images_and_snapshots_are_reported_within_a_second() {
    if !e2e_enabled("out_of_band_images_and_snapshots_are_reported_within_a_second") {
        return;
    }
    // Through pullgate: approved, never reported.
    let (mut node, pinned) = node_with_a_pull("ld-detect", "").await;
    wait_class_count(
        &node,
        "the pull through pullgate classified approved",
        "approved",
        1.0,
    );
    assert_none_reported(&node, "a pull through pullgate");
    assert_eq!(
        series(&node, "pullgate_out_of_band_total{kind=\"image\"}"),
        0.0
    );
    assert!(image_names(&node).contains(&pinned));

    // `ctr pull` of an unapproved image, straight from the "public" registry.
    let nginx = format!("{}/library/nginx:1.25", node.stack.public.host());
    ctr_ok(&node, &["images", "pull", "--plain-http", &nginx]);
    let r = within("ctr pull reported", WITHIN, || {
        record_for(&node, "out_of_band_image", &nginx)
    });
    assert_eq!(r["class"], "unapproved", "{r}");
    assert_eq!(r["namespace"], "k8s.io");
    assert_eq!(r["digests"][0], node.fx.nginx.digest.as_str(), "{r}");
    assert_eq!(r["detected"], "event");
    assert!(
        r["method"].is_null(),
        "lockdown records are not decision lines: {r}"
    );
    assert!(series(&node, "pullgate_out_of_band_total{kind=\"image\"}") >= 1.0);

    // `ctr pull` of approved content under its public name: approved, but past pullgate.
    let busybox = format!("{}/library/busybox:1.36", node.stack.public.host());
    ctr_ok(&node, &["images", "pull", "--plain-http", &busybox]);
    let r = within("ctr pull of approved content reported", WITHIN, || {
        record_for(&node, "out_of_band_image", &busybox)
    });
    assert_eq!(r["class"], "out_of_band", "{r}");
    assert_eq!(r["digests"][0], node.fx.busybox.digest.as_str());

    // `ctr import`.
    let evil = "quay.io/evil/miner:1";
    import(&node, evil, "lockdown detect evil");
    let r = within("ctr import reported", WITHIN, || {
        record_for(&node, "out_of_band_image", evil)
    });
    assert_eq!(r["class"], "unapproved", "{r}");
    assert_eq!(r["action"], "reported", "removal is off by default: {r}");
    assert!(image_names(&node).iter().any(|n| n == evil));
    assert!(
        node.pullgate_log()
            .contains("entered containerd past pullgate")
            || node.pullgate_log().contains("is not approved"),
        "no warning in pullgate's log"
    );

    // A snapshot committed by hand, not unpacked.
    let s = node.stack.containerd.snapshotter.clone();
    ctr_ok(
        &node,
        &[
            "snapshots",
            "--snapshotter",
            &s,
            "prepare",
            "planted-active",
        ],
    );
    ctr_ok(
        &node,
        &[
            "snapshots",
            "--snapshotter",
            &s,
            "commit",
            "planted",
            "planted-active",
        ],
    );
    let r = within("hand-made snapshot reported", WITHIN, || {
        record_for(&node, "out_of_band_snapshot", "planted")
    });
    assert_eq!(r["snapshot_key"], "planted-active", "{r}");
    assert_eq!(
        series(&node, "pullgate_out_of_band_total{kind=\"snapshot\"}"),
        1.0
    );
    assert!(
        records(&node, "out_of_band_snapshot").len() == 1,
        "the unpacks of the pulls and imports above must not be reported: {:?}",
        records(&node, "out_of_band_snapshot")
    );

    let status = node.status_json();
    let images = &status["lockdown"]["watcher"]["images"];
    assert!(images["unapproved"].as_u64() >= Some(2), "{status}");
    // The approved busybox now also has a name made past pullgate: the image counts as out of band.
    assert_eq!(images["out_of_band"].as_u64(), Some(1), "{status}");
    assert!(
        status["lockdown"]["watcher"]["connected"] == true,
        "{status}"
    );

    // containerd restarts: the watcher reports the gap and watches again.
    node.stack.containerd.stop_daemon();
    within("the watcher noticed", Duration::from_secs(10), || {
        (series(&node, "pullgate_lockdown_watcher_up") == 0.0).then_some(())
    });
    node.stack.containerd.start_again();
    let gap = within("the gap reported", Duration::from_secs(20), || {
        records(&node, "event_gap").into_iter().next()
    });
    assert!(
        gap["gap_from"].is_string() && gap["gap_to"].is_string(),
        "{gap}"
    );
    wait_watching(&node);
    assert_eq!(series(&node, "pullgate_lockdown_event_gaps_total"), 1.0);
    let after = "quay.io/evil/miner:2";
    import(&node, after, "lockdown after restart");
    let r = within("an import after the restart reported", WITHIN, || {
        record_for(&node, "out_of_band_image", after)
    });
    assert_eq!(r["class"], "unapproved");
    // Re-reading after the gap reported nothing twice.
    assert_eq!(
        records(&node, "out_of_band_image")
            .iter()
            .filter(|r| r["name"] == nginx)
            .count(),
        1
    );
}

/// Approved content that reaches containerd past pullgate (here `ctr pull` of the mirror copy) is
/// proven when the watcher sees CRI's plugin take it in, so its first start — in a pod created
/// through pullgate, which pullgate learns from `RunPodSandbox` — asks containerd nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approved_image_that_arrives_past_pullgate_starts_without_a_lookup() {
    if !e2e_enabled("an_approved_image_that_arrives_past_pullgate_starts_without_a_lookup") {
        return;
    }
    // A functional bound, not a timing one.
    const ARRIVAL: Duration = Duration::from_secs(10);
    let node = Node::start_with("ld-learn", "enforce", lockdown_section);
    wait_watching(&node);
    // The start-up pass is over: only the watcher's hand-over can prove what arrives now.
    let (_, id) = pull_past_pullgate(&node, ARRIVAL).await;
    within("the arrival proven", ARRIVAL, || {
        node.pullgate_log()
            .lines()
            .any(|l| l.contains("proved an arrived image") && l.contains(&id))
            .then_some(())
    });
    let mut cri = start_busybox_as_kubelet(&node, "learned", &id).await;
    assert_eq!(
        (
            series(&node, "pullgate_start_lookups_total{kind=\"sandbox\"}"),
            series(&node, "pullgate_start_lookups_total{kind=\"image\"}")
        ),
        (0.0, 0.0),
        "the pod and the image were known before the start"
    );
    let starts = audited_starts(&node);
    assert!(
        starts.len() == 1
            && starts[0]["decision"] == "allow"
            && starts[0]["pod_name"] == "learned"
            && starts[0]["digest"] == node.fx.busybox.digest.as_str(),
        "the start was allowed and audited: {starts:?}"
    );
    cri.remove_all_pods().await;
}

/// The audit records of container starts.
fn audited_starts(node: &Node) -> Vec<Value> {
    node.audit()
        .into_iter()
        .filter(|r| r["method"] == "CreateContainer")
        .collect()
}

/// With the watcher off, an approved image that reaches containerd past pullgate is unknown at its
/// first start. kubelet names it by ID along with the pod spec's name (`user_specified_image`); the
/// manifest that name pins through the bundle is read from containerd's content store, and proves
/// it without asking CRI for the image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlearned_image_is_proven_from_the_name_kubelet_sends() {
    if !e2e_enabled("an_unlearned_image_is_proven_from_the_name_kubelet_sends") {
        return;
    }
    // A functional bound, not a timing one.
    const BOUND: Duration = Duration::from_secs(10);
    let node = Node::start_with("ld-hint", "enforce", |stack| {
        format!(
            "[lockdown]\nwatch = false\ncontainerd_config = \"{}\"\n",
            stack.containerd.config.display()
        )
    });
    let (pinned, id) = pull_past_pullgate(&node, BOUND).await;
    let mut cri = start_busybox_as_kubelet(&node, "hinted", &id).await;
    assert!(
        node.pullgate_log().lines().any(|l| l
            .contains("proved a start's image from the manifest its name pins")
            && l.contains(&id)
            && l.contains(&pinned)),
        "the start read the manifest busybox:1.36 pins"
    );
    assert_eq!(
        series(&node, "pullgate_start_lookups_total{kind=\"image\"}"),
        1.0
    );
    let starts = audited_starts(&node);
    assert!(
        starts.len() == 1 && starts[0]["decision"] == "allow",
        "the start was allowed and audited: {starts:?}"
    );
    cri.remove_all_pods().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_band_images_are_removed_unless_in_use_and_classified_at_start() {
    if !e2e_enabled("out_of_band_images_are_removed_unless_in_use_and_classified_at_start") {
        return;
    }
    let (mut node, pinned) = node_with_a_pull("ld-remove", "remove_out_of_band = true\n").await;

    // While pullgate watches: removed as soon as it appears.
    let a = "quay.io/evil/a:1";
    import(&node, a, "lockdown remove a");
    let r = within("the import removed", WITHIN, || {
        record_for(&node, "out_of_band_image", a).filter(|r| r["action"] == "removed")
    });
    assert_eq!(r["class"], "unapproved");
    // CRI's plugin may re-create a name it was handling as it was removed; it is removed again.
    let names = within(&format!("{a} gone from containerd"), WITHIN, || {
        let names = image_names(&node);
        (!names.iter().any(|n| n == a)).then_some(names)
    });
    assert!(
        names.contains(&pinned),
        "the approved image must stay: {names:?}"
    );

    // While pullgate is down: two imports, one of them used by a container.
    node.stack.pullgate.as_mut().expect("pullgate").stop();
    let (b, c) = ("quay.io/evil/b:1", "quay.io/evil/c:1");
    import(&node, b, "lockdown remove b");
    import(&node, c, "lockdown remove c");
    let s = node.stack.containerd.snapshotter.clone();
    ctr_ok(
        &node,
        &["containers", "create", "--snapshotter", &s, c, "uses-c"],
    );
    let tmp = node.stack.dir.path().to_path_buf();
    node.stack.pullgate = Some(Pullgate::start_configured(
        &tmp,
        &node.config,
        &node.stack.containerd.socket,
    ));
    let rb = within("b removed at start", Duration::from_secs(20), || {
        record_for(&node, "out_of_band_image", b)
    });
    assert_eq!(
        (rb["detected"].as_str(), rb["action"].as_str()),
        (Some("startup"), Some("removed")),
        "{rb}"
    );
    let rc = within("c kept at start", Duration::from_secs(20), || {
        record_for(&node, "out_of_band_image", c)
    });
    assert_eq!(rc["action"], "kept_in_use", "{rc}");
    // As above, CRI's plugin may re-create a name it was handling as it was removed.
    let names = within(&format!("{b} gone from containerd"), WITHIN, || {
        let names = image_names(&node);
        (!names.iter().any(|n| n == b)).then_some(names)
    });
    assert!(names.iter().any(|n| n == c), "{names:?}");
    assert!(names.contains(&pinned), "{names:?}");
    // The classification at start: the approved pull (by its private-registry name) is approved.
    wait_watching(&node);
    let m = metrics(&node);
    assert!(
        metric(&m, "pullgate_node_images{class=\"approved\"}") >= Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "pullgate_node_images{class=\"unapproved\"}"),
        Some(1.0),
        "only c: {m}"
    );
    assert!(
        metric(
            &m,
            "pullgate_out_of_band_removals_total{result=\"removed\"}"
        ) >= Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "pullgate_out_of_band_removals_total{result=\"in_use\"}"),
        Some(1.0),
        "{m}"
    );
}

/// The watcher has no pod, so an image is approved for it when the bundle approves it for any
/// scope (which pod may run it is decided at the start): a first-party prefix of one program and a
/// public image of that program, pulled through pullgate, are neither reported nor removed, and run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_approved_for_one_scope_are_approved_for_the_watcher() {
    if !e2e_enabled("images_approved_for_one_scope_are_approved_for_the_watcher") {
        return;
    }
    let node = Node::start_with("ld-scoped", "enforce", |s| {
        lockdown_section(s) + "remove_out_of_band = true\n"
    });
    wait_watching(&node);
    let prefix = format!("{}/apps/payments/", node.private());
    let mut v2 = standard_bundle(&node.stack, &node.fx, 2);
    v2.first_party
        .push((prefix.clone(), "corp/payments".to_string()));
    let out = node.install(&node.keys.sign(&v2, "first-party-v2"));
    assert!(out.success(), "{out}");
    node.wait_for_bundle(2);
    node.stack
        .images
        .push_image(&node.stack.private, "apps/payments/api:1", "first party");
    let api = format!("{prefix}api:1");
    let paytool = "docker.io/acme/payments-tool:1.0";
    let mut cri = Cri::connect(&node.pullgate_socket()).await;
    for image in [api.as_str(), paytool] {
        cri.pull(image, PAYMENTS_NS)
            .await
            .unwrap_or_else(|s| panic!("pull {image} through pullgate: {s:?}"));
    }
    wait_class_count(&node, "both pulls classified approved", "approved", 2.0);
    assert_eq!(
        series(&node, "pullgate_node_images{class=\"unapproved\"}"),
        0.0
    );
    assert_none_reported(&node, "an image approved for one scope");
    let names = image_names(&node);
    assert!(
        names.contains(&api) && names.contains(&node.mirror_ref(&node.fx.paytool)),
        "{names:?}"
    );
    for (pod, image) in [("api", api.as_str()), ("paytool", paytool)] {
        let code = run_as_kubelet(&mut cri, pod, PAYMENTS_NS, image, &["/bin/true"]).await;
        assert_eq!(code.unwrap_or_else(|s| panic!("run {image}: {s:?}")), 0);
    }
}

/// A pull through pullgate explains the content containerd pulled, not the name: other content
/// imported under the name of a recent (warn-mode) pull is reported; the pull itself, its
/// `repo@digest` name and CRI's ID alias are not. Content reported, then deleted, and imported again
/// is reported again. A pull that failed explains nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recent_pull_does_not_explain_other_content_under_its_name() {
    if !e2e_enabled("a_recent_pull_does_not_explain_other_content_under_its_name") {
        return;
    }
    let node = Node::start_with("ld-name-reuse", "warn", lockdown_section);
    wait_watching(&node);
    let name = "docker.io/library/nginx:1.25";
    // Made first, so the import follows the pull closely.
    let tar = archive(&node, name, "lockdown reused name");
    let mut cri = Cri::connect(&node.pullgate_socket()).await;
    cri.pull("nginx:1.25", "default")
        .await
        .unwrap_or_else(|s| panic!("warn-mode pull through pullgate: {s:?}"));
    wait_class_count(&node, "the warned pull classified", "unapproved", 1.0);
    assert_none_reported(&node, "a warn-mode pull (past its warn decision)");

    import_archive(&node, &tar);
    let r = within("the import under the pull's name reported", WITHIN, || {
        record_for(&node, "out_of_band_image", name)
    });
    assert_eq!(r["class"], "unapproved", "{r}");
    assert_ne!(r["digests"][0], node.fx.nginx.digest.as_str(), "{r}");
    assert_eq!(records(&node, "out_of_band_image").len(), 1);

    // Gone, then back: a new arrival.
    let unapproved = || series(&node, "pullgate_node_images{class=\"unapproved\"}");
    let before = within("the import counted", WITHIN, || {
        let n = unapproved();
        (n >= 2.0).then_some(n)
    });
    ctr_ok(&node, &["images", "rm", name]);
    within("the watcher saw it go", Duration::from_secs(10), || {
        (unapproved() == before - 1.0).then_some(())
    });
    import_archive(&node, &tar);
    within(
        "the same content imported again reported again",
        WITHIN,
        || (records(&node, "out_of_band_image").len() == 2).then_some(()),
    );

    // A pull that failed brought nothing: it explains nothing stored under its name afterwards.
    let missing = "docker.io/library/nginx:0.0-missing";
    let failed = cri.pull("nginx:0.0-missing", "default").await;
    assert!(failed.is_err(), "{failed:?}");
    import(&node, missing, "lockdown failed pull");
    let r = within(
        "the import under a failed pull's name reported",
        WITHIN,
        || record_for(&node, "out_of_band_image", missing),
    );
    assert_eq!(r["class"], "unapproved", "{r}");
}

/// A `hosts.toml` for `dir/name`.
fn write_hosts(dir: &Path, name: &str, text: &str) {
    std::fs::create_dir_all(dir.join(name)).unwrap();
    std::fs::write(dir.join(name).join("hosts.toml"), text).unwrap();
}

fn node_check(node: &Node, extra: &[&str]) -> (Option<i32>, String, Value) {
    let mut args = vec![
        "node".to_string(),
        "check".into(),
        "--config".into(),
        node.config.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = cli(&args);
    let json = if extra.contains(&"--json") {
        serde_json::from_str(out.stdout.lines().last().unwrap_or(""))
            .unwrap_or_else(|e| panic!("node check JSON: {e}\n{out}"))
    } else {
        Value::Null
    };
    (out.code, out.text(), json)
}

fn check_of<'a>(report: &'a Value, check: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["check"] == check))
        .unwrap_or_else(|| panic!("no {check} in {report}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_check_finds_upstream_fallback_and_write_hosts_locks_containerd() {
    if !e2e_enabled("node_check_finds_upstream_fallback_and_write_hosts_locks_containerd") {
        return;
    }
    let mut node = Node::start_with("ld-check", "enforce", lockdown_section);
    let (public, private) = (node.stack.public.host(), node.stack.private.host());
    let certs = node.stack.containerd.dir.join("certs.d");
    let tmp = node.stack.dir.path().to_path_buf();
    // A bundle valid for 30 days (the harness's lasts one: the check would flag its expiry).
    let mut spec = support::node::standard_bundle(&node.stack, &node.fx, 2).to_json();
    spec["expires_at"] = (time::OffsetDateTime::now_utc() + time::Duration::days(30))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
        .into();
    let v2 = node.keys.sign_json(&spec, "bundle-v2");
    let out = node.install(&v2);
    assert!(out.success(), "{out}");
    node.wait_for_bundle(2);

    // containerd's own fallback rule, which the check relies on: a mirror and no `server` → when
    // the mirror fails, containerd pulls from the name's own registry.
    let probe = tmp.join("probe-hosts");
    write_hosts(
        &probe,
        &public,
        "[host.\"http://127.0.0.1:1\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
    );
    let mark = node.stack.public.mark();
    let probe_s = probe.display().to_string();
    let (_, out) = ctr(
        &node,
        &[
            "images",
            "pull",
            "--hosts-dir",
            &probe_s,
            &format!("{public}/library/nginx:1.25"),
        ],
    );
    assert!(
        !node.stack.public.requests_since(mark).is_empty(),
        "containerd did not fall back to the upstream registry: {out}"
    );

    // kubelet's configuration file, pointing at pullgate.
    let kubelet = tmp.join("kubelet.yaml");
    std::fs::write(
        &kubelet,
        format!(
            "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n\
             containerRuntimeEndpoint: unix://{0}\nimageServiceEndpoint: \"unix://{0}\"\n",
            node.pullgate_socket().display()
        ),
    )
    .unwrap();
    let kubelet_s = kubelet.display().to_string();

    // The classic mirror set-up for docker.io: the private mirror first, the upstream as `server`.
    write_hosts(
        &certs,
        "docker.io",
        &format!(
            "server = \"http://{public}\"\n[host.\"http://{private}/v2/approved\"]\n  capabilities = [\"pull\", \"resolve\"]\n  override_path = true\n"
        ),
    );
    let (code, text, report) = node_check(&node, &["--json", "--kubelet-config", &kubelet_s]);
    assert_eq!(code, Some(1), "{text}");
    let reg = check_of(&report, "containerd_registry");
    let findings = reg["findings"].to_string();
    assert!(
        findings.contains("docker.io/hosts.toml") && findings.contains(&format!("http://{public}")),
        "the upstream fallback of docker.io is not reported: {reg}"
    );
    assert!(findings.contains("_default"), "{reg}");
    for ok in [
        "kubelet_endpoints",
        "sockets",
        "sandbox_image",
        "policy_mode",
        "forward_non_cri",
        "bundle",
    ] {
        assert_eq!(check_of(&report, ok)["result"], "ok", "{ok}: {report}");
    }
    // The table says the same.
    let (code, table, _) = node_check(&node, &["--kubelet-config", &kubelet_s]);
    assert_eq!(code, Some(1));
    assert!(
        table.contains("FINDING") && table.contains("fix:"),
        "{table}"
    );
    // The daemon ran the same check at start.
    within("the daemon's findings", Duration::from_secs(10), || {
        (series(
            &node,
            "pullgate_lockdown_findings{check=\"containerd_registry\"}",
        ) > 0.0)
            .then_some(())
    });

    // Socket modes.
    use std::os::unix::fs::PermissionsExt;
    let sock = node.pullgate_socket();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (_, _, report) = node_check(&node, &["--json", "--kubelet-config", &kubelet_s]);
    let sockets = check_of(&report, "sockets");
    assert!(
        sockets["findings"].to_string().contains("0666"),
        "{sockets}"
    );
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o660)).unwrap();

    // kubelet pointed at containerd.
    let direct = tmp.join("kubelet-direct.yaml");
    std::fs::write(
        &direct,
        format!(
            "containerRuntimeEndpoint: unix://{}\n",
            node.stack.containerd.socket.display()
        ),
    )
    .unwrap();
    let (_, _, report) = node_check(
        &node,
        &["--json", "--kubelet-config", &direct.display().to_string()],
    );
    let k = check_of(&report, "kubelet_endpoints");
    assert_eq!(
        k["findings"].as_array().map(Vec::len),
        Some(2),
        "runtime and image: {k}"
    );

    // Write the lockdown files; the registry directories the harness made for unmirrored public
    // names (and the public registry itself) would still reach it: they go, `_default` takes over.
    for name in ["gcr.io", "quay.io", "ghcr.io", public.as_str()] {
        std::fs::remove_dir_all(certs.join(name)).unwrap();
    }
    let certs_s = certs.display().to_string();
    let (code, text, _) = node_check(
        &node,
        &[
            "--write-hosts",
            &certs_s,
            "--registry-scheme",
            "http",
            "--kubelet-config",
            &kubelet_s,
        ],
    );
    assert!(
        text.contains(&format!("-server = \"http://{public}\""))
            && text.contains(&format!("+server = \"http://{private}/v2/approved\"")),
        "no diff shown: {text}"
    );
    assert_eq!(code, Some(0), "{text}");
    // The daemon agrees after a reload.
    node.stack.pullgate.as_mut().unwrap().signal(libc::SIGHUP);
    within(
        "the daemon's findings after reload",
        Duration::from_secs(10),
        || {
            (series(
                &node,
                "pullgate_lockdown_findings{check=\"containerd_registry\"}",
            ) == 0.0)
                .then_some(())
        },
    );

    // containerd now pulls public names only from the private registry: through its CRI (as crictl
    // against containerd's socket would) and with ctr using the same directory.
    let (pub_mark, priv_mark) = (node.stack.public.mark(), node.stack.private.mark());
    let mut direct_cri = Cri::connect(&node.stack.containerd.socket).await;
    let denied = direct_cri
        .pull("docker.io/library/nginx:1.25", "default")
        .await;
    assert!(
        denied.is_err(),
        "nginx is not in the private registry: {denied:?}"
    );
    let busybox = format!("docker.io/library/busybox@{}", node.fx.busybox.digest);
    ctr_ok(
        &node,
        &["images", "pull", "--hosts-dir", &certs_s, &busybox],
    );
    let pubs = node.stack.public.requests_since(pub_mark);
    assert!(pubs.is_empty(), "the public registry was asked: {pubs:?}");
    let privs = node.stack.private.requests_since(priv_mark);
    assert!(
        privs
            .iter()
            .any(|r| r.contains("/v2/approved/library/busybox/")),
        "the private mirror was not asked: {privs:?}"
    );
    assert!(
        privs
            .iter()
            .any(|r| r.contains("/v2/approved/library/nginx/")),
        "the CRI pull did not go to the private registry: {privs:?}"
    );
}

// ----------------------------------------------------------------------------------------------
// Prometheus rules and the Grafana dashboard.

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every series name pullgate exports, from its own rendering with every metric populated.
fn exported_names() -> std::collections::BTreeSet<String> {
    use pullgate::node::metrics::{BundleGauge, Metrics, method_index};
    let m = Metrics::default();
    m.call(method_index("/runtime.v1.ImageService/PullImage"), Some(0));
    m.upstream_latency(
        method_index("/runtime.v1.ImageService/PullImage"),
        Duration::from_millis(1),
    );
    m.decision("deny", "not_in_bundle");
    m.bundle_install("installed", "ok");
    m.audit_error();
    m.set_sandbox_image_approved(true);
    m.set_node_images([1, 2, 3]);
    m.out_of_band(0);
    m.event_gap();
    m.set_watcher_up(true);
    m.out_of_band_removal("removed");
    m.set_lockdown_findings([("sockets", 1, false)]);
    m.sync.start(0, Duration::from_secs(60));
    m.sync.round("failed", Some("unreachable"));
    m.sync.set_last_success(10);
    let text = m.render(
        1000,
        Some(BundleGauge {
            version: 1,
            issued_unix: 0,
            expires_unix: 2000,
            next_exception_expiry_unix: Some(1500),
        }),
        true,
    );
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or("").to_string())
        .collect()
}

/// The `pullgate_…` names a file refers to.
fn referenced_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("pullgate_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        // A name inside a longer identifier (e.g. `job="pullgate_x"` is not a series) is skipped
        // unless it starts the identifier.
        let before = rest[..i].chars().last();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    out
}

fn promtool(args: &[&str]) -> (bool, String) {
    let bin = support::which("promtool").unwrap_or_else(|| {
        panic!(
            "promtool is missing (Debian package `prometheus`; scripts/install-deps.sh installs it)"
        )
    });
    let out = Command::new(bin).args(args).output().expect("run promtool");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn alert_rules_pass_promtool_and_use_only_exported_series() {
    let rules = repo().join("deploy/prometheus/pullgate.rules.yml");
    let tests = repo().join("deploy/prometheus/pullgate.rules.test.yml");
    let (ok, out) = promtool(&["check", "rules", &rules.display().to_string()]);
    assert!(ok, "promtool check rules:\n{out}");
    let (ok, out) = promtool(&["test", "rules", &tests.display().to_string()]);
    assert!(ok, "promtool test rules:\n{out}");
    let exported = exported_names();
    for name in [
        "pullgate_lockdown_findings",
        "pullgate_out_of_band_total",
        "pullgate_node_images",
        "pullgate_bundle_sync_failures_total",
        "pullgate_bundle_sync_stale",
    ] {
        assert!(exported.contains(name), "{name} not rendered: {exported:?}");
    }
    for file in [
        &rules,
        &tests,
        &repo().join("deploy/grafana/pullgate-dashboard.json"),
    ] {
        let text = std::fs::read_to_string(file).unwrap();
        let known = |n: &str| {
            exported.contains(n)
                || ["_bucket", "_sum", "_count"].iter().any(|s| {
                    n.strip_suffix(s).is_some_and(|b| {
                        exported.iter().any(|e| e.starts_with(b) && e.ends_with(s))
                    })
                })
        };
        let unknown: Vec<String> = referenced_names(&text)
            .into_iter()
            .filter(|n| !known(n))
            .collect();
        assert!(
            unknown.is_empty(),
            "{} refers to series pullgate does not export: {unknown:?} (exported: {exported:?})",
            file.display()
        );
    }
}

#[test]
fn the_dashboard_is_grafana_json_with_a_panel_per_concern() {
    let text =
        std::fs::read_to_string(repo().join("deploy/grafana/pullgate-dashboard.json")).unwrap();
    let d: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert!(d["title"].is_string() && d["uid"].is_string());
    let panels = d["panels"].as_array().expect("panels");
    let exprs: String = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect::<Vec<_>>()
        .join("\n");
    for needle in [
        "pullgate_decisions_total",
        "pullgate_bundle_expiry_seconds",
        "pullgate_upstream_up",
        "pullgate_node_images",
        "pullgate_out_of_band_total",
        "pullgate_lockdown_findings",
        "pullgate_audit_errors_total",
    ] {
        assert!(exprs.contains(needle), "no panel queries {needle}");
    }
}
