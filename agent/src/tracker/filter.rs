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
//! a full consistency check.
//!
//! With the activity log (`activity_log = true`, the default; see [`super::activity`])
//! the record survives a crash at a bounded cost: the map is checkpointed atomically to
//! `<state_dir>/trackers/<source>.ckpt` every `bitmap_checkpoint`, at each sync's
//! freeze and commit, and at a clean stop; the log names the regions written since.
//! After an unclean stop the source is *recovering*: its next sync reads the blocks
//! of the checkpoint and of the logged regions only, compares them with the node's
//! digests and sends those that differ ([`Plan::Recheck`]). A missing or damaged
//! checkpoint or log falls back to a full consistency check, saying why.
//!
//! Without it, nothing is written to the host's disk except on a clean shutdown, when
//! the map is saved under `state_dir` and read back (and deleted) at the next start; if
//! the agent dies any other way the map is gone and the source is inconsistent until a
//! consistency check has run.
//!
//! Writes to the backing file that bypass the export are not seen; only the export may
//! be used to change the volume.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bulwark_common::block::Geometry;
use bulwark_nbd::{Backend, FileBackend, Spliced};

use super::activity::{self, Activity, ActivityConfig, Checkpoint, LogError};
use super::bitmap::{self, Bitmap, DirtyMap, LoadError, Saved};
use super::{BlockSource, Frozen, Plan, Tracker, TrackerError, lock, open_volume};

struct State {
    /// The point the record is relative to; `None` while inconsistent.
    base: Option<u64>,
    /// The generation a running sync sends.
    frozen: Option<Arc<Bitmap>>,
    /// After a crash: the record's blocks are to be compared, not only sent.
    recovering: bool,
}

/// The record, shared with the activity log, which has it checkpointed.
struct Record {
    source: String,
    geometry: Geometry,
    map: Arc<DirtyMap>,
    state: Mutex<State>,
    checkpoint: PathBuf,
}

impl Record {
    /// The map with a running sync's frozen blocks, as a checkpoint.
    fn saved(&self) -> Saved {
        let st = lock(&self.state);
        let mut bits = self.map.snapshot();
        if let Some(f) = &st.frozen {
            bits.union_with(f);
        }
        Saved {
            base: st.base,
            recovering: st.recovering,
            bits,
        }
    }
}

impl Checkpoint for Record {
    fn write_checkpoint(&self) -> std::io::Result<()> {
        let saved = self.saved();
        bitmap::save_checkpoint(&self.checkpoint, self.geometry, &saved)
    }
    fn invalidate(&self, why: &str) -> std::io::Result<()> {
        bitmap::remove(&self.checkpoint)?;
        let mut st = lock(&self.state);
        st.base = None;
        st.recovering = false;
        tracing::warn!(source = %self.source, "tracker record dropped: {why}; the next sync is a consistency check");
        Ok(())
    }
}

/// What the files under `state_dir` say at start.
struct Loaded {
    base: Option<u64>,
    recovering: bool,
    bits: Option<Bitmap>,
}

