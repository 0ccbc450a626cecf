//! Write payloads moved from the socket to the file with `splice(2)`, never copied
//! through the server's memory.
//!
//! A large write read with `recv` is copied twice on the server: from the socket
//! into a buffer, and from the buffer into the page cache. `splice` from a socket
//! into a pipe takes references to the socket's pages instead of copying them, and
//! `splice` from the pipe into a file copies them once, into the page cache. With
//! `recv`, the client, the request reader and the write thread each copy every
//! byte once; with `splice` the reader copies only the small linear part of each
//! socket buffer, so a 2-vCPU host shares two copies between its CPUs instead of
//! three (measurements in docs/ARCHITECTURE.md, "Large writes in pipes").
//!
//! [`receive`] moves one payload off the socket into pipes ([`Spliced`]): the
//! payload has to leave the socket before the next request header can be read,
//! and it stays in the pipes until an I/O thread writes it with
//! [`Spliced::write_to`]. A pipe holds a bounded number of page references (256
//! for the 1 MiB pipes asked for here), not a number of bytes, so a payload that
//! came in many small pieces can fill a pipe with few bytes: the payload then takes
//! another pipe, and after [`MAX_PIPES`] the rest is read into memory the usual
//! way. The budget of bytes in flight counts a spliced payload like a buffered one.
//!
//! Pipes are pooled per connection ([`PipePool`]); one that still holds bytes
//! (its write failed, or the request was refused) is closed, not pooled. Where
//! the kernel will not make 1 MiB pipes, the connection reads payloads into
//! memory as before.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

/// Pipe capacity: the default `/proc/sys/fs/pipe-max-size`, so it is granted
/// without privileges. Where the kernel refuses it (a lower `pipe-max-size`, or
/// an unprivileged user past `pipe-user-pages-soft`, whose new pipes get two
/// pages), payloads are read into memory instead: pipes that small would cost more
/// system calls than the copy they save.
const PIPE_SIZE: libc::c_int = 1 << 20;

/// Pipes one payload may take before the rest is read into memory.
pub const MAX_PIPES: usize = 16;

/// Idle pipes a connection keeps for its next payloads. Each counts as 256 pages
/// against its user's `pipe-user-pages-soft` (16384 by default, for users without
/// `CAP_SYS_RESOURCE`), although it holds no data; making a pipe costs a few
/// microseconds, against about 150 for copying the 1 MiB it carries.
const POOLED_PIPES: usize = 8;

/// A pipe: the socket splices into `w`, the file is spliced from `r`.
#[derive(Debug)]
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

impl Pipe {
    fn new(size: libc::c_int) -> io::Result<Pipe> {
        let (r, w) = sys::pipe()?;
        sys::set_pipe_size(w.as_fd(), size)?;
        Ok(Pipe { r, w })
    }

    /// Whether the pipe has no room for another page reference. Only the thread
    /// filling it calls this, and nobody drains it meanwhile, so the answer holds.
    fn full(&self) -> io::Result<bool> {
        Ok(!sys::poll_one(self.w.as_fd(), libc::POLLOUT, 0)?)
    }
}

/// The system calls, with their `unsafe` confined here.
#[allow(unsafe_code)]
mod sys {
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

