//! The node's background work, each loop a [`Worker`] of the daemon's
//! [`bulwark_common::worker::WorkerSet`] (`bulwark workers --node N` lists them):
//! - `heartbeat` — registers with the coordinator, then reports usage, alerts and
//!   the revocation list held, every `heartbeat_interval` (backing off when the
//!   coordinator cannot be reached), taking assignments, policies and newer
//!   revocation lists from the answers;
//! - `renewal` — renews the node's certificate through the coordinator.

use std::sync::Arc;
use std::time::Duration;

use bulwark_common::failover::CoordinatorChannel;
use bulwark_common::worker::Worker;
use bulwark_proto as pb;
use bulwark_proto::coordinator_client::CoordinatorClient;
use tokio_util::sync::CancellationToken;

use crate::node::NodeService;
use crate::store::Store;

/// Registers, then reports every `interval`; reconnects with backoff. Each report
/// says which revocation list the node holds; a newer one in the answer is put in
/// force at once (connections of newly revoked peers are cut).
pub struct Heartbeat {
    pub svc: Arc<NodeService>,
    pub store: Store,
    pub client: CoordinatorClient<CoordinatorChannel>,
    /// The address the node advertises.
    pub address: String,
    pub nbd_address: Option<String>,
    pub interval: Duration,
    registered: bool,
    failures: u32,
    /// Ingest rate: when the previous report was made and the bytes applied then.
    last: (std::time::Instant, u64),
}

impl Heartbeat {
    pub fn new(
        svc: Arc<NodeService>,
        store: Store,
        client: CoordinatorClient<CoordinatorChannel>,
        address: String,
        nbd_address: Option<String>,
        interval: Duration,
    ) -> Heartbeat {
        let last = (std::time::Instant::now(), svc.ingested_bytes());
        Heartbeat {
            svc,
            store,
            client,
            address,
            nbd_address,
            interval,
            registered: false,
            failures: 0,
            last,
        }
    }

    /// One report (registering first when not registered).
    async fn report(&mut self) -> anyhow::Result<()> {
        let svc = &self.svc;
        let revocations = svc.revocations();
        let (mut report, disks) = usage_report(svc, &self.store, self.nbd_address.clone()).await?;
        let now = (std::time::Instant::now(), svc.ingested_bytes());
        let secs = now.0.duration_since(self.last.0).as_secs_f64().max(0.001);
        report.ingest_bytes_per_sec = (now.1.saturating_sub(self.last.1) as f64 / secs) as u64;
        report.revocations_version = revocations.version();
        self.last = now;
        if !self.registered {
            let r = self
                .client
                .register_node(pb::RegisterNodeRequest {
                    address: self.address.clone(),
                    capacity_bytes: report.capacity_bytes,
                    disks,
                    version: bulwark_common::VERSION.to_string(),
                })
                .await?
                .into_inner();
            svc.remember(&r.assignments);
            self.registered = true;
            tracing::info!("registered with the coordinator");
        }
        match self.client.node_heartbeat(report).await {
            Ok(r) => {
                let r = r.into_inner();
                if let Some(list) = r.revocations
                    && let Err(e) = revocations.apply_newer(list)
                {
                    tracing::error!("the coordinator's revocation list was not taken: {e}");
                }
                let assignments = r.assignments;
                svc.remember(&assignments);
                svc.apply_policies(&assignments).await;
                Ok(())
            }
            Err(s) if s.code() == tonic::Code::NotFound => {
                self.registered = false;
                Err(s.into())
            }
            Err(s) => Err(s.into()),
        }
    }
}

impl Worker for Heartbeat {
    fn name(&self) -> String {
        "heartbeat".into()
    }

    /// The interval, or after failures a backoff of 0.5 s per failure up to 10 s.
    fn period(&self) -> Duration {
        if self.failures == 0 {
            self.interval
        } else {
            Duration::from_millis(500 * u64::from(self.failures.min(20)))
                .min(Duration::from_secs(10))
        }
    }

    fn runs_at_start(&self) -> bool {
        true
    }

    async fn run(&mut self, _stop: &CancellationToken) -> Result<(), String> {
        match self.report().await {
            Ok(()) => {
                if self.failures > 0 {
                    tracing::info!("coordinator reachable again");
                }
                self.failures = 0;
                Ok(())
            }
            Err(e) => {
                self.failures += 1;
                let failures = self.failures;
                if failures == 1 || failures.is_multiple_of(10) {
                    tracing::warn!("cannot report to the coordinator (attempt {failures}): {e}");
                }
                Err(format!(
                    "cannot report to the coordinator (attempt {failures}): {e}"
                ))
            }
        }
    }
}

