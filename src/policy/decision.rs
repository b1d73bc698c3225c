//! Decisions: may this pod run this image, and from where?
//!
//! This module owns [`decide`] (and [`decide_for_any_scope`], for callers without a pod) and its
//! inputs and outputs ([`ImageRequest`], [`PodContext`], [`Decision`], [`Verdict`], [`ReasonCode`]).
//! A decision is a value, never an error; it is computed from the request, an in-memory
//! [`VerifiedBundle`], the pod's context and the time the caller passes (no I/O, no clock read, no
//! network: a tag is resolved from the bundle alone).
//!
//! Rules, in order:
//! 1. An unparsable reference is denied (`invalid_reference`).
//! 2. A reference to the private registry under a mirror target (e.g. `registry.corp/approved/library/
//!    nginx:1.25`) is mapped back to its public source and checked exactly like it.
//! 3. Another reference to the private registry must fall under a first-party prefix available to the
//!    pod's scope (`not_in_bundle` / `out_of_scope`; `tag_not_approved` if the prefix requires a digest).
//! 4. A public reference must come from a mirrored source (`public_registry_blocked`), name an approved
//!    repository (`not_in_bundle`), and name an approved tag (`tag_not_approved`) or digest
//!    (`digest_not_approved`) of an entry whose scope contains the pod's scope (`out_of_scope`). With both
//!    tag and digest, the digest decides, and an approved tag must not be bound to a different digest.
//! 5. An approved image is then judged at `now` (format 2): past its `sunset_at` it is denied
//!    (`sunset`); against the scan and licence rule of the pod's scope it may be denied
//!    (`severity_exceeded`, `insufficient_scans`, `license_not_allowed`); past its `deprecated_at` it is
//!    allowed as `deprecated`. When a digest is approved by several routes (tags, entries), the best
//!    one available to the pod's scope counts.
//! 6. Any denial of a mirrored public image is then checked against the bundle's exceptions: a valid
//!    exception for the digest (or its tag) and the pod's scope allows it (`exception`); an expired one
//!    turns the denial into `exception_expired`.
//! 7. An allowed public image is pulled from its mirror location, pinned by digest:
//!    `registry.corp/approved/library/nginx@sha256:…`.
//!
//! When the pod's scope is in `warn` mode a denial becomes [`Verdict::Warn`]: the same reason and message,
//! but the image is allowed as requested.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::sync::Arc;

use time::OffsetDateTime;

use super::bundle::{
    Bundle, Exception, ImageEntry, Lifecycle, LifecycleState, Mirror, VerifiedBundle, rfc3339,
};
use super::reference::{Digest, Reference, path_has_prefix};
use super::rules::{Rules, Violation};
use super::scope::{Mode, ScopeId};

/// What is being asked about.
#[derive(Debug, Clone, Copy)]
pub enum ImageRequest<'a> {
    /// An image reference to pull or run (`nginx:1.25`, `registry.corp/approved/…@sha256:…`).
    Reference(&'a str),
    /// An image already in the node's store (container start): its name or id as the pod spec or CRI gave
    /// it, and its repo digests (`registry.corp/approved/library/busybox@sha256:…`). Allowed when one
    /// of the repo digests is approved for the pod's scope.
    RepoDigests {
        /// The image as named in the request (for messages).
        image: &'a str,
        /// The image's repo digests.
        repo_digests: &'a [String],
    },
}

impl ImageRequest<'_> {
    fn image(&self) -> &str {
        match self {
            ImageRequest::Reference(s) => s,
            ImageRequest::RepoDigests { image, .. } => image,
        }
    }
}

/// The pod asking, from the CRI `PodSandboxConfig` metadata (every part may be absent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodContext {
    /// Namespace.
    pub namespace: Option<String>,
    /// Pod name.
    pub name: Option<String>,
    /// Pod UID.
    pub uid: Option<String>,
    /// Pod labels.
    pub labels: BTreeMap<String, String>,
}

/// The outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// May run.
    Allow,
    /// May not run.
    Deny,
    /// Would be denied, but the scope is in warn mode: allowed and reported.
    Warn,
}

impl Verdict {
    /// `allow`, `deny` or `warn`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::Warn => "warn",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why. The strings returned by [`ReasonCode::as_str`] are stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReasonCode {
    /// Allowed: an approved image from the bundle.
    Approved,
    /// Allowed: under a first-party prefix.
    FirstParty,
    /// The reference does not parse.
    InvalidReference,
    /// The repository (or private-registry path) is not in the bundle.
    NotInBundle,
    /// The tag is not approved (or a digest is required).
    TagNotApproved,
    /// The digest is not approved.
    DigestNotApproved,
    /// Approved, but not for this pod's scope.
    OutOfScope,
    /// The registry is neither the private registry nor a mirrored source.
    PublicRegistryBlocked,
    /// No valid bundle is installed.
    NoValidBundle,
    /// Allowed: approved, but past its `deprecated_at`.
    Deprecated,
    /// Allowed by a valid exception.
    Exception,
    /// Past its `sunset_at`.
    Sunset,
    /// Fewer distinct scanners than the scope's rule needs.
    InsufficientScans,
    /// A scan reports a severity above the scope's maximum.
    SeverityExceeded,
    /// The licence expression cannot be satisfied under the scope's licence rule.
    LicenseNotAllowed,
    /// Only an expired exception would have allowed it.
    ExceptionExpired,
}

impl ReasonCode {
    /// Stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            ReasonCode::Approved => "approved",
            ReasonCode::FirstParty => "first_party",
            ReasonCode::InvalidReference => "invalid_reference",
            ReasonCode::NotInBundle => "not_in_bundle",
            ReasonCode::TagNotApproved => "tag_not_approved",
            ReasonCode::DigestNotApproved => "digest_not_approved",
            ReasonCode::OutOfScope => "out_of_scope",
            ReasonCode::PublicRegistryBlocked => "public_registry_blocked",
            ReasonCode::NoValidBundle => "no_valid_bundle",
            ReasonCode::Deprecated => "deprecated",
            ReasonCode::Exception => "exception",
            ReasonCode::Sunset => "sunset",
            ReasonCode::InsufficientScans => "insufficient_scans",
            ReasonCode::SeverityExceeded => "severity_exceeded",
            ReasonCode::LicenseNotAllowed => "license_not_allowed",
            ReasonCode::ExceptionExpired => "exception_expired",
        }
    }

    /// True for the codes that deny.
    pub fn is_denial(self) -> bool {
        !matches!(
            self,
            ReasonCode::Approved
                | ReasonCode::FirstParty
                | ReasonCode::Deprecated
                | ReasonCode::Exception
        )
    }
}

impl fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The bundle entry an allowed image matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matched {
    /// Source repository (or first-party prefix, `registry.corp/apps/payments`).
    pub source: Arc<str>,
    /// Scope the entry is approved for.
    pub scope: Arc<str>,
    /// Whether this is a first-party prefix rather than an image entry.
    pub first_party: bool,
}

/// The lifecycle of the approval a decision used (format 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleInfo {
    /// The tag whose lifecycle it is (none for a bare digest).
    pub tag: Option<Box<str>>,
    /// The approved digest.
    pub digest: Digest,
    /// Dates and replacement.
    pub lifecycle: Lifecycle,
    /// The state at the decision's time.
    pub state: LifecycleState,
}

/// The exception a decision used (format 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExceptionInfo {
    /// The exception.
    pub exception: Exception,
    /// Whether it had expired at the decision's time.
    pub expired: bool,
}

/// A decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Allow, deny or warn.
    pub verdict: Verdict,
    /// Why (for `warn`, the reason the image would have been denied).
    pub reason: ReasonCode,
    /// A sentence for a person reading a kubelet event: which image, why, bundle version, what to do.
    pub message: String,
    /// The image as requested.
    pub image: String,
    /// The normalised reference, if it parsed.
    pub normalized: Option<String>,
    /// What to pull: the mirror location pinned by digest for approved public images; the reference as
    /// requested for warnings and for first-party images allowed by tag; none for denials.
    pub pull_ref: Option<String>,
    /// The digest that was approved (or requested, for warnings).
    pub digest: Option<Digest>,
    /// Version of the bundle the decision was made with.
    pub bundle_version: Option<u64>,
    /// The entry that allowed it.
    pub matched: Option<Matched>,
    /// The pod's scope.
    pub pod_scope: Option<Arc<str>>,
    /// The lifecycle of the approval used, when it has one (format 2).
    pub lifecycle: Option<LifecycleInfo>,
    /// The exception used, for `exception` and `exception_expired`.
    pub exception: Option<ExceptionInfo>,
    /// When an allowed decision may change by time alone (a deprecation, sunset or exception expiry
    /// ahead); `None` when it cannot. Caches of decisions must not outlive it.
    pub valid_until: Option<OffsetDateTime>,
}

