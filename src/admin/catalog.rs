//! The catalog: the administrators' source of truth, a directory of TOML files kept in version control,
//! from which every bundle is built. Format reference: `docs/catalog.md`.
//!
//! ```text
//! catalog.toml      bundle header: issuer, private registry, validity, mirrors, first-party, rollout, trust
//! governance.toml   organisation → programs → projects, modes, scan/licence/version rules per level
//! images/**.toml    approved images, one file per repository (`images/docker.io/library/nginx.toml`)
//! exceptions.toml   break-glass exceptions
//! ignore.toml       scanner findings to ignore (id, reason, expiry)
//! trust.toml        the administrators' keys (approve --key must be one of them)
//! ```
//!
//! Parsing is strict (`deny_unknown_fields`) and every problem names the file, the line and the key.
//! [`Catalog::load`] reads and parses every file and collects *all* problems (syntax and cross-file:
//! scopes exist, a tag means one digest, replacements exist, …) into [`Problems`], so `catalog check`
//! can list them at once. [`init`] writes a commented starting catalog; [`render_version`] and
//! [`insert_lifecycle`] are the text edits `approve` makes (appending keeps comments and review
//! diffs small).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use toml::Spanned;

use crate::policy::license::LicenseExpression;
use crate::policy::reference::{self, Reference};
use crate::policy::rules::Rules;
use crate::policy::{Digest, Mode, Severity, Trust};

/// The catalog's main file.
pub const CATALOG_FILE: &str = "catalog.toml";
/// The governance file.
pub const GOVERNANCE_FILE: &str = "governance.toml";
/// The exceptions file.
pub const EXCEPTIONS_FILE: &str = "exceptions.toml";
/// The ignore list.
pub const IGNORE_FILE: &str = "ignore.toml";
/// The directory of approved images.
pub const IMAGES_DIR: &str = "images";

/// Defaults of the administrators' rules (not part of the bundle).
pub const DEFAULT_MAX_VERSIONS: u32 = 3;
/// Default `sunset_after`.
pub const DEFAULT_SUNSET_AFTER: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);
/// Default `max_report_age`.
pub const DEFAULT_MAX_REPORT_AGE: std::time::Duration = std::time::Duration::from_secs(7 * 86_400);

// ---------------------------------------------------------------------------------------------------
// Problems: every error names file, line and key.

/// One problem in the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file, relative to the catalog directory.
    pub file: PathBuf,
    /// 1-based line (0 when the problem concerns the whole file).
    pub line: usize,
    /// The key (dotted path) the problem is about, or empty.
    pub key: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl Problem {
    /// A problem about the whole of `file` (no line, no key).
    fn whole_file(file: impl Into<PathBuf>, message: String) -> Problem {
        Problem {
            file: file.into(),
            line: 0,
            key: String::new(),
            message,
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in a catalog.
#[derive(Debug, Clone, Default, PartialEq, Eq, thiserror::Error)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// A source file's text, for turning byte spans into lines.
struct Source<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    fn line(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .bytes()
            .filter(|&b| b == b'\n')
            .count()
            + 1
    }
    fn at(
        &self,
        span: &std::ops::Range<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> Problem {
        Problem {
            file: self.file.to_owned(),
            line: self.line(span.start),
            key: key.into(),
            message: message.into(),
        }
    }
}

fn parse_toml<T: serde::de::DeserializeOwned>(file: &Path, text: &str) -> Result<T, Problem> {
    toml::from_str(text).map_err(|e| {
        let src = Source { file, text };
        let line = e.span().map(|s| src.line(s.start)).unwrap_or(0);
        let msg = e.message().trim().to_owned();
        // serde names the key in its message ("unknown field `x`", "missing field `y`"); keep it whole.
        Problem {
            file: file.to_owned(),
            line,
            key: String::new(),
            message: format!("{msg}; see docs/catalog.md"),
        }
    })
}

// ---------------------------------------------------------------------------------------------------
// Value types read from TOML.

/// A TOML offset date-time (`2026-01-01T00:00:00Z`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Time(pub OffsetDateTime);

impl<'de> Deserialize<'de> for Time {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Time, D::Error> {
        Time::from_toml(toml::value::Datetime::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl Time {
    /// The time of a TOML date-time, which must be a full one with an offset.
    fn from_toml(dt: toml::value::Datetime) -> Result<Time, String> {
        let (Some(date), Some(clock), Some(offset)) = (dt.date, dt.time, dt.offset) else {
            return Err(format!(
                "{dt} is not a full date-time with an offset; write e.g. 2026-01-01T00:00:00Z"
            ));
        };
        // Built from the parsed parts (a catalog has three times per approval: formatting each one
        // and parsing it again cost a tenth of a large catalog's load); a leap second goes through
        // the RFC 3339 parser, which knows what to do with it.
        let minutes = match offset {
            toml::value::Offset::Z => 0,
            toml::value::Offset::Custom { minutes } => i32::from(minutes),
        };
        let direct = (clock.second < 60)
            .then(|| {
                let month = time::Month::try_from(date.month).ok()?;
                let d =
                    time::Date::from_calendar_date(i32::from(date.year), month, date.day).ok()?;
                let t = time::Time::from_hms_nano(
                    clock.hour,
                    clock.minute,
                    clock.second,
                    clock.nanosecond,
                )
                .ok()?;
                let o = time::UtcOffset::from_whole_seconds(minutes * 60).ok()?;
                Some(d.with_time(t).assume_offset(o))
            })
            .flatten();
        match direct {
            Some(t) => Ok(Time(t)),
            None => OffsetDateTime::parse(&dt.to_string(), &Rfc3339)
                .map(Time)
                .map_err(|e| format!("{dt}: {e}")),
        }
    }
}

impl fmt::Display for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&rfc3339(self.0))
    }
}

/// RFC 3339 in UTC with whole seconds, as catalog and bundle write times.
pub fn rfc3339(t: OffsetDateTime) -> String {
    let t = t
        .to_offset(time::UtcOffset::UTC)
        .replace_nanosecond(0)
        .unwrap_or(t);
    // Written directly: a bundle build formats one or more times per approval.
    if (0..=9999).contains(&t.year()) {
        let mut s = String::with_capacity(20);
        let _ = write!(
            s,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        );
        return s;
    }
    t.format(&Rfc3339).unwrap_or_default()
}

/// A duration written as humantime text (`30d`, `12h`, `90m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Duration(pub std::time::Duration);

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map(Duration).map_err(|e| {
            serde::de::Error::custom(format!(
                "\"{s}\" is not a duration ({e}); write e.g. \"30d\", \"12h\""
            ))
        })
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

// ---------------------------------------------------------------------------------------------------
// catalog.toml

/// `catalog.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// Who issues the bundles.
    pub issuer: String,
    /// The private registry host (and port).
    pub private_registry: Spanned<String>,
    /// How long a bundle is valid after it is issued.
    pub validity: Duration,
    /// Registries reached over plain HTTP (test registries on loopback only).
    #[serde(default)]
    pub plain_http: Vec<String>,
    /// Registry name → the host actually contacted for it (an internal mirror of a public registry).
    #[serde(default)]
    pub endpoints: BTreeMap<String, String>,
    /// The administrators' trust file, relative to the catalog.
    pub trust: Spanned<String>,
    /// Public source → path in the private registry.
    #[serde(default)]
    pub mirrors: Vec<MirrorEntry>,
    /// First-party prefixes.
    #[serde(default)]
    pub first_party: Vec<FirstPartyEntry>,
    /// Rollout waves of the bundle.
    #[serde(default)]
    pub rollout: Vec<RolloutStep>,
}

/// One mirror.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorEntry {
    /// Public registry host, optionally with a path prefix.
    pub source: Spanned<String>,
    /// Path in the private registry.
    pub target: Spanned<String>,
}

/// One first-party prefix.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirstPartyEntry {
    /// `registry/path/` prefix.
    pub prefix: String,
    /// Scope path.
    pub scope: Spanned<String>,
    /// References must be pinned by digest.
    #[serde(default)]
    pub require_digest: bool,
}

/// One rollout step.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutStep {
    /// Duration after `issued_at` (humantime, kept as written).
    pub after: String,
    /// Percentage of nodes.
    pub percent: u32,
}

// ---------------------------------------------------------------------------------------------------
// governance.toml

/// Scan, licence and version rules of one governance level, as written.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleEntry {
    /// Distinct scanners needed (bundle rule).
    pub min_scanners: Option<u32>,
    /// Worst severity allowed (bundle rule).
    pub max_severity: Option<Severity>,
    /// Licence allow/deny lists (bundle rule).
    pub licenses: Option<LicenseEntry>,
    /// Approved tags of one repository at this scope (approve rule).
    pub max_versions: Option<u32>,
    /// How long a replaced tag stays deprecated before its sunset (approve rule).
    pub sunset_after: Option<Duration>,
    /// Oldest scanner report accepted (approve rule).
    pub max_report_age: Option<Duration>,
}

/// Licence lists.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LicenseEntry {
    /// Allowed SPDX identifiers.
    pub allow: Option<Vec<String>>,
    /// Denied SPDX identifiers.
    pub deny: Option<Vec<String>>,
}

impl RuleEntry {
    /// The bundle's part of the rule (what the node checks), as JSON.
    pub fn bundle_json(&self) -> Option<serde_json::Value> {
        let mut m = serde_json::Map::new();
        if let Some(n) = self.min_scanners {
            m.insert("min_scanners".into(), n.into());
        }
        if let Some(s) = self.max_severity {
            m.insert("max_severity".into(), s.to_string().into());
        }
        if let Some(l) = &self.licenses {
            let mut lm = serde_json::Map::new();
            if let Some(a) = &l.allow {
                lm.insert("allow".into(), a.clone().into());
            }
            if let Some(d) = &l.deny {
                lm.insert("deny".into(), d.clone().into());
            }
            if !lm.is_empty() {
                m.insert("licenses".into(), lm.into());
            }
        }
        (!m.is_empty()).then(|| m.into())
    }
}

/// `governance.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GovernanceEntry {
    /// Organisation name.
    pub organization: String,
    /// Pod label naming the application.
    pub application_label: String,
    /// Enforcement mode.
    pub mode: Option<Mode>,
    /// Organisation rules.
    #[serde(default)]
    pub rules: Option<Spanned<RuleEntry>>,
    /// Programs.
    #[serde(default)]
    pub programs: Vec<ProgramEntry>,
}

/// A program.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProgramEntry {
    /// Name.
    pub name: String,
    /// Mode.
    pub mode: Option<Mode>,
    /// Rules.
    #[serde(default)]
    pub rules: Option<Spanned<RuleEntry>>,
    /// Projects.
    #[serde(default)]
    pub projects: Vec<ProjectEntry>,
}

