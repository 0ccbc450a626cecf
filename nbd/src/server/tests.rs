//! Tests of the server: handshakes and transmission over real sockets, both readers.

use super::*;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::NbdError;
use crate::backend::*;
use crate::blocking::*;
use crate::conn::*;
use crate::proto::{self, Errno, Request};
use crate::splice::Spliced;
use crate::transmission::*;

/// An in-memory backend for byte-exact protocol tests.
struct MemBackend {
    data: Mutex<Vec<u8>>,
    read_only: bool,
    /// Writes whose payload came in pipes.
    spliced: AtomicUsize,
}

impl MemBackend {
    fn new(size: usize, read_only: bool) -> Arc<Self> {
        let data = (0..size).map(|i| (i % 251) as u8).collect();
        Arc::new(MemBackend {
            data: Mutex::new(data),
            read_only,
            spliced: AtomicUsize::new(0),
        })
    }
}

impl Backend for MemBackend {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.data.lock().unwrap();
        let o = offset as usize;
        buf.copy_from_slice(&d[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, data: &[u8], offset: u64, _fua: bool) -> io::Result<()> {
        let mut d = self.data.lock().unwrap();
        let o = offset as usize;
        d[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn trim(&self, _offset: u64, _len: u64, _fua: bool) -> io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _fua: bool, _may_trim: bool) -> io::Result<()> {
        let mut d = self.data.lock().unwrap();
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn takes_spliced(&self) -> bool {
        true
    }
    fn write_spliced(&self, data: &mut Spliced, offset: u64, fua: bool) -> io::Result<()> {
        self.spliced.fetch_add(1, Ordering::Relaxed);
        self.write_at(&data.to_vec()?, offset, fua)
    }
}

/// How the server under test reads requests: the two transmission paths.
#[derive(Debug, Clone, Copy)]
enum Via {
    /// A tokio task, as for any stream (`serve_until`).
    Task,
    /// A blocking thread, as for the plain sockets of `serve_unix`/`serve_tcp`.
    Threads,
}

fn test_options() -> ServerOptions {
    ServerOptions {
        export_name: "disk".into(),
        ..ServerOptions::default()
    }
}

/// Serves one end of a socket pair the way `via` says.
fn spawn_server(
    via: Via,
    stream: UnixStream,
    backend: Arc<dyn Backend>,
    opts: ServerOptions,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<Result<(), NbdError>> {
    let opts = Arc::new(opts);
    match via {
        Via::Task => tokio::spawn(serve_until(stream, backend, opts, shutdown)),
        Via::Threads => {
            let exports = SingleExport::resolver(backend, &opts);
            tokio::spawn(serve_plain(stream, exports, opts, shutdown))
        }
    }
}

/// A raw client speaking bytes to the server over a Unix socket.
struct Raw {
    io: UnixStream,
    /// The connection's task, when the test started it.
    server: Option<tokio::task::JoinHandle<Result<(), NbdError>>>,
    /// The export size `go` expects the server to announce.
    expect_size: u64,
}

impl Raw {
    async fn start(via: Via, backend: Arc<dyn Backend>) -> Raw {
        Raw::start_with(via, backend, test_options(), CancellationToken::new()).await
    }

    async fn start_with(
        via: Via,
        backend: Arc<dyn Backend>,
        opts: ServerOptions,
        shutdown: CancellationToken,
    ) -> Raw {
        let (client, server) = UnixStream::pair().unwrap();
        let server = spawn_server(via, server, backend, opts, shutdown);
        Raw::greeted(client, Some(server)).await
    }

    async fn greeted(
        io: UnixStream,
        server: Option<tokio::task::JoinHandle<Result<(), NbdError>>>,
    ) -> Raw {
        let mut raw = Raw {
            io,
            server,
            expect_size: 1 << 20,
        };
        let mut greet = [0u8; 18];
        raw.io.read_exact(&mut greet).await.unwrap();
        assert_eq!(proto::be_u64(&greet[0..8]), proto::NBD_MAGIC);
        assert_eq!(proto::be_u64(&greet[8..16]), proto::IHAVEOPT);
        assert_eq!(proto::be_u16(&greet[16..18]), 3);
        raw
    }

    async fn send(&mut self, b: &[u8]) {
        self.io.write_all(b).await.unwrap();
    }

    async fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = proto::encode_option_header(option, data.len() as u32).to_vec();
        b.extend_from_slice(data);
        self.send(&b).await;
    }

    async fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; proto::OptionReplyHeader::LEN];
        self.io.read_exact(&mut h).await.unwrap();
        let h = proto::OptionReplyHeader::decode(&h).unwrap();
        let mut d = vec![0u8; h.len as usize];
        self.io.read_exact(&mut d).await.unwrap();
        (h.option, h.typ, d)
    }

    /// Handshake with NO_ZEROES, optional structured replies and
    /// base:allocation, then GO. Returns the transmission flags.
    async fn go(&mut self, structured: bool, base_allocation: bool) -> u16 {
        self.send(&3u32.to_be_bytes()).await;
        if structured {
            self.option(proto::OPT_STRUCTURED_REPLY, &[]).await;
            assert_eq!(self.option_reply().await.1, proto::REP_ACK);
        }
        if base_allocation {
            let q = proto::MetaContextRequest {
                export: String::new(),
                queries: vec!["base:allocation".into()],
            };
            self.option(proto::OPT_SET_META_CONTEXT, &q.encode()).await;
            let (_, typ, d) = self.option_reply().await;
            assert_eq!(typ, proto::REP_META_CONTEXT);
            assert_eq!(proto::be_u32(&d[0..4]), BASE_ALLOCATION_ID);
            assert_eq!(&d[4..], b"base:allocation");
            assert_eq!(self.option_reply().await.1, proto::REP_ACK);
        }
        let go = proto::InfoRequest {
            name: "disk".into(),
            requests: vec![proto::INFO_BLOCK_SIZE],
        };
        self.option(proto::OPT_GO, &go.encode()).await;
        let mut flags = None;
        let mut block_size = None;
        loop {
            let (opt, typ, d) = self.option_reply().await;
            assert_eq!(opt, proto::OPT_GO);
            if typ == proto::REP_ACK {
                break;
            }
            assert_eq!(typ, proto::REP_INFO);
            match proto::be_u16(&d[0..2]) {
                proto::INFO_EXPORT => {
                    assert_eq!(proto::be_u64(&d[2..10]), self.expect_size);
                    flags = Some(proto::be_u16(&d[10..12]));
                }
                proto::INFO_BLOCK_SIZE => {
                    block_size = Some((
                        proto::be_u32(&d[2..6]),
                        proto::be_u32(&d[6..10]),
                        proto::be_u32(&d[10..14]),
                    ));
                }
                t => panic!("unexpected info {t}"),
            }
        }
        assert_eq!(block_size, Some((1, 4096, 32 << 20)));
        flags.unwrap()
    }

    async fn request(&mut self, typ: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
        let r = Request {
            flags,
            typ,
            cookie,
            offset,
            len,
        };
        self.send(&r.encode()).await;
    }

    async fn simple_reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.io.read_exact(&mut h).await.unwrap();
        assert_eq!(proto::be_u32(&h[0..4]), proto::SIMPLE_REPLY_MAGIC);
        (proto::be_u32(&h[4..8]), proto::be_u64(&h[8..16]))
    }

