//! Header blocks on a relayed connection: gathered from HEADERS and CONTINUATION frames, decoded
//! with the sender's HPACK table, and re-encoded as literals without indexing for the receiver.
//!
//! Re-encoding every block means neither receiver's dynamic table is ever used: no HPACK state has
//! to be kept in step across the relay, pullgate may drop or answer any stream itself, and the
//! receiver decodes exactly the fields pullgate decoded and routed on.

use super::frame::{
    CONTINUATION, END_HEADERS, END_STREAM, HEADERS, MIN_MAX_FRAME_SIZE, PADDED, PRIORITY,
    put_frames,
};
use super::hpack::{Decoder, Inspection, REPLACEMENT_AUTHORITY, put_literal};

/// The HPACK table size pullgate decodes with in both directions: the default 4096 bytes (its
/// SETTINGS, and the SETTINGS it passes on, never allow more).
pub const TABLE_SIZE: usize = 4096;
/// The largest header list pullgate takes from a client (SETTINGS_MAX_HEADER_LIST_SIZE).
///
/// Why 64 KiB: a CRI request's headers are a few hundred bytes (pseudo-headers, content-type, te,
/// user-agent, grpc-timeout, perhaps a trace header), and gRPC C-core servers refuse metadata over
/// 8 KiB by default (`GRPC_ARG_MAX_METADATA_SIZE`), so clients do not rely on more. The limit
/// bounds what one header block costs pullgate to hold and decode.
pub const MAX_HEADER_LIST: usize = 64 * 1024;

/// Why a frame breaks the header-block rules (each a connection error, RFC 9113 §6.2, §6.10).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error("a frame of type {0:#x} arrived while a header block was open")]
    Interleaved(u8),
    #[error("a CONTINUATION frame without an open header block on its stream")]
    StrayContinuation,
    #[error("a HEADERS frame whose padding or priority is longer than the frame")]
    BadPadding,
    #[error("a header block larger than {0} bytes")]
    TooLarge(usize),
    #[error("more than {0} CONTINUATION frames in one header block")]
    TooManyContinuations(usize),
    #[error("a header block that does not decode: {0}")]
    Decode(String),
}

/// A complete header block, decoded and re-encoded.
#[derive(Debug, PartialEq, Eq)]
pub struct Block {
    pub stream: u32,
    pub end_stream: bool,
    /// The block as frames for the receiver (HEADERS, then CONTINUATIONs), literals only.
    pub frames: Vec<u8>,
    /// `:path`, if the block has one (the first: a second one is a `fault` in `inspection`).
    pub path: Option<Vec<u8>>,
    /// What the decoder found. Its `fault` judges client blocks only: in a server's block
    /// (`request` false) every pseudo-header, `:status` included, is flagged.
    pub inspection: Inspection,
}

/// One direction's header blocks: the sender's HPACK table and the block being gathered.
pub struct Blocks {
    decoder: Decoder,
    request: bool,
    max_block: usize,
    max_list: usize,
    open: Option<(u32, bool)>,
    continuations: usize,
    block: Vec<u8>,
    copy: Vec<u8>,
    /// The highest stream a client block opened: a block on a higher one is a request's headers.
    last_opened: u32,
}

impl Blocks {
    /// `request`: blocks from the client (requests and their trailers); `table_size`: the
    /// SETTINGS_HEADER_TABLE_SIZE the receiver advertises to the sender; `max_block` bounds the
    /// encoded block, `max_list` the decoded header list.
    pub fn new(request: bool, table_size: usize, max_block: usize, max_list: usize) -> Self {
        Blocks {
            decoder: Decoder::new(table_size),
            request,
            max_block,
            max_list,
            open: None,
            continuations: 0,
            block: Vec::new(),
            copy: Vec::new(),
            last_opened: 0,
        }
    }

    /// Whether a header block is open: until it ends, no other frame may come.
    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// The stream whose header block is open.
    pub fn open_stream(&self) -> Option<u32> {
        self.open.map(|(s, _)| s)
    }

    /// The last complete block, re-encoded as literals without indexing (see [`fields`]).
    pub fn literals(&self) -> &[u8] {
        &self.copy
    }

    /// Checks that a frame of `kind` may come now (one not handled by [`Blocks::frame`]).
    pub fn allow(&self, kind: u8) -> Result<(), BlockError> {
        match self.open {
            Some(_) => Err(BlockError::Interleaved(kind)),
            None => Ok(()),
        }
    }

