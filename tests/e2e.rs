//! End-to-end scenarios on the real parts of a node: two loopback Distribution registries ("public",
//! which docker.io, registry.k8s.io, gcr.io, quay.io and ghcr.io resolve to, and "private", the
//! approved mirror), containerd 1.6 + runc, busybox-static fixture images built with umoci and pushed
//! with skopeo, keys and bundles made with pullgate's own commands, and pullgate in front of
//! containerd, called as kubelet calls it (see `tests/support/node.rs`).
//!
//! One test function per scenario, each on its own stack (a stack is up in about a second), so every
//! scenario passes or fails on its own assertions. Every scenario checks what the registries actually
//! served (their access logs) and what containerd actually holds, not only what pullgate answered.
//!
//! Needs root and the Debian packages of `scripts/install-deps.sh`; `PULLGATE_SKIP_E2E=1` skips them
//! loudly, and a missing prerequisite fails them.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_cri::v1::{Image, ImageFsInfoResponse, ListContainersResponse, ListPodSandboxResponse};
use support::cri::{assert_status, host_pod_config, must, run_as_kubelet, sorted_images};
use support::node::{Node, PAYMENTS_NS, SEARCH_NS, matching, standard_bundle};
use support::{Cri, e2e_enabled, loud};
use tonic::Code;

/// The one audit record of `method` for `image`, checked for decision and reason.
#[track_caller]
fn assert_audit(node: &Node, method: &str, image: &str, decision: &str, reason: &str) {
    let recs = node.audit_for(method, image);
    assert!(
        recs.iter()
            .any(|r| r["decision"] == decision && r["reason"] == reason),
        "no audit record {method} {image} {decision}/{reason}; records for it: {recs:?}"
    );
}

/// `sh -c "grep -qxF 'LINE' /etc/pullgate-fixture"`: exits 0 only in the image whose marker file has
/// exactly that line (each fixture build writes its own).
fn grep_marker(line: &str) -> Vec<String> {
    vec![
        "/bin/sh".into(),
        "-c".into(),
        format!("grep -qxF '{line}' /etc/pullgate-fixture"),
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

// Multi-threaded: the clients' connection tasks keep running while the test thread blocks on
// registry/CLI helpers, and while `Drop` stops the stack.

/// Scenario 1: an approved short name is pulled through pullgate from the private registry only, by
/// digest; `ImageStatus` finds it under the short name; a host-network pod runs it to exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s1_approved_short_name_is_pinned_pulled_privately_and_runs() {
    if !e2e_enabled("s1_approved_short_name_is_pinned_pulled_privately_and_runs") {
        return;
    }
    let t0 = Instant::now();
    let node = Node::start("s1-approved", "enforce");
    let (public, private) = (&node.stack.public, &node.stack.private);
    let bb = node.fx.busybox.clone();
    let pinned = node.mirror_ref(&bb);
    let mut cri = Cri::connect(&node.pullgate_socket()).await;
    let mut direct = Cri::connect(&node.stack.containerd.socket).await;

    let (pub_mark, priv_mark) = (public.mark(), private.mark());
    let image_ref = must(
        "PullImage busybox:1.36",
        cri.pull("busybox:1.36", "default").await,
    );

    // The private registry served the approved copy by digest, and never a tag.
    let served = private.content_requests_since(priv_mark);
    let want = format!("GET /v2/approved/library/busybox/manifests/{}", bb.digest);
    assert!(
        served.contains(&want),
        "private registry did not serve {want}: {served:?}"
    );
    for r in served.iter().filter(|r| r.contains("/manifests/")) {
        assert!(
            r.ends_with(&bb.digest),
            "a manifest was asked for by something other than the approved digest: {r} (all: {served:?})"
        );
    }
    assert!(
        served
            .iter()
            .all(|r| r.contains("/v2/approved/library/busybox/")),
        "the pull touched other repositories: {served:?}"
    );
    let public_saw = public.log_lines_since(pub_mark);
    assert!(
        public_saw.is_empty(),
        "the public registry was contacted: {public_saw:?}"
    );

    // ImageStatus under the short name finds what was pulled; containerd only knows the pinned name.
    let st = must(
        "ImageStatus busybox:1.36",
        cri.image_status("busybox:1.36").await,
    );
    let img = st
        .image
        .expect("ImageStatus(busybox:1.36) finds the pulled image");
    assert_eq!(img.id, image_ref);
    // Named as containerd names an image it pulled as `docker.io/library/busybox:1.36` itself (the
    // mirror copy is the same manifest).
    assert_eq!(
        img.repo_digests,
        [format!("docker.io/library/busybox@{}", bb.digest)]
    );
    assert_eq!(img.repo_tags, ["docker.io/library/busybox:1.36"]);
    let raw = must(
        "direct ImageStatus",
        direct.image_status("busybox:1.36").await,
    );
    assert!(
        raw.image.is_none(),
        "containerd itself should not know busybox:1.36 (pullgate pulled the pinned mirror reference): {raw:?}"
    );
    let raw = must(
        "direct ImageStatus pinned",
        direct.image_status(&pinned).await,
    );
    assert_eq!(raw.image.map(|i| i.id), Some(image_ref.clone()));
    let recs = node.audit_for("PullImage", "busybox:1.36");
    assert!(
        recs.iter()
            .any(|r| r["decision"] == "allow" && r["pulled"] == pinned.as_str()),
        "no allow audit record with pulled={pinned}: {recs:?}"
    );

    // A host-network pod without hostname; the sandbox (pause) image comes from the private registry
    // by digest; a container created as kubelet does it runs and exits 0, and ExecSync works.
    let priv_mark = private.mark();
    let cfg = host_pod_config("s1-pod", "default");
    assert!(cfg.hostname.is_empty());
    let pod = must("RunPodSandbox", cri.run_pod(&cfg).await);
    let served = private.content_requests_since(priv_mark);
    let pause = format!(
        "GET /v2/approved-k8s/pause/manifests/{}",
        node.stack.pause_digest
    );
    assert!(
        served.contains(&pause),
        "containerd did not fetch the pinned pause image from the private registry: {served:?}"
    );
    let marker = grep_marker(&bb.marker);
    let c = must(
        "CreateContainer (approved)",
        cri.create_container_as_kubelet(
            &pod,
            &cfg,
            "check",
            &image_ref,
            "busybox:1.36",
            &strs(&marker),
        )
        .await,
    );
    let code = must(
        "run container",
        cri.start_and_wait(&c, Duration::from_secs(60)).await,
    );
    assert_eq!(code, 0, "the container did not find its fixture marker");
    let sleeper = must(
        "CreateContainer sleeper",
        cri.create_container_as_kubelet(
            &pod,
            &cfg,
            "sleeper",
            &image_ref,
            "busybox:1.36",
            &["/bin/sleep", "300"],
        )
        .await,
    );
    must("StartContainer", cri.start_container(&sleeper).await);
    let exec = must(
        "ExecSync",
        cri.exec_sync(&sleeper, &["/bin/cat", "/etc/pullgate-fixture"])
            .await,
    );
    assert_eq!(exec.exit_code, 0, "ExecSync: {exec:?}");
    assert!(
        String::from_utf8_lossy(&exec.stdout).contains(&bb.marker),
        "ExecSync ran in the wrong image: {exec:?}"
    );
    assert_audit(
        &node,
        "CreateContainer",
        "busybox:1.36",
        "allow",
        "approved",
    );

    // `pullgate status` reports the bundle, the mode, containerd and an approved sandbox image.
    let s = node.status_json();
    assert_eq!(s["mode"], "enforce", "{s}");
    assert_eq!(s["bundle"]["version"], 1, "{s}");
    assert_eq!(s["upstream"]["connected"], true, "{s}");
    assert!(
        s["sandbox_image_problem"].is_null(),
        "sandbox image flagged: {s}"
    );
    assert!(s["decisions"]["allow"].as_u64().unwrap_or(0) >= 3, "{s}");
    assert!(
        public.log_lines_since(pub_mark).is_empty(),
        "the public registry was contacted during the run: {:?}",
        public.log_lines_since(pub_mark)
    );

    cri.remove_all_pods().await;
    loud(&format!("s1: {:?}", t0.elapsed()));
}

/// Scenario 2: images that exist publicly but are not in the bundle are denied with a clear message,
/// and neither registry receives a single request for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s2_unlisted_public_images_are_denied_before_any_registry_request() {
    if !e2e_enabled("s2_unlisted_public_images_are_denied_before_any_registry_request") {
        return;
    }
    let t0 = Instant::now();
    let node = Node::start("s2-denied", "enforce");
    let (public, private) = (&node.stack.public, &node.stack.private);
    let mut cri = Cri::connect(&node.pullgate_socket()).await;
    let mut direct = Cri::connect(&node.stack.containerd.socket).await;
    let (pub_mark, priv_mark) = (public.mark(), private.mark());

    // quay.io is not a mirrored source at all.
    let msg = assert_status(
        "PullImage quay.io/acme/tools:2.0",
        cri.pull("quay.io/acme/tools:2.0", "default").await,
        Code::PermissionDenied,
        &[
            "quay.io/acme/tools:2.0",
            "denied",
            "not from an approved source",
        ],
    );
    loud(&format!("s2 denial message: {msg}"));
    // docker.io is mirrored, but nginx is not approved; same for a pod of a program namespace.
    for ns in ["default", PAYMENTS_NS] {
        assert_status(
            &format!("PullImage nginx:1.25 in {ns}"),
            cri.pull("nginx:1.25", ns).await,
            Code::PermissionDenied,
            &["docker.io/library/nginx", "not approved", "bundle v1"],
        );
    }
    assert_audit(
        &node,
        "PullImage",
        "quay.io/acme/tools:2.0",
        "deny",
        "public_registry_blocked",
    );
    assert_audit(&node, "PullImage", "nginx:1.25", "deny", "not_in_bundle");
    // containerd 1.6 still serves the older runtime.v1alpha2 CRI API: it is no way around pullgate.
    let v1alpha2 = v1alpha2_pull(&node.pullgate_socket(), "quay.io/acme/tools:2.0").await;
    let e = v1alpha2.expect_err("a v1alpha2 pull of an unlisted image must be denied");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    let public_saw = public.log_lines_since(pub_mark);
    assert!(
        public_saw.is_empty(),
        "the public registry received requests for denied images: {public_saw:?}"
    );
    let private_saw = private.log_lines_since(priv_mark);
    assert!(
        private_saw.is_empty(),
        "the private registry received requests: {private_saw:?}"
    );
    for image in ["quay.io/acme/tools:2.0", "docker.io/library/nginx:1.25"] {
        let st = must("direct ImageStatus", direct.image_status(image).await);
        assert!(st.image.is_none(), "{image} reached containerd: {st:?}");
    }

    // Control: the log check above can fail. The same image pulled straight from containerd (past
    // pullgate) is served by the public registry, and its access log shows it.
    must(
        "direct PullImage",
        direct.pull("quay.io/acme/tools:2.0", "default").await,
    );
    let saw = public.content_requests_since(pub_mark);
    assert!(
        saw.iter()
            .any(|r| r.starts_with("GET /v2/acme/tools/manifests/")),
        "control failed: a direct pull should show up in the public registry's log: {saw:?}"
    );
    // Control for the v1alpha2 check: containerd itself does serve that API.
    v1alpha2_pull(&node.stack.containerd.socket, "quay.io/acme/tools:2.0")
        .await
        .expect("containerd 1.6 serves runtime.v1alpha2 (so denying it through pullgate matters)");
    loud(&format!("s2: {:?}", t0.elapsed()));
}

