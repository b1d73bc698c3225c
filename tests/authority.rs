//! Every `:authority` a gRPC client may send over a unix socket gets through pullgate: a raw HTTP/2
//! client (Python's `h2`, which sends exactly the header bytes it is given, or none) calls a
//! forwarded method, an intercepted one and a server stream with each form, on fresh connections
//! and on one long-lived connection whose header blocks use the HPACK dynamic table; containerd (a
//! fake CRI server here) must see a valid authority every time. Protocol refusals must be counted
//! and logged at warn.

mod fake_cri;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use fake_cri::*;
use k8s_cri::v1 as cri;
use prost::Message;
use pullgate::node::config::Config;
use pullgate::node::daemon::{Control, Server};
use pullgate::node::metrics::Metrics;
use pullgate::node::proxy::{InterceptTable, Proxy, Upstream};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

const PYTHON: &str = "/usr/bin/python3";
/// How long the Python client may run before the test fails instead of hanging.
const LIMIT: Duration = Duration::from_secs(60);

const VERSION: &str = "/runtime.v1.RuntimeService/Version";
const IMAGE_STATUS: &str = "/runtime.v1.ImageService/ImageStatus";
const EVENTS: &str = "/runtime.v1.RuntimeService/GetContainerEvents";

/// Python `h2` client: runs a plan of connections, each a list of calls, and prints what came back
/// as JSON. A call is `{"headers": [[name, hex value], …], "body": hex, "messages": n?, "frame":
/// n?}` (`messages`: cancel after that many response messages; `frame`: send the header block in
/// frames of at most n bytes, i.e. with CONTINUATION frames) or `{"raw": hex}` (bytes written as
/// they are, then wait for the connection to end).
const PY_H2: &str = r#"
import json, socket, sys
import h2.config, h2.connection, h2.events

def messages(buf):
    out = []
    while len(buf) >= 5:
        n = int.from_bytes(buf[1:5], "big")
        if len(buf) < 5 + n:
            break
        out.append(buf[5:5 + n].hex())
        buf = buf[5 + n:]
    return out, buf

def collect(s, c, sid, want):
    res = {"headers": {}, "trailers": {}, "messages": [], "reset": None, "goaway": None}
    buf = b""
    while True:
        data = s.recv(65536)
        if not data:
            res["eof"] = True
            return res
        done = False
        for ev in c.receive_data(data):
            if isinstance(ev, h2.events.ConnectionTerminated):
                res["goaway"] = ev.error_code
                done = True
            if getattr(ev, "stream_id", None) != sid:
                continue
            if isinstance(ev, h2.events.ResponseReceived):
                res["headers"] = {k.decode(): v.decode("latin1") for k, v in ev.headers}
            elif isinstance(ev, h2.events.DataReceived):
                c.acknowledge_received_data(ev.flow_controlled_length, sid)
                buf += ev.data
                got, buf = messages(buf)
                res["messages"] += got
                if want and len(res["messages"]) >= want:
                    done = True
            elif isinstance(ev, h2.events.TrailersReceived):
                res["trailers"] = {k.decode(): v.decode("latin1") for k, v in ev.headers}
            elif isinstance(ev, h2.events.StreamEnded):
                res["ended"] = True
                done = True
            elif isinstance(ev, h2.events.StreamReset):
                res["reset"] = ev.error_code
                done = True
        if done and not res.get("ended") and res["reset"] is None and res["goaway"] is None:
            c.reset_stream(sid, 8)  # CANCEL: enough messages of a stream that goes on
        try:
            s.sendall(c.data_to_send())
        except OSError:
            pass  # the server closed the connection
        if done:
            return res

def wait_end(s, c):
    res = {"goaway": None}
    while True:
        data = s.recv(65536)
        if not data:
            return res
        for ev in c.receive_data(data):
            if isinstance(ev, h2.events.ConnectionTerminated):
                res["goaway"] = ev.error_code
                return res

