//! The installed bundle on disk: verified installs written atomically into the state directory, and
//! the last-known-good bundle read back at start.
//!
//! Layout of `state_dir`:
//!
//! ```text
//! bundles/<version>/bundle.json        the exact signed bytes
//! bundles/<version>/bundle.json.sig    the detached signatures
//! bundles/<version>/bundle.idx         the bundle compiled for this pullgate build (see below)
//! current -> bundles/<version>         symlink, replaced by rename(2): the commit point of an install
//! ```
//!
//! An install verifies signatures, times and that the version is greater than the installed one
//! *before* anything is written; a half-written install is never `current`. The three most recent
//! versions are kept so an operator can see what was in force before.
//!
//! The compiled form ([`crate::policy::bundle::compiled`]) is what a start reads instead of the JSON:
//! the bundle already parsed, validated and indexed, bound to the signed JSON by the SHA-512 its
//! signatures cover. At every start the signatures, expiry and the trust file's limits are checked
//! against the trust file in force; only the JSON's hashing and parsing are saved. The state directory
//! is trusted to hold what pullgate compiled, as the trust file is trusted: only root writes either.
//! Any doubt about the compiled form (missing, damaged, written by another pullgate version, made from
//! `bundle.json` before a change to its length or modification time, or not verifying) sends the load
//! to the JSON, and the daemon then writes the compiled form again.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use time::OffsetDateTime;

use crate::policy::bundle::{compiled, verify_bundle_reader, verify_compiled};
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

    /// Loads the installed (last-known-good) bundle, re-verifying its signatures against `trust`:
    /// from its compiled form when that is usable, from the JSON otherwise (signatures checked
    /// before it is parsed; the file is streamed, hashed and then parsed while hashed again, so it is
    /// never held in memory whole). Writes nothing (see [`BundleStore::load_current_compiling`]).
    ///
    /// It was fresh when installed; an expired one is still returned (the caller decides how long to
    /// keep enforcing with it): it is then verified as of the last second of its validity.
    pub fn load_current(
        &self,
        trust: &Trust,
        now: OffsetDateTime,
    ) -> Result<Option<VerifiedBundle>, StoreError> {
        self.load(trust, now, false)
    }

    /// [`BundleStore::load_current`], and when the bundle had to be read from its JSON, writes its
    /// compiled form so the next start is fast (the daemon's load; a failure to write is logged).
    pub fn load_current_compiling(
        &self,
        trust: &Trust,
        now: OffsetDateTime,
    ) -> Result<Option<VerifiedBundle>, StoreError> {
        self.load(trust, now, true)
    }

    fn load(
        &self,
        trust: &Trust,
        now: OffsetDateTime,
        compile: bool,
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
        // Before the JSON is read: a change made while it is read shows at the next start.
        let json = std::fs::metadata(&path).map_err(io("cannot read installed bundle", &path))?;
        let modified = modified_nanos(&json);
        match self.load_compiled(&path, &json, &sigs, trust, now) {
            Ok(b) => return Ok(Some(b)),
            Err(why) => {
                tracing::info!(bundle = %path.display(), "reading the signed bundle: its compiled form {why}")
            }
        }
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
                verify_at(expired - time::Duration::seconds(1))
            }
            other => other,
        }
        .inspect(|b| {
            if compile {
                if let Err(e) = write_compiled(&path, b, modified) {
                    tracing::warn!(error = %e, "cannot write the compiled form of the installed bundle; the next start reads the JSON again");
                }
            }
        })
        .map(Some)
    }

    /// The installed bundle from its compiled form (`bundle.idx` beside `bundle_path`, whose JSON's
    /// metadata is `json`), verified like the JSON would be; `Err` says why it is not usable (the
    /// JSON is then read instead).
    fn load_compiled(
        &self,
        bundle_path: &Path,
        json: &std::fs::Metadata,
        sigs: &SignatureFile,
        trust: &Trust,
        now: OffsetDateTime,
    ) -> Result<VerifiedBundle, String> {
        if json.len() > self.max_bundle_size {
            return Err("belongs to a bundle larger than policy.max_bundle_size".into());
        }
        let path = compiled_path(bundle_path);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err("is not there yet".into());
            }
            Err(e) => return Err(format!("cannot be opened: {e}")),
        };
        let size = file
            .metadata()
            .map_err(|e| format!("cannot be read: {e}"))?
            .len();
        if size > self.max_bundle_size {
            return Err("is larger than policy.max_bundle_size".into());
        }
        let compiled = compiled::read(std::io::Read::take(file, size), self.max_bundle_size)
            .map_err(|e| format!("is unusable: {e}"))?;
        if compiled.signed.len != json.len() || compiled.json_modified != modified_nanos(json) {
            return Err("was made from bundle.json as it was before a change".into());
        }
        // Expired: verified as of the last second of its validity, as the JSON would be.
        let expires_at = compiled.bundle.expires_at;
        let at = if now >= expires_at {
            expires_at - time::Duration::seconds(1)
        } else {
            now
        };
        verify_compiled(compiled, sigs, trust, None, at)
            .map_err(|e| format!("does not verify ({e})"))
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
        let json = tmp.join("bundle.json");
        write_synced(&json, bundle)?;
        write_synced(&tmp.join("bundle.json.sig"), signatures)?;
        let modified = std::fs::metadata(&json)
            .map(|m| modified_nanos(&m))
            .map_err(io("cannot read", &json))?;
        write_synced(
            &compiled_path(&json),
            &compiled::compile(&verified, verified.signed(), modified),
        )?;
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

/// The compiled form of the bundle at `bundle_path`: `bundle.idx` beside it.
fn compiled_path(bundle_path: &Path) -> PathBuf {
    bundle_path.with_file_name("bundle.idx")
}

