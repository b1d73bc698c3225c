//! The configuration file: a strict TOML schema (`deny_unknown_fields`) parsed in two stages.
//!
//! Stage one ([`RawConfig`]) is what serde reads from the file, with every field optional. Stage two
//! ([`Config::from_raw`]) validates it into typed values and fills in defaults. Every error names the
//! file, the key, what was found and what is expected, so `pullgate check-config` can be used as a
//! pre-start gate (`ExecStartPre=`) and its message read straight from the journal.

use std::fmt;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Where the daemon listens when neither the file nor `--listen` says otherwise.
pub const DEFAULT_LISTEN: &str = "/run/pullgate/pullgate.sock";
/// containerd's CRI socket, the default upstream.
pub const DEFAULT_UPSTREAM: &str = "/run/containerd/containerd.sock";
/// How long in-flight calls may run after SIGTERM before the daemon closes them.
pub const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(10);
/// Socket permissions: owner and group may connect, nobody else.
pub const DEFAULT_SOCKET_MODE: u32 = 0o660;
/// Largest bundle file read (`policy.max_bundle_size`): see [`crate::policy::DEFAULT_MAX_BUNDLE_SIZE`].
pub const DEFAULT_MAX_BUNDLE_SIZE: u64 = crate::policy::DEFAULT_MAX_BUNDLE_SIZE;

/// A configuration error: which file, which key, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration file {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error(
        "invalid configuration file {}: key `{key}` is {found:?}, expected {expected}",
        path.display()
    )]
    Invalid {
        path: PathBuf,
        key: &'static str,
        found: String,
        expected: &'static str,
    },
}

/// Stage one: the file as written. Unknown keys are rejected by serde.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub policy: RawPolicy,
    #[serde(default)]
    pub audit: RawAudit,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub lockdown: RawLockdown,
    /// Absent: no bundle sync.
    pub sync: Option<RawSync>,
    #[serde(default)]
    pub admin: RawAdmin,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSync {
    pub source: Option<String>,
    pub interval: Option<String>,
    pub auth_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub plain_http: Option<Vec<String>>,
    pub timeout: Option<String>,
    pub max_size: Option<String>,
    pub max_staleness: Option<String>,
    pub max_backoff: Option<String>,
    pub seed: Option<String>,
    pub seed_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub socket: Option<String>,
    pub allowed_uids: Option<Vec<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLockdown {
    pub watch: Option<bool>,
    pub remove_out_of_band: Option<bool>,
    pub containerd_config: Option<PathBuf>,
    pub kubelet_config: Option<PathBuf>,
    pub admin_sockets: Option<Vec<PathBuf>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub mode: Option<String>,
    pub trust: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub drop_dir: Option<PathBuf>,
    pub drop_poll: Option<String>,
    pub expiry_grace: Option<String>,
    pub sandbox_image: Option<String>,
    pub private_registry_auth: Option<PathBuf>,
    pub max_bundle_size: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    pub path: Option<PathBuf>,
    pub max_size: Option<String>,
    pub keep: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<PathBuf>,
    pub upstream: Option<PathBuf>,
    pub socket_mode: Option<String>,
    pub socket_group: Option<String>,
    pub drain_grace: Option<String>,
    pub worker_threads: Option<i64>,
    pub forward_non_cri: Option<bool>,
    #[serde(default)]
    pub limits: RawLimits,
}

/// `[server.limits]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_connections: Option<i64>,
    pub max_streams_per_connection: Option<i64>,
    pub idle_timeout: Option<String>,
    pub keepalive_interval: Option<String>,
    pub keepalive_timeout: Option<String>,
    pub body_budget: Option<String>,
    pub body_budget_wait: Option<String>,
    pub body_read_timeout: Option<String>,
    pub max_pull_image_message: Option<String>,
    pub max_create_container_message: Option<String>,
    pub max_small_message: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: Option<String>,
    pub level: Option<String>,
}

/// Stage two: validated, typed configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub server: ServerConfig,
    pub log: LogConfig,
    pub policy: PolicyConfig,
    pub audit: AuditConfig,
    pub metrics: MetricsConfig,
    pub lockdown: LockdownConfig,
    /// The bundle sync from a registry, if configured.
    pub sync: Option<SyncConfig>,
    pub admin: AdminConfig,
}

/// Where the node takes bundles from, and how often (docs/operations.md, *Bundles from the registry*).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncConfig {
    /// The channel: `REGISTRY/REPOSITORY:TAG` (or `@sha256:…` to pin one artifact).
    pub source: crate::policy::Reference,
    /// Time between rounds (each node's at a seed-derived point of the interval, ±1 %).
    pub interval: Duration,
    /// Docker-style `config.json` with credentials for the registry.
    pub auth_file: Option<PathBuf>,
    /// PEM file of CA certificates trusted in addition to the system's.
    pub ca_file: Option<PathBuf>,
    /// Registries (`host[:port]`) reached over plain HTTP.
    pub plain_http: Vec<String>,
    /// Timeout of each request.
    pub timeout: Duration,
    /// Largest artifact (bundle + signatures) the node downloads.
    pub max_size: u64,
    /// No successful round for this long: the node says loudly that its bundle is frozen.
    pub max_staleness: Duration,
    /// Longest wait between rounds after failures.
    pub max_backoff: Duration,
    /// The node's rollout seed: `seed` as configured, else read from `seed_file`.
    pub seed: SeedSource,
}

/// Where the node's rollout seed comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeedSource {
    /// Configured (`sync.seed`).
    Value(String),
    /// The first line of a file (`sync.seed_file`, default `/etc/machine-id`).
    File(PathBuf),
}

pub const DEFAULT_SEED_FILE: &str = "/etc/machine-id";

/// The local admin API (gRPC on a unix socket).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// The socket (mode 0600, owned by the daemon's user); `None`: no admin API.
    pub socket: Option<PathBuf>,
    /// Further uids allowed besides root and the daemon's own user.
    pub allowed_uids: Vec<u32>,
}