/// A project.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectEntry {
    /// Name.
    pub name: String,
    /// Mode.
    pub mode: Option<Mode>,
    /// Rules.
    #[serde(default)]
    pub rules: Option<Spanned<RuleEntry>>,
    /// Namespaces bound to it.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Applications.
    #[serde(default)]
    pub applications: Vec<String>,
}

// ---------------------------------------------------------------------------------------------------
// images/**.toml

/// One repository's file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryFile {
    /// The public repository.
    pub source: Spanned<String>,
    /// Every approved version.
    #[serde(default)]
    pub approved: Vec<Version>,
}

/// One approval: a digest (optionally with its tag) for a scope, with its provenance and lifecycle.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Version {
    /// Scope path.
    pub scope: Spanned<String>,
    /// The tag, if approved by tag.
    pub tag: Option<Spanned<String>>,
    /// The manifest (or index) digest.
    pub digest: Spanned<String>,
    /// Platforms of an index that were checked.
    #[serde(default)]
    pub platforms: Vec<String>,
    /// SPDX expression.
    pub license: Spanned<String>,
    /// Key id of the approving administrator.
    pub approved_by: String,
    /// When.
    pub approved_at: Time,
    /// Lifecycle.
    pub deprecated_at: Option<Time>,
    /// Lifecycle.
    pub sunset_at: Option<Time>,
    /// Lifecycle: a tag of the same repository.
    pub replacement: Option<Spanned<String>>,
    /// Scanner results.
    #[serde(default)]
    pub scans: Vec<ScanEntry>,
}

/// One scanner result.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ScanEntry {
    /// Scanner name.
    pub scanner: String,
    /// Scanner version.
    pub version: String,
    /// sha256 of the report file.
    pub report: Spanned<String>,
    /// Worst severity after the ignore list.
    pub worst_severity: Severity,
    /// When the report was made.
    pub scanned_at: Time,
}

// ---------------------------------------------------------------------------------------------------
// exceptions.toml, ignore.toml

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExceptionsFile {
    #[serde(default)]
    exceptions: Vec<ExceptionEntry>,
}

/// A break-glass exception.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExceptionEntry {
    /// Public repository.
    pub source: Spanned<String>,
    /// The digest.
    pub digest: Spanned<String>,
    /// Optional tag.
    pub tag: Option<String>,
    /// Scope path.
    pub scope: Spanned<String>,
    /// Expiry.
    pub expires_at: Time,
    /// Ticket.
    pub ticket: String,
    /// Why.
    pub reason: String,
    /// Who.
    pub approved_by: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct IgnoreFile {
    #[serde(default)]
    ignore: Vec<IgnoreEntry>,
}

/// A scanner finding to ignore.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IgnoreEntry {
    /// Vulnerability id (`CVE-2024-1234`, `GHSA-…`).
    pub id: String,
    /// Why it does not apply.
    pub reason: String,
    /// From then on it applies again.
    pub expires: Time,
    /// Only findings in this package.
    pub package: Option<String>,
    /// Only findings of this scanner.
    pub scanner: Option<String>,
}

// ---------------------------------------------------------------------------------------------------
// The loaded catalog.

/// A repository file, where it was read from, and its text (for edits).
#[derive(Debug, Clone)]
pub struct Repository {
    /// Path relative to the catalog.
    pub file: PathBuf,
    /// The file's text.
    pub text: String,
    /// Its content.
    pub content: RepositoryFile,
    /// The normalised source repository.
    pub source: String,
}

/// The effective rules of a scope: the bundle rule (the policy core's [`Rules`]) and the
/// administrators' approve rules.
#[derive(Debug, Clone)]
pub struct ScopeRules {
    /// What the node checks.
    pub bundle: Rules,
    /// Approved tags per repository at this scope.
    pub max_versions: u32,
    /// Deprecated → sunset delay for a replaced tag.
    pub sunset_after: std::time::Duration,
    /// Oldest report accepted.
    pub max_report_age: std::time::Duration,
}

/// A parsed catalog.
#[derive(Debug, Clone)]
pub struct Catalog {
    /// The directory.
    pub dir: PathBuf,
    /// `catalog.toml`.
    pub header: Header,
    /// `governance.toml`.
    pub governance: GovernanceEntry,
    /// Every repository file, sorted by source.
    pub repositories: Vec<Repository>,
    /// `exceptions.toml`.
    pub exceptions: Vec<ExceptionEntry>,
    /// `ignore.toml`.
    pub ignore: Vec<IgnoreEntry>,
    /// The administrators' trust file.
    pub trust: Trust,
    /// Scope path → effective rules.
    pub scopes: BTreeMap<String, ScopeRules>,
}

impl Catalog {
    /// Reads, parses and checks the catalog in `dir`. Every problem is reported, not just the first.
    pub fn load(dir: &Path) -> Result<Catalog, Problems> {
        let mut problems = Vec::new();
        let (header_text, header) = read_toml::<Header>(dir, CATALOG_FILE, true, &mut problems);
        let (gov_text, governance) =
            read_toml::<GovernanceEntry>(dir, GOVERNANCE_FILE, true, &mut problems);
        let (exc_text, exceptions) =
            read_toml::<ExceptionsFile>(dir, EXCEPTIONS_FILE, false, &mut problems);
        let (_, ignore) = read_toml::<IgnoreFile>(dir, IGNORE_FILE, false, &mut problems);

        let mut repositories = Vec::new();
        let mut files = Vec::new();
        collect_toml(
            &dir.join(IMAGES_DIR),
            Path::new(IMAGES_DIR),
            &mut files,
            &mut problems,
        );
        // Repository files are read and parsed on every core (a large catalog has one per image).
        let parsed = super::parallel::in_parts(&files, |_, part| {
            let (mut buf, mut opener) = (Vec::new(), Opener::default());
            part.iter()
                .map(|rel| read_repository(dir, rel, &mut opener, &mut buf))
                .collect::<Vec<_>>()
        });
        for r in parsed.into_iter().flatten() {
            match r {
                Ok(repo) => repositories.push(repo),
                Err(p) => problems.push(p),
            }
        }
        repositories.sort_by(|a, b| a.source.cmp(&b.source).then_with(|| a.file.cmp(&b.file)));

        let trust = header.as_ref().and_then(|h| {
            let rel = h.trust.get_ref();
            let src_text = header_text.as_deref().unwrap_or("");
            let src = Source {
                file: Path::new(CATALOG_FILE),
                text: src_text,
            };
            match std::fs::read_to_string(dir.join(rel)) {
                Ok(t) => match Trust::from_toml(&t) {
                    Ok(trust) => Some(trust),
                    Err(e) => {
                        problems.push(Problem::whole_file(
                            rel,
                            format!(
                                "{e}; list every administrator's public key (`pullgate keygen`)"
                            ),
                        ));
                        None
                    }
                },
                Err(e) => {
                    problems.push(src.at(
                        &h.trust.span(),
                        "trust",
                        format!("cannot read {}: {e}", dir.join(rel).display()),
                    ));
                    None
                }
            }
        });

        // Without the header or the governance nothing else can be checked; a broken exceptions or
        // ignore file is reported and the rest is still checked.
        let (Some(header), Some(governance)) = (header, governance) else {
            return Err(Problems(problems));
        };
        let (exceptions, ignore) = (exceptions.unwrap_or_default(), ignore.unwrap_or_default());
        let mut catalog = Catalog {
            dir: dir.to_owned(),
            header,
            governance,
            repositories,
            exceptions: exceptions.exceptions,
            ignore: ignore.ignore,
            // Replaced below, or the load fails.
            trust: trust.clone().unwrap_or_else(placeholder_trust),
            scopes: BTreeMap::new(),
        };
        let texts = Texts {
            header: header_text.unwrap_or_default(),
            governance: gov_text.unwrap_or_default(),
            exceptions: exc_text.unwrap_or_default(),
        };
        catalog.check(&texts, &mut problems);
        if trust.is_none() || !problems.is_empty() {
            return Err(Problems(problems));
        }
        Ok(catalog)
    }

    /// The effective rules of `scope` (a scope path), if it exists.
    pub fn rules(&self, scope: &str) -> Option<&ScopeRules> {
        self.scopes.get(scope)
    }

    /// The repository file of `source` (normalised), if any.
    pub fn repository(&self, source: &str) -> Option<&Repository> {
        self.repositories.iter().find(|r| r.source == source)
    }

    /// The mirror location (`path` in the private registry) of `source`, if a mirror covers it.
    pub fn mirror_path(&self, source: &Reference) -> Option<String> {
        let mut best: Option<(&MirrorEntry, usize)> = None;
        for m in &self.header.mirrors {
            let s = m.source.get_ref().trim_end_matches('/');
            let s = if s == reference::LEGACY_DEFAULT_DOMAIN {
                reference::DEFAULT_DOMAIN
            } else {
                s
            };
            let (dom, path) = s.split_once('/').unwrap_or((s, ""));
            if dom != source.domain() || !reference::path_has_prefix(source.path(), path) {
                continue;
            }
            if best.is_none_or(|(_, len)| s.len() > len) {
                best = Some((m, s.len()));
            }
        }
        best.map(|(m, _)| {
            let s = m.source.get_ref().trim_end_matches('/');
            let prefix = s.split_once('/').map(|(_, p)| p).unwrap_or("");
            let rest = source.path()[prefix.len()..].trim_start_matches('/');
            format!("{}/{rest}", m.target.get_ref().trim_matches('/'))
        })
    }

    /// The ignore entries that apply at `now` to a finding of `scanner` for `id` in `package`.
    pub fn ignored(
        &self,
        now: OffsetDateTime,
        scanner: &str,
        id: &str,
        package: &str,
    ) -> Option<&IgnoreEntry> {
        self.ignore.iter().find(|i| {
            i.id.eq_ignore_ascii_case(id)
                && i.expires.0 > now
                && i.package.as_deref().is_none_or(|p| p == package)
                && i.scanner
                    .as_deref()
                    .is_none_or(|s| s.eq_ignore_ascii_case(scanner))
        })
    }

