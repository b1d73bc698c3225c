//! Proxy overhead benchmark: unary CRI calls made directly to a fake CRI upstream and through a real
//! `pullgate serve` process in front of the same upstream, in one run.
//!
//! Prints sequential latency (median, p99) and throughput with 16 concurrent callers for each path,
//! and the ratios. Direct and proxied rounds alternate so that machine noise hits both alike.
//!
//! A third path measures the floor any separate-process proxy pays on this machine: a *null relay*,
//! this benchmark binary re-executed as a process that copies bytes between the client's and the
//! upstream's unix sockets and does nothing else (no HTTP/2, no routing). Its extra process hop costs
//! the same socket wake-ups pullgate's does, so "pullgate over relay" isolates what pullgate itself adds.
//! Beside it, in the passthrough rows, a *frame relay* ([`procs`]) reads HTTP/2 frames and decodes
//! and re-encodes every header block with pullgate's HPACK decoder, passing everything else as it
//! came: the floor of a proxy that must read each call's path without HTTP/2 server and client
//! halves of its own.
//!
//! The enforcement part measures `PullImage` and thirteen kinds of `CreateContainer`: a start whose
//! pod sandbox and image decision are both known (the steady state), and starts that each meet
//! something for the first time. pullgate learns the sandboxes and images containerd holds when it
//! starts, and every sandbox created through it (`RunPodSandbox`, kubelet's path for every new pod;
//! not timed), so the rows say where the pod and the image come from: created or pulled through pullgate, held by
//! containerd before pullgate started, or arrived past pullgate since (the pod looked up with
//! `PodSandboxStatus`; the image from the manifest its pod-spec name pins, `Content.Read`, as
//! kubelet sends that name — or, without it, with `ImageStatus` + `Content.Read`). Three rows make
//! the start in kubelet's order: its `ImageStatus` of the pod spec's name (not timed, printed
//! apart) right before the start, whose answer pullgate proves the image from. The benchmark
//! waits until pullgate has learned what containerd held before it adds the rest.
//!
//! A raw HTTP/2 client (sequential `Version` calls) measures the two modes of pullgate's HTTP/2
//! fix-up layer: with `localhost` as `:authority` header blocks are handed on as sent, with the socket
//! path (what kubelet before 1.30 sends) every block is re-encoded.
//!
//! Run: `cargo bench --bench proxy` (env: `BENCH_CALLS` per round, default 2000; `BENCH_ROUNDS`,
//! default 5; `BENCH_SECS` per throughput round, default 2). With `BENCH_UPSTREAM=/path/to/socket`
//! (e.g. a real containerd's CRI socket) the passthrough part runs against that upstream instead of
//! the fake, and the enforcement part is skipped. `BENCH_PULLGATE_BIN=/path/to/pullgate` measures
//! another build (e.g. an earlier commit) in the same conditions; `BENCH_BASELINE_BIN=/path/to/pullgate`
//! runs that build too, in the same run, calls interleaved — as a fourth path in the passthrough part
//! and beside this build in the enforcement part — and prints this build's figures against it.
//! `BENCH_BUSY=1` keeps every CPU from halting for the whole run (a spinning `SCHED_IDLE` thread
//! pinned to each CPU, to which any other thread is preferred): what a wake-up costs when no vCPU has to be
//! woken through the hypervisor, as on a node busy with pods. `BENCH_PAIRED=N` measures forwarded
//! `Version` alone, through every path in N (at least 2) alternating rounds of `BENCH_CALLS` calls,
//! and prints medians of per-round differences with their standard errors ([`paired`]); nothing
//! else runs.

#[path = "../tests/fake_cri/mod.rs"]
mod fake_cri;
#[path = "support/procs.rs"]
mod procs;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fake_cri::*;
use k8s_cri::v1 as cri;
use procs::{
    Busy, Proc, cpu_time, pullgate_bin, relay_if_asked, serve, setting, start_frame_relay,
    start_relay, wakeups,
};
use pullgate::node::enforce::store::BundleStore;
use pullgate::policy::{PrivateKey, SignatureFile};
use tonic::transport::Channel;

fn start_pullgate(dir: &Path, upstream: &Path, workers: u32, name: &str) -> (Proc, PathBuf) {
    // BENCH_PULLGATE_BIN compares another build (e.g. an earlier commit) in the same conditions.
    start_pullgate_bin(&pullgate_bin(), dir, upstream, workers, name)
}

/// `bin serve` with state in `dir/state-NAME`, listening on `dir/pullgate-NAME.sock` (admin API on
/// `dir/admin-NAME.sock`).
fn start_pullgate_bin(
    bin: &Path,
    dir: &Path,
    upstream: &Path,
    workers: u32,
    name: &str,
) -> (Proc, PathBuf) {
    let listen = dir.join(format!("pullgate-{name}.sock"));
    let config = dir.join(format!("config-{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "[server]\nworker_threads = {workers}\n[log]\nlevel = \"error\"\n[policy]\nstate_dir = \"{}\"\ntrust = \"{}\"\n[metrics]\nlisten = \"off\"\n[admin]\nsocket = \"{}\"\n",
            dir.join(format!("state-{name}")).display(),
            dir.join("trust.toml").display(),
            // Each process its own admin socket: the default (next to the CRI socket) is shared
            // by every process started in `dir`.
            dir.join(format!("admin-{name}.sock")).display()
        ),
    )
    .unwrap();
    let child = serve(Command::new(bin), &config, &listen, upstream);
    (child, listen)
}

#[derive(Clone, Copy)]
enum Method {
    Version,
    ImageStatus,
    /// `ImageStatus` of the approved image as a pod spec names it: resolved through the bundle to
    /// its pinned mirror name, the answer's names shown as the public ones.
    ApprovedImageStatus,
    /// An approved pull: decided, rewritten, audited, forwarded.
    PullImage,
    /// A container start whose image decision is cached (steady state).
    CreateContainer,
}

async fn one_call(ch: &Channel, m: Method) {
    match m {
        Method::Version => {
            runtime_client(ch.clone())
                .version(cri::VersionRequest {
                    version: "v1".into(),
                })
                .await
                .expect("Version");
        }
        Method::ImageStatus => {
            image_status(ch, "docker.io/library/busybox:1.36").await;
        }
        Method::ApprovedImageStatus => {
            image_status(ch, BENCH_USER_IMAGE).await;
        }
        Method::PullImage => pull(ch, BENCH_IMAGE).await,
        Method::CreateContainer => {
            create(ch, BENCH_IMAGE_ID).await;
        }
    }
}

