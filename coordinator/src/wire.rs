//! The edge between the wire (`bulwark_proto`) and the coordinator's domain types:
//! each request the coordinator receives is parsed here, once, into the types its
//! domain functions take (`TryFrom`, failing with a [`ProtocolError`] that becomes
//! `InvalidArgument`), and what the domain returns is put back into messages here.
//! Past this module, domain code sees no message the protocol made optional.

use bulwark_common::retention::Retention;
use bulwark_common::tls::Target;
use bulwark_proto as pb;

use crate::policy::{LockPolicy, Quota};
use crate::registry::{
    Alert, AlertRecord, Assignment, Command, DiskFigures, GroupRecord, Heartbeat, Hello,
    NodeRegistration, Policy, Progress, Registration, Registry, RestoreCommand, SourceKind,
    SourceRecord, SourceSpec, SourceUsage, SyncCommand, SyncOutcome, SyncReport, Usage,
};
use crate::service::{
    AllocateOrder, LockOrder, LockTarget, QuotaOrder, RestoreOrder, RetentionOrder, SyncOrder,
};

pub use crate::error::ProtocolError;

// ---- nodes ----

/// The most pool disks of one node the coordinator keeps figures of.
pub const MAX_DISKS: usize = 256;

impl TryFrom<pb::RegisterNodeRequest> for NodeRegistration {
    type Error = ProtocolError;

    fn try_from(r: pb::RegisterNodeRequest) -> Result<Self, ProtocolError> {
        Target::parse(&r.address).map_err(|e| ProtocolError::Invalid(e.to_string()))?;
        Ok(NodeRegistration {
            address: r.address,
            capacity_bytes: r.capacity_bytes,
            version: r.version,
        })
    }
}

impl From<pb::SourceUsage> for SourceUsage {
    fn from(u: pb::SourceUsage) -> Self {
        SourceUsage {
            usage: Usage {
                replica_alloc_bytes: u.replica_alloc_bytes,
                points_alloc_bytes: u.points_alloc_bytes,
                points_used_bytes: u.points_used_bytes,
                points_logical_bytes: u.points_logical_bytes,
                used_bytes: u.used_bytes,
                points: u.points,
                oldest_point_ms: u.oldest_point_ms,
            },
            source: u.source,
            newest_point: u.newest_point,
            allocated_bytes: u.allocated_bytes,
        }
    }
}

impl From<pb::NodeHeartbeatRequest> for Heartbeat {
    fn from(hb: pb::NodeHeartbeatRequest) -> Self {
        Heartbeat {
            capacity_bytes: hb.capacity_bytes,
            allocated_bytes: hb.allocated_bytes,
            used_bytes: hb.used_bytes,
            live_streams: hb.live_streams,
            ingest_bytes_per_sec: hb.ingest_bytes_per_sec,
            health: hb.health,
            nbd_address: hb.nbd_address,
            sources: hb.sources.into_iter().map(SourceUsage::from).collect(),
            disks: hb
                .disks
                .into_iter()
                .take(MAX_DISKS)
                .map(|d| DiskFigures {
                    path: d.path,
                    capacity_bytes: d.capacity_bytes,
                    used_bytes: d.used_bytes,
                })
                .collect(),
            alerts: hb.alerts.into_iter().map(Alert::from).collect(),
        }
    }
}

impl From<pb::Alert> for Alert {
    fn from(a: pb::Alert) -> Self {
        Alert {
            key: a.key,
            severity: a.severity,
            subject: a.subject,
            message: a.message,
        }
    }
}

impl From<&AlertRecord> for pb::Alert {
    fn from(r: &AlertRecord) -> Self {
        pb::Alert {
            key: r.key.clone(),
            severity: r.severity.clone(),
            subject: r.subject.clone(),
            message: r.message.clone(),
            first_seen_ms: r.first_seen_ms,
            last_seen_ms: r.last_seen_ms,
            resolved: r.resolved_ms != 0,
            origin: r.origin.clone(),
            resolved_ms: r.resolved_ms,
        }
    }
}

