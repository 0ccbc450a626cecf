//! A ship of a log source in progress: [`LogShip`], begun by
//! [`Store::begin_log_ship`] (see the crash-safety argument in `logs.rs`).

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use bulwark_common::name::SourceName;
use bulwark_common::point::{Consistency, PointKind};

use super::super::{
    Batch, FORMAT_VERSION, PointMeta, Result, SourceMeta, SourcePolicy, Store, StoreError,
    SyncSpec, Tree, encode, fsync_dir, io, make_room, point_key,
};
use super::{
    ChunkCodec, LogChunk, LogCopy, LogFileMeta, MAX_PIECE, SourceKind, copy_path, file_key, pieces,
    valid_log_name,
};
use crate::store::compress;

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
    /// Payload bytes received (logical) and what they take in the copies.
    bytes: u64,
    stored: u64,
    /// Stored bytes of the source's copies (counted against its allocation).
    points_used: u64,
    /// The frame of the piece being compressed.
    frame: Vec<u8>,
    pub(super) done: bool,
}

impl Store {
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
        let points_used = files.values().map(LogFileMeta::stored_length).sum();
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
            stored: 0,
            points_used,
            frame: Vec::new(),
            done: false,
        })
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
                self.committed_len.entry(id).or_insert(f.stored_length());
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

    /// Appends a piece of the file started last, after checking its BLAKE3: as one
    /// zstd frame when the pool compresses and the frame is smaller, else raw.
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
        let (stored, codec) =
            if compress::compress_block(self.store.policy.compression, data, &mut self.frame) {
                (&self.frame[..], ChunkCodec::Zstd)
            } else {
                (data, ChunkCodec::Raw)
            };
        let more_stored = stored.len() as u64;
        if self.points_used + more_stored > self.meta.points_alloc_bytes {
            let base = self.new_point - 1;
            make_room(
                &self.store,
                &mut self.meta,
                &mut self.points_used,
                more_stored,
                base,
            )?;
        }
        let f = self
            .files
            .get_mut(&id)
            .ok_or_else(|| StoreError::Meta(format!("log file record {id} vanished")))?;
        let (end, stored_end) = (f.length() + more, f.stored_length() + more_stored);
        let Some(open) = &self.open else {
            return Err(StoreError::Meta("log file closed".into()));
        };
        open.file
            .write_all_at(stored, f.stored_length())
            .map_err(io("write", &open.path))?;
        f.chunks.push(LogChunk {
            point: self.new_point,
            end,
            hash: hash.to_hex().to_string(),
            stored_end: (stored_end != end).then_some(stored_end),
            codec,
        });
        self.bytes += more;
        self.stored += more_stored;
        self.points_used += more_stored;
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
            let copy = LogCopy::open(&path, &self.meta.name, &f.name, f.generation)?;
            let (head, tail) = copy.anchors(&pieces(&f.chunks))?;
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
            log_stored_bytes: Some(self.stored),
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
