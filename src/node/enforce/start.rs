//! The container-start check (`CreateContainer`).
//!
//! 1. **The pod.** Its scope comes from containerd's record of the sandbox the request names
//!    (`pod_sandbox_id`, CRI `PodSandboxStatus`, cached per sandbox; most are known before their
//!    first start, see `learn`), never from the `sandbox_config`
//!    the caller sends along: a start in a sandbox containerd does not know is refused
//!    (`sandbox_not_found`), and so is one that names its sandbox by an abbreviation containerd
//!    would resolve (`sandbox_id_abbreviated`: only full IDs are cached, see [`sandbox`]); one whose
//!    `sandbox_config` contradicts the record is refused (`sandbox_mismatch`; logged and allowed
//!    with the recorded pod in node warn mode).
//! 2. **The images.** The container's image and every image volume (`mounts[].image`) are looked up
//!    in containerd — a name through the bundle first ([`names::resolve`]), exactly as `ImageStatus`
//!    does, so `crictl create` with `busybox:1.36` finds the pinned mirror image pullgate pulled —
//!    and only repo digests proven from content count ([`lookup::verified_repo_digests`]). These
//!    lookups run while the sandbox is looked up, so a first start of a pod costs the longer of the
//!    two, not their sum — unless every image is one already allowed for some pod (the usual new pod
//!    of a deployment): then the sandbox comes first, and the cached decision for its scope usually
//!    makes the image lookups unnecessary.
//!    An image already proven needs no lookup at all: containerd answered pullgate's pinned pull of
//!    `repo@digest` with the image's ID, or an earlier start — or pullgate ahead of any start — read
//!    the manifest ([`ContentProofs`]). kubelet asks `ImageStatus` of an image before it starts
//!    it, and pullgate proves the image meanwhile: a start that arrives while that proof runs
//!    waits for it ([`super::learn::Ahead`]). One named by ID along with the pod spec's name
//!    (`user_specified_image`, kubelet's way) is first proven from the manifest that name pins
//!    through the bundle — one `Content.Read`, no `ImageStatus` — and looked up in full when that
//!    read fails or proves nothing, or nothing this pod may run. Every image is decided before any
//!    is recorded, so a lookup that fails leaves no audit record.
//! 3. **The decision**, per image, for the recorded pod; allowed decisions about image IDs are
//!    cached. An image name containerd does not hold is decided as a pull of that name would be, so a
//!    name that was never approved is told so (and an approved one is told to be pulled first).
//! 4. **The pin.** An allowed start is rewritten (wire-level) to the exact image IDs that were checked,
//!    for the container and for every image volume: a name could be re-tagged between this check and
//!    containerd resolving it.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use k8s_cri::v1 as cri;
use prost::Message;
use time::OffsetDateTime;

use super::{Enforcer, Outcome, denial, field, lookup, names, sandbox, undecodable};
use crate::node::config::NodeMode;
use crate::node::proxy::grpc::{Code, Status};
use crate::node::proxy::intercept::{Afterwards, Verdict, methods};
use crate::node::wire;
use crate::policy::{Decision, ImageRequest, PodContext, Verdict as PolicyVerdict, VerifiedBundle};

const METHOD: &str = "CreateContainer";
/// Most allowed start decisions remembered.
const START_CACHE_MAX: usize = 4096;

/// One image a container start would run: the container's own, or an image volume's.
struct Target {
    /// As the request names it (an image ID or a reference).
    image: String,
    /// What containerd is asked for: the pinned mirror reference of an approved name, else `image`.
    lookup: String,
    /// As messages name it.
    shown: String,
    /// The image volume's index in `ContainerConfig.mounts`; `None` for the container's own image.
    mount: Option<usize>,
    /// When `image` is an image ID: the name the user wrote (`user_specified_image`, which kubelet
    /// sends since Kubernetes 1.28). The pinned mirror reference it resolves to through the bundle
    /// names the manifest that most likely describes the image, checked first by a lookup.
    hint: Option<String>,
}

/// What containerd holds under a target's name.
#[derive(Default)]
struct Found {
    /// The image ID; `None` when containerd has no such image.
    id: Option<String>,
    /// Its repo digests that are proven from content.
    verified: Vec<String>,
    /// Proven from part of what containerd holds (the manifest the target's hint pins, or a proof
    /// made ahead of the start): a decision other than allow is made again from a full lookup.
    partial: bool,
}

