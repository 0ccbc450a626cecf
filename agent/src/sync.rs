//! One sync of a volume: quiesce, freeze the tracker's changes, read and send, commit.
//!
//! What is read depends on the tracker's [`Plan`]:
//!
//! - **Scan** (the `fingerprint` tracker, every consistency check, and the first sync
//!   of any tracker): the node keeps the BLAKE3 digest of every block of the newest
//!   point. Within the sync stream (which holds the source's lock on the node from
//!   start to end) the node sends those digests in block order — stored, or with
//!   `deep` recomputed from the replica's bytes — while the agent reads the volume in
//!   the same order, hashes each block, and sends only the blocks whose digest
//!   differs. The comparison is always against what the node holds, so a lost
//!   acknowledgement or an interrupted sync never makes the next one skip a block.
//! - **Dirty** (the bitmap trackers): only the blocks the tracker recorded are read
//!   and all are sent, relative to the point the record started from; the node
//!   refuses if that is not its newest point, and the agent then runs a consistency
//!   check instead.
//! - **Recheck** (an `nbd-filter` after a crash, with its activity log): like a scan,
//!   but only the blocks the tracker names are read and compared; the digests of the
//!   others are passed over.
//!
//! Flow: a reader thread keeps a few chunks ahead; a blocking sender (hash, compare,
//! batch ≤ 1 MiB) feeds a bounded channel into the gRPC request stream; one async task
//! reads every reply (digests for the sender, progress, the commit). Memory stays at
//! a few batches whatever the volume size.

use bulwark_common::telemetry::TracedChannel;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bulwark_common::block::{DIGEST_LEN, Digest, Geometry, MAX_BATCH_BYTES, is_zero};
use bulwark_common::metrics::Progress;
use bulwark_common::point::{Consistency, PointKind};
use bulwark_proto as pb;
use bulwark_proto::node_client::NodeClient;
use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use crate::config::{Compress, SourceConfig};
use crate::quiesce::Quiesced;
use crate::tracker::{BlockSource, Plan, Tracker};

/// What a finished sync did.
#[derive(Debug, Clone)]
pub struct SyncOutcome {
    pub point: pb::Point,
    pub bytes_sent: u64,
    /// Payload bytes on the wire (less than `bytes_sent` when compression saved).
    pub wire_bytes: u64,
    pub blocks_sent: u64,
    pub blocks_scanned: u64,
    pub duration_ms: u64,
    /// Deep check: replica blocks the node found damaged (and this sync repaired).
    pub damaged_blocks: u64,
    pub consistency: Consistency,
    pub warnings: Vec<String>,
    /// Log ships: files that got bytes, and bytes read on the host.
    pub files_sent: u64,
    pub bytes_read: u64,
}

/// What kind of sync to run.
#[derive(Debug, Clone, Copy, Default)]
pub struct SyncOptions {
    /// A consistency check: read and compare every block.
    pub check: bool,
    /// With check: the node recomputes its digests from the replica.
    pub deep: bool,
}

