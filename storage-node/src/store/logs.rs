//! Log sources on the node: append-only copies of a host's log files, shipped in
//! pieces, with a recovery point per ship.
//!
//! # What is on disk
//!
//! In `<disk>/bulwark/<source>/logs/`, one file per *generation* of a host log file,
//! named by a number (`<id>` zero-padded): the bytes the agent shipped, in order. A
//! generation begins when the file is first shipped and is replaced by a new one
//! when the agent finds the host's file rotated, truncated or rewritten and sends it
//! anew; the old generation stays for the points that saw it.
//!
//! In sled, tree `logfiles`, key `source ∖0 id`: a [`LogFileMeta`]: host name,
//! generation, the ship that began it (`first_point`), the ship that replaced it
//! (`replaced_at`, 0 = current), the ship after which the host no longer had it
//! (`gone_at`), the host file's identity, and its *chunks*: for each piece shipped,
//! the point that shipped it, where it ends, and its BLAKE3. The file as of point
//! `Q` is every chunk shipped at or before `Q`.
//!
//! # A ship (the crash-safety argument)
//!
//! Data is appended past each copy's committed length (or into new copies), then
//! every touched copy is fsync'd, then one sled transaction writes the new point,
//! the changed file records and the source's record, then sled is flushed: only then
//! is the ship acknowledged. Until that transaction nothing refers to the appended
//! bytes: a failed ship truncates each copy back to its recorded length and deletes
//! the copies it created, and so does [`Store::open`] after a crash (a copy longer
//! than its record is cut, a copy with no record is removed).
//!
//! # Pruning
//!
//! A log point is pruned like any point (retention, `on_full`). Then a generation
//! is deleted when no remaining point sees it (it was replaced before the oldest
//! remaining point began... see [`visible`]) or when the host deleted the file and
//! every point that shipped bytes of it is gone. Files still on the host are kept
//! whole, so retention never makes the agent ship them again.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bulwark_common::name::SourceName;
use bulwark_common::point::{Consistency, PointKind};
use serde::{Deserialize, Serialize};

use super::{
    Batch, FORMAT_VERSION, PointMeta, Result, SourceMeta, SourcePolicy, Store, StoreError,
    SyncSpec, Tree, decode, encode, fsync_dir, io, make_room, point_key, point_prefix,
};

/// Bytes hashed at each end of a file for the agent's rewrite check.
pub const ANCHOR_LEN: u64 = 4096;
/// Largest piece of a file in one message.
pub const MAX_PIECE: usize = 1 << 20;

/// What a data source is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    #[default]
    Volume,
    Log,
}

/// One piece of a log file as shipped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogChunk {
    /// The point (ship) that brought it.
    pub point: u64,
    /// Where it ends in the file (it starts where the previous chunk ends).
    pub end: u64,
    /// BLAKE3 of its bytes, hex.
    pub hash: String,
}

/// One generation of a host log file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogFileMeta {
    pub v: u32,
    pub id: u64,
    pub name: String,
    pub generation: u32,
    pub first_point: u64,
    /// The point whose ship began the next generation; 0 = this is the current one.
    pub replaced_at: u64,
    /// The first point whose ship found the file gone from the host; 0 = present.
    pub gone_at: u64,
    pub dev: u64,
    pub ino: u64,
    pub mtime_ns: i64,
    pub chunks: Vec<LogChunk>,
    /// BLAKE3 of the first and the last `ANCHOR_LEN` bytes (hex; empty when empty).
    pub head_hash: String,
    pub tail_hash: String,
}

impl LogFileMeta {
    /// Bytes held.
    pub fn length(&self) -> u64 {
        self.chunks.last().map_or(0, |c| c.end)
    }
    /// Its length as of point `q`.
    pub fn length_at(&self, q: u64) -> u64 {
        self.chunks
            .iter()
            .take_while(|c| c.point <= q)
            .last()
            .map_or(0, |c| c.end)
    }
    /// The newest point that shipped bytes of it (its first point when it is empty).
    pub fn last_point(&self) -> u64 {
        self.chunks.last().map_or(self.first_point, |c| c.point)
    }
}

