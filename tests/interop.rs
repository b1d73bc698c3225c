//! Interoperability of the forwarding path with the common gRPC implementations on either side:
//! C-core (Python `grpcio`) as client and as server, grpc-go (`ctr`, containerd) as client and
//! server, and tonic. Each peer speaks real gRPC over a unix socket through a real pullgate.

mod fake_cri;
mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fake_cri::*;
use k8s_cri::v1 as cri;
use prost::Message;
use pullgate::node::config::Config;
use pullgate::node::daemon::{Control, Server};
use pullgate::node::proxy::InterceptTable;
use tokio::sync::mpsc;

const PYTHON: &str = "/usr/bin/python3";

/// How long any one peer process or stream may take before the test fails instead of hanging.
const LIMIT: Duration = Duration::from_secs(60);

/// `program` run under coreutils' `timeout`, so a hung peer ends the test in bounded time.
fn bounded(program: &Path) -> Command {
    let mut c = Command::new("timeout");
    c.arg("--kill-after=5")
        .arg(LIMIT.as_secs().to_string())
        .arg(program);
    c
}

/// The C-core based peer must be there (Debian package `python3-grpcio`, installed by
/// scripts/install-deps.sh); its absence fails the test with what to install.
fn python_grpc() -> PathBuf {
    let ok = Command::new(PYTHON)
        .args(["-c", "import grpc"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "the C-core gRPC peer is missing: {PYTHON} cannot import grpc; install the Debian package \
         python3-grpcio (scripts/install-deps.sh does)"
    );
    PathBuf::from(PYTHON)
}

fn start_pullgate(dir: &Path, upstream: &Path) -> (PathBuf, mpsc::Sender<Control>) {
    let mut cfg = Config::default().server;
    cfg.listen = dir.join("pullgate.sock");
    cfg.upstream = upstream.to_path_buf();
    let server = Server::bind(&cfg, InterceptTable::logging()).unwrap();
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(server.run(rx));
    (cfg.listen, tx)
}

/// C-core client. With a 4th argument, the channel option `grpc.default_authority` makes C-core
/// send it as `:authority` (what C-core >= 1.57 does by itself with a %-encoded socket path).
const PY_CLIENT: &str = r#"
import grpc, sys
options = [("grpc.default_authority", sys.argv[4])] if len(sys.argv) > 4 else []
ch = grpc.insecure_channel("unix:" + sys.argv[1], options=options)
version = ch.unary_unary("/runtime.v1.RuntimeService/Version")
print("version", version(bytes.fromhex(sys.argv[2]), timeout=10).hex(), flush=True)
remove = ch.unary_unary("/runtime.v1.RuntimeService/RemoveContainer")
try:
    remove(b"\x0a\x02c9", timeout=10)
    print("error none", flush=True)
except grpc.RpcError as e:
    print("error", e.code().name, e.details(), flush=True)
pull = ch.unary_unary("/runtime.v1.ImageService/PullImage")
print("pulled", pull(bytes.fromhex(sys.argv[3]), timeout=10).hex(), flush=True)
events = ch.unary_stream("/runtime.v1.RuntimeService/GetContainerEvents")
for i, m in enumerate(events(b"", timeout=10)):
    print("event", m.hex(), flush=True)
    if i == 1:
        break
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_core_client_through_pullgate_to_tonic() {
    c_core_session(None).await;
}

/// C-core sending the socket path and the %-encoded socket path as `:authority` (grpc C-core
/// >= 1.57 sends the latter for `unix:` targets, grpc-java and older kubelets the former): both
/// get through, and containerd's side sees a valid authority.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_core_client_sending_path_authorities() {
    for encoded in [false, true] {
        c_core_session(Some(encoded)).await;
    }
}

