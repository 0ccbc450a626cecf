//! The node's side of a sync, from `SyncBegin` to the settled point:
//!
//! 1. admission: the caller's authority (owner, assigned here, epoch, geometry, not
//!    moving), its turns, the source's write lock, the authority again, a node turn;
//! 2. the transaction opens on the base point, `SyncReady` goes out, and with
//!    `want_digests` the newest point's digests stream beside the apply loop;
//! 3. verify: each batch's BLAKE3 in a blocking task;
//! 4. before-images: a reader thread reads each batch's old digests;
//! 5. apply: the writer applies the batches in groups, reporting progress;
//! 6. commit: at `SyncCommit` the point is made durable and `SyncCommitted` sent;
//! 7. settle: once the reply stream has ended, the point is settled into the
//!    replica, still under the source's lock;
//! 8. retention prunes what it no longer keeps.
//!
//! Any failure before the commit rolls the sync back.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bulwark_common::block::{DIGEST_LEN, Geometry};
use bulwark_common::point::Consistency;
use bulwark_common::tls::Identity;
use bulwark_proto as pb;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use tracing::Instrument;

use super::access::not_moving;
use super::{BoxStream, NodeService, StreamGuard, blocking, count_sync};
use crate::error::NodeError;
use crate::node::admission::{AgentTurn, Sender, SourceTurn, TurnKind, next_within};
use crate::store::{Prepared, Store, SyncTxn, VerifiedExtent};
use crate::wire::{SyncStart, point_to_proto, policy_from_proto};

/// The source's write lock, held from admission to the end of the settle.
type WriteLock = tokio::sync::OwnedRwLockWriteGuard<()>;

/// What an admitted sync holds until it ends.
struct Admitted {
    assignment: pb::Assignment,
    agent_turn: AgentTurn,
    source_turn: SourceTurn,
    lock: WriteLock,
    slot: OwnedSemaphorePermit,
}

impl NodeService {
    /// Runs a sync that opened with `start`, reading the rest of `inbound`; the
    /// replies stream back (first `SyncReady`) while a task applies the batches.
    pub async fn sync(
        self: Arc<Self>,
        caller: Identity,
        start: SyncStart,
        inbound: Streaming<pb::SyncMessage>,
    ) -> Result<BoxStream<pb::SyncReply>, NodeError> {
        let admitted = self.admit_sync(&caller, &start).await?;
        let (txn, base_point, digest_count) = self.open_sync(&start, &admitted.assignment).await?;
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
                self.store.clone(),
                start.source.to_string(),
                digest_count,
                start.deep.then(|| damaged.clone()),
                Sender::new(tx.clone(), self.idle()),
            );
        }
        let span = tracing::info_span!("sync", source = %start.source, point = txn.new_point(), agent = %caller.name);
        let guard = StreamGuard::new(&self.live_streams);
        let run = SyncRun {
            txn,
            inbound,
            geometry: start.geometry,
            source: start.source.to_string(),
            tx,
            damaged,
        };
        tokio::spawn(
            async move {
                let _guard = guard;
                self.run_and_settle(run, admitted).await;
            }
            .instrument(span),
        );
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    /// Admits a sync (see [`crate::node::admission`]): nothing is held for a
    /// caller that is still unknown; first its authority, then turns, the source's
    /// lock, the authority again (the assignment may have changed while this waited)
    /// and last a node-wide turn: past the limit the agent waits here, before Ready,
    /// having sent nothing but SyncBegin.
    async fn admit_sync(
        &self,
        caller: &Identity,
        start: &SyncStart,
    ) -> Result<Admitted, NodeError> {
        let source = &start.source;
        let a = self.authorize(caller, source, Some(start.epoch)).await?;
        let g = start.geometry;
        if a.size_bytes != g.size_bytes || a.block_size != g.block_size {
            return Err(NodeError::NotAsRegistered {
                source_name: source.to_string(),
                size_bytes: a.size_bytes,
                block_size: a.block_size,
                sync_size_bytes: g.size_bytes,
                sync_block_size: g.block_size,
            });
        }
        not_moving(&a, source, "sync")?;
        let agent_turn = self.admission.agent_turn(&caller.name, TurnKind::Write)?;
        let source_turn = self.admission.source_turn(source)?;
        // A restore, verify or the previous sync's settle may hold the source.
        let lock = self.locks.get(source).write_owned().await;
        let assignment = self.authorize(caller, source, Some(start.epoch)).await?;
        not_moving(&assignment, source, "sync")?;
        let slot = self.admission.slot().await?;
        Ok(Admitted {
            assignment,
            agent_turn,
            source_turn,
            lock,
            slot,
        })
    }

    /// Opens the sync's transaction: on the newest point for a check
    /// (`want_digests`), else on the agent's base point. Returns it with the base
    /// point and how many digests the agent gets.
    async fn open_sync(
        &self,
        start: &SyncStart,
        a: &pb::Assignment,
    ) -> Result<(SyncTxn, u64, u64), NodeError> {
        let store = self.store.clone();
        let name = start.source.clone();
        let newest = blocking(move || store.newest_point(&name))
            .await??
            .map_or(0, |p| p.id);
        let spec = start.spec(newest, a.policy.as_ref().map(policy_from_proto));
        let base_point = spec.base_point;
        let store = self.store.clone();
        let txn = blocking(move || store.begin_sync(spec)).await??;
        let digest_count = if start.want_digests && newest > 0 {
            start.geometry.block_count()
        } else {
            0
        };
        Ok((txn, base_point, digest_count))
    }

    /// The spawned part of a sync: receives and applies until the commit, gives the
    /// turns back, then settles the point and applies retention (or reports the
    /// failure).
    async fn run_and_settle(&self, run: SyncRun, admitted: Admitted) {
        let Admitted {
            agent_turn,
            source_turn,
            lock,
            slot,
            ..
        } = admitted;
        let _slot = slot;
        let source = run.source.clone();
        let tx = run.tx.clone();
        let outcome = run.run(self, lock).await;
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
                self.settle(&source).await;
                self.after_commit(&source).await;
                drop(lock);
            }
            Err(status) => {
                tracing::warn!("sync failed: {}", status.message());
                self.after_failure(&source, &status, std::time::Instant::now());
                let _ = tx.send(Err(status)).await;
            }
        }
    }
}

