//! What container starts would otherwise ask containerd, learned before a start needs it.
//!
//! A start is decided for the pod containerd recorded (its sandbox) and from repo digests proven by
//! content. Looking either up during the start costs a round trip to containerd each, in sequence
//! with kubelet's call. Two ways take them off that path:
//!
//! - **Sandboxes created through pullgate.** `RunPodSandbox` is read on its way to containerd and
//!   its answer on the way back: containerd records the sandbox's metadata and labels exactly as the
//!   request's `config` carries them, under the ID it answers with, so the pair is the record
//!   `PodSandboxStatus` would return. It is remembered only from a successful answer naming a
//!   sandbox; the request and the answer themselves pass unchanged (a request pullgate cannot decode
//!   is forwarded too, and teaches nothing). This is kubelet's path for every new pod. containerd
//!   answers with a new ID every time (a sandbox name already taken is an error); should an answer
//!   ever name a known sandbox with another pod, the sandbox is forgotten and looked up at its next
//!   start.
//! - **What containerd holds when pullgate starts** ([`Enforcer::learn_node`]): every sandbox
//!   `ListPodSandbox` lists (containerd's record, as `PodSandboxStatus` gives it), and, for every
//!   image `ListImages` lists, the repo digests its content proves (`Content.Read`, exactly as a
//!   start would prove them). Its calls are made one at a time, and at most 2,048 images are proven
//!   this way; images past that are left to their first start. An image whose content proves
//!   nothing, or that containerd fails to read, is skipped; a list that fails, or containerd gone,
//!   fails the pass, and the daemon runs it again later (images already proven are not read again).
//! - **Images that arrive later** ([`Enforcer::learn_image`]): the lockdown watcher sees every image
//!   containerd's CRI plugin comes to know (its image-ID name) after the watcher's own start-up scan
//!   and hands the approved ones here ([`Enforcer::learn_arrivals`]), one at a time, to be proven
//!   the same way — so an image pre-pulled on containerd's own socket, or imported, starts without
//!   a lookup too, once its arrival has been handled. CRI's plugin names an image by its ID before
//!   its own image store holds it, so an ID CRI does not know yet is tried again a few times, a
//!   little later each time. (One that arrives between the start-up pass's `ListImages` and the
//!   watcher's scan is handed over by neither: its first start looks it up.)
//!
//! - **Images kubelet asks about** ([`Ahead`]): kubelet asks `ImageStatus` of a container's image
//!   (by the pod spec's name) before every start of it, and starts it by the ID the answer gives.
//!   When the name is approved and the repo digest it pins is not proven yet, the manifest its
//!   mirror reference pins is read (`Content.Read`, and for an index its child for the node's
//!   platform) while containerd answers. When the answer — to any `ImageStatus`, by name or by
//!   ID — names an image not proven yet, it is proven from that read if the manifest describes
//!   it and the answer lists that repo digest, otherwise from every repo digest the answer
//!   lists, as a start would. A start that arrives while such a proof runs waits for it instead
//!   of reading the same manifests itself. So an image pre-pulled on containerd's own socket, or
//!   imported, usually starts without a lookup even without the lockdown watcher. Bounds: at
//!   most [`AHEAD_AT_ONCE`] proofs run at once (a call past that is left to its start), each for
//!   at most [`AHEAD_TIMEOUT`] (a start waiting for one that takes longer looks its image up
//!   itself); an answer whose content proved nothing is remembered and not read again for the
//!   same names, nor is a mirror reference whose manifest did not prove the image; a proof
//!   containerd failed leaves nothing behind (the start looks up as before, and reports
//!   containerd's failure). A read for an image containerd does not hold (kubelet pulls next)
//!   finds nothing, and the pull through pullgate proves the image.
//!
//! What is learned is what a start would look up, from the same source, and stays true as long as
//! a start's lookup would: sandbox records never change until removal (a sandbox removed meanwhile
//! leaves an entry containerd itself refuses a start in), and content proofs never change. A start
//! of anything not learned is looked up as before.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use k8s_cri::v1 as cri;
use prost::Message;

use super::{Enforcer, field, lookup, names, sandbox, start};
use crate::node::proxy::Upstream;
use crate::node::proxy::grpc::Status;
use crate::node::proxy::intercept::{ResponseEdit, Verdict};
use crate::node::wire;

/// Most images proven at start.
const LEARN_IMAGES_MAX: usize = start::PROOFS_MAX / 2;

