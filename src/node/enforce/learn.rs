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
//! What is learned is what a start would look up, from the same source, and stays true as long as
//! a start's lookup would: sandbox records never change until removal (a sandbox removed meanwhile
//! leaves an entry containerd itself refuses a start in), and content proofs never change. A start
//! of anything not learned is looked up as before.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use k8s_cri::v1 as cri;
use prost::Message;

use super::{Enforcer, lookup, names, sandbox, start};
use crate::node::proxy::grpc::Status;
use crate::node::proxy::intercept::{ResponseEdit, Verdict};

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
            for rd in &proven {
                self.proofs.add(id, rd);
            }
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
                    for rd in &proven {
                        self.proofs.add(&img.id, rd);
                    }
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
