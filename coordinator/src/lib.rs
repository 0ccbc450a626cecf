//! The Bulwark coordinator. The admin CLI `bulwark` is the `bulwark-cli` crate.
//!
//! - [`config`] — `coordinator.toml`.
//! - [`enroll`] — enrollment tokens and certificate signing.
//! - [`leader`] — which coordinator leads; the follower gate and leader-only workers.
//! - [`migrate`] — `bulwark-coordinator migrate`: a stopped coordinator's sled state copied into etcd.
//! - [`forecast`] — capacity forecast: sample histories, Theil–Sen trend, days until full (pure).
//! - [`error`] — `CoordinatorError`, and its one mapping to a gRPC `Status`.
//! - [`placement`] — where a new source goes, and rebalance plans (pure).
//! - [`policy`] — what the admin set against what agents propose (retention, space, quotas, groups).
//! - [`records`] — the records kept in the state store (plain data, format version `v`).
//! - [`registry`] — nodes, agents, sources, groups, alerts in the state store; agents' live sessions.
//! - [`revocation`] — the fleet's revocation list and CRL.
//! - [`schedule`] — the protection groups' slots (pure).
//! - [`server`] — the daemon's lifecycle: open, serve, stop the workers.
//! - [`api`] — the `bulwark.v1.Coordinator` gRPC handlers: adapters over [`service`].
//! - [`service`] — the domain operations.
//! - [`state`] — the durable state behind one trait: sled (default) or etcd.
//! - [`wire`] — requests parsed once into domain types (`ProtocolError`), and back.
//! - [`workers`] — the background loops (schedule, moves, monitor, scrub) as workers.

pub mod api;
pub mod config;
pub mod enroll;
pub mod error;
pub mod forecast;
pub mod leader;
pub mod migrate;
pub mod placement;
pub mod policy;
pub mod records;
pub mod registry;
pub mod revocation;
pub mod schedule;
pub mod server;
pub mod service;
pub mod state;
pub mod wire;
pub mod workers;
