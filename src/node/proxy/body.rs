//! The bodies of intercepted calls, and the record every call is counted with.
//!
//! [`RequestBody`] goes to containerd: the one message pullgate read (and perhaps rewrote).
//! [`ResponseBody`] comes back for kubelet: containerd's stream, an edited message, or nothing (a
//! trailers-only answer pullgate made). If containerd's stream breaks mid-call, the response ends
//! with `UNAVAILABLE` trailers instead of a bare stream reset, so the client gets a status it
//! understands.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use super::budget::Reservation;
use super::grpc::{Code, Status};
use super::upstream::UpstreamBody;
use crate::node::metrics::Metrics;

/// A request body on its way to containerd: a complete body pullgate holds (data frames already
/// framed for gRPC), sent as one DATA frame as far as the upstream's flow-control window allows.
/// The bytes it was read into stay reserved in the body budget until the body is dropped, which
/// the forwarding path does as soon as the last byte was handed to the connection.
pub enum RequestBody {
    Full {
        data: Option<Bytes>,
        reservation: Option<Reservation>,
    },
}

impl RequestBody {
    /// A complete body that holds no reservation in the body budget.
    pub fn full(data: Bytes) -> Self {
        RequestBody::Full {
            data: Some(data),
            reservation: None,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let _ = cx;
        match self.get_mut() {
            RequestBody::Full { data, .. } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Full { data, .. } => data.is_none(),
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match self {
            // Deliberately inexact: an exact hint makes hyper add a content-length header the
            // client never sent.
            RequestBody::Full { .. } => SizeHint::default(),
        }
    }
}

/// Counts a call once, with the gRPC status it ended with, when that status passes by (or with no
/// status if the body is dropped first, e.g. the client went away).
pub struct CallRecord {
    metrics: Arc<Metrics>,
    method: usize,
    done: bool,
}

impl CallRecord {
    pub fn new(metrics: Arc<Metrics>, method: usize) -> Self {
        CallRecord {
            metrics,
            method,
            done: false,
        }
    }

    pub fn method(&self) -> usize {
        self.method
    }

    /// Records the status `code` (a `grpc-status` value) once.
    pub fn finish_code(&mut self, code: &[u8]) {
        if self.done {
            return;
        }
        self.done = true;
        let code = std::str::from_utf8(code).ok().and_then(|s| s.parse().ok());
        self.metrics.call(self.method, code.or(Some(2)));
    }

    /// Records the status found in `headers` (response headers of a trailers-only answer, or
    /// trailers); returns whether one was there.
    pub fn finish_from(&mut self, headers: &HeaderMap) -> bool {
        match headers.get("grpc-status") {
            Some(v) if !self.done => {
                self.done = true;
                let code = v.to_str().ok().and_then(|s| s.parse().ok());
                self.metrics.call(self.method, code.or(Some(2)));
                true
            }
            _ => false,
        }
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        if !self.done {
            self.metrics.call(self.method, None);
        }
    }
}

/// A response body on its way back to the client.
#[derive(Default)]
pub enum ResponseBody {
    /// containerd's response stream. The `Arc<str>` names the upstream socket for the error trailers.
    Upstream {
        body: UpstreamBody,
        upstream: Arc<str>,
        done: bool,
        record: Option<CallRecord>,
    },
    /// A response pullgate holds whole (an edited unary response): data, then trailers.
    Buffered {
        data: Option<Bytes>,
        trailers: Option<HeaderMap>,
    },
    /// No body: the status travels in the response headers (trailers-only).
    #[default]
    Empty,
}

impl ResponseBody {
    pub fn upstream(body: UpstreamBody, upstream: Arc<str>, record: Option<CallRecord>) -> Self {
        ResponseBody::Upstream {
            body,
            upstream,
            done: false,
            record,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = h2::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        match self.get_mut() {
            ResponseBody::Empty => Poll::Ready(None),
            ResponseBody::Buffered { data, trailers } => Poll::Ready(match data.take() {
                Some(d) => Some(Ok(Frame::data(d))),
                None => trailers.take().map(|t| Ok(Frame::trailers(t))),
            }),
            ResponseBody::Upstream {
                body,
                upstream,
                done,
                record,
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
                        if let Some(r) = record.as_mut() {
                            r.finish_from(&trailers);
                        }
                        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                    }
                    Poll::Ready(Some(Ok(frame))) => {
                        if let (Some(r), Some(t)) = (record.as_mut(), frame.trailers_ref()) {
                            r.finish_from(t);
                        }
                        Poll::Ready(Some(Ok(frame)))
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
            ResponseBody::Buffered { data, trailers } => data.is_none() && trailers.is_none(),
            ResponseBody::Upstream { body, done, .. } => *done || body.is_end_stream(),
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match self {
            // Inexact for the same reason: no content-length on trailers-only answers.
            ResponseBody::Empty | ResponseBody::Buffered { .. } => SizeHint::default(),
            ResponseBody::Upstream { body, .. } => body.size_hint(),
        }
    }
}
