//! `pullgate explain IMAGE`: the decision pullgate would make for an image and a pod, and why.
//!
//! Argument parsing and output only; the decision is [`crate::policy::decide`]. Exit status: 0 when the
//! image may run (allow or warn), 1 when it is denied (including when the bundle is not valid).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::policy::{self, ImageRequest, PodContext, load};

/// Arguments of `pullgate explain`.
#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// Image reference to explain.
    pub image: String,
    /// The bundle file.
    #[arg(long, value_name = "BUNDLE")]
    pub bundle: PathBuf,
    /// Signature file (default: BUNDLE.sig).
    #[arg(long, value_name = "PATH")]
    pub signatures: Option<PathBuf>,
    /// Trust file.
    #[arg(long, value_name = "TRUST")]
    pub trust: PathBuf,
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
    let pod = PodContext {
        namespace: args.namespace.clone(),
        name: args.pod.clone(),
        uid: None,
        labels: args.labels.iter().cloned().collect::<BTreeMap<_, _>>(),
    };
    let request = ImageRequest::Reference(&args.image);
    let now = time::OffsetDateTime::now_utc();
    let loaded = load::read_trust(&args.trust).and_then(|trust| {
        load::load_bundle(&args.bundle, args.signatures.as_deref(), &trust, None, now)
    });
    let decision = match &loaded {
        Ok(b) => policy::decide(&request, b, &pod, args.at.unwrap_or(now)),
        Err(e) => {
            // Say which file failed and why, apart from the decision a node would make without it.
            eprintln!("pullgate explain: no usable bundle (--bundle, --signatures, --trust): {e}");
            policy::decide_without_bundle(&request, Some(&e.to_string()))
        }
    };
    if args.json {
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
        if let Some(at) = args.at {
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
