//! The administrators' side: everything between "a platform team wants an image" and "a signed bundle
//! that nodes enforce".
//!
//! - [`catalog`]: the catalog directory (TOML, the source of truth in version control): parsing with
//!   file/line/key errors, cross-file checks, `catalog init`, and the text edits `approve` makes.
//! - [`reports`]: scanner reports in their native JSON (Trivy, Grype), bound to an image's digests, with
//!   the worst severity after the catalog's ignore list.
//! - [`approve`]: the pipeline of checks (resolve, reports, licence, versions), then the mirror copy by
//!   digest and the catalog entry.
//! - [`build`]: catalog → the next bundle (format 2), with the mirror check.
//! - [`publish`]: a signed bundle pushed to a channel of the private registry as an OCI artifact.
//! - `parallel`: large catalogs' files, checks and bundle entries split across the cores.
//!
//! It uses the policy core ([`crate::policy`]: references, digests, rules, licences, bundle format) and
//! the shared registry client ([`crate::registry`]); never the node daemon.

pub mod approve;
pub mod build;
pub mod catalog;
mod parallel;
pub mod publish;
pub mod reports;
