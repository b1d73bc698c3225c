//! Enforcement in the CRI path: the intercept handler that applies the policy core to pulls, image
//! lookups and container starts, and the daemon-side state it needs.
//!
//! - `PullImage`: decided with the pod from `sandbox_config` (a pull names no sandbox: see
//!   docs/threat-model.md for what that claim can do); allowed pulls are rewritten (wire-level, every
//!   other field kept) to the pinned mirror reference; denied pulls are answered `PERMISSION_DENIED`
//!   (`FAILED_PRECONDITION` without a valid bundle) and never reach containerd. Credentials meant for
//!   the registry the user named never go to another registry.
//! - `ImageStatus` / `RemoveImage`: a user reference is resolved to the pinned mirror reference, so
//!   kubelet's presence check finds what pullgate pulled and misses it once the bundle moves the tag;
//!   `ImageStatus` and `ListImages` responses show the source names (`docker.io/library/busybox:1.36`,
//!   `docker.io/library/busybox@sha256:…`) by one rule ([`names`]), so an image looks the same however
//!   it is asked for, and as it would had containerd pulled the source names itself.
//! - `CreateContainer` ([`start`]): the pod's scope comes from containerd's record of the sandbox
//!   ([`sandbox`]), never from the request; every image the container would run is looked up in
//!   containerd (names through the bundle, as `ImageStatus` does) and allowed only if one of its repo
//!   digests is approved for that scope, however the image got there; the start is pinned to the
//!   image IDs that were checked.
//! - `RunPodSandbox`: forwarded unchanged; the sandbox containerd answers with is remembered with the
//!   pod the request configured, so the pod's first start needs no sandbox lookup ([`learn`]).
//! - `RemovePodSandbox`: forwarded; the sandbox is forgotten.
//!
//! Every decision is counted, logged, and written to the audit log before the call is answered; the
//! same record goes to watchers of the admin API ([`Enforcer::watch_decisions`]) through a bounded
//! broadcast channel (a watcher that falls behind is told how many it missed; calls never wait).
//!
//! - [`store`]: the installed bundle on disk (atomic installs, last-known-good).
//! - [`names`]: user references ↔ pinned mirror references, and the names an image shows.
//! - [`lookup`]: CRI calls pullgate makes to containerd itself.
//! - [`ledger`]: the pulls pullgate forwarded, for the lockdown watcher.
//! - [`sandbox`]: the pod a container is created in, as containerd records it.
//! - [`start`]: the container-start check.
//! - [`learn`]: what starts would otherwise look up, learned ahead (new sandboxes, what
//!   containerd holds when pullgate starts, and the images `ImageStatus` answers name).

mod learn;
pub mod ledger;
pub mod lookup;
pub mod names;
pub mod sandbox;
mod start;
pub mod store;

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use k8s_cri::v1 as cri;
use prost::Message;
use time::OffsetDateTime;

pub use learn::{AHEAD_TIMEOUT, ARRIVAL_TRIES, Arrival, Learned};

use crate::node::audit::{AuditLog, AuditRecord};
use crate::node::config::NodeMode;
use crate::node::metrics::{BundleGauge, Metrics};
use crate::node::proxy::Upstream;
use crate::node::proxy::grpc::{Code, Status};
use crate::node::proxy::intercept::{
    Afterwards, BoxFuture, Call, Handler, InterceptTable, Verdict, methods,
};
use crate::node::wire;
use crate::policy::{
    self, Decision, ImageRequest, PodContext, ReasonCode, Reference, Verdict as PolicyVerdict,
    VerifiedBundle, reference,
};

/// The bundle in force and how the node applies it. Swapped atomically; readers never lock.
pub struct PolicyState {
    bundle: ArcSwapOption<VerifiedBundle>,
    /// Why there is no bundle (shown in denials and `pullgate status`).
    problem: Mutex<Option<String>>,
    /// 0 enforce, 1 warn; switched by a reload.
    mode: std::sync::atomic::AtomicU8,
    expiry_grace: Duration,
    /// Unix time of the last "bundle expired" warning, to keep the log readable.
    last_expiry_warning: AtomicI64,
}

impl PolicyState {
    pub fn new(mode: NodeMode, expiry_grace: Duration) -> Self {
        PolicyState {
            bundle: ArcSwapOption::empty(),
            problem: Mutex::new(Some("no bundle has been installed".into())),
            mode: std::sync::atomic::AtomicU8::new(mode as u8),
            expiry_grace,
            last_expiry_warning: AtomicI64::new(0),
        }
    }

