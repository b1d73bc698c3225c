//! Processes the proxy benchmarks measure against: a real `pullgate serve`, and the null relay (the
//! benchmark binary re-executed as a process that only copies bytes between two unix sockets — the
//! floor any proxy in a separate process pays). Each child is stopped and reaped when dropped, and
//! reads its own CPU time and memory from /proc. Shared by the proxy and footprint benchmarks
//! (`#[path]`-included).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Environment variable that turns a benchmark binary into the null relay:
/// `LISTEN_SOCKET:UPSTREAM_SOCKET`.
const RELAY_ENV: &str = "PULLGATE_BENCH_RELAY";

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
    runtime.block_on(async {
        let listener = tokio::net::UnixListener::bind(listen).expect("relay binds");
        while let Ok((mut down, _)) = listener.accept().await {
            let upstream = upstream.to_owned();
            tokio::spawn(async move {
                if let Ok(mut up) = tokio::net::UnixStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                }
            });
        }
    });
    std::process::exit(0)
}

/// Starts the null relay in front of `upstream`, listening on `dir/null-relay.sock`.
pub fn start_relay(dir: &Path, upstream: &Path) -> (Proc, PathBuf) {
    let listen = dir.join("null-relay.sock");
    // A relay started before (and stopped) leaves its socket file behind.
    let _ = std::fs::remove_file(&listen);
    let child = Proc(
        Command::new(std::env::current_exe().unwrap())
            .env(
                RELAY_ENV,
                format!("{}:{}", listen.display(), upstream.display()),
            )
            .spawn()
            .expect("start the null relay"),
    );
    wait_for_socket(&listen, "the null relay");
    (child, listen)
}
