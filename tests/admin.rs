//! The administrators' side against real loopback Distribution registries: `approve` (every refusal
//! path copies and writes nothing), mirroring by digest (idempotent, resumable, multi-platform index),
//! a registry that lies about a digest, `bundle build` with its mirror check, and the whole way to a
//! node: approve (and approve --replace) → build (format 2) → sign twice → verify as a node does →
//! install → pods run from the mirror by digest, the replaced tag deprecated until its sunset.

mod support;

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pullgate::admin::approve::{self, ApproveError, Request};
use pullgate::admin::build;
use pullgate::admin::catalog::Catalog;
use pullgate::admin::reports::fixture;
use pullgate::policy::{Digest, Reference};
use pullgate::registry::{self, CopyEvent, ManifestKind, Registry, RegistryError, RegistryOptions};
use support::images::ImageFactory;
use support::pullgate::cli_ok;
use support::{Registry as Distribution, TestDir, e2e_enabled};
use time::OffsetDateTime;

const GOVERNANCE: &str = r#"organization = "corp"
application_label = "corp.example/application"

[rules]
min_scanners = 2
max_severity = "high"
max_versions = 3
sunset_after = "30d"
max_report_age = "7d"

[rules.licenses]
allow = ["MIT", "Apache-2.0", "BSD-2-Clause", "GPL-2.0-only", "AGPL-3.0-only"]

[[programs]]
name = "payments"

[programs.rules]
max_severity = "medium"
max_versions = 2
licenses = { allow = ["MIT", "Apache-2.0", "BSD-2-Clause", "GPL-2.0-only"], deny = ["AGPL-3.0-only"] }

[[programs.projects]]
name = "checkout"
namespaces = ["checkout"]
"#;

/// Two registries, an image factory, two administrators' keys and a catalog that reaches `docker.io`
/// and `registry.k8s.io` through the "public" registry.
struct Env {
    public: Distribution,
    private: Distribution,
    images: ImageFactory,
    catalog: PathBuf,
    alice: PathBuf,
    reports: PathBuf,
    dir: TestDir,
}

impl Env {
    fn start(name: &str) -> Env {
        let dir = TestDir::new(name);
        let public = Distribution::start(dir.path(), "public");
        let private = Distribution::start(dir.path(), "private");
        let images = ImageFactory::new(dir.path());
        let keys = dir.path().join("keys");
        std::fs::create_dir_all(&keys).unwrap();
        let mut trust = String::from("threshold = 2\n");
        for n in ["alice", "bob"] {
            cli_ok([
                "keygen".as_ref(),
                "--out".as_ref(),
                keys.join(n).as_os_str(),
            ]);
            let public = std::fs::read_to_string(keys.join(format!("{n}.pub"))).unwrap();
            trust += &format!(
                "\n[[keys]]\nname = \"{n}\"\npublic_key = \"{}\"\n",
                public.trim()
            );
        }
        std::fs::write(keys.join("trust.toml"), &trust).unwrap();
        cli_ok([
            "keygen".as_ref(),
            "--out".as_ref(),
            keys.join("mallory").as_os_str(),
        ]);
        let catalog = dir.path().join("catalog");
        std::fs::create_dir_all(&catalog).unwrap();
        std::fs::write(
            catalog.join("catalog.toml"),
            format!(
                "issuer = \"platform-security@corp.example\"\nprivate_registry = \"{private}\"\nvalidity = \"1d\"\n\
                 plain_http = [\"{public}\", \"{private}\"]\ntrust = \"trust.toml\"\n\n\
                 [endpoints]\n\"docker.io\" = \"{public}\"\n\"registry.k8s.io\" = \"{public}\"\n\n\
                 [[mirrors]]\nsource = \"docker.io\"\ntarget = \"approved\"\n\n\
                 [[mirrors]]\nsource = \"registry.k8s.io\"\ntarget = \"approved-k8s\"\n",
                private = private.host(),
                public = public.host()
            ),
        )
        .unwrap();
        std::fs::write(catalog.join("governance.toml"), GOVERNANCE).unwrap();
        std::fs::write(catalog.join("trust.toml"), &trust).unwrap();
        std::fs::write(
            catalog.join("ignore.toml"),
            "[[ignore]]\nid = \"CVE-2099-0001\"\nreason = \"not reachable in this build\"\nexpires = 2099-01-01T00:00:00Z\n\n\
             [[ignore]]\nid = \"CVE-2000-0002\"\nreason = \"was waived until a fix shipped\"\nexpires = 2001-01-01T00:00:00Z\n",
        )
        .unwrap();
        let reports = dir.path().join("reports");
        std::fs::create_dir_all(&reports).unwrap();
        Env {
            public,
            private,
            images,
            catalog,
            alice: keys.join("alice.key"),
            reports,
            dir,
        }
    }

    /// Pushes a fixture image to the public registry as `docker.io/<repo_tag>`; returns its digest.
    fn push(&self, repo_tag: &str) -> Digest {
        Digest::parse(&self.images.push_image(&self.public, repo_tag, "admin")).unwrap()
    }