/// Scenario 3: an approved repository with an unapproved tag, and unapproved digests of it (also at
/// the mirror location, where the copy exists), are denied without any registry request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_unapproved_tag_or_digest_of_an_approved_repository_is_denied() {
    if !e2e_enabled("s3_unapproved_tag_or_digest_of_an_approved_repository_is_denied") {
        return;
    }
    let t0 = Instant::now();
    let node = Node::start("s3-tag-digest", "enforce");
    let (public, private) = (&node.stack.public, &node.stack.private);
    let old = node.fx.busybox_old.clone();
    let good = node.fx.busybox.clone();
    let mut cri = Cri::connect(&node.pullgate_socket()).await;
    let mut direct = Cri::connect(&node.stack.containerd.socket).await;
    let (pub_mark, priv_mark) = (public.mark(), private.mark());

    assert_status(
        "PullImage busybox:1.35",
        cri.pull("busybox:1.35", "default").await,
        Code::PermissionDenied,
        &[
            "tag 1.35",
            "docker.io/library/busybox",
            "not approved",
            "1.36",
        ],
    );
    assert_audit(
        &node,
        "PullImage",
        "busybox:1.35",
        "deny",
        "tag_not_approved",
    );

    let by_digest = format!("busybox@{}", old.digest);
    assert_status(
        "PullImage busybox@<unapproved digest>",
        cri.pull(&by_digest, "default").await,
        Code::PermissionDenied,
        &[&old.digest, "not approved"],
    );
    assert_audit(
        &node,
        "PullImage",
        &by_digest,
        "deny",
        "digest_not_approved",
    );

    // An approved tag with another digest pinned next to it.
    let mixed = format!("busybox:1.36@{}", old.digest);
    assert_status(
        "PullImage busybox:1.36@<other digest>",
        cri.pull(&mixed, "default").await,
        Code::PermissionDenied,
        &[&old.digest, "not approved", "tags 1.36"],
    );

    // The unapproved copy does exist in the private registry's mirror path; still denied.
    let at_mirror = node.mirror_ref(&old);
    assert_status(
        "PullImage mirror@<unapproved digest>",
        cri.pull(&at_mirror, "default").await,
        Code::PermissionDenied,
        &[&old.digest, "not approved"],
    );
    let mirror_tag = format!("{}/approved/library/busybox:1.35", node.private());
    assert_status(
        "PullImage mirror:1.35",
        cri.pull(&mirror_tag, "default").await,
        Code::PermissionDenied,
        &["tag 1.35", "not approved"],
    );

    let (p, q) = (
        public.log_lines_since(pub_mark),
        private.log_lines_since(priv_mark),
    );
    assert!(p.is_empty(), "public registry was contacted: {p:?}");
    assert!(q.is_empty(), "private registry was contacted: {q:?}");
    let st = must("direct ImageStatus", direct.image_status(&at_mirror).await);
    assert!(
        st.image.is_none(),
        "the unapproved digest reached containerd"
    );

    // Control: the approved tag of the same repository still pulls, by its own digest only.
    must(
        "PullImage busybox:1.36",
        cri.pull("busybox:1.36", "default").await,
    );
    let served = private.content_requests_since(priv_mark);
    assert!(
        !matching(&served, &good.digest).is_empty(),
        "approved pull not served: {served:?}"
    );
    assert!(
        matching(&served, &old.digest).is_empty(),
        "the unapproved digest was fetched: {served:?}"
    );
    loud(&format!("s3: {:?}", t0.elapsed()));
}

