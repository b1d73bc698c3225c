//! The daemon's lifecycle: configuration, logging, the runtime, the listening socket, signals,
//! readiness notification, and the graceful drain on stop.
//!
//! [`Server::bind`] + [`Server::run`] are the seam tests use: they bind a real socket in a temp dir
//! and drive the server with [`Control`] messages instead of signals. [`serve_command`] wires the same
//! server to the real signals and systemd.
//!
//! - [`listener`]: the unix socket (stale-socket handling, mode, group, removal on exit).
//! - [`notify`]: `READY=1` / `STOPPING=1` to systemd.
//! - [`node`]: the policy side at run time (bundle lifecycle, drop directory, status).
//! - [`http`]: `/metrics`, `/healthz`, `/readyz`, `/status` on loopback.
//! - [`admin`]: `pullgate status` and `pullgate bundle install` against a running node.
//! - [`lockdown`]: the containerd watcher task and the node check at start and on reload.
//! - [`sync`]: the registry sync task, with the node as the place bundles are installed.
//! - [`api`]: the local admin API (gRPC on a root-only unix socket).

pub mod admin;
pub mod api;
pub mod http;
pub mod listener;
pub mod lockdown;
pub mod node;
pub mod notify;
pub mod sync;

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::exit::{EXIT_CONFIG, EXIT_FAILURE};
use crate::node::config::{self, Config, Limits, LogFormat, SandboxImageCheck, ServerConfig};
use crate::node::metrics::{ConnClose, Metrics};
use crate::node::proxy::track::Registry;
use crate::node::proxy::{InterceptTable, Proxy, Reach, Upstream, conn};
use crate::node::ratelimit::LogLimiter;
use listener::{ListenError, SocketGuard};

/// What the server is told to do while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Stop accepting, drain in-flight calls within the grace period, return.
    Shutdown,
    /// Close every connection now (a second stop signal during the drain).
    Terminate,
    /// Reload what can be reloaded (nothing yet beyond logging that it happened).
    Reload,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunSummary {
    /// Connections still open when the grace period ran out (closed forcibly).
    pub aborted_connections: usize,
}

/// Called on SIGHUP.
pub type ReloadHook = Arc<dyn Fn() + Send + Sync>;

/// A bound, not yet running, proxy server.
pub struct Server {
    proxy: Arc<Proxy>,
    socket: SocketGuard,
    drain_grace: Duration,
    limits: Limits,
    reload: Option<ReloadHook>,
}

/// How often a repeating accept error or connection refusal is logged at most.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

impl Server {
    /// Binds the listening socket with a proxy of its own (no shared state); containerd is not
    /// contacted yet.
    pub fn bind(cfg: &ServerConfig, intercepts: InterceptTable) -> Result<Server, ListenError> {
        let proxy = Proxy::configured(
            Arc::new(Upstream::new(&cfg.upstream)),
            intercepts,
            Arc::new(Metrics::default()),
            Reach::Cri,
            &cfg.limits,
        );
        Server::bind_with(cfg, proxy)
    }

    /// Binds the listening socket for an existing proxy.
    pub fn bind_with(cfg: &ServerConfig, proxy: Arc<Proxy>) -> Result<Server, ListenError> {
        let socket = listener::bind(&cfg.listen, cfg.socket_mode, cfg.socket_group.as_ref())?;
        Ok(Server {
            proxy,
            socket,
            drain_grace: cfg.drain_grace,
            limits: cfg.limits.clone(),
            reload: None,
        })
    }

    /// Runs `hook` on every [`Control::Reload`].
    pub fn on_reload(mut self, hook: ReloadHook) -> Self {
        self.reload = Some(hook);
        self
    }