/// Whether a restore of point `q` includes generation `f`: it began at or before
/// `q` and was not replaced by then. (Files the host deleted stay included.)
pub fn visible(f: &LogFileMeta, q: u64) -> bool {
    f.first_point <= q && (f.replaced_at == 0 || q < f.replaced_at)
}

fn file_key(source: &str, id: u64) -> Vec<u8> {
    point_key(source, id)
}

/// The copy of generation `id`, relative to the source's directory.
pub fn copy_name(id: u64) -> String {
    format!("logs/{id:020}")
}

fn copy_path(meta: &SourceMeta, id: u64) -> PathBuf {
    meta.dir().join(copy_name(id))
}

/// A log file name as the host has it: one path component.
pub fn valid_log_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0')
}

fn hash_range(f: &File, path: &Path, start: u64, len: u64) -> Result<String> {
    if len == 0 {
        return Ok(String::new());
    }
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, start).map_err(io("read", path))?;
    Ok(blake3::hash(&buf).to_hex().to_string())
}

/// The anchors of the first `len` bytes of a file (see [`ANCHOR_LEN`]).
pub fn anchors(f: &File, path: &Path, len: u64) -> Result<(String, String)> {
    let n = len.min(ANCHOR_LEN);
    Ok((hash_range(f, path, 0, n)?, hash_range(f, path, len - n, n)?))
}

/// One log file of a point, for a restore.
#[derive(Debug, Clone)]
pub struct LogRestoreFile {
    pub name: String,
    pub mtime_ns: i64,
    pub path: PathBuf,
    /// Its chunks up to the point: `(start, end, hash)`.
    pub pieces: Vec<(u64, u64, String)>,
}

impl LogRestoreFile {
    pub fn length(&self) -> u64 {
        self.pieces.last().map_or(0, |p| p.1)
    }
}

/// One file being appended in a ship.
struct Open {
    id: u64,
    file: File,
    path: PathBuf,
}

/// A ship in progress (see the module docs). Dropped without [`LogShip::commit`], it
/// undoes what it wrote as [`LogShip::abort`] does.
pub struct LogShip {
    store: Store,
    meta: SourceMeta,
    new_point: u64,
    /// Every record of the source, by id, as changed so far.
    files: HashMap<u64, LogFileMeta>,
    /// Current generation by host name.
    current: HashMap<String, u64>,
    /// Committed lengths of the copies touched, to cut them back on failure.
    committed_len: HashMap<u64, u64>,
    created: Vec<u64>,
    /// Records this ship changed (only these are written at commit).
    dirty: HashSet<u64>,
    started: HashSet<String>,
    open: Option<Open>,
    next_id: u64,
    bytes: u64,
    points_used: u64,
    done: bool,
}

impl Store {
    /// Every generation record of a log source, by id.
    pub fn log_files(&self, name: &str) -> Result<Vec<LogFileMeta>> {
        self.meta
            .scan(Tree::LogFiles, &point_prefix(name))?
            .iter()
            .map(|(_, v)| decode(v))
            .collect()
    }

    /// Bytes a log source's copies hold.
    pub(super) fn log_bytes(&self, name: &str) -> Result<u64> {
        Ok(self.log_files(name)?.iter().map(LogFileMeta::length).sum())
    }

