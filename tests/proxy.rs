//! In-process integration tests of the forwarding path: a real pullgate server (bound to a temp
//! socket) in front of fake CRI upstreams, spoken to by real gRPC clients.

mod fake_cri;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use fake_cri::*;
use http::HeaderMap;
use k8s_cri::v1 as cri;
use prost::Message;
use pullgate::node::config::Config;
use pullgate::node::daemon::{Control, RunSummary, Server};
use pullgate::node::proxy::grpc::{Code, Status};
use pullgate::node::proxy::intercept::{BoxFuture, Call, methods};
use pullgate::node::proxy::{Handler, InterceptTable, Verdict};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

struct Pullgate {
    listen: PathBuf,
    control: mpsc::Sender<Control>,
    task: tokio::task::JoinHandle<RunSummary>,
}

impl Pullgate {
    fn start(dir: &Path, upstream: &Path, grace: Duration) -> Pullgate {
        Pullgate::start_with(dir, upstream, grace, InterceptTable::logging())
    }

    fn start_with(
        dir: &Path,
        upstream: &Path,
        grace: Duration,
        intercepts: InterceptTable,
    ) -> Pullgate {
        let mut cfg = Config::default().server;
        cfg.listen = dir.join("pullgate.sock");
        cfg.upstream = upstream.to_path_buf();
        cfg.drain_grace = grace;
        let server = Server::bind(&cfg, intercepts).expect("bind pullgate");
        let (control, rx) = mpsc::channel(4);
        let task = tokio::spawn(server.run(rx));
        Pullgate {
            listen: cfg.listen,
            control,
            task,
        }
    }

    async fn stop(self) -> RunSummary {
        self.control.send(Control::Shutdown).await.unwrap();
        self.task.await.unwrap()
    }
}

