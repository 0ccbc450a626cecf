//! Restores: which sources and points a restore reads (a point, or a moment of a
//! protection group: a volume point and the logs after it), the grants another
//! agent needs to read them, and the relay of the restore to the agent.

use std::sync::Arc;

use bulwark_common::tls::Identity;
use bulwark_proto as pb;

use super::relay::command_outcome;
use super::{CoordinatorService, Result};
use crate::error::CoordinatorError;
use crate::registry::{
    AgentResult, Command, RegistryError, RestoreCommand, RestorePart, SourceRecord,
};

/// `Restore`: what the admin asked.
#[derive(Debug, Clone, PartialEq)]
pub struct RestoreOrder {
    pub source: String,
    /// 0 = the newest (or, with `at_ms`, chosen by the moment).
    pub point: u64,
    /// A moment to restore to (0 = none); never with a point.
    pub at_ms: i64,
    /// The agent to restore on; `None` = the source's own.
    pub agent: Option<String>,
    /// Where on the agent's host (never empty).
    pub path: String,
    /// Wait for the agent's result.
    pub wait: bool,
}

/// What a restore reads: a volume source and point, a log source and point.
struct RestorePlan {
    volume: Option<(SourceRecord, u64)>,
    log: Option<(SourceRecord, u64)>,
}

impl CoordinatorService {
    /// Plans a restore, grants another agent the points it reads, and relays it;
    /// returns the agent and, when waited for, its result. The grants end with the
    /// restore, also when the caller stops waiting.
    pub async fn restore(
        self: &Arc<Self>,
        admin: &Identity,
        order: RestoreOrder,
    ) -> Result<(String, Option<pb::RestoreResult>)> {
        let s = self.registry.source(&order.source)?;
        let agent = order.agent.clone().unwrap_or_else(|| s.agent.clone());
        if !self.registry.connected(&agent) {
            return Err(RegistryError::AgentOffline(agent).into());
        }
        let plan = if order.at_ms != 0 {
            self.plan_restore_at(&s, order.at_ms).await?
        } else {
            RestorePlan {
                volume: (s.kind != "log").then(|| (s.clone(), order.point)),
                log: (s.kind == "log").then(|| (s.clone(), order.point)),
            }
        };
        let mut grants = Vec::new();
        let volume = self.restore_part(plan.volume, &agent, &mut grants).await?;
        let log = self.restore_part(plan.log, &agent, &mut grants).await?;
        tracing::info!(%admin, source = %order.source, point = order.point, at_ms = order.at_ms, %agent, path = %order.path, "restore requested");
        let (path, at_ms) = (order.path, order.at_ms);
        let cmd = move |id| {
            Command::Restore(Box::new(RestoreCommand {
                command_id: id,
                path,
                at_ms,
                volume,
                log,
                trace_context: bulwark_common::telemetry::inject_map(),
            }))
        };
        let rx = self.registry.dispatch(&agent, cmd).await?;
        // The grants end with the restore, in a task of their own: also when the
        // admin's CLI goes away (which drops the caller) before it ends.
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let svc = self.clone();
        let who = agent.clone();
        tokio::spawn(async move {
            let outcome = rx.await;
            svc.withdraw(&grants, &who).await;
            if let Ok(o) = outcome {
                let _ = done_tx.send(o);
            }
        });
        if !order.wait {
            return Ok((agent, None));
        }
        match command_outcome(done_rx, "restore", &order.source, &agent).await? {
            AgentResult::Restore(res) => Ok((agent, Some(res))),
            _ => Err(CoordinatorError::Internal(
                "the agent answered a restore with another result".into(),
            )),
        }
    }

