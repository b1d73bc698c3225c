//! The node check: does this node's configuration really send every image through pullgate?
//! `pullgate node check` prints it; the daemon runs it at start and on reload and exports
//! `pullgate_lockdown_findings{check}`.
//!
//! | check | a finding when |
//! | --- | --- |
//! | `containerd_registry` | containerd's CRI registry section has no `config_path`, keeps legacy `mirrors`/`configs`, or the `hosts.toml` used for a public source the bundle mirrors (or `_default`) can reach anything but the private registry |
//! | `sockets` | containerd's sockets, pullgate's socket or a configured admin socket is not a root-owned socket with the expected group, or others may connect |
//! | `kubelet_endpoints` | the running kubelet's flags or its `KubeletConfiguration` point its runtime or image endpoint anywhere but pullgate's socket |
//! | `sandbox_image` | containerd's sandbox image is not an approved private-registry image |
//! | `policy_mode` | the node mode is not `enforce` |
//! | `forward_non_cri` | containerd's native API is forwarded |
//! | `bundle` | no usable bundle, or it expires within 7 days |
//!
//! A check that cannot be made says why (`error`); one that does not apply is `skipped`.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::Serialize;
use time::OffsetDateTime;

use super::containerd::{ContainerdConfig, hosts_problems};
use super::kubelet;
use crate::node::config::{Config, NodeMode};
use crate::node::enforce::{Enforcer, PolicyState, lookup};
use crate::node::proxy::Upstream;

/// A bundle closer to its expiry than this is a finding.
pub const EXPIRY_WARNING: time::Duration = time::Duration::days(7);

/// The checks, in the order they are reported.
pub const CHECKS: [&str; 7] = [
    "containerd_registry",
    "sockets",
    "kubelet_endpoints",
    "sandbox_image",
    "policy_mode",
    "forward_non_cri",
    "bundle",
];

/// One problem: what, why, and what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The file, socket or setting concerned.
    pub subject: String,
    pub problem: String,
    pub fix: String,
}

/// How one check came out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    Ok { detail: String },
    Findings { findings: Vec<Finding> },
    Skipped { detail: String },
    Error { detail: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckResult {
    pub check: &'static str,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// Every check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub checks: Vec<CheckResult>,
}

/// What the checks read beyond the configuration.
pub struct Inputs<'a> {
    pub config: &'a Config,
    pub state: &'a PolicyState,
    /// For the sandbox-image check (asks containerd over pullgate's upstream connection).
    pub enforcer: &'a Enforcer,
    pub upstream: &'a Upstream,
    /// The gid pullgate's socket should have (`server.socket_group`, resolved; 0 without one).
    pub socket_gid: Result<u32, String>,
    /// `/proc`, where the running kubelet is looked for.
    pub proc_root: &'a Path,
    pub now: OffsetDateTime,
}

fn finding(
    subject: impl Into<String>,
    problem: impl Into<String>,
    fix: impl Into<String>,
) -> Finding {
    Finding {
        subject: subject.into(),
        problem: problem.into(),
        fix: fix.into(),
    }
}

fn outcome(findings: Vec<Finding>, ok: impl Into<String>) -> Outcome {
    if findings.is_empty() {
        Outcome::Ok { detail: ok.into() }
    } else {
        Outcome::Findings { findings }
    }
}

/// Runs every check.
pub async fn run(i: &Inputs<'_>) -> Report {
    let ctd = ContainerdConfig::load(&i.config.lockdown.containerd_config);
    let checks = vec![
        CheckResult {
            check: "containerd_registry",
            outcome: containerd_registry(i, ctd.as_ref()),
        },
        CheckResult {
            check: "sockets",
            outcome: sockets(i, ctd.as_ref().ok()),
        },
        CheckResult {
            check: "kubelet_endpoints",
            outcome: kubelet_endpoints(i),
        },
        CheckResult {
            check: "sandbox_image",
            outcome: sandbox_image(i).await,
        },
        CheckResult {
            check: "policy_mode",
            outcome: match i.state.mode() {
                NodeMode::Enforce => Outcome::Ok {
                    detail: "enforce".into(),
                },
                NodeMode::Warn => Outcome::Findings {
                    findings: vec![finding(
                        "policy.mode",
                        "the node is in warn mode: nothing is blocked",
                        "set [policy] mode = \"enforce\" once the warn entries in the audit log stop, then systemctl reload pullgate",
                    )],
                },
            },
        },
        CheckResult {
            check: "forward_non_cri",
            outcome: if i.config.server.forward_non_cri {
                Outcome::Findings {
                    findings: vec![finding(
                        "server.forward_non_cri",
                        "containerd's native API is forwarded through pullgate's socket: `ctr import` and `ctr run` get past every check",
                        "set [server] forward_non_cri = false and restart pullgate",
                    )],
                }
            } else {
                Outcome::Ok {
                    detail: "off".into(),
                }
            },
        },
        CheckResult {
            check: "bundle",
            outcome: bundle(i),
        },
    ];
    Report { checks }
}

