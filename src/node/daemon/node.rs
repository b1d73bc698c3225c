//! The daemon's policy side: everything enforcement needs at run time, and its lifecycle — the first
//! load of the installed bundle, reloads (SIGHUP, `pullgate bundle install`), the drop directory that
//! fleet tooling fills, the sandbox-image check (at start and again after every bundle change), and
//! the status report. Bundles from the registry sync ([`crate::node::sync`], wired in
//! [`super::sync`]) and the admin API come through [`Node::install_bytes`].
//!
//! A bundle is swapped in with one atomic pointer store ([`PolicyState::set`]); a rejected one
//! changes nothing and is logged, counted and (from the drop directory) set aside with its reason.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;

use crate::node::audit::AuditLog;
use crate::node::config::{Config, NodeMode, SandboxImageCheck};
use crate::node::enforce::store::{BundleStore, StoreError};
use crate::node::enforce::{Enforcer, PolicyState, RegistryAuth};
use crate::node::lockdown::Lockdown;
use crate::node::metrics::Metrics;
use crate::node::proxy::Upstream;
use crate::policy::{Trust, VerifiedBundle, load};

/// Why the daemon cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create state directory {}: {source}", path.display())]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Audit(#[from] crate::node::audit::AuditOpenError),
    #[error(transparent)]
    Auth(#[from] crate::node::enforce::AuthFileError),
}

/// The policy side of a running daemon.
pub struct Node {
    pub config: Config,
    /// The file the configuration came from, re-read on reload for the settings that can change
    /// at run time (`policy.mode`).
    config_path: Mutex<Option<PathBuf>>,
    pub metrics: Arc<Metrics>,
    pub upstream: Arc<Upstream>,
    pub state: Arc<PolicyState>,
    pub enforcer: Arc<Enforcer>,
    pub store: BundleStore,
    trust: Mutex<Option<Arc<Trust>>>,
    sandbox_problem: Mutex<Option<String>>,
    /// The containerd watcher's state and the latest node check.
    pub lockdown: Arc<Lockdown>,
    /// Woken when a bundle is swapped in, so the background task re-checks the sandbox image at once.
    bundle_changed: tokio::sync::Notify,
    /// The audit log, for bundle records (decisions are written by the enforcer).
    audit: Arc<AuditLog>,
    /// The registry sync, once started.
    pub(super) sync: std::sync::OnceLock<Arc<crate::node::sync::SyncHandle>>,
}

