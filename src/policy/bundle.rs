//! The allowlist bundle: on-disk format (JSON, formats 1 and 2), validation, the lookup index, and
//! [`verify_bundle`], the pure function that turns bundle and signature bytes into a [`VerifiedBundle`].
//!
//! The format is documented in `docs/bundle.md`. In short: a JSON object with `format` (1 or 2),
//! `version` (strictly increasing), `issued_at`/`expires_at` (RFC 3339), `issuer`, `private_registry`,
//! `mirrors` (public source → path in the private registry), `governance` (see [`super::scope`]),
//! `first_party` prefixes and `images` (source repository, tags bound to digests, bare digests, scope,
//! provenance). Format 2 adds a [`Lifecycle`] per tag and digest, scan and licence rules per governance
//! level ([`super::rules`]), [`Exception`]s and `rollout` waves ([`super::rollout`]); a format 1
//! bundle that uses any of them is rejected, so format 1 keeps meaning exactly what it meant.
//!
//! JSON was chosen because serde_json parses it in one fast pass and it diffs well in review. Unknown
//! fields are rejected (`deny_unknown_fields`) so a typo cannot silently drop a restriction; the format
//! number is bumped for any change older readers must not misread. Images are converted to compact
//! entries while the array is being parsed (repeated strings such as licences, scanners and approvers are
//! interned, digests are stored as bytes), so a 100,000-image bundle costs a few tens of MiB.
//!
//! [`VerifiedBundle`] is immutable, `Send + Sync`, and indexed: repository → entries is a hash lookup,
//! tags and digests inside an entry are binary searches, so a decision does not slow down as the bundle
//! grows. The daemon keeps it in an `Arc` and swaps it atomically on reload.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use serde::Deserialize;
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use time::OffsetDateTime;

use super::license::LicenseExpression;
use super::reference::{
    self, DEFAULT_DOMAIN, Digest, LEGACY_DEFAULT_DOMAIN, Reference, path_has_prefix,
};
use super::rollout::{RawStep, Step};
use super::scope::{RawGovernance, ScopeId, Scopes};
use super::trust::{SignatureError, SignatureFile, Trust, verify_signatures_for_hash};

pub mod compiled;

/// The newest bundle format this version reads (it reads every format in [`SUPPORTED_FORMATS`]).
pub const BUNDLE_FORMAT: u32 = 2;
/// The bundle formats this version reads.
pub const SUPPORTED_FORMATS: &[u64] = &[1, 2];
/// How far in the future `issued_at` may be before the bundle is rejected (clock skew between the
/// signing workstation and the node).
pub const MAX_CLOCK_SKEW: time::Duration = time::Duration::minutes(5);
/// Largest bundle read when the caller sets no other limit. A 100,000-image bundle is about 40 MiB
/// in format 1 (`cargo bench --bench policy`) and about 80 MiB in format 2 as `bundle build` writes
/// it, with each entry's provenance (`cargo bench --bench admin`), so this leaves room for about
/// 160,000 images in format 2.
pub const DEFAULT_MAX_BUNDLE_SIZE: u64 = 128 * 1024 * 1024;

/// Why a bundle was rejected. Every variant names the problem and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// The signatures are missing, bad, from unknown keys or fewer than the threshold.
    #[error("bundle signatures rejected: {0}")]
    Signature(#[from] SignatureError),
    /// Not JSON, wrong types, unknown or missing fields.
    #[error("bundle is malformed: {0}; see docs/bundle.md for the format")]
    Malformed(String),
    /// A `format` this version does not understand.
    #[error(
        "bundle format {0} is not supported by this pullgate (it reads formats 1 and 2); upgrade pullgate or publish a format 1 or 2 bundle"
    )]
    UnsupportedFormat(u64),
    /// A field has an invalid value.
    #[error("bundle is invalid: {0}")]
    Invalid(String),
    /// A digest is malformed.
    #[error("bundle has an invalid digest: {0}")]
    InvalidDigest(String),
    /// The same thing is listed twice.
    #[error("bundle has a duplicate entry: {0}; merge the entries")]
    Duplicate(String),
    /// Two entries contradict each other.
    #[error("bundle has conflicting entries: {0}")]
    Conflict(String),
    /// `expires_at` has passed.
    #[error(
        "bundle version {version} expired at {expires_at} (now {now}); publish a new signed bundle"
    )]
    Expired {
        version: u64,
        expires_at: String,
        now: String,
    },
    /// `issued_at` is further in the future than the allowed clock skew.
    #[error(
        "bundle version {version} is issued at {issued_at}, in the future (now {now}, allowed skew 5 minutes); check the clocks of the node and of the signer"
    )]
    IssuedInFuture {
        version: u64,
        issued_at: String,
        now: String,
    },
    /// The version is not greater than the installed one.
    #[error(
        "bundle version {version} is not newer than the installed version {installed} (rollback refused); publish a bundle with a higher version"
    )]
    Rollback { version: u64, installed: u64 },
    /// The bundle is larger than the size limit; nothing in it was parsed.
    #[error(
        "bundle is larger than the limit of {max} bytes ({} MiB) and was refused unread; publish a smaller bundle, or raise policy.max_bundle_size on the nodes if it is genuine",
        max / (1024 * 1024)
    )]
    TooLarge { max: u64 },
    /// An exception lasts longer after `issued_at` than the node's trust file allows.
    #[error("bundle has an exception that lasts too long: {0}")]
    ExceptionTooLong(String),
    /// The bundle's scan rule is below the floor of the node's trust file.
    #[error("bundle is below this node's trust floor: {0}")]
    BelowTrustFloor(String),
}

impl BundleError {
    /// A stable snake_case code for logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            BundleError::Signature(SignatureError::Missing { .. }) => "missing_signature",
            BundleError::Signature(
                SignatureError::Bad { .. } | SignatureError::Undecodable { .. },
            ) => "bad_signature",
            BundleError::Signature(SignatureError::NotEnough { .. }) => "not_enough_signatures",
            BundleError::Malformed(_) => "malformed",
            BundleError::UnsupportedFormat(_) => "unsupported_format",
            BundleError::Invalid(_) => "invalid",
            BundleError::InvalidDigest(_) => "invalid_digest",
            BundleError::Duplicate(_) => "duplicate",
            BundleError::Conflict(_) => "conflict",
            BundleError::Expired { .. } => "expired",
            BundleError::IssuedInFuture { .. } => "issued_in_future",
            BundleError::Rollback { .. } => "rollback",
            BundleError::TooLarge { .. } => "too_large",
            BundleError::ExceptionTooLong(_) => "exception_too_long",
            BundleError::BelowTrustFloor(_) => "below_trust_floor",
        }
    }
}

/// Worst vulnerability severity a scanner found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Nothing found.
    None,
    /// Findings of unknown severity.
    Unknown,
    /// Low.
    Low,
    /// Medium.
    Medium,
    /// High.
    High,
    /// Critical.
    Critical,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::None => "none",
            Severity::Unknown => "unknown",
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        })
    }
}

/// A vulnerability scan that passed an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// Scanner name, e.g. `trivy`.
    pub scanner: Arc<str>,
    /// Scanner version.
    pub version: Arc<str>,
    /// Digest of the scan report.
    pub report: Digest,
    /// Worst severity found.
    pub worst_severity: Severity,
}

/// Why an image was approved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provenance {
    /// SPDX licence expression.
    pub license: Arc<str>,
    /// Scans that passed it (at least one).
    pub scans: Box<[Scan]>,
    /// Who approved it.
    pub approved_by: Arc<str>,
    /// When (Unix seconds).
    pub approved_at: i64,
}

/// When an approved tag or digest retires (format 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lifecycle {
    /// From then on still allowed, with reason `deprecated`.
    pub deprecated_at: Option<OffsetDateTime>,
    /// From then on denied, with reason `sunset`.
    pub sunset_at: Option<OffsetDateTime>,
    /// The approved tag of the same repository to move to.
    pub replacement: Option<Arc<str>>,
}

/// Where an image is in its [`Lifecycle`] at some time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LifecycleState {
    /// Before `deprecated_at` and `sunset_at`.
    Active,
    /// At or after `deprecated_at`, before `sunset_at`.
    Deprecated,
    /// At or after `sunset_at`.
    Sunset,
}

impl LifecycleState {
    /// `active`, `deprecated` or `sunset`.
    pub fn as_str(self) -> &'static str {
        match self {
            LifecycleState::Active => "active",
            LifecycleState::Deprecated => "deprecated",
            LifecycleState::Sunset => "sunset",
        }
    }
}

impl Lifecycle {
    /// The state at `now`.
    pub fn state(&self, now: OffsetDateTime) -> LifecycleState {
        if self.sunset_at.is_some_and(|t| now >= t) {
            LifecycleState::Sunset
        } else if self.deprecated_at.is_some_and(|t| now >= t) {
            LifecycleState::Deprecated
        } else {
            LifecycleState::Active
        }
    }

    /// The next time after `now` at which the state changes, if any.
    pub fn next_change(&self, now: OffsetDateTime) -> Option<OffsetDateTime> {
        [self.deprecated_at, self.sunset_at]
            .into_iter()
            .flatten()
            .filter(|t| *t > now)
            .min()
    }

    /// One line for `inspect` and `diff`.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if let Some(t) = self.deprecated_at {
            parts.push(format!("deprecated {}", rfc3339(t)));
        }
        if let Some(t) = self.sunset_at {
            parts.push(format!("sunset {}", rfc3339(t)));
        }
        if let Some(r) = &self.replacement {
            parts.push(format!("replacement {r}"));
        }
        parts.join(", ")
    }
}

/// One approved image: a source repository approved for one scope.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageEntry {
    source: Arc<str>,
    scope_path: Arc<str>,
    scope: ScopeId,
    tags: Box<[(Box<str>, Digest)]>,
    digests: Box<[Digest]>,
    /// Lifecycles of tags (index into `tags`) and bare digests (index into `digests` plus
    /// `tags.len()`), sorted by index; empty for most entries and in format 1.
    lifecycles: Box<[(u32, Lifecycle)]>,
    provenance: Provenance,
}

/// A break-glass exception (format 2): a time-limited approval of one digest for one scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exception {
    /// Canonical source repository.
    pub source: Arc<str>,
    /// The digest it covers.
    pub digest: Digest,
    /// A tag that resolves to `digest` through the exception.
    pub tag: Option<Box<str>>,
    /// Scope path.
    pub scope_path: Arc<str>,
    /// Scope id.
    pub scope: ScopeId,
    /// When it stops allowing.
    pub expires_at: OffsetDateTime,
    /// The ticket that approved it.
    pub ticket: String,
    /// Why.
    pub reason: String,
    /// Who approved it.
    pub approved_by: String,
}

impl Exception {
    /// One line for `inspect`, `diff` and `status`.
    pub fn summary(&self) -> String {
        format!(
            "{}@{}{} for {} until {} (ticket {}, approved by {}: {})",
            self.source,
            self.digest,
            self.tag
                .as_deref()
                .map(|t| format!(" (tag {t})"))
                .unwrap_or_default(),
            self.scope_path,
            rfc3339(self.expires_at),
            self.ticket,
            self.approved_by,
            self.reason
        )
    }
}

/// RFC 3339 text of a time.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl ImageEntry {
    /// The canonical source repository, e.g. `docker.io/library/nginx`.
    pub fn source(&self) -> &str {
        &self.source
    }
    pub(crate) fn source_arc(&self) -> Arc<str> {
        self.source.clone()
    }
    /// The scope path this entry is approved for.
    pub fn scope_path(&self) -> &Arc<str> {
        &self.scope_path
    }
    /// The scope id this entry is approved for.
    pub fn scope(&self) -> ScopeId {
        self.scope
    }
    /// Approved tags and their digests, sorted by tag.
    pub fn tags(&self) -> &[(Box<str>, Digest)] {
        &self.tags
    }
    /// Approved bare digests, sorted.
    pub fn digests(&self) -> &[Digest] {
        &self.digests
    }
    /// Provenance of the approval.
    pub fn provenance(&self) -> &Provenance {
        &self.provenance
    }
    /// The digest an approved tag is bound to.
    pub fn tag(&self, tag: &str) -> Option<&Digest> {
        self.tags
            .binary_search_by(|(t, _)| (**t).cmp(tag))
            .ok()
            .map(|i| &self.tags[i].1)
    }
    /// True when `digest` is approved by this entry (as a bare digest or through a tag).
    pub fn has_digest(&self, digest: &Digest) -> bool {
        self.digests.binary_search(digest).is_ok() || self.tags.iter().any(|(_, d)| d == digest)
    }

    fn lifecycle_at(&self, index: usize) -> Option<&Lifecycle> {
        self.lifecycles
            .binary_search_by_key(&(index as u32), |(i, _)| *i)
            .ok()
            .map(|i| &self.lifecycles[i].1)
    }

    /// The lifecycle of an approved tag, if it has one.
    pub fn tag_lifecycle(&self, tag: &str) -> Option<&Lifecycle> {
        if self.lifecycles.is_empty() {
            return None;
        }
        let i = self.tags.binary_search_by(|(t, _)| (**t).cmp(tag)).ok()?;
        self.lifecycle_at(i)
    }

    /// The lifecycle of an approved bare digest, if it has one.
    pub fn digest_lifecycle(&self, digest: &Digest) -> Option<&Lifecycle> {
        if self.lifecycles.is_empty() {
            return None;
        }
        let i = self.digests.binary_search(digest).ok()?;
        self.lifecycle_at(self.tags.len() + i)
    }

    /// Every route by which this entry approves `digest`: the bare digest and each tag bound to it,
    /// with the tag (if any) and the lifecycle (if any).
    pub fn routes<'e>(
        &'e self,
        digest: &'e Digest,
    ) -> impl Iterator<Item = (Option<&'e str>, Option<&'e Lifecycle>)> + 'e {
        let bare = self
            .digests
            .binary_search(digest)
            .ok()
            .map(|i| (None, self.lifecycle_at(self.tags.len() + i)));
        let tagged = self
            .tags
            .iter()
            .enumerate()
            .filter(move |(_, (_, d))| d == digest)
            .map(move |(i, (t, _))| (Some(&**t), self.lifecycle_at(i)));
        bare.into_iter().chain(tagged)
    }

    /// Every lifecycle of this entry: `(tag, digest, lifecycle)`, the tag absent for a bare digest.
    pub fn lifecycles(&self) -> impl Iterator<Item = (Option<&str>, &Digest, &Lifecycle)> {
        self.lifecycles.iter().map(|(i, l)| {
            let i = *i as usize;
            match self.tags.get(i) {
                Some((t, d)) => (Some(&**t), d, l),
                None => (None, &self.digests[i - self.tags.len()], l),
            }
        })
    }
}

