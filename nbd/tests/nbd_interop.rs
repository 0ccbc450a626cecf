//! NBD interoperability: our server against qemu's clients (qemu-io, qemu-img), our
//! client against qemu-nbd (including a dirty bitmap), and our client and server
//! against each other and against malformed peers.
//!
//! Every check compares real bytes. A test that needs a qemu tool that is not on
//! PATH says so on stderr and passes without checking anything.

#![allow(clippy::unwrap_used)]

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulwark_nbd::proto;
use bulwark_nbd::{Backend, Client, Errno, FileBackend, NbdError, ServerOptions};
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1024 * 1024;

/// Whether `tool` (qemu-utils) is installed; if not, the calling test skips
/// (`BULWARK-SKIP`, facility `tool`) and returns.
fn have(tool: &str) -> bool {
    bulwark_common::testkit::have_tool(tool, "qemu-utils")
}

/// Runs a command and fails the test with its output if it does not succeed.
fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs qemu-io and checks that every command in it succeeded: qemu-io exits
/// non-zero when one fails, and says so in its output too.
fn qemu_io(args: &[&str]) -> Output {
    let out = run(Command::new("qemu-io").args(args));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("failed") && !text.contains("error"),
        "qemu-io {args:?} reported a failure:\n{text}"
    );
    out
}

/// A sparse file of `size` bytes.
fn sparse_file(path: &Path, size: u64) {
    File::create(path).unwrap().set_len(size).unwrap();
}

fn read_file_range(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

/// Our server on its own runtime, stopped (and awaited) on drop.
struct Server {
    rt: tokio::runtime::Runtime,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    fn unix(socket: &Path, backend: Arc<dyn Backend>) -> Server {
        let rt = Server::runtime();
        let listener = rt
            .block_on(async { tokio::net::UnixListener::bind(socket) })
            .unwrap();
        let shutdown = CancellationToken::new();
        let opts = Arc::new(ServerOptions::default());
        let task = rt.spawn(bulwark_nbd::serve_unix(
            listener,
            backend,
            opts,
            shutdown.clone(),
        ));
        Server {
            rt,
            shutdown,
            task: Some(task),
        }
    }

    fn tcp(backend: Arc<dyn Backend>) -> (Server, SocketAddr) {
        let rt = Server::runtime();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let opts = Arc::new(ServerOptions::default());
        let task = rt.spawn(bulwark_nbd::serve_tcp(
            listener,
            backend,
            opts,
            shutdown.clone(),
        ));
        let server = Server {
            rt,
            shutdown,
            task: Some(task),
        };
        (server, addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let stopped = self
                .rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(10), task).await });
            if !std::thread::panicking() {
                assert!(matches!(stopped, Ok(Ok(()))), "server did not stop cleanly");
            }
        }
    }
}

fn unix_uri(socket: &Path) -> String {
    format!("nbd+unix:///?socket={}", socket.display())
}

fn file_backend(path: &Path, read_only: bool) -> Arc<dyn Backend> {
    Arc::new(FileBackend::open(path, read_only).unwrap())
}

/// 1. qemu-io writes, zeroes, discards and flushes through our server over a Unix
///    socket; the data reads back through qemu-io and directly from the file.
#[test]
fn qemu_io_against_our_server() {
    if !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let sock = dir.path().join("nbd.sock");
    sparse_file(&img, 64 * MIB);
    // Non-zero data where the zeroing and the discard go, so both must act.
    {
        let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&vec![0xcd; 128 * 1024], 2 * MIB).unwrap();
        f.write_all_at(&vec![0xee; 64 * 1024], 4 * MIB).unwrap();
        f.write_all_at(&vec![0x77; 4096], 8 * MIB).unwrap();
    }
    let _server = Server::unix(&sock, file_backend(&img, false));
    let uri = unix_uri(&sock);

    qemu_io(&[
        "-f",
        "raw",
        &uri,
        "-c",
        "write -P 0xab 1M 64k",
        "-c",
        "write -z 2M 128k",
        "-c",
        "discard 4M 64k",
        "-c",
        "flush",
    ]);
    qemu_io(&[
        "-f",
        "raw",
        &uri,
        "-c",
        "read -P 0xab 1M 64k",
        "-c",
        "read -P 0 2M 128k",
        "-c",
        "read -P 0x77 8M 4k",
    ]);
    // qemu-io really verifies: a wrong pattern fails.
    let wrong = Command::new("qemu-io")
        .args(["-f", "raw", &uri, "-c", "read -P 0xac 1M 64k"])
        .output()
        .unwrap();
    assert!(!wrong.status.success(), "qemu-io accepted a wrong pattern");

    assert_eq!(read_file_range(&img, MIB, 64 * 1024), vec![0xab; 64 * 1024]);
    assert_eq!(read_file_range(&img, MIB - 1, 1), vec![0]);
    assert_eq!(read_file_range(&img, MIB + 64 * 1024, 1), vec![0]);
    assert_eq!(
        read_file_range(&img, 2 * MIB, 128 * 1024),
        vec![0; 128 * 1024]
    );
    // Our trim punches a hole, so the discarded range reads as zeroes.
    assert_eq!(
        read_file_range(&img, 4 * MIB, 64 * 1024),
        vec![0; 64 * 1024]
    );
    assert_eq!(read_file_range(&img, 8 * MIB, 4096), vec![0x77; 4096]);
}

