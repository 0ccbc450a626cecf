//! The `qcow2-bitmap` tracker: QEMU persistent dirty bitmaps inside a qcow2 image,
//! the route libvirt and oVirt incremental backups take.
//!
//! Bitmaps the agent keeps in the image (all persistent and enabled, so QEMU, qemu-io
//! or anything else that opens the image records writes into them):
//!
//! - `bulwark-p<N>` — every write since point `N` was taken.
//! - `bulwark-next` — every write since the running sync froze its changes.
//!
//! A sync (the image must not be open elsewhere: QEMU locks it) is one
//! `qemu-storage-daemon` holding the image, driven over QMP (see [`super::qsd`]):
//!
//! 1. Tidy up after any crash: a leftover `bulwark-next` is merged into the newest
//!    `bulwark-p<N>` (a superset is safe), older `bulwark-p*` are removed. A bitmap
//!    flagged in use (QEMU did not close the image cleanly) or not recording cannot
//!    be trusted: the sync becomes a consistency check.
//! 2. Add the bitmap for the next sync: `bulwark-p<N+1>` for an incremental (the node
//!    numbers the new point `N + 1`), `bulwark-next` for a scan. From here on writes
//!    belong to the next sync. An incremental, in the same QMP transaction, copies
//!    `bulwark-p<N>` into `bulwark-frozen`, a bitmap that neither records nor is
//!    written to the image, and then removes `bulwark-p<N>`.
//! 3. Export the image read-only over NBD on a private unix socket, with
//!    `bulwark-frozen` as the metadata context `qemu:dirty-bitmap:bulwark-frozen`;
//!    ask for block status over the whole disk and read only the dirty extents. The
//!    node refuses the sync if its newest point is not `N`, and the agent falls back
//!    to a consistency check. Data is read from the image file itself where the
//!    image's own L1/L2 tables ([`super::qcow2_map`], read once the daemon holds the
//!    image, so that no writer can move a cluster) show it stored as it is — as the
//!    live volume is read: from the page cache where cached, else with `O_DIRECT` —
//!    zeros are not read at all, and anything else (a backing file, compressed
//!    clusters, an encrypted image, an external data file, subclusters) is read
//!    through the export.
//! 4. Committed as point `P`: a scan's `bulwark-next` becomes `bulwark-p<P>` (by an
//!    add-and-merge, or in place of a `bulwark-p<P>` left by a killed sync) and a
//!    scan's old `bulwark-p<N>` is removed; the daemon detaches the image, writing
//!    the bitmaps back and releasing its lock, and is kept idle for the next sync
//!    (at most one per agent, for at most five minutes). Failed: `bulwark-p<N>` is
//!    made again as the union of `bulwark-frozen` and the sync's own bitmap, which
//!    is removed: it holds every write since point `N`. A crash between 2 and 4 leaves `bulwark-p<N+1>` (the
//!    daemon gets SIGTERM when the agent dies and closes the image) or bitmaps
//!    flagged in use (killed outright); the tidy-up keeps the newest, the node
//!    refuses it as a base or it is not trusted, and that sync is a consistency
//!    check.
//!
//! The agent holds the image open only during a sync. A VM running on the image
//! holds it itself (QEMU locks it): with `qmp_socket` set, the same bitmap commands
//! go to the VM's QEMU over that socket, the freezing transaction also starts a
//! fleecing backup job into a scratch overlay (`<source>.fleece.qcow2` under the
//! agent's state directory, see [`super::qsd`]), and the sync reads the frozen view
//! through an NBD export of the overlay while the guest writes on; everything it
//! added to the VM is taken away again at the end (or, after an agent crash, at the
//! next sync). Without `qmp_socket`, a sync of a locked image fails with a message
//! that says so.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bulwark_common::block::Geometry;
use bulwark_nbd::NbdError;
use bulwark_nbd::client::Client;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;

use super::bitmap::Bitmap;
use super::qcow2_map::{Qcow2Map, Where};
use super::qsd::{Daemon, FROZEN, QsdError};
use super::{BlockSource, Frozen, Plan, ToolError, Tracker, TrackerError, lock, run_tool};
use crate::volume::Volume;

