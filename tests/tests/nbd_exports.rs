//! Who may open an NBD export, and for how long (issue 23):
//!
//! - the nbd-filter's Unix socket is the agent's user's only: another local user
//!   (`nobody`, through `runuser`) cannot open it with `qemu-io`, although the same
//!   `qemu-io` as `nobody` opens a world-writable `qemu-nbd` socket next to it, and
//!   the agent's own tracking goes on;
//! - the nbd-filter over TLS (`nbd_listen`, `nbd_tls`, `nbd_client_role`): qemu
//!   with a fleet certificate of the configured role writes and the sync sends
//!   exactly those blocks; a certificate of another role, one from another CA, no
//!   certificate, or no TLS at all is refused and writes nothing;
//! - the node's read-only NBD listener drops a client that says nothing once
//!   `nbd_handshake_timeout` has passed, and past `nbd_max_connections` closes new
//!   connections while the mounted ones keep reading.
//!
//! Needs qemu-io (qemu-utils); the socket test also `runuser`, the `nobody` user,
//! root and qemu-nbd. Each test skips with a printed reason where something is
//! missing.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use bulwark_tests::qemu::have;
use bulwark_tests::{
    BLOCK_SIZE, Fleet, MIB, TlsFiles, free_port, json_str, json_u64, poll, write_random_file,
};

