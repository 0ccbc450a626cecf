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
use crate::config::{CoordinatorConfig, EnrollmentConfig, StateConfig};
use crate::enroll::Enroller;
use crate::leader::{LeaderGateLayer, LeaderOnly, LeaderView};
use crate::registry::Registry;
use crate::revocation::RevocationStore;
use crate::service::CoordinatorService;
use crate::state::etcd::Election;
use crate::state::{EtcdState, SledState, StateStore};
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
    let backend = open_state(&cfg).await?;
    let view = backend.view.clone();
    let registry = Arc::new(
        Registry::with_state(backend.state.clone(), cfg.node_timeout)
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
        workers.spawn(LeaderOnly::new(
            renewal(&cfg, &identity, enroller.clone()),
            &view,
        ));
        svc = svc.with_enroller(enroller);
    }
    let svc = Arc::new(svc);
    // With etcd, only the leader runs the loops that decide (see `leader`).
    workers.spawn(LeaderOnly::new(workers::Schedule(svc.clone()), &view));
    workers.spawn(LeaderOnly::new(workers::Moves(svc.clone()), &view));
    workers.spawn(LeaderOnly::new(
        workers::Monitor {
            registry: registry.clone(),
            timeout: cfg.node_timeout,
            identity: identity.clone(),
            revocations: revocations.clone(),
        },
        &view,
    ));
    workers.spawn(LeaderOnly::new(workers::Forecast(registry.clone()), &view));
    if let Some(every) = cfg.scrub_interval {
        workers.spawn(LeaderOnly::new(
            workers::Scrub {
                svc: svc.clone(),
                every,
            },
            &view,
        ));
    }
    if backend.election.is_some() {
        workers.spawn(workers::Revocations(revocations.clone()));
    }
    // The workers stop (last started first) as soon as shutdown begins, while the
    // server drains its streams (every state change is durable when made).
    let stopped = shutdown.clone();
    let workers_done = tokio::spawn(async move {
        stopped.cancelled().await;
        workers.stop(WORKER_GRACE).await;
    });
    serve(listener, &identity, &revocations, svc, view, &shutdown).await?;
    if let Err(e) = workers_done.await {
        tracing::warn!("stopping the workers: {e}");
    }
    if let Some(election) = backend.election {
        // Another coordinator may lead at once, rather than after the lease.
        match tokio::task::spawn_blocking(move || election.resign()).await? {
            Ok(()) => tracing::info!("leadership resigned"),
            Err(e) => {
                tracing::warn!("cannot resign the leadership (it lapses with its lease): {e}")
            }
        }
    }
    tracing::info!("coordinator stopped");
    Ok(())
}

/// Where the state lives and who leads.
struct Backend {
    state: Arc<dyn StateStore>,
    view: LeaderView,
    /// With etcd: this coordinator's campaign.
    election: Option<Election>,
}

/// Opens `[state]`: sled in `data_dir` (this coordinator always leads), or etcd
/// (a campaign starts; every commit is fenced by the leadership it holds).
async fn open_state(cfg: &CoordinatorConfig) -> anyhow::Result<Backend> {
    match &cfg.state {
        StateConfig::Sled => {
            let dir = cfg.data_dir.clone();
            let state = tokio::task::spawn_blocking(move || SledState::open_in(&dir))
                .await?
                .context("cannot open the registry")?;
            Ok(Backend {
                state: Arc::new(state),
                view: LeaderView::always(),
                election: None,
            })
        }
        StateConfig::Etcd(e) => {
            let e = e.clone();
            let (base, election) = tokio::task::spawn_blocking(move || {
                let base = EtcdState::connect(&e.options)?;
                let election = base.elect(&e.advertise, &e.advertise, e.leader_lease)?;
                Ok::<_, crate::state::StateError>((base, election))
            })
            .await?
            .context("cannot reach the etcd cluster of [state]")?;
            tracing::info!(state = %base.describe(), role = %election.role(), "state in etcd");
            Ok(Backend {
                state: Arc::new(base.fenced(&election)),
                view: LeaderView::follow(election.watch()),
                election: Some(election),
            })
        }
    }
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
    view: LeaderView,
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
        .layer(LeaderGateLayer::new(view))
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
