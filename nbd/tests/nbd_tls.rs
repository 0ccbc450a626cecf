//! NBD over TLS: our `serve_tls_tcp` against qemu's clients (qemu-img, qemu-io)
//! with certificates from a fleet CA made by `pki`, and a raw byte-level client for
//! the parts of the protocol qemu does not exercise.
//!
//! How qemu reaches a TLS export (checked here with qemu 10.0):
//!
//! ```text
//! qemu-img convert -f raw \
//!     --object tls-creds-x509,id=tls0,dir=DIR,endpoint=client \
//!     'json:{"file":{"driver":"nbd","server":{"type":"inet","host":"127.0.0.1","port":"PORT"},"export":"vol@3","tls-creds":"tls0"}}' \
//!     -O raw OUT
//! ```
//!
//! DIR holds `ca-cert.pem` (the fleet CA), `client-cert.pem` and `client-key.pem`
//! (an admin certificate and its PKCS#8 key, as `pki::issue` writes them).
//!
//! - `pki::issue` gives leaf certificates `keyEncipherment` besides
//!   `digitalSignature`: qemu (GnuTLS) checks its own client certificate before
//!   connecting and refuses one without it ("usage does not permit key
//!   encipherment"), although TLS 1.3 with ECDSA never enciphers with the key.
//! - The host: qemu checks the server certificate against the host it dialled,
//!   and an IP SAN of 127.0.0.1 satisfies it; no `tls-hostname` is needed.
//! - The server's rustls config is `TlsIdentity::server_config()` as it is: its
//!   ALPN `h2` does not matter, qemu offers no ALPN.
//!
//! A test that needs a qemu tool that is not on PATH says so on stderr and passes
//! without checking anything.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bulwark_common::config::TlsFiles;
use bulwark_common::pki::{self, LeafRequest};
use bulwark_common::tls::{Identity, Role, TlsIdentity};
use bulwark_nbd::{
    Backend, ExportResolver, FileBackend, Refusal, ServerOptions, proto, serve_tls_tcp,
};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const MIB: usize = 1024 * 1024;
const TRUST_DOMAIN: &str = "test.fleet";
const EXPORT: &str = "vol@3";

/// Whether `tool` (qemu-utils) is installed; if not, the calling test skips
/// (`BULWARK-SKIP`, facility `tool`) and returns.
fn have(tool: &str) -> bool {
    bulwark_common::testkit::have_tool(tool, "qemu-utils")
}

// ---- Log capture: the server's warnings, for the tests that check them ----

/// Everything logged in this process (installed once; each test looks for its own
/// lines).
fn log() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = Capture(Arc::clone(&buf));
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        // Fails only if another test installed one first; then lines are not kept.
        let _ = tracing::subscriber::set_global_default(subscriber);
        buf
    })
}

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logged() -> String {
    String::from_utf8_lossy(&log().lock().unwrap()).into_owned()
}

// ---- The fleet: a CA, certificates, qemu credential directories ----

struct Fleet {
    dir: tempfile::TempDir,
    /// The server's TLS config, from a node certificate with IP SAN 127.0.0.1.
    server: Arc<rustls::ServerConfig>,
}

impl Fleet {
    fn new() -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        pki::init(&ca, TRUST_DOMAIN).unwrap();
        let node = issue(&ca, Role::Node, "nbd-server");
        let server = TlsIdentity::load(&node).unwrap().server_config().unwrap();
        for (role, name) in [(Role::Admin, "alice"), (Role::Agent, "host-1")] {
            let files = issue(&ca, role, name);
            qemu_creds(&dir.path().join(name), &files.ca, Some(&files));
        }
        // The same trust domain, but another CA: only the chain tells them apart.
        let other = dir.path().join("other-ca");
        pki::init(&other, TRUST_DOMAIN).unwrap();
        let mallory = issue(&other, Role::Admin, "mallory");
        qemu_creds(
            &dir.path().join("mallory"),
            &ca.join("ca.crt"),
            Some(&mallory),
        );
        // Trusts the server but has no certificate of its own.
        qemu_creds(&dir.path().join("anonymous"), &ca.join("ca.crt"), None);
        Fleet { dir, server }
    }

    /// The qemu credentials directory of a client (`alice`, `host-1`, `mallory`,
    /// `anonymous`).
    fn creds(&self, client: &str) -> PathBuf {
        self.dir.path().join(client)
    }

    /// A TLS identity of the fleet for the raw client (`alice` or `host-1`).
    fn identity(&self, client: &str) -> TlsIdentity {
        let ca = self.dir.path().join("ca");
        TlsIdentity::load(&TlsFiles {
            ca: ca.join("ca.crt"),
            cert: ca.join(format!("{client}.crt")),
            key: ca.join(format!("{client}.key")),
            renew_before: None,
        })
        .unwrap()
    }
}

