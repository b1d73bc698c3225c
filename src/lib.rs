//! pullgate: a node-level CRI proxy that makes the *approved public image repository* pattern real.
//!
//! kubelet talks to pullgate's unix socket as if it were containerd; pullgate forwards every CRI call to
//! containerd unchanged, except the few it must inspect (image pulls, image lookups, container creation),
//! which it hands to an intercept handler backed by a signed allowlist bundle.
//!
//! Where things live:
//! - [`proxy`]: the CRI forwarding path — an HTTP/2 server on the kubelet side, a lazily (re)connected
//!   HTTP/2 client on the containerd side, gRPC framing and status answers, and the intercept table.
//! - [`wire`]: field-preserving edits of protobuf messages at the wire level (no decode/re-encode).
//! - [`policy`]: the pure policy core — image references, the signed bundle, governance scopes, decisions.
//!   No async runtime, no sockets, no file I/O in the decision path.
//! - [`config`]: the TOML configuration file, parsed strictly and validated into typed values.
//! - [`daemon`]: lifecycle — socket set-up, signals, readiness notification, graceful drain, logging.
//! - [`cli`]: the command line; `main.rs` only calls [`cli::main`].

pub mod audit;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod enforce;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod wire;