impl Node {
    /// Builds the node: state directory, audit log, trust, credentials, and the installed bundle
    /// (last-known-good). A missing or bad bundle or trust file is not fatal: pulls fail closed.
    pub fn start(config: Config) -> Result<Arc<Node>, StartError> {
        let state_dir = &config.policy.state_dir;
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(state_dir)
                .map_err(|source| StartError::StateDir {
                    path: state_dir.clone(),
                    source,
                })?;
        }
        let metrics = Arc::new(Metrics::default());
        let upstream = Arc::new(Upstream::new(&config.server.upstream));
        let state = Arc::new(PolicyState::new(
            config.policy.mode,
            config.policy.expiry_grace,
        ));
        let audit = Arc::new(AuditLog::open(
            &config.audit.path,
            config.audit.max_bytes,
            config.audit.keep,
        )?);
        let lockdown = Arc::new(Lockdown::new(Some(audit.clone())));
        let enforcer = Enforcer::new(
            state.clone(),
            upstream.clone(),
            metrics.clone(),
            Some(audit.clone()),
        );
        if let Some(p) = &config.policy.private_registry_auth {
            enforcer.set_registry_auth(Some(RegistryAuth::load(p)?));
        }
        let node = Arc::new(Node {
            store: BundleStore::new(state_dir).with_max_bundle_size(config.policy.max_bundle_size),
            config,
            metrics,
            upstream,
            state,
            enforcer,
            trust: Mutex::new(None),
            sandbox_problem: Mutex::new(None),
            bundle_changed: tokio::sync::Notify::new(),
            config_path: Mutex::new(None),
            lockdown,
            audit,
            sync: std::sync::OnceLock::new(),
        });
        node.load_policy();
        Ok(node)
    }

    /// Remembers the configuration file so a reload can apply a changed `policy.mode`.
    pub fn set_config_path(&self, path: PathBuf) {
        *self.config_path.lock().unwrap_or_else(|e| e.into_inner()) = Some(path);
    }

    pub(super) fn trust(&self) -> Option<Arc<Trust>> {
        self.trust.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The trust file in force, or the error a bundle to verify gets without one.
    pub(super) fn trust_to_verify(&self) -> Result<Arc<Trust>, StoreError> {
        self.trust().ok_or_else(|| StoreError::Io {
            what: "no usable trust file to verify",
            path: self.config.policy.trust.clone(),
            source: std::io::Error::other("trust file missing or invalid"),
        })
    }

    /// Re-reads the configuration's run-time settings, the private registry credentials, the trust
    /// file and the installed bundle, and swaps in the bundle if it is a newer valid one. Problems are
    /// logged and leave what is in force.
    pub fn reload(&self) {
        self.reload_settings();
        self.load_policy();
        if let Some(sync) = self.sync.get() {
            // The trust file may have changed: give rejected digests another chance, now.
            sync.reset();
        }
    }

    /// `policy.mode` from the configuration file, and the private registry credentials.
    fn reload_settings(&self) {
        let path = self
            .config_path
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(path) = path {
            match Config::load(&path) {
                Ok(c) if c.policy.mode != self.state.mode() => {
                    tracing::warn!(mode = ?c.policy.mode, "policy mode changed by reload");
                    self.state.set_mode(c.policy.mode);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %e, "cannot re-read the configuration; keeping the running settings")
                }
            }
        }
        if let Some(p) = &self.config.policy.private_registry_auth {
            match RegistryAuth::load(p) {
                Ok(a) => self.enforcer.set_registry_auth(Some(a)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot reload private registry credentials; keeping the old ones")
                }
            }
        }
    }

    /// The trust file, then the installed bundle, verified with it.
    fn load_policy(&self) {
        match load::read_trust(&self.config.policy.trust) {
            Ok(t) => *self.trust.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(t)),
            Err(e) => {
                tracing::error!(error = %e, "cannot load the trust file; keeping the trust already loaded, if any");
                if self.state.current().is_none() {
                    self.state
                        .set_problem(format!("the trust file is unusable: {e}"));
                }
            }
        }
        let Some(trust) = self.trust() else { return };
        match self
            .store
            .load_current_compiling(&trust, OffsetDateTime::now_utc())
        {
            Ok(Some(b)) => self.offer(Arc::new(b), "state directory"),
            Ok(None) => {
                if self.state.current().is_none() {
                    self.state.set_problem(format!(
                        "no bundle is installed in {}",
                        self.store.dir().display()
                    ));
                    match self.state.mode() {
                        NodeMode::Enforce => tracing::warn!(
                            state_dir = %self.store.dir().display(),
                            "no bundle installed: pulls and container starts are refused (FAILED_PRECONDITION) until one is"
                        ),
                        NodeMode::Warn => tracing::warn!(
                            state_dir = %self.store.dir().display(),
                            "no bundle installed (warn mode): pulls and container starts go through unchecked, as asked, and are audited as would-be denials (no_valid_bundle) until one is"
                        ),
                    }
                }
            }
            Err(e) => self.rejected(&e, "state directory"),
        }
    }

    /// Swaps in `b` unless it is older than the bundle in force (rollback).
    fn offer(&self, b: Arc<VerifiedBundle>, source: &str) {
        let current = self.state.current().map(|c| c.version);
        if current == Some(b.version) {
            return;
        }
        if current.is_some_and(|c| b.version < c) {
            self.metrics.bundle_install("rejected", "rollback");
            tracing::error!(
                offered = b.version,
                in_force = current,
                source,
                "rejected bundle: older than the one in force (rollback)"
            );
            return;
        }
        tracing::info!(
            version = b.version,
            issuer = %b.issuer,
            images = b.images().len(),
            expires = %b.expires_at_string(),
            source,
            "bundle in force"
        );
        self.state.set(b);
        self.metrics.bundle_install("installed", "ok");
        self.bundle_changed.notify_one();
    }

    fn rejected(&self, e: &StoreError, source: &str) {
        self.metrics.bundle_install("rejected", e.reason());
        tracing::error!(error = %e, source, "rejected bundle; the bundle in force is unchanged");
        if self.state.current().is_none() {
            self.state
                .set_problem(format!("the installed bundle was rejected: {e}"));
        }
    }

    /// Verifies `bundle` + `signatures` as `pullgate bundle install` does, installs them atomically and
    /// puts them in force; `source` says where they came from (the registry sync, the admin API).
    /// Counted, logged and audited either way; a rejection changes nothing.
    pub fn install_bytes(
        &self,
        bundle: &[u8],
        signatures: &[u8],
        now: OffsetDateTime,
        source: &str,
    ) -> Result<Arc<VerifiedBundle>, StoreError> {
        let result = self.trust_to_verify().and_then(|t| {
            self.store
                .install(bundle, signatures, &t, now, Path::new(source))
                .map(Arc::new)
        });
        match &result {
            Ok(b) => {
                self.offer(b.clone(), source);
                self.audit_bundle(
                    "bundle_installed",
                    source,
                    Some(b.version),
                    None,
                    format!(
                        "bundle v{} issued by {} installed and in force",
                        b.version, b.issuer
                    ),
                );
            }
            Err(e) => self.reject_bundle(source, e),
        }
        result
    }

    /// Counts, logs and audits a bundle from `source` that was rejected.
    pub(super) fn reject_bundle(&self, source: &str, e: &StoreError) {
        self.rejected(e, source);
        self.audit_bundle(
            "bundle_rejected",
            source,
            None,
            Some(e.reason()),
            e.to_string(),
        );
    }

    fn audit_bundle(
        &self,
        kind: &'static str,
        source: &str,
        version: Option<u64>,
        reason: Option<&str>,
        message: String,
    ) {
        let rec = crate::node::audit::BundleRecord {
            time: crate::policy::bundle::rfc3339(OffsetDateTime::now_utc()),
            kind,
            source: source.to_owned(),
            version,
            reason: reason.map(str::to_owned),
            message,
        };
        if let Err(e) = self.audit.record_bundle(&rec) {
            self.metrics.audit_error();
            tracing::error!(path = %self.audit.path().display(), error = %e, "cannot write the audit log");
        }
    }

    /// Installs every complete bundle in the drop directory (see docs/operations.md for the
    /// protocol), oldest name first. Returns how many were installed.
    pub fn poll_drop_dir(&self) -> usize {
        let Some(dir) = &self.config.policy.drop_dir else {
            return 0;
        };
        if let Err(why) = safe_drop_dir(dir) {
            tracing::error!(drop_dir = %dir.display(), "not using the drop directory: {why}");
            return 0;
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        // Regular files only: symbolic links are never followed out of the drop directory.
        let mut bundles: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.path())
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                !name.starts_with('.') && name.ends_with(".json")
            })
            .collect();
        bundles.sort();
        let mut installed = 0;
        for path in bundles {
            let sig = load::signature_path(&path);
            if !std::fs::symlink_metadata(&sig).is_ok_and(|m| m.file_type().is_file()) {
                continue; // signatures arrive first; wait for them
            }
            let max = self.store.max_bundle_size();
            let result = match (
                read_no_follow(&path, max),
                read_no_follow(&sig, SIGNATURES_MAX),
            ) {
                (Ok(None), _) => Err(StoreError::Rejected {
                    path: path.clone(),
                    source: crate::policy::BundleError::TooLarge { max },
                }),
                (_, Ok(None)) => Err(StoreError::Io {
                    what: "refused the oversize signature file",
                    path: sig.clone(),
                    source: std::io::Error::other(
                        "it is larger than 1 MiB, which no signature file needs",
                    ),
                }),
                (Ok(Some(b)), Ok(Some(s))) => match self.trust() {
                    Some(t) => self
                        .store
                        .install(&b, &s, &t, OffsetDateTime::now_utc(), &path),
                    None => Err(StoreError::Io {
                        what: "no usable trust file to verify",
                        path: self.config.policy.trust.clone(),
                        source: std::io::Error::other("trust file missing or invalid"),
                    }),
                },
                (Err(source), _) | (_, Err(source)) => Err(StoreError::Io {
                    what: "cannot read dropped bundle",
                    path: path.clone(),
                    source,
                }),
            };
            match result {
                Ok(b) => {
                    let _ = std::fs::remove_file(&path);
                    let _ = std::fs::remove_file(&sig);
                    self.offer(Arc::new(b), "drop directory");
                    installed += 1;
                }
                Err(e) => {
                    self.rejected(&e, "drop directory");
                    set_aside(&path, &sig, &e.to_string());
                }
            }
        }
        installed
    }

    /// Checks containerd's sandbox image; remembers and exports the result.
    pub async fn check_sandbox_image(&self) -> Result<(), String> {
        let r = self.enforcer.check_sandbox_image().await;
        *self
            .sandbox_problem
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = r.clone().err();
        match &r {
            Ok(()) => {
                tracing::info!("containerd's sandbox image is an approved private-registry image")
            }
            Err(p) if self.config.policy.sandbox_image == SandboxImageCheck::Refuse => {
                tracing::error!(problem = %p, "sandbox image check failed")
            }
            Err(p) => tracing::warn!(problem = %p, "sandbox image check failed"),
        }
        r
    }

    /// Ready: containerd answers, a valid bundle is in force, and the registry sync (if any) is not
    /// stale.
    pub async fn ready(&self) -> Result<(), String> {
        self.upstream.connect().await.map_err(|e| e.to_string())?;
        let now = OffsetDateTime::now_utc();
        self.state.usable(now)?;
        match self.sync.get().and_then(|s| s.status().stale_reason(now)) {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    /// The Prometheus text of `/metrics`, with the bundle and upstream gauges as they are now.
    pub fn metrics_text(&self, now_unix: i64) -> String {
        self.metrics
            .render(now_unix, self.state.gauge(), self.upstream.is_connected())
    }

    /// What `pullgate status` shows, as JSON.
    pub fn status_json(&self) -> serde_json::Value {
        let now = OffsetDateTime::now_utc();
        let bundle = self.state.current().map(|b| {
            serde_json::json!({
                "version": b.version,
                "issuer": b.issuer,
                "issued_at": b.issued_at_string(),
                "expires_at": b.expires_at_string(),
                "expired": now > b.expires_at,
                "images": b.images().len(),
                "repositories": b.repository_count(),
                "private_registry": b.private_registry,
                "signers": b.signers(),
            })
        });
        serde_json::json!({
            "mode": match self.state.mode() { NodeMode::Enforce => "enforce", NodeMode::Warn => "warn" },
            "bundle": bundle,
            "bundle_problem": if bundle.is_none() { self.state.problem() } else { None },
            "upstream": {
                "socket": self.upstream.path().display().to_string(),
                "connected": self.upstream.is_connected(),
            },
            "decisions": self.metrics.decision_totals(),
            "sandbox_image_problem": self.sandbox_problem.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            "audit_log": self.config.audit.path.display().to_string(),
            "lockdown": self.lockdown.status_json(),
            "exceptions": self.state.current().map(|b| exceptions_json(&b, now)),
            "lifecycle_starts": lifecycle_starts_json(&self.metrics, now),
            "sync": self.sync.get().map(|s| {
                let position = self.state.current().map(|b| {
                    crate::policy::rollout::position(&b.issuer, s.seed())
                });
                s.status().to_json(now, position)
            }),
        })
    }

    /// The version of the bundle in force (`None`: no bundle).
    fn bundle_version(&self) -> Option<u64> {
        self.state.current().map(|b| b.version)
    }

    /// Learns the sandboxes and images containerd holds, so their first starts look nothing up
    /// (see [`crate::node::enforce::Enforcer::learn_node`]): a pass as soon as containerd answers,
    /// passes that fail tried again a drop-directory poll apart, at most [`LEARN_TRIES`] of them.
    pub async fn learn_node(&self) {
        let mut failed = 0;
        loop {
            if self.upstream.connect().await.is_ok() {
                let started = std::time::Instant::now();
                match self.enforcer.learn_node().await {
                    Ok(l) => {
                        tracing::info!(
                            sandboxes = l.sandboxes,
                            images = l.images,
                            ms = started.elapsed().as_millis() as u64,
                            "learned the pod sandboxes and images containerd holds"
                        );
                        return;
                    }
                    Err(e) => {
                        failed += 1;
                        if failed == LEARN_TRIES {
                            tracing::warn!(
                                error = %e.message,
                                tries = failed,
                                "gave up learning the pod sandboxes and images containerd holds; their first starts look them up"
                            );
                            return;
                        }
                        tracing::debug!(error = %e.message, "cannot learn the pod sandboxes and images containerd holds yet; trying again");
                    }
                }
            }
            tokio::time::sleep(self.config.policy.drop_poll).await;
        }
    }

    /// Background work: the drop-directory poll, the sandbox-image check whenever the bundle in
    /// force is not the one it last ran with (`checked`: it ran at start-up with the bundle in force
    /// now), and learning what containerd holds ([`Node::learn_node`]). A bundle swapped in by any
    /// path (drop directory, reload, `pullgate bundle install`) wakes the task at once.
    pub fn spawn_background(self: &Arc<Self>, checked: bool) {
        let node = self.clone();
        tokio::spawn(async move { node.learn_node().await });
        let node = self.clone();
        tokio::spawn(async move {
            // `Some(v)`: checked with the bundle in force then (`v` itself is `None` without one).
            let mut checked_with = checked.then(|| node.bundle_version());
            let mut tick = tokio::time::interval(node.config.policy.drop_poll);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = node.bundle_changed.notified() => {}
                }
                {
                    let node = node.clone();
                    let _ = tokio::task::spawn_blocking(move || node.poll_drop_dir()).await;
                }
                let version = node.bundle_version();
                if checked_with != Some(version) && node.upstream.connect().await.is_ok() {
                    checked_with = Some(version);
                    let _ = node.check_sandbox_image().await;
                }
            }
        });
    }
}

