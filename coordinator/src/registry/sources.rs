//! Nodes and data sources: registration, heartbeats, an agent's Hello, placement,
//! assignments, sync reports and allocation.

use super::*;

/// What a node says when it registers.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRegistration {
    /// Where agents and the coordinator reach it (checked to be a target).
    pub address: String,
    pub capacity_bytes: u64,
    pub version: String,
}

/// A node's heartbeat: its figures, each source's usage, and its alerts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Heartbeat {
    pub capacity_bytes: u64,
    pub allocated_bytes: u64,
    pub used_bytes: u64,
    pub live_streams: u32,
    pub ingest_bytes_per_sec: u64,
    pub health: String,
    pub nbd_address: String,
    pub sources: Vec<SourceUsage>,
    /// Its pool disks.
    pub disks: Vec<DiskFigures>,
    /// Every condition the node raises now.
    pub alerts: Vec<Alert>,
}

/// One source's figures in a heartbeat.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceUsage {
    pub source: String,
    pub newest_point: u64,
    pub allocated_bytes: u64,
    pub usage: Usage,
}

/// The kind of a data source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Volume,
    Log,
}

impl SourceKind {
    /// As the registry's records spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Volume => "volume",
            SourceKind::Log => "log",
        }
    }
}

/// A data source as its agent's Hello describes it. What the registry refuses
/// of it (a bad name, geometry or kind) is refused for this source alone.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceSpec {
    pub name: String,
    /// `None`: a kind this coordinator does not know.
    pub kind: Option<SourceKind>,
    pub size_bytes: u64,
    pub block_size: u32,
    pub tracker: String,
    pub inconsistent: bool,
    /// Bytes a bounded re-check owes after the agent's crash (0: none).
    pub recheck_bytes: u64,
    /// The agent runs a sync of it right now.
    pub busy: bool,
    /// Space and retention its agent's config proposes (0 = default).
    pub policy: Policy,
    /// The agent's config has a retention table.
    pub proposes_retention: bool,
    /// The group its agent's config claims (empty = none).
    pub group: String,
}

/// An agent's Hello.
#[derive(Debug, Clone, PartialEq)]
pub struct Hello {
    pub version: String,
    pub sources: Vec<SourceSpec>,
}

/// What became of one source of a Hello.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    pub source: String,
    /// `None`: not placed (see `error`).
    pub assignment: Option<Assignment>,
    pub error: String,
}

/// What an agent says about a sync of one of its sources.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncReport {
    pub source: String,
    pub inconsistent: bool,
    pub recheck_bytes: u64,
    pub outcome: SyncOutcome,
}

/// How a reported sync stands.
#[derive(Debug, Clone, PartialEq)]
pub enum SyncOutcome {
    /// It made point `point`, with these warnings.
    Done {
        point: u64,
        warnings: Vec<String>,
    },
    Failed(String),
    Running,
}

