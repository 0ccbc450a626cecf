//! Log sources on the node: append-only copies of a host's log files, shipped in
//! pieces, with a recovery point per ship.
//!
//! # What is on disk
//!
//! In `<disk>/bulwark/<source>/logs/`, one file per *generation* of a host log file,
//! named by a number (`<id>` zero-padded): the pieces the agent shipped, in order,
//! each as one zstd frame or raw (`logs/chunks.rs`: the stored bytes; every reader
//! gets the logical ones through [`LogCopy`]). A generation begins when the file is
//! first shipped and is replaced by a new one when the agent finds the host's file
//! rotated, truncated or rewritten and sends it anew; the old generation stays for
//! the points that saw it.
//!
//! In sled, tree `logfiles`, key `source ∖0 id`: a [`LogFileMeta`]: host name,
//! generation, the ship that began it (`first_point`), the ship that replaced it
//! (`replaced_at`, 0 = current), the ship after which the host no longer had it
//! (`gone_at`), the host file's identity, and its *chunks*: for each piece shipped,
//! the point that shipped it, where it ends (in the file, and in the copy when that
//! differs), how it is stored, and its BLAKE3. The file as of point `Q` is every
//! chunk shipped at or before `Q`.
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

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{
    Batch, PointMeta, Result, SourceMeta, Store, StoreError, Tree, decode, encode, fsync_dir, io,
    point_key, point_prefix,
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
    /// BLAKE3 of its bytes (the logical bytes, whatever the codec), hex.
    pub hash: String,
    /// Where its stored bytes end in the copy (they start where the previous
    /// chunk's end); absent when that is `end`, as in every copy whose chunks
    /// before it are all raw (every copy of a node before log compression).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_end: Option<u64>,
    /// How its bytes are stored (absent: raw).
    #[serde(default, skip_serializing_if = "ChunkCodec::is_raw")]
    pub codec: ChunkCodec,
}

impl LogChunk {
    /// Where its stored bytes end in the copy.
    pub fn stored_end(&self) -> u64 {
        self.stored_end.unwrap_or(self.end)
    }
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
    /// Bytes held (logical: the host file's length as shipped).
    pub fn length(&self) -> u64 {
        self.chunks.last().map_or(0, |c| c.end)
    }
    /// Bytes its copy holds (stored: compressed chunks as compressed).
    pub fn stored_length(&self) -> u64 {
        self.chunks.last().map_or(0, LogChunk::stored_end)
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

/// One log file of a point, for a restore.
#[derive(Debug, Clone)]
pub struct LogRestoreFile {
    pub source: String,
    pub name: String,
    pub generation: u32,
    pub mtime_ns: i64,
    pub path: PathBuf,
    /// Its chunks up to the point.
    pub pieces: Vec<LogPiece>,
}

impl LogRestoreFile {
    /// Its length (logical) as of the point.
    pub fn length(&self) -> u64 {
        self.pieces.last().map_or(0, |p| p.end)
    }
    /// Opens its copy: [`LogCopy::read`] then gives each piece's bytes.
    pub fn open(&self) -> Result<LogCopy> {
        LogCopy::open(&self.path, &self.source, &self.name, self.generation)
    }
}

/// A chunk's codec and stored offsets; reading chunks back: [`LogCopy`].
mod chunks;
pub use chunks::{ChunkCodec, LogCopy, LogPiece, pieces};

/// The ship itself: [`LogShip`].
mod ship;
pub use ship::LogShip;

impl Store {
    /// Every generation record of a log source, by id.
    pub fn log_files(&self, name: &str) -> Result<Vec<LogFileMeta>> {
        self.meta
            .scan(Tree::LogFiles, &point_prefix(name))?
            .iter()
            .map(|(_, v)| decode(v))
            .collect()
    }

    /// Bytes a log source's copies hold (stored: what counts against its space).
    pub(super) fn log_bytes(&self, name: &str) -> Result<u64> {
        Ok(self
            .log_files(name)?
            .iter()
            .map(LogFileMeta::stored_length)
            .sum())
    }

    /// A log source's copies as `(stored, logical)` bytes.
    pub(super) fn log_bytes_both(&self, name: &str) -> Result<(u64, u64)> {
        Ok(self
            .log_files(name)?
            .iter()
            .fold((0, 0), |(s, l), f| (s + f.stored_length(), l + f.length())))
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
            .map(|f| LogRestoreFile {
                source: name.to_string(),
                path: copy_path(&meta, f.id),
                pieces: pieces(f.chunks.iter().take_while(|c| c.point <= p.id)),
                name: f.name,
                generation: f.generation,
                mtime_ns: f.mtime_ns,
            })
            .collect();
        files.sort_by(|a, b| a.name.cmp(&b.name));
        Ok((p, files))
    }

    /// Re-reads every stored piece of a log source, decodes it (a compressed piece
    /// into exactly its length) and checks its BLAKE3. Returns (pieces checked,
    /// stored bytes read, points whose restore would read a damaged piece, with the
    /// ids of the damaged files).
    pub(super) fn verify_logs(&self, name: &str) -> Result<super::VerifyOutcome> {
        let meta = self
            .source(name)?
            .ok_or_else(|| StoreError::NoPoints(name.to_string()))?;
        let mut out = super::VerifyOutcome::default();
        let mut damaged: Vec<LogFileMeta> = Vec::new();
        for f in self.log_files(name)? {
            let copy = LogCopy::open(&copy_path(&meta, f.id), name, &f.name, f.generation)?;
            let mut bad = false;
            for p in pieces(&f.chunks) {
                out.blocks_checked += 1;
                out.bytes_read += p.stored_end.saturating_sub(p.stored_start);
                if let Err(e) = copy.read(&p) {
                    tracing::error!(source = name, file = %f.name, generation = f.generation,
                        at = p.start, "log piece damaged: {e}");
                    bad = true;
                }
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
                Ok(()) => freed += f.stored_length(),
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

    /// After a crash: cuts every copy back to its recorded (stored) length and removes copies
    /// no record names (a ship that did not commit).
    pub(super) fn recover_logs(&self, meta: &SourceMeta) -> Result<()> {
        let dir = meta.dir().join("logs");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(());
        };
        let files: HashMap<String, u64> = self
            .log_files(&meta.name)?
            .iter()
            .map(|f| (format!("{:020}", f.id), f.stored_length()))
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

#[cfg(test)]
mod tests;
