//! Moving a source between nodes: export, import, and dropping the source here.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bulwark_common::block::DIGEST_LEN;
use bulwark_common::failpoint;
use bulwark_common::name::SourceName;
use serde::{Deserialize, Serialize};

use super::*;

/// A source's records as a move carries them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportMeta {
    pub source: SourceMeta,
    pub points: Vec<PointMeta>,
    /// Log sources: every file generation's record (its copy is `logs/<id>`).
    #[serde(default)]
    pub log_files: Vec<LogFileMeta>,
}

pub(super) fn import_dir(disk: &Path, name: &SourceName) -> PathBuf {
    disk.join("bulwark").join(format!("{name}.import"))
}

/// A source being copied in from another node: files are written into a staging
/// directory, then [`Import::commit`] makes them durable, moves them into place,
/// records the source and its points in one transaction, and verifies every
/// checksum (a source that fails is dropped again). Dropped without commit, the
/// staging directory is removed.
pub struct Import {
    pub(super) store: Store,
    pub(super) meta: ExportMeta,
    pub(super) staging: PathBuf,
    pub(super) files: HashMap<String, File>,
    pub(super) bytes: u64,
    pub(super) done: bool,
}

impl Import {
    /// Writes part of file `name` (`replica`, `digests` or `deltas/<point>.delta`
    /// of a point the move lists); `file_len` sizes the file on its first part.
    pub fn write(&mut self, name: &str, offset: u64, data: &[u8], file_len: u64) -> Result<()> {
        let log_len = self
            .meta
            .log_files
            .iter()
            .find(|f| name == logs::copy_name(f.id))
            .map(LogFileMeta::stored_length);
        let allowed = if self.meta.source.kind == SourceKind::Log {
            log_len.is_some()
        } else {
            name == "replica"
                || name == "digests"
                || self
                    .meta
                    .points
                    .iter()
                    .any(|p| p.delta.is_some() && name == format!("deltas/{:020}.delta", p.id))
        };
        if !allowed {
            return Err(StoreError::Meta(format!(
                "a move sent an unexpected file {name:?}"
            )));
        }
        let geometry = self.meta.source.geometry();
        let expected_len = match name {
            "replica" => Some(geometry.size_bytes),
            "digests" => Some(geometry.block_count() * DIGEST_LEN as u64),
            _ => log_len,
        };
        if !self.files.contains_key(name) {
            // Digests come with a header from a node of this version, without
            // one from an older node (see `header.rs`).
            if let Some(l) = expected_len
                && l != file_len
                && !(name == "digests" && file_len == l + FILE_HEADER_LEN)
            {
                return Err(StoreError::Meta(format!(
                    "a move sent {name} of {file_len} bytes; the volume needs {l}"
                )));
            }
            let path = self.staging.join(name);
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(io("create", &path))?;
            f.set_len(file_len).map_err(io("size", &path))?;
            self.files.insert(name.to_string(), f);
        }
        let Some(f) = self.files.get(name) else {
            return Err(StoreError::Meta(format!("{name} is not open")));
        };
        let len = f.metadata().map_err(io("stat", &self.staging))?.len();
        if offset + data.len() as u64 > len {
            return Err(StoreError::Meta(format!(
                "a move wrote past the end of {name} ({} > {len})",
                offset + data.len() as u64
            )));
        }
        f.write_all_at(data, offset)
            .map_err(io("write", &self.staging.join(name)))?;
        self.bytes += data.len() as u64;
        Ok(())
    }

    /// Payload bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Makes the copy durable and the source this node's, then verifies it; returns
    /// the blocks verified.
    pub fn commit(mut self) -> Result<u64> {
        for (name, f) in &self.files {
            f.sync_all()
                .map_err(io("fsync", &self.staging.join(name)))?;
        }
        let want = if self.meta.source.kind == SourceKind::Log {
            // An empty log file sends no part: create its copy here.
            for f in &self.meta.log_files {
                let n = logs::copy_name(f.id);
                if f.length() == 0 && !self.files.contains_key(&n) {
                    let path = self.staging.join(&n);
                    let file = File::create(&path).map_err(io("create", &path))?;
                    file.sync_all().map_err(io("fsync", &path))?;
                    self.files.insert(n, file);
                }
            }
            self.meta.log_files.len()
        } else {
            2 + self
                .meta
                .points
                .iter()
                .filter(|p| p.delta.is_some())
                .count()
        };
        if self.files.len() != want {
            return Err(StoreError::Meta(format!(
                "the move sent {} of the {want} files of {}",
                self.files.len(),
                self.meta.source.name
            )));
        }
        fsync_dir(&self.staging.join("deltas"))?;
        fsync_dir(&self.staging.join("logs"))?;
        fsync_dir(&self.staging)?;
        let name = self.meta.source.name.clone();
        let dir = self.meta.source.dir();
        if dir.exists() {
            return Err(StoreError::Meta(format!(
                "{} exists already; remove it if it is a stale copy",
                dir.display()
            )));
        }
        failpoint::io("node-io-rename")
            .and_then(|()| std::fs::rename(&self.staging, &dir))
            .map_err(io("rename", &self.staging))?;
        if let Some(parent) = dir.parent() {
            fsync_dir(parent)?;
        }
        self.done = true;
        let store = self.store.clone();
        let mut batch = Batch::default();
        batch.put(Tree::Sources, name.as_bytes(), &encode(&self.meta.source)?);
        for p in &self.meta.points {
            batch.put(Tree::Points, point_key(&name, p.id), &encode(p)?);
        }
        for f in &self.meta.log_files {
            batch.put(Tree::LogFiles, point_key(&name, f.id), &encode(f)?);
        }
        store.meta.apply(&batch)?;
        store.meta.flush()?;
        let before: Vec<(u64, Vec<u64>)> = self
            .meta
            .points
            .iter()
            .filter(|p| !p.damaged.is_empty())
            .map(|p| (p.id, p.damaged.clone()))
            .collect();
        let checked = match store.verify(&name, 0) {
            Ok(v) if v.damaged_points == before && v.damaged_replica.is_empty() => v,
            Ok(v) => {
                store.remove_source(&name)?;
                return Err(StoreError::Meta(format!(
                    "the copy of {name} failed verification: {} replica blocks and {} points damaged; dropped",
                    v.damaged_replica.len(),
                    v.damaged_points.len()
                )));
            }
            Err(e) => {
                store.remove_source(&name)?;
                return Err(e);
            }
        };
        Ok(checked.blocks_checked)
    }
}

