//! pullgate's own calls to containerd (the enforcer's image and pod lookups, readiness checks):
//! one shared HTTP/2 connection over containerd's unix socket, opened lazily on the first call and
//! opened again when containerd restarts. Clients' calls never take it: the relay carries them on
//! each client connection's own connection to containerd.
//!
//! It speaks HTTP/2 with the `h2` crate directly rather than through hyper's client: a CRI request is
//! one small message, and `h2` lets pullgate queue its HEADERS and DATA frames together so they leave
//! in one write — containerd is woken once per call, not twice — without a dispatch task per request.
//!
//! A request without `:authority` leaves with `http://localhost`.
//!
//! Request data goes to containerd no faster than its flow-control window allows: beyond the first
//! 64 KiB, which leave with the headers, a frame is taken from the client's body only once the
//! previous one was sent within the window, so a runtime that reads slowly slows the client down
//! (through the client's own window) instead of filling pullgate's memory. A complete body pullgate
//! holds is handed over the same way, and its reservation in the body budget ends as soon as its
//! last byte is handed to the connection.
//!
//! Every call clones the cached `SendRequest` handle; HTTP/2 multiplexes all calls over the one
//! connection. When the connection is found closed, one caller reconnects while the others wait for it
//! (single flight), and a request that never left because the connection had just died is retried
//! once on the new connection. While containerd is down, calls fail fast with an [`UpstreamError`]
//! that names the socket; the daemon keeps running.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use tokio::net::UnixStream;

use super::body::RequestBody;
use super::grpc::{Code, Status};
use super::socket::Stream;

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
        source: h2::Error,
    },
    #[error("HTTP/2 handshake with the upstream runtime at {} timed out", path.display())]
    HandshakeTimeout { path: PathBuf },
    #[error("the call to the upstream runtime at {} failed: {source}", path.display())]
    Call {
        path: PathBuf,
        #[source]
        source: h2::Error,
    },
}

impl UpstreamError {
    /// Every upstream failure is `UNAVAILABLE` to the client: the runtime may come back, retry.
    pub fn status(&self) -> Status {
        Status::new(Code::Unavailable, format!("pullgate: {self}"))
    }
}