/// Allowed start decisions about image IDs, by (image ID, bundle version, pod scope). Only allows
/// are cached; a denial is always decided afresh, so an image pulled meanwhile under an approved name
/// is not held back.
#[derive(Default)]
pub(super) struct StartCache(Mutex<CacheInner>);

#[derive(Default)]
struct CacheInner {
    decisions: HashMap<String, Decision>,
    /// `image\0bundle version` of every cached decision: the image was allowed for some scope.
    images: HashSet<String>,
}

impl StartCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, key: &str) -> Option<Decision> {
        self.lock().decisions.get(key).cloned()
    }

    /// Whether `image` was allowed for any pod with bundle `version`.
    fn knows(&self, image: &str, version: u64) -> bool {
        self.lock().images.contains(&format!("{image}\0{version}"))
    }

    fn insert(&self, image: &str, version: u64, key: String, d: Decision) {
        let mut c = self.lock();
        if c.decisions.len() >= START_CACHE_MAX {
            c.decisions.clear();
            c.images.clear();
        }
        c.images.insert(format!("{image}\0{version}"));
        c.decisions.insert(key, d);
    }
}

/// Most images whose content proofs are remembered.
pub(super) const PROOFS_MAX: usize = 4096;
/// Most proven repo digests remembered per image.
const PROOFS_PER_IMAGE: usize = 8;

/// Repo digests proven to describe an image, by image ID. A proof is a fact about content, true for
/// good and whatever bundle is in force: containerd answered the pull of `repo@D`, pinned by
/// pullgate, with image ID `X` (so manifest `D`, or a manifest the index `D` lists, has config `X`),
/// or a start — or pullgate ahead of any start, for the images containerd held when it started,
/// the approved ones that arrive later and those kubelet asks `ImageStatus` about (see `learn`) —
/// read `D` from containerd's content store and found `X` in it
/// ([`lookup::verified_repo_digests`]). A start of `X` is decided from its proofs first, without
/// asking containerd for the image and its manifests again, and only an allow is taken: anything
/// else is decided from what containerd holds, as without them.
#[derive(Default)]
pub(super) struct ContentProofs(Mutex<Proven>);

#[derive(Default)]
struct Proven {
    /// The proven repo digests of each image, by image ID.
    by_image: HashMap<String, Vec<String>>,
    /// Every repo digest proven for some image, kept after the image is forgotten (and all of
    /// them forgotten at once when the set outgrows `by_image`'s bound; a proof noted again puts
    /// its repo digest back): only to spare a read of its manifest again.
    repo_digests: HashSet<String>,
}

impl ContentProofs {
    fn lock(&self) -> std::sync::MutexGuard<'_, Proven> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes that `repo_digest` (`repo@digest`) is proven to describe image `id`.
    pub(super) fn add(&self, id: &str, repo_digest: &str) {
        if !names::is_image_id(id) || !repo_digest.contains('@') {
            return;
        }
        let mut guard = self.lock();
        let proven = &mut *guard;
        if !proven.by_image.contains_key(id) {
            // Forgets one image when full: its next start is looked up (and proven) again.
            super::make_room(&mut proven.by_image, PROOFS_MAX);
        }
        let known = proven.by_image.entry(id.to_string()).or_default();
        if !known.iter().any(|k| k == repo_digest) {
            if known.len() >= PROOFS_PER_IMAGE {
                return;
            }
            known.push(repo_digest.to_string());
        }
        // Also when the pair was known: the set may have been cleared since.
        if !proven.repo_digests.contains(repo_digest) {
            if proven.repo_digests.len() >= PROOFS_MAX * PROOFS_PER_IMAGE {
                proven.repo_digests.clear();
            }
            proven.repo_digests.insert(repo_digest.to_string());
        }
    }

    /// Notes each of `repo_digests` as proven to describe image `id` ([`ContentProofs::add`]).
    pub(super) fn add_all(&self, id: &str, repo_digests: &[String]) {
        for rd in repo_digests {
            self.add(id, rd);
        }
    }