/// An agent's or a node's policy proposal (none: the defaults).
pub fn policy(p: Option<&pb::Policy>) -> Policy {
    p.map_or_else(Policy::default, |p| Policy {
        replica_alloc_bytes: p.replica_alloc_bytes,
        points_alloc_bytes: p.points_alloc_bytes,
        retention: Retention::from_proto(p.retention.as_ref()),
        keep_after_ms: p.keep_after_ms,
        // Locks are the admin's; an agent's config does not propose one.
        lock: None,
    })
}

impl From<Policy> for pb::Policy {
    fn from(p: Policy) -> Self {
        pb::Policy {
            replica_alloc_bytes: p.replica_alloc_bytes,
            points_alloc_bytes: p.points_alloc_bytes,
            retention: Some(p.retention.to_proto()),
            keep_after_ms: p.keep_after_ms,
            lock: p.lock.map(|l| LockPolicy::to_proto(Some(l))),
        }
    }
}

impl From<Assignment> for pb::Assignment {
    fn from(a: Assignment) -> Self {
        pb::Assignment {
            source: a.source,
            agent: a.agent,
            node: a.node,
            node_address: a.node_address,
            epoch: a.epoch,
            size_bytes: a.size_bytes,
            block_size: a.block_size,
            policy: Some(a.policy.into()),
            moving_to: a.moving_to,
            group: a.group,
        }
    }
}

/// Assignments for the wire.
pub fn assignments(a: Vec<Assignment>) -> Vec<pb::Assignment> {
    a.into_iter().map(pb::Assignment::from).collect()
}

// ---- agents ----

impl From<pb::SourceSpec> for SourceSpec {
    fn from(s: pb::SourceSpec) -> Self {
        let kind = match pb::SourceKind::try_from(s.kind) {
            Ok(pb::SourceKind::Volume) => Some(SourceKind::Volume),
            Ok(pb::SourceKind::Log) => Some(SourceKind::Log),
            _ => None,
        };
        SourceSpec {
            kind,
            policy: policy(s.policy.as_ref()),
            proposes_retention: s.policy.as_ref().is_some_and(|p| p.retention.is_some()),
            name: s.name,
            size_bytes: s.size_bytes,
            block_size: s.block_size,
            tracker: s.tracker,
            inconsistent: s.inconsistent,
            recheck_bytes: s.recheck_bytes,
            busy: s.busy,
            group: s.group,
        }
    }
}

impl From<pb::Hello> for Hello {
    fn from(h: pb::Hello) -> Self {
        Hello {
            version: h.version,
            sources: h.sources.into_iter().map(SourceSpec::from).collect(),
        }
    }
}

/// The first message of a control stream, which must be the agent's Hello.
pub fn hello(first: Option<pb::AgentMessage>) -> Result<Hello, ProtocolError> {
    match first {
        Some(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(h)),
        }) => Ok(h.into()),
        _ => Err(ProtocolError::OutOfOrder(
            "the control stream must start with Hello",
        )),
    }
}

impl From<Registration> for pb::SourceRegistration {
    fn from(r: Registration) -> Self {
        pb::SourceRegistration {
            source: r.source,
            assignment: r.assignment.map(pb::Assignment::from),
            error: r.error,
        }
    }
}

impl From<pb::SyncReport> for SyncReport {
    fn from(r: pb::SyncReport) -> Self {
        // A result wins over an error; neither: the sync is running.
        let outcome = match (r.result, r.error.is_empty()) {
            (Some(res), _) => SyncOutcome::Done {
                point: res.point,
                warnings: res.warnings,
            },
            (None, false) => SyncOutcome::Failed(r.error),
            (None, true) => SyncOutcome::Running,
        };
        SyncReport {
            source: r.source,
            inconsistent: r.inconsistent,
            recheck_bytes: r.recheck_bytes,
            outcome,
        }
    }
}

