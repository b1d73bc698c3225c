//! An HTTP/2 fix-up layer between a client's socket and hyper's HTTP/2 server, so that every gRPC
//! client gets through whatever `:authority` it sends, and so that the server's refusals are seen.
//!
//! Why it exists: the `h2` server under hyper parses `:authority` as an `http::uri::Authority` and
//! resets the stream (PROTOCOL_ERROR) when that fails, with no option to relax it. Over a unix
//! socket, gRPC clients send values it refuses: grpc-go dialled with a bare path (kubelet and crictl
//! before Kubernetes 1.30) and grpc-java send the socket path, grpc C-core since 1.57 a %-encoded
//! path. containerd accepts them all, so pullgate must too.
//!
//! How (client → server):
//! - The preface and every frame other than HEADERS/CONTINUATION pass through untouched; bytes are
//!   read straight into hyper's buffer and only scanned for frame boundaries.
//! - Each header block (HEADERS + CONTINUATION until END_HEADERS, bounded by the server's header
//!   list limit) is decoded with a decoder that tracks the client's HPACK table ([`hpack`]).
//! - While no `:authority` needs fixing, the block's original bytes go on unchanged: the server
//!   decodes them itself and its table stays in step with the client's.
//! - At the first `:authority` the server would refuse, it is replaced by `localhost` and the
//!   connection switches to re-encoding for good: that block starts with a dynamic table size
//!   update to 0 (emptying the server's table), and every block from then on is re-encoded as
//!   literals without indexing, in frames of at most 16 KiB, keeping END_STREAM and priority.
//! - A client that breaks the framing rules of header blocks, or sends one the layer cannot decode
//!   once re-encoding, is refused: the server is handed a frame that makes it close the connection
//!   with GOAWAY(PROTOCOL_ERROR), and the layer ends the input.
//!
//! Server → client: bytes pass unchanged; frame boundaries are followed ([`watch`]) to count and log
//! every stream the server resets with an error code, named from what the layer decoded for that
//! stream. Connection errors are reported when hyper's connection ends ([`Report::connection_ended`]).

// Public for the proxy benchmark's frame relay, which decodes and re-frames header blocks with them.
pub mod hpack;
pub mod reader;
mod watch;

#[cfg(test)]
mod tests;

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::refusal::{Refusal, Refusals};
pub use hpack::REPLACEMENT_AUTHORITY;
pub use reader::{Limits, Mode};
use reader::{Reader, Step};

/// The limits of pullgate's HTTP/2 server ([`super::conn::server_builder`]): it advertises no
/// SETTINGS_HEADER_TABLE_SIZE, so clients may use the default 4096 bytes, and its header list
/// limit is 64 KiB. A test compares them with the settings the server really sends.
///
/// Why 64 KiB: a CRI request's headers are a few hundred bytes (pseudo-headers, content-type, te,
/// user-agent, grpc-timeout, perhaps a trace header), and gRPC C-core servers refuse metadata
/// over 8 KiB by default (`GRPC_ARG_MAX_METADATA_SIZE`), so clients do not rely on more. The limit
/// bounds what one header block costs the layer (and the server) to hold and decode.
pub const LIMITS: Limits = Limits {
    header_table_size: 4096,
    max_header_list_size: 64 * 1024,
};

/// Buffers larger than this are released once empty, so an idle connection stays small.
const KEEP_CAPACITY: usize = 64 * 1024;

/// What the layer knows about a connection when hyper is done with it.
#[derive(Default)]
pub struct Report {
    /// The layer refused the client itself (already counted and logged).
    refused: AtomicBool,
    /// Why `h2` would refuse the last header block, if it would: names a connection error.
    last_fault: Mutex<Option<Refusal>>,
}

impl Report {
    fn set_fault(&self, fault: Option<Refusal>) {
        *self.last_fault.lock().unwrap_or_else(|e| e.into_inner()) = fault;
    }

    fn fault(&self) -> Option<Refusal> {
        *self.last_fault.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reports how hyper's connection ended: a connection error the server detected (a GOAWAY
    /// with an error code) is a refusal, counted and logged with the most likely reason; anything
    /// else (the client went away, closed, or sent GOAWAY itself) is logged at debug.
    pub fn connection_ended(&self, result: Result<(), hyper::Error>, refusals: &Refusals) {
        let Err(e) = result else { return };
        if self.refused.load(Ordering::Acquire) {
            tracing::debug!(error = %e, "client connection ended after the HTTP/2 layer refused it");
            return;
        }
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        let h2 = std::iter::from_fn(|| {
            let c = cause?;
            cause = c.source();
            Some(c)
        })
        .find_map(|c| c.downcast_ref::<h2::Error>());
        match h2 {
            Some(h) if h.is_go_away() && !h.is_remote() && !h.is_io() => {
                let code = h.reason().map_or(0, u32::from);
                if !watch::is_refusal(code) {
                    tracing::debug!(error = %e, "client connection closed by the server");
                    return;
                }
                let reason = self.fault().unwrap_or(Refusal::ConnectionError);
                refusals.refuse(
                    reason,
                    format_args!(
                        "the HTTP/2 server closed a client connection with GOAWAY({}): {e}",
                        watch::code_name(code)
                    ),
                );
            }
            _ => tracing::debug!(error = %e, "client connection ended with an error"),
        }
    }
}

/// A client connection with the fix-up layer in front of it; hyper reads and writes through it.
pub struct H2Fix<S> {
    io: S,
    reader: Reader,
    /// Input read but not handed on yet (an incomplete frame, or what follows a replaced block).
    held: BytesMut,
    /// Bytes to hand to hyper before any more input: replaced header blocks.
    out: Vec<u8>,
    out_pos: usize,
    /// The client closed its side.
    eof: bool,
    watch: watch::Watch,
    refusals: Arc<Refusals>,
    report: Arc<Report>,
    /// The fault last copied into `report`.
    reported_fault: Option<Refusal>,
}

impl<S> H2Fix<S> {
    /// Wraps an accepted connection whose HTTP/2 preface has not been consumed yet.
    pub fn new(io: S, limits: Limits, refusals: Arc<Refusals>) -> (Self, Arc<Report>) {
        let report = Arc::new(Report::default());
        let fix = H2Fix {
            io,
            reader: Reader::new(limits),
            held: BytesMut::new(),
            out: Vec::new(),
            out_pos: 0,
            eof: false,
            watch: watch::Watch::default(),
            refusals,
            report: report.clone(),
            reported_fault: None,
        };
        (fix, report)
    }

