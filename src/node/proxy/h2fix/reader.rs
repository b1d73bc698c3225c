//! The client-to-server direction as a state machine over bytes, without I/O: which bytes pass on
//! unchanged, which header blocks are replaced, and when the client is refused.

use std::collections::VecDeque;

use super::hpack::{self, Decoder, Inspection};
use crate::node::proxy::refusal::Refusal;

/// The HTTP/2 frame header length.
pub const FRAME_HEADER: usize = 9;
pub const DATA_FRAME: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const CONTINUATION: u8 = 0x9;
pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY: u8 = 0x20;
/// The frame size every HTTP/2 endpoint must accept (RFC 9113 §4.2): re-encoded blocks are split
/// into frames no larger than this, whatever the server advertises.
pub const MIN_MAX_FRAME_SIZE: usize = 16_384;
/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE_LEN: usize = 24;
/// The re-encoded copy's buffer is released after a block larger than this.
const KEEP_COPY: usize = 16 * 1024;
/// Stream faults remembered for naming the server's resets; the oldest are forgotten first.
const FAULTS_KEPT: usize = 64;

/// The limits of the HTTP/2 server behind the layer; the layer must not be stricter.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// SETTINGS_HEADER_TABLE_SIZE the server advertises (the HPACK table a client may use).
    pub header_table_size: usize,
    /// SETTINGS_MAX_HEADER_LIST_SIZE: also the bound on an encoded header block the layer buffers.
    pub max_header_list_size: usize,
}

impl Limits {
    /// CONTINUATION frames allowed in one block: what one max-size list needs in minimum-size
    /// frames, plus a quarter (the bound `h2` applies too).
    fn max_continuations(&self) -> usize {
        let frames = (self.max_header_list_size / MIN_MAX_FRAME_SIZE).max(1);
        (frames + frames / 4).max(5)
    }
}

/// What to do with the input at the current position.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// The next `n` bytes (at most what was offered) pass on unchanged; call [`Reader::passed`].
    Pass(usize),
    /// The first `n` bytes were taken; whatever replaces them was appended to the output.
    Took(usize),
    /// More input is needed before anything can be decided.
    NeedMore,
    /// The connection is over for the client: discard all further input.
    Closed,
}

/// A refusal of the client by the layer itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub reason: Refusal,
    pub what: String,
}

/// How header blocks are handed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every block as the client sent it; the server decodes with its own table, in step with the
    /// client's. Left for good at the first `:authority` the server would refuse.
    Transparent,
    /// Every block re-encoded by the layer without dynamic-table insertions (the server's table was
    /// emptied by a size update in the first one).
    Reencode,
    /// Nothing is interpreted any more (the layer failed to decode a block the server may accept):
    /// bytes pass unchanged, the server decides.
    Blind,
}

/// A header block split over HEADERS + CONTINUATION frames, being collected.
struct Partial {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    /// The frames as received (handed on unchanged if no rewrite is needed).
    raw: Vec<u8>,
    fragment: Vec<u8>,
    continuations: usize,
}

/// The client-to-server state machine.
pub struct Reader {
    limits: Limits,
    mode: Mode,
    /// Bytes still to pass unchanged (the preface, a frame that needs no look, …).
    pass_left: usize,
    partial: Option<Partial>,
    decoder: Decoder,
    /// The re-encoded copy of the block being decoded (reused).
    copy: Vec<u8>,
    /// The highest stream ID a block opened: a block on a higher one carries request headers.
    last_stream: u32,
    /// What `h2` will refuse on which stream, newest last.
    faults: VecDeque<(u32, Refusal)>,
    /// Why `h2` will refuse the most recent block, if it will.
    block_fault: Option<Refusal>,
    closed: bool,
}