fn containerd_registry(
    i: &Inputs<'_>,
    ctd: Result<&ContainerdConfig, &super::containerd::ContainerdConfigError>,
) -> Outcome {
    let c = match ctd {
        Ok(c) => c,
        Err(e) => {
            return Outcome::Error {
                detail: format!("{e} (set lockdown.containerd_config to where it is)"),
            };
        }
    };
    let file = c.path.display().to_string();
    let mut findings = Vec::new();
    let section = c
        .registry_section
        .clone()
        .unwrap_or_else(|| "plugins.\"io.containerd.grpc.v1.cri\".registry".into());
    for legacy in &c.legacy {
        findings.push(finding(
            format!("{file}: [{section}.{legacy}]"),
            format!("the legacy `{legacy}` section is deprecated and, for mirrors, keeps the upstream registry as the last endpoint"),
            format!("move it to hosts.toml files under config_path (`pullgate node check --write-hosts DIR`) and delete [{section}.{legacy}]"),
        ));
    }
    if c.config_path.is_empty() {
        findings.push(finding(
            format!("{file}: [{section}] config_path"),
            "config_path is not set: containerd pulls every registry name from that registry itself",
            format!("set config_path = \"/etc/containerd/certs.d\" in [{section}], run `pullgate node check --write-hosts /etc/containerd/certs.d`, restart containerd"),
        ));
        return outcome(findings, "");
    }
    let b = match i.state.usable(i.now) {
        Ok(b) => b,
        Err(why) => {
            if findings.is_empty() {
                return Outcome::Error {
                    detail: format!(
                        "cannot check the hosts.toml files without a usable bundle (it names the private registry and the mirrored sources): {why}"
                    ),
                };
            }
            return outcome(findings, "");
        }
    };
    let mut sources: Vec<&str> = b
        .mirrors()
        .iter()
        .map(|m| m.source_domain.as_str())
        .collect();
    sources.sort();
    sources.dedup();
    sources.push("_default");
    let roots = c
        .config_path
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let fix = format!(
        "run `pullgate node check --write-hosts {}` (it shows the change first), then restart containerd",
        c.config_path[0].display()
    );
    // The directory each mirrored source (and `_default`) resolves to, then every other registry
    // directory present: a name pullgate does not mirror still must not reach its upstream.
    let mut targets: Vec<(String, Option<PathBuf>)> = sources
        .iter()
        .map(|source| {
            let what = if *source == "_default" {
                "registry names without a hosts directory of their own (_default)".to_string()
            } else {
                format!("{source}, a source the bundle mirrors")
            };
            (what, c.hosts_dir(source))
        })
        .collect();
    for root in &c.config_path {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        dirs.sort();
        for d in dirs {
            let name = d
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("")
                .to_string();
            targets.push((format!("registry {name}"), Some(d)));
        }
    }
    let mut seen = std::collections::HashSet::new();
    for (i, (what, dir)) in targets.iter().enumerate() {
        let Some(dir) = dir else {
            findings.push(finding(
                format!("{roots}: {}", sources[i]),
                format!("no hosts directory applies to {what}: containerd pulls from the upstream registry"),
                fix.clone(),
            ));
            continue;
        };
        if !seen.insert(dir.clone()) {
            continue;
        }
        let path = dir.join("hosts.toml");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                findings.push(finding(
                    path.display().to_string(),
                    format!("used for {what}, but cannot be read ({e}): containerd pulls from the upstream registry"),
                    fix.clone(),
                ));
                continue;
            }
        };
        for p in hosts_problems(&text, &b.private_registry) {
            findings.push(finding(
                path.display().to_string(),
                format!("used for {what}: {p}"),
                format!(
                    "{fix}; or delete {} so that _default applies",
                    dir.display()
                ),
            ));
        }
    }
    outcome(
        findings,
        format!(
            "config_path {roots}: {} and every registry directory there send only to {}",
            sources.join(", "),
            b.private_registry
        ),
    )
}

