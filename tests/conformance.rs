//! The behaviours a CRI conformance suite (critest) checks, through pullgate in **enforce** mode, with
//! a bundle that approves every image the client uses, against real containerd 1.6: pullgate must look
//! like containerd to every CRI client, not only to kubelet.
//!
//! - Images: pull by tag, by digest and without a tag; status by every kind of reference (tag,
//!   `repo@digest`, image ID, short and mirror names, and every name the status itself shows) is the
//!   same image with the same names; `ListImages` shows each image as `ImageStatus` does; several tags
//!   on one image; images whose config names a uid, a user name or `uid:gid`; `RemoveImage` removes
//!   the image with all its names, exactly as containerd 1.6 itself does (checked on containerd
//!   directly in the same test).
//! - Containers: create + start + exec with the image given by ID and by name, and as the config's
//!   user.
//! - A pod's scope is its sandbox's: a `sandbox_config` claiming a warn-mode namespace for a pod of an
//!   enforce-mode namespace is refused and audited with the real namespace; unknown and removed
//!   sandboxes are refused, and so is a sandbox named by an ID prefix (which containerd 1.6 itself
//!   resolves, checked directly in the same test).
//! - The sandbox (pause) image is checked again after every `pullgate bundle install`.
//!
//! Each test runs one node (registries, containerd, pullgate) for all of its checks: a containerd
//! start costs seconds. Needs root and the packages of `scripts/install-deps.sh`, like tests/e2e.rs.

mod support;

use std::time::Duration;

use k8s_cri::v1::Image;
use support::cri::{host_pod_config, sorted_images};
use support::images::{Fixture, copy_by_digest};
use support::node::{Approval, BundleSpec, Node, ORG, PAYMENTS_NS, WARN_NS, standard_bundle};
use support::{Cri, e2e_enabled, loud};
use tonic::{Code, Status};

fn must<T>(what: &str, r: Result<T, Status>) -> T {
    r.unwrap_or_else(|s| panic!("{what}: {:?}: {}", s.code(), s.message()))
}

/// The image `ImageStatus(reference)` answers through pullgate (panics if there is none).
async fn status(cri: &mut Cri, reference: &str) -> Image {
    must(
        &format!("ImageStatus {reference}"),
        cri.image_status(reference).await,
    )
    .image
    .unwrap_or_else(|| panic!("ImageStatus({reference}) found nothing"))
}

async fn absent(cri: &mut Cri, reference: &str) -> bool {
    must(
        &format!("ImageStatus {reference}"),
        cri.image_status(reference).await,
    )
    .image
    .is_none()
}

/// Builds one image (running as `user` if given) and pushes it to the public registry under every tag
/// of `repo` (all tags name the same manifest), copies it by digest to the private registry's mirror
/// path; returns its digest.
fn publish(node: &Node, repo: &str, tags: &[&str], user: Option<&str>) -> String {
    let stack = &node.stack;
    let layout_tag = stack.images.build(&Fixture {
        marker: format!("conformance {repo}"),
        entrypoint: vec![],
        cmd: vec!["/bin/sh".into()],
        user: user.map(str::to_string),
    });
    let mut digest = String::new();
    for tag in tags {
        digest = stack
            .images
            .push_tag(&layout_tag, &stack.public, &format!("{repo}:{tag}"));
    }
    copy_by_digest(
        &stack.public.host(),
        repo,
        &digest,
        &stack.private.host(),
        &format!("approved/{repo}"),
    );
    digest
}

