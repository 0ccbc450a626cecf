//! Pool placement and space: which disk a source goes to, usage figures, health, and
//! room for before-images.

use std::path::{Path, PathBuf};

use bulwark_common::retention::Retention;

use super::*;

/// What the node does when a sync's before-images do not fit the source's
/// recovery-point space.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnFull {
    /// Refuse the sync (the default): the operator decides what to give up.
    #[default]
    Refuse,
    /// Prune the oldest points (never the newest) until the sync fits.
    PruneOldest,
}

/// Pool-wide space policy (`[pool]` in node.toml).
#[derive(Debug, Clone, Copy)]
pub struct PoolPolicy {
    /// Grow a full recovery-point allocation by this many bytes (rounded up to fit
    /// the sync) from the disk's unallocated capacity; 0 = never.
    pub auto_grow_bytes: u64,
    pub on_full: OnFull,
    /// How delta records (before-images) and log pieces are compressed (`[pool]
    /// compression`): when a settle writes them, when retention merges them, when
    /// a log ship appends.
    pub compression: Compression,
    /// How a sync's journal records are compressed (`[pool] journal_compression`,
    /// off by default). The journal holds a sync's new blocks only until its
    /// settle, so compressing it saves space for minutes at the cost of every
    /// sync's time: on the compression bench, syncs with a zstd:1 journal took
    /// 116% of the time with compression off, and 98% with the journal raw, for
    /// the same stored points (`bench/compression.sh`, December 7).
    pub journal_compression: Compression,
}

impl Default for PoolPolicy {
    fn default() -> PoolPolicy {
        PoolPolicy {
            auto_grow_bytes: 0,
            on_full: OnFull::default(),
            compression: Compression::default(),
            journal_compression: Compression::Off,
        }
    }
}

/// What the coordinator asks of one source: allocation overrides (0 = default) and
/// retention.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SourcePolicy {
    pub replica_alloc_bytes: u64,
    pub points_alloc_bytes: u64,
    pub retention: Retention,
    /// Log sources: points made at or after this time (and the one before) are
    /// kept whatever the retention says (the group's oldest volume point needs them).
    pub keep_after_ms: i64,
    /// The retention lock the admin set; the node only ever raises its own from it.
    pub lock: Option<(lock::LockMode, u64)>,
}

/// Space used and allocated in the pool.
#[derive(Debug, Clone, Default)]
pub struct PoolUsage {
    pub disks: Vec<DiskUsage>,
    pub sources: Vec<SourceUsage>,
}

/// One disk's figures.
#[derive(Debug, Clone)]
pub struct DiskUsage {
    pub path: PathBuf,
    pub capacity_bytes: u64,
    pub allocated_bytes: u64,
    pub used_bytes: u64,
}

/// One data source's figures.
#[derive(Debug, Clone)]
pub struct SourceUsage {
    pub name: String,
    pub newest_point: u64,
    pub points: u64,
    pub used_bytes: u64,
    pub allocated_bytes: u64,
    pub replica_alloc_bytes: u64,
    pub points_alloc_bytes: u64,
    /// Bytes the points' deltas hold (on disk: compressed records count
    /// compressed).
    pub points_used_bytes: u64,
    /// The same bytes before compression (see [`PointMeta::logical_bytes`]).
    pub points_logical_bytes: u64,
    /// Points a verify found damaged.
    pub damaged_points: u64,
    /// When the oldest and the newest point were made (0 = none).
    pub oldest_point_ms: i64,
    pub newest_point_ms: i64,
}

/// Bytes free for unprivileged writers on the file system holding `path`.
#[allow(unsafe_code)]
pub(super) fn fs_free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct we own; `c` is a valid C string
    // that outlives the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

/// Bytes actually allocated to the files of a directory tree (sparse-aware).
pub(super) fn used_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    for e in entries.flatten() {
        match e.metadata() {
            Ok(m) if m.is_dir() => total += used_bytes(&e.path()),
            Ok(m) => total += m.blocks() * 512,
            Err(_) => {}
        }
    }
    total
}