    async fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let mut h = [0u8; 20];
        self.io.read_exact(&mut h).await.unwrap();
        assert_eq!(proto::be_u32(&h[0..4]), proto::STRUCTURED_REPLY_MAGIC);
        let len = proto::be_u32(&h[16..20]);
        let mut d = vec![0u8; len as usize];
        self.io.read_exact(&mut d).await.unwrap();
        (
            proto::be_u16(&h[4..6]),
            proto::be_u16(&h[6..8]),
            proto::be_u64(&h[8..16]),
            d,
        )
    }

    async fn expect_closed(mut self) -> Result<(), NbdError> {
        let mut b = [0u8; 64];
        let n = self.io.read(&mut b).await.unwrap_or(0);
        assert_eq!(n, 0, "server should have closed the connection");
        match self.server {
            Some(server) => server.await.unwrap(),
            None => Ok(()),
        }
    }
}

fn pattern(offset: usize, len: usize) -> Vec<u8> {
    (offset..offset + len).map(|i| (i % 251) as u8).collect()
}

async fn options_are_answered(via: Via) {
    let mut c = Raw::start(via, MemBackend::new(1 << 20, false)).await;
    c.send(&3u32.to_be_bytes()).await;

    c.option(proto::OPT_STARTTLS, &[]).await;
    let (opt, typ, msg) = c.option_reply().await;
    assert_eq!((opt, typ), (proto::OPT_STARTTLS, proto::REP_ERR_POLICY));
    assert!(String::from_utf8(msg).unwrap().contains("TLS"));

    c.option(4242, b"whatever").await;
    assert_eq!(c.option_reply().await.1, proto::REP_ERR_UNSUP);

    c.option(proto::OPT_EXTENDED_HEADERS, &[]).await;
    assert_eq!(c.option_reply().await.1, proto::REP_ERR_UNSUP);

    c.option(proto::OPT_LIST, &[]).await;
    let (_, typ, d) = c.option_reply().await;
    assert_eq!(typ, proto::REP_SERVER);
    assert_eq!(proto::be_u32(&d[0..4]), 4);
    assert_eq!(&d[4..], b"disk");
    assert_eq!(c.option_reply().await.1, proto::REP_ACK);

    c.option(proto::OPT_LIST, b"x").await;
    assert_eq!(c.option_reply().await.1, proto::REP_ERR_INVALID);

    // Meta contexts need structured replies first.
    let q = proto::MetaContextRequest {
        export: String::new(),
        queries: vec![],
    };
    c.option(proto::OPT_LIST_META_CONTEXT, &q.encode()).await;
    assert_eq!(c.option_reply().await.1, proto::REP_ERR_INVALID);

    c.option(proto::OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(c.option_reply().await.1, proto::REP_ACK);

    // Listing everything shows base:allocation with id 0.
    c.option(proto::OPT_LIST_META_CONTEXT, &q.encode()).await;
    let (_, typ, d) = c.option_reply().await;
    assert_eq!(typ, proto::REP_META_CONTEXT);
    assert_eq!(proto::be_u32(&d[0..4]), 0);
    assert_eq!(&d[4..], b"base:allocation");
    assert_eq!(c.option_reply().await.1, proto::REP_ACK);

    // An unknown context selects nothing.
    let q = proto::MetaContextRequest {
        export: String::new(),
        queries: vec!["qemu:dirty-bitmap:b0".into()],
    };
    c.option(proto::OPT_SET_META_CONTEXT, &q.encode()).await;
    assert_eq!(c.option_reply().await.1, proto::REP_ACK);

    // Unknown export for INFO, then a malformed INFO.
    let info = proto::InfoRequest {
        name: "nope".into(),
        requests: vec![],
    };
    c.option(proto::OPT_INFO, &info.encode()).await;
    assert_eq!(c.option_reply().await.1, proto::REP_ERR_UNKNOWN);
    c.option(proto::OPT_INFO, &[0, 0, 0, 9]).await;
    assert_eq!(c.option_reply().await.1, proto::REP_ERR_INVALID);

    c.option(proto::OPT_ABORT, &[]).await;
    assert_eq!(c.option_reply().await.1, proto::REP_ACK);
    c.expect_closed().await.unwrap();
}

async fn export_name_with_zeroes(via: Via) {
    let mut c = Raw::start(via, MemBackend::new(1 << 20, true)).await;
    // Fixed newstyle without NO_ZEROES.
    c.send(&1u32.to_be_bytes()).await;
    c.option(proto::OPT_EXPORT_NAME, b"disk").await;
    let mut b = [0u8; 8 + 2 + 124];
    c.io.read_exact(&mut b).await.unwrap();
    assert_eq!(proto::be_u64(&b[0..8]), 1 << 20);
    let flags = proto::be_u16(&b[8..10]);
    assert_ne!(flags & proto::FLAG_READ_ONLY, 0);
    assert_eq!(flags & proto::FLAG_SEND_TRIM, 0);
    assert!(b[10..].iter().all(|&x| x == 0));
    // Read-only: writes get EPERM (payload consumed, stream stays in sync).
    c.request(proto::CMD_WRITE, 0, 1, 0, 4).await;
    c.send(b"abcd").await;
    assert_eq!(c.simple_reply().await, (1, 1));
    c.request(proto::CMD_READ, 0, 2, 0, 4).await;
    assert_eq!(c.simple_reply().await, (0, 2));
    let mut d = [0u8; 4];
    c.io.read_exact(&mut d).await.unwrap();
    assert_eq!(d.to_vec(), pattern(0, 4));
    c.request(proto::CMD_DISC, 0, 3, 0, 0).await;
    c.expect_closed().await.unwrap();
}

async fn unknown_export_name_closes(via: Via) {
    let mut c = Raw::start(via, MemBackend::new(1 << 20, false)).await;
    c.send(&3u32.to_be_bytes()).await;
    c.option(proto::OPT_EXPORT_NAME, b"other").await;
    let e = c.expect_closed().await.unwrap_err();
    assert!(e.to_string().contains("unknown export"), "{e}");
}

async fn unknown_client_flags_close(via: Via) {
    let mut c = Raw::start(via, MemBackend::new(1 << 20, false)).await;
    c.send(&0x80u32.to_be_bytes()).await;
    let e = c.expect_closed().await.unwrap_err();
    assert!(matches!(e, NbdError::Protocol(_)), "{e}");
}

async fn simple_replies(via: Via) {
    let mut c = Raw::start(via, MemBackend::new(1 << 20, false)).await;
    let flags = c.go(false, false).await;
    assert_eq!(
        flags,
        proto::FLAG_HAS_FLAGS
            | proto::FLAG_SEND_FLUSH
            | proto::FLAG_SEND_FUA
            | proto::FLAG_SEND_TRIM
            | proto::FLAG_SEND_WRITE_ZEROES
    );
    c.request(proto::CMD_WRITE, proto::CMD_FLAG_FUA, 10, 100, 3)
        .await;
    c.send(b"xyz").await;
    assert_eq!(c.simple_reply().await, (0, 10));
    c.request(proto::CMD_READ, 0, 11, 99, 5).await;
    assert_eq!(c.simple_reply().await, (0, 11));
    let mut d = [0u8; 5];
    c.io.read_exact(&mut d).await.unwrap();
    assert_eq!(
        &d,
        &[pattern(99, 1)[0], b'x', b'y', b'z', pattern(103, 1)[0]]
    );
    // Out of range: EINVAL for reads, ENOSPC for writes, no payload either way.
    c.request(proto::CMD_READ, 0, 12, (1 << 20) - 1, 2).await;
    assert_eq!(c.simple_reply().await, (22, 12));
    c.request(proto::CMD_WRITE_ZEROES, 0, 13, u64::MAX, 1).await;
    assert_eq!(c.simple_reply().await, (28, 13));
    // Unknown command and unknown flag.
    c.request(99, 0, 14, 0, 0).await;
    assert_eq!(c.simple_reply().await, (22, 14));
    c.request(proto::CMD_READ, proto::CMD_FLAG_DF, 15, 0, 1)
        .await;
    assert_eq!(c.simple_reply().await, (22, 15));
    // Too large a read.
    c.request(proto::CMD_READ, 0, 16, 0, proto::MAX_PAYLOAD + 1)
        .await;
    assert_eq!(c.simple_reply().await, (75, 16));
    // Block status without a context.
    c.request(proto::CMD_BLOCK_STATUS, 0, 17, 0, 512).await;
    assert_eq!(c.simple_reply().await, (22, 17));
    c.request(proto::CMD_WRITE_ZEROES, proto::CMD_FLAG_NO_HOLE, 18, 101, 1)
        .await;
    assert_eq!(c.simple_reply().await, (0, 18));
    c.request(proto::CMD_FLUSH, 0, 19, 0, 0).await;
    assert_eq!(c.simple_reply().await, (0, 19));
    c.request(proto::CMD_READ, 0, 20, 100, 3).await;
    assert_eq!(c.simple_reply().await, (0, 20));
    let mut d = [0u8; 3];
    c.io.read_exact(&mut d).await.unwrap();
    assert_eq!(&d, b"x\0z");
    c.request(proto::CMD_DISC, 0, 21, 0, 0).await;
    c.expect_closed().await.unwrap();
}

async fn structured_replies(via: Via) {
    let mut c = Raw::start(via, MemBackend::new(1 << 20, false)).await;
    c.go(true, true).await;
    c.request(proto::CMD_READ, 0, 1, 4096, 100).await;
    let (flags, typ, cookie, d) = c.chunk().await;
    assert_eq!(
        (flags, typ, cookie),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_DATA, 1)
    );
    assert_eq!(proto::be_u64(&d[0..8]), 4096);
    assert_eq!(d[8..].to_vec(), pattern(4096, 100));

    // A large read goes out with a vectored write; same bytes.
    c.request(proto::CMD_READ, 0, 2, 0, 1 << 20).await;
    let (_, typ, _, d) = c.chunk().await;
    assert_eq!(typ, proto::REPLY_TYPE_OFFSET_DATA);
    assert_eq!(d[8..].to_vec(), pattern(0, 1 << 20));

    // Errors carry a message.
    c.request(proto::CMD_READ, 0, 3, 1 << 20, 1).await;
    let (flags, typ, cookie, d) = c.chunk().await;
    assert_eq!(
        (flags, typ, cookie),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_ERROR, 3)
    );
    assert_eq!(proto::be_u32(&d[0..4]), 22);
    let mlen = usize::from(proto::be_u16(&d[4..6]));
    let msg = std::str::from_utf8(&d[6..6 + mlen]).unwrap();
    assert!(msg.contains("beyond the end"), "{msg}");

    // Empty read: a NONE chunk.
    c.request(proto::CMD_READ, 0, 4, 0, 0).await;
    let (flags, typ, _, d) = c.chunk().await;
    assert_eq!(
        (flags, typ, d.len()),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, 0)
    );

    // Block status with the default (allocated) answer.
    c.request(proto::CMD_BLOCK_STATUS, 0, 5, 0, 8192).await;
    let (flags, typ, _, d) = c.chunk().await;
    assert_eq!(
        (flags, typ),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_BLOCK_STATUS)
    );
    assert_eq!(d.len(), 12);
    assert_eq!(proto::be_u32(&d[0..4]), BASE_ALLOCATION_ID);
    assert_eq!(proto::be_u32(&d[4..8]), 8192);
    assert_eq!(proto::be_u32(&d[8..12]), 0);

    // Writes still get simple replies.
    c.request(proto::CMD_WRITE, 0, 6, 0, 1).await;
    c.send(b"!").await;
    assert_eq!(c.simple_reply().await, (0, 6));
    c.request(proto::CMD_DISC, 0, 7, 0, 0).await;
    c.expect_closed().await.unwrap();
}

