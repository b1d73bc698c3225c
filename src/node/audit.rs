//! The audit log: one JSON object per policy decision, appended and handed to the kernel before the
//! call is answered, with size-based rotation (`audit.log` → `audit.log.1` → … → `audit.log.N`).
//!
//! Records carry the image as asked, what was pulled, the decision and why — never credentials: the
//! record type has no field that could hold them.
//!
//! The lockdown watcher writes [`LockdownRecord`]s to the same log: they carry a `kind`
//! (`out_of_band_image`, `out_of_band_snapshot`, `event_gap`) where decision lines carry a `method`.
//! Bundles taken from the registry or the admin API are recorded as [`BundleRecord`]s (`kind`
//! `bundle_installed` or `bundle_rejected`).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

/// One decision, as written to the audit log.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditRecord {
    /// RFC 3339 UTC time of the decision.
    pub time: String,
    /// CRI method, e.g. `PullImage` or `CreateContainer`.
    pub method: String,
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    /// The image reference exactly as the client asked for it.
    pub image: String,
    /// The normalised reference, when the image parsed.
    pub normalized: Option<String>,
    /// The reference pullgate sent to containerd instead, when it rewrote the call.
    pub pulled: Option<String>,
    pub digest: Option<String>,
    /// `allow`, `deny` or `warn`.
    pub decision: String,
    /// Stable reason code (`approved_tag`, `not_in_bundle`, …).
    pub reason: String,
    /// The decision's explanation for people.
    pub message: String,
    pub scope: Option<String>,
    pub bundle_version: Option<u64>,
    /// Time pullgate spent deciding (and looking the image up), in microseconds.
    pub latency_us: u64,
}

/// Something the lockdown watcher saw in containerd, as written to the audit log. Only the fields
/// of its kind are written.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LockdownRecord {
    /// RFC 3339 UTC time it was seen.
    pub time: String,
    /// `out_of_band_image`, `out_of_band_snapshot` or `event_gap`.
    pub kind: &'static str,
    /// containerd namespace (`k8s.io` is CRI's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Image name, or committed snapshot name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The image's target digest (manifest or index), proven present in containerd's content store.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub digests: Vec<String>,
    /// `out_of_band` (not pulled through pullgate) or `unapproved` (digest not approved).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<&'static str>,
    /// Why, for people.
    pub message: String,
    /// How it was found: `event`, `startup` (present when the watcher started) or `resync` (after
    /// a gap in containerd's events).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detected: Option<&'static str>,
    /// What pullgate did: `reported`, `removed`, `kept_in_use`, `remove_failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshotter: Option<String>,
    /// The active snapshot a commit came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_key: Option<String>,
    /// An event gap: when the stream was lost and when it was back (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gap_from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gap_to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundle_version: Option<u64>,
}

/// A bundle installed or rejected by the registry sync or the admin API, as written to the audit log.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BundleRecord {
    /// RFC 3339 UTC time.
    pub time: String,
    /// `bundle_installed` or `bundle_rejected`.
    pub kind: &'static str,
    /// Where it came from: `registry.corp/pullgate/bundles:prod@sha256:…`, or `admin API`.
    pub source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Stable reason code of a rejection (`bad_signature`, `rollback`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub message: String,
}

/// Why the audit log could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open audit log {}: {source}", path.display())]
pub struct AuditOpenError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

struct Inner {
    file: File,
    size: u64,
}