/// Finds room for `more` bytes of before-images beyond what the committed points of
/// a source use (`points_used`): grows the allocation from the disk's unallocated
/// capacity when the pool auto-grows, else prunes the oldest points when the pool
/// says so (never `base`, the newest committed point), else refuses.
pub(super) fn make_room(
    store: &Store,
    meta: &mut SourceMeta,
    points_used: &mut u64,
    more: u64,
    base: u64,
) -> Result<()> {
    let need = *points_used + more;
    let policy = store.policy;
    if policy.auto_grow_bytes > 0 {
        let short = need.saturating_sub(meta.points_alloc_bytes);
        let grow = short.div_ceil(policy.auto_grow_bytes) * policy.auto_grow_bytes;
        if grow <= store.unallocated(&meta.disk, &meta.name)? {
            meta.points_alloc_bytes += grow;
            store.put_meta(meta)?;
            tracing::warn!(source = %meta.name, grown_by = grow, points_alloc_bytes = meta.points_alloc_bytes,
                "recovery-point space was full: allocation grown (pool.auto_grow)");
            return Ok(());
        }
        tracing::warn!(source = %meta.name, "recovery-point space is full and the disk has no unallocated room to grow it");
    }
    // Pruning frees only what older points hold: when this sync's own
    // before-images do not fit in the whole allocation, it would drop points and
    // fail all the same.
    if policy.on_full == OnFull::PruneOldest && more <= meta.points_alloc_bytes {
        while *points_used + more > meta.points_alloc_bytes {
            let Some(oldest) = store.points(&meta.name)?.first().map(|p| p.id) else {
                break;
            };
            if oldest >= base {
                break;
            }
            // Space pressure never prunes a locked point: the sync is refused.
            if let Some(p) = store.points(&meta.name)?.first()
                && let Some(lock) = meta.lock
                && lock.holds(p.created_ms, bulwark_common::time::now_ms())
            {
                return Err(StoreError::LockedFull {
                    source_name: meta.name.to_string(),
                    need: more,
                    allocated: meta.points_alloc_bytes,
                    used: *points_used,
                    point: p.id,
                    until: bulwark_common::time::rfc3339_ms(lock.until(p.created_ms)),
                });
            }
            store.prune(&meta.name, oldest)?;
            tracing::warn!(source = %meta.name, point = oldest,
                "recovery-point space was full: oldest point pruned (pool.on_full = \"prune-oldest\")");
            *points_used = store.points_used(&meta.name)?;
        }
        if *points_used + more <= meta.points_alloc_bytes {
            return Ok(());
        }
    }
    Err(StoreError::AllocationFull {
        source_name: meta.name.to_string(),
        need: more,
        allocated: meta.points_alloc_bytes,
        used: *points_used,
    })
}

impl Store {
    /// What is wrong with the pool's disks, if anything: a disk whose directory is
    /// gone or not writable, or whose file system has less room left than the
    /// allocations on it may still fill.
    pub fn health(&self, usage: &PoolUsage) -> Vec<String> {
        let mut problems = Vec::new();
        for d in &usage.disks {
            let probe = d.path.join("bulwark").join(".health-probe");
            if let Err(e) =
                std::fs::write(&probe, b"ok").and_then(|()| std::fs::remove_file(&probe))
            {
                problems.push(format!("disk {} is not writable: {e}", d.path.display()));
                continue;
            }
            if let Some(free) = fs_free_bytes(&d.path) {
                let promised = d.allocated_bytes.saturating_sub(d.used_bytes);
                if free < promised {
                    problems.push(format!(
                        "disk {} has {free} bytes free on its file system, less than the {promised} its allocations may still use",
                        d.path.display()
                    ));
                }
            }
        }
        problems
    }

