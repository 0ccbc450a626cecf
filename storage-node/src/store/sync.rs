//! The sync transaction: a point received into the replica (first sync) or the journal.

use bulwark_common::block::{DIGEST_LEN, Digest, Geometry, is_zero, open_direct};
use bulwark_common::failpoint;
use bulwark_common::name::SourceName;
use bulwark_common::point::{Consistency, PointKind};

use crate::uring::Ring;

use super::*;

/// What a sync is about to write.
#[derive(Debug, Clone)]
pub struct SyncSpec {
    pub source: SourceName,
    pub geometry: Geometry,
    /// The point the agent compared against (0 = none).
    pub base_point: u64,
    pub consistency: Consistency,
    pub kind: PointKind,
    /// The coordinator's policy for the source; `None` keeps what the node has.
    pub policy: Option<SourcePolicy>,
}

/// A sync being applied. Drop without [`SyncTxn::commit`] leaves the pending record;
/// call [`SyncTxn::abort`] to roll back at once.
pub struct SyncTxn {
    pub(super) store: Store,
    pub(super) spec: SyncSpec,
    pub(super) meta: SourceMeta,
    pub(super) fresh: bool,
    pub(super) new_point: u64,
    pub(super) files: Option<TxnFiles>,
    /// One bit per block: already written by this sync.
    pub(super) touched: Vec<u64>,
    pub(super) blocks: u64,
    pub(super) bytes: u64,
    /// Bytes of before-images the previous point's delta will hold once this sync
    /// is settled (from the old digests of the changing blocks).
    pub(super) delta_len: u64,
    /// Bytes written to the journal.
    pub(super) journal_len: u64,
    /// Bytes the committed points' deltas hold.
    pub(super) points_used: u64,
    pub(super) zero: ZeroDigests,
    pub(super) times: ApplyTimes,
}

/// Where a sync's apply time went (logged with the commit).
#[derive(Debug, Default, Clone, Copy)]
pub struct ApplyTimes {
    /// Reading old digests and before-images.
    pub before_images: std::time::Duration,
    /// Appending new blocks to the journal (the space check included).
    pub delta: std::time::Duration,
    /// Writing new bytes and digests.
    pub writes: std::time::Duration,
    /// Making the pending record durable and opening the sync's files.
    pub open: std::time::Duration,
    /// Rounds of before-image reads (each reads the batches waiting by then).
    pub read_rounds: u64,
    /// Groups written (each one journal append).
    pub groups: u64,
}

/// One verified extent: its first block, bytes and per-block digests.
#[derive(Debug, Clone)]
pub struct VerifiedExtent {
    pub first_block: u64,
    pub data: bytes::Bytes,
    pub digests: Vec<Digest>,
}

impl SyncTxn {
    /// The point this sync will create.
    pub fn new_point(&self) -> u64 {
        self.new_point
    }

    /// Sets the consistency the new point records (the agent's final word).
    pub fn set_consistency(&mut self, c: Consistency) {
        self.spec.consistency = c;
    }

    /// Payload bytes applied so far.
    pub fn applied_bytes(&self) -> u64 {
        self.bytes
    }

    /// Where the apply time has gone so far.
    pub fn times(&self) -> ApplyTimes {
        self.times
    }

    pub(super) fn open_files(&mut self) -> Result<()> {
        if self.files.is_some() {
            return Ok(());
        }
        let opening = std::time::Instant::now();
        let r = self.open_files_now();
        self.times.open = opening.elapsed();
        r
    }

    /// The sync's pending record.
    fn pending(&self) -> Pending {
        Pending {
            v: FORMAT_VERSION,
            new_point: self.new_point,
            fresh: self.fresh,
            disk: self.meta.disk.clone(),
            journal: !self.fresh,
        }
    }

