//! Enforcement in the CRI path, in-process: a real pullgate node (bundle store, enforcer, audit log)
//! in front of the fake CRI upstream, asserting what the upstream actually received.

mod fake_cri;

use std::path::{Path, PathBuf};
use std::sync::Arc;
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
    assert_eq!(
        env.fake
            .observed
            .image_statuses
            .lock()
            .unwrap()
            .last()
            .unwrap(),
        &pinned("busybox", &digest(1))
    );
    assert_eq!(got.id, stored.id);
    assert_eq!(
        got.repo_tags,
        vec!["docker.io/library/busybox:1.36".to_string()]
    );
    assert_eq!(got.repo_digests, stored.repo_digests);
    // IDs and unapproved names pass through untouched.
    images.image_status(status(&digest(0xaa))).await.unwrap();
    assert_eq!(
        env.fake
            .observed
            .image_statuses
            .lock()
            .unwrap()
            .last()
            .unwrap(),
        &digest(0xaa)
    );
    images.image_status(status("alpine:3.19")).await.unwrap();
    assert_eq!(
        env.fake
            .observed
            .image_statuses
            .lock()
            .unwrap()
            .last()
            .unwrap(),
        "alpine:3.19"
    );

    // ListImages shows the source tags bound to each pinned image.
    let listed = images
        .list_images(cri::ListImagesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.images.len(), 1);
    assert_eq!(
        listed.images[0].repo_tags,
        vec!["docker.io/library/busybox:1.36".to_string()]
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
    assert_eq!(
        env.fake
            .observed
            .image_statuses
            .lock()
            .unwrap()
            .last()
            .unwrap(),
        &pinned("busybox", &digest(4))
    );
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

    let create = |image: &str, ns: &str| cri::CreateContainerRequest {
        pod_sandbox_id: "sb".into(),
        config: Some(cri::ContainerConfig {
            image: Some(cri::ImageSpec {
                image: image.into(),
                user_specified_image: "as-in-pod-spec:1".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        sandbox_config: Some(pull_request("x", ns).sandbox_config.unwrap()),
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
    let sent = env
        .fake
        .observed
        .creates
        .lock()
        .unwrap()
        .last()
        .cloned()
        .unwrap();
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

/// Cached start decisions are shared by pods of one scope whatever their other labels, and are not
/// used once the bundle is past its expiry grace: a cached image then fails closed like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_starts_are_per_scope_and_end_with_the_bundle() {
    let env = Env::start(false, NodeMode::Enforce, |c, _| {
        c.policy.expiry_grace = Duration::ZERO;
    })
    .await;
    let lifetime = time::Duration::seconds(3);
    let b = bundle_json(1, &digest(1), lifetime);
    let expires = std::time::Instant::now() + Duration::from_secs(3);
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
    let create = |pod_hash: &str| {
        let mut sandbox = pull_request("x", "checkout").sandbox_config.unwrap();
        sandbox
            .labels
            .insert("pod-template-hash".into(), pod_hash.into());
        cri::CreateContainerRequest {
            pod_sandbox_id: "sb".into(),
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
    let e = rt
        .create_container(cri::CreateContainerRequest {
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
    // What `pullgate bundle install` does: verify and install into the state dir, then SIGHUP.
    let b = bundle_json(5, &digest(6), time::Duration::days(30));
    let s = env.keys.sign(&b, &[&env.keys.alice, &env.keys.bob]);
    let trust = pullgate::policy::Trust::from_toml(&env.keys.trust_toml()).unwrap();
    env.node
        .store
        .install(
            b.as_bytes(),
            s.as_bytes(),
            &trust,
            OffsetDateTime::now_utc(),
            Path::new("v5.json"),
        )
        .unwrap();
    env.control.send(Control::Reload).await.unwrap();
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
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[log]\nlevel = \"trace\"\n[policy]\nmode = \"warn\"\nstate_dir = \"{d}/state\"\ntrust = \"{d}/trust.toml\"\n[metrics]\nlisten = \"off\"\n",
            d = dir.path().display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("pullgate.log")).unwrap();
    let listen = dir.path().join("pg.sock");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pullgate"))
        .args(["serve", "--config"])
        .arg(&config)
        .arg("--listen")
        .arg(&listen)
        .arg("--upstream")
        .arg(&upstream.path)
        .stderr(log)
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
    let mut req = pull_request("busybox:1.36", "checkout");
    req.auth = Some(cri::AuthConfig {
        username: "user-Zq8".into(),
        password: "hunter2-Zq8".into(),
        auth: "dXNlcjpodW50ZXIy-Zq8".into(),
        identity_token: "idtoken-Zq8".into(),
        registry_token: "regtoken-Zq8".into(),
        server_address: "docker.io".into(),
    });
    image_client(cri_channel(&listen).await)
        .pull_image(req)
        .await
        .unwrap();
    let forwarded = env_pulled(&fake);
    assert_eq!(
        forwarded.auth.unwrap().password,
        "hunter2-Zq8",
        "warn mode forwards the request as is"
    );
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    let logged = std::fs::read_to_string(dir.path().join("pullgate.log")).unwrap();
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
    let create = cri::CreateContainerRequest {
        config: Some(cri::ContainerConfig {
            image: Some(cri::ImageSpec {
                image: digest(0xee),
                ..Default::default()
            }),
            ..Default::default()
        }),
        sandbox_config: pull_request("x", "checkout").sandbox_config,
        ..Default::default()
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
