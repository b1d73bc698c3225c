//! Scanner reports in their native JSON formats, and what `approve` needs from them: which scanner and
//! version wrote it, when, which image it is about, and its findings.
//!
//! - **Trivy** (`trivy image --format json`, `SchemaVersion` 2): scanner version from `Trivy.Version`,
//!   time from `CreatedAt`, the image from `Metadata.RepoDigests` (`repo@sha256:…`, manifest or index
//!   digests) and `Metadata.ImageID` (the config digest), findings from
//!   `Results[].Vulnerabilities[]` (`VulnerabilityID`, `PkgName`, `Severity`).
//! - **Grype** (`grype -o json`): scanner from `descriptor.name`/`version`, time from
//!   `descriptor.timestamp`, the image from `source.target.manifestDigest`, `repoDigests` and `imageID`
//!   (`source.type` must be `image`), findings from `matches[]` (`vulnerability.id`,
//!   `vulnerability.severity`, `artifact.name`). Grype's `Negligible` counts as `low`.
//!
//! A report is *bound* to an image when it names one of its digests: the manifest (or index) digest or
//! the config digest; for an index, a report that names a platform's manifest or config covers that
//! platform. Anything else is a report about another image and is refused.
//!
//! Both scanners need a vulnerability database from the internet; pullgate never runs them, it reads
//! the reports the administrators' pipeline produced.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::policy::{Digest, Severity};

/// Why a report file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The file cannot be read.
    #[error("cannot read the scanner report {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not a report pullgate knows.
    #[error(
        "{}: {why}; give the JSON of `trivy image --format json` (SchemaVersion 2) or `grype -o json`",
        path.display()
    )]
    Format { path: PathBuf, why: String },
}

/// Which scanner wrote a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scanner {
    /// Aqua Trivy.
    Trivy,
    /// Anchore Grype.
    Grype,
}

impl Scanner {
    /// The name recorded in provenance.
    pub fn name(self) -> &'static str {
        match self {
            Scanner::Trivy => "trivy",
            Scanner::Grype => "grype",
        }
    }
}

/// One vulnerability finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// CVE / GHSA / … id.
    pub id: String,
    /// The package it was found in.
    pub package: String,
    /// Its severity.
    pub severity: Severity,
}

/// A parsed scanner report.
#[derive(Debug, Clone)]
pub struct Report {
    /// The file it was read from.
    pub path: PathBuf,
    /// SHA-256 of the file's bytes (recorded in provenance).
    pub sha256: Digest,
    /// Which scanner.
    pub scanner: Scanner,
    /// Its version, as the report gives it (`unknown` if it does not).
    pub version: String,
    /// When the scan ran, if the report says.
    pub created_at: Option<OffsetDateTime>,
    /// Manifest or index digests the report names.
    pub manifest_digests: BTreeSet<Digest>,
    /// The config digest (image ID) the report names.
    pub image_id: Option<Digest>,
    /// Findings.
    pub findings: Vec<Finding>,
}

impl Report {
    /// Reads and parses a report file.
    pub fn read(path: &Path) -> Result<Report, ReportError> {
        let bytes = std::fs::read(path).map_err(|source| ReportError::Read {
            path: path.to_owned(),
            source,
        })?;
        Report::parse(path, &bytes)
    }