    pub fn mode(&self) -> NodeMode {
        match self.mode.load(Ordering::Relaxed) {
            0 => NodeMode::Enforce,
            _ => NodeMode::Warn,
        }
    }

    /// Switches between enforce and warn for every call that starts from now on.
    pub fn set_mode(&self, mode: NodeMode) {
        self.mode.store(mode as u8, Ordering::Relaxed);
    }

    /// The bundle in force, if any. In-flight calls keep the `Arc` they took.
    pub fn current(&self) -> Option<Arc<VerifiedBundle>> {
        self.bundle.load_full()
    }

    /// Makes `bundle` the one in force, for every call that starts from now on.
    pub fn set(&self, bundle: Arc<VerifiedBundle>) {
        self.bundle.store(Some(bundle));
        *self.problem.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Records why no bundle is in force (only used while there is none).
    pub fn set_problem(&self, why: String) {
        *self.problem.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    }

    pub fn problem(&self) -> Option<String> {
        self.problem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Decides `req` for `pod` now: with the bundle in force (an expired one until its grace runs
    /// out), or the fail-closed `no_valid_bundle` denial; then applies the node's mode.
    pub fn decide(
        &self,
        req: &ImageRequest<'_>,
        pod: &PodContext,
        now: OffsetDateTime,
    ) -> Decision {
        let d = match self.usable(now) {
            Ok(b) => {
                if now > b.expires_at {
                    self.warn_expired(&b, now);
                }
                policy::decide(req, &b, pod, now)
            }
            Err(why) => policy::decide_without_bundle(req, Some(&why)),
        };
        self.apply_mode(d)
    }

    /// The bundle to enforce at `now`: the one in force, or — once it expired more than
    /// `expiry_grace` ago, or when there is none — why pulls and starts fail closed.
    pub fn usable(&self, now: OffsetDateTime) -> Result<Arc<VerifiedBundle>, String> {
        let Some(b) = self.current() else {
            return Err(self
                .problem()
                .unwrap_or_else(|| "no bundle has been installed".into()));
        };
        let grace = time::Duration::try_from(self.expiry_grace).unwrap_or(time::Duration::MAX);
        if now > b.expires_at && now - b.expires_at > grace {
            return Err(format!(
                "the installed bundle v{} expired at {} and the {} grace period has passed",
                b.version,
                b.expires_at_string(),
                humantime::format_duration(self.expiry_grace)
            ));
        }
        Ok(b)
    }

    fn apply_mode(&self, mut d: Decision) -> Decision {
        if self.mode() == NodeMode::Warn && d.verdict == PolicyVerdict::Deny {
            d.verdict = PolicyVerdict::Warn;
            d.pull_ref = Some(d.image.clone());
        }
        d
    }

    fn warn_expired(&self, b: &VerifiedBundle, now: OffsetDateTime) {
        let t = now.unix_timestamp();
        let last = self.last_expiry_warning.load(Ordering::Relaxed);
        if t - last >= 60
            && self
                .last_expiry_warning
                .compare_exchange(last, t, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                bundle_version = b.version,
                expired_at = %b.expires_at_string(),
                grace = %humantime::format_duration(self.expiry_grace),
                "THE INSTALLED BUNDLE HAS EXPIRED: still enforcing it during the grace period; install a new bundle"
            );
        }
    }

    /// The bundle gauge for metrics.
    pub fn gauge(&self) -> Option<BundleGauge> {
        self.current()
            .map(|b| BundleGauge::of(&b, OffsetDateTime::now_utc()))
    }
}

/// Credentials for the private registry, as an encoded CRI `AuthConfig`. Never printed.
pub struct RegistryAuth {
    encoded: Vec<u8>,
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RegistryAuth(<redacted>)")
    }
}

/// Why the private registry credentials file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum AuthFileError {
    #[error("cannot read private registry credentials {}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("private registry credentials {} are readable by group or others (mode {mode:04o}); run chmod 600 on it", path.display())]
    Permissions { path: std::path::PathBuf, mode: u32 },
    #[error("private registry credentials {}: {message}", path.display())]
    Invalid {
        path: std::path::PathBuf,
        message: String,
    },
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    username: Option<String>,
    password: Option<String>,
    auth: Option<String>,
    identity_token: Option<String>,
    registry_token: Option<String>,
}

