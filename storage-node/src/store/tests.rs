//! Store tests: syncs, restores of every point, rollback after failures and crashes.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use bulwark_common::block::{Digest, Geometry};
use bulwark_common::point::{Consistency, PointKind};
use bulwark_common::retention::Retention;
use bytes::Bytes;

use super::*;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

const BS: u32 = 4096;

/// The blocks of a point as one buffer.
fn read_point_to_vec(store: &Store, name: &str, point: u64) -> Result<Vec<u8>> {
    let mut r = store.restore(name, point)?;
    let mut out = vec![0u8; r.geometry().size_bytes as usize];
    while let Some(item) = r.next_item()? {
        if let RestoreItem::Data { offset, data, .. } = item {
            out[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        }
    }
    Ok(out)
}

fn open(dir: &Path) -> Store {
    try_open(dir).expect("open store")
}

fn spec(size: u64, base: u64) -> SyncSpec {
    SyncSpec {
        source: "vol".parse().expect("name"),
        geometry: Geometry::new(size, BS).expect("geometry"),
        base_point: base,
        consistency: Consistency::Crash,
        kind: if base == 0 {
            PointKind::Full
        } else {
            PointKind::Incremental
        },
        policy: None,
    }
}

/// The extents of the blocks of `image` that differ from `old`, one extent per run.
fn diff_extents(old: &[u8], image: &[u8]) -> Vec<VerifiedExtent> {
    let g = Geometry::new(image.len() as u64, BS).expect("geometry");
    let mut runs: Vec<(u64, Vec<u8>, Vec<Digest>)> = Vec::new();
    for b in 0..g.block_count() {
        let (o, l) = (g.offset_of(b) as usize, g.block_len(b) as usize);
        let new = &image[o..o + l];
        if &old[o..o + l] == new {
            continue;
        }
        match runs.last_mut() {
            Some((first, data, digests)) if *first + digests.len() as u64 == b => {
                data.extend_from_slice(new);
                digests.push(Digest::of(new));
            }
            _ => runs.push((b, new.to_vec(), vec![Digest::of(new)])),
        }
    }
    runs.into_iter()
        .map(|(first_block, data, digests)| VerifiedExtent {
            first_block,
            data: data.into(),
            digests,
        })
        .collect()
}

fn sync(store: &Store, old: &[u8], image: &[u8], base: u64) -> PointMeta {
    let p = commit_unsettled(store, old, image, base, 3);
    // As the node does after acknowledging the point.
    store.settle("vol").expect("settle");
    p
}

/// Syncs `image` over `old` (`per_apply` extents a batch) and commits it without
/// settling: a later sync's blocks stay in the journal.
fn commit_unsettled(
    store: &Store,
    old: &[u8],
    image: &[u8],
    base: u64,
    per_apply: usize,
) -> PointMeta {
    let mut txn = store
        .begin_sync(spec(image.len() as u64, base))
        .expect("begin");
    for chunk in diff_extents(old, image).chunks(per_apply) {
        txn.apply(chunk).expect("apply");
    }
    txn.commit().expect("commit")
}

fn scribble(rng: &mut impl Rng, image: &mut [u8], writes: usize) {
    for _ in 0..writes {
        let len = rng.random_range(1..3 * BS as usize);
        let at = rng.random_range(0..image.len());
        let end = (at + len).min(image.len());
        rng.fill(&mut image[at..end]);
    }
}

#[test]
fn syncs_and_restores_every_point() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let size = 64 * BS as u64 + 1000; // a short last block
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let zero = vec![0u8; size as usize];
    let mut images = vec![zero.clone()];
    let mut image = zero.clone();
    // Leave holes: the first sync writes only part of the volume.
    rng.fill(&mut image[..20 * BS as usize]);
    rng.fill(&mut image[40 * BS as usize..]);
    for i in 0..6 {
        let base = i as u64;
        let p = sync(&store, images.last().expect("image"), &image, base);
        assert_eq!(p.id, base + 1);
        images.push(image.clone());
        scribble(&mut rng, &mut image, 5);
        if i == 3 {
            // A block rewritten with zeros, and a block made zero where it had data.
            image[..BS as usize].fill(0);
        }
    }
    let points = store.points("vol").expect("points");
    assert_eq!(points.len(), 6);
    assert!(points[..5].iter().all(|p| p.delta.is_some()));
    assert!(points[5].delta.is_none());
    for p in &points {
        let got = read_point_to_vec(&store, "vol", p.id).expect("restore");
        assert!(got == images[p.id as usize], "point {} differs", p.id);
    }
    assert!(read_point_to_vec(&store, "vol", 0).expect("newest") == images[6]);
    assert!(matches!(
        store.restore("vol", 99),
        Err(StoreError::NoSuchPoint { .. })
    ));

    // Everything survives a reopen.
    drop(store);
    let store = open(dir.path());
    for p in &points {
        assert!(read_point_to_vec(&store, "vol", p.id).expect("restore") == images[p.id as usize]);
    }
}

#[test]
fn base_mismatch_and_duplicates_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let size = 8 * BS as u64;
    let zero = vec![0u8; size as usize];
    let img = vec![5u8; size as usize];
    sync(&store, &zero, &img, 0);
    assert!(matches!(
        store.begin_sync(spec(size, 0)),
        Err(StoreError::BaseMismatch { .. })
    ));
    assert!(matches!(
        store.begin_sync(spec(size * 2, 1)),
        Err(StoreError::GeometryChanged { .. })
    ));
    let mut txn = store.begin_sync(spec(size, 1)).expect("begin");
    let mut next = img.clone();
    next[..BS as usize].fill(9);
    let e = diff_extents(&img, &next);
    txn.apply(&e).expect("first");
    let again = VerifiedExtent {
        first_block: 0,
        data: next[..BS as usize].to_vec().into(),
        digests: vec![Digest::of(&next[..BS as usize])],
    };
    assert!(matches!(
        txn.apply(&[again]),
        Err(StoreError::DuplicateBlock { block: 0 })
    ));
    txn.abort().expect("abort");
    assert_eq!(store.points("vol").expect("points").len(), 1);
    assert!(read_point_to_vec(&store, "vol", 1).expect("restore") == img);
}

#[test]
fn abort_of_a_first_sync_leaves_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let size = 8 * BS as u64;
    let mut txn = store.begin_sync(spec(size, 0)).expect("begin");
    let img = vec![1u8; size as usize];
    txn.apply(&diff_extents(&vec![0; size as usize], &img))
        .expect("apply");
    txn.abort().expect("abort");
    assert!(store.source("vol").expect("meta").is_none());
    assert!(!dir.path().join("disk1/bulwark/vol").exists());
    assert!(matches!(
        store.restore("vol", 0),
        Err(StoreError::NoPoints(_))
    ));
}

#[test]
fn refuses_a_source_no_disk_can_hold() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disks = || {
        vec![PoolDisk {
            path: dir.path().join("d"),
            capacity_bytes: 1 << 30,
        }]
    };
    let missing = Store::open(&dir.path().join("data"), disks());
    let e = missing.err().expect("a missing pool disk is refused");
    assert!(e.to_string().contains("mount it first"), "{e}");
    std::fs::create_dir_all(dir.path().join("d")).expect("disk dir");
    let store = Store::open(&dir.path().join("data"), disks()).expect("open");
    let e = store.begin_sync(spec(1 << 30, 0)).err().expect("refused");
    assert!(matches!(e, StoreError::NoSpace { .. }), "{e}");
}

#[test]
fn hostile_sizes_and_allocations_are_refused_before_anything_is_created() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let pool = dir.path().join("disk1").join("bulwark");
    let with = |size: u64, replica: u64, points: u64| {
        let mut s = spec(size, 0);
        s.policy = Some(SourcePolicy {
            replica_alloc_bytes: replica,
            points_alloc_bytes: points,
            ..SourcePolicy::default()
        });
        s
    };
    for (what, s) in [
        ("1 EiB", spec(1 << 60, 0)),
        (
            "2^62 with a tiny replica allocation",
            with(1 << 62, 4096, 4096),
        ),
        (
            "allocations that wrap",
            with(1 << 20, u64::MAX - 10, u64::MAX - 10),
        ),
        ("endless recovery-point space", with(1 << 20, 0, u64::MAX)),
    ] {
        let e = store.begin_sync(s).err().expect(what);
        assert!(matches!(e, StoreError::NoSpace { .. }), "{what}: {e}");
        assert!(
            e.to_string().contains("no pool disk has room"),
            "{what}: {e}"
        );
        assert!(
            std::fs::read_dir(&pool).expect("pool").next().is_none(),
            "{what}: nothing is created"
        );
        assert!(store.all_sources().expect("sources").is_empty(), "{what}");
    }
    // A small replica allocation is raised to what the volume needs.
    let mut txn = store.begin_sync(with(8 * BS as u64, 1, 0)).expect("begin");
    txn.apply(&diff_extents(&[0; 8 * BS as usize], &[7; 8 * BS as usize]))
        .expect("apply");
    txn.commit().expect("commit");
    let meta = store.source("vol").expect("read").expect("stored");
    assert!(
        meta.replica_alloc_bytes >= 8 * BS as u64 + 8 * 32,
        "{meta:?}"
    );
}

