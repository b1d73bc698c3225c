//! Bounded under abuse: memory, connections and time.
//!
//! The floods run against a real `pullgate serve` process (its resident memory and open file
//! descriptors are read from /proc), in front of an in-process fake CRI server; the connection cap
//! and keepalive run against an in-process server. Every client loop is bounded in count and time.

mod fake_cri;
mod support;

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fake_cri::*;
use k8s_cri::v1 as cri;
use pullgate::node::config::{Config, Limits};
use pullgate::node::daemon::{Control, RunSummary, Server};
use pullgate::node::metrics::Metrics;
use pullgate::node::proxy::{InterceptTable, Proxy, Reach, Upstream};
use support::Pullgate;
use tokio::sync::mpsc;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame: with the preface, all an idle HTTP/2 client sends.
const EMPTY_SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];
const PULL_IMAGE: &str = "/runtime.v1.ImageService/PullImage";
const CREATE_CONTAINER: &str = "/runtime.v1.RuntimeService/CreateContainer";
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// A kilobyte count from a /proc/PID/status line such as `VmHWM:   12345 kB`.
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Raises this process's open-file limit (children inherit it); the tests run as root.
fn raise_nofile(n: u64) {
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: setrlimit with a valid pointer to a local rlimit.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    assert_eq!(
        rc,
        0,
        "cannot raise RLIMIT_NOFILE to {n} (these tests run as root): {}",
        std::io::Error::last_os_error()
    );
}

/// Connects and calls `Version`, which must be answered within `limit`; returns how long it took.
async fn version_within(path: &Path, limit: Duration) -> Duration {
    let t = Instant::now();
    version(path).await;
    let took = t.elapsed();
    assert!(took < limit, "Version took {took:?}, more than {limit:?}");
    took
}

async fn version(path: &Path) -> cri::VersionResponse {
    let ch = cri_channel(path).await;
    runtime_client(ch)
        .version(cri::VersionRequest {
            version: "v1".into(),
        })
        .await
        .expect("Version is answered")
        .into_inner()
}

/// How a stalled call ended: its gRPC status code and message (`None`: no answer in time).
type Ended = Option<(String, String)>;

/// Starts a call of `method` on `client` whose body announces a message of `announced` bytes,
/// pushes up to `push` bytes of it as fast as flow control lets it (until `push_until`), then stalls
/// with the stream open and waits (up to `answer_within`) for pullgate's answer.
async fn stalled_call(
    client: h2::client::SendRequest<Bytes>,
    method: &'static str,
    announced: u32,
    push: usize,
    push_until: tokio::time::Instant,
    answer_within: Duration,
) -> Ended {
    let mut client = client.ready().await.ok()?;
    let mut req = http::Request::post(format!("http://localhost{method}"))
        .body(())
        .unwrap();
    *req.headers_mut() = grpc_headers();
    let (resp, mut body) = client.send_request(req, false).ok()?;
    let mut prefix = vec![0u8];
    prefix.extend_from_slice(&announced.to_be_bytes());
    body.send_data(Bytes::from(prefix), false).ok()?;
    let mut sent = 0;
    while sent < push {
        body.reserve_capacity(ZEROS.len().min(push - sent));
        let cap = tokio::time::timeout_at(
            push_until,
            std::future::poll_fn(|cx| body.poll_capacity(cx)),
        )
        .await;
        let n = match cap {
            Ok(Some(Ok(n))) if n > 0 => n.min(push - sent),
            // Reset, closed, or out of time: stop pushing, keep the stream.
            _ => break,
        };
        if body
            .send_data(Bytes::from_static(&ZEROS[..n]), false)
            .is_err()
        {
            break;
        }
        sent += n;
    }
    let resp = tokio::time::timeout(answer_within, resp).await.ok()?.ok()?;
    let status_of = |h: &http::HeaderMap| {
        let code = h.get("grpc-status")?.to_str().ok()?.to_owned();
        let msg = h
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .unwrap_or("")
            .to_owned();
        Some((code, msg))
    };
    if let Some(s) = status_of(resp.headers()) {
        return Some(s);
    }
    let mut resp = resp.into_body();
    while let Some(d) = resp.data().await {
        let _ = d.map(|d| resp.flow_control().release_capacity(d.len()));
    }
    let trailers = resp.trailers().await.ok()??;
    status_of(&trailers)
}

