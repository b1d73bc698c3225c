//! The node half of pullgate: the daemon that runs on every container host, between kubelet and
//! containerd, and enforces the bundle in force.
//!
//! - [`proxy`]: the CRI forwarding path — an HTTP/2 server on the kubelet side, a lazily (re)connected
//!   HTTP/2 client on the containerd side, gRPC framing and status answers, and the intercept table.
//! - [`wire`]: field-preserving edits of protobuf messages at the wire level (no decode/re-encode).
//! - [`enforce`]: the intercept handler that applies the policy core to pulls, lookups and starts, and
//!   the installed bundle on disk.
//! - [`daemon`]: lifecycle — socket set-up, signals, readiness, graceful drain, bundle lifecycle, the
//!   operator endpoint.
//! - [`lockdown`]: the containerd event watcher (images and snapshots that arrive past pullgate)
//!   and the node check (`pullgate node check`: containerd, sockets, kubelet, bundle).
//! - [`config`], [`audit`], [`metrics`]: the node's configuration file, audit log and metrics.
//! - [`ratelimit`]: rate limiting for log lines a client can cause at any rate.
//! - [`whatif`]: what a new bundle would do to the containers running on the node.
//! - [`api`]: the local admin API's protocol, caller check and client (the CLI's way to the daemon).
//! - [`sync`]: bundles taken from a channel in the private registry, staged by rollout waves.
//!
//! The node imports the shared [`crate::policy`] core, never the administrators' tooling or the CLI.

pub mod api;
pub mod audit;
pub mod config;
pub mod daemon;
pub mod enforce;
pub mod lockdown;
pub mod metrics;
pub mod proxy;
pub mod ratelimit;
pub mod sync;
pub mod whatif;
pub mod wire;