fn issue(ca_dir: &Path, role: Role, name: &str) -> TlsFiles {
    let issued = pki::issue(
        ca_dir,
        &LeafRequest {
            role,
            name: name.into(),
            dns: vec!["localhost".into()],
            ips: vec!["127.0.0.1".parse().unwrap()],
            days: 30,
        },
    )
    .unwrap();
    TlsFiles {
        ca: ca_dir.join("ca.crt"),
        cert: issued.cert,
        key: issued.key,
        renew_before: None,
    }
}

/// Lays out a qemu `tls-creds-x509` directory for `endpoint=client`.
fn qemu_creds(dir: &Path, ca: &Path, client: Option<&TlsFiles>) {
    fs::create_dir_all(dir).unwrap();
    fs::copy(ca, dir.join("ca-cert.pem")).unwrap();
    if let Some(files) = client {
        fs::copy(&files.cert, dir.join("client-cert.pem")).unwrap();
        fs::copy(&files.key, dir.join("client-key.pem")).unwrap();
    }
}

// ---- The server: backup points by name, for admins only ----

/// Serves each named export to fleet admins; records every refusal.
struct Points {
    exports: HashMap<String, Arc<dyn Backend>>,
    refused: Mutex<Vec<Refusal>>,
}

impl Points {
    fn check(
        &self,
        name: &str,
        peer_certs: &[CertificateDer<'static>],
    ) -> Result<Arc<dyn Backend>, Refusal> {
        // Who first, so that a stranger learns nothing about which names exist.
        let leaf = peer_certs
            .first()
            .ok_or_else(|| Refusal::Forbidden("a client certificate is required".into()))?;
        let id = Identity::parse(leaf.as_ref(), TRUST_DOMAIN)
            .map_err(|e| Refusal::Forbidden(e.to_string()))?;
        if id.role != Role::Admin {
            return Err(Refusal::Forbidden(format!(
                "{id} may not read backup points: only admins may"
            )));
        }
        self.exports
            .get(name)
            .cloned()
            .ok_or_else(|| Refusal::Unknown(format!("no backup point named {name:?}")))
    }
}

impl ExportResolver for Points {
    fn resolve(
        &self,
        name: &str,
        peer_certs: &[CertificateDer<'static>],
    ) -> Result<Arc<dyn Backend>, Refusal> {
        let r = self.check(name, peer_certs);
        if let Err(refusal) = &r {
            self.refused.lock().unwrap().push(refusal.clone());
        }
        r
    }
}

/// A file of random bytes served read-only as `vol@3` over TLS.
struct Server {
    addr: SocketAddr,
    image: PathBuf,
    points: Arc<Points>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start(fleet: &Fleet) -> Server {
        log();
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("point.raw");
        fs::write(&image, random_bytes(4 * MIB + 4096, 0x5eed)).unwrap();
        let backend: Arc<dyn Backend> = Arc::new(FileBackend::open(&image, true).unwrap());
        let points = Arc::new(Points {
            exports: HashMap::from([(EXPORT.to_string(), backend)]),
            refused: Mutex::new(Vec::new()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve_tls_tcp(
            listener,
            Arc::clone(&fleet.server),
            Arc::clone(&points) as Arc<dyn ExportResolver>,
            Arc::new(ServerOptions::default()),
            shutdown.clone(),
        ));
        Server {
            addr,
            image,
            points,
            shutdown,
            task: Some(task),
            _dir: dir,
        }
    }

    /// Stops the server and checks it stops promptly.
    async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("the server did not stop")
                .unwrap();
        }
    }

