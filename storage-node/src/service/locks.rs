//! Retention locks, drops and restore grants on the node: the store holds the
//! locks (`crate::store::lock`); these are the service's steps around it, called by
//! the thin handlers in [`super`].

use bulwark_common::name::SourceName;
use bulwark_common::tls::{Identity, Role};
use bulwark_proto as pb;
use tonic::Status;

use super::{NodeService, blocking, refused, source_name};
use crate::store::lock::{LockAuthority, LockMode, RetentionLock};

/// A restore the coordinator granted an agent other than the source's own.
#[derive(Debug, Clone)]
pub(super) struct Grant {
    pub(super) expires_ms: i64,
    /// The only points the agent may read.
    pub(super) points: Vec<u64>,
}

/// A lock on the wire: mode and minimum age (`None`: no lock).
pub fn lock_from_proto(l: &pb::RetentionLock) -> Option<(LockMode, u64)> {
    let mode = match pb::LockMode::try_from(l.mode) {
        Ok(pb::LockMode::Governance) => LockMode::Governance,
        Ok(pb::LockMode::Compliance) => LockMode::Compliance,
        _ => return None,
    };
    (l.min_age_ms > 0).then_some((mode, l.min_age_ms))
}

/// A lock for the wire.
pub fn lock_to_proto(l: Option<RetentionLock>) -> pb::RetentionLock {
    match l {
        None => pb::RetentionLock::default(),
        Some(l) => pb::RetentionLock {
            mode: match l.mode {
                LockMode::Governance => pb::LockMode::Governance,
                LockMode::Compliance => pb::LockMode::Compliance,
            } as i32,
            min_age_ms: l.min_age_ms,
        },
    }
}

