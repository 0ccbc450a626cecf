//! The admin's side of policy in the registry: quotas, a source's own retention,
//! and which agents may join a group from their config (see [`crate::policy`]).

use super::{
    AGENTS, FORMAT_VERSION, GROUPS, GroupRecord, QUOTAS, Registry, RegistryError, Result, SOURCES,
    SourceRecord, Txn, enc, lock,
};
use crate::policy::{LockMode, LockPolicy, Quota, QuotaRecord};
use bulwark_common::retention::Retention;

impl Registry {
    /// The quota of `agent`: its own, else the fleet default.
    pub fn quota_of(&self, agent: &str) -> Result<Quota> {
        Ok(self
            .read::<QuotaRecord>(QUOTAS, agent)?
            .map_or(self.fleet.quota, |r| r.quota))
    }

    /// Every agent's own quota.
    pub fn quotas(&self) -> Result<Vec<QuotaRecord>> {
        self.read_all(QUOTAS)
    }

    /// Bytes allocated to `agent`'s sources.
    pub fn agent_allocated(&self, agent: &str) -> Result<u64> {
        Ok(self
            .sources()?
            .iter()
            .filter(|s| s.agent == agent)
            .fold(0u64, |n, s| n.saturating_add(s.allocated_bytes)))
    }

    /// Sets `agent`'s quota (`None` removes it: the fleet default applies again).
    /// Sources it already has stay; the quota bounds what it registers next.
    pub fn set_quota(&self, agent: &str, quota: Option<Quota>) -> Result<Quota> {
        let _g = lock(&self.placement);
        bulwark_common::name::AgentName::parse(agent)
            .map_err(|e| RegistryError::InvalidSource(agent.to_string(), e.to_string()))?;
        match quota {
            Some(quota) => {
                let rec = QuotaRecord {
                    v: FORMAT_VERSION,
                    agent: agent.to_string(),
                    quota,
                };
                self.write(QUOTAS, agent, &rec)?;
            }
            None => {
                self.state.delete(QUOTAS, agent.as_bytes())?;
            }
        }
        tracing::info!(agent, ?quota, "quota set");
        self.quota_of(agent)
    }

    /// Sets the admin's retention of a source (`None`: back to its group's or the
    /// fleet minimum). Its agent's proposal can only lengthen it.
    pub fn set_retention(
        &self,
        source: &str,
        retention: Option<Retention>,
    ) -> Result<SourceRecord> {
        let _g = lock(&self.placement);
        let mut s = self.source(source)?;
        s.admin_retention = retention;
        s.policy_refused = self.effective(&s).refused;
        self.put_source(&s)?;
        self.refresh_policy_alerts(&s.agent)?;
        tracing::info!(source, retention = %retention.map_or("unset".into(), |r| r.describe()), "admin retention set");
        Ok(s)
    }

    /// Allows agents matching `pattern` to put their sources in `group` from their
    /// config (or, with `remove`, takes that back). Sources whose agent claimed the
    /// group join now; sources that joined by a pattern no longer allowed leave.
    pub fn allow_group(&self, group: &str, pattern: &str, remove: bool) -> Result<GroupRecord> {
        let _g = lock(&self.placement);
        crate::policy::check_pattern(pattern)
            .map_err(|m| RegistryError::InvalidSource(group.to_string(), m))?;
        let mut g = self.group(group)?.ok_or_else(|| {
            RegistryError::InvalidSource(group.to_string(), "no such group".into())
        })?;
        g.allow.retain(|p| p != pattern);
        if !remove {
            g.allow.push(pattern.to_string());
        }
        self.write(GROUPS, &g.name, &g)?;
        let mut agents = std::collections::BTreeSet::new();
        for mut s in self.sources()? {
            let before = s.group.clone();
            if s.group == g.name && !s.group_by_admin && !crate::policy::group_allows(&g, &s.agent)
            {
                tracing::info!(source = %s.name, group = %g.name, "source leaves the group: its agent is no longer allowed");
                s.group.clear();
                s.group_retention = None;
                s.group_replica_alloc = 0;
                s.group_points_alloc = 0;
                s.group_lock = None;
                s.next_sync_ms = 0;
            }
            self.apply_group_claim(&mut s)?;
            if s.group == g.name {
                s.group_retention = g.retention;
                s.group_replica_alloc = g.replica_alloc_bytes;
                s.group_points_alloc = g.points_alloc_bytes;
                s.group_lock = g.lock;
            }
            if s.group != before {
                agents.insert(s.agent.clone());
                self.put_source(&s)?;
            }
        }
        for a in agents {
            self.refresh_policy_alerts(&a)?;
        }
        self.update_log_floors()?;
        tracing::info!(group, pattern, remove, "group membership patterns changed");
        Ok(g)
    }
}