impl RegistryAuth {
    /// Reads a root-only TOML file with `username`/`password`, `auth`, `identity_token` or
    /// `registry_token`. Error messages never include the values.
    pub fn load(path: &Path) -> Result<RegistryAuth, AuthFileError> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).map_err(|source| AuthFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if meta.mode() & 0o077 != 0 {
            return Err(AuthFileError::Permissions {
                path: path.to_path_buf(),
                mode: meta.mode() & 0o7777,
            });
        }
        let text = std::fs::read_to_string(path).map_err(|source| AuthFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |message: String| AuthFileError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let f: AuthFile = toml::from_str(&text).map_err(|e| invalid(e.message().to_string()))?;
        let has_basic = f.username.is_some() || f.password.is_some();
        if has_basic && (f.username.is_none() || f.password.is_none()) {
            return Err(invalid("set both `username` and `password`".into()));
        }
        if !has_basic
            && f.auth.is_none()
            && f.identity_token.is_none()
            && f.registry_token.is_none()
        {
            return Err(invalid(
                "expected `username` + `password`, `auth`, `identity_token` or `registry_token`"
                    .into(),
            ));
        }
        let cfg = cri::AuthConfig {
            username: f.username.unwrap_or_default(),
            password: f.password.unwrap_or_default(),
            auth: f.auth.unwrap_or_default(),
            server_address: String::new(),
            identity_token: f.identity_token.unwrap_or_default(),
            registry_token: f.registry_token.unwrap_or_default(),
        };
        Ok(RegistryAuth {
            encoded: cfg.encode_to_vec(),
        })
    }
}

/// Field numbers used for wire-level edits (from the CRI `api.proto`).
mod field {
    /// `PullImageRequest.image.image`, `ImageStatusRequest.image.image`, `RemoveImageRequest.image.image`.
    pub const IMAGE_IMAGE: &[u32] = &[1, 1];
    /// `PullImageRequest.auth`.
    pub const AUTH: u32 = 2;
    /// `CreateContainerRequest.config.image.image`.
    pub const CREATE_IMAGE: &[u32] = &[2, 2, 1];
    /// `CreateContainerRequest.config`.
    pub const CREATE_CONFIG: u32 = 2;
    /// `ContainerConfig.mounts`.
    pub const MOUNTS: u32 = 7;
    /// `Mount.image.image` (image volumes).
    pub const MOUNT_IMAGE: &[u32] = &[9, 1];
    /// `ImageStatusResponse.image`, `ListImagesResponse.images`.
    pub const IMAGES: u32 = 1;
    /// `Image.repo_tags`, `Image.repo_digests`.
    pub const REPO_TAGS: u32 = 2;
    pub const REPO_DIGESTS: u32 = 3;
}

/// The enforcement handler for the image- and container-carrying CRI methods.
pub struct Enforcer {
    state: Arc<PolicyState>,
    upstream: Arc<Upstream>,
    metrics: Arc<Metrics>,
    audit: Option<Arc<AuditLog>>,
    auth: ArcSwapOption<RegistryAuth>,
    /// Container starts already allowed, by (image ID, bundle version, pod scope).
    allowed_starts: start::StartCache,
    /// Repo digests proven to describe image IDs (by pulls, by starts, and ahead of starts).
    proofs: Arc<start::ContentProofs>,
    /// Proofs of the images `ImageStatus` answers name, made ahead of their starts.
    ahead: Arc<learn::Ahead>,
    /// Names resolved and shown under the bundle in force.
    names: Arc<names::Memo>,
    /// Pods of the sandboxes containerd confirmed, by sandbox ID.
    sandboxes: Arc<sandbox::SandboxCache>,
    /// Every pull forwarded to containerd, so images that arrive past pullgate stand out.
    pub pulls: Arc<ledger::PullLedger>,
    /// Decision records for watchers (admin API `WatchDecisions`).
    decisions: tokio::sync::broadcast::Sender<Arc<AuditRecord>>,
}

/// Decision records buffered per watcher before it is told it lagged.
pub const WATCH_BUFFER: usize = 1024;

