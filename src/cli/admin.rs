//! `pullgate catalog init|check`, `pullgate approve` and `pullgate bundle build`: the administrators'
//! commands. Argument parsing and output only; the work is done by [`crate::admin`].

use std::path::PathBuf;
use std::process::ExitCode;

use crate::admin::{approve, build, catalog::Catalog};
use crate::registry::{AuthFile, Registry, RegistryOptions};

/// Catalog subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum CatalogCommand {
    /// Write a commented starting catalog into DIR (never overwriting a file).
    Init {
        /// The catalog directory.
        dir: PathBuf,
        /// The organisation's name (a lowercase DNS label).
        #[arg(long, default_value = "corp")]
        organization: String,
        /// The private registry host (and port).
        #[arg(long, value_name = "HOST", default_value = "registry.corp")]
        private_registry: String,
        /// The administrators' trust file to copy into the catalog (else a template to fill in).
        #[arg(long, value_name = "TRUST")]
        trust: Option<PathBuf>,
    },
    /// Check a catalog: every problem is listed with its file, line and key; exit 1 if there is any.
    Check {
        /// The catalog directory.
        dir: PathBuf,
    },
}

/// How to reach registries (shared by `approve` and `bundle build`).
#[derive(Debug, Clone, clap::Args)]
pub struct RegistryArgs {
    /// Docker-style auth file (default: $DOCKER_CONFIG/config.json or ~/.docker/config.json).
    #[arg(long, value_name = "FILE")]
    pub authfile: Option<PathBuf>,
    /// Reach HOST over plain HTTP instead of TLS (repeatable; added to the catalog's plain_http).
    #[arg(long = "plain-http", value_name = "HOST")]
    pub plain_http: Vec<String>,
    /// Contact HOST for registry NAME (NAME=HOST, repeatable; overrides the catalog's endpoints).
    #[arg(long = "endpoint", value_name = "NAME=HOST", value_parser = parse_endpoint)]
    pub endpoints: Vec<(String, String)>,
}

fn parse_endpoint(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((n, h)) if !n.is_empty() && !h.is_empty() => Ok((n.to_owned(), h.to_owned())),
        _ => Err(format!(
            "\"{s}\" is not NAME=HOST (e.g. docker.io=mirror.corp:5000)"
        )),
    }
}

impl RegistryArgs {
    fn options(&self) -> Result<RegistryOptions, String> {
        let auth = match &self.authfile {
            Some(p) => AuthFile::load(p, true),
            None => match AuthFile::default_path() {
                Some(p) => AuthFile::load(&p, false),
                None => Ok(AuthFile::empty()),
            },
        }
        .map_err(|e| e.to_string())?;
        Ok(RegistryOptions {
            plain_http: self.plain_http.clone(),
            auth,
            concurrency: 4,
            endpoints: self.endpoints.iter().cloned().collect(),
        })
    }
}

