//! The node's service state and its operations, as plain Rust behind the gRPC
//! adapters of [`crate::service`]: who may touch a source ([`access`]), the sync
//! pipeline ([`sync`]), restores ([`restore`]), log ships and log restores
//! ([`logs`]), moves ([`moves`]), reads of points ([`points`]), retention locks,
//! drops and restore grants ([`locks`]). Turns and idle timeouts are
//! [`crate::node::admission`]'s.
//!
//! Every operation states its roles in its adapter; a sync or digest read is
//! accepted only from the agent that owns the data source, for a source assigned to
//! this node, at the current assignment epoch (asked of the coordinator, with the
//! last answer cached in sled for when the coordinator is unreachable). Restores are
//! also allowed to an agent the coordinator granted them to.

use bulwark_common::failover::CoordinatorChannel;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use bulwark_common::point::PointKind;
use bulwark_proto as pb;
use bulwark_proto::coordinator_client::CoordinatorClient;
use futures::Stream;
use prost::Message;
use tonic::Status;

use crate::error::refused;
use crate::node::admission::{Admission, Limits};
use crate::store::{DiskFault, PointMeta, SourceLocks, Store, StoreError};
use crate::wire::policy_from_proto;

pub mod access;
pub mod admission;
pub mod locks;
pub mod logs;
pub mod moves;
pub mod points;
pub mod restore;
pub mod sync;

/// Why a source's last sync or ship failed, or its retention after a commit, when
/// that is an alert (`<key>/<source>`) until a sync or ship of the source commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its recovery-point space (the logical allocation) is full.
    Allocation,
    /// A pool disk's file system failed a write, an fsync or a rename.
    Disk(DiskFault),
}

impl Refusal {
    /// The alert key's prefix.
    pub fn key(self) -> &'static str {
        match self {
            Refusal::Allocation => "allocation-full",
            Refusal::Disk(f) => f.key(),
        }
    }
}

/// A stream of replies to a client.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Runs `f` on a blocking thread.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("worker task failed: {e}")))
}

/// Shared state of the node's service.
pub struct NodeService {
    name: String,
    store: Store,
    locks: Arc<SourceLocks>,
    coordinator: CoordinatorClient<CoordinatorChannel>,
    grants: std::sync::Mutex<HashMap<(String, String), locks::Grant>>,
    live_streams: Arc<AtomicU32>,
    /// Payload bytes applied by syncs since the node started.
    ingested: Arc<AtomicU64>,
    /// Dials other nodes (moves) with this node's certificate, checking that the
    /// one answering is the node the coordinator named.
    peer_tls: bulwark_common::tls::TlsIdentity,
    /// Turns: node-wide syncs, per-agent caps, one sync per source, idle timeouts
    /// (see [`crate::node::admission`]).
    admission: Arc<Admission>,
    /// Sources whose last sync was refused for space, or failed on a pool disk,
    /// with why and the alert's message (an alert until a sync of the source
    /// commits).
    space_refusals: std::sync::Mutex<HashMap<String, (Refusal, String)>>,
    /// Retention locks an officer lowered here, by source: (when, what), raised as
    /// an alert for a day.
    lock_lowered: std::sync::Mutex<HashMap<String, (i64, String)>>,
    /// The daemon's background workers, for `ListWorkers`.
    workers: bulwark_common::worker::WorkerBoard,
}

/// Counts a live stream while it exists.
pub(crate) struct StreamGuard(Arc<AtomicU32>);
impl StreamGuard {
    fn new(c: &Arc<AtomicU32>) -> StreamGuard {
        let n = c.fetch_add(1, Ordering::Relaxed) + 1;
        bulwark_common::metrics::gauge_set("bulwark_live_streams", &[], f64::from(n));
        StreamGuard(c.clone())
    }
}
impl Drop for StreamGuard {
    fn drop(&mut self) {
        let n = self.0.fetch_sub(1, Ordering::Relaxed).saturating_sub(1);
        bulwark_common::metrics::gauge_set("bulwark_live_streams", &[], f64::from(n));
    }
}

/// Counts a finished sync or ship of `source`: `point` when it committed.
pub(crate) fn count_sync(source: &str, point: Option<&PointMeta>, started: std::time::Instant) {
    bulwark_common::metrics::record_sync(
        source,
        point.map(|p| bulwark_common::metrics::SyncFigures {
            log: p.kind == PointKind::Log,
            bytes: p.bytes_changed,
            blocks: p.blocks_changed,
            seconds: started.elapsed().as_secs_f64(),
        }),
    );
}

impl NodeService {
    /// A service over `store`, asking `coordinator` about assignments.
    pub fn new(
        name: String,
        store: Store,
        coordinator: CoordinatorClient<CoordinatorChannel>,
        peer_tls: bulwark_common::tls::TlsIdentity,
    ) -> Result<NodeService, StoreError> {
        Ok(NodeService {
            peer_tls,
            admission: Admission::new(Limits::default()),
            name,
            // The one raw sled tree the service keeps (the assignment cache).
            store,
            locks: Arc::new(SourceLocks::default()),
            coordinator,
            grants: Default::default(),
            live_streams: Arc::new(AtomicU32::new(0)),
            ingested: Arc::new(AtomicU64::new(0)),
            space_refusals: Default::default(),
            lock_lowered: Default::default(),
            workers: Default::default(),
        })
    }