/// `ImageStatus` of `image`: the image found, if any.
async fn image_status(ch: &Channel, image: &str) -> Option<cri::Image> {
    image_client(ch.clone())
        .image_status(cri::ImageStatusRequest {
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            verbose: false,
        })
        .await
        .expect("ImageStatus")
        .into_inner()
        .image
}

/// kubelet's `ImageStatus` of `name` before a start, timed into `out`; nothing without a name.
async fn status_before(ch: &Channel, name: Option<&str>, out: &mut Vec<Duration>) {
    if let Some(name) = name {
        let t = Instant::now();
        image_status(ch, name).await;
        out.push(t.elapsed());
    }
}

async fn pull(ch: &Channel, image: &str) {
    image_client(ch.clone())
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            auth: None,
            sandbox_config: Some(sandbox()),
        })
        .await
        .expect("PullImage");
}

async fn create(ch: &Channel, image: &str) {
    create_in(ch, "sandbox", image, BENCH_USER_IMAGE).await;
}

/// A start as kubelet makes it: the image by ID, the pod spec's name as `user_specified_image`
/// (empty: as kubelet before Kubernetes 1.28 and other clients send it).
async fn create_in(ch: &Channel, pod_sandbox_id: &str, image: &str, user_image: &str) {
    runtime_client(ch.clone())
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod_sandbox_id.into(),
            config: Some(cri::ContainerConfig {
                image: Some(cri::ImageSpec {
                    image: image.into(),
                    user_specified_image: user_image.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            sandbox_config: Some(sandbox()),
        })
        .await
        .expect("CreateContainer");
}

/// Creates a pod sandbox (kubelet's `RunPodSandbox` for a new pod); returns its ID.
async fn run_pod(ch: &Channel) -> String {
    runtime_client(ch.clone())
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(sandbox()),
            runtime_handler: String::new(),
        })
        .await
        .expect("RunPodSandbox")
        .into_inner()
        .pod_sandbox_id
}

fn sandbox() -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "bench".into(),
            namespace: "default".into(),
            uid: "u".into(),
            attempt: 0,
        }),
        ..Default::default()
    }
}

/// The measured image: entry 77,777 of the 100,000-image bundle.
const BENCH_IMAGE: &str = "docker.io/library/app77777:1.0";
/// How a pod spec names it.
const BENCH_USER_IMAGE: &str = "app77777:1.0";
const BENCH_IMAGE_ID: &str =
    "sha256:b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0";
const IMAGES: usize = 100_000;

fn app_digest(i: usize) -> String {
    format!("sha256:{:064x}", i as u128 * 0x9e37_79b9_7f4a_7c15 + 1)
}

/// The two bundle signing keys of the benchmark.
fn signing_keys() -> (PrivateKey, PrivateKey) {
    (
        PrivateKey::from_seed([1; 32]),
        PrivateKey::from_seed([2; 32]),
    )
}

/// Writes the trust file (2 of the 2 signing keys) to `path` and returns its text.
fn write_trust(path: &Path) -> String {
    let (a, c) = signing_keys();
    let trust_toml = format!(
        "threshold = 2\n[[keys]]\nname = \"a\"\npublic_key = \"{}\"\n[[keys]]\nname = \"c\"\npublic_key = \"{}\"\n",
        a.public(),
        c.public()
    );
    std::fs::write(path, &trust_toml).unwrap();
    trust_toml
}

/// A signed 100,000-image bundle installed into `state`, with the trust file at `trust`.
fn install_big_bundle(state: &Path, trust: &Path) -> usize {
    use std::fmt::Write as _;
    let now = time::OffsetDateTime::now_utc();
    let fmt = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let mut b = String::with_capacity(IMAGES * 420);
    write!(
        b,
        r#"{{"format":1,"version":1,"issued_at":"{}","expires_at":"{}","issuer":"bench","private_registry":"registry.corp","mirrors":[{{"source":"docker.io","target":"approved"}}],"governance":{{"organization":"corp","application_label":"app","mode":"enforce","programs":[]}},"first_party":[],"images":["#,
        fmt(now - time::Duration::hours(1)),
        fmt(now + time::Duration::days(30))
    )
    .unwrap();
    for i in 0..IMAGES {
        if i > 0 {
            b.push(',');
        }
        write!(
            b,
            r#"{{"source":"docker.io/library/app{i}","tags":{{"1.0":"{}"}},"scope":"corp","provenance":{{"license":"MIT","scans":[{{"scanner":"trivy","version":"0.58.1","report":"{}","worst_severity":"low"}}],"approved_by":"bench@corp","approved_at":"2026-01-01T00:00:00Z"}}}}"#,
            app_digest(i),
            app_digest(i + IMAGES)
        )
        .unwrap();
    }
    b.push_str("]}");
    let (a, c) = signing_keys();
    let mut sigs = SignatureFile::new();
    sigs.add(a.sign_bundle(b.as_bytes()));
    sigs.add(c.sign_bundle(b.as_bytes()));
    let t = pullgate::policy::Trust::from_toml(&write_trust(trust)).unwrap();
    BundleStore::new(state)
        .install(
            b.as_bytes(),
            sigs.to_json().as_bytes(),
            &t,
            time::OffsetDateTime::now_utc(),
            Path::new("bench.json"),
        )
        .expect("bundle installs");
    b.len()
}

/// A minimal HTTP/2 client that sends any `:authority` bytes (tonic and `h2` send only valid URI
/// authorities): sequential unary calls, header blocks as HPACK literals without indexing. With the
/// socket path as authority it drives pullgate's HTTP/2 layer into its re-encoding mode, as kubelet
/// before 1.30 and grpc-java do.
struct RawClient {
    io: tokio::io::BufReader<tokio::net::UnixStream>,
    next_stream: u32,
    authority: Vec<u8>,
    /// The server's response headers are decoded to check each call succeeded.
    decoder: loona_hpack::Decoder<'static>,
}

fn raw_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

fn raw_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    // Literal without indexing, new name; lengths below 127 fit the 7-bit prefix.
    assert!(name.len() < 127 && value.len() < 127);
    out.push(0);
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.push(value.len() as u8);
    out.extend_from_slice(value);
}

impl RawClient {
    async fn connect(path: &Path, authority: &[u8]) -> RawClient {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::UnixStream::connect(path)
            .await
            .expect("connect");
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // SETTINGS_INITIAL_WINDOW_SIZE = 2^31-1, and the connection window to match.
        raw_frame(&mut hello, 0x4, 0, 0, &[0, 4, 0x7f, 0xff, 0xff, 0xff]);
        raw_frame(
            &mut hello,
            0x8,
            0,
            0,
            &(0x7fff_ffffu32 - 65_535).to_be_bytes(),
        );
        s.write_all(&hello).await.unwrap();
        RawClient {
            io: tokio::io::BufReader::new(s),
            next_stream: 1,
            authority: authority.to_vec(),
            decoder: loona_hpack::Decoder::new(),
        }
    }