#[test]
fn a_pool_that_prunes_when_full_drops_no_point_for_a_sync_that_cannot_fit_anyway() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("disk1")).expect("disk dir");
    let store = Store::open_with(
        &dir.path().join("data"),
        vec![PoolDisk {
            path: dir.path().join("disk1"),
            capacity_bytes: 1 << 40,
        }],
        PoolPolicy {
            auto_grow_bytes: 0,
            on_full: OnFull::PruneOldest,
            ..PoolPolicy::default()
        },
    )
    .expect("open");
    let size = 16 * BS as u64;
    // Room for the before-images of 4 blocks, not of 8.
    let tight = |base: u64| {
        let mut s = spec(size, base);
        s.policy = Some(SourcePolicy {
            points_alloc_bytes: 5 * BS as u64,
            ..SourcePolicy::default()
        });
        s
    };
    let mut images = vec![vec![0u8; size as usize]];
    for (i, (fill, blocks)) in [(1u8, 16usize), (2, 2), (3, 2)].into_iter().enumerate() {
        let mut image = images.last().expect("image").clone();
        image[..blocks * BS as usize].fill(fill);
        let mut txn = store.begin_sync(tight(i as u64)).expect("begin");
        txn.apply(&diff_extents(images.last().expect("image"), &image))
            .expect("apply");
        txn.commit().expect("commit");
        store.settle("vol").expect("settle");
        images.push(image);
    }
    assert_eq!(store.points("vol").expect("points").len(), 3);
    // 8 changed blocks: their before-images alone exceed the allocation, so
    // pruning every older point would not make room. Nothing is pruned.
    let mut image = images.last().expect("image").clone();
    image[..8 * BS as usize].fill(9);
    let mut txn = store.begin_sync(tight(3)).expect("begin");
    let e = txn
        .apply(&diff_extents(images.last().expect("image"), &image))
        .expect_err("the sync does not fit");
    assert!(matches!(e, StoreError::AllocationFull { .. }), "{e}");
    txn.abort().expect("abort");
    let points = store.points("vol").expect("points");
    assert_eq!(
        points.iter().map(|p| p.id).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    for p in &points {
        assert!(
            read_point_to_vec(&store, "vol", p.id).expect("restore") == images[p.id as usize],
            "point {} differs",
            p.id
        );
    }
}

/// Copies a directory tree: the state a process kill would leave (page cache included;
/// a power cut is covered by the fsync order, not by this test).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("readdir").flatten() {
        let p = e.path();
        let t = to.join(e.file_name());
        if p.is_dir() {
            copy_tree(&p, &t);
        } else {
            std::fs::copy(&p, &t).expect("copy");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// A crash after any batch of an incremental sync: reopening rolls back to the
    /// previous point exactly, and every earlier point still restores.
    #[test]
    fn crash_mid_sync_rolls_back(seed in 0u64..10_000, syncs in 1usize..4, crash_after in 0usize..4) {
        let dir = tempfile::tempdir().expect("tempdir");
        let crashed = tempfile::tempdir().expect("tempdir");
        let size = 32 * BS as u64 + 100;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut images = vec![vec![0u8; size as usize]];
        let mut image = images[0].clone();
        {
            let store = open(dir.path());
            for i in 0..syncs {
                scribble(&mut rng, &mut image, 6);
                sync(&store, &images[i], &image, i as u64);
                images.push(image.clone());
            }
            // The interrupted sync: some batches applied, never committed.
            scribble(&mut rng, &mut image, 6);
            let mut txn = store.begin_sync(spec(size, syncs as u64)).expect("begin");
            let extents = diff_extents(images.last().expect("image"), &image);
            for chunk in extents.chunks(2).take(crash_after) {
                txn.apply(chunk).expect("apply");
            }
            // Crash: the transaction is never finished. sled holds a lock on its
            // directory while the leaked handle lives, so the metadata is copied as it
            // stands and reopened beside the same pool disk.
            copy_tree(&dir.path().join("data"), &crashed.path().join("data"));
            std::mem::forget(txn);
        }
        let store = Store::open(
            &crashed.path().join("data"),
            vec![PoolDisk { path: dir.path().join("disk1"), capacity_bytes: 1 << 40 }],
        )
        .expect("reopen after crash");
        let points = store.points("vol").expect("points");
        prop_assert_eq!(points.len(), syncs);
        for p in &points {
            let got = read_point_to_vec(&store, "vol", p.id).expect("restore");
            prop_assert!(got == images[p.id as usize], "point {} differs after crash", p.id);
        }
        // And the next sync goes through.
        let next = sync(&store, images.last().expect("image"), &image, syncs as u64);
        prop_assert_eq!(next.id, syncs as u64 + 1);
        prop_assert!(read_point_to_vec(&store, "vol", next.id).expect("restore") == image);
    }
}

/// A deep check's view: damage inside the replica is found by recomputing digests,
/// and re-sending the true bytes repairs it without copying the damage into the
/// previous point's delta (the before-image of an unchanged block is skipped).
#[test]
fn recomputed_digests_find_damage_and_a_resend_repairs_every_point() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let size = 40 * BS as u64 + 100;
    let mut v1 = vec![0u8; size as usize];
    rng.fill(&mut v1[..20 * BS as usize]); // the rest was never written
    sync(&store, &vec![0u8; size as usize], &v1, 0);
    let mut v2 = v1.clone();
    scribble(&mut rng, &mut v2, 3);
    sync(&store, &v1, &v2, 1);

    let meta = store.source("vol").expect("meta").expect("source");
    let replica = meta.dir().join("replica");
    let (clean, damaged) = store.recompute_digests("vol", 0, 1000).expect("recompute");
    assert!(damaged.is_empty());
    assert_eq!(clean, store.read_digests("vol", 0, 1000).expect("digests"));

    // Damage a written block and a never-written one.
    let f = OpenOptions::new()
        .write(true)
        .open(&replica)
        .expect("replica");
    f.write_all_at(b"\xff", 5 * BS as u64 + 3).expect("flip");
    f.write_all_at(b"\x01", 30 * BS as u64).expect("flip");
    drop(f);
    let (_, damaged) = store.recompute_digests("vol", 0, 1000).expect("recompute");
    assert_eq!(damaged.len(), 2, "both damaged blocks are found");

    // The agent re-sends the source's true bytes of exactly those blocks.
    let mut txn = store.begin_sync(spec(size, 2)).expect("begin");
    let mut extents = Vec::new();
    for b in [5u64, 30] {
        let (o, l) = (b as usize * BS as usize, BS as usize);
        extents.push(VerifiedExtent {
            first_block: b,
            data: v2[o..o + l].to_vec().into(),
            digests: vec![Digest::of(&v2[o..o + l])],
        });
    }
    txn.apply(&extents).expect("apply");
    let p3 = txn.commit().expect("commit");
    assert_eq!(
        store
            .recompute_digests("vol", 0, 1000)
            .expect("recompute")
            .1,
        Vec::<u64>::new()
    );
    // Block 5 kept its digest: no before-image for it (the damage is not kept);
    // block 30 was never written, so its zeros are recorded.
    let prev = store
        .points("vol")
        .expect("points")
        .into_iter()
        .find(|p| p.id == 2)
        .expect("point 2");
    assert_eq!(prev.delta.as_ref().map(|d| d.records), Some(1));
    assert_eq!(read_point_to_vec(&store, "vol", p3.id).expect("p3"), v2);
    assert_eq!(read_point_to_vec(&store, "vol", 2).expect("p2"), v2);
    assert_eq!(read_point_to_vec(&store, "vol", 1).expect("p1"), v1);
}

// Crash safety of every store operation: random sequences of syncs, prunes (with
// merges) and retention, each optionally crashed at a write/fsync/rename/flush
// boundary (`crash::arm`), the store dropped without cleanup and reopened; every
// surviving point must restore exactly.

use std::collections::{BTreeMap, BTreeSet};

use rand::seq::SliceRandom;

const NAME: &str = "vol";

/// The committed points a test expects: id → the volume's bytes at that point.
type Model = BTreeMap<u64, Vec<u8>>;

/// Opens the store in `dir` (metadata in `dir/data`, one pool disk `dir/disk1`),
/// returning the error. sled releases
/// the lock of a dropped database a moment later (its file is closed by a deferred
/// destructor, spacejam/sled#1234), so an open right after a drop waits for it.
fn try_open(dir: &Path) -> Result<Store> {
    try_open_in(dir, "data")
}

/// [`try_open`] with the metadata in `dir/<data>` (a copy taken at a crash).
fn try_open_in(dir: &Path, data: &str) -> Result<Store> {
    std::fs::create_dir_all(dir.join("disk1")).expect("disk dir");
    let mut tries = 0;
    loop {
        let r = Store::open(
            &dir.join(data),
            vec![PoolDisk {
                path: dir.join("disk1"),
                capacity_bytes: 1 << 40,
            }],
        );
        match r {
            Err(StoreError::Meta(m)) if m.contains("could not acquire lock") && tries < 500 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => return r,
        }
    }
}

