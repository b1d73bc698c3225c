//! The body of pullgate's own calls to containerd, and the record every call is counted with.
//!
//! [`RequestBody`] is the one message of a call pullgate makes itself over [`super::Upstream`]
//! (its image and pod lookups).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use super::budget::Reservation;
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
