//! The Bulwark storage node: keeps, per data source, a replica and a chain of recovery
//! points in a storage pool, accepts syncs from the source's agent, and streams
//! points back for restores.
//!
//! - [`store`] — the on-disk format and its crash-safe commit.
//! - [`config`] — `node.toml`.
//! - [`mount`] — the read-only NBD exports of points (`nbd_listen`).
//! - [`wire`] — requests parsed into domain types once, and domain values for the wire.
//! - [`error`] — the node's errors, and the one place each becomes a gRPC status.
//! - [`node`] — the node's operations: access, the sync pipeline, restores, log
//!   ships, moves, locks.
//! - [`service`] — the `bulwark.v1.Node` gRPC service (adapters over [`node`]) and
//!   admission (turns, caps, idle timeouts).
//! - [`server`] — start-up, serving, and an ordered shutdown.
//! - [`workers`] — the background loops: heartbeats (registration, usage, alerts,
//!   revocation lists) and certificate renewal.
//! - `uring` — batches of scattered direct I/O at a queue depth (io_uring).

pub mod config;
pub mod error;
pub mod mount;
pub mod node;
pub mod server;
pub mod service;
pub mod store;
mod uring;
pub mod wire;
pub mod workers;
