//! One sync of a volume with the `fingerprint` tracker.
//!
//! The node keeps the BLAKE3 digest of every block of the newest point. Within the
//! sync stream (which holds the source's lock on the node from start to end) the node
//! sends those digests in block order while the agent reads the volume in the same
//! order, hashes each block, and sends only the blocks whose digest differs. The host
//! keeps no change log and no local digest file that could drift from the replica:
//! the comparison is always against what the node holds, so a lost acknowledgement or
//! an interrupted sync never makes the next one skip a block.
//!
//! Flow: a blocking scanner thread (read, hash, compare, batch ≤ 4 MiB) feeds a
//! bounded channel into the gRPC request stream; one async task reads every reply
//! (digests for the scanner, progress, the commit). Memory stays at a few batches
//! whatever the volume size.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bulwark_common::block::{DIGEST_LEN, Digest, Geometry, MAX_BATCH_BYTES, is_zero};
use bulwark_common::point::Consistency;
use bulwark_proto as pb;
use bulwark_proto::node_client::NodeClient;
use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::config::SourceConfig;
use crate::volume::Volume;

/// What a finished sync did.
#[derive(Debug, Clone)]
pub struct SyncOutcome {
    pub point: pb::Point,
    pub bytes_sent: u64,
    pub blocks_sent: u64,
    pub blocks_scanned: u64,
    pub duration_ms: u64,
}

/// A sync that failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("cannot read {path}: {error}")]
    Volume { path: String, error: std::io::Error },
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
    #[error("{0}")]
    Protocol(String),
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

/// The node's digests of its newest point, in block order, for the scanner.
struct DigestFeed {
    rx: mpsc::Receiver<Result<Bytes, String>>,
    /// Digests still to come; none at all when the source has no point yet.
    remaining: u64,
    buf: Bytes,
    pos: usize,
}

impl DigestFeed {
    /// The stored digest of the next block (`UNWRITTEN` when the node has none).
    fn next(&mut self) -> Result<Digest, String> {
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
                None => return Err("the node's digests ended early".into()),
            }
        }
        let d = Digest::from_slice(&self.buf[self.pos..self.pos + DIGEST_LEN])
            .unwrap_or(Digest::UNWRITTEN);
        self.pos += DIGEST_LEN;
        Ok(d)
    }
}

struct ScanStats {
    blocks_scanned: u64,
    blocks_sent: u64,
    bytes_sent: u64,
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
}

