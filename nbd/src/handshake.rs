//! The fixed newstyle handshake, on tokio: the greeting (`greet`), option haggling
//! (`haggle`: exports, structured replies, `base:allocation`, `NBD_OPT_STARTTLS`),
//! the STARTTLS upgrade of a TLS listener (`starttls`), and the [`ExportResolver`]
//! that finds an export by name (with the client's certificates) or refuses it.

use std::io;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadHalf, WriteHalf,
};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::NbdError;
use crate::backend::Backend;
use crate::conn::{BASE_ALLOCATION_ID, Conn, READ_BUFFER};
use crate::limits;
use crate::options::ServerOptions;
use crate::proto;

/// Most options one client may send before it is considered abusive.
const MAX_OPTIONS: usize = 1024;
/// Read buffer of the handshake of a plain socket (whatever it holds at the end is
/// handed to the transmission phase).
pub(crate) const HANDSHAKE_BUFFER: usize = 4096;

/// Why an [`ExportResolver`] refused an export. The message goes back to the client
/// in the option's error reply (and to the log); `NBD_OPT_EXPORT_NAME`, which cannot
/// carry an error, closes the connection instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No export has that name: `NBD_REP_ERR_UNKNOWN`.
    #[error("unknown export: {0}")]
    Unknown(String),
    /// The export exists (or might) but this client may not use it:
    /// `NBD_REP_ERR_POLICY`.
    #[error("export forbidden: {0}")]
    Forbidden(String),
}

impl Refusal {
    /// The option reply type that carries this refusal.
    fn reply_type(&self) -> u32 {
        match self {
            Refusal::Unknown(_) => proto::REP_ERR_UNKNOWN,
            Refusal::Forbidden(_) => proto::REP_ERR_POLICY,
        }
    }

    /// The message for the client.
    pub fn message(&self) -> &str {
        match self {
            Refusal::Unknown(m) | Refusal::Forbidden(m) => m,
        }
    }
}

