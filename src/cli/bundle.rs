//! `pullgate keygen` and `pullgate bundle sign|verify|inspect|diff`: the administrators' side of bundles.
//!
//! Argument parsing and output only; the work is done by [`crate::policy`].

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::policy::load::{self, LoadError};
use crate::policy::{self, PrivateKey, SignatureFile, parse_bundle};

/// Bundle subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum BundleCommand {
    /// Sign a bundle with a private key, adding the signature to BUNDLE.sig (administrators sign in turn).
    Sign {
        /// Private key file written by `pullgate keygen`.
        #[arg(long, value_name = "KEY")]
        key: PathBuf,
        /// Signature file (default: BUNDLE.sig).
        #[arg(long, value_name = "PATH")]
        signatures: Option<PathBuf>,
        /// The bundle file.
        bundle: PathBuf,
    },
    /// Verify a bundle's signatures (k of n), content, validity period and version.
    Verify {
        /// Trust file listing the administrators' public keys and the threshold.
        #[arg(long, value_name = "TRUST")]
        trust: PathBuf,
        /// Signature file (default: BUNDLE.sig).
        #[arg(long, value_name = "PATH")]
        signatures: Option<PathBuf>,
        /// Version of the bundle currently installed; the new one must be greater.
        #[arg(long, value_name = "N")]
        installed_version: Option<u64>,
        /// The bundle file.
        bundle: PathBuf,
    },
    /// Show a bundle's metadata, governance, mirrors and images (signatures are listed, not checked).
    Inspect {
        /// The bundle file.
        bundle: PathBuf,
    },
    /// Verify a bundle against this node's trust file and install it as the node's bundle (atomically,
    /// only if newer), then tell the running daemon to enforce it.
    Install {
        /// pullgate's configuration file (for the trust file and the state directory).
        #[arg(
            long,
            short = 'c',
            value_name = "PATH",
            default_value = "/etc/pullgate/config.toml"
        )]
        config: PathBuf,
        /// Signature file (default: BUNDLE.sig).
        #[arg(long, value_name = "PATH")]
        signatures: Option<PathBuf>,
        /// The bundle file.
        bundle: PathBuf,
    },
    /// Build the next bundle from the administrators' catalog (checks the mirror first).
    #[command(disable_version_flag = true)]
    Build(super::admin::BuildArgs),
    /// Push a signed bundle to a channel of the private registry (REGISTRY/REPOSITORY:CHANNEL) as an
    /// OCI artifact, where nodes' sync takes it from; only if it verifies and is newer than the
    /// channel's.
    Publish(super::admin::PublishArgs),
    /// Download the bundle a channel (or digest) holds into DIR (bundle.json, bundle.json.sig),
    /// every digest verified: what a node's sync would get.
    Fetch(super::admin::FetchArgs),
    /// Show what a new bundle would do to the containers running on this node: for each, its decision
    /// under the installed bundle and under NEW (exit 0: nothing running would be denied; 1: something
    /// would; 2: cannot check).
    WhatIf(super::whatif::WhatIfArgs),
    /// Show what changed between two bundles: images, tags, digests, scopes, provenance, lifecycles,
    /// rules, exceptions, rollout.
    Diff {
        /// The older bundle.
        old: PathBuf,
        /// The newer bundle.
        new: PathBuf,
    },
}

fn fail(msg: impl std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("pullgate: {msg}");
    ExitCode::from(code)
}

/// `pullgate keygen --out PREFIX`: writes PREFIX.key (mode 0600, never overwritten) and PREFIX.pub.
pub fn keygen(args: &super::KeygenArgs) -> ExitCode {
    let key = match PrivateKey::generate() {
        Ok(k) => k,
        Err(e) => {
            return fail(
                format!("cannot get randomness from the operating system: {e}"),
                super::EXIT_FAILURE,
            );
        }
    };
    let with_ext = |ext: &str| {
        let mut s = args.out.as_os_str().to_owned();
        s.push(ext);
        PathBuf::from(s)
    };
    let (priv_path, pub_path) = (with_ext(".key"), with_ext(".pub"));
    if let Err(e) = write_new(&priv_path, key.to_file_string().as_bytes(), 0o600) {
        return fail(
            format!(
                "cannot create private key {}: {e} (an existing key is never overwritten; choose another --out)",
                priv_path.display()
            ),
            super::EXIT_FAILURE,
        );
    }
    let public = key.public();
    if let Err(e) = write_new(&pub_path, format!("{public}\n").as_bytes(), 0o644) {
        return fail(
            format!("cannot create public key {}: {e}", pub_path.display()),
            super::EXIT_FAILURE,
        );
    }
    println!(
        "private key: {} (mode 0600; keep it offline)",
        priv_path.display()
    );
    println!(
        "public key:  {} (key id {})",
        pub_path.display(),
        public.id()
    );
    println!("trust file entry:\n[[keys]]\nname = \"<administrator>\"\npublic_key = \"{public}\"");
    ExitCode::SUCCESS
}

