//! Open and recovery: what a crash left behind is undone or finished at open.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;

use bulwark_common::block::{DIGEST_LEN, Geometry};
use bulwark_common::name::SourceName;

use super::*;

/// The stored sources whose name, record or data files this node refuses (see
/// `Store::refused` and `header.rs`).
pub(super) fn refused_sources(meta: &dyn MetaStore) -> Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    for (k, v) in meta.scan(Tree::Sources, b"")? {
        let key = String::from_utf8_lossy(&k).to_string();
        let why = match SourceName::parse(key.as_str()) {
            Err(e) => Some(e.to_string()),
            Ok(_) => match decode::<SourceMeta>(&v) {
                Err(e) => Some(format!("its record cannot be read: {e}")),
                Ok(m) if m.name != key => {
                    Some(format!("its record names another source ({})", m.name))
                }
                // A data file of a newer format, or not of its kind.
                Ok(m) => refused_files(&m),
            },
        };
        if let Some(why) = why {
            tracing::error!(source = %bulwark_common::text::escape(&key),
                "stored data source refused: {why}; its files are left alone, every other source is served");
            out.insert(key, why);
        }
    }
    Ok(out)
}

impl Store {
    /// Opens (or creates) the store and rolls back any sync a crash interrupted.
    pub fn open(data_dir: &Path, disks: Vec<PoolDisk>) -> Result<Store> {
        Store::open_with(data_dir, disks, PoolPolicy::default())
    }

    /// [`Store::open`] with a pool policy.
    pub fn open_with(data_dir: &Path, disks: Vec<PoolDisk>, policy: PoolPolicy) -> Result<Store> {
        std::fs::create_dir_all(data_dir).map_err(io("create", data_dir))?;
        for d in &disks {
            // A pool disk must exist already: creating a missing mount point would
            // quietly fill whatever file system lies beneath it.
            if !d.path.is_dir() {
                return Err(StoreError::MissingDisk(d.path.clone()));
            }
            std::fs::create_dir_all(d.path.join("bulwark")).map_err(io("create", &d.path))?;
        }
        let meta = SledMeta::open(&data_dir.join("meta"))?;
        let refused = std::sync::Arc::new(refused_sources(&meta)?);
        let store = Store {
            refused,
            meta: std::sync::Arc::new(meta),
            settle_locks: Default::default(),
            settle_failed: Default::default(),
            disks: std::sync::Arc::new(disks),
            policy,
            views: Default::default(),
        };
        for (k, v) in store.meta.scan(Tree::Pending, b"")? {
            let name = String::from_utf8_lossy(&k).to_string();
            if store.refused.contains_key(&name) {
                continue;
            }
            let pending: Pending = decode(&v)?;
            tracing::warn!(source = %name, point = pending.new_point,
                "rolling back a sync that did not commit");
            store.roll_back(&name, &pending)?;
        }
        // Settles a crash (or an error) interrupted: undo what was applied, then
        // settle again from the journal. A settle that fails is kept as the
        // source's error; the node serves the other sources.
        let settles: Vec<(String, Settle)> = store
            .meta
            .scan(Tree::Settle, b"")?
            .into_iter()
            .map(|(k, v)| Ok((String::from_utf8_lossy(&k).to_string(), decode(&v)?)))
            .collect::<Result<_>>()?;
        for (name, rec) in settles {
            if store.refused.contains_key(&name) {
                continue;
            }
            tracing::warn!(source = %name, point = rec.point,
                "settling a committed point a crash interrupted");
            // The settle writes back what a partial settle applied first.
            match store.settle(&name) {
                Ok(()) => {}
                Err(e @ StoreError::Crashed(_)) => return Err(e),
                Err(e) => tracing::error!(source = %name, point = rec.point, "{e}"),
            }
        }
        for s in store.all_sources()? {
            match s.kind {
                SourceKind::Volume => store.remove_orphans(&s)?,
                SourceKind::Log => store.recover_logs(&s)?,
            }
        }
        // Imports a crash interrupted: the coordinator starts the move again.
        for d in store.disks.iter() {
            let Ok(entries) = std::fs::read_dir(d.path.join("bulwark")) else {
                continue;
            };
            for e in entries.flatten() {
                let path = e.path();
                if path.extension().is_some_and(|x| x == "import") {
                    tracing::warn!(path = %path.display(), "removing an import a crash interrupted");
                    std::fs::remove_dir_all(&path).map_err(io("remove", &path))?;
                }
            }
        }
        Ok(store)
    }

