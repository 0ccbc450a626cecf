//! The NBD server: exports one [`Backend`] to any number of clients, or, over TLS,
//! many exports chosen by name.
//!
//! A connection goes through the fixed newstyle handshake (`greet` and `haggle`, on
//! tokio) and then the transmission phase, where many requests are in flight at once:
//!
//! - one reader takes requests off the stream in order and checks each one; a
//!   write's payload is read into a pooled buffer first, because the next request
//!   header follows it on the wire (on a plain socket, a large payload is spliced
//!   into pipes instead, for a backend that takes them: see [`super::splice`]);
//! - each request then runs on one of the connection's I/O threads (`pread`,
//!   `pwrite`, `fdatasync`...; see `Workers`), so one slow flush does not hold up
//!   the reads queued behind it, and no tokio worker ever blocks on the disk;
//! - the thread that ran a request also sends its reply (`Replies`): replies go
//!   out in the order requests complete (the cookie tells the client which is
//!   which), replies that complete together share one `write`, and a large read's
//!   header and data go out with one vectored write.
//!
//! The reader depends on the stream. A plain Unix or TCP socket ([`serve_unix`],
//! [`serve_tcp`]) leaves tokio after the handshake: its reader is a blocking thread
//! (`transmit_blocking`), which hands requests straight to the I/O threads and runs
//! small reads and writes itself while the page cache answers them in microseconds
//! (`Inline`). A small request so costs no thread hand-off at all, and no request
//! goes through an event loop; this is what keeps up with nbdkit, which serves a
//! connection the same way. Any other stream ([`serve`], and TLS) is read by a
//! tokio task (`transmit`). Everything after the reading is shared (`Session`).
//!
//! Exports: the single-backend servers ([`serve`], [`serve_unix`], [`serve_tcp`])
//! answer to the empty name and [`ServerOptions::export_name`]. [`serve_tls_tcp`]
//! requires TLS: before `NBD_OPT_STARTTLS` every option but `NBD_OPT_ABORT` gets
//! `NBD_REP_ERR_TLS_REQD`; after the ACK the TLS handshake runs on the same socket
//! (the caller's `rustls::ServerConfig` decides which client certificates pass),
//! haggling goes on inside TLS, and every option that names an export (`GO`,
//! `INFO`, `EXPORT_NAME`, `LIST_META_CONTEXT`, `SET_META_CONTEXT`) asks an
//! [`ExportResolver`], which sees the client's certificates and may refuse
//! ([`Refusal`]: `NBD_REP_ERR_UNKNOWN` or `NBD_REP_ERR_POLICY`). Both kinds share
//! one negotiation: the single backend is a trivial resolver (`SingleExport`).
//!
//! Memory is bounded per connection: every request takes permits from a semaphore
//! worth [`ServerOptions::max_in_flight_bytes`] (its payload plus a fixed overhead)
//! and gives them back once its reply is written, so a client that sends requests
//! without reading replies stalls itself, not the server.
//!
//! Shutdown stops the reading (a blocking reader is woken by shutting the socket
//! down for reading), lets the requests already read finish and be answered, then
//! closes the connection; a connection still busy after
//! [`ServerOptions::shutdown_grace`] is torn down.
//!
//! Every listener holds at most [`ServerOptions::max_connections`] connections and
//! gives each client [`ServerOptions::handshake_timeout`] to choose an export
//! (see [`super::limits`]); neither costs anything per request.
//!
//! Bad input never takes the process down: a broken rule of the protocol that leaves
//! the stream out of sync (bad magic, an oversized option or write) closes that one
//! connection with a warning; a bad but well-framed request gets an error reply.
//!
//! Not implemented: TLS on Unix sockets and optional ("selective") TLS (the
//! single-backend servers answer `NBD_OPT_STARTTLS` with `NBD_REP_ERR_POLICY`; the
//! TLS listener requires it), extended headers, `NBD_CMD_CACHE`, `NBD_CMD_RESIZE`,
//! `NBD_CMD_FLAG_FAST_ZERO` and `NBD_CMD_FLAG_DF` (none of them advertised).

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, IoSlice, Read, Seek, SeekFrom};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::NbdError;
use super::limits::{self, ConnectionLimit};
use super::proto::{self, Errno, Request};
use super::splice::{self, NotSpliced, PipePool, Spliced};

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
mod sys {
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

/// How the server runs; one value is shared by all connections.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Name the export of the single-backend servers ([`serve`], [`serve_unix`],
    /// [`serve_tcp`]) answers to, besides the default (empty) name. Not used by
    /// [`serve_tls_tcp`], whose [`ExportResolver`] knows the names.
    pub export_name: String,
    /// Bytes of requests one connection may have in flight (payload plus a fixed
    /// overhead per request); the server stops reading the socket beyond it. Raised
    /// to at least one maximum-size request.
    pub max_in_flight_bytes: usize,
    /// How long `serve_unix`/`serve_tcp` wait after shutdown for connections to
    /// finish their in-flight requests before dropping them.
    pub shutdown_grace: Duration,
    /// Most threads running one connection's requests at once (started on demand).
    /// 16 matches qemu's usual queue depth and nbdkit's default. Writes without
    /// FUA have up to two threads of their own instead (more would only queue on
    /// the file's inode lock), and a plain socket has one more, reading requests.
    pub threads_per_connection: usize,
    /// Most connections one listener holds open at once, handshaking or not; one
    /// more is closed as soon as it is accepted, with a warning (see
    /// [`super::limits`]). Raised to at least one.
    pub max_connections: usize,
    /// How long a client may take from connecting until it has chosen an export:
    /// greeting, option haggling and the TLS handshake, not counting the time the
    /// server spends looking the export up. Past it the connection is closed.
    pub handshake_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            export_name: String::new(),
            max_in_flight_bytes: 64 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(30),
            threads_per_connection: 16,
            max_connections: 64,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Context id of `base:allocation` once selected.
const BASE_ALLOCATION_ID: u32 = 1;
/// Budget charged per request on top of its payload, so that many small requests
/// are bounded too.
const REQUEST_OVERHEAD: usize = 16 * 1024;
/// Most extents sent in one block status reply.
const MAX_EXTENTS: usize = 1024;
/// Most options one client may send before it is considered abusive.
const MAX_OPTIONS: usize = 1024;
/// Socket read buffer.
const READ_BUFFER: usize = 256 * 1024;
/// Write payloads from this size on are read past the socket read buffer (see
/// `Reader::read_request`).
const LARGE_PAYLOAD: usize = READ_BUFFER / 2;
/// Read buffer of the handshake of a plain socket (whatever it holds at the end is
/// handed to the transmission phase).
const HANDSHAKE_BUFFER: usize = 4096;
/// Read payloads up to this size are copied into the reply batch; larger ones go
/// out with a vectored write.
const INLINE_PAYLOAD: usize = 64 * 1024;
/// Encoded replies are written out once this much has collected.
const WRITE_BATCH: usize = 256 * 1024;
/// Threads running one connection's writes without FUA (see `Session`). One: with
/// two, a second `pwrite` into the same file waited on the inode's lock by
/// spinning on its owner (`rwsem_spin_on_owner`, 11% of the server's samples for
/// 1 GiB of 1 MiB writes), CPU time taken from the thread reading requests.
const WRITE_THREADS: usize = 1;
/// Pooled buffers kept per connection, and the largest kept.
const POOLED_BUFFERS: usize = 16;
const POOLED_BUFFER_MAX: usize = 2 * 1024 * 1024;

/// Why an [`ExportResolver`] refused an export. The message goes back to the client
/// in the option's error reply (and to the log); `NBD_OPT_EXPORT_NAME`, which cannot
/// carry an error, closes the connection instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No export has that name: `NBD_REP_ERR_UNKNOWN`.
    Unknown(String),
    /// The export exists (or might) but this client may not use it:
    /// `NBD_REP_ERR_POLICY`.
    Forbidden(String),
}

impl Refusal {
    /// The option reply type that carries this refusal.
    fn reply_type(&self) -> u32 {
        match self {
            Refusal::Unknown(_) => proto::REP_ERR_UNKNOWN,
            Refusal::Forbidden(_) => proto::REP_ERR_POLICY,
        }
    }

    /// The message for the client.
    pub fn message(&self) -> &str {
        match self {
            Refusal::Unknown(m) | Refusal::Forbidden(m) => m,
        }
    }
}

/// The fleet identity of an NBD client from its TLS certificates (resolvers that
/// serve only some roles ask this first, so a stranger learns nothing).
pub fn client_identity(
    peer_certs: &[rustls::pki_types::CertificateDer<'static>],
    trust_domain: &str,
) -> Result<bulwark_common::tls::Identity, Refusal> {
    peer_certs
        .first()
        .ok_or_else(|| Refusal::Forbidden("a fleet client certificate is required".into()))
        .and_then(|c| {
            bulwark_common::tls::Identity::from_cert(c.as_ref(), trust_domain)
                .map_err(Refusal::Forbidden)
        })
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Unknown(m) => write!(f, "unknown export: {m}"),
            Refusal::Forbidden(m) => write!(f, "export forbidden: {m}"),
        }
    }
}

/// Finds the export a client asked for. Used by TLS listeners, where the client's
/// certificate is known before it names an export.
///
/// Called on a blocking thread (it may open files), once for every option that
/// names an export: `NBD_OPT_GO`, `NBD_OPT_INFO`, `NBD_OPT_EXPORT_NAME`,
/// `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`. The backend returned
/// for `NBD_OPT_GO` / `NBD_OPT_EXPORT_NAME` is served for the rest of the connection.
pub trait ExportResolver: Send + Sync + 'static {
    /// The export `name` for a client that presented `peer_certs` (leaf first; empty
    /// on a non-TLS connection). `Err` refuses the export: [`Refusal::Unknown`] for a
    /// name that does not exist, [`Refusal::Forbidden`] for a client that may not
    /// use it.
    fn resolve(
        &self,
        name: &str,
        peer_certs: &[CertificateDer<'static>],
    ) -> Result<Arc<dyn Backend>, Refusal>;

    /// Export names to answer `NBD_OPT_LIST` with. The default lists none (an empty
    /// list is a valid answer: the client has to know the name).
    fn list(&self, peer_certs: &[CertificateDer<'static>]) -> Vec<String> {
        let _ = peer_certs;
        Vec::new()
    }
}

/// The resolver of the single-backend API: one backend, under the empty name and
/// [`ServerOptions::export_name`].
struct SingleExport {
    backend: Arc<dyn Backend>,
    name: String,
}

impl SingleExport {
    fn resolver(backend: Arc<dyn Backend>, opts: &ServerOptions) -> Arc<dyn ExportResolver> {
        Arc::new(SingleExport {
            backend,
            name: opts.export_name.clone(),
        })
    }
}

impl ExportResolver for SingleExport {
    fn resolve(
        &self,
        name: &str,
        _peer_certs: &[CertificateDer<'static>],
    ) -> Result<Arc<dyn Backend>, Refusal> {
        if name.is_empty() || name == self.name {
            Ok(Arc::clone(&self.backend))
        } else {
            Err(Refusal::Unknown(format!("no export named {name:?}")))
        }
    }

    fn list(&self, _peer_certs: &[CertificateDer<'static>]) -> Vec<String> {
        vec![self.name.clone()]
    }
}

/// Serves one connection until the client disconnects.
///
/// Generic over the stream. Runs on the current tokio runtime, which the
/// connection's I/O threads also use to write replies. Returns an error when the
/// client broke the protocol or the socket failed; the caller logs it.
/// [`serve_unix`] and [`serve_tcp`] do not come through here: a plain socket is
/// served by blocking threads, which is faster.
pub async fn serve<S>(
    stream: S,
    backend: Arc<dyn Backend>,
    opts: Arc<ServerOptions>,
) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    serve_until(stream, backend, opts, CancellationToken::new()).await
}

/// [`serve`], but once `shutdown` is cancelled no further requests are read: those
/// in flight are answered and the connection is closed.
pub async fn serve_until<S>(
    stream: S,
    backend: Arc<dyn Backend>,
    opts: Arc<ServerOptions>,
    shutdown: CancellationToken,
) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (rd, mut wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(READ_BUFFER, rd);
    let client = Client::plain(SingleExport::resolver(backend, &opts));
    let shaken = handshake(&mut rd, &mut wr, &client, &shutdown);
    let Some(conn) = limits::within(opts.handshake_timeout, shaken).await? else {
        return Ok(());
    };
    transmit(rd, wr, Arc::new(conn), &opts, shutdown).await
}

/// Serves one plain socket: the handshake on tokio, then the transmission phase on
/// blocking threads (see `transmit_blocking`), with the semantics of
/// [`serve_until`].
async fn serve_plain<S: PlainStream>(
    mut stream: S,
    exports: Arc<dyn ExportResolver>,
    opts: Arc<ServerOptions>,
    shutdown: CancellationToken,
) -> Result<(), NbdError> {
    let shaken = limits::within(opts.handshake_timeout, async {
        let (rd, mut wr) = tokio::io::split(&mut stream);
        let mut rd = BufReader::with_capacity(HANDSHAKE_BUFFER, rd);
        let client = Client::plain(exports);
        let Some(conn) = handshake(&mut rd, &mut wr, &client, &shutdown).await? else {
            return Ok(None);
        };
        // Requests the client sent right behind its last option.
        Ok(Some((conn, rd.buffer().to_vec())))
    });
    let Some((conn, early)) = shaken.await? else {
        return Ok(());
    };
    let sock = stream.into_blocking()?;
    transmit_blocking(sock, early, Arc::new(conn), &opts, shutdown).await
}

/// Serves one connection that must start TLS (`NBD_OPT_STARTTLS`) before anything
/// else: the handshake up to STARTTLS on the plain stream, the TLS handshake, the
/// rest of option haggling inside TLS with the client's certificates known, then
/// the transmission phase on tokio (`transmit`). Everything before the transmission
/// phase shares one [`ServerOptions::handshake_timeout`]. A failed TLS handshake is
/// logged here (naming `peer`) and ends the connection without an error.
async fn serve_starttls<S>(
    mut stream: S,
    peer: &str,
    acceptor: tokio_rustls::TlsAcceptor,
    exports: Arc<dyn ExportResolver>,
    opts: Arc<ServerOptions>,
    shutdown: CancellationToken,
) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let shaken = limits::within(opts.handshake_timeout, async {
        let no_zeroes = {
            let (rd, mut wr) = tokio::io::split(&mut stream);
            let mut rd = BufReader::with_capacity(HANDSHAKE_BUFFER, rd);
            let Some(no_zeroes) = greet(&mut rd, &mut wr, &shutdown).await? else {
                return Ok(None);
            };
            let client = Client {
                exports: Arc::clone(&exports),
                certs: Arc::new(Vec::new()),
                tls: Tls::Required,
            };
            match haggle(&mut rd, &mut wr, &client, no_zeroes, &shutdown).await? {
                Haggled::Ended => return Ok(None),
                Haggled::Ready(_) => {
                    return Err(NbdError::Negotiation(
                        "an export was chosen before TLS".into(),
                    ));
                }
                Haggled::StartTls => {}
            }
            // The client must wait for the ACK before its ClientHello; anything read
            // past the option would be plaintext smuggled into the TLS session.
            if !rd.buffer().is_empty() {
                return Err(NbdError::Protocol(
                    "client sent data right behind NBD_OPT_STARTTLS, before the server's reply"
                        .into(),
                ));
            }
            no_zeroes
        };
        let tls = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            r = acceptor.accept(stream) => match r {
                Ok(tls) => tls,
                Err(e) => {
                    tracing::warn!("NBD TLS handshake with {peer} failed: {e}");
                    return Ok(None);
                }
            },
        };
        let certs = tls
            .get_ref()
            .1
            .peer_certificates()
            .map(<[_]>::to_vec)
            .unwrap_or_default();
        if let Some(leaf) = certs.first() {
            match bulwark_common::tls::spiffe_uri(leaf.as_ref()) {
                Ok(id) => tracing::debug!(client = %id, "NBD TLS established"),
                Err(e) => tracing::debug!("NBD TLS established; client certificate: {e}"),
            }
        }
        let (rd, mut wr) = tokio::io::split(tls);
        let mut rd = BufReader::with_capacity(READ_BUFFER, rd);
        let client = Client {
            exports,
            certs: Arc::new(certs),
            tls: Tls::Active,
        };
        match haggle(&mut rd, &mut wr, &client, no_zeroes, &shutdown).await? {
            Haggled::Ended => Ok(None),
            Haggled::StartTls => Err(NbdError::Negotiation("STARTTLS inside TLS".into())),
            Haggled::Ready(ready) => Ok(Some((rd, wr, ready.into_conn()))),
        }
    });
    let Some((rd, wr, conn)) = shaken.await? else {
        return Ok(());
    };
    transmit(rd, wr, Arc::new(conn), &opts, shutdown).await
}