    fn request(&self, source: &str, scope: &str, reports: Vec<PathBuf>) -> Request {
        Request {
            source: source.into(),
            catalog: self.catalog.clone(),
            scope: scope.into(),
            license: "MIT".into(),
            reports,
            replace: None,
            platforms: vec![],
            key: Some(self.alice.clone()),
            dry_run: false,
            registry: RegistryOptions::default(),
            now: OffsetDateTime::now_utc(),
        }
    }

    /// Writes a report file; `kind` is "trivy" or "grype".
    fn report(
        &self,
        kind: &str,
        name: &str,
        about: &Digest,
        config: Option<&Digest>,
        age: Duration,
        findings: &[(&str, &str, &str)],
    ) -> PathBuf {
        let created = OffsetDateTime::now_utc() - age;
        let text = match kind {
            "trivy" => fixture::trivy(
                "0.58.1",
                "docker.io/library/x",
                about,
                config,
                created,
                findings,
            ),
            _ => fixture::grype(
                "0.86.0",
                "docker.io/library/x",
                about,
                config,
                created,
                findings,
            ),
        };
        let path = self.reports.join(format!("{name}.json"));
        std::fs::write(&path, text).unwrap();
        path
    }

    /// A clean Trivy and Grype report pair about `digest`.
    fn clean_reports(&self, name: &str, digest: &Digest) -> Vec<PathBuf> {
        vec![
            self.report(
                "trivy",
                &format!("{name}-trivy"),
                digest,
                None,
                Duration::from_secs(3600),
                &[("CVE-1", "zlib", "LOW")],
            ),
            self.report(
                "grype",
                &format!("{name}-grype"),
                digest,
                None,
                Duration::from_secs(3600),
                &[],
            ),
        ]
    }

    /// Every file of the catalog, by path.
    fn snapshot(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        fn walk(d: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, out);
                } else {
                    out.insert(p.clone(), std::fs::read(&p).unwrap());
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(&self.catalog, &mut out);
        out
    }

    fn client(&self) -> Registry {
        Registry::new(RegistryOptions {
            plain_http: vec![self.public.host(), self.private.host()],
            concurrency: 4,
            ..RegistryOptions::default()
        })
        .unwrap()
    }

    /// Write requests (push, mount) the private registry received since `mark`.
    fn writes_since(&self, mark: usize) -> Vec<String> {
        self.private
            .requests_since(mark)
            .into_iter()
            .filter(|r| r.starts_with("PUT") || r.starts_with("POST") || r.starts_with("PATCH"))
            .collect()
    }
}

