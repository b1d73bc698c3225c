//! The pod a container is created in, as containerd records it.
//!
//! A `CreateContainerRequest` names its pod twice: `pod_sandbox_id`, the sandbox containerd created,
//! and `sandbox_config`, a copy of the pod's configuration that the caller sends along. Only the first
//! is a fact; the second is a claim anyone on the socket can make up. The scope a container start is
//! decided for therefore comes from containerd's record of the sandbox (CRI `PodSandboxStatus`):
//! namespace, name, uid and labels as they were when the sandbox was created, which containerd never
//! changes. [`SandboxCache`] keeps them per sandbox ID (bounded; dropped on `RemovePodSandbox`) —
//! also the ones pullgate knows ahead, from the `RunPodSandbox` calls it forwards and from
//! `ListPodSandbox` when it starts (see `learn`) — and
//! [`disagreement`] says where a claim contradicts the record.
//!
//! containerd's CRI plugin resolves a sandbox ID through a truncated-ID index: any unique prefix of a
//! sandbox's ID names it, in `PodSandboxStatus`, `CreateContainer` and `RemovePodSandbox` alike. A
//! prefix names different sandboxes over time (whichever one it is unique to), so the cache holds
//! full IDs only — a start is accepted only when containerd's record has exactly the ID the request
//! names — and a removal drops every entry the removed ID could name.
//!
//! Which parts of the claim are compared: namespace, name and uid, which Kubernetes never changes for
//! a pod, and the governance application label, the one label that selects a scope. Other labels are
//! not compared: kubelet builds `sandbox_config` afresh from the pod object for every container start,
//! so after `kubectl label pod` it legitimately sends labels the sandbox was not created with. Those
//! labels decide nothing; the sandbox's own are used and audited.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use k8s_cri::v1 as cri;

use crate::policy::PodContext;

/// Most sandboxes remembered (a node runs a few hundred pods at most).
pub(super) const MAX_SANDBOXES: usize = 4096;

/// Pod contexts of sandboxes containerd confirmed, by sandbox ID. Sandbox IDs are random and never
/// reused, and containerd never changes a sandbox's metadata or labels, so an entry stays true until
/// the sandbox is removed.
#[derive(Default)]
pub struct SandboxCache {
    pods: Mutex<HashMap<String, Arc<PodContext>>>,
}

impl SandboxCache {
    pub fn get(&self, id: &str) -> Option<Arc<PodContext>> {
        self.lock().get(id).cloned()
    }

    pub fn insert(&self, id: &str, pod: Arc<PodContext>) {
        let mut pods = self.lock();
        if !pods.contains_key(id) {
            // Sandboxes removed past pullgate (another client on containerd's own socket) are never
            // dropped by `remove`: make room by forgetting one; it is looked up again when needed.
            super::make_room(&mut pods, MAX_SANDBOXES);
        }
        pods.insert(id.to_string(), pod);
    }

    /// Remembers sandbox `id` as created with `pod` (a `RunPodSandbox` answer). An empty ID is no
    /// answer; an ID already known with another pod is forgotten instead, so that its next start
    /// looks it up.
    pub fn learn(&self, id: &str, pod: Arc<PodContext>) {
        if id.is_empty() {
            return;
        }
        let mut pods = self.lock();
        match pods.get(id) {
            Some(known) if **known != *pod => {
                pods.remove(id);
            }
            Some(_) => {}
            None => {
                super::make_room(&mut pods, MAX_SANDBOXES);
                pods.insert(id.to_string(), pod);
            }
        }
    }