/// Reopens after a crash. Each of `recovery_crashes` in turn crashes the recovery
/// (the rollback of an interrupted sync) at that boundary, and the open is retried;
/// once the list is used up, or an open gets through, the store is returned. The
/// boundaries crashed at are added to `reached`.
fn reopen(
    dir: &Path,
    data: &str,
    recovery_crashes: impl IntoIterator<Item = u64>,
    reached: &mut Vec<&'static str>,
) -> Store {
    for m in recovery_crashes {
        crash::arm(m);
        let r = try_open_in(dir, data);
        let crashed = crash::disarm();
        match r {
            Ok(store) => {
                assert!(!crashed, "a crash in recovery was swallowed");
                return store;
            }
            Err(StoreError::Crashed(what)) => {
                assert!(crashed);
                reached.push(what);
            }
            Err(e) => panic!("reopen after a crash failed: {e}"),
        }
    }
    try_open_in(dir, data).expect("reopen after a crash")
}

/// The crash itself: the store (and any transaction, already dropped) goes without
/// cleanup. sled writes what it holds when dropped; with `lose_unflushed`, what it
/// had not flushed is lost instead, as in a real crash: the metadata is copied as it
/// stands into `dir/<to>` (which the store is reopened from) before the drop.
fn crash_store(store: Store, dir: &Path, from: &str, to: &str, lose_unflushed: bool) -> String {
    if !lose_unflushed {
        drop(store);
        return from.to_string();
    }
    copy_tree(&dir.join(from), &dir.join(to));
    drop(store);
    to.to_string()
}

/// The blocks (index) in which two images differ.
fn differing_blocks(a: &[u8], b: &[u8]) -> Vec<usize> {
    a.chunks(BS as usize)
        .zip(b.chunks(BS as usize))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i)
        .collect()
}

/// The store holds exactly the model's points, each restores byte-identical, the
/// newest is what a restore of point 0 gives, and a verify finds nothing damaged.
fn check_points(store: &Store, model: &Model, ctx: &str) {
    let ids: Vec<u64> = store
        .points(NAME)
        .expect("points")
        .iter()
        .map(|p| p.id)
        .collect();
    let want: Vec<u64> = model.keys().copied().collect();
    assert_eq!(ids, want, "{ctx}: the points");
    let Some((_, newest)) = model.last_key_value() else {
        assert!(
            store.source(NAME).expect("source").is_none(),
            "{ctx}: a source without points"
        );
        return;
    };
    for (id, image) in model {
        let got = read_point_to_vec(store, NAME, *id)
            .unwrap_or_else(|e| panic!("{ctx}: restore of point {id}: {e}"));
        assert!(
            got == *image,
            "{ctx}: point {id} differs in blocks {:?}",
            differing_blocks(&got, image)
        );
    }
    let got = read_point_to_vec(store, NAME, 0).expect("restore of the newest point");
    assert!(got == *newest, "{ctx}: point 0 is not the newest point");
    let v = store.verify(NAME, 0).expect("verify");
    assert!(
        v.damaged_replica.is_empty() && v.damaged_points.is_empty(),
        "{ctx}: verify found damage: replica {:?}, points {:?}",
        v.damaged_replica,
        v.damaged_points
    );
}

/// No stray files: the source's directory holds the replica, its digests and one
/// delta per point but the newest (none at all without points).
fn check_files(dir: &Path, model: &Model, ctx: &str) {
    let src = dir.join("disk1").join("bulwark").join(NAME);
    let Some((&newest, _)) = model.last_key_value() else {
        assert!(!src.exists(), "{ctx}: files of a source without points");
        return;
    };
    let names = |d: &Path| -> BTreeSet<String> {
        std::fs::read_dir(d)
            .expect("read dir")
            .map(|e| {
                e.expect("dir entry")
                    .file_name()
                    .to_string_lossy()
                    .to_string()
            })
            .collect()
    };
    let top: BTreeSet<String> = ["deltas", "digests", "replica"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(names(&src), top, "{ctx}: files of the source");
    let want: BTreeSet<String> = model
        .keys()
        .filter(|&&id| id != newest)
        .map(|id| format!("{id:020}.delta"))
        .collect();
    assert_eq!(names(&src.join("deltas")), want, "{ctx}: delta files");
}

/// The extents sending `blocks` of `image`, one per run of consecutive blocks.
fn extents_of(image: &[u8], blocks: &BTreeSet<u64>) -> Vec<VerifiedExtent> {
    let g = Geometry::new(image.len() as u64, BS).expect("geometry");
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &b in blocks {
        match runs.last_mut() {
            Some((first, n)) if *first + *n == b => *n += 1,
            _ => runs.push((b, 1)),
        }
    }
    runs.into_iter()
        .map(|(first, n)| {
            let (start, end) = (
                g.offset_of(first) as usize,
                (g.offset_of(first + n) as usize).min(image.len()),
            );
            let data = &image[start..end];
            VerifiedExtent {
                first_block: first,
                data: data.to_vec().into(),
                digests: data.chunks(BS as usize).map(Digest::of).collect(),
            }
        })
        .collect()
}

/// The blocks that differ between `old` and `image`, plus `extra`.
fn changed_plus(old: &[u8], image: &[u8], extra: &[u64]) -> BTreeSet<u64> {
    differing_blocks(old, image)
        .into_iter()
        .map(|b| b as u64)
        .chain(extra.iter().copied())
        .collect()
}

/// A random sync from `old`: the new image and its extents in batches. Blocks get
/// new data, a one-byte change, zeros (also where they were zeros or never written),
/// or are re-sent with their bytes unchanged; half the writes land in the first few
/// blocks, so that consecutive deltas overlap. Extents go in random order.
fn plan_sync(seed: u64, old: &[u8]) -> (Vec<u8>, Vec<Vec<VerifiedExtent>>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let g = Geometry::new(old.len() as u64, BS).expect("geometry");
    let blocks = g.block_count();
    let mut image = old.to_vec();
    let mut send = BTreeSet::new();
    let writes = rng.random_range(0..=16);
    for _ in 0..writes {
        let b = match rng.random_range(0..10) {
            0..5 => rng.random_range(0..12),
            5 => blocks - 1, // the last block, short in some volumes
            _ => rng.random_range(0..blocks),
        };
        let (o, l) = (g.offset_of(b) as usize, g.block_len(b) as usize);
        match rng.random_range(0..10) {
            0..5 => rng.fill(&mut image[o..o + l]),
            5 => {
                let at = rng.random_range(o..o + l);
                image[at] = image[at].wrapping_add(1);
            }
            6 | 7 => image[o..o + l].fill(0),
            _ => {} // re-sent unchanged
        }
        send.insert(b);
    }
    let mut extents = extents_of(&image, &send);
    extents.shuffle(&mut rng);
    let batches = rng.random_range(1..=3usize);
    let per = extents.len().div_ceil(batches);
    (image, into_batches(extents, per))
}

/// `extents` in batches of `per`.
fn into_batches(extents: Vec<VerifiedExtent>, per: usize) -> Vec<Vec<VerifiedExtent>> {
    let mut out = Vec::new();
    let mut it = extents.into_iter().peekable();
    while it.peek().is_some() {
        out.push(it.by_ref().take(per.max(1)).collect());
    }
    out
}

/// One sync as the node runs it; any error leaves the transaction dropped without
/// abort (a crash).
fn run_sync(
    store: &Store,
    base: u64,
    size: u64,
    batches: &[Vec<VerifiedExtent>],
) -> Result<PointMeta> {
    run_sync_acked(store, base, size, batches, &mut None)
}

/// [`run_sync`], noting in `acked` the point once its commit returned (the node
/// acknowledges it then, and settles it after).
fn run_sync_acked(
    store: &Store,
    base: u64,
    size: u64,
    batches: &[Vec<VerifiedExtent>],
    acked: &mut Option<u64>,
) -> Result<PointMeta> {
    let mut txn = store.begin_sync(spec(size, base))?;
    for b in batches {
        txn.apply(b)?;
    }
    let p = txn.commit()?;
    *acked = Some(p.id);
    store.settle(NAME)?;
    Ok(p)
}

#[derive(Debug, Clone)]
enum Op {
    Sync {
        seed: u64,
    },
    PruneOldest,
    /// A point that is neither the oldest nor the newest: its delta is merged.
    PruneMiddle {
        pick: usize,
    },
    Retention {
        keep: u32,
    },
}

#[derive(Debug, Clone)]
struct Step {
    op: Op,
    /// Crash at this boundary of the operation (scaled to the operation's size).
    crash: Option<u64>,
    /// Crash the recovery at the reopen after a crash at this boundary.
    recovery_crash: Option<u64>,
    /// Reopen the store after the operation even without a crash.
    reopen: bool,
    /// At a crash, lose what sled had not flushed (see [`crash_store`]).
    lose_unflushed: bool,
}

/// An operation ready to run.
enum Action {
    Sync {
        base: u64,
        batches: Vec<Vec<VerifiedExtent>>,
    },
    Prune {
        id: u64,
    },
    Retention {
        policy: SourcePolicy,
        now: i64,
        drop: Vec<u64>,
    },
    Nothing,
}

/// What an operation was meant to do, to tell the outcomes a crash allows.
enum Expect {
    Point { id: u64, image: Vec<u8> },
    Pruned { id: u64 },
    Retained { drop: Vec<u64> },
    Nothing,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<u64>().prop_map(|seed| Op::Sync { seed }),
        1 => Just(Op::PruneOldest),
        3 => any::<usize>().prop_map(|pick| Op::PruneMiddle { pick }),
        1 => (1u32..4).prop_map(|keep| Op::Retention { keep }),
    ]
}

