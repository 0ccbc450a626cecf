//! Moves of a source between nodes: the old node exports (records, then its files,
//! holes left out) only to the node the source is moving to; the new node, told by
//! the coordinator, dials the old one as that node by name, imports under the
//! source's write lock and verifies everything before it commits the copy.

use std::sync::Arc;

use bulwark_common::name::SourceName;
use bulwark_common::tls::{Identity, Role};
use bulwark_proto as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::{BoxStream, NodeService, StreamGuard, blocking};
use crate::error::{NodeError, refused};
use crate::node::admission::Sender;
use crate::store::{ExportMeta, Import, StoreError};
use crate::wire::{ImportFrom, ProtocolError};

/// An export's chunks of file data, at most.
const CHUNK: usize = 1 << 20;

/// The error of an import whose exporting node sent nothing for the idle timeout.
fn exporter_idle(node: &str, idle: std::time::Duration) -> Status {
    refused("idle");
    Status::deadline_exceeded(format!(
        "node {node} sent nothing of the export for {} s (stream_idle_timeout); the import was aborted and nothing of it kept",
        idle.as_secs()
    ))
}

/// Names the exporting node in the status it answered with.
fn at_peer(node: &str) -> impl Fn(Status) -> Status + '_ {
    move |s| Status::new(s.code(), format!("node {node}: {}", s.message()))
}

/// Sends one file of an export, in chunks; `Ok(false)` when the receiver is gone.
fn send_file(
    name: &str,
    path: &std::path::Path,
    send: &impl Fn(pb::export_chunk::Msg) -> bool,
) -> std::io::Result<bool> {
    let f = std::fs::File::open(path)?;
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
                name: name.to_string(),
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
}