impl Enforcer {
    pub fn new(
        state: Arc<PolicyState>,
        upstream: Arc<Upstream>,
        metrics: Arc<Metrics>,
        audit: Option<Arc<AuditLog>>,
    ) -> Arc<Self> {
        let proofs: Arc<start::ContentProofs> = Arc::default();
        Arc::new(Enforcer {
            ahead: Arc::new(learn::Ahead::new(upstream.clone(), proofs.clone())),
            state,
            upstream,
            metrics,
            audit,
            auth: ArcSwapOption::empty(),
            allowed_starts: start::StartCache::default(),
            proofs,
            names: Arc::default(),
            sandboxes: Arc::default(),
            pulls: Arc::default(),
            decisions: tokio::sync::broadcast::channel(WATCH_BUFFER).0,
        })
    }

    /// A stream of decision records from now on (each one as the audit log gets it).
    pub fn watch_decisions(&self) -> tokio::sync::broadcast::Receiver<Arc<AuditRecord>> {
        self.decisions.subscribe()
    }

    /// Sets (or clears) the credentials sent to the private registry on redirected pulls.
    pub fn set_registry_auth(&self, auth: Option<RegistryAuth>) {
        self.auth.store(auth.map(Arc::new));
    }

    /// The intercept table that routes the enforced methods here.
    pub fn intercept_table(self: &Arc<Self>) -> InterceptTable {
        let mut t = InterceptTable::empty();
        let h: Arc<dyn Handler> = self.clone();
        t.route(
            &[
                methods::PULL_IMAGE,
                methods::IMAGE_STATUS,
                methods::REMOVE_IMAGE,
                methods::LIST_IMAGES,
                methods::CREATE_CONTAINER,
                methods::RUN_POD_SANDBOX,
                methods::REMOVE_POD_SANDBOX,
            ],
            &h,
        );
        t
    }

    fn record(
        &self,
        method: &str,
        d: &Decision,
        pod: &PodContext,
        pulled: Option<&str>,
        started: Instant,
        after: &mut Afterwards,
    ) {
        self.metrics.lifecycle_start(method, d);
        self.write_record(
            method,
            &Outcome {
                verdict: d.verdict,
                reason: d.reason.as_str(),
                message: &d.message,
                image: &d.image,
                normalized: d.normalized.as_deref(),
                digest: d.digest.as_ref().map(|x| x.to_string()),
                scope: d
                    .matched
                    .as_ref()
                    .map(|m| m.scope.to_string())
                    .or_else(|| d.pod_scope.as_deref().map(str::to_string)),
                bundle_version: d.bundle_version,
            },
            pod,
            pulled,
            started,
            Some(after),
        );
    }

    /// Counts, logs and audits one outcome. A real denial is logged at least as loudly as a
    /// warn-mode one. The audit line is written now, or with `after` ([`Afterwards`]: once the
    /// call's request is on its way to containerd, before its answer).
    fn write_record(
        &self,
        method: &str,
        o: &Outcome<'_>,
        pod: &PodContext,
        pulled: Option<&str>,
        started: Instant,
        after: Option<&mut Afterwards>,
    ) {
        self.metrics.decision(o.verdict.as_str(), o.reason);
        let latency_us = started.elapsed().as_micros() as u64;
        match o.verdict {
            // Deprecated images and exceptions are allowed, but worth an operator's attention.
            PolicyVerdict::Allow
                if o.reason == ReasonCode::Deprecated.as_str()
                    || o.reason == ReasonCode::Exception.as_str() =>
            {
                tracing::info!(method, image = ?o.image, pulled = ?pulled, reason = o.reason, message = ?o.message, "allowed")
            }
            PolicyVerdict::Allow => {
                tracing::debug!(method, image = ?o.image, pulled = ?pulled, reason = o.reason, "allowed")
            }
            PolicyVerdict::Warn => {
                tracing::warn!(method, image = ?o.image, reason = o.reason, message = ?o.message, "would deny (warn mode)")
            }
            PolicyVerdict::Deny => {
                tracing::warn!(method, image = ?o.image, reason = o.reason, message = ?o.message, "denied")
            }
        }
        let watched = self.decisions.receiver_count() > 0;
        if self.audit.is_none() && !watched {
            return;
        }
        let rec = AuditRecord {
            time: OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            method: method.to_string(),
            pod_namespace: pod.namespace.clone(),
            pod_name: pod.name.clone(),
            pod_uid: pod.uid.clone(),
            image: o.image.to_string(),
            normalized: o.normalized.map(str::to_string),
            pulled: pulled.map(str::to_string),
            digest: o.digest.clone(),
            decision: o.verdict.as_str().to_string(),
            reason: o.reason.to_string(),
            message: o.message.to_string(),
            scope: o.scope.clone(),
            bundle_version: o.bundle_version,
            latency_us,
        };
        // Watchers hear of a decision as the audit log gets it: after its line is written.
        let audit = self.audit.clone();
        let metrics = self.metrics.clone();
        let watchers = watched.then(|| self.decisions.clone());
        let write = move || {
            if let Some(audit) = &audit {
                if let Err(e) = audit.record(&rec) {
                    metrics.audit_error();
                    tracing::error!(path = %audit.path().display(), error = %e, "cannot write the audit log");
                }
            }
            if let Some(watchers) = watchers {
                // No watcher left in between is fine: nobody to tell.
                let _ = watchers.send(Arc::new(rec));
            }
        };
        match after {
            Some(after) => after.push(write),
            None => write(),
        }
    }

