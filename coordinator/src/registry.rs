//! The coordinator's registry: nodes, agents and data sources in sled, placement of
//! new data sources, and the live control streams of connected agents.
//!
//! Records are JSON with a format version `v`. Every change that placement depends
//! on happens under one mutex, so two sources registered at once cannot both take the
//! last free space of a node.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bulwark_common::retention::Retention;

use crate::policy::{FleetPolicy, LockPolicy};
use bulwark_common::time::now_ms;
use bulwark_proto as pb;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

const FORMAT_VERSION: u32 = 1;

/// The most data sources one agent may register: a host's Hello cannot bloat the
/// registry (or the alerts) without bound.
pub const MAX_SOURCES_PER_AGENT: usize = 1024;

/// A registry operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry store: {0}")]
    Store(String),
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

impl From<sled::Error> for RegistryError {
    fn from(e: sled::Error) -> Self {
        RegistryError::Store(e.to_string())
    }
}

impl From<RegistryError> for Status {
    fn from(e: RegistryError) -> Status {
        match &e {
            RegistryError::Store(_) => {
                tracing::error!("{e}");
                Status::internal(e.to_string())
            }
            RegistryError::UnknownSource(_) | RegistryError::UnknownNode(_) => {
                Status::not_found(e.to_string())
            }
            RegistryError::NotOwner { .. } => Status::permission_denied(e.to_string()),
            RegistryError::Unassigned(..) | RegistryError::AgentOffline(_) => {
                Status::failed_precondition(e.to_string())
            }
            RegistryError::InvalidSource(..) => Status::invalid_argument(e.to_string()),
            RegistryError::Forbidden(_) => Status::permission_denied(e.to_string()),
            RegistryError::Locked(_) => Status::failed_precondition(e.to_string()),
        }
    }
}

type Result<T, E = RegistryError> = std::result::Result<T, E>;

mod admin;

/// A storage node as last reported.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRecord {
    pub v: u32,
    pub name: String,
    pub address: String,
    pub capacity_bytes: u64,
    pub allocated_bytes: u64,
    pub used_bytes: u64,
    pub live_streams: u32,
    pub last_seen_ms: i64,
    pub version: String,
    /// host:port of the node's NBD (TLS) listener; empty = none.
    #[serde(default)]
    pub nbd_address: String,
    /// Bytes per second the node applied recently (its heartbeat's figure).
    #[serde(default)]
    pub ingest_bytes_per_sec: u64,
    /// Being drained: gets no new sources, and its sources move off.
    #[serde(default)]
    pub draining: bool,
    /// The node's own word on its disks ("ok" or what is wrong).
    #[serde(default)]
    pub health: String,
    /// When the certificate it last reported with expires (0 = unknown).
    #[serde(default)]
    pub cert_not_after_ms: i64,
}

/// What the sources placed on one node add up to.
#[derive(Debug, Clone, Copy, Default)]
pub struct NodeLoad {
    pub sources: u32,
    pub allocated_bytes: u64,
}

/// An agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentRecord {
    pub v: u32,
    pub name: String,
    pub last_seen_ms: i64,
    pub version: String,
    pub sources: Vec<String>,
    /// When the certificate it last connected with expires (0 = unknown).
    #[serde(default)]
    pub cert_not_after_ms: i64,
}

/// A data source and its assignment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceRecord {
    pub v: u32,
    pub name: String,
    pub agent: String,
    pub kind: String,
    pub tracker: String,
    pub size_bytes: u64,
    pub block_size: u32,
    /// The node holding it; `None` until placed.
    pub node: Option<String>,
    /// Bumped whenever the assignment changes; the node refuses other epochs.
    pub epoch: u64,
    pub allocated_bytes: u64,
    pub state: String,
    pub error: String,
    pub last_point: u64,
    pub last_sync_ms: i64,
    pub created_ms: i64,
    /// The agent said its tracker's record cannot be trusted (a check is due).
    #[serde(default)]
    pub inconsistent: bool,
    /// The newest warning of a sync (a failed quiesce hook, ...); cleared by a clean one.
    #[serde(default)]
    pub warning: String,
    /// Space and retention the agent's config asks for (0 = default).
    #[serde(default)]
    pub agent_policy: Policy,
    /// Allocation set with `bulwark allocate` (0 = the agent's, else the default);
    /// it wins over the agent's config.
    #[serde(default)]
    pub admin_replica_alloc: u64,
    #[serde(default)]
    pub admin_points_alloc: u64,
    /// As the node last reported.
    #[serde(default)]
    pub usage: Usage,
    /// Why the source was placed where it is (`bulwark sources --explain`).
    #[serde(default)]
    pub placement: String,
    /// The node the source is being copied to (a move in progress), else empty.
    #[serde(default)]
    pub moving_to: String,
    /// Nodes that still hold a copy from before a move (dropped when they answer).
    #[serde(default)]
    pub stale_copies: Vec<String>,
    /// Its protection group (empty = none): the coordinator schedules its syncs.
    #[serde(default)]
    pub group: String,
    /// When its next scheduled sync is due (0 = not yet planned).
    #[serde(default)]
    pub next_sync_ms: i64,
    /// When it joined its group (late and missed syncs count from then).
    #[serde(default)]
    pub group_since_ms: i64,
    /// Its group's retention, which wins over the agent's config.
    #[serde(default)]
    pub group_retention: Option<Retention>,
    /// Its group's allocation (0 = none), between the admin's and the agent's.
    #[serde(default)]
    pub group_replica_alloc: u64,
    #[serde(default)]
    pub group_points_alloc: u64,
    /// When the scrub last verified the source, and what it found.
    #[serde(default)]
    pub last_verify_ms: i64,
    #[serde(default)]
    pub verify_result: String,
    /// Log sources in a group: when the group's oldest volume point was made (its
    /// logs from then on are kept; see `Policy.keep_after_ms`). 0 = none.
    #[serde(default)]
    pub keep_logs_after_ms: i64,
    /// Retention set by the admin (`bulwark retention`): the floor the agent's
    /// proposal can only lengthen (see [`crate::policy`]).
    #[serde(default)]
    pub admin_retention: Option<Retention>,
    /// The group the agent's config asks for (it joins only if the admin allows).
    #[serde(default)]
    pub claimed_group: String,
    /// The admin put the source in its group (`bulwark group add`), rather than
    /// the agent's claim under `bulwark group allow`.
    #[serde(default)]
    pub group_by_admin: bool,
    /// What of the agent's last proposal was refused (one line per key).
    #[serde(default)]
    pub policy_refused: Vec<String>,
    /// The agent's config has a retention table (else `agent_policy.retention`
    /// is no proposal at all).
    #[serde(default)]
    pub agent_proposes_retention: bool,
    /// The source's own retention lock (`bulwark lock SOURCE`); its group's is in
    /// `group_lock`. Nodes raise their own lock from these; the node's is the one
    /// that counts.
    #[serde(default)]
    pub admin_lock: Option<LockPolicy>,
    #[serde(default)]
    pub group_lock: Option<LockPolicy>,
}

/// What a source asks of its node; 0 = the default.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Policy {
    pub replica_alloc_bytes: u64,
    pub points_alloc_bytes: u64,
    pub retention: Retention,
    /// Log sources: see `Policy.keep_after_ms` in the proto.
    pub keep_after_ms: i64,
    /// The retention lock in force: the source's or its group's, the longer.
    pub lock: Option<LockPolicy>,
}

/// A source's space as its node reports it.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Usage {
    pub replica_alloc_bytes: u64,
    pub points_alloc_bytes: u64,
    pub points_used_bytes: u64,
    pub used_bytes: u64,
    pub points: u64,
    pub oldest_point_ms: i64,
}