/// A mirror mapping: images from `source` live under `target` in the private registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    /// Public registry host (and port), e.g. `docker.io`.
    pub source_domain: String,
    /// Optional path prefix inside the source registry (`""` for the whole registry).
    pub source_path: String,
    /// Path prefix in the private registry, e.g. `approved`.
    pub target_path: String,
}

impl Mirror {
    /// `source_domain[/source_path]`.
    pub fn source(&self) -> String {
        if self.source_path.is_empty() {
            self.source_domain.clone()
        } else {
            format!("{}/{}", self.source_domain, self.source_path)
        }
    }
}

/// A first-party prefix in the private registry that a scope may run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirstParty {
    /// Path prefix in the private registry (whole components), e.g. `apps/payments`.
    pub path: String,
    /// Scope path allowed to run it.
    pub scope_path: Arc<str>,
    /// Scope id.
    pub scope: ScopeId,
    /// Whether references must be digest-pinned.
    pub require_digest: bool,
}

/// A parsed, validated and indexed bundle (signatures not necessarily checked; see [`VerifiedBundle`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Bundle {
    /// Bundle format (1 or 2).
    pub format: u32,
    /// Bundle version (strictly increasing).
    pub version: u64,
    /// Issue time.
    pub issued_at: OffsetDateTime,
    /// Expiry time.
    pub expires_at: OffsetDateTime,
    /// Who issued it.
    pub issuer: String,
    /// The private registry host (and port).
    pub private_registry: String,
    mirrors: Vec<Mirror>,
    scopes: Scopes,
    first_party: Vec<FirstParty>,
    images: Vec<ImageEntry>,
    repos: HashMap<Arc<str>, (u32, u32)>,
    /// Exceptions, sorted by source.
    exceptions: Vec<Exception>,
    rollout: Option<Box<[Step]>>,
    /// The parsed licence expression of every distinct provenance licence (format 2 only).
    licenses: HashMap<Arc<str>, LicenseExpression>,
}

/// A bundle whose signatures, times and version were checked by [`verify_bundle`]. Only this type can be
/// given to [`super::decide`].
#[derive(Debug, Clone)]
pub struct VerifiedBundle {
    bundle: Bundle,
    signers: Vec<String>,
    signed: SignedBytes,
}

impl VerifiedBundle {
    /// Names of the trusted administrators whose signatures verified.
    pub fn signers(&self) -> &[String] {
        &self.signers
    }

    /// The signed bytes this bundle was read from (what its signatures cover).
    pub fn signed(&self) -> &SignedBytes {
        &self.signed
    }
}

/// What identifies the exact bytes of a signed bundle: their SHA-512 (what the signatures cover) and
/// their length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedBytes {
    pub sha512: [u8; 64],
    pub len: u64,
}

impl Deref for VerifiedBundle {
    type Target = Bundle;
    fn deref(&self) -> &Bundle {
        &self.bundle
    }
}

/// Verifies and loads a bundle. Pure: no file I/O, the caller supplies the bytes and the clock.
///
/// Order: signatures (k-of-n over the exact bytes, before any parsing of the content), then parsing and
/// validation, then expiry, issue time (with [`MAX_CLOCK_SKEW`]) and rollback against
/// `installed_version`.
pub fn verify_bundle(
    bundle_bytes: &[u8],
    signatures: &SignatureFile,
    trust: &Trust,
    installed_version: Option<u64>,
    now: OffsetDateTime,
) -> Result<VerifiedBundle, BundleError> {
    use sha2::Digest as _;
    let signed = SignedBytes {
        sha512: sha2::Sha512::digest(bundle_bytes).into(),
        len: bundle_bytes.len() as u64,
    };
    let signers = verify_signatures_for_hash(&signed.sha512, signatures, trust)?;
    let bundle = parse_bundle(bundle_bytes)?;
    check_times_and_version(bundle, signers, signed, trust, installed_version, now)
}

/// [`verify_bundle`] for a bundle read back from its compiled form ([`compiled::read`]): the
/// signatures are checked against the SHA-512 the compiled form records, then times and version.
/// The caller vouches that the compiled form was written from a bundle whose bytes have that
/// SHA-512 (the node's state directory is trusted like its trust file).
pub fn verify_compiled(
    compiled: compiled::Compiled,
    signatures: &SignatureFile,
    trust: &Trust,
    installed_version: Option<u64>,
    now: OffsetDateTime,
) -> Result<VerifiedBundle, BundleError> {
    let signers = verify_signatures_for_hash(&compiled.signed.sha512, signatures, trust)?;
    check_times_and_version(
        compiled.bundle,
        signers,
        compiled.signed,
        trust,
        installed_version,
        now,
    )
}

/// [`verify_bundle`] for a bundle read from `reader` (e.g. the open bundle file) of at most
/// `max_size` bytes, without holding the whole file in memory.
///
/// Two passes: the first hashes the bytes and checks the k-of-n signatures before anything is parsed,
/// so content whose signatures do not hold (or that is over `max_size`, which a seek to the end shows
/// before any byte is read) costs at most one linear pass. The second parses while hashing again (with
/// SHA-256, which the first pass also computed beside the SHA-512 the signatures cover), and the
/// result is kept only if both hashes match: what was parsed is what was signed, even if the file
/// changed in between.
///
/// The outcome is the same as [`verify_bundle`] over the same bytes: signature errors take precedence
/// over everything else, and nothing parsed from a bundle is returned unless its signatures verify.
/// The outer error is an I/O error of `reader` (or the file changing between the passes).
///
/// One difference in error reporting only: when the JSON is malformed, the format number (to report
/// `unsupported_format` instead of `malformed`) is known only if it appears before the error.
pub fn verify_bundle_reader<R: std::io::Read + std::io::Seek>(
    mut reader: R,
    signatures: &SignatureFile,
    trust: &Trust,
    installed_version: Option<u64>,
    now: OffsetDateTime,
    max_size: u64,
) -> std::io::Result<Result<VerifiedBundle, BundleError>> {
    use sha2::Digest as _;
    use std::io::{Read, SeekFrom};

    // Pass 1: size, hash, signatures.
    if reader.seek(SeekFrom::End(0))? > max_size {
        return Ok(Err(BundleError::TooLarge { max: max_size }));
    }
    reader.seek(SeekFrom::Start(0))?;
    let limited = (&mut reader).take(max_size.saturating_add(1));
    let (read, signed, size) = hashed(limited, |r| {
        // Large reads: fewer system calls and chunks for the hasher. While the SHA-512 the
        // signatures cover is computed on its own thread, this one computes a SHA-256 of the same
        // bytes (about three times cheaper where the CPU has SHA extensions), which is all the
        // second pass needs to recompute.
        let mut chunk = vec![0u8; 256 * 1024];
        let mut check = sha2::Sha256::new();
        loop {
            let n = r.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            check.update(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(check.finalize())
    })?;
    let first_pass = read?;
    if size > max_size {
        return Ok(Err(BundleError::TooLarge { max: max_size }));
    }
    let signers = match verify_signatures_for_hash(&signed, signatures, trust) {
        Ok(s) => s,
        Err(e) => return Ok(Err(e.into())),
    };
    // Pass 2: parse, hashing again; never more than pass 1 accepted (plus one byte, to notice growth).
    reader.seek(SeekFrom::Start(0))?;
    SEEN_FORMAT.with(|f| f.set(None));
    let mut second = Sha256Reader {
        inner: (&mut reader).take(max_size.saturating_add(1)),
        hash: sha2::Sha256::new(),
    };
    let parsed = serde_json::from_reader::<_, RawBundle>(std::io::BufReader::with_capacity(
        1 << 17,
        &mut second,
    ));
    let parsed = match parsed {
        Err(e) if e.is_io() => return Err(e.into()),
        other => other,
    };
    // Hash whatever the parser did not read (all of it after a parse error), so the digest is over
    // the exact bytes.
    std::io::copy(&mut second, &mut std::io::sink())?;
    if second.hash.finalize() != first_pass {
        return Err(std::io::Error::other(
            "the bundle changed while it was being read (the bytes parsed are not the bytes whose signatures were checked); try again",
        ));
    }
    let result = (|| {
        let raw = parsed.map_err(|e| {
            match SEEN_FORMAT
                .with(|f| f.get())
                .filter(|f| !SUPPORTED_FORMATS.contains(f))
            {
                Some(f) => BundleError::UnsupportedFormat(f),
                None => BundleError::Malformed(e.to_string()),
            }
        })?;
        let bundle = build_checked(raw)?;
        let signed = SignedBytes {
            sha512: signed,
            len: size,
        };
        check_times_and_version(bundle, signers, signed, trust, installed_version, now)
    })();
    Ok(result)
}

/// Hashes with SHA-256 every byte read through it (the second pass of [`verify_bundle_reader`]).
struct Sha256Reader<R> {
    inner: R,
    hash: sha2::Sha256,
}

impl<R: std::io::Read> std::io::Read for Sha256Reader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use sha2::Digest as _;
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// Runs `consume` over `reader`, then reads the rest of `reader`, hashing every byte with SHA-512: on
/// a thread of its own when one can be started (hashing then runs in parallel with `consume`),
/// directly otherwise. Returns what `consume` returned, the digest and the number of bytes hashed;
/// the error is an I/O error of `reader` while reading the rest.
fn hashed<R: std::io::Read, T>(
    mut reader: R,
    consume: impl FnOnce(&mut dyn std::io::Read) -> T,
) -> std::io::Result<(T, [u8; 64], u64)> {
    use sha2::Digest as _;
    use std::io::Read;
    use std::sync::mpsc;

    /// Passes every byte read from the inner reader to the hash: to the hashing thread when there
    /// is one, or directly.
    struct Hashing<'a, R> {
        inner: &'a mut R,
        hash: &'a mut sha2::Sha512,
        to_thread: Option<mpsc::SyncSender<Vec<u8>>>,
        count: u64,
    }
    impl<R: Read> Read for Hashing<'_, R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.inner.read(buf)?;
            match &self.to_thread {
                Some(tx) if n > 0 => tx
                    .send(buf[..n].to_vec())
                    .map_err(|_| std::io::Error::other("the bundle hashing thread stopped"))?,
                Some(_) => {}
                None => self.hash.update(&buf[..n]),
            }
            self.count += n as u64;
            Ok(n)
        }
    }

    let mut hash = sha2::Sha512::new();
    let (consumed, drained, count, thread_hash) = std::thread::scope(|scope| {
        // Bounded: at most a few chunks wait for the hasher, so memory stays small.
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(4);
        let hasher = std::thread::Builder::new()
            .name("bundle-hash".into())
            .spawn_scoped(scope, move || {
                let mut h = sha2::Sha512::new();
                for chunk in rx {
                    h.update(&chunk);
                }
                h
            })
            .ok();
        let mut hashing = Hashing {
            inner: &mut reader,
            hash: &mut hash,
            to_thread: hasher.as_ref().map(|_| tx),
            count: 0,
        };
        let consumed = consume(&mut hashing);
        // Hash whatever `consume` did not read (all of it after a parse error), so the digest is
        // over the exact bytes.
        let drained = std::io::copy(&mut hashing, &mut std::io::sink());
        let count = hashing.count;
        drop(hashing);
        (consumed, drained, count, hasher.map(|h| h.join()))
    });
    // Exactly one of them saw the bytes: the hashing thread if it started, `hash` otherwise.
    let hash = match thread_hash {
        Some(Ok(h)) => h,
        Some(Err(panic)) => std::panic::resume_unwind(panic),
        None => hash,
    };
    drained?;
    Ok((consumed, hash.finalize().into(), count))
}