/// 2. qemu-img copies the whole export over TCP (using block status to skip holes);
///    the copy matches the file byte for byte, and so does a read with our client.
#[test]
fn qemu_img_convert_over_tcp() {
    if !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let out = dir.path().join("out.raw");
    sparse_file(&img, 64 * MIB);
    {
        let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
        let data: Vec<u8> = (0..3 * MIB as usize).map(|i| (i * 7 % 253) as u8).collect();
        f.write_all_at(&data, 5 * MIB + 123).unwrap();
        f.write_all_at(b"the end", 64 * MIB - 7).unwrap();
        f.write_all_at(&[1; 512], 0).unwrap();
    }
    let (_server, addr) = Server::tcp(file_backend(&img, false));
    let uri = format!("nbd://{addr}/");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri])
        .arg(&out));

    let want = fs::read(&img).unwrap();
    let got = fs::read(&out).unwrap();
    assert_eq!(got.len(), want.len());
    assert!(
        got == want,
        "qemu-img's copy differs from the exported file"
    );

    let mut client = Client::connect_tcp(addr, "", &["base:allocation"]).unwrap();
    assert_eq!(client.size(), 64 * MIB);
    let mut all = vec![0u8; 64 * MIB as usize];
    client.read(0, &mut all).unwrap();
    assert!(
        all == want,
        "our client's read differs from the exported file"
    );
    client.disconnect().unwrap();
}