/// What went wrong with a qcow2 image, its bitmaps or its export, naming the image.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    #[error("{0} (is qemu-utils installed?)")]
    MissingTool(#[source] ToolError),
    #[error(transparent)]
    Tool(ToolError),
    #[error("qemu-img info of {path}: unexpected output: {source}")]
    Info {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} is {format}, not qcow2")]
    NotQcow2 { path: PathBuf, format: String },
    #[error(transparent)]
    Qsd(#[from] QsdError),
    #[error("cannot write {path}: {source}")]
    Marker {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("qemu-storage-daemon query-named-block-nodes of {path}: unexpected reply: {source}")]
    Nodes {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{who} does not list {path}")]
    NotListed { who: &'static str, path: PathBuf },
    #[error(
        "{path} is now {now} bytes, it was registered with {registered}; resizing is not supported"
    )]
    Resized {
        path: PathBuf,
        now: u64,
        registered: u64,
    },
    #[error("NBD export of {path}: {source}{exited}")]
    Export {
        path: PathBuf,
        /// Said when the daemon is gone.
        exited: &'static str,
        #[source]
        source: NbdError,
    },
    #[error("qemu-storage-daemon exports {size} bytes of {path}, expected {expected}")]
    ExportSize {
        size: u64,
        path: PathBuf,
        expected: u64,
    },
    #[error("block status of {path}: {source}")]
    BlockStatus {
        path: PathBuf,
        #[source]
        source: NbdError,
    },
    #[error("the NBD export returned no block status at byte {offset} of {path}")]
    NoBlockStatus { offset: u64, path: PathBuf },
    #[error(
        "the qcow2-bitmap tracker reads the image itself; snapshot_command is not supported with it"
    )]
    Snapshot,
}

impl From<ToolError> for Qcow2Error {
    /// A tool that could not be started gets the hint to install qemu-utils.
    fn from(e: ToolError) -> Qcow2Error {
        match e {
            ToolError::Spawn { .. } => Qcow2Error::MissingTool(e),
            ToolError::Failed { .. } => Qcow2Error::Tool(e),
        }
    }
}

const PREFIX: &str = "bulwark-p";
/// Connections to the NBD export when data is read through it: the sync's reader threads
/// each read through their own, so several reads are in flight at once (one
/// connection answers one at a time).
const CONNECTIONS: usize = 4;
const NEXT: &str = "bulwark-next";

#[derive(Debug, Deserialize)]
struct ImageInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
}

#[derive(Debug, Deserialize)]
struct FormatSpecific {
    data: Option<FormatData>,
}

#[derive(Debug, Deserialize)]
struct FormatData {
    /// An external data file: guest data is not in the image file.
    #[serde(rename = "data-file")]
    data_file: Option<String>,
    /// Encryption: the image file holds ciphertext.
    encrypt: Option<serde_json::Value>,
}

/// Reads guest bytes straight from the image file where its map says they are
/// stored as they are (through [`Volume`]: from the page cache when they are
/// cached, else with `O_DIRECT`), zeros where it says zeros, and the rest through
/// the daemon's NBD export. The daemon holds the image meanwhile, and the tracker needs it
/// closed to every writer, so the map cannot change under the sync.
struct MappedReader {
    file: Volume,
    map: Qcow2Map,
    nbd: NbdReader,
}

impl BlockSource for MappedReader {
    fn size_bytes(&self) -> u64 {
        self.nbd.size
    }
    fn read_chunk(&self, offset: u64, len: usize) -> std::io::Result<Bytes> {
        let pieces = self.map.pieces(offset, len)?;
        if let [(_, n, Where::Host(h))] = pieces[..]
            && n == len
        {
            return self.file.read_chunk(h, len);
        }
        let mut buf = bytes::BytesMut::zeroed(len);
        for (at, n, how) in pieces {
            let i = (at - offset) as usize;
            match how {
                Where::Host(h) => buf[i..i + n].copy_from_slice(&self.file.read_chunk(h, n)?),
                Where::Zeros => {}
                Where::Nbd => buf[i..i + n].copy_from_slice(&self.nbd.read_chunk(at, n)?),
            }
        }
        Ok(buf.freeze())
    }
    fn describe(&self) -> String {
        self.nbd.describe()
    }
}

/// [`run_tool`], with a hint when the tool is missing.
fn run(tool: &str, args: &[&str]) -> Result<Vec<u8>, Qcow2Error> {
    Ok(run_tool(tool, args)?)
}

/// The virtual size of the qcow2 image at `path` (may be in use).
pub fn virtual_size(path: &Path) -> Result<u64, Qcow2Error> {
    let p = path.to_string_lossy();
    let out = run(
        "qemu-img",
        &["info", "--output=json", "-f", "qcow2", "-U", &p],
    )?;
    let i: ImageInfo = serde_json::from_slice(&out).map_err(|source| Qcow2Error::Info {
        path: path.to_path_buf(),
        source,
    })?;
    if i.format != "qcow2" {
        return Err(Qcow2Error::NotQcow2 {
            path: path.to_path_buf(),
            format: i.format,
        });
    }
    Ok(i.virtual_size)
}

