//! A whole node under pullgate, for the end-to-end scenarios: the real [`Stack`] (pause image pinned
//! by digest in the private registry's mirror path), the fixture images of the scenarios pushed to the
//! "public" registry and, where approved, copied by digest to the private one, two administrators'
//! keys made with `pullgate keygen`, a trust file (2 of 2), signed bundles made with `pullgate bundle
//! sign`, installed with `pullgate bundle install`, and pullgate itself in front of containerd with an
//! audit log, a drop directory and a status endpoint on a port picked here (so `pullgate status` and
//! `pullgate bundle install` find the daemon).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::images::copy_by_digest;
use super::pullgate::{CliOutput, Pullgate, cli, cli_ok};
use super::stack::{Stack, free_port};

/// The organisation and governance every scenario bundle uses: program `payments` (project
/// `checkout`, namespace `checkout`) and program `search` (project `index`, namespace `search-index`,
/// and the warn-mode project `sandbox`, namespace `playground`).
pub const ORG: &str = "corp";
pub const PAYMENTS_NS: &str = "checkout";
pub const SEARCH_NS: &str = "search-index";
/// The namespace of a warn-mode project: its pods' would-be denials are allowed and audited.
pub const WARN_NS: &str = "playground";

/// One fixture image: where it was pushed and its manifest digest (read back from the registry).
#[derive(Clone, Debug)]
pub struct FixtureImage {
    /// Repository path in the public registry, e.g. `library/busybox`.
    pub repo: String,
    pub tag: String,
    pub digest: String,
    /// The first line of its `/etc/pullgate-fixture` (grep it to prove which image ran).
    pub marker: String,
}

/// The scenario images, all built offline from busybox-static.
#[derive(Clone, Debug)]
pub struct Fixtures {
    /// `docker.io/library/busybox:1.36`: approved for the whole organisation (copied to the mirror).
    pub busybox: FixtureImage,
    /// `docker.io/library/busybox:1.35`: published, and even copied to the mirror, but not approved.
    pub busybox_old: FixtureImage,
    /// `quay.io/acme/tools:2.0`: exists only publicly; quay.io is not a mirrored source.
    pub tools: FixtureImage,
    /// `docker.io/library/nginx:1.25`: exists only publicly; docker.io is mirrored but nginx is not
    /// in the bundle.
    pub nginx: FixtureImage,
    /// `docker.io/acme/payments-tool:1.0`: approved only for program `corp/payments`.
    pub paytool: FixtureImage,
}

/// One approved image entry of a bundle.
#[derive(Clone, Debug)]
pub struct Approval {
    /// Public source repository, e.g. `docker.io/library/busybox`.
    pub source: String,
    pub tags: Vec<(String, String)>,
    pub digests: Vec<String>,
    /// Scope path, e.g. `corp` or `corp/payments`.
    pub scope: String,
}

impl Approval {
    pub fn tag(source: &str, tag: &str, digest: &str, scope: &str) -> Approval {
        Approval {
            source: source.into(),
            tags: vec![(tag.into(), digest.into())],
            digests: vec![],
            scope: scope.into(),
        }
    }
}

/// A bundle's content before signing.
#[derive(Clone, Debug)]
pub struct BundleSpec {
    pub version: u64,
    /// `127.0.0.1:PORT` of the private registry.
    pub private_registry: String,
    pub images: Vec<Approval>,
    /// First-party prefixes and their scopes: (`127.0.0.1:PORT/apps/payments/`, `corp/payments`).
    pub first_party: Vec<(String, String)>,
}

