//! Settle: a committed point moved from the journal into the replica, behind its
//! before-images.

use std::collections::HashMap;

use bulwark_common::block::{Digest, Geometry, is_zero, open_direct};
use bulwark_common::failpoint;
use bulwark_common::name::SourceName;

use crate::uring::Ring;

use super::*;

/// Bytes of new data a settle applies per group (see [`Store::settle`]): each group
/// is one delta append and fdatasync, then the replica writes. Small in unit tests,
/// so that the crash tests cross group boundaries.
pub(super) const SETTLE_GROUP: u64 = if cfg!(test) { 8 * 4096 } else { 4 << 20 };

pub(super) type SettleLock = std::sync::Arc<std::sync::Mutex<()>>;

/// A settle that failed (see [`StoreError::SettleFailed`]).
#[derive(Debug, Clone)]
pub(super) struct SettleFailure {
    pub(super) point: u64,
    pub(super) cause: String,
    /// The replica and digests were written back to the previous point, whole:
    /// the points before the unsettled one can still be read.
    pub(super) replica_whole: bool,
    /// It failed only because the pool disk's file system was full, and the
    /// replica is whole: the next operation on the source tries the settle again
    /// (the space may be back) instead of failing with it.
    pub(super) retry: bool,
}

impl SettleFailure {
    pub(super) fn error(&self, name: &str) -> StoreError {
        StoreError::SettleFailed {
            source_name: name.to_string(),
            point: self.point,
            cause: self.cause.clone(),
        }
    }
}

/// A settle group's before-images (from [`BeforeImageReader::prepare_many`])
/// appended to the delta of `files`, which is `delta_len` bytes long, and made
/// durable; the source's open views learn where they are. Returns the records and
/// bytes appended (each compressed as the pool says, when that shrinks it). Only
/// then may the group's blocks be overwritten.
pub(super) fn append_before_images(
    store: &Store,
    source: &str,
    files: &mut TxnFiles,
    geometry: Geometry,
    group: &[Prepared],
    delta_len: u64,
) -> Result<(u64, Appended)> {
    let Some(delta) = files.delta.as_mut() else {
        return Err(StoreError::Meta("settle without a delta".into()));
    };
    let delta_file_path = delta.path.clone();
    let recs: Vec<(u64, Digest)> = group.iter().flat_map(|p| p.recs.iter().copied()).collect();
    let datas: Vec<Option<&[u8]>> = group
        .iter()
        .flat_map(|p| &p.old)
        .map(|d| d.as_deref().filter(|d| !is_zero(d)))
        .collect();
    // Open views learn where each record's bytes will be.
    let views = store.views_of(source);
    let mut located = Vec::new();
    let records = recs.iter().zip(&datas).map(|((block, digest), data)| {
        (
            *block,
            *digest,
            *data,
            None,
            geometry.block_len(*block) as usize,
        )
    });
    let added = delta
        .append(
            delta_len,
            records,
            (!views.is_empty()).then_some(&mut located),
        )
        .map_err(io("write", &delta_file_path))?;
    boundary("settle: before-images written")?;
    delta
        .file
        .sync_data()
        .map_err(io("fsync", &delta_file_path))?;
    boundary("settle: before-images durable")?;
    // Open views learn where these blocks' old bytes are before the replica changes
    // (each view waits for its in-flight replica reads first).
    for v in &views {
        let file = delta
            .file
            .try_clone()
            .map_err(io("reopen", &delta_file_path))?;
        v.add(file, &located);
    }
    Ok((recs.len() as u64, added))
}