/// Expiry, issue time, rollback and the node's trust-file limits ([`check_trust_limits`]) of a parsed
/// bundle whose signatures verified.
fn check_times_and_version(
    bundle: Bundle,
    signers: Vec<String>,
    signed: SignedBytes,
    trust: &Trust,
    installed_version: Option<u64>,
    now: OffsetDateTime,
) -> Result<VerifiedBundle, BundleError> {
    check_trust_limits(&bundle, trust)?;
    let fmt_time = |t: OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    };
    if now >= bundle.expires_at {
        return Err(BundleError::Expired {
            version: bundle.version,
            expires_at: fmt_time(bundle.expires_at),
            now: fmt_time(now),
        });
    }
    if bundle.issued_at > now + MAX_CLOCK_SKEW {
        return Err(BundleError::IssuedInFuture {
            version: bundle.version,
            issued_at: fmt_time(bundle.issued_at),
            now: fmt_time(now),
        });
    }
    if let Some(installed) = installed_version.filter(|&v| bundle.version <= v) {
        return Err(BundleError::Rollback {
            version: bundle.version,
            installed,
        });
    }
    Ok(VerifiedBundle {
        bundle,
        signers,
        signed,
    })
}

/// The limits a node's trust file puts on bundles: the floor of the organisation's `min_scanners`
/// (a format 1 bundle has no scan rule, so it is below any floor), and how long an exception may last
/// after `issued_at`.
pub fn check_trust_limits(bundle: &Bundle, trust: &Trust) -> Result<(), BundleError> {
    if let Some(floor) = trust.min_scanners() {
        let org = bundle
            .scopes()
            .node(super::scope::ORG)
            .rules
            .as_ref()
            .map(|r| (r.min_scanners.value, r.min_scanners.from.clone()));
        match org {
            None => {
                return Err(BundleError::BelowTrustFloor(format!(
                    "this node's trust file requires min_scanners >= {floor}, and a format {} bundle has no scan rule; publish a format 2 bundle",
                    bundle.format
                )));
            }
            Some((n, from)) if n < floor => {
                return Err(BundleError::BelowTrustFloor(format!(
                    "governance min_scanners is {n} (set by {from}), below the floor of {floor} in this node's trust file; raise governance.rules.min_scanners"
                )));
            }
            Some(_) => {}
        }
    }
    let days = trust.max_exception_days();
    let max = time::Duration::days(i64::from(days));
    if let Some(e) = bundle
        .exceptions
        .iter()
        .find(|e| e.expires_at - bundle.issued_at > max)
    {
        let lasts = e.expires_at - bundle.issued_at;
        return Err(BundleError::ExceptionTooLong(format!(
            "the exception with ticket {} ({}@{} for {}) expires at {}, {} days after the bundle's issued_at {}; this node's trust file allows at most {days} days (max_exception_days); shorten it or renew it in a later bundle",
            e.ticket,
            e.source,
            e.digest,
            e.scope_path,
            rfc3339(e.expires_at),
            lasts.whole_days(),
            rfc3339(bundle.issued_at)
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// Raw (on-disk) types.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBundle {
    format: FormatNumber,
    version: u64,
    #[serde(with = "time::serde::rfc3339")]
    issued_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    expires_at: OffsetDateTime,
    issuer: String,
    private_registry: String,
    mirrors: Vec<RawMirror>,
    governance: RawGovernance,
    #[serde(default)]
    first_party: Vec<RawFirstParty>,
    images: ImageList,
    #[serde(default)]
    exceptions: Option<Vec<RawException>>,
    #[serde(default)]
    rollout: Option<Vec<RawStep>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawException {
    source: String,
    digest: String,
    #[serde(default)]
    tag: Option<String>,
    scope: String,
    #[serde(deserialize_with = "exception_expiry")]
    expires_at: OffsetDateTime,
    ticket: String,
    reason: String,
    approved_by: String,
}

thread_local! {
    /// The `format` number of the bundle being streamed, recorded as soon as it is parsed so a bundle of
    /// another format that fails to parse can be reported as such ([`verify_bundle_reader`]).
    static SEEN_FORMAT: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// The `format` field (a `u64`, recorded in [`SEEN_FORMAT`]).
struct FormatNumber(u64);

impl<'de> Deserialize<'de> for FormatNumber {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let f = u64::deserialize(d)?;
        SEEN_FORMAT.with(|s| s.set(Some(f)));
        Ok(FormatNumber(f))
    }
}

#[derive(Deserialize)]
struct FormatProbe {
    format: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMirror {
    source: String,
    target: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFirstParty {
    prefix: String,
    scope: String,
    #[serde(default)]
    require_digest: bool,
}

// The `images` array is the bulk of a bundle, so it is not deserialised into owned intermediate values:
// each image's strings are appended to one reusable buffer ([`ImageScratch`]), the image is checked and
// converted to a compact [`ImageEntry`] as soon as its object ends, and the buffer is reused for the
// next one. This works the same whether the JSON is borrowed from memory or streamed from a reader.

/// A byte range of [`ImageScratch::text`].
type Span = std::ops::Range<usize>;

struct ScanSpans {
    scanner: Span,
    version: Span,
    report: Span,
    worst_severity: Severity,
}

/// A lifecycle object as written (`replacement` in the scratch text).
struct RawLifecycle {
    deprecated_at: Option<OffsetDateTime>,
    sunset_at: Option<OffsetDateTime>,
    replacement: Option<Span>,
}

/// The fields of the image being parsed (the strings live in `text`).
#[derive(Default)]
struct ImageScratch {
    text: String,
    source: Option<Span>,
    tags: Vec<(Span, Span, Option<RawLifecycle>)>,
    digests: Vec<(Span, Option<RawLifecycle>)>,
    scope: Option<Span>,
    provenance: bool,
    license: Span,
    scans: Vec<ScanSpans>,
    approved_by: Span,
    approved_at: i64,
}

impl ImageScratch {
    fn clear(&mut self) {
        self.text.clear();
        self.source = None;
        self.tags.clear();
        self.digests.clear();
        self.scope = None;
        self.provenance = false;
        self.scans.clear();
    }

    fn str(&self, span: &Span) -> &str {
        &self.text[span.clone()]
    }
}

/// Appends a JSON string to the scratch text and returns its span.
struct Text<'s>(&'s mut String);

impl<'de> de::DeserializeSeed<'de> for Text<'_> {
    type Value = Span;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Span, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Text<'_> {
    type Value = Span;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Span, E> {
        let start = self.0.len();
        self.0.push_str(v);
        Ok(start..self.0.len())
    }
}

/// A struct field name, as its index in `fields`.
struct Field(&'static [&'static str]);

impl<'de> de::DeserializeSeed<'de> for Field {
    type Value = usize;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
        d.deserialize_identifier(self)
    }
}

impl<'de> Visitor<'de> for Field {
    type Value = usize;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("field identifier")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<usize, E> {
        self.0
            .iter()
            .position(|f| *f == v)
            .ok_or_else(|| E::unknown_field(v, self.0))
    }
}

/// Marks `field` as seen, rejecting a second occurrence.
fn first<E: de::Error>(seen: &mut bool, field: &'static str) -> Result<(), E> {
    if std::mem::replace(seen, true) {
        return Err(E::duplicate_field(field));
    }
    Ok(())
}

const IMAGE_FIELDS: &[&str] = &["source", "tags", "digests", "scope", "provenance"];
const PROVENANCE_FIELDS: &[&str] = &["license", "scans", "approved_by", "approved_at"];
const SCAN_FIELDS: &[&str] = &["scanner", "version", "report", "worst_severity"];

/// One element of `images` (an object; unknown fields are rejected).
struct ImageSeed<'s>(&'s mut ImageScratch);

impl<'de> de::DeserializeSeed<'de> for ImageSeed<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_struct("RawImage", IMAGE_FIELDS, self)
    }
}

impl<'de> Visitor<'de> for ImageSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("struct RawImage")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let s = self.0;
        s.clear();
        let (mut tags, mut digests) = (false, false);
        while let Some(field) = map.next_key_seed(Field(IMAGE_FIELDS))? {
            match field {
                0 => {
                    if s.source.is_some() {
                        return Err(de::Error::duplicate_field("source"));
                    }
                    s.source = Some(map.next_value_seed(Text(&mut s.text))?);
                }
                1 => {
                    first(&mut tags, "tags")?;
                    map.next_value_seed(TagsSeed(s))?;
                }
                2 => {
                    first(&mut digests, "digests")?;
                    map.next_value_seed(DigestsSeed(s))?;
                }
                3 => {
                    if s.scope.is_some() {
                        return Err(de::Error::duplicate_field("scope"));
                    }
                    s.scope = Some(map.next_value_seed(Text(&mut s.text))?);
                }
                _ => {
                    if s.provenance {
                        return Err(de::Error::duplicate_field("provenance"));
                    }
                    map.next_value_seed(ProvenanceSeed(s))?;
                    s.provenance = true;
                }
            }
        }
        if s.source.is_none() {
            return Err(de::Error::missing_field("source"));
        }
        if s.scope.is_none() {
            return Err(de::Error::missing_field("scope"));
        }
        if !s.provenance {
            return Err(de::Error::missing_field("provenance"));
        }
        Ok(())
    }
}

/// `tags`: an object mapping tags to digests, kept as ordered pairs so duplicate keys can be reported.
struct TagsSeed<'s>(&'s mut ImageScratch);

impl<'de> de::DeserializeSeed<'de> for TagsSeed<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TagsSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object mapping tags to digests")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let s = self.0;
        while let Some(tag) = map.next_key_seed(Text(&mut s.text))? {
            let (digest, life) = map.next_value_seed(Approval(&mut s.text))?;
            s.tags.push((tag, digest, life));
        }
        Ok(())
    }
}

/// `digests`: an array of digest strings.
struct DigestsSeed<'s>(&'s mut ImageScratch);

impl<'de> de::DeserializeSeed<'de> for DigestsSeed<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for DigestsSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a sequence")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let s = self.0;
        while let Some((d, life)) = seq.next_element_seed(Approval(&mut s.text))? {
            s.digests.push((d, life));
        }
        Ok(())
    }
}

/// One approved tag's or digest's value: a digest string, or (format 2) a lifecycle object
/// `{"digest", "deprecated_at", "sunset_at", "replacement"}`.
struct Approval<'s>(&'s mut String);

const LIFECYCLE_FIELDS: &[&str] = &["digest", "deprecated_at", "sunset_at", "replacement"];

impl<'de> de::DeserializeSeed<'de> for Approval<'_> {
    type Value = (Span, Option<RawLifecycle>);
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Approval<'_> {
    type Value = (Span, Option<RawLifecycle>);
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a digest string or a lifecycle object {\"digest\", \"deprecated_at\", \"sunset_at\", \"replacement\"}")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok((Text(self.0).visit_str(v)?, None))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let text = self.0;
        let mut seen = [false; 4];
        let mut digest = 0..0;
        let mut life = RawLifecycle {
            deprecated_at: None,
            sunset_at: None,
            replacement: None,
        };
        while let Some(field) = map.next_key_seed(Field(LIFECYCLE_FIELDS))? {
            first(&mut seen[field], LIFECYCLE_FIELDS[field])?;
            match field {
                0 => digest = map.next_value_seed(Text(&mut *text))?,
                1 => life.deprecated_at = Some(map.next_value_seed(Rfc3339Seed("deprecated_at"))?),
                2 => life.sunset_at = Some(map.next_value_seed(Rfc3339Seed("sunset_at"))?),
                _ => life.replacement = Some(map.next_value_seed(Text(&mut *text))?),
            }
        }
        if !seen[0] {
            return Err(de::Error::missing_field("digest"));
        }
        Ok((digest, Some(life)))
    }
}

/// `provenance`.
struct ProvenanceSeed<'s>(&'s mut ImageScratch);

impl<'de> de::DeserializeSeed<'de> for ProvenanceSeed<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_struct("RawProvenance", PROVENANCE_FIELDS, self)
    }
}

impl<'de> Visitor<'de> for ProvenanceSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("struct RawProvenance")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let s = self.0;
        let mut seen = [false; 4];
        while let Some(field) = map.next_key_seed(Field(PROVENANCE_FIELDS))? {
            first(&mut seen[field], PROVENANCE_FIELDS[field])?;
            match field {
                0 => s.license = map.next_value_seed(Text(&mut s.text))?,
                1 => map.next_value_seed(ScansSeed(s))?,
                2 => s.approved_by = map.next_value_seed(Text(&mut s.text))?,
                _ => {
                    s.approved_at = map
                        .next_value_seed(Rfc3339Seed("provenance.approved_at"))?
                        .unix_timestamp()
                }
            }
        }
        if let Some(i) = seen.iter().position(|s| !s) {
            return Err(de::Error::missing_field(PROVENANCE_FIELDS[i]));
        }
        Ok(())
    }
}

/// An RFC 3339 time (as `time::serde::rfc3339` reads it); errors name the field.
struct Rfc3339Seed(&'static str);

impl<'de> de::DeserializeSeed<'de> for Rfc3339Seed {
    type Value = OffsetDateTime;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<OffsetDateTime, D::Error> {
        named_time(d, self.0)
    }
}

/// `time::serde::rfc3339`, with the field named in the error.
fn named_time<'de, D: de::Deserializer<'de>>(
    d: D,
    field: &str,
) -> Result<OffsetDateTime, D::Error> {
    time::serde::rfc3339::deserialize(d).map_err(|e| {
        de::Error::custom(format!(
            "{field}: {e} (expected an RFC 3339 time such as 2026-06-01T00:00:00Z)"
        ))
    })
}

fn exception_expiry<'de, D: de::Deserializer<'de>>(d: D) -> Result<OffsetDateTime, D::Error> {
    named_time(d, "exceptions[].expires_at")
}

/// `provenance.scans`.
struct ScansSeed<'s>(&'s mut ImageScratch);

