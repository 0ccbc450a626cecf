//! Reading before-images and old digests, writing the replica and digests at a queue
//! depth.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bulwark_common::block::{
    DIGEST_LEN, DIRECT_ALIGN, Digest, DirectWriter, Geometry, aligned_buffer, open_direct,
    read_direct_at,
};
use bulwark_common::failpoint;
use bytes::Bytes;

use crate::uring::{self, Ring};

use super::*;

/// Threads that read before-images, and that write the replica, at once: the queue
/// depth scattered blocks need to keep a disk busy.
pub(super) const IO_THREADS: usize = 8;

pub(super) struct TxnFiles {
    pub(super) replica: File,
    /// New bytes go to the replica with `O_DIRECT` where the file system allows it,
    /// from up to [`IO_THREADS`] threads at once (made as needed).
    pub(super) writers: Vec<DirectWriter>,
    /// Replica writes at a queue depth from the writing thread: an io_uring and the
    /// replica opened with `O_DIRECT` for writing (none where the kernel or the file
    /// system refuses, and in unit tests, which need the writes in order: see
    /// [`write_replica`]).
    pub(super) uring: Option<(Ring, File)>,
    /// Aligned buffers of those writes, kept from group to group (at most
    /// [`uring::DEPTH`]).
    pub(super) bounce: Vec<bytes::BytesMut>,
    pub(super) digests: File,
    /// Where the digests start in `digests` (after its header, if it has one).
    pub(super) digests_base: u64,
    /// A settle's: the delta its before-images go to.
    pub(super) delta: Option<DeltaAppender>,
    /// A sync's (every sync but a first one): the journal its blocks go to.
    pub(super) journal: Option<DeltaAppender>,
    pub(super) dir: PathBuf,
}

/// Reads the old digests (a sync's, on a thread of its own ahead of the thread that
/// journals the batches, [`SyncTxn::apply_prepared`]) and, for a settle, the
/// before-images of batches. Safe to run ahead: a sync writes each block at most
/// once, and a batch that repeats a block is refused before anything of it is
/// written; a settle reads each group just before it applies it.
pub struct BeforeImageReader {
    pub(super) keeps_deltas: bool,
    /// Whether the old bytes are read too (a settle), or only the old digests (a
    /// sync: its space check needs no more).
    pub(super) read_images: bool,
    pub(super) replica: File,
    pub(super) direct: Option<File>,
    pub(super) digests: File,
    /// Where the digests start in `digests` (after its header, if it has one).
    pub(super) digests_base: u64,
    pub(super) replica_path: PathBuf,
    pub(super) digests_path: PathBuf,
    pub(super) geometry: Geometry,
    /// A sync's: how its new blocks are compressed for the journal, here, on the
    /// reader's thread, so that the thread that appends them only writes (a
    /// settle's reader compresses nothing: its before-images are compressed as
    /// they are appended to the delta).
    pub(super) compression: Compression,
}

/// A batch with what its before-images need (from [`BeforeImageReader::prepare`]).
#[derive(Debug)]
pub struct Prepared {
    pub extents: Vec<VerifiedExtent>,
    /// Blocks that need a before-image, with their old digests.
    pub(super) recs: Vec<(u64, Digest)>,
    /// Their old bytes (`None`: never written, or not read: see
    /// [`BeforeImageReader`]).
    pub(super) old: Vec<Option<Bytes>>,
    /// On the first batch of a round of reads (see
    /// [`BeforeImageReader::prepare_many`]): how long the round took.
    pub(super) round: Option<std::time::Duration>,
    /// A sync's: per block of `extents`, in order, its zstd frame for the
    /// journal when one was made and is smaller (`None`: zeros, or stored raw).
    pub(super) frames: Vec<Option<Vec<u8>>>,
}

impl Prepared {
    /// Payload bytes of the batch.
    pub fn bytes(&self) -> usize {
        self.extents.iter().map(|e| e.data.len()).sum()
    }
}

impl BeforeImageReader {
    /// Reads which blocks of `extents` change content, and their old bytes.
    pub fn prepare(&self, extents: Vec<VerifiedExtent>) -> Result<Prepared> {
        let mut out = self.prepare_many(vec![extents])?;
        out.pop()
            .ok_or_else(|| StoreError::Meta("no prepared batch".into()))
    }

