//! Calls pullgate answers itself on a relayed connection: intercepted calls, handled by
//! [`Proxy::intercepted`] on a task of their own.
//!
//! The connection's task hands the call's request body to its task as it arrives
//! ([`Local::body`]); the body reports every chunk the handler reads ([`Event::Consumed`]), so the
//! connection gives kubelet that room back only then, and a call that is not read holds back its
//! sender. The task encodes its answer — response headers, data, trailers — and hands it to the
//! connection's task ([`Event::Out`]), which sends it as kubelet's windows allow ([`Local::drain`]).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use super::blocks::{field, fields};
use super::flow::StreamWindow;
use super::frame::{FRAME_HEADER, put_data, put_frames};
use super::hpack::put_literal;
use crate::node::proxy::Proxy;
use crate::node::proxy::intercept::Handler;
use crate::node::proxy::refusal::Refusal;

/// Part of a local answer, in the order it goes to kubelet.
pub enum Out {
    /// The response headers (not flow-controlled).
    Head(Bytes),
    /// Response data, sent within kubelet's windows.
    Data(Bytes),
    /// The last header block (trailers, or trailers-only headers), with END_STREAM.
    Last(Bytes),
    /// The end of a response without trailers: an empty DATA frame with END_STREAM.
    End,
}

/// What a local call's task tells its connection.
pub enum Event {
    /// The handler read `n` bytes of the request body: room to give back to kubelet.
    Consumed { stream: u32, n: u32 },
    /// The next part of the answer.
    Out { stream: u32, out: Out },
    /// The call's task ended without a complete answer.
    Failed { stream: u32 },
}

/// Reports [`Event::Failed`] when dropped before [`Done::done`]: a task that panics still ends its
/// stream. (An aborted task's stream is already gone.)
struct Done {
    events: mpsc::UnboundedSender<Event>,
    stream: u32,
    done: bool,
}

impl Done {
    fn done(&mut self) {
        self.done = true;
    }
}

impl Drop for Done {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.events.send(Event::Failed {
                stream: self.stream,
            });
        }
    }
}

/// The connection's side of one local call.
pub struct Local {
    body: Option<mpsc::UnboundedSender<Bytes>>,
    task: AbortHandle,
    pending: VecDeque<Out>,
}

impl Local {
    /// The next chunk of the request body.
    pub fn body(&mut self, data: Bytes) {
        if let Some(tx) = &self.body {
            let _ = tx.send(data);
        }
    }

    /// The request body is complete.
    pub fn end_body(&mut self) {
        self.body = None;
    }

    /// The call is over for the client (reset, connection gone): its task stops.
    pub fn abort(&self) {
        self.task.abort();
    }

    pub fn push(&mut self, out: Out) {
        self.pending.push_back(out);
    }

    /// Hands `emit` what may go now (frame, flow-controlled length); returns whether the answer
    /// is complete.
    pub fn drain(
        &mut self,
        stream: u32,
        window: &mut StreamWindow,
        max_frame: usize,
        mut emit: impl FnMut(Bytes, u32),
    ) -> bool {
        while let Some(next) = self.pending.front_mut() {
            match next {
                Out::Head(frames) => {
                    emit(std::mem::take(frames), 0);
                }
                Out::Data(data) => {
                    let n = window.take(data.len().min(max_frame));
                    if n == 0 && !data.is_empty() {
                        return false;
                    }
                    let chunk = data.split_to(n);
                    let mut f = Vec::with_capacity(FRAME_HEADER + n);
                    put_data(&mut f, stream, false, &chunk);
                    emit(Bytes::from(f), n as u32);
                    if !data.is_empty() {
                        continue;
                    }
                }
                Out::Last(frames) => {
                    emit(std::mem::take(frames), 0);
                    return true;
                }
                Out::End => {
                    let mut f = Vec::with_capacity(FRAME_HEADER);
                    put_data(&mut f, stream, true, &[]);
                    emit(Bytes::from(f), 0);
                    return true;
                }
            }
            self.pending.pop_front();
        }
        false
    }
}