/// The image node as `query-named-block-nodes` describes it.
#[derive(Debug, Deserialize)]
struct BlockNode {
    #[serde(rename = "node-name")]
    node_name: String,
    image: NodeImage,
    #[serde(rename = "dirty-bitmaps", default)]
    dirty_bitmaps: Vec<NodeBitmap>,
}

#[derive(Debug, Deserialize)]
struct NodeImage {
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "format-specific")]
    format_specific: Option<FormatSpecific>,
}

#[derive(Debug, Deserialize)]
struct NodeBitmap {
    name: String,
    #[serde(default)]
    recording: bool,
    #[serde(default)]
    persistent: bool,
    /// Flagged in use in the image: QEMU did not close it cleanly.
    #[serde(default)]
    inconsistent: bool,
}

/// Bitmap operations on the daemon's image node. The arguments of adding the
/// persistent, recording bitmap `name`:
fn persistent(d: &Daemon, name: &str, granularity: u32) -> serde_json::Value {
    json!({"node": d.node(), "name": name, "persistent": true, "granularity": granularity})
}

/// `target` (an existing bitmap) |= `from`.
fn merge(d: &mut Daemon, target: &str, from: &str) -> Result<(), QsdError> {
    d.execute(
        "block-dirty-bitmap-merge",
        json!({"node": d.node(), "target": target, "bitmaps": [from]}),
    )
    .map(|_| ())
}

fn remove(d: &mut Daemon, name: &str) -> Result<(), QsdError> {
    d.execute(
        "block-dirty-bitmap-remove",
        json!({"node": d.node(), "name": name}),
    )
    .map(|_| ())
}

/// `target` := the union of `from`, atomically: a new persistent bitmap, or with
/// `exists` the bitmap already there, cleared first.
fn set_union(
    d: &mut Daemon,
    target: &str,
    from: &[&str],
    granularity: u32,
    exists: bool,
) -> Result<(), QsdError> {
    let first = if exists {
        json!({"type": "block-dirty-bitmap-clear", "data": {"node": d.node(), "name": target}})
    } else {
        json!({"type": "block-dirty-bitmap-add", "data": persistent(d, target, granularity)})
    };
    let merge = json!({"type": "block-dirty-bitmap-merge", "data":
        {"node": d.node(), "target": target, "bitmaps": from}});
    d.execute("transaction", json!({"actions": [first, merge]}))
        .map(|_| ())
}

/// A sync in progress: the daemon holding the image, and our connections to it.
struct Session {
    daemon: Daemon,
    /// The first one also asks for block status.
    clients: Arc<Vec<Mutex<Client>>>,
    /// The newest `bulwark-p<N>` the image had when the sync began.
    kept: Option<u64>,
    /// An incremental: `bulwark-p<kept>` was frozen into [`FROZEN`] (exported) and
    /// removed from the image.
    frozen: bool,
    /// The bitmap this sync added for the writes after it froze.
    next: String,
}

impl Session {
    /// Closes our connections; the daemon is still running.
    fn disconnect(&mut self) {
        let clients = std::mem::replace(&mut self.clients, Arc::new(Vec::new()));
        if let Ok(clients) = Arc::try_unwrap(clients) {
            for c in clients {
                let _ = c
                    .into_inner()
                    .unwrap_or_else(|e| e.into_inner())
                    .disconnect();
            }
        }
    }
}

/// Reads the image through the daemon's NBD export.
struct NbdReader {
    clients: Arc<Vec<Mutex<Client>>>,
    /// Where the next reader starts looking for a free connection.
    next: std::sync::atomic::AtomicUsize,
    size: u64,
    what: String,
}

impl BlockSource for NbdReader {
    fn size_bytes(&self) -> u64 {
        self.size
    }
    fn read_chunk(&self, offset: u64, len: usize) -> std::io::Result<Bytes> {
        let mut buf = vec![0u8; len];
        // A free connection if there is one, else wait for one in turn.
        let n = self.clients.len();
        let start = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut c = (0..n)
            .find_map(|i| self.clients[(start + i) % n].try_lock().ok())
            .unwrap_or_else(|| {
                self.clients[start % n]
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
            });
        c.read(offset, &mut buf)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Bytes::from(buf))
    }
    fn describe(&self) -> String {
        self.what.clone()
    }
}