/// A sync that failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("cannot read {path}: {error}")]
    Volume {
        path: String,
        #[source]
        error: std::io::Error,
    },
    #[error(
        "volume {path} is {now} bytes but data source {name} was registered with {registered}; resizing is not supported"
    )]
    SizeChanged {
        path: String,
        name: String,
        now: u64,
        registered: u64,
    },
    #[error("node {node}: {status}")]
    Node {
        node: String,
        status: String,
        base_mismatch: bool,
    },
    #[error("the node closed the sync stream")]
    Closed,
    #[error("sync stopped")]
    Stopped,
    #[error("the volume readers stopped")]
    ReadersStopped,
    #[error("the volume reader stopped")]
    ReaderStopped,
    #[error(transparent)]
    Digests(#[from] FeedError),
    #[error("the node did not accept the sync")]
    NotAccepted,
    #[error("the node offers {offered} digests for a volume of {blocks} blocks")]
    DigestCount { offered: u64, blocks: u64 },
    #[error("commit without a point")]
    NoPoint,
    /// A bounded re-check needs the node's newest point to be the record's base or
    /// newer.
    #[error(
        "node {node}'s newest point is {newest}, older than point {since} the record is relative to"
    )]
    RecheckBase {
        node: String,
        since: u64,
        newest: u64,
    },
    #[error("node {node} ended the sync without committing")]
    NotCommitted { node: String },
    /// The source's block size does not fit its volume.
    #[error("{0}")]
    Geometry(#[source] bulwark_common::block::ExtentError),
    #[error(transparent)]
    Tracker(#[from] crate::tracker::TrackerError),
    /// The tracker's blocking task panicked or was cancelled.
    #[error("{0}")]
    Task(#[source] tokio::task::JoinError),
    #[error(transparent)]
    Quiesce(#[from] crate::quiesce::QuiesceError),
    /// `compress = "zstd"`: the compressor could not be made.
    #[error("cannot start the zstd compressor of the sync stream: {0}")]
    Compressor(#[source] std::io::Error),
}

impl SyncError {
    fn node(node: &str, s: tonic::Status) -> SyncError {
        SyncError::Node {
            node: node.to_string(),
            base_mismatch: s.code() == tonic::Code::FailedPrecondition
                && s.message().contains("newest point here"),
            status: format!("{:?}: {}", s.code(), s.message()),
        }
    }
}

/// Why the node's digests stopped coming before the scanner had them all.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("the sync stream ended")]
    StreamEnded,
    #[error("node {node}: {message}")]
    Node { node: String, message: String },
    #[error("the node's digests ended early")]
    Early,
}

/// The node's digests of its newest point, in block order, for the scanner.
struct DigestFeed {
    rx: mpsc::Receiver<Result<Bytes, FeedError>>,
    /// Digests still to come; none at all when the source has no point yet.
    remaining: u64,
    buf: Bytes,
    pos: usize,
    /// The block whose digest [`DigestFeed::next`] returns.
    block: u64,
}

impl DigestFeed {
    /// Passes over the digests of the blocks before `block` (blocks a bounded
    /// re-check does not read).
    fn skip_to(&mut self, block: u64) -> Result<(), FeedError> {
        while self.block < block && self.remaining > 0 {
            self.next()?;
        }
        self.block = self.block.max(block);
        Ok(())
    }

    /// The stored digest of the next block (`UNWRITTEN` when the node has none).
    fn next(&mut self) -> Result<Digest, FeedError> {
        self.block += 1;
        if self.remaining == 0 {
            return Ok(Digest::UNWRITTEN);
        }
        self.remaining -= 1;
        while self.pos + DIGEST_LEN > self.buf.len() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => {
                    self.buf = chunk;
                    self.pos = 0;
                }
                Some(Err(e)) => return Err(e),
                None => return Err(FeedError::Early),
            }
        }
        let d = Digest::from_slice(&self.buf[self.pos..self.pos + DIGEST_LEN])
            .unwrap_or(Digest::UNWRITTEN);
        self.pos += DIGEST_LEN;
        Ok(d)
    }
}

#[derive(Default)]
struct ScanStats {
    blocks_scanned: u64,
    blocks_sent: u64,
    bytes_sent: u64,
    /// Payload bytes on the wire (after compression).
    wire_bytes: u64,
}

/// The zstd level of `compress = "zstd"`: a fast one, as it runs in the sync's path.
const WIRE_ZSTD_LEVEL: i32 = 1;

/// Encodes an extent for the wire: a zstd frame when `compressor` is set and the
/// frame is smaller than the raw bytes, else the raw bytes (the codec says which).
fn encode_extent(compressor: Option<&mut zstd::bulk::Compressor<'static>>, e: &mut pb::Extent) {
    let Some(c) = compressor else {
        return;
    };
    let logical = e.data.len();
    // A failure to compress only costs the saving: the extent goes raw.
    if let Ok(frame) = c.compress(&e.data)
        && frame.len() < logical
    {
        e.data = Bytes::from(frame);
        e.codec = pb::Codec::Zstd as i32;
        e.logical_len = logical as u64;
    }
}

/// Collects changed blocks into batches of at most [`MAX_BATCH_BYTES`] of payload.
/// Scattered blocks are copied into the batch; a read chunk that changed entirely is
/// sent as it is (a full sync copies nothing).
struct BatchBuilder<'a> {
    extents: Vec<pb::Extent>,
    /// Open run of copied blocks: offset, bytes, digests.
    run: Option<(u64, BytesMut, Vec<Bytes>)>,
    bytes: usize,
    tx: &'a mpsc::Sender<pb::SyncMessage>,
    /// When a message last went to the node.
    last_sent: std::time::Instant,
    /// The source's `compress = "zstd"`.
    compressor: Option<zstd::bulk::Compressor<'static>>,
    /// Payload bytes put on the wire so far.
    wire_bytes: u64,
}

