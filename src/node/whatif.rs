//! What a new bundle would do to the containers running on this node (`pullgate bundle what-if`).
//!
//! Two halves:
//!
//! - [`inventory`] asks containerd, over its CRI socket, for the pods (`ListPodSandbox`: their real
//!   namespace, name, UID and labels), the containers (`ListContainers`) and, once per distinct image
//!   ID and concurrently, the image's repo digests — kept only when proven from content exactly as a
//!   container start proves them ([`lookup::verified_repo_digests`]).
//! - [`compare`] is pure: every container is decided under the installed bundle and under the new
//!   one, as a container start would be (by its proven repo digests, for its pod, at `now`, with the
//!   node's mode), and classified ([`Change`]). No clock is read and nothing is asked of containerd.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_cri::v1 as cri;
use time::OffsetDateTime;

use crate::node::config::NodeMode;
use crate::node::enforce::{lookup, sandbox};
use crate::node::proxy::Upstream;
use crate::node::proxy::grpc::Status;
use crate::policy::bundle::rfc3339;
use crate::policy::{
    self, Decision, ImageRequest, PodContext, ReasonCode, Verdict, VerifiedBundle,
};

/// How many image lookups run at once (each is an `ImageStatus` and a few content reads).
const LOOKUP_CONCURRENCY: usize = 16;

/// One container on the node, with what a start of it would be decided by.
#[derive(Debug, Clone)]
pub struct Container {
    /// Container ID.
    pub id: String,
    /// Container name (from its metadata).
    pub name: String,
    /// CRI state (`CONTAINER_RUNNING`, …).
    pub state: String,
    /// The pod it belongs to.
    pub pod: PodContext,
    /// The image as the pod spec named it (falls back to the image ID).
    pub image: String,
    /// The image ID it runs.
    pub image_id: String,
    /// The image's repo digests proven from content.
    pub repo_digests: Arc<Vec<String>>,
}

/// Reads the node's pods, containers and images from containerd.
pub async fn inventory(upstream: &Arc<Upstream>) -> Result<Vec<Container>, Status> {
    let pods = lookup::pod_sandboxes(upstream).await?;
    let containers: cri::ListContainersResponse = lookup::unary(
        upstream,
        "/runtime.v1.RuntimeService/ListContainers",
        &cri::ListContainersRequest { filter: None },
    )
    .await?;
    let pods: HashMap<String, PodContext> = pods
        .into_iter()
        .map(|p| (p.id.clone(), sandbox::listed_pod(&p)))
        .collect();
    // Each distinct image once, several at a time.
    let mut ids: Vec<String> = containers
        .containers
        .iter()
        .map(image_id_of)
        .filter(|id| !id.is_empty())
        .collect();
    ids.sort();
    ids.dedup();
    let mut digests: HashMap<String, Arc<Vec<String>>> = HashMap::with_capacity(ids.len());
    let mut tasks = tokio::task::JoinSet::new();
    let mut pending = ids.into_iter();
    loop {
        while tasks.len() < LOOKUP_CONCURRENCY {
            let Some(id) = pending.next() else { break };
            let upstream = upstream.clone();
            tasks.spawn(async move {
                let proven = lookup::proven_digests(&upstream, &id).await;
                (id, proven)
            });
        }
        let Some(done) = tasks.join_next().await else {
            break;
        };
        let (id, proven) = done.map_err(|e| {
            Status::new(
                crate::node::proxy::grpc::Code::Internal,
                format!("an image lookup task failed: {e}"),
            )
        })?;
        digests.insert(id, Arc::new(proven?));
    }
    let none = Arc::new(Vec::new());
    Ok(containers
        .containers
        .into_iter()
        .map(|c| {
            let image_id = image_id_of(&c);
            let image = c
                .image
                .as_ref()
                .map(|i| {
                    if i.user_specified_image.is_empty() {
                        i.image.clone()
                    } else {
                        i.user_specified_image.clone()
                    }
                })
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| image_id.clone());
            Container {
                pod: pods.get(&c.pod_sandbox_id).cloned().unwrap_or_default(),
                name: c.metadata.map(|m| m.name).unwrap_or_default(),
                state: cri::ContainerState::try_from(c.state)
                    .map(|s| s.as_str_name().to_owned())
                    .unwrap_or_else(|_| c.state.to_string()),
                repo_digests: digests.get(&image_id).cloned().unwrap_or(none.clone()),
                image,
                image_id,
                id: c.id,
            }
        })
        .collect())
}

