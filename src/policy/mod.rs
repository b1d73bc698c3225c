//! The pure policy core: image references, the signed bundle, governance scopes and rules, decisions.
//!
//! Nothing in the decision path does I/O, reads the clock or needs an async runtime; [`load`] is the only
//! module that touches files, and only the CLI and the daemon's reload path call it.
//!
//! How the daemon uses it:
//!
//! ```no_run
//! use std::sync::Arc;
//! use pullgate::policy::{self, ImageRequest, PodContext, SignatureFile, Trust, VerifiedBundle};
//!
//! # fn demo(bundle_bytes: &[u8], sig_bytes: &[u8], trust_toml: &str) -> Result<(), Box<dyn std::error::Error>> {
//! let trust = Trust::from_toml(trust_toml)?;
//! let sigs = SignatureFile::parse(sig_bytes)?;
//! let installed: Option<u64> = None; // version of the bundle currently in use, for rollback protection
//! let bundle: Arc<VerifiedBundle> =
//!     Arc::new(policy::verify_bundle(bundle_bytes, &sigs, &trust, installed, time::OffsetDateTime::now_utc())?);
//!
//! let pod = PodContext { namespace: Some("checkout".into()), ..PodContext::default() };
//! let now = time::OffsetDateTime::now_utc(); // decisions are pure: the caller passes the time
//! let d = policy::decide(&ImageRequest::Reference("nginx:1.25"), &bundle, &pod, now);
//! if d.is_allowed() {
//!     // pull d.pull_ref instead of the requested image
//! } else {
//!     // return d.message to kubelet; d.reason.as_str() is a stable code
//! }
//! # Ok(()) }
//! ```
//!
//! - [`reference`]: [`Reference`] and [`Digest`] parsing and normalisation.
//! - [`trust`]: keys, the trust file, signature files, k-of-n verification.
//! - [`scope`]: governance (organisation → program → project → application) and modes.
//! - [`bundle`]: the bundle format, validation, index and [`verify_bundle`].
//! - [`rules`]: scan and licence rules per governance level (format 2).
//! - [`license`]: SPDX licence expressions: strict parsing and evaluation.
//! - [`rollout`]: rollout waves (format 2) and whether a node's wave is open.
//! - [`decision`]: [`decide`], [`decide_without_bundle`], [`Decision`].
//! - [`load`]: reading bundle, signature and trust files (CLI and daemon reload only).
//! - [`diff`]: comparing two bundles (`pullgate bundle diff`).

pub mod bundle;
pub mod decision;
pub mod diff;
pub mod license;
pub mod load;
pub mod reference;
pub mod rollout;
pub mod rules;
pub mod scope;
pub mod trust;

pub use bundle::{
    Bundle, BundleError, DEFAULT_MAX_BUNDLE_SIZE, Exception, ImageEntry, Lifecycle, LifecycleState,
    Provenance, Scan, Severity, VerifiedBundle, parse_bundle, verify_bundle, verify_bundle_reader,
};
pub use decision::{
    Decision, ExceptionInfo, ImageRequest, LifecycleInfo, Matched, PodContext, ReasonCode, Verdict,
    decide, decide_for_any_scope, decide_without_bundle,
};
pub use reference::{Digest, Reference, ReferenceError};
pub use scope::Mode;
pub use trust::{PrivateKey, PublicKey, SignatureFile, Trust, TrustError};

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;

    pub const EXAMPLE: &str = include_str!("../../tests/fixtures/policy/example-bundle.json");

    pub fn example_json() -> String {
        EXAMPLE.to_owned()
    }

    /// The format 2 example of docs/bundle.md.
    pub const EXAMPLE_V2: &str = include_str!("../../tests/fixtures/policy/example-bundle-v2.json");

    /// A time during the format 2 example's validity, before any of its dates.
    pub fn v2_now() -> time::OffsetDateTime {
        time::macros::datetime!(2026-03-10 00:00 UTC)
    }

    /// The format 2 example with `edit` applied, verified (signed by two of three, at [`v2_now`]).
    pub fn v2_bundle_with(edit: impl FnOnce(&mut serde_json::Value)) -> VerifiedBundle {
        let mut v: serde_json::Value = serde_json::from_str(EXAMPLE_V2).unwrap();
        edit(&mut v);
        let bytes = serde_json::to_vec(&v).unwrap();
        verify_bundle(
            &bytes,
            &sign(&bytes, &[1, 2]),
            &trust_2_of_3(),
            None,
            v2_now(),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn digest(n: u8) -> Digest {
        Digest::Sha256([n; 32])
    }

    pub fn example_now() -> time::OffsetDateTime {
        time::macros::datetime!(2026-03-01 12:00 UTC)
    }

    pub fn trust_2_of_3() -> Trust {
        let keys = [1u8, 2, 3]
            .iter()
            .map(|&n| trust::TrustedKey {
                name: format!("admin{n}"),
                key: PrivateKey::from_seed([n; 32]).public(),
            })
            .collect();
        Trust::new(keys, 2).unwrap()
    }

    pub fn sign(bytes: &[u8], by: &[u8]) -> SignatureFile {
        let mut f = SignatureFile::new();
        for &n in by {
            f.add(PrivateKey::from_seed([n; 32]).sign_bundle(bytes));
        }
        f
    }

    pub fn example_bundle() -> VerifiedBundle {
        let bytes = EXAMPLE.as_bytes();
        verify_bundle(
            bytes,
            &sign(bytes, &[1, 2]),
            &trust_2_of_3(),
            None,
            example_now(),
        )
        .unwrap()
    }
}
