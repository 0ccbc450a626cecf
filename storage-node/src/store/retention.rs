//! Retention and pruning: which points go, and the delta merge that removes a middle
//! point.

use std::fs::{File, OpenOptions};
use std::path::Path;

use bulwark_common::block::Geometry;
use bulwark_common::failpoint;

use super::*;

/// Writes the merge of two deltas, `older` (the predecessor's) and `newer` (a
/// pruned point's), over `older`: every record of `older`, then the records of
/// `newer` for blocks `older` does not hold. Returns the merged delta's size.
/// A damaged record is copied as it is, so the merged delta still shows the damage.
/// A compressed record is copied as it is stored; a raw one is compressed with
/// `compression` when that shrinks it (so older, raw deltas shrink as they merge).
pub(super) fn merge_deltas(
    older: &Path,
    newer: &Path,
    geometry: Geometry,
    compression: Compression,
) -> Result<DeltaMeta> {
    use std::io::Write;
    let tmp = older.with_extension("merge");
    let mut held = vec![0u64; geometry.block_count().div_ceil(64) as usize];
    let out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, out);
    // A merged delta is always written in this node's format, with its header.
    w.write_all(&DataFile::Delta.header())
        .map_err(io("write", &tmp))?;
    // The merged file's length: its header and its records.
    let mut meta = DeltaMeta {
        records: 0,
        bytes: FILE_HEADER_LEN,
        logical_bytes: Some(FILE_HEADER_LEN),
    };
    let mut buf = Vec::new();
    let mut scratch = Vec::new();
    let mut copy = |rec: DeltaRecord, w: &mut std::io::BufWriter<File>| -> Result<()> {
        buf.clear();
        let len = geometry.block_len(rec.block) as usize;
        let payload = match &rec.frame {
            Some(f) => Payload::Zstd(f),
            None => Payload::of(rec.data.as_deref(), compression, &mut scratch),
        };
        encode_record(&mut buf, rec.block, rec.digest, payload, len);
        w.write_all(&buf).map_err(io("write", &tmp))?;
        meta.records += 1;
        meta.bytes += buf.len() as u64;
        let logical = (HEADER_LEN + CHECK_LEN) as u64 + rec.data_offset.map_or(0, |_| len as u64);
        meta.logical_bytes = Some(meta.logical_bytes() + logical);
        Ok(())
    };
    if older.exists() {
        let mut r = DeltaReader::open(older, geometry)?;
        r.keep_frames = true;
        while let Some(rec) = r.next_record_where(false, &|_| false, true)? {
            held[(rec.block / 64) as usize] |= 1 << (rec.block % 64);
            copy(rec, &mut w)?;
        }
    }
    if newer.exists() {
        // A delta holds each block once, so `held` needs no update here.
        let mut r = DeltaReader::open(newer, geometry)?;
        r.keep_frames = true;
        let skip = |b: u64| held[(b / 64) as usize] & (1 << (b % 64)) != 0;
        while let Some(rec) = r.next_record_where(false, &skip, true)? {
            if !skip(rec.block) {
                copy(rec, &mut w)?;
            }
        }
    }
    let out = w
        .into_inner()
        .map_err(|e| io("write", &tmp)(e.into_error()))?;
    boundary("merge: written")?;
    out.sync_all().map_err(io("fsync", &tmp))?;
    boundary("merge: durable")?;
    failpoint::io("node-io-rename")
        .and_then(|()| std::fs::rename(&tmp, older))
        .map_err(io("rename", &tmp))?;
    boundary("merge: renamed")?;
    if let Some(parent) = older.parent() {
        fsync_dir(parent)?;
    }
    boundary("merge: rename durable")?;
    Ok(meta)
}

impl Store {
    /// Applies the coordinator's policy to a stored source now (rather than at its
    /// next sync) and prunes what its retention no longer keeps. Returns the pruned
    /// point ids. The caller holds the source's write lock.
    pub fn set_policy(&self, name: &str, p: &SourcePolicy, now_ms: i64) -> Result<Vec<u64>> {
        self.settled(name)?;
        let Some(mut meta) = self.source(name)? else {
            return Ok(Vec::new());
        };
        let before = meta.clone();
        meta.apply_policy(p);
        if meta.replica_alloc_bytes != before.replica_alloc_bytes
            || meta.points_alloc_bytes != before.points_alloc_bytes
            || meta.retention != before.retention
            || meta.keep_after_ms != before.keep_after_ms
            || meta.lock != before.lock
            || meta.applied_points_alloc != before.applied_points_alloc
            || meta.applied_replica_alloc != before.applied_replica_alloc
        {
            self.put_meta(&meta)?;
        }
        self.apply_retention(name, now_ms)
    }