/// Arguments of `pullgate approve`.
#[derive(Debug, clap::Args)]
pub struct ApproveArgs {
    /// The public image to approve (`docker.io/library/nginx:1.27`, or `…@sha256:…`).
    pub source: String,
    /// The catalog directory.
    #[arg(long, value_name = "DIR")]
    pub catalog: PathBuf,
    /// The scope to approve it for (`corp`, `corp/payments`, …).
    #[arg(long, value_name = "SCOPE")]
    pub scope: String,
    /// The image's licence, an SPDX expression.
    #[arg(long, value_name = "SPDX")]
    pub license: String,
    /// A scanner report (Trivy or Grype JSON) about this image; repeat for each.
    #[arg(long = "report", value_name = "FILE", required = true, num_args = 1..)]
    pub reports: Vec<PathBuf>,
    /// An approved tag of the same repository that this one replaces (deprecated now, sunset later).
    #[arg(long, value_name = "TAG")]
    pub replace: Option<String>,
    /// A platform of an index to approve (`linux/amd64`); repeat; default every platform.
    #[arg(long = "platform", value_name = "OS/ARCH")]
    pub platforms: Vec<String>,
    /// Your private key (listed in the catalog's trust file); its key id is recorded as approved_by.
    #[arg(long, value_name = "KEY", env = "PULLGATE_KEY")]
    pub key: Option<PathBuf>,
    /// Show what would happen; copy and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// Arguments of `pullgate bundle build`.
#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// The catalog directory.
    #[arg(long, value_name = "DIR")]
    pub catalog: PathBuf,
    /// The bundle now in force: the new one gets its version + 1.
    #[arg(long, value_name = "BUNDLE")]
    pub previous: Option<PathBuf>,
    /// Where to write the bundle.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// The version (default: the previous bundle's + 1, or 1).
    #[arg(long, value_name = "N")]
    pub version: Option<u64>,
    /// Bundle format: 2 (lifecycle, rules, exceptions, rollout) or 1 (for nodes that read only format 1).
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=2))]
    pub format: u32,
    /// Check that every approved image is in the private registry (concurrent HEAD requests).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub check_mirror: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("pullgate: {msg}");
    ExitCode::from(super::EXIT_FAILURE)
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// Runs a catalog subcommand.
pub fn catalog(cmd: CatalogCommand) -> ExitCode {
    match cmd {
        CatalogCommand::Init {
            dir,
            organization,
            private_registry,
            trust,
        } => match crate::admin::catalog::init(
            &dir,
            &organization,
            &private_registry,
            trust.as_deref(),
        ) {
            Ok(files) => {
                for f in files {
                    println!("wrote {}", f.display());
                }
                if trust.is_none() {
                    println!(
                        "next: list the administrators' public keys in {}",
                        dir.join("trust.toml").display()
                    );
                }
                println!("then: pullgate catalog check {}", dir.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        CatalogCommand::Check { dir } => match Catalog::load(&dir) {
            Ok(c) => {
                let versions: usize = c
                    .repositories
                    .iter()
                    .map(|r| r.content.approved.len())
                    .sum();
                println!(
                    "OK: {} ({} repositories, {versions} approved versions, {} scopes, {} exceptions, {} ignored findings)",
                    dir.display(),
                    c.repositories.len(),
                    c.scopes.len(),
                    c.exceptions.len(),
                    c.ignore.len()
                );
                ExitCode::SUCCESS
            }
            Err(problems) => {
                for p in &problems.0 {
                    eprintln!("{}/{p}", dir.display());
                }
                eprintln!(
                    "pullgate: {} problem(s) in {}",
                    problems.0.len(),
                    dir.display()
                );
                ExitCode::from(super::EXIT_FAILURE)
            }
        },
    }
}

/// `pullgate approve`.
pub fn approve(args: ApproveArgs) -> ExitCode {
    let options = match args.registry.options() {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    let req = approve::Request {
        source: args.source,
        catalog: args.catalog,
        scope: args.scope,
        license: args.license,
        reports: args.reports,
        replace: args.replace,
        platforms: args.platforms,
        key: args.key,
        dry_run: args.dry_run,
        registry: options,
        now: time::OffsetDateTime::now_utc(),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the async runtime: {e}")),
    };
    match rt.block_on(approve::approve(&req)) {
        Ok(out) => {
            for l in &out.lines {
                println!("{l}");
            }
            if req.dry_run {
                println!("DRY RUN: nothing copied, nothing written");
            } else {
                println!("APPROVED {} as {}", req.source, out.mirror);
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!(
            "approve {}: {e}\nnothing was copied and nothing was written",
            req.source
        )),
    }
}

/// `pullgate bundle build`.
pub fn build(args: BuildArgs) -> ExitCode {
    let catalog = match Catalog::load(&args.catalog) {
        Ok(c) => c,
        Err(p) => return fail(build::BuildError::Catalog(p)),
    };
    let version = match build::next_version(args.previous.as_deref(), args.version) {
        Ok(v) => v,
        Err(e) => return fail(e),
    };
    if args.check_mirror {
        let mut options = match args.registry.options() {
            Ok(o) => o,
            Err(e) => return fail(e),
        };
        approve::merge_catalog_settings(&mut options, &catalog);
        let checked = runtime().map_err(|e| e.to_string()).and_then(|rt| {
            rt.block_on(async {
                let registry = Registry::new(options).map_err(|e| e.to_string())?;
                build::check_mirror(&catalog, &registry, 32)
                    .await
                    .map_err(|e| e.to_string())
            })
        });
        match checked {
            Ok(n) => println!(
                "mirror check: all {n} approved manifests are in {}",
                catalog.header.private_registry.get_ref()
            ),
            Err(e) => return fail(format!("not building: {e}")),
        }
    }
    let bytes = build::render(
        &catalog,
        args.format,
        version,
        time::OffsetDateTime::now_utc(),
    );
    if let Err(e) = approve::write_atomically(&args.out, &bytes) {
        return fail(format!("cannot write {}: {e}", args.out.display()));
    }
    println!(
        "built bundle v{version} (format {}) from {}: {} bytes in {}; next: pullgate bundle sign --key KEY {}",
        args.format,
        args.catalog.display(),
        bytes.len(),
        args.out.display(),
        args.out.display()
    );
    if bytes.len() as u64 > crate::policy::DEFAULT_MAX_BUNDLE_SIZE {
        eprintln!(
            "warning: the bundle is {} MiB, above the {} MiB nodes accept unless configured otherwise: raise policy.max_bundle_size on the nodes before distributing it",
            bytes.len() >> 20,
            crate::policy::DEFAULT_MAX_BUNDLE_SIZE >> 20
        );
    }
    ExitCode::SUCCESS
}