    /// Forgets the sandbox `RemovePodSandbox` named: `id` itself, and every sandbox `id` is a
    /// prefix of (containerd removes the one sandbox a unique prefix names; which one that was is
    /// not known here, so all of them are looked up again when next needed). An empty ID names none.
    pub fn remove(&self, id: &str) {
        if id.is_empty() {
            return;
        }
        self.lock().retain(|k, _| !k.starts_with(id));
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<PodContext>>> {
        self.pods.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn nonempty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

fn pod(
    meta: Option<&cri::PodSandboxMetadata>,
    labels: &std::collections::HashMap<String, String>,
) -> PodContext {
    PodContext {
        namespace: meta.and_then(|m| nonempty(&m.namespace)),
        name: meta.and_then(|m| nonempty(&m.name)),
        uid: meta.and_then(|m| nonempty(&m.uid)),
        labels: labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    }
}

/// The pod context containerd recorded for a sandbox.
pub fn recorded_pod(status: &cri::PodSandboxStatus) -> PodContext {
    pod(status.metadata.as_ref(), &status.labels)
}

/// The pod context of a sandbox as `ListPodSandbox` lists it (containerd's record too).
pub fn listed_pod(sandbox: &cri::PodSandbox) -> PodContext {
    pod(sandbox.metadata.as_ref(), &sandbox.labels)
}

/// The pod context a CRI `PodSandboxConfig` claims (all parts optional).
pub fn claimed_pod(cfg: Option<&cri::PodSandboxConfig>) -> PodContext {
    cfg.map_or_else(PodContext::default, |c| pod(c.metadata.as_ref(), &c.labels))
}

/// Where a request's `sandbox_config` contradicts the sandbox containerd recorded: `None` when it
/// does not. A part the claim leaves empty is no claim; the application label (when a bundle names
/// one) must be the same, present or absent, whenever a `sandbox_config` was sent at all.
pub fn disagreement(
    claim: Option<&cri::PodSandboxConfig>,
    real: &PodContext,
    application_label: Option<&str>,
) -> Option<String> {
    let claim_cfg = claim?;
    let claimed = claimed_pod(Some(claim_cfg));
    let show = |v: Option<&str>| v.map_or_else(|| "none".to_string(), |v| format!("{v:?}"));
    let mut diffs = Vec::new();
    for (what, c, r) in [
        ("namespace", &claimed.namespace, &real.namespace),
        ("name", &claimed.name, &real.name),
        ("uid", &claimed.uid, &real.uid),
    ] {
        if c.is_some() && c != r {
            diffs.push(format!(
                "{what} {} (the sandbox has {})",
                show(c.as_deref()),
                show(r.as_deref())
            ));
        }
    }
    if let Some(label) = application_label {
        let (c, r) = (claimed.labels.get(label), real.labels.get(label));
        if c != r {
            diffs.push(format!(
                "label {label}={} (the sandbox has {})",
                show(c.map(String::as_str)),
                show(r.map(String::as_str))
            ));
        }
    }
    (!diffs.is_empty()).then(|| diffs.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(ns: &str, name: &str, uid: &str, labels: &[(&str, &str)]) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                namespace: ns.into(),
                uid: uid.into(),
                attempt: 0,
            }),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    fn recorded(ns: &str, labels: &[(&str, &str)]) -> PodContext {
        let c = config(ns, "web-1", "u-1", labels);
        recorded_pod(&cri::PodSandboxStatus {
            id: "sb".into(),
            metadata: c.metadata,
            labels: c.labels,
            ..Default::default()
        })
    }

    #[test]
    fn a_claim_must_match_the_recorded_sandbox() {
        let real = recorded("checkout", &[("app", "web"), ("pod-template-hash", "1")]);
        assert_eq!(real.namespace.as_deref(), Some("checkout"));
        let same = config("checkout", "web-1", "u-1", &[("app", "web")]);
        assert_eq!(disagreement(Some(&same), &real, Some("app")), None);
        assert_eq!(disagreement(None, &real, Some("app")), None, "no claim");
        // Other labels changed since the sandbox was created (kubectl label): not a disagreement.
        let relabelled = config("checkout", "web-1", "u-1", &[("app", "web"), ("v", "2")]);
        assert_eq!(disagreement(Some(&relabelled), &real, Some("app")), None);
        // Empty parts claim nothing.
        assert_eq!(
            disagreement(
                Some(&config("", "", "", &[("app", "web")])),
                &real,
                Some("app")
            ),
            None
        );

        let spoofed = config("ledger", "web-1", "u-1", &[("app", "web")]);
        let why = disagreement(Some(&spoofed), &real, Some("app")).unwrap();
        assert!(
            why.contains("namespace \"ledger\"") && why.contains("has \"checkout\""),
            "{why}"
        );
        let other_pod = config("checkout", "web-2", "u-2", &[("app", "web")]);
        let why = disagreement(Some(&other_pod), &real, Some("app")).unwrap();
        assert!(
            why.contains("name \"web-2\"") && why.contains("uid \"u-2\""),
            "{why}"
        );
        let other_app = config("checkout", "web-1", "u-1", &[("app", "admin")]);
        let why = disagreement(Some(&other_app), &real, Some("app")).unwrap();
        assert!(why.contains("label app=\"admin\""), "{why}");
        let no_app = config("checkout", "web-1", "u-1", &[]);
        let why = disagreement(Some(&no_app), &real, Some("app")).unwrap();
        assert!(why.contains("label app=none"), "{why}");
        // Without a bundle there is no application label to compare.
        assert_eq!(disagreement(Some(&no_app), &real, None), None);
    }

    #[test]
    fn the_cache_is_bounded_and_forgets_removed_sandboxes() {
        let cache = SandboxCache::default();
        let pod = Arc::new(recorded("checkout", &[]));
        for i in 0..MAX_SANDBOXES + 10 {
            cache.insert(&format!("sb{i}"), pod.clone());
        }
        assert_eq!(cache.len(), MAX_SANDBOXES);
        let last = format!("sb{}", MAX_SANDBOXES + 9);
        assert!(cache.get(&last).is_some());
        cache.remove(&last);
        assert!(cache.get(&last).is_none());
        assert_eq!(cache.len(), MAX_SANDBOXES - 1);
    }

    #[test]
    fn a_created_sandbox_is_learned_once_and_a_contradicting_answer_forgets_it() {
        let cache = SandboxCache::default();
        let checkout = Arc::new(recorded("checkout", &[]));
        cache.learn("", checkout.clone());
        assert!(cache.is_empty(), "an empty ID names no sandbox");
        cache.learn("sb1", checkout.clone());
        cache.learn("sb1", checkout.clone());
        assert_eq!(cache.get("sb1").as_deref(), Some(&*checkout));
        cache.learn("sb1", Arc::new(recorded("search", &[])));
        assert!(cache.get("sb1").is_none(), "looked up at its next start");
    }

    #[test]
    fn a_removal_by_prefix_forgets_every_sandbox_it_could_name() {
        let cache = SandboxCache::default();
        let pod = Arc::new(recorded("checkout", &[]));
        for id in ["ab12", "ab34", "ac56"] {
            cache.insert(id, pod.clone());
        }
        cache.remove("");
        assert_eq!(cache.len(), 3, "an empty ID names no sandbox");
        cache.remove("ab");
        assert!(cache.get("ab12").is_none() && cache.get("ab34").is_none());
        assert!(cache.get("ac56").is_some());
    }
}
