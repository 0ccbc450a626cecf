//! The protection groups' schedule, one pass at a time: which syncs are due (see
//! [`crate::schedule`] for the pure planning), which start now, and the alerts of
//! late and missed syncs.

use std::collections::HashMap;

use crate::registry::{Alert, Command, GroupRecord, RegistryError, SourceRecord, SyncCommand};
use crate::schedule::{Due, next_due, next_slot, next_time_of_day, to_start};

use super::CoordinatorService;

/// What one pass found: the syncs due, the alerts, and each grouped source's
/// interval and recovery-point times.
#[derive(Default)]
struct Pass {
    due: Vec<Due>,
    alerts: Vec<Alert>,
    intervals: HashMap<String, (u64, Vec<u32>)>,
}

impl CoordinatorService {
    /// One pass of the protection groups' schedule (see [`crate::schedule`]): plans
    /// each member's next slot, starts the due syncs each node has room for, and
    /// raises `sync-late` (due for more than half an interval) and `sync-missed`
    /// (no sync for two intervals) alerts.
    pub async fn schedule_tick(&self) -> Result<(), RegistryError> {
        let now = bulwark_common::time::now_ms();
        let inflight = self
            .scheduled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut running: HashMap<String, u32> = HashMap::new();
        for node in inflight.values() {
            *running.entry(node.clone()).or_default() += 1;
        }
        let pass = self.plan_pass(now, &inflight)?;
        for d in to_start(pass.due, &running, self.max_syncs_per_node) {
            let Ok(s) = self.registry.source(&d.source) else {
                continue;
            };
            let (interval, times) = pass
                .intervals
                .get(&d.source)
                .cloned()
                .unwrap_or((60_000, Vec::new()));
            // The interval's phase is kept; a recovery-point time may come first.
            let mut next = d.due_ms + interval as i64;
            if next <= now {
                next = next_slot(&d.source, interval, now);
            }
            if let Some(t) = next_time_of_day(&times, now) {
                next = next.min(t);
            }
            self.registry.set_next_sync(&d.source, next)?;
            self.start_scheduled(&s, d).await;
        }
        self.registry
            .report_alerts("coordinator/schedule", &pass.alerts)
    }

    /// Walks the grouped sources: plans a first slot for new members, lists the
    /// due syncs not running (`inflight`), and the late and missed ones.
    fn plan_pass(
        &self,
        now: i64,
        inflight: &HashMap<String, String>,
    ) -> Result<Pass, RegistryError> {
        let groups: HashMap<String, GroupRecord> = self
            .registry
            .groups()?
            .into_iter()
            .map(|g| (g.name.clone(), g))
            .collect();
        let mut pass = Pass::default();
        for s in self.registry.sources()? {
            // Log sources ship on their agent's own interval (minutes), whatever
            // their group's volume schedule; the group pairs them for restore --at.
            if s.group.is_empty() || s.kind == "log" {
                continue;
            }
            let Some(g) = groups.get(&s.group) else {
                pass.alerts.push(Alert::warning(
                    format!("group-missing/{}", s.name),
                    s.name.clone(),
                    format!(
                        "{} is in group {}, which does not exist: create it with `bulwark group create`",
                        s.name, s.group
                    ),
                ));
                continue;
            };
            pass.intervals
                .insert(s.name.clone(), (g.interval_ms, g.point_times.clone()));
            if s.next_sync_ms == 0 {
                self.registry.set_next_sync(
                    &s.name,
                    next_due(&s.name, g.interval_ms, &g.point_times, now),
                )?;
                continue;
            }
            pass.alerts.extend(lateness(&s, g, now));
            let Some(node) = s.node.clone() else {
                continue;
            };
            if now >= s.next_sync_ms
                && !inflight.contains_key(&s.name)
                && s.moving_to.is_empty()
                && self.registry.connected(&s.agent)
            {
                pass.due.push(Due {
                    source: s.name.clone(),
                    node,
                    due_ms: s.next_sync_ms,
                });
            }
        }
        Ok(pass)
    }

    /// Sends the scheduled sync `d` of `s` to its agent, and counts it as running
    /// on its node until the agent answers.
    async fn start_scheduled(&self, s: &SourceRecord, d: Due) {
        let source = d.source.clone();
        let rx = match self
            .registry
            .dispatch(&s.agent, |id| {
                Command::Sync(SyncCommand {
                    command_id: id,
                    source,
                    check: false,
                    deep: false,
                    trace_context: bulwark_common::telemetry::inject_map(),
                })
            })
            .await
        {
            Ok(rx) => rx,
            Err(e) => {
                tracing::warn!(source = %d.source, "scheduled sync not started: {e}");
                return;
            }
        };
        tracing::info!(source = %d.source, node = %d.node, "scheduled sync started");
        self.scheduled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(d.source.clone(), d.node.clone());
        let scheduled = self.scheduled.clone();
        tokio::spawn(async move {
            let outcome = rx.await;
            if let Ok(Err(e)) = &outcome {
                tracing::warn!(source = %d.source, "scheduled sync failed: {e}");
            }
            scheduled
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&d.source);
        });
    }

    /// Scheduled syncs running, by node.
    pub fn scheduled_per_node(&self) -> HashMap<String, u32> {
        let mut out = HashMap::new();
        for node in self
            .scheduled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            *out.entry(node.clone()).or_default() += 1;
        }
        out
    }
}

/// A `sync-missed` alert (no sync for two intervals) or a `sync-late` one (due for
/// more than half an interval) for `s` of group `g`.
fn lateness(s: &SourceRecord, g: &GroupRecord, now: i64) -> Option<Alert> {
    let interval = g.interval_ms as i64;
    let since = s.last_sync_ms.max(s.group_since_ms);
    if now - since > 2 * interval {
        Some(Alert::critical(
            format!("sync-missed/{}", s.name),
            s.name.clone(),
            format!(
                "no sync of {} for {} s; group {} syncs every {} s",
                s.name,
                (now - since) / 1000,
                g.name,
                interval / 1000
            ),
        ))
    } else if now - s.next_sync_ms > interval / 2 {
        Some(Alert::warning(
            format!("sync-late/{}", s.name),
            s.name.clone(),
            format!(
                "the sync of {} due {} s ago has not started (node busy, agent offline or source moving)",
                s.name,
                (now - s.next_sync_ms) / 1000
            ),
        ))
    } else {
        None
    }
}
