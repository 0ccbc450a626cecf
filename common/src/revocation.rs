//! The fleet's revocation list as every daemon enforces it.
//!
//! The coordinator keeps the list (`bulwark revoke ROLE NAME`): an identity
//! (`role`/`name`) revoked at a time, and the serial numbers of that identity's
//! certificates it knows of, also as an X.509 CRL signed by the fleet CA when the
//! coordinator holds the CA key. It hands the list to nodes in heartbeat answers and
//! to agents on their control stream; each keeps the last one in a file and loads it
//! at start ([`Revocations::persist_at`]).
//!
//! A [`Revocations`] is shared by every TLS configuration made from one
//! [`crate::tls::TlsIdentity`], so a new list takes effect without a restart:
//!
//! - the server side's client verifier ([`FleetClientVerifier`]) and the client
//!   side's server verifier (`RoleVerifier` in `tls.rs`) ask the current
//!   [`Snapshot`]: WebPKI with the CRL (rebuilt when the list changes), then the
//!   identity rule, which needs no CRL: every certificate of a revoked role and name
//!   whose notBefore is at or before the revocation is refused (so a certificate
//!   issued for that name later works again);
//! - every connection a server accepted is tracked with its peer's certificate
//!   ([`Revocations::track`], done by `tls::incoming`), and when a new list revokes
//!   the peer, the connection is cut: its TCP socket is shut down both ways (so a
//!   read or write waiting on it ends at once) and [`Tracked`] fails what follows.
//!   Nothing is checked per read or write but one atomic load;
//! - the access layer (`crate::access`) refuses a revoked caller on every call.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};

use bulwark_proto as pb;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore};
use rustls::{Error as TlsError, SignatureScheme};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::pki::{CertError, Identity, Role};

