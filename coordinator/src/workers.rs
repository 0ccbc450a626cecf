//! The coordinator's background work, each loop a [`Worker`] of the daemon's
//! [`bulwark_common::worker::WorkerSet`] (`bulwark workers` lists them):
//! - `schedule` — the protection groups' schedule, twice a second;
//! - `moves` — rolls back moves a crash interrupted and retries dropping stale
//!   copies, every 5 s;
//! - `monitor` — the coordinator's own alerts (nodes down or unhealthy, expiring
//!   certificates, inconsistent sources, revoked nodes);
//! - `forecast` — the capacity forecast's alerts and metrics, and the tidying of
//!   its histories, about once per sample spacing (`forecast_window` / 128);
//! - `scrub` — verifies every source once per `scrub_interval`, when set;
//! - `renewal` — renews the coordinator's own certificate (with `[enrollment]`);
//! - `revocations` — puts in force a newer revocation list another coordinator
//!   wrote into the shared state (with etcd; a no-op alone), every 2 s.
//!
//! With etcd, every worker but `revocations` runs only while this coordinator
//! leads (`leader::LeaderOnly`).

use std::sync::Arc;
use std::time::Duration;

use bulwark_common::tls::{self, TlsIdentity};
use bulwark_common::worker::Worker;
use bulwark_proto as pb;
use tokio_util::sync::CancellationToken;

use crate::registry::Registry;
use crate::revocation::RevocationStore;
use crate::service::CoordinatorService;

/// Runs the protection groups' schedule twice a second.
pub struct Schedule(pub Arc<CoordinatorService>);

impl Worker for Schedule {
    fn name(&self) -> String {
        "schedule".into()
    }

    fn period(&self) -> Duration {
        Duration::from_millis(500)
    }

    fn runs_at_start(&self) -> bool {
        true
    }

    async fn run(&mut self, _stop: &CancellationToken) -> Result<(), String> {
        self.0
            .schedule_tick()
            .await
            .map_err(|e| format!("schedule: {e}"))
    }
}

/// Rolls back moves a crash interrupted (at once, then whenever one is found) and
/// retries dropping stale copies, every few seconds.
pub struct Moves(pub Arc<CoordinatorService>);

impl Worker for Moves {
    fn name(&self) -> String {
        "moves".into()
    }

    fn period(&self) -> Duration {
        Duration::from_secs(5)
    }

    fn runs_at_start(&self) -> bool {
        true
    }

    async fn run(&mut self, _stop: &CancellationToken) -> Result<(), String> {
        self.0.tidy_moves().await;
        Ok(())
    }
}

/// Verifies every data source once per `every`, one at a time, the longest
/// unverified first (`bulwark verify`, with its repair). What is found is logged,
/// kept on the source record, and raised as an alert by the node when points stay
/// damaged.
pub struct Scrub {
    pub svc: Arc<CoordinatorService>,
    pub every: Duration,
}

impl Worker for Scrub {
    fn name(&self) -> String {
        "scrub".into()
    }

    fn period(&self) -> Duration {
        (self.every / 10).clamp(Duration::from_millis(500), Duration::from_secs(60))
    }

    async fn run(&mut self, _stop: &CancellationToken) -> Result<(), String> {
        let registry = self.svc.registry();
        let due = match registry.due_for_scrub(self.every) {
            Ok(Some(s)) => s,
            Ok(None) => return Ok(()),
            Err(e) => return Err(format!("scrub: cannot list sources: {e}")),
        };
        let result = match self.svc.verify(&due, 0).await {
            Ok(r) => {
                let left = r.damaged_points.len();
                let summary = format!(
                    "{} blocks checked, {} damaged replica blocks ({} repaired), {left} damaged points{}",
                    r.blocks_checked,
                    r.damaged_replica_blocks.len(),
                    r.repaired_blocks,
                    if r.repair_error.is_empty() {
                        String::new()
                    } else {
                        format!("; {}", r.repair_error)
                    }
                );
                if r.damaged_replica_blocks.is_empty() && left == 0 {
                    tracing::info!(source = %due, "scrub: {summary}");
                } else {
                    tracing::warn!(source = %due, "scrub: {summary}");
                }
                summary
            }
            Err(s) => {
                tracing::warn!(source = %due, "scrub failed: {s}");
                format!("failed: {s}")
            }
        };
        registry
            .verified(&due, result)
            .map_err(|e| format!("scrub of {due}: cannot record the result: {e}"))
    }
}

