//! `pullgate watch`: the running daemon's decisions as they are made (admin API `WatchDecisions`),
//! one line each (or one JSON object each with `--json`), until interrupted.
//!
//! Argument parsing and output only. Exit status: 2 when the daemon cannot be asked, 1 when the
//! stream breaks (the daemon stopped).

use std::io::Write as _;
use std::process::ExitCode;

use crate::node::api::{AdminClient, pb};

/// Arguments of `pullgate watch`.
#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub config: super::ConfigArg,
    /// Only denials (and warn-mode would-be denials).
    #[arg(long)]
    pub deny_only: bool,
    /// Only decisions about pods in this namespace.
    #[arg(long, value_name = "NS")]
    pub namespace: Option<String>,
    /// Only this CRI method (PullImage, CreateContainer, ImageStatus, …); repeatable.
    #[arg(long = "method", value_name = "METHOD")]
    pub methods: Vec<String>,
    /// One JSON object per decision (the audit record's fields).
    #[arg(long)]
    pub json: bool,
}

/// Runs `pullgate watch`.
pub fn run(args: &WatchArgs) -> ExitCode {
    let socket =
        match super::admin_socket(&args.config.config, "watch", "read the audit log instead") {
            Ok(s) => s,
            Err(code) => return code,
        };
    let runtime = match crate::node::daemon::admin::client_runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pullgate watch: {e}");
            return ExitCode::from(super::EXIT_UNASKED);
        }
    };
    let req = pb::WatchDecisionsRequest {
        deny_only: args.deny_only,
        namespace: args.namespace.clone().unwrap_or_default(),
        methods: args.methods.clone(),
    };
    runtime.block_on(async {
        let mut client = match AdminClient::connect(&socket).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("pullgate watch: {e}");
                return ExitCode::from(super::EXIT_UNASKED);
            }
        };
        let mut stream = match client.watch_decisions(req).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("pullgate watch: {e}");
                return ExitCode::from(super::EXIT_UNASKED);
            }
        };
        if !args.json {
            eprintln!(
                "watching decisions of the daemon at {} (Ctrl-C stops)",
                socket.display()
            );
        }
        loop {
            match stream.message().await {
                Ok(Some(m)) => {
                    let line = match m.event {
                        Some(pb::watch_decisions_response::Event::Decision(d)) => {
                            if args.json {
                                decision_json(&d).to_string()
                            } else {
                                decision_line(&d)
                            }
                        }
                        Some(pb::watch_decisions_response::Event::Lagged(l)) => {
                            if args.json {
                                serde_json::json!({"lagged": l.missed}).to_string()
                            } else {
                                format!(
                                    "… {} decision(s) missed: this watcher fell behind",
                                    l.missed
                                )
                            }
                        }
                        None => continue,
                    };
                    let mut out = std::io::stdout().lock();
                    if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
                        return ExitCode::SUCCESS; // the reader went away (a closed pipe)
                    }
                }
                Ok(None) => {
                    eprintln!("pullgate watch: the daemon ended the stream (stopped?)");
                    return ExitCode::from(super::EXIT_FAILURE);
                }
                Err(status) => {
                    eprintln!("pullgate watch: {}", client.stream_error(status));
                    return ExitCode::from(super::EXIT_FAILURE);
                }
            }
        }
    })
}

fn decision_line(d: &pb::Decision) -> String {
    let pod = match (d.pod_namespace.as_str(), d.pod_name.as_str()) {
        ("", "") => "-".to_owned(),
        (ns, "") => format!("{ns}/-"),
        (ns, name) => format!("{ns}/{name}"),
    };
    format!(
        "{} {:5} {:<15} {:<28} {} [{}] {}",
        d.time,
        d.verdict.to_uppercase(),
        d.method,
        pod,
        d.image,
        d.reason,
        if d.verdict == "allow" {
            if d.pulled.is_empty() {
                String::new()
            } else {
                format!("→ {}", d.pulled)
            }
        } else {
            d.message.clone()
        }
    )
}

fn decision_json(d: &pb::Decision) -> serde_json::Value {
    let opt = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    serde_json::json!({
        "time": d.time,
        "method": d.method,
        "pod_namespace": opt(&d.pod_namespace),
        "pod_name": opt(&d.pod_name),
        "image": d.image,
        "normalized": opt(&d.normalized),
        "pulled": opt(&d.pulled),
        "digest": opt(&d.digest),
        "decision": d.verdict,
        "reason": d.reason,
        "message": d.message,
        "scope": opt(&d.scope),
        "bundle_version": (d.bundle_version > 0).then_some(d.bundle_version),
        "latency_us": d.latency_us,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decision_as_a_line_and_as_json() {
        let deny = pb::Decision {
            time: "2026-05-01T12:00:00Z".into(),
            method: "PullImage".into(),
            pod_namespace: "default".into(),
            pod_name: "web-1".into(),
            image: "quay.io/acme/tools:2.0".into(),
            verdict: "deny".into(),
            reason: "not_in_bundle".into(),
            message: "not approved".into(),
            bundle_version: 3,
            ..Default::default()
        };
        let line = decision_line(&deny);
        assert!(
            line.starts_with("2026-05-01T12:00:00Z DENY  PullImage       default/web-1"),
            "{line}"
        );
        assert!(
            line.ends_with("quay.io/acme/tools:2.0 [not_in_bundle] not approved"),
            "{line}"
        );
        let allow = pb::Decision {
            verdict: "allow".into(),
            pod_namespace: String::new(),
            pod_name: String::new(),
            pulled: "registry.corp/quay.io/acme/tools@sha256:ab".into(),
            ..deny.clone()
        };
        let line = decision_line(&allow);
        assert!(line.contains("ALLOW PullImage       - "), "{line}");
        assert!(
            line.ends_with("→ registry.corp/quay.io/acme/tools@sha256:ab"),
            "{line}"
        );
        // JSON: the audit record's field names; empty fields are null.
        let j = decision_json(&deny);
        assert_eq!(j["decision"], "deny");
        assert_eq!(j["pod_name"], "web-1");
        assert_eq!(j["bundle_version"], 3);
        assert!(j["pulled"].is_null() && j["digest"].is_null(), "{j}");
        assert!(decision_json(&pb::Decision::default())["bundle_version"].is_null());
    }
}
