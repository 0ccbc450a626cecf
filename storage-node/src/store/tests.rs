//! Store tests: syncs, restores of every point, rollback after failures and crashes.

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
    std::fs::create_dir_all(dir.join("disk1")).expect("disk dir");
    Store::open(
        &dir.join("data"),
        vec![PoolDisk {
            path: dir.join("disk1"),
            capacity_bytes: 1 << 40,
        }],
    )
    .expect("open store")
}

fn spec(size: u64, base: u64) -> SyncSpec {
    SyncSpec {
        source: "vol".into(),
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
    let mut txn = store
        .begin_sync(spec(image.len() as u64, base))
        .expect("begin");
    for chunk in diff_extents(old, image).chunks(3) {
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
