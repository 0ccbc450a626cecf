//! The storage node's on-disk format: per data source, a replica and a chain of
//! recovery points, with crash-safe commits.
//!
//! # What is on disk
//!
//! On the pool disk chosen for a data source, in `<disk>/bulwark/<source>/`:
//!
//! - `replica` — a sparse file the size of the volume holding the newest settled
//!   point (the newest point, unless a committed point is still in the journal).
//! - `digests` — one 32-byte BLAKE3 digest per block of `replica`, in block order.
//!   All-zero bytes mean "never written, reads as zeros" ([`Digest::UNWRITTEN`]).
//! - `deltas/<P>.delta` — the reverse delta of point `P`: the before-images of the
//!   blocks that the sync creating point `P+1` overwrote. Restoring `P` reads, for each
//!   block, the first delta at or after `P` that holds it, and the replica otherwise.
//!   The newest point has no delta.
//! - `journal` — while an incremental sync is received, and after its commit until
//!   the point is settled: the sync's new blocks, in the delta record format but
//!   carrying the NEW digests (a block of zeros is recorded without data, kind 0).
//!
//! In `<data_dir>/meta` (sled), each record JSON with a format version `v`:
//! `sources` (name → [`SourceMeta`]), `points` (name ∖0 id → [`PointMeta`]),
//! `pending` (name → the sync being received) and `settle` (name → the committed
//! point whose blocks are still only in the journal: `{v, point, disk}`).
//!
//! A delta file is a sequence of records: a 45-byte header (block index u64 LE, kind
//! u8: 0 = the block read as zeros, 1 = data follows; length u32 LE; the block's old
//! digest), an 8-byte check (the first 8 bytes of BLAKE3 of the header), then `length`
//! bytes when kind is 1. A record is valid when its check matches and its data hashes
//! to its digest; reading stops at the first invalid record (a torn tail).
//!
//! # Order of writes (the crash-safety argument)
//!
//! A source's first sync (fresh) goes straight into the replica:
//!
//! 1. `pending[source] = {new_point: 1, fresh}` (and the source's record) is written
//!    and flushed before any data file exists.
//! 2. Each batch of extents (already checksum-verified) is written into `replica`
//!    and `digests`.
//! 3. Commit: fsync `replica` and `digests`; one sled transaction inserts point 1
//!    and removes `pending`; sled is flushed; only then is the sync acknowledged.
//!
//! Every later sync, from point `N` to `N+1`, is journaled and settled after its
//! acknowledgement:
//!
//! 1. `pending[source] = {new_point: N+1, journal}` is written and flushed before the
//!    journal is created.
//! 2. Receive: each batch's new blocks are appended to `journal` (whole pages
//!    `O_DIRECT`). The replica, digests and deltas are not touched. The old digests
//!    of the changing blocks are read to know how many before-image bytes point `N`
//!    will keep, and the allocation is checked (grown, or the oldest points pruned,
//!    or [`StoreError::AllocationFull`]) now, at receive time.
//! 3. Commit: fdatasync `journal`; one sled transaction inserts point `N+1`, inserts
//!    `settle[source] = {point: N+1, ...}`, removes `pending` and updates the
//!    source's record; sled is flushed; only then is the sync acknowledged.
//! 4. Settle ([`Store::settle`], run by the service after it replied, still under
//!    the source's write lock): the journal is read back in groups of 4 MiB, every
//!    record's BLAKE3 checked against its digest. For each group: the old digests
//!    and before-images of the group's changing blocks are read from the replica,
//!    appended to `deltas/N.delta` and fdatasync'd; only then are the group's new
//!    bytes written into `replica` (io_uring) and its digests into `digests`. After
//!    the last group: fsync `replica` and `digests`; one sled transaction records
//!    point `N`'s delta and removes `settle`; flush; delete the journal. Retention
//!    runs after that.
//!
//! Anything that reads a source (restore, views, digests, verify, export, prune,
//! retention, the next sync) settles it first if a `settle` record is present
//! (`Store::settled`, one settle of a source at a time).
//!
//! Recovery at open: a `pending` record of a fresh sync deletes the source's files
//! and record; of a later sync it deletes the journal (the replica was never
//! touched; a pending record of an older node, which wrote into the replica, is
//! undone from its delta as below). Then, for every `settle` record, the
//! before-images a partial settle appended to `deltas/N.delta` are written back
//! into `replica` and `digests` (every valid record; a torn tail ends it), both are
//! fsync'd and the delta is deleted (`undo_delta`): because a block is overwritten
//! only after its before-image is durable, the replica is exactly point `N` again.
//! Then the point is settled again from the journal, which was made durable
//! before the commit. A journal left without a `settle` record (a crash after the
//! settle's flush) is deleted. So a crash at any instant leaves the previous point
//! or the new one, never a mix, and a point once acknowledged is never lost.
//!
//! A settle that fails (an I/O error, or a journal record whose check or checksum
//! fails: the only guard against a journal damaged on disk after its flush) undoes
//! what it applied in the same way, so the replica is point `N`, whole; the
//! `settle` record and the journal stay. The settle, and every later operation on
//! that source, fail with [`StoreError::SettleFailed`] naming the source, point and
//! cause (the node raises a critical alert `settle/<source>`), except restores and
//! views of the points before the unsettled one, which the whole replica and
//! their deltas still serve; the other sources are served. Each start of the node
//! tries the settle again.
//!
//! Limits: the journal takes disk space beyond the source's allocation (up to the
//! sync's size) until the point is settled. A node older than this format does not
//! know the `settle` tree: it would take the unsettled point's replica for the
//! point itself. Downgrade only after a clean start of the newer node (which
//! settles everything).
//!
//! # Space
//!
//! A source's recovery-point space (`points_alloc_bytes`) bounds the bytes its
//! deltas hold (each point's `delta.bytes`, plus the delta the sync being received
//! will need once settled, counted at receive time from the old digests of its
//! changing blocks: a block that is unwritten or zeros needs no bytes). A batch
//! whose before-images would exceed it first grows the allocation (pool
//! `auto_grow`, from the disk's unallocated capacity) or prunes the oldest points
//! (pool `on_full = prune-oldest`, never the sync's base point); failing both, the
//! sync fails with [`StoreError::AllocationFull`] and is rolled back like any failed
//! sync. The replica's space is fixed by the volume's size. The journal is not
//! counted: it takes up to the sync's size beyond the allocation until settled.
//!
//! # Pruning
//!
//! [`Store::prune`] removes a point that is not the newest. The oldest point's
//! delta is deleted after its record. A middle point's delta is merged into its
//! predecessor's: a temporary file gets the predecessor's records and then the
//! pruned point's records for blocks the predecessor does not hold, is fsync'd and
//! renamed over the predecessor's delta; then one sled transaction removes the point
//! and records the merged size; then the pruned delta is deleted. A merged delta is
//! right for the predecessor whether the pruned point still exists or not, so a
//! crash at any step leaves every point restorable; files a crash left behind (a
//! `.merge` file, a delta without its point) are removed at open. Retention
//! ([`Store::apply_retention`]) prunes with these steps.
//!
//! # Views
//!
//! A [`PointView`] (an NBD export) maps each block of its point to a delta record or
//! the replica. It holds its delta files open, so prunes do not disturb it, and a
//! settle tells every view of its source where the before-images it just made durable
//! are, before it overwrites the replica (see [`PointView`]).
//!
//! # Locking
//!
//! The store itself holds no locks across calls, but one settle mutex per source;
//! the node service serialises per source: one sync (with its settle) or prune at
//! a time (write lock), restores, verifies and digest reads share a read lock, so
//! they never see a half-applied sync or a half-settled point.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bulwark_common::block::{
    DIGEST_LEN, DIRECT_ALIGN, Digest, DirectWriter, Geometry, aligned_buffer, is_zero, open_direct,
    read_direct_at,
};
use bulwark_common::failpoint;
use bulwark_common::name::SourceName;
use bulwark_common::point::{Consistency, PointKind};
use bulwark_common::retention::Retention;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sled::Transactional;

use crate::uring::{self, Ring};

/// Format version written into every metadata record.
const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 1 + 4 + DIGEST_LEN;
const CHECK_LEN: usize = 8;
/// Bytes of new data a settle applies per group (see [`Store::settle`]): each group
/// is one delta append and fdatasync, then the replica writes. Small in unit tests,
/// so that the crash tests cross group boundaries.
const SETTLE_GROUP: u64 = if cfg!(test) { 8 * 4096 } else { 4 << 20 };
/// Threads that read before-images, and that write the replica, at once: the queue
/// depth scattered blocks need to keep a disk busy.
const IO_THREADS: usize = 8;

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {path}: {error}")]
    Io {
        op: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("metadata store: {0}")]
    Meta(String),
    #[error("pool disk {0} is not a directory: create or mount it first")]
    MissingDisk(PathBuf),
    #[error("data source {0} has no recovery point")]
    NoPoints(String),
    #[error("data source {source_name} has no point {point}")]
    NoSuchPoint { source_name: String, point: u64 },
    #[error(
        "data source {source_name}: the sync compared against point {base}, but the newest point here is {newest}; fetch the digests again"
    )]
    BaseMismatch {
        source_name: String,
        base: u64,
        newest: u64,
    },
    #[error(
        "data source {source_name} is {stored} bytes in blocks of {stored_block}, the sync says {size} bytes in blocks of {block}; resizing a volume is not supported"
    )]
    GeometryChanged {
        source_name: String,
        stored: u64,
        stored_block: u32,
        size: u64,
        block: u32,
    },
    #[error("block {block} was sent twice in one sync")]
    DuplicateBlock { block: u64 },
    #[error(
        "no pool disk has room for data source {source_name}: it needs {need} bytes, the most free on one disk is {free}"
    )]
    NoSpace {
        source_name: String,
        need: u64,
        free: u64,
    },
    #[error("damaged record in {path} at byte {at}: {message}")]
    Damaged {
        path: PathBuf,
        at: u64,
        message: String,
    },
    #[error(
        "data source {source_name}: its recovery-point space is full: this sync needs {need} bytes of before-images, the allocation is {allocated} bytes and older points hold {used}; nothing was kept, every earlier point is intact. Grow it with `bulwark allocate {source_name} --points SIZE`, or let retention keep fewer points"
    )]
    AllocationFull {
        source_name: String,
        need: u64,
        allocated: u64,
        used: u64,
    },
    #[error("data source {source_name}: point {point} is the newest and cannot be pruned")]
    PruneNewest { source_name: String, point: u64 },
    #[error(
        "data source {source_name}: point {point} is damaged (blocks {blocks:?} failed verification and could not be repaired); restore another point"
    )]
    PointDamaged {
        source_name: String,
        point: u64,
        blocks: Vec<u64>,
    },
    #[error("data source {source_name} is a {kind} source: {op} does not apply to it")]
    WrongKind {
        source_name: String,
        kind: &'static str,
        op: &'static str,
    },
    #[error("refused log ship: {0}")]
    BadLog(String),
    #[error(
        "data source {source_name}: point {point} could not be settled into the replica: {cause}; the point's journal is kept; this point cannot be read and the source cannot be synced until this is repaired (a restart of the node tries again)"
    )]
    SettleFailed {
        source_name: String,
        point: u64,
        cause: String,
    },
    /// A name that is not one safe path component (see `bulwark_common::name`).
    #[error("{0}")]
    BadName(#[from] bulwark_common::name::NameError),
    /// A source this node refused at open (its stored record is unreadable or names
    /// it with a name that is not allowed); the other sources are served.
    #[error("data source {source_name} is refused by this node: {why}")]
    Refused { source_name: String, why: String },
    /// A retention lock keeps what was to be removed (see [`lock`]).
    #[error("data source {source_name}: {why}")]
    Locked { source_name: String, why: String },
    /// A sync needs recovery-point space that only pruning locked points would give.
    #[error(
        "data source {source_name}: its recovery-point space is full ({used} of {allocated} bytes used, this sync needs {need} more) and its oldest point {point} is under a retention lock until {until}: nothing is pruned, the sync is refused and every point is intact. Grow the allocation with `bulwark allocate {source_name} --points SIZE`"
    )]
    LockedFull {
        source_name: String,
        need: u64,
        allocated: u64,
        used: u64,
        point: u64,
        until: String,
    },
    /// A simulated crash (tests only; see `crash`).
    #[error("simulated crash at {0}")]
    Crashed(&'static str),
}

/// Simulated crashes for the property test: when armed with `n`, the `n`-th write or
/// fsync boundary after arming fails with [`StoreError::Crashed`], and the test then
/// drops the store without any cleanup, as a crash would, and reopens it. Compiled to
/// nothing outside tests.
pub mod crash {
    #[cfg(test)]
    thread_local! {
        static COUNTDOWN: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
    }

    /// Crash at the `n`-th boundary from now (0 = the next one).
    #[cfg(test)]
    pub fn arm(n: u64) {
        COUNTDOWN.with(|c| c.set(Some(n)));
    }

    /// No more crashes; whether the armed one happened.
    #[cfg(test)]
    pub fn disarm() -> bool {
        COUNTDOWN.with(|c| c.replace(None)) == Some(u64::MAX)
    }

