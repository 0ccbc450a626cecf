//! The fleet's mutual TLS.
//!
//! Every Bulwark connection is TLS 1.3 with a client certificate, both signed by the
//! fleet CA. A process's identity is the URI SAN of its certificate,
//! `spiffe://<trust-domain>/<role>/<name>`; servers take the caller's role and name from
//! the peer certificate only (the access layer, [`crate::access::AccessLayer`], checks
//! the method's roles and puts an [`Identity`] into each request's extensions) and
//! every handler states the roles it serves again with [`require`]. Clients check the
//! server's certificate chain and host name as usual, and also that the server has
//! the role they meant to reach (an agent will not send a volume to a process holding
//! an agent certificate) and, where they know it, its name (an agent sends a volume
//! only to the node the coordinator assigned). Both sides refuse certificates the
//! fleet's revocation list revokes ([`crate::revocation`]).

use crate::telemetry::TracedChannel;
use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Endpoint, Uri};
use tonic::{Request, Status};

use crate::config::TlsFiles;
use crate::pki::PkiError;
use crate::revocation::{Revocations, Tracked};

/// The metadata key of the leader hint (ASCII): the leader's `https://host:port`, or
/// empty when the answering coordinator knows no leader.
pub const LEADER_METADATA: &str = "bulwark-leader";

pub use crate::pki::{
    CertError, Identity, Role, UnknownRole, dns_and_ip_sans, not_after_ms, not_before_ms,
    parse_certs_pem, spiffe_uri,
};

/// When the caller's certificate expires (Unix ms), put in a request's extensions by
/// the access layer.
#[derive(Debug, Clone, Copy)]
pub struct CertExpiry(pub i64);

/// The caller's certificate expiry, if the access layer recorded it.
pub fn cert_expiry<T>(req: &Request<T>) -> Option<i64> {
    req.extensions().get::<CertExpiry>().map(|e| e.0)
}

/// A TLS set-up that failed: which file, and what was wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {error}")]
    Read {
        what: &'static str,
        path: String,
        #[source]
        error: std::io::Error,
    },
    #[error("{what} {path}: {source}")]
    Cert {
        what: &'static str,
        path: String,
        #[source]
        source: CertError,
    },
    #[error("CA certificate {path}: {source}")]
    Ca {
        path: String,
        #[source]
        source: PkiError,
    },
    #[error("CA certificate {path}: {source}")]
    Verifier {
        path: String,
        #[source]
        source: crate::revocation::RevocationError,
    },
    #[error("{what} {path}: {source}")]
    Rustls {
        what: &'static str,
        path: String,
        #[source]
        source: rustls::Error,
    },
    #[error("{what} {path}: {message}")]
    Invalid {
        what: &'static str,
        path: String,
        message: String,
    },
    #[error("TLS configuration: {0}")]
    Config(#[source] rustls::Error),
}

/// The fleet CA plus this process's certificate and key, loaded and checked.
#[derive(Clone)]
pub struct TlsIdentity {
    /// The CA certificates as loaded (sent along on the enrollment listener).
    ca_certs: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    /// The certificate and key every configuration made from this identity presents:
    /// [`TlsIdentity::reload`] swaps it (renewal without a restart).
    current: Arc<CurrentCert>,
    /// The fleet's revocation list as this process holds it, read by every
    /// verifier made from this identity (a new list needs no new configuration).
    revocations: Arc<Revocations>,
    /// Trust domain of the fleet CA.
    pub trust_domain: String,
    /// This process, as its certificate names it.
    pub me: Identity,
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TlsIdentity({} in {})", self.me, self.trust_domain)
    }
}

/// A [`TlsError::Cert`] for the `what` file at `path`.
fn bad_cert<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(CertError) -> TlsError + 'a {
    move |source| TlsError::Cert {
        what,
        path: path.display().to_string(),
        source,
    }
}