    /// How header blocks are handed on now.
    pub fn mode(&self) -> Mode {
        self.reader.mode()
    }

    /// Runs the reader on `input`, turning a violation into a counted refusal.
    fn step(&mut self, input: &[u8]) -> Step {
        let step = match self.reader.step(input, &mut self.out) {
            Ok(s) => s,
            Err(v) => {
                self.report.refused.store(true, Ordering::Release);
                self.refusals.refuse(
                    v.reason,
                    format_args!("the HTTP/2 layer closed a client connection: {}", v.what),
                );
                Step::Closed
            }
        };
        let fault = self.reader.last_block_fault();
        if fault != self.reported_fault {
            self.reported_fault = fault;
            self.report.set_fault(fault);
        }
        step
    }

    /// Hands pending replacement bytes to hyper; returns whether `buf` is full.
    fn drain_out(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        if self.out_pos < self.out.len() {
            let n = buf.remaining().min(self.out.len() - self.out_pos);
            buf.put_slice(&self.out[self.out_pos..self.out_pos + n]);
            self.out_pos += n;
            if self.out_pos == self.out.len() {
                self.out.clear();
                self.out_pos = 0;
                if self.out.capacity() > KEEP_CAPACITY {
                    self.out = Vec::new();
                }
            }
        }
        buf.remaining() == 0
    }

    /// Notes bytes the server wrote; counts the streams it reset with an error code.
    fn observe(&mut self, written: &[u8]) {
        let (reader, refusals) = (&self.reader, &self.refusals);
        self.watch.scan(written, |stream, code| {
            if !watch::is_refusal(code) {
                return;
            }
            let fault = reader.fault(stream);
            let reason = match (code, fault) {
                (7, Some(Refusal::HeaderListTooLarge)) => Refusal::HeaderListTooLarge,
                (7, _) => Refusal::StreamRefused,
                (_, Some(f)) => f,
                (_, None) => Refusal::StreamError,
            };
            refusals.refuse(
                reason,
                format_args!(
                    "the HTTP/2 server reset stream {stream} with {}",
                    watch::code_name(code)
                ),
            );
        });
    }
}

impl<S: AsyncRead + Unpin> H2Fix<S> {
    /// Reads more input into `held`; `Ok(0)` at the end of the input.
    fn poll_fill_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.held.reserve(8192);
        let spare = self.held.spare_capacity_mut();
        let mut rb = ReadBuf::uninit(spare);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        // SAFETY: `ReadBuf` guarantees its first `n` bytes were initialised by the read.
        unsafe { self.held.set_len(self.held.len() + n) };
        Poll::Ready(Ok(n))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for H2Fix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let start = buf.filled().len();
        loop {
            if this.drain_out(buf) {
                return Poll::Ready(Ok(()));
            }
            if !this.held.is_empty() {
                let held = std::mem::take(&mut this.held);
                let step = this.step(&held);
                this.held = held;
                match step {
                    Step::Pass(n) => {
                        let k = n.min(buf.remaining());
                        buf.put_slice(&this.held[..k]);
                        this.held.advance(k);
                        this.reader.passed(k);
                    }
                    Step::Took(n) => this.held.advance(n),
                    Step::Closed => this.held.clear(),
                    Step::NeedMore => {
                        if buf.filled().len() > start || this.eof {
                            return Poll::Ready(Ok(()));
                        }
                        if ready!(this.poll_fill_held(cx))? == 0 {
                            this.eof = true;
                        }
                    }
                }
                if this.held.is_empty() && this.held.capacity() > KEEP_CAPACITY {
                    this.held = BytesMut::new();
                }
                continue;
            }
            if buf.filled().len() > start || this.eof || this.reader.is_closed() {
                // Data for hyper, or the end of the input (after a refusal, once the bytes that make
                // the server close the connection are handed on).
                return Poll::Ready(Ok(()));
            }
            // The common path: read straight into hyper's buffer, then look at what came in place.
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
            let after = buf.filled().len();
            if after == before {
                this.eof = true;
                return Poll::Ready(Ok(()));
            }
            let mut pos = before;
            while pos < after {
                match this.step(&buf.filled()[pos..after]) {
                    Step::Pass(n) => {
                        this.reader.passed(n);
                        pos += n;
                    }
                    // A replaced block (now in `out`) or an incomplete frame: hold the rest.
                    Step::Took(n) => {
                        this.held.extend_from_slice(&buf.filled()[pos + n..after]);
                        break;
                    }
                    Step::NeedMore => {
                        this.held.extend_from_slice(&buf.filled()[pos..after]);
                        break;
                    }
                    Step::Closed => break,
                }
            }
            buf.set_filled(pos);
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for H2Fix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.io).poll_write(cx, data))?;
        this.observe(&data[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, bufs))?;
        let mut left = n;
        for b in bufs {
            if left == 0 {
                break;
            }
            let k = left.min(b.len());
            this.observe(&b[..k]);
            left -= k;
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