struct State {
    inconsistent: Option<String>,
    session: Option<Session>,
}

/// See the module docs.
pub struct Qcow2Tracker {
    source: String,
    path: PathBuf,
    geometry: Geometry,
    /// Present in `state_dir` from the start of a sync until its bitmaps are put in
    /// order (committed or undone): an agent that finds it at start-up stopped in
    /// the middle of a sync, when the frozen record lived only in the daemon.
    marker: PathBuf,
    /// The QMP socket of a VM running on the image.
    qmp: Option<PathBuf>,
    /// A VM's fleecing overlay, for the length of a sync.
    scratch: PathBuf,
    state: Mutex<State>,
}

impl Qcow2Tracker {
    /// A tracker for the image at `path`; `state_dir` holds its mid-sync marker
    /// (and a VM's fleecing overlay); `qmp`: the QMP socket of a VM running on it.
    pub fn new(
        source: &str,
        path: &Path,
        geometry: Geometry,
        state_dir: &Path,
        qmp: Option<&Path>,
    ) -> Qcow2Tracker {
        let trackers = state_dir.join("trackers");
        let marker = trackers.join(format!("{source}.qcow2-syncing"));
        let scratch = trackers.join(format!("{source}.fleece.qcow2"));
        let inconsistent = marker.exists().then(|| {
            format!(
                "the agent stopped in the middle of a sync of {} ({} is still there), so the image's bitmaps may miss writes made before that sync",
                path.display(),
                marker.display()
            )
        });
        if let Some(why) = &inconsistent {
            tracing::warn!(source, "{why}; the next sync is a consistency check");
        }
        Qcow2Tracker {
            source: source.to_string(),
            path: path.to_path_buf(),
            geometry,
            marker,
            qmp: qmp.map(Path::to_path_buf),
            scratch,
            state: Mutex::new(State {
                inconsistent,
                session: None,
            }),
        }
    }