    /// Takes a HEADERS or CONTINUATION frame: the finished block once END_HEADERS arrives.
    pub fn frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
    ) -> Result<Option<Block>, BlockError> {
        let fragment = match (kind, self.open) {
            (HEADERS, None) => {
                let mut f = payload;
                if flags & PADDED != 0 {
                    let (&pad, rest) = f.split_first().ok_or(BlockError::BadPadding)?;
                    f = rest
                        .get(
                            ..rest
                                .len()
                                .checked_sub(pad as usize)
                                .ok_or(BlockError::BadPadding)?,
                        )
                        .ok_or(BlockError::BadPadding)?;
                }
                if flags & PRIORITY != 0 {
                    f = f.get(5..).ok_or(BlockError::BadPadding)?;
                }
                self.block.clear();
                self.continuations = 0;
                self.open = Some((stream, flags & END_STREAM != 0));
                f
            }
            (CONTINUATION, Some((open, _))) if open == stream => {
                // Empty CONTINUATION frames cost work but no bytes: their number is bounded too,
                // by what one block of the largest size needs in minimum-size frames, plus a
                // quarter.
                let frames = (self.max_block / MIN_MAX_FRAME_SIZE).max(1);
                let limit = (frames + frames / 4).max(5);
                self.continuations += 1;
                if self.continuations > limit {
                    return Err(BlockError::TooManyContinuations(limit));
                }
                payload
            }
            (CONTINUATION, _) => return Err(BlockError::StrayContinuation),
            (other, _) => return Err(BlockError::Interleaved(other)),
        };
        if self.block.len() + fragment.len() > self.max_block {
            return Err(BlockError::TooLarge(self.max_block));
        }
        self.block.extend_from_slice(fragment);
        if flags & END_HEADERS == 0 {
            return Ok(None);
        }
        let (stream, end_stream) = self.open.take().expect("a block is open");
        let opens = self.request && stream > self.last_opened;
        if opens {
            self.last_opened = stream;
        }
        self.copy.clear();
        let inspection = self
            .decoder
            .decode(&self.block, opens, self.max_list, &mut self.copy)
            .map_err(|e| BlockError::Decode(e.to_string()))?;
        let path = path_of(&self.copy);
        let mut frames = Vec::with_capacity(self.copy.len() + 9);
        if opens && field(&self.copy, b":authority").is_none() {
            // A request without `:authority` leaves with one, as every gRPC client sends it.
            let mut with = Vec::with_capacity(self.copy.len() + 24);
            put_literal(&mut with, b":authority", REPLACEMENT_AUTHORITY);
            with.extend_from_slice(&self.copy);
            self.copy = with;
        }
        put_frames(&mut frames, stream, end_stream, &self.copy);
        Ok(Some(Block {
            stream,
            end_stream,
            frames,
            path,
            inspection,
        }))
    }
}

/// The `:path` of a block re-encoded as literals without indexing.
fn path_of(literals: &[u8]) -> Option<Vec<u8>> {
    field(literals, b":path").map(<[u8]>::to_vec)
}

/// The value of the first field named `name` in a block re-encoded as literals.
pub fn field<'a>(literals: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    fields(literals).find_map(|(n, v)| (n == name).then_some(v))
}

/// The fields (name, value) of a block re-encoded as literals without indexing, as the decoder
/// writes them: literal names, no Huffman coding.
pub fn fields(literals: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    let mut pos = 0;
    std::iter::from_fn(move || {
        let string = |pos: &mut usize| -> Option<&[u8]> {
            let len = int7(literals, pos)?;
            let start = *pos;
            *pos = pos.checked_add(len).filter(|&e| e <= literals.len())?;
            Some(&literals[start..*pos])
        };
        if pos >= literals.len() {
            return None;
        }
        // Each field: 0x00, name, value.
        pos += 1;
        let name = string(&mut pos)?;
        let value = string(&mut pos)?;
        Some((name, value))
    })
}