/// Reads the record a previous run left: the bitmap of a clean stop without the
/// activity log, else the checkpoint and the activity log.
fn load(source: &str, state_dir: &Path, geometry: Geometry) -> Loaded {
    let inconsistent = |why: String| {
        tracing::warn!(source, "{why}: the next sync is a consistency check");
        Loaded {
            base: None,
            recovering: false,
            bits: None,
        }
    };
    match bitmap::load_and_remove(&bitmap::saved_path(state_dir, source), geometry) {
        Ok((base, bits)) => {
            tracing::info!(
                source,
                base,
                dirty_blocks = bits.count(),
                "dirty bitmap restored from a clean shutdown"
            );
            return Loaded {
                base: Some(base),
                recovering: false,
                bits: Some(bits),
            };
        }
        Err(LoadError::Missing(_)) => {}
        Err(e) => return inconsistent(format!("saved dirty bitmap unusable, {e}")),
    }
    let saved = match bitmap::load_checkpoint(&bitmap::checkpoint_path(state_dir, source), geometry)
    {
        Ok(s) => s,
        Err(LoadError::Missing(_)) => {
            return inconsistent(
                "no record of changes (first start, or an unclean stop without the activity log)"
                    .into(),
            );
        }
        Err(e) => return inconsistent(format!("checkpoint unusable, {e}")),
    };
    let Some(base) = saved.base else {
        return inconsistent("the last checkpoint holds no consistent record".into());
    };
    let hot = match activity::read_log(&activity::log_path(state_dir, source), geometry) {
        Ok(h) => h,
        Err(e @ LogError::Missing(_)) => {
            return inconsistent(format!("{e} beside the checkpoint"));
        }
        Err(e) => return inconsistent(e.to_string()),
    };
    let mut bits = saved.bits;
    let hot_blocks = hot.count();
    bits.union_with(&hot);
    let recovering = saved.recovering || hot_blocks > 0;
    if recovering {
        tracing::warn!(
            source,
            base,
            recheck_bytes = bits.count() * u64::from(geometry.block_size),
            logged_blocks = hot_blocks,
            "the agent stopped uncleanly: the next sync re-checks the blocks of the last checkpoint and of the regions the activity log names"
        );
    } else {
        tracing::info!(
            source,
            base,
            dirty_blocks = bits.count(),
            "dirty bitmap restored from the last checkpoint"
        );
    }
    Loaded {
        base: Some(base),
        recovering,
        bits: Some(bits),
    }
}

/// Stops the periodic checkpoints when dropped.
struct Ticker(#[allow(dead_code)] std::sync::mpsc::Sender<()>);

fn start_ticker(
    source: &str,
    act: &Arc<Activity>,
    every: std::time::Duration,
) -> std::io::Result<Ticker> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let weak = Arc::downgrade(act);
    let source = source.to_string();
    std::thread::Builder::new()
        .name("bitmap-checkpoint".into())
        .spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(every) {
                let Some(a) = weak.upgrade() else { return };
                if let Err(e) = a.checkpoint() {
                    tracing::error!(source, "bitmap checkpoint failed: {e}");
                }
            }
        })?;
    Ok(Ticker(tx))
}

/// See the module docs.
pub struct FilterTracker {
    path: PathBuf,
    record: Arc<Record>,
    activity: Option<Arc<Activity>>,
    ticker: Mutex<Option<Ticker>>,
    saved: PathBuf,
    /// Bytes the owed re-check reads (0 once a sync committed).
    recheck: AtomicU64,
}

impl FilterTracker {
    /// Starts tracking `path` for data source `source`, taking the record a previous
    /// run left (see the module docs). With `activity`, writes a checkpoint of it and
    /// starts a fresh activity log; without, removes any checkpoint and log.
    pub fn open(
        source: &str,
        path: &Path,
        geometry: Geometry,
        state_dir: &Path,
        activity: Option<ActivityConfig>,
    ) -> std::io::Result<FilterTracker> {
        let loaded = load(source, state_dir, geometry);
        let map = Arc::new(DirtyMap::new(geometry));
        let recheck = match &loaded.bits {
            Some(b) if loaded.recovering => b.count() * u64::from(geometry.block_size),
            _ => 0,
        };
        if let Some(b) = &loaded.bits {
            map.restore(b);
        }
        let record = Arc::new(Record {
            source: source.to_string(),
            geometry,
            map,
            state: Mutex::new(State {
                base: loaded.base,
                frozen: None,
                recovering: loaded.recovering,
            }),
            checkpoint: bitmap::checkpoint_path(state_dir, source),
        });
        let log = activity::log_path(state_dir, source);
        let (activity, ticker) = match activity {
            Some(cfg) => {
                // The old log's regions are in this checkpoint: only then is the log
                // emptied.
                record.write_checkpoint()?;
                let act = Arc::new(Activity::create(&log, geometry, cfg, record.clone())?);
                let ticker = start_ticker(source, &act, cfg.checkpoint)?;
                (Some(act), Some(ticker))
            }
            None => {
                bitmap::remove(&record.checkpoint)?;
                bitmap::remove(&log)?;
                (None, None)
            }
        };
        Ok(FilterTracker {
            path: path.to_path_buf(),
            record,
            activity,
            ticker: Mutex::new(ticker),
            saved: bitmap::saved_path(state_dir, source),
            recheck: AtomicU64::new(recheck),
        })
    }