    /// Starts a ship of log source `name` (placing it on a disk if it is new).
    pub fn begin_log_ship(
        &self,
        name: &SourceName,
        policy: Option<SourcePolicy>,
    ) -> Result<LogShip> {
        let mut meta = match self.source(name)? {
            Some(m) if m.kind != SourceKind::Log => {
                return Err(StoreError::WrongKind {
                    source_name: name.to_string(),
                    kind: "volume",
                    op: "a log ship",
                });
            }
            Some(m) => m,
            None => {
                let mut m = self.place(&SyncSpec {
                    source: name.clone(),
                    geometry: bulwark_common::block::Geometry {
                        size_bytes: 0,
                        block_size: bulwark_common::block::DEFAULT_BLOCK_SIZE,
                    },
                    base_point: 0,
                    consistency: Consistency::Crash,
                    kind: PointKind::Log,
                    policy,
                })?;
                m.kind = SourceKind::Log;
                m
            }
        };
        if let Some(p) = &policy {
            meta.apply_policy(p);
        }
        let logs = meta.dir().join("logs");
        std::fs::create_dir_all(&logs).map_err(io("create", &logs))?;
        let files: HashMap<u64, LogFileMeta> = self
            .log_files(name)?
            .into_iter()
            .map(|f| (f.id, f))
            .collect();
        let current = files
            .values()
            .filter(|f| f.replaced_at == 0)
            .map(|f| (f.name.clone(), f.id))
            .collect();
        let next_id = files.keys().max().map_or(1, |m| m + 1);
        let newest = self.newest_point(name)?.map_or(0, |p| p.id);
        let points_used = files.values().map(LogFileMeta::length).sum();
        Ok(LogShip {
            store: self.clone(),
            meta,
            new_point: newest + 1,
            files,
            current,
            committed_len: HashMap::new(),
            created: Vec::new(),
            dirty: HashSet::new(),
            started: HashSet::new(),
            open: None,
            next_id,
            bytes: 0,
            points_used,
            done: false,
        })
    }

    /// The files of log point `point` (0 = newest), each as of that point.
    pub fn log_restore(&self, name: &str, point: u64) -> Result<(PointMeta, Vec<LogRestoreFile>)> {
        let meta = self
            .source(name)?
            .ok_or_else(|| StoreError::NoPoints(name.to_string()))?;
        if meta.kind != SourceKind::Log {
            return Err(StoreError::WrongKind {
                source_name: name.to_string(),
                kind: "volume",
                op: "a log restore",
            });
        }
        let (_, _, p) = self.readable_point(name, point)?;
        let mut files: Vec<LogRestoreFile> = self
            .log_files(name)?
            .into_iter()
            .filter(|f| visible(f, p.id))
            .map(|f| {
                let mut start = 0;
                let pieces = f
                    .chunks
                    .iter()
                    .take_while(|c| c.point <= p.id)
                    .map(|c| {
                        let piece = (start, c.end, c.hash.clone());
                        start = c.end;
                        piece
                    })
                    .collect();
                LogRestoreFile {
                    path: copy_path(&meta, f.id),
                    name: f.name,
                    mtime_ns: f.mtime_ns,
                    pieces,
                }
            })
            .collect();
        files.sort_by(|a, b| a.name.cmp(&b.name));
        Ok((p, files))
    }

    /// Re-reads every stored piece of a log source and checks its BLAKE3. Returns
    /// (pieces checked, bytes read, points whose restore would read a damaged
    /// piece, with the ids of the damaged files).
    pub(super) fn verify_logs(&self, name: &str) -> Result<super::VerifyOutcome> {
        let meta = self
            .source(name)?
            .ok_or_else(|| StoreError::NoPoints(name.to_string()))?;
        let mut out = super::VerifyOutcome::default();
        let mut damaged: Vec<LogFileMeta> = Vec::new();
        for f in self.log_files(name)? {
            let path = copy_path(&meta, f.id);
            let file = File::open(&path).map_err(io("open", &path))?;
            let mut start = 0;
            let mut bad = false;
            for c in &f.chunks {
                let mut buf = vec![0u8; (c.end - start) as usize];
                let ok = file.read_exact_at(&mut buf, start).is_ok()
                    && blake3::hash(&buf).to_hex().as_str() == c.hash;
                out.blocks_checked += 1;
                out.bytes_read += buf.len() as u64;
                if !ok {
                    tracing::error!(source = name, file = %f.name, generation = f.generation,
                        at = start, "log piece does not match its checksum");
                    bad = true;
                }
                start = c.end;
            }
            if bad {
                damaged.push(f);
            }
        }
        if !damaged.is_empty() {
            let mut points = self.points(name)?;
            for p in &mut points {
                let ids: Vec<u64> = damaged
                    .iter()
                    .filter(|f| visible(f, p.id))
                    .map(|f| f.id)
                    .collect();
                if ids != p.damaged {
                    p.damaged = ids.clone();
                    self.meta.apply(Batch::default().put(
                        Tree::Points,
                        point_key(name, p.id),
                        &encode(&*p)?,
                    ))?;
                }
                if !ids.is_empty() {
                    out.damaged_points.push((p.id, ids));
                }
            }
            self.meta.flush()?;
        }
        Ok(out)
    }