fn step_strategy(op: impl Strategy<Value = Op>) -> impl Strategy<Value = Step> {
    (
        op,
        prop::option::weighted(0.6, 0u64..24),
        prop::option::weighted(0.3, prop_oneof![0u64..4, 0u64..24]),
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.4),
    )
        .prop_map(|(op, crash, recovery_crash, reopen, lose_unflushed)| Step {
            op,
            crash,
            recovery_crash,
            reopen,
            lose_unflushed,
        })
}

/// Runs `steps` on a fresh store of `size` bytes, checking the store against the
/// model after every step and every reopen.
fn run_crash_sequence(size: u64, steps: &[Step], reached: &mut Vec<&'static str>) {
    crash::disarm(); // a failed earlier case on this thread may have left one armed
    let dir = tempfile::tempdir().expect("tempdir");
    let zero = vec![0u8; size as usize];
    let mut model = Model::new();
    let mut store = Some(try_open(dir.path()).expect("open"));
    let mut data = "data".to_string();
    for (i, step) in steps.iter().enumerate() {
        let ctx = format!("step {i} {step:?}");
        let s = store.take().expect("store");
        let newest_before = model.keys().next_back().copied();
        // What the step does, and how many boundaries its crash is spread over.
        let (boundaries, expect, action) = match &step.op {
            Op::Sync { seed } => {
                let base = newest_before.unwrap_or(0);
                let (image, batches) = plan_sync(*seed, model.get(&base).unwrap_or(&zero));
                let id = base + 1;
                (
                    u64::MAX,
                    Expect::Point { id, image },
                    Action::Sync { base, batches },
                )
            }
            Op::PruneOldest if model.len() >= 2 => {
                let id = *model.keys().next().expect("a point");
                (5, Expect::Pruned { id }, Action::Prune { id })
            }
            Op::PruneMiddle { pick } if model.len() >= 3 => {
                let ids: Vec<u64> = model.keys().copied().collect();
                let middle = &ids[1..ids.len() - 1];
                let id = middle[pick % middle.len()];
                (9, Expect::Pruned { id }, Action::Prune { id })
            }
            Op::Retention { keep } if !model.is_empty() => {
                let policy = SourcePolicy {
                    retention: Retention {
                        keep: *keep,
                        ..Retention::default()
                    },
                    ..SourcePolicy::default()
                };
                let now = bulwark_common::time::now_ms();
                let points: Vec<(u64, i64)> = s
                    .points(NAME)
                    .expect("points")
                    .iter()
                    .map(|p| (p.id, p.created_ms))
                    .collect();
                let drop = policy.retention.to_drop(&points, now);
                let action = Action::Retention {
                    policy,
                    now,
                    drop: drop.clone(),
                };
                (u64::MAX, Expect::Retained { drop }, action)
            }
            _ => (1, Expect::Nothing, Action::Nothing),
        };
        if let Some(n) = step.crash {
            crash::arm(n % boundaries);
        }
        let mut acked = None;
        let result = match action {
            Action::Sync { base, batches } => run_sync_acked(&s, base, size, &batches, &mut acked)
                .map(|p| assert_eq!(p.id, base + 1, "{ctx}")),
            Action::Prune { id } => s.prune(NAME, id).map(|_| ()),
            Action::Retention { policy, now, drop } => s
                .set_policy(NAME, &policy, now)
                .map(|dropped| assert_eq!(dropped, drop, "{ctx}: retention")),
            Action::Nothing => Ok(()),
        };
        let armed_crash_happened = crash::disarm();
        let crashed = match result {
            Ok(()) => false,
            Err(StoreError::Crashed(what)) => {
                reached.push(what);
                true
            }
            Err(e) => panic!("{ctx}: {e}"),
        };
        assert_eq!(
            armed_crash_happened, crashed,
            "{ctx}: a simulated crash was swallowed"
        );
        let s = if crashed {
            data = crash_store(
                s,
                dir.path(),
                &data,
                &format!("data-{i}"),
                step.lose_unflushed,
            );
            reopen(dir.path(), &data, step.recovery_crash, reached)
        } else if step.reopen {
            drop(s);
            try_open_in(dir.path(), &data).expect("reopen")
        } else {
            s
        };
        let ids: BTreeSet<u64> = s
            .points(NAME)
            .expect("points")
            .iter()
            .map(|p| p.id)
            .collect();
        if let Some(newest) = newest_before {
            assert!(
                ids.contains(&newest),
                "{ctx}: the newest point {newest} was lost"
            );
        }
        match expect {
            Expect::Point { id, image } => {
                // A crashed sync committed or it did not; either is whole. One
                // that was acknowledged is never lost.
                if acked == Some(id) {
                    assert!(ids.contains(&id), "{ctx}: acknowledged point {id} lost");
                }
                if !crashed || ids.contains(&id) {
                    model.insert(id, image);
                }
            }
            Expect::Pruned { id } => {
                if !crashed || !ids.contains(&id) {
                    model.remove(&id);
                }
            }
            Expect::Retained { drop } => {
                let removed: Vec<u64> = model
                    .keys()
                    .filter(|id| !ids.contains(id))
                    .copied()
                    .collect();
                if crashed {
                    // Pruned oldest first: some of them, in order.
                    assert!(
                        drop.starts_with(&removed),
                        "{ctx}: retention removed {removed:?}, it meant {drop:?}"
                    );
                } else {
                    assert_eq!(removed, drop, "{ctx}: retention");
                }
                for id in removed {
                    model.remove(&id);
                }
            }
            Expect::Nothing => {}
        }
        check_points(&s, &model, &ctx);
        check_files(dir.path(), &model, &ctx);
        store = Some(s);
    }
    // A final reopen changes nothing.
    drop(store);
    let s = try_open_in(dir.path(), &data).expect("final reopen");
    check_points(&s, &model, "final reopen");
    check_files(dir.path(), &model, "final reopen");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    /// Random syncs, prunes, merges and retention, crashed at random boundaries and
    /// reopened (sometimes crashing the recovery too): the points are always the
    /// committed ones, a crashed operation happened wholly or not at all, and every
    /// point restores exactly.
    #[test]
    fn crash_anywhere_keeps_every_point(
        blocks in 64u64..200,
        short in prop::option::of(1u64..BS as u64),
        first in step_strategy(any::<u64>().prop_map(|seed| Op::Sync { seed })),
        rest in prop::collection::vec(step_strategy(op_strategy()), 3..12),
    ) {
        let size = blocks * BS as u64 + short.unwrap_or(0);
        let mut steps = vec![first];
        steps.extend(rest);
        run_crash_sequence(size, &steps, &mut Vec::new());
    }
}

/// The digests a digests file holds (after its header: see `header.rs`).
fn stored_digests(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).expect("digests");
    let f = File::open(path).expect("digests");
    let start = content_start(&f, path, DataFile::Digests).expect("header") as usize;
    bytes[start..].to_vec()
}

/// The store's source files (every file of `store/` but the tests).
const STORE_SOURCES: &[&str] = &[
    include_str!("mod.rs"),
    include_str!("records.rs"),
    include_str!("files.rs"),
    include_str!("header.rs"),
    include_str!("meta.rs"),
    include_str!("journal.rs"),
    include_str!("delta.rs"),
    include_str!("sync.rs"),
    include_str!("images.rs"),
    include_str!("settle.rs"),
    include_str!("recovery.rs"),
    include_str!("pool.rs"),
    include_str!("retention.rs"),
    include_str!("verify.rs"),
    include_str!("restore.rs"),
    include_str!("view.rs"),
    include_str!("moves.rs"),
];

/// Every crash boundary of the store, by name (from its source, so that a boundary
/// added later is covered too).
fn boundaries_in_source() -> BTreeSet<&'static str> {
    STORE_SOURCES
        .iter()
        .flat_map(|src| {
            src.split("boundary(\"")
                .skip(1)
                .filter_map(|s| s.split('"').next())
        })
        .collect()
}