impl Decision {
    /// True for allow and warn (the image may run).
    pub fn is_allowed(&self) -> bool {
        self.verdict != Verdict::Deny
    }

    /// The decision as one JSON object (keys `decision`, `reason`, `message`, `image`, `normalized`,
    /// `pull_ref`, `digest`, `bundle_version`, `matched`, `pod_scope`, and `lifecycle` and `exception`
    /// when they apply).
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "decision": self.verdict.as_str(),
            "reason": self.reason.as_str(),
            "message": self.message,
            "image": self.image,
            "normalized": self.normalized,
            "pull_ref": self.pull_ref,
            "digest": self.digest.as_ref().map(Digest::to_string),
            "bundle_version": self.bundle_version,
            "matched": self.matched.as_ref().map(|m| serde_json::json!({
                "source": &*m.source, "scope": &*m.scope, "first_party": m.first_party,
            })),
            "pod_scope": self.pod_scope.as_deref(),
        });
        if let Some(l) = &self.lifecycle {
            v["lifecycle"] = serde_json::json!({
                "tag": l.tag.as_deref(),
                "digest": l.digest.to_string(),
                "deprecated_at": l.lifecycle.deprecated_at.map(rfc3339),
                "sunset_at": l.lifecycle.sunset_at.map(rfc3339),
                "replacement": l.lifecycle.replacement.as_deref(),
                "state": l.state.as_str(),
            });
        }
        if let Some(x) = &self.exception {
            let e = &x.exception;
            v["exception"] = serde_json::json!({
                "source": &*e.source,
                "digest": e.digest.to_string(),
                "tag": e.tag.as_deref(),
                "scope": &*e.scope_path,
                "expires_at": rfc3339(e.expires_at),
                "ticket": e.ticket,
                "reason": e.reason,
                "approved_by": e.approved_by,
                "expired": x.expired,
            });
        }
        v
    }
}

/// Decides `request` for `pod` against `bundle` at time `now` (lifecycles and exceptions are judged
/// at `now`; nothing reads a clock).
pub fn decide(
    request: &ImageRequest<'_>,
    bundle: &VerifiedBundle,
    pod: &PodContext,
    now: OffsetDateTime,
) -> Decision {
    let b: &Bundle = bundle;
    let pod_scope = b.scopes().pod_scope(pod.namespace.as_deref(), |k| {
        pod.labels.get(k).map(String::as_str)
    });
    Ctx::new(b, pod_scope, now).decide(request)
}

/// Decides `request` as a pod of each scope of the bundle would ask it, and returns the first
/// allowed decision: `Some` when some pod may run the image. For callers that have no pod (the
/// node's lockdown watcher, which sees images arrive in the image store); which pod may run it is
/// still decided when a container starts.
pub fn decide_for_any_scope(
    request: &ImageRequest<'_>,
    bundle: &VerifiedBundle,
    now: OffsetDateTime,
) -> Option<Decision> {
    let b: &Bundle = bundle;
    // Only the allowing scope's decision is worded.
    (0..b.scopes().nodes().len()).find_map(|id| {
        let ctx = Ctx::new(b, id as ScopeId, now);
        let (r, o) = ctx.outcome(request);
        matches!(o, Outcome::Allow { .. }).then(|| ctx.finish(request.image(), r.as_ref(), o))
    })
}

impl<'b> Ctx<'b> {
    fn new(b: &'b Bundle, pod_scope: ScopeId, now: OffsetDateTime) -> Ctx<'b> {
        let node = b.scopes().node(pod_scope);
        Ctx {
            b,
            pod_scope,
            mode: node.mode,
            rules: node.rules.as_deref(),
            now,
        }
    }

    fn decide(&self, request: &ImageRequest<'_>) -> Decision {
        let (r, o) = self.outcome(request);
        self.finish(request.image(), r.as_ref(), o)
    }

    /// The outcome for `request`, with the reference it was decided by, before it is worded.
    fn outcome(&self, request: &ImageRequest<'_>) -> (Option<Reference>, Outcome) {
        match request {
            ImageRequest::Reference(image) => match Reference::parse(image) {
                Ok(r) => {
                    let o = self.evaluate(&r);
                    (Some(r), o)
                }
                Err(e) => (None, invalid(image, &e.kind.to_string(), self.b.version)),
            },
            ImageRequest::RepoDigests {
                image,
                repo_digests,
            } => self.present(image, repo_digests),
        }
    }
}

/// The decision when no valid bundle is installed: always `no_valid_bundle` (deny). `why` is the loader's
/// error, shown to the reader.
pub fn decide_without_bundle(request: &ImageRequest<'_>, why: Option<&str>) -> Decision {
    let image = request.image();
    let normalized = Reference::parse(image).ok().map(|r| r.to_string());
    let mut message = format!(
        "image {image} denied: no valid allowlist bundle is installed on this node, so no image may run"
    );
    if let Some(why) = why {
        let _ = write!(message, " ({why})");
    }
    message.push_str("; install a signed, unexpired bundle and check pullgate's log on the node");
    Decision {
        verdict: Verdict::Deny,
        reason: ReasonCode::NoValidBundle,
        message,
        image: image.to_owned(),
        normalized,
        pull_ref: None,
        digest: None,
        bundle_version: None,
        matched: None,
        pod_scope: None,
        lifecycle: None,
        exception: None,
        valid_until: None,
    }
}

/// What an allowed decision says besides the match: lifecycle, exception, and the note for the message.
#[derive(Default)]
struct Extra {
    lifecycle: Option<LifecycleInfo>,
    exception: Option<ExceptionInfo>,
    valid_until: Option<OffsetDateTime>,
    /// Said in the message after "allowed".
    note: Option<String>,
}

enum Outcome {
    Allow {
        reason: ReasonCode,
        pull_ref: String,
        digest: Option<Digest>,
        matched: Matched,
        extra: Box<Extra>,
    },
    Deny {
        reason: ReasonCode,
        message: String,
        extra: Option<Box<Extra>>,
    },
}

impl Outcome {
    fn deny(reason: ReasonCode, message: String) -> Outcome {
        Outcome::Deny {
            reason,
            message,
            extra: None,
        }
    }

    /// Preference among the outcomes of several routes to the same image: allowed before denied,
    /// approved before deprecated, a rule denial before a sunset.
    fn rank(&self) -> u8 {
        match self {
            Outcome::Allow {
                reason: ReasonCode::Deprecated,
                ..
            } => 1,
            Outcome::Allow { .. } => 0,
            Outcome::Deny {
                reason: ReasonCode::Sunset,
                ..
            } => 3,
            Outcome::Deny { .. } => 2,
        }
    }
}

fn invalid(image: &str, why: &str, version: u64) -> Outcome {
    Outcome::deny(
        ReasonCode::InvalidReference,
        format!(
            "image \"{image}\" denied: it is not a valid image reference ({why}); fix the image in the pod spec (bundle v{version})"
        ),
    )
}

struct Ctx<'b> {
    b: &'b Bundle,
    pod_scope: ScopeId,
    mode: Mode,
    /// The scan and licence rule of the pod's scope (format 2).
    rules: Option<&'b Rules>,
    now: OffsetDateTime,
}

