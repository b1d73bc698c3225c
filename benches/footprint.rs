//! Node footprint benchmark (`cargo bench --bench footprint`): what a real `pullgate serve` process
//! costs a node when nothing special happens.
//!
//! - Idle resident memory (`VmRSS`, and the peak `VmHWM`) of `pullgate serve` with no bundle and with
//!   a signed 100,000-image bundle installed, a few seconds after it started listening.
//! - CPU at kubelet's rate of calls, as a share of one core, beside the CPU a *null relay* (this binary
//!   re-executed as a process that only copies bytes between two unix sockets: the floor any proxy in a
//!   separate process pays) uses for the same calls, and the ratio; and how often each was woken
//!   per call (each wake-up of an idle process costs a vCPU's way out of halt).
//!
//! The load is kubelet's pod lifecycle event generator (PLEG) relisting a node of 100 pods (one
//! container each) once a second: `ListPodSandbox` and `ListContainers` (all 100 of each in the
//! answers), then, for every pod, `PodSandboxStatus` and `ContainerStatus` — what kubelet asks about a
//! pod when it inspects it. kubelet inspects a pod only when the relist saw it change (and each pod's
//! worker about once a minute), so re-inspecting all 100 pods every second, 202 calls a second, is an
//! upper bound of the steady state. Calls go out one after another on one connection, as kubelet's
//! relist does. The upstream answers every call with canned messages the size containerd's would be
//! (the containerd event stream pullgate's lockdown watcher subscribes to stays open and quiet).
//!
//! Settings: `BENCH_SECS` (seconds of load per round, default 10), `BENCH_ROUNDS` (rounds per path,
//! pullgate and relay alternating, default 2), `BENCH_PULLGATE_BIN` (measure another build).

#[path = "support/bundle.rs"]
mod bundle;
#[path = "../tests/fake_cri/mod.rs"]
mod fake_cri;
#[path = "support/malloc.rs"]
#[allow(dead_code)] // `run_as_deployed` is for benchmarks that measure in their own process
mod malloc;
#[path = "support/procs.rs"]
mod procs;

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_cri::v1 as cri;
use procs::{Proc, pullgate_bin, relay_if_asked, serve, setting, start_relay, wakeups};

const PODS: usize = 100;
const IMAGES: usize = 100_000;
/// `pullgate serve` with its state in `dir/state-NAME` (a bundle installed there beforehand is
/// loaded at start), listening on `dir/NAME.sock`.
fn start_pullgate(
    dir: &Path,
    upstream: &Path,
    name: &str,
    tunables: Option<&str>,
) -> (Proc, PathBuf) {
    let listen = dir.join(format!("{name}.sock"));
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "[log]\nlevel = \"error\"\n[policy]\nstate_dir = \"{}\"\ntrust = \"{}\"\n[metrics]\nlisten = \"off\"\n",
            dir.join(format!("state-{name}")).display(),
            dir.join("trust.toml").display()
        ),
    )
    .unwrap();
    let mut command = Command::new(pullgate_bin());
    match tunables {
        Some(t) => command.env("GLIBC_TUNABLES", t),
        None => command.env_remove("GLIBC_TUNABLES"),
    };
    let child = serve(command, &config, &listen, upstream);
    (child, listen)
}

// ---------------------------------------------------------------------------------------------------
// The upstream: canned answers the size of containerd's for a node of 100 pods.

fn grpc_message(m: &impl prost::Message) -> Bytes {
    let len = m.encoded_len();
    let mut b = Vec::with_capacity(5 + len);
    b.push(0);
    b.extend_from_slice(&(len as u32).to_be_bytes());
    m.encode(&mut b).unwrap();
    b.into()
}

fn pod_id(i: usize) -> String {
    format!("{:064x}", i as u128 * 0x9e37_79b9_7f4a_7c15 + 7)
}

fn container_id(i: usize) -> String {
    format!("{:064x}", i as u128 * 0x7f4a_7c15_9e37_79b9 + 11)
}

