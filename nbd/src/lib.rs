//! The NBD (Network Block Device) protocol: a server that exports a [`Backend`] to
//! qemu, nbdkit clients or the kernel, and a blocking client that reads exports
//! (including qemu's dirty bitmaps) from qemu-nbd or from our own server. Used by the
//! agent (its exports and the qcow2 tracker) and the storage node (mounts).
//!
//! - [`proto`] — constants and the encoding and decoding of every fixed-layout
//!   message (pure), with [`proto::DecodeError`].
//! - [`server`] — the listeners ([`serve_unix`], [`serve_tcp`], [`serve_tls_tcp`])
//!   and how a connection goes from handshake to transmission.
//! - [`handshake`] — greeting and option haggling (with `NBD_OPT_STARTTLS`), and the
//!   [`ExportResolver`] that finds or refuses an export ([`Refusal`]).
//! - `options` — [`ServerOptions`], how a server runs.
//! - `conn` — what a connection negotiated (`Conn`), shared by the handshake and
//!   the transmission phase.
//! - `transmission` — the transmission phase both readers share: checking and
//!   running requests, the session that hands them to I/O threads, the tokio reader.
//! - `blocking` — the reader of a plain Unix or TCP socket on a blocking thread.
//! - `replies` — the replies, written batched from the I/O threads.
//! - `workers` — the threads that run one connection's requests.
//! - `buffers` — the pool of one connection's payload buffers.
//! - [`backend`] — the [`Backend`] trait and the file/block-device [`FileBackend`]
//!   (its system calls in `backend::sys`).
//! - [`splice`] — large write payloads moved through pipes instead of copied.
//! - [`client`] — the blocking [`Client`] used from a reader thread.
//! - [`limits`] — the connection cap and the handshake deadline of every listener.
//! - `fuzzing` — entry points of the fuzz targets in `fuzz/` (hidden).
//!
//! What is implemented follows the protocol document (NetworkBlockDevice/nbd,
//! `doc/proto.md`): fixed newstyle only, structured replies, `base:allocation`
//! block status, TLS required by [`serve_tls_tcp`] (`NBD_OPT_STARTTLS`, with
//! exports chosen by name through an [`ExportResolver`]) and refused by the other
//! servers (`NBD_REP_ERR_POLICY`), no extended headers. The client speaks no TLS.

pub mod backend;
mod blocking;
mod buffers;
pub mod client;
mod conn;
#[doc(hidden)]
pub mod fuzzing;
pub mod handshake;
pub mod limits;
mod options;
pub mod proto;
mod replies;
pub mod server;
pub mod splice;
mod transmission;
mod workers;

pub use backend::{Backend, FileBackend};
pub use client::Client;
pub use handshake::{ExportResolver, Refusal, client_identity};
pub use options::ServerOptions;
pub use proto::Errno;
pub use server::{serve, serve_tcp, serve_tls_tcp, serve_unix, serve_until};
pub use splice::Spliced;

/// Everything that can go wrong on an NBD connection, on either side.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The socket (or the backing file during the handshake) failed.
    #[error("NBD I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The peer broke the protocol; the connection cannot be used any more.
    #[error("NBD protocol violation: {0}")]
    Protocol(String),
    /// The peer sent a message that does not decode (bad magic, lengths that do
    /// not add up, a string that is not UTF-8); like [`NbdError::Protocol`], the
    /// connection cannot be used any more.
    #[error("NBD protocol violation: {0}")]
    Malformed(#[from] proto::DecodeError),
    /// The server answered a command with an error.
    #[error("NBD server error {errno} on {command}{}", message_suffix(.message))]
    Server {
        /// What was asked, e.g. `READ of 4096 bytes at offset 65536`.
        command: String,
        /// The error the server sent.
        errno: Errno,
        /// The server's message, empty when it sent none (simple replies).
        message: String,
    },
    /// Option haggling failed: no such export, a context the server does not offer,
    /// a feature the server refused.
    #[error("NBD negotiation failed: {0}")]
    Negotiation(String),
    /// The caller asked for something this connection cannot do (an unknown
    /// metadata context, a range that overflows).
    #[error("invalid NBD request: {0}")]
    InvalidRequest(String),
    /// An earlier failure left the connection unusable.
    #[error("NBD connection unusable after an earlier error: {0}")]
    Broken(String),
}

fn message_suffix(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_error_display() {
        let e = NbdError::Server {
            command: "READ of 512 bytes at offset 0".into(),
            errno: Errno::EINVAL,
            message: "beyond the end".into(),
        };
        assert_eq!(
            e.to_string(),
            "NBD server error EINVAL (22) on READ of 512 bytes at offset 0: beyond the end"
        );
        let e = NbdError::Server {
            command: "FLUSH".into(),
            errno: Errno::EIO,
            message: String::new(),
        };
        assert_eq!(e.to_string(), "NBD server error EIO (5) on FLUSH");
    }
}