async fn many_requests_in_flight(via: Via) {
    let mut c = Raw::start(via, MemBackend::new(1 << 20, false)).await;
    c.go(true, false).await;
    // Pipeline 64 writes then 64 reads without waiting.
    for i in 0..64u64 {
        c.request(proto::CMD_WRITE, 0, i, i * 4096, 4096).await;
        c.send(&[i as u8; 4096]).await;
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..64 {
        let (err, cookie) = c.simple_reply().await;
        assert_eq!(err, 0);
        assert!(seen.insert(cookie));
    }
    for i in 0..64u64 {
        c.request(proto::CMD_READ, 0, 1000 + i, i * 4096, 4096)
            .await;
    }
    for _ in 0..64 {
        let (_, _, cookie, d) = c.chunk().await;
        let i = cookie - 1000;
        assert_eq!(proto::be_u64(&d[0..8]), i * 4096);
        assert!(d[8..].iter().all(|&b| b == i as u8));
    }
    c.request(proto::CMD_DISC, 0, 0, 0, 0).await;
    c.expect_closed().await.unwrap();
}

async fn shutdown_closes_idle_connections(via: Via) {
    let token = CancellationToken::new();
    let mut c = Raw::start_with(
        via,
        MemBackend::new(1 << 20, false),
        test_options(),
        token.clone(),
    )
    .await;
    c.go(true, false).await;
    c.request(proto::CMD_READ, 0, 1, 0, 16).await;
    let (_, typ, cookie, d) = c.chunk().await;
    assert_eq!((typ, cookie), (proto::REPLY_TYPE_OFFSET_DATA, 1));
    assert_eq!(d[8..].to_vec(), pattern(0, 16));
    token.cancel();
    c.expect_closed().await.unwrap();
}

async fn bad_request_magic_closes(via: Via) {
    let mut c = Raw::start(via, MemBackend::new(1 << 20, false)).await;
    c.go(false, false).await;
    c.send(&[0xde; 28]).await;
    let e = c.expect_closed().await.unwrap_err();
    assert!(e.to_string().contains("magic"), "{e}");
}

async fn oversized_write_closes(via: Via) {
    let mut c = Raw::start(via, MemBackend::new(1 << 20, false)).await;
    c.go(false, false).await;
    c.request(proto::CMD_WRITE, 0, 1, 0, u32::MAX).await;
    let e = c.expect_closed().await.unwrap_err();
    assert!(e.to_string().contains("maximum payload"), "{e}");
}

async fn oversized_option_closes(via: Via) {
    let mut c = Raw::start(via, MemBackend::new(1 << 20, false)).await;
    c.send(&3u32.to_be_bytes()).await;
    c.send(&proto::encode_option_header(proto::OPT_GO, u32::MAX))
        .await;
    let e = c.expect_closed().await.unwrap_err();
    assert!(matches!(e, NbdError::Protocol(_)), "{e}");
}

/// A pipelining client: a request sent right behind the last option, before the
/// server answered it, is not lost when the connection leaves tokio.
async fn request_right_behind_the_handshake(via: Via) {
    let mut c = Raw::start(via, MemBackend::new(1 << 20, false)).await;
    let mut b = 3u32.to_be_bytes().to_vec();
    b.extend_from_slice(&proto::encode_option_header(proto::OPT_EXPORT_NAME, 4));
    b.extend_from_slice(b"disk");
    let read = Request {
        flags: 0,
        typ: proto::CMD_READ,
        cookie: 9,
        offset: 10,
        len: 5,
    };
    b.extend_from_slice(&read.encode());
    c.send(&b).await;
    let answered = tokio::time::timeout(Duration::from_secs(10), async {
        let mut export = [0u8; 10];
        c.io.read_exact(&mut export).await.unwrap();
        assert_eq!(proto::be_u64(&export[0..8]), 1 << 20);
        assert_eq!(c.simple_reply().await, (0, 9));
        let mut d = [0u8; 5];
        c.io.read_exact(&mut d).await.unwrap();
        d
    });
    let d = answered.await.expect("the early READ was not answered");
    assert_eq!(d.to_vec(), pattern(10, 5));
    c.request(proto::CMD_DISC, 0, 10, 0, 0).await;
    c.expect_closed().await.unwrap();
}

/// A client that sends without reading replies runs ahead until its budget
/// is spent, not only until the socket's buffer of replies is full: the reader
/// never waits to send a reply.
async fn reading_goes_on_while_replies_wait(via: Via) {
    let mut c = Raw::start(via, MemBackend::new(1 << 20, false)).await;
    c.go(false, false).await;
    // 3000 small writes take 60 MB of the 64 MiB budget; their replies are far
    // more than the socket buffers hold.
    const N: u64 = 3000;
    let mut b = Vec::new();
    for i in 0..N {
        let r = Request {
            flags: 0,
            typ: proto::CMD_WRITE,
            cookie: i,
            offset: i * 4096 % (1 << 20),
            len: 4096,
        };
        b.extend_from_slice(&r.encode());
        b.extend_from_slice(&[i as u8; 4096]);
    }
    tokio::time::timeout(Duration::from_secs(30), c.io.write_all(&b))
        .await
        .expect("the server stopped reading requests")
        .unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..N {
        let (err, cookie) = c.simple_reply().await;
        assert_eq!(err, 0);
        assert!(seen.insert(cookie));
    }
    c.request(proto::CMD_DISC, 0, 0, 0, 0).await;
    c.expect_closed().await.unwrap();
}

/// Passes everything to a [`MemBackend`], except that a flush waits until the
/// test releases it.
struct GatedBackend {
    inner: Arc<MemBackend>,
    flushing: Arc<tokio::sync::Notify>,
    release: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl Backend for GatedBackend {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.inner.write_at(data, offset, fua)
    }
    fn flush(&self) -> io::Result<()> {
        self.flushing.notify_one();
        self.release.lock().unwrap().recv().unwrap();
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.inner.trim(offset, len, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, may_trim: bool) -> io::Result<()> {
        self.inner.write_zeroes(offset, len, fua, may_trim)
    }
}

/// At shutdown, a request already running is answered before the connection
/// closes.
async fn shutdown_answers_requests_in_flight(via: Via) {
    let (release, released) = std::sync::mpsc::channel();
    let flushing = Arc::new(tokio::sync::Notify::new());
    let backend = Arc::new(GatedBackend {
        inner: MemBackend::new(1 << 20, false),
        flushing: Arc::clone(&flushing),
        release: Mutex::new(released),
    });
    let token = CancellationToken::new();
    let mut c = Raw::start_with(via, backend, test_options(), token.clone()).await;
    c.go(false, false).await;
    c.request(proto::CMD_FLUSH, 0, 7, 0, 0).await;
    flushing.notified().await;
    token.cancel();
    tokio::time::sleep(Duration::from_millis(50)).await;
    release.send(()).unwrap();
    assert_eq!(c.simple_reply().await, (0, 7));
    c.expect_closed().await.unwrap();
}

/// Writes below, at and above the read buffer's size, between small writes and
/// flushes, all sent in one burst: every payload lands where it was sent and the
/// stream stays in sync, however the reader splits its reads between its buffer
/// and the payload buffers.
async fn large_and_small_requests_pipelined(via: Via) {
    const SIZE: usize = 16 << 20;
    let backend = MemBackend::new(SIZE, false);
    let mut c = Raw::start(via, Arc::clone(&backend) as Arc<dyn Backend>).await;
    c.expect_size = SIZE as u64;
    c.go(false, false).await;
    let want = c.pipelined_burst(pattern(0, SIZE)).await;
    let got = backend.data.lock().unwrap().clone();
    let first_bad = got.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(first_bad, None, "the export differs from what was written");
    // Large payloads on a plain socket come in pipes once nothing is buffered;
    // a stream read by a task has no socket to splice from.
    let spliced = backend.spliced.load(Ordering::Relaxed);
    match via {
        Via::Threads => assert!(spliced >= 3, "only {spliced} payloads spliced"),
        Via::Task => assert_eq!(spliced, 0),
    }
    c.request(proto::CMD_DISC, 0, 9999, 0, 0).await;
    c.expect_closed().await.unwrap();
}

/// The same burst into a real file: spliced payloads reach it, FUA ones
/// through the `O_DSYNC` descriptor.
#[tokio::test]
async fn large_writes_reach_a_file_through_pipes() {
    const SIZE: usize = 16 << 20;
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), pattern(0, SIZE)).unwrap();
    let backend = Arc::new(FileBackend::open(file.path(), false).unwrap());
    let mut c = Raw::start(Via::Threads, backend).await;
    c.expect_size = SIZE as u64;
    c.go(false, false).await;
    let want = c.pipelined_burst(pattern(0, SIZE)).await;
    c.request(proto::CMD_DISC, 0, 9999, 0, 0).await;
    c.expect_closed().await.unwrap();
    let got = std::fs::read(file.path()).unwrap();
    assert_eq!(got.len(), SIZE);
    let first_bad = got.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(first_bad, None, "the file differs from what was written");
}