    /// Removes log point `id` (not the newest) and every generation no remaining
    /// point needs; returns the bytes freed. The caller holds the source's write lock.
    pub(super) fn prune_log(&self, meta: &SourceMeta, id: u64) -> Result<u64> {
        let name = &meta.name;
        let remaining: Vec<u64> = self
            .points(name)?
            .iter()
            .map(|p| p.id)
            .filter(|p| *p != id)
            .collect();
        let oldest = remaining.first().copied().unwrap_or(0);
        let drop: Vec<LogFileMeta> = self
            .log_files(name)?
            .into_iter()
            .filter(|f| {
                let seen = remaining.iter().any(|q| visible(f, *q));
                let gone_for_good =
                    f.gone_at != 0 && f.gone_at <= oldest && f.last_point() < oldest;
                !seen || gone_for_good
            })
            .collect();
        let mut batch = Batch::default();
        batch.remove(Tree::Points, point_key(name, id));
        for f in &drop {
            batch.remove(Tree::LogFiles, file_key(name, f.id));
        }
        self.meta.apply(&batch)?;
        self.meta.flush()?;
        let mut freed = 0;
        for f in &drop {
            let path = copy_path(meta, f.id);
            match std::fs::remove_file(&path) {
                Ok(()) => freed += f.length(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("remove", &path)(e)),
            }
            tracing::info!(source = %name, file = %f.name, generation = f.generation, "log file dropped by retention");
        }
        if !drop.is_empty() {
            fsync_dir(&meta.dir().join("logs"))?;
        }
        Ok(freed)
    }

    /// After a crash: cuts every copy back to its recorded length and removes copies
    /// no record names (a ship that did not commit).
    pub(super) fn recover_logs(&self, meta: &SourceMeta) -> Result<()> {
        let dir = meta.dir().join("logs");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(());
        };
        let files: HashMap<String, u64> = self
            .log_files(&meta.name)?
            .iter()
            .map(|f| (format!("{:020}", f.id), f.length()))
            .collect();
        let mut changed = false;
        for e in entries.flatten() {
            let fname = e.file_name().to_string_lossy().to_string();
            let path = e.path();
            match files.get(&fname) {
                None => {
                    tracing::warn!(source = %meta.name, file = %fname, "removing a log copy a ship that did not commit left");
                    std::fs::remove_file(&path).map_err(io("remove", &path))?;
                    changed = true;
                }
                Some(len) => {
                    let actual = e.metadata().map_err(io("stat", &path))?.len();
                    if actual > *len {
                        tracing::warn!(source = %meta.name, file = %fname, from = actual, to = len,
                            "cutting a log copy back to its committed length");
                        let f = OpenOptions::new()
                            .write(true)
                            .open(&path)
                            .map_err(io("open", &path))?;
                        f.set_len(*len).map_err(io("truncate", &path))?;
                        f.sync_all().map_err(io("fsync", &path))?;
                    } else if actual < *len {
                        tracing::error!(source = %meta.name, file = %fname, have = actual, recorded = len,
                            "a log copy is shorter than its record: a verify will mark the points that need it");
                    }
                }
            }
        }
        if changed {
            fsync_dir(&dir)?;
        }
        Ok(())
    }
}

impl LogShip {
    /// The point this ship will make.
    pub fn new_point(&self) -> u64 {
        self.new_point
    }

    /// The current generation of every file, as the ship began (what the agent
    /// compares the host's files with).
    pub fn manifest(&self) -> Vec<&LogFileMeta> {
        self.current
            .values()
            .filter_map(|id| self.files.get(id))
            .collect()
    }

