//! The Bulwark storage node: keeps, per data source, a replica and a chain of recovery
//! points in a storage pool, accepts syncs from the source's agent, and streams
//! points back for restores.
//!
//! - [`store`] — the on-disk format and its crash-safe commit.
//! - [`config`] — `node.toml`.
//! - [`service`] — the `bulwark.v1.Node` gRPC service (adapters over the store).
//! - [`server`] — start-up, registration and heartbeats, shutdown.
//! - `uring` — batches of scattered direct I/O at a queue depth (io_uring).

pub mod config;
pub mod mount;
pub mod server;
pub mod service;
pub mod store;
mod uring;
