//! The limits of every NBD listener (`bulwark_nbd::limits`) on real sockets:
//! a client that connects and then says nothing, or stops halfway through the
//! handshake (before or inside TLS), is dropped once `handshake_timeout` has passed,
//! and not before; a connection that finished its handshake may idle for as long as
//! it likes; past `max_connections` a new connection is closed before the greeting,
//! with a warning, while the open ones go on working, and a closed one frees its
//! place; the time the server spends looking an export up is not the client's.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bulwark_common::config::TlsFiles;
use bulwark_common::pki::{self, LeafRequest};
use bulwark_common::tls::{Role, TlsIdentity};
use bulwark_nbd::{
    Backend, Client, ExportResolver, FileBackend, Refusal, ServerOptions, proto, serve_tcp,
    serve_tls_tcp, serve_unix,
};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio_util::sync::CancellationToken;

const SIZE: usize = 1 << 20;
/// Short, so the tests are quick; the server must not drop anyone before it.
const HANDSHAKE: Duration = Duration::from_millis(500);
/// Longest any test waits for the server to close a connection.
const PATIENCE: Duration = Duration::from_secs(20);

// ---- Log capture, for the refusal warning ----

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

// ---- Servers ----

/// A file of `SIZE` bytes, each byte its offset mod 251.
fn image(dir: &Path) -> PathBuf {
    let path = dir.join("disk.raw");
    let data: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    std::fs::write(&path, data).unwrap();
    path
}

fn options(max_connections: usize, handshake_timeout: Duration) -> Arc<ServerOptions> {
    Arc::new(ServerOptions {
        max_connections,
        handshake_timeout,
        shutdown_grace: Duration::from_secs(2),
        ..ServerOptions::default()
    })
}

/// A plain server on a Unix socket or on TCP.
struct Plain {
    unix: Option<PathBuf>,
    tcp: Option<SocketAddr>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Plain {
    async fn start(tcp: bool, opts: Arc<ServerOptions>) -> Plain {
        log();
        let dir = tempfile::tempdir().unwrap();
        let backend: Arc<dyn Backend> =
            Arc::new(FileBackend::open(&image(dir.path()), false).unwrap());
        let stop = CancellationToken::new();
        if tcp {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let task = tokio::spawn(serve_tcp(l, backend, opts, stop.clone()));
            Plain {
                unix: None,
                tcp: Some(addr),
                stop,
                task,
                _dir: dir,
            }
        } else {
            let path = dir.path().join("nbd.sock");
            let l = UnixListener::bind(&path).unwrap();
            let task = tokio::spawn(serve_unix(l, backend, opts, stop.clone()));
            Plain {
                unix: Some(path),
                tcp: None,
                stop,
                task,
                _dir: dir,
            }
        }
    }

    /// A raw blocking connection.
    fn raw(&self) -> Box<dyn ReadWrite> {
        match (&self.unix, self.tcp) {
            (Some(p), _) => Box::new(std::os::unix::net::UnixStream::connect(p).unwrap()),
            (None, Some(a)) => Box::new(std::net::TcpStream::connect(a).unwrap()),
            (None, None) => unreachable!(),
        }
    }

    /// Our own NBD client, through the whole handshake.
    fn client(&self) -> Result<Client, bulwark_nbd::NbdError> {
        match (&self.unix, self.tcp) {
            (Some(p), _) => Client::connect_unix(p, "", &[]),
            (None, Some(a)) => Client::connect_tcp(a, "", &[]),
            (None, None) => unreachable!(),
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("the server did not stop")
            .unwrap();
    }
}

trait ReadWrite: Read + Write + Send {
    fn set_read_timeout(&self, t: Option<Duration>);
}
impl ReadWrite for std::os::unix::net::UnixStream {
    fn set_read_timeout(&self, t: Option<Duration>) {
        std::os::unix::net::UnixStream::set_read_timeout(self, t).unwrap();
    }
}
impl ReadWrite for std::net::TcpStream {
    fn set_read_timeout(&self, t: Option<Duration>) {
        std::net::TcpStream::set_read_timeout(self, t).unwrap();
    }
}

/// Reads until the server closes; the bytes read. Panics after `PATIENCE`.
fn read_until_closed(s: &mut dyn ReadWrite) -> Vec<u8> {
    s.set_read_timeout(Some(PATIENCE));
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("the server did not close the connection within {PATIENCE:?}: {e}"),
        }
    }
}

fn is_greeting(b: &[u8]) -> bool {
    b.len() == 18
        && proto::be_u64(&b[0..8]) == proto::NBD_MAGIC
        && proto::be_u64(&b[8..16]) == proto::IHAVEOPT
}

