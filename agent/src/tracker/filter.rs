//! The `nbd-filter` tracker: the agent serves the volume as an NBD export and every
//! write that passes through it sets its blocks' bits in memory.
//!
//! The host attaches the export with the kernel NBD client (`nbd-client -unix SOCKET
//! /dev/nbd0`, see README) and uses `/dev/nbd0` instead of the backing file; QEMU and
//! `qemu-io` open `nbd+unix:///?socket=SOCKET` directly. Reads, writes, flushes, trims
//! and write-zeroes go straight through to the backing file; flush and FUA are made
//! durable with `fdatasync` before they are acknowledged.
//! Only the host's own writer may open the export: a private socket, or TLS for
//! one role of fleet certificates (see [`crate::export`]).
//!
//! The record is one bit per block ([`DirtyMap`]), plus, while a sync runs, the frozen
//! generation it sends ([`Bitmap`]), so a failed sync can put its blocks back without
//! a full consistency check. Nothing is written to the host's disk except on a clean
//! shutdown, when the map is saved under `state_dir` and read back (and deleted) at the
//! next start. If the agent dies any other way the map is gone and the source is
//! inconsistent until a consistency check has run.
//!
//! Writes to the backing file that bypass the export are not seen; only the export may
//! be used to change the volume.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bulwark_common::block::Geometry;
use bulwark_nbd::{Backend, FileBackend, Spliced};

use super::bitmap::{self, Bitmap, DirtyMap, LoadError};
use super::{BlockSource, Frozen, Plan, Tracker, TrackerError, lock, open_volume};

struct State {
    /// The point the record is relative to; `None` while inconsistent.
    base: Option<u64>,
    /// The generation a running sync sends.
    frozen: Option<Arc<Bitmap>>,
}

/// See the module docs.
pub struct FilterTracker {
    source: String,
    path: PathBuf,
    geometry: Geometry,
    map: Arc<DirtyMap>,
    state: Mutex<State>,
    saved: PathBuf,
}

impl FilterTracker {
    /// Starts tracking `path` for data source `source`, taking the record saved by a
    /// clean shutdown when there is one.
    pub fn open(source: &str, path: &Path, geometry: Geometry, state_dir: &Path) -> FilterTracker {
        let saved = bitmap::saved_path(state_dir, source);
        let map = Arc::new(DirtyMap::new(geometry));
        let base = match bitmap::load_and_remove(&saved, geometry) {
            Ok((base, bits)) => {
                tracing::info!(
                    source,
                    base,
                    dirty_blocks = bits.count(),
                    "dirty bitmap restored from a clean shutdown"
                );
                map.restore(&bits);
                Some(base)
            }
            Err(e @ LoadError::Missing(_)) => {
                tracing::warn!(source, "{e}: the next sync is a consistency check");
                None
            }
            Err(e) => {
                tracing::warn!(
                    source,
                    "saved dirty bitmap unusable, {e}: the next sync is a consistency check"
                );
                None
            }
        };
        FilterTracker {
            source: source.to_string(),
            path: path.to_path_buf(),
            geometry,
            map,
            state: Mutex::new(State { base, frozen: None }),
            saved,
        }
    }

    /// The NBD backend that passes I/O through to the backing file and records
    /// writes.
    pub fn backend(&self) -> std::io::Result<Arc<dyn Backend>> {
        let inner = FileBackend::open(&self.path, false)?;
        Ok(Arc::new(TrackingBackend {
            inner,
            map: self.map.clone(),
        }))
    }

    /// Memory the record takes, in bytes.
    pub fn memory_bytes(&self) -> usize {
        self.map.memory_bytes()
    }
}

impl Tracker for FilterTracker {
    fn name(&self) -> &'static str {
        "nbd-filter"
    }
    fn size_bytes(&self) -> u64 {
        self.geometry.size_bytes
    }
    fn consistent(&self) -> bool {
        lock(&self.state).base.is_some()
    }
    fn mark_inconsistent(&self, why: &str) {
        tracing::warn!(source = %self.source, "tracker record dropped: {why}; the next sync is a consistency check");
        lock(&self.state).base = None;
    }
    fn begin(&self, scan: bool, read_from: Option<&Path>) -> Result<Frozen, TrackerError> {
        let reader: Arc<dyn BlockSource> = open_volume(read_from.unwrap_or(&self.path))?;
        let mut st = lock(&self.state);
        if let Some(old) = st.frozen.take() {
            // A sync that ended without committed/failed: its blocks are still owed.
            self.map.restore(&old);
        }
        // Taken before any read of this sync: every write that finished before now is
        // read below; every later one is in the next generation.
        let taken = Arc::new(self.map.take());
        st.frozen = Some(taken.clone());
        let plan = match st.base {
            Some(base) if !scan => Plan::Dirty {
                base,
                blocks: taken,
            },
            _ => Plan::Scan,
        };
        Ok(Frozen { plan, reader })
    }
    fn committed(&self, point: u64) {
        let mut st = lock(&self.state);
        st.frozen = None;
        st.base = Some(point);
    }
    fn failed(&self) {
        let mut st = lock(&self.state);
        if let Some(f) = st.frozen.take() {
            self.map.restore(&f);
        }
    }
    fn shutdown(&self) {
        let mut st = lock(&self.state);
        if let Some(f) = st.frozen.take() {
            self.map.restore(&f);
        }
        let Some(base) = st.base else {
            tracing::info!(source = %self.source, "no consistent record to save; the next sync is a consistency check");
            return;
        };
        let bits = self.map.snapshot();
        match bitmap::save(&self.saved, base, self.geometry, &bits) {
            Ok(()) => {
                tracing::info!(source = %self.source, base, dirty_blocks = bits.count(), path = %self.saved.display(), "dirty bitmap saved")
            }
            Err(e) => {
                tracing::error!(source = %self.source, "cannot save the dirty bitmap to {}: {e}; the next sync is a consistency check", self.saved.display())
            }
        }
    }
}

/// Passes I/O through to the backing file and marks the blocks every write touched,
/// after the write (see [`DirtyMap`] for why after). A failed write is marked too: it
/// may have changed part of its range.
struct TrackingBackend {
    inner: FileBackend,
    map: Arc<DirtyMap>,
}

impl Backend for TrackingBackend {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> std::io::Result<()> {
        let r = self.inner.write_at(data, offset, fua);
        self.map.mark(offset, data.len() as u64);
        r
    }
    fn takes_spliced(&self) -> bool {
        self.inner.takes_spliced()
    }
    fn write_spliced(&self, data: &mut Spliced, offset: u64, fua: bool) -> std::io::Result<()> {
        let r = self.inner.write_spliced(data, offset, fua);
        self.map.mark(offset, data.len() as u64);
        r
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> std::io::Result<()> {
        let r = self.inner.trim(offset, len, fua);
        self.map.mark(offset, len);
        r
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        may_trim: bool,
    ) -> std::io::Result<()> {
        let r = self.inner.write_zeroes(offset, len, fua, may_trim);
        self.map.mark(offset, len);
        r
    }
}