/// A history of five images whose syncs overlap: each rewrites some of the first
/// blocks; block 20 goes data, zeros, data, zeros, data; block 40 never written,
/// data, zeros; block 44 never written until zeros are written into it; block 10
/// gets a one-byte change; the short last block changes twice. `images[0]` is the
/// empty volume.
fn history() -> (u64, Vec<Vec<u8>>) {
    let size = 48 * BS as u64 + 100;
    let bs = BS as usize;
    let blk = |b: usize| b * bs..((b + 1) * bs).min(size as usize);
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut v = vec![0u8; size as usize];
    let mut images = vec![v.clone()];
    rng.fill(&mut v[..30 * bs]); // 30.. never written
    images.push(v.clone());
    for b in 0..6 {
        rng.fill(&mut v[blk(b)]);
    }
    v[blk(20)].fill(0);
    rng.fill(&mut v[blk(40)]);
    rng.fill(&mut v[blk(48)]);
    images.push(v.clone());
    for b in 2..8 {
        rng.fill(&mut v[blk(b)]);
    }
    rng.fill(&mut v[blk(20)]);
    v[blk(40)].fill(0);
    v[10 * bs + 7] ^= 0xff;
    images.push(v.clone());
    for b in 0..4 {
        rng.fill(&mut v[blk(b)]);
    }
    v[blk(20)].fill(0);
    rng.fill(&mut v[blk(10)]);
    rng.fill(&mut v[blk(48)]);
    images.push(v.clone());
    for b in (1..3).chain(9..12) {
        rng.fill(&mut v[blk(b)]);
    }
    rng.fill(&mut v[blk(20)]);
    images.push(v);
    (size, images)
}

/// The sync from `images[i - 1]` to `images[i]`: the changed blocks, plus blocks
/// 25 and 26 re-sent unchanged and block 44 sent as zeros, in batches of two
/// extents.
fn history_batches(images: &[Vec<u8>], i: usize) -> Vec<Vec<VerifiedExtent>> {
    let send = changed_plus(&images[i - 1], &images[i], &[25, 26, 44]);
    into_batches(extents_of(&images[i], &send), 2)
}

/// A store in `dir` holding the first `points` points of [`history`].
fn build_history(dir: &Path, size: u64, images: &[Vec<u8>], points: usize) -> (Store, Model) {
    let store = try_open(dir).expect("open");
    let mut model = Model::new();
    for i in 1..=points {
        let p = run_sync(&store, i as u64 - 1, size, &history_batches(images, i)).expect("sync");
        model.insert(p.id, images[i].clone());
    }
    check_points(&store, &model, "history");
    (store, model)
}

/// One prune of a middle point (points 2 and 3 of four, whose deltas overlap),
/// crashed at boundary 0, 1, 2, ... until it completes: after each crash and reopen
/// the prune happened or it did not, every point restores exactly, no file is left
/// over, and the prune (and a sync after it) then goes through.
#[test]
fn a_crash_at_every_boundary_of_a_middle_prune_keeps_every_point() {
    let (size, images) = history();
    let mut reached = BTreeSet::new();
    for (victim, lose_unflushed) in [(2u64, false), (3, false), (2, true), (3, true)] {
        for n in 0.. {
            assert!(n < 100, "the prune never completes");
            let dir = tempfile::tempdir().expect("tempdir");
            let (store, mut model) = build_history(dir.path(), size, &images, 4);
            let ctx = format!(
                "prune of point {victim} crashed at boundary {n} (unflushed lost: {lose_unflushed})"
            );
            crash::arm(n);
            let r = store.prune(NAME, victim);
            let happened = crash::disarm();
            match r {
                Ok(_) => {
                    assert!(!happened, "{ctx}: the crash was swallowed");
                    model.remove(&victim);
                    check_points(&store, &model, &ctx);
                    check_files(dir.path(), &model, &ctx);
                    break;
                }
                Err(StoreError::Crashed(what)) => {
                    assert!(happened);
                    reached.insert(what);
                }
                Err(e) => panic!("{ctx}: {e}"),
            }
            let data = crash_store(store, dir.path(), "data", "data-crash", lose_unflushed);
            let store = try_open_in(dir.path(), &data).expect("reopen");
            let still = store
                .points(NAME)
                .expect("points")
                .iter()
                .any(|p| p.id == victim);
            if !still {
                model.remove(&victim);
            }
            check_points(&store, &model, &ctx);
            check_files(dir.path(), &model, &ctx);
            if still {
                store.prune(NAME, victim).expect("prune after the crash");
                model.remove(&victim);
                check_points(&store, &model, &format!("{ctx}, pruned again"));
                check_files(dir.path(), &model, &format!("{ctx}, pruned again"));
            }
            let p = run_sync(&store, 4, size, &history_batches(&images, 5)).expect("sync");
            model.insert(p.id, images[5].clone());
            check_points(&store, &model, &format!("{ctx}, then a sync"));
        }
    }
    let want: BTreeSet<&str> = boundaries_in_source()
        .into_iter()
        .filter(|b| b.starts_with("prune:") || b.starts_with("merge:"))
        .collect();
    assert_eq!(reached, want, "the boundaries of a prune");
}

/// One sync (a first one, and an incremental one over three points), crashed at
/// boundary 0, 1, 2, ... until it completes; after each crash the recovery at reopen
/// is itself crashed at its boundary 0, 1, 2, ... until it completes. Each time the
/// sync committed wholly or not at all, every point restores exactly, no file is
/// left over, and the sync then goes through.
#[test]
fn a_crash_at_every_boundary_of_a_sync_and_its_recovery_keeps_every_point() {
    let (size, images) = history();
    let mut reached = BTreeSet::new();
    for (base, lose_unflushed) in [(0usize, false), (3, false), (0, true), (3, true)] {
        let new = base as u64 + 1;
        for n in 0.. {
            assert!(n < 100, "the sync never completes");
            let dir = tempfile::tempdir().expect("tempdir");
            let (store, mut model) = build_history(dir.path(), size, &images, base);
            let ctx = format!(
                "sync of point {new} crashed at boundary {n} (unflushed lost: {lose_unflushed})"
            );
            let batches = history_batches(&images, base + 1);
            let mut acked = None;
            crash::arm(n);
            let r = run_sync_acked(&store, base as u64, size, &batches, &mut acked);
            let happened = crash::disarm();
            drop(batches);
            match r {
                Ok(p) => {
                    assert!(!happened, "{ctx}: the crash was swallowed");
                    model.insert(p.id, images[base + 1].clone());
                    check_points(&store, &model, &ctx);
                    check_files(dir.path(), &model, &ctx);
                    break;
                }
                Err(StoreError::Crashed(what)) => {
                    assert!(happened);
                    reached.insert(what);
                }
                Err(e) => panic!("{ctx}: {e}"),
            }
            let data = crash_store(store, dir.path(), "data", "data-crash", lose_unflushed);
            let mut recovery = Vec::new();
            let store = reopen(dir.path(), &data, 0.., &mut recovery);
            reached.extend(recovery);
            let committed = store
                .points(NAME)
                .expect("points")
                .iter()
                .any(|p| p.id == new);
            if acked.is_some() {
                assert!(committed, "{ctx}: the acknowledged point was lost");
            }
            if committed {
                model.insert(new, images[base + 1].clone());
            }
            check_points(&store, &model, &ctx);
            check_files(dir.path(), &model, &ctx);
            if !committed {
                let again = history_batches(&images, base + 1);
                run_sync(&store, base as u64, size, &again).expect("sync after the crash");
                model.insert(new, images[base + 1].clone());
                check_points(&store, &model, &format!("{ctx}, synced again"));
                check_files(dir.path(), &model, &format!("{ctx}, synced again"));
            }
        }
    }
    let want: BTreeSet<&str> = boundaries_in_source()
        .into_iter()
        .filter(|b| {
            ["sync:", "commit:", "rollback:", "settle:", "undo:"]
                .iter()
                .any(|p| b.starts_with(p))
        })
        .collect();
    assert_eq!(
        reached, want,
        "the boundaries of a sync, its settle and their recovery"
    );
}

/// Every boundary of the store belongs to an operation the tests above crash.
#[test]
fn every_crash_boundary_is_covered_by_a_test() {
    let all = boundaries_in_source();
    assert!(all.len() >= 10, "{all:?}");
    for b in all {
        assert!(
            [
                "sync:",
                "commit:",
                "rollback:",
                "settle:",
                "undo:",
                "prune:",
                "merge:"
            ]
            .iter()
            .any(|p| b.starts_with(p)),
            "boundary {b:?} is crashed by no test"
        );
    }
}

/// Reads a whole view, at odd offsets and lengths, into one buffer.
fn read_view(view: &PointView) -> Vec<u8> {
    let size = view.geometry().size_bytes as usize;
    let mut out = vec![0u8; size];
    let mut at = 0usize;
    let mut step = 777usize;
    while at < size {
        let n = step.min(size - at);
        view.read_at(&mut out[at..at + n], at as u64)
            .expect("read the view");
        at += n;
        step = step * 3 % 20_000 + 1;
    }
    out
}

