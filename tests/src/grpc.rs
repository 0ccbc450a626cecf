//! Raw clients: gRPC with any fleet certificate (to send what the real agent never
//! would), and a bare TLS client that presents no certificate at all.

use bulwark_common::telemetry::TracedChannel;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bulwark_common::config::TlsFiles;
use bulwark_common::tls::{Role, Target, TlsIdentity};
use bulwark_proto::coordinator_client::CoordinatorClient;
use bulwark_proto::node_client::NodeClient;
use bulwark_proto::{SyncMessage, SyncReply, sync_message, sync_reply};
use tokio::io::AsyncReadExt;
use tonic::Status;

/// Largest message the raw clients send or accept.
const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// A channel to `url` (`https://host:port`) as the holder of `id`, to a server whose
/// certificate has role `server_role`.
pub async fn channel(url: &str, id: &TlsFiles, server_role: Role) -> Result<TracedChannel, String> {
    let tls = TlsIdentity::load(id).map_err(|e| e.to_string())?;
    let cfg = tls.client_config(server_role).map_err(|e| e.to_string())?;
    let target = Target::parse(url).map_err(|e| e.to_string())?;
    bulwark_common::tls::channel(&target, cfg)
        .await
        .map_err(|e| e.to_string())
}

/// A Node client for the node at `url`, as the holder of `id`.
pub async fn node_client(url: &str, id: &TlsFiles) -> NodeClient<TracedChannel> {
    let ch = channel(url, id, Role::Node)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to node {url} as {}: {e}", id.cert.display()));
    NodeClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

/// A Coordinator client for `url`, as the holder of `id`.
pub async fn coordinator_client(url: &str, id: &TlsFiles) -> CoordinatorClient<TracedChannel> {
    let ch = channel(url, id, Role::Coordinator)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot connect to coordinator {url} as {}: {e}",
                id.cert.display()
            )
        });
    CoordinatorClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

/// How a raw `Node.Sync` exchange ended.
#[derive(Debug)]
pub struct SyncExchange {
    /// Every reply the node sent, in order.
    pub replies: Vec<SyncReply>,
    /// The status the stream ended with, `None` if it ended cleanly.
    pub status: Option<Status>,
}

impl SyncExchange {
    /// The error status; panics (showing the replies) if the stream ended cleanly.
    pub fn expect_error(&self, what: &str) -> &Status {
        self.status.as_ref().unwrap_or_else(|| {
            panic!(
                "{what}: the node accepted the sync; replies: {:?}",
                self.replies
            )
        })
    }

    /// Whether the node acknowledged a commit.
    pub fn committed(&self) -> bool {
        self.replies
            .iter()
            .any(|r| matches!(r.msg, Some(sync_reply::Msg::Committed(_))))
    }
}

/// Runs one `Node.Sync` stream: sends `begin`; if the node answers `Ready`, sends
/// `rest` and closes the request stream; collects replies until the stream ends.
/// Panics if the exchange takes longer than `timeout`.
pub async fn sync_exchange(
    client: &mut NodeClient<TracedChannel>,
    begin: bulwark_proto::SyncBegin,
    rest: Vec<SyncMessage>,
    timeout: Duration,
) -> SyncExchange {
    let run = async {
        let (tx, rx) = tokio::sync::mpsc::channel::<SyncMessage>(rest.len() + 2);
        tx.send(SyncMessage {
            msg: Some(sync_message::Msg::Begin(begin)),
        })
        .await
        .expect("the request stream is open");
        let mut replies = Vec::new();
        let mut stream = match client
            .sync(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(status) => {
                return SyncExchange {
                    replies,
                    status: Some(status),
                };
            }
        };
        let mut tx = Some(tx);
        let mut rest = Some(rest);
        loop {
            match stream.message().await {
                Ok(Some(reply)) => {
                    let ready = matches!(reply.msg, Some(sync_reply::Msg::Ready(_)));
                    replies.push(reply);
                    if ready && let (Some(tx), Some(rest)) = (tx.take(), rest.take()) {
                        for m in rest {
                            if tx.send(m).await.is_err() {
                                break;
                            }
                        }
                        // tx drops here: the request stream ends.
                    }
                }
                Ok(None) => {
                    return SyncExchange {
                        replies,
                        status: None,
                    };
                }
                Err(status) => {
                    return SyncExchange {
                        replies,
                        status: Some(status),
                    };
                }
            }
        }
    };
    tokio::time::timeout(timeout, run)
        .await
        .unwrap_or_else(|_| panic!("Node.Sync exchange did not end within {timeout:?}"))
}

/// What a TLS client without a certificate saw.
#[derive(Debug)]
pub enum TlsProbe {
    /// The handshake itself failed.
    HandshakeFailed(String),
    /// The handshake completed (TLS 1.3 clients finish before the server checks their
    /// certificate) and the first read failed.
    ReadFailed(String),
    /// The handshake completed and the server closed the connection without data.
    Closed,
    /// The server sent application data: it accepted the connection.
    Accepted(usize),
}

/// Connects to `127.0.0.1:port` with TLS 1.3, trusting the CA in `ca_pem` but
/// presenting no client certificate, then reads once (an accepting HTTP/2 server
/// speaks first: its SETTINGS frame). Panics if the read neither fails nor returns
/// within `timeout`.
pub async fn probe_without_client_cert(port: u16, ca_pem: &Path, timeout: Duration) -> TlsProbe {
    let pem =
        std::fs::read(ca_pem).unwrap_or_else(|e| panic!("cannot read {}: {e}", ca_pem.display()));
    let mut roots = rustls::RootCertStore::empty();
    for c in bulwark_common::tls::parse_certs_pem(&pem)
        .unwrap_or_else(|e| panic!("{}: {e}", ca_pem.display()))
    {
        roots
            .add(c)
            .expect("the CA certificate is usable as a root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3 is supported")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let run = async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap_or_else(|e| panic!("cannot connect to 127.0.0.1:{port}: {e}"));
        let name =
            rustls::pki_types::ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into());
        let mut tls = match connector.connect(name, tcp).await {
            Ok(t) => t,
            Err(e) => return TlsProbe::HandshakeFailed(e.to_string()),
        };
        let mut buf = [0u8; 1024];
        match tls.read(&mut buf).await {
            Ok(0) => TlsProbe::Closed,
            Ok(n) => TlsProbe::Accepted(n),
            Err(e) => TlsProbe::ReadFailed(e.to_string()),
        }
    };
    tokio::time::timeout(timeout, run).await.unwrap_or_else(|_| {
        panic!("a TLS client without a certificate got neither data nor an error from port {port} within {timeout:?}")
    })
}
