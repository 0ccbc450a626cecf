//! Protection groups: their records, membership, and what members take from
//! their group (retention, allocation, lock, the log floors of paired sources).

use super::*;

impl Registry {
    /// Sets each grouped log source's `keep_logs_after_ms` to the time of its
    /// group's oldest volume point, so that retention keeps the logs that point
    /// needs to be replayed to any later moment.
    pub(super) fn update_log_floors(&self) -> Result<()> {
        let sources = self.sources()?;
        for s in sources.iter().filter(|s| s.kind == "log") {
            let floor = sources
                .iter()
                .filter(|v| v.kind == "volume" && v.usage.oldest_point_ms > 0 && paired(v, s))
                .map(|v| v.usage.oldest_point_ms)
                .min()
                .unwrap_or(0);
            if s.keep_logs_after_ms != floor {
                let mut s = s.clone();
                s.keep_logs_after_ms = floor;
                self.put_source(&s)?;
            }
        }
        Ok(())
    }

    /// A protection group.
    pub fn group(&self, name: &str) -> Result<Option<GroupRecord>> {
        if name.is_empty() {
            return Ok(None);
        }
        self.read(GROUPS, name)
    }

    /// Every protection group.
    pub fn groups(&self) -> Result<Vec<GroupRecord>> {
        self.read_all(GROUPS)
    }

    /// Creates or changes a group; its members take its retention.
    pub fn put_group(&self, g: GroupRecord) -> Result<GroupRecord> {
        let _lock = lock(&self.placement);
        if !bulwark_common::pki::valid_name(&g.name) {
            return Err(RegistryError::InvalidSource(
                g.name.clone(),
                "invalid group name".into(),
            ));
        }
        if g.interval_ms < 1000 {
            return Err(RegistryError::InvalidSource(
                g.name.clone(),
                "a group's interval must be at least 1s".into(),
            ));
        }
        let old = self.group(&g.name)?;
        let mut g = g;
        if let Some(o) = &old {
            // Patterns are set with `bulwark group allow`, and the lock with
            // `bulwark lock --group`, not with the group.
            g.allow = o.allow.clone();
            g.lock = o.lock;
        }
        // The group and what its members take from it change together.
        let mut txn = Txn::new().put(GROUPS, g.name.as_bytes(), enc(&g)?);
        for mut s in self.sources()?.into_iter().filter(|s| s.group == g.name) {
            s.group_retention = g.retention;
            s.group_replica_alloc = g.replica_alloc_bytes;
            s.group_points_alloc = g.points_alloc_bytes;
            s.group_lock = g.lock;
            if old.as_ref().is_some_and(|o| o.interval_ms != g.interval_ms) {
                s.next_sync_ms = 0;
            }
            txn = Registry::put_source_in(txn, &s)?;
        }
        self.state.commit(txn)?;
        Ok(g)
    }

    /// Deletes a group with no sources.
    pub fn delete_group(&self, name: &str) -> Result<()> {
        let _lock = lock(&self.placement);
        let members: Vec<String> = self
            .sources()?
            .into_iter()
            .filter(|s| s.group == name)
            .map(|s| s.name)
            .collect();
        if !members.is_empty() {
            return Err(RegistryError::InvalidSource(
                name.to_string(),
                format!("the group still has sources: {}", members.join(", ")),
            ));
        }
        let Some(old) = self.state.get(GROUPS, name.as_bytes())? else {
            return Err(RegistryError::InvalidSource(
                name.to_string(),
                "no such group".into(),
            ));
        };
        let txn = Txn::new()
            .when(GROUPS, name.as_bytes(), Some(old))
            .delete(GROUPS, name.as_bytes());
        if !self.state.commit(txn)? {
            return Err(RegistryError::InvalidSource(
                name.to_string(),
                "the group changed while it was being deleted; try again".into(),
            ));
        }
        Ok(())
    }

    /// Puts sources in `group` (empty: out of any group).
    pub fn set_group(&self, group: &str, sources: &[String]) -> Result<()> {
        let _lock = lock(&self.placement);
        let g = if group.is_empty() {
            None
        } else {
            Some(self.group(group)?.ok_or_else(|| {
                RegistryError::InvalidSource(group.to_string(), "no such group".into())
            })?)
        };
        let mut txn = Txn::new();
        for name in sources {
            let mut s = self.source(name)?;
            s.group = group.to_string();
            s.group_by_admin = !group.is_empty();
            s.group_retention = g.as_ref().and_then(|g| g.retention);
            s.group_replica_alloc = g.as_ref().map_or(0, |g| g.replica_alloc_bytes);
            s.group_points_alloc = g.as_ref().map_or(0, |g| g.points_alloc_bytes);
            s.group_lock = g.as_ref().and_then(|g| g.lock);
            s.next_sync_ms = 0;
            s.group_since_ms = now_ms();
            txn = Registry::put_source_in(txn, &s)?;
        }
        // Every source moves, or none: an unknown name leaves all where they were.
        self.state.commit(txn)?;
        self.update_log_floors()?;
        Ok(())
    }

    /// Sets when a source's next scheduled sync is due.
    pub fn set_next_sync(&self, source: &str, at_ms: i64) -> Result<()> {
        let _lock = lock(&self.placement);
        let mut s = self.source(source)?;
        s.next_sync_ms = at_ms;
        self.put_source(&s)
    }

    /// Puts `rec` in the group its agent's config claims, when the admin allows it
    /// (`bulwark group allow`); a claim the admin did not allow leaves the source
    /// where the admin put it, and is reported with the policy refusals.
    pub(super) fn apply_group_claim(&self, rec: &mut SourceRecord) -> Result<()> {
        let claim = rec.claimed_group.clone();
        if claim.is_empty() || claim == rec.group {
            return Ok(());
        }
        match self.group(&claim)? {
            Some(g) if crate::policy::group_allows(&g, &rec.agent) && !rec.group_by_admin => {
                tracing::info!(source = %rec.name, group = %claim, agent = %rec.agent, "source joins the group its agent asked for (allowed by the admin)");
                rec.group = claim;
                rec.group_by_admin = false;
                rec.next_sync_ms = 0;
                rec.group_since_ms = now_ms();
            }
            _ => {}
        }
        Ok(())
    }
}

/// Whether two sources of one protection group go together (restore to a moment,
/// and a volume's oldest point keeping its log source's logs): sources of the same
/// agent, or sources the admin put in the group. A source that joined by its
/// agent's claim never pairs with another host's.
pub fn paired(a: &SourceRecord, b: &SourceRecord) -> bool {
    !a.group.is_empty()
        && a.group == b.group
        && (a.agent == b.agent || (a.group_by_admin && b.group_by_admin))
}