/// A [`TlsError::Rustls`] for the `what` file at `path`.
fn rustls_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(rustls::Error) -> TlsError + 'a {
    move |source| TlsError::Rustls {
        what,
        path: path.display().to_string(),
        source,
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsIdentity {
    /// Loads the `[tls]` files of a config.
    pub fn load(files: &TlsFiles) -> Result<TlsIdentity, TlsError> {
        let read = |what: &'static str, path: &Path| {
            std::fs::read(path).map_err(|error| TlsError::Read {
                what,
                path: path.display().to_string(),
                error,
            })
        };
        let invalid = |what: &'static str, path: &Path, message: String| TlsError::Invalid {
            what,
            path: path.display().to_string(),
            message,
        };
        finish_interrupted_renewal(files);
        let ca_pem = read("CA certificate", &files.ca)?;
        let cert_pem = read("certificate", &files.cert)?;
        let key_pem = read("private key", &files.key)?;
        let ca = parse_certs_pem(&ca_pem).map_err(bad_cert("CA certificate", &files.ca))?;
        let trust_domain =
            crate::pki::trust_domain_of_ca(&files.ca).map_err(|source| TlsError::Ca {
                path: files.ca.display().to_string(),
                source,
            })?;
        let chain = parse_certs_pem(&cert_pem).map_err(bad_cert("certificate", &files.cert))?;
        let key = rustls_pemfile::private_key(&mut &key_pem[..])
            .map_err(|e| invalid("private key", &files.key, e.to_string()))?
            .ok_or_else(|| invalid("private key", &files.key, "no PEM private key found".into()))?;
        let me = Identity::parse(chain[0].as_ref(), &trust_domain)
            .map_err(bad_cert("certificate", &files.cert))?;
        let mut roots = RootCertStore::empty();
        let ca_certs = ca.clone();
        for c in ca {
            roots
                .add(c)
                .map_err(rustls_err("CA certificate", &files.ca))?;
        }
        let certified =
            rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider())
                .map_err(rustls_err("certificate/key pair", &files.cert))?;
        let roots = Arc::new(roots);
        let revocations = Arc::new(Revocations::new(roots.clone(), &trust_domain).map_err(
            |source| TlsError::Verifier {
                path: files.ca.display().to_string(),
                source,
            },
        )?);
        let id = TlsIdentity {
            revocations,
            ca_certs,
            chain,
            key: Arc::new(key),
            current: Arc::new(CurrentCert(std::sync::RwLock::new(Arc::new(certified)))),
            trust_domain,
            me,
        };
        // Fail now, naming the files, rather than at the first connection.
        id.server_config()
            .map_err(|e| invalid("certificate/key pair", &files.cert, e.to_string()))?;
        Ok(id)
    }

    /// Loads the renewed certificate and key from `files` and presents them from
    /// now on, in every server and client configuration made from this identity
    /// (connections already open keep theirs). The new certificate must name the
    /// same role and process and come from the same CA.
    pub fn reload(&self, files: &TlsFiles) -> Result<(), TlsError> {
        let fresh = TlsIdentity::load(files)?;
        if fresh.me != self.me || fresh.trust_domain != self.trust_domain {
            return Err(TlsError::Invalid {
                what: "certificate",
                path: files.cert.display().to_string(),
                message: format!("it is for {}, this process is {}", fresh.me, self.me),
            });
        }
        let next = fresh
            .current
            .0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        *self.current.0.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(())
    }

    /// The certificate presented now (DER of the leaf).
    pub fn current_cert(&self) -> CertificateDer<'static> {
        let c = self
            .current
            .0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        c.cert[0].clone()
    }

    /// Loads the `[tls]` files of a daemon that must hold a `role` certificate (named
    /// `name`, when given): a certificate of another role or name is refused now,
    /// with the command that makes the right one.
    pub fn load_as(
        files: &TlsFiles,
        role: Role,
        name: Option<&str>,
    ) -> Result<TlsIdentity, TlsError> {
        let id = TlsIdentity::load(files)?;
        if id.me.role != role || name.is_some_and(|n| n != id.me.name) {
            let want = name.unwrap_or("NAME");
            return Err(TlsError::Invalid {
                what: "certificate",
                path: files.cert.display().to_string(),
                message: format!(
                    "it is for {}, but this process is {role} {want}; issue one with `bulwark pki issue --role {role} --name {want}`",
                    id.me
                ),
            });
        }
        Ok(id)
    }

    /// The revocation list this process enforces (shared by every configuration
    /// made from this identity and its clones).
    pub fn revocations(&self) -> &Arc<Revocations> {
        &self.revocations
    }

    /// The server side: TLS 1.3 only, a client certificate from the fleet CA
    /// required, and not one the revocation list revokes.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier = self.revocations.client_verifier();
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(self.current.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        // No session resumption: a resumed session skips the client verifier, so
        // a certificate revoked since its first handshake would get back in.
        cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        cfg.send_tls13_tickets = 0;
        Ok(Arc::new(cfg))
    }

    /// The enrollment listener: TLS 1.3, no client certificate (the host has none
    /// yet), and the CA sent after this certificate so the host can check it against
    /// the fingerprint in its token.
    pub fn enrollment_server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let mut chain = self.chain.clone();
        chain.extend(self.ca_certs.iter().cloned());
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_single_cert(chain, self.key.clone_key())
            .map_err(TlsError::Config)?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// The client side: presents this process's certificate and accepts only a server
    /// whose certificate (chain, host name, expiry, revocation) checks out and whose
    /// role is `server_role`.
    pub fn client_config(&self, server_role: Role) -> Result<Arc<ClientConfig>, TlsError> {
        self.client_config_for(server_role, None)
    }

    /// [`TlsIdentity::client_config`] that also wants the server's certificate to
    /// name `expected` (the node the coordinator assigned, say): a process holding
    /// another node's certificate is refused in the handshake.
    pub fn client_config_for(
        &self,
        server_role: Role,
        expected: Option<&str>,
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let verifier = Arc::new(RoleVerifier {
            revocations: self.revocations.clone(),
            trust_domain: self.trust_domain.clone(),
            role: server_role,
            name: expected.map(str::to_string),
        });
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(self.current.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        // Every connection verifies the server again (revocation, name): a resumed
        // session would skip the verifier.
        cfg.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(cfg))
    }
}