impl NodeService {
    /// Alerts of retention locks an officer lowered on this node in the last day.
    pub fn lock_alerts(&self) -> Vec<pb::Alert> {
        let now = bulwark_common::time::now_ms();
        let mut map = self.lock_lowered.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, (at, _)| now - *at < 86_400_000);
        map.iter()
            .map(|(source, (at, what))| pb::Alert {
                key: format!("lock-lowered/{source}/{at}"),
                severity: "warning".into(),
                subject: source.clone(),
                message: what.clone(),
                ..Default::default()
            })
            .collect()
    }

    /// Whether the coordinator granted `agent` a restore of `point` of `source`,
    /// and the grant still stands. A grant names its points (the coordinator
    /// resolves "newest" before it grants), so point 0 is never granted.
    pub(super) fn granted(&self, source: &SourceName, agent: &str, point: u64) -> bool {
        let grants = self.grants.lock().unwrap_or_else(|e| e.into_inner());
        match grants.get(&(source.to_string(), agent.to_string())) {
            Some(g) if g.expires_ms > bulwark_common::time::now_ms() => {
                if g.points.contains(&point) {
                    return true;
                }
                tracing::warn!(source = %source, agent, point, granted = ?g.points,
                    "the restore grant does not cover this point");
                false
            }
            _ => false,
        }
    }

    /// Drops this node's copy of `source` (it moved, or was removed): only when the
    /// coordinator, asked afresh, no longer assigns it here; the store refuses while
    /// a retention lock holds any of its points.
    pub(super) async fn drop_copy(&self, source: SourceName) -> Result<bool, Status> {
        let source = source.into_string();
        let svc = self;
        // Asked afresh (no cached answer for a deletion): the source must be
        // assigned elsewhere, or no longer known to the fleet (removed). The store
        // refuses anyway while a retention lock holds any of its points.
        let mut client = svc.coordinator.clone();
        match client
            .get_assignment(pb::GetAssignmentRequest {
                source: source.clone(),
            })
            .await
        {
            Ok(a) if a.get_ref().node == svc.name => {
                return Err(Status::failed_precondition(format!(
                    "data source {source} is assigned to this node; it is not dropped"
                )));
            }
            Ok(_) => {}
            Err(st) if st.code() == tonic::Code::NotFound => {}
            Err(st) => {
                return Err(Status::unavailable(format!(
                    "cannot check the assignment of {source} with the coordinator ({}); nothing is dropped",
                    st.message()
                )));
            }
        }
        let lock = svc.locks.get(&source).write_owned().await;
        let store = svc.store.clone();
        let dropped = blocking(move || {
            let _lock = lock;
            store.drop_source(&source)
        })
        .await??;
        Ok(dropped)
    }

    /// Sets a source's retention lock as `caller` may: the coordinator and admins
    /// raise it, the officer may also lower a governance lock (and that is an alert
    /// of this node's for a day).
    pub(super) async fn set_lock(
        &self,
        caller: &Identity,
        r: pb::SetLockRequest,
    ) -> Result<pb::SetLockResponse, Status> {
        let source = source_name(&r.source)?;
        let want = r.lock.as_ref().and_then(lock_from_proto);
        if r.lock
            .as_ref()
            .is_some_and(|l| l.min_age_ms > 0 && want.is_none())
        {
            return Err(Status::invalid_argument(
                "a lock needs a mode: governance or compliance",
            ));
        }
        let who = if caller.role == Role::Officer {
            LockAuthority::Officer
        } else {
            LockAuthority::Raise
        };
        let lock = self.locks.get(&source).write_owned().await;
        let store = self.store.clone();
        let name = source.to_string();
        let (before, held) = blocking(move || {
            let _lock = lock;
            let before = store.lock_of(&name);
            (
                before,
                store.set_lock(&name, want, who, bulwark_common::time::now_ms()),
            )
        })
        .await?;
        if let (Ok(before), Ok(after)) = (&before, &held)
            && before != after
            && who == LockAuthority::Officer
        {
            let what = format!(
                "officer {} changed the retention lock of {source} on this node from {:?} to {:?}",
                caller.name, before, after
            );
            tracing::warn!("{what}");
            self.lock_lowered
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(source.to_string(), (bulwark_common::time::now_ms(), what));
        }
        match &held {
            Ok(l) => tracing::info!(%caller, source = %source, lock = ?l, "retention lock set"),
            Err(e) => {
                tracing::warn!(%caller, source = %source, "retention lock change refused: {e}");
                refused("lock");
            }
        }
        Ok(pb::SetLockResponse {
            lock: Some(lock_to_proto(held?)),
        })
    }

    /// Grants (or, with `withdraw`, takes back) an agent's restore of the points
    /// named.
    pub(super) fn grant(&self, g: pb::GrantRestoreRequest) -> Result<(), Status> {
        let source = source_name(&g.source)?;
        bulwark_common::name::AgentName::parse(g.agent.as_str())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let key = (source.to_string(), g.agent.clone());
        let mut grants = self.grants.lock().unwrap_or_else(|e| e.into_inner());
        let now = bulwark_common::time::now_ms();
        grants.retain(|_, grant| grant.expires_ms > now);
        if g.withdraw {
            // Only the points named (another restore may still need the others);
            // none named: the whole grant.
            if let Some(grant) = grants.get_mut(&key) {
                grant
                    .points
                    .retain(|p| !g.points.is_empty() && !g.points.contains(p));
                if grant.points.is_empty() {
                    grants.remove(&key);
                }
            }
            tracing::info!(source = %source, agent = %g.agent, points = ?g.points, "restore grant withdrawn");
        } else {
            if g.points.is_empty() || g.points.contains(&0) {
                return Err(Status::invalid_argument(
                    "a restore grant names the points it covers (no 0)",
                ));
            }
            tracing::info!(source = %source, agent = %g.agent, points = ?g.points, "restore granted by the coordinator");
            // Restores that overlap add their points to one grant.
            let grant = grants.entry(key).or_insert(Grant {
                expires_ms: g.expires_at_ms,
                points: Vec::new(),
            });
            grant.expires_ms = grant.expires_ms.max(g.expires_at_ms);
            for p in g.points {
                if !grant.points.contains(&p) {
                    grant.points.push(p);
                }
            }
        }
        Ok(())
    }
}