    fn pull(&self, msg: &Bytes, after: &mut Afterwards) -> Verdict {
        let started = Instant::now();
        let req = match cri::PullImageRequest::decode(&msg[..]) {
            Ok(r) => r,
            Err(e) => return undecodable(methods::PULL_IMAGE, e),
        };
        let image = req.image.as_ref().map_or("", |i| i.image.as_str());
        let pod = sandbox::claimed_pod(req.sandbox_config.as_ref());
        let d = self.state.decide(
            &ImageRequest::Reference(image),
            &pod,
            OffsetDateTime::now_utc(),
        );
        let (verdict, pulled) = match d.verdict {
            PolicyVerdict::Deny => (Verdict::Respond(denial(&d)), None),
            PolicyVerdict::Warn => (Verdict::Forward, Some(image)),
            PolicyVerdict::Allow => {
                let target = d.pull_ref.as_deref().unwrap_or(image);
                let image_domain = d.normalized.as_deref().map(reference::domain_of);
                match self.rewrite_pull(msg, image, image_domain, target, req.auth.is_some()) {
                    Ok(v) => (v, Some(target)),
                    Err(e) => (
                        Verdict::Respond(Status::new(
                            Code::InvalidArgument,
                            format!("pullgate: PullImage: the request message is malformed: {e}"),
                        )),
                        None,
                    ),
                }
            }
        };
        self.record("PullImage", &d, &pod, pulled, started, after);
        let Some(p) = pulled else {
            return verdict;
        };
        // A failed pull is forgotten: the response edit runs only on success, and is dropped
        // unrun otherwise.
        let allowed = d.verdict == PolicyVerdict::Allow;
        let noted = ledger::Noted::new(self.pulls.clone(), p, allowed);
        let request = match verdict {
            Verdict::Forward => None,
            Verdict::Replace(new) => Some(new),
            other => return other,
        };
        // An allowed pull is pinned to a digest: the image ID containerd answers with is proven to
        // be that content.
        let proof = allowed.then(|| (self.proofs.clone(), p.to_string()));
        Verdict::Rewrite {
            request,
            response: Box::new(move |response| {
                noted.pulled();
                if let Some((proofs, pulled)) = proof {
                    if let Ok(r) = cri::PullImageResponse::decode(response) {
                        proofs.add(&r.image_ref, &pulled);
                    }
                }
                None
            }),
        }
    }

    /// Points the pull at `target`, and keeps credentials with the registry they were meant for.
    /// `image_domain`: the registry `image` names, `None` when it does not parse (then credentials
    /// are never passed on).
    fn rewrite_pull(
        &self,
        msg: &Bytes,
        image: &str,
        image_domain: Option<&str>,
        target: &str,
        has_auth: bool,
    ) -> Result<Verdict, wire::WireError> {
        if target == image {
            return Ok(Verdict::Forward);
        }
        let mut out = wire::set_string(msg, field::IMAGE_IMAGE, target.as_bytes())?;
        // `target` is what the decision pulls: a valid reference.
        if image_domain != Some(reference::domain_of(target)) {
            if has_auth {
                out = wire::remove_field(&out, &[field::AUTH])?;
            }
            if let Some(auth) = self.auth.load().as_ref() {
                out = wire::set_string(&out, &[field::AUTH], &auth.encoded)?;
            }
        }
        Ok(Verdict::Replace(out.into()))
    }

