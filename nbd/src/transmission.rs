//! The transmission phase both readers share: admitting, checking and running
//! requests (`admit`, `check`, `execute`) of a negotiated connection (`Conn`, in
//! [`crate::conn`]), the `Session` that hands them to I/O threads, and the reader of
//! any tokio stream (`transmit`; plain sockets are read in [`crate::blocking`]).

use std::io::{self, IoSlice};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::NbdError;
use crate::backend::MAX_EXTENTS;
use crate::buffers::{BufferPool, PooledBuf};
use crate::conn::{BASE_ALLOCATION_ID, Conn};
use crate::options::ServerOptions;
use crate::proto::{self, Errno, Request};
use crate::replies::{Replies, Reply, ReplyBody, ReplySink};
use crate::splice::{PipePool, Spliced};
use crate::workers::Workers;

/// Budget charged per request on top of its payload, so that many small requests
/// are bounded too.
const REQUEST_OVERHEAD: usize = 16 * 1024;
/// Threads running one connection's writes without FUA (see `Session`). One: with
/// two, a second `pwrite` into the same file waited on the inode's lock by
/// spinning on its owner (`rwsem_spin_on_owner`, 11% of the server's samples for
/// 1 GiB of 1 MiB writes), CPU time taken from the thread reading requests.
const WRITE_THREADS: usize = 1;

/// A request read off the wire with its payload and its share of the budget:
/// everything an I/O thread needs to answer it.
pub(crate) struct Incoming {
    pub(crate) req: Request,
    /// A write's payload.
    pub(crate) data: Option<Payload>,
    /// The error reply of a well-framed but invalid request.
    pub(crate) checked: Result<(), RequestError>,
    pub(crate) permit: OwnedSemaphorePermit,
}

/// A write's payload, as it was read.
pub(crate) enum Payload {
    Buffered(PooledBuf),
    /// Still in pipes: see [`super::splice`].
    Spliced(Spliced),
}

