//! The metadata records: a source, a point, a sync being received, a point to settle,
//! their keys and encoding, and the store's typed accessors over them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bulwark_common::block::{DIGEST_LEN, Geometry};
use bulwark_common::name::SourceName;
use bulwark_common::point::{Consistency, PointKind};
use bulwark_common::retention::Retention;
use serde::{Deserialize, Serialize};

use super::*;

/// A data source as the node stores it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceMeta {
    pub v: u32,
    /// Checked again whenever the record is read: folders are named after it.
    pub name: SourceName,
    pub size_bytes: u64,
    pub block_size: u32,
    /// The pool disk holding the replica and deltas.
    pub disk: PathBuf,
    pub replica_alloc_bytes: u64,
    pub points_alloc_bytes: u64,
    pub created_ms: i64,
    /// Which points are kept.
    #[serde(default)]
    pub retention: Retention,
    /// The allocation overrides last applied from the coordinator (0 = default), so
    /// that an auto-grown allocation is not undone by the same policy again.
    #[serde(default)]
    pub applied_replica_alloc: u64,
    #[serde(default)]
    pub applied_points_alloc: u64,
    /// A volume (replica and deltas) or a log source (see [`logs`]).
    #[serde(default)]
    pub kind: SourceKind,
    /// See [`SourcePolicy::keep_after_ms`].
    #[serde(default)]
    pub keep_after_ms: i64,
    /// Its retention lock (see [`lock`]): kept by the node, raised by the
    /// coordinator's policy, lowered only as the lock's mode allows.
    #[serde(default)]
    pub lock: Option<lock::RetentionLock>,
}

impl SourceMeta {
    /// The block geometry.
    pub fn geometry(&self) -> Geometry {
        Geometry {
            size_bytes: self.size_bytes,
            block_size: self.block_size,
        }
    }
    /// Replica plus recovery-point space allocated to it (saturating: the figures
    /// may come from another node's export).
    pub fn allocated_bytes(&self) -> u64 {
        self.replica_alloc_bytes
            .saturating_add(self.points_alloc_bytes)
    }

    pub(super) fn dir(&self) -> PathBuf {
        source_dir(&self.disk, &self.name)
    }

    /// Refuses `op` on a log source.
    pub(super) fn require_volume(&self, op: &'static str) -> Result<()> {
        match self.kind {
            SourceKind::Volume => Ok(()),
            SourceKind::Log => Err(StoreError::WrongKind {
                source_name: self.name.to_string(),
                kind: "log",
                op,
            }),
        }
    }

    /// Takes the coordinator's policy: a changed override sets the allocation, and
    /// the retention is replaced.
    pub(super) fn apply_policy(&mut self, p: &SourcePolicy) {
        if p.replica_alloc_bytes != self.applied_replica_alloc {
            self.applied_replica_alloc = p.replica_alloc_bytes;
            self.replica_alloc_bytes = if p.replica_alloc_bytes > 0 {
                p.replica_alloc_bytes
            } else {
                bulwark_common::alloc::replica_bytes(self.size_bytes)
            }
            .max(min_replica_bytes(self.geometry()));
        }
        if p.points_alloc_bytes != self.applied_points_alloc {
            self.applied_points_alloc = p.points_alloc_bytes;
            self.points_alloc_bytes = if p.points_alloc_bytes > 0 {
                p.points_alloc_bytes
            } else {
                bulwark_common::alloc::points_bytes(
                    self.size_bytes,
                    bulwark_common::alloc::DEFAULT_RETENTION_DAYS,
                )
            };
        }
        self.retention = p.retention;
        self.keep_after_ms = p.keep_after_ms;
        // A lock only goes up this way (a lower one from the coordinator is
        // ignored: lowering takes the officer's own call, see `lock`).
        if let Some((mode, min_age_ms)) = p.lock
            && min_age_ms > 0
            && lock::is_raise(self.lock, p.lock)
            && self
                .lock
                .is_none_or(|l| l.mode != mode || l.min_age_ms != min_age_ms)
        {
            tracing::info!(source = %self.name, mode = mode.as_str(), min_age_ms, "retention lock raised by the coordinator's policy");
            self.lock = Some(lock::RetentionLock {
                mode,
                min_age_ms,
                set_ms: bulwark_common::time::now_ms(),
            });
        }
    }
}

/// The least replica space a volume can live in: its bytes and its checksums.
pub fn min_replica_bytes(g: Geometry) -> u64 {
    g.size_bytes
        .saturating_add(g.block_count().saturating_mul(DIGEST_LEN as u64))
}

/// The folder of a source: only ever built from a checked name.
pub(super) fn source_dir(disk: &Path, name: &SourceName) -> PathBuf {
    disk.join("bulwark").join(name.as_str())
}

/// A recovery point as the node records it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PointMeta {
    pub v: u32,
    pub id: u64,
    pub created_ms: i64,
    pub consistency: Consistency,
    pub kind: PointKind,
    pub blocks_changed: u64,
    pub bytes_changed: u64,
    /// The reverse delta to the next point; `None` for the newest point.
    pub delta: Option<DeltaMeta>,
    /// Blocks a verify found damaged and nothing could repair (log points: the
    /// ids of damaged log file copies).
    #[serde(default)]
    pub damaged: Vec<u64>,
    /// Log points: files that received bytes.
    #[serde(default)]
    pub files_changed: u64,
    /// Log points: what the ship's `bytes_changed` take in the copies (compressed
    /// chunks as compressed); absent in records of a node before log compression,
    /// whose chunks are all raw (then it is `bytes_changed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_stored_bytes: Option<u64>,
}

