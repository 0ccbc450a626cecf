//! What nodes and the admin ask of the registry through the coordinator: node
//! registration and heartbeats, assignments, and the admin's views and settings
//! (nodes, agents, sources, quotas, retention, allocation, groups).

use bulwark_common::retention::Retention;
use bulwark_common::tls::{Identity, Role};
use bulwark_proto as pb;

use super::{CoordinatorService, Result};
use crate::error::CoordinatorError;
use crate::policy::Quota;
use crate::registry::{
    AgentRecord, Assignment, GroupRecord, Heartbeat, NodeLoad, NodeRecord, NodeRegistration,
    Progress, SourceRecord,
};

/// `SetQuota`: an agent's quota (`None`: back to the fleet default).
#[derive(Debug, Clone, PartialEq)]
pub struct QuotaOrder {
    pub agent: String,
    pub quota: Option<Quota>,
}

/// `SetRetention`: a source's own retention (`None`: cleared).
#[derive(Debug, Clone, PartialEq)]
pub struct RetentionOrder {
    pub source: String,
    pub retention: Option<Retention>,
}

/// `Allocate`: a source's space; 0 leaves a part as it is (never both 0).
#[derive(Debug, Clone, PartialEq)]
pub struct AllocateOrder {
    pub source: String,
    pub replica_alloc_bytes: u64,
    pub points_alloc_bytes: u64,
}

/// An agent's quota in force, and what its sources have allocated.
#[derive(Debug, Clone, PartialEq)]
pub struct QuotaView {
    /// Empty for the fleet default.
    pub agent: String,
    pub quota: Quota,
    pub used_total_bytes: u64,
}

/// A node as the admin sees it.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub node: NodeRecord,
    pub load: NodeLoad,
    /// "up", "down" or "draining".
    pub state: &'static str,
}

/// Where a source's data is, for `bulwark export` and `mount`.
#[derive(Debug, Clone, PartialEq)]
pub struct LocateView {
    pub node: String,
    pub node_address: String,
    pub nbd_address: String,
    pub size_bytes: u64,
    pub block_size: u32,
}

impl CoordinatorService {
    /// `RegisterNode`: a node of a compatible version, recorded; returns the
    /// assignments of the sources on it.
    pub fn register_node(&self, node: &Identity, r: &NodeRegistration) -> Result<Vec<Assignment>> {
        if let Err(why) = bulwark_common::compatible(bulwark_common::VERSION, &r.version) {
            tracing::warn!(%node, version = %r.version, "refused: {why}");
            return Err(CoordinatorError::Refused(format!(
                "node {}: {why}",
                node.name
            )));
        }
        self.registry.register_node(&node.name, r)?;
        Ok(self.registry.assignments_of(&node.name)?)
    }

    /// `NodeHeartbeat`: records the node's figures and alerts; returns its
    /// assignments, and the revocation list when the node holds an older one
    /// than `revocations_held`.
    pub fn heartbeat(
        &self,
        node: &Identity,
        cert_expiry_ms: Option<i64>,
        hb: &Heartbeat,
        revocations_held: u64,
    ) -> Result<(Vec<Assignment>, Option<pb::RevocationList>)> {
        if let Some(t) = cert_expiry_ms {
            self.registry.saw_certificate(Role::Node, &node.name, t)?;
        }
        if self.registry.heartbeat(&node.name, hb)?.is_none() {
            return Err(CoordinatorError::NotFound(format!(
                "node {} is not registered; register first",
                node.name
            )));
        }
        Ok((
            self.registry.assignments_of(&node.name)?,
            self.revocations
                .as_ref()
                .and_then(|r| r.for_version(revocations_held)),
        ))
    }

    /// `Forecast`: the capacity forecast of every source, group, node and disk
    /// (computed off the async threads: a pass is up to 128²/2 slopes a series).
    pub async fn forecast(&self) -> Result<crate::registry::ForecastReport> {
        let registry = self.registry.clone();
        tokio::task::spawn_blocking(move || registry.forecast_report())
            .await
            .map_err(|e| CoordinatorError::Internal(format!("forecast: {e}")))?
            .map_err(Into::into)
    }