/// Reads 4 KiB at `offset` and checks the pattern.
fn reads_right(c: &mut Client, offset: u64) {
    let mut buf = vec![0u8; 4096];
    c.read(offset, &mut buf).unwrap();
    let want: Vec<u8> = (offset as usize..offset as usize + 4096)
        .map(|i| (i % 251) as u8)
        .collect();
    assert!(buf == want, "read the wrong bytes at {offset}");
}

// ---- Handshake deadline ----

/// A client that connects and says nothing gets the greeting, then nothing more
/// until `handshake_timeout` has passed, and then the connection ends. The same
/// for one that stops after its flags, halfway through an option header. One that
/// finished its handshake may idle past the timeout and still read.
#[tokio::test(flavor = "multi_thread")]
async fn silent_clients_are_dropped_after_the_handshake_timeout() {
    for tcp in [false, true] {
        let server = Plain::start(tcp, options(64, HANDSHAKE)).await;
        let mut idle = server.client().unwrap();
        let (silent, mut halfway) = (server.raw(), server.raw());
        let started = Instant::now();
        // Its flags, then the first two bytes of an option header.
        halfway.write_all(&[0, 0, 0, 3, 0x49, 0x48]).unwrap();
        let dropped = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for mut s in [silent, halfway] {
                let got = read_until_closed(&mut *s);
                out.push((got, started.elapsed()));
            }
            out
        })
        .await
        .unwrap();
        for (i, (got, after)) in dropped.iter().enumerate() {
            assert!(
                is_greeting(got),
                "client {i} (tcp {tcp}) got {got:?}, not just the greeting"
            );
            assert!(
                *after >= HANDSHAKE,
                "client {i} (tcp {tcp}) was dropped after {after:?}, before the {HANDSHAKE:?} it had"
            );
        }
        assert!(
            logged().contains("nbd_handshake_timeout"),
            "no log line names the timeout:\n{}",
            logged()
        );
        // In the transmission phase: no deadline.
        let idle = tokio::task::spawn_blocking(move || {
            std::thread::sleep(HANDSHAKE * 2);
            reads_right(&mut idle, 65536);
            idle
        })
        .await
        .unwrap();
        drop(idle);
        server.stop().await;
    }
}

// ---- Connection cap ----

/// With `max_connections = 2`, a third connection is closed before the greeting
/// (and logged) while the two open ones keep reading; closing one frees its place.
#[tokio::test(flavor = "multi_thread")]
async fn connections_past_the_cap_are_refused_while_earlier_ones_work() {
    for tcp in [false, true] {
        let server = Arc::new(Plain::start(tcp, options(2, Duration::from_secs(60))).await);
        let s = Arc::clone(&server);
        tokio::task::spawn_blocking(move || {
            let mut a = s.client().unwrap();
            let mut b = s.client().unwrap();
            let mut third = s.raw();
            let got = read_until_closed(&mut *third);
            assert!(
                got.is_empty(),
                "a connection past the cap (tcp {tcp}) got {got:?} instead of being closed"
            );
            // The refused connection cost the open ones nothing.
            reads_right(&mut a, 0);
            reads_right(&mut b, 8192);
            // Our client also sees the refusal, as a failed handshake.
            assert!(s.client().is_err(), "a client past the cap got through");
            a.disconnect().unwrap();
            // The server notices the close and frees the place.
            let deadline = Instant::now() + PATIENCE;
            let mut c = loop {
                match s.client() {
                    Ok(c) => break c,
                    Err(e) if Instant::now() < deadline => {
                        let _ = e;
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => panic!("a closed connection did not free its place: {e}"),
                }
            };
            reads_right(&mut c, 4096);
            reads_right(&mut b, 12288);
        })
        .await
        .unwrap();
        let log = logged();
        assert!(
            log.contains("NBD connection refused") && log.contains("nbd_max_connections = 2"),
            "the refusal was not logged:\n{log}"
        );
        match Arc::try_unwrap(server) {
            Ok(server) => server.stop().await,
            Err(_) => panic!("the server is still shared"),
        }
    }
}

// ---- TLS: the handshake deadline covers STARTTLS and the TLS handshake ----

const TRUST_DOMAIN: &str = "limits.test";

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        pki::init(&dir.path().join("ca"), TRUST_DOMAIN).unwrap();
        Pki { dir }
    }

    fn identity(&self, role: Role, name: &str) -> TlsIdentity {
        let ca = self.dir.path().join("ca");
        let issued = pki::issue(
            &ca,
            &LeafRequest {
                role,
                name: name.into(),
                dns: vec!["localhost".into()],
                ips: vec!["127.0.0.1".parse().unwrap()],
                days: 30,
            },
        )
        .unwrap();
        TlsIdentity::load(&TlsFiles {
            ca: ca.join("ca.crt"),
            cert: issued.cert,
            key: issued.key,
            renew_before: None,
        })
        .unwrap()
    }
}

/// One export, `disk`, looked up slowly: the lookup takes `delay`.
struct Slow {
    backend: Arc<dyn Backend>,
    delay: Duration,
}