    /// Marks a sync as started (see [`Qcow2Tracker::marker`]). Not fsync'd: it
    /// guards against the agent dying, and a crash of the whole host also kills the
    /// daemon outright, which leaves the bitmaps flagged in use.
    fn mark_started(&self) -> Result<(), Qcow2Error> {
        let write = || -> std::io::Result<()> {
            if let Some(dir) = self.marker.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&self.marker, self.path.display().to_string())
        };
        write().map_err(|source| Qcow2Error::Marker {
            path: self.marker.clone(),
            source,
        })
    }

    /// The sync's bitmaps are in order again. A sync that did not commit leaves the
    /// marker while the source is inconsistent (`keep`): the image's bitmaps are
    /// then no better than before it, and an agent restarted now must still know.
    fn mark_ended(&self, keep: bool) {
        if keep {
            return;
        }
        if let Err(e) = std::fs::remove_file(&self.marker)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(source = %self.source, "cannot remove {}: {e}", self.marker.display());
        }
    }

    /// Tidies the image's bitmaps; returns the point of a usable record, and
    /// whether the image file holds guest data as it is (no external data file, no
    /// encryption), so that it may be read directly.
    fn prepare(&self, st: &mut State, d: &mut Daemon) -> Result<(Option<u64>, bool), Qcow2Error> {
        let nodes = d.execute("query-named-block-nodes", json!({"flat": true}))?;
        let nodes: Vec<BlockNode> =
            serde_json::from_value(nodes).map_err(|source| Qcow2Error::Nodes {
                path: self.path.clone(),
                source,
            })?;
        let node = nodes
            .into_iter()
            .find(|n| n.node_name == d.node())
            .ok_or_else(|| Qcow2Error::NotListed {
                who: d.who(),
                path: self.path.clone(),
            })?;
        if node.image.virtual_size != self.geometry.size_bytes {
            return Err(Qcow2Error::Resized {
                path: self.path.clone(),
                now: node.image.virtual_size,
                registered: self.geometry.size_bytes,
            });
        }
        // A VM's guest moves clusters while the sync reads: never read its file.
        let plain = !d.is_vm()
            && node
                .image
                .format_specific
                .and_then(|f| f.data)
                .is_some_and(|d| d.data_file.is_none() && d.encrypt.is_none());
        let ours: Vec<&NodeBitmap> = node
            .dirty_bitmaps
            .iter()
            .filter(|b| b.persistent && (b.name == NEXT || b.name.starts_with(PREFIX)))
            .collect();
        let mut points: Vec<u64> = ours
            .iter()
            .filter_map(|b| b.name.strip_prefix(PREFIX).and_then(|n| n.parse().ok()))
            .collect();
        points.sort_unstable();
        let newest = points.last().copied();
        if let Some(b) = ours.iter().find(|b| b.inconsistent || !b.recording) {
            let why = format!(
                "bitmap {} of {} is {} (the image was not closed cleanly, or the bitmap was disabled)",
                b.name,
                self.path.display(),
                if b.inconsistent {
                    "flagged in use"
                } else {
                    "not recording"
                }
            );
            for b in &ours {
                remove(d, &b.name)?;
            }
            tracing::warn!(source = %self.source, "{why}; this sync is a consistency check");
            st.inconsistent = Some(why);
            return Ok((None, plain));
        }
        if ours.iter().any(|b| b.name == NEXT) {
            if let Some(n) = newest {
                merge(d, &format!("{PREFIX}{n}"), NEXT)?;
            }
            remove(d, NEXT)?;
        }
        for n in &points {
            if Some(*n) != newest {
                remove(d, &format!("{PREFIX}{n}"))?;
            }
        }
        Ok((newest, plain))
    }

    /// Connects `connections` times to the daemon's NBD server at `sock`.
    fn connect(
        &self,
        d: &mut Daemon,
        sock: &Path,
        exported: Option<&str>,
        connections: usize,
    ) -> Result<Vec<Mutex<Client>>, Qcow2Error> {
        let contexts: Vec<String> = exported
            .map(|b| vec![format!("qemu:dirty-bitmap:{b}")])
            .unwrap_or_default();
        let ctx_refs: Vec<&str> = contexts.iter().map(String::as_str).collect();
        let mut clients = Vec::with_capacity(connections);
        for i in 0..connections {
            let contexts: &[&str] = if i == 0 { &ctx_refs } else { &[] };
            let c =
                Client::connect_unix(sock, "", contexts).map_err(|source| Qcow2Error::Export {
                    path: self.path.clone(),
                    exited: if d.running() {
                        ""
                    } else {
                        " (qemu-storage-daemon exited)"
                    },
                    source,
                })?;
            clients.push(Mutex::new(c));
        }
        let size = lock(&clients[0]).size();
        if size != self.geometry.size_bytes {
            return Err(Qcow2Error::ExportSize {
                size,
                path: self.path.clone(),
                expected: self.geometry.size_bytes,
            });
        }
        Ok(clients)
    }

    /// The dirty blocks of the exported bitmap, from block status over the disk.
    fn dirty_blocks(&self, client: &Mutex<Client>, bitmap: &str) -> Result<Bitmap, Qcow2Error> {
        let context = format!("qemu:dirty-bitmap:{bitmap}");
        let g = self.geometry;
        let bs = u64::from(g.block_size);
        let mut out = Bitmap::new(g.block_count());
        let mut c = lock(client);
        let mut offset = 0u64;
        while offset < g.size_bytes {
            let want = (g.size_bytes - offset).min(1 << 30);
            let extents = c.block_status(offset, want, &context).map_err(|source| {
                Qcow2Error::BlockStatus {
                    path: self.path.clone(),
                    source,
                }
            })?;
            if extents.is_empty() {
                return Err(Qcow2Error::NoBlockStatus {
                    offset,
                    path: self.path.clone(),
                });
            }
            for (len, flags) in extents {
                let len = len.min(g.size_bytes - offset);
                if len == 0 {
                    break;
                }
                if flags & 1 != 0 {
                    let first = offset / bs;
                    let last = (offset + len - 1) / bs;
                    out.set_range(first, last - first + 1);
                }
                offset += len;
                if offset >= g.size_bytes {
                    break;
                }
            }
        }
        Ok(out)
    }

    fn begin_locked(&self, st: &mut State, scan: bool) -> Result<Frozen, Qcow2Error> {
        let starting = Instant::now();
        self.mark_started()?;
        // `kept`: the bitmap the image has (removed at commit, restored on failure);
        // `base`: the one this sync trusts (none for a scan).
        let daemon = match &self.qmp {
            Some(qmp) => Daemon::connect_vm(qmp, &self.path),
            None => take_daemon().and_then(|mut d| match d.attach(&self.path) {
                Ok(()) => Ok(d),
                Err(e) => {
                    release(&self.source, d);
                    Err(e)
                }
            }),
        };
        let prepared =
            daemon
                .map_err(Qcow2Error::from)
                .and_then(|mut d| match self.prepare(st, &mut d) {
                    Ok(k) => Ok((d, k)),
                    Err(e) => {
                        release(&self.source, d);
                        Err(e)
                    }
                });
        let (daemon, (kept, plain)) = match prepared {
            Ok(p) => p,
            Err(e) => {
                self.mark_ended(st.inconsistent.is_some());
                return Err(e);
            }
        };
        let base = if scan || st.inconsistent.is_some() {
            None
        } else {
            kept
        };
        // From here on, writes are recorded for the next sync: an incremental knows
        // the point it will make (the node numbers points base + 1) and names the
        // bitmap after it at once; a scan learns that only later.
        let next = match base {
            Some(b) => format!("{PREFIX}{}", b + 1),
            None => NEXT.to_string(),
        };
        let mut session = Session {
            daemon,
            clients: Arc::new(Vec::new()),
            kept,
            frozen: false,
            next,
        };
        match self.freeze_and_serve(&mut session, base, plain) {
            Ok(plan) => {
                let reader = self.reader(&session, plain);
                tracing::debug!(source = %self.source, ms = starting.elapsed().as_secs_f64() * 1000.0, "image frozen and served");
                st.session = Some(session);
                Ok(Frozen { plan, reader })
            }
            Err(e) => {
                self.undo(session, st.inconsistent.is_some());
                Err(e)
            }
        }
    }

    /// Starts recording into the sync's `next` bitmap, freezes the base's record
    /// (an incremental), exports the image and reads the record.
    fn freeze_and_serve(
        &self,
        s: &mut Session,
        base: Option<u64>,
        plain: bool,
    ) -> Result<Plan, Qcow2Error> {
        let g = self.granularity();
        let d = &mut s.daemon;
        // In a VM, the fleecing job starts in the same instant as the record
        // freezes: the overlay shows the image as it was then.
        let fleece = if d.is_vm() {
            Some(d.fleece(&self.scratch, self.geometry.size_bytes)?)
        } else {
            None
        };
        // Writes from now on go to `next`.
        let mut actions =
            vec![json!({"type": "block-dirty-bitmap-add", "data": persistent(d, &s.next, g)})];
        if let Some(b) = base {
            // And the record up to now is a frozen (non-persistent, not recording)
            // copy, which is what an export may carry.
            let kept = format!("{PREFIX}{b}");
            actions.push(json!({"type": "block-dirty-bitmap-add", "data":
                {"node": d.node(), "name": FROZEN, "persistent": false,
                 "granularity": g, "disabled": true}}));
            actions.push(json!({"type": "block-dirty-bitmap-merge", "data":
                {"node": d.node(), "target": FROZEN, "bitmaps": [kept]}}));
        }
        actions.extend(fleece);
        d.execute("transaction", json!({ "actions": actions }))?;
        if let Some(b) = base {
            // `frozen` only once the base's bitmap is gone: if removing it
            // fails, undo merges the sync's bitmap into it where it stands.
            remove(d, &format!("{PREFIX}{b}"))?;
            s.frozen = true;
        }
        // Tests hold a sync here to show that a VM's guest writing meanwhile does
        // not reach the point.
        bulwark_common::failpoint::hit("agent-qcow2-frozen");
        let exported = base.map(|_| FROZEN);
        let connections = if plain { 1 } else { CONNECTIONS };
        let sock = d.serve(exported, connections)?;
        s.clients = Arc::new(self.connect(d, &sock, exported, connections)?);
        Ok(match base {
            Some(b) => Plan::Dirty {
                base: b,
                blocks: Arc::new(self.dirty_blocks(&s.clients[0], FROZEN)?),
            },
            None => Plan::Scan,
        })
    }

    /// The reader of the sync: the image file itself where its map allows (a plain
    /// image), else the NBD export. The map is read only now: the daemon holds the
    /// image, so no writer can move a cluster until the sync ends.
    fn reader(&self, s: &Session, plain: bool) -> Arc<dyn BlockSource> {
        let nbd = NbdReader {
            clients: s.clients.clone(),
            next: Default::default(),
            size: self.geometry.size_bytes,
            what: format!("{} (through {})", self.path.display(), s.daemon.who()),
        };
        if !plain {
            return Arc::new(nbd);
        }
        let why = match Qcow2Map::open(&self.path, self.geometry.size_bytes) {
            Ok(map) => match Volume::open(&self.path) {
                Ok(file) => return Arc::new(MappedReader { file, map, nbd }),
                Err(e) => format!("cannot open {}: {e}", self.path.display()),
            },
            Err(e) => e.to_string(),
        };
        tracing::info!(source = %self.source, "reading the image through qemu-storage-daemon: {why}");
        Arc::new(nbd)
    }

    /// Bitmap granularity: the block size, so a bit is exactly a block.
    fn granularity(&self) -> u32 {
        self.geometry.block_size.clamp(512, 1 << 26)
    }

    /// A sync failed: puts the record back as it was, with the writes made since
    /// in it: `bulwark-p<N>` again holds every write since point `N` (or, with no
    /// point, nothing is kept), and the sync's own bitmap is gone.
    fn undo(&self, mut s: Session, inconsistent: bool) {
        s.disconnect();
        let g = self.granularity();
        let d = &mut s.daemon;
        let r = match s.kept {
            Some(b) if s.frozen => d
                .unserve()
                .and_then(|()| set_union(d, &format!("{PREFIX}{b}"), &[FROZEN, &s.next], g, false))
                .and_then(|()| remove(d, &s.next)),
            Some(b) => merge(d, &format!("{PREFIX}{b}"), &s.next).and_then(|()| remove(d, &s.next)),
            None => remove(d, &s.next),
        };
        if let Err(e) = r {
            // Whatever is left, the next sync's tidy-up falls back to a check.
            tracing::warn!(source = %self.source, "restoring the image's bitmaps: {e}");
        }
        release(&self.source, s.daemon);
        self.mark_ended(inconsistent);
    }
}

