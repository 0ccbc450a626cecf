//! Retention locks (immutability), held by the node in its own store.
//!
//! A source's lock says: no point younger than `min_age` may be pruned, merged or
//! dropped, nor the source deleted, whatever retention, space pressure or the
//! coordinator says. It lives in the source's record ([`SourceMeta::lock`]), so a
//! wiped or hostile coordinator, or a stolen admin key, cannot remove it: the node
//! takes a lock change only as a raise (longer, or a stronger mode), except that
//! the officer role may lower a governance lock. A compliance lock is lowered by
//! nobody. The lock travels with the source's record when it moves.
//!
//! What a lock does not do: it does not stop a host from sending garbage as new
//! points (those are new points; the old ones stay), and it does not keep points
//! older than `min_age`: once a point ages out of the lock, retention may prune it.

use serde::{Deserialize, Serialize};

use super::{PointMeta, Result, SourceMeta, Store, StoreError};

/// How strong a lock is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockMode {
    /// Lowered only by the officer role.
    Governance,
    /// Lowered by nobody.
    Compliance,
}

impl LockMode {
    /// The word the CLI and logs use.
    pub fn as_str(self) -> &'static str {
        match self {
            LockMode::Governance => "governance",
            LockMode::Compliance => "compliance",
        }
    }
}

/// A source's retention lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionLock {
    pub mode: LockMode,
    pub min_age_ms: u64,
    /// When it was last set (Unix ms).
    pub set_ms: i64,
}

impl RetentionLock {
    /// Until when a point made at `created_ms` is locked.
    pub fn until(&self, created_ms: i64) -> i64 {
        created_ms.saturating_add(i64::try_from(self.min_age_ms).unwrap_or(i64::MAX))
    }

    /// Whether a point made at `created_ms` is locked at `now_ms`.
    pub fn holds(&self, created_ms: i64, now_ms: i64) -> bool {
        self.until(created_ms) > now_ms
    }
}

/// Who asks for a lock change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockAuthority {
    /// The coordinator or an admin: may only raise.
    Raise,
    /// The officer role: may also lower a governance lock.
    Officer,
}

/// Whether `want` keeps at least what `have` keeps.
pub(super) fn is_raise(have: Option<RetentionLock>, want: Option<(LockMode, u64)>) -> bool {
    match (have, want) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(h), Some((mode, age))) => mode >= h.mode && age >= h.min_age_ms,
    }
}

fn describe(l: Option<RetentionLock>) -> String {
    match l {
        None => "no lock".into(),
        Some(l) => format!(
            "a {} lock of {}",
            l.mode.as_str(),
            bulwark_common::time::format_duration_ms(l.min_age_ms)
        ),
    }
}

impl Store {
    /// The lock of a source (`None`: unlocked, or no such source).
    pub fn lock_of(&self, name: &str) -> Result<Option<RetentionLock>> {
        Ok(self.source(name)?.and_then(|m| m.lock))
    }

    /// Sets a source's lock (`want`: mode and minimum age; `None` lifts it) as
    /// `who` may, and returns the lock held now. A change that would keep less
    /// than the lock in force is refused, but for the officer on a governance
    /// lock. Durable before it returns. The caller holds the source's write lock.
    pub fn set_lock(
        &self,
        name: &str,
        want: Option<(LockMode, u64)>,
        who: LockAuthority,
        now_ms: i64,
    ) -> Result<Option<RetentionLock>> {
        let mut meta = self
            .source(name)?
            .ok_or_else(|| StoreError::NoPoints(name.to_string()))?;
        let have = meta.lock;
        let want = want.filter(|(_, age)| *age > 0);
        if !is_raise(have, want) {
            let refuse = |why: &str| StoreError::Locked {
                source_name: name.to_string(),
                why: format!(
                    "{} cannot be changed to {}: {why}",
                    describe(have),
                    want.map_or("none".into(), |(m, a)| format!(
                        "{} {}",
                        m.as_str(),
                        bulwark_common::time::format_duration_ms(a)
                    ))
                ),
            };
            match (have.map(|h| h.mode), who) {
                (Some(LockMode::Compliance), _) => {
                    return Err(refuse(
                        "a compliance lock can only be lengthened, by anyone",
                    ));
                }
                (_, LockAuthority::Raise) => {
                    return Err(refuse(
                        "only an officer certificate may shorten or lift a governance lock",
                    ));
                }
                (_, LockAuthority::Officer) => {
                    tracing::warn!(source = name, from = %describe(have),
                        "an officer lowered a governance retention lock");
                }
            }
        }
        let next = want.map(|(mode, min_age_ms)| RetentionLock {
            mode,
            min_age_ms,
            set_ms: if have.is_some_and(|h| h.mode == mode && h.min_age_ms == min_age_ms) {
                have.map_or(now_ms, |h| h.set_ms)
            } else {
                now_ms
            },
        });
        if next != have {
            meta.lock = next;
            self.put_meta(&meta)?;
            tracing::info!(source = name, lock = %describe(next), "retention lock set");
        }
        Ok(next)
    }

    /// Refuses to remove `point` of `meta` while the source's lock holds it.
    pub(crate) fn check_unlocked(&self, meta: &SourceMeta, point: &PointMeta) -> Result<()> {
        let now = bulwark_common::time::now_ms();
        match meta.lock {
            Some(l) if l.holds(point.created_ms, now) => Err(StoreError::Locked {
                source_name: meta.name.to_string(),
                why: format!(
                    "point {} is under a {} retention lock until {}: it cannot be pruned, merged or dropped",
                    point.id,
                    l.mode.as_str(),
                    bulwark_common::time::rfc3339_ms(l.until(point.created_ms))
                ),
            }),
            _ => Ok(()),
        }
    }

    /// The points of `name` its lock holds now, oldest first.
    pub fn locked_points(&self, name: &str) -> Result<Vec<(u64, i64)>> {
        let Some(meta) = self.source(name)? else {
            return Ok(Vec::new());
        };
        let Some(lock) = meta.lock else {
            return Ok(Vec::new());
        };
        let now = bulwark_common::time::now_ms();
        Ok(self
            .points(name)?
            .iter()
            .filter(|p| lock.holds(p.created_ms, now))
            .map(|p| (p.id, lock.until(p.created_ms)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raises_and_lowerings() {
        let g = |age| Some((LockMode::Governance, age));
        let c = |age| Some((LockMode::Compliance, age));
        let have = |mode, min_age_ms| {
            Some(RetentionLock {
                mode,
                min_age_ms,
                set_ms: 0,
            })
        };
        assert!(is_raise(None, g(1)));
        assert!(is_raise(have(LockMode::Governance, 10), c(10)));
        assert!(is_raise(have(LockMode::Governance, 10), g(20)));
        assert!(!is_raise(have(LockMode::Governance, 10), g(5)));
        assert!(!is_raise(have(LockMode::Compliance, 10), g(20)));
        assert!(!is_raise(have(LockMode::Compliance, 10), None));
        assert!(is_raise(have(LockMode::Compliance, 10), c(10)));
    }
}