/// The fleet identity of an NBD client from its TLS certificates (resolvers that
/// serve only some roles ask this first, so a stranger learns nothing).
pub fn client_identity(
    peer_certs: &[rustls::pki_types::CertificateDer<'static>],
    trust_domain: &str,
) -> Result<bulwark_common::tls::Identity, Refusal> {
    peer_certs
        .first()
        .ok_or_else(|| Refusal::Forbidden("a fleet client certificate is required".into()))
        .and_then(|c| {
            bulwark_common::tls::Identity::parse(c.as_ref(), trust_domain)
                .map_err(|e| Refusal::Forbidden(e.to_string()))
        })
}

/// Finds the export a client asked for. Used by TLS listeners, where the client's
/// certificate is known before it names an export.
///
/// Called on a blocking thread (it may open files), once for every option that
/// names an export: `NBD_OPT_GO`, `NBD_OPT_INFO`, `NBD_OPT_EXPORT_NAME`,
/// `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`. The backend returned
/// for `NBD_OPT_GO` / `NBD_OPT_EXPORT_NAME` is served for the rest of the connection.
pub trait ExportResolver: Send + Sync + 'static {
    /// The export `name` for a client that presented `peer_certs` (leaf first; empty
    /// on a non-TLS connection). `Err` refuses the export: [`Refusal::Unknown`] for a
    /// name that does not exist, [`Refusal::Forbidden`] for a client that may not
    /// use it.
    fn resolve(
        &self,
        name: &str,
        peer_certs: &[CertificateDer<'static>],
    ) -> Result<Arc<dyn Backend>, Refusal>;

    /// Export names to answer `NBD_OPT_LIST` with. The default lists none (an empty
    /// list is a valid answer: the client has to know the name).
    fn list(&self, peer_certs: &[CertificateDer<'static>]) -> Vec<String> {
        let _ = peer_certs;
        Vec::new()
    }
}

/// The resolver of the single-backend API: one backend, under the empty name and
/// [`ServerOptions::export_name`].
pub(crate) struct SingleExport {
    backend: Arc<dyn Backend>,
    name: String,
}

impl SingleExport {
    pub(crate) fn resolver(
        backend: Arc<dyn Backend>,
        opts: &ServerOptions,
    ) -> Arc<dyn ExportResolver> {
        Arc::new(SingleExport {
            backend,
            name: opts.export_name.clone(),
        })
    }
}

impl ExportResolver for SingleExport {
    fn resolve(
        &self,
        name: &str,
        _peer_certs: &[CertificateDer<'static>],
    ) -> Result<Arc<dyn Backend>, Refusal> {
        if name.is_empty() || name == self.name {
            Ok(Arc::clone(&self.backend))
        } else {
            Err(Refusal::Unknown(format!("no export named {name:?}")))
        }
    }

    fn list(&self, _peer_certs: &[CertificateDer<'static>]) -> Vec<String> {
        vec![self.name.clone()]
    }
}

/// An export a client chose, with what the handshake tells the client about it.
pub(crate) struct Export {
    /// The name the client asked for.
    name: String,
    backend: Arc<dyn Backend>,
    size: u64,
    read_only: bool,
    flags: u16,
}

impl Export {
    pub(crate) fn new(name: &str, backend: Arc<dyn Backend>) -> Export {
        Export {
            name: name.to_string(),
            size: backend.size(),
            read_only: backend.read_only(),
            flags: transmission_flags(&*backend),
            backend,
        }
    }
}

fn transmission_flags(backend: &dyn Backend) -> u16 {
    let mut flags = proto::FLAG_HAS_FLAGS | proto::FLAG_SEND_FLUSH;
    if backend.read_only() {
        flags |= proto::FLAG_READ_ONLY;
    } else {
        flags |= proto::FLAG_SEND_FUA | proto::FLAG_SEND_TRIM | proto::FLAG_SEND_WRITE_ZEROES;
    }
    if backend.can_multi_conn() {
        flags |= proto::FLAG_CAN_MULTI_CONN;
    }
    flags
}

/// Where a connection stands with TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tls {
    /// Not offered: `NBD_OPT_STARTTLS` gets `NBD_REP_ERR_POLICY`.
    Off,
    /// Required and not started yet: only `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT`.
    Required,
    /// Started: a second `NBD_OPT_STARTTLS` gets `NBD_REP_ERR_INVALID`.
    Active,
}

/// Who is haggling, and where its exports come from.
pub(crate) struct Client {
    exports: Arc<dyn ExportResolver>,
    /// The client's TLS certificates, leaf first; empty without TLS.
    certs: Arc<Vec<CertificateDer<'static>>>,
    tls: Tls,
}

impl Client {
    pub(crate) fn plain(exports: Arc<dyn ExportResolver>) -> Client {
        Client {
            exports,
            certs: Arc::new(Vec::new()),
            tls: Tls::Off,
        }
    }

    /// Asks the resolver for export `name`, on a blocking thread.
    async fn resolve(&self, name: &str) -> Result<Export, Refusal> {
        let (exports, certs, asked) = (
            Arc::clone(&self.exports),
            Arc::clone(&self.certs),
            name.to_string(),
        );
        // A lookup may wait (a node's, for a running sync): not the client's time.
        let found = limits::server_work(tokio::task::spawn_blocking(move || {
            exports.resolve(&asked, &certs)
        }))
        .await;
        let backend = match found {
            Ok(Ok(backend)) => backend,
            Ok(Err(refusal)) => {
                tracing::info!(export = name, "NBD export refused: {refusal}");
                return Err(refusal);
            }
            Err(e) => {
                tracing::error!(export = name, "NBD export resolver failed: {e}");
                return Err(Refusal::Unknown("the export could not be looked up".into()));
            }
        };
        // size() and read_only() may touch the disk too.
        let name = name.to_string();
        limits::server_work(tokio::task::spawn_blocking(move || {
            Export::new(&name, backend)
        }))
        .await
        .map_err(|e| {
            tracing::error!("NBD export failed: {e}");
            Refusal::Unknown("the export could not be opened".into())
        })
    }

    /// The export names for `NBD_OPT_LIST`, from a blocking thread.
    async fn list(&self) -> Vec<String> {
        let (exports, certs) = (Arc::clone(&self.exports), Arc::clone(&self.certs));
        limits::server_work(tokio::task::spawn_blocking(move || exports.list(&certs)))
            .await
            .unwrap_or_else(|e| {
                tracing::error!("NBD export resolver failed to list exports: {e}");
                Vec::new()
            })
    }
}

/// What option haggling settled so far.
#[derive(Debug, Default)]
struct Negotiated {
    structured: bool,
    base_allocation: Option<u32>,
}

/// How option haggling ended.
enum Haggled {
    /// The client ended the session (`NBD_OPT_ABORT`, or closing between options)
    /// or the server is stopping.
    Ended,
    /// `NBD_OPT_STARTTLS` was acknowledged: the TLS handshake comes next.
    StartTls,
    /// An export was chosen: the transmission phase comes next.
    Ready(Ready),
}

/// An export chosen and the options negotiated for it.
struct Ready {
    export: Export,
    negotiated: Negotiated,
}

impl Ready {
    pub(crate) fn into_conn(self) -> Conn {
        let Ready { export, negotiated } = self;
        tracing::debug!(
            export = export.name,
            size = export.size,
            read_only = export.read_only,
            structured = negotiated.structured,
            base_allocation = negotiated.base_allocation.is_some(),
            "NBD handshake done"
        );
        Conn {
            backend: export.backend,
            size: export.size,
            read_only: export.read_only,
            structured: negotiated.structured,
            base_allocation: negotiated.base_allocation,
        }
    }
}

/// Sends the fixed newstyle greeting and reads the client's flags. `Some(no_zeroes)`
/// to go on, `None` when the client left or the server is stopping.
async fn greet<R, W>(
    rd: &mut BufReader<R>,
    wr: &mut W,
    shutdown: &CancellationToken,
) -> Result<Option<bool>, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut out = Vec::with_capacity(18);
    out.extend_from_slice(&proto::NBD_MAGIC.to_be_bytes());
    out.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    send(wr, &out).await?;

    let client_flags = tokio::select! {
        _ = shutdown.cancelled() => return Ok(None),
        r = rd.read_u32() => match r {
            Ok(f) => f,
            // Port probes and health checks connect and leave.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                tracing::debug!("client closed the connection after the greeting");
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        },
    };
    let known = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
    if client_flags & !known != 0 {
        return Err(NbdError::Protocol(format!(
            "client sent unknown client flags {client_flags:#x}"
        )));
    }
    Ok(Some(client_flags & proto::FLAG_C_NO_ZEROES != 0))
}

/// Option haggling, until an export is chosen, STARTTLS is acknowledged or the
/// session ends. Each call starts from nothing negotiated (after STARTTLS, nothing
/// said in the clear carries over).
async fn haggle<R, W>(
    rd: &mut BufReader<R>,
    wr: &mut W,
    client: &Client,
    no_zeroes: bool,
    shutdown: &CancellationToken,
) -> Result<Haggled, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut out = Vec::with_capacity(256);
    let mut st = Negotiated::default();

    for _ in 0..MAX_OPTIONS {
        let Some((option, data)) = read_option(rd, shutdown).await? else {
            return Ok(Haggled::Ended);
        };
        out.clear();
        let asked = Asked {
            option,
            data: &data,
            no_zeroes,
        };
        if let Some(haggled) = answer_option(wr, client, &asked, &mut st, &mut out).await? {
            return Ok(haggled);
        }
        send(wr, &out).await?;
    }
    Err(NbdError::Protocol(format!(
        "client sent more than {MAX_OPTIONS} options"
    )))
}

/// Reads the next option (header and data); `None` when the client closed the
/// connection between options or the server is stopping.
async fn read_option<R>(
    rd: &mut BufReader<R>,
    shutdown: &CancellationToken,
) -> Result<Option<(u32, Vec<u8>)>, NbdError>
where
    R: AsyncRead + Unpin,
{
    let mut hdr = [0u8; 16];
    tokio::select! {
        _ = shutdown.cancelled() => return Ok(None),
        r = rd.read_exact(&mut hdr) => match r {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                tracing::debug!("client closed the connection during option haggling");
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        },
    }
    let magic = proto::be_u64(&hdr[0..8]);
    let option = proto::be_u32(&hdr[8..12]);
    let len = proto::be_u32(&hdr[12..16]);
    if magic != proto::IHAVEOPT {
        return Err(NbdError::Protocol(format!(
            "option magic is {magic:#018x}, expected IHAVEOPT"
        )));
    }
    if len > proto::MAX_OPTION_DATA {
        return Err(NbdError::Protocol(format!(
            "{} carries {len} bytes of data, more than the {} accepted",
            proto::option_name(option),
            proto::MAX_OPTION_DATA
        )));
    }
    let mut data = vec![0u8; len as usize];
    rd.read_exact(&mut data).await?;
    Ok(Some((option, data)))
}

/// One option as the client sent it.
struct Asked<'a> {
    option: u32,
    data: &'a [u8],
    /// The client set `NBD_FLAG_C_NO_ZEROES` in its greeting.
    no_zeroes: bool,
}

