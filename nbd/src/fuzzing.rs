//! Entry points of the fuzz targets in `fuzz/` (cargo-fuzz, libFuzzer): the
//! server's parsing of a client's bytes, driven in-process from a byte slice
//! instead of a socket. Not part of the crate's API (hidden from its docs); the
//! server's own code paths are used unchanged.

use std::io::{self, IoSlice};
use std::sync::Arc;

use tokio::io::BufReader;
use tokio::sync::Semaphore;

use crate::NbdError;
use crate::backend::Backend;
use crate::buffers::BufferPool;
use crate::conn::{BASE_ALLOCATION_ID, Conn};
use crate::handshake::{HANDSHAKE_BUFFER, SingleExport};
use crate::options::ServerOptions;
use crate::proto::{self, Request};
use crate::replies::{Replies, ReplySink};
use crate::transmission::{Incoming, Payload, admit, answer, budget_bytes, vet};

/// The handshake after the server's greeting: `client` is everything the client
/// sends (its flags, then options), the export is `backend` under the empty name
/// and `"fuzz"`. With `tls_required`, haggling runs as on a TLS listener before
/// STARTTLS. `Ok(true)` when an export was chosen (or STARTTLS acknowledged).
/// Call within a tokio runtime (exports are looked up on a blocking thread).
pub async fn handshake(
    client: &[u8],
    backend: Arc<dyn Backend>,
    tls_required: bool,
) -> Result<bool, NbdError> {
    let opts = ServerOptions {
        export_name: "fuzz".into(),
        ..ServerOptions::default()
    };
    let exports = SingleExport::resolver(backend, &opts);
    let mut rd = BufReader::with_capacity(HANDSHAKE_BUFFER, client);
    let mut wr = tokio::io::sink();
    crate::handshake::fuzz_haggle(&mut rd, &mut wr, exports, tls_required).await
}

/// What a fuzzed connection negotiated before its transmission phase.
#[derive(Debug, Clone, Copy)]
pub struct Negotiated {
    /// Structured replies.
    pub structured: bool,
    /// `base:allocation` selected.
    pub base_allocation: bool,
}

/// The transmission phase: `requests` is everything the client sends (request
/// headers, each write followed by its payload), read, checked and run one at a
/// time on this thread against `backend`, the replies encoded into memory. Stops
/// at `NBD_CMD_DISC`, at the end of the bytes (a truncated header or payload is a
/// client that went away) or at a protocol violation (the error). Returns the
/// bytes of replies written.
pub fn requests(
    requests: &[u8],
    backend: Arc<dyn Backend>,
    negotiated: Negotiated,
) -> Result<usize, NbdError> {
    let conn = Conn {
        size: backend.size(),
        read_only: backend.read_only(),
        backend,
        structured: negotiated.structured,
        base_allocation: negotiated.base_allocation.then_some(BASE_ALLOCATION_ID),
    };
    let budget_bytes = budget_bytes(&ServerOptions::default());
    let budget = Arc::new(Semaphore::new(budget_bytes as usize));
    let pool = Arc::new(BufferPool::default());
    let replies = Replies::new(Memory::default(), conn.structured);
    let mut rest = requests;
    while let Some((hdr, tail)) = rest.split_first_chunk::<{ Request::LEN }>() {
        rest = tail;
        let Some((req, cost)) = admit(hdr, budget_bytes)? else {
            break;
        };
        // One request at a time: each reply is written before the next is read.
        let permit = Arc::clone(&budget)
            .try_acquire_many_owned(cost)
            .map_err(|e| NbdError::Protocol(format!("request budget: {e}")))?;
        let data = if req.typ == proto::CMD_WRITE {
            let len = req.len as usize;
            let Some((payload, tail)) = rest.split_at_checked(len) else {
                break;
            };
            rest = tail;
            let mut buf = pool.get(len);
            buf.copy_from_slice(payload);
            Some(Payload::Buffered(buf))
        } else {
            None
        };
        let incoming = Incoming {
            checked: vet(&req, &conn),
            req,
            data,
            permit,
        };
        replies.submit(answer(&conn, &pool, incoming), None);
    }
    match replies.finish() {
        (_, Some(e)) => Err(e.into()),
        (Some(sink), None) => Ok(sink.0),
        (None, None) => Ok(0),
    }
}

/// A reply sink that counts the bytes and drops them.
#[derive(Default)]
struct Memory(usize);

impl ReplySink for Memory {
    fn write_all_vectored(
        &mut self,
        bufs: &mut [IoSlice<'_>],
        _on_block: &mut Option<&mut dyn FnMut()>,
    ) -> io::Result<()> {
        self.0 += bufs.iter().map(|b| b.len()).sum::<usize>();
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