/// Accepts connections on a Unix socket until `shutdown` is cancelled, then waits
/// (up to [`ServerOptions::shutdown_grace`]) for open connections to finish. The
/// socket file is left for the caller to remove.
pub async fn serve_unix(
    listener: UnixListener,
    backend: Arc<dyn Backend>,
    opts: Arc<ServerOptions>,
    shutdown: CancellationToken,
) {
    let exports = SingleExport::resolver(backend, &opts);
    let mut conns = Connections::new(&opts);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => conns.spawn(
                    "unix".to_string(),
                    serve_plain(stream, Arc::clone(&exports), Arc::clone(&opts), shutdown.clone()),
                ),
                Err(e) => accept_failed(e).await,
            },
            Some(done) = conns.set.join_next(), if !conns.set.is_empty() => finished(done),
        }
    }
    conns.drain().await;
}

/// Accepts TCP connections until `shutdown` is cancelled, then waits (up to
/// [`ServerOptions::shutdown_grace`]) for open connections to finish.
pub async fn serve_tcp(
    listener: TcpListener,
    backend: Arc<dyn Backend>,
    opts: Arc<ServerOptions>,
    shutdown: CancellationToken,
) {
    let exports = SingleExport::resolver(backend, &opts);
    accept_tcp(listener, &opts, &shutdown, |stream, _peer| {
        serve_plain(
            stream,
            Arc::clone(&exports),
            Arc::clone(&opts),
            shutdown.clone(),
        )
    })
    .await;
}

/// Accepts TCP connections that must use TLS, until `shutdown` is cancelled, then
/// waits (up to [`ServerOptions::shutdown_grace`]) for open connections to finish.
///
/// Before `NBD_OPT_STARTTLS` every option except `NBD_OPT_ABORT` is answered
/// `NBD_REP_ERR_TLS_REQD` (`NBD_OPT_EXPORT_NAME` closes the connection). The TLS
/// handshake uses `tls` as it is: require and verify client certificates there
/// (as [`bulwark_common::tls::TlsIdentity::server_config`] does; its ALPN `h2` is harmless,
/// as NBD clients such as qemu offer no ALPN). Exports are then chosen by name
/// through `exports`, which sees the client's certificates;
/// [`ServerOptions::export_name`] is not used. The transmission phase runs on tokio.
/// A failed TLS handshake is logged as a warning and closes only that connection.
pub async fn serve_tls_tcp(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    exports: Arc<dyn ExportResolver>,
    opts: Arc<ServerOptions>,
    shutdown: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    accept_tcp(listener, &opts, &shutdown, |stream, peer| {
        let (acceptor, exports, opts, shutdown) = (
            acceptor.clone(),
            Arc::clone(&exports),
            Arc::clone(&opts),
            shutdown.clone(),
        );
        async move { serve_starttls(stream, &peer, acceptor, exports, opts, shutdown).await }
    })
    .await;
}

/// The accept loop of a TCP listener: `start` makes the future that serves one
/// connection (given the stream and the peer's address).
async fn accept_tcp<F, Fut>(
    listener: TcpListener,
    opts: &ServerOptions,
    shutdown: &CancellationToken,
    mut start: F,
) where
    F: FnMut(tokio::net::TcpStream, String) -> Fut,
    Fut: Future<Output = Result<(), NbdError>> + Send + 'static,
{
    let mut conns = Connections::new(opts);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    // Replies are small and latency-bound; never wait for Nagle.
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::warn!(%peer, "cannot set TCP_NODELAY: {e}");
                    }
                    let peer = peer.to_string();
                    let serve = start(stream, peer.clone());
                    conns.spawn(peer, serve);
                }
                Err(e) => accept_failed(e).await,
            },
            Some(done) = conns.set.join_next(), if !conns.set.is_empty() => finished(done),
        }
    }
    conns.drain().await;
}

async fn accept_failed(e: io::Error) {
    // Usually EMFILE or a connection aborted before accept; back off briefly so a
    // descriptor shortage does not spin.
    tracing::warn!("NBD accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

fn finished(r: Result<(), tokio::task::JoinError>) {
    if let Err(e) = r
        && e.is_panic()
    {
        tracing::error!("NBD connection task panicked: {e}");
    }
}

/// The connections of one listener.
struct Connections {
    set: JoinSet<()>,
    /// [`ServerOptions::shutdown_grace`].
    grace: Duration,
    /// [`ServerOptions::max_connections`].
    limit: ConnectionLimit,
}

static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

impl Connections {
    fn new(opts: &ServerOptions) -> Self {
        Connections {
            set: JoinSet::new(),
            grace: opts.shutdown_grace,
            limit: ConnectionLimit::new(opts.max_connections),
        }
    }

    /// Runs `serve` (one connection) in the set, in a span naming the peer; past
    /// [`ServerOptions::max_connections`] drops it instead, which closes the
    /// connection before the greeting.
    fn spawn<F>(&mut self, peer: String, serve: F)
    where
        F: Future<Output = Result<(), NbdError>> + Send + 'static,
    {
        let Some(slot) = self.limit.admit(&peer) else {
            return;
        };
        let id = NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("nbd", conn = id, peer = %peer);
        let open = self.limit.open();
        self.set.spawn(
            async move {
                let _slot = slot;
                tracing::debug!(open, "NBD connection accepted");
                match serve.await {
                    Ok(()) => tracing::debug!("NBD connection closed"),
                    Err(e) => tracing::warn!("NBD connection closed: {e}"),
                }
            }
            .instrument(span),
        );
    }

    async fn drain(mut self) {
        if self.set.is_empty() {
            return;
        }
        tracing::info!(
            open = self.set.len(),
            "NBD server stopping; waiting for connections"
        );
        let grace = self.grace;
        let wait = async {
            while let Some(done) = self.set.join_next().await {
                finished(done);
            }
        };
        if tokio::time::timeout(grace, wait).await.is_err() {
            tracing::warn!(
                open = self.set.len(),
                "NBD connections still open after {grace:?}; dropping them"
            );
            self.set.shutdown().await;
        }
    }
}

/// An export a client chose, with what the handshake tells the client about it.
struct Export {
    /// The name the client asked for.
    name: String,
    backend: Arc<dyn Backend>,
    size: u64,
    read_only: bool,
    flags: u16,
}

impl Export {
    fn new(name: &str, backend: Arc<dyn Backend>) -> Export {
        Export {
            name: name.to_string(),
            size: backend.size(),
            read_only: backend.read_only(),
            flags: transmission_flags(&*backend),
            backend,
        }
    }
}

fn transmission_flags(backend: &dyn Backend) -> u16 {
    let mut flags = proto::FLAG_HAS_FLAGS | proto::FLAG_SEND_FLUSH;
    if backend.read_only() {
        flags |= proto::FLAG_READ_ONLY;
    } else {
        flags |= proto::FLAG_SEND_FUA | proto::FLAG_SEND_TRIM | proto::FLAG_SEND_WRITE_ZEROES;
    }
    if backend.can_multi_conn() {
        flags |= proto::FLAG_CAN_MULTI_CONN;
    }
    flags
}

/// Where a connection stands with TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tls {
    /// Not offered: `NBD_OPT_STARTTLS` gets `NBD_REP_ERR_POLICY`.
    Off,
    /// Required and not started yet: only `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT`.
    Required,
    /// Started: a second `NBD_OPT_STARTTLS` gets `NBD_REP_ERR_INVALID`.
    Active,
}

/// Who is haggling, and where its exports come from.
struct Client {
    exports: Arc<dyn ExportResolver>,
    /// The client's TLS certificates, leaf first; empty without TLS.
    certs: Arc<Vec<CertificateDer<'static>>>,
    tls: Tls,
}

impl Client {
    fn plain(exports: Arc<dyn ExportResolver>) -> Client {
        Client {
            exports,
            certs: Arc::new(Vec::new()),
            tls: Tls::Off,
        }
    }

    /// Asks the resolver for export `name`, on a blocking thread.
    async fn resolve(&self, name: &str) -> Result<Export, Refusal> {
        let (exports, certs, asked) = (
            Arc::clone(&self.exports),
            Arc::clone(&self.certs),
            name.to_string(),
        );
        // A lookup may wait (a node's, for a running sync): not the client's time.
        let found = limits::server_work(tokio::task::spawn_blocking(move || {
            exports.resolve(&asked, &certs)
        }))
        .await;
        let backend = match found {
            Ok(Ok(backend)) => backend,
            Ok(Err(refusal)) => {
                tracing::info!(export = name, "NBD export refused: {refusal}");
                return Err(refusal);
            }
            Err(e) => {
                tracing::error!(export = name, "NBD export resolver failed: {e}");
                return Err(Refusal::Unknown("the export could not be looked up".into()));
            }
        };
        // size() and read_only() may touch the disk too.
        let name = name.to_string();
        limits::server_work(tokio::task::spawn_blocking(move || {
            Export::new(&name, backend)
        }))
        .await
        .map_err(|e| {
            tracing::error!("NBD export failed: {e}");
            Refusal::Unknown("the export could not be opened".into())
        })
    }

    /// The export names for `NBD_OPT_LIST`, from a blocking thread.
    async fn list(&self) -> Vec<String> {
        let (exports, certs) = (Arc::clone(&self.exports), Arc::clone(&self.certs));
        limits::server_work(tokio::task::spawn_blocking(move || exports.list(&certs)))
            .await
            .unwrap_or_else(|e| {
                tracing::error!("NBD export resolver failed to list exports: {e}");
                Vec::new()
            })
    }
}

/// What option haggling settled so far.
#[derive(Debug, Default)]
struct Negotiated {
    structured: bool,
    base_allocation: Option<u32>,
}

/// How option haggling ended.
enum Haggled {
    /// The client ended the session (`NBD_OPT_ABORT`, or closing between options)
    /// or the server is stopping.
    Ended,
    /// `NBD_OPT_STARTTLS` was acknowledged: the TLS handshake comes next.
    StartTls,
    /// An export was chosen: the transmission phase comes next.
    Ready(Ready),
}

/// An export chosen and the options negotiated for it.
struct Ready {
    export: Export,
    negotiated: Negotiated,
}

impl Ready {
    fn into_conn(self) -> Conn {
        let Ready { export, negotiated } = self;
        tracing::debug!(
            export = export.name,
            size = export.size,
            read_only = export.read_only,
            structured = negotiated.structured,
            base_allocation = negotiated.base_allocation.is_some(),
            "NBD handshake done"
        );
        Conn {
            backend: export.backend,
            size: export.size,
            read_only: export.read_only,
            structured: negotiated.structured,
            base_allocation: negotiated.base_allocation,
        }
    }
}

/// Sends the fixed newstyle greeting and reads the client's flags. `Some(no_zeroes)`
/// to go on, `None` when the client left or the server is stopping.
async fn greet<R, W>(
    rd: &mut BufReader<R>,
    wr: &mut W,
    shutdown: &CancellationToken,
) -> Result<Option<bool>, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut out = Vec::with_capacity(18);
    out.extend_from_slice(&proto::NBD_MAGIC.to_be_bytes());
    out.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    send(wr, &out).await?;

    let client_flags = tokio::select! {
        _ = shutdown.cancelled() => return Ok(None),
        r = rd.read_u32() => match r {
            Ok(f) => f,
            // Port probes and health checks connect and leave.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                tracing::debug!("client closed the connection after the greeting");
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        },
    };
    let known = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
    if client_flags & !known != 0 {
        return Err(NbdError::Protocol(format!(
            "client sent unknown client flags {client_flags:#x}"
        )));
    }
    Ok(Some(client_flags & proto::FLAG_C_NO_ZEROES != 0))
}

