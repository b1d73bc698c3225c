//! One kubelet connection relayed at the frame level to its own connection to containerd.
//!
//! One task owns both sockets. Frames are read in batches from either side, looked at, and written
//! on in one write per batch:
//! - Header blocks are decoded and re-encoded as literals ([`super::blocks`]); a request's block
//!   decides its stream's route ([`Proxy::route`]). Forwarded streams keep their IDs upstream;
//!   refused ones are answered by pullgate (trailers-only) and never opened upstream. Intercepted
//!   calls are decided on a task of their own ([`super::local`]): answered by pullgate, or sent to
//!   containerd by the relay with pullgate's request ([`Fed`]), their answer relayed or, if it is
//!   edited, gathered and sent as pullgate's own ([`Gather`]). A call being decided is opened
//!   upstream early when a later stream goes first ([`UpSide`]): stream IDs must rise there.
//! - SETTINGS pass both ways with three values capped: the header table sizes (pullgate decodes
//!   with a 4 KiB table) and, towards kubelet, the concurrent streams and header list size
//!   pullgate allows. Everything else passes as it came; flow control is the peers' own except
//!   for the corrections of [`super::flow`].
//! - pullgate keeps the connection itself: keepalive pings to a silent client, idle closing,
//!   eviction and shutdown with GOAWAY, and closing when containerd's connection ends (calls in
//!   flight end `UNAVAILABLE`, the client reconnects).
//!
//! Backpressure: a side is not read while the bytes waiting to be written to the other side are
//! over [`HIGH_WATER`], so a peer that does not read holds back the one that writes.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::blocks::{Block, BlockError, Blocks, MAX_HEADER_LIST, TABLE_SIZE, field, fields};
use super::flow::{ConnFlow, FlowError, Outgoing, StreamWindow};
use super::frame::*;
use super::hpack::put_literal;
use super::local::{Event, Local, Out};
use crate::node::config::Limits;
use crate::node::proxy::body::CallRecord;
use crate::node::proxy::budget::Reservation;
use crate::node::proxy::grpc::{self, Code, FRAME_HEADER_LEN, MAX_MESSAGE_SIZE, Status};
use crate::node::proxy::refusal::Refusal;
use crate::node::proxy::socket::{Rx, Tx, split};
use crate::node::proxy::track::{Conn, StreamGuard};
use crate::node::proxy::upstream::UpstreamError;
use crate::node::proxy::{Afterwards, Decided, Forward, Proxy, ResponseEdit, Route};

/// Bytes waiting for one side past which the other side is not read.
const HIGH_WATER: usize = 1 << 20;
/// The largest header block containerd may send (its trailers carry error details).
const MAX_RESPONSE_BLOCK: usize = 1 << 20;
/// PINGs that may wait for their answer, each way; a client that sends more is refused.
const MAX_PINGS_IN_FLIGHT: usize = 64;
/// The payload of pullgate's own keepalive PING, told apart from kubelet's on the ACK.
const KEEPALIVE_OPAQUE: [u8; 8] = *b"pullgate";
/// The payload of the PING that follows the first GOAWAY when pullgate closes a connection.
const CLOSING_OPAQUE: [u8; 8] = *b"pg-close";
/// Streams pullgate remembers having cut off from containerd's answer (see `Owner::Gone`).
const MAX_CUT_OFF: usize = 64;
/// The stream window an answer pullgate gathers has at least, whatever kubelet's.
const GATHER_WINDOW: u32 = 65_535;
/// How long an intercepted call waits for the rest of its request before it starts on a task of
/// its own (a request normally arrives whole with its headers, or right after them).
const START_WAIT: Duration = Duration::from_millis(2);
/// Request bytes past which an intercepted call starts without waiting for the rest: it reads
/// the rest as it comes, giving kubelet its window back.
const START_BYTES: usize = 32 * 1024;
/// The bytes pullgate owes containerd's connection window past which it gives them back at once:
/// half of the smallest window HTTP/2 allows, so containerd never waits for them.
const OWED_FLUSH: u32 = 32 * 1024;
/// The bytes pullgate owes kubelet's connection window (request DATA it took itself) past which
/// it gives them back at once rather than with its next write to kubelet: a quarter of the
/// smallest window, so that with what containerd holds back too kubelet never waits for them.
const KUBE_OWED_FLUSH: u32 = 16 * 1024;
/// After pullgate starts closing a connection itself, how long the client has to go once no call
/// is open.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// A connection error: what kubelet is told in GOAWAY, and the refusal it counts as.
struct Fatal {
    code: u32,
    reason: Option<Refusal>,
    what: String,
}

impl Fatal {
    fn protocol(reason: Refusal, what: impl Into<String>) -> Self {
        Fatal {
            code: PROTOCOL_ERROR,
            reason: Some(reason),
            what: what.into(),
        }
    }
}

impl Fatal {
    fn frame_size(what: &str) -> Self {
        Fatal {
            code: FRAME_SIZE_ERROR,
            reason: Some(Refusal::ConnectionError),
            what: what.into(),
        }
    }

    fn calm(what: &str) -> Self {
        Fatal {
            code: ENHANCE_YOUR_CALM,
            reason: Some(Refusal::ConnectionError),
            what: what.into(),
        }
    }
}

impl From<BlockError> for Fatal {
    fn from(e: BlockError) -> Self {
        Fatal::protocol(Refusal::BadHeaderBlock, e.to_string())
    }
}

impl From<FlowError> for Fatal {
    fn from(e: FlowError) -> Self {
        Fatal {
            code: FLOW_CONTROL_ERROR,
            reason: None,
            what: e.to_string(),
        }
    }
}

/// A stream relayed to containerd.
struct Forwarded {
    _guard: StreamGuard,
    record: CallRecord,
    started: Instant,
    client_done: bool,
    server_done: bool,
    /// containerd has sent the response's first header block.
    answered: bool,
    /// An intercepted call pullgate forwarded: the request is pullgate's, not kubelet's.
    fed: Option<Box<Fed>>,
}

/// The request of an intercepted call pullgate forwards: its data goes to containerd within
/// containerd's window for the stream, whose WINDOW_UPDATEs are therefore pullgate's, not
/// kubelet's.
struct Fed {
    /// Request data not sent yet.
    data: Bytes,
    /// The END_STREAM of the request has been sent.
    sent: bool,
    /// containerd's room for the stream's request data.
    window: i64,
    /// The request's bytes in the body budget, held until they are handed to the connection.
    reservation: Option<Reservation>,
    /// containerd's answer, gathered while it is to be edited.
    edit: Option<Gather>,
}

/// containerd's answer to a call whose response message pullgate edits: held back from kubelet
/// until it is complete (containerd gets its windows back as it sends), then edited and sent as
/// pullgate's own answer.
struct Gather {
    edit: ResponseEdit,
    /// The response headers, once containerd sent a `200` that is not trailers-only.
    head: Option<Vec<u8>>,
    data: BytesMut,
    /// kubelet's window for the stream: pullgate sends the answer.
    kube_window: StreamWindow,
    /// kubelet's WINDOW_UPDATEs for the stream, owed to containerd if its answer passes after all.
    kube_updates: u64,
    /// What pullgate granted containerd on the stream beyond kubelet's initial window, to
    /// gather the answer whatever kubelet's window.
    extra: u32,
    /// Bytes of the answer not yet given back to containerd on the stream.
    unreturned: u32,
}

/// Where a stream pullgate answers (or is deciding) stands on containerd's connection.
enum UpSide {
    /// Not opened there; its request block opens it if the call is forwarded.
    Pending(Opening),
    /// Opened (without data) on the connection of this generation, because a later stream went
    /// first and stream IDs must rise (RFC 9113 §5.1.1).
    Opened(u64),
    /// containerd is done with it.
    Done,
}

/// Whose a stream is that containerd sends a frame on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// Relayed: the frame is kubelet's.
    Relayed,
    /// pullgate answers it (containerd has seen its request block only): the frame is dropped.
    Answered,
    /// pullgate sent its request: containerd's WINDOW_UPDATEs are pullgate's, and so is its
    /// answer while `gathering`.
    Fed { gathering: bool },
    /// pullgate ended it towards kubelet while containerd was still answering (and was told to
    /// stop): what containerd still sends on it is dropped.
    Gone,
}

/// A stream pullgate answers itself, or is still deciding.
struct Answered {
    _guard: StreamGuard,
    local: Local,
    window: StreamWindow,
    client_done: bool,
    /// The room kubelet has to send request data on the stream: containerd's initial stream
    /// window as kubelet knows it (pullgate answers in its place), plus what pullgate gave back as
    /// the call read, less what kubelet sent.
    recv_window: i64,
    up: UpSide,
}

enum Stream {
    Forwarded(Forwarded),
    Answered(Answered),
}

/// Hashing for the stream map: its keys are stream IDs a client chooses (odd, increasing), so a
/// multiplication spreads them well enough, at a fraction of SipHash's cost on every frame. A map
/// holds at most the connection's stream limit (pullgate refuses streams past it), which bounds
/// what IDs chosen to collide could cost.
#[derive(Clone, Copy, Default)]
struct StreamIds;

impl std::hash::BuildHasher for StreamIds {
    type Hasher = StreamIdHasher;

    fn build_hasher(&self) -> StreamIdHasher {
        StreamIdHasher(0)
    }
}

#[derive(Default)]
struct StreamIdHasher(u64);

impl std::hash::Hasher for StreamIdHasher {
    fn finish(&self) -> u64 {
        // The product's high half mixes every bit of the ID; the table indexes by the low bits.
        self.0.rotate_left(32)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// The (identifier, value) entries of a SETTINGS payload (whole entries only).
fn settings_entries(payload: &[u8]) -> Vec<(u16, u32)> {
    payload
        .chunks_exact(6)
        .map(|e| {
            (
                u16::from_be_bytes([e[0], e[1]]),
                u32::from_be_bytes([e[2], e[3], e[4], e[5]]),
            )
        })
        .collect()
}

/// Adds to a SETTINGS frame (`f`, for kubelet) the values it leaves at their defaults that a
/// client may hold differently from an earlier connection to containerd.
fn with_defaults(f: &mut Vec<u8>, max_streams: u32) {
    let mut entries = settings_entries(&f[FRAME_HEADER..]);
    let ids: Vec<u16> = entries.iter().map(|(id, _)| *id).collect();
    for (id, value) in [
        (SETTINGS_INITIAL_WINDOW_SIZE, 65_535),
        (SETTINGS_MAX_FRAME_SIZE, MIN_MAX_FRAME_SIZE as u32),
        (SETTINGS_MAX_CONCURRENT_STREAMS, max_streams),
        (SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST as u32),
    ] {
        if !ids.contains(&id) {
            entries.push((id, value));
        }
    }
    f.clear();
    put_settings(f, &entries);
}

/// Connects to a unix socket without waiting: a connect to a listening unix socket completes or
/// fails at once, except when its backlog is full, which is reported as an error (`EAGAIN`)
/// rather than waited out on the connection's task.
fn connect_now(path: &std::path::Path) -> std::io::Result<std::os::unix::net::UnixStream> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: zeroed sockaddr_un is a valid value; the path is copied within its bounds below.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: connect(2) with a valid descriptor and an address of the given length.
    let r = unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(std::os::unix::net::UnixStream::from(fd))
}

/// containerd's SETTINGS (`payload`) as kubelet gets them: the header table size, concurrent
/// streams and header list size no larger than pullgate's; `None` for a malformed payload.
fn capped_settings(payload: &[u8], max_streams: u32) -> Option<Vec<u8>> {
    if payload.len() % 6 != 0 {
        return None;
    }
    let entries: Vec<(u16, u32)> = settings_entries(payload)
        .into_iter()
        .map(|(id, value)| {
            let cap = match id {
                SETTINGS_HEADER_TABLE_SIZE => TABLE_SIZE as u32,
                SETTINGS_MAX_CONCURRENT_STREAMS => max_streams,
                SETTINGS_MAX_HEADER_LIST_SIZE => MAX_HEADER_LIST as u32,
                _ => u32::MAX,
            };
            (id, value.min(cap))
        })
        .collect();
    let mut f = Vec::with_capacity(FRAME_HEADER + payload.len());
    put_settings(&mut f, &entries);
    Some(f)
}

/// The request block of an intercepted call, kept to open its stream on containerd's connection
/// if the call goes there: without END_STREAM (pullgate sends the body).
struct Opening {
    /// The block's frames.
    frames: Vec<u8>,
    /// The block's fields, kept if it has a `content-length`: that must be said anew for the body
    /// pullgate sends (which it may have rewritten).
    literals: Option<Vec<u8>>,
}

impl Opening {
    fn new(mut frames: Vec<u8>, literals: &[u8]) -> Self {
        frames[4] &= !END_STREAM;
        let literals = field(literals, b"content-length").map(|_| literals.to_vec());
        Opening { frames, literals }
    }