/// A response body streamed from containerd, with flow-control capacity released as it is read.
pub struct UpstreamBody {
    recv: h2::RecvStream,
    data_done: bool,
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match self.recv.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => self.data_done = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        match self.recv.poll_trailers(cx) {
            Poll::Ready(Ok(Some(t))) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

/// A live connection's request handle and whether its connection task is still running.
#[derive(Clone)]
struct Conn {
    sender: h2::client::SendRequest<Bytes>,
    alive: Arc<AtomicBool>,
}

/// A lazily connected, self-healing HTTP/2 client for containerd's socket.
pub struct Upstream {
    path: PathBuf,
    /// The socket path as text, shared with response bodies for their error trailers.
    name: Arc<str>,
    /// The live connection, if any. A plain mutex: held only to clone or replace.
    cached: Mutex<Option<Conn>>,
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
        let cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        cached
            .as_ref()
            .is_some_and(|c| c.alive.load(Ordering::Acquire))
    }

    /// Opens the connection now (used for readiness checks and tests); a no-op if open.
    pub async fn connect(&self) -> Result<(), UpstreamError> {
        self.conn().await.map(|_| ())
    }

    /// Sends one request to containerd and returns its response head and streaming body.
    pub async fn send(
        &self,
        req: Request<RequestBody>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let (mut parts, mut body) = req.into_parts();
        if parts.uri.authority().is_none() {
            parts.uri = with_default_authority(parts.uri);
        }
        // A CRI request is one small message, normally already here in full — often as a DATA frame
        // followed by an empty DATA frame that only carries END_STREAM. Take what is buffered now so
        // it leaves in the same write as the headers, with END_STREAM on it, and no task is needed
        // to pump the rest.
        let ready = ready_frames(&mut body).await;

        // A ready handle; if the cached connection turns out dead, reconnect and try once more
        // (the request has not left yet). Failing to connect at all is not retried.
        let mut sender = match self.ready_sender().await {
            Ok(s) => s,
            Err(UpstreamError::Call { .. }) => self.ready_sender().await?,
            Err(e) => return Err(e),
        };
        let headers_end = ready.frames.is_empty() && ready.ended;
        let (response, mut stream) = sender
            .send_request(Request::from_parts(parts, ()), headers_end)
            .map_err(|source| UpstreamError::Call {
                path: self.path.clone(),
                source,
            })?;
        let call_err = |source| UpstreamError::Call {
            path: self.path.clone(),
            source,
        };
        if !headers_end {
            let mut frames = VecDeque::from(ready.frames);
            send_eager(&mut stream, &mut frames, ready.ended).map_err(call_err)?;
            if frames.is_empty() && ready.ended {
                // Everything was handed to the connection: a reservation the body holds ends now,
                // not when the call is answered.
                drop(body);
            } else {
                // A request that streams, or one larger than the upstream's window: pump the rest
                // as the window opens, while the response is awaited.
                tokio::spawn(pump(frames, ready.ended, body, stream));
            }
        }
        let resp = response.await.map_err(call_err)?;
        Ok(resp.map(|recv| UpstreamBody {
            recv,
            data_done: false,
        }))
    }

    /// A request handle whose connection has room for one more stream; a dead connection is
    /// dropped from the cache so the next attempt reconnects.
    async fn ready_sender(&self) -> Result<h2::client::SendRequest<Bytes>, UpstreamError> {
        let Conn { sender, alive } = self.conn().await?;
        match sender.ready().await {
            Ok(s) => Ok(s),
            Err(source) => {
                self.invalidate(&alive);
                Err(UpstreamError::Call {
                    path: self.path.clone(),
                    source,
                })
            }
        }
    }

    fn current(&self) -> Option<Conn> {
        let cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        cached
            .as_ref()
            .filter(|c| c.alive.load(Ordering::Acquire))
            .cloned()
    }

    async fn conn(&self) -> Result<Conn, UpstreamError> {
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let _guard = self.connecting.lock().await;
        // Someone else may have reconnected while we waited.
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let conn = self.handshake().await?;
        *self.cached.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
        Ok(conn)
    }

    fn invalidate(&self, dead: &Arc<AtomicBool>) {
        dead.store(false, Ordering::Release);
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if cached.as_ref().is_some_and(|c| Arc::ptr_eq(&c.alive, dead)) {
            *cached = None;
        }
    }

    async fn handshake(&self) -> Result<Conn, UpstreamError> {
        // Read and written like the relay's sockets (`super::socket`): containerd reading a
        // request does not wake pullgate.
        let stream = UnixStream::connect(&self.path)
            .await
            .and_then(UnixStream::into_std)
            .and_then(Stream::new)
            .map_err(|source| UpstreamError::Connect {
                path: self.path.clone(),
                source,
            })?;
        let handshake = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_header_list_size(1024 * 1024)
            .handshake::<_, Bytes>(stream);
        let (sender, conn) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| UpstreamError::HandshakeTimeout {
                path: self.path.clone(),
            })?
            .map_err(|source| UpstreamError::Handshake {
                path: self.path.clone(),
                source,
            })?;
        let alive = Arc::new(AtomicBool::new(true));
        let (name, flag) = (self.name.clone(), alive.clone());
        tokio::spawn(async move {
            let result = conn.await;
            flag.store(false, Ordering::Release);
            match result {
                Ok(()) => tracing::info!(upstream = %name, "upstream connection closed"),
                Err(e) => tracing::warn!(upstream = %name, error = %e, "upstream connection lost"),
            }
        });
        tracing::info!(upstream = %self.name, "connected to upstream runtime");
        Ok(Conn { sender, alive })
    }
}

/// The URI of a request that came without `:authority` (which HTTP/2 allows), completed so that
/// the HTTP/2 client can send it: `h2` refuses to send a request without scheme and authority, and
/// containerd, like any gRPC server, expects both. `localhost` is what gRPC clients send over unix
/// sockets by default.
fn with_default_authority(uri: http::Uri) -> http::Uri {
    let mut parts = uri.into_parts();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = Some(http::uri::Authority::from_static("localhost"));
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    http::Uri::from_parts(parts).expect("scheme, authority and path make a valid URI")
}

/// The request frames that were already buffered when the call was forwarded.
struct ReadyFrames {
    /// Non-empty DATA frames and, last if present, the trailers.
    frames: Vec<Frame<Bytes>>,
    /// Whether the body ended within them: nothing is left to pump.
    ended: bool,
}

/// At most this many frames are taken up front; a longer body streams through [`pipe`].
const READY_FRAMES: usize = 4;

