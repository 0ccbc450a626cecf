//! Retention locks, removing a source, and the restore grants a restore to another
//! agent needs: the coordinator's side, called by the thin handlers in
//! [`super`]. The nodes hold the locks that count (`bulwark_node::store::lock`);
//! what the coordinator records, it relays as a raise only.

use bulwark_common::tls::{Identity, Role};
use bulwark_proto as pb;

use super::{CoordinatorService, Result};
use crate::error::CoordinatorError;
use crate::policy::LockPolicy;
use crate::registry::Alert;

/// `Lock`: what to lock, and how (`None` = no lock of its own).
#[derive(Debug, Clone, PartialEq)]
pub struct LockOrder {
    pub target: LockTarget,
    pub lock: Option<LockPolicy>,
}

/// One data source, or one protection group.
#[derive(Debug, Clone, PartialEq)]
pub enum LockTarget {
    Source(String),
    Group(String),
}

impl CoordinatorService {
    /// `Lock`: records a source's or group's lock as `caller` may, relays it to the
    /// nodes, and lists what each node holds now (or why it refused: a lowering,
    /// which only the officer's own call on the node makes).
    pub async fn set_lock(&self, caller: &Identity, order: LockOrder) -> Result<pb::LockResponse> {
        let lock = order.lock;
        let officer = caller.role == Role::Officer;
        let (targets, lowered) = match &order.target {
            LockTarget::Source(source) => {
                let (s, lowered) = self.registry.set_source_lock(source, lock, officer)?;
                (vec![s], lowered)
            }
            LockTarget::Group(group) => self.registry.set_group_lock(group, lock, officer)?,
        };
        let what = match &order.target {
            LockTarget::Source(source) => format!("data source {source}"),
            LockTarget::Group(group) => format!("group {group}"),
        };
        tracing::warn!(%caller, %what, lock = %crate::policy::LockPolicy::describe(lock), lowered, "retention lock set");
        if lowered {
            self.registry.report_alerts(
                &format!("lock/{what}/{}", bulwark_common::time::now_ms()),
                &[Alert::warning(
                    format!("lock-lowered/{what}/{}", bulwark_common::time::now_ms()),
                    what.clone(),
                    format!(
                        "officer {} lowered the governance retention lock of {what} to {}",
                        caller.name,
                        crate::policy::LockPolicy::describe(lock)
                    ),
                )],
            )?;
        }
        // The nodes raise their own lock now; a lowering they refuse (only the
        // officer's own call lowers a node's lock) is listed for the officer's CLI.
        let mut sources = Vec::new();
        for s in targets {
            let Some(node) = s.node.clone() else {
                sources.push(pb::LockedSource {
                    source: s.name.clone(),
                    error: "not placed on a node yet: its node takes the lock when it is".into(),
                    ..Default::default()
                });
                continue;
            };
            let effective = self.registry.effective(&s).policy.lock;
            let address = self
                .registry
                .node(&node)?
                .map(|n| n.address)
                .unwrap_or_default();
            let answer = match self.node_client(&node) {
                Ok(mut c) => c
                    .set_lock(pb::SetLockRequest {
                        source: s.name.clone(),
                        lock: Some(crate::policy::LockPolicy::to_proto(effective)),
                    })
                    .await
                    .map(|r| r.into_inner().lock)
                    .map_err(|st| format!("node {node}: {}", st.message())),
                Err(e) => Err(format!("node {node}: {e}")),
            };
            sources.push(match answer {
                Ok(held) => pb::LockedSource {
                    source: s.name.clone(),
                    node,
                    node_address: address,
                    lock: held,
                    error: String::new(),
                },
                Err(e) => pb::LockedSource {
                    source: s.name.clone(),
                    node: node.clone(),
                    node_address: address,
                    lock: None,
                    error: e,
                },
            });
        }
        Ok(pb::LockResponse { sources })
    }

    /// `RemoveSource`: refused while a point is locked; else the source is marked
    /// removing (its node then drops it), dropped on its node, and forgotten.
    pub async fn remove(
        &self,
        admin: &Identity,
        source: String,
    ) -> Result<pb::RemoveSourceResponse> {
        let s = self.registry.source(&source)?;
        // Locked points are refused here first (the node refuses too, from its own
        // store, whatever this says).
        let mut points = 0;
        if let Some(node) = &s.node {
            let listed = self.points_of(&source).await?;
            points = listed.len() as u64;
            if let Some(p) = listed.iter().find(|p| p.locked_until_ms > 0) {
                return Err(CoordinatorError::Refused(format!(
                    "data source {source}: point {} on node {node} is under a retention lock until {}: the source cannot be removed before",
                    p.id,
                    bulwark_common::time::rfc3339_ms(p.locked_until_ms)
                )));
            }
        }
        // While removing, the coordinator answers that it does not know the
        // source: its node then drops it, and its agent cannot place it again.
        self.registry.set_removing(&source, true)?;
        if let Some(node) = &s.node {
            let dropped = match self.node_client(node) {
                Ok(mut c) => c
                    .drop_source(pb::DropSourceRequest {
                        source: source.clone(),
                    })
                    .await
                    .map(|_| ()),
                Err(e) => Err(tonic::Status::from(e)),
            };
            if let Err(st) = dropped {
                self.registry.set_removing(&source, false)?;
                return Err(CoordinatorError::Node {
                    code: st.code(),
                    message: format!(
                        "node {node} did not drop {source}, which stays protected: {}",
                        st.message()
                    ),
                });
            }
        }
        let s = self.registry.remove_source(&source)?;
        tracing::warn!(%admin, source, points, "data source removed");
        Ok(pb::RemoveSourceResponse {
            node: s.node.unwrap_or_default(),
            points,
        })
    }

    /// Lets `agent` read point `point` (0 = the newest now) of `source` on `node`
    /// for a restore; returns the point granted.
    pub(super) async fn grant(
        &self,
        node: &str,
        source: &str,
        agent: &str,
        point: u64,
    ) -> Result<u64> {
        let point = match point {
            0 => self
                .points_of(source)
                .await?
                .last()
                .map(|p| p.id)
                .ok_or_else(|| {
                    CoordinatorError::NotFound(format!("data source {source} has no point"))
                })?,
            p => p,
        };
        self.node_client(node)?
            .grant_restore(pb::GrantRestoreRequest {
                source: source.to_string(),
                agent: agent.to_string(),
                expires_at_ms: bulwark_common::time::now_ms() + 3_600_000,
                points: vec![point],
                withdraw: false,
            })
            .await
            .map_err(|s| CoordinatorError::at_node(node, &s))?;
        Ok(point)
    }

    /// Withdraws the restore grants `grants` (node, source, point) gave `agent`; one
    /// that cannot be withdrawn now lapses within the hour it was given for.
    pub(super) async fn withdraw(&self, grants: &[(String, String, u64)], agent: &str) {
        for (node, source, point) in grants {
            let r = match self.node_client(node) {
                Ok(mut c) => c
                    .grant_restore(pb::GrantRestoreRequest {
                        source: source.clone(),
                        agent: agent.to_string(),
                        points: vec![*point],
                        withdraw: true,
                        ..Default::default()
                    })
                    .await
                    .map(|_| ())
                    .map_err(|st| st.message().to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = r {
                tracing::warn!(%node, %source, agent, "restore grant not withdrawn (it lapses within the hour): {e}");
            }
        }
    }
}