impl Ctx<'_> {
    fn scope_name(&self) -> &str {
        self.b.scopes().path(self.pod_scope)
    }

    fn evaluate(&self, r: &Reference) -> Outcome {
        let b = self.b;
        let (domain, path) = (r.domain(), r.path());
        if domain == b.private_registry {
            if let Some((mirror, source)) = b.source_of_mirror_path(path) {
                return self.evaluate_source(r, &source, mirror);
            }
            return self.evaluate_first_party(r);
        }
        match b.mirror_for(domain, path) {
            Some(mirror) => self.evaluate_source(r, r.name(), mirror),
            None => {
                let sources: Vec<String> = b.mirrors().iter().map(Mirror::source).collect();
                Outcome::deny(
                    ReasonCode::PublicRegistryBlocked,
                    format!(
                        "image {r} denied: {domain}/{path} is not from an approved source; this node pulls only from {} (mirrors of {}) and first-party prefixes (bundle v{}); ask the platform team to mirror and approve the image",
                        b.private_registry,
                        sources.join(", "),
                        b.version
                    ),
                )
            }
        }
    }

    /// The mirror location of `digest` of `source`, pinned by digest.
    fn mirror_ref(&self, source: &str, mirror: &Mirror, digest: &Digest) -> String {
        let b = self.b;
        let source_path = &source[mirror.source_domain.len() + 1..];
        let mut pull_ref = String::with_capacity(b.private_registry.len() + source.len() + 90);
        let _ = write!(
            pull_ref,
            "{}/{}@{digest}",
            b.private_registry,
            b.mirror_path(mirror, source_path)
        );
        pull_ref
    }

    /// A mirrored public image: the approvals in `images`, then the exceptions if they deny.
    fn evaluate_source(&self, r: &Reference, source: &str, mirror: &Mirror) -> Outcome {
        let o = self.evaluate_approvals(r, source, mirror);
        match o {
            Outcome::Deny { .. } if !self.b.exceptions_for(source).is_empty() => {
                self.evaluate_exceptions(r, source, mirror, o)
            }
            o => o,
        }
    }

    fn evaluate_approvals(&self, r: &Reference, source: &str, mirror: &Mirror) -> Outcome {
        let b = self.b;
        let entries = b.entries(source);
        let version = b.version;
        if entries.is_empty() {
            return Outcome::deny(
                ReasonCode::NotInBundle,
                format!(
                    "image {r} denied: repository {source} is not approved in allowlist bundle v{version}; use an approved image or ask the platform team to approve it"
                ),
            );
        }
        let scopes = b.scopes();
        let in_scope = |e: &&ImageEntry| scopes.contains(e.scope(), self.pod_scope);
        if let Some(digest) = r.digest() {
            let mut best: Option<Outcome> = None;
            for e in entries
                .iter()
                .filter(in_scope)
                .filter(|e| e.has_digest(digest))
            {
                for (tag, life) in e.routes(digest) {
                    let o = self.judge(r, source, mirror, e, digest, tag, life);
                    if best.as_ref().is_none_or(|b| o.rank() < b.rank()) {
                        best = Some(o);
                    }
                }
            }
            if let Some(best) = best {
                let bound = r.tag().and_then(|tag| {
                    entries
                        .iter()
                        .filter(in_scope)
                        .find_map(|e| e.tag(tag))
                        .map(|d| (tag, d))
                });
                if let Some((tag, bound)) = bound.filter(|(_, d)| *d != digest) {
                    return Outcome::deny(
                        ReasonCode::DigestNotApproved,
                        format!(
                            "image {r} denied: tag {tag} of {source} is approved as {bound} in bundle v{version}, but the reference pins {digest}; use {source}:{tag} or {source}@{bound}"
                        ),
                    );
                }
                return best;
            }
            if let Some(e) = entries.iter().find(|e| e.has_digest(digest)) {
                return self.out_of_scope(r, source, e, entries);
            }
            return Outcome::deny(
                ReasonCode::DigestNotApproved,
                format!(
                    "image {r} denied: digest {digest} of {source} is not approved in bundle v{version}; {}",
                    self.approved_tags_hint(source, entries)
                ),
            );
        }
        let tag = r.tag().unwrap_or(super::reference::DEFAULT_TAG);
        let mut best: Option<Outcome> = None;
        for e in entries.iter().filter(in_scope) {
            if let Some(d) = e.tag(tag) {
                let o = self.judge(r, source, mirror, e, d, Some(tag), e.tag_lifecycle(tag));
                if best.as_ref().is_none_or(|b| o.rank() < b.rank()) {
                    best = Some(o);
                }
            }
        }
        if let Some(best) = best {
            return best;
        }
        if let Some(e) = entries.iter().find(|e| e.tag(tag).is_some()) {
            return self.out_of_scope(r, source, e, entries);
        }
        Outcome::deny(
            ReasonCode::TagNotApproved,
            format!(
                "image {r} denied: tag {tag} of {source} is not approved in bundle v{version}; {}",
                self.approved_tags_hint(source, entries)
            ),
        )
    }

    /// One route to an approved image (entry `e` approves `digest`, through `tag` if any, with
    /// lifecycle `life` if any), judged at `now`: sunset, then the scope's rules, then deprecation.
    #[allow(clippy::too_many_arguments)]
    fn judge(
        &self,
        r: &Reference,
        source: &str,
        mirror: &Mirror,
        e: &ImageEntry,
        digest: &Digest,
        tag: Option<&str>,
        life: Option<&Lifecycle>,
    ) -> Outcome {
        let version = self.b.version;
        let state = life.map_or(LifecycleState::Active, |l| l.state(self.now));
        let info = life.map(|l| LifecycleInfo {
            tag: tag.map(Into::into),
            digest: digest.clone(),
            lifecycle: l.clone(),
            state,
        });
        let what = match tag {
            Some(t) => format!("{source}:{t}"),
            None => format!("{source}@{digest}"),
        };
        let replacement = |l: &Lifecycle| match &l.replacement {
            Some(rep) => format!("use {source}:{rep} instead"),
            None => "no replacement is named; ask the platform team which image to use".into(),
        };
        if state == LifecycleState::Sunset {
            let l = life.expect("a sunset state comes from a lifecycle");
            return Outcome::Deny {
                reason: ReasonCode::Sunset,
                message: format!(
                    "image {r} denied: {what} reached its sunset at {} (bundle v{version}); {}",
                    l.sunset_at.map(rfc3339).unwrap_or_default(),
                    replacement(l)
                ),
                extra: Some(Box::new(Extra {
                    lifecycle: info,
                    ..Extra::default()
                })),
            };
        }
        if let Some(rules) = self.rules {
            let license = self.b.license_expression(&e.provenance().license);
            if let Err(v) = rules.check(e.provenance(), license) {
                let (reason, todo) = match &v {
                    Violation::Severity { .. } => (
                        ReasonCode::SeverityExceeded,
                        "use a fixed image or ask the platform team for an exception",
                    ),
                    Violation::Scanners { .. } => (
                        ReasonCode::InsufficientScans,
                        "ask the platform team to have it scanned by more scanners",
                    ),
                    Violation::License { .. } => (
                        ReasonCode::LicenseNotAllowed,
                        "use an image under an allowed licence or ask the platform team for an exception",
                    ),
                };
                return Outcome::Deny {
                    reason,
                    message: format!(
                        "image {r} denied: {what} does not meet the rules of scope {}: {v} (bundle v{version}); {todo}",
                        self.scope_name()
                    ),
                    extra: Some(Box::new(Extra {
                        lifecycle: info,
                        ..Extra::default()
                    })),
                };
            }
        }
        let (reason, note) = match (state, life) {
            (LifecycleState::Deprecated, Some(l)) => (
                ReasonCode::Deprecated,
                Some(format!(
                    "DEPRECATED since {}{}; {}",
                    l.deprecated_at.map(rfc3339).unwrap_or_default(),
                    l.sunset_at
                        .map(|t| format!(", denied from its sunset at {}", rfc3339(t)))
                        .unwrap_or_default(),
                    replacement(l)
                )),
            ),
            _ => (ReasonCode::Approved, None),
        };
        Outcome::Allow {
            reason,
            pull_ref: self.mirror_ref(source, mirror, digest),
            digest: Some(digest.clone()),
            matched: Matched {
                source: e.source_arc(),
                scope: e.scope_path().clone(),
                first_party: false,
            },
            extra: Box::new(Extra {
                valid_until: life.and_then(|l| l.next_change(self.now)),
                lifecycle: info,
                exception: None,
                note,
            }),
        }
    }

    /// `denied` is the regular decision; an exception for the digest (or the tag) and the pod's scope
    /// replaces it: allowed while valid, `exception_expired` after.
    fn evaluate_exceptions(
        &self,
        r: &Reference,
        source: &str,
        mirror: &Mirror,
        denied: Outcome,
    ) -> Outcome {
        let scopes = self.b.scopes();
        let tag = r.tag().unwrap_or(super::reference::DEFAULT_TAG);
        // The digest asked for: pinned, or what `images` bind the tag to (a tag means one digest).
        let resolved = r
            .digest()
            .or_else(|| self.b.entries(source).iter().find_map(|e| e.tag(tag)));
        let matching = || {
            self.b
                .exceptions_for(source)
                .iter()
                .filter(|x| {
                    resolved == Some(&x.digest)
                        || (r.digest().is_none() && x.tag.as_deref() == Some(tag))
                })
                .filter(|x| scopes.contains(x.scope, self.pod_scope))
        };
        let now = self.now;
        if let Some(x) = matching()
            .filter(|x| now < x.expires_at)
            .max_by_key(|x| x.expires_at)
        {
            return Outcome::Allow {
                reason: ReasonCode::Exception,
                pull_ref: self.mirror_ref(source, mirror, &x.digest),
                digest: Some(x.digest.clone()),
                matched: Matched {
                    source: x.source.clone(),
                    scope: x.scope_path.clone(),
                    first_party: false,
                },
                extra: Box::new(Extra {
                    exception: Some(ExceptionInfo {
                        exception: x.clone(),
                        expired: false,
                    }),
                    valid_until: Some(x.expires_at),
                    lifecycle: None,
                    note: Some(format!(
                        "by EXCEPTION {} (approved by {} for scope {}: {}), valid until {}",
                        x.ticket,
                        x.approved_by,
                        x.scope_path,
                        x.reason,
                        rfc3339(x.expires_at)
                    )),
                }),
            };
        }
        let Some(x) = matching().max_by_key(|x| x.expires_at) else {
            return denied;
        };
        let Outcome::Deny { message, extra, .. } = denied else {
            return denied;
        };
        let mut extra = extra.unwrap_or_default();
        extra.exception = Some(ExceptionInfo {
            exception: x.clone(),
            expired: true,
        });
        Outcome::Deny {
            reason: ReasonCode::ExceptionExpired,
            message: format!(
                "image {r} denied: exception {} for it (scope {}, approved by {}) expired at {}; renew the exception or fix what it covered: {message}",
                x.ticket,
                x.scope_path,
                x.approved_by,
                rfc3339(x.expires_at)
            ),
            extra: Some(extra),
        }
    }

    fn approved_tags_hint(&self, source: &str, entries: &[ImageEntry]) -> String {
        let scopes = self.b.scopes();
        let mut tags: Vec<&str> = entries
            .iter()
            .filter(|e| scopes.contains(e.scope(), self.pod_scope))
            .flat_map(|e| e.tags().iter().map(|(t, _)| &**t))
            .collect();
        tags.sort_unstable();
        tags.dedup();
        let digests = entries
            .iter()
            .filter(|e| scopes.contains(e.scope(), self.pod_scope))
            .map(|e| e.digests().len())
            .sum::<usize>();
        if tags.is_empty() && digests == 0 {
            return format!(
                "no tag of {source} is approved for scope {}; ask the platform team for an approval for your scope",
                self.scope_name()
            );
        }
        let mut s = String::from("approved for scope ");
        s.push_str(self.scope_name());
        if !tags.is_empty() {
            s.push_str(": tags ");
            let shown = tags.len().min(10);
            s.push_str(&tags[..shown].join(", "));
            if tags.len() > shown {
                let _ = write!(s, " and {} more", tags.len() - shown);
            }
        }
        if digests > 0 {
            let _ = write!(
                s,
                "{}{digests} pinned digest(s)",
                if tags.is_empty() { ": " } else { "; " }
            );
        }
        s.push_str("; use one of these or ask the platform team to approve this one");
        s
    }

    fn out_of_scope(
        &self,
        r: &Reference,
        source: &str,
        e: &ImageEntry,
        entries: &[ImageEntry],
    ) -> Outcome {
        let mut scopes: Vec<&str> = vec![&**e.scope_path()];
        // Entries are sorted by scope; one scope may have several (one per provenance).
        for s in entries.iter().map(|x| &**x.scope_path()) {
            if !scopes.contains(&s) {
                scopes.push(s);
            }
        }
        Outcome::deny(
            ReasonCode::OutOfScope,
            format!(
                "image {r} denied: {source} is approved in bundle v{} only for scope {}, and this pod is in scope {}; {}",
                self.b.version,
                scopes.join(", "),
                self.scope_name(),
                self.approved_tags_hint(source, entries)
            ),
        )
    }

    fn evaluate_first_party(&self, r: &Reference) -> Outcome {
        let b = self.b;
        let path = r.path();
        let matching: Vec<_> = b
            .first_party()
            .iter()
            .filter(|fp| path_has_prefix(path, &fp.path))
            .collect();
        let version = b.version;
        if matching.is_empty() {
            let targets: Vec<String> = b
                .mirrors()
                .iter()
                .map(|m| format!("{}/{}/", b.private_registry, m.target_path))
                .collect();
            return Outcome::deny(
                ReasonCode::NotInBundle,
                format!(
                    "image {r} denied: {} is neither under a mirror location ({}) nor under a first-party prefix in bundle v{version}; push it under your team's first-party prefix or ask the platform team to add one",
                    r.name(),
                    targets.join(", ")
                ),
            );
        }
        let scopes = b.scopes();
        let in_scope: Vec<_> = matching
            .iter()
            .filter(|fp| scopes.contains(fp.scope, self.pod_scope))
            .collect();
        if in_scope.is_empty() {
            let names: Vec<&str> = matching.iter().map(|fp| &*fp.scope_path).collect();
            return Outcome::deny(
                ReasonCode::OutOfScope,
                format!(
                    "image {r} denied: first-party prefix {}/{} may be used only by scope {} (bundle v{version}), and this pod is in scope {}; use your own team's prefix",
                    b.private_registry,
                    matching[0].path,
                    names.join(", "),
                    self.scope_name()
                ),
            );
        }
        let fp = in_scope
            .iter()
            .find(|fp| !fp.require_digest)
            .unwrap_or(&in_scope[0]);
        let matched = Matched {
            source: format!("{}/{}", b.private_registry, fp.path).into(),
            scope: fp.scope_path.clone(),
            first_party: true,
        };
        match r.digest() {
            Some(d) => Outcome::Allow {
                reason: ReasonCode::FirstParty,
                pull_ref: r.with_digest_only(d.clone()).to_string(),
                digest: Some(d.clone()),
                matched,
                extra: Box::default(),
            },
            None if !fp.require_digest => Outcome::Allow {
                reason: ReasonCode::FirstParty,
                pull_ref: r.to_string(),
                digest: None,
                matched,
                extra: Box::default(),
            },
            None => Outcome::deny(
                ReasonCode::TagNotApproved,
                format!(
                    "image {r} denied: first-party prefix {}/{} requires a digest-pinned reference (bundle v{version}); use {}@sha256:<digest>",
                    b.private_registry,
                    fp.path,
                    r.name()
                ),
            ),
        }
    }

    fn finish(&self, image: &str, r: Option<&Reference>, outcome: Outcome) -> Decision {
        let b = self.b;
        let pod_scope = Some(b.scopes().path(self.pod_scope).clone());
        let normalized = r.map(Reference::to_string);
        match outcome {
            Outcome::Allow {
                reason,
                pull_ref,
                digest,
                matched,
                extra,
            } => {
                let image_name = normalized.as_deref().unwrap_or(image);
                let message = match &extra.note {
                    Some(note) if reason == ReasonCode::Exception => format!(
                        "image {image_name} allowed {note} (bundle v{}); pulling {pull_ref}",
                        b.version
                    ),
                    Some(note) => format!(
                        "image {image_name} allowed but {note}: approved for scope {} (matched {} in bundle v{}); pulling {pull_ref}",
                        matched.scope, matched.source, b.version
                    ),
                    None => format!(
                        "image {image_name} allowed: approved for scope {} (matched {} in bundle v{}); pulling {pull_ref}",
                        matched.scope, matched.source, b.version
                    ),
                };
                Decision {
                    verdict: Verdict::Allow,
                    reason,
                    message,
                    image: image.to_owned(),
                    normalized,
                    pull_ref: Some(pull_ref),
                    digest,
                    bundle_version: Some(b.version),
                    matched: Some(matched),
                    pod_scope,
                    lifecycle: extra.lifecycle,
                    exception: extra.exception,
                    valid_until: extra.valid_until,
                }
            }
            Outcome::Deny {
                reason,
                message,
                extra,
            } => {
                let extra = extra.map(|e| *e).unwrap_or_default();
                let warn = self.mode == Mode::Warn;
                let message = if warn {
                    format!(
                        "WARNING, allowed because scope {} is in warn mode: {message}",
                        self.scope_name()
                    )
                } else {
                    message
                };
                Decision {
                    verdict: if warn { Verdict::Warn } else { Verdict::Deny },
                    reason,
                    message,
                    image: image.to_owned(),
                    pull_ref: if warn { normalized.clone() } else { None },
                    digest: if warn {
                        r.and_then(|r| r.digest().cloned())
                    } else {
                        None
                    },
                    normalized,
                    bundle_version: Some(b.version),
                    matched: None,
                    pod_scope,
                    lifecycle: extra.lifecycle,
                    exception: extra.exception,
                    valid_until: None,
                }
            }
        }
    }

    fn present(&self, image: &str, repo_digests: &[String]) -> (Option<Reference>, Outcome) {
        // The best outcome over the image's repo digests (an image can be approved under one name and
        // deprecated, or only excepted, under another).
        let mut best: Option<(Reference, Outcome)> = None;
        for rd in repo_digests {
            let Ok(r) = Reference::parse(rd) else {
                continue;
            };
            if r.digest().is_none() {
                continue;
            }
            let o = self.evaluate(&r);
            if o.rank() == 0 && matches!(o, Outcome::Allow { .. }) {
                return (Some(r), o);
            }
            if best.as_ref().is_none_or(|(_, b)| o.rank() < b.rank()) {
                best = Some((r, o));
            }
        }
        if let Some((r, o)) = best {
            return (Some(r), o);
        }
        // No usable repo digest. The image's name is not evidence of its content (anyone with access
        // to the image store can name anything anything), so there is nothing to approve.
        let o = Outcome::deny(
            ReasonCode::DigestNotApproved,
            format!(
                "image {image} denied: the node's image store has no verifiable repo digest for it, so it cannot be matched to an approved digest (bundle v{}); pull it through pullgate first",
                self.b.version
            ),
        );
        (None, o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testutil::*;

    fn pod(ns: Option<&str>, app: Option<&str>) -> PodContext {
        let mut labels = BTreeMap::new();
        if let Some(a) = app {
            labels.insert("corp.example/application".to_owned(), a.to_owned());
        }
        PodContext {
            namespace: ns.map(str::to_owned),
            name: Some("p".into()),
            uid: None,
            labels,
        }
    }

    fn d(n: u8) -> String {
        digest(n).to_string()
    }

    #[test]
    fn an_image_approved_for_one_scope_is_approved_for_some_scope() {
        let b = example_bundle();
        let any = |image: &str| {
            decide_for_any_scope(&ImageRequest::Reference(image), &b, example_now())
                .map(|d| (d.reason, d.pod_scope.map(|s| s.to_string())))
        };
        // A first-party prefix of one program, and a digest approved for one application only:
        // denied to a pod of no namespace, approved for the scope that has them.
        let api = format!("registry.corp/apps/payments/api@{}", d(10));
        let redis = format!("redis@{}", d(5));
        for image in [&api, &redis] {
            let org = decide(
                &ImageRequest::Reference(image),
                &b,
                &PodContext::default(),
                example_now(),
            );
            assert_eq!(
                org.reason,
                ReasonCode::OutOfScope,
                "{image}: {}",
                org.message
            );
        }
        let (reason, scope) = any(&api).expect("approved for corp/payments");
        assert_eq!(reason, ReasonCode::FirstParty);
        assert!(scope.unwrap().starts_with("corp/payments"));
        let (reason, scope) = any(&redis).expect("approved for an application");
        assert_eq!(reason, ReasonCode::Approved);
        assert_eq!(scope.as_deref(), Some("corp/payments/checkout/web"));
        // Present images are judged by their repo digests the same way.
        let present = decide_for_any_scope(
            &ImageRequest::RepoDigests {
                image: "registry.corp/apps/payments/api:1.0",
                repo_digests: std::slice::from_ref(&api),
            },
            &b,
            example_now(),
        );
        assert!(present.is_some());
        // Approved for no scope: none.
        assert_eq!(
            any("registry.corp/apps/payments/api:1.0"),
            None,
            "digest required"
        );
        assert_eq!(any(&format!("registry.corp/apps/other@{}", d(10))), None);
        assert_eq!(any(&format!("redis@{}", d(99))), None);
    }

    #[test]
    fn decision_table() {
        let b = example_bundle();
        let mirror = |path: &str, n: u8| format!("registry.corp/{path}@{}", d(n));
        let checkout = pod(Some("checkout"), None);
        let web = pod(Some("checkout"), Some("web"));
        let worker = pod(Some("checkout"), Some("worker"));
        let search = pod(Some("search-index"), None);
        let search_web = pod(Some("search-index"), Some("web"));
        let ledger = pod(Some("ledger"), None);
        let nobody = PodContext::default();
        use ReasonCode::*;
        use Verdict::*;
        let cases: Vec<(String, &PodContext, Verdict, ReasonCode, Option<String>)> = vec![
            (
                "nginx:1.25".into(),
                &checkout,
                Allow,
                Approved,
                Some(mirror("approved/library/nginx", 1)),
            ),
            (
                "nginx:1.25".into(),
                &search,
                Allow,
                Approved,
                Some(mirror("approved/library/nginx", 1)),
            ),
            (
                "docker.io/library/nginx:1.26".into(),
                &checkout,
                Allow,
                Approved,
                Some(mirror("approved/library/nginx", 2)),
            ),
            (
                "index.docker.io/nginx:1.26".into(),
                &search,
                Deny,
                OutOfScope,
                None,
            ),
            ("nginx:1.27".into(), &checkout, Deny, TagNotApproved, None),
            ("nginx".into(), &checkout, Deny, TagNotApproved, None),
            (
                format!("nginx@{}", d(1)),
                &nobody,
                Allow,
                Approved,
                Some(mirror("approved/library/nginx", 1)),
            ),
            (format!("nginx@{}", d(2)), &nobody, Deny, OutOfScope, None),
            (
                format!("nginx@{}", d(9)),
                &checkout,
                Deny,
                DigestNotApproved,
                None,
            ),
            (
                format!("nginx:1.25@{}", d(2)),
                &checkout,
                Deny,
                DigestNotApproved,
                None,
            ),
            (
                format!("nginx:unknown@{}", d(1)),
                &checkout,
                Allow,
                Approved,
                Some(mirror("approved/library/nginx", 1)),
            ),
            (
                "registry.corp/approved/library/nginx:1.25".into(),
                &checkout,
                Allow,
                Approved,
                Some(mirror("approved/library/nginx", 1)),
            ),
            (
                format!("registry.corp/approved/library/nginx@{}", d(2)),
                &checkout,
                Allow,
                Approved,
                Some(mirror("approved/library/nginx", 2)),
            ),
            (
                format!("registry.corp/approved/library/nginx@{}", d(2)),
                &search,
                Deny,
                OutOfScope,
                None,
            ),
            (
                "registry.corp/approvedx/library/nginx:1.25".into(),
                &checkout,
                Deny,
                NotInBundle,
                None,
            ),
            (
                "registry.corp/approved/library/nginx-evil:1.25".into(),
                &checkout,
                Deny,
                NotInBundle,
                None,
            ),
            ("nginx-evil:1.25".into(), &checkout, Deny, NotInBundle, None),
            (
                "library/nginx/evil:1.25".into(),
                &checkout,
                Deny,
                NotInBundle,
                None,
            ),
            (
                "quay.io/nginx/nginx:1.25".into(),
                &checkout,
                Deny,
                PublicRegistryBlocked,
                None,
            ),
            (
                "registry.k8s.io.evil.com/pause:3.9".into(),
                &nobody,
                Deny,
                PublicRegistryBlocked,
                None,
            ),
            (
                "registry.corp.evil.com/approved/library/nginx:1.25".into(),
                &checkout,
                Deny,
                PublicRegistryBlocked,
                None,
            ),
            (
                "registry.corpx/approved/library/nginx:1.25".into(),
                &checkout,
                Deny,
                PublicRegistryBlocked,
                None,
            ),
            (
                "registry.corp:5000/approved/library/nginx:1.25".into(),
                &checkout,
                Deny,
                PublicRegistryBlocked,
                None,
            ),
            (
                "registry.k8s.io/pause:3.9".into(),
                &nobody,
                Allow,
                Approved,
                Some(mirror("approved-k8s/pause", 3)),
            ),
            (
                "ghcr.io/acme/tool:v1".into(),
                &search,
                Allow,
                Approved,
                Some(mirror("approved-ghcr/tool", 6)),
            ),
            (
                "registry.corp/approved-ghcr/tool:v1".into(),
                &search,
                Allow,
                Approved,
                Some(mirror("approved-ghcr/tool", 6)),
            ),
            (
                "ghcr.io/acme/tool:v1".into(),
                &checkout,
                Deny,
                OutOfScope,
                None,
            ),
            (
                "ghcr.io/acmex/tool:v1".into(),
                &search,
                Deny,
                PublicRegistryBlocked,
                None,
            ),
            (
                "ghcr.io/other/tool:v1".into(),
                &search,
                Deny,
                PublicRegistryBlocked,
                None,
            ),
            ("redis:7.2".into(), &checkout, Deny, OutOfScope, None),
            (
                "redis:7.2".into(),
                &web,
                Allow,
                Approved,
                Some(mirror("approved/library/redis", 4)),
            ),
            (
                format!("redis@{}", d(5)),
                &web,
                Allow,
                Approved,
                Some(mirror("approved/library/redis", 5)),
            ),
            ("redis:7.2".into(), &worker, Deny, OutOfScope, None),
            ("redis:7.2".into(), &search_web, Deny, OutOfScope, None),
            (
                format!("busybox@{}", d(8)),
                &nobody,
                Allow,
                Approved,
                Some(mirror("approved/library/busybox", 8)),
            ),
            ("busybox".into(), &nobody, Deny, TagNotApproved, None),
            (
                format!("registry.corp/apps/payments/api@{}", d(10)),
                &checkout,
                Allow,
                FirstParty,
                Some(format!("registry.corp/apps/payments/api@{}", d(10))),
            ),
            (
                "registry.corp/apps/payments/api:1.0".into(),
                &checkout,
                Deny,
                TagNotApproved,
                None,
            ),
            (
                format!("registry.corp/apps/payments/api@{}", d(10)),
                &search,
                Deny,
                OutOfScope,
                None,
            ),
            (
                "registry.corp/apps/shared/tool:2".into(),
                &search,
                Allow,
                FirstParty,
                Some("registry.corp/apps/shared/tool:2".into()),
            ),
            (
                format!("registry.corp/apps/payments-evil/api@{}", d(10)),
                &checkout,
                Deny,
                NotInBundle,
                None,
            ),
            (
                "registry.corp/apps/other:1".into(),
                &checkout,
                Deny,
                NotInBundle,
                None,
            ),
            ("NGINX:1.25".into(), &checkout, Deny, InvalidReference, None),
            (
                "nginx:1.27".into(),
                &ledger,
                Warn,
                TagNotApproved,
                Some("docker.io/library/nginx:1.27".into()),
            ),
            (
                "nginx:1.25".into(),
                &ledger,
                Allow,
                Approved,
                Some(mirror("approved/library/nginx", 1)),
            ),
        ];
        for (image, pod, verdict, reason, pull) in cases {
            let got = decide(&ImageRequest::Reference(&image), &b, pod, example_now());
            assert_eq!(
                (got.verdict, got.reason),
                (verdict, reason),
                "{image} for {:?}: {}",
                pod.namespace,
                got.message
            );
            assert_eq!(got.pull_ref, pull, "{image}: {}", got.message);
            assert_eq!(got.bundle_version, Some(42));
            assert!(got.message.contains("v42"), "{}", got.message);
            assert_eq!(got.is_allowed(), verdict != Deny);
            if verdict == Allow {
                assert!(got.matched.is_some());
            }
        }
    }

    #[test]
    fn messages_explain_what_to_do() {
        let b = example_bundle();
        let checkout = pod(Some("checkout"), None);
        let m = decide(
            &ImageRequest::Reference("nginx:1.27"),
            &b,
            &checkout,
            example_now(),
        );
        assert!(
            m.message.contains("docker.io/library/nginx:1.27"),
            "{}",
            m.message
        );
        assert!(m.message.contains("tags 1.25, 1.26"), "{}", m.message);
        let m = decide(
            &ImageRequest::Reference("busybox"),
            &b,
            &checkout,
            example_now(),
        );
        assert!(m.message.contains("1 pinned digest"), "{}", m.message);
        let m = decide(
            &ImageRequest::Reference("redis:7.2"),
            &b,
            &checkout,
            example_now(),
        );
        assert!(
            m.message.contains("corp/payments/checkout/web"),
            "{}",
            m.message
        );
        assert!(
            m.message.contains("scope corp/payments/checkout"),
            "{}",
            m.message
        );
        let m = decide(
            &ImageRequest::Reference("quay.io/x/y:1"),
            &b,
            &checkout,
            example_now(),
        );
        assert!(
            m.message.contains("registry.corp") && m.message.contains("docker.io"),
            "{}",
            m.message
        );
        let m = decide(
            &ImageRequest::Reference("nginx:1.27"),
            &b,
            &pod(Some("ledger"), None),
            example_now(),
        );
        assert!(m.message.starts_with("WARNING"), "{}", m.message);
        let j = m.to_json();
        assert_eq!(j["decision"], "warn");
        assert_eq!(j["reason"], "tag_not_approved");
        assert_eq!(j["bundle_version"], 42);
        assert_eq!(j["normalized"], "docker.io/library/nginx:1.27");
    }

    #[test]
    fn repo_digests_of_present_images() {
        let b = example_bundle();
        let checkout = pod(Some("checkout"), None);
        let decide_rd = |rds: &[String]| {
            decide(
                &ImageRequest::RepoDigests {
                    image: "sha256:feed",
                    repo_digests: rds,
                },
                &b,
                &checkout,
                example_now(),
            )
        };
        let ok = decide_rd(&[format!("registry.corp/approved/library/busybox@{}", d(8))]);
        assert_eq!(
            (ok.verdict, ok.digest.clone()),
            (Verdict::Allow, Some(digest(8))),
            "{}",
            ok.message
        );
        assert_eq!(ok.image, "sha256:feed");
        let second = decide_rd(&[
            format!("docker.io/library/nginx@{}", d(9)),
            format!("registry.corp/approved/library/nginx@{}", d(2)),
        ]);
        assert_eq!(second.verdict, Verdict::Allow, "{}", second.message);
        let bad = decide_rd(&[format!("docker.io/library/nginx@{}", d(9))]);
        assert_eq!(bad.reason, ReasonCode::DigestNotApproved);
        let none = decide_rd(&[]);
        assert_eq!(
            (none.verdict, none.reason),
            (Verdict::Deny, ReasonCode::DigestNotApproved)
        );
        let blocked = decide_rd(&[format!("quay.io/x/y@{}", d(1))]);
        assert_eq!(blocked.reason, ReasonCode::PublicRegistryBlocked);
        // Without repo digests, even an approved digest-pinned *name* approves nothing: a present
        // image's name is not evidence of its content.
        let named = decide(
            &ImageRequest::RepoDigests {
                image: &format!("registry.corp/approved/library/busybox@{}", d(8)),
                repo_digests: &[],
            },
            &b,
            &checkout,
            example_now(),
        );
        assert_eq!(
            (named.verdict, named.reason),
            (Verdict::Deny, ReasonCode::DigestNotApproved)
        );
    }

    #[test]
    fn no_bundle_denies_everything() {
        let d = decide_without_bundle(&ImageRequest::Reference("nginx:1.25"), None);
        assert_eq!(
            (d.verdict, d.reason),
            (Verdict::Deny, ReasonCode::NoValidBundle)
        );
        assert!(d.message.contains("nginx:1.25"));
        let d = decide_without_bundle(&ImageRequest::Reference("x"), Some("bundle expired"));
        assert!(d.message.contains("bundle expired"));
        assert_eq!(d.to_json()["reason"], "no_valid_bundle");
    }

    mod format_2 {
        use super::*;
        use serde_json::json;
        use time::macros::datetime;

        fn at(b: &VerifiedBundle, image: &str, pod: &PodContext, now: OffsetDateTime) -> Decision {
            decide(&ImageRequest::Reference(image), b, pod, now)
        }

        fn code(d: &Decision) -> (Verdict, ReasonCode) {
            (d.verdict, d.reason)
        }

        #[test]
        fn lifecycle_over_time() {
            let b = v2_bundle_with(|_| {});
            let checkout = pod(Some("checkout"), None);
            let before = at(&b, "nginx:1.25", &checkout, v2_now());
            assert_eq!(
                code(&before),
                (Verdict::Allow, ReasonCode::Approved),
                "{}",
                before.message
            );
            let l = before
                .lifecycle
                .as_ref()
                .expect("the lifecycle is reported before it bites");
            assert_eq!(l.state, LifecycleState::Active);
            assert_eq!(before.valid_until, Some(datetime!(2026-04-01 00:00 UTC)));
            // Just before and at deprecated_at.
            let d = at(
                &b,
                "nginx:1.25",
                &checkout,
                datetime!(2026-03-31 23:59:59 UTC),
            );
            assert_eq!(d.reason, ReasonCode::Approved);
            let d = at(&b, "nginx:1.25", &checkout, datetime!(2026-04-01 00:00 UTC));
            assert_eq!(
                code(&d),
                (Verdict::Allow, ReasonCode::Deprecated),
                "{}",
                d.message
            );
            assert!(
                d.message.contains("docker.io/library/nginx:1.26"),
                "{}",
                d.message
            );
            assert!(d.message.contains("2026-06-01T00:00:00Z"), "{}", d.message);
            assert_eq!(
                d.pull_ref.as_deref(),
                Some(format!("registry.corp/approved/library/nginx@{}", super::d(1)).as_str())
            );
            assert_eq!(d.valid_until, Some(datetime!(2026-06-01 00:00 UTC)));
            // At sunset_at: denied, naming the replacement and the date, by tag and by digest.
            for image in ["nginx:1.25".to_string(), format!("nginx@{}", super::d(1))] {
                let d = at(&b, &image, &checkout, datetime!(2026-06-01 00:00 UTC));
                assert_eq!(
                    code(&d),
                    (Verdict::Deny, ReasonCode::Sunset),
                    "{image}: {}",
                    d.message
                );
                assert!(
                    d.message.contains("nginx:1.26") && d.message.contains("2026-06-01T00:00:00Z"),
                    "{}",
                    d.message
                );
                assert_eq!(d.lifecycle.as_ref().unwrap().state, LifecycleState::Sunset);
            }
            // 1.26 has no lifecycle and is unaffected.
            let d = at(&b, "nginx:1.26", &checkout, datetime!(2026-07-01 00:00 UTC));
            assert_eq!(code(&d), (Verdict::Allow, ReasonCode::Approved));
            assert!(d.lifecycle.is_none() && d.valid_until.is_none());
            // A bare digest with only a sunset.
            let web = pod(Some("checkout"), Some("web"));
            let redis5 = format!("redis@{}", super::d(5));
            assert_eq!(
                at(&b, &redis5, &web, datetime!(2026-04-30 23:00 UTC)).reason,
                ReasonCode::Approved
            );
            let d = at(&b, &redis5, &web, datetime!(2026-05-01 00:00 UTC));
            assert_eq!(code(&d), (Verdict::Deny, ReasonCode::Sunset));
            assert!(
                d.message.contains("docker.io/library/redis:7.2"),
                "{}",
                d.message
            );
            // JSON keeps its keys and adds lifecycle.
            let j = at(&b, "nginx:1.25", &checkout, datetime!(2026-04-02 00:00 UTC)).to_json();
            assert_eq!(j["reason"], "deprecated");
            assert_eq!(j["lifecycle"]["state"], "deprecated");
            assert_eq!(j["lifecycle"]["replacement"], "1.26");
            assert_eq!(j["lifecycle"]["sunset_at"], "2026-06-01T00:00:00Z");
            assert!(j.get("exception").is_none());
            for key in [
                "decision",
                "message",
                "image",
                "normalized",
                "pull_ref",
                "digest",
                "bundle_version",
                "matched",
                "pod_scope",
            ] {
                assert!(j.get(key).is_some(), "{key}");
            }
        }

        #[test]
        fn the_best_route_to_the_same_content_counts() {
            // 1.25.3 is the same content as the retiring 1.25: still approved by digest and by 1.25.3.
            let b = v2_bundle_with(|v| {
                v["images"][0]["tags"]["1.25.3"] = json!(digest(1).to_string());
            });
            let checkout = pod(Some("checkout"), None);
            let late = datetime!(2026-07-01 00:00 UTC);
            assert_eq!(
                at(&b, "nginx:1.25", &checkout, late).reason,
                ReasonCode::Sunset
            );
            assert_eq!(
                at(&b, "nginx:1.25.3", &checkout, late).reason,
                ReasonCode::Approved
            );
            let by_digest = at(&b, &format!("nginx@{}", super::d(1)), &checkout, late);
            assert_eq!(
                by_digest.reason,
                ReasonCode::Approved,
                "{}",
                by_digest.message
            );
            let started = decide(
                &ImageRequest::RepoDigests {
                    image: "sha256:feed",
                    repo_digests: &[format!(
                        "registry.corp/approved/library/nginx@{}",
                        super::d(1)
                    )],
                },
                &b,
                &checkout,
                late,
            );
            assert_eq!(started.reason, ReasonCode::Approved, "{}", started.message);
        }

        #[test]
        fn rules_of_the_pods_scope_apply() {
            let b = v2_bundle_with(|_| {});
            let (corp, checkout, web, ledger) = (
                PodContext::default(),
                pod(Some("checkout"), None),
                pod(Some("checkout"), Some("web")),
                pod(Some("ledger"), None),
            );
            let now = v2_now();
            let busybox = format!("busybox@{}", super::d(8));
            assert_eq!(
                code(&at(&b, &busybox, &corp, now)),
                (Verdict::Allow, ReasonCode::Approved)
            );
            // The project denies GPL-2.0-only, which the organisation allows; its applications too.
            for p in [&checkout, &web] {
                let d = at(&b, &busybox, p, now);
                assert_eq!(
                    code(&d),
                    (Verdict::Deny, ReasonCode::LicenseNotAllowed),
                    "{}",
                    d.message
                );
                assert!(
                    d.message.contains("GPL-2.0-only")
                        && d.message.contains("corp/payments/checkout"),
                    "{}",
                    d.message
                );
            }
            // The program's max_severity (medium) refuses postgres (trivy: high).
            let d = at(&b, "postgres:16", &checkout, now);
            assert_eq!(
                code(&d),
                (Verdict::Deny, ReasonCode::SeverityExceeded),
                "{}",
                d.message
            );
            for want in ["trivy", "high", "medium", "corp/payments"] {
                assert!(d.message.contains(want), "{want}: {}", d.message);
            }
            // The ledger project needs 3 scanners (and is in warn mode).
            let d = at(&b, "nginx:1.26", &ledger, now);
            assert_eq!(
                code(&d),
                (Verdict::Warn, ReasonCode::InsufficientScans),
                "{}",
                d.message
            );
            assert!(
                d.message.contains("2 distinct scanner(s) (trivy, grype)")
                    && d.message.contains("requires 3"),
                "{}",
                d.message
            );
            // Rules are checked on present images (container starts) too.
            let d = decide(
                &ImageRequest::RepoDigests {
                    image: "busybox",
                    repo_digests: &[format!(
                        "registry.corp/approved/library/busybox@{}",
                        super::d(8)
                    )],
                },
                &b,
                &checkout,
                now,
            );
            assert_eq!(d.reason, ReasonCode::LicenseNotAllowed);
        }

        #[test]
        fn every_rule_at_every_level() {
            // (where the rule is written, the rule, the pod that feels it, one that does not)
            type At = fn(&mut serde_json::Value) -> &mut serde_json::Value;
            let levels: [(&str, At, Option<&str>, Option<&str>); 3] = [
                ("corp", |v| &mut v["governance"], Some("checkout"), None),
                (
                    "corp/payments",
                    |v| &mut v["governance"]["programs"][0],
                    Some("checkout"),
                    Some("search-index"),
                ),
                (
                    "corp/payments/checkout",
                    |v| &mut v["governance"]["programs"][0]["projects"][0],
                    Some("checkout"),
                    Some("search-index"),
                ),
            ];
            let rules = [
                (json!({"min_scanners": 3}), ReasonCode::InsufficientScans),
                (json!({"max_severity": "low"}), ReasonCode::SeverityExceeded),
                (
                    json!({"licenses": {"allow": ["MIT", "Apache-2.0"]}}),
                    ReasonCode::LicenseNotAllowed,
                ),
            ];
            for (level, place, feels, spared) in levels {
                for (rule, reason) in &rules {
                    let b = v2_bundle_with(|v| {
                        let target = place(v);
                        // Keep what the level already says, except the fields written here.
                        let mut merged = target["rules"].as_object().cloned().unwrap_or_default();
                        if let Some(l) = rule.get("licenses") {
                            let mut lic = merged.get("licenses").cloned().unwrap_or(json!({}));
                            lic["allow"] = l["allow"].clone();
                            merged.insert("licenses".into(), lic);
                        } else {
                            for (k, x) in rule.as_object().unwrap() {
                                merged.insert(k.clone(), x.clone());
                            }
                        }
                        target["rules"] = serde_json::Value::Object(merged);
                        // The levels between the one edited and the pod inherit it (the example's
                        // own rules there would otherwise decide first).
                        let program = &mut v["governance"]["programs"][0];
                        if level == "corp" {
                            program.as_object_mut().unwrap().remove("rules");
                        }
                        if level != "corp/payments/checkout" {
                            program["projects"][0]
                                .as_object_mut()
                                .unwrap()
                                .remove("rules");
                        }
                    });
                    // nginx:1.26: trivy medium + grype low, BSD-2-Clause, approved for corp.
                    let d = at(&b, "nginx:1.26", &pod(feels, None), v2_now());
                    assert_eq!(d.reason, *reason, "{level} {rule}: {}", d.message);
                    assert!(d.message.contains(level), "{level}: {}", d.message);
                    let d = at(&b, "nginx:1.26", &pod(feels, Some("web")), v2_now());
                    assert_eq!(d.reason, *reason, "applications inherit: {}", d.message);
                    if let Some(ns) = spared {
                        let d = at(&b, "nginx:1.26", &pod(Some(ns), None), v2_now());
                        assert_eq!(
                            d.reason,
                            ReasonCode::Approved,
                            "{level} {rule} spares {ns}: {}",
                            d.message
                        );
                    }
                }
            }
        }

        #[test]
        fn exceptions_allow_until_they_expire() {
            let b = v2_bundle_with(|_| {});
            let index = pod(Some("search-index"), None);
            // A single-scanned image, allowed only by SEC-1240 until 2026-03-15.
            let d = at(&b, "ghcr.io/acme/tool:v1", &index, v2_now());
            assert_eq!(
                code(&d),
                (Verdict::Allow, ReasonCode::Exception),
                "{}",
                d.message
            );
            assert_eq!(
                d.pull_ref.as_deref(),
                Some(format!("registry.corp/approved-ghcr/tool@{}", super::d(6)).as_str())
            );
            assert!(
                d.message.contains("SEC-1240") && d.message.contains("2026-03-15T00:00:00Z"),
                "{}",
                d.message
            );
            assert_eq!(d.valid_until, Some(datetime!(2026-03-15 00:00 UTC)));
            let j = d.to_json();
            assert_eq!(j["exception"]["ticket"], "SEC-1240");
            assert_eq!(j["exception"]["expired"], false);
            let d = at(
                &b,
                "ghcr.io/acme/tool:v1",
                &index,
                datetime!(2026-03-15 00:00 UTC),
            );
            assert_eq!(
                code(&d),
                (Verdict::Deny, ReasonCode::ExceptionExpired),
                "{}",
                d.message
            );
            assert!(
                d.message.contains("SEC-1240") && d.message.contains("2026-03-15T00:00:00Z"),
                "{}",
                d.message
            );
            assert!(
                d.message.contains("requires 2"),
                "the regular reason is said too: {}",
                d.message
            );
            assert_eq!(d.to_json()["exception"]["expired"], true);
            // Not in images at all: the exception approves the digest and its tag, for its scope only.
            let checkout = pod(Some("checkout"), None);
            for image in [
                "redis:7.4".to_string(),
                format!("redis@{}", super::d(9)),
                format!("registry.corp/approved/library/redis@{}", super::d(9)),
            ] {
                let d = at(&b, &image, &checkout, v2_now());
                assert_eq!(
                    code(&d),
                    (Verdict::Allow, ReasonCode::Exception),
                    "{image}: {}",
                    d.message
                );
                assert_eq!(
                    d.pull_ref.as_deref(),
                    Some(format!("registry.corp/approved/library/redis@{}", super::d(9)).as_str())
                );
            }
            let d = at(
                &b,
                "redis:7.4",
                &pod(Some("checkout"), Some("web")),
                v2_now(),
            );
            assert_eq!(
                d.reason,
                ReasonCode::Exception,
                "below the exception's scope: {}",
                d.message
            );
            let d = at(&b, "redis:7.4", &pod(Some("ledger"), None), v2_now());
            assert_eq!(
                code(&d),
                (Verdict::Warn, ReasonCode::TagNotApproved),
                "{}",
                d.message
            );
            let d = at(&b, "redis:7.4", &pod(Some("search-index"), None), v2_now());
            assert_eq!(
                code(&d),
                (Verdict::Deny, ReasonCode::TagNotApproved),
                "{}",
                d.message
            );
            let d = at(&b, "redis:7.4", &checkout, datetime!(2026-03-21 00:00 UTC));
            assert_eq!(
                code(&d),
                (Verdict::Deny, ReasonCode::ExceptionExpired),
                "{}",
                d.message
            );
            // An exception never opens a public pull from another registry.
            let d = at(
                &b,
                &format!("quay.io/library/redis@{}", super::d(9)),
                &checkout,
                v2_now(),
            );
            assert_eq!(d.verdict, Verdict::Deny);
            assert_eq!(d.reason, ReasonCode::PublicRegistryBlocked);
            // An image that meets the rules is approved, whatever exceptions exist.
            let b = v2_bundle_with(|v| {
                v["exceptions"][1]["digest"] = json!(digest(2).to_string());
                v["exceptions"][1]["scope"] = json!("corp");
            });
            let d = at(&b, "nginx:1.26", &index, v2_now());
            assert_eq!(d.reason, ReasonCode::Approved);
            assert!(d.exception.is_none());
        }

        #[test]
        fn format_1_bundles_have_no_rules() {
            // The format 1 example approves single-scanned images under any licence: still allowed.
            let b = example_bundle();
            let d = decide(
                &ImageRequest::Reference("ghcr.io/acme/tool:v1"),
                &b,
                &pod(Some("search-index"), None),
                datetime!(2026-12-31 00:00 UTC),
            );
            assert_eq!(code(&d), (Verdict::Allow, ReasonCode::Approved));
            assert!(d.lifecycle.is_none() && d.exception.is_none() && d.valid_until.is_none());
        }
    }

    #[test]
    fn reason_codes_are_stable() {
        let all = [
            (ReasonCode::InvalidReference, "invalid_reference"),
            (ReasonCode::NotInBundle, "not_in_bundle"),
            (ReasonCode::TagNotApproved, "tag_not_approved"),
            (ReasonCode::DigestNotApproved, "digest_not_approved"),
            (ReasonCode::OutOfScope, "out_of_scope"),
            (ReasonCode::PublicRegistryBlocked, "public_registry_blocked"),
            (ReasonCode::NoValidBundle, "no_valid_bundle"),
            (ReasonCode::Sunset, "sunset"),
            (ReasonCode::InsufficientScans, "insufficient_scans"),
            (ReasonCode::SeverityExceeded, "severity_exceeded"),
            (ReasonCode::LicenseNotAllowed, "license_not_allowed"),
            (ReasonCode::ExceptionExpired, "exception_expired"),
        ];
        for (code, s) in all {
            assert_eq!(code.as_str(), s);
            assert!(code.is_denial());
        }
        for (code, s) in [
            (ReasonCode::Approved, "approved"),
            (ReasonCode::FirstParty, "first_party"),
            (ReasonCode::Deprecated, "deprecated"),
            (ReasonCode::Exception, "exception"),
        ] {
            assert_eq!(code.as_str(), s);
            assert!(!code.is_denial());
        }
        // Every code is documented.
        let doc = include_str!("../../docs/bundle.md");
        for code in all.iter().map(|(c, _)| c.as_str()).chain([
            "approved",
            "first_party",
            "deprecated",
            "exception",
        ]) {
            assert!(
                doc.contains(&format!("| `{code}` |")),
                "docs/bundle.md lists no {code}"
            );
        }
    }
}