/// Answers one option. `Some` ends haggling (whatever had to be sent is sent);
/// `None` goes on, after the caller sends the replies put in `out`.
async fn answer_option<W>(
    wr: &mut W,
    client: &Client,
    asked: &Asked<'_>,
    st: &mut Negotiated,
    out: &mut Vec<u8>,
) -> Result<Option<Haggled>, NbdError>
where
    W: AsyncWrite + Unpin,
{
    let (option, data) = (asked.option, asked.data);
    let len = data.len();
    let tls_required = client.tls == Tls::Required;
    match option {
        proto::OPT_ABORT => {
            proto::put_option_reply(out, option, proto::REP_ACK, &[]);
            // The client may already have gone; that is fine.
            let _ = send(wr, out).await;
            return Ok(Some(Haggled::Ended));
        }
        proto::OPT_STARTTLS => {
            let (typ, msg) = match client.tls {
                _ if len != 0 => (proto::REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data"),
                Tls::Off => (proto::REP_ERR_POLICY, "TLS is not offered by this server"),
                Tls::Active => (proto::REP_ERR_INVALID, "TLS is already active"),
                Tls::Required => {
                    proto::put_option_reply(out, option, proto::REP_ACK, &[]);
                    send(wr, out).await?;
                    return Ok(Some(Haggled::StartTls));
                }
            };
            option_error(out, option, typ, msg);
        }
        proto::OPT_EXPORT_NAME if tls_required => {
            // This option cannot carry an error; the protocol says to close.
            return Err(NbdError::Negotiation(format!(
                "client asked for export {:?} with NBD_OPT_EXPORT_NAME without TLS, which \
                 this server requires",
                String::from_utf8_lossy(data)
            )));
        }
        _ if tls_required => {
            let msg = format!(
                "TLS is required: send NBD_OPT_STARTTLS before {}",
                proto::option_name(option)
            );
            option_error(out, option, proto::REP_ERR_TLS_REQD, &msg);
        }
        proto::OPT_EXPORT_NAME => {
            let ready = export_name(wr, client, asked, st, out).await?;
            return Ok(Some(Haggled::Ready(ready)));
        }
        proto::OPT_LIST => list_exports(out, option, len, client).await,
        proto::OPT_INFO | proto::OPT_GO => match proto::InfoRequest::decode(data) {
            Err(e) => option_error(out, option, proto::REP_ERR_INVALID, &e.to_string()),
            Ok(req) => match client.resolve(&req.name).await {
                Err(refusal) => {
                    option_error(out, option, refusal.reply_type(), refusal.message());
                }
                Ok(export) => {
                    put_info(out, option, &req, &export);
                    if option == proto::OPT_GO {
                        send(wr, out).await?;
                        let negotiated = std::mem::take(st);
                        return Ok(Some(Haggled::Ready(Ready { export, negotiated })));
                    }
                }
            },
        },
        proto::OPT_STRUCTURED_REPLY => {
            if len != 0 {
                option_error(
                    out,
                    option,
                    proto::REP_ERR_INVALID,
                    "NBD_OPT_STRUCTURED_REPLY takes no data",
                );
            } else {
                st.structured = true;
                proto::put_option_reply(out, option, proto::REP_ACK, &[]);
            }
        }
        proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
            match meta_context_request(option, data, st) {
                Err((typ, msg)) => option_error(out, option, typ, &msg),
                Ok(req) => match client.resolve(&req.export).await {
                    Err(refusal) => {
                        option_error(out, option, refusal.reply_type(), refusal.message());
                    }
                    Ok(_) => meta_context(out, option, &req, st),
                },
            }
        }
        _ => {
            let msg = format!("{} ({option}) is not supported", proto::option_name(option));
            option_error(out, option, proto::REP_ERR_UNSUP, &msg);
        }
    }
    Ok(None)
}

