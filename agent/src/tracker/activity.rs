//! The `nbd-filter`'s activity log: which regions of the volume may hold writes that
//! the last bitmap checkpoint does not know of, so that after a crash only those are
//! re-checked instead of the whole volume (DRBD's activity log, for change tracking).
//!
//! It records *where* writes may have gone, never data: the host keeps no change log.
//!
//! # The invariant
//!
//! Every block written since the node's newest point is either set in the last durable
//! checkpoint ([`super::filter`] writes it: the dirty bitmap, with the frozen
//! generation of a running sync) or lies in a region named by the log on disk. So
//! after a crash, re-checking the checkpoint's blocks and the named regions' blocks
//! against the node's digests finds every block that differs.
//!
//! It holds because of two rules:
//!
//! 1. **A region is logged before any write to it is issued.** The first write to a
//!    *cold* region waits while the region is written into a slot of the log file and
//!    the file is `fdatasync`ed. A write to a *hot* region (already logged) costs a few
//!    atomic operations and nothing else.
//! 2. **A region leaves the log only once a checkpoint covers it.** A checkpoint
//!    first, for every hot region written since the previous one, clears its
//!    `touched` flag and reads its in-flight count: at zero, every write to it has
//!    finished and set its dirty bits, so the snapshot taken next contains them and
//!    the region is *clean as of this checkpoint*; otherwise it stays touched. When
//!    the checkpoint is durable, a clean region that nobody touched since may be
//!    evicted to make room for a cold one (least recently written first).
//!
//! Eviction against a concurrent write is Dekker's handshake: the writer sets
//! `touched` then reads `hot`; the evictor clears `hot` then reads `touched` (all
//! sequentially consistent). At least one sees the other: either the writer takes the
//! slow path and logs the region again, or the evictor gives up on that region.
//!
//! When the log is full of regions no checkpoint covers, the cold write takes a
//! checkpoint itself (as DRBD writes bitmap pages on eviction); at most
//! `activity_extents` regions are hot at once.
//!
//! # On disk
//!
//! `<state_dir>/trackers/<source>.al`, a fixed-size file made once: a 512-byte header
//! sector (`BWKACTV1`, slot count u32, region bytes u64, volume size u64, block size
//! u32, then the first 16 bytes of BLAKE3 of those 32 bytes) and one 512-byte sector
//! per slot (`BWAS`, region u64 — `u64::MAX` for an empty slot —, transaction number
//! u64, then 12 bytes of BLAKE3 of those 20 bytes). A slot is rewritten in place, one
//! sector and one `fdatasync` per cold region. Updates are serialized, so at most one
//! slot can be torn by a crash, and that slot's new region had no write issued yet
//! (rule 1) while its old region was covered (rule 2): one bad slot reads as empty.
//! Two or more mean damage, and the source falls back to a full consistency check.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulwark_common::block::Geometry;

use super::bitmap::Bitmap;
use super::lock;

/// `activity_log`, `activity_extents`, `activity_region` and `bitmap_checkpoint` of an
/// `nbd-filter` source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActivityConfig {
    /// At most this many regions are hot at once (DRBD's `al-extents`).
    pub extents: u32,
    /// Bytes per region: a multiple of the block size.
    pub region_bytes: u64,
    /// Time between periodic checkpoints of the dirty bitmap.
    pub checkpoint: Duration,
}

impl ActivityConfig {
    /// 1024 regions of 4 MiB (at most 4 GiB to re-check after a crash), a checkpoint
    /// a minute.
    pub const DEFAULT: ActivityConfig = ActivityConfig {
        extents: 1024,
        region_bytes: 4 << 20,
        checkpoint: Duration::from_secs(60),
    };
    /// Bounds of `activity_extents`: enough for every write in flight at once (the
    /// NBD server's queue) to be in a different region, and a log file of at most
    /// 32 MiB.
    pub const MIN_EXTENTS: u32 = 64;
    pub const MAX_EXTENTS: u32 = 65536;
}

const SECTOR: u64 = 512;
const HEAD_MAGIC: &[u8; 8] = b"BWKACTV1";
const SLOT_MAGIC: &[u8; 4] = b"BWAS";
const EMPTY: u64 = u64::MAX;