impl Store {
    /// Settles the source's committed point that is still in its journal, if any
    /// (see the module docs): in groups of [`SETTLE_GROUP`] bytes, the before-images
    /// of a group's blocks are appended to the previous point's delta and made
    /// durable, then the group's new bytes and digests are written; at the end the
    /// replica and digests are made durable, one transaction records the previous
    /// point's delta and removes the `settle` record, and the journal is deleted.
    /// Every journal record's checksum is checked as it is read back. On failure what
    /// was applied is undone (the replica is the previous point again), the `settle`
    /// record stays, and this and every later operation on the source fail with
    /// [`StoreError::SettleFailed`] (but reads of older points: see
    /// `settled_for_read`). The caller holds the source's write lock (or
    /// runs before anything else, at open); the store's settle mutex of the source
    /// is held too.
    pub fn settle(&self, name: &str) -> Result<()> {
        let lock = self
            .settle_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone();
        let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = self.settle_failure(name) {
            return Err(e);
        }
        let Some(v) = self.meta.get(Tree::Settle, name.as_bytes())? else {
            return Ok(());
        };
        let rec: Settle = decode(&v)?;
        match self.settle_now(name, &rec) {
            Ok(()) => {
                // A settle that failed for want of space and was tried again.
                self.settle_failed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(name);
                Ok(())
            }
            Err(e @ StoreError::Crashed(_)) => Err(e),
            Err(e) => {
                let full = e.disk_fault() == Some(DiskFault::Full);
                let mut cause = e.to_string();
                let dir = source_dir(&rec.disk, &SourceName::parse(name)?);
                let mut replica_whole = false;
                let undone = self
                    .source(name)
                    .and_then(|m| {
                        m.ok_or_else(|| StoreError::Meta(format!("no record of source {name}")))
                    })
                    .and_then(|m| self.undo_delta(name, &dir, m.geometry(), rec.point - 1));
                match undone {
                    Ok(_) => {
                        replica_whole = true;
                        cause = format!(
                            "{cause}; the replica was written back to point {}, whole, and the points before {} can still be restored",
                            rec.point - 1,
                            rec.point
                        )
                    }
                    Err(e @ StoreError::Crashed(_)) => return Err(e),
                    Err(u) => {
                        cause = format!(
                            "{cause}; then writing the previous point back failed too ({u}): the replica may be damaged, run a consistency check"
                        )
                    }
                }
                if full && replica_whole {
                    cause.push_str("; the settle is tried again at the next operation on the source, once the pool disk has room");
                }
                Err(self.settle_failed(name, &rec, cause, replica_whole, full))
            }
        }
    }

    /// Settles the source first if a committed point of it is still in its journal
    /// (see [`Store::settle`]): anything that reads a source calls this first. Fails
    /// with the source's failed settle, if any.
    pub(super) fn settled(&self, name: &str) -> Result<()> {
        if let Some(e) = self.settle_failure(name) {
            return Err(e);
        }
        if self.meta.get(Tree::Settle, name.as_bytes())?.is_some() {
            self.settle(name)?;
        }
        Ok(())
    }

    /// [`Store::settled`] for a read of `point` (0 = the newest): after a failed
    /// settle whose undo left the replica at the previous point, whole, the points
    /// before the unsettled one are read as usual (the replica is the newest of
    /// them, and their deltas are untouched); the unsettled point is not.
    pub(super) fn settled_for_read(&self, name: &str, point: u64) -> Result<()> {
        let readable = self
            .settle_failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .is_some_and(|f| f.replica_whole && point != 0 && point < f.point);
        if readable { Ok(()) } else { self.settled(name) }
    }