/// How often the sync stream carries something while the blocks read are all
/// unchanged: the node aborts a stream idle for its `stream_idle_timeout` (60 s by
/// default).
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(10);

impl<'a> BatchBuilder<'a> {
    fn new(
        tx: &'a mpsc::Sender<pb::SyncMessage>,
        compress: Compress,
    ) -> Result<BatchBuilder<'a>, SyncError> {
        let compressor = match compress {
            Compress::Off => None,
            Compress::Zstd => {
                Some(zstd::bulk::Compressor::new(WIRE_ZSTD_LEVEL).map_err(SyncError::Compressor)?)
            }
        };
        Ok(BatchBuilder {
            extents: Vec::new(),
            run: None,
            bytes: 0,
            tx,
            last_sent: std::time::Instant::now(),
            compressor,
            wire_bytes: 0,
        })
    }

    /// Sends an empty batch when nothing went to the node for [`KEEPALIVE`].
    fn keepalive(&mut self) -> Result<(), SyncError> {
        if self.last_sent.elapsed() < KEEPALIVE {
            return Ok(());
        }
        self.last_sent = std::time::Instant::now();
        let msg = pb::SyncMessage {
            msg: Some(pb::sync_message::Msg::Extents(pb::ExtentBatch::default())),
        };
        self.tx.blocking_send(msg).map_err(|_| SyncError::Closed)
    }

    fn close_run(&mut self) {
        if let Some((offset, data, checksums)) = self.run.take() {
            self.extents.push(pb::Extent {
                offset,
                data: data.freeze(),
                checksums,
                ..Default::default()
            });
        }
    }

    /// Adds a copy of one changed block.
    fn copy_block(&mut self, offset: u64, data: &[u8], digest: Digest) -> Result<(), SyncError> {
        match &mut self.run {
            Some((start, buf, sums)) if *start + buf.len() as u64 == offset => {
                buf.extend_from_slice(data);
                sums.push(Bytes::copy_from_slice(&digest.0));
            }
            _ => {
                self.close_run();
                let mut buf = BytesMut::with_capacity(
                    MAX_BATCH_BYTES.saturating_sub(self.bytes).max(data.len()),
                );
                buf.extend_from_slice(data);
                self.run = Some((offset, buf, vec![Bytes::copy_from_slice(&digest.0)]));
            }
        }
        self.bytes += data.len();
        if self.bytes >= MAX_BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Adds a whole chunk without copying it.
    fn whole_chunk(
        &mut self,
        offset: u64,
        data: Bytes,
        digests: Vec<Bytes>,
    ) -> Result<(), SyncError> {
        if self.bytes + data.len() > MAX_BATCH_BYTES {
            self.flush()?;
        }
        self.close_run();
        self.bytes += data.len();
        self.extents.push(pb::Extent {
            offset,
            data,
            checksums: digests,
            ..Default::default()
        });
        if self.bytes >= MAX_BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SyncError> {
        self.close_run();
        if self.extents.is_empty() {
            return Ok(());
        }
        for e in &mut self.extents {
            encode_extent(self.compressor.as_mut(), e);
            self.wire_bytes += e.data.len() as u64;
        }
        let msg = pb::SyncMessage {
            msg: Some(pb::sync_message::Msg::Extents(pb::ExtentBatch {
                extents: std::mem::take(&mut self.extents),
            })),
        };
        self.bytes = 0;
        self.last_sent = std::time::Instant::now();
        self.tx.blocking_send(msg).map_err(|_| SyncError::Closed)?;
        bulwark_common::failpoint::hit("agent-mid-sync");
        Ok(())
    }
}

/// Reader threads of a sync.
const READERS: usize = 4;
/// Reads in flight or done but not yet hashed, at most (each ≤ [`MAX_BATCH_BYTES`]).
const READ_AHEAD: usize = 6;

/// A read of the volume done by a reader thread: first block, block count, bytes.
type ReadResult = std::io::Result<(u64, u64, Bytes)>;
/// A read for a reader thread to do, and where its result goes.
type Job = (u64, u64, std::sync::mpsc::SyncSender<ReadResult>);

/// Cuts `ranges` into reads of at most `blocks_per_read` blocks (one batch each)
/// and sets `progress` to their total bytes.
fn plan_reads(
    geometry: Geometry,
    ranges: Vec<(u64, u64)>,
    blocks_per_read: u64,
    progress: &Progress,
) -> Vec<(u64, u64)> {
    let reads: Vec<(u64, u64)> = ranges
        .into_iter()
        .flat_map(|(first, count)| {
            (0..count.div_ceil(blocks_per_read)).map(move |i| {
                let f = first + i * blocks_per_read;
                (f, blocks_per_read.min(first + count - f))
            })
        })
        .collect();
    let total: u64 = reads
        .iter()
        .map(|(f, c)| geometry.offset_of(f + c).min(geometry.size_bytes) - geometry.offset_of(*f))
        .sum();
    progress.total.store(total, Ordering::Relaxed);
    progress.done.store(0, Ordering::Relaxed);
    reads
}

/// A reader thread: does the jobs of `jobs_rx` until the queue closes or `stop`.
fn read_jobs(
    jobs_rx: &std::sync::Mutex<std::sync::mpsc::Receiver<Job>>,
    stop: &AtomicBool,
    volume: &dyn BlockSource,
    geometry: Geometry,
) {
    loop {
        let job = jobs_rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok((first, count, reply)) = job else {
            return;
        };
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let start = geometry.offset_of(first);
        let len = (geometry.offset_of(first + count).min(geometry.size_bytes) - start) as usize;
        let _ = reply.send(volume.read_chunk(start, len).map(|c| (first, count, c)));
    }
}

/// Reads `ranges` (runs of blocks, in increasing order) and sends the blocks to send
/// as batches: with `digests`, those whose digest differs from the node's (the ranges
/// then cover the whole volume); without, all of them. With `compress`, extents
/// that shrink go as zstd frames.
#[allow(clippy::too_many_arguments)]
fn send_blocks(
    volume: &dyn BlockSource,
    geometry: Geometry,
    ranges: Vec<(u64, u64)>,
    mut digests: Option<DigestFeed>,
    tx: &mpsc::Sender<pb::SyncMessage>,
    stop: &AtomicBool,
    progress: &Progress,
    compress: Compress,
) -> Result<ScanStats, SyncError> {
    let bs = geometry.block_size as usize;
    let blocks_per_read = (MAX_BATCH_BYTES / bs).max(1) as u64;
    let mut batch = BatchBuilder::new(tx, compress)?;
    let mut stats = ScanStats::default();
    let read_err = |e| SyncError::Volume {
        path: volume.describe(),
        error: e,
    };
    let reads = plan_reads(geometry, ranges, blocks_per_read, progress);
    // Reader threads keep a few chunks ahead, several reads in flight at once (a
    // dirty plan's scattered blocks are as many random reads), so the disk and the
    // hashing below overlap; results are taken in order.
    let (jobs_tx, jobs_rx) = std::sync::mpsc::channel::<Job>();
    let jobs_rx = std::sync::Mutex::new(jobs_rx);
    let parent = tracing::Span::current();
    std::thread::scope(|scope| -> Result<(), SyncError> {
        for _ in 0..READERS.min(reads.len()) {
            let jobs_rx = &jobs_rx;
            let span = tracing::info_span!(parent: &parent, "read_extents");
            scope.spawn(move || {
                let _span = span.enter();
                read_jobs(jobs_rx, stop, volume, geometry);
            });
        }
        // Owned here, so that an early return drops the job queue and the readers end
        // before the scope waits for them.
        let jobs_tx = jobs_tx;
        let mut pending: std::collections::VecDeque<std::sync::mpsc::Receiver<ReadResult>> =
            std::collections::VecDeque::new();
        let mut next = 0usize;
        let mut changed: Vec<(usize, Digest)> = Vec::with_capacity(blocks_per_read as usize);
        for _ in 0..reads.len() {
            if stop.load(Ordering::Relaxed) {
                return Err(SyncError::Stopped);
            }
            while next < reads.len() && pending.len() < READ_AHEAD {
                let (tx, rx) = std::sync::mpsc::sync_channel(1);
                let (first, count) = reads[next];
                if jobs_tx.send((first, count, tx)).is_err() {
                    return Err(SyncError::ReadersStopped);
                }
                pending.push_back(rx);
                next += 1;
            }
            let result = pending.pop_front().map(|rx| rx.recv());
            let (first, count, chunk) = match result {
                Some(Ok(r)) => r.map_err(read_err)?,
                _ => return Err(SyncError::ReaderStopped),
            };
            if let Some(feed) = digests.as_mut() {
                feed.skip_to(first)?;
            }
            let start = geometry.offset_of(first);
            let len = chunk.len();
            changed.clear();
            for i in 0..count as usize {
                let data = &chunk[i * bs..((i + 1) * bs).min(len)];
                let digest = Digest::of(data);
                let send = match digests.as_mut() {
                    Some(feed) => {
                        let stored = feed.next()?;
                        !stored.matches(digest, stored == Digest::UNWRITTEN && is_zero(data))
                    }
                    None => true,
                };
                if send {
                    changed.push((i, digest));
                    stats.bytes_sent += data.len() as u64;
                }
            }
            stats.blocks_scanned += count;
            progress.done.fetch_add(len as u64, Ordering::Relaxed);
            stats.blocks_sent += changed.len() as u64;
            if changed.len() as u64 == count {
                let sums = changed
                    .iter()
                    .map(|(_, d)| Bytes::copy_from_slice(&d.0))
                    .collect();
                batch.whole_chunk(start, chunk, sums)?;
            } else {
                for &(i, digest) in &changed {
                    let data = &chunk[i * bs..((i + 1) * bs).min(len)];
                    batch.copy_block(start + (i * bs) as u64, data, digest)?;
                }
            }
            batch.keepalive()?;
        }
        // A bounded re-check reads only some blocks: take the rest of the node's
        // digests too, as a scan does, before the commit.
        if let Some(feed) = digests.as_mut() {
            feed.skip_to(geometry.block_count())?;
        }
        Ok(())
    })?;
    batch.flush()?;
    stats.wire_bytes = batch.wire_bytes;
    Ok(stats)
}

/// Runs one sync (or consistency check) of `source` to the node of `assignment`:
/// quiesce, freeze the tracker's changes, send, commit, release.
pub async fn sync_source(
    source: &SourceConfig,
    tracker: Arc<dyn Tracker>,
    state_dir: &std::path::Path,
    assignment: &pb::Assignment,
    node: NodeClient<TracedChannel>,
    opts: SyncOptions,
    progress: Arc<Progress>,
) -> Result<SyncOutcome, SyncError> {
    let started = Instant::now();
    let mut q = Quiesced::begin(&source.quiesce, &source.name, &source.path, state_dir)
        .await
        .map_err(SyncError::Quiesce)?;
    let mut result = attempt(
        source,
        &tracker,
        &mut q,
        assignment,
        node.clone(),
        opts,
        progress.clone(),
    )
    .await;
    let refused = match &result {
        Err(SyncError::Node {
            base_mismatch: true,
            status,
            ..
        }) => Some(format!(
            "the node refused the record's base point ({status})"
        )),
        Err(e @ SyncError::RecheckBase { .. }) => Some(e.to_string()),
        _ => None,
    };
    if let Some(why) = refused {
        // The record is relative to a point the node no longer has as its newest:
        // compare everything instead.
        tracker.mark_inconsistent(&why);
        if q.live_view_released() {
            q.downgrade(
                "the sync was retried as a consistency check after the application was released"
                    .into(),
            );
        }
        result = attempt(source, &tracker, &mut q, assignment, node, opts, progress).await;
    }
    q.finish().await;
    let mut o = result?;
    o.duration_ms = started.elapsed().as_millis() as u64;
    o.warnings = std::mem::take(&mut q.warnings);
    Ok(o)
}

/// One try: freeze, stream, commit; the tracker hears how it ended.
async fn attempt(
    source: &SourceConfig,
    tracker: &Arc<dyn Tracker>,
    q: &mut Quiesced,
    assignment: &pb::Assignment,
    node: NodeClient<TracedChannel>,
    opts: SyncOptions,
    progress: Arc<Progress>,
) -> Result<SyncOutcome, SyncError> {
    let check = opts.check || !tracker.consistent();
    let t = tracker.clone();
    let snapshot = q.snapshot.clone();
    let frozen = tokio::task::spawn_blocking(move || t.begin(check, snapshot.as_deref()))
        .await
        .map_err(SyncError::Task)??;
    // The tracker may have found its record untrustworthy only now (qcow2-bitmap
    // reads the image's bitmaps in `begin`): then this sync compares everything, and
    // its point is a check.
    let check = check || !tracker.consistent();
    let r = stream_sync(
        source,
        frozen.plan,
        frozen.reader,
        q,
        assignment,
        node,
        opts.deep && check,
        check,
        progress,
    )
    .await;
    let t = tracker.clone();
    let point = r.as_ref().ok().map(|o| o.point.id);
    let _ = tokio::task::spawn_blocking(move || match point {
        Some(p) => t.committed(p),
        None => t.failed(),
    })
    .await;
    r
}

/// Opens the sync stream with `begin` and waits for the node's `Ready` (whose
/// digests, if any, must cover the volume).
async fn open_sync(
    node: &mut NodeClient<TracedChannel>,
    node_name: &str,
    begin: pb::SyncBegin,
    geometry: Geometry,
) -> Result<
    (
        mpsc::Sender<pb::SyncMessage>,
        tonic::Streaming<pb::SyncReply>,
        pb::SyncReady,
    ),
    SyncError,
> {
    let (tx, rx) = mpsc::channel::<pb::SyncMessage>(4);
    let begin = pb::SyncMessage {
        msg: Some(pb::sync_message::Msg::Begin(begin)),
    };
    let _ = tx.send(begin).await;
    let mut replies = node
        .sync(ReceiverStream::new(rx))
        .await
        .map_err(|s| SyncError::node(node_name, s))?
        .into_inner();
    let ready = match replies
        .message()
        .await
        .map_err(|s| SyncError::node(node_name, s))?
    {
        Some(pb::SyncReply {
            msg: Some(pb::sync_reply::Msg::Ready(r)),
        }) => r,
        _ => return Err(SyncError::NotAccepted),
    };
    if ready.digest_count != 0 && ready.digest_count != geometry.block_count() {
        return Err(SyncError::DigestCount {
            offered: ready.digest_count,
            blocks: geometry.block_count(),
        });
    }
    Ok((tx, replies, ready))
}

/// Reads every reply of node `n`: digests go to `dtx`, the commit (or an error,
/// which also sets `stop`) ends it with the point and its damaged blocks.
async fn read_replies(
    mut replies: tonic::Streaming<pb::SyncReply>,
    dtx: mpsc::Sender<Result<Bytes, FeedError>>,
    stop: Arc<AtomicBool>,
    n: String,
) -> Result<(pb::Point, u64), SyncError> {
    loop {
        match replies.message().await {
            Ok(Some(pb::SyncReply {
                msg: Some(pb::sync_reply::Msg::Committed(c)),
            })) => {
                let damaged = c.damaged_blocks;
                return c.point.map(|p| (p, damaged)).ok_or(SyncError::NoPoint);
            }
            Ok(Some(pb::SyncReply {
                msg: Some(pb::sync_reply::Msg::Digests(d)),
            })) => {
                let _ = dtx.send(Ok(d.digests)).await;
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                stop.store(true, Ordering::Relaxed);
                let _ = dtx.send(Err(FeedError::StreamEnded)).await;
                return Err(SyncError::NotCommitted { node: n });
            }
            Err(s) => {
                stop.store(true, Ordering::Relaxed);
                let _ = dtx
                    .send(Err(FeedError::Node {
                        node: n.clone(),
                        message: s.message().to_string(),
                    }))
                    .await;
                return Err(SyncError::node(&n, s));
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn stream_sync(
    source: &SourceConfig,
    plan: Plan,
    volume: Arc<dyn BlockSource>,
    q: &mut Quiesced,
    assignment: &pb::Assignment,
    mut node: NodeClient<TracedChannel>,
    deep: bool,
    check: bool,
    progress: Arc<Progress>,
) -> Result<SyncOutcome, SyncError> {
    if volume.size_bytes() != assignment.size_bytes {
        return Err(SyncError::SizeChanged {
            path: volume.describe(),
            name: source.name.clone(),
            now: volume.size_bytes(),
            registered: assignment.size_bytes,
        });
    }
    let geometry =
        Geometry::new(volume.size_bytes(), source.block_size).map_err(SyncError::Geometry)?;
    let node_name = assignment.node.clone();
    let (want_digests, base_point) = match &plan {
        Plan::Scan | Plan::Recheck { .. } => (true, 0),
        Plan::Dirty { base, .. } => (false, *base),
    };
    let kind = if check {
        PointKind::Check.to_proto()
    } else {
        0
    };

    // The sync stream: Begin asks for the node's digests of its newest point when
    // every block is to be compared.
    let begin = pb::SyncBegin {
        source: source.name.clone(),
        epoch: assignment.epoch,
        size_bytes: geometry.size_bytes,
        block_size: geometry.block_size,
        base_point,
        consistency: q.consistency.to_proto(),
        kind,
        want_digests,
        deep,
    };
    let (tx, replies, ready) = open_sync(&mut node, &node_name, begin, geometry).await?;

    // One task reads every reply: digests go to the sender; progress is noted; the
    // commit (or an error) ends it. Reading continuously means the node never blocks.
    let (dtx, drx) = mpsc::channel::<Result<Bytes, FeedError>>(4);
    let stop = Arc::new(AtomicBool::new(false));
    let reply_task = tokio::spawn(read_replies(replies, dtx, stop.clone(), node_name.clone()));
    let (ranges, feed) = match plan_ranges(plan, &ready, geometry, drx, &node_name) {
        Ok(r) => r,
        Err(e) => {
            // Closing the stream without a commit makes the node roll back.
            drop(tx);
            reply_task.abort();
            return Err(e);
        }
    };
    let scan_tx = tx.clone();
    let stop_s = stop.clone();
    let compress = source.compress;
    let span = tracing::info_span!("send_extents", base_point = ready.base_point);
    let sent = tokio::task::spawn_blocking(move || {
        let _span = span.enter();
        send_blocks(
            volume.as_ref(),
            geometry,
            ranges,
            feed,
            &scan_tx,
            &stop_s,
            &progress,
            compress,
        )
    })
    .await
    .map_err(SyncError::Task);
    let stats = match sent.and_then(|r| r) {
        Ok(s) => s,
        Err(e @ SyncError::Volume { .. }) => {
            // Closing the stream without a commit makes the node roll back.
            drop(tx);
            reply_task.abort();
            return Err(e);
        }
        Err(e) => {
            drop(tx);
            // The sender stopped because the node ended the sync: its reason is the
            // one to report.
            return match reply_task.await {
                Ok(Err(node_err)) => Err(node_err),
                _ => Err(e),
            };
        }
    };
    // Everything is read: the application may go on (a snapshot released it already).
    q.release().await;
    let commit = pb::SyncMessage {
        msg: Some(pb::sync_message::Msg::Commit(pb::SyncCommit {
            blocks_scanned: stats.blocks_scanned,
            blocks_sent: stats.blocks_sent,
            bytes_sent: stats.bytes_sent,
            consistency: q.consistency.to_proto(),
        })),
    };
    let _ = tx.send(commit).await;
    let (point, damaged_blocks) = reply_task
        .instrument(tracing::info_span!("commit"))
        .await
        .map_err(SyncError::Task)??;
    tracing::Span::current().record("point", point.id);
    drop(tx);
    Ok(committed(point, damaged_blocks, &stats))
}

/// Runs of blocks to read: (first block, count), in order.
type Ranges = Vec<(u64, u64)>;

/// The runs of blocks `plan` reads, and the node's digests to compare them with (a
/// scan's, a re-check's). A re-check needs the node's newest point to be at least the
/// record's base.
fn plan_ranges(
    plan: Plan,
    ready: &pb::SyncReady,
    geometry: Geometry,
    drx: mpsc::Receiver<Result<Bytes, FeedError>>,
    node_name: &str,
) -> Result<(Ranges, Option<DigestFeed>), SyncError> {
    let feed = DigestFeed {
        rx: drx,
        remaining: ready.digest_count,
        buf: Bytes::new(),
        pos: 0,
        block: 0,
    };
    Ok(match plan {
        Plan::Scan => (vec![(0, geometry.block_count())], Some(feed)),
        Plan::Recheck { since, .. } if ready.base_point < since => {
            return Err(SyncError::RecheckBase {
                node: node_name.to_string(),
                since,
                newest: ready.base_point,
            });
        }
        Plan::Recheck { blocks, .. } => (blocks.runs().collect(), Some(feed)),
        Plan::Dirty { blocks, .. } => (blocks.runs().collect(), None),
    })
}

/// What a committed sync did, as far as sending goes (the caller adds the time
/// and the quiesce warnings).
fn committed(point: pb::Point, damaged_blocks: u64, stats: &ScanStats) -> SyncOutcome {
    SyncOutcome {
        consistency: Consistency::from_proto(point.consistency),
        point,
        bytes_sent: stats.bytes_sent,
        wire_bytes: stats.wire_bytes,
        blocks_sent: stats.blocks_sent,
        blocks_scanned: stats.blocks_scanned,
        duration_ms: 0,
        damaged_blocks,
        warnings: Vec::new(),
        files_sent: 0,
        bytes_read: 0,
    }
}
