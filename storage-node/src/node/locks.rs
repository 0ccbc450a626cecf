//! Retention locks, drops and restore grants on the node: the store holds the
//! locks (`crate::store::lock`); these are the node's steps around it.

use bulwark_common::name::SourceName;
use bulwark_common::tls::{Identity, Role};
use bulwark_proto as pb;

use super::{NodeService, blocking};
use crate::error::{NodeError, refused};
use crate::store::lock::LockAuthority;
use crate::wire::{GrantChange, LockChange, lock_to_proto};

/// A restore the coordinator granted an agent other than the source's own.
#[derive(Debug, Clone)]
pub(super) struct Grant {
    pub(super) expires_ms: i64,
    /// The only points the agent may read.
    pub(super) points: Vec<u64>,
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
    pub async fn drop_copy(&self, source: SourceName) -> Result<bool, NodeError> {
        let source = source.into_string();
        // Asked afresh (no cached answer for a deletion): the source must be
        // assigned elsewhere, or no longer known to the fleet (removed). The store
        // refuses anyway while a retention lock holds any of its points.
        let mut client = self.coordinator.clone();
        match client
            .get_assignment(pb::GetAssignmentRequest {
                source: source.clone(),
            })
            .await
        {
            Ok(a) if a.get_ref().node == self.name => {
                return Err(NodeError::StillAssigned(source));
            }
            Ok(_) => {}
            Err(st) if st.code() == tonic::Code::NotFound => {}
            Err(st) => {
                return Err(NodeError::DropUnchecked {
                    source_name: source,
                    why: st.message().to_string(),
                });
            }
        }
        let lock = self.locks.get(&source).write_owned().await;
        let store = self.store.clone();
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
    pub async fn set_lock(
        &self,
        caller: &Identity,
        change: LockChange,
    ) -> Result<pb::SetLockResponse, NodeError> {
        let LockChange { source, want } = change;
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
    pub fn grant(&self, g: GrantChange) {
        let source = &g.source;
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
            // The wire checked that a grant names its points, and no 0.
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
    }
}
