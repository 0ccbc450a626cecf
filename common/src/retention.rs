//! Which recovery points a node keeps: a maximum count, a maximum age, and
//! grandfather-father-son thinning (the newest point of each of the N newest hours,
//! days, ISO weeks and months that have points).
//!
//! The rule, applied by the node after every commit and on a timer:
//!
//! 1. The newest point is always kept.
//! 2. A point is kept when it is one of the `keep` newest, or the newest point of one
//!    of the `hourly` newest hours that have points (likewise `daily`, `weekly`,
//!    `monthly`, in UTC). With none of these set, every point is kept by count.
//! 3. Then every kept point but the newest that is older than `max_age` is dropped.
//!
//! All zero keeps everything.

use std::collections::HashSet;

use bulwark_proto as pb;
use serde::{Deserialize, Serialize};

/// A retention policy; all zero keeps every point.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Retention {
    pub keep: u32,
    pub max_age_ms: u64,
    pub hourly: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
}

/// Which hour, day, week or month a Unix time in milliseconds falls in.
type Bucket = fn(i64) -> i64;

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;

impl Retention {
    /// Whether the policy ever drops a point.
    pub fn is_keep_all(&self) -> bool {
        *self == Retention::default()
    }

    fn has_count_rule(&self) -> bool {
        self.keep > 0 || self.hourly > 0 || self.daily > 0 || self.weekly > 0 || self.monthly > 0
    }

    /// From the wire (absent = keep everything).
    pub fn from_proto(r: Option<&pb::Retention>) -> Retention {
        r.map_or_else(Retention::default, |r| Retention {
            keep: r.keep,
            max_age_ms: r.max_age_ms,
            hourly: r.hourly,
            daily: r.daily,
            weekly: r.weekly,
            monthly: r.monthly,
        })
    }

    /// To the wire.
    pub fn to_proto(&self) -> pb::Retention {
        pb::Retention {
            keep: self.keep,
            max_age_ms: self.max_age_ms,
            hourly: self.hourly,
            daily: self.daily,
            weekly: self.weekly,
            monthly: self.monthly,
        }
    }

    /// The policy that keeps every point `self` keeps and every point `floor`
    /// keeps (a superset of both: each count the larger, no count rule if either has
    /// none, the longer maximum age or none), and the keys in which `self` keeps
    /// less than `floor` (`"keep"`, `"daily"`, `"max_age"`, ...): what a proposal
    /// tried to shorten.
    pub fn at_least(&self, floor: &Retention) -> (Retention, Vec<&'static str>) {
        let mut shorter = Vec::new();
        let mut out = Retention::default();
        let counts = [
            ("keep", self.keep, floor.keep),
            ("hourly", self.hourly, floor.hourly),
            ("daily", self.daily, floor.daily),
            ("weekly", self.weekly, floor.weekly),
            ("monthly", self.monthly, floor.monthly),
        ];
        if self.has_count_rule() && floor.has_count_rule() {
            for (key, mine, theirs) in counts {
                if mine < theirs {
                    shorter.push(key);
                }
            }
            out.keep = self.keep.max(floor.keep);
            out.hourly = self.hourly.max(floor.hourly);
            out.daily = self.daily.max(floor.daily);
            out.weekly = self.weekly.max(floor.weekly);
            out.monthly = self.monthly.max(floor.monthly);
        } else if self.has_count_rule() {
            // The floor keeps every point by count: any count rule keeps fewer.
            shorter.extend(counts.iter().filter(|c| c.1 > 0).map(|c| c.0));
        }
        out.max_age_ms = match (self.max_age_ms, floor.max_age_ms) {
            (0, _) => 0,
            (_, 0) => {
                shorter.push("max_age");
                0
            }
            (mine, theirs) => {
                if mine < theirs {
                    shorter.push("max_age");
                }
                mine.max(theirs)
            }
        };
        (out, shorter)
    }

