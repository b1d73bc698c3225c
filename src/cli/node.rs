//! `pullgate node …`: commands about this node itself. `node check` proves the node's lockdown (the
//! checks live in [`crate::node::lockdown::check`]) and can write the `hosts.toml` files that lock
//! containerd's registry configuration onto the private registry.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use time::OffsetDateTime;

use super::ConfigArg;
use crate::node::config::Config;
use crate::node::daemon::listener::resolve_group;
use crate::node::enforce::store::BundleStore;
use crate::node::enforce::{Enforcer, PolicyState};
use crate::node::lockdown::{check, hosts};
use crate::node::metrics::Metrics;
use crate::node::proxy::Upstream;
use crate::policy::load;

/// Exit status when the node could not be checked.
const EXIT_UNCHECKED: u8 = 2;

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Check that this node sends every image through pullgate: containerd's registry configuration
    /// (config_path, hosts.toml without upstream fallback), socket permissions, kubelet's endpoints,
    /// the sandbox image, the node mode, forward_non_cri and the bundle's expiry. Exit status: 0 clean,
    /// 1 findings, 2 could not check.
    Check(CheckArgs),
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Print the findings as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// First write into DIR (containerd's config_path) the hosts.toml files that send every public
    /// registry the bundle mirrors, and every other name (`_default`), to the private registry with
    /// no upstream fallback, showing a diff of each; then check. Restart containerd afterwards.
    #[arg(long, value_name = "DIR")]
    pub write_hosts: Option<PathBuf>,
    /// How the written hosts.toml files reach the private registry.
    #[arg(long, value_name = "SCHEME", default_value = "https", value_parser = ["https", "http"])]
    pub registry_scheme: String,
    /// containerd's configuration file (overrides lockdown.containerd_config).
    #[arg(long, value_name = "PATH")]
    pub containerd_config: Option<PathBuf>,
    /// kubelet's KubeletConfiguration file, read when the running kubelet names none (overrides
    /// lockdown.kubelet_config).
    #[arg(long, value_name = "PATH")]
    pub kubelet_config: Option<PathBuf>,
}

pub fn run(cmd: NodeCommand) -> ExitCode {
    match cmd {
        NodeCommand::Check(args) => check_command(&args),
    }
}

fn unchecked(msg: &str) -> ExitCode {
    eprintln!("pullgate node check: {msg}");
    ExitCode::from(EXIT_UNCHECKED)
}

fn check_command(args: &CheckArgs) -> ExitCode {
    let mut config = match Config::load(&args.config.config) {
        Ok(c) => c,
        Err(e) => return unchecked(&e.to_string()),
    };
    if let Some(p) = &args.containerd_config {
        config.lockdown.containerd_config = p.clone();
    }
    if let Some(p) = &args.kubelet_config {
        config.lockdown.kubelet_config = p.clone();
    }
    // The bundle in force, as the daemon loads it.
    let state = PolicyState::new(config.policy.mode, config.policy.expiry_grace);
    let now = OffsetDateTime::now_utc();
    match load::read_trust(&config.policy.trust) {
        Err(e) => state.set_problem(format!("the trust file is unusable: {e}")),
        Ok(trust) => match BundleStore::new(&config.policy.state_dir).load_current(&trust, now) {
            Ok(Some(b)) => state.set(std::sync::Arc::new(b)),
            Ok(None) => state.set_problem(format!(
                "no bundle is installed in {}",
                config.policy.state_dir.display()
            )),
            Err(e) => state.set_problem(format!("the installed bundle was rejected: {e}")),
        },
    }
    if let Some(dir) = &args.write_hosts {
        let bundle = match state.usable(now) {
            Ok(b) => b,
            Err(why) => {
                return unchecked(&format!(
                    "cannot write hosts.toml files without a usable bundle (it names the private registry and the mirrored sources): {why}"
                ));
            }
        };
        let files = hosts::lockdown_files(&bundle, &args.registry_scheme);
        let mut out = std::io::stdout().lock();
        match hosts::write_files(dir, &files, &mut out) {
            Ok(n) => println!(
                "wrote {n} hosts.toml file(s) under {}; restart containerd to apply them\n",
                dir.display()
            ),
            Err(e) => return unchecked(&e.to_string()),
        }
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return unchecked(&format!("cannot start the async runtime: {e}")),
    };
    let upstream = std::sync::Arc::new(Upstream::new(&config.server.upstream));
    let state = std::sync::Arc::new(state);
    let enforcer = Enforcer::new(
        state.clone(),
        upstream.clone(),
        std::sync::Arc::new(Metrics::default()),
        None,
    );
    let socket_gid = match &config.server.socket_group {
        None => Ok(0),
        Some(g) => resolve_group(g).map_err(|e| e.to_string()),
    };
    let report = runtime.block_on(check::run(&check::Inputs {
        config: &config,
        state: &state,
        enforcer: &enforcer,
        upstream: &upstream,
        socket_gid,
        proc_root: std::path::Path::new("/proc"),
        now,
    }));
    if args.json {
        println!("{}", report.json());
    } else {
        print!("{}", report.table());
    }
    ExitCode::from(report.exit_code())
}