    fn image_status(&self, msg: &Bytes) -> Verdict {
        let req = match cri::ImageStatusRequest::decode(&msg[..]) {
            Ok(r) => r,
            Err(e) => return undecodable(methods::IMAGE_STATUS, e),
        };
        let Some(bundle) = self.state.current() else {
            return Verdict::Forward;
        };
        let image = req.image.as_ref().map_or("", |i| i.image.as_str());
        let memo = self.names.clone();
        let ahead = self.ahead.clone();
        let resolved = self.resolve(image);
        // kubelet starts what it asks about next: its proof starts now, reading the manifest the
        // name pins while containerd answers, and learns the image from the answer.
        let question = resolved
            .as_ref()
            .map_or(learn::Question::Open, |r| ahead.asked(&r.pull_ref));
        let request = resolved.and_then(|r| {
            wire::set_string(msg, field::IMAGE_IMAGE, r.pull_ref.as_bytes())
                .ok()
                .map(Bytes::from)
        });
        Verdict::Rewrite {
            request,
            response: Box::new(move |resp| {
                ahead.answered(resp, question);
                show_source_names(resp, &bundle, &memo)
            }),
        }
    }

    fn remove_image(&self, msg: &Bytes) -> Verdict {
        let req = match cri::RemoveImageRequest::decode(&msg[..]) {
            Ok(r) => r,
            Err(e) => return undecodable(methods::REMOVE_IMAGE, e),
        };
        let image = req.image.as_ref().map_or("", |i| i.image.as_str());
        match self.resolve(image) {
            Some(r) => wire::set_string(msg, field::IMAGE_IMAGE, r.pull_ref.as_bytes())
                .map_or(Verdict::Forward, |new| Verdict::Replace(new.into())),
            None => Verdict::Forward,
        }
    }

    fn list_images(&self) -> Verdict {
        let Some(bundle) = self.state.current() else {
            return Verdict::Forward;
        };
        let memo = self.names.clone();
        Verdict::Rewrite {
            request: None,
            response: Box::new(move |resp| show_source_names(resp, &bundle, &memo)),
        }
    }

    /// Forgets a sandbox that is being removed (the call itself is forwarded unchanged).
    fn remove_pod_sandbox(&self, msg: &Bytes) -> Verdict {
        match cri::RemovePodSandboxRequest::decode(&msg[..]) {
            Ok(r) => {
                self.sandboxes.remove(&r.pod_sandbox_id);
                Verdict::Forward
            }
            Err(e) => undecodable(methods::REMOVE_POD_SANDBOX, e),
        }
    }

    fn resolve(&self, image: &str) -> Option<names::Resolved> {
        if image.is_empty() || names::is_image_id(image) {
            return None;
        }
        let bundle = self.state.current()?;
        self.names.resolve(image, &bundle)
    }

    /// Checks containerd's sandbox (pause) image: it must be an approved image in the private
    /// registry, because containerd pulls it itself, past pullgate. Returns a problem description.
    pub async fn check_sandbox_image(&self) -> Result<(), String> {
        let image = match lookup::sandbox_image(&self.upstream).await {
            Ok(Some(i)) => i,
            Ok(None) => return Err("containerd did not report its sandbox image (Status.info[\"config\"].sandboxImage)".into()),
            Err(s) => return Err(format!("cannot read containerd's CRI configuration: {}", s.message)),
        };
        let bundle = self
            .state
            .usable(OffsetDateTime::now_utc())
            .map_err(|why| {
                self.metrics.set_sandbox_image_approved(false);
                format!("sandbox image {image} cannot be checked: {why}")
            })?;
        let d = policy::decide(
            &ImageRequest::Reference(&image),
            &bundle,
            &PodContext::default(),
            OffsetDateTime::now_utc(),
        );
        let private = Reference::parse(&image).is_ok_and(|r| r.domain() == bundle.private_registry);
        let ok = private && d.verdict == PolicyVerdict::Allow;
        self.metrics.set_sandbox_image_approved(ok);
        if ok {
            Ok(())
        } else if !private {
            Err(format!(
                "containerd's sandbox image {image} is not in the private registry {}: containerd pulls it itself, past pullgate; set sandbox_image to its approved mirror location pinned by digest",
                bundle.private_registry
            ))
        } else {
            Err(format!(
                "containerd's sandbox image {image} is not approved: {}",
                d.message
            ))
        }
    }
}