/// A revocation list that could not be put in force, read or kept.
#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    #[error("{side} verifier: {source}")]
    Verifier {
        side: &'static str,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("unreadable: {0}")]
    Unreadable(#[source] serde_json::Error),
    #[error("format version {0} is not known here (1 is)")]
    Format(u32),
    #[error("its crl_der is not hex")]
    CrlHex,
    #[error("revocation list {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: Box<RevocationError>,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Encode(#[source] serde_json::Error),
    #[error(transparent)]
    Write(#[from] crate::keyfile::FileError),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What a certificate says about its holder, read once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFacts {
    pub identity: Identity,
    pub not_before_ms: i64,
    pub not_after_ms: i64,
    /// Serial number, lowercase hex without leading zeros ([`serial_hex`]).
    pub serial: String,
}

impl CertFacts {
    /// Reads a DER certificate of trust domain `trust_domain`.
    pub fn parse(der: &[u8], trust_domain: &str) -> Result<CertFacts, CertError> {
        use x509_parser::prelude::*;
        let identity = Identity::parse(der, trust_domain)?;
        let (_, cert) = X509Certificate::from_der(der).map_err(CertError::Unreadable)?;
        Ok(CertFacts {
            identity,
            not_before_ms: cert.validity().not_before.timestamp() * 1000,
            not_after_ms: cert.validity().not_after.timestamp() * 1000,
            serial: serial_hex(cert.raw_serial()),
        })
    }
}

/// A serial number as the revocation list writes it: lowercase hex of its bytes
/// without leading zero bytes (DER may add one to keep the integer positive).
pub fn serial_hex(raw: &[u8]) -> String {
    let first = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    let s: String = raw[first..].iter().map(|b| format!("{b:02x}")).collect();
    if s.is_empty() { "00".into() } else { s }
}

/// The bytes of a serial written by [`serial_hex`] (colons allowed), if it is hex.
pub fn serial_bytes(hex: &str) -> Option<Vec<u8>> {
    let h: String = hex.chars().filter(|c| *c != ':').collect();
    let h = if h.len() % 2 == 1 { format!("0{h}") } else { h };
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(h.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The revocation state of one version of the list, with the WebPKI verifiers built
/// from it (the CRL, when the list carries one).
pub struct Snapshot {
    list: pb::RevocationList,
    /// Revoked identity → revoked at (Unix ms).
    by_identity: HashMap<(Role, String), i64>,
    serials: HashSet<String>,
    client: Arc<dyn ClientCertVerifier>,
    server: Arc<WebPkiServerVerifier>,
    /// Whether the CRL is in the verifiers (false when there is none or it was
    /// unusable; the identity rule still holds).
    crl_in_use: bool,
}

impl Snapshot {
    /// The list this state was made from.
    pub fn list(&self) -> &pb::RevocationList {
        &self.list
    }

    /// Whether the CRL is enforced by the WebPKI verifiers.
    pub fn crl_in_use(&self) -> bool {
        self.crl_in_use
    }

    /// Why a certificate with these facts is revoked, or `None`.
    pub fn refusal(&self, f: &CertFacts) -> Option<String> {
        if self.serials.contains(&f.serial) {
            return Some(format!(
                "the certificate of {} (serial {}) is revoked",
                f.identity, f.serial
            ));
        }
        let at = *self
            .by_identity
            .get(&(f.identity.role, f.identity.name.clone()))?;
        (f.not_before_ms <= at).then(|| {
            format!(
                "{} was revoked at {}; its certificate dates from {} (only a certificate issued after the revocation is accepted)",
                f.identity,
                crate::time::rfc3339_ms(at),
                crate::time::rfc3339_ms(f.not_before_ms)
            )
        })
    }

    /// When `role`/`name` was revoked, if it is.
    pub fn revoked_at(&self, role: Role, name: &str) -> Option<i64> {
        self.by_identity.get(&(role, name.to_string())).copied()
    }
}

/// A connection a server accepted, with its peer.
struct Conn {
    facts: CertFacts,
    peer: String,
    cut: Arc<Cut>,
}

/// How a tracked connection is cut: once, by shutting its TCP socket down both
/// ways (a duplicate of the accepted socket's descriptor), which ends a read or
/// write waiting on it; the flag then fails every later one.
#[derive(Debug, Default)]
pub struct Cut {
    done: std::sync::atomic::AtomicBool,
    socket: Option<std::net::TcpStream>,
}

impl Cut {
    /// A cut for the connection on `socket` (`None`: no socket, only the flag).
    pub fn new(socket: Option<std::os::fd::OwnedFd>) -> Cut {
        Cut {
            done: std::sync::atomic::AtomicBool::new(false),
            socket: socket.map(std::net::TcpStream::from),
        }
    }

    fn cut(&self) {
        if !self.done.swap(true, Ordering::AcqRel)
            && let Some(s) = &self.socket
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Whether the connection was cut.
    pub fn is_cut(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }
}

/// The shared, swappable revocation state of one process (see the module docs).
pub struct Revocations {
    trust_domain: String,
    roots: Arc<RootCertStore>,
    hints: Vec<DistinguishedName>,
    current: RwLock<Arc<Snapshot>>,
    conns: Mutex<HashMap<u64, Conn>>,
    next_conn: AtomicU64,
    /// Where the list is kept (nodes and agents), written at every change.
    file: Mutex<Option<PathBuf>>,
}

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.snapshot();
        write!(
            f,
            "Revocations(version {}, {} identities, CRL {})",
            s.list.version,
            s.by_identity.len(),
            if s.crl_in_use { "in use" } else { "none" }
        )
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counts a refusal for a revoked certificate.
fn count_refusal() {
    crate::metrics::counter_add("bulwark_refusals_total", &[("reason", "revoked")], 1);
}

impl Revocations {
    /// An empty list over the fleet CA `roots`.
    pub fn new(
        roots: Arc<RootCertStore>,
        trust_domain: &str,
    ) -> Result<Revocations, RevocationError> {
        let hints = roots.subjects();
        let empty = build(&roots, pb::RevocationList::default())?;
        Ok(Revocations {
            trust_domain: trust_domain.to_string(),
            roots,
            hints,
            current: RwLock::new(Arc::new(empty)),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            file: Mutex::new(None),
        })
    }

    /// The state in force now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The version of the list in force (0 = none received).
    pub fn version(&self) -> u64 {
        self.snapshot().list.version
    }

    /// Why the DER certificate `der` is refused, or `None` if the list does not
    /// revoke it (a certificate that cannot be read is left to the other checks).
    pub fn refusal(&self, der: &[u8]) -> Option<String> {
        let f = CertFacts::parse(der, &self.trust_domain).ok()?;
        self.snapshot().refusal(&f)
    }

    /// Puts `list` in force whatever its version (the coordinator, whose list it
    /// is), cutting connections it revokes; writes it to the file, if one is set.
    pub fn set(&self, list: pb::RevocationList) -> Result<(), RevocationError> {
        let snap = Arc::new(build(&self.roots, list)?);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = snap.clone();
        self.save(&snap);
        self.cut_revoked(&snap);
        Ok(())
    }

    /// Puts `list` in force if it is newer than the one held (nodes and agents:
    /// the coordinator's versions only count up). Returns whether it changed.
    pub fn apply_newer(&self, list: pb::RevocationList) -> Result<bool, RevocationError> {
        if list.version <= self.version() {
            return Ok(false);
        }
        let (version, n) = (list.version, list.revocations.len());
        self.set(list)?;
        tracing::info!(
            version,
            revoked = n,
            "revocation list updated: revoked certificates are refused from now on"
        );
        Ok(true)
    }

    /// Loads the list kept in `path` (if there is one) and keeps every later list
    /// there. A file that cannot be read is an error: starting without the list
    /// would accept certificates the fleet revoked.
    pub fn persist_at(&self, path: &Path) -> Result<(), RevocationError> {
        let in_file = |e| RevocationError::File {
            path: path.to_path_buf(),
            source: Box::new(e),
        };
        match std::fs::read(path) {
            Ok(bytes) => {
                let list = decode_file(&bytes).map_err(in_file)?;
                let n = list.revocations.len();
                self.apply_newer(list).map_err(in_file)?;
                tracing::info!(file = %path.display(), revoked = n, "revocation list loaded");
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(RevocationError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
        *lock(&self.file) = Some(path.to_path_buf());
        Ok(())
    }

    fn save(&self, snap: &Snapshot) {
        let Some(path) = lock(&self.file).clone() else {
            return;
        };
        let written = encode_file(&snap.list)
            .and_then(|b| Ok(crate::keyfile::write_atomic(&path, &b, 0o644)?));
        match written {
            Ok(()) => {}
            // Kept in memory and enforced; the next change or start writes it again.
            Err(e) => tracing::error!("cannot keep the revocation list: {e}"),
        }
    }

    /// Tracks a connection this process accepted from the holder of `leaf`: the
    /// returned guard is cut when a later list revokes that certificate, and
    /// forgotten when dropped.
    pub fn track(
        self: &Arc<Self>,
        leaf: Option<&CertificateDer<'_>>,
        peer: String,
        socket: Option<std::os::fd::OwnedFd>,
    ) -> ConnGuard {
        let cut = Arc::new(Cut::new(socket));
        let id = leaf
            .and_then(|l| CertFacts::parse(l.as_ref(), &self.trust_domain).ok())
            .map(|facts| {
                let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
                lock(&self.conns).insert(
                    id,
                    Conn {
                        facts,
                        peer,
                        cut: cut.clone(),
                    },
                );
                id
            });
        // A list put in force between this connection's handshake and now did not
        // see it: check it against the list in force after it is tracked.
        if let Some(id) = id
            && let Some(c) = lock(&self.conns).get(&id)
            && let Some(why) = self.snapshot().refusal(&c.facts)
        {
            tracing::warn!(peer = %c.peer, caller = %c.facts.identity, "connection cut: {why}");
            count_refusal();
            c.cut.cut();
        }
        ConnGuard {
            revs: Arc::downgrade(self),
            id,
            cut,
        }
    }

    /// A guard for a connection nobody tracks (the enrollment listener, whose
    /// clients have no certificate yet).
    pub fn untracked() -> ConnGuard {
        ConnGuard {
            revs: std::sync::Weak::new(),
            id: None,
            cut: Arc::new(Cut::default()),
        }
    }

    /// Connections tracked now (for tests and logs).
    pub fn tracked(&self) -> usize {
        lock(&self.conns).len()
    }

    fn cut_revoked(&self, snap: &Snapshot) {
        for c in lock(&self.conns).values() {
            if c.cut.is_cut() {
                continue;
            }
            if let Some(why) = snap.refusal(&c.facts) {
                tracing::warn!(peer = %c.peer, caller = %c.facts.identity, "connection cut: {why}");
                count_refusal();
                c.cut.cut();
            }
        }
    }

    /// The server side's client verifier over this state.
    pub fn client_verifier(self: &Arc<Self>) -> Arc<FleetClientVerifier> {
        Arc::new(FleetClientVerifier { revs: self.clone() })
    }

    /// The WebPKI server verifier of the state in force (with the CRL).
    pub fn server_verifier(&self) -> Arc<WebPkiServerVerifier> {
        self.snapshot().server.clone()
    }
}

fn build(
    roots: &Arc<RootCertStore>,
    list: pb::RevocationList,
) -> Result<Snapshot, RevocationError> {
    let mut by_identity = HashMap::new();
    let mut serials = HashSet::new();
    for r in &list.revocations {
        let role = match r.role.parse::<Role>() {
            Ok(role) => role,
            Err(e) => {
                tracing::warn!("revocation list entry {}/{} ignored: {e}", r.role, r.name);
                continue;
            }
        };
        let at = by_identity
            .entry((role, r.name.clone()))
            .or_insert(i64::MIN);
        *at = (*at).max(r.revoked_at_ms);
        for s in &r.serials {
            match serial_bytes(s) {
                Some(b) => {
                    serials.insert(serial_hex(&b));
                }
                None => tracing::warn!(
                    "revocation list: serial {s:?} of {}/{} ignored",
                    r.role,
                    r.name
                ),
            }
        }
    }
    let plain = || verifiers(roots, None);
    let (client, server, crl_in_use) = if list.crl_der.is_empty() {
        let (c, s) = plain()?;
        (c, s, false)
    } else {
        let crl = CertificateRevocationListDer::from(list.crl_der.to_vec());
        match verifiers(roots, Some(crl)) {
            Ok((c, s)) => (c, s, true),
            Err(e) => {
                // The identity rule still holds; the CRL adds serials only.
                tracing::warn!(
                    version = list.version,
                    "the revocation list's CRL is unusable ({e}); enforcing its identities only"
                );
                let (c, s) = plain()?;
                (c, s, false)
            }
        }
    };
    Ok(Snapshot {
        list,
        by_identity,
        serials,
        client,
        server,
        crl_in_use,
    })
}

type Verifiers = (Arc<dyn ClientCertVerifier>, Arc<WebPkiServerVerifier>);

fn verifiers(
    roots: &Arc<RootCertStore>,
    crl: Option<CertificateRevocationListDer<'static>>,
) -> Result<Verifiers, RevocationError> {
    let mut c = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider());
    let mut s = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider());
    if let Some(crl) = crl {
        // Only leaves are listed (the fleet CA signs no intermediates); an expired
        // CRL still counts (a stale list is better than none).
        c = c
            .with_crls([crl.clone()])
            .only_check_end_entity_revocation();
        s = s.with_crls([crl]).only_check_end_entity_revocation();
    }
    let c = c.build().map_err(|source| RevocationError::Verifier {
        side: "client",
        source,
    })?;
    let s = s.build().map_err(|source| RevocationError::Verifier {
        side: "server",
        source,
    })?;
    Ok((c, s))
}

/// A revocation list as nodes and agents keep it on disk (JSON, format `v` 1).
#[derive(Debug, Serialize, Deserialize)]
struct StoredList {
    v: u32,
    version: u64,
    /// The CRL, hex (empty when the coordinator has no CA key).
    crl_der: String,
    revocations: Vec<StoredEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredEntry {
    role: String,
    name: String,
    revoked_at_ms: i64,
    by: String,
    serials: Vec<String>,
}

fn encode_file(list: &pb::RevocationList) -> Result<Vec<u8>, RevocationError> {
    let stored = StoredList {
        v: 1,
        version: list.version,
        crl_der: list.crl_der.iter().map(|b| format!("{b:02x}")).collect(),
        revocations: list
            .revocations
            .iter()
            .map(|r| StoredEntry {
                role: r.role.clone(),
                name: r.name.clone(),
                revoked_at_ms: r.revoked_at_ms,
                by: r.by.clone(),
                serials: r.serials.clone(),
            })
            .collect(),
    };
    serde_json::to_vec_pretty(&stored).map_err(RevocationError::Encode)
}

fn decode_file(bytes: &[u8]) -> Result<pb::RevocationList, RevocationError> {
    let s: StoredList = serde_json::from_slice(bytes).map_err(RevocationError::Unreadable)?;
    if s.v != 1 {
        return Err(RevocationError::Format(s.v));
    }
    let crl = if s.crl_der.is_empty() {
        Vec::new()
    } else {
        serial_bytes(&s.crl_der).ok_or(RevocationError::CrlHex)?
    };
    Ok(pb::RevocationList {
        version: s.version,
        crl_der: crl.into(),
        revocations: s
            .revocations
            .into_iter()
            .map(|r| pb::Revocation {
                role: r.role,
                name: r.name,
                revoked_at_ms: r.revoked_at_ms,
                by: r.by,
                serials: r.serials,
            })
            .collect(),
    })
}

/// Client-certificate verification of every Bulwark server: WebPKI against the
/// fleet CA (with the CRL in force), then the revocation list's identity rule.
#[derive(Debug)]
pub struct FleetClientVerifier {
    revs: Arc<Revocations>,
}

impl ClientCertVerifier for FleetClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.revs.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        let snap = self.revs.snapshot();
        snap.client
            .verify_client_cert(end_entity, intermediates, now)?;
        if let Ok(f) = CertFacts::parse(end_entity.as_ref(), &self.revs.trust_domain)
            && let Some(why) = snap.refusal(&f)
        {
            tracing::warn!(caller = %f.identity, "refused TLS client certificate: {why}");
            count_refusal();
            return Err(TlsError::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.revs
            .snapshot()
            .client
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.revs
            .snapshot()
            .client
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.revs.snapshot().client.supported_verify_schemes()
    }
}

/// Keeps an accepted connection in its process's [`Revocations`] while it lives.
pub struct ConnGuard {
    revs: std::sync::Weak<Revocations>,
    id: Option<u64>,
    cut: Arc<Cut>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if let (Some(id), Some(revs)) = (self.id, self.revs.upgrade()) {
            lock(&revs.conns).remove(&id);
        }
    }
}

/// An accepted stream whose reads and writes fail once its peer is revoked: the
/// HTTP/2 server then drops the connection and every call on it. The socket's
/// shutdown ([`Cut`]) wakes what waits on it; each call costs one atomic load.
pub struct Tracked<S> {
    inner: S,
    guard: ConnGuard,
}

impl<S> Tracked<S> {
    /// Wraps `inner`, cut when `guard` is.
    pub fn new(inner: S, guard: ConnGuard) -> Tracked<S> {
        Tracked { inner, guard }
    }

    /// The stream inside.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    fn is_cut(&self) -> bool {
        self.guard.cut.is_cut()
    }
}

fn cut_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "connection cut: the peer's certificate was revoked",
    )
}

/// `result`, unless the connection was cut meanwhile: then the cut's error (a
/// shut-down socket reads as its end, which must not look like a clean close).
fn unless_cut<T>(cut: bool, result: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
    match result {
        Poll::Ready(_) if cut => Poll::Ready(Err(cut_error())),
        other => other,
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.is_cut() {
            return Poll::Ready(Err(cut_error()));
        }
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        unless_cut(self.is_cut(), r)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.is_cut() {
            return Poll::Ready(Err(cut_error()));
        }
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        unless_cut(self.is_cut(), r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.is_cut() {
            return Poll::Ready(Err(cut_error()));
        }
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        unless_cut(self.is_cut(), r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.is_cut() {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Tracked<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TlsFiles;
    use crate::pki::{LeafRequest, Signer};
    use crate::tls::TlsIdentity;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Pki {
        dir: tempfile::TempDir,
    }

    impl Pki {
        fn new() -> Pki {
            let dir = tempfile::tempdir().expect("tmp");
            crate::pki::init(dir.path(), "test.fleet").expect("ca");
            Pki { dir }
        }

        fn issue(&self, role: Role, name: &str) -> TlsFiles {
            let server = matches!(role, Role::Node | Role::Coordinator);
            let issued = crate::pki::issue(
                self.dir.path(),
                &LeafRequest {
                    role,
                    name: name.into(),
                    dns: vec![],
                    ips: if server {
                        vec!["127.0.0.1".parse().expect("ip")]
                    } else {
                        vec![]
                    },
                    days: 30,
                },
            )
            .expect("issue");
            TlsFiles {
                ca: self.dir.path().join("ca.crt"),
                cert: issued.cert,
                key: issued.key,
                renew_before: None,
            }
        }

        fn signer(&self) -> Signer {
            let (crt, key) = crate::pki::ca_paths(self.dir.path());
            Signer::load(&crt, &key).expect("signer")
        }
    }

    fn leaf(files: &TlsFiles) -> CertificateDer<'static> {
        crate::pki::parse_certs_pem(&std::fs::read(&files.cert).expect("cert")).expect("pem")[0]
            .clone()
    }

    fn revoke(name: &str, role: Role, at: i64, version: u64) -> pb::RevocationList {
        pb::RevocationList {
            revocations: vec![pb::Revocation {
                role: role.to_string(),
                name: name.into(),
                revoked_at_ms: at,
                by: "admin".into(),
                serials: vec![],
            }],
            crl_der: Default::default(),
            version,
        }
    }

    /// A TLS 1.3 handshake in memory; the client's and the server's results.
    async fn handshake(
        server: Arc<rustls::ServerConfig>,
        client: Arc<rustls::ClientConfig>,
    ) -> (Result<(), String>, Result<(), String>) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let name =
            rustls::pki_types::ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into());
        // A byte each way after the handshake, so that the client takes in the
        // session tickets a server may send (a later handshake would resume).
        let (c, s) = tokio::join!(
            async {
                let mut t = tokio_rustls::TlsConnector::from(client)
                    .connect(name, a)
                    .await?;
                t.write_all(b"c").await?;
                let mut one = [0u8; 1];
                t.read_exact(&mut one).await?;
                Ok::<_, io::Error>(())
            },
            async {
                let mut t = tokio_rustls::TlsAcceptor::from(server).accept(b).await?;
                let mut one = [0u8; 1];
                t.read_exact(&mut one).await?;
                t.write_all(b"s").await?;
                t.flush().await?;
                Ok::<_, io::Error>(())
            }
        );
        (c.map_err(|e| e.to_string()), s.map_err(|e| e.to_string()))
    }

    #[tokio::test]
    async fn a_revoked_identity_is_refused_until_a_later_certificate() {
        let pki = Pki::new();
        let node = TlsIdentity::load(&pki.issue(Role::Node, "n1")).expect("node");
        let a1_files = pki.issue(Role::Agent, "a1");
        let a1 = TlsIdentity::load(&a1_files).expect("a1");
        let server = node.server_config().expect("server");
        let client = a1.client_config(Role::Node).expect("client");
        assert_eq!(handshake(server.clone(), client.clone()).await.1, Ok(()));

        let at = crate::time::now_ms();
        node.revocations()
            .set(revoke("a1", Role::Agent, at, 5))
            .expect("set");
        // The same configurations, which took a session ticket if one was sent: a
        // resumed session would skip the verifier.
        let (_, s) = handshake(server.clone(), client.clone()).await;
        assert!(s.as_ref().is_err_and(|e| e.contains("Revoked")), "{s:?}");
        let why = node.revocations().refusal(leaf(&a1_files).as_ref());
        assert!(
            why.as_deref()
                .is_some_and(|w| w.contains("agent a1 was revoked")),
            "{why:?}"
        );

        // A certificate for a1 signed after the revocation (the coordinator's
        // signer dates it after) is accepted by the same, unchanged configuration.
        let (key_pem, csr) = crate::pki::make_csr().expect("csr");
        let req = LeafRequest {
            role: Role::Agent,
            name: "a1".into(),
            dns: vec![],
            ips: vec![],
            days: 30,
        };
        let cert_pem = pki
            .signer()
            .sign_csr_after(&csr, &req, Some(at))
            .expect("sign");
        let der = crate::pki::parse_certs_pem(cert_pem.as_bytes()).expect("pem");
        let f = CertFacts::parse(der[0].as_ref(), "test.fleet").expect("facts");
        assert!(f.not_before_ms > at, "{} <= {at}", f.not_before_ms);
        let renewed = TlsFiles {
            cert: pki.dir.path().join("a1-new.crt"),
            key: pki.dir.path().join("a1-new.key"),
            ..a1_files.clone()
        };
        std::fs::write(&renewed.cert, &cert_pem).expect("cert");
        std::fs::write(&renewed.key, &key_pem).expect("key");
        // Valid from the next whole second at the latest.
        tokio::time::sleep(std::time::Duration::from_millis(
            u64::try_from((f.not_before_ms - crate::time::now_ms()).max(0)).unwrap_or(0) + 50,
        ))
        .await;
        let fresh = TlsIdentity::load(&renewed).expect("renewed a1");
        let (c, s) = handshake(server, fresh.client_config(Role::Node).expect("client")).await;
        assert_eq!((c, s), (Ok(()), Ok(())));
    }

    #[tokio::test]
    async fn the_crl_refuses_listed_serials_on_both_sides() {
        let pki = Pki::new();
        let node_files = pki.issue(Role::Node, "n1");
        let node = TlsIdentity::load(&node_files).expect("node");
        let a1_files = pki.issue(Role::Agent, "a1");
        let a1 = TlsIdentity::load(&a1_files).expect("a1");
        let serial = |files: &TlsFiles| {
            CertFacts::parse(leaf(files).as_ref(), "test.fleet")
                .expect("facts")
                .serial
        };
        let now = crate::time::now_ms();
        let crl_list = |s: &str| {
            let (der, _) = pki
                .signer()
                .sign_crl(7, &[(serial_bytes(s).expect("hex"), now)])
                .expect("crl");
            // No identity entries: only the CRL can refuse.
            pb::RevocationList {
                revocations: vec![],
                crl_der: der.into(),
                version: 7,
            }
        };
        node.revocations()
            .set(crl_list(&serial(&a1_files)))
            .expect("set");
        assert!(node.revocations().snapshot().crl_in_use());
        let (_, s) = handshake(
            node.server_config().expect("server"),
            a1.client_config(Role::Node).expect("client"),
        )
        .await;
        assert!(s.as_ref().is_err_and(|e| e.contains("Revoked")), "{s:?}");
        // The client side: an agent refuses a node whose serial is listed.
        a1.revocations()
            .set(crl_list(&serial(&node_files)))
            .expect("set");
        let (c, _) = handshake(
            TlsIdentity::load(&node_files)
                .expect("node")
                .server_config()
                .expect("server"),
            a1.client_config(Role::Node).expect("client"),
        )
        .await;
        assert!(c.as_ref().is_err_and(|e| e.contains("Revoked")), "{c:?}");
        // A CRL that is not one is not used; the identity rule still works.
        let mut bad = revoke("a1", Role::Agent, now, 8);
        bad.crl_der = vec![1, 2, 3].into();
        node.revocations().set(bad).expect("set");
        assert!(!node.revocations().snapshot().crl_in_use());
        assert!(
            node.revocations()
                .refusal(leaf(&a1_files).as_ref())
                .is_some()
        );
    }

    #[tokio::test]
    async fn clients_check_the_nodes_name_and_revocation() {
        let pki = Pki::new();
        let n2 = TlsIdentity::load(&pki.issue(Role::Node, "n2")).expect("n2");
        let a1 = TlsIdentity::load(&pki.issue(Role::Agent, "a1")).expect("a1");
        let for_n1 = a1
            .client_config_for(Role::Node, Some("n1"))
            .expect("client");
        let (c, _) = handshake(n2.server_config().expect("server"), for_n1).await;
        assert!(
            c.as_ref().is_err_and(|e| e.contains("expected node n1")),
            "{c:?}"
        );
        let for_n2 = a1
            .client_config_for(Role::Node, Some("n2"))
            .expect("client");
        let (c, _) = handshake(n2.server_config().expect("server"), for_n2.clone()).await;
        assert_eq!(c, Ok(()));
        // The same configuration refuses n2 once the agent's list revokes it.
        a1.revocations()
            .set(revoke("n2", Role::Node, crate::time::now_ms(), 3))
            .expect("set");
        let (c, _) = handshake(n2.server_config().expect("server"), for_n2).await;
        assert!(c.as_ref().is_err_and(|e| e.contains("Revoked")), "{c:?}");
    }

    #[tokio::test]
    async fn a_revoked_peers_connection_is_cut() {
        let pki = Pki::new();
        let node = TlsIdentity::load(&pki.issue(Role::Node, "n1")).expect("node");
        let a1 = pki.issue(Role::Agent, "a1");
        let a2 = pki.issue(Role::Agent, "a2");
        let revs = node.revocations().clone();
        // Real sockets: a cut shuts the accepted socket down.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("listen");
        let addr = listener.local_addr().expect("addr");
        let accept = async || {
            let near = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (far, _) = listener.accept().await.expect("accept");
            let dup = std::os::fd::AsFd::as_fd(&far)
                .try_clone_to_owned()
                .expect("dup");
            (near, far, dup)
        };
        let (mut near1, far1, dup1) = accept().await;
        let (mut near2, far2, dup2) = accept().await;
        let mut t1 = Tracked::new(
            far1,
            revs.track(Some(&leaf(&a1)), "a1-peer".into(), Some(dup1)),
        );
        let mut t2 = Tracked::new(
            far2,
            revs.track(Some(&leaf(&a2)), "a2-peer".into(), Some(dup2)),
        );
        assert_eq!(revs.tracked(), 2);
        // A read waiting on a1's connection ends with an error once a1 is revoked.
        let reader = tokio::spawn(async move {
            let mut b = [0u8; 4];
            t1.read(&mut b).await
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        revs.set(revoke("a1", Role::Agent, crate::time::now_ms(), 2))
            .expect("set");
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), reader)
            .await
            .expect("the read ended")
            .expect("task");
        assert!(
            r.as_ref()
                .is_err_and(|e| e.kind() == io::ErrorKind::ConnectionAborted),
            "{r:?}"
        );
        // a2's connection still works.
        near2.write_all(b"ping").await.expect("write");
        let mut b = [0u8; 4];
        t2.read_exact(&mut b).await.expect("a2 reads");
        assert_eq!(&b, b"ping");
        // The peer sees the connection end.
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            near1.read_to_end(&mut rest),
        )
        .await
        .expect("the peer's read ended");
        assert!(ended.as_ref().is_ok_and(|n| *n == 0), "{ended:?}");
        // a1's stream ended with its task; a2's when dropped.
        assert_eq!(revs.tracked(), 1, "a dropped connection is forgotten");
        drop(t2);
        assert_eq!(revs.tracked(), 0);
    }

    #[test]
    fn the_list_is_kept_in_a_file_and_only_newer_lists_are_taken() {
        let pki = Pki::new();
        let files = pki.issue(Role::Agent, "a1");
        let path = pki.dir.path().join("state").join("revocations.json");
        std::fs::create_dir_all(path.parent().expect("dir")).expect("dir");
        let one = TlsIdentity::load(&files).expect("id");
        one.revocations().persist_at(&path).expect("none yet");
        assert!(
            one.revocations()
                .apply_newer(revoke("n2", Role::Node, 1000, 10))
                .expect("apply")
        );
        assert!(
            !one.revocations()
                .apply_newer(revoke("n3", Role::Node, 2000, 9))
                .expect("older")
        );
        // A restart loads it.
        let two = TlsIdentity::load(&files).expect("id");
        two.revocations().persist_at(&path).expect("load");
        assert_eq!(two.revocations().version(), 10);
        assert_eq!(
            two.revocations().snapshot().revoked_at(Role::Node, "n2"),
            Some(1000)
        );
        // A damaged file is an error, not an empty list.
        std::fs::write(&path, b"{not json").expect("write");
        let three = TlsIdentity::load(&files).expect("id");
        let e = three.revocations().persist_at(&path).expect_err("damaged");
        assert!(e.to_string().contains("revocations.json"), "{e}");
    }

    #[test]
    fn serials_are_written_one_way() {
        assert_eq!(serial_hex(&[0, 0x8f, 0x01]), "8f01");
        assert_eq!(serial_hex(&[0]), "00");
        assert_eq!(serial_bytes("8f:01"), Some(vec![0x8f, 0x01]));
        assert_eq!(serial_bytes("f01"), Some(vec![0x0f, 0x01]));
        assert_eq!(serial_bytes("zz"), None);
    }
}