/// The node's lockdown: the containerd event watcher and the node check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockdownConfig {
    /// Watch containerd's events for images and snapshots that arrive past pullgate.
    pub watch: bool,
    /// Remove out-of-band images from CRI's namespace unless a container uses them.
    pub remove_out_of_band: bool,
    /// containerd's configuration file, read by the node check.
    pub containerd_config: PathBuf,
    /// kubelet's `KubeletConfiguration` file, when the running kubelet's flags do not name one.
    pub kubelet_config: PathBuf,
    /// Further sockets that must be root-only (an admin socket, containerd's debug socket).
    pub admin_sockets: Vec<PathBuf>,
}

pub const DEFAULT_CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";
pub const DEFAULT_KUBELET_CONFIG: &str = "/var/lib/kubelet/config.yaml";

/// How the node enforces decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum NodeMode {
    /// Denials are enforced (scopes the bundle puts in `warn` mode still only warn).
    Enforce = 0,
    /// Every denial is only reported; nothing is blocked, not even without a bundle. For rollout.
    Warn = 1,
}

/// What to do when containerd's sandbox (pause) image is not an approved private-registry image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxImageCheck {
    /// Log and export it as a metric.
    Warn,
    /// Refuse to start (exit with a configuration error).
    Refuse,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyConfig {
    pub mode: NodeMode,
    /// Trust file: public keys and the signature threshold.
    pub trust: PathBuf,
    /// Where installed bundles (and the last-known-good one) live.
    pub state_dir: PathBuf,
    /// Directory fleet tooling drops new bundles into, if any.
    pub drop_dir: Option<PathBuf>,
    pub drop_poll: Duration,
    /// How long an expired bundle keeps being enforced before pulls fail closed.
    pub expiry_grace: Duration,
    pub sandbox_image: SandboxImageCheck,
    /// Root-only TOML file with credentials for the private registry (`username`/`password` or
    /// `identity_token`), sent instead of the client's when a pull is redirected there.
    pub private_registry_auth: Option<PathBuf>,
    /// Largest bundle file pullgate reads (drop directory, `bundle install`, the installed bundle);
    /// a larger one is refused before anything in it is looked at.
    pub max_bundle_size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    pub path: PathBuf,
    pub max_bytes: u64,
    pub keep: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Address for `/metrics`, `/healthz`, `/readyz`, `/status`; `None` turns the endpoint off.
    pub listen: Option<std::net::SocketAddr>,
}

pub const DEFAULT_TRUST: &str = "/etc/pullgate/trust/trust.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/pullgate";
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9477";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Unix socket kubelet connects to.
    pub listen: PathBuf,
    /// containerd's CRI socket.
    pub upstream: PathBuf,
    /// Permission bits applied to the listening socket.
    pub socket_mode: u32,
    /// Group that owns the listening socket (name as configured, resolved to a gid at start).
    pub socket_group: Option<SocketGroup>,
    /// How long in-flight calls may finish after a stop signal.
    pub drain_grace: Duration,
    /// Forward paths outside the CRI API (containerd's native API) too. Off by default: that API can
    /// import and run images past every check.
    pub forward_non_cri: bool,
    /// Runtime worker threads; 1 (the default) runs the proxy on a single-threaded runtime, which
    /// avoids cross-thread wake-ups (figures for 1 and 2 workers in the README's Performance section).
    pub worker_threads: usize,
    /// Bounds on connections, streams and buffered request bodies (`[server.limits]`).
    pub limits: Limits,
}

/// What one client may cost the daemon: connections, streams, buffered bytes and time
/// (`[server.limits]`; the arithmetic behind the defaults is in docs/operations.md and the unit file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Client connections served at once. When it is reached, the connection idle for the longest
    /// is closed to make room; only when none is idle is a newcomer refused.
    pub max_connections: usize,
    /// HTTP/2 streams (concurrent calls) one connection may have open; gRPC clients queue calls
    /// beyond it rather than fail them.
    pub max_streams_per_connection: u32,
    /// A connection with no open call for this long is closed (GOAWAY; clients reconnect).
    pub idle_timeout: Duration,
    /// HTTP/2 PING interval that detects dead or hung peers; `None`: no pings.
    pub keepalive_interval: Option<Duration>,
    /// How long a PING may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
    /// Bytes of intercepted request bodies buffered at once, over all connections.
    pub body_budget: u64,
    /// How long a call waits for room in the body budget before RESOURCE_EXHAUSTED.
    pub body_budget_wait: Duration,
    /// How long an intercepted request body may take to arrive in full.
    pub body_read_timeout: Duration,
    /// Largest `PullImage` request message.
    pub max_pull_image_message: usize,
    /// Largest `CreateContainer` (and `RunPodSandbox`) request message.
    pub max_create_container_message: usize,
    /// Largest request message of the intercepted methods whose messages are always small
    /// (`ImageStatus`, `RemoveImage`, `ListImages`, `RemovePodSandbox`).
    pub max_small_message: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 128,
            max_streams_per_connection: 256,
            idle_timeout: Duration::from_secs(300),
            keepalive_interval: Some(Duration::from_secs(60)),
            keepalive_timeout: Duration::from_secs(20),
            body_budget: 64 * MIB,
            body_budget_wait: Duration::from_secs(1),
            body_read_timeout: Duration::from_secs(10),
            max_pull_image_message: 4 * MIB as usize,
            max_create_container_message: 4 * MIB as usize,
            max_small_message: MIB as usize,
        }
    }
}

const MIB: u64 = 1024 * 1024;

