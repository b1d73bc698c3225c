//! gRPC on the wire, as far as a forwarding proxy needs it: status codes, trailers-only answers,
//! and the 5-byte length-prefixed message frame.
//!
//! pullgate never decodes what it only forwards; this module exists for the calls it answers itself
//! (errors, denials) and for the intercepted calls whose single request message it must read.

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Response, header};

/// Largest message kubelet sends or accepts (its gRPC client limit): 16 MiB.
pub const MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;
/// Length of the gRPC message prefix: compressed flag + big-endian u32 length.
pub const FRAME_HEADER_LEN: usize = 5;

/// gRPC status codes pullgate produces itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    Ok = 0,
    Cancelled = 1,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Ok => "0",
            Code::Cancelled => "1",
            Code::InvalidArgument => "3",
            Code::DeadlineExceeded => "4",
            Code::NotFound => "5",
            Code::PermissionDenied => "7",
            Code::ResourceExhausted => "8",
            Code::FailedPrecondition => "9",
            Code::Unimplemented => "12",
            Code::Internal => "13",
            Code::Unavailable => "14",
        }
    }
}

/// A status pullgate answers with instead of forwarding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub code: Code,
    pub message: String,
}

impl Status {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Status {
            code,
            message: message.into(),
        }
    }

    /// `grpc-status` and `grpc-message` as header values (for trailers or a trailers-only answer).
    pub fn insert_into(&self, headers: &mut HeaderMap) {
        headers.insert("grpc-status", HeaderValue::from_static(self.code.as_str()));
        if !self.message.is_empty() {
            let encoded = percent_encode(&self.message);
            // percent_encode only emits visible ASCII, which is always a valid header value.
            if let Ok(v) = HeaderValue::from_str(&encoded) {
                headers.insert("grpc-message", v);
            }
        }
    }

    /// A complete trailers-only gRPC response: HTTP 200, `content-type: application/grpc`, and the
    /// status in the (only) HEADERS frame, which carries END_STREAM because the body is empty.
    pub fn to_response<B: Default>(&self) -> Response<B> {
        let mut resp = Response::new(B::default());
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        self.insert_into(headers);
        resp
    }
}

/// Percent-encodes a grpc-message value as the gRPC HTTP/2 spec requires: every byte outside
/// visible ASCII (0x20..=0x7E), and `%` itself, becomes `%XX` of its UTF-8 encoding.
pub fn percent_encode(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for &b in msg.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(
                char::from_digit((b >> 4) as u32, 16)
                    .unwrap()
                    .to_ascii_uppercase(),
            );
            out.push(
                char::from_digit((b & 0xf) as u32, 16)
                    .unwrap()
                    .to_ascii_uppercase(),
            );
        }
    }
    out
}

/// Why a request body is not a single acceptable gRPC message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("the request body is {0} bytes, shorter than the 5-byte gRPC message prefix")]
    Truncated(usize),
    #[error("the gRPC message prefix announces {announced} bytes but {actual} follow")]
    LengthMismatch { announced: usize, actual: usize },
    #[error("the message is {0} bytes, over the {MAX_MESSAGE_SIZE}-byte limit")]
    TooLarge(usize),
    #[error(
        "the message is compressed; pullgate reads this method's requests and needs them uncompressed"
    )]
    Compressed,
    #[error("the compressed-flag byte is {0}, which is neither 0 nor 1")]
    BadFlag(u8),
}

impl FrameError {
    /// The status a client gets for this malformed request.
    pub fn status(&self, method: &str) -> Status {
        let code = match self {
            FrameError::TooLarge(_) => Code::ResourceExhausted,
            FrameError::Compressed => Code::Unimplemented,
            _ => Code::InvalidArgument,
        };
        Status::new(code, format!("pullgate: {method}: {self}"))
    }
}

/// Splits a complete request body that must hold exactly one uncompressed gRPC message.
pub fn single_message(body: &Bytes) -> Result<Bytes, FrameError> {
    if body.len() < FRAME_HEADER_LEN {
        return Err(FrameError::Truncated(body.len()));
    }
    let flag = body[0];
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if len > MAX_MESSAGE_SIZE {
        return Err(FrameError::TooLarge(len));
    }
    match flag {
        0 => {}
        1 => return Err(FrameError::Compressed),
        other => return Err(FrameError::BadFlag(other)),
    }
    let actual = body.len() - FRAME_HEADER_LEN;
    if actual != len {
        return Err(FrameError::LengthMismatch {
            announced: len,
            actual,
        });
    }
    Ok(body.slice(FRAME_HEADER_LEN..))
}

/// Frames one uncompressed message.
pub fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(FRAME_HEADER_LEN + message.len());
    out.put_u8(0);
    out.put_u32(message.len() as u32);
    out.put_slice(message);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_encoding_follows_the_spec() {
        assert_eq!(percent_encode("plain text: ok"), "plain text: ok");
        assert_eq!(percent_encode("100%"), "100%25");
        assert_eq!(percent_encode("a\nb"), "a%0Ab");
        assert_eq!(percent_encode("café"), "caf%C3%A9");
    }

    #[test]
    fn frames_round_trip_and_reject_bad_prefixes() {
        let msg = b"\x0a\x03abc";
        let framed = frame(msg);
        assert_eq!(&framed[..5], &[0, 0, 0, 0, 5]);
        assert_eq!(single_message(&framed).unwrap(), Bytes::from_static(msg));

        assert_eq!(
            single_message(&Bytes::from_static(b"\0\0\0")),
            Err(FrameError::Truncated(3))
        );
        assert_eq!(
            single_message(&Bytes::from_static(b"\0\0\0\0\x09abc")),
            Err(FrameError::LengthMismatch {
                announced: 9,
                actual: 3
            })
        );
        // Two messages in one body are not one message.
        let mut two = framed.to_vec();
        two.extend_from_slice(&framed);
        assert!(matches!(
            single_message(&Bytes::from(two)),
            Err(FrameError::LengthMismatch { .. })
        ));
        assert_eq!(
            single_message(&Bytes::from_static(b"\x01\0\0\0\x01a")),
            Err(FrameError::Compressed)
        );
        assert_eq!(
            single_message(&Bytes::from_static(b"\x07\0\0\0\x01a")),
            Err(FrameError::BadFlag(7))
        );
        assert_eq!(
            single_message(&Bytes::from_static(b"\0\x02\0\0\x01")),
            Err(FrameError::TooLarge(0x0200_0001))
        );
    }

    #[test]
    fn trailers_only_response_carries_status() {
        let resp: Response<()> =
            Status::new(Code::PermissionDenied, "image denied: 100%").to_response();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "application/grpc");
        assert_eq!(resp.headers()["grpc-status"], "7");
        assert_eq!(resp.headers()["grpc-message"], "image denied: 100%25");
        assert_eq!(
            FrameError::Compressed.status("/m").code,
            Code::Unimplemented
        );
    }
}