    /// [`prepare`](Self::prepare) for several batches at once, in order: the
    /// before-images of all of them are read together, so that the disk sees
    /// [`IO_THREADS`] reads at a time across batch boundaries instead of draining
    /// its queue at the end of every batch (scattered blocks: each batch holds only
    /// about 16 of them). The time taken is counted on the first batch.
    pub fn prepare_many(&self, batches: Vec<Vec<VerifiedExtent>>) -> Result<Vec<Prepared>> {
        let started = std::time::Instant::now();
        let mut recs: Vec<Vec<(u64, Digest)>> = Vec::with_capacity(batches.len());
        for extents in &batches {
            recs.push(self.changing_blocks(extents)?);
        }
        let all: Vec<(u64, Digest)> = recs.iter().flatten().copied().collect();
        let mut old = if self.read_images {
            read_before_images(
                &self.replica,
                self.direct.as_ref(),
                &self.replica_path,
                self.geometry,
                &all,
            )?
        } else {
            vec![None; all.len()]
        }
        .into_iter();
        let read_time = started.elapsed();
        let mut frames: Vec<Vec<Option<Vec<u8>>>> =
            batches.iter().map(|e| self.journal_frames(e)).collect();
        frames.reverse();
        Ok(batches
            .into_iter()
            .zip(recs)
            .enumerate()
            .map(|(i, (extents, recs))| Prepared {
                extents,
                old: old.by_ref().take(recs.len()).collect(),
                recs,
                round: (i == 0).then_some(read_time),
                frames: frames.pop().unwrap_or_default(),
            })
            .collect())
    }

    /// The journal frames of a sync's `extents` (see [`Prepared::frames`]); none
    /// for a settle, a first sync or with compression off.
    fn journal_frames(&self, extents: &[VerifiedExtent]) -> Vec<Option<Vec<u8>>> {
        if self.read_images || !self.keeps_deltas || self.compression == Compression::Off {
            return Vec::new();
        }
        let bs = self.geometry.block_size as usize;
        extents
            .iter()
            .flat_map(|e| e.data.chunks(bs))
            .map(|data| {
                let mut frame = Vec::new();
                (!bulwark_common::block::is_zero(data)
                    && compress::compress_block(self.compression, data, &mut frame))
                .then_some(frame)
            })
            .collect()
    }

    /// The blocks of `extents` whose content changes, with their old digests: those
    /// need a before-image (none when the source keeps no deltas).
    pub(super) fn changing_blocks(&self, extents: &[VerifiedExtent]) -> Result<Vec<(u64, Digest)>> {
        let mut recs: Vec<(u64, Digest)> = Vec::new();
        if !self.keeps_deltas {
            return Ok(recs);
        }
        for e in extents {
            let n = e.digests.len() as u64;
            let mut old = vec![0u8; n as usize * DIGEST_LEN];
            read_at_full(
                &self.digests,
                &mut old,
                self.digests_base + e.first_block * DIGEST_LEN as u64,
                &self.digests_path,
            )?;
            for (i, d) in old.chunks_exact(DIGEST_LEN).enumerate() {
                let digest = Digest::from_slice(d).unwrap_or(Digest::UNWRITTEN);
                if digest != Digest::UNWRITTEN && e.digests.get(i) == Some(&digest) {
                    // The block keeps its content (a consistency check repairing
                    // a damaged replica block, or a rewrite with the same bytes):
                    // the previous point reads the same bytes from the replica,
                    // so no before-image is kept, and a damaged one never is.
                    continue;
                }
                recs.push((e.first_block + i as u64, digest));
            }
        }
        Ok(recs)
    }
}

/// Writes the digests of `extents` into the digests file.
pub(super) fn write_digests(
    digests: &File,
    base: u64,
    extents: &[&VerifiedExtent],
    path: &Path,
) -> Result<()> {
    for e in extents {
        let mut d = Vec::with_capacity(e.digests.len() * DIGEST_LEN);
        for digest in &e.digests {
            d.extend_from_slice(&digest.0);
        }
        digests
            .write_all_at(&d, base + e.first_block * DIGEST_LEN as u64)
            .map_err(io("write", path))?;
    }
    Ok(())
}

