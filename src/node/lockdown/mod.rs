//! The node's lockdown: nothing enters containerd's image store past pullgate unseen, and the node's
//! configuration is proven to send every image through pullgate.
//!
//! - [`watcher`]: the containerd event watcher — classifies every image in containerd (approved,
//!   out of band, unapproved), reports what arrives past pullgate (audit record, metric, warning)
//!   within a second, removes it on request, reports snapshots committed outside an unpack, and
//!   reconnects across containerd restarts, reporting the gap.
//! - [`check`]: the node check (`pullgate node check`, and the daemon at start and on reload):
//!   containerd's registry configuration, socket permissions, kubelet's endpoints, the sandbox
//!   image, the node mode, `forward_non_cri`, the bundle's expiry.
//! - [`containerd`]: containerd's `config.toml` and `hosts.toml`, read as containerd reads them.
//! - [`hosts`]: the `hosts.toml` writer (`--write-hosts DIR`).
//! - [`kubelet`]: kubelet's runtime and image endpoints, from its flags or its configuration file.
//!
//! The enforcer notes every pull it forwards in [`crate::node::enforce::ledger`]; the watcher
//! reads that ledger. The daemon owns one [`Lockdown`] for `/status`.

pub mod check;
pub mod containerd;
pub mod hosts;
pub mod kubelet;
pub mod watcher;

use std::sync::{Arc, Mutex};

use crate::node::audit::AuditLog;

pub use check::Report;
pub use watcher::{Watch, WatchStatus, Watcher};

/// What the daemon knows of its node's lockdown, for `/status`, and the audit log the watcher
/// writes to.
pub struct Lockdown {
    pub watch: Arc<WatchStatus>,
    pub audit: Option<Arc<AuditLog>>,
    report: Mutex<Option<(String, Report)>>,
}

impl Lockdown {
    pub fn new(audit: Option<Arc<AuditLog>>) -> Lockdown {
        Lockdown {
            watch: Arc::default(),
            audit,
            report: Mutex::new(None),
        }
    }

    /// Keeps the latest node check (and when it ran, RFC 3339).
    pub fn set_report(&self, at: String, report: Report) {
        *self.report.lock().unwrap_or_else(|e| e.into_inner()) = Some((at, report));
    }

    pub fn status_json(&self) -> serde_json::Value {
        let report = self.report.lock().unwrap_or_else(|e| e.into_inner());
        serde_json::json!({
            "watcher": self.watch.json(),
            "check": report.as_ref().map(|(at, r)| {
                let mut j = r.json();
                j["checked_at"] = serde_json::Value::String(at.clone());
                j
            }),
        })
    }
}
