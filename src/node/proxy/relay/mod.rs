//! The CRI relay: each kubelet connection relayed to a connection to containerd of its own, at the
//! HTTP/2 frame level.
//!
//! - Per kubelet connection, one task ([`session`]) owns both sockets (registered for readability
//!   only: [`crate::node::proxy::socket`]); frames are read in batches and written one write per
//!   batch per side.
//! - Every header block is decoded ([`hpack`], its Huffman strings with [`huffman`]) and
//!   re-encoded as literals in both directions ([`blocks`]), so neither receiver's HPACK table is
//!   used and containerd decodes exactly what pullgate routed on.
//! - Stream IDs pass unchanged; refused streams are answered by pullgate and never opened upstream;
//!   intercepted calls are decided ([`local`]) and then answered by pullgate or forwarded by the
//!   session with pullgate's request.
//! - Flow control stays the peers' own except for the corrections in [`flow`].
//! - [`frame`]: the frame constants and the frames pullgate writes itself.
//!
//! Why frames rather than two HTTP/2 endpoints (a server for kubelet, a client for containerd):
//! with hyper's server and an `h2` client a forwarded call cost about 89k instructions in pullgate
//! and three tasks; relayed, about 24k on one task (README, "The CRI proxy against the null relay").

pub mod blocks;
pub mod flow;
pub mod frame;
pub mod hpack;
pub mod huffman;
pub mod local;
pub mod session;

pub use session::{SessionLimits, serve};
