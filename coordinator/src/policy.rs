//! Policy belongs to the admin, not the host.
//!
//! A data source's retention, space and group are what the admin set; its agent's
//! config only proposes. This module decides, as plain functions over records:
//!
//! - **Retention**: the admin's floor is the source's own (`bulwark retention`),
//!   else its group's, else the fleet minimum (`[policy] min_retention` in
//!   coordinator.toml; unset = keep every point). The agent's proposal is taken
//!   where it keeps at least as much ([`Retention::at_least`]); the keys where it
//!   would keep less are refused and the floor's apply.
//! - **Space**: `bulwark allocate` wins, then the group's; otherwise the agent may
//!   ask for less than the fleet default (`[policy] replica_percent`,
//!   `points_days`), never more (more is the admin's `bulwark allocate`). Replica
//!   space is never less than the volume and its checksums, whoever asks: the
//!   node allocates that much anyway, and a quota or placement that counted less
//!   could be overrun by a host asking for 4 KiB.
//! - **Quota**: per agent (`bulwark quota`, else `[policy]`'s), the largest source
//!   and the total space of all its sources, checked with checked arithmetic before
//!   a source is placed.
//! - **Groups**: an agent's config may name a group; the source joins only when
//!   the admin put it there (`bulwark group add`) or the group allows the agent
//!   (`bulwark group allow G PATTERN`).
//!
//! A refused proposal leaves the admin's values in force (the old points stay) and
//! is a warning alert naming the agent and the key.

use bulwark_common::retention::Retention;
use serde::{Deserialize, Serialize};

use crate::records::{GroupRecord, Policy, SourceRecord};
pub use crate::records::{LockMode, LockPolicy};

/// Fleet-wide defaults of `[policy]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FleetPolicy {
    /// The retention every source keeps at least, unless the admin set its own.
    pub min_retention: Retention,
    /// Default replica space, in percent of the source's size.
    pub replica_percent: u64,
    /// Default recovery-point space: size × days × 2% + 1.6 GiB.
    pub points_days: u64,
    /// Each agent's quota unless `bulwark quota` set one.
    pub quota: Quota,
}

impl Default for FleetPolicy {
    fn default() -> Self {
        FleetPolicy {
            min_retention: Retention::default(),
            replica_percent: 150,
            points_days: bulwark_common::alloc::DEFAULT_RETENTION_DAYS,
            quota: Quota::default(),
        }
    }
}

/// What one agent may take; 0 = no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Quota {
    pub max_source_size_bytes: u64,
    /// Replica plus recovery-point space of all the agent's sources.
    pub max_total_bytes: u64,
}

/// An agent's quota as the registry keeps it (tree `quotas`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuotaRecord {
    pub v: u32,
    pub agent: String,
    pub quota: Quota,
}

impl FleetPolicy {
    /// Default replica space of a source of `size` bytes.
    pub fn replica_bytes(&self, size: u64) -> u64 {
        u64::try_from(u128::from(size) * u128::from(self.replica_percent) / 100).unwrap_or(u64::MAX)
    }

    /// Default recovery-point space of a source of `size` bytes.
    pub fn points_bytes(&self, size: u64) -> u64 {
        bulwark_common::alloc::points_bytes(size, self.points_days)
    }
}

/// The policy in force for a source and what of its agent's proposal was refused.
#[derive(Debug, Clone, PartialEq)]
pub struct Effective {
    /// Explicit numbers: the node applies them as they are.
    pub policy: Policy,
    /// Where the retention floor came from: "source", "group" or "fleet minimum"
    /// (with ", lengthened by the agent" when its proposal added to it).
    pub retention_from: String,
    /// Refused keys with why, e.g. `retention.keep: 1 keeps less than the admin's`.
    pub refused: Vec<String>,
}