fn pod_labels(i: usize) -> HashMap<String, String> {
    HashMap::from([
        (
            "io.kubernetes.pod.name".into(),
            format!("app-{i}-7d9f8c6b5-x2k4q"),
        ),
        (
            "io.kubernetes.pod.namespace".into(),
            format!("team-{}", i % 10),
        ),
        ("io.kubernetes.pod.uid".into(), format!("8a1c{i:028x}")),
        ("app.kubernetes.io/name".into(), format!("app-{i}")),
        ("pod-template-hash".into(), "7d9f8c6b5".into()),
    ])
}

fn pod_metadata(i: usize) -> cri::PodSandboxMetadata {
    cri::PodSandboxMetadata {
        name: format!("app-{i}-7d9f8c6b5-x2k4q"),
        uid: format!("8a1c{i:028x}"),
        namespace: format!("team-{}", i % 10),
        attempt: 0,
    }
}

fn container(i: usize) -> cri::Container {
    let mut labels = pod_labels(i);
    labels.insert("io.kubernetes.container.name".into(), "app".into());
    cri::Container {
        id: container_id(i),
        pod_sandbox_id: pod_id(i),
        metadata: Some(cri::ContainerMetadata {
            name: "app".into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: format!("sha256:{}", pod_id(i + 1000)),
            ..Default::default()
        }),
        image_ref: format!("sha256:{}", pod_id(i + 1000)),
        state: cri::ContainerState::ContainerRunning as i32,
        created_at: 1_764_000_000_000_000_000,
        labels,
        annotations: HashMap::from([
            ("io.kubernetes.container.hash".into(), "5a2b9c1d".into()),
            ("io.kubernetes.container.restartCount".into(), "0".into()),
            (
                "io.kubernetes.container.terminationMessagePath".into(),
                "/dev/termination-log".into(),
            ),
            (
                "io.kubernetes.pod.terminationGracePeriod".into(),
                "30".into(),
            ),
        ]),
        ..Default::default()
    }
}

