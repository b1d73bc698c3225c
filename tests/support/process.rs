//! Spawned daemons tracked by PID, and the low-level clean-up helpers (signals, /proc scans, unmounts).

use std::ffi::CString;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A daemon the harness started. Dropping it stops exactly this PID: SIGTERM, then SIGKILL after
/// `grace`. It runs in its own process group (so a terminal's ^C reaches only the test) and gets
/// `PR_SET_PDEATHSIG = SIGKILL`, so it dies with the spawning thread if the test binary is killed.
pub struct Proc {
    pub name: String,
    pub pid: u32,
    /// Where its stdout went.
    pub stdout: PathBuf,
    /// Where its stderr went.
    pub stderr: PathBuf,
    pub grace: Duration,
    child: Option<Child>,
}

impl Proc {
    /// Spawns `cmd` with stdin from /dev/null and stdout/stderr appended to the given files.
    pub fn spawn(name: &str, mut cmd: Command, stdout: &Path, stderr: &Path) -> Proc {
        let out = open_log(stdout);
        let err = if stderr == stdout {
            out.try_clone().expect("dup log fd")
        } else {
            open_log(stderr)
        };
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        // SAFETY: the closure only calls prctl, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {name} ({cmd:?}): {e}"));
        Proc {
            name: name.to_string(),
            pid: child.id(),
            stdout: stdout.to_path_buf(),
            stderr: stderr.to_path_buf(),
            grace: Duration::from_secs(5),
            child: Some(child),
        }
    }

    /// `Some(status)` if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Sends `sig` to this PID (if it is still ours to signal).
    pub fn signal(&mut self, sig: libc::c_int) {
        if self.child.is_some() && self.exited().is_none() {
            signal_pid(self.pid, sig);
        }
    }

    /// Stops the process: SIGTERM, wait up to `grace`, SIGKILL, reap. Idempotent.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        signal_pid(self.pid, libc::SIGTERM);
        let deadline = Instant::now() + self.grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let _ = child.kill();
        child.wait().ok()
    }

    /// Everything the process wrote so far (stdout, then stderr if separate).
    pub fn output(&self) -> String {
        let mut s = std::fs::read_to_string(&self.stdout).unwrap_or_default();
        if self.stderr != self.stdout {
            s.push_str(&std::fs::read_to_string(&self.stderr).unwrap_or_default());
        }
        s
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn open_log(path: &Path) -> File {
    File::options()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open log {}: {e}", path.display()))
}

pub fn signal_pid(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        if pid > 1 {
            // SAFETY: kill(2) with a positive PID signals exactly that process.
            unsafe { libc::kill(pid, sig) };
        }
    }
}

pub fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists() && proc_state(pid) != Some('Z')
}

fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// The parent PID of `pid`, from /proc.
pub fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The argv of `pid`, from /proc.
pub fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Every PID currently in /proc.
pub fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The containerd shims serving the containerd whose grpc socket is `address`: processes whose argv[0]
/// is a `containerd-shim*` binary and whose argv has `-address <address>`. Shims re-parent themselves
/// to init, so this is how we find the ones *our* containerd started and only those.
pub fn shims_of(address: &Path) -> Vec<u32> {
    let address = address.to_string_lossy();
    all_pids()
        .into_iter()
        .filter(|&pid| {
            let argv = cmdline(pid);
            argv.first().is_some_and(|a0| {
                a0.rsplit('/')
                    .next()
                    .unwrap_or("")
                    .starts_with("containerd-shim")
            }) && argv
                .windows(2)
                .any(|w| w[0] == "-address" && w[1] == address)
        })
        .collect()
}

/// All descendants of `root` (children first-level and below), from a /proc snapshot.
pub fn descendants(root: u32) -> Vec<u32> {
    let pairs: Vec<(u32, u32)> = all_pids()
        .into_iter()
        .filter_map(|p| Some((p, ppid(p)?)))
        .collect();
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for &(pid, pp) in &pairs {
            if pp == parent && !out.contains(&pid) {
                out.push(pid);
                frontier.push(pid);
            }
        }
    }
    out
}

/// SIGKILLs every shim of the containerd at `address` and everything running under them (the
/// containers), then waits briefly for them to go away.
pub fn kill_shims(address: &Path) {
    let shims = shims_of(address);
    if shims.is_empty() {
        return;
    }
    // Shims listen on /run/containerd/s/<hash>, outside our temp dir; a killed shim leaves it behind.
    let sockets: Vec<PathBuf> = shims.iter().flat_map(|&p| shim_sockets(p)).collect();
    let mut victims = Vec::new();
    for &shim in &shims {
        victims.extend(descendants(shim));
    }
    victims.extend(&shims);
    for &pid in &victims {
        signal_pid(pid, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && victims.iter().any(|&p| pid_alive(p)) {
        std::thread::sleep(Duration::from_millis(25));
    }
    for s in sockets {
        let _ = std::fs::remove_file(s);
    }
}

/// The unix socket paths under /run/containerd/s/ that `pid` holds open (a shim's listening socket).
fn shim_sockets(pid: u32) -> Vec<PathBuf> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().into_owned();
                    Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/unix")).unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let (inode, path) = (cols.get(6)?, cols.get(7)?);
            (inodes.iter().any(|i| i == inode) && path.starts_with("/run/containerd/s/"))
                .then(|| PathBuf::from(path))
        })
        .collect()
}

/// Mount points at or below `dir`, deepest first (from /proc/self/mountinfo).
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .filter(|m| m.starts_with(dir))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    mounts.dedup();
    mounts
}

fn unescape_mountinfo(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Lazily unmounts (MNT_DETACH) everything mounted at or below `dir`, deepest first.
pub fn unmount_below(dir: &Path) {
    for _round in 0..3 {
        let mounts = mounts_below(dir);
        if mounts.is_empty() {
            return;
        }
        for m in mounts {
            if let Ok(c) = CString::new(m.as_os_str().as_encoded_bytes()) {
                // SAFETY: umount2 with a valid NUL-terminated path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}

/// Runs a short helper command to completion; panics with its output if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// [`wait_for`] without blocking the async runtime: polls `check` every 100 ms.
pub async fn wait_for_async<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `timeout` with `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
