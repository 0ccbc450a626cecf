//! Trackers: how an agent learns which blocks of a volume changed since the last
//! acknowledged sync, without a change log on the protected host's disk.
//!
//! One trait, [`Tracker`], with a backend per `tracker` key of a data source:
//!
//! - `fingerprint` ([`FingerprintTracker`]) keeps nothing: every sync reads the whole
//!   volume and compares each block with the node's digests. It is also the engine of
//!   every consistency check.
//! - `nbd-filter` ([`filter::FilterTracker`]) serves the volume as an NBD export and
//!   sets one bit per block in memory for every write that passes through it.
//! - `qcow2-bitmap` ([`qcow2::Qcow2Tracker`]) uses QEMU's persistent dirty bitmaps
//!   inside the image, rotated and read through one `qemu-storage-daemon` per sync.
//! - `dm-era` ([`era::EraTracker`]) puts device-mapper's era target in front of a
//!   block device and asks the kernel's record which blocks were written.
//!
//! A sync calls [`Tracker::begin`], which freezes the changes so far (writes from then
//! on belong to the next sync) and says what to read ([`Plan`]); then exactly one of
//! [`Tracker::committed`] (the node acknowledged the point) or [`Tracker::failed`]
//! (the changes go back, to be sent next time). A tracker that cannot vouch for its
//! record — after an unclean stop, a lost bitmap, a node whose newest point is not the
//! one the record is relative to — is *inconsistent*: its next sync reads everything
//! and compares (a consistency check) instead of trusting the record. The
//! `nbd-filter` with its activity log is *recovering* after a crash instead: its next
//! sync re-checks only the blocks the log and the last checkpoint name.

pub mod activity;
pub mod bitmap;
pub mod era;
pub mod filter;
pub mod qcow2;
mod qcow2_map;
mod qsd;
#[cfg(test)]
mod testutil;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

pub use bitmap::Bitmap;

use crate::volume::Volume;

/// Why a sync could not freeze its changes or open its data.
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error("cannot read {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Era(#[from] era::EraError),
    #[error(transparent)]
    Qcow2(#[from] qcow2::Qcow2Error),
}

/// An external tool that could not be started, or that failed.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("cannot run {tool}: {source}")]
    Spawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} {args} failed: {stderr}")]
    Failed {
        tool: String,
        args: String,
        stderr: String,
    },
}

/// Readable block data: the live volume, a point-in-time snapshot of it, or an image
/// read through qemu's NBD export.
pub trait BlockSource: Send + Sync {
    /// Size in bytes.
    fn size_bytes(&self) -> u64;
    /// Reads `len` bytes at `offset`.
    fn read_chunk(&self, offset: u64, len: usize) -> std::io::Result<Bytes>;
    /// What is read, for messages.
    fn describe(&self) -> String;
}

impl BlockSource for Volume {
    fn size_bytes(&self) -> u64 {
        Volume::size_bytes(self)
    }
    fn read_chunk(&self, offset: u64, len: usize) -> std::io::Result<Bytes> {
        Volume::read_chunk(self, offset, len)
    }
    fn describe(&self) -> String {
        self.path().display().to_string()
    }
}

/// What a sync must read and send.
#[derive(Debug, Clone)]
pub enum Plan {
    /// Read every block and send those whose digest differs from the node's.
    Scan,
    /// Only these blocks changed since point `base`; send them all.
    Dirty { base: u64, blocks: Arc<Bitmap> },
    /// After a crash, with the activity log (see [`activity`]): every block that may
    /// differ from the node's newest point is in `blocks`; read those, compare each
    /// with the node's digest and send those that differ. Valid only against a
    /// newest point at least `since` (the record's base).
    Recheck { since: u64, blocks: Arc<Bitmap> },
}

/// A sync's frozen view: what to read, and from where.
pub struct Frozen {
    pub plan: Plan,
    pub reader: Arc<dyn BlockSource>,
}

/// How an agent learns what changed. Methods block (call them off the async runtime);
/// the agent runs one sync per source at a time.
pub trait Tracker: Send + Sync {
    /// The `tracker` name of the config.
    fn name(&self) -> &'static str;
    /// The volume's size in bytes.
    fn size_bytes(&self) -> u64;
    /// Whether the record of changes can be trusted; when not, the next sync is a
    /// consistency check.
    fn consistent(&self) -> bool;
    /// Forgets the record: the next sync is a consistency check.
    fn mark_inconsistent(&self, why: &str);
    /// Freezes the changes so far and opens the data for reading. With `scan`, every
    /// block is read and compared (a consistency check). `read_from` is a
    /// point-in-time snapshot to read instead of the live volume.
    fn begin(&self, scan: bool, read_from: Option<&Path>) -> Result<Frozen, TrackerError>;
    /// The node acknowledged point `point`: the frozen changes are sent.
    fn committed(&self, point: u64);
    /// The sync failed: the frozen changes go back to be sent next time.
    fn failed(&self);
    /// Clean shutdown: keeps the record for the next start where the backend can.
    fn shutdown(&self);
    /// Bytes a bounded re-check still owes after a crash (0: none; see
    /// [`Plan::Recheck`]).
    fn recheck_bytes(&self) -> u64 {
        0
    }
}

/// Locks `m`, taking the value even if another thread panicked holding it (the
/// trackers' state stays meaningful: each update is a single assignment).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs an external tool (qemu-img, dmsetup, ...) and returns its stdout, or an
/// error with the command line and its stderr.
pub(crate) fn run_tool(tool: &str, args: &[&str]) -> Result<Vec<u8>, ToolError> {
    let started = std::time::Instant::now();
    let _took = TookLog(tool, args, started);
    let out = std::process::Command::new(tool)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| ToolError::Spawn {
            tool: tool.to_string(),
            source,
        })?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(ToolError::Failed {
            tool: tool.to_string(),
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Logs (at debug) how long a tool ran, however it ended.
struct TookLog<'a>(&'a str, &'a [&'a str], std::time::Instant);

impl Drop for TookLog<'_> {
    fn drop(&mut self) {
        tracing::debug!(
            tool = self.0,
            args = %self.1.join(" "),
            ms = self.2.elapsed().as_secs_f64() * 1000.0,
            "ran"
        );
    }
}

/// Opens the volume (or its snapshot) for reading.
pub fn open_volume(path: &Path) -> Result<Arc<dyn BlockSource>, TrackerError> {
    Volume::open(path)
        .map(|v| Arc::new(v) as Arc<dyn BlockSource>)
        .map_err(|source| TrackerError::Open {
            path: path.to_path_buf(),
            source,
        })
}

/// The `fingerprint` tracker: no record at all, every sync compares every block.
pub struct FingerprintTracker {
    path: std::path::PathBuf,
    size_bytes: u64,
}

impl FingerprintTracker {
    /// A tracker for the volume at `path`, of `size_bytes`.
    pub fn new(path: &Path, size_bytes: u64) -> FingerprintTracker {
        FingerprintTracker {
            path: path.to_path_buf(),
            size_bytes,
        }
    }
}

impl Tracker for FingerprintTracker {
    fn name(&self) -> &'static str {
        "fingerprint"
    }
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }
    fn consistent(&self) -> bool {
        true
    }
    fn mark_inconsistent(&self, _why: &str) {}
    fn begin(&self, _scan: bool, read_from: Option<&Path>) -> Result<Frozen, TrackerError> {
        Ok(Frozen {
            plan: Plan::Scan,
            reader: open_volume(read_from.unwrap_or(&self.path))?,
        })
    }
    fn committed(&self, _point: u64) {}
    fn failed(&self) {}
    fn shutdown(&self) {}
}
