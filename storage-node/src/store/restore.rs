//! The restore reader: streams one point from its deltas and the replica.

use std::fs::File;
use std::path::PathBuf;

use bulwark_common::block::{DIGEST_LEN, Digest, Geometry};

use super::*;

/// A piece of a restored volume.
#[derive(Debug)]
pub enum RestoreItem {
    /// Bytes at `offset`, one digest per block.
    Data {
        offset: u64,
        data: Vec<u8>,
        digests: Vec<Digest>,
    },
    /// A run of zeros.
    Zeros { offset: u64, len: u64 },
}

/// Streams one point: first the before-images from its deltas (each stored block is
/// read once: the earliest delta holding a block wins), then the replica's blocks that
/// no delta covered, coalesced into runs.
pub struct RestoreReader {
    pub(super) meta: SourceMeta,
    pub(super) point: PointMeta,
    pub(super) deltas: std::vec::IntoIter<PathBuf>,
    pub(super) current: Option<DeltaReader>,
    pub(super) resolved: Vec<u64>,
    /// The replica and digests once open, and where the digests start.
    pub(super) replica: Option<(File, File, u64)>,
    pub(super) next_block: u64,
    pub(super) max_batch: usize,
}

impl RestoreReader {
    pub(super) fn new(
        meta: SourceMeta,
        point: PointMeta,
        deltas: Vec<PathBuf>,
    ) -> Result<RestoreReader> {
        let blocks = meta.geometry().block_count();
        Ok(RestoreReader {
            resolved: vec![0u64; blocks.div_ceil(64) as usize],
            meta,
            point,
            deltas: deltas.into_iter(),
            current: None,
            replica: None,
            next_block: 0,
            max_batch: bulwark_common::block::MAX_BATCH_BYTES,
        })
    }

    /// The point being restored.
    pub fn point(&self) -> &PointMeta {
        &self.point
    }

    /// The volume's geometry.
    pub fn geometry(&self) -> Geometry {
        self.meta.geometry()
    }

    pub(super) fn is_resolved(&self, b: u64) -> bool {
        self.resolved[(b / 64) as usize] & (1 << (b % 64)) != 0
    }

    /// The next piece, or `None` at the end. Blocking.
    pub fn next_item(&mut self) -> Result<Option<RestoreItem>> {
        let geometry = self.meta.geometry();
        // Phase 1: deltas, oldest (the point itself) first.
        loop {
            if self.current.is_none() {
                match self.deltas.next() {
                    Some(p) => self.current = Some(DeltaReader::open(&p, geometry)?),
                    None => break,
                }
            }
            let Some(reader) = self.current.as_mut() else {
                break;
            };
            let resolved = &self.resolved;
            let skip = |b: u64| resolved[(b / 64) as usize] & (1 << (b % 64)) != 0;
            match reader.next_record_where(false, &skip, false)? {
                None => self.current = None,
                Some(rec) => {
                    if self.is_resolved(rec.block) {
                        continue;
                    }
                    self.resolved[(rec.block / 64) as usize] |= 1 << (rec.block % 64);
                    let offset = geometry.offset_of(rec.block);
                    return Ok(Some(match rec.data {
                        Some(data) => RestoreItem::Data {
                            offset,
                            data,
                            digests: vec![rec.digest],
                        },
                        None => RestoreItem::Zeros {
                            offset,
                            len: geometry.block_len(rec.block),
                        },
                    }));
                }
            }
        }
        // Phase 2: the replica.
        if self.replica.is_none() {
            let dir = self.meta.dir();
            let r = dir.join("replica");
            let d = dir.join("digests");
            let digests = File::open(&d).map_err(io("open", &d))?;
            let base = content_start(&digests, &d, DataFile::Digests)?;
            self.replica = Some((File::open(&r).map_err(io("open", &r))?, digests, base));
        }
        let total = geometry.block_count();
        while self.next_block < total && self.is_resolved(self.next_block) {
            self.next_block += 1;
        }
        if self.next_block >= total {
            return Ok(None);
        }
        let first = self.next_block;
        let max_blocks = (self.max_batch / geometry.block_size as usize).max(1) as u64;
        let mut end = first;
        while end < total && end - first < max_blocks && !self.is_resolved(end) {
            end += 1;
        }
        let Some((replica, digests, base)) = self.replica.as_ref() else {
            return Ok(None);
        };
        let dir = self.meta.dir();
        let mut dbuf = vec![0u8; ((end - first) as usize) * DIGEST_LEN];
        read_at_full(
            digests,
            &mut dbuf,
            base + first * DIGEST_LEN as u64,
            &dir.join("digests"),
        )?;
        let ds: Vec<Digest> = dbuf
            .chunks_exact(DIGEST_LEN)
            .map(|c| Digest::from_slice(c).unwrap_or(Digest::UNWRITTEN))
            .collect();
        // Cut the run where written and unwritten blocks alternate.
        let unwritten = ds[0] == Digest::UNWRITTEN;
        let run = ds
            .iter()
            .take_while(|d| (**d == Digest::UNWRITTEN) == unwritten)
            .count() as u64;
        let end = first + run;
        self.next_block = end;
        let offset = geometry.offset_of(first);
        let len: u64 = (first..end).map(|b| geometry.block_len(b)).sum();
        if unwritten {
            return Ok(Some(RestoreItem::Zeros { offset, len }));
        }
        let mut data = vec![0u8; len as usize];
        read_at_full(replica, &mut data, offset, &dir.join("replica"))?;
        Ok(Some(RestoreItem::Data {
            offset,
            data,
            digests: ds[..run as usize].to_vec(),
        }))
    }
}

impl Store {
    /// Plans the restore of `point` (0 = newest) of a source.
    pub fn restore(&self, name: &str, point: u64) -> Result<RestoreReader> {
        self.settled_for_read(name, point)?;
        let (meta, points, target) = self.readable_point(name, point)?;
        meta.require_volume("a block restore (restore it as logs)")?;
        let dir = meta.dir();
        let deltas = points
            .iter()
            .filter(|p| p.id >= target.id && p.delta.is_some())
            .map(|p| delta_path(&dir, p.id))
            .collect();
        RestoreReader::new(meta, target, deltas)
    }

    /// A source's record, its points, and point `point` (0 = newest) if it exists
    /// and is not marked damaged: what a restore or a view of it needs.
    pub(super) fn readable_point(
        &self,
        name: &str,
        point: u64,
    ) -> Result<(SourceMeta, Vec<PointMeta>, PointMeta)> {
        let meta = self
            .source(name)?
            .ok_or_else(|| StoreError::NoPoints(name.to_string()))?;
        let points = self.points(name)?;
        let newest = points
            .last()
            .ok_or_else(|| StoreError::NoPoints(name.to_string()))?;
        let wanted = if point == 0 { newest.id } else { point };
        let target = points
            .iter()
            .find(|p| p.id == wanted)
            .cloned()
            .ok_or_else(|| StoreError::NoSuchPoint {
                source_name: name.to_string(),
                point: wanted,
            })?;
        if !target.damaged.is_empty() {
            return Err(StoreError::PointDamaged {
                source_name: name.to_string(),
                point: wanted,
                blocks: target.damaged.clone(),
            });
        }
        Ok((meta, points, target))
    }
}