    /// The NBD backend that passes I/O through to the backing file and records
    /// writes.
    pub fn backend(&self) -> std::io::Result<Arc<dyn Backend>> {
        let inner = FileBackend::open(&self.path, false)?;
        Ok(Arc::new(TrackingBackend {
            inner,
            map: self.record.map.clone(),
            activity: self.activity.clone(),
        }))
    }

    /// Memory the record takes, in bytes.
    pub fn memory_bytes(&self) -> usize {
        self.record.map.memory_bytes() + self.activity.as_ref().map_or(0, |a| a.memory_bytes())
    }

    /// A checkpoint now, if the activity log is on (a failure is logged: the log
    /// keeps its regions until a later checkpoint succeeds).
    fn checkpoint(&self, when: &str) {
        if let Some(a) = &self.activity
            && let Err(e) = a.checkpoint()
        {
            tracing::error!(source = %self.record.source, "bitmap checkpoint at {when} failed: {e}");
        }
    }
}

impl Tracker for FilterTracker {
    fn name(&self) -> &'static str {
        "nbd-filter"
    }
    fn size_bytes(&self) -> u64 {
        self.record.geometry.size_bytes
    }
    fn consistent(&self) -> bool {
        lock(&self.record.state).base.is_some()
    }
    fn mark_inconsistent(&self, why: &str) {
        tracing::warn!(source = %self.record.source, "tracker record dropped: {why}; the next sync is a consistency check");
        {
            let mut st = lock(&self.record.state);
            st.base = None;
            st.recovering = false;
        }
        self.recheck.store(0, Ordering::Relaxed);
        self.checkpoint("a dropped record");
    }
    fn begin(&self, scan: bool, read_from: Option<&Path>) -> Result<Frozen, TrackerError> {
        let reader: Arc<dyn BlockSource> = open_volume(read_from.unwrap_or(&self.path))?;
        let plan = {
            let mut st = lock(&self.record.state);
            if let Some(old) = st.frozen.take() {
                // A sync that ended without committed/failed: its blocks are still owed.
                self.record.map.restore(&old);
            }
            // Taken before any read of this sync: every write that finished before now
            // is read below; every later one is in the next generation.
            let taken = Arc::new(self.record.map.take());
            st.frozen = Some(taken.clone());
            match st.base {
                Some(since) if !scan && st.recovering => Plan::Recheck {
                    since,
                    blocks: taken,
                },
                Some(base) if !scan => Plan::Dirty {
                    base,
                    blocks: taken,
                },
                _ => Plan::Scan,
            }
        };
        self.checkpoint("a sync's freeze");
        Ok(Frozen { plan, reader })
    }
    fn committed(&self, point: u64) {
        {
            let mut st = lock(&self.record.state);
            st.frozen = None;
            st.base = Some(point);
            st.recovering = false;
        }
        self.recheck.store(0, Ordering::Relaxed);
        self.checkpoint("a sync's commit");
    }
    fn failed(&self) {
        let mut st = lock(&self.record.state);
        if let Some(f) = st.frozen.take() {
            self.record.map.restore(&f);
        }
    }
    fn shutdown(&self) {
        let base = {
            let mut st = lock(&self.record.state);
            if let Some(f) = st.frozen.take() {
                self.record.map.restore(&f);
            }
            st.base
        };
        lock(&self.ticker).take();
        let source = &self.record.source;
        if let Some(a) = &self.activity {
            match a.retire_covered() {
                Ok(()) => {
                    tracing::info!(source = %source, hot_regions = a.hot_regions(), "record checkpointed, activity log emptied of covered regions")
                }
                Err(e) => {
                    tracing::error!(source = %source, "final checkpoint failed: {e}; the next start re-checks what the activity log names")
                }
            }
            return;
        }
        let Some(base) = base else {
            tracing::info!(source = %source, "no consistent record to save; the next sync is a consistency check");
            return;
        };
        let bits = self.record.map.snapshot();
        match bitmap::save(&self.saved, base, self.record.geometry, &bits) {
            Ok(()) => {
                tracing::info!(source = %source, base, dirty_blocks = bits.count(), path = %self.saved.display(), "dirty bitmap saved")
            }
            Err(e) => {
                tracing::error!(source = %source, "cannot save the dirty bitmap to {}: {e}; the next sync is a consistency check", self.saved.display())
            }
        }
    }
    fn recheck_bytes(&self) -> u64 {
        if lock(&self.record.state).recovering {
            self.recheck.load(Ordering::Relaxed)
        } else {
            0
        }
    }
}