    fn get(&self, id: &str) -> Option<Vec<String>> {
        self.lock().by_image.get(id).cloned()
    }

    pub(super) fn knows(&self, id: &str) -> bool {
        self.lock().by_image.contains_key(id)
    }

    /// Whether `repo_digest` was proven to describe some image (the image may have been forgotten
    /// since).
    pub(super) fn proves(&self, repo_digest: &str) -> bool {
        self.lock().repo_digests.contains(repo_digest)
    }
}

/// Why the pod of a start could not be established.
enum SandboxProblem {
    /// containerd does not know the sandbox (or the request names none).
    Missing,
    /// The request names the sandbox by a prefix of its ID (the full ID).
    Abbreviated(String),
    /// containerd did not answer.
    Unavailable(Status),
}

impl Enforcer {
    pub(super) async fn create_container(&self, msg: &Bytes, after: &mut Afterwards) -> Verdict {
        let started = Instant::now();
        let req = match cri::CreateContainerRequest::decode(&msg[..]) {
            Ok(r) => r,
            Err(e) => return undecodable(methods::CREATE_CONTAINER, e),
        };
        let now = OffsetDateTime::now_utc();
        let bundle = self.state.usable(now).ok();
        let targets = self.targets(req.config.as_ref(), bundle.is_some());
        let shown = &targets[0].shown;
        let sandbox_id = req.pod_sandbox_id.as_str();

        // The pod (unless already known), and meanwhile the images — unless all of them were allowed
        // for some pod already: then the cached decision for this pod's scope likely settles it.
        let mut lookups = std::pin::pin!(self.find_images(&targets));
        let mut found = None;
        let pod = match self.sandboxes.get(sandbox_id) {
            Some(pod) => pod,
            None => {
                let likely_cached = bundle.as_ref().is_some_and(|b| {
                    targets.iter().all(|t| {
                        self.allowed_starts.knows(&t.image, b.version)
                            || self.proofs.knows(&t.image)
                    })
                });
                let pod = if likely_cached {
                    self.recorded_pod(sandbox_id).await
                } else {
                    let (pod, done) =
                        alongside(self.recorded_pod(sandbox_id), lookups.as_mut()).await;
                    found = done;
                    pod
                };
                match pod {
                    Ok(pod) => pod,
                    Err(problem) => {
                        return self.sandbox_refusal(&req, &problem, shown, started);
                    }
                }
            }
        };
        if let Some(refusal) = self.check_claim(&req, &pod, shown, started) {
            return refusal;
        }

        let cached: Vec<Option<Decision>> = targets
            .iter()
            .map(|t| self.cached_start(t, bundle.as_deref(), &pod, now))
            .collect();
        let mut found = if cached.iter().all(Option::is_some) {
            Vec::new()
        } else {
            let looked_up = match found {
                Some(f) => f,
                None => lookups.as_mut().await,
            };
            match looked_up {
                Ok(f) => f,
                Err(status) => return Verdict::Respond(status),
            }
        };

        // Every image is decided before any is recorded: a lookup that fails leaves no record.
        let mut decided = Vec::with_capacity(targets.len());
        for (i, (t, cached)) in targets.iter().zip(cached).enumerate() {
            decided.push(match cached {
                Some(d) => (d, Some(t.image.clone())),
                None => {
                    let mut f = std::mem::take(&mut found[i]);
                    let mut d = self.decide_start(t, &f, &pod, now);
                    if f.partial && d.verdict != PolicyVerdict::Allow {
                        // What was proven from part of what containerd holds (the manifest the
                        // user's name pins, or a proof made ahead) does not allow this start;
                        // what containerd knows of the image decides (its other repo digests may).
                        self.metrics.start_lookup(true);
                        f = match self.find_image_unhinted(t).await {
                            Ok(f) => f,
                            Err(status) => return Verdict::Respond(status),
                        };
                        d = self.decide_start(t, &f, &pod, now);
                    }
                    if let Some(id) = &f.id {
                        self.proofs.add_all(id, &f.verified);
                    }
                    if d.verdict == PolicyVerdict::Allow {
                        self.cache_start(f.id.as_deref(), bundle.as_deref(), &pod, &d);
                    }
                    (d, f.id)
                }
            });
        }
        let mut pins = Vec::with_capacity(targets.len());
        for (t, (d, id)) in targets.iter().zip(decided) {
            self.record(METHOD, &d, &pod, None, started, after);
            if d.verdict == PolicyVerdict::Deny {
                return Verdict::Respond(start_denial(&d, &t.shown));
            }
            if let Some(id) = id.filter(|id| *id != t.image) {
                pins.push((t.mount, id));
            }
        }
        if pins.is_empty() {
            return Verdict::Forward;
        }
        match pin(msg, &pins) {
            Ok(new) => Verdict::Replace(new.into()),
            Err(e) => Verdict::Respond(Status::new(
                Code::InvalidArgument,
                format!("pullgate: CreateContainer: the request message is malformed: {e}"),
            )),
        }
    }

