//! The loopback registry, the private containerd, and `Stack`, which wires them together.

use std::ffi::CString;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::images::ImageFactory;
use super::process::{self, Proc};
use super::pullgate::Pullgate;
use super::{TestDir, loud, tail};

/// Registry names the tests treat as "public": containerd resolves every one of them to the loopback
/// public registry, so no pull can ever reach the internet.
pub const PUBLIC_REGISTRY_NAMES: &[&str] = &[
    "docker.io",
    "registry.k8s.io",
    "gcr.io",
    "quay.io",
    "ghcr.io",
];

/// A Distribution (docker-registry) v2 registry on 127.0.0.1:<free port>, plain http, storage and logs
/// in its own dir. Its access log (one combined-log-format line per request) is kept in `access_log`.
pub struct Registry {
    proc: Proc,
    pub name: String,
    pub port: u16,
    pub dir: PathBuf,
    pub config: PathBuf,
    /// Combined-log-format lines, one per HTTP request the registry served.
    pub access_log: PathBuf,
    /// The registry's own (logrus) log.
    pub log: PathBuf,
}

impl Registry {
    /// Starts a registry in `<tmp>/<name>` and waits until `GET /v2/` answers 200.
    pub fn start(tmp: &Path, name: &str) -> Registry {
        let dir = tmp.join(name);
        std::fs::create_dir_all(dir.join("storage")).expect("create registry dir");
        let mut last_err = String::new();
        // A port picked by binding :0 can be taken by someone else before the registry binds it; retry.
        for _attempt in 0..5 {
            let port = free_port();
            let config = dir.join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\n\
                     log:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\n\
                     storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n\
                     http:\n  addr: 127.0.0.1:{port}\n  headers:\n    X-Content-Type-Options: [nosniff]\n",
                    storage = dir.join("storage").display()
                ),
            )
            .expect("write registry config");
            let access_log = dir.join("access.log");
            let log = dir.join("registry.log");
            let mut cmd = Command::new("docker-registry");
            cmd.arg("serve").arg(&config);
            // Distribution writes its access log to stdout and its own log to stderr.
            let mut proc = Proc::spawn(&format!("registry {name}"), cmd, &access_log, &log);
            let ok = poll(Duration::from_secs(15), || {
                if proc.exited().is_some() {
                    return Some(false);
                }
                http_get_status(port, "/v2/")
                    .filter(|&s| s == 200)
                    .map(|_| true)
            });
            if ok == Some(true) {
                return Registry {
                    proc,
                    name: name.to_string(),
                    port,
                    dir,
                    config,
                    access_log,
                    log,
                };
            }
            proc.stop();
            last_err = tail(&log, 20);
        }
        panic!("registry {name} did not start; its log:\n{last_err}");
    }

    /// `127.0.0.1:PORT`, the registry's host as used in image references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The whole access log so far.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(&self.access_log).unwrap_or_default()
    }

    /// The request lines the registry received so far, method and path with query, e.g.
    /// `HEAD /v2/library/busybox/manifests/1?ns=docker.io` (containerd adds `ns=` with the registry
    /// name the image reference used when it goes through a hosts.toml mirror).
    pub fn requests(&self) -> Vec<String> {
        self.access_log()
            .lines()
            .filter_map(|l| {
                let start = l.find('"')? + 1;
                let end = start + l[start..].find('"')?;
                let req = &l[start..end];
                Some(
                    req.trim_end_matches(" HTTP/1.1")
                        .trim_end_matches(" HTTP/1.0")
                        .to_string(),
                )
            })
            .collect()
    }

    /// A mark to pass to [`Registry::requests_since`].
    pub fn mark(&self) -> usize {
        self.requests().len()
    }

    /// The requests received after `mark` was taken.
    pub fn requests_since(&self, mark: usize) -> Vec<String> {
        self.requests().into_iter().skip(mark).collect()
    }

    /// The requests received after `mark` whose path (query stripped) starts with `prefix`, e.g.
    /// `/v2/library/busybox/`.
    pub fn requests_under(&self, mark: usize, prefix: &str) -> Vec<String> {
        self.requests_since(mark)
            .into_iter()
            .filter(|r| {
                r.split_whitespace()
                    .nth(1)
                    .is_some_and(|p| p.starts_with(prefix))
            })
            .collect()
    }

    /// The request lines (method and path, query stripped) after `mark` that fetched or probed a
    /// manifest or blob, i.e. everything but the `/v2/` ping.
    pub fn content_requests_since(&self, mark: usize) -> Vec<String> {
        self.requests_since(mark)
            .into_iter()
            .filter_map(|r| {
                let mut it = r.split_whitespace();
                let (method, path) = (it.next()?, it.next()?);
                let path = path.split('?').next().unwrap_or(path);
                (path.contains("/manifests/") || path.contains("/blobs/"))
                    .then(|| format!("{method} {path}"))
            })
            .collect()
    }

    /// Whole access-log lines after `mark` (for failure messages: they carry the user agent).
    pub fn log_lines_since(&self, mark: usize) -> Vec<String> {
        self.access_log()
            .lines()
            .filter(|l| l.contains('"'))
            .skip(mark)
            .map(str::to_string)
            .collect()
    }

    pub fn stop(&mut self) {
        self.proc.stop();
    }

    /// The registry process's PID (e.g. to read its CPU time).
    pub fn pid(&self) -> u32 {
        self.proc.pid
    }

    /// Starts the registry again after [`Registry::stop`]: same port, same storage.
    pub fn restart(&mut self) {
        self.proc.stop();
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve").arg(&self.config);
        self.proc = Proc::spawn(
            &format!("registry {}", self.name),
            cmd,
            &self.access_log,
            &self.log,
        );
        let port = self.port;
        let up = poll(Duration::from_secs(15), || {
            http_get_status(port, "/v2/").filter(|&s| s == 200)
        });
        assert!(
            up.is_some(),
            "registry {} did not come back on port {port}; its log:\n{}",
            self.name,
            tail(&self.log, 20)
        );
    }

    /// Where the registry stores the content of blob `digest` (`sha256:…`), for tests that tamper
    /// with what it serves.
    pub fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        self.dir
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