    /// Prunes the points a source's retention no longer keeps, oldest first; returns
    /// their ids. The caller holds the source's write lock.
    pub fn apply_retention(&self, name: &str, now_ms: i64) -> Result<Vec<u64>> {
        self.settled(name)?;
        let Some(meta) = self.source(name)? else {
            return Ok(Vec::new());
        };
        let points: Vec<(u64, i64)> = self
            .points(name)?
            .iter()
            .map(|p| (p.id, p.created_ms))
            .collect();
        let mut drop = meta.retention.to_drop(&points, now_ms);
        if meta.kind == SourceKind::Log && meta.keep_after_ms > 0 {
            // The logs the group's oldest volume point needs: every ship from its
            // time on, and the ship before (it may hold the start of its WAL).
            let floor = points
                .iter()
                .filter(|(_, t)| *t < meta.keep_after_ms)
                .map(|(id, _)| *id)
                .max()
                .unwrap_or(0);
            drop.retain(|id| *id < floor);
        }
        if let Some(lock) = meta.lock {
            let held: Vec<u64> = points
                .iter()
                .filter(|(id, t)| drop.contains(id) && lock.holds(*t, now_ms))
                .map(|(id, _)| *id)
                .collect();
            if !held.is_empty() {
                tracing::info!(source = name, points = ?held, mode = lock.mode.as_str(),
                    "retention would prune these points; the retention lock keeps them");
                drop.retain(|id| !held.contains(id));
            }
        }
        for id in &drop {
            let freed = self.prune(name, *id)?;
            tracing::info!(
                source = name,
                point = id,
                freed_bytes = freed,
                "recovery point pruned by retention"
            );
        }
        Ok(drop)
    }

    /// Removes point `id` of a source, which must not be the newest, and returns the
    /// bytes freed. The oldest point's delta is simply deleted. A middle point's
    /// delta is first merged into its predecessor's, which then holds the
    /// before-images of every block changed until the point after `id`: the
    /// predecessor restores exactly as before.
    ///
    /// Crash safety: the merged delta is written to a temporary file, made durable
    /// and renamed over the predecessor's. A merged delta is correct for the
    /// predecessor whether `id` still exists or not, so a crash anywhere leaves every
    /// point restorable; the point record goes in one sled transaction, and a delta
    /// file left without its point is removed at the next open. The caller holds the
    /// source's write lock.
    pub fn prune(&self, name: &str, id: u64) -> Result<u64> {
        self.settled(name)?;
        let meta = self
            .source(name)?
            .ok_or_else(|| StoreError::NoPoints(name.to_string()))?;
        let points = self.points(name)?;
        if let Some(p) = points.iter().find(|p| p.id == id) {
            self.check_unlocked(&meta, p)?;
        }
        if meta.kind == SourceKind::Log {
            if points.last().is_some_and(|p| p.id == id) {
                return Err(StoreError::PruneNewest {
                    source_name: name.to_string(),
                    point: id,
                });
            }
            if !points.iter().any(|p| p.id == id) {
                return Err(StoreError::NoSuchPoint {
                    source_name: name.to_string(),
                    point: id,
                });
            }
            return self.prune_log(&meta, id);
        }
        let idx =
            points
                .iter()
                .position(|p| p.id == id)
                .ok_or_else(|| StoreError::NoSuchPoint {
                    source_name: name.to_string(),
                    point: id,
                })?;
        if idx + 1 == points.len() {
            return Err(StoreError::PruneNewest {
                source_name: name.to_string(),
                point: id,
            });
        }
        let dir = meta.dir();
        let deltas = dir.join("deltas");
        let victim = &points[idx];
        let victim_path = delta_path(&dir, id);
        let freed = victim.stored_bytes();
        boundary("prune: start")?;
        bulwark_common::failpoint::hit("node-mid-prune");
        let updated_prev = if idx > 0 {
            let mut prev = points[idx - 1].clone();
            let merged = merge_deltas(
                &delta_path(&dir, prev.id),
                &victim_path,
                meta.geometry(),
                self.policy.compression,
            )?;
            prev.delta = Some(merged);
            // Damage the victim's delta carried is now the predecessor's.
            for b in &victim.damaged {
                if !prev.damaged.contains(b) {
                    prev.damaged.push(*b);
                }
            }
            Some(prev)
        } else {
            None
        };
        let prev_bytes = updated_prev.as_ref().map(encode).transpose()?;
        let mut batch = Batch::default();
        batch.remove(Tree::Points, point_key(name, id));
        if let (Some(prev), Some(b)) = (&updated_prev, &prev_bytes) {
            batch.put(Tree::Points, point_key(name, prev.id), b);
        }
        self.meta.apply(&batch)?;
        boundary("prune: point removed, before flush")?;
        self.meta.flush()?;
        boundary("prune: point removal durable")?;
        if victim_path.exists() {
            std::fs::remove_file(&victim_path).map_err(io("remove", &victim_path))?;
            boundary("prune: delta removed")?;
            fsync_dir(&deltas)?;
        }
        let before = freed
            + if idx > 0 {
                points[idx - 1].stored_bytes()
            } else {
                0
            };
        let after = updated_prev.map_or(0, |p| p.stored_bytes());
        Ok(before.saturating_sub(after))
    }
}