    /// The container's image, then every image volume's; with hints only while the bundle is
    /// usable (otherwise every start is denied, and a hint would only cost a read).
    fn targets(&self, config: Option<&cri::ContainerConfig>, usable: bool) -> Vec<Target> {
        let target = |spec: &cri::ImageSpec, shown: String, mount| {
            let image = spec.image.as_str();
            let hint =
                (usable && names::is_image_id(image) && !spec.user_specified_image.is_empty())
                    .then(|| spec.user_specified_image.clone());
            Target {
                image: image.to_string(),
                lookup: self
                    .resolve(image)
                    .map_or_else(|| image.to_string(), |r| r.pull_ref),
                shown,
                mount,
                hint,
            }
        };
        let none = cri::ImageSpec::default();
        let spec = config.and_then(|c| c.image.as_ref()).unwrap_or(&none);
        let shown = Some(spec.user_specified_image.as_str())
            .filter(|s| !s.is_empty())
            .unwrap_or(&spec.image)
            .to_string();
        let mut out = vec![target(spec, shown, None)];
        for (i, mount) in config.iter().flat_map(|c| c.mounts.iter()).enumerate() {
            if let Some(img) = mount.image.as_ref().filter(|i| !i.image.is_empty()) {
                let shown = format!("{} (image volume at {})", img.image, mount.container_path);
                out.push(target(img, shown, Some(i)));
            }
        }
        out
    }

    /// The pod containerd recorded for sandbox `id`, remembered for the next start in it.
    async fn recorded_pod(&self, id: &str) -> Result<Arc<PodContext>, SandboxProblem> {
        if id.is_empty() {
            return Err(SandboxProblem::Missing);
        }
        self.metrics.start_lookup(false);
        match lookup::pod_sandbox_status(&self.upstream, id).await {
            // containerd resolves unique ID prefixes; a prefix is never cached (nor accepted).
            Ok(Some(status)) if status.id != id => Err(SandboxProblem::Abbreviated(status.id)),
            Ok(Some(status)) => {
                let pod = Arc::new(sandbox::recorded_pod(&status));
                self.sandboxes.insert(id, pod.clone());
                Ok(pod)
            }
            Ok(None) => Err(SandboxProblem::Missing),
            Err(status) => Err(SandboxProblem::Unavailable(status)),
        }
    }

    /// Refuses a start whose pod could not be established; a missing or abbreviated sandbox is
    /// audited (with the pod the request claims).
    fn sandbox_refusal(
        &self,
        req: &cri::CreateContainerRequest,
        problem: &SandboxProblem,
        shown: &str,
        started: Instant,
    ) -> Verdict {
        let id = &req.pod_sandbox_id;
        let (reason, status) = match problem {
            SandboxProblem::Unavailable(s) => {
                tracing::warn!(sandbox = ?id, error = %s.message, "cannot look the pod sandbox up");
                return Verdict::Respond(Status::new(
                    Code::Unavailable,
                    format!(
                        "pullgate: cannot look pod sandbox {id} up before starting container image {shown}: {}",
                        s.message
                    ),
                ));
            }
            SandboxProblem::Missing if id.is_empty() => (
                "sandbox_not_found",
                Status::new(
                    Code::InvalidArgument,
                    format!(
                        "pullgate: container image {shown}: the request names no pod sandbox (pod_sandbox_id is empty); create the pod sandbox first (RunPodSandbox) and name it"
                    ),
                ),
            ),
            SandboxProblem::Missing => (
                "sandbox_not_found",
                Status::new(
                    Code::NotFound,
                    format!(
                        "pullgate: container image {shown}: containerd has no pod sandbox {id:?}; create the pod sandbox first (RunPodSandbox)"
                    ),
                ),
            ),
            SandboxProblem::Abbreviated(full) => (
                "sandbox_id_abbreviated",
                Status::new(
                    Code::InvalidArgument,
                    format!(
                        "pullgate: container image {shown}: pod sandbox {id:?} is an abbreviation of sandbox ID {full}; pullgate accepts full sandbox IDs only (kubelet always sends them), because a prefix can name another sandbox later: name the pod sandbox by its full ID"
                    ),
                ),
            ),
        };
        let claimed = sandbox::claimed_pod(req.sandbox_config.as_ref());
        self.record_refusal(
            PolicyVerdict::Deny,
            reason,
            &status.message,
            shown,
            &claimed,
            started,
        );
        Verdict::Respond(status)
    }

