//! The `qcow2-bitmap` tracker: QEMU persistent dirty bitmaps inside a qcow2 image,
//! the route libvirt and oVirt incremental backups take.
//!
//! Bitmaps the agent keeps in the image (all persistent and enabled, so QEMU, qemu-io
//! or anything else that opens the image records writes into them):
//!
//! - `bulwark-p<N>` — every write since point `N` was taken.
//! - `bulwark-next` — every write since the running sync froze its changes.
//!
//! A sync (the image must not be open elsewhere: QEMU locks it):
//!
//! 1. Tidy up after any crash: a leftover `bulwark-next` is merged into the newest
//!    `bulwark-p<N>` (a superset is safe), older `bulwark-p*` are removed. A bitmap
//!    flagged `in-use` (QEMU did not close the image cleanly) cannot be trusted: the
//!    sync becomes a consistency check.
//! 2. Add the bitmap for the next sync: `bulwark-p<N+1>` for an incremental (the node
//!    numbers the new point `N + 1`), `bulwark-next` for a scan. From here on writes
//!    belong to the next sync.
//! 3. Start `qemu-nbd --read-only` on a private unix socket, exporting the image and
//!    (for an incremental sync) the bitmap `bulwark-p<N>` as the metadata context
//!    `qemu:dirty-bitmap:bulwark-p<N>`; ask for block status over the whole disk and
//!    read only the dirty extents. The node refuses the sync if its newest point is
//!    not `N`, and the agent falls back to a consistency check. Data is read from
//!    the image file itself where `qemu-img map` (taken once qemu-nbd holds the image,
//!    so that no writer can move a cluster) shows it stored as it is — as the live
//!    volume is read: from the page cache where cached, else with `O_DIRECT` — zeros
//!    are not read at all, and anything else (a backing file, compressed clusters,
//!    an encrypted image or an external data file) is read through qemu-nbd.
//! 4. Committed as point `P`: stop `qemu-nbd`, remove `bulwark-p<N>` (a scan's
//!    `bulwark-next` first becomes `bulwark-p<P>` by an add-and-merge). Failed: stop
//!    `qemu-nbd` and remove the added bitmap: `bulwark-p<N>` is still enabled and has
//!    recorded every write since point `N`. A crash between 2 and 4 leaves both
//!    `bulwark-p<N>` and `bulwark-p<N+1>`; the tidy-up keeps the newer, the node
//!    refuses it as a base, and that sync is a consistency check.
//!
//! The agent holds the image open only during a sync. A VM running on the image (where
//! the image is locked) would be reached through its QMP socket; that is not built
//! yet, and such a sync fails with a message that says so.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulwark_common::block::Geometry;
use bulwark_common::nbd::client::Client;
use bytes::Bytes;
use serde::Deserialize;

use super::bitmap::Bitmap;
use super::{BlockSource, Frozen, Plan, Tracker, lock, run_tool};
use crate::volume::Volume;

const PREFIX: &str = "bulwark-p";
/// Connections to qemu-nbd when data is read through it: the sync's reader threads
/// each read through their own, so several reads are in flight at once (one
/// connection answers one at a time).
const CONNECTIONS: usize = 4;
const NEXT: &str = "bulwark-next";

#[derive(Debug, Deserialize)]
struct ImageInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "format-specific")]
    format_specific: Option<FormatSpecific>,
}

#[derive(Debug, Deserialize)]
struct FormatSpecific {
    data: Option<FormatData>,
}

#[derive(Debug, Deserialize)]
struct FormatData {
    #[serde(default)]
    bitmaps: Vec<BitmapInfo>,
    /// An external data file: guest data is not in the image file.
    #[serde(rename = "data-file")]
    data_file: Option<String>,
    /// Encryption: the image file holds ciphertext.
    encrypt: Option<serde_json::Value>,
}

/// One run of `qemu-img map --output=json`.
#[derive(Debug, Deserialize)]
struct MapRun {
    start: u64,
    length: u64,
    depth: u64,
    zero: bool,
    data: bool,
    #[serde(default)]
    compressed: bool,
    offset: Option<u64>,
    filename: Option<String>,
}