    pub(super) fn open_files_now(&mut self) -> Result<()> {
        let store = &self.store;
        let name = &self.spec.source;
        let dir = self.meta.dir();
        let pending = self.pending();
        // 1. The pending record (and, for a new source, its meta) is durable before
        //    any data file changes.
        let meta_bytes = encode(&self.meta)?;
        let pending_bytes = encode(&pending)?;
        store.meta.apply(
            Batch::default()
                .put(Tree::Sources, name.as_bytes(), &meta_bytes)
                .put(Tree::Pending, name.as_bytes(), &pending_bytes),
        )?;
        boundary("sync: pending written")?;
        store.meta.flush()?;
        boundary("sync: pending durable")?;

        std::fs::create_dir_all(dir.join("deltas")).map_err(io("create", &dir))?;
        let replica_path = dir.join("replica");
        let digests_path = dir.join("digests");
        let replica = open_rw(&replica_path, Open::Create)?;
        let digests = open_rw(&digests_path, Open::Create)?;
        let geometry = self.spec.geometry;
        if self.fresh {
            replica
                .set_len(geometry.size_bytes)
                .map_err(io("size", &replica_path))?;
            DataFile::Digests.write_header(&digests, &digests_path)?;
            digests
                .set_len(FILE_HEADER_LEN + geometry.block_count() * DIGEST_LEN as u64)
                .map_err(io("size", &digests_path))?;
        }
        let digests_base = content_start(&digests, &digests_path, DataFile::Digests)?;
        // A first sync writes into the replica; every later one into the journal,
        // and the replica stays as it is until the point is settled.
        let journal = if self.fresh {
            None
        } else {
            let p = journal_path(&dir);
            self.journal_len = FILE_HEADER_LEN;
            Some(DeltaAppender::create(
                open_rw(&p, Open::Truncate)?,
                &p,
                DataFile::Journal,
                // The blocks come compressed from the before-image reader's
                // thread (`Prepared::frames`): the appender only writes.
                Compression::Off,
            )?)
        };
        fsync_dir(&dir)?;
        boundary("sync: files created")?;
        self.touched = vec![0u64; geometry.block_count().div_ceil(64) as usize];
        let uring = if cfg!(test) || !self.fresh {
            None
        } else {
            Ring::try_new().zip(open_direct(&replica_path, false))
        };
        self.files = Some(TxnFiles {
            replica,
            writers: Vec::new(),
            uring,
            bounce: Vec::new(),
            digests,
            digests_base,
            delta: None,
            journal,
            dir,
        });
        Ok(())
    }

    /// A reader of the old digests of this sync's changing blocks (what its space
    /// check needs; the before-images themselves are read by the settle) that can
    /// run on another thread, ahead of [`SyncTxn::apply_prepared`]. Opens the sync's
    /// files (writing the pending record) if that has not happened yet.
    pub fn before_images(&mut self) -> Result<BeforeImageReader> {
        self.open_files()?;
        let Some(files) = self.files.as_ref() else {
            return Err(StoreError::Meta("sync files not open".into()));
        };
        let replica_path = files.dir.join("replica");
        let digests_path = files.dir.join("digests");
        Ok(BeforeImageReader {
            keeps_deltas: files.journal.is_some(),
            read_images: false,
            replica: files
                .replica
                .try_clone()
                .map_err(io("reopen", &replica_path))?,
            // A sync reads no before-images (see `read_images`).
            direct: None,
            digests_base: files.digests_base,
            digests: files
                .digests
                .try_clone()
                .map_err(io("reopen", &digests_path))?,
            replica_path,
            digests_path,
            geometry: self.spec.geometry,
            compression: self.store.policy.journal_compression,
        })
    }

    /// Applies one batch of verified extents (see the module docs for the order of
    /// writes). Blocking.
    pub fn apply(&mut self, extents: &[VerifiedExtent]) -> Result<()> {
        if extents.is_empty() {
            return Ok(());
        }
        let prepared = self.before_images()?.prepare(extents.to_vec())?;
        self.apply_prepared(vec![prepared])
    }

