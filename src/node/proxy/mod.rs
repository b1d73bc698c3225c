//! The CRI forwarding path: kubelet → pullgate → containerd, relayed at the HTTP/2 frame level.
//!
//! Every call is routed on its path alone ([`Proxy::route`]). Paths in the [`InterceptTable`] have
//! their single request message read and handed to a [`Handler`] ([`Proxy::decide`]): pullgate
//! answers them, or forwards them, perhaps rewritten; every other CRI path — known methods, newer ones — is
//! relayed as it came: headers (re-encoded), body frames, trailers and status, in both directions,
//! streaming as long as either side wants. Anything else is refused.
//!
//! - [`relay`]: one kubelet connection relayed to its own connection to containerd, frame by frame.
//! - [`conn`]: accepting a kubelet connection: the preface check before the relay.
//! - [`grpc`]: status codes, trailers-only answers, message framing.
//! - [`body`]: the body of pullgate's own calls to containerd; the record every call is counted with.
//! - [`upstream`]: the lazily (re)connected HTTP/2 client of pullgate's own calls to containerd.
//! - [`intercept`]: the intercept table and the handler interface.
//! - [`budget`]: bounds on intercepted request bodies (per-method caps, global byte budget, timeout).
//! - [`refusal`]: refusals at the protocol level, counted and logged (rate limited).
//! - [`track`]: open connections and their streams: idle closing, the connection cap.

pub mod body;
pub mod budget;
pub mod conn;
pub mod grpc;
pub mod intercept;
pub mod refusal;
pub mod relay;
pub mod socket;
pub mod track;
pub mod upstream;

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

use crate::node::config::Limits;
use crate::node::metrics::{self, BodyRefusal, Metrics};

pub use body::{CallRecord, RequestBody};
use budget::{BodyBudget, BodyLimits, Reservation};
use grpc::{Code, FRAME_HEADER_LEN, Status};
pub use intercept::{Afterwards, Call, Handler, InterceptTable, ResponseEdit, Verdict};
use refusal::{Refusal, Refusals};
pub use upstream::{Upstream, UpstreamBody, UpstreamError};

/// Which method paths are forwarded at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// The CRI API (`runtime.v1*` services, any method, including ones newer than pullgate) and gRPC
    /// health checks. Everything else — containerd's native API above all, which can import and run
    /// images without any CRI call — is refused. The default.
    Cri,
    /// Every path (`server.forward_non_cri = true`): containerd's native API passes unchecked.
    All,
}

impl Reach {
    /// Whether `path` may be forwarded. `path` is already known to be a well-formed method path.
    pub fn allows(self, path: &str) -> bool {
        self == Reach::All
            || path.starts_with("/runtime.v1.")
            || path.starts_with("/runtime.v1alpha2.")
            || path.starts_with("/grpc.health.v1.Health/")
    }
}

/// Whether `path` has the shape of a gRPC method path, `/package.Service/Method`. Anything else is
/// answered by pullgate: servers differ in how they route odd paths (a missing leading slash,
/// percent-escapes), and a path pullgate does not recognise must not be one containerd does.
pub fn well_formed_method(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    let Some(slash) = rest.bytes().position(|b| b == b'/') else {
        return false;
    };
    let (service, method) = (&rest.as_bytes()[..slash], &rest.as_bytes()[slash + 1..]);
    // Checked on every call: every byte, without a branch per byte.
    let ident = |s: &[u8], dots: bool| {
        !s.is_empty()
            && s.iter().fold(true, |ok, &b| {
                ok & (b.is_ascii_alphanumeric() | (b == b'_') | (dots & (b == b'.')))
            })
    };
    ident(service, true) && ident(method, false)
}

/// Where a call goes, decided on its path alone ([`Proxy::route`]).
pub enum Route<'a> {
    /// Not a gRPC method path: answered `UNIMPLEMENTED` by pullgate.
    Malformed,
    /// Outside the forwarding reach: answered `PERMISSION_DENIED` by pullgate.
    Outside,
    /// Read, decided on and answered or forwarded by pullgate.
    Intercept(&'a Arc<dyn Handler>),
    /// Forwarded to containerd as it came.
    Forward,
}

/// The proxy: one per daemon, shared by every connection.
pub struct Proxy {
    upstream: Arc<Upstream>,
    intercepts: InterceptTable,
    metrics: Arc<Metrics>,
    refusals: Arc<Refusals>,
    reach: Reach,
    body_limits: BodyLimits,
    /// Bytes of intercepted request bodies buffered at once, over every connection.
    budget: BodyBudget,
}