async fn usage_report(
    svc: &NodeService,
    store: &Store,
    nbd_address: Option<String>,
) -> anyhow::Result<(pb::NodeHeartbeatRequest, Vec<pb::NodeDisk>)> {
    let s = store.clone();
    let (usage, problems) = tokio::task::spawn_blocking(move || {
        s.usage().map(|u| {
            let p = s.health(&u);
            (u, p)
        })
    })
    .await??;
    record_metrics(&usage);
    let disks: Vec<pb::NodeDisk> = usage
        .disks
        .iter()
        .map(|d| pb::NodeDisk {
            path: d.path.display().to_string(),
            capacity_bytes: d.capacity_bytes,
            used_bytes: d.used_bytes,
        })
        .collect();
    let req = pb::NodeHeartbeatRequest {
        capacity_bytes: usage.disks.iter().map(|d| d.capacity_bytes).sum(),
        allocated_bytes: usage.disks.iter().map(|d| d.allocated_bytes).sum(),
        used_bytes: usage.disks.iter().map(|d| d.used_bytes).sum(),
        live_streams: svc.live_streams(),
        sources: usage
            .sources
            .iter()
            .map(|s| pb::SourceUsage {
                source: s.name.clone(),
                newest_point: s.newest_point,
                points: s.points,
                used_bytes: s.used_bytes,
                allocated_bytes: s.allocated_bytes,
                replica_alloc_bytes: s.replica_alloc_bytes,
                points_alloc_bytes: s.points_alloc_bytes,
                points_used_bytes: s.points_used_bytes,
                points_logical_bytes: s.points_logical_bytes,
                oldest_point_ms: s.oldest_point_ms,
            })
            .collect(),
        disks: disks.clone(),
        alerts: alerts(
            &usage,
            &svc.space_refusals(),
            &store.settle_failures(),
            &store.refused_sources(),
        )
        .into_iter()
        .chain(svc.lock_alerts())
        .collect(),
        ingest_bytes_per_sec: 0,
        health: if problems.is_empty() {
            "ok".to_string()
        } else {
            problems.join("; ")
        },
        nbd_address: nbd_address.unwrap_or_default(),
        revocations_version: 0,
    };
    Ok((req, disks))
}

/// The conditions this node raises now: recovery-point space at 80% and 90% of its
/// allocation, syncs refused for space or failed on a pool disk (full or failing),
/// points a verify found damaged.
fn alerts(
    usage: &crate::store::PoolUsage,
    refusals: &std::collections::HashMap<String, (crate::node::Refusal, String)>,
    settle_failures: &std::collections::HashMap<String, String>,
    refused_sources: &std::collections::HashMap<String, String>,
) -> Vec<pb::Alert> {
    let alert = |key: String, severity: &str, subject: &str, message: String| pb::Alert {
        key,
        severity: severity.into(),
        subject: subject.into(),
        message,
        ..Default::default()
    };
    let mut out = Vec::new();
    for s in &usage.sources {
        if s.points_alloc_bytes > 0 {
            let pct = s.points_used_bytes as f64 * 100.0 / s.points_alloc_bytes as f64;
            let message = format!(
                "recovery-point space of {} is {pct:.0}% used ({} of {} bytes)",
                s.name, s.points_used_bytes, s.points_alloc_bytes
            );
            if pct >= 90.0 {
                out.push(alert(
                    format!("allocation-90/{}", s.name),
                    "critical",
                    &s.name,
                    message,
                ));
            } else if pct >= 80.0 {
                out.push(alert(
                    format!("allocation-80/{}", s.name),
                    "warning",
                    &s.name,
                    message,
                ));
            }
        }
        if s.damaged_points > 0 {
            out.push(alert(
                format!("damaged/{}", s.name),
                "critical",
                &s.name,
                format!(
                    "{} recovery point(s) of {} are damaged; run `bulwark verify {}`",
                    s.damaged_points, s.name, s.name
                ),
            ));
        }
    }
    for (source, (kind, why)) in refusals {
        out.push(alert(
            format!("{}/{source}", kind.key()),
            "critical",
            source,
            why.clone(),
        ));
    }
    for (source, why) in settle_failures {
        out.push(alert(
            format!("settle/{source}"),
            "critical",
            source,
            why.clone(),
        ));
    }
    for (source, why) in refused_sources {
        out.push(alert(
            format!("refused-source/{source}"),
            "critical",
            source,
            format!(
                "this node refuses stored data source {source}: {why}; its files are left alone"
            ),
        ));
    }
    out
}