/// The current bytes of each block of `recs` that was ever written (`None` for one
/// that reads as zeros because it never was). Runs of consecutive blocks are read
/// with one read each, and the runs are read by a few threads at once: scattered
/// blocks are as many random reads, which a disk serves faster in parallel.
pub(super) fn read_before_images(
    replica: &File,
    direct: Option<&File>,
    path: &Path,
    geometry: Geometry,
    recs: &[(u64, Digest)],
) -> Result<Vec<Option<Bytes>>> {
    // Runs: (index of the first rec, number of recs), each of written blocks.
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, (block, digest)) in recs.iter().enumerate() {
        if *digest == Digest::UNWRITTEN {
            continue;
        }
        match runs.last_mut() {
            Some((first, n)) if *first + *n == i && recs[i - 1].0 + 1 == *block => *n += 1,
            _ => runs.push((i, 1)),
        }
    }
    // The replica is written with O_DIRECT, so its blocks are rarely in the page
    // cache: read them the same way (no readahead of neighbours nobody asked for, and
    // nothing evicted), falling back to the page cache where direct I/O is refused.
    let read_run = |&(first, n): &(usize, usize)| -> Result<(usize, Bytes)> {
        let start = geometry.offset_of(recs[first].0);
        let end = geometry
            .offset_of(recs[first + n - 1].0 + 1)
            .min(geometry.size_bytes);
        let len = (end - start) as usize;
        if let Some(d) = direct {
            match read_direct_at(d, start, len) {
                Ok(b) => return Ok((first, b)),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(io("read", path)(e)),
            }
        }
        let mut data = vec![0u8; len];
        read_at_full(replica, &mut data, start, path)?;
        Ok((first, Bytes::from(data)))
    };
    let threads = IO_THREADS.min(runs.len());
    // Threads, not the writer's io_uring: reads at a deeper queue delayed the
    // writer's delta appends and fdatasyncs behind them on a shared disk, for no
    // gain overall (see `uring`).
    let results: Vec<Result<(usize, Bytes)>> = if threads < 2 {
        runs.iter().map(read_run).collect()
    } else {
        // Runs dealt out in turn, so that every thread has a similar share and the
        // disk sees `threads` reads at once.
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let runs = &runs;
                    let read_run = &read_run;
                    scope.spawn(move || {
                        runs.iter()
                            .skip(t)
                            .step_by(threads)
                            .map(read_run)
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| {
                    h.join().unwrap_or_else(|_| {
                        vec![Err(StoreError::Meta(
                            "a before-image reader panicked".into(),
                        ))]
                    })
                })
                .collect()
        })
    };
    let mut out: Vec<Option<Bytes>> = vec![None; recs.len()];
    let bs = geometry.block_size as usize;
    for r in results {
        let (first, data) = r?;
        for k in 0..data.len().div_ceil(bs) {
            out[first + k] = Some(data.slice(k * bs..((k + 1) * bs).min(data.len())));
        }
    }
    Ok(out)
}

