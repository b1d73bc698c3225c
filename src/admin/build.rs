//! `pullgate bundle build`: the catalog → the next bundle.
//!
//! [`render`] is pure and deterministic: the same catalog, version and issue time give the same bytes
//! (entries sorted by source and scope, tags and digests sorted, scans sorted, fields in a fixed order).
//! Format 2 (the default) carries lifecycle, rules, exceptions and rollout; format 1 is for nodes that
//! do not read format 2 yet: it leaves those out, and leaves out tags and digests already sunset.
//!
//! Format 2: one bundle entry per repository, scope and provenance (licence and scans), so a node
//! judges every approval on its own scans and licence, exactly as `approve` did — merged, one tag's
//! scanners could make up another tag's missing ones, and one tag's licence or severity could deny
//! another. Approvals with the same provenance share an entry (the approver and time of the latest
//! are recorded). Format 1 (whose nodes check no rules) keeps one entry per repository and scope,
//! with every scan and the licences joined with `AND`.
//!
//! [`check_mirror`] asks the private registry (concurrent HEAD requests) for every approved manifest and
//! every exception's, and names the missing ones.

use std::collections::BTreeMap;
use std::path::Path;

use futures_util::StreamExt as _;
use serde::Serialize;
use time::OffsetDateTime;

use super::catalog::{self, Catalog, Version, rfc3339};
use crate::policy::{Digest, Reference};
use crate::registry::{Registry, RegistryError};

/// Why a bundle was not built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The catalog does not load.
    #[error("the catalog has problems; fix them first:\n{0}")]
    Catalog(catalog::Problems),
    /// The previous bundle cannot be read.
    #[error("cannot read the previous bundle {}: {why}; give the bundle now in force, or --version N", path.display())]
    Previous {
        path: std::path::PathBuf,
        why: String,
    },
    /// Approved images are missing from the private registry.
    #[error(
        "{} approved image(s) are missing from the private registry; approve them again (which mirrors them) or remove them from the catalog:\n  {}",
        missing.len(),
        missing.iter().take(50).cloned().collect::<Vec<_>>().join("\n  ")
    )]
    MissingFromMirror { missing: Vec<String> },
    /// The mirror check itself failed.
    #[error("checking the mirror failed: {0}")]
    Registry(#[from] RegistryError),
}

/// The version a new bundle gets: `explicit`, else the previous bundle's + 1, else 1.
pub fn next_version(previous: Option<&Path>, explicit: Option<u64>) -> Result<u64, BuildError> {
    if let Some(v) = explicit {
        return Ok(v);
    }
    let Some(path) = previous else { return Ok(1) };
    #[derive(serde::Deserialize)]
    struct OnlyVersion {
        version: u64,
    }
    let err = |why: String| BuildError::Previous {
        path: path.to_owned(),
        why,
    };
    let f = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let v: OnlyVersion =
        serde_json::from_reader(std::io::BufReader::new(f)).map_err(|e| err(e.to_string()))?;
    v.version
        .checked_add(1)
        .ok_or_else(|| err("its version is the largest possible".into()))
}

#[derive(Serialize)]
struct Out<'a> {
    format: u32,
    version: u64,
    issued_at: String,
    expires_at: String,
    issuer: &'a str,
    private_registry: &'a str,
    mirrors: Vec<OutMirror<'a>>,
    governance: OutGovernance<'a>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    first_party: Vec<OutFirstParty<'a>>,
    images: Vec<OutImage<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    exceptions: Vec<OutException<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    rollout: Vec<OutRollout<'a>>,
}

#[derive(Serialize)]
struct OutMirror<'a> {
    source: &'a str,
    target: &'a str,
}

#[derive(Serialize)]
struct OutGovernance<'a> {
    organization: &'a str,
    application_label: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rules: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    programs: Vec<OutProgram<'a>>,
}

#[derive(Serialize)]
struct OutProgram<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rules: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    projects: Vec<OutProject<'a>>,
}

#[derive(Serialize)]
struct OutProject<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rules: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    namespaces: &'a [String],
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    applications: &'a [String],
}

#[derive(Serialize)]
struct OutFirstParty<'a> {
    prefix: &'a str,
    scope: &'a str,
    require_digest: bool,
}

