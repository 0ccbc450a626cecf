//! The Bulwark coordinator. The admin CLI `bulwark` is the `bulwark-cli` crate.
//!
//! - [`registry`] — nodes, agents, data sources and assignments in sled; placement.
//! - [`policy`] — what the admin set against what agents propose: retention,
//!   space, quotas, group membership.
//! - [`service`] — the `bulwark.v1.Coordinator` gRPC service.
//! - [`server`] — the daemon's lifecycle.
//! - [`config`] — `coordinator.toml`.
//! - [`enroll`] — enrollment tokens and certificate signing; [`revocation`] — the
//!   fleet's revocation list and CRL.

pub mod config;
pub mod enroll;
pub mod placement;
pub mod policy;
pub mod registry;
pub mod revocation;
pub mod schedule;
pub mod server;
pub mod service;
