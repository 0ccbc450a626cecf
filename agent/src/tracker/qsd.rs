//! A `qemu-storage-daemon` driven over QMP that holds a qcow2 image for the length
//! of a sync: the `qcow2-bitmap` tracker's bitmap operations and its NBD export are
//! commands to this one process, where separate `qemu-img` and `qemu-nbd` runs would
//! each open the image, read its metadata and write its header again (tens of
//! milliseconds per sync, most of an incremental sync of a small change). The image
//! is attached (`blockdev-add`) and detached (`blockdev-del`) over QMP, so one
//! daemon can serve sync after sync (see the spare in `qcow2.rs`).
//!
//! While attached, the daemon has the image open read-write and holds QEMU's write
//! lock: nothing else writes the image meanwhile, and the bitmaps it adds, merges
//! and removes are written back when it detaches the image or quits. If the agent
//! dies, the daemon gets SIGTERM (`PR_SET_PDEATHSIG`) and closes the image cleanly;
//! killed outright, it leaves the bitmaps flagged in use, which the next sync treats
//! as untrustworthy.
//!
//! A running VM holds its image itself: then the same commands go to the VM's own
//! QEMU, through its QMP socket ([`Daemon::connect_vm`]), and the sync reads a
//! fleecing overlay ([`Daemon::fleece`]): a scratch qcow2 backed by the image's
//! node, filled by a `blockdev-backup sync=none` job with the old contents of
//! every cluster the guest writes after the freeze, so that it shows the image as
//! it was at that instant while the guest writes on.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The node name of the qcow2 image in our own daemon.
pub const NODE: &str = "img0";
/// In a VM: the fleecing overlay's node name and the id of its backup job.
const FLEECE: &str = "bulwark-fleece";
/// The id of the NBD export the sync reads.
const EXPORT: &str = "bulwark";
/// The frozen copy of an incremental's record that the daemon (or VM) exports (an
/// export may carry only a bitmap that is not recording); never written to the
/// image.
pub const FROZEN: &str = "bulwark-frozen";
/// How long the daemon may take to start, to answer a command, and to quit.
const PATIENCE: Duration = Duration::from_secs(30);