    /// Compares the request's `sandbox_config` with the recorded pod: a contradiction is refused
    /// (node warn mode: reported, and the start goes on with the recorded pod).
    fn check_claim(
        &self,
        req: &cri::CreateContainerRequest,
        pod: &PodContext,
        shown: &str,
        started: Instant,
    ) -> Option<Verdict> {
        let bundle = self.state.current();
        let label = bundle.as_ref().map(|b| b.scopes().application_label());
        let why = sandbox::disagreement(req.sandbox_config.as_ref(), pod, label)?;
        let message = format!(
            "pullgate: container image {shown}: the request's sandbox_config does not match pod sandbox {} as containerd recorded it: it claims {why}. The recorded pod decides; kubelet never sends another one, so check which client made this call (a pod's application label is the one it was created with: recreate the pod to change it)",
            req.pod_sandbox_id
        );
        let warn = self.state.mode() == NodeMode::Warn;
        let verdict = if warn {
            PolicyVerdict::Warn
        } else {
            PolicyVerdict::Deny
        };
        self.record_refusal(verdict, "sandbox_mismatch", &message, shown, pod, started);
        (!warn).then(|| Verdict::Respond(Status::new(Code::PermissionDenied, message)))
    }

    fn record_refusal(
        &self,
        verdict: PolicyVerdict,
        reason: &'static str,
        message: &str,
        image: &str,
        pod: &PodContext,
        started: Instant,
    ) {
        let bundle_version = self.state.current().map(|b| b.version);
        self.write_record(
            METHOD,
            &Outcome {
                verdict,
                reason,
                message,
                image,
                normalized: None,
                digest: None,
                scope: None,
                bundle_version,
            },
            pod,
            None,
            started,
            None,
        );
    }

    /// Looks every target up in containerd, one after the other (a container rarely has image
    /// volumes); the first failure answers the call with `UNAVAILABLE`.
    async fn find_images(&self, targets: &[Target]) -> Result<Vec<Found>, Status> {
        let mut out = Vec::with_capacity(targets.len());
        for t in targets {
            out.push(self.find_image(t).await?);
        }
        Ok(out)
    }

    /// A target whose proof kubelet's `ImageStatus` started is found from that proof when it
    /// proved something ([`super::learn::Ahead`]). Otherwise a target named by image ID with a
    /// hint is proven from the hint's manifest alone when that manifest describes it
    /// ([`Enforcer::proven_by_hint`]); otherwise, and for every other target, it is looked up in
    /// full ([`Enforcer::find_image_unhinted`]).
    async fn find_image(&self, t: &Target) -> Result<Found, Status> {
        // A proof of the image that kubelet's `ImageStatus` started: its result, not a read of
        // the same manifests beside it.
        if self.ahead.settled(&t.image).await {
            if let Some(verified) = self.proofs.get(&t.image) {
                return Ok(Found {
                    id: Some(t.image.clone()),
                    verified,
                    partial: true,
                });
            }
        }
        self.metrics.start_lookup(true);
        match self.proven_by_hint(t).await {
            Some(found) => Ok(found),
            None => self.find_image_unhinted(t).await,
        }
    }