/// Scenario 4: an image approved only for program `corp/payments` pulls and runs in that program's
/// namespace, and is denied elsewhere — at pull time and, once present on the node, at container
/// creation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s4_program_scoped_image_runs_only_in_its_program() {
    if !e2e_enabled("s4_program_scoped_image_runs_only_in_its_program") {
        return;
    }
    let t0 = Instant::now();
    let node = Node::start("s4-scope", "enforce");
    let (public, private) = (&node.stack.public, &node.stack.private);
    let tool = node.fx.paytool.clone();
    let name = "docker.io/acme/payments-tool:1.0";
    let mut cri = Cri::connect(&node.pullgate_socket()).await;
    let mut direct = Cri::connect(&node.stack.containerd.socket).await;
    let pub_mark = public.mark();

    // Denied outside the program, before anything is fetched.
    let priv_mark = private.mark();
    for ns in [SEARCH_NS, "default"] {
        assert_status(
            &format!("PullImage {name} in {ns}"),
            cri.pull(name, ns).await,
            Code::PermissionDenied,
            &["corp/payments", "docker.io/acme/payments-tool"],
        );
    }
    assert_audit(&node, "PullImage", name, "deny", "out_of_scope");
    let q = private.log_lines_since(priv_mark);
    assert!(
        q.is_empty(),
        "denied pulls reached the private registry: {q:?}"
    );

    // Allowed in the program's namespace, pulled from the mirror by digest, and runs there.
    let image_ref = must("PullImage in checkout", cri.pull(name, PAYMENTS_NS).await);
    let served = private.content_requests_since(priv_mark);
    let want = format!(
        "GET /v2/approved/acme/payments-tool/manifests/{}",
        tool.digest
    );
    assert!(
        served.contains(&want),
        "private did not serve {want}: {served:?}"
    );
    let code = must(
        "run in checkout",
        run_as_kubelet(
            &mut cri,
            "pay",
            PAYMENTS_NS,
            name,
            &strs(&grep_marker(&tool.marker)),
        )
        .await,
    );
    assert_eq!(code, 0);

    // Present on the node now, but a pod of another program still cannot create a container from it.
    let cfg = host_pod_config("search-pod", SEARCH_NS);
    let pod = must("RunPodSandbox in search-index", cri.run_pod(&cfg).await);
    assert_status(
        "CreateContainer in search-index",
        cri.create_container_as_kubelet(&pod, &cfg, "main", &image_ref, name, &["/bin/true"])
            .await,
        Code::PermissionDenied,
        &["corp/payments"],
    );
    let containers = must("direct ListContainers", direct.list_containers().await);
    assert!(
        containers
            .containers
            .iter()
            .all(|c| c.pod_sandbox_id != pod),
        "a container was created in the search pod: {containers:?}"
    );
    assert_audit(&node, "CreateContainer", name, "deny", "out_of_scope");
    let p = public.log_lines_since(pub_mark);
    assert!(p.is_empty(), "public registry was contacted: {p:?}");
    cri.remove_all_pods().await;
    loud(&format!("s4: {:?}", t0.elapsed()));
}