/// What went wrong with a `qemu-storage-daemon` or a VM's QEMU, naming the image.
#[derive(Debug, thiserror::Error)]
pub enum QsdError {
    #[error("cannot make a socket directory: {0}")]
    SocketDir(#[source] std::io::Error),
    #[error("cannot create {path}: {source}")]
    Stderr {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start qemu-storage-daemon (is qemu-utils installed?): {0}")]
    Spawn(#[source] std::io::Error),
    #[error("qemu-storage-daemon for {image} exited ({status}): {stderr}{hint}")]
    Exited {
        image: String,
        status: std::process::ExitStatus,
        stderr: String,
        hint: &'static str,
    },
    #[error("qemu-storage-daemon did not open its monitor within {secs} s: {source}")]
    NoMonitor {
        secs: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("QMP socket {path}: {source}")]
    VmSocket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to the QMP socket {qmp} of the VM running {image}: {source}")]
    ConnectVm {
        qmp: PathBuf,
        image: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{source} (no QMP greeting from {qmp}: a monitor serves one client at a time; is another, such as libvirt, connected to it?)"
    )]
    NoGreeting {
        qmp: PathBuf,
        #[source]
        source: Box<QsdError>,
    },
    #[error("cannot stat {path}: {source}")]
    Stat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM has no qcow2 node on {image} (its qcow2 nodes: {seen})")]
    NoNode { image: PathBuf, seen: String },
    #[error(transparent)]
    Tool(#[from] super::ToolError),
    /// QEMU's image lock refused the image.
    #[error("{0}{LOCK_HINT}")]
    Locked(#[source] Box<QsdError>),
    #[error("qemu-storage-daemon still holds block nodes after closing {image}")]
    NodesLeft { image: String },
    #[error("{who} {command} on {image}: {desc}")]
    Command {
        who: &'static str,
        command: String,
        image: String,
        desc: String,
    },
    #[error("{who} for {image}: QMP {what}: {why}")]
    Lost {
        who: &'static str,
        image: String,
        what: String,
        why: String,
    },
    #[error("qemu-storage-daemon for {image} did not quit within {secs} s; killed{why}")]
    NoQuit {
        image: String,
        secs: u64,
        why: String,
    },
    #[error("waiting for qemu-storage-daemon: {0}")]
    Wait(#[source] std::io::Error),
}

/// A running daemon and the QMP connection to it. Dropped without [`Daemon::quit`],
/// it is killed.
pub struct Daemon {
    /// Our own daemon; `None` for a VM's QEMU, reached through its QMP socket,
    /// which is never stopped or killed from here.
    child: Option<Child>,
    /// The image's node: [`NODE`] in our own daemon, the VM's otherwise.
    node: String,
    /// A VM's fleecing overlay file, while it may exist.
    scratch: Option<PathBuf>,
    qmp: BufReader<UnixStream>,
    dir: tempfile::TempDir,
    /// The image attached as [`NODE`], if any.
    image: Option<PathBuf>,
    /// Names of the asynchronous events received and not yet waited for.
    events: Vec<String>,
    /// Whether the image is exported.
    serving: bool,
    /// Whether the NBD server runs (it outlives a failed export).
    nbd_server: bool,
    /// Dropped last: ends the thread that started the daemon (whose exit is what
    /// `PR_SET_PDEATHSIG` watches).
    _keeper: Option<mpsc::Sender<()>>,
}

impl Daemon {
    /// Starts a daemon on the qcow2 image at `image` and connects to its monitor.
    #[cfg(test)]
    pub fn start(image: &Path) -> Result<Daemon, QsdError> {
        let mut d = Daemon::start_idle()?;
        d.attach(image)?;
        Ok(d)
    }

    /// Starts a daemon that holds no image yet and connects to its monitor.
    pub fn start_idle() -> Result<Daemon, QsdError> {
        let dir = tempfile::Builder::new()
            .prefix("bulwark-qsd")
            .tempdir()
            .map_err(QsdError::SocketDir)?;
        let qmp_path = dir.path().join("qmp.sock");
        // Written once every option is in place, monitor included (the daemon's
        // documented order): connecting to the monitor's socket earlier can reach
        // the socket before the monitor reads it, and QEMU then mangled the first
        // command ("QMP input member 'aruments' is unexpected", seen under load).
        let pid_path = dir.path().join("qsd.pid");
        // A file, not a pipe: a daemon kept between syncs must never block on a
        // full pipe nobody reads.
        let stderr_path = dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).map_err(|source| QsdError::Stderr {
            path: stderr_path.clone(),
            source,
        })?;
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.arg("--chardev")
            // Commas in a key=value option are doubled.
            .arg(format!(
                "socket,id=qmp,server=on,wait=off,path={}",
                qmp_path.display().to_string().replace(',', ",,")
            ))
            .arg("--monitor")
            .arg("chardev=qmp,mode=control")
            .arg("--pidfile")
            .arg(&pid_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        die_with_parent(&mut cmd);
        let (mut child, keeper) = spawn_kept(cmd).map_err(QsdError::Spawn)?;
        let deadline = Instant::now() + PATIENCE;
        let stream = loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(exited(&stderr_path, None, status));
            }
            let connected = if pid_path.exists() {
                UnixStream::connect(&qmp_path)
            } else {
                Err(std::io::Error::other("not ready yet"))
            };
            match connected {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(source) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(QsdError::NoMonitor {
                        secs: PATIENCE.as_secs(),
                        source,
                    });
                }
            }
        };
        let mut d = Daemon {
            child: Some(child),
            node: NODE.to_string(),
            scratch: None,
            qmp: BufReader::new(stream),
            dir,
            image: None,
            events: Vec::new(),
            serving: false,
            nbd_server: false,
            _keeper: Some(keeper),
        };
        d.qmp
            .get_ref()
            .set_read_timeout(Some(PATIENCE))
            .map_err(QsdError::Socket)?;
        // The greeting, then leave capabilities negotiation.
        d.read_message()?;
        d.execute("qmp_capabilities", json!({}))?;
        Ok(d)
    }

    /// Connects to the QMP socket `qmp` of a VM running on the qcow2 image at
    /// `image`, finds the image's node, and clears away whatever a sync that did
    /// not end (the agent was killed) left in the VM.
    pub fn connect_vm(qmp: &Path, image: &Path) -> Result<Daemon, QsdError> {
        let stream = UnixStream::connect(qmp).map_err(|source| QsdError::ConnectVm {
            qmp: qmp.to_path_buf(),
            image: image.to_path_buf(),
            source,
        })?;
        stream
            .set_read_timeout(Some(PATIENCE))
            .map_err(|source| QsdError::VmSocket {
                path: qmp.to_path_buf(),
                source,
            })?;
        let dir = tempfile::Builder::new()
            .prefix("bulwark-vm")
            .tempdir()
            .map_err(QsdError::SocketDir)?;
        let mut d = Daemon {
            child: None,
            node: String::new(),
            scratch: None,
            qmp: BufReader::new(stream),
            dir,
            image: Some(image.to_path_buf()),
            events: Vec::new(),
            serving: false,
            nbd_server: false,
            _keeper: None,
        };
        d.read_message().map_err(|e| QsdError::NoGreeting {
            qmp: qmp.to_path_buf(),
            source: Box::new(e),
        })?;
        d.execute("qmp_capabilities", json!({}))?;
        d.node = d.find_node(image)?;
        d.tidy_vm()?;
        Ok(d)
    }

    /// Whether this is a VM's QEMU rather than our own daemon.
    pub fn is_vm(&self) -> bool {
        self.child.is_none()
    }

    /// The image's node name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The VM's qcow2 node whose file is `image` (the same inode).
    fn find_node(&mut self, image: &Path) -> Result<String, QsdError> {
        use std::os::unix::fs::MetadataExt;
        let want = std::fs::metadata(image).map_err(|source| QsdError::Stat {
            path: image.to_path_buf(),
            source,
        })?;
        let nodes = self.execute("query-named-block-nodes", json!({"flat": true}))?;
        let mut seen = Vec::new();
        for n in nodes.as_array().into_iter().flatten() {
            let (Some(name), Some(drv), Some(file)) = (
                n.get("node-name").and_then(Value::as_str),
                n.get("drv").and_then(Value::as_str),
                n.get("file").and_then(Value::as_str),
            ) else {
                continue;
            };
            if drv != "qcow2" {
                continue;
            }
            let same = std::fs::metadata(file)
                .is_ok_and(|m| m.dev() == want.dev() && m.ino() == want.ino());
            if same {
                return Ok(name.to_string());
            }
            seen.push(format!("{name} ({file})"));
        }
        Err(QsdError::NoNode {
            image: image.to_path_buf(),
            seen: if seen.is_empty() {
                "none".to_string()
            } else {
                seen.join(", ")
            },
        })
    }

    /// Removes from a VM what a sync adds for its length (the export, the NBD
    /// server it started, the backup job, the overlay, the frozen bitmap), where
    /// present: after each sync, and before one, in case an agent was killed.
    fn tidy_vm(&mut self) -> Result<(), QsdError> {
        let exports = self.execute("query-block-exports", json!({}))?;
        let exported = exports.as_array().is_some_and(|a| {
            a.iter()
                .any(|e| e.get("id").and_then(Value::as_str) == Some(EXPORT))
        });
        if exported {
            self.serving = true;
            self.unserve()?;
            // Our export was there, so the NBD server is ours too.
            self.nbd_server = true;
        }
        if self.nbd_server {
            self.execute("nbd-server-stop", json!({}))?;
            self.nbd_server = false;
        }
        let jobs = self.execute("query-block-jobs", json!({}))?;
        let running = jobs.as_array().is_some_and(|a| {
            a.iter()
                .any(|j| j.get("device").and_then(Value::as_str) == Some(FLEECE))
        });
        if running {
            self.execute("block-job-cancel", json!({"device": FLEECE, "force": true}))?;
            self.wait_event("BLOCK_JOB_CANCELLED")?;
        }
        let nodes = self.execute("query-named-block-nodes", json!({"flat": true}))?;
        let mut fleece = false;
        let mut frozen = false;
        for n in nodes.as_array().into_iter().flatten() {
            let name = n.get("node-name").and_then(Value::as_str);
            fleece |= name == Some(FLEECE);
            if name == Some(self.node.as_str()) {
                frozen = n
                    .get("dirty-bitmaps")
                    .and_then(Value::as_array)
                    .is_some_and(|b| {
                        b.iter()
                            .any(|b| b.get("name").and_then(Value::as_str) == Some(FROZEN))
                    });
            }
        }
        if fleece {
            self.execute("blockdev-del", json!({"node-name": FLEECE}))?;
        }
        if frozen {
            let node = self.node.clone();
            self.execute(
                "block-dirty-bitmap-remove",
                json!({"node": node, "name": FROZEN}),
            )?;
        }
        if let Some(scratch) = self.scratch.take()
            && let Err(e) = std::fs::remove_file(&scratch)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(
                "cannot remove the fleecing overlay {}: {e}",
                scratch.display()
            );
        }
        Ok(())
    }

    /// A VM's fleecing overlay: makes the scratch qcow2 `scratch` (the image's
    /// size) and adds it as a node backed by the image's; returns the transaction
    /// action that starts copying before each guest write into it, which belongs
    /// in the transaction that freezes the record, so that both are one instant.
    pub fn fleece(&mut self, scratch: &Path, size: u64) -> Result<Value, QsdError> {
        let _ = std::fs::remove_file(scratch);
        let path = scratch.to_string_lossy();
        super::run_tool(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", &path, &size.to_string()],
        )?;
        self.scratch = Some(scratch.to_path_buf());
        let node = self.node.clone();
        self.execute(
            "blockdev-add",
            json!({
                "driver": "qcow2",
                "node-name": FLEECE,
                "file": {"driver": "file", "filename": scratch},
                "backing": node,
            }),
        )?;
        Ok(json!({"type": "blockdev-backup", "data":
            {"job-id": FLEECE, "device": node, "target": FLEECE, "sync": "none"}}))
    }

    /// Opens the qcow2 image at `image` read-write as node [`NODE`] (the daemon
    /// must hold no image). Its persistent bitmaps are loaded, and written back
    /// when it is detached or the daemon quits.
    pub fn attach(&mut self, image: &Path) -> Result<(), QsdError> {
        self.image = Some(image.to_path_buf());
        let blockdev = json!({
            "driver": "qcow2",
            "node-name": NODE,
            "file": {
                "driver": "file",
                "filename": image,
                "cache": {"direct": true},
                "aio": "threads",
            },
        });
        match self.execute("blockdev-add", blockdev) {
            Ok(_) => Ok(()),
            Err(e) => {
                self.image = None;
                Err(if e.to_string().contains("lock") {
                    QsdError::Locked(Box::new(e))
                } else {
                    e
                })
            }
        }
    }

    /// Closes the image (ending its export first), which writes its bitmaps back
    /// and releases its lock; the daemon keeps running, holding nothing, and may
    /// attach an image again. An error means the daemon is not fit for reuse.
    pub fn detach(&mut self) -> Result<(), QsdError> {
        self.unserve()?;
        if self.nbd_server {
            self.execute("nbd-server-stop", json!({}))?;
            self.nbd_server = false;
        }
        if self.image.is_some() {
            self.execute("blockdev-del", json!({"node-name": NODE}))?;
        }
        let left = self.execute("query-named-block-nodes", json!({"flat": true}))?;
        if left.as_array().is_some_and(|a| !a.is_empty()) {
            return Err(QsdError::NodesLeft {
                image: self.describe(),
            });
        }
        self.image = None;
        Ok(())
    }

    /// The image, for messages.
    fn describe(&self) -> String {
        describe(self.image.as_deref())
    }

    /// Runs one QMP command; its `return` value, or its error as a message that
    /// names the command and the image.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QsdError> {
        let started = std::time::Instant::now();
        let mut line = json!({"execute": command, "arguments": arguments}).to_string();
        line.push('\n');
        self.qmp
            .get_mut()
            .write_all(line.as_bytes())
            .map_err(|e| self.lost(command, &e.to_string()))?;
        loop {
            let mut reply = self.read_message()?;
            if let Some(r) = reply.get_mut("return") {
                tracing::trace!(
                    command,
                    ms = started.elapsed().as_secs_f64() * 1000.0,
                    "qmp"
                );
                return Ok(r.take());
            }
            if let Some(e) = reply.get("error") {
                let desc = e.get("desc").and_then(Value::as_str).unwrap_or("no reason");
                return Err(QsdError::Command {
                    who: self.who(),
                    command: command.to_string(),
                    image: self.describe(),
                    desc: desc.to_string(),
                });
            }
            self.note_event(&reply);
        }
    }