    /// Records a failed settle of `name` and returns its error.
    pub(super) fn settle_failed(
        &self,
        name: &str,
        rec: &Settle,
        cause: String,
        replica_whole: bool,
        full: bool,
    ) -> StoreError {
        let failure = SettleFailure {
            point: rec.point,
            cause,
            replica_whole,
            retry: full && replica_whole,
        };
        let e = failure.error(name);
        self.settle_failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), failure);
        e
    }

    /// The failed settle of a source, as its error; none for one that is tried
    /// again (see [`SettleFailure::retry`]).
    pub(super) fn settle_failure(&self, name: &str) -> Option<StoreError> {
        let failed = self.settle_failed.lock().unwrap_or_else(|e| e.into_inner());
        failed.get(name).filter(|f| !f.retry).map(|f| f.error(name))
    }

    /// Sources whose settle failed, with the error (an alert each).
    pub fn settle_failures(&self) -> HashMap<String, String> {
        let failed = self.settle_failed.lock().unwrap_or_else(|e| e.into_inner());
        failed
            .iter()
            .map(|(name, f)| (name.clone(), f.error(name).to_string()))
            .collect()
    }

    pub(super) fn settle_now(&self, name: &str, rec: &Settle) -> Result<()> {
        let started = std::time::Instant::now();
        let meta = self
            .source(name)?
            .ok_or_else(|| StoreError::Meta(format!("settle of unknown source {name}")))?;
        let geometry = meta.geometry();
        let dir = source_dir(&rec.disk, &meta.name);
        let old_point = rec.point - 1;
        // What a settle interrupted (a crash, a panic) applied is written back
        // first: the replica is point `old_point` again.
        self.undo_delta(name, &dir, geometry, old_point)?;
        let journal = journal_path(&dir);
        let mut reader = DeltaReader::open(&journal, geometry)?;
        let replica_path = dir.join("replica");
        let digests_path = dir.join("digests");
        let replica = open_rw(&replica_path, Open::Existing)?;
        let digests = open_rw(&digests_path, Open::Existing)?;
        let digests_base = content_start(&digests, &digests_path, DataFile::Digests)?;
        let delta_file_path = delta_path(&dir, old_point);
        let delta_file = open_rw(&delta_file_path, Open::Truncate)?;
        fsync_dir(&dir.join("deltas"))?;
        boundary("settle: delta created")?;
        let uring = if cfg!(test) {
            None
        } else {
            Ring::try_new().zip(open_direct(&replica_path, false))
        };
        let mut files = TxnFiles {
            replica,
            writers: Vec::new(),
            uring,
            bounce: Vec::new(),
            digests,
            digests_base,
            delta: Some(DeltaAppender::create(
                delta_file,
                &delta_file_path,
                DataFile::Delta,
                self.policy.compression,
            )?),
            journal: None,
            dir: dir.clone(),
        };
        let images = self.before_image_reader(&dir, geometry)?;
        let zero = ZeroDigests::new(geometry);
        // A delta's bytes are its file's length: its header and its records.
        let mut delta = DeltaMeta {
            records: 0,
            bytes: FILE_HEADER_LEN,
            logical_bytes: Some(FILE_HEADER_LEN),
        };
        let mut blocks = 0u64;
        loop {
            let extents = journal::next_group(&mut reader, &zero, SETTLE_GROUP, &mut blocks)?;
            if extents.is_empty() {
                break;
            }
            failpoint::hit("node-settle-group");
            let group = images.prepare_many(vec![extents])?;
            let (records, added) =
                append_before_images(self, name, &mut files, geometry, &group, delta.bytes)?;
            delta.records += records;
            delta.bytes += added.stored;
            delta.logical_bytes = Some(delta.logical_bytes() + added.logical);
            let extents: Vec<&VerifiedExtent> = group.iter().flat_map(|p| &p.extents).collect();
            write_replica(&mut files, geometry, &extents, &replica_path, &|| {
                boundary("settle: replica written")
            })?;
            write_digests(&files.digests, files.digests_base, &extents, &digests_path)?;
            boundary("settle: digests written")?;
        }
        make_durable(&files.replica, &files.digests, &dir)?;
        boundary("settle: data durable")?;
        let mut prev: PointMeta = self
            .meta
            .get(Tree::Points, &point_key(name, old_point))?
            .map(|v| decode(&v))
            .transpose()?
            .ok_or_else(|| {
                StoreError::Meta(format!("data source {name}: point {old_point} vanished"))
            })?;
        prev.delta = Some(delta);
        let prev_bytes = encode(&prev)?;
        self.meta.apply(
            Batch::default()
                .put(Tree::Points, point_key(name, old_point), &prev_bytes)
                .remove(Tree::Settle, name),
        )?;
        boundary("settle: recorded")?;
        self.meta.flush()?;
        boundary("settle: recorded durable")?;
        std::fs::remove_file(&journal).map_err(io("remove", &journal))?;
        boundary("settle: journal removed")?;
        fsync_dir(&dir)?;
        tracing::info!(
            source = name,
            point = rec.point,
            blocks,
            delta_bytes = delta.bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "point settled into the replica"
        );
        Ok(())
    }
}
