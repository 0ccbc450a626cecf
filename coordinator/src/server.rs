//! Lifecycle of the coordinator, in order: load the identity, open the registry,
//! serve the Coordinator service over mTLS, and on shutdown stop accepting (every
//! state change is durable when made).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bulwark_common::access::AccessLayer;
use bulwark_common::enroll::RenewSigner;
use bulwark_common::renewal::{RENEWAL_CHECK, Renewal};
use bulwark_common::tls::{self, Role, TlsIdentity};
use bulwark_common::worker::{Worker, WorkerSet};
use bulwark_proto as pb;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::CoordinatorApi;
use crate::config::{CoordinatorConfig, EnrollmentConfig};
use crate::enroll::Enroller;
use crate::registry::Registry;
use crate::revocation::RevocationStore;
use crate::service::CoordinatorService;
use crate::workers;

/// How long each background worker gets to finish its run at shutdown.
const WORKER_GRACE: Duration = Duration::from_secs(10);

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
            .with_fleet_policy(cfg.policy)
            .with_forecast(cfg.forecast),
    );
    let revocations = open_revocations(&cfg, &registry, &identity)?;
    let mut workers = WorkerSet::new();
    let mut svc = CoordinatorService::new(registry.clone(), identity.clone(), shutdown.clone())
        .with_rebalance_spread(cfg.rebalance_spread)
        .with_max_syncs_per_node(cfg.max_syncs_per_node)
        .with_revocations(revocations.clone())
        .with_stream_idle_timeout(cfg.stream_idle_timeout)
        .with_workers(workers.board());
    if let Some(e) = &cfg.enrollment {
        let enroller =
            start_enrollment(&cfg, e, &registry, &identity, &revocations, &shutdown).await?;
        workers.spawn(renewal(&cfg, &identity, enroller.clone()));
        svc = svc.with_enroller(enroller);
    }
    let svc = Arc::new(svc);
    workers.spawn(workers::Schedule(svc.clone()));
    workers.spawn(workers::Moves(svc.clone()));
    workers.spawn(workers::Monitor {
        registry: registry.clone(),
        timeout: cfg.node_timeout,
        identity: identity.clone(),
        revocations: revocations.clone(),
    });
    workers.spawn(workers::Forecast(registry.clone()));
    if let Some(every) = cfg.scrub_interval {
        workers.spawn(workers::Scrub {
            svc: svc.clone(),
            every,
        });
    }
    // The workers stop (last started first) as soon as shutdown begins, while the
    // server drains its streams (every state change is durable when made).
    let stopped = shutdown.clone();
    let workers_done = tokio::spawn(async move {
        stopped.cancelled().await;
        workers.stop(WORKER_GRACE).await;
    });
    serve(listener, &identity, &revocations, svc, &shutdown).await?;
    if let Err(e) = workers_done.await {
        tracing::warn!("stopping the workers: {e}");
    }
    tracing::info!("coordinator stopped");
    Ok(())
}

/// The revocation list; signed as a CRL when the coordinator holds the CA key.
fn open_revocations(
    cfg: &CoordinatorConfig,
    registry: &Arc<Registry>,
    identity: &TlsIdentity,
) -> anyhow::Result<Arc<RevocationStore>> {
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
    Ok(Arc::new(
        RevocationStore::open(
            registry.clone(),
            signer,
            &cfg.data_dir,
            identity.revocations().clone(),
        )
        .map_err(anyhow::Error::msg)?,
    ))
}

/// The enrollment listener (tokens, no client certificate), serving until
/// `shutdown`; returns the enroller, which also signs renewals.
async fn start_enrollment(
    cfg: &CoordinatorConfig,
    e: &EnrollmentConfig,
    registry: &Registry,
    identity: &TlsIdentity,
    revocations: &Arc<RevocationStore>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Arc<Enroller>> {
    let enroller = Arc::new(
        Enroller::new(
            registry.state().clone(),
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
    let api = crate::enroll::EnrollmentApi(enroller.clone());
    tokio::spawn(async move {
        if let Err(e) = tls::server_builder()
            .layer(access)
            .add_service(pb::enrollment_server::EnrollmentServer::new(api))
            .serve_with_incoming_shutdown(incoming, stop.cancelled())
            .await
        {
            tracing::error!("enrollment listener failed: {e}");
        }
    });
    Ok(enroller)
}

/// The coordinator holds the CA key: it renews its own certificate itself.
fn renewal(
    cfg: &CoordinatorConfig,
    identity: &TlsIdentity,
    enroller: Arc<Enroller>,
) -> impl Worker {
    let me = identity.me.name.clone();
    let sign: RenewSigner = Box::new(move |csr, dns, ips| {
        let r = enroller.sign_own(&me, &csr, &dns, &ips);
        Box::pin(async move { r })
    });
    Renewal::new(identity.clone(), cfg.tls.clone(), sign, RENEWAL_CHECK)
}

/// Serves the Coordinator service over mTLS on `listener` until `shutdown`.
async fn serve(
    listener: TcpListener,
    identity: &TlsIdentity,
    revocations: &Arc<RevocationStore>,
    svc: Arc<CoordinatorService>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
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
    let access = AccessLayer::new(identity)
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
        .context("coordinator server failed")
}
