//! What the fuzz targets share: an in-memory NBD backend, a scratch directory for
//! targets whose code under test reads files, and the checksum fix-up that lets
//! mutated delta and journal records get past their header checks.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use bulwark_common::block::{Digest, Geometry};
use bulwark_nbd::Backend;

/// A scratch directory for this fuzzing process, on tmpfs when there is one (the
/// targets rewrite a file on every execution).
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        tempfile::Builder::new()
            .prefix("bulwark-fuzz-")
            .tempdir_in(base)
            .expect("a scratch directory for the fuzz target")
    })
    .path()
}

/// Writes `bytes` to `name` in the scratch directory (replacing it) and returns
/// its path.
pub fn scratch_file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch().join(name);
    std::fs::write(&path, bytes).expect("write the fuzz input to the scratch directory");
    path
}

/// A volume in memory, for the NBD targets.
pub struct MemBackend {
    data: Mutex<Vec<u8>>,
    read_only: bool,
}

impl MemBackend {
    pub fn new(size: usize, read_only: bool) -> MemBackend {
        MemBackend {
            data: Mutex::new(vec![0u8; size]),
            read_only,
        }
    }

    fn range(&self, offset: u64, len: u64) -> io::Result<std::ops::Range<usize>> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(offset as usize..end as usize),
            _ => Err(io::Error::from_raw_os_error(22)),
        }
    }
}

impl Backend for MemBackend {
    fn size(&self) -> u64 {
        self.data.lock().map_or(0, |d| d.len() as u64)
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let r = self.range(offset, buf.len() as u64)?;
        let d = self.data.lock().map_err(|_| io::Error::other("poisoned"))?;
        buf.copy_from_slice(&d[r]);
        Ok(())
    }
    fn write_at(&self, data: &[u8], offset: u64, _fua: bool) -> io::Result<()> {
        let r = self.range(offset, data.len() as u64)?;
        let mut d = self.data.lock().map_err(|_| io::Error::other("poisoned"))?;
        d[r].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64, _fua: bool) -> io::Result<()> {
        self.write_zeroes(offset, len, false, true)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _fua: bool, _may_trim: bool) -> io::Result<()> {
        let r = self.range(offset, len)?;
        let mut d = self.data.lock().map_err(|_| io::Error::other("poisoned"))?;
        d[r].fill(0);
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u32)>> {
        // Alternating data and zero runs of 4 KiB, to give the reply's extent
        // merging and clamping something to do.
        let r = self.range(offset, len)?;
        let mut out = Vec::new();
        let mut at = r.start as u64;
        while at < r.end as u64 {
            let run = (4096 - at % 4096).min(r.end as u64 - at);
            out.push((run, ((at / 4096) % 2) as u32 * 2));
            at += run;
        }
        Ok(out)
    }
}

/// Bytes of a delta or journal record's header (block, kind, length, digest) and
/// of its check (see storage-node/src/store/delta.rs).
pub const RECORD_HEADER: usize = 8 + 1 + 4 + 32;
pub const RECORD_CHECK: usize = 8;

/// Which checksums [`fix_records`] makes right, so that mutations reach the
/// decoder's later checks instead of all failing the first one.
#[derive(Debug, Clone, Copy)]
pub struct Fixes {
    /// Every record header's 8-byte BLAKE3 check.
    pub header_checks: bool,
    /// A data record's digest, from its data.
    pub data_digests: bool,
    /// A record without data gets the digest of a block of zeros (journal).
    pub zero_digests: bool,
}

/// A fuzz input for a delta or journal file: one byte of decoder flags, the
/// volume's geometry, and the file's bytes.
#[derive(Debug)]
pub struct RecordInput<'a> {
    pub flags: u8,
    pub geometry: Geometry,
    pub extra: u32,
    pub file: &'a [u8],
}

impl<'a> RecordInput<'a> {
    /// `[flags][block size: 4 KiB << (b % 3)][size_bytes: u64 LE][extra: u32 LE][file…]`;
    /// `None` when too short. Small block sizes keep executions fast (the decoder's
    /// logic does not depend on the size).
    pub fn parse(data: &'a [u8]) -> Option<RecordInput<'a>> {
        let (head, file) = data.split_at_checked(14)?;
        let block_size = 4096u32 << (head[1] % 3);
        let size_bytes = u64::from_le_bytes(head[2..10].try_into().ok()?);
        let geometry = Geometry::new(size_bytes, block_size).ok()?;
        let extra = u32::from_le_bytes(head[10..14].try_into().ok()?);
        Some(RecordInput {
            flags: head[0],
            geometry,
            extra,
            file,
        })
    }

    /// What bits 3, 4 and 5 of the flags ask to fix.
    pub fn fixes(&self) -> Fixes {
        Fixes {
            header_checks: self.flags & 8 != 0,
            data_digests: self.flags & 16 != 0,
            zero_digests: self.flags & 32 != 0,
        }
    }
}

/// Makes the checksums `fixes` names right in a delta or journal file whose magic
/// is `magic` (or that has no header), walking its records as the reader does.
pub fn fix_records(file: &mut [u8], magic: &[u8; 8], geometry: Geometry, fixes: Fixes) {
    let mut at = if file.len() >= 16 && &file[..8] == magic {
        16
    } else if file.len() >= 8 && file[7] == 0 {
        0
    } else {
        return;
    };
    let mut zero: Option<(u64, Digest)> = None;
    while at + RECORD_HEADER + RECORD_CHECK <= file.len() {
        let kind = file[at + 8];
        let block = u64::from_le_bytes(file[at..at + 8].try_into().unwrap_or([0; 8]));
        let len = u32::from_le_bytes(file[at + 9..at + 13].try_into().unwrap_or([0; 4])) as usize;
        let data_at = at + RECORD_HEADER + RECORD_CHECK;
        let digest = if kind == 1 && fixes.data_digests {
            file.get(data_at..data_at.saturating_add(len))
                .map(Digest::of)
        } else if kind == 0 && fixes.zero_digests && block < geometry.block_count() {
            let want = geometry.block_len(block);
            let d = match zero {
                Some((l, d)) if l == want => d,
                _ => Digest::of(&vec![0u8; want as usize]),
            };
            zero = Some((want, d));
            Some(d)
        } else {
            None
        };
        if let Some(d) = digest {
            file[at + 13..at + RECORD_HEADER].copy_from_slice(&d.0);
        }
        if fixes.header_checks {
            let check = blake3::hash(&file[at..at + RECORD_HEADER]);
            file[at + RECORD_HEADER..data_at].copy_from_slice(&check.as_bytes()[..RECORD_CHECK]);
        }
        // Kinds 1 (raw) and 2 (a zstd frame of `len` bytes) carry bytes.
        at = data_at + if kind == 1 || kind == 2 { len } else { 0 };
    }
}
