//! Verify: re-reading stored data and checking every checksum.

use std::fs::File;

use bulwark_common::block::{DIGEST_LEN, Digest, is_zero};

use super::*;

/// What [`Store::verify`] found.
#[derive(Debug, Clone, Default)]
pub struct VerifyOutcome {
    /// Replica blocks and delta records checked, and their bytes.
    pub blocks_checked: u64,
    pub bytes_read: u64,
    /// Replica blocks whose bytes no longer match the newest point's digests.
    pub damaged_replica: Vec<u64>,
    /// Points (oldest first) whose restore would read damaged blocks, and which.
    pub damaged_points: Vec<(u64, Vec<u64>)>,
}

impl Store {
    /// Reads `count` digests from block `first` of the newest point, 32 bytes each.
    pub fn read_digests(&self, name: &str, first: u64, count: u64) -> Result<Vec<u8>> {
        self.settled(name)?;
        let meta = self
            .source(name)?
            .ok_or_else(|| StoreError::NoPoints(name.to_string()))?;
        let path = meta.dir().join("digests");
        let f = File::open(&path).map_err(io("open", &path))?;
        let total = meta.geometry().block_count();
        let count = count.min(total.saturating_sub(first));
        let mut buf = vec![0u8; (count as usize) * DIGEST_LEN];
        let base = content_start(&f, &path, DataFile::Digests)?;
        read_at_full(&f, &mut buf, base + first * DIGEST_LEN as u64, &path)?;
        Ok(buf)
    }

    /// Recomputes `count` digests from block `first` of the replica's bytes (a deep
    /// consistency check), 32 bytes each, and counts the blocks whose bytes no longer
    /// match the stored digest. A block that was never written and still reads as
    /// zeros keeps the [`Digest::UNWRITTEN`] marker. Also returns the damaged blocks.
    pub fn recompute_digests(
        &self,
        name: &str,
        first: u64,
        count: u64,
    ) -> Result<(Vec<u8>, Vec<u64>)> {
        self.settled(name)?;
        let meta = self
            .source(name)?
            .ok_or_else(|| StoreError::NoPoints(name.to_string()))?;
        let geometry = meta.geometry();
        let stored = self.read_digests(name, first, count)?;
        let count = (stored.len() / DIGEST_LEN) as u64;
        let path = meta.dir().join("replica");
        let f = File::open(&path).map_err(io("open", &path))?;
        let start = geometry.offset_of(first);
        let end = geometry.offset_of(first + count).min(geometry.size_bytes);
        let mut data = vec![0u8; (end - start) as usize];
        read_at_full(&f, &mut data, start, &path)?;
        let mut out = Vec::with_capacity(stored.len());
        let mut damaged = Vec::new();
        let bs = geometry.block_size as usize;
        for (i, old) in stored.chunks_exact(DIGEST_LEN).enumerate() {
            let block = &data[i * bs..((i + 1) * bs).min(data.len())];
            let old = Digest::from_slice(old).unwrap_or(Digest::UNWRITTEN);
            let zero = is_zero(block);
            let now = if old == Digest::UNWRITTEN && zero {
                Digest::UNWRITTEN
            } else {
                Digest::of(block)
            };
            if !old.matches(now, zero) {
                damaged.push(first + i as u64);
            }
            out.extend_from_slice(&now.0);
        }
        Ok((out, damaged))
    }

    /// Re-reads the stored data of a source and checks every checksum: the replica's
    /// blocks against the digests of the newest point, and every record of the
    /// deltas of `point` and the points after it (every point when `point` is 0).
    /// Each checked point's `damaged` list is updated: the blocks a restore of it
    /// would read from a damaged place. The caller holds the source's read lock
    /// (nothing changes under a verify; the damage marks are one sled write).
    pub fn verify(&self, name: &str, point: u64) -> Result<VerifyOutcome> {
        self.settled(name)?;
        let meta = self
            .source(name)?
            .ok_or_else(|| StoreError::NoPoints(name.to_string()))?;
        if meta.kind == SourceKind::Log {
            return self.verify_logs(name);
        }
        let geometry = meta.geometry();
        let points = self.points(name)?;
        if point != 0 && !points.iter().any(|p| p.id == point) {
            return Err(StoreError::NoSuchPoint {
                source_name: name.to_string(),
                point,
            });
        }
        let mut out = VerifyOutcome::default();
        const CHUNK: u64 = 256;
        let total = geometry.block_count();
        let mut first = 0;
        while first < total {
            let count = CHUNK.min(total - first);
            let (_, damaged) = self.recompute_digests(name, first, count)?;
            out.damaged_replica.extend(damaged);
            out.blocks_checked += count;
            out.bytes_read += geometry.offset_of(first + count).min(geometry.size_bytes)
                - geometry.offset_of(first);
            first += count;
        }
        // Newest first: a point reads each block from the first delta at or after it
        // that holds it, so walking down the chain, each delta's records override
        // what the points above it read.
        let mut bad: std::collections::BTreeSet<u64> =
            out.damaged_replica.iter().copied().collect();
        let dir = meta.dir();
        let mut updates = Vec::new();
        for p in points.iter().rev() {
            if p.id < point {
                break;
            }
            if p.delta.is_some() {
                let path = delta_path(&dir, p.id);
                let mut r = DeltaReader::open(&path, geometry)?;
                while let Some(rec) = r.next_record_where(false, &|_| false, true)? {
                    out.blocks_checked += 1;
                    out.bytes_read += rec.data.as_ref().map_or(0, |d| d.len() as u64);
                    if rec.intact {
                        bad.remove(&rec.block);
                    } else {
                        tracing::warn!(
                            source = name,
                            point = p.id,
                            block = rec.block,
                            "damaged block in a recovery point's delta"
                        );
                        bad.insert(rec.block);
                    }
                }
            }
            let damaged: Vec<u64> = bad.iter().copied().collect();
            if !damaged.is_empty() {
                out.damaged_points.push((p.id, damaged.clone()));
            }
            if damaged != p.damaged {
                let mut q = p.clone();
                q.damaged = damaged;
                updates.push(q);
            }
        }
        for q in &updates {
            self.meta.apply(Batch::default().put(
                Tree::Points,
                point_key(name, q.id),
                &encode(q)?,
            ))?;
        }
        if !updates.is_empty() {
            self.meta.flush()?;
        }
        out.damaged_points.reverse();
        Ok(out)
    }
}
