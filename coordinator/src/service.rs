//! The `bulwark.v1.Coordinator` gRPC service: adapters over the [`Registry`], the
//! relay of admin commands down agents' control streams, and the few calls the
//! coordinator makes to nodes (listing points, granting restores).

use bulwark_common::telemetry::TracedChannel;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bulwark_common::tls::{self, Identity, Role, Target, TlsIdentity, require};
use bulwark_proto as pb;
use bulwark_proto::node_client::NodeClient;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::registry::{Registry, RegistryError, SourceRecord};

mod locks;

/// The coordinator's service state.
pub struct CoordinatorService {
    registry: Arc<Registry>,
    /// Ends the agents' control streams, which would otherwise hold a graceful
    /// shutdown open for ever.
    shutdown: CancellationToken,
    /// Dials nodes with the coordinator's certificate, checking each is the node
    /// of that name (one configuration per node, made on first use).
    identity: TlsIdentity,
    /// Channels to nodes by address, with the node's name and the revocation list
    /// version they were made under (a new list makes new connections).
    node_channels: Mutex<HashMap<String, (String, u64, TracedChannel)>>,
    /// One move at a time in the fleet: each copies a whole source node to node.
    moves: tokio::sync::Mutex<()>,
    /// Largest spread of node fill ratios a rebalance leaves.
    rebalance_spread: f64,
    /// Scheduled syncs running: source → node.
    scheduled: Arc<Mutex<HashMap<String, String>>>,
    /// Most scheduled syncs one node runs at once.
    max_syncs_per_node: u32,
    /// Tokens and the CA key, when `[enrollment]` is configured.
    enroller: Option<Arc<crate::enroll::Enroller>>,
    /// A control stream that carries nothing for this long is cut.
    idle: std::time::Duration,
    /// Stale copies a node keeps for their retention lock: (source, node) → when to
    /// ask it again.
    drops_held: Mutex<HashMap<(String, String), std::time::Instant>>,
    /// The fleet's revocation list.
    revocations: Option<Arc<crate::revocation::RevocationStore>>,
}

impl CoordinatorService {
    /// A service over `registry`; `identity` dials nodes with the coordinator's
    /// certificate.
    pub fn new(
        registry: Arc<Registry>,
        identity: TlsIdentity,
        shutdown: CancellationToken,
    ) -> CoordinatorService {
        CoordinatorService {
            registry,
            shutdown,
            identity,
            node_channels: Mutex::new(HashMap::new()),
            moves: tokio::sync::Mutex::new(()),
            rebalance_spread: 0.10,
            scheduled: Arc::new(Mutex::new(HashMap::new())),
            max_syncs_per_node: 4,
            enroller: None,
            idle: std::time::Duration::from_secs(60),
            drops_held: Mutex::new(HashMap::new()),
            revocations: None,
        }
    }

    /// Keeps and hands out the fleet's revocation list.
    pub fn with_revocations(mut self, r: Arc<crate::revocation::RevocationStore>) -> Self {
        self.revocations = Some(r);
        self
    }

    fn revocations(&self) -> Result<&crate::revocation::RevocationStore, Status> {
        self.revocations
            .as_deref()
            .ok_or_else(|| Status::unavailable("this coordinator keeps no revocation list"))
    }

    /// Turns on enrollment and renewal.
    pub fn with_enroller(mut self, e: Arc<crate::enroll::Enroller>) -> Self {
        self.enroller = Some(e);
        self
    }

    fn enroller(&self) -> Result<&crate::enroll::Enroller, Status> {
        self.enroller.as_deref().ok_or_else(|| {
            Status::failed_precondition(
                "enrollment is off on this coordinator: add an [enrollment] table (listen, ca_key) to its config",
            )
        })
    }

    /// Sets how long an agent's control stream may carry nothing.
    pub fn with_stream_idle_timeout(mut self, idle: std::time::Duration) -> Self {
        self.idle = idle;
        self
    }

    /// Sets the most scheduled syncs one node runs at once.
    pub fn with_max_syncs_per_node(mut self, n: u32) -> Self {
        self.max_syncs_per_node = n.max(1);
        self
    }