impl ExportResolver for Slow {
    fn resolve(
        &self,
        name: &str,
        _peer_certs: &[CertificateDer<'static>],
    ) -> Result<Arc<dyn Backend>, Refusal> {
        std::thread::sleep(self.delay);
        if name == "disk" {
            Ok(Arc::clone(&self.backend))
        } else {
            Err(Refusal::Unknown(format!("no export {name:?}")))
        }
    }
}

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

async fn greeted(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).await.unwrap();
    assert!(is_greeting(&greet));
    s.write_all(&3u32.to_be_bytes()).await.unwrap();
    s
}

/// Waits for the server to end the connection; how long it took.
async fn closed_after<S: AsyncRead + Unpin>(s: &mut S, since: Instant) -> Duration {
    let mut rest = Vec::new();
    let r = tokio::time::timeout(PATIENCE, s.read_to_end(&mut rest))
        .await
        .expect("the server did not close the connection");
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "the server sent {rest:?} instead of closing"
    );
    since.elapsed()
}

/// On a TLS listener: a client silent after the greeting, one that never sends
/// its ClientHello after STARTTLS's ACK, and one that finishes TLS and then says
/// nothing are each dropped, none before the deadline. A lookup that takes three
/// times the deadline does not cut off a client that asked in time: the client
/// gets its export and reads.
#[tokio::test(flavor = "multi_thread")]
async fn tls_handshakes_have_the_same_deadline_without_the_server_s_lookups() {
    log();
    let pki = Pki::new();
    let server_tls = pki
        .identity(Role::Node, "nbd-server")
        .server_config()
        .unwrap();
    let client_tls = pki
        .identity(Role::Admin, "alice")
        .client_config(Role::Node)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let backend: Arc<dyn Backend> = Arc::new(FileBackend::open(&image(dir.path()), true).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(serve_tls_tcp(
        listener,
        server_tls,
        Arc::new(Slow {
            backend,
            delay: HANDSHAKE * 3,
        }),
        options(64, HANDSHAKE),
        stop.clone(),
    ));
    let tls_to = |s: TcpStream| {
        let name = ServerName::IpAddress("127.0.0.1".parse::<std::net::IpAddr>().unwrap().into());
        tokio_rustls::TlsConnector::from(Arc::clone(&client_tls)).connect(name, s)
    };
    let starttls = |mut s: TcpStream| async move {
        send_option(&mut s, proto::OPT_STARTTLS, &[]).await;
        assert_eq!(
            option_reply(&mut s).await,
            (proto::OPT_STARTTLS, proto::REP_ACK, vec![])
        );
        s
    };

    // Silent after the greeting.
    let t0 = Instant::now();
    let mut silent = greeted(addr).await;
    // Silent after STARTTLS's ACK: no ClientHello.
    let mut no_hello = starttls(greeted(addr).await).await;
    // Silent inside TLS.
    let mut inside = tls_to(starttls(greeted(addr).await).await).await.unwrap();
    for (what, after) in [
        (
            "silent after the greeting",
            closed_after(&mut silent, t0).await,
        ),
        ("no ClientHello", closed_after(&mut no_hello, t0).await),
        ("silent inside TLS", closed_after(&mut inside, t0).await),
    ] {
        assert!(
            after >= HANDSHAKE,
            "{what}: dropped after {after:?}, before its {HANDSHAKE:?}"
        );
    }

    // A slow lookup: GO takes three deadlines, and the client still gets the export.
    let mut t = tls_to(starttls(greeted(addr).await).await).await.unwrap();
    let go = proto::InfoRequest {
        name: "disk".into(),
        requests: vec![],
    }
    .encode();
    send_option(&mut t, proto::OPT_GO, &go).await;
    loop {
        let (_, typ, _) = option_reply(&mut t).await;
        if typ == proto::REP_ACK {
            break;
        }
        assert_eq!(typ, proto::REP_INFO, "GO was refused");
    }
    let req = proto::Request {
        flags: 0,
        typ: proto::CMD_READ,
        cookie: 1,
        offset: 4096,
        len: 16,
    };
    t.write_all(&req.encode()).await.unwrap();
    let mut reply = [0u8; 16 + 16];
    t.read_exact(&mut reply).await.unwrap();
    assert_eq!(proto::be_u32(&reply[0..4]), proto::SIMPLE_REPLY_MAGIC);
    assert_eq!(proto::be_u32(&reply[4..8]), 0, "the read failed");
    let want: Vec<u8> = (4096..4096 + 16).map(|i| (i % 251) as u8).collect();
    assert_eq!(&reply[16..], &want[..]);
    drop(t);
    stop.cancel();
    tokio::time::timeout(PATIENCE, task)
        .await
        .expect("the server did not stop")
        .unwrap();
}
