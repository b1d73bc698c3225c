//! The layer over byte streams a client could send, delivered in every possible way: the output is
//! decoded as the server would decode it and compared with what the client meant.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use super::reader::{
    CONTINUATION, END_HEADERS, END_STREAM, FRAME_HEADER, HEADERS, MIN_MAX_FRAME_SIZE, PADDED,
    PRIORITY,
};
use super::*;
use crate::node::metrics::Metrics;

type Fields = Vec<(Vec<u8>, Vec<u8>)>;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A client-side HPACK encoder that inserts every field into its dynamic table and refers to it
/// by index afterwards, as grpc-go and Python's `hpack` do for repeated headers.
#[derive(Default)]
struct IndexingEncoder {
    table: Vec<(Vec<u8>, Vec<u8>)>, // newest first
}

impl IndexingEncoder {
    fn encode(&mut self, fields: &Fields) -> Vec<u8> {
        let mut out = Vec::new();
        for (n, v) in fields {
            if let Some(i) = self.table.iter().position(|(tn, tv)| tn == n && tv == v) {
                hpack::put_int(&mut out, 0x80, 7, 62 + i);
            } else {
                out.push(0x40);
                hpack::put_int(&mut out, 0, 7, n.len());
                out.extend_from_slice(n);
                hpack::put_int(&mut out, 0, 7, v.len());
                out.extend_from_slice(v);
                self.table.insert(0, (n.clone(), v.clone()));
            }
        }
        let size: usize = self.table.iter().map(|(n, v)| n.len() + v.len() + 32).sum();
        assert!(size <= 4096, "the test encoder does not evict");
        out
    }
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn request(authority: Option<&[u8]>, n: usize) -> Fields {
    let mut f: Fields = vec![
        (b":method".to_vec(), b"POST".to_vec()),
        (b":scheme".to_vec(), b"http".to_vec()),
        (
            b":path".to_vec(),
            b"/runtime.v1.RuntimeService/Version".to_vec(),
        ),
    ];
    if let Some(a) = authority {
        f.push((b":authority".to_vec(), a.to_vec()));
    }
    f.push((b"content-type".to_vec(), b"application/grpc".to_vec()));
    f.push((b"te".to_vec(), b"trailers".to_vec()));
    f.push((b"x-call".to_vec(), format!("{n}").into_bytes()));
    f
}

/// What the client sends: the preface, SETTINGS, then for each authority a request whose header
/// block is alternately one frame, or split over CONTINUATION frames with padding and priority,
/// followed by a DATA frame and trailers on odd calls. Returns the bytes and the meant blocks.
fn client(authorities: &[Option<&[u8]>]) -> (Vec<u8>, Vec<Fields>, Vec<Vec<u8>>) {
    let mut enc = IndexingEncoder::default();
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]));
    let (mut blocks, mut data) = (Vec::new(), Vec::new());
    for (i, a) in authorities.iter().enumerate() {
        let stream = 1 + 2 * i as u32;
        let fields = request(*a, i);
        let block = enc.encode(&fields);
        if i % 2 == 0 {
            bytes.extend(frame(HEADERS, END_HEADERS, stream, &block));
        } else {
            let (head, rest) = block.split_at(7);
            let mut p = vec![3u8]; // pad length
            p.extend_from_slice(&[0, 0, 0, 0, 15]); // priority: depends on 0, weight 16
            p.extend_from_slice(head);
            p.extend_from_slice(&[0; 3]);
            bytes.extend(frame(HEADERS, PADDED | PRIORITY, stream, &p));
            let chunks: Vec<&[u8]> = rest.chunks(5).collect();
            for (j, c) in chunks.iter().enumerate() {
                let flags = if j + 1 == chunks.len() {
                    END_HEADERS
                } else {
                    0
                };
                bytes.extend(frame(CONTINUATION, flags, stream, c));
            }
        }
        blocks.push(fields);
        let body = format!("\0\0\0\0\x05hello{i}").into_bytes();
        bytes.extend(frame(
            0x0,
            if i % 2 == 0 { END_STREAM } else { 0 },
            stream,
            &body,
        ));
        data.push(body);
        if i % 2 == 1 {
            let trailers: Fields = vec![(b"x-trailer".to_vec(), b"t".to_vec())];
            bytes.extend(frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                stream,
                &enc.encode(&trailers),
            ));
            blocks.push(trailers);
        }
        // A frame the layer must not look into: a PING whose payload looks like a HEADERS frame.
        bytes.extend(frame(0x6, 0, 0, &frame(HEADERS, 0, 1, &[])[1..]));
    }
    (bytes, blocks, data)
}

