//! Reads of a source's points for the coordinator: the list (with the retention lock
//! that holds each) and a verify of the stored blocks against their checksums.

use bulwark_common::name::SourceName;
use bulwark_proto as pb;

use super::{NodeService, blocking};
use crate::error::NodeError;
use crate::store::StoreError;
use crate::wire::{PointRef, points_to_proto, verify_report};

impl NodeService {
    /// The points of `source`, each with the lock that holds it now.
    pub async fn list_points(
        &self,
        source: SourceName,
    ) -> Result<pb::ListPointsResponse, NodeError> {
        let source = source.into_string();
        let store = self.store.clone();
        let (points, lock) = blocking(move || {
            Ok::<_, StoreError>((store.points(&source)?, store.lock_of(&source)?))
        })
        .await??;
        let now = bulwark_common::time::now_ms();
        Ok(points_to_proto(&points, lock, now))
    }

    /// Verifies point `at.point` of `at.source` (and the replica) under the source's
    /// read lock.
    pub async fn verify(&self, at: PointRef) -> Result<pb::VerifyReport, NodeError> {
        let PointRef { source, point } = at;
        let lock = self.locks.get(&source).read_owned().await;
        let store = self.store.clone();
        let name = source.to_string();
        let started = std::time::Instant::now();
        tracing::info!(source = %name, point, "verify started");
        let out = blocking(move || {
            let _lock = lock;
            store.verify(&name, point)
        })
        .await??;
        let points = {
            let store = self.store.clone();
            let name = source.to_string();
            blocking(move || store.points(&name)).await??
        };
        tracing::info!(source = %source, blocks = out.blocks_checked, damaged_replica = out.damaged_replica.len(),
            damaged_points = out.damaged_points.len(), "verify finished");
        let duration_ms = started.elapsed().as_millis() as u64;
        Ok(verify_report(&source, &out, &points, duration_ms))
    }
}
