//! pullgate's unix sockets to kubelet and containerd, registered with the event loop for
//! readability only: the relay's halves ([`Rx`], [`Tx`]) and a stream for the `h2` client of
//! pullgate's own lookups ([`Stream`]).
//!
//! Writes go straight to the socket; only a write that finds the socket's buffer full registers
//! (a duplicate of) the socket for writability, until what waited is written.
//!
//! Why not a `tokio::net::UnixStream`: it registers every socket for both, edge-triggered, and a
//! unix socket signals "writable" to its writer each time the peer reads. A relay writes a
//! request to containerd and sleeps; containerd reading it woke pullgate once for nothing before
//! its answer woke it again, and the same on kubelet's side: about four wake-ups per relayed call
//! where two do the work.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// The reading half of one side's socket and what was read but not yet taken.
pub struct Rx {
    sock: Arc<AsyncFd<UnixStream>>,
    pub input: BytesMut,
}

/// The writing half of one side's socket and what waits to be written.
pub struct Tx {
    sock: Arc<AsyncFd<UnixStream>>,
    /// Registered for writability while a write found the socket full.
    blocked: Option<AsyncFd<UnixStream>>,
    pub out: Vec<u8>,
    pub written: usize,
}

/// Registers `stream` (non-blocking) with the runtime for readability and splits it.
pub fn split(stream: UnixStream) -> io::Result<(Rx, Tx)> {
    stream.set_nonblocking(true)?;
    let sock = Arc::new(register(stream, Interest::READABLE)?);
    let rx = Rx {
        sock: sock.clone(),
        input: BytesMut::with_capacity(32 * 1024),
    };
    let tx = Tx {
        sock,
        blocked: None,
        out: Vec::with_capacity(32 * 1024),
        written: 0,
    };
    Ok((rx, tx))
}

/// One read(2) into `buf`, retried if interrupted.
fn read_into(fd: RawFd, buf: &mut [std::mem::MaybeUninit<u8>]) -> io::Result<usize> {
    loop {
        // SAFETY: read(2) writes at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// One send(2) of `data`, retried if interrupted (`MSG_NOSIGNAL`: a closed peer is an error, not
/// a signal).
fn send(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: send(2) reads at most `data.len()` bytes of `data`.
        let n = unsafe { libc::send(fd, data.as_ptr().cast(), data.len(), libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn register(stream: UnixStream, interest: Interest) -> io::Result<AsyncFd<UnixStream>> {
    // SAFETY: a `UnixStream` owns its descriptor: open, and the same one, for as long as it lives.
    Ok(unsafe { AsyncFd::register_with_interest(stream, interest) }?)
}

/// One read into `spare` from a socket reported readable; `None` if it had nothing after all
/// (readiness cleared: wait for the next edge). A short read empties the socket, so readiness is
/// cleared then too, as tokio does.
fn read_ready(
    ready: &mut AsyncFdReadyGuard<'_, UnixStream>,
    spare: &mut [std::mem::MaybeUninit<u8>],
) -> Option<io::Result<usize>> {
    let room = spare.len();
    match read_into(ready.get_inner().as_raw_fd(), spare) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            ready.clear_ready();
            None
        }
        Ok(n) if n > 0 && n < room => {
            ready.clear_ready();
            Some(Ok(n))
        }
        r => Some(r),
    }
}

/// The writability registration of `sock` (a duplicate of it), made on the first write that found
/// it full.
fn blocked_on<'a>(
    blocked: &'a mut Option<AsyncFd<UnixStream>>,
    sock: &UnixStream,
) -> io::Result<&'a AsyncFd<UnixStream>> {
    match blocked {
        Some(b) => Ok(b),
        None => Ok(blocked.insert(register(sock.try_clone()?, Interest::WRITABLE)?)),
    }
}

impl Rx {
    /// Reads what the socket has into [`Rx::input`] (into its spare capacity: reserve first);
    /// `Ok(0)` at the end of the stream.
    pub async fn read(&mut self) -> io::Result<usize> {
        loop {
            let mut ready = self.sock.readable().await?;
            if let Some(r) = read_ready(&mut ready, self.input.spare_capacity_mut()) {
                let n = r?;
                // SAFETY: read(2) initialised the first `n` bytes of the spare capacity.
                unsafe { self.input.set_len(self.input.len() + n) };
                return Ok(n);
            }
        }
    }
}

impl Tx {
    pub fn pending(&self) -> usize {
        self.out.len() - self.written
    }

    /// Writes as much of what waits as the socket takes, waiting only while it takes nothing.
    pub async fn write(&mut self) -> io::Result<usize> {
        loop {
            match self.try_write() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return r,
            }
            let blocked = blocked_on(&mut self.blocked, self.sock.get_ref())?;
            blocked.writable().await?.clear_ready();
        }
    }

    /// One non-blocking write of what waits.
    pub fn try_write(&mut self) -> io::Result<usize> {
        let n = send(self.sock.get_ref().as_raw_fd(), &self.out[self.written..])?;
        self.wrote(n);
        Ok(n)
    }

    fn wrote(&mut self, n: usize) {
        self.written += n;
        if self.written == self.out.len() {
            self.out.clear();
            self.written = 0;
            // Nothing waits: the writability registration would only wake the loop for nothing.
            self.blocked = None;
            if self.out.capacity() > 4 * 1024 * 1024 {
                self.out = Vec::with_capacity(32 * 1024);
            }
        }
    }

    /// Writes everything that waits.
    pub async fn write_all(&mut self) -> io::Result<()> {
        while self.pending() > 0 {
            if self.write().await? == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
        }
        Ok(())
    }

    /// Ends the write side (the peer reads the end of the stream).
    pub fn shutdown(&self) -> io::Result<()> {
        self.sock.get_ref().shutdown(Shutdown::Write)
    }
}

