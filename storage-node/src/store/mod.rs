//! The storage node's on-disk format: per data source, a replica and a chain of
//! recovery points, with crash-safe commits.
//!
//! One behaviour per file: `meta.rs` (the metadata store trait, sled), `records.rs`
//! (the records), `header.rs` (data-file headers), `delta.rs` (the record codec),
//! `journal.rs`, `sync.rs` (the sync transaction), `images.rs` (before-image reads,
//! replica writes), `settle.rs`, `recovery.rs` (open), `pool.rs` (placement, space),
//! `retention.rs` (retention, prune, merge), `verify.rs`, `restore.rs`, `view.rs`
//! (NBD views), `moves.rs` (export, import), `lock.rs` (retention locks), `logs.rs`
//! (log sources; a ship in `logs/ship.rs`), `compress.rs` (`[pool] compression`, one block compressed or
//! decompressed). This file: the format and the crash argument below, the error
//! type, [`Store`] and [`SourceLocks`].
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
//! `digests`, every delta and the journal start with a 16-byte header: a magic
//! naming the kind of file and the format version (`header.rs`; a file without one
//! is version 0, of a node before the header; offsets below count from the end of
//! the header). A source with a file of a newer version or the wrong magic is
//! refused at open, its files left alone, the other sources served.
//!
//! In `<data_dir>/meta` (sled, behind the `MetaStore` trait of `meta.rs`), each
//! record JSON with a format version `v` (`records.rs`):
//! `sources` (name → [`SourceMeta`]), `points` (name ∖0 id → [`PointMeta`]),
//! `pending` (name → the sync being received) and `settle` (name → the committed
//! point whose blocks are still only in the journal: `{v, point, disk}`).
//!
//! A delta file is (after its file header) a sequence of records (`delta.rs`): a
//! 45-byte record header (block index u64 LE, kind u8: 0 = the block read as zeros, 1 =
//! data follows, 2 = a zstd frame of the data follows; length u32 LE: the block's, or
//! for kind 2 the frame's, smaller than the block's; the block's old digest), an
//! 8-byte check (the first 8 bytes of BLAKE3 of the header), then `length` bytes when
//! kind is 1 or 2. A record is valid when its check matches and its data (kind 2:
//! decompressed into exactly the block's length, never more) hashes to its digest;
//! reading stops at the first invalid record (a torn tail). Records are compressed
//! as `[pool] compression` says (`compress.rs`), each kept raw when it does not
//! shrink; a store may hold both kinds in one file.
//!
//! # Order of writes (the crash-safety argument)
//!
//! A source's first sync (fresh) goes straight into the replica (`sync.rs`):
//!
//! 1. `pending[source] = {new_point: 1, fresh}` (and the source's record) is written
//!    and flushed before any data file exists.
//! 2. Each batch of extents (already checksum-verified) is written into `replica`
//!    and `digests`.
//! 3. Commit: fsync `replica` and `digests`; one sled transaction inserts point 1
//!    and removes `pending`; sled is flushed; only then is the sync acknowledged.
//!
//! Every later sync, from point `N` to `N+1`, is journaled (`sync.rs`, `journal.rs`)
//! and settled after its acknowledgement (`settle.rs`):
//!
//! 1. `pending[source] = {new_point: N+1, journal}` is written and flushed before the
//!    journal is created.
//! 2. Receive: each batch's new blocks are appended to `journal` (whole pages
//!    `O_DIRECT`). The replica, digests and deltas are not touched. The old digests of
//!    the changing blocks are read to know how many before-image bytes point `N` will
//!    keep (`images.rs`), and the allocation is checked (`pool.rs`: grown, or the
//!    oldest points pruned, or [`StoreError::AllocationFull`]) now, at receive time.
//! 3. Commit: fdatasync `journal`; one sled transaction inserts point `N+1`, inserts
//!    `settle[source] = {point: N+1, ...}`, removes `pending` and updates the
//!    source's record; sled is flushed; only then is the sync acknowledged. A
//!    commit whose fsync fails is rolled back at once (the journal deleted).
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
//! Recovery at open (`recovery.rs`): a `pending` record of a fresh sync deletes the
//! source's files and record; of a later sync it deletes the journal (the replica was
//! never touched; a pending record of an older node, which wrote into the replica, is
//! undone from its delta as below). Then, for every `settle` record, the before-images
//! a partial settle appended to `deltas/N.delta` are written back into `replica` and
//! `digests` (every valid record; a torn tail ends it), both are fsync'd and the delta
//! is deleted (`undo_delta`, `recovery.rs`): because a block is overwritten only after
//! its before-image is durable, the replica is exactly point `N` again. Then the point
//! is settled again from the journal, which was made durable before the commit. A
//! journal left without a `settle` record (a crash after the settle's flush) is
//! deleted. So a crash at any instant leaves the previous point or the new one, never a
//! mix, and a point once acknowledged is never lost.
//!
//! A settle that fails (an I/O error, or a journal record whose check or checksum
//! fails: the only guard against a journal damaged on disk after its flush) undoes
//! what it applied in the same way, so the replica is point `N`, whole; the
//! `settle` record and the journal stay. The settle, and every later operation on
//! that source, fail with [`StoreError::SettleFailed`] naming the source, point and
//! cause (the node raises a critical alert `settle/<source>`), except restores and
//! views of the points before the unsettled one, which the whole replica and
//! their deltas still serve; the other sources are served. Each start of the node
//! tries the settle again. A settle that failed only because the pool disk's file
//! system was full (`ENOSPC`, `EDQUOT`: [`DiskFault::Full`]) and was undone whole
//! is tried again by the next operation on the source instead (the node's
//! heartbeat applies the source's policy, so within a heartbeat of the space
//! returning); until then it fails as above.
//!
//! Limits: the journal takes disk space beyond the source's allocation (up to the
//! sync's size) until the point is settled. A node older than this format does not
//! know the `settle` tree: it would take the unsettled point's replica for the
//! point itself. Downgrade only after a clean start of the newer node (which
//! settles everything).
//!
//! # Space (`pool.rs`)
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
//! # Pruning (`retention.rs`)
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
//! # Views (`view.rs`)
//!
//! A [`PointView`] (an NBD export) maps each block of its point to a delta record or
//! the replica. It holds its delta files open, so prunes do not disturb it, and a
//! settle tells every view of its source where the before-images it just made durable
//! are, before it overwrites the replica (see [`PointView`]).
//!
//! # Locking (`SourceLocks` here, the settle mutex in `settle.rs`)
//!
//! The store itself holds no locks across calls, but one settle mutex per source;
//! the node service serialises per source: one sync (with its settle) or prune at
//! a time (write lock), restores, verifies and digest reads share a read lock, so
//! they never see a half-applied sync or a half-settled point.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Format version written into every metadata record.
const FORMAT_VERSION: u32 = 1;

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
    /// A data file of a format newer than this node reads, or that does not
    /// start as its kind does (see `header.rs`).
    #[error("{path}: {why}")]
    DataFormat { path: PathBuf, why: String },
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