    fn check(&mut self, texts: &Texts, problems: &mut Vec<Problem>) {
        let hsrc = Source {
            file: Path::new(CATALOG_FILE),
            text: &texts.header,
        };
        let gsrc = Source {
            file: Path::new(GOVERNANCE_FILE),
            text: &texts.governance,
        };
        let esrc = Source {
            file: Path::new(EXCEPTIONS_FILE),
            text: &texts.exceptions,
        };
        let h = &self.header;
        if h.issuer.trim().is_empty() {
            problems.push(hsrc.at(
                &(0..0),
                "issuer",
                "is empty; name the team that issues bundles",
            ));
        }
        match Reference::parse(&format!("{}/x", h.private_registry.get_ref())) {
            Ok(r) if r.domain() == h.private_registry.get_ref() => {}
            Ok(_) => problems.push(hsrc.at(
                &h.private_registry.span(),
                "private_registry",
                "is not a registry host[:port] (it needs a '.' or a port, or is localhost)",
            )),
            Err(e) => problems.push(hsrc.at(
                &h.private_registry.span(),
                "private_registry",
                e.kind.to_string(),
            )),
        }
        if h.validity.0.is_zero() {
            problems.push(hsrc.at(
                &(0..0),
                "validity",
                "is zero; bundles need a validity such as \"30d\"",
            ));
        }
        for m in &h.mirrors {
            if m.source.get_ref().split('/').next() == Some(h.private_registry.get_ref().as_str()) {
                problems.push(hsrc.at(
                    &m.source.span(),
                    "mirrors.source",
                    "is the private registry; a mirror copies from a public registry into it",
                ));
            }
            if m.target.get_ref().trim_matches('/').is_empty() {
                problems.push(hsrc.at(
                    &m.target.span(),
                    "mirrors.target",
                    "is empty; give a path in the private registry such as \"approved\"",
                ));
            }
        }

        // Governance: scope tree and rules (the policy core's inheritance and only-tighten check).
        let g = &self.governance;
        let org = g.organization.clone();
        let org_rules = self.scope_rules(None, &org, g.rules.as_ref(), &gsrc, problems);
        let mut scopes = BTreeMap::new();
        let mut namespaces: HashMap<&str, String> = HashMap::new();
        if let Some(org_rules) = org_rules {
            scopes.insert(org.clone(), org_rules.clone());
            for p in &g.programs {
                let path = format!("{org}/{}", p.name);
                // A level whose rules are wrong is reported and keeps its parent's rules, so the scopes
                // below it do not all fail too.
                let pr = self
                    .scope_rules(Some(&org_rules), &path, p.rules.as_ref(), &gsrc, problems)
                    .unwrap_or_else(|| org_rules.clone());
                scopes.insert(path.clone(), pr.clone());
                for j in &p.projects {
                    let jpath = format!("{path}/{}", j.name);
                    let jr = self
                        .scope_rules(Some(&pr), &jpath, j.rules.as_ref(), &gsrc, problems)
                        .unwrap_or_else(|| pr.clone());
                    for ns in &j.namespaces {
                        if let Some(other) = namespaces.insert(ns, jpath.clone()) {
                            problems.push(gsrc.at(&(0..0), format!("programs.projects.namespaces ({jpath})"), format!("namespace {ns} is also bound to {other}; bind it to one project")));
                        }
                    }
                    for a in &j.applications {
                        scopes.insert(format!("{jpath}/{a}"), jr.clone());
                    }
                    scopes.insert(jpath, jr);
                }
            }
        }
        let scope_known = |s: &str| scopes.contains_key(s);

        for fp in &h.first_party {
            if !scope_known(fp.scope.get_ref()) {
                problems.push(hsrc.at(
                    &fp.scope.span(),
                    "first_party.scope",
                    unknown_scope(fp.scope.get_ref()),
                ));
            }
        }

        // Images: every repository file on its own, on every core (a large catalog has one per image).
        let repos = &self.repositories;
        let this = &*self;
        let found = super::parallel::in_parts(repos, |start, part| {
            let mut found = Vec::new();
            // A catalog has few distinct licence texts: each is parsed once per part.
            let mut licenses = HashMap::new();
            for (i, repo) in part.iter().enumerate() {
                // The repositories are sorted by source: a second file of a source follows the one
                // before (which may be the last of the part before).
                let previous = (start + i).checked_sub(1).map(|p| &repos[p]);
                this.check_repository(repo, previous, &scope_known, &mut licenses, &mut found);
            }
            found
        });
        problems.extend(found.into_iter().flatten());

        for e in &self.exceptions {
            if !scope_known(e.scope.get_ref()) {
                problems.push(esrc.at(
                    &e.scope.span(),
                    "exceptions.scope",
                    unknown_scope(e.scope.get_ref()),
                ));
            }
            if let Err(x) = Digest::parse(e.digest.get_ref()) {
                problems.push(esrc.at(&e.digest.span(), "exceptions.digest", x.to_string()));
            }
            match parse_source(e.source.get_ref()) {
                Ok(r) if self.mirror_path(&r).is_none() => problems.push(esrc.at(
                    &e.source.span(),
                    "exceptions.source",
                    format!("no mirror in catalog.toml covers {}", r.domain()),
                )),
                Err(x) => problems.push(esrc.at(&e.source.span(), "exceptions.source", x)),
                _ => {}
            }
            for (k, v) in [
                ("ticket", &e.ticket),
                ("reason", &e.reason),
                ("approved_by", &e.approved_by),
            ] {
                if v.trim().is_empty() {
                    problems.push(esrc.at(&e.source.span(), format!("exceptions.{k}"), "is empty"));
                }
            }
        }
        for i in &self.ignore {
            if i.reason.trim().is_empty() {
                problems.push(Problem {
                    file: IGNORE_FILE.into(),
                    line: 0,
                    key: format!("ignore.reason ({})", i.id),
                    message: "is empty; say why the finding does not apply".into(),
                });
            }
        }
        self.scopes = scopes;
    }

    /// Checks one repository file: its source, and each approval's scope, digest, tag, licence, scans
    /// and lifecycle. `previous` is the repository file sorted before it (a second file of the same
    /// source is a problem).
    fn check_repository<'c>(
        &'c self,
        repo: &'c Repository,
        previous: Option<&Repository>,
        scope_known: &(dyn Fn(&str) -> bool + Sync),
        licenses: &mut HashMap<&'c str, Option<String>>,
        problems: &mut Vec<Problem>,
    ) {
        let h = &self.header;
        let src = Source {
            file: &repo.file,
            text: &repo.text,
        };
        let other = previous
            .filter(|p| p.source == repo.source)
            .map(|p| &p.file);
        if let Some(other) = other {
            problems.push(src.at(
                &repo.content.source.span(),
                "source",
                format!(
                    "{} is also described by {}; keep one file per repository",
                    repo.source,
                    other.display()
                ),
            ));
        }
        if let Ok(r) = Reference::parse(&repo.source) {
            if r.domain() == h.private_registry.get_ref() {
                problems.push(src.at(&repo.content.source.span(), "source", "is in the private registry; list first-party images under first_party in catalog.toml"));
            } else if self.mirror_path(&r).is_none() {
                problems.push(src.at(
                    &repo.content.source.span(),
                    "source",
                    format!("no mirror in catalog.toml covers {}; add one", r.domain()),
                ));
            }
        }
        let mut tags: BTreeMap<&str, &str> = BTreeMap::new();
        let mut seen: BTreeSet<(&str, &str)> = BTreeSet::new();
        // (digest, scope) → the tag of the first entry approving it there.
        let mut routes: BTreeMap<(&str, &str), Option<&str>> = BTreeMap::new();
        let all_tags: BTreeSet<&str> = repo
            .content
            .approved
            .iter()
            .filter_map(|v| v.tag.as_ref().map(|t| t.get_ref().as_str()))
            .collect();
        for v in &repo.content.approved {
            let at = |span: std::ops::Range<usize>, key: &str, msg: String| {
                src.at(&span, format!("approved.{key}"), msg)
            };
            if !scope_known(v.scope.get_ref()) {
                problems.push(at(
                    v.scope.span(),
                    "scope",
                    unknown_scope(v.scope.get_ref()),
                ));
            }
            if let Err(e) = Digest::parse(v.digest.get_ref()) {
                problems.push(at(v.digest.span(), "digest", e.to_string()));
            }
            let key = v
                .tag
                .as_ref()
                .map_or(v.digest.get_ref(), |t| t.get_ref())
                .as_str();
            if !seen.insert((key, v.scope.get_ref())) {
                problems.push(at(
                    v.scope.span(),
                    "scope",
                    format!(
                        "{key} is approved twice for {}; keep one entry",
                        v.scope.get_ref()
                    ),
                ));
            }
            let tag = v.tag.as_ref().map(|t| t.get_ref().as_str());
            let first = *routes
                .entry((v.digest.get_ref(), v.scope.get_ref()))
                .or_insert(tag);
            if let (Some(t), None) | (None, Some(t)) = (first, tag) {
                problems.push(at(
                    v.digest.span(),
                    "digest",
                    format!(
                        "{} is approved for {} both without a tag and as tag {t}; keep one entry",
                        v.digest.get_ref(),
                        v.scope.get_ref()
                    ),
                ));
            }
            if let Some(t) = &v.tag {
                if let Err(e) = Reference::parse(&format!("{}:{}", repo.source, t.get_ref())) {
                    problems.push(at(t.span(), "tag", e.kind.to_string()));
                }
                if let Some(other) = tags.insert(t.get_ref(), v.digest.get_ref()) {
                    if other != v.digest.get_ref() {
                        problems.push(at(t.span(), "tag", format!("tag {} is bound to {} here and to {other} in another entry; a tag means one digest", t.get_ref(), v.digest.get_ref())));
                    }
                }
            }
            // A catalog has few distinct licence texts: each is parsed once.
            let license = licenses
                .entry(v.license.get_ref())
                .or_insert_with_key(|l| LicenseExpression::parse(l).err());
            if let Some(e) = license {
                problems.push(at(
                    v.license.span(),
                    "license",
                    format!("\"{}\": {e}", v.license.get_ref()),
                ));
            }
            if v.scans.is_empty() {
                problems.push(at(
                    v.digest.span(),
                    "scans",
                    "no scanner results; approve images with `pullgate approve`".into(),
                ));
            }
            for s in &v.scans {
                if let Err(e) = Digest::parse(s.report.get_ref()) {
                    problems.push(at(s.report.span(), "scans.report", e.to_string()));
                }
            }
            if let (Some(d), Some(s)) = (v.deprecated_at, v.sunset_at) {
                if d >= s {
                    problems.push(at(
                        v.digest.span(),
                        "deprecated_at",
                        format!("{d} is not before sunset_at {s}"),
                    ));
                }
            }
            if let Some(r) = &v.replacement {
                if v.deprecated_at.is_none() && v.sunset_at.is_none() {
                    problems.push(at(
                        r.span(),
                        "replacement",
                        "needs deprecated_at or sunset_at".into(),
                    ));
                }
                if Some(r.get_ref()) == v.tag.as_ref().map(|t| t.get_ref()) {
                    problems.push(at(r.span(), "replacement", "is the tag itself".into()));
                } else if !all_tags.contains(r.get_ref().as_str()) {
                    problems.push(at(
                        r.span(),
                        "replacement",
                        format!(
                            "{} is not an approved tag of {}; approve it first",
                            r.get_ref(),
                            repo.source
                        ),
                    ));
                }
            }
        }
    }

    /// The rules of one governance level, from its parent's (reported as problems when invalid).
    fn scope_rules(
        &self,
        parent: Option<&ScopeRules>,
        path: &str,
        raw: Option<&Spanned<RuleEntry>>,
        src: &Source<'_>,
        problems: &mut Vec<Problem>,
    ) -> Option<ScopeRules> {
        let span = raw.map(|r| r.span()).unwrap_or(0..0);
        let entry = raw.map(|r| r.get_ref().clone()).unwrap_or_default();
        let bundle_raw: Option<crate::policy::rules::RawRules> = entry
            .bundle_json()
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| problems.push(src.at(&span, format!("rules ({path})"), e.to_string())))
            .ok()?;
        let bundle = match parent {
            None => Rules::organisation(bundle_raw, path),
            Some(p) => p.bundle.child(bundle_raw, path, true),
        }
        .map_err(|e| problems.push(src.at(&span, format!("rules ({path})"), e)))
        .ok()?;
        let inherit = |v: Option<std::time::Duration>, p: Option<std::time::Duration>, d| {
            v.or(p).unwrap_or(d)
        };
        let out = ScopeRules {
            bundle,
            max_versions: entry
                .max_versions
                .or(parent.map(|p| p.max_versions))
                .unwrap_or(DEFAULT_MAX_VERSIONS),
            sunset_after: inherit(
                entry.sunset_after.map(|d| d.0),
                parent.map(|p| p.sunset_after),
                DEFAULT_SUNSET_AFTER,
            ),
            max_report_age: inherit(
                entry.max_report_age.map(|d| d.0),
                parent.map(|p| p.max_report_age),
                DEFAULT_MAX_REPORT_AGE,
            ),
        };
        if let Some(p) = parent {
            if out.max_versions > p.max_versions {
                problems.push(src.at(
                    &span,
                    format!("rules.max_versions ({path})"),
                    format!(
                        "{} loosens the parent's {}; a lower level may only tighten",
                        out.max_versions, p.max_versions
                    ),
                ));
            }
            if out.max_report_age > p.max_report_age {
                problems.push(src.at(
                    &span,
                    format!("rules.max_report_age ({path})"),
                    "is longer than the parent's; a lower level may only tighten".to_string(),
                ));
            }
        }
        if out.max_versions == 0 {
            problems.push(src.at(
                &span,
                format!("rules.max_versions ({path})"),
                "is 0; at least 1",
            ));
        }
        Some(out)
    }
}