impl Handler for Enforcer {
    fn handle<'a>(&'a self, call: Call<'a>) -> BoxFuture<'a, Verdict> {
        Box::pin(async move {
            match methods::canonical(call.method) {
                methods::PULL_IMAGE => self.pull(call.message, call.afterwards),
                methods::IMAGE_STATUS => self.image_status(call.message),
                methods::REMOVE_IMAGE => self.remove_image(call.message),
                methods::LIST_IMAGES => self.list_images(),
                methods::CREATE_CONTAINER => {
                    self.create_container(call.message, call.afterwards).await
                }
                methods::RUN_POD_SANDBOX => self.run_pod_sandbox(call.message),
                methods::REMOVE_POD_SANDBOX => self.remove_pod_sandbox(call.message),
                _ => Verdict::Forward,
            }
        })
    }
}

/// Makes room for one more key in a cache bounded to `max` entries, by forgetting one (any one).
fn make_room<V>(map: &mut std::collections::HashMap<String, V>, max: usize) {
    if map.len() >= max {
        if let Some(old) = map.keys().next().cloned() {
            map.remove(&old);
        }
    }
}

/// The status a denial is answered with: `FAILED_PRECONDITION` when no valid bundle is installed,
/// `PERMISSION_DENIED` otherwise; the message is the decision's own.
pub fn denial(d: &Decision) -> Status {
    let code = if d.reason == ReasonCode::NoValidBundle {
        Code::FailedPrecondition
    } else {
        Code::PermissionDenied
    };
    Status::new(code, d.message.clone())
}

fn undecodable(method: &str, e: prost::DecodeError) -> Verdict {
    Verdict::Respond(Status::new(
        Code::InvalidArgument,
        format!("pullgate: {method}: the request message is not valid protobuf: {e}"),
    ))
}

/// What is audited about one outcome: a policy [`Decision`], or a refusal of pullgate's own (a
/// container start whose pod sandbox does not exist or is misrepresented).
struct Outcome<'a> {
    verdict: PolicyVerdict,
    reason: &'static str,
    message: &'a str,
    image: &'a str,
    normalized: Option<&'a str>,
    digest: Option<String>,
    scope: Option<String>,
    bundle_version: Option<u64>,
}

/// Shows each `Image` of a response (field 1 of both `ImageStatusResponse` and `ListImagesResponse`)
/// with the names [`names::shown_names`] gives it, remembered in `memo`. Wire-level: `repo_tags`
/// and `repo_digests` are written anew after the other fields, every other byte of the response is
/// kept. `None` when no name changes.
fn show_source_names(
    resp: &[u8],
    bundle: &Arc<VerifiedBundle>,
    memo: &names::Memo,
) -> Option<Vec<u8>> {
    let mut changed = false;
    let out = wire::map_repeated(resp, field::IMAGES, |image| {
        let shown = memo.shown(image, bundle, || show_image(image, bundle));
        changed |= shown.is_some();
        Ok(shown)
    })
    .ok()?;
    changed.then_some(out)
}

