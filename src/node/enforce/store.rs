//! The installed bundle on disk: verified installs written atomically into the state directory, and
//! the last-known-good bundle read back at start.
//!
//! Layout of `state_dir`:
//!
//! ```text
//! bundles/<version>/bundle.json        the exact signed bytes
//! bundles/<version>/bundle.json.sig    the detached signatures
//! current -> bundles/<version>         symlink, replaced by rename(2): the commit point of an install
//! ```
//!
//! An install verifies signatures, times and that the version is greater than the installed one
//! *before* anything is written; a half-written install is never `current`. The three most recent
//! versions are kept so an operator can see what was in force before.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use time::OffsetDateTime;

use crate::policy::bundle::verify_bundle_reader;
use crate::policy::{
    BundleError, SignatureFile, Trust, TrustError, VerifiedBundle, parse_bundle, verify_bundle,
};

const KEEP_VERSIONS: usize = 3;

/// Why a bundle could not be installed or loaded.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("signature file {}: {source}", path.display())]
    Signatures {
        path: PathBuf,
        #[source]
        source: TrustError,
    },
    #[error("bundle {}: {source}", path.display())]
    Rejected {
        path: PathBuf,
        #[source]
        source: BundleError,
    },
}

impl StoreError {
    /// A short stable reason for metrics (`bad_signature`, `rollback`, `expired`, `io`, …).
    pub fn reason(&self) -> &'static str {
        match self {
            StoreError::Io { .. } => "io",
            StoreError::Signatures { .. } => "malformed_signatures",
            StoreError::Rejected { source, .. } => source.code(),
        }
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The installed bundle file, read back.
struct Installed {
    bytes: Vec<u8>,
    path: PathBuf,
}

/// The bundle store in a state directory.
#[derive(Debug, Clone)]
pub struct BundleStore {
    dir: PathBuf,
    /// Largest bundle file read or installed (`policy.max_bundle_size`).
    max_bundle_size: u64,
}

impl BundleStore {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        BundleStore {
            dir: state_dir.into(),
            max_bundle_size: crate::policy::DEFAULT_MAX_BUNDLE_SIZE,
        }
    }

    /// The same store with another bundle size limit.
    pub fn with_max_bundle_size(mut self, max: u64) -> Self {
        self.max_bundle_size = max;
        self
    }

