//! Processes the proxy benchmarks measure against: a real `pullgate serve`, the null relay (the
//! benchmark binary re-executed as a process that only copies bytes between two unix sockets — the
//! floor any proxy in a separate process pays), and the frame relay (the same, reading HTTP/2 frames
//! and decoding every header block — the floor of a proxy that must read each call's path). Each
//! child is stopped and reaped when dropped, and reads its own CPU time and memory from /proc. Shared
//! by the proxy and footprint benchmarks (`#[path]`-included).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Environment variable that turns a benchmark binary into the null relay:
/// `LISTEN_SOCKET:UPSTREAM_SOCKET`.
const RELAY_ENV: &str = "PULLGATE_BENCH_RELAY";
/// Set beside [`RELAY_ENV`]: the relay reads frames and decodes header blocks ([`frame_relay`]).
const FRAMES_ENV: &str = "PULLGATE_BENCH_RELAY_FRAMES";

/// A numeric benchmark setting from the environment, or `default`.
pub fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A child process, stopped (SIGTERM) and reaped when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: signals our own child, which has not been reaped yet.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// User + system CPU time so far.
    #[allow(dead_code)]
    pub fn cpu(&self) -> Duration {
        cpu_time(self.pid())
    }

    /// A `kB` line of /proc/PID/status (`VmRSS`, `VmHWM`), in MiB.
    #[allow(dead_code)]
    pub fn status_mib(&self, key: &str) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(f64::NAN, |kib| kib / 1024.0)
    }
}

/// CPU time (user + system) a process has used so far, from /proc/PID/stat (clock ticks).
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields 14 and 15 (utime, stime) are the 12th and 13th after the command name.
    let ticks: u64 = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}

