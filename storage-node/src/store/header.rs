//! The header of the data files the node writes with binary content of its own:
//! `deltas/<P>.delta`, `journal` and `digests` (the replica and the copies of log
//! files hold the source's bytes as they are, with no framing: the replica's layout
//! is the digests file's version).
//!
//! A header is 16 bytes at the start of the file: an 8-byte magic naming the kind
//! of file (`BWKDELTA`, `BWKJRNL1`, `BWKDIGST`), the format version (u32 LE), and 4
//! bytes of zeros. Offsets in the file (a record's data, a block's digest) count
//! from the end of the header.
//!
//! # Compatibility
//!
//! Version 2 (compressed records: kind 2 in `delta.rs`) reads every file of
//! versions 0 and 1 as it is: their records are all raw or zeros, which version 2
//! keeps unchanged. A node writes version 2 into every new data file, whether it
//! compresses or not (`[pool] compression = "off"` writes raw records into version 2
//! files), and a merge rewrites older deltas as version 2, so a store holds files of
//! several versions and records of both kinds side by side.
//!
//! Files written before the header existed have none: they are read as format
//! version 0, which is the same record layout as version 1 without the header, and
//! are never rewritten in place (a delta is replaced by its merge, a journal by the
//! next sync's, each with a header). A file without a header is told apart by what
//! can start it: a delta or journal record starts with its block index (u64 LE), of
//! which the last byte is always 0 (no volume has 2^56 blocks), while every magic's
//! eighth byte is not; a digests file is 32 bytes per block, so its length modulo 32
//! is 0 without a header and 16 with one.
//!
//! A delta's recorded size (`DeltaMeta::bytes`) is its file's length, header
//! included, and a sync's space check counts the header its settle will write, so
//! the allocation accounting is what is on disk.
//!
//! A file whose magic is not its kind's, or whose version is newer than
//! [`DATA_FORMAT_VERSION`], is refused with an error naming the file, the
//! version found and the version this node reads. At open, the node checks every
//! data file of every source: a source with such a file is refused as a whole (the
//! same as a source whose record cannot be read: its files are left alone, the node
//! raises a `refused-source/<source>` alert, and every other source is served).
//! Downgrading a node under files a newer one wrote is therefore safe, if not
//! useful; moving a source to an older node is not supported.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use bulwark_common::block::DIGEST_LEN;

use super::*;

/// Bytes of a data file's header.
pub(super) const FILE_HEADER_LEN: u64 = 16;
/// The newest data-file format this node reads, and the one it writes. Version 2
/// added compressed records (kind 2, see `delta.rs`) to deltas and journals; the
/// digests file's layout did not change. Versions 0 and 1 (raw records only) are
/// read as they are.
pub(super) const DATA_FORMAT_VERSION: u32 = 2;

/// A kind of data file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DataFile {
    /// `deltas/<P>.delta`.
    Delta,
    /// `journal`.
    Journal,
    /// `digests`.
    Digests,
}

impl DataFile {
    fn magic(self) -> [u8; 8] {
        match self {
            DataFile::Delta => *b"BWKDELTA",
            DataFile::Journal => *b"BWKJRNL1",
            DataFile::Digests => *b"BWKDIGST",
        }
    }

    fn what(self) -> &'static str {
        match self {
            DataFile::Delta => "delta",
            DataFile::Journal => "journal",
            DataFile::Digests => "digests",
        }
    }

    /// The header this node writes at the start of such a file.
    pub(super) fn header(self) -> [u8; FILE_HEADER_LEN as usize] {
        let mut h = [0u8; FILE_HEADER_LEN as usize];
        h[..8].copy_from_slice(&self.magic());
        h[8..12].copy_from_slice(&DATA_FORMAT_VERSION.to_le_bytes());
        h
    }

    /// Writes the header at the start of a new, empty file.
    pub(super) fn write_header(self, file: &File, path: &Path) -> Result<()> {
        file.write_all_at(&self.header(), 0)
            .map_err(io("write", path))
    }
}

/// Reads and checks the header of `file`, a `kind` file at `path`: returns where
/// its content starts (0 for a file of format version 0, without a header). Fails
/// with [`StoreError::DataFormat`] for a version newer than this node reads, or a
/// file that is not of its kind.
pub(super) fn content_start(file: &File, path: &Path, kind: DataFile) -> Result<u64> {
    let len = file.metadata().map_err(io("stat", path))?.len();
    if kind == DataFile::Digests {
        match len % DIGEST_LEN as u64 {
            0 => return Ok(0),
            16 => {}
            _ => {
                return Err(StoreError::DataFormat {
                    path: path.to_path_buf(),
                    why: format!(
                        "not a Bulwark {} file: {len} bytes are neither whole digests nor a header and whole digests",
                        kind.what()
                    ),
                });
            }
        }
    } else if len < 8 {
        // Empty, or torn before its first record was whole: nothing to read.
        return Ok(0);
    }
    let mut head = [0u8; FILE_HEADER_LEN as usize];
    let n = (len.min(FILE_HEADER_LEN)) as usize;
    file.read_exact_at(&mut head[..n], 0)
        .map_err(io("read", path))?;
    if head[..8] != kind.magic() {
        if kind != DataFile::Digests && head[7] == 0 {
            // The block index of a record of a file without a header.
            return Ok(0);
        }
        return Err(StoreError::DataFormat {
            path: path.to_path_buf(),
            why: format!(
                "not a Bulwark {} file: it starts with {:?}, not the magic {:?}",
                kind.what(),
                bulwark_common::text::escape(&String::from_utf8_lossy(&head[..8])),
                String::from_utf8_lossy(&kind.magic()),
            ),
        });
    }
    if n < FILE_HEADER_LEN as usize {
        // A header torn by a crash right after the file was made: no content.
        return Ok(FILE_HEADER_LEN);
    }
    let version = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    if version > DATA_FORMAT_VERSION {
        return Err(StoreError::DataFormat {
            path: path.to_path_buf(),
            why: format!(
                "format version {version}, this node reads {DATA_FORMAT_VERSION} (a newer node wrote it)"
            ),
        });
    }
    Ok(FILE_HEADER_LEN)
}

/// [`content_start`] of the file at `path`, opened for it.
pub(super) fn check_file(path: &Path, kind: DataFile) -> Result<u64> {
    let f = File::open(path).map_err(io("open", path))?;
    content_start(&f, path, kind)
}

/// Why this node refuses the source of `meta` because of its data files (a file
/// of a newer format, or not of its kind), if it does.
pub(super) fn refused_files(meta: &SourceMeta) -> Option<String> {
    if meta.kind != SourceKind::Volume {
        return None;
    }
    let dir = meta.dir();
    let mut files = vec![
        (dir.join("digests"), DataFile::Digests),
        (journal_path(&dir), DataFile::Journal),
    ];
    if let Ok(entries) = std::fs::read_dir(dir.join("deltas")) {
        let mut deltas: Vec<_> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "delta"))
            .collect();
        deltas.sort();
        files.extend(deltas.into_iter().map(|p| (p, DataFile::Delta)));
    }
    for (path, kind) in files {
        if !path.exists() {
            continue;
        }
        // Other errors are the operation's to report when it reads the file.
        if let Err(e @ StoreError::DataFormat { .. }) = check_file(&path, kind) {
            return Some(e.to_string());
        }
    }
    None
}