/// 3. A read-only export: qemu-io cannot write, our client gets EPERM, the file is
///    unchanged, and reading still works.
#[test]
fn read_only_export_refuses_writes() {
    if !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let sock = dir.path().join("nbd.sock");
    sparse_file(&img, 16 * MIB);
    File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .write_all_at(&[0x42; 4096], 0)
        .unwrap();
    let _server = Server::unix(&sock, file_backend(&img, true));
    let uri = unix_uri(&sock);

    let out = Command::new("qemu-io")
        .args(["-f", "raw", &uri, "-c", "write -P 0x11 0 4k"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "qemu-io wrote to a read-only export:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    qemu_io(&["-r", "-f", "raw", &uri, "-c", "read -P 0x42 0 4k"]);

    let mut client = Client::connect_unix(&sock, "", &[]).unwrap();
    assert!(client.read_only());
    match client.write(0, &[0x11; 4096]) {
        Err(NbdError::Server { errno, message, .. }) => {
            assert_eq!(errno, Errno::EPERM);
            assert!(message.contains("read-only"), "{message}");
        }
        other => panic!("write to a read-only export gave {other:?}"),
    }
    // The connection is still usable after the refusal.
    let mut buf = vec![0u8; 4096];
    client.read(0, &mut buf).unwrap();
    assert_eq!(buf, vec![0x42; 4096]);
    client.disconnect().unwrap();
    assert_eq!(read_file_range(&img, 0, 4096), vec![0x42; 4096]);
}

/// Kills qemu-nbd when the test ends, however it ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until a Unix socket accepts connections.
fn wait_for_socket(path: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if UnixStream::connect(path).is_ok() {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("qemu-nbd exited with {status} before listening");
        }
        assert!(
            Instant::now() < deadline,
            "{} never accepted connections",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Walks the whole export with block status in `context` and returns merged
/// `(start, length, flags)` runs.
fn status_map(client: &mut Client, context: &str) -> Vec<(u64, u64, u32)> {
    let size = client.size();
    let mut runs: Vec<(u64, u64, u32)> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let extents = client.block_status(pos, size - pos, context).unwrap();
        assert!(!extents.is_empty(), "no extents at {pos}");
        for (len, flags) in extents {
            assert!(len > 0);
            match runs.last_mut() {
                Some(last) if last.2 == flags => last.1 += len,
                _ => runs.push((pos, len, flags)),
            }
            pos += len;
        }
    }
    assert_eq!(pos, size, "extents ran past the end of the export");
    runs
}

/// 4. Our client reads a qcow2 image and its dirty bitmap from qemu-nbd.
#[test]
fn our_client_reads_dirty_bitmap_from_qemu_nbd() {
    if !have("qemu-img") || !have("qemu-io") || !have("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let sock = dir.path().join("qemu-nbd.sock");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("64M"));
    run(Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(&img)
        .arg("b0"));
    qemu_io(&[
        "-f",
        "qcow2",
        img.to_str().unwrap(),
        "-c",
        "write -P 1 0 64k",
        "-c",
        "write -P 2 10M 4k",
    ]);

    let child = Command::new("qemu-nbd")
        .args(["-r", "-t", "-f", "qcow2", "-B", "b0", "--shared=2", "-k"])
        .arg(&sock)
        .arg(&img)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut qemu_nbd = KillOnDrop(child);
    wait_for_socket(&sock, &mut qemu_nbd.0);

    // A bitmap qemu-nbd does not export is refused with a clear message.
    let err = Client::connect_unix(&sock, "", &["qemu:dirty-bitmap:nope"]).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, NbdError::Negotiation(_)), "{msg}");
    assert!(
        msg.contains("does not export dirty bitmap \"nope\""),
        "{msg}"
    );

    let bitmap = "qemu:dirty-bitmap:b0";
    let mut client = Client::connect_unix(&sock, "", &["base:allocation", bitmap]).unwrap();
    assert_eq!(client.size(), 64 * MIB);
    assert!(client.read_only());

    // Granularity is 64 KiB: the 4 KiB write dirties its whole cluster.
    let k64 = 64 * 1024;
    let dirty = proto::STATE_DIRTY;
    assert_eq!(
        status_map(&mut client, bitmap),
        vec![
            (0, k64, dirty),
            (k64, 10 * MIB - k64, 0),
            (10 * MIB, k64, dirty),
            (10 * MIB + k64, 54 * MIB - k64, 0),
        ]
    );
    // base:allocation on the same connection: only what was written is not known
    // to read as zeroes (qemu zero-fills the rest of the 64 KiB cluster at 10M).
    let alloc = status_map(&mut client, "base:allocation");
    let nonzero: Vec<(u64, u64)> = alloc
        .iter()
        .filter(|r| r.2 & proto::STATE_ZERO == 0)
        .map(|r| (r.0, r.1))
        .collect();
    assert_eq!(nonzero, vec![(0, k64), (10 * MIB, 4096)], "{alloc:?}");

    let mut buf = vec![0u8; k64 as usize];
    client.read(0, &mut buf).unwrap();
    assert_eq!(buf, vec![1; k64 as usize]);
    client.read(10 * MIB, &mut buf).unwrap();
    assert_eq!(&buf[..4096], &[2; 4096][..]);
    assert!(buf[4096..].iter().all(|&b| b == 0));
    // Reads that span data and holes (qemu answers holes with OFFSET_HOLE chunks).
    let mut wide = vec![0xffu8; 2 * MIB as usize];
    client.read(9 * MIB + 512 * 1024, &mut wide).unwrap();
    let at = (MIB / 2) as usize;
    assert!(wide[..at].iter().all(|&b| b == 0));
    assert_eq!(&wide[at..at + 4096], &[2; 4096][..]);
    assert!(wide[at + 4096..].iter().all(|&b| b == 0));
    client.disconnect().unwrap();
}

/// 5. Our client against our server: round trips, block status, large requests,
///    and an out-of-range read that fails clearly without breaking the connection.
#[test]
fn our_client_against_our_server() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let sock = dir.path().join("nbd.sock");
    sparse_file(&img, 64 * MIB);
    File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .write_all_at(&vec![9; MIB as usize], 48 * MIB)
        .unwrap();
    let _server = Server::unix(&sock, file_backend(&img, false));

    let mut c = Client::connect_unix(&sock, "", &["base:allocation"]).unwrap();
    assert_eq!(c.size(), 64 * MIB);
    assert!(!c.read_only());

    // Block status before anything is written through NBD: hole, data, hole.
    let hz = proto::STATE_HOLE | proto::STATE_ZERO;
    assert_eq!(
        status_map(&mut c, "base:allocation"),
        vec![
            (0, 48 * MIB, hz),
            (48 * MIB, MIB, 0),
            (49 * MIB, 15 * MIB, hz)
        ]
    );

    // Small unaligned round trip.
    c.write(4097, b"hello, nbd").unwrap();
    let mut small = [0u8; 12];
    c.read(4096, &mut small).unwrap();
    assert_eq!(&small, b"\0hello, nbd\0");

    // 40 MiB in one call: split into requests of at most 32 MiB each way.
    let big: Vec<u8> = (0..40 * MIB as usize).map(|i| (i % 241) as u8).collect();
    c.write(3 * MIB, &big).unwrap();
    c.flush().unwrap();
    let mut back = vec![0u8; big.len()];
    c.read(3 * MIB, &mut back).unwrap();
    assert!(back == big, "40 MiB round trip differs");
    assert!(
        read_file_range(&img, 3 * MIB, big.len()) == big,
        "file differs"
    );

    // Out of range: a server error naming the problem; the connection survives.
    let mut buf = vec![0u8; 8192];
    match c.read(64 * MIB - 4096, &mut buf) {
        Err(NbdError::Server {
            errno,
            message,
            command,
        }) => {
            assert_eq!(errno, Errno::EINVAL);
            assert!(message.contains("beyond the end"), "{message}");
            assert!(command.contains("READ"), "{command}");
        }
        other => panic!("out-of-range read gave {other:?}"),
    }
    match c.write(64 * MIB, b"x") {
        Err(NbdError::Server { errno, .. }) => assert_eq!(errno, Errno::ENOSPC),
        other => panic!("out-of-range write gave {other:?}"),
    }
    match c.block_status(0, 4096, "qemu:dirty-bitmap:b0") {
        Err(NbdError::InvalidRequest(m)) => assert!(m.contains("not negotiated"), "{m}"),
        other => panic!("block status in an unknown context gave {other:?}"),
    }
    c.read(64 * MIB - 4096, &mut buf[..4096]).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0));
    c.read(4096, &mut small).unwrap();
    assert_eq!(&small, b"\0hello, nbd\0");

    // A second connection at the same time sees the first one's flushed writes.
    let mut other = Client::connect_unix(&sock, "", &[]).unwrap();
    let mut head = vec![0u8; 4096];
    other.read(3 * MIB, &mut head).unwrap();
    assert_eq!(head, big[..4096]);
    other.disconnect().unwrap();
    c.disconnect().unwrap();

    // An unknown export is refused during negotiation.
    let e = Client::connect_unix(&sock, "nope", &[]).unwrap_err();
    assert!(e.to_string().contains("no export named \"nope\""), "{e}");
}

