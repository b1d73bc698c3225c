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
    /// until it is ready: its socket accepts connections and its pid file names it (panics with its
    /// log if it exits or times out).
    pub fn start(tmp: &Path, upstream: &Path, extra_config: &str) -> Pullgate {
        let config = Self::configure(tmp, extra_config);
        Self::start_configured(tmp, &config, upstream)
    }

    /// Writes `<tmp>/pullgate/config.toml` (`BASE_CONFIG + extra_config`, plus a `[policy]` and a
    /// `[metrics]` section under the temp dir unless `extra_config` has its own) without starting
    /// anything, so a test can run `pullgate bundle install --config` first. Returns its path.
    pub fn configure(tmp: &Path, extra_config: &str) -> PathBuf {
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
        config
    }

    /// Starts pullgate with an existing config file (see [`Pullgate::configure`]), listening on
    /// `<tmp>/pullgate/pullgate.sock` in front of `upstream`.
    pub fn start_configured(tmp: &Path, config: &Path, upstream: &Path) -> Pullgate {
        let bin = Self::binary();
        assert!(
            bin.exists(),
            "pullgate binary {} is missing (cargo should have built it)",
            bin.display()
        );
        let dir = tmp.join("pullgate");
        std::fs::create_dir_all(&dir).expect("create pullgate dir");
        let config = config.to_path_buf();
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
            // Ready: the CRI socket accepts, and the pid file (written once every listener is
            // bound and signals are handled) names this process.
            let pid_file = std::fs::read_to_string(dir.join("pullgate.pid")).unwrap_or_default();
            if UnixStream::connect(&socket).is_ok() && pid_file.trim() == proc.pid.to_string() {
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

    /// `Some(status)` if pullgate has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.proc.exited()
    }
}

/// What a `pullgate` command printed and how it exited.
#[derive(Debug, Clone)]
pub struct CliOutput {
    pub args: Vec<String>,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// stdout and stderr together, for assertions on messages.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl std::fmt::Display for CliOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pullgate {} -> exit {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.args.join(" "),
            self.code,
            self.stdout,
            self.stderr
        )
    }
}

/// Runs the pullgate binary under test with `args` (a one-shot command such as `keygen`, `bundle
/// sign` or `status`) and captures its output; never panics on a non-zero exit.
pub fn cli<I, S>(args: I) -> CliOutput
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let out = Command::new(Pullgate::binary())
        .args(&args)
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run pullgate {args:?}: {e}"));
    CliOutput {
        args: args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Like [`cli`], but panics with the whole output unless the command exits 0.
pub fn cli_ok<I, S>(args: I) -> CliOutput
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = cli(args);
    assert!(out.success(), "command failed: {out}");
    out
}
