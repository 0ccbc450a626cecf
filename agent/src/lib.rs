//! The Bulwark agent: runs on a protected host, finds the blocks of each protected
//! volume that changed, and streams only those to the volume's storage node. It also
//! writes restores to paths on its host. It dials out only.
//!
//! - [`config`] — `agent.toml`.
//! - [`volume`] — reading a regular file or block device.
//! - [`tracker`] — how changed blocks are found (fingerprint, nbd-filter,
//!   qcow2-bitmap).
//! - [`export`] — the nbd-filter's NBD export: a private Unix socket, or TLS for
//!   one role of fleet certificates.
//! - [`quiesce`] — hooks, fsfreeze and snapshots for app-consistent points.
//! - [`sync`] — one sync or consistency check.
//! - [`restore`] — one restore to a path.
//! - [`logs`] — log sources: ship appended bytes, restore a log point.
//! - [`server`] — lifecycle and the control stream to the coordinator.
//! - [`workers`] — the background loops: each source's sync schedule, renewal.

pub mod config;
pub mod export;
pub mod logs;
pub mod quiesce;
pub mod restore;
pub mod server;
pub mod sync;
pub mod tracker;
pub mod volume;
pub mod workers;