impl BatchBuilder<'_> {
    fn close_run(&mut self) {
        if let Some((offset, data, checksums)) = self.run.take() {
            self.extents.push(pb::Extent {
                offset,
                data: data.freeze(),
                checksums,
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
        let msg = pb::SyncMessage {
            msg: Some(pb::sync_message::Msg::Extents(pb::ExtentBatch {
                extents: std::mem::take(&mut self.extents),
            })),
        };
        self.bytes = 0;
        self.tx
            .blocking_send(msg)
            .map_err(|_| SyncError::Protocol("the node closed the sync stream".into()))
    }
}

/// Reads the volume in order, compares, and sends the changed blocks as batches.
fn scan(
    volume: &Volume,
    geometry: Geometry,
    mut digests: DigestFeed,
    tx: &mpsc::Sender<pb::SyncMessage>,
    stop: &AtomicBool,
) -> Result<ScanStats, SyncError> {
    let bs = geometry.block_size as usize;
    let blocks_per_read = (MAX_BATCH_BYTES / bs).max(1) as u64;
    let total = geometry.block_count();
    let mut batch = BatchBuilder {
        extents: Vec::new(),
        run: None,
        bytes: 0,
        tx,
    };
    let mut stats = ScanStats {
        blocks_scanned: 0,
        blocks_sent: 0,
        bytes_sent: 0,
    };
    let read_err = |e| SyncError::Volume {
        path: volume.path().display().to_string(),
        error: e,
    };
    // A reader thread keeps a few chunks ahead, so the disk (direct reads wait on
    // it) and the hashing below overlap.
    let (chunks_tx, chunks_rx) =
        std::sync::mpsc::sync_channel::<std::io::Result<(u64, u64, Bytes)>>(3);
    std::thread::scope(|scope| -> Result<(), SyncError> {
        scope.spawn(move || {
            let mut first = 0u64;
            while first < total && !stop.load(Ordering::Relaxed) {
                let count = blocks_per_read.min(total - first);
                let start = geometry.offset_of(first);
                let len =
                    (geometry.offset_of(first + count).min(geometry.size_bytes) - start) as usize;
                let chunk = volume.read_chunk(start, len).map(|c| (first, count, c));
                let failed = chunk.is_err();
                if chunks_tx.send(chunk).is_err() || failed {
                    return;
                }
                first += count;
            }
        });
        // Owned here, so that an early return drops it and a reader blocked on a full
        // channel wakes up before the scope waits for it.
        let chunks_rx = chunks_rx;
        let mut changed: Vec<(usize, Digest)> = Vec::with_capacity(blocks_per_read as usize);
        let mut expected = 0u64;
        while expected < total {
            if stop.load(Ordering::Relaxed) {
                return Err(SyncError::Protocol("sync stopped".into()));
            }
            let (first, count, chunk) = match chunks_rx.recv() {
                Ok(r) => r.map_err(read_err)?,
                Err(_) => return Err(SyncError::Protocol("the volume reader stopped".into())),
            };
            debug_assert_eq!(first, expected);
            let start = geometry.offset_of(first);
            let len = chunk.len();
            changed.clear();
            for i in 0..count as usize {
                let data = &chunk[i * bs..((i + 1) * bs).min(len)];
                let stored = digests.next().map_err(SyncError::Protocol)?;
                let digest = Digest::of(data);
                if !stored.matches(digest, stored == Digest::UNWRITTEN && is_zero(data)) {
                    changed.push((i, digest));
                    stats.bytes_sent += data.len() as u64;
                }
            }
            stats.blocks_scanned += count;
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
            expected = first + count;
        }
        Ok(())
    })?;
    batch.flush()?;
    Ok(stats)
}

/// Runs one sync of `source` to the node of `assignment`.
pub async fn sync_volume(
    source: &SourceConfig,
    assignment: &pb::Assignment,
    mut node: NodeClient<Channel>,
) -> Result<SyncOutcome, SyncError> {
    let started = Instant::now();
    let path = source.path.clone();
    let volume = tokio::task::spawn_blocking(move || Volume::open(&path))
        .await
        .map_err(|e| SyncError::Protocol(e.to_string()))?
        .map_err(|e| SyncError::Volume {
            path: source.path.display().to_string(),
            error: e,
        })?;
    if volume.size_bytes() != assignment.size_bytes {
        return Err(SyncError::SizeChanged {
            path: source.path.display().to_string(),
            name: source.name.clone(),
            now: volume.size_bytes(),
            registered: assignment.size_bytes,
        });
    }
    let geometry = Geometry::new(volume.size_bytes(), source.block_size)
        .map_err(|e| SyncError::Protocol(e.to_string()))?;
    let node_name = assignment.node.clone();

    // The sync stream: Begin asks for the node's digests of its newest point.
    let (tx, rx) = mpsc::channel::<pb::SyncMessage>(4);
    let begin = pb::SyncMessage {
        msg: Some(pb::sync_message::Msg::Begin(pb::SyncBegin {
            source: source.name.clone(),
            epoch: assignment.epoch,
            size_bytes: geometry.size_bytes,
            block_size: geometry.block_size,
            base_point: 0,
            consistency: Consistency::Crash.to_proto(),
            kind: 0,
            want_digests: true,
        })),
    };
    let _ = tx.send(begin).await;
    let mut replies = node
        .sync(ReceiverStream::new(rx))
        .await
        .map_err(|s| SyncError::node(&node_name, s))?
        .into_inner();
    let ready = match replies
        .message()
        .await
        .map_err(|s| SyncError::node(&node_name, s))?
    {
        Some(pb::SyncReply {
            msg: Some(pb::sync_reply::Msg::Ready(r)),
        }) => r,
        _ => {
            return Err(SyncError::Protocol(
                "the node did not accept the sync".into(),
            ));
        }
    };
    if ready.digest_count != 0 && ready.digest_count != geometry.block_count() {
        return Err(SyncError::Protocol(format!(
            "the node offers {} digests for a volume of {} blocks",
            ready.digest_count,
            geometry.block_count()
        )));
    }

    // One task reads every reply: digests go to the scanner; progress is noted; the
    // commit (or an error) ends it. Reading continuously means the node never blocks.
    let (dtx, drx) = mpsc::channel::<Result<Bytes, String>>(4);
    let stop = Arc::new(AtomicBool::new(false));
    let stop_r = stop.clone();
    let n = node_name.clone();
    let reply_task = tokio::spawn(async move {
        loop {
            match replies.message().await {
                Ok(Some(pb::SyncReply {
                    msg: Some(pb::sync_reply::Msg::Committed(c)),
                })) => {
                    return c
                        .point
                        .ok_or_else(|| SyncError::Protocol("commit without a point".into()));
                }
                Ok(Some(pb::SyncReply {
                    msg: Some(pb::sync_reply::Msg::Digests(d)),
                })) => {
                    let _ = dtx.send(Ok(d.digests)).await;
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    stop_r.store(true, Ordering::Relaxed);
                    let _ = dtx.send(Err("the sync stream ended".into())).await;
                    return Err(SyncError::Protocol(format!(
                        "node {n} ended the sync without committing"
                    )));
                }
                Err(s) => {
                    stop_r.store(true, Ordering::Relaxed);
                    let _ = dtx.send(Err(format!("node {n}: {}", s.message()))).await;
                    return Err(SyncError::node(&n, s));
                }
            }
        }
    });
    let feed = DigestFeed {
        rx: drx,
        remaining: ready.digest_count,
        buf: Bytes::new(),
        pos: 0,
    };
    let scan_tx = tx.clone();
    let stop_s = stop.clone();
    let scanned =
        tokio::task::spawn_blocking(move || scan(&volume, geometry, feed, &scan_tx, &stop_s))
            .await
            .map_err(|e| SyncError::Protocol(e.to_string()));
    let stats = match scanned.and_then(|r| r) {
        Ok(s) => s,
        Err(e @ SyncError::Volume { .. }) => {
            // Closing the stream without a commit makes the node roll back.
            drop(tx);
            reply_task.abort();
            return Err(e);
        }
        Err(e) => {
            drop(tx);
            // The scanner stopped because the node ended the sync: its reason is the
            // one to report.
            return match reply_task.await {
                Ok(Err(node_err)) => Err(node_err),
                _ => Err(e),
            };
        }
    };
    let commit = pb::SyncMessage {
        msg: Some(pb::sync_message::Msg::Commit(pb::SyncCommit {
            blocks_scanned: stats.blocks_scanned,
            blocks_sent: stats.blocks_sent,
            bytes_sent: stats.bytes_sent,
        })),
    };
    let _ = tx.send(commit).await;
    let point = reply_task
        .await
        .map_err(|e| SyncError::Protocol(e.to_string()))??;
    drop(tx);
    Ok(SyncOutcome {
        point,
        bytes_sent: stats.bytes_sent,
        blocks_sent: stats.blocks_sent,
        blocks_scanned: stats.blocks_scanned,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}
