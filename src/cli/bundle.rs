//! `pullgate keygen` and `pullgate bundle …` (placeholder until the policy core lands).
use std::process::ExitCode;

#[derive(Debug, clap::Subcommand)]
pub enum BundleCommand {}

pub fn keygen(_args: &super::KeygenArgs) -> ExitCode {
    eprintln!("pullgate keygen: not built yet");
    ExitCode::from(super::EXIT_FAILURE)
}

pub fn run(cmd: BundleCommand) -> ExitCode {
    match cmd {}
}
