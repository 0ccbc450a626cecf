//! The coordinator's domain operations over the [`Registry`]: the relay of admin
//! commands down agents' control streams, moves, the schedule, restore planning,
//! verify, locks, and the few calls the coordinator makes to nodes (listing
//! points, granting restores). The `bulwark.v1.Coordinator` gRPC service over
//! them is [`crate::api::CoordinatorApi`]: thin adapters that parse with [`crate::wire`],
//! call one operation here and map its [`CoordinatorError`] to a `Status`.

use bulwark_common::telemetry::TracedChannel;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bulwark_common::tls::{self, Role, Target, TlsIdentity};
use bulwark_proto as pb;
use bulwark_proto::node_client::NodeClient;
use tokio_util::sync::CancellationToken;

use crate::error::CoordinatorError;
use crate::registry::{Registry, RegistryError};

mod admin;
pub mod control;
mod locks;
mod moves;
mod relay;
mod restore;
mod schedule;
mod verify;

pub use admin::{AllocateOrder, LocateView, NodeView, QuotaOrder, QuotaView, RetentionOrder};
pub use locks::{LockOrder, LockTarget};
pub use relay::SyncOrder;
pub use restore::RestoreOrder;

/// A domain operation's result.
pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;

/// The coordinator's service state.
pub struct CoordinatorService {
    registry: Arc<Registry>,
    /// Ends the agents' control streams, which would otherwise hold a graceful
    /// shutdown open for ever.
    shutdown: CancellationToken,
    /// Dials nodes with the coordinator's certificate, checking each is the node
    /// of that name (one configuration per node, made on first use).
    identity: TlsIdentity,
    /// Channels to nodes by address, with the node's name and the revocation list
    /// version they were made under (a new list makes new connections).
    node_channels: Mutex<HashMap<String, (String, u64, TracedChannel)>>,
    /// One move at a time in the fleet: each copies a whole source node to node.
    moves: tokio::sync::Mutex<()>,
    /// Largest spread of node fill ratios a rebalance leaves.
    rebalance_spread: f64,
    /// Scheduled syncs running: source → node.
    scheduled: Arc<Mutex<HashMap<String, String>>>,
    /// Most scheduled syncs one node runs at once.
    max_syncs_per_node: u32,
    /// Tokens and the CA key, when `[enrollment]` is configured.
    enroller: Option<Arc<crate::enroll::Enroller>>,
    /// A control stream that carries nothing for this long is cut.
    idle: std::time::Duration,
    /// Stale copies a node keeps for their retention lock: (source, node) → when to
    /// ask it again.
    drops_held: Mutex<HashMap<(String, String), std::time::Instant>>,
    /// The fleet's revocation list.
    revocations: Option<Arc<crate::revocation::RevocationStore>>,
    /// The daemon's background workers, for `ListWorkers`.
    workers: bulwark_common::worker::WorkerBoard,
}

impl CoordinatorService {
    /// A service over `registry`; `identity` dials nodes with the coordinator's
    /// certificate.
    pub fn new(
        registry: Arc<Registry>,
        identity: TlsIdentity,
        shutdown: CancellationToken,
    ) -> CoordinatorService {
        CoordinatorService {
            registry,
            shutdown,
            identity,
            node_channels: Mutex::new(HashMap::new()),
            moves: tokio::sync::Mutex::new(()),
            rebalance_spread: 0.10,
            scheduled: Arc::new(Mutex::new(HashMap::new())),
            max_syncs_per_node: 4,
            enroller: None,
            idle: std::time::Duration::from_secs(60),
            drops_held: Mutex::new(HashMap::new()),
            revocations: None,
            workers: Default::default(),
        }
    }

    /// Shows `board`'s workers in `ListWorkers`.
    pub fn with_workers(mut self, board: bulwark_common::worker::WorkerBoard) -> Self {
        self.workers = board;
        self
    }