impl PointMeta {
    /// Bytes kept for this point (its delta's file, as stored: compressed records
    /// count compressed; a log point's shipped chunks as stored): what counts
    /// against the source's recovery-point space.
    pub fn stored_bytes(&self) -> u64 {
        match self.kind {
            PointKind::Log => self.log_stored_bytes.unwrap_or(self.bytes_changed),
            _ => self.delta.map_or(0, |d| d.bytes),
        }
    }

    /// [`PointMeta::stored_bytes`] before compression: the length its delta would
    /// have with every record raw.
    pub fn logical_bytes(&self) -> u64 {
        match self.kind {
            PointKind::Log => self.bytes_changed,
            _ => self.delta.map_or(0, |d| d.logical_bytes()),
        }
    }
}

/// Size of a point's reverse delta: its records, and its file's length in bytes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct DeltaMeta {
    pub records: u64,
    /// The file's length, header included (compressed records as stored).
    pub bytes: u64,
    /// The file's length were every record raw; absent in records of a node
    /// before compression, whose deltas are all raw (then it is `bytes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logical_bytes: Option<u64>,
}

impl DeltaMeta {
    /// The delta's bytes before compression (see [`DeltaMeta::logical_bytes`]).
    pub fn logical_bytes(&self) -> u64 {
        self.logical_bytes.unwrap_or(self.bytes)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Pending {
    pub(super) v: u32,
    pub(super) new_point: u64,
    pub(super) fresh: bool,
    pub(super) disk: PathBuf,
    /// The sync writes its blocks to the source's journal (every sync but a first
    /// one); a record without it is from an older node, which wrote into the
    /// replica behind before-images in the delta.
    #[serde(default)]
    pub(super) journal: bool,
}

/// A committed point whose blocks are still only in the source's journal (the
/// `settle` tree): [`Store::settle`] applies them to the replica.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Settle {
    pub(super) v: u32,
    /// The committed point; the replica holds `point - 1` until it is settled.
    pub(super) point: u64,
    pub(super) disk: PathBuf,
}

pub(super) fn point_key(source: &str, id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(source.len() + 9);
    k.extend_from_slice(source.as_bytes());
    k.push(0);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

pub(super) fn point_prefix(source: &str) -> Vec<u8> {
    let mut k = source.as_bytes().to_vec();
    k.push(0);
    k
}

pub(super) fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| StoreError::Meta(e.to_string()))
}

pub(super) fn decode<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| StoreError::Meta(format!("unreadable record: {e}")))
}

impl Store {
    /// Makes every metadata write so far durable.
    pub fn flush(&self) -> Result<()> {
        self.meta.flush()
    }

    /// The pool's disks.
    pub fn disks(&self) -> &[PoolDisk] {
        &self.disks
    }

    /// A stored data source.
    pub fn source(&self, name: &str) -> Result<Option<SourceMeta>> {
        if let Some(why) = self.refused.get(name) {
            return Err(StoreError::Refused {
                source_name: bulwark_common::text::escape(name),
                why: why.clone(),
            });
        }
        self.meta
            .get(Tree::Sources, name.as_bytes())?
            .map(|v| decode(&v))
            .transpose()
    }

    /// Every stored data source (but those refused at open).
    pub fn all_sources(&self) -> Result<Vec<SourceMeta>> {
        self.meta
            .scan(Tree::Sources, b"")?
            .iter()
            .filter(|(k, _)| !self.refused.contains_key(&*String::from_utf8_lossy(k)))
            .map(|(_, v)| decode(v))
            .collect()
    }

    /// Sources refused at open, by name (escaped for printing), with the reason.
    pub fn refused_sources(&self) -> HashMap<String, String> {
        self.refused
            .iter()
            .map(|(k, why)| (bulwark_common::text::escape(k), why.clone()))
            .collect()
    }

    /// Points of a source, oldest first.
    pub fn points(&self, name: &str) -> Result<Vec<PointMeta>> {
        self.meta
            .scan(Tree::Points, &point_prefix(name))?
            .iter()
            .map(|(_, v)| decode(v))
            .collect()
    }

    /// The newest point of a source.
    pub fn newest_point(&self, name: &str) -> Result<Option<PointMeta>> {
        self.meta
            .last(Tree::Points, &point_prefix(name))?
            .map(|v| decode(&v))
            .transpose()
    }

    /// Stores a source's record (an allocation change) durably.
    pub(super) fn put_meta(&self, meta: &SourceMeta) -> Result<()> {
        self.meta.apply(Batch::default().put(
            Tree::Sources,
            meta.name.as_bytes(),
            &encode(meta)?,
        ))?;
        self.meta.flush()
    }

    /// Remembers the coordinator's assignment of `source`, as the service encoded
    /// it (the cache it falls back on when the coordinator cannot be reached).
    pub fn remember_assignment(&self, source: &str, encoded: &[u8]) -> Result<()> {
        self.meta
            .apply(Batch::default().put(Tree::Assignments, source, encoded))
    }

    /// The assignment of `source` last remembered, as the service encoded it.
    pub fn cached_assignment(&self, source: &str) -> Result<Option<Vec<u8>>> {
        self.meta.get(Tree::Assignments, source.as_bytes())
    }
}