struct Texts {
    header: String,
    governance: String,
    exceptions: String,
}

/// Parses a source repository: a name without tag or digest (`nginx` is `docker.io/library/nginx`).
pub fn parse_source(s: &str) -> Result<Reference, String> {
    let last = s.rsplit('/').next().unwrap_or(s);
    if s.contains('@') || last.contains(':') {
        return Err(format!(
            "\"{s}\" has a tag or digest; a source is a repository such as docker.io/library/nginx"
        ));
    }
    Reference::parse(s).map_err(|e| e.to_string())
}

fn unknown_scope(s: &str) -> String {
    format!(
        "scope {s} is not in governance.toml; scopes are written organisation/program/project[/application]"
    )
}

fn placeholder_trust() -> Trust {
    // Only used while collecting problems; a catalog without a usable trust file never loads.
    let key = crate::policy::PrivateKey::from_seed([0; 32]).public();
    Trust::new(
        vec![crate::policy::trust::TrustedKey {
            name: "-".into(),
            key,
        }],
        1,
    )
    .unwrap_or_else(|_| unreachable!())
}

/// Reads and parses one of the catalog's fixed files (`rel`, relative to `dir`): its text (empty when
/// an optional file is missing) and its content, each `None` after a problem (added to `problems`).
fn read_toml<T: serde::de::DeserializeOwned>(
    dir: &Path,
    rel: &str,
    required: bool,
    problems: &mut Vec<Problem>,
) -> (Option<String>, Option<T>) {
    let text = match std::fs::read_to_string(dir.join(rel)) {
        Ok(t) => t,
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => {
            problems.push(Problem::whole_file(
                rel,
                format!(
                    "cannot read {}: {e}{}",
                    dir.join(rel).display(),
                    if e.kind() == std::io::ErrorKind::NotFound {
                        "; create a catalog with `pullgate catalog init DIR`"
                    } else {
                        ""
                    }
                ),
            ));
            return (None, None);
        }
    };
    let content = parse_toml(Path::new(rel), &text)
        .map_err(|p| problems.push(p))
        .ok();
    (Some(text), content)
}

/// Reads and parses one repository file (`rel`, relative to the catalog `dir`).
fn read_repository(
    dir: &Path,
    rel: &Path,
    opener: &mut Opener,
    buf: &mut Vec<u8>,
) -> Result<Repository, Problem> {
    let path = dir.join(rel);
    let text = opener
        .open(&path)
        .and_then(|f| read_small(f, buf))
        .map_err(|e| Problem::whole_file(rel, format!("cannot read {}: {e}", path.display())))?;
    // Nearly every file of a large catalog is valid: the fast path reads it; anything it does not
    // take goes through serde, which words the problem.
    let content = match fast::repository(&text) {
        Some(content) => content,
        None => parse_toml::<RepositoryFile>(rel, &text)?,
    };
    let source = parse_source(content.source.get_ref())
        .map_err(|e| {
            Source {
                file: rel,
                text: &text,
            }
            .at(&content.source.span(), "source", e)
        })?
        .name()
        .to_owned();
    Ok(Repository {
        file: rel.to_owned(),
        text,
        content,
        source,
    })
}

/// The repository files' fast paths. A 100,000-image catalog is 100,000 files, nearly all in the
/// layout `approve` writes: those are read line by line ([`layout`](fast::layout)), without building
/// toml's document tree (which, with its lexer, was about a fifth of a large catalog's build). Any
/// other valid file is taken apart from toml's parsed document by hand rather than through serde
/// (serde's pass, with the spans it threads through every field and each date-time formatted and
/// parsed again on the way, was about a sixth of reading a file). Each function returns `None` for
/// anything it does not expect (an unknown key, a wrong type, a missing field, a date-time without
/// an offset); the caller then parses the file through serde ([`parse_toml`]), which gives the same
/// value for every file taken here and words the problem for every other one. A field added to
/// [`RepositoryFile`], [`Version`] or [`ScanEntry`] must be added here too (the struct literals below
/// do not compile without it, and the line reader's key lists name every key).
mod fast {
    use serde::Deserialize as _;
    use serde::de::IntoDeserializer as _;
    use toml::Spanned;
    use toml::de::{DeTable, DeValue};

    use super::{RepositoryFile, ScanEntry, Time, Version};
    use crate::policy::Severity;

    type Value<'a> = Spanned<DeValue<'a>>;

    /// A repository file ([`RepositoryFile`]): in the layout `approve` writes ([`layout`]), else from
    /// toml's parsed document.
    pub(super) fn repository(text: &str) -> Option<RepositoryFile> {
        layout::repository(text).or_else(|| document(text))
    }

    /// A repository file from toml's parsed document.
    fn document(text: &str) -> Option<RepositoryFile> {
        let mut source = None;
        let mut approved = Vec::new();
        for (key, value) in DeTable::parse(text).ok()?.into_inner() {
            match key.get_ref().as_ref() {
                "source" => source = Some(spanned_string(value)?),
                "approved" => approved = array(value, version)?,
                _ => return None,
            }
        }
        Some(RepositoryFile {
            source: source?,
            approved,
        })
    }

    fn version(value: Value<'_>) -> Option<Version> {
        let (mut scope, mut tag, mut digest, mut platforms, mut license) =
            (None, None, None, Vec::new(), None);
        let (mut approved_by, mut approved_at, mut deprecated_at, mut sunset_at) =
            (None, None, None, None);
        let (mut replacement, mut scans) = (None, Vec::new());
        for (key, value) in table(value)? {
            match key.get_ref().as_ref() {
                "scope" => scope = Some(spanned_string(value)?),
                "tag" => tag = Some(spanned_string(value)?),
                "digest" => digest = Some(spanned_string(value)?),
                "platforms" => platforms = array(value, string)?,
                "license" => license = Some(spanned_string(value)?),
                "approved_by" => approved_by = Some(string(value)?),
                "approved_at" => approved_at = Some(time(value)?),
                "deprecated_at" => deprecated_at = Some(time(value)?),
                "sunset_at" => sunset_at = Some(time(value)?),
                "replacement" => replacement = Some(spanned_string(value)?),
                "scans" => scans = array(value, scan)?,
                _ => return None,
            }
        }
        Some(Version {
            scope: scope?,
            tag,
            digest: digest?,
            platforms,
            license: license?,
            approved_by: approved_by?,
            approved_at: approved_at?,
            deprecated_at,
            sunset_at,
            replacement,
            scans,
        })
    }

    fn scan(value: Value<'_>) -> Option<ScanEntry> {
        let (mut scanner, mut version, mut report, mut worst_severity, mut scanned_at) =
            (None, None, None, None, None);
        for (key, value) in table(value)? {
            match key.get_ref().as_ref() {
                "scanner" => scanner = Some(string(value)?),
                "version" => version = Some(string(value)?),
                "report" => report = Some(spanned_string(value)?),
                "worst_severity" => worst_severity = Some(severity(value)?),
                "scanned_at" => scanned_at = Some(time(value)?),
                _ => return None,
            }
        }
        Some(ScanEntry {
            scanner: scanner?,
            version: version?,
            report: report?,
            worst_severity: worst_severity?,
            scanned_at: scanned_at?,
        })
    }