/// Most failed passes at learning what containerd holds before giving up (a pass starts only once
/// containerd answers; at boot its CRI plugin may not be ready yet).
const LEARN_TRIES: u32 = 10;

/// Moves a rejected dropped bundle aside as `NAME.rejected` (+ `.sig`) and writes `NAME.rejected.reason`.
fn set_aside(path: &Path, sig: &Path, reason: &str) {
    let mut rejected = path.as_os_str().to_owned();
    rejected.push(".rejected");
    let rejected = PathBuf::from(rejected);
    let _ = std::fs::rename(path, &rejected);
    let _ = std::fs::rename(sig, load::signature_path(&rejected));
    // Written under a temporary name and renamed, so whoever watches for it never reads it half-written.
    let mut why = rejected.clone().into_os_string();
    why.push(".reason");
    let why = PathBuf::from(why);
    let tmp = why.with_file_name(format!(
        ".{}.tmp",
        why.file_name().and_then(|n| n.to_str()).unwrap_or("reason")
    ));
    let _ = std::fs::remove_file(&tmp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{reason}\n").as_bytes()));
    if written.is_ok() {
        let _ = std::fs::rename(&tmp, &why);
    }
}

/// Largest signature file read from the drop directory: a signature is about 150 bytes.
const SIGNATURES_MAX: u64 = 1024 * 1024;

/// Reads a file of at most `max` bytes without following a symbolic link at its final component;
/// `Ok(None)` if it is larger (it is then not read).
fn read_no_follow(path: &Path, max: u64) -> std::io::Result<Option<Vec<u8>>> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    load::read_at_most(&mut f, max)
}

