//! The NBD server: exports one [`Backend`] to any number of clients, or, over TLS,
//! many exports chosen by name.
//!
//! This file holds the listeners and takes each connection from its handshake to its
//! transmission phase; the parts live in the files named below.
//!
//! A connection goes through the fixed newstyle handshake (`greet` and `haggle`, on
//! tokio; [`crate::handshake`]) and then the transmission phase, where many requests
//! are in flight at once:
//!
//! - one reader takes requests off the stream in order and checks each one; a
//!   write's payload is read into a pooled buffer first (`BufferPool`, in
//!   `buffers.rs`), because the next request header follows it on the wire (on a
//!   plain socket, a large payload is spliced into pipes instead, for a backend
//!   that takes them: see [`super::splice`]);
//! - each request then runs on one of the connection's I/O threads (`pread`,
//!   `pwrite`, `fdatasync`...; see `Workers` in `workers.rs`), so one slow flush
//!   does not hold up the reads queued behind it, and no tokio worker ever blocks
//!   on the disk;
//! - the thread that ran a request also sends its reply (`Replies`, in
//!   `replies.rs`): replies go out in the order requests complete (the cookie tells
//!   the client which is which), replies that complete together share one `write`,
//!   and a large read's header and data go out with one vectored write.
//!
//! The reader depends on the stream. A plain Unix or TCP socket ([`serve_unix`],
//! [`serve_tcp`]) leaves tokio after the handshake: its reader is a blocking thread
//! (`transmit_blocking`, in `blocking.rs`), which hands requests straight to the
//! I/O threads and runs small reads and writes itself while the page cache answers
//! them in microseconds (`Inline`). A small request so costs no thread hand-off at
//! all, and no request goes through an event loop; this is what keeps up with
//! nbdkit, which serves a connection the same way. Any other stream ([`serve`], and
//! TLS) is read by a tokio task (`transmit`). Everything after the reading is
//! shared (`Session`; both in `transmission.rs`, with the checks and the execution
//! of each request). What an export is served from is a [`Backend`]
//! ([`crate::backend`]).
//!
//! Exports: the single-backend servers ([`serve`], [`serve_unix`], [`serve_tcp`])
//! answer to the empty name and [`ServerOptions::export_name`]. [`serve_tls_tcp`]
//! requires TLS: before `NBD_OPT_STARTTLS` every option but `NBD_OPT_ABORT` gets
//! `NBD_REP_ERR_TLS_REQD`; after the ACK the TLS handshake runs on the same socket
//! (the caller's `rustls::ServerConfig` decides which client certificates pass),
//! haggling goes on inside TLS, and every option that names an export (`GO`,
//! `INFO`, `EXPORT_NAME`, `LIST_META_CONTEXT`, `SET_META_CONTEXT`) asks an
//! [`ExportResolver`], which sees the client's certificates and may refuse
//! ([`Refusal`](crate::Refusal): `NBD_REP_ERR_UNKNOWN` or `NBD_REP_ERR_POLICY`).
//! Both kinds share one negotiation: the single backend is a trivial resolver
//! (`SingleExport`).
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

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::NbdError;
use crate::backend::Backend;
use crate::blocking::{PlainStream, transmit_blocking};
use crate::conn::READ_BUFFER;
use crate::handshake::{
    Client, ExportResolver, HANDSHAKE_BUFFER, SingleExport, handshake, starttls,
};
use crate::limits::{self, ConnectionLimit};
pub use crate::options::ServerOptions;
use crate::transmission::transmit;

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
/// else: the handshake with its TLS upgrade ([`starttls`]), then the transmission
/// phase on tokio (`transmit`). Everything before the transmission phase shares one
/// [`ServerOptions::handshake_timeout`].
async fn serve_starttls<S>(
    stream: S,
    peer: &str,
    acceptor: tokio_rustls::TlsAcceptor,
    exports: Arc<dyn ExportResolver>,
    opts: Arc<ServerOptions>,
    shutdown: CancellationToken,
) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let shaken = starttls(stream, peer, &acceptor, exports, &shutdown);
    let Some((rd, wr, conn)) = limits::within(opts.handshake_timeout, shaken).await? else {
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
    pub(crate) fn new(opts: &ServerOptions) -> Self {
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