fn image_spec(image: &str) -> Option<cri::ImageSpec> {
    Some(cri::ImageSpec {
        image: image.into(),
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_runtime_and_image_calls_equal_direct() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, _events) = FakeCri::new();
    let upstream = fake.serve(&dir.path().join("cri.sock"));
    let pg = Pullgate::start(dir.path(), &upstream.path, Duration::from_secs(5));

    let direct = cri_channel(&upstream.path).await;
    let via = cri_channel(&pg.listen).await;
    let (mut rd, mut rv) = (runtime_client(direct.clone()), runtime_client(via.clone()));
    let (mut id, mut iv) = (image_client(direct), image_client(via));

    let v = cri::VersionRequest {
        version: "v1".into(),
    };
    assert_eq!(
        rd.version(v.clone()).await.unwrap().into_inner(),
        rv.version(v).await.unwrap().into_inner()
    );
    assert_eq!(
        rd.status(cri::StatusRequest { verbose: true })
            .await
            .unwrap()
            .into_inner(),
        rv.status(cri::StatusRequest { verbose: true })
            .await
            .unwrap()
            .into_inner()
    );
    let lc = cri::ListContainersRequest::default();
    let got = rv.list_containers(lc.clone()).await.unwrap().into_inner();
    assert_eq!(got.containers.len(), 3);
    assert_eq!(rd.list_containers(lc).await.unwrap().into_inner(), got);

    let li = id
        .list_images(cri::ListImagesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(li.images.len(), 2);
    assert_eq!(
        iv.list_images(cri::ListImagesRequest::default())
            .await
            .unwrap()
            .into_inner(),
        li
    );
    for name in ["docker.io/library/busybox:1.36", "missing:latest"] {
        let req = cri::ImageStatusRequest {
            image: image_spec(name),
            verbose: false,
        };
        let d = id.image_status(req.clone()).await.unwrap().into_inner();
        assert_eq!(
            iv.image_status(req).await.unwrap().into_inner(),
            d,
            "{name}"
        );
    }
    assert_eq!(
        iv.image_fs_info(cri::ImageFsInfoRequest {})
            .await
            .unwrap()
            .into_inner(),
        id.image_fs_info(cri::ImageFsInfoRequest {})
            .await
            .unwrap()
            .into_inner()
    );
    // PullImage is intercepted (decoded, logged) and forwarded with every field intact.
    let pull = cri::PullImageRequest {
        image: image_spec("nginx:1.25"),
        auth: Some(cri::AuthConfig {
            username: "u".into(),
            password: "secret".into(),
            ..Default::default()
        }),
        sandbox_config: Some(cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: "web".into(),
                namespace: "shop".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    let resp = iv.pull_image(pull.clone()).await.unwrap().into_inner();
    assert_eq!(resp.image_ref, "sha256:pulled-nginx:1.25");
    assert_eq!(fake.observed.pulls.lock().unwrap().as_slice(), &[pull]);
    iv.remove_image(cri::RemoveImageRequest {
        image: image_spec("nginx:1.25"),
    })
    .await
    .unwrap();

    // Errors keep code, message (with non-ASCII and %), and metadata.
    let e = rv
        .remove_container(cri::RemoveContainerRequest {
            container_id: "c9".into(),
        })
        .await
        .unwrap_err();
    let d = rd
        .remove_container(cri::RemoveContainerRequest {
            container_id: "c9".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert_eq!(e.message(), "container \"c9\" not found: ünïcode & 100%");
    assert_eq!(e.message(), d.message());
    assert_eq!(
        e.metadata().get("x-fake-detail").unwrap(),
        "removed-elsewhere"
    );
    // A method the fake does not implement: the upstream's own UNIMPLEMENTED comes through.
    let e = rv
        .stop_pod_sandbox(cri::StopPodSandboxRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented);
    assert!(
        e.message().contains("fake: stop_pod_sandbox"),
        "{}",
        e.message()
    );

    pg.stop().await;
    upstream.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_stream_is_relayed_message_by_message() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, events) = FakeCri::new();
    let upstream = fake.serve(&dir.path().join("cri.sock"));
    let pg = Pullgate::start(dir.path(), &upstream.path, Duration::from_secs(1));
    let mut rv = runtime_client(cri_channel(&pg.listen).await);

    let mut stream = rv
        .get_container_events(cri::GetEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    // Each event arrives before the next one is even produced: nothing is buffered on the way.
    for i in 0..20 {
        let ev = cri::ContainerEventResponse {
            container_id: format!("c{i}"),
            created_at: i,
            ..Default::default()
        };
        events.send(ev.clone()).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("event relayed promptly")
            .unwrap()
            .unwrap();
        assert_eq!(got, ev);
        if i == 10 {
            // The stream stays open across idle time.
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
    }
    // The server ends the stream: the client sees a clean end.
    drop(events);
    assert!(stream.message().await.unwrap().is_none());
    pg.stop().await;
    upstream.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_bytes_headers_and_trailers_survive_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    // A response message with fields no binding knows (field 15 and 99), custom headers, trailers.
    let mut response_msg = cri::VersionResponse {
        version: "0.1".into(),
        ..Default::default()
    }
    .encode_to_vec();
    response_msg.extend_from_slice(&[0x7a, 0x03, b'n', b'e', b'w', 0x98, 0x06, 0x2a]);
    let mut headers = HeaderMap::new();
    headers.insert("content-type", "application/grpc+proto".parse().unwrap());
    headers.insert("x-upstream-header", "kept".parse().unwrap());
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    trailers.insert("x-upstream-trailer", "kept-too".parse().unwrap());
    let framed = frame(&response_msg);
    let upstream_path = dir.path().join("raw.sock");
    let raw = RawUpstream::serve(
        &upstream_path,
        Script {
            headers,
            // Split across two DATA frames, mid-message.
            chunks: vec![framed.slice(..3), framed.slice(3..)],
            trailers: Some(trailers),
            echo: false,
        },
    );
    let pg = Pullgate::start(dir.path(), &upstream_path, Duration::from_secs(1));

    // Request with unknown fields, on a forwarded method, an intercepted method, and unknown paths.
    let mut req_msg = cri::PullImageRequest {
        image: image_spec("busybox"),
        ..Default::default()
    }
    .encode_to_vec();
    req_msg.extend_from_slice(&[0xfa, 0x3e, 0x02, 0xde, 0xad, 0xc0, 0x3e, 0x01]); // fields 1007 (bytes), 1000 (varint)
    for path in [
        "/runtime.v1.RuntimeService/Version",
        "/runtime.v1.ImageService/PullImage",
        "/runtime.v1.RuntimeService/SomeFutureMethod",
        "/grpc.health.v1.Health/Check",
    ] {
        let mut h = grpc_headers();
        h.insert("grpc-timeout", "5S".parse().unwrap());
        h.insert("x-custom-metadata", "abc".parse().unwrap());
        h.insert("x-bin-bin", "AAEC".parse().unwrap());
        let uri = format!("http://localhost{path}");
        let resp = raw_call(&pg.listen, &uri, h.clone(), frame(&req_msg)).await;

        let got = raw
            .recorded
            .lock()
            .unwrap()
            .pop()
            .expect("upstream saw the call");
        assert_eq!(got.uri.path(), path);
        assert_eq!(
            got.uri.authority().map(|a| a.as_str()),
            Some("localhost"),
            "{path}"
        );
        assert_eq!(got.body, frame(&req_msg), "{path}: request bytes changed");
        // The test client itself sends content-length (its body has a known size); it is kept too.
        let mut sent = h.clone();
        sent.insert("content-length", frame(&req_msg).len().into());
        assert_eq!(got.headers, sent, "{path}: request headers changed");

        assert_eq!(resp.status, 200);
        assert_eq!(resp.headers["x-upstream-header"], "kept");
        assert_eq!(resp.headers["content-type"], "application/grpc+proto");
        assert!(
            resp.headers.get("date").is_none(),
            "pullgate must not add headers"
        );
        assert_eq!(resp.body, framed, "{path}: response bytes changed");
        let t = resp.trailers.expect("trailers");
        assert_eq!(t["grpc-status"], "0");
        assert_eq!(t["x-upstream-trailer"], "kept-too");
    }
    pg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_only_answers_and_16_mib_messages_pass() {
    let dir = tempfile::tempdir().unwrap();
    let mut headers = HeaderMap::new();
    headers.insert("content-type", "application/grpc".parse().unwrap());
    headers.insert("grpc-status", "5".parse().unwrap());
    headers.insert("grpc-message", "no%20such%20thing".parse().unwrap());
    let p = dir.path().join("raw.sock");
    let _raw = RawUpstream::serve(
        &p,
        Script {
            headers,
            chunks: vec![],
            trailers: None,
            echo: false,
        },
    );
    let pg = Pullgate::start(dir.path(), &p, Duration::from_secs(1));
    let resp = raw_call(
        &pg.listen,
        "http://localhost/runtime.v1.RuntimeService/Version",
        grpc_headers(),
        frame(b""),
    )
    .await;
    assert_eq!(resp.headers["grpc-status"], "5");
    assert_eq!(resp.headers["grpc-message"], "no%20such%20thing");
    assert!(resp.body.is_empty());
    assert!(
        resp.trailers.is_none(),
        "a trailers-only answer must stay trailers-only"
    );
    pg.stop().await;

    // Echo server: a 16 MiB message through a forwarded method and back.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("echo.sock");
    let _raw = RawUpstream::serve(&p, Script::grpc_echo());
    let pg = Pullgate::start(dir.path(), &p, Duration::from_secs(1));
    let big: Vec<u8> = (0..16 * 1024 * 1024u32)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let resp = raw_call(
        &pg.listen,
        "http://localhost/runtime.v1.RuntimeService/ListContainers",
        grpc_headers(),
        frame(&big),
    )
    .await;
    assert_eq!(resp.body.len(), big.len() + 5);
    assert!(resp.body[5..] == big[..], "16 MiB body corrupted");
    // An intercepted method reads its message whole and forwards it: CreateContainer up to its
    // 4 MiB cap; past it, refused on the length prefix.
    let create = |len: usize| {
        cri::CreateContainerRequest {
            pod_sandbox_id: "x".repeat(len),
            ..Default::default()
        }
        .encode_to_vec()
    };
    let msg = create(4 * 1024 * 1024 - 16);
    assert!(msg.len() <= 4 * 1024 * 1024);
    let resp = raw_call(
        &pg.listen,
        "http://localhost/runtime.v1.RuntimeService/CreateContainer",
        grpc_headers(),
        frame(&msg),
    )
    .await;
    assert_eq!(resp.trailers.unwrap()["grpc-status"], "0");
    assert_eq!(resp.body, frame(&msg));
    let resp = raw_call(
        &pg.listen,
        "http://localhost/runtime.v1.RuntimeService/CreateContainer",
        grpc_headers(),
        frame(&create(16 * 1024 * 1024 - 16)),
    )
    .await;
    assert_eq!(resp.headers["grpc-status"], "8", "{:?}", resp.headers);
    let why = resp.headers["grpc-message"].to_str().unwrap();
    assert!(
        why.contains("server.limits.max_create_container_message"),
        "{why}"
    );
    // An image lookup is never that large: refused on its length prefix.
    let msg = cri::ImageStatusRequest {
        image: image_spec(&"x".repeat(2 * 1024 * 1024)),
        verbose: false,
    }
    .encode_to_vec();
    let resp = raw_call(
        &pg.listen,
        "http://localhost/runtime.v1.ImageService/ImageStatus",
        grpc_headers(),
        frame(&msg),
    )
    .await;
    assert_eq!(resp.headers["grpc-status"], "8", "{:?}", resp.headers);
    let why = resp.headers["grpc-message"].to_str().unwrap();
    assert!(why.contains("server.limits.max_small_message"), "{why}");
    pg.stop().await;
}

/// grpc-go and tonic often end a unary request with an empty DATA frame that only carries END_STREAM.
/// pullgate forwards such a request as one DATA frame with END_STREAM on it, so containerd gets the
/// whole call in one write and no task has to pump a remainder. (Single-threaded runtime: the
/// client's three frames leave in one write, as a real client's do.)
#[tokio::test]
async fn a_buffered_request_leaves_as_one_data_frame_with_end_stream() {
    let dir = tempfile::tempdir().unwrap();
    let upstream_path = dir.path().join("raw.sock");
    let raw = RawUpstream::serve(&upstream_path, Script::grpc_echo());
    let pg = Pullgate::start(dir.path(), &upstream_path, Duration::from_secs(1));

    let stream = UnixStream::connect(&pg.listen).await.unwrap();
    let (client, conn) = h2::client::handshake(stream).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let msg = frame(
        &cri::VersionRequest {
            version: "v1".into(),
        }
        .encode_to_vec(),
    );
    for round in 0..3 {
        let mut req = http::Request::post("http://localhost/runtime.v1.RuntimeService/Version")
            .body(())
            .unwrap();
        *req.headers_mut() = grpc_headers();
        let (resp, mut body) = client.send_request(req, false).unwrap();
        body.send_data(msg.clone(), false).unwrap();
        body.send_data(Bytes::new(), true).unwrap();
        let mut resp = resp.await.unwrap().into_body();
        let mut echoed = Vec::new();
        while let Some(d) = resp.data().await {
            let d = d.unwrap();
            let _ = resp.flow_control().release_capacity(d.len());
            echoed.extend_from_slice(&d);
        }
        let t = resp.trailers().await.unwrap().expect("trailers");
        assert_eq!(t["grpc-status"], "0");
        assert_eq!(echoed, msg, "round {round}: echo");

        let got = raw
            .recorded
            .lock()
            .unwrap()
            .pop()
            .expect("upstream saw the call");
        assert_eq!(got.body, msg, "round {round}: request bytes changed");
        assert_eq!(
            got.data_frames,
            vec![msg.len()],
            "round {round}: the request should reach the upstream as one DATA frame carrying END_STREAM"
        );
    }
    pg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_calls() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, _events) = FakeCri::new();
    let upstream = fake.serve(&dir.path().join("cri.sock"));
    let pg = Pullgate::start(dir.path(), &upstream.path, Duration::from_secs(5));
    let ch = cri_channel(&pg.listen).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let ch = ch.clone();
        tasks.spawn(async move {
            if i % 2 == 0 {
                let v = runtime_client(ch)
                    .version(cri::VersionRequest {
                        version: format!("v{i}"),
                    })
                    .await?;
                assert_eq!(v.into_inner().version, format!("v{i}"));
            } else {
                let name = format!("docker.io/library/app{i}:1");
                let s = image_client(ch)
                    .image_status(cri::ImageStatusRequest {
                        image: image_spec(&name),
                        verbose: false,
                    })
                    .await?;
                assert_eq!(s.into_inner().image.unwrap().repo_tags, vec![name]);
            }
            Ok::<_, tonic::Status>(())
        });
    }
    let mut ok = 0;
    while let Some(r) = tasks.join_next().await {
        r.unwrap().unwrap();
        ok += 1;
    }
    assert_eq!(ok, 200);
    assert_eq!(fake.observed.calls.load(Ordering::Relaxed), 200);
    pg.stop().await;
    upstream.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_gives_unavailable_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let cri_path = dir.path().join("cri.sock");
    // Nothing listens yet: pullgate starts anyway and answers UNAVAILABLE naming the socket.
    let pg = Pullgate::start(dir.path(), &cri_path, Duration::from_secs(5));
    let mut rv = runtime_client(cri_channel(&pg.listen).await);
    let e = rv
        .version(cri::VersionRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable);
    assert!(
        e.message().contains(cri_path.to_str().unwrap()),
        "{}",
        e.message()
    );

    let (fake, _ev) = FakeCri::new();
    let up = fake.serve(&cri_path);
    assert!(rv.version(cri::VersionRequest::default()).await.is_ok());
    // Kill the upstream: calls fail with UNAVAILABLE, pullgate stays up.
    up.stop().await;
    for _ in 0..3 {
        let e = rv
            .version(cri::VersionRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    }
    // Restart it: the same client connection to pullgate works again, no pullgate restart.
    let (fake2, _ev2) = FakeCri::new();
    let up2 = fake2.serve(&cri_path);
    let v = rv
        .version(cri::VersionRequest {
            version: "again".into(),
        })
        .await
        .unwrap();
    assert_eq!(v.into_inner().version, "again");
    assert_eq!(fake2.observed.calls.load(Ordering::Relaxed), 1);
    pg.stop().await;
    up2.stop().await;
}

/// An echo runtime whose connections all end when it stops (a containerd restart). It stops reading
/// a request past 8 MiB, so a larger call fills every window on the way.
struct EchoRuntime {
    task: tokio::task::JoinHandle<()>,
}

impl EchoRuntime {
    fn serve(path: &Path) -> EchoRuntime {
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                conns.spawn(async move {
                    let mut conn = h2::server::handshake(stream).await.expect("handshake");
                    while let Some(Ok((req, mut respond))) = conn.accept().await {
                        tokio::spawn(async move {
                            let mut body = req.into_body();
                            let mut got = Vec::new();
                            while let Some(Ok(d)) = body.data().await {
                                let _ = body.flow_control().release_capacity(d.len());
                                got.extend_from_slice(&d);
                                if got.len() > 8 << 20 {
                                    // Larger calls are held unread, their windows left full.
                                    std::future::pending::<()>().await;
                                }
                            }
                            let resp = http::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(())
                                .unwrap();
                            let Ok(mut send) = respond.send_response(resp, false) else {
                                return;
                            };
                            let mut rest = Bytes::from(got);
                            // Within the window the client gives, as a runtime does.
                            while !rest.is_empty() {
                                send.reserve_capacity(rest.len());
                                let Some(Ok(n)) =
                                    std::future::poll_fn(|cx| send.poll_capacity(cx)).await
                                else {
                                    return;
                                };
                                let _ = send.send_data(rest.split_to(n.min(rest.len())), false);
                            }
                            let mut t = HeaderMap::new();
                            t.insert("grpc-status", "0".parse().unwrap());
                            let _ = send.send_trailers(t);
                        });
                    }
                });
            }
        });
        EchoRuntime { task }
    }

    /// Stops accepting and ends every connection at once.
    fn stop(self) {
        self.task.abort();
    }
}

/// One call on an open HTTP/2 client connection: the gRPC status and the body that came back.
async fn echo_on(client: &h2::client::SendRequest<Bytes>, body: Bytes) -> (String, Bytes) {
    call_on(
        client.clone(),
        "/runtime.v1.RuntimeService/ListContainers",
        body,
    )
    .await
}

/// One call on `path` with `body` on the client's connection: its status and answer.
async fn call_on(
    client: h2::client::SendRequest<Bytes>,
    path: &str,
    body: Bytes,
) -> (String, Bytes) {
    let mut client = client.ready().await.expect("the client connection is open");
    let mut req = http::Request::post(format!("http://localhost{path}"))
        .body(())
        .unwrap();
    *req.headers_mut() = grpc_headers();
    let (resp, mut send) = client.send_request(req, false).unwrap();
    let mut rest = body;
    // Sending stops early if the call is answered (or reset) before its request is all sent.
    while !rest.is_empty() {
        send.reserve_capacity(rest.len());
        let Some(Ok(n)) = std::future::poll_fn(|cx| send.poll_capacity(cx)).await else {
            break;
        };
        if send
            .send_data(rest.split_to(n.min(rest.len())), false)
            .is_err()
        {
            break;
        }
    }
    let _ = send.send_data(Bytes::new(), true);
    let resp = resp.await.expect("response");
    let status_of = |h: &HeaderMap| h.get("grpc-status").map(|v| v.to_str().unwrap().to_owned());
    if let Some(s) = status_of(resp.headers()) {
        return (s, Bytes::new());
    }
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(d) = body.data().await {
        let d = d.expect("response data");
        let _ = body.flow_control().release_capacity(d.len());
        got.extend_from_slice(&d);
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    (status_of(&trailers).expect("grpc-status"), Bytes::from(got))
}

/// A client's connection outlives containerd restarts: its calls in between end UNAVAILABLE, and
/// afterwards large messages pass both ways on the same connection (pullgate opens a new one to
/// containerd and settles the flow-control windows the old one left behind).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_connection_outlives_containerd_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("echo.sock");
    let pg = Pullgate::start(dir.path(), &path, Duration::from_secs(1));
    let stream = UnixStream::connect(&pg.listen).await.unwrap();
    let (client, conn) = h2::client::handshake(stream).await.unwrap();
    let conn = tokio::spawn(conn);
    let big = || {
        Bytes::from(
            (0..(3 << 20) + 17)
                .map(|i: u32| (i * 13 % 251) as u8)
                .collect::<Vec<_>>(),
        )
    };
    for round in 0..3 {
        let runtime = EchoRuntime::serve(&path);
        // Several large messages, so every window on the way is used up and given back.
        for _ in 0..3 {
            let (status, got) =
                tokio::time::timeout(Duration::from_secs(20), echo_on(&client, big()))
                    .await
                    .expect("the echo ends: no window is left short");
            assert_eq!(status, "0", "round {round}");
            assert!(got == big(), "round {round}: the echo differs");
        }
        let (status, got) = echo_on(&client, Bytes::from_static(b"small")).await;
        assert_eq!((status.as_str(), &got[..]), ("0", &b"small"[..]));
        // containerd goes away in the middle of a large call it stopped reading: what was in flight
        // is lost, and the windows on the way were full.
        let cut = tokio::spawn({
            let client = client.clone();
            async move { echo_on(&client, Bytes::from(vec![1u8; 16 << 20])).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        runtime.stop();
        let (status, _) = tokio::time::timeout(Duration::from_secs(10), cut)
            .await
            .expect("the cut call ends")
            .unwrap();
        assert_eq!(status, "14", "round {round}: the cut call is UNAVAILABLE");
        // containerd is gone: the call fails as unavailable, on the same connection.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (status, _) = echo_on(&client, Bytes::from_static(b"x")).await;
        assert_eq!(
            status, "14",
            "round {round}: UNAVAILABLE while containerd is down"
        );
    }
    assert!(!conn.is_finished(), "the client connection stayed open");
    pg.stop().await;
}

/// Forwards `CreateContainer` and edits its answer, which pullgate then holds whole and sends as
/// its own: the edit keeps the message as containerd sent it.
struct KeepAnswer;

impl Handler for KeepAnswer {
    fn handle<'a>(&'a self, _call: Call<'a>) -> BoxFuture<'a, Verdict> {
        Box::pin(async {
            Verdict::Rewrite {
                request: None,
                response: Box::new(|m: &[u8]| Some(m.to_vec())),
            }
        })
    }
}

/// pullgate in front of `upstream` with `CreateContainer`'s answers held and sent by pullgate.
fn start_holding_answers(dir: &Path, upstream: &Path, grace: Duration) -> Pullgate {
    let mut table = InterceptTable::empty();
    table.insert(methods::CREATE_CONTAINER, std::sync::Arc::new(KeepAnswer));
    Pullgate::start_with(dir, upstream, grace, table)
}

/// Holds each `CreateContainer` until a permit is given, then forwards it — or answers it itself
/// when its sandbox ID is "deny".
struct Held {
    arrived: std::sync::atomic::AtomicUsize,
    gate: tokio::sync::Semaphore,
}

impl Handler for Held {
    fn handle<'a>(&'a self, call: Call<'a>) -> BoxFuture<'a, Verdict> {
        Box::pin(async move {
            self.arrived.fetch_add(1, Ordering::SeqCst);
            let _permit = self.gate.acquire().await.unwrap();
            let req = cri::CreateContainerRequest::decode(call.message.as_ref()).unwrap();
            match req.pod_sandbox_id.as_str() {
                "deny" => Verdict::Respond(Status::new(Code::PermissionDenied, "denied")),
                _ => Verdict::Forward,
            }
        })
    }
}

/// Calls decided after later calls went to containerd still reach it: stream IDs must rise on
/// containerd's connection, so a call still being decided is opened there before a later one
/// goes, and cancelled there when pullgate answers it itself. containerd's connection survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_decided_after_later_calls_keep_containerds_stream_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("echo.sock");
    let raw = RawUpstream::serve(&path, Script::grpc_echo());
    let held = std::sync::Arc::new(Held {
        arrived: Default::default(),
        gate: tokio::sync::Semaphore::new(0),
    });
    let mut table = InterceptTable::empty();
    table.insert(methods::CREATE_CONTAINER, held.clone());
    let pg = Pullgate::start_with(dir.path(), &path, Duration::from_secs(1), table);
    let stream = UnixStream::connect(&pg.listen).await.unwrap();
    let (client, conn) = h2::client::handshake(stream).await.unwrap();
    let conn = tokio::spawn(conn);
    let create = |id: &str| {
        frame(
            &cri::CreateContainerRequest {
                pod_sandbox_id: id.into(),
                ..Default::default()
            }
            .encode_to_vec(),
        )
    };
    for (round, id) in ["keep", "deny"].into_iter().enumerate() {
        let first = tokio::spawn(call_on(
            client.clone(),
            methods::CREATE_CONTAINER,
            create(id),
        ));
        let waiting = std::time::Instant::now();
        while held.arrived.load(Ordering::SeqCst) <= round {
            assert!(
                waiting.elapsed() < Duration::from_secs(10),
                "the call reaches its handler"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // A later call goes to containerd while the first is being decided.
        let (status, body) = echo_on(&client, Bytes::from_static(b"later")).await;
        assert_eq!((status.as_str(), &body[..]), ("0", &b"later"[..]), "{id}");
        held.gate.add_permits(1);
        let (status, body) = tokio::time::timeout(Duration::from_secs(10), first)
            .await
            .expect("the held call ends")
            .unwrap();
        match id {
            "keep" => assert_eq!((status.as_str(), body), ("0", create(id))),
            _ => assert_eq!(status, "7", "answered by pullgate"),
        }
    }
    let (status, _) = echo_on(&client, Bytes::from_static(b"last")).await;
    assert_eq!(status, "0", "containerd's connection is still good");
    assert!(!conn.is_finished());
    // containerd got the requests in the order they were sent on, the denied one never whole.
    let bodies: Vec<Bytes> = raw
        .recorded
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.body.clone())
        .collect();
    assert_eq!(
        bodies,
        [
            Bytes::from_static(b"later"),
            create("keep"),
            Bytes::from_static(b"later"),
            Bytes::from_static(b"last"),
        ]
    );
    pg.stop().await;
}

/// Denies every `CreateContainer` at once.
struct DenyAll;

impl Handler for DenyAll {
    fn handle<'a>(&'a self, _call: Call<'a>) -> BoxFuture<'a, Verdict> {
        Box::pin(async { Verdict::Respond(Status::new(Code::PermissionDenied, "denied")) })
    }
}

/// A call pullgate answers itself never reaches containerd, not even its headers, when a
/// forwarded call follows it in the same write: its complete request is decided before the later
/// call goes (which would otherwise have to open it upstream first, stream IDs must rise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_call_pipelined_with_a_forwarded_one_never_reaches_containerd() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("echo.sock");
    let raw = RawUpstream::serve(&path, Script::grpc_echo());
    let mut table = InterceptTable::empty();
    table.insert(methods::CREATE_CONTAINER, std::sync::Arc::new(DenyAll));
    let pg = Pullgate::start_with(dir.path(), &path, Duration::from_secs(1), table);
    let stream = UnixStream::connect(&pg.listen).await.unwrap();
    let (client, conn) = h2::client::handshake(stream).await.unwrap();
    tokio::spawn(conn);
    // Warm up: containerd's connection is open and settled.
    assert_eq!(echo_on(&client, Bytes::from_static(b"warm")).await.0, "0");
    let heads = raw.heads.load(Ordering::SeqCst);
    for round in 0..20 {
        // Both requests are queued before the connection task writes: they leave together.
        let mut c = client.clone().ready().await.unwrap();
        let mut req = http::Request::post(format!("http://localhost{}", methods::CREATE_CONTAINER))
            .body(())
            .unwrap();
        *req.headers_mut() = grpc_headers();
        let (denied, mut send) = c.send_request(req, false).unwrap();
        send.send_data(frame(b""), true).unwrap();
        let mut c = c.ready().await.unwrap();
        let mut req =
            http::Request::post("http://localhost/runtime.v1.RuntimeService/ListContainers")
                .body(())
                .unwrap();
        *req.headers_mut() = grpc_headers();
        let (forwarded, mut send) = c.send_request(req, false).unwrap();
        send.send_data(Bytes::from_static(b"later"), true).unwrap();
        let denied = tokio::time::timeout(Duration::from_secs(10), denied)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(denied.headers()["grpc-status"], "7", "round {round}");
        let forwarded = tokio::time::timeout(Duration::from_secs(10), forwarded)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(forwarded.status(), 200);
    }
    assert_eq!(
        raw.heads.load(Ordering::SeqCst) - heads,
        20,
        "containerd saw the forwarded calls only"
    );
    pg.stop().await;
}

/// A raw HTTP/2 client whose initial stream window is 0: it opens each stream's window with a
/// WINDOW_UPDATE after sending its request, as RFC 9113 allows. Prints `status length` per call.
const PY_ZERO_WINDOW: &str = r#"
import socket, sys
import h2.config, h2.connection, h2.events, h2.settings
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
c = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
c.initiate_connection()
c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
s.sendall(c.data_to_send())
body = bytes.fromhex(sys.argv[3])
for _ in range(int(sys.argv[4])):
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":authority", "localhost"),
                         (":path", sys.argv[2]), ("content-type", "application/grpc"),
                         ("te", "trailers")])
    c.send_data(sid, body, end_stream=True)
    c.increment_flow_control_window(1 << 20, stream_id=sid)
    s.sendall(c.data_to_send())
    status, got, done = None, b"", False
    while not done:
        data = s.recv(65536)
        if not data:
            sys.exit("connection closed")
        for ev in c.receive_data(data):
            if isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                got += ev.data
                c.acknowledge_received_data(ev.flow_controlled_length, sid)
            elif isinstance(ev, (h2.events.ResponseReceived, h2.events.TrailersReceived)) and ev.stream_id == sid:
                status = dict(ev.headers).get(b"grpc-status", status)
            elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                done = True
            elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                sys.exit("stream reset")
        s.sendall(c.data_to_send())
    print(status.decode(), len(got), flush=True)
"#;

/// Runs a raw HTTP/2 client written with python3-h2 (`SCRIPT LISTEN CreateContainer HEX ARGS…`,
/// the message as hex) against `listen`; what it printed, once it succeeded.
async fn raw_h2_client(script: &'static str, listen: &Path, msg: &[u8], args: &[&str]) -> String {
    let python = "/usr/bin/python3";
    let ok = std::process::Command::new(python)
        .args(["-c", "import h2"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "the raw HTTP/2 client is missing: {python} cannot import h2; install the Debian package \
         python3-h2 (scripts/install-deps.sh does)"
    );
    let mut command = std::process::Command::new(python);
    command
        .args(["-c", script])
        .arg(listen)
        .arg(methods::CREATE_CONTAINER)
        .arg(msg.iter().map(|b| format!("{b:02x}")).collect::<String>())
        .args(args);
    let out = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Intercepted calls pullgate forwards, relayed or edited, reach a client that gives each
/// stream's window only after sending its request (initial window 0): the room it gave while the
/// call was decided is passed on to containerd, and an answer pullgate gathers has a window of its
/// own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intercepted_calls_reach_a_client_that_opens_stream_windows_itself() {
    let msg = frame(
        &cri::CreateContainerRequest {
            pod_sandbox_id: "x".repeat(100),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    for holding in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("echo.sock");
        let _raw = RawUpstream::serve(&p, Script::grpc_echo());
        let pg = match holding {
            // Forwarded and relayed (the logging table forwards CreateContainer unchanged).
            false => Pullgate::start(dir.path(), &p, Duration::from_secs(1)),
            // Forwarded and its answer gathered and edited.
            true => start_holding_answers(dir.path(), &p, Duration::from_secs(1)),
        };
        let stdout = raw_h2_client(PY_ZERO_WINDOW, &pg.listen, &msg, &["3"]).await;
        let want = format!("0 {}\n", msg.len()).repeat(3);
        assert_eq!(stdout, want, "holding {holding}");
        pg.stop().await;
    }
}

/// A raw HTTP/2 client that makes two calls, one after the other, and prints for the second what
/// reached it in order: `W <n>` for a connection WINDOW_UPDATE, `H` for the answer's headers, `E`
/// when the stream ended (events that arrive with the end are printed too).
const PY_WINDOW_ORDER: &str = r#"
import socket, sys
import h2.config, h2.connection, h2.events
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
c = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
c.initiate_connection()
s.sendall(c.data_to_send())
body = bytes.fromhex(sys.argv[3])
for call in range(2):
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":authority", "localhost"),
                         (":path", sys.argv[2]), ("content-type", "application/grpc"),
                         ("te", "trailers")])
    c.send_data(sid, body, end_stream=True)
    s.sendall(c.data_to_send())
    seen, done = [], False
    while not done:
        data = s.recv(65536)
        if not data:
            sys.exit("connection closed")
        for ev in c.receive_data(data):
            if isinstance(ev, h2.events.WindowUpdated) and ev.stream_id == 0:
                seen.append("W %d" % ev.delta)
            elif isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                seen.append("H")
            elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                c.acknowledge_received_data(ev.flow_controlled_length, sid)
            elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                seen.append("E")
                done = True
            elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                sys.exit("stream reset")
        s.sendall(c.data_to_send())
print(" ".join(seen), flush=True)
"#;

/// The connection window a call's request spent while pullgate decided it comes back to kubelet
/// with the call's answer, in the same write, not in a frame of its own ahead of the request's
/// way to containerd (which would cost kubelet a wake-up and pullgate a write on every call).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decided_calls_window_comes_back_with_its_answer() {
    let msg = frame(
        &cri::CreateContainerRequest {
            pod_sandbox_id: "x".repeat(100),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("echo.sock");
    let _raw = RawUpstream::serve(&p, Script::grpc_echo());
    // The logging table decides CreateContainer and forwards it unchanged.
    let pg = Pullgate::start(dir.path(), &p, Duration::from_secs(1));
    let stdout = raw_h2_client(PY_WINDOW_ORDER, &pg.listen, &msg, &[]).await;
    // The answer's frames and the WINDOW_UPDATE leave in one write: after the headers, before or
    // after the end of the stream.
    let seen: Vec<&str> = stdout.trim().split(' ').collect();
    assert_eq!(
        seen.first(),
        Some(&"H"),
        "nothing ahead of the answer: {stdout}"
    );
    let given: Vec<&str> = seen
        .windows(2)
        .filter(|w| w[0] == "W")
        .map(|w| w[1])
        .collect();
    assert_eq!(given, [msg.len().to_string()], "all of it, once: {stdout}");
    pg.stop().await;
}

/// Answers pullgate gathers to edit use containerd's connection window without kubelet seeing
/// them: pullgate gives that room back itself (with kubelet's WINDOW_UPDATEs, or on its own once
/// enough is owed), so many of them on one connection, together far over the 64 KiB window
/// containerd starts with, all arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edited_answers_give_containerd_its_window_back() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("echo.sock");
    let _raw = RawUpstream::serve(&p, Script::grpc_echo());
    let pg = start_holding_answers(dir.path(), &p, Duration::from_secs(1));
    let stream = UnixStream::connect(&pg.listen).await.unwrap();
    let (client, conn) = h2::client::handshake(stream).await.unwrap();
    tokio::spawn(conn);
    for i in 0..64 {
        let msg = frame(
            &cri::CreateContainerRequest {
                pod_sandbox_id: format!("{i:08}").repeat(1024),
                ..Default::default()
            }
            .encode_to_vec(),
        );
        let call = call_on(client.clone(), methods::CREATE_CONTAINER, msg.clone());
        let (status, body) = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .unwrap_or_else(|_| panic!("call {i} is answered"));
        assert_eq!((status.as_str(), body), ("0", msg), "call {i}");
    }
    pg.stop().await;
}

/// A client with a large stream window and a small connection window: an answer it does not read
/// waits in pullgate for its connection window.
async fn hoarding_client(
    listen: &Path,
) -> (
    h2::client::SendRequest<Bytes>,
    h2::client::Connection<UnixStream, Bytes>,
) {
    let stream = UnixStream::connect(listen).await.unwrap();
    h2::client::Builder::new()
        .initial_window_size(16 << 20)
        .initial_connection_window_size(65_535)
        .handshake::<_, Bytes>(stream)
        .await
        .unwrap()
}

/// Sends a `CreateContainer` (intercepted) whose
/// message is about `len` bytes; returns the framed message and the response to come.
async fn send_create_container(
    client: h2::client::SendRequest<Bytes>,
    len: usize,
) -> (Bytes, h2::client::ResponseFuture) {
    let msg = frame(
        &cri::CreateContainerRequest {
            pod_sandbox_id: "x".repeat(len),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    let mut client = client.ready().await.unwrap();
    let mut req = http::Request::post("http://localhost/runtime.v1.RuntimeService/CreateContainer")
        .body(())
        .unwrap();
    *req.headers_mut() = grpc_headers();
    let (resp, mut send) = client.send_request(req, false).unwrap();
    let mut rest = msg.clone();
    while !rest.is_empty() {
        send.reserve_capacity(rest.len());
        let n = std::future::poll_fn(|cx| send.poll_capacity(cx))
            .await
            .unwrap()
            .unwrap();
        send.send_data(rest.split_to(n.min(rest.len())), false)
            .unwrap();
    }
    send.send_data(Bytes::new(), true).unwrap();
    (msg, resp)
}

/// A client that lets a large answer wait (its connection window is small, its stream window
/// large) is still read: its PINGs are answered while megabytes of the answer wait for its window,
/// and the answer arrives whole once it reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_waiting_for_the_clients_window_do_not_stop_pullgate_reading_it() {
    const LIMIT: Duration = Duration::from_secs(10);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("echo.sock");
    let _raw = RawUpstream::serve(&p, Script::grpc_echo());
    let pg = start_holding_answers(dir.path(), &p, Duration::from_secs(1));
    let (client, mut conn) = hoarding_client(&pg.listen).await;
    let mut ping = conn.ping_pong().expect("ping handle");
    tokio::spawn(conn);
    // CreateContainer's answer is held and sent by pullgate: 3 MiB each way.
    let (msg, resp) = send_create_container(client, 3 << 20).await;
    let resp = tokio::time::timeout(LIMIT, resp).await.unwrap().unwrap();
    // The answer now waits for the client's connection window, which it does not give.
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::time::timeout(Duration::from_secs(2), ping.ping(h2::Ping::opaque()))
        .await
        .expect("the client's PING is answered while the answer waits")
        .unwrap();
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(d) = tokio::time::timeout(LIMIT, body.data()).await.unwrap() {
        let d = d.unwrap();
        let _ = body.flow_control().release_capacity(d.len());
        got.extend_from_slice(&d);
    }
    assert!(got == msg, "the answer arrives whole");
    pg.stop().await;
}

/// On shutdown, a connection whose calls are over but whose client does not take the rest of an
/// answer pullgate holds (it gives no connection window) is dropped a grace period after the final
/// GOAWAY, not held for the whole drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closing_connection_whose_client_takes_no_answers_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("echo.sock");
    let _raw = RawUpstream::serve(&p, Script::grpc_echo());
    let pg = start_holding_answers(dir.path(), &p, Duration::from_secs(20));
    let (client, conn) = hoarding_client(&pg.listen).await;
    tokio::spawn(conn);
    let (_, resp) = send_create_container(client, 1 << 20).await;
    let _resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .unwrap()
        .unwrap();
    // The answer's body waits for window the client never gives.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let summary = pg.stop().await;
    assert_eq!(summary.aborted_connections, 0, "dropped, not aborted");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "held for {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_drains_in_flight_calls() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, events) = FakeCri::new();
    let upstream = fake.serve(&dir.path().join("cri.sock"));
    let pg = Pullgate::start(dir.path(), &upstream.path, Duration::from_secs(3));
    let listen = pg.listen.clone();
    let mut rv = runtime_client(cri_channel(&listen).await);
    let slow = tokio::spawn(async move {
        rv.exec_sync(cri::ExecSyncRequest {
            container_id: "c".into(),
            cmd: vec!["done".into()],
            timeout: 800,
        })
        .await
    });
    wait_execs(&fake.observed, 1).await;
    let started = std::time::Instant::now();
    let summary = pg.stop().await;
    let resp = slow
        .await
        .unwrap()
        .expect("in-flight call completes during the drain");
    assert_eq!(resp.into_inner().stdout, b"done");
    assert_eq!(summary.aborted_connections, 0);
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(!listen.exists(), "socket removed on exit");
    assert!(UnixStream::connect(&listen).await.is_err());
    drop(events);

    // A stream that outlives the grace period is closed when it runs out.
    let (fake, _events) = FakeCri::new();
    let upstream2 = fake.serve(&dir.path().join("cri2.sock"));
    let pg = Pullgate::start(dir.path(), &upstream2.path, Duration::from_millis(300));
    let mut rv = runtime_client(cri_channel(&pg.listen).await);
    let mut stream = rv
        .get_container_events(cri::GetEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    let summary = pg.stop().await;
    assert_eq!(summary.aborted_connections, 1);
    assert!(
        stream.message().await.is_err(),
        "stream must end with an error after the grace"
    );
    upstream.stop().await;
    upstream2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_and_cancellation_propagate() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, _events) = FakeCri::new();
    let upstream = fake.serve(&dir.path().join("cri.sock"));
    let pg = Pullgate::start(dir.path(), &upstream.path, Duration::from_secs(1));
    // grpc-timeout travels to the upstream, which enforces it: same status as a direct call.
    let exec = cri::ExecSyncRequest {
        timeout: 3000,
        ..Default::default()
    }
    .encode_to_vec();
    let uri = "http://localhost/runtime.v1.RuntimeService/ExecSync";
    let mut h = grpc_headers();
    h.insert("grpc-timeout", "200m".parse().unwrap());
    let started = std::time::Instant::now();
    let via = raw_call(&pg.listen, uri, h.clone(), frame(&exec)).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "deadline not enforced"
    );
    let direct = raw_call(&upstream.path, uri, h, frame(&exec)).await;
    let status = |r: &RawResponse| {
        r.headers
            .get("grpc-status")
            .or(r.trailers.as_ref().and_then(|t| t.get("grpc-status")))
            .cloned()
    };
    assert_ne!(status(&via).unwrap(), "0");
    assert_eq!(status(&via), status(&direct));
    wait_for(|| fake.observed.cancelled.load(Ordering::SeqCst)).await;
    assert!(!fake.observed.completed.load(Ordering::SeqCst));

    // A client that gives up (drops the call) cancels the upstream call too.
    fake.observed.cancelled.store(false, Ordering::SeqCst);
    let mut rv = runtime_client(cri_channel(&pg.listen).await);
    let call = rv.exec_sync(cri::ExecSyncRequest {
        timeout: 3000,
        ..Default::default()
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(200), call)
            .await
            .is_err()
    );
    wait_for(|| fake.observed.cancelled.load(Ordering::SeqCst)).await;
    assert!(!fake.observed.completed.load(Ordering::SeqCst));
    pg.stop().await;
    upstream.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_answers_and_never_takes_the_daemon_down() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, _events) = FakeCri::new();
    let upstream = fake.serve(&dir.path().join("cri.sock"));
    let pg = Pullgate::start(dir.path(), &upstream.path, Duration::from_secs(1));

    // HTTP/1 request: a plain-text 505 that says what the socket speaks.
    let mut s = UnixStream::connect(&pg.listen).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 505"), "{out}");
    assert!(out.contains("gRPC over HTTP/2"), "{out}");

    // Random bytes: an HTTP/2 GOAWAY with PROTOCOL_ERROR and a reason.
    let mut s = UnixStream::connect(&pg.listen).await.unwrap();
    s.write_all(b"\x16\x03\x01\x00\xa5random bytes that are not http2 at all")
        .await
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    assert_eq!(out[3], 7, "GOAWAY frame type");
    assert_eq!(&out[13..17], &[0, 0, 0, 1], "PROTOCOL_ERROR");
    assert!(String::from_utf8_lossy(&out).contains("HTTP/2 connection preface"));

    // A client that connects and leaves; one that disconnects mid-request.
    drop(UnixStream::connect(&pg.listen).await.unwrap());
    let mut s = UnixStream::connect(&pg.listen).await.unwrap();
    s.write_all(pullgate::node::proxy::conn::PREFACE)
        .await
        .unwrap();
    s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap(); // empty SETTINGS
    drop(s);

    let pull = "http://localhost/runtime.v1.ImageService/PullImage";
    let expect = |r: &RawResponse, code: &str, words: &str| {
        assert_eq!(r.headers["grpc-status"], code, "{r:?}");
        let msg = percent_decode(r.headers["grpc-message"].to_str().unwrap());
        assert!(msg.contains(words), "{msg}");
        assert!(msg.contains("PullImage"), "{msg}");
    };
    // Malformed gRPC frame: announced length does not match.
    let r = raw_call(
        &pg.listen,
        pull,
        grpc_headers(),
        Bytes::from_static(b"\0\0\0\0\x09abc"),
    )
    .await;
    expect(&r, "3", "announces 9 bytes");
    // Valid frame, but not a protobuf PullImageRequest.
    let r = raw_call(&pg.listen, pull, grpc_headers(), frame(b"\x0a\x05ab")).await;
    expect(&r, "3", "not a valid PullImage");
    // Oversized: 16 MiB + 1.
    let big = vec![0u8; 16 * 1024 * 1024 + 1];
    let r = raw_call(&pg.listen, pull, grpc_headers(), frame(&big)).await;
    expect(&r, "8", "limit");
    // Compressed frame on an intercepted method.
    let mut h = grpc_headers();
    h.insert("grpc-encoding", "gzip".parse().unwrap());
    let r = raw_call(&pg.listen, pull, h, Bytes::from_static(b"\x01\0\0\0\x02ab")).await;
    expect(&r, "12", "compressed");
    assert_eq!(r.headers["grpc-accept-encoding"], "identity");
    assert!(
        fake.observed.pulls.lock().unwrap().is_empty(),
        "no bad request reached containerd"
    );

    // After all that, the daemon still serves.
    let mut rv = runtime_client(cri_channel(&pg.listen).await);
    assert_eq!(
        rv.version(cri::VersionRequest {
            version: "ok".into()
        })
        .await
        .unwrap()
        .into_inner()
        .version,
        "ok"
    );
    pg.stop().await;
    upstream.stop().await;
}