impl From<pb::OpProgress> for Progress {
    fn from(p: pb::OpProgress) -> Self {
        Progress {
            source: p.source,
            op: p.op,
            done_bytes: p.done_bytes,
            total_bytes: p.total_bytes,
        }
    }
}

impl From<Progress> for pb::OpProgress {
    fn from(p: Progress) -> Self {
        pb::OpProgress {
            source: p.source,
            op: p.op,
            done_bytes: p.done_bytes,
            total_bytes: p.total_bytes,
        }
    }
}

impl From<SyncCommand> for pb::SyncCommand {
    fn from(c: SyncCommand) -> Self {
        pb::SyncCommand {
            command_id: c.command_id,
            source: c.source,
            check: c.check,
            deep: c.deep,
            trace_context: c.trace_context,
        }
    }
}

impl From<RestoreCommand> for pb::RestoreCommand {
    fn from(r: RestoreCommand) -> Self {
        let mut c = pb::RestoreCommand {
            command_id: r.command_id,
            path: r.path,
            at_ms: r.at_ms,
            trace_context: r.trace_context,
            ..Default::default()
        };
        match (r.volume, r.log) {
            (Some(v), log) => {
                c.source = v.source;
                c.point = v.point;
                c.assignment = Some(v.assignment.into());
                c.kind = pb::SourceKind::Volume as i32;
                c.log = log.map(|l| pb::LogRestore {
                    source: l.source,
                    point: l.point,
                    assignment: Some(l.assignment.into()),
                });
            }
            (None, Some(l)) => {
                c.source = l.source;
                c.point = l.point;
                c.assignment = Some(l.assignment.into());
                c.kind = pb::SourceKind::Log as i32;
            }
            (None, None) => {}
        }
        c
    }
}

impl From<Command> for pb::CoordinatorCommand {
    fn from(c: Command) -> Self {
        use pb::coordinator_command::Cmd;
        let cmd = match c {
            Command::Welcome(sources) => Cmd::Welcome(pb::Welcome {
                sources: sources.into_iter().map(Into::into).collect(),
            }),
            Command::Sync(s) => Cmd::Sync(s.into()),
            Command::Restore(r) => Cmd::Restore((*r).into()),
            Command::Revocations(l) => Cmd::Revocations(l),
        };
        pb::CoordinatorCommand { cmd: Some(cmd) }
    }
}

// ---- the admin's requests ----

impl From<pb::SyncRequest> for SyncOrder {
    fn from(r: pb::SyncRequest) -> Self {
        SyncOrder {
            source: r.source,
            wait: r.wait,
            check: r.check,
            deep: r.deep,
        }
    }
}

impl TryFrom<pb::RestoreRequest> for RestoreOrder {
    type Error = ProtocolError;

    fn try_from(r: pb::RestoreRequest) -> Result<Self, ProtocolError> {
        if r.path.is_empty() {
            return Err(ProtocolError::Invalid(
                "a restore needs a target path (--to)".into(),
            ));
        }
        if r.at_ms != 0 && r.point != 0 {
            return Err(ProtocolError::Invalid(
                "give a point or a time (--at), not both".into(),
            ));
        }
        Ok(RestoreOrder {
            source: r.source,
            point: r.point,
            at_ms: r.at_ms,
            agent: (!r.agent.is_empty()).then_some(r.agent),
            path: r.path,
            wait: r.wait,
        })
    }
}

impl TryFrom<pb::LockRequest> for LockOrder {
    type Error = ProtocolError;

    fn try_from(r: pb::LockRequest) -> Result<Self, ProtocolError> {
        let lock = LockPolicy::from_proto(r.lock.as_ref()).map_err(ProtocolError::Invalid)?;
        let target = match (r.source.is_empty(), r.group.is_empty()) {
            (false, true) => LockTarget::Source(r.source),
            (true, false) => LockTarget::Group(r.group),
            _ => {
                return Err(ProtocolError::Invalid(
                    "name one data source or one group (--group)".into(),
                ));
            }
        };
        Ok(LockOrder { target, lock })
    }
}