impl Raw {
    /// Sends writes of every size around the reader's thresholds in one burst,
    /// some with FUA, with flushes between them, and checks every reply.
    /// Returns what the export holds now, given it held `want`.
    async fn pipelined_burst(&mut self, mut want: Vec<u8>) -> Vec<u8> {
        let lens = [
            4096,
            100,
            LARGE_PAYLOAD - 1,
            LARGE_PAYLOAD,
            28,
            READ_BUFFER,
            READ_BUFFER + 1,
            1 << 20,
            1 << 20,
            512,
            (1 << 20) + 7,
            4096,
            300_000,
            2 << 20,
            1,
        ];
        let mut burst = Vec::new();
        let mut offset = 3usize;
        let mut cookies = std::collections::HashSet::new();
        for (i, &len) in lens.iter().enumerate() {
            let cookie = i as u64 + 1;
            let data: Vec<u8> = (0..len)
                .map(|j| (j as u64 * 7 + cookie * 13) as u8 ^ 0xa5)
                .collect();
            want[offset..offset + len].copy_from_slice(&data);
            let req = Request {
                flags: if i % 3 == 2 { proto::CMD_FLAG_FUA } else { 0 },
                typ: proto::CMD_WRITE,
                cookie,
                offset: offset as u64,
                len: len as u32,
            };
            burst.extend_from_slice(&req.encode());
            burst.extend_from_slice(&data);
            cookies.insert(cookie);
            if i % 4 == 3 {
                let flush = Request {
                    flags: 0,
                    typ: proto::CMD_FLUSH,
                    cookie: 1000 + cookie,
                    offset: 0,
                    len: 0,
                };
                burst.extend_from_slice(&flush.encode());
                cookies.insert(1000 + cookie);
            }
            offset += len + 4093;
        }
        assert!(offset < want.len());
        self.send(&burst).await;
        for _ in 0..cookies.len() {
            let (err, cookie) = self.simple_reply().await;
            assert_eq!(err, 0, "request {cookie} failed");
            assert!(cookies.remove(&cookie), "unexpected reply {cookie}");
        }
        want
    }
}