/// Where a source's activity log lives.
pub fn log_path(state_dir: &Path, source: &str) -> PathBuf {
    state_dir.join("trackers").join(format!("{source}.al"))
}

/// Why an activity log on disk cannot be trusted.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("no activity log at {0}")]
    Missing(PathBuf),
    #[error("cannot read {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("activity log {path} is damaged: {why}")]
    Damaged { path: PathBuf, why: String },
}

fn header(slots: u32, region_bytes: u64, g: Geometry) -> [u8; SECTOR as usize] {
    let mut h = [0u8; SECTOR as usize];
    h[..8].copy_from_slice(HEAD_MAGIC);
    h[8..12].copy_from_slice(&slots.to_le_bytes());
    h[12..20].copy_from_slice(&region_bytes.to_le_bytes());
    h[20..28].copy_from_slice(&g.size_bytes.to_le_bytes());
    h[28..32].copy_from_slice(&g.block_size.to_le_bytes());
    let sum = blake3::hash(&h[..32]);
    h[32..48].copy_from_slice(&sum.as_bytes()[..16]);
    h
}

fn slot_sector(region: u64, seq: u64) -> [u8; SECTOR as usize] {
    let mut s = [0u8; SECTOR as usize];
    s[..4].copy_from_slice(SLOT_MAGIC);
    s[4..12].copy_from_slice(&region.to_le_bytes());
    s[12..20].copy_from_slice(&seq.to_le_bytes());
    let sum = blake3::hash(&s[..20]);
    s[20..32].copy_from_slice(&sum.as_bytes()[..12]);
    s
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[i..i + 8]);
    u64::from_le_bytes(a)
}

/// The regions a log file names, whatever its slot count and region size were, as
/// the blocks of those regions of a volume of `g`.
pub fn read_log(path: &Path, g: Geometry) -> Result<Bitmap, LogError> {
    match std::fs::read(path) {
        Ok(b) => parse_log(&b, path, g),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(LogError::Missing(path.to_path_buf()))
        }
        Err(error) => Err(LogError::Io {
            path: path.to_path_buf(),
            error,
        }),
    }
}

/// [`read_log`] of the bytes `buf` read from `path`.
pub fn parse_log(buf: &[u8], path: &Path, g: Geometry) -> Result<Bitmap, LogError> {
    let damaged = |why: String| LogError::Damaged {
        path: path.to_path_buf(),
        why,
    };
    if buf.len() < SECTOR as usize {
        return Err(damaged("shorter than its header".into()));
    }
    let h = &buf[..SECTOR as usize];
    if &h[..8] != HEAD_MAGIC || blake3::hash(&h[..32]).as_bytes()[..16] != h[32..48] {
        return Err(damaged("bad header".into()));
    }
    let slots = u64::from(u32::from_le_bytes([h[8], h[9], h[10], h[11]]));
    let region_bytes = u64_at(h, 12);
    let size = u64_at(h, 20);
    let block = u32::from_le_bytes([h[28], h[29], h[30], h[31]]);
    if size != g.size_bytes || block != g.block_size {
        return Err(damaged(format!(
            "written for {size} bytes in blocks of {block}, the volume is {} bytes in blocks of {}",
            g.size_bytes, g.block_size
        )));
    }
    if region_bytes == 0 || !region_bytes.is_multiple_of(u64::from(block)) {
        return Err(damaged(format!("region size {region_bytes}")));
    }
    if buf.len() as u64 != (1 + slots) * SECTOR {
        return Err(damaged(format!("{} bytes for {slots} slots", buf.len())));
    }
    let mut hot = Bitmap::new(g.block_count());
    let per_region = region_bytes / u64::from(block);
    let mut bad = 0;
    for s in buf[SECTOR as usize..].chunks(SECTOR as usize) {
        if s.iter().all(|b| *b == 0) {
            continue; // never written
        }
        if &s[..4] != SLOT_MAGIC || blake3::hash(&s[..20]).as_bytes()[..12] != s[20..32] {
            bad += 1;
            continue;
        }
        let region = u64_at(s, 4);
        if region == EMPTY {
            continue;
        }
        if region.saturating_mul(region_bytes) >= g.size_bytes {
            return Err(damaged(format!(
                "names region {region}, past the volume's end"
            )));
        }
        hot.set_range(region * per_region, per_region);
    }
    if bad > 1 {
        return Err(damaged(format!(
            "{bad} slots fail their checksum (a crash tears at most one)"
        )));
    }
    Ok(hot)
}

