//! The two body types on the forwarding path.
//!
//! [`RequestBody`] goes to containerd: the caller's own stream, untouched, or one message pullgate
//! read (and perhaps rewrote). [`ResponseBody`] goes back to kubelet: containerd's stream, untouched,
//! or nothing (a trailers-only answer pullgate made). If containerd's stream breaks mid-call, the
//! response ends with `UNAVAILABLE` trailers instead of a bare stream reset, so the client gets a
//! status it understands.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::grpc::{Code, Status};

/// A request body on its way to containerd.
pub enum RequestBody {
    /// The client's body, frame by frame.
    Stream(Incoming),
    /// A complete body pullgate holds (data frames already framed for gRPC), sent as one DATA frame.
    Full(Option<Bytes>),
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Stream(b) => Pin::new(b).poll_frame(cx),
            RequestBody::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Stream(b) => b.is_end_stream(),
            RequestBody::Full(b) => b.is_none(),
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Stream(b) => b.size_hint(),
            // Deliberately inexact: an exact hint makes hyper add a content-length header the
            // client never sent.
            RequestBody::Full(_) => SizeHint::default(),
        }
    }
}

/// A response body on its way back to the client.
#[derive(Default)]
pub enum ResponseBody {
    /// containerd's response stream. The `Arc<str>` names the upstream socket for the error trailers.
    Upstream {
        body: Incoming,
        upstream: Arc<str>,
        done: bool,
    },
    /// No body: the status travels in the response headers (trailers-only).
    #[default]
    Empty,
}

impl ResponseBody {
    pub fn upstream(body: Incoming, upstream: Arc<str>) -> Self {
        ResponseBody::Upstream {
            body,
            upstream,
            done: false,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ResponseBody::Empty => Poll::Ready(None),
            ResponseBody::Upstream {
                body,
                upstream,
                done,
            } => {
                if *done {
                    return Poll::Ready(None);
                }
                match Pin::new(body).poll_frame(cx) {
                    Poll::Ready(Some(Err(e))) => {
                        // containerd went away mid-stream: finish the call with a status instead of
                        // resetting the stream, so the client sees UNAVAILABLE and retries.
                        *done = true;
                        tracing::warn!(upstream = %upstream, error = %e, "upstream stream broke mid-call");
                        let mut trailers = HeaderMap::new();
                        Status::new(
                            Code::Unavailable,
                            format!(
                                "pullgate: the connection to the upstream runtime at {upstream} broke during the call: {e}"
                            ),
                        )
                        .insert_into(&mut trailers);
                        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                    }
                    other => other,
                }
            }
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Empty => true,
            ResponseBody::Upstream { body, done, .. } => *done || body.is_end_stream(),
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match self {
            // Inexact for the same reason: no content-length on trailers-only answers.
            ResponseBody::Empty => SizeHint::default(),
            ResponseBody::Upstream { body, .. } => body.size_hint(),
        }
    }
}