/// A drop directory others could write into would let them plant files (or links) that root then
/// reads and renames: it must be a real directory owned by the daemon's user and not writable by
/// group or others (give fleet tooling root, or a directory it owns).
fn safe_drop_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(dir).map_err(|e| format!("cannot read it: {e}"))?;
    if !m.file_type().is_dir() {
        return Err("it is not a directory (symbolic links are not followed)".into());
    }
    if m.uid() != unsafe { libc::geteuid() } {
        return Err(format!(
            "it is owned by uid {}, not by pullgate's user",
            m.uid()
        ));
    }
    if m.mode() & 0o022 != 0 {
        return Err(format!(
            "it is writable by group or others (mode {:04o}); chmod go-w it",
            m.mode() & 0o7777
        ));
    }
    Ok(())
}

/// Waits up to `limit` for the upstream to answer, for the start-up sandbox check.
pub async fn upstream_within(upstream: &Upstream, limit: Duration) -> bool {
    tokio::time::timeout(limit, upstream.connect())
        .await
        .is_ok_and(|r| r.is_ok())
}

/// Days ahead within which `pullgate status` calls an exception expiring.
pub const EXCEPTION_WARNING_DAYS: i64 = 7;
/// How far back `pullgate status` shows lifecycle starts.
pub const RECENT_STARTS_HOURS: i64 = 24;