/// Checks one `ExtentBatch` of a sync of a volume with `geometry`: its size (on the
/// wire and decoded), and each extent's codec, alignment, range, checksum count and
/// checksums, decoding a compressed extent into at most its declared logical length
/// first. Below this the store sees plain bytes. Public (hidden) for the fuzz target
/// `sync_stream` (fuzz/), which drives a sync's steps in-process.
#[doc(hidden)]
pub fn verify_batch(
    batch: pb::ExtentBatch,
    geometry: Geometry,
    source: &str,
) -> Result<Vec<VerifiedExtent>, Status> {
    // The protocol's batches: at most MAX_BATCH_BYTES of payload, or one block when
    // blocks are larger (the transport limit is the largest of any geometry). The
    // limit holds for the bytes on the wire and for the bytes they decode to, so a
    // batch never makes the node hold more than that.
    let limit = bulwark_common::block::batch_limit(geometry.block_size);
    let (payload, logical) = batch.extents.iter().fold((0usize, 0u64), |(n, l), e| {
        let len = if e.codec == pb::Codec::Raw as i32 {
            e.data.len() as u64
        } else {
            e.logical_len
        };
        (n.saturating_add(e.data.len()), l.saturating_add(len))
    });
    if payload > limit || logical > limit as u64 {
        tracing::warn!(
            source,
            payload,
            logical,
            limit,
            "refused an oversized batch"
        );
        return Err(Status::invalid_argument(format!(
            "data source {source}: a batch of {payload} bytes ({logical} decoded); batches hold at most {limit}"
        )));
    }
    let mut decoder = None;
    batch
        .extents
        .into_iter()
        .map(|e| {
            let refuse = |err: String| {
                tracing::warn!(source, "refused extent: {err}");
                Status::invalid_argument(format!("data source {source}: {err}"))
            };
            let data = decode_extent(&e, geometry, &mut decoder).map_err(refuse)?;
            let (first_block, digests) = geometry
                .verify_extent(e.offset, &data, &e.checksums)
                .map_err(|err| refuse(err.to_string()))?;
            Ok(VerifiedExtent {
                first_block,
                data,
                digests,
            })
        })
        .collect()
}

/// The largest zstd window (log2) a node decodes: a batch's frame needs no more
/// than its own size, at most 4 MiB.
const WIRE_WINDOW_LOG_MAX: u32 = 23;