impl BundleSpec {
    /// The bundle JSON (format 1), valid from a minute ago for a day.
    pub fn to_json(&self) -> Value {
        let now = OffsetDateTime::now_utc();
        let t = |d: OffsetDateTime| d.format(&Rfc3339).expect("format time");
        let images: Vec<Value> = self
            .images
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let mut v = json!({
                    "source": a.source,
                    "scope": a.scope,
                    "provenance": {
                        "license": "GPL-2.0-only",
                        "scans": [{
                            "scanner": "trivy",
                            "version": "0.58.1",
                            "report": format!("sha256:{:064x}", i + 1),
                            "worst_severity": "none"
                        }],
                        "approved_by": "alice@corp.example",
                        "approved_at": t(now - time::Duration::hours(1))
                    }
                });
                if !a.tags.is_empty() {
                    v["tags"] = a
                        .tags
                        .iter()
                        .map(|(t, d)| (t.clone(), Value::String(d.clone())))
                        .collect::<serde_json::Map<_, _>>()
                        .into();
                }
                if !a.digests.is_empty() {
                    v["digests"] = json!(a.digests);
                }
                v
            })
            .collect();
        json!({
            "format": 1,
            "version": self.version,
            "issued_at": t(now - time::Duration::minutes(1)),
            "expires_at": t(now + time::Duration::days(1)),
            "issuer": "platform-security@corp.example",
            "private_registry": self.private_registry,
            "mirrors": [
                {"source": "docker.io", "target": "approved"},
                {"source": "registry.k8s.io", "target": "approved-k8s"}
            ],
            "governance": {
                "organization": ORG,
                "application_label": "corp.example/application",
                "mode": "enforce",
                "programs": [
                    {"name": "payments", "projects": [
                        {"name": "checkout", "namespaces": [PAYMENTS_NS]}
                    ]},
                    {"name": "search", "projects": [
                        {"name": "index", "namespaces": [SEARCH_NS]},
                        {"name": "sandbox", "mode": "warn", "namespaces": [WARN_NS]}
                    ]}
                ]
            },
            "first_party": self.first_party.iter().map(|(prefix, scope)| json!({
                "prefix": prefix, "scope": scope, "require_digest": false
            })).collect::<Vec<_>>(),
            "images": images
        })
    }
}

/// Two administrators' keys (`pullgate keygen`) and a 2-of-2 trust file.
pub struct Keys {
    pub dir: PathBuf,
    pub alice: PathBuf,
    pub bob: PathBuf,
    pub trust: PathBuf,
}

impl Keys {
    pub fn generate(dir: &Path) -> Keys {
        std::fs::create_dir_all(dir).expect("create keys dir");
        let mut entries = String::from("# written by the end-to-end tests\nthreshold = 2\n");
        for name in ["alice", "bob"] {
            let prefix = dir.join(name);
            cli_ok(["keygen".as_ref(), "--out".as_ref(), prefix.as_os_str()]);
            let public =
                std::fs::read_to_string(dir.join(format!("{name}.pub"))).expect("read public key");
            entries.push_str(&format!(
                "\n[[keys]]\nname = \"{name}\"\npublic_key = \"{}\"\n",
                public.trim()
            ));
        }
        let trust = dir.join("trust.toml");
        std::fs::write(&trust, entries).expect("write trust file");
        Keys {
            alice: dir.join("alice.key"),
            bob: dir.join("bob.key"),
            trust,
            dir: dir.to_path_buf(),
        }
    }

    /// Writes `spec` to `<dir>/<name>.json` and has both administrators sign it (`pullgate bundle
    /// sign`, which writes `<name>.json.sig`). Returns the bundle path.
    pub fn sign(&self, spec: &BundleSpec, name: &str) -> PathBuf {
        self.sign_json(&spec.to_json(), name)
    }

    /// [`Keys::sign`] for a bundle written as JSON (e.g. a format 2 bundle built from a spec).
    pub fn sign_json(&self, bundle: &Value, name: &str) -> PathBuf {
        let path = self.dir.join(format!("{name}.json"));
        let text = serde_json::to_string_pretty(bundle).expect("bundle json");
        std::fs::write(&path, text + "\n").expect("write bundle");
        for key in [&self.alice, &self.bob] {
            cli_ok([
                "bundle".as_ref(),
                "sign".as_ref(),
                "--key".as_ref(),
                key.as_os_str(),
                path.as_os_str(),
            ]);
        }
        path
    }
}