    /// Keeps the name of an asynchronous event.
    fn note_event(&mut self, message: &Value) {
        if let Some(e) = message.get("event").and_then(Value::as_str) {
            self.events.push(e.to_string());
        }
    }

    /// Waits for the asynchronous event `name` (or takes it if it came already).
    fn wait_event(&mut self, name: &str) -> Result<(), QsdError> {
        loop {
            if let Some(i) = self.events.iter().position(|e| e == name) {
                self.events.remove(i);
                return Ok(());
            }
            let m = self.read_message()?;
            self.note_event(&m);
        }
    }

    fn read_message(&mut self) -> Result<Value, QsdError> {
        let mut line = String::new();
        match self.qmp.read_line(&mut line) {
            Ok(0) => Err(self.lost("reading", "the monitor closed")),
            Ok(_) => serde_json::from_str(&line)
                .map_err(|e| self.lost("reading", &format!("unexpected message ({e}): {line}"))),
            Err(e) => Err(self.lost("reading", &e.to_string())),
        }
    }

    fn lost(&mut self, what: &str, why: &str) -> QsdError {
        if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
            return exited(&self.stderr_path(), self.image.as_deref(), status);
        }
        QsdError::Lost {
            who: self.who(),
            image: self.describe(),
            what: what.to_string(),
            why: why.to_string(),
        }
    }

    /// Who answers QMP, for messages.
    pub fn who(&self) -> &'static str {
        if self.is_vm() {
            "the VM's QEMU"
        } else {
            "qemu-storage-daemon"
        }
    }

    fn stderr_path(&self) -> PathBuf {
        self.dir.path().join("stderr.log")
    }

    /// Starts the daemon's NBD server on a unix socket and exports the image
    /// read-only as the default export, with the dirty bitmap `bitmap` (which must
    /// not be recording) as the metadata context `qemu:dirty-bitmap:<bitmap>`.
    pub fn serve(&mut self, bitmap: Option<&str>, connections: usize) -> Result<PathBuf, QsdError> {
        let sock = self.dir.path().join("nbd.sock");
        self.execute(
            "nbd-server-start",
            json!({
                "addr": {"type": "unix", "data": {"path": sock}},
                "max-connections": connections,
            }),
        )?;
        self.nbd_server = true;
        // A VM's sync reads its frozen view; the frozen bitmap is on the image's
        // node, which backs the overlay, so the export reaches it.
        let node = if self.scratch.is_some() {
            FLEECE
        } else {
            self.node.as_str()
        };
        let mut export = json!({"type": "nbd", "id": EXPORT, "node-name": node, "name": ""});
        if let Some(b) = bitmap {
            export["bitmaps"] = json!([b]);
        }
        self.execute("block-export-add", export)?;
        self.serving = true;
        Ok(sock)
    }

    /// Ends the export (its clients should be gone first), which frees its bitmap
    /// for other operations.
    pub fn unserve(&mut self) -> Result<(), QsdError> {
        if !self.serving {
            return Ok(());
        }
        self.serving = false;
        self.execute("block-export-del", json!({"id": EXPORT, "mode": "hard"}))?;
        self.wait_event("BLOCK_EXPORT_DELETED")
    }

    /// Whether the daemon is still running.
    pub fn running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// Asks the daemon to quit, which writes the image's bitmaps back, and waits
    /// for it. An error says the image was not closed cleanly; a clean exit is
    /// success, whether or not the reply to `quit` came before the monitor closed.
    pub fn quit(mut self) -> Result<(), QsdError> {
        if self.is_vm() {
            // Only what the sync added goes.
            return self.tidy_vm();
        }
        let asked = self.execute("quit", json!({}));
        let deadline = Instant::now() + PATIENCE;
        loop {
            match self.child.as_mut().map(Child::try_wait).unwrap_or(Ok(None)) {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    return Err(exited(&self.stderr_path(), self.image.as_deref(), status));
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Ok(None) => {
                    let why = asked.err().map(|e| format!(" ({e})")).unwrap_or_default();
                    return Err(QsdError::NoQuit {
                        image: self.describe(),
                        secs: PATIENCE.as_secs(),
                        why,
                    });
                }
                Err(e) => return Err(QsdError::Wait(e)),
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        } else if (self.serving || self.nbd_server || self.scratch.is_some())
            && let Err(e) = self.tidy_vm()
        {
            tracing::warn!("clearing a sync's nodes out of the VM: {e}");
        }
    }
}

