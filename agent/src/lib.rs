//! The Bulwark agent: runs on a protected host, finds the blocks of each protected
//! volume that changed, and streams only those to the volume's storage node. It also
//! writes restores to paths on its host. It dials out only.
//!
//! - [`config`] — `agent.toml`.
//! - [`volume`] — reading a regular file or block device.
//! - [`sync`] — one sync with the `fingerprint` tracker.
//! - [`restore`] — one restore to a path.
//! - [`server`] — lifecycle, the control stream to the coordinator, schedules.

pub mod config;
pub mod restore;
pub mod server;
pub mod sync;
pub mod volume;
