//! Code that two or more Bulwark binaries share, and nothing else.
//!
//! - [`tls`] — the fleet's mutual TLS: server and client configurations, the peer
//!   identity taken from a certificate's SPIFFE URI SAN, and role checks.
//! - [`pki`] — the fleet CA and the certificates it signs (`bulwark pki`).
//! - [`config`] — TOML loading with errors that name the file and key; sizes and
//!   durations as operators write them.
//! - [`block`] — blocks, extents and BLAKE3 checksums, and the checks the node and the
//!   agent both make on them.
//! - [`nbd`] — the NBD protocol: a server exporting a file or block device, and a
//!   blocking client that reads exports and qemu dirty bitmaps.
//! - [`telemetry`], [`shutdown`], [`failpoint`] — process plumbing.

pub mod alloc;
pub mod block;
pub mod config;
pub mod daemon;
pub mod failpoint;
pub mod metrics;
pub mod nbd;
pub mod pki;
pub mod point;
pub mod retention;
pub mod shutdown;
pub mod telemetry;
pub mod time;
pub mod tls;

/// The version every binary reports to its peers.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Largest gRPC message any Bulwark server or client accepts. Extent batches are at
/// most [`block::MAX_BATCH_BYTES`] of payload, so anything near this is malformed.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