/// Passes I/O through to the backing file and marks the blocks every write touched,
/// after the write (see [`DirtyMap`] for why after). A failed write is marked too: it
/// may have changed part of its range.
struct TrackingBackend {
    inner: FileBackend,
    map: Arc<DirtyMap>,
    activity: Option<Arc<Activity>>,
}

impl TrackingBackend {
    /// Logs the regions of a write about to be issued (see [`super::activity`]).
    fn logged(&self, offset: u64, len: u64) -> std::io::Result<Option<activity::InFlight<'_>>> {
        match &self.activity {
            Some(a) => a.begin_write(offset, len).map(Some),
            None => Ok(None),
        }
    }
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
        let _log = self.logged(offset, data.len() as u64)?;
        let r = self.inner.write_at(data, offset, fua);
        self.map.mark(offset, data.len() as u64);
        r
    }
    fn takes_spliced(&self) -> bool {
        self.inner.takes_spliced()
    }
    fn write_spliced(&self, data: &mut Spliced, offset: u64, fua: bool) -> std::io::Result<()> {
        let _log = self.logged(offset, data.len() as u64)?;
        let r = self.inner.write_spliced(data, offset, fua);
        self.map.mark(offset, data.len() as u64);
        r
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> std::io::Result<()> {
        let _log = self.logged(offset, len)?;
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
        let _log = self.logged(offset, len)?;
        let r = self.inner.write_zeroes(offset, len, fua, may_trim);
        self.map.mark(offset, len);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: u32 = 65536;

    fn volume(dir: &Path, blocks: u64) -> (PathBuf, Geometry) {
        let path = dir.join("vol.raw");
        std::fs::write(&path, vec![0u8; (blocks * u64::from(BS)) as usize]).expect("volume");
        (
            path,
            Geometry::new(blocks * u64::from(BS), BS).expect("geometry"),
        )
    }

    fn cfg() -> Option<ActivityConfig> {
        Some(ActivityConfig {
            extents: 64,
            region_bytes: 4 * u64::from(BS),
            checkpoint: std::time::Duration::from_secs(3600),
        })
    }

    /// The blocks a sync would read, and whether it compares (Recheck) or sends
    /// (Dirty), or scans.
    fn plan(t: &FilterTracker) -> (&'static str, Vec<(u64, u64)>) {
        let f = t.begin(false, None).expect("begin");
        let r = match f.plan {
            Plan::Scan => ("scan", vec![]),
            Plan::Dirty { blocks, .. } => ("dirty", blocks.runs().collect()),
            Plan::Recheck { blocks, .. } => ("recheck", blocks.runs().collect()),
        };
        t.failed();
        r
    }

    /// Writes through the tracker's backend, as the export does.
    fn write(t: &FilterTracker, offset: u64, len: usize) {
        t.backend()
            .expect("backend")
            .write_at(&vec![7u8; len], offset, false)
            .expect("write");
    }

    #[test]
    fn a_crash_costs_a_recheck_of_the_logged_regions_and_a_clean_stop_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let (path, g) = volume(dir.path(), 64);
        let t = FilterTracker::open("s", &path, g, &state, cfg()).expect("open");
        assert_eq!(plan(&t).0, "scan", "no record yet: the first sync scans");
        t.begin(false, None).expect("begin");
        t.committed(1);
        write(&t, 5 * u64::from(BS), 10);
        write(&t, 40 * u64::from(BS), 10);
        assert_eq!(plan(&t), ("dirty", vec![(5, 1), (40, 1)]));
        drop(t); // a crash: no shutdown
        let t = FilterTracker::open("s", &path, g, &state, cfg()).expect("reopen");
        assert!(t.consistent());
        // Regions of 4 blocks: blocks 4..8 and 40..44.
        assert_eq!(t.recheck_bytes(), 8 * u64::from(BS));
        assert_eq!(plan(&t), ("recheck", vec![(4, 4), (40, 4)]));
        // A second crash before the re-check ran owes the same blocks.
        drop(t);
        let t = FilterTracker::open("s", &path, g, &state, cfg()).expect("reopen");
        assert_eq!(plan(&t), ("recheck", vec![(4, 4), (40, 4)]));
        t.begin(false, None).expect("begin");
        t.committed(2);
        assert_eq!(t.recheck_bytes(), 0);
        write(&t, 20 * u64::from(BS), 10);
        t.shutdown();
        drop(t);
        let t = FilterTracker::open("s", &path, g, &state, cfg()).expect("reopen");
        assert_eq!(t.recheck_bytes(), 0, "a clean stop owes no re-check");
        assert_eq!(plan(&t), ("dirty", vec![(20, 1)]));
    }

    #[test]
    fn damage_or_a_missing_log_falls_back_to_a_scan_and_a_legacy_bitmap_is_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let (path, g) = volume(dir.path(), 64);
        let t = FilterTracker::open("s", &path, g, &state, cfg()).expect("open");
        t.begin(false, None).expect("begin");
        t.committed(1);
        drop(t);
        let ckpt = bitmap::checkpoint_path(&state, "s");
        let mut raw = std::fs::read(&ckpt).expect("checkpoint");
        raw[20] ^= 1;
        std::fs::write(&ckpt, &raw).expect("damage");
        let t = FilterTracker::open("s", &path, g, &state, cfg()).expect("reopen");
        assert!(!t.consistent(), "a damaged checkpoint is not trusted");
        t.begin(false, None).expect("begin");
        t.committed(2);
        drop(t);
        std::fs::remove_file(activity::log_path(&state, "s")).expect("remove the log");
        let t = FilterTracker::open("s", &path, g, &state, cfg()).expect("reopen");
        assert!(
            !t.consistent(),
            "a checkpoint without its log is not trusted"
        );
        drop(t);
        // A clean stop of an agent without the log (or an older one) left a bitmap.
        let mut bits = Bitmap::new(64);
        bits.set(9);
        bitmap::save(&bitmap::saved_path(&state, "s"), 3, g, &bits).expect("save");
        let t = FilterTracker::open("s", &path, g, &state, cfg()).expect("reopen");
        assert_eq!(plan(&t), ("dirty", vec![(9, 1)]));
        assert!(!bitmap::saved_path(&state, "s").exists(), "read once");
        // Turning the log off removes the checkpoint and the log.
        t.shutdown();
        drop(t);
        let t = FilterTracker::open("s", &path, g, &state, None).expect("log off");
        assert!(!bitmap::checkpoint_path(&state, "s").exists());
        assert!(!activity::log_path(&state, "s").exists());
        assert_eq!(plan(&t), ("dirty", vec![(9, 1)]), "the record carried over");
    }
}