/// Raises the coordinator's own alerts: a node that has not reported within the node
/// timeout is `down` (critical), resolved by itself when it reports again.
pub struct Monitor {
    pub registry: Arc<Registry>,
    pub timeout: Duration,
    pub identity: TlsIdentity,
    pub revocations: Arc<RevocationStore>,
}

impl Worker for Monitor {
    fn name(&self) -> String {
        "monitor".into()
    }

    fn period(&self) -> Duration {
        (self.timeout / 5).clamp(Duration::from_millis(200), Duration::from_secs(5))
    }

    async fn run(&mut self, _stop: &CancellationToken) -> Result<(), String> {
        let registry = &self.registry;
        let timeout = self.timeout;
        let nodes = registry
            .nodes()
            .map_err(|e| format!("monitor: cannot list nodes: {e}"))?;
        let now = bulwark_common::time::now_ms();
        // The certificate presented now: a renewal shows at the next tick.
        let own_cert_expiry_ms =
            tls::not_after_ms(self.identity.current_cert().as_ref()).unwrap_or(0);
        let unhealthy = nodes
            .iter()
            .filter(|n| registry.node_up(n) && !n.health.is_empty() && n.health != "ok")
            .map(|n| pb::Alert {
                key: format!("node-health/{}", n.name),
                severity: "warning".into(),
                subject: n.name.clone(),
                message: format!("node {}: {}", n.name, n.health),
                ..Default::default()
            });
        let alerts: Vec<crate::registry::Alert> = nodes
            .iter()
            .filter(|n| !registry.node_up(n))
            .map(|n| pb::Alert {
                key: format!("node-down/{}", n.name),
                severity: "critical".into(),
                subject: n.name.clone(),
                message: format!(
                    "node {} has not reported for {} s (node_timeout {} s); its sources cannot sync",
                    n.name,
                    (now - n.last_seen_ms) / 1000,
                    timeout.as_secs()
                ),
                ..Default::default()
            })
            .chain(unhealthy)
            .chain(expiring_certificates(registry, &nodes, own_cert_expiry_ms, now))
            .chain(inconsistent_sources(registry))
            .chain(self.revocations.node_alerts(registry))
            .map(crate::registry::Alert::from)
            .collect();
        registry
            .report_alerts("coordinator", &alerts)
            .map_err(|e| format!("monitor: cannot record alerts: {e}"))
    }
}

/// The capacity forecast: raises and resolves `forecast/...` warnings, sets the
/// `bulwark_forecast_*` gauges, and drops the histories of what is gone. The
/// samples themselves are taken at each node heartbeat (`Registry::heartbeat`).
pub struct Forecast(pub Arc<Registry>);

impl Worker for Forecast {
    fn name(&self) -> String {
        "forecast".into()
    }

    fn period(&self) -> Duration {
        Duration::from_millis(self.0.forecast_settings().spacing_ms() as u64)
            .clamp(Duration::from_millis(500), Duration::from_secs(60))
    }

    async fn run(&mut self, _stop: &CancellationToken) -> Result<(), String> {
        let registry = self.0.clone();
        tokio::task::spawn_blocking(move || {
            let report = registry.forecast_report()?;
            registry.report_forecast_alerts(&report)?;
            forecast_metrics(&report);
            registry.prune_forecast_histories(&report)?;
            Ok::<_, crate::registry::RegistryError>(())
        })
        .await
        .map_err(|e| format!("forecast: {e}"))?
        .map_err(|e| format!("forecast: {e}"))
    }
}