    /// The block for a body of `len` bytes (`None`: not known yet, no `content-length` is sent).
    fn block(self, len: Option<usize>) -> Bytes {
        let Some(literals) = self.literals else {
            return Bytes::from(self.frames);
        };
        let (_, _, stream) = head(&self.frames);
        let mut kept = Vec::with_capacity(literals.len());
        for (name, value) in fields(&literals) {
            match name {
                b"content-length" => {
                    if let Some(len) = len {
                        put_literal(&mut kept, name, len.to_string().as_bytes());
                    }
                }
                _ => put_literal(&mut kept, name, value),
            }
        }
        let mut out = Vec::with_capacity(kept.len() + 2 * FRAME_HEADER);
        put_frames(&mut out, stream, false, &kept);
        Bytes::from(out)
    }
}

/// containerd's header blocks: its table is pullgate's decoder's, which starts afresh with
/// every connection to containerd.
fn response_blocks() -> Blocks {
    Blocks::new(
        false,
        TABLE_SIZE,
        MAX_RESPONSE_BLOCK,
        4 * MAX_RESPONSE_BLOCK,
    )
}

/// Frames for containerd held back until the end of a batch of kubelet's frames (see
/// [`Session::release_deferred`]).
struct Deferred {
    /// Each frame, its flow-controlled length, and the forwarded stream it opens, if it does.
    frames: Vec<(Bytes, u32, Option<u32>)>,
}

/// A containerd connection's SETTINGS frame on its way to kubelet.
#[derive(Clone, Copy)]
struct UpSettings {
    generation: u64,
    /// The SETTINGS_INITIAL_WINDOW_SIZE it raises containerd's to.
    raised_window: Option<u32>,
}

/// What kubelet told containerd in SETTINGS that pullgate needs for its own answers.
struct KubeSettings {
    initial_window: u32,
    max_frame: usize,
}

/// The connection's limits, from `[server.limits]`.
#[derive(Clone)]
pub struct SessionLimits {
    pub max_streams: u32,
    pub keepalive_interval: Option<Duration>,
    pub keepalive_timeout: Duration,
}

impl SessionLimits {
    pub fn from_config(limits: &Limits) -> Self {
        SessionLimits {
            max_streams: limits.max_streams_per_connection,
            keepalive_interval: limits.keepalive_interval,
            keepalive_timeout: limits.keepalive_timeout,
        }
    }
}

struct Session {
    proxy: Arc<Proxy>,
    tracked: Conn,
    limits: SessionLimits,
    kube_rx: Rx,
    kube: Tx,
    up_rx: Option<Rx>,
    up: Option<Tx>,
    /// Why containerd cannot be reached, while it cannot.
    up_error: Option<String>,
    requests: Blocks,
    responses: Blocks,
    /// containerd → kubelet: containerd's frames and pullgate's answers, within kubelet's window.
    resp_flow: ConnFlow,
    resp_ready: Vec<Outgoing>,
    /// kubelet → containerd: kubelet's frames for forwarded streams, within containerd's window.
    req_flow: ConnFlow,
    req_ready: Vec<Outgoing>,
    /// kubelet's SETTINGS as containerd was told them (latest value per setting), replayed to a
    /// new containerd connection.
    kube_settings_sent: [Option<u32>; 9],
    /// The SETTINGS frames sent to containerd whose ACK is due, in order: `true` for kubelet's
    /// (the ACK goes to kubelet), `false` for pullgate's replay to a new connection.
    settings_to_up: VecDeque<bool>,
    /// The SETTINGS frames sent to kubelet whose ACK is due, in order: whose they are (`None`:
    /// pullgate's own; `Some`: that containerd connection's, with the larger initial stream
    /// window it names, which containerd may enforce only once the ACK reaches it).
    settings_to_kube: VecDeque<Option<UpSettings>>,
    /// kubelet's PINGs sent to containerd, not yet answered.
    pings_to_up: VecDeque<[u8; 8]>,
    /// containerd's PINGs sent to kubelet, not yet answered.
    pings_to_kube: VecDeque<[u8; 8]>,
    /// Counts the connections to containerd this client connection has had.
    generation: u64,
    /// The connection to containerd whose first SETTINGS kubelet has been sent.
    up_settings_generation: u64,
    /// The largest frame kubelet may send: 16 KiB until containerd allows more.
    kube_max_frame_in: usize,
    /// containerd's SETTINGS_INITIAL_WINDOW_SIZE as kubelet knows it: the receive window pullgate
    /// grants a stream it answers itself.
    up_initial_window: u32,
    /// containerd's SETTINGS_INITIAL_WINDOW_SIZE as containerd enforces it: the room of a stream
    /// whose request pullgate sends.
    up_send_initial: u32,
    /// Intercepted streams still being decided and not opened on containerd's connection, in
    /// order: a forwarded stream above them opens them first.
    pending_open: Vec<u32>,
    /// Intercepted streams whose call has not started, with when they opened: a call starts
    /// once its request is complete (decided at once, on this task), or has [`START_BYTES`]
    /// waiting, or has waited [`START_WAIT`] (then decided on a task of its own, fed the rest).
    waiting: Vec<(u32, Instant)>,
    /// Frames for containerd held back in this batch of kubelet's frames.
    deferred: Option<Deferred>,
    /// Streams pullgate ended towards kubelet while containerd was still answering (see
    /// [`Owner::Gone`]), until containerd ends them too; the oldest are forgotten past
    /// [`MAX_CUT_OFF`].
    cut_off: VecDeque<u32>,
    /// Bytes of containerd's DATA that pullgate took itself (answers it edits, answers to calls it
    /// answered itself) and has not given back on the connection yet: given with kubelet's next
    /// WINDOW_UPDATE, or at once past [`OWED_FLUSH`]. Each WINDOW_UPDATE of its own would cost
    /// containerd a wake-up.
    up_owed: u32,
    /// Bytes of kubelet's connection window pullgate took (request DATA of calls it decides) and
    /// has not given back yet: given with the next frames pullgate writes to kubelet anyway (the
    /// call's answer, usually), or at once past [`KUBE_OWED_FLUSH`]. A WINDOW_UPDATE of its own
    /// would cost kubelet a wake-up, and pullgate a write, ahead of the call's request.
    kube_owed: u32,
    /// The handlers' work for once the requests of the calls decided this turn are handed to
    /// containerd ([`Afterwards`]): done at the end of the turn, before anything more is read.
    afterwards: Afterwards,
    /// containerd sent GOAWAY: no new stream goes to this connection, which is dropped once its
    /// streams are done.
    up_draining: bool,
    streams: HashMap<u32, Stream, StreamIds>,
    last_stream: u32,
    kube_settings: KubeSettings,