impl TryFrom<pb::SetRetentionRequest> for RetentionOrder {
    type Error = ProtocolError;

    fn try_from(r: pb::SetRetentionRequest) -> Result<Self, ProtocolError> {
        let retention = match (r.clear, r.retention.as_ref()) {
            (true, _) => None,
            (false, Some(x)) => Some(Retention::from_proto(Some(x))),
            (false, None) => {
                return Err(ProtocolError::Invalid(
                    "give a retention, or clear the source's own".into(),
                ));
            }
        };
        Ok(RetentionOrder {
            source: r.source,
            retention,
        })
    }
}

impl TryFrom<pb::AllocateRequest> for AllocateOrder {
    type Error = ProtocolError;

    fn try_from(r: pb::AllocateRequest) -> Result<Self, ProtocolError> {
        if r.replica_alloc_bytes == 0 && r.points_alloc_bytes == 0 {
            return Err(ProtocolError::Invalid(
                "say what to allocate: --replica SIZE and/or --points SIZE".into(),
            ));
        }
        Ok(AllocateOrder {
            source: r.source,
            replica_alloc_bytes: r.replica_alloc_bytes,
            points_alloc_bytes: r.points_alloc_bytes,
        })
    }
}

impl From<pb::Quota> for QuotaOrder {
    fn from(q: pb::Quota) -> Self {
        QuotaOrder {
            quota: (!q.clear).then_some(Quota {
                max_source_size_bytes: q.max_source_size_bytes,
                max_total_bytes: q.max_total_bytes,
            }),
            agent: q.agent,
        }
    }
}

impl From<pb::Group> for GroupRecord {
    fn from(g: pb::Group) -> Self {
        GroupRecord {
            v: 1,
            retention: g.retention.as_ref().map(|r| Retention::from_proto(Some(r))),
            name: g.name,
            interval_ms: g.interval_ms,
            point_times: g.point_times,
            replica_alloc_bytes: g.replica_alloc_bytes,
            points_alloc_bytes: g.points_alloc_bytes,
            allow: Vec::new(),
            lock: None,
        }
    }
}

// ---- what the admin is shown ----

/// A quota for the wire.
pub fn quota(v: crate::service::QuotaView) -> pb::Quota {
    pb::Quota {
        agent: v.agent,
        max_source_size_bytes: v.quota.max_source_size_bytes,
        max_total_bytes: v.quota.max_total_bytes,
        used_total_bytes: v.used_total_bytes,
        clear: false,
    }
}

/// A protection group for the wire, with its member sources.
pub fn group(g: &GroupRecord, sources: Vec<String>) -> pb::Group {
    pb::Group {
        name: g.name.clone(),
        interval_ms: g.interval_ms,
        retention: g.retention.map(|r| r.to_proto()),
        point_times: g.point_times.clone(),
        replica_alloc_bytes: g.replica_alloc_bytes,
        points_alloc_bytes: g.points_alloc_bytes,
        allow: g.allow.clone(),
        lock: Some(LockPolicy::to_proto(g.lock)),
        sources,
    }
}