/// An append-only JSON-lines file with rotation.
pub struct AuditLog {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    inner: Mutex<Inner>,
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

impl AuditLog {
    /// Opens (creating) the log at `path`; rotates when a line would take it past `max_bytes`,
    /// keeping `keep` rotated files.
    pub fn open(path: &Path, max_bytes: u64, keep: u32) -> Result<AuditLog, AuditOpenError> {
        let err = |source| AuditOpenError {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let file = open_append(path).map_err(err)?;
        let size = file.metadata().map_err(err)?.len();
        Ok(AuditLog {
            path: path.to_path_buf(),
            max_bytes: max_bytes.max(1024),
            keep: keep.max(1),
            inner: Mutex::new(Inner { file, size }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record as a single `write` of one line (so concurrent writers never interleave
    /// within a line), rotating first if needed.
    pub fn record(&self, rec: &AuditRecord) -> io::Result<()> {
        self.append(rec)
    }

    /// Appends a lockdown record, like [`AuditLog::record`].
    pub fn record_lockdown(&self, rec: &LockdownRecord) -> io::Result<()> {
        self.append(rec)
    }

    /// Appends a bundle record, like [`AuditLog::record`].
    pub fn record_bundle(&self, rec: &BundleRecord) -> io::Result<()> {
        self.append(rec)
    }

    fn append(&self, rec: &impl Serialize) -> io::Result<()> {
        // A decision's line is a few hundred bytes: one allocation, not one per doubling.
        let mut line = Vec::with_capacity(1024);
        serde_json::to_writer(&mut line, rec).map_err(io::Error::other)?;
        line.push(b'\n');
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.size > 0 && inner.size + line.len() as u64 > self.max_bytes {
            self.rotate(&mut inner)?;
        }
        inner.file.write_all(&line)?;
        inner.file.flush()?;
        inner.size += line.len() as u64;
        Ok(())
    }

    fn rotate(&self, inner: &mut Inner) -> io::Result<()> {
        let numbered = |n: u32| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{n}"));
            PathBuf::from(p)
        };
        let _ = std::fs::remove_file(numbered(self.keep));
        for n in (1..self.keep).rev() {
            let from = numbered(n);
            if from.exists() {
                std::fs::rename(&from, numbered(n + 1))?;
            }
        }
        std::fs::rename(&self.path, numbered(1))?;
        inner.file = open_append(&self.path)?;
        inner.size = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: usize) -> AuditRecord {
        AuditRecord {
            time: "2026-11-22T10:00:00Z".into(),
            method: "PullImage".into(),
            image: format!("busybox:{i}"),
            decision: "deny".into(),
            reason: "not_in_bundle".into(),
            ..Default::default()
        }
    }

    #[test]
    fn lockdown_records_share_the_log_and_are_told_apart_by_kind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path, 1 << 20, 2).unwrap();
        log.record(&rec(1)).unwrap();
        log.record_lockdown(&LockdownRecord {
            time: "2026-11-30T09:00:00Z".into(),
            kind: "out_of_band_image",
            namespace: Some("k8s.io".into()),
            name: Some("quay.io/evil/miner:1".into()),
            digests: vec!["sha256:aa".into()],
            class: Some("unapproved"),
            message: "m".into(),
            detected: Some("event"),
            action: Some("reported"),
            ..Default::default()
        })
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["method"], "PullImage");
        assert!(
            lines[0].get("kind").is_none(),
            "decision lines are unchanged"
        );
        assert_eq!(lines[1]["kind"], "out_of_band_image");
        assert_eq!(lines[1]["digests"][0], "sha256:aa");
        assert!(lines[1].get("method").is_none());
        assert!(
            lines[1].get("gap_from").is_none(),
            "only the fields of its kind"
        );
    }

    #[test]
    fn lines_are_json_and_rotate_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit/audit.log");
        let log = AuditLog::open(&path, 2048, 2).unwrap();
        for i in 0..40 {
            log.record(&rec(i)).unwrap();
        }
        let current = std::fs::read_to_string(&path).unwrap();
        let first = std::fs::read_to_string(path.with_extension("log.1")).unwrap();
        assert!(path.with_extension("log.2").exists());
        assert!(
            !path.with_extension("log.3").exists(),
            "keeps only 2 rotated files"
        );
        assert!(current.len() <= 2048 && first.len() <= 2048);
        let last: serde_json::Value =
            serde_json::from_str(current.lines().last().unwrap()).unwrap();
        assert_eq!(last["image"], "busybox:39");
        assert_eq!(last["decision"], "deny");
        for line in first.lines().chain(current.lines()) {
            serde_json::from_str::<serde_json::Value>(line).expect("every line is one JSON object");
        }
        // Reopening appends.
        drop(log);
        let log = AuditLog::open(&path, 1 << 20, 2).unwrap();
        log.record(&rec(99)).unwrap();
        let again = std::fs::read_to_string(&path).unwrap();
        assert!(again.starts_with(&current) && again.ends_with("\n"));
    }
}
