//! HTTP/2 frames (RFC 9113 §4, §6): the constants pullgate needs and the few frames it writes
//! itself. Pure functions over byte buffers, no I/O.

use bytes::{Bytes, BytesMut};

/// The HTTP/2 frame header length.
pub const FRAME_HEADER: usize = 9;
/// The frame size every HTTP/2 endpoint must accept (RFC 9113 §4.2): pullgate's own frames are
/// never larger, whatever the peer advertises.
pub const MIN_MAX_FRAME_SIZE: usize = 16_384;
/// The largest frame payload the 24-bit length can carry (the largest SETTINGS_MAX_FRAME_SIZE).
pub const MAX_FRAME: usize = (1 << 24) - 1;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const PRIORITY_FRAME: u8 = 0x2;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PUSH_PROMISE: u8 = 0x5;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY: u8 = 0x20;

pub const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
pub const SETTINGS_ENABLE_PUSH: u16 = 0x2;
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;
pub const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

pub const NO_ERROR: u32 = 0x0;
pub const PROTOCOL_ERROR: u32 = 0x1;
pub const INTERNAL_ERROR: u32 = 0x2;
pub const FLOW_CONTROL_ERROR: u32 = 0x3;
pub const FRAME_SIZE_ERROR: u32 = 0x6;
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// The largest stream ID (RFC 9113 §5.1.1).
pub const MAX_STREAM_ID: u32 = (1 << 31) - 1;

/// A frame's type, flags and stream; `frame` holds at least a frame header.
pub fn head(frame: &[u8]) -> (u8, u8, u32) {
    let stream = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
    (frame[3], frame[4], stream)
}

/// The next whole frame at the start of `input`, split off it (`Ok(None)`: not all here yet, and
/// room for it is reserved). `Err(len)`: a payload longer than `max`.
pub fn next_frame(input: &mut BytesMut, max: usize) -> Result<Option<Bytes>, usize> {
    if input.len() < FRAME_HEADER {
        return Ok(None);
    }
    let len = u32::from_be_bytes([0, input[0], input[1], input[2]]) as usize;
    if len > max {
        return Err(len);
    }
    if input.len() < FRAME_HEADER + len {
        input.reserve(FRAME_HEADER + len - input.len());
        return Ok(None);
    }
    Ok(Some(input.split_to(FRAME_HEADER + len).freeze()))
}

/// The 31-bit value at the start of a payload (a WINDOW_UPDATE increment, GOAWAY's last stream),
/// if the payload holds one.
pub fn u31(payload: &[u8]) -> Option<u32> {
    let b = payload.get(..4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff)
}

pub fn put_head(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
}

pub fn put_rst(out: &mut Vec<u8>, stream: u32, code: u32) {
    put_head(out, 4, RST_STREAM, 0, stream);
    out.extend_from_slice(&code.to_be_bytes());
}

/// A WINDOW_UPDATE, unless `n` is 0 (an increment of 0 is a protocol error).
pub fn put_window_update(out: &mut Vec<u8>, stream: u32, n: u32) {
    if n > 0 {
        put_head(out, 4, WINDOW_UPDATE, 0, stream);
        out.extend_from_slice(&n.to_be_bytes());
    }
}

pub fn put_goaway(out: &mut Vec<u8>, last: u32, code: u32, debug: &[u8]) {
    put_head(out, 8 + debug.len(), GOAWAY, 0, 0);
    out.extend_from_slice(&last.to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(debug);
}

pub fn put_settings(out: &mut Vec<u8>, entries: &[(u16, u32)]) {
    put_head(out, 6 * entries.len(), SETTINGS, 0, 0);
    for (id, value) in entries {
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&value.to_be_bytes());
    }
}

/// A DATA frame carrying `data`.
pub fn put_data(out: &mut Vec<u8>, stream: u32, end_stream: bool, data: &[u8]) {
    let flags = if end_stream { END_STREAM } else { 0 };
    put_head(out, data.len(), DATA, flags, stream);
    out.extend_from_slice(data);
}