/// A source for the CLI.
pub fn source_info(reg: &Registry, s: SourceRecord) -> pb::SourceInfo {
    let effective = reg.effective(&s);
    pb::SourceInfo {
        lock: Some(LockPolicy::to_proto(effective.policy.lock)),
        retention: Some(effective.policy.retention.to_proto()),
        retention_from: effective.retention_from,
        policy_refused: effective
            .refused
            .iter()
            .cloned()
            .chain(
                (!s.claimed_group.is_empty() && s.claimed_group != s.group).then(|| {
                    format!(
                        "group: {} is not allowed by the admin (`bulwark group allow`)",
                        s.claimed_group
                    )
                }),
            )
            .collect::<Vec<_>>()
            .join("; "),
        progress: None,
        kind: if s.kind == "log" {
            pb::SourceKind::Log
        } else {
            pb::SourceKind::Volume
        } as i32,
        // A source with no point yet has nothing to be inconsistent with.
        state: if s.inconsistent && s.state == "ok" && s.last_point > 0 {
            "inconsistent".into()
        } else if s.recheck_bytes > 0 && s.state == "ok" && s.last_point > 0 {
            "recovering".into()
        } else {
            s.state.clone()
        },
        recheck_bytes: s.recheck_bytes,
        replica_alloc_bytes: s.usage.replica_alloc_bytes,
        points_alloc_bytes: s.usage.points_alloc_bytes,
        points_used_bytes: s.usage.points_used_bytes,
        // A node before compression reports none: its points are all raw.
        points_logical_bytes: s.usage.points_logical_bytes.max(s.usage.points_used_bytes),
        used_bytes: s.usage.used_bytes,
        points: s.usage.points,
        last_verify_ms: s.last_verify_ms,
        verify_result: s.verify_result.clone(),
        placement: s.placement.clone(),
        group: s.group.clone(),
        next_sync_ms: s.next_sync_ms,
        name: s.name,
        agent: s.agent,
        node: s.node.unwrap_or_default(),
        tracker: s.tracker,
        warning: s.warning,
        size_bytes: s.size_bytes,
        last_point: s.last_point,
        epoch: s.epoch,
        block_size: s.block_size,
        last_sync_ms: s.last_sync_ms,
        error: s.error,
        allocated_bytes: s.allocated_bytes,
    }
}

/// A node for the CLI (`state`: up, down or draining).
pub fn node_info(v: crate::service::NodeView) -> pb::NodeInfo {
    let (n, load) = (v.node, v.load);
    pb::NodeInfo {
        state: v.state.into(),
        name: n.name,
        address: n.address,
        capacity_bytes: n.capacity_bytes,
        allocated_bytes: load.allocated_bytes,
        used_bytes: n.used_bytes,
        sources: load.sources,
        last_seen_ms: n.last_seen_ms,
        live_streams: n.live_streams,
        nbd_address: n.nbd_address,
        ingest_bytes_per_sec: n.ingest_bytes_per_sec,
        health: n.health,
        version: n.version,
    }
}

/// An agent for the CLI.
pub fn agent_info(a: crate::registry::AgentRecord, connected: bool) -> pb::AgentInfo {
    pb::AgentInfo {
        connected,
        name: a.name,
        last_seen_ms: a.last_seen_ms,
        sources: a.sources,
        version: a.version,
    }
}

impl From<crate::service::LocateView> for pb::LocateResponse {
    fn from(v: crate::service::LocateView) -> Self {
        pb::LocateResponse {
            node: v.node,
            node_address: v.node_address,
            nbd_address: v.nbd_address,
            size_bytes: v.size_bytes,
            block_size: v.block_size,
        }
    }
}

// ---- forecast ----

impl From<&crate::registry::ForecastRow> for pb::CapacityForecast {
    fn from(r: &crate::registry::ForecastRow) -> Self {
        let f = &r.forecast;
        pb::CapacityForecast {
            name: r.name.clone(),
            node: r.node.clone(),
            used_bytes: f.used_bytes,
            limit_bytes: f.limit_bytes,
            has_trend: f.growth_per_day.is_some(),
            growth_bytes_per_day: f.growth_per_day.unwrap_or(0.0),
            has_days: f.days_until_full.is_some(),
            days_until_full: f.days_until_full.unwrap_or(0.0),
            samples: u32::try_from(f.samples).unwrap_or(u32::MAX),
        }
    }
}

impl From<&crate::registry::ForecastReport> for pb::ForecastResponse {
    fn from(r: &crate::registry::ForecastReport) -> Self {
        let rows = |v: &[crate::registry::ForecastRow]| v.iter().map(Into::into).collect();
        pb::ForecastResponse {
            sources: rows(&r.sources),
            groups: rows(&r.groups),
            nodes: rows(&r.nodes),
            disks: rows(&r.disks),
            warn_days: r.settings.warn_days,
            window_ms: r.settings.window_ms() as u64,
        }
    }
}
