//! The command line: the clap definition of every subcommand, and dispatch to the module that owns it.
//!
//! Each subcommand's work lives with the concept it belongs to (`daemon` for `serve`, `policy` for bundles
//! and decisions, `admin` for the catalog, approve and bundle build); this module only parses arguments and maps outcomes to exit codes.

mod admin;
mod bundle;
mod explain;
mod node;
mod watch;
mod whatif;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

pub use crate::exit::{EXIT_CONFIG, EXIT_FAILURE};

/// pullgate: a CRI proxy that lets a node run only approved, digest-pinned images.
#[derive(Debug, Parser)]
#[command(name = "pullgate", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the CRI proxy daemon between kubelet and containerd.
    Serve(ServeArgs),
    /// Validate a configuration file and exit non-zero (78) if it is invalid.
    CheckConfig(ConfigArg),
    /// Generate an ed25519 key pair for signing bundles (PREFIX.key mode 0600, PREFIX.pub).
    Keygen(KeygenArgs),
    /// Sign, verify, inspect and compare allowlist bundles.
    #[command(subcommand)]
    Bundle(bundle::BundleCommand),
    /// Show the decision pullgate would make for an image, and why.
    Explain(explain::ExplainArgs),
    /// Show what the running daemon enforces: bundle, mode, upstream state, decision counts, sync.
    Status(StatusArgs),
    /// Follow the running daemon's decisions as they are made (through its admin socket).
    Watch(watch::WatchArgs),
    /// Commands about this node: `node check` proves its lockdown.
    #[command(subcommand)]
    Node(node::NodeCommand),
    /// Create or check the administrators' catalog (the source every bundle is built from).
    #[command(subcommand)]
    Catalog(admin::CatalogCommand),
    /// Approve a public image: scanner reports, licence and version rules, mirror by digest, record it.
    Approve(admin::ApproveArgs),
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Print the daemon's status object as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Exit status of a command that needs the running daemon and could not ask it.
const EXIT_UNASKED: u8 = 2;

/// The admin API socket of the configuration at `path`, for `command`; when the configuration is
/// invalid or the API is off, says so (and what to do `instead`) and gives the exit status.
fn admin_socket(path: &std::path::Path, command: &str, instead: &str) -> Result<PathBuf, ExitCode> {
    let config = crate::node::config::Config::load(path).map_err(|e| {
        eprintln!("pullgate: {e}");
        ExitCode::from(EXIT_CONFIG)
    })?;
    config.admin.socket.ok_or_else(|| {
        eprintln!(
            "pullgate {command}: the admin API is off (admin.socket = \"off\" in {}); {instead}",
            path.display()
        );
        ExitCode::from(EXIT_UNASKED)
    })
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// Path of the TOML configuration file.
    #[arg(
        long,
        short = 'c',
        value_name = "PATH",
        default_value = "/etc/pullgate/config.toml"
    )]
    pub config: PathBuf,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Unix socket to listen on for kubelet (overrides `server.listen`).
    #[arg(long, value_name = "SOCKET")]
    pub listen: Option<PathBuf>,
    /// containerd's CRI socket to forward to (overrides `server.upstream`).
    #[arg(long, value_name = "SOCKET")]
    pub upstream: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Path prefix: writes PREFIX.key (private, mode 0600) and PREFIX.pub (public).
    #[arg(long, value_name = "PREFIX")]
    pub out: PathBuf,
}

/// Parses the process arguments, runs the subcommand and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            crate::node::daemon::serve_command(crate::node::daemon::ServeOptions {
                config: args.config.config,
                listen: args.listen,
                upstream: args.upstream,
            })
        }
        Command::CheckConfig(args) => crate::node::daemon::check_config_command(&args.config),
        Command::Keygen(args) => bundle::keygen(&args),
        Command::Bundle(cmd) => bundle::run(cmd),
        Command::Explain(args) => explain::run(&args),
        Command::Status(args) => {
            crate::node::daemon::admin::status_command(&args.config.config, args.json)
        }
        Command::Watch(args) => watch::run(&args),
        Command::Node(cmd) => node::run(cmd),
        Command::Catalog(cmd) => admin::catalog(cmd),
        Command::Approve(args) => admin::approve(args),
    }
}