/// Option haggling, until an export is chosen, STARTTLS is acknowledged or the
/// session ends. Each call starts from nothing negotiated (after STARTTLS, nothing
/// said in the clear carries over).
async fn haggle<R, W>(
    rd: &mut BufReader<R>,
    wr: &mut W,
    client: &Client,
    no_zeroes: bool,
    shutdown: &CancellationToken,
) -> Result<Haggled, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut out = Vec::with_capacity(256);
    let mut st = Negotiated::default();
    let tls_required = client.tls == Tls::Required;

    for _ in 0..MAX_OPTIONS {
        let mut hdr = [0u8; 16];
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(Haggled::Ended),
            r = rd.read_exact(&mut hdr) => match r {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    tracing::debug!("client closed the connection during option haggling");
                    return Ok(Haggled::Ended);
                }
                Err(e) => return Err(e.into()),
            },
        }
        let magic = proto::be_u64(&hdr[0..8]);
        let option = proto::be_u32(&hdr[8..12]);
        let len = proto::be_u32(&hdr[12..16]);
        if magic != proto::IHAVEOPT {
            return Err(NbdError::Protocol(format!(
                "option magic is {magic:#018x}, expected IHAVEOPT"
            )));
        }
        if len > proto::MAX_OPTION_DATA {
            return Err(NbdError::Protocol(format!(
                "{} carries {len} bytes of data, more than the {} accepted",
                proto::option_name(option),
                proto::MAX_OPTION_DATA
            )));
        }
        let mut data = vec![0u8; len as usize];
        rd.read_exact(&mut data).await?;
        out.clear();

        match option {
            proto::OPT_ABORT => {
                proto::put_option_reply(&mut out, option, proto::REP_ACK, &[]);
                // The client may already have gone; that is fine.
                let _ = send(wr, &out).await;
                return Ok(Haggled::Ended);
            }
            proto::OPT_STARTTLS => {
                let (typ, msg) = match client.tls {
                    _ if len != 0 => (proto::REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data"),
                    Tls::Off => (proto::REP_ERR_POLICY, "TLS is not offered by this server"),
                    Tls::Active => (proto::REP_ERR_INVALID, "TLS is already active"),
                    Tls::Required => {
                        proto::put_option_reply(&mut out, option, proto::REP_ACK, &[]);
                        send(wr, &out).await?;
                        return Ok(Haggled::StartTls);
                    }
                };
                option_error(&mut out, option, typ, msg);
            }
            proto::OPT_EXPORT_NAME if tls_required => {
                // This option cannot carry an error; the protocol says to close.
                return Err(NbdError::Negotiation(format!(
                    "client asked for export {:?} with NBD_OPT_EXPORT_NAME without TLS, which \
                     this server requires",
                    String::from_utf8_lossy(&data)
                )));
            }
            _ if tls_required => {
                let msg = format!(
                    "TLS is required: send NBD_OPT_STARTTLS before {}",
                    proto::option_name(option)
                );
                option_error(&mut out, option, proto::REP_ERR_TLS_REQD, &msg);
            }
            proto::OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                let export = match client.resolve(&name).await {
                    Ok(e) => e,
                    // This option cannot carry an error; the protocol says to close.
                    Err(refusal) => {
                        return Err(NbdError::Negotiation(format!(
                            "NBD_OPT_EXPORT_NAME for {name:?} refused, {refusal}"
                        )));
                    }
                };
                out.extend_from_slice(&export.size.to_be_bytes());
                out.extend_from_slice(&export.flags.to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                send(wr, &out).await?;
                return Ok(Haggled::Ready(Ready {
                    export,
                    negotiated: st,
                }));
            }
            proto::OPT_LIST => {
                if len != 0 {
                    option_error(
                        &mut out,
                        option,
                        proto::REP_ERR_INVALID,
                        "NBD_OPT_LIST takes no data",
                    );
                } else {
                    for name in client.list().await {
                        let mut d = Vec::new();
                        proto::put_string32(&mut d, &name);
                        proto::put_option_reply(&mut out, option, proto::REP_SERVER, &d);
                    }
                    proto::put_option_reply(&mut out, option, proto::REP_ACK, &[]);
                }
            }
            proto::OPT_INFO | proto::OPT_GO => match proto::InfoRequest::decode(&data) {
                Err(e) => option_error(&mut out, option, proto::REP_ERR_INVALID, &e),
                Ok(req) => match client.resolve(&req.name).await {
                    Err(refusal) => {
                        option_error(&mut out, option, refusal.reply_type(), refusal.message());
                    }
                    Ok(export) => {
                        put_info(&mut out, option, &req, &export);
                        if option == proto::OPT_GO {
                            send(wr, &out).await?;
                            return Ok(Haggled::Ready(Ready {
                                export,
                                negotiated: st,
                            }));
                        }
                    }
                },
            },
            proto::OPT_STRUCTURED_REPLY => {
                if len != 0 {
                    option_error(
                        &mut out,
                        option,
                        proto::REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                } else {
                    st.structured = true;
                    proto::put_option_reply(&mut out, option, proto::REP_ACK, &[]);
                }
            }
            proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                match meta_context_request(option, &data, &st) {
                    Err((typ, msg)) => option_error(&mut out, option, typ, &msg),
                    Ok(req) => match client.resolve(&req.export).await {
                        Err(refusal) => {
                            option_error(&mut out, option, refusal.reply_type(), refusal.message());
                        }
                        Ok(_) => meta_context(&mut out, option, &req, &mut st),
                    },
                }
            }
            _ => {
                let msg = format!("{} ({option}) is not supported", proto::option_name(option));
                option_error(&mut out, option, proto::REP_ERR_UNSUP, &msg);
            }
        }
        send(wr, &out).await?;
    }
    Err(NbdError::Protocol(format!(
        "client sent more than {MAX_OPTIONS} options"
    )))
}

/// The `NBD_REP_INFO` replies and the final ACK of `NBD_OPT_INFO` / `NBD_OPT_GO`.
fn put_info(out: &mut Vec<u8>, option: u32, req: &proto::InfoRequest, export: &Export) {
    let mut d = Vec::with_capacity(16);
    d.extend_from_slice(&proto::INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&export.size.to_be_bytes());
    d.extend_from_slice(&export.flags.to_be_bytes());
    proto::put_option_reply(out, option, proto::REP_INFO, &d);
    // The name as asked; the default export (empty name) has no other to give.
    if req.requests.contains(&proto::INFO_NAME) && !export.name.is_empty() {
        let mut d = proto::INFO_NAME.to_be_bytes().to_vec();
        d.extend_from_slice(export.name.as_bytes());
        proto::put_option_reply(out, option, proto::REP_INFO, &d);
    }
    // Sent whether asked or not, as the protocol allows: any alignment works, 4 KiB
    // is best, 32 MiB is the most per request.
    let mut d = proto::INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&proto::PREFERRED_BLOCK.to_be_bytes());
    d.extend_from_slice(&proto::MAX_PAYLOAD.to_be_bytes());
    proto::put_option_reply(out, option, proto::REP_INFO, &d);
    proto::put_option_reply(out, option, proto::REP_ACK, &[]);
}

/// Checks and decodes `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`;
/// `Err` is the error reply to send.
fn meta_context_request(
    option: u32,
    data: &[u8],
    st: &Negotiated,
) -> Result<proto::MetaContextRequest, (u32, String)> {
    if !st.structured {
        return Err((
            proto::REP_ERR_INVALID,
            format!(
                "{}: structured replies must be negotiated first",
                proto::option_name(option)
            ),
        ));
    }
    proto::MetaContextRequest::decode(data).map_err(|e| (proto::REP_ERR_INVALID, e))
}

/// Answers `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` for an export
/// that exists. The only context is `base:allocation`.
fn meta_context(
    out: &mut Vec<u8>,
    option: u32,
    req: &proto::MetaContextRequest,
    st: &mut Negotiated,
) {
    let list = option == proto::OPT_LIST_META_CONTEXT;
    let selected = if list {
        // Listing: no query means everything; "base:" means the whole namespace.
        req.queries.is_empty()
            || req
                .queries
                .iter()
                .any(|q| q == proto::CONTEXT_BASE_ALLOCATION || q == "base:")
    } else {
        req.queries
            .iter()
            .any(|q| q == proto::CONTEXT_BASE_ALLOCATION)
    };
    if !list {
        // Each SET replaces the previous selection.
        st.base_allocation = selected.then_some(BASE_ALLOCATION_ID);
    }
    if selected {
        let id = if list { 0 } else { BASE_ALLOCATION_ID };
        let mut d = id.to_be_bytes().to_vec();
        d.extend_from_slice(proto::CONTEXT_BASE_ALLOCATION.as_bytes());
        proto::put_option_reply(out, option, proto::REP_META_CONTEXT, &d);
    }
    proto::put_option_reply(out, option, proto::REP_ACK, &[]);
}

fn option_error(out: &mut Vec<u8>, option: u32, typ: u32, message: &str) {
    tracing::debug!(
        "refusing {}: {} {message}",
        proto::option_name(option),
        proto::reply_type_name(typ)
    );
    let msg = proto::truncate_str(message, proto::MAX_STRING);
    proto::put_option_reply(out, option, typ, msg.as_bytes());
}

async fn send<W: AsyncWrite + Unpin>(wr: &mut W, bytes: &[u8]) -> io::Result<()> {
    wr.write_all(bytes).await?;
    wr.flush().await
}

/// The handshake of one connection without TLS, up to what its transmission phase
/// needs; `None` when the session ended during it.
async fn handshake<R, W>(
    rd: &mut BufReader<R>,
    wr: &mut W,
    client: &Client,
    shutdown: &CancellationToken,
) -> Result<Option<Conn>, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Some(no_zeroes) = greet(rd, wr, shutdown).await? else {
        return Ok(None);
    };
    match haggle(rd, wr, client, no_zeroes, shutdown).await? {
        Haggled::Ended => Ok(None),
        Haggled::Ready(ready) => Ok(Some(ready.into_conn())),
        Haggled::StartTls => Err(NbdError::Negotiation(
            "STARTTLS acknowledged on a server without TLS".into(),
        )),
    }
}

/// What the transmission phase of one connection shares with the threads that run
/// its requests.
struct Conn {
    backend: Arc<dyn Backend>,
    size: u64,
    read_only: bool,
    /// Structured replies were negotiated.
    structured: bool,
    base_allocation: Option<u32>,
}

/// One reply on its way to the writer. Dropping it returns its buffer to the pool
/// and its budget to the semaphore.
struct Reply {
    cookie: u64,
    body: ReplyBody,
    _permit: OwnedSemaphorePermit,
}

enum ReplyBody {
    /// Success without data.
    Done,
    /// Read data for `offset`.
    Data {
        offset: u64,
        buf: PooledBuf,
    },
    Error {
        errno: Errno,
        message: String,
    },
    BlockStatus {
        context: u32,
        extents: Vec<(u32, u32)>,
    },
}

/// A request read off the wire with its payload and its share of the budget:
/// everything an I/O thread needs to answer it.
struct Incoming {
    req: Request,
    /// A write's payload.
    data: Option<Payload>,
    /// The error reply of a well-framed but invalid request.
    checked: Result<(), (Errno, String)>,
    permit: OwnedSemaphorePermit,
}

/// A write's payload, as it was read.
enum Payload {
    Buffered(PooledBuf),
    /// Still in pipes: see [`super::splice`].
    Spliced(Spliced),
}

/// Bytes one connection may have in flight: the option, raised to at least one
/// maximum-size request.
fn budget_bytes(opts: &ServerOptions) -> u32 {
    let bytes = opts.max_in_flight_bytes.clamp(
        proto::MAX_PAYLOAD as usize + REQUEST_OVERHEAD,
        u32::MAX as usize,
    );
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

/// Decodes a request header: the request and the budget it takes, `None` for
/// `NBD_CMD_DISC`, an error for a violation that leaves the stream out of sync.
fn admit(hdr: &[u8; Request::LEN], budget_bytes: u32) -> Result<Option<(Request, u32)>, NbdError> {
    let req = Request::decode(hdr).map_err(NbdError::Protocol)?;
    if req.typ == proto::CMD_DISC {
        tracing::debug!("client sent NBD_CMD_DISC");
        return Ok(None);
    }
    if req.typ == proto::CMD_WRITE && req.len > proto::MAX_PAYLOAD {
        // Reading it would mean buffering up to 4 GiB from a client that already
        // ignored the advertised maximum.
        return Err(NbdError::Protocol(format!(
            "WRITE of {} bytes exceeds the maximum payload of {} bytes",
            req.len,
            proto::MAX_PAYLOAD
        )));
    }
    let payload = match req.typ {
        proto::CMD_WRITE => req.len,
        proto::CMD_READ => req.len.min(proto::MAX_PAYLOAD),
        _ => 0,
    };
    let cost = (payload + REQUEST_OVERHEAD as u32).min(budget_bytes);
    Ok(Some((req, cost)))
}

/// [`check`], logging a refusal.
fn vet(req: &Request, conn: &Conn) -> Result<(), (Errno, String)> {
    let checked = check(req, conn);
    if let Err((errno, message)) = &checked {
        tracing::debug!(
            cookie = req.cookie,
            "refusing {} at {}+{}: {errno}: {message}",
            proto::command_name(req.typ),
            req.offset,
            req.len
        );
    }
    checked
}

/// Runs one request on an I/O thread and returns its reply. A panicking backend
/// costs the client an `EIO`, not the connection.
fn answer(conn: &Conn, pool: &Arc<BufferPool>, incoming: Incoming) -> Reply {
    let Incoming {
        req,
        data,
        checked,
        permit,
    } = incoming;
    let body = match checked {
        Err((errno, message)) => ReplyBody::Error { errno, message },
        Ok(()) => {
            match std::panic::catch_unwind(AssertUnwindSafe(|| execute(conn, &req, data, pool))) {
                Ok(body) => body,
                Err(_) => {
                    tracing::error!("backend panicked on {}", proto::command_name(req.typ));
                    ReplyBody::Error {
                        errno: Errno::EIO,
                        message: "internal server error".into(),
                    }
                }
            }
        }
    };
    Reply {
        cookie: req.cookie,
        body,
        _permit: permit,
    }
}

/// The end of a connection whose requests were read without error, given how its
/// replies went: a client that hung up before reading them all is not an error.
fn replies_outcome(written: Option<io::Error>) -> Result<(), NbdError> {
    match written {
        None => Ok(()),
        Some(e) if is_disconnect(&e) => {
            tracing::debug!("client went away before all replies were sent: {e}");
            Ok(())
        }
        Some(e) => Err(e.into()),
    }
}

/// The client closed or reset the connection: a normal way for a session to end.
fn client_gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::UnexpectedEof || is_disconnect(e)
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
    )
}

// ---- What both paths share: the session, its I/O threads ----

/// What the transmission phase of one connection shares with its I/O threads.
struct Session<S> {
    conn: Arc<Conn>,
    pool: Arc<BufferPool>,
    /// Pipes for spliced write payloads (plain sockets only).
    pipes: Arc<PipePool>,
    replies: Replies<S>,
    /// Every request in flight holds its cost until its reply is written (or
    /// dropped because the socket failed).
    budget: Arc<Semaphore>,
    budget_bytes: u32,
    /// Threads for everything but plain writes.
    workers: Workers,
    /// Threads for writes without FUA, at most [`WRITE_THREADS`]. They only copy
    /// into the page cache, one file's writes are serialised on its inode lock,
    /// and requests are read one at a time: more threads would only spin on the
    /// lock and take CPU time from the reading.
    writes: Workers,
}