/// Answers `NBD_OPT_LIST`: one `NBD_REP_SERVER` per export the resolver lists.
async fn list_exports(out: &mut Vec<u8>, option: u32, len: usize, client: &Client) {
    if len != 0 {
        option_error(
            out,
            option,
            proto::REP_ERR_INVALID,
            "NBD_OPT_LIST takes no data",
        );
    } else {
        for name in client.list().await {
            let mut d = Vec::new();
            proto::put_string32(&mut d, &name);
            proto::put_option_reply(out, option, proto::REP_SERVER, &d);
        }
        proto::put_option_reply(out, option, proto::REP_ACK, &[]);
    }
}

/// `NBD_OPT_EXPORT_NAME` without TLS required: the export and its reply (size,
/// flags and, unless the client asked for none, 124 bytes of zeroes), or the
/// refusal, which closes the connection since this option cannot carry an error.
async fn export_name<W>(
    wr: &mut W,
    client: &Client,
    asked: &Asked<'_>,
    st: &mut Negotiated,
    out: &mut Vec<u8>,
) -> Result<Ready, NbdError>
where
    W: AsyncWrite + Unpin,
{
    let name = String::from_utf8_lossy(asked.data);
    let export = match client.resolve(&name).await {
        Ok(e) => e,
        Err(refusal) => {
            return Err(NbdError::Negotiation(format!(
                "NBD_OPT_EXPORT_NAME for {name:?} refused, {refusal}"
            )));
        }
    };
    out.extend_from_slice(&export.size.to_be_bytes());
    out.extend_from_slice(&export.flags.to_be_bytes());
    if !asked.no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
    send(wr, out).await?;
    Ok(Ready {
        export,
        negotiated: std::mem::take(st),
    })
}