/// A client socket that delivers `data` in reads of at most `chunk` bytes, or, with `cut`, in two
/// reads: everything before `cut`, then the rest.
struct Chunked {
    data: Vec<u8>,
    pos: usize,
    chunk: usize,
    cut: Option<usize>,
}

impl AsyncRead for Chunked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let end = match self.cut {
            Some(cut) if self.pos < cut => cut,
            Some(_) => self.data.len(),
            None => (self.pos + self.chunk).min(self.data.len()),
        };
        let n = (end - self.pos).min(buf.remaining());
        let pos = self.pos;
        buf.put_slice(&self.data[pos..pos + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Chunked {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// What the server reads through the layer, with reads of at most `read` bytes.
fn through(bytes: &[u8], chunk: usize, read: usize) -> (Vec<u8>, Mode, Arc<Metrics>) {
    through_io(
        Chunked {
            data: bytes.to_vec(),
            pos: 0,
            chunk,
            cut: None,
        },
        read,
    )
}

fn through_io(io: Chunked, read: usize) -> (Vec<u8>, Mode, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::default());
    let refusals = Arc::new(Refusals::new(metrics.clone()));
    let (mut fix, _) = H2Fix::new(io, LIMITS, refusals);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let out = rt.block_on(async {
        let mut out = Vec::new();
        let mut buf = vec![0u8; read];
        loop {
            let n = fix.read(&mut buf).await.unwrap();
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n]);
        }
    });
    (out, fix.mode(), metrics)
}

/// The server's view of a byte stream: header blocks decoded with one table, DATA payloads, and
/// the size of every frame.
struct ServerView {
    blocks: Vec<Fields>,
    data: Vec<Vec<u8>>,
    max_frame: usize,
    /// END_STREAM flags of the HEADERS frames, in order.
    end_stream: Vec<bool>,
    priorities: usize,
}

fn server_view(bytes: &[u8]) -> ServerView {
    assert!(bytes.starts_with(PREFACE));
    let mut rest = &bytes[PREFACE.len()..];
    let mut decoder = loona_hpack::Decoder::new();
    let mut v = ServerView {
        blocks: Vec::new(),
        data: Vec::new(),
        max_frame: 0,
        end_stream: Vec::new(),
        priorities: 0,
    };
    let mut block: Option<Vec<u8>> = None;
    while !rest.is_empty() {
        let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
        let (kind, flags) = (rest[3], rest[4]);
        let mut payload = &rest[FRAME_HEADER..FRAME_HEADER + len];
        rest = &rest[FRAME_HEADER + len..];
        v.max_frame = v.max_frame.max(len);
        match kind {
            HEADERS => {
                assert!(block.is_none(), "HEADERS inside a block");
                let mut pad = 0;
                if flags & PADDED != 0 {
                    pad = payload[0] as usize;
                    payload = &payload[1..];
                }
                if flags & PRIORITY != 0 {
                    v.priorities += 1;
                    payload = &payload[5..];
                }
                v.end_stream.push(flags & END_STREAM != 0);
                block = Some(payload[..payload.len() - pad].to_vec());
            }
            CONTINUATION => block
                .as_mut()
                .expect("CONTINUATION outside a block")
                .extend_from_slice(payload),
            0x0 => v.data.push(payload.to_vec()),
            _ => {}
        }
        if (kind == HEADERS || kind == CONTINUATION) && flags & END_HEADERS != 0 {
            let b = block.take().unwrap();
            v.blocks.push(
                decoder
                    .decode(&b)
                    .expect("the server can decode every block"),
            );
        }
    }
    v
}

fn fixed(blocks: &[Fields]) -> Vec<Fields> {
    blocks
        .iter()
        .map(|b| {
            b.iter()
                .map(|(n, v)| {
                    let bad = n == b":authority" && http::uri::Authority::try_from(&v[..]).is_err();
                    let v = if bad {
                        REPLACEMENT_AUTHORITY.to_vec()
                    } else {
                        v.clone()
                    };
                    (n.clone(), v)
                })
                .collect()
        })
        .collect()
}

#[test]
fn valid_authorities_pass_byte_for_byte_however_the_input_is_cut() {
    let (bytes, _, _) = client(&[Some(b"localhost"), None, Some(b"localhost"), Some(b"h:1")]);
    for chunk in 1..=bytes.len() {
        for read in [1, 13, 4096] {
            let (out, mode, _) = through(&bytes, chunk, read);
            assert_eq!(mode, Mode::Transparent);
            assert!(out == bytes, "chunk {chunk}, read {read}");
        }
    }
}

