//! The containerd side of the proxy: one shared HTTP/2 connection over containerd's unix socket,
//! opened lazily on the first call and opened again when containerd restarts.
//!
//! Every call clones the cached `SendRequest` handle (a channel sender) and sends on it; HTTP/2
//! multiplexes all calls over the one connection. When the connection is found closed, one caller
//! reconnects while the others wait for it (single flight), and a request that never left pullgate
//! because the connection had just died is retried once on the new connection. While containerd is
//! down, calls fail fast with an [`UpstreamError`] that names the socket; the daemon keeps running.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::UnixStream;

use super::body::RequestBody;
use super::grpc::{Code, Status};

/// HTTP/2 flow-control windows: large enough that a 16 MiB message is not throttled by
/// WINDOW_UPDATE round trips.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// How long opening the connection (not a call) may take before the call fails as unavailable.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a call could not be forwarded to containerd.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to the upstream runtime socket {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP/2 handshake with the upstream runtime at {} failed: {source}", path.display())]
    Handshake {
        path: PathBuf,
        #[source]
        source: hyper::Error,
    },
    #[error("HTTP/2 handshake with the upstream runtime at {} timed out", path.display())]
    HandshakeTimeout { path: PathBuf },
    #[error("the call to the upstream runtime at {} failed: {source}", path.display())]
    Call {
        path: PathBuf,
        #[source]
        source: hyper::Error,
    },
}

impl UpstreamError {
    /// Every upstream failure is `UNAVAILABLE` to the client: the runtime may come back, retry.
    pub fn status(&self) -> Status {
        Status::new(Code::Unavailable, format!("pullgate: {self}"))
    }
}

/// A lazily connected, self-healing HTTP/2 client for containerd's socket.
pub struct Upstream {
    path: PathBuf,
    /// The socket path as text, shared with response bodies for their error trailers.
    name: Arc<str>,
    /// The live connection's request handle, if any. A plain mutex: held only to clone or replace.
    cached: Mutex<Option<SendRequest<RequestBody>>>,
    /// Serialises reconnects so a restart of containerd causes one handshake, not one per caller.
    connecting: tokio::sync::Mutex<()>,
}

impl Upstream {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        Upstream {
            name: Arc::from(path.display().to_string()),
            path,
            cached: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Whether a connection is open right now (without trying to open one).
    pub fn is_connected(&self) -> bool {
        self.cached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|s| !s.is_closed())
    }

    /// Sends one request to containerd and returns its response head and streaming body.
    pub async fn send(
        &self,
        req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut sender = self.sender().await?;
        match sender.try_send_request(req).await {
            Ok(resp) => Ok(resp),
            Err(mut e) => {
                // The request never left (the connection was already gone): reconnect and retry once.
                if let Some(req) = e.take_message() {
                    self.invalidate(&sender);
                    let mut sender = self.sender().await?;
                    return sender
                        .send_request(req)
                        .await
                        .map_err(|source| UpstreamError::Call {
                            path: self.path.clone(),
                            source,
                        });
                }
                Err(UpstreamError::Call {
                    path: self.path.clone(),
                    source: e.into_error(),
                })
            }
        }
    }

    /// Opens the connection now (used for readiness checks and tests); a no-op if open.
    pub async fn connect(&self) -> Result<(), UpstreamError> {
        self.sender().await.map(|_| ())
    }

    fn current(&self) -> Option<SendRequest<RequestBody>> {
        let cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        cached.as_ref().filter(|s| !s.is_closed()).cloned()
    }

    async fn sender(&self) -> Result<SendRequest<RequestBody>, UpstreamError> {
        if let Some(s) = self.current() {
            return Ok(s);
        }
        let _guard = self.connecting.lock().await;
        // Someone else may have reconnected while we waited.
        if let Some(s) = self.current() {
            return Ok(s);
        }
        let sender = self.handshake().await?;
        *self.cached.lock().unwrap_or_else(|e| e.into_inner()) = Some(sender.clone());
        Ok(sender)
    }

    fn invalidate(&self, dead: &SendRequest<RequestBody>) {
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if cached
            .as_ref()
            .is_some_and(|s| s.is_closed() || dead.is_closed())
        {
            *cached = None;
        }
    }

    async fn handshake(&self) -> Result<SendRequest<RequestBody>, UpstreamError> {
        let stream =
            UnixStream::connect(&self.path)
                .await
                .map_err(|source| UpstreamError::Connect {
                    path: self.path.clone(),
                    source,
                })?;
        let handshake = http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_header_list_size(1024 * 1024)
            .handshake(TokioIo::new(stream));
        let (sender, conn) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| UpstreamError::HandshakeTimeout {
                path: self.path.clone(),
            })?
            .map_err(|source| UpstreamError::Handshake {
                path: self.path.clone(),
                source,
            })?;
        let name = self.name.clone();
        tokio::spawn(async move {
            match conn.await {
                Ok(()) => tracing::info!(upstream = %name, "upstream connection closed"),
                Err(e) => tracing::warn!(upstream = %name, error = %e, "upstream connection lost"),
            }
        });
        tracing::info!(upstream = %self.name, "connected to upstream runtime");
        Ok(sender)
    }
}