/// A TLS connection after its handshake: its two halves (the reading one
/// buffered) and what was negotiated, ready for the transmission phase.
type TlsConn<S> = (
    BufReader<ReadHalf<TlsStream<S>>>,
    WriteHalf<TlsStream<S>>,
    Conn,
);

/// The handshake of a connection that must start TLS (`NBD_OPT_STARTTLS`) before
/// anything else: the handshake up to STARTTLS on the plain stream, the TLS
/// handshake, then the rest of option haggling inside TLS with the client's
/// certificates known. `None` when the session ended during it; a failed TLS
/// handshake is logged here (naming `peer`) and ends the connection without an
/// error.
pub(crate) async fn starttls<S>(
    mut stream: S,
    peer: &str,
    acceptor: &TlsAcceptor,
    exports: Arc<dyn ExportResolver>,
    shutdown: &CancellationToken,
) -> Result<Option<TlsConn<S>>, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let no_zeroes = {
        let (rd, mut wr) = tokio::io::split(&mut stream);
        let mut rd = BufReader::with_capacity(HANDSHAKE_BUFFER, rd);
        let Some(no_zeroes) = greet(&mut rd, &mut wr, shutdown).await? else {
            return Ok(None);
        };
        let client = Client {
            exports: Arc::clone(&exports),
            certs: Arc::new(Vec::new()),
            tls: Tls::Required,
        };
        match haggle(&mut rd, &mut wr, &client, no_zeroes, shutdown).await? {
            Haggled::Ended => return Ok(None),
            Haggled::Ready(_) => {
                return Err(NbdError::Negotiation(
                    "an export was chosen before TLS".into(),
                ));
            }
            Haggled::StartTls => {}
        }
        // The client must wait for the ACK before its ClientHello; anything read
        // past the option would be plaintext smuggled into the TLS session.
        if !rd.buffer().is_empty() {
            return Err(NbdError::Protocol(
                "client sent data right behind NBD_OPT_STARTTLS, before the server's reply".into(),
            ));
        }
        no_zeroes
    };
    let tls = tokio::select! {
        _ = shutdown.cancelled() => return Ok(None),
        r = acceptor.accept(stream) => match r {
            Ok(tls) => tls,
            Err(e) => {
                tracing::warn!("NBD TLS handshake with {peer} failed: {e}");
                return Ok(None);
            }
        },
    };
    let certs = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(<[_]>::to_vec)
        .unwrap_or_default();
    if let Some(leaf) = certs.first() {
        match bulwark_common::tls::spiffe_uri(leaf.as_ref()) {
            Ok(id) => tracing::debug!(client = %id, "NBD TLS established"),
            Err(e) => tracing::debug!("NBD TLS established; client certificate: {e}"),
        }
    }
    let (rd, mut wr) = tokio::io::split(tls);
    let mut rd = BufReader::with_capacity(READ_BUFFER, rd);
    let client = Client {
        exports,
        certs: Arc::new(certs),
        tls: Tls::Active,
    };
    match haggle(&mut rd, &mut wr, &client, no_zeroes, shutdown).await? {
        Haggled::Ended => Ok(None),
        Haggled::StartTls => Err(NbdError::Negotiation("STARTTLS inside TLS".into())),
        Haggled::Ready(ready) => Ok(Some((rd, wr, ready.into_conn()))),
    }
}

