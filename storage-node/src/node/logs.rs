//! Log ships and log restores: the node's side of log sources (see
//! [`crate::store::logs`]). A ship holds the source's write lock from Begin to the
//! end, like a sync; the store work runs on one blocking thread that owns the ship.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bulwark_common::tls::Identity;
use bulwark_proto as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use tracing::Instrument;

use super::access::not_moving;
use super::{BoxStream, NodeService, StreamGuard, blocking, count_sync};
use crate::error::NodeError;
use crate::node::admission::{Sender, TurnKind, next_within};
use crate::store::{LogFileMeta, LogShip};
use crate::wire::{PointRef, ShipStart, point_to_proto, policy_from_proto};
use bulwark_common::name::SourceName;

/// Manifest entries per reply message.
const MANIFEST_CHUNK: usize = 2000;

fn hex_to_bytes(h: &str) -> bytes::Bytes {
    blake3::Hash::from_hex(h)
        .map(|x| bytes::Bytes::copy_from_slice(x.as_bytes()))
        .unwrap_or_default()
}

fn file_state(f: &LogFileMeta) -> pb::LogFileState {
    pb::LogFileState {
        name: f.name.clone(),
        length: f.length(),
        head_hash: hex_to_bytes(&f.head_hash),
        tail_hash: hex_to_bytes(&f.tail_hash),
        dev: f.dev,
        ino: f.ino,
        mtime_ns: f.mtime_ns,
        generation: f.generation,
        gone: f.gone_at != 0,
    }
}

impl NodeService {
    /// Checks the caller may ship `source` now: owner, assigned here, current epoch,
    /// not moving.
    async fn authorize_ship(
        &self,
        caller: &Identity,
        source: &SourceName,
        epoch: u64,
    ) -> Result<pb::Assignment, NodeError> {
        let a = self.authorize(caller, source, Some(epoch)).await?;
        not_moving(&a, source, "ship")?;
        Ok(a)
    }