/// The group of the listening socket: a name to look up, or a numeric gid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketGroup {
    Name(String),
    Gid(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter directive such as `info` or `pullgate=debug,info`.
    pub level: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig {
                listen: PathBuf::from(DEFAULT_LISTEN),
                upstream: PathBuf::from(DEFAULT_UPSTREAM),
                socket_mode: DEFAULT_SOCKET_MODE,
                socket_group: None,
                drain_grace: DEFAULT_DRAIN_GRACE,
                forward_non_cri: false,
                worker_threads: 1,
                limits: Limits::default(),
            },
            log: LogConfig {
                format: LogFormat::Text,
                level: "info".to_string(),
            },
            policy: PolicyConfig {
                mode: NodeMode::Enforce,
                trust: PathBuf::from(DEFAULT_TRUST),
                state_dir: PathBuf::from(DEFAULT_STATE_DIR),
                drop_dir: None,
                drop_poll: Duration::from_secs(5),
                expiry_grace: Duration::from_secs(72 * 3600),
                sandbox_image: SandboxImageCheck::Warn,
                private_registry_auth: None,
                max_bundle_size: DEFAULT_MAX_BUNDLE_SIZE,
            },
            audit: AuditConfig {
                path: PathBuf::from(DEFAULT_STATE_DIR).join("audit.log"),
                max_bytes: 64 * 1024 * 1024,
                keep: 5,
            },
            metrics: MetricsConfig {
                listen: Some(
                    DEFAULT_METRICS_LISTEN
                        .parse()
                        .expect("valid default address"),
                ),
            },
            lockdown: LockdownConfig {
                watch: true,
                remove_out_of_band: false,
                containerd_config: PathBuf::from(DEFAULT_CONTAINERD_CONFIG),
                kubelet_config: PathBuf::from(DEFAULT_KUBELET_CONFIG),
                admin_sockets: Vec::new(),
            },
            sync: None,
            admin: AdminConfig {
                socket: Some(default_admin_socket(Path::new(DEFAULT_LISTEN))),
                allowed_uids: Vec::new(),
            },
        }
    }
}

/// The admin socket next to the CRI socket: `/run/pullgate/admin.sock` by default.
pub fn default_admin_socket(listen: &Path) -> PathBuf {
    listen
        .parent()
        .unwrap_or(Path::new("/run/pullgate"))
        .join("admin.sock")
}

