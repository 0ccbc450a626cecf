//! The coordinator's registry: nodes, agents and data sources in the state store
//! ([`crate::state::StateStore`]; sled by default), placement of new data sources,
//! and the live control streams of connected agents.
//!
//! Records are JSON with a format version `v`, one tree per kind (`nodes`, `agents`,
//! `sources`, `alerts`, `groups`, `quotas`, `forecast`). Every change that placement
//! depends on happens under one mutex, so two sources registered at once cannot both
//! take the last free space of a node; only the leading coordinator writes (with
//! etcd, fencing refuses a deposed leader's writes), so the mutex is enough.
//! A change of one record that may race another writer without that mutex is one
//! conditional [`Txn`] on the value it read (`records::update`).
//!
//! Its API takes and returns domain types (the wire is converted in
//! [`crate::wire`]). By concern:
//! - `records` — the persisted records and their plain reads and writes;
//! - `sources` — nodes, an agent's Hello, placement, assignments, sync reports;
//! - `alerts` — conditions raised and resolved per origin;
//! - `forecast` — usage histories, the capacity forecast and its alerts;
//! - `groups` — protection groups and what members take from them;
//! - `moves` — draining, and the durable steps of a move;
//! - `sessions` — agents' live control streams and the commands on them (memory);
//! - `admin` — quotas, retention, locks and removal as the admin sets them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::policy::FleetPolicy;
use crate::state::{MAX_TXN_OPS, SledState, StateError, StateStore, TreeName, Txn};
use bulwark_common::time::now_ms;
use bulwark_proto as pb;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

/// The most data sources one agent may register: a host's Hello cannot bloat the
/// registry (or the alerts) without bound.
pub const MAX_SOURCES_PER_AGENT: usize = 1024;

/// A registry operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A record that cannot be encoded or read back.
    #[error("registry store: {0}")]
    Store(String),
    /// The state store failed (`Unavailable`), or refused a write because this
    /// coordinator no longer leads (`Fenced`).
    #[error(transparent)]
    State(#[from] StateError),
    #[error("no data source named {0}")]
    UnknownSource(String),
    #[error("data source {source_name} belongs to agent {owner}, not {agent}")]
    NotOwner {
        source_name: String,
        owner: String,
        agent: String,
    },
    #[error("data source {0} has no storage node yet: {1}")]
    Unassigned(String, String),
    #[error("no storage node named {0}")]
    UnknownNode(String),
    #[error("agent {0} is not connected")]
    AgentOffline(String),
    #[error("invalid data source {0}: {1}")]
    InvalidSource(String, String),
    /// The caller's role may not do this (an admin lowering a governance lock).
    #[error("{0}")]
    Forbidden(String),
    /// A retention lock keeps what was asked to go.
    #[error("{0}")]
    Locked(String),
}

type Result<T, E = RegistryError> = std::result::Result<T, E>;

mod admin;
mod alerts;
mod forecast;
mod groups;
mod moves;
mod records;
mod sessions;
mod sources;
#[cfg(test)]
mod tests;

pub use crate::records::*;
pub use alerts::Alert;
pub use forecast::{ForecastReport, ForecastRow, disk_alert_key, forecast_alerts};
pub use groups::paired;
use records::{AGENTS, ALERTS, FORECAST, GROUPS, NODES, QUOTAS, SOURCES, dec, enc};
use sessions::Connection;
pub use sessions::{
    AgentResult, Command, CommandOutcome, Progress, RestoreCommand, RestorePart, SyncCommand,
};
pub use sources::{
    Heartbeat, Hello, NodeRegistration, Registration, SourceKind, SourceSpec, SourceUsage,
    SyncOutcome, SyncReport,
};

/// The registry.
pub struct Registry {
    /// Every durable record (trees in `records`).
    state: Arc<dyn StateStore>,
    forecast_settings: crate::forecast::ForecastSettings,
    /// `[policy]` of coordinator.toml.
    fleet: FleetPolicy,
    node_timeout: Duration,
    /// Held by every change placement depends on (records across many keys).
    // single-writer: the leader
    placement: Mutex<()>,
    connections: Mutex<HashMap<String, Connection>>,
    pending: Mutex<HashMap<u64, (String, oneshot::Sender<CommandOutcome>)>>,
    next_id: AtomicU64,
    /// The latest progress each running operation reported, by source (memory only).
    progress: Mutex<HashMap<String, (Progress, std::time::Instant)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    /// Opens the registry in `data_dir`: the sled state at `data_dir/registry`.
    pub fn open(data_dir: &std::path::Path, node_timeout: Duration) -> Result<Registry> {
        let state = SledState::open_in(data_dir)?;
        Ok(Registry::with_state(Arc::new(state), node_timeout))
    }

    /// The registry over `state` (any backend).
    pub fn with_state(state: Arc<dyn StateStore>, node_timeout: Duration) -> Registry {
        Registry {
            state,
            forecast_settings: Default::default(),
            fleet: FleetPolicy::default(),
            node_timeout,
            placement: Mutex::new(()),
            connections: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            progress: Mutex::new(HashMap::new()),
        }
    }

    /// Sets the fleet's `[policy]`.
    pub fn with_fleet_policy(mut self, fleet: FleetPolicy) -> Registry {
        self.fleet = fleet;
        self
    }

    /// The fleet's `[policy]`.
    pub fn fleet_policy(&self) -> &FleetPolicy {
        &self.fleet
    }

    /// The policy in force for `s`, and what of its agent's proposal was refused.
    pub fn effective(&self, s: &SourceRecord) -> crate::policy::Effective {
        crate::policy::effective(&self.fleet, s)
    }

    /// Bytes to plan for `s` on a node: its replica and recovery-point space.
    pub(super) fn planned_alloc(&self, s: &SourceRecord) -> u64 {
        let p = self.effective(s).policy;
        p.replica_alloc_bytes.saturating_add(p.points_alloc_bytes)
    }

    /// The state store under the registry (also holds enrollment tokens and the
    /// revocation list, in trees of their own).
    pub fn state(&self) -> &Arc<dyn StateStore> {
        &self.state
    }
}