macro_rules! on_both_paths {
    ($($name:ident),* $(,)?) => {
        mod via_task {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Via::Task).await
            })*
        }
        mod via_threads {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Via::Threads).await
            })*
        }
    };
}

on_both_paths!(
    options_are_answered,
    export_name_with_zeroes,
    unknown_export_name_closes,
    unknown_client_flags_close,
    simple_replies,
    structured_replies,
    many_requests_in_flight,
    shutdown_closes_idle_connections,
    bad_request_magic_closes,
    oversized_write_closes,
    oversized_option_closes,
    request_right_behind_the_handshake,
    reading_goes_on_while_replies_wait,
    shutdown_answers_requests_in_flight,
    large_and_small_requests_pipelined,
);

/// `serve_unix` at shutdown: a connection whose client stopped reading replies
/// is torn down once the grace period is over, and the server returns.
#[tokio::test]
async fn stuck_connection_dropped_after_grace() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let opts = Arc::new(ServerOptions {
        shutdown_grace: Duration::from_millis(200),
        ..test_options()
    });
    let token = CancellationToken::new();
    let server = tokio::spawn(serve_unix(
        listener,
        MemBackend::new(1 << 20, false),
        opts,
        token.clone(),
    ));
    let mut c = Raw::greeted(UnixStream::connect(&path).await.unwrap(), None).await;
    c.go(true, false).await;
    // 64 MiB of reads, more than the budget; none of the replies is read.
    for i in 0..64 {
        c.request(proto::CMD_READ, 0, i, 0, 1 << 20).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    token.cancel();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("serve_unix did not return")
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(200));
    // The client finds the connection closed once it reads what was sent.
    let mut sink = vec![0u8; 1 << 20];
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match c.io.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    });
    drained.await.expect("the connection stayed open");
}

