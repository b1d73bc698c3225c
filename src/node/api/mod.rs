//! The local admin API: gRPC on a root-only unix socket, defined in
//! `proto/pullgate/admin/v1/admin.proto` — `Status`, `InstallBundle`, `Explain`, `WatchDecisions`.
//!
//! This module owns the generated code ([`pb`], fenced here), the caller check both sides agree on
//! ([`Access`]: root, the daemon's own user and `admin.allowed_uids`, by the peer's credentials) and
//! the client the CLI uses ([`AdminClient`]). The daemon's side — the socket and the service over the
//! running node — is `crate::node::daemon::api`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tonic::transport::{Channel, Endpoint};

/// The generated messages, client and server of `pullgate.admin.v1`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("pullgate.admin.v1");
}

/// Who may call the admin API: root, the daemon's own user, and the configured uids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    allowed: Vec<u32>,
}

impl Access {
    /// Root, `own_uid` and `extra`.
    pub fn new(own_uid: u32, extra: &[u32]) -> Access {
        let mut allowed = vec![0, own_uid];
        allowed.extend_from_slice(extra);
        allowed.sort_unstable();
        allowed.dedup();
        Access { allowed }
    }

    /// Checks a caller by the uid its socket connection carries (SO_PEERCRED). A connection without
    /// credentials is refused.
    pub fn check(&self, peer_uid: Option<u32>) -> Result<(), tonic::Status> {
        match peer_uid {
            Some(uid) if self.allowed.contains(&uid) => Ok(()),
            Some(uid) => Err(tonic::Status::permission_denied(format!(
                "pullgate admin API: uid {uid} may not use it (root and pullgate's own user only; add the uid to admin.allowed_uids to allow it)"
            ))),
            None => Err(tonic::Status::permission_denied(
                "pullgate admin API: the caller's credentials are unknown; refused",
            )),
        }
    }
}

/// Why a call to the daemon's admin API failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Nothing listens on the socket: the daemon is not running (or its admin API is off).
    #[error("the pullgate daemon is not running (nothing listens on {}: {source})", path.display())]
    NotRunning {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The socket or the daemon refused this caller.
    #[error("permission denied: {detail} (the admin socket {} is for root only; run as root)", path.display())]
    PermissionDenied { path: PathBuf, detail: String },
    /// Any other failure to connect.
    #[error("cannot connect to the pullgate daemon at {}: {detail}", path.display())]
    Connect { path: PathBuf, detail: String },
    /// The call itself failed.
    #[error("the pullgate daemon at {} answered {}: {}", path.display(), status.code(), status.message())]
    Call {
        path: PathBuf,
        status: Box<tonic::Status>,
    },
}

/// A client of the daemon's admin API.
pub struct AdminClient {
    path: PathBuf,
    inner: pb::admin_client::AdminClient<Channel>,
}

impl AdminClient {
    /// Connects to the admin socket at `path`. A missing socket or a refused connection is
    /// [`ApiError::NotRunning`]; no permission is [`ApiError::PermissionDenied`].
    pub async fn connect(path: &Path) -> Result<AdminClient, ApiError> {
        // Connect once here to tell "not running" from "not allowed"; the channel takes this
        // stream and opens new ones only if it has to reconnect.
        let first = tokio::net::UnixStream::connect(path)
            .await
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    ApiError::NotRunning {
                        path: path.to_path_buf(),
                        source,
                    }
                }
                std::io::ErrorKind::PermissionDenied => ApiError::PermissionDenied {
                    path: path.to_path_buf(),
                    detail: source.to_string(),
                },
                _ => ApiError::Connect {
                    path: path.to_path_buf(),
                    detail: source.to_string(),
                },
            })?;
        let first = Arc::new(Mutex::new(Some(first)));
        let socket = path.to_path_buf();
        let channel = Endpoint::from_static("http://pullgate-admin.invalid")
            .connect_with_connector(tower::service_fn(move |_| {
                let (first, socket) = (first.clone(), socket.clone());
                async move {
                    let taken = first.lock().unwrap_or_else(|e| e.into_inner()).take();
                    let stream = match taken {
                        Some(s) => s,
                        None => tokio::net::UnixStream::connect(socket).await?,
                    };
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }))
            .await
            .map_err(|e| ApiError::Connect {
                path: path.to_path_buf(),
                detail: e.to_string(),
            })?;
        Ok(AdminClient {
            path: path.to_path_buf(),
            inner: pb::admin_client::AdminClient::new(channel)
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
        })
    }

    fn error(&self, status: tonic::Status) -> ApiError {
        if status.code() == tonic::Code::PermissionDenied {
            return ApiError::PermissionDenied {
                path: self.path.clone(),
                detail: status.message().to_owned(),
            };
        }
        ApiError::Call {
            path: self.path.clone(),
            status: Box::new(status),
        }
    }

    pub async fn status(&mut self) -> Result<pb::StatusResponse, ApiError> {
        match self.inner.status(pb::StatusRequest {}).await {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => Err(self.error(s)),
        }
    }

    pub async fn install_bundle(
        &mut self,
        bundle: Vec<u8>,
        signatures: Vec<u8>,
    ) -> Result<pb::InstallBundleResponse, ApiError> {
        let req = pb::InstallBundleRequest { bundle, signatures };
        match self.inner.install_bundle(req).await {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => Err(self.error(s)),
        }
    }

    pub async fn explain(
        &mut self,
        req: pb::ExplainRequest,
    ) -> Result<pb::ExplainResponse, ApiError> {
        match self.inner.explain(req).await {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => Err(self.error(s)),
        }
    }

    /// The stream of decisions; read it with `message().await`.
    pub async fn watch_decisions(
        &mut self,
        req: pb::WatchDecisionsRequest,
    ) -> Result<tonic::Streaming<pb::WatchDecisionsResponse>, ApiError> {
        match self.inner.watch_decisions(req).await {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => Err(self.error(s)),
        }
    }

    /// Maps a stream error to an [`ApiError`].
    pub fn stream_error(&self, status: tonic::Status) -> ApiError {
        self.error(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_own_user_and_listed_uids_only() {
        let a = Access::new(0, &[]);
        assert!(a.check(Some(0)).is_ok());
        let e = a.check(Some(65534)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("uid 65534"), "{}", e.message());
        assert!(a.check(None).is_err(), "no credentials, no access");
        let a = Access::new(998, &[1000]);
        for uid in [0, 998, 1000] {
            assert!(a.check(Some(uid)).is_ok(), "{uid}");
        }
        assert!(a.check(Some(1001)).is_err());
    }
}
