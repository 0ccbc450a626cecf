//! A restore (and `bulwark export`): the header, then the point's delta records and
//! zero runs, read on a blocking thread under the source's read lock and one of the
//! agent's restore turns (see [`crate::store::RestoreReader`]).

use std::sync::Arc;

use bulwark_common::tls::Identity;
use bulwark_proto as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{BoxStream, NodeService, StreamGuard, blocking};
use crate::error::NodeError;
use crate::node::admission::Sender;
use crate::store::RestoreItem;
use crate::wire::{PointRef, point_to_proto};

impl NodeService {
    /// Streams point `at.point` (0: the newest) of `at.source` to `caller`.
    pub async fn restore(
        self: Arc<Self>,
        caller: Identity,
        at: PointRef,
    ) -> Result<BoxStream<pb::RestoreChunk>, NodeError> {
        let PointRef { source, point } = at;
        let (lock, turn) = self.authorize_read(&caller, &source, point).await?;
        let store = self.store.clone();
        let name = source.to_string();
        let mut reader = blocking(move || store.restore(&name, point)).await??;
        let (tx, rx) = mpsc::channel(4);
        let tx = Sender::new(tx, self.idle());
        let guard = StreamGuard::new(&self.live_streams);
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
            bulwark_common::failpoint::hit("node-mid-restore");
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
                        ..Default::default()
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
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}