impl Config {
    /// Reads, parses and validates the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(path, &text)
    }

    /// Parses and validates configuration text; `path` is only used in error messages.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: describe_toml_error(&e, text),
        })?;
        Config::from_raw(path, raw)
    }

    /// Validates stage-one values into a [`Config`].
    pub fn from_raw(path: &Path, raw: RawConfig) -> Result<Config, ConfigError> {
        let invalid = |key: &'static str, found: &dyn fmt::Display, expected: &'static str| {
            ConfigError::Invalid {
                path: path.to_path_buf(),
                key,
                found: found.to_string(),
                expected,
            }
        };
        let defaults = Config::default();
        let server = raw.server;

        let socket_path = |key: &'static str, value: Option<PathBuf>, default: PathBuf| match value
        {
            None => Ok(default),
            Some(p) if p.is_absolute() && p.file_name().is_some() => Ok(p),
            Some(p) => Err(invalid(
                key,
                &p.display(),
                "an absolute path to a unix socket, such as /run/pullgate/pullgate.sock",
            )),
        };
        let listen = socket_path("server.listen", server.listen, defaults.server.listen)?;
        let upstream = socket_path("server.upstream", server.upstream, defaults.server.upstream)?;

        let socket_mode = match server.socket_mode {
            None => DEFAULT_SOCKET_MODE,
            Some(s) => parse_mode(&s).ok_or_else(|| {
                invalid(
                    "server.socket_mode",
                    &s,
                    "an octal permission string between \"0600\" and \"0777\", such as \"0660\"",
                )
            })?,
        };

        let socket_group = match server.socket_group {
            None => None,
            Some(g) if g.is_empty() => {
                return Err(invalid(
                    "server.socket_group",
                    &g,
                    "a group name or numeric gid",
                ));
            }
            Some(g) => Some(match g.parse::<u32>() {
                Ok(gid) => SocketGroup::Gid(gid),
                Err(_) if valid_group_name(&g) => SocketGroup::Name(g),
                Err(_) => {
                    return Err(invalid(
                        "server.socket_group",
                        &g,
                        "a group name (letters, digits, '_', '-', '.') or numeric gid",
                    ));
                }
            }),
        };

        let drain_grace = bounded(
            &invalid,
            "server.drain_grace",
            server.drain_grace,
            parse_duration,
            DEFAULT_DRAIN_GRACE,
            Duration::ZERO..=Duration::from_secs(3600),
            "a duration of at most 1h, such as \"10s\" or \"1m 30s\"",
        )?;

        let worker_threads = match server.worker_threads {
            None => defaults.server.worker_threads,
            Some(n @ 1..=64) => n as usize,
            Some(n) => {
                return Err(invalid(
                    "server.worker_threads",
                    &n,
                    "a whole number from 1 to 64",
                ));
            }
        };

        let limits = Limits::from_raw(server.limits, &invalid)?;

        let format = match raw.log.format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => return Err(invalid("log.format", &other, "\"text\" or \"json\"")),
        };
        let level = match raw.log.level {
            None => defaults.log.level,
            Some(l) => {
                if tracing_subscriber::EnvFilter::try_new(&l).is_err() || l.trim().is_empty() {
                    return Err(invalid(
                        "log.level",
                        &l,
                        "a level (error, warn, info, debug, trace) or a filter such as \"pullgate=debug,info\"",
                    ));
                }
                l
            }
        };

        let p = raw.policy;
        let abs_path = |key: &'static str, v: Option<PathBuf>, default: PathBuf| match v {
            None => Ok(default),
            Some(v) if v.is_absolute() => Ok(v),
            Some(v) => Err(invalid(key, &v.display(), "an absolute path")),
        };
        // Non-zero and at most `max`.
        let duration = |key, v, default, max, expected| {
            let range = Duration::from_nanos(1)..=max;
            bounded(&invalid, key, v, parse_duration, default, range, expected)
        };
        let policy = PolicyConfig {
            mode: match p.mode.as_deref() {
                None | Some("enforce") => NodeMode::Enforce,
                Some("warn") => NodeMode::Warn,
                Some(other) => {
                    return Err(invalid("policy.mode", &other, "\"enforce\" or \"warn\""));
                }
            },
            trust: abs_path("policy.trust", p.trust, defaults.policy.trust)?,
            state_dir: abs_path("policy.state_dir", p.state_dir, defaults.policy.state_dir)?,
            drop_dir: match p.drop_dir {
                None => None,
                Some(d) => Some(abs_path("policy.drop_dir", Some(d), PathBuf::new())?),
            },
            drop_poll: duration(
                "policy.drop_poll",
                p.drop_poll,
                defaults.policy.drop_poll,
                Duration::from_secs(3600),
                "a non-zero duration of at most 1h, such as \"5s\"",
            )?,
            expiry_grace: duration(
                "policy.expiry_grace",
                p.expiry_grace,
                defaults.policy.expiry_grace,
                Duration::from_secs(30 * 86400),
                "a non-zero duration of at most 30 days, such as \"72h\" (past it, pulls and starts fail closed)",
            )?,
            sandbox_image: match p.sandbox_image.as_deref() {
                None | Some("warn") => SandboxImageCheck::Warn,
                Some("refuse") => SandboxImageCheck::Refuse,
                Some(other) => {
                    return Err(invalid(
                        "policy.sandbox_image",
                        &other,
                        "\"warn\" or \"refuse\"",
                    ));
                }
            },
            private_registry_auth: match p.private_registry_auth {
                None => None,
                Some(a) => Some(abs_path(
                    "policy.private_registry_auth",
                    Some(a),
                    PathBuf::new(),
                )?),
            },
            max_bundle_size: bounded(
                &invalid,
                "policy.max_bundle_size",
                p.max_bundle_size,
                parse_size,
                defaults.policy.max_bundle_size,
                MIB..=1024 * MIB,
                "a size from 1MiB to 1GiB such as \"64MiB\" (a 100,000-image bundle is about 40MiB)",
            )?,
        };
        let a = raw.audit;
        let audit = AuditConfig {
            path: abs_path("audit.path", a.path, policy.state_dir.join("audit.log"))?,
            max_bytes: bounded(
                &invalid,
                "audit.max_size",
                a.max_size,
                parse_size,
                defaults.audit.max_bytes,
                4096..=u64::MAX,
                "a size of at least 4KiB such as \"64MiB\" or \"500KiB\"",
            )?,
            keep: match a.keep {
                None => defaults.audit.keep,
                Some(n @ 1..=100) => n as u32,
                Some(n) => return Err(invalid("audit.keep", &n, "a whole number from 1 to 100")),
            },
        };
        let metrics = MetricsConfig {
            listen: match raw.metrics.listen.as_deref() {
                None => defaults.metrics.listen,
                Some("" | "off") => None,
                Some(s) => Some(s.parse().map_err(|_| {
                    invalid(
                        "metrics.listen",
                        &s,
                        "an IP address and port such as \"127.0.0.1:9477\", or \"off\"",
                    )
                })?),
            },
        };

        let l = raw.lockdown;
        let lockdown = LockdownConfig {
            watch: l.watch.unwrap_or(defaults.lockdown.watch),
            remove_out_of_band: l
                .remove_out_of_band
                .unwrap_or(defaults.lockdown.remove_out_of_band),
            containerd_config: abs_path(
                "lockdown.containerd_config",
                l.containerd_config,
                defaults.lockdown.containerd_config,
            )?,
            kubelet_config: abs_path(
                "lockdown.kubelet_config",
                l.kubelet_config,
                defaults.lockdown.kubelet_config,
            )?,
            admin_sockets: l
                .admin_sockets
                .unwrap_or_default()
                .into_iter()
                .map(|p| abs_path("lockdown.admin_sockets", Some(p), PathBuf::new()))
                .collect::<Result<_, _>>()?,
        };

        let sync = match raw.sync {
            None => None,
            Some(raw) => Some(sync_section(path, raw)?),
        };
        let admin = AdminConfig {
            socket: match raw.admin.socket.as_deref() {
                None => Some(default_admin_socket(&listen)),
                Some("off") => None,
                Some(p) if Path::new(p).is_absolute() && Path::new(p).file_name().is_some() => {
                    Some(PathBuf::from(p))
                }
                Some(p) => {
                    return Err(invalid(
                        "admin.socket",
                        &p,
                        "an absolute path to a unix socket, such as /run/pullgate/admin.sock, or \"off\"",
                    ));
                }
            },
            allowed_uids: raw
                .admin
                .allowed_uids
                .unwrap_or_default()
                .into_iter()
                .map(|u| {
                    u32::try_from(u).map_err(|_| {
                        invalid(
                            "admin.allowed_uids",
                            &u,
                            "a list of numeric user ids (0 to 4294967295)",
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
        };

        Ok(Config {
            policy,
            audit,
            metrics,
            lockdown,
            sync,
            admin,
            server: ServerConfig {
                listen,
                upstream,
                socket_mode,
                socket_group,
                drain_grace,
                forward_non_cri: server.forward_non_cri.unwrap_or(false),
                worker_threads,
                limits,
            },
            log: LogConfig { format, level },
        })
    }
}

/// Validates the `[sync]` section.
fn sync_section(path: &Path, raw: RawSync) -> Result<SyncConfig, ConfigError> {
    let invalid = |key: &'static str, found: &dyn fmt::Display, expected: &'static str| {
        ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            found: found.to_string(),
            expected,
        }
    };
    let source = match raw.source {
        None => {
            return Err(invalid(
                "sync.source",
                &"nothing",
                "the channel to take bundles from, such as \"registry.corp/pullgate/bundles:prod\" (or remove the [sync] section)",
            ));
        }
        Some(s) => crate::policy::artifact::parse_channel(&s).ok_or_else(|| {
            invalid(
                "sync.source",
                &s,
                "REGISTRY/REPOSITORY:CHANNEL with the registry written out, such as \"registry.corp/pullgate/bundles:prod\"",
            )
        })?,
    };
    let duration = |key, v, default, range, expected| {
        bounded(&invalid, key, v, parse_duration, default, range, expected)
    };
    let secs = Duration::from_secs;
    let interval = duration(
        "sync.interval",
        raw.interval,
        secs(60),
        secs(1)..=secs(86400),
        "a duration from 1s to 24h, such as \"60s\"",
    )?;
    let max_staleness = duration(
        "sync.max_staleness",
        raw.max_staleness,
        secs(3600).max(interval * 3),
        interval * 2..=secs(30 * 86400),
        "a duration of at least twice sync.interval and at most 30 days, such as \"1h\"",
    )?;
    let max_backoff = duration(
        "sync.max_backoff",
        raw.max_backoff,
        secs(900).max(interval),
        interval..=secs(86400),
        "a duration of at least sync.interval and at most 24h, such as \"15m\"",
    )?;
    let timeout = duration(
        "sync.timeout",
        raw.timeout,
        secs(30),
        secs(1)..=secs(600),
        "a duration from 1s to 10m, such as \"30s\"",
    )?;
    let max_size = bounded(
        &invalid,
        "sync.max_size",
        raw.max_size,
        parse_size,
        DEFAULT_MAX_BUNDLE_SIZE,
        4096..=u64::MAX,
        "a size of at least 4KiB such as \"64MiB\"",
    )?;
    let abs = |key: &'static str, p: Option<PathBuf>| match p {
        None => Ok(None),
        Some(p) if p.is_absolute() => Ok(Some(p)),
        Some(p) => Err(invalid(key, &p.display(), "an absolute path")),
    };
    let plain_http = raw.plain_http.unwrap_or_default();
    if let Some(h) = plain_http
        .iter()
        .find(|h| h.is_empty() || h.contains(['/', ' ']))
    {
        return Err(invalid(
            "sync.plain_http",
            h,
            "a list of registry hosts such as [\"registry.corp:5000\"] (no scheme, no path)",
        ));
    }
    let seed = match (raw.seed, abs("sync.seed_file", raw.seed_file)?) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "sync.seed",
                &"both seed and seed_file",
                "one of them: seed (a value) or seed_file (a file holding it)",
            ));
        }
        (Some(s), None) if s.trim().is_empty() => {
            return Err(invalid("sync.seed", &s, "a non-empty string"));
        }
        (Some(s), None) => SeedSource::Value(s),
        (None, f) => SeedSource::File(f.unwrap_or_else(|| PathBuf::from(DEFAULT_SEED_FILE))),
    };
    Ok(SyncConfig {
        source,
        interval,
        auth_file: abs("sync.auth_file", raw.auth_file)?,
        ca_file: abs("sync.ca_file", raw.ca_file)?,
        plain_http,
        timeout,
        max_size,
        max_staleness,
        max_backoff,
        seed,
    })
}

