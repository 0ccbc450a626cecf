//! Lifecycle of the coordinator, in order: load the identity, open the registry,
//! serve the Coordinator service over mTLS, and on shutdown stop accepting and flush.

use std::sync::Arc;

use anyhow::Context;
use bulwark_common::access::AccessLayer;
use bulwark_common::tls::{self, Role, TlsIdentity};
use bulwark_proto as pb;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::CoordinatorConfig;
use crate::registry::Registry;
use crate::service::{CoordinatorApi, CoordinatorService};

/// Runs the coordinator on `listener` until `shutdown` is cancelled.
pub async fn run(
    cfg: CoordinatorConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let identity = TlsIdentity::load_as(&cfg.tls, Role::Coordinator, None)?;
    let (dir, timeout) = (cfg.data_dir.clone(), cfg.node_timeout);
    let registry = Arc::new(
        tokio::task::spawn_blocking(move || Registry::open(&dir, timeout))
            .await?
            .context("cannot open the registry")?
            .with_fleet_policy(cfg.policy),
    );
    // The revocation list; signed as a CRL when the coordinator holds the CA key.
    let signer = match &cfg.enrollment {
        Some(e) => Some(
            bulwark_common::pki::Signer::load(&cfg.tls.ca, &e.ca_key).with_context(|| {
                format!(
                    "cannot load the CA key {} (key `enrollment.ca_key`)",
                    e.ca_key.display()
                )
            })?,
        ),
        None => None,
    };
    let revocations = Arc::new(
        crate::revocation::RevocationStore::open(
            registry.clone(),
            signer,
            &cfg.data_dir,
            identity.revocations().clone(),
        )
        .map_err(anyhow::Error::msg)?,
    );
    let mut svc = CoordinatorService::new(registry.clone(), identity.clone(), shutdown.clone())
        .with_rebalance_spread(cfg.rebalance_spread)
        .with_max_syncs_per_node(cfg.max_syncs_per_node)
        .with_revocations(revocations.clone())
        .with_stream_idle_timeout(cfg.stream_idle_timeout);
    if let Some(e) = &cfg.enrollment {
        let enroller = Arc::new(
            crate::enroll::Enroller::new(
                registry.tree("tokens")?,
                &cfg.tls.ca,
                &e.ca_key,
                e.cert_days,
            )
            .with_context(|| {
                format!(
                    "enrollment: cannot load the CA key {} (key `enrollment.ca_key`)",
                    e.ca_key.display()
                )
            })?
            .with_revocations(revocations.clone()),
        );
        svc = svc.with_enroller(enroller.clone());
        // The coordinator holds the CA key: it renews its own certificate itself.
        let own = enroller.clone();
        let me = identity.me.name.clone();
        let sign: bulwark_common::enroll::RenewSigner = Box::new(move |csr, dns, ips| {
            let r = own.sign_own(&me, &csr, &dns, &ips);
            Box::pin(async move { r })
        });
        tokio::spawn(bulwark_common::enroll::renewal_loop(
            identity.clone(),
            cfg.tls.clone(),
            sign,
            std::time::Duration::from_secs(3600),
            shutdown.clone(),
        ));
        let listener = tokio::net::TcpListener::bind(e.listen)
            .await
            .with_context(|| format!("cannot listen on {} (key `enrollment.listen`)", e.listen))?;
        tracing::info!(listen = %e.listen, "enrollment listening");
        let incoming = tls::incoming(
            listener,
            identity.enrollment_server_config()?,
            None,
            shutdown.clone(),
        );
        let stop = shutdown.clone();
        let access = AccessLayer::enrollment(&identity.trust_domain);
        tokio::spawn(async move {
            if let Err(e) = tls::server_builder()
                .layer(access)
                .add_service(pb::enrollment_server::EnrollmentServer::new(
                    crate::enroll::EnrollmentApi(enroller),
                ))
                .serve_with_incoming_shutdown(incoming, stop.cancelled())
                .await
            {
                tracing::error!("enrollment listener failed: {e}");
            }
        });
    }
    let svc = Arc::new(svc);
    tokio::spawn(schedule_loop(svc.clone(), shutdown.clone()));
    tokio::spawn(moves_loop(svc.clone(), shutdown.clone()));
    tokio::spawn(monitor_loop(
        registry.clone(),
        cfg.node_timeout,
        identity.clone(),
        revocations.clone(),
        shutdown.clone(),
    ));
    if let Some(every) = cfg.scrub_interval {
        tokio::spawn(scrub_loop(svc.clone(), every, shutdown.clone()));
    }
    tracing::info!(listen = %listener.local_addr()?, "coordinator listening");
    let incoming = tls::incoming(
        listener,
        identity.server_config()?,
        Some(identity.revocations().clone()),
        shutdown.clone(),
    );
    // Who may call what (common::access::RULES), before any handler; the serial of
    // every certificate presented is kept for the CRL of a later revocation.
    let seen = revocations.clone();
    let access = AccessLayer::new(&identity)
        .on_certificate(Arc::new(move |f| seen.note_certificate(f, "presented")));
    // The standard gRPC health service (grpc.health.v1), for any fleet certificate.
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<pb::coordinator_server::CoordinatorServer<CoordinatorApi>>()
        .await;
    tls::server_builder()
        .layer(bulwark_common::telemetry::ServerTraceLayer)
        .layer(access)
        .add_service(health_service)
        .add_service(
            pb::coordinator_server::CoordinatorServer::new(CoordinatorApi(svc))
                // Agents and nodes send small messages (hellos, reports, heartbeats).
                .max_decoding_message_size(bulwark_common::MAX_REQUEST_BYTES)
                .max_encoding_message_size(bulwark_common::MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
        .await
        .context("coordinator server failed")?;
    registry.flush()?;
    tracing::info!("coordinator stopped");
    Ok(())
}

/// Verifies every data source once per `every`, one at a time, the longest
/// unverified first (`bulwark verify`, with its repair). What is found is logged,
/// kept on the source record, and raised as an alert by the node when points stay
/// damaged.
async fn scrub_loop(
    svc: Arc<CoordinatorService>,
    every: std::time::Duration,
    shutdown: CancellationToken,
) {
    let tick = (every / 10).clamp(
        std::time::Duration::from_millis(500),
        std::time::Duration::from_secs(60),
    );
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        let registry = svc.registry();
        let due = match registry.due_for_scrub(every) {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!("scrub: cannot list sources: {e}");
                continue;
            }
        };
        let result = match svc.verify(&due, 0).await {
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
        if let Err(e) = registry.verified(&due, result) {
            tracing::warn!(source = %due, "scrub: cannot record the result: {e}");
        }
    }
}

/// Raises the coordinator's own alerts: a node that has not reported within the node
/// timeout is `down` (critical), resolved by itself when it reports again.
async fn monitor_loop(
    registry: Arc<Registry>,
    timeout: std::time::Duration,
    identity: TlsIdentity,
    revocations: Arc<crate::revocation::RevocationStore>,
    shutdown: CancellationToken,
) {
    let tick = (timeout / 5).clamp(
        std::time::Duration::from_millis(200),
        std::time::Duration::from_secs(5),
    );
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        let nodes = match registry.nodes() {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("monitor: cannot list nodes: {e}");
                continue;
            }
        };
        let now = bulwark_common::time::now_ms();
        // The certificate presented now: a renewal shows at the next tick.
        let own_cert_expiry_ms = tls::not_after_ms(identity.current_cert().as_ref()).unwrap_or(0);
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
            .chain(expiring_certificates(&registry, &nodes, own_cert_expiry_ms, now))
            .chain(inconsistent_sources(&registry))
            .chain(revocations.node_alerts(&registry))
            .map(crate::registry::Alert::from)
            .collect();
        if let Err(e) = registry.report_alerts("coordinator", &alerts) {
            tracing::warn!("monitor: cannot record alerts: {e}");
        }
    }
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

/// Rolls back moves a crash interrupted (at once, then whenever one is found) and
/// retries dropping stale copies, every few seconds.
async fn moves_loop(svc: Arc<CoordinatorService>, shutdown: CancellationToken) {
    loop {
        svc.tidy_moves().await;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
        }
    }
}

/// Runs the protection groups' schedule twice a second.
async fn schedule_loop(svc: Arc<CoordinatorService>, shutdown: CancellationToken) {
    loop {
        if let Err(e) = svc.schedule_tick().await {
            tracing::warn!("schedule: {e}");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
        }
    }
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
