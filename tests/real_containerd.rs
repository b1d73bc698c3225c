//! Real-stack tests against containerd 1.6: a loopback registry, a private containerd, and pullgate.
//!
//! - `direct_stack_smoke` proves the harness itself (no pullgate): images built offline, pushed, copied
//!   by digest, pulled by containerd from the loopback registries only, and a host-network pod running a
//!   container whose exit code we read back.
//! - `proxy_forwards_read_calls_unchanged` puts pullgate in front and checks that Version, Status,
//!   ListImages and ImageStatus (present and absent image) answer exactly what containerd answers.
//!
//! Both need root and the Debian packages of `scripts/install-deps.sh`; `PULLGATE_SKIP_E2E=1` skips them
//! loudly, and a missing prerequisite fails them.

mod support;

use std::time::Instant;

use support::cri::sorted_images;
use support::images::copy_by_digest;
use support::{Cri, Stack, e2e_enabled};

#[tokio::test(flavor = "current_thread")]
async fn direct_stack_smoke() {
    if !e2e_enabled("direct_stack_smoke") {
        return;
    }
    let t0 = Instant::now();
    let stack = Stack::start("smoke");
    let digest = stack
        .images
        .push_image(&stack.public, "library/busybox:1", "smoke");
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "odd digest {digest}"
    );

    let mut cri = Cri::connect(&stack.containerd.socket).await;
    let version = cri.version().await.expect("Version");
    assert_eq!(version.runtime_name, "containerd");
    assert_eq!(version.runtime_api_version, "v1");

    // A docker.io name resolves to the loopback public registry (hosts.toml), never the internet.
    let mark = stack.public.mark();
    let image_ref = cri
        .pull("docker.io/library/busybox:1", "default")
        .await
        .expect("PullImage");
    assert!(image_ref.starts_with("sha256:"), "image ref {image_ref}");
    let requests = stack.public.requests_since(mark);
    assert!(
        requests
            .iter()
            .any(|r| r.ends_with(" /v2/library/busybox/manifests/1?ns=docker.io")),
        "the public registry did not see the manifest request: {requests:?}"
    );
    let status = cri
        .image_status("docker.io/library/busybox:1")
        .await
        .expect("ImageStatus");
    let image = status.image.expect("image present after pull");
    assert_eq!(image.id, image_ref);
    assert!(
        image
            .repo_digests
            .contains(&format!("docker.io/library/busybox@{digest}")),
        "repo digests {:?} lack {digest}",
        image.repo_digests
    );

    // Copy by digest to the private registry (the approved mirror) and pull it from there by digest.
    copy_by_digest(
        &stack.public.host(),
        "library/busybox",
        &digest,
        &stack.private.host(),
        "approved/library/busybox",
    );
    let pinned = format!("{}/approved/library/busybox@{digest}", stack.private.host());
    let pinned_ref = cri
        .pull(&pinned, "default")
        .await
        .expect("PullImage by digest from the private registry");
    assert_eq!(pinned_ref, image_ref, "same manifest, same image config");

    // A different build has a different digest.
    let other = stack
        .images
        .push_image(&stack.public, "library/busybox:2", "smoke-other");
    assert_ne!(other, digest);

    // A host-network pod (pause image from the private registry) running real containers.
    let code = cri
        .run_to_exit(
            "smoke-true",
            "default",
            "docker.io/library/busybox:1",
            &["/bin/true"],
        )
        .await;
    assert_eq!(code.expect("run /bin/true"), 0);
    let code = cri
        .run_to_exit(
            "smoke-exit",
            "default",
            &pinned,
            &[
                "/bin/sh",
                "-c",
                "grep -q smoke /etc/pullgate-fixture && exit 3",
            ],
        )
        .await;
    assert_eq!(
        code.expect("run sh -c 'exit 3'"),
        3,
        "the container's exit code must come back"
    );

    // Pulling an image that no registry has fails, and is asked of the loopback registry, not the
    // internet: for a listed public name, and for a name listed nowhere (containerd's `_default`).
    for (image, path) in [
        (
            "quay.io/nobody/nothing:1",
            " /v2/nobody/nothing/manifests/1?ns=quay.io",
        ),
        (
            "unlisted.example/nobody/nothing:1",
            " /v2/nobody/nothing/manifests/1?ns=unlisted.example",
        ),
    ] {
        let mark = stack.public.mark();
        let missing = cri.pull(image, "default").await;
        assert!(
            missing.is_err(),
            "pull of a missing image succeeded: {missing:?}"
        );
        let requests = stack.public.requests_since(mark);
        assert!(
            requests.iter().any(|r| r.ends_with(path)),
            "{image}: the loopback registry did not see {path}: {requests:?}"
        );
    }

    cri.remove_all_pods().await;
    support::loud(&format!("direct_stack_smoke: {:?}", t0.elapsed()));
}