async fn h2_client(path: &Path) -> h2::client::SendRequest<Bytes> {
    let stream = tokio::net::UnixStream::connect(path)
        .await
        .expect("connect");
    let (client, conn) = h2::client::handshake(stream).await.expect("h2 handshake");
    tokio::spawn(conn);
    client
}

/// `conns` connections with `per_conn` stalled calls each (see [`stalled_call`]).
async fn flood(
    path: &Path,
    conns: usize,
    per_conn: usize,
    method: &'static str,
    announced: u32,
    push: usize,
    answer_within: Duration,
) -> tokio::task::JoinSet<Ended> {
    let push_until = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..conns {
        let client = h2_client(path).await;
        for _ in 0..per_conn {
            calls.spawn(stalled_call(
                client.clone(),
                method,
                announced,
                push,
                push_until,
                answer_within,
            ));
        }
    }
    calls
}

/// A memory flood: four connections each holding 48 incomplete 16 MiB `PullImage` bodies, then
/// the same with `CreateContainer` announcing just under its 4 MiB cap (so the global budget has to
/// hold), keep a
/// real pullgate under 256 MiB of resident memory while `Version` keeps being answered, and every
/// stalled call ends with a status that says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_body_floods_stay_within_memory_and_version_is_answered() {
    let tmp = tempfile::tempdir().unwrap();
    let (fake, _events) = FakeCri::new();
    let upstream = fake.serve(&tmp.path().join("cri.sock"));
    // Default limits: 64 MiB body budget, 1 s budget wait, 10 s body read timeout.
    let pg = Pullgate::start(tmp.path(), &upstream.path, "");
    let pid = pg.pid();
    let started_hwm = proc_status_kib(pid, "VmHWM:");

    // PullImage: 16 MiB announced, up to 16 MiB - 1 pushed, then stalled.
    let mut calls = flood(
        &pg.socket,
        4,
        48,
        PULL_IMAGE,
        16 << 20,
        (16 << 20) - 1,
        Duration::from_secs(15),
    )
    .await;
    version_within(&pg.socket, Duration::from_secs(2)).await;
    let mut pulls = Vec::new();
    while let Some(r) = calls.join_next().await {
        pulls.push(r.unwrap());
    }
    for ended in &pulls {
        let (code, msg) = ended.as_ref().expect("every stalled PullImage is answered");
        assert_eq!(code, "8", "{msg}");
        assert!(
            msg.contains("server.limits.max_pull_image_message"),
            "{msg}"
        );
    }

    // CreateContainer: within its cap, so each reserves ~4 MiB of the 64 MiB budget; 2 MiB pushed.
    let announced = (4 << 20) - 16;
    let mut calls = flood(
        &pg.socket,
        4,
        48,
        CREATE_CONTAINER,
        announced,
        2 << 20,
        Duration::from_secs(20),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    version_within(&pg.socket, Duration::from_secs(2)).await;
    let (mut budget, mut timed_out) = (0, 0);
    while let Some(r) = calls.join_next().await {
        let (code, msg) = r
            .unwrap()
            .expect("every stalled CreateContainer is answered");
        match code.as_str() {
            "8" => {
                assert!(msg.contains("server.limits.body_budget"), "{msg}");
                budget += 1;
            }
            "4" => {
                assert!(msg.contains("server.limits.body_read_timeout"), "{msg}");
                assert!(
                    msg.contains(&format!("of its {} bytes", announced + 5)),
                    "{msg}"
                );
                timed_out += 1;
            }
            other => panic!("unexpected status {other}: {msg}"),
        }
    }
    // Sixteen 4 MiB messages fit in the budget; the rest waited 1 s and were refused.
    assert!(
        (1..=32).contains(&timed_out),
        "{timed_out} timed out, {budget} refused"
    );
    assert_eq!(budget + timed_out, 4 * 48);
    // Everything given back: the next call is served normally.
    version(&pg.socket).await;

    let hwm = proc_status_kib(pid, "VmHWM:");
    assert!(
        hwm < 256 * 1024,
        "peak resident memory {hwm} KiB (at start {started_hwm} KiB) is over 256 MiB"
    );
    let log = pg.log_contents();
    assert!(!log.contains("panicked"), "{log}");
    support::loud(&format!(
        "stalled-body floods: peak RSS {:.1} MiB (at start {:.1} MiB); CreateContainer: {timed_out} timed out, {budget} over budget",
        hwm as f64 / 1024.0,
        started_hwm as f64 / 1024.0
    ));
    upstream.stop().await;
}