#[test]
fn an_open_view_stays_exact_while_later_syncs_and_prunes_change_the_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let size = 48 * BS as u64 + 333;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut images = vec![vec![0u8; size as usize]];
    let mut image = images[0].clone();
    rng.fill(&mut image[..30 * BS as usize]);
    for base in 0..3u64 {
        sync(&store, images.last().expect("image"), &image, base);
        images.push(image.clone());
        scribble(&mut rng, &mut image, 12);
    }
    // Views of point 1 (the oldest) and point 3 (the newest), opened now.
    let v1 = store.open_view("vol", 1).expect("view of point 1");
    let v3 = store.open_view("vol", 3).expect("view of point 3");
    assert_eq!(read_view(&v1), images[1]);
    assert_eq!(read_view(&v3), images[3]);
    // Later syncs overwrite replica blocks both views read from the replica.
    for base in 3..6u64 {
        sync(&store, images.last().expect("image"), &image, base);
        images.push(image.clone());
        scribble(&mut rng, &mut image, 12);
        assert_eq!(
            read_view(&v1),
            images[1],
            "point 1 after the sync of {}",
            base + 1
        );
        assert_eq!(
            read_view(&v3),
            images[3],
            "point 3 after the sync of {}",
            base + 1
        );
    }
    // Pruning merges and deletes the deltas the views read: they keep their files.
    store.prune("vol", 2).expect("prune a middle point");
    store.prune("vol", 1).expect("prune the oldest point");
    store
        .prune("vol", 3)
        .expect("prune the point of the second view");
    assert_eq!(read_view(&v1), images[1], "point 1 after the prunes");
    assert_eq!(read_view(&v3), images[3], "point 3 after the prunes");
    // A failed sync rolls back under an open view: still exact.
    let mut txn = store.begin_sync(spec(size, 6)).expect("begin");
    let mut next = image.clone();
    scribble(&mut rng, &mut next, 12);
    for chunk in diff_extents(&image, &next).chunks(2) {
        txn.apply(chunk).expect("apply");
    }
    txn.abort().expect("abort");
    assert_eq!(
        read_view(&v3),
        images[3],
        "point 3 after a rolled-back sync"
    );
    let v6 = store.open_view("vol", 0).expect("view of the newest point");
    assert_eq!(v6.point(), 6);
    assert_eq!(read_view(&v6), images[6]);
}

/// Several batches prepared together give each batch exactly what preparing it alone
/// gives (runs of blocks that continue across a batch boundary are read as one), and
/// the point they make restores exactly.
#[test]
fn batches_prepared_together_match_batches_prepared_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let size = 40 * BS as u64;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut first = vec![0u8; size as usize];
    rng.fill(&mut first[..]);
    // Block 30 stays zeros: never written, so it has no before-image bytes.
    first[30 * BS as usize..31 * BS as usize].fill(0);
    let p1 = sync(&store, &vec![0u8; size as usize], &first, 0);
    let mut second = first.clone();
    for b in [3usize, 4, 5, 30] {
        rng.fill(&mut second[b * BS as usize..(b + 1) * BS as usize]);
    }
    let extent = |blocks: std::ops::Range<usize>| {
        let data = &second[blocks.start * BS as usize..blocks.end * BS as usize];
        VerifiedExtent {
            first_block: blocks.start as u64,
            data: Bytes::copy_from_slice(data),
            digests: data.chunks(BS as usize).map(Digest::of).collect(),
        }
    };
    // Block 9 is sent with its old content: it needs no before-image.
    let batches = vec![
        vec![extent(3..5)],
        vec![extent(5..6), extent(9..10)],
        vec![extent(30..31)],
    ];
    let mut txn = store.begin_sync(spec(size, p1.id)).expect("begin");
    // A sync reads only the old digests (its space check needs no more)...
    let received = txn
        .before_images()
        .expect("reader")
        .prepare_many(batches.clone())
        .expect("prepare_many");
    // ... the settle reads the before-images too.
    let dir = store.source("vol").expect("meta").expect("source").dir();
    let reader = store
        .before_image_reader(&dir, Geometry::new(size, BS).expect("geometry"))
        .expect("reader");
    let together = reader.prepare_many(batches.clone()).expect("prepare_many");
    for (r, t) in received.iter().zip(&together) {
        assert_eq!(r.recs, t.recs);
        assert!(r.old.iter().all(Option::is_none));
    }
    assert_eq!(together.len(), batches.len());
    for (batch, t) in batches.iter().zip(&together) {
        let alone = reader.prepare(batch.clone()).expect("prepare");
        assert_eq!(t.recs, alone.recs);
        assert_eq!(t.old, alone.old);
        assert_eq!(t.extents.len(), batch.len());
    }
    let blocks: Vec<Vec<u64>> = together
        .iter()
        .map(|p| p.recs.iter().map(|r| r.0).collect())
        .collect();
    assert_eq!(blocks, vec![vec![3, 4], vec![5], vec![30]]);
    assert_eq!(together[2].old, vec![None]);
    let old_block = |b: usize| &first[b * BS as usize..(b + 1) * BS as usize];
    assert_eq!(together[0].old[1].as_deref(), Some(old_block(4)));
    assert_eq!(together[1].old[0].as_deref(), Some(old_block(5)));
    txn.apply_prepared(together).expect("apply");
    let p2 = txn.commit().expect("commit");
    store.settle("vol").expect("settle");
    assert_eq!(read_point_to_vec(&store, "vol", p1.id).expect("p1"), first);
    assert_eq!(read_point_to_vec(&store, "vol", p2.id).expect("p2"), second);
}

/// The digests a point's replica holds: one per block of `image` (every block of
/// these images was written).
fn digests_of(image: &[u8]) -> Vec<u8> {
    image
        .chunks(BS as usize)
        .flat_map(|b| Digest::of(b).0)
        .collect()
}

/// A store of `size` bytes with point 1 (random, the whole volume written)
/// settled, and point 2 (point 1 after `change`) committed but not settled: its
/// blocks are only in the journal. Returns the store and the three images (zeros,
/// point 1, point 2).
fn unsettled_store(
    dir: &Path,
    size: u64,
    per_apply: usize,
    change: impl FnOnce(&mut rand::rngs::StdRng, &mut Vec<u8>),
) -> (Store, Vec<Vec<u8>>) {
    let store = open(dir);
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let zero = vec![0u8; size as usize];
    let mut v1 = zero.clone();
    rng.fill(&mut v1[..]);
    sync(&store, &zero, &v1, 0);
    let mut v2 = v1.clone();
    change(&mut rng, &mut v2);
    let p = commit_unsettled(&store, &v1, &v2, 1, per_apply);
    assert_eq!(p.id, 2);
    // Not settled: the replica is still point 1, the journal holds point 2.
    let src = dir.join("disk1").join("bulwark").join("vol");
    assert!(
        store
            .meta
            .get(Tree::Settle, b"vol")
            .map(|v| v.is_some())
            .expect("settle record")
    );
    assert!(src.join("journal").exists());
    assert!(std::fs::read(src.join("replica")).expect("replica") == v1);
    (store, vec![zero, v1, v2])
}

/// A committed point that is not settled yet (the node crashed, or a settle
/// failed and was retried) reads correctly whichever way it is read first: each
/// of these settles it first. Then the next sync and a reopen see it whole.
#[test]
fn an_unsettled_point_reads_correctly_every_way() {
    for way in ["restore", "restore previous", "view", "digests", "verify"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, images) = unsettled_store(dir.path(), 40 * BS as u64 + 100, 2, |rng, v2| {
            scribble(rng, v2, 12);
            v2[7 * BS as usize..8 * BS as usize].fill(0); // a block made zeros
        });
        let (v1, v2) = (&images[1], &images[2]);
        match way {
            "restore" => assert!(read_point_to_vec(&store, "vol", 2).expect("restore") == *v2),
            "restore previous" => {
                assert!(read_point_to_vec(&store, "vol", 1).expect("restore") == *v1)
            }
            "view" => {
                let view = store.open_view("vol", 0).expect("view");
                assert_eq!(view.point(), 2);
                assert!(read_view(&view) == *v2, "the view of point 2");
                let view = store.open_view("vol", 1).expect("view");
                assert!(read_view(&view) == *v1, "the view of point 1");
            }
            "digests" => {
                let blocks = Geometry::new(v2.len() as u64, BS)
                    .expect("geometry")
                    .block_count();
                let d = store.read_digests("vol", 0, blocks).expect("digests");
                assert!(d == digests_of(v2), "the digests of point 2");
            }
            "verify" => {
                let v = store.verify("vol", 0).expect("verify");
                assert!(v.damaged_replica.is_empty() && v.damaged_points.is_empty());
            }
            _ => unreachable!(),
        }
        let src = dir.path().join("disk1").join("bulwark").join("vol");
        assert!(
            !store
                .meta
                .get(Tree::Settle, b"vol")
                .map(|v| v.is_some())
                .expect("settle record"),
            "{way}: settled"
        );
        assert!(!src.join("journal").exists(), "{way}: journal removed");
        assert!(
            std::fs::read(src.join("replica")).expect("replica") == *v2,
            "{way}: the replica is point 2"
        );
        let mut model: Model = (1..=2).map(|i| (i as u64, images[i].clone())).collect();
        check_points(&store, &model, way);
        // The next sync, then a reopen.
        let mut v3 = v2.clone();
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        scribble(&mut rng, &mut v3, 6);
        let p = sync(&store, v2, &v3, 2);
        assert_eq!(p.id, 3);
        model.insert(3, v3);
        check_points(&store, &model, &format!("{way}, then a sync"));
        check_files(dir.path(), &model, &format!("{way}, then a sync"));
        drop(store);
        let store = try_open(dir.path()).expect("reopen");
        check_points(&store, &model, &format!("{way}, reopened"));
        check_files(dir.path(), &model, &format!("{way}, reopened"));
    }
}