/// Bytes one connection may have in flight: the option, raised to at least one
/// maximum-size request.
pub(crate) fn budget_bytes(opts: &ServerOptions) -> u32 {
    let bytes = opts.max_in_flight_bytes.clamp(
        proto::MAX_PAYLOAD as usize + REQUEST_OVERHEAD,
        u32::MAX as usize,
    );
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

/// Decodes a request header: the request and the budget it takes, `None` for
/// `NBD_CMD_DISC`, an error for a violation that leaves the stream out of sync.
pub(crate) fn admit(
    hdr: &[u8; Request::LEN],
    budget_bytes: u32,
) -> Result<Option<(Request, u32)>, NbdError> {
    let req = Request::decode(hdr)?;
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
pub(crate) fn vet(req: &Request, conn: &Conn) -> Result<(), RequestError> {
    let checked = check(req, conn);
    if let Err(e) = &checked {
        tracing::debug!(
            cookie = req.cookie,
            "refusing {} at {}+{}: {}: {e}",
            proto::command_name(req.typ),
            req.offset,
            req.len,
            e.errno()
        );
    }
    checked
}

/// Runs one request on an I/O thread and returns its reply. A panicking backend
/// costs the client an `EIO`, not the connection.
pub(crate) fn answer(conn: &Conn, pool: &Arc<BufferPool>, incoming: Incoming) -> Reply {
    let Incoming {
        req,
        data,
        checked,
        permit,
    } = incoming;
    let body = match checked {
        Err(e) => ReplyBody::Error {
            errno: e.errno(),
            message: e.to_string(),
        },
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
    Reply::new(req.cookie, body, permit)
}

/// The end of a connection whose requests were read without error, given how its
/// replies went: a client that hung up before reading them all is not an error.
pub(crate) fn replies_outcome(written: Option<io::Error>) -> Result<(), NbdError> {
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
pub(crate) fn client_gone(e: &io::Error) -> bool {
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

// ---- The session and its I/O threads ----

/// What the transmission phase of one connection shares with its I/O threads.
pub(crate) struct Session<S> {
    pub(crate) conn: Arc<Conn>,
    pub(crate) pool: Arc<BufferPool>,
    /// Pipes for spliced write payloads (plain sockets only).
    pub(crate) pipes: Arc<PipePool>,
    pub(crate) replies: Replies<S>,
    /// Every request in flight holds its cost until its reply is written (or
    /// dropped because the socket failed).
    pub(crate) budget: Arc<Semaphore>,
    pub(crate) budget_bytes: u32,
    /// Threads for everything but plain writes.
    pub(crate) workers: Workers,
    /// Threads for writes without FUA, at most [`WRITE_THREADS`]. They only copy
    /// into the page cache, one file's writes are serialised on its inode lock,
    /// and requests are read one at a time: more threads would only spin on the
    /// lock and take CPU time from the reading.
    writes: Workers,
}

impl<S: ReplySink + 'static> Session<S> {
    /// Call from within the runtime.
    pub(crate) fn new(
        conn: Arc<Conn>,
        sink: S,
        opts: &ServerOptions,
        max_threads: usize,
    ) -> Arc<Self> {
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
    pub(crate) fn dispatch(self: &Arc<Self>, incoming: Incoming) {
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
    pub(crate) async fn answered(&self) {
        let _all = self.budget.acquire_many(self.budget_bytes).await;
    }
}

// ---- Checking and running one request ----

/// Why a well-framed request is refused: the error reply the client gets (the errno
/// from [`RequestError::errno`], this text as the message); the connection goes on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RequestError {
    /// A command type this server does not implement.
    #[error("command {name} ({typ}) is not supported")]
    Unsupported { name: &'static str, typ: u16 },
    /// Flags the command does not take.
    #[error("flags {flags:#x} are not valid for {name}")]
    BadFlags { name: &'static str, flags: u16 },
    /// A write, trim or write-zeroes to a read-only export.
    #[error("the export is read-only")]
    ReadOnly,
    /// `NBD_CMD_BLOCK_STATUS` without a metadata context.
    #[error("no metadata context was negotiated")]
    NoContext,
    /// `NBD_CMD_BLOCK_STATUS` of no bytes.
    #[error("BLOCK_STATUS of zero bytes")]
    EmptyBlockStatus,
    /// A read past the largest payload advertised.
    #[error(
        "READ of {len} bytes exceeds the maximum payload of {} bytes",
        proto::MAX_PAYLOAD
    )]
    ReadTooLarge { len: u32 },
    /// A range that runs past the end of the export (or overflows).
    #[error(
        "{name} of {len} bytes at offset {offset} is beyond the end of the export ({size} bytes)"
    )]
    BeyondEnd {
        name: &'static str,
        typ: u16,
        len: u32,
        offset: u64,
        size: u64,
    },
}

impl RequestError {
    /// The error the reply carries.
    pub(crate) fn errno(&self) -> Errno {
        match self {
            RequestError::ReadOnly => Errno::EPERM,
            RequestError::ReadTooLarge { .. } => Errno::EOVERFLOW,
            // The protocol asks for ENOSPC when a write runs off the end.
            RequestError::BeyondEnd { typ, .. }
                if matches!(*typ, proto::CMD_WRITE | proto::CMD_WRITE_ZEROES) =>
            {
                Errno::ENOSPC
            }
            RequestError::Unsupported { .. }
            | RequestError::BadFlags { .. }
            | RequestError::NoContext
            | RequestError::EmptyBlockStatus
            | RequestError::BeyondEnd { .. } => Errno::EINVAL,
        }
    }
}

/// Checks a well-framed request against the export; `Err` is the error reply.
fn check(req: &Request, conn: &Conn) -> Result<(), RequestError> {
    let name = proto::command_name(req.typ);
    // FUA is valid on every command once advertised (and harmless when read-only).
    let allowed = proto::CMD_FLAG_FUA
        | match req.typ {
            proto::CMD_READ | proto::CMD_WRITE | proto::CMD_FLUSH | proto::CMD_TRIM => 0,
            proto::CMD_WRITE_ZEROES => proto::CMD_FLAG_NO_HOLE,
            proto::CMD_BLOCK_STATUS => proto::CMD_FLAG_REQ_ONE,
            t => return Err(RequestError::Unsupported { name, typ: t }),
        };
    if req.flags & !allowed != 0 {
        return Err(RequestError::BadFlags {
            name,
            flags: req.flags & !allowed,
        });
    }
    let writes = matches!(
        req.typ,
        proto::CMD_WRITE | proto::CMD_TRIM | proto::CMD_WRITE_ZEROES
    );
    if writes && conn.read_only {
        return Err(RequestError::ReadOnly);
    }
    if req.typ == proto::CMD_FLUSH {
        return Ok(());
    }
    if req.typ == proto::CMD_BLOCK_STATUS {
        if conn.base_allocation.is_none() {
            return Err(RequestError::NoContext);
        }
        if req.len == 0 {
            return Err(RequestError::EmptyBlockStatus);
        }
    }
    if req.typ == proto::CMD_READ && req.len > proto::MAX_PAYLOAD {
        return Err(RequestError::ReadTooLarge { len: req.len });
    }
    match req.end() {
        Some(end) if end <= conn.size => Ok(()),
        _ => Err(RequestError::BeyondEnd {
            name,
            typ: req.typ,
            len: req.len,
            offset: req.offset,
            size: conn.size,
        }),
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
pub(crate) fn clamp_extents(ext: &[(u64, u32)], len: u64, req_one: bool) -> Vec<(u32, u32)> {
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

// ---- The reader of any tokio stream ----

pub(crate) async fn transmit<R, W>(
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

pub(crate) async fn write_all_vectored<W: AsyncWrite + Unpin>(
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
