//! Lifecycle of the coordinator, in order: load the identity, open the registry,
//! serve the Coordinator service over mTLS, and on shutdown stop accepting and flush.

use std::sync::Arc;

use anyhow::Context;
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
            .context("cannot open the registry")?,
    );
    let svc = Arc::new(CoordinatorService::new(
        registry.clone(),
        identity.client_config(Role::Node)?,
        shutdown.clone(),
    ));
    tracing::info!(listen = %listener.local_addr()?, "coordinator listening");
    let incoming = tls::incoming(listener, identity.server_config()?, shutdown.clone());
    tls::server_builder()
        .layer(tonic::service::InterceptorLayer::new(tls::authenticator(
            identity.trust_domain.clone(),
        )))
        .add_service(
            pb::coordinator_server::CoordinatorServer::new(CoordinatorApi(svc))
                .max_decoding_message_size(bulwark_common::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(bulwark_common::MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
        .await
        .context("coordinator server failed")?;
    registry.flush()?;
    tracing::info!("coordinator stopped");
    Ok(())
}