fn write_new(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// Runs a bundle subcommand.
pub fn run(cmd: BundleCommand) -> ExitCode {
    match cmd {
        BundleCommand::Sign {
            key,
            signatures,
            bundle,
        } => sign(&key, signatures.as_deref(), &bundle),
        BundleCommand::Verify {
            trust,
            signatures,
            installed_version,
            bundle,
        } => verify(&trust, signatures.as_deref(), installed_version, &bundle),
        BundleCommand::Install {
            config,
            signatures,
            bundle,
        } => crate::node::daemon::admin::install_command(&config, &bundle, signatures.as_deref()),
        BundleCommand::Inspect { bundle } => inspect(&bundle),
        BundleCommand::Diff { old, new } => diff(&old, &new),
        BundleCommand::WhatIf(args) => super::whatif::run(&args),
        BundleCommand::Build(args) => super::admin::build(args),
        BundleCommand::Publish(args) => super::admin::publish(args),
        BundleCommand::Fetch(args) => super::admin::fetch(args),
    }
}

fn load_err(e: LoadError) -> ExitCode {
    let code = match e {
        LoadError::Read { .. } => super::EXIT_FAILURE,
        _ => super::EXIT_CONFIG,
    };
    fail(e, code)
}

fn sign(key_path: &Path, signatures: Option<&Path>, bundle: &Path) -> ExitCode {
    let key_bytes = match load::read("private key", key_path) {
        Ok(b) => b,
        Err(e) => return load_err(e),
    };
    let key = match PrivateKey::parse(&String::from_utf8_lossy(&key_bytes)) {
        Ok(k) => k,
        Err(e) => return fail(format!("{}: {e}", key_path.display()), super::EXIT_CONFIG),
    };
    let bytes = match load::read("bundle", bundle) {
        Ok(b) => b,
        Err(e) => return load_err(e),
    };
    // Refuse to sign something the daemon would reject as malformed.
    if let Err(e) = parse_bundle(&bytes) {
        return fail(
            format!("{}: not signing: {e}", bundle.display()),
            super::EXIT_CONFIG,
        );
    }
    let sig_path = signatures
        .map(Path::to_owned)
        .unwrap_or_else(|| load::signature_path(bundle));
    let mut file = match load::read_signatures(&sig_path) {
        Ok(f) => f,
        Err(e) => return load_err(e),
    };
    let entry = key.sign_bundle(&bytes);
    let id = entry.key_id.clone();
    file.add(entry);
    let tmp = {
        let mut s = sig_path.as_os_str().to_owned();
        s.push(".tmp");
        PathBuf::from(s)
    };
    let written =
        std::fs::write(&tmp, file.to_json()).and_then(|()| std::fs::rename(&tmp, &sig_path));
    if let Err(e) = written {
        return fail(
            format!("cannot write signature file {}: {e}", sig_path.display()),
            super::EXIT_FAILURE,
        );
    }
    println!(
        "signed {} with key {id}; {} now holds {} signature(s)",
        bundle.display(),
        sig_path.display(),
        file.signatures.len()
    );
    ExitCode::SUCCESS
}

fn verify(
    trust: &Path,
    signatures: Option<&Path>,
    installed: Option<u64>,
    bundle: &Path,
) -> ExitCode {
    let trust = match load::read_trust(trust) {
        Ok(t) => t,
        Err(e) => return load_err(e),
    };
    match load::load_bundle(
        bundle,
        signatures,
        &trust,
        installed,
        time::OffsetDateTime::now_utc(),
    ) {
        Ok(b) => {
            println!(
                "OK: bundle {} version {} issued by {} at {}, expires {}; signed by {} ({} of {} required); {} images in {} repositories",
                bundle.display(),
                b.version,
                b.issuer,
                b.issued_at_string(),
                b.expires_at_string(),
                b.signers().join(", "),
                b.signers().len(),
                trust.threshold(),
                b.images().len(),
                b.repository_count()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!("REJECTED: {e}"), super::EXIT_FAILURE),
    }
}

fn inspect(path: &Path) -> ExitCode {
    let bytes = match load::read("bundle", path) {
        Ok(b) => b,
        Err(e) => return load_err(e),
    };
    let b = match parse_bundle(&bytes) {
        Ok(b) => b,
        Err(e) => return fail(format!("{}: {e}", path.display()), super::EXIT_CONFIG),
    };
    // A missing signature file lists no signatures; an unreadable or malformed one is reported.
    let sigs = load::read_signatures(&load::signature_path(path)).unwrap_or_else(|e| {
        eprintln!("warning: {e}; no signatures are listed");
        SignatureFile::new()
    });
    let mut out = String::new();
    use std::fmt::Write as _;
    let _ = writeln!(out, "bundle:            {}", path.display());
    let _ = writeln!(out, "format:            {}", b.format);
    let _ = writeln!(out, "version:           {}", b.version);
    let _ = writeln!(out, "issuer:            {}", b.issuer);
    let _ = writeln!(out, "issued at:         {}", b.issued_at_string());
    let _ = writeln!(out, "expires at:        {}", b.expires_at_string());
    let _ = writeln!(
        out,
        "sha256:            {}",
        policy::Digest::sha256_of(&bytes)
    );
    let ids: Vec<&str> = sigs.signatures.iter().map(|s| s.key_id.as_str()).collect();
    let _ = writeln!(
        out,
        "signatures:        {} (key ids: {}; not verified here, use `bundle verify`)",
        ids.len(),
        ids.join(", ")
    );
    let _ = writeln!(out, "private registry:  {}", b.private_registry);
    let _ = writeln!(out, "mirrors:");
    for m in b.mirrors() {
        let _ = writeln!(
            out,
            "  {} -> {}/{}",
            m.source(),
            b.private_registry,
            m.target_path
        );
    }
    let scopes = b.scopes();
    let _ = writeln!(
        out,
        "governance:        organisation {}, application label {}",
        scopes.organization(),
        scopes.application_label()
    );
    for n in scopes.nodes() {
        let _ = writeln!(out, "  scope {} (mode {})", n.path, n.mode);
        if let Some(r) = &n.rules {
            let _ = writeln!(out, "    rules: {}", r.summary());
        }
    }
    for (ns, scope) in scopes.namespace_bindings() {
        let _ = writeln!(out, "  namespace {ns} -> {scope}");
    }
    let _ = writeln!(out, "first-party prefixes:");
    for f in b.first_party() {
        let _ = writeln!(
            out,
            "  {}/{}/ for {}{}",
            b.private_registry,
            f.path,
            f.scope_path,
            if f.require_digest {
                " (digest required)"
            } else {
                ""
            }
        );
    }
    let _ = writeln!(
        out,
        "images:            {} entries, {} repositories",
        b.images().len(),
        b.repository_count()
    );
    for e in b.images() {
        let tags: Vec<String> = e.tags().iter().map(|(t, d)| format!("{t}={d}")).collect();
        let p = e.provenance();
        let scans: Vec<String> = p
            .scans
            .iter()
            .map(|s| format!("{} {} worst {}", s.scanner, s.version, s.worst_severity))
            .collect();
        let _ = writeln!(out, "  {} for {}", e.source(), e.scope_path());
        if !tags.is_empty() {
            let _ = writeln!(out, "    tags:     {}", tags.join(", "));
        }
        for d in e.digests() {
            let _ = writeln!(out, "    digest:   {d}");
        }
        for (tag, d, l) in e.lifecycles() {
            let what = tag.map_or_else(|| d.to_string(), |t| format!("tag {t}"));
            let _ = writeln!(out, "    lifecycle {what}: {}", l.summary());
        }
        let _ = writeln!(
            out,
            "    licence {}; scans: {}; approved by {} at {}",
            p.license,
            scans.join("; "),
            p.approved_by,
            policy::bundle::format_unix(p.approved_at)
        );
    }
    if !b.exceptions().is_empty() {
        let _ = writeln!(out, "exceptions:        {}", b.exceptions().len());
        for x in b.exceptions() {
            let _ = writeln!(out, "  {}", x.summary());
        }
    }
    if let Some(steps) = b.rollout() {
        let steps: Vec<String> = steps
            .iter()
            .map(|s| {
                format!(
                    "{}% after {}",
                    s.percent,
                    humantime::format_duration(s.after)
                )
            })
            .collect();
        let _ = writeln!(out, "rollout:           {}", steps.join(", "));
    }
    print!("{out}");
    ExitCode::SUCCESS
}

fn diff(old: &Path, new: &Path) -> ExitCode {
    let parse = |p: &Path| -> Result<policy::Bundle, ExitCode> {
        let bytes = load::read("bundle", p).map_err(load_err)?;
        parse_bundle(&bytes).map_err(|e| fail(format!("{}: {e}", p.display()), super::EXIT_CONFIG))
    };
    let (a, b) = match (parse(old), parse(new)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(c), _) | (_, Err(c)) => return c,
    };
    let lines = policy::diff::diff(&a, &b);
    if lines.is_empty() {
        println!(
            "no policy changes between {} and {}",
            old.display(),
            new.display()
        );
    }
    for l in lines {
        println!("{l}");
    }
    ExitCode::SUCCESS
}