// Multi-threaded, so the clients' connection tasks keep running (and close) while the stack's `Drop`
// blocks the test thread: pullgate's graceful drain then finishes at once instead of waiting out its grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_forwards_read_calls_unchanged() {
    if !e2e_enabled("proxy_forwards_read_calls_unchanged") {
        return;
    }
    let t0 = Instant::now();
    let mut stack = Stack::start("proxy-read");
    let digest = stack
        .images
        .push_image(&stack.public, "library/busybox:1", "proxy-read");
    let mut direct = Cri::connect(&stack.containerd.socket).await;
    direct
        .pull("docker.io/library/busybox:1", "default")
        .await
        .expect("direct PullImage");

    stack.start_pullgate("");
    let mut proxied = Cri::connect(&stack.pullgate_socket()).await;

    let v_direct = direct.version().await.expect("direct Version");
    let v_proxied = proxied.version().await.expect("Version through pullgate");
    assert_eq!(v_proxied, v_direct);

    let s_direct = direct.status().await.expect("direct Status");
    let s_proxied = proxied.status().await.expect("Status through pullgate");
    assert_eq!(s_proxied, s_direct);

    let l_direct = sorted_images(direct.list_images().await.expect("direct ListImages"));
    let l_proxied = sorted_images(
        proxied
            .list_images()
            .await
            .expect("ListImages through pullgate"),
    );
    assert!(
        l_direct.iter().any(|i| i
            .repo_digests
            .contains(&format!("docker.io/library/busybox@{digest}"))),
        "ListImages lacks the pulled image: {l_direct:?}"
    );
    assert_eq!(l_proxied, l_direct);

    for image in [
        "docker.io/library/busybox:1",
        &format!("docker.io/library/busybox@{digest}"),
    ] {
        let direct_status = direct
            .image_status(image)
            .await
            .expect("direct ImageStatus");
        assert!(direct_status.image.is_some(), "{image} should be present");
        let proxied_status = proxied
            .image_status(image)
            .await
            .expect("ImageStatus through pullgate");
        assert_eq!(proxied_status, direct_status, "ImageStatus({image})");
    }

    let absent = "registry.k8s.io/not/there:1";
    let direct_absent = direct
        .image_status(absent)
        .await
        .expect("direct ImageStatus (absent)");
    assert!(direct_absent.image.is_none());
    let proxied_absent = proxied
        .image_status(absent)
        .await
        .expect("ImageStatus through pullgate (absent)");
    assert_eq!(proxied_absent, direct_absent);

    drop((direct, proxied));
    let pullgate = stack.pullgate.as_mut().expect("pullgate");
    let stopped = Instant::now();
    let status = pullgate.stop().expect("pullgate exit status");
    assert!(status.success(), "pullgate exited with {status} on SIGTERM");
    support::loud(&format!(
        "proxy_forwards_read_calls_unchanged: {:?} (pullgate stopped in {:?})",
        t0.elapsed(),
        stopped.elapsed()
    ));
}