    fn table(value: Value<'_>) -> Option<DeTable<'_>> {
        match value.into_inner() {
            DeValue::Table(t) => Some(t),
            _ => None,
        }
    }

    fn array<'a, T>(value: Value<'a>, item: impl Fn(Value<'a>) -> Option<T>) -> Option<Vec<T>> {
        match value.into_inner() {
            DeValue::Array(a) => a.into_iter().map(item).collect(),
            _ => None,
        }
    }

    /// A string with the span of its value, as serde's `Spanned<String>` has it.
    fn spanned_string(value: Value<'_>) -> Option<Spanned<String>> {
        let span = value.span();
        match value.into_inner() {
            DeValue::String(s) => Some(Spanned::new(span, s.into_owned())),
            _ => None,
        }
    }

    fn string(value: Value<'_>) -> Option<String> {
        spanned_string(value).map(Spanned::into_inner)
    }

    fn time(value: Value<'_>) -> Option<Time> {
        match value.into_inner() {
            DeValue::Datetime(d) => Time::from_toml(d).ok(),
            _ => None,
        }
    }

    fn severity(value: Value<'_>) -> Option<Severity> {
        severity_named(&string(value)?)
    }

    /// Through [`Severity`]'s own `Deserialize`, so the names are the ones serde takes.
    fn severity_named(s: &str) -> Option<Severity> {
        Severity::deserialize(s.into_deserializer())
            .map_err(|_: serde::de::value::Error| ())
            .ok()
    }

    /// The layout `approve` and `catalog init` write, read line by line without a document tree:
    /// `key = value` lines (a basic string without escapes, a one-line array of such strings, or an
    /// offset date-time), `[[approved]]` and `[[approved.scans]]` headers, blank lines and comments.
    /// Anything else — another header, a quoted or dotted key, an escape, a multi-line value, a
    /// repeated key, a control character, a carriage return — is `None`, and the file is read from
    /// toml's document instead. Spans are those toml gives: a value's bytes, quotes included.
    pub(super) mod layout {
        use std::ops::Range;

        use toml::Spanned;

        use super::super::{RepositoryFile, ScanEntry, Time, Version};

        /// What a key's value is.
        #[derive(Clone, Copy, PartialEq)]
        enum Kind {
            String,
            Strings,
            Time,
        }

        const TOP_KEYS: &[(&str, Kind)] = &[("source", Kind::String)];
        const VERSION_KEYS: &[(&str, Kind)] = &[
            ("scope", Kind::String),
            ("tag", Kind::String),
            ("digest", Kind::String),
            ("platforms", Kind::Strings),
            ("license", Kind::String),
            ("approved_by", Kind::String),
            ("approved_at", Kind::Time),
            ("deprecated_at", Kind::Time),
            ("sunset_at", Kind::Time),
            ("replacement", Kind::String),
        ];
        const SCAN_KEYS: &[(&str, Kind)] = &[
            ("scanner", Kind::String),
            ("version", Kind::String),
            ("report", Kind::String),
            ("worst_severity", Kind::String),
            ("scanned_at", Kind::Time),
        ];

        /// A value read: a string with its span, an array of strings, or a date-time.
        enum Value<'t> {
            String(Range<usize>, &'t str),
            Strings(Vec<String>),
            Time(Time),
        }

        /// One table being read: its keys (each one of `keys`, with a value of its kind, once).
        struct Table<'t> {
            keys: &'static [(&'static str, Kind)],
            values: Vec<(&'t str, Value<'t>)>,
        }

        impl<'t> Table<'t> {
            fn new(keys: &'static [(&'static str, Kind)]) -> Table<'t> {
                Table {
                    keys,
                    values: Vec::new(),
                }
            }
            /// `key` may be added with a value of `kind`: it is one of the table's, and new.
            fn takes(&self, key: &str, kind: Kind) -> bool {
                self.keys.contains(&(key, kind)) && self.values.iter().all(|(k, _)| *k != key)
            }
            fn get(&self, key: &str) -> Option<&Value<'t>> {
                self.values.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
            }
            fn spanned(&self, key: &str) -> Option<Spanned<String>> {
                match self.get(key)? {
                    Value::String(span, v) => Some(Spanned::new(span.clone(), (*v).to_owned())),
                    _ => None,
                }
            }
            fn string(&self, key: &str) -> Option<String> {
                self.spanned(key).map(Spanned::into_inner)
            }
            fn take_strings(&mut self, key: &str) -> Option<Vec<String>> {
                self.values.iter_mut().find_map(|(k, v)| match v {
                    Value::Strings(a) if *k == key => Some(std::mem::take(a)),
                    _ => None,
                })
            }
            fn time(&self, key: &str) -> Option<Time> {
                match self.get(key)? {
                    Value::Time(t) => Some(*t),
                    _ => None,
                }
            }
        }

        pub(in super::super) fn repository(text: &str) -> Option<RepositoryFile> {
            // TOML allows no control character but tab and newline, in comments and strings too; a
            // carriage return (CRLF files) is left to toml.
            if text
                .bytes()
                .any(|b| (b < 0x20 && b != b'\t' && b != b'\n') || b == 0x7f)
            {
                return None;
            }
            let mut top = Table::new(TOP_KEYS);
            // Each approval with its scans.
            let mut versions: Vec<(Table, Vec<Table>)> = Vec::new();
            let mut offset = 0;
            for line in text.split_inclusive('\n') {
                let start = offset;
                offset += line.len();
                let body = line.strip_suffix('\n').unwrap_or(line);
                let rest = body.trim_start_matches([' ', '\t']);
                if rest.is_empty() || rest.starts_with('#') {
                    continue;
                }
                if rest.starts_with('[') {
                    match rest.trim_end_matches([' ', '\t']) {
                        "[[approved]]" => versions.push((Table::new(VERSION_KEYS), Vec::new())),
                        "[[approved.scans]]" => versions.last_mut()?.1.push(Table::new(SCAN_KEYS)),
                        _ => return None,
                    }
                    continue;
                }
                let table = match versions.last_mut() {
                    None => &mut top,
                    Some((v, scans)) => scans.last_mut().unwrap_or(v),
                };
                key_value(rest, start + (body.len() - rest.len()), table)?;
            }
            let approved = versions
                .into_iter()
                .map(|(v, scans)| version(v, &scans))
                .collect::<Option<Vec<_>>>()?;
            Some(RepositoryFile {
                source: top.spanned("source")?,
                approved,
            })
        }

        fn version(mut v: Table, scans: &[Table]) -> Option<Version> {
            Some(Version {
                scope: v.spanned("scope")?,
                tag: v.spanned("tag"),
                digest: v.spanned("digest")?,
                platforms: v.take_strings("platforms").unwrap_or_default(),
                license: v.spanned("license")?,
                approved_by: v.string("approved_by")?,
                approved_at: v.time("approved_at")?,
                deprecated_at: v.time("deprecated_at"),
                sunset_at: v.time("sunset_at"),
                replacement: v.spanned("replacement"),
                scans: scans.iter().map(scan).collect::<Option<_>>()?,
            })
        }

        fn scan(s: &Table) -> Option<ScanEntry> {
            Some(ScanEntry {
                scanner: s.string("scanner")?,
                version: s.string("version")?,
                report: s.spanned("report")?,
                worst_severity: super::severity_named(&s.string("worst_severity")?)?,
                scanned_at: s.time("scanned_at")?,
            })
        }

        /// `key = value` (and an optional comment) at byte `at` of the file, into `table`.
        fn key_value<'t>(line: &'t str, at: usize, table: &mut Table<'t>) -> Option<()> {
            let key_len = line
                .bytes()
                .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-')
                .count();
            let key = &line[..key_len];
            let after_key = line[key_len..].trim_start_matches([' ', '\t']);
            let value = after_key.strip_prefix('=')?.trim_start_matches([' ', '\t']);
            let value_at = at + (line.len() - value.len());
            let rest = match value.as_bytes().first()? {
                b'"' if table.takes(key, Kind::String) => {
                    let (s, rest) = basic_string(value)?;
                    let end = value_at + (value.len() - rest.len());
                    table.values.push((key, Value::String(value_at..end, s)));
                    rest
                }
                b'[' if table.takes(key, Kind::Strings) => {
                    let mut items = Vec::new();
                    let mut rest = value[1..].trim_start_matches([' ', '\t']);
                    let rest = loop {
                        if let Some(r) = rest.strip_prefix(']') {
                            break r;
                        }
                        let (s, r) = basic_string(rest)?;
                        items.push(s.to_owned());
                        let r = r.trim_start_matches([' ', '\t']);
                        rest = match r.strip_prefix(',') {
                            Some(r) => r.trim_start_matches([' ', '\t']),
                            None if r.starts_with(']') => r,
                            None => return None,
                        };
                    };
                    table.values.push((key, Value::Strings(items)));
                    rest
                }
                b'0'..=b'9' if table.takes(key, Kind::Time) => {
                    let len = value
                        .bytes()
                        .take_while(|b| !matches!(b, b' ' | b'\t' | b'#'))
                        .count();
                    let dt: toml::value::Datetime = value[..len].parse().ok()?;
                    table
                        .values
                        .push((key, Value::Time(Time::from_toml(dt).ok()?)));
                    &value[len..]
                }
                _ => return None,
            };
            let rest = rest.trim_start_matches([' ', '\t']);
            (rest.is_empty() || rest.starts_with('#')).then_some(())
        }

        /// A basic string without escapes at the start of `s` (which starts with `"`): its content
        /// and what follows it. An escape is `None`; a multi-line string's opening quotes read as an
        /// empty string followed by a quote, which the caller refuses.
        fn basic_string(s: &str) -> Option<(&str, &str)> {
            let body = s.strip_prefix('"')?;
            let end = body.find(['"', '\\'])?;
            if body.as_bytes()[end] != b'"' {
                return None;
            }
            Some((&body[..end], &body[end + 1..]))
        }
    }
}

/// Opens files through their directory, which it keeps open for the next file: the files of a
/// catalog's directory are read one after the other, and the kernel's walk of the whole path for each
/// one (`open`) cost a tenth of reading a large catalog; `openat` walks the last step only.
#[derive(Default)]
struct Opener {
    dir: Option<(PathBuf, rustix::fd::OwnedFd)>,
}

impl Opener {
    fn open(&mut self, path: &Path) -> std::io::Result<std::fs::File> {
        use rustix::fs::{Mode, OFlags};
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return std::fs::File::open(path);
        };
        let fd = match &self.dir {
            Some((dir, fd)) if dir == parent => fd,
            _ => {
                let fd = rustix::fs::open(
                    parent,
                    OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                )?;
                &self.dir.insert((parent.to_owned(), fd)).1
            }
        };
        let file = rustix::fs::openat(fd, name, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
        Ok(file.into())
    }
}

/// Reads a small text file (opened by the caller) until the end: no size query first
/// (`std::fs::read_to_string` asks for the size and position, two more system calls per file, which a
/// catalog of 100,000 repository files notices). `buf` is reused between files.
fn read_small(mut f: std::fs::File, buf: &mut Vec<u8>) -> std::io::Result<String> {
    use std::io::Read as _;
    buf.clear();
    loop {
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(buf.capacity().max(8192));
        }
        let start = buf.len();
        let spare = buf.capacity() - start;
        buf.resize(start + spare, 0);
        let read = f.read(&mut buf[start..]);
        buf.truncate(start + *read.as_ref().unwrap_or(&0));
        match read {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    String::from_utf8(buf.clone())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Every `*.toml` below `dir` (relative paths under `rel`), sorted.
fn collect_toml(dir: &Path, rel: &Path, out: &mut Vec<PathBuf>, problems: &mut Vec<Problem>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            problems.push(Problem::whole_file(
                rel,
                format!("cannot read the directory: {e}"),
            ));
            return;
        }
    };
    let mut names: Vec<_> = entries.filter_map(Result::ok).collect();
    names.sort_by_key(|e| e.file_name());
    for e in names {
        let path = e.path();
        let r = rel.join(e.file_name());
        // The entry's type comes with the directory listing; only a symbolic link needs a stat.
        let dir = match e.file_type() {
            Ok(t) if t.is_symlink() => path.is_dir(),
            Ok(t) => t.is_dir(),
            Err(_) => path.is_dir(),
        };
        if dir {
            collect_toml(&path, &r, out, problems);
        } else if path.extension().is_some_and(|x| x == "toml") {
            out.push(r);
        }
    }
}

