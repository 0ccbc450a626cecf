//! The `bulwark.v1.Node` gRPC service: adapters between the wire and the [`Store`].
//!
//! Every call states its roles; a sync or digest read is accepted only from the agent
//! that owns the data source, for a source assigned to this node, at the current
//! assignment epoch (asked of the coordinator, with the last answer cached in sled
//! for when the coordinator is unreachable). Restores are also allowed to an agent
//! the coordinator granted them to.

use bulwark_common::telemetry::TracedChannel;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use bulwark_common::block::{DIGEST_LEN, Geometry};
use bulwark_common::name::SourceName;
use bulwark_common::point::{Consistency, PointKind};
use bulwark_common::tls::{Identity, Role, require};
use bulwark_proto as pb;
use bulwark_proto::coordinator_client::CoordinatorClient;
use futures::Stream;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::store::{
    PointMeta, Prepared, RestoreItem, SourceLocks, SourcePolicy, Store, StoreError, SyncSpec,
    SyncTxn, VerifiedExtent,
};
use bulwark_common::retention::Retention;

pub mod admission;
mod locks;
mod logs;

use locks::{Grant, lock_from_proto, lock_to_proto};

use admission::{Admission, Limits, Sender, TurnKind, next_within};

/// Maps store errors to gRPC codes.
impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        match &e {
            StoreError::BaseMismatch { .. } => Status::failed_precondition(e.to_string()),
            StoreError::GeometryChanged { .. } | StoreError::DuplicateBlock { .. } => {
                Status::invalid_argument(e.to_string())
            }
            StoreError::NoSpace { .. } | StoreError::AllocationFull { .. } => {
                Status::resource_exhausted(e.to_string())
            }
            StoreError::PruneNewest { .. } | StoreError::WrongKind { .. } => {
                Status::failed_precondition(e.to_string())
            }
            StoreError::BadLog(_) | StoreError::BadName(_) => {
                Status::invalid_argument(e.to_string())
            }
            StoreError::Refused { .. }
            | StoreError::Locked { .. }
            | StoreError::DataFormat { .. } => Status::failed_precondition(e.to_string()),
            StoreError::LockedFull { .. } => Status::resource_exhausted(e.to_string()),
            // A failed settle is logged and raised as an alert where it failed.
            StoreError::PointDamaged { .. } | StoreError::SettleFailed { .. } => {
                Status::data_loss(e.to_string())
            }
            StoreError::NoPoints(_) | StoreError::NoSuchPoint { .. } => {
                Status::not_found(e.to_string())
            }
            StoreError::Io { .. }
            | StoreError::Meta(_)
            | StoreError::Damaged { .. }
            | StoreError::Crashed(_)
            | StoreError::MissingDisk(_) => {
                tracing::error!("store error: {e}");
                Status::internal(e.to_string())
            }
        }
    }
}

/// Converts a stored point for the wire.
pub fn point_to_proto(p: &PointMeta) -> pb::Point {
    pb::Point {
        id: p.id,
        created_at_ms: p.created_ms,
        consistency: p.consistency.to_proto(),
        kind: p.kind.to_proto(),
        blocks_changed: p.blocks_changed,
        bytes_changed: p.bytes_changed,
        stored_bytes: p.stored_bytes(),
        damaged_blocks: p.damaged.clone(),
        files_changed: p.files_changed,
        lock_mode: pb::LockMode::None as i32,
        locked_until_ms: 0,
    }
}

/// The coordinator's policy for a source, for the store.
pub fn policy_from_proto(p: &pb::Policy) -> SourcePolicy {
    SourcePolicy {
        replica_alloc_bytes: p.replica_alloc_bytes,
        points_alloc_bytes: p.points_alloc_bytes,
        retention: Retention::from_proto(p.retention.as_ref()),
        keep_after_ms: p.keep_after_ms,
        lock: p.lock.as_ref().and_then(lock_from_proto),
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("worker task failed: {e}")))
}

/// Shared state of the node's service.
pub struct NodeService {
    name: String,
    store: Store,
    locks: Arc<SourceLocks>,
    coordinator: CoordinatorClient<TracedChannel>,
    grants: std::sync::Mutex<HashMap<(String, String), Grant>>,
    live_streams: Arc<AtomicU32>,
    /// Payload bytes applied by syncs since the node started.
    ingested: Arc<AtomicU64>,
    /// Dials other nodes (moves) with this node's certificate, checking that the
    /// one answering is the node the coordinator named.
    peer_tls: bulwark_common::tls::TlsIdentity,
    /// Turns: node-wide syncs, per-agent caps, one sync per source, idle timeouts
    /// (see [`admission`]).
    admission: Arc<Admission>,
    /// Sources whose last sync was refused for space, with the refusal (an alert
    /// until a sync of the source commits).
    space_refusals: std::sync::Mutex<HashMap<String, String>>,
    /// Retention locks an officer lowered here, by source: (when, what), raised as
    /// an alert for a day.
    lock_lowered: std::sync::Mutex<HashMap<String, (i64, String)>>,
}

/// Counts a live stream while it exists.
struct StreamGuard(Arc<AtomicU32>);
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