    /// One part of a restore: its assignment, and (for another agent than the
    /// source's) a grant of the point, added to `grants` (node, source, point).
    async fn restore_part(
        &self,
        part: Option<(SourceRecord, u64)>,
        agent: &str,
        grants: &mut Vec<(String, String, u64)>,
    ) -> Result<Option<RestorePart>> {
        let Some((rec, mut point)) = part else {
            return Ok(None);
        };
        let assignment = self.registry.assignment(&rec.name)?;
        if agent != rec.agent {
            // Another host may read exactly the points of this restore, while it
            // runs.
            point = self
                .grant(&assignment.node, &rec.name, agent, point)
                .await?;
            grants.push((assignment.node.clone(), rec.name.clone(), point));
        }
        Ok(Some(RestorePart {
            source: rec.name,
            point,
            assignment,
        }))
    }

    /// A restore to moment `at_ms` from `s` and the other kind of source in its
    /// protection group: the newest volume point at or before the moment, and the
    /// first log point at or after it (a ship holds every byte written before it, so
    /// that one holds the bytes up to the moment; the database's recovery target
    /// stops the replay there), or the newest log point when none is that late.
    async fn plan_restore_at(&self, s: &SourceRecord, at_ms: i64) -> Result<RestorePlan> {
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
        let when = bulwark_common::time::rfc3339_ms(at_ms);
        let volume = match pick(s, &members, "volume")? {
            Some(v) => {
                let points = self.points_of(&v.name).await?;
                let id = volume_point(&v, &points, at_ms, &when)?;
                Some((v, id))
            }
            None => None,
        };
        let log = match pick(s, &members, "log")? {
            Some(l) => {
                let points = self.points_of(&l.name).await?;
                let id = log_point(&l, &points, at_ms, &when)?;
                Some((l, id))
            }
            None => None,
        };
        if volume.is_none() && log.is_none() {
            return Err(CoordinatorError::Refused(format!(
                "data source {} has nothing to restore",
                s.name
            )));
        }
        Ok(RestorePlan { volume, log })
    }
}

/// The source of `kind` a restore of `s` to a moment reads: `s` itself, or the
/// one member of its group of that kind.
fn pick(s: &SourceRecord, members: &[SourceRecord], kind: &str) -> Result<Option<SourceRecord>> {
    if s.kind == kind {
        return Ok(Some(s.clone()));
    }
    let found: Vec<&SourceRecord> = members.iter().filter(|x| x.kind == kind).collect();
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some((*one).clone())),
        many => Err(CoordinatorError::Refused(format!(
            "protection group {} has {} {kind} sources ({}); restore --at pairs one volume with one log source",
            s.group,
            many.len(),
            many.iter()
                .map(|x| x.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// The newest volume point at or before `at_ms`.
fn volume_point(v: &SourceRecord, points: &[pb::Point], at_ms: i64, when: &str) -> Result<u64> {
    let p = points
        .iter()
        .filter(|p| p.created_at_ms <= at_ms)
        .max_by_key(|p| p.created_at_ms)
        .ok_or_else(|| {
            CoordinatorError::Refused(format!(
                "data source {} has no point at or before {when}{}",
                v.name,
                points.first().map_or(String::new(), |p| format!(
                    " (its oldest is {})",
                    bulwark_common::time::rfc3339_ms(p.created_at_ms)
                ))
            ))
        })?;
    Ok(p.id)
}

/// The first log point at or after `at_ms`, else the newest.
fn log_point(l: &SourceRecord, points: &[pb::Point], at_ms: i64, when: &str) -> Result<u64> {
    let p = points
        .iter()
        .filter(|p| p.created_at_ms >= at_ms)
        .min_by_key(|p| p.created_at_ms)
        .or_else(|| points.last())
        .ok_or_else(|| {
            CoordinatorError::Refused(format!("log source {} has shipped nothing yet", l.name))
        })?;
    if p.created_at_ms < at_ms {
        tracing::warn!(source = %l.name, point = p.id,
            "restore --at {when}: the newest ship is older; logs end at {}",
            bulwark_common::time::rfc3339_ms(p.created_at_ms));
    }
    Ok(p.id)
}
