//! `pullgate explain IMAGE`: the decision pullgate would make for an image and a pod, and why.
//!
//! Argument parsing and output only; the decision is [`crate::policy::decide`] over a bundle file, or
//! with `--live` the running daemon's own (its bundle in force and its mode, through the admin API).
//! Exit status: 0 when the image may run (allow or warn), 1 when it is denied (including when the
//! bundle is not valid), 2 with `--live` when the daemon cannot be asked.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::node::api::{AdminClient, pb};
use crate::policy::{self, ImageRequest, PodContext, load};

/// Arguments of `pullgate explain`.
#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// Image reference to explain.
    pub image: String,
    /// Ask the running daemon (its bundle in force and mode) through its admin socket, instead of
    /// deciding over --bundle and --trust.
    #[arg(long, conflicts_with_all = ["bundle", "signatures", "trust", "at"])]
    pub live: bool,
    /// pullgate's configuration file (with --live: where the admin socket is).
    #[arg(
        long,
        short = 'c',
        value_name = "PATH",
        default_value = "/etc/pullgate/config.toml",
        requires = "live"
    )]
    pub config: PathBuf,
    /// The bundle file.
    #[arg(long, value_name = "BUNDLE", required_unless_present = "live")]
    pub bundle: Option<PathBuf>,
    /// Signature file (default: BUNDLE.sig).
    #[arg(long, value_name = "PATH")]
    pub signatures: Option<PathBuf>,
    /// Trust file.
    #[arg(long, value_name = "TRUST", required_unless_present = "live")]
    pub trust: Option<PathBuf>,
    /// The pod's namespace.
    #[arg(long, value_name = "NS")]
    pub namespace: Option<String>,
    /// The pod's name.
    #[arg(long, value_name = "NAME")]
    pub pod: Option<String>,
    /// A pod label (repeatable).
    #[arg(long = "label", value_name = "K=V", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Decide at this time (RFC 3339, e.g. 2026-06-01T00:00:00Z) instead of now, to see a deprecation,
    /// sunset or exception expiry ahead of time. The bundle itself is still verified against now.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub at: Option<time::OffsetDateTime>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

fn parse_time(s: &str) -> Result<time::OffsetDateTime, String> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).map_err(|e| {
        format!("\"{s}\" is not an RFC 3339 time ({e}); write e.g. 2026-06-01T00:00:00Z")
    })
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("label \"{s}\" must be written KEY=VALUE")),
    }
}

/// Runs `pullgate explain`.
pub fn run(args: &ExplainArgs) -> ExitCode {
    if args.live {
        return live(args);
    }
    let (Some(bundle), Some(trust)) = (&args.bundle, &args.trust) else {
        eprintln!("pullgate explain: --bundle and --trust are required without --live");
        return ExitCode::from(super::EXIT_CONFIG);
    };
    let pod = PodContext {
        namespace: args.namespace.clone(),
        name: args.pod.clone(),
        uid: None,
        labels: args.labels.iter().cloned().collect::<BTreeMap<_, _>>(),
    };
    let request = ImageRequest::Reference(&args.image);
    let now = time::OffsetDateTime::now_utc();
    let loaded = load::read_trust(trust)
        .and_then(|trust| load::load_bundle(bundle, args.signatures.as_deref(), &trust, None, now));
    let decision = match &loaded {
        Ok(b) => policy::decide(&request, b, &pod, args.at.unwrap_or(now)),
        Err(e) => {
            // Say which file failed and why, apart from the decision a node would make without it.
            eprintln!("pullgate explain: no usable bundle (--bundle, --signatures, --trust): {e}");
            policy::decide_without_bundle(&request, Some(&e.to_string()))
        }
    };
    print(&decision, args.json, args.at)
}

/// `pullgate explain --live`: the daemon decides.
fn live(args: &ExplainArgs) -> ExitCode {
    let socket =
        match super::admin_socket(&args.config, "explain --live", "use --bundle and --trust") {
            Ok(s) => s,
            Err(code) => return code,
        };
    let req = pb::ExplainRequest {
        image: args.image.clone(),
        namespace: args.namespace.clone().unwrap_or_default(),
        pod: args.pod.clone().unwrap_or_default(),
        labels: args.labels.iter().cloned().collect(),
    };
    let answer = crate::node::daemon::admin::client_runtime().and_then(|rt| {
        rt.block_on(async {
            let mut c = AdminClient::connect(&socket).await?;
            c.explain(req).await
        })
        .map_err(|e| e.to_string())
    });
    let r = match answer {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pullgate explain --live: {e}");
            return ExitCode::from(super::EXIT_UNASKED);
        }
    };
    if args.json {
        println!("{}", r.json);
    } else {
        let dash = |s: &str| {
            if s.is_empty() {
                "-".to_owned()
            } else {
                s.to_owned()
            }
        };
        println!("image:       {}", args.image);
        println!(
            "decision:    {} (the daemon's bundle and mode, now)",
            r.verdict
        );
        println!("reason:      {}", r.reason);
        println!("pull ref:    {}", dash(&r.pull_ref));
        println!("digest:      {}", dash(&r.digest));
        println!(
            "bundle:      {}",
            if r.bundle_version == 0 {
                "-".to_owned()
            } else {
                format!("version {}", r.bundle_version)
            }
        );
        println!("message:     {}", r.message);
    }
    if r.verdict == "deny" {
        ExitCode::from(super::EXIT_FAILURE)
    } else {
        ExitCode::SUCCESS
    }
}

fn print(decision: &policy::Decision, json: bool, at: Option<time::OffsetDateTime>) -> ExitCode {
    if json {
        println!("{}", decision.to_json());
    } else {
        let none = || "-".to_owned();
        println!("image:       {}", decision.image);
        println!(
            "normalized:  {}",
            decision.normalized.clone().unwrap_or_else(none)
        );
        println!("decision:    {}", decision.verdict);
        println!("reason:      {}", decision.reason);
        println!(
            "pull ref:    {}",
            decision.pull_ref.clone().unwrap_or_else(none)
        );
        println!(
            "digest:      {}",
            decision
                .digest
                .as_ref()
                .map(|d| d.to_string())
                .unwrap_or_else(none)
        );
        println!(
            "pod scope:   {}",
            decision.pod_scope.as_deref().unwrap_or("-")
        );
        if let Some(m) = &decision.matched {
            println!("matched:     {} for {}", m.source, m.scope);
        }
        println!(
            "bundle:      {}",
            decision
                .bundle_version
                .map(|v| format!("version {v}"))
                .unwrap_or_else(none)
        );
        if let Some(l) = &decision.lifecycle {
            println!(
                "lifecycle:   {} ({}{})",
                l.state.as_str(),
                l.tag
                    .as_deref()
                    .map(|t| format!("tag {t}, "))
                    .unwrap_or_default(),
                l.lifecycle.summary()
            );
        }
        if let Some(x) = &decision.exception {
            println!(
                "exception:   {}{}",
                if x.expired { "EXPIRED " } else { "" },
                x.exception.summary()
            );
        }
        if let Some(at) = at {
            println!("decided at:  {}", policy::bundle::rfc3339(at));
        }
        println!("message:     {}", decision.message);
    }
    if decision.is_allowed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::EXIT_FAILURE)
    }
}