#[test]
fn bad_authorities_are_replaced_and_the_table_stays_consistent_however_the_input_is_cut() {
    let authorities: [Option<&[u8]>; 7] = [
        Some(b"localhost"),
        Some(b"localhost"),
        Some(b"/run/pullgate/pullgate.sock"),
        Some(b"/run/pullgate/pullgate.sock"),
        None,
        Some(b"%2Frun%2Fpullgate.sock"),
        Some(b"\xff bytes"),
    ];
    let (bytes, blocks, data) = client(&authorities);
    let want = fixed(&blocks);
    let mut first: Option<Vec<u8>> = None;
    for chunk in 1..=bytes.len() {
        for read in [1, 13, 4096] {
            let (out, mode, _) = through(&bytes, chunk, read);
            assert_eq!(mode, Mode::Reencode);
            match &first {
                None => {
                    let view = server_view(&out);
                    assert_eq!(view.blocks, want);
                    assert_eq!(view.data, data);
                    assert!(view.max_frame <= MIN_MAX_FRAME_SIZE);
                    assert_eq!(view.end_stream.len(), want.len());
                    // Blocks before the switch keep their priority; re-encoded ones keep it too.
                    assert_eq!(view.priorities, 3);
                    first = Some(out);
                }
                Some(f) => assert!(&out == f, "chunk {chunk}, read {read}"),
            }
        }
    }
}

#[test]
fn every_split_point_of_a_stream_gives_the_same_server_view() {
    let (bytes, blocks, _) = client(&[Some(b"localhost"), Some(b"/x.sock"), Some(b"/x.sock")]);
    let want = fixed(&blocks);
    for cut in 1..bytes.len() {
        let io = Chunked {
            data: bytes.clone(),
            pos: 0,
            chunk: 0,
            cut: Some(cut),
        };
        let (out, _, _) = through_io(io, 1 << 16);
        assert_eq!(server_view(&out).blocks, want, "cut at {cut}");
    }
}

#[test]
fn large_re_encoded_blocks_are_split_into_frames_the_server_accepts() {
    let mut fields = request(Some(b"/run/x.sock"), 0);
    fields.push((b"x-big".to_vec(), vec![b'a'; 40_000]));
    let mut enc = IndexingEncoder::default();
    let mut block = Vec::new();
    // Too big for the indexing encoder's table: send it as one literal without indexing.
    for (n, v) in &fields {
        if n == b"x-big" {
            hpack::put_literal(&mut block, n, v);
        } else {
            block.extend(enc.encode(&vec![(n.clone(), v.clone())]));
        }
    }
    let mut bytes = PREFACE.to_vec();
    let chunks: Vec<&[u8]> = block.chunks(MIN_MAX_FRAME_SIZE).collect();
    for (i, c) in chunks.iter().enumerate() {
        let kind = if i == 0 { HEADERS } else { CONTINUATION };
        let mut flags = if i + 1 == chunks.len() {
            END_HEADERS
        } else {
            0
        };
        if i == 0 {
            flags |= END_STREAM;
        }
        bytes.extend(frame(kind, flags, 1, c));
    }
    let (out, mode, _) = through(&bytes, 4096, 16384);
    assert_eq!(mode, Mode::Reencode);
    let view = server_view(&out);
    assert_eq!(view.blocks, fixed(&[fields]));
    assert_eq!(view.end_stream, vec![true]);
    assert!(view.max_frame <= MIN_MAX_FRAME_SIZE);
}

/// Output after the client's bytes: it must end with the frame that makes the server close.
fn refused(bytes: &[u8]) -> (Vec<u8>, String) {
    let (out, _, metrics) = through(bytes, 7, 4096);
    (out, metrics.render(0, None, false))
}

const POISON: [u8; 9] = [0, 0, 0, CONTINUATION, END_HEADERS, 0, 0, 0, 1];

