//! Lifecycle of a storage node, in order: load the identity, open (and recover) the
//! store, serve the Node service over mTLS, register with the coordinator and send
//! heartbeats (its [`crate::workers`]), and on shutdown stop the workers and
//! accepting, let running streams end, flush.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bulwark_common::failover::CoordinatorChannel;
use bulwark_common::renewal::{RENEWAL_CHECK, Renewal};
use bulwark_common::tls::{self, Role, Target, TlsIdentity};
use bulwark_common::worker::WorkerSet;
use bulwark_proto as pb;
use bulwark_proto::coordinator_client::CoordinatorClient;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::NodeConfig;
use crate::node::NodeService;
use crate::service::NodeApi;
use crate::store::Store;
use crate::workers::Heartbeat;

/// Where a node keeps the fleet's revocation list, in its `data_dir`.
pub const REVOCATIONS_FILE: &str = "revocations.json";

/// How long each background worker gets to finish its run at shutdown.
const WORKER_GRACE: Duration = Duration::from_secs(5);

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
    let channel = CoordinatorChannel::lazy(
        &cfg.coordinators,
        identity.client_config(Role::Coordinator)?,
    )
    .map_err(anyhow::Error::msg)?;
    let coordinator = CoordinatorClient::new(channel)
        .max_decoding_message_size(bulwark_common::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(bulwark_common::MAX_MESSAGE_BYTES);
    let mut workers = WorkerSet::new();
    workers.spawn(Renewal::new(
        identity.clone(),
        cfg.tls.clone(),
        bulwark_common::enroll::coordinator_signer(coordinator.clone()),
        RENEWAL_CHECK,
    ));
    let svc = Arc::new(
        NodeService::new(
            cfg.name.clone(),
            store.clone(),
            coordinator.clone(),
            identity.clone(),
        )?
        .with_limits(crate::node::admission::Limits {
            max_syncs: cfg.max_concurrent_syncs,
            syncs_per_agent: cfg.max_syncs_per_agent,
            restores_per_agent: cfg.max_restores_per_agent,
            idle: cfg.stream_idle_timeout,
        })
        .with_workers(workers.board()),
    );
    let nbd = match cfg.nbd_listen {
        Some(addr) => {
            Some(serve_nbd(&cfg, addr, &advertise, &store, &svc, &identity, &shutdown).await?)
        }
        None => None,
    };
    workers.spawn(Heartbeat::new(
        svc.clone(),
        store.clone(),
        coordinator,
        advertise.to_string(),
        nbd.as_ref().map(|(a, _)| a.clone()),
        cfg.heartbeat_interval,
    ));
    // The workers stop (last started first) as soon as shutdown begins, while the
    // server lets running streams end; the store is flushed after both.
    let stopped = shutdown.clone();
    let workers_done = tokio::spawn(async move {
        stopped.cancelled().await;
        workers.stop(WORKER_GRACE).await;
    });
    tracing::info!(node = %cfg.name, %local, advertise = %advertise, "storage node listening");
    serve(listener, &identity, svc, &shutdown).await?;
    if let Err(e) = workers_done.await {
        tracing::warn!("stopping the workers: {e}");
    }
    if let Some((_, task)) = nbd {
        let _ = task.await;
    }
    store.flush()?;
    tracing::info!("storage node stopped");
    Ok(())
}

/// Serves read-only NBD exports of recovery points on `addr` until `shutdown`;
/// returns the address clients dial and the listener's task.
async fn serve_nbd(
    cfg: &NodeConfig,
    addr: std::net::SocketAddr,
    advertise: &Target,
    store: &Store,
    svc: &NodeService,
    identity: &TlsIdentity,
    shutdown: &CancellationToken,
) -> anyhow::Result<(String, tokio::task::JoinHandle<()>)> {
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
            shutdown_grace: Duration::from_secs(5),
            ..Default::default()
        })),
        shutdown.clone(),
    ));
    Ok((format!("{host}:{}", bound.port()), task))
}

/// Serves the Node service over mTLS on `listener` until `shutdown`.
async fn serve(
    listener: TcpListener,
    identity: &TlsIdentity,
    svc: Arc<NodeService>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
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
        .layer(bulwark_common::access::AccessLayer::new(identity))
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
        .context("node server failed")
}
