//! What an export is served from: the [`Backend`] trait and [`FileBackend`], a file
//! or block device behind `pread`, `pwrite`, `fallocate`, `BLKDISCARD` and
//! `SEEK_DATA`/`SEEK_HOLE` (the system calls, with their `unsafe`, in `sys`).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::proto;
use crate::splice::Spliced;

/// Storage behind an export. Methods are called from blocking threads, several at a
/// time for the same connection and across connections; offsets and lengths are
/// checked against [`Backend::size`] before any call.
pub trait Backend: Send + Sync + 'static {
    /// Export size in bytes, fixed for the life of a connection.
    fn size(&self) -> u64;
    /// Whether writes are refused (the export is advertised read-only).
    fn read_only(&self) -> bool;
    /// Fills `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `data` at `offset`; with `fua`, returns only once it is durable.
    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Discards a range (advisory: afterwards its contents are unspecified).
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()>;
    /// Makes a range read as zeroes; `may_trim` allows deallocating it to do so.
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, may_trim: bool) -> io::Result<()>;

    /// Allocation status for the `base:allocation` context: consecutive
    /// `(length, STATE_HOLE | STATE_ZERO flags)` extents starting at `offset`. They
    /// may cover less than `len` (at least one byte) or run past it (cut off). The
    /// default says "allocated, contents unknown", which is always correct.
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u32)>> {
        let _ = offset;
        Ok(vec![(len, 0)])
    }

    /// Whether a flush or FUA on one connection also persists writes completed on
    /// every other connection (`NBD_FLAG_CAN_MULTI_CONN`). Only say yes when all
    /// connections share one cache, e.g. one file and `fdatasync`.
    fn can_multi_conn(&self) -> bool {
        false
    }

    /// Whether large writes that arrive on a plain socket are to be handed over in
    /// pipes ([`Backend::write_spliced`]) rather than in memory. Say yes when the
    /// writes go to a file: the payload then reaches the page cache with one copy
    /// instead of two (see [`super::splice`]).
    fn takes_spliced(&self) -> bool {
        false
    }

    /// Writes a payload held in pipes at `offset`; with `fua`, returns only once it
    /// is durable. Only called when [`Backend::takes_spliced`] says yes. The default
    /// reads it into memory and calls [`Backend::write_at`].
    fn write_spliced(&self, data: &mut Spliced, offset: u64, fua: bool) -> io::Result<()> {
        let buf = data.to_vec()?;
        self.write_at(&buf, offset, fua)
    }
}

/// A [`Backend`] over a regular file or a block device: `pread`/`pwrite`,
/// `fdatasync` for flush, a second `O_DSYNC` descriptor for FUA writes, and
/// `fallocate` (or `BLKDISCARD`) for trim and write-zeroes.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    /// The same open file reopened with `O_DSYNC`; `None` when read-only.
    dsync: Option<File>,
    size: u64,
    read_only: bool,
    block_device: bool,
}

/// Zeroes written when the file system cannot zero a range itself.
static ZEROES: [u8; 1 << 20] = [0; 1 << 20];

impl FileBackend {
    /// Opens a regular file or block device; its current size is the export size.
    pub fn open(path: &Path, read_only: bool) -> io::Result<FileBackend> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let meta = file.metadata()?;
        let block_device = meta.file_type().is_block_device();
        if !meta.is_file() && !block_device {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is neither a regular file nor a block device",
                    path.display()
                ),
            ));
        }
        let size = if block_device {
            (&file).seek(SeekFrom::End(0))?
        } else {
            meta.len()
        };
        // Reopen through /proc so both descriptors are the same file even if the
        // path is renamed or replaced in between.
        let dsync = if read_only {
            None
        } else {
            Some(
                OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DSYNC)
                    .open(format!("/proc/self/fd/{}", file.as_raw_fd()))?,
            )
        };
        Ok(FileBackend {
            file,
            dsync,
            size,
            read_only,
            block_device,
        })
    }

    fn writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(io::Error::from_raw_os_error(libc::EPERM))
        } else {
            Ok(())
        }
    }

    /// The descriptor a write goes through: the `O_DSYNC` one for FUA.
    fn write_target(&self, fua: bool) -> &File {
        match (&self.dsync, fua) {
            (Some(dsync), true) => dsync,
            _ => &self.file,
        }
    }

    fn write_zero_buffers(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(ZEROES.len() as u64) as usize;
            self.file.write_all_at(&ZEROES[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }
}

/// Errors that mean "this file system or device cannot do that", after which a
/// slower, always-available way is used instead.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::ENOTTY | libc::EINVAL)
    )
}