/// A node: the stack, the fixtures, keys, and pullgate enforcing a signed bundle.
pub struct Node {
    pub keys: Keys,
    pub fx: Fixtures,
    /// pullgate's config file (`bundle install --config`, `status --config`).
    pub config: PathBuf,
    pub state_dir: PathBuf,
    pub drop_dir: PathBuf,
    pub audit_log: PathBuf,
    pub metrics_port: u16,
    /// The path of the bundle installed at start (v1).
    pub bundle_v1: PathBuf,
    /// Dropped last: pullgate, containerd, registries, temp dir.
    pub stack: Stack,
}

impl Node {
    /// Starts the stack, pushes the fixtures, generates keys, signs and installs bundle v1
    /// ([`Node::standard_bundle`]) and starts pullgate in `mode` (`enforce` or `warn`).
    pub fn start(name: &str, mode: &str) -> Node {
        Node::start_with(name, mode, |_| String::new())
    }

    /// Like [`Node::start`], with more configuration: `extra(&stack)` is appended to pullgate's
    /// configuration file (e.g. a `[lockdown]` section naming the stack's containerd config).
    pub fn start_with(name: &str, mode: &str, extra: impl FnOnce(&Stack) -> String) -> Node {
        let started = std::time::Instant::now();
        let mut stack = Stack::start_node(name);
        let fx = push_fixtures(&stack);
        let tmp = stack.dir.path().to_path_buf();
        let keys = Keys::generate(&tmp.join("keys"));
        let pg = tmp.join("pullgate");
        let (state_dir, drop_dir, audit_log) =
            (pg.join("state"), pg.join("drop"), pg.join("audit.log"));
        std::fs::create_dir_all(&drop_dir).expect("create drop dir");
        // The status endpoint on a port chosen here: `pullgate status` and `bundle install` read the
        // address from the config file, so `127.0.0.1:0` would not do.
        let metrics_port = free_port();
        let extra = format!(
            "[server]\nlisten = \"{sock}\"\nupstream = \"{up}\"\ndrain_grace = \"2s\"\n\
             [policy]\nmode = \"{mode}\"\ntrust = \"{trust}\"\nstate_dir = \"{state}\"\n\
             drop_dir = \"{drop}\"\ndrop_poll = \"200ms\"\n\
             [audit]\npath = \"{audit}\"\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n",
            sock = pg.join("pullgate.sock").display(),
            up = stack.containerd.socket.display(),
            trust = keys.trust.display(),
            state = state_dir.display(),
            drop = drop_dir.display(),
            audit = audit_log.display(),
        ) + &extra(&stack);
        let config = Pullgate::configure(&tmp, &extra);
        let spec = standard_bundle(&stack, &fx, 1);
        let bundle_v1 = keys.sign(&spec, "bundle-v1");
        // No daemon yet: install only writes the state directory, which the daemon reads at start.
        let out = cli_ok([
            "bundle".as_ref(),
            "install".as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
            bundle_v1.as_os_str(),
        ]);
        assert!(
            out.stdout.contains("installed bundle v1"),
            "unexpected install output: {out}"
        );
        let pullgate = Pullgate::start_configured(&tmp, &config, &stack.containerd.socket);
        stack.pullgate = Some(pullgate);
        let node = Node {
            keys,
            fx,
            config,
            state_dir,
            drop_dir,
            audit_log,
            metrics_port,
            bundle_v1,
            stack,
        };
        node.wait_for_bundle(1);
        super::loud(&format!(
            "[{name}] node up in {:?} (pullgate {mode}, bundle v1)",
            started.elapsed()
        ));
        node
    }

    pub fn pullgate_socket(&self) -> PathBuf {
        self.stack.pullgate_socket()
    }

