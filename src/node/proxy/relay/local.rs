//! Intercepted calls on a relayed connection: each is decided by [`Proxy::decide`] and answered
//! by the connection.
//!
//! The connection holds a call's request until it is complete, briefly ([`Local::start`]). A
//! complete request — the common case: a CRI request's DATA follows its HEADERS at once — is
//! decided right there, on the connection's task, unless the decision has to wait (a lookup in
//! containerd): then it finishes on a task of its own. A request still arriving after that (a
//! slow or large one) is decided on a task of its own, fed its body as it comes ([`Local::body`]); the
//! body reports every chunk the handler reads ([`Event::Consumed`]), so the connection gives
//! kubelet that room back only then, and a call that is not read holds back its sender. A task
//! ends by handing the decision to the connection ([`Event::Decided`]): a status pullgate answers
//! with, or the request to send containerd. An answer pullgate edits is queued here part by part
//! ([`Local::answer`]) and sent as kubelet's windows allow ([`Local::drain`]).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::{Body, Frame};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use super::flow::StreamWindow;
use super::frame::{FRAME_HEADER, put_data};
use crate::node::proxy::intercept::Handler;
use crate::node::proxy::{Decided, Proxy};

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
    /// What becomes of the call.
    Decided { stream: u32, decided: Decided },
    /// The call's task ended without a decision (it panicked).
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
    state: State,
    pending: VecDeque<Out>,
}

enum State {
    /// Not started: the request body so far, until the connection has read what it can.
    Waiting(Box<Waiting>),
    /// Being decided on a task of its own, fed the request body while it lasts.
    Running {
        body: Option<mpsc::UnboundedSender<Bytes>>,
        task: AbortHandle,
    },
    /// Decided, or an answer pullgate sends.
    Over,
}

struct Waiting {
    proxy: Arc<Proxy>,
    handler: Arc<dyn Handler>,
    path: Box<str>,
    chunks: VecDeque<Bytes>,
    /// Bytes in `chunks`.
    buffered: usize,
    ended: bool,
}

impl Local {
    /// An intercepted call on `path` whose request body is to come (`ended`: it has none).
    pub fn new(proxy: Arc<Proxy>, handler: Arc<dyn Handler>, path: &str, ended: bool) -> Self {
        Local {
            state: State::Waiting(Box::new(Waiting {
                proxy,
                handler,
                path: path.into(),
                chunks: VecDeque::new(),
                buffered: 0,
                ended,
            })),
            pending: VecDeque::new(),
        }
    }

    /// A complete answer pullgate sends in containerd's place (an edited one), part by part.
    pub fn answer(parts: impl IntoIterator<Item = Out>) -> Self {
        Local {
            state: State::Over,
            pending: parts.into_iter().collect(),
        }
    }

    /// The next chunk of the request body.
    pub fn body(&mut self, data: Bytes) {
        match &mut self.state {
            State::Waiting(w) => {
                w.buffered += data.len();
                w.chunks.push_back(data);
            }
            State::Running { body: Some(tx), .. } => {
                let _ = tx.send(data);
            }
            _ => {}
        }
    }

    /// The request body is complete.
    pub fn end_body(&mut self) {
        match &mut self.state {
            State::Waiting(w) => w.ended = true,
            State::Running { body, .. } => *body = None,
            State::Over => {}
        }
    }

    /// Whether the call waits to be started.
    pub fn waiting(&self) -> bool {
        matches!(self.state, State::Waiting(_))
    }

    /// Whether the call waits to be started with its whole request here.
    pub fn request_complete(&self) -> bool {
        matches!(&self.state, State::Waiting(w) if w.ended)
    }

    /// The request bytes of a call waiting to be started.
    pub fn buffered(&self) -> usize {
        match &self.state {
            State::Waiting(w) => w.buffered,
            _ => 0,
        }
    }

    /// Starts deciding the call on `stream`: the decision, if it could be made at once; otherwise
    /// it comes as [`Event::Decided`] (or [`Event::Failed`]) on `events`.
    pub fn start(&mut self, stream: u32, events: &mpsc::UnboundedSender<Event>) -> Option<Decided> {
        let State::Waiting(w) = std::mem::replace(&mut self.state, State::Over) else {
            return None;
        };
        let Waiting {
            proxy,
            handler,
            path,
            chunks,
            ended,
            ..
        } = *w;
        let record = proxy.record(&path);
        let (body, feed) = match ended {
            true => (CallBody::Ready(chunks), None),
            false => {
                let (tx, rx) = mpsc::unbounded_channel();
                for chunk in chunks {
                    let _ = tx.send(chunk);
                }
                let body = ChannelBody {
                    rx,
                    events: events.clone(),
                    stream,
                };
                (CallBody::Fed(body), Some(tx))
            }
        };
        let mut decide =
            Box::pin(async move { proxy.decide(handler.as_ref(), &path, body, record).await });
        if ended {
            // Polled once here: a decision that needs nothing it must wait for is made without a
            // task. One that does wait finishes on a task, whose first poll registers its waker
            // (a future may be polled with another waker each time).
            let mut cx = Context::from_waker(Waker::noop());
            let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                decide.as_mut().poll(&mut cx)
            }));
            match polled {
                Ok(Poll::Ready(decided)) => return Some(decided),
                Ok(Poll::Pending) => {}
                Err(_) => {
                    let _ = events.send(Event::Failed { stream });
                    return None;
                }
            }
        }
        let events = events.clone();
        let task = tokio::spawn(async move {
            let mut guard = Done {
                events: events.clone(),
                stream,
                done: false,
            };
            let decided = decide.await;
            guard.done();
            let _ = events.send(Event::Decided { stream, decided });
        });
        self.state = State::Running {
            body: feed,
            task: task.abort_handle(),
        };
        None
    }

    /// The call is over for the client (reset, connection gone): its task stops.
    pub fn abort(&self) {
        if let State::Running { task, .. } = &self.state {
            task.abort();
        }
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

/// The request body of an intercepted call.
enum CallBody {
    /// Complete when the call started.
    Ready(VecDeque<Bytes>),
    /// Still arriving.
    Fed(ChannelBody),
}

impl Body for CallBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            CallBody::Ready(chunks) => Poll::Ready(chunks.pop_front().map(|d| Ok(Frame::data(d)))),
            CallBody::Fed(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, CallBody::Ready(chunks) if chunks.is_empty())
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
