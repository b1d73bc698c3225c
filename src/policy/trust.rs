//! Keys, the trust file, detached signature files, and k-of-n signature verification.
//!
//! This module owns everything cryptographic about bundles; all functions are pure (bytes and strings in,
//! values out). File formats (see `docs/bundle.md`):
//!
//! - public key: one line `ed25519:<base64 of the 32-byte key>`;
//! - private key: one line `ed25519-private:<base64 of the 32-byte seed>` (written with mode 0600);
//! - trust file (TOML): `threshold = 2`, optional `max_exception_days` (default 30) and `min_scanners`
//!   (a floor for format 2 bundles' scan rule), and one `[[keys]]` table per administrator with `name`
//!   and `public_key` (the public key line);
//! - signature file (JSON, `BUNDLE.sig`): `{"format": 1, "signatures": [{"key_id": …, "signature": …}]}`.
//!
//! A key id is the first 8 bytes of SHA-256 of the public key, in hex. Each signature is a pure Ed25519
//! signature (RFC 8032) over the signing message [`signing_message`]: the domain-separation context
//! [`SIGNING_CONTEXT`] followed by the SHA-512 of the exact bundle bytes. Hashing once and signing the hash
//! keeps verification of k signatures over a large bundle to one pass over the bytes, and still commits to
//! every byte of the bundle.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

/// Domain-separation prefix of every signing message.
pub const SIGNING_CONTEXT: &[u8] = b"pullgate-bundle-signature-v1\0";
/// Signature file format understood by this version.
pub const SIGNATURE_FORMAT: u32 = 1;
/// Threshold used when the trust file does not give one: two administrators must sign.
pub const DEFAULT_THRESHOLD: usize = 2;
/// The longest an exception of a bundle may last after the bundle's `issued_at`, when the trust file
/// does not say (`max_exception_days`).
pub const DEFAULT_MAX_EXCEPTION_DAYS: u32 = 30;

const PUBLIC_PREFIX: &str = "ed25519:";
const PRIVATE_PREFIX: &str = "ed25519-private:";

/// A problem with a key, trust file or signature file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    /// A public key string is malformed.
    #[error(
        "public key \"{input}\" is invalid: {why}; expected \"ed25519:<base64 of 32 bytes>\" as written by `pullgate keygen`"
    )]
    PublicKey { input: String, why: &'static str },
    /// A private key file is malformed.
    #[error(
        "private key is invalid: {0}; expected one line \"ed25519-private:<base64 of 32 bytes>\" as written by `pullgate keygen`"
    )]
    PrivateKey(&'static str),
    /// The trust file is not valid TOML or has unknown or missing keys.
    #[error("trust file is malformed: {0}")]
    TrustSyntax(String),
    /// The trust file is well-formed but unusable.
    #[error("trust file is invalid: {0}")]
    TrustInvalid(String),
    /// The signature file is malformed.
    #[error("signature file is malformed: {0}; re-create it with `pullgate bundle sign`")]
    SignatureFile(String),
}

/// An Ed25519 public key with its id.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    key: VerifyingKey,
    id: String,
}

impl PublicKey {
    /// Parses `ed25519:<base64>`.
    pub fn parse(s: &str) -> Result<PublicKey, TrustError> {
        let s = s.trim();
        let err = |why| TrustError::PublicKey {
            input: s.chars().take(80).collect(),
            why,
        };
        let b64 = s
            .strip_prefix(PUBLIC_PREFIX)
            .ok_or_else(|| err("it does not start with \"ed25519:\""))?;
        let bytes = B64
            .decode(b64)
            .map_err(|_| err("the key is not valid base64"))?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|_| err("the key is not 32 bytes long"))?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| err("the bytes are not a valid Ed25519 point"))?;
        Ok(PublicKey::from_key(key))
    }

    fn from_key(key: VerifyingKey) -> PublicKey {
        let hash = sha2::Sha256::digest(key.as_bytes());
        PublicKey {
            key,
            id: hex::encode(&hash[..8]),
        }
    }

    /// The key id: hex of the first 8 bytes of SHA-256 of the key.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PUBLIC_PREFIX}{}", B64.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.id)
    }
}

/// An Ed25519 private key (never printed).
pub struct PrivateKey(SigningKey);