/// Runs `cmd` in a running container; returns its stdout, trimmed.
async fn exec(cri: &mut Cri, container: &str, cmd: &[&str]) -> String {
    let r = must("ExecSync", cri.exec_sync(container, cmd).await);
    assert_eq!(r.exit_code, 0, "{cmd:?}: {r:?}");
    String::from_utf8_lossy(&r.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_and_containers_through_pullgate_look_as_in_containerd() {
    if !e2e_enabled("images_and_containers_through_pullgate_look_as_in_containerd") {
        return;
    }
    let node = Node::start("conformance", "enforce");
    let t0 = std::time::Instant::now();
    let bb = node.fx.busybox.clone();
    let digest_only = publish(&node, "library/digestonly", &["pushed"], None);
    let latest = publish(&node, "library/latestimg", &["latest"], None);
    let multi = publish(&node, "library/multi", &["1", "1.0"], None);
    let users = [
        ("uid", "1002", "1002", "0"),
        ("username", "www-data", "33", "33"),
        ("uidgid", "1003:1003", "1003", "1003"),
    ];
    let user_digests: Vec<String> = users
        .iter()
        .map(|(tag, user, _, _)| publish(&node, "library/users", &[tag], Some(user)))
        .collect();
    let mut spec = standard_bundle(&node.stack, &node.fx, 2);
    spec.images.extend([
        Approval {
            source: "docker.io/library/digestonly".into(),
            tags: vec![],
            digests: vec![digest_only.clone()],
            scope: ORG.into(),
        },
        Approval::tag("docker.io/library/latestimg", "latest", &latest, ORG),
        Approval {
            source: "docker.io/library/multi".into(),
            tags: vec![("1".into(), multi.clone()), ("1.0".into(), multi.clone())],
            digests: vec![],
            scope: ORG.into(),
        },
        Approval {
            source: "docker.io/library/users".into(),
            tags: users
                .iter()
                .zip(&user_digests)
                .map(|((tag, ..), d)| (tag.to_string(), d.clone()))
                .collect(),
            digests: vec![],
            scope: ORG.into(),
        },
    ]);
    let out = node.install(&node.keys.sign(&spec, "conformance-v2"));
    assert!(out.success(), "{out}");
    node.wait_for_bundle(2);
    loud(&format!(
        "conformance: fixtures and bundle v2 in {:?}",
        t0.elapsed()
    ));
    let mut cri = Cri::connect(&node.pullgate_socket()).await;
    let mut direct = Cri::connect(&node.stack.containerd.socket).await;

    // Pull by tag: named exactly as containerd names an image it pulled by that tag.
    let id = must("pull by tag", cri.pull("busybox:1.36", PAYMENTS_NS).await);
    let by_tag = status(&mut cri, "busybox:1.36").await;
    assert_eq!(by_tag.id, id);
    assert_eq!(by_tag.repo_tags, ["docker.io/library/busybox:1.36"]);
    assert_eq!(
        by_tag.repo_digests,
        [format!("docker.io/library/busybox@{}", bb.digest)]
    );
    // Everything but the names is containerd's own answer.
    let raw = status(&mut direct, &id).await;
    assert_eq!(
        Image {
            repo_tags: by_tag.repo_tags.clone(),
            repo_digests: by_tag.repo_digests.clone(),
            ..raw
        },
        by_tag
    );

    // Status by every kind of reference, and by every name the status shows: the same image.
    let mut references = vec![
        "docker.io/library/busybox:1.36".to_string(),
        "library/busybox:1.36".to_string(),
        format!("busybox@{}", bb.digest),
        format!("docker.io/library/busybox@{}", bb.digest),
        node.mirror_ref(&bb),
        id.clone(),
    ];
    references.extend(by_tag.repo_tags.iter().cloned());
    references.extend(by_tag.repo_digests.iter().cloned());
    for r in &references {
        assert_eq!(status(&mut cri, r).await, by_tag, "ImageStatus({r})");
    }

    // Pull by digest: no tag is shown, the digest is.
    let by_digest = format!("docker.io/library/digestonly@{digest_only}");
    let digest_id = must("pull by digest", cri.pull(&by_digest, PAYMENTS_NS).await);
    let st = status(&mut cri, &by_digest).await;
    assert_eq!(st.id, digest_id);
    assert!(st.repo_tags.is_empty(), "{st:?}");
    assert_eq!(st.repo_digests, std::slice::from_ref(&by_digest));
    assert_eq!(status(&mut cri, &digest_id).await, st);

    // Pull without a tag: `latest`.
    let latest_id = must("pull without tag", cri.pull("latestimg", PAYMENTS_NS).await);
    let st = status(&mut cri, "latestimg").await;
    assert_eq!(st.id, latest_id);
    assert_eq!(st.repo_tags, ["docker.io/library/latestimg:latest"]);

    // Several tags on one image: one image, both tags, however it is asked for.
    let m1 = must("pull multi:1", cri.pull("multi:1", PAYMENTS_NS).await);
    let m10 = must("pull multi:1.0", cri.pull("multi:1.0", PAYMENTS_NS).await);
    assert_eq!(m1, m10);
    let st = status(&mut cri, "multi:1").await;
    assert_eq!(
        st.repo_tags,
        ["docker.io/library/multi:1", "docker.io/library/multi:1.0"]
    );
    assert_eq!(status(&mut cri, "multi:1.0").await, st);
    assert_eq!(status(&mut cri, &m1).await, st);

    // Images whose config names a user: CRI's uid / username come through untouched.
    let mut user_ids = Vec::new();
    for (tag, user, _, _) in &users {
        let name = format!("docker.io/library/users:{tag}");
        let uid = must(&format!("pull {name}"), cri.pull(&name, PAYMENTS_NS).await);
        let st = status(&mut cri, &name).await;
        let raw = status(&mut direct, &uid).await;
        assert_eq!((&st.uid, &st.username), (&raw.uid, &raw.username), "{name}");
        match *tag {
            "username" => assert_eq!((st.uid, st.username.as_str()), (None, *user)),
            _ => {
                let numeric: i64 = user.split(':').next().unwrap().parse().unwrap();
                assert_eq!(st.uid.map(|u| u.value), Some(numeric), "{name}: {st:?}");
            }
        }
        user_ids.push((name, uid));
    }

    // ListImages shows each image exactly as ImageStatus does.
    let listed = sorted_images(must("ListImages", cri.list_images().await));
    for img in &listed {
        let st = status(&mut cri, &img.id).await;
        assert_eq!(
            sorted_images(vec![st]),
            std::slice::from_ref(img),
            "{}",
            img.id
        );
    }
    let direct_count = must("direct ListImages", direct.list_images().await).len();
    assert_eq!(listed.len(), direct_count, "the same images");
    assert!(
        listed.iter().any(|i| i.id == m1 && i.repo_tags.len() == 2),
        "{listed:?}"
    );

    // Containers: create + start + exec with the image by ID (kubelet) and by name (crictl).
    let cfg = host_pod_config("conformance", PAYMENTS_NS);
    let pod = must("RunPodSandbox", cri.run_pod(&cfg).await);
    let by_id = must(
        "CreateContainer by ID",
        cri.create_container_as_kubelet(
            &pod,
            &cfg,
            "by-id",
            &id,
            "busybox:1.36",
            &["/bin/sleep", "300"],
        )
        .await,
    );
    let by_name = must(
        "CreateContainer by name",
        cri.create_container(
            &pod,
            &cfg,
            "by-name",
            "busybox:1.36",
            &["/bin/sleep", "300"],
        )
        .await,
    );
    for c in [&by_id, &by_name] {
        must("StartContainer", cri.start_container(c).await);
        let marker = exec(&mut cri, c, &["/bin/cat", "/etc/pullgate-fixture"]).await;
        assert!(marker.contains(&bb.marker), "{c}: {marker}");
        // Pinned to the checked image; containerd reports the image by its (mirror) repo digest.
        let st = must("ContainerStatus", cri.container_status(c).await)
            .status
            .unwrap();
        assert_eq!(st.image.map(|i| i.image), Some(id.clone()), "{c}");
        assert_eq!(st.image_ref, node.mirror_ref(&bb), "{c}");
    }
    // As the image's user.
    for ((name, _), (tag, _, uid, gid)) in user_ids.iter().zip(&users) {
        let c = must(
            &format!("CreateContainer {name}"),
            cri.create_container(&pod, &cfg, tag, name, &["/bin/sleep", "300"])
                .await,
        );
        must("StartContainer", cri.start_container(&c).await);
        assert_eq!(exec(&mut cri, &c, &["/bin/id", "-u"]).await, *uid, "{name}");
        assert_eq!(exec(&mut cri, &c, &["/bin/id", "-g"]).await, *gid, "{name}");
    }
    cri.remove_all_pods().await;

    // RemoveImage: what containerd 1.6 itself does with an image that has several names — checked
    // on containerd directly, with an image pulled under two tags from the private registry...
    let private = node.stack.private.host();
    let tag = node.stack.images.build_image("direct multi");
    for t in ["a", "b"] {
        node.stack
            .images
            .push_tag(&tag, &node.stack.private, &format!("direct/multi:{t}"));
        must(
            "direct pull",
            direct
                .pull(&format!("{private}/direct/multi:{t}"), "default")
                .await,
        );
    }
    let both = status(&mut direct, &format!("{private}/direct/multi:a")).await;
    assert_eq!(both.repo_tags.len(), 2, "{both:?}");
    must(
        "direct RemoveImage",
        direct
            .remove_image(&format!("{private}/direct/multi:a"))
            .await,
    );
    assert!(
        absent(&mut direct, &format!("{private}/direct/multi:b")).await
            && absent(&mut direct, &both.id).await,
        "containerd 1.6 removes an image with all its names"
    );
    // ...and pullgate does the same by one approved name.
    must("RemoveImage multi:1", cri.remove_image("multi:1").await);
    for r in ["multi:1.0", "multi:1", m1.as_str()] {
        assert!(absent(&mut cri, r).await, "{r} still there");
    }
    // critest's remove: by tag, then gone by tag and by ID; removing it again is not an error.
    must(
        "RemoveImage busybox:1.36",
        cri.remove_image("busybox:1.36").await,
    );
    assert!(absent(&mut cri, "busybox:1.36").await && absent(&mut cri, &id).await);
    must("RemoveImage again", cri.remove_image("busybox:1.36").await);
    // And pulled again, it is back.
    must("pull again", cri.pull("busybox:1.36", PAYMENTS_NS).await);
    assert_eq!(status(&mut cri, "busybox:1.36").await, by_tag);
    loud(&format!("conformance: {:?}", t0.elapsed()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pod_scope_is_the_sandboxs_and_the_sandbox_image_follows_the_bundle() {
    if !e2e_enabled("the_pod_scope_is_the_sandboxs_and_the_sandbox_image_follows_the_bundle") {
        return;
    }
    let node = Node::start("pod-scope", "enforce");
    let mut cri = Cri::connect(&node.pullgate_socket()).await;
    let mut direct = Cri::connect(&node.stack.containerd.socket).await;

    // nginx is not in the bundle; a warn-mode namespace may pull it (allowed, audited).
    let nginx = must("pull in warn ns", cri.pull("nginx:1.25", WARN_NS).await);

    // A pod of the enforce-mode namespace, whose container claims the warn-mode namespace.
    let real = host_pod_config("spoofer", PAYMENTS_NS);
    let pod = must("RunPodSandbox", cri.run_pod(&real).await);
    let claim = host_pod_config("spoofer", WARN_NS);
    let e = cri
        .create_container_as_kubelet(&pod, &claim, "c", &nginx, "nginx:1.25", &["/bin/true"])
        .await
        .expect_err("a spoofed sandbox_config must not start an unapproved image");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("does not match pod sandbox"),
        "{}",
        e.message()
    );
    let last = node.audit().last().cloned().unwrap();
    assert_eq!(
        (&last["reason"], &last["pod_namespace"], &last["decision"]),
        (
            &"sandbox_mismatch".into(),
            &PAYMENTS_NS.into(),
            &"deny".into()
        ),
        "{last}"
    );
    // Told the truth, it is denied on policy, for the real namespace.
    let e = cri
        .create_container_as_kubelet(&pod, &real, "c", &nginx, "nginx:1.25", &["/bin/true"])
        .await
        .expect_err("unapproved in an enforce-mode namespace");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(node.audit().last().unwrap()["reason"], "not_in_bundle");
    let containers = must("direct ListContainers", direct.list_containers().await);
    assert!(containers.containers.is_empty(), "{containers:?}");
    // A real pod of the warn-mode namespace may run it (warned).
    let warn_cfg = host_pod_config("sandboxed", WARN_NS);
    let warn_pod = must("RunPodSandbox warn", cri.run_pod(&warn_cfg).await);
    must(
        "CreateContainer in the warn-mode namespace",
        cri.create_container_as_kubelet(
            &warn_pod,
            &warn_cfg,
            "c",
            &nginx,
            "nginx:1.25",
            &["/bin/true"],
        )
        .await,
    );
    let last = node.audit().last().cloned().unwrap();
    assert_eq!(
        (&last["decision"], &last["pod_namespace"]),
        (&"warn".into(), &WARN_NS.into()),
        "{last}"
    );
    // containerd resolves a unique prefix of a sandbox ID, in PodSandboxStatus and CreateContainer
    // alike; a prefix can name another sandbox later, so pullgate refuses it.
    let prefix = &warn_pod[..12];
    let resolved = must(
        "direct PodSandboxStatus by prefix",
        direct
            .rt
            .pod_sandbox_status(k8s_cri::v1::PodSandboxStatusRequest {
                pod_sandbox_id: prefix.to_string(),
                verbose: false,
            })
            .await
            .map(|r| r.into_inner()),
    );
    assert_eq!(resolved.status.map(|s| s.id).as_deref(), Some(&*warn_pod));
    must(
        "direct CreateContainer by prefix",
        direct
            .create_container_as_kubelet(
                prefix,
                &warn_cfg,
                "by-prefix",
                &nginx,
                "nginx:1.25",
                &["/bin/true"],
            )
            .await,
    );
    let e = cri
        .create_container_as_kubelet(
            prefix,
            &warn_cfg,
            "c2",
            &nginx,
            "nginx:1.25",
            &["/bin/true"],
        )
        .await
        .expect_err("a sandbox named by an ID prefix");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("abbreviation") && e.message().contains(&*warn_pod),
        "{}",
        e.message()
    );
    assert_eq!(
        node.audit().last().unwrap()["reason"],
        "sandbox_id_abbreviated"
    );
    // Unknown sandboxes, and removed ones, are refused.
    let e = cri
        .create_container(&"0".repeat(64), &real, "c", &nginx, &["/bin/true"])
        .await
        .expect_err("no such sandbox");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    must("remove pod", cri.remove_pod(&pod).await);
    let e = cri
        .create_container(&pod, &real, "c", &nginx, &["/bin/true"])
        .await
        .expect_err("removed sandbox");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    cri.remove_all_pods().await;

    // The sandbox image is checked again after every bundle install.
    let approved = |node: &Node| {
        let s = node.status_json();
        let m = node.metrics();
        (
            s["sandbox_image_problem"].as_str().map(str::to_string),
            m.contains("pullgate_sandbox_image_approved 1"),
        )
    };
    assert_eq!(approved(&node), (None, true));
    let mut v2: BundleSpec = standard_bundle(&node.stack, &node.fx, 2);
    v2.images.retain(|a| a.source != "registry.k8s.io/pause");
    let out = node.install(&node.keys.sign(&v2, "no-pause-v2"));
    assert!(out.success(), "{out}");
    node.wait_for_bundle(2);
    support::process::wait_for(
        "the sandbox image to be reported unapproved",
        Duration::from_secs(10),
        || match approved(&node) {
            (Some(p), false) if p.contains("not approved") => Some(()),
            _ => None,
        },
    );
    let out = node.install(
        &node
            .keys
            .sign(&standard_bundle(&node.stack, &node.fx, 3), "with-pause-v3"),
    );
    assert!(out.success(), "{out}");
    support::process::wait_for(
        "the sandbox image to be reported approved again",
        Duration::from_secs(10),
        || (approved(&node) == (None, true)).then_some(()),
    );
}
