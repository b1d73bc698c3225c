//! The node's lockdown in the running daemon: the containerd event watcher as a task (when
//! `lockdown.watch` is on; approved images it sees arrive are proven for their first start), and
//! the node check at start and after every reload, exported as `pullgate_lockdown_findings{check}`
//! and shown by `/status`.

use std::sync::Arc;

use time::OffsetDateTime;

use super::listener::resolve_group;
use super::node::Node;
use crate::node::lockdown::{Watch, Watcher, check};

/// Image arrivals waiting to be proven.
const LEARN_QUEUE: usize = 256;

/// Starts the watcher and the first node check (after the socket is bound: the check looks at it).
pub fn start(node: &Arc<Node>) {
    let l = &node.config.lockdown;
    if l.watch {
        // Approved images the watcher sees arrive are proven for their first start, one at a time;
        // when this falls behind, the rest are left to their starts.
        let (learn, arrived) = tokio::sync::mpsc::channel::<String>(LEARN_QUEUE);
        tokio::spawn(node.enforcer.clone().learn_arrivals(arrived));
        let watcher = Watcher::new(Watch {
            socket: node.config.server.upstream.clone(),
            state: node.state.clone(),
            pulls: node.enforcer.pulls.clone(),
            metrics: node.metrics.clone(),
            audit: node.lockdown.audit.clone(),
            remove: l.remove_out_of_band,
            status: node.lockdown.watch.clone(),
            learn: Some(learn),
        });
        tokio::spawn(watcher.run());
    }
    recheck(node);
}

/// Runs the node check in the background (callable from the reload hook's blocking thread).
pub fn recheck(node: &Arc<Node>) {
    let node = node.clone();
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move { run_check(&node).await });
    }
}

async fn run_check(node: &Node) {
    let socket_gid = match &node.config.server.socket_group {
        None => Ok(0),
        Some(g) => resolve_group(g).map_err(|e| e.to_string()),
    };
    let now = OffsetDateTime::now_utc();
    let report = check::run(&check::Inputs {
        config: &node.config,
        state: &node.state,
        enforcer: &node.enforcer,
        upstream: &node.upstream,
        socket_gid,
        proc_root: std::path::Path::new("/proc"),
        now,
    })
    .await;
    node.metrics.set_lockdown_findings(report.gauges());
    for c in &report.checks {
        match &c.outcome {
            check::Outcome::Findings { findings } => {
                for f in findings {
                    tracing::warn!(check = c.check, subject = %f.subject, fix = %f.fix, "node lockdown: {}", f.problem);
                }
            }
            check::Outcome::Error { detail } => {
                tracing::warn!(
                    check = c.check,
                    "node lockdown check could not be made: {detail}"
                )
            }
            _ => {}
        }
    }
    tracing::info!(
        findings = report.findings(),
        "node lockdown checked (pullgate node check shows the same)"
    );
    let at = now
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    node.lockdown.set_report(at, report);
}
