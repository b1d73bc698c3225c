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
    /// Its repository (`docker.io/library/busybox`).
    pub repository: String,
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
            repository: parsed
                .as_ref()
                .map_or_else(String::new, |r| format!("{}/{}", r.domain(), r.path())),
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

    /// The most recent forwarded pull that explains an image named `name` (as containerd stores
    /// it) with target `digest`: a pull of that very reference, or — for the `repo@digest` name
    /// CRI adds to a pull by tag — a pull from the same repository whose image has that digest.
    /// Another name for the same content is not explained: it was made past pullgate.
    pub fn find(&self, name: &str, digest: &str) -> Option<ForwardedPull> {
        let parsed = Reference::parse(name).ok();
        let normalized = parsed.as_ref().map(|r| r.to_string());
        let by_digest = parsed.as_ref().and_then(|r| {
            let d = r.digest()?.to_string();
            (d == digest).then(|| format!("{}/{}", r.domain(), r.path()))
        });
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
                normalized.as_deref() == Some(p.reference.as_str())
                    || p.reference == name
                    || by_digest.as_deref() == Some(p.repository.as_str())
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
    fn pulls_are_found_by_reference_or_repo_digest() {
        let l = PullLedger::default();
        assert!(l.find("docker.io/library/busybox:1", D).is_none());
        let pinned = format!("registry.corp/approved/library/busybox@{D}");
        l.note(&pinned, true);
        l.note("busybox:1.36", false);
        let p = l.find(&pinned, D).expect("found by reference");
        assert!(p.allowed);
        assert_eq!(p.digest.as_deref(), Some(D));
        // A warned (forwarded as asked) pull is found by its normalised name, and so is the
        // `repo@digest` name CRI adds for it.
        let w = l
            .find("docker.io/library/busybox:1.36", E)
            .expect("found by name");
        assert!(!w.allowed);
        assert!(
            l.find(&format!("docker.io/library/busybox@{E}"), E)
                .is_some()
        );
        // The same content under another name was not pulled through pullgate.
        assert!(l.find("docker.io/library/busybox:1.35", E).is_none());
        assert!(
            l.find(&format!("127.0.0.1:5000/library/busybox@{D}"), D)
                .is_none()
        );
        assert!(l.find("127.0.0.1:5000/library/busybox:1.36", D).is_none());
        assert!(
            l.find(&format!("docker.io/library/busybox@{D}"), E)
                .is_none(),
            "name says D, image is E"
        );
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