/// Said when QEMU's image lock refused the daemon.
const LOCK_HINT: &str = " (the image is open elsewhere, e.g. by a running VM; the qcow2-bitmap tracker needs it closed during a sync)";

/// The message for a daemon that exited: its status and what it printed, with a
/// hint when QEMU's image lock refused it.
fn exited(stderr: &Path, image: Option<&Path>, status: std::process::ExitStatus) -> QsdError {
    let err = std::fs::read_to_string(stderr).unwrap_or_default();
    let err = err.trim();
    let hint = if err.contains("lock") { LOCK_HINT } else { "" };
    QsdError::Exited {
        image: describe(image),
        status,
        stderr: err.to_string(),
        hint,
    }
}

/// An image path (or its absence), for messages.
fn describe(image: Option<&Path>) -> String {
    image.map_or_else(|| "(no image)".to_string(), |p| p.display().to_string())
}

/// Has the child get SIGTERM when the thread that started it ends (see
/// [`spawn_kept`]), or not start at all if the agent already exited.
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id();
    // SAFETY: between fork and exec the closure calls only prctl(2) and getppid(2),
    // both async-signal-safe, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::other("the agent exited"));
            }
            Ok(())
        });
    }
}

/// Spawns `cmd` from a thread of its own that lives until the returned sender is
/// dropped: `PR_SET_PDEATHSIG` fires when the *thread* that forked ends, and the
/// caller's may be a pooled thread that ends whenever it idles.
fn spawn_kept(mut cmd: Command) -> std::io::Result<(Child, mpsc::Sender<()>)> {
    let (child_tx, child_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("qsd-keeper".into())
        .spawn(move || {
            let spawned = cmd.spawn();
            let ok = spawned.is_ok();
            if child_tx.send(spawned).is_ok() && ok {
                // Returns when the daemon's owner drops the sender.
                let _ = stop_rx.recv();
            }
        })?;
    let child = child_rx
        .recv()
        .map_err(|_| std::io::Error::other("the thread starting it ended"))??;
    Ok((child, stop_tx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::testutil;

    /// qemu-storage-daemon and qemu-img both run here (else the test skips, saying
    /// why).
    fn qemu() -> bool {
        testutil::have("qemu-storage-daemon") && testutil::have("qemu-img")
    }

    /// What keeps an agent that dies mid-sync from leaving the image locked: the
    /// child gets SIGTERM when the thread that started it ends.
    #[test]
    fn the_child_gets_sigterm_when_its_keeper_ends() {
        use std::os::unix::process::ExitStatusExt;
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        die_with_parent(&mut cmd);
        let (mut child, keeper) = spawn_kept(cmd).expect("spawn");
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "alive while kept"
        );
        drop(keeper);
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = child.try_wait().expect("try_wait") {
                break s;
            }
            assert!(Instant::now() < deadline, "still running 10 s after");
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(status.signal(), Some(libc::SIGTERM), "{status}");
    }

    /// A new empty 1 MiB qcow2 image at `img`.
    fn create_qcow2(img: &Path) {
        testutil::create_qcow2(img, "", "1M", None);
    }

    /// The image's bitmaps as `qemu-img info` (which needs the image unlocked)
    /// sees them.
    fn bitmaps_on_disk(img: &Path) -> Vec<String> {
        let out = Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(img)
            .output()
            .expect("qemu-img info");
        assert!(
            out.status.success(),
            "the image should be unlocked: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let info: Value = serde_json::from_slice(&out.stdout).expect("json");
        info["format-specific"]["data"]["bitmaps"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|b| b["name"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// One daemon serves several syncs: detaching writes the bitmaps back and
    /// frees the image, the export and NBD server go with it, and the same daemon
    /// attaches the image (or another) again.
    #[test]
    fn a_daemon_attaches_and_detaches_images_in_turn() {
        if !qemu() {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let imgs: Vec<PathBuf> = ["one.qcow2", "two.qcow2"]
            .iter()
            .map(|n| {
                let img = dir.path().join(n);
                create_qcow2(&img);
                img
            })
            .collect();
        let mut d = Daemon::start_idle().expect("start");
        for round in 0..2 {
            for img in &imgs {
                d.attach(img).expect("attach");
                let name = format!("b{round}");
                d.execute(
                    "block-dirty-bitmap-add",
                    json!({"node": NODE, "name": name, "persistent": true}),
                )
                .expect("add");
                d.serve(Some(&name), 1).map(|_| ()).unwrap_or_else(|e| {
                    // A recording bitmap cannot be exported; the server is up anyway.
                    assert!(e.to_string().contains("block-export-add"), "{e}");
                });
                d.detach().expect("detach");
                let want: Vec<String> = (0..=round).map(|r| format!("b{r}")).collect();
                assert_eq!(bitmaps_on_disk(img), want, "round {round}");
            }
        }
        // Still usable, and holding nothing: quitting succeeds.
        assert!(d.running());
        d.quit().expect("quit");
    }

    #[test]
    fn refusals_say_what_and_where() {
        if !qemu() {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.qcow2");
        let e = Daemon::start(&missing)
            .err()
            .expect("a missing image")
            .to_string();
        assert!(
            e.contains("missing.qcow2") && e.contains("No such file"),
            "{e}"
        );

        let raw = dir.path().join("a,raw");
        std::fs::write(&raw, vec![0u8; 1 << 20]).expect("write");
        let e = Daemon::start(&raw).err().expect("not qcow2").to_string();
        assert!(e.contains("not in qcow2 format"), "{e}");

        let img = dir.path().join("a,b.qcow2");
        create_qcow2(&img);
        let mut d = Daemon::start(&img).expect("start");
        let e = d
            .execute(
                "block-dirty-bitmap-remove",
                json!({"node": NODE, "name": "nope"}),
            )
            .expect_err("no such bitmap")
            .to_string();
        assert!(
            e.contains("block-dirty-bitmap-remove") && e.contains("a,b.qcow2"),
            "{e}"
        );
        // The image is locked while the daemon holds it.
        let e = Daemon::start(&img).err().expect("locked").to_string();
        assert!(e.contains("open elsewhere"), "{e}");
        d.execute(
            "block-dirty-bitmap-add",
            json!({"node": NODE, "name": "kept", "persistent": true}),
        )
        .expect("add");
        d.quit().expect("quit");
        assert_eq!(
            bitmaps_on_disk(&img),
            vec!["kept".to_string()],
            "the bitmap was written back at quit"
        );
    }
}