#[derive(Serialize)]
#[serde(untagged)]
enum OutRef<'a> {
    Plain(&'a str),
    Lifecycle {
        digest: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        deprecated_at: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        sunset_at: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        replacement: Option<&'a str>,
    },
}

#[derive(Serialize)]
struct OutImage<'a> {
    source: &'a str,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    tags: BTreeMap<&'a str, OutRef<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    digests: Vec<OutRef<'a>>,
    scope: &'a str,
    provenance: OutProvenance<'a>,
}

#[derive(Serialize)]
struct OutProvenance<'a> {
    license: String,
    scans: Vec<OutScan<'a>>,
    approved_by: &'a str,
    approved_at: String,
}

#[derive(Serialize, PartialEq, Eq, PartialOrd, Ord)]
struct OutScan<'a> {
    scanner: &'a str,
    version: &'a str,
    report: &'a str,
    #[serde(serialize_with = "display")]
    worst_severity: crate::policy::Severity,
}

fn display<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

#[derive(Serialize)]
struct OutException<'a> {
    source: &'a str,
    digest: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    tag: Option<&'a str>,
    scope: &'a str,
    expires_at: String,
    ticket: &'a str,
    reason: &'a str,
    approved_by: &'a str,
}

#[derive(Serialize)]
struct OutRollout<'a> {
    after: &'a str,
    percent: u32,
}

/// What format 2 keeps apart in separate entries of one repository and scope: licence and scans.
type Provenance<'a> = (&'a str, Vec<OutScan<'a>>);

/// Renders the bundle of `catalog` (format 1 or 2) with `version`, issued at `issued_at`.
pub fn render(catalog: &Catalog, format: u32, version: u64, issued_at: OffsetDateTime) -> Vec<u8> {
    let v2 = format >= 2;
    let issued_at = issued_at.replace_nanosecond(0).unwrap_or(issued_at);
    // The entries of each repository are independent of the others': rendered on every core, each part
    // into its own bytes, joined in order.
    let parts = super::parallel::in_parts(&catalog.repositories, |_, repos| {
        let mut part = Entries::default();
        for repo in repos {
            for image in repository_entries(repo, v2, issued_at) {
                part.push(&image);
            }
        }
        part
    });
    let mut head = Vec::with_capacity(4096);
    if serde_json::to_writer_pretty(
        &mut head,
        &bundle_without_images(catalog, v2, version, issued_at),
    )
    .is_err()
    {
        return b"\n".to_vec();
    }
    splice_images(head, parts)
}

/// Everything of the bundle but its entries (`images` is left empty), `issued_at` without its
/// fraction of a second.
fn bundle_without_images(
    catalog: &Catalog,
    v2: bool,
    version: u64,
    issued_at: OffsetDateTime,
) -> Out<'_> {
    let expires_at = issued_at
        + time::Duration::try_from(catalog.header.validity.0).unwrap_or(time::Duration::MAX);
    let h = &catalog.header;
    let g = &catalog.governance;
    let rules = |r: &Option<toml::Spanned<catalog::RuleEntry>>| {
        if v2 {
            r.as_ref().and_then(|r| r.get_ref().bundle_json())
        } else {
            None
        }
    };
    let mode = |m: Option<crate::policy::Mode>| m.map(|m| m.to_string());

    let mut exceptions: Vec<OutException> = if v2 {
        catalog
            .exceptions
            .iter()
            .filter(|e| e.expires_at.0 > issued_at)
            .map(|e| OutException {
                source: e.source.get_ref(),
                digest: e.digest.get_ref(),
                tag: e.tag.as_deref(),
                scope: e.scope.get_ref(),
                expires_at: rfc3339(e.expires_at.0),
                ticket: &e.ticket,
                reason: &e.reason,
                approved_by: &e.approved_by,
            })
            .collect()
    } else {
        Vec::new()
    };
    exceptions.sort_by(|a, b| (a.source, a.scope, a.digest).cmp(&(b.source, b.scope, b.digest)));

    Out {
        format: if v2 { 2 } else { 1 },
        version,
        issued_at: rfc3339(issued_at),
        expires_at: rfc3339(expires_at),
        issuer: &h.issuer,
        private_registry: h.private_registry.get_ref(),
        mirrors: h
            .mirrors
            .iter()
            .map(|m| OutMirror {
                source: m.source.get_ref(),
                target: m.target.get_ref(),
            })
            .collect(),
        governance: OutGovernance {
            organization: &g.organization,
            application_label: &g.application_label,
            mode: mode(g.mode),
            rules: rules(&g.rules),
            programs: g
                .programs
                .iter()
                .map(|p| OutProgram {
                    name: &p.name,
                    mode: mode(p.mode),
                    rules: rules(&p.rules),
                    projects: p
                        .projects
                        .iter()
                        .map(|j| OutProject {
                            name: &j.name,
                            mode: mode(j.mode),
                            rules: rules(&j.rules),
                            namespaces: &j.namespaces,
                            applications: &j.applications,
                        })
                        .collect(),
                })
                .collect(),
        },
        first_party: h
            .first_party
            .iter()
            .map(|f| OutFirstParty {
                prefix: &f.prefix,
                scope: f.scope.get_ref(),
                require_digest: f.require_digest,
            })
            .collect(),
        images: Vec::new(),
        exceptions,
        rollout: if v2 {
            h.rollout
                .iter()
                .map(|r| OutRollout {
                    after: &r.after,
                    percent: r.percent,
                })
                .collect()
        } else {
            Vec::new()
        },
    }
}