    /// Parses report bytes (Trivy or Grype, recognised by their shape).
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Report, ReportError> {
        let format = |why: String| ReportError::Format {
            path: path.to_owned(),
            why,
        };
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| format(format!("not JSON: {e}")))?;
        let sha256 = Digest::sha256_of(bytes);
        let obj = value
            .as_object()
            .ok_or_else(|| format("not a JSON object".into()))?;
        if obj.contains_key("SchemaVersion") {
            let r: TrivyReport = serde_json::from_value(value)
                .map_err(|e| format(format!("not a Trivy report: {e}")))?;
            if r.schema_version != 2 {
                return Err(format(format!(
                    "Trivy SchemaVersion {} is not supported (only 2)",
                    r.schema_version
                )));
            }
            let meta = r.metadata.unwrap_or_default();
            let mut findings = Vec::new();
            for res in r.results.unwrap_or_default() {
                for v in res.vulnerabilities.unwrap_or_default() {
                    findings.push(Finding {
                        severity: severity(&v.severity).map_err(format)?,
                        id: v.vulnerability_id,
                        package: v.pkg_name,
                    });
                }
            }
            Ok(Report {
                path: path.to_owned(),
                sha256,
                scanner: Scanner::Trivy,
                version: r
                    .trivy
                    .map(|t| t.version)
                    .filter(|v| !v.is_empty())
                    .unwrap_or_else(|| "unknown".into()),
                created_at: r
                    .created_at
                    .as_deref()
                    .map(time_of)
                    .transpose()
                    .map_err(format)?,
                manifest_digests: meta
                    .repo_digests
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|d| repo_digest(d))
                    .collect(),
                image_id: meta.image_id.as_deref().and_then(|d| Digest::parse(d).ok()),
                findings,
            })
        } else if obj.contains_key("matches") && obj.contains_key("descriptor") {
            let r: GrypeReport = serde_json::from_value(value)
                .map_err(|e| format(format!("not a Grype report: {e}")))?;
            if !r.descriptor.name.eq_ignore_ascii_case("grype") {
                return Err(format(format!(
                    "descriptor.name is \"{}\", not grype",
                    r.descriptor.name
                )));
            }
            let src = r.source.filter(|s| s.kind == "image").ok_or_else(|| {
                format(
                    "source.type is not \"image\": the report is not about a container image"
                        .into(),
                )
            })?;
            let target: GrypeImage = serde_json::from_value(src.target)
                .map_err(|e| format(format!("source.target is not an image: {e}")))?;
            let mut manifest_digests: BTreeSet<Digest> = target
                .repo_digests
                .unwrap_or_default()
                .iter()
                .filter_map(|d| repo_digest(d))
                .collect();
            if let Some(d) = target
                .manifest_digest
                .as_deref()
                .and_then(|d| Digest::parse(d).ok())
            {
                manifest_digests.insert(d);
            }
            let mut findings = Vec::new();
            for m in r.matches {
                findings.push(Finding {
                    severity: severity(&m.vulnerability.severity).map_err(format)?,
                    id: m.vulnerability.id,
                    package: m.artifact.name,
                });
            }
            Ok(Report {
                path: path.to_owned(),
                sha256,
                scanner: Scanner::Grype,
                version: Some(r.descriptor.version)
                    .filter(|v| !v.is_empty())
                    .unwrap_or_else(|| "unknown".into()),
                created_at: Some(r.descriptor.timestamp)
                    .filter(|t| !t.is_empty())
                    .as_deref()
                    .map(time_of)
                    .transpose()
                    .map_err(format)?,
                manifest_digests,
                image_id: target
                    .image_id
                    .as_deref()
                    .and_then(|d| Digest::parse(d).ok()),
                findings,
            })
        } else {
            Err(format(
                "neither a Trivy report (SchemaVersion) nor a Grype report (matches, descriptor)"
                    .into(),
            ))
        }
    }

    /// Whether the report names `manifest` (a manifest or index digest) or `config` (its config digest).
    pub fn names(&self, manifest: &Digest, config: Option<&Digest>) -> bool {
        self.manifest_digests.contains(manifest)
            || config.is_some_and(|c| self.image_id.as_ref() == Some(c))
    }

    /// The worst severity of the findings `ignored` does not remove (`none` when nothing is left).
    pub fn worst_severity(&self, mut ignored: impl FnMut(&Finding) -> bool) -> Severity {
        self.findings
            .iter()
            .filter(|f| !ignored(f))
            .map(|f| f.severity)
            .max()
            .unwrap_or(Severity::None)
    }

    /// What the report names, for refusal messages.
    pub fn named(&self) -> String {
        let mut parts: Vec<String> = self
            .manifest_digests
            .iter()
            .map(|d| d.to_string())
            .collect();
        if let Some(i) = &self.image_id {
            parts.push(format!("image ID {i}"));
        }
        if parts.is_empty() {
            "no digest at all".into()
        } else {
            parts.join(", ")
        }
    }
}

fn severity(s: &str) -> Result<Severity, String> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "critical" => Severity::Critical,
        "high" => Severity::High,
        "medium" => Severity::Medium,
        "low" | "negligible" => Severity::Low,
        "unknown" | "" => Severity::Unknown,
        other => return Err(format!("unknown severity \"{other}\" in a finding")),
    })
}

fn time_of(s: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| format!("report time \"{s}\" is not RFC 3339: {e}"))
}