/// Scenario 5: images imported straight into containerd with `ctr` (past pullgate) are present, but
/// `CreateContainer` refuses them: one under an unmirrored name, one masquerading as the approved
/// `docker.io/library/busybox:1.36` with other content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_image_imported_with_ctr_cannot_start() {
    if !e2e_enabled("s5_image_imported_with_ctr_cannot_start") {
        return;
    }
    let t0 = Instant::now();
    let node = Node::start("s5-ctr-import", "enforce");
    let mut cri = Cri::connect(&node.pullgate_socket()).await;
    let mut direct = Cri::connect(&node.stack.containerd.socket).await;
    let tmp = node.stack.dir.path().to_path_buf();
    let pub_mark = node.stack.public.mark();

    // The approved image, pulled through pullgate (control: it does start).
    let good_ref = must(
        "PullImage busybox:1.36",
        cri.pull("busybox:1.36", "default").await,
    );

    // Two imports past pullgate: an unmirrored name as `ctr import` makes it (a tag name only), and
    // content masquerading as the approved `busybox:1.36`, also named by its real digest (`--digests`).
    let imports = [
        ("quay.io/evil/miner:1", "evil miner", false),
        ("docker.io/library/busybox:1.36", "evil busybox", true),
    ];
    let mut imported = Vec::new();
    for (name, marker, digests) in imports {
        let tag = node.stack.images.build_image(marker);
        let tar = tmp.join(format!("{}.tar", marker.replace(' ', "-")));
        node.stack.images.export_docker_archive(&tag, &tar, name);
        let out = node.stack.containerd.ctr_import(&tar, digests);
        loud(&format!("s5: ctr import {name}: {}", out.trim()));
        // CRI's plugin takes an import in from containerd's events, a moment after `ctr` returns.
        let img = wait_cri_image(&mut direct, name, |i| {
            !digests || !i.repo_digests.is_empty()
        })
        .await;
        assert_ne!(
            img.id, good_ref,
            "{name}: import should differ from the approved image"
        );
        imported.push((name, marker, img));
    }
    // ctr names the digest image after a generated base name (`import-DATE@sha256:…`); give the
    // masquerade its true digest name in busybox's repository too, so its repo digests claim busybox.
    let generated = imported[1]
        .2
        .repo_digests
        .iter()
        .find_map(|d| d.split_once('@').map(|(_, dg)| dg.to_string()))
        .unwrap_or_else(|| {
            panic!(
                "no digest name after ctr import --digests: {:?}",
                imported[1].2
            )
        });
    let true_name = format!("docker.io/library/busybox@{generated}");
    node.stack.containerd.ctr(&[
        "images",
        "tag",
        "docker.io/library/busybox:1.36",
        &true_name,
    ]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let fake = loop {
        let img = must("direct ImageStatus", direct.image_status(&true_name).await).image;
        if let Some(img) = img.filter(|i| i.repo_digests.contains(&true_name)) {
            break img;
        }
        assert!(Instant::now() < deadline, "CRI never saw {true_name}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(fake.id, imported[1].2.id);
    assert_ne!(generated, node.fx.busybox.digest);

    let cfg = host_pod_config("s5-pod", "default");
    let pod = must("RunPodSandbox", cri.run_pod(&cfg).await);
    for (name, marker, img) in &imported {
        // As kubelet would (image ID + pod-spec name).
        assert_status(
            &format!("CreateContainer {name} by ID"),
            cri.create_container_as_kubelet(
                &pod,
                &cfg,
                "evil",
                &img.id,
                name,
                &strs(&grep_marker(marker)),
            )
            .await,
            Code::PermissionDenied,
            &[name, "denied"],
        );
    }
    // By name (as crictl does): a name the bundle does not know is looked up as written and denied.
    assert_status(
        "CreateContainer quay.io/evil/miner:1 by name",
        cri.create_container(
            &pod,
            &cfg,
            "evil",
            "quay.io/evil/miner:1",
            &strs(&grep_marker("evil miner")),
        )
        .await,
        Code::PermissionDenied,
        &["quay.io/evil/miner:1", "denied"],
    );
    let containers = must("direct ListContainers", direct.list_containers().await);
    assert!(
        containers.containers.is_empty(),
        "containerd created containers from imported images: {containers:?}"
    );
    // An approved name means the approved digest: the masquerade's name in containerd is never
    // asked for, and the container runs the approved image (the evil marker is not there).
    let by_name = must(
        "CreateContainer busybox:1.36 by name",
        cri.create_container(
            &pod,
            &cfg,
            "by-name",
            "docker.io/library/busybox:1.36",
            &strs(&grep_marker("evil busybox")),
        )
        .await,
    );
    let code = must(
        "container by name",
        cri.start_and_wait(&by_name, Duration::from_secs(60)).await,
    );
    assert_eq!(code, 1, "the container by name ran the masquerade");
    let st = must("ContainerStatus", cri.container_status(&by_name).await);
    assert_eq!(
        st.status.and_then(|s| s.image).map(|i| i.image),
        Some(good_ref.clone()),
        "pinned to the approved image"
    );
    // The tag-only import has no repo digest at all; the masquerade's digest is not approved.
    assert_audit(
        &node,
        "CreateContainer",
        "quay.io/evil/miner:1",
        "deny",
        "digest_not_approved",
    );
    let recs = node.audit_for("CreateContainer", "docker.io/library/busybox:1.36");
    assert!(
        recs.iter().any(|r| r["decision"] == "deny"
            && r["reason"] == "digest_not_approved"
            && fake
                .repo_digests
                .iter()
                .any(|d| r["normalized"] == d.as_str())),
        "the masquerade was not judged by its own digest {:?}: {recs:?}",
        fake.repo_digests
    );

    // Control: in the same pod, the approved image pulled through pullgate starts and runs.
    let c = must(
        "CreateContainer approved",
        cri.create_container_as_kubelet(
            &pod,
            &cfg,
            "good",
            &good_ref,
            "busybox:1.36",
            &strs(&grep_marker(&node.fx.busybox.marker)),
        )
        .await,
    );
    let code = must(
        "approved container",
        cri.start_and_wait(&c, Duration::from_secs(60)).await,
    );
    assert_eq!(code, 0);
    let p = node.stack.public.log_lines_since(pub_mark);
    assert!(p.is_empty(), "public registry was contacted: {p:?}");
    cri.remove_all_pods().await;
    loud(&format!("s5: {:?}", t0.elapsed()));
}

/// Scenario 5, forged name: content imported with `ctr` and then *named* after the approved mirror
/// digest (`ctr images tag … 127.0.0.1:P/approved/library/busybox@sha256:<approved>`). containerd does
/// not check that a digest in an image name matches the image's manifest, and the CRI plugin reports
/// such names as repo digests, so a check that trusts repo digests is fooled. The container must still
/// be refused: its manifest is not the approved one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_import_named_after_an_approved_digest_cannot_start() {
    if !e2e_enabled("s5_import_named_after_an_approved_digest_cannot_start") {
        return;
    }
    let t0 = Instant::now();
    let node = Node::start("s5-forged-name", "enforce");
    let mut cri = Cri::connect(&node.pullgate_socket()).await;
    let mut direct = Cri::connect(&node.stack.containerd.socket).await;
    let tmp = node.stack.dir.path().to_path_buf();
    let approved = node.mirror_ref(&node.fx.busybox);

    let tag = node.stack.images.build_image("forged busybox");
    let tar = tmp.join("forged.tar");
    node.stack
        .images
        .export_docker_archive(&tag, &tar, "quay.io/evil/miner:1");
    node.stack.containerd.ctr_import(&tar, false);
    node.stack
        .containerd
        .ctr(&["images", "tag", "quay.io/evil/miner:1", &approved]);
    // The CRI plugin learns about the new name from containerd's image events.
    let deadline = Instant::now() + Duration::from_secs(10);
    let forged = loop {
        let st = must("direct ImageStatus", direct.image_status(&approved).await);
        if let Some(i) = st.image {
            break i;
        }
        assert!(
            Instant::now() < deadline,
            "containerd's CRI never saw the forged name {approved}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let evil_id = must(
        "direct ImageStatus",
        direct.image_status("quay.io/evil/miner:1").await,
    )
    .image
    .expect("imported image")
    .id;
    assert_eq!(
        forged.id, evil_id,
        "the forged name should point at the imported content"
    );
    assert!(
        forged.repo_digests.contains(&approved),
        "containerd reports the forged name as a repo digest: {forged:?}"
    );

    let cfg = host_pod_config("forged", "default");
    let pod = must("RunPodSandbox", cri.run_pod(&cfg).await);
    let r = cri
        .create_container_as_kubelet(
            &pod,
            &cfg,
            "forged",
            &evil_id,
            "busybox:1.36",
            &strs(&grep_marker("forged busybox")),
        )
        .await;
    if let Ok(c) = &r {
        // Show what actually ran, for the failure message.
        let code = cri.start_and_wait(c, Duration::from_secs(30)).await;
        panic!(
            "pullgate let a container start from content that is not the approved manifest \
             (forged name {approved} on image {evil_id}); the container ran the forged image and \
             exited {code:?} (0 = the forged marker was found)"
        );
    }
    assert_status(
        "CreateContainer of the forged image",
        r,
        Code::PermissionDenied,
        &["denied"],
    );
    cri.remove_all_pods().await;
    loud(&format!("s5 forged: {:?}", t0.elapsed()));
}

/// Scenario 6: a new bundle moves `busybox:1.36` to another digest and the next pod gets it; the old
/// digest can no longer start; a rolled-back or tampered bundle — through `bundle install`, the drop
/// directory, or edited in the state directory — is rejected and the new one keeps enforcing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s6_bundle_update_moves_tag_and_bad_bundles_are_rejected() {
    if !e2e_enabled("s6_bundle_update_moves_tag_and_bad_bundles_are_rejected") {
        return;
    }
    let t0 = Instant::now();
    let mut node = Node::start("s6-bundles", "enforce");
    let mut cri = Cri::connect(&node.pullgate_socket()).await;
    let old = node.fx.busybox.clone();

    let ref_a = must("PullImage v1", cri.pull("busybox:1.36", "default").await);
    let code = must(
        "run v1",
        run_as_kubelet(
            &mut cri,
            "v1",
            "default",
            "busybox:1.36",
            &strs(&grep_marker(&old.marker)),
        )
        .await,
    );
    assert_eq!(code, 0);

    // A rebuilt busybox:1.36 is published and mirrored by digest; bundle v2 moves the tag to it.
    let new_digest =
        node.stack
            .images
            .push_image(&node.stack.public, "library/busybox:1.36", "rebuilt");
    // The marker line push_image writes: "<marker> <repo:tag>".
    let new_marker = "rebuilt library/busybox:1.36";
    assert_ne!(new_digest, old.digest);
    support::images::copy_by_digest(
        &node.stack.public.host(),
        "library/busybox",
        &new_digest,
        &node.private(),
        "approved/library/busybox",
    );
    let mut fx2 = node.fx.clone();
    fx2.busybox.digest = new_digest.clone();
    let v2 = standard_bundle(&node.stack, &fx2, 2);
    let v2_path = node.keys.sign(&v2, "bundle-v2");
    let out = node.install(&v2_path);
    assert!(out.success(), "install v2: {out}");
    assert!(out.stdout.contains("now enforces v2"), "{out}");

    // kubelet's presence check misses the old image now, so it pulls: the new digest, privately.
    let st = must(
        "ImageStatus after v2",
        cri.image_status("busybox:1.36").await,
    );
    assert!(
        st.image.is_none(),
        "ImageStatus(busybox:1.36) still finds the old digest: {st:?}"
    );
    let priv_mark = node.stack.private.mark();
    let pub_mark = node.stack.public.mark();
    let ref_b = must("PullImage v2", cri.pull("busybox:1.36", "default").await);
    assert_ne!(ref_b, ref_a);
    let served = node.stack.private.content_requests_since(priv_mark);
    let want = format!("GET /v2/approved/library/busybox/manifests/{new_digest}");
    assert!(
        served.contains(&want),
        "private did not serve {want}: {served:?}"
    );
    let code = must(
        "run v2",
        run_as_kubelet(
            &mut cri,
            "v2",
            "default",
            "busybox:1.36",
            &strs(&grep_marker(new_marker)),
        )
        .await,
    );
    assert_eq!(code, 0, "the v2 pod did not run the new digest");

    // The old digest is still on the node, but no longer approved.
    let cfg = host_pod_config("stale", "default");
    let pod = must("RunPodSandbox", cri.run_pod(&cfg).await);
    assert_status(
        "CreateContainer with the old image",
        cri.create_container_as_kubelet(
            &pod,
            &cfg,
            "stale",
            &ref_a,
            "busybox:1.36",
            &["/bin/true"],
        )
        .await,
        Code::PermissionDenied,
        &[&old.digest],
    );

    // Rollback to v1 with `bundle install`: rejected, nothing changes.
    let out = node.install(&node.bundle_v1);
    assert!(!out.success(), "rollback to v1 was accepted: {out}");
    assert!(out.text().contains("rollback"), "{out}");
    // A tampered v3 (approves busybox:1.35 after the administrators signed): rejected.
    let v3 = standard_bundle(&node.stack, &fx2, 3);
    let v3_path = node.keys.sign(&v3, "bundle-v3");
    let mut tampered: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&v3_path).expect("read v3")).expect("parse v3");
    tampered["images"][0]["tags"]["1.35"] = node.fx.busybox_old.digest.clone().into();
    std::fs::write(
        &v3_path,
        serde_json::to_string_pretty(&tampered).unwrap() + "\n",
    )
    .expect("write tampered v3");
    let out = node.install(&v3_path);
    assert!(!out.success(), "tampered v3 was accepted: {out}");
    assert!(out.text().contains("signature"), "{out}");

    // The same two through the drop directory: the daemon sets them aside with the reason.
    let drop = node.drop_dir.clone();
    for (src, name) in [(&node.bundle_v1, "a-rollback"), (&v3_path, "b-tampered")] {
        std::fs::copy(
            src.with_extension("json.sig"),
            drop.join(format!("{name}.json.sig")),
        )
        .expect("copy sig");
        std::fs::copy(src, drop.join(format!("{name}.json"))).expect("copy bundle");
    }
    for (name, why) in [("a-rollback", "rollback"), ("b-tampered", "signature")] {
        let reason = drop.join(format!("{name}.json.rejected.reason"));
        let text = support::process::wait_for(
            &format!("the daemon to reject {name}"),
            Duration::from_secs(10),
            || std::fs::read_to_string(&reason).ok(),
        );
        assert!(
            text.contains(why),
            "{name} rejected for another reason: {text}"
        );
    }

    // The installed v2 itself edited on disk, then SIGHUP: the reload rejects it, v2 stays in force.
    let current = node.state_dir.join("current").join("bundle.json");
    let text = std::fs::read_to_string(&current).expect("read installed bundle");
    std::fs::write(&current, text.replace("\"1.36\"", "\"1.35\"")).expect("tamper installed");
    node.stack
        .pullgate
        .as_mut()
        .expect("pullgate")
        .signal(libc::SIGHUP);
    support::process::wait_for(
        "the daemon to log the rejected reload",
        Duration::from_secs(10),
        || {
            node.pullgate_log()
                .lines()
                .any(|l| l.contains("rejected bundle") && l.contains("state directory"))
                .then_some(())
        },
    );

    let s = node.status_json();
    assert_eq!(s["bundle"]["version"], 2, "bundle in force changed: {s}");
    assert_status(
        "PullImage busybox:1.35 after the rejected bundles",
        cri.pull("busybox:1.35", "default").await,
        Code::PermissionDenied,
        &["tag 1.35"],
    );
    let again = must(
        "PullImage busybox:1.36 again",
        cri.pull("busybox:1.36", "default").await,
    );
    assert_eq!(again, ref_b, "busybox:1.36 no longer means the v2 digest");
    let p = node.stack.public.log_lines_since(pub_mark);
    assert!(p.is_empty(), "public registry was contacted: {p:?}");
    cri.remove_all_pods().await;
    loud(&format!("s6: {:?}", t0.elapsed()));
}