    /// The target's image proven from the manifest its hint pins through the bundle (one
    /// `Content.Read`, and usually one more for an index: its child for the node's platform);
    /// `None` when there is no such hint, or the manifest does not describe the image or cannot be
    /// read (the hint is optional: the full lookup decides, and reports containerd's failures).
    async fn proven_by_hint(&self, t: &Target) -> Option<Found> {
        let pinned = self.resolve(t.hint.as_deref()?)?.pull_ref;
        let (_, digest) = pinned.rsplit_once('@')?;
        match lookup::content_describes(&self.upstream, digest, &t.image).await {
            Ok(true) => {
                tracing::debug!(image_id = %t.image, repo_digest = %pinned, "proved a start's image from the manifest its name pins");
                Some(Found {
                    id: Some(t.image.clone()),
                    verified: vec![pinned],
                    partial: true,
                })
            }
            Ok(false) => None,
            Err(e) => {
                tracing::debug!(image_id = %t.image, repo_digest = %pinned, error = %e.message, "could not read the manifest a start's name pins");
                None
            }
        }
    }

    /// What containerd holds under the target's name (`ImageStatus`) and which of its repo digests
    /// its content proves.
    async fn find_image_unhinted(&self, t: &Target) -> Result<Found, Status> {
        let unavailable = |status: Status| unavailable(t, status);
        let Some(img) = lookup::image_status(&self.upstream, &t.lookup)
            .await
            .map_err(unavailable)?
        else {
            return Ok(Found::default());
        };
        let verified = lookup::verified_repo_digests(&self.upstream, &img.id, img.repo_digests)
            .await
            .map_err(unavailable)?;
        Ok(Found {
            id: Some(img.id),
            verified,
            partial: false,
        })
    }

    /// The decision for one image of a start, from what containerd holds.
    fn decide_start(
        &self,
        t: &Target,
        found: &Found,
        pod: &PodContext,
        now: OffsetDateTime,
    ) -> Decision {
        if found.id.is_none() && !names::is_image_id(&t.image) {
            // containerd holds nothing under this name: say what a pull of it would be told, unless
            // the name is approved (then the image just has not been pulled yet).
            let by_name = self
                .state
                .decide(&ImageRequest::Reference(&t.image), pod, now);
            if by_name.verdict != PolicyVerdict::Allow {
                return by_name;
            }
        }
        self.state.decide(
            &ImageRequest::RepoDigests {
                image: &t.shown,
                repo_digests: &found.verified,
            },
            pod,
            now,
        )
    }

    /// A cached allow for a target named by image ID, for this pod's scope and this bundle, or one
    /// decided from what is proven of the image's content ([`ContentProofs`]). Only an image ID names
    /// immutable content (its config fixes every layer), so only decisions about IDs are cached; a
    /// name can be re-tagged to other content at any time. The cache is consulted only while the
    /// bundle is usable, so an expired bundle fails closed here too, and only until the decision's
    /// own `valid_until`.
    fn cached_start(
        &self,
        t: &Target,
        bundle: Option<&VerifiedBundle>,
        pod: &PodContext,
        now: OffsetDateTime,
    ) -> Option<Decision> {
        let bundle = bundle.filter(|_| names::is_image_id(&t.image))?;
        let cached = self
            .allowed_starts
            .get(&start_key(&t.image, bundle, pod))
            // An allow that only held until a time (an exception, a sunset) is decided afresh
            // after it.
            .filter(|d| d.valid_until.is_none_or(|until| now < until));
        if let Some(mut d) = cached {
            d.image.clone_from(&t.shown);
            return Some(d);
        }
        let proven = self.proofs.get(&t.image)?;
        let d = self.state.decide(
            &ImageRequest::RepoDigests {
                image: &t.shown,
                repo_digests: &proven,
            },
            pod,
            now,
        );
        if d.verdict != PolicyVerdict::Allow {
            return None;
        }
        self.cache_start(Some(&t.image), Some(bundle), pod, &d);
        Some(d)
    }

    fn cache_start(
        &self,
        id: Option<&str>,
        bundle: Option<&VerifiedBundle>,
        pod: &PodContext,
        d: &Decision,
    ) {
        let (Some(id), Some(bundle)) = (id, bundle) else {
            return;
        };
        self.allowed_starts
            .insert(id, bundle.version, start_key(id, bundle, pod), d.clone());
    }
}