    /// Space figures for heartbeats and the CLI. Each source directory is walked
    /// once; a disk's figures are the sums over its sources.
    pub fn usage(&self) -> Result<PoolUsage> {
        let mut usage = PoolUsage {
            disks: self
                .disks
                .iter()
                .map(|d| DiskUsage {
                    path: d.path.clone(),
                    capacity_bytes: d.capacity_bytes,
                    allocated_bytes: 0,
                    used_bytes: 0,
                })
                .collect(),
            sources: Vec::new(),
        };
        for s in self.all_sources()? {
            let points = self.points(&s.name)?;
            let used = used_bytes(&s.dir());
            // Log sources: their copies, compressed chunks as stored and as shipped.
            let (points_used, points_logical) = match s.kind {
                SourceKind::Volume => (
                    points.iter().map(PointMeta::stored_bytes).sum(),
                    points.iter().map(PointMeta::logical_bytes).sum(),
                ),
                SourceKind::Log => self.log_bytes_both(&s.name)?,
            };
            if let Some(d) = usage.disks.iter_mut().find(|d| d.path == s.disk) {
                d.allocated_bytes += s.allocated_bytes();
                d.used_bytes += used;
            }
            usage.sources.push(SourceUsage {
                newest_point: points.last().map_or(0, |p| p.id),
                points: points.len() as u64,
                used_bytes: used,
                allocated_bytes: s.allocated_bytes(),
                replica_alloc_bytes: s.replica_alloc_bytes,
                points_alloc_bytes: s.points_alloc_bytes,
                points_used_bytes: points_used,
                points_logical_bytes: points_logical,
                damaged_points: points.iter().filter(|p| !p.damaged.is_empty()).count() as u64,
                oldest_point_ms: points.first().map_or(0, |p| p.created_ms),
                newest_point_ms: points.last().map_or(0, |p| p.created_ms),
                name: s.name.to_string(),
            });
        }
        Ok(usage)
    }

    /// Bytes the points of a source keep in deltas.
    pub fn points_used(&self, name: &str) -> Result<u64> {
        if self
            .source(name)?
            .is_some_and(|m| m.kind == SourceKind::Log)
        {
            return self.log_bytes(name);
        }
        Ok(self.points(name)?.iter().map(PointMeta::stored_bytes).sum())
    }

    /// Bytes of a disk not allocated to any source but `except`.
    pub(super) fn unallocated(&self, disk: &Path, except: &str) -> Result<u64> {
        let capacity = self
            .disks
            .iter()
            .find(|d| d.path == disk)
            .map_or(0, |d| d.capacity_bytes);
        let allocated: u64 = self
            .all_sources()?
            .iter()
            .filter(|s| s.disk == disk && s.name != except)
            .map(SourceMeta::allocated_bytes)
            .sum();
        Ok(capacity.saturating_sub(allocated))
    }

    pub(super) fn place(&self, spec: &SyncSpec) -> Result<SourceMeta> {
        let size = spec.geometry.size_bytes;
        let policy = spec.policy.unwrap_or_default();
        let least = min_replica_bytes(spec.geometry);
        let replica = match policy.replica_alloc_bytes {
            0 => bulwark_common::alloc::replica_bytes(size),
            n => n,
        }
        .max(least);
        let points = match policy.points_alloc_bytes {
            0 => bulwark_common::alloc::points_bytes(
                size,
                bulwark_common::alloc::DEFAULT_RETENTION_DAYS,
            ),
            n => n,
        };
        // Checked before anything is created: a hostile size or allocation must
        // not wrap the sum into something that fits.
        let Some(need) = replica.checked_add(points) else {
            return Err(StoreError::NoSpace {
                source_name: spec.source.to_string(),
                need: u64::MAX,
                free: 0,
            });
        };
        let sources = self.all_sources()?;
        let mut best: Option<(&PoolDisk, u64)> = None;
        for d in self.disks.iter() {
            let allocated: u64 = sources
                .iter()
                .filter(|s| s.disk == d.path)
                .map(SourceMeta::allocated_bytes)
                .sum();
            let free = d.capacity_bytes.saturating_sub(allocated);
            if best.is_none_or(|(_, f)| free > f) {
                best = Some((d, free));
            }
        }
        match best {
            Some((d, free)) if free >= need => Ok(SourceMeta {
                v: FORMAT_VERSION,
                name: spec.source.clone(),
                size_bytes: size,
                block_size: spec.geometry.block_size,
                disk: d.path.clone(),
                replica_alloc_bytes: replica,
                points_alloc_bytes: points,
                created_ms: bulwark_common::time::now_ms(),
                retention: policy.retention,
                applied_replica_alloc: policy.replica_alloc_bytes,
                applied_points_alloc: policy.points_alloc_bytes,
                kind: SourceKind::Volume,
                keep_after_ms: 0,
                lock: None,
            }),
            other => Err(StoreError::NoSpace {
                source_name: spec.source.to_string(),
                need,
                free: other.map_or(0, |(_, f)| f),
            }),
        }
    }
}