/// Scenario 7: containerd stops and comes back during a run of calls: pullgate answers UNAVAILABLE
/// meanwhile (and keeps deciding what needs no containerd), then recovers without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s7_containerd_restart_is_unavailable_then_recovers() {
    if !e2e_enabled("s7_containerd_restart_is_unavailable_then_recovers") {
        return;
    }
    let t0 = Instant::now();
    let mut node = Node::start("s7-restart", "enforce");
    let mut cri = Cri::connect(&node.pullgate_socket()).await;
    must(
        "PullImage busybox:1.36",
        cri.pull("busybox:1.36", "default").await,
    );
    let pg_pid = node.stack.pullgate.as_ref().expect("pullgate").pid();

    // A steady run of calls, as kubelet makes them, recorded with their outcome.
    type Outcome = (Instant, &'static str, Result<(), (Code, String)>);
    let log: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let recorder = {
        let log = log.clone();
        let mut c = cri.clone();
        tokio::spawn(async move {
            while !*stop_rx.borrow() {
                let v = tokio::time::timeout(Duration::from_secs(10), c.version()).await;
                let i =
                    tokio::time::timeout(Duration::from_secs(10), c.image_status("busybox:1.36"))
                        .await;
                for (what, r) in [
                    ("Version", v.map(|r| r.map(|_| ()))),
                    ("ImageStatus", i.map(|r| r.map(|_| ()))),
                ] {
                    let r = match r {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(s)) => Err((s.code(), s.message().to_string())),
                        Err(_) => Err((Code::DeadlineExceeded, "hung for 10s".to_string())),
                    };
                    log.lock().unwrap().push((Instant::now(), what, r));
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stop_rx.changed() => {}
                }
            }
        })
    };
    let count =
        |pred: &dyn Fn(&Outcome) -> bool| log.lock().unwrap().iter().filter(|o| pred(o)).count();
    support::process::wait_for("calls before the restart", Duration::from_secs(10), || {
        (count(&|o| o.2.is_ok()) >= 6).then_some(())
    });

    let old_pid = node.stack.containerd.pid();
    node.stack.containerd.stop_daemon();
    let down_at = Instant::now();
    support::process::wait_for("UNAVAILABLE answers", Duration::from_secs(15), || {
        (count(&|o| o.0 > down_at && o.2.is_err()) >= 4).then_some(())
    });
    // While containerd is down: a pull that needs it is UNAVAILABLE; a denial needs no containerd.
    assert_status(
        "PullImage while containerd is down",
        cri.pull("busybox:1.36", "default").await,
        Code::Unavailable,
        &[],
    );
    assert_status(
        "denied PullImage while containerd is down",
        cri.pull("quay.io/acme/tools:2.0", "default").await,
        Code::PermissionDenied,
        &["not from an approved source"],
    );

    node.stack.containerd.start_again();
    let up_at = Instant::now();
    assert_ne!(node.stack.containerd.pid(), old_pid);
    support::process::wait_for(
        "recovery after the restart",
        Duration::from_secs(20),
        || (count(&|o| o.0 > up_at && o.2.is_ok()) >= 4).then_some(()),
    );
    let _ = stop_tx.send(true);
    recorder.await.expect("recorder task");

    let outcomes = log.lock().unwrap().clone();
    let errors: Vec<_> = outcomes
        .iter()
        .filter_map(|(_, what, r)| r.as_ref().err().map(|e| (*what, e.clone())))
        .collect();
    assert!(
        !errors.is_empty(),
        "no call failed while containerd was down"
    );
    // Between containerd's socket opening and its CRI plugin being ready, containerd itself answers
    // UNKNOWN "server is not initialized yet"; pullgate hands that on as it is.
    let not_unavailable: Vec<_> = errors
        .iter()
        .filter(|(_, (c, m))| {
            *c != Code::Unavailable
                && !(*c == Code::Unknown && m == "server is not initialized yet")
        })
        .collect();
    assert!(
        not_unavailable.is_empty(),
        "while containerd was down or starting pullgate answered something other than UNAVAILABLE \
         or containerd's own answer: {not_unavailable:?}"
    );
    loud(&format!(
        "s7: {} calls, {} UNAVAILABLE while containerd was down, e.g. {:?}",
        outcomes.len(),
        errors.len(),
        errors[0]
    ));
    // Recovered for good: the last calls all succeeded, on the same pullgate process.
    assert!(
        outcomes.iter().rev().take(4).all(|o| o.2.is_ok()),
        "calls after recovery failed: {:?}",
        &outcomes[outcomes.len().saturating_sub(8)..]
    );
    let pg = node.stack.pullgate.as_mut().expect("pullgate");
    assert!(pg.exited().is_none(), "pullgate exited");
    assert_eq!(pg.pid(), pg_pid);
    let code = must(
        "run after the restart",
        run_as_kubelet(
            &mut cri,
            "after",
            "default",
            "busybox:1.36",
            &strs(&grep_marker(&node.fx.busybox.marker)),
        )
        .await,
    );
    assert_eq!(code, 0);
    assert_eq!(node.status_json()["upstream"]["connected"], true);
    cri.remove_all_pods().await;
    loud(&format!("s7: {:?}", t0.elapsed()));
}