/// Tries to prove an arrived image CRI does not know yet (about 6 s in all, see [`arrival_wait`]).
pub const ARRIVAL_TRIES: u32 = 12;
/// The wait before an arrived image CRI did not know is tried again the first time.
pub const ARRIVAL_RETRY: Duration = Duration::from_millis(20);
/// The longest wait between two tries of an arrived image.
pub const ARRIVAL_RETRY_MAX: Duration = Duration::from_secs(1);
/// Most arrived images waiting to be tried again.
pub const ARRIVALS_WAITING: usize = 256;

/// Most proofs of images kubelet asked about running at once.
pub const AHEAD_AT_ONCE: usize = 8;
/// The longest a proof of an image kubelet asked about may take, from the question: past it, the
/// proof ends, and a start waiting for it looks its image up itself.
pub const AHEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// Most answers (and mirror references) remembered as proving nothing (all are forgotten when more
/// come).
const FRUITLESS_MAX: usize = 1024;

/// Proofs of the images kubelet asks `ImageStatus` about, made ahead of their starts (see the
/// module docs): how many run, which images they are proving, and what proved nothing.
pub(super) struct Ahead {
    upstream: Arc<Upstream>,
    proofs: Arc<start::ContentProofs>,
    inner: Mutex<AheadInner>,
}

#[derive(Default)]
struct AheadInner {
    /// Proof tasks alive.
    tasks: usize,
    /// The images being proven, by ID. A receiver's sender is dropped when its proof ends.
    running: HashMap<String, watch::Receiver<()>>,
    /// SHA-256 of `image ID\0repo digest\0…` of answers whose content proved nothing.
    fruitless: HashSet<[u8; 32]>,
    /// Mirror references whose manifest, read while containerd answered, did not prove the image
    /// the answer named: not read that way again (the answer's own proof still runs).
    unhelpful: HashSet<String>,
}

/// What an `ImageStatus` question means for the proof of the image its answer names.
pub(super) enum Question {
    /// The name is approved and the repo digest it pins is proven: so is the image it names (its
    /// manifest's config), and the answer need not be looked at.
    Settled,
    /// A proof started for it ([`Asked`]).
    Asked(Asked),
    /// Anything else: the answer says which image to prove.
    Open,
}

/// A proof started when kubelet asked about an approved name, before containerd answered: it
/// reads the manifest the name pins meanwhile and waits here for the image the answer names.
pub(super) struct Asked {
    answer: oneshot::Sender<cri::Image>,
    running: watch::Receiver<()>,
}