/// The image ID a container runs: `image_ref` (containerd's resolved ID), else its image spec.
fn image_id_of(c: &cri::Container) -> String {
    if !c.image_ref.is_empty() {
        return c.image_ref.clone();
    }
    c.image
        .as_ref()
        .map(|i| i.image.clone())
        .unwrap_or_default()
}

/// How a container fares under the new bundle compared with the installed one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Allowed before and after, nothing ahead within the horizon.
    Unchanged,
    /// Allowed (or warned) now, denied under the new bundle.
    NewlyDenied,
    /// Denied under both.
    StillDenied,
    /// Denied now, allowed under the new bundle.
    NewlyAllowed,
    /// Deprecated under the new bundle, not under the installed one.
    NewlyDeprecated,
    /// Allowed under the new bundle, but sunset within the horizon.
    SunsetSoon { at: OffsetDateTime },
    /// Allowed under the new bundle only by an exception that expires within the horizon.
    ExceptionExpiring { at: OffsetDateTime, ticket: String },
}

impl Change {
    /// Stable snake_case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Change::Unchanged => "unchanged",
            Change::NewlyDenied => "newly_denied",
            Change::StillDenied => "still_denied",
            Change::NewlyAllowed => "newly_allowed",
            Change::NewlyDeprecated => "newly_deprecated",
            Change::SunsetSoon { .. } => "sunset_soon",
            Change::ExceptionExpiring { .. } => "exception_expiring",
        }
    }
}

/// One container's two decisions.
#[derive(Debug, Clone)]
pub struct Row {
    pub container: Container,
    pub installed: Decision,
    pub new: Decision,
    pub change: Change,
}

/// The whole comparison.
#[derive(Debug, Clone)]
pub struct Report {
    pub rows: Vec<Row>,
    pub installed_version: Option<u64>,
    pub new_version: u64,
    pub now: OffsetDateTime,
    pub horizon_days: u32,
}

/// Decides every container under the installed bundle (or, without one, as the node would:
/// `no_valid_bundle`, with `installed_problem`) and under `new`, at `now`, with the node's `mode`;
/// a sunset or exception expiry within `horizon_days` is reported.
pub fn compare(
    containers: Vec<Container>,
    installed: Option<&VerifiedBundle>,
    installed_problem: Option<&str>,
    new: &VerifiedBundle,
    mode: NodeMode,
    now: OffsetDateTime,
    horizon_days: u32,
) -> Report {
    let horizon = now + time::Duration::days(i64::from(horizon_days));
    let decide = |b: Option<&VerifiedBundle>, c: &Container, at: OffsetDateTime| {
        let req = ImageRequest::RepoDigests {
            image: &c.image,
            repo_digests: &c.repo_digests,
        };
        let mut d = match b {
            Some(b) => policy::decide(&req, b, &c.pod, at),
            None => policy::decide_without_bundle(&req, installed_problem),
        };
        if mode == NodeMode::Warn && d.verdict == Verdict::Deny {
            d.verdict = Verdict::Warn;
        }
        d
    };
    let rows = containers
        .into_iter()
        .map(|c| {
            let old = decide(installed, &c, now);
            let new_d = decide(Some(new), &c, now);
            let denied = |d: &Decision| d.verdict == Verdict::Deny;
            let change = if denied(&new_d) {
                if denied(&old) {
                    Change::StillDenied
                } else {
                    Change::NewlyDenied
                }
            } else if let Some(x) = new_d.exception.as_ref().filter(|x| {
                new_d.reason == ReasonCode::Exception && x.exception.expires_at <= horizon
            }) {
                Change::ExceptionExpiring {
                    at: x.exception.expires_at,
                    ticket: x.exception.ticket.clone(),
                }
            } else if let Some(at) = new_d
                .lifecycle
                .as_ref()
                .and_then(|l| l.lifecycle.sunset_at)
                .filter(|t| *t <= horizon && decide(Some(new), &c, *t).reason == ReasonCode::Sunset)
            {
                Change::SunsetSoon { at }
            } else if denied(&old) {
                Change::NewlyAllowed
            } else if new_d.reason == ReasonCode::Deprecated && old.reason != ReasonCode::Deprecated
            {
                Change::NewlyDeprecated
            } else {
                Change::Unchanged
            };
            Row {
                container: c,
                installed: old,
                new: new_d,
                change,
            }
        })
        .collect();
    Report {
        rows,
        installed_version: installed.map(|b| b.version),
        new_version: new.version,
        now,
        horizon_days,
    }
}