/// A renewal writes `CERT.bulwark-new` and `KEY.bulwark-new`, renames the key, then
/// the certificate. Interrupted between the renames, the key is new and the
/// certificate still waits in `CERT.bulwark-new`: finish the rename when that file
/// matches the key (and leave everything alone otherwise).
fn finish_interrupted_renewal(files: &TlsFiles) {
    let pending = crate::keyfile::pending_path(&files.cert);
    // Read without following a link, and only a regular file of ours: what is
    // renamed into place must be what a renewal of this process wrote.
    let cert_pem = match crate::keyfile::read_own_file(&pending) {
        Ok(Some(pem)) => pem,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!("left {} alone: {e}", pending.display());
            return;
        }
    };
    let Ok(key_pem) = std::fs::read(&files.key) else {
        return;
    };
    let (Ok(chain), Ok(Some(key))) = (
        parse_certs_pem(&cert_pem),
        rustls_pemfile::private_key(&mut &key_pem[..]),
    ) else {
        return;
    };
    let matches = rustls::sign::CertifiedKey::from_der(chain, key, &provider())
        .is_ok_and(|c| c.keys_match().is_ok());
    if matches && std::fs::rename(&pending, &files.cert).is_ok() {
        tracing::warn!(cert = %files.cert.display(), "finished a certificate renewal a crash interrupted");
    }
}

/// The certificate and key a process presents now (see [`TlsIdentity::reload`]).
#[derive(Debug)]
struct CurrentCert(std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>);

impl rustls::server::ResolvesServerCert for CurrentCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

impl rustls::client::ResolvesClientCert for CurrentCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// WebPKI server verification (with the CRL in force) plus checks of the server's
/// SPIFFE role, its name when the client knows whom it dials, and the revocation
/// list's identity rule.
#[derive(Debug)]
struct RoleVerifier {
    revocations: Arc<Revocations>,
    trust_domain: String,
    role: Role,
    name: Option<String>,
}

impl RoleVerifier {
    fn inner(&self) -> Arc<WebPkiServerVerifier> {
        self.revocations.server_verifier()
    }
}

