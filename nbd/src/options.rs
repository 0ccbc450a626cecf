//! [`ServerOptions`]: how an NBD server runs, shared by the listeners, the
//! handshake and the transmission phase of every connection.

use std::time::Duration;

/// How the server runs; one value is shared by all connections.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Name the export of the single-backend servers ([`serve`], [`serve_unix`],
    /// [`serve_tcp`]) answers to, besides the default (empty) name. Not used by
    /// [`serve_tls_tcp`], whose [`ExportResolver`] knows the names.
    ///
    /// [`serve`]: crate::serve
    /// [`serve_unix`]: crate::serve_unix
    /// [`serve_tcp`]: crate::serve_tcp
    /// [`serve_tls_tcp`]: crate::serve_tls_tcp
    /// [`ExportResolver`]: crate::ExportResolver
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
    /// [`limits`](crate::limits)). Raised to at least one.
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
