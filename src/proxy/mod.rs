//! The CRI forwarding path: kubelet → pullgate (HTTP/2 server) → containerd (HTTP/2 client).
//!
//! Every request is routed on its path alone. Paths in the [`InterceptTable`] have their single
//! request message read and handed to a [`Handler`]; every other path — known CRI methods, newer
//! ones, anything — is forwarded as it came: headers, body frames, trailers and status, without
//! decoding, in both directions, streaming as long as either side wants.
//!
//! - [`grpc`]: status codes, trailers-only answers, message framing.
//! - [`body`]: the request/response body types on the path.
//! - [`upstream`]: the lazily (re)connected HTTP/2 client for containerd's socket.
//! - [`intercept`]: the intercept table and the handler interface.
//! - [`conn`]: accepting a kubelet connection: preface check, HTTP/2 server, graceful shutdown.

pub mod body;
pub mod conn;
pub mod grpc;
pub mod intercept;
pub mod upstream;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;

pub use body::{RequestBody, ResponseBody};
use grpc::{Code, FRAME_HEADER_LEN, MAX_MESSAGE_SIZE, Status};
pub use intercept::{Call, Handler, InterceptTable, Verdict};
pub use upstream::{Upstream, UpstreamError};

/// The proxy: one per daemon, shared by every connection.
pub struct Proxy {
    upstream: Upstream,
    intercepts: InterceptTable,
}

impl Proxy {
    pub fn new(upstream: Upstream, intercepts: InterceptTable) -> Arc<Self> {
        Arc::new(Proxy {
            upstream,
            intercepts,
        })
    }

    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Handles one call. Never fails: every problem becomes a gRPC status for the client.
    pub async fn handle(&self, req: Request<Incoming>) -> Result<Response<ResponseBody>, Infallible> {
        if let Some(handler) = self.intercepts.get(req.uri().path()) {
            return Ok(self.intercepted(handler.as_ref(), req).await);
        }
        let (parts, body) = req.into_parts();
        Ok(self
            .forward(Request::from_parts(parts, RequestBody::Stream(body)))
            .await)
    }

    async fn forward(&self, req: Request<RequestBody>) -> Response<ResponseBody> {
        match self.upstream.send(req).await {
            Ok(resp) => resp.map(|b| ResponseBody::upstream(b, self.upstream.name().clone())),
            Err(e) => {
                tracing::warn!(error = %e, "cannot forward call");
                e.status().to_response()
            }
        }
    }

    async fn intercepted(&self, handler: &dyn Handler, req: Request<Incoming>) -> Response<ResponseBody> {
        let (parts, body) = req.into_parts();
        let method = parts.uri.path();
        let raw = match read_body(body, method).await {
            Ok(b) => b,
            Err(status) => return status.to_response(),
        };
        let message = match grpc::single_message(&raw) {
            Ok(m) => m,
            Err(e) => {
                tracing::info!(method, error = %e, "rejected malformed request");
                let mut resp: Response<ResponseBody> = e.status(method).to_response();
                if e == grpc::FrameError::Compressed {
                    resp.headers_mut().insert(
                        "grpc-accept-encoding",
                        http::HeaderValue::from_static("identity"),
                    );
                }
                return resp;
            }
        };
        let verdict = handler
            .handle(Call {
                method,
                headers: &parts.headers,
                message: &message,
            })
            .await;
        let body = match verdict {
            Verdict::Forward => raw,
            Verdict::Replace(new) => grpc::frame(&new),
            Verdict::Respond(status) => return status.to_response(),
        };
        self.forward(Request::from_parts(parts, RequestBody::Full(Some(body))))
            .await
    }
}

/// Reads a whole request body of at most one maximal gRPC message.
async fn read_body(mut body: Incoming, method: &str) -> Result<Bytes, Status> {
    const LIMIT: usize = MAX_MESSAGE_SIZE + FRAME_HEADER_LEN;
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            Status::new(
                Code::Cancelled,
                format!("pullgate: {method}: the request body could not be read: {e}"),
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue; // request trailers carry nothing pullgate forwards for unary calls
        };
        let total = first.as_ref().map_or(0, Bytes::len) + buf.len() + data.len();
        if total > LIMIT {
            return Err(Status::new(
                Code::ResourceExhausted,
                format!(
                    "pullgate: {method}: the request is over {total} bytes, above the {MAX_MESSAGE_SIZE}-byte message limit"
                ),
            ));
        }
        // The common case is one DATA frame: keep it without copying.
        match first.take() {
            None if buf.is_empty() => first = Some(data),
            None => buf.extend_from_slice(&data),
            Some(f) => {
                buf.extend_from_slice(&f);
                buf.extend_from_slice(&data);
            }
        }
    }
    Ok(first.unwrap_or_else(|| buf.freeze()))
}