    #[cfg(test)]
    pub(super) fn boundary(what: &'static str) -> super::Result<()> {
        COUNTDOWN.with(|c| match c.get() {
            Some(0) => {
                c.set(Some(u64::MAX));
                Err(super::StoreError::Crashed(what))
            }
            Some(u64::MAX) | None => Ok(()),
            Some(n) => {
                c.set(Some(n - 1));
                Ok(())
            }
        })
    }

    #[cfg(not(test))]
    #[inline(always)]
    pub(super) fn boundary(_what: &'static str) -> super::Result<()> {
        Ok(())
    }
}

use crash::boundary;

/// What the node does when a sync's before-images do not fit the source's
/// recovery-point space.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnFull {
    /// Refuse the sync (the default): the operator decides what to give up.
    #[default]
    Refuse,
    /// Prune the oldest points (never the newest) until the sync fits.
    PruneOldest,
}

/// Pool-wide space policy (`[pool]` in node.toml).
#[derive(Debug, Clone, Copy, Default)]
pub struct PoolPolicy {
    /// Grow a full recovery-point allocation by this many bytes (rounded up to fit
    /// the sync) from the disk's unallocated capacity; 0 = never.
    pub auto_grow_bytes: u64,
    pub on_full: OnFull,
}

/// What the coordinator asks of one source: allocation overrides (0 = default) and
/// retention.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SourcePolicy {
    pub replica_alloc_bytes: u64,
    pub points_alloc_bytes: u64,
    pub retention: Retention,
    /// Log sources: points made at or after this time (and the one before) are
    /// kept whatever the retention says (the group's oldest volume point needs them).
    pub keep_after_ms: i64,
    /// The retention lock the admin set; the node only ever raises its own from it.
    pub lock: Option<(lock::LockMode, u64)>,
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Meta(e.to_string())
    }
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |error| StoreError::Io {
        op,
        path: path.to_path_buf(),
        error,
    }
}

/// One disk of the pool: a directory and the bytes Bulwark may allocate in it.
#[derive(Debug, Clone)]
pub struct PoolDisk {
    pub path: PathBuf,
    pub capacity_bytes: u64,
}

/// A data source as the node stores it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceMeta {
    pub v: u32,
    /// Checked again whenever the record is read: folders are named after it.
    pub name: SourceName,
    pub size_bytes: u64,
    pub block_size: u32,
    /// The pool disk holding the replica and deltas.
    pub disk: PathBuf,
    pub replica_alloc_bytes: u64,
    pub points_alloc_bytes: u64,
    pub created_ms: i64,
    /// Which points are kept.
    #[serde(default)]
    pub retention: Retention,
    /// The allocation overrides last applied from the coordinator (0 = default), so
    /// that an auto-grown allocation is not undone by the same policy again.
    #[serde(default)]
    pub applied_replica_alloc: u64,
    #[serde(default)]
    pub applied_points_alloc: u64,
    /// A volume (replica and deltas) or a log source (see [`logs`]).
    #[serde(default)]
    pub kind: SourceKind,
    /// See [`SourcePolicy::keep_after_ms`].
    #[serde(default)]
    pub keep_after_ms: i64,
    /// Its retention lock (see [`lock`]): kept by the node, raised by the
    /// coordinator's policy, lowered only as the lock's mode allows.
    #[serde(default)]
    pub lock: Option<lock::RetentionLock>,
}

impl SourceMeta {
    /// The block geometry.
    pub fn geometry(&self) -> Geometry {
        Geometry {
            size_bytes: self.size_bytes,
            block_size: self.block_size,
        }
    }
    /// Replica plus recovery-point space allocated to it (saturating: the figures
    /// may come from another node's export).
    pub fn allocated_bytes(&self) -> u64 {
        self.replica_alloc_bytes
            .saturating_add(self.points_alloc_bytes)
    }

    fn dir(&self) -> PathBuf {
        source_dir(&self.disk, &self.name)
    }

    /// Refuses `op` on a log source.
    fn require_volume(&self, op: &'static str) -> Result<()> {
        match self.kind {
            SourceKind::Volume => Ok(()),
            SourceKind::Log => Err(StoreError::WrongKind {
                source_name: self.name.to_string(),
                kind: "log",
                op,
            }),
        }
    }

    /// Takes the coordinator's policy: a changed override sets the allocation, and
    /// the retention is replaced.
    fn apply_policy(&mut self, p: &SourcePolicy) {
        if p.replica_alloc_bytes != self.applied_replica_alloc {
            self.applied_replica_alloc = p.replica_alloc_bytes;
            self.replica_alloc_bytes = if p.replica_alloc_bytes > 0 {
                p.replica_alloc_bytes
            } else {
                bulwark_common::alloc::replica_bytes(self.size_bytes)
            }
            .max(min_replica_bytes(self.geometry()));
        }
        if p.points_alloc_bytes != self.applied_points_alloc {
            self.applied_points_alloc = p.points_alloc_bytes;
            self.points_alloc_bytes = if p.points_alloc_bytes > 0 {
                p.points_alloc_bytes
            } else {
                bulwark_common::alloc::points_bytes(
                    self.size_bytes,
                    bulwark_common::alloc::DEFAULT_RETENTION_DAYS,
                )
            };
        }
        self.retention = p.retention;
        self.keep_after_ms = p.keep_after_ms;
        // A lock only goes up this way (a lower one from the coordinator is
        // ignored: lowering takes the officer's own call, see `lock`).
        if let Some((mode, min_age_ms)) = p.lock
            && min_age_ms > 0
            && lock::is_raise(self.lock, p.lock)
            && self
                .lock
                .is_none_or(|l| l.mode != mode || l.min_age_ms != min_age_ms)
        {
            tracing::info!(source = %self.name, mode = mode.as_str(), min_age_ms, "retention lock raised by the coordinator's policy");
            self.lock = Some(lock::RetentionLock {
                mode,
                min_age_ms,
                set_ms: bulwark_common::time::now_ms(),
            });
        }
    }
}

/// The least replica space a volume can live in: its bytes and its checksums.
pub fn min_replica_bytes(g: Geometry) -> u64 {
    g.size_bytes
        .saturating_add(g.block_count().saturating_mul(DIGEST_LEN as u64))
}

/// The folder of a source: only ever built from a checked name.
fn source_dir(disk: &Path, name: &SourceName) -> PathBuf {
    disk.join("bulwark").join(name.as_str())
}

/// A recovery point as the node records it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PointMeta {
    pub v: u32,
    pub id: u64,
    pub created_ms: i64,
    pub consistency: Consistency,
    pub kind: PointKind,
    pub blocks_changed: u64,
    pub bytes_changed: u64,
    /// The reverse delta to the next point; `None` for the newest point.
    pub delta: Option<DeltaMeta>,
    /// Blocks a verify found damaged and nothing could repair (log points: the
    /// ids of damaged log file copies).
    #[serde(default)]
    pub damaged: Vec<u64>,
    /// Log points: files that received bytes.
    #[serde(default)]
    pub files_changed: u64,
}

impl PointMeta {
    /// Bytes kept for this point (its delta; a log point's shipped bytes).
    pub fn stored_bytes(&self) -> u64 {
        match self.kind {
            PointKind::Log => self.bytes_changed,
            _ => self.delta.map_or(0, |d| d.bytes),
        }
    }
}

/// Size of a point's reverse delta.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct DeltaMeta {
    pub records: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pending {
    v: u32,
    new_point: u64,
    fresh: bool,
    disk: PathBuf,
    /// The sync writes its blocks to the source's journal (every sync but a first
    /// one); a record without it is from an older node, which wrote into the
    /// replica behind before-images in the delta.
    #[serde(default)]
    journal: bool,
}

/// A committed point whose blocks are still only in the source's journal (the
/// `settle` tree): [`Store::settle`] applies them to the replica.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Settle {
    v: u32,
    /// The committed point; the replica holds `point - 1` until it is settled.
    point: u64,
    disk: PathBuf,
}

type SettleLock = std::sync::Arc<std::sync::Mutex<()>>;

/// A settle that failed (see [`StoreError::SettleFailed`]).
#[derive(Debug, Clone)]
struct SettleFailure {
    point: u64,
    cause: String,
    /// The replica and digests were written back to the previous point, whole:
    /// the points before the unsettled one can still be read.
    replica_whole: bool,
}

impl SettleFailure {
    fn error(&self, name: &str) -> StoreError {
        StoreError::SettleFailed {
            source_name: name.to_string(),
            point: self.point,
            cause: self.cause.clone(),
        }
    }
}

/// What a sync is about to write.
#[derive(Debug, Clone)]
pub struct SyncSpec {
    pub source: SourceName,
    pub geometry: Geometry,
    /// The point the agent compared against (0 = none).
    pub base_point: u64,
    pub consistency: Consistency,
    pub kind: PointKind,
    /// The coordinator's policy for the source; `None` keeps what the node has.
    pub policy: Option<SourcePolicy>,
}

/// A source's records as a move carries them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportMeta {
    pub source: SourceMeta,
    pub points: Vec<PointMeta>,
    /// Log sources: every file generation's record (its copy is `logs/<id>`).
    #[serde(default)]
    pub log_files: Vec<LogFileMeta>,
}

fn import_dir(disk: &Path, name: &SourceName) -> PathBuf {
    disk.join("bulwark").join(format!("{name}.import"))
}

/// A source being copied in from another node: files are written into a staging
/// directory, then [`Import::commit`] makes them durable, moves them into place,
/// records the source and its points in one transaction, and verifies every
/// checksum (a source that fails is dropped again). Dropped without commit, the
/// staging directory is removed.
pub struct Import {
    store: Store,
    meta: ExportMeta,
    staging: PathBuf,
    files: HashMap<String, File>,
    bytes: u64,
    done: bool,
}

impl Import {
    /// Writes part of file `name` (`replica`, `digests` or `deltas/<point>.delta`
    /// of a point the move lists); `file_len` sizes the file on its first part.
    pub fn write(&mut self, name: &str, offset: u64, data: &[u8], file_len: u64) -> Result<()> {
        let log_len = self
            .meta
            .log_files
            .iter()
            .find(|f| name == logs::copy_name(f.id))
            .map(LogFileMeta::length);
        let allowed = if self.meta.source.kind == SourceKind::Log {
            log_len.is_some()
        } else {
            name == "replica"
                || name == "digests"
                || self
                    .meta
                    .points
                    .iter()
                    .any(|p| p.delta.is_some() && name == format!("deltas/{:020}.delta", p.id))
        };
        if !allowed {
            return Err(StoreError::Meta(format!(
                "a move sent an unexpected file {name:?}"
            )));
        }
        let geometry = self.meta.source.geometry();
        let expected_len = match name {
            "replica" => Some(geometry.size_bytes),
            "digests" => Some(geometry.block_count() * DIGEST_LEN as u64),
            _ => log_len,
        };
        if !self.files.contains_key(name) {
            if let Some(l) = expected_len
                && l != file_len
            {
                return Err(StoreError::Meta(format!(
                    "a move sent {name} of {file_len} bytes; the volume needs {l}"
                )));
            }
            let path = self.staging.join(name);
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(io("create", &path))?;
            f.set_len(file_len).map_err(io("size", &path))?;
            self.files.insert(name.to_string(), f);
        }
        let Some(f) = self.files.get(name) else {
            return Err(StoreError::Meta(format!("{name} is not open")));
        };
        let len = f.metadata().map_err(io("stat", &self.staging))?.len();
        if offset + data.len() as u64 > len {
            return Err(StoreError::Meta(format!(
                "a move wrote past the end of {name} ({} > {len})",
                offset + data.len() as u64
            )));
        }
        f.write_all_at(data, offset)
            .map_err(io("write", &self.staging.join(name)))?;
        self.bytes += data.len() as u64;
        Ok(())
    }

