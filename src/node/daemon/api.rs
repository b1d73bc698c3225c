//! The daemon's side of the local admin API ([`crate::node::api`]): the socket (`admin.socket`, mode
//! 0600, owned by the daemon's user) and the service over the running [`Node`].
//!
//! Every call first passes the caller check ([`Access`]) on the peer credentials of its connection,
//! so a socket whose mode was loosened by mistake still does not let other users in.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use tokio::sync::broadcast::error::RecvError;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use super::listener::{self, ListenError, SocketGuard};
use super::node::Node;
use crate::node::api::{Access, pb};
use crate::node::audit::AuditRecord;
use crate::policy::{ImageRequest, PodContext, Verdict};

/// Room in an `InstallBundle` message beside the bundle: its signatures (a few hundred bytes per
/// administrator) and the message's own framing.
const INSTALL_ALLOWANCE: usize = 1024 * 1024;

/// Largest message either way: an `InstallBundle` of the largest bundle the node installs
/// (`policy.max_bundle_size`, fixed at start like the bundle store's), so a larger one is refused on
/// its length prefix instead of being read into memory first.
fn max_message(max_bundle_size: u64) -> usize {
    usize::try_from(max_bundle_size)
        .unwrap_or(usize::MAX)
        .saturating_add(INSTALL_ALLOWANCE)
}

/// The service over a running node.
pub struct AdminService {
    node: Arc<Node>,
}

type DecisionStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchDecisionsResponse, Status>> + Send>>;

