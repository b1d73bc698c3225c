//! Enforcement in the CRI path, in-process: a real pullgate node (bundle store, enforcer, audit log)
//! in front of the fake CRI upstream, asserting what the upstream actually received.

mod fake_cri;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fake_cri::*;
use k8s_cri::v1 as cri;
use pullgate::node::config::{Config, NodeMode};
use pullgate::node::daemon::node::Node;
use pullgate::node::daemon::{Control, Server};
use pullgate::node::proxy::Proxy;
use pullgate::policy::{PrivateKey, SignatureFile};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tonic::Code;

const PRIVATE: &str = "registry.corp";

fn digest(n: u8) -> String {
    format!("sha256:{}", format!("{n:02x}").repeat(32))
}

/// A bundle with busybox (1.36 → D1, bare D2) for the whole organisation, nginx 1.25 (D3) for the
/// payments program only, a warn-mode project, and a first-party prefix.
fn bundle_json(version: u64, busybox_136: &str, expires_in: time::Duration) -> String {
    let now = OffsetDateTime::now_utc();
    let fmt = |t: OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let prov = r#"{"license":"GPL-2.0-only","scans":[{"scanner":"trivy","version":"0.58.1","report":"sha256:6565656565656565656565656565656565656565656565656565656565656565","worst_severity":"low"}],"approved_by":"alice@corp.example","approved_at":"2026-01-01T00:00:00Z"}"#;
    format!(
        r#"{{
  "format": 1, "version": {version},
  "issued_at": "{issued}", "expires_at": "{expires}", "issuer": "tests@corp.example",
  "private_registry": "{PRIVATE}",
  "mirrors": [{{"source": "docker.io", "target": "approved"}}],
  "governance": {{
    "organization": "corp", "application_label": "app", "mode": "enforce",
    "programs": [
      {{"name": "payments", "projects": [
        {{"name": "checkout", "namespaces": ["checkout"]}},
        {{"name": "ledger", "mode": "warn", "namespaces": ["ledger"]}}]}},
      {{"name": "search", "projects": [{{"name": "index", "namespaces": ["search"]}}]}}
    ]
  }},
  "first_party": [{{"prefix": "{PRIVATE}/apps/shared/", "scope": "corp", "require_digest": false}}],
  "images": [
    {{"source": "docker.io/library/busybox", "tags": {{"1.36": "{busybox_136}"}}, "digests": ["{d2}"], "scope": "corp", "provenance": {prov}}},
    {{"source": "docker.io/library/nginx", "tags": {{"1.25": "{d3}"}}, "scope": "corp/payments", "provenance": {prov}}}
  ]
}}"#,
        issued = fmt(now - time::Duration::hours(1)),
        expires = fmt(now + expires_in),
        d2 = digest(2),
        d3 = digest(3),
    )
}

struct Keys {
    alice: PrivateKey,
    bob: PrivateKey,
    mallory: PrivateKey,
}

impl Keys {
    fn new() -> Keys {
        Keys {
            alice: PrivateKey::from_seed([1; 32]),
            bob: PrivateKey::from_seed([2; 32]),
            mallory: PrivateKey::from_seed([9; 32]),
        }
    }

    fn trust_toml(&self) -> String {
        format!(
            "threshold = 2\n[[keys]]\nname = \"alice\"\npublic_key = \"{}\"\n[[keys]]\nname = \"bob\"\npublic_key = \"{}\"\n",
            self.alice.public(),
            self.bob.public()
        )
    }

    fn sign(&self, bundle: &str, by: &[&PrivateKey]) -> String {
        let mut sigs = SignatureFile::new();
        for k in by {
            sigs.add(k.sign_bundle(bundle.as_bytes()));
        }
        sigs.to_json()
    }
}

struct Env {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    fake: FakeCri,
    upstream: Option<FakeServer>,
    node: Arc<Node>,
    listen: PathBuf,
    control: mpsc::Sender<Control>,
    task: tokio::task::JoinHandle<pullgate::node::daemon::RunSummary>,
    keys: Keys,
}

impl Env {
    /// A node with bundle v1 installed (unless `install` is false), in `mode`.
    async fn start(install: bool, mode: NodeMode, tweak: impl FnOnce(&mut Config, &Path)) -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let keys = Keys::new();
        std::fs::write(dir.join("trust.toml"), keys.trust_toml()).unwrap();
        let (fake, _events) = FakeCri::new();
        let upstream = fake.serve(&dir.join("cri.sock"));
        let mut config = Config::default();
        config.server.listen = dir.join("pullgate.sock");
        config.server.upstream = dir.join("cri.sock");
        config.policy.mode = mode;
        config.policy.trust = dir.join("trust.toml");
        config.policy.state_dir = dir.join("state");
        config.policy.drop_dir = Some(dir.join("incoming"));
        config.audit.path = dir.join("state/audit.log");
        config.metrics.listen = None;
        tweak(&mut config, &dir);
        std::fs::create_dir_all(dir.join("incoming")).unwrap();
        if install {
            let b = bundle_json(1, &digest(1), time::Duration::days(30));
            let s = keys.sign(&b, &[&keys.alice, &keys.bob]);
            drop_bundle(&dir, "v1", &b, &s);
        }
        let node = Node::start(config.clone()).expect("node starts");
        node.poll_drop_dir();
        let proxy = Proxy::new(
            node.upstream.clone(),
            node.enforcer.intercept_table(),
            node.metrics.clone(),
        );
        let reload_node = node.clone();
        let server = Server::bind_with(&config.server, proxy)
            .unwrap()
            .on_reload(Arc::new(move || reload_node.reload()));
        let (control, rx) = mpsc::channel(4);
        let task = tokio::spawn(server.run(rx));
        Env {
            _dir: tmp,
            dir,
            fake,
            upstream: Some(upstream),
            node,
            listen: config.server.listen,
            control,
            task,
            keys,
        }
    }

    async fn images(
        &self,
    ) -> cri::image_service_client::ImageServiceClient<tonic::transport::Channel> {
        image_client(cri_channel(&self.listen).await)
    }

    async fn runtime(
        &self,
    ) -> cri::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel> {
        runtime_client(cri_channel(&self.listen).await)
    }

    fn pulled(&self) -> Vec<String> {
        self.fake
            .observed
            .pulls
            .lock()
            .unwrap()
            .iter()
            .map(|p| p.image.as_ref().unwrap().image.clone())
            .collect()
    }

    fn audit_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("state/audit.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }

    /// What `pullgate bundle install` does: verify and install bundle `version` (busybox 1.36 bound
    /// to `busybox_136`) into the state dir, then reload (SIGHUP).
    async fn install_and_reload(&self, version: u64, busybox_136: &str) {
        let b = bundle_json(version, busybox_136, time::Duration::days(30));
        let s = self.keys.sign(&b, &[&self.keys.alice, &self.keys.bob]);
        let trust = pullgate::policy::Trust::from_toml(&self.keys.trust_toml()).unwrap();
        self.node
            .store
            .install(
                b.as_bytes(),
                s.as_bytes(),
                &trust,
                OffsetDateTime::now_utc(),
                Path::new(&format!("v{version}.json")),
            )
            .unwrap();
        self.control.send(Control::Reload).await.unwrap();
    }

    /// The image the upstream was last asked about (ImageStatus).
    fn last_image_status(&self) -> String {
        self.fake
            .observed
            .image_statuses
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("an ImageStatus reached the upstream")
    }

    /// The last `CreateContainer` that reached the upstream.
    fn last_create(&self) -> cri::CreateContainerRequest {
        self.fake
            .observed
            .creates
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a CreateContainer reached the upstream")
    }

    async fn stop(mut self) {
        self.control.send(Control::Shutdown).await.unwrap();
        self.task.await.unwrap();
        if let Some(u) = self.upstream.take() {
            u.stop().await;
        }
    }
}

/// Fleet-tooling style drop: signatures first, then the bundle, each via a temp name + rename.
fn drop_bundle(dir: &Path, name: &str, bundle: &str, sigs: &str) {
    let inc = dir.join("incoming");
    std::fs::write(inc.join(format!(".{name}.json.sig.tmp")), sigs).unwrap();
    std::fs::rename(
        inc.join(format!(".{name}.json.sig.tmp")),
        inc.join(format!("{name}.json.sig")),
    )
    .unwrap();
    std::fs::write(inc.join(format!(".{name}.json.tmp")), bundle).unwrap();
    std::fs::rename(
        inc.join(format!(".{name}.json.tmp")),
        inc.join(format!("{name}.json")),
    )
    .unwrap();
}

fn pull_request(image: &str, namespace: &str) -> cri::PullImageRequest {
    cri::PullImageRequest {
        image: Some(cri::ImageSpec {
            image: image.into(),
            annotations: [(
                "kubernetes.io/runtimehandler".to_string(),
                "runc".to_string(),
            )]
            .into(),
            user_specified_image: image.into(),
            runtime_handler: String::new(),
        }),
        auth: None,
        sandbox_config: Some(cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: "pod-a".into(),
                namespace: namespace.into(),
                uid: "uid-123".into(),
                attempt: 0,
            }),
            labels: [("app".to_string(), "web".to_string())].into(),
            ..Default::default()
        }),
    }
}

/// A pod's sandbox config in namespace `ns` (name `pod-a`, uid `uid-<ns>`) with `labels`.
fn pod_config(ns: &str, labels: &[(&str, &str)]) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "pod-a".into(),
            namespace: ns.into(),
            uid: format!("uid-{ns}"),
            attempt: 0,
        }),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