impl Limits {
    /// Validates `[server.limits]`; `invalid` builds the error naming the file and key.
    fn from_raw(raw: RawLimits, invalid: &Invalid) -> Result<Limits, ConfigError> {
        let d = Limits::default();
        let count = |key: &'static str,
                     v: Option<i64>,
                     default: u64,
                     range: RangeInclusive<u64>,
                     expected: &'static str| match v {
            None => Ok(default),
            Some(n) => u64::try_from(n)
                .ok()
                .filter(|n| range.contains(n))
                .ok_or_else(|| invalid(key, &n, expected)),
        };
        let duration = |key, v, default, range, expected| {
            bounded(invalid, key, v, parse_duration, default, range, expected)
        };
        let size = |key, v, default, range, expected| {
            bounded(invalid, key, v, parse_size, default, range, expected)
        };
        let secs = Duration::from_secs;
        let limits = Limits {
            max_connections: count(
                "server.limits.max_connections",
                raw.max_connections,
                d.max_connections as u64,
                1..=65536,
                "a whole number from 1 to 65536 (each connection holds a file descriptor: keep LimitNOFILE above it)",
            )? as usize,
            max_streams_per_connection: count(
                "server.limits.max_streams_per_connection",
                raw.max_streams_per_connection,
                u64::from(d.max_streams_per_connection),
                16..=4096,
                "a whole number from 16 to 4096 (kubelet makes tens of calls at once on one connection)",
            )? as u32,
            idle_timeout: duration(
                "server.limits.idle_timeout",
                raw.idle_timeout,
                d.idle_timeout,
                secs(1)..=secs(24 * 3600),
                "a duration from 1s to 24h, such as \"5m\"",
            )?,
            keepalive_interval: match raw.keepalive_interval.as_deref().map(str::trim) {
                Some("off") => None,
                _ => Some(duration(
                    "server.limits.keepalive_interval",
                    raw.keepalive_interval,
                    d.keepalive_interval.unwrap_or(secs(60)),
                    secs(1)..=secs(3600),
                    "a duration from 1s to 1h such as \"60s\", or \"off\"",
                )?),
            },
            keepalive_timeout: duration(
                "server.limits.keepalive_timeout",
                raw.keepalive_timeout,
                d.keepalive_timeout,
                secs(1)..=secs(600),
                "a duration from 1s to 10m, such as \"20s\"",
            )?,
            body_budget: size(
                "server.limits.body_budget",
                raw.body_budget,
                d.body_budget,
                16 * MIB..=1024 * MIB,
                "a size from 16MiB (one message at kubelet's 16 MiB limit, the largest any cap allows) to 1GiB, such as \"64MiB\"",
            )?,
            body_budget_wait: duration(
                "server.limits.body_budget_wait",
                raw.body_budget_wait,
                d.body_budget_wait,
                Duration::ZERO..=secs(60),
                "a duration of at most 1m, such as \"1s\" (\"0s\": refuse at once)",
            )?,
            body_read_timeout: duration(
                "server.limits.body_read_timeout",
                raw.body_read_timeout,
                d.body_read_timeout,
                Duration::from_millis(100)..=secs(600),
                "a duration from 100ms to 10m, such as \"10s\"",
            )?,
            max_pull_image_message: size(
                "server.limits.max_pull_image_message",
                raw.max_pull_image_message,
                d.max_pull_image_message as u64,
                64 * 1024..=16 * MIB,
                "a size from 64KiB to 16MiB, such as \"4MiB\"",
            )? as usize,
            max_create_container_message: size(
                "server.limits.max_create_container_message",
                raw.max_create_container_message,
                d.max_create_container_message as u64,
                64 * 1024..=16 * MIB,
                "a size from 64KiB to 16MiB, such as \"4MiB\"",
            )? as usize,
            max_small_message: size(
                "server.limits.max_small_message",
                raw.max_small_message,
                d.max_small_message as u64,
                64 * 1024..=16 * MIB,
                "a size from 64KiB to 16MiB, such as \"1MiB\"",
            )? as usize,
        };
        Ok(limits)
    }
}

/// Builds the error naming the file, the key, what was found and what is expected.
type Invalid<'a> = dyn Fn(&'static str, &dyn fmt::Display, &'static str) -> ConfigError + 'a;