    /// Deletes what an interrupted prune left behind: a merge's temporary file, and
    /// delta files of points that no longer exist (or of the newest point, which has
    /// none once no sync is pending).
    pub(super) fn remove_orphans(&self, meta: &SourceMeta) -> Result<()> {
        let journal = journal_path(&meta.dir());
        if self.meta.get(Tree::Settle, meta.name.as_bytes())?.is_none() && journal.exists() {
            tracing::info!(source = %meta.name, "removing the journal of a settled point");
            std::fs::remove_file(&journal).map_err(io("remove", &journal))?;
            fsync_dir(&meta.dir())?;
        }
        let dir = meta.dir().join("deltas");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(());
        };
        let points = self.points(&meta.name)?;
        let newest = points.last().map_or(0, |p| p.id);
        let keep: std::collections::HashSet<String> = points
            .iter()
            .filter(|p| p.id != newest)
            .map(|p| format!("{:020}.delta", p.id))
            .collect();
        let mut removed = false;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !keep.contains(&name) {
                tracing::info!(source = %meta.name, file = %name, "removing a file an interrupted prune left");
                std::fs::remove_file(e.path()).map_err(io("remove", &e.path()))?;
                removed = true;
            }
        }
        if removed {
            fsync_dir(&dir)?;
        }
        Ok(())
    }

    /// Undoes an uncommitted sync (see the module docs).
    pub(super) fn roll_back(&self, name: &str, pending: &Pending) -> Result<()> {
        let dir = source_dir(&pending.disk, &SourceName::parse(name)?);
        if pending.fresh {
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(io("remove", &dir))?;
            }
            self.meta
                .apply(Batch::default().remove(Tree::Sources, name))?;
        } else {
            // The replica was never touched: the journal goes.
            let journal = journal_path(&dir);
            if journal.exists() {
                std::fs::remove_file(&journal).map_err(io("remove", &journal))?;
                boundary("rollback: journal removed")?;
                fsync_dir(&dir)?;
            }
            // A sync of an older node wrote into the replica behind its
            // before-images.
            let old = pending.new_point - 1;
            if delta_path(&dir, old).exists() {
                let meta = self.source(name)?.ok_or_else(|| {
                    StoreError::Meta(format!("pending sync of unknown source {name}"))
                })?;
                self.undo_delta(name, &dir, meta.geometry(), old)?;
            }
            tracing::info!(
                source = name,
                point = old,
                "a sync that did not commit was dropped"
            );
        }
        self.meta
            .apply(Batch::default().remove(Tree::Pending, name))?;
        self.meta.flush()?;
        Ok(())
    }

    /// Writes every valid record of `deltas/<old>.delta` (the before-images a partial
    /// settle, or an older node's sync, made durable before it overwrote their
    /// blocks) back into the replica and digests, makes both durable and deletes the
    /// delta: the replica is point `old` again. Returns the blocks written back.
    pub(super) fn undo_delta(
        &self,
        name: &str,
        dir: &Path,
        geometry: Geometry,
        old: u64,
    ) -> Result<u64> {
        let delta = delta_path(dir, old);
        if !delta.exists() {
            return Ok(0);
        }
        let replica_path = dir.join("replica");
        let digests_path = dir.join("digests");
        let replica = open_rw(&replica_path, Open::Existing)?;
        let digests = open_rw(&digests_path, Open::Existing)?;
        let digests_base = content_start(&digests, &digests_path, DataFile::Digests)?;
        let mut restored = 0u64;
        let mut reader = DeltaReader::open(&delta, geometry)?;
        while let Some(rec) = reader.next_record(true)? {
            let offset = geometry.offset_of(rec.block);
            let len = geometry.block_len(rec.block) as usize;
            match &rec.data {
                Some(d) => replica
                    .write_all_at(d, offset)
                    .map_err(io("write", &replica_path))?,
                None => replica
                    .write_all_at(&vec![0u8; len], offset)
                    .map_err(io("write", &replica_path))?,
            }
            digests
                .write_all_at(&rec.digest.0, digests_base + rec.block * DIGEST_LEN as u64)
                .map_err(io("write", &digests_path))?;
            restored += 1;
            boundary("undo: block restored")?;
        }
        make_durable(&replica, &digests, dir)?;
        boundary("undo: replica durable")?;
        std::fs::remove_file(&delta).map_err(io("remove", &delta))?;
        boundary("undo: delta removed")?;
        fsync_dir(&dir.join("deltas"))?;
        tracing::info!(
            source = name,
            point = old,
            blocks = restored,
            "replica written back to point"
        );
        Ok(restored)
    }
}