/// Makes a fresh, empty log file at `path` (atomically) and opens it.
fn create_log(path: &Path, slots: u32, region_bytes: u64, g: Geometry) -> std::io::Result<File> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("al.tmp");
    {
        let f = File::create(&tmp)?;
        f.set_len((1 + u64::from(slots)) * SECTOR)?;
        f.write_all_at(&header(slots, region_bytes, g), 0)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()?;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
}

/// Where the log's sectors go: the file, or (in tests) a simulated disk that keeps only
/// what was synced.
pub trait LogDevice: Send {
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()>;
    fn sync(&self) -> std::io::Result<()>;
}

impl LogDevice for File {
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.write_all_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.sync_data()
    }
}

/// Writes a checkpoint of the record (see [`super::filter`]); called with the log's
/// lock held, so no region is evicted meanwhile.
pub trait Checkpoint: Send + Sync {
    fn write_checkpoint(&self) -> std::io::Result<()>;
    /// The log failed: make sure no checkpoint on disk will be trusted after a crash
    /// (the next sync is a full consistency check). An error means writes must stop.
    fn invalidate(&self, why: &str) -> std::io::Result<()>;
}

struct Inner {
    file: Box<dyn LogDevice>,
    path: PathBuf,
    /// Region in each slot.
    slots: Vec<Option<u64>>,
    slot_of: HashMap<u64, usize>,
    /// For each hot region, the checkpoint as of which it was clean (0: none yet).
    clean_at: HashMap<u64, u64>,
    /// Checkpoints started, and the newest one that is durable.
    started: u64,
    durable: u64,
    /// Transactions written to the log.
    seq: u64,
}

/// The live activity log of one source. See the module docs.
pub struct Activity {
    region_bytes: u64,
    regions: u64,
    inflight: Vec<AtomicU32>,
    touched: Vec<AtomicBool>,
    hot: Vec<AtomicBool>,
    /// When each region was last written, in log transactions (for least recently
    /// written eviction).
    stamp: Vec<AtomicU32>,
    clock: AtomicU32,
    /// The log failed and the record was invalidated: writes go through unlogged,
    /// and no checkpoint is written again.
    failed: AtomicBool,
    inner: Mutex<Inner>,
    record: Arc<dyn Checkpoint>,
    /// A deliberate bug, to show the property test catches it.
    #[cfg(test)]
    mutation: tests::Mutation,
}

/// The regions of one write, in flight: dropping it ends the write.
pub struct InFlight<'a> {
    activity: &'a Activity,
    first: u64,
    last: u64,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        for r in self.first..=self.last {
            self.activity.inflight[r as usize].fetch_sub(1, SeqCst);
        }
    }
}

impl Activity {
    /// A fresh, empty log for a volume of `g` at `path` (whatever was there was read
    /// already). Before calling this the caller wrote a checkpoint covering the old
    /// log's regions.
    pub fn create(
        path: &Path,
        g: Geometry,
        cfg: ActivityConfig,
        record: Arc<dyn Checkpoint>,
    ) -> std::io::Result<Activity> {
        let file = create_log(path, cfg.extents, cfg.region_bytes, g)?;
        Ok(Activity::on_device(Box::new(file), path, g, cfg, record))
    }