    events_tx: mpsc::UnboundedSender<Event>,
    /// Closing: since when, and once the client has seen the first GOAWAY, the last stream taken.
    closing: Option<Closing>,
    last_read: Instant,
    ping_sent: Option<Instant>,
}

/// Serves one kubelet connection whose preface has been checked (not consumed) until either side
/// ends it, `shutdown` turns true, or pullgate closes it (idle, evicted).
pub async fn serve(
    proxy: Arc<Proxy>,
    limits: SessionLimits,
    kube: UnixStream,
    tracked: Conn,
    shutdown: watch::Receiver<bool>,
) {
    let split = kube.into_std().and_then(split);
    let Ok((kube_rx, kube)) = split else {
        tracing::warn!("cannot register a client connection with the event loop");
        return;
    };
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let now = Instant::now();
    let mut s = Session {
        requests: Blocks::new(true, TABLE_SIZE, MAX_HEADER_LIST, MAX_HEADER_LIST),
        responses: response_blocks(),
        proxy,
        tracked,
        limits,
        kube_rx,
        kube,
        up_rx: None,
        up: None,
        up_error: None,
        resp_flow: ConnFlow::default(),
        resp_ready: Vec::new(),
        req_flow: ConnFlow::default(),
        req_ready: Vec::new(),
        kube_settings_sent: [None; 9],
        settings_to_up: VecDeque::new(),
        settings_to_kube: VecDeque::new(),
        pings_to_up: VecDeque::new(),
        pings_to_kube: VecDeque::new(),
        generation: 0,
        up_settings_generation: 0,
        kube_max_frame_in: MIN_MAX_FRAME_SIZE,
        up_initial_window: 65_535,
        up_send_initial: 65_535,
        pending_open: Vec::new(),
        waiting: Vec::new(),
        up_owed: 0,
        kube_owed: 0,
        afterwards: Afterwards::default(),
        cut_off: VecDeque::new(),
        deferred: None,
        up_draining: false,
        streams: HashMap::default(),
        last_stream: 0,
        kube_settings: KubeSettings {
            initial_window: 65_535,
            max_frame: MIN_MAX_FRAME_SIZE,
        },
        events_tx,
        closing: None,
        last_read: now,
        ping_sent: None,
    };
    s.own_settings();
    let mut preface_left = crate::node::proxy::conn::PREFACE.len();
    let far = Instant::now() + Duration::from_secs(86400 * 365);
    let timer = tokio::time::sleep_until(far);
    tokio::pin!(timer);
    let mut wake = far;
    // Made once, not on every turn of the loop: each resolves at most once that matters.
    let stopping = stopping(shutdown);
    tokio::pin!(stopping);
    let mut draining = false;
    let conn_state = s.tracked.state().clone();
    let evicted = conn_state.evicted();
    tokio::pin!(evicted);
    let mut evicted_seen = false;
    loop {
        let next = s.next_wake().unwrap_or(far);
        if next != wake {
            wake = next;
            timer.as_mut().reset(wake);
        }
        // kubelet is read while what it makes pullgate send either way has room: a client that
        // does not read what it asks for holds back only itself.
        // (What waits for kubelet's window is bounded apart: kubelet must be read for the
        // WINDOW_UPDATEs that release it, see `request_block`.)
        let up_full =
            s.up.as_ref().map_or(0, Tx::pending) + s.req_flow.queued_bytes() >= HIGH_WATER;
        let kube_room = !up_full && s.kube.pending() < HIGH_WATER;
        if up_full {
            // Not reading kubelet while containerd is slow is pullgate's choice: the keepalive
            // clock does not run meanwhile. (A client that does not read its own socket is not
            // excused: its keepalive PING goes unanswered.)
            s.last_read = Instant::now();
            s.ping_sent = None;
        }
        let up_room = s.kube.pending() < HIGH_WATER;
        s.kube_rx.input.reserve(16 * 1024);
        if let Some(up) = &mut s.up_rx {
            up.input.reserve(16 * 1024);
        }
        let up_readable = s.up_rx.is_some();
        let up_pending = s.up.as_ref().is_some_and(|u| u.pending() > 0);
        let step = tokio::select! {
            biased;
            n = s.kube.write(), if s.kube.pending() > 0 => match n {
                Ok(_) => Step::Nothing,
                Err(_) => Step::End,
            },
            n = write_up(&mut s.up), if up_pending => match n {
                Ok(_) => Step::Nothing,
                Err(e) => Step::UpGone(e.to_string()),
            },
            // containerd first: what it says (an answer, GOAWAY, its end) decides what becomes of
            // kubelet's next frames.
            n = read_up(&mut s.up_rx), if up_room && up_readable => match n {
                Ok(0) => Step::UpGone("containerd closed the connection".into()),
                Err(e) => Step::UpGone(e.to_string()),
                Ok(_) => Step::UpRead,
            },
            n = s.kube_rx.read(), if kube_room => match n {
                Ok(0) | Err(_) => Step::End,
                Ok(_) => Step::KubeRead,
            },
            ev = events.recv() => match ev {
                Some(ev) => Step::Event(ev),
                None => Step::Nothing,
            },
            () = &mut stopping, if !draining => {
                draining = true;
                s.start_closing();
                Step::Nothing
            }
            () = &mut evicted, if !evicted_seen => {
                evicted_seen = true;
                s.start_closing();
                Step::Nothing
            }
            _ = &mut timer => Step::Timer,
        };
        let result = match step {
            Step::Nothing => Ok(()),
            Step::End => break,
            Step::KubeRead => {
                s.last_read = Instant::now();
                s.ping_sent = None;
                if preface_left > 0 {
                    let n = preface_left.min(s.kube_rx.input.len());
                    s.kube_rx.input.advance(n);
                    preface_left -= n;
                }
                s.kube_frames()
                    .and_then(|()| s.release_deferred())
                    .and_then(|()| s.start_calls())
            }
            Step::UpRead => s.up_frames(),
            Step::UpGone(why) => {
                s.upstream_gone(why);
                Ok(())
            }
            Step::Event(ev) => {
                let mut result = s.event(ev);
                while result.is_ok() {
                    match events.try_recv() {
                        Ok(ev) => result = s.event(ev),
                        Err(_) => break,
                    }
                }
                result
            }
            Step::Timer => {
                wake = far;
                match s.timer() {
                    true => break,
                    false => s.start_calls(),
                }
            }
        };
        if !s.afterwards.is_empty() {
            // A failing connection sends containerd nothing more: it is about to be dropped.
            s.run_afterwards(result.is_ok());
        }
        if let Err(fatal) = result {
            s.fail(fatal).await;
            break;
        }
        s.drop_drained_upstream();
        s.flush_ready();
        if s.finished() {
            s.close_gracefully().await;
            break;
        }
    }
    for stream in s.streams.values() {
        if let Stream::Answered(a) = stream {
            a.local.abort();
        }
    }
}

/// A graceful close (RFC 9113 §6.8): GOAWAY naming the largest stream ID and a PING, then, once
/// the PING comes back (the client has seen the GOAWAY and opens no more streams), GOAWAY naming
/// the last stream taken. Streams that crossed the first GOAWAY are still served.
#[derive(Clone, Copy)]
struct Closing {
    since: Instant,
    last: Option<u32>,
    /// When the final GOAWAY was sent.
    last_at: Option<Instant>,
}

enum Step {
    Nothing,
    End,
    KubeRead,
    UpRead,
    UpGone(String),
    Event(Event),
    Timer,
}

/// Resolves once `shutdown` turns true (or its sender is gone).
async fn stopping(mut shutdown: watch::Receiver<bool>) {
    while !*shutdown.borrow_and_update() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

async fn write_up(up: &mut Option<Tx>) -> std::io::Result<usize> {
    match up {
        Some(u) => u.write().await,
        None => std::future::pending().await,
    }
}

async fn read_up(up: &mut Option<Rx>) -> std::io::Result<usize> {
    match up {
        Some(u) => u.read().await,
        None => std::future::pending().await,
    }
}

impl Session {
    /// pullgate's own SETTINGS, the first frame kubelet gets: the limits pullgate keeps itself.
    /// containerd's come once a call opens a connection to it ([`Session::up_settings`]).
    fn own_settings(&mut self) {
        let entries = [
            (SETTINGS_MAX_CONCURRENT_STREAMS, self.limits.max_streams),
            (SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST as u32),
        ];
        put_settings(self.kube_ctl(), &entries);
        self.settings_to_kube.push_back(None);
    }

    /// Every whole frame kubelet sent.
    fn kube_frames(&mut self) -> Result<(), Fatal> {
        loop {
            let frame = match next_frame(&mut self.kube_rx.input, self.kube_max_frame_in) {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(()),
                Err(len) => {
                    return Err(Fatal {
                        code: FRAME_SIZE_ERROR,
                        reason: Some(Refusal::ConnectionError),
                        what: format!("a frame of {len} bytes"),
                    });
                }
            };
            self.kube_frame(frame)?;
        }
    }

    fn kube_frame(&mut self, frame: Bytes) -> Result<(), Fatal> {
        let (kind, flags, stream) = head(&frame);
        if self.requests.is_open() && kind != CONTINUATION {
            return Err(Fatal::protocol(
                Refusal::BadHeaderBlock,
                format!(
                    "a frame of type {kind} inside the header block of stream {} (only CONTINUATION may follow)",
                    self.requests.open_stream().unwrap_or(0)
                ),
            ));
        }
        match kind {
            HEADERS if stream == 0 => {
                return Err(Fatal::protocol(
                    Refusal::BadHeaderBlock,
                    "a HEADERS frame on stream 0",
                ));
            }
            HEADERS | CONTINUATION => {
                if let Some(block) =
                    self.requests
                        .frame(kind, flags, stream, &frame[FRAME_HEADER..])?
                {
                    self.request_block(block)?;
                }
            }
            DATA if stream == 0 || stream > self.last_stream => {
                return Err(Fatal::protocol(
                    Refusal::ConnectionError,
                    format!("a DATA frame on stream {stream}, which is not open"),
                ));
            }
            DATA => self.kube_data(frame, flags, stream)?,
            WINDOW_UPDATE => {
                let payload = &frame[FRAME_HEADER..];
                let inc = u31(payload)
                    .filter(|_| payload.len() == 4)
                    .ok_or_else(|| Fatal::frame_size("a WINDOW_UPDATE frame not 4 bytes long"))?;
                if inc == 0 {
                    return Err(Fatal::protocol(
                        Refusal::ConnectionError,
                        "a WINDOW_UPDATE of 0 bytes",
                    ));
                }
                if stream == 0 {
                    let pass = self.resp_flow.receiver_update(inc, &mut self.resp_ready)?;
                    // What pullgate owes containerd rides along.
                    let room = (super::flow::MAX_WINDOW as u32).saturating_sub(pass);
                    let owed = self.up_owed.min(room);
                    self.up_owed -= owed;
                    let pass = pass + owed;
                    if let Some(out) = self.up_ctl() {
                        put_window_update(out, 0, pass);
                    }
                } else {
                    match self.streams.get_mut(&stream) {
                        Some(Stream::Forwarded(Forwarded { fed: Some(fed), .. }))
                            if fed.edit.is_some() =>
                        {
                            let g = fed.edit.as_mut().expect("checked");
                            g.kube_window.grow(inc)?;
                            g.kube_updates += u64::from(inc);
                        }
                        Some(Stream::Forwarded(_)) => self.send_up(frame, 0)?,
                        Some(Stream::Answered(a)) => {
                            a.window.grow(inc)?;
                            self.pump(stream);
                        }
                        None => {}
                    }
                }
            }
            SETTINGS if stream != 0 => {
                return Err(Fatal::protocol(
                    Refusal::ConnectionError,
                    format!("a SETTINGS frame on stream {stream}"),
                ));
            }
            SETTINGS if flags & ACK != 0 => {
                if frame.len() != FRAME_HEADER {
                    return Err(Fatal::frame_size(
                        "a SETTINGS acknowledgement with a payload",
                    ));
                }
                // Whose SETTINGS kubelet acknowledges, in the order they were sent to it: pullgate's
                // own and a gone containerd's acknowledgements end here.
                match self.settings_to_kube.pop_front() {
                    Some(Some(up)) if up.generation == self.generation => {
                        self.send_up(frame, 0)?;
                        if let Some(window) = up.raised_window {
                            self.up_send_initial_is(window)?;
                        }
                    }
                    _ => {}
                }
            }
            SETTINGS => {
                let mut frame = frame.to_vec();
                self.kube_settings(&mut frame)?;
                match self.up.is_some() {
                    true => {
                        self.settings_to_up.push_back(true);
                        self.send_up(Bytes::from(frame), 0)?
                    }
                    false => put_head(self.kube_ctl(), 0, SETTINGS, ACK, 0),
                }
            }
            PING if stream != 0 || frame.len() != FRAME_HEADER + 8 => {
                return Err(Fatal::frame_size(
                    "a PING frame not on stream 0 with 8 bytes",
                ));
            }
            PING if flags & ACK != 0 => {
                let opaque: [u8; 8] = frame[FRAME_HEADER..].try_into().expect("8 bytes");
                match opaque {
                    KEEPALIVE_OPAQUE => {}
                    CLOSING_OPAQUE => self.final_goaway(),
                    // An answer to containerd's PING, if this containerd sent it.
                    _ => {
                        if let Some(i) = self.pings_to_kube.iter().position(|o| *o == opaque) {
                            self.pings_to_kube.remove(i);
                            self.send_up(frame, 0)?;
                        }
                    }
                }
            }
            PING if self.up.is_some() => {
                if self.pings_to_up.len() >= MAX_PINGS_IN_FLIGHT {
                    return Err(Fatal::calm("too many PINGs waiting for an answer"));
                }
                self.pings_to_up
                    .push_back(frame[FRAME_HEADER..].try_into().expect("8 bytes"));
                self.send_up(frame, 0)?;
            }
            PING => {
                put_head(self.kube_ctl(), 8, PING, ACK, 0);
                self.kube_ctl().extend_from_slice(&frame[FRAME_HEADER..]);
            }
            RST_STREAM if stream == 0 || frame.len() != FRAME_HEADER + 4 => {
                return Err(Fatal::frame_size(
                    "a RST_STREAM frame not on a stream with 4 bytes",
                ));
            }
            RST_STREAM => match self.streams.remove(&stream) {
                Some(Stream::Forwarded(_)) => self.send_up(frame, 0)?,
                Some(Stream::Answered(a)) => self.answered_gone(stream, a),
                None => {}
            },
            GOAWAY => {
                self.send_up(frame, 0)?;
                self.start_closing();
            }
            PRIORITY_FRAME => {}
            PUSH_PROMISE => {
                return Err(Fatal::protocol(
                    Refusal::ConnectionError,
                    "a PUSH_PROMISE from a client",
                ));
            }
            // Unknown frame types are ignored (RFC 9113 §4.1).
            _ => {}
        }
        Ok(())
    }

    /// A frame for containerd, in order behind any DATA waiting for containerd's window; `len`
    /// counts a DATA frame's payload (0 for anything else).
    fn send_up(&mut self, frame: Bytes, len: u32) -> Result<(), Fatal> {
        if let Some(d) = &mut self.deferred {
            d.frames.push((frame, len, None));
            return Ok(());
        }
        if self.up.is_some() {
            self.req_flow.relayed(frame, len, &mut self.req_ready)?;
        }
        Ok(())
    }

    /// The end of a batch of kubelet's frames: the held frames go, in order; before each that
    /// opens a forwarded stream, the calls below it are started (those complete are decided now)
    /// and the rest of them opened upstream.
    fn release_deferred(&mut self) -> Result<(), Fatal> {
        let Some(d) = self.deferred.take() else {
            return Ok(());
        };
        for (frame, len, opens) in d.frames {
            if let Some(stream) = opens {
                self.start_complete_below(stream)?;
                self.open_pending_below(stream)?;
            }
            self.send_up(frame, len)?;
        }
        Ok(())
    }

    /// kubelet's SETTINGS: the values pullgate's own answers follow are noted, the header table
    /// size containerd may use towards pullgate's decoder is capped.
    fn kube_settings(&mut self, frame: &mut [u8]) -> Result<(), Fatal> {
        let payload = &mut frame[FRAME_HEADER..];
        if payload.len() % 6 != 0 {
            return Err(Fatal {
                code: FRAME_SIZE_ERROR,
                reason: Some(Refusal::ConnectionError),
                what: "a SETTINGS frame whose length is not a multiple of 6".into(),
            });
        }
        for entry in payload.chunks_exact_mut(6) {
            let id = u16::from_be_bytes([entry[0], entry[1]]);
            let mut value = u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]);
            if id == SETTINGS_HEADER_TABLE_SIZE && value as usize > TABLE_SIZE {
                value = TABLE_SIZE as u32;
                entry[2..].copy_from_slice(&value.to_be_bytes());
            }
            let bad = match id {
                SETTINGS_ENABLE_PUSH => value > 1,
                SETTINGS_MAX_FRAME_SIZE => {
                    !(MIN_MAX_FRAME_SIZE..=MAX_FRAME).contains(&(value as usize))
                }
                _ => false,
            };
            if bad {
                return Err(Fatal::protocol(
                    Refusal::ConnectionError,
                    format!("SETTINGS {id:#x} = {value}, outside what HTTP/2 allows"),
                ));
            }
            // Known settings are replayed to a new containerd connection.
            if let Some(slot) = self.kube_settings_sent.get_mut(usize::from(id)) {
                *slot = Some(value);
            }
            match id {
                SETTINGS_INITIAL_WINDOW_SIZE => {
                    if i64::from(value) > super::flow::MAX_WINDOW {
                        return Err(FlowError::WindowOverflow.into());
                    }
                    let old = self.kube_settings.initial_window;
                    self.kube_settings.initial_window = value;
                    for stream in self.streams.values_mut() {
                        match stream {
                            Stream::Answered(a) => a.window.resize(old, value),
                            Stream::Forwarded(Forwarded { fed: Some(fed), .. }) => {
                                if let Some(g) = fed.edit.as_mut() {
                                    g.kube_window.resize(old, value);
                                }
                            }
                            Stream::Forwarded(_) => {}
                        }
                    }
                }
                SETTINGS_MAX_FRAME_SIZE => self.kube_settings.max_frame = value as usize,
                _ => {}
            }
        }
        let answered = self.stream_ids(|_, s| matches!(s, Stream::Answered(_)));
        for id in answered {
            self.pump(id);
        }
        Ok(())
    }

