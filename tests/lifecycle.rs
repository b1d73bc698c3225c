//! Bundle format 2 on a real node (containerd 1.6, registries on loopback, pullgate in front, see
//! `tests/support/node.rs`): a deprecated image runs and is audited as `deprecated`; a sunset image is
//! denied with the replacement named; an exception lets a single-scanned image run until it expires;
//! a project that denies a licence cannot run an image the organisation approved under it; and
//! `pullgate bundle what-if` reports exactly the running containers a new bundle would break.
//!
//! Needs root and the Debian packages of `scripts/install-deps.sh`; `PULLGATE_SKIP_E2E=1` skips them
//! loudly, and a missing prerequisite fails them.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::cri::{assert_status, host_pod_config, must};
use support::node::{Node, PAYMENTS_NS, SEARCH_NS, standard_bundle};
use support::pullgate::cli;
use support::{Cri, e2e_enabled};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tonic::{Code, Status};

fn t(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).expect("format time")
}

#[track_caller]
fn audited(node: &Node, method: &str, image: &str, reason: &str) {
    let recs = node.audit_for(method, image);
    assert!(
        recs.iter().any(|r| r["reason"] == reason),
        "no audit record {method} {image} with reason {reason}: {recs:?}"
    );
}

/// A fake digest (for approved tags that only need to exist in the bundle).
fn fake(n: u8) -> String {
    format!("sha256:{}", format!("{n:02x}").repeat(32))
}

/// The node's standard bundle as format 2: two scanners and a licence for every image, and `edit`.
fn format_2(node: &Node, version: u64, edit: impl FnOnce(&mut Value)) -> Value {
    let mut v = standard_bundle(&node.stack, &node.fx, version).to_json();
    v["format"] = json!(2);
    for img in v["images"].as_array_mut().unwrap() {
        let first = img["provenance"]["scans"][0].clone();
        let mut second = first.clone();
        second["scanner"] = json!("grype");
        second["version"] = json!("0.86.0");
        img["provenance"]["scans"] = json!([first, second]);
    }
    edit(&mut v);
    v
}

fn image_index(v: &Value, source: &str) -> usize {
    v["images"]
        .as_array()
        .unwrap()
        .iter()
        .position(|i| i["source"] == source)
        .unwrap_or_else(|| panic!("{source} is not in the bundle"))
}

/// Pod in `ns` running `image` (an ID or reference, named `user_image` in the pod spec) with
/// `command`, started and left running; returns (pod, container).
async fn start_running(
    cri: &mut Cri,
    pod_name: &str,
    ns: &str,
    user_image: &str,
) -> Result<(String, String), Status> {
    let id = cri
        .image_status(user_image)
        .await?
        .image
        .ok_or_else(|| Status::not_found(format!("{user_image} is not on the node")))?
        .id;
    let cfg = host_pod_config(pod_name, ns);
    let pod = cri.run_pod(&cfg).await?;
    let c = cri
        .create_container_as_kubelet(&pod, &cfg, "main", &id, user_image, &["sleep", "600"])
        .await?;
    cri.start_container(&c).await?;
    Ok((pod, c))
}