    /// An activity log writing its slots to `device`, which holds a fresh log of
    /// `cfg.extents` empty slots for a volume of `g`.
    pub fn on_device(
        device: Box<dyn LogDevice>,
        path: &Path,
        g: Geometry,
        cfg: ActivityConfig,
        record: Arc<dyn Checkpoint>,
    ) -> Activity {
        let regions = g.size_bytes.div_ceil(cfg.region_bytes).max(1);
        Activity {
            region_bytes: cfg.region_bytes,
            regions,
            inflight: (0..regions).map(|_| AtomicU32::new(0)).collect(),
            touched: (0..regions).map(|_| AtomicBool::new(false)).collect(),
            hot: (0..regions).map(|_| AtomicBool::new(false)).collect(),
            stamp: (0..regions).map(|_| AtomicU32::new(0)).collect(),
            clock: AtomicU32::new(0),
            failed: AtomicBool::new(false),
            inner: Mutex::new(Inner {
                file: device,
                path: path.to_path_buf(),
                slots: vec![None; cfg.extents as usize],
                slot_of: HashMap::new(),
                clean_at: HashMap::new(),
                started: 0,
                durable: 0,
                seq: 0,
            }),
            record,
            #[cfg(test)]
            mutation: tests::Mutation::None,
        }
    }

    /// Bytes of memory the per-region state takes.
    pub fn memory_bytes(&self) -> usize {
        self.regions as usize * 10
    }

    /// Regions hot now.
    pub fn hot_regions(&self) -> usize {
        lock(&self.inner).slot_of.len()
    }

