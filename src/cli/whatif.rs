//! `pullgate bundle what-if NEW --config CONFIG`: what a new bundle would do to the containers running
//! on this node, before it is installed anywhere.
//!
//! Argument parsing, reading the node's state and output only: verification is the install's own
//! ([`crate::node::enforce::store::BundleStore::verify_new`]), the inventory and the comparison are
//! [`crate::node::whatif`]. Exit status: 0 when nothing running would be denied, 1 when something
//! would, 2 when it cannot check (configuration, trust file, NEW rejected, containerd unreachable).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use crate::exit::{EXIT_CANNOT_CHECK, EXIT_FAILURE};
use crate::node::config::Config;
use crate::node::enforce::store::BundleStore;
use crate::node::proxy::Upstream;
use crate::node::whatif;
use crate::policy::load;

/// Arguments of `pullgate bundle what-if`.
#[derive(Debug, clap::Args)]
pub struct WhatIfArgs {
    /// The new bundle file.
    pub bundle: PathBuf,
    /// pullgate's configuration (trust file, state directory with the installed bundle, containerd's
    /// socket, the node's mode).
    #[command(flatten)]
    pub config: super::ConfigArg,
    /// Signature file (default: BUNDLE.sig).
    #[arg(long, value_name = "PATH")]
    pub signatures: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Report sunsets and exception expiries within this many days (1..=3650).
    #[arg(long, value_name = "N", default_value_t = 14, value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub days: u32,
}

fn cannot(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("pullgate bundle what-if: cannot check: {msg}");
    ExitCode::from(EXIT_CANNOT_CHECK)
}

/// Runs `pullgate bundle what-if`.
pub fn run(args: &WhatIfArgs) -> ExitCode {
    let config = match Config::load(&args.config.config) {
        Ok(c) => c,
        Err(e) => return cannot(e),
    };
    let trust = match load::read_trust(&config.policy.trust) {
        Ok(t) => t,
        Err(e) => return cannot(e),
    };
    let now = time::OffsetDateTime::now_utc();
    let max = config.policy.max_bundle_size;
    let store = BundleStore::new(&config.policy.state_dir).with_max_bundle_size(max);
    let sig_path = args
        .signatures
        .clone()
        .unwrap_or_else(|| load::signature_path(&args.bundle));
    let new = match load::read_bundle(&args.bundle, max)
        .and_then(|b| Ok((b, load::read("signature file", &sig_path)?)))
    {
        Ok((bytes, sigs)) => match store.verify_new(&bytes, &sigs, &trust, now, &args.bundle) {
            Ok(b) => b,
            Err(e) => return cannot(format!("an install would reject it: {e}")),
        },
        Err(e) => return cannot(e),
    };
    // The installed bundle, as the daemon would load it (an unusable one: decisions fail closed).
    let (installed, problem) = match store.load_current(&trust, now) {
        Ok(Some(b)) => (Some(b), None),
        Ok(None) => (None, Some("no bundle is installed".to_owned())),
        Err(e) => (
            None,
            Some(format!("the installed bundle was rejected: {e}")),
        ),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return cannot(format!("cannot start the async runtime: {e}")),
    };
    let upstream = Arc::new(Upstream::new(&config.server.upstream));
    let containers = match runtime.block_on(whatif::inventory(&upstream)) {
        Ok(c) => c,
        Err(s) => {
            return cannot(format!(
                "cannot read the node's containers from containerd at {}: {}",
                config.server.upstream.display(),
                s.message
            ));
        }
    };
    let report = whatif::compare(
        containers,
        installed.as_ref(),
        problem.as_deref(),
        &new,
        config.policy.mode,
        now,
        args.days,
    );
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    if report.denied() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILURE)
    }
}