async fn wait_for(cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "condition not reached within 3s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_cri_and_malformed_paths_never_reach_the_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    let p = dir.path().join("raw.sock");
    let raw = RawUpstream::serve(
        &p,
        Script {
            headers: HeaderMap::new(),
            chunks: vec![],
            trailers: Some(trailers),
            echo: true,
        },
    );
    let pg = Pullgate::start(dir.path(), &p, Duration::from_secs(1));
    for (path, code, words) in [
        (
            "/containerd.services.tasks.v1.Tasks/Create",
            "7",
            "not part of the CRI API",
        ),
        (
            "/containerd.services.images.v1.Images/Create",
            "7",
            "forward_non_cri",
        ),
        (
            "/runtime.v1.ImageService/Pull%49mage",
            "12",
            "not a gRPC method path",
        ),
        (
            "/runtime.v1.ImageService/PullImage/",
            "12",
            "not a gRPC method path",
        ),
    ] {
        let r = raw_call(
            &pg.listen,
            &format!("http://localhost{path}"),
            grpc_headers(),
            frame(b""),
        )
        .await;
        assert_eq!(r.headers["grpc-status"], code, "{path}");
        let msg = percent_decode(r.headers["grpc-message"].to_str().unwrap());
        assert!(msg.contains(words), "{path}: {msg}");
    }
    assert!(
        raw.recorded.lock().unwrap().is_empty(),
        "nothing reached the upstream"
    );
    // CRI methods, including ones newer than pullgate, and health checks still pass.
    for path in [
        "/runtime.v1.RuntimeService/SomeFutureMethod",
        "/grpc.health.v1.Health/Check",
    ] {
        let r = raw_call(
            &pg.listen,
            &format!("http://localhost{path}"),
            grpc_headers(),
            frame(b"x"),
        )
        .await;
        assert_eq!(r.trailers.unwrap()["grpc-status"], "0", "{path}");
    }
    assert_eq!(raw.recorded.lock().unwrap().len(), 2);
    pg.stop().await;
}