    /// containerd's SETTINGS: the header table size, concurrent streams and header list size
    /// capped to pullgate's (kubelet keeps pullgate's for those containerd does not send).
    fn up_settings(&mut self, frame: &[u8]) -> Result<Vec<u8>, Fatal> {
        capped_settings(&frame[FRAME_HEADER..], self.limits.max_streams).ok_or_else(|| Fatal {
            code: FRAME_SIZE_ERROR,
            reason: None,
            what: "containerd sent a SETTINGS frame whose length is not a multiple of 6".into(),
        })
    }

    /// A complete header block from kubelet: a new stream's request, or a stream's trailers.
    fn request_block(&mut self, mut block: Block) -> Result<(), Fatal> {
        let stream = block.stream;
        if stream <= self.last_stream {
            // Trailers of an open stream.
            match self.streams.get_mut(&stream) {
                // pullgate sent the request of a call it forwarded: it ended there.
                Some(Stream::Forwarded(f)) if f.fed.is_some() => {}
                Some(Stream::Forwarded(f)) => {
                    f.client_done |= block.end_stream;
                    self.send_block_up(block)?;
                    self.maybe_close(stream);
                }
                Some(Stream::Answered(a)) => {
                    a.client_done |= block.end_stream;
                    if block.end_stream {
                        a.local.end_body();
                    }
                    self.maybe_close(stream);
                }
                None => {}
            }
            return Ok(());
        }
        if stream % 2 == 0 {
            return Err(Fatal::protocol(
                Refusal::ConnectionError,
                format!("a request on the even stream {stream}"),
            ));
        }
        self.last_stream = stream;
        let insp = block.inspection;
        if let Some(fault) = insp.fault {
            return self.refuse_block(stream, fault);
        }
        if let Some(Closing {
            last: Some(last), ..
        }) = self.closing
        {
            if stream > last {
                put_rst(self.kube_ctl(), stream, REFUSED_STREAM);
                return Ok(());
            }
        }
        // Answers already waiting for kubelet's window: no new call until it takes them.
        let busy = if self.resp_flow.queued_bytes() >= HIGH_WATER {
            Some(format!(
                "{} bytes of answers wait for the client's flow-control window",
                self.resp_flow.queued_bytes()
            ))
        } else if self.streams.len() >= self.limits.max_streams as usize {
            Some(format!(
                "{} calls are open on the connection (server.limits.max_streams_per_connection)",
                self.streams.len()
            ))
        } else {
            None
        };
        if let Some(why) = busy {
            self.proxy.refusals().refuse(
                Refusal::StreamRefused,
                format_args!("refused stream {stream}: {why}"),
            );
            put_rst(self.kube_ctl(), stream, REFUSED_STREAM);
            return Ok(());
        }
        let path = block.path.take().unwrap_or_default();
        let path = std::str::from_utf8(&path).unwrap_or("");
        let proxy = self.proxy.clone();
        let route = proxy.route(path);
        let guard = self.tracked.state().open_stream();
        match route {
            Route::Forward if self.upstream_ready() => {
                let end_stream = block.end_stream;
                if self.deferred.is_none() {
                    self.start_complete_below(stream)?;
                }
                // A call below still waiting for its request may be complete by the end of this
                // batch (clients often send both calls' headers before either's data): this
                // stream's frames wait for the batch's end rather than open that call upstream
                // without its request now.
                let waiting_below = self.pending_open.first().is_some_and(|&id| id < stream)
                    && self.waiting.iter().any(|&(id, _)| id < stream);
                let opening = (Bytes::from(block.frames), 0, Some(stream));
                match (&mut self.deferred, waiting_below) {
                    (Some(d), _) => d.frames.push(opening),
                    (None, true) => {
                        self.deferred = Some(Deferred {
                            frames: vec![opening],
                        })
                    }
                    (None, false) => {
                        self.open_pending_below(stream)?;
                        self.send_up(opening.0, 0)?;
                    }
                }
                self.streams.insert(
                    stream,
                    Stream::Forwarded(Forwarded {
                        _guard: guard,
                        record: proxy.record(path),
                        started: Instant::now(),
                        client_done: end_stream,
                        server_done: false,
                        answered: false,
                        fed: None,
                    }),
                );
            }
            Route::Forward => {
                let why = self.up_error.clone().unwrap_or_default();
                let status = Status::new(
                    crate::node::proxy::grpc::Code::Unavailable,
                    format!("pullgate: {why}"),
                );
                let mut record = proxy.record(path);
                record.finish_code(status.code.as_str().as_bytes());
                self.answer_status(stream, &status, !block.end_stream);
                drop(guard);
            }
            Route::Malformed | Route::Outside => {
                let status = proxy.refuse(&route, path);
                let mut record = proxy.record(path);
                record.finish_code(status.code.as_str().as_bytes());
                self.answer_status(stream, &status, !block.end_stream);
                drop(guard);
            }
            Route::Intercept(handler) => {
                // Started once its request is here (`start_calls`).
                let local = Local::new(proxy.clone(), handler.clone(), path, block.end_stream);
                self.waiting.push((stream, Instant::now()));
                // The request block opens the stream on containerd's connection if the call is
                // forwarded; its data will be pullgate's.
                let opening = Opening::new(block.frames, self.requests.literals());
                self.pending_open.push(stream);
                self.streams.insert(
                    stream,
                    Stream::Answered(Answered {
                        _guard: guard,
                        local,
                        window: StreamWindow::new(self.kube_settings.initial_window),
                        client_done: block.end_stream,
                        recv_window: i64::from(self.up_initial_window),
                        up: UpSide::Pending(opening),
                    }),
                );
            }
        }
        Ok(())
    }

    /// A request block the HTTP/2 rules refuse: the stream is reset, or for a header field with
    /// bytes HTTP/2 does not allow, the connection is closed (as `h2` does).
    fn refuse_block(&mut self, stream: u32, fault: Refusal) -> Result<(), Fatal> {
        let what = format!("a request on stream {stream}");
        match fault {
            Refusal::InvalidHeader | Refusal::BadHeaderBlock => Err(Fatal::protocol(
                fault,
                format!("{what} with a header field HTTP/2 does not allow"),
            )),
            Refusal::HeaderListTooLarge => {
                self.proxy.refusals().refuse(
                    fault,
                    format_args!(
                        "reset {what}: its header list is over the {}-byte limit",
                        MAX_HEADER_LIST
                    ),
                );
                put_rst(self.kube_ctl(), stream, REFUSED_STREAM);
                Ok(())
            }
            _ => {
                self.proxy.refusals().refuse(
                    fault,
                    format_args!("reset {what} with PROTOCOL_ERROR ({fault})"),
                );
                put_rst(self.kube_ctl(), stream, PROTOCOL_ERROR);
                Ok(())
            }
        }
    }

    fn send_block_up(&mut self, block: Block) -> Result<(), Fatal> {
        self.send_up(Bytes::from(block.frames), 0)
    }

    /// A trailers-only answer from pullgate; `reset` when the client may still be sending.
    fn answer_status(&mut self, stream: u32, status: &Status, reset: bool) {
        self.end_with_status(stream, status, true, reset, false);
    }

    /// Ends `stream` towards kubelet with `status` in a header block with END_STREAM: a
    /// trailers-only answer (`head`: with `:status` and `content-type`) or trailers; `reset` when
    /// kubelet may still be sending (RST_STREAM(NO_ERROR) tells it to stop); `identity`: the
    /// answer says pullgate takes only uncompressed messages.
    fn end_with_status(
        &mut self,
        stream: u32,
        status: &Status,
        head: bool,
        reset: bool,
        identity: bool,
    ) {
        let mut block = Vec::with_capacity(96 + status.message.len());
        if head {
            put_literal(&mut block, b":status", b"200");
            put_literal(&mut block, b"content-type", b"application/grpc");
        }
        if identity {
            put_literal(&mut block, b"grpc-accept-encoding", b"identity");
        }
        let mut trailers = http::HeaderMap::new();
        status.insert_into(&mut trailers);
        for (name, value) in &trailers {
            put_literal(&mut block, name.as_str().as_bytes(), value.as_bytes());
        }
        let mut frames = Vec::with_capacity(block.len() + 2 * FRAME_HEADER + 4);
        put_frames(&mut frames, stream, true, &block);
        if reset {
            put_rst(&mut frames, stream, NO_ERROR);
        }
        self.resp_flow
            .own_data(Bytes::from(frames), 0, &mut self.resp_ready);
    }