/// The policy the node applies to `s` (see the module docs).
pub fn effective(fleet: &FleetPolicy, s: &SourceRecord) -> Effective {
    let proposal = s.agent_policy;
    let mut refused = Vec::new();
    let (floor, from) = match (&s.admin_retention, &s.group_retention) {
        (Some(r), _) => (*r, "source"),
        (None, Some(r)) => (*r, "group"),
        (None, None) => (fleet.min_retention, "fleet minimum"),
    };
    let (retention, shorter) = if s.agent_proposes_retention {
        proposal.retention.at_least(&floor)
    } else {
        (floor, Vec::new())
    };
    for key in shorter {
        refused.push(format!(
            "retention.{key}: the proposal ({}) keeps fewer points than the admin's retention ({})",
            proposal.retention.describe(),
            floor.describe()
        ));
    }
    let retention_from = if retention != floor {
        format!("{from}, lengthened by the agent")
    } else {
        from.to_string()
    };
    let size = s.size_bytes;
    let mut pick = |admin: u64, group: u64, asked: u64, default: u64, key: &str, less_ok: bool| {
        if admin > 0 {
            return admin;
        }
        if group > 0 {
            return group;
        }
        let fmt = bulwark_common::config::format_size;
        if asked > default {
            refused.push(format!(
                "{key}: the proposal ({}) is more than the fleet default ({}); ask the admin for `bulwark allocate`",
                fmt(asked),
                fmt(default)
            ));
            return default;
        }
        if asked > 0 && asked < default && !less_ok {
            refused.push(format!(
                "{key}: the proposal ({}) is less than the fleet default ({}): on a node that prunes when full it would push out older points; the admin sets it with `bulwark allocate`",
                fmt(asked),
                fmt(default)
            ));
            return default;
        }
        if asked > 0 { asked } else { default }
    };
    // Never less than the volume and its checksums: that is what the node
    // allocates whatever it is asked, so placement and quotas count it too.
    let replica_alloc_bytes = pick(
        s.admin_replica_alloc,
        s.group_replica_alloc,
        proposal.replica_alloc_bytes,
        fleet.replica_bytes(size),
        "replica_space",
        true,
    )
    .max(min_replica_bytes(size, s.block_size));
    let points_alloc_bytes = pick(
        s.admin_points_alloc,
        s.group_points_alloc,
        proposal.points_alloc_bytes,
        fleet.points_bytes(size),
        "points_space",
        false,
    );
    Effective {
        policy: Policy {
            replica_alloc_bytes,
            points_alloc_bytes,
            retention,
            keep_after_ms: s.keep_logs_after_ms,
            lock: LockPolicy::max(s.admin_lock, s.group_lock),
        },
        retention_from,
        refused,
    }
}

/// The least replica space a volume of `size` bytes in blocks of `block_size`
/// lives in: its bytes and one checksum per block (the node's own floor).
pub fn min_replica_bytes(size: u64, block_size: u32) -> u64 {
    let blocks = size.div_ceil(u64::from(block_size.max(1)));
    size.saturating_add(blocks.saturating_mul(bulwark_common::block::DIGEST_LEN as u64))
}

/// Checks that `agent` may have a source of `size` bytes needing `alloc` bytes,
/// beside `others` bytes already allocated to its other sources, under `quota`.
pub fn check_quota(
    quota: &Quota,
    agent: &str,
    size: u64,
    alloc: u64,
    others: u64,
) -> Result<(), String> {
    let fmt = bulwark_common::config::format_size;
    if quota.max_source_size_bytes > 0 && size > quota.max_source_size_bytes {
        return Err(format!(
            "its size {} is over agent {agent}'s quota of {} per source (`bulwark quota {agent} --max-source-size`)",
            fmt(size),
            fmt(quota.max_source_size_bytes)
        ));
    }
    if quota.max_total_bytes > 0 {
        let total = others.checked_add(alloc);
        if total.is_none_or(|t| t > quota.max_total_bytes) {
            return Err(format!(
                "it needs {} of space and agent {agent}'s other sources hold {}: over its quota of {} in all (`bulwark quota {agent} --max-total`)",
                fmt(alloc),
                fmt(others),
                fmt(quota.max_total_bytes)
            ));
        }
    }
    Ok(())
}