/// A journal damaged on disk after its commit (bytes flipped near its end, in the
/// last of many settle groups) is reported, not applied: the settle fails naming
/// the source, point and cause, the groups already applied are undone (the
/// replica is point 1 exactly), every operation on the source fails with that
/// error, other sources are served, and the store reopens.
#[test]
fn a_damaged_journal_is_reported_not_applied() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 9 MiB of changes: more than two settle groups of a node (4 MiB), many of a
    // unit test's.
    let size = 10u64 << 20;
    let (store, mut images) =
        unsettled_store(dir.path(), size, 1, |rng, v2| rng.fill(&mut v2[..9 << 20]));
    let v1 = images.swap_remove(1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    // Another source, to be served whatever happens to this one.
    let other = |base: u64| SyncSpec {
        source: "other".parse().expect("name"),
        ..spec(64 * BS as u64, base)
    };
    let mut o1 = vec![0u8; 64 * BS as usize];
    rng.fill(&mut o1[..]);
    let mut txn = store.begin_sync(other(0)).expect("begin other");
    txn.apply(&diff_extents(&vec![0u8; o1.len()], &o1))
        .expect("apply other");
    txn.commit().expect("commit other");

    let src = dir.path().join("disk1").join("bulwark").join("vol");
    let journal = src.join("journal");
    let len = std::fs::metadata(&journal).expect("journal").len();
    assert!(
        len > 2 * (4 << 20),
        "the journal spans several settle groups"
    );
    let f = OpenOptions::new()
        .write(true)
        .open(&journal)
        .expect("journal");
    f.write_all_at(b"\xde\xad", len - 100).expect("damage");
    drop(f);

    let e = store.settle("vol").expect_err("a damaged journal settles");
    let msg = e.to_string();
    assert!(
        matches!(e, StoreError::SettleFailed { point: 2, .. }),
        "{msg}"
    );
    assert!(
        msg.contains("vol") && msg.contains("journal") && msg.contains("checksum"),
        "the error names the source, the file and the cause: {msg}"
    );
    assert!(
        msg.contains("written back to point 1, whole"),
        "the error says the replica is point 1: {msg}"
    );
    assert!(
        msg.contains("before 2 can still be restored"),
        "the error says what can still be read: {msg}"
    );
    let replica_is_point_1 = || {
        assert!(
            std::fs::read(src.join("replica")).expect("replica") == v1,
            "the replica is point 1"
        );
        assert!(
            stored_digests(&src.join("digests")) == digests_of(&v1),
            "the digests are point 1's"
        );
        assert!(
            !src.join("deltas").join(format!("{:020}.delta", 1)).exists(),
            "the partial delta was undone"
        );
    };
    replica_is_point_1();
    let fails = |store: &Store, ctx: &str| {
        for (what, r) in [
            ("restore", store.restore("vol", 2).map(|_| ())),
            ("restore of the newest", store.restore("vol", 0).map(|_| ())),
            ("view", store.open_view("vol", 0).map(|_| ())),
            ("view of point 2", store.open_view("vol", 2).map(|_| ())),
            ("digests", store.read_digests("vol", 0, 1).map(|_| ())),
            ("verify", store.verify("vol", 0).map(|_| ())),
            ("sync", store.begin_sync(spec(size, 2)).map(|_| ())),
            ("prune", store.prune("vol", 1).map(|_| ())),
        ] {
            match r {
                Err(e @ StoreError::SettleFailed { .. }) => assert!(
                    e.to_string().contains("checksum"),
                    "{ctx}: {what} names the cause: {e}"
                ),
                other => panic!("{ctx}: {what} gave {other:?}"),
            }
        }
        assert!(store.settle_failures().contains_key("vol"), "{ctx}");
        // The replica is point 1, whole: point 1 is still restorable and mountable.
        let got = read_point_to_vec(store, "vol", 1).expect("restore of point 1");
        assert!(got == v1, "{ctx}: point 1 restores exactly");
        let view = store.open_view("vol", 1).expect("view of point 1");
        assert!(read_view(&view) == v1, "{ctx}: the view of point 1");
        drop(view);
        let got = read_point_to_vec(store, "other", 1).expect("restore other");
        assert!(got == o1, "{ctx}: the other source");
    };
    fails(&store, "after the settle failed");
    assert!(journal.exists(), "the journal is kept");
    drop(store);
    let store = try_open(dir.path()).expect("reopen");
    replica_is_point_1();
    fails(&store, "reopened");
}

#[test]
fn a_stored_source_with_a_bad_name_is_refused_at_open_and_the_others_are_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 8 * BS as u64;
    let image: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    {
        let store = open(dir.path());
        sync(&store, &vec![0u8; size as usize], &image, 0);
    }
    // An older node (or a tampered database) holds a source named "..": its
    // record would put its folder outside `bulwark/`.
    {
        // sled lets go of its lock a moment after a drop (see `try_open_in`).
        let db = (0..500)
            .find_map(|_| {
                let r = sled::open(dir.path().join("data").join("meta"));
                if r.is_err() {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                r.ok()
            })
            .expect("sled");
        let sources = db.open_tree("sources").expect("tree");
        let vol = sources.get("vol").expect("read").expect("vol's record");
        let text = String::from_utf8(vol.to_vec()).expect("json");
        let hostile = text.replace("\"name\":\"vol\"", "\"name\":\"..\"");
        assert_ne!(hostile, text, "the record names its source");
        sources.insert("..", hostile.as_bytes()).expect("insert");
        sources
            .insert("ok-name", hostile.as_bytes())
            .expect("insert");
        db.flush().expect("flush");
    }
    let store = open(dir.path());
    let refused = store.refused_sources();
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(
        refused[".."].contains("invalid data source name"),
        "{refused:?}"
    );
    assert!(refused["ok-name"].contains("cannot be read"), "{refused:?}");
    let e = store.source("..").expect_err("refused");
    assert!(matches!(e, StoreError::Refused { .. }), "{e}");
    let names: Vec<String> = store
        .all_sources()
        .expect("sources")
        .into_iter()
        .map(|s| s.name.to_string())
        .collect();
    assert_eq!(names, ["vol"]);
    assert_eq!(read_point_to_vec(&store, "vol", 1).expect("restore"), image);
    assert!(store.usage().is_ok());
}

#[test]
fn a_locked_point_outlives_retention_space_pressure_and_drop() {
    use crate::store::lock::{LockAuthority, LockMode};
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("disk1")).expect("disk");
    let store = Store::open_with(
        &dir.path().join("data"),
        vec![PoolDisk {
            path: dir.path().join("disk1"),
            capacity_bytes: 1 << 40,
        }],
        PoolPolicy {
            auto_grow_bytes: 0,
            on_full: OnFull::PruneOldest,
            ..PoolPolicy::default()
        },
    )
    .expect("open");
    let size = 16 * BS as u64;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut images = vec![vec![0u8; size as usize]];
    // Recovery-point space for seven blocks of before-images: points 1 and 2 keep
    // three each, and a fourth sync of three more does not fit beside them.
    let points_alloc_bytes = 7 * (BS as u64 + 64);
    let small = |base: u64| {
        let mut s = spec(size, base);
        s.policy = Some(SourcePolicy {
            points_alloc_bytes,
            ..SourcePolicy::default()
        });
        s
    };
    // Three random blocks, the `n`-th set of three.
    let rewrite = |rng: &mut rand::rngs::StdRng, image: &mut [u8], n: usize| {
        let bs = BS as usize;
        rng.fill(&mut image[3 * n * bs..3 * (n + 1) * bs]);
    };
    for base in 0..3u64 {
        let mut next = images.last().expect("image").clone();
        if base == 0 {
            rng.fill(&mut next[..]);
        } else {
            rewrite(&mut rng, &mut next, base as usize);
        }
        let mut txn = store.begin_sync(small(base)).expect("begin");
        txn.apply(&diff_extents(images.last().expect("image"), &next))
            .expect("apply");
        txn.commit().expect("commit");
        store.settle("vol").expect("settle");
        images.push(next);
    }
    store
        .set_lock(
            "vol",
            Some((LockMode::Compliance, 3_600_000)),
            LockAuthority::Raise,
            bulwark_common::time::now_ms(),
        )
        .expect("lock");
    // Retention of one point: the lock keeps all three.
    let mut keep_one = SourcePolicy {
        points_alloc_bytes,
        ..SourcePolicy::default()
    };
    keep_one.retention.keep = 1;
    store
        .set_policy("vol", &keep_one, bulwark_common::time::now_ms())
        .expect("policy");
    assert_eq!(store.points("vol").expect("points").len(), 3);
    // A sync that needs more space than is left: prune-oldest would take a
    // locked point, so the sync is refused instead.
    let mut next = images.last().expect("image").clone();
    rewrite(&mut rng, &mut next, 3);
    let mut txn = store.begin_sync(small(3)).expect("begin");
    let e = txn
        .apply(&diff_extents(images.last().expect("image"), &next))
        .expect_err("refused for space");
    assert!(matches!(e, StoreError::LockedFull { point: 1, .. }), "{e}");
    txn.abort().expect("abort");
    // Neither a prune nor a drop goes through; the lock cannot be lowered.
    assert!(matches!(
        store.prune("vol", 1),
        Err(StoreError::Locked { .. })
    ));
    assert!(matches!(
        store.drop_source("vol"),
        Err(StoreError::Locked { .. })
    ));
    for who in [LockAuthority::Raise, LockAuthority::Officer] {
        let e = store
            .set_lock("vol", None, who, bulwark_common::time::now_ms())
            .expect_err("compliance");
        assert!(e.to_string().contains("can only be lengthened"), "{e}");
    }
    for (id, image) in images.iter().enumerate().skip(1) {
        assert_eq!(
            &read_point_to_vec(&store, "vol", id as u64).expect("restore"),
            image,
            "point {id}"
        );
    }
}