impl<'de> de::DeserializeSeed<'de> for ScansSeed<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ScansSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a sequence")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let s = self.0;
        while let Some(scan) = seq.next_element_seed(ScanSeed(&mut s.text))? {
            s.scans.push(scan);
        }
        Ok(())
    }
}

/// One scan of `provenance.scans`.
struct ScanSeed<'s>(&'s mut String);

impl<'de> de::DeserializeSeed<'de> for ScanSeed<'_> {
    type Value = ScanSpans;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<ScanSpans, D::Error> {
        d.deserialize_struct("RawScan", SCAN_FIELDS, self)
    }
}

impl<'de> Visitor<'de> for ScanSeed<'_> {
    type Value = ScanSpans;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("struct RawScan")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ScanSpans, A::Error> {
        let text = self.0;
        let mut seen = [false; 4];
        let mut scan = ScanSpans {
            scanner: 0..0,
            version: 0..0,
            report: 0..0,
            worst_severity: Severity::None,
        };
        while let Some(field) = map.next_key_seed(Field(SCAN_FIELDS))? {
            first(&mut seen[field], SCAN_FIELDS[field])?;
            match field {
                0 => scan.scanner = map.next_value_seed(Text(&mut *text))?,
                1 => scan.version = map.next_value_seed(Text(&mut *text))?,
                2 => scan.report = map.next_value_seed(Text(&mut *text))?,
                _ => scan.worst_severity = map.next_value()?,
            }
        }
        if let Some(i) = seen.iter().position(|s| !s) {
            return Err(de::Error::missing_field(SCAN_FIELDS[i]));
        }
        Ok(scan)
    }
}

/// The `images` array, converted entry by entry while it is parsed.
#[derive(Default)]
struct ImageList {
    entries: Vec<ImageEntry>,
    error: Option<BundleError>,
    /// The first image with a lifecycle (a format 2 field), to reject it in a format 1 bundle.
    first_lifecycle: Option<usize>,
}

#[derive(Default)]
struct Interner(HashSet<Arc<str>>);

impl Interner {
    fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.0.get(s) {
            return a.clone();
        }
        let a: Arc<str> = s.into();
        self.0.insert(a.clone());
        a
    }
}

impl<'de> Deserialize<'de> for ImageList {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ImageList;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of images")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ImageList, A::Error> {
                let mut list = ImageList::default();
                if let Some(n) = seq.size_hint() {
                    list.entries.reserve(n);
                }
                let mut strings = Interner::default();
                let mut scratch = ImageScratch::default();
                let mut index = 0usize;
                while seq.next_element_seed(ImageSeed(&mut scratch))?.is_some() {
                    if list.error.is_none() {
                        match convert_image(&scratch, index, &mut strings) {
                            Ok(e) => {
                                if !e.lifecycles.is_empty() && list.first_lifecycle.is_none() {
                                    list.first_lifecycle = Some(index);
                                }
                                list.entries.push(e)
                            }
                            Err(e) => list.error = Some(e),
                        }
                    }
                    index += 1;
                }
                list.entries.shrink_to_fit();
                Ok(list)
            }
        }
        d.deserialize_seq(V)
    }
}

fn parse_digest(s: &str, what: impl FnOnce() -> String) -> Result<Digest, BundleError> {
    Digest::parse(s)
        .map_err(|e| BundleError::InvalidDigest(format!("{}: \"{}\": {e}", what(), clip(s))))
}

fn clip(s: &str) -> String {
    s.chars().take(140).collect()
}

fn valid_spdx(s: &str) -> bool {
    !s.trim().is_empty()
        && s.len() <= 256
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b" .-+:()".contains(&b))
}

/// Validates a repository name written without tag or digest and returns its canonical form.
fn canonical_repository(s: &str, what: impl Fn() -> String) -> Result<String, BundleError> {
    let has_suffix = s.contains('@') || s.rsplit('/').next().is_some_and(|last| last.contains(':'));
    if has_suffix {
        return Err(BundleError::Invalid(format!(
            "{} \"{}\" must be a repository without tag or digest (put tags in \"tags\" and digests in \"digests\")",
            what(),
            clip(s)
        )));
    }
    let r = Reference::parse(s).map_err(|e| BundleError::Invalid(format!("{}: {e}", what())))?;
    Ok(r.name().to_owned())
}

fn convert_image(
    raw: &ImageScratch,
    index: usize,
    strings: &mut Interner,
) -> Result<ImageEntry, BundleError> {
    let source = canonical_repository(raw.str(raw.source.as_ref().unwrap_or(&(0..0))), || {
        format!("images[{index}].source")
    })?;
    let at = || format!("images[{index}] ({source})");
    let mut tags = Vec::with_capacity(raw.tags.len());
    for (tag, digest, life) in &raw.tags {
        let (tag, digest) = (raw.str(tag), raw.str(digest));
        if !reference::is_valid_tag(tag) {
            return Err(BundleError::Invalid(format!(
                "{}: tag \"{}\" is not a valid tag",
                at(),
                clip(tag)
            )));
        }
        let d = parse_digest(digest, || format!("{} tag {tag}", at()))?;
        let life = convert_lifecycle(
            raw,
            life.as_ref(),
            || format!("{} tag {tag}", at()),
            strings,
        )?;
        tags.push((Box::<str>::from(tag), d, life));
    }
    tags.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(w) = tags.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(BundleError::Duplicate(format!(
            "{}: tag {} is listed twice",
            at(),
            w[0].0
        )));
    }
    let mut digests = Vec::with_capacity(raw.digests.len());
    for (d, life) in &raw.digests {
        let d = parse_digest(raw.str(d), || format!("{} digests", at()))?;
        if let Some((t, _, _)) = tags.iter().find(|(_, td, _)| *td == d) {
            return Err(BundleError::Duplicate(format!(
                "{}: digest {d} is listed in \"digests\" and already approved through tag {t}",
                at()
            )));
        }
        let life = convert_lifecycle(
            raw,
            life.as_ref(),
            || format!("{} digest {d}", at()),
            strings,
        )?;
        digests.push((d, life));
    }
    digests.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(w) = digests.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(BundleError::Duplicate(format!(
            "{}: digest {} is listed twice",
            at(),
            w[0].0
        )));
    }
    let mut lifecycles = Vec::new();
    let tags: Vec<(Box<str>, Digest)> = tags
        .into_iter()
        .enumerate()
        .map(|(i, (t, d, life))| {
            if let Some(l) = life {
                lifecycles.push((i as u32, l));
            }
            (t, d)
        })
        .collect();
    let digests: Vec<Digest> = digests
        .into_iter()
        .enumerate()
        .map(|(i, (d, life))| {
            if let Some(l) = life {
                lifecycles.push(((tags.len() + i) as u32, l));
            }
            d
        })
        .collect();
    if tags.is_empty() && digests.is_empty() {
        return Err(BundleError::Invalid(format!(
            "{}: approves no tag and no digest; add \"tags\" or \"digests\"",
            at()
        )));
    }
    let license = raw.str(&raw.license);
    if !valid_spdx(license) {
        return Err(BundleError::Invalid(format!(
            "{}: provenance.license \"{}\" is not an SPDX licence expression",
            at(),
            clip(license)
        )));
    }
    let approved_by = raw.str(&raw.approved_by);
    if approved_by.trim().is_empty() {
        return Err(BundleError::Invalid(format!(
            "{}: provenance.approved_by is empty",
            at()
        )));
    }
    if raw.scans.is_empty() {
        return Err(BundleError::Invalid(format!(
            "{}: provenance.scans is empty; record at least one vulnerability scan that passed the image",
            at()
        )));
    }
    let mut scans = Vec::with_capacity(raw.scans.len());
    for s in &raw.scans {
        let (scanner, version) = (raw.str(&s.scanner), raw.str(&s.version));
        if scanner.trim().is_empty() || version.trim().is_empty() {
            return Err(BundleError::Invalid(format!(
                "{}: a scan has an empty scanner name or version",
                at()
            )));
        }
        let report = parse_digest(raw.str(&s.report), || {
            format!("{} scan report of {scanner}", at())
        })?;
        scans.push(Scan {
            scanner: strings.get(scanner),
            version: strings.get(version),
            report,
            worst_severity: s.worst_severity,
        });
    }
    Ok(ImageEntry {
        source: source.into(),
        scope_path: strings.get(raw.str(raw.scope.as_ref().unwrap_or(&(0..0)))),
        scope: 0,
        tags: tags.into_boxed_slice(),
        digests: digests.into_boxed_slice(),
        lifecycles: lifecycles.into_boxed_slice(),
        provenance: Provenance {
            license: strings.get(license),
            scans: scans.into_boxed_slice(),
            approved_by: strings.get(approved_by),
            approved_at: raw.approved_at,
        },
    })
}

/// Checks a lifecycle object: at least one date, `deprecated_at` before `sunset_at`, a replacement
/// that is a valid tag and comes with a date. (Whether the replacement is approved is checked per
/// repository, in [`check_repository`].)
fn convert_lifecycle(
    raw: &ImageScratch,
    life: Option<&RawLifecycle>,
    what: impl Fn() -> String,
    strings: &mut Interner,
) -> Result<Option<Lifecycle>, BundleError> {
    let Some(life) = life else { return Ok(None) };
    if life.deprecated_at.is_none() && life.sunset_at.is_none() {
        return Err(BundleError::Invalid(format!(
            "{}: a lifecycle object needs deprecated_at or sunset_at (or write the digest as a string)",
            what()
        )));
    }
    if let (Some(d), Some(s)) = (life.deprecated_at, life.sunset_at) {
        if d >= s {
            return Err(BundleError::Invalid(format!(
                "{}: deprecated_at {} is not before sunset_at {}",
                what(),
                rfc3339(d),
                rfc3339(s)
            )));
        }
    }
    let replacement = match &life.replacement {
        Some(r) => {
            let r = raw.str(r);
            if !reference::is_valid_tag(r) {
                return Err(BundleError::Invalid(format!(
                    "{}: replacement \"{}\" is not a tag (name an approved tag of the same repository)",
                    what(),
                    clip(r)
                )));
            }
            Some(strings.get(r))
        }
        None => None,
    };
    Ok(Some(Lifecycle {
        deprecated_at: life.deprecated_at,
        sunset_at: life.sunset_at,
        replacement,
    }))
}

fn validate_domain(domain: &str, what: &str) -> Result<(), BundleError> {
    Reference::parse(&format!("{domain}/x"))
        .ok()
        .filter(|r| r.domain() == domain)
        .map(|_| ())
        .ok_or_else(|| {
            BundleError::Invalid(format!(
                "{what} \"{}\" is not a registry host name (with optional :port)",
                clip(domain)
            ))
        })
}

fn validate_repo_path(path: &str, what: &str) -> Result<(), BundleError> {
    let ok = !path.is_empty()
        && Reference::parse(&format!("registry.invalid/{path}")).is_ok_and(|r| r.path() == path);
    if ok {
        Ok(())
    } else {
        Err(BundleError::Invalid(format!(
            "{what} \"{}\" is not a repository path (lowercase components separated by '/')",
            clip(path)
        )))
    }
}

/// Parses, validates and indexes a bundle without checking signatures, times or version (for `inspect`,
/// `diff` and `sign`; the daemon uses [`verify_bundle`]).
pub fn parse_bundle(bytes: &[u8]) -> Result<Bundle, BundleError> {
    let raw: RawBundle = match serde_json::from_slice(bytes) {
        Ok(raw) => raw,
        Err(e) => {
            // Give a clear answer for bundles of another format rather than a field error.
            let probe = serde_json::from_slice::<FormatProbe>(bytes)
                .ok()
                .and_then(|p| p.format);
            if let Some(f) = probe.filter(|f| !SUPPORTED_FORMATS.contains(f)) {
                return Err(BundleError::UnsupportedFormat(f));
            }
            return Err(BundleError::Malformed(e.to_string()));
        }
    };
    build_checked(raw)
}

fn build_checked(raw: RawBundle) -> Result<Bundle, BundleError> {
    if !SUPPORTED_FORMATS.contains(&raw.format.0) {
        return Err(BundleError::UnsupportedFormat(raw.format.0));
    }
    let mut raw = raw;
    if let Some(e) = raw.images.error.take() {
        return Err(e);
    }
    if raw.format.0 == 1 {
        let format_2 = |field: String| {
            Err(BundleError::Malformed(format!(
                "{field} is a format 2 field, and this bundle says format 1; publish it as format 2"
            )))
        };
        if raw.exceptions.is_some() {
            return format_2("`exceptions`".into());
        }
        if raw.rollout.is_some() {
            return format_2("`rollout`".into());
        }
        if let Some(i) = raw.images.first_lifecycle {
            return format_2(format!(
                "the lifecycle object (deprecated_at, sunset_at, replacement) of images[{i}]"
            ));
        }
    }
    build(raw)
}