impl Ahead {
    pub(super) fn new(upstream: Arc<Upstream>, proofs: Arc<start::ContentProofs>) -> Self {
        Ahead {
            upstream,
            proofs,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AheadInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one more proof task, unless [`AHEAD_AT_ONCE`] run: the task's guard, to be moved
    /// into it.
    fn reserve(self: &Arc<Self>, inner: &mut AheadInner) -> Option<Task> {
        if inner.tasks >= AHEAD_AT_ONCE {
            return None;
        }
        inner.tasks += 1;
        let (done, running) = watch::channel(());
        Some(Task {
            ahead: self.clone(),
            id: None,
            running,
            _done: done,
        })
    }

    /// kubelet asks `ImageStatus` of a name that resolves to `pinned` (`repo@digest`, its mirror
    /// reference). Settled when that repo digest was proven for some image already (a name
    /// forged onto other content is then left to its start); otherwise, unless its manifest did
    /// not prove the image an answer named before, or [`AHEAD_AT_ONCE`] proofs run, a proof starts
    /// reading the manifest it pins while containerd answers. The answer is handed to it with
    /// [`Ahead::answered`].
    pub(super) fn asked(self: &Arc<Self>, pinned: &str) -> Question {
        if self.proofs.proves(pinned) {
            return Question::Settled;
        }
        self.start_asked(pinned)
            .map_or(Question::Open, Question::Asked)
    }

    fn start_asked(self: &Arc<Self>, pinned: &str) -> Option<Asked> {
        let (_, digest) = pinned.rsplit_once('@')?;
        let rt = tokio::runtime::Handle::try_current().ok()?;
        let task = {
            let mut inner = self.lock();
            if inner.unhelpful.contains(pinned) {
                return None;
            }
            self.reserve(&mut inner)?
        };
        let (answer, answered) = oneshot::channel();
        let running = task.running.clone();
        let (pinned, digest) = (pinned.to_string(), digest.to_string());
        rt.spawn(async move {
            let _ = tokio::time::timeout(AHEAD_TIMEOUT, task.asked(pinned, digest, answered)).await;
        });
        Some(Asked { answer, running })
    }

    /// containerd's answer to an `ImageStatus` (before pullgate shows other names in it), and what
    /// its question was ([`Ahead::asked`]; [`Question::Open`] for a question by ID or by a name the
    /// bundle does not approve). Unless settled, the image it names is proven unless that is
    /// proven already, being proven, or an answer with the same names proved nothing, or (with no
    /// proof started for the question) [`AHEAD_AT_ONCE`] proofs run. Returns at once.
    pub(super) fn answered(self: &Arc<Self>, resp: &[u8], question: Question) {
        let asked = match question {
            Question::Settled => return,
            Question::Asked(asked) => Some(asked),
            Question::Open => None,
        };
        // Most answers name an image proven already: that is found without decoding the answer.
        let id = match wire::get_string(resp, &[field::IMAGES, 1]) {
            Ok(Some(id)) => id,
            _ => return,
        };
        let Ok(id) = std::str::from_utf8(id) else {
            return;
        };
        if !names::is_image_id(id) || self.proofs.knows(id) {
            return;
        }
        let Some(image) = cri::ImageStatusResponse::decode(resp)
            .ok()
            .and_then(|r| r.image)
            .filter(|i| i.id == id && !i.repo_digests.is_empty())
        else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut inner = self.lock();
        let being_proven = inner
            .running
            .get(&image.id)
            .is_some_and(|r| r.has_changed().is_ok());
        if being_proven || inner.fruitless.contains(&fruitless_key(&image)) {
            // A proof started for this question ends without an image.
            return;
        }
        match asked {
            Some(asked) => {
                inner.running.insert(image.id.clone(), asked.running);
                drop(inner);
                if let Err(image) = asked.answer.send(image) {
                    // That proof ended first (it took too long).
                    self.lock().running.remove(&image.id);
                }
            }
            None => {
                let Some(mut task) = self.reserve(&mut inner) else {
                    return;
                };
                task.id = Some(image.id.clone());
                inner.running.insert(image.id.clone(), task.running.clone());
                drop(inner);
                rt.spawn(async move {
                    let _ =
                        tokio::time::timeout(AHEAD_TIMEOUT, task.ahead.prove(image, None)).await;
                    drop(task);
                });
            }
        }
    }

    /// Proves `image`: from `early`, what was read of the manifest `pinned` names while containerd
    /// answered, when it describes the image and the answer lists that repo digest; otherwise
    /// from every repo digest the answer lists, as a start would.
    async fn prove(&self, image: cri::Image, early: Option<(&str, Vec<String>)>) {
        if let Some((pinned, configs)) = early {
            if configs.contains(&image.id) && image.repo_digests.iter().any(|r| r == pinned) {
                self.proofs.add(&image.id, pinned);
                tracing::debug!(image_id = %image.id, repo_digest = %pinned, "proved an image kubelet asked about while containerd answered");
                return;
            }
            remember(&mut self.lock().unhelpful, pinned.to_string());
        }
        let key = fruitless_key(&image);
        match lookup::verified_repo_digests(&self.upstream, &image.id, image.repo_digests).await {
            Ok(proven) if proven.is_empty() => remember(&mut self.lock().fruitless, key),
            Ok(proven) => {
                self.proofs.add_all(&image.id, &proven);
                tracing::debug!(image_id = %image.id, repo_digests = ?proven, "proved an image kubelet asked about ahead of its start");
            }
            Err(e) => {
                tracing::debug!(image_id = %image.id, error = %e.message, "could not prove an image kubelet asked about; its start looks it up");
            }
        }
    }

    /// Waits for the proof of image `id` that is running, if one is (at most until it times out);
    /// whether one was.
    pub(super) async fn settled(&self, id: &str) -> bool {
        let running = self.lock().running.get(id).cloned();
        match running {
            Some(mut running) => {
                // Ends with an error when the proof's task drops its sender: what it proved is in
                // the content proofs by then.
                let _ = running.changed().await;
                true
            }
            None => false,
        }
    }
}

/// A proof task's guard, moved into the task: when the task ends, or is dropped unfinished (even
/// before it ran), it stops counting, the image it proves stops running, and then whoever waits
/// for it wakes.
struct Task {
    ahead: Arc<Ahead>,
    /// The image it proves, once known.
    id: Option<String>,
    running: watch::Receiver<()>,
    _done: watch::Sender<()>,
}

impl Task {
    /// A proof started by a question: reads manifest `digest` (of mirror reference `pinned`)
    /// while containerd answers, then proves the image the answer names. Ends early when no
    /// answer will come.
    async fn asked(
        mut self,
        pinned: String,
        digest: String,
        mut answered: oneshot::Receiver<cri::Image>,
    ) {
        let ahead = self.ahead.clone();
        let early = lookup::configs_described(&ahead.upstream, &digest);
        tokio::pin!(early);
        let (early, image) = tokio::select! {
            image = &mut answered => match image {
                Ok(image) => (early.await, image),
                Err(_) => return,
            },
            early = &mut early => match answered.await {
                Ok(image) => (early, image),
                Err(_) => return,
            },
        };
        self.id = Some(image.id.clone());
        let early = early.ok().map(|configs| (pinned.as_str(), configs));
        ahead.prove(image, early).await;
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        let mut inner = self.ahead.lock();
        inner.tasks -= 1;
        if let Some(id) = &self.id
            && inner
                .running
                .get(id)
                .is_some_and(|r| r.same_channel(&self.running))
        {
            inner.running.remove(id);
        }
        // `_done` is dropped after this: the waiters wake.
    }
}

/// Adds `key` to a set of at most [`FRUITLESS_MAX`] (all are forgotten when it is full).
fn remember<K: std::hash::Hash + Eq>(set: &mut HashSet<K>, key: K) {
    if set.len() >= FRUITLESS_MAX {
        set.clear();
    }
    set.insert(key);
}

/// What an answer is remembered by when it proved nothing: its image and repo digests, hashed (an
/// answer may list many).
fn fruitless_key(image: &cri::Image) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(image.id.as_bytes());
    for rd in &image.repo_digests {
        h.update([0]);
        h.update(rd.as_bytes());
    }
    h.finalize().into()
}

/// What [`Enforcer::learn_image`] made of an arrived image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Proven, or never to be proven here (proven already, proves nothing, containerd silent).
    Settled,
    /// CRI does not know the image ID yet: try again later.
    NotYetKnown,
}