/// Appends `block` as a HEADERS frame plus as many CONTINUATION frames as needed, each at most
/// [`MIN_MAX_FRAME_SIZE`].
pub fn put_frames(out: &mut Vec<u8>, stream: u32, end_stream: bool, block: &[u8]) {
    let (first, mut rest) = block.split_at(block.len().min(MIN_MAX_FRAME_SIZE));
    let mut flags = if end_stream { END_STREAM } else { 0 };
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    put_head(out, first.len(), HEADERS, flags, stream);
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, more) = rest.split_at(rest.len().min(MIN_MAX_FRAME_SIZE));
        let flags = if more.is_empty() { END_HEADERS } else { 0 };
        put_head(out, chunk.len(), CONTINUATION, flags, stream);
        out.extend_from_slice(chunk);
        rest = more;
    }
}

/// The payload of a DATA frame without its padding, and the whole payload's length (which flow
/// control counts). `None`: more padding than payload.
pub fn data_payload(frame: &Bytes, flags: u8) -> Option<(Bytes, u32)> {
    let payload = frame.slice(FRAME_HEADER..);
    let total = payload.len() as u32;
    if flags & PADDED == 0 {
        return Some((payload, total));
    }
    let pad = *payload.first()? as usize;
    let end = payload.len().checked_sub(pad)?;
    (end >= 1).then(|| (payload.slice(1..end), total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_split_off_whole_whatever_arrived() {
        let mut wire = Vec::new();
        put_data(&mut wire, 1, false, b"hello");
        put_rst(&mut wire, 3, CANCEL);
        for cut in 0..wire.len() {
            let mut input = BytesMut::from(&wire[..cut]);
            let mut got = Vec::new();
            while let Some(f) = next_frame(&mut input, 16).unwrap() {
                got.push(f);
            }
            input.extend_from_slice(&wire[cut..]);
            while let Some(f) = next_frame(&mut input, 16).unwrap() {
                got.push(f);
            }
            assert_eq!(got.len(), 2, "cut at {cut}");
            assert_eq!(head(&got[0]), (DATA, 0, 1));
            assert_eq!(&got[0][FRAME_HEADER..], b"hello");
            assert_eq!(head(&got[1]), (RST_STREAM, 0, 3));
            assert_eq!(u31(&got[1][FRAME_HEADER..]), Some(CANCEL));
            assert!(input.is_empty());
        }
        let mut long = Vec::new();
        put_data(&mut long, 1, false, &[0; 17]);
        assert_eq!(next_frame(&mut BytesMut::from(&long[..]), 16), Err(17));
    }

    #[test]
    fn padding_is_stripped_and_counted() {
        let mut f = Vec::new();
        put_head(&mut f, 1 + 3 + 2, DATA, PADDED, 1);
        f.extend_from_slice(&[2, b'a', b'b', b'c', 0, 0]);
        let (data, total) = data_payload(&Bytes::from(f), PADDED).unwrap();
        assert_eq!((&data[..], total), (&b"abc"[..], 6));
        let mut bad = Vec::new();
        put_head(&mut bad, 2, DATA, PADDED, 1);
        bad.extend_from_slice(&[5, 0]);
        assert_eq!(data_payload(&Bytes::from(bad), PADDED), None);
    }

    #[test]
    fn large_blocks_are_split_into_continuations() {
        let block = vec![7u8; 2 * MIN_MAX_FRAME_SIZE + 10];
        let mut out = Vec::new();
        put_frames(&mut out, 5, true, &block);
        let mut input = BytesMut::from(&out[..]);
        let mut kinds = Vec::new();
        let mut joined = Vec::new();
        while let Some(f) = next_frame(&mut input, MIN_MAX_FRAME_SIZE).unwrap() {
            kinds.push(head(&f));
            joined.extend_from_slice(&f[FRAME_HEADER..]);
        }
        assert_eq!(
            kinds,
            [
                (HEADERS, END_STREAM, 5),
                (CONTINUATION, 0, 5),
                (CONTINUATION, END_HEADERS, 5)
            ]
        );
        assert_eq!(joined, block);
        // Nothing is written for an increment of 0.
        let mut none = Vec::new();
        put_window_update(&mut none, 0, 0);
        assert!(none.is_empty());
    }
}