    /// Sets the limits on data streams (`max_concurrent_syncs`,
    /// `max_syncs_per_agent`, `max_restores_per_agent`, `stream_idle_timeout`).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.admission = Admission::new(limits);
        self
    }

    /// Shows `board`'s workers in `ListWorkers`.
    pub fn with_workers(mut self, board: bulwark_common::worker::WorkerBoard) -> Self {
        self.workers = board;
        self
    }

    /// The node's background workers, in the order they started.
    pub fn workers(&self) -> pb::ListWorkersResponse {
        pb::ListWorkersResponse {
            daemon: self.name.clone(),
            workers: self
                .workers
                .statuses()
                .into_iter()
                .map(Into::into)
                .collect(),
        }
    }

    /// How long a stream may move nothing (`stream_idle_timeout`).
    pub fn idle(&self) -> std::time::Duration {
        self.admission.idle()
    }

    /// The fleet's revocation list as this node holds it.
    pub fn revocations(&self) -> Arc<bulwark_common::revocation::Revocations> {
        self.peer_tls.revocations().clone()
    }

    /// The refusals for space and disk faults still standing, by source.
    pub fn space_refusals(&self) -> HashMap<String, (Refusal, String)> {
        self.space_refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn note_refusal(&self, source: &str, refusal: Option<(Refusal, String)>) {
        let mut map = self
            .space_refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match refusal {
            Some(r) => {
                refused(match r.0 {
                    Refusal::Allocation => "space",
                    Refusal::Disk(f) => f.key(),
                });
                map.insert(source.to_string(), r)
            }
            None => map.remove(source),
        };
    }

    /// Applies the policies the coordinator sent for stored sources (a changed
    /// allocation or retention takes effect now, not at the next sync), and prunes
    /// what retention no longer keeps, including points that aged out. A source
    /// that is busy syncing is left for its sync to handle.
    pub async fn apply_policies(&self, list: &[pb::Assignment]) {
        for a in list {
            if a.node != self.name {
                continue;
            }
            let Ok(lock) = self.locks.get(&a.source).try_write_owned() else {
                continue;
            };
            let store = self.store.clone();
            let source = a.source.clone();
            let policy = a.policy.as_ref().map(policy_from_proto);
            let r = blocking(move || -> Result<Vec<u64>, StoreError> {
                let _lock = lock;
                if store.source(&source)?.is_none() {
                    return Ok(Vec::new());
                }
                let now = bulwark_common::time::now_ms();
                match policy {
                    Some(p) => store.set_policy(&source, &p, now),
                    None => store.apply_retention(&source, now),
                }
            })
            .await;
            match r {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(source = %a.source, "cannot apply the source's policy: {e}")
                }
                Err(e) => tracing::warn!(source = %a.source, "{}", e.message()),
            }
        }
    }

    /// The per-source locks (shared with the NBD exports).
    pub fn locks(&self) -> Arc<SourceLocks> {
        self.locks.clone()
    }

    /// Payload bytes applied by syncs since the node started.
    pub fn ingested_bytes(&self) -> u64 {
        self.ingested.load(Ordering::Relaxed)
    }

    /// Syncs and restores in progress.
    pub fn live_streams(&self) -> u32 {
        self.live_streams.load(Ordering::Relaxed)
    }

    /// Remembers assignments the coordinator sent (heartbeat replies).
    pub fn remember(&self, list: &[pb::Assignment]) {
        for a in list {
            let _ = self
                .store
                .remember_assignment(&a.source, &a.encode_to_vec());
        }
    }

    /// Settles the point a sync just committed into the replica (the caller holds
    /// the source's write lock). A failure is logged; the store keeps it as the
    /// source's error (every later operation on the source fails with it, but
    /// restores of the points before the unsettled one) and the
    /// heartbeat raises it as a critical alert `settle/<source>`.
    async fn settle(&self, source: &str) {
        let store = self.store.clone();
        let name = source.to_string();
        match blocking(move || store.settle(&name)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(source, "{e}"),
            Err(e) => tracing::error!(source, "settle task: {}", e.message()),
        }
    }

    /// After a sync or ship committed (the caller still holds the source's lock):
    /// retention prunes what it no longer keeps, and a space refusal is over. A prune
    /// that fails is logged and retried later: the point is committed; one that
    /// failed on a pool disk (a merge's write or rename) is an alert until the next
    /// commit.
    async fn after_commit(&self, source: &str) {
        let store = self.store.clone();
        let name = source.to_string();
        let now = bulwark_common::time::now_ms();
        let fault = match blocking(move || store.apply_retention(&name, now)).await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => {
                tracing::warn!(source, "retention after the commit failed: {e}");
                e.disk_fault().map(|f| {
                    let why = format!(
                        "retention after the commit of {source}'s newest point failed on a pool disk: {e}; every point is kept, and retention tries again after the next sync"
                    );
                    (Refusal::Disk(f), why)
                })
            }
            Err(e) => {
                tracing::warn!(source, "retention task: {e}");
                None
            }
        };
        self.note_refusal(source, fault);
    }

    /// After a sync or ship failed: counted, and a refusal for space, or a fault of
    /// a pool disk, is kept as an alert until a sync of the source commits.
    fn after_failure(&self, source: &str, status: &Status, started: std::time::Instant) {
        count_sync(source, None, started);
        let refusal = match crate::error::disk_fault(status) {
            Some(f) => Some((
                Refusal::Disk(f),
                format!(
                    "a write of {source} failed on a pool disk: {}; it was rolled back, and every committed point is intact",
                    status.message()
                ),
            )),
            None if status.code() == tonic::Code::ResourceExhausted => Some((
                Refusal::Allocation,
                format!("sync refused: {}", status.message()),
            )),
            None => None,
        };
        if let Some(r) = refusal {
            self.note_refusal(source, Some(r));
        }
    }
}