/// The forecast as gauges: days until full (only where there is a forecast) and
/// growth per pool disk, days until full per source.
fn forecast_metrics(report: &crate::registry::ForecastReport) {
    use bulwark_common::metrics::gauge_set_all;
    fn disk(r: &crate::registry::ForecastRow) -> Vec<(&str, &str)> {
        vec![("node", r.node.as_str()), ("disk", r.name.as_str())]
    }
    let days: Vec<_> = report
        .disks
        .iter()
        .filter_map(|r| r.forecast.days_until_full.map(|d| (disk(r), d)))
        .collect();
    gauge_set_all("bulwark_forecast_days_until_full", &days);
    let growth: Vec<_> = report
        .disks
        .iter()
        .filter_map(|r| r.forecast.growth_per_day.map(|g| (disk(r), g)))
        .collect();
    gauge_set_all("bulwark_forecast_growth_bytes_per_day", &growth);
    let sources: Vec<_> = report
        .sources
        .iter()
        .filter_map(|r| {
            r.forecast
                .days_until_full
                .map(|d| (vec![("source", r.name.as_str())], d))
        })
        .collect();
    gauge_set_all("bulwark_source_forecast_days_until_full", &sources);
}

/// A warning per data source whose agent cannot vouch for its record of changes
/// (it stopped uncleanly or lost it): its next sync is a consistency check. Resolved
/// when a sync ends with the source consistent again.
fn inconsistent_sources(registry: &Registry) -> Vec<pb::Alert> {
    registry
        .sources()
        .unwrap_or_default()
        .into_iter()
        .filter(|s| s.inconsistent && s.last_point > 0)
        .map(|s| pb::Alert {
            key: format!("inconsistent/{}", s.name),
            severity: "warning".into(),
            subject: s.name.clone(),
            message: format!(
                "data source {} is inconsistent (agent {} stopped uncleanly or lost its record of changes): its next sync is a consistency check",
                s.name, s.agent
            ),
            ..Default::default()
        })
        .collect()
}

/// `cert-expiring/<role>/<name>` alerts: a certificate of the coordinator, a node or
/// an agent (as last presented) that expires within 30 days (critical within 7).
fn expiring_certificates(
    registry: &Registry,
    nodes: &[crate::registry::NodeRecord],
    own_ms: i64,
    now: i64,
) -> Vec<pb::Alert> {
    const DAY: i64 = 24 * 3600 * 1000;
    let mut seen: Vec<(&str, String, i64)> = vec![("coordinator", "coordinator".into(), own_ms)];
    seen.extend(
        nodes
            .iter()
            .map(|n| ("node", n.name.clone(), n.cert_not_after_ms)),
    );
    if let Ok(agents) = registry.agents() {
        seen.extend(
            agents
                .into_iter()
                .map(|a| ("agent", a.name, a.cert_not_after_ms)),
        );
    }
    seen.into_iter()
        .filter(|(_, _, t)| *t > 0 && *t - now < 30 * DAY)
        .map(|(role, name, t)| {
            let days = (t - now) / DAY;
            pb::Alert {
                key: format!("cert-expiring/{role}/{name}"),
                severity: if t - now < 7 * DAY {
                    "critical"
                } else {
                    "warning"
                }
                .into(),
                subject: name.clone(),
                message: if t <= now {
                    format!("the {role} certificate of {name} has expired")
                } else {
                    format!(
                        "the {role} certificate of {name} expires in {days} days: issue a new one"
                    )
                },
                ..Default::default()
            }
        })
        .collect()
}

/// Follows the revocation list in the shared state (see the module docs).
pub struct Revocations(pub Arc<RevocationStore>);

impl Worker for Revocations {
    fn name(&self) -> String {
        "revocations".into()
    }

    fn period(&self) -> Duration {
        Duration::from_secs(2)
    }

    async fn run(&mut self, _stop: &CancellationToken) -> Result<(), String> {
        let store = self.0.clone();
        let changed = tokio::task::spawn_blocking(move || store.refresh())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|s| s.message().to_string())?;
        if changed {
            tracing::info!(
                version = self.0.version(),
                "revocation list in force, from the shared state"
            );
        }
        Ok(())
    }
}