def run(path, calls):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(path)
    cfg = h2.config.H2Configuration(client_side=True, header_encoding=None,
                                    validate_outbound_headers=False,
                                    normalize_outbound_headers=False,
                                    validate_inbound_headers=False)
    c = h2.connection.H2Connection(config=cfg)
    c.initiate_connection()
    s.sendall(c.data_to_send())
    out = []
    for call in calls:
        if "raw" in call:
            s.sendall(bytes.fromhex(call["raw"]))
            out.append(wait_end(s, c))
            break
        sid = c.get_next_available_stream_id()
        headers = [(n.encode(), bytes.fromhex(v)) for n, v in call["headers"]]
        size = c.max_outbound_frame_size
        if call.get("frame"):
            c.max_outbound_frame_size = call["frame"]
        c.send_headers(sid, headers)
        c.max_outbound_frame_size = size
        c.send_data(sid, bytes.fromhex(call["body"]), end_stream=True)
        s.sendall(c.data_to_send())
        out.append(collect(s, c, sid, call.get("messages")))
        if out[-1]["goaway"] is not None:
            break
    s.close()
    return out

plan = json.loads(sys.argv[2])
print(json.dumps([run(sys.argv[1], calls) for calls in plan]), flush=True)
"#;

/// Log lines of every test in this binary (warn and above), for checking refusals are logged.
fn captured_log() -> Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let buf: Arc<Mutex<Vec<u8>>> = Arc::default();
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one subscriber");
        buf
    })
    .clone()
}

struct Sink(Arc<Mutex<Vec<u8>>>);
impl std::io::Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// pullgate (in process, logging intercept table) in front of a fake CRI server.
struct Env {
    _dir: tempfile::TempDir,
    /// Keeps the first event subscriber's stream open after its two scripted events.
    _events: mpsc::Sender<cri::ContainerEventResponse>,
    fake: FakeCri,
    upstream: Option<FakeServer>,
    listen: PathBuf,
    metrics: Arc<Metrics>,
    control: mpsc::Sender<Control>,
}

impl Env {
    async fn start() -> Env {
        captured_log();
        let dir = tempfile::tempdir().unwrap();
        let (fake, events) = FakeCri::new();
        for i in 0..2 {
            let ev = cri::ContainerEventResponse {
                container_id: format!("ev{i}"),
                ..Default::default()
            };
            events.send(ev).await.unwrap();
        }
        let upstream = fake.serve(&dir.path().join("cri.sock"));
        let mut cfg = Config::default().server;
        cfg.listen = dir.path().join("pullgate.sock");
        cfg.upstream = upstream.path.clone();
        let metrics = Arc::new(Metrics::default());
        let proxy = Proxy::new(
            Arc::new(Upstream::new(&cfg.upstream)),
            InterceptTable::logging(),
            metrics.clone(),
        );
        let server = Server::bind_with(&cfg, proxy).unwrap();
        let (control, rx) = mpsc::channel(4);
        tokio::spawn(server.run(rx));
        Env {
            listen: cfg.listen,
            _dir: dir,
            _events: events,
            fake,
            upstream: Some(upstream),
            metrics,
            control,
        }
    }