#[test]
fn header_block_violations_are_refused_and_counted() {
    let mut enc = IndexingEncoder::default();
    let block = enc.encode(&request(Some(b"localhost"), 0));
    let start = || PREFACE.to_vec();
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    // A DATA frame inside a header block.
    let mut b = start();
    b.extend(frame(HEADERS, 0, 1, &block[..4]));
    b.extend(frame(0x0, 0, 1, b"x"));
    cases.push(("DATA inside a block", b));
    // A CONTINUATION on another stream.
    let mut b = start();
    b.extend(frame(HEADERS, 0, 1, &block[..4]));
    b.extend(frame(CONTINUATION, END_HEADERS, 3, &block[4..]));
    cases.push(("CONTINUATION on another stream", b));
    // A CONTINUATION with no block open.
    let mut b = start();
    b.extend(frame(CONTINUATION, END_HEADERS, 1, &block));
    cases.push(("stray CONTINUATION", b));
    // More padding than payload.
    let mut b = start();
    b.extend(frame(HEADERS, END_HEADERS | PADDED, 1, &[200, 0x82]));
    cases.push(("padding", b));
    // A block over the limit.
    let mut b = start();
    b.extend(frame(HEADERS, 0, 1, &block[..4]));
    for _ in 0..(LIMITS.max_header_list_size / 16_000 + 1) {
        b.extend(frame(CONTINUATION, 0, 1, &[0x82; 16_000]));
    }
    cases.push(("oversized block", b));
    for (what, bytes) in cases {
        let (out, metrics) = refused(&bytes);
        assert!(out.ends_with(&POISON), "{what}: {out:?}");
        assert!(
            metrics.contains("pullgate_protocol_refusals_total{reason=\"bad_header_block\"} 1"),
            "{what}: {metrics}"
        );
    }
}

#[test]
fn undecodable_blocks_are_refused_once_re_encoding() {
    let mut enc = IndexingEncoder::default();
    let mut bytes = PREFACE.to_vec();
    let block = enc.encode(&request(Some(b"/x.sock"), 0));
    bytes.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &block));
    // Index 200 is in no table.
    bytes.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &[0xff, 0x49]));
    let (out, metrics) = refused(&bytes);
    assert!(out.ends_with(&POISON));
    assert!(
        metrics.contains("reason=\"bad_header_block\"} 1"),
        "{metrics}"
    );
}

#[test]
fn undecodable_blocks_pass_unchanged_while_transparent() {
    // The server decodes it itself (and refuses it); the layer stops interpreting.
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &[0xff, 0x49]));
    bytes.extend(frame(0x0, 0, 1, b"after"));
    let (out, mode, metrics) = through(&bytes, 3, 4096);
    assert_eq!(out, bytes);
    assert_eq!(mode, Mode::Blind);
    assert!(
        !metrics
            .render(0, None, false)
            .contains("pullgate_protocol_refusals_total{")
    );
}

/// The layer's limits must be the server's: read the SETTINGS pullgate's HTTP/2 server sends.
#[tokio::test]
async fn limits_match_the_settings_the_server_sends() {
    use tokio::io::AsyncWriteExt;
    let (mut client, server) = tokio::io::duplex(1 << 16);
    let builder = crate::node::proxy::conn::server_builder(&crate::node::config::Limits::default());
    let svc = hyper::service::service_fn(|_req| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(
            http_body_util::Empty::<bytes::Bytes>::new(),
        ))
    });
    let task = tokio::spawn(async move {
        let _ = builder
            .serve_connection(hyper_util::rt::TokioIo::new(server), svc)
            .await;
    });
    client.write_all(PREFACE).await.unwrap();
    client.write_all(&frame(0x4, 0, 0, &[])).await.unwrap();
    let mut head = [0u8; FRAME_HEADER];
    client.read_exact(&mut head).await.unwrap();
    assert_eq!(head[3], 0x4, "the server speaks first with SETTINGS");
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    client.read_exact(&mut payload).await.unwrap();
    let mut settings = std::collections::HashMap::new();
    for s in payload.chunks(6) {
        let id = u16::from_be_bytes([s[0], s[1]]);
        settings.insert(id, u32::from_be_bytes([s[2], s[3], s[4], s[5]]) as usize);
    }
    // SETTINGS_HEADER_TABLE_SIZE (default 4096), SETTINGS_MAX_HEADER_LIST_SIZE,
    // SETTINGS_MAX_FRAME_SIZE (default 16384; re-encoded frames never exceed the minimum).
    assert_eq!(
        settings.get(&0x1).copied().unwrap_or(4096),
        LIMITS.header_table_size
    );
    assert_eq!(
        settings.get(&0x6).copied(),
        Some(LIMITS.max_header_list_size)
    );
    assert!(settings.get(&0x5).copied().unwrap_or(16_384) >= MIN_MAX_FRAME_SIZE);
    task.abort();
}