/// A file's modification time, nanoseconds since the Unix epoch.
fn modified_nanos(meta: &std::fs::Metadata) -> i128 {
    use std::os::unix::fs::MetadataExt;
    i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec())
}

/// Writes the compiled form of `bundle` (read from `bundle_path`, last modified at `modified`)
/// beside it, replacing any.
fn write_compiled(
    bundle_path: &Path,
    bundle: &VerifiedBundle,
    modified: i128,
) -> Result<(), StoreError> {
    let path = compiled_path(bundle_path);
    let tmp = path.with_file_name(format!(".bundle.idx.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    write_synced(&tmp, &compiled::compile(bundle, bundle.signed(), modified))?;
    std::fs::rename(&tmp, &path).map_err(io("cannot move into place", &path))
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
    use crate::policy::Bundle;
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

    fn installed(dir: &Path, bytes: &[u8]) -> BundleStore {
        let store = BundleStore::new(dir);
        store
            .install(
                bytes,
                sign(bytes, &[1, 2]).to_json().as_bytes(),
                &trust_2_of_3(),
                example_now(),
                Path::new("/incoming/bundle.json"),
            )
            .unwrap();
        store
    }

    fn compiled_of(store: &BundleStore) -> PathBuf {
        compiled_path(&store.current_bundle_path().unwrap())
    }

    #[test]
    fn a_start_reads_the_compiled_form_and_checks_its_signatures_against_the_trust_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = installed(dir.path(), EXAMPLE.as_bytes());
        let json = store.current_bundle_path().unwrap();
        assert!(
            compiled_of(&store).exists(),
            "an install writes the compiled form"
        );
        // What a start returns comes from the compiled form: here one made (as no install would)
        // with another issuer, bound to the real JSON.
        let real = example_bundle();
        let mut marked: Bundle = (*real).clone();
        marked.issuer = "from the compiled form".into();
        let modified = modified_nanos(&std::fs::metadata(&json).unwrap());
        std::fs::write(
            compiled_of(&store),
            compiled::compile(&marked, real.signed(), modified),
        )
        .unwrap();
        let loaded = store.load_current(&trust_2_of_3(), example_now()).unwrap();
        assert_eq!(loaded.unwrap().issuer, "from the compiled form");
        // The signatures are checked at every start: a trust file that no longer trusts the
        // signers refuses the bundle (from the JSON, which the compiled form then defers to).
        let one_of_them = Trust::new(trust_2_of_3().keys()[2..].to_vec(), 1).unwrap();
        let e = store.load_current(&one_of_them, example_now()).unwrap_err();
        assert_eq!(e.reason(), "not_enough_signatures", "{e}");
        // A bundle.json changed since (here the same length of other bytes) sends the load to the
        // JSON, which refuses it.
        std::fs::write(&json, vec![b' '; EXAMPLE.len()]).unwrap();
        // (Within one clock tick of the install the time could be the same: not here.)
        std::fs::File::options()
            .write(true)
            .open(&json)
            .unwrap()
            .set_modified(std::time::SystemTime::UNIX_EPOCH)
            .unwrap();
        let e = store
            .load_current(&trust_2_of_3(), example_now())
            .unwrap_err();
        assert_eq!(e.reason(), "bad_signature", "{e}");
    }

    #[test]
    fn a_compiled_form_in_doubt_sends_the_start_to_the_json_and_is_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = installed(dir.path(), EXAMPLE.as_bytes());
        let idx = compiled_of(&store);
        let good = std::fs::read(&idx).unwrap();
        let load = |compiling: bool| {
            let b = if compiling {
                store.load_current_compiling(&trust_2_of_3(), example_now())
            } else {
                store.load_current(&trust_2_of_3(), example_now())
            };
            b.unwrap().unwrap()
        };
        let mut damaged = good.clone();
        *damaged.last_mut().unwrap() ^= 1;
        for (what, bytes) in [("damaged", damaged), ("cut", good[..100].to_vec())] {
            std::fs::write(&idx, &bytes).unwrap();
            assert!(*load(false) == *example_bundle(), "{what}");
            assert_eq!(
                std::fs::read(&idx).unwrap(),
                bytes,
                "{what}: the CLI's load writes nothing"
            );
            assert!(*load(true) == *example_bundle(), "{what}");
            assert_eq!(std::fs::read(&idx).unwrap(), good, "{what}: written again");
        }
        std::fs::remove_file(&idx).unwrap();
        load(true);
        assert_eq!(std::fs::read(&idx).unwrap(), good, "written when missing");

        // The compiled form of another bundle (here version 43's beside version 42's JSON) is not
        // taken for it, even when its signatures verify.
        let other = tempfile::tempdir().unwrap();
        let v43 = EXAMPLE.replace("\"version\": 42", "\"version\": 43");
        assert_ne!(v43, EXAMPLE);
        let newer = installed(other.path(), v43.as_bytes());
        std::fs::copy(compiled_of(&newer), &idx).unwrap();
        assert_eq!(load(false).version, 42);
    }

    #[test]
    fn an_expired_bundle_loads_from_its_compiled_form_as_from_its_json() {
        let dir = tempfile::tempdir().unwrap();
        let store = installed(dir.path(), EXAMPLE.as_bytes());
        let later = example_bundle().expires_at + time::Duration::days(3);
        let compiled = store.load_current(&trust_2_of_3(), later).unwrap().unwrap();
        std::fs::remove_file(compiled_of(&store)).unwrap();
        let json = store.load_current(&trust_2_of_3(), later).unwrap().unwrap();
        assert!(*compiled == *json);
        assert_eq!(compiled.signers(), json.signers());
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