    fn refusals(&self) -> Vec<Refusal> {
        self.points.refused.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

// ---- qemu ----

/// `--object` for a qemu client whose credentials are in `creds`.
/// Mallory's certificate comes from another CA, so it does not validate against the
/// fleet CA in her directory: qemu would refuse to use it before ever connecting.
/// `sanity-check=off` skips that local check, so that the server's refusal is what
/// the test sees.
fn tls_object(creds: &Path) -> String {
    let sanity = if creds.ends_with("mallory") {
        ",sanity-check=off"
    } else {
        ""
    };
    format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client{sanity}",
        creds.display()
    )
}

/// The qemu filename of export `export` on `addr` over TLS (`tls-creds=tls0`).
fn tls_image(addr: SocketAddr, export: &str) -> String {
    format!(
        r#"json:{{"file":{{"driver":"nbd","server":{{"type":"inet","host":"{}","port":"{}"}},"export":"{export}","tls-creds":"tls0"}}}}"#,
        addr.ip(),
        addr.port()
    )
}

/// Runs a qemu tool (at most a minute) and returns what it did.
async fn qemu(tool: &str, args: &[String]) -> Output {
    let mut cmd = tokio::process::Command::new(tool);
    cmd.args(args).kill_on_drop(true).stdin(Stdio::null());
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{tool} {args:?} did not finish within a minute"))
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `qemu-img convert` of `export` with the credentials in `creds` to `dest`.
async fn convert(addr: SocketAddr, creds: &Path, export: &str, dest: &Path) -> Output {
    let args = [
        "convert".to_string(),
        "-f".into(),
        "raw".into(),
        "--object".into(),
        tls_object(creds),
        tls_image(addr, export),
        "-O".into(),
        "raw".into(),
        dest.display().to_string(),
    ];
    qemu("qemu-img", &args).await
}

/// Asserts a qemu client failed and returns its output.
fn refused(out: &Output, what: &str) -> String {
    let t = text(out);
    assert!(!out.status.success(), "{what} succeeded:\n{t}");
    eprintln!("{what} was refused:\n{t}");
    t
}

/// Asserts a full copy of `vol@3` with `creds` matches the image byte for byte.
async fn copies_exactly(server: &Server, creds: &Path) {
    let dest = tempfile::tempdir().unwrap();
    let out_path = dest.path().join("copy.raw");
    let out = convert(server.addr, creds, EXPORT, &out_path).await;
    assert!(
        out.status.success(),
        "qemu-img convert failed:\n{}",
        text(&out)
    );
    let want = fs::read(&server.image).unwrap();
    let got = fs::read(&out_path).unwrap();
    assert_eq!(got.len(), want.len(), "the copy has the wrong size");
    assert!(
        got == want,
        "qemu-img's copy differs from the exported file"
    );
}

/// 1. qemu-img copies `vol@3` over TLS with an admin certificate, byte for byte.
#[tokio::test(flavor = "multi_thread")]
async fn qemu_img_copies_the_export_over_tls() {
    if !have("qemu-img") {
        return;
    }
    let fleet = Fleet::new();
    let server = Server::start(&fleet).await;
    copies_exactly(&server, &fleet.creds("alice")).await;
    // `--image-opts` works too, and the export reports its size.
    let info = qemu(
        "qemu-img",
        &[
            "info".into(),
            "--output=json".into(),
            "--object".into(),
            tls_object(&fleet.creds("alice")),
            "--image-opts".into(),
            format!(
                "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export={EXPORT},tls-creds=tls0",
                server.addr.port()
            ),
        ],
    )
    .await;
    assert!(
        info.status.success(),
        "qemu-img info failed:\n{}",
        text(&info)
    );
    assert!(
        text(&info).contains(&format!("\"virtual-size\": {}", 4 * MIB + 4096)),
        "{}",
        text(&info)
    );
    assert!(server.refusals().is_empty(), "{:?}", server.refusals());
    server.stop().await;
}

/// 2. The export is read-only: a qemu-io write fails and the file is unchanged,
///    while a read through the same route checks out.
#[tokio::test(flavor = "multi_thread")]
async fn qemu_io_cannot_write_over_tls() {
    if !have("qemu-io") {
        return;
    }
    let fleet = Fleet::new();
    let server = Server::start(&fleet).await;
    let before = fs::read(&server.image).unwrap();
    let io = |cmd: &str| {
        vec![
            "-f".to_string(),
            "raw".into(),
            "--object".into(),
            tls_object(&fleet.creds("alice")),
            tls_image(server.addr, EXPORT),
            "-c".into(),
            cmd.into(),
        ]
    };
    let out = qemu("qemu-io", &io("write -P 0x55 0 64k")).await;
    let t = text(&out);
    eprintln!("qemu-io write ({}):\n{t}", out.status);
    assert!(
        !out.status.success() || t.contains("failed") || t.contains("read-only"),
        "qemu-io wrote to the read-only export:\n{t}"
    );
    assert!(
        fs::read(&server.image).unwrap() == before,
        "the image changed"
    );
    // Reading works (qemu-io -r), and really compares: a wrong pattern fails.
    let byte = before[0];
    let mut read = io(&format!("read -P {byte:#04x} 0 1"));
    read.insert(0, "-r".into());
    let out = qemu("qemu-io", &read).await;
    assert!(out.status.success(), "qemu-io read failed:\n{}", text(&out));
    assert!(!text(&out).contains("fail"), "{}", text(&out));
    let mut wrong = io(&format!("read -P {:#04x} 0 1", byte ^ 0xff));
    wrong.insert(0, "-r".into());
    let out = qemu("qemu-io", &wrong).await;
    assert!(
        !out.status.success() || text(&out).contains("fail"),
        "qemu-io accepted a wrong pattern:\n{}",
        text(&out)
    );
    server.stop().await;
}

/// 3. A client without TLS is told TLS is required.
#[tokio::test(flavor = "multi_thread")]
async fn client_without_tls_is_refused() {
    if !have("qemu-img") {
        return;
    }
    let fleet = Fleet::new();
    let server = Server::start(&fleet).await;
    let out = qemu(
        "qemu-img",
        &[
            "info".into(),
            format!("nbd://127.0.0.1:{}/{EXPORT}", server.addr.port()),
        ],
    )
    .await;
    let t = refused(&out, "a client without TLS");
    assert!(t.contains("TLS"), "the refusal does not mention TLS:\n{t}");
    // The resolver was never asked: nothing passes before STARTTLS.
    assert!(server.refusals().is_empty(), "{:?}", server.refusals());
    server.stop().await;
}

/// 4. Certificates from another CA, and no certificate at all, fail the TLS
///    handshake; the server logs a warning naming the peer and the rustls error,
///    and goes on serving.
#[tokio::test(flavor = "multi_thread")]
async fn foreign_or_missing_certificate_is_refused() {
    if !have("qemu-img") {
        return;
    }
    let fleet = Fleet::new();
    let server = Server::start(&fleet).await;
    let dest = tempfile::tempdir().unwrap();
    let out_path = dest.path().join("copy.raw");

    let out = convert(server.addr, &fleet.creds("mallory"), EXPORT, &out_path).await;
    // What qemu says varies: in TLS 1.3 the client finishes its handshake before
    // the server has checked the client's certificate, so qemu either reads the
    // server's fatal alert or finds the socket closed when it sends an option.
    refused(&out, "a certificate from another CA");
    let out = convert(server.addr, &fleet.creds("anonymous"), EXPORT, &out_path).await;
    refused(&out, "a client without a certificate");
    assert!(server.refusals().is_empty(), "{:?}", server.refusals());

    // The listener is still up.
    copies_exactly(&server, &fleet.creds("alice")).await;
    server.stop().await;

    let log = logged();
    let failures: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("NBD TLS handshake with 127.0.0.1:"))
        .collect();
    // Chain verification fails (same trust domain and CA name, so rustls finds
    // the "issuer" and its signature does not match), and a missing certificate.
    assert!(
        failures
            .iter()
            .any(|l| l.contains("invalid peer certificate")),
        "no warning names the foreign certificate:\n{log}"
    );
    assert!(
        failures
            .iter()
            .any(|l| l.contains("peer sent no certificates")),
        "no warning names the missing certificate:\n{log}"
    );
}

/// 5. A fleet certificate of another role gets through TLS but the resolver
///    refuses it, and qemu shows the resolver's message.
#[tokio::test(flavor = "multi_thread")]
async fn certificate_of_another_role_is_refused() {
    if !have("qemu-img") {
        return;
    }
    let fleet = Fleet::new();
    let server = Server::start(&fleet).await;
    let dest = tempfile::tempdir().unwrap();
    let out = convert(
        server.addr,
        &fleet.creds("host-1"),
        EXPORT,
        &dest.path().join("copy.raw"),
    )
    .await;
    let t = refused(&out, "an agent certificate");
    assert!(t.contains("only admins may"), "{t}");
    assert!(
        matches!(server.refusals().first(), Some(Refusal::Forbidden(m)) if m.contains("agent host-1")),
        "{:?}",
        server.refusals()
    );
    server.stop().await;
}

/// 6. An unknown export name is refused, with the resolver's message.
#[tokio::test(flavor = "multi_thread")]
async fn unknown_export_is_refused() {
    if !have("qemu-img") {
        return;
    }
    let fleet = Fleet::new();
    let server = Server::start(&fleet).await;
    let dest = tempfile::tempdir().unwrap();
    let out = convert(
        server.addr,
        &fleet.creds("alice"),
        "vol@4",
        &dest.path().join("copy.raw"),
    )
    .await;
    let t = refused(&out, "an unknown export");
    assert!(t.contains("no backup point named"), "{t}");
    assert!(
        matches!(server.refusals().first(), Some(Refusal::Unknown(m)) if m.contains("vol@4")),
        "{:?}",
        server.refusals()
    );
    server.stop().await;
}

// ---- A raw client, for what qemu does not do ----

async fn send_option<S: AsyncWrite + Unpin>(s: &mut S, option: u32, data: &[u8]) {
    let mut b = proto::encode_option_header(option, data.len() as u32).to_vec();
    b.extend_from_slice(data);
    s.write_all(&b).await.unwrap();
}

async fn option_reply<S: AsyncRead + Unpin>(s: &mut S) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; proto::OptionReplyHeader::LEN];
    s.read_exact(&mut h).await.unwrap();
    let h = proto::OptionReplyHeader::decode(&h).unwrap();
    let mut d = vec![0u8; h.len as usize];
    s.read_exact(&mut d).await.unwrap();
    (h.option, h.typ, d)
}

/// Connects, reads the greeting and sends the client flags (fixed newstyle, no
/// zeroes).
async fn greeted(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).await.unwrap();
    assert_eq!(proto::be_u64(&greet[0..8]), proto::NBD_MAGIC);
    assert_eq!(proto::be_u64(&greet[8..16]), proto::IHAVEOPT);
    s.write_all(&3u32.to_be_bytes()).await.unwrap();
    s
}

