//! The pullgate binary under test, started in front of a containerd socket.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::process::Proc;
use super::tail;

/// The minimal configuration every test starts from (pullgate at debug, its dependencies at info, so
/// the log shows every intercepted call without HTTP/2 frame noise); tests append their own sections.
pub const BASE_CONFIG: &str = "[log]\nlevel = \"pullgate=debug,info\"\nformat = \"text\"\n";

/// `pullgate serve --config <file> --listen <sock> --upstream <containerd sock>`.
pub struct Pullgate {
    proc: Proc,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Pullgate {
    /// The binary cargo built for this test run.
    pub fn binary() -> PathBuf {
        PathBuf::from(env!("CARGO_BIN_EXE_pullgate"))
    }

    /// Writes `BASE_CONFIG + extra_config` to `<tmp>/pullgate/config.toml`, starts pullgate and waits
    /// until its socket accepts connections (panics with its log if it exits or times out).
    pub fn start(tmp: &Path, upstream: &Path, extra_config: &str) -> Pullgate {
        let bin = Self::binary();
        assert!(
            bin.exists(),
            "pullgate binary {} is missing (cargo should have built it)",
            bin.display()
        );
        let dir = tmp.join("pullgate");
        std::fs::create_dir_all(&dir).expect("create pullgate dir");
        let config = dir.join("config.toml");
        // Every path and port per test: state under the temp dir, the endpoint on an ephemeral port.
        let mut text = format!("{BASE_CONFIG}{extra_config}\n");
        if !extra_config.contains("[policy]") {
            text.push_str(&format!(
                "[policy]\nstate_dir = \"{}\"\ntrust = \"{}\"\n",
                dir.join("state").display(),
                dir.join("trust.toml").display()
            ));
        }
        if !extra_config.contains("[metrics]") {
            text.push_str("[metrics]\nlisten = \"127.0.0.1:0\"\n");
        }
        std::fs::write(&config, text).expect("write pullgate config");
        let socket = dir.join("pullgate.sock");
        let log = dir.join("pullgate.log");
        let mut cmd = Command::new(&bin);
        cmd.arg("serve")
            .arg("--config")
            .arg(&config)
            .arg("--listen")
            .arg(&socket)
            .arg("--upstream")
            .arg(upstream);
        cmd.env("NO_COLOR", "1");
        let mut proc = Proc::spawn("pullgate", cmd, &log, &log);
        proc.grace = Duration::from_secs(15);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = proc.exited() {
                panic!(
                    "pullgate exited during start-up ({status}); its log:\n{}",
                    tail(&log, 40)
                );
            }
            if UnixStream::connect(&socket).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                proc.stop();
                panic!(
                    "pullgate's socket {} never accepted; its log:\n{}",
                    socket.display(),
                    tail(&log, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Pullgate {
            proc,
            dir,
            config,
            socket,
            log,
        }
    }

    /// pullgate's log so far.
    pub fn log_contents(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid
    }

    /// Sends a signal (e.g. SIGHUP for a reload) to pullgate.
    pub fn signal(&mut self, sig: libc::c_int) {
        self.proc.signal(sig);
    }

    /// Stops pullgate (SIGTERM, then SIGKILL after the grace period); returns its exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        self.proc.stop()
    }
}