/// gRPC answers by method path.
fn canned_answers() -> HashMap<&'static str, Bytes> {
    let sandbox = |i: usize| cri::PodSandbox {
        id: pod_id(i),
        metadata: Some(pod_metadata(i)),
        state: cri::PodSandboxState::SandboxReady as i32,
        created_at: 1_764_000_000_000_000_000,
        labels: pod_labels(i),
        annotations: HashMap::from([("kubernetes.io/config.source".into(), "api".into())]),
        runtime_handler: String::new(),
    };
    let sandbox_status = cri::PodSandboxStatusResponse {
        status: Some(cri::PodSandboxStatus {
            id: pod_id(0),
            metadata: Some(pod_metadata(0)),
            state: cri::PodSandboxState::SandboxReady as i32,
            created_at: 1_764_000_000_000_000_000,
            network: Some(cri::PodSandboxNetworkStatus {
                ip: "10.244.1.17".into(),
                additional_ips: vec![],
            }),
            labels: pod_labels(0),
            ..Default::default()
        }),
        ..Default::default()
    };
    let container_status = cri::ContainerStatusResponse {
        status: Some(cri::ContainerStatus {
            id: container_id(0),
            metadata: Some(cri::ContainerMetadata {
                name: "app".into(),
                attempt: 0,
            }),
            state: cri::ContainerState::ContainerRunning as i32,
            created_at: 1_764_000_000_000_000_000,
            started_at: 1_764_000_000_500_000_000,
            image: container(0).image,
            image_ref: container(0).image_ref,
            labels: container(0).labels,
            annotations: container(0).annotations,
            log_path: "/var/log/pods/team-0_app-0/app/0.log".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    HashMap::from([
        (
            "/runtime.v1.RuntimeService/ListPodSandbox",
            grpc_message(&cri::ListPodSandboxResponse {
                items: (0..PODS).map(sandbox).collect(),
            }),
        ),
        (
            "/runtime.v1.RuntimeService/ListContainers",
            grpc_message(&cri::ListContainersResponse {
                containers: (0..PODS).map(container).collect(),
            }),
        ),
        (
            "/runtime.v1.RuntimeService/PodSandboxStatus",
            grpc_message(&sandbox_status),
        ),
        (
            "/runtime.v1.RuntimeService/ContainerStatus",
            grpc_message(&container_status),
        ),
    ])
}

type Body = BoxBody<Bytes, Infallible>;

/// Serves the canned answers on `path`; any other call gets one empty message (every field at its
/// default), except the containerd event subscription, which stays open without events.
fn serve_upstream(path: &Path) {
    let listener = tokio::net::UnixListener::bind(path).unwrap();
    let answers = std::sync::Arc::new(canned_answers());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let answers = answers.clone();
            let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let answers = answers.clone();
                async move {
                    let path = req.uri().path().to_owned();
                    let _ = req.into_body().collect().await;
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                    let body: Body = if path.ends_with("/Subscribe") {
                        StreamBody::new(futures_util::stream::pending::<
                            Result<Frame<Bytes>, Infallible>,
                        >())
                        .boxed()
                    } else {
                        let message = answers
                            .get(path.as_str())
                            .cloned()
                            .unwrap_or(Bytes::from_static(&[0, 0, 0, 0, 0]));
                        StreamBody::new(futures_util::stream::iter([
                            Ok(Frame::data(message)),
                            Ok(Frame::trailers(trailers)),
                        ]))
                        .boxed()
                    };
                    let mut resp = hyper::Response::new(body);
                    resp.headers_mut().insert(
                        "content-type",
                        http::HeaderValue::from_static("application/grpc"),
                    );
                    Ok::<_, Infallible>(resp)
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

// ---------------------------------------------------------------------------------------------------
// kubelet's relist.

/// One relist: the two lists, then both status calls for every pod, one call at a time.
async fn relist(ch: &tonic::transport::Channel) {
    let mut rt = fake_cri::runtime_client(ch.clone());
    let pods = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await
        .expect("ListPodSandbox")
        .into_inner()
        .items;
    let containers = rt
        .list_containers(cri::ListContainersRequest::default())
        .await
        .expect("ListContainers")
        .into_inner()
        .containers;
    assert_eq!((pods.len(), containers.len()), (PODS, PODS));
    for (pod, c) in pods.iter().zip(&containers) {
        rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.id.clone(),
            verbose: false,
        })
        .await
        .expect("PodSandboxStatus");
        rt.container_status(cri::ContainerStatusRequest {
            container_id: c.id.clone(),
            verbose: false,
        })
        .await
        .expect("ContainerStatus");
    }
}

/// Relists once a second for `secs` seconds through `socket`; returns the CPU `process` used
/// meanwhile as a share of one core, the wall time of the slowest relist, and the times `process`
/// was woken per call.
async fn relist_load(socket: &Path, process: &Proc, secs: u64) -> (f64, Duration, f64) {
    let ch = fake_cri::cri_channel(socket).await;
    relist(&ch).await; // connection and caches warm
    let wakes = wakeups(process.pid());
    let (cpu, start) = (process.cpu(), Instant::now());
    let mut slowest = Duration::ZERO;
    for i in 0..secs {
        let t = Instant::now();
        relist(&ch).await;
        slowest = slowest.max(t.elapsed());
        tokio::time::sleep_until((start + Duration::from_secs(i + 1)).into()).await;
    }
    let share = (process.cpu() - cpu).as_secs_f64() / start.elapsed().as_secs_f64();
    let per_call = (wakeups(process.pid()) - wakes) as f64 / (secs * (2 + 2 * PODS as u64)) as f64;
    (share, slowest, per_call)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    relay_if_asked();
    let secs = setting("BENCH_SECS", 10).max(1);
    let rounds = setting("BENCH_ROUNDS", 2).max(1);
    println!("footprint benchmark (release build)");
    let fixture = bundle::write_signed(IMAGES);
    let dir = fixture.dir.path();
    let bundle_bytes = std::fs::read(dir.join("bundle.json")).unwrap();
    let sigs = std::fs::read(pullgate::policy::load::signature_path(
        &dir.join("bundle.json"),
    ))
    .unwrap();
    for state in ["state-bundle", "state-bundle-plain"] {
        pullgate::node::enforce::store::BundleStore::new(dir.join(state))
            .install(
                &bundle_bytes,
                &sigs,
                &fixture.trust,
                time::OffsetDateTime::now_utc(),
                Path::new("bundle.json"),
            )
            .expect("the bundle installs");
    }
    drop(bundle_bytes);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let upstream = dir.join("upstream.sock");
    runtime.block_on(async { serve_upstream(&upstream) });

    // Idle memory: each process started alone, measured after a few quiet seconds. As deployed (the
    // systemd unit's malloc settings), and the bundle case also without them.
    let tunables = malloc::unit_tunables();
    println!("pullgate serve runs with GLIBC_TUNABLES={tunables} (as the systemd unit sets)");
    let idle = |name: &str, tunables: Option<&str>| {
        let started = Instant::now();
        let (p, socket) = start_pullgate(dir, &upstream, name, tunables);
        let ready = started.elapsed();
        std::thread::sleep(Duration::from_secs(3));
        let (rss, hwm) = (p.status_mib("VmRSS"), p.status_mib("VmHWM"));
        (p, socket, rss, hwm, ready)
    };
    let (_, _, bare_rss, bare_hwm, _) = idle("bare", Some(&tunables));
    let (_, _, plain_rss, plain_hwm, _) = idle("bundle-plain", None);
    let (loaded, loaded_socket, loaded_rss, loaded_hwm, ready) = idle("bundle", Some(&tunables));
    println!(
        "idle RSS of pullgate serve: {bare_rss:.1} MiB without a bundle (peak {bare_hwm:.1} MiB); \
         {loaded_rss:.1} MiB with the {IMAGES}-image bundle (peak {loaded_hwm:.1} MiB; listening {:.2} s after start); \
         with the bundle and default malloc settings {plain_rss:.1} MiB (peak {plain_hwm:.1} MiB)",
        ready.as_secs_f64()
    );

    // CPU at kubelet's rate: pullgate (the one holding the big bundle) and the relay alternate.
    let (relay_proc, relay_socket) = start_relay(dir, &upstream);
    let (mut ours, mut floor, mut slow_ours, mut slow_floor) = (vec![], vec![], vec![], vec![]);
    let (mut wakes_ours, mut wakes_floor) = (vec![], vec![]);
    for _ in 0..rounds {
        let (share, slowest, wakes) = runtime.block_on(relist_load(&loaded_socket, &loaded, secs));
        ours.push(share);
        slow_ours.push(slowest.as_secs_f64() * 1e3);
        wakes_ours.push(wakes);
        let (share, slowest, wakes) =
            runtime.block_on(relist_load(&relay_socket, &relay_proc, secs));
        floor.push(share);
        slow_floor.push(slowest.as_secs_f64() * 1e3);
        wakes_floor.push(wakes);
    }
    let calls = 2 + 2 * PODS;
    let (ours, floor) = (median(&mut ours), median(&mut floor));
    println!(
        "CPU at kubelet's rate (a relist a second of {PODS} pods: {calls} calls/s, {rounds} rounds of {secs} s, median): \
         pullgate {:.2}% of one core, null relay {:.2}%: ratio {:.2}",
        ours * 100.0,
        floor * 100.0,
        ours / floor
    );
    println!(
        "slowest relist ({calls} calls one after another): pullgate {:.1} ms, null relay {:.1} ms (median over rounds)",
        median(&mut slow_ours),
        median(&mut slow_floor)
    );
    println!(
        "wake-ups per call at that rate: pullgate {:.2}, null relay {:.2} (median over rounds)",
        median(&mut wakes_ours),
        median(&mut wakes_floor)
    );
    println!(
        "RSS of pullgate serve after the load: {:.1} MiB",
        loaded.status_mib("VmRSS")
    );
}