    /// Payload bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Makes the copy durable and the source this node's, then verifies it; returns
    /// the blocks verified.
    pub fn commit(mut self) -> Result<u64> {
        for (name, f) in &self.files {
            f.sync_all()
                .map_err(io("fsync", &self.staging.join(name)))?;
        }
        let want = if self.meta.source.kind == SourceKind::Log {
            // An empty log file sends no part: create its copy here.
            for f in &self.meta.log_files {
                let n = logs::copy_name(f.id);
                if f.length() == 0 && !self.files.contains_key(&n) {
                    let path = self.staging.join(&n);
                    let file = File::create(&path).map_err(io("create", &path))?;
                    file.sync_all().map_err(io("fsync", &path))?;
                    self.files.insert(n, file);
                }
            }
            self.meta.log_files.len()
        } else {
            2 + self
                .meta
                .points
                .iter()
                .filter(|p| p.delta.is_some())
                .count()
        };
        if self.files.len() != want {
            return Err(StoreError::Meta(format!(
                "the move sent {} of the {want} files of {}",
                self.files.len(),
                self.meta.source.name
            )));
        }
        fsync_dir(&self.staging.join("deltas"))?;
        fsync_dir(&self.staging.join("logs"))?;
        fsync_dir(&self.staging)?;
        let name = self.meta.source.name.clone();
        let dir = self.meta.source.dir();
        if dir.exists() {
            return Err(StoreError::Meta(format!(
                "{} exists already; remove it if it is a stale copy",
                dir.display()
            )));
        }
        std::fs::rename(&self.staging, &dir).map_err(io("rename", &self.staging))?;
        if let Some(parent) = dir.parent() {
            fsync_dir(parent)?;
        }
        self.done = true;
        let store = self.store.clone();
        let meta_bytes = encode(&self.meta.source)?;
        let points: Vec<(Vec<u8>, Vec<u8>)> = self
            .meta
            .points
            .iter()
            .map(|p| Ok((point_key(&name, p.id), encode(p)?)))
            .collect::<Result<_>>()?;
        let log_files: Vec<(Vec<u8>, Vec<u8>)> = self
            .meta
            .log_files
            .iter()
            .map(|f| Ok((point_key(&name, f.id), encode(f)?)))
            .collect::<Result<_>>()?;
        (&store.sources, &store.points, &store.logfiles)
            .transaction(|(s, p, lf)| {
                s.insert(name.as_bytes(), meta_bytes.as_slice())?;
                for (k, v) in &points {
                    p.insert(k.as_slice(), v.as_slice())?;
                }
                for (k, v) in &log_files {
                    lf.insert(k.as_slice(), v.as_slice())?;
                }
                Ok(())
            })
            .map_err(txn_error)?;
        store.db.flush()?;
        let before: Vec<(u64, Vec<u64>)> = self
            .meta
            .points
            .iter()
            .filter(|p| !p.damaged.is_empty())
            .map(|p| (p.id, p.damaged.clone()))
            .collect();
        let checked = match store.verify(&name, 0) {
            Ok(v) if v.damaged_points == before && v.damaged_replica.is_empty() => v,
            Ok(v) => {
                store.remove_source(&name)?;
                return Err(StoreError::Meta(format!(
                    "the copy of {name} failed verification: {} replica blocks and {} points damaged; dropped",
                    v.damaged_replica.len(),
                    v.damaged_points.len()
                )));
            }
            Err(e) => {
                store.remove_source(&name)?;
                return Err(e);
            }
        };
        Ok(checked.blocks_checked)
    }
}

impl Drop for Import {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.staging);
        }
    }
}

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

/// Space used and allocated in the pool.
#[derive(Debug, Clone, Default)]
pub struct PoolUsage {
    pub disks: Vec<DiskUsage>,
    pub sources: Vec<SourceUsage>,
}

/// One disk's figures.
#[derive(Debug, Clone)]
pub struct DiskUsage {
    pub path: PathBuf,
    pub capacity_bytes: u64,
    pub allocated_bytes: u64,
    pub used_bytes: u64,
}

/// One data source's figures.
#[derive(Debug, Clone)]
pub struct SourceUsage {
    pub name: String,
    pub newest_point: u64,
    pub points: u64,
    pub used_bytes: u64,
    pub allocated_bytes: u64,
    pub replica_alloc_bytes: u64,
    pub points_alloc_bytes: u64,
    /// Bytes the points' deltas hold.
    pub points_used_bytes: u64,
    /// Points a verify found damaged.
    pub damaged_points: u64,
    /// When the oldest and the newest point were made (0 = none).
    pub oldest_point_ms: i64,
    pub newest_point_ms: i64,
}

/// The node's replicas and recovery points. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    sources: sled::Tree,
    points: sled::Tree,
    pending: sled::Tree,
    settle: sled::Tree,
    logfiles: sled::Tree,
    /// One per source, held while a settle of it runs, so that two readers never
    /// settle the same source at once (settles of different sources do not wait for
    /// each other).
    settle_locks: std::sync::Arc<std::sync::Mutex<HashMap<String, SettleLock>>>,
    /// Settles that failed since the store opened, by source: every operation on
    /// the source fails with it.
    settle_failed: std::sync::Arc<std::sync::Mutex<HashMap<String, SettleFailure>>>,
    /// Sources refused at open (a stored record that does not decode, or a name
    /// that is not one safe path component), by their key as stored: nothing is
    /// done with them, and the node raises an alert; the others are served.
    refused: std::sync::Arc<HashMap<String, String>>,
    disks: std::sync::Arc<Vec<PoolDisk>>,
    policy: PoolPolicy,
    /// Open read-only views of points (NBD exports), by source: a settle tells them
    /// where the before-images of the blocks it overwrites went, before it
    /// overwrites them.
    views: std::sync::Arc<std::sync::Mutex<HashMap<String, Vec<std::sync::Weak<PointView>>>>>,
}

/// The stored sources whose name or record this node refuses (see `Store::refused`).
fn refused_sources(sources: &sled::Tree) -> Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    for item in sources.iter() {
        let (k, v) = item?;
        let key = String::from_utf8_lossy(&k).to_string();
        let why = match SourceName::parse(key.as_str()) {
            Err(e) => Some(e.to_string()),
            Ok(_) => match decode::<SourceMeta>(&v) {
                Err(e) => Some(format!("its record cannot be read: {e}")),
                Ok(m) if m.name != key => {
                    Some(format!("its record names another source ({})", m.name))
                }
                Ok(_) => None,
            },
        };
        if let Some(why) = why {
            tracing::error!(source = %bulwark_common::text::escape(&key),
                "stored data source refused: {why}; its files are left alone, every other source is served");
            out.insert(key, why);
        }
    }
    Ok(out)
}

fn point_key(source: &str, id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(source.len() + 9);
    k.extend_from_slice(source.as_bytes());
    k.push(0);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn point_prefix(source: &str) -> Vec<u8> {
    let mut k = source.as_bytes().to_vec();
    k.push(0);
    k
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| StoreError::Meta(e.to_string()))
}

fn decode<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| StoreError::Meta(format!("unreadable record: {e}")))
}

/// A failed sled transaction (they abort only on I/O errors: no closure aborts).
fn txn_error(e: sled::transaction::TransactionError<()>) -> StoreError {
    StoreError::Meta(format!("{e:?}"))
}

fn delta_path(dir: &Path, point: u64) -> PathBuf {
    dir.join("deltas").join(format!("{point:020}.delta"))
}

fn journal_path(dir: &Path) -> PathBuf {
    dir.join("journal")
}

/// The digests of a block of zeros: of a whole block, and of the volume's last
/// block (shorter in some volumes).
#[derive(Debug, Clone, Copy)]
struct ZeroDigests {
    whole: Digest,
    last: Digest,
    last_block: u64,
}

impl ZeroDigests {
    fn new(g: Geometry) -> ZeroDigests {
        let last_block = g.block_count().saturating_sub(1);
        ZeroDigests {
            whole: Digest::of(&vec![0u8; g.block_size as usize]),
            last: Digest::of(&vec![0u8; g.block_len(last_block) as usize]),
            last_block,
        }
    }
    fn of(&self, block: u64) -> Digest {
        if block == self.last_block {
            self.last
        } else {
            self.whole
        }
    }
}

/// Makes a source's replica and digests durable (a first sync's commit, the end of
/// a settle).
fn make_durable(replica: &File, digests: &File, dir: &Path) -> Result<()> {
    replica
        .sync_all()
        .map_err(io("fsync", &dir.join("replica")))?;
    digests
        .sync_all()
        .map_err(io("fsync", &dir.join("digests")))
}

/// How [`open_rw`] treats a file that is missing or has contents.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Open {
    /// It must exist.
    Existing,
    /// Made if missing, kept as it is otherwise.
    Create,
    /// Made if missing, emptied otherwise.
    Truncate,
}

/// Opens one of a source's files for reading and writing.
fn open_rw(path: &Path, how: Open) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(how != Open::Existing)
        .truncate(how == Open::Truncate)
        .open(path)
        .map_err(io(
            if how == Open::Truncate {
                "create"
            } else {
                "open"
            },
            path,
        ))
}

fn fsync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io("fsync directory", path))
}

/// Bytes free for unprivileged writers on the file system holding `path`.
#[allow(unsafe_code)]
fn fs_free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct we own; `c` is a valid C string
    // that outlives the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

/// Bytes actually allocated to the files of a directory tree (sparse-aware).
fn used_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    for e in entries.flatten() {
        match e.metadata() {
            Ok(m) if m.is_dir() => total += used_bytes(&e.path()),
            Ok(m) => total += m.blocks() * 512,
            Err(_) => {}
        }
    }
    total
}

impl Store {
    /// Opens (or creates) the store and rolls back any sync a crash interrupted.
    pub fn open(data_dir: &Path, disks: Vec<PoolDisk>) -> Result<Store> {
        Store::open_with(data_dir, disks, PoolPolicy::default())
    }

    /// [`Store::open`] with a pool policy.
    pub fn open_with(data_dir: &Path, disks: Vec<PoolDisk>, policy: PoolPolicy) -> Result<Store> {
        std::fs::create_dir_all(data_dir).map_err(io("create", data_dir))?;
        for d in &disks {
            // A pool disk must exist already: creating a missing mount point would
            // quietly fill whatever file system lies beneath it.
            if !d.path.is_dir() {
                return Err(StoreError::MissingDisk(d.path.clone()));
            }
            std::fs::create_dir_all(d.path.join("bulwark")).map_err(io("create", &d.path))?;
        }
        let meta = data_dir.join("meta");
        let db = sled::Config::new()
            .path(&meta)
            .cache_capacity(16 * 1024 * 1024)
            .open()
            .map_err(|e| StoreError::Meta(format!("cannot open {}: {e}", meta.display())))?;
        let sources = db.open_tree("sources")?;
        let refused = std::sync::Arc::new(refused_sources(&sources)?);
        let store = Store {
            refused,
            sources,
            points: db.open_tree("points")?,
            pending: db.open_tree("pending")?,
            settle: db.open_tree("settle")?,
            logfiles: db.open_tree("logfiles")?,
            settle_locks: Default::default(),
            settle_failed: Default::default(),
            db,
            disks: std::sync::Arc::new(disks),
            policy,
            views: Default::default(),
        };
        for item in store.pending.iter() {
            let (k, v) = item?;
            let name = String::from_utf8_lossy(&k).to_string();
            if store.refused.contains_key(&name) {
                continue;
            }
            let pending: Pending = decode(&v)?;
            tracing::warn!(source = %name, point = pending.new_point,
                "rolling back a sync that did not commit");
            store.roll_back(&name, &pending)?;
        }
        // Settles a crash (or an error) interrupted: undo what was applied, then
        // settle again from the journal. A settle that fails is kept as the
        // source's error; the node serves the other sources.
        let settles: Vec<(String, Settle)> = store
            .settle
            .iter()
            .map(|item| {
                let (k, v) = item?;
                Ok((String::from_utf8_lossy(&k).to_string(), decode(&v)?))
            })
            .collect::<Result<_>>()?;
        for (name, rec) in settles {
            if store.refused.contains_key(&name) {
                continue;
            }
            tracing::warn!(source = %name, point = rec.point,
                "settling a committed point a crash interrupted");
            // The settle writes back what a partial settle applied first.
            match store.settle(&name) {
                Ok(()) => {}
                Err(e @ StoreError::Crashed(_)) => return Err(e),
                Err(e) => tracing::error!(source = %name, point = rec.point, "{e}"),
            }
        }
        for s in store.all_sources()? {
            match s.kind {
                SourceKind::Volume => store.remove_orphans(&s)?,
                SourceKind::Log => store.recover_logs(&s)?,
            }
        }
        // Imports a crash interrupted: the coordinator starts the move again.
        for d in store.disks.iter() {
            let Ok(entries) = std::fs::read_dir(d.path.join("bulwark")) else {
                continue;
            };
            for e in entries.flatten() {
                let path = e.path();
                if path.extension().is_some_and(|x| x == "import") {
                    tracing::warn!(path = %path.display(), "removing an import a crash interrupted");
                    std::fs::remove_dir_all(&path).map_err(io("remove", &path))?;
                }
            }
        }
        Ok(store)
    }

    /// The records and files of a source, for a move to another node (see
    /// [`Import`]). The caller holds the source's read lock while the files are read.
    pub fn export(&self, name: &str) -> Result<(ExportMeta, Vec<(String, PathBuf)>)> {
        self.settled(name)?;
        let source = self
            .source(name)?
            .ok_or_else(|| StoreError::NoPoints(name.to_string()))?;
        let points = self.points(name)?;
        let dir = source.dir();
        if source.kind == SourceKind::Log {
            let log_files = self.log_files(name)?;
            let files = log_files
                .iter()
                .map(|f| (logs::copy_name(f.id), dir.join(logs::copy_name(f.id))))
                .collect();
            return Ok((
                ExportMeta {
                    source,
                    points,
                    log_files,
                },
                files,
            ));
        }
        let mut files = vec![
            ("replica".to_string(), dir.join("replica")),
            ("digests".to_string(), dir.join("digests")),
        ];
        for p in points.iter().filter(|p| p.delta.is_some()) {
            files.push((format!("deltas/{:020}.delta", p.id), delta_path(&dir, p.id)));
        }
        Ok((
            ExportMeta {
                source,
                points,
                log_files: Vec::new(),
            },
            files,
        ))
    }