/// One socket: must exist, be a socket, be owned by `uid`, have group `gid`, and let no others in.
fn socket_findings(
    role: &str,
    path: &Path,
    uid: u32,
    gid: u32,
    mode: Option<u32>,
    missing_ok: bool,
) -> Vec<Finding> {
    let subject = format!("{} ({role})", path.display());
    let m = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && missing_ok => return Vec::new(),
        Err(e) => {
            return vec![finding(
                subject,
                format!("cannot be examined: {e}"),
                format!("start {role}, or correct its path in the configuration"),
            )];
        }
    };
    if !m.file_type().is_socket() {
        return vec![finding(
            subject,
            "is not a unix socket",
            "correct the path in the configuration",
        )];
    }
    let bits = m.mode() & 0o7777;
    let mut out = Vec::new();
    if m.uid() != uid {
        out.push(finding(
            subject.clone(),
            format!(
                "is owned by uid {}, not {uid}: that user controls the runtime",
                m.uid()
            ),
            format!("chown {uid} {}", path.display()),
        ));
    }
    if m.gid() != gid {
        out.push(finding(
            subject.clone(),
            format!(
                "has group {}, not {gid}: members of that group control the runtime",
                m.gid()
            ),
            format!(
                "chgrp {gid} {} (and set the group in its configuration)",
                path.display()
            ),
        ));
    }
    if bits & 0o007 != 0 {
        out.push(finding(
            subject.clone(),
            format!("has mode {bits:04o}: any local user can connect, which is root on this node"),
            format!("chmod o-rwx {}", path.display()),
        ));
    } else if let Some(want) = mode.filter(|w| *w != bits) {
        out.push(finding(
            subject,
            format!("has mode {bits:04o}, not the configured {want:04o}"),
            format!("chmod {want:04o} {} (restart the {role})", path.display()),
        ));
    }
    out
}

