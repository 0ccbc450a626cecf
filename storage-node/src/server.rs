//! Lifecycle of a storage node, in order: load the identity, open (and recover) the
//! store, serve the Node service over mTLS, register with the coordinator and send
//! heartbeats, and on shutdown stop accepting, let running streams end, flush.

use bulwark_common::telemetry::TracedChannel;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bulwark_common::tls::{self, Role, Target, TlsIdentity};
use bulwark_proto as pb;
use bulwark_proto::coordinator_client::CoordinatorClient;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::NodeConfig;
use crate::node::NodeService;
use crate::service::NodeApi;
use crate::store::Store;

/// Runs the node on `listener` until `shutdown` is cancelled.
pub async fn run(
    cfg: NodeConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let identity = TlsIdentity::load_as(&cfg.tls, Role::Node, Some(&cfg.name))?;
    let (data_dir, disks) = (cfg.data_dir.clone(), cfg.disks.clone());
    let policy = cfg.pool_policy;
    let store = tokio::task::spawn_blocking(move || Store::open_with(&data_dir, disks, policy))
        .await?
        .context("cannot open the node's store")?;
    // The last revocation list the coordinator sent, in force before anything is
    // served; kept up to date from heartbeat answers.
    identity
        .revocations()
        .persist_at(&cfg.data_dir.join(REVOCATIONS_FILE))
        .map_err(anyhow::Error::msg)?;
    let local = listener.local_addr()?;
    let advertise = cfg.advertise.clone().unwrap_or(Target {
        host: local.ip().to_string(),
        port: local.port(),
    });
    let channel = tls::channel_lazy(&cfg.coordinator, identity.client_config(Role::Coordinator)?)
        .map_err(anyhow::Error::msg)?;
    let coordinator = CoordinatorClient::new(channel)
        .max_decoding_message_size(bulwark_common::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(bulwark_common::MAX_MESSAGE_BYTES);
    tokio::spawn(bulwark_common::enroll::renewal_loop(
        identity.clone(),
        cfg.tls.clone(),
        bulwark_common::enroll::coordinator_signer(coordinator.clone()),
        std::time::Duration::from_secs(3600),
        shutdown.clone(),
    ));
    let svc = Arc::new(
        NodeService::new(
            cfg.name.clone(),
            store.clone(),
            coordinator.clone(),
            identity.clone(),
        )?
        .with_limits(crate::service::admission::Limits {
            max_syncs: cfg.max_concurrent_syncs,
            syncs_per_agent: cfg.max_syncs_per_agent,
            restores_per_agent: cfg.max_restores_per_agent,
            idle: cfg.stream_idle_timeout,
        }),
    );

    let nbd = match cfg.nbd_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for NBD on {addr}"))?;
            let bound = listener.local_addr()?;
            // What clients dial: the advertised host when listening on every address.
            let host = if bound.ip().is_unspecified() {
                advertise.host.clone()
            } else {
                bound.ip().to_string()
            };
            let exports = Arc::new(crate::mount::PointExports {
                store: store.clone(),
                locks: svc.locks(),
                trust_domain: identity.trust_domain.clone(),
            });
            tracing::info!(
                %bound,
                max_connections = cfg.nbd_limits.max_connections,
                handshake_timeout = ?cfg.nbd_limits.handshake_timeout,
                "serving read-only NBD exports of recovery points (TLS, admin certificates)"
            );
            let task = tokio::spawn(bulwark_nbd::serve_tls_tcp(
                listener,
                identity.server_config()?,
                exports,
                Arc::new(cfg.nbd_limits.apply(bulwark_nbd::ServerOptions {
                    // A mounted client holds its connection for as long as it
                    // likes; a stopping node does not wait long for it.
                    shutdown_grace: std::time::Duration::from_secs(5),
                    ..Default::default()
                })),
                shutdown.clone(),
            ));
            Some((format!("{host}:{}", bound.port()), task))
        }
        None => None,
    };

    let heartbeats = tokio::spawn(heartbeat_loop(
        svc.clone(),
        store.clone(),
        coordinator,
        advertise.to_string(),
        nbd.as_ref().map(|(a, _)| a.clone()),
        cfg.heartbeat_interval,
        shutdown.clone(),
    ));

    tracing::info!(node = %cfg.name, %local, advertise = %advertise, "storage node listening");
    let incoming = tls::incoming(
        listener,
        identity.server_config()?,
        Some(identity.revocations().clone()),
        shutdown.clone(),
    );
    // The standard gRPC health service (grpc.health.v1), for any fleet certificate.
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<pb::node_server::NodeServer<NodeApi>>()
        .await;
    tls::server_builder()
        .layer(bulwark_common::telemetry::ServerTraceLayer)
        // Who may call what (common::access::RULES), before any handler.
        .layer(bulwark_common::access::AccessLayer::new(&identity))
        .add_service(health_service)
        .add_service(
            pb::node_server::NodeServer::new(NodeApi(svc))
                // What agents send is bounded by the protocol's batches; each
                // batch is also checked against its source's own limit.
                .max_decoding_message_size(bulwark_common::block::MAX_AGENT_MESSAGE_BYTES)
                .max_encoding_message_size(bulwark_common::MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
        .await
        .context("node server failed")?;
    heartbeats.abort();
    if let Some((_, task)) = nbd {
        let _ = task.await;
    }
    store.flush()?;
    tracing::info!("storage node stopped");
    Ok(())
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
/// allocation, syncs refused for space, points a verify found damaged.
fn alerts(
    usage: &crate::store::PoolUsage,
    refusals: &std::collections::HashMap<String, String>,
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
    for (source, why) in refusals {
        out.push(alert(
            format!("allocation-full/{source}"),
            "critical",
            source,
            format!("sync refused: {why}"),
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

/// Where a node keeps the fleet's revocation list, in its `data_dir`.
pub const REVOCATIONS_FILE: &str = "revocations.json";

/// Registers, then reports every `interval`; reconnects with backoff. Each report
/// says which revocation list the node holds; a newer one in the answer is put in
/// force at once (connections of newly revoked peers are cut).
async fn heartbeat_loop(
    svc: Arc<NodeService>,
    store: Store,
    mut client: CoordinatorClient<TracedChannel>,
    address: String,
    nbd_address: Option<String>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut registered = false;
    let mut failures = 0u32;
    // Ingest rate: bytes applied since the previous report, per second.
    let mut last = (std::time::Instant::now(), svc.ingested_bytes());
    let revocations = svc.revocations();
    loop {
        let result: anyhow::Result<()> = async {
            let (mut report, disks) = usage_report(&svc, &store, nbd_address.clone()).await?;
            let now = (std::time::Instant::now(), svc.ingested_bytes());
            let secs = now.0.duration_since(last.0).as_secs_f64().max(0.001);
            report.ingest_bytes_per_sec = (now.1.saturating_sub(last.1) as f64 / secs) as u64;
            report.revocations_version = revocations.version();
            last = now;
            if !registered {
                let r = client
                    .register_node(pb::RegisterNodeRequest {
                        address: address.clone(),
                        capacity_bytes: report.capacity_bytes,
                        disks,
                        version: bulwark_common::VERSION.to_string(),
                    })
                    .await?
                    .into_inner();
                svc.remember(&r.assignments);
                registered = true;
                tracing::info!("registered with the coordinator");
            }
            match client.node_heartbeat(report).await {
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
                }
                Err(s) if s.code() == tonic::Code::NotFound => {
                    registered = false;
                    return Err(s.into());
                }
                Err(s) => return Err(s.into()),
            }
            Ok(())
        }
        .await;
        let wait = match result {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!("coordinator reachable again");
                }
                failures = 0;
                interval
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(10) {
                    tracing::warn!("cannot report to the coordinator (attempt {failures}): {e}");
                }
                Duration::from_millis(500 * u64::from(failures.min(20)))
                    .min(Duration::from_secs(10))
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// The pool's figures as metrics (each heartbeat): capacity, allocation and use per
/// disk, and each source's replica lag (age of its newest point).
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
        if s.newest_point_ms > 0 {
            let lag = (now - s.newest_point_ms).max(0) as f64 / 1000.0;
            m::gauge_set("bulwark_replica_lag_seconds", &[("source", &s.name)], lag);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