impl ServerCertVerifier for RoleVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner().verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let facts = crate::revocation::CertFacts::parse(end_entity.as_ref(), &self.trust_domain)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let id = &facts.identity;
        if id.role != self.role {
            return Err(rustls::Error::General(format!(
                "server is {id}, expected a {} certificate",
                self.role
            )));
        }
        if let Some(want) = &self.name
            && *want != id.name
        {
            tracing::warn!(server = %id, expected = %want, "refused server: not the one dialled");
            return Err(rustls::Error::General(format!(
                "server is {id}, expected {} {want} (the address does not lead to the {} this connection is for)",
                self.role, self.role
            )));
        }
        if let Some(why) = self.revocations.snapshot().refusal(&facts) {
            tracing::warn!(server = %id, "refused server certificate: {why}");
            crate::metrics::counter_add("bulwark_refusals_total", &[("reason", "revoked")], 1);
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner().supported_verify_schemes()
    }
}

/// A connection accepted by [`incoming`].
pub type Accepted = Tracked<tokio_rustls::server::TlsStream<TcpStream>>;

/// Accepts TCP connections and completes TLS handshakes, each in its own task so a
/// slow or hostile client cannot stall the accept loop. Failed handshakes (no client
/// certificate, another CA, expired, revoked) are logged as refusals and dropped.
/// With `revocations`, each connection is tracked with its peer's certificate and
/// cut when a later revocation list revokes it.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    revocations: Option<Arc<Revocations>>,
    shutdown: CancellationToken,
) -> impl futures::Stream<Item = Result<Accepted, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            // A duplicate of the socket, to shut it down if its peer is revoked.
            let socket = revocations
                .as_ref()
                .and_then(|_| std::os::fd::AsFd::as_fd(&tcp).try_clone_to_owned().ok());
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let revocations = revocations.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
                        let guard = match &revocations {
                            Some(r) => r.track(leaf, peer.to_string(), socket),
                            None => Revocations::untracked(),
                        };
                        let _ = tx.send(Ok(Tracked::new(tls, guard))).await;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(%peer, "refused TLS connection: {e}");
                    }
                    Err(_) => tracing::warn!(%peer, "refused TLS connection: handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Applies the HTTP/2 and message-size settings every Bulwark server uses.
pub fn server_builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .initial_stream_window_size(8 * 1024 * 1024)
        .initial_connection_window_size(16 * 1024 * 1024)
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .tcp_nodelay(true)
}

/// The caller of `req`, if its role is one of `roles`; otherwise `PermissionDenied`
/// naming the method's roles (and logged).
pub fn require<T>(req: &Request<T>, method: &str, roles: &[Role]) -> Result<Identity, Status> {
    let id = req
        .extensions()
        .get::<Identity>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no client identity"))?;
    if roles.contains(&id.role) {
        return Ok(id);
    }
    let wanted: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
    tracing::warn!(caller = %id, method, "refused: wrong role");
    crate::metrics::counter_add("bulwark_refusals_total", &[("reason", "role")], 1);
    Err(Status::permission_denied(format!(
        "{method} is for {} certificates; the caller is {id}",
        wanted.join(" or ")
    )))
}

/// An address that is not `https://host:port`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("{url}: only https:// addresses are supported")]
    NotHttps { url: String },
    #[error("{url}: expected https://host:port")]
    NoPort { url: String },
    #[error("{url}: \"{port}\" is not a port number")]
    BadPort { url: String, port: String },
    #[error("{url}: no host")]
    NoHost { url: String },
}