impl Proxy {
    pub fn new(
        upstream: Arc<Upstream>,
        intercepts: InterceptTable,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Proxy::with_reach(upstream, intercepts, metrics, Reach::Cri)
    }

    /// The same proxy with a different forwarding reach.
    pub fn with_reach(
        upstream: Arc<Upstream>,
        intercepts: InterceptTable,
        metrics: Arc<Metrics>,
        reach: Reach,
    ) -> Arc<Self> {
        Proxy::configured(upstream, intercepts, metrics, reach, &Limits::default())
    }

    /// A proxy with the request-body limits of `limits` (`[server.limits]`).
    pub fn configured(
        upstream: Arc<Upstream>,
        intercepts: InterceptTable,
        metrics: Arc<Metrics>,
        reach: Reach,
        limits: &Limits,
    ) -> Arc<Self> {
        Arc::new(Proxy {
            upstream,
            intercepts,
            refusals: Arc::new(Refusals::new(metrics.clone())),
            budget: BodyBudget::from_config(limits, metrics.clone()),
            body_limits: BodyLimits::from_config(limits),
            metrics,
            reach,
        })
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }

    /// Where refusals at the protocol level are counted and logged.
    pub fn refusals(&self) -> &Arc<Refusals> {
        &self.refusals
    }

    /// Where a call on `path` goes: pullgate decides on the path alone.
    pub fn route(&self, path: &str) -> Route<'_> {
        if !well_formed_method(path) {
            return Route::Malformed;
        }
        if let Some(handler) = self.intercepts.get(path) {
            return Route::Intercept(handler);
        }
        match self.reach.allows(path) {
            true => Route::Forward,
            false => Route::Outside,
        }
    }

    /// pullgate's own answer to a call it does not serve ([`Route::Malformed`] or
    /// [`Route::Outside`]), counted and logged; `path` is shown as sent, bounded.
    pub fn refuse(&self, route: &Route<'_>, path: &str) -> Status {
        match route {
            Route::Malformed => {
                let shown: String = path.chars().take(200).collect();
                self.refusals.refuse(
                    Refusal::BadMethodPath,
                    format_args!(
                        "answered UNIMPLEMENTED to a call on {shown:?}, not a gRPC method path"
                    ),
                );
                Status::new(
                    Code::Unimplemented,
                    format!(
                        "pullgate: {shown:?} is not a gRPC method path (/package.Service/Method)"
                    ),
                )
            }
            _ => {
                tracing::warn!(path, "refused a call outside the CRI API");
                Status::new(
                    Code::PermissionDenied,
                    format!(
                        "pullgate: {path} is not part of the CRI API; this socket serves only runtime.v1 \
                         (containerd's own API can import and run images past every check). Use containerd's \
                         socket directly, or set server.forward_non_cri = true to forward it"
                    ),
                )
            }
        }
    }

    /// A new record for a call on `path`, counted once its status is known.
    pub fn record(&self, path: &str) -> CallRecord {
        CallRecord::new(self.metrics.clone(), metrics::method_index(path))
    }

    /// Decides an intercepted call on `method`: its one request message read from `body` (within
    /// the body limits) and handed to `handler`. The call is then answered by pullgate
    /// ([`Decided::Respond`], counted here) or forwarded, perhaps rewritten and with its answer to
    /// edit ([`Decided::Forward`]).
    pub async fn decide<B>(
        &self,
        handler: &dyn Handler,
        method: &str,
        body: B,
        mut record: CallRecord,
    ) -> Decided
    where
        B: http_body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let respond = |status: Status, record: &mut CallRecord, accept_identity| {
            record.finish_code(status.code.as_str().as_bytes());
            Decided::Respond {
                status,
                accept_identity,
            }
        };
        // Held until the body has been handed to containerd's connection (it travels with the
        // forwarded body): the bytes it counts live in `raw` and in what is forwarded from it.
        let (raw, reservation) = match self.read_body(body, method).await {
            Ok(b) => b,
            Err((status, reason)) => {
                if let Some(reason) = reason {
                    self.metrics.body_refused(reason);
                }
                tracing::info!(method, message = %status.message, "refused a request body");
                return respond(status, &mut record, false);
            }
        };
        let message = match grpc::single_message(&raw) {
            Ok(m) => m,
            Err(e) => {
                tracing::info!(method, error = %e, "rejected malformed request");
                let identity = e == grpc::FrameError::Compressed;
                return respond(e.status(method), &mut record, identity);
            }
        };
        let mut afterwards = Afterwards::default();
        let verdict = handler
            .handle(Call {
                method,
                message: &message,
                afterwards: &mut afterwards,
            })
            .await;
        let (body, edit) = match verdict {
            Verdict::Forward => (raw, None),
            Verdict::Replace(new) => (grpc::frame(&new), None),
            Verdict::Rewrite { request, response } => {
                (request.map_or(raw, |r| grpc::frame(&r)), Some(response))
            }
            Verdict::Respond(status) => {
                // pullgate's answer goes out once this returns.
                afterwards.run();
                return respond(status, &mut record, false);
            }
        };
        Decided::Forward(Forward {
            body,
            reservation,
            edit,
            record,
            afterwards,
        })
    }
}