    /// Payload bytes received so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Bytes of host file `name` follow from `offset`: the node's length (an
    /// append), or 0 with `restart` (a new generation).
    #[allow(clippy::too_many_arguments)]
    pub fn start_file(
        &mut self,
        name: &str,
        offset: u64,
        restart: bool,
        dev: u64,
        ino: u64,
        mtime_ns: i64,
        reason: &str,
    ) -> Result<()> {
        if !valid_log_name(name) {
            return Err(StoreError::BadLog(format!(
                "\"{}\" is not a file name (one path component, at most 255 bytes)",
                name.escape_debug()
            )));
        }
        if !self.started.insert(name.to_string()) {
            return Err(StoreError::BadLog(format!(
                "file {name} was sent twice in one ship"
            )));
        }
        // The previous file's copy is made durable at commit, with the others.
        self.open = None;
        let existing = self.current.get(name).copied();
        let id = match existing {
            Some(id) if !restart => {
                let f = self
                    .files
                    .get_mut(&id)
                    .ok_or_else(|| StoreError::Meta(format!("log file record {id} vanished")))?;
                if offset != f.length() {
                    return Err(StoreError::BadLog(format!(
                        "file {name}: the ship appends at byte {offset}, but the node holds {} bytes of it; ship again",
                        f.length()
                    )));
                }
                f.dev = dev;
                f.ino = ino;
                f.mtime_ns = mtime_ns;
                f.gone_at = 0;
                self.committed_len.entry(id).or_insert(f.length());
                self.dirty.insert(id);
                id
            }
            _ => {
                if offset != 0 {
                    return Err(StoreError::BadLog(format!(
                        "file {name}: a new file must be sent from byte 0, not {offset}"
                    )));
                }
                let generation = match existing {
                    Some(old) => {
                        let f = self.files.get_mut(&old).ok_or_else(|| {
                            StoreError::Meta(format!("log file record {old} vanished"))
                        })?;
                        f.replaced_at = self.new_point;
                        self.dirty.insert(old);
                        tracing::warn!(source = %self.meta.name, file = name, generation = f.generation + 1,
                            reason, "log file sent anew");
                        f.generation + 1
                    }
                    None => 1,
                };
                let id = self.next_id;
                self.next_id += 1;
                self.files.insert(
                    id,
                    LogFileMeta {
                        v: FORMAT_VERSION,
                        id,
                        name: name.to_string(),
                        generation,
                        first_point: self.new_point,
                        replaced_at: 0,
                        gone_at: 0,
                        dev,
                        ino,
                        mtime_ns,
                        chunks: Vec::new(),
                        head_hash: String::new(),
                        tail_hash: String::new(),
                    },
                );
                self.current.insert(name.to_string(), id);
                self.created.push(id);
                self.dirty.insert(id);
                id
            }
        };
        let path = copy_path(&self.meta, id);
        let file = OpenOptions::new()
            .write(true)
            .read(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io("open", &path))?;
        self.open = Some(Open { id, file, path });
        Ok(())
    }

    /// Appends a piece of the file started last, after checking its BLAKE3.
    pub fn append(&mut self, data: &[u8], checksum: &[u8]) -> Result<()> {
        let Some(open) = &self.open else {
            return Err(StoreError::BadLog(
                "log data before any file was started".into(),
            ));
        };
        let id = open.id;
        if data.len() > MAX_PIECE {
            return Err(StoreError::BadLog(format!(
                "a piece of {} bytes is over the limit of {MAX_PIECE}",
                data.len()
            )));
        }
        let hash = blake3::hash(data);
        if checksum != hash.as_bytes() {
            let name = self
                .files
                .get(&id)
                .map(|f| f.name.clone())
                .unwrap_or_default();
            return Err(StoreError::BadLog(format!(
                "file {name}: a piece's checksum does not match its bytes"
            )));
        }
        if data.is_empty() {
            return Ok(());
        }
        let more = data.len() as u64;
        if self.points_used + more > self.meta.points_alloc_bytes {
            let base = self.new_point - 1;
            make_room(
                &self.store,
                &mut self.meta,
                &mut self.points_used,
                more,
                base,
            )?;
        }
        let f = self
            .files
            .get_mut(&id)
            .ok_or_else(|| StoreError::Meta(format!("log file record {id} vanished")))?;
        let at = f.length();
        let Some(open) = &self.open else {
            return Err(StoreError::Meta("log file closed".into()));
        };
        open.file
            .write_all_at(data, at)
            .map_err(io("write", &open.path))?;
        f.chunks.push(LogChunk {
            point: self.new_point,
            end: at + more,
            hash: hash.to_hex().to_string(),
        });
        self.bytes += more;
        self.points_used += more;
        Ok(())
    }