fn build(raw: RawBundle) -> Result<Bundle, BundleError> {
    if raw.version == 0 {
        return Err(BundleError::Invalid(
            "version is 0; versions start at 1 and must increase with every bundle".into(),
        ));
    }
    if raw.expires_at <= raw.issued_at {
        return Err(BundleError::Invalid(
            "expires_at is not after issued_at".into(),
        ));
    }
    if raw.issuer.trim().is_empty() {
        return Err(BundleError::Invalid(
            "issuer is empty; name the team or person issuing the bundle".into(),
        ));
    }
    let format = raw.format.0 as u32;
    let private = raw.private_registry;
    validate_domain(&private, "private_registry")?;
    let scopes = Scopes::build(raw.governance, format >= 2).map_err(|(kind, msg)| match kind {
        "duplicate" => BundleError::Duplicate(msg),
        "conflict" => BundleError::Conflict(msg),
        "malformed" => BundleError::Malformed(msg),
        _ => BundleError::Invalid(msg),
    })?;

    let mut mirrors: Vec<Mirror> = Vec::with_capacity(raw.mirrors.len());
    for (i, m) in raw.mirrors.into_iter().enumerate() {
        let what = format!("mirrors[{i}]");
        let (domain, path) = m.source.split_once('/').unwrap_or((&m.source, ""));
        let domain = if domain == LEGACY_DEFAULT_DOMAIN {
            DEFAULT_DOMAIN
        } else {
            domain
        };
        validate_domain(domain, &format!("{what}.source registry"))?;
        if !path.is_empty() {
            validate_repo_path(path, &format!("{what}.source path"))?;
        }
        if domain == private {
            return Err(BundleError::Invalid(format!(
                "{what}.source is the private registry {private}; mirrors map public registries into it"
            )));
        }
        let target = m.target.trim_end_matches('/');
        validate_repo_path(target, &format!("{what}.target"))?;
        let mirror = Mirror {
            source_domain: domain.to_owned(),
            source_path: path.to_owned(),
            target_path: target.to_owned(),
        };
        for other in &mirrors {
            if other.source_domain == mirror.source_domain
                && other.source_path == mirror.source_path
            {
                return Err(BundleError::Duplicate(format!(
                    "mirror source {} is listed twice",
                    mirror.source()
                )));
            }
            if path_has_prefix(&other.target_path, &mirror.target_path)
                || path_has_prefix(&mirror.target_path, &other.target_path)
            {
                return Err(BundleError::Conflict(format!(
                    "mirror targets {private}/{} (for {}) and {private}/{} (for {}) overlap, so a mirror reference could belong to either source; give each source its own target path",
                    other.target_path,
                    other.source(),
                    mirror.target_path,
                    mirror.source()
                )));
            }
        }
        mirrors.push(mirror);
    }

    let mut first_party: Vec<FirstParty> = Vec::with_capacity(raw.first_party.len());
    for (i, fp) in raw.first_party.into_iter().enumerate() {
        let what = format!("first_party[{i}]");
        let prefix = fp.prefix.trim_end_matches('/');
        let Some((domain, path)) = prefix.split_once('/').filter(|(d, _)| *d == private) else {
            return Err(BundleError::Invalid(format!(
                "{what}.prefix \"{}\" must be a path in the private registry, e.g. {private}/apps/team/",
                clip(&fp.prefix)
            )));
        };
        debug_assert_eq!(domain, private);
        validate_repo_path(path, &format!("{what}.prefix"))?;
        let scope = scopes
            .lookup(&fp.scope)
            .ok_or_else(|| unknown_scope(&what, &fp.scope))?;
        if let Some(m) = mirrors.iter().find(|m| {
            path_has_prefix(path, &m.target_path) || path_has_prefix(&m.target_path, path)
        }) {
            return Err(BundleError::Conflict(format!(
                "{what}.prefix {prefix} overlaps the mirror location {private}/{} of {}; first-party images must live outside mirror paths",
                m.target_path,
                m.source()
            )));
        }
        if let Some(other) = first_party
            .iter()
            .find(|o| o.path == path && o.scope == scope)
        {
            return Err(BundleError::Duplicate(format!(
                "first-party prefix {private}/{} for scope {} is listed twice",
                other.path, fp.scope
            )));
        }
        first_party.push(FirstParty {
            path: path.to_owned(),
            scope_path: scopes.path(scope).clone(),
            scope,
            require_digest: fp.require_digest,
        });
    }

    let mut images = raw.images.entries;
    for (i, e) in images.iter_mut().enumerate() {
        e.scope = scopes
            .lookup(&e.scope_path)
            .ok_or_else(|| unknown_scope(&format!("images[{i}] ({})", e.source), &e.scope_path))?;
        let (domain, path) = e.source.split_once('/').unwrap_or((&e.source, ""));
        if domain == private {
            return Err(BundleError::Invalid(format!(
                "images[{i}].source {} is in the private registry; list private images under \"first_party\"",
                e.source
            )));
        }
        if find_mirror(&mirrors, domain, path).is_none() {
            return Err(BundleError::Invalid(format!(
                "images[{i}].source {} has no mirror: add a \"mirrors\" entry for {domain} saying where approved copies live in {private}",
                e.source
            )));
        }
    }
    // Stable: several entries of one repository and scope (format 2) keep the bundle's order.
    images.sort_by(|a, b| {
        a.source
            .cmp(&b.source)
            .then_with(|| a.scope_path.cmp(&b.scope_path))
    });
    for run in repository_runs(&images) {
        check_repository(&images[run], &scopes, format)?;
    }
    let repos = index_repositories(&images);
    // Format 2: every licence expression strictly against the SPDX list, parsed once per distinct text.
    let mut licenses: HashMap<Arc<str>, LicenseExpression> = HashMap::new();
    if format >= 2 {
        for e in &images {
            let l = &e.provenance.license;
            if licenses.contains_key(l) {
                continue;
            }
            let parsed = LicenseExpression::parse(l).map_err(|why| {
                BundleError::Invalid(format!(
                    "image {} for {}: provenance.license \"{}\": {why}",
                    e.source,
                    e.scope_path,
                    clip(l)
                ))
            })?;
            licenses.insert(l.clone(), parsed);
        }
    }
    let exceptions = build_exceptions(
        raw.exceptions.unwrap_or_default(),
        &mirrors,
        &private,
        &scopes,
        &images,
        &repos,
        raw.issued_at,
    )?;
    let rollout = match raw.rollout {
        Some(steps) => Some(
            super::rollout::parse(steps, raw.expires_at - raw.issued_at)
                .map_err(BundleError::Invalid)?,
        ),
        None => None,
    };
    Ok(Bundle {
        format,
        exceptions,
        rollout,
        licenses,
        version: raw.version,
        issued_at: raw.issued_at,
        expires_at: raw.expires_at,
        issuer: raw.issuer,
        private_registry: private,
        mirrors,
        scopes,
        first_party,
        images,
        repos,
    })
}

/// The runs of entries of one repository in `images`, in order.
fn repository_runs(images: &[ImageEntry]) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let mut start = 0usize;
    std::iter::from_fn(move || {
        if start >= images.len() {
            return None;
        }
        let first = &images[start].source;
        let end = images[start..]
            .iter()
            .position(|e| e.source != *first)
            .map_or(images.len(), |n| start + n);
        let run = start..end;
        start = end;
        Some(run)
    })
}

/// Whether `images` is sorted as the index needs it: by source, then scope path.
fn sorted_for_index(images: &[ImageEntry]) -> bool {
    images
        .windows(2)
        .all(|w| (&w[0].source, &w[0].scope_path) <= (&w[1].source, &w[1].scope_path))
}

/// Repository → its run of entries, for `images` sorted by source ([`sorted_for_index`]).
fn index_repositories(images: &[ImageEntry]) -> HashMap<Arc<str>, (u32, u32)> {
    let mut repos = HashMap::with_capacity(images.len());
    for run in repository_runs(images) {
        repos.insert(
            images[run.start].source.clone(),
            (run.start as u32, run.end as u32),
        );
    }
    repos
}

fn unknown_scope(what: &str, scope: &str) -> BundleError {
    BundleError::Invalid(format!(
        "{what}: scope \"{}\" is not declared in governance (write organisation[/program[/project[/application]]])",
        clip(scope)
    ))
}

/// Validates and sorts the exceptions (format 2): a mirrored public source, a known scope, a digest, a
/// tag that does not contradict `images`, non-empty ticket, reason and approver, an expiry after
/// `issued_at`, and no exception twice.
fn build_exceptions(
    raw: Vec<RawException>,
    mirrors: &[Mirror],
    private: &str,
    scopes: &Scopes,
    images: &[ImageEntry],
    repos: &HashMap<Arc<str>, (u32, u32)>,
    issued_at: OffsetDateTime,
) -> Result<Vec<Exception>, BundleError> {
    let mut out: Vec<Exception> = Vec::with_capacity(raw.len());
    for (i, x) in raw.into_iter().enumerate() {
        let what = format!("exceptions[{i}]");
        let source = canonical_repository(&x.source, || format!("{what}.source"))?;
        let (domain, path) = source.split_once('/').unwrap_or((&source, ""));
        if domain == private {
            return Err(BundleError::Invalid(format!(
                "{what}.source {source} is in the private registry; an exception covers a mirrored public image"
            )));
        }
        if find_mirror(mirrors, domain, path).is_none() {
            return Err(BundleError::Invalid(format!(
                "{what}.source {source} has no mirror: an exception never opens a public pull; add a \"mirrors\" entry for {domain}"
            )));
        }
        let digest = parse_digest(&x.digest, || format!("{what} ({source}) digest"))?;
        let scope = scopes
            .lookup(&x.scope)
            .ok_or_else(|| unknown_scope(&what, &x.scope))?;
        for (field, value) in [
            ("ticket", &x.ticket),
            ("reason", &x.reason),
            ("approved_by", &x.approved_by),
        ] {
            if value.trim().is_empty() {
                return Err(BundleError::Invalid(format!(
                    "{what} ({source}@{digest}): {field} is empty; an exception must say which ticket approved it, why, and who"
                )));
            }
        }
        if x.expires_at <= issued_at {
            return Err(BundleError::Invalid(format!(
                "{what} ({source}@{digest}, ticket {}): expires_at {} is not after the bundle's issued_at {}",
                x.ticket,
                rfc3339(x.expires_at),
                rfc3339(issued_at)
            )));
        }
        if let Some(tag) = &x.tag {
            if !reference::is_valid_tag(tag) {
                return Err(BundleError::Invalid(format!(
                    "{what} ({source}): tag \"{}\" is not a valid tag",
                    clip(tag)
                )));
            }
            let entries = repos
                .get(source.as_str())
                .map_or(&[][..], |&(s, e)| &images[s as usize..e as usize]);
            if let Some(bound) = entries
                .iter()
                .find_map(|e| e.tag(tag))
                .filter(|d| **d != digest)
            {
                return Err(BundleError::Conflict(format!(
                    "{what} binds {source}:{tag} to {digest}, but images approve {source}:{tag} as {bound}; a tag must mean one digest"
                )));
            }
            if let Some(other) = out.iter().find(|o| {
                o.source.as_ref() == source && o.tag.as_deref() == Some(tag) && o.digest != digest
            }) {
                return Err(BundleError::Conflict(format!(
                    "{what} binds {source}:{tag} to {digest}, but the exception with ticket {} binds it to {}; a tag must mean one digest",
                    other.ticket, other.digest
                )));
            }
        }
        if let Some(other) = out
            .iter()
            .find(|o| o.source.as_ref() == source && o.digest == digest && o.scope == scope)
        {
            return Err(BundleError::Duplicate(format!(
                "{what}: an exception for {source}@{digest} and scope {} is already listed (ticket {})",
                x.scope, other.ticket
            )));
        }
        out.push(Exception {
            source: source.into(),
            digest,
            tag: x.tag.map(String::into_boxed_str),
            scope_path: scopes.path(scope).clone(),
            scope,
            expires_at: x.expires_at,
            ticket: x.ticket,
            reason: x.reason,
            approved_by: x.approved_by,
        });
    }
    out.sort_by(|a, b| {
        a.source
            .cmp(&b.source)
            .then(a.expires_at.cmp(&b.expires_at))
    });
    Ok(out)
}