/// Counts a refusal by reason (see `bulwark_refusals_total`).
fn refused(reason: &str) {
    bulwark_common::metrics::counter_add("bulwark_refusals_total", &[("reason", reason)], 1);
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
        coordinator: CoordinatorClient<TracedChannel>,
        peer_tls: bulwark_common::tls::TlsIdentity,
    ) -> Result<NodeService, StoreError> {
        Ok(NodeService {
            peer_tls,
            admission: Admission::new(Limits::default()),
            name,
            store,
            locks: Arc::new(SourceLocks::default()),
            coordinator,
            grants: Default::default(),
            live_streams: Arc::new(AtomicU32::new(0)),
            ingested: Arc::new(AtomicU64::new(0)),
            space_refusals: Default::default(),
            lock_lowered: Default::default(),
        })
    }

    /// The fleet's revocation list as this node holds it.
    pub fn revocations(&self) -> Arc<bulwark_common::revocation::Revocations> {
        self.peer_tls.revocations().clone()
    }

    /// The refusals for space still standing, by source.
    pub fn space_refusals(&self) -> HashMap<String, String> {
        self.space_refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn note_refusal(&self, source: &str, refusal: Option<String>) {
        let mut map = self
            .space_refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match refusal {
            Some(r) => {
                refused("space");
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

    /// Sets the limits on data streams (`max_concurrent_syncs`,
    /// `max_syncs_per_agent`, `max_restores_per_agent`, `stream_idle_timeout`).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.admission = Admission::new(limits);
        self
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

    /// The current assignment of `source`: the coordinator's answer, or the cached
    /// one when the coordinator cannot be reached.
    async fn assignment(&self, source: &str) -> Result<pb::Assignment, Status> {
        let mut client = self.coordinator.clone();
        match client
            .get_assignment(pb::GetAssignmentRequest {
                source: source.to_string(),
            })
            .await
        {
            Ok(r) => {
                let a = r.into_inner();
                self.remember(std::slice::from_ref(&a));
                Ok(a)
            }
            Err(s) if s.code() == tonic::Code::NotFound => Err(Status::permission_denied(format!(
                "data source {source} is not known to the coordinator"
            ))),
            // The coordinator answered, and said no (a source it could not place):
            // that is the answer, not a reason to fall back on the cache.
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                Err(Status::failed_precondition(format!(
                    "the coordinator has no assignment of {source} to give: {}",
                    s.message()
                )))
            }
            Err(s) => {
                let cached = self
                    .store
                    .cached_assignment(source)
                    .ok()
                    .flatten()
                    .and_then(|v| pb::Assignment::decode(v.as_ref()).ok());
                match cached {
                    Some(a) => {
                        tracing::warn!(
                            source,
                            "coordinator unreachable ({}); using the cached assignment",
                            s.message()
                        );
                        Ok(a)
                    }
                    None => Err(Status::unavailable(format!(
                        "cannot check the assignment of {source}: coordinator unreachable ({})",
                        s.message()
                    ))),
                }
            }
        }
    }

    /// Checks that `caller` owns `source`, that it is assigned here, and the epoch.
    async fn authorize(
        &self,
        caller: &Identity,
        source: &SourceName,
        epoch: Option<u64>,
    ) -> Result<pb::Assignment, Status> {
        let a = self.assignment(source).await?;
        if a.node != self.name {
            tracing::warn!(%caller, %source, "refused: source assigned to node {}", a.node);
            refused("not-assigned");
            return Err(Status::permission_denied(format!(
                "data source {source} is assigned to node {}, not to this node ({})",
                a.node, self.name
            )));
        }
        if a.agent != caller.name {
            tracing::warn!(%caller, %source, "refused: not the owner");
            refused("not-owner");
            return Err(Status::permission_denied(format!(
                "data source {source} belongs to agent {}; {caller} may not write or read it",
                a.agent
            )));
        }
        if let Some(e) = epoch
            && e != a.epoch
        {
            tracing::warn!(%caller, %source, epoch = e, current = a.epoch, "refused: stale epoch");
            refused("stale-epoch");
            return Err(Status::failed_precondition(format!(
                "stale assignment epoch {e} for data source {source}: the current epoch is {}",
                a.epoch
            )));
        }
        Ok(a)
    }

    /// Checks that `caller` may read point `point` (0 = newest) of `source` (an
    /// admin's export: any source; an agent: its own source assigned here, or a
    /// point the coordinator granted it for a restore), takes one of the agent's
    /// restore turns, then the source's read lock for the restore.
    async fn authorize_read(
        &self,
        caller: &Identity,
        source: &SourceName,
        point: u64,
    ) -> Result<
        (
            tokio::sync::OwnedRwLockReadGuard<()>,
            Option<admission::AgentTurn>,
        ),
        Status,
    > {
        let turn = match caller.role {
            Role::Admin => None,
            _ => {
                if !self.granted(source, &caller.name, point) {
                    self.authorize(caller, source, None).await?;
                }
                Some(self.admission.agent_turn(&caller.name, TurnKind::Read)?)
            }
        };
        Ok((self.locks.get(source).read_owned().await, turn))
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
    /// that fails is logged and retried later: the point is committed.
    async fn after_commit(&self, source: &str) {
        let store = self.store.clone();
        let name = source.to_string();
        let now = bulwark_common::time::now_ms();
        match blocking(move || store.apply_retention(&name, now)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(source, "retention after the commit failed: {e}"),
            Err(e) => tracing::warn!(source, "retention task: {e}"),
        }
        self.note_refusal(source, None);
    }
}

/// The error of an import whose exporting node sent nothing for the idle timeout.
fn exporter_idle(node: &str, idle: std::time::Duration) -> Status {
    refused("idle");
    Status::deadline_exceeded(format!(
        "node {node} sent nothing of the export for {} s (stream_idle_timeout); the import was aborted and nothing of it kept",
        idle.as_secs()
    ))
}

/// Parses a data source name received on the wire.
pub(crate) fn source_name(s: &str) -> Result<SourceName, Status> {
    SourceName::parse(s).map_err(|e| {
        refused("bad-name");
        Status::invalid_argument(e.to_string())
    })
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn verify_batch(
    batch: pb::ExtentBatch,
    geometry: Geometry,
    source: &str,
) -> Result<Vec<VerifiedExtent>, Status> {
    // The protocol's batches: at most MAX_BATCH_BYTES of payload, or one block when
    // blocks are larger (the transport limit is the largest of any geometry).
    let limit = bulwark_common::block::batch_limit(geometry.block_size);
    let payload = batch
        .extents
        .iter()
        .fold(0usize, |n, e| n.saturating_add(e.data.len()));
    if payload > limit {
        tracing::warn!(source, payload, limit, "refused an oversized batch");
        return Err(Status::invalid_argument(format!(
            "data source {source}: a batch of {payload} bytes; batches hold at most {limit}"
        )));
    }
    batch
        .extents
        .into_iter()
        .map(|e| {
            let (first_block, digests) = geometry
                .verify_extent(e.offset, &e.data, &e.checksums)
                .map_err(|err| {
                    tracing::warn!(source, "refused extent: {err}");
                    Status::invalid_argument(format!("data source {source}: {err}"))
                })?;
            Ok(VerifiedExtent {
                first_block,
                data: e.data,
                digests,
            })
        })
        .collect()
}

async fn abort(txn: SyncTxn) {
    let source_point = txn.new_point();
    match blocking(move || txn.abort()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(
            point = source_point,
            "rollback of a failed sync failed: {e}"
        ),
        Err(e) => tracing::error!("rollback task failed: {e}"),
    }
}

/// Streams the digests of the newest point, in block order, into a sync's replies:
/// the stored ones, or with `deep` ones recomputed from the replica (counting the
/// blocks whose bytes no longer match into `damaged`).
fn send_digests(
    store: Store,
    source: String,
    total: u64,
    deep: Option<Arc<AtomicU64>>,
    tx: Sender<pb::SyncReply>,
) {
    const PER_CHUNK: u64 = (1 << 19) / DIGEST_LEN as u64;
    // A deep check reads the replica: 16 MiB at a time at most.
    const PER_DEEP_CHUNK: u64 = 256;
    tokio::task::spawn_blocking(move || {
        let mut first = 0;
        while first < total {
            let count = if deep.is_some() {
                PER_DEEP_CHUNK.min(total - first)
            } else {
                PER_CHUNK.min(total - first)
            };
            let digests = match &deep {
                Some(damaged) => store.recompute_digests(&source, first, count).map(|(d, bad)| {
                    let n = bad.len() as u64;
                    if n > 0 {
                        tracing::warn!(%source, first_block = first, blocks = n, "replica blocks do not match their checksums; the check repairs them");
                    }
                    damaged.fetch_add(n, Ordering::Relaxed);
                    d
                }),
                None => store.read_digests(&source, first, count),
            };
            let msg = match digests {
                Ok(digests) => Ok(pb::SyncReply {
                    msg: Some(pb::sync_reply::Msg::Digests(pb::DigestChunk {
                        first_block: first,
                        digests: digests.into(),
                    })),
                }),
                Err(e) => Err(Status::from(e)),
            };
            let failed = msg.is_err();
            if !tx.send(msg) || failed {
                return;
            }
            first += count;
        }
    });
}

/// Verified batches waiting for their old digests to be read, at most (each ≤ 1 MiB
/// of payload); the reader takes up to this many at once.
const READ_QUEUE: usize = 8;
/// Batches read and waiting for the writer, at most.
const APPLY_QUEUE: usize = 16;
/// Payload the writer takes in one group, at most.
const GROUP_BYTES: usize = 16 << 20;

/// Applies verified batches in order, reporting progress after each group; hands
/// the transaction back when its input ends or a batch fails.
///
/// Two threads: one reads each batch's old digests as it arrives (the space check
/// needs them), the other writes. Batches that were read while the previous group
/// was being written are applied together as one group: a first sync writes the
/// replica at a queue depth, a later one appends to the source's journal (the
/// before-images and replica writes happen in the settle, after the commit was
/// acknowledged).
fn spawn_applier(
    mut txn: SyncTxn,
    mut batches: mpsc::Receiver<Vec<VerifiedExtent>>,
    tx: mpsc::Sender<Result<pb::SyncReply, Status>>,
    ingested: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<(SyncTxn, Result<(), Status>)> {
    let span = tracing::info_span!("apply");
    tokio::task::spawn_blocking(move || {
        let _span = span.enter();
        let reader = match txn.before_images() {
            Ok(r) => r,
            Err(e) => return (txn, Err(Status::from(e))),
        };
        // The reader ends when its input ends, when a read fails (the writer gets
        // the error), or when the writer has stopped (its next send fails); then
        // `batches` closes and the receiving task learns that the sync is over.
        let (ptx, prx) = std::sync::mpsc::sync_channel::<Result<Prepared, Status>>(APPLY_QUEUE);
        let read_span = tracing::info_span!("read_before_images");
        let started = std::thread::Builder::new()
            .name("before-images".into())
            .spawn(move || {
                let _span = read_span.enter();
                while let Some(first) = batches.blocking_recv() {
                    // This batch and those that arrived meanwhile, read together.
                    let taken = std::iter::once(first)
                        .chain(std::iter::from_fn(|| batches.try_recv().ok()).take(READ_QUEUE - 1))
                        .collect();
                    match reader.prepare_many(taken) {
                        Ok(prepared) => {
                            for p in prepared {
                                if ptx.send(Ok(p)).is_err() {
                                    return;
                                }
                            }
                        }
                        Err(e) => {
                            let _ = ptx.send(Err(Status::from(e)));
                            return;
                        }
                    }
                }
            });
        if let Err(e) = started {
            return (
                txn,
                Err(Status::internal(format!(
                    "cannot start a reader thread: {e}"
                ))),
            );
        }
        while let Ok(first) = prx.recv() {
            // This batch, and those read meanwhile, up to GROUP_BYTES.
            let mut group = Vec::new();
            let mut bytes = 0;
            for r in std::iter::once(first).chain(std::iter::from_fn(|| prx.try_recv().ok())) {
                match r {
                    Ok(p) => {
                        bytes += p.bytes();
                        group.push(p);
                    }
                    Err(s) => return (txn, Err(s)),
                }
                if bytes >= GROUP_BYTES {
                    break;
                }
            }
            if let Err(e) = txn.apply_prepared(group) {
                return (txn, Err(Status::from(e)));
            }
            ingested.fetch_add(bytes as u64, Ordering::Relaxed);
            let progress = pb::SyncReply {
                msg: Some(pb::sync_reply::Msg::Progress(pb::SyncProgress {
                    applied_bytes: txn.applied_bytes(),
                })),
            };
            if tx.blocking_send(Ok(progress)).is_err() {
                return (txn, Err(Status::cancelled("the agent went away")));
            }
        }
        (txn, Ok(()))
    })
}

/// Receives extent batches until Commit; any failure rolls the sync back.
///
/// Three stages overlap: this task receives, a blocking task verifies each batch's
/// checksums, and the applier writes the previous batches (its direct writes wait on
/// the disk, which the other stages need not do).
#[allow(clippy::too_many_arguments)]
async fn run_sync(
    svc: &NodeService,
    txn: SyncTxn,
    mut inbound: Streaming<pb::SyncMessage>,
    geometry: Geometry,
    source: String,
    tx: &mpsc::Sender<Result<pb::SyncReply, Status>>,
    lock: tokio::sync::OwnedRwLockWriteGuard<()>,
    damaged: Arc<AtomicU64>,
) -> Result<tokio::sync::OwnedRwLockWriteGuard<()>, Status> {
    use pb::sync_message::Msg;
    let started = std::time::Instant::now();
    let (btx, brx) = mpsc::channel::<Vec<VerifiedExtent>>(READ_QUEUE);
    let applier = spawn_applier(txn, brx, tx.clone(), svc.ingested.clone());
    // Stops the applier and rolls back; the applier's own error, if any, wins.
    async fn fail(
        btx: mpsc::Sender<Vec<VerifiedExtent>>,
        applier: tokio::task::JoinHandle<(SyncTxn, Result<(), Status>)>,
        why: Status,
    ) -> Status {
        drop(btx);
        match applier.await {
            Ok((txn, res)) => {
                abort(txn).await;
                res.err().unwrap_or(why)
            }
            Err(e) => Status::internal(format!("sync applier failed: {e}")),
        }
    }
    let idle = svc.admission.idle();
    loop {
        let msg = match next_within(&mut inbound, idle, "sync").await {
            Ok(Some(m)) => m,
            Ok(None) => {
                let why =
                    Status::aborted("the sync stream ended before SyncCommit; nothing was kept");
                return Err(fail(btx, applier, why).await);
            }
            Err(s) => {
                tracing::warn!(%source, "sync stream broke: {}", s.message());
                return Err(fail(btx, applier, s).await);
            }
        };
        match msg.msg {
            // An empty batch only keeps the stream alive while the agent reads.
            Some(Msg::Extents(batch)) if batch.extents.is_empty() => {}
            Some(Msg::Extents(batch)) => {
                let src = source.clone();
                let verified = match blocking(move || verify_batch(batch, geometry, &src)).await {
                    Ok(Ok(v)) => v,
                    Ok(Err(s)) | Err(s) => return Err(fail(btx, applier, s).await),
                };
                if btx.send(verified).await.is_err() {
                    // The applier stopped: its error explains why.
                    let why = Status::internal("the sync applier stopped");
                    return Err(fail(btx, applier, why).await);
                }
            }
            Some(Msg::Commit(commit)) => {
                let received = started.elapsed();
                drop(btx);
                let (mut txn, applied) = applier
                    .await
                    .map_err(|e| Status::internal(format!("sync applier failed: {e}")))?;
                if let Err(s) = applied {
                    abort(txn).await;
                    return Err(s);
                }
                if commit.consistency != 0 {
                    txn.set_consistency(Consistency::from_proto(commit.consistency));
                }
                let span = tracing::info_span!("commit");
                let times = txn.times();
                let applied_at = started.elapsed();
                let committing = std::time::Instant::now();
                let point = blocking(move || {
                    let _span = span.enter();
                    txn.commit()
                })
                .await??;
                tracing::debug!(
                    %source,
                    total_ms = started.elapsed().as_millis() as u64,
                    received_ms = received.as_millis() as u64,
                    applied_ms = applied_at.as_millis() as u64,
                    open_ms = times.open.as_millis() as u64,
                    before_images_ms = times.before_images.as_millis() as u64,
                    read_rounds = times.read_rounds,
                    groups = times.groups,
                    delta_ms = times.delta.as_millis() as u64,
                    writes_ms = times.writes.as_millis() as u64,
                    commit_ms = committing.elapsed().as_millis() as u64,
                    "sync timings"
                );
                count_sync(&source, Some(&point), started);
                tracing::info!(%source, point = point.id, blocks = point.blocks_changed, bytes = point.bytes_changed, "recovery point committed");
                // The point is durable (in the journal): the agent hears of it now,
                // and the caller settles it into the replica after the reply stream
                // has ended, still under the source's lock, so nothing reads the
                // source half settled (a next sync waits for the lock).
                let _ = tx
                    .send(Ok(pb::SyncReply {
                        msg: Some(pb::sync_reply::Msg::Committed(pb::SyncCommitted {
                            point: Some(point_to_proto(&point)),
                            damaged_blocks: damaged.load(Ordering::Relaxed),
                        })),
                    }))
                    .await;
                return Ok(lock);
            }
            Some(Msg::Begin(_)) | None => {
                let why = Status::invalid_argument(
                    "unexpected message in a sync: only ExtentBatch or SyncCommit may follow SyncBegin",
                );
                return Err(fail(btx, applier, why).await);
            }
        }
    }
}

/// The service handle tonic serves (the state is shared with the heartbeat loop).
#[derive(Clone)]
pub struct NodeApi(pub Arc<NodeService>);

#[tonic::async_trait]
impl pb::node_server::Node for NodeApi {
    type SyncStream = BoxStream<pb::SyncReply>;
    type RestoreStream = BoxStream<pb::RestoreChunk>;
    type ExportStream = BoxStream<pb::ExportChunk>;
    type ShipLogStream = BoxStream<pb::LogReply>;
    type RestoreLogStream = BoxStream<pb::LogChunk>;

    async fn ship_log(
        &self,
        req: Request<Streaming<pb::LogMessage>>,
    ) -> Result<Response<Self::ShipLogStream>, Status> {
        self.0.clone().ship_log(req).await
    }

    async fn restore_log(
        &self,
        req: Request<pb::NodeRestoreRequest>,
    ) -> Result<Response<Self::RestoreLogStream>, Status> {
        self.0.clone().restore_log(req).await
    }

    async fn sync(
        &self,
        req: Request<Streaming<pb::SyncMessage>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let caller = require(&req, "Sync", &[Role::Agent])?;
        let svc = self.0.clone();
        let idle = svc.admission.idle();
        let mut inbound = req.into_inner();
        // Nothing is held for a caller that is still unknown: first its Begin,
        // within the idle timeout, then its authority, then turns (see admission).
        let begin = match next_within(&mut inbound, idle, "sync").await? {
            Some(pb::SyncMessage {
                msg: Some(pb::sync_message::Msg::Begin(b)),
            }) => b,
            _ => return Err(Status::invalid_argument("a sync must start with SyncBegin")),
        };
        let source = SourceName::parse(begin.source.as_str())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let geometry = Geometry::new(begin.size_bytes, begin.block_size)
            .map_err(|e| Status::invalid_argument(format!("data source {source}: {e}")))?;
        if begin.deep && !begin.want_digests {
            return Err(Status::invalid_argument(
                "a deep check (deep) needs want_digests",
            ));
        }
        let a = svc.authorize(&caller, &source, Some(begin.epoch)).await?;
        if a.size_bytes != begin.size_bytes || a.block_size != begin.block_size {
            return Err(Status::invalid_argument(format!(
                "data source {} is registered as {} bytes in blocks of {}, the sync says {} bytes in blocks of {}",
                source, a.size_bytes, a.block_size, begin.size_bytes, begin.block_size
            )));
        }
        if !a.moving_to.is_empty() {
            return Err(Status::unavailable(format!(
                "data source {} is moving to node {}; sync again when the move is done",
                source, a.moving_to
            )));
        }
        let agent_turn = svc.admission.agent_turn(&caller.name, TurnKind::Write)?;
        let source_turn = svc.admission.source_turn(&source)?;
        // A restore, verify or the previous sync's settle may hold the source.
        let lock = svc.locks.get(&source).write_owned().await;
        // The assignment may have changed while this waited (a move began or ended).
        let a = svc.authorize(&caller, &source, Some(begin.epoch)).await?;
        if !a.moving_to.is_empty() {
            return Err(Status::unavailable(format!(
                "data source {} is moving to node {}; sync again when the move is done",
                source, a.moving_to
            )));
        }
        // A node-wide turn last: past the limit the agent waits here, before Ready,
        // having sent nothing but SyncBegin.
        let slot = svc.admission.slot().await?;
        let store = svc.store.clone();
        let name = source.clone();
        let newest = blocking(move || store.newest_point(&name))
            .await??
            .map_or(0, |p| p.id);
        let base_point = if begin.want_digests {
            newest
        } else {
            begin.base_point
        };
        let kind = match PointKind::from_proto(begin.kind) {
            // A check of a source with no point yet copies everything: a full point.
            _ if base_point == 0 => PointKind::Full,
            Some(k) => k,
            None => PointKind::Incremental,
        };
        let spec = SyncSpec {
            source: source.clone(),
            geometry,
            base_point,
            consistency: Consistency::from_proto(begin.consistency),
            kind,
            policy: a.policy.as_ref().map(policy_from_proto),
        };
        let store = svc.store.clone();
        let txn = blocking(move || store.begin_sync(spec)).await??;
        let digest_count = if begin.want_digests && newest > 0 {
            geometry.block_count()
        } else {
            0
        };
        let (tx, rx) = mpsc::channel(8);
        let _ = tx
            .send(Ok(pb::SyncReply {
                msg: Some(pb::sync_reply::Msg::Ready(pb::SyncReady {
                    base_point,
                    digest_count,
                })),
            }))
            .await;
        let damaged = Arc::new(AtomicU64::new(0));
        if digest_count > 0 {
            // Runs beside the apply loop: the agent decides on a block only after
            // reading its digest, so every digest is read before that block can be
            // rewritten, and the agent never waits on extents the node is not reading.
            send_digests(
                svc.store.clone(),
                source.to_string(),
                digest_count,
                begin.deep.then(|| damaged.clone()),
                Sender::new(tx.clone(), idle),
            );
        }
        let span = tracing::info_span!("sync", source = %source, point = txn.new_point(), agent = %caller.name);
        let guard = StreamGuard::new(&svc.live_streams);
        tokio::spawn(
            async move {
                let _guard = guard;
                let _slot = slot;
                let source = source.to_string();
                let outcome = run_sync(
                    &svc,
                    txn,
                    inbound,
                    geometry,
                    source.clone(),
                    &tx,
                    lock,
                    damaged,
                )
                .await;
                // The stream is over: the agent and the source may start another
                // (which waits for the settle below on the source's lock).
                drop(source_turn);
                drop(agent_turn);
                match outcome {
                    Ok(lock) => {
                        // Committed and answered: end the reply stream, then settle
                        // the point into the replica and apply retention, still
                        // holding the source's lock.
                        drop(tx);
                        svc.settle(&source).await;
                        svc.after_commit(&source).await;
                        drop(lock);
                    }
                    Err(status) => {
                        tracing::warn!("sync failed: {}", status.message());
                        count_sync(&source, None, std::time::Instant::now());
                        if status.code() == tonic::Code::ResourceExhausted {
                            svc.note_refusal(&source, Some(status.message().to_string()));
                        }
                        let _ = tx.send(Err(status)).await;
                    }
                }
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn restore(
        &self,
        req: Request<pb::NodeRestoreRequest>,
    ) -> Result<Response<Self::RestoreStream>, Status> {
        let caller = require(&req, "Restore", &[Role::Agent, Role::Admin])?;
        let r = req.into_inner();
        let svc = self.0.clone();
        let source = source_name(&r.source)?;
        let (lock, turn) = svc.authorize_read(&caller, &source, r.point).await?;
        let store = svc.store.clone();
        let name = source.to_string();
        let mut reader = blocking(move || store.restore(&name, r.point)).await??;
        let (tx, rx) = mpsc::channel(4);
        let tx = Sender::new(tx, svc.admission.idle());
        let guard = StreamGuard::new(&svc.live_streams);
        let header = pb::RestoreChunk {
            msg: Some(pb::restore_chunk::Msg::Header(pb::RestoreHeader {
                point: Some(point_to_proto(reader.point())),
                size_bytes: reader.geometry().size_bytes,
                block_size: reader.geometry().block_size,
            })),
        };
        tracing::info!(source = %source, point = reader.point().id, agent = %caller.name, "restore started");
        tokio::task::spawn_blocking(move || {
            let _lock = lock;
            let _guard = guard;
            let _turn = turn;
            if !tx.send(Ok(header)) {
                return;
            }
            loop {
                let msg = match reader.next_item() {
                    Ok(None) => return,
                    Ok(Some(RestoreItem::Data {
                        offset,
                        data,
                        digests,
                    })) => pb::restore_chunk::Msg::Extent(pb::Extent {
                        offset,
                        data: data.into(),
                        checksums: digests
                            .iter()
                            .map(|d| bytes::Bytes::copy_from_slice(&d.0))
                            .collect(),
                    }),
                    Ok(Some(RestoreItem::Zeros { offset, len })) => {
                        pb::restore_chunk::Msg::Zeros(pb::ZeroRun { offset, len })
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.into()));
                        return;
                    }
                };
                if !tx.send(Ok(pb::RestoreChunk { msg: Some(msg) })) {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_points(
        &self,
        req: Request<pb::ListPointsRequest>,
    ) -> Result<Response<pb::ListPointsResponse>, Status> {
        require(&req, "ListPoints", &[Role::Coordinator])?;
        let source = source_name(&req.into_inner().source)?.into_string();
        let store = self.0.store.clone();
        let (points, lock) = blocking(move || {
            Ok::<_, StoreError>((store.points(&source)?, store.lock_of(&source)?))
        })
        .await??;
        let now = bulwark_common::time::now_ms();
        Ok(Response::new(pb::ListPointsResponse {
            points: points
                .iter()
                .map(|p| {
                    let mut out = point_to_proto(p);
                    if let Some(l) = lock.filter(|l| l.holds(p.created_ms, now)) {
                        out.lock_mode = lock_to_proto(Some(l)).mode;
                        out.locked_until_ms = l.until(p.created_ms);
                    }
                    out
                })
                .collect(),
        }))
    }

    async fn verify(
        &self,
        req: Request<pb::NodeVerifyRequest>,
    ) -> Result<Response<pb::VerifyReport>, Status> {
        require(&req, "Verify", &[Role::Coordinator])?;
        let r = req.into_inner();
        source_name(&r.source)?;
        let lock = self.0.locks.get(&r.source).read_owned().await;
        let store = self.0.store.clone();
        let source = r.source.clone();
        let started = std::time::Instant::now();
        tracing::info!(%source, point = r.point, "verify started");
        let out = blocking(move || {
            let _lock = lock;
            store.verify(&source, r.point)
        })
        .await??;
        let points = {
            let store = self.0.store.clone();
            let source = r.source.clone();
            blocking(move || store.points(&source)).await??
        };
        let damaged_points = points
            .iter()
            .filter(|p| out.damaged_points.iter().any(|(id, _)| *id == p.id))
            .map(point_to_proto)
            .collect();
        tracing::info!(source = %r.source, blocks = out.blocks_checked, damaged_replica = out.damaged_replica.len(),
            damaged_points = out.damaged_points.len(), "verify finished");
        Ok(Response::new(pb::VerifyReport {
            source: r.source,
            blocks_checked: out.blocks_checked,
            bytes_read: out.bytes_read,
            damaged_replica_blocks: out.damaged_replica,
            damaged_points,
            duration_ms: started.elapsed().as_millis() as u64,
            repaired_blocks: 0,
            repair_error: String::new(),
        }))
    }

    async fn export(
        &self,
        req: Request<pb::ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        let caller = require(&req, "Export", &[Role::Node])?;
        let source = source_name(&req.into_inner().source)?;
        let svc = self.0.clone();
        let a = svc.assignment(&source).await?;
        if a.node != svc.name || a.moving_to != caller.name {
            tracing::warn!(%caller, %source, "export refused: no move of the source to the caller");
            return Err(Status::permission_denied(format!(
                "data source {source} is not moving from {} to {}",
                svc.name, caller.name
            )));
        }
        let lock = svc.locks.get(&source).read_owned().await;
        let store = svc.store.clone();
        let name = source.clone();
        let (meta, files) = blocking(move || store.export(&name)).await??;
        let meta = serde_json::to_vec(&meta)
            .map_err(|e| Status::internal(format!("cannot encode the source's records: {e}")))?;
        let (tx, rx) = mpsc::channel(4);
        let tx = Sender::new(tx, svc.admission.idle());
        let guard = StreamGuard::new(&svc.live_streams);
        tracing::info!(%source, to = %caller.name, "export for a move started");
        tokio::task::spawn_blocking(move || {
            let _lock = lock;
            let _guard = guard;
            let send = |msg: pb::export_chunk::Msg| tx.send(Ok(pb::ExportChunk { msg: Some(msg) }));
            if !send(pb::export_chunk::Msg::Meta(meta.into())) {
                return;
            }
            const CHUNK: usize = 1 << 20;
            for (name, path) in files {
                let r = (|| -> std::io::Result<bool> {
                    let f = std::fs::File::open(&path)?;
                    let len = f.metadata()?.len();
                    let mut offset = 0u64;
                    let mut first = true;
                    while first || offset < len {
                        let n = CHUNK.min((len - offset) as usize);
                        let mut buf = vec![0u8; n];
                        std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, offset)?;
                        // Holes stay holes: all-zero chunks are not sent (but the
                        // first chunk always is, so the file is made).
                        let zero = bulwark_common::block::is_zero(&buf);
                        if first || !zero {
                            let data = if zero { Vec::new() } else { buf };
                            if !send(pb::export_chunk::Msg::File(pb::FileData {
                                name: name.clone(),
                                offset,
                                data: data.into(),
                                file_len: len,
                            })) {
                                return Ok(false);
                            }
                        }
                        first = false;
                        offset += n as u64;
                    }
                    Ok(true)
                })();
                match r {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(format!(
                            "cannot read {}: {e}",
                            path.display()
                        ))));
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn import(
        &self,
        req: Request<pb::ImportRequest>,
    ) -> Result<Response<pb::ImportResponse>, Status> {
        require(&req, "Import", &[Role::Coordinator])?;
        let r = req.into_inner();
        let svc = self.0.clone();
        let source = source_name(&r.source)?;
        let idle = svc.admission.idle();
        bulwark_common::name::NodeName::parse(r.from_node.as_str())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let target = bulwark_common::tls::Target::parse(&r.from_address)
            .map_err(|m| Status::invalid_argument(format!("from_address: {m}")))?;
        // Only the node named may answer at that address.
        let peer_tls = svc
            .peer_tls
            .client_config_for(Role::Node, Some(&r.from_node))
            .map_err(|e| Status::internal(e.to_string()))?;
        let channel = bulwark_common::tls::channel(&target, peer_tls)
            .await
            .map_err(|m| Status::unavailable(format!("node {}: {m}", r.from_node)))?;
        let mut peer = pb::node_client::NodeClient::new(channel)
            .max_decoding_message_size(bulwark_common::MAX_MESSAGE_BYTES);
        let at_peer =
            |s: Status| Status::new(s.code(), format!("node {}: {}", r.from_node, s.message()));
        let mut stream = peer
            .export(pb::ExportRequest {
                source: r.source.clone(),
            })
            .await
            .map_err(at_peer)?
            .into_inner();
        let _lock = svc.locks.get(&source).write_owned().await;
        let first = tokio::time::timeout(idle, stream.message())
            .await
            .map_err(|_| exporter_idle(&r.from_node, idle))?;
        let meta = match first.map_err(at_peer)? {
            Some(pb::ExportChunk {
                msg: Some(pb::export_chunk::Msg::Meta(m)),
            }) => serde_json::from_slice::<crate::store::ExportMeta>(&m)
                .map_err(|e| Status::invalid_argument(format!("unreadable source records: {e}")))?,
            _ => {
                return Err(Status::invalid_argument(
                    "an export must start with the records",
                ));
            }
        };
        if meta.source.name != source {
            return Err(Status::invalid_argument("the export is of another source"));
        }
        let points = meta.points.len() as u64;
        let store = svc.store.clone();
        let import = blocking(move || store.import(meta)).await??;
        let (ftx, mut frx) = mpsc::channel::<pb::FileData>(4);
        let writer =
            tokio::task::spawn_blocking(move || -> Result<crate::store::Import, StoreError> {
                let mut import = import;
                while let Some(f) = frx.blocking_recv() {
                    import.write(&f.name, f.offset, &f.data, f.file_len)?;
                }
                Ok(import)
            });
        let received: Result<(), Status> = async {
            loop {
                let next = tokio::time::timeout(idle, stream.message())
                    .await
                    .map_err(|_| exporter_idle(&r.from_node, idle))?;
                let Some(chunk) = next.map_err(at_peer)? else {
                    break;
                };
                match chunk.msg {
                    Some(pb::export_chunk::Msg::File(f)) => {
                        if ftx.send(f).await.is_err() {
                            break;
                        }
                    }
                    _ => return Err(Status::invalid_argument("unexpected message in an export")),
                }
            }
            Ok(())
        }
        .await;
        drop(ftx);
        let import = writer
            .await
            .map_err(|e| Status::internal(format!("import writer failed: {e}")))??;
        received?;
        let bytes = import.bytes();
        let verified = blocking(move || import.commit()).await??;
        tracing::info!(source = %r.source, from = %r.from_node, bytes, points, "data source copied in for a move and verified");
        Ok(Response::new(pb::ImportResponse {
            bytes,
            points,
            blocks_verified: verified,
        }))
    }

    async fn drop_source(
        &self,
        req: Request<pb::DropSourceRequest>,
    ) -> Result<Response<pb::DropSourceResponse>, Status> {
        require(&req, "DropSource", &[Role::Coordinator])?;
        let source = source_name(&req.into_inner().source)?;
        let dropped = self.0.drop_copy(source).await?;
        Ok(Response::new(pb::DropSourceResponse { dropped }))
    }

    async fn set_lock(
        &self,
        req: Request<pb::SetLockRequest>,
    ) -> Result<Response<pb::SetLockResponse>, Status> {
        let caller = require(
            &req,
            "SetLock",
            &[Role::Coordinator, Role::Admin, Role::Officer],
        )?;
        let r = req.into_inner();
        Ok(Response::new(self.0.set_lock(&caller, r).await?))
    }

    async fn grant_restore(
        &self,
        req: Request<pb::GrantRestoreRequest>,
    ) -> Result<Response<pb::GrantRestoreResponse>, Status> {
        require(&req, "GrantRestore", &[Role::Coordinator])?;
        self.0.grant(req.into_inner())?;
        Ok(Response::new(pb::GrantRestoreResponse {}))
    }
}