fn refused_rule(r: Result<approve::Outcome, ApproveError>) -> (&'static str, String) {
    match r {
        Err(ApproveError::Refused { rule, message }) => (rule, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approve_mirrors_by_digest_records_provenance_and_is_idempotent() {
    if !e2e_enabled("approve_mirrors_by_digest_records_provenance_and_is_idempotent") {
        return;
    }
    let env = Env::start("admin-approve");
    let digest = env.push("library/busybox:1.36");
    let reports = env.clean_reports("bb", &digest);

    // Dry run: says what would happen, copies and writes nothing.
    let before = env.snapshot();
    let mark = env.private.mark();
    let mut req = env.request("docker.io/library/busybox:1.36", "corp", reports.clone());
    req.dry_run = true;
    let out = approve::approve(&req).await.unwrap();
    assert!(
        out.lines.iter().any(|l| l.starts_with("would copy")),
        "{:?}",
        out.lines
    );
    assert_eq!(env.snapshot(), before);
    assert!(env.writes_since(mark).is_empty());

    let out =
        approve::approve(&env.request("docker.io/library/busybox:1.36", "corp", reports.clone()))
            .await
            .unwrap();
    assert_eq!(out.digest, digest);
    assert_eq!(
        out.mirror,
        format!("{}/approved/library/busybox@{digest}", env.private.host())
    );
    let copy = out.copy.unwrap();
    assert!(
        copy.blobs_copied >= 2 && copy.manifests_pushed == 1,
        "{copy:?}"
    );
    let client = env.client();
    assert!(
        client
            .manifest_exists(&env.private.host(), "approved/library/busybox", &digest)
            .await
            .unwrap()
    );
    // The copy serves exactly the source's manifest bytes.
    assert_eq!(
        support::images::manifest_digest(
            &env.private.host(),
            &format!("approved/library/busybox@{digest}")
        ),
        digest.to_string()
    );

    // The catalog entry, with provenance: both scanners, report hashes, worst severity, the approver.
    let catalog = Catalog::load(&env.catalog).unwrap();
    let repo = catalog.repository("docker.io/library/busybox").unwrap();
    let v = &repo.content.approved[0];
    assert_eq!(v.tag.as_ref().unwrap().get_ref(), "1.36");
    assert_eq!(v.digest.get_ref(), &digest.to_string());
    let alice_id =
        pullgate::policy::PrivateKey::parse(std::fs::read_to_string(&env.alice).unwrap().trim())
            .unwrap()
            .public()
            .id()
            .to_owned();
    assert_eq!(v.approved_by, alice_id);
    let mut scans: Vec<(String, String, String)> = v
        .scans
        .iter()
        .map(|s| {
            (
                s.scanner.clone(),
                s.worst_severity.to_string(),
                s.report.get_ref().clone(),
            )
        })
        .collect();
    scans.sort();
    assert_eq!(
        scans,
        vec![
            (
                "grype".into(),
                "none".into(),
                Digest::sha256_of(&std::fs::read(&reports[1]).unwrap()).to_string()
            ),
            (
                "trivy".into(),
                "low".into(),
                Digest::sha256_of(&std::fs::read(&reports[0]).unwrap()).to_string()
            ),
        ]
    );

    // Mirroring again copies nothing; approving the same tag again is refused.
    let mark = env.private.mark();
    let src = Reference::parse(&format!("docker.io/library/busybox@{digest}")).unwrap();
    let mut opts = RegistryOptions {
        plain_http: vec![env.public.host(), env.private.host()],
        concurrency: 4,
        ..Default::default()
    };
    opts.endpoints.insert("docker.io".into(), env.public.host());
    let again = registry::copy(
        &Registry::new(opts).unwrap(),
        &src,
        &env.private.host(),
        "approved/library/busybox",
        &|_| ControlFlow::Continue(()),
    )
    .await
    .unwrap();
    assert_eq!(
        (
            again.blobs_copied,
            again.manifests_pushed,
            again.manifests_present
        ),
        (0, 0, 1)
    );
    assert!(
        env.writes_since(mark).is_empty(),
        "{:?}",
        env.writes_since(mark)
    );
    let (rule, msg) = refused_rule(
        approve::approve(&env.request("docker.io/library/busybox:1.36", "corp", reports.clone()))
            .await,
    );
    assert_eq!(rule, "versions");
    assert!(msg.contains("already approved"), "{msg}");
    // So is approving its digest without a tag: the node would have two approvals of one digest.
    let before = std::fs::read_to_string(env.catalog.join(&repo.file)).unwrap();
    let (rule, msg) = refused_rule(
        approve::approve(&env.request(
            &format!("docker.io/library/busybox@{digest}"),
            "corp",
            reports,
        ))
        .await,
    );
    assert_eq!(rule, "versions");
    assert!(
        msg.contains(&format!(
            "busybox@{digest} is already approved for corp as tag 1.36"
        )),
        "{msg}"
    );
    assert_eq!(
        std::fs::read_to_string(env.catalog.join(&repo.file)).unwrap(),
        before
    );
    assert!(env.writes_since(mark).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_names_its_rule_and_copies_and_writes_nothing() {
    if !e2e_enabled("every_refusal_names_its_rule_and_copies_and_writes_nothing") {
        return;
    }
    let env = Env::start("admin-refusals");
    let d = env.push("library/redis:7.2");
    let other = env.push("library/redis:7.0");
    let hour = Duration::from_secs(3600);
    let src = "docker.io/library/redis:7.2";
    let trivy_ok = env.report("trivy", "trivy-ok", &d, None, hour, &[]);
    let grype_ok = env.report("grype", "grype-ok", &d, None, hour, &[]);

    let mut cases: Vec<(&str, Request, &str, &str)> = Vec::new();
    let mut r = env.request(
        src,
        "corp",
        vec![
            trivy_ok.clone(),
            env.report("grype", "grype-other", &other, None, hour, &[]),
        ],
    );
    cases.push(("unbound report", r.clone(), "reports.bound", "not about"));
    r = env.request(src, "corp", vec![trivy_ok.clone()]);
    cases.push(("one scanner only", r.clone(), "scanners", "requires 2"));
    r = env.request(
        src,
        "corp",
        vec![
            trivy_ok.clone(),
            env.report("trivy", "trivy-2", &d, None, hour, &[]),
        ],
    );
    cases.push((
        "two reports of one scanner",
        r.clone(),
        "scanners",
        "1 distinct scanner",
    ));
    r = env.request(
        src,
        "corp",
        vec![
            trivy_ok.clone(),
            env.report(
                "grype",
                "grype-crit",
                &d,
                None,
                hour,
                &[("CVE-2024-9", "musl", "Critical")],
            ),
        ],
    );
    cases.push(("critical finding", r.clone(), "severity", "critical"));
    r = env.request(
        src,
        "corp/payments/checkout",
        vec![
            trivy_ok.clone(),
            env.report(
                "grype",
                "grype-high",
                &d,
                None,
                hour,
                &[("CVE-2024-8", "musl", "High")],
            ),
        ],
    );
    cases.push((
        "high is over the program's medium",
        r.clone(),
        "severity",
        "set by corp/payments",
    ));
    r = env.request(
        src,
        "corp",
        vec![
            trivy_ok.clone(),
            env.report(
                "grype",
                "grype-expired-ignore",
                &d,
                None,
                hour,
                &[("CVE-2000-0002", "musl", "Critical")],
            ),
        ],
    );
    cases.push((
        "expired ignore no longer applies",
        r.clone(),
        "severity",
        "critical",
    ));
    r = env.request(
        src,
        "corp",
        vec![
            trivy_ok.clone(),
            env.report(
                "grype",
                "grype-old",
                &d,
                None,
                Duration::from_secs(8 * 86_400),
                &[],
            ),
        ],
    );
    cases.push((
        "report older than max_report_age",
        r.clone(),
        "reports.age",
        "older than max_report_age",
    ));
    r = env.request(
        src,
        "corp/payments",
        vec![trivy_ok.clone(), grype_ok.clone()],
    );
    r.license = "MIT AND AGPL-3.0-only".into();
    cases.push((
        "licence denied by the program",
        r.clone(),
        "license",
        "AGPL-3.0-only is not allowed by corp/payments",
    ));
    r = env.request(src, "corp", vec![trivy_ok.clone(), grype_ok.clone()]);
    r.license = "GPL-2.0".into();
    cases.push((
        "licence not on the SPDX list",
        r.clone(),
        "license",
        "GPL-2.0-only",
    ));
    r = env.request(
        src,
        "corp/nowhere",
        vec![trivy_ok.clone(), grype_ok.clone()],
    );
    cases.push((
        "unknown scope",
        r.clone(),
        "scope",
        "not in governance.toml",
    ));
    r = env.request(src, "corp", vec![trivy_ok.clone(), grype_ok.clone()]);
    r.key = Some(env.dir.path().join("keys/mallory.key"));
    cases.push((
        "untrusted key",
        r.clone(),
        "key",
        "not in the catalog's trust file",
    ));
    r.key = None;
    cases.push(("no key", r.clone(), "key", "give --key"));
    r = env.request(
        "quay.io/acme/tool:1",
        "corp",
        vec![trivy_ok.clone(), grype_ok.clone()],
    );
    cases.push(("no mirror for the source", r.clone(), "source", "no mirror"));

    let before = env.snapshot();
    let mark = env.private.mark();
    for (what, req, rule, needle) in cases {
        let (got, msg) = refused_rule(approve::approve(&req).await);
        assert_eq!(got, rule, "{what}: {msg}");
        assert!(msg.contains(needle), "{what}: {msg:?} lacks {needle:?}");
        assert_eq!(env.snapshot(), before, "{what}: the catalog changed");
        assert!(
            env.writes_since(mark).is_empty(),
            "{what}: the private registry was written to"
        );
    }

    // The same critical finding passes once a current ignore covers it.
    let ok = env.request(
        src,
        "corp",
        vec![
            trivy_ok.clone(),
            env.report(
                "grype",
                "grype-ignored",
                &d,
                None,
                hour,
                &[("CVE-2099-0001", "musl", "Critical")],
            ),
        ],
    );
    let out = approve::approve(&ok).await.unwrap();
    assert!(
        out.lines
            .iter()
            .any(|l| l.contains("after ignoring CVE-2099-0001")),
        "{:?}",
        out.lines
    );

    // Versions: payments allows 2 tags of a repository; a third needs --replace.
    for tag in ["7.0", "7.2"] {
        let dg = env.push(&format!("library/valkey:{tag}"));
        approve::approve(&env.request(
            &format!("docker.io/library/valkey:{tag}"),
            "corp/payments",
            env.clean_reports(&format!("p{tag}"), &dg),
        ))
        .await
        .unwrap();
    }
    // A tag that moved in the registry is not approved again under the same name.
    env.push("library/valkey:7.2");
    let moved = env.request(
        "docker.io/library/valkey:7.2",
        "corp",
        env.clean_reports("moved", &d),
    );
    let (rule, msg) = refused_rule(approve::approve(&moved).await);
    assert_eq!(rule, "versions");
    assert!(msg.contains("a tag means one digest"), "{msg}");
    let d74 = env.push("library/valkey:7.4");
    let third = env.request(
        "docker.io/library/valkey:7.4",
        "corp/payments",
        env.clean_reports("p74", &d74),
    );
    let before = env.snapshot();
    let mark = env.private.mark();
    let (rule, msg) = refused_rule(approve::approve(&third).await);
    assert_eq!(rule, "versions");
    assert!(
        msg.contains("7.0, 7.2") && msg.contains("--replace"),
        "{msg}"
    );
    assert_eq!(env.snapshot(), before);
    assert!(env.writes_since(mark).is_empty());
    let mut replacing = third.clone();
    replacing.replace = Some("7.0".into());
    approve::approve(&replacing).await.unwrap();
    let catalog = Catalog::load(&env.catalog).unwrap();
    let repo = catalog.repository("docker.io/library/valkey").unwrap();
    let old = repo
        .content
        .approved
        .iter()
        .find(|v| {
            v.scope.get_ref() == "corp/payments" && v.tag.as_ref().unwrap().get_ref() == "7.0"
        })
        .unwrap();
    let (dep, sun) = (old.deprecated_at.unwrap().0, old.sunset_at.unwrap().0);
    assert_eq!((sun - dep).whole_days(), 30, "sunset_after");
    assert_eq!(old.replacement.as_ref().unwrap().get_ref(), "7.4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_platform_index_needs_reports_per_platform_and_mirrors_whole() {
    if !e2e_enabled("multi_platform_index_needs_reports_per_platform_and_mirrors_whole") {
        return;
    }
    let env = Env::start("admin-index");
    let (amd, arm) = (
        env.images.build_image("amd64 variant"),
        env.images.build_image("arm64 variant"),
    );
    let index = support::images::make_index(
        &env.images,
        &[(&amd, "linux", "amd64"), (&arm, "linux", "arm64")],
        "multi",
    );
    let index_digest = Digest::parse(&support::images::push_index(
        &env.images,
        "multi",
        &env.public,
        "library/multi:1",
    ))
    .unwrap();
    assert_eq!(index_digest.to_string(), index);
    let amd_digest = Digest::parse(&env.images.layout_digest(&amd)).unwrap();
    let arm_digest = Digest::parse(&env.images.layout_digest(&arm)).unwrap();
    let client = env.client();
    let amd_manifest = client
        .resolve(
            &Reference::parse(&format!("{}/library/multi@{amd_digest}", env.public.host()))
                .unwrap(),
        )
        .await
        .unwrap();
    let ManifestKind::Image {
        config: amd_config, ..
    } = amd_manifest.kind
    else {
        panic!("not an image")
    };

    let hour = Duration::from_secs(3600);
    // amd64: Trivy by manifest digest, Grype by image ID (config digest) only.
    let amd_reports = vec![
        env.report("trivy", "amd-trivy", &amd_digest, None, hour, &[]),
        env.report(
            "grype",
            "amd-grype",
            &Digest::Sha256([0xee; 32]),
            Some(&amd_config.digest),
            hour,
            &[],
        ),
    ];
    let src = "docker.io/library/multi:1";
    let before = env.snapshot();
    let (rule, msg) =
        refused_rule(approve::approve(&env.request(src, "corp", amd_reports.clone())).await);
    assert_eq!(rule, "scanners", "{msg}");
    assert!(
        msg.contains("platform linux/arm64") && msg.contains("0 distinct"),
        "{msg}"
    );
    assert_eq!(env.snapshot(), before);

    // Only amd64 asked for: its two reports are enough.
    let mut only_amd = env.request(src, "corp", amd_reports.clone());
    only_amd.platforms = vec!["linux/amd64".into()];
    only_amd.dry_run = true;
    approve::approve(&only_amd).await.unwrap();
    let mut bad_platform = only_amd.clone();
    bad_platform.platforms = vec!["linux/s390x".into()];
    let (rule, msg) = refused_rule(approve::approve(&bad_platform).await);
    assert_eq!(rule, "platforms", "{msg}");

    // Reports for the index digest itself cover every platform.
    let mut all = amd_reports;
    all.push(env.report("trivy", "arm-trivy", &arm_digest, None, hour, &[]));
    all.push(env.report("grype", "arm-grype", &arm_digest, None, hour, &[]));
    let out = approve::approve(&env.request(src, "corp", all))
        .await
        .unwrap();
    assert_eq!(out.digest, index_digest);
    for d in [&index_digest, &amd_digest, &arm_digest] {
        assert!(
            client
                .manifest_exists(&env.private.host(), "approved/library/multi", d)
                .await
                .unwrap(),
            "{d} not mirrored"
        );
    }
    let catalog = Catalog::load(&env.catalog).unwrap();
    let v = &catalog
        .repository("docker.io/library/multi")
        .unwrap()
        .content
        .approved[0];
    assert_eq!(v.platforms, vec!["linux/amd64", "linux/arm64"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_mirror_copy_resumes_where_it_stopped() {
    if !e2e_enabled("an_interrupted_mirror_copy_resumes_where_it_stopped") {
        return;
    }
    let env = Env::start("admin-resume");
    // Several layers: the fixture plus two more inserted with umoci.
    let tag = env.images.build_image("layered");
    support::images::add_layers(&env.images, &tag, 3, 256 * 1024);
    let digest =
        Digest::parse(&env.images.push_tag(&tag, &env.public, "library/layered:1")).unwrap();
    let reports = env.clean_reports("layered", &digest);
    let req = env.request("docker.io/library/layered:1", "corp", reports);
    let before = env.snapshot();
    let stop_after_one = |e: &CopyEvent| match e {
        CopyEvent::BlobCopied { .. } => ControlFlow::Break(()),
        _ => ControlFlow::Continue(()),
    };
    let first = approve::approve_with(&req, &stop_after_one).await;
    assert!(
        matches!(
            first,
            Err(ApproveError::Registry(RegistryError::Stopped { .. }))
        ),
        "{first:?}"
    );
    assert_eq!(
        env.snapshot(),
        before,
        "an interrupted approval writes nothing"
    );
    let client = env.client();
    assert!(
        !client
            .manifest_exists(&env.private.host(), "approved/library/layered", &digest)
            .await
            .unwrap()
    );

    let out = approve::approve(&req).await.unwrap();
    let copy = out.copy.unwrap();
    assert!(
        copy.blobs_present >= 1,
        "the blob copied before the interruption is reused: {copy:?}"
    );
    assert!(
        copy.blobs_copied >= 1 && copy.manifests_pushed == 1,
        "{copy:?}"
    );
    assert_eq!(
        support::images::manifest_digest(
            &env.private.host(),
            &format!("approved/library/layered@{digest}")
        ),
        digest.to_string()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_lies_about_a_digest_is_refused() {
    // No external binaries needed: a fake registry on loopback.
    let body = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:0101010101010101010101010101010101010101010101010101010101010101","size":2},"layers":[]}"#;
    let lie = Digest::Sha256([0x42; 32]);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host = format!("127.0.0.1:{}", listener.local_addr().unwrap().port());
    let header = lie.to_string();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for stream in listener.incoming().take(20) {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]);
            let (status, body): (&str, &[u8]) = if req.starts_with("GET /v2/ ") {
                ("200 OK", b"{}")
            } else {
                ("200 OK", body)
            };
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nDocker-Content-Digest: {header}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(body);
        }
    });
    let client = Registry::new(RegistryOptions {
        plain_http: vec![host.clone()],
        concurrency: 1,
        ..Default::default()
    })
    .unwrap();
    let e = client
        .resolve(&Reference::parse(&format!("{host}/library/liar:1")).unwrap())
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::DigestMismatch { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains(&lie.to_string()) && msg.contains("do not approve"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_refuses_images_missing_from_the_mirror_and_is_deterministic() {
    if !e2e_enabled("build_refuses_images_missing_from_the_mirror_and_is_deterministic") {
        return;
    }
    let env = Env::start("admin-build");
    let digest = env.push("library/busybox:1.36");
    approve::approve(&env.request(
        "docker.io/library/busybox:1.36",
        "corp",
        env.clean_reports("bb", &digest),
    ))
    .await
    .unwrap();
    let catalog = Catalog::load(&env.catalog).unwrap();
    let mut opts = RegistryOptions {
        concurrency: 4,
        ..Default::default()
    };
    approve::merge_catalog_settings(&mut opts, &catalog);
    let client = Registry::new(opts.clone()).unwrap();
    assert_eq!(build::check_mirror(&catalog, &client, 8).await.unwrap(), 1);

    // A registry that needs no credentials is pinged once per client, then asked one HEAD per
    // manifest (oci-client alone pings /v2/ again before each request).
    let fresh = Registry::new(opts).unwrap();
    let (host, path) = (env.private.host(), "approved/library/busybox");
    let missing = Digest::Sha256([0x66; 32]);
    let mark = env.private.mark();
    for d in [&digest, &digest, &missing] {
        let there = fresh.manifest_exists(&host, path, d).await.unwrap();
        assert_eq!(there, *d == digest);
    }
    let head = |d: &Digest| format!("HEAD /v2/{path}/manifests/{d}");
    assert_eq!(
        env.private.requests_since(mark),
        [
            "GET /v2/".to_owned(),
            head(&digest),
            head(&digest),
            head(&missing)
        ]
    );

    let t = OffsetDateTime::now_utc();
    let a = build::render(&catalog, 2, 7, t);
    assert_eq!(
        a,
        build::render(&Catalog::load(&env.catalog).unwrap(), 2, 7, t),
        "same catalog, same bytes"
    );
    let v: serde_json::Value = serde_json::from_slice(&a).unwrap();
    assert_eq!(v["format"], 2);
    assert_eq!(v["images"][0]["tags"]["1.36"], digest.to_string());

    // An approval whose copy is not in the private registry is named.
    let file = env.catalog.join("images/docker.io/library/busybox.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    let ghost = Digest::Sha256([0x77; 32]);
    std::fs::write(&file, text.replace(&digest.to_string(), &ghost.to_string())).unwrap();
    let catalog = Catalog::load(&env.catalog).unwrap();
    let e = build::check_mirror(&catalog, &client, 8).await.unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("approved/library/busybox@{ghost}")) && msg.contains("missing"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approve_build_sign_install_and_a_pod_runs_from_the_mirror() {
    if !e2e_enabled("approve_build_sign_install_and_a_pod_runs_from_the_mirror") {
        return;
    }
    use support::cri::Cri;
    use support::node::{Node, ORG};
    let node = Node::start("admin-e2e", "enforce");
    let (public, private) = (&node.stack.public, &node.stack.private);
    // The administrators' catalog for this node: its private registry, its keys.
    let dir = node.stack.dir.path().join("catalog");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("catalog.toml"),
        format!(
            "issuer = \"platform-security@corp.example\"\nprivate_registry = \"{p}\"\nvalidity = \"1d\"\n\
             plain_http = [\"{q}\", \"{p}\"]\ntrust = \"trust.toml\"\n\n[endpoints]\n\"docker.io\" = \"{q}\"\n\"registry.k8s.io\" = \"{q}\"\n\n\
             [[mirrors]]\nsource = \"docker.io\"\ntarget = \"approved\"\n\n[[mirrors]]\nsource = \"registry.k8s.io\"\ntarget = \"approved-k8s\"\n",
            p = private.host(),
            q = public.host()
        ),
    )
    .unwrap();
    std::fs::write(dir.join("governance.toml"), GOVERNANCE).unwrap();
    std::fs::copy(&node.keys.trust, dir.join("trust.toml")).unwrap();
    let reports = dir.join("reports");
    std::fs::create_dir_all(&reports).unwrap();
    let approve = |source: &str, digest: &str, extra: &[&str]| {
        let d = Digest::parse(digest).unwrap();
        let created = OffsetDateTime::now_utc() - time::Duration::hours(1);
        let mut files = Vec::new();
        for (kind, text) in [
            (
                "trivy",
                fixture::trivy("0.58.1", source, &d, None, created, &[]),
            ),
            (
                "grype",
                fixture::grype("0.86.0", source, &d, None, created, &[]),
            ),
        ] {
            let p = reports.join(format!("{}-{kind}.json", source.replace(['/', ':'], "_")));
            std::fs::write(&p, text).unwrap();
            files.push(p);
        }
        let mut args: Vec<std::ffi::OsString> = vec![
            "approve".into(),
            source.into(),
            "--catalog".into(),
            dir.clone().into(),
            "--scope".into(),
            ORG.into(),
            "--license".into(),
            "MIT".into(),
            "--key".into(),
            node.keys.alice.clone().into(),
        ];
        for f in files {
            args.push("--report".into());
            args.push(f.into());
        }
        args.extend(extra.iter().map(Into::into));
        let out = cli_ok(args);
        assert!(out.stdout.contains("APPROVED"), "{out}");
    };
    // nginx:1.25 exists only in the "public" registry and is not in the node's bundle v1; then 1.26
    // is approved to replace it (deprecated now, sunset after the catalog's sunset_after of 30 days).
    let nginx = node.fx.nginx.clone();
    approve("docker.io/library/nginx:1.25", &nginx.digest, &[]);
    approve("registry.k8s.io/pause:3.9", &node.stack.pause_digest, &[]);
    let nginx_126 = node
        .stack
        .images
        .push_image(public, "library/nginx:1.26", "fixture");
    approve(
        "docker.io/library/nginx:1.26",
        &nginx_126,
        &["--replace", "1.25"],
    );
    let approved_at = OffsetDateTime::now_utc();
    cli_ok(["catalog".as_ref(), "check".as_ref(), dir.as_os_str()]);

    // Build (format 2), sign by both administrators, verify with the node's verifier, install.
    let bundle = dir.join("bundle-v2.json");
    let out = cli_ok([
        "bundle".as_ref(),
        "build".as_ref(),
        "--catalog".as_ref(),
        dir.as_os_str(),
        "--previous".as_ref(),
        node.bundle_v1.as_os_str(),
        "--out".as_ref(),
        bundle.as_os_str(),
    ]);
    assert!(
        out.stdout.contains("built bundle v2 (format 2)")
            && out.stdout.contains("mirror check: all 3"),
        "{out}"
    );
    for key in [&node.keys.alice, &node.keys.bob] {
        cli_ok([
            "bundle".as_ref(),
            "sign".as_ref(),
            "--key".as_ref(),
            key.as_os_str(),
            bundle.as_os_str(),
        ]);
    }
    cli_ok([
        "bundle".as_ref(),
        "verify".as_ref(),
        "--trust".as_ref(),
        node.keys.trust.as_os_str(),
        bundle.as_os_str(),
    ]);
    let trust =
        pullgate::policy::Trust::from_toml(&std::fs::read_to_string(&node.keys.trust).unwrap())
            .unwrap();
    let verified = pullgate::policy::load::load_bundle(
        &bundle,
        None,
        &trust,
        Some(1),
        OffsetDateTime::now_utc(),
    )
    .unwrap_or_else(|e| panic!("the node's verifier rejects the built bundle: {e}"));
    assert_eq!(verified.format, 2);
    let life = verified
        .entries("docker.io/library/nginx")
        .iter()
        .find_map(|e| e.tag_lifecycle("1.25"))
        .expect("1.25 carries the lifecycle --replace wrote")
        .clone();
    assert_eq!(life.replacement.as_deref(), Some("1.26"));
    let sunset = life.sunset_at.expect("a sunset");
    let after = sunset - approved_at;
    assert!(
        after > time::Duration::days(30) - time::Duration::minutes(5)
            && after <= time::Duration::days(30),
        "sunset {after} after the approval, the catalog says 30d"
    );
    let out = node.install(&bundle);
    assert!(out.success(), "{out}");
    node.wait_for_bundle(2);

    // A pod runs nginx:1.25 through pullgate, pulled from the mirror by digest, never from the public registry.
    let mut cri = Cri::connect(&node.pullgate_socket()).await;
    let (pub_mark, priv_mark) = (public.mark(), private.mark());
    cri.pull("nginx:1.25", "default").await.unwrap();
    let check = [
        "/bin/sh",
        "-c",
        "grep -q 'library/nginx:1.25' /etc/pullgate-fixture",
    ];
    let code = support::cri::run_as_kubelet(&mut cri, "nginx-pod", "default", "nginx:1.25", &check)
        .await
        .unwrap();
    assert_eq!(code, 0, "{}", node.stack.logs());
    let served = private.content_requests_since(priv_mark);
    let want = format!("GET /v2/approved/library/nginx/manifests/{}", nginx.digest);
    assert!(served.contains(&want), "{want} not in {served:?}");
    assert!(
        public.log_lines_since(pub_mark).is_empty(),
        "the public registry was contacted"
    );
    let recs = node.audit_for("PullImage", "nginx:1.25");
    assert!(
        recs.iter().any(|r| r["reason"] == "deprecated"),
        "nginx:1.25 is deprecated by the replace: {recs:?}"
    );

    // Its replacement runs too, from the mirror by digest.
    cri.pull("nginx:1.26", "default").await.unwrap();
    let check = [
        "/bin/sh",
        "-c",
        "grep -q 'library/nginx:1.26' /etc/pullgate-fixture",
    ];
    let code =
        support::cri::run_as_kubelet(&mut cri, "nginx-126-pod", "default", "nginx:1.26", &check)
            .await
            .unwrap();
    assert_eq!(code, 0, "{}", node.stack.logs());
    let recs = node.audit_for("PullImage", "nginx:1.26");
    assert!(recs.iter().any(|r| r["reason"] == "approved"), "{recs:?}");

    // The node's decision over time (explain --at): deprecated until the sunset, then denied,
    // naming the replacement.
    let explain = |at: OffsetDateTime| {
        let at = at
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        let out = support::pullgate::cli([
            "explain",
            "nginx:1.25",
            "--bundle",
            bundle.to_str().unwrap(),
            "--trust",
            node.keys.trust.to_str().unwrap(),
            "--at",
            &at,
            "--json",
        ]);
        serde_json::from_str::<serde_json::Value>(&out.stdout)
            .unwrap_or_else(|e| panic!("explain --json: {e}: {out}"))
    };
    let v = explain(sunset - time::Duration::minutes(1));
    assert_eq!(v["reason"], "deprecated", "{v}");
    let v = explain(sunset);
    assert_eq!(
        (&v["decision"], &v["reason"]),
        (&"deny".into(), &"sunset".into()),
        "{v}"
    );
    assert!(v["message"].as_str().unwrap().contains("nginx:1.26"), "{v}");
}

/// `pullgate catalog init` and `catalog check` from the command line: exit 0 on the documented example,
/// 1 with every problem (file:line: key: message) on a broken copy, and a refused approve exits 1
/// saying nothing was copied or written.
#[test]
fn catalog_commands_exit_zero_or_list_every_problem() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/catalog");
    let out = cli_ok(["catalog".as_ref(), "check".as_ref(), fixture.as_os_str()]);
    assert!(
        out.stdout.starts_with("OK:") && out.stdout.contains("2 repositories"),
        "{out}"
    );

    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("c");
    let out = cli_ok([
        "catalog".as_ref(),
        "init".as_ref(),
        dir.as_os_str(),
        "--trust".as_ref(),
        fixture.join("trust.toml").as_os_str(),
    ]);
    assert!(out.stdout.contains("catalog.toml"), "{out}");
    cli_ok(["catalog".as_ref(), "check".as_ref(), dir.as_os_str()]);
    std::fs::write(
        dir.join("ignore.toml"),
        "[[ignore]]\nid = \"CVE-1\"\nreason = \"\"\nexpires = 2026-01-01\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("exceptions.toml"),
        "[[exceptions]]\nsource = \"docker.io/library/x\"\n",
    )
    .unwrap();
    let out = support::pullgate::cli(["catalog".as_ref(), "check".as_ref(), dir.as_os_str()]);
    assert_eq!(out.code, Some(1), "{out}");
    let err = out.stderr;
    assert!(
        err.contains("ignore.toml:4: ") && err.contains("not a full date-time with an offset"),
        "{err}"
    );
    assert!(
        err.contains("exceptions.toml:1: missing field `digest`"),
        "{err}"
    );
    assert!(err.contains("2 problem(s)"), "{err}");

    let out = support::pullgate::cli([
        "approve",
        "docker.io/library/nginx:1.27",
        "--catalog",
        fixture.to_str().unwrap(),
        "--scope",
        "corp/nowhere",
        "--license",
        "MIT",
        "--report",
        "/nonexistent.json",
        "--dry-run",
    ]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr.contains("refused by rule `scope`")
            && out
                .stderr
                .contains("nothing was copied and nothing was written"),
        "{out}"
    );
}