    /// `GetCoordinatorStatus`: the state backend, this coordinator's part in the
    /// leadership and, with etcd, the cluster's health (a few etcd round trips, off
    /// the async threads).
    pub async fn get_coordinator_status(&self) -> Result<pb::GetCoordinatorStatusResponse> {
        let state = self.registry.state().clone();
        let st = tokio::task::spawn_blocking(move || state.status())
            .await
            .map_err(|e| CoordinatorError::Internal(format!("describe the state: {e}")))?;
        Ok(pb::GetCoordinatorStatusResponse {
            coordinator: self.identity.me.name.clone(),
            backend: st.backend,
            role: st.role,
            leading: st.leading,
            leader_id: st.leader_id,
            leader_url: st.leader_url,
            etcd_endpoints: st
                .members
                .into_iter()
                .map(|m| match m.status {
                    Ok((version, raft_leader)) => pb::EtcdMemberHealth {
                        endpoint: m.endpoint,
                        version,
                        raft_leader,
                        error: String::new(),
                    },
                    Err(error) => pb::EtcdMemberHealth {
                        endpoint: m.endpoint,
                        error,
                        ..Default::default()
                    },
                })
                .collect(),
            etcd_members: st.cluster,
            etcd_errors: st.errors,
        })
    }

    /// `GetAssignment`: a node's, or the owning agent's only.
    pub fn get_assignment(&self, caller: &Identity, source: &str) -> Result<Assignment> {
        if caller.role == Role::Agent {
            let s = self.registry.source(source)?;
            if s.agent != caller.name {
                tracing::warn!(%caller, source, "refused: not the owner");
                return Err(CoordinatorError::Forbidden(format!(
                    "data source {source} belongs to agent {}, not {}",
                    s.agent, caller.name
                )));
            }
        }
        Ok(self.registry.assignment(source)?)
    }

    /// Every node with its load and state.
    pub fn list_nodes(&self) -> Result<Vec<NodeView>> {
        let reg = &self.registry;
        let loads = reg.node_loads()?;
        Ok(reg
            .nodes()?
            .into_iter()
            .map(|n| NodeView {
                load: loads.get(&n.name).copied().unwrap_or_default(),
                state: if !reg.node_up(&n) {
                    "down"
                } else if n.draining {
                    "draining"
                } else {
                    "up"
                },
                node: n,
            })
            .collect())
    }

    /// Every agent, and whether it is connected.
    pub fn list_agents(&self) -> Result<Vec<(AgentRecord, bool)>> {
        Ok(self
            .registry
            .agents()?
            .into_iter()
            .map(|a| {
                let connected = self.registry.connected(&a.name);
                (a, connected)
            })
            .collect())
    }

    /// Every source, with the progress of what runs on it.
    pub fn list_sources(&self) -> Result<Vec<(SourceRecord, Option<Progress>)>> {
        Ok(self
            .registry
            .sources()?
            .into_iter()
            .map(|s| {
                let progress = self.registry.current_progress(&s.name);
                (s, progress)
            })
            .collect())
    }

    /// `SetQuota`: returns the quota in force and what the agent has allocated.
    pub fn set_quota(&self, admin: &Identity, order: QuotaOrder) -> Result<QuotaView> {
        tracing::info!(%admin, agent = %order.agent, quota = ?order.quota, "quota requested");
        let set = self.registry.set_quota(&order.agent, order.quota)?;
        let used = self.registry.agent_allocated(&order.agent)?;
        Ok(QuotaView {
            agent: order.agent,
            quota: set,
            used_total_bytes: used,
        })
    }