/// The pretty-printed bundle with its (empty) `images` array replaced by the rendered entries.
///
/// The top-level key is found by its bytes — a newline, two spaces, `"images": []` — which can only be
/// that key: JSON strings hold no raw newline, and only the top-level object's keys are indented by
/// two spaces.
fn splice_images(head: Vec<u8>, parts: Vec<Entries>) -> Vec<u8> {
    const EMPTY: &[u8] = b"\n  \"images\": []";
    let count: usize = parts.iter().map(|p| p.count).sum();
    let Some(at) = head.windows(EMPTY.len()).position(|w| w == EMPTY) else {
        // `Out` always has the key: this would be a change to it that forgot this function.
        unreachable!("the rendered bundle has no images key");
    };
    let open = at + EMPTY.len() - 1;
    let len: usize = parts.iter().map(|p| p.bytes.len()).sum();
    let mut bytes = Vec::with_capacity(head.len() + len + 8);
    bytes.extend_from_slice(&head[..open]);
    let mut first = true;
    for part in &parts {
        if part.count == 0 {
            continue;
        }
        // Each part's entries start with the separator of a following entry (`,`); the very first
        // entry of the array has none.
        bytes.extend_from_slice(if first { &part.bytes[1..] } else { &part.bytes });
        first = false;
    }
    if count > 0 {
        bytes.extend_from_slice(b"\n  ");
    }
    bytes.extend_from_slice(&head[open..]);
    bytes.push(b'\n');
    bytes
}

/// Bundle entries rendered as the `images` array's elements are printed (two levels deep), each
/// preceded by `,` and its line break.
#[derive(Default)]
struct Entries {
    bytes: Vec<u8>,
    count: usize,
}

impl Entries {
    fn push(&mut self, image: &OutImage) {
        self.bytes.extend_from_slice(b",\n    ");
        let mut ser = serde_json::Serializer::with_formatter(&mut self.bytes, Indented::at(2));
        // Serializing borrowed strings into memory cannot fail.
        image
            .serialize(&mut ser)
            .unwrap_or_else(|e| unreachable!("{e}"));
        self.count += 1;
    }
}

/// serde_json's pretty layout (two spaces per level) starting `base` levels deep, for values printed
/// apart and put inside a document.
struct Indented {
    level: usize,
    has_value: bool,
}

impl Indented {
    fn at(base: usize) -> Indented {
        Indented {
            level: base,
            has_value: false,
        }
    }

    fn newline<W: ?Sized + std::io::Write>(&self, w: &mut W) -> std::io::Result<()> {
        const SPACES: &[u8] = &[b' '; 64];
        w.write_all(b"\n")?;
        let mut n = self.level * 2;
        while n > 0 {
            let k = n.min(SPACES.len());
            w.write_all(&SPACES[..k])?;
            n -= k;
        }
        Ok(())
    }

