//! The file-reading side of the policy: bundle, signature, trust and key files.
//!
//! This is the only policy module that does I/O; it reads bytes and hands them to the pure functions
//! ([`super::verify_bundle`], [`super::bundle::verify_bundle_reader`], [`super::Trust::from_toml`], …). The decision path never calls it.
//! A bundle's signatures live next to it in `BUNDLE.sig` unless a path is given.

use std::path::{Path, PathBuf};

use time::OffsetDateTime;

use super::bundle::{BundleError, DEFAULT_MAX_BUNDLE_SIZE, VerifiedBundle, verify_bundle_reader};
use super::trust::{SignatureFile, Trust, TrustError};

/// A file could not be read or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Reading failed.
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The trust, key or signature file is invalid.
    #[error("{}: {source}", path.display())]
    Trust {
        path: PathBuf,
        #[source]
        source: TrustError,
    },
    /// The bundle was rejected.
    #[error("{}: {source}", path.display())]
    Bundle {
        path: PathBuf,
        #[source]
        source: BundleError,
    },
}

/// The default signature file of a bundle: `BUNDLE.sig`.
pub fn signature_path(bundle: &Path) -> PathBuf {
    let mut s = bundle.as_os_str().to_owned();
    s.push(".sig");
    PathBuf::from(s)
}

/// Reads a whole file.
pub fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, LoadError> {
    std::fs::read(path).map_err(|source| LoadError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Reads all of an open file if it holds at most `max` bytes; `Ok(None)` (after reading at most
/// `max + 1` bytes, and none if its size already says so) if it holds more.
pub fn read_at_most(file: &mut std::fs::File, max: u64) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let len = file.metadata()?.len();
    if len > max {
        return Ok(None);
    }
    let mut buf = Vec::with_capacity(len as usize);
    file.take(max.saturating_add(1)).read_to_end(&mut buf)?;
    Ok((buf.len() as u64 <= max).then_some(buf))
}

/// Reads a bundle file of at most `max` bytes whole (for `bundle install`); a larger one is
/// [`BundleError::TooLarge`] and is not read.
pub fn read_bundle(path: &Path, max: u64) -> Result<Vec<u8>, LoadError> {
    let read_error = |source| LoadError::Read {
        what: "bundle",
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read_error)?;
    read_at_most(&mut file, max)
        .map_err(read_error)?
        .ok_or_else(|| LoadError::Bundle {
            path: path.to_owned(),
            source: BundleError::TooLarge { max },
        })
}

/// Reads and parses a trust file.
pub fn read_trust(path: &Path) -> Result<Trust, LoadError> {
    let bytes = read("trust file", path)?;
    let text = String::from_utf8_lossy(&bytes);
    Trust::from_toml(&text).map_err(|source| LoadError::Trust {
        path: path.to_owned(),
        source,
    })
}

/// Reads a signature file; a missing file is an empty set of signatures (verification then says so).
pub fn read_signatures(path: &Path) -> Result<SignatureFile, LoadError> {
    match std::fs::read(path) {
        Ok(bytes) => SignatureFile::parse(&bytes).map_err(|source| LoadError::Trust {
            path: path.to_owned(),
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(SignatureFile::new()),
        Err(source) => Err(LoadError::Read {
            what: "signature file",
            path: path.to_owned(),
            source,
        }),
    }
}

/// Reads a bundle of at most [`DEFAULT_MAX_BUNDLE_SIZE`] bytes and its signatures (`signatures` or
/// `BUNDLE.sig`) and verifies them against `trust`, signatures before content
/// ([`verify_bundle_reader`]).
pub fn load_bundle(
    bundle: &Path,
    signatures: Option<&Path>,
    trust: &Trust,
    installed_version: Option<u64>,
    now: OffsetDateTime,
) -> Result<VerifiedBundle, LoadError> {
    let read_error = |source| LoadError::Read {
        what: "bundle",
        path: bundle.to_owned(),
        source,
    };
    // The bundle is streamed (hashed, then parsed while hashed again) rather than read whole, so a
    // large bundle is never in memory twice (file bytes and index).
    let file = std::fs::File::open(bundle).map_err(read_error)?;
    let sig_path = signatures
        .map(Path::to_owned)
        .unwrap_or_else(|| signature_path(bundle));
    let sigs = read_signatures(&sig_path)?;
    verify_bundle_reader(
        file,
        &sigs,
        trust,
        installed_version,
        now,
        DEFAULT_MAX_BUNDLE_SIZE,
    )
    .map_err(read_error)?
    .map_err(|source| LoadError::Bundle {
        path: bundle.to_owned(),
        source,
    })
}