    /// Every agent's own quota with what it has allocated, and the fleet default.
    pub fn list_quotas(&self) -> Result<(Vec<QuotaView>, QuotaView)> {
        let reg = &self.registry;
        let quotas = reg
            .quotas()?
            .into_iter()
            .map(|r| {
                let used = reg.agent_allocated(&r.agent)?;
                Ok(QuotaView {
                    agent: r.agent,
                    quota: r.quota,
                    used_total_bytes: used,
                })
            })
            .collect::<Result<_>>()?;
        let fleet_default = QuotaView {
            agent: String::new(),
            quota: reg.fleet_policy().quota,
            used_total_bytes: 0,
        };
        Ok((quotas, fleet_default))
    }

    /// `SetRetention`.
    pub fn set_retention(&self, admin: &Identity, order: RetentionOrder) -> Result<SourceRecord> {
        tracing::info!(%admin, source = %order.source, "retention requested");
        Ok(self
            .registry
            .set_retention(&order.source, order.retention)?)
    }

    /// `Allocate`.
    pub fn allocate(&self, admin: &Identity, order: AllocateOrder) -> Result<SourceRecord> {
        tracing::info!(%admin, source = %order.source, replica = order.replica_alloc_bytes, points = order.points_alloc_bytes, "allocation requested");
        Ok(self.registry.allocate(
            &order.source,
            order.replica_alloc_bytes,
            order.points_alloc_bytes,
        )?)
    }

    /// `Locate`: the node holding `source` and how to reach it.
    pub fn locate(&self, source: &str) -> Result<LocateView> {
        let s = self.registry.source(source)?;
        let node = self.node_of(source)?;
        let n = self
            .registry
            .node(&node)?
            .ok_or_else(|| CoordinatorError::NotFound(format!("node {node} is not registered")))?;
        Ok(LocateView {
            node,
            node_address: n.address,
            nbd_address: n.nbd_address,
            size_bytes: s.size_bytes,
            block_size: s.block_size,
        })
    }

    /// The names of the sources in group `g`.
    pub fn group_members(&self, g: &GroupRecord) -> Result<Vec<String>> {
        Ok(self
            .registry
            .sources()?
            .into_iter()
            .filter(|s| s.group == g.name)
            .map(|s| s.name)
            .collect())
    }

    /// `PutGroup`: creates or changes a group; returns it with its members.
    pub fn put_group(
        &self,
        admin: &Identity,
        g: GroupRecord,
    ) -> Result<(GroupRecord, Vec<String>)> {
        let rec = self.registry.put_group(g)?;
        tracing::info!(%admin, group = %rec.name, interval_ms = rec.interval_ms, "protection group set");
        let members = self.group_members(&rec)?;
        Ok((rec, members))
    }

    /// `AllowGroup`: adds or removes an agent name pattern of a group.
    pub fn allow_group(
        &self,
        admin: &Identity,
        group: &str,
        pattern: &str,
        remove: bool,
    ) -> Result<(GroupRecord, Vec<String>)> {
        tracing::info!(%admin, group = %group, pattern = %pattern, remove, "group patterns requested");
        let g = self.registry.allow_group(group, pattern, remove)?;
        let members = self.group_members(&g)?;
        Ok((g, members))
    }

    /// Every group with its members.
    pub fn list_groups(&self) -> Result<Vec<(GroupRecord, Vec<String>)>> {
        self.registry
            .groups()?
            .into_iter()
            .map(|g| {
                let members = self.group_members(&g)?;
                Ok((g, members))
            })
            .collect()
    }

    /// `DeleteGroup`: a group with no sources.
    pub fn delete_group(&self, admin: &Identity, name: &str) -> Result<()> {
        self.registry.delete_group(name)?;
        tracing::info!(%admin, group = %name, "protection group deleted");
        Ok(())
    }

    /// `SetGroup`: puts `sources` in `group` (empty: out of any).
    pub fn set_group(&self, admin: &Identity, group: &str, sources: &[String]) -> Result<()> {
        self.registry.set_group(group, sources)?;
        tracing::info!(%admin, group = %group, sources = ?sources, "sources put in a group");
        Ok(())
    }
}