/// Where `approve` keeps the file of `source`: `images/<source>.toml` (`images/docker.io/library/nginx.toml`).
pub fn repository_path(source: &str) -> PathBuf {
    let safe: String = source
        .chars()
        .map(|c| if c == ':' { '_' } else { c })
        .collect();
    Path::new(IMAGES_DIR).join(format!("{safe}.toml"))
}

// ---------------------------------------------------------------------------------------------------
// Text edits made by approve.

/// A new approval, to be written.
#[derive(Debug, Clone)]
pub struct NewVersion {
    pub scope: String,
    pub tag: Option<String>,
    pub digest: Digest,
    pub platforms: Vec<String>,
    pub license: String,
    pub approved_by: String,
    pub approved_at: OffsetDateTime,
    pub scans: Vec<NewScan>,
}

/// A scan of a new approval.
#[derive(Debug, Clone)]
pub struct NewScan {
    pub scanner: Arc<str>,
    pub version: Arc<str>,
    pub report: Digest,
    pub worst_severity: Severity,
    pub scanned_at: OffsetDateTime,
}

fn quote(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// The TOML text of a new `[[approved]]` entry.
pub fn render_version(v: &NewVersion) -> String {
    let mut s = String::from("\n[[approved]]\n");
    s += &format!("scope = {}\n", quote(&v.scope));
    if let Some(t) = &v.tag {
        s += &format!("tag = {}\n", quote(t));
    }
    s += &format!("digest = {}\n", quote(&v.digest.to_string()));
    if !v.platforms.is_empty() {
        let p: Vec<String> = v.platforms.iter().map(|p| quote(p)).collect();
        s += &format!("platforms = [{}]\n", p.join(", "));
    }
    s += &format!("license = {}\n", quote(&v.license));
    s += &format!("approved_by = {}\n", quote(&v.approved_by));
    s += &format!("approved_at = {}\n", rfc3339(v.approved_at));
    for sc in &v.scans {
        s += "\n[[approved.scans]]\n";
        s += &format!("scanner = {}\n", quote(&sc.scanner));
        s += &format!("version = {}\n", quote(&sc.version));
        s += &format!("report = {}\n", quote(&sc.report.to_string()));
        s += &format!(
            "worst_severity = {}\n",
            quote(&sc.worst_severity.to_string())
        );
        s += &format!("scanned_at = {}\n", rfc3339(sc.scanned_at));
    }
    s
}

/// The text of a new repository file for `source`.
pub fn render_repository(source: &str, first: &NewVersion) -> String {
    format!(
        "# Approved versions of {source}: one [[approved]] entry per digest and scope, written by\n# `pullgate approve`. See docs/catalog.md.\nsource = {}\n{}",
        quote(source),
        render_version(first)
    )
}

/// `text` with a lifecycle (deprecated now, sunset later, replacement) added to the entry that approves
/// `tag` for `scope`. Fails if there is no such entry or it already has a lifecycle.
pub fn insert_lifecycle(
    repo: &Repository,
    tag: &str,
    scope: &str,
    deprecated_at: OffsetDateTime,
    sunset_at: OffsetDateTime,
    replacement: &str,
) -> Result<String, String> {
    let v = repo
        .content
        .approved
        .iter()
        .find(|v| v.scope.get_ref() == scope && v.tag.as_ref().is_some_and(|t| t.get_ref() == tag))
        .ok_or_else(|| {
            format!(
                "{}:{tag} is not an approved tag for scope {scope}",
                repo.source
            )
        })?;
    if v.deprecated_at.is_some() || v.sunset_at.is_some() || v.replacement.is_some() {
        return Err(format!(
            "{}:{tag} already has a lifecycle (deprecated_at, sunset_at or replacement in {}); it is already being replaced",
            repo.source,
            repo.file.display()
        ));
    }
    let span = v.tag.as_ref().map(|t| t.span()).unwrap_or(0..0);
    let line_end = repo.text[span.end..]
        .find('\n')
        .map(|i| span.end + i + 1)
        .unwrap_or(repo.text.len());
    let mut out = String::with_capacity(repo.text.len() + 128);
    out.push_str(&repo.text[..line_end]);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out += &format!(
        "deprecated_at = {}\nsunset_at = {}\nreplacement = {}\n",
        rfc3339(deprecated_at),
        rfc3339(sunset_at),
        quote(replacement)
    );
    out.push_str(&repo.text[line_end..]);
    Ok(out)
}

// ---------------------------------------------------------------------------------------------------
// catalog init

/// The files of a starting catalog (relative path, text).
pub fn starting_files(organization: &str, private_registry: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            CATALOG_FILE,
            format!(
                r#"# The bundle's header and where images live. See docs/catalog.md.

# Who issues the bundles (shown by `pullgate bundle verify` and `inspect`).
issuer = "platform-security@{organization}.example"
# The registry nodes pull from; approved images are mirrored into it.
private_registry = "{private_registry}"
# How long a bundle built from this catalog stays valid.
validity = "30d"
# Registries reached over plain HTTP instead of TLS (only loopback test registries belong here).
plain_http = []
# The administrators' public keys: `pullgate approve --key` must hold one of them.
trust = "trust.toml"

# Where the approved copies of each public registry live in the private registry.
[[mirrors]]
source = "docker.io"
target = "approved"

# Prefixes in the private registry that a scope may run without approval (first-party images).
# [[first_party]]
# prefix = "{private_registry}/apps/payments/"
# scope = "{organization}/payments"
# require_digest = true

# Waves in which nodes take a new bundle up (optional).
# [[rollout]]
# after = "0s"
# percent = 10
# [[rollout]]
# after = "1h"
# percent = 100
"#
            ),
        ),
        (
            GOVERNANCE_FILE,
            format!(
                r#"# The organisation, its programs and projects, and the rules of each level. A lower level
# inherits what it does not write, and may only tighten. See docs/catalog.md.
organization = "{organization}"
application_label = "{organization}.example/application"
mode = "enforce"

[rules]
min_scanners = 2          # distinct scanners that must pass an image
max_severity = "high"     # worst severity a scanner may report (after ignore.toml)
max_versions = 3          # approved tags of one repository per scope
sunset_after = "30d"      # a replaced tag is deprecated now and sunset this much later
max_report_age = "7d"     # oldest scanner report approve accepts
# [rules.licenses]
# allow = ["MIT", "Apache-2.0", "BSD-2-Clause", "BSD-3-Clause"]
# deny = ["AGPL-3.0-only"]

# [[programs]]
# name = "payments"
# [[programs.projects]]
# name = "checkout"
# namespaces = ["checkout"]
# applications = ["web"]
"#
            ),
        ),
        (
            EXCEPTIONS_FILE,
            "# Break-glass exceptions: one image by digest for one scope, until it expires. See docs/catalog.md.\n\
             # [[exceptions]]\n\
             # source = \"docker.io/library/redis\"\n\
             # digest = \"sha256:…\"\n\
             # scope = \"corp/payments/checkout\"\n\
             # expires_at = 2026-03-21T00:00:00Z\n\
             # ticket = \"SEC-1234\"\n\
             # reason = \"…\"\n\
             # approved_by = \"alice@corp.example\"\n"
                .into(),
        ),
        (
            IGNORE_FILE,
            "# Scanner findings that do not apply, each with a reason and an expiry. See docs/catalog.md.\n\
             # [[ignore]]\n\
             # id = \"CVE-2024-0001\"\n\
             # reason = \"the vulnerable code path is not built\"\n\
             # expires = 2026-06-01T00:00:00Z\n\
             # package = \"openssl\"   # optional: only this package\n\
             # scanner = \"trivy\"     # optional: only this scanner\n"
                .into(),
        ),
        (
            "images/README.md",
            "One TOML file per approved repository, written by `pullgate approve`\n\
             (e.g. `docker.io/library/nginx.toml`). See docs/catalog.md.\n"
                .into(),
        ),
    ]
}