    /// Runs the Python client with `plan` (a list of connections, each a list of calls).
    async fn h2(&self, plan: Value) -> Vec<Vec<Value>> {
        let ok = Command::new(PYTHON)
            .args(["-c", "import h2"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "the raw HTTP/2 client is missing: {PYTHON} cannot import h2; install the Debian \
             package python3-h2 (scripts/install-deps.sh does)"
        );
        let mut cmd = Command::new("timeout");
        cmd.arg("--kill-after=5")
            .arg(LIMIT.as_secs().to_string())
            .arg(PYTHON)
            .args(["-c", PY_H2])
            .arg(&self.listen)
            .arg(plan.to_string());
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .unwrap()
            .unwrap();
        assert!(
            out.status.success(),
            "python h2 client failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("client prints JSON")
    }

    fn metrics_text(&self) -> String {
        self.metrics.render(0, None, true)
    }

    async fn stop(mut self) {
        self.control.send(Control::Shutdown).await.unwrap();
        if let Some(u) = self.upstream.take() {
            u.stop().await;
        }
    }
}

/// A gRPC request with these pseudo-headers (`authority: None` leaves `:authority` out).
fn call(path: &str, authority: Option<&[u8]>, msg: &[u8]) -> Value {
    let mut h = vec![
        json!([":method", hex::encode("POST")]),
        json!([":scheme", hex::encode("http")]),
        json!([":path", hex::encode(path)]),
    ];
    if let Some(a) = authority {
        h.push(json!([":authority", hex::encode(a)]));
    }
    h.push(json!(["content-type", hex::encode("application/grpc")]));
    h.push(json!(["te", hex::encode("trailers")]));
    json!({"headers": h, "body": hex::encode(frame(msg))})
}

fn version(authority: Option<&[u8]>, tag: &str) -> Value {
    let msg = cri::VersionRequest {
        version: tag.into(),
    };
    call(VERSION, authority, &msg.encode_to_vec())
}

fn image_status(authority: Option<&[u8]>) -> Value {
    let msg = cri::ImageStatusRequest {
        image: Some(cri::ImageSpec {
            image: "docker.io/library/busybox:1.36".into(),
            ..Default::default()
        }),
        verbose: false,
    };
    call(IMAGE_STATUS, authority, &msg.encode_to_vec())
}

fn events(authority: Option<&[u8]>) -> Value {
    let mut c = call(EVENTS, authority, &cri::GetEventsRequest {}.encode_to_vec());
    c["messages"] = json!(2);
    c
}

/// The one message of a successful unary answer.
fn unary_ok(r: &Value, what: &str) -> Vec<u8> {
    assert_eq!(r["headers"][":status"], "200", "{what}: {r}");
    assert_eq!(r["trailers"]["grpc-status"], "0", "{what}: {r}");
    let m = r["messages"].as_array().expect("messages");
    assert_eq!(m.len(), 1, "{what}: {r}");
    hex::decode(m[0].as_str().unwrap()).unwrap()
}

fn check_version(r: &Value, tag: &str, what: &str) {
    let v = cri::VersionResponse::decode(&*unary_ok(r, what)).unwrap();
    assert_eq!(
        (v.version.as_str(), v.runtime_name.as_str()),
        (tag, "fake-cri"),
        "{what}"
    );
}

fn check_image_status(r: &Value, what: &str) {
    let s = cri::ImageStatusResponse::decode(&*unary_ok(r, what)).unwrap();
    assert_eq!(
        s.image.map(|i| i.repo_tags),
        Some(vec!["docker.io/library/busybox:1.36".to_string()]),
        "{what}"
    );
}

fn check_events(r: &Value, what: &str) {
    assert_eq!(r["headers"][":status"], "200", "{what}: {r}");
    let ids: Vec<String> = r["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            cri::ContainerEventResponse::decode(&*hex::decode(m.as_str().unwrap()).unwrap())
                .unwrap()
                .container_id
        })
        .collect();
    assert_eq!(ids.len(), 2, "{what}: {r}");
    assert!(
        ids.iter()
            .all(|i| i.starts_with("canned-") || i.starts_with("ev")),
        "{what}: {ids:?}"
    );
}

/// Every form of `:authority` a client may send; `None` sends none.
fn forms(socket: &Path) -> Vec<(&'static str, Option<Vec<u8>>)> {
    let path = socket.to_str().unwrap().to_string();
    let encoded = path.replace('/', "%2F");
    vec![
        ("the socket path", Some(path.into_bytes())),
        ("the %-encoded path", Some(encoded.into_bytes())),
        ("empty", Some(Vec::new())),
        ("absent", None),
        ("localhost", Some(b"localhost".to_vec())),
        ("a space", Some(b"local host".to_vec())),
        ("non-UTF-8 bytes", Some(b"\xff\xfe\x80".to_vec())),
        ("a valid host:port", Some(b"pullgate.test:10010".to_vec())),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_authority_form_gets_real_answers_and_upstream_sees_a_valid_one() {
    let env = Env::start().await;
    let forms = forms(&env.listen);
    // One connection per form, so each form is the first header block its connection sends.
    let plan: Vec<Value> = forms
        .iter()
        .map(|(_, a)| {
            let a = a.as_deref();
            json!([
                version(a, "v-first"),
                image_status(a),
                events(a),
                version(a, "v-last")
            ])
        })
        .collect();
    let results = env.h2(json!(plan)).await;
    for ((what, _), conn) in forms.iter().zip(&results) {
        assert_eq!(conn.len(), 4, "{what}: {conn:?}");
        check_version(&conn[0], "v-first", &format!("Version, {what}"));
        check_image_status(&conn[1], &format!("ImageStatus, {what}"));
        check_events(&conn[2], &format!("GetContainerEvents, {what}"));
        check_version(&conn[3], "v-last", &format!("second Version, {what}"));
    }
    let seen = env.fake.observed.authorities.lock().unwrap().clone();
    assert_eq!(seen.len(), forms.len() * 4, "{seen:?}");
    for a in &seen {
        let a = a.as_deref().expect("containerd always gets an :authority");
        assert!(
            a == "localhost" || a == "pullgate.test:10010",
            "upstream saw {a:?}"
        );
    }
    // A valid authority is forwarded as the client sent it.
    assert_eq!(
        seen.iter()
            .filter(|a| a.as_deref() == Some("pullgate.test:10010"))
            .count(),
        4
    );
    let metrics = env.metrics_text();
    assert!(
        !metrics.contains("pullgate_protocol_refusals_total{"),
        "nothing is refused:\n{metrics}"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_with_indexed_authorities_and_continuation_frames_keeps_working() {
    let env = Env::start().await;
    let path = env.listen.to_str().unwrap().as_bytes().to_vec();
    let mut calls = Vec::new();
    // Python's hpack indexes every header it sends: the first request of each authority inserts it
    // into the dynamic table, the following ones refer to it by index.
    for i in 0..5 {
        calls.push(version(Some(b"localhost"), &format!("before-{i}")));
    }
    for i in 0..5 {
        calls.push(version(Some(&path), &format!("path-{i}")));
    }
    // Header blocks over CONTINUATION frames: a large header, then frames of 7 bytes.
    let mut big = version(Some(&path), "big");
    big["headers"]
        .as_array_mut()
        .unwrap()
        .push(json!(["x-pad", hex::encode("p".repeat(40_000))]));
    calls.push(big);
    let mut tiny = version(Some(&path), "tiny-frames");
    tiny["frame"] = json!(7);
    calls.push(tiny);
    for i in 0..3 {
        calls.push(version(Some(b"localhost"), &format!("after-{i}")));
        calls.push(version(None, &format!("absent-{i}")));
    }
    calls.push(image_status(Some(&path)));
    calls.push(events(Some(&path)));
    let n = calls.len();
    let results = env.h2(json!([calls])).await;
    let conn = &results[0];
    assert_eq!(conn.len(), n, "{conn:?}");
    let tags = (0..5)
        .map(|i| format!("before-{i}"))
        .chain((0..5).map(|i| format!("path-{i}")))
        .chain(["big".to_string(), "tiny-frames".to_string()])
        .chain((0..3).flat_map(|i| [format!("after-{i}"), format!("absent-{i}")]));
    for (i, tag) in tags.enumerate() {
        check_version(&conn[i], &tag, &tag);
    }
    check_image_status(&conn[n - 2], "ImageStatus after the switch");
    check_events(&conn[n - 1], "GetContainerEvents after the switch");
    let seen = env.fake.observed.authorities.lock().unwrap().clone();
    assert_eq!(seen.len(), n);
    assert!(
        seen.iter().all(|a| a.as_deref() == Some("localhost")),
        "{seen:?}"
    );
    assert!(
        !env.metrics_text()
            .contains("pullgate_protocol_refusals_total{")
    );
    env.stop().await;
}

fn frame_bytes(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_header_block_is_refused_logged_and_counted() {
    let env = Env::start().await;
    // HEADERS without END_HEADERS (:method POST, :scheme http), then a DATA frame: only
    // CONTINUATION may follow.
    let mut raw = frame_bytes(0x1, 0, 1, &[0x83, 0x86]);
    raw.extend(frame_bytes(0x0, 0x1, 1, b"\0\0\0\0\0"));
    let results = env.h2(json!([[{"raw": hex::encode(raw)}]])).await;
    assert_eq!(
        results[0][0]["goaway"], 1,
        "GOAWAY(PROTOCOL_ERROR): {results:?}"
    );
    let metrics = env.metrics_text();
    assert!(
        metrics.contains("pullgate_protocol_refusals_total{reason=\"bad_header_block\"} 1"),
        "{metrics}"
    );
    let log = String::from_utf8(captured_log().lock().unwrap().clone()).unwrap();
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("refused a client at the protocol level")
            && l.contains("bad_header_block")
            && l.contains("a frame of type 0 inside the header block of stream 1")),
        "{log}"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_by_the_http2_server_and_pullgate_are_counted_by_reason() {
    let env = Env::start().await;
    let header = |c: &mut Value, name: &str, value: &str| {
        c["headers"]
            .as_array_mut()
            .unwrap()
            .push(json!([name, hex::encode(value)]));
    };
    let mut no_method = version(Some(b"localhost"), "x");
    no_method["headers"].as_array_mut().unwrap().remove(0);
    let mut conn_header = version(Some(b"/run/x.sock"), "x");
    header(&mut conn_header, "connection", "keep-alive");
    let not_grpc = call("/healthz", Some(b"localhost"), b"");
    let mut upper = version(Some(b"localhost"), "x");
    header(&mut upper, "X-Upper", "1");
    let plan = json!([
        [no_method, version(None, "still-served")],
        [conn_header, version(Some(b"/run/x.sock"), "still-served")],
        [not_grpc],
        [upper],
    ]);
    let r = env.h2(plan).await;
    assert_eq!(r[0][0]["reset"], 1, "missing :method: {:?}", r[0]);
    check_version(&r[0][1], "still-served", "after a reset stream");
    assert_eq!(r[1][0]["reset"], 1, "connection header: {:?}", r[1]);
    check_version(
        &r[1][1],
        "still-served",
        "after a reset stream, re-encoding",
    );
    assert_eq!(r[2][0]["headers"]["grpc-status"], "12", "{:?}", r[2]);
    assert_eq!(
        r[3][0]["goaway"], 1,
        "an upper-case header name: {:?}",
        r[3]
    );
    // HTTP/1 and a connection without the preface are answered by pullgate before HTTP/2.
    for (bytes, want) in [
        (
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            &b"HTTP/1.1 505"[..],
        ),
        (
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 hello tls",
            b"\0\0",
        ),
    ] {
        let mut s = tokio::net::UnixStream::connect(&env.listen).await.unwrap();
        s.write_all(bytes).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(LIMIT, s.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert!(got.starts_with(want), "{got:?}");
    }
    let metrics = env.metrics_text();
    for reason in [
        "missing_pseudo_header",
        "connection_header",
        "bad_method_path",
        "invalid_header",
        "http1",
        "bad_preface",
    ] {
        let line = format!("pullgate_protocol_refusals_total{{reason=\"{reason}\"}} 1");
        assert!(metrics.contains(&line), "{line}\n{metrics}");
    }
    env.stop().await;
}