/// What becomes of an intercepted call ([`Proxy::decide`]).
pub enum Decided {
    /// pullgate answers with this status (trailers-only); `accept_identity`: the answer says
    /// `grpc-accept-encoding: identity` (the request was compressed).
    Respond {
        status: Status,
        accept_identity: bool,
    },
    /// The call goes to containerd with this request body.
    Forward(Forward),
}

/// An intercepted call on its way to containerd.
pub struct Forward {
    /// The request body: the one message, framed for gRPC.
    pub body: Bytes,
    /// The body's bytes in the body budget, held until they are handed to containerd.
    pub reservation: Option<Reservation>,
    /// The edit for the one response message, if the answer is to be rewritten.
    pub edit: Option<ResponseEdit>,
    /// The call's record, counted with containerd's status.
    pub record: CallRecord,
    /// The handler's work for once the request is handed to containerd ([`Afterwards`]).
    pub afterwards: Afterwards,
}

/// Why reading a request body failed: the status for the client, and the limit that refused it.
type BodyError = (Status, Option<BodyRefusal>);

impl Proxy {
    /// Reads the whole request body of an intercepted call: one gRPC message at most the method's
    /// cap (checked on the length prefix, before more than one DATA frame is buffered), with the
    /// announced length reserved in the body budget before the rest is read, all within the read
    /// timeout. A body too short to hold a prefix comes back without a reservation (and is refused
    /// by [`grpc::single_message`]).
    async fn read_body<B>(
        &self,
        mut body: B,
        method: &str,
    ) -> Result<(Bytes, Option<Reservation>), BodyError>
    where
        B: http_body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let timeout = self.body_limits.read_timeout;
        let mut deadline = tokio::time::Instant::now() + timeout;
        let mut acc = Accumulated::default();
        let stalled = |acc: &Accumulated, expected: Option<usize>| {
            let sent = match expected {
                Some(n) => format!("{} of its {n} bytes", acc.len),
                None => format!("{} bytes", acc.len),
            };
            let status = Status::new(
                Code::DeadlineExceeded,
                format!(
                    "pullgate: {method}: the request sent {sent} and then stopped; a request must arrive \
                     whole within {} (server.limits.body_read_timeout)",
                    humantime::format_duration(timeout)
                ),
            );
            (status, Some(BodyRefusal::ReadTimeout))
        };
        while acc.len < FRAME_HEADER_LEN {
            match next_data(&mut body, deadline, method).await {
                Ok(Some(data)) => acc.push(data, 0),
                Ok(None) => return Ok((acc.finish(), None)),
                Err(None) => return Err(stalled(&acc, None)),
                Err(Some(broken)) => return Err((broken, None)),
            }
        }
        let announced = acc.announced();
        let (cap, key) = self.body_limits.cap(method);
        if announced > cap {
            let limit = match key {
                Some(key) => format!("the {cap}-byte limit for this method ({key})"),
                None => format!("the {cap}-byte gRPC message limit"),
            };
            let status = Status::new(
                Code::ResourceExhausted,
                format!(
                    "pullgate: {method}: the request message is {announced} bytes, above {limit}"
                ),
            );
            return Err((status, Some(BodyRefusal::MessageCap)));
        }
        let expected = FRAME_HEADER_LEN + announced;
        let waiting = tokio::time::Instant::now();
        let reservation = self.budget.reserve(expected).await.map_err(|e| {
            let status = Status::new(
                Code::ResourceExhausted,
                format!(
                    "pullgate: {method}: too many large requests at once: the {} bytes of this one do not fit \
                     in the {}-byte budget for request bodies being read (server.limits.body_budget); retry later",
                    e.wanted, e.total
                ),
            );
            (status, Some(BodyRefusal::Budget))
        })?;
        // Time spent waiting for room is not the client's.
        deadline += waiting.elapsed();
        loop {
            if acc.len > expected {
                let e = grpc::FrameError::LengthMismatch {
                    announced,
                    actual: acc.len - FRAME_HEADER_LEN,
                };
                return Err((e.status(method), None));
            }
            match next_data(&mut body, deadline, method).await {
                Ok(Some(data)) => acc.push(data, expected),
                Ok(None) => break,
                Err(None) => return Err(stalled(&acc, Some(expected))),
                Err(Some(broken)) => return Err((broken, None)),
            }
        }
        Ok((acc.finish(), Some(reservation)))
    }
}

