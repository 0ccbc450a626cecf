//! One sync of a volume with the `fingerprint` tracker.
//!
//! The node keeps the BLAKE3 digest of every block of the newest point; the agent
//! streams those digests in block order while it reads the volume in the same order,
//! hashes each block, and sends only the blocks whose digest differs. The host keeps
//! no change log and no local digest file that could drift from the replica: the
//! comparison is always against what the node holds, so a lost or interrupted sync
//! never makes the next one skip a block. The sync names the point it compared
//! against (`base_point`), and the node refuses it if its newest point is another.
//!
//! Flow: a blocking scanner thread (read, hash, compare, batch ≤ 4 MiB) feeds a
//! bounded channel into the gRPC request stream; an async task drains the node's
//! progress replies. Memory stays at a few batches whatever the volume size.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bulwark_common::block::{DIGEST_LEN, Digest, Geometry, MAX_BATCH_BYTES, is_zero};
use bulwark_common::point::{Consistency, PointKind};
use bulwark_proto as pb;
use bulwark_proto::node_client::NodeClient;
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
    #[error("cannot read {path}: {source}")]
    Volume {
        path: String,
        source: std::io::Error,
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

/// Streams the node's digests of the newest point to the scanner.
struct DigestFeed {
    rx: mpsc::Receiver<Result<Vec<u8>, String>>,
    buf: Vec<u8>,
    pos: usize,
}

impl DigestFeed {
    /// The stored digest of the next block; `UNWRITTEN` past what the node sent.
    fn next(&mut self) -> Result<Digest, String> {
        while self.pos + DIGEST_LEN > self.buf.len() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => {
                    self.buf = chunk;
                    self.pos = 0;
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(Digest::UNWRITTEN),
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
    let mut buf = vec![0u8; blocks_per_read as usize * bs];
    let mut batch: Vec<pb::Extent> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut stats = ScanStats {
        blocks_scanned: 0,
        blocks_sent: 0,
        bytes_sent: 0,
    };
    let read_err = |e| SyncError::Volume {
        path: volume.path().display().to_string(),
        source: e,
    };
    let flush = |batch: &mut Vec<pb::Extent>, batch_bytes: &mut usize| -> Result<(), SyncError> {
        if batch.is_empty() {
            return Ok(());
        }
        let msg = pb::SyncMessage {
            msg: Some(pb::sync_message::Msg::Extents(pb::ExtentBatch {
                extents: std::mem::take(batch),
            })),
        };
        *batch_bytes = 0;
        tx.blocking_send(msg)
            .map_err(|_| SyncError::Protocol("the node closed the sync stream".into()))
    };
    let mut first = 0u64;
    while first < total {
        if stop.load(Ordering::Relaxed) {
            return Err(SyncError::Protocol("sync stopped".into()));
        }
        let count = blocks_per_read.min(total - first);
        let start = geometry.offset_of(first);
        let len: u64 = geometry.offset_of(first + count).min(geometry.size_bytes) - start;
        let chunk = &mut buf[..len as usize];
        volume.read_at(chunk, start).map_err(read_err)?;
        for i in 0..count {
            let block = first + i;
            let off = (i as usize) * bs;
            let data = &chunk[off..(off + bs).min(chunk.len())];
            let stored = digests.next().map_err(SyncError::Protocol)?;
            let digest = Digest::of(data);
            stats.blocks_scanned += 1;
            if stored.matches(digest, stored == Digest::UNWRITTEN && is_zero(data)) {
                continue;
            }
            stats.blocks_sent += 1;
            stats.bytes_sent += data.len() as u64;
            let offset = geometry.offset_of(block);
            match batch.last_mut() {
                Some(e) if e.offset + e.data.len() as u64 == offset => {
                    e.data.extend_from_slice(data);
                    e.checksums.push(digest.0.to_vec());
                }
                _ => batch.push(pb::Extent {
                    offset,
                    data: data.to_vec(),
                    checksums: vec![digest.0.to_vec()],
                }),
            }
            batch_bytes += data.len();
            if batch_bytes >= MAX_BATCH_BYTES {
                flush(&mut batch, &mut batch_bytes)?;
            }
        }
        first += count;
    }
    flush(&mut batch, &mut batch_bytes)?;
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
            source: e,
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

    // The node's digests of its newest point.
    let mut digest_stream = node
        .get_digests(pb::GetDigestsRequest {
            source: source.name.clone(),
            epoch: assignment.epoch,
        })
        .await
        .map_err(|s| SyncError::node(&node_name, s))?
        .into_inner();
    let first = digest_stream
        .message()
        .await
        .map_err(|s| SyncError::node(&node_name, s))?
        .ok_or_else(|| SyncError::Protocol("the node sent no digests".into()))?;
    if first.size_bytes != geometry.size_bytes || first.block_size != geometry.block_size {
        return Err(SyncError::Protocol(format!(
            "the node holds {} as {} bytes in blocks of {}, this volume is {} bytes in blocks of {}",
            source.name,
            first.size_bytes,
            first.block_size,
            geometry.size_bytes,
            geometry.block_size
        )));
    }
    let base_point = first.newest_point;
    let (dtx, drx) = mpsc::channel::<Result<Vec<u8>, String>>(4);
    let _ = dtx.send(Ok(first.digests)).await;
    let n = node_name.clone();
    let digest_task = tokio::spawn(async move {
        loop {
            match digest_stream.message().await {
                Ok(Some(c)) => {
                    if dtx.send(Ok(c.digests)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(s) => {
                    let _ = dtx
                        .send(Err(format!(
                            "node {n}: digest stream broke: {}",
                            s.message()
                        )))
                        .await;
                    return;
                }
            }
        }
    });

    // The sync stream.
    let (tx, rx) = mpsc::channel::<pb::SyncMessage>(4);
    let begin = pb::SyncMessage {
        msg: Some(pb::sync_message::Msg::Begin(pb::SyncBegin {
            source: source.name.clone(),
            epoch: assignment.epoch,
            size_bytes: geometry.size_bytes,
            block_size: geometry.block_size,
            base_point,
            consistency: Consistency::Crash.to_proto(),
            kind: if base_point == 0 {
                PointKind::Full
            } else {
                PointKind::Incremental
            }
            .to_proto(),
        })),
    };
    let _ = tx.send(begin).await;
    let mut replies = node
        .sync(ReceiverStream::new(rx))
        .await
        .map_err(|s| SyncError::node(&node_name, s))?
        .into_inner();
    match replies
        .message()
        .await
        .map_err(|s| SyncError::node(&node_name, s))?
    {
        Some(pb::SyncReply {
            msg: Some(pb::sync_reply::Msg::Ready(_)),
        }) => {}
        _ => {
            return Err(SyncError::Protocol(
                "the node did not accept the sync".into(),
            ));
        }
    }

    // Drain replies while the scanner runs, so the node never blocks on progress.
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
                Ok(Some(_)) => {}
                Ok(None) => {
                    stop_r.store(true, Ordering::Relaxed);
                    return Err(SyncError::Protocol(format!(
                        "node {n} ended the sync without committing"
                    )));
                }
                Err(s) => {
                    stop_r.store(true, Ordering::Relaxed);
                    return Err(SyncError::node(&n, s));
                }
            }
        }
    });

    let feed = DigestFeed {
        rx: drx,
        buf: Vec::new(),
        pos: 0,
    };
    let scan_tx = tx.clone();
    let stop_s = stop.clone();
    let scanned =
        tokio::task::spawn_blocking(move || scan(&volume, geometry, feed, &scan_tx, &stop_s))
            .await
            .map_err(|e| SyncError::Protocol(e.to_string()));
    digest_task.abort();
    let stats = match scanned.and_then(|r| r) {
        Ok(s) => s,
        Err(e) => {
            drop(tx);
            // The node's own error explains more than "stream closed".
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
