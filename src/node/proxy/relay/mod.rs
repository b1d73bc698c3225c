//! The frame-level CRI relay that is to replace hyper's HTTP/2 server and client on the forwarding
//! path (work in progress: nothing uses it yet).
//!
//! Why: the proxy benchmark's frame relay — one task per connection, every header block decoded
//! with pullgate's HPACK decoder and re-encoded as literals without indexing, every other frame
//! passed as it came — adds 1.13× what the null relay adds to a forwarded call, at 0.99× its CPU;
//! pullgate on hyper adds 2–2.8×. The cost is in the two full HTTP/2 endpoints, not in reading paths.
//!
//! Design:
//! - Per kubelet connection, one task and one upstream connection to containerd.
//! - Every header block is decoded and re-encoded as literals in both directions ([`blocks`]), so
//!   neither receiver's HPACK table is used and containerd decodes exactly what pullgate routed on.
//! - Stream IDs pass unchanged; refused streams are answered by pullgate and never opened upstream.
//! - Intercepted calls are answered by pullgate on kubelet's stream; flow control stays the peers'
//!   own except for the corrections in [`flow`].

pub mod blocks;
pub mod flow;
pub mod frame;
pub mod hpack;
pub mod local;
pub mod session;

pub use session::{SessionLimits, serve};
