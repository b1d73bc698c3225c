//! The pulls pullgate forwarded to containerd, remembered for a while so the lockdown watcher
//! ([`crate::node::lockdown`]) can tell an image that arrived through pullgate from one that was
//! brought in past it (`ctr pull`, `ctr import`, `nerdctl`, a CRI client talking to containerd's
//! own socket).
//!
//! A pull explains content, not a name: anyone with containerd's socket can store anything under
//! the name of a recent pull. Each entry stands for one image target (the manifest or index digest
//! containerd stores the image under): the digest a pinned pull was pinned to, or — for a pull by
//! tag, forwarded as asked in warn mode — the first target the watcher sees under its name once the
//! pull was forwarded. The pull's `repo@digest` name and CRI's ID alias are explained by the same
//! content; other content under any of these names is not.
//!
//! The enforcer notes every pull it forwards, before containerd sees it, and forgets it again when
//! containerd answers with an error (a failed pull brought nothing); the watcher asks when an image
//! appears. Entries expire after [`PULL_MEMORY`] (a pull that takes longer than that is
//! reported as out of band — loudly, never silently), and the ledger holds at most [`MAX_ENTRIES`].

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::policy::Reference;

/// How long a forwarded pull is remembered: long enough for a large image on a slow registry.
pub const PULL_MEMORY: Duration = Duration::from_secs(30 * 60);
/// Most pulls remembered at once (the oldest are forgotten first).
pub const MAX_ENTRIES: usize = 4096;

/// One pull pullgate forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardedPull {
    /// Which note this is (for [`PullLedger::forget`]).
    pub id: u64,
    /// The reference containerd was asked to pull, normalised (`docker.io/library/busybox:1`).
    pub reference: String,
    /// Its repository (`docker.io/library/busybox`).
    pub repository: String,
    /// The image target the pull stands for: the digest it was pinned to (every allowed pull is),
    /// or the first target stored under its name after it was forwarded; `None` until then.
    pub digest: Option<String>,
    /// Whether the pull was allowed (pinned to an approved digest) rather than only warned about.
    pub allowed: bool,
    pub at: Instant,
}

/// The forwarded pulls of the last [`PULL_MEMORY`].
#[derive(Debug, Default)]
pub struct PullLedger {
    pulls: Mutex<VecDeque<Note>>,
    next_id: std::sync::atomic::AtomicU64,
}

/// One forwarded pull as noted. Noting costs the pull nothing but a copy of its reference: the
/// names it is compared by are worked out when the watcher first asks about it.
#[derive(Debug)]
struct Note {
    id: u64,
    /// The reference as the pull named it.
    reference: String,
    names: Option<Names>,
    /// For a pull by tag: the first target stored under its name (see [`ForwardedPull::digest`]).
    bound: Option<String>,
    allowed: bool,
    at: Instant,
}

/// The names a pull is recognised by.
#[derive(Debug)]
struct Names {
    /// The reference, normalised (the reference as given when it does not parse).
    reference: String,
    /// Its repository (empty when the reference does not parse).
    repository: String,
    /// The digest it is pinned to.
    digest: Option<String>,
}

impl Names {
    fn of(raw: &str) -> Names {
        let parsed = Reference::parse(raw).ok();
        Names {
            reference: parsed
                .as_ref()
                .map_or_else(|| raw.to_string(), |r| r.to_string()),
            repository: parsed
                .as_ref()
                .map_or_else(String::new, |r| r.name().to_string()),
            digest: parsed.and_then(|r| r.digest().map(|d| d.to_string())),
        }
    }
}

/// `sha256:<64 hex>`: the name CRI gives every image it pulls (its config digest, the image ID).
pub fn is_id_alias(name: &str) -> bool {
    name.starts_with("sha256:") && super::names::is_image_id(name)
}