    /// Runs a log ship that opened with `start`, reading the rest of `inbound`: the
    /// manifest and `LogReady` go out, then a task applies the files.
    pub async fn ship_log(
        self: Arc<Self>,
        caller: Identity,
        start: ShipStart,
        inbound: Streaming<pb::LogMessage>,
    ) -> Result<BoxStream<pb::LogReply>, NodeError> {
        let ShipStart { source, epoch } = start;
        self.authorize_ship(&caller, &source, epoch).await?;
        let agent_turn = self.admission.agent_turn(&caller.name, TurnKind::Write)?;
        let source_turn = self.admission.source_turn(&source)?;
        let lock = self.locks.get(&source).write_owned().await;
        // The assignment may have changed while this waited.
        let a = self.authorize_ship(&caller, &source, epoch).await?;
        let policy = a.policy.as_ref().map(policy_from_proto);
        let store = self.store.clone();
        let name = source.clone();
        let ship = blocking(move || store.begin_log_ship(&name, policy)).await??;
        let manifest: Vec<pb::LogFileState> = ship.manifest().into_iter().map(file_state).collect();
        let (tx, rx) = mpsc::channel(8);
        for part in manifest.chunks(MANIFEST_CHUNK) {
            let msg = pb::LogReply {
                msg: Some(pb::log_reply::Msg::Manifest(pb::LogManifest {
                    files: part.to_vec(),
                })),
            };
            if tx.send(Ok(msg)).await.is_err() {
                return Err(Status::cancelled("the agent went away").into());
            }
        }
        let ready = pb::LogReply {
            msg: Some(pb::log_reply::Msg::Ready(pb::LogReady {
                base_point: ship.new_point() - 1,
            })),
        };
        let _ = tx.send(Ok(ready)).await;
        let span = tracing::info_span!("ship", source = %source, point = ship.new_point(), agent = %caller.name);
        let guard = StreamGuard::new(&self.live_streams);
        tokio::spawn(
            async move {
                let _guard = guard;
                let _turns = (agent_turn, source_turn);
                self.run_ship(ship, inbound, source.to_string(), lock, tx)
                    .await;
            }
            .instrument(span),
        );
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    /// The spawned part of a ship: hands the messages to the ship's worker until
    /// LogCommit, then applies retention and answers (or reports the failure).
    async fn run_ship(
        &self,
        ship: LogShip,
        mut inbound: Streaming<pb::LogMessage>,
        source: String,
        lock: tokio::sync::OwnedRwLockWriteGuard<()>,
        tx: mpsc::Sender<Result<pb::LogReply, Status>>,
    ) {
        use pb::log_message::Msg;
        let idle = self.idle();
        let started = std::time::Instant::now();
        let (mtx, mrx) = mpsc::channel::<Msg>(4);
        let worker = spawn_ship_worker(ship, mrx, self.ingested.clone());
        let received = async {
            loop {
                match next_within(&mut inbound, idle, "log ship").await {
                    Ok(Some(pb::LogMessage { msg: Some(m) })) => {
                        let commit = matches!(m, Msg::Commit(_));
                        if mtx.send(m).await.is_err() || commit {
                            return Ok(());
                        }
                    }
                    Ok(Some(_)) => {
                        return Err(Status::invalid_argument("empty LogMessage"));
                    }
                    Ok(None) => {
                        return Err(Status::aborted(
                            "the ship ended before LogCommit; nothing was kept",
                        ));
                    }
                    Err(s) => return Err(s),
                }
            }
        }
        .await;
        drop(mtx);
        let outcome = match worker.await {
            Ok(r) => r,
            Err(e) => Err(Status::internal(format!("log ship worker failed: {e}"))),
        };
        let result = match (received, outcome) {
            (_, Err(s)) | (Err(s), _) => Err(s),
            (Ok(()), Ok(point)) => Ok(point),
        };
        match result {
            Ok(point) => {
                count_sync(&source, Some(&point), started);
                self.after_commit(&source).await;
                drop(lock);
                tracing::info!(
                    point = point.id,
                    bytes = point.bytes_changed,
                    files = point.files_changed,
                    "log point committed"
                );
                let _ = tx
                    .send(Ok(pb::LogReply {
                        msg: Some(pb::log_reply::Msg::Committed(pb::LogCommitted {
                            point: Some(point_to_proto(&point)),
                        })),
                    }))
                    .await;
            }
            Err(status) => {
                tracing::warn!("log ship failed: {}", status.message());
                self.after_failure(&source, &status, started);
                drop(lock);
                let _ = tx.send(Err(status)).await;
            }
        }
    }

    /// Streams log point `at.point` (0: the newest) of `at.source` to `caller`.
    pub async fn restore_log(
        self: Arc<Self>,
        caller: Identity,
        at: PointRef,
    ) -> Result<BoxStream<pb::LogChunk>, NodeError> {
        let PointRef { source, point } = at;
        let (lock, turn) = self.authorize_read(&caller, &source, point).await?;
        let store = self.store.clone();
        let name = source.to_string();
        let (point, files) = blocking(move || store.log_restore(&name, point)).await??;
        tracing::info!(source = %source, point = point.id, files = files.len(), agent = %caller.name, "log restore started");
        let (tx, rx) = mpsc::channel(4);
        let tx = Sender::new(tx, self.idle());
        let guard = StreamGuard::new(&self.live_streams);
        tokio::task::spawn_blocking(move || {
            let _lock = lock;
            let _guard = guard;
            let _turn = turn;
            let send = |m: pb::log_chunk::Msg| tx.send(Ok(pb::LogChunk { msg: Some(m) }));
            if !send(pb::log_chunk::Msg::Point(point_to_proto(&point))) {
                return;
            }
            for f in files {
                let header = pb::LogFileHeader {
                    name: f.name.clone(),
                    length: f.length(),
                    mtime_ns: f.mtime_ns,
                };
                if !send(pb::log_chunk::Msg::File(header)) {
                    return;
                }
                // Each piece as the host had it: decoded, checked (see `LogCopy`).
                let copy = match f.open() {
                    Ok(x) => x,
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(format!("log file {}: {e}", f.name))));
                        return;
                    }
                };
                for p in &f.pieces {
                    let buf = match copy.read(p) {
                        Ok(b) => b,
                        Err(e) => {
                            let _ = tx.send(Err(Status::internal(e.to_string())));
                            return;
                        }
                    };
                    let data = pb::LogData {
                        data: buf.into(),
                        checksum: hex_to_bytes(&p.hash),
                    };
                    if !send(pb::log_chunk::Msg::Data(data)) {
                        return;
                    }
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

/// Owns the ship on a blocking thread: applies each message in order; commits on
/// LogCommit; anything else that ends it rolls it back (the ship's drop).
fn spawn_ship_worker(
    mut ship: LogShip,
    mut rx: mpsc::Receiver<pb::log_message::Msg>,
    ingested: Arc<std::sync::atomic::AtomicU64>,
) -> tokio::task::JoinHandle<Result<crate::store::PointMeta, Status>> {
    use pb::log_message::Msg;
    let span = tracing::info_span!("apply");
    tokio::task::spawn_blocking(move || {
        let _span = span.enter();
        while let Some(m) = rx.blocking_recv() {
            match m {
                Msg::File(f) => ship.start_file(
                    &f.name, f.offset, f.restart, f.dev, f.ino, f.mtime_ns, &f.reason,
                )?,
                Msg::Data(d) => {
                    if d.data.len() > bulwark_common::block::MAX_BATCH_BYTES {
                        return Err(Status::invalid_argument(format!(
                            "a log piece of {} bytes; pieces hold at most {}",
                            d.data.len(),
                            bulwark_common::block::MAX_BATCH_BYTES
                        )));
                    }
                    ship.append(&d.data, &d.checksum)?;
                    ingested.fetch_add(d.data.len() as u64, Ordering::Relaxed);
                }
                Msg::Commit(c) => {
                    ship.gone(&c.gone);
                    let _span = tracing::info_span!("commit").entered();
                    return Ok(ship.commit()?.0);
                }
                Msg::Begin(_) => {
                    return Err(Status::invalid_argument("LogBegin sent twice in one ship"));
                }
            }
        }
        Err(Status::aborted(
            "the ship ended before LogCommit; nothing was kept",
        ))
    })
}