/// One run of the metadata store's contract: what the store's records rely on.
fn meta_store_contract(m: &dyn MetaStore) {
    let mut b = Batch::default();
    b.put(Tree::Points, point_key("a", 2), b"a2")
        .put(Tree::Points, point_key("a", 1), b"a1")
        .put(Tree::Points, point_key("ab", 1), b"ab1")
        .put(Tree::Sources, "a", b"src");
    m.apply(&b).expect("apply");
    m.flush().expect("flush");
    assert_eq!(
        m.get(Tree::Sources, b"a").expect("get"),
        Some(b"src".to_vec())
    );
    assert_eq!(
        m.get(Tree::Pending, b"a").expect("get"),
        None,
        "trees are apart"
    );
    let a: Vec<Vec<u8>> = m
        .scan(Tree::Points, &point_prefix("a"))
        .expect("scan")
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    assert_eq!(
        a,
        vec![b"a1".to_vec(), b"a2".to_vec()],
        "prefix scan in key order"
    );
    assert_eq!(
        m.last(Tree::Points, &point_prefix("a")).expect("last"),
        Some(b"a2".to_vec())
    );
    assert_eq!(m.scan(Tree::Points, b"").expect("all").len(), 3);
    let mut b = Batch::default();
    b.remove(Tree::Points, point_key("a", 2))
        .remove(Tree::Sources, "a")
        .remove(Tree::Settle, "nothing");
    m.apply(&b).expect("apply removes");
    assert_eq!(m.get(Tree::Sources, b"a").expect("get"), None);
    assert_eq!(
        m.last(Tree::Points, &point_prefix("a")).expect("last"),
        Some(b"a1".to_vec())
    );
}

#[test]
fn the_metadata_store_contract_holds_for_sled_and_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    meta_store_contract(&SledMeta::open(&dir.path().join("meta")).expect("sled"));
    meta_store_contract(&MemMeta::default());
}

/// A store with source `vol` at three points (two deltas) and source `other` at one;
/// returns `vol`'s images, oldest first.
fn two_sources(dir: &Path) -> Vec<Vec<u8>> {
    let size = 16 * BS as u64 + 100;
    let mut rng = rand::rngs::StdRng::seed_from_u64(24);
    let store = open(dir);
    let mut images = vec![vec![0u8; size as usize]];
    for base in 0..3u64 {
        let mut next = images[base as usize].clone();
        scribble(&mut rng, &mut next, 6);
        sync(&store, &images[base as usize], &next, base);
        images.push(next);
    }
    let other = SyncSpec {
        source: "other".parse().expect("name"),
        ..spec(8 * BS as u64, 0)
    };
    let mut txn = store.begin_sync(other).expect("begin other");
    txn.apply(&diff_extents(
        &[0u8; 8 * BS as usize],
        &[7u8; 8 * BS as usize],
    ))
    .expect("apply other");
    txn.commit().expect("commit other");
    images.remove(0);
    images
}

fn vol_dir(dir: &Path) -> PathBuf {
    dir.join("disk1").join("bulwark").join("vol")
}

/// `vol` is refused at open with `why` naming `path`; `other` is served.
fn assert_only_vol_refused(dir: &Path, path: &Path, why: &str) {
    let store = open(dir);
    let refused = store.refused_sources();
    assert_eq!(refused.len(), 1, "{refused:?}");
    let msg = &refused["vol"];
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains(why),
        "the refusal names the file and says why ({why}): {msg}"
    );
    let e = store.source("vol").expect_err("vol is refused");
    assert!(matches!(e, StoreError::Refused { .. }), "{e}");
    assert!(e.to_string().contains(why), "{e}");
    assert!(store.restore("vol", 0).is_err(), "nothing of vol is read");
    assert_eq!(
        read_point_to_vec(&store, "other", 0).expect("other restores"),
        vec![7u8; 8 * BS as usize]
    );
    let names: Vec<String> = store
        .all_sources()
        .expect("sources")
        .into_iter()
        .map(|s| s.name.to_string())
        .collect();
    assert_eq!(names, vec!["other".to_string()]);
}

#[test]
fn a_data_file_of_a_newer_format_refuses_its_source_and_the_others_are_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    two_sources(dir.path());
    let delta = delta_path(&vol_dir(dir.path()), 1);
    let f = OpenOptions::new().write(true).open(&delta).expect("delta");
    f.write_all_at(&9u32.to_le_bytes(), 8).expect("version 9");
    drop(f);
    assert_only_vol_refused(dir.path(), &delta, "format version 9, this node reads 2");
    // The digests file too.
    let dir = tempfile::tempdir().expect("tempdir");
    two_sources(dir.path());
    let digests = vol_dir(dir.path()).join("digests");
    let f = OpenOptions::new()
        .write(true)
        .open(&digests)
        .expect("digests");
    f.write_all_at(&3u32.to_le_bytes(), 8).expect("version 3");
    drop(f);
    assert_only_vol_refused(dir.path(), &digests, "format version 3, this node reads 2");
}

#[test]
fn a_data_file_with_a_wrong_magic_is_refused_with_the_file_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    two_sources(dir.path());
    let delta = delta_path(&vol_dir(dir.path()), 2);
    let f = OpenOptions::new().write(true).open(&delta).expect("delta");
    f.write_all_at(b"BWKDIGST", 0)
        .expect("another kind's magic");
    drop(f);
    let e = DeltaReader::open(&delta, Geometry::new(16 * BS as u64 + 100, BS).expect("g"))
        .err()
        .expect("a reader refuses it");
    assert!(
        e.to_string().contains(&delta.display().to_string())
            && e.to_string().contains("not a Bulwark delta file"),
        "{e}"
    );
    assert_only_vol_refused(dir.path(), &delta, "not a Bulwark delta file");
}

#[test]
fn data_files_without_a_header_are_read_as_format_version_0() {
    let dir = tempfile::tempdir().expect("tempdir");
    let images = two_sources(dir.path());
    // As a node before the header wrote them: the same content, no header.
    let src = vol_dir(dir.path());
    let mut files = vec![src.join("digests")];
    for p in [1, 2] {
        files.push(delta_path(&src, p));
    }
    for path in &files {
        let bytes = std::fs::read(path).expect("read");
        assert_eq!(&bytes[..3], b"BWK", "{} has a header", path.display());
        std::fs::write(path, &bytes[FILE_HEADER_LEN as usize..]).expect("strip");
    }
    let store = open(dir.path());
    assert!(store.refused_sources().is_empty());
    for (i, image) in images.iter().enumerate() {
        let got = read_point_to_vec(&store, "vol", i as u64 + 1).expect("restore");
        assert!(&got == image, "point {} restores as before", i + 1);
        let view = store.open_view("vol", i as u64 + 1).expect("view");
        assert!(&read_view(&view) == image, "view of point {}", i + 1);
    }
    let v = store.verify("vol", 0).expect("verify");
    assert!(v.damaged_replica.is_empty() && v.damaged_points.is_empty());
    // A next sync, its settle and a merge of the old deltas work on them too.
    let mut next = images[2].clone();
    scribble(&mut rand::rngs::StdRng::seed_from_u64(5), &mut next, 4);
    sync(&store, &images[2], &next, 3);
    store.prune("vol", 2).expect("prune merges a legacy delta");
    for (id, image) in [(1, &images[0]), (3, &images[2]), (4, &next)] {
        let got = read_point_to_vec(&store, "vol", id).expect("restore");
        assert!(&got == image, "point {id} after the sync and the merge");
    }
    let merged = std::fs::read(delta_path(&src, 1)).expect("merged delta");
    assert_eq!(&merged[..8], b"BWKDELTA", "a merge writes the header");
}

/// Compressed records (see `compress_tests.rs`), with this file's helpers.
#[path = "compress_tests.rs"]
mod compression;