    /// The IDs of the streams `pick` chooses.
    fn stream_ids(&self, pick: impl Fn(u32, &Stream) -> bool) -> Vec<u32> {
        self.streams
            .iter()
            .filter(|(id, s)| pick(**id, s))
            .map(|(id, _)| *id)
            .collect()
    }

    fn kube_data(&mut self, frame: Bytes, flags: u8, stream: u32) -> Result<(), Fatal> {
        let end = flags & END_STREAM != 0;
        let Some((data, total)) = data_payload(&frame, flags) else {
            return Err(Fatal::protocol(
                Refusal::ConnectionError,
                format!("a DATA frame on stream {stream} with more padding than payload"),
            ));
        };
        match self.streams.get_mut(&stream) {
            Some(Stream::Forwarded(f)) if f.fed.is_none() => {
                f.client_done |= end;
                self.send_up(frame, total)?;
                if end {
                    self.maybe_close(stream);
                }
            }
            Some(Stream::Answered(a)) => {
                // The connection's room is given back at once (a call that does not read holds
                // back only itself); the stream's as the call reads, padding at once.
                a.recv_window -= i64::from(total);
                let over = a.recv_window < 0;
                let padding = total - data.len() as u32;
                let own = match (over, a.client_done) {
                    (false, false) => {
                        a.client_done = end;
                        a.local.body(data);
                        if end {
                            a.local.end_body();
                        }
                        a.recv_window += i64::from(padding);
                        padding
                    }
                    _ => 0,
                };
                self.give_back_kube(total);
                put_window_update(self.kube_ctl(), stream, own);
                if over {
                    // More than the stream's window: a stream error (RFC 9113 §6.9.1).
                    self.reset_answered(stream, FLOW_CONTROL_ERROR);
                    if let Some(Stream::Answered(a)) = self.streams.remove(&stream) {
                        self.answered_gone(stream, a);
                    }
                }
            }
            // A stream already closed (reset, answered, or its request sent by pullgate): its data
            // is given back and dropped.
            Some(Stream::Forwarded(_)) | None => self.give_back_kube(total),
        }
        Ok(())
    }

    /// Every whole frame containerd sent.
    fn up_frames(&mut self) -> Result<(), Fatal> {
        loop {
            let Some(up) = &mut self.up_rx else {
                return Ok(());
            };
            let frame = match next_frame(&mut up.input, MAX_FRAME) {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(()),
                Err(len) => {
                    self.upstream_gone(format!("containerd sent a frame of {len} bytes"));
                    return Ok(());
                }
            };
            if let Err(e) = self.up_frame(frame) {
                self.upstream_gone(format!("containerd broke the protocol: {}", e.what));
                return Ok(());
            }
        }
    }

    fn up_frame(&mut self, frame: Bytes) -> Result<(), Fatal> {
        let (kind, flags, stream) = head(&frame);
        if self.responses.is_open() && kind != CONTINUATION {
            return Err(BlockError::Interleaved(kind).into());
        }
        let owner = match self.streams.get(&stream) {
            Some(Stream::Answered(Answered {
                up: UpSide::Pending(_),
                ..
            })) => {
                return Err(Fatal::protocol(
                    Refusal::ConnectionError,
                    format!(
                        "a frame of type {kind} on stream {stream}, which containerd never saw"
                    ),
                ));
            }
            Some(Stream::Answered(_)) => Owner::Answered,
            Some(Stream::Forwarded(Forwarded { fed: Some(fed), .. })) => Owner::Fed {
                gathering: fed.edit.as_ref().is_some_and(|g| g.head.is_some()),
            },
            None if stream != 0 && self.cut_off.contains(&stream) => Owner::Gone,
            _ => Owner::Relayed,
        };
        match kind {
            DATA if owner == (Owner::Fed { gathering: true }) => {
                self.gather_data(stream, frame, flags)?
            }
            DATA if matches!(owner, Owner::Answered | Owner::Gone) => {
                // Not kubelet's to see: containerd gets its room back.
                self.give_back_up((frame.len() - FRAME_HEADER) as u32);
                if owner == Owner::Gone && flags & END_STREAM != 0 {
                    self.cut_off.retain(|&id| id != stream);
                }
            }
            RST_STREAM | WINDOW_UPDATE | PRIORITY_FRAME if owner == Owner::Gone => {
                if kind == RST_STREAM {
                    self.cut_off.retain(|&id| id != stream);
                }
            }
            WINDOW_UPDATE if stream != 0 && owner != Owner::Relayed => {
                // containerd's room for request data pullgate sends (or has not sent yet).
                let inc = u31(&frame[FRAME_HEADER..]).filter(|_| frame.len() == FRAME_HEADER + 4);
                let inc =
                    inc.ok_or_else(|| Fatal::frame_size("a WINDOW_UPDATE not 4 bytes long"))?;
                if let Some(Stream::Forwarded(Forwarded { fed: Some(fed), .. })) =
                    self.streams.get_mut(&stream)
                {
                    if fed.window + i64::from(inc) > super::flow::MAX_WINDOW {
                        return Err(FlowError::WindowOverflow.into());
                    }
                    fed.window += i64::from(inc);
                    self.feed(stream);
                }
            }
            RST_STREAM if owner == Owner::Answered => {
                if let Some(Stream::Answered(a)) = self.streams.get_mut(&stream) {
                    a.up = UpSide::Done;
                }
            }
            PRIORITY_FRAME if owner == Owner::Answered => {}
            DATA => {
                let len = (frame.len() - FRAME_HEADER) as u32;
                if flags & END_STREAM != 0 {
                    if let Some(Stream::Forwarded(f)) = self.streams.get_mut(&stream) {
                        f.server_done = true;
                    }
                    self.resp_flow.relayed(frame, len, &mut self.resp_ready)?;
                    self.maybe_close(stream);
                } else {
                    self.resp_flow.relayed(frame, len, &mut self.resp_ready)?;
                }
            }
            HEADERS | CONTINUATION => {
                if let Some(block) =
                    self.responses
                        .frame(kind, flags, stream, &frame[FRAME_HEADER..])?
                {
                    self.response_block(block)?;
                }
            }
            SETTINGS if flags & ACK != 0 => {
                // kubelet's SETTINGS are acknowledged to kubelet; pullgate's replay is not.
                if self.settings_to_up.pop_front() == Some(true) {
                    self.send_kube_now(frame);
                }
            }
            WINDOW_UPDATE if stream == 0 => {
                let inc = u31(&frame[FRAME_HEADER..]).ok_or_else(|| {
                    Fatal::protocol(Refusal::ConnectionError, "a short WINDOW_UPDATE")
                })?;
                let pass = self.req_flow.receiver_update(inc, &mut self.req_ready)?;
                put_window_update(self.kube_ctl(), 0, pass);
            }
            SETTINGS => {
                let mut f = self.up_settings(&frame)?;
                let mut raised_window = None;
                if self.up_settings_generation != self.generation {
                    // A new containerd's first SETTINGS name only what differs from HTTP/2's
                    // defaults, and kubelet still holds what the old one said: the defaults are
                    // said as well.
                    self.up_settings_generation = self.generation;
                    with_defaults(&mut f, self.limits.max_streams);
                }
                for (id, value) in settings_entries(&f[FRAME_HEADER..]) {
                    if id == SETTINGS_INITIAL_WINDOW_SIZE && value > self.up_send_initial {
                        // A larger window binds pullgate's own sending once kubelet's ACK has
                        // gone to containerd.
                        raised_window = Some(value);
                    } else if id == SETTINGS_INITIAL_WINDOW_SIZE {
                        // A smaller one binds at once; a raise still waiting for its ACK must
                        // not undo it.
                        let generation = self.generation;
                        for up in self.settings_to_kube.iter_mut().flatten() {
                            if up.generation == generation {
                                up.raised_window = up.raised_window.map(|w| w.min(value));
                            }
                        }
                        self.up_send_initial_is(value)?;
                    }
                    match id {
                        SETTINGS_MAX_FRAME_SIZE => {
                            let v = (value as usize).clamp(MIN_MAX_FRAME_SIZE, MAX_FRAME);
                            self.kube_max_frame_in = self.kube_max_frame_in.max(v);
                        }
                        SETTINGS_INITIAL_WINDOW_SIZE if value > self.up_initial_window => {
                            // Windows pullgate grants only grow: kubelet may still send by the
                            // larger one until it has seen a smaller one (RFC 9113 §6.9.2).
                            let delta = i64::from(value) - i64::from(self.up_initial_window);
                            self.up_initial_window = value;
                            for s in self.streams.values_mut() {
                                if let Stream::Answered(a) = s {
                                    a.recv_window += delta;
                                }
                            }
                        }
                        _ => {}
                    }
                }
                self.settings_to_kube.push_back(Some(UpSettings {
                    generation: self.generation,
                    raised_window,
                }));
                self.resp_ready.push(Outgoing {
                    frame: Bytes::from(f),
                    len: 0,
                    own: false,
                });
            }
            PING if frame.len() != FRAME_HEADER + 8 => {
                return Err(Fatal::frame_size("a PING frame without 8 bytes"));
            }
            PING if flags & ACK != 0 => {
                let opaque: [u8; 8] = frame[FRAME_HEADER..].try_into().expect("8 bytes");
                if let Some(i) = self.pings_to_up.iter().position(|o| *o == opaque) {
                    self.pings_to_up.remove(i);
                    self.send_kube_now(frame);
                }
            }
            PING => {
                if self.pings_to_kube.len() >= MAX_PINGS_IN_FLIGHT {
                    self.pings_to_kube.pop_front();
                }
                self.pings_to_kube
                    .push_back(frame[FRAME_HEADER..].try_into().expect("8 bytes"));
                self.send_kube_now(frame);
            }
            GOAWAY => {
                // containerd takes no new streams on this connection. Streams it did not take end
                // UNAVAILABLE (they were not processed; the client may retry); the others finish,
                // then the connection is dropped and the next call opens a new one.
                let last = frame.get(FRAME_HEADER..FRAME_HEADER + 4).map_or(0, |b| {
                    u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff
                });
                let unprocessed =
                    self.stream_ids(|id, s| id > last && matches!(s, Stream::Forwarded(_)));
                for id in unprocessed {
                    self.end_forwarded(id, "containerd is going away and did not take the call");
                }
                for (_, s) in self.streams.iter_mut().filter(|(id, _)| **id > last) {
                    if let Stream::Answered(a) = s {
                        if matches!(a.up, UpSide::Opened(_)) {
                            a.up = UpSide::Done;
                        }
                    }
                }
                self.up_draining = true;
                self.up_error = Some(format!(
                    "the upstream runtime at {} is closing its connection (GOAWAY); retry",
                    self.proxy.upstream().name()
                ));
            }
            PUSH_PROMISE => {
                return Err(Fatal::protocol(Refusal::ConnectionError, "a PUSH_PROMISE"));
            }
            RST_STREAM => {
                if let Some(Stream::Forwarded(f)) = self.streams.remove(&stream) {
                    drop(f);
                }
                self.resp_flow.relayed(frame, 0, &mut self.resp_ready)?;
            }
            _ if stream == 0 => self.send_kube_now(frame),
            _ => self.resp_flow.relayed(frame, 0, &mut self.resp_ready)?,
        }
        Ok(())
    }

