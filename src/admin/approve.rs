//! `pullgate approve`: the one command that adds an image to the catalog, and refuses what should be
//! refused.
//!
//! The steps, in order (each refusal names the rule that failed and what to do; nothing is copied and
//! nothing is written unless every check passed):
//!
//! 1. **Resolve** the source reference in its registry (manifest by tag or digest, OCI or Docker media
//!    types, digest computed from the bytes and compared with `Docker-Content-Digest`). For an index,
//!    the index digest is approved and its platforms are recorded (all of them, or the `--platform`s).
//! 2. **Scanner reports** (Trivy, Grype), each bound to this image (index, or a platform's manifest or
//!    config digest), younger than the scope's `max_report_age`; worst severity after the catalog's
//!    ignore list (expired ignores no longer apply). Every platform must be covered by at least
//!    `min_scanners` distinct scanners, and the scans must meet the scope's rule exactly as a node checks
//!    it ([`crate::policy::rules::Rules::check`]: no scan above `max_severity`, enough distinct scanners).
//! 3. **Licence**: the SPDX expression against the scope's allow/deny rule (same check).
//! 4. **Versions**: at most `max_versions` approved (not deprecated) tags of the repository for the
//!    scope, unless `--replace TAG`, which deprecates TAG now and sunsets it after `sunset_after` with the
//!    new tag as its replacement.
//! 5. **Mirror** by digest into the private registry's mirror location ([`crate::registry::copy`]).
//! 6. **Record** the entry with its provenance in `images/<source>.toml` (appended; the replaced tag's
//!    lifecycle inserted in place), written atomically.
//!
//! `--key` proves the administrator holds a key of the catalog's trust file; its key id is recorded
//! as `approved_by`.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use time::OffsetDateTime;

use super::catalog::{self, Catalog, NewScan, NewVersion, Problems};
use super::reports::{Report, Scanner};
use crate::policy::bundle::{Provenance, Scan};
use crate::policy::license::LicenseExpression;
use crate::policy::{Digest, PrivateKey, Reference};
use crate::registry::{self, CopyReport, ManifestKind, Registry, RegistryError, RegistryOptions};

/// How far in the future a report's time may be (clock skew).
const REPORT_SKEW: time::Duration = time::Duration::minutes(5);

/// What `approve` is asked to do.
#[derive(Debug, Clone)]
pub struct Request {
    /// The public image (`docker.io/library/nginx:1.27`, or by digest).
    pub source: String,
    /// The catalog directory.
    pub catalog: PathBuf,
    /// The scope to approve it for.
    pub scope: String,
    /// Its SPDX licence expression.
    pub license: String,
    /// Scanner report files.
    pub reports: Vec<PathBuf>,
    /// A tag of the same repository that the new one replaces.
    pub replace: Option<String>,
    /// Platforms of an index to approve (`os/arch[/variant]`); empty: every platform.
    pub platforms: Vec<String>,
    /// The administrator's private key.
    pub key: Option<PathBuf>,
    /// Only show what would happen.
    pub dry_run: bool,
    /// Credentials and extra plain-HTTP registries (the catalog's `plain_http` is added).
    pub registry: RegistryOptions,
    /// The clock.
    pub now: OffsetDateTime,
}

/// Why `approve` refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ApproveError {
    /// The catalog does not load.
    #[error(
        "the catalog has problems; fix them first (`pullgate catalog check DIR` lists them):\n{0}"
    )]
    Catalog(Problems),
    /// A rule refused the image.
    #[error("refused by rule `{rule}`: {message}")]
    Refused {
        /// The rule (stable name, listed in docs/catalog.md).
        rule: &'static str,
        /// What failed and what to do.
        message: String,
    },
    /// The registry failed (resolve or copy).
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The catalog could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn refuse(rule: &'static str, message: impl Into<String>) -> ApproveError {
    ApproveError::Refused {
        rule,
        message: message.into(),
    }
}

/// What `approve` did (or, with `--dry-run`, would do).
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The approved digest.
    pub digest: Digest,
    /// Where the copy lives: `registry/path@digest`.
    pub mirror: String,
    /// What the copy did (None on a dry run).
    pub copy: Option<CopyReport>,
    /// The catalog file written (or to be written).
    pub file: PathBuf,
    /// One line per check and action, for the command's output.
    pub lines: Vec<String>,
}