/// The plain bytes of extent `e`: its data when raw; a zstd frame decoded into at
/// most its `logical_len`, which must first name whole blocks of the volume with
/// one checksum each, and which the frame must fill exactly.
fn decode_extent(
    e: &pb::Extent,
    geometry: Geometry,
    decoder: &mut Option<zstd::bulk::Decompressor<'static>>,
) -> Result<bytes::Bytes, String> {
    let at = e.offset;
    match pb::Codec::try_from(e.codec) {
        Ok(pb::Codec::Raw) if e.logical_len == 0 || e.logical_len == e.data.len() as u64 => {
            Ok(e.data.clone())
        }
        Ok(pb::Codec::Raw) => Err(format!(
            "the raw extent at offset {at} has {} bytes but declares {}",
            e.data.len(),
            e.logical_len
        )),
        Ok(pb::Codec::Zstd) => {
            let want = e.logical_len;
            let (_, blocks) = geometry
                .check_extent(at, want)
                .map_err(|err| format!("the compressed extent at offset {at}: {err}"))?;
            if blocks != e.checksums.len() as u64 {
                return Err(format!(
                    "the compressed extent at offset {at} declares {want} bytes ({blocks} blocks) but has {} checksums",
                    e.checksums.len()
                ));
            }
            let d = match decoder {
                Some(d) => d,
                None => {
                    let mut d = zstd::bulk::Decompressor::new()
                        .map_err(|err| format!("cannot start a zstd decoder: {err}"))?;
                    d.window_log_max(WIRE_WINDOW_LOG_MAX)
                        .map_err(|err| format!("cannot bound the zstd decoder: {err}"))?;
                    decoder.insert(d)
                }
            };
            // The output buffer is `want` bytes: a frame that decodes to more fails.
            let plain = d.decompress(&e.data, want as usize).map_err(|err| {
                format!("the compressed extent at offset {at} does not decode into its declared {want} bytes: {err}")
            })?;
            if plain.len() as u64 != want {
                return Err(format!(
                    "the compressed extent at offset {at} decodes to {} bytes, not its declared {want}",
                    plain.len()
                ));
            }
            Ok(bytes::Bytes::from(plain))
        }
        Err(_) => Err(format!(
            "the extent at offset {at} has an unknown codec {}",
            e.codec
        )),
    }
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

/// A sync past its `SyncReady`: what the receive loop works on.
struct SyncRun {
    txn: SyncTxn,
    inbound: Streaming<pb::SyncMessage>,
    geometry: Geometry,
    source: String,
    tx: mpsc::Sender<Result<pb::SyncReply, Status>>,
    /// Replica blocks a deep check found damaged.
    damaged: Arc<AtomicU64>,
}

/// Stops the applier and rolls back; the applier's own error, if any, wins.
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

impl SyncRun {
    /// Receives extent batches until Commit; any failure rolls the sync back.
    ///
    /// Three stages overlap: this task receives, a blocking task verifies each batch's
    /// checksums, and the applier writes the previous batches (its direct writes wait on
    /// the disk, which the other stages need not do).
    async fn run(self, svc: &NodeService, lock: WriteLock) -> Result<WriteLock, Status> {
        use pb::sync_message::Msg;
        let SyncRun {
            txn,
            mut inbound,
            geometry,
            source,
            tx,
            damaged,
        } = self;
        let started = std::time::Instant::now();
        let (btx, brx) = mpsc::channel::<Vec<VerifiedExtent>>(READ_QUEUE);
        let applier = spawn_applier(txn, brx, tx.clone(), svc.ingested.clone());
        let idle = svc.idle();
        loop {
            let msg = match next_within(&mut inbound, idle, "sync").await {
                Ok(Some(m)) => m,
                Ok(None) => {
                    let why = Status::aborted(
                        "the sync stream ended before SyncCommit; nothing was kept",
                    );
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
                    let verified = match blocking(move || verify_batch(batch, geometry, &src)).await
                    {
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
                    let timing = Timing { started, received };
                    commit_sync(txn, &source, timing, &tx, &damaged).await?;
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
}

/// When a sync started, and how long it took to receive everything.
struct Timing {
    started: std::time::Instant,
    received: std::time::Duration,
}

/// Commits the applied transaction and tells the agent.
///
/// The point is durable (in the journal): the agent hears of it now, and the caller
/// settles it into the replica after the reply stream has ended, still under the
/// source's lock, so nothing reads the source half settled (a next sync waits for
/// the lock).
async fn commit_sync(
    txn: SyncTxn,
    source: &str,
    timing: Timing,
    tx: &mpsc::Sender<Result<pb::SyncReply, Status>>,
    damaged: &AtomicU64,
) -> Result<(), Status> {
    let Timing { started, received } = timing;
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
    count_sync(source, Some(&point), started);
    tracing::info!(%source, point = point.id, blocks = point.blocks_changed, bytes = point.bytes_changed, "recovery point committed");
    let _ = tx
        .send(Ok(pb::SyncReply {
            msg: Some(pb::sync_reply::Msg::Committed(pb::SyncCommitted {
                point: Some(point_to_proto(&point)),
                damaged_blocks: damaged.load(Ordering::Relaxed),
            })),
        }))
        .await;
    Ok(())
}