/// Checks the entries of one repository: one entry per scope in format 1 (in format 2 several, each
/// with its own provenance, but no tag or bare digest approved twice for one scope), each tag bound to
/// a single digest, and every lifecycle `replacement` an approved tag of the repository available
/// wherever the retiring image is, other than itself and not retiring before it.
fn check_repository(
    entries: &[ImageEntry],
    scopes: &Scopes,
    format: u32,
) -> Result<(), BundleError> {
    for e in entries {
        for (tag, digest, life) in e.lifecycles() {
            let Some(r) = &life.replacement else { continue };
            let what = || match tag {
                Some(t) => format!("image {} for {}: tag {t}", e.source, e.scope_path),
                None => format!("image {} for {}: digest {digest}", e.source, e.scope_path),
            };
            if tag == Some(&**r) {
                return Err(BundleError::Invalid(format!(
                    "{}: replacement {r} is the tag itself; name the tag to move to",
                    what()
                )));
            }
            let target = entries
                .iter()
                .filter(|x| scopes.contains(x.scope, e.scope))
                .find(|x| x.tag(r).is_some());
            let Some(target) = target else {
                return Err(BundleError::Invalid(format!(
                    "{}: replacement {r} is not an approved tag of {} for scope {} (or a scope above it); approve it or name another tag",
                    what(),
                    e.source,
                    e.scope_path
                )));
            };
            let retires = target.tag_lifecycle(r).and_then(|l| l.sunset_at);
            if let Some(t) = retires.filter(|t| life.sunset_at.is_none_or(|own| *t <= own)) {
                return Err(BundleError::Invalid(format!(
                    "{}: replacement {r} is itself sunset at {}, no later than what it replaces; name a tag that outlives it",
                    what(),
                    rfc3339(t)
                )));
            }
        }
    }
    for w in entries.windows(2) {
        if w[0].scope_path == w[1].scope_path && format < 2 {
            return Err(BundleError::Duplicate(format!(
                "image {} is listed twice for scope {} (format 2 allows one entry per provenance)",
                w[0].source, w[0].scope_path
            )));
        }
    }
    if format >= 2 {
        // Entries are sorted by scope: the entries of one scope are held to the rule one entry is
        // held to when it is read (no tag twice, no digest twice, no digest both bare and tagged), so
        // that every approval of a scope has one provenance and one lifecycle.
        for run in entries
            .chunk_by(|a, b| a.scope_path == b.scope_path)
            .filter(|run| run.len() > 1)
        {
            let twice = |what: String, how: &str| {
                BundleError::Duplicate(format!(
                    "image {}: {what} is approved by two entries for scope {}{how}; keep it in one",
                    run[0].source, run[0].scope_path
                ))
            };
            let (mut tags, mut bare) = (HashSet::new(), HashSet::new());
            for e in run {
                if let Some((t, _)) = e.tags.iter().find(|(t, _)| !tags.insert(&**t)) {
                    return Err(twice(format!("tag {t}"), ""));
                }
                if let Some(d) = e.digests.iter().find(|d| !bare.insert(*d)) {
                    return Err(twice(format!("digest {d}"), ""));
                }
            }
            let tagged = run.iter().flat_map(|e| e.tags.iter());
            if let Some((t, d)) = tagged.into_iter().find(|(_, d)| bare.contains(d)) {
                return Err(twice(
                    format!("digest {d}"),
                    &format!(" (bare in one, through tag {t} in the other)"),
                ));
            }
        }
    }
    if entries.len() > 1 {
        let mut tags: Vec<(&str, &Digest, &str)> = entries
            .iter()
            .flat_map(|e| e.tags.iter().map(move |(t, d)| (&**t, d, &*e.scope_path)))
            .collect();
        tags.sort_by(|a, b| a.0.cmp(b.0));
        for w in tags.windows(2) {
            if w[0].0 == w[1].0 && w[0].1 != w[1].1 {
                return Err(BundleError::Conflict(format!(
                    "tag {}:{} is bound to {} for scope {} but to {} for scope {}; a tag must mean one digest",
                    entries[0].source, w[0].0, w[0].1, w[0].2, w[1].1, w[1].2
                )));
            }
        }
    }
    Ok(())
}

fn find_mirror<'m>(mirrors: &'m [Mirror], domain: &str, path: &str) -> Option<&'m Mirror> {
    mirrors
        .iter()
        .filter(|m| {
            m.source_domain == domain
                && path_has_prefix(path, &m.source_path)
                && path.len() > m.source_path.len()
        })
        .max_by_key(|m| m.source_path.len())
}

impl Bundle {
    /// Entries approving `repository` (canonical `domain/path`), sorted by scope path.
    pub fn entries(&self, repository: &str) -> &[ImageEntry] {
        match self.repos.get(repository) {
            Some(&(s, e)) => &self.images[s as usize..e as usize],
            None => &[],
        }
    }

    /// All entries, sorted by source then scope.
    pub fn images(&self) -> &[ImageEntry] {
        &self.images
    }

    /// The exceptions, sorted by source then expiry.
    pub fn exceptions(&self) -> &[Exception] {
        &self.exceptions
    }

    /// The exceptions for `source` (canonical repository).
    pub fn exceptions_for(&self, source: &str) -> &[Exception] {
        let start = self.exceptions.partition_point(|e| &*e.source < source);
        let end = start + self.exceptions[start..].partition_point(|e| &*e.source == source);
        &self.exceptions[start..end]
    }

    /// The rollout steps, if the bundle has them.
    pub fn rollout(&self) -> Option<&[Step]> {
        self.rollout.as_deref()
    }

    /// The parsed licence expression of a provenance licence (format 2 bundles; `None` in format 1).
    pub fn license_expression(&self, license: &str) -> Option<&LicenseExpression> {
        self.licenses.get(license)
    }

    /// Number of distinct approved repositories.
    pub fn repository_count(&self) -> usize {
        self.repos.len()
    }

    /// The mirror mappings.
    pub fn mirrors(&self) -> &[Mirror] {
        &self.mirrors
    }

    /// The governance scope tree.
    pub fn scopes(&self) -> &Scopes {
        &self.scopes
    }

    /// The first-party prefixes.
    pub fn first_party(&self) -> &[FirstParty] {
        &self.first_party
    }

    /// The mirror that holds copies of `domain/path` (longest source prefix), if any.
    pub fn mirror_for(&self, domain: &str, path: &str) -> Option<&Mirror> {
        find_mirror(&self.mirrors, domain, path)
    }

    /// Where the approved copy of a source repository lives: `(private registry, path)`.
    pub fn mirror_path(&self, mirror: &Mirror, source_path: &str) -> String {
        let rest = source_path[mirror.source_path.len()..].trim_start_matches('/');
        format!("{}/{}", mirror.target_path, rest)
    }

    /// For a path in the private registry under a mirror target: the mirror and the canonical source
    /// repository (e.g. `approved/library/nginx` → `docker.io/library/nginx`).
    pub fn source_of_mirror_path(&self, path: &str) -> Option<(&Mirror, String)> {
        let m = self
            .mirrors
            .iter()
            .find(|m| path_has_prefix(path, &m.target_path) && path.len() > m.target_path.len())?;
        let rest = &path[m.target_path.len() + 1..];
        let source = if m.source_path.is_empty() {
            format!("{}/{rest}", m.source_domain)
        } else {
            format!("{}/{}/{rest}", m.source_domain, m.source_path)
        };
        Some((m, source))
    }

    /// Issue time as RFC 3339.
    pub fn issued_at_string(&self) -> String {
        self.issued_at
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    }

    /// Expiry time as RFC 3339.
    pub fn expires_at_string(&self) -> String {
        self.expires_at
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    }
}