/// Where a run of guest bytes is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Where {
    /// In the image file at this offset, as they are.
    Host(u64),
    /// Reads as zeros.
    Zeros,
    /// Anywhere else (a backing file, a compressed cluster): read through qemu-nbd.
    Nbd,
}

/// The guest-to-file map of an image, sorted runs `(start, length, where)` covering
/// the disk.
fn parse_map(json: &[u8], image: &Path, size: u64) -> Result<Vec<(u64, u64, Where)>, String> {
    let runs: Vec<MapRun> = serde_json::from_slice(json).map_err(|e| {
        format!(
            "qemu-img map of {}: unexpected output: {e}",
            image.display()
        )
    })?;
    let mut out = Vec::with_capacity(runs.len());
    let mut at = 0u64;
    for r in runs {
        if r.start != at || r.length == 0 {
            return Err(format!(
                "qemu-img map of {}: run at {} does not follow byte {at}",
                image.display(),
                r.start
            ));
        }
        let foreign = r.filename.as_deref().is_some_and(|f| Path::new(f) != image);
        let how = if r.zero {
            Where::Zeros
        } else if r.data && r.depth == 0 && !r.compressed && !foreign {
            r.offset.map_or(Where::Nbd, Where::Host)
        } else {
            Where::Nbd
        };
        out.push((r.start, r.length, how));
        at += r.length;
    }
    if at != size {
        return Err(format!(
            "qemu-img map of {} covers {at} bytes of {size}",
            image.display()
        ));
    }
    Ok(out)
}

/// Reads guest bytes straight from the image file where the map says they are
/// stored as they are (through [`Volume`]: from the page cache when they are
/// cached, else with `O_DIRECT`), zeros where it says zeros, and the rest through
/// qemu-nbd. Read-only qemu-nbd holds the image meanwhile, and the tracker needs it
/// closed to every writer, so the map cannot change under the sync.
struct MappedReader {
    file: Volume,
    map: Vec<(u64, u64, Where)>,
    nbd: NbdReader,
}

impl MappedReader {
    /// The runs of `[offset, offset + len)`: (guest offset, length, where).
    fn pieces(&self, offset: u64, len: usize) -> Vec<(u64, usize, Where)> {
        let end = offset + len as u64;
        let first = self.map.partition_point(|(s, l, _)| s + l <= offset);
        let mut out = Vec::new();
        for &(s, l, how) in &self.map[first..] {
            if s >= end {
                break;
            }
            let from = s.max(offset);
            let to = (s + l).min(end);
            let at = match how {
                Where::Host(h) => Where::Host(h + (from - s)),
                other => other,
            };
            out.push((from, (to - from) as usize, at));
        }
        out
    }
}