/// One C-core client session through pullgate: Version (forwarded), an error with metadata,
/// PullImage (intercepted), and a server stream. `authority`: `None` lets C-core choose (it sends
/// `localhost`), `Some(encoded)` sends the listening socket's path, %-encoded or not.
async fn c_core_session(authority: Option<bool>) {
    let python = python_grpc();
    let dir = tempfile::tempdir().unwrap();
    let (fake, events) = FakeCri::new();
    let upstream = fake.serve(&dir.path().join("cri.sock"));
    let (listen, control) = start_pullgate(dir.path(), &upstream.path);
    for i in 0..2 {
        let ev = cri::ContainerEventResponse {
            container_id: format!("ev{i}"),
            ..Default::default()
        };
        events.send(ev).await.unwrap();
    }
    let version = cri::VersionRequest {
        version: "from-c-core".into(),
    };
    let pull = cri::PullImageRequest {
        image: Some(cri::ImageSpec {
            image: "busybox:1.36".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut cmd = bounded(&python);
    cmd.args(["-c", PY_CLIENT])
        .arg(&listen)
        .arg(hex::encode(version.encode_to_vec()))
        .arg(hex::encode(pull.encode_to_vec()));
    if let Some(encoded) = authority {
        let path = listen.to_str().unwrap();
        cmd.arg(if encoded {
            path.replace('/', "%2F")
        } else {
            path.to_string()
        });
    }
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python client ({authority:?}) failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |key: &str| -> Vec<String> {
        stdout
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{key} ")).map(str::to_string))
            .collect()
    };
    let v = cri::VersionResponse::decode(&*hex::decode(&field("version")[0]).unwrap()).unwrap();
    assert_eq!(
        (v.version.as_str(), v.runtime_name.as_str()),
        ("from-c-core", "fake-cri")
    );
    assert_eq!(
        field("error"),
        vec!["NOT_FOUND container \"c9\" not found: ünïcode & 100%".to_string()]
    );
    let p = cri::PullImageResponse::decode(&*hex::decode(&field("pulled")[0]).unwrap()).unwrap();
    assert_eq!(p.image_ref, "sha256:pulled-busybox:1.36");
    let evs: Vec<String> = field("event")
        .iter()
        .map(|h| {
            cri::ContainerEventResponse::decode(&*hex::decode(h).unwrap())
                .unwrap()
                .container_id
        })
        .collect();
    assert_eq!(evs, vec!["ev0", "ev1"]);
    let seen = fake.observed.authorities.lock().unwrap().clone();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert!(
        seen.iter().all(|a| a.as_deref() == Some("localhost")),
        "{authority:?}: {seen:?}"
    );
    control.send(Control::Shutdown).await.unwrap();
    upstream.stop().await;
}

const PY_SERVER: &str = r#"
import grpc, sys
from concurrent import futures
def version(req, ctx):
    return b"\x0a" + bytes([len(req) - 2]) + req[2:] + b"\x12\x06c-core"
def status(req, ctx):
    ctx.abort(grpc.StatusCode.PERMISSION_DENIED, "nope from c-core")
def events(req, ctx):
    for i in range(3):
        yield b"\x0a\x02c" + str(i).encode()
h = grpc.method_handlers_generic_handler("runtime.v1.RuntimeService", {
    "Version": grpc.unary_unary_rpc_method_handler(version),
    "Status": grpc.unary_unary_rpc_method_handler(status),
    "GetContainerEvents": grpc.unary_stream_rpc_method_handler(events),
})
s = grpc.server(futures.ThreadPoolExecutor(4))
s.add_generic_rpc_handlers((h,))
s.add_insecure_port("unix:" + sys.argv[1])
s.start()
print("ready", flush=True)
s.wait_for_termination()
"#;

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tonic_client_through_pullgate_to_c_core_server() {
    let python = python_grpc();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("py.sock");
    let mut child = Command::new(python)
        .args(["-c", PY_SERVER])
        .arg(&sock)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _server = Kill(child);
    // Read the server's first line on a thread, so a server that hangs fails the test in bounded time.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(LIMIT)
        .expect("the python server did not say ready in time");
    assert_eq!(line.trim(), "ready");
    let (listen, control) = start_pullgate(dir.path(), &sock);
    let mut rt = runtime_client(cri_channel(&listen).await);

    let v = rt
        .version(cri::VersionRequest {
            version: "v1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (v.version.as_str(), v.runtime_name.as_str()),
        ("v1", "c-core")
    );
    // C-core answers errors trailers-only; the status survives the hop.
    let e = rt
        .status(cri::StatusRequest { verbose: false })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert_eq!(e.message(), "nope from c-core");
    let mut stream = rt
        .get_container_events(cri::GetEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut ids = Vec::new();
    while let Some(ev) = tokio::time::timeout(LIMIT, stream.message())
        .await
        .expect("the event stream stalled")
        .unwrap()
    {
        ids.push(ev.container_id);
    }
    assert_eq!(ids, vec!["c0", "c1", "c2"]);
    // A method the server does not know: C-core's own UNIMPLEMENTED comes back.
    let e = rt
        .list_containers(cri::ListContainersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented);
    control.send(Control::Shutdown).await.unwrap();
}

/// grpc-go on both sides: containerd's own client `ctr` talks containerd's native API (not CRI)
/// through pullgate, which forwards paths it does not know unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_go_client_through_pullgate_to_containerd() {
    if !support::e2e_enabled("grpc_go_client_through_pullgate_to_containerd") {
        return;
    }
    let tmp = support::TestDir::new("interop-ctr");
    let opts = support::stack::ContainerdOpts::new("127.0.0.1:9", "127.0.0.1:9/pause:1");
    let containerd = support::stack::Containerd::start(tmp.path(), &opts);
    // By default pullgate refuses containerd's native API: ctr is answered PERMISSION_DENIED.
    let (refusing, control) = start_pullgate(tmp.path(), &containerd.socket);
    let out = bounded(Path::new("ctr"))
        .arg("--address")
        .arg(&refusing)
        .arg("version")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("not part of the CRI API"),
        "{stderr}"
    );
    control.send(Control::Shutdown).await.unwrap();
    // With server.forward_non_cri, grpc-go's client and server talk through pullgate unchanged.
    let dir = tmp.path().join("all");
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg = Config::default().server;
    cfg.listen = dir.join("pullgate.sock");
    cfg.upstream = containerd.socket.clone();
    let proxy = pullgate::node::proxy::Proxy::with_reach(
        std::sync::Arc::new(pullgate::node::proxy::Upstream::new(&cfg.upstream)),
        InterceptTable::logging(),
        std::sync::Arc::new(pullgate::node::metrics::Metrics::default()),
        pullgate::node::proxy::Reach::All,
    );
    let server = Server::bind_with(&cfg, proxy).unwrap();
    let (control, rx) = mpsc::channel(4);
    tokio::spawn(server.run(rx));
    let listen = cfg.listen.clone();
    let ctr = |addr: &Path, args: &[&str]| {
        let out = bounded(Path::new("ctr"))
            .arg("--address")
            .arg(addr)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ctr {args:?} via {}: {}",
            addr.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    for args in [&["version"][..], &["namespaces", "ls"], &["plugins", "ls"]] {
        let direct = ctr(&containerd.socket, args);
        let via = tokio::task::spawn_blocking({
            let listen = listen.clone();
            let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            move || {
                let a: Vec<&str> = args.iter().map(String::as_str).collect();
                ctr(&listen, &a)
            }
        })
        .await
        .unwrap();
        assert!(!direct.trim().is_empty());
        assert_eq!(via, direct, "ctr {args:?}");
    }
    control.send(Control::Shutdown).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
}