/// What a failed I/O call on a pool disk says of the disk: the sync (or ship) it
/// failed is rolled back, and the node raises an alert until one of the source
/// commits (`storage-node/src/workers.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFault {
    /// The file system has no space left (`ENOSPC`, `EDQUOT`), whatever the
    /// logical allocation admits.
    Full,
    /// Any other I/O error (`EIO`, `EROFS`, ...).
    Failed,
}

impl DiskFault {
    /// The alert's kind, and its key's prefix: `disk-full/<source>`,
    /// `disk-error/<source>`.
    pub fn key(self) -> &'static str {
        match self {
            DiskFault::Full => "disk-full",
            DiskFault::Failed => "disk-error",
        }
    }

    /// The fault a key names.
    pub fn from_key(key: &str) -> Option<DiskFault> {
        [DiskFault::Full, DiskFault::Failed]
            .into_iter()
            .find(|f| f.key() == key)
    }
}

impl StoreError {
    /// The disk fault an I/O error is (none for the other errors).
    pub fn disk_fault(&self) -> Option<DiskFault> {
        match self {
            StoreError::Io { error, .. } => Some(match error.raw_os_error() {
                Some(libc::ENOSPC | libc::EDQUOT) => DiskFault::Full,
                _ => DiskFault::Failed,
            }),
            _ => None,
        }
    }
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

/// The node's replicas and recovery points. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    /// The metadata records (see `records.rs`, `meta.rs`).
    meta: std::sync::Arc<dyn MetaStore>,
    /// One per source, held while a settle of it runs, so that two readers never
    /// settle the same source at once (settles of different sources do not wait for
    /// each other).
    settle_locks: std::sync::Arc<std::sync::Mutex<HashMap<String, SettleLock>>>,
    /// Settles that failed since the store opened, by source: every operation on
    /// the source fails with it.
    settle_failed: std::sync::Arc<std::sync::Mutex<HashMap<String, SettleFailure>>>,
    /// Sources refused at open (a stored record that does not decode, a name that
    /// is not one safe path component, or a data file of a newer format or the
    /// wrong magic: see `header.rs`), by their key as stored: nothing is
    /// done with them, and the node raises an alert; the others are served.
    refused: std::sync::Arc<HashMap<String, String>>,
    disks: std::sync::Arc<Vec<PoolDisk>>,
    policy: PoolPolicy,
    /// Open read-only views of points (NBD exports), by source: a settle tells them
    /// where the before-images of the blocks it overwrites went, before it
    /// overwrites them.
    views: std::sync::Arc<std::sync::Mutex<HashMap<String, Vec<std::sync::Weak<PointView>>>>>,
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

// One behaviour per file (see the module docs above). Their items are used
// across the store through these imports; the public ones are re-exported below.
/// The metadata store trait, sled and in-memory.
mod meta;
use meta::*;
/// The records: sources, points, pending syncs, settles.
mod records;
use records::*;
/// The header (magic, format version) of every data file.
mod header;
use header::*;
/// Paths, opening and durability of a source's files.
mod files;
use files::*;
/// Compression of stored records.
mod compress;
/// The delta record codec.
mod delta;
use delta::*;
/// The journal and the settle's reading of it.
mod journal;
use journal::*;
/// Before-image reads and replica writes.
mod images;
/// The sync transaction.
mod sync;
use images::*;
/// The settle of a journaled point into the replica.
mod settle;
use settle::*;
/// Placement, usage and room for before-images.
mod pool;
/// Open and crash recovery.
mod recovery;
use pool::*;
/// Export and import of a source (moves).
mod moves;
/// The restore reader.
mod restore;
/// Retention, prune and merge.
mod retention;
/// Verify and digests.
mod verify;
/// Point views (NBD exports).
mod view;

pub use compress::Compression;
pub use delta::{DeltaReader, DeltaRecord};
pub use images::{BeforeImageReader, Prepared};
#[doc(hidden)]
pub use journal::read_journal;
pub use moves::{ExportMeta, Import};
pub use pool::{DiskUsage, OnFull, PoolPolicy, PoolUsage, SourcePolicy, SourceUsage};
pub use records::{DeltaMeta, PointMeta, SourceMeta, min_replica_bytes};
pub use restore::{RestoreItem, RestoreReader};
pub use sync::{ApplyTimes, SyncSpec, SyncTxn, VerifiedExtent};
pub use verify::VerifyOutcome;
pub use view::PointView;

#[cfg(test)]
mod tests;

/// Retention locks.
pub mod lock;
/// Log sources.
pub mod logs;
pub use logs::{LogFileMeta, LogRestoreFile, LogShip, SourceKind};