    /// Records that the host no longer has these files (they stay restorable until
    /// retention drops them).
    pub fn gone(&mut self, names: &[String]) {
        for n in names {
            if let Some(id) = self.current.get(n)
                && let Some(f) = self.files.get_mut(id)
                && f.gone_at == 0
            {
                f.gone_at = self.new_point;
                self.dirty.insert(*id);
            }
        }
    }

    /// Makes the ship durable and records its point.
    pub fn commit(mut self) -> Result<(PointMeta, u64)> {
        self.open = None;
        let touched: Vec<u64> = self
            .committed_len
            .keys()
            .chain(self.created.iter())
            .copied()
            .collect();
        let mut files_changed = 0;
        for id in &touched {
            let Some(f) = self.files.get_mut(id) else {
                continue;
            };
            let path = copy_path(&self.meta, *id);
            let file = File::open(&path).map_err(io("open", &path))?;
            file.sync_all().map_err(io("fsync", &path))?;
            let (head, tail) = anchors(&file, &path, f.length())?;
            f.head_hash = head;
            f.tail_hash = tail;
            if f.chunks.last().is_some_and(|c| c.point == self.new_point)
                || f.first_point == self.new_point
            {
                files_changed += 1;
            }
        }
        if !self.created.is_empty() {
            fsync_dir(&self.meta.dir().join("logs"))?;
        }
        let name = self.meta.name.clone();
        let point = PointMeta {
            v: FORMAT_VERSION,
            id: self.new_point,
            created_ms: bulwark_common::time::now_ms(),
            consistency: Consistency::Crash,
            kind: PointKind::Log,
            blocks_changed: 0,
            bytes_changed: self.bytes,
            delta: None,
            damaged: Vec::new(),
            files_changed,
        };
        let changed: Vec<(Vec<u8>, Vec<u8>)> = self
            .dirty
            .iter()
            .filter_map(|id| self.files.get(id))
            .map(|f| Ok((file_key(&name, f.id), encode(f)?)))
            .collect::<Result<_>>()?;
        let point_bytes = encode(&point)?;
        let meta_bytes = encode(&self.meta)?;
        let store = self.store.clone();
        let mut batch = Batch::default();
        batch.put(Tree::Sources, name.as_bytes(), &meta_bytes);
        for (k, v) in &changed {
            batch.put(Tree::LogFiles, k, v);
        }
        batch.put(Tree::Points, point_key(&name, point.id), &point_bytes);
        store.meta.apply(&batch)?;
        store.meta.flush()?;
        self.done = true;
        bulwark_common::failpoint::hit("node-after-log-commit");
        Ok((point, files_changed))
    }

    /// Undoes what this ship wrote: copies cut back, new copies removed.
    pub fn abort(mut self) -> Result<()> {
        self.undo()
    }

    fn undo(&mut self) -> Result<()> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        self.open = None;
        for (id, len) in &self.committed_len {
            let path = copy_path(&self.meta, *id);
            if let Ok(f) = OpenOptions::new().write(true).open(&path) {
                f.set_len(*len).map_err(io("truncate", &path))?;
                f.sync_all().map_err(io("fsync", &path))?;
            }
        }
        for id in &self.created {
            let path = copy_path(&self.meta, *id);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("remove", &path)(e)),
            }
        }
        Ok(())
    }
}