    pub fn max_bundle_size(&self) -> u64 {
        self.max_bundle_size
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn current_link(&self) -> PathBuf {
        self.dir.join("current")
    }

    /// Path of the installed bundle file, if one is installed.
    pub fn current_bundle_path(&self) -> Option<PathBuf> {
        let p = self.current_link().join("bundle.json");
        p.exists().then_some(p)
    }

    fn read_current(&self) -> Result<Option<Installed>, StoreError> {
        let Some(path) = self.current_bundle_path() else {
            return Ok(None);
        };
        let mut file =
            std::fs::File::open(&path).map_err(io("cannot read installed bundle", &path))?;
        let bytes = crate::policy::load::read_at_most(&mut file, self.max_bundle_size)
            .map_err(io("cannot read installed bundle", &path))?
            .ok_or_else(|| StoreError::Rejected {
                path: path.clone(),
                source: BundleError::TooLarge {
                    max: self.max_bundle_size,
                },
            })?;
        Ok(Some(Installed { bytes, path }))
    }

    /// Version of the installed bundle, for rollback checks: the name of the directory `current`
    /// points at (written by [`BundleStore::install`]), or the bundle's own `version` if that is
    /// unreadable.
    pub fn installed_version(&self) -> Result<Option<u64>, StoreError> {
        let current = match std::fs::read_link(self.current_link())
            .ok()
            .and_then(|t| t.file_name()?.to_str()?.parse().ok())
        {
            Some(v) => Some(v),
            None => match self.read_current()? {
                None => None,
                Some(Installed { bytes, path }) => Some(
                    parse_bundle(&bytes)
                        .map_err(|source| StoreError::Rejected { path, source })?
                        .version,
                ),
            },
        };
        // The highest version ever installed here: deleting `current` does not reopen the door to
        // older (still validly signed) bundles.
        let highest = std::fs::read_to_string(self.dir.join("highest_version"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        Ok(current.max(highest))
    }

    /// Loads the installed (last-known-good) bundle, re-verifying its signatures against `trust`
    /// before parsing it. The file is streamed (hashed, then parsed while hashed again), so it is
    /// never held in memory whole.
    ///
    /// It was fresh when installed; an expired one is still returned (the caller decides how long to
    /// keep enforcing with it): it is then verified as of the last second of its validity.
    pub fn load_current(
        &self,
        trust: &Trust,
        now: OffsetDateTime,
    ) -> Result<Option<VerifiedBundle>, StoreError> {
        let Some(path) = self.current_bundle_path() else {
            return Ok(None);
        };
        let sig_path = crate::policy::load::signature_path(&path);
        let sig_bytes =
            std::fs::read(&sig_path).map_err(io("cannot read installed signatures", &sig_path))?;
        let sigs = SignatureFile::parse(&sig_bytes).map_err(|source| StoreError::Signatures {
            path: sig_path,
            source,
        })?;
        let verify_at = |at: OffsetDateTime| {
            let file =
                std::fs::File::open(&path).map_err(io("cannot read installed bundle", &path))?;
            verify_bundle_reader(file, &sigs, trust, None, at, self.max_bundle_size)
                .map_err(io("cannot read installed bundle", &path))?
                .map_err(|source| StoreError::Rejected {
                    path: path.clone(),
                    source,
                })
        };
        match verify_at(now) {
            Err(StoreError::Rejected {
                source: BundleError::Expired { expires_at, .. },
                ..
            }) => {
                let expired = OffsetDateTime::parse(
                    &expires_at,
                    &time::format_description::well_known::Rfc3339,
                )
                .map_err(|e| StoreError::Io {
                    what: "cannot read the expiry of installed bundle",
                    path: path.clone(),
                    source: std::io::Error::other(e),
                })?;
                verify_at(expired - time::Duration::seconds(1)).map(Some)
            }
            other => other.map(Some),
        }
    }

    /// Verifies `bundle` + `signatures` exactly as [`BundleStore::install`] does (at most the size
    /// limit, k-of-n signed before it is parsed, newer than the installed one, fresh, within the
    /// trust file's limits), without installing it.
    pub fn verify_new(
        &self,
        bundle: &[u8],
        signatures: &[u8],
        trust: &Trust,
        now: OffsetDateTime,
        origin: &Path,
    ) -> Result<VerifiedBundle, StoreError> {
        if bundle.len() as u64 > self.max_bundle_size {
            return Err(StoreError::Rejected {
                path: origin.to_path_buf(),
                source: BundleError::TooLarge {
                    max: self.max_bundle_size,
                },
            });
        }
        let sigs = SignatureFile::parse(signatures).map_err(|source| StoreError::Signatures {
            path: crate::policy::load::signature_path(origin),
            source,
        })?;
        let installed = self.installed_version()?;
        verify_bundle(bundle, &sigs, trust, installed, now).map_err(|source| StoreError::Rejected {
            path: origin.to_path_buf(),
            source,
        })
    }

    /// Verifies `bundle` + `signatures` (newer than the installed one, fresh, k-of-n signed) and
    /// makes it the installed bundle atomically. Nothing on disk changes if it is rejected.
    pub fn install(
        &self,
        bundle: &[u8],
        signatures: &[u8],
        trust: &Trust,
        now: OffsetDateTime,
        origin: &Path,
    ) -> Result<VerifiedBundle, StoreError> {
        let verified = self.verify_new(bundle, signatures, trust, now, origin)?;
        let bundles = self.dir.join("bundles");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&bundles)
            .map_err(io("cannot create", &bundles))?;
        let version = verified.version;
        let tmp = bundles.join(format!(".{version}.tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(io("cannot create", &tmp))?;
        write_synced(&tmp.join("bundle.json"), bundle)?;
        write_synced(&tmp.join("bundle.json.sig"), signatures)?;
        let final_dir = bundles.join(version.to_string());
        let _ = std::fs::remove_dir_all(&final_dir);
        std::fs::rename(&tmp, &final_dir).map_err(io("cannot move into place", &final_dir))?;
        // Commit: point `current` at the new version with one rename.
        let link_tmp = self
            .dir
            .join(format!(".current.tmp-{}", std::process::id()));
        let _ = std::fs::remove_file(&link_tmp);
        std::os::unix::fs::symlink(Path::new("bundles").join(version.to_string()), &link_tmp)
            .map_err(io("cannot create symlink", &link_tmp))?;
        std::fs::rename(&link_tmp, self.current_link())
            .map_err(io("cannot replace", &self.current_link()))?;
        let mark = self
            .dir
            .join(format!(".highest_version.tmp-{}", std::process::id()));
        let _ = std::fs::remove_file(&mark);
        write_synced(&mark, format!("{version}\n").as_bytes())?;
        std::fs::rename(&mark, self.dir.join("highest_version"))
            .map_err(io("cannot record the version in", &self.dir))?;
        sync_dir(&self.dir);
        self.prune(version);
        Ok(verified)
    }

    /// Removes all but the newest few installed versions.
    fn prune(&self, current: u64) {
        let Ok(entries) = std::fs::read_dir(self.dir.join("bundles")) else {
            return;
        };
        let mut versions: Vec<u64> = entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|v| *v != current)
            .collect();
        versions.sort_unstable_by(|a, b| b.cmp(a));
        for v in versions.into_iter().skip(KEEP_VERSIONS - 1) {
            let _ = std::fs::remove_dir_all(self.dir.join("bundles").join(v.to_string()));
        }
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io("cannot create", path))?;
    f.write_all(bytes).map_err(io("cannot write", path))?;
    f.sync_all().map_err(io("cannot sync", path))
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testutil::*;

    #[test]
    fn oversize_bundles_are_refused_before_anything_is_written_or_parsed() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = EXAMPLE.as_bytes();
        let sigs = sign(bytes, &[1, 2]).to_json();
        let len = bytes.len() as u64;
        let install = |store: &BundleStore| {
            store.install(
                bytes,
                sigs.as_bytes(),
                &trust_2_of_3(),
                example_now(),
                Path::new("/incoming/v42.json"),
            )
        };
        let store = BundleStore::new(dir.path()).with_max_bundle_size(len - 1);
        let e = install(&store).unwrap_err();
        assert_eq!(e.reason(), "too_large", "{e}");
        assert!(e.to_string().contains("policy.max_bundle_size"), "{e}");
        assert!(store.current_bundle_path().is_none());
        assert!(!dir.path().join("bundles").exists(), "nothing written");
        // At the limit it installs and loads back.
        let store = store.with_max_bundle_size(len);
        install(&store).unwrap();
        let loaded = store.load_current(&trust_2_of_3(), example_now()).unwrap();
        assert_eq!(loaded.unwrap().version, 42);
        // With a lower limit the installed file is refused unread.
        let smaller = BundleStore::new(dir.path()).with_max_bundle_size(100);
        let e = smaller
            .load_current(&trust_2_of_3(), example_now())
            .unwrap_err();
        assert_eq!(e.reason(), "too_large", "{e}");
    }

    #[test]
    fn an_installed_bundle_whose_signatures_fail_is_refused_before_parsing() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = EXAMPLE.as_bytes();
        let sigs = sign(bytes, &[1, 2]).to_json();
        let store = BundleStore::new(dir.path());
        store
            .install(
                bytes,
                sigs.as_bytes(),
                &trust_2_of_3(),
                example_now(),
                Path::new("/incoming/v42.json"),
            )
            .unwrap();
        // Replaced on disk by something that is not even JSON: the signature check refuses it (a
        // parse would have said "malformed").
        std::fs::write(store.current_bundle_path().unwrap(), b"{{{{ not json").unwrap();
        let e = store
            .load_current(&trust_2_of_3(), example_now())
            .unwrap_err();
        assert_eq!(e.reason(), "bad_signature", "{e}");
    }
}