/// The active exceptions of `b` at `now`, and those expiring within [`EXCEPTION_WARNING_DAYS`].
fn exceptions_json(b: &VerifiedBundle, now: OffsetDateTime) -> serde_json::Value {
    let soon = now + time::Duration::days(EXCEPTION_WARNING_DAYS);
    let item = |e: &crate::policy::Exception| {
        serde_json::json!({
            "source": &*e.source,
            "digest": e.digest.to_string(),
            "tag": e.tag.as_deref(),
            "scope": &*e.scope_path,
            "expires_at": crate::policy::bundle::rfc3339(e.expires_at),
            "expires_in_seconds": (e.expires_at - now).whole_seconds(),
            "ticket": e.ticket,
            "approved_by": e.approved_by,
        })
    };
    let active: Vec<_> = b
        .exceptions()
        .iter()
        .filter(|e| e.expires_at > now)
        .collect();
    serde_json::json!({
        "active": active.iter().map(|e| item(e)).collect::<Vec<_>>(),
        "expiring_soon": active.iter().filter(|e| e.expires_at <= soon).map(|e| item(e)).collect::<Vec<_>>(),
        "expiring_soon_days": EXCEPTION_WARNING_DAYS,
    })
}

/// Starts of deprecated, soon-to-sunset and excepted images in the last [`RECENT_STARTS_HOURS`].
fn lifecycle_starts_json(metrics: &Metrics, now: OffsetDateTime) -> serde_json::Value {
    let since = now.unix_timestamp() - RECENT_STARTS_HOURS * 3600;
    metrics
        .lifecycle_starts()
        .into_iter()
        .filter(|s| s.last_unix >= since)
        .map(|s| {
            serde_json::json!({
                "image": s.image,
                "reason": s.reason,
                "scope": s.scope,
                "sunset_at": s.sunset_at,
                "replacement": s.replacement,
                "exception_ticket": s.exception.as_ref().map(|x| &x.0),
                "exception_expires_at": s.exception.as_ref().map(|x| &x.1),
                "last_start": crate::policy::bundle::format_unix(s.last_unix),
                "starts": s.count,
            })
        })
        .collect()
}