impl Reader {
    pub fn new(limits: Limits) -> Self {
        Reader {
            limits,
            mode: Mode::Transparent,
            pass_left: PREFACE_LEN,
            partial: None,
            decoder: Decoder::new(limits.header_table_size),
            copy: Vec::new(),
            last_stream: 0,
            faults: VecDeque::new(),
            block_fault: None,
            closed: false,
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// What the layer saw `h2` would refuse on `stream`, if anything.
    pub fn fault(&self, stream: u32) -> Option<Refusal> {
        self.faults
            .iter()
            .rev()
            .find(|(s, _)| *s == stream)
            .map(|(_, f)| *f)
    }

    /// Why `h2` will refuse the most recent header block, if it will (for naming a connection
    /// error, which `h2` raises right after the block that causes it).
    pub fn last_block_fault(&self) -> Option<Refusal> {
        self.block_fault
    }

    /// Whether the client was refused: no more input is handed on.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Records that `n` bytes of a [`Step::Pass`] were handed on.
    pub fn passed(&mut self, n: usize) {
        debug_assert!(n <= self.pass_left);
        self.pass_left -= n;
    }

    /// Looks at `input` (which starts at the current position) and decides what happens to it;
    /// replacement bytes are appended to `out`. After an `Err` the caller hands `out` on (it ends
    /// with bytes that make the server close the connection) and then closes.
    pub fn step(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<Step, Violation> {
        if self.closed {
            return Ok(Step::Closed);
        }
        if self.pass_left > 0 {
            return Ok(match input.len().min(self.pass_left) {
                0 => Step::NeedMore,
                n => Step::Pass(n),
            });
        }
        if self.mode == Mode::Blind {
            self.pass_left = usize::MAX;
            return self.step(input, out);
        }
        let Some(head) = input.get(..FRAME_HEADER) else {
            return Ok(Step::NeedMore);
        };
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let in_block = self.partial.is_some();
        if kind != HEADERS && kind != CONTINUATION && !in_block {
            self.pass_left = FRAME_HEADER + len;
            return self.step(input, out);
        }
        let result = self.header_frame(input, len, kind, flags, stream, out);
        if result.is_err() {
            self.close(out);
        }
        result
    }

    fn header_frame(
        &mut self,
        input: &[u8],
        len: usize,
        kind: u8,
        flags: u8,
        stream: u32,
        out: &mut Vec<u8>,
    ) -> Result<Step, Violation> {
        let violation = |what: String| Violation {
            reason: Refusal::BadHeaderBlock,
            what,
        };
        match (&self.partial, kind) {
            (Some(p), CONTINUATION) if p.stream != stream => {
                return Err(violation(format!(
                    "a CONTINUATION frame on stream {stream} inside the header block of stream {}",
                    p.stream
                )));
            }
            (Some(p), CONTINUATION) if p.continuations >= self.limits.max_continuations() => {
                return Err(violation(format!(
                    "more than {} CONTINUATION frames in one header block",
                    self.limits.max_continuations()
                )));
            }
            (Some(p), _) if kind != CONTINUATION => {
                return Err(violation(format!(
                    "a frame of type {kind} inside the header block of stream {} (only CONTINUATION may follow)",
                    p.stream
                )));
            }
            (None, CONTINUATION) => {
                return Err(violation(format!(
                    "a CONTINUATION frame on stream {stream} outside any header block"
                )));
            }
            _ => {}
        }
        let buffered = self.partial.as_ref().map_or(0, |p| p.fragment.len());
        if buffered + len > self.limits.max_header_list_size {
            return Err(violation(format!(
                "a header block over {} bytes",
                self.limits.max_header_list_size
            )));
        }
        let Some(frame) = input.get(..FRAME_HEADER + len) else {
            return Ok(Step::NeedMore);
        };
        let payload = &frame[FRAME_HEADER..];
        let end_headers = flags & END_HEADERS != 0;
        if kind == CONTINUATION {
            let mut p = self.partial.take().expect("checked above");
            p.continuations += 1;
            p.fragment.extend_from_slice(payload);
            if self.mode == Mode::Transparent {
                p.raw.extend_from_slice(frame);
            }
            if end_headers {
                let pass = self.finish(p.stream, p.end_stream, p.priority, &p.fragment, out)?;
                if pass {
                    out.extend_from_slice(&p.raw);
                }
            } else {
                self.partial = Some(p);
            }
            return Ok(Step::Took(frame.len()));
        }
        // HEADERS: strip padding and priority.
        let mut body = payload;
        let mut pad = 0;
        if flags & PADDED != 0 {
            let Some((&n, rest)) = body.split_first() else {
                return Err(violation(format!(
                    "a padded HEADERS frame on stream {stream} without a pad length"
                )));
            };
            pad = n as usize;
            body = rest;
        }
        let mut priority = None;
        if flags & PRIORITY != 0 {
            let Some(p) = body.get(..5) else {
                return Err(violation(format!(
                    "a HEADERS frame on stream {stream} too short for its priority"
                )));
            };
            priority = Some(<[u8; 5]>::try_from(p).expect("5 bytes"));
            body = &body[5..];
        }
        let Some(fragment) = body.len().checked_sub(pad).map(|n| &body[..n]) else {
            return Err(violation(format!(
                "a HEADERS frame on stream {stream} with more padding than payload"
            )));
        };
        let end_stream = flags & END_STREAM != 0;
        if !end_headers {
            self.partial = Some(Partial {
                stream,
                end_stream,
                priority,
                raw: if self.mode == Mode::Transparent {
                    frame.to_vec()
                } else {
                    Vec::new()
                },
                fragment: fragment.to_vec(),
                continuations: 0,
            });
            return Ok(Step::Took(frame.len()));
        }
        if self.finish(stream, end_stream, priority, fragment, out)? {
            // The common case: one HEADERS frame handed on as it came, without a copy.
            self.pass_left = frame.len();
            return Ok(Step::Pass(frame.len()));
        }
        Ok(Step::Took(frame.len()))
    }

    /// Decodes a complete block; returns `true` if its original frames are to be handed on,
    /// `false` if its re-encoding was appended to `out`.
    fn finish(
        &mut self,
        stream: u32,
        end_stream: bool,
        priority: Option<[u8; 5]>,
        fragment: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<bool, Violation> {
        let request = stream > self.last_stream;
        if request {
            self.last_stream = stream;
        }
        // The copy starts with a slot for the table size update that the first re-encoded block
        // carries, so that block needs no second buffer.
        self.copy.clear();
        hpack::put_size_update(&mut self.copy, 0);
        let transparent = self.mode == Mode::Transparent;
        let decoded = self.decoder.decode(
            fragment,
            request,
            self.limits.max_header_list_size,
            transparent,
            &mut self.copy,
        );
        let insp: Inspection = match decoded {
            Ok(i) => i,
            Err(e) if transparent => {
                // The server decodes this block itself and will most likely close the connection;
                // if it does not, the layer no longer knows the client's table: stop interpreting.
                tracing::debug!(stream, error = %e, "cannot decode a header block; handing it on as sent");
                self.remember(stream, Refusal::BadHeaderBlock);
                self.block_fault = Some(Refusal::BadHeaderBlock);
                self.mode = Mode::Blind;
                return Ok(true);
            }
            Err(e) => {
                return Err(Violation {
                    reason: Refusal::BadHeaderBlock,
                    what: format!("an undecodable header block on stream {stream} ({e})"),
                });
            }
        };
        self.block_fault = insp.fault;
        if let Some(f) = insp.fault {
            self.remember(stream, f);
        }
        // Unchanged: nothing to fix, or a block the server refuses anyway (an `:authority` after a
        // regular field, which is also where a lazy copy stops).
        if transparent && (!insp.bad_authority || !insp.copied) {
            return Ok(true);
        }
        if insp.overflow {
            return Err(Violation {
                reason: Refusal::HeaderListTooLarge,
                what: format!(
                    "a header list over the {}-byte limit on stream {stream}",
                    self.limits.max_header_list_size
                ),
            });
        }
        if transparent {
            tracing::debug!(
                stream,
                "the client sends an :authority the HTTP/2 server refuses; replacing it, re-encoding \
                 this connection's header blocks from now on"
            );
            self.mode = Mode::Reencode;
            // Empty the server's table, which the client's indexed references no longer reach.
            put_frames(out, stream, end_stream, priority, &self.copy);
        } else {
            put_frames(out, stream, end_stream, priority, &self.copy[1..]);
        }
        if self.copy.capacity() > KEEP_COPY {
            // A large block: do not keep its buffer for the small ones that follow.
            self.copy = Vec::new();
        }
        Ok(false)
    }

    fn remember(&mut self, stream: u32, fault: Refusal) {
        if self.faults.len() == FAULTS_KEPT {
            self.faults.pop_front();
        }
        self.faults.push_back((stream, fault));
    }

    /// Appends what makes the server end the connection with GOAWAY(PROTOCOL_ERROR), and stops.
    fn close(&mut self, out: &mut Vec<u8>) {
        self.closed = true;
        self.partial = None;
        // A CONTINUATION frame outside any header block: always a connection error (RFC 9113
        // §6.10). Everything the server received before ends at a frame boundary with no block
        // open, because blocks are handed on only when complete.
        out.extend_from_slice(&[0, 0, 0, CONTINUATION, END_HEADERS, 0, 0, 0, 1]);
    }
}

/// Appends `block` as a HEADERS frame plus as many CONTINUATION frames as needed, each at most
/// [`MIN_MAX_FRAME_SIZE`], keeping END_STREAM and the priority and dropping any padding.
pub fn put_frames(
    out: &mut Vec<u8>,
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    block: &[u8],
) {
    let first_room = MIN_MAX_FRAME_SIZE - if priority.is_some() { 5 } else { 0 };
    let (first, mut rest) = block.split_at(block.len().min(first_room));
    let mut flags = if end_stream { END_STREAM } else { 0 };
    if priority.is_some() {
        flags |= PRIORITY;
    }
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    let len = first.len() + if priority.is_some() { 5 } else { 0 };
    put_head(out, len, HEADERS, flags, stream);
    if let Some(p) = priority {
        out.extend_from_slice(&p);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, more) = rest.split_at(rest.len().min(MIN_MAX_FRAME_SIZE));
        let flags = if more.is_empty() { END_HEADERS } else { 0 };
        put_head(out, chunk.len(), CONTINUATION, flags, stream);
        out.extend_from_slice(chunk);
        rest = more;
    }
}

fn put_head(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A HEADERS frame (or frames) carrying `fields` as literals, END_HEADERS on the last.
    fn block_frames(stream: u32, fields: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut block = Vec::new();
        for (n, v) in fields {
            hpack::put_literal(&mut block, n, v);
        }
        let mut out = Vec::new();
        put_frames(&mut out, stream, true, None, &block);
        out
    }

    /// Runs `input` through `reader` to the end, as the layer would.
    fn run(reader: &mut Reader, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() {
            match reader.step(input, out).expect("accepted") {
                Step::Pass(n) => {
                    reader.passed(n);
                    input = &input[n..];
                }
                Step::Took(n) => input = &input[n..],
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn the_copy_buffer_is_released_after_a_large_block() {
        let limits = Limits {
            header_table_size: 4096,
            max_header_list_size: 64 * 1024,
        };
        let mut reader = Reader::new(limits);
        let mut out = Vec::new();
        run(&mut reader, &[0; PREFACE_LEN], &mut out);
        let big = vec![b'p'; 40_000];
        let request = |stream, pad: &[u8]| {
            block_frames(
                stream,
                &[
                    (b":method", b"POST"),
                    (b":scheme", b"http"),
                    (b":path", b"/a/b"),
                    (b":authority", b"/run/x.sock"),
                    (b"x-pad", pad),
                ],
            )
        };
        run(&mut reader, &request(1, &big), &mut out);
        assert_eq!(reader.mode(), Mode::Reencode);
        assert!(out.len() > 40_000);
        assert!(
            reader.copy.capacity() <= KEEP_COPY,
            "a {}-byte copy buffer kept after the large block",
            reader.copy.capacity()
        );
        out.clear();
        run(&mut reader, &request(3, b"small"), &mut out);
        assert!(reader.copy.capacity() <= KEEP_COPY);
    }
}