/// Opens a connection that sends the HTTP/2 preface and an empty SETTINGS frame, then nothing. The
/// writes may fail when pullgate refuses the connection at once (what it answered is still there to
/// read); the callers check what became of the connection.
fn idle_connection(path: &Path) -> std::os::unix::net::UnixStream {
    let mut s = std::os::unix::net::UnixStream::connect(path).expect("connect");
    let _ = s
        .write_all(PREFACE)
        .and_then(|()| s.write_all(&EMPTY_SETTINGS));
    s
}

/// Reads a connection until the peer closes it (or `within` passes); returns the HTTP/2 frame types
/// received, and whether it was closed.
fn frames_until_closed(
    s: &mut std::os::unix::net::UnixStream,
    within: Duration,
) -> (Vec<u8>, bool) {
    let deadline = Instant::now() + within;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    let mut types = Vec::new();
    let mut at = 0;
    while at + 9 <= bytes.len() {
        let len = u32::from_be_bytes([0, bytes[at], bytes[at + 1], bytes[at + 2]]) as usize;
        types.push(bytes[at + 3]);
        at += 9 + len;
    }
    (types, closed)
}

const GOAWAY: u8 = 7;
const PING: u8 = 6;

/// 5,000 idle HTTP/2 connections: a new client's `Version` is still answered within a second, and
/// every idle connection is closed (GOAWAY, then the socket) after the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_idle_connections_then_all_closed_when_idle() {
    const IDLE: usize = 5000;
    raise_nofile(16384);
    let tmp = tempfile::tempdir().unwrap();
    let (fake, _events) = FakeCri::new();
    let upstream = fake.serve(&tmp.path().join("cri.sock"));
    let pg = Pullgate::start(
        tmp.path(),
        &upstream.path,
        "[server.limits]\nmax_connections = 6000\nidle_timeout = \"15s\"\n",
    );
    let pid = pg.pid();
    let base_fds = open_fds(pid);
    let socket = pg.socket.clone();
    let opened_at = Instant::now();
    let mut idle = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut v = Vec::with_capacity(IDLE);
        while v.len() < IDLE && Instant::now() < deadline {
            v.push(idle_connection(&socket));
        }
        v
    })
    .await
    .unwrap();
    assert_eq!(
        idle.len(),
        IDLE,
        "could not open {IDLE} connections in 60 s"
    );
    // pullgate holds all of them.
    let deadline = Instant::now() + Duration::from_secs(20);
    while open_fds(pid) < IDLE && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let held = open_fds(pid);
    assert!(
        held >= IDLE,
        "pullgate holds {held} fds, started with {base_fds}; its log:\n{}",
        support::tail(&pg.log, 30)
    );
    assert!(
        opened_at.elapsed() < Duration::from_secs(10),
        "opening took {:?}: too slow to check before the 15 s idle timeout",
        opened_at.elapsed()
    );
    // Let pullgate finish the HTTP/2 handshakes of the last ones: they are idle from then on.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let took = version_within(&pg.socket, Duration::from_secs(1)).await;

    // After the idle timeout (and the 2 s the clients get to take the GOAWAY), all are gone.
    let deadline = Instant::now() + Duration::from_secs(40);
    while open_fds(pid) > base_fds + 16 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let left = open_fds(pid);
    assert!(
        left <= base_fds + 16,
        "pullgate still holds {left} fds (started with {base_fds})"
    );
    let results = tokio::task::spawn_blocking(move || {
        idle.iter_mut()
            .map(|s| frames_until_closed(s, Duration::from_secs(5)))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for (i, (types, closed)) in results.iter().enumerate() {
        assert!(closed, "connection {i} is still open: frames {types:?}");
        assert!(
            types.contains(&GOAWAY),
            "connection {i} closed without GOAWAY: {types:?}"
        );
    }
    let metrics = pg.log_contents();
    assert!(!metrics.contains("accept failed"), "{metrics}");
    support::loud(&format!(
        "{IDLE} idle connections: Version answered in {:.1} ms",
        took.as_secs_f64() * 1e3
    ));
    upstream.stop().await;
}

/// An in-process pullgate in front of `upstream` with the given limits.
struct InProcess {
    listen: std::path::PathBuf,
    metrics: Arc<Metrics>,
    control: mpsc::Sender<Control>,
    task: tokio::task::JoinHandle<RunSummary>,
}

impl InProcess {
    fn start(dir: &Path, upstream: &Path, limits: Limits) -> InProcess {
        let mut cfg = Config::default().server;
        cfg.listen = dir.join("pullgate.sock");
        cfg.upstream = upstream.to_path_buf();
        cfg.drain_grace = Duration::from_secs(1);
        cfg.limits = limits;
        let metrics = Arc::new(Metrics::default());
        let proxy = Proxy::configured(
            Arc::new(Upstream::new(&cfg.upstream)),
            InterceptTable::logging(),
            metrics.clone(),
            Reach::Cri,
            &cfg.limits,
        );
        let server = Server::bind_with(&cfg, proxy).expect("bind pullgate");
        let (control, rx) = mpsc::channel(4);
        InProcess {
            listen: cfg.listen,
            metrics,
            control,
            task: tokio::spawn(server.run(rx)),
        }
    }

    /// Waits (bounded) until `pullgate_connections` reads `n`.
    async fn wait_connections(&self, n: usize) {
        let want = format!("pullgate_connections {n}\n");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.metrics.render(0, None, true);
            if text.contains(&want) {
                return;
            }
            assert!(Instant::now() < deadline, "never {want:?}:\n{text}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) {
        let _ = self.control.send(Control::Shutdown).await;
        let _ = self.task.await;
    }
}

/// At the connection cap the connection idle for the longest makes room for a newcomer; when every
/// connection has a call open, the newcomer is refused with a GOAWAY that says why, and the calls
/// in flight are not disturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_cap_the_oldest_idle_one_makes_room() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, _events) = FakeCri::new();
    let upstream = fake.serve(&dir.path().join("cri.sock"));
    let limits = Limits {
        max_connections: 4,
        ..Limits::default()
    };
    let pg = InProcess::start(dir.path(), &upstream.path, limits);
    let mut idle = Vec::new();
    for n in 1..=4 {
        idle.push(idle_connection(&pg.listen));
        pg.wait_connections(n).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A fifth client is served; the first idle connection is closed to make room.
    version(&pg.listen).await;
    let (types, closed) = frames_until_closed(&mut idle[0], Duration::from_secs(10));
    assert!(
        closed && types.contains(&GOAWAY),
        "oldest: {types:?}, closed {closed}"
    );
    for s in &mut idle[1..] {
        let (types, closed) = frames_until_closed(s, Duration::from_millis(100));
        assert!(
            !closed && !types.contains(&GOAWAY),
            "younger ones stay: {types:?}"
        );
    }
    let text = pg.metrics.render(0, None, true);
    assert!(
        text.contains("pullgate_connections_closed_total{reason=\"evicted\"} 1"),
        "{text}"
    );
    drop(idle);
    pg.wait_connections(0).await;

    // Four connections, each with a slow call open: nothing is idle, the fifth is refused.
    let mut slow = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let ch = cri_channel(&pg.listen).await;
        slow.spawn(async move {
            runtime_client(ch)
                .exec_sync(cri::ExecSyncRequest {
                    container_id: "c".into(),
                    cmd: vec!["slow".into()],
                    timeout: 1500,
                })
                .await
                .map(|r| r.into_inner().stdout)
        });
    }
    pg.wait_connections(4).await;
    wait_execs(&fake.observed, 4).await;
    let mut refused = idle_connection(&pg.listen);
    let (types, closed) = frames_until_closed(&mut refused, Duration::from_secs(5));
    assert!(
        closed && types == [GOAWAY],
        "refused with a GOAWAY: {types:?}"
    );
    let text = pg.metrics.render(0, None, true);
    assert!(
        text.contains("pullgate_connections_closed_total{reason=\"refused\"} 1"),
        "{text}"
    );
    while let Some(r) = slow.join_next().await {
        assert_eq!(r.unwrap().expect("slow call completes"), b"slow");
    }
    pg.stop().await;
    upstream.stop().await;
}

/// A peer that stops answering is found by HTTP/2 keepalive pings and disconnected, even though the
/// idle timeout is far away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_pings_disconnect_a_peer_that_stopped_answering() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, _events) = FakeCri::new();
    let upstream = fake.serve(&dir.path().join("cri.sock"));
    let limits = Limits {
        keepalive_interval: Some(Duration::from_secs(1)),
        keepalive_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(3600),
        ..Limits::default()
    };
    let pg = InProcess::start(dir.path(), &upstream.path, limits);
    let mut mute = idle_connection(&pg.listen);
    let t = Instant::now();
    let (types, closed) = frames_until_closed(&mut mute, Duration::from_secs(10));
    assert!(closed, "still open after 10 s: {types:?}");
    assert!(types.contains(&PING), "closed without a ping: {types:?}");
    assert!(
        t.elapsed() >= Duration::from_millis(1500),
        "closed after {:?}",
        t.elapsed()
    );
    // A live client is unaffected.
    version(&pg.listen).await;
    pg.stop().await;
    upstream.stop().await;
}