    pub fn socket_path(&self) -> &Path {
        self.socket.path()
    }

    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// Serves until told to shut down (or the control channel closes), then drains.
    pub async fn run(self, mut control: mpsc::Receiver<Control>) -> RunSummary {
        let Server {
            proxy,
            socket,
            drain_grace,
            limits,
            reload,
        } = self;
        let session_limits = crate::node::proxy::relay::SessionLimits::from_config(&limits);
        let metrics = proxy.metrics().clone();
        let registry = Registry::new(&limits, metrics.clone());
        let log_limiter = LogLimiter::new(LOG_INTERVAL);
        check_fd_limit(limits.max_connections);
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut conns = JoinSet::new();
        tracing::info!(listen = %socket.path().display(), upstream = %proxy.upstream().path().display(), "serving");
        loop {
            tokio::select! {
                accepted = socket.listener.accept() => match accepted {
                    Ok((stream, _)) => match registry.admit() {
                        Ok(tracked) => {
                            conns.spawn(conn::serve(proxy.clone(), session_limits.clone(), stream, tracked, stop_rx.clone()));
                        }
                        Err(refused) => {
                            metrics.connection_closed(ConnClose::Refused);
                            if let Some(suppressed) = log_limiter.check("refused") {
                                tracing::warn!(reason = %refused, suppressed, "refused a new client connection");
                            }
                            conn::refuse(stream, &refused.to_string());
                        }
                    },
                    Err(e) => {
                        metrics.accept_error();
                        if let Some(suppressed) = log_limiter.check("accept") {
                            tracing::warn!(error = %e, suppressed, connections = registry.len(), "accept failed on the CRI socket");
                        }
                        // Out of file descriptors: free one held by an idle client.
                        if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                            registry.evict_oldest_idle();
                        }
                        // Back off briefly rather than spin.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                msg = control.recv() => match msg {
                    Some(Control::Reload) => match &reload {
                        Some(hook) => {
                            let hook = hook.clone();
                            let _ = tokio::task::spawn_blocking(move || hook()).await;
                        }
                        None => tracing::info!("reload requested; nothing to reload"),
                    },
                    Some(Control::Shutdown) | Some(Control::Terminate) | None => break,
                },
            }
        }
        // Stop accepting: new clients get "connection refused" from now on.
        drop(socket);
        let _ = stop_tx.send(true);
        tracing::info!(connections = conns.len(), grace = ?drain_grace, "draining");
        let drained = async { while conns.join_next().await.is_some() {} };
        let terminated = async {
            loop {
                match control.recv().await {
                    Some(Control::Terminate) => return,
                    Some(_) => continue,
                    None => std::future::pending::<()>().await,
                }
            }
        };
        let aborted_connections = tokio::select! {
            _ = tokio::time::timeout(drain_grace, drained) => conns.len(),
            _ = terminated => conns.len(),
        };
        if aborted_connections > 0 {
            tracing::warn!(
                aborted_connections,
                "closing connections still busy after the drain"
            );
        }
        conns.shutdown().await;
        tracing::info!("stopped");
        RunSummary {
            aborted_connections,
        }
    }
}

/// Warns when the open-file limit cannot hold `max_connections` client sockets and their
/// connections to containerd (plus those still closing, and the daemon's own files), after raising
/// the soft limit to the hard one.
fn check_fd_limit(max_connections: usize) {
    // Each client connection that has made a call also holds one to containerd.
    let needed = (2 * (max_connections + Registry::reserve_for(max_connections)) + 64) as u64;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    if lim.rlim_cur < needed && lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max.min(needed.max(lim.rlim_cur)),
            rlim_max: lim.rlim_max,
        };
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = raised.rlim_cur;
        }
    }
    if lim.rlim_cur < needed {
        tracing::warn!(
            open_file_limit = lim.rlim_cur,
            needed,
            max_connections,
            "the open-file limit is below what server.limits.max_connections needs; raise LimitNOFILE (systemctl edit pullgate) or lower max_connections"
        );
    }
}