/// An idle `qemu-storage-daemon` (no image attached) kept for the next sync of any
/// qcow2 source of this agent: attaching an image to a running daemon takes about
/// 3 ms where starting one took 12-20 ms, and detaching about 1.5 ms where quitting
/// took 5-15 ms. At most one is kept, for at most [`LINGER`] after a sync; it holds
/// no lock on any image, and it goes with the agent (SIGTERM when the agent ends).
struct Spare {
    daemon: Option<Daemon>,
    /// When the kept daemon's last sync ended.
    since: Option<Instant>,
    /// Whether the thread that stops an idle daemon runs.
    reaper: bool,
}

static SPARE: Mutex<Spare> = Mutex::new(Spare {
    daemon: None,
    since: None,
    reaper: false,
});

/// How long an idle daemon is kept after the sync that used it.
const LINGER: std::time::Duration = std::time::Duration::from_secs(300);
/// How often the reaper looks.
const REAP_EVERY: std::time::Duration = std::time::Duration::from_secs(15);

/// A running daemon with no image: the spare, or a new one.
fn take_daemon() -> Result<Daemon, QsdError> {
    let spare = {
        let mut spare = lock(&SPARE);
        spare.since = None;
        spare.daemon.take()
    };
    if let Some(mut d) = spare
        && d.running()
    {
        return Ok(d);
    }
    Daemon::start_idle()
}