/// How to configure a [`Containerd`].
#[derive(Clone, Debug)]
pub struct ContainerdOpts {
    /// `127.0.0.1:PORT` of the registry that every [`PUBLIC_REGISTRY_NAMES`] entry resolves to.
    pub public_registry: String,
    /// Further `127.0.0.1:PORT` registries reachable under their own name over plain http.
    pub private_registries: Vec<String>,
    /// The CRI `sandbox_image` (the pause image), e.g. `127.0.0.1:PORT/pause:1`.
    pub sandbox_image: String,
    /// `overlayfs` or `native`; `None` probes whether overlayfs works in the temp dir.
    pub snapshotter: Option<String>,
    /// containerd's log level.
    pub log_level: String,
}

impl ContainerdOpts {
    pub fn new(public_registry: &str, sandbox_image: &str) -> ContainerdOpts {
        ContainerdOpts {
            public_registry: public_registry.to_string(),
            private_registries: Vec::new(),
            sandbox_image: sandbox_image.to_string(),
            snapshotter: None,
            log_level: "info".into(),
        }
    }
}

/// containerd 1.6 with its own config, root, state, sockets and `opt` dir under `<tmp>/containerd`.
///
/// Dropping it kills the shims it started (found by their `-address`) and their containers, stops
/// containerd, and lazily unmounts whatever is left mounted below its dir.
pub struct Containerd {
    proc: Proc,
    opts: ContainerdOpts,
    pub dir: PathBuf,
    pub config: PathBuf,
    /// The grpc (CRI) socket.
    pub socket: PathBuf,
    pub log: PathBuf,
    pub snapshotter: String,
}

impl Containerd {
    /// Writes the config (and the hosts.toml tree) and starts containerd; waits until it has booted
    /// and its socket accepts connections.
    pub fn start(tmp: &Path, opts: &ContainerdOpts) -> Containerd {
        let dir = tmp.join("containerd");
        for sub in [
            "root",
            "state",
            "tmp",
            "opt",
            "runc",
            "runc-v1",
            "certs.d",
            "cni/bin",
            "cni/net.d",
        ] {
            std::fs::create_dir_all(dir.join(sub)).expect("create containerd dirs");
        }
        let certs = dir.join("certs.d");
        // `_default` catches every registry name not listed (containerd's fallback host directory),
        // so even an unforeseen name is pulled from loopback.
        for name in PUBLIC_REGISTRY_NAMES
            .iter()
            .copied()
            .chain([opts.public_registry.as_str(), "_default"])
        {
            write_hosts_toml(&certs, name, &opts.public_registry);
        }
        for host in &opts.private_registries {
            write_hosts_toml(&certs, host, host);
        }
        let snapshotter = opts.snapshotter.clone().unwrap_or_else(|| {
            if overlay_works(tmp) {
                "overlayfs".to_string()
            } else {
                "native".to_string()
            }
        });
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        std::fs::write(&config, config_toml(&dir, &socket, &snapshotter, opts))
            .expect("write config");
        let log = dir.join("containerd.log");
        let proc = spawn_containerd(&config, &socket, &log);
        Containerd {
            proc,
            opts: opts.clone(),
            dir,
            config,
            socket,
            log,
            snapshotter,
        }
    }