/// The `NBD_REP_INFO` replies and the final ACK of `NBD_OPT_INFO` / `NBD_OPT_GO`.
fn put_info(out: &mut Vec<u8>, option: u32, req: &proto::InfoRequest, export: &Export) {
    let mut d = Vec::with_capacity(16);
    d.extend_from_slice(&proto::INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&export.size.to_be_bytes());
    d.extend_from_slice(&export.flags.to_be_bytes());
    proto::put_option_reply(out, option, proto::REP_INFO, &d);
    // The name as asked; the default export (empty name) has no other to give.
    if req.requests.contains(&proto::INFO_NAME) && !export.name.is_empty() {
        let mut d = proto::INFO_NAME.to_be_bytes().to_vec();
        d.extend_from_slice(export.name.as_bytes());
        proto::put_option_reply(out, option, proto::REP_INFO, &d);
    }
    // Sent whether asked or not, as the protocol allows: any alignment works, 4 KiB
    // is best, 32 MiB is the most per request.
    let mut d = proto::INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&proto::PREFERRED_BLOCK.to_be_bytes());
    d.extend_from_slice(&proto::MAX_PAYLOAD.to_be_bytes());
    proto::put_option_reply(out, option, proto::REP_INFO, &d);
    proto::put_option_reply(out, option, proto::REP_ACK, &[]);
}