impl Drop for LogShip {
    fn drop(&mut self) {
        if let Err(e) = self.undo() {
            tracing::error!(source = %self.meta.name, "undoing a failed log ship: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::PoolDisk;

    fn wal() -> SourceName {
        SourceName::parse("wal").expect("a valid name")
    }

    fn store(dir: &Path) -> Store {
        let disk = dir.join("disk");
        std::fs::create_dir_all(&disk).expect("disk");
        // sled lets go of its lock a moment after a drop (see the store's tests).
        for _ in 0..500 {
            match Store::open(
                &dir.join("data"),
                vec![PoolDisk {
                    path: disk.clone(),
                    capacity_bytes: 1 << 40,
                }],
            ) {
                Err(StoreError::Meta(m)) if m.contains("could not acquire lock") => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                r => return r.expect("open"),
            }
        }
        panic!("the metadata store stayed locked")
    }

    fn ship(s: &Store, files: &[(&str, u64, bool, &[u8])]) -> PointMeta {
        let mut t = s.begin_log_ship(&wal(), None).expect("begin");
        for (name, off, restart, data) in files {
            t.start_file(name, *off, *restart, 1, 2, 3, "")
                .expect("start");
            t.append(data, blake3::hash(data).as_bytes())
                .expect("append");
        }
        t.commit().expect("commit").0
    }

    fn contents(s: &Store, point: u64) -> Vec<(String, Vec<u8>)> {
        let (_, files) = s.log_restore("wal", point).expect("restore");
        files
            .into_iter()
            .map(|f| {
                let data = std::fs::read(&f.path).expect("read");
                (f.name.clone(), data[..f.length() as usize].to_vec())
            })
            .collect()
    }

    #[test]
    fn appends_restarts_and_points_see_their_own_state() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = store(dir.path());
        let p1 = ship(&s, &[("a", 0, false, b"one "), ("b", 0, false, b"x")]);
        let p2 = ship(&s, &[("a", 4, false, b"two")]);
        let p3 = ship(&s, &[("b", 0, true, b"new b")]);
        assert_eq!(p1.kind, PointKind::Log);
        assert_eq!(
            contents(&s, p1.id),
            vec![("a".into(), b"one ".to_vec()), ("b".into(), b"x".to_vec())]
        );
        assert_eq!(
            contents(&s, p2.id),
            vec![
                ("a".into(), b"one two".to_vec()),
                ("b".into(), b"x".to_vec())
            ]
        );
        assert_eq!(
            contents(&s, p3.id),
            vec![
                ("a".into(), b"one two".to_vec()),
                ("b".into(), b"new b".to_vec())
            ]
        );
        // The manifest has the current generations and their anchors.
        let ship = s.begin_log_ship(&wal(), None).expect("begin");
        let m = ship.manifest();
        assert_eq!(m.len(), 2, "current generations only");
        let b = m.iter().find(|f| f.name == "b").expect("b");
        assert_eq!(b.generation, 2);
        assert_eq!(b.head_hash, blake3::hash(b"new b").to_hex().to_string());
        let v = s.verify_logs("wal").expect("verify");
        assert!(v.damaged_points.is_empty());
    }

    #[test]
    fn refuses_gaps_bad_checksums_and_bad_names_and_keeps_nothing() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = store(dir.path());
        ship(&s, &[("a", 0, false, b"hello")]);
        let mut t = s.begin_log_ship(&wal(), None).expect("begin");
        let e = t.start_file("a", 3, false, 1, 2, 3, "").expect_err("gap");
        assert!(e.to_string().contains("holds 5 bytes"), "{e}");
        let mut t = s.begin_log_ship(&wal(), None).expect("begin");
        t.start_file("a", 5, false, 1, 2, 3, "").expect("start");
        t.append(b" world", blake3::hash(b" world").as_bytes())
            .expect("append");
        let e = t.append(b"xx", &[0u8; 32]).expect_err("checksum");
        assert!(e.to_string().contains("checksum"), "{e}");
        drop(t);
        for bad in ["", "..", "a/b"] {
            let mut t = s.begin_log_ship(&wal(), None).expect("begin");
            assert!(t.start_file(bad, 0, false, 1, 2, 3, "").is_err(), "{bad:?}");
        }
        // The failed ship left the copy at its committed length.
        assert_eq!(contents(&s, 0), vec![("a".into(), b"hello".to_vec())]);
        let meta = s.source("wal").expect("meta").expect("some");
        assert_eq!(
            std::fs::metadata(copy_path(&meta, 1)).expect("stat").len(),
            5
        );
    }

    #[test]
    fn uncommitted_bytes_are_cut_at_open() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = store(dir.path());
        ship(&s, &[("a", 0, false, b"hello")]);
        let mut t = s.begin_log_ship(&wal(), None).expect("begin");
        t.start_file("a", 5, false, 1, 2, 3, "").expect("start");
        t.append(b" world", blake3::hash(b" world").as_bytes())
            .expect("append");
        t.start_file("c", 0, false, 1, 2, 3, "").expect("start");
        t.append(b"c", blake3::hash(b"c").as_bytes())
            .expect("append");
        // A crash: nothing undone.
        t.done = true;
        drop(t);
        drop(s);
        let s = store(dir.path());
        assert_eq!(contents(&s, 0), vec![("a".into(), b"hello".to_vec())]);
        let meta = s.source("wal").expect("meta").expect("some");
        let left: Vec<_> = std::fs::read_dir(meta.dir().join("logs"))
            .expect("dir")
            .collect();
        assert_eq!(left.len(), 1);
    }