impl PrivateKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Result<PrivateKey, getrandom::Error> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed)?;
        Ok(PrivateKey(SigningKey::from_bytes(&seed)))
    }

    /// A key from a fixed seed (tests and benchmarks).
    pub fn from_seed(seed: [u8; 32]) -> PrivateKey {
        PrivateKey(SigningKey::from_bytes(&seed))
    }

    /// Parses the private key file contents.
    pub fn parse(s: &str) -> Result<PrivateKey, TrustError> {
        let b64 = s
            .trim()
            .strip_prefix(PRIVATE_PREFIX)
            .ok_or(TrustError::PrivateKey(
                "it does not start with \"ed25519-private:\"",
            ))?;
        let bytes = B64
            .decode(b64)
            .map_err(|_| TrustError::PrivateKey("the key is not valid base64"))?;
        let seed: [u8; 32] = bytes
            .try_into()
            .map_err(|_| TrustError::PrivateKey("the key is not 32 bytes long"))?;
        Ok(PrivateKey(SigningKey::from_bytes(&seed)))
    }

    /// The private key file contents (one line).
    pub fn to_file_string(&self) -> String {
        format!("{PRIVATE_PREFIX}{}\n", B64.encode(self.0.to_bytes()))
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey::from_key(self.0.verifying_key())
    }

    /// Signs `bundle` (its exact bytes) and returns the signature entry for the signature file.
    pub fn sign_bundle(&self, bundle: &[u8]) -> SignatureEntry {
        let sig = self.0.sign(&signing_message(bundle));
        SignatureEntry {
            key_id: self.public().id,
            signature: B64.encode(sig.to_bytes()),
        }
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(for {})", self.public().id)
    }
}

/// The message every signature covers: [`SIGNING_CONTEXT`] followed by SHA-512 of the exact bundle bytes.
pub fn signing_message(bundle: &[u8]) -> Vec<u8> {
    signing_message_for_hash(&sha2::Sha512::digest(bundle).into())
}

/// The signing message for a bundle whose SHA-512 is `bundle_sha512` (hashed incrementally, e.g. while
/// the bundle is read from a file).
pub fn signing_message_for_hash(bundle_sha512: &[u8; 64]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(SIGNING_CONTEXT.len() + 64);
    msg.extend_from_slice(SIGNING_CONTEXT);
    msg.extend_from_slice(bundle_sha512);
    msg
}

/// One trusted administrator key.
#[derive(Debug, Clone)]
pub struct TrustedKey {
    /// Who holds the key (shown in messages).
    pub name: String,
    /// The public key.
    pub key: PublicKey,
}