/// containerd failed a lookup of target `t`: the start is answered `UNAVAILABLE`.
fn unavailable(t: &Target, status: Status) -> Status {
    tracing::warn!(image = ?t.lookup, error = %status.message, "cannot look the container's image up");
    Status::new(
        Code::Unavailable,
        format!(
            "pullgate: cannot check image {} before starting the container: {}",
            t.shown, status.message
        ),
    )
}

/// Runs `main` to completion while also driving `side`; returns `main`'s output, and `side`'s if it
/// finished meanwhile (otherwise `side` may be awaited later, or dropped to cancel it).
async fn alongside<A, F: Future>(
    main: impl Future<Output = A>,
    mut side: Pin<&mut F>,
) -> (A, Option<F::Output>) {
    let mut main = std::pin::pin!(main);
    let mut side_out = None;
    loop {
        tokio::select! {
            a = &mut main => return (a, side_out),
            b = side.as_mut(), if side_out.is_none() => side_out = Some(b),
        }
    }
}

/// The start cache's key: what an allowed start decision depends on — the image ID, the bundle and
/// the pod's scope in it (not the pod's other labels, which vary per pod).
fn start_key(image: &str, bundle: &VerifiedBundle, pod: &PodContext) -> String {
    let scope = bundle.scopes().pod_scope(pod.namespace.as_deref(), |k| {
        pod.labels.get(k).map(String::as_str)
    });
    format!("{image}\0{}\0{scope}", bundle.version)
}

/// A container-start denial that names the image as the pod spec does.
fn start_denial(d: &Decision, shown: &str) -> Status {
    let mut status = denial(d);
    if !status.message.contains(shown) {
        status.message = format!("container image {shown}: {}", status.message);
    }
    status
}