    /// A one-line description for the CLI, e.g. `keep 5, daily 7, max age 30d`.
    pub fn describe(&self) -> String {
        if self.is_keep_all() {
            return "keep all".into();
        }
        let mut parts = Vec::new();
        for (n, word) in [
            (self.keep, "keep"),
            (self.hourly, "hourly"),
            (self.daily, "daily"),
            (self.weekly, "weekly"),
            (self.monthly, "monthly"),
        ] {
            if n > 0 {
                parts.push(format!("{word} {n}"));
            }
        }
        if self.max_age_ms > 0 {
            parts.push(format!("max age {}s", self.max_age_ms / 1000));
        }
        parts.join(", ")
    }

    /// The ids of the points to drop, oldest first, from `points` as `(id,
    /// created_ms)` in any order, at time `now_ms`. Never the newest (highest id).
    pub fn to_drop(&self, points: &[(u64, i64)], now_ms: i64) -> Vec<u64> {
        if self.is_keep_all() || points.len() < 2 {
            return Vec::new();
        }
        let mut newest_first: Vec<(u64, i64)> = points.to_vec();
        newest_first.sort_by_key(|p| std::cmp::Reverse(p.0));
        let newest = newest_first[0].0;
        let mut kept: HashSet<u64> = HashSet::new();
        if self.has_count_rule() {
            kept.extend(newest_first.iter().take(self.keep as usize).map(|p| p.0));
            let classes: [(u32, Bucket); 4] = [
                (self.hourly, |ms| ms.div_euclid(HOUR_MS)),
                (self.daily, |ms| ms.div_euclid(DAY_MS)),
                // 1970-01-01 was a Thursday: shifting by 3 days starts weeks on Monday.
                (self.weekly, |ms| (ms.div_euclid(DAY_MS) + 3).div_euclid(7)),
                (self.monthly, month_of),
            ];
            for (n, bucket) in classes {
                if n == 0 {
                    continue;
                }
                let mut seen = HashSet::new();
                for &(id, created) in &newest_first {
                    if seen.len() >= n as usize {
                        break;
                    }
                    if seen.insert(bucket(created)) {
                        kept.insert(id);
                    }
                }
            }
        } else {
            kept.extend(newest_first.iter().map(|p| p.0));
        }
        if self.max_age_ms > 0 {
            let cutoff = now_ms.saturating_sub(i64::try_from(self.max_age_ms).unwrap_or(i64::MAX));
            for &(id, created) in &newest_first {
                if created < cutoff {
                    kept.remove(&id);
                }
            }
        }
        kept.insert(newest);
        let mut drop: Vec<u64> = newest_first
            .iter()
            .map(|p| p.0)
            .filter(|id| !kept.contains(id))
            .collect();
        drop.sort_unstable();
        drop
    }
}