fn pinned(repo: &str, d: &str) -> String {
    format!("{PRIVATE}/approved/library/{repo}@{d}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_are_pinned_rewritten_or_denied() {
    let env = Env::start(true, NodeMode::Enforce, |_, _| {}).await;
    let mut images = env.images().await;

    // Approved tag, by short name: rewritten to the mirror, pinned; every other field unchanged.
    let req = pull_request("busybox:1.36", "checkout");
    let resp = images.pull_image(req.clone()).await.unwrap().into_inner();
    assert_eq!(
        resp.image_ref,
        format!("sha256:pulled-{}", pinned("busybox", &digest(1)))
    );
    let got = env.fake.observed.pulls.lock().unwrap()[0].clone();
    let mut want = req.clone();
    want.image.as_mut().unwrap().image = pinned("busybox", &digest(1));
    assert_eq!(got, want, "only image.image may change");

    // Approved bare digest; the private registry's own mirror reference; a first-party image.
    for (image, expected) in [
        (
            format!("docker.io/library/busybox@{}", digest(2)),
            pinned("busybox", &digest(2)),
        ),
        (
            format!("{PRIVATE}/approved/library/busybox:1.36"),
            pinned("busybox", &digest(1)),
        ),
        (
            format!("{PRIVATE}/apps/shared/tool:2"),
            format!("{PRIVATE}/apps/shared/tool:2"),
        ),
        ("nginx:1.25".to_string(), pinned("nginx", &digest(3))),
    ] {
        images
            .pull_image(pull_request(&image, "checkout"))
            .await
            .unwrap();
        assert_eq!(env.pulled().last().unwrap(), &expected, "{image}");
    }
    let before = env.pulled().len();

    // Denials: nothing reaches containerd, and the message tells a person what to do.
    let cases = [
        ("busybox:1.37", "checkout", "tag_not_approved", "1.36"),
        (
            &*format!("busybox@{}", digest(7)),
            "checkout",
            "digest_not_approved",
            "busybox",
        ),
        ("alpine:3.19", "checkout", "not_in_bundle", "alpine"),
        (
            "quay.io/evil/miner:latest",
            "checkout",
            "public_registry_blocked",
            "quay.io",
        ),
        ("nginx:1.25", "search", "out_of_scope", "nginx"),
        (
            "UPPER/case:1",
            "checkout",
            "public_registry_blocked",
            "UPPER",
        ),
        ("Busybox:1.36", "checkout", "invalid_reference", "Busybox"),
        (
            &*format!("{PRIVATE}/apps/other/x:1"),
            "checkout",
            "not_in_bundle",
            "apps/other",
        ),
    ];
    for (image, ns, reason, words) in cases {
        let e = images
            .pull_image(pull_request(image, ns))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{image}: {e:?}");
        assert!(e.message().contains(words), "{image}: {}", e.message());
        assert!(
            e.message().contains("v1"),
            "message names the bundle version: {}",
            e.message()
        );
        let last = env.audit_lines().pop().unwrap();
        assert_eq!(last["reason"], reason, "{image}");
        assert_eq!(last["decision"], "deny");
    }
    assert_eq!(
        env.pulled().len(),
        before,
        "no denied pull reached containerd"
    );

    // Warn-mode scope: forwarded as asked, recorded as a would-be denial.
    images
        .pull_image(pull_request("alpine:3.19", "ledger"))
        .await
        .unwrap();
    assert_eq!(env.pulled().last().unwrap(), "alpine:3.19");
    let last = env.audit_lines().pop().unwrap();
    assert_eq!(last["decision"], "warn");
    assert_eq!(last["reason"], "not_in_bundle");

    // Audit lines carry the pod and what was pulled.
    let first = &env.audit_lines()[0];
    assert_eq!(first["method"], "PullImage");
    assert_eq!(first["image"], "busybox:1.36");
    assert_eq!(first["normalized"], "docker.io/library/busybox:1.36");
    assert_eq!(first["pulled"], pinned("busybox", &digest(1)));
    assert_eq!(first["digest"], digest(1));
    assert_eq!(first["pod_namespace"], "checkout");
    assert_eq!(first["pod_uid"], "uid-123");
    assert_eq!(first["bundle_version"], 1);
    assert_eq!(first["decision"], "allow");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_follow_a_redirect() {
    let env = Env::start(true, NodeMode::Enforce, |_, _| {}).await;
    let mut images = env.images().await;
    let with_auth = |image: &str| {
        let mut r = pull_request(image, "checkout");
        r.auth = Some(cri::AuthConfig {
            username: "hub-user".into(),
            password: "hub-secret".into(),
            ..Default::default()
        });
        r
    };
    // Redirected from docker.io to the private registry: the docker.io credentials are dropped.
    images.pull_image(with_auth("busybox:1.36")).await.unwrap();
    let got = env
        .fake
        .observed
        .pulls
        .lock()
        .unwrap()
        .last()
        .cloned()
        .unwrap();
    assert_eq!(got.auth, None);
    // Same registry (first-party): the client's own credentials stay.
    images
        .pull_image(with_auth(&format!("{PRIVATE}/apps/shared/tool:1")))
        .await
        .unwrap();
    let got = env
        .fake
        .observed
        .pulls
        .lock()
        .unwrap()
        .last()
        .cloned()
        .unwrap();
    assert_eq!(got.auth.unwrap().password, "hub-secret");
    let audit = std::fs::read_to_string(env.dir.join("state/audit.log")).unwrap();
    assert!(
        !audit.contains("hub-secret") && !audit.contains("hub-user"),
        "no credentials in the audit log"
    );
    env.stop().await;

    // With private registry credentials configured, those are sent instead.
    let env = Env::start(true, NodeMode::Enforce, |c, dir| {
        let p = dir.join("registry-auth.toml");
        std::fs::write(&p, "username = \"pullgate\"\npassword = \"corp-secret\"\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        c.policy.private_registry_auth = Some(p);
    })
    .await;
    let mut images = env.images().await;
    images.pull_image(with_auth("busybox:1.36")).await.unwrap();
    let got = env
        .fake
        .observed
        .pulls
        .lock()
        .unwrap()
        .last()
        .cloned()
        .unwrap();
    let auth = got.auth.expect("private credentials sent");
    assert_eq!(
        (auth.username.as_str(), auth.password.as_str()),
        ("pullgate", "corp-secret")
    );
    env.stop().await;

    // A credentials file readable by others is refused at start, without printing its content.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("auth.toml");
    std::fs::write(&p, "username = \"u\"\npassword = \"leaky\"\n").unwrap();
    let e = pullgate::node::enforce::RegistryAuth::load(&p)
        .unwrap_err()
        .to_string();
    assert!(e.contains("chmod 600") && !e.contains("leaky"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_status_and_remove_find_what_was_pulled_and_follow_tag_moves() {
    let env = Env::start(true, NodeMode::Enforce, |_, _| {}).await;
    let mut images = env.images().await;
    let stored = cri::Image {
        id: digest(0xaa),
        repo_tags: vec![],
        repo_digests: vec![pinned("busybox", &digest(1))],
        size: 1,
        ..Default::default()
    };
    env.fake
        .observed
        .images
        .lock()
        .unwrap()
        .insert(pinned("busybox", &digest(1)), stored.clone());
    let status = |image: &str| cri::ImageStatusRequest {
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        verbose: false,
    };

    // kubelet's presence check by the name in the pod spec finds the pinned image, named as users expect.
    let got = images
        .image_status(status("busybox:1.36"))
        .await
        .unwrap()
        .into_inner()
        .image
        .unwrap();
    assert_eq!(env.last_image_status(), pinned("busybox", &digest(1)));
    assert_eq!(got.id, stored.id);
    // Shown as containerd would show the source names: the mirror copy is the same manifest.
    let want = cri::Image {
        repo_tags: vec!["docker.io/library/busybox:1.36".to_string()],
        repo_digests: vec![format!("docker.io/library/busybox@{}", digest(1))],
        ..stored.clone()
    };
    assert_eq!(got, want);
    // The same image whichever way it is asked for: every reference kind, and every name shown.
    env.fake
        .observed
        .images
        .lock()
        .unwrap()
        .insert(digest(0xaa), stored.clone());
    for r in [
        "docker.io/library/busybox:1.36".to_string(),
        "library/busybox:1.36".to_string(),
        format!("busybox@{}", digest(1)),
        format!("docker.io/library/busybox@{}", digest(1)),
        pinned("busybox", &digest(1)),
        digest(0xaa),
        digest(0xaa).trim_start_matches("sha256:").to_string(),
    ] {
        let asked_id = r.len() == 64;
        if asked_id {
            env.fake
                .observed
                .images
                .lock()
                .unwrap()
                .insert(r.clone(), stored.clone());
        }
        let by = images.image_status(status(&r)).await.unwrap().into_inner();
        assert_eq!(by.image.as_ref(), Some(&want), "ImageStatus({r})");
    }
    // IDs and unapproved names are asked for as written.
    images.image_status(status(&digest(0xaa))).await.unwrap();
    assert_eq!(env.last_image_status(), digest(0xaa));
    images.image_status(status("alpine:3.19")).await.unwrap();
    assert_eq!(env.last_image_status(), "alpine:3.19");

    // ListImages shows each image as ImageStatus does.
    let listed = images
        .list_images(cri::ListImagesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed.images,
        std::slice::from_ref(&want),
        "ListImages shows what ImageStatus shows"
    );

    // RemoveImage by the user's name removes the pinned image.
    images
        .remove_image(cri::RemoveImageRequest {
            image: status("busybox:1.36").image,
        })
        .await
        .unwrap();
    assert_eq!(
        env.fake.observed.removals.lock().unwrap().last().unwrap(),
        &pinned("busybox", &digest(1))
    );

    // v2 moves busybox:1.36 to D4: the next status check misses (kubelet pulls), the pull gets D4.
    let b = bundle_json(2, &digest(4), time::Duration::days(30));
    let s = env.keys.sign(&b, &[&env.keys.alice, &env.keys.bob]);
    drop_bundle(&env.dir, "v2", &b, &s);
    assert_eq!(env.node.poll_drop_dir(), 1);
    let missing = images
        .image_status(status("busybox:1.36"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        missing.image.is_none(),
        "the old digest must not satisfy the moved tag"
    );
    assert_eq!(env.last_image_status(), pinned("busybox", &digest(4)));
    images
        .pull_image(pull_request("busybox:1.36", "checkout"))
        .await
        .unwrap();
    assert_eq!(env.pulled().last().unwrap(), &pinned("busybox", &digest(4)));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_starts_need_an_approved_repo_digest_in_scope() {
    let env = Env::start(true, NodeMode::Enforce, |_, _| {}).await;
    let mut rt = env.runtime().await;
    // An image in the fake store, with a manifest in the content store for each repo digest that
    // really describes it (config = the image ID).
    let known = |id: u8, repo_digests: Vec<String>| {
        for rd in &repo_digests {
            put_manifest(
                &env.fake.observed,
                rd.rsplit_once('@').unwrap().1,
                &digest(id),
            );
        }
        let img = cri::Image {
            id: digest(id),
            repo_digests,
            ..Default::default()
        };
        env.fake
            .observed
            .images
            .lock()
            .unwrap()
            .insert(digest(id), img);
        digest(id)
    };
    let approved = known(0xa1, vec![pinned("busybox", &digest(1))]);
    let imported = known(0xa2, vec![format!("docker.io/library/miner@{}", digest(8))]);
    let payments_only = known(0xa3, vec![pinned("nginx", &digest(3))]);
    // Imported out of band under an approved name, but with other content: still denied.
    let spoofed = known(
        0xa4,
        vec![format!("docker.io/library/busybox@{}", digest(9))],
    );
    // Named after an approved digest (`ctr images tag evil …/busybox@<approved>`): CRI echoes the name
    // as a repo digest, but the content store shows that digest's manifest is another image's.
    let forged_name = format!("{PRIVATE}/approved/library/busybox@{}", digest(2));
    let forged = digest(0xa5);
    env.fake.observed.images.lock().unwrap().insert(
        forged.clone(),
        cri::Image {
            id: forged.clone(),
            repo_digests: vec![forged_name.clone()],
            ..Default::default()
        },
    );
    // The approved digest's real manifest (content-addressed) belongs to another image.
    put_manifest(&env.fake.observed, &digest(2), &digest(0x20));

    for ns in ["checkout", "search"] {
        env.fake
            .add_sandbox(&format!("sb-{ns}"), &pod_config(ns, &[("app", "web")]));
    }
    let create = |image: &str, ns: &str| cri::CreateContainerRequest {
        pod_sandbox_id: format!("sb-{ns}"),
        config: Some(cri::ContainerConfig {
            image: Some(cri::ImageSpec {
                image: image.into(),
                user_specified_image: "as-in-pod-spec:1".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        sandbox_config: Some(pod_config(ns, &[("app", "web")])),
    };
    rt.create_container(create(&approved, "checkout"))
        .await
        .unwrap();
    rt.create_container(create(&payments_only, "checkout"))
        .await
        .unwrap();
    assert_eq!(env.fake.observed.creates.lock().unwrap().len(), 2);
    for (image, ns) in [
        (&imported, "checkout"),
        (&payments_only, "search"),
        (&spoofed, "checkout"),
        (&forged, "checkout"),
        (&digest(0xee), "checkout"),
    ] {
        let e = rt.create_container(create(image, ns)).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{image} in {ns}: {e:?}");
        assert!(e.message().contains("as-in-pod-spec:1"), "{}", e.message());
    }
    assert_eq!(
        env.fake.observed.creates.lock().unwrap().len(),
        2,
        "denied starts never reach containerd"
    );
    // Started by name, the container is pinned to the image ID that was checked (a name could be
    // re-tagged between the check and containerd resolving it).
    let by_name = pinned("busybox", &digest(1));
    let approved_img = env.fake.observed.images.lock().unwrap()[&approved].clone();
    env.fake
        .observed
        .images
        .lock()
        .unwrap()
        .insert(by_name.clone(), approved_img);
    rt.create_container(create(&by_name, "checkout"))
        .await
        .unwrap();
    let sent = env.last_create();
    let sent_spec = sent.config.unwrap().image.unwrap();
    assert_eq!(sent_spec.image, approved, "pinned to the checked image ID");
    assert_eq!(
        sent_spec.user_specified_image, "as-in-pod-spec:1",
        "the rest is untouched"
    );
    // An approved repo digest whose manifest belongs to another image proves nothing for this one.
    let unproven = digest(0xa6);
    env.fake.observed.images.lock().unwrap().insert(
        unproven.clone(),
        cri::Image {
            id: unproven.clone(),
            repo_digests: vec![pinned("busybox", &digest(1))],
            ..Default::default()
        },
    );
    let e = rt
        .create_container(create(&unproven, "checkout"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let namespaces = env.fake.observed.content_namespaces.lock().unwrap().clone();
    assert!(
        !namespaces.is_empty() && namespaces.iter().all(|n| n == "k8s.io"),
        "{namespaces:?}"
    );
    let last = env.audit_lines().pop().unwrap();
    assert_eq!(last["method"], "CreateContainer");
    assert_eq!(last["decision"], "deny");
    // A second start of an allowed image is served from the cache (no new lookup).
    let lookups = env.fake.observed.image_statuses.lock().unwrap().len();
    rt.create_container(create(&approved, "checkout"))
        .await
        .unwrap();
    assert_eq!(
        env.fake.observed.image_statuses.lock().unwrap().len(),
        lookups
    );
    env.stop().await;
}

/// An image pullgate pulled starts without a lookup: containerd's answer to the pinned pull proved
/// its content. The proof decides only an allow; in a scope that may not run the image, the start is
/// looked up and denied as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_pullgate_pulled_starts_without_a_lookup() {
    let env = Env::start(true, NodeMode::Enforce, |_, _| {}).await;
    let image = digest(0xc1);
    // nginx:1.25 (D3) is approved for the payments program only.
    let pinned_nginx = format!("{PRIVATE}/approved/library/nginx@{}", digest(3));
    put_manifest(&env.fake.observed, &digest(3), &image);
    env.fake.observed.images.lock().unwrap().insert(
        pinned_nginx.clone(),
        cri::Image {
            id: image.clone(),
            repo_digests: vec![pinned_nginx.clone()],
            ..Default::default()
        },
    );
    env.fake.observed.images.lock().unwrap().insert(
        image.clone(),
        cri::Image {
            id: image.clone(),
            repo_digests: vec![pinned_nginx.clone()],
            ..Default::default()
        },
    );
    env.fake
        .add_sandbox("sb-checkout", &pod_config("checkout", &[]));
    env.fake
        .add_sandbox("sb-search", &pod_config("search", &[]));
    let mut images = env.images().await;
    let pulled = images
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: "nginx:1.25".into(),
                ..Default::default()
            }),
            sandbox_config: Some(pod_config("checkout", &[])),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pulled.image_ref, image);
    let create = |sandbox: &str, ns: &str| cri::CreateContainerRequest {
        pod_sandbox_id: sandbox.into(),
        config: Some(cri::ContainerConfig {
            image: Some(cri::ImageSpec {
                image: image.clone(),
                user_specified_image: "nginx:1.25".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        sandbox_config: Some(pod_config(ns, &[])),
    };
    let mut rt = env.runtime().await;
    let lookups = env.fake.observed.image_statuses.lock().unwrap().len();
    rt.create_container(create("sb-checkout", "checkout"))
        .await
        .unwrap();
    assert_eq!(
        env.fake.observed.image_statuses.lock().unwrap().len(),
        lookups,
        "the pull proved the image: no lookup"
    );
    let last = env.audit_lines().pop().unwrap();
    assert_eq!(last["method"], "CreateContainer");
    assert_eq!(last["decision"], "allow");
    // Not approved for the search program: looked up, then denied.
    let e = rt
        .create_container(create("sb-search", "search"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        env.fake.observed.image_statuses.lock().unwrap().len() > lookups,
        "decided from containerd's answer"
    );
    assert_eq!(env.fake.observed.creates.lock().unwrap().len(), 1);
    env.stop().await;
}

/// What a start proved of an image's content outlives the bundle: after a bundle update the next
/// start of the image is decided for the new bundle without asking containerd again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proven_image_starts_without_a_lookup_after_a_bundle_update() {
    let env = Env::start(false, NodeMode::Enforce, |_, _| {}).await;
    let install = |version: u64| {
        let b = bundle_json(version, &digest(1), time::Duration::hours(1));
        let s = env.keys.sign(&b, &[&env.keys.alice, &env.keys.bob]);
        drop_bundle(&env.dir, &format!("v{version}"), &b, &s);
        env.node.poll_drop_dir();
        assert_eq!(env.node.state.current().map(|b| b.version), Some(version));
    };
    install(1);
    let image = digest(0xb2);
    put_manifest(&env.fake.observed, &digest(1), &image);
    env.fake.observed.images.lock().unwrap().insert(
        image.clone(),
        cri::Image {
            id: image.clone(),
            repo_digests: vec![pinned("busybox", &digest(1))],
            ..Default::default()
        },
    );
    env.fake.add_sandbox("sb-a", &pod_config("checkout", &[]));
    let create = || cri::CreateContainerRequest {
        pod_sandbox_id: "sb-a".into(),
        config: Some(cri::ContainerConfig {
            image: Some(cri::ImageSpec {
                image: image.clone(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        sandbox_config: Some(pod_config("checkout", &[])),
    };
    let mut rt = env.runtime().await;
    rt.create_container(create()).await.unwrap();
    let lookups = env.fake.observed.image_statuses.lock().unwrap().len();
    assert!(lookups > 0, "the first start looks the image up");
    install(2);
    rt.create_container(create()).await.unwrap();
    assert_eq!(
        env.fake.observed.image_statuses.lock().unwrap().len(),
        lookups,
        "proven before: decided for bundle 2 without a lookup"
    );
    let last = env.audit_lines().pop().unwrap();
    assert_eq!(last["decision"], "allow");
    assert_eq!(last["bundle_version"], 2, "{last}");
    env.stop().await;
}

/// Cached start decisions are shared by pods of one scope whatever their other labels, and are not
/// used once the bundle is past its expiry grace: a cached image then fails closed like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_starts_are_per_scope_and_end_with_the_bundle() {
    let env = Env::start(false, NodeMode::Enforce, |c, _| {
        c.policy.expiry_grace = Duration::ZERO;
    })
    .await;
    // Long enough for the allowed starts below on a slow machine; the test waits for its end.
    let lifetime = time::Duration::seconds(6);
    let b = bundle_json(1, &digest(1), lifetime);
    let expires = std::time::Instant::now() + Duration::from_secs(6);
    let s = env.keys.sign(&b, &[&env.keys.alice, &env.keys.bob]);
    drop_bundle(&env.dir, "v1", &b, &s);
    env.node.poll_drop_dir();
    assert_eq!(env.node.state.current().map(|b| b.version), Some(1));

    let image = digest(0xb1);
    let repo_digest = pinned("busybox", &digest(1));
    put_manifest(&env.fake.observed, &digest(1), &image);
    env.fake.observed.images.lock().unwrap().insert(
        image.clone(),
        cri::Image {
            id: image.clone(),
            repo_digests: vec![repo_digest],
            ..Default::default()
        },
    );
    for hash in ["aaaa", "bbbb"] {
        env.fake.add_sandbox(
            &format!("sb-{hash}"),
            &pod_config("checkout", &[("pod-template-hash", hash)]),
        );
    }
    let create = |pod_hash: &str| {
        let sandbox = pod_config("checkout", &[("pod-template-hash", pod_hash)]);
        cri::CreateContainerRequest {
            pod_sandbox_id: format!("sb-{pod_hash}"),
            config: Some(cri::ContainerConfig {
                image: Some(cri::ImageSpec {
                    image: image.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            sandbox_config: Some(sandbox),
        }
    };
    let mut rt = env.runtime().await;
    rt.create_container(create("aaaa")).await.unwrap();
    let lookups = env.fake.observed.image_statuses.lock().unwrap().len();
    rt.create_container(create("bbbb")).await.unwrap();
    assert_eq!(
        env.fake.observed.image_statuses.lock().unwrap().len(),
        lookups,
        "a pod of the same scope with other labels uses the cached decision"
    );

    tokio::time::sleep_until((expires + Duration::from_millis(1200)).into()).await;
    let e = rt.create_container(create("aaaa")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("grace period has passed"),
        "{}",
        e.message()
    );
    assert_eq!(env.fake.observed.creates.lock().unwrap().len(), 2);
    env.stop().await;
}

/// kubelet creates every pod's sandbox through pullgate: the sandbox containerd answers with is
/// remembered with the pod the request configured, so the pod's first start asks containerd nothing
/// about it, and a claim that contradicts it is still refused. containerd's refusal of a
/// `RunPodSandbox` reaches the caller as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_created_through_pullgate_starts_without_a_sandbox_lookup() {
    let env = Env::start(true, NodeMode::Enforce, |_, _| {}).await;
    let nginx = put_image(&env.fake, 0xc2, &[pinned("nginx", &digest(3))], &[]);
    let mut rt = env.runtime().await;
    let before = env.fake.observed.sandboxes_run.load(Ordering::Relaxed);
    let e = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (
            Code::InvalidArgument,
            "sandbox config must include metadata"
        ),
        "containerd's own answer"
    );
    let checkout = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_config("checkout", &[("app", "web")])),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .pod_sandbox_id;
    assert_eq!(
        env.fake.observed.sandboxes_run.load(Ordering::Relaxed),
        before + 1
    );
    let statuses = || env.fake.observed.sandbox_statuses.lock().unwrap().len();
    rt.create_container(create_in(
        &checkout,
        &nginx,
        Some(pod_config("checkout", &[("app", "web")])),
    ))
    .await
    .unwrap();
    assert_eq!(statuses(), 0, "the sandbox was learned from RunPodSandbox");
    let last = env.audit_lines().pop().unwrap();
    assert_eq!(
        (&last["decision"], &last["pod_namespace"], &last["pod_uid"]),
        (&"allow".into(), &"checkout".into(), &"uid-checkout".into())
    );
    // The learned pod is the one the claim is held against.
    let e = rt
        .create_container(create_in(
            &checkout,
            &nginx,
            Some(pod_config("search", &[("app", "web")])),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(
        env.audit_lines().pop().unwrap()["reason"],
        "sandbox_mismatch"
    );
    // A pod of the search program, learned the same way: nginx is not approved for it.
    let search = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_config("search", &[])),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .pod_sandbox_id;
    let e = rt
        .create_container(create_in(&search, &nginx, None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(statuses(), 0);
    // Removed: forgotten, so a start in it is looked up (and containerd no longer knows it).
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: checkout.clone(),
    })
    .await
    .unwrap();
    let e = rt
        .create_container(create_in(&checkout, &nginx, None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert_eq!(statuses(), 1);
    env.stop().await;
}

/// What containerd holds when pullgate starts is learned once: the first start of a pre-pulled
/// image in a pod created before pullgate asks containerd nothing, while an image whose repo digest
/// its content does not back is not learned, and its start is looked up and denied as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_containerd_holds_at_start_is_learned_before_any_start() {
    let env = Env::start(true, NodeMode::Enforce, |_, _| {}).await;
    let nginx = put_image(&env.fake, 0xc2, &[pinned("nginx", &digest(3))], &[]);
    // Claims nginx's approved repo digest, but that manifest's config is nginx's, not this one's.
    let forged = digest(0xc3);
    env.fake.observed.images.lock().unwrap().insert(
        forged.clone(),
        cri::Image {
            id: forged.clone(),
            repo_digests: vec![pinned("nginx", &digest(3))],
            ..Default::default()
        },
    );
    // Names a blob too large to be a manifest (listed first): skipped, the pass goes on.
    let blob = digest(0x99);
    env.fake
        .observed
        .content
        .lock()
        .unwrap()
        .insert(blob.clone(), vec![b' '; 5 << 20]);
    env.fake.observed.images.lock().unwrap().insert(
        digest(0xa1),
        cri::Image {
            id: digest(0xa1),
            repo_digests: vec![pinned("nginx", &blob)],
            ..Default::default()
        },
    );
    env.fake
        .add_sandbox("sb-checkout", &pod_config("checkout", &[]));
    let learned = env.node.enforcer.learn_node().await.unwrap();
    assert_eq!(
        learned,
        pullgate::node::enforce::Learned {
            sandboxes: 1,
            images: 1
        }
    );
    let lookups = || {
        (
            env.fake.observed.image_statuses.lock().unwrap().len(),
            env.fake.observed.sandbox_statuses.lock().unwrap().len(),
        )
    };
    let before = lookups();
    let mut rt = env.runtime().await;
    rt.create_container(create_in("sb-checkout", &nginx, None))
        .await
        .unwrap();
    assert_eq!(lookups(), before, "sandbox and image were learned");
    assert_eq!(env.audit_lines().pop().unwrap()["decision"], "allow");
    let e = rt
        .create_container(create_in("sb-checkout", &forged, None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(lookups().0, before.0 + 1, "the forged image was looked up");
    // A second pass reads nothing it proved already.
    let reads = env.fake.observed.content_namespaces.lock().unwrap().len();
    env.node.enforcer.learn_node().await.unwrap();
    assert_eq!(
        env.fake.observed.content_namespaces.lock().unwrap().len(),
        reads + 2,
        "only the two images that proved nothing are read again"
    );
    env.stop().await;
}

/// kubelet names a container's image by ID and sends the name the user wrote
/// (`user_specified_image`): the manifest that name pins through the bundle is read first, and when
/// it describes the image the start needs no `ImageStatus`. A hint that proves nothing, or nothing
/// this pod may run, is followed by the full lookup — so a forged image is still denied, and an image
/// allowed by its other repo digests still starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_named_by_kubelet_is_proven_from_the_manifest_its_name_pins() {
    let env = env_knowing_only_its_images().await;
    env.fake
        .add_sandbox("sb-search", &pod_config("search", &[]));
    let nginx = put_image(&env.fake, 0xd1, &[pinned("nginx", &digest(3))], &[]);
    // Claims nginx's approved repo digest by name; its content is another image.
    let forged = digest(0xd2);
    env.fake.observed.images.lock().unwrap().insert(
        forged.clone(),
        cri::Image {
            id: forged.clone(),
            repo_digests: vec![pinned("nginx", &digest(3))],
            ..Default::default()
        },
    );
    let busybox = put_image(&env.fake, 0xd4, &[pinned("busybox", &digest(1))], &[]);
    let as_kubelet = |sandbox: &str, id: &str, user_image: &str| {
        let mut req = create_in(sandbox, id, None);
        if let Some(spec) = req.config.as_mut().and_then(|c| c.image.as_mut()) {
            spec.user_specified_image = user_image.to_string();
        }
        req
    };
    let statuses = || env.fake.observed.image_statuses.lock().unwrap().len();
    let reads = || env.fake.observed.content_namespaces.lock().unwrap().len();
    let mut rt = env.runtime().await;

    let (s0, r0) = (statuses(), reads());
    rt.create_container(as_kubelet("sb-checkout", &nginx, "nginx:1.25"))
        .await
        .unwrap();
    assert_eq!(
        (statuses(), reads()),
        (s0, r0 + 1),
        "proven by reading the manifest nginx:1.25 pins, and nothing else"
    );
    assert_eq!(env.audit_lines().pop().unwrap()["decision"], "allow");

    let s0 = statuses();
    let e = rt
        .create_container(as_kubelet("sb-checkout", &forged, "nginx:1.25"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(
        statuses(),
        s0 + 1,
        "a hint that proves nothing is followed by the lookup"
    );

    // The same image in a pod whose scope does not approve nginx: the hint proves it, the decision
    // denies, and the full lookup decides (and denies too).
    let s0 = statuses();
    let e = rt
        .create_container(as_kubelet("sb-search", &nginx, "nginx:1.25"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(
        statuses(),
        s0 + 1,
        "a denial is decided from the full lookup"
    );

    // A name that pins another image: busybox is allowed by the repo digest containerd reports.
    let s0 = statuses();
    rt.create_container(as_kubelet("sb-checkout", &busybox, "nginx:1.25"))
        .await
        .unwrap();
    assert_eq!(statuses(), s0 + 1);
    assert_eq!(env.audit_lines().pop().unwrap()["decision"], "allow");

    // The hint proves a repo digest this pod's scope does not approve (nginx, payments only), but
    // the image is also busybox by a digest the organisation approves: the full lookup allows it.
    let both = put_image(
        &env.fake,
        0xd5,
        &[pinned("nginx", &digest(3)), pinned("busybox", &digest(2))],
        &[],
    );
    let s0 = statuses();
    rt.create_container(as_kubelet("sb-search", &both, "nginx:1.25"))
        .await
        .unwrap();
    assert_eq!(statuses(), s0 + 1, "decided from the full lookup");
    assert_eq!(env.audit_lines().pop().unwrap()["decision"], "allow");

    // A hint whose manifest cannot be read (here: a blob too large to be one) is only a hint.
    let other = put_image(&env.fake, 0xd6, &[pinned("busybox", &digest(2))], &[]);
    env.fake
        .observed
        .content
        .lock()
        .unwrap()
        .insert(digest(1), vec![b' '; 5 << 20]);
    let s0 = statuses();
    rt.create_container(as_kubelet("sb-checkout", &other, "busybox:1.36"))
        .await
        .unwrap();
    assert_eq!(statuses(), s0 + 1, "looked up in full");
    assert_eq!(env.audit_lines().pop().unwrap()["decision"], "allow");
    env.stop().await;
}

/// A repo digest that names an index is proven by the child manifest whose config is the image.
/// containerd pulls only the node's platform of an index, so that child is read first, and a start
/// of a multi-platform image reads two manifests however many platforms the index lists. An index
/// that marks no child as the node's is proven from whichever child describes the image (read a
/// few at a time); one with no such child proves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_is_proven_by_the_nodes_platform_first() {
    use pullgate::node::enforce::lookup::NODE_ARCH;

    let env = env_knowing_only_its_images().await;
    let other_arch = if NODE_ARCH == "s390x" {
        "ppc64le"
    } else {
        "s390x"
    };
    let observed = &env.fake.observed;
    // Manifests for other platforms: absent, as containerd leaves them; an attestation present.
    let absent: Vec<String> = (0x60..0x66).map(digest).collect();
    put_manifest(observed, &digest(0x70), &digest(0x71));
    put_manifest(observed, &digest(0x72), &digest(0xe1));
    let mut children: Vec<_> = absent
        .iter()
        .map(|d| (d.clone(), Some(("linux", other_arch))))
        .collect();
    children.push((digest(0x70), Some(("unknown", "unknown"))));
    children.push((digest(0x72), Some(("linux", NODE_ARCH))));
    put_index(observed, &digest(1), &children);
    let image = |id: u8, index: &str| put_indexed_image(&env.fake, id, index);
    let multi = image(0xe1, &digest(1));
    let reads = || observed.content_namespaces.lock().unwrap().len();
    let mut rt = env.runtime().await;

    let r0 = reads();
    rt.create_container(create_in("sb-checkout", &multi, None))
        .await
        .unwrap();
    assert_eq!(env.audit_lines().pop().unwrap()["decision"], "allow");
    assert_eq!(
        reads(),
        r0 + 2,
        "the index and the node's own child manifest"
    );

    // No child marked as the node's: the one that describes the image, listed among absent ones.
    let unmarked: Vec<_> = absent[..3]
        .iter()
        .cloned()
        .chain([digest(0x70), digest(0x73)])
        .chain(absent[3..].iter().cloned())
        .map(|d| (d, None))
        .collect();
    put_index(observed, &digest(2), &unmarked);
    put_manifest(observed, &digest(0x73), &digest(0xe2));
    let unmarked_image = image(0xe2, &digest(2));
    let r0 = reads();
    rt.create_container(create_in("sb-checkout", &unmarked_image, None))
        .await
        .unwrap();
    assert_eq!(env.audit_lines().pop().unwrap()["decision"], "allow");
    assert!(reads() > r0 + 1, "its children were read");

    // An index none of whose children is the image proves nothing: the start is denied.
    let forged = image(0xe3, &digest(1));
    let e = rt
        .create_container(create_in("sb-checkout", &forged, None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    env.stop().await;
}

/// Children of an index that marks none as the node's are read a few at a time, never more than
/// eight at once. A read containerd fails starts no more: a child already being read that describes
/// the image still proves it; otherwise the start is answered `UNAVAILABLE` — neither allowed nor
/// denied — as when the node's own child cannot be read. No read asks for more than one byte past
/// the largest manifest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_reads_are_bounded_and_a_failed_one_fails_closed() {
    use pullgate::node::enforce::lookup::NODE_ARCH;

    let env = env_knowing_only_its_images().await;
    let observed = &env.fake.observed;
    let reads = || observed.content_namespaces.lock().unwrap().len();
    let unmarked =
        |digests: &[String]| -> Vec<_> { digests.iter().map(|d| (d.clone(), None)).collect() };
    let mut rt = env.runtime().await;

    // Twelve children, none marked as the node's; the image's own manifest is listed last.
    let mut children: Vec<String> = (0x80..0x8b).map(digest).collect();
    children.push(digest(0x8f));
    put_manifest(observed, &digest(0x8f), &digest(0xe4));
    put_index(observed, &digest(1), &unmarked(&children));
    let image = put_indexed_image(&env.fake, 0xe4, &digest(1));
    // Every read that does not fail takes 100 ms from here on; a failing one fails at once.
    *observed.content_delay.lock().unwrap() = Some(Duration::from_millis(100));
    let r0 = reads();
    rt.create_container(create_in("sb-checkout", &image, None))
        .await
        .unwrap();
    assert_eq!(env.audit_lines().pop().unwrap()["decision"], "allow");
    assert_eq!(reads(), r0 + 13, "the index and each of its children");
    let most = observed.content_most_in_flight.load(Ordering::SeqCst);
    assert!(
        (2..=8).contains(&most),
        "children are read a few at a time, at most eight at once: {most} at once"
    );

    // A read that fails while the image's own manifest is still being read: proven all the same.
    let failing = digest(0x90);
    observed
        .content_failing
        .lock()
        .unwrap()
        .insert(failing.clone());
    put_manifest(observed, &digest(0x91), &digest(0xe5));
    put_index(
        observed,
        &digest(2),
        &unmarked(&[failing.clone(), digest(0x91)]),
    );
    let image = put_indexed_image(&env.fake, 0xe5, &digest(2));
    rt.create_container(create_in("sb-checkout", &image, None))
        .await
        .unwrap();
    assert_eq!(env.audit_lines().pop().unwrap()["decision"], "allow");

    // A read that fails and no child that describes the image: UNAVAILABLE, nothing audited, and
    // no child read after the failure (eight were being read; four more wait).
    let mut children = vec![failing.clone()];
    children.extend((0xa0..0xab).map(digest));
    put_index(observed, &digest(1), &unmarked(&children));
    let image = put_indexed_image(&env.fake, 0xe6, &digest(1));
    let audited = env.audit_lines().len();
    let r0 = reads();
    unavailable_start(&mut rt, &image).await;
    assert_eq!(env.audit_lines().len(), audited);
    assert_eq!(
        reads(),
        r0 + 1 + 8,
        "the index and the first eight children"
    );
    *observed.content_delay.lock().unwrap() = None;

    // The node's own child cannot be read: UNAVAILABLE, and no other child is read.
    let other_arch = if NODE_ARCH == "s390x" {
        "ppc64le"
    } else {
        "s390x"
    };
    put_manifest(observed, &digest(0x93), &digest(0xe7));
    put_index(
        observed,
        &digest(2),
        &[
            (digest(0x93), Some(("linux", other_arch))),
            (failing.clone(), Some(("linux", NODE_ARCH))),
        ],
    );
    let image = put_indexed_image(&env.fake, 0xe7, &digest(2));
    let r0 = reads();
    unavailable_start(&mut rt, &image).await;
    assert_eq!(reads(), r0 + 2, "the index and the node's child");

    // A child far larger than a manifest: read no further than one byte past the largest one.
    observed
        .content
        .lock()
        .unwrap()
        .insert(digest(0x94), vec![b' '; 8 << 20]);
    put_index(
        observed,
        &digest(1),
        &[(digest(0x94), Some(("linux", NODE_ARCH)))],
    );
    let image = put_indexed_image(&env.fake, 0xe8, &digest(1));
    let sent = observed.content_bytes_sent.load(Ordering::SeqCst);
    unavailable_start(&mut rt, &image).await;
    let read = observed.content_bytes_sent.load(Ordering::SeqCst) - sent;
    let index_len = observed.content.lock().unwrap()[&digest(1)].len();
    assert_eq!(
        read,
        index_len + (4 << 20) + 1,
        "the index, and 4 MiB + 1 of the blob"
    );
    env.stop().await;
}

/// A start of `image` in the checkout pod, answered `UNAVAILABLE`.
async fn unavailable_start(
    rt: &mut cri::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>,
    image: &str,
) {
    let e = rt
        .create_container(create_in("sb-checkout", image, None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
}

/// An image known by its ID whose one repo digest is the approved busybox mirror name pinned to
/// `index` (an index in the fake content store). Returns the ID.
fn put_indexed_image(fake: &FakeCri, id: u8, index: &str) -> String {
    let img = cri::Image {
        id: digest(id),
        repo_digests: vec![pinned("busybox", index)],
        ..Default::default()
    };
    fake.observed.images.lock().unwrap().insert(digest(id), img);
    digest(id)
}

/// CRI's plugin names an arrived image by its ID before its image store holds it: the arrival is
/// tried again until CRI knows it, and its first start then asks containerd nothing. One CRI never
/// comes to know is tried a bounded number of times and left to its start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arrival_cri_does_not_know_yet_is_proven_once_it_does() {
    let env = env_knowing_only_its_images().await;
    let (arrive, arrived) = mpsc::channel(4);
    let learner = tokio::spawn(env.node.enforcer.clone().learn_arrivals(arrived));
    let (late, never) = (digest(0xc4), digest(0xc5));
    arrive.send(late.clone()).await.unwrap();
    arrive.send(never.clone()).await.unwrap();
    let asked = |id: &str| {
        env.fake
            .observed
            .image_statuses
            .lock()
            .unwrap()
            .iter()
            .filter(|n| *n == id)
            .count()
    };
    let waiting = std::time::Instant::now();
    while asked(&late) < 2 {
        assert!(
            waiting.elapsed() < Duration::from_secs(5),
            "an unknown arrival is tried again"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let nginx = put_image(&env.fake, 0xc4, &[pinned("nginx", &digest(3))], &[]);
    drop(arrive);
    tokio::time::timeout(Duration::from_secs(20), learner)
        .await
        .expect("the learner ends once nothing waits")
        .unwrap();
    assert_eq!(
        asked(&never),
        pullgate::node::enforce::ARRIVAL_TRIES as usize,
        "an arrival CRI never knows is tried a bounded number of times"
    );
    let before = env.fake.observed.image_statuses.lock().unwrap().len();
    let mut rt = env.runtime().await;
    rt.create_container(create_in("sb-checkout", &nginx, None))
        .await
        .unwrap();
    assert_eq!(
        env.fake.observed.image_statuses.lock().unwrap().len(),
        before,
        "the late arrival was proven ahead of its start"
    );
    assert_eq!(env.audit_lines().pop().unwrap()["decision"], "allow");
    env.stop().await;
}

/// How many image lookups container starts made in containerd (the operator's metric).
fn image_lookups(env: &Env) -> u64 {
    let text = env.node.metrics_text(0);
    text.lines()
        .find_map(|l| l.strip_prefix("pullgate_start_lookups_total{kind=\"image\"} "))
        .unwrap_or_else(|| panic!("no image lookup counter in {text}"))
        .parse()
        .unwrap()
}

/// Waits (at most 5 s) until the fake upstream has been asked for `n` content reads in all.
async fn reads_reach(env: &Env, n: usize) {
    let waiting = std::time::Instant::now();
    while env.fake.observed.content_namespaces.lock().unwrap().len() < n {
        assert!(
            waiting.elapsed() < Duration::from_secs(5),
            "expected {n} content reads"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A start as kubelet makes it: the image by ID, with the pod spec's name (empty: as kubelet before
/// Kubernetes 1.28 sends it).
fn kubelet_start(id: &str, user_image: &str) -> cri::CreateContainerRequest {
    let mut req = create_in("sb-checkout", id, None);
    if let Some(spec) = req.config.as_mut().and_then(|c| c.image.as_mut()) {
        spec.user_specified_image = user_image.to_string();
    }
    req
}

fn status_of(image: &str) -> cri::ImageStatusRequest {
    cri::ImageStatusRequest {
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        verbose: false,
    }
}

/// kubelet asks `ImageStatus` of a container's image before it starts it: an image that arrived
/// past pullgate is proven meanwhile — the manifest the approved name pins is read while
/// containerd answers — and its start asks containerd nothing. A start that arrives while that
/// proof runs waits for it and reads nothing itself. An image proven already is not read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_kubelet_asks_about_is_proven_before_its_start() {
    let env = env_knowing_only_its_images().await;
    // Known by the mirror reference the approved name resolves to, as after a pull of it.
    let nginx_rd = [pinned("nginx", &digest(3))];
    let nginx = put_image(&env.fake, 0xe1, &nginx_rd, &nginx_rd);
    let busybox_rd = [pinned("busybox", &digest(1))];
    let busybox = put_image(&env.fake, 0xe2, &busybox_rd, &busybox_rd);
    let statuses = || env.fake.observed.image_statuses.lock().unwrap().len();
    let reads = || env.fake.observed.content_namespaces.lock().unwrap().len();
    let (mut images, mut rt) = (env.images().await, env.runtime().await);

    let (s0, r0, l0) = (statuses(), reads(), image_lookups(&env));
    let shown = images
        .image_status(status_of("nginx:1.25"))
        .await
        .unwrap()
        .into_inner()
        .image
        .expect("containerd holds it");
    assert_eq!(shown.id, nginx);
    reads_reach(&env, r0 + 1).await;
    rt.create_container(kubelet_start(&nginx, "nginx:1.25"))
        .await
        .unwrap();
    assert_eq!(
        (statuses(), reads(), image_lookups(&env)),
        (s0 + 1, r0 + 1, l0),
        "kubelet's ImageStatus, the one read that proved the image, and no lookup by the start"
    );
    assert_eq!(env.audit_lines().pop().unwrap()["decision"], "allow");
    images.image_status(status_of("nginx:1.25")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(reads(), r0 + 1, "a proven image is not read again");

    // containerd slow to answer: the manifest was read while it did.
    *env.fake.observed.image_status_delay.lock().unwrap() = Some(Duration::from_millis(400));
    let tools_rd = [pinned("busybox", &digest(2))];
    let tools = put_image(&env.fake, 0xe5, &tools_rd, &tools_rd);
    let (r0, asked) = (reads(), std::time::Instant::now());
    images
        .image_status(status_of(&format!("busybox@{}", digest(2))))
        .await
        .unwrap();
    let read_at = env
        .fake
        .observed
        .content_read_at
        .lock()
        .unwrap()
        .get(r0)
        .copied();
    let read_at = read_at.expect("the manifest was read before containerd answered");
    assert!(
        read_at < asked + Duration::from_millis(300),
        "read {:?} after the ImageStatus was asked, while containerd answered",
        read_at - asked
    );
    *env.fake.observed.image_status_delay.lock().unwrap() = None;
    rt.create_container(kubelet_start(&tools, ""))
        .await
        .unwrap();
    assert_eq!(
        (reads(), image_lookups(&env)),
        (r0 + 1, l0),
        "that read proved it"
    );

    // The start right behind the ImageStatus, while the proof's read is still answering, and
    // without the pod spec's name (nothing else to prove it from): it waits for that proof.
    *env.fake.observed.content_delay.lock().unwrap() = Some(Duration::from_millis(300));
    let (s0, r0) = (statuses(), reads());
    images
        .image_status(status_of("busybox:1.36"))
        .await
        .unwrap();
    let waited = std::time::Instant::now();
    rt.create_container(kubelet_start(&busybox, ""))
        .await
        .unwrap();
    assert!(
        waited.elapsed() >= Duration::from_millis(150),
        "the start waited for the proof: {:?}",
        waited.elapsed()
    );
    assert_eq!(
        (statuses(), reads(), image_lookups(&env)),
        (s0 + 1, r0 + 1, l0),
        "one read in all, the proof's"
    );
    assert_eq!(env.audit_lines().pop().unwrap()["decision"], "allow");
    env.stop().await;
}

/// Proofs made from `ImageStatus` answers are bounded: at most eight run at once (answers past
/// that are left to their starts); an answer whose content proves nothing is not read again for
/// the same names, and its start is decided from a full lookup; a proof containerd failed leaves
/// nothing behind, so the start looks up and reports the failure, and the next answer tries again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proofs_from_image_status_answers_are_bounded_and_never_decide_alone() {
    let env = env_knowing_only_its_images().await;
    let statuses = || env.fake.observed.image_statuses.lock().unwrap().len();
    let reads = || env.fake.observed.content_namespaces.lock().unwrap().len();
    let (mut images, mut rt) = (env.images().await, env.runtime().await);

    // Claims busybox's approved bare digest; containerd holds no such manifest.
    let forged = digest(0xe3);
    let forged_rd = pinned("busybox", &digest(2));
    env.fake.observed.images.lock().unwrap().insert(
        forged_rd.clone(),
        cri::Image {
            id: forged.clone(),
            repo_digests: vec![forged_rd.clone()],
            ..Default::default()
        },
    );
    let busybox_at_d2 = format!("docker.io/library/busybox@{}", digest(2));
    let r0 = reads();
    images
        .image_status(status_of(&busybox_at_d2))
        .await
        .unwrap();
    // Read while containerd answered, then for the answer.
    reads_reach(&env, r0 + 2).await;
    images
        .image_status(status_of(&busybox_at_d2))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        reads(),
        r0 + 2,
        "an answer that proved nothing is not read again"
    );
    let (s0, l0) = (statuses(), image_lookups(&env));
    let e = rt
        .create_container(kubelet_start(&forged, &busybox_at_d2))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(
        (statuses(), image_lookups(&env)),
        (s0 + 1, l0 + 1),
        "decided from the start's own lookup"
    );

    // A proof whose read fails.
    let flaky = put_image(&env.fake, 0xe4, &[pinned("busybox", &digest(1))], &[]);
    env.fake
        .observed
        .content_failing
        .lock()
        .unwrap()
        .insert(digest(1));
    let r0 = reads();
    images.image_status(status_of(&flaky)).await.unwrap();
    reads_reach(&env, r0 + 1).await;
    let l0 = image_lookups(&env);
    unavailable_start(&mut rt, &flaky).await;
    assert_eq!(image_lookups(&env), l0 + 1, "the start looked it up");
    env.fake.observed.content_failing.lock().unwrap().clear();
    let r0 = reads();
    images.image_status(status_of(&flaky)).await.unwrap();
    reads_reach(&env, r0 + 1).await;
    rt.create_container(kubelet_start(&flaky, ""))
        .await
        .unwrap();
    assert_eq!(
        (reads(), image_lookups(&env)),
        (r0 + 1, l0 + 1),
        "proven by the next answer's proof"
    );

    // Twelve answers in a row while containerd is slow: eight proofs run, the rest are left.
    *env.fake.observed.content_delay.lock().unwrap() = Some(Duration::from_secs(1));
    let ids: Vec<String> = (0..12u8)
        .map(|i| {
            put_image(
                &env.fake,
                0x40 + i,
                &[format!("{PRIVATE}/other/app{i}@{}", digest(0x60 + i))],
                &[],
            )
        })
        .collect();
    env.fake
        .observed
        .content_most_in_flight
        .store(0, Ordering::SeqCst);
    let r0 = reads();
    for id in &ids {
        images.image_status(status_of(id)).await.unwrap();
    }
    reads_reach(&env, r0 + 8).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(reads(), r0 + 8, "eight proofs, no more");
    assert_eq!(
        env.fake
            .observed
            .content_most_in_flight
            .load(Ordering::SeqCst),
        8
    );
    // Once they ended, the next answers start proofs again.
    let waiting = std::time::Instant::now();
    while env.fake.observed.content_in_flight.load(Ordering::SeqCst) > 0 {
        assert!(waiting.elapsed() < Duration::from_secs(5), "the reads end");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    images.image_status(status_of(&ids[11])).await.unwrap();
    reads_reach(&env, r0 + 9).await;
    env.stop().await;
}

/// A proof made ahead covers only what the answer listed: a start in a pod that proof does not
/// allow is decided from a full lookup, which may find more. And a start waits for a proof only so
/// long: one that takes longer ends, and the start looks its image up itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proof_made_ahead_never_denies_alone_nor_holds_a_start_long() {
    let env = env_knowing_only_its_images().await;
    env.fake
        .add_sandbox("sb-search", &pod_config("search", &[]));
    let (mut images, mut rt) = (env.images().await, env.runtime().await);
    let reads = || env.fake.observed.content_namespaces.lock().unwrap().len();

    // nginx is for the payments program only; the search pod may run it only as busybox.
    let nginx_rd = [pinned("nginx", &digest(3))];
    let id = put_image(&env.fake, 0xe6, &nginx_rd, &nginx_rd);
    *env.fake.observed.content_delay.lock().unwrap() = Some(Duration::from_millis(300));
    images.image_status(status_of("nginx:1.25")).await.unwrap();
    // containerd names the image busybox too, after the answer.
    let both = [nginx_rd[0].clone(), pinned("busybox", &digest(2))];
    put_image(&env.fake, 0xe6, &both, &nginx_rd);
    let mut start = kubelet_start(&id, "nginx:1.25");
    start.pod_sandbox_id = "sb-search".into();
    let l0 = image_lookups(&env);
    rt.create_container(start).await.unwrap();
    assert_eq!(image_lookups(&env), l0 + 1, "decided from the full lookup");
    assert_eq!(env.audit_lines().pop().unwrap()["decision"], "allow");

    // A proof slower than its bound: the start waits for it that long, then looks up itself.
    *env.fake.observed.content_delay.lock().unwrap() =
        Some(pullgate::node::enforce::AHEAD_TIMEOUT + Duration::from_millis(500));
    let slow = put_image(&env.fake, 0xe7, &[pinned("busybox", &digest(1))], &[]);
    let (r0, l0) = (reads(), image_lookups(&env));
    images.image_status(status_of(&slow)).await.unwrap();
    rt.create_container(kubelet_start(&slow, "")).await.unwrap();
    assert_eq!(
        (reads(), image_lookups(&env)),
        (r0 + 2, l0 + 1),
        "the proof's read, and the start's own"
    );
    env.stop().await;
}

/// A node whose fake CRI knows only the images a test puts there, with pod sandbox `sb-checkout`.
async fn env_knowing_only_its_images() -> Env {
    let env = Env::start(true, NodeMode::Enforce, |_, _| {}).await;
    env.fake
        .observed
        .only_known_images
        .store(true, Ordering::Relaxed);
    env.fake
        .add_sandbox("sb-checkout", &pod_config("checkout", &[]));
    env
}

/// An image in the fake store with a manifest in the content store for each repo digest that really
/// describes it (config = the image ID), known by its ID and by `names`. Returns the ID.
fn put_image(fake: &FakeCri, id: u8, repo_digests: &[String], names: &[String]) -> String {
    for rd in repo_digests {
        put_manifest(&fake.observed, rd.rsplit_once('@').unwrap().1, &digest(id));
    }
    let img = cri::Image {
        id: digest(id),
        repo_digests: repo_digests.to_vec(),
        ..Default::default()
    };
    let mut images = fake.observed.images.lock().unwrap();
    for name in names.iter().chain([&digest(id)]) {
        images.insert(name.clone(), img.clone());
    }
    digest(id)
}

/// An image in the fake store known only by its ID and an unapproved repo digest (an imported
/// image no bundle approves). Returns the ID.
fn put_unapproved(fake: &FakeCri, id: u8) -> String {
    put_image(
        fake,
        id,
        &[format!("docker.io/library/miner@{}", digest(8))],
        &[],
    )
}

fn create_in(
    sandbox: &str,
    image: &str,
    claim: Option<cri::PodSandboxConfig>,
) -> cri::CreateContainerRequest {
    cri::CreateContainerRequest {
        pod_sandbox_id: sandbox.into(),
        config: Some(cri::ContainerConfig {
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        sandbox_config: claim,
    }
}

/// The pod of a container start is the sandbox containerd recorded, never the `sandbox_config` the
/// caller sends: a claimed warn-mode namespace for a pod of an enforce-mode namespace is refused and
/// the audit shows the real namespace; unknown sandboxes are refused; a removed sandbox is forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_scope_comes_from_its_sandbox_never_from_the_request() {
    let env = Env::start(true, NodeMode::Enforce, |_, _| {}).await;
    let imported = put_unapproved(&env.fake, 0xc1);
    let payments_only = put_image(&env.fake, 0xc2, &[pinned("nginx", &digest(3))], &[]);
    let web = [("app", "web")];
    env.fake
        .add_sandbox("sb-checkout", &pod_config("checkout", &web));
    env.fake
        .add_sandbox("sb-search", &pod_config("search", &[]));
    let mut rt = env.runtime().await;
    let creates = || env.fake.observed.creates.lock().unwrap().len();

    // A pod of enforce-mode `checkout` claiming warn-mode `ledger`: refused, audited as what it is.
    let e = rt
        .create_container(create_in(
            "sb-checkout",
            &imported,
            Some(pod_config("ledger", &web)),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("namespace \"ledger\"") && e.message().contains("\"checkout\""),
        "{}",
        e.message()
    );
    assert_eq!(creates(), 0, "the spoofed start never reached containerd");
    let last = env.audit_lines().pop().unwrap();
    assert_eq!(
        (
            &last["decision"],
            &last["reason"],
            &last["pod_namespace"],
            &last["pod_uid"]
        ),
        (
            &"deny".into(),
            &"sandbox_mismatch".into(),
            &"checkout".into(),
            &"uid-checkout".into()
        )
    );
    // The other way round, and a claimed application label, are refused too.
    for (sandbox, claim) in [
        ("sb-search", pod_config("checkout", &[])),
        ("sb-checkout", pod_config("checkout", &[("app", "admin")])),
    ] {
        let e = rt
            .create_container(create_in(sandbox, &payments_only, Some(claim)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{sandbox}: {e:?}");
        assert!(
            e.message().contains("does not match pod sandbox"),
            "{}",
            e.message()
        );
    }

    // No claim at all: the recorded pod decides. nginx 1.25 is approved for payments only.
    rt.create_container(create_in("sb-checkout", &payments_only, None))
        .await
        .unwrap();
    let last = env.audit_lines().pop().unwrap();
    assert_eq!(
        (&last["decision"], &last["pod_namespace"], &last["pod_name"]),
        (&"allow".into(), &"checkout".into(), &"pod-a".into())
    );
    let e = rt
        .create_container(create_in("sb-search", &payments_only, None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(env.audit_lines().pop().unwrap()["reason"], "out_of_scope");
    // Labels that select no scope may differ (kubelet sends the pod's current labels).
    let relabelled = pod_config("checkout", &[("app", "web"), ("version", "2")]);
    rt.create_container(create_in("sb-checkout", &payments_only, Some(relabelled)))
        .await
        .unwrap();
    assert_eq!(creates(), 2);

    // The sandbox was looked up once and is remembered.
    let looked_up = |id: &str| {
        env.fake
            .observed
            .sandbox_statuses
            .lock()
            .unwrap()
            .iter()
            .filter(|s| *s == id)
            .count()
    };
    assert_eq!(looked_up("sb-checkout"), 1);

    // Sandboxes containerd does not know, or none at all, are refused and audited.
    let e = rt
        .create_container(create_in(
            "sb-gone",
            &payments_only,
            Some(pod_config("checkout", &[])),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(
        e.message().contains("sb-gone") && e.message().contains("RunPodSandbox"),
        "{}",
        e.message()
    );
    let last = env.audit_lines().pop().unwrap();
    assert_eq!(
        (&last["reason"], &last["decision"]),
        (&"sandbox_not_found".into(), &"deny".into())
    );
    let e = rt
        .create_container(create_in("", &payments_only, None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // RemovePodSandbox is forwarded and the sandbox forgotten: the next start in it is looked up
    // again (and containerd no longer knows it).
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: "sb-checkout".into(),
    })
    .await
    .unwrap();
    assert_eq!(
        *env.fake.observed.sandbox_removals.lock().unwrap(),
        ["sb-checkout"]
    );
    let e = rt
        .create_container(create_in("sb-checkout", &payments_only, None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert_eq!(looked_up("sb-checkout"), 2);
    assert_eq!(creates(), 2);
    env.stop().await;

    // Node warn mode blocks nothing: the contradiction is reported, the recorded pod decides.
    let env = Env::start(true, NodeMode::Warn, |_, _| {}).await;
    let imported = put_unapproved(&env.fake, 0xc1);
    env.fake
        .add_sandbox("sb-checkout", &pod_config("checkout", &web));
    let mut rt = env.runtime().await;
    rt.create_container(create_in(
        "sb-checkout",
        &imported,
        Some(pod_config("ledger", &web)),
    ))
    .await
    .unwrap();
    let lines = env.audit_lines();
    let mismatch = &lines[lines.len() - 2];
    assert_eq!(
        (
            &mismatch["decision"],
            &mismatch["reason"],
            &mismatch["pod_namespace"]
        ),
        (
            &"warn".into(),
            &"sandbox_mismatch".into(),
            &"checkout".into()
        )
    );
    let decided = &lines[lines.len() - 1];
    assert_eq!(
        (
            &decided["decision"],
            &decided["pod_namespace"],
            &decided["scope"]
        ),
        (
            &"warn".into(),
            &"checkout".into(),
            &"corp/payments/checkout".into()
        )
    );
    env.stop().await;
}

/// containerd resolves a unique prefix of a sandbox ID (the fake does too). A prefix names whichever
/// sandbox it is unique to at the time, so pullgate takes only full IDs: a start naming a prefix is
/// refused, whichever scope it would land in, and a removal by prefix forgets the sandbox it named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_are_named_by_their_full_id_only() {
    let env = Env::start(true, NodeMode::Enforce, |_, _| {}).await;
    let imported = put_unapproved(&env.fake, 0xc1);
    let (warn_id, enforce_id) = (
        "ab".to_string() + &"1".repeat(62),
        "ab".to_string() + &"2".repeat(62),
    );
    env.fake.add_sandbox(&warn_id, &pod_config("ledger", &[]));
    let mut rt = env.runtime().await;
    let creates = || env.fake.observed.creates.lock().unwrap().len();

    // The warn-mode pod by a prefix of its ID: containerd would take it; pullgate does not.
    let e = rt
        .create_container(create_in("ab", &imported, None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("abbreviation") && e.message().contains(&warn_id),
        "{}",
        e.message()
    );
    let last = env.audit_lines().pop().unwrap();
    assert_eq!(
        (&last["decision"], &last["reason"]),
        (&"deny".into(), &"sandbox_id_abbreviated".into())
    );
    assert_eq!(creates(), 0);
    // By its full ID it is a warn-mode start.
    rt.create_container(create_in(&warn_id, &imported, None))
        .await
        .unwrap();
    assert_eq!(env.audit_lines().pop().unwrap()["decision"], "warn");

    // The warn-mode pod goes, an enforce-mode pod whose ID has the same prefix comes: the prefix is
    // still refused (never decided for the pod it used to name), the full ID decides for the new pod.
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: warn_id.clone(),
    })
    .await
    .unwrap();
    env.fake
        .add_sandbox(&enforce_id, &pod_config("checkout", &[]));
    let e = rt
        .create_container(create_in("ab", &imported, None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = rt
        .create_container(create_in(&enforce_id, &imported, None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(creates(), 1);

    // A removal by prefix forgets the sandbox it removed: the next start by its full ID is looked up
    // again, and containerd no longer knows it.
    let payments_only = put_image(&env.fake, 0xc2, &[pinned("nginx", &digest(3))], &[]);
    rt.create_container(create_in(&enforce_id, &payments_only, None))
        .await
        .unwrap();
    assert_eq!(creates(), 2);
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: "ab2".into(),
    })
    .await
    .unwrap();
    let e = rt
        .create_container(create_in(&enforce_id, &payments_only, None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert_eq!(creates(), 2);
    env.stop().await;
}

/// A node whose fake containerd holds only the images put there, among them busybox:1.36 as pullgate
/// pulls it (the pinned mirror name), and a sandbox `sb` in namespace `checkout`. Returns the image ID.
async fn env_with_pulled_busybox() -> (Env, String) {
    let env = Env::start(true, NodeMode::Enforce, |_, _| {}).await;
    env.fake
        .observed
        .only_known_images
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let id = put_image(
        &env.fake,
        0xd1,
        &[pinned("busybox", &digest(1))],
        &[pinned("busybox", &digest(1))],
    );
    env.fake.add_sandbox("sb", &pod_config("checkout", &[]));
    (env, id)
}

/// `crictl create` names the image as the user wrote it: the name is resolved through the bundle
/// (as ImageStatus does), so an approved image pulled through pullgate starts, pinned to its ID; a
/// name never approved is told so; an approved one not pulled yet is told to pull it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_created_by_image_name_resolve_through_the_bundle() {
    let (env, id) = env_with_pulled_busybox().await;
    let mut rt = env.runtime().await;
    for name in [
        "busybox:1.36".to_string(),
        "docker.io/library/busybox:1.36".to_string(),
        format!("busybox@{}", digest(1)),
        format!("docker.io/library/busybox@{}", digest(1)),
        pinned("busybox", &digest(1)),
    ] {
        rt.create_container(create_in("sb", &name, Some(pod_config("checkout", &[]))))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        let sent = env.last_create();
        assert_eq!(
            sent.config.unwrap().image.unwrap().image,
            id,
            "{name} is pinned to the checked ID"
        );
        assert_eq!(
            env.last_image_status(),
            pinned("busybox", &digest(1)),
            "{name} is looked up under the pinned mirror name"
        );
    }
    for (name, reason, says) in [
        ("busybox:1.37", "tag_not_approved", "1.37"),
        ("alpine:3.19", "not_in_bundle", "alpine"),
        (
            "nginx:1.25",
            "digest_not_approved",
            "pull it through pullgate first",
        ),
    ] {
        let e = rt
            .create_container(create_in("sb", name, Some(pod_config("checkout", &[]))))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{name}: {e:?}");
        assert!(e.message().contains(says), "{name}: {}", e.message());
        if reason != "digest_not_approved" {
            assert!(!e.message().contains("pull it"), "{name}: {}", e.message());
        }
        assert_eq!(env.audit_lines().pop().unwrap()["reason"], reason, "{name}");
    }
    env.stop().await;
}

/// Image volumes (`mounts[].image`) are checked like the container's image and pinned to the image
/// ID that was checked. (containerd 1.6 has no image volumes, so this is proven at the fake level.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_volumes_are_checked_and_pinned() {
    let (env, approved) = env_with_pulled_busybox().await;
    let other = put_image(&env.fake, 0xe2, &[pinned("busybox", &digest(2))], &[]);
    let imported = put_unapproved(&env.fake, 0xe3);
    let volume = |path: &str, image: &str| cri::Mount {
        container_path: path.into(),
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let with_volumes = |mounts: Vec<cri::Mount>| {
        let mut r = create_in("sb", &other, None);
        r.config.as_mut().unwrap().mounts = mounts;
        r
    };
    let mut rt = env.runtime().await;
    rt.create_container(with_volumes(vec![
        volume("/data", "busybox:1.36"),
        cri::Mount {
            container_path: "/host".into(),
            host_path: "/tmp".into(),
            ..Default::default()
        },
        volume("/again", &approved),
    ]))
    .await
    .unwrap();
    let sent = env.last_create();
    let mounts = sent.config.unwrap().mounts;
    assert_eq!(
        mounts
            .iter()
            .map(|m| m.image.as_ref().map(|i| i.image.as_str()))
            .collect::<Vec<_>>(),
        [Some(approved.as_str()), None, Some(approved.as_str())],
        "every image volume is pinned to the checked image ID"
    );
    assert_eq!(mounts[1].host_path, "/tmp");
    let e = rt
        .create_container(with_volumes(vec![volume("/x", &imported)]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("image volume at /x"),
        "{}",
        e.message()
    );
    assert_eq!(env.fake.observed.creates.lock().unwrap().len(), 1);
    env.stop().await;
}

/// The sandbox (pause) image is checked again whenever the bundle in force changes, however it
/// changed (here: `pullgate bundle install`'s install + reload).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_image_is_rechecked_after_every_bundle_change() {
    let env = Env::start(true, NodeMode::Enforce, |_, _| {}).await;
    // Approved by v1's busybox:1.36 → D1; v2 moves the tag to D4, so the pause image is no longer
    // approved.
    *env.fake.observed.sandbox_image.lock().unwrap() = pinned("busybox", &digest(1));
    env.node.spawn_background(false);
    let wait_for = |want_ok: bool| {
        let node = env.node.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let problem = node.status_json()["sandbox_image_problem"].clone();
                let gauge = node.metrics_text(0).contains(&format!(
                    "pullgate_sandbox_image_approved {}",
                    u8::from(want_ok)
                ));
                if problem.is_null() == want_ok && gauge {
                    return problem;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "sandbox image check did not report approved={want_ok}: {problem}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_for(true).await;
    env.install_and_reload(2, &digest(4)).await;
    let problem = wait_for(false).await;
    assert!(
        problem.as_str().unwrap().contains("not approved"),
        "{problem}"
    );
    // And back: v3 approves it again.
    let b = bundle_json(3, &digest(1), time::Duration::days(30));
    let s = env.keys.sign(&b, &[&env.keys.alice, &env.keys.bob]);
    drop_bundle(&env.dir, "v3", &b, &s);
    wait_for(true).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_bundle_pulls_and_starts_fail_closed_and_the_rest_works() {
    let env = Env::start(false, NodeMode::Enforce, |_, _| {}).await;
    let mut images = env.images().await;
    let mut rt = env.runtime().await;
    let e = images
        .pull_image(pull_request("busybox:1.36", "checkout"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("no valid allowlist bundle"),
        "{}",
        e.message()
    );
    env.fake.add_sandbox("sb", &pod_config("checkout", &[]));
    let e = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: "sb".into(),
            config: Some(cri::ContainerConfig {
                image: Some(cri::ImageSpec {
                    image: digest(1),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(env.pulled().is_empty() && env.fake.observed.creates.lock().unwrap().is_empty());
    // kubelet can still see and stop things.
    assert_eq!(
        rt.version(cri::VersionRequest::default())
            .await
            .unwrap()
            .into_inner()
            .runtime_name,
        "fake-cri"
    );
    rt.list_containers(cri::ListContainersRequest::default())
        .await
        .unwrap();
    images
        .list_images(cri::ListImagesRequest::default())
        .await
        .unwrap();
    assert!(env.node.ready().await.is_err());
    env.stop().await;

    // Node-level warn mode (the packaged default for rollout): nothing is blocked, all is recorded.
    let env = Env::start(false, NodeMode::Warn, |_, _| {}).await;
    let mut images = env.images().await;
    images
        .pull_image(pull_request("busybox:1.36", "checkout"))
        .await
        .unwrap();
    assert_eq!(env.pulled(), vec!["busybox:1.36".to_string()]);
    let last = env.audit_lines().pop().unwrap();
    assert_eq!(
        (last["decision"].as_str(), last["reason"].as_str()),
        (Some("warn"), Some("no_valid_bundle"))
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_bundles_change_nothing() {
    let env = Env::start(true, NodeMode::Enforce, |_, _| {}).await;
    let k = &env.keys;
    let good_v3 = bundle_json(3, &digest(5), time::Duration::days(30));
    let cases = [
        (
            "badsig",
            good_v3.clone(),
            k.sign(&good_v3.replace("tests@", "evil@"), &[&k.alice, &k.bob]),
        ),
        (
            "unknown",
            good_v3.clone(),
            k.sign(&good_v3, &[&k.alice, &k.mallory]),
        ),
        ("one", good_v3.clone(), k.sign(&good_v3, &[&k.alice])),
        (
            "expired",
            bundle_json(4, &digest(5), time::Duration::minutes(-5)),
            String::new(),
        ),
        (
            "rollback",
            bundle_json(1, &digest(5), time::Duration::days(30)),
            String::new(),
        ),
    ];
    for (name, bundle, sigs) in cases {
        let sigs = if sigs.is_empty() {
            k.sign(&bundle, &[&k.alice, &k.bob])
        } else {
            sigs
        };
        drop_bundle(&env.dir, name, &bundle, &sigs);
        assert_eq!(env.node.poll_drop_dir(), 0, "{name} must be rejected");
        let reason = std::fs::read_to_string(
            env.dir
                .join(format!("incoming/{name}.json.rejected.reason")),
        )
        .unwrap();
        assert!(!reason.trim().is_empty(), "{name}: a reason is written");
        assert_eq!(
            env.node.state.current().unwrap().version,
            1,
            "{name}: v1 stays in force"
        );
    }
    let metrics = env.node.metrics_text(0);
    assert!(
        metrics
            .contains("pullgate_bundle_installs_total{result=\"rejected\",reason=\"rollback\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("reason=\"expired\"") && metrics.contains("pullgate_bundle_version 1"),
        "{metrics}"
    );
    // And v1 still enforces.
    let mut images = env.images().await;
    images
        .pull_image(pull_request("busybox:1.36", "checkout"))
        .await
        .unwrap();
    assert_eq!(env.pulled().last().unwrap(), &pinned("busybox", &digest(1)));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_dropped_bundles_are_refused_unread() {
    let limit = bundle_json(1, &digest(1), time::Duration::days(30)).len() as u64 + 64;
    let env = Env::start(true, NodeMode::Enforce, move |c, _| {
        c.policy.max_bundle_size = limit
    })
    .await;
    assert_eq!(env.node.state.current().unwrap().version, 1);
    // Validly signed, but 100 bytes of trailing whitespace over the limit.
    let big = format!(
        "{}{}",
        bundle_json(2, &digest(5), time::Duration::days(30)),
        " ".repeat(100)
    );
    let k = &env.keys;
    drop_bundle(&env.dir, "big", &big, &k.sign(&big, &[&k.alice, &k.bob]));
    assert_eq!(env.node.poll_drop_dir(), 0);
    let reason =
        std::fs::read_to_string(env.dir.join("incoming/big.json.rejected.reason")).unwrap();
    assert!(reason.contains("policy.max_bundle_size"), "{reason}");
    let metrics = env.node.metrics_text(0);
    assert!(
        metrics
            .contains("pullgate_bundle_installs_total{result=\"rejected\",reason=\"too_large\"} 1"),
        "{metrics}"
    );
    assert_eq!(env.node.state.current().unwrap().version, 1);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_swap_under_200_concurrent_calls_fails_none() {
    let env = Env::start(true, NodeMode::Enforce, |_, _| {}).await;
    let ch = cri_channel(&env.listen).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let ch = ch.clone();
        tasks.spawn(async move {
            let ns = if i % 2 == 0 { "checkout" } else { "search" };
            image_client(ch)
                .pull_image(pull_request("busybox:1.36", ns))
                .await
                .map(|_| ())
        });
        if i == 100 {
            let b = bundle_json(2, &digest(4), time::Duration::days(30));
            let s = env.keys.sign(&b, &[&env.keys.alice, &env.keys.bob]);
            drop_bundle(&env.dir, "v2", &b, &s);
            let node = env.node.clone();
            tasks.spawn(async move {
                tokio::task::spawn_blocking(move || assert_eq!(node.poll_drop_dir(), 1))
                    .await
                    .unwrap();
                Ok(())
            });
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().expect("no call may fail during a bundle swap");
    }
    assert_eq!(env.node.state.current().unwrap().version, 2);
    let pulled = env.pulled();
    assert_eq!(pulled.len(), 200);
    assert!(
        pulled
            .iter()
            .all(|p| *p == pinned("busybox", &digest(1)) || *p == pinned("busybox", &digest(4)))
    );
    // After the swap, every new call uses v2.
    let mut images = env.images().await;
    images
        .pull_image(pull_request("busybox:1.36", "checkout"))
        .await
        .unwrap();
    assert_eq!(env.pulled().last().unwrap(), &pinned("busybox", &digest(4)));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_installs_from_the_state_dir_and_sandbox_image_is_checked() {
    let env = Env::start(true, NodeMode::Enforce, |_, _| {}).await;
    env.install_and_reload(5, &digest(6)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while env.node.state.current().unwrap().version != 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "reload did not swap in v5"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A restarted node loads the same last-known-good bundle.
    let again = Node::start(env.node.config.clone()).unwrap();
    assert_eq!(again.state.current().unwrap().version, 5);

    // containerd's sandbox image: public → problem; approved private mirror digest → fine.
    *env.fake.observed.sandbox_image.lock().unwrap() = "registry.k8s.io/pause:3.9".into();
    let p = env.node.check_sandbox_image().await.unwrap_err();
    assert!(p.contains("not in the private registry"), "{p}");
    *env.fake.observed.sandbox_image.lock().unwrap() = pinned("busybox", &digest(2));
    env.node.check_sandbox_image().await.unwrap();
    assert!(
        env.node
            .metrics_text(0)
            .contains("pullgate_sandbox_image_approved 1")
    );
    let status = env.node.status_json();
    assert_eq!(status["bundle"]["version"], 5);
    assert_eq!(status["mode"], "enforce");
    env.stop().await;
}

async fn http(addr: std::net::SocketAddr, request: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let code = raw.split_whitespace().nth(1).unwrap().parse().unwrap();
    (
        code,
        raw.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_endpoint_serves_metrics_health_readiness_and_status() {
    let env = Env::start(true, NodeMode::Enforce, |_, _| {}).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(pullgate::node::daemon::http::serve(
        listener,
        env.node.clone(),
    ));
    let mut images = env.images().await;
    images
        .pull_image(pull_request("busybox:1.36", "checkout"))
        .await
        .unwrap();
    let _ = images
        .pull_image(pull_request("alpine:1", "checkout"))
        .await
        .unwrap_err();

    let get = |p: &str| format!("GET {p} HTTP/1.0\r\nHost: x\r\n\r\n");
    let (code, metrics) = http(addr, &get("/metrics")).await;
    assert_eq!(code, 200);
    for want in [
        "pullgate_calls_total{method=\"PullImage\",code=\"0\"} 1",
        "pullgate_calls_total{method=\"PullImage\",code=\"7\"} 1",
        "pullgate_decisions_total{result=\"allow\",reason=\"approved\"} 1",
        "pullgate_decisions_total{result=\"deny\",reason=\"not_in_bundle\"} 1",
        "pullgate_upstream_latency_seconds_count{method=\"PullImage\"} 1",
        "pullgate_bundle_version 1",
        "pullgate_bundle_installs_total{result=\"installed\",reason=\"ok\"} 1",
    ] {
        assert!(metrics.contains(want), "missing {want}:\n{metrics}");
    }
    assert_eq!(http(addr, &get("/healthz")).await.0, 200);
    assert_eq!(
        http(addr, &get("/readyz")).await,
        (200, "ready\n".to_string())
    );
    let (code, status) = http(addr, &get("/status")).await;
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["bundle"]["version"], 1);
    assert_eq!(status["decisions"]["allow"], 1);
    assert_eq!(status["decisions"]["deny"], 1);
    assert_eq!(status["upstream"]["connected"], true);
    assert_eq!(http(addr, &get("/nope")).await.0, 404);
    assert_eq!(
        http(addr, "POST /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
            .await
            .0,
        405
    );
    env.stop().await;

    // Not ready without a bundle, and it says why.
    let env = Env::start(false, NodeMode::Enforce, |_, _| {}).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(pullgate::node::daemon::http::serve(
        listener,
        env.node.clone(),
    ));
    let (code, body) = http(addr, &get("/readyz")).await;
    assert_eq!(code, 503);
    assert!(body.contains("no bundle is installed"), "{body}");
    env.stop().await;
}

/// The real binary at `trace` level, forwarding a pull that carries credentials (warn mode, so the
/// request goes through): neither its log nor the audit log contains them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_reach_the_logs_even_at_trace() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, _events) = FakeCri::new();
    let upstream = fake.serve(&dir.path().join("cri.sock"));
    let pg = Serve::start(dir.path(), &upstream.path, "trace", "warn").await;
    let mut req = pull_request("busybox:1.36", "checkout");
    req.auth = Some(cri::AuthConfig {
        username: "user-Zq8".into(),
        password: "hunter2-Zq8".into(),
        auth: "dXNlcjpodW50ZXIy-Zq8".into(),
        identity_token: "idtoken-Zq8".into(),
        registry_token: "regtoken-Zq8".into(),
        server_address: "docker.io".into(),
    });
    image_client(cri_channel(&pg.listen).await)
        .pull_image(req)
        .await
        .unwrap();
    let forwarded = env_pulled(&fake);
    assert_eq!(
        forwarded.auth.unwrap().password,
        "hunter2-Zq8",
        "warn mode forwards the request as is"
    );
    let logged = pg.stop();
    assert!(logged.contains("busybox:1.36"), "the log names the image");
    let audit = std::fs::read_to_string(dir.path().join("state/audit.log")).unwrap();
    for secret in [
        "user-Zq8",
        "hunter2-Zq8",
        "dXNlcjpodW50ZXIy-Zq8",
        "idtoken-Zq8",
        "regtoken-Zq8",
    ] {
        assert!(!logged.contains(secret), "{secret} leaked into the log");
        assert!(
            !audit.contains(secret),
            "{secret} leaked into the audit log"
        );
    }
    upstream.stop().await;
}

/// `pullgate serve` as a process, its log (stderr) written to a file as under systemd.
struct Serve {
    child: std::process::Child,
    listen: PathBuf,
    log: PathBuf,
}

impl Serve {
    /// Starts pullgate at `level` in `mode` with state under `dir` (a bundle may be installed there
    /// first) and waits for its socket. `NO_COLOR` is removed: colour must follow the terminal alone.
    async fn start(dir: &Path, upstream: &Path, level: &str, mode: &str) -> Serve {
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[log]\nlevel = \"{level}\"\n[policy]\nmode = \"{mode}\"\nstate_dir = \"{d}/state\"\ntrust = \"{d}/trust.toml\"\n[metrics]\nlisten = \"off\"\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let log = dir.join("pullgate.log");
        let listen = dir.join("pg.sock");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_pullgate"))
            .args(["serve", "--config"])
            .arg(&config)
            .arg("--listen")
            .arg(&listen)
            .arg("--upstream")
            .arg(upstream)
            .env_remove("NO_COLOR")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::UnixStream::connect(&listen).await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "pullgate did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Serve { child, listen, log }
    }

    /// Stops pullgate (SIGTERM) and returns its whole log.
    fn stop(mut self) -> String {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap();
        std::fs::read_to_string(&self.log).unwrap()
    }
}

/// What the log says, and how: no colour codes in a file; the no-bundle start-up message says what
/// the mode really does; a real denial is logged at WARN, like a warn-mode would-be denial.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_says_what_happens_plainly_and_denials_are_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, _events) = FakeCri::new();
    let upstream = fake.serve(&dir.path().join("cri.sock"));
    let keys = Keys::new();
    std::fs::write(dir.path().join("trust.toml"), keys.trust_toml()).unwrap();

    // Warn mode, no bundle: pulls go through as asked (and the log says so).
    let pg = Serve::start(dir.path(), &upstream.path, "info", "warn").await;
    image_client(cri_channel(&pg.listen).await)
        .pull_image(pull_request("busybox:1.36", "checkout"))
        .await
        .unwrap();
    let logged = pg.stop();
    assert!(
        !logged.contains('\x1b'),
        "colour codes in a log file:\n{logged}"
    );
    assert!(
        logged.contains("go through unchecked") && !logged.contains("refused until"),
        "{logged}"
    );
    assert_eq!(env_pulled(&fake).image.unwrap().image, "busybox:1.36");

    // Enforce mode with a bundle: a denial is a WARN line.
    let b = bundle_json(1, &digest(1), time::Duration::days(30));
    let trust = pullgate::policy::Trust::from_toml(&keys.trust_toml()).unwrap();
    pullgate::node::enforce::store::BundleStore::new(dir.path().join("state"))
        .install(
            b.as_bytes(),
            keys.sign(&b, &[&keys.alice, &keys.bob]).as_bytes(),
            &trust,
            OffsetDateTime::now_utc(),
            Path::new("v1.json"),
        )
        .unwrap();
    let pg = Serve::start(dir.path(), &upstream.path, "info", "enforce").await;
    image_client(cri_channel(&pg.listen).await)
        .pull_image(pull_request("alpine:3.19", "checkout"))
        .await
        .unwrap_err();
    let logged = pg.stop();
    let denial = logged
        .lines()
        .find(|l| l.contains("denied") && l.contains("alpine:3.19"))
        .unwrap_or_else(|| panic!("no denial logged:\n{logged}"));
    assert!(denial.contains(" WARN "), "{denial}");
    upstream.stop().await;
}

fn env_pulled(fake: &FakeCri) -> cri::PullImageRequest {
    fake.observed
        .pulls
        .lock()
        .unwrap()
        .last()
        .cloned()
        .expect("a pull reached the upstream")
}

/// containerd 1.6 still serves the `runtime.v1alpha2` CRI API: it is enforced exactly like v1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_older_v1alpha2_api_is_no_way_around() {
    use prost::Message;
    let env = Env::start(true, NodeMode::Enforce, |_, _| {}).await;
    let status_of = |r: &RawResponse| {
        r.headers
            .get("grpc-status")
            .or(r.trailers.as_ref().and_then(|t| t.get("grpc-status")))
            .map(|v| v.to_str().unwrap().to_string())
    };
    let pull = pull_request("alpine:3.19", "checkout").encode_to_vec();
    let r = raw_call(
        &env.listen,
        "http://localhost/runtime.v1alpha2.ImageService/PullImage",
        grpc_headers(),
        frame(&pull),
    )
    .await;
    assert_eq!(status_of(&r).as_deref(), Some("7"), "{r:?}");
    env.fake.add_sandbox("sb", &pod_config("checkout", &[]));
    let create = cri::CreateContainerRequest {
        pod_sandbox_id: "sb".into(),
        config: Some(cri::ContainerConfig {
            image: Some(cri::ImageSpec {
                image: digest(0xee),
                ..Default::default()
            }),
            ..Default::default()
        }),
        sandbox_config: Some(pod_config("checkout", &[])),
    };
    let r = raw_call(
        &env.listen,
        "http://localhost/runtime.v1alpha2.RuntimeService/CreateContainer",
        grpc_headers(),
        frame(&create.encode_to_vec()),
    )
    .await;
    assert_eq!(status_of(&r).as_deref(), Some("7"), "{r:?}");
    assert!(env.pulled().is_empty());
    assert!(env.fake.observed.creates.lock().unwrap().is_empty());
    // An approved v1alpha2 pull is rewritten like a v1 one (the fake serves only v1, so its answer is
    // UNIMPLEMENTED; what matters is that the request was decided and pinned, as the audit shows).
    let ok = pull_request("busybox:1.36", "checkout").encode_to_vec();
    raw_call(
        &env.listen,
        "http://localhost/runtime.v1alpha2.ImageService/PullImage",
        grpc_headers(),
        frame(&ok),
    )
    .await;
    let last = env.audit_lines().pop().unwrap();
    assert_eq!(last["decision"], "allow");
    assert_eq!(last["pulled"], pinned("busybox", &digest(1)));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_survives_a_deleted_current_link_and_the_drop_dir_follows_no_links() {
    let env = Env::start(true, NodeMode::Enforce, |_, _| {}).await;
    let k = &env.keys;
    let v2 = bundle_json(2, &digest(4), time::Duration::days(30));
    drop_bundle(&env.dir, "v2", &v2, &k.sign(&v2, &[&k.alice, &k.bob]));
    assert_eq!(env.node.poll_drop_dir(), 1);
    // Someone deletes the `current` link: an older, validly signed bundle is still a rollback.
    std::fs::remove_file(env.dir.join("state/current")).unwrap();
    let v1 = bundle_json(1, &digest(5), time::Duration::days(30));
    drop_bundle(&env.dir, "old", &v1, &k.sign(&v1, &[&k.alice, &k.bob]));
    assert_eq!(env.node.poll_drop_dir(), 0);
    let reason =
        std::fs::read_to_string(env.dir.join("incoming/old.json.rejected.reason")).unwrap();
    assert!(
        reason.contains("rollback") || reason.contains("not greater"),
        "{reason}"
    );

    // A symbolic link in the drop directory is never followed, not even to a valid bundle.
    let v3 = bundle_json(3, &digest(6), time::Duration::days(30));
    let outside = env.dir.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("v3.json"), &v3).unwrap();
    std::fs::write(
        outside.join("v3.json.sig"),
        k.sign(&v3, &[&k.alice, &k.bob]),
    )
    .unwrap();
    let inc = env.dir.join("incoming");
    std::os::unix::fs::symlink(outside.join("v3.json.sig"), inc.join("v3.json.sig")).unwrap();
    std::os::unix::fs::symlink(outside.join("v3.json"), inc.join("v3.json")).unwrap();
    assert_eq!(env.node.poll_drop_dir(), 0);
    assert_eq!(env.node.state.current().unwrap().version, 2);
    // A drop directory writable by others is not used at all.
    use std::os::unix::fs::PermissionsExt;
    std::fs::remove_file(inc.join("v3.json")).unwrap();
    std::fs::remove_file(inc.join("v3.json.sig")).unwrap();
    drop_bundle(&env.dir, "v3", &v3, &k.sign(&v3, &[&k.alice, &k.bob]));
    std::fs::set_permissions(&inc, std::fs::Permissions::from_mode(0o777)).unwrap();
    assert_eq!(env.node.poll_drop_dir(), 0);
    std::fs::set_permissions(&inc, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(
        env.node.poll_drop_dir(),
        1,
        "once safe again, the bundle installs"
    );
    assert_eq!(env.node.state.current().unwrap().version, 3);
    env.stop().await;
}
