//! pullgate: the *approved public image repository* pattern, end to end.
//!
//! Two halves share one pure policy core:
//!
//! - [`node`]: the daemon on every container host — a CRI proxy between kubelet and containerd that
//!   pins every image to an approved digest in the private registry and refuses everything else.
//! - [`policy`]: the pure policy core both halves use — image references, the signed bundle format,
//!   trust and signatures, governance scopes, decisions. No async runtime, no sockets, no file I/O in
//!   the decision path.
//! - [`admin`]: the administrators' tooling — the catalog, `approve` (scanner reports, licence and
//!   version rules, mirroring by digest) and `bundle build`.
//! - [`registry`]: the shared OCI distribution client (resolve, HEAD, copy by digest, credentials).
//! - [`cli`]: the command line, the top layer; `main.rs` only calls [`cli::main`].
//! - [`exit`]: the process exit statuses every command shares.
//!
//! Layers import downwards only: `cli` → `node` / `admin` → `registry` → `policy` → `exit`.

pub mod admin;
pub mod cli;
pub mod exit;
pub mod node;
pub mod policy;
pub mod registry;
