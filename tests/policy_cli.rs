//! End-to-end tests of `pullgate keygen`, `pullgate bundle …` and `pullgate explain`, run as a process,
//! plus a pass of every fuzz seed through the reference and bundle parsers.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use time::format_description::well_known::Rfc3339;

const EXAMPLE: &str = include_str!("fixtures/policy/example-bundle.json");

fn pullgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pullgate"))
        .args(args)
        .output()
        .expect("run pullgate")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

struct Setup {
    dir: tempfile::TempDir,
    bundle: PathBuf,
    trust: PathBuf,
}

impl Setup {
    fn key(&self, n: usize) -> PathBuf {
        self.dir.path().join(format!("admin{n}.key"))
    }
    fn sign(&self, bundle: &Path, n: usize) -> Output {
        pullgate(&["bundle", "sign", "--key", p(&self.key(n)), p(bundle)])
    }
    fn explain(&self, image: &str, extra: &[&str]) -> (Output, serde_json::Value) {
        self.explain_bundle(&self.bundle, image, extra)
    }
    fn explain_bundle(
        &self,
        bundle: &Path,
        image: &str,
        extra: &[&str],
    ) -> (Output, serde_json::Value) {
        let mut args = vec![
            "explain",
            image,
            "--bundle",
            p(bundle),
            "--trust",
            p(&self.trust),
            "--json",
        ];
        args.extend_from_slice(extra);
        let o = pullgate(&args);
        let v = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("explain --json output: {e}: {}", text(&o)));
        (o, v)
    }
}