impl NodeService {
    /// Exports `source` to `caller`, the node the source is moving to.
    pub async fn export(
        self: Arc<Self>,
        caller: Identity,
        source: SourceName,
    ) -> Result<BoxStream<pb::ExportChunk>, NodeError> {
        let a = self.assignment(&source).await?;
        if a.node != self.name || a.moving_to != caller.name {
            tracing::warn!(%caller, %source, "export refused: no move of the source to the caller");
            return Err(NodeError::NotMovingTo {
                source_name: source.to_string(),
                from: self.name.clone(),
                to: caller.name.clone(),
            });
        }
        let lock = self.locks.get(&source).read_owned().await;
        let store = self.store.clone();
        let name = source.clone();
        let (meta, files) = blocking(move || store.export(&name)).await??;
        let meta = serde_json::to_vec(&meta)
            .map_err(|e| NodeError::Internal(format!("cannot encode the source's records: {e}")))?;
        let (tx, rx) = mpsc::channel(4);
        let tx = Sender::new(tx, self.idle());
        let guard = StreamGuard::new(&self.live_streams);
        tracing::info!(%source, to = %caller.name, "export for a move started");
        tokio::task::spawn_blocking(move || {
            let _lock = lock;
            let _guard = guard;
            let send = |msg: pb::export_chunk::Msg| tx.send(Ok(pb::ExportChunk { msg: Some(msg) }));
            if !send(pb::export_chunk::Msg::Meta(meta.into())) {
                return;
            }
            for (name, path) in files {
                match send_file(&name, &path, &send) {
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
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    /// Copies `from.source` in from the node moving it here, verifies it and commits
    /// it; nothing of it is kept if anything fails.
    pub async fn import(&self, from: ImportFrom) -> Result<pb::ImportResponse, NodeError> {
        let idle = self.idle();
        let mut stream = self.dial_exporter(&from).await?;
        let _lock = self.locks.get(&from.source).write_owned().await;
        let first = tokio::time::timeout(idle, stream.message())
            .await
            .map_err(|_| exporter_idle(&from.node, idle))?;
        let meta = match first.map_err(at_peer(&from.node))? {
            Some(pb::ExportChunk {
                msg: Some(pb::export_chunk::Msg::Meta(m)),
            }) => serde_json::from_slice::<ExportMeta>(&m)
                .map_err(|e| ProtocolError::Invalid(format!("unreadable source records: {e}")))?,
            _ => {
                return Err(
                    ProtocolError::Invalid("an export must start with the records".into()).into(),
                );
            }
        };
        if meta.source.name != from.source {
            return Err(ProtocolError::Invalid("the export is of another source".into()).into());
        }
        let points = meta.points.len() as u64;
        let store = self.store.clone();
        let copied = async {
            let import = blocking(move || store.import(meta)).await??;
            let import = receive_files(import, &mut stream, &from, idle).await?;
            let bytes = import.bytes();
            let verified = blocking(move || import.commit()).await??;
            Ok::<_, NodeError>((bytes, verified))
        }
        .await;
        // A pool disk that failed the copy (full, failing) is an alert here until
        // a move or sync of the source here commits.
        let fault = match &copied {
            Err(NodeError::Store(e)) => e.disk_fault().map(|f| {
                let why = format!(
                    "a move of {} to this node failed on a pool disk: {e}; nothing of the copy was kept, and the source stays on {}",
                    from.source, from.node
                );
                (super::Refusal::Disk(f), why)
            }),
            _ => None,
        };
        if fault.is_some() || copied.is_ok() {
            self.note_refusal(&from.source, fault);
        }
        let (bytes, verified) = copied?;
        tracing::info!(source = %from.source, from = %from.node, bytes, points, "data source copied in for a move and verified");
        Ok(pb::ImportResponse {
            bytes,
            points,
            blocks_verified: verified,
        })
    }

    /// Asks the node `from` names for its export of the source; only that node may
    /// answer at that address.
    async fn dial_exporter(
        &self,
        from: &ImportFrom,
    ) -> Result<Streaming<pb::ExportChunk>, NodeError> {
        let peer_tls = self
            .peer_tls
            .client_config_for(Role::Node, Some(&from.node))
            .map_err(|e| NodeError::Internal(e.to_string()))?;
        let channel = bulwark_common::tls::channel(&from.address, peer_tls)
            .await
            .map_err(|m| Status::unavailable(format!("node {}: {m}", from.node)))?;
        let mut peer = pb::node_client::NodeClient::new(channel)
            .max_decoding_message_size(bulwark_common::MAX_MESSAGE_BYTES);
        let stream = peer
            .export(pb::ExportRequest {
                source: from.source.to_string(),
            })
            .await
            .map_err(at_peer(&from.node))?
            .into_inner();
        Ok(stream)
    }
}

/// Writes the export's files into `import` on a blocking thread as they arrive;
/// hands the import back when the exporter has sent everything.
async fn receive_files(
    import: Import,
    stream: &mut Streaming<pb::ExportChunk>,
    from: &ImportFrom,
    idle: std::time::Duration,
) -> Result<Import, NodeError> {
    let (ftx, mut frx) = mpsc::channel::<pb::FileData>(4);
    let writer = tokio::task::spawn_blocking(move || -> Result<Import, StoreError> {
        let mut import = import;
        while let Some(f) = frx.blocking_recv() {
            import.write(&f.name, f.offset, &f.data, f.file_len)?;
        }
        Ok(import)
    });
    let received: Result<(), NodeError> = async {
        loop {
            let next = tokio::time::timeout(idle, stream.message())
                .await
                .map_err(|_| exporter_idle(&from.node, idle))?;
            let Some(chunk) = next.map_err(at_peer(&from.node))? else {
                break;
            };
            match chunk.msg {
                Some(pb::export_chunk::Msg::File(f)) => {
                    if ftx.send(f).await.is_err() {
                        break;
                    }
                }
                _ => {
                    return Err(
                        ProtocolError::Invalid("unexpected message in an export".into()).into(),
                    );
                }
            }
        }
        Ok(())
    }
    .await;
    drop(ftx);
    let import = writer
        .await
        .map_err(|e| NodeError::Internal(format!("import writer failed: {e}")))??;
    received?;
    Ok(import)
}