fn sockets(i: &Inputs<'_>, ctd: Option<&ContainerdConfig>) -> Outcome {
    let mut findings = Vec::new();
    let mut checked = Vec::new();
    let (grpc, uid, gid) = match ctd {
        Some(c) => (c.grpc_address.clone(), c.grpc_uid, c.grpc_gid),
        None => (i.config.server.upstream.clone(), 0, 0),
    };
    findings.extend(socket_findings("containerd", &grpc, uid, gid, None, false));
    checked.push(grpc.clone());
    if i.config.server.upstream != grpc {
        findings.extend(socket_findings(
            "containerd (server.upstream)",
            &i.config.server.upstream,
            uid,
            gid,
            None,
            false,
        ));
        checked.push(i.config.server.upstream.clone());
    }
    if let Some(c) = ctd {
        findings.extend(socket_findings(
            "containerd ttrpc",
            &c.ttrpc_address,
            0,
            gid,
            None,
            true,
        ));
        checked.push(c.ttrpc_address.clone());
        if let Some(d) = &c.debug_address {
            findings.extend(socket_findings("containerd debug", d, 0, gid, None, true));
            checked.push(d.clone());
        }
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    match &i.socket_gid {
        Ok(gid) => findings.extend(socket_findings(
            "pullgate",
            &i.config.server.listen,
            me,
            *gid,
            Some(i.config.server.socket_mode),
            false,
        )),
        Err(e) => findings.push(finding(
            "server.socket_group",
            e.clone(),
            "create the group or correct server.socket_group",
        )),
    }
    checked.push(i.config.server.listen.clone());
    if let Some(admin) = &i.config.admin.socket {
        // SAFETY: getegid has no preconditions.
        let my_gid = unsafe { libc::getegid() };
        findings.extend(socket_findings(
            "pullgate admin API",
            admin,
            me,
            my_gid,
            Some(0o600),
            true,
        ));
        checked.push(admin.clone());
    }
    for s in &i.config.lockdown.admin_sockets {
        findings.extend(socket_findings("admin socket", s, 0, 0, None, true));
        checked.push(s.clone());
    }
    outcome(
        findings,
        checked
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    )
}

fn kubelet_endpoints(i: &Inputs<'_>) -> Outcome {
    let running = kubelet::find_running(i.proc_root);
    let flags = running
        .as_ref()
        .map(|(_, args)| kubelet::flags(args))
        .unwrap_or_default();
    let flags_from = running
        .as_ref()
        .map(|(pid, _)| format!("the running kubelet's flags (pid {pid})"))
        .unwrap_or_default();
    let config_path: PathBuf = flags
        .config
        .clone()
        .unwrap_or_else(|| i.config.lockdown.kubelet_config.clone());
    let file = match std::fs::read_to_string(&config_path) {
        Ok(text) => match kubelet::parse_config(&text) {
            Ok(s) => Some(s),
            Err(e) => {
                return Outcome::Error {
                    detail: format!(
                        "cannot read kubelet's configuration {}: {e}",
                        config_path.display()
                    ),
                };
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && flags.config.is_none() => None,
        Err(e) => {
            return Outcome::Error {
                detail: format!(
                    "cannot read kubelet's configuration {}: {e}",
                    config_path.display()
                ),
            };
        }
    };
    if running.is_none() && file.is_none() {
        return Outcome::Skipped {
            detail: format!(
                "no running kubelet and no KubeletConfiguration at {} (lockdown.kubelet_config)",
                config_path.display()
            ),
        };
    }
    let from = config_path.display().to_string();
    let e = kubelet::resolve(
        &flags,
        &flags_from,
        file.as_ref().map(|f| (f, from.as_str())),
    );
    let want = &i.config.server.listen;
    let mut findings = Vec::new();
    for (what, ep, src, flag, key) in [
        (
            "runtime",
            &e.runtime,
            &e.runtime_from,
            "--container-runtime-endpoint",
            "containerRuntimeEndpoint",
        ),
        (
            "image",
            &e.image,
            &e.image_from,
            "--image-service-endpoint",
            "imageServiceEndpoint",
        ),
    ] {
        if kubelet::endpoint_path(ep).as_deref() != Some(want.as_path()) {
            findings.push(finding(
                format!("kubelet {what} endpoint ({src})"),
                format!("is {ep}, not pullgate's socket unix://{}: kubelet's calls bypass pullgate", want.display()),
                format!("set {flag}=unix://{} (or {key} in the KubeletConfiguration; see /usr/share/doc/pullgate/examples/kubelet-pullgate.conf) and restart kubelet", want.display()),
            ));
        }
    }
    let note = if running.is_none() {
        " (kubelet is not running: its configuration file was checked)"
    } else {
        ""
    };
    outcome(
        findings,
        format!("both endpoints are unix://{}{note}", want.display()),
    )
}

async fn sandbox_image(i: &Inputs<'_>) -> Outcome {
    // First whether containerd answers at all: a failure to ask is not a finding.
    if let Err(s) = lookup::sandbox_image(i.upstream).await {
        return Outcome::Error {
            detail: format!("cannot read containerd's CRI configuration: {}", s.message),
        };
    }
    if let Err(why) = i.state.usable(i.now) {
        return Outcome::Error {
            detail: format!("cannot judge the sandbox image without a usable bundle: {why}"),
        };
    }
    match i.enforcer.check_sandbox_image().await {
        Ok(()) => Outcome::Ok {
            detail: "an approved private-registry image".into(),
        },
        Err(p) => Outcome::Findings {
            findings: vec![finding(
                "containerd's sandbox_image",
                p,
                "set sandbox_image in containerd's CRI configuration to the approved mirror location pinned by digest, then restart containerd",
            )],
        },
    }
}

fn bundle(i: &Inputs<'_>) -> Outcome {
    match i.state.usable(i.now) {
        Err(why) => Outcome::Findings {
            findings: vec![finding(
                "the bundle in force",
                format!("no usable bundle: {why}; pulls and container starts fail closed"),
                "install a signed, unexpired bundle (pullgate bundle install, or the drop directory)",
            )],
        },
        Ok(b) if b.expires_at - i.now < EXPIRY_WARNING => Outcome::Findings {
            findings: vec![finding(
                format!("bundle v{}", b.version),
                format!(
                    "expires at {} ({}), within {} days",
                    b.expires_at_string(),
                    if b.expires_at < i.now {
                        "already expired".to_string()
                    } else {
                        format!("in {}h", (b.expires_at - i.now).whole_hours())
                    },
                    EXPIRY_WARNING.whole_days()
                ),
                "have the administrators sign and distribute the next bundle",
            )],
        },
        Ok(b) => Outcome::Ok {
            detail: format!("v{} expires at {}", b.version, b.expires_at_string()),
        },
    }
}

impl Report {
    /// Findings of every check.
    pub fn findings(&self) -> usize {
        self.checks
            .iter()
            .map(|c| match &c.outcome {
                Outcome::Findings { findings } => findings.len(),
                _ => 0,
            })
            .sum()
    }

    /// Whether some check could not be made.
    pub fn incomplete(&self) -> bool {
        self.checks
            .iter()
            .any(|c| matches!(c.outcome, Outcome::Error { .. }))
    }

    /// The process exit status of `pullgate node check`: 0 clean, 1 findings, 2 could not check.
    pub fn exit_code(&self) -> u8 {
        if self.findings() > 0 {
            1
        } else if self.incomplete() {
            2
        } else {
            0
        }
    }

    /// Per check: findings and whether it could not be made, for the metrics.
    pub fn gauges(&self) -> Vec<(&'static str, u64, bool)> {
        self.checks
            .iter()
            .map(|c| match &c.outcome {
                Outcome::Findings { findings } => (c.check, findings.len() as u64, false),
                Outcome::Error { .. } => (c.check, 0, true),
                _ => (c.check, 0, false),
            })
            .collect()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "clean": self.exit_code() == 0,
            "findings": self.findings(),
            "checks": self.checks,
        })
    }

    /// The report as a table: one row per check, then one per finding with its fix.
    pub fn table(&self) -> String {
        let mut rows: Vec<(String, String, String)> = Vec::new();
        for c in &self.checks {
            match &c.outcome {
                Outcome::Ok { detail } => rows.push((c.check.into(), "ok".into(), detail.clone())),
                Outcome::Skipped { detail } => {
                    rows.push((c.check.into(), "skipped".into(), detail.clone()))
                }
                Outcome::Error { detail } => {
                    rows.push((c.check.into(), "error".into(), detail.clone()))
                }
                Outcome::Findings { findings } => {
                    for f in findings {
                        rows.push((
                            c.check.into(),
                            "FINDING".into(),
                            format!("{}: {}\n  fix: {}", f.subject, f.problem, f.fix),
                        ));
                    }
                }
            }
        }
        let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(5).max(5);
        let mut out = format!("{:<w$}  {:<8} DETAIL\n", "CHECK", "RESULT");
        for (check, result, detail) in rows {
            let mut lines = detail.lines();
            out += &format!("{check:<w$}  {result:<8} {}\n", lines.next().unwrap_or(""));
            for l in lines {
                out += &format!("{:<w$}  {:<8} {l}\n", "", "");
            }
        }
        let n = self.findings();
        out += &match self.exit_code() {
            0 => "the node is locked down: every check passed\n".to_string(),
            1 => format!("{n} finding(s): the node is not locked down\n"),
            _ => "some checks could not be made (see `error` rows)\n".to_string(),
        };
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_and_gauges() {
        let f = finding("s", "p", "f");
        let mut r = Report {
            checks: vec![
                CheckResult {
                    check: "bundle",
                    outcome: Outcome::Ok {
                        detail: "v1".into(),
                    },
                },
                CheckResult {
                    check: "kubelet_endpoints",
                    outcome: Outcome::Skipped {
                        detail: "none".into(),
                    },
                },
            ],
        };
        assert_eq!(r.exit_code(), 0);
        assert!(r.table().contains("locked down"));
        r.checks.push(CheckResult {
            check: "sandbox_image",
            outcome: Outcome::Error {
                detail: "down".into(),
            },
        });
        assert_eq!(r.exit_code(), 2);
        r.checks.push(CheckResult {
            check: "sockets",
            outcome: Outcome::Findings {
                findings: vec![f.clone(), f],
            },
        });
        assert_eq!(r.exit_code(), 1);
        assert_eq!(r.findings(), 2);
        assert!(r.gauges().contains(&("sockets", 2, false)));
        assert!(r.gauges().contains(&("sandbox_image", 0, true)));
        let j = r.json();
        assert_eq!(j["clean"], false);
        assert_eq!(j["checks"][3]["result"], "findings");
        assert_eq!(j["checks"][3]["findings"][0]["fix"], "f");
        let t = r.table();
        assert!(t.contains("FINDING") && t.contains("fix: f"), "{t}");
    }

    #[test]
    fn socket_modes_owners_and_groups() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let me = unsafe { libc::geteuid() };
        let my_gid = unsafe { libc::getegid() };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660)).unwrap();
        assert_eq!(
            socket_findings("x", &path, me, my_gid, Some(0o660), false),
            vec![]
        );
        let f = socket_findings("x", &path, me, my_gid, Some(0o600), false);
        assert!(f[0].problem.contains("not the configured 0600"), "{f:?}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let f = socket_findings("x", &path, me, my_gid, Some(0o660), false);
        assert_eq!(f.len(), 1);
        assert!(
            f[0].problem.contains("0666") && f[0].fix.contains("o-rwx"),
            "{f:?}"
        );
        let f = socket_findings("x", &path, me + 1, my_gid + 1, None, false);
        assert_eq!(f.len(), 3, "{f:?}");
        let plain = dir.path().join("file");
        std::fs::write(&plain, "").unwrap();
        assert!(
            socket_findings("x", &plain, me, my_gid, None, false)[0]
                .problem
                .contains("not a unix socket")
        );
        assert!(socket_findings("x", &dir.path().join("none"), me, my_gid, None, true).is_empty());
        assert_eq!(
            socket_findings("x", &dir.path().join("none"), me, my_gid, None, false).len(),
            1
        );
    }
}