/// A request body fed by the connection's task.
struct ChannelBody {
    rx: mpsc::UnboundedReceiver<Bytes>,
    events: mpsc::UnboundedSender<Event>,
    stream: u32,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(data)) => {
                let _ = self.events.send(Event::Consumed {
                    stream: self.stream,
                    n: data.len() as u32,
                });
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The request of an intercepted call from its decoded header block (literals): its regular
/// fields become headers; a field `http` cannot hold is the client's fault.
fn request(literals: &[u8], path: &str) -> Result<http::request::Builder, Refusal> {
    // The authority goes on as the client sent it (one that does not parse was already replaced).
    let authority = field(literals, b":authority");
    let uri = authority
        .and_then(|a| {
            http::Uri::builder()
                .scheme("http")
                .authority(a)
                .path_and_query(path)
                .build()
                .ok()
        })
        .map_or_else(|| http::Uri::try_from(path), Ok)
        .map_err(|_| Refusal::BadPseudoHeader)?;
    let mut b = Request::builder().method(http::Method::POST).uri(uri);
    let headers = b.headers_mut().expect("a fresh builder");
    for (name, value) in fields(literals) {
        if name.first() == Some(&b':') {
            continue;
        }
        let name = HeaderName::from_bytes(name).map_err(|_| Refusal::InvalidHeader)?;
        let value = HeaderValue::from_bytes(value).map_err(|_| Refusal::InvalidHeader)?;
        headers.append(name, value);
    }
    Ok(b)
}

/// Starts answering an intercepted call on `stream`.
pub fn spawn(
    proxy: Arc<Proxy>,
    handler: Arc<dyn Handler>,
    stream: u32,
    literals: &[u8],
    path: &str,
    end_stream: bool,
    events: mpsc::UnboundedSender<Event>,
) -> Result<Local, Refusal> {
    let builder = request(literals, path)?;
    let (tx, rx) = mpsc::unbounded_channel();
    let body = ChannelBody {
        rx,
        events: events.clone(),
        stream,
    };
    let req = builder.body(body).map_err(|_| Refusal::BadPseudoHeader)?;
    let path = path.to_owned();
    let task = tokio::spawn(async move {
        let mut guard = Done {
            events: events.clone(),
            stream,
            done: false,
        };
        answer(proxy, handler, req, &path, stream, &events).await;
        guard.done();
    });
    Ok(Local {
        body: (!end_stream).then_some(tx),
        task: task.abort_handle(),
        pending: VecDeque::new(),
    })
}

/// Runs an intercepted call and hands its answer to the connection, part by part.
async fn answer(
    proxy: Arc<Proxy>,
    handler: Arc<dyn Handler>,
    req: Request<ChannelBody>,
    path: &str,
    stream: u32,
    events: &mpsc::UnboundedSender<Event>,
) {
    {
        let record = proxy.record(path);
        let resp = proxy.intercepted(handler.as_ref(), req, record).await;
        let send = |out| events.send(Event::Out { stream, out }).is_ok();
        let (parts, mut body) = resp.into_parts();
        let mut block = Vec::with_capacity(256);
        put_literal(&mut block, b":status", parts.status.as_str().as_bytes());
        put_headers(&mut block, &parts.headers);
        let mut frames = Vec::with_capacity(block.len() + FRAME_HEADER);
        if body.is_end_stream() {
            put_frames(&mut frames, stream, true, &block);
            send(Out::Last(Bytes::from(frames)));
            return;
        }
        put_frames(&mut frames, stream, false, &block);
        if !send(Out::Head(Bytes::from(frames))) {
            return;
        }
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { break };
            let frame = match frame.into_data() {
                Ok(data) => {
                    if !send(Out::Data(data)) {
                        return;
                    }
                    continue;
                }
                Err(frame) => frame,
            };
            if let Ok(trailers) = frame.into_trailers() {
                let mut block = Vec::with_capacity(128);
                put_headers(&mut block, &trailers);
                let mut frames = Vec::with_capacity(block.len() + FRAME_HEADER);
                put_frames(&mut frames, stream, true, &block);
                send(Out::Last(Bytes::from(frames)));
                return;
            }
        }
        send(Out::End);
    }
}

fn put_headers(block: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        put_literal(block, name.as_str().as_bytes(), value.as_bytes());
    }
}