/// STARTTLS as `client` (a fleet identity); returns the TLS stream.
async fn start_tls(
    fleet: &Fleet,
    client: &str,
    mut s: TcpStream,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    send_option(&mut s, proto::OPT_STARTTLS, &[]).await;
    assert_eq!(
        option_reply(&mut s).await,
        (proto::OPT_STARTTLS, proto::REP_ACK, vec![])
    );
    let config = fleet.identity(client).client_config(Role::Node).unwrap();
    let name = ServerName::IpAddress("127.0.0.1".parse::<std::net::IpAddr>().unwrap().into());
    tokio_rustls::TlsConnector::from(config)
        .connect(name, s)
        .await
        .unwrap()
}

fn info(name: &str) -> Vec<u8> {
    proto::InfoRequest {
        name: name.into(),
        requests: vec![],
    }
    .encode()
}

/// 7. The option rules around STARTTLS, without qemu: options before TLS get
///    `NBD_REP_ERR_TLS_REQD`, `NBD_OPT_EXPORT_NAME` before TLS closes, a second
///    STARTTLS is invalid, refusals carry the right reply type, and GO then a
///    read works inside TLS.
#[tokio::test(flavor = "multi_thread")]
async fn starttls_option_rules() {
    let fleet = Fleet::new();
    let server = Server::start(&fleet).await;

    // Before TLS.
    let mut s = greeted(server.addr).await;
    for (option, data) in [
        (proto::OPT_GO, info(EXPORT)),
        (proto::OPT_INFO, info(EXPORT)),
        (proto::OPT_LIST, vec![]),
        (proto::OPT_STRUCTURED_REPLY, vec![]),
        (4242, b"whatever".to_vec()),
    ] {
        send_option(&mut s, option, &data).await;
        let (opt, typ, msg) = option_reply(&mut s).await;
        assert_eq!((opt, typ), (option, proto::REP_ERR_TLS_REQD));
        assert!(String::from_utf8(msg).unwrap().contains("TLS is required"));
    }
    send_option(&mut s, proto::OPT_STARTTLS, b"x").await;
    assert_eq!(option_reply(&mut s).await.1, proto::REP_ERR_INVALID);
    send_option(&mut s, proto::OPT_ABORT, &[]).await;
    assert_eq!(option_reply(&mut s).await.1, proto::REP_ACK);

    let mut s = greeted(server.addr).await;
    send_option(&mut s, proto::OPT_EXPORT_NAME, EXPORT.as_bytes()).await;
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("NBD_OPT_EXPORT_NAME before TLS did not close the connection");
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "the server answered NBD_OPT_EXPORT_NAME before TLS: {rest:?}"
    );

    // Inside TLS, as an agent: through TLS, refused by the resolver with POLICY.
    let mut t = start_tls(&fleet, "host-1", greeted(server.addr).await).await;
    send_option(&mut t, proto::OPT_GO, &info(EXPORT)).await;
    let (_, typ, msg) = option_reply(&mut t).await;
    assert_eq!(typ, proto::REP_ERR_POLICY);
    assert!(String::from_utf8(msg).unwrap().contains("only admins may"));
    send_option(&mut t, proto::OPT_ABORT, &[]).await;
    assert_eq!(option_reply(&mut t).await.1, proto::REP_ACK);

    // Inside TLS, as an admin.
    let mut t = start_tls(&fleet, "alice", greeted(server.addr).await).await;
    send_option(&mut t, proto::OPT_STARTTLS, &[]).await;
    assert_eq!(option_reply(&mut t).await.1, proto::REP_ERR_INVALID);
    // Nothing negotiated in the clear carries over; LIST names no export.
    send_option(&mut t, proto::OPT_LIST, &[]).await;
    assert_eq!(option_reply(&mut t).await.1, proto::REP_ACK);
    send_option(&mut t, proto::OPT_INFO, &info("vol@4")).await;
    assert_eq!(option_reply(&mut t).await.1, proto::REP_ERR_UNKNOWN);
    send_option(&mut t, proto::OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(option_reply(&mut t).await.1, proto::REP_ACK);
    let meta = |export: &str| {
        proto::MetaContextRequest {
            export: export.into(),
            queries: vec!["base:allocation".into()],
        }
        .encode()
    };
    send_option(&mut t, proto::OPT_SET_META_CONTEXT, &meta("vol@4")).await;
    assert_eq!(option_reply(&mut t).await.1, proto::REP_ERR_UNKNOWN);
    send_option(&mut t, proto::OPT_SET_META_CONTEXT, &meta(EXPORT)).await;
    assert_eq!(option_reply(&mut t).await.1, proto::REP_META_CONTEXT);
    assert_eq!(option_reply(&mut t).await.1, proto::REP_ACK);
    send_option(&mut t, proto::OPT_GO, &info(EXPORT)).await;
    let mut size = None;
    loop {
        let (_, typ, d) = option_reply(&mut t).await;
        if typ == proto::REP_ACK {
            break;
        }
        assert_eq!(typ, proto::REP_INFO);
        if proto::be_u16(&d[0..2]) == proto::INFO_EXPORT {
            size = Some(proto::be_u64(&d[2..10]));
            assert_ne!(proto::be_u16(&d[10..12]) & proto::FLAG_READ_ONLY, 0);
        }
    }
    assert_eq!(size, Some((4 * MIB + 4096) as u64));

    // A 4 KiB read at 1 MiB, in one structured data chunk.
    let req = proto::Request {
        flags: 0,
        typ: proto::CMD_READ,
        cookie: 7,
        offset: MIB as u64,
        len: 4096,
    };
    t.write_all(&req.encode()).await.unwrap();
    let mut hdr = [0u8; 20];
    t.read_exact(&mut hdr).await.unwrap();
    assert_eq!(proto::be_u16(&hdr[6..8]), proto::REPLY_TYPE_OFFSET_DATA);
    assert_eq!(proto::be_u64(&hdr[8..16]), 7);
    assert_eq!(proto::be_u32(&hdr[16..20]), 8 + 4096);
    let mut d = vec![0u8; 8 + 4096];
    t.read_exact(&mut d).await.unwrap();
    assert_eq!(proto::be_u64(&d[0..8]), MIB as u64);
    let want = fs::read(&server.image).unwrap();
    assert!(d[8..] == want[MIB..MIB + 4096], "read the wrong bytes");

    // A write (which qemu would not even try on a read-only export) gets EPERM.
    let req = proto::Request {
        flags: 0,
        typ: proto::CMD_WRITE,
        cookie: 8,
        offset: 0,
        len: 4096,
    };
    t.write_all(&req.encode()).await.unwrap();
    t.write_all(&[0x55; 4096]).await.unwrap();
    t.read_exact(&mut hdr).await.unwrap();
    assert_eq!(proto::be_u16(&hdr[6..8]), proto::REPLY_TYPE_ERROR);
    assert_eq!(proto::be_u64(&hdr[8..16]), 8);
    let mut d = vec![0u8; proto::be_u32(&hdr[16..20]) as usize];
    t.read_exact(&mut d).await.unwrap();
    assert_eq!(proto::Errno(proto::be_u32(&d[0..4])), proto::Errno::EPERM);
    assert!(
        fs::read(&server.image).unwrap() == want,
        "the image changed"
    );
    drop(t);
    server.stop().await;
}
