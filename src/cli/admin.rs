//! `pullgate catalog init|check`, `pullgate approve`, `pullgate bundle build|publish|fetch`: the
//! administrators' commands. Argument parsing and output only; the work is done by [`crate::admin`]
//! (and, for `fetch`, by the node's sync client, so it gets exactly what a node would).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::admin::{approve, build, catalog::Catalog, publish};
use crate::registry::{AuthFile, FetchOptions, Fetcher, Registry, RegistryOptions};

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

/// Arguments of `pullgate bundle publish`.
#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    /// The signed bundle file.
    pub bundle: PathBuf,
    /// The channel: REGISTRY/REPOSITORY:CHANNEL, e.g. registry.corp/pullgate/bundles:prod.
    #[arg(long, value_name = "REF")]
    pub to: String,
    /// The administrators' trust file the bundle must verify against.
    #[arg(long, value_name = "TRUST")]
    pub trust: PathBuf,
    /// Signature file (default: BUNDLE.sig).
    #[arg(long, value_name = "PATH")]
    pub signatures: Option<PathBuf>,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// Arguments of `pullgate bundle fetch`.
#[derive(Debug, clap::Args)]
pub struct FetchArgs {
    /// The channel (REGISTRY/REPOSITORY:CHANNEL) or one artifact (REGISTRY/REPOSITORY@sha256:…).
    pub reference: String,
    /// The directory to write bundle.json and bundle.json.sig into (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// PEM file of CA certificates to trust besides the system's.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// The largest artifact to download (bundle and signatures), e.g. 64MiB.
    #[arg(long, value_name = "SIZE", default_value = "256MiB", value_parser = parse_size)]
    pub max_size: u64,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        _ => return Err(format!("\"{s}\" is not a size such as 64MiB")),
    };
    n.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("\"{s}\" is not a size such as 64MiB"))
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

/// `pullgate bundle publish`.
pub fn publish(args: PublishArgs) -> ExitCode {
    let options = match args.registry.options() {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    let read = |what, path: &std::path::Path| {
        crate::policy::load::read(what, path).map_err(|e| e.to_string())
    };
    let sig_path = args
        .signatures
        .clone()
        .unwrap_or_else(|| crate::policy::load::signature_path(&args.bundle));
    let inputs = read("bundle", &args.bundle).and_then(|b| {
        let s = read("signature file", &sig_path)?;
        let t = crate::policy::load::read_trust(&args.trust).map_err(|e| e.to_string())?;
        Ok((b, s, t))
    });
    let (bundle, sigs, trust) = match inputs {
        Ok(x) => x,
        Err(e) => return fail(e),
    };
    let published = runtime().map_err(|e| e.to_string()).and_then(|rt| {
        rt.block_on(async {
            let registry = Registry::new(options).map_err(|e| e.to_string())?;
            publish::publish(
                &registry,
                &bundle,
                &sigs,
                &trust,
                &args.to,
                time::OffsetDateTime::now_utc(),
            )
            .await
            .map_err(|e| e.to_string())
        })
    });
    match published {
        Ok(p) if p.unchanged => {
            println!(
                "{} already holds bundle v{} ({}); nothing pushed",
                p.channel, p.version, p.digest
            );
            ExitCode::SUCCESS
        }
        Ok(p) => {
            println!(
                "published bundle v{} to {} ({}; {} blob(s) uploaded){}",
                p.version,
                p.channel,
                p.digest,
                p.blobs_pushed,
                p.previous
                    .map(|v| format!("; the channel held v{v}"))
                    .unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!("bundle publish {}: {e}", args.bundle.display())),
    }
}

/// `pullgate bundle fetch`.
pub fn fetch(args: FetchArgs) -> ExitCode {
    let Some(reference) = crate::policy::artifact::parse_channel(&args.reference) else {
        return fail(format!(
            "bundle fetch {}: name a channel as REGISTRY/REPOSITORY:CHANNEL (or REGISTRY/REPOSITORY@sha256:…)",
            args.reference
        ));
    };
    let options = match args.registry.options() {
        Ok(o) => FetchOptions {
            plain_http: o.plain_http,
            auth: o.auth,
            endpoints: o.endpoints,
            ca_file: args.ca_file.clone(),
            timeout: std::time::Duration::from_secs(300),
        },
        Err(e) => return fail(e),
    };
    let fetched = runtime().map_err(|e| e.to_string()).and_then(|rt| {
        rt.block_on(async {
            let fetcher = Fetcher::new(options, Default::default()).map_err(|e| e.to_string())?;
            crate::node::sync::fetch_bundle(&fetcher, &reference, args.max_size)
                .await
                .map_err(|e| e.to_string())
        })
    });
    let f = match fetched {
        Ok(f) => f,
        Err(e) => return fail(format!("bundle fetch {}: {e}", args.reference)),
    };
    if let Err(e) = std::fs::create_dir_all(&args.out) {
        return fail(format!("cannot create {}: {e}", args.out.display()));
    }
    let (b, s) = (
        args.out.join("bundle.json"),
        args.out.join("bundle.json.sig"),
    );
    for (path, bytes) in [(&s, &f.signatures), (&b, &f.bundle)] {
        if let Err(e) = approve::write_atomically(path, bytes) {
            return fail(format!("cannot write {}: {e}", path.display()));
        }
    }
    println!(
        "fetched {}@{} (bundle v{}, issued by {}): {} ({} bytes) and {}",
        reference.name(),
        f.digest,
        f.artifact
            .claimed_version()
            .map_or("?".to_owned(), |v| v.to_string()),
        f.artifact
            .annotations
            .get(crate::policy::artifact::ANNOTATION_ISSUER)
            .map_or("?", String::as_str),
        b.display(),
        f.bundle.len(),
        s.display()
    );
    println!(
        "every digest was verified; verify the signatures with: pullgate bundle verify --trust TRUST {}",
        b.display()
    );
    ExitCode::SUCCESS
}