/// Callers whose own errors are still text take a [`TargetError`] with `?`.
/// A channel that could not be made or connected: the message says what to check.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid host name {0}")]
    HostName(String),
    #[error("{target}: {source}")]
    Endpoint {
        target: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The connection failed; `explained` names the likely cause.
    #[error("{explained}")]
    Connect {
        explained: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Callers whose own errors are still text take a [`ConnectError`] with `?`.
/// Where to dial: `https://host:port`.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
}

impl Target {
    /// Parses `https://host:port` (the scheme may be left out).
    pub fn parse(url: &str) -> Result<Target, TargetError> {
        let rest = url.strip_prefix("https://").unwrap_or(url);
        let url = || url.to_string();
        if rest.contains("://") {
            return Err(TargetError::NotHttps { url: url() });
        }
        let rest = rest.trim_end_matches('/');
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| TargetError::NoPort { url: url() })?;
        let port: u16 = port.parse().map_err(|_| TargetError::BadPort {
            url: url(),
            port: port.to_string(),
        })?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(TargetError::NoHost { url: url() });
        }
        Ok(Target {
            host: host.to_string(),
            port,
        })
    }

    fn server_name(&self) -> Result<ServerName<'static>, ConnectError> {
        if let Ok(ip) = self.host.parse::<IpAddr>() {
            return Ok(ServerName::IpAddress(ip.into()));
        }
        ServerName::try_from(self.host.clone())
            .map_err(|_| ConnectError::HostName(self.host.clone()))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "https://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "https://{}:{}", self.host, self.port)
        }
    }
}

pub(crate) fn endpoint(target: &Target) -> Result<Endpoint, ConnectError> {
    // An http:// URI: our connector does TLS itself, and tonic refuses https:// URIs
    // without its own TLS settings.
    let host = if target.host.contains(':') {
        format!("[{}]", target.host)
    } else {
        target.host.clone()
    };
    Ok(
        Endpoint::from_shared(format!("http://{host}:{}", target.port))
            .map_err(|source| ConnectError::Endpoint {
                target: target.to_string(),
                source,
            })?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true)
            .initial_stream_window_size(8 * 1024 * 1024)
            .initial_connection_window_size(16 * 1024 * 1024),
    )
}

fn connector(
    target: &Target,
    config: Arc<ClientConfig>,
) -> Result<
    impl tower::Service<
        Uri,
        Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
        Error = std::io::Error,
        Future = impl Send,
    > + Clone
    + Send
    + 'static,
    ConnectError,