    /// Applies prepared batches as one group: their before-images appended to the
    /// delta and made durable, then the new bytes written. Blocking.
    pub fn apply_prepared(&mut self, group: Vec<Prepared>) -> Result<()> {
        if group.iter().all(|p| p.extents.is_empty()) {
            return Ok(());
        }
        self.open_files()?;
        let geometry = self.spec.geometry;
        for e in group.iter().flat_map(|p| &p.extents) {
            for b in e.first_block..e.first_block + e.digests.len() as u64 {
                let (w, bit) = ((b / 64) as usize, b % 64);
                if self.touched[w] & (1 << bit) != 0 {
                    return Err(StoreError::DuplicateBlock { block: b });
                }
                self.touched[w] |= 1 << bit;
            }
        }
        let Some(files) = self.files.as_mut() else {
            return Err(StoreError::Meta("sync files not open".into()));
        };
        let replica_path = files.dir.join("replica");
        let digests_path = files.dir.join("digests");
        for t in group.iter().filter_map(|p| p.round) {
            self.times.before_images += t;
            self.times.read_rounds += 1;
        }
        self.times.groups += 1;
        let extents: Vec<&VerifiedExtent> = group.iter().flat_map(|p| &p.extents).collect();
        if let Some(journal) = files.journal.as_mut() {
            // 2. The space the before-images will take in the previous point's
            //    delta once settled, decided now: a block whose old digest is
            //    unwritten or zeros needs no bytes.
            let appending = std::time::Instant::now();
            let added: u64 = group
                .iter()
                .flat_map(|p| &p.recs)
                .map(|(block, old)| {
                    let has_data = *old != Digest::UNWRITTEN && *old != self.zero.of(*block);
                    let data = if has_data {
                        geometry.block_len(*block)
                    } else {
                        0
                    };
                    (HEADER_LEN + CHECK_LEN) as u64 + data
                })
                .sum();
            let need = self.points_used + self.delta_len + added;
            if need > self.meta.points_alloc_bytes {
                let more = self.delta_len + added;
                make_room(
                    &self.store,
                    &mut self.meta,
                    &mut self.points_used,
                    more,
                    self.new_point - 1,
                )?;
            }
            self.delta_len += added;
            // The new blocks, with their new digests, appended to the journal (made
            // durable at commit).
            let bs = geometry.block_size as usize;
            let blocks = extents.iter().flat_map(|e| {
                e.digests.iter().enumerate().map(move |(i, d)| {
                    let data = &e.data[i * bs..((i + 1) * bs).min(e.data.len())];
                    (e.first_block + i as u64, *d, data)
                })
            });
            // One frame per block, in the same order (none past the end: raw).
            let mut frames = group
                .iter()
                .flat_map(|p| p.frames.iter().map(Option::as_deref))
                .chain(std::iter::repeat(None));
            let records = blocks.map(|(block, digest, data)| {
                let frame = frames.next().flatten();
                let data = (!is_zero(data)).then_some(data);
                (
                    block,
                    digest,
                    data,
                    frame,
                    geometry.block_len(block) as usize,
                )
            });
            let appended = journal
                .append(self.journal_len, records, None)
                .map_err(io("write", &journal.path))?;
            self.journal_len += appended.stored;
            boundary("sync: journal written")?;
            self.times.delta += appending.elapsed();
        } else {
            // A first sync: straight into the replica.
            failpoint::hit("node-before-replica-write");
            let writing = std::time::Instant::now();
            write_replica(files, geometry, &extents, &replica_path, &|| {
                boundary("sync: replica written")
            })?;
            write_digests(&files.digests, files.digests_base, &extents, &digests_path)?;
            self.times.writes += writing.elapsed();
        }
        for e in extents {
            self.blocks += e.digests.len() as u64;
            self.bytes += e.data.len() as u64;
        }
        // After each group of batches (see the service's applier).
        failpoint::hit("node-after-batch");
        Ok(())
    }