/// An optional key read by `parse` and kept within `range`; absent, `default`.
fn bounded<T: PartialOrd>(
    invalid: &Invalid,
    key: &'static str,
    value: Option<String>,
    parse: fn(&str) -> Option<T>,
    default: T,
    range: RangeInclusive<T>,
    expected: &'static str,
) -> Result<T, ConfigError> {
    match value {
        None => Ok(default),
        Some(s) => parse(&s)
            .filter(|v| range.contains(v))
            .ok_or_else(|| invalid(key, &s, expected)),
    }
}

/// Parses a duration such as "1m 30s" (surrounding blanks allowed).
fn parse_duration(s: &str) -> Option<Duration> {
    humantime::parse_duration(s).ok()
}

/// Parses a byte size: a whole number with an optional unit (B, KiB, MiB, GiB; KB/MB/GB too).
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        "g" | "gb" | "gib" => 1024 * 1024 * 1024,
        _ => return None,
    };
    n.checked_mul(mult)
}

fn parse_mode(s: &str) -> Option<u32> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b))
    {
        return None;
    }
    let mode = u32::from_str_radix(digits, 8).ok()?;
    // The owner must be able to use its own socket; nothing beyond plain permission bits.
    (mode & 0o600 == 0o600 && mode <= 0o777).then_some(mode)
}