/// Rewrites the checked images of a start to their image IDs: the container's own
/// (`config.image.image`) and image volumes' (`config.mounts[i].image.image`, `i` counted across
/// every occurrence of `config`, as a protobuf parser merges them). Every other byte is kept.
fn pin(msg: &[u8], pins: &[(Option<usize>, String)]) -> Result<Vec<u8>, wire::WireError> {
    let mut out = msg.to_vec();
    if let Some((_, id)) = pins.iter().find(|(m, _)| m.is_none()) {
        out = wire::set_string(&out, field::CREATE_IMAGE, id.as_bytes())?;
    }
    if pins.iter().all(|(m, _)| m.is_none()) {
        return Ok(out);
    }
    let mut index = 0;
    wire::map_repeated(&out, field::CREATE_CONFIG, |config| {
        let edited = wire::map_repeated(config, field::MOUNTS, |mount| {
            let i = index;
            index += 1;
            match pins.iter().find(|(m, _)| *m == Some(i)) {
                Some((_, id)) => {
                    wire::set_string(mount, field::MOUNT_IMAGE, id.as_bytes()).map(Some)
                }
                None => Ok(None),
            }
        })?;
        Ok((edited != config).then_some(edited))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_are_bounded_and_a_full_store_forgets_one_image_at_a_time() {
        let proofs = ContentProofs::default();
        let id = |i: usize| format!("sha256:{i:064x}");
        let rd = |i: usize| format!("registry.corp/app@sha256:{i:064x}");
        for i in 0..PROOFS_MAX + 10 {
            proofs.add(&id(i), &rd(i));
        }
        assert_eq!(proofs.lock().by_image.len(), PROOFS_MAX);
        let last = PROOFS_MAX + 9;
        assert_eq!(proofs.get(&id(last)), Some(vec![rd(last)]));
        // More proofs of a known image never make room, and each image keeps at most a few.
        for j in 0..PROOFS_PER_IMAGE + 2 {
            proofs.add(&id(last), &rd(100_000 + j));
        }
        assert_eq!(proofs.lock().by_image.len(), PROOFS_MAX);
        assert_eq!(proofs.get(&id(last)).unwrap().len(), PROOFS_PER_IMAGE);
        // Not an image ID, or not a repo digest: nothing is kept.
        proofs.add("busybox:1.36", &rd(1));
        proofs.add(&id(1), "registry.corp/app:1.0");
        assert!(!proofs.knows("busybox:1.36"));
        assert!(proofs.proves(&rd(last)) && !proofs.proves("registry.corp/app:1.0"));
        // A proof noted again is proven again, after the set of repo digests was cleared.
        proofs.lock().repo_digests.clear();
        proofs.add(&id(last), &rd(last));
        assert!(proofs.proves(&rd(last)));
        assert!(proofs.lock().repo_digests.len() <= PROOFS_MAX * PROOFS_PER_IMAGE);
    }

    fn mount(path: &str, image: &str) -> cri::Mount {
        cri::Mount {
            container_path: path.into(),
            image: (!image.is_empty()).then(|| cri::ImageSpec {
                image: image.into(),
                user_specified_image: format!("{image} as written"),
                ..Default::default()
            }),
            readonly: true,
            ..Default::default()
        }
    }

    #[test]
    fn pins_reach_the_container_image_and_each_image_volume() {
        let req = cri::CreateContainerRequest {
            pod_sandbox_id: "sb".into(),
            config: Some(cri::ContainerConfig {
                image: Some(cri::ImageSpec {
                    image: "busybox:1.36".into(),
                    ..Default::default()
                }),
                mounts: vec![
                    mount("/data", "data:1"),
                    mount("/host", ""),
                    mount("/tools", "tools:2"),
                ],
                ..Default::default()
            }),
            sandbox_config: None,
        };
        let mut msg = req.encode_to_vec();
        // A second occurrence of `config` with one more mount: parsers merge them, mount index 3.
        let extra = cri::ContainerConfig {
            mounts: vec![mount("/more", "more:3")],
            ..Default::default()
        };
        let mut tail = Vec::new();
        prost::encoding::message::encode(field::CREATE_CONFIG, &extra, &mut tail);
        msg.extend_from_slice(&tail);
        msg.extend_from_slice(&[0xa2, 0x06, 0x01, b'z']); // unknown field 100

        let pins = vec![
            (None, "sha256:c".to_string()),
            (Some(0), "sha256:d".to_string()),
            (Some(3), "sha256:m".to_string()),
        ];
        let out = pin(&msg, &pins).unwrap();
        let got = cri::CreateContainerRequest::decode(out.as_slice()).unwrap();
        let config = got.config.unwrap();
        assert_eq!(config.image.unwrap().image, "sha256:c");
        let images: Vec<(String, Option<String>)> = config
            .mounts
            .iter()
            .map(|m| {
                (
                    m.container_path.clone(),
                    m.image.as_ref().map(|i| i.image.clone()),
                )
            })
            .collect();
        assert_eq!(
            images,
            [
                ("/data".to_string(), Some("sha256:d".to_string())),
                ("/host".to_string(), None),
                ("/tools".to_string(), Some("tools:2".to_string())),
                ("/more".to_string(), Some("sha256:m".to_string())),
            ]
        );
        assert!(config.mounts.iter().all(|m| m.readonly));
        assert_eq!(
            config.mounts[0]
                .image
                .as_ref()
                .unwrap()
                .user_specified_image,
            "data:1 as written"
        );
        assert!(
            out.ends_with(&[0xa2, 0x06, 0x01, b'z']),
            "unknown fields kept"
        );
        // Only the container's image: the mounts are not touched.
        let only = pin(&msg, &pins[..1]).unwrap();
        let got = cri::CreateContainerRequest::decode(only.as_slice()).unwrap();
        assert_eq!(
            got.config.unwrap().mounts[0].image.as_ref().unwrap().image,
            "data:1"
        );
    }

    #[tokio::test]
    async fn alongside_drives_both_and_leaves_the_side_unfinished_when_main_wins() {
        let side = async {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            7
        };
        let mut side = std::pin::pin!(side);
        let (a, b) = alongside(
            async {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                1
            },
            side.as_mut(),
        )
        .await;
        assert_eq!((a, b), (1, Some(7)), "the side finished first and was kept");
        let mut slow = std::pin::pin!(std::future::pending::<u8>());
        let (a, b) = alongside(async { 2 }, slow.as_mut()).await;
        assert_eq!((a, b), (2, None));
    }
}