/// Takes the request frames that can be had without waiting. Empty DATA frames are dropped: they
/// carry nothing but (at most) END_STREAM, which `ended` records and the last frame sent carries.
async fn ready_frames(body: &mut RequestBody) -> ReadyFrames {
    let mut frames = Vec::new();
    let mut ended = body.is_end_stream();
    while !ended && frames.len() < READY_FRAMES {
        let polled =
            std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await;
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                let is_trailers = frame.is_trailers();
                if frame.data_ref().is_none_or(|d| !d.is_empty()) {
                    frames.push(frame);
                }
                // Trailers end a body whatever the stream state says.
                ended = is_trailers || body.is_end_stream();
            }
            Poll::Ready(Some(Err(e))) => match e {},
            Poll::Ready(None) => ended = true,
            Poll::Pending => break,
        }
    }
    ReadyFrames { frames, ended }
}

/// Request data sent with the headers without waiting for flow-control capacity: `h2` assigns a
/// new stream capacity only once the connection task has opened it, so waiting would split every
/// small request into two writes (and two wake-ups of containerd). HTTP/2's default initial stream
/// window is 65,535 bytes; what a peer with a smaller window does not take at once waits in `h2`'s
/// buffer, bounded by this per call (and by the client's own window, which this data came through).
const EAGER_BYTES: usize = 64 * 1024;

/// Hands the frames at the front of `frames` that fit in [`EAGER_BYTES`] to the connection at once,
/// in order; the rest is left for [`pump`].
fn send_eager(
    stream: &mut h2::SendStream<Bytes>,
    frames: &mut VecDeque<Frame<Bytes>>,
    ended: bool,
) -> Result<(), h2::Error> {
    let mut room = EAGER_BYTES;
    while let Some(frame) = frames.front() {
        let len = frame.data_ref().map_or(0, Bytes::len);
        if len > room {
            return Ok(());
        }
        room -= len;
        let frame = frames.pop_front().expect("checked");
        let last = ended && frames.is_empty();
        match frame.into_data() {
            Ok(data) if data.is_empty() && !last => {}
            Ok(data) => stream.send_data(data, last)?,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    stream.send_trailers(trailers)?;
                }
            }
        }
    }
    Ok(())
}

/// Hands the front of `frames` to the connection as far as the stream's send capacity allows:
/// never more DATA than the upstream's flow-control window grants, so a peer that reads slowly holds
/// the data back here, and in turn the client (whose window opens only as frames are taken from its
/// body). `ended`: the last of `frames` ends the body. Returns whether `frames` is empty; otherwise
/// capacity has been requested for the first frame and [`h2::SendStream::poll_capacity`] says when
/// to try again.
fn send_granted(
    stream: &mut h2::SendStream<Bytes>,
    frames: &mut VecDeque<Frame<Bytes>>,
    ended: bool,
) -> Result<bool, h2::Error> {
    while let Some(frame) = frames.pop_front() {
        let last = ended && frames.is_empty();
        let mut data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    stream.send_trailers(trailers)?;
                }
                continue;
            }
        };
        if data.is_empty() {
            // Only an END_STREAM carrier is worth sending; it needs no capacity.
            if last {
                stream.send_data(data, true)?;
            }
            continue;
        }
        stream.reserve_capacity(data.len());
        let granted = stream.capacity().min(data.len());
        if granted == 0 {
            frames.push_front(Frame::data(data));
            return Ok(false);
        }
        let now = data.split_to(granted);
        stream.send_data(now, last && data.is_empty())?;
        if !data.is_empty() {
            // The rest waits for the window (asked for on the next round).
            frames.push_front(Frame::data(data));
        }
    }
    Ok(true)
}

/// Forwards the rest of a request body within the upstream's flow-control window: the next frame
/// is taken from the client only once the previous one has been sent, so at most one frame waits
/// here. Resets the stream if the client's body breaks; gives up if the upstream resets it.
async fn pump(
    mut frames: VecDeque<Frame<Bytes>>,
    mut ended: bool,
    mut body: RequestBody,
    mut stream: h2::SendStream<Bytes>,
) {
    use http_body_util::BodyExt;
    loop {
        match send_granted(&mut stream, &mut frames, ended) {
            Err(_) => return,
            Ok(true) if ended => return,
            Ok(true) => match body.frame().await {
                Some(Ok(frame)) => {
                    ended = frame.is_trailers() || body.is_end_stream();
                    frames.push_back(frame);
                }
                Some(Err(e)) => match e {},
                None => {
                    ended = true;
                    frames.push_back(Frame::data(Bytes::new()));
                }
            },
            Ok(false) => {
                match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
                    Some(Ok(_)) => {}
                    // The stream was reset or closed: nothing more can be sent.
                    Some(Err(_)) | None => return,
                }
            }
        }
    }
}