    fn open<W: ?Sized + std::io::Write>(&mut self, w: &mut W, c: &[u8]) -> std::io::Result<()> {
        self.level += 1;
        self.has_value = false;
        w.write_all(c)
    }

    fn close<W: ?Sized + std::io::Write>(&mut self, w: &mut W, c: &[u8]) -> std::io::Result<()> {
        self.level -= 1;
        if self.has_value {
            self.newline(w)?;
        }
        w.write_all(c)
    }

    fn item<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if !first {
            w.write_all(b",")?;
        }
        self.newline(w)
    }
}

impl serde_json::ser::Formatter for Indented {
    fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.open(w, b"[")
    }
    fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.close(w, b"]")
    }
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.item(w, first)
    }
    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, _: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.open(w, b"{")
    }
    fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.close(w, b"}")
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.item(w, first)
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, _: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
}

/// The bundle entries of one repository (see the module docs for how approvals are grouped).
fn repository_entries(
    repo: &catalog::Repository,
    v2: bool,
    issued_at: OffsetDateTime,
) -> Vec<OutImage<'_>> {
    let mut images = Vec::new();
    let mut groups: BTreeMap<(&str, Option<Provenance>), Vec<&Version>> = BTreeMap::new();
    for v in &repo.content.approved {
        if !v2 && v.sunset_at.is_some_and(|s| s.0 <= issued_at) {
            continue;
        }
        let provenance = v2.then(|| (v.license.get_ref().as_str(), out_scans([v])));
        groups
            .entry((v.scope.get_ref(), provenance))
            .or_default()
            .push(v);
    }
    for ((scope, _), versions) in groups {
        let mut tags = BTreeMap::new();
        let mut digests = Vec::new();
        for v in &versions {
            let r = if v2 && (v.deprecated_at.is_some() || v.sunset_at.is_some()) {
                OutRef::Lifecycle {
                    digest: v.digest.get_ref(),
                    deprecated_at: v.deprecated_at.map(|t| rfc3339(t.0)),
                    sunset_at: v.sunset_at.map(|t| rfc3339(t.0)),
                    replacement: v.replacement.as_ref().map(|r| r.get_ref().as_str()),
                }
            } else {
                OutRef::Plain(v.digest.get_ref())
            };
            match &v.tag {
                Some(t) => {
                    tags.insert(t.get_ref().as_str(), r);
                }
                None => digests.push((v.digest.get_ref().as_str(), r)),
            }
        }
        digests.sort_by(|a, b| a.0.cmp(b.0));
        let mut licences: Vec<&str> = versions
            .iter()
            .map(|v| v.license.get_ref().as_str())
            .collect();
        licences.sort_unstable();
        licences.dedup();
        let license = if licences.len() == 1 {
            licences[0].to_owned()
        } else {
            licences
                .iter()
                .map(|l| format!("({l})"))
                .collect::<Vec<_>>()
                .join(" AND ")
        };
        let latest = versions
            .iter()
            .max_by_key(|v| (v.approved_at, v.digest.get_ref()))
            .copied();
        let Some(latest) = latest else { continue };
        images.push(OutImage {
            source: &repo.source,
            tags,
            digests: digests.into_iter().map(|(_, r)| r).collect(),
            scope,
            provenance: OutProvenance {
                license,
                scans: out_scans(versions.iter().copied()),
                approved_by: &latest.approved_by,
                approved_at: rfc3339(latest.approved_at.0),
            },
        });
    }
    images
}

/// The scans of `versions`, sorted, each once.
fn out_scans<'a>(versions: impl IntoIterator<Item = &'a Version>) -> Vec<OutScan<'a>> {
    let mut scans: Vec<OutScan> = versions
        .into_iter()
        .flat_map(|v| v.scans.iter())
        .map(|s| OutScan {
            scanner: &s.scanner,
            version: &s.version,
            report: s.report.get_ref(),
            worst_severity: s.worst_severity,
        })
        .collect();
    scans.sort();
    scans.dedup();
    scans
}