/// Reads until the server closes the connection; fails if it keeps it open.
fn assert_closed_by_server(mut s: UnixStream) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("server did not close the connection: {e}"),
        }
    }
}

/// Connects and reads the server's 18-byte greeting.
fn greeted(sock: &Path) -> UnixStream {
    let mut s = UnixStream::connect(sock).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    s
}

/// 6. Malformed clients get their connection closed; the server carries on.
#[test]
fn malformed_clients_are_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let sock: PathBuf = dir.path().join("nbd.sock");
    sparse_file(&img, 8 * MIB);
    File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .write_all_at(b"still here", 0)
        .unwrap();
    let _server = Server::unix(&sock, file_backend(&img, false));

    // Not NBD at all.
    let mut s = greeted(&sock);
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_closed_by_server(s);

    // Wrong option magic.
    let mut s = greeted(&sock);
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(&[0x55; 16]).unwrap();
    assert_closed_by_server(s);

    // An option claiming 4 GiB of data.
    let mut s = greeted(&sock);
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(&proto::encode_option_header(proto::OPT_GO, u32::MAX))
        .unwrap();
    assert_closed_by_server(s);

    // A 2 GiB write in transmission, then a request with a bad magic.
    for bad in [
        proto::Request {
            flags: 0,
            typ: proto::CMD_WRITE,
            cookie: 1,
            offset: 0,
            len: 0x8000_0000,
        }
        .encode(),
        [0xa5; proto::Request::LEN],
    ] {
        let mut s = greeted(&sock);
        s.write_all(&3u32.to_be_bytes()).unwrap();
        s.write_all(&proto::encode_option_header(proto::OPT_EXPORT_NAME, 0))
            .unwrap();
        let mut export = [0u8; 10];
        s.read_exact(&mut export).unwrap();
        assert_eq!(u64::from_be_bytes(export[..8].try_into().unwrap()), 8 * MIB);
        s.write_all(&bad).unwrap();
        assert_closed_by_server(s);
    }

    // Hanging up mid-handshake and mid-payload.
    let mut s = greeted(&sock);
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(&proto::encode_option_header(proto::OPT_GO, 100))
        .unwrap();
    drop(s);

    // The server still serves well-behaved clients.
    let mut c = Client::connect_unix(&sock, "", &[]).unwrap();
    let mut buf = [0u8; 10];
    c.read(0, &mut buf).unwrap();
    assert_eq!(&buf, b"still here");
    c.disconnect().unwrap();
}