    #[test]
    fn retention_keeps_the_logs_the_groups_oldest_volume_point_needs() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = store(dir.path());
        let mut ids = Vec::new();
        for i in 0..4u8 {
            ids.push(ship(&s, &[(&format!("seg{i}"), 0, false, &[i; 10][..])]).id);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let points = s.points("wal").expect("points");
        let keep_one = SourcePolicy {
            retention: bulwark_common::retention::Retention {
                keep: 1,
                ..Default::default()
            },
            // The oldest volume point was made between the 2nd and 3rd ships.
            keep_after_ms: points[2].created_ms,
            ..Default::default()
        };
        let now = bulwark_common::time::now_ms();
        let dropped = s.set_policy("wal", &keep_one, now).expect("policy");
        assert_eq!(
            dropped,
            vec![ids[0]],
            "only ships before the one before the floor go"
        );
        let no_floor = SourcePolicy {
            keep_after_ms: 0,
            ..keep_one
        };
        let dropped = s.set_policy("wal", &no_floor, now).expect("policy");
        assert_eq!(dropped, vec![ids[1], ids[2]]);
        // The files no remaining point needs went with them... except files still
        // on the host, which stay whole (none here is gone, so all stay).
        assert_eq!(contents(&s, 0).len(), 4);
    }

    #[test]
    fn retention_keeps_files_still_needed_and_drops_deleted_ones() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = store(dir.path());
        let p1 = ship(&s, &[("a", 0, false, b"aaa"), ("b", 0, false, b"bbb")]);
        // b is deleted on the host after shipping.
        let mut t = s.begin_log_ship(&wal(), None).expect("begin");
        t.gone(&["b".to_string()]);
        let p2 = t.commit().expect("commit").0;
        let p3 = ship(&s, &[("a", 3, false, b"A")]);
        // Still restorable at every point while points that shipped it exist.
        assert_eq!(contents(&s, p3.id).len(), 2);
        s.prune("wal", p1.id).expect("prune");
        // p1 shipped b's only bytes and b is gone: dropped. a is kept whole.
        assert_eq!(contents(&s, p3.id), vec![("a".into(), b"aaaA".to_vec())]);
        assert_eq!(contents(&s, p2.id), vec![("a".into(), b"aaa".to_vec())]);
        assert_eq!(s.log_bytes("wal").expect("bytes"), 4);
    }
}
