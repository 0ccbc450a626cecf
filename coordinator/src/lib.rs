//! The Bulwark coordinator and the admin CLI.
//!
//! - [`cli`] — the `bulwark` admin commands.
//! - [`config`] — `coordinator.toml`.
//! - [`demo`] — a whole fleet in one process.
//! - [`enroll`] — enrollment tokens and certificate signing.
//! - [`error`] — `CoordinatorError`, and its one mapping to a gRPC `Status`.
//! - [`export`] — `bulwark export`: a point's bytes from its node.
//! - [`placement`] — where a new source goes, and rebalance plans (pure).
//! - [`policy`] — what the admin set against what agents propose (retention, space, quotas, groups).
//! - [`registry`] — nodes, agents, sources, groups, alerts in sled; agents' live sessions.
//! - [`revocation`] — the fleet's revocation list and CRL.
//! - [`revocation_cli`] — `bulwark revoke`.
//! - [`schedule`] — the protection groups' slots (pure).
//! - [`server`] — the daemon's lifecycle and background loops.
//! - [`service`] — the domain operations; [`service::api`] is the gRPC service over them.
//! - [`wire`] — requests parsed once into domain types (`ProtocolError`), and back.

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