/// What a [`SlowUpstream`] does with each call.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Slowness {
    /// Answers the headers, then never reads the request body (its window stays closed).
    NeverReads,
    /// Reads the request body, then holds the answer until released.
    HoldsTheAnswer,
    /// Answers with as large a response as the window lets it send, counting what it sent.
    FloodsTheAnswer,
}

/// A bare HTTP/2 upstream that is slow in one of the ways of [`Slowness`].
struct SlowUpstream {
    /// Request body bytes read, or response bytes sent (`FloodsTheAnswer`).
    bytes: Arc<std::sync::atomic::AtomicUsize>,
    release: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SlowUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SlowUpstream {
    fn serve(path: &Path, how: Slowness) -> SlowUpstream {
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        let bytes: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let release = Arc::new(tokio::sync::Notify::new());
        let (counted, released) = (bytes.clone(), release.clone());
        // Every connection is served, as a runtime does (pullgate opens one per client connection
        // besides the one its intercepted calls share).
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let (counted, released) = (counted.clone(), released.clone());
                conns.spawn(Self::connection(stream, how, counted, released));
            }
        });
        SlowUpstream {
            bytes,
            release,
            task,
        }
    }

    async fn connection(
        stream: tokio::net::UnixStream,
        how: Slowness,
        counted: Arc<std::sync::atomic::AtomicUsize>,
        released: Arc<tokio::sync::Notify>,
    ) {
        use std::sync::atomic::Ordering;
        {
            let mut conn = h2::server::handshake(stream).await.expect("handshake");
            let mut held = Vec::new();
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                let (counted, released) = (counted.clone(), released.clone());
                let ok = || {
                    http::Response::builder()
                        .header("content-type", "application/grpc")
                        .body(())
                        .unwrap()
                };
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", "0".parse().unwrap());
                match how {
                    Slowness::NeverReads => {
                        let send = respond.send_response(ok(), false).unwrap();
                        held.push((req, send));
                    }
                    Slowness::HoldsTheAnswer => {
                        tokio::spawn(async move {
                            let mut body = req.into_body();
                            while let Some(Ok(d)) = body.data().await {
                                let _ = body.flow_control().release_capacity(d.len());
                                counted.fetch_add(d.len(), Ordering::SeqCst);
                            }
                            released.notified().await;
                            let mut send = respond.send_response(ok(), false).unwrap();
                            let _ = send.send_trailers(trailers);
                        });
                    }
                    Slowness::FloodsTheAnswer => {
                        tokio::spawn(async move {
                            let mut send = respond.send_response(ok(), false).unwrap();
                            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
                            while counted.load(Ordering::SeqCst) < 64 << 20 {
                                send.reserve_capacity(ZEROS.len());
                                let cap = tokio::time::timeout(
                                    Duration::from_millis(500),
                                    std::future::poll_fn(|cx| send.poll_capacity(cx)),
                                )
                                .await;
                                let n = match cap {
                                    Ok(Some(Ok(n))) if n > 0 => n.min(ZEROS.len()),
                                    _ => break,
                                };
                                if send
                                    .send_data(Bytes::from_static(&ZEROS[..n]), false)
                                    .is_err()
                                    || tokio::time::Instant::now() > deadline
                                {
                                    break;
                                }
                                counted.fetch_add(n, Ordering::SeqCst);
                            }
                            released.notified().await;
                            let _ = send.send_trailers(trailers);
                        });
                    }
                }
            }
        }
    }

    fn bytes(&self) -> usize {
        self.bytes.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Pushes up to `total` bytes of request body on `body` as fast as its window allows; stops when
/// no window opens for half a second. Returns what it could send.
async fn push_until_stalled(body: &mut h2::SendStream<Bytes>, total: usize) -> usize {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut sent = 0;
    while sent < total && tokio::time::Instant::now() < deadline {
        body.reserve_capacity(ZEROS.len());
        let cap = tokio::time::timeout(
            Duration::from_millis(500),
            std::future::poll_fn(|cx| body.poll_capacity(cx)),
        )
        .await;
        let n = match cap {
            Ok(Some(Ok(n))) if n > 0 => n.min(ZEROS.len()),
            _ => break,
        };
        body.send_data(Bytes::from_static(&ZEROS[..n]), false)
            .expect("send request data");
        sent += n;
    }
    sent
}

/// A streaming call's request head (a forwarded method).
fn attach_request() -> http::Request<()> {
    let mut req = http::Request::post("http://localhost/runtime.v1.RuntimeService/Attach")
        .body(())
        .unwrap();
    *req.headers_mut() = grpc_headers();
    req
}

/// Flow control carries a slow peer's back-pressure through pullgate in both directions: a client
/// streaming a request to a runtime that does not read can send only what the windows on the way
/// hold, not 32 MiB into pullgate's memory; and a runtime streaming an answer to a client that
/// does not read can send only what the windows on the way hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_peer_holds_back_the_other_side_in_both_directions() {
    const TOTAL: usize = 32 << 20;
    // What the windows on the way may hold: the client's stream window at pullgate (512 KiB), the
    // upstream's (64 KiB by default, or pullgate's 4 MiB towards itself), a frame or two in between.
    const HELD: usize = 6 << 20;
    let dir = tempfile::tempdir().unwrap();
    let upstream_path = dir.path().join("slow.sock");
    let slow = SlowUpstream::serve(&upstream_path, Slowness::NeverReads);
    let pg = InProcess::start(dir.path(), &upstream_path, Limits::default());
    let mut client = h2_client(&pg.listen).await.ready().await.unwrap();
    let req = attach_request();
    let (_resp, mut body) = client.send_request(req, false).unwrap();
    let sent = push_until_stalled(&mut body, TOTAL).await;
    assert!(
        sent < HELD,
        "the client could send {sent} bytes to an upstream that reads nothing"
    );
    assert!(sent > 0, "nothing could be sent at all");
    drop((body, slow));
    pg.stop().await;

    let dir = tempfile::tempdir().unwrap();
    let upstream_path = dir.path().join("flood.sock");
    let flood = SlowUpstream::serve(&upstream_path, Slowness::FloodsTheAnswer);
    let pg = InProcess::start(dir.path(), &upstream_path, Limits::default());
    let mut client = h2_client(&pg.listen).await.ready().await.unwrap();
    let req = attach_request();
    let (resp, _body) = client.send_request(req, true).unwrap();
    let resp = resp.await.expect("response headers");
    // The client never reads the body; wait (bounded) until the upstream stops making progress.
    let mut last = usize::MAX;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        let now = flood.bytes();
        if now == last {
            break;
        }
        last = now;
    }
    let sent = flood.bytes();
    assert!(
        sent < HELD,
        "the upstream could send {sent} bytes to a client that reads nothing"
    );
    assert!(sent > 0, "nothing could be sent at all");
    drop(resp);
    flood.release.notify_one();
    pg.stop().await;
}

