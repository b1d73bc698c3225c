//! The server-to-client direction: frame boundaries tracked over the bytes the server writes, to
//! see the RST_STREAM frames it sends. Nothing is changed or buffered.

use super::reader::{FRAME_HEADER, RST_STREAM};

/// HTTP/2 error codes (RFC 9113 §7) that say the server refused what the client sent. NO_ERROR,
/// CANCEL and INTERNAL_ERROR (a response body that failed upstream) are ordinary stream ends.
pub fn is_refusal(code: u32) -> bool {
    !matches!(code, 0x0 | 0x2 | 0x8)
}

/// The name of an HTTP/2 error code, for logs.
pub fn code_name(code: u32) -> &'static str {
    match code {
        0x0 => "NO_ERROR",
        0x1 => "PROTOCOL_ERROR",
        0x2 => "INTERNAL_ERROR",
        0x3 => "FLOW_CONTROL_ERROR",
        0x4 => "SETTINGS_TIMEOUT",
        0x5 => "STREAM_CLOSED",
        0x6 => "FRAME_SIZE_ERROR",
        0x7 => "REFUSED_STREAM",
        0x8 => "CANCEL",
        0x9 => "COMPRESSION_ERROR",
        0xa => "CONNECT_ERROR",
        0xb => "ENHANCE_YOUR_CALM",
        0xc => "INADEQUATE_SECURITY",
        0xd => "HTTP_1_1_REQUIRED",
        _ => "unknown error code",
    }
}

/// Where the writer is in the server's frame sequence.
#[derive(Default)]
pub struct Watch {
    head: [u8; FRAME_HEADER],
    head_len: usize,
    /// Payload bytes of the current frame still to go by.
    skip: usize,
    /// The current frame is a RST_STREAM on this stream: its first 4 payload bytes are the code.
    reset: Option<(u32, [u8; 4], usize)>,
}

impl Watch {
    /// Follows `written` (bytes the server wrote, in order); calls `on_reset(stream, code)` for
    /// every complete RST_STREAM frame.
    pub fn scan(&mut self, mut written: &[u8], mut on_reset: impl FnMut(u32, u32)) {
        while !written.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(written.len());
                if let Some((stream, code, have)) = &mut self.reset {
                    let k = (4 - *have).min(n);
                    code[*have..*have + k].copy_from_slice(&written[..k]);
                    *have += k;
                    if *have == 4 {
                        on_reset(*stream, u32::from_be_bytes(*code));
                        self.reset = None;
                    }
                }
                self.skip -= n;
                written = &written[n..];
                continue;
            }
            let n = (FRAME_HEADER - self.head_len).min(written.len());
            self.head[self.head_len..self.head_len + n].copy_from_slice(&written[..n]);
            self.head_len += n;
            written = &written[n..];
            if self.head_len == FRAME_HEADER {
                self.head_len = 0;
                let h = self.head;
                self.skip = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                self.reset = (h[3] == RST_STREAM && self.skip >= 4).then_some((stream, [0; 4], 0));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.push(kind);
        f.push(0);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn sees_resets_however_the_writes_are_cut() {
        let mut bytes = frame(0x4, 0, &[0; 12]); // SETTINGS
        bytes.extend(frame(0x1, 1, b"\x88")); // HEADERS
        bytes.extend(frame(0x0, 1, &[7; 40])); // DATA with an RST_STREAM-like byte pattern
        bytes.extend(frame(RST_STREAM, 3, &1u32.to_be_bytes()));
        bytes.extend(frame(RST_STREAM, 5, &8u32.to_be_bytes()));
        bytes.extend(frame(0x7, 0, &[0; 8])); // GOAWAY
        for cut in 1..=bytes.len() {
            let mut w = Watch::default();
            let mut seen = Vec::new();
            for chunk in bytes.chunks(cut) {
                w.scan(chunk, |s, c| seen.push((s, c)));
            }
            assert_eq!(seen, vec![(3, 1), (5, 8)], "writes of {cut} bytes");
        }
        assert!(is_refusal(1) && is_refusal(7) && !is_refusal(8) && !is_refusal(0));
        assert_eq!(code_name(7), "REFUSED_STREAM");
    }
}
