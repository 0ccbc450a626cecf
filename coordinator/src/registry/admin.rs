//! The admin's side of policy in the registry: quotas, a source's own retention,
//! and which agents may join a group from their config (see [`crate::policy`]).

use super::{
    FORMAT_VERSION, GroupRecord, Registry, RegistryError, Result, SourceRecord, dec, enc, lock,
};
use crate::policy::{Quota, QuotaRecord};
use bulwark_common::retention::Retention;

impl Registry {
    /// The quota of `agent`: its own, else the fleet default.
    pub fn quota_of(&self, agent: &str) -> Result<Quota> {
        Ok(self
            .quotas
            .get(agent)?
            .map(|v| dec::<QuotaRecord>(&v))
            .transpose()?
            .map_or(self.fleet.quota, |r| r.quota))
    }

    /// Every agent's own quota.
    pub fn quotas(&self) -> Result<Vec<QuotaRecord>> {
        self.quotas.iter().map(|r| dec(&r?.1)).collect()
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
                self.quotas.insert(agent.as_bytes(), enc(&rec)?)?;
            }
            None => {
                self.quotas.remove(agent)?;
            }
        }
        self.db.flush()?;
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
        self.db.flush()?;
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
        self.groups.insert(g.name.as_bytes(), enc(&g)?)?;
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
                s.next_sync_ms = 0;
            }
            self.apply_group_claim(&mut s)?;
            if s.group == g.name {
                s.group_retention = g.retention;
                s.group_replica_alloc = g.replica_alloc_bytes;
                s.group_points_alloc = g.points_alloc_bytes;
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
        self.db.flush()?;
        tracing::info!(group, pattern, remove, "group membership patterns changed");
        Ok(g)
    }
}