/// Closes the sync's image, which writes its bitmaps back and releases its lock,
/// and keeps the daemon as the spare if there is none yet (else stops it). A daemon
/// that cannot close the image cleanly is stopped, which writes the bitmaps too.
fn release(source: &str, mut d: Daemon) {
    if d.is_vm() {
        // Only what the sync added goes; the VM runs on.
        if let Err(e) = d.quit() {
            tracing::warn!(source = %source, "clearing the sync's nodes out of the VM: {e}");
        }
        return;
    }
    if let Err(e) = d.detach() {
        tracing::warn!(source = %source, "closing the image in qemu-storage-daemon: {e}");
        quit(source, d);
        return;
    }
    let mut spare = lock(&SPARE);
    if spare.daemon.is_some() {
        drop(spare);
        quit(source, d);
        return;
    }
    spare.daemon = Some(d);
    spare.since = Some(Instant::now());
    if !spare.reaper {
        spare.reaper = std::thread::Builder::new()
            .name("qsd-reaper".into())
            .spawn(reap_idle_daemon)
            .is_ok();
    }
}

/// Stops the spare once it has idled for [`LINGER`]; runs for the agent's life.
fn reap_idle_daemon() {
    loop {
        std::thread::sleep(REAP_EVERY);
        let idle = {
            let mut spare = lock(&SPARE);
            if spare.since.is_some_and(|t| t.elapsed() >= LINGER) {
                spare.since = None;
                spare.daemon.take()
            } else {
                None
            }
        };
        if let Some(d) = idle {
            let _ = d.quit();
        }
    }
}