/// The trust configuration: the administrators' public keys and how many must sign (k of n).
#[derive(Debug, Clone)]
pub struct Trust {
    keys: Vec<TrustedKey>,
    threshold: usize,
    max_exception_days: u32,
    min_scanners: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrust {
    threshold: Option<usize>,
    max_exception_days: Option<u32>,
    min_scanners: Option<u32>,
    #[serde(default)]
    keys: Vec<RawTrustedKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrustedKey {
    name: String,
    public_key: String,
}

impl Trust {
    /// Builds a trust configuration, checking that keys are distinct and `1 <= threshold <= keys`.
    pub fn new(keys: Vec<TrustedKey>, threshold: usize) -> Result<Trust, TrustError> {
        if keys.is_empty() {
            return Err(TrustError::TrustInvalid(
                "it lists no keys; add one [[keys]] table per administrator".into(),
            ));
        }
        if threshold == 0 {
            return Err(TrustError::TrustInvalid(
                "threshold is 0; it must be at least 1".into(),
            ));
        }
        if threshold > keys.len() {
            return Err(TrustError::TrustInvalid(format!(
                "threshold is {threshold} but only {} keys are listed, so no bundle could ever be accepted",
                keys.len()
            )));
        }
        let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
        for k in &keys {
            if k.name.trim().is_empty() {
                return Err(TrustError::TrustInvalid(format!(
                    "key {} has an empty name",
                    k.key.id()
                )));
            }
            if let Some(other) = seen.insert(k.key.id(), &k.name) {
                return Err(TrustError::TrustInvalid(format!(
                    "the same public key is listed twice (\"{other}\" and \"{}\"); each administrator needs a distinct key",
                    k.name
                )));
            }
        }
        Ok(Trust {
            keys,
            threshold,
            max_exception_days: DEFAULT_MAX_EXCEPTION_DAYS,
            min_scanners: None,
        })
    }

    /// Sets the bundle limits of this node: how long an exception may last after a bundle's
    /// `issued_at` (1..=365 days), and the floor of the organisation's `min_scanners` (1..=32; none:
    /// no floor).
    pub fn with_limits(
        mut self,
        max_exception_days: u32,
        min_scanners: Option<u32>,
    ) -> Result<Trust, TrustError> {
        if !(1..=365).contains(&max_exception_days) {
            return Err(TrustError::TrustInvalid(format!(
                "max_exception_days is {max_exception_days}; it must be 1..=365 (default {DEFAULT_MAX_EXCEPTION_DAYS})"
            )));
        }
        if let Some(n) = min_scanners.filter(|n| !(1..=super::rules::MAX_MIN_SCANNERS).contains(n))
        {
            return Err(TrustError::TrustInvalid(format!(
                "min_scanners is {n}; it must be 1..={} (or left out for no floor)",
                super::rules::MAX_MIN_SCANNERS
            )));
        }
        self.max_exception_days = max_exception_days;
        self.min_scanners = min_scanners;
        Ok(self)
    }

    /// Parses a trust file (TOML). `threshold` defaults to 2.
    pub fn from_toml(text: &str) -> Result<Trust, TrustError> {
        let raw: RawTrust =
            toml::from_str(text).map_err(|e| TrustError::TrustSyntax(e.to_string()))?;
        let mut keys = Vec::with_capacity(raw.keys.len());
        for k in raw.keys {
            let key = PublicKey::parse(&k.public_key)
                .map_err(|e| TrustError::TrustInvalid(format!("key \"{}\": {e}", k.name)))?;
            keys.push(TrustedKey { name: k.name, key });
        }
        let threshold = raw.threshold.unwrap_or(DEFAULT_THRESHOLD);
        if raw.threshold.is_none() && !keys.is_empty() && keys.len() < threshold {
            return Err(TrustError::TrustInvalid(format!(
                "threshold is {threshold} (the default: no `threshold` is set) but only {} key is listed; list more keys or set `threshold`",
                keys.len()
            )));
        }
        Trust::new(keys, threshold)?.with_limits(
            raw.max_exception_days.unwrap_or(DEFAULT_MAX_EXCEPTION_DAYS),
            raw.min_scanners,
        )
    }

    /// The longest an exception may last after a bundle's `issued_at`, in days.
    pub fn max_exception_days(&self) -> u32 {
        self.max_exception_days
    }

    /// The floor of a bundle's organisation-level `min_scanners`, if the trust file sets one.
    pub fn min_scanners(&self) -> Option<u32> {
        self.min_scanners
    }

    /// The trusted keys.
    pub fn keys(&self) -> &[TrustedKey] {
        &self.keys
    }

    /// How many distinct trusted keys must sign.
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    fn key(&self, id: &str) -> Option<&TrustedKey> {
        self.keys.iter().find(|k| k.key.id() == id)
    }
}

/// One detached signature: which key made it, and the base64 signature bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureEntry {
    /// Key id of the signer.
    pub key_id: String,
    /// Base64 of the 64-byte Ed25519 signature.
    pub signature: String,
}

/// The contents of a signature file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureFile {
    /// Signature file format; must be [`SIGNATURE_FORMAT`].
    pub format: u32,
    /// The signatures, one per signer.
    pub signatures: Vec<SignatureEntry>,
}

impl SignatureFile {
    /// An empty signature file.
    pub fn new() -> SignatureFile {
        SignatureFile {
            format: SIGNATURE_FORMAT,
            signatures: Vec::new(),
        }
    }

    /// Parses a signature file.
    pub fn parse(bytes: &[u8]) -> Result<SignatureFile, TrustError> {
        let file: SignatureFile =
            serde_json::from_slice(bytes).map_err(|e| TrustError::SignatureFile(e.to_string()))?;
        if file.format != SIGNATURE_FORMAT {
            return Err(TrustError::SignatureFile(format!(
                "format {} is not supported (this pullgate reads format {SIGNATURE_FORMAT})",
                file.format
            )));
        }
        Ok(file)
    }

    /// Adds `entry`, replacing an earlier signature by the same key.
    pub fn add(&mut self, entry: SignatureEntry) {
        self.signatures.retain(|s| s.key_id != entry.key_id);
        self.signatures.push(entry);
    }

    /// Serialises the file (pretty JSON with a trailing newline).
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }
}