/// One thing a report must cover: the whole image, or one platform of an index.
struct Target {
    label: String,
    manifest: Digest,
    config: Option<Digest>,
}

/// Runs `approve`.
pub async fn approve(req: &Request) -> Result<Outcome, ApproveError> {
    approve_with(req, &|_| ControlFlow::Continue(())).await
}

/// [`approve`] with a callback on every copy step (tests stop a copy half-way with it).
pub async fn approve_with(
    req: &Request,
    on_copy: &(dyn Fn(&registry::CopyEvent) -> ControlFlow<()> + Sync),
) -> Result<Outcome, ApproveError> {
    let mut lines = Vec::new();
    let catalog = Catalog::load(&req.catalog).map_err(ApproveError::Catalog)?;
    let rules = catalog.rules(&req.scope).ok_or_else(|| {
        let known: Vec<&str> = catalog.scopes.keys().map(String::as_str).collect();
        refuse(
            "scope",
            format!(
                "scope {} is not in governance.toml (known: {}); add it there first",
                req.scope,
                known.join(", ")
            ),
        )
    })?;

    // The source, and where its copy goes.
    let source = Reference::parse(&req.source).map_err(|e| refuse("source", e.to_string()))?;
    let private = catalog.header.private_registry.get_ref().clone();
    if source.domain() == private {
        return Err(refuse(
            "source",
            format!(
                "{source} is in the private registry; approve images from their public source, list first-party images under first_party"
            ),
        ));
    }
    let mirror_path = catalog.mirror_path(&source).ok_or_else(|| {
        refuse(
            "source",
            format!(
                "no mirror in catalog.toml covers {}; add a [[mirrors]] entry for it",
                source.domain()
            ),
        )
    })?;
    let repo_name = source.name().to_owned();
    let tag = explicit_tag(&req.source, &source);

    // Who approves.
    let approved_by = match &req.key {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| refuse("key", format!("cannot read {}: {e}", path.display())))?;
            let key = PrivateKey::parse(text.trim())
                .map_err(|e| refuse("key", format!("{}: {e}", path.display())))?;
            let public = key.public();
            let id = public.id().to_owned();
            let trusted = catalog.trust.keys().iter().find(|k| k.key.id() == id).ok_or_else(|| {
                refuse(
                    "key",
                    format!(
                        "key {id} ({}) is not in the catalog's trust file {}; only the administrators listed there may approve images",
                        path.display(),
                        catalog.header.trust.get_ref()
                    ),
                )
            })?;
            lines.push(format!("administrator: {} (key {id})", trusted.name));
            id
        }
        None if req.dry_run => "(dry run: no --key)".to_owned(),
        None => {
            return Err(refuse(
                "key",
                "give --key KEY (your private key, listed in the catalog's trust file): it proves you may approve and is recorded as approved_by",
            ));
        }
    };

    let license = LicenseExpression::parse(&req.license)
        .map_err(|e| refuse("license", format!("\"{}\": {e}", req.license)))?;

    // Tags already approved.
    let repo = catalog.repository(&repo_name);
    if let (Some(t), Some(repo)) = (&tag, repo) {
        for v in &repo.content.approved {
            if v.tag.as_ref().is_some_and(|x| x.get_ref() == t) && v.scope.get_ref() == &req.scope {
                return Err(refuse(
                    "versions",
                    format!(
                        "{repo_name}:{t} is already approved for {} ({}, {})",
                        req.scope,
                        v.digest.get_ref(),
                        repo.file.display()
                    ),
                ));
            }
        }
    }

    // 1. Resolve.
    let mut options = req.registry.clone();
    merge_catalog_settings(&mut options, &catalog);
    let registry = Registry::new(options)?;
    let manifest = registry.resolve(&source).await?;
    let digest = manifest.digest.clone();
    lines.push(format!(
        "resolved {source} → {digest} ({})",
        manifest.media_type
    ));
    if let (Some(t), Some(repo)) = (&tag, repo) {
        if let Some(v) = repo.content.approved.iter().find(|v| {
            v.tag.as_ref().is_some_and(|x| x.get_ref() == t)
                && v.digest.get_ref() != &digest.to_string()
        }) {
            return Err(refuse(
                "versions",
                format!(
                    "{repo_name}:{t} is approved as {} (scope {}) but the registry now serves {digest} for it; a tag means one digest — approve the new content under a new tag",
                    v.digest.get_ref(),
                    v.scope.get_ref()
                ),
            ));
        }
    }
    // A digest is approved in a scope either without a tag or through tags, never both, and without
    // a tag once.
    if let Some(repo) = repo {
        let digest_text = digest.to_string();
        let same = repo
            .content
            .approved
            .iter()
            .filter(|v| v.scope.get_ref() == &req.scope && v.digest.get_ref() == &digest_text);
        for v in same {
            let (was, hint) = match (&tag, &v.tag) {
                (Some(_), Some(_)) => continue,
                (None, None) => ("without a tag".to_owned(), "nothing to do".to_owned()),
                (None, Some(t)) => (
                    format!("as tag {}", t.get_ref()),
                    "a digest is approved without a tag or through tags, not both".to_owned(),
                ),
                (Some(t), None) => (
                    "without a tag".to_owned(),
                    format!(
                        "to approve it as tag {t}, remove that entry first (a digest is approved without a tag or through tags, not both)"
                    ),
                ),
            };
            return Err(refuse(
                "versions",
                format!(
                    "{repo_name}@{digest} is already approved for {} {was} ({}); {hint}",
                    req.scope,
                    repo.file.display()
                ),
            ));
        }
    }
    let mut targets = Vec::new();
    let mut platforms = Vec::new();
    match &manifest.kind {
        ManifestKind::Image { config, .. } => targets.push(Target {
            label: "the image".into(),
            manifest: digest.clone(),
            config: Some(config.digest.clone()),
        }),
        ManifestKind::Index { manifests } => {
            let listed: Vec<(String, Digest)> = manifests
                .iter()
                .filter_map(|m| {
                    m.platform
                        .as_ref()
                        .map(|p| (p.to_string(), m.digest.clone()))
                })
                .filter(|(p, _)| p != "unknown/unknown")
                .collect();
            let wanted: Vec<String> = if req.platforms.is_empty() {
                listed.iter().map(|(p, _)| p.clone()).collect()
            } else {
                req.platforms.clone()
            };
            for p in &wanted {
                let Some((_, d)) = listed.iter().find(|(l, _)| l == p) else {
                    let all: Vec<&str> = listed.iter().map(|(l, _)| l.as_str()).collect();
                    return Err(refuse(
                        "platforms",
                        format!("{source} has no platform {p} (it has {})", all.join(", ")),
                    ));
                };
                let child = registry
                    .resolve(&source.with_digest_only(d.clone()))
                    .await?;
                let config = match &child.kind {
                    ManifestKind::Image { config, .. } => Some(config.digest.clone()),
                    ManifestKind::Index { .. } => None,
                };
                targets.push(Target {
                    label: format!("platform {p}"),
                    manifest: d.clone(),
                    config,
                });
                platforms.push(p.clone());
            }
            if targets.is_empty() {
                return Err(refuse(
                    "platforms",
                    format!("{source} is an index without platform entries"),
                ));
            }
            lines.push(format!("index with platforms {}", platforms.join(", ")));
        }
    }

    // 2. Reports.
    let mut parsed = Vec::new();
    for path in &req.reports {
        parsed.push(Report::read(path).map_err(|e| refuse("reports", e.to_string()))?);
    }
    if parsed.is_empty() {
        return Err(refuse(
            "reports",
            "give --report FILE for each scanner report (Trivy and Grype JSON)",
        ));
    }
    let max_age = time::Duration::try_from(rules.max_report_age).unwrap_or(time::Duration::MAX);
    let mut coverage: BTreeMap<&str, BTreeSet<Scanner>> = targets
        .iter()
        .map(|t| (t.label.as_str(), BTreeSet::new()))
        .collect();
    let mut scans = Vec::new();
    for r in &parsed {
        let covered: Vec<&Target> = if r.manifest_digests.contains(&digest) {
            targets.iter().collect()
        } else {
            targets
                .iter()
                .filter(|t| r.names(&t.manifest, t.config.as_ref()))
                .collect()
        };
        if covered.is_empty() {
            return Err(refuse(
                "reports.bound",
                format!(
                    "{} ({}) is about {}, not about {source} ({digest}{}); scan this image and give that report",
                    r.path.display(),
                    r.scanner.name(),
                    r.named(),
                    if targets.len() > 1 {
                        " or one of its platforms' manifests"
                    } else {
                        ""
                    }
                ),
            ));
        }
        let Some(created) = r.created_at else {
            return Err(refuse(
                "reports.age",
                format!(
                    "{} does not say when it was made; its age cannot be checked",
                    r.path.display()
                ),
            ));
        };
        if created > req.now + REPORT_SKEW {
            return Err(refuse(
                "reports.age",
                format!(
                    "{} is dated {}, in the future; check the scanner host's clock",
                    r.path.display(),
                    catalog::rfc3339(created)
                ),
            ));
        }
        if req.now - created > max_age {
            return Err(refuse(
                "reports.age",
                format!(
                    "{} was made at {}, older than max_report_age {} for {}; scan the image again",
                    r.path.display(),
                    catalog::rfc3339(created),
                    humantime::format_duration(rules.max_report_age),
                    req.scope
                ),
            ));
        }
        for t in &covered {
            coverage
                .entry(t.label.as_str())
                .or_default()
                .insert(r.scanner);
        }
        let mut ignored = Vec::new();
        let worst = r.worst_severity(|f| {
            let hit = catalog
                .ignored(req.now, r.scanner.name(), &f.id, &f.package)
                .is_some();
            if hit {
                ignored.push(f.id.clone());
            }
            hit
        });
        ignored.sort();
        ignored.dedup();
        lines.push(format!(
            "report {} ({} {}, {}): worst severity {worst}{}",
            r.path.display(),
            r.scanner.name(),
            r.version,
            covered
                .iter()
                .map(|t| t.label.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            if ignored.is_empty() {
                String::new()
            } else {
                format!(" after ignoring {}", ignored.join(", "))
            }
        ));
        scans.push(NewScan {
            scanner: r.scanner.name().into(),
            version: r.version.as_str().into(),
            report: r.sha256.clone(),
            worst_severity: worst,
            scanned_at: created,
        });
    }
    let need = rules.bundle.min_scanners.value;
    for (label, scanners) in &coverage {
        if (scanners.len() as u32) < need {
            let names: Vec<&str> = scanners.iter().map(|s| s.name()).collect();
            return Err(refuse(
                "scanners",
                format!(
                    "{label} of {source} is covered by {} distinct scanner(s) ({}) but {} requires {need} (min_scanners, set by {}); add reports from other scanners",
                    names.len(),
                    if names.is_empty() {
                        "none".to_owned()
                    } else {
                        names.join(", ")
                    },
                    req.scope,
                    rules.bundle.min_scanners.from
                ),
            ));
        }
    }

    // 2 and 3: the node's own check of severity, scanners and licence.
    let provenance = Provenance {
        license: req.license.as_str().into(),
        scans: scans
            .iter()
            .map(|s| Scan {
                scanner: s.scanner.clone(),
                version: s.version.clone(),
                report: s.report.clone(),
                worst_severity: s.worst_severity,
            })
            .collect(),
        approved_by: approved_by.as_str().into(),
        approved_at: req.now.unix_timestamp(),
    };
    if let Err(v) = rules.bundle.check(&provenance, Some(&license)) {
        use crate::policy::rules::Violation;
        let (rule, hint) = match &v {
            Violation::Severity { .. } => (
                "severity",
                "fix the image, or add a reasoned, expiring entry to ignore.toml for a finding that does not apply",
            ),
            Violation::Scanners { .. } => ("scanners", "add reports from other scanners"),
            Violation::License { .. } => (
                "license",
                "this scope may not run it; ask for an exception or choose another image",
            ),
        };
        return Err(refuse(
            rule,
            format!("{source} for {}: {v}; {hint}", req.scope),
        ));
    }
    lines.push(format!(
        "rules of {}: {}",
        req.scope,
        rules.bundle.summary()
    ));

    // 4. Versions.
    let active: Vec<&str> = repo
        .map(|r| {
            r.content
                .approved
                .iter()
                .filter(|v| {
                    v.scope.get_ref() == &req.scope
                        && v.deprecated_at.is_none()
                        && v.sunset_at.is_none()
                })
                .filter_map(|v| v.tag.as_ref().map(|t| t.get_ref().as_str()))
                .collect()
        })
        .unwrap_or_default();
    let file_rel = repo
        .map(|r| r.file.clone())
        .unwrap_or_else(|| catalog::repository_path(&repo_name));
    let mut base_text = repo.map(|r| r.text.clone());
    match (&req.replace, &tag) {
        (Some(_), None) => {
            return Err(refuse(
                "replace",
                "--replace needs a new tag: approve SOURCE:TAG, not a bare digest",
            ));
        }
        (Some(old), Some(new)) => {
            let Some(repo) = repo else {
                return Err(refuse(
                    "replace",
                    format!("{repo_name} has no approved tags; nothing to replace"),
                ));
            };
            let sunset = req.now
                + time::Duration::try_from(rules.sunset_after).unwrap_or(time::Duration::MAX);
            let text = catalog::insert_lifecycle(repo, old, &req.scope, req.now, sunset, new)
                .map_err(|e| refuse("replace", e))?;
            lines.push(format!(
                "{repo_name}:{old} deprecated now, sunset at {}, replacement {new}",
                catalog::rfc3339(sunset)
            ));
            base_text = Some(text);
        }
        (None, Some(_)) if active.len() as u32 >= rules.max_versions => {
            return Err(refuse(
                "versions",
                format!(
                    "{repo_name} already has {} approved tags for {} ({}), the maximum (max_versions {}); retire one with --replace TAG",
                    active.len(),
                    req.scope,
                    active.join(", "),
                    rules.max_versions
                ),
            ));
        }
        _ => {}
    }

    let new = NewVersion {
        scope: req.scope.clone(),
        tag: tag.clone(),
        digest: digest.clone(),
        platforms,
        license: req.license.clone(),
        approved_by,
        approved_at: req.now,
        scans,
    };
    let text = match base_text {
        Some(mut t) => {
            if !t.ends_with('\n') {
                t.push('\n');
            }
            t + &catalog::render_version(&new)
        }
        None => catalog::render_repository(&repo_name, &new),
    };
    // The edit must leave a file that parses.
    toml::from_str::<catalog::RepositoryFile>(&text).map_err(|e| {
        refuse(
            "catalog",
            format!("the edited {} would not parse: {e}", file_rel.display()),
        )
    })?;

    let mirror = format!("{private}/{mirror_path}@{digest}");
    let file = catalog.dir.join(&file_rel);
    if req.dry_run {
        lines.push(format!("would copy {source} to {mirror}"));
        lines.push(format!("would write {}", file.display()));
        return Ok(Outcome {
            digest,
            mirror,
            copy: None,
            file,
            lines,
        });
    }

    // 5. Mirror.
    let copy_source = source.with_digest_only(digest.clone());
    let report = registry::copy(&registry, &copy_source, &private, &mirror_path, on_copy).await?;
    lines.push(format!(
        "mirrored to {mirror}: {} blobs copied ({} bytes), {} mounted, {} already there; {} manifests pushed, {} already there",
        report.blobs_copied, report.bytes_copied, report.blobs_mounted, report.blobs_present, report.manifests_pushed, report.manifests_present
    ));

    // 6. Record.
    write_atomically(&file, text.as_bytes()).map_err(|source| ApproveError::Write {
        path: file.clone(),
        source,
    })?;
    lines.push(format!("recorded in {}", file.display()));
    Ok(Outcome {
        digest,
        mirror,
        copy: Some(report),
        file,
        lines,
    })
}

/// Adds the catalog's `plain_http` and `endpoints` to `options` (command-line settings win).
pub fn merge_catalog_settings(options: &mut RegistryOptions, catalog: &Catalog) {
    for h in &catalog.header.plain_http {
        if !options.plain_http.contains(h) {
            options.plain_http.push(h.clone());
        }
    }
    for (name, host) in &catalog.header.endpoints {
        options
            .endpoints
            .entry(name.clone())
            .or_insert_with(|| host.clone());
    }
}

/// The tag an approval records: the one written, or `latest` when neither tag nor digest is written;
/// none for a reference by digest only.
fn explicit_tag(written: &str, parsed: &Reference) -> Option<String> {
    let last = written.rsplit('/').next().unwrap_or(written);
    let name_and_tag = last.split('@').next().unwrap_or(last);
    if parsed.digest().is_some() && !name_and_tag.contains(':') {
        return None;
    }
    parsed.tag().map(str::to_owned)
}

/// Writes `data` to `path` through a temporary file in the same directory and a rename.
pub fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