    fn response_block(&mut self, block: Block) -> Result<(), Fatal> {
        let stream = block.stream;
        match self.streams.get_mut(&stream) {
            None if self.cut_off.contains(&stream) => {
                if block.end_stream {
                    self.cut_off.retain(|&id| id != stream);
                }
                return Ok(());
            }
            Some(Stream::Answered(a)) => {
                // containerd's answer to a request it never got (its deadline passed, say).
                if block.end_stream {
                    a.up = UpSide::Done;
                }
                return Ok(());
            }
            Some(Stream::Forwarded(f)) => {
                let first = !f.answered;
                if first {
                    f.answered = true;
                    self.proxy
                        .metrics()
                        .upstream_latency(f.record.method(), f.started.elapsed());
                }
                let literals = self.responses.literals();
                if let Some(code) = field(literals, b"grpc-status") {
                    f.record.finish_code(code);
                }
                f.server_done |= block.end_stream;
                if let Some(g) = f.fed.as_mut().and_then(|fed| fed.edit.as_mut()) {
                    if first && !block.end_stream && field(literals, b":status") == Some(b"200") {
                        g.head = Some(block.frames);
                        return Ok(());
                    }
                    if g.head.is_some() {
                        let ok = field(literals, b"grpc-status") == Some(b"0");
                        match block.end_stream {
                            true => self.finish_edit(stream, Some(block.frames), ok),
                            false => {
                                self.edit_failed(stream, "its answer has a second header block")
                            }
                        }
                        return Ok(());
                    }
                    // Not an answer to edit (trailers-only, or not `200`): it passes as it came,
                    // with the room kubelet gave for it meanwhile.
                    let owed = g.kube_updates.saturating_sub(u64::from(g.extra));
                    let owed = owed.min(super::flow::MAX_WINDOW as u64) as u32;
                    if let Some(fed) = f.fed.as_mut() {
                        fed.edit = None;
                    }
                    if let Some(out) = self.up_ctl() {
                        put_window_update(out, stream, owed);
                    }
                }
            }
            None => {}
        }
        let end = block.end_stream;
        self.resp_flow
            .relayed(Bytes::from(block.frames), 0, &mut self.resp_ready)?;
        if end {
            self.maybe_close(stream);
        }
        Ok(())
    }

    /// A forwarded stream containerd will not finish: ended `UNAVAILABLE` (or reset if its
    /// response has begun... with trailers, which may follow data) and reset upstream.
    fn end_forwarded(&mut self, stream: u32, why: &str) {
        let Some(Stream::Forwarded(mut f)) = self.streams.remove(&stream) else {
            return;
        };
        let status = Status::new(
            crate::node::proxy::grpc::Code::Unavailable,
            format!(
                "pullgate: the connection to the upstream runtime at {} broke during the call: {why}",
                self.proxy.upstream().name()
            ),
        );
        f.record.finish_code(status.code.as_str().as_bytes());
        if self.up.is_some() {
            // Behind anything of the stream's still waiting for containerd's window.
            let mut rst = Vec::with_capacity(FRAME_HEADER + 4);
            put_rst(&mut rst, stream, CANCEL);
            let _ = self.send_up(Bytes::from(rst), 0);
        }
        if f.server_done {
            // containerd's answer is complete: only kubelet's sending is cut short.
            let mut rst = Vec::with_capacity(FRAME_HEADER + 4);
            put_rst(&mut rst, stream, NO_ERROR);
            self.resp_flow
                .own_data(Bytes::from(rst), 0, &mut self.resp_ready);
            return;
        }
        // An answer pullgate holds to edit has not reached kubelet yet.
        let held = f
            .fed
            .as_ref()
            .and_then(|fed| fed.edit.as_ref())
            .is_some_and(|g| g.head.is_some());
        self.end_with_status(stream, &status, !f.answered || held, !f.client_done, false);
    }

    /// containerd's connection ended: calls on it end `UNAVAILABLE`; kubelet's connection stays,
    /// and its next forwarded call opens a new one ([`Session::upstream_ready`]).
    fn upstream_gone(&mut self, why: String) {
        tracing::debug!(reason = %why, "the connection to containerd ended");
        let open = self.stream_ids(|_, s| matches!(s, Stream::Forwarded(_)));
        self.up = None;
        self.up_rx = None;
        self.up_owed = 0;
        self.cut_off.clear();
        for id in open {
            self.end_forwarded(id, &why);
        }
        self.req_flow.clear();
        self.req_ready.clear();
        self.up_draining = false;
        // What kubelet waits for from the containerd that is gone: pullgate answers it (kubelet's
        // settings are replayed to the next connection).
        for kubelets in std::mem::take(&mut self.settings_to_up) {
            if kubelets {
                put_head(self.kube_ctl(), 0, SETTINGS, ACK, 0);
            }
        }
        for opaque in std::mem::take(&mut self.pings_to_up) {
            put_head(self.kube_ctl(), 8, PING, ACK, 0);
            self.kube_ctl().extend_from_slice(&opaque);
        }
        self.pings_to_kube.clear();
        self.responses = response_blocks();
        self.up_error = Some(format!(
            "the connection to the upstream runtime at {} ended: {why}",
            self.proxy.upstream().name()
        ));
    }

    /// Whether a forwarded call can go to containerd now: over the open connection, or a new one
    /// opened in place of one that ended (replaying kubelet's SETTINGS and settling both
    /// connection windows, [`ConnFlow::new_receiver`], [`ConnFlow::new_sender`]).
    fn upstream_ready(&mut self) -> bool {
        if self.up_draining {
            return false;
        }
        if self.up.is_some() {
            return true;
        }
        let path = self.proxy.upstream().path();
        let stream = connect_now(path).and_then(split);
        let (rx, mut tx) = match stream {
            Ok(s) => s,
            Err(source) => {
                let e = UpstreamError::Connect {
                    path: path.to_path_buf(),
                    source,
                };
                self.up_error = Some(e.to_string());
                return false;
            }
        };
        tx.out.extend_from_slice(crate::node::proxy::conn::PREFACE);
        let replay: Vec<(u16, u32)> = (0u16..)
            .zip(self.kube_settings_sent)
            .filter_map(|(id, v)| Some((id, v?)))
            .collect();
        put_settings(&mut tx.out, &replay);
        self.settings_to_up.push_back(false);
        self.generation += 1;
        self.up_send_initial = 65_535;
        let to_kube = self.req_flow.new_receiver(super::flow::INITIAL_WINDOW);
        put_window_update(self.kube_ctl(), 0, to_kube);
        let to_up = self.resp_flow.new_sender(super::flow::INITIAL_WINDOW);
        put_window_update(&mut tx.out, 0, to_up);
        tracing::debug!("opened a new connection to containerd for a client connection");
        self.up = Some(tx);
        self.up_rx = Some(rx);
        self.up_error = None;
        true
    }

    /// Drops containerd's connection once it has said GOAWAY and its last stream is done.
    fn drop_drained_upstream(&mut self) {
        if self.up_draining
            && !self
                .streams
                .values()
                .any(|s| matches!(s, Stream::Forwarded(_)))
        {
            self.upstream_gone("containerd closed the connection (GOAWAY)".into());
        }
    }

    /// What a local task reported for its stream.
    fn event(&mut self, ev: Event) -> Result<(), Fatal> {
        match ev {
            Event::Consumed { stream, n } => {
                // The stream's room back, while kubelet may still send on it.
                let Some(Stream::Answered(a)) = self.streams.get_mut(&stream) else {
                    return Ok(());
                };
                if !a.client_done {
                    a.recv_window += i64::from(n);
                    put_window_update(self.kube_ctl(), stream, n);
                }
            }
            Event::Failed { stream } => {
                // The call's task ended without a complete answer (it panicked).
                if let Some(Stream::Answered(a)) = self.streams.remove(&stream) {
                    self.reset_answered(stream, INTERNAL_ERROR);
                    self.answered_gone(stream, a);
                }
            }
            Event::Decided { stream, decided } => self.decided(stream, decided)?,
        }
        Ok(())
    }

    /// Starts the waiting intercepted calls that are due (see [`Session::waiting`]); those decided
    /// at once are answered or forwarded right away.
    fn start_calls(&mut self) -> Result<(), Fatal> {
        self.start_waiting(|_, a, since, now| {
            a.local.request_complete()
                || a.local.buffered() >= START_BYTES
                || now >= since + START_WAIT
        })
    }

    /// Starts the waiting calls below `stream` whose request is complete, before `stream` goes
    /// to containerd: decided now, they need not be opened there without their request.
    fn start_complete_below(&mut self, stream: u32) -> Result<(), Fatal> {
        self.start_waiting(|id, a, _, _| id < stream && a.local.request_complete())
    }

    /// Starts the waiting calls `due_now` picks (given the stream, its call, since when it
    /// waits, and now).
    fn start_waiting(
        &mut self,
        due_now: impl Fn(u32, &Answered, Instant, Instant) -> bool,
    ) -> Result<(), Fatal> {
        if self.waiting.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        let mut due = Vec::new();
        self.waiting.retain(|&(stream, since)| {
            let Some(Stream::Answered(a)) = self.streams.get(&stream) else {
                return false;
            };
            let start = due_now(stream, a, since, now);
            if start {
                due.push(stream);
            }
            !start && a.local.waiting()
        });
        for stream in due {
            let Some(Stream::Answered(a)) = self.streams.get_mut(&stream) else {
                continue;
            };
            if let Some(decided) = a.local.start(stream, &self.events_tx) {
                self.decided(stream, decided)?;
            }
        }
        Ok(())
    }

    /// What becomes of an intercepted call.
    fn decided(&mut self, stream: u32, decided: Decided) -> Result<(), Fatal> {
        match decided {
            Decided::Respond {
                status,
                accept_identity,
            } => {
                self.answer_call(stream, &status, accept_identity);
                Ok(())
            }
            Decided::Forward(fwd) => self.forward_decided(stream, fwd),
        }
    }

    /// Ends an intercepted call with pullgate's own trailers-only answer.
    fn answer_call(&mut self, stream: u32, status: &Status, identity: bool) {
        if let Some(Stream::Answered(a)) = self.streams.remove(&stream) {
            self.end_with_status(stream, status, true, !a.client_done, identity);
            self.answered_gone(stream, a);
        }
    }

    /// Sends what a local stream's answer has ready, as far as kubelet's windows allow.
    fn pump(&mut self, stream: u32) {
        let Some(Stream::Answered(a)) = self.streams.get_mut(&stream) else {
            return;
        };
        let max_frame = self.kube_settings.max_frame;
        let done = a
            .local
            .drain(stream, &mut a.window, max_frame, |frame, len| {
                self.resp_flow.own_data(frame, len, &mut self.resp_ready);
            });
        if done {
            let client_done = a.client_done;
            if !client_done {
                let mut f = Vec::new();
                put_rst(&mut f, stream, NO_ERROR);
                self.resp_flow
                    .own_data(Bytes::from(f), 0, &mut self.resp_ready);
            }
            if let Some(Stream::Answered(a)) = self.streams.remove(&stream) {
                self.answered_gone(stream, a);
            }
        }
    }