impl Registry {
    /// Records a node's registration.
    pub fn register_node(&self, name: &str, req: &NodeRegistration) -> Result<()> {
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
            disks: Vec::new(),
        });
        rec.address = req.address.clone();
        rec.capacity_bytes = req.capacity_bytes;
        rec.version = req.version.clone();
        rec.last_seen_ms = now_ms();
        self.write(NODES, name, &rec)?;
        tracing::info!(node = name, address = %req.address, capacity = req.capacity_bytes, "node registered");
        Ok(())
    }

    /// Records a heartbeat; `None` if the node never registered.
    pub fn heartbeat(&self, name: &str, hb: &Heartbeat) -> Result<Option<()>> {
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
        rec.disks = hb.disks.clone();
        // The node's record and every source whose usage changed: one commit (one
        // flush, one etcd round trip) per MAX_TXN_OPS records, not one per record.
        let mut txn = Txn::new().put(NODES, name.as_bytes(), enc(&rec)?);
        // Whether a grouped volume's oldest point moved (then the log floors may).
        let mut floors_moved = false;
        for u in &hb.sources {
            if let Ok(mut s) = self.source(&u.source)
                && s.node.as_deref() == Some(name)
            {
                let usage = u.usage;
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
                    txn = Self::put_source_in(txn, &s)?;
                    if txn.then.len() >= MAX_TXN_OPS {
                        self.state.commit(std::mem::take(&mut txn))?;
                    }
                }
            }
        }
        if !txn.then.is_empty() {
            self.state.commit(txn)?;
        }
        self.record_usage(name, hb)?;
        self.report_alerts(name, &hb.alerts)?;
        if floors_moved {
            self.update_log_floors()?;
        }
        Ok(Some(()))
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
        tracing::info!(
            source,
            replica_alloc_bytes = replica,
            points_alloc_bytes = points,
            "allocation set"
        );
        Ok(s)
    }

    /// Assignments of the sources on `node`.
    pub fn assignments_of(&self, node: &str) -> Result<Vec<Assignment>> {
        let addr = self.node(node)?.map(|n| n.address).unwrap_or_default();
        Ok(self
            .sources()?
            .into_iter()
            .filter(|s| s.node.as_deref() == Some(node))
            .map(|s| self.assignment_of(&s, node, &addr))
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
    pub(super) fn choose_node(&self, need: u64) -> Result<(Option<String>, String)> {
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
                    self.write(NODES, name, &n)?;
                }
            }
            bulwark_common::tls::Role::Agent => {
                self.update(AGENTS, name, |a: Option<AgentRecord>| {
                    Ok(a.filter(|a| a.cert_not_after_ms != not_after_ms)
                        .map(|mut a| {
                            a.cert_not_after_ms = not_after_ms;
                            a
                        }))
                })?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Registers an agent's data sources (its Hello) and places the new ones.
    pub fn hello(&self, agent: &str, hello: &Hello) -> Result<Vec<Registration>> {
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
                    Registration {
                        source: spec.name.clone(),
                        assignment: a,
                        error,
                    }
                }
                Err(e) => {
                    let shown = bulwark_common::text::escape_short(&spec.name, 80);
                    tracing::warn!(agent, source = %shown, "source not registered: {e}");
                    refusals.push(Alert {
                        key: format!("source-refused/{agent}/{}", blake3_key(&spec.name)),
                        severity: "warning".into(),
                        subject: agent.to_string(),
                        message: format!(
                            "agent {agent} registers a data source that is refused: {e}"
                        ),
                    });
                    Registration {
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
                .state
                .get(AGENTS, agent.as_bytes())?
                .and_then(|v| dec::<AgentRecord>(&v).ok())
                .map_or(0, |a| a.cert_not_after_ms),
        };
        self.write(AGENTS, agent, &rec)?;
        self.report_alerts(&format!("hello/{agent}"), &refusals)?;
        self.refresh_policy_alerts(agent)?;
        // Sources may have joined groups (a log source then keeps its group's logs).
        self.update_log_floors()?;
        Ok(out)
    }

    pub(super) fn register_source(
        &self,
        agent: &str,
        spec: &SourceSpec,
    ) -> Result<Option<Assignment>> {
        let invalid = |why: String| {
            RegistryError::InvalidSource(bulwark_common::text::escape_short(&spec.name, 80), why)
        };
        bulwark_common::name::SourceName::parse(spec.name.as_str()).map_err(|e| invalid(e.why))?;
        let geometry = bulwark_common::block::Geometry::new(spec.size_bytes, spec.block_size)
            .map_err(|e| invalid(e.to_string()))?;
        let Some(kind) = spec.kind.map(SourceKind::as_str) else {
            return Err(invalid("unknown kind".into()));
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
                self.admit_new(agent, spec, &rec)?.map_err(invalid)?;
                rec
            }
            Err(e) => return Err(e),
        };
        rec.tracker = spec.tracker.clone();
        rec.inconsistent = spec.inconsistent;
        // Shown only; an agent cannot owe more than its volume.
        rec.recheck_bytes = spec.recheck_bytes.min(rec.size_bytes);
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
        rec.agent_policy = spec.policy;
        rec.agent_proposes_retention = spec.proposes_retention;
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

    /// Whether a new source `rec` (not yet recorded) may be added for `agent`: the
    /// most sources per agent, its quota, and room on the largest node; else
    /// (inner `Err`) why not.
    fn admit_new(
        &self,
        agent: &str,
        spec: &SourceSpec,
        rec: &SourceRecord,
    ) -> Result<std::result::Result<(), String>> {
        // The quota, before anything is placed or allocated.
        let mut fresh = rec.clone();
        fresh.agent_policy = spec.policy;
        let need = self.planned_alloc(&fresh);
        let mine: Vec<SourceRecord> = self
            .sources()?
            .into_iter()
            .filter(|s| s.agent == agent)
            .collect();
        if mine.len() >= MAX_SOURCES_PER_AGENT {
            return Ok(Err(format!(
                "agent {agent} has {} data sources already, the most one agent may have",
                mine.len()
            )));
        }
        let others = mine
            .iter()
            .fold(0u64, |n, s| n.saturating_add(s.allocated_bytes));
        if let Err(why) =
            crate::policy::check_quota(&self.quota_of(agent)?, agent, spec.size_bytes, need, others)
        {
            return Ok(Err(why));
        }
        // A source no node could ever hold is refused, not kept waiting.
        let largest = self.nodes()?.iter().map(|n| n.capacity_bytes).max();
        if let Some(largest) = largest.filter(|l| *l > 0)
            && need > largest
        {
            return Ok(Err(format!(
                "it needs {} of space, more than the largest storage node holds ({})",
                bulwark_common::config::format_size(need),
                bulwark_common::config::format_size(largest)
            )));
        }
        Ok(Ok(()))
    }

    /// Places `rec` if it has no node; returns its assignment if it has one.
    pub(super) fn place_locked(&self, rec: &mut SourceRecord) -> Result<Option<Assignment>> {
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
        Ok(Some(self.assignment_of(rec, &node, &addr)))
    }

    /// The assignment of `source`, placing it now if needed.
    pub fn assignment(&self, source: &str) -> Result<Assignment> {
        let _g = lock(&self.placement);
        let mut rec = self.source(source)?;
        if rec.state == "removing" {
            return Err(RegistryError::UnknownSource(source.to_string()));
        }
        let a = self.place_locked(&mut rec)?;
        self.put_source(&rec)?;
        a.ok_or_else(|| RegistryError::Unassigned(source.to_string(), rec.error.clone()))
    }

    /// Records what an agent said about a sync.
    pub fn sync_report(&self, agent: &str, r: &SyncReport) -> Result<()> {
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
        s.recheck_bytes = r.recheck_bytes.min(s.size_bytes);
        if r.outcome != SyncOutcome::Running {
            lock(&self.progress).remove(&r.source);
        }
        match &r.outcome {
            SyncOutcome::Done { point, warnings } => {
                s.state = "ok".into();
                s.error.clear();
                s.last_point = *point;
                s.last_sync_ms = now_ms();
                s.warning = warnings.join("; ");
                if !s.warning.is_empty() {
                    tracing::warn!(source = %s.name, point, "sync warning: {}", s.warning);
                }
            }
            SyncOutcome::Failed(error) => {
                s.state = "error".into();
                s.error = error.clone();
            }
            SyncOutcome::Running => s.state = "syncing".into(),
        }
        self.put_source(&s)?;
        // A finished sync's warnings (a failed quiesce hook, a log file sent anew)
        // are its source's alerts until the next finished sync.
        if let SyncOutcome::Done { warnings, .. } = &r.outcome {
            let alerts: Vec<Alert> = warnings
                .iter()
                .map(|w| Alert {
                    // One alert per distinct warning.
                    key: format!(
                        "sync-warning/{}/{}",
                        s.name,
                        &blake3::hash(w.as_bytes()).to_hex()[..12]
                    ),
                    severity: "warning".into(),
                    subject: s.name.clone(),
                    message: w.clone(),
                })
                .collect();
            self.report_alerts(&format!("source/{}", s.name), &alerts)?;
        }
        Ok(())
    }
}

impl Registry {
    pub(super) fn assignment_of(&self, s: &SourceRecord, node: &str, addr: &str) -> Assignment {
        assignment(s, self.effective(s).policy, node, addr)
    }
}

pub(super) fn assignment(s: &SourceRecord, policy: Policy, node: &str, addr: &str) -> Assignment {
    Assignment {
        source: s.name.clone(),
        agent: s.agent.clone(),
        node: node.to_string(),
        node_address: addr.to_string(),
        epoch: s.epoch,
        size_bytes: s.size_bytes,
        block_size: s.block_size,
        policy,
        moving_to: s.moving_to.clone(),
        group: s.group.clone(),
    }
}

/// A short stable key for a name that may not be printable.
pub(super) fn blake3_key(name: &str) -> String {
    blake3::hash(name.as_bytes()).to_hex()[..12].to_string()
}