impl Drop for Import {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.staging);
        }
    }
}

impl Store {
    /// The records and files of a source, for a move to another node (see
    /// [`Import`]). The caller holds the source's read lock while the files are read.
    pub fn export(&self, name: &str) -> Result<(ExportMeta, Vec<(String, PathBuf)>)> {
        self.settled(name)?;
        let source = self
            .source(name)?
            .ok_or_else(|| StoreError::NoPoints(name.to_string()))?;
        let points = self.points(name)?;
        let dir = source.dir();
        if source.kind == SourceKind::Log {
            let log_files = self.log_files(name)?;
            let files = log_files
                .iter()
                .map(|f| (logs::copy_name(f.id), dir.join(logs::copy_name(f.id))))
                .collect();
            return Ok((
                ExportMeta {
                    source,
                    points,
                    log_files,
                },
                files,
            ));
        }
        let mut files = vec![
            ("replica".to_string(), dir.join("replica")),
            ("digests".to_string(), dir.join("digests")),
        ];
        for p in points.iter().filter(|p| p.delta.is_some()) {
            files.push((format!("deltas/{:020}.delta", p.id), delta_path(&dir, p.id)));
        }
        Ok((
            ExportMeta {
                source,
                points,
                log_files: Vec::new(),
            },
            files,
        ))
    }

    /// Starts taking in a source another node exports: its files go to a staging
    /// directory on the pool disk with the most unallocated room for its allocation.
    pub fn import(&self, meta: ExportMeta) -> Result<Import> {
        let name = meta.source.name.clone();
        if self.source(&name)?.is_some() {
            return Err(StoreError::Meta(format!(
                "data source {name} is already stored on this node"
            )));
        }
        if meta.source.kind == SourceKind::Volume
            && meta.source.replica_alloc_bytes < min_replica_bytes(meta.source.geometry())
        {
            return Err(StoreError::Meta(format!(
                "the export of {name} gives it {} bytes of replica space, less than its volume of {} bytes needs",
                meta.source.replica_alloc_bytes, meta.source.size_bytes
            )));
        }
        let need = meta.source.allocated_bytes();
        let mut best: Option<(&PoolDisk, u64)> = None;
        for d in self.disks.iter() {
            let free = self.unallocated(&d.path, &name)?;
            if best.is_none_or(|(_, f)| free > f) {
                best = Some((d, free));
            }
        }
        let disk = match best {
            Some((d, free)) if free >= need => d.path.clone(),
            other => {
                return Err(StoreError::NoSpace {
                    source_name: name.to_string(),
                    need,
                    free: other.map_or(0, |(_, f)| f),
                });
            }
        };
        let staging = import_dir(&disk, &name);
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(io("remove", &staging))?;
        }
        std::fs::create_dir_all(staging.join("deltas")).map_err(io("create", &staging))?;
        std::fs::create_dir_all(staging.join("logs")).map_err(io("create", &staging))?;
        let mut meta = meta;
        meta.source.disk = disk;
        Ok(Import {
            store: self.clone(),
            meta,
            staging,
            files: HashMap::new(),
            bytes: 0,
            done: false,
        })
    }

    /// Deletes a source's records and files (it moved to another node). Records
    /// first: a crash in between leaves only files, which the next open reports.
    /// The caller holds the source's write lock.
    pub fn drop_source(&self, name: &str) -> Result<bool> {
        if let Some(meta) = self.source(name)? {
            for p in self.points(name)? {
                self.check_unlocked(&meta, &p)?;
            }
        }
        self.remove_source(name)
    }

    /// Deletes a source's records and files whatever its lock says: only for a copy
    /// that is not the source's (an import that failed verification).
    pub(super) fn remove_source(&self, name: &str) -> Result<bool> {
        let Some(meta) = self.source(name)? else {
            return Ok(false);
        };
        let mut batch = Batch::default();
        batch
            .remove(Tree::Sources, name)
            .remove(Tree::Pending, name)
            .remove(Tree::Settle, name);
        for tree in [Tree::Points, Tree::LogFiles] {
            for (k, _) in self.meta.scan(tree, &point_prefix(name))? {
                batch.remove(tree, k);
            }
        }
        self.meta.apply(&batch)?;
        self.meta.flush()?;
        self.settle_failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        let dir = meta.dir();
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io("remove", &dir))?;
        }
        tracing::info!(source = name, "data source dropped from this node");
        Ok(true)
    }
}