/// Months since 1970-01 (UTC) of a Unix time in milliseconds.
fn month_of(ms: i64) -> i64 {
    match time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000)) {
        Ok(t) => i64::from(t.year()) * 12 + i64::from(u8::from(t.month())),
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pts(times: &[i64]) -> Vec<(u64, i64)> {
        times
            .iter()
            .enumerate()
            .map(|(i, t)| (i as u64 + 1, *t))
            .collect()
    }

    #[test]
    fn at_least_keeps_what_either_keeps_and_names_what_was_shorter() {
        let r = |keep, daily, max_age_ms| Retention {
            keep,
            daily,
            max_age_ms,
            ..Default::default()
        };
        // The attack: keep 1 against an admin floor of keep-everything.
        let (m, short) = r(1, 0, 0).at_least(&Retention::default());
        assert!(m.is_keep_all(), "{m:?}");
        assert_eq!(short, ["keep"]);
        // Longer in every key: taken as it is.
        let (m, short) = r(10, 7, 0).at_least(&r(5, 7, 30));
        assert_eq!((m, short), (r(10, 7, 0), vec![]));
        // Shorter in some keys: those keys are the floor's.
        let (m, short) = r(3, 0, 10).at_least(&r(1, 7, 30));
        assert_eq!(m, r(3, 7, 30));
        assert_eq!(short, ["daily", "max_age"]);
        // An age limit against a floor without one.
        let (m, short) = r(0, 0, 5).at_least(&r(2, 0, 0));
        assert_eq!((m, short), (r(0, 0, 0), vec!["max_age"]));
        // Property: whatever either keeps, the merge keeps.
        let times: Vec<(u64, i64)> = (0..200).map(|i| (i + 1, i as i64 * 3_600_000)).collect();
        let now = 200 * 3_600_000;
        let policies = [
            Retention::default(),
            r(1, 0, 0),
            r(5, 3, 0),
            r(0, 2, 36_000_000),
            r(20, 0, 100_000_000),
            Retention {
                hourly: 4,
                weekly: 1,
                ..Default::default()
            },
        ];
        for a in &policies {
            for b in &policies {
                let (m, _) = a.at_least(b);
                let kept = |p: &Retention| -> HashSet<u64> {
                    let drop: HashSet<u64> = p.to_drop(&times, now).into_iter().collect();
                    times
                        .iter()
                        .map(|t| t.0)
                        .filter(|id| !drop.contains(id))
                        .collect()
                };
                let km = kept(&m);
                assert!(
                    kept(a).is_subset(&km) && kept(b).is_subset(&km),
                    "{a:?} {b:?} -> {m:?}"
                );
            }
        }
    }

    #[test]
    fn keep_all_by_default() {
        let p = pts(&[1, 2, 3]);
        assert!(Retention::default().to_drop(&p, 10).is_empty());
    }

    #[test]
    fn keep_count() {
        let p = pts(&(0..30).collect::<Vec<_>>());
        let r = Retention {
            keep: 5,
            ..Default::default()
        };
        assert_eq!(r.to_drop(&p, 100), (1..=25).collect::<Vec<u64>>());
    }

    #[test]
    fn max_age_never_drops_the_newest() {
        let p = pts(&[0, 10, 20]);
        let r = Retention {
            max_age_ms: 5,
            ..Default::default()
        };
        assert_eq!(r.to_drop(&p, 1000), vec![1, 2]);
        let r = Retention {
            max_age_ms: 15,
            ..Default::default()
        };
        assert_eq!(r.to_drop(&p, 25), vec![1]);
    }

    #[test]
    fn grandfather_father_son() {
        // Every 6 hours for 40 days, starting on a Monday (1970-01-05).
        let start = 4 * DAY_MS;
        let times: Vec<i64> = (0..160).map(|i| start + i * 6 * HOUR_MS).collect();
        let p = pts(&times);
        let r = Retention {
            hourly: 2,
            daily: 3,
            weekly: 2,
            ..Default::default()
        };
        let drop: HashSet<u64> = r.to_drop(&p, times[159]).into_iter().collect();
        let kept: Vec<u64> = (1..=160).filter(|id| !drop.contains(id)).collect();
        // Hourly 2: points 160, 159 (different hours). Daily 3: newest of the last
        // three days: 160, 156, 152. Weekly 2: newest of this week (160) and of the
        // week before: the last point of day 34 (days 0..=39; weeks start on days 0,
        // 7, ..., 35), i.e. point 35 * 4 = 140.
        assert_eq!(kept, vec![140, 152, 156, 159, 160]);
    }

    #[test]
    fn monthly_buckets_follow_the_calendar() {
        // 1970-01-31 and 1970-02-01 are in different months, 1970-02-01 and
        // 1970-02-27 are not.
        let p = pts(&[30 * DAY_MS, 31 * DAY_MS, 57 * DAY_MS]);
        let r = Retention {
            monthly: 2,
            ..Default::default()
        };
        assert_eq!(r.to_drop(&p, 60 * DAY_MS), vec![2]);
    }
}