/// Refuses to set `want` over `have` unless it is a raise, or an officer lowering
/// a governance lock.
fn check_lock_change(
    what: &str,
    have: Option<LockPolicy>,
    want: Option<LockPolicy>,
    officer: bool,
) -> Result<bool> {
    if LockPolicy::is_raise(have, want) {
        return Ok(false);
    }
    let change = format!(
        "{what}: the lock {} cannot become {}",
        LockPolicy::describe(have),
        LockPolicy::describe(want)
    );
    if have.is_some_and(|h| h.mode == LockMode::Compliance) {
        return Err(RegistryError::Locked(format!(
            "{change}: a compliance lock can only be lengthened"
        )));
    }
    if !officer {
        return Err(RegistryError::Forbidden(format!(
            "{change}: only an officer certificate may shorten or lift a governance lock"
        )));
    }
    Ok(true)
}

impl Registry {
    /// Sets the retention lock of a source (`None` lifts it) as the caller may
    /// (see [`check_lock_change`]); returns the source and whether it was lowered.
    pub fn set_source_lock(
        &self,
        source: &str,
        lock: Option<LockPolicy>,
        officer: bool,
    ) -> Result<(SourceRecord, bool)> {
        let _g = lock_guard(self);
        let mut s = self.source(source)?;
        let lowered = check_lock_change(
            &format!("data source {source}"),
            s.admin_lock,
            lock,
            officer,
        )?;
        s.admin_lock = lock;
        self.put_source(&s)?;
        Ok((s, lowered))
    }

    /// Sets a group's retention lock (`None` lifts it); returns its members and
    /// whether it was lowered.
    pub fn set_group_lock(
        &self,
        group: &str,
        lock: Option<LockPolicy>,
        officer: bool,
    ) -> Result<(Vec<SourceRecord>, bool)> {
        let _g = lock_guard(self);
        let mut g = self.group(group)?.ok_or_else(|| {
            RegistryError::InvalidSource(group.to_string(), "no such group".into())
        })?;
        let lowered = check_lock_change(&format!("group {group}"), g.lock, lock, officer)?;
        g.lock = lock;
        // The group's lock and its members' copies of it change together.
        let mut txn = Txn::new().put(GROUPS, g.name.as_bytes(), enc(&g)?);
        let mut members = Vec::new();
        for mut s in self.sources()?.into_iter().filter(|s| s.group == g.name) {
            s.group_lock = lock;
            txn = Registry::put_source_in(txn, &s)?;
            members.push(s);
        }
        self.state.commit(txn)?;
        Ok((members, lowered))
    }

    /// Marks a source as being removed (`bulwark remove`), or not any more: while
    /// it is, its assignment is not given out (its node drops it, its agent cannot
    /// place it again).
    pub fn set_removing(&self, source: &str, removing: bool) -> Result<()> {
        let _g = lock_guard(self);
        let mut s = self.source(source)?;
        s.state = if removing { "removing" } else { "ok" }.into();
        self.put_source(&s)?;
        Ok(())
    }

    /// Forgets a data source (`bulwark remove`): its record goes; the caller has
    /// made sure its node holds no locked point and tells the node to drop it.
    pub fn remove_source(&self, source: &str) -> Result<SourceRecord> {
        let _g = lock_guard(self);
        let s = self.source(source)?;
        // The source and its agent's list of it go together.
        let mut txn = Txn::new().delete(SOURCES, source.as_bytes());
        if let Some(mut a) = self.read::<super::AgentRecord>(AGENTS, &s.agent)? {
            a.sources.retain(|n| n != source);
            txn = txn.put(AGENTS, s.agent.as_bytes(), enc(&a)?);
        }
        self.state.commit(txn)?;
        tracing::info!(source, agent = %s.agent, "data source removed from the fleet");
        Ok(s)
    }
}

fn lock_guard(r: &Registry) -> std::sync::MutexGuard<'_, ()> {
    lock(&r.placement)
}