    /// A new pipe, close-on-exec: (read end, write end).
    pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and ours alone.
        Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
    }

    pub fn set_pipe_size(pipe: BorrowedFd<'_>, size: libc::c_int) -> io::Result<()> {
        // SAFETY: F_SETPIPE_SZ takes an int; a failure leaves the pipe as it was.
        if unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, size) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Polls one descriptor; `timeout_ms` < 0 waits for ever. True when it is
    /// ready for `events` (or has an error or hang-up, which the next call reports).
    pub fn poll_one(
        fd: BorrowedFd<'_>,
        events: libc::c_short,
        timeout_ms: libc::c_int,
    ) -> io::Result<bool> {
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events,
            revents: 0,
        };
        loop {
            // SAFETY: one valid pollfd, alive for the call.
            match unsafe { libc::poll(&mut p, 1, timeout_ms) } {
                -1 => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
                0 => return Ok(false),
                _ => return Ok(p.revents != 0),
            }
        }
    }

    /// `splice(2)` of up to `len` bytes; `offset` is the position in `to` when
    /// `to` is a file.
    pub fn splice(
        from: BorrowedFd<'_>,
        to: BorrowedFd<'_>,
        offset: Option<&mut i64>,
        len: usize,
        flags: libc::c_uint,
    ) -> io::Result<usize> {
        let off = offset.map_or(std::ptr::null_mut(), |o| o as *mut i64);
        loop {
            // SAFETY: valid descriptors; `off` is null or points to an i64 that
            // outlives the call.
            let n = unsafe {
                libc::splice(
                    from.as_raw_fd(),
                    std::ptr::null_mut(),
                    to.as_raw_fd(),
                    off,
                    len,
                    flags,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// A connection's idle pipes.
#[derive(Debug)]
pub struct PipePool {
    free: Mutex<Vec<Pipe>>,
    /// Capacity of new pipes, in bytes.
    size: libc::c_int,
}

impl Default for PipePool {
    fn default() -> Self {
        PipePool {
            free: Mutex::default(),
            size: PIPE_SIZE,
        }
    }
}

impl PipePool {
    fn get(&self) -> io::Result<Pipe> {
        let pooled = self.free.lock().ok().and_then(|mut free| free.pop());
        match pooled {
            Some(p) => Ok(p),
            None => Pipe::new(self.size),
        }
    }

    fn put(&self, pipe: Pipe) {
        if let Ok(mut free) = self.free.lock()
            && free.len() < POOLED_PIPES
        {
            free.push(pipe);
        }
    }
}

/// One pipe's share of a payload.
#[derive(Debug)]
struct Segment {
    pipe: Pipe,
    /// Bytes of the payload still in the pipe.
    len: usize,
}

/// A write payload held in pipes, between the part already read into memory
/// before it was spliced (`head`) and the part read into memory after
/// [`MAX_PIPES`] pipes filled up (`tail`). Dropping it returns drained pipes to
/// the pool.
#[derive(Debug)]
pub struct Spliced {
    head: Vec<u8>,
    segments: Vec<Segment>,
    tail: Vec<u8>,
    len: usize,
    pool: Arc<PipePool>,
}

impl Spliced {
    /// The payload's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes the payload to `file` at `offset` (a regular file or a block device,
    /// opened for writing). On an error, part of the range may have been written.
    pub fn write_to(&mut self, file: &File, offset: u64) -> io::Result<()> {
        let mut off = i64::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset out of range"))?;
        if !self.head.is_empty() {
            file.write_all_at(&self.head, offset)?;
            off += self.head.len() as i64;
        }
        for seg in &mut self.segments {
            while seg.len > 0 {
                let n = sys::splice(
                    seg.pipe.r.as_fd(),
                    file.as_fd(),
                    Some(&mut off),
                    seg.len,
                    libc::SPLICE_F_MOVE,
                )?;
                if n == 0 {
                    return Err(io::Error::other(
                        "a write payload's pipe ran dry before its end",
                    ));
                }
                seg.len -= n;
            }
        }
        if !self.tail.is_empty() {
            file.write_all_at(&self.tail, off as u64)?;
            self.tail.clear();
        }
        Ok(())
    }

    /// Reads the payload into memory, for a backend with no file to splice into.
    pub fn to_vec(&mut self) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.len);
        out.append(&mut self.head);
        for seg in &mut self.segments {
            let mut r = File::from(seg.pipe.r.try_clone()?);
            let start = out.len();
            out.resize(start + seg.len, 0);
            r.read_exact(&mut out[start..])?;
            seg.len = 0;
        }
        out.append(&mut self.tail);
        Ok(out)
    }
}

impl Drop for Spliced {
    fn drop(&mut self) {
        for seg in self.segments.drain(..) {
            // A pipe with bytes left would hand them to the next payload.
            if seg.len == 0 {
                self.pool.put(seg.pipe);
            }
        }
    }
}

/// Why [`receive`] moved nothing.
#[derive(Debug)]
pub enum NotSpliced {
    /// The socket or the system cannot splice (or no pipe could be made); nothing
    /// was read, so the payload can still be read the usual way.
    Unavailable(io::Error),
    /// Reading failed; the stream is out of step.
    Failed(io::Error),
}

/// Makes a payload of `len` bytes: `head`, which was read off `sock` already,
/// then the next bytes of `sock` (a blocking stream socket), moved into pipes.
/// Blocks until they have all arrived; an end of stream before that is
/// `UnexpectedEof`.
pub fn receive(
    sock: BorrowedFd<'_>,
    head: &[u8],
    len: usize,
    pool: &Arc<PipePool>,
) -> Result<Spliced, NotSpliced> {
    let mut payload = Spliced {
        head: Vec::new(),
        segments: Vec::new(),
        tail: Vec::new(),
        len,
        pool: Arc::clone(pool),
    };
    let mut left = len.saturating_sub(head.len());
    let spliced = left;
    while left > 0 {
        if payload.segments.len() == MAX_PIPES {
            break;
        }
        let pipe = match pool.get() {
            Ok(pipe) => pipe,
            Err(e) if payload.segments.is_empty() => return Err(NotSpliced::Unavailable(e)),
            Err(e) => {
                tracing::debug!("cannot make another pipe for a write payload: {e}");
                break;
            }
        };
        let mut filled = 0;
        while left > 0 {
            // Non-blocking on the pipe: a full pipe would otherwise wait for ever,
            // since nobody drains it before the whole payload is in. (A Unix socket
            // takes the flag as non-blocking too; a TCP socket still blocks.)
            let flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
            match sys::splice(sock, pipe.w.as_fd(), None, left, flags) {
                Ok(0) => {
                    return Err(NotSpliced::Failed(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the stream ended {left} bytes before the end of a write payload"),
                    )));
                }
                Ok(n) => {
                    filled += n;
                    left -= n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if pipe.full().map_err(NotSpliced::Failed)? {
                        break;
                    }
                    // Wait for the socket; a shutdown wakes this and the next
                    // splice sees the end of the stream.
                    sys::poll_one(sock, libc::POLLIN, -1).map_err(NotSpliced::Failed)?;
                }
                Err(e) if left == spliced && unsupported(&e) => {
                    pool.put(pipe);
                    return Err(NotSpliced::Unavailable(e));
                }
                Err(e) => return Err(NotSpliced::Failed(e)),
            }
        }
        payload.segments.push(Segment { pipe, len: filled });
    }
    payload.head = head.to_vec();
    if left > 0 {
        payload.tail = vec![0; left];
        let mut sock = File::from(sock.try_clone_to_owned().map_err(NotSpliced::Failed)?);
        sock.read_exact(&mut payload.tail)
            .map_err(NotSpliced::Failed)?;
    }
    Ok(payload)
}

/// Errors that mean this socket cannot be spliced from at all.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    fn payload(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u64 * 31 + u64::from(seed)) as u8 ^ (i >> 12) as u8)
            .collect()
    }

    /// Sends `data` in pieces of `piece` bytes (one socket buffer each), then
    /// `after`, from another thread.
    fn send(mut tx: UnixStream, data: Vec<u8>, piece: usize, after: &'static [u8]) {
        std::thread::spawn(move || {
            for chunk in data.chunks(piece) {
                tx.write_all(chunk).unwrap();
            }
            tx.write_all(after).unwrap();
        });
    }

    /// Receives `data`, of which the first `head` bytes were read already; checks
    /// that what follows it is still on the socket, writes it to a file at
    /// `offset` and checks the file.
    fn receive_and_write(data: Vec<u8>, head: usize, piece: usize) -> (usize, usize) {
        let (tx, mut rx) = UnixStream::pair().unwrap();
        let len = data.len();
        send(tx, data[head..].to_vec(), piece, b"NEXT");
        let pool = Arc::new(PipePool::default());
        let Ok(mut got) = receive(rx.as_fd(), &data[..head], len, &pool) else {
            panic!("receive failed");
        };
        assert_eq!(got.len(), len);
        let shape = (got.segments.len(), got.tail.len());
        let mut after = [0u8; 4];
        rx.read_exact(&mut after).unwrap();
        assert_eq!(&after, b"NEXT", "receive took bytes past the payload");

        let file = tempfile::tempfile().unwrap();
        let offset = 12_345u64;
        got.write_to(&file, offset).unwrap();
        drop(got);
        let mut back = vec![0u8; len];
        file.read_exact_at(&mut back, offset).unwrap();
        assert!(back == data, "the file differs from the payload");
        assert_eq!(file.metadata().unwrap().len(), offset + len as u64);
        // Every pipe was drained, so every pipe (up to the pool's size) is back.
        assert_eq!(
            pool.free.lock().unwrap().len(),
            shape.0.min(POOLED_PIPES),
            "drained pipes go back to the pool"
        );
        shape
    }

    #[test]
    fn a_payload_in_large_pieces_fits_one_pipe() {
        let (pipes, tail) = receive_and_write(payload(1 << 20, 1), 0, 64 * 1024);
        assert_eq!(tail, 0);
        assert!(pipes >= 1);
    }

    /// Every small send is its own socket buffer and takes a page reference of its
    /// own in the pipe: a pipe fills long before its byte size, and the payload
    /// moves on to more pipes. Without the full-pipe check this would hang.
    #[test]
    fn a_payload_in_small_pieces_fills_several_pipes() {
        let (pipes, tail) = receive_and_write(payload(96 * 1024, 2), 0, 100);
        assert!(pipes > 1, "{pipes} pipes for 96 KiB in 100-byte pieces");
        assert_eq!(tail, 0);
    }

    /// Past MAX_PIPES full pipes, the rest is read into memory.
    #[test]
    fn a_payload_past_every_pipe_ends_in_memory() {
        let (pipes, tail) = receive_and_write(payload(600 * 1024, 3), 0, 64);
        assert_eq!(pipes, MAX_PIPES);
        assert!(
            tail > 0,
            "600 KiB in 64-byte pieces should outgrow {MAX_PIPES} pipes"
        );
    }

    /// A TCP socket blocks in `splice` while it has no data (it ignores
    /// `SPLICE_F_NONBLOCK` on its side), but still stops at a full pipe.
    #[test]
    fn tcp_sockets_splice_too() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tx = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut rx, _) = listener.accept().unwrap();
        let pool = Arc::new(PipePool::default());
        let big = payload(3 << 20, 8);
        let small = payload(200 * 1024, 9);
        let (b, sm) = (big.clone(), small.clone());
        let sender = std::thread::spawn(move || {
            let mut tx = tx;
            tx.set_nodelay(true).unwrap();
            for chunk in b.chunks(128 * 1024) {
                tx.write_all(chunk).unwrap();
            }
            for chunk in sm.chunks(50) {
                tx.write_all(chunk).unwrap();
            }
            tx.write_all(b"NEXT").unwrap();
        });
        for want in [big, small] {
            let Ok(mut got) = receive(rx.as_fd(), &[], want.len(), &pool) else {
                panic!("receive failed");
            };
            assert!(got.to_vec().unwrap() == want, "the payload differs");
        }
        let mut after = [0u8; 4];
        rx.read_exact(&mut after).unwrap();
        assert_eq!(&after, b"NEXT");
        sender.join().unwrap();
    }

    /// The reader had part of the payload in its buffer already.
    #[test]
    fn a_payload_can_start_in_memory() {
        let (pipes, tail) = receive_and_write(payload(300 * 1024, 7), 4000, 32 * 1024);
        assert!(pipes >= 1);
        assert_eq!(tail, 0);
    }

    #[test]
    fn the_stream_ending_inside_a_payload_is_an_error() {
        let (mut tx, rx) = UnixStream::pair().unwrap();
        let sender = std::thread::spawn(move || {
            tx.write_all(&payload(200_000, 4)).unwrap();
            // Then the stream ends.
        });
        let pool = Arc::new(PipePool::default());
        match receive(rx.as_fd(), &[], 300_000, &pool) {
            Err(NotSpliced::Failed(e)) => {
                assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
                assert!(e.to_string().contains("100000 bytes before the end"), "{e}");
            }
            other => panic!("expected an end-of-stream error, got {other:?}"),
        }
        sender.join().unwrap();
        // The pipes that hold part of the payload are closed, not pooled.
        assert_eq!(pool.free.lock().unwrap().len(), 0);
    }

    /// Pipes the kernel will not size (here an invalid size; in practice a lower
    /// `pipe-max-size` or the per-user pipe limit): nothing is taken off the
    /// socket, and the payload can be read the usual way.
    #[test]
    fn no_full_size_pipe_means_no_splicing() {
        let (tx, mut rx) = UnixStream::pair().unwrap();
        let data = payload(300 * 1024, 10);
        send(tx, data.clone(), 64 * 1024, b"");
        let pool = Arc::new(PipePool {
            free: Mutex::default(),
            size: -1,
        });
        match receive(rx.as_fd(), &[], data.len(), &pool) {
            Err(NotSpliced::Unavailable(e)) => {
                assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}")
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
        let mut back = vec![0u8; data.len()];
        rx.read_exact(&mut back).unwrap();
        assert!(
            back == data,
            "the payload must still be on the socket, whole"
        );
    }

    /// A failed write leaves bytes in a pipe; the pipe is closed rather than
    /// handing them to the next payload.
    #[test]
    fn a_pipe_with_bytes_left_is_not_reused() {
        let (tx, rx) = UnixStream::pair().unwrap();
        send(tx, payload(256 * 1024, 5), 64 * 1024, b"");
        let pool = Arc::new(PipePool::default());
        let Ok(mut got) = receive(rx.as_fd(), &[], 256 * 1024, &pool) else {
            panic!("receive failed");
        };
        let dir = tempfile::tempdir().unwrap();
        let read_only = std::fs::File::create(dir.path().join("f"))
            .and_then(|_| std::fs::File::open(dir.path().join("f")))
            .unwrap();
        let e = got.write_to(&read_only, 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{e}");
        drop(got);
        assert_eq!(pool.free.lock().unwrap().len(), 0);
    }

    #[test]
    fn a_payload_can_be_read_into_memory() {
        let (tx, rx) = UnixStream::pair().unwrap();
        let data = payload(700 * 1024, 6);
        send(tx, data.clone(), 1000, b"");
        let pool = Arc::new(PipePool::default());
        let Ok(mut got) = receive(rx.as_fd(), &[], data.len(), &pool) else {
            panic!("receive failed");
        };
        assert!(got.segments.len() > 1 || !got.tail.is_empty());
        assert!(got.to_vec().unwrap() == data);
    }
}