fn text(v: &serde_json::Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let s = self.node.status_json();
        let bundle = s["bundle"].as_object().map(|b| pb::BundleSummary {
            version: b["version"].as_u64().unwrap_or(0),
            issuer: text(&b["issuer"]),
            issued_at: text(&b["issued_at"]),
            expires_at: text(&b["expires_at"]),
            expired: b["expired"].as_bool().unwrap_or(false),
            images: b["images"].as_u64().unwrap_or(0),
        });
        let sync = s["sync"].as_object().map(|y| pb::SyncSummary {
            source: text(&y["source"]),
            state: text(&y["state"]),
            stale: y["stale"].as_bool().unwrap_or(false),
            last_success_at: text(&y["last_success_at"]),
            next_round_at: text(&y["next_round_at"]),
            consecutive_failures: y["consecutive_failures"].as_u64().unwrap_or(0) as u32,
            last_error: text(&y["last_error"]["message"]),
            position: y["position"].as_i64().map_or(-1, |p| p as i32),
            pending_version: y["pending"]["version"].as_u64().unwrap_or(0),
            pending_wave_opens_at: text(&y["pending"]["wave_opens_at"]),
        });
        Ok(Response::new(pb::StatusResponse {
            mode: text(&s["mode"]),
            bundle,
            bundle_problem: text(&s["bundle_problem"]),
            sync,
            json: s.to_string(),
        }))
    }

    async fn install_bundle(
        &self,
        req: Request<pb::InstallBundleRequest>,
    ) -> Result<Response<pb::InstallBundleResponse>, Status> {
        let pb::InstallBundleRequest { bundle, signatures } = req.into_inner();
        let node = self.node.clone();
        let installed = tokio::task::spawn_blocking(move || {
            node.install_bytes(
                &bundle,
                &signatures,
                time::OffsetDateTime::now_utc(),
                "admin API",
            )
        })
        .await
        .map_err(|e| Status::internal(format!("the install task failed: {e}")))?;
        let result = match installed {
            Ok(b) => pb::install_bundle_response::Result::Installed(pb::Installed {
                version: b.version,
                images: b.images().len() as u64,
                expires_at: b.expires_at_string(),
            }),
            Err(e) => pb::install_bundle_response::Result::Rejected(pb::Rejected {
                reason: e.reason().to_owned(),
                message: e.to_string(),
            }),
        };
        Ok(Response::new(pb::InstallBundleResponse {
            result: Some(result),
        }))
    }

    async fn explain(
        &self,
        req: Request<pb::ExplainRequest>,
    ) -> Result<Response<pb::ExplainResponse>, Status> {
        let r = req.into_inner();
        let pod = PodContext {
            namespace: Some(r.namespace).filter(|n| !n.is_empty()),
            name: Some(r.pod).filter(|n| !n.is_empty()),
            uid: None,
            labels: r.labels.into_iter().collect(),
        };
        let d = self.node.state.decide(
            &ImageRequest::Reference(&r.image),
            &pod,
            time::OffsetDateTime::now_utc(),
        );
        Ok(Response::new(pb::ExplainResponse {
            verdict: d.verdict.as_str().to_owned(),
            reason: d.reason.as_str().to_owned(),
            message: d.message.clone(),
            pull_ref: d.pull_ref.clone().unwrap_or_default(),
            digest: d.digest.as_ref().map(|x| x.to_string()).unwrap_or_default(),
            bundle_version: d.bundle_version.unwrap_or(0),
            json: d.to_json().to_string(),
        }))
    }

    type WatchDecisionsStream = DecisionStream;

    async fn watch_decisions(
        &self,
        req: Request<pb::WatchDecisionsRequest>,
    ) -> Result<Response<DecisionStream>, Status> {
        let filter = req.into_inner();
        let rx = self.node.enforcer.watch_decisions();
        let stream = futures_util::stream::unfold((rx, filter), |(mut rx, filter)| async move {
            loop {
                let event = match rx.recv().await {
                    Ok(rec) if wanted(&filter, &rec) => {
                        pb::watch_decisions_response::Event::Decision(decision(&rec))
                    }
                    Ok(_) => continue,
                    Err(RecvError::Lagged(missed)) => {
                        pb::watch_decisions_response::Event::Lagged(pb::Lagged { missed })
                    }
                    Err(RecvError::Closed) => return None,
                };
                let item = Ok(pb::WatchDecisionsResponse { event: Some(event) });
                return Some((item, (rx, filter)));
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

fn wanted(f: &pb::WatchDecisionsRequest, rec: &AuditRecord) -> bool {
    (!f.deny_only || rec.decision != Verdict::Allow.as_str())
        && (f.namespace.is_empty() || rec.pod_namespace.as_deref() == Some(f.namespace.as_str()))
        && (f.methods.is_empty() || f.methods.contains(&rec.method))
}

fn decision(rec: &AuditRecord) -> pb::Decision {
    let s = |o: &Option<String>| o.clone().unwrap_or_default();
    pb::Decision {
        time: rec.time.clone(),
        method: rec.method.clone(),
        pod_namespace: s(&rec.pod_namespace),
        pod_name: s(&rec.pod_name),
        image: rec.image.clone(),
        normalized: s(&rec.normalized),
        pulled: s(&rec.pulled),
        digest: s(&rec.digest),
        verdict: rec.decision.clone(),
        reason: rec.reason.clone(),
        message: rec.message.clone(),
        scope: s(&rec.scope),
        bundle_version: rec.bundle_version.unwrap_or(0),
        latency_us: rec.latency_us,
    }
}

/// Binds `admin.socket` (if configured) and serves the admin API on it until the process ends; the
/// socket is removed when the task is dropped.
pub fn start(node: &Arc<Node>) -> Result<(), ListenError> {
    let Some(path) = node.config.admin.socket.clone() else {
        return Ok(());
    };
    let guard = Arc::new(listener::bind(&path, 0o600, None)?);
    // SAFETY: geteuid has no preconditions and cannot fail.
    let access = Access::new(unsafe { libc::geteuid() }, &node.config.admin.allowed_uids);
    let check = move |req: Request<()>| {
        let uid = req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
            .map(|c| c.uid());
        access.check(uid).inspect_err(|_| {
            tracing::warn!(uid = ?uid, "admin API: refused a caller (not root, not pullgate's user, not in admin.allowed_uids)")
        })?;
        Ok(req)
    };
    let limit = max_message(node.store.max_bundle_size());
    let server = pb::admin_server::AdminServer::new(AdminService { node: node.clone() })
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let service = tonic::service::interceptor::InterceptedService::new(server, check);
    let incoming = futures_util::stream::unfold(guard, |g: Arc<SocketGuard>| async move {
        loop {
            match g.listener.accept().await {
                Ok((stream, _)) => return Some((Ok::<_, std::io::Error>(stream), g)),
                Err(e) => {
                    // EMFILE and friends: back off briefly rather than spin.
                    tracing::warn!(error = %e, "admin API: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    });
    tracing::info!(socket = %path.display(), "serving the admin API");
    tokio::spawn(async move {
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await
        {
            tracing::error!(error = %e, "the admin API stopped");
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(method: &str, namespace: Option<&str>, verdict: &str) -> AuditRecord {
        AuditRecord {
            method: method.into(),
            pod_namespace: namespace.map(str::to_owned),
            image: "busybox:1.36".into(),
            decision: verdict.into(),
            ..Default::default()
        }
    }

    #[test]
    fn watch_filters_deny_only_namespace_and_methods() {
        let all = pb::WatchDecisionsRequest::default();
        let allow = rec("PullImage", Some("default"), "allow");
        let deny = rec("PullImage", Some("default"), "deny");
        let warn = rec("CreateContainer", Some("kube-system"), "warn");
        let no_pod = rec("ImageStatus", None, "deny");
        for r in [&allow, &deny, &warn, &no_pod] {
            assert!(wanted(&all, r), "{r:?}");
        }
        let deny_only = pb::WatchDecisionsRequest {
            deny_only: true,
            ..Default::default()
        };
        assert!(!wanted(&deny_only, &allow));
        assert!(wanted(&deny_only, &deny) && wanted(&deny_only, &warn));
        let ns = pb::WatchDecisionsRequest {
            namespace: "default".into(),
            ..Default::default()
        };
        assert!(wanted(&ns, &allow) && wanted(&ns, &deny));
        assert!(!wanted(&ns, &warn) && !wanted(&ns, &no_pod));
        let methods = pb::WatchDecisionsRequest {
            methods: vec!["CreateContainer".into(), "ImageStatus".into()],
            ..Default::default()
        };
        assert!(!wanted(&methods, &allow));
        assert!(wanted(&methods, &warn) && wanted(&methods, &no_pod));
        let both = pb::WatchDecisionsRequest {
            deny_only: true,
            namespace: "kube-system".into(),
            methods: vec!["CreateContainer".into()],
        };
        assert!(wanted(&both, &warn) && !wanted(&both, &deny));
        let d = decision(&warn);
        assert_eq!(
            (
                d.method.as_str(),
                d.pod_namespace.as_str(),
                d.verdict.as_str()
            ),
            ("CreateContainer", "kube-system", "warn")
        );
        assert_eq!((d.pod_name.as_str(), d.bundle_version), ("", 0));
    }
}