impl Backend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.writable()?;
        self.write_target(fua).write_all_at(data, offset)
    }

    fn takes_spliced(&self) -> bool {
        !self.read_only
    }

    fn write_spliced(&self, data: &mut Spliced, offset: u64, fua: bool) -> io::Result<()> {
        self.writable()?;
        data.write_to(self.write_target(fua), offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.writable()?;
        let r = if self.block_device {
            // BLKDISCARD wants whole sectors; shrink the range inward to 4 KiB, which
            // is a multiple of every logical sector size.
            let start = offset.next_multiple_of(4096);
            let end = (offset + len) / 4096 * 4096;
            if end > start {
                sys::discard(&self.file, start, end - start)
            } else {
                Ok(())
            }
        } else {
            sys::fallocate(
                &self.file,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        };
        match r {
            Ok(()) => {}
            // Trim is a hint; a device or file system that cannot discard ignores it.
            Err(e) if unsupported(&e) => return Ok(()),
            Err(e) => return Err(e),
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, may_trim: bool) -> io::Result<()> {
        self.writable()?;
        if len == 0 {
            return Ok(());
        }
        let mut done = false;
        if may_trim {
            // Punching reads back as zeroes on files and on block devices alike.
            match sys::fallocate(
                &self.file,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Ok(()) => done = true,
                Err(e) if unsupported(&e) => {}
                Err(e) => return Err(e),
            }
        }
        if !done {
            match sys::fallocate(
                &self.file,
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Ok(()) => {}
                Err(e) if unsupported(&e) => self.write_zero_buffers(offset, len)?,
                Err(e) => return Err(e),
            }
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u32)>> {
        if self.block_device {
            return Ok(vec![(len, 0)]);
        }
        let end = offset.saturating_add(len);
        let mut extents = Vec::new();
        let mut pos = offset;
        while pos < end && extents.len() < MAX_EXTENTS {
            let data = match sys::seek_data(&self.file, pos) {
                Ok(Some(d)) => d,
                // No data from here to the end of the file.
                Ok(None) => {
                    extents.push((end - pos, proto::STATE_HOLE | proto::STATE_ZERO));
                    break;
                }
                // No SEEK_DATA on this file system: everything is data.
                Err(e) if unsupported(&e) => {
                    extents.push((end - pos, 0));
                    break;
                }
                Err(e) => return Err(e),
            };
            if data > pos {
                let hole_end = data.min(end);
                extents.push((hole_end - pos, proto::STATE_HOLE | proto::STATE_ZERO));
                pos = hole_end;
                continue;
            }
            let hole = sys::seek_hole(&self.file, pos)?.unwrap_or(end).min(end);
            // SEEK_HOLE never returns a position before `pos` when `pos` is in data;
            // treat anything else as "the rest is data" rather than loop forever.
            let data_end = if hole > pos { hole } else { end };
            extents.push((data_end - pos, 0));
            pos = data_end;
        }
        Ok(extents)
    }

    fn can_multi_conn(&self) -> bool {
        // One file, one page cache, and flush is fdatasync of that file: a flush on
        // any connection covers writes completed on all of them.
        true
    }
}

/// The few system calls std does not wrap.
#[allow(unsafe_code)]
pub(crate) mod sys {
    use std::fs::File;
    use std::io::{self, IoSlice};
    use std::os::fd::{AsRawFd, BorrowedFd};

    /// `_IO(0x12, 119)` from `<linux/fs.h>`.
    const BLKDISCARD: u64 = 0x1277;
    /// Most buffers one `sendmsg` takes (`UIO_MAXIOV`).
    const IOV_MAX: usize = 1024;

    fn off(v: u64) -> io::Result<libc::off_t> {
        libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
    }

    pub fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let (offset, len) = (off(offset)?, off(len)?);
        loop {
            // SAFETY: the descriptor stays open for the borrow of `file`; fallocate
            // takes no pointers.
            let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
            if rc == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    pub fn discard(file: &File, offset: u64, len: u64) -> io::Result<()> {
        let range: [u64; 2] = [offset, len];
        // SAFETY: BLKDISCARD reads two u64 (start, length) through the pointer, which
        // points at `range`, alive for the whole call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKDISCARD as _, range.as_ptr()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn lseek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        let offset = off(offset)?;
        // SAFETY: plain syscall on a descriptor that stays open for the borrow. The
        // file position it moves is never used: all I/O is pread/pwrite.
        let rc = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
        if rc >= 0 {
            return Ok(Some(rc as u64));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        }
    }

    /// `sendmsg` of `bufs` on a connected socket, without SIGPIPE (a closed peer is
    /// `EPIPE`); with `nonblocking`, `EWOULDBLOCK` instead of waiting for room.
    pub fn send_vectored(
        sock: BorrowedFd<'_>,
        bufs: &[IoSlice<'_>],
        nonblocking: bool,
    ) -> io::Result<usize> {
        // SAFETY: all-zero is a valid msghdr (no address, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        // IoSlice is ABI-compatible with iovec on Unix; sendmsg only reads them.
        msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = bufs.len().min(IOV_MAX) as _;
        let flags = libc::MSG_NOSIGNAL | if nonblocking { libc::MSG_DONTWAIT } else { 0 };
        // SAFETY: `msg` points at `bufs`, alive and unchanged for the whole call, and
        // the descriptor stays open for the borrow.
        let rc = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, flags) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc as usize)
        }
    }

    /// Start of the next data at or after `offset`; `None` if only a hole follows.
    pub fn seek_data(file: &File, offset: u64) -> io::Result<Option<u64>> {
        lseek(file, offset, libc::SEEK_DATA)
    }

    /// Start of the next hole at or after `offset` (end of file counts as a hole).
    pub fn seek_hole(file: &File, offset: u64) -> io::Result<Option<u64>> {
        lseek(file, offset, libc::SEEK_HOLE)
    }
}

/// Most extents sent in one block status reply.
pub(crate) const MAX_EXTENTS: usize = 1024;