impl PullLedger {
    /// Notes that `reference` is being pulled through pullgate now; returns the note's id.
    fn note(&self, reference: &str, allowed: bool) -> u64 {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let note = Note {
            id,
            reference: reference.to_string(),
            names: None,
            bound: None,
            allowed,
            at: Instant::now(),
        };
        let mut pulls = self.pulls.lock().unwrap_or_else(|e| e.into_inner());
        while pulls.len() >= MAX_ENTRIES {
            pulls.pop_front();
        }
        pulls.push_back(note);
        id
    }

    /// Forgets note `id`: the pull failed, so it explains nothing (not even content stored under its
    /// name later).
    pub fn forget(&self, id: u64) {
        self.pulls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| p.id != id);
    }

    /// The most recent forwarded pull that explains an image named `name` (as containerd stores
    /// it) with target `target`, if any:
    ///
    /// - a pull of that very reference whose content is `target`; a pull by tag not yet bound to
    ///   content is bound to `target` now (the first content stored under its name);
    /// - for the `repo@digest` name CRI adds to a pull (`target` the digest it names), a pull from
    ///   the same repository whose content is `target`;
    /// - for CRI's ID alias (`sha256:<config digest>`), any pull whose content is `target`.
    ///
    /// Other content under these names, and the same content under another name, is not explained:
    /// it was stored past pullgate.
    pub fn explain(&self, name: &str, target: &str) -> Option<ForwardedPull> {
        let alias = is_id_alias(name);
        let parsed = (!alias).then(|| Reference::parse(name).ok()).flatten();
        let normalized = parsed.as_ref().map(|r| r.to_string());
        let repo_digest = parsed.as_ref().and_then(|r| {
            let d = r.digest()?.to_string();
            (d == target).then(|| r.name().to_string())
        });
        let mut pulls = self.pulls.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        while pulls
            .front()
            .is_some_and(|p| now.duration_since(p.at) > PULL_MEMORY)
        {
            pulls.pop_front();
        }
        for p in pulls.iter_mut().rev() {
            let names = p.names.get_or_insert_with(|| Names::of(&p.reference));
            // The content this pull stands for, if known yet.
            let digest = names.digest.as_ref().or(p.bound.as_ref());
            let same_name = !alias
                && (normalized.as_deref() == Some(&names.reference) || names.reference == name);
            let explains = match digest {
                Some(d) => {
                    d == target
                        && (alias || same_name || repo_digest.as_deref() == Some(&names.repository))
                }
                None => same_name,
            };
            if !explains {
                continue;
            }
            if digest.is_none() {
                p.bound = Some(target.to_string());
            }
            return Some(ForwardedPull {
                id: p.id,
                reference: names.reference.clone(),
                repository: names.repository.clone(),
                digest: Some(target.to_string()),
                allowed: p.allowed,
                at: p.at,
            });
        }
        None
    }
}

/// A note for a pull in flight: forgotten when dropped before [`Noted::pulled`] (the pull failed,
/// or its caller went away).
pub struct Noted {
    ledger: Arc<PullLedger>,
    id: Option<u64>,
}

impl Noted {
    /// Notes that `reference` is being pulled through pullgate now (see [`PullLedger::note`]).
    pub fn new(ledger: Arc<PullLedger>, reference: &str, allowed: bool) -> Noted {
        let id = Some(ledger.note(reference, allowed));
        Noted { ledger, id }
    }

    /// containerd answered the pull with success: the note stays.
    pub fn pulled(mut self) {
        self.id = None;
    }
}