/// Formats Unix seconds as RFC 3339 (for provenance times).
pub fn format_unix(t: i64) -> String {
    OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.to_string())
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<VerifiedBundle>();
    check::<Bundle>();
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::policy::testutil::*;

    #[test]
    fn example_bundle_parses_and_indexes() {
        let b = parse_bundle(example_json().as_bytes()).unwrap();
        assert_eq!(b.version, 42);
        assert_eq!(b.entries("docker.io/library/nginx").len(), 2);
        assert_eq!(
            b.entries("docker.io/library/nginx")[0].tag("1.25"),
            Some(&digest(1))
        );
        assert!(b.entries("docker.io/library/nginx-evil").is_empty());
        let (m, src) = b.source_of_mirror_path("approved/library/nginx").unwrap();
        assert_eq!(
            (m.source_domain.as_str(), src.as_str()),
            ("docker.io", "docker.io/library/nginx")
        );
        assert!(b.source_of_mirror_path("approvedx/library/nginx").is_none());
        assert!(b.source_of_mirror_path("approved").is_none());
        let m = b.mirror_for("ghcr.io", "acme/tool").unwrap();
        assert_eq!(b.mirror_path(m, "acme/tool"), "approved-ghcr/tool");
        assert!(b.mirror_for("ghcr.io", "other/tool").is_none());
        assert!(b.mirror_for("registry.k8s.io.evil", "pause").is_none());
        let p = b.entries("registry.k8s.io/pause")[0].provenance();
        assert_eq!(&*p.license, "Apache-2.0");
        assert_eq!(p.scans[0].worst_severity, Severity::Low);
    }

    fn rejected(edit: impl FnOnce(&mut serde_json::Value)) -> BundleError {
        let mut v: serde_json::Value = serde_json::from_str(&example_json()).unwrap();
        edit(&mut v);
        match parse_bundle(serde_json::to_string(&v).unwrap().as_bytes()) {
            Ok(_) => panic!("bundle should be rejected"),
            Err(e) => e,
        }
    }

    #[test]
    fn invalid_bundles_are_rejected_with_reasons() {
        use serde_json::json;
        type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
        let cases: Vec<(&str, &str, Edit)> = vec![
            (
                "unsupported_format",
                "format 3",
                Box::new(|v| v["format"] = json!(3)),
            ),
            (
                "malformed",
                "unknown field",
                Box::new(|v| v["extra"] = json!(1)),
            ),
            (
                "malformed",
                "missing field `issuer`",
                Box::new(|v| {
                    v.as_object_mut()
                        .unwrap()
                        .remove("issuer")
                        .map(|_| ())
                        .unwrap()
                }),
            ),
            (
                "invalid",
                "version is 0",
                Box::new(|v| v["version"] = json!(0)),
            ),
            (
                "invalid",
                "expires_at",
                Box::new(|v| v["expires_at"] = v["issued_at"].clone()),
            ),
            (
                "invalid_digest",
                "exactly 64",
                Box::new(|v| v["images"][0]["tags"]["1.25"] = json!("sha256:abcd")),
            ),
            (
                "invalid_digest",
                "not supported",
                Box::new(|v| v["images"][0]["digests"] = json!(["md5:00"])),
            ),
            (
                "invalid_digest",
                "scan report",
                Box::new(|v| {
                    v["images"][0]["provenance"]["scans"][0]["report"] = json!("sha256:XYZ")
                }),
            ),
            (
                "duplicate",
                "listed twice for scope",
                Box::new(|v| {
                    let first = v["images"][0].clone();
                    v["images"].as_array_mut().unwrap().push(first);
                }),
            ),
            (
                "conflict",
                "a tag must mean one digest",
                Box::new(|v| v["images"][1]["tags"]["1.25"] = json!(digest(9).to_string())),
            ),
            (
                "duplicate",
                "already approved through tag",
                Box::new(|v| v["images"][0]["digests"] = json!([digest(1).to_string()])),
            ),
            (
                "duplicate",
                "digest",
                Box::new(|v| {
                    v["images"][0]["digests"] =
                        json!([digest(7).to_string(), digest(7).to_string()])
                }),
            ),
            (
                "invalid",
                "not declared in governance",
                Box::new(|v| v["images"][0]["scope"] = json!("corp/nope")),
            ),
            (
                "invalid",
                "has no mirror",
                Box::new(|v| v["images"][0]["source"] = json!("quay.io/x/y")),
            ),
            (
                "invalid",
                "without tag or digest",
                Box::new(|v| v["images"][0]["source"] = json!("nginx:1.25")),
            ),
            (
                "invalid",
                "no tag and no digest",
                Box::new(|v| {
                    v["images"][0]["tags"] = json!({});
                    v["images"][0]["digests"] = json!([]);
                }),
            ),
            (
                "invalid",
                "SPDX",
                Box::new(|v| v["images"][0]["provenance"]["license"] = json!("<script>")),
            ),
            (
                "invalid",
                "scans is empty",
                Box::new(|v| v["images"][0]["provenance"]["scans"] = json!([])),
            ),
            (
                "invalid",
                "not a valid tag",
                Box::new(|v| v["images"][0]["tags"] = json!({"-x": digest(1).to_string()})),
            ),
            (
                "conflict",
                "overlap",
                Box::new(|v| v["mirrors"][1]["target"] = json!("approved/k8s")),
            ),
            (
                "duplicate",
                "listed twice",
                Box::new(|v| {
                    let m = v["mirrors"][0].clone();
                    v["mirrors"].as_array_mut().unwrap().push(m);
                }),
            ),
            (
                "invalid",
                "private registry",
                Box::new(|v| v["mirrors"][0]["source"] = json!("registry.corp")),
            ),
            (
                "conflict",
                "overlaps the mirror location",
                Box::new(|v| v["first_party"][0]["prefix"] = json!("registry.corp/approved/apps")),
            ),
            (
                "invalid",
                "must be a path in the private registry",
                Box::new(|v| v["first_party"][0]["prefix"] = json!("ghcr.io/apps")),
            ),
            (
                "conflict",
                "namespace \"checkout\"",
                Box::new(|v| {
                    v["governance"]["programs"][1]["projects"][0]["namespaces"] =
                        json!(["checkout"])
                }),
            ),
            (
                "invalid",
                "private_registry",
                Box::new(|v| v["private_registry"] = json!("bad host!")),
            ),
            (
                "malformed",
                "unknown variant",
                Box::new(|v| {
                    v["images"][0]["provenance"]["scans"][0]["worst_severity"] = json!("meh")
                }),
            ),
        ];
        for (code, text, edit) in cases {
            let e = rejected(edit);
            assert_eq!(e.code(), code, "{e}");
            assert!(
                e.to_string().contains(text),
                "error should mention {text:?}: {e}"
            );
        }
    }

    fn v2_rejected(edit: impl FnOnce(&mut serde_json::Value)) -> BundleError {
        let mut v: serde_json::Value = serde_json::from_str(EXAMPLE_V2).unwrap();
        edit(&mut v);
        match parse_bundle(serde_json::to_string(&v).unwrap().as_bytes()) {
            Ok(_) => panic!("bundle should be rejected"),
            Err(e) => e,
        }
    }

    #[test]
    fn format_2_example_parses() {
        let b = parse_bundle(EXAMPLE_V2.as_bytes()).unwrap();
        assert_eq!((b.format, b.version), (2, 43));
        let nginx = &b.entries("docker.io/library/nginx")[0];
        let l = nginx.tag_lifecycle("1.25").unwrap();
        assert_eq!(l.replacement.as_deref(), Some("1.26"));
        assert_eq!(
            l.sunset_at,
            Some(time::macros::datetime!(2026-06-01 00:00 UTC))
        );
        assert!(nginx.tag_lifecycle("1.26").is_none());
        let redis = &b.entries("docker.io/library/redis")[0];
        assert!(
            redis
                .digest_lifecycle(&digest(5))
                .unwrap()
                .deprecated_at
                .is_none()
        );
        assert_eq!(redis.lifecycles().count(), 1);
        assert_eq!(b.exceptions().len(), 2);
        assert_eq!(
            b.exceptions_for("docker.io/library/redis")[0].ticket,
            "SEC-1234"
        );
        assert!(b.exceptions_for("docker.io/library/nginx").is_empty());
        assert_eq!(b.rollout().unwrap().len(), 3);
        let org = b
            .scopes()
            .node(crate::policy::scope::ORG)
            .rules
            .clone()
            .unwrap();
        assert_eq!(org.min_scanners.value, 2);
        assert!(b.license_expression("MIT OR Apache-2.0").is_some());
        // Format 1 has none of it.
        let f1 = parse_bundle(EXAMPLE.as_bytes()).unwrap();
        assert_eq!(f1.format, 1);
        assert!(f1.scopes().nodes().iter().all(|n| n.rules.is_none()));
        assert!(f1.exceptions().is_empty() && f1.rollout().is_none());
    }

    #[test]
    fn docs_show_the_fixtures_unchanged() {
        let doc = include_str!("../../docs/bundle.md");
        for (heading, fixture) in [
            ("## Full example (format 1)", EXAMPLE),
            ("## Full example (format 2)", EXAMPLE_V2),
        ] {
            let at = doc
                .find(heading)
                .unwrap_or_else(|| panic!("{heading} missing"));
            let block = &doc[at..];
            let start = block.find("```json\n").unwrap() + "```json\n".len();
            let end = block[start..].find("```").unwrap();
            assert_eq!(
                &block[start..start + end],
                fixture,
                "{heading} differs from its fixture"
            );
        }
    }

    #[test]
    fn format_2_rejections_have_reasons() {
        use serde_json::json;
        type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
        fn tag25(v: &mut serde_json::Value) -> &mut serde_json::Value {
            &mut v["images"][0]["tags"]["1.25"]
        }
        let cases: Vec<(&str, &str, Edit)> = vec![
            (
                "invalid",
                "\"NotALicence\"",
                Box::new(|v| v["images"][0]["provenance"]["license"] = json!("MIT OR NotALicence")),
            ),
            (
                "invalid",
                "GPL-2.0-only",
                Box::new(|v| v["images"][4]["provenance"]["license"] = json!("GPL-2.0")),
            ),
            (
                "invalid",
                "licenses.deny entry \"Evil-1.0\"",
                Box::new(|v| {
                    v["governance"]["rules"]["licenses"]["deny"] =
                        json!(["AGPL-3.0-only", "Evil-1.0"])
                }),
            ),
            (
                "invalid",
                "replacement 1.27 is not an approved tag",
                Box::new(|v| tag25(v)["replacement"] = json!("1.27")),
            ),
            (
                "invalid",
                "replacement 1.25 is the tag itself",
                Box::new(|v| tag25(v)["replacement"] = json!("1.25")),
            ),
            (
                "invalid",
                "not a tag",
                Box::new(|v| tag25(v)["replacement"] = json!("nginx:1.26")),
            ),
            (
                "invalid",
                "is itself sunset",
                Box::new(|v| {
                    v["images"][0]["tags"]["1.26"] = json!({"digest": digest(2).to_string(), "sunset_at": "2026-05-01T00:00:00Z"});
                }),
            ),
            (
                "invalid",
                "for scope corp/payments (or a scope above it)",
                Box::new(|v| {
                    // redis (corp/payments) may not point at a tag approved only further down.
                    v["images"][2]["digests"][0]["replacement"] = json!("7.9");
                    let provenance = v["images"][2]["provenance"].clone();
                    v["images"].as_array_mut().unwrap().push(json!({
                    "source": "docker.io/library/redis", "tags": {"7.9": digest(40).to_string()},
                    "scope": "corp/payments/checkout", "provenance": provenance}));
                }),
            ),
            (
                "invalid",
                "is not before sunset_at",
                Box::new(|v| tag25(v)["deprecated_at"] = json!("2026-06-01T00:00:00Z")),
            ),
            (
                "invalid",
                "needs deprecated_at or sunset_at",
                Box::new(|v| *tag25(v) = json!({"digest": digest(1).to_string()})),
            ),
            (
                "malformed",
                "sunset_at",
                Box::new(|v| tag25(v)["sunset_at"] = json!("next summer")),
            ),
            (
                "malformed",
                "unknown field `retired_at`",
                Box::new(|v| tag25(v)["retired_at"] = json!("2026-06-01T00:00:00Z")),
            ),
            (
                "malformed",
                "missing field `digest`",
                Box::new(|v| *tag25(v) = json!({"sunset_at": "2026-06-01T00:00:00Z"})),
            ),
            (
                "malformed",
                "expires_at",
                Box::new(|v| v["exceptions"][0]["expires_at"] = json!("2026-13-01")),
            ),
            (
                "malformed",
                "unknown field `owner`",
                Box::new(|v| v["exceptions"][0]["owner"] = json!("x")),
            ),
            (
                "malformed",
                "unknown field `max_critical`",
                Box::new(|v| v["governance"]["rules"]["max_critical"] = json!(0)),
            ),
            (
                "invalid",
                "ticket is empty",
                Box::new(|v| v["exceptions"][0]["ticket"] = json!(" ")),
            ),
            (
                "invalid",
                "not after the bundle's issued_at",
                Box::new(|v| v["exceptions"][0]["expires_at"] = json!("2026-02-01T00:00:00Z")),
            ),
            (
                "invalid",
                "not declared in governance",
                Box::new(|v| v["exceptions"][0]["scope"] = json!("corp/nope")),
            ),
            (
                "invalid",
                "never opens a public pull",
                Box::new(|v| v["exceptions"][0]["source"] = json!("quay.io/x/redis")),
            ),
            (
                "invalid",
                "private registry",
                Box::new(|v| v["exceptions"][0]["source"] = json!("registry.corp/apps/redis")),
            ),
            (
                "invalid_digest",
                "exceptions[0]",
                Box::new(|v| v["exceptions"][0]["digest"] = json!("sha256:00")),
            ),
            (
                "conflict",
                "a tag must mean one digest",
                Box::new(|v| v["exceptions"][0]["tag"] = json!("7.2")),
            ),
            (
                "conflict",
                "but the exception with ticket SEC-1234 binds it to",
                Box::new(|v| {
                    // Another scope's exception binding the same tag to another digest.
                    let mut x = v["exceptions"][0].clone();
                    x["digest"] = json!(digest(10).to_string());
                    x["scope"] = json!("corp/search");
                    v["exceptions"].as_array_mut().unwrap().push(x);
                }),
            ),
            (
                "duplicate",
                "already listed",
                Box::new(|v| {
                    let x = v["exceptions"][0].clone();
                    v["exceptions"].as_array_mut().unwrap().push(x);
                }),
            ),
            (
                "invalid",
                "loosens the rule of corp/payments",
                Box::new(|v| {
                    v["governance"]["programs"][0]["projects"][0]["rules"]["max_severity"] =
                        json!("high")
                }),
            ),
            (
                "invalid",
                "rule of corp/payments/checkout loosens the rule of corp: licenses.deny drops AGPL-3.0-only",
                Box::new(|v| {
                    v["governance"]["programs"][0]["projects"][0]["rules"]["licenses"]["deny"] =
                        json!(["GPL-2.0-only"])
                }),
            ),
            (
                "invalid",
                "rollout[1].after",
                Box::new(|v| v["rollout"][1]["after"] = json!("0s")),
            ),
            (
                "invalid",
                "must be 100",
                Box::new(|v| v["rollout"][2]["percent"] = json!(90)),
            ),
            (
                "malformed",
                "unknown field `pct`",
                Box::new(|v| v["rollout"][0] = json!({"after": "0s", "pct": 1})),
            ),
            (
                "unsupported_format",
                "format 3",
                Box::new(|v| v["format"] = json!(3)),
            ),
        ];
        for (code, text, edit) in cases {
            let e = v2_rejected(edit);
            assert_eq!(e.code(), code, "{text}: {e}");
            assert!(
                e.to_string().contains(text),
                "error should mention {text:?}: {e}"
            );
        }
    }

    #[test]
    fn format_1_rejects_format_2_fields_and_keeps_its_licence_check() {
        use serde_json::json;
        type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
        let v2 = || serde_json::from_str::<serde_json::Value>(EXAMPLE_V2).unwrap();
        let cases: Vec<(&str, Edit)> = vec![
            (
                "`exceptions`",
                Box::new(move |v| v["exceptions"] = v2()["exceptions"].clone()),
            ),
            (
                "`rollout`",
                Box::new(move |v| v["rollout"] = v2()["rollout"].clone()),
            ),
            (
                "lifecycle object",
                Box::new(|v| {
                    v["images"][0]["tags"]["1.25"] = json!({"digest": digest(1).to_string(), "sunset_at": "2026-06-01T00:00:00Z"})
                }),
            ),
            (
                "`rules`",
                Box::new(|v| v["governance"]["programs"][0]["rules"] = json!({"min_scanners": 2})),
            ),
        ];
        for (field, edit) in cases {
            let e = rejected(edit);
            assert_eq!(e.code(), "malformed", "{e}");
            assert!(
                e.to_string().contains(field) && e.to_string().contains("format 2"),
                "{e}"
            );
        }
        // Format 1 checks licence syntax only, as it always did.
        let mut v: serde_json::Value = serde_json::from_str(EXAMPLE).unwrap();
        v["images"][0]["provenance"]["license"] = json!("GPL-2.0 OR Some-Custom-Licence");
        assert!(parse_bundle(serde_json::to_string(&v).unwrap().as_bytes()).is_ok());
    }

    #[test]
    fn trust_file_limits() {
        let v2 = EXAMPLE_V2.as_bytes();
        let v1 = EXAMPLE.as_bytes();
        let limits = |days, floor| trust_2_of_3().with_limits(days, floor).unwrap();
        let now = time::macros::datetime!(2026-03-02 00:00 UTC);
        let check = |bytes: &[u8], trust: &Trust| {
            verify_bundle(bytes, &sign(bytes, &[1, 2]), trust, None, now)
        };
        assert!(check(v2, &limits(20, Some(2))).is_ok());
        let e = check(v2, &limits(19, None)).unwrap_err();
        assert_eq!(e.code(), "exception_too_long", "{e}");
        assert!(
            e.to_string().contains("SEC-1234") && e.to_string().contains("at most 19 days"),
            "{e}"
        );
        let e = check(v2, &limits(30, Some(3))).unwrap_err();
        assert_eq!(e.code(), "below_trust_floor", "{e}");
        assert!(
            e.to_string().contains("min_scanners is 2") && e.to_string().contains("floor of 3"),
            "{e}"
        );
        // Format 1 carries no scan rule: below any floor; without a floor it loads as before.
        let e = verify_bundle(
            v1,
            &sign(v1, &[1, 2]),
            &limits(30, Some(1)),
            None,
            example_now(),
        )
        .unwrap_err();
        assert_eq!(e.code(), "below_trust_floor", "{e}");
        assert!(e.to_string().contains("format 1"), "{e}");
        assert!(
            verify_bundle(v1, &sign(v1, &[1, 2]), &trust_2_of_3(), None, example_now()).is_ok()
        );
        // The streaming path applies the same limits.
        let e = verify_bundle_reader(
            std::io::Cursor::new(v2),
            &sign(v2, &[1, 2]),
            &limits(19, None),
            None,
            now,
            DEFAULT_MAX_BUNDLE_SIZE,
        )
        .unwrap()
        .unwrap_err();
        assert_eq!(e.code(), "exception_too_long", "{e}");
    }

    #[test]
    fn rollout_waves_open_in_order() {
        use crate::policy::rollout::{Wave, position, wave};
        let b = parse_bundle(EXAMPLE_V2.as_bytes()).unwrap();
        let seed_at = |want: std::ops::Range<u8>| {
            (0u32..)
                .map(|i| i.to_be_bytes())
                .find(|s| want.contains(&position(&b.issuer, s)))
                .unwrap()
        };
        let issued = b.issued_at;
        let (canary, early, late) = (seed_at(0..1), seed_at(1..10), seed_at(10..100));
        assert_eq!(wave(&b, &canary, issued), Wave::Open);
        let hour = issued + time::Duration::hours(1);
        assert_eq!(wave(&b, &early, issued), Wave::OpensAt(hour));
        assert_eq!(wave(&b, &early, hour), Wave::Open);
        let six = issued + time::Duration::hours(6);
        assert_eq!(wave(&b, &late, hour), Wave::OpensAt(six));
        assert_eq!(wave(&b, &late, six), Wave::Open);
        // Stable across versions: the version does not move a node.
        let mut v: serde_json::Value = serde_json::from_str(EXAMPLE_V2).unwrap();
        v["version"] = 99.into();
        let b99 = parse_bundle(serde_json::to_string(&v).unwrap().as_bytes()).unwrap();
        assert_eq!(wave(&b99, &early, issued), Wave::OpensAt(hour));
        // No rollout: open to every node.
        let f1 = parse_bundle(EXAMPLE.as_bytes()).unwrap();
        assert_eq!(wave(&f1, &late, f1.issued_at), Wave::Open);
    }

    #[test]
    fn streaming_verification_matches_in_memory_verification() {
        let bytes = example_json().into_bytes();
        let trust = trust_2_of_3();
        let now = example_now();
        let stream = |b: &[u8], sigs: &SignatureFile| {
            verify_bundle_reader(
                std::io::Cursor::new(b),
                sigs,
                &trust,
                None,
                now,
                DEFAULT_MAX_BUNDLE_SIZE,
            )
            .unwrap()
        };
        let sigs = sign(&bytes, &[1, 2]);
        let a = verify_bundle(&bytes, &sigs, &trust, None, now).unwrap();
        let b = stream(&bytes, &sigs).unwrap();
        assert_eq!(a.signers(), b.signers());
        assert_eq!(a.images().len(), b.images().len());
        for (x, y) in a.images().iter().zip(b.images()) {
            assert_eq!((x.source(), x.scope_path()), (y.source(), y.scope_path()));
            assert_eq!((x.tags(), x.digests()), (y.tags(), y.digests()));
            assert_eq!(x.provenance(), y.provenance());
        }
        let mut tampered = bytes.clone();
        let pos = tampered.iter().position(|&c| c == b'4').unwrap();
        tampered[pos] = b'5';
        let e = stream(&tampered, &sigs).unwrap_err();
        assert_eq!(e.code(), "bad_signature", "{e}");
        // A signature error wins over a parse error, even when the parse fails early.
        let junk = b"{not json, and more bytes after the error";
        let e = stream(junk, &sign(&junk[..9], &[1, 2])).unwrap_err();
        assert_eq!(e.code(), "bad_signature", "{e}");
        let e = stream(junk, &sign(junk, &[1, 2])).unwrap_err();
        assert_eq!(e.code(), "malformed", "{e}");
        let e = stream(&bytes, &SignatureFile::new()).unwrap_err();
        assert_eq!(e.code(), "missing_signature", "{e}");
        let v2 = example_json().replacen("\"format\": 1", "\"format\": 3, \"new\": 1", 1);
        assert_ne!(v2, example_json());
        let e = stream(v2.as_bytes(), &sign(v2.as_bytes(), &[1, 2])).unwrap_err();
        assert_eq!(e.code(), "unsupported_format", "{e}");
        let invalid = example_json().replacen("\"version\": 42", "\"version\": 0", 1);
        let e = stream(invalid.as_bytes(), &sign(invalid.as_bytes(), &[1, 2])).unwrap_err();
        assert_eq!(e.code(), "invalid", "{e}");
    }

    /// Format 2: one repository may have several entries for one scope (one per provenance), as long
    /// as no tag or bare digest is in two of them; format 1 keeps one entry per scope.
    #[test]
    fn format_2_entries_of_one_scope_split_by_provenance() {
        let v2 = || serde_json::from_str::<serde_json::Value>(EXAMPLE_V2).unwrap();
        let mut v = v2();
        let mut second = v["images"][1].clone();
        second["tags"] = serde_json::json!({"3.10": digest(0x31).to_string()});
        second["provenance"]["license"] = serde_json::json!("MIT");
        second["provenance"]["scans"]
            .as_array_mut()
            .unwrap()
            .truncate(1);
        v["images"].as_array_mut().unwrap().push(second.clone());
        let b = parse_bundle(v.to_string().as_bytes()).unwrap();
        let pause = b.entries("registry.k8s.io/pause");
        assert_eq!(pause.len(), 2);
        assert_eq!(
            pause[0].tag("3.9"),
            Some(&digest(3)),
            "the bundle's order is kept"
        );
        assert_eq!(pause[1].provenance().license.as_ref(), "MIT");

        for (what, edit) in [
            ("tag 3.9", serde_json::json!({"3.9": digest(3).to_string()})),
            ("digest", serde_json::json!({})),
            ("through tag 3.9", serde_json::json!({})),
        ] {
            let mut v = v2();
            let mut dup = second.clone();
            dup["tags"] = edit;
            if what == "digest" {
                v["images"][1]["digests"] = serde_json::json!([digest(0x32).to_string()]);
                dup["digests"] = serde_json::json!([digest(0x32).to_string()]);
            }
            if what == "through tag 3.9" {
                // The digest tag 3.9 is bound to, approved bare by another entry of the scope.
                dup["digests"] = serde_json::json!([digest(3).to_string()]);
            }
            v["images"].as_array_mut().unwrap().push(dup);
            let e = parse_bundle(v.to_string().as_bytes()).unwrap_err();
            assert_eq!(e.code(), "duplicate", "{e}");
            assert!(
                e.to_string().contains(what)
                    && e.to_string().contains("two entries for scope corp"),
                "{e}"
            );
        }

        let mut v: serde_json::Value = serde_json::from_str(&example_json()).unwrap();
        let mut second = v["images"][1].clone();
        second["tags"] = serde_json::json!({"1.27": digest(0x31).to_string()});
        v["images"].as_array_mut().unwrap().push(second);
        let e = parse_bundle(v.to_string().as_bytes()).unwrap_err();
        assert_eq!(e.code(), "duplicate", "{e}");
        assert!(e.to_string().contains("listed twice for scope corp"), "{e}");
    }

    /// A reader that counts the bytes read through it.
    struct Counting<'a> {
        inner: std::io::Cursor<&'a [u8]>,
        read: &'a std::cell::Cell<u64>,
    }
    impl std::io::Read for Counting<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.read.set(self.read.get() + n as u64);
            Ok(n)
        }
    }
    impl std::io::Seek for Counting<'_> {
        fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
            self.inner.seek(to)
        }
    }

    /// Verifies `bytes` with the streaming entry point; returns the outcome and how many bytes it read.
    fn verify_counting(
        bytes: &[u8],
        sigs: &SignatureFile,
        max: u64,
    ) -> (Result<VerifiedBundle, BundleError>, u64) {
        let read = std::cell::Cell::new(0);
        let reader = Counting {
            inner: std::io::Cursor::new(bytes),
            read: &read,
        };
        let r = verify_bundle_reader(reader, sigs, &trust_2_of_3(), None, example_now(), max)
            .expect("no I/O error");
        (r, read.get())
    }

    #[test]
    fn signatures_are_checked_before_any_parsing() {
        // A document that would be refused by the parser if it were parsed at all (thousands of
        // nested arrays, an unknown format): with bad signatures it is read exactly once, to hash
        // it, and never reaches the parser.
        let mut doc = String::from("{\"format\": 9, \"images\": ");
        doc.push_str(&"[".repeat(100_000));
        let bytes = doc.into_bytes();
        SEEN_FORMAT.with(|f| f.set(None));
        let (r, read) = verify_counting(&bytes, &sign(b"other bytes", &[1, 2]), u64::MAX);
        assert_eq!(r.unwrap_err().code(), "bad_signature");
        assert_eq!(
            read,
            bytes.len() as u64,
            "one hashing pass, no parsing pass"
        );
        assert_eq!(
            SEEN_FORMAT.with(|f| f.get()),
            None,
            "the parser never saw it"
        );
        // Signed by the trusted keys, the same document is parsed (and refused by the parser).
        let (r, read) = verify_counting(&bytes, &sign(&bytes, &[1, 2]), u64::MAX);
        assert_eq!(r.unwrap_err().code(), "unsupported_format");
        assert!(read > bytes.len() as u64, "parsed in a second pass");
        assert_eq!(SEEN_FORMAT.with(|f| f.get()), Some(9));
        // Too few signatures: refused after the hash as well.
        let (r, read) = verify_counting(&bytes, &sign(&bytes, &[1]), u64::MAX);
        assert_eq!(r.unwrap_err().code(), "not_enough_signatures");
        assert_eq!(read, bytes.len() as u64);
    }

    #[test]
    fn oversize_bundles_are_refused_unread() {
        let bytes = example_json().into_bytes();
        let sigs = sign(&bytes, &[1, 2]);
        let len = bytes.len() as u64;
        let (r, read) = verify_counting(&bytes, &sigs, len - 1);
        let e = r.unwrap_err();
        assert_eq!(e.code(), "too_large", "{e}");
        assert!(e.to_string().contains("policy.max_bundle_size"), "{e}");
        assert_eq!(
            read, 0,
            "the size is known from a seek, before any byte is read"
        );
        // Exactly at the limit it loads, in two passes over the bytes.
        let (r, read) = verify_counting(&bytes, &sigs, len);
        assert_eq!(r.expect("a valid bundle at the limit loads").version, 42);
        assert_eq!(read, 2 * len);
    }

    #[test]
    fn a_bundle_that_changes_between_the_passes_is_refused() {
        /// Serves `first` until the first seek back to the start after reading, then `second`.
        struct Swapping {
            first: std::io::Cursor<Vec<u8>>,
            second: std::io::Cursor<Vec<u8>>,
            swapped: bool,
            read_any: bool,
        }
        impl std::io::Read for Swapping {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                self.read_any = true;
                match self.swapped {
                    false => self.first.read(buf),
                    true => self.second.read(buf),
                }
            }
        }
        impl std::io::Seek for Swapping {
            fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
                if self.read_any && to == std::io::SeekFrom::Start(0) {
                    self.swapped = true;
                }
                self.first.seek(to)?;
                self.second.seek(to)
            }
        }
        let good = example_json().into_bytes();
        let evil = example_json()
            .replacen("\"version\": 42", "\"version\": 43", 1)
            .into_bytes();
        assert_eq!(good.len(), evil.len());
        let reader = Swapping {
            first: std::io::Cursor::new(good.clone()),
            second: std::io::Cursor::new(evil),
            swapped: false,
            read_any: false,
        };
        let e = verify_bundle_reader(
            reader,
            &sign(&good, &[1, 2]),
            &trust_2_of_3(),
            None,
            example_now(),
            DEFAULT_MAX_BUNDLE_SIZE,
        )
        .expect_err("a changed file is an error, never a bundle");
        assert!(
            e.to_string().contains("changed while it was being read"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_tag_keys_are_rejected() {
        let json = example_json().replacen(
            "\"1.25\": ",
            &format!("\"1.25\": \"{}\", \"1.25\": ", digest(1)),
            1,
        );
        let e = parse_bundle(json.as_bytes()).unwrap_err();
        assert_eq!(e.code(), "duplicate", "{e}");
    }

    #[test]
    fn verification_checks_signatures_time_and_version() {
        let bytes = example_json().into_bytes();
        let trust = trust_2_of_3();
        let sigs = sign(&bytes, &[1, 2]);
        let now = example_now();
        let b = verify_bundle(&bytes, &sigs, &trust, Some(41), now).unwrap();
        assert_eq!(b.signers(), ["admin1", "admin2"]);
        let e = verify_bundle(&bytes, &sigs, &trust, Some(42), now).unwrap_err();
        assert_eq!(e.code(), "rollback", "{e}");
        let e = verify_bundle(&bytes, &sigs, &trust, None, now + time::Duration::days(365))
            .unwrap_err();
        assert_eq!(e.code(), "expired", "{e}");
        let e = verify_bundle(
            &bytes,
            &sigs,
            &trust,
            None,
            b.issued_at - time::Duration::minutes(6),
        )
        .unwrap_err();
        assert_eq!(e.code(), "issued_in_future", "{e}");
        assert!(
            verify_bundle(
                &bytes,
                &sigs,
                &trust,
                None,
                b.issued_at - time::Duration::minutes(4)
            )
            .is_ok()
        );
        let e = verify_bundle(&bytes, &sign(&bytes, &[1]), &trust, None, now).unwrap_err();
        assert_eq!(e.code(), "not_enough_signatures", "{e}");
        let e = verify_bundle(&bytes, &sign(&bytes, &[1, 7]), &trust, None, now).unwrap_err();
        assert_eq!(e.code(), "not_enough_signatures", "{e}");
        let mut tampered = bytes.clone();
        let pos = tampered.iter().position(|&c| c == b'4').unwrap();
        tampered[pos] = b'5';
        let e = verify_bundle(&tampered, &sigs, &trust, None, now).unwrap_err();
        assert_eq!(e.code(), "bad_signature", "{e}");
        let e = verify_bundle(&bytes, &SignatureFile::new(), &trust, None, now).unwrap_err();
        assert_eq!(e.code(), "missing_signature", "{e}");
        // Signed garbage is still rejected as malformed, after the signature check.
        let junk = b"{not json";
        let e = verify_bundle(junk, &sign(junk, &[1, 2]), &trust, None, now).unwrap_err();
        assert_eq!(e.code(), "malformed", "{e}");
    }
}