/// Checks and decodes `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`;
/// `Err` is the error reply to send.
fn meta_context_request(
    option: u32,
    data: &[u8],
    st: &Negotiated,
) -> Result<proto::MetaContextRequest, (u32, String)> {
    if !st.structured {
        return Err((
            proto::REP_ERR_INVALID,
            format!(
                "{}: structured replies must be negotiated first",
                proto::option_name(option)
            ),
        ));
    }
    proto::MetaContextRequest::decode(data).map_err(|e| (proto::REP_ERR_INVALID, e.to_string()))
}

/// Answers `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` for an export
/// that exists. The only context is `base:allocation`.
fn meta_context(
    out: &mut Vec<u8>,
    option: u32,
    req: &proto::MetaContextRequest,
    st: &mut Negotiated,
) {
    let list = option == proto::OPT_LIST_META_CONTEXT;
    let selected = if list {
        // Listing: no query means everything; "base:" means the whole namespace.
        req.queries.is_empty()
            || req
                .queries
                .iter()
                .any(|q| q == proto::CONTEXT_BASE_ALLOCATION || q == "base:")
    } else {
        req.queries
            .iter()
            .any(|q| q == proto::CONTEXT_BASE_ALLOCATION)
    };
    if !list {
        // Each SET replaces the previous selection.
        st.base_allocation = selected.then_some(BASE_ALLOCATION_ID);
    }
    if selected {
        let id = if list { 0 } else { BASE_ALLOCATION_ID };
        let mut d = id.to_be_bytes().to_vec();
        d.extend_from_slice(proto::CONTEXT_BASE_ALLOCATION.as_bytes());
        proto::put_option_reply(out, option, proto::REP_META_CONTEXT, &d);
    }
    proto::put_option_reply(out, option, proto::REP_ACK, &[]);
}

fn option_error(out: &mut Vec<u8>, option: u32, typ: u32, message: &str) {
    tracing::debug!(
        "refusing {}: {} {message}",
        proto::option_name(option),
        proto::reply_type_name(typ)
    );
    let msg = proto::truncate_str(message, proto::MAX_STRING);
    proto::put_option_reply(out, option, typ, msg.as_bytes());
}

pub(crate) async fn send<W: AsyncWrite + Unpin>(wr: &mut W, bytes: &[u8]) -> io::Result<()> {
    wr.write_all(bytes).await?;
    wr.flush().await
}

/// The fuzz target `nbd_options` (fuzz/, cargo-fuzz): greeting and option haggling
/// of a client whose bytes are `rd`, with `exports`; with `tls_required`, as a TLS
/// listener before `NBD_OPT_STARTTLS`. `Ok(true)` when an export was chosen or
/// STARTTLS acknowledged.
pub(crate) async fn fuzz_haggle<R, W>(
    rd: &mut BufReader<R>,
    wr: &mut W,
    exports: Arc<dyn ExportResolver>,
    tls_required: bool,
) -> Result<bool, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let shutdown = CancellationToken::new();
    let Some(no_zeroes) = greet(rd, wr, &shutdown).await? else {
        return Ok(false);
    };
    let client = Client {
        exports,
        certs: Arc::new(Vec::new()),
        tls: if tls_required {
            Tls::Required
        } else {
            Tls::Off
        },
    };
    let haggled = haggle(rd, wr, &client, no_zeroes, &shutdown).await?;
    Ok(!matches!(haggled, Haggled::Ended))
}

/// The handshake of one connection without TLS, up to what its transmission phase
/// needs; `None` when the session ended during it.
pub(crate) async fn handshake<R, W>(
    rd: &mut BufReader<R>,
    wr: &mut W,
    client: &Client,
    shutdown: &CancellationToken,
) -> Result<Option<Conn>, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Some(no_zeroes) = greet(rd, wr, shutdown).await? else {
        return Ok(None);
    };
    match haggle(rd, wr, client, no_zeroes, shutdown).await? {
        Haggled::Ended => Ok(None),
        Haggled::Ready(ready) => Ok(Some(ready.into_conn())),
        Haggled::StartTls => Err(NbdError::Negotiation(
            "STARTTLS acknowledged on a server without TLS".into(),
        )),
    }
}
