//! The pulls pullgate forwarded to containerd, remembered for a while so the lockdown watcher
//! ([`crate::node::lockdown`]) can tell an image that arrived through pullgate from one that was
//! brought in past it (`ctr pull`, `ctr import`, `nerdctl`, a CRI client talking to containerd's
//! own socket).
//!
//! The enforcer notes every pull it forwards, before containerd sees it; the watcher asks when an
//! image appears. Entries expire after [`PULL_MEMORY`] (a pull that takes longer than that is
//! reported as out of band — loudly, never silently), and the ledger holds at most [`MAX_ENTRIES`].

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::policy::Reference;

/// How long a forwarded pull is remembered: long enough for a large image on a slow registry.
pub const PULL_MEMORY: Duration = Duration::from_secs(30 * 60);
/// Most pulls remembered at once (the oldest are forgotten first).
pub const MAX_ENTRIES: usize = 4096;

/// One pull pullgate forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardedPull {
    /// The reference containerd was asked to pull, normalised (`docker.io/library/busybox:1`).
    pub reference: String,
    /// The digest it was pinned to, when it was (every allowed pull is).
    pub digest: Option<String>,
    /// Whether the pull was allowed (pinned to an approved digest) rather than only warned about.
    pub allowed: bool,
    pub at: Instant,
}

/// The forwarded pulls of the last [`PULL_MEMORY`].
#[derive(Debug, Default)]
pub struct PullLedger {
    pulls: Mutex<VecDeque<ForwardedPull>>,
}

impl PullLedger {
    /// Notes that `reference` is being pulled through pullgate now.
    pub fn note(&self, reference: &str, allowed: bool) {
        let parsed = Reference::parse(reference).ok();
        let entry = ForwardedPull {
            reference: parsed
                .as_ref()
                .map_or_else(|| reference.to_string(), |r| r.to_string()),
            digest: parsed.and_then(|r| r.digest().map(|d| d.to_string())),
            allowed,
            at: Instant::now(),
        };
        let mut pulls = self.pulls.lock().unwrap_or_else(|e| e.into_inner());
        while pulls.len() >= MAX_ENTRIES {
            pulls.pop_front();
        }
        pulls.push_back(entry);
    }

    /// The most recent forwarded pull that explains an image named `name` (normalised or as
    /// containerd stores it) with target `digest`: one of the same reference, or pinned to the
    /// same digest.
    pub fn find(&self, name: &str, digest: &str) -> Option<ForwardedPull> {
        let normalized = Reference::parse(name).map(|r| r.to_string()).ok();
        let mut pulls = self.pulls.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        while pulls
            .front()
            .is_some_and(|p| now.duration_since(p.at) > PULL_MEMORY)
        {
            pulls.pop_front();
        }
        pulls
            .iter()
            .rev()
            .find(|p| {
                p.digest.as_deref() == Some(digest)
                    || normalized.as_deref() == Some(p.reference.as_str())
                    || p.reference == name
            })
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const E: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    #[test]
    fn pulls_are_found_by_reference_or_pinned_digest() {
        let l = PullLedger::default();
        assert!(l.find("docker.io/library/busybox:1", D).is_none());
        l.note(&format!("registry.corp/approved/library/busybox@{D}"), true);
        l.note("busybox:1.36", false);
        // The image ID alias CRI creates has the pinned digest as its target.
        let p = l.find("sha256:abcd", D).expect("found by digest");
        assert!(p.allowed);
        assert_eq!(p.digest.as_deref(), Some(D));
        // A warned (forwarded as asked) pull is found by its normalised name.
        let w = l
            .find("docker.io/library/busybox:1.36", E)
            .expect("found by name");
        assert!(!w.allowed);
        assert!(l.find("docker.io/library/busybox:1.35", E).is_none());
    }

    #[test]
    fn the_ledger_is_bounded() {
        let l = PullLedger::default();
        for i in 0..MAX_ENTRIES + 10 {
            l.note(&format!("registry.corp/x/y:{i}"), true);
        }
        assert_eq!(l.pulls.lock().unwrap().len(), MAX_ENTRIES);
        assert!(
            l.find("registry.corp/x/y:0", E).is_none(),
            "oldest forgotten"
        );
        assert!(
            l.find(&format!("registry.corp/x/y:{}", MAX_ENTRIES + 9), E)
                .is_some()
        );
    }
}