/// Why the signatures on a bundle are not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// No signature at all.
    #[error(
        "the bundle has no signatures; {threshold} administrators must sign it with `pullgate bundle sign`"
    )]
    Missing { threshold: usize },
    /// A signature from a trusted key does not verify: the bundle or signature was altered.
    #[error(
        "the signature by trusted key \"{name}\" ({key_id}) does not match the bundle bytes: the bundle was modified after signing or the signature is corrupt; re-sign the exact bundle"
    )]
    Bad { name: String, key_id: String },
    /// A signature entry is not decodable.
    #[error(
        "signature entry for key {key_id} is not a base64 Ed25519 signature; re-create it with `pullgate bundle sign`"
    )]
    Undecodable { key_id: String },
    /// Fewer than k distinct trusted keys signed.
    #[error(
        "only {valid} of the required {threshold} trusted signatures are present (valid: [{}]; from unknown keys: [{}]); have more administrators listed in the trust file sign the bundle",
        signers.join(", "), unknown.join(", ")
    )]
    NotEnough {
        valid: usize,
        threshold: usize,
        signers: Vec<String>,
        unknown: Vec<String>,
    },
}

/// Checks the signatures over `bundle` against `trust`; returns the names of the trusted signers.
///
/// Rules: a signature from a trusted key that does not verify rejects the bundle outright; signatures from
/// keys not in the trust file are ignored (and named in the error if the threshold is not met); several
/// signatures by one key count once; at least `threshold` distinct trusted keys must have signed.
pub fn verify_signatures(
    bundle: &[u8],
    sigs: &SignatureFile,
    trust: &Trust,
) -> Result<Vec<String>, SignatureError> {
    if sigs.signatures.is_empty() {
        return Err(SignatureError::Missing {
            threshold: trust.threshold,
        });
    }
    verify_signatures_for_hash(&sha2::Sha512::digest(bundle).into(), sigs, trust)
}