/// Times a process has gone to sleep waiting (voluntary context switches, from /proc/PID/status):
/// each is a wake-up later.
pub fn wakeups(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits for a socket to appear: up to two minutes (a debug build verifies a 100,000-image bundle
/// slowly on a loaded machine).
pub fn wait_for_socket(path: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !path.exists() {
        assert!(Instant::now() < deadline, "{what} did not start listening");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The pullgate binary to measure: `BENCH_PULLGATE_BIN` (another build, e.g. an earlier commit,
/// in the same conditions) or this tree's.
pub fn pullgate_bin() -> PathBuf {
    std::env::var_os("BENCH_PULLGATE_BIN")
        .filter(|b| !b.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_pullgate")))
}

/// `bin serve --config CONFIG --listen LISTEN --upstream UPSTREAM` from `command` (which may carry
/// environment settings), once it listens.
pub fn serve(mut command: Command, config: &Path, listen: &Path, upstream: &Path) -> Proc {
    // Owned by a `Proc` before waiting, so a failed start does not leave it running.
    let child = Proc(
        command
            .arg("serve")
            .arg("--config")
            .arg(config)
            .arg("--listen")
            .arg(listen)
            .arg("--upstream")
            .arg(upstream)
            .stdout(Stdio::null())
            .spawn()
            .expect("start pullgate serve"),
    );
    wait_for_socket(listen, "pullgate");
    child
}

/// Runs the null relay instead of the benchmark when this process was started as one (never
/// returns then). Call first in `main`.
pub fn relay_if_asked() {
    if let Ok(spec) = std::env::var(RELAY_ENV) {
        run_relay(&spec);
    }
}

/// The null relay's body: one thread, one event loop, each connection's bytes copied both ways
/// unread.
fn run_relay(spec: &str) -> ! {
    let (listen, upstream) = spec.split_once(':').expect("LISTEN:UPSTREAM");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let frames = std::env::var_os(FRAMES_ENV).is_some();
    runtime.block_on(async {
        let listener = tokio::net::UnixListener::bind(listen).expect("relay binds");
        while let Ok((mut down, _)) = listener.accept().await {
            let upstream = upstream.to_owned();
            tokio::spawn(async move {
                if let Ok(mut up) = tokio::net::UnixStream::connect(upstream).await {
                    if frames {
                        frame_relay::relay(down, up).await;
                    } else {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                }
            });
        }
    });
    std::process::exit(0)
}

/// Threads that keep every CPU from going idle while they live, one pinned to each CPU this
/// process may use, at the lowest priority there is (`SCHED_IDLE`): any other runnable thread is
/// preferred to them, so the measured processes keep their CPU time and find a CPU that does not
/// halt (a wake-up may still wait for the next scheduler tick now and then: compare medians, not
/// tails). In a virtual machine a halted vCPU is woken by an interrupt through the hypervisor,
/// tens of µs here; on a node busy with pods its CPUs seldom halt. Stopped when dropped.
#[allow(dead_code)]
pub struct Busy {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

#[allow(dead_code)]
impl Busy {
    /// Starts the threads once each is pinned and `SCHED_IDLE`; panics naming the failure if one
    /// could not be.
    pub fn start() -> Busy {
        use std::sync::atomic::{AtomicBool, Ordering};
        // SAFETY: a zeroed cpu_set_t is an empty set; sched_getaffinity fills at most its size.
        let mut allowed: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: `allowed` is a valid cpu_set_t of `size` bytes.
        let got = unsafe { libc::sched_getaffinity(0, size, &mut allowed) };
        assert_eq!(
            got,
            0,
            "sched_getaffinity: {}",
            std::io::Error::last_os_error()
        );
        let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
            // SAFETY: `cpu` is below CPU_SETSIZE.
            .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &allowed) })
            .collect();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let threads = cpus
            .iter()
            .map(|&cpu| {
                let (stop, ready_tx) = (stop.clone(), ready_tx.clone());
                std::thread::spawn(move || {
                    // SAFETY: pins and sets the policy of this thread only, with valid arguments.
                    let set = unsafe {
                        let mut one: libc::cpu_set_t = std::mem::zeroed();
                        libc::CPU_SET(cpu, &mut one);
                        let param = libc::sched_param { sched_priority: 0 };
                        if libc::sched_setaffinity(0, size, &one) != 0 {
                            Err(format!("pin to CPU {cpu}"))
                        } else if libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 {
                            Err(format!("SCHED_IDLE on CPU {cpu}"))
                        } else {
                            Ok(())
                        }
                    };
                    let set =
                        set.map_err(|what| format!("{what}: {}", std::io::Error::last_os_error()));
                    let ok = set.is_ok();
                    let _ = ready_tx.send(set);
                    while ok && !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        let busy = Busy { stop, threads };
        for _ in &cpus {
            if let Err(e) = ready.recv().expect("a spinning thread reports") {
                panic!("BENCH_BUSY: {e}");
            }
        }
        busy
    }

    pub fn threads(&self) -> usize {
        self.threads.len()
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Starts the null relay in front of `upstream`, listening on `dir/null-relay.sock`.
pub fn start_relay(dir: &Path, upstream: &Path) -> (Proc, PathBuf) {
    start_relay_process(dir, upstream, false)
}

/// Starts the frame relay in front of `upstream`, listening on `dir/frame-relay.sock`.
#[allow(dead_code)]
pub fn start_frame_relay(dir: &Path, upstream: &Path) -> (Proc, PathBuf) {
    start_relay_process(dir, upstream, true)
}

fn start_relay_process(dir: &Path, upstream: &Path, frames: bool) -> (Proc, PathBuf) {
    let (name, what) = match frames {
        false => ("null-relay.sock", "the null relay"),
        true => ("frame-relay.sock", "the frame relay"),
    };
    let listen = dir.join(name);
    // A relay started before (and stopped) leaves its socket file behind.
    let _ = std::fs::remove_file(&listen);
    let mut command = Command::new(std::env::current_exe().unwrap());
    command.env(
        RELAY_ENV,
        format!("{}:{}", listen.display(), upstream.display()),
    );
    if frames {
        command.env(FRAMES_ENV, "1");
    }
    let child = Proc(
        command
            .spawn()
            .unwrap_or_else(|e| panic!("start {what}: {e}")),
    );
    wait_for_socket(&listen, what);
    (child, listen)
}

/// The frame relay: what a proxy that reads every call's path pays at least, without pullgate's
/// HTTP/2 server and client. One task per connection reads both sockets; every frame passes as it
/// came — stream IDs, SETTINGS, PINGs, window updates, DATA — except header blocks (HEADERS and its
/// CONTINUATIONs), which are decoded with pullgate's HPACK decoder (tracking the sender's table) and
/// sent on re-encoded as literals without indexing, so the receiver's table is never used and what
/// it decodes is exactly what the relay decoded. Header blocks are not flow-controlled, so the
/// peers' windows stay true. A baseline, not a proxy: it routes nothing and trusts both peers (a
/// block it cannot decode ends the connection).
mod frame_relay {
    use pullgate::node::proxy::relay::blocks::{Blocks, MAX_HEADER_LIST, TABLE_SIZE};
    use pullgate::node::proxy::relay::frame::{CONTINUATION, FRAME_HEADER as HEADER_LEN, HEADERS};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    const PREFACE_LEN: usize = 24;

    /// One direction: the sender's header blocks ([`Blocks`]: gathered, decoded with the sender's
    /// table, re-encoded as literals).
    struct Direction {
        blocks: Blocks,
    }

    impl Direction {
        fn new(request: bool) -> Self {
            Direction {
                blocks: Blocks::new(request, TABLE_SIZE, MAX_HEADER_LIST, MAX_HEADER_LIST),
            }
        }

        /// Moves every whole frame at the start of `input` to `out`; `Err` for a block that does
        /// not decode or frames that break the header-block rules.
        fn pump(&mut self, input: &mut Vec<u8>, out: &mut Vec<u8>) -> Result<(), ()> {
            let mut at = 0;
            while input.len() - at >= HEADER_LEN {
                let h = &input[at..at + HEADER_LEN];
                let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                if input.len() - at < HEADER_LEN + len {
                    break;
                }
                let (kind, flags) = (h[3], h[4]);
                let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                let payload = &input[at + HEADER_LEN..at + HEADER_LEN + len];
                if kind == HEADERS || kind == CONTINUATION {
                    let block = self.blocks.frame(kind, flags, stream, payload);
                    match block.map_err(|_| ())? {
                        Some(b) if b.inspection.overflow => return Err(()),
                        Some(b) => out.extend_from_slice(&b.frames),
                        None => {}
                    }
                } else {
                    self.blocks.allow(kind).map_err(|_| ())?;
                    out.extend_from_slice(&input[at..at + HEADER_LEN + len]);
                }
                at += HEADER_LEN + len;
            }
            input.drain(..at);
            Ok(())
        }
    }

    /// Relays one connection until either side closes or breaks the rules.
    pub async fn relay(mut down: UnixStream, mut up: UnixStream) {
        let mut preface = [0u8; PREFACE_LEN];
        if down.read_exact(&mut preface).await.is_err() || up.write_all(&preface).await.is_err() {
            return;
        }
        let (mut down_rx, mut down_tx) = down.split();
        let (mut up_rx, mut up_tx) = up.split();
        let (mut requests, mut responses) = (Direction::new(true), Direction::new(false));
        let (mut from_down, mut from_up) =
            (Vec::with_capacity(1 << 16), Vec::with_capacity(1 << 16));
        let mut out = Vec::with_capacity(1 << 16);
        loop {
            // `read_buf` reads into spare capacity only: keep room for a full read.
            from_down.reserve(1 << 15);
            from_up.reserve(1 << 15);
            tokio::select! {
                r = down_rx.read_buf(&mut from_down) => {
                    if !matches!(r, Ok(1..)) || requests.pump(&mut from_down, &mut out).is_err() {
                        return;
                    }
                    if up_tx.write_all(&out).await.is_err() {
                        return;
                    }
                }
                r = up_rx.read_buf(&mut from_up) => {
                    if !matches!(r, Ok(1..)) || responses.pump(&mut from_up, &mut out).is_err() {
                        return;
                    }
                    if down_tx.write_all(&out).await.is_err() {
                        return;
                    }
                }
            }
            out.clear();
        }
    }
}