/// Writes a group of extents into the replica at a queue depth when there are
/// several (scattered blocks need one, and a full sync's megabyte extents gain from
/// it too): through the sync's io_uring ([`write_replica_ring`]), else from several
/// threads, each with its own `O_DIRECT` bounce buffer. Unit tests write in order
/// on the calling thread, so that a simulated crash can fall between any two
/// extents.
pub(super) fn write_replica(
    files: &mut TxnFiles,
    geometry: Geometry,
    extents: &[&VerifiedExtent],
    path: &Path,
    written: &dyn Fn() -> Result<()>,
) -> Result<()> {
    failpoint::io("node-io-replica-write").map_err(io("write", path))?;
    if extents.len() > 1 && write_replica_ring(files, geometry, extents, path)? {
        return Ok(());
    }
    let threads = if cfg!(test) {
        1
    } else {
        IO_THREADS.min(extents.len()).max(1)
    };
    while files.writers.len() < threads {
        files.writers.push(DirectWriter::open(path, "replica"));
    }
    let replica = &files.replica;
    if threads == 1 {
        for e in extents {
            files.writers[0]
                .write_at(replica, &e.data, geometry.offset_of(e.first_block))
                .map_err(io("write", path))?;
            written()?;
        }
        return Ok(());
    }
    let results: Vec<std::io::Result<()>> = std::thread::scope(|scope| {
        let handles: Vec<_> = files.writers[..threads]
            .iter_mut()
            .enumerate()
            .map(|(t, w)| {
                scope.spawn(move || {
                    for e in extents.iter().skip(t).step_by(threads) {
                        w.write_at(replica, &e.data, geometry.offset_of(e.first_block))?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("a replica writer panicked")))
            })
            .collect()
    });
    results
        .into_iter()
        .try_for_each(|r| r.map_err(io("write", path)))
}

/// [`write_replica`] through the sync's io_uring: the aligned part of each extent
/// copied into an aligned buffer as the queue has room (at most [`uring::DEPTH`]
/// buffers, kept for the next group) and written at that queue depth; a short
/// tail (the volume's last block) through the page cache. Returns false where
/// there is no ring, and where the file system refuses direct I/O: then the ring
/// is dropped, and threads write the whole group (again, where the ring had
/// written part of it: the same bytes at the same places).
pub(super) fn write_replica_ring(
    files: &mut TxnFiles,
    geometry: Geometry,
    extents: &[&VerifiedExtent],
    path: &Path,
) -> Result<bool> {
    let Some((ring, direct)) = files.uring.as_mut() else {
        return Ok(false);
    };
    // (extent, offset, length of its aligned part) of each extent that has one.
    let mut parts = Vec::with_capacity(extents.len());
    let mut tails = Vec::new();
    for e in extents {
        let offset = geometry.offset_of(e.first_block);
        let aligned = if offset.is_multiple_of(DIRECT_ALIGN as u64) {
            e.data.len() / DIRECT_ALIGN * DIRECT_ALIGN
        } else {
            0
        };
        if aligned < e.data.len() {
            tails.push((offset + aligned as u64, &e.data[aligned..]));
        }
        if aligned > 0 {
            parts.push((e, offset, aligned));
        }
    }
    let pool = std::cell::RefCell::new(std::mem::take(&mut files.bounce));
    let r = ring.run_with(
        direct.as_fd(),
        true,
        parts.len(),
        |i| {
            let (e, offset, len) = parts[i];
            let mut pool = pool.borrow_mut();
            let mut buf = match pool.iter().position(|b| b.len() >= len) {
                Some(k) => pool.swap_remove(k),
                None => aligned_buffer(len),
            };
            buf[..len].copy_from_slice(&e.data[..len]);
            uring::Job { offset, buf, len }
        },
        |_, job| {
            let mut pool = pool.borrow_mut();
            if pool.len() < uring::DEPTH && !job.buf.is_empty() {
                pool.push(job.buf);
            }
        },
    );
    files.bounce = pool.into_inner();
    match r {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::info!(path = %path.display(), "direct writes refused through io_uring; writing with threads");
            files.uring = None;
            files.bounce = Vec::new();
            return Ok(false);
        }
        Err(e) => return Err(io("write", path)(e)),
    }
    for (offset, data) in tails {
        files
            .replica
            .write_all_at(data, offset)
            .map_err(io("write", path))?;
    }
    Ok(true)
}

impl Store {
    /// A reader of before-images of the source's replica as it stands.
    pub(super) fn before_image_reader(
        &self,
        dir: &Path,
        geometry: Geometry,
    ) -> Result<BeforeImageReader> {
        let replica_path = dir.join("replica");
        let digests_path = dir.join("digests");
        Ok(BeforeImageReader {
            keeps_deltas: true,
            read_images: true,
            replica: File::open(&replica_path).map_err(io("open", &replica_path))?,
            direct: open_direct(&replica_path, true),
            digests_base: check_file(&digests_path, DataFile::Digests)?,
            digests: File::open(&digests_path).map_err(io("open", &digests_path))?,
            replica_path,
            digests_path,
            geometry,
            compression: Compression::Off,
        })
    }
}