impl<S: ReplySink + 'static> Session<S> {
    /// Call from within the runtime.
    fn new(conn: Arc<Conn>, sink: S, opts: &ServerOptions, max_threads: usize) -> Arc<Self> {
        let budget_bytes = budget_bytes(opts);
        Arc::new(Session {
            replies: Replies::new(sink, conn.structured),
            conn,
            pool: Arc::new(BufferPool::default()),
            pipes: Arc::default(),
            budget: Arc::new(Semaphore::new(budget_bytes as usize)),
            budget_bytes,
            workers: Workers::new(max_threads),
            writes: Workers::new(WRITE_THREADS.min(max_threads)),
        })
    }

    /// Hands a request to an I/O thread, which runs it and sends its reply. Only
    /// the one reading requests calls this.
    fn dispatch(self: &Arc<Self>, incoming: Incoming) {
        let req = &incoming.req;
        let workers = if req.typ == proto::CMD_WRITE && req.flags & proto::CMD_FLAG_FUA == 0 {
            &self.writes
        } else {
            &self.workers
        };
        let session = Arc::clone(self);
        let span = tracing::Span::current();
        workers.run(Box::new(move || {
            let _span = span.enter();
            let reply = answer(&session.conn, &session.pool, incoming);
            session.replies.submit(reply, None);
        }));
    }

    /// Waits until every request read so far has been answered: holding the whole
    /// budget means none is in flight.
    async fn answered(&self) {
        let _all = self.budget.acquire_many(self.budget_bytes).await;
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// The threads that run one connection's requests, started as needed up to a
/// limit. Idle threads take turns waiting on the job queue, so a request goes to a
/// thread that is already waiting, and a thread that finishes one request picks up
/// the next queued one without sleeping in between. This costs about half the
/// context switches per request of tokio's shared blocking pool.
struct Workers {
    tx: std::sync::mpsc::Sender<Job>,
    rx: Arc<Mutex<std::sync::mpsc::Receiver<Job>>>,
    counts: Arc<WorkerCounts>,
    /// Threads started; only the one reading requests changes it.
    spawned: AtomicUsize,
    max: usize,
    /// For a job that finds no thread of our own.
    runtime: tokio::runtime::Handle,
}

#[derive(Default)]
struct WorkerCounts {
    /// Threads waiting for a job (or about to).
    idle: AtomicUsize,
    /// Jobs sent and not yet taken.
    queued: AtomicUsize,
}

impl Workers {
    /// Call from within the runtime.
    fn new(max: usize) -> Workers {
        let (tx, rx) = std::sync::mpsc::channel();
        Workers {
            tx,
            rx: Arc::new(Mutex::new(rx)),
            counts: Arc::default(),
            spawned: AtomicUsize::new(0),
            max: max.max(1),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Queues a job, starting another thread when the jobs already waiting would
    /// leave no idle thread for it and the limit allows. The counts are read
    /// racily; at worst a thread starts a little early or late.
    fn run(&self, job: Job) {
        let spawned = self.spawned.load(Ordering::Relaxed);
        let busy =
            self.counts.queued.load(Ordering::Acquire) >= self.counts.idle.load(Ordering::Acquire);
        if busy && spawned < self.max {
            let (rx, counts) = (Arc::clone(&self.rx), Arc::clone(&self.counts));
            match std::thread::Builder::new()
                .name("nbd-io".into())
                .spawn(move || worker(&rx, &counts))
            {
                Ok(_) => self.spawned.store(spawned + 1, Ordering::Relaxed),
                Err(e) if spawned == 0 => {
                    // No thread of our own: borrow one from tokio's pool.
                    tracing::warn!("cannot start an NBD I/O thread: {e}");
                    self.runtime.spawn_blocking(job);
                    return;
                }
                Err(e) => tracing::debug!("cannot start another NBD I/O thread: {e}"),
            }
        }
        self.counts.queued.fetch_add(1, Ordering::AcqRel);
        // Cannot fail: the receiver lives as long as `self`.
        let _ = self.tx.send(job);
    }
}

/// One I/O thread: runs jobs until the connection drops its sender.
fn worker(rx: &Mutex<std::sync::mpsc::Receiver<Job>>, counts: &WorkerCounts) {
    loop {
        counts.idle.fetch_add(1, Ordering::AcqRel);
        let job = lock(rx).recv();
        counts.idle.fetch_sub(1, Ordering::AcqRel);
        match job {
            Ok(job) => {
                counts.queued.fetch_sub(1, Ordering::AcqRel);
                job();
            }
            Err(_) => return,
        }
    }
}

// ---- The transmission phase on tokio, for any stream ----

async fn transmit<R, W>(
    mut rd: BufReader<R>,
    wr: W,
    conn: Arc<Conn>,
    opts: &ServerOptions,
    shutdown: CancellationToken,
) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let closing = CancellationToken::new();
    // If this future is dropped (the listener gave up waiting at shutdown), threads
    // blocked writing replies to a client that stopped reading give up too.
    let _closing_guard = closing.clone().drop_guard();
    let sink = AsyncSink {
        wr,
        handle: tokio::runtime::Handle::current(),
        closing: closing.clone(),
    };
    let session = Session::new(conn, sink, opts, opts.threads_per_connection);
    let read = read_requests(&session, &mut rd, &shutdown).await;
    if read.is_err() {
        // A hard disconnect: replies not yet written are dropped, not waited for
        // (the client may have stopped reading).
        closing.cancel();
    }
    session.answered().await;
    let (sink, mut written) = session.replies.finish();
    if let (None, Some(mut sink)) = (&written, sink) {
        written = sink.wr.shutdown().await.err();
    }
    read?;
    replies_outcome(written)
}

/// Reads requests until `NBD_CMD_DISC`, end of stream, shutdown or a protocol
/// violation, handing each to an I/O thread.
async fn read_requests<R, W>(
    session: &Arc<Session<AsyncSink<W>>>,
    rd: &mut BufReader<R>,
    shutdown: &CancellationToken,
) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    let mut hdr = [0u8; Request::LEN];
    loop {
        if session.replies.failed() {
            // Replies can no longer be sent; reading more requests is pointless.
            return Ok(());
        }
        tokio::select! {
            biased;
            _ = &mut cancelled => {
                tracing::debug!("server stopping: no further requests read on this connection");
                return Ok(());
            }
            r = rd.read_exact(&mut hdr) => match r {
                Ok(_) => {}
                Err(e) if client_gone(&e) => {
                    tracing::debug!("client went away without NBD_CMD_DISC: {e}");
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            },
        }
        let Some((req, cost)) = admit(&hdr, session.budget_bytes)? else {
            return Ok(());
        };
        let permit = Arc::clone(&session.budget)
            .acquire_many_owned(cost)
            .await
            .map_err(|_| NbdError::Protocol("request budget closed".into()))?;
        let data = if req.typ == proto::CMD_WRITE {
            let mut buf = session.pool.get(req.len as usize);
            match rd.read_exact(&mut buf).await {
                Ok(_) => Some(Payload::Buffered(buf)),
                Err(e) if client_gone(&e) => {
                    tracing::debug!("client went away in the middle of a WRITE: {e}");
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
        } else {
            None
        };
        session.dispatch(Incoming {
            checked: vet(&req, &session.conn),
            req,
            data,
            permit,
        });
    }
}

/// Replies to an async stream, written from the I/O threads through the runtime.
struct AsyncSink<W> {
    wr: W,
    handle: tokio::runtime::Handle,
    /// Cancelled when the connection is torn down: a write blocked on a client that
    /// does not read gives up.
    closing: CancellationToken,
}

impl<W: AsyncWrite + Unpin + Send> ReplySink for AsyncSink<W> {
    fn write_all_vectored(
        &mut self,
        bufs: &mut [IoSlice<'_>],
        _on_block: &mut Option<&mut dyn FnMut()>,
    ) -> io::Result<()> {
        let AsyncSink {
            wr,
            handle,
            closing,
        } = self;
        handle.block_on(async {
            tokio::select! {
                r = write_all_vectored(wr, bufs) => r,
                _ = closing.cancelled() => Err(io::Error::other("connection closed")),
            }
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        let AsyncSink {
            wr,
            handle,
            closing,
        } = self;
        handle.block_on(async {
            tokio::select! {
                r = wr.flush() => r,
                _ = closing.cancelled() => Err(io::Error::other("connection closed")),
            }
        })
    }
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(
    wr: &mut W,
    mut bufs: &mut [IoSlice<'_>],
) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = wr.write_vectored(bufs).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

// ---- The transmission phase on blocking threads, for plain sockets ----

/// A stream that can leave tokio for blocking threads after the handshake: the
/// plain sockets that [`serve_unix`] and [`serve_tcp`] accept.
trait PlainStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The same socket, deregistered from tokio and in blocking mode.
    fn into_blocking(self) -> io::Result<PlainSocket>;
}

impl PlainStream for tokio::net::UnixStream {
    fn into_blocking(self) -> io::Result<PlainSocket> {
        let s = self.into_std()?;
        s.set_nonblocking(false)?;
        Ok(PlainSocket::Unix(s))
    }
}

impl PlainStream for tokio::net::TcpStream {
    fn into_blocking(self) -> io::Result<PlainSocket> {
        let s = self.into_std()?;
        s.set_nonblocking(false)?;
        Ok(PlainSocket::Tcp(s))
    }
}

/// A connected socket in blocking mode, used from several threads at once: one
/// reads, one writes, any of them may shut it down.
#[derive(Debug)]
enum PlainSocket {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

impl PlainSocket {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            PlainSocket::Unix(s) => Read::read(&mut &*s, buf),
            PlainSocket::Tcp(s) => Read::read(&mut &*s, buf),
        }
    }

    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            PlainSocket::Unix(s) => s.as_fd(),
            PlainSocket::Tcp(s) => s.as_fd(),
        }
    }

    /// Shuts down one or both directions. This wakes a thread blocked in `recv`
    /// (which then sees end of stream) or `send` (which fails).
    fn shutdown(&self, how: Shutdown) {
        let r = match self {
            PlainSocket::Unix(s) => s.shutdown(how),
            PlainSocket::Tcp(s) => s.shutdown(how),
        };
        // ENOTCONN once the peer has reset the connection: nothing left to do.
        if let Err(e) = r
            && e.kind() != io::ErrorKind::NotConnected
        {
            tracing::debug!("shutdown({how:?}) of the NBD socket failed: {e}");
        }
    }
}

/// The read side of a [`PlainSocket`].
struct SocketReader(Arc<PlainSocket>);

impl Read for SocketReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

/// The write side of a [`PlainSocket`].
struct SocketSink(Arc<PlainSocket>);

impl ReplySink for SocketSink {
    fn write_all_vectored(
        &mut self,
        mut bufs: &mut [IoSlice<'_>],
        on_block: &mut Option<&mut dyn FnMut()>,
    ) -> io::Result<()> {
        IoSlice::advance_slices(&mut bufs, 0);
        while !bufs.is_empty() {
            let nonblocking = on_block.is_some();
            match sys::send_vectored(self.0.as_fd(), bufs, nonblocking) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && nonblocking => {
                    if let Some(f) = on_block.take() {
                        f();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The transmission phase of a plain socket, entirely on blocking threads: one
/// reads requests (see [`Reader`]) and the session's I/O threads run them, with no
/// event loop in between. This task only waits for the reading to end and the
/// requests read to be answered. At shutdown it shuts the socket down for reading,
/// which wakes the reader blocked in `recv`; requests already read are answered
/// before the connection closes.
async fn transmit_blocking(
    sock: PlainSocket,
    early: Vec<u8>,
    conn: Arc<Conn>,
    opts: &ServerOptions,
    shutdown: CancellationToken,
) -> Result<(), NbdError> {
    let sock = Arc::new(sock);
    let stop = CancellationToken::new();
    // If this future is dropped (the listener gave up waiting at shutdown), the
    // reader stops, and threads blocked on a client that stopped reading give up.
    let _teardown = Teardown {
        sock: Arc::clone(&sock),
        stop: stop.clone(),
    };
    let (ended, mut read_ended) = tokio::sync::oneshot::channel();
    let rd = Read::chain(io::Cursor::new(early), SocketReader(Arc::clone(&sock)));
    let splice = conn.backend.takes_spliced();
    let reader = Arc::new(Reader {
        // One thread more than the option: the reader's.
        session: Session::new(
            conn,
            SocketSink(Arc::clone(&sock)),
            opts,
            opts.threads_per_connection.saturating_add(1),
        ),
        side: Mutex::new(ReadSide {
            rd: std::io::BufReader::with_capacity(READ_BUFFER, rd),
            after_large_write: false,
            splice,
            inline: Inline::new(),
            ended: Some(ended),
        }),
        sock: Arc::clone(&sock),
        stop: stop.clone(),
        span: tracing::Span::current(),
    });
    reader.start();
    let read = tokio::select! {
        r = &mut read_ended => r,
        _ = shutdown.cancelled() => {
            tracing::debug!("server stopping: no further requests read on this connection");
            stop.cancel();
            sock.shutdown(Shutdown::Read);
            read_ended.await
        }
    };
    let read = read.unwrap_or_else(|_| Err(io::Error::other("the NBD request reader died").into()));
    reader.session.answered().await;
    let (_, written) = reader.session.replies.finish();
    sock.shutdown(Shutdown::Write);
    read?;
    replies_outcome(written)
}

/// Stops a blocking connection when its task ends, however it ends: the reader
/// stops, and shutting the socket down wakes a thread blocked reading or writing.
struct Teardown {
    sock: Arc<PlainSocket>,
    stop: CancellationToken,
}

impl Drop for Teardown {
    fn drop(&mut self) {
        self.stop.cancel();
        self.sock.shutdown(Shutdown::Both);
    }
}

/// The reading side of a blocking connection. One thread at a time reads: it runs
/// small reads and writes itself (see [`Inline`]) and hands everything else to the
/// session's I/O threads. When it cannot send a reply without blocking (the client is not
/// reading), reading moves to another I/O thread: how far a client may run ahead
/// of its replies is left to the budget.
struct Reader {
    session: Arc<Session<SocketSink>>,
    /// Held by the thread reading.
    side: Mutex<ReadSide>,
    sock: Arc<PlainSocket>,
    /// Reading stops: the server is stopping or the connection is torn down.
    stop: CancellationToken,
    span: tracing::Span,
}

/// The blocking reader's buffered socket.
type SocketBufReader = std::io::BufReader<io::Chain<io::Cursor<Vec<u8>>, SocketReader>>;

struct ReadSide {
    rd: SocketBufReader,
    /// The last request read was a large write (see [`LARGE_PAYLOAD`]): the next
    /// header is read on its own rather than with a greedy fill of the buffer.
    after_large_write: bool,
    /// Large write payloads are spliced into pipes (see [`super::splice`]): the
    /// backend takes them, and the socket has not refused.
    splice: bool,
    inline: Inline,
    /// Where the end of reading is reported; `None` once it has been.
    ended: Option<tokio::sync::oneshot::Sender<Result<(), NbdError>>>,
}

impl ReadSide {
    fn end(&mut self, result: Result<(), NbdError>) {
        if let Some(ended) = self.ended.take() {
            let _ = ended.send(result);
        }
    }
}

impl Reader {
    /// Reading continues on one of the session's I/O threads.
    fn start(self: &Arc<Self>) {
        let reader = Arc::clone(self);
        self.session.workers.run(Box::new(move || reader.run()));
    }

    fn run(self: &Arc<Self>) {
        let _span = self.span.enter();
        let side = lock(&self.side);
        if side.ended.is_none() {
            return;
        }
        let mut reading = true;
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| self.read_loop(side, &mut reading)));
        if r.is_err() && reading {
            tracing::error!("NBD request reader panicked");
            self.sock.shutdown(Shutdown::Both);
            lock(&self.side).end(Err(
                io::Error::other("the NBD request reader panicked").into()
            ));
        }
    }

    /// Reads requests until reading ends, or until this thread has to wait to
    /// write a reply (`reading` becomes false) and reading moves to another thread.
    fn read_loop(
        self: &Arc<Self>,
        mut side: std::sync::MutexGuard<'_, ReadSide>,
        reading: &mut bool,
    ) {
        loop {
            let incoming = match self.read_request(&mut side) {
                Ok(Some(incoming)) => incoming,
                Ok(None) => return side.end(Ok(())),
                Err(e) => {
                    // The stream is out of sync or broken: close the connection now.
                    // Replies not yet written are dropped (the client may have
                    // stopped reading).
                    self.sock.shutdown(Shutdown::Both);
                    return side.end(Err(e));
                }
            };
            if !side.inline.wants(&incoming.req, incoming.checked.is_err()) {
                self.session.dispatch(incoming);
                continue;
            }
            let req = incoming.req;
            let started = Instant::now();
            let reply = answer(&self.session.conn, &self.session.pool, incoming);
            side.inline.ran(&req, started.elapsed());
            let mut turn = Some(side);
            let mut hand_over = || {
                if let Some(side) = turn.take() {
                    self.start();
                    drop(side);
                }
            };
            self.session.replies.submit(reply, Some(&mut hand_over));
            match turn {
                Some(kept) => side = kept,
                None => {
                    *reading = false;
                    return;
                }
            }
        }
    }

    /// Reads one request; `None` at the end of the session.
    ///
    /// Large write payloads bypass the buffer: a buffered header read fills the
    /// buffer greedily, so after a 1 MiB write's header it would hold the first
    /// [`READ_BUFFER`] bytes of the payload and copy them a second time. So after a
    /// large write, the next header is read on its own when nothing is buffered
    /// (one small `recv`). A large payload takes what is buffered and, when the
    /// backend takes pipes, splices the rest into pipes; otherwise it reads the rest
    /// straight into its own buffer. Small requests keep the greedy fill, which
    /// reads many of them with one `recv`.
    fn read_request(&self, side: &mut ReadSide) -> Result<Option<Incoming>, NbdError> {
        let ReadSide {
            rd,
            after_large_write,
            splice,
            ..
        } = side;
        if self.stop.is_cancelled() || self.session.replies.failed() {
            // Stopping, or replies can no longer be sent.
            return Ok(None);
        }
        let mut hdr = [0u8; Request::LEN];
        let header = if *after_large_write && rd.buffer().is_empty() {
            rd.get_mut().read_exact(&mut hdr)
        } else {
            rd.read_exact(&mut hdr)
        };
        if let Err(e) = header {
            return self.read_failed(e, "without NBD_CMD_DISC");
        }
        let Some((req, cost)) = admit(&hdr, self.session.budget_bytes)? else {
            return Ok(None);
        };
        let budget = &self.session.budget;
        let permit = match Arc::clone(budget).try_acquire_many_owned(cost) {
            Ok(permit) => permit,
            Err(_) => {
                // Over budget: wait for replies to go out, or for the server to stop.
                let wait = async {
                    tokio::select! {
                        biased;
                        _ = self.stop.cancelled() => None,
                        permit = Arc::clone(budget).acquire_many_owned(cost) => permit.ok(),
                    }
                };
                match futures::executor::block_on(wait) {
                    Some(permit) => permit,
                    None => return Ok(None),
                }
            }
        };
        let data = if req.typ == proto::CMD_WRITE {
            let len = req.len as usize;
            let large = len >= LARGE_PAYLOAD;
            match self.read_payload(rd, splice, len, large) {
                Ok(payload) => {
                    *after_large_write = large;
                    Some(payload)
                }
                Err(e) => return self.read_failed(e, "in the middle of a WRITE"),
            }
        } else {
            *after_large_write = false;
            None
        };
        Ok(Some(Incoming {
            checked: vet(&req, &self.session.conn),
            req,
            data,
            permit,
        }))
    }

    /// Reads a write's payload of `len` bytes (see [`Reader::read_request`]); a
    /// socket that refuses to splice turns `splice` off.
    fn read_payload(
        &self,
        rd: &mut SocketBufReader,
        splice: &mut bool,
        len: usize,
        large: bool,
    ) -> io::Result<Payload> {
        let buffered = rd.buffer().len();
        if large && *splice && buffered < len && early_consumed(rd) {
            let head = &rd.buffer()[..buffered];
            match splice::receive(self.sock.as_fd(), head, len, &self.session.pipes) {
                Ok(piped) => {
                    rd.consume(buffered);
                    return Ok(Payload::Spliced(piped));
                }
                Err(NotSpliced::Failed(e)) => return Err(e),
                Err(NotSpliced::Unavailable(e)) => {
                    tracing::debug!(
                        "write payloads are read, not spliced, on this connection: {e}"
                    );
                    *splice = false;
                }
            }
        }
        let mut buf = self.session.pool.get(len);
        if large {
            read_past_buffer(rd, &mut buf)?;
        } else {
            rd.read_exact(&mut buf)?;
        }
        Ok(Payload::Buffered(buf))
    }

    fn read_failed(&self, e: io::Error, when: &str) -> Result<Option<Incoming>, NbdError> {
        if self.stop.is_cancelled() {
            // Our own shutdown(SHUT_RD).
            Ok(None)
        } else if client_gone(&e) {
            tracing::debug!("client went away {when}: {e}");
            Ok(None)
        } else {
            Err(e.into())
        }
    }
}

/// Whether the bytes left over from the handshake have all gone into the buffer,
/// so that the buffer and then the socket hold what comes next.
fn early_consumed(rd: &SocketBufReader) -> bool {
    let (early, _) = rd.get_ref().get_ref();
    early.position() >= early.get_ref().len() as u64
}

/// Fills `buf` from what `rd` has buffered, then straight from the stream under
/// it, so that no byte is copied through the buffer.
fn read_past_buffer(rd: &mut SocketBufReader, buf: &mut [u8]) -> io::Result<()> {
    let buffered = rd.buffer();
    let n = buffered.len().min(buf.len());
    buf[..n].copy_from_slice(&buffered[..n]);
    rd.consume(n);
    rd.get_mut().read_exact(&mut buf[n..])
}

/// Which requests the reader runs itself instead of handing them to another
/// thread: small reads and small writes without FUA, which the page cache usually
/// answers in a few microseconds. A hand-off costs a thread wake-up per request,
/// more than such a request itself; and buffered writes to one file do not run in
/// parallel anyway (the file system serialises them on the inode lock).
///
/// A request that still takes long (a read from the disk, a throttled write) held
/// up the requests behind it; after one, requests of its kind are handed off, for
/// a stretch that doubles with every slow one found at its end. A disk-bound
/// workload so keeps its parallelism, and pays for one probe in a thousand.
#[derive(Debug)]
struct Inline {
    reads: Probe,
    writes: Probe,
}

/// Whether requests of one kind are currently run inline.
#[derive(Debug)]
struct Probe {
    /// Requests still to hand off before one is tried inline again.
    skip: u32,
    /// What `skip` becomes after the next slow inline request.
    backoff: u32,
}

impl Inline {
    /// Largest request run inline.
    const MAX_LEN: u32 = 64 * 1024;
    /// An inline request that took longer than this probably waited for the disk.
    const SLOW: Duration = Duration::from_micros(50);
    const BACKOFF_MIN: u32 = 16;
    const BACKOFF_MAX: u32 = 1024;

    fn new() -> Inline {
        let probe = || Probe {
            skip: 0,
            backoff: Inline::BACKOFF_MIN,
        };
        Inline {
            reads: probe(),
            writes: probe(),
        }
    }

    fn probe(&mut self, req: &Request) -> Option<&mut Probe> {
        if req.len > Inline::MAX_LEN {
            return None;
        }
        match req.typ {
            proto::CMD_READ => Some(&mut self.reads),
            proto::CMD_WRITE if req.flags & proto::CMD_FLAG_FUA == 0 => Some(&mut self.writes),
            _ => None,
        }
    }

    /// Whether to run this request inline; `refused` when it gets an error reply
    /// without touching the backend.
    fn wants(&mut self, req: &Request, refused: bool) -> bool {
        if refused {
            return true;
        }
        match self.probe(req) {
            Some(p) if p.skip > 0 => {
                p.skip -= 1;
                false
            }
            Some(_) => true,
            None => false,
        }
    }

    /// Records how long a request run inline took.
    fn ran(&mut self, req: &Request, elapsed: Duration) {
        let Some(p) = self.probe(req) else {
            return;
        };
        if elapsed > Inline::SLOW {
            p.skip = p.backoff;
            p.backoff = (p.backoff * 2).min(Inline::BACKOFF_MAX);
        } else {
            p.backoff = Inline::BACKOFF_MIN;
        }
    }
}

// ---- Replies, for both paths ----

/// Where a connection's replies go; written from the I/O threads, which block.
trait ReplySink: Send {
    /// Writes all of `bufs`. A sink that can tell calls `on_block` (and clears it)
    /// before it first blocks.
    fn write_all_vectored(
        &mut self,
        bufs: &mut [IoSlice<'_>],
        on_block: &mut Option<&mut dyn FnMut()>,
    ) -> io::Result<()>;
    fn flush(&mut self) -> io::Result<()>;
}

/// The reply side of a connection. A thread with a reply queues it, and the first
/// one to find nobody writing becomes the writer and sends everything queued until
/// the queue is empty (flat combining): replies batch up under load, and no thread
/// waits for another's write or hands its reply to yet another thread.
struct Replies<S> {
    queue: Mutex<Vec<Reply>>,
    sink: Mutex<Sink<S>>,
    failed: AtomicBool,
    structured: bool,
}

struct Sink<S> {
    /// `None` once the connection is finished.
    wr: Option<S>,
    /// Encoded replies waiting to be written together.
    out: Vec<u8>,
    /// The replies being written (swapped with the queue, so neither reallocates).
    batch: Vec<Reply>,
    /// The first write error; later replies are dropped.
    error: Option<io::Error>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<S: ReplySink> Replies<S> {
    fn new(wr: S, structured: bool) -> Self {
        Replies {
            queue: Mutex::new(Vec::new()),
            sink: Mutex::new(Sink {
                wr: Some(wr),
                out: Vec::with_capacity(WRITE_BATCH + INLINE_PAYLOAD + 64),
                batch: Vec::new(),
                error: None,
            }),
            failed: AtomicBool::new(false),
            structured,
        }
    }

    fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Queues a reply and writes whatever is queued unless another thread already
    /// is. Blocks on the socket: call it from a blocking thread. With `on_block`,
    /// writes to a plain socket do not block at first: `on_block` is called before
    /// the first write that would.
    fn submit(&self, reply: Reply, mut on_block: Option<&mut dyn FnMut()>) {
        lock(&self.queue).push(reply);
        loop {
            let mut sink = match self.sink.try_lock() {
                Ok(sink) => sink,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                // The writer drains the queue before it lets go, or checks again
                // after letting go (below), so our reply is not stranded.
                Err(std::sync::TryLockError::WouldBlock) => return,
            };
            loop {
                std::mem::swap(&mut *lock(&self.queue), &mut sink.batch);
                if sink.batch.is_empty() {
                    break;
                }
                let Sink {
                    wr,
                    out,
                    batch,
                    error,
                } = &mut *sink;
                if let (None, Some(wr)) = (&*error, wr.as_mut())
                    && let Err(e) = write_batch(wr, out, batch, self.structured, &mut on_block)
                {
                    *error = Some(e);
                    self.failed.store(true, Ordering::Relaxed);
                }
                // Dropping the replies returns their buffers and budget.
                batch.clear();
            }
            drop(sink);
            if lock(&self.queue).is_empty() {
                return;
            }
        }
    }

    /// Ends the reply side once every reply is out: the sink to close (unless a
    /// write failed) and the first write error.
    fn finish(&self) -> (Option<S>, Option<io::Error>) {
        let mut sink = lock(&self.sink);
        (sink.wr.take(), sink.error.take())
    }
}

/// Checks a well-framed request against the export; `Err` is the error reply.
fn check(req: &Request, conn: &Conn) -> Result<(), (Errno, String)> {
    let name = proto::command_name(req.typ);
    // FUA is valid on every command once advertised (and harmless when read-only).
    let allowed = proto::CMD_FLAG_FUA
        | match req.typ {
            proto::CMD_READ | proto::CMD_WRITE | proto::CMD_FLUSH | proto::CMD_TRIM => 0,
            proto::CMD_WRITE_ZEROES => proto::CMD_FLAG_NO_HOLE,
            proto::CMD_BLOCK_STATUS => proto::CMD_FLAG_REQ_ONE,
            t => {
                return Err((
                    Errno::EINVAL,
                    format!("command {name} ({t}) is not supported"),
                ));
            }
        };
    if req.flags & !allowed != 0 {
        return Err((
            Errno::EINVAL,
            format!("flags {:#x} are not valid for {name}", req.flags & !allowed),
        ));
    }
    let writes = matches!(
        req.typ,
        proto::CMD_WRITE | proto::CMD_TRIM | proto::CMD_WRITE_ZEROES
    );
    if writes && conn.read_only {
        return Err((Errno::EPERM, "the export is read-only".into()));
    }
    if req.typ == proto::CMD_FLUSH {
        return Ok(());
    }
    if req.typ == proto::CMD_BLOCK_STATUS {
        if conn.base_allocation.is_none() {
            return Err((Errno::EINVAL, "no metadata context was negotiated".into()));
        }
        if req.len == 0 {
            return Err((Errno::EINVAL, "BLOCK_STATUS of zero bytes".into()));
        }
    }
    if req.typ == proto::CMD_READ && req.len > proto::MAX_PAYLOAD {
        return Err((
            Errno::EOVERFLOW,
            format!(
                "READ of {} bytes exceeds the maximum payload of {} bytes",
                req.len,
                proto::MAX_PAYLOAD
            ),
        ));
    }
    match req.end() {
        Some(end) if end <= conn.size => Ok(()),
        _ => {
            // The protocol asks for ENOSPC when a write runs off the end.
            let errno = if matches!(req.typ, proto::CMD_WRITE | proto::CMD_WRITE_ZEROES) {
                Errno::ENOSPC
            } else {
                Errno::EINVAL
            };
            Err((
                errno,
                format!(
                    "{name} of {} bytes at offset {} is beyond the end of the export ({} bytes)",
                    req.len, req.offset, conn.size
                ),
            ))
        }
    }
}

/// Runs one checked request on the backend (on a blocking thread).
fn execute(conn: &Conn, req: &Request, data: Option<Payload>, pool: &Arc<BufferPool>) -> ReplyBody {
    let fua = req.flags & proto::CMD_FLAG_FUA != 0;
    let (offset, len) = (req.offset, u64::from(req.len));
    let b = &conn.backend;
    let result = match req.typ {
        proto::CMD_READ => {
            let mut buf = pool.get(req.len as usize);
            match b.read_at(&mut buf, offset) {
                Ok(()) => return ReplyBody::Data { offset, buf },
                Err(e) => Err(e),
            }
        }
        proto::CMD_WRITE => match data {
            Some(Payload::Buffered(buf)) => b.write_at(&buf, offset, fua),
            Some(Payload::Spliced(mut piped)) => b.write_spliced(&mut piped, offset, fua),
            None => b.write_at(&[], offset, fua),
        },
        proto::CMD_FLUSH => b.flush(),
        proto::CMD_TRIM if len == 0 => Ok(()),
        proto::CMD_TRIM => b.trim(offset, len, fua),
        proto::CMD_WRITE_ZEROES if len == 0 => Ok(()),
        proto::CMD_WRITE_ZEROES => {
            let may_trim = req.flags & proto::CMD_FLAG_NO_HOLE == 0;
            b.write_zeroes(offset, len, fua, may_trim)
        }
        proto::CMD_BLOCK_STATUS => {
            let context = conn.base_allocation.unwrap_or(BASE_ALLOCATION_ID);
            match b.block_status(offset, len) {
                Ok(ext) => {
                    let req_one = req.flags & proto::CMD_FLAG_REQ_ONE != 0;
                    let extents = clamp_extents(&ext, len, req_one);
                    return ReplyBody::BlockStatus { context, extents };
                }
                Err(e) => Err(e),
            }
        }
        _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
    };
    match result {
        Ok(()) => ReplyBody::Done,
        Err(e) => {
            let errno = Errno::from_io(&e);
            let what = proto::command_name(req.typ);
            tracing::warn!("{what} of {len} bytes at offset {offset} failed: {e}");
            ReplyBody::Error {
                errno,
                message: format!("{what} of {len} bytes at offset {offset} failed: {e}"),
            }
        }
    }
}

/// Turns backend extents into wire descriptors: drops empty ones, merges neighbours
/// with equal flags, cuts at `len`, caps the count, and always returns at least one.
fn clamp_extents(ext: &[(u64, u32)], len: u64, req_one: bool) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut covered = 0u64;
    for &(l, flags) in ext {
        if covered >= len {
            break;
        }
        let l = l.min(len - covered);
        if l == 0 {
            continue;
        }
        covered += l;
        // `len` came from a u32 request field, so `l` fits.
        let l32 = l as u32;
        match out.last_mut() {
            Some(last) if last.1 == flags => last.0 += l32,
            _ => {
                if out.len() == MAX_EXTENTS || (req_one && !out.is_empty()) {
                    break;
                }
                out.push((l32, flags));
            }
        }
    }
    if out.is_empty() {
        out.push((len as u32, 0));
    }
    out
}

/// Encodes and writes a batch of replies: small ones together in one write, a large
/// read's data with a vectored write instead of a copy.
fn write_batch<S: ReplySink>(
    wr: &mut S,
    out: &mut Vec<u8>,
    batch: &[Reply],
    structured: bool,
    on_block: &mut Option<&mut dyn FnMut()>,
) -> io::Result<()> {
    out.clear();
    for reply in batch {
        let cookie = reply.cookie;
        match &reply.body {
            ReplyBody::Done => proto::put_simple_reply(out, Errno(0), cookie),
            ReplyBody::Error { errno, message } => {
                if structured {
                    proto::put_error_chunk(out, cookie, *errno, message);
                } else {
                    proto::put_simple_reply(out, *errno, cookie);
                }
            }
            ReplyBody::BlockStatus { context, extents } => {
                proto::put_block_status_chunk(out, cookie, *context, extents);
            }
            ReplyBody::Data { offset, buf } => {
                let n = buf.len();
                if !structured {
                    proto::put_simple_reply(out, Errno(0), cookie);
                } else if n == 0 {
                    // A data chunk must carry at least one byte.
                    proto::put_chunk_header(
                        out,
                        proto::REPLY_FLAG_DONE,
                        proto::REPLY_TYPE_NONE,
                        cookie,
                        0,
                    );
                } else {
                    // n <= MAX_PAYLOAD, so 8 + n fits in u32.
                    proto::put_chunk_header(
                        out,
                        proto::REPLY_FLAG_DONE,
                        proto::REPLY_TYPE_OFFSET_DATA,
                        cookie,
                        8 + n as u32,
                    );
                    out.extend_from_slice(&offset.to_be_bytes());
                }
                if n <= INLINE_PAYLOAD {
                    out.extend_from_slice(buf);
                } else {
                    wr.write_all_vectored(&mut [IoSlice::new(out), IoSlice::new(buf)], on_block)?;
                    out.clear();
                }
            }
        }
        if out.len() >= WRITE_BATCH {
            wr.write_all_vectored(&mut [IoSlice::new(out)], on_block)?;
            out.clear();
        }
    }
    if !out.is_empty() {
        wr.write_all_vectored(&mut [IoSlice::new(out)], on_block)?;
        out.clear();
    }
    wr.flush()
}

/// Payload buffers of one connection, reused so that steady traffic allocates
/// nothing. Buffers stay initialised, so reuse costs no memset either.
#[derive(Default)]
struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    fn get(self: &Arc<Self>, len: usize) -> PooledBuf {
        let mut buf = self
            .free
            .lock()
            .ok()
            .and_then(|mut free| free.pop())
            .unwrap_or_default();
        if buf.len() < len {
            buf.resize(len, 0);
        }
        PooledBuf {
            buf,
            len,
            pool: Arc::clone(self),
        }
    }
}

/// A buffer of `len` bytes that goes back to its pool when dropped.
struct PooledBuf {
    buf: Vec<u8>,
    len: usize,
    pool: Arc<BufferPool>,
}

impl std::ops::Deref for PooledBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl std::ops::DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if buf.capacity() == 0 || buf.capacity() > POOLED_BUFFER_MAX {
            return;
        }
        if let Ok(mut free) = self.pool.free.lock()
            && free.len() < POOLED_BUFFERS
        {
            free.push(buf);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::net::UnixStream;

    /// An in-memory backend for byte-exact protocol tests.
    struct MemBackend {
        data: Mutex<Vec<u8>>,
        read_only: bool,
        /// Writes whose payload came in pipes.
        spliced: AtomicUsize,
    }

    impl MemBackend {
        fn new(size: usize, read_only: bool) -> Arc<Self> {
            let data = (0..size).map(|i| (i % 251) as u8).collect();
            Arc::new(MemBackend {
                data: Mutex::new(data),
                read_only,
                spliced: AtomicUsize::new(0),
            })
        }
    }

    impl Backend for MemBackend {
        fn size(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn read_only(&self) -> bool {
            self.read_only
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            let d = self.data.lock().unwrap();
            let o = offset as usize;
            buf.copy_from_slice(&d[o..o + buf.len()]);
            Ok(())
        }
        fn write_at(&self, data: &[u8], offset: u64, _fua: bool) -> io::Result<()> {
            let mut d = self.data.lock().unwrap();
            let o = offset as usize;
            d[o..o + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
        fn trim(&self, _offset: u64, _len: u64, _fua: bool) -> io::Result<()> {
            Ok(())
        }
        fn write_zeroes(
            &self,
            offset: u64,
            len: u64,
            _fua: bool,
            _may_trim: bool,
        ) -> io::Result<()> {
            let mut d = self.data.lock().unwrap();
            d[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
        fn takes_spliced(&self) -> bool {
            true
        }
        fn write_spliced(&self, data: &mut Spliced, offset: u64, fua: bool) -> io::Result<()> {
            self.spliced.fetch_add(1, Ordering::Relaxed);
            self.write_at(&data.to_vec()?, offset, fua)
        }
    }

    /// How the server under test reads requests: the two transmission paths.
    #[derive(Debug, Clone, Copy)]
    enum Via {
        /// A tokio task, as for any stream (`serve_until`).
        Task,
        /// A blocking thread, as for the plain sockets of `serve_unix`/`serve_tcp`.
        Threads,
    }

    fn test_options() -> ServerOptions {
        ServerOptions {
            export_name: "disk".into(),
            ..ServerOptions::default()
        }
    }

    /// Serves one end of a socket pair the way `via` says.
    fn spawn_server(
        via: Via,
        stream: UnixStream,
        backend: Arc<dyn Backend>,
        opts: ServerOptions,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<Result<(), NbdError>> {
        let opts = Arc::new(opts);
        match via {
            Via::Task => tokio::spawn(serve_until(stream, backend, opts, shutdown)),
            Via::Threads => {
                let exports = SingleExport::resolver(backend, &opts);
                tokio::spawn(serve_plain(stream, exports, opts, shutdown))
            }
        }
    }

    /// A raw client speaking bytes to the server over a Unix socket.
    struct Raw {
        io: UnixStream,
        /// The connection's task, when the test started it.
        server: Option<tokio::task::JoinHandle<Result<(), NbdError>>>,
        /// The export size `go` expects the server to announce.
        expect_size: u64,
    }

    impl Raw {
        async fn start(via: Via, backend: Arc<dyn Backend>) -> Raw {
            Raw::start_with(via, backend, test_options(), CancellationToken::new()).await
        }

        async fn start_with(
            via: Via,
            backend: Arc<dyn Backend>,
            opts: ServerOptions,
            shutdown: CancellationToken,
        ) -> Raw {
            let (client, server) = UnixStream::pair().unwrap();
            let server = spawn_server(via, server, backend, opts, shutdown);
            Raw::greeted(client, Some(server)).await
        }

        async fn greeted(
            io: UnixStream,
            server: Option<tokio::task::JoinHandle<Result<(), NbdError>>>,
        ) -> Raw {
            let mut raw = Raw {
                io,
                server,
                expect_size: 1 << 20,
            };
            let mut greet = [0u8; 18];
            raw.io.read_exact(&mut greet).await.unwrap();
            assert_eq!(proto::be_u64(&greet[0..8]), proto::NBD_MAGIC);
            assert_eq!(proto::be_u64(&greet[8..16]), proto::IHAVEOPT);
            assert_eq!(proto::be_u16(&greet[16..18]), 3);
            raw
        }

        async fn send(&mut self, b: &[u8]) {
            self.io.write_all(b).await.unwrap();
        }

        async fn option(&mut self, option: u32, data: &[u8]) {
            let mut b = proto::encode_option_header(option, data.len() as u32).to_vec();
            b.extend_from_slice(data);
            self.send(&b).await;
        }

        async fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
            let mut h = [0u8; proto::OptionReplyHeader::LEN];
            self.io.read_exact(&mut h).await.unwrap();
            let h = proto::OptionReplyHeader::decode(&h).unwrap();
            let mut d = vec![0u8; h.len as usize];
            self.io.read_exact(&mut d).await.unwrap();
            (h.option, h.typ, d)
        }

        /// Handshake with NO_ZEROES, optional structured replies and
        /// base:allocation, then GO. Returns the transmission flags.
        async fn go(&mut self, structured: bool, base_allocation: bool) -> u16 {
            self.send(&3u32.to_be_bytes()).await;
            if structured {
                self.option(proto::OPT_STRUCTURED_REPLY, &[]).await;
                assert_eq!(self.option_reply().await.1, proto::REP_ACK);
            }
            if base_allocation {
                let q = proto::MetaContextRequest {
                    export: String::new(),
                    queries: vec!["base:allocation".into()],
                };
                self.option(proto::OPT_SET_META_CONTEXT, &q.encode()).await;
                let (_, typ, d) = self.option_reply().await;
                assert_eq!(typ, proto::REP_META_CONTEXT);
                assert_eq!(proto::be_u32(&d[0..4]), BASE_ALLOCATION_ID);
                assert_eq!(&d[4..], b"base:allocation");
                assert_eq!(self.option_reply().await.1, proto::REP_ACK);
            }
            let go = proto::InfoRequest {
                name: "disk".into(),
                requests: vec![proto::INFO_BLOCK_SIZE],
            };
            self.option(proto::OPT_GO, &go.encode()).await;
            let mut flags = None;
            let mut block_size = None;
            loop {
                let (opt, typ, d) = self.option_reply().await;
                assert_eq!(opt, proto::OPT_GO);
                if typ == proto::REP_ACK {
                    break;
                }
                assert_eq!(typ, proto::REP_INFO);
                match proto::be_u16(&d[0..2]) {
                    proto::INFO_EXPORT => {
                        assert_eq!(proto::be_u64(&d[2..10]), self.expect_size);
                        flags = Some(proto::be_u16(&d[10..12]));
                    }
                    proto::INFO_BLOCK_SIZE => {
                        block_size = Some((
                            proto::be_u32(&d[2..6]),
                            proto::be_u32(&d[6..10]),
                            proto::be_u32(&d[10..14]),
                        ));
                    }
                    t => panic!("unexpected info {t}"),
                }
            }
            assert_eq!(block_size, Some((1, 4096, 32 << 20)));
            flags.unwrap()
        }

        async fn request(&mut self, typ: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
            let r = Request {
                flags,
                typ,
                cookie,
                offset,
                len,
            };
            self.send(&r.encode()).await;
        }

        async fn simple_reply(&mut self) -> (u32, u64) {
            let mut h = [0u8; 16];
            self.io.read_exact(&mut h).await.unwrap();
            assert_eq!(proto::be_u32(&h[0..4]), proto::SIMPLE_REPLY_MAGIC);
            (proto::be_u32(&h[4..8]), proto::be_u64(&h[8..16]))
        }

        async fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
            let mut h = [0u8; 20];
            self.io.read_exact(&mut h).await.unwrap();
            assert_eq!(proto::be_u32(&h[0..4]), proto::STRUCTURED_REPLY_MAGIC);
            let len = proto::be_u32(&h[16..20]);
            let mut d = vec![0u8; len as usize];
            self.io.read_exact(&mut d).await.unwrap();
            (
                proto::be_u16(&h[4..6]),
                proto::be_u16(&h[6..8]),
                proto::be_u64(&h[8..16]),
                d,
            )
        }

        async fn expect_closed(mut self) -> Result<(), NbdError> {
            let mut b = [0u8; 64];
            let n = self.io.read(&mut b).await.unwrap_or(0);
            assert_eq!(n, 0, "server should have closed the connection");
            match self.server {
                Some(server) => server.await.unwrap(),
                None => Ok(()),
            }
        }
    }

    fn pattern(offset: usize, len: usize) -> Vec<u8> {
        (offset..offset + len).map(|i| (i % 251) as u8).collect()
    }

    async fn options_are_answered(via: Via) {
        let mut c = Raw::start(via, MemBackend::new(1 << 20, false)).await;
        c.send(&3u32.to_be_bytes()).await;

        c.option(proto::OPT_STARTTLS, &[]).await;
        let (opt, typ, msg) = c.option_reply().await;
        assert_eq!((opt, typ), (proto::OPT_STARTTLS, proto::REP_ERR_POLICY));
        assert!(String::from_utf8(msg).unwrap().contains("TLS"));

        c.option(4242, b"whatever").await;
        assert_eq!(c.option_reply().await.1, proto::REP_ERR_UNSUP);

        c.option(proto::OPT_EXTENDED_HEADERS, &[]).await;
        assert_eq!(c.option_reply().await.1, proto::REP_ERR_UNSUP);

        c.option(proto::OPT_LIST, &[]).await;
        let (_, typ, d) = c.option_reply().await;
        assert_eq!(typ, proto::REP_SERVER);
        assert_eq!(proto::be_u32(&d[0..4]), 4);
        assert_eq!(&d[4..], b"disk");
        assert_eq!(c.option_reply().await.1, proto::REP_ACK);

        c.option(proto::OPT_LIST, b"x").await;
        assert_eq!(c.option_reply().await.1, proto::REP_ERR_INVALID);

        // Meta contexts need structured replies first.
        let q = proto::MetaContextRequest {
            export: String::new(),
            queries: vec![],
        };
        c.option(proto::OPT_LIST_META_CONTEXT, &q.encode()).await;
        assert_eq!(c.option_reply().await.1, proto::REP_ERR_INVALID);

        c.option(proto::OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(c.option_reply().await.1, proto::REP_ACK);

        // Listing everything shows base:allocation with id 0.
        c.option(proto::OPT_LIST_META_CONTEXT, &q.encode()).await;
        let (_, typ, d) = c.option_reply().await;
        assert_eq!(typ, proto::REP_META_CONTEXT);
        assert_eq!(proto::be_u32(&d[0..4]), 0);
        assert_eq!(&d[4..], b"base:allocation");
        assert_eq!(c.option_reply().await.1, proto::REP_ACK);

        // An unknown context selects nothing.
        let q = proto::MetaContextRequest {
            export: String::new(),
            queries: vec!["qemu:dirty-bitmap:b0".into()],
        };
        c.option(proto::OPT_SET_META_CONTEXT, &q.encode()).await;
        assert_eq!(c.option_reply().await.1, proto::REP_ACK);

        // Unknown export for INFO, then a malformed INFO.
        let info = proto::InfoRequest {
            name: "nope".into(),
            requests: vec![],
        };
        c.option(proto::OPT_INFO, &info.encode()).await;
        assert_eq!(c.option_reply().await.1, proto::REP_ERR_UNKNOWN);
        c.option(proto::OPT_INFO, &[0, 0, 0, 9]).await;
        assert_eq!(c.option_reply().await.1, proto::REP_ERR_INVALID);

        c.option(proto::OPT_ABORT, &[]).await;
        assert_eq!(c.option_reply().await.1, proto::REP_ACK);
        c.expect_closed().await.unwrap();
    }

    async fn export_name_with_zeroes(via: Via) {
        let mut c = Raw::start(via, MemBackend::new(1 << 20, true)).await;
        // Fixed newstyle without NO_ZEROES.
        c.send(&1u32.to_be_bytes()).await;
        c.option(proto::OPT_EXPORT_NAME, b"disk").await;
        let mut b = [0u8; 8 + 2 + 124];
        c.io.read_exact(&mut b).await.unwrap();
        assert_eq!(proto::be_u64(&b[0..8]), 1 << 20);
        let flags = proto::be_u16(&b[8..10]);
        assert_ne!(flags & proto::FLAG_READ_ONLY, 0);
        assert_eq!(flags & proto::FLAG_SEND_TRIM, 0);
        assert!(b[10..].iter().all(|&x| x == 0));
        // Read-only: writes get EPERM (payload consumed, stream stays in sync).
        c.request(proto::CMD_WRITE, 0, 1, 0, 4).await;
        c.send(b"abcd").await;
        assert_eq!(c.simple_reply().await, (1, 1));
        c.request(proto::CMD_READ, 0, 2, 0, 4).await;
        assert_eq!(c.simple_reply().await, (0, 2));
        let mut d = [0u8; 4];
        c.io.read_exact(&mut d).await.unwrap();
        assert_eq!(d.to_vec(), pattern(0, 4));
        c.request(proto::CMD_DISC, 0, 3, 0, 0).await;
        c.expect_closed().await.unwrap();
    }

    async fn unknown_export_name_closes(via: Via) {
        let mut c = Raw::start(via, MemBackend::new(1 << 20, false)).await;
        c.send(&3u32.to_be_bytes()).await;
        c.option(proto::OPT_EXPORT_NAME, b"other").await;
        let e = c.expect_closed().await.unwrap_err();
        assert!(e.to_string().contains("unknown export"), "{e}");
    }

    async fn unknown_client_flags_close(via: Via) {
        let mut c = Raw::start(via, MemBackend::new(1 << 20, false)).await;
        c.send(&0x80u32.to_be_bytes()).await;
        let e = c.expect_closed().await.unwrap_err();
        assert!(matches!(e, NbdError::Protocol(_)), "{e}");
    }

    async fn simple_replies(via: Via) {
        let mut c = Raw::start(via, MemBackend::new(1 << 20, false)).await;
        let flags = c.go(false, false).await;
        assert_eq!(
            flags,
            proto::FLAG_HAS_FLAGS
                | proto::FLAG_SEND_FLUSH
                | proto::FLAG_SEND_FUA
                | proto::FLAG_SEND_TRIM
                | proto::FLAG_SEND_WRITE_ZEROES
        );
        c.request(proto::CMD_WRITE, proto::CMD_FLAG_FUA, 10, 100, 3)
            .await;
        c.send(b"xyz").await;
        assert_eq!(c.simple_reply().await, (0, 10));
        c.request(proto::CMD_READ, 0, 11, 99, 5).await;
        assert_eq!(c.simple_reply().await, (0, 11));
        let mut d = [0u8; 5];
        c.io.read_exact(&mut d).await.unwrap();
        assert_eq!(
            &d,
            &[pattern(99, 1)[0], b'x', b'y', b'z', pattern(103, 1)[0]]
        );
        // Out of range: EINVAL for reads, ENOSPC for writes, no payload either way.
        c.request(proto::CMD_READ, 0, 12, (1 << 20) - 1, 2).await;
        assert_eq!(c.simple_reply().await, (22, 12));
        c.request(proto::CMD_WRITE_ZEROES, 0, 13, u64::MAX, 1).await;
        assert_eq!(c.simple_reply().await, (28, 13));
        // Unknown command and unknown flag.
        c.request(99, 0, 14, 0, 0).await;
        assert_eq!(c.simple_reply().await, (22, 14));
        c.request(proto::CMD_READ, proto::CMD_FLAG_DF, 15, 0, 1)
            .await;
        assert_eq!(c.simple_reply().await, (22, 15));
        // Too large a read.
        c.request(proto::CMD_READ, 0, 16, 0, proto::MAX_PAYLOAD + 1)
            .await;
        assert_eq!(c.simple_reply().await, (75, 16));
        // Block status without a context.
        c.request(proto::CMD_BLOCK_STATUS, 0, 17, 0, 512).await;
        assert_eq!(c.simple_reply().await, (22, 17));
        c.request(proto::CMD_WRITE_ZEROES, proto::CMD_FLAG_NO_HOLE, 18, 101, 1)
            .await;
        assert_eq!(c.simple_reply().await, (0, 18));
        c.request(proto::CMD_FLUSH, 0, 19, 0, 0).await;
        assert_eq!(c.simple_reply().await, (0, 19));
        c.request(proto::CMD_READ, 0, 20, 100, 3).await;
        assert_eq!(c.simple_reply().await, (0, 20));
        let mut d = [0u8; 3];
        c.io.read_exact(&mut d).await.unwrap();
        assert_eq!(&d, b"x\0z");
        c.request(proto::CMD_DISC, 0, 21, 0, 0).await;
        c.expect_closed().await.unwrap();
    }

    async fn structured_replies(via: Via) {
        let mut c = Raw::start(via, MemBackend::new(1 << 20, false)).await;
        c.go(true, true).await;
        c.request(proto::CMD_READ, 0, 1, 4096, 100).await;
        let (flags, typ, cookie, d) = c.chunk().await;
        assert_eq!(
            (flags, typ, cookie),
            (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_DATA, 1)
        );
        assert_eq!(proto::be_u64(&d[0..8]), 4096);
        assert_eq!(d[8..].to_vec(), pattern(4096, 100));

        // A large read goes out with a vectored write; same bytes.
        c.request(proto::CMD_READ, 0, 2, 0, 1 << 20).await;
        let (_, typ, _, d) = c.chunk().await;
        assert_eq!(typ, proto::REPLY_TYPE_OFFSET_DATA);
        assert_eq!(d[8..].to_vec(), pattern(0, 1 << 20));

        // Errors carry a message.
        c.request(proto::CMD_READ, 0, 3, 1 << 20, 1).await;
        let (flags, typ, cookie, d) = c.chunk().await;
        assert_eq!(
            (flags, typ, cookie),
            (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_ERROR, 3)
        );
        assert_eq!(proto::be_u32(&d[0..4]), 22);
        let mlen = usize::from(proto::be_u16(&d[4..6]));
        let msg = std::str::from_utf8(&d[6..6 + mlen]).unwrap();
        assert!(msg.contains("beyond the end"), "{msg}");

        // Empty read: a NONE chunk.
        c.request(proto::CMD_READ, 0, 4, 0, 0).await;
        let (flags, typ, _, d) = c.chunk().await;
        assert_eq!(
            (flags, typ, d.len()),
            (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, 0)
        );

        // Block status with the default (allocated) answer.
        c.request(proto::CMD_BLOCK_STATUS, 0, 5, 0, 8192).await;
        let (flags, typ, _, d) = c.chunk().await;
        assert_eq!(
            (flags, typ),
            (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_BLOCK_STATUS)
        );
        assert_eq!(d.len(), 12);
        assert_eq!(proto::be_u32(&d[0..4]), BASE_ALLOCATION_ID);
        assert_eq!(proto::be_u32(&d[4..8]), 8192);
        assert_eq!(proto::be_u32(&d[8..12]), 0);

        // Writes still get simple replies.
        c.request(proto::CMD_WRITE, 0, 6, 0, 1).await;
        c.send(b"!").await;
        assert_eq!(c.simple_reply().await, (0, 6));
        c.request(proto::CMD_DISC, 0, 7, 0, 0).await;
        c.expect_closed().await.unwrap();
    }

    async fn many_requests_in_flight(via: Via) {
        let mut c = Raw::start(via, MemBackend::new(1 << 20, false)).await;
        c.go(true, false).await;
        // Pipeline 64 writes then 64 reads without waiting.
        for i in 0..64u64 {
            c.request(proto::CMD_WRITE, 0, i, i * 4096, 4096).await;
            c.send(&[i as u8; 4096]).await;
        }
        let mut seen = std::collections::HashSet::new();
        for _ in 0..64 {
            let (err, cookie) = c.simple_reply().await;
            assert_eq!(err, 0);
            assert!(seen.insert(cookie));
        }
        for i in 0..64u64 {
            c.request(proto::CMD_READ, 0, 1000 + i, i * 4096, 4096)
                .await;
        }
        for _ in 0..64 {
            let (_, _, cookie, d) = c.chunk().await;
            let i = cookie - 1000;
            assert_eq!(proto::be_u64(&d[0..8]), i * 4096);
            assert!(d[8..].iter().all(|&b| b == i as u8));
        }
        c.request(proto::CMD_DISC, 0, 0, 0, 0).await;
        c.expect_closed().await.unwrap();
    }

    async fn shutdown_closes_idle_connections(via: Via) {
        let token = CancellationToken::new();
        let mut c = Raw::start_with(
            via,
            MemBackend::new(1 << 20, false),
            test_options(),
            token.clone(),
        )
        .await;
        c.go(true, false).await;
        c.request(proto::CMD_READ, 0, 1, 0, 16).await;
        let (_, typ, cookie, d) = c.chunk().await;
        assert_eq!((typ, cookie), (proto::REPLY_TYPE_OFFSET_DATA, 1));
        assert_eq!(d[8..].to_vec(), pattern(0, 16));
        token.cancel();
        c.expect_closed().await.unwrap();
    }

    async fn bad_request_magic_closes(via: Via) {
        let mut c = Raw::start(via, MemBackend::new(1 << 20, false)).await;
        c.go(false, false).await;
        c.send(&[0xde; 28]).await;
        let e = c.expect_closed().await.unwrap_err();
        assert!(e.to_string().contains("magic"), "{e}");
    }

    async fn oversized_write_closes(via: Via) {
        let mut c = Raw::start(via, MemBackend::new(1 << 20, false)).await;
        c.go(false, false).await;
        c.request(proto::CMD_WRITE, 0, 1, 0, u32::MAX).await;
        let e = c.expect_closed().await.unwrap_err();
        assert!(e.to_string().contains("maximum payload"), "{e}");
    }

    async fn oversized_option_closes(via: Via) {
        let mut c = Raw::start(via, MemBackend::new(1 << 20, false)).await;
        c.send(&3u32.to_be_bytes()).await;
        c.send(&proto::encode_option_header(proto::OPT_GO, u32::MAX))
            .await;
        let e = c.expect_closed().await.unwrap_err();
        assert!(matches!(e, NbdError::Protocol(_)), "{e}");
    }

    /// A pipelining client: a request sent right behind the last option, before the
    /// server answered it, is not lost when the connection leaves tokio.
    async fn request_right_behind_the_handshake(via: Via) {
        let mut c = Raw::start(via, MemBackend::new(1 << 20, false)).await;
        let mut b = 3u32.to_be_bytes().to_vec();
        b.extend_from_slice(&proto::encode_option_header(proto::OPT_EXPORT_NAME, 4));
        b.extend_from_slice(b"disk");
        let read = Request {
            flags: 0,
            typ: proto::CMD_READ,
            cookie: 9,
            offset: 10,
            len: 5,
        };
        b.extend_from_slice(&read.encode());
        c.send(&b).await;
        let answered = tokio::time::timeout(Duration::from_secs(10), async {
            let mut export = [0u8; 10];
            c.io.read_exact(&mut export).await.unwrap();
            assert_eq!(proto::be_u64(&export[0..8]), 1 << 20);
            assert_eq!(c.simple_reply().await, (0, 9));
            let mut d = [0u8; 5];
            c.io.read_exact(&mut d).await.unwrap();
            d
        });
        let d = answered.await.expect("the early READ was not answered");
        assert_eq!(d.to_vec(), pattern(10, 5));
        c.request(proto::CMD_DISC, 0, 10, 0, 0).await;
        c.expect_closed().await.unwrap();
    }

    /// A client that sends without reading replies runs ahead until its budget
    /// is spent, not only until the socket's buffer of replies is full: the reader
    /// never waits to send a reply.
    async fn reading_goes_on_while_replies_wait(via: Via) {
        let mut c = Raw::start(via, MemBackend::new(1 << 20, false)).await;
        c.go(false, false).await;
        // 3000 small writes take 60 MB of the 64 MiB budget; their replies are far
        // more than the socket buffers hold.
        const N: u64 = 3000;
        let mut b = Vec::new();
        for i in 0..N {
            let r = Request {
                flags: 0,
                typ: proto::CMD_WRITE,
                cookie: i,
                offset: i * 4096 % (1 << 20),
                len: 4096,
            };
            b.extend_from_slice(&r.encode());
            b.extend_from_slice(&[i as u8; 4096]);
        }
        tokio::time::timeout(Duration::from_secs(30), c.io.write_all(&b))
            .await
            .expect("the server stopped reading requests")
            .unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..N {
            let (err, cookie) = c.simple_reply().await;
            assert_eq!(err, 0);
            assert!(seen.insert(cookie));
        }
        c.request(proto::CMD_DISC, 0, 0, 0, 0).await;
        c.expect_closed().await.unwrap();
    }

    /// Passes everything to a [`MemBackend`], except that a flush waits until the
    /// test releases it.
    struct GatedBackend {
        inner: Arc<MemBackend>,
        flushing: Arc<tokio::sync::Notify>,
        release: Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl Backend for GatedBackend {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
            self.inner.write_at(data, offset, fua)
        }
        fn flush(&self) -> io::Result<()> {
            self.flushing.notify_one();
            self.release.lock().unwrap().recv().unwrap();
            Ok(())
        }
        fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
            self.inner.trim(offset, len, fua)
        }
        fn write_zeroes(&self, offset: u64, len: u64, fua: bool, may_trim: bool) -> io::Result<()> {
            self.inner.write_zeroes(offset, len, fua, may_trim)
        }
    }

    /// At shutdown, a request already running is answered before the connection
    /// closes.
    async fn shutdown_answers_requests_in_flight(via: Via) {
        let (release, released) = std::sync::mpsc::channel();
        let flushing = Arc::new(tokio::sync::Notify::new());
        let backend = Arc::new(GatedBackend {
            inner: MemBackend::new(1 << 20, false),
            flushing: Arc::clone(&flushing),
            release: Mutex::new(released),
        });
        let token = CancellationToken::new();
        let mut c = Raw::start_with(via, backend, test_options(), token.clone()).await;
        c.go(false, false).await;
        c.request(proto::CMD_FLUSH, 0, 7, 0, 0).await;
        flushing.notified().await;
        token.cancel();
        tokio::time::sleep(Duration::from_millis(50)).await;
        release.send(()).unwrap();
        assert_eq!(c.simple_reply().await, (0, 7));
        c.expect_closed().await.unwrap();
    }

    /// Writes below, at and above the read buffer's size, between small writes and
    /// flushes, all sent in one burst: every payload lands where it was sent and the
    /// stream stays in sync, however the reader splits its reads between its buffer
    /// and the payload buffers.
    async fn large_and_small_requests_pipelined(via: Via) {
        const SIZE: usize = 16 << 20;
        let backend = MemBackend::new(SIZE, false);
        let mut c = Raw::start(via, Arc::clone(&backend) as Arc<dyn Backend>).await;
        c.expect_size = SIZE as u64;
        c.go(false, false).await;
        let want = c.pipelined_burst(pattern(0, SIZE)).await;
        let got = backend.data.lock().unwrap().clone();
        let first_bad = got.iter().zip(&want).position(|(a, b)| a != b);
        assert_eq!(first_bad, None, "the export differs from what was written");
        // Large payloads on a plain socket come in pipes once nothing is buffered;
        // a stream read by a task has no socket to splice from.
        let spliced = backend.spliced.load(Ordering::Relaxed);
        match via {
            Via::Threads => assert!(spliced >= 3, "only {spliced} payloads spliced"),
            Via::Task => assert_eq!(spliced, 0),
        }
        c.request(proto::CMD_DISC, 0, 9999, 0, 0).await;
        c.expect_closed().await.unwrap();
    }

    /// The same burst into a real file: spliced payloads reach it, FUA ones
    /// through the `O_DSYNC` descriptor.
    #[tokio::test]
    async fn large_writes_reach_a_file_through_pipes() {
        const SIZE: usize = 16 << 20;
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), pattern(0, SIZE)).unwrap();
        let backend = Arc::new(FileBackend::open(file.path(), false).unwrap());
        let mut c = Raw::start(Via::Threads, backend).await;
        c.expect_size = SIZE as u64;
        c.go(false, false).await;
        let want = c.pipelined_burst(pattern(0, SIZE)).await;
        c.request(proto::CMD_DISC, 0, 9999, 0, 0).await;
        c.expect_closed().await.unwrap();
        let got = std::fs::read(file.path()).unwrap();
        assert_eq!(got.len(), SIZE);
        let first_bad = got.iter().zip(&want).position(|(a, b)| a != b);
        assert_eq!(first_bad, None, "the file differs from what was written");
    }

    impl Raw {
        /// Sends writes of every size around the reader's thresholds in one burst,
        /// some with FUA, with flushes between them, and checks every reply.
        /// Returns what the export holds now, given it held `want`.
        async fn pipelined_burst(&mut self, mut want: Vec<u8>) -> Vec<u8> {
            let lens = [
                4096,
                100,
                LARGE_PAYLOAD - 1,
                LARGE_PAYLOAD,
                28,
                READ_BUFFER,
                READ_BUFFER + 1,
                1 << 20,
                1 << 20,
                512,
                (1 << 20) + 7,
                4096,
                300_000,
                2 << 20,
                1,
            ];
            let mut burst = Vec::new();
            let mut offset = 3usize;
            let mut cookies = std::collections::HashSet::new();
            for (i, &len) in lens.iter().enumerate() {
                let cookie = i as u64 + 1;
                let data: Vec<u8> = (0..len)
                    .map(|j| (j as u64 * 7 + cookie * 13) as u8 ^ 0xa5)
                    .collect();
                want[offset..offset + len].copy_from_slice(&data);
                let req = Request {
                    flags: if i % 3 == 2 { proto::CMD_FLAG_FUA } else { 0 },
                    typ: proto::CMD_WRITE,
                    cookie,
                    offset: offset as u64,
                    len: len as u32,
                };
                burst.extend_from_slice(&req.encode());
                burst.extend_from_slice(&data);
                cookies.insert(cookie);
                if i % 4 == 3 {
                    let flush = Request {
                        flags: 0,
                        typ: proto::CMD_FLUSH,
                        cookie: 1000 + cookie,
                        offset: 0,
                        len: 0,
                    };
                    burst.extend_from_slice(&flush.encode());
                    cookies.insert(1000 + cookie);
                }
                offset += len + 4093;
            }
            assert!(offset < want.len());
            self.send(&burst).await;
            for _ in 0..cookies.len() {
                let (err, cookie) = self.simple_reply().await;
                assert_eq!(err, 0, "request {cookie} failed");
                assert!(cookies.remove(&cookie), "unexpected reply {cookie}");
            }
            want
        }
    }

    macro_rules! on_both_paths {
        ($($name:ident),* $(,)?) => {
            mod via_task {
                $(#[tokio::test]
                async fn $name() {
                    super::$name(super::Via::Task).await
                })*
            }
            mod via_threads {
                $(#[tokio::test]
                async fn $name() {
                    super::$name(super::Via::Threads).await
                })*
            }
        };
    }

    on_both_paths!(
        options_are_answered,
        export_name_with_zeroes,
        unknown_export_name_closes,
        unknown_client_flags_close,
        simple_replies,
        structured_replies,
        many_requests_in_flight,
        shutdown_closes_idle_connections,
        bad_request_magic_closes,
        oversized_write_closes,
        oversized_option_closes,
        request_right_behind_the_handshake,
        reading_goes_on_while_replies_wait,
        shutdown_answers_requests_in_flight,
        large_and_small_requests_pipelined,
    );

    /// `serve_unix` at shutdown: a connection whose client stopped reading replies
    /// is torn down once the grace period is over, and the server returns.
    #[tokio::test]
    async fn stuck_connection_dropped_after_grace() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let opts = Arc::new(ServerOptions {
            shutdown_grace: Duration::from_millis(200),
            ..test_options()
        });
        let token = CancellationToken::new();
        let server = tokio::spawn(serve_unix(
            listener,
            MemBackend::new(1 << 20, false),
            opts,
            token.clone(),
        ));
        let mut c = Raw::greeted(UnixStream::connect(&path).await.unwrap(), None).await;
        c.go(true, false).await;
        // 64 MiB of reads, more than the budget; none of the replies is read.
        for i in 0..64 {
            c.request(proto::CMD_READ, 0, i, 0, 1 << 20).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = std::time::Instant::now();
        token.cancel();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("serve_unix did not return")
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(200));
        // The client finds the connection closed once it reads what was sent.
        let mut sink = vec![0u8; 1 << 20];
        let drained = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match c.io.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        });
        drained.await.expect("the connection stayed open");
    }

    #[test]
    fn inline_backs_off_after_slow_requests() {
        let req = |typ, flags, len| Request {
            flags,
            typ,
            cookie: 0,
            offset: 0,
            len,
        };
        let write = req(proto::CMD_WRITE, 0, 4096);
        let read = req(proto::CMD_READ, 0, 4096);
        let fast = Duration::from_micros(5);
        let slow = Duration::from_millis(5);
        let mut inline = Inline::new();
        // Only small reads and writes without FUA, and refusals.
        assert!(inline.wants(&write, false));
        assert!(inline.wants(&read, false));
        assert!(!inline.wants(&req(proto::CMD_WRITE, proto::CMD_FLAG_FUA, 4096), false));
        assert!(!inline.wants(&req(proto::CMD_WRITE, 0, 1 << 20), false));
        assert!(!inline.wants(&req(proto::CMD_FLUSH, 0, 0), false));
        assert!(inline.wants(&req(proto::CMD_FLUSH, 0, 0), true));
        // A slow write: the next 16 writes are handed off, then one is tried again;
        // reads are not affected.
        inline.ran(&write, fast);
        inline.ran(&write, slow);
        let handed_off = |inline: &mut Inline| {
            let mut n = 0;
            while !inline.wants(&write, false) {
                n += 1;
            }
            n
        };
        assert_eq!(handed_off(&mut inline), 16);
        assert!(inline.wants(&read, false));
        // Slow again: twice as long, up to the maximum.
        inline.ran(&write, slow);
        assert_eq!(handed_off(&mut inline), 32);
        for _ in 0..10 {
            inline.ran(&write, slow);
            handed_off(&mut inline);
        }
        inline.ran(&write, slow);
        assert_eq!(handed_off(&mut inline), 1024);
        // A fast probe starts over.
        inline.ran(&write, fast);
        assert!(inline.wants(&write, false));
        inline.ran(&write, slow);
        assert_eq!(handed_off(&mut inline), 16);
    }

    #[test]
    fn clamp_extents_cases() {
        let h = proto::STATE_HOLE | proto::STATE_ZERO;
        // Merge equal neighbours, drop empty ones, cut at len.
        assert_eq!(
            clamp_extents(&[(10, 0), (0, h), (5, 0), (20, h), (100, 0)], 40, false),
            vec![(15, 0), (20, h), (5, 0)]
        );
        // REQ_ONE keeps one descriptor.
        assert_eq!(clamp_extents(&[(10, 0), (20, h)], 30, true), vec![(10, 0)]);
        // Nothing from the backend still yields one descriptor.
        assert_eq!(clamp_extents(&[], 512, false), vec![(512, 0)]);
        // The count is capped.
        let many: Vec<(u64, u32)> = (0..5000).map(|i| (1, (i % 2) as u32)).collect();
        assert_eq!(clamp_extents(&many, 5000, false).len(), MAX_EXTENTS);
    }

    #[test]
    fn file_backend_zeroes_trim_and_status() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let f = File::create(&path).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&[0x5a; 1 << 20], 1 << 20).unwrap();
        drop(f);
        let b = FileBackend::open(&path, false).unwrap();
        assert_eq!(b.size(), 8 << 20);
        assert!(b.can_multi_conn());

        // Block status: hole, data, hole (if the file system reports holes at all).
        let ext = b.block_status(0, 8 << 20).unwrap();
        let total: u64 = ext.iter().map(|e| e.0).sum();
        assert_eq!(total, 8 << 20);
        let data: Vec<_> = ext.iter().filter(|e| e.1 == 0).collect();
        if ext.len() > 1 {
            assert_eq!(data.len(), 1);
            assert_eq!(ext[0], (1 << 20, proto::STATE_HOLE | proto::STATE_ZERO));
            assert_eq!(ext[1], (1 << 20, 0));
        }

        b.write_zeroes((1 << 20) + 10, 100, true, false).unwrap();
        b.write_zeroes((1 << 20) + 4096, 8192, false, true).unwrap();
        b.trim((1 << 20) + 65536, 65536, false).unwrap();
        b.write_at(b"hi", 3, true).unwrap();
        b.flush().unwrap();
        let mut got = vec![0u8; 2 << 20];
        b.read_at(&mut got, 0).unwrap();
        let mut want = vec![0u8; 2 << 20];
        want[3..5].copy_from_slice(b"hi");
        want[1 << 20..2 << 20].fill(0x5a);
        let m = 1 << 20;
        want[m + 10..m + 110].fill(0);
        want[m + 4096..m + 4096 + 8192].fill(0);
        want[m + 65536..m + 131072].fill(0);
        assert!(
            got == want,
            "file contents differ from the expected pattern"
        );

        let ro = FileBackend::open(&path, true).unwrap();
        assert!(ro.read_only());
        let e = ro.write_at(b"x", 0, false).unwrap_err();
        assert_eq!(Errno::from_io(&e), Errno::EPERM);
    }
}