    /// Starts taking in a source another node exports: its files go to a staging
    /// directory on the pool disk with the most unallocated room for its allocation.
    pub fn import(&self, meta: ExportMeta) -> Result<Import> {
        let name = meta.source.name.clone();
        if self.source(&name)?.is_some() {
            return Err(StoreError::Meta(format!(
                "data source {name} is already stored on this node"
            )));
        }
        if meta.source.kind == SourceKind::Volume
            && meta.source.replica_alloc_bytes < min_replica_bytes(meta.source.geometry())
        {
            return Err(StoreError::Meta(format!(
                "the export of {name} gives it {} bytes of replica space, less than its volume of {} bytes needs",
                meta.source.replica_alloc_bytes, meta.source.size_bytes
            )));
        }
        let need = meta.source.allocated_bytes();
        let mut best: Option<(&PoolDisk, u64)> = None;
        for d in self.disks.iter() {
            let free = self.unallocated(&d.path, &name)?;
            if best.is_none_or(|(_, f)| free > f) {
                best = Some((d, free));
            }
        }
        let disk = match best {
            Some((d, free)) if free >= need => d.path.clone(),
            other => {
                return Err(StoreError::NoSpace {
                    source_name: name.to_string(),
                    need,
                    free: other.map_or(0, |(_, f)| f),
                });
            }
        };
        let staging = import_dir(&disk, &name);
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(io("remove", &staging))?;
        }
        std::fs::create_dir_all(staging.join("deltas")).map_err(io("create", &staging))?;
        std::fs::create_dir_all(staging.join("logs")).map_err(io("create", &staging))?;
        let mut meta = meta;
        meta.source.disk = disk;
        Ok(Import {
            store: self.clone(),
            meta,
            staging,
            files: HashMap::new(),
            bytes: 0,
            done: false,
        })
    }

    /// Deletes a source's records and files (it moved to another node). Records
    /// first: a crash in between leaves only files, which the next open reports.
    /// The caller holds the source's write lock.
    pub fn drop_source(&self, name: &str) -> Result<bool> {
        if let Some(meta) = self.source(name)? {
            for p in self.points(name)? {
                self.check_unlocked(&meta, &p)?;
            }
        }
        self.remove_source(name)
    }

    /// Deletes a source's records and files whatever its lock says: only for a copy
    /// that is not the source's (an import that failed verification).
    fn remove_source(&self, name: &str) -> Result<bool> {
        let Some(meta) = self.source(name)? else {
            return Ok(false);
        };
        let keys: Vec<sled::IVec> = self
            .points
            .scan_prefix(point_prefix(name))
            .keys()
            .collect::<std::result::Result<_, _>>()?;
        let log_keys: Vec<sled::IVec> = self
            .logfiles
            .scan_prefix(point_prefix(name))
            .keys()
            .collect::<std::result::Result<_, _>>()?;
        (
            &self.sources,
            &self.points,
            &self.pending,
            &self.logfiles,
            &self.settle,
        )
            .transaction(|(s, p, pend, lf, st)| {
                s.remove(name.as_bytes())?;
                pend.remove(name.as_bytes())?;
                st.remove(name.as_bytes())?;
                for k in &keys {
                    p.remove(k)?;
                }
                for k in &log_keys {
                    lf.remove(k)?;
                }
                Ok(())
            })
            .map_err(txn_error)?;
        self.db.flush()?;
        self.settle_failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        let dir = meta.dir();
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io("remove", &dir))?;
        }
        tracing::info!(source = name, "data source dropped from this node");
        Ok(true)
    }

    /// Deletes what an interrupted prune left behind: a merge's temporary file, and
    /// delta files of points that no longer exist (or of the newest point, which has
    /// none once no sync is pending).
    fn remove_orphans(&self, meta: &SourceMeta) -> Result<()> {
        let journal = journal_path(&meta.dir());
        if !self.settle.contains_key(&meta.name)? && journal.exists() {
            tracing::info!(source = %meta.name, "removing the journal of a settled point");
            std::fs::remove_file(&journal).map_err(io("remove", &journal))?;
            fsync_dir(&meta.dir())?;
        }
        let dir = meta.dir().join("deltas");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(());
        };
        let points = self.points(&meta.name)?;
        let newest = points.last().map_or(0, |p| p.id);
        let keep: std::collections::HashSet<String> = points
            .iter()
            .filter(|p| p.id != newest)
            .map(|p| format!("{:020}.delta", p.id))
            .collect();
        let mut removed = false;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !keep.contains(&name) {
                tracing::info!(source = %meta.name, file = %name, "removing a file an interrupted prune left");
                std::fs::remove_file(e.path()).map_err(io("remove", &e.path()))?;
                removed = true;
            }
        }
        if removed {
            fsync_dir(&dir)?;
        }
        Ok(())
    }

    /// Another metadata tree in the same database (the node's assignment cache).
    pub fn tree(&self, name: &str) -> Result<sled::Tree> {
        Ok(self.db.open_tree(name)?)
    }

    /// Makes every metadata write so far durable.
    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    /// The pool's disks.
    pub fn disks(&self) -> &[PoolDisk] {
        &self.disks
    }

    /// A stored data source.
    pub fn source(&self, name: &str) -> Result<Option<SourceMeta>> {
        if let Some(why) = self.refused.get(name) {
            return Err(StoreError::Refused {
                source_name: bulwark_common::text::escape(name),
                why: why.clone(),
            });
        }
        self.sources.get(name)?.map(|v| decode(&v)).transpose()
    }

    /// Every stored data source (but those refused at open).
    pub fn all_sources(&self) -> Result<Vec<SourceMeta>> {
        self.sources
            .iter()
            .filter(|r| {
                r.as_ref()
                    .is_ok_and(|(k, _)| !self.refused.contains_key(&*String::from_utf8_lossy(k)))
            })
            .map(|r| decode(&r?.1))
            .collect()
    }

    /// Sources refused at open, by name (escaped for printing), with the reason.
    pub fn refused_sources(&self) -> HashMap<String, String> {
        self.refused
            .iter()
            .map(|(k, why)| (bulwark_common::text::escape(k), why.clone()))
            .collect()
    }

    /// Points of a source, oldest first.
    pub fn points(&self, name: &str) -> Result<Vec<PointMeta>> {
        self.points
            .scan_prefix(point_prefix(name))
            .map(|r| decode(&r?.1))
            .collect()
    }

    /// The newest point of a source.
    pub fn newest_point(&self, name: &str) -> Result<Option<PointMeta>> {
        match self.points.scan_prefix(point_prefix(name)).next_back() {
            Some(r) => Ok(Some(decode(&r?.1)?)),
            None => Ok(None),
        }
    }

    /// What is wrong with the pool's disks, if anything: a disk whose directory is
    /// gone or not writable, or whose file system has less room left than the
    /// allocations on it may still fill.
    pub fn health(&self, usage: &PoolUsage) -> Vec<String> {
        let mut problems = Vec::new();
        for d in &usage.disks {
            let probe = d.path.join("bulwark").join(".health-probe");
            if let Err(e) =
                std::fs::write(&probe, b"ok").and_then(|()| std::fs::remove_file(&probe))
            {
                problems.push(format!("disk {} is not writable: {e}", d.path.display()));
                continue;
            }
            if let Some(free) = fs_free_bytes(&d.path) {
                let promised = d.allocated_bytes.saturating_sub(d.used_bytes);
                if free < promised {
                    problems.push(format!(
                        "disk {} has {free} bytes free on its file system, less than the {promised} its allocations may still use",
                        d.path.display()
                    ));
                }
            }
        }
        problems
    }

    /// Space figures for heartbeats and the CLI. Each source directory is walked
    /// once; a disk's figures are the sums over its sources.
    pub fn usage(&self) -> Result<PoolUsage> {
        let mut usage = PoolUsage {
            disks: self
                .disks
                .iter()
                .map(|d| DiskUsage {
                    path: d.path.clone(),
                    capacity_bytes: d.capacity_bytes,
                    allocated_bytes: 0,
                    used_bytes: 0,
                })
                .collect(),
            sources: Vec::new(),
        };
        for s in self.all_sources()? {
            let points = self.points(&s.name)?;
            let used = used_bytes(&s.dir());
            if let Some(d) = usage.disks.iter_mut().find(|d| d.path == s.disk) {
                d.allocated_bytes += s.allocated_bytes();
                d.used_bytes += used;
            }
            usage.sources.push(SourceUsage {
                newest_point: points.last().map_or(0, |p| p.id),
                points: points.len() as u64,
                used_bytes: used,
                allocated_bytes: s.allocated_bytes(),
                replica_alloc_bytes: s.replica_alloc_bytes,
                points_alloc_bytes: s.points_alloc_bytes,
                points_used_bytes: match s.kind {
                    SourceKind::Volume => points.iter().map(PointMeta::stored_bytes).sum(),
                    SourceKind::Log => self.log_bytes(&s.name)?,
                },
                damaged_points: points.iter().filter(|p| !p.damaged.is_empty()).count() as u64,
                oldest_point_ms: points.first().map_or(0, |p| p.created_ms),
                newest_point_ms: points.last().map_or(0, |p| p.created_ms),
                name: s.name.to_string(),
            });
        }
        Ok(usage)
    }

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
        read_at_full(&f, &mut buf, first * DIGEST_LEN as u64, &path)?;
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
            self.points.insert(point_key(name, q.id), encode(q)?)?;
        }
        if !updates.is_empty() {
            self.db.flush()?;
        }
        out.damaged_points.reverse();
        Ok(out)
    }

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
                recs.push((rec.block, rec.data_offset));
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
    fn views_of(&self, name: &str) -> Vec<std::sync::Arc<PointView>> {
        let views = self.views.lock().unwrap_or_else(|e| e.into_inner());
        views
            .get(name)
            .map(|l| l.iter().filter_map(std::sync::Weak::upgrade).collect())
            .unwrap_or_default()
    }

    /// Starts a sync. Nothing on disk changes until [`SyncTxn::apply`].
    pub fn begin_sync(&self, spec: SyncSpec) -> Result<SyncTxn> {
        // The previous point is settled into the replica first.
        self.settled(&spec.source)?;
        // A sync that was dropped without commit or abort is undone first.
        if let Some(v) = self.pending.get(&spec.source)? {
            let pending: Pending = decode(&v)?;
            self.roll_back(&spec.source, &pending)?;
        }
        let newest = self.newest_point(&spec.source)?;
        let newest_id = newest.as_ref().map_or(0, |p| p.id);
        if spec.base_point != newest_id {
            return Err(StoreError::BaseMismatch {
                source_name: spec.source.to_string(),
                base: spec.base_point,
                newest: newest_id,
            });
        }
        let existing = self.source(&spec.source)?;
        if let Some(m) = &existing
            && (m.size_bytes != spec.geometry.size_bytes
                || m.block_size != spec.geometry.block_size)
        {
            return Err(StoreError::GeometryChanged {
                source_name: spec.source.to_string(),
                stored: m.size_bytes,
                stored_block: m.block_size,
                size: spec.geometry.size_bytes,
                block: spec.geometry.block_size,
            });
        }
        let mut meta = match existing {
            Some(m) => {
                m.require_volume("a block sync")?;
                m
            }
            None => self.place(&spec)?,
        };
        if let Some(p) = &spec.policy {
            meta.apply_policy(p);
        }
        let points_used = self.points_used(&spec.source)?;
        let zero = ZeroDigests::new(spec.geometry);
        Ok(SyncTxn {
            store: self.clone(),
            fresh: newest.is_none(),
            new_point: newest_id + 1,
            spec,
            meta,
            files: None,
            touched: vec![0u64; 0],
            blocks: 0,
            bytes: 0,
            delta_len: 0,
            journal_len: 0,
            points_used,
            zero,
            times: ApplyTimes::default(),
        })
    }

    /// Bytes the points of a source keep in deltas.
    pub fn points_used(&self, name: &str) -> Result<u64> {
        if self
            .source(name)?
            .is_some_and(|m| m.kind == SourceKind::Log)
        {
            return self.log_bytes(name);
        }
        Ok(self.points(name)?.iter().map(PointMeta::stored_bytes).sum())
    }

    /// Bytes of a disk not allocated to any source but `except`.
    fn unallocated(&self, disk: &Path, except: &str) -> Result<u64> {
        let capacity = self
            .disks
            .iter()
            .find(|d| d.path == disk)
            .map_or(0, |d| d.capacity_bytes);
        let allocated: u64 = self
            .all_sources()?
            .iter()
            .filter(|s| s.disk == disk && s.name != except)
            .map(SourceMeta::allocated_bytes)
            .sum();
        Ok(capacity.saturating_sub(allocated))
    }

    /// Stores a source's record (an allocation change) durably.
    fn put_meta(&self, meta: &SourceMeta) -> Result<()> {
        self.sources.insert(meta.name.as_bytes(), encode(meta)?)?;
        self.db.flush()?;
        Ok(())
    }

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
        let updated_prev = if idx > 0 {
            let mut prev = points[idx - 1].clone();
            let merged = merge_deltas(&delta_path(&dir, prev.id), &victim_path, meta.geometry())?;
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
        (&self.points,)
            .transaction(|(pts,)| {
                pts.remove(point_key(name, id))?;
                if let (Some(prev), Some(b)) = (&updated_prev, &prev_bytes) {
                    pts.insert(point_key(name, prev.id), b.as_slice())?;
                }
                Ok(())
            })
            .map_err(txn_error)?;
        boundary("prune: point removed, before flush")?;
        self.db.flush()?;
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

    fn place(&self, spec: &SyncSpec) -> Result<SourceMeta> {
        let size = spec.geometry.size_bytes;
        let policy = spec.policy.unwrap_or_default();
        let least = min_replica_bytes(spec.geometry);
        let replica = match policy.replica_alloc_bytes {
            0 => bulwark_common::alloc::replica_bytes(size),
            n => n,
        }
        .max(least);
        let points = match policy.points_alloc_bytes {
            0 => bulwark_common::alloc::points_bytes(
                size,
                bulwark_common::alloc::DEFAULT_RETENTION_DAYS,
            ),
            n => n,
        };
        // Checked before anything is created: a hostile size or allocation must
        // not wrap the sum into something that fits.
        let Some(need) = replica.checked_add(points) else {
            return Err(StoreError::NoSpace {
                source_name: spec.source.to_string(),
                need: u64::MAX,
                free: 0,
            });
        };
        let sources = self.all_sources()?;
        let mut best: Option<(&PoolDisk, u64)> = None;
        for d in self.disks.iter() {
            let allocated: u64 = sources
                .iter()
                .filter(|s| s.disk == d.path)
                .map(SourceMeta::allocated_bytes)
                .sum();
            let free = d.capacity_bytes.saturating_sub(allocated);
            if best.is_none_or(|(_, f)| free > f) {
                best = Some((d, free));
            }
        }
        match best {
            Some((d, free)) if free >= need => Ok(SourceMeta {
                v: FORMAT_VERSION,
                name: spec.source.clone(),
                size_bytes: size,
                block_size: spec.geometry.block_size,
                disk: d.path.clone(),
                replica_alloc_bytes: replica,
                points_alloc_bytes: points,
                created_ms: bulwark_common::time::now_ms(),
                retention: policy.retention,
                applied_replica_alloc: policy.replica_alloc_bytes,
                applied_points_alloc: policy.points_alloc_bytes,
                kind: SourceKind::Volume,
                keep_after_ms: 0,
                lock: None,
            }),
            other => Err(StoreError::NoSpace {
                source_name: spec.source.to_string(),
                need,
                free: other.map_or(0, |(_, f)| f),
            }),
        }
    }

    /// Undoes an uncommitted sync (see the module docs).
    fn roll_back(&self, name: &str, pending: &Pending) -> Result<()> {
        let dir = source_dir(&pending.disk, &SourceName::parse(name)?);
        if pending.fresh {
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(io("remove", &dir))?;
            }
            self.sources.remove(name)?;
        } else {
            // The replica was never touched: the journal goes.
            let journal = journal_path(&dir);
            if journal.exists() {
                std::fs::remove_file(&journal).map_err(io("remove", &journal))?;
                boundary("rollback: journal removed")?;
                fsync_dir(&dir)?;
            }
            // A sync of an older node wrote into the replica behind its
            // before-images.
            let old = pending.new_point - 1;
            if delta_path(&dir, old).exists() {
                let meta = self.source(name)?.ok_or_else(|| {
                    StoreError::Meta(format!("pending sync of unknown source {name}"))
                })?;
                self.undo_delta(name, &dir, meta.geometry(), old)?;
            }
            tracing::info!(
                source = name,
                point = old,
                "a sync that did not commit was dropped"
            );
        }
        self.pending.remove(name)?;
        self.db.flush()?;
        Ok(())
    }

    /// Writes every valid record of `deltas/<old>.delta` (the before-images a partial
    /// settle, or an older node's sync, made durable before it overwrote their
    /// blocks) back into the replica and digests, makes both durable and deletes the
    /// delta: the replica is point `old` again. Returns the blocks written back.
    fn undo_delta(&self, name: &str, dir: &Path, geometry: Geometry, old: u64) -> Result<u64> {
        let delta = delta_path(dir, old);
        if !delta.exists() {
            return Ok(0);
        }
        let replica_path = dir.join("replica");
        let digests_path = dir.join("digests");
        let replica = open_rw(&replica_path, Open::Existing)?;
        let digests = open_rw(&digests_path, Open::Existing)?;
        let mut restored = 0u64;
        let mut reader = DeltaReader::open(&delta, geometry)?;
        while let Some(rec) = reader.next_record(true)? {
            let offset = geometry.offset_of(rec.block);
            let len = geometry.block_len(rec.block) as usize;
            match &rec.data {
                Some(d) => replica
                    .write_all_at(d, offset)
                    .map_err(io("write", &replica_path))?,
                None => replica
                    .write_all_at(&vec![0u8; len], offset)
                    .map_err(io("write", &replica_path))?,
            }
            digests
                .write_all_at(&rec.digest.0, rec.block * DIGEST_LEN as u64)
                .map_err(io("write", &digests_path))?;
            restored += 1;
            boundary("undo: block restored")?;
        }
        make_durable(&replica, &digests, dir)?;
        boundary("undo: replica durable")?;
        std::fs::remove_file(&delta).map_err(io("remove", &delta))?;
        boundary("undo: delta removed")?;
        fsync_dir(&dir.join("deltas"))?;
        tracing::info!(
            source = name,
            point = old,
            blocks = restored,
            "replica written back to point"
        );
        Ok(restored)
    }

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
        let Some(v) = self.settle.get(name)? else {
            return Ok(());
        };
        let rec: Settle = decode(&v)?;
        match self.settle_now(name, &rec) {
            Ok(()) => Ok(()),
            Err(e @ StoreError::Crashed(_)) => Err(e),
            Err(e) => {
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
                Err(self.settle_failed(name, &rec, cause, replica_whole))
            }
        }
    }

    /// Settles the source first if a committed point of it is still in its journal
    /// (see [`Store::settle`]): anything that reads a source calls this first. Fails
    /// with the source's failed settle, if any.
    fn settled(&self, name: &str) -> Result<()> {
        if let Some(e) = self.settle_failure(name) {
            return Err(e);
        }
        if self.settle.contains_key(name)? {
            self.settle(name)?;
        }
        Ok(())
    }

    /// [`Store::settled`] for a read of `point` (0 = the newest): after a failed
    /// settle whose undo left the replica at the previous point, whole, the points
    /// before the unsettled one are read as usual (the replica is the newest of
    /// them, and their deltas are untouched); the unsettled point is not.
    fn settled_for_read(&self, name: &str, point: u64) -> Result<()> {
        let readable = self
            .settle_failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .is_some_and(|f| f.replica_whole && point != 0 && point < f.point);
        if readable { Ok(()) } else { self.settled(name) }
    }

    /// Records a failed settle of `name` and returns its error.
    fn settle_failed(
        &self,
        name: &str,
        rec: &Settle,
        cause: String,
        replica_whole: bool,
    ) -> StoreError {
        let failure = SettleFailure {
            point: rec.point,
            cause,
            replica_whole,
        };
        let e = failure.error(name);
        self.settle_failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), failure);
        e
    }

    /// The failed settle of a source, as its error.
    fn settle_failure(&self, name: &str) -> Option<StoreError> {
        let failed = self.settle_failed.lock().unwrap_or_else(|e| e.into_inner());
        failed.get(name).map(|f| f.error(name))
    }

    /// Sources whose settle failed, with the error (an alert each).
    pub fn settle_failures(&self) -> HashMap<String, String> {
        let failed = self.settle_failed.lock().unwrap_or_else(|e| e.into_inner());
        failed
            .iter()
            .map(|(name, f)| (name.clone(), f.error(name).to_string()))
            .collect()
    }

    /// A reader of before-images of the source's replica as it stands.
    fn before_image_reader(&self, dir: &Path, geometry: Geometry) -> Result<BeforeImageReader> {
        let replica_path = dir.join("replica");
        let digests_path = dir.join("digests");
        Ok(BeforeImageReader {
            keeps_deltas: true,
            read_images: true,
            replica: File::open(&replica_path).map_err(io("open", &replica_path))?,
            direct: open_direct(&replica_path, true),
            digests: File::open(&digests_path).map_err(io("open", &digests_path))?,
            replica_path,
            digests_path,
            geometry,
        })
    }

    fn settle_now(&self, name: &str, rec: &Settle) -> Result<()> {
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
            delta: Some(DeltaAppender::new(delta_file, &delta_file_path, "delta")),
            journal: None,
            dir: dir.clone(),
        };
        let images = self.before_image_reader(&dir, geometry)?;
        let zero = ZeroDigests::new(geometry);
        let mut delta = DeltaMeta {
            records: 0,
            bytes: 0,
        };
        let mut blocks = 0u64;
        loop {
            // One group: runs of consecutive blocks as extents, in journal order.
            let mut runs: Vec<(u64, Vec<u8>, Vec<Digest>)> = Vec::new();
            let mut bytes = 0u64;
            while bytes < SETTLE_GROUP {
                let at = reader.at;
                let Some(r) = reader.next_record(false)? else {
                    break;
                };
                let len = geometry.block_len(r.block) as usize;
                let data = match r.data {
                    Some(d) => d,
                    None if r.digest == zero.of(r.block) => vec![0u8; len],
                    None => {
                        return Err(StoreError::Damaged {
                            path: journal.clone(),
                            at,
                            message: format!(
                                "block {}: a record of zeros does not carry the checksum of zeros",
                                r.block
                            ),
                        });
                    }
                };
                bytes += len as u64;
                blocks += 1;
                match runs.last_mut() {
                    Some((first, d, ds)) if *first + ds.len() as u64 == r.block => {
                        d.extend_from_slice(&data);
                        ds.push(r.digest);
                    }
                    _ => runs.push((r.block, data, vec![r.digest])),
                }
            }
            if runs.is_empty() {
                break;
            }
            let extents = runs
                .into_iter()
                .map(|(first_block, d, digests)| VerifiedExtent {
                    first_block,
                    data: d.into(),
                    digests,
                })
                .collect();
            failpoint::hit("node-settle-group");
            let group = images.prepare_many(vec![extents])?;
            let (records, added) =
                append_before_images(self, name, &mut files, geometry, &group, delta.bytes)?;
            delta.records += records;
            delta.bytes += added;
            let extents: Vec<&VerifiedExtent> = group.iter().flat_map(|p| &p.extents).collect();
            write_replica(&mut files, geometry, &extents, &replica_path, &|| {
                boundary("settle: replica written")
            })?;
            write_digests(&files.digests, &extents, &digests_path)?;
            boundary("settle: digests written")?;
        }
        make_durable(&files.replica, &files.digests, &dir)?;
        boundary("settle: data durable")?;
        let mut prev: PointMeta = self
            .points
            .get(point_key(name, old_point))?
            .map(|v| decode(&v))
            .transpose()?
            .ok_or_else(|| {
                StoreError::Meta(format!("data source {name}: point {old_point} vanished"))
            })?;
        prev.delta = Some(delta);
        let prev_bytes = encode(&prev)?;
        (&self.points, &self.settle)
            .transaction(|(pts, st)| {
                pts.insert(point_key(name, old_point), prev_bytes.as_slice())?;
                st.remove(name.as_bytes())?;
                Ok(())
            })
            .map_err(txn_error)?;
        boundary("settle: recorded")?;
        self.db.flush()?;
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
    fn readable_point(
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

fn read_at_full(f: &File, buf: &mut [u8], offset: u64, path: &Path) -> Result<()> {
    f.read_exact_at(buf, offset).map_err(io("read", path))
}

struct TxnFiles {
    replica: File,
    /// New bytes go to the replica with `O_DIRECT` where the file system allows it,
    /// from up to [`IO_THREADS`] threads at once (made as needed).
    writers: Vec<DirectWriter>,
    /// Replica writes at a queue depth from the writing thread: an io_uring and the
    /// replica opened with `O_DIRECT` for writing (none where the kernel or the file
    /// system refuses, and in unit tests, which need the writes in order: see
    /// [`write_replica`]).
    uring: Option<(Ring, File)>,
    /// Aligned buffers of those writes, kept from group to group (at most
    /// [`uring::DEPTH`]).
    bounce: Vec<bytes::BytesMut>,
    digests: File,
    /// A settle's: the delta its before-images go to.
    delta: Option<DeltaAppender>,
    /// A sync's (every sync but a first one): the journal its blocks go to.
    journal: Option<DeltaAppender>,
    dir: PathBuf,
}

/// A sync being applied. Drop without [`SyncTxn::commit`] leaves the pending record;
/// call [`SyncTxn::abort`] to roll back at once.
pub struct SyncTxn {
    store: Store,
    spec: SyncSpec,
    meta: SourceMeta,
    fresh: bool,
    new_point: u64,
    files: Option<TxnFiles>,
    /// One bit per block: already written by this sync.
    touched: Vec<u64>,
    blocks: u64,
    bytes: u64,
    /// Bytes of before-images the previous point's delta will hold once this sync
    /// is settled (from the old digests of the changing blocks).
    delta_len: u64,
    /// Bytes written to the journal.
    journal_len: u64,
    /// Bytes the committed points' deltas hold.
    points_used: u64,
    zero: ZeroDigests,
    times: ApplyTimes,
}

/// Where a sync's apply time went (logged with the commit).
#[derive(Debug, Default, Clone, Copy)]
pub struct ApplyTimes {
    /// Reading old digests and before-images.
    pub before_images: std::time::Duration,
    /// Appending new blocks to the journal (the space check included).
    pub delta: std::time::Duration,
    /// Writing new bytes and digests.
    pub writes: std::time::Duration,
    /// Making the pending record durable and opening the sync's files.
    pub open: std::time::Duration,
    /// Rounds of before-image reads (each reads the batches waiting by then).
    pub read_rounds: u64,
    /// Groups written (each one journal append).
    pub groups: u64,
}

/// Reads the old digests (a sync's, on a thread of its own ahead of the thread that
/// journals the batches, [`SyncTxn::apply_prepared`]) and, for a settle, the
/// before-images of batches. Safe to run ahead: a sync writes each block at most
/// once, and a batch that repeats a block is refused before anything of it is
/// written; a settle reads each group just before it applies it.
pub struct BeforeImageReader {
    keeps_deltas: bool,
    /// Whether the old bytes are read too (a settle), or only the old digests (a
    /// sync: its space check needs no more).
    read_images: bool,
    replica: File,
    direct: Option<File>,
    digests: File,
    replica_path: PathBuf,
    digests_path: PathBuf,
    geometry: Geometry,
}

/// A batch with what its before-images need (from [`BeforeImageReader::prepare`]).
#[derive(Debug)]
pub struct Prepared {
    pub extents: Vec<VerifiedExtent>,
    /// Blocks that need a before-image, with their old digests.
    recs: Vec<(u64, Digest)>,
    /// Their old bytes (`None`: never written, or not read: see
    /// [`BeforeImageReader`]).
    old: Vec<Option<Bytes>>,
    /// On the first batch of a round of reads (see
    /// [`BeforeImageReader::prepare_many`]): how long the round took.
    round: Option<std::time::Duration>,
}

impl Prepared {
    /// Payload bytes of the batch.
    pub fn bytes(&self) -> usize {
        self.extents.iter().map(|e| e.data.len()).sum()
    }
}

impl BeforeImageReader {
    /// Reads which blocks of `extents` change content, and their old bytes.
    pub fn prepare(&self, extents: Vec<VerifiedExtent>) -> Result<Prepared> {
        let mut out = self.prepare_many(vec![extents])?;
        out.pop()
            .ok_or_else(|| StoreError::Meta("no prepared batch".into()))
    }

    /// [`prepare`](Self::prepare) for several batches at once, in order: the
    /// before-images of all of them are read together, so that the disk sees
    /// [`IO_THREADS`] reads at a time across batch boundaries instead of draining
    /// its queue at the end of every batch (scattered blocks: each batch holds only
    /// about 16 of them). The time taken is counted on the first batch.
    pub fn prepare_many(&self, batches: Vec<Vec<VerifiedExtent>>) -> Result<Vec<Prepared>> {
        let started = std::time::Instant::now();
        let mut recs: Vec<Vec<(u64, Digest)>> = Vec::with_capacity(batches.len());
        for extents in &batches {
            recs.push(self.changing_blocks(extents)?);
        }
        let all: Vec<(u64, Digest)> = recs.iter().flatten().copied().collect();
        let mut old = if self.read_images {
            read_before_images(
                &self.replica,
                self.direct.as_ref(),
                &self.replica_path,
                self.geometry,
                &all,
            )?
        } else {
            vec![None; all.len()]
        }
        .into_iter();
        let read_time = started.elapsed();
        Ok(batches
            .into_iter()
            .zip(recs)
            .enumerate()
            .map(|(i, (extents, recs))| Prepared {
                extents,
                old: old.by_ref().take(recs.len()).collect(),
                recs,
                round: (i == 0).then_some(read_time),
            })
            .collect())
    }

    /// The blocks of `extents` whose content changes, with their old digests: those
    /// need a before-image (none when the source keeps no deltas).
    fn changing_blocks(&self, extents: &[VerifiedExtent]) -> Result<Vec<(u64, Digest)>> {
        let mut recs: Vec<(u64, Digest)> = Vec::new();
        if !self.keeps_deltas {
            return Ok(recs);
        }
        for e in extents {
            let n = e.digests.len() as u64;
            let mut old = vec![0u8; n as usize * DIGEST_LEN];
            read_at_full(
                &self.digests,
                &mut old,
                e.first_block * DIGEST_LEN as u64,
                &self.digests_path,
            )?;
            for (i, d) in old.chunks_exact(DIGEST_LEN).enumerate() {
                let digest = Digest::from_slice(d).unwrap_or(Digest::UNWRITTEN);
                if digest != Digest::UNWRITTEN && e.digests.get(i) == Some(&digest) {
                    // The block keeps its content (a consistency check repairing
                    // a damaged replica block, or a rewrite with the same bytes):
                    // the previous point reads the same bytes from the replica,
                    // so no before-image is kept, and a damaged one never is.
                    continue;
                }
                recs.push((e.first_block + i as u64, digest));
            }
        }
        Ok(recs)
    }
}

/// One verified extent: its first block, bytes and per-block digests.
#[derive(Debug, Clone)]
pub struct VerifiedExtent {
    pub first_block: u64,
    pub data: bytes::Bytes,
    pub digests: Vec<Digest>,
}

impl SyncTxn {
    /// The point this sync will create.
    pub fn new_point(&self) -> u64 {
        self.new_point
    }

    /// Sets the consistency the new point records (the agent's final word).
    pub fn set_consistency(&mut self, c: Consistency) {
        self.spec.consistency = c;
    }

    /// Payload bytes applied so far.
    pub fn applied_bytes(&self) -> u64 {
        self.bytes
    }

    /// Where the apply time has gone so far.
    pub fn times(&self) -> ApplyTimes {
        self.times
    }

    fn open_files(&mut self) -> Result<()> {
        if self.files.is_some() {
            return Ok(());
        }
        let opening = std::time::Instant::now();
        let r = self.open_files_now();
        self.times.open = opening.elapsed();
        r
    }

    fn open_files_now(&mut self) -> Result<()> {
        let store = &self.store;
        let name = &self.spec.source;
        let dir = self.meta.dir();
        let pending = Pending {
            v: FORMAT_VERSION,
            new_point: self.new_point,
            fresh: self.fresh,
            disk: self.meta.disk.clone(),
            journal: !self.fresh,
        };
        // 1. The pending record (and, for a new source, its meta) is durable before
        //    any data file changes.
        let meta_bytes = encode(&self.meta)?;
        let pending_bytes = encode(&pending)?;
        (&store.sources, &store.pending)
            .transaction(|(s, p)| {
                s.insert(name.as_bytes(), meta_bytes.as_slice())?;
                p.insert(name.as_bytes(), pending_bytes.as_slice())?;
                Ok(())
            })
            .map_err(txn_error)?;
        boundary("sync: pending written")?;
        store.db.flush()?;
        boundary("sync: pending durable")?;

        std::fs::create_dir_all(dir.join("deltas")).map_err(io("create", &dir))?;
        let replica_path = dir.join("replica");
        let digests_path = dir.join("digests");
        let replica = open_rw(&replica_path, Open::Create)?;
        let digests = open_rw(&digests_path, Open::Create)?;
        let geometry = self.spec.geometry;
        if self.fresh {
            replica
                .set_len(geometry.size_bytes)
                .map_err(io("size", &replica_path))?;
            digests
                .set_len(geometry.block_count() * DIGEST_LEN as u64)
                .map_err(io("size", &digests_path))?;
        }
        // A first sync writes into the replica; every later one into the journal,
        // and the replica stays as it is until the point is settled.
        let journal = if self.fresh {
            None
        } else {
            let p = journal_path(&dir);
            Some(DeltaAppender::new(
                open_rw(&p, Open::Truncate)?,
                &p,
                "journal",
            ))
        };
        fsync_dir(&dir)?;
        boundary("sync: files created")?;
        self.touched = vec![0u64; geometry.block_count().div_ceil(64) as usize];
        let uring = if cfg!(test) || !self.fresh {
            None
        } else {
            Ring::try_new().zip(open_direct(&replica_path, false))
        };
        self.files = Some(TxnFiles {
            replica,
            writers: Vec::new(),
            uring,
            bounce: Vec::new(),
            digests,
            delta: None,
            journal,
            dir,
        });
        Ok(())
    }

    /// A reader of the old digests of this sync's changing blocks (what its space
    /// check needs; the before-images themselves are read by the settle) that can
    /// run on another thread, ahead of [`SyncTxn::apply_prepared`]. Opens the sync's
    /// files (writing the pending record) if that has not happened yet.
    pub fn before_images(&mut self) -> Result<BeforeImageReader> {
        self.open_files()?;
        let Some(files) = self.files.as_ref() else {
            return Err(StoreError::Meta("sync files not open".into()));
        };
        let replica_path = files.dir.join("replica");
        let digests_path = files.dir.join("digests");
        Ok(BeforeImageReader {
            keeps_deltas: files.journal.is_some(),
            read_images: false,
            replica: files
                .replica
                .try_clone()
                .map_err(io("reopen", &replica_path))?,
            // A sync reads no before-images (see `read_images`).
            direct: None,
            digests: files
                .digests
                .try_clone()
                .map_err(io("reopen", &digests_path))?,
            replica_path,
            digests_path,
            geometry: self.spec.geometry,
        })
    }

    /// Applies one batch of verified extents (see the module docs for the order of
    /// writes). Blocking.
    pub fn apply(&mut self, extents: &[VerifiedExtent]) -> Result<()> {
        if extents.is_empty() {
            return Ok(());
        }
        let prepared = self.before_images()?.prepare(extents.to_vec())?;
        self.apply_prepared(vec![prepared])
    }

    /// Applies prepared batches as one group: their before-images appended to the
    /// delta and made durable, then the new bytes written. Blocking.
    pub fn apply_prepared(&mut self, group: Vec<Prepared>) -> Result<()> {
        if group.iter().all(|p| p.extents.is_empty()) {
            return Ok(());
        }
        self.open_files()?;
        let geometry = self.spec.geometry;
        for e in group.iter().flat_map(|p| &p.extents) {
            for b in e.first_block..e.first_block + e.digests.len() as u64 {
                let (w, bit) = ((b / 64) as usize, b % 64);
                if self.touched[w] & (1 << bit) != 0 {
                    return Err(StoreError::DuplicateBlock { block: b });
                }
                self.touched[w] |= 1 << bit;
            }
        }
        let Some(files) = self.files.as_mut() else {
            return Err(StoreError::Meta("sync files not open".into()));
        };
        let replica_path = files.dir.join("replica");
        let digests_path = files.dir.join("digests");
        for t in group.iter().filter_map(|p| p.round) {
            self.times.before_images += t;
            self.times.read_rounds += 1;
        }
        self.times.groups += 1;
        let extents: Vec<&VerifiedExtent> = group.iter().flat_map(|p| &p.extents).collect();
        if let Some(journal) = files.journal.as_mut() {
            // 2. The space the before-images will take in the previous point's
            //    delta once settled, decided now: a block whose old digest is
            //    unwritten or zeros needs no bytes.
            let appending = std::time::Instant::now();
            let added: u64 = group
                .iter()
                .flat_map(|p| &p.recs)
                .map(|(block, old)| {
                    let has_data = *old != Digest::UNWRITTEN && *old != self.zero.of(*block);
                    let data = if has_data {
                        geometry.block_len(*block)
                    } else {
                        0
                    };
                    (HEADER_LEN + CHECK_LEN) as u64 + data
                })
                .sum();
            let need = self.points_used + self.delta_len + added;
            if need > self.meta.points_alloc_bytes {
                let more = self.delta_len + added;
                make_room(
                    &self.store,
                    &mut self.meta,
                    &mut self.points_used,
                    more,
                    self.new_point - 1,
                )?;
            }
            self.delta_len += added;
            // The new blocks, with their new digests, appended to the journal (made
            // durable at commit).
            let bs = geometry.block_size as usize;
            let mut appended = 0u64;
            let blocks = extents.iter().flat_map(|e| {
                e.digests.iter().enumerate().map(move |(i, d)| {
                    let data = &e.data[i * bs..((i + 1) * bs).min(e.data.len())];
                    (e.first_block + i as u64, *d, data)
                })
            });
            let records = blocks.map(|(block, digest, data)| {
                let data = (!is_zero(data)).then_some(data);
                appended += record_len(data) as u64;
                (block, digest, data, geometry.block_len(block) as usize)
            });
            journal
                .append(self.journal_len, records)
                .map_err(io("write", &journal.path))?;
            self.journal_len += appended;
            boundary("sync: journal written")?;
            self.times.delta += appending.elapsed();
        } else {
            // A first sync: straight into the replica.
            failpoint::hit("node-before-replica-write");
            let writing = std::time::Instant::now();
            write_replica(files, geometry, &extents, &replica_path, &|| {
                boundary("sync: replica written")
            })?;
            write_digests(&files.digests, &extents, &digests_path)?;
            self.times.writes += writing.elapsed();
        }
        for e in extents {
            self.blocks += e.digests.len() as u64;
            self.bytes += e.data.len() as u64;
        }
        // After each group of batches (see the service's applier).
        failpoint::hit("node-after-batch");
        Ok(())
    }

    /// Makes the sync durable and records the new point. Blocking. A first sync is
    /// in the replica already; a later one is in the journal, and is committed with
    /// a `settle` record: [`Store::settle`] then applies it to the replica (the
    /// service does that after it acknowledged the point).
    pub fn commit(mut self) -> Result<PointMeta> {
        // A sync that changed nothing still makes a point: the agent asked for one.
        self.open_files()?;
        let Some(files) = self.files.take() else {
            return Err(StoreError::Meta("sync files not open".into()));
        };
        failpoint::hit("node-before-commit");
        match &files.journal {
            Some(journal) => {
                journal
                    .file
                    .sync_data()
                    .map_err(io("fsync", &journal.path))?;
                boundary("commit: journal durable")?;
            }
            None => {
                make_durable(&files.replica, &files.digests, &files.dir)?;
                boundary("commit: data durable")?;
            }
        }
        let store = &self.store;
        let name = self.spec.source.clone();
        let point = PointMeta {
            v: FORMAT_VERSION,
            id: self.new_point,
            created_ms: bulwark_common::time::now_ms(),
            consistency: self.spec.consistency,
            kind: self.spec.kind,
            blocks_changed: self.blocks,
            bytes_changed: self.bytes,
            delta: None,
            damaged: Vec::new(),
            files_changed: 0,
        };
        let settle = files.journal.as_ref().map(|_| Settle {
            v: FORMAT_VERSION,
            point: self.new_point,
            disk: self.meta.disk.clone(),
        });
        let new_bytes = encode(&point)?;
        let settle_bytes = settle.as_ref().map(encode).transpose()?;
        let meta_bytes = encode(&self.meta)?;
        // 3. One transaction: the new point, its settle record, no pending, and the
        //    source's record (its allocation and retention).
        (&store.points, &store.pending, &store.sources, &store.settle)
            .transaction(|(pts, pend, srcs, st)| {
                srcs.insert(name.as_bytes(), meta_bytes.as_slice())?;
                pts.insert(point_key(&name, point.id), new_bytes.as_slice())?;
                if let Some(b) = &settle_bytes {
                    st.insert(name.as_bytes(), b.as_slice())?;
                }
                pend.remove(name.as_bytes())?;
                Ok(())
            })
            .map_err(txn_error)?;
        boundary("commit: point written")?;
        store.db.flush()?;
        boundary("commit: point durable")?;
        failpoint::hit("node-after-commit");
        Ok(point)
    }

    /// Rolls back everything this sync wrote. Blocking.
    pub fn abort(mut self) -> Result<()> {
        let Some(files) = self.files.take() else {
            return Ok(()); // nothing was written
        };
        drop(files);
        let pending = Pending {
            v: FORMAT_VERSION,
            new_point: self.new_point,
            fresh: self.fresh,
            disk: self.meta.disk.clone(),
            journal: !self.fresh,
        };
        self.store.roll_back(&self.spec.source, &pending)
    }
}

/// Writes the digests of `extents` into the digests file.
fn write_digests(digests: &File, extents: &[&VerifiedExtent], path: &Path) -> Result<()> {
    for e in extents {
        let mut d = Vec::with_capacity(e.digests.len() * DIGEST_LEN);
        for digest in &e.digests {
            d.extend_from_slice(&digest.0);
        }
        digests
            .write_all_at(&d, e.first_block * DIGEST_LEN as u64)
            .map_err(io("write", path))?;
    }
    Ok(())
}

/// A settle group's before-images (from [`BeforeImageReader::prepare_many`])
/// appended to the delta of `files`, which is `delta_len` bytes long, and made
/// durable; the source's open views learn where they are. Returns the records and
/// bytes appended. Only then may the group's blocks be overwritten.
fn append_before_images(
    store: &Store,
    source: &str,
    files: &mut TxnFiles,
    geometry: Geometry,
    group: &[Prepared],
    delta_len: u64,
) -> Result<(u64, u64)> {
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
    let mut added = 0u64;
    for ((block, _), data) in recs.iter().zip(&datas) {
        if !views.is_empty() {
            let at = delta_len + added + (HEADER_LEN + CHECK_LEN) as u64;
            located.push((*block, data.is_some().then_some(at)));
        }
        added += record_len(*data) as u64;
    }
    let records = recs.iter().zip(&datas).map(|((block, digest), data)| {
        (*block, *digest, *data, geometry.block_len(*block) as usize)
    });
    delta
        .append(delta_len, records)
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

/// Finds room for `more` bytes of before-images beyond what the committed points of
/// a source use (`points_used`): grows the allocation from the disk's unallocated
/// capacity when the pool auto-grows, else prunes the oldest points when the pool
/// says so (never `base`, the newest committed point), else refuses.
fn make_room(
    store: &Store,
    meta: &mut SourceMeta,
    points_used: &mut u64,
    more: u64,
    base: u64,
) -> Result<()> {
    let need = *points_used + more;
    let policy = store.policy;
    if policy.auto_grow_bytes > 0 {
        let short = need.saturating_sub(meta.points_alloc_bytes);
        let grow = short.div_ceil(policy.auto_grow_bytes) * policy.auto_grow_bytes;
        if grow <= store.unallocated(&meta.disk, &meta.name)? {
            meta.points_alloc_bytes += grow;
            store.put_meta(meta)?;
            tracing::warn!(source = %meta.name, grown_by = grow, points_alloc_bytes = meta.points_alloc_bytes,
                "recovery-point space was full: allocation grown (pool.auto_grow)");
            return Ok(());
        }
        tracing::warn!(source = %meta.name, "recovery-point space is full and the disk has no unallocated room to grow it");
    }
    // Pruning frees only what older points hold: when this sync's own
    // before-images do not fit in the whole allocation, it would drop points and
    // fail all the same.
    if policy.on_full == OnFull::PruneOldest && more <= meta.points_alloc_bytes {
        while *points_used + more > meta.points_alloc_bytes {
            let Some(oldest) = store.points(&meta.name)?.first().map(|p| p.id) else {
                break;
            };
            if oldest >= base {
                break;
            }
            // Space pressure never prunes a locked point: the sync is refused.
            if let Some(p) = store.points(&meta.name)?.first()
                && let Some(lock) = meta.lock
                && lock.holds(p.created_ms, bulwark_common::time::now_ms())
            {
                return Err(StoreError::LockedFull {
                    source_name: meta.name.to_string(),
                    need: more,
                    allocated: meta.points_alloc_bytes,
                    used: *points_used,
                    point: p.id,
                    until: bulwark_common::time::rfc3339_ms(lock.until(p.created_ms)),
                });
            }
            store.prune(&meta.name, oldest)?;
            tracing::warn!(source = %meta.name, point = oldest,
                "recovery-point space was full: oldest point pruned (pool.on_full = \"prune-oldest\")");
            *points_used = store.points_used(&meta.name)?;
        }
        if *points_used + more <= meta.points_alloc_bytes {
            return Ok(());
        }
    }
    Err(StoreError::AllocationFull {
        source_name: meta.name.to_string(),
        need: more,
        allocated: meta.points_alloc_bytes,
        used: *points_used,
    })
}

/// Writes the merge of two deltas, `older` (the predecessor's) and `newer` (a
/// pruned point's), over `older`: every record of `older`, then the records of
/// `newer` for blocks `older` does not hold. Returns the merged delta's size.
/// A damaged record is copied as it is, so the merged delta still shows the damage.
fn merge_deltas(older: &Path, newer: &Path, geometry: Geometry) -> Result<DeltaMeta> {
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
    let mut meta = DeltaMeta {
        records: 0,
        bytes: 0,
    };
    let mut buf = Vec::new();
    let mut copy = |rec: DeltaRecord, w: &mut std::io::BufWriter<File>| -> Result<()> {
        buf.clear();
        encode_record(
            &mut buf,
            rec.block,
            rec.digest,
            rec.data.as_deref(),
            geometry.block_len(rec.block) as usize,
        );
        w.write_all(&buf).map_err(io("write", &tmp))?;
        meta.records += 1;
        meta.bytes += buf.len() as u64;
        Ok(())
    };
    if older.exists() {
        let mut r = DeltaReader::open(older, geometry)?;
        while let Some(rec) = r.next_record_where(false, &|_| false, true)? {
            held[(rec.block / 64) as usize] |= 1 << (rec.block % 64);
            copy(rec, &mut w)?;
        }
    }
    if newer.exists() {
        // A delta holds each block once, so `held` needs no update here.
        let mut r = DeltaReader::open(newer, geometry)?;
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
    std::fs::rename(&tmp, older).map_err(io("rename", &tmp))?;
    boundary("merge: renamed")?;
    if let Some(parent) = older.parent() {
        fsync_dir(parent)?;
    }
    boundary("merge: rename durable")?;
    Ok(meta)
}

/// The current bytes of each block of `recs` that was ever written (`None` for one
/// that reads as zeros because it never was). Runs of consecutive blocks are read
/// with one read each, and the runs are read by a few threads at once: scattered
/// blocks are as many random reads, which a disk serves faster in parallel.
fn read_before_images(
    replica: &File,
    direct: Option<&File>,
    path: &Path,
    geometry: Geometry,
    recs: &[(u64, Digest)],
) -> Result<Vec<Option<Bytes>>> {
    // Runs: (index of the first rec, number of recs), each of written blocks.
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, (block, digest)) in recs.iter().enumerate() {
        if *digest == Digest::UNWRITTEN {
            continue;
        }
        match runs.last_mut() {
            Some((first, n)) if *first + *n == i && recs[i - 1].0 + 1 == *block => *n += 1,
            _ => runs.push((i, 1)),
        }
    }
    // The replica is written with O_DIRECT, so its blocks are rarely in the page
    // cache: read them the same way (no readahead of neighbours nobody asked for, and
    // nothing evicted), falling back to the page cache where direct I/O is refused.
    let read_run = |&(first, n): &(usize, usize)| -> Result<(usize, Bytes)> {
        let start = geometry.offset_of(recs[first].0);
        let end = geometry
            .offset_of(recs[first + n - 1].0 + 1)
            .min(geometry.size_bytes);
        let len = (end - start) as usize;
        if let Some(d) = direct {
            match read_direct_at(d, start, len) {
                Ok(b) => return Ok((first, b)),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(io("read", path)(e)),
            }
        }
        let mut data = vec![0u8; len];
        read_at_full(replica, &mut data, start, path)?;
        Ok((first, Bytes::from(data)))
    };
    let threads = IO_THREADS.min(runs.len());
    // Threads, not the writer's io_uring: reads at a deeper queue delayed the
    // writer's delta appends and fdatasyncs behind them on a shared disk, for no
    // gain overall (see `uring`).
    let results: Vec<Result<(usize, Bytes)>> = if threads < 2 {
        runs.iter().map(read_run).collect()
    } else {
        // Runs dealt out in turn, so that every thread has a similar share and the
        // disk sees `threads` reads at once.
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let runs = &runs;
                    let read_run = &read_run;
                    scope.spawn(move || {
                        runs.iter()
                            .skip(t)
                            .step_by(threads)
                            .map(read_run)
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| {
                    h.join().unwrap_or_else(|_| {
                        vec![Err(StoreError::Meta(
                            "a before-image reader panicked".into(),
                        ))]
                    })
                })
                .collect()
        })
    };
    let mut out: Vec<Option<Bytes>> = vec![None; recs.len()];
    let bs = geometry.block_size as usize;
    for r in results {
        let (first, data) = r?;
        for k in 0..data.len().div_ceil(bs) {
            out[first + k] = Some(data.slice(k * bs..((k + 1) * bs).min(data.len())));
        }
    }
    Ok(out)
}

/// Writes a group of extents into the replica at a queue depth when there are
/// several (scattered blocks need one, and a full sync's megabyte extents gain from
/// it too): through the sync's io_uring ([`write_replica_ring`]), else from several
/// threads, each with its own `O_DIRECT` bounce buffer. Unit tests write in order
/// on the calling thread, so that a simulated crash can fall between any two
/// extents.
fn write_replica(
    files: &mut TxnFiles,
    geometry: Geometry,
    extents: &[&VerifiedExtent],
    path: &Path,
    written: &dyn Fn() -> Result<()>,
) -> Result<()> {
    if extents.len() > 1 && write_replica_ring(files, geometry, extents, path)? {
        return Ok(());
    }
    let threads = if cfg!(test) {
        1
    } else {
        IO_THREADS.min(extents.len()).max(1)
    };
    while files.writers.len() < threads {
        files.writers.push(DirectWriter::open(path, "replica"));
    }
    let replica = &files.replica;
    if threads == 1 {
        for e in extents {
            files.writers[0]
                .write_at(replica, &e.data, geometry.offset_of(e.first_block))
                .map_err(io("write", path))?;
            written()?;
        }
        return Ok(());
    }
    let results: Vec<std::io::Result<()>> = std::thread::scope(|scope| {
        let handles: Vec<_> = files.writers[..threads]
            .iter_mut()
            .enumerate()
            .map(|(t, w)| {
                scope.spawn(move || {
                    for e in extents.iter().skip(t).step_by(threads) {
                        w.write_at(replica, &e.data, geometry.offset_of(e.first_block))?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("a replica writer panicked")))
            })
            .collect()
    });
    results
        .into_iter()
        .try_for_each(|r| r.map_err(io("write", path)))
}

/// [`write_replica`] through the sync's io_uring: the aligned part of each extent
/// copied into an aligned buffer as the queue has room (at most [`uring::DEPTH`]
/// buffers, kept for the next group) and written at that queue depth; a short
/// tail (the volume's last block) through the page cache. Returns false where
/// there is no ring, and where the file system refuses direct I/O: then the ring
/// is dropped, and threads write the whole group (again, where the ring had
/// written part of it: the same bytes at the same places).
fn write_replica_ring(
    files: &mut TxnFiles,
    geometry: Geometry,
    extents: &[&VerifiedExtent],
    path: &Path,
) -> Result<bool> {
    let Some((ring, direct)) = files.uring.as_mut() else {
        return Ok(false);
    };
    // (extent, offset, length of its aligned part) of each extent that has one.
    let mut parts = Vec::with_capacity(extents.len());
    let mut tails = Vec::new();
    for e in extents {
        let offset = geometry.offset_of(e.first_block);
        let aligned = if offset.is_multiple_of(DIRECT_ALIGN as u64) {
            e.data.len() / DIRECT_ALIGN * DIRECT_ALIGN
        } else {
            0
        };
        if aligned < e.data.len() {
            tails.push((offset + aligned as u64, &e.data[aligned..]));
        }
        if aligned > 0 {
            parts.push((e, offset, aligned));
        }
    }
    let pool = std::cell::RefCell::new(std::mem::take(&mut files.bounce));
    let r = ring.run_with(
        direct.as_fd(),
        true,
        parts.len(),
        |i| {
            let (e, offset, len) = parts[i];
            let mut pool = pool.borrow_mut();
            let mut buf = match pool.iter().position(|b| b.len() >= len) {
                Some(k) => pool.swap_remove(k),
                None => aligned_buffer(len),
            };
            buf[..len].copy_from_slice(&e.data[..len]);
            uring::Job { offset, buf, len }
        },
        |_, job| {
            let mut pool = pool.borrow_mut();
            if pool.len() < uring::DEPTH && !job.buf.is_empty() {
                pool.push(job.buf);
            }
        },
    );
    files.bounce = pool.into_inner();
    match r {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::info!(path = %path.display(), "direct writes refused through io_uring; writing with threads");
            files.uring = None;
            files.bounce = Vec::new();
            return Ok(false);
        }
        Err(e) => return Err(io("write", path)(e)),
    }
    for (offset, data) in tails {
        files
            .replica
            .write_all_at(data, offset)
            .map_err(io("write", path))?;
    }
    Ok(true)
}

fn encode_record(
    buf: &mut impl bytes::BufMut,
    block: u64,
    digest: Digest,
    data: Option<&[u8]>,
    len: usize,
) {
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(&block.to_le_bytes());
    header[8] = u8::from(data.is_some());
    header[9..13].copy_from_slice(&(len as u32).to_le_bytes());
    header[13..].copy_from_slice(&digest.0);
    let check = blake3::hash(&header);
    buf.put_slice(&header);
    buf.put_slice(&check.as_bytes()[..CHECK_LEN]);
    if let Some(d) = data {
        buf.put_slice(d);
    }
}

/// Length of one encoded record.
fn record_len(data: Option<&[u8]>) -> usize {
    HEADER_LEN + CHECK_LEN + data.map_or(0, <[u8]>::len)
}

/// Appends records to a delta file (a settle's before-images) or to a journal (a
/// sync's new blocks) through a
/// [`DirectWriter`]: the records are built in a page-aligned buffer that starts with
/// the file's last partial page, so whole pages go to the disk with `O_DIRECT` and no
/// bounce copy, and only the new partial last page through the page cache (the next
/// append rewrites that page whole, its leading bytes unchanged). 41 MiB of
/// scattered before-images took 60-110 ms through the page cache and fdatasync, 30 ms
/// direct. The buffer is one reused chunk of [`DELTA_CHUNK`], written whenever it
/// fills: a buffer as large as each group (16 MiB and more) was fresh memory every
/// time, and faulting and zeroing its pages took most of the node's CPU in a
/// scattered incremental.
struct DeltaAppender {
    file: File,
    path: PathBuf,
    writer: DirectWriter,
    /// The file's bytes from its last page boundary on (fewer than a page).
    tail: Vec<u8>,
    /// The chunk, kept between appends (page-aligned).
    chunk: Option<bytes::BytesMut>,
}

/// Bytes of records built before they are written: below the allocator's mmap
/// threshold, so that a sync's chunk comes from (and goes back to) the heap. Tiny in
/// unit tests, so that the crash tests cross chunk boundaries.
const DELTA_CHUNK: usize = if cfg!(test) {
    3 * DIRECT_ALIGN
} else {
    2 << 20
};

impl DeltaAppender {
    /// `what` names the file in the log line of a fallback to buffered writes.
    fn new(file: File, path: &Path, what: &'static str) -> DeltaAppender {
        DeltaAppender {
            file,
            path: path.to_path_buf(),
            writer: DirectWriter::open(path, what),
            tail: Vec::new(),
            chunk: None,
        }
    }

    /// Appends `records` (block, old digest, old bytes or none for zeros, block
    /// length) to the file, which is `end` bytes long; not yet durable.
    fn append<'a>(
        &mut self,
        end: u64,
        records: impl Iterator<Item = (u64, Digest, Option<&'a [u8]>, usize)>,
    ) -> std::io::Result<()> {
        let mut page_start = end - self.tail.len() as u64;
        let mut buf = self
            .chunk
            .take()
            .unwrap_or_else(|| aligned_buffer(DELTA_CHUNK));
        buf.clear();
        buf.extend_from_slice(&self.tail);
        for (block, digest, data, len) in records {
            let need = record_len(data);
            if buf.len() + need > buf.capacity() {
                // Write the whole pages built so far; the partial page moves to the
                // front and is written again with what follows it.
                let whole = buf.len() / DIRECT_ALIGN * DIRECT_ALIGN;
                if whole > 0 {
                    self.writer
                        .write_at(&self.file, &buf[..whole], page_start)?;
                    page_start += whole as u64;
                    buf.copy_within(whole.., 0);
                    buf.truncate(buf.len() - whole);
                }
                if buf.len() + need > buf.capacity() {
                    // One record larger than a chunk (a huge block size).
                    let mut bigger =
                        aligned_buffer((buf.len() + need).next_multiple_of(DIRECT_ALIGN));
                    bigger.clear();
                    bigger.extend_from_slice(&buf);
                    buf = bigger;
                }
            }
            encode_record(&mut buf, block, digest, data, len);
        }
        self.writer.write_at(&self.file, &buf, page_start)?;
        self.tail = buf[buf.len() / DIRECT_ALIGN * DIRECT_ALIGN..].to_vec();
        self.chunk = Some(buf);
        Ok(())
    }
}

/// One before-image read back from a delta file.
#[derive(Debug)]
pub struct DeltaRecord {
    pub block: u64,
    pub digest: Digest,
    /// `None` when the block read as zeros (or its data was skipped).
    pub data: Option<Vec<u8>>,
    /// The data matches the digest (always, unless bad data was asked for).
    pub intact: bool,
    /// Where the record's data starts in the file (`None`: the block reads as zeros).
    pub data_offset: Option<u64>,
}

/// Reads a delta file's records in order.
pub struct DeltaReader {
    reader: BufReader<File>,
    path: PathBuf,
    geometry: Geometry,
    at: u64,
}

impl DeltaReader {
    /// Opens a delta file of a volume with `geometry`.
    pub fn open(path: &Path, geometry: Geometry) -> Result<DeltaReader> {
        let f = File::open(path).map_err(io("open", path))?;
        Ok(DeltaReader {
            reader: BufReader::with_capacity(1 << 20, f),
            path: path.to_path_buf(),
            geometry,
            at: 0,
        })
    }

    /// The next valid record. With `tolerate_tail`, a torn or damaged record ends the
    /// file (recovery after a crash); without, it is an error (restore of a committed
    /// delta, which must be whole).
    pub fn next_record(&mut self, tolerate_tail: bool) -> Result<Option<DeltaRecord>> {
        self.next_record_where(tolerate_tail, &|_| false, false)
    }

    /// [`DeltaReader::next_record`], but the data of a record whose block `skip`
    /// names is not read (seeked over, so that a restore reads each stored block at
    /// most once), and with `keep_bad_data` a record whose data does not match its
    /// digest is returned with `intact: false` instead of failing (a verify, or a
    /// merge that must carry the damage along).
    pub fn next_record_where(
        &mut self,
        tolerate_tail: bool,
        skip: &dyn Fn(u64) -> bool,
        keep_bad_data: bool,
    ) -> Result<Option<DeltaRecord>> {
        let mut head = [0u8; HEADER_LEN + CHECK_LEN];
        match read_full(&mut self.reader, &mut head) {
            Ok(0) => return Ok(None),
            Ok(n) if n < head.len() => return self.bad(tolerate_tail, "torn record header"),
            Ok(_) => {}
            Err(e) => return Err(io("read", &self.path)(e)),
        }
        let check = blake3::hash(&head[..HEADER_LEN]);
        if check.as_bytes()[..CHECK_LEN] != head[HEADER_LEN..] {
            return self.bad(tolerate_tail, "record header check failed");
        }
        let block = u64::from_le_bytes(head[0..8].try_into().unwrap_or([0; 8]));
        let kind = head[8];
        let len = u32::from_le_bytes(head[9..13].try_into().unwrap_or([0; 4])) as u64;
        let digest = Digest::from_slice(&head[13..HEADER_LEN]).unwrap_or(Digest::UNWRITTEN);
        if block >= self.geometry.block_count() || len != self.geometry.block_len(block) || kind > 1
        {
            return self.bad(tolerate_tail, "record names a block outside the volume");
        }
        let mut intact = true;
        let data = if kind == 1 && skip(block) {
            self.reader
                .seek_relative(len as i64)
                .map_err(io("seek", &self.path))?;
            None
        } else if kind == 1 {
            let mut d = vec![0u8; len as usize];
            match read_full(&mut self.reader, &mut d) {
                Ok(n) if n == d.len() => {}
                Ok(_) => return self.bad(tolerate_tail, "torn record data"),
                Err(e) => return Err(io("read", &self.path)(e)),
            }
            if Digest::of(&d) != digest {
                if !keep_bad_data {
                    return self.bad(
                        tolerate_tail,
                        &format!("block {block}: record data does not match its checksum"),
                    );
                }
                intact = false;
            }
            Some(d)
        } else {
            None
        };
        let data_offset = (kind == 1).then_some(self.at + head.len() as u64);
        self.at += head.len() as u64 + if kind == 1 { len } else { 0 };
        Ok(Some(DeltaRecord {
            block,
            digest,
            data,
            intact,
            data_offset,
        }))
    }

    fn bad(&self, tolerate_tail: bool, message: &str) -> Result<Option<DeltaRecord>> {
        if tolerate_tail {
            Ok(None)
        } else {
            Err(StoreError::Damaged {
                path: self.path.clone(),
                at: self.at,
                message: message.to_string(),
            })
        }
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

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
    source: String,
    point: u64,
    geometry: Geometry,
    replica: File,
    state: std::sync::RwLock<ViewState>,
}

#[derive(Default)]
struct ViewState {
    files: Vec<File>,
    /// Block → (index in `files`, data offset; `None` = reads as zeros).
    map: HashMap<u64, (u32, Option<u64>)>,
}

impl ViewState {
    fn add(&mut self, file: File, recs: &[(u64, Option<u64>)]) {
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

    fn add(&self, file: File, recs: &[(u64, Option<u64>)]) {
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
                Some((file, data)) => {
                    flush(&mut run, at, buf)?;
                    match data {
                        None => buf[i..i + n].fill(0),
                        Some(d) => {
                            let within = at - block * bs;
                            st.files[*file as usize]
                                .read_exact_at(&mut buf[i..i + n], d + within)?;
                        }
                    }
                }
            }
            at = block_end;
        }
        flush(&mut run, end, buf)
    }
}

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
    meta: SourceMeta,
    point: PointMeta,
    deltas: std::vec::IntoIter<PathBuf>,
    current: Option<DeltaReader>,
    resolved: Vec<u64>,
    replica: Option<(File, File)>,
    next_block: u64,
    max_batch: usize,
}

