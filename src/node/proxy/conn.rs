//! One kubelet connection: check that it speaks HTTP/2, then serve it ([`super::relay`]).
//!
//! The first bytes are peeked (not consumed) before the relay sees them. A client that sends an
//! HTTP/1 request gets a plain `505` answer explaining what the socket speaks; any other bytes get
//! an HTTP/2 `GOAWAY(PROTOCOL_ERROR)` with a reason. Neither reaches the relay, and neither affects
//! any other connection; both are counted and logged as protocol refusals.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::UnixStream;
use tokio::sync::watch;

use super::Proxy;
use super::refusal::Refusal;
use super::relay::{self, SessionLimits};
use super::track::Conn;

/// The HTTP/2 client connection preface every gRPC client sends first.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How long a new connection may take to send the preface.
const PREFACE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the first bytes of a connection turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preface {
    Http2,
    Http1,
    Garbage,
    /// The client closed before sending anything useful.
    Closed,
}

/// Classifies the start of a connection from the bytes seen so far; `None` means "need more".
pub fn classify(seen: &[u8]) -> Option<Preface> {
    let n = seen.len().min(PREFACE.len());
    if seen[..n] == PREFACE[..n] {
        return (n == PREFACE.len()).then_some(Preface::Http2);
    }
    const METHODS: [&[u8]; 9] = [
        b"GET ",
        b"POST ",
        b"PUT ",
        b"HEAD ",
        b"DELETE ",
        b"OPTIONS ",
        b"PATCH ",
        b"CONNECT ",
        b"TRACE ",
    ];
    let http1 = METHODS.iter().any(|m| {
        let k = seen.len().min(m.len());
        seen[..k] == m[..k]
    });
    match http1 {
        true if METHODS.iter().any(|m| seen.starts_with(m)) => Some(Preface::Http1),
        true => None,
        false => Some(Preface::Garbage),
    }
}

/// Waits (bounded) until the connection's first bytes tell what it speaks, without consuming them.
async fn peek_preface(stream: &UnixStream) -> Preface {
    let fd = stream.as_raw_fd();
    let mut buf = [0u8; 24];
    let peek = async {
        loop {
            if stream.readable().await.is_err() {
                return Preface::Closed;
            }
            let n = stream.try_io(Interest::READABLE, || {
                // SAFETY: recv with MSG_PEEK into a stack buffer of the given length on a valid fd.
                let r =
                    unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_PEEK) };
                if r < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(r as usize)
                }
            });
            match n {
                Ok(0) => return Preface::Closed,
                Ok(n) => match classify(&buf[..n]) {
                    Some(p) => return p,
                    // A partial preface: the rest is in flight; look again shortly.
                    None => tokio::time::sleep(Duration::from_millis(1)).await,
                },
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => return Preface::Closed,
            }
        }
    };
    tokio::time::timeout(PREFACE_TIMEOUT, peek)
        .await
        .unwrap_or(Preface::Closed)
}

const HTTP1_ANSWER: &str = "pullgate serves gRPC over HTTP/2 (prior knowledge) on this socket, for CRI clients \
such as kubelet or crictl; HTTP/1 requests are not served.\n";

/// A GOAWAY frame (last stream 0, PROTOCOL_ERROR) whose debug data says why.
fn goaway(reason: &[u8]) -> Vec<u8> {
    goaway_with(relay::frame::PROTOCOL_ERROR, reason)
}

/// A GOAWAY frame (last stream 0) with an error code and debug data.
fn goaway_with(code: u32, reason: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(17 + reason.len());
    relay::frame::put_goaway(&mut f, 0, code, reason);
    f
}

/// Writes a final answer, then reads and discards what the client sent until it closes (bounded),
/// so closing never discards unread input, which would reset the connection before the client
/// has read the answer.
async fn answer_and_close(mut stream: UnixStream, answer: &[u8]) {
    use tokio::io::AsyncReadExt;
    if stream.write_all(answer).await.is_err() {
        return;
    }
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let mut budget: usize = 1 << 20;
    let drain = async {
        while let Ok(n @ 1..) = stream.read(&mut sink).await {
            budget = budget.saturating_sub(n);
            if budget == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
}

/// Refuses a connection pullgate will not serve: a GOAWAY saying why, written if the socket takes
/// it at once, then closed (it holds no file descriptor for longer).
pub fn refuse(stream: UnixStream, reason: &str) {
    let frame = goaway_with(
        relay::frame::ENHANCE_YOUR_CALM,
        format!("pullgate: {reason}").as_bytes(),
    );
    let _ = stream.try_write(&frame);
}

/// Serves one accepted connection until the client closes it or `shutdown` turns true, after which
/// it sends GOAWAY and lets in-flight calls finish (the caller bounds how long).
///
/// pullgate closes the connection itself, the same graceful way, when it has had no open call for
/// the idle timeout or when the registry evicts it to make room ([`relay::serve`]).
pub async fn serve(
    proxy: Arc<Proxy>,
    limits: SessionLimits,
    stream: UnixStream,
    tracked: Conn,
    shutdown: watch::Receiver<bool>,
) {
    // A connection evicted while it has not even sent the preface goes at once.
    let preface = tokio::select! {
        p = peek_preface(&stream) => p,
        _ = tracked.close_requested() => return,
    };
    match preface {
        Preface::Http2 => {}
        Preface::Http1 => {
            let what = "answered 505 to an HTTP/1 request on the CRI socket";
            proxy
                .refusals()
                .refuse(Refusal::Http1, format_args!("{what}"));
            let answer = format!(
                "HTTP/1.1 505 HTTP Version Not Supported\r\ncontent-type: text/plain\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{HTTP1_ANSWER}",
                HTTP1_ANSWER.len()
            );
            answer_and_close(stream, answer.as_bytes()).await;
            return;
        }
        Preface::Garbage => {
            let what = "answered GOAWAY to a connection that did not start with the HTTP/2 preface";
            proxy
                .refusals()
                .refuse(Refusal::BadPreface, format_args!("{what}"));
            let frame = goaway(b"pullgate: expected the HTTP/2 connection preface (gRPC over h2c)");
            answer_and_close(stream, &frame).await;
            return;
        }
        Preface::Closed => return,
    }
    relay::serve(proxy, limits, stream, tracked, shutdown).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_prefaces() {
        assert_eq!(classify(PREFACE), Some(Preface::Http2));
        assert_eq!(classify(&PREFACE[..10]), None);
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Preface::Http1));
        assert_eq!(classify(b"POST /x HTTP/1.1"), Some(Preface::Http1));
        assert_eq!(classify(b"PO"), None);
        assert_eq!(classify(b"\x16\x03\x01\x02"), Some(Preface::Garbage));
        assert_eq!(classify(b"PRI * HTTP/1.1"), Some(Preface::Garbage));
        assert_eq!(
            classify(b"hello world, this is long"),
            Some(Preface::Garbage)
        );
    }

    #[test]
    fn goaway_frame_layout() {
        let f = goaway(b"why");
        assert_eq!(&f[..3], &[0, 0, 11]);
        assert_eq!(f[3], 7);
        assert_eq!(&f[13..17], &[0, 0, 0, 1]);
        assert_eq!(&f[17..], b"why");
    }
}
