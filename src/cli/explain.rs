//! `pullgate explain` (placeholder until the policy core lands).
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// Image reference to explain.
    pub image: String,
}

pub fn run(_args: &ExplainArgs) -> ExitCode {
    eprintln!("pullgate explain: not built yet");
    ExitCode::from(super::EXIT_FAILURE)
}
