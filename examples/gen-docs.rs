//! Generates the man pages and shell completions shipped in the packages, from the clap definition
//! of the CLI itself (`pullgate::cli::Cli`), so they can never drift from `pullgate --help`.
//!
//! Usage: `cargo run --example gen-docs -- OUTDIR`
//!
//! Writes into OUTDIR:
//! - `man/pullgate.1` and one page per subcommand, nested ones included
//!   (`man/pullgate-serve.1`, `man/pullgate-bundle-sign.1`, …), named the way `git` does it;
//! - `completions/pullgate.bash`, `completions/_pullgate` (zsh) and `completions/pullgate.fish`.
//!
//! packaging/build.sh runs this before building the .deb and the .rpm.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

fn main() -> io::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let out: PathBuf = match (args.next(), args.next()) {
        (Some(dir), None) => dir.into(),
        _ => {
            eprintln!("usage: gen-docs OUTDIR");
            std::process::exit(2);
        }
    };

    let mut cmd = pullgate::cli::Cli::command();
    cmd.build();

    let man_dir = out.join("man");
    fs::create_dir_all(&man_dir)?;
    let mut pages = 0;
    write_man_pages(&cmd, &man_dir, &mut pages)?;

    let comp_dir = out.join("completions");
    fs::create_dir_all(&comp_dir)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let path = clap_complete::generate_to(shell, &mut cmd, "pullgate", &comp_dir)?;
        println!("wrote {}", path.display());
    }
    println!("wrote {pages} man pages into {}", man_dir.display());
    Ok(())
}

/// Writes the page for `cmd` and, recursively, one for each of its visible subcommands.
///
/// clap_mangen names a subcommand page after the subcommand alone; giving each subcommand the full
/// dashed name first (`pullgate-bundle-sign`) makes the title, the NAME section and the file agree.
fn write_man_pages(cmd: &clap::Command, dir: &Path, pages: &mut usize) -> io::Result<()> {
    let name = cmd.get_name().to_string();
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut buf)?;
    let path = dir.join(format!("{name}.1"));
    fs::write(&path, buf)?;
    *pages += 1;

    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        let full = format!("{name}-{}", sub.get_name());
        // `cmd.build()` already gave every subcommand its full bin name ("pullgate bundle sign"),
        // which the SYNOPSIS uses; only the page name changes.
        // (clap's names are `&'static str` without its "string" feature; leaking a few short names
        // in a one-shot generator is fine.)
        let full: &'static str = Box::leak(full.into_boxed_str());
        let sub = sub.clone().name(full).display_name(full);
        write_man_pages(&sub, dir, pages)?;
    }
    Ok(())
}