/// `repo@sha256:…` → the digest.
fn repo_digest(s: &str) -> Option<Digest> {
    Digest::parse(s.rsplit_once('@').map(|(_, d)| d).unwrap_or(s)).ok()
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TrivyReport {
    schema_version: u32,
    #[serde(default)]
    trivy: Option<TrivyInfo>,
    #[serde(default)]
    created_at: Option<String>,
    #[serde(default)]
    metadata: Option<TrivyMetadata>,
    #[serde(default)]
    results: Option<Vec<TrivyResult>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TrivyInfo {
    #[serde(default)]
    version: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct TrivyMetadata {
    #[serde(rename = "ImageID", default)]
    image_id: Option<String>,
    #[serde(default)]
    repo_digests: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TrivyResult {
    #[serde(default)]
    vulnerabilities: Option<Vec<TrivyVulnerability>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TrivyVulnerability {
    #[serde(rename = "VulnerabilityID")]
    vulnerability_id: String,
    #[serde(default)]
    pkg_name: String,
    #[serde(default)]
    severity: String,
}

#[derive(Deserialize)]
struct GrypeReport {
    matches: Vec<GrypeMatch>,
    #[serde(default)]
    source: Option<GrypeSource>,
    descriptor: GrypeDescriptor,
}

#[derive(Deserialize)]
struct GrypeDescriptor {
    name: String,
    #[serde(default)]
    version: String,
    #[serde(default)]
    timestamp: String,
}

#[derive(Deserialize)]
struct GrypeSource {
    #[serde(rename = "type")]
    kind: String,
    target: serde_json::Value,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GrypeImage {
    #[serde(rename = "imageID", default)]
    image_id: Option<String>,
    #[serde(default)]
    manifest_digest: Option<String>,
    #[serde(default)]
    repo_digests: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct GrypeMatch {
    vulnerability: GrypeVulnerability,
    artifact: GrypeArtifact,
}

#[derive(Deserialize)]
struct GrypeVulnerability {
    id: String,
    #[serde(default)]
    severity: String,
}

#[derive(Deserialize)]
struct GrypeArtifact {
    #[serde(default)]
    name: String,
}

/// Report fixtures in the scanners' documented JSON formats (for tests and benchmarks: the scanners
/// cannot run without their online databases).
pub mod fixture {
    use super::*;

    /// A Trivy `SchemaVersion` 2 report about `repo@manifest` (config `image_id`), made at `created`,
    /// with `findings` as (id, package, severity as Trivy writes it).
    pub fn trivy(
        version: &str,
        repo: &str,
        manifest: &Digest,
        image_id: Option<&Digest>,
        created: OffsetDateTime,
        findings: &[(&str, &str, &str)],
    ) -> String {
        let vulns: Vec<serde_json::Value> = findings
            .iter()
            .map(|(id, pkg, sev)| {
                serde_json::json!({
                    "VulnerabilityID": id, "PkgName": pkg, "InstalledVersion": "1.0.0-r0",
                    "FixedVersion": "1.0.1-r0", "Severity": sev, "Title": format!("{id} in {pkg}")
                })
            })
            .collect();
        serde_json::to_string_pretty(&serde_json::json!({
            "SchemaVersion": 2,
            "Trivy": {"Version": version},
            "CreatedAt": created.format(&Rfc3339).unwrap_or_default(),
            "ArtifactName": format!("{repo}@{manifest}"),
            "ArtifactType": "container_image",
            "Metadata": {
                "OS": {"Family": "alpine", "Name": "3.20.3"},
                "ImageID": image_id.map(|d| d.to_string()).unwrap_or_default(),
                "DiffIDs": [],
                "RepoTags": [],
                "RepoDigests": [format!("{repo}@{manifest}")],
                "ImageConfig": {"architecture": "amd64", "os": "linux"}
            },
            "Results": [{
                "Target": format!("{repo}@{manifest} (alpine 3.20.3)"),
                "Class": "os-pkgs",
                "Type": "alpine",
                "Vulnerabilities": vulns
            }]
        }))
        .unwrap_or_default()
    }

    /// A Grype report (`grype -o json`) about `repo@manifest`, made at `created`, with `findings` as
    /// (id, package, severity as Grype writes it).
    pub fn grype(
        version: &str,
        repo: &str,
        manifest: &Digest,
        image_id: Option<&Digest>,
        created: OffsetDateTime,
        findings: &[(&str, &str, &str)],
    ) -> String {
        let matches: Vec<serde_json::Value> = findings
            .iter()
            .map(|(id, pkg, sev)| {
                serde_json::json!({
                    "vulnerability": {"id": id, "dataSource": format!("https://nvd.example/{id}"),
                                      "namespace": "alpine:distro:alpine:3.20", "severity": sev,
                                      "fix": {"versions": ["1.0.1-r0"], "state": "fixed"}},
                    "relatedVulnerabilities": [],
                    "matchDetails": [],
                    "artifact": {"id": "0123456789abcdef", "name": pkg, "version": "1.0.0-r0", "type": "apk"}
                })
            })
            .collect();
        serde_json::to_string_pretty(&serde_json::json!({
            "matches": matches,
            "source": {
                "type": "image",
                "target": {
                    "userInput": format!("{repo}@{manifest}"),
                    "imageID": image_id.map(|d| d.to_string()).unwrap_or_default(),
                    "manifestDigest": manifest.to_string(),
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "tags": [],
                    "imageSize": 2_000_000,
                    "layers": [],
                    "repoDigests": [format!("{repo}@{manifest}")],
                    "architecture": "amd64",
                    "os": "linux"
                }
            },
            "distro": {"name": "alpine", "version": "3.20.3", "idLike": []},
            "descriptor": {
                "name": "grype",
                "version": version,
                "timestamp": created.format(&Rfc3339).unwrap_or_default()
            }
        }))
        .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> Digest {
        Digest::Sha256([n; 32])
    }

    fn now() -> OffsetDateTime {
        time::macros::datetime!(2026-03-01 12:00 UTC)
    }

    #[test]
    fn trivy_and_grype_are_read_and_bound() {
        let t = fixture::trivy(
            "0.58.1",
            "docker.io/library/nginx",
            &d(1),
            Some(&d(2)),
            now(),
            &[("CVE-1", "openssl", "HIGH"), ("CVE-2", "zlib", "LOW")],
        );
        let r = Report::parse(Path::new("t.json"), t.as_bytes()).unwrap();
        assert_eq!((r.scanner, r.version.as_str()), (Scanner::Trivy, "0.58.1"));
        assert_eq!(r.created_at, Some(now()));
        assert_eq!(r.sha256, Digest::sha256_of(t.as_bytes()));
        assert!(r.names(&d(1), None));
        assert!(
            r.names(&d(9), Some(&d(2))),
            "bound by its image ID (config digest)"
        );
        assert!(!r.names(&d(9), Some(&d(8))));
        assert_eq!(r.worst_severity(|_| false), Severity::High);
        assert_eq!(r.worst_severity(|f| f.id == "CVE-1"), Severity::Low);
        assert_eq!(r.worst_severity(|_| true), Severity::None);

        let g = fixture::grype(
            "0.86.0",
            "docker.io/library/nginx",
            &d(3),
            None,
            now(),
            &[
                ("GHSA-x", "busybox", "Negligible"),
                ("CVE-3", "musl", "Critical"),
            ],
        );
        let r = Report::parse(Path::new("g.json"), g.as_bytes()).unwrap();
        assert_eq!((r.scanner, r.version.as_str()), (Scanner::Grype, "0.86.0"));
        assert!(r.names(&d(3), None) && !r.names(&d(1), None));
        assert_eq!(r.worst_severity(|f| f.id == "CVE-3"), Severity::Low);
        assert_eq!(r.worst_severity(|_| false), Severity::Critical);
    }

    #[test]
    fn other_documents_are_refused_with_the_reason() {
        let cases = [
            ("[]", "not a JSON object"),
            ("{}", "neither a Trivy report"),
            (r#"{"SchemaVersion": 1}"#, "SchemaVersion 1"),
            (
                r#"{"matches": [], "descriptor": {"name": "syft"}}"#,
                "not grype",
            ),
            (
                r#"{"matches": [], "descriptor": {"name": "grype"}, "source": {"type": "directory", "target": "/x"}}"#,
                "not about a container image",
            ),
            (
                r#"{"SchemaVersion": 2, "Results": [{"Vulnerabilities": [{"VulnerabilityID": "C", "Severity": "SEVERE"}]}]}"#,
                "unknown severity",
            ),
            (
                r#"{"SchemaVersion": 2, "CreatedAt": "yesterday"}"#,
                "not RFC 3339",
            ),
        ];
        for (json, want) in cases {
            let e = Report::parse(Path::new("r.json"), json.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want) && e.contains("r.json"), "{json}: {e}");
        }
    }
}