    /// Stops only the containerd process (SIGTERM, as an init system would), leaving its shims and
    /// containers running, like a real containerd restart or crash does. [`Containerd::start_again`]
    /// brings it back; `Drop` still cleans everything up.
    pub fn stop_daemon(&mut self) {
        self.proc.stop();
    }

    /// Starts containerd again with the same config, root, state and socket (after
    /// [`Containerd::stop_daemon`]); waits until the new process has booted.
    pub fn start_again(&mut self) {
        assert!(
            self.proc.exited().is_some() || !process::pid_alive(self.proc.pid),
            "containerd {} is still running; stop it first",
            self.proc.pid
        );
        self.proc = spawn_containerd(&self.config, &self.socket, &self.log);
    }

    /// The options containerd was configured with.
    pub fn opts(&self) -> &ContainerdOpts {
        &self.opts
    }

    /// The PID of the running containerd.
    pub fn pid(&self) -> u32 {
        self.proc.pid
    }

    /// `ctr --address SOCK -n k8s.io images import --snapshotter S [--digests] TAR`: imports an image
    /// archive straight into containerd's CRI namespace, past any CRI proxy. With `digests`, ctr also
    /// names the image by its manifest digest (`NAME@sha256:…`). Returns ctr's output.
    pub fn ctr_import(&self, tar: &Path, digests: bool) -> String {
        let snapshotter = self.snapshotter.clone();
        let tar = tar.to_string_lossy().into_owned();
        let mut args = vec!["images", "import", "--snapshotter", snapshotter.as_str()];
        if digests {
            args.push("--digests");
        }
        args.push(&tar);
        self.ctr(&args)
    }

    /// Runs `ctr --address SOCK -n k8s.io ARGS…` against this containerd; panics if it fails.
    pub fn ctr(&self, args: &[&str]) -> String {
        process::run(
            Command::new("ctr")
                .arg("--address")
                .arg(&self.socket)
                .args(["-n", "k8s.io"])
                .args(args)
                .env("PATH", sbin_path()),
        )
    }