/// The pool's figures as metrics (each heartbeat): capacity, allocation and use per
/// disk, and each source's replica lag (age of its newest point) and its recovery
/// points' bytes before and after compression.
fn record_metrics(usage: &crate::store::PoolUsage) {
    use bulwark_common::metrics as m;
    for d in &usage.disks {
        let path = d.path.display().to_string();
        let l = [("disk", path.as_str())];
        m::gauge_set("bulwark_pool_capacity_bytes", &l, d.capacity_bytes as f64);
        m::gauge_set("bulwark_pool_allocated_bytes", &l, d.allocated_bytes as f64);
        m::gauge_set("bulwark_pool_used_bytes", &l, d.used_bytes as f64);
    }
    let now = bulwark_common::time::now_ms();
    for s in &usage.sources {
        let l = [("source", s.name.as_str())];
        m::gauge_set(
            "bulwark_source_logical_bytes",
            &l,
            s.points_logical_bytes as f64,
        );
        m::gauge_set(
            "bulwark_source_stored_bytes",
            &l,
            s.points_used_bytes as f64,
        );
        if s.newest_point_ms > 0 {
            let lag = (now - s.newest_point_ms).max(0) as f64 / 1000.0;
            m::gauge_set("bulwark_replica_lag_seconds", &[("source", &s.name)], lag);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each source's recovery points before and after compression are gauges
    /// under the names other tools (dashboards) use.
    #[test]
    fn each_sources_logical_and_stored_bytes_are_gauges() {
        let usage = crate::store::PoolUsage {
            disks: Vec::new(),
            sources: vec![crate::store::SourceUsage {
                name: "gauged-vol".into(),
                newest_point: 3,
                points: 3,
                used_bytes: 0,
                allocated_bytes: 0,
                replica_alloc_bytes: 0,
                points_alloc_bytes: 0,
                points_used_bytes: 1000,
                points_logical_bytes: 3500,
                damaged_points: 0,
                oldest_point_ms: 0,
                newest_point_ms: 0,
            }],
        };
        record_metrics(&usage);
        let text = bulwark_common::metrics::render();
        for line in [
            "# TYPE bulwark_source_logical_bytes gauge",
            "bulwark_source_logical_bytes{source=\"gauged-vol\"} 3500",
            "# TYPE bulwark_source_stored_bytes gauge",
            "bulwark_source_stored_bytes{source=\"gauged-vol\"} 1000",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
        }
    }

    /// A failed settle is a critical alert `settle/<source>` carrying the error.
    #[test]
    fn a_failed_settle_is_a_critical_alert() {
        let usage = crate::store::PoolUsage::default();
        let failed: std::collections::HashMap<String, String> = [(
            "vol".to_string(),
            "data source vol: point 2 could not be settled".to_string(),
        )]
        .into();
        let out = alerts(&usage, &Default::default(), &failed, &Default::default());
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].key, "settle/vol");
        assert_eq!(out[0].severity, "critical");
        assert_eq!(out[0].subject, "vol");
        assert!(out[0].message.contains("point 2"), "{:?}", out[0]);
    }

    /// A sync refused for space and one failed on a full or failing pool disk are
    /// critical alerts, each under its own key.
    #[test]
    fn refusals_and_disk_faults_are_critical_alerts() {
        use crate::node::Refusal;
        use crate::store::DiskFault;
        let usage = crate::store::PoolUsage::default();
        let refusals: std::collections::HashMap<String, (Refusal, String)> = [
            (
                "a".to_string(),
                (Refusal::Allocation, "sync refused: full".to_string()),
            ),
            (
                "b".to_string(),
                (Refusal::Disk(DiskFault::Full), "no space".to_string()),
            ),
            (
                "c".to_string(),
                (Refusal::Disk(DiskFault::Failed), "EIO".to_string()),
            ),
        ]
        .into();
        let mut out = alerts(&usage, &refusals, &Default::default(), &Default::default());
        out.sort_by(|x, y| x.key.cmp(&y.key));
        let keys: Vec<&str> = out.iter().map(|a| a.key.as_str()).collect();
        assert_eq!(keys, ["allocation-full/a", "disk-error/c", "disk-full/b"]);
        assert!(out.iter().all(|a| a.severity == "critical"), "{out:?}");
        assert_eq!(out[2].message, "no space");
    }
}