/// A unix stream for an `h2` connection (pullgate's own calls to containerd), read and written
/// like the relay's sockets.
pub struct Stream {
    sock: AsyncFd<UnixStream>,
    /// Registered for writability while a write found the socket full.
    blocked: Option<AsyncFd<UnixStream>>,
}

impl Stream {
    pub fn new(stream: UnixStream) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Stream {
            sock: register(stream, Interest::READABLE)?,
            blocked: None,
        })
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut ready = ready!(self.sock.poll_read_ready(cx))?;
            // SAFETY: only initialised bytes are marked filled (`assume_init` with what read(2)
            // wrote), and nothing is de-initialised.
            if let Some(r) = read_ready(&mut ready, unsafe { buf.unfilled_mut() }) {
                let n = r?;
                // SAFETY: read(2) initialised the first `n` unfilled bytes.
                unsafe { buf.assume_init(n) };
                buf.advance(n);
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            match send(this.sock.get_ref().as_raw_fd(), data) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => {
                    this.blocked = None;
                    return Poll::Ready(r);
                }
            }
            let blocked = blocked_on(&mut this.blocked, this.sock.get_ref())?;
            ready!(blocked.poll_write_ready(cx))?.clear_ready();
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.sock.get_ref().shutdown(Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_socket_is_waited_out_and_everything_arrives() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut rx, _keep) = split(b).unwrap();
        let (_a_rx, mut tx) = split(a).unwrap();
        // Far more than a unix socket buffers: the writer must wait for the reader.
        let sent: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
        tx.out.extend_from_slice(&sent);
        let writer = async {
            tx.write_all().await.unwrap();
            assert!(tx.blocked.is_none(), "registration dropped once drained");
            tx.shutdown().unwrap();
        };
        let reader = async {
            let mut got = Vec::new();
            loop {
                rx.input.reserve(64 * 1024);
                match rx.read().await.unwrap() {
                    0 => break got,
                    _ => got.extend_from_slice(&rx.input.split()),
                }
            }
        };
        let ((), got) = tokio::join!(writer, reader);
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "bytes arrive in order, none lost");
    }

    #[tokio::test]
    async fn a_stream_carries_more_than_a_socket_buffers_both_ways() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Stream::new(a).unwrap(), Stream::new(b).unwrap());
        let sent: Vec<u8> = (0..4u32 << 20).map(|i| (i % 253) as u8).collect();
        let writer = async {
            a.write_all(&sent).await.unwrap();
            assert!(a.blocked.is_none(), "registration dropped once written");
            a.shutdown().await.unwrap();
            a
        };
        let reader = async {
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.unwrap();
            got
        };
        let (_a, got) = tokio::join!(writer, reader);
        assert!(got == sent, "bytes arrive in order, none lost");
    }

    #[tokio::test]
    async fn a_write_to_a_closed_peer_is_an_error() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let (_rx, mut tx) = split(a).unwrap();
        tx.out.extend_from_slice(b"hello");
        assert!(tx.write().await.is_err());
    }
}