impl RestoreReader {
    fn new(meta: SourceMeta, point: PointMeta, deltas: Vec<PathBuf>) -> Result<RestoreReader> {
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

    fn is_resolved(&self, b: u64) -> bool {
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
            self.replica = Some((
                File::open(&r).map_err(io("open", &r))?,
                File::open(&d).map_err(io("open", &d))?,
            ));
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
        let Some((replica, digests)) = self.replica.as_ref() else {
            return Ok(None);
        };
        let dir = self.meta.dir();
        let mut dbuf = vec![0u8; ((end - first) as usize) * DIGEST_LEN];
        read_at_full(
            digests,
            &mut dbuf,
            first * DIGEST_LEN as u64,
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

/// Per-source locks: one sync at a time, reads shared.
#[derive(Default)]
pub struct SourceLocks {
    locks: std::sync::Mutex<HashMap<String, std::sync::Arc<tokio::sync::RwLock<()>>>>,
}

impl SourceLocks {
    /// The lock of one source.
    pub fn get(&self, name: &str) -> std::sync::Arc<tokio::sync::RwLock<()>> {
        let mut map = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(name.to_string()).or_default().clone()
    }
}

#[cfg(test)]
mod tests;

pub mod lock;
pub mod logs;
pub use logs::{LogFileMeta, LogRestoreFile, LogShip, SourceKind};