/// What [`Enforcer::learn_node`] learned.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Learned {
    /// Sandboxes whose pods were remembered.
    pub sandboxes: usize,
    /// Images with at least one repo digest proven by content.
    pub images: usize,
}

impl Enforcer {
    /// `RunPodSandbox`: forwarded unchanged; a successful answer's sandbox is remembered with the pod
    /// the request configured.
    pub(super) fn run_pod_sandbox(&self, msg: &bytes::Bytes) -> Verdict {
        let Ok(req) = cri::RunPodSandboxRequest::decode(&msg[..]) else {
            // Not a check point: containerd says what is wrong with it.
            return Verdict::Forward;
        };
        let pod = Arc::new(sandbox::claimed_pod(req.config.as_ref()));
        let sandboxes = self.sandboxes.clone();
        let response: ResponseEdit = Box::new(move |resp| {
            if let Ok(r) = cri::RunPodSandboxResponse::decode(resp) {
                sandboxes.learn(&r.pod_sandbox_id, pod);
            }
            None
        });
        Verdict::Rewrite {
            request: None,
            response,
        }
    }

    /// Proves image `id` (an image ID CRI knows) from content, as its first start would. Nothing
    /// is proven when it is proven already, is not an image ID, proves nothing, or containerd does
    /// not answer ([`Arrival::Settled`]); [`Arrival::NotYetKnown`] when CRI does not know the ID
    /// (with its repo digests) yet.
    pub async fn learn_image(&self, id: &str) -> Arrival {
        if !names::is_image_id(id) || self.proofs.knows(id) {
            return Arrival::Settled;
        }
        let img = match lookup::image_status(&self.upstream, id).await {
            Ok(Some(img)) if img.id == id && !img.repo_digests.is_empty() => img,
            Ok(Some(img)) if img.id != id => return Arrival::Settled,
            Ok(_) => return Arrival::NotYetKnown,
            Err(_) => return Arrival::Settled,
        };
        if let Ok(proven) =
            lookup::verified_repo_digests(&self.upstream, id, img.repo_digests).await
        {
            self.proofs.add_all(id, &proven);
            if !proven.is_empty() {
                tracing::debug!(image_id = %id, repo_digests = ?proven, "proved an arrived image ahead of its first start");
            }
        }
        Arrival::Settled
    }