    /// containerd's log so far.
    pub fn log_contents(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops everything this containerd started, then containerd itself, and unmounts below its dir.
    pub fn stop(&mut self) {
        process::kill_shims(&self.socket);
        self.proc.stop();
        // A shim may have been mid-start while containerd went down.
        process::kill_shims(&self.socket);
        process::unmount_below(&self.dir);
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Spawns containerd with `config` and waits until it logs a *new* "successfully booted" line (the
/// log is appended to across restarts) and its socket accepts connections.
fn spawn_containerd(config: &Path, socket: &Path, log: &Path) -> Proc {
    let offset = std::fs::metadata(log)
        .map(|m| m.len() as usize)
        .unwrap_or(0);
    let mut cmd = Command::new("containerd");
    cmd.arg("--config").arg(config).env("PATH", sbin_path());
    let mut proc = Proc::spawn("containerd", cmd, log, log);
    proc.grace = Duration::from_secs(10);
    let booted = poll(Duration::from_secs(30), || {
        if proc.exited().is_some() {
            return Some(false);
        }
        let text = std::fs::read(log).unwrap_or_default();
        let new = String::from_utf8_lossy(text.get(offset..).unwrap_or_default());
        (new.contains("containerd successfully booted") && UnixStream::connect(socket).is_ok())
            .then_some(true)
    });
    if booted != Some(true) {
        proc.stop();
        panic!("containerd did not start; its log:\n{}", tail(log, 40));
    }
    proc
}

fn write_hosts_toml(certs: &Path, name: &str, target: &str) {
    let dir = certs.join(name);
    std::fs::create_dir_all(&dir).expect("create hosts dir");
    std::fs::write(
        dir.join("hosts.toml"),
        format!(
            "# {name} -> loopback registry {target} (tests must never reach the internet)\n\
             server = \"http://{target}\"\n\n\
             [host.\"http://{target}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )
    .expect("write hosts.toml");
}

fn config_toml(dir: &Path, socket: &Path, snapshotter: &str, opts: &ContainerdOpts) -> String {
    let d = dir.display();
    format!(
        r#"# containerd 1.6 config written by pullgate's test harness: every path lives under {d}.
version = 2
root = "{d}/root"
state = "{d}/state"
temp = "{d}/tmp"
oom_score = 0
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  address = ""
  level = "{level}"

[metrics]
  address = ""

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{d}/opt"

  [plugins."io.containerd.runtime.v1.linux"]
    runtime_root = "{d}/runc-v1"

  [plugins."io.containerd.grpc.v1.cri"]
    # The VM lacks CAP_SYS_RESOURCE: never try to lower a container's oom_score_adj below ours.
    restrict_oom_score_adj = true
    sandbox_image = "{sandbox}"
    disable_tcp_service = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    enable_selinux = false
    # Pods run with host networking only; CNI stays unconfigured (NetworkReady=false is expected).
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "{d}/cni/bin"
      conf_dir = "{d}/cni/net.d"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "{snapshotter}"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          Root = "{d}/runc"
          SystemdCgroup = false
    [plugins."io.containerd.grpc.v1.cri".registry]
      # hosts.toml per registry name: every public name points at a loopback registry.
      config_path = "{d}/certs.d"
"#,
        socket = socket.display(),
        level = opts.log_level,
        sandbox = opts.sandbox_image,
    )
}

/// Whether an overlay mount works in `tmp` (it does not on every filesystem, e.g. overlay-on-overlay).
pub fn overlay_works(tmp: &Path) -> bool {
    let probe = tmp.join(".overlay-probe");
    for sub in ["lower", "upper", "work", "merged"] {
        if std::fs::create_dir_all(probe.join(sub)).is_err() {
            return false;
        }
    }
    let target = CString::new(probe.join("merged").as_os_str().as_encoded_bytes()).unwrap();
    let data = CString::new(format!(
        "lowerdir={},upperdir={},workdir={}",
        probe.join("lower").display(),
        probe.join("upper").display(),
        probe.join("work").display()
    ))
    .unwrap();
    let fstype = CString::new("overlay").unwrap();
    // SAFETY: valid NUL-terminated strings; the mount is removed right below.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    let ok = rc == 0;
    if ok {
        // SAFETY: as above.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
    let _ = std::fs::remove_dir_all(&probe);
    ok
}

/// PATH plus the sbin dirs: containerd looks runc (Debian: /usr/sbin/runc) up on its PATH.
pub fn sbin_path() -> String {
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into());
    let mut parts: Vec<&str> = path.split(':').filter(|p| !p.is_empty()).collect();
    for extra in ["/usr/local/sbin", "/usr/sbin", "/sbin"] {
        if !parts.contains(&extra) {
            parts.push(extra);
        }
    }
    parts.join(":")
}

/// A 127.0.0.1 port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// The HTTP status of `GET path` on 127.0.0.1:port, or `None` if nothing answers.
pub fn http_get_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n").ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    let head = String::from_utf8_lossy(&buf[..n]);
    head.split_whitespace().nth(1)?.parse().ok()
}

/// `GET path` on 127.0.0.1:port, read to the end: (status, body). Panics if nothing answers.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    pullgate::node::daemon::admin::http_get(([127, 0, 0, 1], port).into(), path)
        .unwrap_or_else(|e| panic!("GET {path} on 127.0.0.1:{port}: {e}"))
}

fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Where [`Stack`] puts the pause image.
#[derive(Clone, Copy, Debug)]
enum PauseImage {
    PrivateTag,
    PinnedMirror,
}

/// The whole real stack of one test: a "public" registry (what docker.io, registry.k8s.io, gcr.io,
/// quay.io and ghcr.io resolve to), a "private" registry (the approved mirror; also serves the pause
/// image), containerd configured for both, an image factory, and optionally pullgate in front.
///
/// Fields drop in declaration order: pullgate, containerd, registries, then the temp dir.
pub struct Stack {
    pub pullgate: Option<Pullgate>,
    pub containerd: Containerd,
    pub private: Registry,
    pub public: Registry,
    pub images: ImageFactory,
    /// The sandbox (pause) image containerd uses: `127.0.0.1:PRIVATE/pause:1`, or with
    /// [`Stack::start_node`] `127.0.0.1:PRIVATE/approved-k8s/pause@sha256:…`.
    pub pause_image: String,
    /// The pause image's manifest digest.
    pub pause_digest: String,
    pub dir: TestDir,
}

impl Stack {
    /// Starts both registries, pushes the pause image to the private one, and starts containerd.
    pub fn start(name: &str) -> Stack {
        Stack::start_with(name, PauseImage::PrivateTag)
    }

    /// Like [`Stack::start`], but the pause image is what a node under pullgate has: published in the
    /// "public" registry as `registry.k8s.io/pause:3.9`, copied by digest to the private registry's
    /// mirror path `approved-k8s/pause`, and containerd's `sandbox_image` is that copy pinned by digest
    /// (`127.0.0.1:PRIVATE/approved-k8s/pause@sha256:…`, see [`Stack::pause_digest`]).
    pub fn start_node(name: &str) -> Stack {
        Stack::start_with(name, PauseImage::PinnedMirror)
    }

    fn start_with(name: &str, pause: PauseImage) -> Stack {
        let started = std::time::Instant::now();
        let dir = TestDir::new(name);
        let public = Registry::start(dir.path(), "public");
        let private = Registry::start(dir.path(), "private");
        let images = ImageFactory::new(dir.path());
        let (pause_image, pause_digest) = match pause {
            PauseImage::PrivateTag => {
                let digest = images.push_pause(&private, "pause:1");
                (format!("{}/pause:1", private.host()), digest)
            }
            PauseImage::PinnedMirror => {
                let digest = images.push_pause(&public, "pause:3.9");
                super::images::copy_by_digest(
                    &public.host(),
                    "pause",
                    &digest,
                    &private.host(),
                    "approved-k8s/pause",
                );
                (
                    format!("{}/approved-k8s/pause@{digest}", private.host()),
                    digest,
                )
            }
        };
        let mut opts = ContainerdOpts::new(&public.host(), &pause_image);
        opts.private_registries.push(private.host());
        let containerd = Containerd::start(dir.path(), &opts);
        loud(&format!(
            "[{name}] stack up in {:?}: public {} private {} containerd {} ({})",
            started.elapsed(),
            public.host(),
            private.host(),
            containerd.socket.display(),
            containerd.snapshotter
        ));
        Stack {
            pullgate: None,
            containerd,
            private,
            public,
            images,
            pause_image,
            pause_digest,
            dir,
        }
    }

    /// Starts pullgate in front of this stack's containerd; `extra_config` is appended to the
    /// minimal config ([`super::pullgate::BASE_CONFIG`]: a `[log]` section at pullgate=debug).
    pub fn start_pullgate(&mut self, extra_config: &str) -> &Pullgate {
        let pg = Pullgate::start(self.dir.path(), &self.containerd.socket, extra_config);
        self.pullgate.insert(pg)
    }

    /// pullgate's listen socket (panics if pullgate was not started).
    pub fn pullgate_socket(&self) -> PathBuf {
        self.pullgate
            .as_ref()
            .expect("pullgate not started")
            .socket
            .clone()
    }

    /// The tails of every log, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        if let Some(pg) = &self.pullgate {
            s += &format!(
                "----- pullgate log ({}) -----\n{}\n",
                pg.log.display(),
                tail(&pg.log, 60)
            );
        }
        let ctd = std::fs::read_to_string(&self.containerd.log).unwrap_or_default();
        let ctd: Vec<&str> = ctd
            .lines()
            .filter(|l| !l.contains("loading plugin"))
            .collect();
        s += &format!(
            "----- containerd log ({}) -----\n{}\n",
            self.containerd.log.display(),
            ctd[ctd.len().saturating_sub(60)..].join("\n")
        );
        for r in [&self.public, &self.private] {
            s += &format!(
                "----- registry {} access log -----\n{}\n",
                r.name,
                tail(&r.access_log, 20)
            );
            s += &format!(
                "----- registry {} log -----\n{}\n",
                r.name,
                tail(&r.log, 10)
            );
        }
        s
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            loud(&format!(
                "\n===== real-stack logs of the failed test ({}) =====\n{}",
                self.dir.path().display(),
                self.logs()
            ));
        }
    }
}
