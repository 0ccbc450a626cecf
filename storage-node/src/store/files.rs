//! Small helpers over a source's files: paths, opening, durability.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bulwark_common::block::{Digest, Geometry};

use super::*;

pub(super) fn delta_path(dir: &Path, point: u64) -> PathBuf {
    dir.join("deltas").join(format!("{point:020}.delta"))
}

/// The digests of a block of zeros: of a whole block, and of the volume's last
/// block (shorter in some volumes).
#[derive(Debug, Clone, Copy)]
pub(super) struct ZeroDigests {
    pub(super) whole: Digest,
    pub(super) last: Digest,
    pub(super) last_block: u64,
}

impl ZeroDigests {
    pub(super) fn new(g: Geometry) -> ZeroDigests {
        let last_block = g.block_count().saturating_sub(1);
        ZeroDigests {
            whole: Digest::of(&vec![0u8; g.block_size as usize]),
            last: Digest::of(&vec![0u8; g.block_len(last_block) as usize]),
            last_block,
        }
    }
    pub(super) fn of(&self, block: u64) -> Digest {
        if block == self.last_block {
            self.last
        } else {
            self.whole
        }
    }
}

/// Makes a source's replica and digests durable (a first sync's commit, the end of
/// a settle).
pub(super) fn make_durable(replica: &File, digests: &File, dir: &Path) -> Result<()> {
    replica
        .sync_all()
        .map_err(io("fsync", &dir.join("replica")))?;
    digests
        .sync_all()
        .map_err(io("fsync", &dir.join("digests")))
}

/// How [`open_rw`] treats a file that is missing or has contents.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Open {
    /// It must exist.
    Existing,
    /// Made if missing, kept as it is otherwise.
    Create,
    /// Made if missing, emptied otherwise.
    Truncate,
}

/// Opens one of a source's files for reading and writing.
pub(super) fn open_rw(path: &Path, how: Open) -> Result<File> {
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

pub(super) fn fsync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io("fsync directory", path))
}

pub(super) fn read_at_full(f: &File, buf: &mut [u8], offset: u64, path: &Path) -> Result<()> {
    f.read_exact_at(buf, offset).map_err(io("read", path))
}