/// Scenario 8: in warn mode an unapproved pull goes through (the public registry serves it) and the
/// audit log records the would-be denial; approved images are still pinned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s8_warn_mode_allows_and_audits_the_would_be_denial() {
    if !e2e_enabled("s8_warn_mode_allows_and_audits_the_would_be_denial") {
        return;
    }
    let t0 = Instant::now();
    let node = Node::start("s8-warn", "warn");
    let (public, private) = (&node.stack.public, &node.stack.private);
    let mut cri = Cri::connect(&node.pullgate_socket()).await;
    let image = "quay.io/acme/tools:2.0";

    let pub_mark = public.mark();
    let audit_before = node.audit().len();
    must("PullImage (warn)", cri.pull(image, "default").await);
    let saw = public.content_requests_since(pub_mark);
    assert!(
        saw.iter()
            .any(|r| r.starts_with("GET /v2/acme/tools/manifests/")),
        "the unapproved pull did not reach the public registry: {saw:?}"
    );
    let recs = node.audit();
    let rec = recs[audit_before..]
        .iter()
        .find(|r| r["method"] == "PullImage" && r["image"] == image)
        .unwrap_or_else(|| panic!("no audit record for the warned pull: {recs:?}"));
    assert_eq!(rec["decision"], "warn", "{rec}");
    assert_eq!(rec["reason"], "public_registry_blocked", "{rec}");
    assert!(
        rec["message"]
            .as_str()
            .is_some_and(|m| m.contains("denied") && m.contains("not from an approved source")),
        "{rec}"
    );
    assert!(
        node.pullgate_log().contains("would deny (warn mode)"),
        "pullgate did not log the would-be denial"
    );

    // It also runs (the would-be denial of CreateContainer is audited too).
    let code = must(
        "run the unapproved image (warn)",
        run_as_kubelet(
            &mut cri,
            "warned",
            "default",
            image,
            &strs(&grep_marker(&node.fx.tools.marker)),
        )
        .await,
    );
    assert_eq!(code, 0);
    assert_audit(
        &node,
        "CreateContainer",
        image,
        "warn",
        "public_registry_blocked",
    );

    // Approved images are still pinned and pulled privately.
    let (pub_mark, priv_mark) = (public.mark(), private.mark());
    must(
        "PullImage busybox:1.36 (warn)",
        cri.pull("busybox:1.36", "default").await,
    );
    let served = private.content_requests_since(priv_mark);
    assert!(
        !matching(&served, &node.fx.busybox.digest).is_empty(),
        "approved pull not pinned in warn mode: {served:?}"
    );
    let p = public.log_lines_since(pub_mark);
    assert!(
        p.is_empty(),
        "approved pull went public in warn mode: {p:?}"
    );

    let s = node.status_json();
    assert_eq!(s["mode"], "warn", "{s}");
    assert!(s["decisions"]["warn"].as_u64().unwrap_or(0) >= 2, "{s}");
    cri.remove_all_pods().await;
    loud(&format!("s8: {:?}", t0.elapsed()));
}

/// The (container id, event type) pairs a `GetContainerEvents` stream delivers until it is quiet for
/// 2 s, ends, or fails.
async fn collect_events(
    s: &mut tonic::Streaming<k8s_cri::v1::ContainerEventResponse>,
) -> Vec<(String, i32)> {
    // Until 2 s pass without an event; at most 60 s and 1,000 events in all.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut out = Vec::new();
    while out.len() < 1000 && tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(2), s.message()).await {
            Ok(Ok(Some(e))) => out.push((e.container_id, e.container_event_type)),
            _ => break,
        }
    }
    out
}