impl Report {
    /// How many containers each change applies to.
    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        let mut m = BTreeMap::new();
        for r in &self.rows {
            *m.entry(r.change.as_str()).or_default() += 1;
        }
        m
    }

    /// Containers the new bundle would deny (a start or restart of them would fail).
    pub fn denied(&self) -> usize {
        self.rows
            .iter()
            .filter(|r| r.new.verdict == Verdict::Deny)
            .count()
    }

    /// One line: the counts, and whether anything running would be denied.
    pub fn summary(&self) -> String {
        let c = self.counts();
        let n = |k: &str| c.get(k).copied().unwrap_or(0);
        format!(
            "what-if bundle v{} (installed: {}) for {} containers: {} newly denied, {} still denied, {} newly deprecated, {} sunset within {} days, {} kept only by an exception expiring within {} days, {} newly allowed, {} unchanged; {}",
            self.new_version,
            self.installed_version
                .map_or_else(|| "none".to_owned(), |v| format!("v{v}")),
            self.rows.len(),
            n("newly_denied"),
            n("still_denied"),
            n("newly_deprecated"),
            n("sunset_soon"),
            self.horizon_days,
            n("exception_expiring"),
            self.horizon_days,
            n("newly_allowed"),
            n("unchanged"),
            match self.denied() {
                0 => "nothing running would be denied".to_owned(),
                d => format!("{d} running container(s) would be denied"),
            }
        )
    }

    /// The report as text: one line per container that is not unchanged, then the summary.
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        for r in self.rows.iter().filter(|r| r.change != Change::Unchanged) {
            let c = &r.container;
            let _ = write!(
                out,
                "{:<19} {}/{} container {} ({}) image {}: {} {} -> {} {}",
                r.change.as_str(),
                c.pod.namespace.as_deref().unwrap_or("-"),
                c.pod.name.as_deref().unwrap_or("-"),
                c.name,
                short(&c.id),
                c.image,
                r.installed.verdict,
                r.installed.reason,
                r.new.verdict,
                r.new.reason
            );
            match &r.change {
                Change::SunsetSoon { at } => {
                    let _ = write!(out, " (sunset at {})", rfc3339(*at));
                }
                Change::ExceptionExpiring { at, ticket } => {
                    let _ = write!(out, " (exception {ticket} expires at {})", rfc3339(*at));
                }
                _ => {}
            }
            if r.new.reason.is_denial() || r.new.reason == ReasonCode::Deprecated {
                let _ = write!(out, ": {}", r.new.message);
            }
            out.push('\n');
        }
        out.push_str(&self.summary());
        out.push('\n');
        out
    }

    /// The report as one JSON object: `summary`, `counts`, `denied`, and `containers` (every
    /// container, with both decisions as `pullgate explain --json` prints them).
    pub fn to_json(&self) -> serde_json::Value {
        let containers: Vec<_> = self
            .rows
            .iter()
            .map(|r| {
                let c = &r.container;
                let mut change = serde_json::json!({"kind": r.change.as_str()});
                match &r.change {
                    Change::SunsetSoon { at } => change["at"] = rfc3339(*at).into(),
                    Change::ExceptionExpiring { at, ticket } => {
                        change["at"] = rfc3339(*at).into();
                        change["ticket"] = ticket.clone().into();
                    }
                    _ => {}
                }
                serde_json::json!({
                    "id": c.id,
                    "name": c.name,
                    "state": c.state,
                    "pod": {
                        "namespace": c.pod.namespace,
                        "name": c.pod.name,
                        "uid": c.pod.uid,
                    },
                    "image": c.image,
                    "image_id": c.image_id,
                    "repo_digests": &*c.repo_digests,
                    "change": change,
                    "installed": r.installed.to_json(),
                    "new": r.new.to_json(),
                })
            })
            .collect();
        serde_json::json!({
            "summary": self.summary(),
            "installed_version": self.installed_version,
            "new_version": self.new_version,
            "at": rfc3339(self.now),
            "horizon_days": self.horizon_days,
            "counts": self.counts(),
            "denied": self.denied(),
            "containers": containers,
        })
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(13)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testutil::*;
    use serde_json::json;

    fn container(name: &str, ns: &str, app: Option<&str>, repo_digest: String) -> Container {
        let mut labels = BTreeMap::new();
        if let Some(a) = app {
            labels.insert("corp.example/application".to_owned(), a.to_owned());
        }
        Container {
            id: format!("{name}-0123456789abcdef"),
            name: name.into(),
            state: "CONTAINER_RUNNING".into(),
            pod: PodContext {
                namespace: Some(ns.into()),
                name: Some(format!("{name}-pod")),
                uid: None,
                labels,
            },
            image: format!("{name}:image"),
            image_id: format!("sha256:{name}"),
            repo_digests: Arc::new(vec![repo_digest]),
        }
    }

    fn mirror(path: &str, n: u8) -> String {
        format!("registry.corp/approved/library/{path}@{}", digest(n))
    }

    #[test]
    fn classifies_each_container() {
        let installed = v2_bundle_with(|_| {});
        // The new bundle: busybox loses its approval, nginx 1.26 gets a lifecycle, redis 7.2 a
        // sunset in 10 days, and a short exception for an unapproved redis digest.
        let new = v2_bundle_with(|v| {
            v["version"] = 44.into();
            v["images"].as_array_mut().unwrap().remove(4);
            v["images"][0]["tags"]["1.26"] =
                json!({"digest": digest(2).to_string(), "deprecated_at": "2026-03-05T00:00:00Z"});
            v["images"][2]["tags"]["7.2"] =
                json!({"digest": digest(4).to_string(), "sunset_at": "2026-03-20T00:00:00Z"});
            v["images"][2]["digests"][0]
                .as_object_mut()
                .unwrap()
                .remove("replacement");
            v["exceptions"][0]["digest"] = json!(digest(11).to_string());
            v["exceptions"][0].as_object_mut().unwrap().remove("tag");
        });
        let containers = vec![
            container("nginx", "checkout", None, mirror("nginx", 2)),
            container("busybox", "search-index", None, mirror("busybox", 8)),
            container("redis", "checkout", Some("web"), mirror("redis", 4)),
            container(
                "pause",
                "search-index",
                None,
                format!("registry.corp/approved-k8s/pause@{}", digest(3)),
            ),
            container("odd", "checkout", None, mirror("redis", 11)),
            container("unknown", "checkout", None, mirror("nope", 12)),
        ];
        let r = compare(
            containers,
            Some(&installed),
            None,
            &new,
            NodeMode::Enforce,
            v2_now(),
            14,
        );
        let kinds: Vec<(&str, &str)> = r
            .rows
            .iter()
            .map(|r| (r.container.name.as_str(), r.change.as_str()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("nginx", "newly_deprecated"),
                ("busybox", "newly_denied"),
                ("redis", "sunset_soon"),
                ("pause", "unchanged"),
                ("odd", "exception_expiring"),
                ("unknown", "still_denied"),
            ]
        );
        assert_eq!(r.denied(), 2);
        let text = r.to_text();
        assert!(
            text.contains("busybox") && text.contains("not_in_bundle"),
            "{text}"
        );
        assert!(r.summary().contains("1 newly denied, 1 still denied, 1 newly deprecated, 1 sunset within 14 days, 1 kept only by an exception"), "{}", r.summary());
        assert!(
            r.summary()
                .ends_with("2 running container(s) would be denied")
        );
        let j = r.to_json();
        assert_eq!(j["containers"][2]["change"]["at"], "2026-03-20T00:00:00Z");
        assert_eq!(j["containers"][4]["change"]["ticket"], "SEC-1234");
        assert_eq!(j["containers"][1]["new"]["reason"], "not_in_bundle");
        // A shorter horizon does not see the sunset or the expiry.
        let again = compare(
            vec![container(
                "redis",
                "checkout",
                Some("web"),
                mirror("redis", 4),
            )],
            Some(&installed),
            None,
            &new,
            NodeMode::Enforce,
            v2_now(),
            5,
        );
        assert_eq!(again.rows[0].change, Change::Unchanged);
        // Without an installed bundle every container is denied now; the node's warn mode allows.
        let without_bundle = |mode| {
            let pause = format!("registry.corp/approved-k8s/pause@{}", digest(3));
            let c = container("pause", "search-index", None, pause);
            compare(vec![c], None, Some("no bundle"), &new, mode, v2_now(), 14)
        };
        let none = without_bundle(NodeMode::Warn);
        assert_eq!(
            none.rows[0].change,
            Change::Unchanged,
            "warn mode denies nothing"
        );
        let none = without_bundle(NodeMode::Enforce);
        assert_eq!(none.rows[0].change, Change::NewlyAllowed);
        assert_eq!(none.denied(), 0);
    }
}
