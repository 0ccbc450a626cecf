//! The transmission phase of a plain Unix or TCP socket, on blocking threads: the
//! socket taken out of tokio (`PlainSocket`), the thread reading requests
//! (`Reader`, write payloads spliced into pipes when large), and the small requests
//! it runs itself instead of handing them off (`Inline`).

use std::io::{self, BufRead, IoSlice, Read};
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::NbdError;
use crate::backend::sys;
use crate::conn::{Conn, READ_BUFFER};
use crate::options::ServerOptions;
use crate::proto::{self, Request};
use crate::replies::{ReplySink, lock};
use crate::splice::{self, NotSpliced};
use crate::transmission::{
    Incoming, Payload, Session, admit, answer, client_gone, replies_outcome, vet,
};

/// Write payloads from this size on are read past the socket read buffer (see
/// `Reader::read_request`).
pub(crate) const LARGE_PAYLOAD: usize = READ_BUFFER / 2;

/// A stream that can leave tokio for blocking threads after the handshake: the
/// plain sockets that [`serve_unix`](crate::serve_unix) and
/// [`serve_tcp`](crate::serve_tcp) accept.
pub(crate) trait PlainStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
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
pub(crate) enum PlainSocket {
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
pub(crate) async fn transmit_blocking(
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

    pub(crate) fn run(self: &Arc<Self>) {
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
pub(crate) struct Inline {
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

    pub(crate) fn new() -> Inline {
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
    pub(crate) fn wants(&mut self, req: &Request, refused: bool) -> bool {
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
    pub(crate) fn ran(&mut self, req: &Request, elapsed: Duration) {
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