const SIZE: u64 = 16 * MIB;
const AGENT: &str = "host-1";
const SOURCE: &str = "vm-disk";

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Whether qemu-io reported success: exit 0 and no error in its output (it exits
/// 0 on some failed commands).
fn qemu_ok(out: &Output) -> bool {
    let t = text(out);
    out.status.success() && !t.contains("error") && !t.contains("failed")
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", p.display()));
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
        .mode()
        & 0o7777
}

/// The blocks `writes` (offset, length) touch.
fn blocks_of(writes: &[(u64, u64)]) -> BTreeSet<u64> {
    writes
        .iter()
        .flat_map(|&(off, len)| off / BLOCK_SIZE..=(off + len - 1) / BLOCK_SIZE)
        .collect()
}

fn write_commands(writes: &[(u64, u64)], pattern: u8) -> Vec<String> {
    writes
        .iter()
        .map(|(off, len)| format!("write -P {pattern} {off} {len}"))
        .collect()
}

/// Whether a local unprivileged user can be used (root, runuser, the user
/// `nobody`); if not, the test skips, saying which is missing.
fn can_run_as_nobody() -> bool {
    if !bulwark_tests::have_root("runuser cannot switch to another user")
        || !bulwark_tests::have_tool("runuser", "util-linux")
    {
        return false;
    }
    let nobody = Command::new("id")
        .args(["-u", "nobody"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !nobody {
        bulwark_tests::skip(
            "user-nobody",
            "there is no local user `nobody` to run qemu-io as",
        );
        return false;
    }
    // Installed, root, and the user exists: past here a failure is the test's.
    let out = Command::new("runuser")
        .args(["-u", "nobody", "--", "true"])
        .output()
        .expect("cannot run runuser");
    assert!(
        out.status.success(),
        "`runuser -u nobody -- true` failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    true
}

/// `qemu-io` as the user `nobody`.
fn qemu_io_as_nobody(url: &str, command: &str) -> Output {
    run(Command::new("runuser").args([
        "-u", "nobody", "--", "qemu-io", "-f", "raw", url, "-c", command,
    ]))
}

/// Another local user cannot open the nbd-filter's socket: the agent made its
/// directory 0700 and the socket 0600. The same `qemu-io`, as the same user,
/// reads a world-writable qemu-nbd socket beside it, so what stops it is the
/// agent's permissions and nothing else. The host's own writes (as root) are
/// tracked and synced as before.
#[test]
fn another_local_user_cannot_open_the_nbd_filter_socket() {
    if !have("qemu-io") || !have("qemu-nbd") || !can_run_as_nobody() {
        return;
    }
    let mut fleet = Fleet::builder()
        .node("node-1")
        .agent_source(
            AGENT,
            SOURCE,
            None,
            SIZE,
            "tracker = \"nbd-filter\"\nnbd_socket = \"{root}/pub/nbd/vm-disk.sock\"",
        )
        .build();
    // Everything on the way to the socket's directory is open to others (the
    // fleet's directory is 0700 otherwise): only the agent's own permissions may
    // stop them.
    let root = fleet.root().to_path_buf();
    let public = root.join("pub");
    std::fs::create_dir_all(&public).expect("mkdir pub");
    chmod(&root, 0o711);
    chmod(&public, 0o755);
    fleet.start_all();
    let socket = public.join("nbd").join("vm-disk.sock");
    assert_eq!(mode(&public.join("nbd")), 0o700, "the socket's directory");
    assert_eq!(mode(&socket), 0o600, "the socket");

    // The control: qemu-nbd serving a copy on a socket anyone may use.
    let copy = fleet.scratch("control.raw");
    write_random_file(&copy, MIB);
    let open_sock = public.join("open.sock");
    let mut qemu_nbd = Command::new("qemu-nbd")
        .args(["-f", "raw", "--persistent", "--socket"])
        .arg(&open_sock)
        .arg(&copy)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start qemu-nbd");
    poll("qemu-nbd's socket", Duration::from_secs(20), || {
        if open_sock.exists() {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    chmod(&open_sock, 0o666);
    let control = qemu_io_as_nobody(
        &format!("nbd+unix:///?socket={}", open_sock.display()),
        "read 0 4k",
    );
    let _ = qemu_nbd.kill();
    let _ = qemu_nbd.wait();
    assert!(
        qemu_ok(&control),
        "the control failed: nobody cannot read a world-writable NBD socket, so the test proves nothing:\n{}",
        text(&control)
    );

    // The agent's export: permission denied, for reading and for writing.
    let url = format!("nbd+unix:///?socket={}", socket.display());
    let before = std::fs::read(fleet.volume(SOURCE)).expect("read the volume");
    for command in ["read 0 4k", "write -P 0x66 0 64k"] {
        let out = qemu_io_as_nobody(&url, command);
        let t = text(&out);
        assert!(
            !qemu_ok(&out) && t.contains("Permission denied"),
            "nobody ran `{command}` on the agent's export:\n{t}"
        );
    }
    assert!(
        std::fs::read(fleet.volume(SOURCE)).expect("read the volume") == before,
        "the volume changed"
    );

    // The host's own writer (root) still goes through, and is tracked.
    let first = fleet.sync(SOURCE);
    assert_eq!(json_str(&first, "kind"), "full", "{first}");
    let writes = [
        (0, 4096),
        (7 * BLOCK_SIZE + 100, 2 * BLOCK_SIZE),
        (SIZE - 512, 512),
    ];
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", &url]);
    for c in write_commands(&writes, 0x5a) {
        cmd.args(["-c", &c]);
    }
    let out = run(&mut cmd);
    assert!(
        qemu_ok(&out),
        "root could not write through the export:\n{}",
        text(&out)
    );
    let r = fleet.sync(SOURCE);
    assert_eq!(json_str(&r, "kind"), "incremental", "{r}");
    assert_eq!(
        json_u64(&r, "blocks_sent"),
        blocks_of(&writes).len() as u64,
        "the sync must send exactly the written blocks: {r}"
    );
    fleet.assert_all_alive();
}

/// A qemu `tls-creds-x509` directory (client side): the CA, and a certificate if
/// given.
fn creds(dir: &Path, ca: &Path, client: Option<&TlsFiles>) -> PathBuf {
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::copy(ca, dir.join("ca-cert.pem")).expect("copy the CA");
    if let Some(f) = client {
        std::fs::copy(&f.cert, dir.join("client-cert.pem")).expect("copy a certificate");
        std::fs::copy(&f.key, dir.join("client-key.pem")).expect("copy a key");
    }
    dir.to_path_buf()
}

/// qemu-io on the TLS export at `port` with the credentials in `dir`.
fn qemu_io_tls(dir: &Path, port: u16, commands: &[String]) -> Output {
    // A certificate from another CA does not validate against the fleet CA in its
    // directory; without sanity-check=off qemu would not even connect.
    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client,sanity-check=off",
        dir.display()
    );
    let image = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},tls-creds=tls0"
    );
    let mut cmd = Command::new("qemu-io");
    cmd.args(["--object", &object, "--image-opts", &image]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    run(&mut cmd)
}

/// The nbd-filter over TLS for agent-role certificates: qemu with one writes and
/// the sync sends exactly those blocks; an admin certificate (another role), an
/// agent certificate of another CA, no certificate and no TLS are refused and
/// change nothing.
#[test]
fn the_tls_export_serves_only_the_configured_role() {
    if !have("qemu-io") {
        return;
    }
    let port = free_port();
    let mut fleet = Fleet::builder()
        .node("node-1")
        .agent_source(
            AGENT,
            SOURCE,
            None,
            SIZE,
            &format!(
                "tracker = \"nbd-filter\"\nnbd_listen = \"127.0.0.1:{port}\"\nnbd_tls = true\nnbd_client_role = \"agent\""
            ),
        )
        .build();
    // qemu checks the server's certificate against 127.0.0.1: the agent's needs
    // that IP SAN (made again with it; `pki issue` does not overwrite).
    let pki = fleet.pki().clone();
    for ext in ["crt", "key"] {
        std::fs::remove_file(pki.dir().join(format!("{AGENT}.{ext}"))).expect("rm");
    }
    pki.issue_with("agent", AGENT, &["--ip", "127.0.0.1", "--dns", "localhost"]);
    fleet.start_all();
    fleet
        .agent(AGENT)
        .wait_for_log("NBD export ready", Duration::from_secs(30));

    let writer = creds(
        &fleet.scratch("writer"),
        &pki.ca(),
        Some(&pki.issue("agent", "qemu-writer")),
    );
    let admin = creds(&fleet.scratch("admin"), &pki.ca(), Some(fleet.admin()));
    let anonymous = creds(&fleet.scratch("anonymous"), &pki.ca(), None);
    let other_pki = bulwark_tests::Pki::init(&fleet.scratch("other-ca"));
    let stranger = creds(
        &fleet.scratch("stranger"),
        &pki.ca(),
        Some(&other_pki.issue("agent", "qemu-writer")),
    );

    let first = fleet.sync(SOURCE);
    assert_eq!(json_str(&first, "kind"), "full", "{first}");
    let before = std::fs::read(fleet.volume(SOURCE)).expect("read the volume");

    // Refused: another role (the server's message says which it takes), another
    // CA, no certificate.
    let attempt = write_commands(&[(0, BLOCK_SIZE)], 0x66);
    let out = qemu_io_tls(&admin, port, &attempt);
    assert!(
        !qemu_ok(&out) && text(&out).contains("agent certificates only"),
        "an admin certificate was not refused:\n{}",
        text(&out)
    );
    for (who, dir) in [("another CA", &stranger), ("no certificate", &anonymous)] {
        let out = qemu_io_tls(dir, port, &attempt);
        assert!(
            !qemu_ok(&out),
            "a client with {who} was not refused:\n{}",
            text(&out)
        );
    }
    // No TLS at all.
    let out = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        &format!("nbd://127.0.0.1:{port}/"),
        "-c",
        "read 0 4k",
    ]));
    assert!(
        !qemu_ok(&out) && text(&out).contains("TLS"),
        "a client without TLS was not refused:\n{}",
        text(&out)
    );
    assert!(
        std::fs::read(fleet.volume(SOURCE)).expect("read the volume") == before,
        "a refused client changed the volume"
    );
    assert!(
        fleet.agent(AGENT).log_contains("NBD export refused"),
        "the agent did not log the refusal"
    );
    let r = fleet.sync(SOURCE);
    assert_eq!(
        json_u64(&r, "blocks_sent"),
        0,
        "refused clients left dirty blocks: {r}"
    );

    // The configured role writes, reads back, and the sync sends exactly that.
    let writes = [
        (3 * BLOCK_SIZE + 512, 4096),
        (100 * BLOCK_SIZE, 3 * BLOCK_SIZE),
    ];
    let mut commands = write_commands(&writes, 0x5a);
    commands.extend(
        writes
            .iter()
            .map(|(off, len)| format!("read -P 0x5a {off} {len}")),
    );
    let out = qemu_io_tls(&writer, port, &commands);
    assert!(
        qemu_ok(&out),
        "the agent-role client failed:\n{}",
        text(&out)
    );
    let r = fleet.sync(SOURCE);
    assert_eq!(json_str(&r, "kind"), "incremental", "{r}");
    assert_eq!(
        json_u64(&r, "blocks_sent"),
        blocks_of(&writes).len() as u64,
        "the sync must send exactly the blocks written over TLS: {r}"
    );
    fleet.assert_all_alive();
}

/// Reads until the server closes the connection; the bytes it sent first.
fn read_until_closed(s: &mut std::net::TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("set a read timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("the node did not close the connection: {e}"),
        }
    }
}

/// The node's NBD listener with `nbd_handshake_timeout = "1s"` and
/// `nbd_max_connections = 2`: a client that connects and says nothing gets the
/// greeting and, a second or more later, the end of the connection. Two qemu-io
/// processes that mounted a point hold both places; a third connection is closed
/// at once, and both mounted ones, idle for longer than the handshake timeout,
/// still read.
#[test]
fn the_node_s_nbd_listener_drops_silent_clients_and_caps_connections() {
    if !have("qemu-io") {
        return;
    }
    let mut fleet = Fleet::builder()
        .node("node-1")
        .node_extra(
            "nbd_listen = \"127.0.0.1:0\"\nnbd_handshake_timeout = \"1s\"\nnbd_max_connections = 2",
        )
        .agent(AGENT, SOURCE, SIZE)
        .start();
    fleet.sync(SOURCE);
    let dir = fleet.scratch("qemu-tls");
    let dir_s = dir.display().to_string();
    let m = poll("the node's NBD address", Duration::from_secs(20), || {
        fleet.cli_json_try(&["mount", SOURCE, "--tls-dir", &dir_s, "--json"])
    });
    let url = json_str(&m, "url");
    let (addr, export) = url
        .strip_prefix("nbd://")
        .and_then(|r| r.split_once('/'))
        .unwrap_or_else(|| panic!("not nbd://HOST:PORT/NAME: {url}"));
    let (host, port) = addr.rsplit_once(':').expect("HOST:PORT");

    // Silent: the greeting, then nothing, then the end.
    let started = Instant::now();
    let mut silent = std::net::TcpStream::connect(addr).expect("connect");
    let got = read_until_closed(&mut silent);
    let after = started.elapsed();
    assert!(
        got.len() == 18 && got.starts_with(b"NBDMAGIC"),
        "the silent client got {got:?}, not the greeting alone"
    );
    assert!(
        after >= Duration::from_secs(1),
        "dropped after {after:?}, before its second"
    );
    fleet
        .node("node-1")
        .wait_for_log("nbd_handshake_timeout", Duration::from_secs(10));

    // Two mounted clients, waiting on their stdin.
    let object = format!("tls-creds-x509,id=tls0,dir={dir_s},endpoint=client");
    let image = format!(
        "driver=nbd,server.type=inet,server.host={host},server.port={port},export={export},tls-creds=tls0"
    );
    let mounted: Vec<std::process::Child> = (0..2)
        .map(|_| {
            Command::new("qemu-io")
                .args(["-r", "--object", &object, "--image-opts", &image])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("cannot start qemu-io")
        })
        .collect();
    poll(
        "both qemu-io to open the export",
        Duration::from_secs(30),
        || {
            let n = fleet
                .node("node-1")
                .log_since_start()
                .matches("NBD export of a recovery point opened")
                .count();
            if n >= 2 {
                Ok(())
            } else {
                Err(format!("{n} opened"))
            }
        },
    );
    // Past the cap: closed before the greeting.
    let mut third = std::net::TcpStream::connect(addr).expect("connect");
    let got = read_until_closed(&mut third);
    assert!(
        got.is_empty(),
        "a third connection got {got:?} instead of being closed"
    );
    fleet
        .node("node-1")
        .wait_for_log("NBD connection refused", Duration::from_secs(10));
    // Idle longer than the handshake timeout, then both still read.
    std::thread::sleep(Duration::from_secs(2));
    for (i, mut child) in mounted.into_iter().enumerate() {
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(b"read 0 64k\nread 1M 4k\nquit\n")
            .expect("write to qemu-io");
        drop(stdin);
        let out = child.wait_with_output().expect("wait for qemu-io");
        let t = text(&out);
        assert!(
            out.status.success() && t.matches("read ").count() == 2 && !t.contains("error"),
            "mounted client {i} could not read after the refusal:\n{t}"
        );
    }
    fleet.assert_all_alive();
}