    async fn version(&mut self) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let stream = self.next_stream;
        self.next_stream += 2;
        let mut block = Vec::with_capacity(160);
        raw_literal(&mut block, b":method", b"POST");
        raw_literal(&mut block, b":scheme", b"http");
        raw_literal(&mut block, b":path", b"/runtime.v1.RuntimeService/Version");
        raw_literal(&mut block, b":authority", &self.authority);
        raw_literal(&mut block, b"content-type", b"application/grpc");
        raw_literal(&mut block, b"te", b"trailers");
        let msg = prost::Message::encode_to_vec(&cri::VersionRequest {
            version: "v1".into(),
        });
        let mut out = Vec::with_capacity(256);
        raw_frame(&mut out, 0x1, 0x4, stream, &block);
        raw_frame(&mut out, 0x0, 0x1, stream, &frame(&msg));
        self.io.get_mut().write_all(&out).await.unwrap();
        let mut ok = false;
        loop {
            let mut head = [0u8; 9];
            self.io.read_exact(&mut head).await.expect("response");
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let (kind, flags) = (head[3], head[4]);
            let sid = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
            let mut payload = vec![0u8; len];
            self.io.read_exact(&mut payload).await.unwrap();
            let mut reply = Vec::new();
            match kind {
                0x4 if flags & 1 == 0 => raw_frame(&mut reply, 0x4, 1, 0, &[]),
                0x6 if flags & 1 == 0 => raw_frame(&mut reply, 0x6, 1, 0, &payload),
                0x3 | 0x7 => panic!("the server reset or closed: frame type {kind}"),
                0x1 => {
                    assert_eq!(flags & 0x4, 0x4, "small answers fit one HEADERS frame");
                    for (n, v) in self.decoder.decode(&payload).expect("HPACK") {
                        ok |= n == b"grpc-status" && v == b"0";
                    }
                    if sid == stream && flags & 0x1 != 0 {
                        assert!(ok, "Version failed through the raw client");
                        return;
                    }
                }
                _ => {}
            }
            if !reply.is_empty() {
                self.io.get_mut().write_all(&reply).await.unwrap();
            }
        }
    }
}

async fn raw_latencies(c: &mut RawClient, n: u64, out: &mut Vec<Duration>) {
    for _ in 0..n {
        let t = Instant::now();
        c.version().await;
        out.push(t.elapsed());
    }
}

async fn latencies(ch: &Channel, m: Method, n: u64, out: &mut Vec<Duration>) {
    for _ in 0..n {
        let t = Instant::now();
        one_call(ch, m).await;
        out.push(t.elapsed());
    }
}

async fn throughput(ch: &Channel, m: Method, callers: usize, secs: u64) -> (f64, u64) {
    let end = Instant::now() + Duration::from_secs(secs);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..callers {
        let ch = ch.clone();
        tasks.spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                one_call(&ch, m).await;
                n += 1;
            }
            n
        });
    }
    let start = Instant::now();
    let mut total = 0;
    while let Some(n) = tasks.join_next().await {
        total += n.unwrap();
    }
    (total as f64 / start.elapsed().as_secs_f64(), total)
}

/// One row of the closing summary: what pullgate adds to a call's median over direct, against what
/// the null relay adds to a forwarded call measured in the same run, and the target ratio.
struct Row {
    label: &'static str,
    pullgate_added: f64,
    relay_added: f64,
    target: f64,
}

fn print_summary(rows: &[Row], cpu: Option<(f64, f64)>) {
    println!(
        "\nsummary: pullgate's added cost over the null relay's (same run; ratio = pullgate added / relay added)"
    );
    println!(
        "  {:<58} {:>10} {:>10} {:>7} {:>7}  met",
        "path", "pg added", "relay add", "ratio", "target"
    );
    for r in rows {
        let ratio = r.pullgate_added / r.relay_added.max(0.1);
        println!(
            "  {:<58} {:>7.1} µs {:>7.1} µs {:>7.2} {:>7.2}  {}",
            r.label,
            r.pullgate_added,
            r.relay_added,
            ratio,
            r.target,
            if ratio <= r.target { "yes" } else { "no" }
        );
    }
    if let Some((relay, pg)) = cpu {
        let ratio = pg / relay.max(0.1);
        println!(
            "  {:<58} {:>7.1} µs {:>7.1} µs {:>7.2} {:>7.2}  {}",
            "CPU per call under load (Version, 16 callers)",
            pg,
            relay,
            ratio,
            1.6,
            if ratio <= 1.6 { "yes" } else { "no" }
        );
    }
}

/// (median, p99) in µs of the three paths measured in one run.
struct Latency {
    direct: (f64, f64),
    relay: (f64, f64),
    via: (f64, f64),
}

impl Latency {
    fn of(d: &mut [Duration], r: &mut [Duration], v: &mut [Duration]) -> Self {
        let both = |x: &mut [Duration]| (pct(x, 0.5), pct(x, 0.99));
        Latency {
            direct: both(d),
            relay: both(r),
            via: both(v),
        }
    }
}

/// Prints the median and p99 of direct calls and of calls via pullgate, and what pullgate added;
/// with a baseline build's calls, what it added and what this build adds over it.
fn print_added(
    label: &str,
    direct: &mut [Duration],
    via: &mut [Duration],
    base: Option<&mut [Duration]>,
) {
    let (d50, v50) = (pct(direct, 0.5), pct(via, 0.5));
    let (d99, v99) = (pct(direct, 0.99), pct(via, 0.99));
    println!("{label}");
    println!(
        "  latency median: direct {d50:8.1} µs  via pullgate {v50:8.1} µs  added {:6.1} µs",
        v50 - d50
    );
    println!(
        "  latency p99:    direct {d99:8.1} µs  via pullgate {v99:8.1} µs  added {:6.1} µs",
        v99 - d99
    );
    if let Some(b) = base.filter(|b| !b.is_empty()) {
        let (b50, b99) = (pct(b, 0.5), pct(b, 0.99));
        println!(
            "  baseline build: median {b50:8.1} µs (added {:6.1} µs), p99 {b99:8.1} µs; this build over it: median {:+6.1} µs, p99 {:+6.1} µs",
            b50 - d50,
            v50 - b50,
            v99 - b99
        );
    }
}