#[test]
fn inline_backs_off_after_slow_requests() {
    let req = |typ, flags, len| Request {
        flags,
        typ,
        cookie: 0,
        offset: 0,
        len,
    };
    let write = req(proto::CMD_WRITE, 0, 4096);
    let read = req(proto::CMD_READ, 0, 4096);
    let fast = Duration::from_micros(5);
    let slow = Duration::from_millis(5);
    let mut inline = Inline::new();
    // Only small reads and writes without FUA, and refusals.
    assert!(inline.wants(&write, false));
    assert!(inline.wants(&read, false));
    assert!(!inline.wants(&req(proto::CMD_WRITE, proto::CMD_FLAG_FUA, 4096), false));
    assert!(!inline.wants(&req(proto::CMD_WRITE, 0, 1 << 20), false));
    assert!(!inline.wants(&req(proto::CMD_FLUSH, 0, 0), false));
    assert!(inline.wants(&req(proto::CMD_FLUSH, 0, 0), true));
    // A slow write: the next 16 writes are handed off, then one is tried again;
    // reads are not affected.
    inline.ran(&write, fast);
    inline.ran(&write, slow);
    let handed_off = |inline: &mut Inline| {
        let mut n = 0;
        while !inline.wants(&write, false) {
            n += 1;
        }
        n
    };
    assert_eq!(handed_off(&mut inline), 16);
    assert!(inline.wants(&read, false));
    // Slow again: twice as long, up to the maximum.
    inline.ran(&write, slow);
    assert_eq!(handed_off(&mut inline), 32);
    for _ in 0..10 {
        inline.ran(&write, slow);
        handed_off(&mut inline);
    }
    inline.ran(&write, slow);
    assert_eq!(handed_off(&mut inline), 1024);
    // A fast probe starts over.
    inline.ran(&write, fast);
    assert!(inline.wants(&write, false));
    inline.ran(&write, slow);
    assert_eq!(handed_off(&mut inline), 16);
}