/// [`verify_signatures`] for a bundle whose SHA-512 is `bundle_sha512` (same rules; the caller hashed
/// the exact bundle bytes, e.g. while reading them).
pub fn verify_signatures_for_hash(
    bundle_sha512: &[u8; 64],
    sigs: &SignatureFile,
    trust: &Trust,
) -> Result<Vec<String>, SignatureError> {
    if sigs.signatures.is_empty() {
        return Err(SignatureError::Missing {
            threshold: trust.threshold,
        });
    }
    let msg = signing_message_for_hash(bundle_sha512);
    let mut signers: Vec<String> = Vec::new();
    let mut signer_ids: Vec<&str> = Vec::new();
    let mut unknown = Vec::new();
    for entry in &sigs.signatures {
        let Some(tk) = trust.key(&entry.key_id) else {
            unknown.push(entry.key_id.chars().take(32).collect::<String>());
            continue;
        };
        let bytes = B64
            .decode(&entry.signature)
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b).ok());
        let Some(bytes) = bytes else {
            return Err(SignatureError::Undecodable {
                key_id: entry.key_id.clone(),
            });
        };
        let sig = Signature::from_bytes(&bytes);
        if tk.key.key.verify_strict(&msg, &sig).is_err() {
            return Err(SignatureError::Bad {
                name: tk.name.clone(),
                key_id: entry.key_id.clone(),
            });
        }
        if !signer_ids.contains(&tk.key.id()) {
            signer_ids.push(tk.key.id());
            signers.push(tk.name.clone());
        }
    }
    if signers.len() < trust.threshold {
        return Err(SignatureError::NotEnough {
            valid: signers.len(),
            threshold: trust.threshold,
            signers,
            unknown,
        });
    }
    Ok(signers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> PrivateKey {
        PrivateKey::from_seed([n; 32])
    }

    fn trust(keys: &[u8], threshold: usize) -> Trust {
        let keys = keys
            .iter()
            .map(|&n| TrustedKey {
                name: format!("admin{n}"),
                key: key(n).public(),
            })
            .collect();
        Trust::new(keys, threshold).unwrap()
    }

    fn signed(bundle: &[u8], by: &[u8]) -> SignatureFile {
        let mut f = SignatureFile::new();
        for &n in by {
            f.add(key(n).sign_bundle(bundle));
        }
        f
    }

    #[test]
    fn key_files_roundtrip() {
        let k = PrivateKey::generate().unwrap();
        let again = PrivateKey::parse(&k.to_file_string()).unwrap();
        assert_eq!(again.public(), k.public());
        let p = PublicKey::parse(&k.public().to_string()).unwrap();
        assert_eq!(p.id(), k.public().id());
        assert_eq!(p.id().len(), 16);
        assert!(
            PublicKey::parse("ed25519:AAAA")
                .unwrap_err()
                .to_string()
                .contains("32 bytes")
        );
        assert!(
            PublicKey::parse("rsa:AAAA")
                .unwrap_err()
                .to_string()
                .contains("ed25519:")
        );
        assert!(PrivateKey::parse("ed25519-private:!!").is_err());
        assert!(!format!("{k:?}").contains(&k.to_file_string()[16..30]));
    }

    #[test]
    fn k_of_n() {
        let b = b"{\"bundle\": 1}";
        let t = trust(&[1, 2, 3], 2);
        assert_eq!(
            verify_signatures(b, &signed(b, &[1, 3]), &t).unwrap(),
            vec!["admin1", "admin3"]
        );
        let e = verify_signatures(b, &signed(b, &[1]), &t).unwrap_err();
        assert!(
            matches!(
                e,
                SignatureError::NotEnough {
                    valid: 1,
                    threshold: 2,
                    ..
                }
            ),
            "{e}"
        );
        let e = verify_signatures(b, &signed(b, &[1, 9]), &t).unwrap_err();
        assert!(
            e.to_string().contains(&key(9).public().id().to_owned()),
            "{e}"
        );
        // The same key twice counts once.
        let mut twice = signed(b, &[1]);
        twice.signatures.push(twice.signatures[0].clone());
        assert!(matches!(
            verify_signatures(b, &twice, &t),
            Err(SignatureError::NotEnough { valid: 1, .. })
        ));
        assert!(matches!(
            verify_signatures(b, &SignatureFile::new(), &t),
            Err(SignatureError::Missing { .. })
        ));
    }

    #[test]
    fn tampering_is_detected() {
        let b = b"{\"bundle\": 1}";
        let t = trust(&[1, 2], 2);
        let sigs = signed(b, &[1, 2]);
        let e = verify_signatures(b"{\"bundle\": 2}", &sigs, &t).unwrap_err();
        assert!(matches!(e, SignatureError::Bad { .. }), "{e}");
        let mut junk = sigs.clone();
        junk.signatures[0].signature = "bm9wZQ==".into();
        assert!(matches!(
            verify_signatures(b, &junk, &t),
            Err(SignatureError::Undecodable { .. })
        ));
    }

    #[test]
    fn trust_file() {
        let t = Trust::from_toml(&format!(
            "threshold = 1\n[[keys]]\nname = \"alice\"\npublic_key = \"{}\"\n",
            key(1).public()
        ))
        .unwrap();
        assert_eq!(t.threshold(), 1);
        let e = Trust::from_toml(&format!(
            "[[keys]]\nname = \"alice\"\npublic_key = \"{}\"\n",
            key(1).public()
        ))
        .unwrap_err();
        assert!(e.to_string().contains("threshold is 2"), "{e}");
        let dup = format!(
            "threshold = 1\n[[keys]]\nname = \"a\"\npublic_key = \"{0}\"\n[[keys]]\nname = \"b\"\npublic_key = \"{0}\"\n",
            key(1).public()
        );
        assert!(
            Trust::from_toml(&dup)
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
        assert!(
            Trust::from_toml("threshold = 1\nkeyz = []")
                .unwrap_err()
                .to_string()
                .contains("malformed")
        );
        assert!(Trust::from_toml("threshold = 0\n[[keys]]\nname=\"a\"\npublic_key=\"x\"").is_err());
        let one = format!(
            "threshold = 1\n[[keys]]\nname = \"alice\"\npublic_key = \"{}\"\n",
            key(1).public()
        );
        assert_eq!(t.max_exception_days(), DEFAULT_MAX_EXCEPTION_DAYS);
        assert_eq!(t.min_scanners(), None);
        let limits =
            Trust::from_toml(&format!("max_exception_days = 7\nmin_scanners = 3\n{one}")).unwrap();
        assert_eq!(
            (limits.max_exception_days(), limits.min_scanners()),
            (7, Some(3))
        );
        for bad in [
            "max_exception_days = 0",
            "max_exception_days = 400",
            "min_scanners = 0",
            "min_scanners = 99",
        ] {
            let e = Trust::from_toml(&format!("{bad}\n{one}")).unwrap_err();
            assert!(
                e.to_string().contains(bad.split(' ').next().unwrap()),
                "{e}"
            );
        }
    }

    #[test]
    fn signature_file_roundtrip() {
        let f = signed(b"x", &[1, 2]);
        assert_eq!(SignatureFile::parse(f.to_json().as_bytes()).unwrap(), f);
        assert!(
            SignatureFile::parse(b"{\"format\": 9, \"signatures\": []}")
                .unwrap_err()
                .to_string()
                .contains("format 9")
        );
        assert!(SignatureFile::parse(b"nope").is_err());
    }
}