/// An HPACK integer with a 7-bit prefix (RFC 7541 §5.1), as `put_int` writes it.
fn int7(buf: &[u8], pos: &mut usize) -> Option<usize> {
    let first = *buf.get(*pos)? & 0x7f;
    *pos += 1;
    if first < 0x7f {
        return Some(first as usize);
    }
    let mut value = 0x7f_usize;
    for shift in (0..28).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        value += ((b & 0x7f) as usize) << shift;
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request block a client's encoder could send: indexed `:method POST`, `:scheme http`, a
    /// literal `:path` with incremental indexing, and a literal `content-type`.
    fn request_block(path: &str) -> Vec<u8> {
        let mut b = vec![0x83, 0x86];
        b.push(0x44); // literal with incremental indexing, name = static 4 (:path)
        b.push(path.len() as u8);
        b.extend_from_slice(path.as_bytes());
        b.push(0x00);
        b.push(12);
        b.extend_from_slice(b"content-type");
        b.push(16);
        b.extend_from_slice(b"application/grpc");
        b
    }

    fn blocks() -> Blocks {
        Blocks::new(true, 4096, 64 * 1024, 64 * 1024)
    }

    #[test]
    fn a_block_over_continuations_decodes_to_its_path_and_one_literal_copy() {
        let raw = request_block("/runtime.v1.RuntimeService/Version");
        let (a, b) = raw.split_at(7);
        let mut bl = blocks();
        assert!(bl.frame(HEADERS, END_STREAM, 1, a).unwrap().is_none());
        assert!(bl.is_open());
        assert_eq!(bl.allow(0x0), Err(BlockError::Interleaved(0x0)));
        let block = bl.frame(CONTINUATION, END_HEADERS, 1, b).unwrap().unwrap();
        assert_eq!(
            block.path.as_deref(),
            Some(&b"/runtime.v1.RuntimeService/Version"[..])
        );
        assert!(block.end_stream);
        // One HEADERS frame, END_STREAM and END_HEADERS, literals without indexing only.
        assert_eq!(block.frames[3], HEADERS);
        assert_eq!(block.frames[4], END_STREAM | END_HEADERS);
        assert_eq!(&block.frames[5..9], &1u32.to_be_bytes());
        assert_eq!(block.frames[9], 0x00);
        // The next block refers to the entry the first one added to the sender's table.
        let block = bl
            .frame(HEADERS, END_HEADERS, 3, &[0x83, 0x86, 0xbe])
            .unwrap()
            .unwrap();
        assert_eq!(
            block.path.as_deref(),
            Some(&b"/runtime.v1.RuntimeService/Version"[..])
        );
    }

    #[test]
    fn padding_and_priority_are_dropped() {
        let raw = request_block("/a.B/C");
        let mut payload = vec![2]; // pad length
        payload.extend_from_slice(&[0, 0, 0, 0, 16]); // priority
        payload.extend_from_slice(&raw);
        payload.extend_from_slice(&[0, 0]);
        let block = blocks()
            .frame(HEADERS, END_HEADERS | PADDED | PRIORITY, 5, &payload)
            .unwrap()
            .unwrap();
        assert_eq!(block.path.as_deref(), Some(&b"/a.B/C"[..]));
        assert_eq!(block.frames[4], END_HEADERS);
        let mut bl = blocks();
        assert_eq!(
            bl.frame(HEADERS, END_HEADERS | PADDED, 5, &[9, 0x83]),
            Err(BlockError::BadPadding)
        );
    }

    #[test]
    fn broken_framing_and_oversized_blocks_are_errors() {
        let mut bl = blocks();
        assert_eq!(
            bl.frame(CONTINUATION, END_HEADERS, 1, &[0x83]),
            Err(BlockError::StrayContinuation)
        );
        bl.frame(HEADERS, 0, 1, &[0x83]).unwrap();
        assert_eq!(
            bl.frame(CONTINUATION, END_HEADERS, 3, &[0x86]),
            Err(BlockError::StrayContinuation)
        );
        let mut small = Blocks::new(true, 4096, 4, 64 * 1024);
        assert_eq!(
            small.frame(HEADERS, END_HEADERS, 1, &request_block("/a.B/C")),
            Err(BlockError::TooLarge(4))
        );
        assert!(matches!(
            blocks().frame(HEADERS, END_HEADERS, 1, &[0xff, 0x7f]),
            Err(BlockError::Decode(_))
        ));
        // A flood of empty CONTINUATION frames ends at the bound (64 KiB blocks: 5 frames).
        let mut bl = blocks();
        bl.frame(HEADERS, 0, 1, &[0x83]).unwrap();
        for _ in 0..5 {
            assert_eq!(bl.frame(CONTINUATION, 0, 1, &[]), Ok(None));
        }
        assert_eq!(
            bl.frame(CONTINUATION, 0, 1, &[]),
            Err(BlockError::TooManyContinuations(5))
        );
    }

    #[test]
    fn a_request_without_authority_leaves_with_one_and_trailers_get_none() {
        let mut bl = blocks();
        let block = bl
            .frame(HEADERS, END_HEADERS, 1, &request_block("/a.B/C"))
            .unwrap()
            .unwrap();
        let literals: Vec<_> = fields(bl.literals()).map(|(n, _)| n.to_vec()).collect();
        assert_eq!(literals[0], b":authority");
        assert_eq!(
            fields(bl.literals()).next().map(|(_, v)| v),
            Some(REPLACEMENT_AUTHORITY)
        );
        assert!(block.frames.len() > 9 + bl.literals().len() - 1);
        // Trailers on the same stream (a regular field only): as sent.
        let mut trailer = vec![0x00, 3];
        trailer.extend_from_slice(b"x-t");
        trailer.extend_from_slice(&[1, b'1']);
        bl.frame(HEADERS, END_HEADERS | END_STREAM, 1, &trailer)
            .unwrap()
            .unwrap();
        let names: Vec<_> = fields(bl.literals()).map(|(n, _)| n.to_vec()).collect();
        assert_eq!(names, [b"x-t".to_vec()]);
    }

    #[test]
    fn long_paths_use_continued_integers() {
        let path = format!("/a.B/{}", "x".repeat(300));
        let block = blocks()
            .frame(HEADERS, END_HEADERS, 1, &{
                let mut b = vec![0x83, 0x86, 0x04];
                b.push(0x7f);
                let rest = path.len() - 0x7f;
                b.extend_from_slice(&[(rest % 128) as u8 | 0x80, (rest / 128) as u8]);
                b.extend_from_slice(path.as_bytes());
                b
            })
            .unwrap()
            .unwrap();
        assert_eq!(block.path.as_deref(), Some(path.as_bytes()));
    }
}