    /// Resets a stream pullgate answers, behind whatever of its answer already waits.
    fn reset_answered(&mut self, stream: u32, code: u32) {
        let mut rst = Vec::with_capacity(FRAME_HEADER + 4);
        put_rst(&mut rst, stream, code);
        self.resp_flow
            .own_data(Bytes::from(rst), 0, &mut self.resp_ready);
    }

    /// containerd's frame for kubelet that belongs to no stream (SETTINGS and PING
    /// acknowledgements, PINGs, connection WINDOW_UPDATEs): it need not wait behind streams' data.
    fn send_kube_now(&mut self, frame: Bytes) {
        self.resp_ready.push(Outgoing {
            frame,
            len: 0,
            own: false,
        });
    }

    /// A call pullgate answered is over: its task stops, and containerd, if the stream was
    /// opened there, hears that it is cancelled.
    fn answered_gone(&mut self, stream: u32, a: Answered) {
        a.local.abort();
        match a.up {
            UpSide::Pending(_) => self.pending_open.retain(|&id| id != stream),
            UpSide::Opened(generation) if generation == self.generation => {
                let mut rst = Vec::with_capacity(FRAME_HEADER + 4);
                put_rst(&mut rst, stream, CANCEL);
                let _ = self.send_up(Bytes::from(rst), 0);
            }
            _ => {}
        }
    }

    /// Gives containerd back `n` bytes of its connection window that it spent on DATA pullgate
    /// took itself: later, with kubelet's next WINDOW_UPDATE, unless [`OWED_FLUSH`] is reached.
    fn give_back_up(&mut self, n: u32) {
        self.up_owed = self.up_owed.saturating_add(n);
        if self.up_owed >= OWED_FLUSH {
            let owed = std::mem::take(&mut self.up_owed);
            if let Some(out) = self.up_ctl() {
                put_window_update(out, 0, owed);
            }
        }
    }

    /// Gives kubelet back `n` bytes of its connection window that pullgate took: with the next
    /// frames written to kubelet, unless [`KUBE_OWED_FLUSH`] is reached.
    fn give_back_kube(&mut self, n: u32) {
        self.kube_owed = self.kube_owed.saturating_add(n);
        if self.kube_owed >= KUBE_OWED_FLUSH {
            let owed = std::mem::take(&mut self.kube_owed);
            put_window_update(self.kube_ctl(), 0, owed);
        }
    }

    /// Opens on containerd's connection, in order, every intercepted stream below `stream` that is
    /// still being decided, so that stream IDs rise there as they must (RFC 9113 §5.1.1).
    fn open_pending_below(&mut self, stream: u32) -> Result<(), Fatal> {
        let n = self.pending_open.partition_point(|&id| id < stream);
        for i in 0..n {
            let id = self.pending_open[i];
            let Some(Stream::Answered(a)) = self.streams.get_mut(&id) else {
                continue;
            };
            let opened = UpSide::Opened(self.generation);
            if let UpSide::Pending(opening) = std::mem::replace(&mut a.up, opened) {
                self.send_up(opening.block(None), 0)?;
            }
        }
        self.pending_open.drain(..n);
        Ok(())
    }

    /// An intercepted call pullgate forwards: its stream opened on containerd's connection (if it
    /// is not yet), its request sent as pullgate's own data, its answer relayed or gathered for
    /// the edit. While containerd cannot be reached the call ends `UNAVAILABLE`.
    fn forward_decided(&mut self, stream: u32, mut fwd: Forward) -> Result<(), Fatal> {
        // Done at the end of this turn, once the request is handed to containerd's socket.
        self.afterwards.append(std::mem::take(&mut fwd.afterwards));
        let Some(Stream::Answered(a)) = self.streams.get(&stream) else {
            return Ok(());
        };
        let (pending, gone) = match a.up {
            UpSide::Pending(_) => (true, None),
            UpSide::Opened(generation) if generation == self.generation && self.up.is_some() => {
                (false, None)
            }
            UpSide::Opened(_) => (false, Some("the connection to it ended during the call")),
            UpSide::Done => (
                false,
                Some("it ended the call before pullgate forwarded it"),
            ),
        };
        let why = match gone {
            Some(why) => Some(why.to_owned()),
            None if pending && !self.upstream_ready() => {
                Some(self.up_error.clone().unwrap_or_default())
            }
            None => None,
        };
        let Forward {
            body,
            reservation,
            edit,
            mut record,
            ..
        } = fwd;
        if let Some(why) = why {
            let status = Status::new(
                Code::Unavailable,
                format!(
                    "pullgate: cannot forward the call to the upstream runtime at {}: {why}",
                    self.proxy.upstream().name()
                ),
            );
            record.finish_code(status.code.as_str().as_bytes());
            self.answer_call(stream, &status, false);
            return Ok(());
        }
        self.open_pending_below(stream)?;
        let Some(Stream::Answered(a)) = self.streams.remove(&stream) else {
            return Ok(());
        };
        let Answered {
            _guard,
            local,
            window,
            up,
            ..
        } = a;
        local.abort();
        if let UpSide::Pending(opening) = up {
            self.pending_open.retain(|&id| id != stream);
            self.send_up(opening.block(Some(body.len())), 0)?;
        }
        // containerd's window for the answer: kubelet's initial window, which containerd knows,
        // plus what kubelet gave on the stream while the call was decided (not yet passed on);
        // an answer pullgate gathers gets at least GATHER_WINDOW, pullgate reads it regardless.
        let kube_initial = self.kube_settings.initial_window;
        let given = (window.available() - i64::from(kube_initial)).max(0) as u64;
        let (edit, grant) = match edit {
            Some(edit) => {
                let extra = GATHER_WINDOW.saturating_sub(kube_initial);
                let gather = Gather {
                    edit,
                    head: None,
                    data: BytesMut::new(),
                    kube_window: window,
                    kube_updates: given,
                    extra,
                    unreturned: 0,
                };
                (Some(gather), extra)
            }
            None => (None, given.min(super::flow::MAX_WINDOW as u64) as u32),
        };
        if grant > 0 {
            let mut f = Vec::with_capacity(FRAME_HEADER + 4);
            put_window_update(&mut f, stream, grant);
            self.send_up(Bytes::from(f), 0)?;
        }
        self.streams.insert(
            stream,
            Stream::Forwarded(Forwarded {
                _guard,
                record,
                started: Instant::now(),
                client_done: true,
                server_done: false,
                answered: false,
                fed: Some(Box::new(Fed {
                    data: body,
                    sent: false,
                    window: i64::from(self.up_send_initial),
                    reservation,
                    edit,
                })),
            }),
        );
        self.feed(stream);
        Ok(())
    }

    /// Sends the request data pullgate has for `stream` as far as containerd's stream window
    /// allows (the connection's window is [`ConnFlow`]'s), in frames of the size every peer takes.
    fn feed(&mut self, stream: u32) {
        let Some(Stream::Forwarded(Forwarded { fed: Some(fed), .. })) =
            self.streams.get_mut(&stream)
        else {
            return;
        };
        while !fed.sent {
            let n = fed
                .data
                .len()
                .min(MIN_MAX_FRAME_SIZE)
                .min(fed.window.max(0) as usize);
            if n == 0 && !fed.data.is_empty() {
                return;
            }
            let chunk = fed.data.split_to(n);
            fed.window -= n as i64;
            fed.sent = fed.data.is_empty();
            let mut frame = Vec::with_capacity(FRAME_HEADER + n);
            put_data(&mut frame, stream, fed.sent, &chunk);
            self.req_flow
                .own_data(Bytes::from(frame), n as u32, &mut self.req_ready);
        }
        // Every byte is the connection's now.
        fed.reservation = None;
    }

    /// containerd's initial stream window, as it enforces it, is now `window`: the streams whose
    /// request pullgate sends move by the difference (RFC 9113 §6.9.2).
    fn up_send_initial_is(&mut self, window: u32) -> Result<(), Fatal> {
        let delta = i64::from(window) - i64::from(self.up_send_initial);
        self.up_send_initial = window;
        if delta == 0 {
            return Ok(());
        }
        let fed =
            self.stream_ids(|_, s| matches!(s, Stream::Forwarded(Forwarded { fed: Some(_), .. })));
        for id in fed {
            if let Some(Stream::Forwarded(Forwarded { fed: Some(f), .. })) =
                self.streams.get_mut(&id)
            {
                if f.window + delta > super::flow::MAX_WINDOW {
                    return Err(FlowError::WindowOverflow.into());
                }
                f.window += delta;
            }
            self.feed(id);
        }
        Ok(())
    }

    /// A DATA frame of containerd's answer that pullgate edits: gathered, and containerd given
    /// its room back; the answer is sent on once complete.
    fn gather_data(&mut self, stream: u32, frame: Bytes, flags: u8) -> Result<(), Fatal> {
        let Some((payload, total)) = data_payload(&frame, flags) else {
            return Err(Fatal::protocol(
                Refusal::ConnectionError,
                format!("a DATA frame on stream {stream} with more padding than payload"),
            ));
        };
        let end = flags & END_STREAM != 0;
        let Some(Stream::Forwarded(Forwarded {
            fed: Some(fed),
            server_done,
            ..
        })) = self.streams.get_mut(&stream)
        else {
            return Ok(());
        };
        *server_done |= end;
        let Some(g) = fed.edit.as_mut() else {
            return Ok(());
        };
        g.data.extend_from_slice(&payload);
        let over = g.data.len() > MAX_MESSAGE_SIZE + FRAME_HEADER_LEN;
        // The stream's room goes back once half of kubelet's initial window is used: most
        // answers end well before.
        g.unreturned += total;
        let window = self.kube_settings.initial_window.saturating_add(g.extra);
        let stream_back = match !end && !over && g.unreturned >= window / 2 {
            true => std::mem::take(&mut g.unreturned),
            false => 0,
        };
        self.give_back_up(total);
        if let Some(out) = self.up_ctl() {
            put_window_update(out, stream, stream_back);
        }
        if over {
            self.edit_failed(stream, "its answer is over the 16 MiB message limit");
        } else if end {
            self.finish_edit(stream, None, false);
        }
        Ok(())
    }