/// The median of `v` (the mean of the two middle values when there are an even number).
fn median(v: &[f64]) -> f64 {
    let mut sorted = v.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n % 2 {
        1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// The median of `v` and its standard error, estimated by resampling `v` with replacement (the
/// bootstrap; a fixed seed, so the same rounds give the same figure).
fn median_se(v: &[f64]) -> (f64, f64) {
    const RESAMPLES: usize = 2000;
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = |n: usize| {
        // xorshift64
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    let medians: Vec<f64> = (0..RESAMPLES)
        .map(|_| median(&(0..v.len()).map(|_| v[next(v.len())]).collect::<Vec<_>>()))
        .collect();
    let mean = medians.iter().sum::<f64>() / RESAMPLES as f64;
    let var = medians.iter().map(|m| (m - mean).powi(2)).sum::<f64>() / (RESAMPLES - 1) as f64;
    (median(v), var.sqrt())
}

/// `BENCH_PAIRED`: sequential `Version` calls through every path in many short rounds, the paths'
/// order reversed every other round, and each figure taken from per-round differences (every
/// path's median against the same round's direct median, or against another path's): a noisy
/// machine moves whole rounds, which a difference within one round cancels. Prints the median of
/// those differences and its standard error ([`median_se`]), which one run's pooled medians cannot
/// give.
async fn paired(paths: &[(&str, &Channel)], rounds: u64, calls: u64) {
    println!(
        "paired Version: {rounds} rounds of {calls} sequential calls per path, order reversed every other round"
    );
    let mut medians: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let mut sink = Vec::new();
    for (_, ch) in paths {
        latencies(ch, Method::Version, calls / 4, &mut sink).await;
    }
    for round in 0..rounds {
        let mut order: Vec<usize> = (0..paths.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let mut v = Vec::new();
            latencies(paths[i].1, Method::Version, calls, &mut v).await;
            medians[i].push(pct(&mut v, 0.5));
        }
    }
    let diff = |a: usize, b: usize| -> Vec<f64> {
        medians[a]
            .iter()
            .zip(&medians[b])
            .map(|(x, y)| x - y)
            .collect()
    };
    println!(
        "  direct: median of round medians {:.1} µs",
        median(&medians[0])
    );
    let added: Vec<(f64, f64)> = (1..paths.len()).map(|i| median_se(&diff(i, 0))).collect();
    for (i, (m, se)) in added.iter().enumerate() {
        println!(
            "  {:<12} adds {m:6.1} ± {se:4.1} µs ({:.2}× the null relay's)",
            paths[i + 1].0,
            m / added[0].0
        );
    }
    for i in 2..paths.len() {
        for j in 1..i {
            let (m, se) = median_se(&diff(i, j));
            println!("  {} − {}: {m:+6.1} ± {se:4.1} µs", paths[i].0, paths[j].0);
        }
    }
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1e6
}

fn main() {
    relay_if_asked();
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing special: run briefly then.
    let quick = !std::env::args().any(|a| a == "--bench");
    let calls = if quick {
        200
    } else {
        setting("BENCH_CALLS", 2000)
    };
    let rounds = if quick { 1 } else { setting("BENCH_ROUNDS", 5) };
    let secs = if quick { 1 } else { setting("BENCH_SECS", 2) };

    let dir = tempfile::tempdir().unwrap();
    let real_upstream = std::env::var_os("BENCH_UPSTREAM").map(PathBuf::from);
    let upstream_path = real_upstream
        .clone()
        .unwrap_or_else(|| dir.path().join("fake-cri.sock"));
    // The fake upstream runs on its own runtime thread, as containerd would in its own process.
    let up_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (fake, _events) = FakeCri::new();
    let _server = match &real_upstream {
        Some(p) => {
            println!("upstream: {} (BENCH_UPSTREAM)", p.display());
            None
        }
        None => Some(up_rt.block_on(async { fake.serve(&upstream_path) })),
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let workers = setting("BENCH_PULLGATE_WORKERS", 1) as u32;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "load average at start: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    // BENCH_BUSY=1: every CPU kept from halting, as on a node busy with pods (see `Busy`).
    let busy = (setting("BENCH_BUSY", 0) == 1).then(Busy::start);
    if let Some(b) = &busy {
        println!(
            "BENCH_BUSY: {} SCHED_IDLE threads, one pinned to each CPU, keep every CPU from halting",
            b.threads()
        );
    }
    // The passthrough pullgate has a trust file but no bundle: nothing is decided, everything forwarded.
    write_trust(&dir.path().join("trust.toml"));
    let (pg, listen) = start_pullgate(dir.path(), &upstream_path, workers, "passthrough");
    let pg_pid = pg.0.id();
    println!(
        "proxy benchmark: {} upstream, pullgate as a separate process (worker_threads = {workers})",
        if real_upstream.is_some() {
            "real (BENCH_UPSTREAM)"
        } else {
            "fake CRI (in-process)"
        }
    );
    // BENCH_PAIRED=N: forwarded `Version` alone, in N alternating rounds (see `paired`).
    let paired_rounds = setting("BENCH_PAIRED", 0);
    if paired_rounds == 0 {
        println!(
            "rounds = {rounds}, calls per round = {calls}, throughput rounds = {secs}s with 16 callers\n"
        );
    }

    let (relay, relay_listen) = start_relay(dir.path(), &upstream_path);
    let relay_pid = relay.0.id();
    let (frame_relay, frame_listen) = start_frame_relay(dir.path(), &upstream_path);
    let frame_pid = frame_relay.0.id();
    let baseline = std::env::var_os("BENCH_BASELINE_BIN")
        .filter(|b| !b.is_empty())
        .map(|b| {
            println!(
                "baseline build (BENCH_BASELINE_BIN): {}\n",
                Path::new(&b).display()
            );
            start_pullgate_bin(
                Path::new(&b),
                dir.path(),
                &upstream_path,
                workers,
                "baseline",
            )
        });

    if paired_rounds > 0 {
        rt.block_on(async {
            let mut chans = vec![
                ("direct", cri_channel(&upstream_path).await),
                ("null relay", cri_channel(&relay_listen).await),
                ("frame relay", cri_channel(&frame_listen).await),
                ("pullgate", cri_channel(&listen).await),
            ];
            if let Some((_, l)) = &baseline {
                chans.push(("baseline", cri_channel(l).await));
            }
            let paths: Vec<(&str, &Channel)> = chans.iter().map(|(n, c)| (*n, c)).collect();
            paired(&paths, paired_rounds.max(2), calls).await;
        });
        return;
    }
    let summary = rt.block_on(async {
        let direct = cri_channel(&upstream_path).await;
        let null = cri_channel(&relay_listen).await;
        let frames = cri_channel(&frame_listen).await;
        let via = cri_channel(&listen).await;
        let base = match &baseline {
            Some((p, l)) => Some((p.0.id(), cri_channel(l).await)),
            None => None,
        };
        let passthrough = [
            ("Version (forwarded)", Method::Version),
            ("ImageStatus (intercepted, no bundle)", Method::ImageStatus),
        ];
        let mut rows = Vec::new();
        let mut cpu_under_load = None;
        let mut version_relay_added = None;
        for (label, m) in passthrough {
            // Warm up every path.
            let mut sink = Vec::new();
            for ch in [&direct, &null, &frames, &via]
                .into_iter()
                .chain(base.as_ref().map(|(_, c)| c))
            {
                latencies(ch, m, calls / 4, &mut sink).await;
            }
            let (mut d, mut r, mut v, mut b) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let mut f = Vec::new();
            let (mut relay_cpu, mut pg_cpu, mut base_cpu) =
                (Duration::ZERO, Duration::ZERO, Duration::ZERO);
            let (mut relay_wakes, mut pg_wakes) = (0, 0);
            for _ in 0..rounds {
                latencies(&direct, m, calls, &mut d).await;
                let cpu0 = cpu_time(relay_pid);
                let wakes0 = wakeups(relay_pid);
                latencies(&null, m, calls, &mut r).await;
                relay_cpu += cpu_time(relay_pid) - cpu0;
                relay_wakes += wakeups(relay_pid) - wakes0;
                latencies(&frames, m, calls, &mut f).await;
                if let Some((pid, ch)) = &base {
                    let cpu0 = cpu_time(*pid);
                    latencies(ch, m, calls, &mut b).await;
                    base_cpu += cpu_time(*pid) - cpu0;
                }
                let cpu0 = cpu_time(pg_pid);
                let wakes0 = wakeups(pg_pid);
                latencies(&via, m, calls, &mut v).await;
                pg_cpu += cpu_time(pg_pid) - cpu0;
                pg_wakes += wakeups(pg_pid) - wakes0;
            }
            let per_call = |cpu: Duration, n: u64| cpu.as_secs_f64() * 1e6 / n.max(1) as f64;
            let seq = Latency::of(&mut d, &mut r, &mut v);
            let (relay_seq_cpu, pg_seq_cpu) = (
                per_call(relay_cpu, calls * rounds),
                per_call(pg_cpu, calls * rounds),
            );
            let throughput_rounds = rounds.min(3);
            let (mut dt, mut rt_, mut vt) = (0.0, 0.0, 0.0);
            let (mut relay_calls, mut relay_cpu) = (0u64, Duration::ZERO);
            let (mut via_calls, mut via_cpu) = (0u64, Duration::ZERO);
            let (mut frame_calls, mut frame_cpu) = (0u64, Duration::ZERO);
            let (mut bt, mut base_calls, mut base_tcpu) = (0.0, 0u64, Duration::ZERO);
            for _ in 0..throughput_rounds {
                dt += throughput(&direct, m, 16, secs).await.0;
                let cpu0 = cpu_time(relay_pid);
                let (rate, n) = throughput(&null, m, 16, secs).await;
                relay_cpu += cpu_time(relay_pid) - cpu0;
                relay_calls += n;
                rt_ += rate;
                let cpu0 = cpu_time(frame_pid);
                let (_, n) = throughput(&frames, m, 16, secs).await;
                frame_cpu += cpu_time(frame_pid) - cpu0;
                frame_calls += n;
                if let Some((pid, ch)) = &base {
                    let cpu0 = cpu_time(*pid);
                    let (rate, n) = throughput(ch, m, 16, secs).await;
                    base_tcpu += cpu_time(*pid) - cpu0;
                    base_calls += n;
                    bt += rate;
                }
                let cpu0 = cpu_time(pg_pid);
                let (rate, n) = throughput(&via, m, 16, secs).await;
                via_cpu += cpu_time(pg_pid) - cpu0;
                via_calls += n;
                vt += rate;
            }
            let n = throughput_rounds as f64;
            let (dt, rt_, vt) = (dt / n, rt_ / n, vt / n);
            println!("{label}");
            println!(
                "  latency median: direct {:7.1} µs | null relay {:7.1} µs (added {:5.1}, ratio {:.2}) | pullgate {:7.1} µs (added {:5.1}, ratio {:.2})",
                seq.direct.0,
                seq.relay.0,
                seq.relay.0 - seq.direct.0,
                seq.relay.0 / seq.direct.0,
                seq.via.0,
                seq.via.0 - seq.direct.0,
                seq.via.0 / seq.direct.0
            );
            println!(
                "  latency p99:    direct {:7.1} µs | null relay {:7.1} µs (added {:5.1})              | pullgate {:7.1} µs (added {:5.1})",
                seq.direct.1,
                seq.relay.1,
                seq.relay.1 - seq.direct.1,
                seq.via.1,
                seq.via.1 - seq.direct.1
            );
            println!(
                "  throughput x16: direct {dt:7.0} /s | null relay {rt_:7.0} /s (ratio {:.2})               | pullgate {vt:7.0} /s (ratio {:.2})",
                rt_ / dt,
                vt / dt
            );
            println!(
                "  pullgate over the null relay: added median {:.1} µs, throughput ratio {:.2}",
                seq.via.0 - seq.relay.0,
                vt / rt_
            );
            println!(
                "  CPU per call: null relay {relay_seq_cpu:.1} µs sequential, {:.1} µs under load | pullgate {pg_seq_cpu:.1} µs sequential, {:.1} µs under load",
                per_call(relay_cpu, relay_calls),
                per_call(via_cpu, via_calls)
            );
            // Each sleep is a wake-up: with a fast upstream, each costs a vCPU's way out of halt.
            println!(
                "  wake-ups per sequential call: null relay {:.2} | pullgate {:.2}",
                relay_wakes as f64 / (calls * rounds) as f64,
                pg_wakes as f64 / (calls * rounds) as f64
            );
            let f50 = pct(&mut f, 0.5);
            println!(
                "  frame relay (decodes and re-encodes every header block): median {f50:7.1} µs (added {:5.1}, {:.2}× the null relay's added); CPU per call under load {:.1} µs ({:.2}× the null relay's)",
                f50 - seq.direct.0,
                (f50 - seq.direct.0) / (seq.relay.0 - seq.direct.0).max(0.1),
                per_call(frame_cpu, frame_calls),
                per_call(frame_cpu, frame_calls) / per_call(relay_cpu, relay_calls).max(0.1)
            );
            let relay_added = *version_relay_added.get_or_insert(seq.relay.0 - seq.direct.0);
            if matches!(m, Method::Version) {
                cpu_under_load = Some((per_call(relay_cpu, relay_calls), per_call(via_cpu, via_calls)));
            }
            rows.push(Row {
                label,
                pullgate_added: seq.via.0 - seq.direct.0,
                relay_added,
                target: if matches!(m, Method::Version) { 1.25 } else { 1.5 },
            });
            if base.is_some() {
                let (b50, b99) = (pct(&mut b, 0.5), pct(&mut b, 0.99));
                let bt = bt / n;
                println!(
                    "  vs the baseline build: latency median {b50:7.1} -> {:7.1} µs (ratio {:.3}), p99 {b99:7.1} -> {:7.1} µs, throughput x16 {bt:7.0} -> {vt:7.0} /s (ratio {:.3})",
                    seq.via.0,
                    seq.via.0 / b50,
                    seq.via.1,
                    vt / bt
                );
                println!(
                    "  CPU per call, baseline -> this build: {:.1} -> {pg_seq_cpu:.1} µs sequential, {:.1} -> {:.1} µs under load",
                    per_call(base_cpu, calls * rounds),
                    per_call(base_tcpu, base_calls),
                    per_call(via_cpu, via_calls)
                );
            }
            println!();
        }
        // The HTTP/2 layer's two modes, with the same raw client: an authority the server accepts
        // (header blocks handed on as sent) and the socket path (every block re-encoded).
        let path = listen.to_str().unwrap().as_bytes().to_vec();
        let mut plain = RawClient::connect(&listen, b"localhost").await;
        let mut fixed = RawClient::connect(&listen, &path).await;
        let mut base_plain = match &baseline {
            Some((_, l)) => Some(RawClient::connect(l, b"localhost").await),
            None => None,
        };
        let mut sink = Vec::new();
        raw_latencies(&mut plain, calls / 4, &mut sink).await;
        raw_latencies(&mut fixed, calls / 4, &mut sink).await;
        let (mut p, mut f, mut b) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            if let Some(c) = &mut base_plain {
                raw_latencies(c, calls, &mut b).await;
            }
            raw_latencies(&mut plain, calls, &mut p).await;
            raw_latencies(&mut fixed, calls, &mut f).await;
        }
        let (p50, f50) = (pct(&mut p, 0.5), pct(&mut f, 0.5));
        println!("Version (forwarded), raw HTTP/2 client, by :authority");
        println!(
            "  latency median: localhost {p50:7.1} µs | the socket path (re-encoded) {f50:7.1} µs (ratio {:.3})",
            f50 / p50
        );
        println!(
            "  latency p99:    localhost {:7.1} µs | the socket path (re-encoded) {:7.1} µs",
            pct(&mut p, 0.99),
            pct(&mut f, 0.99)
        );
        if !b.is_empty() {
            println!(
                "  baseline build, localhost: median {:7.1} µs (the socket path is refused there)",
                pct(&mut b, 0.5)
            );
        }
        println!();
        (rows, cpu_under_load)
    });
    let (mut rows, cpu_under_load) = summary;
    drop(relay);
    drop(frame_relay);
    drop(baseline);
    drop(pg);
    if real_upstream.is_some() {
        print_summary(&rows, cpu_under_load);
        return;
    }

    // Enforcement: PullImage and CreateContainer through a pullgate holding a 100,000-image bundle.
    let bytes = install_big_bundle(
        &dir.path().join("state-enforce"),
        &dir.path().join("trust.toml"),
    );
    {
        let mut images = fake.observed.images.lock().unwrap();
        put_manifest(&fake.observed, &app_digest(77_777), BENCH_IMAGE_ID);
        let img = cri::Image {
            id: BENCH_IMAGE_ID.into(),
            repo_digests: vec![format!(
                "registry.corp/approved/library/app77777@{}",
                app_digest(77_777)
            )],
            ..Default::default()
        };
        // Known by its ID, and by the pinned mirror name an ImageStatus of its public name asks for.
        images.insert(
            format!(
                "registry.corp/approved/library/app77777@{}",
                app_digest(77_777)
            ),
            img.clone(),
        );
        images.insert(BENCH_IMAGE_ID.into(), img);
    }
    // Images containerd holds before pullgate starts (pre-pulled), never started: pullgate learns
    // them at start. Images 0..4n and 5n..6n arrive after that (see below).
    let n = calls as usize;
    let new_image = |i: usize| {
        let id = format!("sha256:{:064x}", 0xc0ffee_u128 * 1_000_000 + i as u128);
        put_manifest(&fake.observed, &app_digest(i), &id);
        let pinned = format!("registry.corp/approved/library/app{i}@{}", app_digest(i));
        let img = cri::Image {
            id: id.clone(),
            repo_digests: vec![pinned.clone()],
            ..Default::default()
        };
        let mut images = fake.observed.images.lock().unwrap();
        // Known under the pinned pull's name too, as after a pull of it.
        images.insert(pinned, img.clone());
        images.insert(id, img);
    };
    for i in 4 * n..5 * n {
        new_image(i);
    }
    // The pod sandboxes containerd holds before pullgate starts: the steady-state pod, and one pod
    // per start of the round that starts pre-pulled images in them.
    fake.add_sandbox("sandbox", &sandbox());
    for i in 0..n {
        fake.add_sandbox(&format!("old-pod-{i}"), &sandbox());
    }
    let reads_before = fake.observed.content_namespaces.lock().unwrap().len();
    let (pg, listen) = start_pullgate(dir.path(), &upstream_path, workers, "enforce");
    let pg_pid = pg.0.id();
    let baseline = std::env::var_os("BENCH_BASELINE_BIN")
        .filter(|b| !b.is_empty())
        .map(|bin| {
            install_big_bundle(
                &dir.path().join("state-enforce-baseline"),
                &dir.path().join("trust.toml"),
            );
            println!("baseline build: {}", bin.to_string_lossy());
            start_pullgate_bin(
                Path::new(&bin),
                dir.path(),
                &upstream_path,
                workers,
                "enforce-baseline",
            )
        });
    println!(
        "\nenforcement: pullgate with a {IMAGES}-image bundle ({:.1} MiB), audit log on",
        bytes as f64 / 1048576.0
    );
    // pullgate learns what containerd holds as soon as it answers: one Content.Read per image.
    // A baseline build that learns them too must have finished before the rest arrives: an image
    // it listed at its start would be proven ahead, and its first start cost no lookup (a build
    // that learns nothing at start is waited for 10 s at most).
    let held = n + 1;
    let reads = || fake.observed.content_namespaces.lock().unwrap().len();
    let waited = Instant::now();
    while reads() < reads_before + held {
        assert!(
            waited.elapsed() < Duration::from_secs(60),
            "pullgate did not learn the {held} images containerd held at its start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    if baseline.is_some() {
        let waited = Instant::now();
        while reads() < reads_before + 2 * held && waited.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    println!(
        "  pullgate had proven the {held} images containerd held at its start (and listed its {} pod sandboxes); waited {:.2} s more for it",
        n + 1,
        waited.elapsed().as_secs_f64()
    );
    // What arrives past pullgate after it started: images pre-pulled later, and pods created on
    // containerd's own socket.
    for i in (0..4 * n).chain(5 * n..6 * n).chain(7 * n..9 * n) {
        new_image(i);
    }
    // Multi-platform images as most public ones are: the repo digest names an index of eight
    // platforms, the node's listed last and the only one containerd holds (it pulls no other).
    for i in (6 * n..7 * n).chain(9 * n..10 * n) {
        new_image(i);
        let manifest = format!("sha256:{:064x}", 0xface_u128 * 1_000_000 + i as u128);
        {
            let mut content = fake.observed.content.lock().unwrap();
            let bytes = content
                .remove(&app_digest(i))
                .expect("new_image put the manifest");
            content.insert(manifest.clone(), bytes);
        }
        let mut children: Vec<_> = [
            "arm", "386", "ppc64le", "s390x", "riscv64", "mips64le", "loong64",
        ]
        .iter()
        .enumerate()
        .map(|(k, arch)| {
            (
                format!(
                    "sha256:{:064x}",
                    0xabba_u128 * 1_000_000_000 + (i * 8 + k) as u128
                ),
                Some(("linux", *arch)),
            )
        })
        .collect();
        children.push((
            manifest,
            Some(("linux", pullgate::node::enforce::lookup::NODE_ARCH)),
        ));
        put_index(&fake.observed, &app_digest(i), &children);
    }
    for i in 0..2 * n {
        fake.add_sandbox(&format!("new-pod-{i}"), &sandbox());
    }
    // The null relay again, to measure what it adds to a forwarded call (Version) in the same
    // rounds as the intercepted calls: the yardstick of each row's ratio.
    let (relay, relay_listen) = start_relay(dir.path(), &upstream_path);
    let enforced = rt.block_on(async {
        let direct = cri_channel(&upstream_path).await;
        let null = cri_channel(&relay_listen).await;
        let via = cri_channel(&listen).await;
        let (mut dv, mut rv) = (Vec::new(), Vec::new());
        let mut measured: Vec<(&'static str, f64, f64)> = Vec::new();
        let base = match &baseline {
            Some((_, sock)) => Some(cri_channel(sock).await),
            None => None,
        };
        // Through pullgate, the approved name finds the image pulled under its pinned mirror name,
        // shown by its public names.
        let shown = image_status(&via, BENCH_USER_IMAGE)
            .await
            .expect("the approved image is found through pullgate");
        assert_eq!(shown.id, BENCH_IMAGE_ID);
        assert!(
            shown.repo_tags.contains(&BENCH_IMAGE.to_string()),
            "shown by its public name: {:?}",
            shown.repo_tags
        );
        let mut sink = Vec::new();
        latencies(&null, Method::Version, calls / 4, &mut sink).await;
        for (label, m) in [
            // What forwarding costs in the same rounds and through the same daemon (a 100,000-image
            // bundle in memory): the intercepted rows' own share is what they add on top of it.
            ("Version (forwarded by the enforcing pullgate)", Method::Version),
            (
                "ImageStatus (100k bundle, an approved name: resolved, names shown)",
                Method::ApprovedImageStatus,
            ),
            ("PullImage (approved, rewritten, audited)", Method::PullImage),
            ("CreateContainer (decision cached)", Method::CreateContainer),
        ] {
            let mut sink = Vec::new();
            latencies(&direct, m, calls / 4, &mut sink).await;
            latencies(&via, m, calls / 4, &mut sink).await;
            if let Some(b) = &base {
                latencies(b, m, calls / 4, &mut sink).await;
            }
            let (mut d, mut v, mut bl) = (Vec::new(), Vec::new(), Vec::new());
            for round in 0..rounds {
                latencies(&direct, Method::Version, calls / 2, &mut dv).await;
                latencies(&null, Method::Version, calls / 2, &mut rv).await;
                latencies(&direct, m, calls, &mut d).await;
                // The two builds take turns going first, so the order favours neither.
                let first = round % 2 == 1;
                if let Some(b) = base.as_ref().filter(|_| first) {
                    latencies(b, m, calls, &mut bl).await;
                }
                latencies(&via, m, calls, &mut v).await;
                if let Some(b) = base.as_ref().filter(|_| !first) {
                    latencies(b, m, calls, &mut bl).await;
                }
            }
            let cpu0 = cpu_time(pg_pid);
            let mut sink = Vec::new();
            latencies(&via, m, calls, &mut sink).await;
            let cpu = (cpu_time(pg_pid) - cpu0).as_secs_f64() * 1e6 / calls as f64;
            measured.push((label, pct(&mut d, 0.5), pct(&mut v, 0.5)));
            print_added(label, &mut d, &mut v, Some(&mut bl));
            println!("  pullgate CPU per call: {cpu:.1} µs sequential");
        }
        // Starts that each meet something for the first time: every call a different image and/or
        // a new pod.
        let id = |i: usize| format!("sha256:{:064x}", 0xc0ffee_u128 * 1_000_000 + i as u128);
        // Where a start's pod comes from: created through the build measured (`RunPodSandbox`,
        // kubelet's path for every new pod; not timed), or a sandbox containerd already has.
        enum Pod {
            Run,
            Known(String),
        }
        // (the pod, the image, the image's index when it is pulled through the build first (not
        // timed), the pod spec's name of the image, the name kubelet's `ImageStatus` right before
        // the start asks for (not timed))
        type Start = (Pod, String, Option<usize>, String, Option<String>);
        let known = |p: String| Pod::Known(p);
        let user = |i: usize| format!("app{i}:1.0");
        let once: [(&'static str, Vec<Start>); 12] = [
            // First, while the images pullgate learned at its start are all still remembered (at
            // most 4,096 proven images are remembered; the rows below prove 4 × BENCH_CALLS more).
            (
                "CreateContainer (first start in a pod and of an image containerd held when pullgate started)",
                (4 * n..5 * n)
                    .map(|i| (known(format!("old-pod-{}", i - 4 * n)), id(i), None, user(i), None))
                    .collect(),
            ),
            (
                "CreateContainer (image that arrived past pullgate: lookups of the manifest its name pins, Content.Read)",
                (0..n)
                    .map(|i| (known("sandbox".into()), id(i), None, user(i), None))
                    .collect(),
            ),
            (
                "CreateContainer (image that arrived past pullgate, no user_specified_image: ImageStatus + Content.Read lookups)",
                (5 * n..6 * n)
                    .map(|i| (known("sandbox".into()), id(i), None, String::new(), None))
                    .collect(),
            ),
            (
                "CreateContainer (image that arrived past pullgate as an index of 8 platforms, the node's last, no user_specified_image: lookups)",
                (6 * n..7 * n)
                    .map(|i| (known("sandbox".into()), id(i), None, String::new(), None))
                    .collect(),
            ),
            (
                "CreateContainer (first start in a new pod, image decision cached)",
                (0..n)
                    .map(|_| (Pod::Run, BENCH_IMAGE_ID.to_string(), None, BENCH_USER_IMAGE.to_string(), None))
                    .collect(),
            ),
            (
                "CreateContainer (first start in a new pod, image that arrived past pullgate: one lookup, Content.Read)",
                (n..2 * n).map(|i| (Pod::Run, id(i), None, user(i), None)).collect(),
            ),
            (
                "CreateContainer (first start in a new pod of an image pullgate just pulled)",
                (2 * n..3 * n).map(|i| (Pod::Run, id(i), Some(i), user(i), None)).collect(),
            ),
            (
                "CreateContainer (first start in a pod created past pullgate, decision cached: PodSandboxStatus)",
                (0..n)
                    .map(|i| (known(format!("new-pod-{i}")), BENCH_IMAGE_ID.to_string(), None, BENCH_USER_IMAGE.to_string(), None))
                    .collect(),
            ),
            (
                "CreateContainer (first start in a pod and of an image, both past pullgate: PodSandboxStatus alongside Content.Read lookups)",
                (3 * n..4 * n)
                    .map(|i| (known(format!("new-pod-{}", i - 2 * n)), id(i), None, user(i), None))
                    .collect(),
            ),
            // kubelet's order: `ImageStatus` of the pod spec's name, then the start by the ID it
            // gave, right behind it (kubelet itself does more in between).
            (
                "CreateContainer (kubelet's ImageStatus of its name right before, first start of an image that arrived past pullgate)",
                (7 * n..8 * n)
                    .map(|i| (known("sandbox".into()), id(i), None, user(i), Some(user(i))))
                    .collect(),
            ),
            (
                "CreateContainer (kubelet's ImageStatus of its name right before, first start of an image that arrived past pullgate, no user_specified_image)",
                (8 * n..9 * n)
                    .map(|i| (known("sandbox".into()), id(i), None, String::new(), Some(user(i))))
                    .collect(),
            ),
            (
                "CreateContainer (kubelet's ImageStatus of its name right before, first start of an image that arrived past pullgate as an index of 8 platforms, the node's last, no user_specified_image)",
                (9 * n..10 * n)
                    .map(|i| (known("sandbox".into()), id(i), None, String::new(), Some(user(i))))
                    .collect(),
            ),
        ];
        // Every build sees each start for the first time (each has its own caches).
        for (label, starts) in once {
            let (mut d, mut v, mut bl) = (Vec::new(), Vec::new(), Vec::new());
            // The ImageStatus before each start, when kubelet's order is measured.
            let (mut sd, mut sv, mut sb) = (Vec::new(), Vec::new(), Vec::new());
            for (i, (pod, image, pulled, user_image, asked)) in starts.iter().enumerate() {
                if let Some(app) = pulled {
                    let name = format!("docker.io/library/app{app}:1.0");
                    pull(&via, &name).await;
                    if let Some(b) = &base {
                        pull(b, &name).await;
                    }
                }
                let (pod_v, pod_b) = match pod {
                    Pod::Known(p) => (p.clone(), p.clone()),
                    Pod::Run => (
                        run_pod(&via).await,
                        match &base {
                            Some(b) => run_pod(b).await,
                            None => String::new(),
                        },
                    ),
                };
                if i % 4 == 0 {
                    // The yardstick, interleaved here too.
                    latencies(&direct, Method::Version, 1, &mut dv).await;
                    latencies(&null, Method::Version, 1, &mut rv).await;
                }
                // One path's start (after kubelet's ImageStatus, when the row makes it), timed.
                let start = async |ch: &Channel, pod: &str, s: &mut Vec<Duration>, out: &mut Vec<Duration>| {
                    status_before(ch, asked.as_deref(), s).await;
                    let t = Instant::now();
                    create_in(ch, pod, image, user_image).await;
                    out.push(t.elapsed());
                };
                start(&direct, &pod_v, &mut sd, &mut d).await;
                // The two builds take turns going first, so the order favours neither.
                let first = i % 2 == 1;
                if let Some(b) = base.as_ref().filter(|_| first) {
                    start(b, &pod_b, &mut sb, &mut bl).await;
                }
                start(&via, &pod_v, &mut sv, &mut v).await;
                if let Some(b) = base.as_ref().filter(|_| !first) {
                    start(b, &pod_b, &mut sb, &mut bl).await;
                }
            }
            measured.push((label, pct(&mut d, 0.5), pct(&mut v, 0.5)));
            print_added(label, &mut d, &mut v, Some(&mut bl));
            if !sv.is_empty() {
                print_added(
                    "  the ImageStatus right before each of those starts (not in the summary)",
                    &mut sd,
                    &mut sv,
                    Some(&mut sb),
                );
            }
        }
        let relay_added = pct(&mut rv, 0.5) - pct(&mut dv, 0.5);
        println!(
            "\nnull relay, Version, interleaved with the rows above: direct {:.1} µs, relay {:.1} µs, added {relay_added:.1} µs",
            pct(&mut dv, 0.5),
            pct(&mut rv, 0.5)
        );
        (measured, relay_added)
    });
    drop(relay);
    let (measured, relay_added) = enforced;
    for (label, d50, v50) in measured {
        // Forwarded calls: 1.25; intercepted steady-state calls: 1.5; first starts (lookups in
        // containerd): 3.
        let target = if label.contains("first start") || label.contains("lookups") {
            3.0
        } else if label.contains("forwarded") {
            1.25
        } else {
            1.5
        };
        rows.push(Row {
            label,
            pullgate_added: v50 - d50,
            relay_added,
            target,
        });
    }
    print_summary(&rows, cpu_under_load);
    drop(baseline);
    drop(pg);
}