/// Whether an agent name matches a group's pattern (`*` = any run of characters).
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let [first, middle @ .., last] = parts.as_slice() else {
        return pattern == name;
    };
    if parts.len() == 1 {
        return pattern == name;
    }
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    for m in middle {
        match rest.find(m) {
            Some(at) => rest = &rest[at + m.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// Checks a group pattern: a name whose characters may include `*`.
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    let literal = pattern.replace('*', "x");
    if pattern.is_empty() || !bulwark_common::name::is_valid(&literal) && pattern != "*" {
        return Err(format!(
            "\"{}\" is not an agent name pattern (letters, digits, '-', '_', '.' and '*')",
            bulwark_common::text::escape_short(pattern, 80)
        ));
    }
    Ok(())
}

/// Whether `agent` may put its sources in `group` from its own config.
pub fn group_allows(group: &GroupRecord, agent: &str) -> bool {
    group.allow.iter().any(|p| pattern_matches(p, agent))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(size: u64) -> SourceRecord {
        SourceRecord::new("s1", "a1", "volume", "fingerprint", size, 65536)
    }

    #[test]
    fn the_agent_may_lengthen_retention_and_ask_for_less_space_only() {
        let fleet = FleetPolicy::default();
        let gib = 1u64 << 30;
        let mut s = source(10 * gib);
        s.agent_proposes_retention = true;
        s.agent_policy.retention.keep = 1;
        s.agent_policy.points_alloc_bytes = 1;
        s.agent_policy.replica_alloc_bytes = u64::MAX;
        let e = effective(&fleet, &s);
        assert!(e.policy.retention.is_keep_all(), "{e:?}");
        assert_eq!(
            e.policy.points_alloc_bytes,
            fleet.points_bytes(10 * gib),
            "less recovery-point space could make a full pool prune: the default"
        );
        assert_eq!(e.policy.replica_alloc_bytes, 15 * gib);
        assert_eq!(e.refused.len(), 3, "{:?}", e.refused);
        assert!(
            e.refused[0].starts_with("retention.keep"),
            "{:?}",
            e.refused
        );
        assert!(e.refused[1].starts_with("replica_space"), "{:?}", e.refused);
        assert!(e.refused[2].starts_with("points_space"), "{:?}", e.refused);
        // Less replica space is the agent's to ask (down to the volume's own).
        s.agent_policy.replica_alloc_bytes = 12 * gib;
        assert_eq!(effective(&fleet, &s).policy.replica_alloc_bytes, 12 * gib);
        s.agent_policy.replica_alloc_bytes = u64::MAX;
        // The admin's own retention is a floor too; a longer proposal is taken.
        s.admin_retention = Some(Retention {
            keep: 3,
            ..Default::default()
        });
        s.agent_policy.retention.keep = 10;
        let e = effective(&fleet, &s);
        assert_eq!(e.policy.retention.keep, 10);
        assert_eq!(e.retention_from, "source, lengthened by the agent");
        // bulwark allocate wins over everything.
        s.admin_replica_alloc = 20 * gib;
        assert_eq!(effective(&fleet, &s).policy.replica_alloc_bytes, 20 * gib);
        // Less replica space than the volume holds is raised to it: placement and
        // quotas count what the node will take.
        s.admin_replica_alloc = 0;
        s.agent_policy.replica_alloc_bytes = 4096;
        let least = 10 * gib + (10 * gib / 65536) * 32;
        assert_eq!(min_replica_bytes(10 * gib, 65536), least);
        assert_eq!(effective(&fleet, &s).policy.replica_alloc_bytes, least);
        assert_eq!(min_replica_bytes(u64::MAX, 4096), u64::MAX);
    }

    #[test]
    fn quotas_use_checked_sums() {
        let q = Quota {
            max_source_size_bytes: 100,
            max_total_bytes: 1000,
        };
        assert!(check_quota(&q, "a1", 100, 500, 400).is_ok());
        let e = check_quota(&q, "a1", 101, 1, 0).expect_err("too big");
        assert!(e.contains("per source"), "{e}");
        let e = check_quota(&q, "a1", 1, u64::MAX, 10).expect_err("wraps");
        assert!(e.contains("in all"), "{e}");
        assert!(check_quota(&Quota::default(), "a1", u64::MAX, u64::MAX, u64::MAX).is_ok());
    }

    #[test]
    fn patterns() {
        assert!(pattern_matches("db-*", "db-1"));
        assert!(pattern_matches("*", "anything"));
        assert!(pattern_matches("a*b*c", "aXXbYYc"));
        assert!(pattern_matches("host-1", "host-1"));
        assert!(!pattern_matches("host-1", "host-10"));
        assert!(!pattern_matches("db-*", "web-1"));
        assert!(!pattern_matches("a*a", "a"));
        assert!(check_pattern("db-*").is_ok());
        assert!(check_pattern("*").is_ok());
        assert!(check_pattern("../x").is_err());
        assert!(check_pattern("").is_err());
    }
}