/// Calls `$call` on the direct client, pullgate, and directly again until the two direct answers agree
/// (some answers carry timestamps that move), then asserts pullgate's answer equals them. `$norm`
/// (optional) puts lists in a canonical order first: containerd lists from a map, in random order.
macro_rules! assert_same_through_pullgate {
    ($what:expr, $direct:ident, $proxied:ident, |$c:ident| $call:expr) => {
        assert_same_through_pullgate!($what, $direct, $proxied, |$c| $call, |r| r)
    };
    ($what:expr, $direct:ident, $proxied:ident, |$c:ident| $call:expr, $norm:expr) => {{
        let mut checked = false;
        for _attempt in 0..5 {
            let d1 = {
                let $c = &mut $direct;
                ($norm)(must(&format!("direct {}", $what), $call.await))
            };
            let p = {
                let $c = &mut $proxied;
                ($norm)(must(&format!("{} through pullgate", $what), $call.await))
            };
            let d2 = {
                let $c = &mut $direct;
                ($norm)(must(&format!("direct {}", $what), $call.await))
            };
            if d1 == d2 {
                assert_eq!(
                    p, d1,
                    "{} through pullgate differs from containerd's own answer",
                    $what
                );
                checked = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert!(checked, "{}: containerd's own answer never settled", $what);
    }};
}

/// Scenario 9: read-only calls answer through pullgate exactly what containerd answers, and the
/// container events stream is relayed as containerd answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s9_read_only_calls_and_events_pass_through_unchanged() {
    if !e2e_enabled("s9_read_only_calls_and_events_pass_through_unchanged") {
        return;
    }
    let t0 = Instant::now();
    let node = Node::start("s9-passthrough", "enforce");
    let mut proxied = Cri::connect(&node.pullgate_socket()).await;
    let mut direct = Cri::connect(&node.stack.containerd.socket).await;

    // GetContainerEvents opened on both sides before scenario 1's pod runs.
    let direct_events = direct.container_events().await;
    let proxied_events = proxied.container_events().await;

    // Scenario 1 again: pull, pod, one container run to exit, one left running.
    let image_ref = must("PullImage", proxied.pull("busybox:1.36", "default").await);
    let cfg = host_pod_config("s9-pod", "default");
    let pod = must("RunPodSandbox", proxied.run_pod(&cfg).await);
    let done = must(
        "CreateContainer",
        proxied
            .create_container_as_kubelet(
                &pod,
                &cfg,
                "done",
                &image_ref,
                "busybox:1.36",
                &["/bin/true"],
            )
            .await,
    );
    assert_eq!(
        must(
            "run",
            proxied.start_and_wait(&done, Duration::from_secs(60)).await
        ),
        0
    );
    let running = must(
        "CreateContainer",
        proxied
            .create_container_as_kubelet(
                &pod,
                &cfg,
                "running",
                &image_ref,
                "busybox:1.36",
                &["/bin/sleep", "300"],
            )
            .await,
    );
    must("StartContainer", proxied.start_container(&running).await);

    // The events stream: whatever containerd answers, pullgate relays.
    match (direct_events, proxied_events) {
        (Err(d), Err(p)) => {
            loud(&format!(
                "s9: containerd answers GetContainerEvents with {:?} ({:?}); pullgate relays {:?} ({:?})",
                d.code(),
                d.message(),
                p.code(),
                p.message()
            ));
            assert_eq!(p.code(), d.code(), "GetContainerEvents status differs");
            assert_eq!(
                p.message(),
                d.message(),
                "GetContainerEvents message differs"
            );
        }
        (Ok(mut d), Ok(mut p)) => {
            let (dv, pv) = (collect_events(&mut d).await, collect_events(&mut p).await);
            loud(&format!(
                "s9: GetContainerEvents streamed {} events",
                dv.len()
            ));
            // containerd 1.6 may answer the call and then fail the stream: compare what was seen.
            assert_eq!(pv, dv, "events through pullgate differ from containerd's");
            if !dv.is_empty() {
                assert!(
                    dv.iter().any(|(id, _)| id == &done),
                    "no events for {done}: {dv:?}"
                );
            }
        }
        (d, p) => panic!(
            "GetContainerEvents: containerd answered {:?}, pullgate {:?}",
            d.map(|_| "a stream"),
            p.map(|_| "a stream")
        ),
    }

    assert_same_through_pullgate!("Version", direct, proxied, |c| c.version());
    assert_same_through_pullgate!("Status", direct, proxied, |c| c.status());
    assert_same_through_pullgate!(
        "ListPodSandbox",
        direct,
        proxied,
        |c| c.list_pod_sandbox(),
        |mut r: ListPodSandboxResponse| {
            r.items.sort_by(|a, b| a.id.cmp(&b.id));
            r
        }
    );
    assert_same_through_pullgate!(
        "ListContainers",
        direct,
        proxied,
        |c| c.list_containers(),
        |mut r: ListContainersResponse| {
            r.containers.sort_by(|a, b| a.id.cmp(&b.id));
            r
        }
    );
    // containerd stamps ImageFsInfo with the time of the call: compare everything else.
    assert_same_through_pullgate!(
        "ImageFsInfo",
        direct,
        proxied,
        |c| c.image_fs_info(),
        |mut r: ImageFsInfoResponse| {
            for fs in r
                .image_filesystems
                .iter_mut()
                .chain(r.container_filesystems.iter_mut())
            {
                fs.timestamp = 0;
            }
            r
        }
    );
    assert_same_through_pullgate!("ContainerStatus(exited)", direct, proxied, |c| c
        .container_status(&done));
    assert_same_through_pullgate!("ContainerStatus(running)", direct, proxied, |c| c
        .container_status(&running));

    // ImageStatus and ListImages: identical except for pullgate's one documented change, the names
    // of approved mirror images, shown as their sources (docs/architecture.md): the mirror repo
    // digest as the source's (`docker.io/library/busybox@sha256:…`), plus the source tags bound to it.
    let source_names = [
        (
            node.mirror_ref(&node.fx.busybox),
            format!("docker.io/library/busybox@{}", node.fx.busybox.digest),
            "docker.io/library/busybox:1.36".to_string(),
        ),
        (
            format!(
                "{}/approved-k8s/pause@{}",
                node.private(),
                node.stack.pause_digest
            ),
            format!("registry.k8s.io/pause@{}", node.stack.pause_digest),
            "registry.k8s.io/pause:3.9".to_string(),
        ),
    ];
    let expected = |images: Vec<Image>| -> Vec<Image> {
        let mut images = images;
        for i in &mut images {
            for (mirror, source, tag) in &source_names {
                if let Some(d) = i.repo_digests.iter_mut().find(|d| *d == mirror) {
                    d.clone_from(source);
                    if !i.repo_tags.contains(tag) {
                        i.repo_tags.push(tag.clone());
                    }
                }
            }
        }
        sorted_images(images)
    };
    let d = expected(vec![
        must("direct ImageStatus", direct.image_status(&image_ref).await)
            .image
            .expect("image"),
    ]);
    let p = sorted_images(vec![
        must(
            "ImageStatus through pullgate",
            proxied.image_status(&image_ref).await,
        )
        .image
        .expect("image"),
    ]);
    assert_eq!(p, d, "ImageStatus(image id) through pullgate");
    let d = expected(must("direct ListImages", direct.list_images().await));
    let p = sorted_images(must(
        "ListImages through pullgate",
        proxied.list_images().await,
    ));
    assert_eq!(
        p, d,
        "ListImages through pullgate: only the names of approved mirror images may differ"
    );
    assert!(
        p.iter().any(|i| i.id == image_ref
            && i.repo_tags
                .contains(&"docker.io/library/busybox:1.36".to_string())),
        "ListImages lacks busybox with its source tag: {p:?}"
    );

    drop(direct);
    proxied.remove_all_pods().await;
    loud(&format!("s9: {:?}", t0.elapsed()));
}

/// PullImage through the older `runtime.v1alpha2` CRI API, as an old client would send it.
async fn v1alpha2_pull(
    socket: &std::path::Path,
    image: &str,
) -> Result<k8s_cri::v1alpha2::PullImageResponse, tonic::Status> {
    use k8s_cri::v1alpha2 as old;
    let path = socket.to_path_buf();
    let channel = tonic::transport::Endpoint::try_from("http://localhost")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .expect("connect");
    old::image_service_client::ImageServiceClient::new(channel)
        .pull_image(old::PullImageRequest {
            image: Some(old::ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
            auth: None,
            sandbox_config: None,
        })
        .await
        .map(|r| r.into_inner())
}

/// Waits until containerd's CRI view knows `name` (it learns about `ctr` changes from image events).
async fn wait_cri_name(direct: &mut Cri, name: &str) -> Image {
    wait_cri_image(direct, name, |_| true).await
}

/// Waits (at most 10 s) until containerd's CRI plugin knows `name` as an image that satisfies
/// `ready`, and returns it.
async fn wait_cri_image(direct: &mut Cri, name: &str, ready: impl Fn(&Image) -> bool) -> Image {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = must("direct ImageStatus", direct.image_status(name).await).image;
        match found {
            Some(i) if ready(&i) => return i,
            found => assert!(
                Instant::now() < deadline,
                "containerd's CRI never saw {name} as expected (last seen: {found:?})"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Regression (security review): forged names in every shape CRI reports them. (a) a record named
/// after the approved pinned digest, started the way kubelet does when the pod spec names that digest
/// (so `user_specified_image` is an approved reference); (b) a short, non-normalised alias
/// `busybox@<approved digest>`, which CRI reports normalised. Both are denied: repo digests are proven
/// from the content store, and names are never evidence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_forged_names_in_every_shape_cannot_start() {
    if !e2e_enabled("s5_forged_names_in_every_shape_cannot_start") {
        return;
    }
    let node = Node::start("s5-forged-shapes", "enforce");
    let mut cri = Cri::connect(&node.pullgate_socket()).await;
    let mut direct = Cri::connect(&node.stack.containerd.socket).await;
    let tmp = node.stack.dir.path().to_path_buf();
    let approved = node.mirror_ref(&node.fx.busybox);
    let short = format!("busybox@{}", node.fx.busybox.digest);
    for (marker, evil_name, alias) in [
        ("EVIL-PINNED", "quay.io/evil/miner:1", approved.as_str()),
        ("EVIL-SHORT", "quay.io/evil/miner:2", short.as_str()),
    ] {
        let tag = node.stack.images.build_image(marker);
        let tar = tmp.join(format!("{marker}.tar"));
        node.stack
            .images
            .export_docker_archive(&tag, &tar, evil_name);
        node.stack.containerd.ctr_import(&tar, false);
        node.stack
            .containerd
            .ctr(&["images", "tag", evil_name, alias]);
        let evil = wait_cri_name(&mut direct, evil_name).await;
        loud(&format!(
            "forged {alias}: CRI reports repo_digests={:?}",
            evil.repo_digests
        ));
        let cfg = host_pod_config(&marker.to_lowercase(), "default");
        let pod = must("RunPodSandbox", cri.run_pod(&cfg).await);
        let r = cri
            .create_container_as_kubelet(
                &pod,
                &cfg,
                "evil",
                &evil.id,
                alias,
                &strs(&grep_marker(marker)),
            )
            .await;
        let e = r.expect_err("a forged name must not start");
        assert_eq!(e.code(), Code::PermissionDenied, "{alias}: {e:?}");
        // The watcher writes its own records meanwhile: the start's record is the last start.
        let last = node
            .audit()
            .into_iter()
            .rfind(|r| r["method"] == "CreateContainer")
            .expect("audited");
        assert_eq!(last["decision"], "deny", "{last}");
    }
    cri.remove_all_pods().await;
}

/// Regression (security review): containerd's native API through pullgate's socket (`ctr import`,
/// `ctr run`) would run images without a single CRI call. pullgate refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_containerd_api_is_refused_on_pullgates_socket() {
    if !e2e_enabled("native_containerd_api_is_refused_on_pullgates_socket") {
        return;
    }
    let node = Node::start("native-api", "enforce");
    let tmp = node.stack.dir.path().to_path_buf();
    let tag = node.stack.images.build_image("EVIL-NATIVE");
    let tar = tmp.join("evil.tar");
    node.stack
        .images
        .export_docker_archive(&tag, &tar, "quay.io/evil/miner:3");
    let sock = node.pullgate_socket();
    let snapshotter = node.stack.containerd.snapshotter.clone();
    let out = std::process::Command::new("ctr")
        .arg("--address")
        .arg(&sock)
        .args([
            "-n",
            "k8s.io",
            "images",
            "import",
            "--snapshotter",
            &snapshotter,
        ])
        .arg(&tar)
        .env("PATH", support::stack::sbin_path())
        .output()
        .expect("run ctr");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "ctr import through pullgate succeeded: {stderr}"
    );
    assert!(stderr.contains("not part of the CRI API"), "{stderr}");
    let mut direct = Cri::connect(&node.stack.containerd.socket).await;
    let st = must(
        "direct ImageStatus",
        direct.image_status("quay.io/evil/miner:3").await,
    );
    assert!(st.image.is_none(), "the image reached containerd: {st:?}");
}

/// Scenario 10: a multi-platform image (an OCI index listing another platform first) pulled on
/// containerd's own socket, past pullgate, starts through pullgate by image ID alone: the repo digest
/// CRI reports names the index, and the start is proven from the child manifest containerd pulled
/// for the node — the other platform's manifest is not in its content store at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s10_multi_platform_image_pulled_past_pullgate_starts() {
    use pullgate::node::enforce::lookup::NODE_ARCH;
    use support::images::{make_index, push_index};
    use support::node::{Approval, ORG};

    if !e2e_enabled("s10_multi_platform_image_pulled_past_pullgate_starts") {
        return;
    }
    let t0 = Instant::now();
    // Without the lockdown watcher, which would prove images pulled past pullgate as they
    // arrive: what is checked here is how a start, and kubelet's ImageStatus before one, prove them.
    let node = Node::start_with("s10-index", "enforce", |_| {
        "[lockdown]\nwatch = false\n".into()
    });
    let images = &node.stack.images;
    let (ours_marker, theirs_marker) = ("multi: the node platform", "multi: another platform");
    // Pushed to the private registry only: containerd will hold it past pullgate.
    let solo_marker = "ahead: asked about before its start";
    let solo_digest = images.push_image(
        &node.stack.private,
        "approved/library/solo:1.0",
        solo_marker,
    );
    let ours = images.build_image(ours_marker);
    let theirs = images.build_image(theirs_marker);
    let other_arch = if NODE_ARCH == "s390x" {
        "ppc64le"
    } else {
        "s390x"
    };
    make_index(
        images,
        &[(&theirs, "linux", other_arch), (&ours, "linux", NODE_ARCH)],
        "multi",
    );
    let (ours_digest, theirs_digest) = (images.layout_digest(&ours), images.layout_digest(&theirs));
    let digest = push_index(
        images,
        "multi",
        &node.stack.private,
        "approved/library/multi:1.0",
    );
    let mut v2 = standard_bundle(&node.stack, &node.fx, 2);
    v2.images.push(Approval::tag(
        "docker.io/library/multi",
        "1.0",
        &digest,
        ORG,
    ));
    v2.images.push(Approval::tag(
        "docker.io/library/solo",
        "1.0",
        &solo_digest,
        ORG,
    ));
    let out = node.install(&node.keys.sign(&v2, "bundle-v2"));
    assert!(out.success(), "install v2: {out}");
    node.wait_for_bundle(2);

    // Pulled on containerd's socket by the pinned mirror name; containerd fetched the index and the
    // node's manifest only.
    let mut direct = Cri::connect(&node.stack.containerd.socket).await;
    let pinned = format!("{}/approved/library/multi@{digest}", node.private());
    let id = must("direct PullImage", direct.pull(&pinned, "default").await);
    let content = node.stack.containerd.ctr(&["content", "ls", "-q"]);
    assert!(
        content.contains(&digest) && content.contains(&ours_digest),
        "containerd holds the index and the node's manifest: {content}"
    );
    assert!(
        !content.contains(&theirs_digest),
        "containerd pulled the other platform's manifest too: {content}"
    );

    // Started through pullgate by ID alone: looked up, proven from the index's child, allowed.
    let mut cri = Cri::connect(&node.pullgate_socket()).await;
    let cfg = host_pod_config("s10-pod", "default");
    let pod = must("RunPodSandbox", cri.run_pod(&cfg).await);
    let c = must(
        "CreateContainer by image ID",
        cri.create_container(&pod, &cfg, "multi", &id, &strs(&grep_marker(ours_marker)))
            .await,
    );
    let code = must(
        "run container",
        cri.start_and_wait(&c, Duration::from_secs(60)).await,
    );
    assert_eq!(
        code, 0,
        "the container did not run the node's platform image"
    );
    let recs = node.audit_for("CreateContainer", &id);
    assert!(
        recs.iter().any(|r| r["decision"] == "allow"),
        "no allow audit record for the start of {id}: {recs:?}"
    );

    // Another image pulled past pullgate, then started as kubelet starts it: ImageStatus of the
    // pod spec's name through pullgate, then the start by the ID it answered. pullgate read the
    // manifest the name pins while containerd answered, so the start looks nothing up.
    let solo_pinned = format!("{}/approved/library/solo@{solo_digest}", node.private());
    let solo_id = must(
        "direct PullImage",
        direct.pull(&solo_pinned, "default").await,
    );
    let image_lookups = r#"pullgate_start_lookups_total{kind="image"}"#;
    let before = node
        .metric(image_lookups)
        .expect("the image lookup counter");
    let status = must(
        "ImageStatus through pullgate",
        cri.image_status("solo:1.0").await,
    );
    assert_eq!(status.image.map(|i| i.id), Some(solo_id.clone()));
    let c = must(
        "CreateContainer as kubelet",
        cri.create_container_as_kubelet(
            &pod,
            &cfg,
            "solo",
            &solo_id,
            "solo:1.0",
            &strs(&grep_marker(&format!(
                "{solo_marker} approved/library/solo:1.0"
            ))),
        )
        .await,
    );
    assert_eq!(
        must(
            "run container",
            cri.start_and_wait(&c, Duration::from_secs(60)).await
        ),
        0,
        "the container did not run the image"
    );
    assert_eq!(
        node.metric(image_lookups),
        Some(before),
        "the start looked its image up: it was not proven while kubelet asked about it"
    );
    let recs = node.audit_for("CreateContainer", "solo:1.0");
    assert!(
        recs.iter().any(|r| r["decision"] == "allow"),
        "no allow audit record for the start of solo:1.0: {recs:?}"
    );
    cri.remove_all_pods().await;
    loud(&format!("s10: {:?}", t0.elapsed()));
}