/// Stops the spare daemon, if any (the agent is shutting down).
fn stop_spare() {
    let idle = lock(&SPARE).daemon.take();
    if let Some(d) = idle {
        let _ = d.quit();
    }
}

/// Stops the daemon, which writes the bitmaps back to the image.
fn quit(source: &str, d: Daemon) {
    if let Err(e) = d.quit() {
        // The bitmaps stay flagged in use: the next sync is a consistency check.
        tracing::warn!(source = %source, "{e}");
    }
}

impl Tracker for Qcow2Tracker {
    fn name(&self) -> &'static str {
        "qcow2-bitmap"
    }
    fn size_bytes(&self) -> u64 {
        self.geometry.size_bytes
    }
    fn consistent(&self) -> bool {
        lock(&self.state).inconsistent.is_none()
    }
    fn mark_inconsistent(&self, why: &str) {
        tracing::warn!(source = %self.source, "{why}; the next sync is a consistency check");
        lock(&self.state).inconsistent = Some(why.to_string());
    }
    fn begin(&self, scan: bool, read_from: Option<&Path>) -> Result<Frozen, TrackerError> {
        if read_from.is_some() {
            return Err(Qcow2Error::Snapshot.into());
        }
        let mut st = lock(&self.state);
        if let Some(old) = st.session.take() {
            let inconsistent = st.inconsistent.is_some();
            self.undo(old, inconsistent);
        }
        Ok(self.begin_locked(&mut st, scan)?)
    }
    fn committed(&self, point: u64) {
        let started = Instant::now();
        let mut st = lock(&self.state);
        let Some(mut s) = st.session.take() else {
            return;
        };
        s.disconnect();
        st.inconsistent = None;
        let name = format!("{PREFIX}{point}");
        let g = self.granularity();
        let d = &mut s.daemon;
        // A scan's `bulwark-next` becomes `bulwark-p<point>`; an incremental named
        // its bitmap so at once, and already removed the base's. A scan may find a
        // `bulwark-p<point>` already there: left by a sync that froze its record for
        // this same point and never finished (the agent was killed); it is replaced.
        let renamed = if s.next == name {
            Ok(())
        } else {
            let exists = s.kept == Some(point) && !s.frozen;
            set_union(d, &name, &[&s.next], g, exists).and_then(|()| remove(d, &s.next))
        };
        let r = renamed.and_then(|()| match s.kept {
            Some(b) if !s.frozen && b != point => remove(d, &format!("{PREFIX}{b}")),
            _ => Ok(()),
        });
        if let Err(e) = r {
            // The next sync's tidy-up sees leftover bitmaps and, at worst, falls back
            // to a consistency check.
            tracing::warn!(source = %self.source, point, "updating the image's bitmaps: {e}");
        }
        release(&self.source, s.daemon);
        self.mark_ended(false);
        tracing::debug!(source = %self.source, point, ms = started.elapsed().as_secs_f64() * 1000.0, "bitmaps in order and image released");
    }
    fn failed(&self) {
        let mut st = lock(&self.state);
        if let Some(s) = st.session.take() {
            let inconsistent = st.inconsistent.is_some();
            self.undo(s, inconsistent);
        }
    }
    fn shutdown(&self) {
        self.failed();
        stop_spare();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::testutil::{create_qcow2, have, qemu_io};

    #[test]
    fn a_mapped_read_joins_file_bytes_and_zeros() {
        if !have("qemu-img") || !have("qemu-io") {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("vm.qcow2");
        create_qcow2(&img, "", "1M", None);
        // Guest: 64 KiB of 0x07, 64 KiB never written, 64 KiB of 0x09 further on.
        qemu_io(&img, &["write -P 7 0 64k", "write -P 9 192k 64k"]);
        let reader = MappedReader {
            file: Volume::open(&img).expect("open"),
            map: Qcow2Map::open(&img, 1 << 20).expect("map"),
            nbd: NbdReader {
                clients: Arc::new(Vec::new()),
                next: Default::default(),
                size: 1 << 20,
                what: "test".into(),
            },
        };
        let got = reader.read_chunk(61440, 8192).expect("read");
        assert_eq!(&got[..4096], &[7u8; 4096][..], "bytes from the file");
        assert_eq!(&got[4096..], &[0u8; 4096][..], "zeros");
        let whole = reader.read_chunk(196608, 65536).expect("read");
        assert!(whole.len() == 65536 && whole.iter().all(|&b| b == 9));
    }
}