    /// `GET /metrics` of the node's pullgate (headers included).
    pub fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let mut s =
            std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).expect("metrics");
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        write!(s, "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    /// The value of metric `series` (name and labels as rendered), if the node reports it.
    pub fn metric(&self, series: &str) -> Option<f64> {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// `127.0.0.1:PORT` of the private registry.
    pub fn private(&self) -> String {
        self.stack.private.host()
    }

    /// The pinned mirror reference of a fixture: `127.0.0.1:P/approved/<repo>@<digest>`.
    pub fn mirror_ref(&self, img: &FixtureImage) -> String {
        format!("{}/approved/{}@{}", self.private(), img.repo, img.digest)
    }

    /// `pullgate bundle install --config CFG BUNDLE` (never panics: rejections are asserted on).
    pub fn install(&self, bundle: &Path) -> CliOutput {
        cli([
            "bundle".as_ref(),
            "install".as_ref(),
            "--config".as_ref(),
            self.config.as_os_str(),
            bundle.as_os_str(),
        ])
    }

    /// `pullgate status --config CFG --json`, parsed.
    pub fn status_json(&self) -> Value {
        let out = cli_ok([
            "status".as_ref(),
            "--config".as_ref(),
            self.config.as_os_str(),
            "--json".as_ref(),
        ]);
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("status JSON: {e}\n{out}"))
    }

    /// Waits (10 s) until the daemon's `/status` reports bundle `version`.
    pub fn wait_for_bundle(&self, version: u64) {
        super::process::wait_for(
            &format!("pullgate to report bundle v{version}"),
            Duration::from_secs(10),
            || {
                let out = cli([
                    "status".as_ref(),
                    "--config".as_ref(),
                    self.config.as_os_str(),
                    "--json".as_ref(),
                ]);
                let v: Value = serde_json::from_str(&out.stdout).ok()?;
                (v["bundle"]["version"].as_u64() == Some(version)).then_some(())
            },
        );
    }

    /// Every audit record written so far.
    pub fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.audit_log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}")))
            .collect()
    }

    /// The audit records of `method` for `image` (as the client wrote it).
    pub fn audit_for(&self, method: &str, image: &str) -> Vec<Value> {
        self.audit()
            .into_iter()
            .filter(|r| r["method"] == method && r["image"] == image)
            .collect()
    }

    /// pullgate's log so far.
    pub fn pullgate_log(&self) -> String {
        self.stack
            .pullgate
            .as_ref()
            .map(|p| p.log_contents())
            .unwrap_or_default()
    }
}

/// Bundle `version`: busybox 1.36 and the pause image for the organisation, payments-tool 1.0 for
/// program `corp/payments` only.
pub fn standard_bundle(stack: &Stack, fx: &Fixtures, version: u64) -> BundleSpec {
    BundleSpec {
        version,
        private_registry: stack.private.host(),
        images: vec![
            Approval::tag("docker.io/library/busybox", "1.36", &fx.busybox.digest, ORG),
            Approval::tag("registry.k8s.io/pause", "3.9", &stack.pause_digest, ORG),
            Approval::tag(
                "docker.io/acme/payments-tool",
                "1.0",
                &fx.paytool.digest,
                "corp/payments",
            ),
        ],
        first_party: vec![],
    }
}

/// Builds and pushes the scenario images (see [`Fixtures`]); approved ones and `busybox:1.35` are
/// copied by digest to the private registry's mirror path `approved/<repo>`.
pub fn push_fixtures(stack: &Stack) -> Fixtures {
    let push = |repo: &str, tag: &str, mirror: bool| {
        let digest = stack
            .images
            .push_image(&stack.public, &format!("{repo}:{tag}"), "fixture");
        // push_image writes "<marker> <repo:tag>" as the first line of /etc/pullgate-fixture.
        let marker = format!("fixture {repo}:{tag}");
        if mirror {
            copy_by_digest(
                &stack.public.host(),
                repo,
                &digest,
                &stack.private.host(),
                &format!("approved/{repo}"),
            );
        }
        FixtureImage {
            repo: repo.into(),
            tag: tag.into(),
            digest,
            marker,
        }
    };
    Fixtures {
        busybox: push("library/busybox", "1.36", true),
        busybox_old: push("library/busybox", "1.35", true),
        tools: push("acme/tools", "2.0", false),
        nginx: push("library/nginx", "1.25", false),
        paytool: push("acme/payments-tool", "1.0", true),
    }
}

/// The request lines of `lines` that name `needle` (for readable assertion messages).
pub fn matching<'a>(lines: &'a [String], needle: &str) -> Vec<&'a String> {
    lines.iter().filter(|l| l.contains(needle)).collect()
}
