//! Replies, for both readers: one answered request (`Reply`), where a connection's
//! replies go (`ReplySink`), and `Replies`, which writes those that complete
//! together in one batch (a large read's data with a vectored write).

use std::io::{self, IoSlice};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::OwnedSemaphorePermit;

use crate::buffers::PooledBuf;
use crate::proto::{self, Errno};

/// Read payloads up to this size are copied into the reply batch; larger ones go
/// out with a vectored write.
const INLINE_PAYLOAD: usize = 64 * 1024;
/// Encoded replies are written out once this much has collected.
const WRITE_BATCH: usize = 256 * 1024;

/// One reply on its way to the writer. Dropping it returns its buffer to the pool
/// and its budget to the semaphore.
pub(crate) struct Reply {
    pub(crate) cookie: u64,
    pub(crate) body: ReplyBody,
    _permit: OwnedSemaphorePermit,
}

impl Reply {
    pub(crate) fn new(cookie: u64, body: ReplyBody, permit: OwnedSemaphorePermit) -> Self {
        Reply {
            cookie,
            body,
            _permit: permit,
        }
    }
}

pub(crate) enum ReplyBody {
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

/// Where a connection's replies go; written from the I/O threads, which block.
pub(crate) trait ReplySink: Send {
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
pub(crate) struct Replies<S> {
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

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<S: ReplySink> Replies<S> {
    pub(crate) fn new(wr: S, structured: bool) -> Self {
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

    pub(crate) fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Queues a reply and writes whatever is queued unless another thread already
    /// is. Blocks on the socket: call it from a blocking thread. With `on_block`,
    /// writes to a plain socket do not block at first: `on_block` is called before
    /// the first write that would.
    pub(crate) fn submit(&self, reply: Reply, mut on_block: Option<&mut dyn FnMut()>) {
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
    pub(crate) fn finish(&self) -> (Option<S>, Option<io::Error>) {
        let mut sink = lock(&self.sink);
        (sink.wr.take(), sink.error.take())
    }
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