    /// Proves the images `arrived` names ([`Enforcer::learn_image`]), one at a time, until the
    /// sender is gone and nothing waits. CRI's plugin names an image by its ID before its image
    /// store holds it, so one CRI does not know yet is tried again ([`ARRIVAL_TRIES`] tries in
    /// all, [`arrival_wait`] apart); at most [`ARRIVALS_WAITING`] wait at once, and one past that,
    /// or never known, is left to its first start.
    pub async fn learn_arrivals(self: Arc<Self>, mut arrived: mpsc::Receiver<String>) {
        let mut waiting: BinaryHeap<Reverse<(Instant, u32, String)>> = BinaryHeap::new();
        let mut open = true;
        loop {
            let due = waiting.peek().map(|Reverse((at, ..))| *at);
            let (id, tries) = tokio::select! {
                got = arrived.recv(), if open => match got {
                    Some(id) => (id, 0),
                    None => {
                        open = false;
                        continue;
                    }
                },
                () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    let Some(Reverse((_, tries, id))) = waiting.pop() else { continue };
                    (id, tries)
                }
                else => return,
            };
            if self.learn_image(&id).await == Arrival::NotYetKnown
                && tries + 1 < ARRIVAL_TRIES
                && waiting.len() < ARRIVALS_WAITING
            {
                let wait = arrival_wait(tries);
                tracing::debug!(image_id = %id, ?wait, "CRI does not know an arrived image yet; trying again");
                let at = Instant::now() + wait;
                waiting.push(Reverse((at, tries + 1, id)));
            }
        }
    }

    /// Learns the sandboxes containerd holds and proves the images it holds, as a start would.
    /// An image whose content proves nothing, or that containerd fails to read, is skipped; a list
    /// that fails, or containerd gone, fails the pass (`Err`: call again later — what was learned
    /// stays learned, and images already proven are not read again).
    pub async fn learn_node(&self) -> Result<Learned, Status> {
        let mut learned = Learned::default();
        let pods = lookup::pod_sandboxes(&self.upstream).await;
        if let Ok(pods) = &pods {
            for p in pods.iter().take(sandbox::MAX_SANDBOXES) {
                if p.id.is_empty() {
                    continue;
                }
                if self.sandboxes.get(&p.id).is_none() {
                    self.sandboxes
                        .insert(&p.id, Arc::new(sandbox::listed_pod(p)));
                }
                learned.sandboxes += 1;
            }
        }
        let images: cri::ListImagesResponse = lookup::unary(
            &self.upstream,
            "/runtime.v1.ImageService/ListImages",
            &cri::ListImagesRequest { filter: None },
        )
        .await?;
        let mut seen = HashSet::new();
        for img in images.images {
            if seen.len() >= LEARN_IMAGES_MAX {
                break;
            }
            if img.repo_digests.is_empty() || !seen.insert(img.id.clone()) {
                continue;
            }
            if self.proofs.knows(&img.id) {
                // Proven by an earlier pass, a pull or a start.
                learned.images += 1;
                continue;
            }
            match lookup::verified_repo_digests(&self.upstream, &img.id, img.repo_digests).await {
                Ok(proven) => {
                    self.proofs.add_all(&img.id, &proven);
                    learned.images += usize::from(!proven.is_empty());
                }
                Err(e) => {
                    // containerd gone: the pass ends (and is tried again); anything else is about
                    // this image alone.
                    if self.upstream.connect().await.is_err() {
                        return Err(e);
                    }
                    tracing::debug!(image_id = %img.id, error = %e.message, "not proven ahead; its first start looks it up");
                }
            }
        }
        pods.map(|_| learned)
    }
}

/// The wait after try `tries` (from 0) of an arrived image CRI did not know: [`ARRIVAL_RETRY`],
/// twice as long each time, at most [`ARRIVAL_RETRY_MAX`].
pub fn arrival_wait(tries: u32) -> Duration {
    ARRIVAL_RETRY
        .saturating_mul(1u32.checked_shl(tries).unwrap_or(u32::MAX))
        .min(ARRIVAL_RETRY_MAX)
}