/// Every manifest the bundle points nodes at: (`private/mirror/path`, digest), deduplicated, sorted.
pub fn mirrored_manifests(catalog: &Catalog) -> Vec<(String, Digest)> {
    let mut out = std::collections::BTreeSet::new();
    let sources = catalog
        .repositories
        .iter()
        .flat_map(|r| {
            r.content
                .approved
                .iter()
                .map(move |v| (r.source.as_str(), v.digest.get_ref().as_str()))
        })
        .chain(
            catalog
                .exceptions
                .iter()
                .map(|e| (e.source.get_ref().as_str(), e.digest.get_ref().as_str())),
        );
    for (source, digest) in sources {
        let (Ok(r), Ok(d)) = (Reference::parse(source), Digest::parse(digest)) else {
            continue;
        };
        if let Some(path) = catalog.mirror_path(&r) {
            out.insert((path, d));
        }
    }
    out.into_iter().collect()
}

/// HEADs every approved manifest in the private registry, `concurrency` at a time; the missing ones
/// are [`BuildError::MissingFromMirror`]. Returns how many were checked.
pub async fn check_mirror(
    catalog: &Catalog,
    registry: &Registry,
    concurrency: usize,
) -> Result<usize, BuildError> {
    let host = catalog.header.private_registry.get_ref().clone();
    let wanted = mirrored_manifests(catalog);
    let checked = wanted.len();
    let results: Vec<Result<Option<String>, RegistryError>> = futures_util::stream::iter(wanted)
        .map(|(path, digest)| {
            let host = &host;
            async move {
                let there = registry.manifest_exists(host, &path, &digest).await?;
                Ok((!there).then(|| format!("{host}/{path}@{digest}")))
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut missing = Vec::new();
    for r in results {
        if let Some(m) = r? {
            missing.push(m);
        }
    }
    missing.sort();
    if missing.is_empty() {
        Ok(checked)
    } else {
        Err(BuildError::MissingFromMirror { missing })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use time::macros::datetime;

    use super::*;
    use crate::admin::catalog;
    use crate::admin::catalog::tests::copy_fixture;
    use crate::policy::{
        ImageRequest, PodContext, PrivateKey, ReasonCode, SignatureFile, Trust, VerifiedBundle,
        decide, trust::TrustedKey, verify_bundle,
    };

    /// Signs `bytes` with two keys and verifies them as a node does, at `now`.
    fn verify_on_a_node(bytes: &[u8], now: OffsetDateTime) -> VerifiedBundle {
        let keys = [
            PrivateKey::from_seed([1; 32]),
            PrivateKey::from_seed([2; 32]),
        ];
        let trust = Trust::new(
            keys.iter()
                .enumerate()
                .map(|(i, k)| TrustedKey {
                    name: format!("admin{i}"),
                    key: k.public(),
                })
                .collect(),
            2,
        )
        .unwrap();
        let mut sigs = SignatureFile::new();
        for k in &keys {
            sigs.add(k.sign_bundle(bytes));
        }
        let b = verify_bundle(bytes, &sigs, &trust, None, now).unwrap_or_else(|e| {
            panic!(
                "the node rejects the built bundle: {e}\n{}",
                String::from_utf8_lossy(bytes)
            )
        });
        crate::policy::bundle::check_trust_limits(&b, &trust).unwrap();
        b
    }

    /// The example catalog with `extra` more repositories (copies of its `pause` file).
    fn catalog_with(extra: usize) -> (tempfile::TempDir, Catalog) {
        let t = copy_fixture();
        let pause = t.path().join("images/registry.k8s.io/pause.toml");
        let text = std::fs::read_to_string(&pause).unwrap();
        for i in 0..extra {
            let copy = text.replace(
                "registry.k8s.io/pause\"",
                &format!("registry.k8s.io/pause{i}\""),
            );
            std::fs::write(pause.with_file_name(format!("pause{i}.toml")), copy).unwrap();
        }
        let catalog = Catalog::load(t.path()).unwrap();
        assert_eq!(catalog.repositories.len(), 2 + extra);
        (t, catalog)
    }

    #[test]
    fn entries_rendered_in_parts_are_laid_out_as_one_pretty_print() {
        let issued = datetime!(2026-04-01 10:00:00.5 UTC);
        for extra in [0, 1, 41] {
            let (_t, catalog) = catalog_with(extra);
            for format in [1, 2] {
                let v2 = format == 2;
                let mut whole = bundle_without_images(&catalog, v2, 9, issued);
                whole.images = catalog
                    .repositories
                    .iter()
                    .flat_map(|r| repository_entries(r, v2, issued.replace_nanosecond(0).unwrap()))
                    .collect();
                assert!(whole.images.len() > extra);
                let mut want = serde_json::to_vec_pretty(&whole).unwrap();
                want.push(b'\n');
                let got = render(&catalog, format, 9, issued);
                assert!(
                    got == want,
                    "format {format}, {extra} more repositories:\n{}",
                    String::from_utf8_lossy(&got)
                );
            }
        }
    }

    #[test]
    fn a_catalog_without_images_renders_an_empty_list() {
        let t = copy_fixture();
        std::fs::remove_dir_all(t.path().join("images")).unwrap();
        let catalog = Catalog::load(t.path()).unwrap();
        let got = render(&catalog, 2, 3, datetime!(2026-04-01 10:00 UTC));
        let mut want = serde_json::to_vec_pretty(&bundle_without_images(
            &catalog,
            true,
            3,
            datetime!(2026-04-01 10:00 UTC),
        ))
        .unwrap();
        want.push(b'\n');
        assert_eq!(
            String::from_utf8(got).unwrap(),
            String::from_utf8(want).unwrap()
        );
    }

    fn pod(namespace: Option<&str>) -> PodContext {
        PodContext {
            namespace: namespace.map(str::to_owned),
            name: Some("p".into()),
            uid: None,
            labels: BTreeMap::new(),
        }
    }

    fn reason(b: &VerifiedBundle, image: &str, ns: Option<&str>, at: OffsetDateTime) -> ReasonCode {
        decide(&ImageRequest::Reference(image), b, &pod(ns), at).reason
    }

    /// What `approve --replace 1.26` of `nginx:1.27` writes, at `now`.
    fn replace_nginx_126(dir: &Path, now: OffsetDateTime) {
        let c = Catalog::load(dir).unwrap();
        let repo = c.repository("docker.io/library/nginx").unwrap();
        let sunset = now + time::Duration::try_from(c.rules("corp").unwrap().sunset_after).unwrap();
        let text = catalog::tests::replace_nginx_126(repo, now, sunset);
        std::fs::write(dir.join(&repo.file), text).unwrap();
    }

    #[test]
    fn every_bundle_built_from_the_example_catalog_verifies_on_a_node() {
        // The example's exception expires 2099-03-21: build three weeks before, so that it is in the
        // bundle and within the node's default 30-day limit.
        let issued = datetime!(2099-03-01 00:00 UTC);
        let now = issued + time::Duration::hours(1);
        let t = copy_fixture();
        replace_nginx_126(t.path(), issued);
        let catalog = Catalog::load(t.path()).unwrap();

        let bytes = render(&catalog, 2, 5, issued);
        let b = verify_on_a_node(&bytes, now);
        assert_eq!(b.format, 2);
        assert_eq!(b.exceptions().len(), 1, "the exception is carried");
        assert!(
            b.scopes().node(crate::policy::scope::ORG).rules.is_some(),
            "rules are carried"
        );
        let nginx = b.entries("docker.io/library/nginx");
        let life = nginx
            .iter()
            .find_map(|e| e.tag_lifecycle("1.26"))
            .expect("1.26 has the lifecycle --replace wrote");
        assert_eq!(life.replacement.as_deref(), Some("1.27"));
        // Deprecated from the replace, sunset 30 days later (the catalog's sunset_after).
        assert_eq!(reason(&b, "nginx:1.26", None, now), ReasonCode::Deprecated);
        let sunset = issued + time::Duration::days(30);
        assert_eq!(
            reason(&b, "nginx:1.26", None, sunset - time::Duration::seconds(1)),
            ReasonCode::Deprecated
        );
        let d = decide(
            &ImageRequest::Reference("nginx:1.26"),
            &b,
            &pod(None),
            sunset,
        );
        assert_eq!(d.reason, ReasonCode::Sunset);
        assert!(d.message.contains("nginx:1.27"), "{}", d.message);
        assert_eq!(reason(&b, "nginx:1.27", None, sunset), ReasonCode::Approved);
        assert_eq!(reason(&b, "nginx:1.25", None, now), ReasonCode::Sunset);
        // The exception: redis 7.4 for checkout only.
        assert_eq!(
            reason(&b, "redis:7.4", Some("checkout"), now),
            ReasonCode::Exception
        );

        // The rule approve applies at every scope is the rule the node enforces there.
        for (path, rules) in &catalog.scopes {
            let id = b
                .scopes()
                .lookup(path)
                .expect("every catalog scope is in the bundle");
            let node = b
                .scopes()
                .node(id)
                .rules
                .as_deref()
                .expect("format 2 rules");
            assert_eq!(node.summary(), rules.bundle.summary(), "{path}");
        }

        // Format 1: no lifecycle, rules or exceptions; what is already sunset is left out.
        let bytes = render(&catalog, 1, 5, issued);
        let b = verify_on_a_node(&bytes, now);
        assert_eq!(b.format, 1);
        assert!(b.exceptions().is_empty());
        let tags: Vec<&str> = b
            .entries("docker.io/library/nginx")
            .iter()
            .flat_map(|e| e.tags().iter().map(|(t, _)| &**t))
            .collect();
        assert_eq!(tags, ["1.26", "1.27"], "1.25 is sunset by then");
    }

    /// A repository with three tags for one scope, each with its own scans and licence: the node must
    /// judge each tag on its own provenance, as `approve` did.
    #[test]
    fn each_tag_keeps_its_own_provenance_on_the_node() {
        let t = copy_fixture();
        let approval = |tag: &str, n: u8, license: &str, scans: &[(&str, &str)]| {
            let mut s = format!(
                "\n[[approved]]\nscope = \"corp\"\ntag = \"{tag}\"\ndigest = \"{}\"\nlicense = \"{license}\"\napproved_by = \"bab14e60b2c4df72\"\napproved_at = 2026-01-10T09:30:00Z\n",
                Digest::Sha256([n; 32])
            );
            for (i, (scanner, severity)) in scans.iter().enumerate() {
                s += &format!(
                    "\n[[approved.scans]]\nscanner = \"{scanner}\"\nversion = \"1\"\nreport = \"{}\"\nworst_severity = \"{severity}\"\nscanned_at = 2026-01-10T09:00:00Z\n",
                    Digest::Sha256([n + i as u8 + 1; 32])
                );
            }
            s
        };
        let file = String::from("source = \"docker.io/library/redis\"\n")
            + &approval("7.2", 0x10, "MIT", &[("trivy", "low"), ("grype", "none")])
            + &approval(
                "7.0",
                0x20,
                "GPL-2.0-only",
                &[("trivy", "high"), ("grype", "low")],
            )
            + &approval("6.2", 0x30, "MIT", &[("trivy", "none")]);
        std::fs::write(t.path().join("images/docker.io/library/redis.toml"), file).unwrap();
        let catalog = Catalog::load(t.path()).unwrap();
        let issued = datetime!(2099-03-01 00:00 UTC);
        let now = issued + time::Duration::hours(1);
        let b = verify_on_a_node(&render(&catalog, 2, 5, issued), now);
        let entries = b.entries("docker.io/library/redis");
        assert_eq!(entries.len(), 3, "one entry per provenance");

        // checkout denies GPL-2.0-only and allows at most medium (payments): 7.2 passes on its own.
        assert_eq!(
            reason(&b, "redis:7.2", Some("checkout"), now),
            ReasonCode::Approved
        );
        assert_eq!(
            reason(&b, "redis:7.0", Some("checkout"), now),
            ReasonCode::SeverityExceeded
        );
        // One scanner is one scanner, whatever the other tags had.
        assert_eq!(
            reason(&b, "redis:6.2", None, now),
            ReasonCode::InsufficientScans
        );
        assert_eq!(reason(&b, "redis:7.0", None, now), ReasonCode::Approved);
        assert_eq!(
            reason(&b, "redis:7.2", Some("search-index"), now),
            ReasonCode::Approved
        );
    }
}