    /// Makes the sync durable and records the new point. Blocking. A first sync is
    /// in the replica already; a later one is in the journal, and is committed with
    /// a `settle` record: [`Store::settle`] then applies it to the replica (the
    /// service does that after it acknowledged the point).
    pub fn commit(mut self) -> Result<PointMeta> {
        // A sync that changed nothing still makes a point: the agent asked for one.
        self.open_files()?;
        let Some(files) = self.files.take() else {
            return Err(StoreError::Meta("sync files not open".into()));
        };
        failpoint::hit("node-before-commit");
        let durable = match &files.journal {
            Some(journal) => failpoint::io("node-io-journal-fsync")
                .and_then(|()| journal.file.sync_data())
                .map_err(io("fsync", &journal.path))
                .and_then(|()| boundary("commit: journal durable")),
            None => make_durable(&files.replica, &files.digests, &files.dir)
                .and_then(|()| boundary("commit: data durable")),
        };
        if let Err(e) = durable {
            // Rolled back at once, as `abort` does (the caller has no transaction
            // left to abort): else the pending record would keep the journal on
            // the disk until the source's next sync. Not after a simulated crash.
            if !matches!(e, StoreError::Crashed(_)) {
                drop(files);
                if let Err(u) = self.store.roll_back(&self.spec.source, &self.pending()) {
                    tracing::error!(source = %self.spec.source, "rolling back the sync whose commit failed: {u}");
                }
            }
            return Err(e);
        }
        let store = &self.store;
        let name = self.spec.source.clone();
        let point = PointMeta {
            v: FORMAT_VERSION,
            id: self.new_point,
            created_ms: bulwark_common::time::now_ms(),
            consistency: self.spec.consistency,
            kind: self.spec.kind,
            blocks_changed: self.blocks,
            bytes_changed: self.bytes,
            delta: None,
            damaged: Vec::new(),
            files_changed: 0,
            log_stored_bytes: None,
        };
        let settle = files.journal.as_ref().map(|_| Settle {
            v: FORMAT_VERSION,
            point: self.new_point,
            disk: self.meta.disk.clone(),
        });
        let new_bytes = encode(&point)?;
        let settle_bytes = settle.as_ref().map(encode).transpose()?;
        let meta_bytes = encode(&self.meta)?;
        // 3. One transaction: the new point, its settle record, no pending, and the
        //    source's record (its allocation and retention).
        let mut batch = Batch::default();
        batch.put(Tree::Sources, name.as_bytes(), &meta_bytes).put(
            Tree::Points,
            point_key(&name, point.id),
            &new_bytes,
        );
        if let Some(b) = &settle_bytes {
            batch.put(Tree::Settle, name.as_bytes(), b);
        }
        batch.remove(Tree::Pending, name.as_bytes());
        store.meta.apply(&batch)?;
        boundary("commit: point written")?;
        store.meta.flush()?;
        boundary("commit: point durable")?;
        failpoint::hit("node-after-commit");
        Ok(point)
    }

    /// Rolls back everything this sync wrote. Blocking.
    pub fn abort(mut self) -> Result<()> {
        let Some(files) = self.files.take() else {
            return Ok(()); // nothing was written
        };
        drop(files);
        self.store.roll_back(&self.spec.source, &self.pending())
    }
}

impl Store {
    /// Starts a sync. Nothing on disk changes until [`SyncTxn::apply`].
    pub fn begin_sync(&self, spec: SyncSpec) -> Result<SyncTxn> {
        // The previous point is settled into the replica first.
        self.settled(&spec.source)?;
        // A sync that was dropped without commit or abort is undone first.
        if let Some(v) = self.meta.get(Tree::Pending, spec.source.as_bytes())? {
            let pending: Pending = decode(&v)?;
            self.roll_back(&spec.source, &pending)?;
        }
        let newest = self.newest_point(&spec.source)?;
        let newest_id = newest.as_ref().map_or(0, |p| p.id);
        if spec.base_point != newest_id {
            return Err(StoreError::BaseMismatch {
                source_name: spec.source.to_string(),
                base: spec.base_point,
                newest: newest_id,
            });
        }
        let existing = self.source(&spec.source)?;
        if let Some(m) = &existing
            && (m.size_bytes != spec.geometry.size_bytes
                || m.block_size != spec.geometry.block_size)
        {
            return Err(StoreError::GeometryChanged {
                source_name: spec.source.to_string(),
                stored: m.size_bytes,
                stored_block: m.block_size,
                size: spec.geometry.size_bytes,
                block: spec.geometry.block_size,
            });
        }
        let mut meta = match existing {
            Some(m) => {
                m.require_volume("a block sync")?;
                m
            }
            None => self.place(&spec)?,
        };
        if let Some(p) = &spec.policy {
            meta.apply_policy(p);
        }
        let points_used = self.points_used(&spec.source)?;
        let zero = ZeroDigests::new(spec.geometry);
        Ok(SyncTxn {
            store: self.clone(),
            fresh: newest.is_none(),
            new_point: newest_id + 1,
            spec,
            meta,
            files: None,
            touched: vec![0u64; 0],
            blocks: 0,
            bytes: 0,
            // The previous point's delta will hold its file header too.
            delta_len: if newest.is_none() { 0 } else { FILE_HEADER_LEN },
            journal_len: 0,
            points_used,
            zero,
            times: ApplyTimes::default(),
        })
    }
}