impl SourceRecord {
    /// A new, unplaced source.
    pub fn new(
        name: &str,
        agent: &str,
        kind: &str,
        tracker: &str,
        size_bytes: u64,
        block_size: u32,
    ) -> SourceRecord {
        SourceRecord {
            v: FORMAT_VERSION,
            name: name.to_string(),
            agent: agent.to_string(),
            kind: kind.to_string(),
            tracker: tracker.to_string(),
            size_bytes,
            block_size,
            node: None,
            epoch: 0,
            allocated_bytes: 0,
            state: "ok".into(),
            error: String::new(),
            last_point: 0,
            last_sync_ms: 0,
            created_ms: now_ms(),
            inconsistent: false,
            warning: String::new(),
            agent_policy: Policy::default(),
            admin_replica_alloc: 0,
            admin_points_alloc: 0,
            usage: Usage::default(),
            last_verify_ms: 0,
            verify_result: String::new(),
            placement: String::new(),
            moving_to: String::new(),
            stale_copies: Vec::new(),
            group: String::new(),
            next_sync_ms: 0,
            keep_logs_after_ms: 0,
            group_since_ms: 0,
            group_retention: None,
            group_replica_alloc: 0,
            group_points_alloc: 0,
            admin_retention: None,
            claimed_group: String::new(),
            group_by_admin: false,
            policy_refused: Vec::new(),
            agent_proposes_retention: false,
            admin_lock: None,
            group_lock: None,
        }
    }
}

impl Policy {
    fn from_proto(p: Option<&pb::Policy>) -> Policy {
        p.map_or_else(Policy::default, |p| Policy {
            replica_alloc_bytes: p.replica_alloc_bytes,
            points_alloc_bytes: p.points_alloc_bytes,
            retention: Retention::from_proto(p.retention.as_ref()),
            keep_after_ms: p.keep_after_ms,
            // Locks are the admin's; an agent's config does not propose one.
            lock: None,
        })
    }

    fn to_proto(self) -> pb::Policy {
        pb::Policy {
            replica_alloc_bytes: self.replica_alloc_bytes,
            points_alloc_bytes: self.points_alloc_bytes,
            retention: Some(self.retention.to_proto()),
            keep_after_ms: self.keep_after_ms,
            lock: self.lock.map(|l| LockPolicy::to_proto(Some(l))),
        }
    }
}

/// A protection group as the coordinator keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupRecord {
    pub v: u32,
    pub name: String,
    pub interval_ms: u64,
    /// `None`: sources keep the retention of their agent's config.
    pub retention: Option<Retention>,
    /// Recovery-point times: minutes after midnight (UTC) with a sync each day.
    #[serde(default)]
    pub point_times: Vec<u32>,
    /// Allocation of each member (0 = not set by the group).
    #[serde(default)]
    pub replica_alloc_bytes: u64,
    #[serde(default)]
    pub points_alloc_bytes: u64,
    /// Agent name patterns whose sources may join from their config
    /// (`bulwark group allow`).
    #[serde(default)]
    pub allow: Vec<String>,
    /// The group's retention lock (`bulwark lock --group`).
    #[serde(default)]
    pub lock: Option<LockPolicy>,
}

/// An alert as the coordinator keeps it (see `pb::Alert`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AlertRecord {
    pub v: u32,
    pub key: String,
    pub severity: String,
    pub subject: String,
    pub message: String,
    pub origin: String,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub resolved_ms: i64,
}

impl AlertRecord {
    /// To the wire.
    pub fn to_proto(&self) -> pb::Alert {
        pb::Alert {
            key: self.key.clone(),
            severity: self.severity.clone(),
            subject: self.subject.clone(),
            message: self.message.clone(),
            first_seen_ms: self.first_seen_ms,
            last_seen_ms: self.last_seen_ms,
            resolved: self.resolved_ms != 0,
            origin: self.origin.clone(),
            resolved_ms: self.resolved_ms,
        }
    }
}

/// Outcome of a command an agent ran.
pub type CommandOutcome = std::result::Result<pb::command_result::Outcome, String>;

struct Connection {
    id: u64,
    tx: mpsc::Sender<Result<pb::CoordinatorCommand, Status>>,
}

/// The registry.
pub struct Registry {
    db: sled::Db,
    nodes: sled::Tree,
    agents: sled::Tree,
    sources: sled::Tree,
    alerts: sled::Tree,
    groups: sled::Tree,
    quotas: sled::Tree,
    /// `[policy]` of coordinator.toml.
    fleet: FleetPolicy,
    node_timeout: Duration,
    placement: Mutex<()>,
    connections: Mutex<HashMap<String, Connection>>,
    pending: Mutex<HashMap<u64, (String, oneshot::Sender<CommandOutcome>)>>,
    next_id: AtomicU64,
    /// The latest progress each running operation reported, by source (memory only).
    progress: Mutex<HashMap<String, (pb::OpProgress, std::time::Instant)>>,
}

fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| RegistryError::Store(e.to_string()))
}

