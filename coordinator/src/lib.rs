//! The Bulwark coordinator and the admin CLI.
//!
//! - [`registry`] — nodes, agents, data sources and assignments in sled; placement.
//! - [`policy`] — what the admin set against what agents propose: retention,
//!   space, quotas, group membership.
//! - [`service`] — the `bulwark.v1.Coordinator` gRPC service.
//! - [`server`] — the daemon's lifecycle.
//! - [`config`] — `coordinator.toml`.
//! - [`enroll`] — enrollment tokens and certificate signing; [`revocation`] — the
//!   fleet's revocation list and CRL ([`revocation_cli`]: `bulwark revoke`).
//! - [`cli`]: the `bulwark` admin commands; [`demo`] — a whole fleet in one process.

pub mod cli;
pub mod config;
pub mod demo;
pub mod enroll;
pub mod error;
pub mod export;
pub mod placement;
pub mod policy;
pub mod registry;
pub mod revocation;
pub mod revocation_cli;
pub mod schedule;
pub mod server;
pub mod service;
pub mod wire;