/// `pullgate catalog init DIR`: writes a starting catalog (never overwriting a file); `trust` is the
/// administrators' trust file to copy in (else a template to fill). Returns the files written.
pub fn init(
    dir: &Path,
    organization: &str,
    private_registry: &str,
    trust: Option<&Path>,
) -> Result<Vec<PathBuf>, String> {
    let mut files = starting_files(organization, private_registry);
    let trust_text = match trust {
        Some(p) => {
            let t = std::fs::read_to_string(p).map_err(|e| format!("cannot read the trust file {}: {e}", p.display()))?;
            Trust::from_toml(&t).map_err(|e| format!("{}: {e}", p.display()))?;
            t
        }
        None => "# The administrators' public keys (`pullgate keygen`). approve --key must be one of them.\n\
                 threshold = 2\n\
                 # [[keys]]\n\
                 # name = \"alice\"\n\
                 # public_key = \"ed25519:…\"\n"
            .into(),
    };
    files.push(("trust.toml", trust_text));
    for (rel, _) in &files {
        if dir.join(rel).exists() {
            return Err(format!(
                "{} exists; catalog init never overwrites a file",
                dir.join(rel).display()
            ));
        }
    }
    let mut written = Vec::new();
    for (rel, text) in files {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/catalog");

    /// A copy of the documented example catalog, to edit.
    pub(crate) fn copy_fixture() -> tempfile::TempDir {
        fn copy(from: &Path, to: &Path) {
            std::fs::create_dir_all(to).unwrap();
            for e in std::fs::read_dir(from).unwrap() {
                let e = e.unwrap();
                if e.path().is_dir() {
                    copy(&e.path(), &to.join(e.file_name()));
                } else {
                    std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
                }
            }
        }
        let t = tempfile::tempdir().unwrap();
        copy(Path::new(FIXTURE), t.path());
        t
    }

    fn edit(dir: &Path, rel: &str, from: &str, to: &str) {
        let p = dir.join(rel);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains(from), "{rel} has no {from:?}");
        std::fs::write(&p, text.replacen(from, to, 1)).unwrap();
    }

    fn problems(dir: &Path) -> Vec<String> {
        Catalog::load(dir)
            .unwrap_err()
            .0
            .iter()
            .map(|p| p.to_string())
            .collect()
    }

    #[test]
    fn the_fixture_loads_with_inherited_rules() {
        let c = Catalog::load(Path::new(FIXTURE)).unwrap();
        assert_eq!(c.repositories.len(), 2);
        let checkout = c.rules("corp/payments/checkout/web").unwrap();
        assert_eq!(checkout.bundle.max_severity.value, Severity::Medium);
        assert_eq!(checkout.max_versions, 2);
        assert_eq!(checkout.max_report_age, DEFAULT_MAX_REPORT_AGE);
        assert_eq!(&*checkout.bundle.max_severity.from, "corp/payments");
        let r = Reference::parse("nginx:1.27").unwrap();
        assert_eq!(c.mirror_path(&r).unwrap(), "approved/library/nginx");
        let now = time::macros::datetime!(2026-03-01 12:00 UTC);
        assert!(
            c.ignored(now, "trivy", "cve-2024-0001", "openssl")
                .is_some()
        );
        assert!(
            c.ignored(now, "grype", "CVE-2024-0001", "openssl")
                .is_none(),
            "scoped to trivy"
        );
        assert!(
            c.ignored(now, "trivy", "CVE-2024-0001", "zlib").is_none(),
            "scoped to openssl"
        );
        let later = time::macros::datetime!(2099-07-01 0:00 UTC);
        assert!(
            c.ignored(later, "trivy", "CVE-2024-0001", "openssl")
                .is_none(),
            "expired"
        );
    }

    #[test]
    fn every_problem_is_listed_with_file_line_and_key() {
        let t = copy_fixture();
        let d = t.path();
        let nginx = "images/docker.io/library/nginx.toml";
        edit(d, nginx, "replacement = \"1.26\"", "replacement = \"1.99\"");
        edit(d, nginx, "tag = \"1.26\"", "tag = \"1.25\"");
        edit(
            d,
            "images/registry.k8s.io/pause.toml",
            "scope = \"corp\"",
            "scope = \"corp/nowhere\"",
        );
        edit(
            d,
            "exceptions.toml",
            "ticket = \"SEC-1234\"",
            "ticket = \" \"",
        );
        edit(d, "ignore.toml", "package =", "pakage =");
        edit(
            d,
            "governance.toml",
            "max_severity = \"medium\"",
            "max_severity = \"critical\"",
        );
        edit(
            d,
            "images/registry.k8s.io/pause.toml",
            "license = \"Apache-2.0\"",
            "license = \"Apache-2\"",
        );
        let p = problems(d);
        let want = [
            "ignore.toml:5: unknown field `pakage`",
            "governance.toml:19: rules (corp/payments): governance rule of corp/payments loosens the rule of corp: max_severity critical is above high",
            "images/docker.io/library/nginx.toml:10: approved.replacement: 1.99 is not an approved tag",
            "images/docker.io/library/nginx.toml:32: approved.tag: tag 1.25 is bound to sha256:0202",
            "images/registry.k8s.io/pause.toml:4: approved.scope: scope corp/nowhere is not in governance.toml",
            "images/registry.k8s.io/pause.toml:7: approved.license: \"Apache-2\"",
            "exceptions.toml:2: exceptions.ticket: is empty",
        ];
        assert_eq!(
            p.len(),
            8,
            "no cascade of follow-on problems:\n{}",
            p.join("\n")
        );
        for w in want {
            assert!(
                p.iter().any(|x| x.starts_with(w)),
                "missing {w:?} in:\n{}",
                p.join("\n")
            );
        }
    }

    /// One digest may carry several tags in a scope, but not also be approved there without one: the
    /// node would have two approvals of it, each with its own provenance and lifecycle.
    #[test]
    fn a_digest_is_approved_bare_or_through_tags_not_both() {
        let t = copy_fixture();
        let d = t.path();
        let nginx = "images/docker.io/library/nginx.toml";
        let text = std::fs::read_to_string(d.join(nginx)).unwrap();
        let v126 = &text[text
            .find("[[approved]]\nscope = \"corp\"\ntag = \"1.26\"")
            .unwrap()..];
        let latest = v126.replacen("tag = \"1.26\"", "tag = \"latest\"", 1);
        std::fs::write(d.join(nginx), format!("{text}\n{latest}")).unwrap();
        let c = Catalog::load(d).expect("two tags of one digest are fine");
        let bundle =
            crate::admin::build::render(&c, 2, 1, time::macros::datetime!(2026-04-02 0:00 UTC));
        crate::policy::parse_bundle(&bundle).expect("and the node takes them");

        let bare = v126.replacen("tag = \"1.26\"\n", "", 1);
        std::fs::write(d.join(nginx), format!("{text}\n{bare}")).unwrap();
        let p = problems(d);
        assert_eq!(p.len(), 1, "{}", p.join("\n"));
        assert!(
            p[0].starts_with(&format!("{nginx}:55: approved.digest: sha256:0202"))
                && p[0].ends_with(
                    "is approved for corp both without a tag and as tag 1.26; keep one entry"
                ),
            "{}",
            p[0]
        );
    }

    /// docs/catalog.md shows the fixture directory unchanged, file by file, and nothing else.
    #[test]
    fn the_documented_example_is_the_fixture() {
        let doc = include_str!("../../docs/catalog.md");
        let example = &doc[doc.find("## Full example").expect("a Full example section")..];
        let mut shown = BTreeMap::new();
        let mut rest = example;
        while let Some(i) = rest.find("\n### `") {
            rest = &rest[i + 6..];
            let name_end = rest.find('`').unwrap();
            let name = rest[..name_end].to_owned();
            let body_start = rest.find("```toml\n").unwrap() + 8;
            let body_end = body_start + rest[body_start..].find("```\n").unwrap();
            shown.insert(name, rest[body_start..body_end].to_owned());
            rest = &rest[body_end..];
        }
        let mut files = Vec::new();
        collect_toml(
            Path::new(FIXTURE),
            Path::new(""),
            &mut files,
            &mut Vec::new(),
        );
        assert_eq!(
            shown.keys().map(PathBuf::from).collect::<BTreeSet<_>>(),
            files.iter().cloned().collect::<BTreeSet<_>>(),
            "docs/catalog.md must show every fixture file"
        );
        for f in files {
            let text = std::fs::read_to_string(Path::new(FIXTURE).join(&f)).unwrap();
            assert_eq!(
                shown[f.to_str().unwrap()],
                text,
                "docs/catalog.md differs from the fixture {}",
                f.display()
            );
        }
    }

    #[test]
    fn a_missing_catalog_says_how_to_make_one() {
        let t = tempfile::tempdir().unwrap();
        let p = problems(t.path());
        assert!(
            p[0].contains("catalog.toml") && p[0].contains("pullgate catalog init"),
            "{p:?}"
        );
    }

    #[test]
    fn init_writes_a_catalog_that_checks_once_keys_are_listed() {
        let t = tempfile::tempdir().unwrap();
        let trust = Path::new(FIXTURE).join("trust.toml");
        init(t.path(), "acme", "registry.acme.example", Some(&trust)).unwrap();
        let c = Catalog::load(t.path()).unwrap();
        assert_eq!(c.governance.organization, "acme");
        assert_eq!(c.rules("acme").unwrap().max_versions, DEFAULT_MAX_VERSIONS);
        let e = init(t.path(), "acme", "registry.acme.example", None).unwrap_err();
        assert!(e.contains("never overwrites"), "{e}");
        // Without a trust file, the template says what is missing.
        let t2 = tempfile::tempdir().unwrap();
        init(t2.path(), "acme", "registry.acme.example", None).unwrap();
        let p = problems(t2.path());
        assert!(
            p.len() == 1 && p[0].contains("trust.toml") && p[0].contains("no keys"),
            "{p:?}"
        );
    }

    #[test]
    fn times_read_and_written_as_rfc3339_says() {
        #[derive(Deserialize)]
        struct T {
            t: Time,
        }
        for text in [
            "2026-01-10T09:30:00Z",
            "2026-01-10T11:30:00+02:00",
            "2026-01-10T05:00:00.25-04:30",
            "1998-12-31T23:59:60Z",
            "0001-01-01T00:00:00Z",
        ] {
            let got: T = toml::from_str(&format!("t = {text}")).unwrap();
            let want = OffsetDateTime::parse(text, &Rfc3339).unwrap();
            assert_eq!(got.t.0, want, "{text}");
            let utc = want
                .to_offset(time::UtcOffset::UTC)
                .replace_nanosecond(0)
                .unwrap();
            assert_eq!(rfc3339(want), utc.format(&Rfc3339).unwrap(), "{text}");
        }
        for bad in ["2026-02-30T00:00:00Z", "2026-01-10T09:30:00", "2026-01-10"] {
            assert!(toml::from_str::<T>(&format!("t = {bad}")).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_second_file_of_a_source_is_found_in_a_large_catalog() {
        // Enough files for the check to run in several parts: the second file of a source may be the
        // first of a part.
        let t = copy_fixture();
        let d = t.path().join("images/registry.k8s.io");
        let text = std::fs::read_to_string(d.join("pause.toml")).unwrap();
        let mut want = Vec::new();
        for i in 0..60 {
            let source = format!("registry.k8s.io/pause{:02}", i / 2 * 2);
            let copy = text.replace("registry.k8s.io/pause\"", &format!("{source}\""));
            std::fs::write(d.join(format!("pause{i:02}.toml")), copy).unwrap();
            if i % 2 == 1 {
                want.push(format!(
                    "images/registry.k8s.io/pause{i:02}.toml:1: source: {source} is also described by images/registry.k8s.io/pause{:02}.toml; keep one file per repository",
                    i - 1
                ));
            }
        }
        assert_eq!(problems(t.path()), want);
    }

    #[test]
    fn the_layout_reader_takes_what_approve_writes_and_agrees_with_toml() {
        let nginx =
            std::fs::read_to_string(Path::new(FIXTURE).join("images/docker.io/library/nginx.toml"))
                .unwrap();
        let by_serde = |t: &str| {
            toml::from_str::<RepositoryFile>(t)
                .ok()
                .map(|r| format!("{r:?}"))
        };
        // (from, to, whether the line-by-line reader takes the result itself).
        let variants: &[(&str, &str, bool)] = &[
            ("", "", true),
            ("scope = \"corp\"", "  scope = \"corp\"", true),
            ("scope = \"corp\"", "scope=\"corp\"", true),
            (
                "scope = \"corp\"",
                "scope\t=\t\"corp\"   # the organisation",
                true,
            ),
            ("scope = \"corp\"", "scope = \"corp\"#x", true),
            ("scope = \"corp\"", "scope = \"\"", true),
            ("[[approved]]", "  [[approved]]  ", true),
            (
                "[\"linux/amd64\", \"linux/arm64\"]",
                "[ \"linux/amd64\" , \"linux/arm64\", ]",
                true,
            ),
            ("[\"linux/amd64\", \"linux/arm64\"]", "[]", true),
            (
                "approved_at = 2026-01-10T09:30:00Z",
                "approved_at = 2026-01-10T09:30:00.25+02:00",
                true,
            ),
            (
                "approved_by = \"bab14e60b2c4df72\"",
                "approved_by = \"bäb — ✓\"",
                true,
            ),
            (
                "approved_by = \"bab14e60b2c4df72\"",
                "approved_by = \"b\\u00e4b\"",
                false,
            ),
            (
                "approved_by = \"bab14e60b2c4df72\"",
                "approved_by = 'bab14e60b2c4df72'",
                false,
            ),
            (
                "approved_by = \"bab14e60b2c4df72\"",
                "approved_by = \"\"\"bab\"\"\"",
                false,
            ),
            (
                "approved_by = \"bab14e60b2c4df72\"",
                "\"approved_by\" = \"bab14e60b2c4df72\"",
                false,
            ),
            ("[[approved]]", "[[approved]] # next", false),
            (
                "approved_at = 2026-01-10T09:30:00Z",
                "approved_at = 2026-01-10 09:30:00Z",
                false,
            ),
            (
                "approved_at = 2026-01-10T09:30:00Z",
                "approved_at = 2026-01-10T09:30:00",
                false,
            ),
            (
                "approved_at = 2026-01-10T09:30:00Z",
                "approved_at = \"2026-01-10T09:30:00Z\"",
                false,
            ),
            ("tag = \"1.25\"", "tag = 1.25", false),
            ("tag = \"1.25\"", "tag = 2026-01-10T09:30:00Z", false),
            ("tag = \"1.25\"", "tag = \"1.25\"\ntag = \"1.26\"", false),
            ("scope = \"corp\"", "scope = \"corp\" \"x\"", false),
            ("scope = \"corp\"", "scope = \"co\u{1}rp\"", false),
            ("scope = \"corp\"", "scans = []", false),
            ("# Approved", "# Appr\u{7f}oved", false),
            (
                "source = \"docker.io/library/nginx\"",
                "source = \"docker.io/library/nginx\"\nsource = \"x\"",
                false,
            ),
            (
                "source = \"docker.io/library/nginx\"",
                "[[approved.scans]]\nscanner = \"x\"",
                false,
            ),
            (
                "worst_severity = \"low\"",
                "worst_severity = \"lowish\"",
                false,
            ),
            ("\n", "\r\n", false),
        ];
        for &(from, to, layout) in variants {
            let text = if to.is_empty() {
                nginx.clone()
            } else {
                nginx.replace(from, to)
            };
            assert!(
                to.is_empty() || nginx.contains(from),
                "the fixture has {from:?}"
            );
            assert_eq!(
                fast::layout::repository(&text).is_some(),
                layout,
                "line reader on {from:?} → {to:?}"
            );
            if let Some(fast) = fast::repository(&text) {
                assert_eq!(
                    Some(format!("{fast:?}")),
                    by_serde(&text),
                    "{from:?} → {to:?}"
                );
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1000))]

        /// Whatever the line reader takes from an edited repository file, toml takes too, with the
        /// same values and spans: TOML's corners (quotes, escapes, comments, date-times, headers,
        /// repeated keys, control characters) go to toml's document or serde, never a reading of
        /// their own.
        #[test]
        fn the_layout_reader_takes_no_file_that_toml_reads_otherwise(
            lines in proptest::collection::vec(
                (proptest::prelude::any::<proptest::sample::Index>(), 0..3_usize),
                0..2,
            ),
            edits in proptest::collection::vec(
                (
                    proptest::prelude::any::<proptest::sample::Index>(),
                    0..3_usize,
                    0..4_usize,
                    proptest::sample::select(&[
                        " ", "\t", "#", "\"", "'", "\\", "[", "]", ",", "=", ".", "\n", "\r",
                        "\u{feff}", "\u{7f}", "\u{85}", "T", "t", "Z", "z", ":", "-", "+", "0",
                        "60", ".5", "+01:00", " 09:30:00", "\"\"\"", "\"\"", "{", "}", "é", "x",
                        "_", "\\u0041", "[[approved]]\n", "[[approved.scans]]\n", "[approved]\n",
                        "scans = []\n", "tag = \"x\"\n", "source = \"a/b\"\n",
                        "platforms = [\"a\"]\n", "approved_at",
                    ][..]),
                ),
                0..3,
            ),
        ) {
            let nginx = std::fs::read_to_string(
                Path::new(FIXTURE).join("images/docker.io/library/nginx.toml"),
            )
            .unwrap();
            // Lines swapped, repeated or dropped, then pieces put in, over or out.
            let mut text: Vec<&str> = nginx.split_inclusive('\n').collect();
            for (at, op) in lines {
                let a = at.index(text.len());
                let b = (a + 1) % text.len();
                match op {
                    0 => text.swap(a, b),
                    1 => text.insert(a, text[b]),
                    _ => drop(text.remove(a)),
                }
            }
            let mut text = text.concat();
            for (at, op, len, piece) in edits {
                let start = (0..=at.index(text.len() + 1))
                    .rev()
                    .find(|&i| text.is_char_boundary(i))
                    .unwrap_or(0);
                let end = (start + len..=text.len())
                    .find(|&i| text.is_char_boundary(i))
                    .unwrap_or(text.len());
                match op {
                    0 => text.insert_str(start, piece),
                    1 => text.replace_range(start..end, piece),
                    _ => text.replace_range(start..end, ""),
                }
            }
            if let Some(line) = fast::layout::repository(&text) {
                let by_toml = toml::from_str::<RepositoryFile>(&text);
                proptest::prop_assert!(by_toml.is_ok(), "{text:?}: {by_toml:?}");
                proptest::prop_assert_eq!(
                    format!("{line:?}"),
                    format!("{:?}", by_toml.unwrap()),
                    "{:?}",
                    text
                );
            }
        }
    }

    #[test]
    fn a_repository_described_by_two_files_is_a_problem() {
        let t = copy_fixture();
        let d = t.path();
        let text = std::fs::read_to_string(d.join("images/docker.io/library/nginx.toml")).unwrap();
        // `nginx` is docker.io/library/nginx too.
        let copy = text.replace("source = \"docker.io/library/nginx\"", "source = \"nginx\"");
        std::fs::write(d.join("images/nginx.toml"), &copy).unwrap();
        std::fs::write(d.join("images/nginx-again.toml"), &copy).unwrap();
        assert_eq!(
            problems(d),
            [
                "images/nginx-again.toml:3: source: docker.io/library/nginx is also described by images/docker.io/library/nginx.toml; keep one file per repository",
                "images/nginx.toml:3: source: docker.io/library/nginx is also described by images/nginx-again.toml; keep one file per repository",
            ]
        );
    }

    /// The repository files' fast path reads a file exactly as serde does, spans included, and hands
    /// every file it does not expect to serde (whose problems the tests above check).
    #[test]
    fn the_fast_path_reads_repository_files_as_serde_does() {
        let read = |rel: &str| std::fs::read_to_string(Path::new(FIXTURE).join(rel)).unwrap();
        let nginx = read("images/docker.io/library/nginx.toml");
        let inline = concat!(
            "source = \"quay.io/team/tool\"\n",
            "approved = [\n",
            "  { scope = \"corp/payments\", digest = \"sha256:01\", license = \"MIT\", approved_by = \"k\", ",
            "approved_at = 2026-01-10T09:30:00.25+02:00, sunset_at = 2026-06-30T23:59:60Z, platforms = [], ",
            "scans = [{ scanner = \"trivy\", version = \"1\", report = \"r\", worst_severity = \"critical\", ",
            "scanned_at = 2026-01-10T09:00:00-05:30 }] },\n",
            "]\n",
        );
        for text in [
            nginx.as_str(),
            &read("images/registry.k8s.io/pause.toml"),
            inline,
            "source = \"docker.io/library/empty\"\n",
        ] {
            let by_serde: RepositoryFile = toml::from_str(text).unwrap();
            let fast = fast::repository(text).expect("the fast path takes a valid file");
            assert_eq!(format!("{fast:?}"), format!("{by_serde:?}"), "{text}");
        }
        for (from, to) in [
            ("approved_by =", "approvedby ="),
            ("worst_severity = \"low\"", "worst_severity = \"lowish\""),
            ("worst_severity = \"low\"", "worst_severity = 3"),
            (
                "approved_at = 2026-01-10T09:30:00Z",
                "approved_at = 2026-01-10T09:30:00",
            ),
            ("license = \"BSD-2-Clause\"", "license = [\"BSD-2-Clause\"]"),
            ("scope = \"corp\"\n", ""),
            ("source = \"docker.io/library/nginx\"", "[source]"),
            ("[[approved.scans]]", "[approved.scans]"),
            ("scope = \"corp\"", "scope = \"corp"),
        ] {
            let text = nginx.replacen(from, to, 1);
            assert!(
                toml::from_str::<RepositoryFile>(&text).is_err(),
                "serde takes {from} → {to}"
            );
            assert!(fast::repository(&text).is_none(), "{from} → {to}");
        }
    }

    /// The text `approve --replace 1.26` of `nginx:1.27` (licence MIT, a trivy and a grype scan) makes
    /// of the example's nginx file, at `now`, with 1.26 sunset at `sunset`.
    pub(crate) fn replace_nginx_126(
        repo: &Repository,
        now: OffsetDateTime,
        sunset: OffsetDateTime,
    ) -> String {
        let text = insert_lifecycle(repo, "1.26", "corp", now, sunset, "1.27").unwrap();
        let scan = |scanner: &str, n: u8| NewScan {
            scanner: scanner.into(),
            version: "1".into(),
            report: Digest::Sha256([n; 32]),
            worst_severity: Severity::Low,
            scanned_at: now,
        };
        let new = NewVersion {
            scope: "corp".into(),
            tag: Some("1.27".into()),
            digest: Digest::Sha256([0x27; 32]),
            platforms: vec![],
            license: "MIT".into(),
            approved_by: "bab14e60b2c4df72".into(),
            approved_at: now,
            scans: vec![scan("trivy", 0x71), scan("grype", 0x72)],
        };
        text + &render_version(&new)
    }

    #[test]
    fn approve_edits_keep_the_file_valid_and_its_comments() {
        let c = Catalog::load(Path::new(FIXTURE)).unwrap();
        let repo = c.repository("docker.io/library/nginx").unwrap();
        let now = time::macros::datetime!(2026-05-01 10:00 UTC);
        let e = insert_lifecycle(repo, "1.25", "corp", now, now, "1.26").unwrap_err();
        assert!(e.contains("already has a lifecycle"), "{e}");
        let text = replace_nginx_126(repo, now, now + time::Duration::days(30));
        assert!(text.starts_with("# Approved versions"), "comments kept");
        let parsed: RepositoryFile = toml::from_str(&text).unwrap();
        let v126 = parsed
            .approved
            .iter()
            .find(|v| v.tag.as_ref().unwrap().get_ref() == "1.26")
            .unwrap();
        assert_eq!(v126.deprecated_at, Some(Time(now)));
        assert_eq!(v126.replacement.as_ref().unwrap().get_ref(), "1.27");
        assert_eq!(v126.scans.len(), 2, "the scans stay with their entry");
        let v127 = parsed.approved.last().unwrap();
        assert_eq!(
            v127.digest.get_ref(),
            &Digest::Sha256([0x27; 32]).to_string()
        );
        assert_eq!(v127.scans[0].worst_severity, Severity::Low);
        assert!(insert_lifecycle(repo, "9.9", "corp", now, now, "1.26").is_err());
    }
}