/// One `Image` message with the names [`names::shown_names`] gives it; `None` when no name changes
/// (or the message is malformed: left as it is).
fn show_image(image: &[u8], bundle: &VerifiedBundle) -> Option<Vec<u8>> {
    let utf8 = |v: Vec<&[u8]>| -> Option<Vec<String>> {
        v.into_iter()
            .map(|b| std::str::from_utf8(b).ok().map(str::to_string))
            .collect()
    };
    // A name that is not UTF-8 is not something the bundle names: leave such an image alone.
    let tags = utf8(wire::repeated_strings(image, field::REPO_TAGS).ok()?)?;
    let digests = utf8(wire::repeated_strings(image, field::REPO_DIGESTS).ok()?)?;
    let (new_tags, new_digests) = names::shown_names(
        tags.iter().map(String::as_str),
        digests.iter().map(String::as_str),
        bundle,
    );
    if new_tags == tags && new_digests == digests {
        return None;
    }
    let mut e = wire::remove_field(image, &[field::REPO_TAGS]).ok()?;
    e = wire::remove_field(&e, &[field::REPO_DIGESTS]).ok()?;
    for t in &new_tags {
        wire::append_bytes(&mut e, field::REPO_TAGS, t.as_bytes());
    }
    for d in &new_digests {
        wire::append_bytes(&mut e, field::REPO_DIGESTS, d.as_bytes());
    }
    Some(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testutil::example_bundle;

    fn pull(state: &PolicyState, now: OffsetDateTime) -> Decision {
        state.decide(
            &ImageRequest::Reference("nginx:1.25"),
            &PodContext::default(),
            now,
        )
    }

    #[test]
    fn expired_bundle_is_enforced_during_grace_then_fails_closed() {
        let state = PolicyState::new(NodeMode::Enforce, Duration::from_secs(72 * 3600));
        let b = Arc::new(example_bundle());
        let expires = b.expires_at;
        state.set(b);
        let within = pull(&state, expires + time::Duration::hours(1));
        assert_eq!(within.verdict, PolicyVerdict::Allow, "{}", within.message);
        assert_eq!(within.bundle_version, Some(42));
        let after = pull(&state, expires + time::Duration::hours(73));
        assert_eq!(after.verdict, PolicyVerdict::Deny);
        assert_eq!(after.reason, ReasonCode::NoValidBundle);
        assert!(after.message.contains("expired"), "{}", after.message);
        assert!(after.message.contains("grace"), "{}", after.message);
        // Denial statuses: FAILED_PRECONDITION without a usable bundle, PERMISSION_DENIED otherwise.
        assert_eq!(denial(&after).code, Code::FailedPrecondition);
    }

    #[test]
    fn node_warn_mode_turns_denials_into_warnings_and_can_be_switched() {
        let state = PolicyState::new(NodeMode::Warn, Duration::from_secs(3600));
        let now = crate::policy::testutil::example_now();
        let d = pull(&state, now);
        assert_eq!(
            (d.verdict, d.reason),
            (PolicyVerdict::Warn, ReasonCode::NoValidBundle)
        );
        assert_eq!(
            d.pull_ref.as_deref(),
            Some("nginx:1.25"),
            "warn forwards the image as asked"
        );
        state.set_mode(NodeMode::Enforce);
        assert_eq!(pull(&state, now).verdict, PolicyVerdict::Deny);
        assert_eq!(denial(&pull(&state, now)).code, Code::FailedPrecondition);
    }

    #[test]
    fn responses_show_source_names_and_keep_every_other_byte() {
        let b = Arc::new(example_bundle());
        let memo = names::Memo::default();
        let d1 = format!("sha256:{}", "01".repeat(32));
        let image = cri::Image {
            id: "sha256:x".into(),
            repo_tags: vec!["registry.corp/apps/shared/x:1".into()],
            repo_digests: vec![format!("registry.corp/approved/library/nginx@{d1}")],
            size: 3,
            uid: Some(cri::Int64Value { value: 1002 }),
            username: String::new(),
            pinned: true,
            ..Default::default()
        };
        let mut resp = cri::ListImagesResponse {
            images: vec![image.clone(), image],
        }
        .encode_to_vec();
        resp.extend_from_slice(&[0xa2, 0x06, 0x01, b'z']); // unknown field 100
        let out = show_source_names(&resp, &b, &memo).unwrap();
        let decoded = cri::ListImagesResponse::decode(out.as_slice()).unwrap();
        for img in &decoded.images {
            assert_eq!(
                img.repo_tags,
                [
                    "registry.corp/apps/shared/x:1",
                    "docker.io/library/nginx:1.25"
                ]
            );
            assert_eq!(img.repo_digests, [format!("docker.io/library/nginx@{d1}")]);
            assert_eq!(
                (img.size, img.uid, img.pinned),
                (3, Some(cri::Int64Value { value: 1002 }), true)
            );
        }
        assert!(out.ends_with(&[0xa2, 0x06, 0x01, b'z']));
        // Applied twice, nothing changes: the names shown are a fixed point.
        assert!(show_source_names(&out, &b, &memo).is_none());
        let plain = cri::ImageStatusResponse {
            image: Some(cri::Image {
                id: "sha256:y".into(),
                repo_tags: vec!["quay.io/x/y:1".into()],
                ..Default::default()
            }),
            info: Default::default(),
        }
        .encode_to_vec();
        assert!(
            show_source_names(&plain, &b, &memo).is_none(),
            "nothing to show"
        );
    }
}