/// Writes a bundle based on the example, valid from an hour ago for 30 days.
fn write_bundle(path: &Path, version: u64, edit: impl FnOnce(&mut serde_json::Value)) {
    let now = time::OffsetDateTime::now_utc();
    let mut v: serde_json::Value = serde_json::from_str(EXAMPLE).unwrap();
    v["version"] = version.into();
    v["issued_at"] = (now - time::Duration::hours(1))
        .format(&Rfc3339)
        .unwrap()
        .into();
    v["expires_at"] = (now + time::Duration::days(30))
        .format(&Rfc3339)
        .unwrap()
        .into();
    edit(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let mut trust = String::from("threshold = 2\n");
    for n in 1..=3 {
        let prefix = dir.path().join(format!("admin{n}"));
        let o = pullgate(&["keygen", "--out", p(&prefix)]);
        assert!(o.status.success(), "keygen: {}", text(&o));
        let public = std::fs::read_to_string(prefix.with_extension("pub")).unwrap();
        trust.push_str(&format!(
            "[[keys]]\nname = \"admin{n}\"\npublic_key = \"{}\"\n",
            public.trim()
        ));
    }
    let trust_path = dir.path().join("trust.toml");
    std::fs::write(&trust_path, trust).unwrap();
    let bundle = dir.path().join("bundle.json");
    write_bundle(&bundle, 42, |_| {});
    let s = Setup {
        dir,
        bundle,
        trust: trust_path,
    };
    for n in [1, 2] {
        let o = s.sign(&s.bundle, n);
        assert!(o.status.success(), "sign: {}", text(&o));
    }
    s
}

#[test]
fn keygen_writes_private_key_0600_and_refuses_to_overwrite() {
    let s = setup();
    let mode = std::fs::metadata(s.key(1)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let o = pullgate(&["keygen", "--out", p(&s.dir.path().join("admin1"))]);
    assert!(!o.status.success());
    assert!(text(&o).contains("never overwritten"), "{}", text(&o));
}

#[test]
fn sign_and_verify_k_of_n() {
    let s = setup();
    let o = pullgate(&["bundle", "verify", "--trust", p(&s.trust), p(&s.bundle)]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("signed by admin1, admin2"),
        "{}",
        text(&o)
    );

    let o = pullgate(&[
        "bundle",
        "verify",
        "--trust",
        p(&s.trust),
        "--installed-version",
        "42",
        p(&s.bundle),
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("rollback"), "{}", text(&o));

    // One signature is not enough for a 2-of-3 trust file.
    let single = s.dir.path().join("single.json");
    write_bundle(&single, 43, |_| {});
    assert!(s.sign(&single, 3).status.success());
    let o = pullgate(&["bundle", "verify", "--trust", p(&s.trust), p(&single)]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("only 1 of the required 2"),
        "{}",
        text(&o)
    );

    // Changing a signed bundle breaks the signatures.
    let mut bytes = std::fs::read(&s.bundle).unwrap();
    let at = String::from_utf8_lossy(&bytes).find("1.26").unwrap();
    bytes[at + 3] = b'7';
    std::fs::write(&s.bundle, bytes).unwrap();
    let o = pullgate(&["bundle", "verify", "--trust", p(&s.trust), p(&s.bundle)]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("does not match the bundle bytes"),
        "{}",
        text(&o)
    );
}

#[test]
fn sign_refuses_malformed_bundles() {
    let s = setup();
    let bad = s.dir.path().join("bad.json");
    std::fs::write(&bad, "{\"format\": 1}").unwrap();
    let o = s.sign(&bad, 1);
    assert!(!o.status.success());
    assert!(text(&o).contains("not signing"), "{}", text(&o));
}

#[test]
fn explain_json_allow_deny_and_warn() {
    let s = setup();
    let (o, v) = s.explain("nginx:1.25", &["--namespace", "checkout"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(v["decision"], "allow");
    assert_eq!(v["normalized"], "docker.io/library/nginx:1.25");
    let d1 = format!("sha256:{}", "01".repeat(32));
    assert_eq!(
        v["pull_ref"],
        format!("registry.corp/approved/library/nginx@{d1}")
    );
    assert_eq!(v["digest"], d1);
    assert_eq!(v["bundle_version"], 42);
    assert_eq!(v["reason"], "approved");

    let (o, v) = s.explain("nginx:1.99", &["--namespace", "checkout"]);
    assert!(!o.status.success());
    assert_eq!(v["decision"], "deny");
    assert_eq!(v["reason"], "tag_not_approved");
    assert!(v["message"].as_str().unwrap().contains("1.25, 1.26"), "{v}");
    assert!(v["pull_ref"].is_null());

    let (_, v) = s.explain(
        "redis:7.2",
        &[
            "--namespace",
            "checkout",
            "--label",
            "corp.example/application=web",
        ],
    );
    assert_eq!(v["decision"], "allow", "{v}");
    let (_, v) = s.explain(
        "redis:7.2",
        &[
            "--namespace",
            "search-index",
            "--label",
            "corp.example/application=web",
        ],
    );
    assert_eq!(v["reason"], "out_of_scope", "{v}");

    let (o, v) = s.explain("nginx:1.99", &["--namespace", "ledger"]);
    assert!(o.status.success());
    assert_eq!(v["decision"], "warn");

    let (_, v) = s.explain("quay.io/evil/miner:latest", &[]);
    assert_eq!(v["reason"], "public_registry_blocked");
}

#[test]
fn explain_text_and_invalid_bundle() {
    let s = setup();
    let o = pullgate(&[
        "explain",
        "nginx:1.25",
        "--bundle",
        p(&s.bundle),
        "--trust",
        p(&s.trust),
    ]);
    let out = text(&o);
    assert!(
        out.contains("decision:    allow") && out.contains("bundle:      version 42"),
        "{out}"
    );
    std::fs::remove_file(s.dir.path().join("bundle.json.sig")).unwrap();
    let (o, v) = s.explain("nginx:1.25", &[]);
    assert!(!o.status.success());
    assert_eq!(v["reason"], "no_valid_bundle");
    assert!(
        v["message"].as_str().unwrap().contains("no signatures"),
        "{v}"
    );
    // A wrong path is named on stderr, apart from the decision.
    let missing = s.dir.path().join("no-such-trust.toml");
    let o = pullgate(&[
        "explain",
        "nginx:1.25",
        "--bundle",
        p(&s.bundle),
        "--trust",
        p(&missing),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cannot read trust file") && err.contains(p(&missing)),
        "{err}"
    );
}

#[test]
fn inspect_and_diff() {
    let s = setup();
    let o = pullgate(&["bundle", "inspect", p(&s.bundle)]);
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    for want in [
        "version:           42",
        "docker.io -> registry.corp/approved",
        "namespace checkout -> corp/payments/checkout",
        "licence BSD-2-Clause",
    ] {
        assert!(out.contains(want), "inspect should show {want:?}:\n{out}");
    }
    // A malformed signature file is reported, not shown as "0 signatures" silently.
    let sig = s.dir.path().join("bundle.json.sig");
    std::fs::write(&sig, "not json").unwrap();
    let o = pullgate(&["bundle", "inspect", p(&s.bundle)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("signature file is malformed") && err.contains(p(&sig)),
        "{err}"
    );
    let newer = s.dir.path().join("newer.json");
    write_bundle(&newer, 43, |v| {
        v["images"][0]["tags"]["1.27"] = format!("sha256:{}", "1e".repeat(32)).into();
        v["images"][4]["scope"] = "corp".into();
    });
    let o = pullgate(&["bundle", "diff", p(&s.bundle), p(&newer)]);
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    for want in [
        "~ version 42 -> 43",
        "+ tag docker.io/library/nginx for corp/payments: 1.27",
        "- image ghcr.io/acme/tool for corp/search",
        "+ image ghcr.io/acme/tool for corp",
    ] {
        assert!(out.contains(want), "diff should show {want:?}:\n{out}");
    }
}

/// Every seed of the fuzz corpus goes through both parsers (the fuzz targets need nightly; this does not).
#[test]
fn fuzz_seed_corpus_does_not_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut seen = 0;
    for target in ["reference", "bundle"] {
        let dir = root.join(target);
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if !path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("seed-")
            {
                continue;
            }
            let data = std::fs::read(&path).unwrap();
            let as_text = String::from_utf8_lossy(&data);
            if let Ok(r) = pullgate::policy::Reference::parse(&as_text) {
                assert_eq!(
                    pullgate::policy::Reference::parse(&r.to_string()).unwrap(),
                    r
                );
            }
            let _ = pullgate::policy::parse_bundle(&data);
            seen += 1;
        }
    }
    assert!(seen >= 10, "expected a seed corpus, found {seen} files");
}

/// The format 2 example, made current: issued an hour ago; nginx 1.25 deprecated in a day and sunset
/// in two; the exceptions expire in 5 and 6 days.
fn write_v2(path: &Path) -> time::OffsetDateTime {
    let now = time::OffsetDateTime::now_utc();
    let t = |d: time::Duration| (now + d).format(&Rfc3339).unwrap();
    let mut v: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/policy/example-bundle-v2.json")).unwrap();
    v["issued_at"] = t(-time::Duration::hours(1)).into();
    v["expires_at"] = t(time::Duration::days(30)).into();
    let l = &mut v["images"][0]["tags"]["1.25"];
    l["deprecated_at"] = t(time::Duration::days(1)).into();
    l["sunset_at"] = t(time::Duration::days(2)).into();
    v["images"][2]["digests"][0]["sunset_at"] = t(time::Duration::days(10)).into();
    v["exceptions"][0]["expires_at"] = t(time::Duration::days(5)).into();
    v["exceptions"][1]["expires_at"] = t(time::Duration::days(6)).into();
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    now
}

#[test]
fn format_2_explain_verify_inspect_and_diff() {
    let s = setup();
    let v2 = s.dir.path().join("v2.json");
    let now = write_v2(&v2);
    for n in [1, 2] {
        assert!(s.sign(&v2, n).status.success());
    }
    let explain = |image: &str, extra: &[&str]| s.explain_bundle(&v2, image, extra);
    let at = |d: time::Duration| (now + d).format(&Rfc3339).unwrap();
    let (o, v) = explain("nginx:1.25", &["--namespace", "checkout"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        (v["reason"].as_str(), v["lifecycle"]["state"].as_str()),
        (Some("approved"), Some("active")),
        "{v}"
    );
    let (o, v) = explain(
        "nginx:1.25",
        &[
            "--namespace",
            "checkout",
            "--at",
            &at(time::Duration::hours(36)),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(v["reason"], "deprecated", "{v}");
    let (o, v) = explain(
        "nginx:1.25",
        &[
            "--namespace",
            "checkout",
            "--at",
            &at(time::Duration::days(3)),
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert_eq!(v["reason"], "sunset", "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("docker.io/library/nginx:1.26"),
        "{v}"
    );
    let (o, v) = explain("ghcr.io/acme/tool:v1", &["--namespace", "search-index"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        (v["reason"].as_str(), v["exception"]["ticket"].as_str()),
        (Some("exception"), Some("SEC-1240")),
        "{v}"
    );
    let (o, v) = explain(
        "busybox@sha256:0808080808080808080808080808080808080808080808080808080808080808",
        &["--namespace", "checkout"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(v["reason"], "license_not_allowed", "{v}");
    // Text mode shows the lifecycle and the time it decided at.
    let o = pullgate(&[
        "explain",
        "nginx:1.25",
        "--bundle",
        p(&v2),
        "--trust",
        p(&s.trust),
        "--at",
        &at(time::Duration::hours(36)),
    ]);
    let out = text(&o);
    assert!(
        out.contains("lifecycle:   deprecated (tag 1.25") && out.contains("decided at:"),
        "{out}"
    );
    let o = pullgate(&[
        "explain",
        "nginx:1.25",
        "--bundle",
        p(&v2),
        "--trust",
        p(&s.trust),
        "--at",
        "next week",
    ]);
    assert!(
        !o.status.success() && text(&o).contains("RFC 3339"),
        "{}",
        text(&o)
    );

    // The node's trust file bounds exceptions and sets a scan floor.
    let trust = std::fs::read_to_string(&s.trust).unwrap();
    for (limit, want) in [
        ("max_exception_days = 3\n", "exception_too_long"),
        ("min_scanners = 3\n", "below this node's trust floor"),
    ] {
        let strict = s.dir.path().join("strict.toml");
        std::fs::write(&strict, format!("{limit}{trust}")).unwrap();
        let o = pullgate(&["bundle", "verify", "--trust", p(&strict), p(&v2)]);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        let out = text(&o);
        assert!(
            out.contains("REJECTED") && (out.contains(want) || out.contains("lasts too long")),
            "{out}"
        );
    }
    let o = pullgate(&["bundle", "verify", "--trust", p(&s.trust), p(&v2)]);
    assert!(o.status.success(), "{}", text(&o));

    let o = pullgate(&["bundle", "inspect", p(&v2)]);
    let out = text(&o);
    for want in [
        "format:            2",
        "lifecycle tag 1.25: deprecated",
        "exceptions:        2",
        "rollout:           1% after 0s, 10% after 1h, 100% after 6h",
        "rules: min_scanners 3 (from corp/payments/ledger)",
    ] {
        assert!(out.contains(want), "inspect lacks {want:?}:\n{out}");
    }
    let o = pullgate(&["bundle", "diff", p(&s.bundle), p(&v2)]);
    let out = text(&o);
    assert!(
        out.contains("~ format 1 -> 2") && out.contains("+ exception docker.io/library/redis@"),
        "{out}"
    );
}