fn dec<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| RegistryError::Store(format!("unreadable record: {e}")))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    /// Opens the registry in `data_dir`.
    pub fn open(data_dir: &std::path::Path, node_timeout: Duration) -> Result<Registry> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| RegistryError::Store(format!("{}: {e}", data_dir.display())))?;
        let db = sled::Config::new()
            .path(data_dir.join("registry"))
            .cache_capacity(16 * 1024 * 1024)
            .open()
            .map_err(|e| {
                RegistryError::Store(format!(
                    "cannot open {}: {e}",
                    data_dir.join("registry").display()
                ))
            })?;
        Ok(Registry {
            nodes: db.open_tree("nodes")?,
            agents: db.open_tree("agents")?,
            sources: db.open_tree("sources")?,
            alerts: db.open_tree("alerts")?,
            groups: db.open_tree("groups")?,
            quotas: db.open_tree("quotas")?,
            fleet: FleetPolicy::default(),
            db,
            node_timeout,
            placement: Mutex::new(()),
            connections: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            progress: Mutex::new(HashMap::new()),
        })
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
    fn planned_alloc(&self, s: &SourceRecord) -> u64 {
        let p = self.effective(s).policy;
        p.replica_alloc_bytes.saturating_add(p.points_alloc_bytes)
    }

    /// Another tree of the registry's database (enrollment tokens).
    pub fn tree(&self, name: &str) -> Result<sled::Tree> {
        Ok(self.db.open_tree(name)?)
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    /// Whether a node is up (reported within the node timeout).
    pub fn node_up(&self, n: &NodeRecord) -> bool {
        now_ms() - n.last_seen_ms <= self.node_timeout.as_millis() as i64
    }

    /// Every node, by name.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>> {
        self.nodes.iter().map(|r| dec(&r?.1)).collect()
    }

    /// One node.
    pub fn node(&self, name: &str) -> Result<Option<NodeRecord>> {
        self.nodes.get(name)?.map(|v| dec(&v)).transpose()
    }

    /// Every agent, by name.
    pub fn agents(&self) -> Result<Vec<AgentRecord>> {
        self.agents.iter().map(|r| dec(&r?.1)).collect()
    }

    /// Every data source, by name.
    pub fn sources(&self) -> Result<Vec<SourceRecord>> {
        self.sources.iter().map(|r| dec(&r?.1)).collect()
    }

    /// One data source.
    pub fn source(&self, name: &str) -> Result<SourceRecord> {
        self.sources
            .get(name)?
            .map(|v| dec(&v))
            .transpose()?
            .ok_or_else(|| RegistryError::UnknownSource(name.to_string()))
    }

    fn put_source(&self, s: &SourceRecord) -> Result<()> {
        self.sources.insert(s.name.as_bytes(), enc(s)?)?;
        Ok(())
    }

    /// Records a node's registration.
    pub fn register_node(&self, name: &str, req: &pb::RegisterNodeRequest) -> Result<()> {
        let _g = lock(&self.placement);
        let mut rec = self.node(name)?.unwrap_or(NodeRecord {
            v: FORMAT_VERSION,
            name: name.to_string(),
            address: String::new(),
            capacity_bytes: 0,
            allocated_bytes: 0,
            used_bytes: 0,
            live_streams: 0,
            last_seen_ms: 0,
            version: String::new(),
            nbd_address: String::new(),
            ingest_bytes_per_sec: 0,
            draining: false,
            health: String::new(),
            cert_not_after_ms: 0,
        });
        rec.address = req.address.clone();
        rec.capacity_bytes = req.capacity_bytes;
        rec.version = req.version.clone();
        rec.last_seen_ms = now_ms();
        self.nodes.insert(name.as_bytes(), enc(&rec)?)?;
        self.db.flush()?;
        tracing::info!(node = name, address = %req.address, capacity = req.capacity_bytes, "node registered");
        Ok(())
    }

    /// Records a heartbeat; `None` if the node never registered.
    pub fn heartbeat(&self, name: &str, hb: &pb::NodeHeartbeatRequest) -> Result<Option<()>> {
        let _g = lock(&self.placement);
        let Some(mut rec) = self.node(name)? else {
            return Ok(None);
        };
        if !self.node_up(&rec) {
            tracing::info!(node = name, "node is up again");
        }
        rec.capacity_bytes = hb.capacity_bytes;
        rec.allocated_bytes = hb.allocated_bytes;
        rec.used_bytes = hb.used_bytes;
        rec.live_streams = hb.live_streams;
        rec.ingest_bytes_per_sec = hb.ingest_bytes_per_sec;
        rec.health = hb.health.clone();
        rec.last_seen_ms = now_ms();
        rec.nbd_address = hb.nbd_address.clone();
        self.nodes.insert(name.as_bytes(), enc(&rec)?)?;
        // Whether a grouped volume's oldest point moved (then the log floors may).
        let mut floors_moved = false;
        for u in &hb.sources {
            if let Ok(mut s) = self.source(&u.source)
                && s.node.as_deref() == Some(name)
            {
                let usage = Usage {
                    replica_alloc_bytes: u.replica_alloc_bytes,
                    points_alloc_bytes: u.points_alloc_bytes,
                    points_used_bytes: u.points_used_bytes,
                    used_bytes: u.used_bytes,
                    points: u.points,
                    oldest_point_ms: u.oldest_point_ms,
                };
                if s.last_point != u.newest_point
                    || s.usage != usage
                    || s.allocated_bytes != u.allocated_bytes
                {
                    floors_moved |= s.kind == "volume"
                        && !s.group.is_empty()
                        && s.usage.oldest_point_ms != usage.oldest_point_ms;
                    s.last_point = u.newest_point;
                    s.usage = usage;
                    s.allocated_bytes = u.allocated_bytes;
                    self.put_source(&s)?;
                }
            }
        }
        self.report_alerts(name, &hb.alerts)?;
        if floors_moved {
            self.update_log_floors()?;
        }
        Ok(Some(()))
    }

    /// Sets each grouped log source's `keep_logs_after_ms` to the time of its
    /// group's oldest volume point, so that retention keeps the logs that point
    /// needs to be replayed to any later moment.
    fn update_log_floors(&self) -> Result<()> {
        let sources = self.sources()?;
        for s in sources.iter().filter(|s| s.kind == "log") {
            let floor = sources
                .iter()
                .filter(|v| v.kind == "volume" && v.usage.oldest_point_ms > 0 && paired(v, s))
                .map(|v| v.usage.oldest_point_ms)
                .min()
                .unwrap_or(0);
            if s.keep_logs_after_ms != floor {
                let mut s = s.clone();
                s.keep_logs_after_ms = floor;
                self.put_source(&s)?;
            }
        }
        Ok(())
    }

    /// Takes the full list of conditions `origin` raises now: new ones are opened,
    /// standing ones refreshed, and open ones it no longer lists are resolved.
    pub fn report_alerts(&self, origin: &str, alerts: &[pb::Alert]) -> Result<()> {
        let now = now_ms();
        let mut listed = std::collections::HashSet::new();
        for a in alerts {
            listed.insert(a.key.clone());
            let existing: Option<AlertRecord> =
                self.alerts.get(&a.key)?.map(|v| dec(&v)).transpose()?;
            let rec = match existing {
                Some(mut r) if r.resolved_ms == 0 => {
                    r.last_seen_ms = now;
                    r.message = a.message.clone();
                    r.severity = a.severity.clone();
                    r
                }
                _ => {
                    tracing::warn!(alert = %a.key, severity = %a.severity, subject = %a.subject, "{}", a.message);
                    AlertRecord {
                        v: FORMAT_VERSION,
                        key: a.key.clone(),
                        severity: a.severity.clone(),
                        subject: a.subject.clone(),
                        message: a.message.clone(),
                        origin: origin.to_string(),
                        first_seen_ms: now,
                        last_seen_ms: now,
                        resolved_ms: 0,
                    }
                }
            };
            self.alerts.insert(a.key.as_bytes(), enc(&rec)?)?;
        }
        let mut open: HashMap<String, u64> = HashMap::new();
        for item in self.alerts.iter() {
            let (k, v) = item?;
            let mut r: AlertRecord = dec(&v)?;
            if r.origin == origin && r.resolved_ms == 0 && !listed.contains(&r.key) {
                r.resolved_ms = now;
                tracing::info!(alert = %r.key, "alert resolved");
                self.alerts.insert(k, enc(&r)?)?;
            }
            if r.resolved_ms == 0 {
                *open.entry(r.severity.clone()).or_default() += 1;
            }
        }
        for severity in ["warning", "critical"] {
            let n = open.get(severity).copied().unwrap_or(0);
            bulwark_common::metrics::gauge_set(
                "bulwark_alerts_active",
                &[("severity", severity)],
                n as f64,
            );
        }
        Ok(())
    }

    /// Alerts, open ones first, then (with `all`) resolved ones; newest first.
    pub fn alerts(&self, all: bool) -> Result<Vec<AlertRecord>> {
        let mut out: Vec<AlertRecord> = self
            .alerts
            .iter()
            .map(|r| dec(&r?.1))
            .collect::<Result<Vec<AlertRecord>>>()?
            .into_iter()
            .filter(|a| all || a.resolved_ms == 0)
            .collect();
        out.sort_by(|a, b| {
            (a.resolved_ms != 0)
                .cmp(&(b.resolved_ms != 0))
                .then(b.last_seen_ms.cmp(&a.last_seen_ms))
        });
        Ok(out)
    }

    /// A protection group.
    pub fn group(&self, name: &str) -> Result<Option<GroupRecord>> {
        if name.is_empty() {
            return Ok(None);
        }
        self.groups.get(name)?.map(|v| dec(&v)).transpose()
    }

    /// Every protection group.
    pub fn groups(&self) -> Result<Vec<GroupRecord>> {
        self.groups.iter().map(|r| dec(&r?.1)).collect()
    }

    /// Creates or changes a group; its members take its retention.
    pub fn put_group(&self, g: GroupRecord) -> Result<GroupRecord> {
        let _lock = lock(&self.placement);
        if !bulwark_common::pki::valid_name(&g.name) {
            return Err(RegistryError::InvalidSource(
                g.name.clone(),
                "invalid group name".into(),
            ));
        }
        if g.interval_ms < 1000 {
            return Err(RegistryError::InvalidSource(
                g.name.clone(),
                "a group's interval must be at least 1s".into(),
            ));
        }
        let old = self.group(&g.name)?;
        let mut g = g;
        if let Some(o) = &old {
            // Patterns are set with `bulwark group allow`, and the lock with
            // `bulwark lock --group`, not with the group.
            g.allow = o.allow.clone();
            g.lock = o.lock;
        }
        self.groups.insert(g.name.as_bytes(), enc(&g)?)?;
        for mut s in self.sources()?.into_iter().filter(|s| s.group == g.name) {
            s.group_retention = g.retention;
            s.group_replica_alloc = g.replica_alloc_bytes;
            s.group_points_alloc = g.points_alloc_bytes;
            s.group_lock = g.lock;
            if old.as_ref().is_some_and(|o| o.interval_ms != g.interval_ms) {
                s.next_sync_ms = 0;
            }
            self.put_source(&s)?;
        }
        self.db.flush()?;
        Ok(g)
    }

    /// Deletes a group with no sources.
    pub fn delete_group(&self, name: &str) -> Result<()> {
        let _lock = lock(&self.placement);
        let members: Vec<String> = self
            .sources()?
            .into_iter()
            .filter(|s| s.group == name)
            .map(|s| s.name)
            .collect();
        if !members.is_empty() {
            return Err(RegistryError::InvalidSource(
                name.to_string(),
                format!("the group still has sources: {}", members.join(", ")),
            ));
        }
        if self.groups.remove(name)?.is_none() {
            return Err(RegistryError::InvalidSource(
                name.to_string(),
                "no such group".into(),
            ));
        }
        self.db.flush()?;
        Ok(())
    }

    /// Puts sources in `group` (empty: out of any group).
    pub fn set_group(&self, group: &str, sources: &[String]) -> Result<()> {
        let _lock = lock(&self.placement);
        let g = if group.is_empty() {
            None
        } else {
            Some(self.group(group)?.ok_or_else(|| {
                RegistryError::InvalidSource(group.to_string(), "no such group".into())
            })?)
        };
        for name in sources {
            let mut s = self.source(name)?;
            s.group = group.to_string();
            s.group_by_admin = !group.is_empty();
            s.group_retention = g.as_ref().and_then(|g| g.retention);
            s.group_replica_alloc = g.as_ref().map_or(0, |g| g.replica_alloc_bytes);
            s.group_points_alloc = g.as_ref().map_or(0, |g| g.points_alloc_bytes);
            s.group_lock = g.as_ref().and_then(|g| g.lock);
            s.next_sync_ms = 0;
            s.group_since_ms = now_ms();
            self.put_source(&s)?;
        }
        self.update_log_floors()?;
        self.db.flush()?;
        Ok(())
    }

    /// Sets when a source's next scheduled sync is due.
    pub fn set_next_sync(&self, source: &str, at_ms: i64) -> Result<()> {
        let _lock = lock(&self.placement);
        let mut s = self.source(source)?;
        s.next_sync_ms = at_ms;
        self.put_source(&s)
    }

    /// Marks a node draining (or not).
    pub fn set_draining(&self, node: &str, draining: bool) -> Result<NodeRecord> {
        let _g = lock(&self.placement);
        let mut n = self
            .node(node)?
            .ok_or_else(|| RegistryError::UnknownNode(node.to_string()))?;
        n.draining = draining;
        self.nodes.insert(node.as_bytes(), enc(&n)?)?;
        self.db.flush()?;
        Ok(n)
    }

    /// Starts a move of `source` to `to`: from now on syncs wait and the node it is
    /// on lets `to` copy it. Durable before it returns.
    pub fn begin_move(&self, source: &str, to: &str) -> Result<SourceRecord> {
        let _g = lock(&self.placement);
        let mut s = self.source(source)?;
        if !s.moving_to.is_empty() {
            return Err(RegistryError::InvalidSource(
                source.to_string(),
                format!("it is already moving to {}", s.moving_to),
            ));
        }
        s.moving_to = to.to_string();
        s.state = "moving".into();
        self.put_source(&s)?;
        self.db.flush()?;
        Ok(s)
    }

    /// Switches `source` to the node it was copied to, with a new epoch (the old
    /// node refuses the old one from now on); the old node's copy is to be dropped.
    pub fn finish_move(&self, source: &str) -> Result<SourceRecord> {
        let _g = lock(&self.placement);
        let mut s = self.source(source)?;
        if s.moving_to.is_empty() {
            return Err(RegistryError::InvalidSource(
                source.to_string(),
                "no move is in progress".into(),
            ));
        }
        if let Some(old) = s.node.take() {
            s.stale_copies.push(old);
        }
        s.node = Some(std::mem::take(&mut s.moving_to));
        s.epoch += 1;
        s.state = "ok".into();
        s.usage = Usage::default();
        self.put_source(&s)?;
        self.db.flush()?;
        Ok(s)
    }

    /// Ends a move that did not finish: the source stays where it was; returns the
    /// node that may hold a partial copy.
    pub fn abort_move(&self, source: &str) -> Result<String> {
        let _g = lock(&self.placement);
        let mut s = self.source(source)?;
        let to = std::mem::take(&mut s.moving_to);
        if !to.is_empty() && !s.stale_copies.contains(&to) {
            s.stale_copies.push(to.clone());
        }
        s.state = "ok".into();
        self.put_source(&s)?;
        self.db.flush()?;
        Ok(to)
    }

    /// A node no longer holds a stale copy of `source`.
    pub fn copy_dropped(&self, source: &str, node: &str) -> Result<()> {
        let _g = lock(&self.placement);
        let mut s = self.source(source)?;
        s.stale_copies.retain(|n| n != node);
        self.put_source(&s)?;
        Ok(())
    }

    /// Records what a verify of `source` found.
    pub fn verified(&self, source: &str, result: String) -> Result<()> {
        let _g = lock(&self.placement);
        let mut s = self.source(source)?;
        s.last_verify_ms = now_ms();
        s.verify_result = result;
        self.put_source(&s)
    }

    /// The source the scrub should verify next: placed, with a point, and not
    /// verified for `interval`; the longest unverified first. A new source counts
    /// as verified when it was created: its node checked every block of its first
    /// sync as it arrived, and re-reading it at once would only compete with the
    /// syncs of the first minutes.
    pub fn due_for_scrub(&self, interval: Duration) -> Result<Option<String>> {
        let cutoff = now_ms() - interval.as_millis() as i64;
        let verified = |s: &SourceRecord| s.last_verify_ms.max(s.created_ms);
        Ok(self
            .sources()?
            .into_iter()
            .filter(|s| s.node.is_some() && s.last_point > 0 && verified(s) <= cutoff)
            .min_by_key(verified)
            .map(|s| s.name))
    }

    /// Sets a source's allocation (`bulwark allocate`); 0 leaves a part as it is.
    /// Refused when the source's node has no unallocated room for the growth.
    pub fn allocate(&self, source: &str, replica: u64, points: u64) -> Result<SourceRecord> {
        let _g = lock(&self.placement);
        let mut s = self.source(source)?;
        let geometry_min = crate::policy::min_replica_bytes(s.size_bytes, s.block_size);
        if replica > 0 && replica < geometry_min {
            return Err(RegistryError::InvalidSource(
                source.to_string(),
                format!(
                    "replica space {} is less than the volume and its checksums need ({})",
                    bulwark_common::config::format_size(replica),
                    bulwark_common::config::format_size(geometry_min)
                ),
            ));
        }
        let current = if s.usage.replica_alloc_bytes > 0 || s.usage.points_alloc_bytes > 0 {
            (s.usage.replica_alloc_bytes, s.usage.points_alloc_bytes)
        } else {
            let p = self.effective(&s).policy;
            (p.replica_alloc_bytes, p.points_alloc_bytes)
        };
        let new_total = if replica > 0 { replica } else { current.0 }
            .saturating_add(if points > 0 { points } else { current.1 });
        let old_total = current.0.saturating_add(current.1);
        if new_total > old_total
            && let Some(node) = s
                .node
                .as_deref()
                .map(|n| self.node(n))
                .transpose()?
                .flatten()
        {
            let loads = self.node_loads()?;
            let allocated = loads.get(&node.name).map_or(0, |l| l.allocated_bytes);
            let free = node.capacity_bytes.saturating_sub(allocated);
            if new_total - old_total > free {
                return Err(RegistryError::InvalidSource(
                    source.to_string(),
                    format!(
                        "node {} has {} unallocated; growing the allocation by {} does not fit",
                        node.name,
                        bulwark_common::config::format_size(free),
                        bulwark_common::config::format_size(new_total - old_total)
                    ),
                ));
            }
        }
        if replica > 0 {
            s.admin_replica_alloc = replica;
        }
        if points > 0 {
            s.admin_points_alloc = points;
        }
        s.allocated_bytes = new_total;
        self.put_source(&s)?;
        self.db.flush()?;
        tracing::info!(
            source,
            replica_alloc_bytes = replica,
            points_alloc_bytes = points,
            "allocation set"
        );
        Ok(s)
    }

    /// Assignments of the sources on `node`.
    pub fn assignments_of(&self, node: &str) -> Result<Vec<pb::Assignment>> {
        let addr = self.node(node)?.map(|n| n.address).unwrap_or_default();
        Ok(self
            .sources()?
            .into_iter()
            .filter(|s| s.node.as_deref() == Some(node))
            .map(|s| self.assignment_proto(&s, node, &addr))
            .collect())
    }

    /// Per node: how many sources it holds and the bytes allocated to them. The
    /// allocation is the larger of the coordinator's sum and the node's own report.
    pub fn node_loads(&self) -> Result<HashMap<String, NodeLoad>> {
        let mut m: HashMap<String, NodeLoad> = HashMap::new();
        for s in self.sources()? {
            if let Some(n) = s.node {
                let load = m.entry(n).or_default();
                load.sources += 1;
                load.allocated_bytes += s.allocated_bytes;
            }
        }
        for n in self.nodes()? {
            let load = m.entry(n.name).or_default();
            load.allocated_bytes = load.allocated_bytes.max(n.allocated_bytes);
        }
        Ok(m)
    }

    /// The nodes as placement sees them (see [`crate::placement`]).
    pub fn node_figures(&self) -> Result<Vec<crate::placement::NodeFigures>> {
        let loads = self.node_loads()?;
        Ok(self
            .nodes()?
            .into_iter()
            .map(|n| {
                let load = loads.get(&n.name).copied().unwrap_or_default();
                crate::placement::NodeFigures {
                    // A draining node counts as down: nothing new goes there, and a
                    // rebalance moves its sources off.
                    up: self.node_up(&n) && !n.draining,
                    capacity_bytes: n.capacity_bytes,
                    allocated_bytes: load.allocated_bytes,
                    sources: load.sources,
                    live_streams: n.live_streams,
                    ingest_bytes_per_sec: n.ingest_bytes_per_sec,
                    name: n.name,
                }
            })
            .collect())
    }

    /// Picks a node for a source that needs `need` bytes (see [`crate::placement`]);
    /// returns it or why none fits, and the decision explained. Call under
    /// `placement`.
    fn choose_node(&self, need: u64) -> Result<(Option<String>, String)> {
        let nodes = self.node_figures()?;
        if nodes.is_empty() {
            return Ok((None, "no storage node has registered".into()));
        }
        let d = crate::placement::choose(&nodes, need, crate::placement::Weights::default());
        Ok((d.chosen.map(|i| nodes[i].name.clone()), d.explain()))
    }

    /// Records when the certificate a node or agent presented expires.
    pub fn saw_certificate(
        &self,
        role: bulwark_common::tls::Role,
        name: &str,
        not_after_ms: i64,
    ) -> Result<()> {
        let _g = lock(&self.placement);
        match role {
            bulwark_common::tls::Role::Node => {
                if let Some(mut n) = self.node(name)?
                    && n.cert_not_after_ms != not_after_ms
                {
                    n.cert_not_after_ms = not_after_ms;
                    self.nodes.insert(name.as_bytes(), enc(&n)?)?;
                }
            }
            bulwark_common::tls::Role::Agent => {
                if let Some(v) = self.agents.get(name)? {
                    let mut a: AgentRecord = dec(&v)?;
                    if a.cert_not_after_ms != not_after_ms {
                        a.cert_not_after_ms = not_after_ms;
                        self.agents.insert(name.as_bytes(), enc(&a)?)?;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Registers an agent's data sources (its Hello) and places the new ones.
    pub fn hello(&self, agent: &str, hello: &pb::Hello) -> Result<Vec<pb::SourceRegistration>> {
        let _g = lock(&self.placement);
        let mut out = Vec::new();
        let mut names = Vec::new();
        let mut refusals = Vec::new();
        for spec in &hello.sources {
            let reg = match self.register_source(agent, spec) {
                Ok(a) => {
                    names.push(spec.name.clone());
                    let error = match &a {
                        Some(_) => String::new(),
                        None => self.source(&spec.name).map(|s| s.error).unwrap_or_default(),
                    };
                    pb::SourceRegistration {
                        source: spec.name.clone(),
                        assignment: a,
                        error,
                    }
                }
                Err(e) => {
                    let shown = bulwark_common::text::escape_short(&spec.name, 80);
                    tracing::warn!(agent, source = %shown, "source not registered: {e}");
                    refusals.push(pb::Alert {
                        key: format!("source-refused/{agent}/{}", blake3_key(&spec.name)),
                        severity: "warning".into(),
                        subject: agent.to_string(),
                        message: format!(
                            "agent {agent} registers a data source that is refused: {e}"
                        ),
                        ..Default::default()
                    });
                    pb::SourceRegistration {
                        source: spec.name.clone(),
                        assignment: None,
                        error: e.to_string(),
                    }
                }
            };
            out.push(reg);
        }
        let rec = AgentRecord {
            v: FORMAT_VERSION,
            name: agent.to_string(),
            last_seen_ms: now_ms(),
            version: hello.version.clone(),
            sources: names,
            cert_not_after_ms: self
                .agents
                .get(agent)?
                .and_then(|v| dec::<AgentRecord>(&v).ok())
                .map_or(0, |a| a.cert_not_after_ms),
        };
        self.agents.insert(agent.as_bytes(), enc(&rec)?)?;
        self.report_alerts(&format!("hello/{agent}"), &refusals)?;
        self.refresh_policy_alerts(agent)?;
        // Sources may have joined groups (a log source then keeps its group's logs).
        self.update_log_floors()?;
        self.db.flush()?;
        Ok(out)
    }

    /// Raises (and resolves) the alerts of what the admin's policy refused of
    /// `agent`'s proposals: retention and space keys, and group claims.
    pub fn refresh_policy_alerts(&self, agent: &str) -> Result<()> {
        let mut alerts = Vec::new();
        for s in self.sources()?.into_iter().filter(|s| s.agent == agent) {
            for why in &self.effective(&s).refused {
                let key = why.split(':').next().unwrap_or("policy");
                alerts.push(pb::Alert {
                    key: format!("policy-refused/{}/{key}", s.name),
                    severity: "warning".into(),
                    subject: s.name.clone(),
                    message: format!(
                        "agent {agent}'s config proposes for {}: {why}; the admin's value applies and no point is lost",
                        s.name
                    ),
                    ..Default::default()
                });
            }
            if !s.claimed_group.is_empty() && s.claimed_group != s.group {
                alerts.push(pb::Alert {
                    key: format!("group-refused/{}", s.name),
                    severity: "warning".into(),
                    subject: s.name.clone(),
                    message: format!(
                        "agent {agent}'s config puts {} in group {}, which the admin has not allowed: `bulwark group add {} {}` or `bulwark group allow {} {agent}`",
                        s.name, s.claimed_group, s.claimed_group, s.name, s.claimed_group
                    ),
                    ..Default::default()
                });
            }
        }
        self.report_alerts(&format!("policy/{agent}"), &alerts)
    }

    fn register_source(
        &self,
        agent: &str,
        spec: &pb::SourceSpec,
    ) -> Result<Option<pb::Assignment>> {
        let invalid = |why: String| {
            RegistryError::InvalidSource(bulwark_common::text::escape_short(&spec.name, 80), why)
        };
        bulwark_common::name::SourceName::parse(spec.name.as_str()).map_err(|e| invalid(e.why))?;
        let geometry = bulwark_common::block::Geometry::new(spec.size_bytes, spec.block_size)
            .map_err(|e| invalid(e.to_string()))?;
        let kind = match pb::SourceKind::try_from(spec.kind) {
            Ok(pb::SourceKind::Volume) => "volume",
            Ok(pb::SourceKind::Log) => "log",
            _ => return Err(invalid("unknown kind".into())),
        };
        if spec.tracker.len() > 64 {
            return Err(invalid("its tracker name is over 64 bytes".into()));
        }
        let claimed_group = if spec.group.is_empty() {
            String::new()
        } else {
            bulwark_common::name::GroupName::parse(spec.group.as_str())
                .map_err(|e| invalid(e.to_string()))?
                .into_string()
        };
        let mut rec = match self.source(&spec.name) {
            Ok(existing) if existing.state == "removing" => {
                return Err(invalid("the admin is removing it".into()));
            }
            Ok(existing) => {
                if existing.agent != agent {
                    return Err(RegistryError::NotOwner {
                        source_name: spec.name.clone(),
                        owner: existing.agent,
                        agent: agent.to_string(),
                    });
                }
                if existing.size_bytes != spec.size_bytes || existing.block_size != spec.block_size
                {
                    return Err(invalid(format!(
                        "it was registered as {} bytes in blocks of {}, now it is {} bytes in blocks of {}; resizing is not supported",
                        existing.size_bytes, existing.block_size, spec.size_bytes, spec.block_size
                    )));
                }
                existing
            }
            Err(RegistryError::UnknownSource(_)) => {
                let rec = SourceRecord::new(
                    &spec.name,
                    agent,
                    kind,
                    &spec.tracker,
                    geometry.size_bytes,
                    geometry.block_size,
                );
                // The quota, before anything is placed or allocated.
                let mut fresh = rec.clone();
                fresh.agent_policy = Policy::from_proto(spec.policy.as_ref());
                let need = self.planned_alloc(&fresh);
                let mine: Vec<SourceRecord> = self
                    .sources()?
                    .into_iter()
                    .filter(|s| s.agent == agent)
                    .collect();
                if mine.len() >= MAX_SOURCES_PER_AGENT {
                    return Err(invalid(format!(
                        "agent {agent} has {} data sources already, the most one agent may have",
                        mine.len()
                    )));
                }
                let others = mine
                    .iter()
                    .fold(0u64, |n, s| n.saturating_add(s.allocated_bytes));
                crate::policy::check_quota(
                    &self.quota_of(agent)?,
                    agent,
                    spec.size_bytes,
                    need,
                    others,
                )
                .map_err(invalid)?;
                // A source no node could ever hold is refused, not kept waiting.
                let largest = self.nodes()?.iter().map(|n| n.capacity_bytes).max();
                if let Some(largest) = largest.filter(|l| *l > 0)
                    && need > largest
                {
                    return Err(invalid(format!(
                        "it needs {} of space, more than the largest storage node holds ({})",
                        bulwark_common::config::format_size(need),
                        bulwark_common::config::format_size(largest)
                    )));
                }
                rec
            }
            Err(e) => return Err(e),
        };
        rec.tracker = spec.tracker.clone();
        rec.inconsistent = spec.inconsistent;
        if rec.state == "syncing" && !spec.busy {
            // The agent is back and runs no sync of it: the one shown as running
            // ended without its report reaching us (the agent was killed, or its
            // stream broke just then). Whether the node committed a point from it
            // is the node's to say (`bulwark points`).
            rec.state = "error".into();
            rec.error = format!(
                "the last sync's outcome is unknown: agent {agent} restarted or reconnected before reporting it{}",
                if spec.inconsistent {
                    "; the agent lost its record of changes, so the next sync is a consistency check"
                } else {
                    ""
                }
            );
            lock(&self.progress).remove(&spec.name);
        }
        rec.agent_policy = Policy::from_proto(spec.policy.as_ref());
        rec.agent_proposes_retention = spec.policy.as_ref().is_some_and(|p| p.retention.is_some());
        rec.claimed_group = claimed_group;
        self.apply_group_claim(&mut rec)?;
        if let Some(g) = self.group(&rec.group)? {
            rec.group_retention = g.retention;
            rec.group_replica_alloc = g.replica_alloc_bytes;
            rec.group_points_alloc = g.points_alloc_bytes;
            rec.group_lock = g.lock;
        }
        rec.policy_refused = self.effective(&rec).refused;
        if rec.node.is_none() || rec.allocated_bytes == 0 {
            rec.allocated_bytes = self.planned_alloc(&rec);
        }
        let assignment = self.place_locked(&mut rec)?;
        self.put_source(&rec)?;
        Ok(assignment)
    }

    /// Puts `rec` in the group its agent's config claims, when the admin allows it
    /// (`bulwark group allow`); a claim the admin did not allow leaves the source
    /// where the admin put it, and is reported with the policy refusals.
    fn apply_group_claim(&self, rec: &mut SourceRecord) -> Result<()> {
        let claim = rec.claimed_group.clone();
        if claim.is_empty() || claim == rec.group {
            return Ok(());
        }
        match self.group(&claim)? {
            Some(g) if crate::policy::group_allows(&g, &rec.agent) && !rec.group_by_admin => {
                tracing::info!(source = %rec.name, group = %claim, agent = %rec.agent, "source joins the group its agent asked for (allowed by the admin)");
                rec.group = claim;
                rec.group_by_admin = false;
                rec.next_sync_ms = 0;
                rec.group_since_ms = now_ms();
            }
            _ => {}
        }
        Ok(())
    }

    /// Places `rec` if it has no node; returns its assignment if it has one.
    fn place_locked(&self, rec: &mut SourceRecord) -> Result<Option<pb::Assignment>> {
        if rec.node.is_none() {
            let (chosen, why) = self.choose_node(rec.allocated_bytes)?;
            rec.placement = why.clone();
            match chosen {
                Some(n) => {
                    tracing::info!(source = %rec.name, node = %n, "data source placed: {why}");
                    rec.node = Some(n);
                    rec.epoch += 1;
                    if rec.state == "error" {
                        rec.state = "ok".into();
                    }
                    rec.error.clear();
                }
                None => {
                    rec.state = "error".into();
                    rec.error = why;
                    return Ok(None);
                }
            }
        }
        let node = rec.node.clone().unwrap_or_default();
        let addr = self.node(&node)?.map(|n| n.address).unwrap_or_default();
        Ok(Some(self.assignment_proto(rec, &node, &addr)))
    }

    /// The assignment of `source`, placing it now if needed.
    pub fn assignment(&self, source: &str) -> Result<pb::Assignment> {
        let _g = lock(&self.placement);
        let mut rec = self.source(source)?;
        if rec.state == "removing" {
            return Err(RegistryError::UnknownSource(source.to_string()));
        }
        let a = self.place_locked(&mut rec)?;
        self.put_source(&rec)?;
        a.ok_or_else(|| RegistryError::Unassigned(source.to_string(), rec.error.clone()))
    }

    /// Keeps an agent's progress report of one of its own sources.
    pub fn progress(&self, agent: &str, p: pb::OpProgress) {
        if self.source(&p.source).is_ok_and(|s| s.agent == agent) {
            lock(&self.progress).insert(p.source.clone(), (p, std::time::Instant::now()));
        }
    }

    /// The progress of the operation running on `source`, if one reported lately.
    pub fn current_progress(&self, source: &str) -> Option<pb::OpProgress> {
        let mut map = lock(&self.progress);
        match map.get(source) {
            Some((p, at)) if at.elapsed() < Duration::from_secs(5) => Some(p.clone()),
            Some(_) => {
                map.remove(source);
                None
            }
            None => None,
        }
    }

    /// Records what an agent said about a sync.
    pub fn sync_report(&self, agent: &str, r: &pb::SyncReport) -> Result<()> {
        let _g = lock(&self.placement);
        let mut s = self.source(&r.source)?;
        if s.agent != agent {
            return Err(RegistryError::NotOwner {
                source_name: r.source.clone(),
                owner: s.agent,
                agent: agent.to_string(),
            });
        }
        s.inconsistent = r.inconsistent;
        if r.result.is_some() || !r.error.is_empty() {
            lock(&self.progress).remove(&r.source);
        }
        match (&r.result, r.error.is_empty()) {
            (Some(res), _) => {
                s.state = "ok".into();
                s.error.clear();
                s.last_point = res.point;
                s.last_sync_ms = now_ms();
                s.warning = res.warnings.join("; ");
                if !s.warning.is_empty() {
                    tracing::warn!(source = %s.name, point = res.point, "sync warning: {}", s.warning);
                }
            }
            (None, false) => {
                s.state = "error".into();
                s.error = r.error.clone();
            }
            (None, true) => s.state = "syncing".into(),
        }
        self.put_source(&s)?;
        // A finished sync's warnings (a failed quiesce hook, a log file sent anew)
        // are its source's alerts until the next finished sync.
        if let Some(res) = &r.result {
            let alerts: Vec<pb::Alert> = res
                .warnings
                .iter()
                .map(|w| pb::Alert {
                    // One alert per distinct warning.
                    key: format!(
                        "sync-warning/{}/{}",
                        s.name,
                        &blake3::hash(w.as_bytes()).to_hex()[..12]
                    ),
                    severity: "warning".into(),
                    subject: s.name.clone(),
                    message: w.clone(),
                    ..Default::default()
                })
                .collect();
            self.report_alerts(&format!("source/{}", s.name), &alerts)?;
        }
        Ok(())
    }

    /// Attaches an agent's control stream; returns its connection id.
    pub fn connect(
        &self,
        agent: &str,
        tx: mpsc::Sender<Result<pb::CoordinatorCommand, Status>>,
    ) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.connections).insert(agent.to_string(), Connection { id, tx });
        id
    }

    /// Detaches a control stream (if it is still the current one) and fails the
    /// commands that were waiting on it.
    pub fn disconnect(&self, agent: &str, id: u64) {
        let mut conns = lock(&self.connections);
        if conns.get(agent).is_some_and(|c| c.id == id) {
            conns.remove(agent);
            drop(conns);
            let mut pending = lock(&self.pending);
            let ids: Vec<u64> = pending
                .iter()
                .filter(|(_, (a, _))| a == agent)
                .map(|(k, _)| *k)
                .collect();
            for k in ids {
                if let Some((_, tx)) = pending.remove(&k) {
                    let _ = tx.send(Err(format!("agent {agent} disconnected before finishing")));
                }
            }
            if let Ok(Some(v)) = self.agents.get(agent)
                && let Ok(mut rec) = dec::<AgentRecord>(&v)
            {
                rec.last_seen_ms = now_ms();
                let _ = enc(&rec).map(|b| self.agents.insert(agent.as_bytes(), b));
            }
        }
    }

    /// Whether an agent has a live control stream.
    pub fn connected(&self, agent: &str) -> bool {
        lock(&self.connections).contains_key(agent)
    }

    /// Sends a command that wants no answer (the revocation list) to every agent
    /// connected now. A full queue is waited on in a task of its own, so the caller
    /// never blocks on a slow agent.
    pub fn broadcast(&self, cmd: pb::CoordinatorCommand) {
        let txs: Vec<_> = lock(&self.connections)
            .values()
            .map(|c| c.tx.clone())
            .collect();
        for tx in txs {
            if let Err(mpsc::error::TrySendError::Full(cmd)) = tx.try_send(Ok(cmd.clone()))
                && let Ok(rt) = tokio::runtime::Handle::try_current()
            {
                rt.spawn(async move {
                    let _ = tx.send(cmd).await;
                });
            }
        }
    }

    /// Sends a command to an agent; the receiver gets its outcome.
    pub async fn dispatch(
        &self,
        agent: &str,
        make: impl FnOnce(u64) -> pb::coordinator_command::Cmd,
    ) -> Result<oneshot::Receiver<CommandOutcome>> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let tx = lock(&self.connections)
            .get(agent)
            .map(|c| c.tx.clone())
            .ok_or_else(|| RegistryError::AgentOffline(agent.to_string()))?;
        let (otx, orx) = oneshot::channel();
        lock(&self.pending).insert(id, (agent.to_string(), otx));
        let cmd = pb::CoordinatorCommand {
            cmd: Some(make(id)),
        };
        if tx.send(Ok(cmd)).await.is_err() {
            lock(&self.pending).remove(&id);
            return Err(RegistryError::AgentOffline(agent.to_string()));
        }
        Ok(orx)
    }

    /// Delivers a command result from `agent`.
    pub fn complete(&self, agent: &str, r: pb::CommandResult) {
        let mut pending = lock(&self.pending);
        match pending.get(&r.command_id) {
            Some((a, _)) if a == agent => {}
            _ => {
                tracing::warn!(
                    agent,
                    command = r.command_id,
                    "result for an unknown command ignored"
                );
                return;
            }
        }
        if let Some((_, tx)) = pending.remove(&r.command_id) {
            let outcome = match r.outcome {
                Some(pb::command_result::Outcome::Error(e)) => Err(e),
                Some(o) => Ok(o),
                None => Err("the agent sent an empty result".into()),
            };
            let _ = tx.send(outcome);
        }
    }
}

/// Whether two sources of one protection group go together (restore to a moment,
/// and a volume's oldest point keeping its log source's logs): sources of the same
/// agent, or sources the admin put in the group. A source that joined by its
/// agent's claim never pairs with another host's.
pub fn paired(a: &SourceRecord, b: &SourceRecord) -> bool {
    !a.group.is_empty()
        && a.group == b.group
        && (a.agent == b.agent || (a.group_by_admin && b.group_by_admin))
}

/// A short stable key for a name that may not be printable.
fn blake3_key(name: &str) -> String {
    blake3::hash(name.as_bytes()).to_hex()[..12].to_string()
}

impl Registry {
    fn assignment_proto(&self, s: &SourceRecord, node: &str, addr: &str) -> pb::Assignment {
        assignment(s, self.effective(s).policy, node, addr)
    }
}

fn assignment(s: &SourceRecord, policy: Policy, node: &str, addr: &str) -> pb::Assignment {
    pb::Assignment {
        source: s.name.clone(),
        agent: s.agent.clone(),
        node: node.to_string(),
        node_address: addr.to_string(),
        epoch: s.epoch,
        size_bytes: s.size_bytes,
        block_size: s.block_size,
        policy: Some(policy.to_proto()),
        moving_to: s.moving_to.clone(),
        group: s.group.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Quota;

    fn node(reg: &Registry, name: &str, cap: u64) {
        reg.register_node(
            name,
            &pb::RegisterNodeRequest {
                address: format!("https://127.0.0.1:1/{name}"),
                capacity_bytes: cap,
                disks: vec![],
                version: "t".into(),
            },
        )
        .expect("register");
    }

    fn spec(name: &str, size: u64) -> pb::SourceSpec {
        pb::SourceSpec {
            name: name.into(),
            kind: pb::SourceKind::Volume as i32,
            size_bytes: size,
            block_size: 65536,
            tracker: "fingerprint".into(),
            inconsistent: false,
            busy: false,
            policy: None,
            group: String::new(),
        }
    }

    #[test]
    fn an_agent_proposes_and_the_admin_decides() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = Registry::open(dir.path(), Duration::from_secs(60))
            .expect("open")
            .with_fleet_policy(FleetPolicy {
                quota: Quota {
                    max_source_size_bytes: 10 << 30,
                    max_total_bytes: 100 << 30,
                },
                ..FleetPolicy::default()
            });
        node(&reg, "n1", 1 << 50);
        let alerts = |reg: &Registry| -> Vec<String> {
            reg.alerts(false)
                .expect("alerts")
                .into_iter()
                .map(|a| a.key)
                .collect()
        };
        // A group named in the config without the admin's leave: no member.
        let mut s1 = spec("s1", 1 << 30);
        s1.group = "other-hosts".into();
        s1.policy = Some(pb::Policy {
            retention: Some(pb::Retention {
                keep: 1,
                ..Default::default()
            }),
            points_alloc_bytes: u64::MAX,
            ..Default::default()
        });
        // Too big for the quota, and a name that would leave its folder.
        let big = spec("s2", 11 << 30);
        let dots = spec("..", 1 << 20);
        let regs = reg
            .hello(
                "a1",
                &pb::Hello {
                    sources: vec![s1, big, dots],
                    version: "t".into(),
                },
            )
            .expect("hello");
        assert!(regs[0].assignment.is_some(), "{regs:?}");
        assert!(regs[1].error.contains("quota"), "{regs:?}");
        assert!(
            regs[2].error.contains("must start with a letter"),
            "{regs:?}"
        );
        let s = reg.source("s1").expect("s1");
        assert_eq!(s.group, "", "not a member");
        let e = reg.effective(&s);
        assert!(e.policy.retention.is_keep_all(), "{e:?}");
        assert!(e.policy.points_alloc_bytes < u64::MAX, "{e:?}");
        let keys = alerts(&reg);
        for want in [
            "policy-refused/s1/retention.keep",
            "policy-refused/s1/points_space",
            "group-refused/s1",
        ] {
            assert!(keys.iter().any(|k| k == want), "{want} in {keys:?}");
        }
        assert_eq!(
            keys.iter()
                .filter(|k| k.starts_with("source-refused/a1/"))
                .count(),
            2,
            "{keys:?}"
        );
        assert!(reg.source("..").is_err() && reg.source("s2").is_err());
        // The admin's retention: the agent's proposal of one point is still refused.
        reg.set_retention(
            "s1",
            Some(Retention {
                keep: 3,
                ..Default::default()
            }),
        )
        .expect("retention");
        assert_eq!(
            reg.effective(&reg.source("s1").expect("s1"))
                .policy
                .retention
                .keep,
            3
        );
    }

    /// A source shown as syncing when its agent says hello with no sync running (the
    /// agent was killed mid-sync) is no longer shown as syncing; one whose sync is
    /// still running after a reconnect stays so.
    #[test]
    fn a_sync_whose_agent_came_back_without_it_is_not_shown_as_running() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = Registry::open(dir.path(), Duration::from_secs(60)).expect("open");
        node(&reg, "n1", 100 << 30);
        let hello = |busy: bool, inconsistent: bool| {
            let mut s = spec("vm", 1 << 30);
            s.busy = busy;
            s.inconsistent = inconsistent;
            reg.hello(
                "host-1",
                &pb::Hello {
                    sources: vec![s],
                    version: "t".into(),
                },
            )
            .expect("hello");
        };
        let started = pb::SyncReport {
            source: "vm".into(),
            result: None,
            error: String::new(),
            inconsistent: false,
        };
        hello(false, false);
        reg.sync_report("host-1", &started).expect("report");
        assert_eq!(reg.source("vm").expect("vm").state, "syncing");
        // The stream came back while the sync still runs.
        hello(true, false);
        assert_eq!(reg.source("vm").expect("vm").state, "syncing");
        // The agent came back (kill -9) with no sync and no record.
        hello(false, true);
        let s = reg.source("vm").expect("vm");
        assert_eq!(s.state, "error");
        assert!(
            s.error.contains("outcome is unknown") && s.error.contains("consistency check"),
            "{}",
            s.error
        );
        assert!(s.inconsistent);
    }

    #[test]
    fn a_grouped_log_source_keeps_what_the_groups_oldest_volume_point_needs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = Registry::open(dir.path(), Duration::from_secs(60)).expect("open");
        node(&reg, "n1", 100 << 30);
        reg.put_group(GroupRecord {
            v: 1,
            name: "db".into(),
            interval_ms: 60_000,
            retention: None,
            point_times: vec![],
            replica_alloc_bytes: 0,
            points_alloc_bytes: 0,
            allow: vec![],
            lock: None,
        })
        .expect("group");
        // The agents' configs may put their sources in the group.
        reg.allow_group("db", "host-*", false).expect("allow");
        let mut vol = spec("db-data", 1 << 30);
        vol.group = "db".into();
        let mut wal = spec("db-wal", 0);
        wal.kind = pb::SourceKind::Log as i32;
        wal.group = "db".into();
        reg.hello(
            "host-1",
            &pb::Hello {
                sources: vec![vol, wal],
                version: "t".into(),
            },
        )
        .expect("hello");
        let floor = || {
            reg.assignment("db-wal")
                .expect("wal")
                .policy
                .map_or(-1, |p| p.keep_after_ms)
        };
        assert_eq!(floor(), 0, "no volume point yet");
        let beat = |oldest: i64| {
            reg.heartbeat(
                "n1",
                &pb::NodeHeartbeatRequest {
                    sources: vec![pb::SourceUsage {
                        source: "db-data".into(),
                        newest_point: 3,
                        points: 3,
                        oldest_point_ms: oldest,
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )
            .expect("heartbeat");
        };
        beat(1000);
        assert_eq!(floor(), 1000);
        // Another host joins the group by its own claim with an older volume
        // point: it does not pin host-1's logs (it is not paired with them).
        let mut other = spec("web-data", 1 << 30);
        other.group = "db".into();
        reg.hello(
            "host-2",
            &pb::Hello {
                sources: vec![other],
                version: "t".into(),
            },
        )
        .expect("hello");
        assert_eq!(reg.source("web-data").expect("web").group, "db");
        reg.heartbeat(
            "n1",
            &pb::NodeHeartbeatRequest {
                sources: vec![pb::SourceUsage {
                    source: "web-data".into(),
                    newest_point: 1,
                    points: 1,
                    oldest_point_ms: 10,
                    ..Default::default()
                }],
                ..Default::default()
            },
        )
        .expect("heartbeat");
        assert_eq!(
            floor(),
            1000,
            "another host's point does not hold these logs"
        );
        // Retention pruned the oldest volume point: the logs before the next go.
        beat(5000);
        assert_eq!(floor(), 5000);
        // Out of the group, the volume no longer holds the logs back.
        reg.set_group("", &["db-data".to_string()])
            .expect("ungroup");
        assert_eq!(floor(), 0);
    }

    #[test]
    fn a_new_source_is_first_scrubbed_one_interval_after_it_was_added() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = Registry::open(dir.path(), Duration::from_secs(60)).expect("open");
        node(&reg, "n1", 100 << 30);
        reg.hello(
            "host-1",
            &pb::Hello {
                sources: vec![spec("vol", 1 << 30)],
                version: "t".into(),
            },
        )
        .expect("hello");
        let hour = Duration::from_secs(3600);
        assert_eq!(reg.due_for_scrub(hour).expect("due"), None, "no point yet");
        reg.heartbeat(
            "n1",
            &pb::NodeHeartbeatRequest {
                sources: vec![pb::SourceUsage {
                    source: "vol".into(),
                    newest_point: 1,
                    points: 1,
                    ..Default::default()
                }],
                ..Default::default()
            },
        )
        .expect("heartbeat");
        assert_eq!(
            reg.due_for_scrub(hour).expect("due"),
            None,
            "its first sync was checked on arrival"
        );
        std::thread::sleep(Duration::from_millis(5));
        let soon = Duration::from_millis(1);
        assert_eq!(
            reg.due_for_scrub(soon).expect("due").as_deref(),
            Some("vol")
        );
        reg.verified("vol", "ok".into()).expect("verified");
        assert_eq!(reg.due_for_scrub(hour).expect("due"), None);
    }

    #[test]
    fn places_on_the_node_with_most_free_space_and_keeps_owners() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = Registry::open(dir.path(), Duration::from_secs(60)).expect("open");
        let gib = 1u64 << 30;
        let hello = pb::Hello {
            sources: vec![spec("a", gib)],
            version: "t".into(),
        };
        // No node yet: registered, not placed, with a reason.
        let r = reg.hello("host-1", &hello).expect("hello");
        assert!(r[0].assignment.is_none());
        assert!(
            r[0].error.contains("no storage node has registered"),
            "{}",
            r[0].error
        );
        assert_eq!(reg.source("a").expect("a").state, "error");

        node(&reg, "n1", 100 * gib);
        node(&reg, "n2", 100 * gib);
        let a = reg.assignment("a").expect("placed");
        assert_eq!((a.node.as_str(), a.epoch), ("n1", 1));
        let r = reg
            .hello(
                "host-2",
                &pb::Hello {
                    sources: vec![spec("b", gib)],
                    version: "t".into(),
                },
            )
            .expect("hello");
        assert_eq!(
            r[0].assignment.as_ref().map(|a| a.node.as_str()),
            Some("n2")
        );

        // Another agent cannot claim a source, and nothing fits a 1 PiB volume.
        let r = reg
            .hello(
                "host-2",
                &pb::Hello {
                    sources: vec![spec("a", gib), spec("huge", 1 << 50)],
                    version: "t".into(),
                },
            )
            .expect("hello");
        assert!(
            r[0].error.contains("belongs to agent host-1"),
            "{}",
            r[0].error
        );
        // No node could ever hold it: refused, and no record is kept.
        assert!(r[1].assignment.is_none());
        assert!(
            r[1].error
                .contains("more than the largest storage node holds"),
            "{}",
            r[1].error
        );
        assert!(reg.source("huge").is_err());
        drop(reg);
        let reg = reopen(dir.path());
        assert_eq!(reg.source("b").expect("b").node.as_deref(), Some("n2"));
    }

    /// Opens the registry again after a drop. sled's flusher thread lets go of the
    /// database's file lock a moment after the last handle is dropped, so the open
    /// is retried for up to 5 s while it reports the lock taken.
    fn reopen(dir: &std::path::Path) -> Registry {
        let mut tries = 0;
        loop {
            match Registry::open(dir, Duration::from_secs(60)) {
                Err(RegistryError::Store(m))
                    if m.contains("could not acquire lock") && tries < 500 =>
                {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                r => return r.expect("reopen"),
            }
        }
    }
}