> {
    let server_name = target.server_name()?;
    let addr = (target.host.clone(), target.port);
    let tls = TlsConnector::from(config);
    Ok(tower::service_fn(move |_: Uri| {
        let addr = addr.clone();
        let tls = tls.clone();
        let server_name = server_name.clone();
        async move {
            let stream = dial_tls(&addr.0, addr.1, &tls, server_name).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    }))
}

/// TCP to `host:port`, then the TLS handshake as `server_name`.
async fn dial_tls(
    host: &str,
    port: u16,
    tls: &TlsConnector,
    server_name: ServerName<'static>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect((host, port)).await?;
    tcp.set_nodelay(true)?;
    tls.connect(server_name, tcp).await
}

/// One TLS connection to `target` with `config` (the coordinator list's connector
/// dials each address with it).
pub(crate) async fn dial(
    target: &Target,
    config: Arc<ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let server_name = target
        .server_name()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    dial_tls(
        &target.host,
        target.port,
        &TlsConnector::from(config),
        server_name,
    )
    .await
}

/// A channel to `target` that connects on first use and reconnects after failures
/// (for daemons that keep one channel for their lifetime).
pub fn channel_lazy(
    target: &Target,
    config: Arc<ClientConfig>,
) -> Result<TracedChannel, ConnectError> {
    Ok(endpoint(target)?
        .connect_with_connector_lazy(connector(target, config)?)
        .into())
}

/// Connects to `target` now; the error says what to check.
pub async fn channel(
    target: &Target,
    config: Arc<ClientConfig>,
) -> Result<TracedChannel, ConnectError> {
    endpoint(target)?
        .connect_with_connector(connector(target, config)?)
        .await
        .map(TracedChannel::from)
        .map_err(|source| ConnectError::Connect {
            explained: explain_connect_error(target, &source),
            source,
        })
}

/// What to check when a connection to `target` failed with `e` (its whole chain).
pub(crate) fn explain_connect_error(
    target: &Target,
    e: &(dyn std::error::Error + 'static),
) -> String {
    let mut chain = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        chain.push_str(": ");
        chain.push_str(&s.to_string());
        src = s.source();
    }
    if let Some(alert) = refused_by_alert(&chain) {
        format!("{target} refused this client's certificate (TLS alert {alert}): {CHECK_CERT}")
    } else if chain.contains("Connection refused") {
        format!(
            "cannot connect to {target}: connection refused (is the server running and listening there?)"
        )
    } else if chain.contains("certificate") || chain.contains("expected a") {
        format!(
            "TLS with {target} failed: {chain} (check that the server's certificate is signed by your --ca and names this host)"
        )
    } else {
        format!("cannot connect to {target}: {chain}")
    }
}

const CHECK_CERT: &str = "check that --cert/--key (or BULWARK_CERT/BULWARK_KEY) hold a \
     certificate signed by the fleet CA that has not expired, and that it is not revoked \
     (`bulwark revocations` lists revoked identities; a certificate issued for the name \
     after its revocation is accepted)";

/// The alert in "received fatal alert: UnknownCA": the server refused the handshake.
fn refused_by_alert(chain: &str) -> Option<&str> {
    let at = chain.find("received fatal alert: ")? + "received fatal alert: ".len();
    Some(
        chain[at..]
            .split(|c: char| !c.is_alphanumeric())
            .next()
            .unwrap_or(""),
    )
}

/// Turns the opaque status a TLS 1.3 client sees when the server refused its
/// certificate during the handshake into a message that says what to check.
pub fn explain_status(target: &str, status: &Status) -> String {
    let msg = status.message();
    if let Some(alert) = refused_by_alert(msg) {
        return format!(
            "{target} refused this client's certificate (TLS alert {alert}): {CHECK_CERT}"
        );
    }
    // A coordinator's not-leader answer (no leader known: e.g. etcd without quorum)
    // may quote a transport error of its own; it is not a refused certificate.
    if status.code() == tonic::Code::Unavailable && status.metadata().get(LEADER_METADATA).is_some()
    {
        return format!("{target}: {msg}");
    }
    // How a refused handshake reaches a TLS 1.3 client, depending on timing: an
    // unknown transport error, a cancelled call, or a reset or closed connection.
    let transport = status.code() == tonic::Code::Unknown
        || status.code() == tonic::Code::Cancelled
        || [
            "transport error",
            "connection reset",
            "broken pipe",
            "operation was canceled",
            "connection closed",
        ]
        .iter()
        .any(|m| msg.contains(m));
    if transport {
        return format!(
            "{target} closed the connection ({msg}); it most likely refused this client's \
             certificate: {CHECK_CERT}"
        );
    }
    format!("{}: {msg}", code_word(status.code()))
}

fn code_word(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Unauthenticated => "unauthenticated",
        PermissionDenied => "permission denied",
        NotFound => "not found",
        InvalidArgument => "invalid argument",
        FailedPrecondition => "failed precondition",
        AlreadyExists => "already exists",
        ResourceExhausted => "out of space",
        Unavailable => "unavailable",
        DeadlineExceeded => "timed out",
        Aborted => "aborted",
        _ => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = Target::parse("https://127.0.0.1:7440").expect("valid");
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 7440));
        assert_eq!(t.to_string(), "https://127.0.0.1:7440");
        assert!(Target::parse("http://x:1").is_err());
        assert!(Target::parse("https://x").is_err());
        assert!(Target::parse("https://x:port").is_err());
        let v6 = Target::parse("https://[::1]:7441").expect("v6");
        assert_eq!(v6.host, "::1");
        assert_eq!(v6.to_string(), "https://[::1]:7441");
    }

    #[test]
    fn refusals_by_alert_are_explained() {
        assert_eq!(
            refused_by_alert("tls: received fatal alert: UnknownCA"),
            Some("UnknownCA")
        );
        assert_eq!(refused_by_alert("connection reset"), None);
        let s = Status::unknown("transport error: received fatal alert: CertificateExpired");
        let m = explain_status("coordinator x", &s);
        assert!(
            m.contains("CertificateExpired") && m.contains("certificate signed by the fleet CA"),
            "{m}"
        );
    }

    #[test]
    fn roles_round_trip() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        assert!("root".parse::<Role>().is_err());
    }
}