#[test]
fn clamp_extents_cases() {
    let h = proto::STATE_HOLE | proto::STATE_ZERO;
    // Merge equal neighbours, drop empty ones, cut at len.
    assert_eq!(
        clamp_extents(&[(10, 0), (0, h), (5, 0), (20, h), (100, 0)], 40, false),
        vec![(15, 0), (20, h), (5, 0)]
    );
    // REQ_ONE keeps one descriptor.
    assert_eq!(clamp_extents(&[(10, 0), (20, h)], 30, true), vec![(10, 0)]);
    // Nothing from the backend still yields one descriptor.
    assert_eq!(clamp_extents(&[], 512, false), vec![(512, 0)]);
    // The count is capped.
    let many: Vec<(u64, u32)> = (0..5000).map(|i| (1, (i % 2) as u32)).collect();
    assert_eq!(clamp_extents(&many, 5000, false).len(), MAX_EXTENTS);
}

#[test]
fn file_backend_zeroes_trim_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let f = File::create(&path).unwrap();
    f.set_len(8 << 20).unwrap();
    f.write_all_at(&[0x5a; 1 << 20], 1 << 20).unwrap();
    drop(f);
    let b = FileBackend::open(&path, false).unwrap();
    assert_eq!(b.size(), 8 << 20);
    assert!(b.can_multi_conn());

    // Block status: hole, data, hole (if the file system reports holes at all).
    let ext = b.block_status(0, 8 << 20).unwrap();
    let total: u64 = ext.iter().map(|e| e.0).sum();
    assert_eq!(total, 8 << 20);
    let data: Vec<_> = ext.iter().filter(|e| e.1 == 0).collect();
    if ext.len() > 1 {
        assert_eq!(data.len(), 1);
        assert_eq!(ext[0], (1 << 20, proto::STATE_HOLE | proto::STATE_ZERO));
        assert_eq!(ext[1], (1 << 20, 0));
    }

    b.write_zeroes((1 << 20) + 10, 100, true, false).unwrap();
    b.write_zeroes((1 << 20) + 4096, 8192, false, true).unwrap();
    b.trim((1 << 20) + 65536, 65536, false).unwrap();
    b.write_at(b"hi", 3, true).unwrap();
    b.flush().unwrap();
    let mut got = vec![0u8; 2 << 20];
    b.read_at(&mut got, 0).unwrap();
    let mut want = vec![0u8; 2 << 20];
    want[3..5].copy_from_slice(b"hi");
    want[1 << 20..2 << 20].fill(0x5a);
    let m = 1 << 20;
    want[m + 10..m + 110].fill(0);
    want[m + 4096..m + 4096 + 8192].fill(0);
    want[m + 65536..m + 131072].fill(0);
    assert!(
        got == want,
        "file contents differ from the expected pattern"
    );

    let ro = FileBackend::open(&path, true).unwrap();
    assert!(ro.read_only());
    let e = ro.write_at(b"x", 0, false).unwrap_err();
    assert_eq!(Errno::from_io(&e), Errno::EPERM);
}
