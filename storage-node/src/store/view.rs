//! Point views: read-only NBD exports of a point that stay exact while the source
//! changes.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

use bulwark_common::block::Geometry;

use super::*;

/// A read-only view of one recovery point, for an NBD export. Each block is read
/// from the first delta at or after the point that holds it, or from the replica.
///
/// The view stays exact while the source changes: it holds its delta files open
/// (a prune that merges or deletes them does not disturb it; their space returns
/// when the view closes), and a settle, before overwriting replica blocks, adds the
/// location of their before-images under the view's write lock. Reads hold the
/// read lock, so a replica read in flight finishes before the settle may overwrite
/// its blocks.
pub struct PointView {
    pub(super) source: String,
    pub(super) point: u64,
    pub(super) geometry: Geometry,
    pub(super) replica: File,
    pub(super) state: std::sync::RwLock<ViewState>,
}

#[derive(Default)]
pub(super) struct ViewState {
    pub(super) files: Vec<File>,
    /// Block → (index in `files`, where its record's bytes are).
    pub(super) map: HashMap<u64, (u32, Stored)>,
}

impl ViewState {
    pub(super) fn add(&mut self, file: File, recs: &[(u64, Stored)]) {
        let idx = self.files.len() as u32;
        let mut used = false;
        for (block, at) in recs {
            if let std::collections::hash_map::Entry::Vacant(e) = self.map.entry(*block) {
                e.insert((idx, *at));
                used = true;
            }
        }
        if used {
            self.files.push(file);
        }
    }
}

impl PointView {
    /// The source and point shown.
    pub fn source(&self) -> &str {
        &self.source
    }
    pub fn point(&self) -> u64 {
        self.point
    }
    /// The volume's geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    pub(super) fn add(&self, file: File, recs: &[(u64, Stored)]) {
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        st.add(file, recs);
    }

    /// Fills `buf` with the point's bytes from `offset`. Runs of blocks that come
    /// from the replica are read with one call.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let st = self.state.read().unwrap_or_else(|e| e.into_inner());
        let g = self.geometry;
        let bs = u64::from(g.block_size);
        let end = offset + buf.len() as u64;
        let mut at = offset;
        // A run of replica bytes not yet read: (start offset, start in buf).
        let mut run: Option<(u64, usize)> = None;
        let flush =
            |run: &mut Option<(u64, usize)>, upto: u64, buf: &mut [u8]| -> std::io::Result<()> {
                if let Some((start, i)) = run.take() {
                    let n = (upto - start) as usize;
                    self.replica.read_exact_at(&mut buf[i..i + n], start)?;
                }
                Ok(())
            };
        while at < end {
            let block = at / bs;
            let block_end = ((block + 1) * bs).min(end);
            let i = (at - offset) as usize;
            let n = (block_end - at) as usize;
            match st.map.get(&block) {
                None => {
                    if run.is_none() {
                        run = Some((at, i));
                    }
                }
                Some((file, stored)) => {
                    flush(&mut run, at, buf)?;
                    let within = at - block * bs;
                    let file = &st.files[*file as usize];
                    match *stored {
                        Stored::Zeros => buf[i..i + n].fill(0),
                        Stored::Raw { at: d } => {
                            file.read_exact_at(&mut buf[i..i + n], d + within)?;
                        }
                        Stored::Zstd { at: d, len } => {
                            let plain = read_compressed(file, d, len, g.block_len(block))?;
                            let within = within as usize;
                            buf[i..i + n].copy_from_slice(&plain[within..within + n]);
                        }
                    }
                }
            }
            at = block_end;
        }
        flush(&mut run, end, buf)
    }
}

/// The block of `block_len` bytes whose zstd frame of `len` bytes is at `at` in
/// `file` (its record was checked when the view was made or the settle wrote it;
/// the frame is decoded into the block's length and never more: a frame that does
/// not decode into it is an I/O error of the read).
fn read_compressed(file: &File, at: u64, len: u32, block_len: u64) -> std::io::Result<Vec<u8>> {
    let mut frame = vec![0u8; len.min(block_len as u32) as usize];
    file.read_exact_at(&mut frame, at)?;
    compress::decompress_block(&frame, block_len as usize).map_err(|why| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a compressed record at byte {at}: {why}"),
        )
    })
}

impl Store {
    /// Opens a read-only view of `point` (0 = newest) that stays exact while later
    /// syncs and prunes change the store (see [`PointView`]). The caller holds the
    /// source's read lock while this runs.
    pub fn open_view(&self, name: &str, point: u64) -> Result<std::sync::Arc<PointView>> {
        self.settled_for_read(name, point)?;
        let (meta, points, target) = self.readable_point(name, point)?;
        meta.require_volume("an NBD export")?;
        let wanted = target.id;
        let geometry = meta.geometry();
        let dir = meta.dir();
        let replica_path = dir.join("replica");
        let replica = File::open(&replica_path).map_err(io("open", &replica_path))?;
        let mut state = ViewState::default();
        for p in points
            .iter()
            .filter(|p| p.id >= wanted && p.delta.is_some())
        {
            let path = delta_path(&dir, p.id);
            let file = File::open(&path).map_err(io("open", &path))?;
            let mut r = DeltaReader::open(&path, geometry)?;
            let mut recs = Vec::new();
            while let Some(rec) = r.next_record_where(false, &|_| true, false)? {
                let stored = match (rec.data_offset, rec.compressed_len) {
                    (None, _) => Stored::Zeros,
                    (Some(at), None) => Stored::Raw { at },
                    (Some(at), Some(len)) => Stored::Zstd { at, len },
                };
                recs.push((rec.block, stored));
            }
            state.add(file, &recs);
        }
        let view = std::sync::Arc::new(PointView {
            source: name.to_string(),
            point: wanted,
            geometry,
            replica,
            state: std::sync::RwLock::new(state),
        });
        let mut views = self.views.lock().unwrap_or_else(|e| e.into_inner());
        let list = views.entry(name.to_string()).or_default();
        list.retain(|w| w.strong_count() > 0);
        list.push(std::sync::Arc::downgrade(&view));
        Ok(view)
    }

    /// The live views of a source.
    pub(super) fn views_of(&self, name: &str) -> Vec<std::sync::Arc<PointView>> {
        let views = self.views.lock().unwrap_or_else(|e| e.into_inner());
        views
            .get(name)
            .map(|l| l.iter().filter_map(std::sync::Weak::upgrade).collect())
            .unwrap_or_default()
    }
}