/// `pullgate check-config`: validate and report.
pub fn check_config_command(path: &Path) -> ExitCode {
    match Config::load(path) {
        Ok(_) => {
            println!("{}: configuration is valid", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pullgate: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// What `pullgate serve` was asked for: the configuration file and the flags that override it.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub config: std::path::PathBuf,
    /// Overrides `server.listen`.
    pub listen: Option<std::path::PathBuf>,
    /// Overrides `server.upstream`.
    pub upstream: Option<std::path::PathBuf>,
}

/// Threads of the runtime's blocking pool (drop-directory polls, reloads).
const MAX_BLOCKING_THREADS: usize = 8;

/// `pullgate serve`: load the configuration, apply flag overrides, run until a stop signal.
pub fn serve_command(args: ServeOptions) -> ExitCode {
    let mut config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pullgate: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(listen) = args.listen {
        // The admin socket sits next to the CRI socket unless it was configured elsewhere.
        if config.admin.socket.as_deref()
            == Some(config::default_admin_socket(&config.server.listen).as_path())
        {
            config.admin.socket = Some(config::default_admin_socket(&listen));
        }
        config.server.listen = listen;
    }
    if let Some(upstream) = args.upstream {
        config.server.upstream = upstream;
    }
    init_logging(&config);
    // Blocking work is the drop-directory poll and reloads, one at a time: a few threads suffice,
    // and the unit's TasksMax counts on it.
    let runtime = if config.server.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(MAX_BLOCKING_THREADS)
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.server.worker_threads)
            .max_blocking_threads(MAX_BLOCKING_THREADS)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pullgate: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    runtime.block_on(run_node(config, args.config))
}

/// Starts the node and serves until a stop signal: the body of `pullgate serve`.
async fn run_node(config: Config, config_path: std::path::PathBuf) -> ExitCode {
    let fail = |code: u8, e: &dyn std::fmt::Display| {
        tracing::error!(error = %e, "cannot start");
        eprintln!("pullgate: {e}");
        ExitCode::from(code)
    };
    let node = match node::Node::start(config.clone()) {
        Ok(n) => n,
        Err(e) => return fail(EXIT_FAILURE, &e),
    };
    node.set_config_path(config_path);
    // containerd pulls the sandbox image itself: check it now if containerd answers (otherwise the
    // background task does once it does).
    let sandbox_checked = node::upstream_within(&node.upstream, Duration::from_secs(2)).await;
    if sandbox_checked {
        if let Err(p) = node.check_sandbox_image().await {
            if config.policy.sandbox_image == SandboxImageCheck::Refuse {
                return fail(
                    EXIT_CONFIG,
                    &format!("{p} (policy.sandbox_image = \"refuse\")"),
                );
            }
        }
    }
    let reach = if config.server.forward_non_cri {
        tracing::warn!(
            "server.forward_non_cri = true: containerd's native API is forwarded unchecked"
        );
        Reach::All
    } else {
        Reach::Cri
    };
    let proxy = Proxy::configured(
        node.upstream.clone(),
        node.enforcer.intercept_table(),
        node.metrics.clone(),
        reach,
        &config.server.limits,
    );
    let reload_node = node.clone();
    let server = match Server::bind_with(&config.server, proxy) {
        Ok(s) => s.on_reload(Arc::new(move || {
            reload_node.reload();
            lockdown::recheck(&reload_node);
        })),
        Err(e) => return fail(EXIT_FAILURE, &e),
    };
    if let Some(addr) = config.metrics.listen {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                let addr = l.local_addr().unwrap_or(addr);
                tracing::info!(%addr, "serving /metrics, /healthz, /readyz, /status");
                tokio::spawn(http::serve(l, node.clone()));
            }
            Err(e) => {
                return fail(
                    EXIT_FAILURE,
                    &format!("cannot listen on {addr} (metrics.listen): {e}"),
                );
            }
        }
    }
    node.spawn_background(sandbox_checked);
    lockdown::start(&node);
    if let Err(e) = sync::start(&node) {
        return fail(EXIT_CONFIG, &e);
    }
    if let Err(e) = api::start(&node) {
        return fail(EXIT_FAILURE, &format!("admin.socket: {e}"));
    }
    let (tx, rx) = mpsc::channel(4);
    if let Err(e) = spawn_signal_handler(tx) {
        return fail(
            EXIT_FAILURE,
            &format!("cannot install signal handlers: {e}"),
        );
    }
    // Last: once the pid file names this process, every listener is bound and signals are handled.
    let pid_path = admin::pid_file(&config);
    let _ = std::fs::write(&pid_path, format!("{}\n", std::process::id()));
    notify::notify("READY=1");
    server.run(rx).await;
    let _ = std::fs::remove_file(&pid_path);
    ExitCode::SUCCESS
}

/// Turns SIGTERM/SIGINT (stop; a second one terminates the drain) and SIGHUP (reload) into
/// [`Control`] messages.
fn spawn_signal_handler(tx: mpsc::Sender<Control>) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        let mut stopping = false;
        loop {
            let msg = tokio::select! {
                _ = term.recv() => if stopping { Control::Terminate } else { Control::Shutdown },
                _ = int.recv() => if stopping { Control::Terminate } else { Control::Shutdown },
                _ = hup.recv() => Control::Reload,
            };
            match msg {
                Control::Shutdown => {
                    stopping = true;
                    tracing::info!("stop signal received");
                    notify::notify("STOPPING=1");
                }
                Control::Terminate => {
                    tracing::warn!("second stop signal: closing all connections now")
                }
                Control::Reload => {
                    notify::notify("RELOADING=1");
                    tracing::info!("SIGHUP received");
                    notify::notify("READY=1");
                }
            }
            if tx.send(msg).await.is_err() {
                return;
            }
        }
    });
    Ok(())
}

/// Installs the global `tracing` subscriber. `PULLGATE_LOG` overrides the configured filter.
pub fn init_logging(config: &Config) {
    let from_env = std::env::var("PULLGATE_LOG").ok().and_then(|f| {
        tracing_subscriber::EnvFilter::try_new(&f)
            .map_err(|e| {
                eprintln!(
                    "pullgate: ignoring PULLGATE_LOG={f:?} ({e}); using log.level {:?} from the configuration",
                    config.log.level
                )
            })
            .ok()
    });
    let filter = from_env.unwrap_or_else(|| tracing_subscriber::EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .with_writer(std::io::stderr);
    let _ = match config.log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