    /// The coordinator's background workers, in the order they started.
    pub fn workers(&self) -> pb::ListWorkersResponse {
        pb::ListWorkersResponse {
            daemon: self.identity.me.name.clone(),
            workers: self
                .workers
                .statuses()
                .into_iter()
                .map(Into::into)
                .collect(),
        }
    }

    /// Keeps and hands out the fleet's revocation list.
    pub fn with_revocations(mut self, r: Arc<crate::revocation::RevocationStore>) -> Self {
        self.revocations = Some(r);
        self
    }

    /// The fleet's revocation list, when this coordinator keeps one.
    pub fn revocations(&self) -> Result<&crate::revocation::RevocationStore> {
        self.revocations.as_deref().ok_or_else(|| {
            CoordinatorError::Unavailable("this coordinator keeps no revocation list".into())
        })
    }

    /// Turns on enrollment and renewal.
    pub fn with_enroller(mut self, e: Arc<crate::enroll::Enroller>) -> Self {
        self.enroller = Some(e);
        self
    }

    /// Tokens and certificates, when enrollment is on.
    pub fn enroller(&self) -> Result<&crate::enroll::Enroller> {
        self.enroller.as_deref().ok_or_else(|| {
            CoordinatorError::Refused(
                "enrollment is off on this coordinator: add an [enrollment] table (listen, ca_key) to its config".into(),
            )
        })
    }

    /// Sets how long an agent's control stream may carry nothing.
    pub fn with_stream_idle_timeout(mut self, idle: std::time::Duration) -> Self {
        self.idle = idle;
        self
    }

    /// Sets the most scheduled syncs one node runs at once.
    pub fn with_max_syncs_per_node(mut self, n: u32) -> Self {
        self.max_syncs_per_node = n.max(1);
        self
    }

    /// Sets the largest fill spread a rebalance leaves (a fraction, 0.10 = 10%).
    pub fn with_rebalance_spread(mut self, spread: f64) -> Self {
        self.rebalance_spread = spread;
        self
    }

    /// The registry.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// A client of node `node`, over a channel kept per node.
    fn node_client(&self, node: &str) -> Result<NodeClient<TracedChannel>> {
        let rec = self
            .registry
            .node(node)?
            .ok_or_else(|| CoordinatorError::NotFound(format!("no storage node named {node}")))?;
        let version = self.identity.revocations().version();
        let mut map = self.node_channels.lock().unwrap_or_else(|e| e.into_inner());
        let ch = match map.get(&rec.address) {
            Some((n, v, c)) if n == node && *v == version => c.clone(),
            _ => {
                let target = Target::parse(&rec.address).map_err(|m| {
                    CoordinatorError::Internal(format!("node {node} has a bad address: {m}"))
                })?;
                let cfg = self
                    .identity
                    .client_config_for(Role::Node, Some(node))
                    .map_err(|e| CoordinatorError::Internal(e.to_string()))?;
                let c = tls::channel_lazy(&target, cfg)
                    .map_err(|e| CoordinatorError::Internal(e.to_string()))?;
                map.insert(rec.address.clone(), (node.to_string(), version, c.clone()));
                c
            }
        };
        Ok(NodeClient::new(ch)
            .max_decoding_message_size(bulwark_common::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(bulwark_common::MAX_MESSAGE_BYTES))
    }

    /// The node `source` is assigned to.
    fn node_of(&self, source: &str) -> Result<String> {
        let s = self.registry.source(source)?;
        s.node
            .ok_or_else(|| RegistryError::Unassigned(source.to_string(), s.error).into())
    }

    /// The points of `source` as its node lists them.
    async fn points_of(&self, source: &str) -> Result<Vec<pb::Point>> {
        Ok(self.list_points(source).await?.points)
    }

    /// `ListPoints`: asks the node of `source`.
    pub async fn list_points(&self, source: &str) -> Result<pb::ListPointsResponse> {
        let node = self.node_of(source)?;
        let mut client = self.node_client(&node)?;
        Ok(client
            .list_points(pb::ListPointsRequest {
                source: source.to_string(),
            })
            .await
            .map_err(|s| CoordinatorError::at_node(&node, &s))?
            .into_inner())
    }
}
