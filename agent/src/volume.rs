//! A protected volume: a regular file or a block device, read in chunks at byte
//! offsets.
//!
//! Reads use `O_DIRECT` where the file system allows it: a sync with the fingerprint
//! tracker reads the whole volume, and through the page cache that would evict the
//! protected host's working set (and cost a copy per byte). Where direct I/O is
//! refused (tmpfs, some network file systems) reads fall back to the page cache.
//!
//! A chunk that is wholly in the page cache already (asked with `cachestat(2)`, which
//! reads nothing) is copied from there: a cached volume is read at memory speed, and
//! nothing new enters the cache. Any other chunk is read with `O_DIRECT`. (A
//! non-blocking `preadv2(RWF_NOWAIT)` was tried and dropped: a miss still starts
//! readahead into the cache, so cold data was read from the disk twice.)

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use bulwark_common::block::{DIRECT_ALIGN, aligned_buffer, open_direct, read_direct_into};
use bytes::{Bytes, BytesMut};

/// Read buffers kept for reuse: a chunk handed out comes back once every clone of it
/// (batches, the gRPC encoder) is dropped, so a scan does not allocate, zero and fault
/// in a fresh buffer per chunk.
const POOL_BUFFERS: usize = 8;

/// A volume opened for reading.
pub struct Volume {
    file: File,
    direct: Option<File>,
    direct_ok: AtomicBool,
    /// Whether `cachestat(2)` works here (cleared on the first refusal).
    cachestat_ok: AtomicBool,
    pool: Mutex<Vec<Bytes>>,
    path: PathBuf,
    size_bytes: u64,
}

impl Volume {
    /// Opens a regular file or block device read-only and learns its size.
    pub fn open(path: &Path) -> std::io::Result<Volume> {
        let mut file = File::open(path)?;
        let meta = file.metadata()?;
        let ft = meta.file_type();
        let size_bytes = if ft.is_block_device() {
            file.seek(SeekFrom::End(0))?
        } else if ft.is_file() {
            meta.len()
        } else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file or block device",
            ));
        };
        let direct = open_direct(path, true);
        Ok(Volume {
            file,
            pool: Mutex::new(Vec::new()),
            direct_ok: AtomicBool::new(direct.is_some()),
            cachestat_ok: AtomicBool::new(true),
            direct,
            path: path.to_path_buf(),
            size_bytes,
        })
    }

    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether reads bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct_ok.load(Ordering::Relaxed)
    }

    /// Reads `len` bytes at `offset`; a volume that shrank underneath is an error.
    pub fn read_chunk(&self, offset: u64, len: usize) -> std::io::Result<Bytes> {
        if let Some(direct) = &self.direct
            && self.is_direct()
            && offset.is_multiple_of(DIRECT_ALIGN as u64)
        {
            if self.cachestat_ok.load(Ordering::Relaxed) {
                match wholly_cached(&self.file, offset, len) {
                    Ok(true) => {
                        let mut buf = self.buffer(len);
                        buf.truncate(len);
                        self.file.read_exact_at(&mut buf, offset)?;
                        return Ok(self.keep(buf.freeze()));
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::debug!(path = %self.path.display(), "cachestat refused ({e}); reading with O_DIRECT only");
                        self.cachestat_ok.store(false, Ordering::Relaxed);
                    }
                }
            }
            let buf = self.buffer(len.next_multiple_of(DIRECT_ALIGN));
            match read_direct_into(direct, buf, offset, len) {
                Ok(b) => return Ok(self.keep(b)),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::info!(path = %self.path.display(), "direct I/O refused; reading through the page cache");
                    self.direct_ok.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        let mut buf = self.buffer(len);
        buf.truncate(len);
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(self.keep(buf.freeze()))
    }

    /// An aligned buffer of `len` bytes (holding old contents), from the pool when
    /// one is free again.
    fn buffer(&self, len: usize) -> BytesMut {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..pool.len() {
            let Some(candidate) = pool.pop() else { break };
            if candidate.len() >= len {
                match candidate.try_into_mut() {
                    Ok(mut b) => {
                        b.truncate(len);
                        return b;
                    }
                    Err(in_use) => pool.insert(0, in_use),
                }
            } else {
                pool.insert(0, candidate);
            }
        }
        drop(pool);
        aligned_buffer(len)
    }

    /// Remembers a chunk so that its buffer can be reused once it is released.
    fn keep(&self, chunk: Bytes) -> Bytes {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < POOL_BUFFERS {
            pool.push(chunk.clone());
        }
        chunk
    }
}

/// Whether every page of `len` bytes at `offset` is in the page cache, asked with
/// `cachestat(2)` (Linux 6.5), which reads nothing from the disk.
#[allow(unsafe_code)]
fn wholly_cached(f: &File, offset: u64, len: usize) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    /// The syscall number, the same on every architecture since Linux 6.5.
    const SYS_CACHESTAT: libc::c_long = 451;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    let range = Range {
        off: offset,
        len: len as u64,
    };
    let mut stat = Stat::default();
    // SAFETY: both pointers refer to live, properly laid out #[repr(C)] values for
    // the duration of the call; the kernel reads `range` and writes `stat` only.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            f.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0u32,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let page = 4096u64;
    let first = offset / page;
    let last = (offset + len as u64).div_ceil(page);
    Ok(stat.nr_cache >= last - first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngCore;

    #[test]
    fn chunks_read_back_exactly_direct_or_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vol");
        let mut data = vec![0u8; 3 * 65536 + 1000];
        rand::rng().fill_bytes(&mut data);
        std::fs::write(&path, &data).expect("write");
        let v = Volume::open(&path).expect("open");
        assert_eq!(v.size_bytes(), data.len() as u64);
        for (off, len) in [
            (0usize, 65536usize),
            (65536, 131072),
            (196608, 1000),
            (0, data.len()),
        ] {
            let got = v.read_chunk(off as u64, len).expect("read");
            assert_eq!(&got[..], &data[off..off + len], "chunk at {off}");
        }
        assert!(
            v.read_chunk(196608, 65536).is_err(),
            "reading past the end must fail"
        );
        // Half cached, half not: an O_DIRECT write drops its range from the page
        // cache, so the read below takes the first pages from the cache and the rest
        // from the disk.
        if let Some(w) = open_direct(&path, false) {
            let mut block = aligned_buffer(65536);
            rand::rng().fill_bytes(&mut block);
            w.write_all_at(&block, 65536).expect("direct write");
            data[65536..131072].copy_from_slice(&block);
            let got = v.read_chunk(0, 196608).expect("read");
            assert_eq!(&got[..], &data[..196608], "a partly cached chunk");
        }
        let b = aligned_buffer(10_000);
        assert_eq!(b.as_ptr() as usize % DIRECT_ALIGN, 0);
        assert_eq!(b.len(), 10_000);
    }
}
