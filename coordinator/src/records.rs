//! The records the coordinator keeps (JSON in the state store, with a format version `v`):
//! nodes, agents, data sources, groups, alerts, assignments, and the admin's
//! retention locks. Plain data: [`crate::registry`] stores them and
//! [`crate::policy`] decides over them, and neither is needed to read them.

use bulwark_common::retention::Retention;
use bulwark_common::time::now_ms;
use serde::{Deserialize, Serialize};

/// The format version of every record.
pub(crate) const FORMAT_VERSION: u32 = 1;

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
    /// Its pool disks as last reported (for the capacity forecast).
    #[serde(default)]
    pub disks: Vec<DiskFigures>,
}

/// One pool disk of a node, as its heartbeat reports it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DiskFigures {
    pub path: String,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
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
    /// The agent crashed and owes a bounded re-check of this many bytes.
    #[serde(default)]
    pub recheck_bytes: u64,
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
    /// `points_used_bytes` before the node's compression (0 from a node before it).
    pub points_logical_bytes: u64,
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
            recheck_bytes: 0,
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

/// Where a data source lives and what its node is to hold of it: what a node
/// serves and an agent syncs by.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub source: String,
    pub agent: String,
    pub node: String,
    pub node_address: String,
    /// The node refuses any other epoch.
    pub epoch: u64,
    pub size_bytes: u64,
    pub block_size: u32,
    pub policy: Policy,
    /// The node a move copies the source to, else empty.
    pub moving_to: String,
    pub group: String,
}

/// How strong a retention lock is (see `bulwark_node::store::lock`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockMode {
    Governance,
    Compliance,
}

/// A retention lock the admin set on a source or a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockPolicy {
    pub mode: LockMode,
    pub min_age_ms: u64,
}

impl LockPolicy {
    /// The lock keeping what both keep (the stronger mode, the longer age).
    pub fn max(a: Option<LockPolicy>, b: Option<LockPolicy>) -> Option<LockPolicy> {
        match (a, b) {
            (Some(a), Some(b)) => Some(LockPolicy {
                mode: a.mode.max(b.mode),
                min_age_ms: a.min_age_ms.max(b.min_age_ms),
            }),
            (a, None) => a,
            (None, b) => b,
        }
    }

    /// Whether `want` keeps at least what `have` keeps.
    pub fn is_raise(have: Option<LockPolicy>, want: Option<LockPolicy>) -> bool {
        match (have, want) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(h), Some(w)) => w.mode >= h.mode && w.min_age_ms >= h.min_age_ms,
        }
    }

    /// For the wire.
    pub fn to_proto(l: Option<LockPolicy>) -> bulwark_proto::RetentionLock {
        match l {
            None => bulwark_proto::RetentionLock::default(),
            Some(l) => bulwark_proto::RetentionLock {
                mode: match l.mode {
                    LockMode::Governance => bulwark_proto::LockMode::Governance,
                    LockMode::Compliance => bulwark_proto::LockMode::Compliance,
                } as i32,
                min_age_ms: l.min_age_ms,
            },
        }
    }

    /// From the wire: `Ok(None)` for no lock (mode none and no age).
    pub fn from_proto(
        l: Option<&bulwark_proto::RetentionLock>,
    ) -> Result<Option<LockPolicy>, String> {
        let Some(l) = l else { return Ok(None) };
        let mode = match bulwark_proto::LockMode::try_from(l.mode) {
            Ok(bulwark_proto::LockMode::Governance) => LockMode::Governance,
            Ok(bulwark_proto::LockMode::Compliance) => LockMode::Compliance,
            Ok(bulwark_proto::LockMode::None) if l.min_age_ms == 0 => return Ok(None),
            _ => {
                return Err(
                    "a lock needs a mode, governance or compliance, and a minimum age".into(),
                );
            }
        };
        if l.min_age_ms == 0 {
            return Ok(None);
        }
        Ok(Some(LockPolicy {
            mode,
            min_age_ms: l.min_age_ms,
        }))
    }

    /// `compliance 30d`, or `none`.
    pub fn describe(l: Option<LockPolicy>) -> String {
        match l {
            None => "none".into(),
            Some(l) => format!(
                "{} {}",
                match l.mode {
                    LockMode::Governance => "governance",
                    LockMode::Compliance => "compliance",
                },
                bulwark_common::time::format_duration_ms(l.min_age_ms)
            ),
        }
    }
}