/// An intercepted request body stays reserved in the body budget only until it has been handed to
/// the runtime: a runtime that takes its time to answer does not keep the bytes counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_body_budget_is_given_back_once_the_body_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let upstream_path = dir.path().join("slow.sock");
    let slow = SlowUpstream::serve(&upstream_path, Slowness::HoldsTheAnswer);
    let pg = InProcess::start(dir.path(), &upstream_path, Limits::default());
    let req = cri::CreateContainerRequest {
        pod_sandbox_id: "p".repeat(64),
        config: Some(cri::ContainerConfig {
            image: Some(cri::ImageSpec {
                image: "registry.example/app@sha256:".to_string() + &"a".repeat(64),
                ..Default::default()
            }),
            annotations: [("big".to_string(), "x".repeat(1 << 20))].into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let msg = frame(&prost::Message::encode_to_vec(&req));
    let listen = pg.listen.clone();
    let body = msg.clone();
    let call = tokio::spawn(async move {
        raw_call(
            &listen,
            "http://localhost/runtime.v1.RuntimeService/CreateContainer",
            grpc_headers(),
            body,
        )
        .await
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while slow.bytes() < msg.len() {
        assert!(Instant::now() < deadline, "the upstream never got the body");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The body is with the runtime, which has not answered: nothing is reserved any more.
    let text = loop {
        let text = pg.metrics.render(0, None, true);
        if text.contains("pullgate_request_body_bytes_reserved 0\n") || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        text.contains("pullgate_request_body_bytes_reserved 0\n"),
        "still reserved while the answer is awaited:\n{}",
        text.lines()
            .filter(|l| l.contains("reserved"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        !call.is_finished(),
        "the call should still wait for its answer"
    );
    slow.release.notify_one();
    let resp = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("answered once released")
        .unwrap();
    assert_eq!(resp.trailers.expect("trailers")["grpc-status"], "0");
    pg.stop().await;
}

/// A `CreateContainer` message announcing more than its cap (4 MiB by default, far above any real
/// container config) is refused on its length prefix, before anything is reserved or read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_container_messages_over_their_cap_are_refused_on_the_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, _events) = FakeCri::new();
    let upstream = fake.serve(&dir.path().join("cri.sock"));
    let pg = InProcess::start(dir.path(), &upstream.path, Limits::default());
    let client = h2_client(&pg.listen).await;
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    let ended = stalled_call(
        client,
        CREATE_CONTAINER,
        (4 << 20) + 1,
        0,
        until,
        Duration::from_secs(5),
    )
    .await;
    let (code, msg) = ended.expect("answered at once");
    assert_eq!(code, "8", "{msg}");
    assert!(
        msg.contains("server.limits.max_create_container_message"),
        "{msg}"
    );
    let text = pg.metrics.render(0, None, true);
    assert!(
        text.contains("pullgate_request_body_bytes_reserved 0\n"),
        "{text}"
    );
    pg.stop().await;
    upstream.stop().await;
}

/// The admin API reads an `InstallBundle` only up to the largest bundle the node installs
/// (`policy.max_bundle_size`) and the room its signatures need: a larger message is refused on its
/// length, before it is held in memory, and the daemon goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_install_over_the_bundle_size_limit_is_refused_on_its_length() {
    use pullgate::node::api::pb::install_bundle_response::Result as Installed;
    use pullgate::node::api::{AdminClient, ApiError};
    let tmp = tempfile::tempdir().unwrap();
    let (fake, _events) = FakeCri::new();
    let upstream = fake.serve(&tmp.path().join("cri.sock"));
    let dir = tmp.path().join("pullgate");
    let pg = Pullgate::start(
        tmp.path(),
        &upstream.path,
        &format!(
            "[policy]\nstate_dir = \"{}\"\ntrust = \"{}\"\nmax_bundle_size = \"1MiB\"\n",
            dir.join("state").display(),
            dir.join("trust.toml").display()
        ),
    );
    let mut admin = AdminClient::connect(&dir.join("admin.sock")).await.unwrap();
    // A bundle of the largest size reaches the daemon, which judges it (here: no trust file).
    let at_limit = admin
        .install_bundle(vec![b' '; 1 << 20], Vec::new())
        .await
        .expect("a bundle of policy.max_bundle_size is read");
    assert!(
        matches!(at_limit.result, Some(Installed::Rejected(_))),
        "{at_limit:?}"
    );
    // Three times that is refused on its length prefix.
    match admin.install_bundle(vec![b' '; 3 << 20], Vec::new()).await {
        Err(ApiError::Call { status, .. }) => assert!(
            matches!(
                status.code(),
                tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
            ),
            "{status:?}"
        ),
        other => panic!("a 3 MiB install with a 1 MiB limit: {other:?}"),
    }
    admin.status().await.expect("the daemon still answers");
    let mut pg = pg;
    pg.stop();
    upstream.stop().await;
}

/// A client that keeps asking (PINGs, each answered by pullgate) and never reads the answers is
/// held back: pullgate stops reading it once the answers waiting for it pass a bound, so its
/// writes stall instead of filling pullgate's memory; other clients are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_answers_is_held_back() {
    use tokio::io::AsyncWriteExt;
    let tmp = tempfile::tempdir().unwrap();
    let (fake, _events) = FakeCri::new();
    let upstream = fake.serve(&tmp.path().join("cri.sock"));
    let pg = Pullgate::start(tmp.path(), &upstream.path, "");
    let pid = pg.pid();
    let rss_before = proc_status_kib(pid, "VmRSS:");

    let mut s = tokio::net::UnixStream::connect(&pg.socket).await.unwrap();
    s.write_all(PREFACE).await.unwrap();
    s.write_all(&EMPTY_SETTINGS).await.unwrap();
    let mut ping = vec![0, 0, 8, 6, 0, 0, 0, 0, 0];
    ping.extend_from_slice(b"floodgte");
    let batch: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 4096)
        .collect();
    let mut sent = 0usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let stalled = loop {
        if tokio::time::Instant::now() > deadline || sent > (256 << 20) {
            break false;
        }
        match tokio::time::timeout(Duration::from_millis(500), s.write_all(&batch)).await {
            Ok(Ok(())) => sent += batch.len(),
            Ok(Err(e)) => panic!("pullgate closed the flooding connection: {e}"),
            Err(_) => break true,
        }
    };
    assert!(
        stalled,
        "{sent} bytes of PINGs sent without reading an answer"
    );
    assert!(
        sent < (16 << 20),
        "{sent} bytes of PINGs taken before holding back"
    );
    version_within(&pg.socket, Duration::from_secs(2)).await;
    let rss = proc_status_kib(pid, "VmRSS:");
    assert!(
        rss < rss_before + 32 * 1024,
        "resident memory grew from {rss_before} KiB to {rss} KiB"
    );
    support::loud(&format!(
        "PING flood without reading: held back after {:.1} MiB; RSS {:.1} → {:.1} MiB",
        sent as f64 / (1 << 20) as f64,
        rss_before as f64 / 1024.0,
        rss as f64 / 1024.0
    ));
    drop(s);
    upstream.stop().await;
}