/// Creates a container from `user_image` (present on the node) in a new pod in `ns`, as kubelet
/// does; the pod is removed again.
async fn create_in(
    cri: &mut Cri,
    pod_name: &str,
    ns: &str,
    user_image: &str,
) -> Result<String, Status> {
    let id = cri
        .image_status(user_image)
        .await?
        .image
        .ok_or_else(|| Status::not_found(format!("{user_image} is not on the node")))?
        .id;
    let cfg = host_pod_config(pod_name, ns);
    let pod = cri.run_pod(&cfg).await?;
    let r = cri
        .create_container_as_kubelet(&pod, &cfg, "main", &id, user_image, &["true"])
        .await;
    let _ = cri.remove_pod(&pod).await;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deprecation_sunset_exception_and_licence_on_a_real_node() {
    if !e2e_enabled("deprecation_sunset_exception_and_licence_on_a_real_node") {
        return;
    }
    let node = Node::start("lifecycle", "enforce");
    let mut cri = Cri::connect(&node.pullgate_socket()).await;
    let fx = node.fx.clone();
    // Under the format 1 bundle: payments-tool is pulled for checkout (it is on the node from now on).
    must(
        "pull payments-tool under v1",
        cri.pull("docker.io/acme/payments-tool:1.0", PAYMENTS_NS)
            .await,
    );

    let now = OffsetDateTime::now_utc();
    // Long enough for the steps below on a slow machine; the test waits for it further down.
    let expires = now + time::Duration::seconds(30);
    let v2 = format_2(&node, 2, |v| {
        let bb = image_index(v, "docker.io/library/busybox");
        let pay = image_index(v, "docker.io/acme/payments-tool");
        // busybox 1.36: deprecated an hour ago, replacement 1.37.
        v["images"][bb]["tags"] = json!({
            "1.36": {"digest": fx.busybox.digest, "deprecated_at": t(now - time::Duration::hours(1)),
                     "sunset_at": t(now + time::Duration::days(30)), "replacement": "1.37"},
            "1.37": fake(0x37),
        });
        // busybox 1.35: approved with a single scanner (format 2 needs two): only an exception runs it.
        let mut old = v["images"][bb].clone();
        old["tags"] = json!({"1.35": fx.busybox_old.digest});
        old["scope"] = json!("corp/search");
        let single = old["provenance"]["scans"][0].clone();
        old["provenance"]["scans"] = json!([single]);
        v["images"].as_array_mut().unwrap().push(old);
        // payments-tool 1.0: sunset a minute ago, replacement 1.1.
        v["images"][pay]["provenance"]["license"] = json!("MIT");
        v["images"][pay]["tags"] = json!({
            "1.0": {"digest": fx.paytool.digest, "sunset_at": t(now - time::Duration::minutes(1)), "replacement": "1.1"},
            "1.1": fake(0x11),
        });
        // checkout denies GPL-2.0-only, the licence the organisation approved busybox under.
        v["governance"]["programs"][0]["projects"][0]["rules"] =
            json!({"licenses": {"deny": ["GPL-2.0-only"]}});
        // 1.34 names the same image through an exception alone (no approval binds that tag).
        v["exceptions"] = json!([{
            "source": "docker.io/library/busybox", "digest": fx.busybox_old.digest, "tag": "1.35",
            "scope": "corp/search/index", "expires_at": t(expires), "ticket": "SEC-77",
            "reason": "second scan pending", "approved_by": "alice@corp.example"}, {
            "source": "docker.io/library/busybox", "digest": fx.busybox_old.digest, "tag": "1.34",
            "scope": "corp/search", "expires_at": t(expires), "ticket": "SEC-77",
            "reason": "second scan pending", "approved_by": "alice@corp.example"}]);
    });
    let path = node.keys.sign_json(&v2, "bundle-v2");
    let out = node.install(&path);
    assert!(out.success(), "install v2: {out}");
    node.wait_for_bundle(2);

    // Exception: the single-scanned busybox 1.35 is pulled (from the mirror, by digest) and runs.
    must(
        "pull busybox:1.35 by exception",
        cri.pull("busybox:1.35", SEARCH_NS).await,
    );
    audited(&node, "PullImage", "busybox:1.35", "exception");
    let c = must(
        "create busybox:1.35 by exception",
        create_in(&mut cri, "exc", SEARCH_NS, "busybox:1.35").await,
    );
    assert!(!c.is_empty());
    audited(&node, "CreateContainer", "busybox:1.35", "exception");
    // A tag allowed only through the exception names the image it pulled, as an approved tag does:
    // kubelet's `ImageStatus` finds it (and does not pull it again for every pod).
    must(
        "pull busybox:1.34 by exception",
        cri.pull("busybox:1.34", SEARCH_NS).await,
    );
    let found = must(
        "ImageStatus busybox:1.34",
        cri.image_status("busybox:1.34").await,
    );
    let image = found
        .image
        .expect("busybox:1.34 is found by its exception's tag");
    assert!(
        image
            .repo_tags
            .iter()
            .any(|t| t == "docker.io/library/busybox:1.34"),
        "{:?}",
        image.repo_tags
    );
    // Outside the exception's scope it stays denied for its scan rule.
    assert_status(
        "busybox:1.35 in checkout",
        cri.pull("busybox:1.35", PAYMENTS_NS).await,
        Code::PermissionDenied,
        &["corp/search"],
    );

    // Deprecated: busybox 1.36 is pulled and runs; the audit lines say deprecated.
    let pulled = cri.pull("busybox:1.36", SEARCH_NS).await;
    must("pull deprecated busybox:1.36", pulled);
    audited(&node, "PullImage", "busybox:1.36", "deprecated");
    let (pod, c) = must(
        "start deprecated busybox:1.36",
        start_running(&mut cri, "dep", SEARCH_NS, "busybox:1.36").await,
    );
    audited(&node, "CreateContainer", "busybox:1.36", "deprecated");
    let rec = node.audit_for("CreateContainer", "busybox:1.36");
    assert!(
        rec.iter().any(|r| r["message"]
            .as_str()
            .unwrap_or("")
            .contains("docker.io/library/busybox:1.37")),
        "{rec:?}"
    );
    let status = node.status_json();
    let starts = status["lifecycle_starts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        starts.iter().any(|s| s["image"] == "busybox:1.36"
            && s["reason"] == "deprecated"
            && s["replacement"] == "1.37"),
        "status lacks the deprecated start: {starts:?}"
    );
    assert_eq!(
        status["exceptions"]["active"][0]["ticket"], "SEC-77",
        "{status}"
    );
    assert_eq!(
        status["exceptions"]["expiring_soon"][0]["ticket"], "SEC-77",
        "{status}"
    );
    let _ = cri.remove_pod(&pod).await;
    let _ = c;

    // Licence: checkout denies GPL-2.0-only; the organisation approved busybox 1.36 under it.
    assert_status(
        "pull busybox:1.36 in checkout",
        cri.pull("busybox:1.36", PAYMENTS_NS).await,
        Code::PermissionDenied,
        &["GPL-2.0-only", "corp/payments/checkout"],
    );
    audited(&node, "PullImage", "busybox:1.36", "license_not_allowed");
    assert_status(
        "start busybox:1.36 in checkout",
        create_in(&mut cri, "lic", PAYMENTS_NS, "busybox:1.36").await,
        Code::PermissionDenied,
        &["GPL-2.0-only"],
    );

    // Sunset: payments-tool 1.0 is on the node, but starts are denied naming the replacement and date.
    let msg = assert_status(
        "start sunset payments-tool:1.0",
        create_in(
            &mut cri,
            "sun",
            PAYMENTS_NS,
            "docker.io/acme/payments-tool:1.0",
        )
        .await,
        Code::PermissionDenied,
        &["docker.io/acme/payments-tool:1.1", "sunset"],
    );
    assert!(msg.contains(&t(now - time::Duration::minutes(1))), "{msg}");
    assert_status(
        "pull sunset payments-tool:1.0",
        cri.pull("docker.io/acme/payments-tool:1.0", PAYMENTS_NS)
            .await,
        Code::PermissionDenied,
        &["docker.io/acme/payments-tool:1.1"],
    );
    audited(
        &node,
        "CreateContainer",
        "docker.io/acme/payments-tool:1.0",
        "sunset",
    );

    // The exception expires (a few seconds from now): the same start is denied, naming the ticket.
    let wait = expires - OffsetDateTime::now_utc();
    assert!(
        wait < time::Duration::seconds(35),
        "the exception's expiry is {wait} away"
    );
    if wait.is_positive() {
        tokio::time::sleep(Duration::try_from(wait).unwrap() + Duration::from_millis(500)).await;
    }
    assert_status(
        "start busybox:1.35 after the exception expired",
        create_in(&mut cri, "exc2", SEARCH_NS, "busybox:1.35").await,
        Code::PermissionDenied,
        &["SEC-77", &t(expires)],
    );
    audited(
        &node,
        "CreateContainer",
        "busybox:1.35",
        "exception_expired",
    );
    cri.remove_all_pods().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_if_reports_exactly_the_containers_a_new_bundle_breaks() {
    if !e2e_enabled("what_if_reports_exactly_the_containers_a_new_bundle_breaks") {
        return;
    }
    let node = Node::start("whatif", "enforce");
    let mut cri = Cri::connect(&node.pullgate_socket()).await;
    let fx = node.fx.clone();
    must(
        "pull busybox (search)",
        cri.pull("busybox:1.36", SEARCH_NS).await,
    );
    must(
        "pull payments-tool",
        cri.pull("docker.io/acme/payments-tool:1.0", PAYMENTS_NS)
            .await,
    );
    let (_, keep) = must(
        "start busybox in search",
        start_running(&mut cri, "keep", SEARCH_NS, "busybox:1.36").await,
    );
    let (_, tool) = must(
        "start payments-tool",
        start_running(
            &mut cri,
            "tool",
            PAYMENTS_NS,
            "docker.io/acme/payments-tool:1.0",
        )
        .await,
    );
    let (_, gpl) = must(
        "start busybox in checkout",
        start_running(&mut cri, "gpl", PAYMENTS_NS, "busybox:1.36").await,
    );

    let what_if = |bundle: &std::path::Path, json: bool| {
        let mut args = vec![
            "bundle".as_ref(),
            "what-if".as_ref(),
            bundle.as_os_str(),
            "--config".as_ref(),
            node.config.as_os_str(),
        ];
        if json {
            args.push("--json".as_ref());
        }
        cli(args)
    };

    // v2 drops payments-tool, denies GPL in checkout and deprecates busybox 1.36.
    let now = OffsetDateTime::now_utc();
    let v2 = format_2(&node, 2, |v| {
        let pay = image_index(v, "docker.io/acme/payments-tool");
        v["images"].as_array_mut().unwrap().remove(pay);
        let bb = image_index(v, "docker.io/library/busybox");
        v["images"][bb]["tags"] = json!({
            "1.36": {"digest": fx.busybox.digest, "deprecated_at": t(now - time::Duration::hours(1)), "replacement": "1.37"},
            "1.37": fake(0x37),
        });
        v["governance"]["programs"][0]["projects"][0]["rules"] =
            json!({"licenses": {"deny": ["GPL-2.0-only"]}});
    });
    let path = node.keys.sign_json(&v2, "whatif-v2");
    let started = Instant::now();
    let out = what_if(&path, true);
    let took = started.elapsed();
    assert_eq!(
        out.code,
        Some(1),
        "something running would be denied: {out}"
    );
    let report: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"));
    let kind = |id: &str| {
        report["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .map(|c| c["change"]["kind"].as_str().unwrap_or("").to_owned())
            .unwrap_or_else(|| panic!("container {id} is not in the report: {report}"))
    };
    assert_eq!(kind(&tool), "newly_denied");
    assert_eq!(kind(&gpl), "newly_denied");
    assert_eq!(kind(&keep), "newly_deprecated");
    let broken: Vec<&str> = report["containers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["change"]["kind"] == "newly_denied")
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        broken.len(),
        2,
        "exactly the two broken containers: {report}"
    );
    let gpl_row = report["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == gpl.as_str())
        .unwrap();
    assert_eq!(gpl_row["new"]["reason"], "license_not_allowed");
    assert_eq!(gpl_row["pod"]["namespace"], PAYMENTS_NS);
    assert_eq!(report["denied"], 2);
    eprintln!(
        "what-if over {} containers took {took:?}",
        report["containers"].as_array().unwrap().len()
    );

    // Text: one line per changed container and the summary.
    let out = what_if(&path, false);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stdout.contains("2 newly denied") && out.stdout.contains("1 newly deprecated"),
        "{out}"
    );
    assert!(out.stdout.contains("license_not_allowed"), "{out}");

    // A bundle that keeps everything running: exit 0. Nothing was installed by what-if.
    let v3 = format_2(&node, 3, |_| {});
    let path = node.keys.sign_json(&v3, "whatif-v3");
    let out = what_if(&path, false);
    assert_eq!(out.code, Some(0), "{out}");
    assert!(
        out.stdout.contains("nothing running would be denied"),
        "{out}"
    );
    assert_eq!(node.status_json()["bundle"]["version"], 1);

    // A bundle an install would reject (signed by one administrator only) cannot be checked: 2.
    let lone = node.keys.dir.join("lone.json");
    std::fs::write(&lone, serde_json::to_string(&v3).unwrap()).unwrap();
    let out = cli([
        "bundle".as_ref(),
        "sign".as_ref(),
        "--key".as_ref(),
        node.keys.alice.as_os_str(),
        lone.as_os_str(),
    ]);
    assert!(out.success(), "{out}");
    let out = what_if(&lone, false);
    assert_eq!(out.code, Some(2), "{out}");
    assert!(
        out.stderr.contains("not_enough") || out.stderr.contains("only 1 of the required 2"),
        "{out}"
    );
    cri.remove_all_pods().await;
}