/// The next non-empty DATA frame of a request body (`None` at its end); request trailers are
/// skipped (they carry nothing pullgate forwards for unary calls). `Err(None)`: `deadline` passed;
/// `Err(Some(status))`: the stream broke.
async fn next_data<B>(
    body: &mut B,
    deadline: tokio::time::Instant,
    method: &str,
) -> Result<Option<Bytes>, Option<Status>>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ok(None),
            Err(_) => return Err(None),
        };
        let frame = frame.map_err(|e| {
            Some(Status::new(
                Code::Cancelled,
                format!("pullgate: {method}: the request body could not be read: {e}"),
            ))
        })?;
        if let Ok(data) = frame.into_data() {
            if !data.is_empty() {
                return Ok(Some(data));
            }
        }
    }
}

/// A request body as it arrives: the first DATA frame as is (the common case is one frame, kept
/// without copying), copied into one buffer once a second frame comes.
#[derive(Default)]
struct Accumulated {
    first: Option<Bytes>,
    buf: BytesMut,
    len: usize,
}

impl Accumulated {
    /// Adds a frame; `expected` (the announced body length, once known) sizes the buffer once.
    fn push(&mut self, data: Bytes, expected: usize) {
        self.len += data.len();
        match self.first.take() {
            None if self.buf.is_empty() => self.first = Some(data),
            None => self.buf.extend_from_slice(&data),
            Some(f) => {
                self.buf.reserve(expected.max(self.len));
                self.buf.extend_from_slice(&f);
                self.buf.extend_from_slice(&data);
            }
        }
    }

    /// The message length in the gRPC prefix; at least [`FRAME_HEADER_LEN`] bytes have arrived.
    fn announced(&self) -> usize {
        let p = match &self.first {
            Some(f) => &f[..FRAME_HEADER_LEN],
            None => &self.buf[..FRAME_HEADER_LEN],
        };
        u32::from_be_bytes([p[1], p[2], p[3], p[4]]) as usize
    }

    fn finish(self) -> Bytes {
        self.first.unwrap_or_else(|| self.buf.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_paths_must_be_well_formed() {
        for ok in [
            "/runtime.v1.ImageService/PullImage",
            "/grpc.health.v1.Health/Check",
            "/a/B_2",
        ] {
            assert!(well_formed_method(ok), "{ok}");
        }
        for bad in [
            "runtime.v1.ImageService/PullImage",
            "//runtime.v1.ImageService/PullImage",
            "/runtime.v1.ImageService/PullImage/",
            "/runtime.v1.ImageService/Pull%49mage",
            "/runtime.v1.ImageService",
            "/",
            "",
            "/a.b/c/d",
        ] {
            assert!(!well_formed_method(bad), "{bad}");
        }
    }

    #[test]
    fn reach_limits_forwarding_to_cri() {
        assert!(Reach::Cri.allows("/runtime.v1.RuntimeService/SomeFutureMethod"));
        assert!(Reach::Cri.allows("/runtime.v1alpha2.RuntimeService/Version"));
        assert!(Reach::Cri.allows("/grpc.health.v1.Health/Check"));
        assert!(!Reach::Cri.allows("/containerd.services.tasks.v1.Tasks/Create"));
        assert!(!Reach::Cri.allows("/runtime.v1x.Evil/Create"));
        assert!(Reach::All.allows("/containerd.services.tasks.v1.Tasks/Create"));
    }
}
