//! When the coordinator starts the syncs of protection groups: pure functions, so the
//! scheduler loop and the simulation share them.
//!
//! Each source of a group with interval `I` syncs at the times `t ≡ phase (mod I)`,
//! where `phase` is a hash of the source's name: the sources of a group (and of a
//! node) are spread over the interval instead of all starting at once. A due sync
//! starts only while its node runs fewer than `max_per_node` scheduled syncs; the
//! rest wait their turn, oldest due first.

use std::collections::HashMap;

/// The source's phase within `interval_ms`: FNV-1a of its name.
pub fn phase(source: &str, interval_ms: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in source.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h % interval_ms.max(1)
}

/// The first slot of `source` strictly after `now_ms`.
pub fn next_slot(source: &str, interval_ms: u64, now_ms: i64) -> i64 {
    let i = interval_ms.max(1) as i64;
    let p = phase(source, interval_ms) as i64;
    let base = now_ms.div_euclid(i) * i + p;
    if base > now_ms { base } else { base + i }
}

/// The first time after `now_ms` that is one of `times` (minutes after midnight,
/// UTC), or `None` when there are none.
pub fn next_time_of_day(times: &[u32], now_ms: i64) -> Option<i64> {
    const DAY: i64 = 24 * 3600 * 1000;
    let midnight = now_ms.div_euclid(DAY) * DAY;
    times
        .iter()
        .map(|m| midnight + i64::from(*m % 1440) * 60_000)
        .map(|t| if t > now_ms { t } else { t + DAY })
        .min()
}

/// When a source's next sync is due after `now_ms`: its next interval slot or the
/// next of the group's recovery-point times, whichever comes first.
pub fn next_due(source: &str, interval_ms: u64, times: &[u32], now_ms: i64) -> i64 {
    let slot = next_slot(source, interval_ms, now_ms);
    next_time_of_day(times, now_ms).map_or(slot, |t| t.min(slot))
}

/// A sync that is due: its source, node and due time.
#[derive(Debug, Clone, PartialEq)]
pub struct Due {
    pub source: String,
    pub node: String,
    pub due_ms: i64,
}

/// Which due syncs start now: oldest due first, at most `max_per_node` running per
/// node (`running` counts the scheduled syncs each node runs already).
pub fn to_start(mut due: Vec<Due>, running: &HashMap<String, u32>, max_per_node: u32) -> Vec<Due> {
    due.sort_by(|a, b| a.due_ms.cmp(&b.due_ms).then(a.source.cmp(&b.source)));
    let mut count = running.clone();
    let mut out = Vec::new();
    for d in due {
        let n = count.entry(d.node.clone()).or_insert(0);
        if *n < max_per_node {
            *n += 1;
            out.push(d);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_spread_and_in_the_future() {
        let i = 900_000;
        let mut phases: Vec<u64> = (0..100)
            .map(|k| phase(&format!("host-{k}-data"), i))
            .collect();
        phases.sort_unstable();
        phases.dedup();
        assert!(phases.len() > 95, "phases collide too often");
        let now = 1_700_000_123_456;
        for k in 0..100 {
            let s = next_slot(&format!("s{k}"), i, now);
            assert!(s > now && s <= now + i as i64);
            assert_eq!(
                (s - phase(&format!("s{k}"), i) as i64).rem_euclid(i as i64),
                0
            );
        }
    }

    #[test]
    fn recovery_point_times_come_before_a_later_slot() {
        let day = 24 * 3600 * 1000i64;
        let now = 10 * day + 3600 * 1000; // 01:00
        assert_eq!(
            next_time_of_day(&[120], now),
            Some(10 * day + 2 * 3600 * 1000)
        );
        assert_eq!(next_time_of_day(&[30], now), Some(11 * day + 30 * 60_000));
        assert_eq!(next_time_of_day(&[], now), None);
        // A daily interval whose slot is later than 02:00 today: the time wins.
        let due = next_due("s", day as u64, &[120], now);
        assert!(due <= 10 * day + 2 * 3600 * 1000);
    }

    #[test]
    fn the_cap_holds_per_node_and_the_oldest_go_first() {
        let due = |s: &str, n: &str, t: i64| Due {
            source: s.into(),
            node: n.into(),
            due_ms: t,
        };
        let list = vec![
            due("a", "n1", 30),
            due("b", "n1", 10),
            due("c", "n1", 20),
            due("d", "n2", 5),
        ];
        let running: HashMap<String, u32> = [("n1".to_string(), 1)].into_iter().collect();
        let start = to_start(list, &running, 2);
        let names: Vec<&str> = start.iter().map(|d| d.source.as_str()).collect();
        assert_eq!(names, vec!["d", "b"]);
    }
}