impl Drop for Noted {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.ledger.forget(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const E: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
    const F: &str = "sha256:3333333333333333333333333333333333333333333333333333333333333333";
    /// CRI's ID alias of some image.
    const ALIAS: &str = "sha256:4444444444444444444444444444444444444444444444444444444444444444";

    #[test]
    fn a_pinned_pull_explains_its_digest_only() {
        let l = PullLedger::default();
        assert!(l.explain("docker.io/library/busybox:1", D).is_none());
        let pinned = format!("registry.corp/approved/library/busybox@{D}");
        l.note(&pinned, true);
        let p = l.explain(&pinned, D).expect("found by reference");
        assert!(p.allowed);
        assert_eq!(p.digest.as_deref(), Some(D));
        assert!(l.explain(ALIAS, D).is_some(), "CRI's ID alias of it");
        // Other content stored under the pinned name (names are not content).
        assert!(l.explain(&pinned, E).is_none());
        assert!(l.explain(ALIAS, E).is_none());
        // The same content under another name was not pulled through pullgate.
        assert!(
            l.explain(&format!("127.0.0.1:5000/library/busybox@{D}"), D)
                .is_none()
        );
        assert!(
            l.explain("registry.corp/approved/library/busybox:1", D)
                .is_none()
        );
    }

    #[test]
    fn a_pull_by_tag_explains_the_first_content_under_its_name() {
        let l = PullLedger::default();
        l.note("busybox:1.36", false);
        // Nothing stored under the name yet: its repo@digest name and an alias explain nothing.
        assert!(
            l.explain(&format!("docker.io/library/busybox@{E}"), E)
                .is_none()
        );
        assert!(l.explain(ALIAS, E).is_none());
        let w = l
            .explain("docker.io/library/busybox:1.36", E)
            .expect("the pull's content, by its normalised name");
        assert!(!w.allowed);
        assert_eq!(w.digest.as_deref(), Some(E), "bound to what arrived");
        // The same content under CRI's other names.
        assert!(
            l.explain(&format!("docker.io/library/busybox@{E}"), E)
                .is_some()
        );
        assert!(l.explain(ALIAS, E).is_some());
        assert!(
            l.explain("docker.io/library/busybox:1.36", E).is_some(),
            "again"
        );
        // Other content imported under the pull's name (or its other names) afterwards.
        assert!(l.explain("docker.io/library/busybox:1.36", F).is_none());
        assert!(
            l.explain(&format!("docker.io/library/busybox@{F}"), F)
                .is_none()
        );
        assert!(l.explain(ALIAS, F).is_none());
        // The same content under another name.
        assert!(l.explain("docker.io/library/busybox:1.35", E).is_none());
        assert!(
            l.explain(&format!("docker.io/library/busybox@{D}"), E)
                .is_none(),
            "name says D, image is E"
        );
        // A new pull of the tag explains the content it brings next.
        l.note("docker.io/library/busybox:1.36", false);
        assert!(l.explain("docker.io/library/busybox:1.36", F).is_some());
        assert!(
            l.explain("docker.io/library/busybox:1.36", E).is_some(),
            "the first pull's"
        );
    }

    #[test]
    fn a_failed_pull_explains_nothing() {
        let l = Arc::new(PullLedger::default());
        let failed = Noted::new(l.clone(), "busybox:1.36", false);
        let ok = Noted::new(l.clone(), "busybox:1.35", false);
        let other = ok.id;
        drop(failed);
        assert!(l.explain("docker.io/library/busybox:1.36", E).is_none());
        ok.pulled();
        assert_eq!(
            l.explain("docker.io/library/busybox:1.35", E).map(|p| p.id),
            other
        );
    }

    #[test]
    fn id_aliases_are_told_from_names() {
        assert!(is_id_alias(ALIAS));
        assert!(!is_id_alias("sha256:4444"));
        assert!(
            !is_id_alias(&ALIAS["sha256:".len()..]),
            "a bare hex ID is no image name"
        );
        assert!(!is_id_alias("docker.io/library/busybox:1"));
    }

    #[test]
    fn the_ledger_is_bounded() {
        let l = PullLedger::default();
        for i in 0..MAX_ENTRIES + 10 {
            l.note(&format!("registry.corp/x/y:{i}"), true);
        }
        assert_eq!(l.pulls.lock().unwrap().len(), MAX_ENTRIES);
        assert!(
            l.explain("registry.corp/x/y:0", E).is_none(),
            "oldest forgotten"
        );
        assert!(
            l.explain(&format!("registry.corp/x/y:{}", MAX_ENTRIES + 9), E)
                .is_some()
        );
    }
}