    /// One pass of the protection groups' schedule (see [`crate::schedule`]): plans
    /// each member's next slot, starts the due syncs each node has room for, and
    /// raises `sync-late` (due for more than half an interval) and `sync-missed`
    /// (no sync for two intervals) alerts.
    pub async fn schedule_tick(&self) -> Result<(), RegistryError> {
        use crate::schedule::{Due, next_due, next_slot, next_time_of_day, to_start};
        let now = bulwark_common::time::now_ms();
        let groups: HashMap<String, crate::registry::GroupRecord> = self
            .registry
            .groups()?
            .into_iter()
            .map(|g| (g.name.clone(), g))
            .collect();
        let inflight = self
            .scheduled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut running: HashMap<String, u32> = HashMap::new();
        for node in inflight.values() {
            *running.entry(node.clone()).or_default() += 1;
        }
        let mut due = Vec::new();
        let mut alerts = Vec::new();
        let mut intervals = HashMap::new();
        for s in self.registry.sources()? {
            // Log sources ship on their agent's own interval (minutes), whatever
            // their group's volume schedule; the group pairs them for restore --at.
            if s.group.is_empty() || s.kind == "log" {
                continue;
            }
            let Some(g) = groups.get(&s.group) else {
                alerts.push(pb::Alert {
                    key: format!("group-missing/{}", s.name),
                    severity: "warning".into(),
                    subject: s.name.clone(),
                    message: format!(
                        "{} is in group {}, which does not exist: create it with `bulwark group create`",
                        s.name, s.group
                    ),
                    ..Default::default()
                });
                continue;
            };
            let interval = g.interval_ms as i64;
            intervals.insert(s.name.clone(), (g.interval_ms, g.point_times.clone()));
            if s.next_sync_ms == 0 {
                self.registry.set_next_sync(
                    &s.name,
                    next_due(&s.name, g.interval_ms, &g.point_times, now),
                )?;
                continue;
            }
            let since = s.last_sync_ms.max(s.group_since_ms);
            if now - since > 2 * interval {
                alerts.push(pb::Alert {
                    key: format!("sync-missed/{}", s.name),
                    severity: "critical".into(),
                    subject: s.name.clone(),
                    message: format!(
                        "no sync of {} for {} s; group {} syncs every {} s",
                        s.name,
                        (now - since) / 1000,
                        g.name,
                        interval / 1000
                    ),
                    ..Default::default()
                });
            } else if now - s.next_sync_ms > interval / 2 {
                alerts.push(pb::Alert {
                    key: format!("sync-late/{}", s.name),
                    severity: "warning".into(),
                    subject: s.name.clone(),
                    message: format!(
                        "the sync of {} due {} s ago has not started (node busy, agent offline or source moving)",
                        s.name,
                        (now - s.next_sync_ms) / 1000
                    ),
                    ..Default::default()
                });
            }
            let Some(node) = s.node.clone() else {
                continue;
            };
            if now >= s.next_sync_ms
                && !inflight.contains_key(&s.name)
                && s.moving_to.is_empty()
                && self.registry.connected(&s.agent)
            {
                due.push(Due {
                    source: s.name.clone(),
                    node,
                    due_ms: s.next_sync_ms,
                });
            }
        }
        for d in to_start(due, &running, self.max_syncs_per_node) {
            let Ok(s) = self.registry.source(&d.source) else {
                continue;
            };
            let (interval, times) = intervals
                .get(&d.source)
                .cloned()
                .unwrap_or((60_000, Vec::new()));
            // The interval's phase is kept; a recovery-point time may come first.
            let mut next = d.due_ms + interval as i64;
            if next <= now {
                next = next_slot(&d.source, interval, now);
            }
            if let Some(t) = next_time_of_day(&times, now) {
                next = next.min(t);
            }
            self.registry.set_next_sync(&d.source, next)?;
            let source = d.source.clone();
            let rx = match self
                .registry
                .dispatch(&s.agent, |id| {
                    pb::coordinator_command::Cmd::Sync(pb::SyncCommand {
                        command_id: id,
                        source,
                        check: false,
                        deep: false,
                        trace_context: bulwark_common::telemetry::inject_map(),
                    })
                })
                .await
            {
                Ok(rx) => rx,
                Err(e) => {
                    tracing::warn!(source = %d.source, "scheduled sync not started: {e}");
                    continue;
                }
            };
            tracing::info!(source = %d.source, node = %d.node, "scheduled sync started");
            self.scheduled
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(d.source.clone(), d.node.clone());
            let scheduled = self.scheduled.clone();
            tokio::spawn(async move {
                let outcome = rx.await;
                if let Ok(Err(e)) = &outcome {
                    tracing::warn!(source = %d.source, "scheduled sync failed: {e}");
                }
                scheduled
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&d.source);
            });
        }
        self.registry.report_alerts("coordinator/schedule", &alerts)
    }

    /// Scheduled syncs running, by node.
    pub fn scheduled_per_node(&self) -> HashMap<String, u32> {
        let mut out = HashMap::new();
        for node in self
            .scheduled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            *out.entry(node.clone()).or_default() += 1;
        }
        out
    }

    /// Sets the largest fill spread a rebalance leaves (a fraction, 0.10 = 10%).
    pub fn with_rebalance_spread(mut self, spread: f64) -> Self {
        self.rebalance_spread = spread;
        self
    }

    /// Moves `source` to node `to`: marks the move (syncs wait), has `to` copy the
    /// source from its node and verify every checksum, switches the assignment with
    /// a new epoch, then has the old node drop its copy. A move that fails leaves
    /// the source where it was.
    pub async fn move_source(&self, source: &str, to: &str) -> pb::SourceMove {
        let _one = self.moves.lock().await;
        let started = std::time::Instant::now();
        let mut report = pb::SourceMove {
            source: source.to_string(),
            to: to.to_string(),
            ..Default::default()
        };
        let r: Result<(), Status> = async {
            let s = self.registry.source(source)?;
            let from = s
                .node
                .clone()
                .ok_or_else(|| RegistryError::Unassigned(source.to_string(), s.error.clone()))?;
            report.from = from.clone();
            if from == to {
                return Err(Status::invalid_argument(format!("{source} is on {to} already")));
            }
            let from_rec = self
                .registry
                .node(&from)?
                .ok_or_else(|| Status::not_found(format!("no storage node named {from}")))?;
            let mut target = self.node_client(to)?;
            self.registry.begin_move(source, to)?;
            tracing::info!(source, %from, to, "move started");
            let imported = target
                .import(pb::ImportRequest {
                    source: source.to_string(),
                    from_node: from.clone(),
                    from_address: from_rec.address.clone(),
                })
                .await;
            match imported {
                Ok(r) => {
                    let r = r.into_inner();
                    report.bytes = r.bytes;
                    report.points = r.points;
                    // A crash here leaves a whole copy on the target, not switched to.
                    bulwark_common::failpoint::hit("coordinator-move-copied");
                    self.registry.finish_move(source)?;
                    tracing::info!(source, %from, to, bytes = r.bytes, points = r.points, "move finished: the source is on its new node");
                    self.drop_copy(source, &from).await;
                    Ok(())
                }
                Err(st) => {
                    let partial = self.registry.abort_move(source)?;
                    tracing::warn!(source, %from, to, "move failed, the source stays on {from}: {}", st.message());
                    self.drop_copy(source, &partial).await;
                    Err(Status::new(st.code(), format!("node {to}: {}", st.message())))
                }
            }
        }
        .await;
        if let Err(st) = r {
            report.error = st.message().to_string();
        }
        report.duration_ms = started.elapsed().as_millis() as u64;
        report
    }

    /// Asks `node` to delete its copy of `source` (not assigned there); what fails
    /// stays listed on the source and is retried by the monitor.
    pub async fn drop_copy(&self, source: &str, node: &str) {
        let key = (source.to_string(), node.to_string());
        let now = std::time::Instant::now();
        if self
            .drops_held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .is_some_and(|until| *until > now)
        {
            return;
        }
        let Ok(mut client) = self.node_client(node) else {
            return;
        };
        match client
            .drop_source(pb::DropSourceRequest {
                source: source.to_string(),
            })
            .await
        {
            Ok(_) => {
                if let Err(e) = self.registry.copy_dropped(source, node) {
                    tracing::warn!(source, node, "cannot record a dropped copy: {e}");
                }
            }
            Err(st)
                if st.code() == tonic::Code::FailedPrecondition
                    && st.message().contains("retention lock") =>
            {
                // Kept until its points age out of the lock: asked again hourly.
                tracing::info!(
                    source,
                    node,
                    "stale copy kept by its retention lock: {}",
                    st.message()
                );
                self.drops_held
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key, now + std::time::Duration::from_secs(3600));
            }
            Err(st) => {
                tracing::warn!(source, node, "stale copy not dropped yet: {}", st.message())
            }
        }
    }

    /// Ends the moves a coordinator crash interrupted (they roll back: the source
    /// stays on its node; the partial copy is dropped), and retries the drops of
    /// stale copies.
    pub async fn tidy_moves(&self) {
        let Ok(sources) = self.registry.sources() else {
            return;
        };
        for s in sources {
            if !s.moving_to.is_empty() && self.moves.try_lock().is_ok() {
                tracing::warn!(source = %s.name, to = %s.moving_to, "rolling back a move the coordinator did not finish");
                match self.registry.abort_move(&s.name) {
                    Ok(to) => self.drop_copy(&s.name, &to).await,
                    Err(e) => tracing::warn!(source = %s.name, "cannot roll back the move: {e}"),
                }
            }
            for n in &s.stale_copies {
                self.drop_copy(&s.name, n).await;
            }
        }
    }

    /// The report of a list of moves.
    fn move_report(
        moves: Vec<pb::SourceMove>,
        before: f64,
        after: f64,
        lower: u64,
        dry_run: bool,
    ) -> pb::MoveReport {
        pb::MoveReport {
            moves,
            spread_before: before,
            spread_after: after,
            lower_bound_bytes: lower,
            dry_run,
        }
    }

    fn node_client(&self, node: &str) -> Result<NodeClient<TracedChannel>, Status> {
        let rec = self
            .registry
            .node(node)?
            .ok_or_else(|| Status::not_found(format!("no storage node named {node}")))?;
        let version = self.identity.revocations().version();
        let mut map = self.node_channels.lock().unwrap_or_else(|e| e.into_inner());
        let ch = match map.get(&rec.address) {
            Some((n, v, c)) if n == node && *v == version => c.clone(),
            _ => {
                let target = Target::parse(&rec.address)
                    .map_err(|m| Status::internal(format!("node {node} has a bad address: {m}")))?;
                let cfg = self
                    .identity
                    .client_config_for(Role::Node, Some(node))
                    .map_err(|e| Status::internal(e.to_string()))?;
                let c = tls::channel_lazy(&target, cfg).map_err(Status::internal)?;
                map.insert(rec.address.clone(), (node.to_string(), version, c.clone()));
                c
            }
        };
        Ok(NodeClient::new(ch)
            .max_decoding_message_size(bulwark_common::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(bulwark_common::MAX_MESSAGE_BYTES))
    }

    fn group_proto(&self, g: &crate::registry::GroupRecord) -> Result<pb::Group, Status> {
        Ok(pb::Group {
            name: g.name.clone(),
            interval_ms: g.interval_ms,
            retention: g.retention.map(|r| r.to_proto()),
            point_times: g.point_times.clone(),
            replica_alloc_bytes: g.replica_alloc_bytes,
            points_alloc_bytes: g.points_alloc_bytes,
            allow: g.allow.clone(),
            lock: Some(crate::policy::LockPolicy::to_proto(g.lock)),
            sources: self
                .registry
                .sources()?
                .into_iter()
                .filter(|s| s.group == g.name)
                .map(|s| s.name)
                .collect(),
        })
    }

    /// The registry.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// Verifies a source's stored data on its node. Replica blocks found damaged
    /// are repaired from the agent, when it is connected, by a deep consistency
    /// check (which re-sends exactly the blocks whose bytes no longer match, and
    /// keeps no before-image of damage), and the data is verified again so that
    /// the points' damage marks say what is left.
    pub async fn verify(&self, source: &str, point: u64) -> Result<pb::VerifyReport, Status> {
        let s = self.registry.source(source)?;
        let node = self.node_of(source)?;
        let mut client = self.node_client(&node)?;
        let at_node = |st: Status| Status::new(st.code(), format!("node {node}: {}", st.message()));
        let request = pb::NodeVerifyRequest {
            source: source.to_string(),
            point,
        };
        let first = client
            .verify(request.clone())
            .await
            .map_err(at_node)?
            .into_inner();
        if first.damaged_replica_blocks.is_empty() {
            return Ok(first);
        }
        let damaged = first.damaged_replica_blocks.len();
        if !self.registry.connected(&s.agent) {
            return Ok(pb::VerifyReport {
                repair_error: format!(
                    "{damaged} damaged replica block(s) not repaired: agent {} is not connected; run `bulwark check {source} --deep` when it is",
                    s.agent
                ),
                ..first
            });
        }
        tracing::warn!(source, blocks = damaged, agent = %s.agent, "repairing damaged replica blocks from the agent");
        let rx = self
            .registry
            .dispatch(&s.agent, |id| {
                pb::coordinator_command::Cmd::Sync(pb::SyncCommand {
                    command_id: id,
                    source: source.to_string(),
                    check: true,
                    deep: true,
                    trace_context: bulwark_common::telemetry::inject_map(),
                })
            })
            .await?;
        let repaired = match command_outcome(rx, "repair", source, &s.agent).await {
            Ok(pb::command_result::Outcome::Sync(r)) => Ok(r.blocks_sent),
            Ok(_) => Err("the agent answered with another result".to_string()),
            Err(st) => Err(st.message().to_string()),
        };
        let mut again = client.verify(request).await.map_err(at_node)?.into_inner();
        // What the first pass read is what the operator asked for; the figures of
        // the second pass are only for the damage left.
        again.blocks_checked = first.blocks_checked;
        again.bytes_read = first.bytes_read;
        again.duration_ms += first.duration_ms;
        match repaired {
            Ok(n) => again.repaired_blocks = n,
            Err(e) => again.repair_error = format!("repair by a deep check failed: {e}"),
        }
        // The damage the first pass found, so the report says what was wrong.
        again.damaged_replica_blocks = first.damaged_replica_blocks;
        Ok(again)
    }

    fn node_of(&self, source: &str) -> Result<String, Status> {
        let s = self.registry.source(source)?;
        s.node
            .ok_or_else(|| RegistryError::Unassigned(source.to_string(), s.error).into())
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Waits for the result of a command relayed to `agent`.
async fn command_outcome(
    rx: tokio::sync::oneshot::Receiver<crate::registry::CommandOutcome>,
    what: &str,
    source: &str,
    agent: &str,
) -> Result<pb::command_result::Outcome, Status> {
    match rx.await {
        Ok(Ok(outcome)) => Ok(outcome),
        Ok(Err(e)) => Err(Status::aborted(format!(
            "{what} of {source} on agent {agent} failed: {e}"
        ))),
        Err(_) => Err(Status::unavailable(format!(
            "agent {agent} went away during the {what}"
        ))),
    }
}

async fn control_loop(
    registry: Arc<Registry>,
    agent: Identity,
    conn: u64,
    mut inbound: Streaming<pb::AgentMessage>,
    idle: std::time::Duration,
) {
    use pb::agent_message::Msg;
    loop {
        let Ok(next) = tokio::time::timeout(idle, inbound.message()).await else {
            tracing::warn!(agent = %agent.name, idle_s = idle.as_secs(), "control stream cut: the agent sent nothing for the idle timeout");
            bulwark_common::metrics::counter_add(
                "bulwark_refusals_total",
                &[("reason", "idle")],
                1,
            );
            break;
        };
        match next {
            Ok(Some(pb::AgentMessage {
                msg: Some(Msg::Ping(_)),
            })) => {}
            Ok(Some(pb::AgentMessage {
                msg: Some(Msg::Result(r)),
            })) => registry.complete(&agent.name, r),
            Ok(Some(pb::AgentMessage {
                msg: Some(Msg::Progress(p)),
            })) => registry.progress(&agent.name, p),
            Ok(Some(pb::AgentMessage {
                msg: Some(Msg::Report(r)),
            })) => {
                if let Err(e) = registry.sync_report(&agent.name, &r) {
                    tracing::warn!(agent = %agent.name, "sync report refused: {e}");
                }
            }
            Ok(Some(_)) => {
                tracing::warn!(agent = %agent.name, "unexpected message on the control stream ignored")
            }
            Ok(None) => break,
            Err(s) => {
                tracing::info!(agent = %agent.name, "control stream broke: {}", s.message());
                break;
            }
        }
    }
    tracing::info!(agent = %agent.name, "agent disconnected");
    registry.disconnect(&agent.name, conn);
}

/// The handle tonic serves.
#[derive(Clone)]
pub struct CoordinatorApi(pub Arc<CoordinatorService>);

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for CoordinatorApi {
    type ControlStream = BoxStream<pb::CoordinatorCommand>;

    async fn register_node(
        &self,
        req: Request<pb::RegisterNodeRequest>,
    ) -> Result<Response<pb::RegisterNodeResponse>, Status> {
        let node = require(&req, "RegisterNode", &[Role::Node])?;
        let r = req.into_inner();
        Target::parse(&r.address).map_err(Status::invalid_argument)?;
        if let Err(why) = bulwark_common::compatible(bulwark_common::VERSION, &r.version) {
            tracing::warn!(%node, version = %r.version, "refused: {why}");
            return Err(Status::failed_precondition(format!(
                "node {}: {why}",
                node.name
            )));
        }
        self.0.registry.register_node(&node.name, &r)?;
        Ok(Response::new(pb::RegisterNodeResponse {
            assignments: self.0.registry.assignments_of(&node.name)?,
        }))
    }

    async fn node_heartbeat(
        &self,
        req: Request<pb::NodeHeartbeatRequest>,
    ) -> Result<Response<pb::NodeHeartbeatResponse>, Status> {
        let node = require(&req, "NodeHeartbeat", &[Role::Node])?;
        let expiry = tls::cert_expiry(&req);
        let hb = req.into_inner();
        if let Some(t) = expiry {
            self.0.registry.saw_certificate(Role::Node, &node.name, t)?;
        }
        match self.0.registry.heartbeat(&node.name, &hb)? {
            Some(()) => Ok(Response::new(pb::NodeHeartbeatResponse {
                assignments: self.0.registry.assignments_of(&node.name)?,
                revocations: self
                    .0
                    .revocations
                    .as_ref()
                    .and_then(|r| r.for_version(hb.revocations_version)),
            })),
            None => Err(Status::not_found(format!(
                "node {} is not registered; register first",
                node.name
            ))),
        }
    }

    async fn get_assignment(
        &self,
        req: Request<pb::GetAssignmentRequest>,
    ) -> Result<Response<pb::Assignment>, Status> {
        let caller = require(&req, "GetAssignment", &[Role::Node, Role::Agent])?;
        let source = req.into_inner().source;
        if caller.role == Role::Agent {
            let s = self.0.registry.source(&source)?;
            if s.agent != caller.name {
                tracing::warn!(%caller, source, "refused: not the owner");
                return Err(Status::permission_denied(format!(
                    "data source {source} belongs to agent {}, not {}",
                    s.agent, caller.name
                )));
            }
        }
        Ok(Response::new(self.0.registry.assignment(&source)?))
    }

    async fn control(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ControlStream>, Status> {
        let agent = require(&req, "Control", &[Role::Agent])?;
        let expiry = tls::cert_expiry(&req);
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(self.0.idle, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within the idle timeout"))?;
        let hello = match first? {
            Some(pb::AgentMessage {
                msg: Some(pb::agent_message::Msg::Hello(h)),
            }) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the control stream must start with Hello",
                ));
            }
        };
        if let Err(why) = bulwark_common::compatible(bulwark_common::VERSION, &hello.version) {
            tracing::warn!(%agent, version = %hello.version, "refused: {why}");
            return Err(Status::failed_precondition(format!(
                "agent {}: {why}",
                agent.name
            )));
        }
        let most = crate::registry::MAX_SOURCES_PER_AGENT;
        if hello.sources.len() > most {
            tracing::warn!(%agent, sources = hello.sources.len(), "refused: a Hello with too many sources");
            return Err(Status::invalid_argument(format!(
                "agent {}: its Hello lists {} data sources; an agent may have at most {most}",
                agent.name,
                hello.sources.len()
            )));
        }
        let registry = self.0.registry.clone();
        let sources = registry.hello(&agent.name, &hello)?;
        if let Some(t) = expiry {
            registry.saw_certificate(Role::Agent, &agent.name, t)?;
        }
        let (tx, rx) = mpsc::channel(16);
        let welcome = pb::CoordinatorCommand {
            cmd: Some(pb::coordinator_command::Cmd::Welcome(pb::Welcome {
                sources,
            })),
        };
        let _ = tx.send(Ok(welcome)).await;
        let conn = registry.connect(&agent.name, tx.clone());
        // Right after Welcome (changes follow on the same stream, see
        // `Registry::broadcast`; the agent takes only a newer list).
        if let Some(r) = &self.0.revocations {
            let _ = tx
                .send(Ok(pb::CoordinatorCommand {
                    cmd: Some(pb::coordinator_command::Cmd::Revocations(r.list())),
                }))
                .await;
        }
        tracing::info!(agent = %agent.name, sources = hello.sources.len(), "agent connected");
        tokio::spawn(control_loop(registry, agent, conn, inbound, self.0.idle));
        let commands =
            ReceiverStream::new(rx).take_until(self.0.shutdown.clone().cancelled_owned());
        Ok(Response::new(Box::pin(commands)))
    }

    async fn list_nodes(
        &self,
        req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        require(&req, "ListNodes", &[Role::Admin])?;
        let reg = &self.0.registry;
        let loads = reg.node_loads()?;
        let nodes = reg
            .nodes()?
            .into_iter()
            .map(|n| {
                let load = loads.get(&n.name).copied().unwrap_or_default();
                pb::NodeInfo {
                    state: if !reg.node_up(&n) {
                        "down"
                    } else if n.draining {
                        "draining"
                    } else {
                        "up"
                    }
                    .into(),
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
            })
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn list_agents(
        &self,
        req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        require(&req, "ListAgents", &[Role::Admin])?;
        let reg = &self.0.registry;
        let agents = reg
            .agents()?
            .into_iter()
            .map(|a| pb::AgentInfo {
                connected: reg.connected(&a.name),
                name: a.name,
                last_seen_ms: a.last_seen_ms,
                sources: a.sources,
                version: a.version,
            })
            .collect();
        Ok(Response::new(pb::ListAgentsResponse { agents }))
    }

    async fn revoke(
        &self,
        req: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::Revocation>, Status> {
        let admin = require(&req, "Revoke", &[Role::Admin])?;
        let r = req.into_inner();
        Ok(Response::new(self.0.revocations()?.revoke(
            &r.role,
            &r.name,
            &admin.name,
        )?))
    }

    async fn list_revocations(
        &self,
        req: Request<pb::ListRevocationsRequest>,
    ) -> Result<Response<pb::RevocationList>, Status> {
        require(
            &req,
            "ListRevocations",
            &[Role::Admin, Role::Node, Role::Agent],
        )?;
        Ok(Response::new(self.0.revocations()?.list()))
    }

    async fn set_quota(&self, req: Request<pb::Quota>) -> Result<Response<pb::Quota>, Status> {
        let admin = require(&req, "SetQuota", &[Role::Admin])?;
        let q = req.into_inner();
        let quota = (!q.clear).then_some(crate::policy::Quota {
            max_source_size_bytes: q.max_source_size_bytes,
            max_total_bytes: q.max_total_bytes,
        });
        tracing::info!(%admin, agent = %q.agent, ?quota, "quota requested");
        let set = self.0.registry.set_quota(&q.agent, quota)?;
        let used = self.0.registry.agent_allocated(&q.agent)?;
        Ok(Response::new(quota_proto(q.agent, set, used)))
    }

    async fn list_quotas(
        &self,
        req: Request<pb::ListQuotasRequest>,
    ) -> Result<Response<pb::ListQuotasResponse>, Status> {
        require(&req, "ListQuotas", &[Role::Admin])?;
        let reg = &self.0.registry;
        let quotas = reg
            .quotas()?
            .into_iter()
            .map(|r| {
                let used = reg.agent_allocated(&r.agent)?;
                Ok(quota_proto(r.agent, r.quota, used))
            })
            .collect::<Result<_, RegistryError>>()?;
        let d = reg.fleet_policy().quota;
        Ok(Response::new(pb::ListQuotasResponse {
            quotas,
            fleet_default: Some(quota_proto(String::new(), d, 0)),
        }))
    }

    async fn set_retention(
        &self,
        req: Request<pb::SetRetentionRequest>,
    ) -> Result<Response<pb::SourceInfo>, Status> {
        let admin = require(&req, "SetRetention", &[Role::Admin])?;
        let r = req.into_inner();
        let retention = match (r.clear, r.retention.as_ref()) {
            (true, _) => None,
            (false, Some(x)) => Some(bulwark_common::retention::Retention::from_proto(Some(x))),
            (false, None) => {
                return Err(Status::invalid_argument(
                    "give a retention, or clear the source's own",
                ));
            }
        };
        tracing::info!(%admin, source = %r.source, "retention requested");
        let s = self.0.registry.set_retention(&r.source, retention)?;
        Ok(Response::new(source_info(&self.0.registry, s)))
    }

    async fn allow_group(
        &self,
        req: Request<pb::AllowGroupRequest>,
    ) -> Result<Response<pb::Group>, Status> {
        let admin = require(&req, "AllowGroup", &[Role::Admin])?;
        let r = req.into_inner();
        tracing::info!(%admin, group = %r.group, pattern = %r.pattern, remove = r.remove, "group patterns requested");
        let g = self
            .0
            .registry
            .allow_group(&r.group, &r.pattern, r.remove)?;
        Ok(Response::new(self.0.group_proto(&g)?))
    }

    async fn lock(
        &self,
        req: Request<pb::LockRequest>,
    ) -> Result<Response<pb::LockResponse>, Status> {
        let caller = require(&req, "Lock", &[Role::Admin, Role::Officer])?;
        let r = req.into_inner();
        Ok(Response::new(self.0.set_lock(&caller, r).await?))
    }

    async fn remove_source(
        &self,
        req: Request<pb::RemoveSourceRequest>,
    ) -> Result<Response<pb::RemoveSourceResponse>, Status> {
        let admin = require(&req, "RemoveSource", &[Role::Admin])?;
        let source = req.into_inner().source;
        Ok(Response::new(self.0.remove(&admin, source).await?))
    }

    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let admin = require(&req, "CreateToken", &[Role::Admin])?;
        let r = req.into_inner();
        let (token, expires_at_ms) = self
            .0
            .enroller()?
            .create(&r.role, &r.name, r.ttl_ms, &r.dns, &r.ips)?;
        tracing::info!(%admin, role = %r.role, name = %r.name, "token issued");
        Ok(Response::new(pb::CreateTokenResponse {
            token,
            expires_at_ms,
        }))
    }

    async fn renew(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        let caller = require(&req, "Renew", &[Role::Node, Role::Agent])?;
        let presented = req
            .peer_certs()
            .and_then(|c| c.first().cloned())
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let r = req.into_inner();
        Ok(Response::new(self.0.enroller()?.renew(
            caller.role,
            &caller.name,
            presented.as_ref(),
            &r,
        )?))
    }

    async fn list_sources(
        &self,
        req: Request<pb::ListSourcesRequest>,
    ) -> Result<Response<pb::ListSourcesResponse>, Status> {
        require(&req, "ListSources", &[Role::Admin])?;
        let sources = self
            .0
            .registry
            .sources()?
            .into_iter()
            .map(|s| {
                let progress = self.0.registry.current_progress(&s.name);
                pb::SourceInfo {
                    progress,
                    ..source_info(&self.0.registry, s)
                }
            })
            .collect();
        Ok(Response::new(pb::ListSourcesResponse { sources }))
    }

    async fn allocate(
        &self,
        req: Request<pb::AllocateRequest>,
    ) -> Result<Response<pb::AllocateResponse>, Status> {
        let admin = require(&req, "Allocate", &[Role::Admin])?;
        let r = req.into_inner();
        if r.replica_alloc_bytes == 0 && r.points_alloc_bytes == 0 {
            return Err(Status::invalid_argument(
                "say what to allocate: --replica SIZE and/or --points SIZE",
            ));
        }
        tracing::info!(%admin, source = %r.source, replica = r.replica_alloc_bytes, points = r.points_alloc_bytes, "allocation requested");
        let s = self
            .0
            .registry
            .allocate(&r.source, r.replica_alloc_bytes, r.points_alloc_bytes)?;
        Ok(Response::new(pb::AllocateResponse {
            source: Some(source_info(&self.0.registry, s)),
        }))
    }

    async fn list_alerts(
        &self,
        req: Request<pb::ListAlertsRequest>,
    ) -> Result<Response<pb::ListAlertsResponse>, Status> {
        require(&req, "ListAlerts", &[Role::Admin])?;
        let all = req.into_inner().all;
        let alerts = self
            .0
            .registry
            .alerts(all)?
            .iter()
            .map(|a| a.to_proto())
            .collect();
        Ok(Response::new(pb::ListAlertsResponse { alerts }))
    }

    async fn locate(
        &self,
        req: Request<pb::LocateRequest>,
    ) -> Result<Response<pb::LocateResponse>, Status> {
        require(&req, "Locate", &[Role::Admin, Role::Officer])?;
        let source = req.into_inner().source;
        let s = self.0.registry.source(&source)?;
        let node = self.0.node_of(&source)?;
        let n = self
            .0
            .registry
            .node(&node)?
            .ok_or_else(|| Status::not_found(format!("node {node} is not registered")))?;
        Ok(Response::new(pb::LocateResponse {
            node,
            node_address: n.address,
            nbd_address: n.nbd_address,
            size_bytes: s.size_bytes,
            block_size: s.block_size,
        }))
    }

    async fn drain(
        &self,
        req: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::MoveReport>, Status> {
        let admin = require(&req, "Drain", &[Role::Admin])?;
        let node = req.into_inner().node;
        let svc = &self.0;
        svc.registry.set_draining(&node, true)?;
        tracing::info!(%admin, node, "drain started");
        let before = crate::placement::spread(&svc.registry.node_figures()?);
        let mut moves = Vec::new();
        let mut on_node: Vec<crate::registry::SourceRecord> = svc
            .registry
            .sources()?
            .into_iter()
            .filter(|s| s.node.as_deref() == Some(node.as_str()))
            .collect();
        on_node.sort_by_key(|s| std::cmp::Reverse(s.allocated_bytes));
        for s in on_node {
            let figures = svc.registry.node_figures()?;
            let d = crate::placement::choose(
                &figures,
                s.allocated_bytes,
                crate::placement::Weights::default(),
            );
            let m = match d.chosen {
                Some(i) => svc.move_source(&s.name, &figures[i].name).await,
                None => pb::SourceMove {
                    source: s.name.clone(),
                    from: node.clone(),
                    bytes: s.allocated_bytes,
                    error: d.explain(),
                    ..Default::default()
                },
            };
            moves.push(m);
        }
        let after = crate::placement::spread(&svc.registry.node_figures()?);
        let failed = moves.iter().filter(|m| !m.error.is_empty()).count();
        tracing::info!(node, moved = moves.len() - failed, failed, "drain finished");
        Ok(Response::new(CoordinatorService::move_report(
            moves, before, after, 0, false,
        )))
    }

    async fn rebalance(
        &self,
        req: Request<pb::RebalanceRequest>,
    ) -> Result<Response<pb::MoveReport>, Status> {
        let admin = require(&req, "Rebalance", &[Role::Admin])?;
        let dry_run = req.into_inner().dry_run;
        let svc = &self.0;
        let figures = svc.registry.node_figures()?;
        let placed: Vec<crate::placement::Placed> = svc
            .registry
            .sources()?
            .into_iter()
            .filter_map(|s| {
                let node = figures
                    .iter()
                    .position(|n| Some(&n.name) == s.node.as_ref())?;
                Some(crate::placement::Placed {
                    name: s.name,
                    node,
                    allocated_bytes: s.allocated_bytes,
                })
            })
            .collect();
        let plan = crate::placement::plan_rebalance(&figures, &placed, svc.rebalance_spread);
        tracing::info!(%admin, dry_run, moves = plan.moves.len(), bytes = plan.bytes(), "rebalance planned");
        let mut moves = Vec::new();
        for m in &plan.moves {
            let planned = pb::SourceMove {
                source: m.source.clone(),
                from: figures[m.from].name.clone(),
                to: figures[m.to].name.clone(),
                bytes: m.bytes,
                ..Default::default()
            };
            if dry_run {
                moves.push(planned);
            } else {
                moves.push(svc.move_source(&m.source, &figures[m.to].name).await);
            }
        }
        let after = if dry_run {
            plan.spread_after
        } else {
            crate::placement::spread(&svc.registry.node_figures()?)
        };
        Ok(Response::new(CoordinatorService::move_report(
            moves,
            plan.spread_before,
            after,
            plan.lower_bound_bytes,
            dry_run,
        )))
    }

    async fn put_group(&self, req: Request<pb::Group>) -> Result<Response<pb::Group>, Status> {
        let admin = require(&req, "PutGroup", &[Role::Admin])?;
        let g = req.into_inner();
        let retention = g
            .retention
            .as_ref()
            .map(|r| bulwark_common::retention::Retention::from_proto(Some(r)));
        let rec = self.0.registry.put_group(crate::registry::GroupRecord {
            v: 1,
            name: g.name.clone(),
            interval_ms: g.interval_ms,
            retention,
            point_times: g.point_times.clone(),
            replica_alloc_bytes: g.replica_alloc_bytes,
            points_alloc_bytes: g.points_alloc_bytes,
            allow: Vec::new(),
            lock: None,
        })?;
        tracing::info!(%admin, group = %rec.name, interval_ms = rec.interval_ms, "protection group set");
        Ok(Response::new(self.0.group_proto(&rec)?))
    }

    async fn list_groups(
        &self,
        req: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        require(&req, "ListGroups", &[Role::Admin])?;
        let groups = self
            .0
            .registry
            .groups()?
            .iter()
            .map(|g| self.0.group_proto(g))
            .collect::<Result<_, _>>()?;
        Ok(Response::new(pb::ListGroupsResponse { groups }))
    }

    async fn delete_group(
        &self,
        req: Request<pb::DeleteGroupRequest>,
    ) -> Result<Response<pb::DeleteGroupResponse>, Status> {
        let admin = require(&req, "DeleteGroup", &[Role::Admin])?;
        let name = req.into_inner().name;
        self.0.registry.delete_group(&name)?;
        tracing::info!(%admin, group = %name, "protection group deleted");
        Ok(Response::new(pb::DeleteGroupResponse {}))
    }

    async fn set_group(
        &self,
        req: Request<pb::SetGroupRequest>,
    ) -> Result<Response<pb::SetGroupResponse>, Status> {
        let admin = require(&req, "SetGroup", &[Role::Admin])?;
        let r = req.into_inner();
        self.0.registry.set_group(&r.group, &r.sources)?;
        tracing::info!(%admin, group = %r.group, sources = ?r.sources, "sources put in a group");
        Ok(Response::new(pb::SetGroupResponse { sources: r.sources }))
    }

    async fn verify(
        &self,
        req: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        let admin = require(&req, "Verify", &[Role::Admin])?;
        let r = req.into_inner();
        tracing::info!(%admin, source = %r.source, point = r.point, "verify requested");
        let report = self.0.verify(&r.source, r.point).await?;
        Ok(Response::new(pb::VerifyResponse {
            report: Some(report),
        }))
    }

    async fn list_points(
        &self,
        req: Request<pb::ListPointsRequest>,
    ) -> Result<Response<pb::ListPointsResponse>, Status> {
        require(&req, "ListPoints", &[Role::Admin])?;
        let r = req.into_inner();
        let node = self.0.node_of(&r.source)?;
        let mut client = self.0.node_client(&node)?;
        let resp = client
            .list_points(r)
            .await
            .map_err(|s| Status::new(s.code(), format!("node {node}: {}", s.message())))?;
        Ok(resp)
    }

    async fn sync(
        &self,
        req: Request<pb::SyncRequest>,
    ) -> Result<Response<pb::SyncResponse>, Status> {
        let admin = require(&req, "Sync", &[Role::Admin])?;
        let r = req.into_inner();
        let s = self.0.registry.source(&r.source)?;
        if r.deep && !r.check {
            return Err(Status::invalid_argument("deep is only for a check"));
        }
        tracing::info!(%admin, source = %r.source, agent = %s.agent, check = r.check, deep = r.deep, "sync requested");
        let source = r.source.clone();
        let (check, deep) = (r.check, r.deep);
        let rx = self
            .0
            .registry
            .dispatch(&s.agent, |id| {
                pb::coordinator_command::Cmd::Sync(pb::SyncCommand {
                    command_id: id,
                    source,
                    check,
                    deep,
                    trace_context: bulwark_common::telemetry::inject_map(),
                })
            })
            .await?;
        if !r.wait {
            return Ok(Response::new(pb::SyncResponse {
                result: None,
                agent: s.agent,
            }));
        }
        let outcome = command_outcome(rx, "sync", &r.source, &s.agent).await?;
        match outcome {
            pb::command_result::Outcome::Sync(res) => Ok(Response::new(pb::SyncResponse {
                result: Some(res),
                agent: s.agent,
            })),
            _ => Err(Status::internal(
                "the agent answered a sync with another result",
            )),
        }
    }

    async fn restore(
        &self,
        req: Request<pb::RestoreRequest>,
    ) -> Result<Response<pb::RestoreResponse>, Status> {
        let admin = require(&req, "Restore", &[Role::Admin])?;
        let r = req.into_inner();
        if r.path.is_empty() {
            return Err(Status::invalid_argument(
                "a restore needs a target path (--to)",
            ));
        }
        if r.at_ms != 0 && r.point != 0 {
            return Err(Status::invalid_argument(
                "give a point or a time (--at), not both",
            ));
        }
        let s = self.0.registry.source(&r.source)?;
        let agent = if r.agent.is_empty() {
            s.agent.clone()
        } else {
            r.agent.clone()
        };
        if !self.0.registry.connected(&agent) {
            return Err(RegistryError::AgentOffline(agent).into());
        }
        let plan = if r.at_ms != 0 {
            self.0.plan_restore_at(&s, r.at_ms).await?
        } else {
            RestorePlan {
                volume: (s.kind != "log").then(|| (s.clone(), r.point)),
                log: (s.kind == "log").then(|| (s.clone(), r.point)),
            }
        };
        let mut volume_part = None;
        let mut log_part = None;
        let mut grants = Vec::new();
        for (part, rec, point) in [
            plan.volume.as_ref().map(|(rec, p)| ("volume", rec, *p)),
            plan.log.as_ref().map(|(rec, p)| ("log", rec, *p)),
        ]
        .into_iter()
        .flatten()
        {
            let assignment = self.0.registry.assignment(&rec.name)?;
            let mut point = point;
            if agent != rec.agent {
                // Another host may read exactly the points of this restore, while
                // it runs.
                point = self
                    .0
                    .grant(&assignment.node, &rec.name, &agent, point)
                    .await?;
                grants.push((assignment.node.clone(), rec.name.clone(), point));
            }
            if part == "volume" {
                volume_part = Some((rec.name.clone(), point, assignment));
            } else {
                log_part = Some((rec.name.clone(), point, assignment));
            }
        }
        tracing::info!(%admin, source = %r.source, point = r.point, at_ms = r.at_ms, %agent, path = %r.path, "restore requested");
        let path = r.path.clone();
        let at_ms = r.at_ms;
        let cmd = move |id| {
            let mut c = pb::RestoreCommand {
                command_id: id,
                path,
                at_ms,
                trace_context: bulwark_common::telemetry::inject_map(),
                ..Default::default()
            };
            match (volume_part, log_part) {
                (Some((source, point, a)), log) => {
                    c.source = source;
                    c.point = point;
                    c.assignment = Some(a);
                    c.kind = pb::SourceKind::Volume as i32;
                    c.log = log.map(|(source, point, a)| pb::LogRestore {
                        source,
                        point,
                        assignment: Some(a),
                    });
                }
                (None, Some((source, point, a))) => {
                    c.source = source;
                    c.point = point;
                    c.assignment = Some(a);
                    c.kind = pb::SourceKind::Log as i32;
                }
                (None, None) => {}
            }
            pb::coordinator_command::Cmd::Restore(c)
        };
        let rx = self.0.registry.dispatch(&agent, cmd).await?;
        // The grants end with the restore, in a task of their own: also when the
        // admin's CLI goes away (which drops this handler) before it ends.
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let svc = self.0.clone();
        let who = agent.clone();
        tokio::spawn(async move {
            let outcome = rx.await;
            svc.withdraw(&grants, &who).await;
            if let Ok(o) = outcome {
                let _ = done_tx.send(o);
            }
        });
        if !r.wait {
            return Ok(Response::new(pb::RestoreResponse {
                result: None,
                agent,
            }));
        }
        match command_outcome(done_rx, "restore", &r.source, &agent).await? {
            pb::command_result::Outcome::Restore(res) => Ok(Response::new(pb::RestoreResponse {
                result: Some(res),
                agent,
            })),
            _ => Err(Status::internal(
                "the agent answered a restore with another result",
            )),
        }
    }
}

/// What a restore reads: a volume source and point, a log source and point.
struct RestorePlan {
    volume: Option<(SourceRecord, u64)>,
    log: Option<(SourceRecord, u64)>,
}

impl CoordinatorService {
    async fn points_of(&self, source: &str) -> Result<Vec<pb::Point>, Status> {
        let node = self.node_of(source)?;
        let mut client = self.node_client(&node)?;
        Ok(client
            .list_points(pb::ListPointsRequest {
                source: source.to_string(),
            })
            .await
            .map_err(|s| Status::new(s.code(), format!("node {node}: {}", s.message())))?
            .into_inner()
            .points)
    }

    /// A restore to moment `at_ms` from `s` and the other kind of source in its
    /// protection group: the newest volume point at or before the moment, and the
    /// first log point at or after it (a ship holds every byte written before it, so
    /// that one holds the bytes up to the moment; the database's recovery target
    /// stops the replay there), or the newest log point when none is that late.
    async fn plan_restore_at(&self, s: &SourceRecord, at_ms: i64) -> Result<RestorePlan, Status> {
        let members: Vec<SourceRecord> = if s.group.is_empty() {
            vec![s.clone()]
        } else {
            // Only sources that go with this one (see `registry::paired`): a
            // host that named another host's group cannot have its logs replayed
            // into that host's database.
            self.registry
                .sources()?
                .into_iter()
                .filter(|x| x.name == s.name || crate::registry::paired(x, s))
                .collect()
        };
        let pick = |kind: &str| -> Result<Option<SourceRecord>, Status> {
            if s.kind == kind {
                return Ok(Some(s.clone()));
            }
            let found: Vec<&SourceRecord> = members.iter().filter(|x| x.kind == kind).collect();
            match found.as_slice() {
                [] => Ok(None),
                [one] => Ok(Some((*one).clone())),
                many => Err(Status::failed_precondition(format!(
                    "protection group {} has {} {kind} sources ({}); restore --at pairs one volume with one log source",
                    s.group,
                    many.len(),
                    many.iter()
                        .map(|x| x.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))),
            }
        };
        let when = bulwark_common::time::rfc3339_ms(at_ms);
        let volume = match pick("volume")? {
            Some(v) => {
                let points = self.points_of(&v.name).await?;
                let p = points
                    .iter()
                    .filter(|p| p.created_at_ms <= at_ms)
                    .max_by_key(|p| p.created_at_ms)
                    .ok_or_else(|| {
                        Status::failed_precondition(format!(
                            "data source {} has no point at or before {when}{}",
                            v.name,
                            points.first().map_or(String::new(), |p| format!(
                                " (its oldest is {})",
                                bulwark_common::time::rfc3339_ms(p.created_at_ms)
                            ))
                        ))
                    })?;
                Some((v, p.id))
            }
            None => None,
        };
        let log = match pick("log")? {
            Some(l) => {
                let points = self.points_of(&l.name).await?;
                let p = points
                    .iter()
                    .filter(|p| p.created_at_ms >= at_ms)
                    .min_by_key(|p| p.created_at_ms)
                    .or_else(|| points.last())
                    .ok_or_else(|| {
                        Status::failed_precondition(format!(
                            "log source {} has shipped nothing yet",
                            l.name
                        ))
                    })?;
                if p.created_at_ms < at_ms {
                    tracing::warn!(source = %l.name, point = p.id,
                        "restore --at {when}: the newest ship is older; logs end at {}",
                        bulwark_common::time::rfc3339_ms(p.created_at_ms));
                }
                Some((l, p.id))
            }
            None => None,
        };
        if volume.is_none() && log.is_none() {
            return Err(Status::failed_precondition(format!(
                "data source {} has nothing to restore",
                s.name
            )));
        }
        Ok(RestorePlan { volume, log })
    }
}

/// A quota for the wire.
fn quota_proto(agent: String, q: crate::policy::Quota, used_total_bytes: u64) -> pb::Quota {
    pb::Quota {
        agent,
        max_source_size_bytes: q.max_source_size_bytes,
        max_total_bytes: q.max_total_bytes,
        used_total_bytes,
        clear: false,
    }
}

/// A source for the CLI.
fn source_info(reg: &Registry, s: crate::registry::SourceRecord) -> pb::SourceInfo {
    let effective = reg.effective(&s);
    pb::SourceInfo {
        lock: Some(crate::policy::LockPolicy::to_proto(effective.policy.lock)),
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
        } else {
            s.state.clone()
        },
        replica_alloc_bytes: s.usage.replica_alloc_bytes,
        points_alloc_bytes: s.usage.points_alloc_bytes,
        points_used_bytes: s.usage.points_used_bytes,
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