    /// Call before issuing a write (or trim, or write-zeroes) of `offset..offset+len`;
    /// keep the result until the write has finished and its blocks are marked. An
    /// error means the region could not be logged: do not issue the write.
    pub fn begin_write(&self, offset: u64, len: u64) -> std::io::Result<InFlight<'_>> {
        let first = (offset / self.region_bytes).min(self.regions - 1);
        let last = (offset.saturating_add(len.max(1)) - 1) / self.region_bytes;
        let last = last.min(self.regions - 1);
        let w = InFlight {
            activity: self,
            first,
            last,
        };
        let now = self.clock.load(std::sync::atomic::Ordering::Relaxed);
        for r in first..=last {
            let i = r as usize;
            self.inflight[i].fetch_add(1, SeqCst);
            self.touched[i].store(true, SeqCst);
            if self.stamp[i].load(std::sync::atomic::Ordering::Relaxed) != now {
                self.stamp[i].store(now, std::sync::atomic::Ordering::Relaxed);
            }
        }
        if self.failed.load(SeqCst) {
            return Ok(w);
        }
        for r in first..=last {
            if !self.hot[r as usize].load(SeqCst) {
                self.make_hot(r)?;
            }
        }
        Ok(w)
    }

    /// The slow path: logs region `r` durably.
    fn make_hot(&self, r: u64) -> std::io::Result<()> {
        let mut inner = lock(&self.inner);
        if self.hot[r as usize].load(SeqCst) || self.failed.load(SeqCst) {
            return Ok(());
        }
        let mut tries = 0u32;
        let slot = loop {
            if let Some(i) = inner.slots.iter().position(Option::is_none) {
                break i;
            }
            if let Some(i) = self.evict_one(&mut inner) {
                break i;
            }
            // Nothing covered: a checkpoint covers every hot region with no write in
            // flight. Those with writes in flight finish without this lock.
            if tries > 0 {
                drop(inner);
                std::thread::sleep(Duration::from_millis(1));
                inner = lock(&self.inner);
                if self.hot[r as usize].load(SeqCst) || self.failed.load(SeqCst) {
                    return Ok(());
                }
            }
            tries += 1;
            if let Err(e) = self.checkpoint_locked(&mut inner) {
                return self.fail(&mut inner, &format!("cannot write a checkpoint: {e}"), e);
            }
        };
        inner.seq += 1;
        let sector = slot_sector(r, inner.seq);
        let written = inner
            .file
            .write_at(&sector, (1 + slot as u64) * SECTOR)
            .and_then(|()| self.sync_log(&inner));
        if let Err(e) = written {
            let why = format!("cannot write {}: {e}", inner.path.display());
            return self.fail(&mut inner, &why, e);
        }
        inner.slots[slot] = Some(r);
        inner.slot_of.insert(r, slot);
        inner.clean_at.insert(r, 0);
        self.hot[r as usize].store(true, SeqCst);
        self.clock
            .store(inner.seq as u32, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Whether hot region `r` may leave the log: clean as of a durable checkpoint,
    /// and not written since.
    fn covered(&self, inner: &Inner, r: u64) -> bool {
        if self.evicts_uncovered() {
            return true;
        }
        let c = inner.clean_at.get(&r).copied().unwrap_or(0);
        c > 0 && c <= inner.durable && !self.touched[r as usize].load(SeqCst)
    }

    /// The mutation "evict before a checkpoint covers the region" (tests only).
    fn evicts_uncovered(&self) -> bool {
        #[cfg(test)]
        return self.mutation == tests::Mutation::EvictUncovered;
        #[cfg(not(test))]
        false
    }

    /// Frees the slot of the least recently written covered region, if any.
    fn evict_one(&self, inner: &mut Inner) -> Option<usize> {
        let mut candidates: Vec<(u32, u64)> = inner
            .slot_of
            .keys()
            .filter(|r| self.covered(inner, **r))
            .map(|r| (self.stamp[*r as usize].load(SeqCst), *r))
            .collect();
        candidates.sort_unstable();
        for (_, v) in candidates {
            let i = v as usize;
            self.hot[i].store(false, SeqCst);
            if self.touched[i].load(SeqCst) && !self.evicts_uncovered() {
                // A write came in meanwhile and saw the region hot: keep it.
                self.hot[i].store(true, SeqCst);
                continue;
            }
            let slot = inner.slot_of.remove(&v)?;
            inner.clean_at.remove(&v);
            inner.slots[slot] = None;
            return Some(slot);
        }
        None
    }

    /// Writes a checkpoint and records which hot regions it covers.
    pub fn checkpoint(&self) -> std::io::Result<()> {
        let mut inner = lock(&self.inner);
        if self.failed.load(SeqCst) {
            return Ok(());
        }
        match self.checkpoint_locked(&mut inner) {
            Ok(()) => Ok(()),
            Err(e) => {
                let why = format!("cannot write a checkpoint: {e}");
                self.fail(&mut inner, &why, e)
            }
        }
    }

    fn checkpoint_locked(&self, inner: &mut Inner) -> std::io::Result<()> {
        inner.started += 1;
        let k = inner.started;
        let hot: Vec<u64> = inner.slot_of.keys().copied().collect();
        for r in hot {
            let i = r as usize;
            if !self.touched[i].swap(false, SeqCst) {
                continue; // clean as of an earlier checkpoint
            }
            if self.inflight[i].load(SeqCst) == 0 {
                inner.clean_at.insert(r, k);
            } else {
                self.touched[i].store(true, SeqCst);
            }
        }
        self.record.write_checkpoint()?;
        inner.durable = k;
        Ok(())
    }

    /// At a clean stop, after a final checkpoint: empties the slots of every covered
    /// region (all of them when no write is in flight), so the next start has
    /// nothing to re-check.
    pub fn retire_covered(&self) -> std::io::Result<()> {
        let mut inner = lock(&self.inner);
        if self.failed.load(SeqCst) {
            return Ok(());
        }
        self.checkpoint_locked(&mut inner)?;
        let mut freed = Vec::new();
        while let Some(slot) = self.evict_one(&mut inner) {
            freed.push(slot);
        }
        for slot in freed {
            inner.seq += 1;
            let sector = slot_sector(EMPTY, inner.seq);
            inner.file.write_at(&sector, (1 + slot as u64) * SECTOR)?;
        }
        self.sync_log(&inner)
    }

    fn sync_log(&self, inner: &Inner) -> std::io::Result<()> {
        #[cfg(test)]
        if self.mutation == tests::Mutation::SkipLogSync {
            return Ok(());
        }
        inner.file.sync()
    }

    /// The log could not be written: invalidate the record so that a crash leads to a
    /// full check, then let writes go on unlogged. If even that fails, the write
    /// fails.
    fn fail(&self, inner: &mut Inner, why: &str, e: std::io::Error) -> std::io::Result<()> {
        match self.record.invalidate(why) {
            Ok(()) => {
                tracing::error!(path = %inner.path.display(), "activity log off until the agent restarts: {why}; the next sync is a consistency check");
                self.failed.store(true, SeqCst);
                Ok(())
            }
            Err(e2) => {
                tracing::error!(path = %inner.path.display(), "{why}, and the record cannot be invalidated ({e2}): refusing the write");
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests;