    /// containerd's complete answer to a call pullgate edits: the message edited (if the call
    /// succeeded) and the answer sent as pullgate's own, within kubelet's windows.
    fn finish_edit(&mut self, stream: u32, trailers: Option<Vec<u8>>, ok: bool) {
        let Some(Stream::Forwarded(f)) = self.streams.remove(&stream) else {
            return;
        };
        let Forwarded { _guard, fed, .. } = f;
        let Some(Gather {
            edit,
            head,
            data,
            kube_window,
            ..
        }) = fed.and_then(|fed| fed.edit)
        else {
            return;
        };
        let data = data.freeze();
        let edited = match grpc::single_message(&data) {
            // The edit runs on the connection's task: a panic in it ends this call, not the
            // connection (and not unedited: the answer is refused).
            Ok(msg) if ok => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| edit(&msg)))
                .map(|new| new.map(|new| grpc::frame(&new))),
            _ => Ok(None),
        };
        let data = match edited {
            Ok(new) => new.unwrap_or(data),
            Err(_) => {
                let status = Status::new(
                    Code::Internal,
                    "pullgate: editing the upstream runtime's answer failed; see pullgate's log",
                );
                tracing::error!("editing an answer panicked");
                self.end_with_status(stream, &status, true, false, false);
                return;
            }
        };
        let mut parts = vec![Out::Head(Bytes::from(head.unwrap_or_default()))];
        if !data.is_empty() {
            parts.push(Out::Data(data));
        }
        parts.push(trailers.map_or(Out::End, |t| Out::Last(Bytes::from(t))));
        self.streams.insert(
            stream,
            Stream::Answered(Answered {
                _guard,
                local: Local::answer(parts),
                window: kube_window,
                client_done: true,
                recv_window: 0,
                up: UpSide::Done,
            }),
        );
        self.pump(stream);
    }

    /// An answer pullgate was to edit that it cannot: the call ends `UNAVAILABLE` and containerd
    /// hears it is cancelled.
    fn edit_failed(&mut self, stream: u32, why: &str) {
        let Some(Stream::Forwarded(mut f)) = self.streams.remove(&stream) else {
            return;
        };
        let status = Status::new(
            Code::Unavailable,
            format!(
                "pullgate: the upstream runtime at {} answered the call in a way pullgate cannot read: {why}",
                self.proxy.upstream().name()
            ),
        );
        f.record.finish_code(status.code.as_str().as_bytes());
        if !f.server_done {
            let mut rst = Vec::with_capacity(FRAME_HEADER + 4);
            put_rst(&mut rst, stream, CANCEL);
            let _ = self.send_up(Bytes::from(rst), 0);
            if self.cut_off.len() >= MAX_CUT_OFF {
                self.cut_off.pop_front();
            }
            self.cut_off.push_back(stream);
        }
        self.end_with_status(stream, &status, true, false, false);
    }

    /// Removes a forwarded stream both sides have finished.
    fn maybe_close(&mut self, stream: u32) {
        let done = match self.streams.get(&stream) {
            Some(Stream::Forwarded(f)) => f.client_done && f.server_done,
            _ => false,
        };
        if done {
            self.streams.remove(&stream);
        }
    }

    /// Hands the requests decided this turn to containerd's socket (one write, if it takes them)
    /// unless the connection is failing (`send`), then does what their handlers left for
    /// afterwards while containerd works on them. Their answers cannot have been read yet: this
    /// task reads them.
    fn run_afterwards(&mut self, send: bool) {
        if send {
            self.flush_up();
            if let Some(up) = self.up.as_mut().filter(|u| u.pending() > 0) {
                // What the socket does not take now, the loop writes as usual; an error it sees
                // again.
                let _ = up.try_write();
            }
        }
        std::mem::take(&mut self.afterwards).run();
    }

    /// Moves frames released by flow control to their side's output.
    fn flush_ready(&mut self) {
        self.flush_kube();
        if self.kube_owed > 0 && self.kube.pending() > 0 {
            let owed = std::mem::take(&mut self.kube_owed);
            put_window_update(&mut self.kube.out, 0, owed);
        }
        self.flush_up();
    }

    /// kubelet's output, for a frame of pullgate's own: after every frame released before it.
    fn kube_ctl(&mut self) -> &mut Vec<u8> {
        self.flush_kube();
        &mut self.kube.out
    }

    /// containerd's output (if connected), for a frame of pullgate's own: after every frame
    /// released before it.
    fn up_ctl(&mut self) -> Option<&mut Vec<u8>> {
        self.flush_up();
        self.up.as_mut().map(|u| &mut u.out)
    }

    fn flush_kube(&mut self) {
        for out in self.resp_ready.drain(..) {
            self.kube.out.extend_from_slice(&out.frame);
        }
    }

    /// An empty DATA frame that only ends a stream, right behind that stream's DATA frame in the
    /// same batch, becomes the END_STREAM flag of that frame: containerd gets a request in one
    /// frame.
    fn flush_up(&mut self) {
        let Some(up) = &mut self.up else {
            self.req_ready.clear();
            return;
        };
        let mut last_data: Option<(u32, usize)> = None;
        for out in self.req_ready.drain(..) {
            let (kind, flags, stream) = head(&out.frame);
            if kind == DATA {
                if out.len == 0 && flags == END_STREAM {
                    if let Some((_, at)) = last_data.filter(|(s, _)| *s == stream) {
                        up.out[at + 4] |= END_STREAM;
                        last_data = None;
                        continue;
                    }
                }
                last_data = (flags & END_STREAM == 0).then_some((stream, up.out.len()));
            } else {
                last_data = None;
            }
            up.out.extend_from_slice(&out.frame);
        }
    }

    /// Starts closing gracefully (see [`Closing`]).
    fn start_closing(&mut self) {
        if self.closing.is_some() {
            return;
        }
        self.closing = Some(Closing {
            since: Instant::now(),
            last: None,
            last_at: None,
        });
        put_goaway(self.kube_ctl(), MAX_STREAM_ID, NO_ERROR, b"");
        put_head(self.kube_ctl(), 8, PING, 0, 0);
        self.kube_ctl().extend_from_slice(&CLOSING_OPAQUE);
    }

    /// The client has seen the first GOAWAY (or had its time): the last stream is final.
    fn final_goaway(&mut self) {
        let last = self.last_stream;
        if let Some(c @ Closing { last: None, .. }) = &mut self.closing {
            c.last = Some(last);
            c.last_at = Some(Instant::now());
            put_goaway(self.kube_ctl(), last, NO_ERROR, b"");
        }
    }

    /// Whether the connection is done: closed to new streams with no call open.
    fn finished(&self) -> bool {
        matches!(self.closing, Some(Closing { last: Some(_), .. }))
            && self.streams.is_empty()
            && self.resp_flow.queued_bytes() == 0
            && self.resp_ready.is_empty()
    }

    /// The next moment a timer has something to check.
    fn next_wake(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut at = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        if let Some(since) = self.waiting.iter().map(|(_, since)| *since).min() {
            at(since + START_WAIT);
        }
        if let Some(interval) = self.limits.keepalive_interval {
            match self.ping_sent {
                Some(sent) => at(sent + self.limits.keepalive_timeout),
                None => at(self.last_read + interval),
            }
        }
        if self.closing.is_none() && self.streams.is_empty() {
            if let Some(d) = self.tracked.idle_deadline() {
                at(d);
            }
        }
        match self.closing {
            Some(Closing {
                since, last: None, ..
            }) => at(since + CLOSE_GRACE),
            Some(Closing {
                last_at: Some(t), ..
            }) if self.streams.is_empty() => at(t + CLOSE_GRACE),
            _ => {}
        }
        next
    }

    /// A timer fired: keepalive, idle closing. Returns whether the connection is to be dropped.
    fn timer(&mut self) -> bool {
        let now = Instant::now();
        if let Some(interval) = self.limits.keepalive_interval {
            match self.ping_sent {
                Some(sent) if now >= sent + self.limits.keepalive_timeout => {
                    tracing::debug!(
                        "closing a client connection that stopped answering keepalive pings"
                    );
                    return true;
                }
                None if now >= self.last_read + interval => {
                    self.ping_sent = Some(now);
                    put_head(self.kube_ctl(), 8, PING, 0, 0);
                    self.kube_ctl().extend_from_slice(&KEEPALIVE_OPAQUE);
                }
                _ => {}
            }
        }
        match self.closing {
            Some(Closing {
                since, last: None, ..
            }) if now >= since + CLOSE_GRACE => self.final_goaway(),
            Some(Closing {
                last_at: Some(t), ..
            }) if self.streams.is_empty() && now >= t + CLOSE_GRACE => {
                // Every call is over, but answers still wait for a client that does not take them.
                tracing::debug!(
                    "dropping a closing client connection that does not read its answers"
                );
                return true;
            }
            _ => {}
        }
        if self.closing.is_none()
            && self.streams.is_empty()
            && self.tracked.idle_deadline().is_some_and(|d| d <= now)
            && self.tracked.close_idle()
        {
            tracing::debug!(idle_timeout = ?self.tracked.idle_timeout(), "closing an idle client connection");
            self.start_closing();
        }
        false
    }

    /// Ends the connection for a protocol error of kubelet's: GOAWAY with the code and why.
    async fn fail(&mut self, fatal: Fatal) {
        match fatal.reason {
            Some(reason) => self.proxy.refusals().refuse(
                reason,
                format_args!("closed a client connection with GOAWAY: {}", fatal.what),
            ),
            None => tracing::debug!(error = %fatal.what, "closing a client connection"),
        }
        self.flush_ready();
        let mut out = Vec::new();
        put_goaway(
            &mut out,
            self.last_stream,
            fatal.code,
            format!("pullgate: {}", fatal.what).as_bytes(),
        );
        self.kube.out.extend_from_slice(&out);
        self.close_gracefully().await;
    }

    /// Writes what is left for kubelet, closes the write side, and waits (bounded) for kubelet to
    /// close, so closing never discards input it has not read.
    async fn close_gracefully(&mut self) {
        let write = async {
            let _ = self.kube.write_all().await;
            let _ = self.kube.shutdown();
            let mut budget: usize = 1 << 20;
            loop {
                self.kube_rx.input.clear();
                self.kube_rx.input.reserve(4096);
                match self.kube_rx.read().await {
                    Ok(n @ 1..) if n < budget => budget -= n,
                    _ => break,
                }
            }
        };
        let _ = tokio::time::timeout(CLOSE_GRACE, write).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerds_settings_reach_kubelet_within_pullgates_limits() {
        let mut payload = Vec::new();
        for (id, value) in [
            (SETTINGS_HEADER_TABLE_SIZE, 65_536),
            (SETTINGS_MAX_CONCURRENT_STREAMS, 1000),
            (SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20),
            (SETTINGS_MAX_HEADER_LIST_SIZE, 16 << 20),
            (SETTINGS_MAX_FRAME_SIZE, 1 << 20),
        ] {
            payload.extend_from_slice(&u16::to_be_bytes(id));
            payload.extend_from_slice(&u32::to_be_bytes(value));
        }
        let f = capped_settings(&payload, 256).unwrap();
        assert_eq!(head(&f), (SETTINGS, 0, 0));
        let got = settings_entries(&f[FRAME_HEADER..]);
        assert_eq!(
            got,
            [
                (SETTINGS_HEADER_TABLE_SIZE, 4096),
                (SETTINGS_MAX_CONCURRENT_STREAMS, 256),
                (SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20),
                (SETTINGS_MAX_HEADER_LIST_SIZE, 64 * 1024),
                (SETTINGS_MAX_FRAME_SIZE, 1 << 20),
            ]
        );
        // Smaller values pass as they are; a payload that is not whole entries is refused.
        let small = [0, 3, 0, 0, 0, 10];
        assert_eq!(
            &capped_settings(&small, 256).unwrap()[FRAME_HEADER..],
            &small
        );
        assert_eq!(capped_settings(&[0, 3, 0], 256), None);
    }

    #[test]
    fn a_new_containerds_settings_restore_what_it_leaves_at_the_defaults() {
        // A fresh containerd names only its frame size; kubelet may still hold a larger initial
        // window from the containerd before it.
        let mut f = Vec::new();
        put_settings(&mut f, &[(SETTINGS_MAX_FRAME_SIZE, 1 << 20)]);
        with_defaults(&mut f, 256);
        let got = settings_entries(&f[FRAME_HEADER..]);
        assert_eq!(
            got,
            [
                (SETTINGS_MAX_FRAME_SIZE, 1 << 20),
                (SETTINGS_INITIAL_WINDOW_SIZE, 65_535),
                (SETTINGS_MAX_CONCURRENT_STREAMS, 256),
                (SETTINGS_MAX_HEADER_LIST_SIZE, 64 * 1024),
            ]
        );
        assert_eq!(head(&f), (SETTINGS, 0, 0));
    }
}