fn valid_group_name(g: &str) -> bool {
    g.len() <= 32
        && g.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Turns a TOML error into one line that names the key (`table.key`, worked out from the text when
/// the message itself does not say), the line and column, and what was expected.
fn describe_toml_error(e: &toml::de::Error, text: &str) -> String {
    let msg = e.message().trim().to_string();
    let Some(span) = e.span() else {
        return msg;
    };
    let before = &text[..span.start.min(text.len())];
    let line_no = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let table = before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && l.ends_with(']'))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim());
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim())
        .filter(|k| !k.is_empty() && !k.starts_with('['));
    match (table, key) {
        (Some(t), Some(k)) => format!("line {line_no}, column {col}, key `{t}.{k}`: {msg}"),
        (None, Some(k)) => format!("line {line_no}, column {col}, key `{k}`: {msg}"),
        _ => format!("line {line_no}, column {col}: {msg}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/pullgate/config.toml"), text)
    }

    fn err(text: &str) -> String {
        parse(text)
            .expect_err("config must be rejected")
            .to_string()
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
        let c = Config::default();
        assert_eq!(c.server.listen, Path::new(DEFAULT_LISTEN));
        assert_eq!(c.server.upstream, Path::new(DEFAULT_UPSTREAM));
        assert_eq!(c.server.socket_mode, 0o660);
    }

    #[test]
    fn full_file_is_typed() {
        let c = parse(
            r#"
            [server]
            listen = "/tmp/x/pg.sock"
            upstream = "/tmp/x/ctr.sock"
            socket_mode = "0600"
            socket_group = "kube"
            drain_grace = "1m 5s"
            worker_threads = 1
            forward_non_cri = true
            [log]
            format = "json"
            level = "pullgate=debug,info"
            "#,
        )
        .unwrap();
        assert_eq!(c.server.listen, Path::new("/tmp/x/pg.sock"));
        assert_eq!(c.server.upstream, Path::new("/tmp/x/ctr.sock"));
        assert_eq!(c.server.socket_mode, 0o600);
        assert_eq!(
            c.server.socket_group,
            Some(SocketGroup::Name("kube".into()))
        );
        assert_eq!(c.server.drain_grace, Duration::from_secs(65));
        assert_eq!(c.server.worker_threads, 1);
        assert!(c.server.forward_non_cri);
        assert!(!Config::default().server.forward_non_cri);
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.log.level, "pullgate=debug,info");
        let c = parse("[server]\nsocket_group = \"998\"").unwrap();
        assert_eq!(c.server.socket_group, Some(SocketGroup::Gid(998)));
    }

    #[test]
    fn unknown_keys_are_rejected_with_file_and_key() {
        let e = err("[server]\nlisten = \"/a/b.sock\"\nlisten_addr = 3\n");
        assert!(e.contains("/etc/pullgate/config.toml"), "{e}");
        assert!(e.contains("listen_addr"), "{e}");
        assert!(e.contains("line 3"), "{e}");
        let e = err("[serve]\n");
        assert!(e.contains("serve"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key_and_expectation() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "[server]\nlisten = \"relative.sock\"",
                "server.listen",
                "absolute path",
            ),
            (
                "[server]\nupstream = \"/\"",
                "server.upstream",
                "absolute path",
            ),
            (
                "[server]\nsocket_mode = \"0669\"",
                "server.socket_mode",
                "octal",
            ),
            (
                "[server]\nsocket_mode = \"0066\"",
                "server.socket_mode",
                "octal",
            ),
            (
                "[server]\nsocket_mode = \"rw\"",
                "server.socket_mode",
                "octal",
            ),
            (
                "[server]\nsocket_group = \"\"",
                "server.socket_group",
                "group name",
            ),
            (
                "[server]\nsocket_group = \"a b\"",
                "server.socket_group",
                "group name",
            ),
            (
                "[server]\ndrain_grace = \"soon\"",
                "server.drain_grace",
                "duration",
            ),
            (
                "[server]\ndrain_grace = \"2h\"",
                "server.drain_grace",
                "at most 1h",
            ),
            (
                "[server]\nworker_threads = 0",
                "server.worker_threads",
                "1 to 64",
            ),
            ("[log]\nformat = \"yaml\"", "log.format", "\"json\""),
            ("[log]\nlevel = \"pullgate=loudest\"", "log.level", "filter"),
        ];
        for (text, key, expected) in cases {
            let e = err(text);
            assert!(e.contains(key), "{text}: {e}");
            assert!(e.contains(expected), "{text}: {e}");
            assert!(e.contains("/etc/pullgate/config.toml"), "{text}: {e}");
        }
    }

    #[test]
    fn policy_audit_and_metrics_sections() {
        let c = parse(
            r#"
            [policy]
            mode = "warn"
            trust = "/etc/pg/trust.toml"
            state_dir = "/var/lib/pg"
            drop_dir = "/var/lib/pg/incoming"
            drop_poll = "2s"
            expiry_grace = "1h"
            sandbox_image = "refuse"
            private_registry_auth = "/etc/pg/auth.toml"
            [audit]
            max_size = "1MiB"
            keep = 3
            [metrics]
            listen = "127.0.0.1:9999"
            "#,
        )
        .unwrap();
        assert_eq!(c.policy.mode, NodeMode::Warn);
        assert_eq!(c.policy.state_dir, Path::new("/var/lib/pg"));
        assert_eq!(
            c.policy.drop_dir.as_deref(),
            Some(Path::new("/var/lib/pg/incoming"))
        );
        assert_eq!(c.policy.drop_poll, Duration::from_secs(2));
        assert_eq!(c.policy.sandbox_image, SandboxImageCheck::Refuse);
        assert_eq!(
            c.audit.path,
            Path::new("/var/lib/pg/audit.log"),
            "audit log follows state_dir"
        );
        assert_eq!(c.audit.max_bytes, 1 << 20);
        assert_eq!(c.audit.keep, 3);
        assert_eq!(c.metrics.listen, Some("127.0.0.1:9999".parse().unwrap()));
        assert_eq!(
            parse("[metrics]\nlisten = \"off\"").unwrap().metrics.listen,
            None
        );
        assert_eq!(
            Config::default().policy.mode,
            NodeMode::Enforce,
            "fail closed by default"
        );
        for (text, key) in [
            ("[policy]\nmode = \"audit\"", "policy.mode"),
            ("[policy]\ntrust = \"trust.toml\"", "policy.trust"),
            ("[policy]\ndrop_poll = \"0s\"", "policy.drop_poll"),
            ("[policy]\ndrop_poll = \"2h\"", "policy.drop_poll"),
            ("[policy]\nexpiry_grace = \"100y\"", "policy.expiry_grace"),
            (
                "[policy]\nsandbox_image = \"ignore\"",
                "policy.sandbox_image",
            ),
            ("[audit]\nmax_size = \"12 parsecs\"", "audit.max_size"),
            ("[audit]\nkeep = 0", "audit.keep"),
            ("[metrics]\nlisten = \"localhost\"", "metrics.listen"),
        ] {
            let e = err(text);
            assert!(e.contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn limits_are_typed_and_bounded() {
        let c = parse(
            r#"
            [server.limits]
            max_connections = 5000
            max_streams_per_connection = 64
            idle_timeout = "30s"
            keepalive_interval = "off"
            keepalive_timeout = "5s"
            body_budget = "128MiB"
            body_budget_wait = "0s"
            body_read_timeout = "500ms"
            max_pull_image_message = "2MiB"
            max_create_container_message = "8MiB"
            max_small_message = "256KiB"
            [policy]
            max_bundle_size = "100MiB"
            "#,
        )
        .unwrap();
        let l = &c.server.limits;
        assert_eq!(l.max_connections, 5000);
        assert_eq!(l.max_streams_per_connection, 64);
        assert_eq!(l.idle_timeout, Duration::from_secs(30));
        assert_eq!(l.keepalive_interval, None);
        assert_eq!(l.keepalive_timeout, Duration::from_secs(5));
        assert_eq!(l.body_budget, 128 << 20);
        assert_eq!(l.body_budget_wait, Duration::ZERO);
        assert_eq!(l.body_read_timeout, Duration::from_millis(500));
        assert_eq!(l.max_pull_image_message, 2 << 20);
        assert_eq!(l.max_create_container_message, 8 << 20);
        assert_eq!(l.max_small_message, 256 << 10);
        assert_eq!(c.policy.max_bundle_size, 100 << 20);
        let d = Config::default();
        assert_eq!(d.server.limits, Limits::default());
        assert_eq!(
            d.server.limits.keepalive_interval,
            Some(Duration::from_secs(60))
        );
        assert_eq!(d.policy.max_bundle_size, 128 << 20);
        assert_eq!(
            parse("[server.limits]\nkeepalive_interval = \"15s\"")
                .unwrap()
                .server
                .limits
                .keepalive_interval,
            Some(Duration::from_secs(15))
        );
        for (text, key, expected) in [
            ("max_connections = 0", "max_connections", "1 to 65536"),
            ("max_connections = 70000", "max_connections", "1 to 65536"),
            ("max_connections = -1", "max_connections", "1 to 65536"),
            (
                "max_streams_per_connection = 8",
                "max_streams_per_connection",
                "16 to 4096",
            ),
            ("idle_timeout = \"0s\"", "idle_timeout", "1s to 24h"),
            ("idle_timeout = \"forever\"", "idle_timeout", "1s to 24h"),
            (
                "keepalive_interval = \"2h\"",
                "keepalive_interval",
                "\"off\"",
            ),
            (
                "keepalive_timeout = \"1h\"",
                "keepalive_timeout",
                "1s to 10m",
            ),
            ("body_budget = \"1MiB\"", "body_budget", "from 16MiB"),
            ("body_budget = \"2GiB\"", "body_budget", "to 1GiB"),
            ("body_budget = \"lots\"", "body_budget", "from 16MiB"),
            (
                "body_budget_wait = \"5m\"",
                "body_budget_wait",
                "at most 1m",
            ),
            (
                "body_read_timeout = \"1ms\"",
                "body_read_timeout",
                "100ms to 10m",
            ),
            (
                "max_pull_image_message = \"32MiB\"",
                "max_pull_image_message",
                "64KiB to 16MiB",
            ),
            (
                "max_small_message = \"1KiB\"",
                "max_small_message",
                "64KiB to 16MiB",
            ),
        ] {
            let text = format!("[server.limits]\n{text}");
            let e = err(&text);
            assert!(e.contains(&format!("server.limits.{key}")), "{text}: {e}");
            assert!(e.contains(expected), "{text}: {e}");
        }
        for bad in ["\"512KiB\"", "\"2GiB\"", "\"big\""] {
            let e = err(&format!("[policy]\nmax_bundle_size = {bad}"));
            assert!(e.contains("policy.max_bundle_size"), "{bad}: {e}");
            assert!(e.contains("1MiB to 1GiB"), "{bad}: {e}");
        }
        let e = err("[server.limits]\nmax_conections = 5");
        assert!(e.contains("max_conections"), "{e}");
        assert!(e.contains("server.limits"), "{e}");
    }

    #[test]
    fn lockdown_section() {
        let d = Config::default().lockdown;
        assert!(
            d.watch && !d.remove_out_of_band,
            "watch on, removal off by default"
        );
        assert_eq!(d.containerd_config, Path::new(DEFAULT_CONTAINERD_CONFIG));
        let c = parse(
            r#"
            [lockdown]
            watch = false
            remove_out_of_band = true
            containerd_config = "/etc/ctd/config.toml"
            kubelet_config = "/etc/kubernetes/kubelet.yaml"
            admin_sockets = ["/run/containerd/debug.sock"]
            "#,
        )
        .unwrap();
        assert!(!c.lockdown.watch && c.lockdown.remove_out_of_band);
        assert_eq!(
            c.lockdown.containerd_config,
            Path::new("/etc/ctd/config.toml")
        );
        assert_eq!(
            c.lockdown.kubelet_config,
            Path::new("/etc/kubernetes/kubelet.yaml")
        );
        assert_eq!(
            c.lockdown.admin_sockets,
            vec![PathBuf::from("/run/containerd/debug.sock")]
        );
        for (text, key) in [
            (
                "[lockdown]\ncontainerd_config = \"config.toml\"",
                "lockdown.containerd_config",
            ),
            (
                "[lockdown]\nadmin_sockets = [\"debug.sock\"]",
                "lockdown.admin_sockets",
            ),
            ("[lockdown]\nremove = true", "remove"),
        ] {
            let e = err(text);
            assert!(e.contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn wrong_types_are_parse_errors() {
        let e = err("[server]\nworker_threads = \"two\"");
        assert!(e.contains("key `server.worker_threads`"), "{e}");
        assert!(e.contains("expected i64"), "{e}");
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let e = Config::load(Path::new("/nonexistent/pullgate.toml")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/pullgate.toml"));
    }

    #[test]
    fn sync_and_admin_sections() {
        assert_eq!(Config::default().sync, None, "no sync unless configured");
        assert_eq!(
            Config::default().admin.socket.as_deref(),
            Some(Path::new("/run/pullgate/admin.sock"))
        );
        let c = parse(
            r#"
            [server]
            listen = "/run/pg/cri.sock"
            [admin]
            allowed_uids = [998]
            [sync]
            source = "registry.corp:5000/pullgate/bundles:prod"
            interval = "30s"
            auth_file = "/etc/pg/auth.json"
            ca_file = "/etc/pg/ca.pem"
            plain_http = ["registry.corp:5000"]
            timeout = "5s"
            max_size = "8MiB"
            max_staleness = "2h"
            max_backoff = "5m"
            seed = "node-1"
            "#,
        )
        .unwrap();
        assert_eq!(
            c.admin.socket.as_deref(),
            Some(Path::new("/run/pg/admin.sock"))
        );
        assert_eq!(c.admin.allowed_uids, [998]);
        let s = c.sync.unwrap();
        assert_eq!(
            s.source.to_string(),
            "registry.corp:5000/pullgate/bundles:prod"
        );
        assert_eq!(s.interval, Duration::from_secs(30));
        assert_eq!(s.max_size, 8 << 20);
        assert_eq!(s.max_staleness, Duration::from_secs(7200));
        assert_eq!(s.max_backoff, Duration::from_secs(300));
        assert_eq!(s.timeout, Duration::from_secs(5));
        assert_eq!(s.seed, SeedSource::Value("node-1".into()));
        let d = parse("[sync]\nsource = \"r.corp/b:prod\"")
            .unwrap()
            .sync
            .unwrap();
        assert_eq!(d.interval, Duration::from_secs(60));
        assert_eq!(d.max_staleness, Duration::from_secs(3600));
        assert_eq!(d.seed, SeedSource::File(PathBuf::from(DEFAULT_SEED_FILE)));
        assert_eq!(
            parse("[admin]\nsocket = \"off\"").unwrap().admin.socket,
            None
        );
        for (text, key) in [
            ("[sync]\ninterval = \"1m\"", "sync.source"),
            ("[sync]\nsource = \"pullgate/bundles:prod\"", "sync.source"),
            ("[sync]\nsource = \"r.corp/b\"", "sync.source"),
            (
                "[sync]\nsource = \"r.corp/b:p\"\ninterval = \"0s\"",
                "sync.interval",
            ),
            (
                "[sync]\nsource = \"r.corp/b:p\"\ninterval = \"1m\"\nmax_staleness = \"1m\"",
                "sync.max_staleness",
            ),
            (
                "[sync]\nsource = \"r.corp/b:p\"\ninterval = \"1m\"\nmax_backoff = \"30s\"",
                "sync.max_backoff",
            ),
            (
                "[sync]\nsource = \"r.corp/b:p\"\nmax_size = \"1KiB\"",
                "sync.max_size",
            ),
            (
                "[sync]\nsource = \"r.corp/b:p\"\nauth_file = \"auth.json\"",
                "sync.auth_file",
            ),
            (
                "[sync]\nsource = \"r.corp/b:p\"\nplain_http = [\"http://r.corp\"]",
                "sync.plain_http",
            ),
            (
                "[sync]\nsource = \"r.corp/b:p\"\nseed = \"a\"\nseed_file = \"/x\"",
                "sync.seed",
            ),
            ("[sync]\nsource = \"r.corp/b:p\"\nseed = \" \"", "sync.seed"),
            (
                "[sync]\nsource = \"r.corp/b:p\"\nchannel = \"x\"",
                "channel",
            ),
            ("[admin]\nsocket = \"admin.sock\"", "admin.socket"),
            ("[admin]\nallowed_uids = [-1]", "admin.allowed_uids"),
        ] {
            let e = err(text);
            assert!(e.contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
        let c = Config::load(&path).expect("config.example.toml must parse");
        assert_eq!(c.server.listen, Path::new(DEFAULT_LISTEN));
        assert_eq!(c.server.upstream, Path::new(DEFAULT_UPSTREAM));
        // It says it shows the defaults.
        assert_eq!(c.server.limits, Limits::default());
        assert_eq!(c.policy.max_bundle_size, DEFAULT_MAX_BUNDLE_SIZE);
    }
}