impl BlockSource for MappedReader {
    fn size_bytes(&self) -> u64 {
        self.nbd.size
    }
    fn read_chunk(&self, offset: u64, len: usize) -> std::io::Result<Bytes> {
        let pieces = self.pieces(offset, len);
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

#[derive(Debug, Deserialize)]
struct BitmapInfo {
    name: String,
    #[serde(default)]
    flags: Vec<String>,
}

/// [`run_tool`], with a hint when the tool is missing.
fn run(tool: &str, args: &[&str]) -> Result<Vec<u8>, String> {
    run_tool(tool, args).map_err(|e| {
        if e.starts_with("cannot run") {
            format!("{e} (is qemu-utils installed?)")
        } else {
            e
        }
    })
}

fn info(path: &Path, shared: bool) -> Result<ImageInfo, String> {
    let p = path.to_string_lossy();
    let mut args = vec!["info", "--output=json", "-f", "qcow2"];
    if shared {
        args.push("-U");
    }
    args.push(&p);
    let out = run("qemu-img", &args).map_err(|e| {
        if e.contains("lock") {
            format!(
                "{e} (the image is open elsewhere, e.g. by a running VM; the qcow2-bitmap tracker needs it closed during a sync)"
            )
        } else {
            e
        }
    })?;
    let i: ImageInfo = serde_json::from_slice(&out).map_err(|e| {
        format!(
            "qemu-img info of {}: unexpected output: {e}",
            path.display()
        )
    })?;
    if i.format != "qcow2" {
        return Err(format!("{} is {}, not qcow2", path.display(), i.format));
    }
    Ok(i)
}

/// The virtual size of the qcow2 image at `path` (may be in use).
pub fn virtual_size(path: &Path) -> Result<u64, String> {
    info(path, true).map(|i| i.virtual_size)
}

fn bitmap_op(path: &Path, ops: &[&str], name: &str) -> Result<(), String> {
    let p = path.to_string_lossy();
    let mut args = vec!["bitmap"];
    args.extend_from_slice(ops);
    args.extend_from_slice(&["-f", "qcow2", &p, name]);
    run("qemu-img", &args).map(|_| ())
}

/// A running `qemu-nbd` and our connection to it.
struct Session {
    child: Child,
    dir: tempfile::TempDir,
    /// The first one also asks for block status.
    clients: Arc<Vec<Mutex<Client>>>,
    /// The point of the image's `bulwark-p<N>` bitmap when the sync began.
    base: Option<u64>,
    /// The bitmap this sync added for the writes after it froze.
    next: String,
}

impl Session {
    fn stop(mut self) {
        if let Ok(clients) = Arc::try_unwrap(self.clients) {
            for c in clients {
                let _ = c
                    .into_inner()
                    .unwrap_or_else(|e| e.into_inner())
                    .disconnect();
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        drop(self.dir);
    }
}

/// Reads the image through qemu-nbd.
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
    state: Mutex<State>,
}

impl Qcow2Tracker {
    /// A tracker for the image at `path`.
    pub fn new(source: &str, path: &Path, geometry: Geometry) -> Qcow2Tracker {
        Qcow2Tracker {
            source: source.to_string(),
            path: path.to_path_buf(),
            geometry,
            state: Mutex::new(State {
                inconsistent: None,
                session: None,
            }),
        }
    }

    /// Tidies the image's bitmaps; returns the base point of a usable record, and
    /// whether the image file holds guest data as it is (no external data file, no
    /// encryption), so that it may be read directly.
    fn prepare(&self, st: &mut State) -> Result<(Option<u64>, bool), String> {
        let i = info(&self.path, false)?;
        if i.virtual_size != self.geometry.size_bytes {
            return Err(format!(
                "{} is now {} bytes, it was registered with {}; resizing is not supported",
                self.path.display(),
                i.virtual_size,
                self.geometry.size_bytes
            ));
        }
        let data = i.format_specific.and_then(|f| f.data);
        let plain = data
            .as_ref()
            .is_some_and(|d| d.data_file.is_none() && d.encrypt.is_none());
        let bitmaps = data.map(|d| d.bitmaps).unwrap_or_default();
        let mut points: Vec<(u64, &BitmapInfo)> = bitmaps
            .iter()
            .filter_map(|b| {
                b.name
                    .strip_prefix(PREFIX)
                    .and_then(|n| n.parse().ok())
                    .map(|n| (n, b))
            })
            .collect();
        points.sort_by_key(|(n, _)| *n);
        let newest = points.last().map(|(n, _)| *n);
        let has_next = bitmaps.iter().any(|b| b.name == NEXT);
        let untrusted = bitmaps
            .iter()
            .filter(|b| b.name == NEXT || b.name.starts_with(PREFIX))
            .find(|b| {
                b.flags.iter().any(|f| f == "in-use") || !b.flags.iter().any(|f| f == "auto")
            });
        if let Some(b) = untrusted {
            let why = format!(
                "bitmap {} of {} is flagged {:?} (the image was not closed cleanly, or the bitmap was disabled)",
                b.name,
                self.path.display(),
                b.flags
            );
            for b in bitmaps
                .iter()
                .filter(|b| b.name == NEXT || b.name.starts_with(PREFIX))
            {
                bitmap_op(&self.path, &["--remove"], &b.name)?;
            }
            tracing::warn!(source = %self.source, "{why}; this sync is a consistency check");
            st.inconsistent = Some(why);
            return Ok((None, plain));
        }
        if has_next {
            if let Some(n) = newest {
                bitmap_op(&self.path, &["--merge", NEXT], &format!("{PREFIX}{n}"))?;
            }
            bitmap_op(&self.path, &["--remove"], NEXT)?;
        }
        for (n, _) in &points {
            if Some(*n) != newest {
                bitmap_op(&self.path, &["--remove"], &format!("{PREFIX}{n}"))?;
            }
        }
        Ok((newest, plain))
    }

    /// Starts qemu-nbd with `connections` connections to it.
    fn start_nbd(
        &self,
        export_bitmap: Option<&str>,
        connections: usize,
    ) -> Result<Session, String> {
        let dir = tempfile::Builder::new()
            .prefix("bulwark-qemu-nbd")
            .tempdir()
            .map_err(|e| format!("cannot make a socket directory: {e}"))?;
        let sock = dir.path().join("nbd.sock");
        let mut cmd = Command::new("qemu-nbd");
        cmd.arg("--read-only")
            .arg("--format=qcow2")
            .arg("--cache=none")
            .arg("--aio=threads")
            .arg(format!("--shared={connections}"))
            .arg(format!("--socket={}", sock.display()));
        if let Some(b) = export_bitmap {
            cmd.arg(format!("--bitmap={b}"));
        }
        cmd.arg(&self.path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start qemu-nbd (is qemu-utils installed?): {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                return Err(format!(
                    "qemu-nbd for {} exited ({status}): {}",
                    self.path.display(),
                    err.trim()
                ));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "qemu-nbd for {} did not open its socket within 20 s",
                    self.path.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let contexts: Vec<String> = export_bitmap
            .map(|b| vec![format!("qemu:dirty-bitmap:{b}")])
            .unwrap_or_default();
        let ctx_refs: Vec<&str> = contexts.iter().map(String::as_str).collect();
        let mut clients = Vec::with_capacity(connections);
        for i in 0..connections {
            let contexts: &[&str] = if i == 0 { &ctx_refs } else { &[] };
            // The socket file appears when qemu-nbd binds it, a moment before it
            // listens: a refused first connection is tried again until the deadline.
            let connected = loop {
                match Client::connect_unix(&sock, "", contexts) {
                    Err(bulwark_common::nbd::NbdError::Io(e))
                        if i == 0
                            && e.kind() == std::io::ErrorKind::ConnectionRefused
                            && Instant::now() < deadline
                            && matches!(child.try_wait(), Ok(None)) =>
                    {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    other => break other,
                }
            };
            match connected {
                Ok(c) => clients.push(Mutex::new(c)),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("qemu-nbd for {}: {e}", self.path.display()));
                }
            }
        }
        let size = lock(&clients[0]).size();
        if size != self.geometry.size_bytes {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "qemu-nbd exports {} bytes of {}, expected {}",
                size,
                self.path.display(),
                self.geometry.size_bytes
            ));
        }
        Ok(Session {
            child,
            dir,
            clients: Arc::new(clients),
            base: None,
            next: String::new(),
        })
    }

    /// The dirty blocks of the exported bitmap, from block status over the disk.
    fn dirty_blocks(&self, session: &Session, bitmap: &str) -> Result<Bitmap, String> {
        let context = format!("qemu:dirty-bitmap:{bitmap}");
        let g = self.geometry;
        let bs = u64::from(g.block_size);
        let mut out = Bitmap::new(g.block_count());
        let mut c = lock(&session.clients[0]);
        let mut offset = 0u64;
        while offset < g.size_bytes {
            let want = (g.size_bytes - offset).min(1 << 30);
            let extents = c
                .block_status(offset, want, &context)
                .map_err(|e| format!("block status of {}: {e}", self.path.display()))?;
            if extents.is_empty() {
                return Err(format!(
                    "qemu-nbd returned no block status at byte {offset} of {}",
                    self.path.display()
                ));
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

    fn begin_locked(&self, st: &mut State, scan: bool) -> Result<Frozen, String> {
        // `kept`: the bitmap the image has (removed at commit, merged back into on
        // failure); `base`: the one this sync trusts (none for a scan).
        let (kept, plain) = self.prepare(st)?;
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
        let granularity = self.granularity();
        bitmap_op(&self.path, &["--add", "--granularity", &granularity], &next)?;
        let exported = base.map(|b| format!("{PREFIX}{b}"));
        let connections = if plain { 1 } else { CONNECTIONS };
        let starting = Instant::now();
        let mut session = match self.start_nbd(exported.as_deref(), connections) {
            Ok(s) => s,
            Err(e) => {
                self.undo_next(kept, &next);
                return Err(e);
            }
        };
        tracing::debug!(source = %self.source, ms = starting.elapsed().as_secs_f64() * 1000.0, "qemu-nbd serving");
        // The guest-to-file map, asked for while the bitmap is read. Only now: the
        // read-only qemu-nbd holds the image, so no writer can move a cluster until
        // the sync ends. With the map, data is read from the file itself.
        let map = plain.then(|| {
            let p = self.path.to_string_lossy().into_owned();
            std::thread::spawn(move || {
                run(
                    "qemu-img",
                    &["map", "--output=json", "-f", "qcow2", "-U", &p],
                )
            })
        });
        session.base = kept;
        session.next = next.clone();
        let plan = match (&exported, base) {
            (Some(name), Some(b)) => match self.dirty_blocks(&session, name) {
                Ok(blocks) => Plan::Dirty {
                    base: b,
                    blocks: Arc::new(blocks),
                },
                Err(e) => {
                    session.stop();
                    self.undo_next(kept, &next);
                    return Err(e);
                }
            },
            _ => Plan::Scan,
        };
        let nbd = NbdReader {
            clients: session.clients.clone(),
            next: Default::default(),
            size: self.geometry.size_bytes,
            what: format!("{} (through qemu-nbd)", self.path.display()),
        };
        let reader: Arc<dyn BlockSource> = if let Some(map) = map {
            let map = map
                .join()
                .unwrap_or_else(|_| Err("qemu-img map: its thread panicked".into()));
            match self.mapped(nbd, map) {
                Ok(m) => Arc::new(m),
                Err((nbd, e)) => {
                    tracing::info!(source = %self.source, "reading the image through qemu-nbd: {e}");
                    Arc::new(nbd)
                }
            }
        } else {
            Arc::new(nbd)
        };
        st.session = Some(session);
        Ok(Frozen { plan, reader })
    }

    /// A reader of the image file itself where `qemu-img map` allows; gives the
    /// qemu-nbd reader back when it does not.
    fn mapped(
        &self,
        nbd: NbdReader,
        map: Result<Vec<u8>, String>,
    ) -> Result<MappedReader, (NbdReader, String)> {
        let map = map.and_then(|out| parse_map(&out, &self.path, self.geometry.size_bytes));
        let file = Volume::open(&self.path)
            .map_err(|e| format!("cannot open {}: {e}", self.path.display()));
        match (map, file) {
            (Ok(map), Ok(file)) => Ok(MappedReader { file, map, nbd }),
            (Err(e), _) | (_, Err(e)) => Err((nbd, e)),
        }
    }

    /// Bitmap granularity: the block size, so a bit is exactly a block.
    fn granularity(&self) -> String {
        self.geometry.block_size.clamp(512, 1 << 26).to_string()
    }

    /// A sync failed: drops the bitmap it added (`next`). The base bitmap, still
    /// enabled, has recorded every write since the base point, so nothing is lost;
    /// `bulwark-next` (a scan's) is merged into it first to be safe.
    fn undo_next(&self, base: Option<u64>, next: &str) {
        let r = match base {
            Some(b) if next == NEXT => {
                bitmap_op(&self.path, &["--merge", NEXT], &format!("{PREFIX}{b}"))
                    .and_then(|()| bitmap_op(&self.path, &["--remove"], NEXT))
            }
            _ => bitmap_op(&self.path, &["--remove"], next),
        };
        if let Err(e) = r {
            // The next sync's tidy-up merges it.
            tracing::warn!(source = %self.source, "{e}");
        }
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
    fn begin(&self, scan: bool, read_from: Option<&Path>) -> Result<Frozen, String> {
        if read_from.is_some() {
            return Err("the qcow2-bitmap tracker reads the image itself; snapshot_command is not supported with it".into());
        }
        let mut st = lock(&self.state);
        if let Some(old) = st.session.take() {
            let (base, next) = (old.base, old.next.clone());
            old.stop();
            self.undo_next(base, &next);
        }
        self.begin_locked(&mut st, scan)
    }
    fn committed(&self, point: u64) {
        let mut st = lock(&self.state);
        let Some(session) = st.session.take() else {
            return;
        };
        let (base, next) = (session.base, session.next.clone());
        session.stop();
        st.inconsistent = None;
        let granularity = self.granularity();
        let name = format!("{PREFIX}{point}");
        let renamed = if next == name {
            Ok(())
        } else {
            bitmap_op(
                &self.path,
                &["--add", "--granularity", &granularity, "--merge", &next],
                &name,
            )
            .and_then(|()| bitmap_op(&self.path, &["--remove"], &next))
        };
        let r = renamed.and_then(|()| match base {
            Some(b) if b != point => bitmap_op(&self.path, &["--remove"], &format!("{PREFIX}{b}")),
            _ => Ok(()),
        });
        if let Err(e) = r {
            // The next sync's tidy-up sees leftover bitmaps and, at worst, falls back
            // to a consistency check.
            tracing::warn!(source = %self.source, point, "updating the image's bitmaps: {e}");
        }
    }
    fn failed(&self) {
        let mut st = lock(&self.state);
        if let Some(session) = st.session.take() {
            let (base, next) = (session.base, session.next.clone());
            session.stop();
            self.undo_next(base, &next);
        }
    }
    fn shutdown(&self) {
        self.failed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_map_says_where_each_guest_byte_is() {
        let image = Path::new("/v/vm.qcow2");
        let json = br#"[
          { "start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "compressed": false, "offset": 327680},
          { "start": 65536, "length": 65536, "depth": 0, "present": false, "zero": true, "data": false, "compressed": false},
          { "start": 131072, "length": 65536, "depth": 1, "present": true, "zero": false, "data": true, "offset": 4096, "filename": "/v/base.qcow2"},
          { "start": 196608, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "compressed": true},
          { "start": 262144, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset": 8192, "filename": "/v/other.raw"},
          { "start": 327680, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset": 1048576, "filename": "/v/vm.qcow2"}
        ]"#;
        let map = parse_map(json, image, 393216).expect("map");
        let hows: Vec<Where> = map.iter().map(|r| r.2).collect();
        assert_eq!(
            hows,
            [
                Where::Host(327680),
                Where::Zeros,
                Where::Nbd, // a backing file
                Where::Nbd, // compressed
                Where::Nbd, // another file
                Where::Host(1048576),
            ]
        );
        assert!(
            parse_map(json, image, 393216 + 1).is_err(),
            "a map that does not cover the disk is refused"
        );
        let gap = br#"[{ "start": 0, "length": 4096, "depth": 0, "zero": true, "data": false},
                      { "start": 8192, "length": 4096, "depth": 0, "zero": true, "data": false}]"#;
        assert!(parse_map(gap, image, 12288).is_err(), "a gap is refused");
        assert!(parse_map(b"not json", image, 1).is_err());

        // A read across runs is cut at their edges, host offsets shifted.
        let dir = tempfile::tempdir().expect("tempdir");
        let file_path = dir.path().join("f");
        std::fs::write(&file_path, vec![7u8; 1 << 21]).expect("write");
        let reader = MappedReader {
            file: Volume::open(&file_path).expect("open"),
            map,
            nbd: NbdReader {
                clients: Arc::new(Vec::new()),
                next: Default::default(),
                size: 393216,
                what: "test".into(),
            },
        };
        assert_eq!(
            reader.pieces(60000, 10000),
            [
                (60000, 5536, Where::Host(327680 + 60000)),
                (65536, 4464, Where::Zeros)
            ]
        );
        let got = reader.read_chunk(61440, 8192).expect("read");
        assert_eq!(&got[..4096], &[7u8; 4096][..], "bytes from the file");
        assert_eq!(&got[4096..], &[0u8; 4096][..], "zeros");
        let whole = reader.read_chunk(327680, 65536).expect("read");
        assert_eq!(whole.len(), 65536);
        assert!(whole.iter().all(|&b| b == 7));
    }
}
