//! Compressed records (`compress.rs`, `delta.rs` kind 2): round trips, raw
//! fallback, damage, mixed stores, older files, hostile frames.

use super::*;

/// A store in `dir` whose records are compressed as `c` says (the journal too).
fn open_with(dir: &Path, c: Compression) -> Store {
    open_policy(
        dir,
        PoolPolicy {
            compression: c,
            journal_compression: c,
            ..PoolPolicy::default()
        },
    )
}

/// A store in `dir` with `policy`.
fn open_policy(dir: &Path, policy: PoolPolicy) -> Store {
    std::fs::create_dir_all(dir.join("disk1")).expect("disk dir");
    let mut tries = 0;
    loop {
        let r = Store::open_with(
            &dir.join("data"),
            vec![PoolDisk {
                path: dir.join("disk1"),
                capacity_bytes: 1 << 40,
            }],
            policy,
        );
        match r {
            // sled lets go of its lock a moment after the previous store drops.
            Err(StoreError::Meta(m)) if m.contains("could not acquire lock") && tries < 500 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => return r.expect("open"),
        }
    }
}

/// Bytes that compress well and differ from seed to seed: text-like lines.
fn compressible(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut i = seed;
    while out.len() < len {
        out.extend_from_slice(format!("{i:08} log line of seed {seed}: all is well\n").as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

/// `image` with every `every`-th block rewritten (compressible), plus one
/// random run (incompressible).
fn change(image: &[u8], seed: u64, every: usize) -> Vec<u8> {
    let mut next = image.to_vec();
    let bs = BS as usize;
    for (i, block) in next.chunks_mut(bs).enumerate() {
        if (i + seed as usize).is_multiple_of(every) {
            let fresh = compressible(block.len(), seed * 1000 + i as u64);
            block.copy_from_slice(&fresh);
        }
    }
    scribble(&mut rand::rngs::StdRng::seed_from_u64(seed), &mut next, 2);
    next
}

/// Every point restores and views as its image, and a verify finds nothing.
fn check_all(store: &Store, images: &[Vec<u8>], ctx: &str) {
    if images.is_empty() {
        return;
    }
    for p in store.points("vol").expect("points") {
        let want = &images[p.id as usize - 1];
        let got = read_point_to_vec(store, "vol", p.id).expect("restore");
        assert!(&got == want, "{ctx}: point {} restores byte for byte", p.id);
        let view = store.open_view("vol", p.id).expect("view");
        assert!(&read_view(&view) == want, "{ctx}: view of point {}", p.id);
    }
    let v = store.verify("vol", 0).expect("verify");
    assert!(
        v.damaged_replica.is_empty() && v.damaged_points.is_empty(),
        "{ctx}: {v:?}"
    );
}

/// Syncs `n` changed images after `images`' last (the first sync when empty).
fn sync_more(store: &Store, images: &mut Vec<Vec<u8>>, n: usize, size: usize) {
    for _ in 0..n {
        let seed = images.len() as u64 + 1;
        let (old, next) = match images.last() {
            Some(last) => (last.clone(), change(last, seed, 3)),
            None => (vec![0u8; size], compressible(size, seed)),
        };
        sync(store, &old, &next, images.len() as u64);
        images.push(next);
    }
}

/// The records of a delta: (block, data offset, compressed length).
fn records_of(path: &Path, g: Geometry) -> Vec<(u64, Option<u64>, Option<u32>)> {
    let mut r = DeltaReader::open(path, g).expect("open delta");
    let mut out = Vec::new();
    while let Some(rec) = r.next_record(false).expect("record") {
        out.push((rec.block, rec.data_offset, rec.compressed_len));
    }
    out
}

#[test]
fn compressed_records_round_trip_through_restore_views_verify_and_merge() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_with(dir.path(), Compression::Zstd(3));
    let size = 40 * BS as usize + 100;
    let mut images = Vec::new();
    sync_more(&store, &mut images, 5, size);
    let g = Geometry::new(size as u64, BS).expect("g");
    let points = store.points("vol").expect("points");
    let with_delta: Vec<&PointMeta> = points.iter().filter(|p| p.delta.is_some()).collect();
    assert_eq!(with_delta.len(), 4);
    for p in &with_delta {
        assert!(
            p.stored_bytes() < p.logical_bytes() * 3 / 4,
            "point {}: {} stored of {} logical",
            p.id,
            p.stored_bytes(),
            p.logical_bytes()
        );
        let path = delta_path(&vol_dir(dir.path()), p.id);
        assert_eq!(
            std::fs::metadata(&path).expect("delta").len(),
            p.stored_bytes(),
            "stored bytes are the file's length"
        );
        let recs = records_of(&path, g);
        assert!(recs.iter().any(|r| r.2.is_some()), "compressed records");
    }
    check_all(&store, &images, "zstd:3");
    // A merge carries the frames over as they are.
    store.prune("vol", 3).expect("prune a middle point");
    check_all(&store, &images, "after a merge");
    let points = store.points("vol").expect("points");
    let merged = &points[1];
    assert_eq!(merged.id, 2);
    assert!(merged.stored_bytes() < merged.logical_bytes());
}

#[test]
fn an_incompressible_record_is_kept_raw() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_with(dir.path(), Compression::Zstd(19));
    let size = 16 * BS as usize;
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut one = vec![0u8; size];
    rng.fill(&mut one[..]);
    let mut two = vec![0u8; size];
    rng.fill(&mut two[..]);
    sync(&store, &vec![0u8; size], &one, 0);
    sync(&store, &one, &two, 1);
    let p = store.points("vol").expect("points").remove(0);
    assert_eq!(p.stored_bytes(), p.logical_bytes(), "random bytes stay raw");
    let g = Geometry::new(size as u64, BS).expect("g");
    let recs = records_of(&delta_path(&vol_dir(dir.path()), 1), g);
    assert_eq!(recs.len(), 16);
    assert!(
        recs.iter().all(|r| r.1.is_some() && r.2.is_none()),
        "{recs:?}"
    );
    check_all(&store, &[one, two], "random");
}

#[test]
fn a_damaged_compressed_record_is_found_by_verify_and_never_restored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_with(dir.path(), Compression::Zstd(1));
    let size = 24 * BS as usize;
    let mut images = Vec::new();
    sync_more(&store, &mut images, 3, size);
    let g = Geometry::new(size as u64, BS).expect("g");
    let path = delta_path(&vol_dir(dir.path()), 1);
    let (block, at, len) = records_of(&path, g)
        .into_iter()
        .find_map(|(b, at, len)| Some((b, at?, len?)))
        .expect("a compressed record");
    // Flip bytes in the frame's middle (its header stays valid).
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("delta");
    for k in [len as u64 / 2, len as u64 - 2] {
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at + k).expect("read");
        f.write_all_at(&[b[0] ^ 0x5a], at + k).expect("flip");
    }
    drop(f);
    let v = store.verify("vol", 0).expect("verify");
    assert_eq!(v.damaged_points, vec![(1, vec![block])], "{v:?}");
    let e = read_point_to_vec(&store, "vol", 1).expect_err("point 1 is not served");
    assert!(matches!(e, StoreError::PointDamaged { .. }), "{e}");
    // Not through a reader that ignores the mark either.
    let mut r = DeltaReader::open(&path, g).expect("open");
    let e = loop {
        match r.next_record(false) {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the damaged record was read as good"),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(e, StoreError::Damaged { .. })
            && e.to_string().contains(&format!("block {block}")),
        "{e}"
    );
    // The other points are intact.
    for id in [2, 3] {
        let got = read_point_to_vec(&store, "vol", id).expect("restore");
        assert!(got == images[id as usize - 1], "point {id}");
    }
}

#[test]
fn a_store_of_raw_and_compressed_records_restores_every_point() {
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 32 * BS as usize + 7;
    let mut images = Vec::new();
    for (c, n) in [
        (Compression::Off, 3),
        (Compression::Zstd(1), 3),
        (Compression::Off, 2),
        (Compression::Zstd(5), 1),
    ] {
        let store = open_with(dir.path(), c);
        check_all(&store, &images, &format!("reopened with {c}"));
        sync_more(&store, &mut images, n, size);
        check_all(&store, &images, &format!("synced with {c}"));
    }
    let store = open_with(dir.path(), Compression::Off);
    let points = store.points("vol").expect("points");
    // Points 1-2 were written raw; 3-5 compressed (point 3's delta by the settle
    // of point 4, under zstd:1).
    assert_eq!(points[0].stored_bytes(), points[0].logical_bytes());
    assert!(points[3].stored_bytes() < points[3].logical_bytes());
    // Merges across both kinds, with compression off and on.
    store.prune("vol", 3).expect("prune");
    drop(store);
    let store = open_with(dir.path(), Compression::Zstd(1));
    store.prune("vol", 6).expect("prune");
    for p in store.points("vol").expect("points") {
        let got = read_point_to_vec(&store, "vol", p.id).expect("restore");
        assert!(
            got == images[p.id as usize - 1],
            "point {} after merges",
            p.id
        );
    }
    let v = store.verify("vol", 0).expect("verify");
    assert!(v.damaged_points.is_empty() && v.damaged_replica.is_empty());
}

#[test]
fn files_of_format_version_1_are_read_as_they_are() {
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 20 * BS as usize;
    let mut images = Vec::new();
    {
        let store = open_with(dir.path(), Compression::Off);
        sync_more(&store, &mut images, 4, size);
    }
    // As a node of version 1 wrote them: raw records, version 1 in the header.
    let src = vol_dir(dir.path());
    let mut files = vec![src.join("digests")];
    files.extend((1..4).map(|p| delta_path(&src, p)));
    for path in &files {
        let f = OpenOptions::new().write(true).open(path).expect("open");
        f.write_all_at(&1u32.to_le_bytes(), 8).expect("version 1");
    }
    let store = open_with(dir.path(), Compression::Zstd(1));
    assert!(store.refused_sources().is_empty());
    check_all(&store, &images, "version 1 files");
    sync_more(&store, &mut images, 1, size);
    store.prune("vol", 2).expect("merge a version 1 delta");
    let merged = std::fs::read(delta_path(&src, 1)).expect("merged");
    assert_eq!(
        &merged[8..12],
        &2u32.to_le_bytes(),
        "a merge writes version 2"
    );
    for id in [1, 3, 4, 5] {
        let got = read_point_to_vec(&store, "vol", id).expect("restore");
        assert!(got == images[id as usize - 1], "point {id}");
    }
}

/// A frame whose header claims 1 TiB of content, then an RLE block of 100,000
/// zeros: more than any block.
fn frame_claiming_a_terabyte() -> Vec<u8> {
    let mut f = vec![0x28, 0xb5, 0x2f, 0xfd];
    // Frame header descriptor: 8-byte content size, single segment.
    f.push(0b1110_0000);
    f.extend_from_slice(&(1u64 << 40).to_le_bytes());
    // Last block, RLE, 100,000 bytes regenerated: (size << 3) | (1 << 1) | 1.
    let header = (100_000u32 << 3) | (1 << 1) | 1;
    f.extend_from_slice(&header.to_le_bytes()[..3]);
    f.push(0);
    f
}

#[test]
fn a_hostile_frame_is_refused_without_allocating_what_it_claims() {
    let dir = tempfile::tempdir().expect("tempdir");
    let g = Geometry::new(8 * BS as u64, BS).expect("g");
    let zeros = vec![0u8; BS as usize];
    let mut two_blocks = Vec::new();
    assert!(compress::compress_block(
        Compression::Zstd(1),
        &vec![0u8; 2 * BS as usize],
        &mut two_blocks
    ));
    for (what, frame) in [
        ("claims 1 TiB", frame_claiming_a_terabyte()),
        ("decodes to two blocks", two_blocks),
        ("is not zstd", b"\x28\xb5\x2f\xfd garbage".to_vec()),
    ] {
        assert!(
            frame.len() < BS as usize,
            "{what}: a frame shorter than a block"
        );
        let path = dir.path().join(format!("{}.delta", what.replace(' ', "-")));
        let mut buf = DataFile::Delta.header().to_vec();
        encode_record(
            &mut buf,
            3,
            Digest::of(&zeros),
            Payload::Zstd(&frame),
            BS as usize,
        );
        std::fs::write(&path, &buf).expect("write");
        let mut r = DeltaReader::open(&path, g).expect("open");
        let e = r.next_record(false).expect_err(what);
        assert!(
            matches!(e, StoreError::Damaged { .. }) && e.to_string().contains("block 3"),
            "{what}: {e}"
        );
        // A verify-style read marks it damaged and hands out nothing.
        let mut r = DeltaReader::open(&path, g).expect("open");
        let rec = r
            .next_record_where(false, &|_| false, true)
            .expect(what)
            .expect("a record");
        assert!(!rec.intact && rec.data.is_none(), "{what}: {rec:?}");
        // Recovery reads it as the torn end of the file.
        let mut r = DeltaReader::open(&path, g).expect("open");
        assert!(r.next_record(true).expect(what).is_none(), "{what}");
    }
    // A frame header that says the frame is a block long or more is refused
    // before anything of it is read.
    let path = dir.path().join("long.delta");
    let mut buf = DataFile::Delta.header().to_vec();
    let long = vec![7u8; BS as usize];
    encode_record(
        &mut buf,
        1,
        Digest::of(&long),
        Payload::Zstd(&long),
        BS as usize,
    );
    std::fs::write(&path, &buf).expect("write");
    let e = DeltaReader::open(&path, g)
        .expect("open")
        .next_record(false)
        .expect_err("too long");
    assert!(e.to_string().contains("does not fit the block"), "{e}");
}

#[test]
fn a_syncs_journal_holds_compressed_records_and_settles_from_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_with(dir.path(), Compression::Zstd(1));
    let size = 24 * BS as usize;
    let one = compressible(size, 1);
    sync(&store, &vec![0u8; size], &one, 0);
    let two = change(&one, 2, 2);
    commit_unsettled(&store, &one, &two, 1, 3);
    let g = Geometry::new(size as u64, BS).expect("g");
    let journal = journal_path(&vol_dir(dir.path()));
    let recs = records_of(&journal, g);
    assert!(recs.iter().any(|r| r.2.is_some()), "compressed: {recs:?}");
    let raw: u64 = FILE_HEADER_LEN
        + recs
            .iter()
            .map(|r| 53 + r.1.map_or(0, |_| g.block_len(r.0)))
            .sum::<u64>();
    let len = std::fs::metadata(&journal).expect("journal").len();
    assert!(
        len < raw,
        "the journal takes {len} bytes, raw it would take {raw}"
    );
    store.settle("vol").expect("settle");
    check_all(&store, &[one, two], "settled from a compressed journal");
}

/// The default policy: the journal stays raw (a sync compresses nothing), and the
/// settle compresses the point's before-images all the same.
#[test]
fn by_default_the_journal_is_raw_and_the_settle_compresses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_policy(dir.path(), PoolPolicy::default());
    let size = 24 * BS as usize;
    let one = compressible(size, 1);
    sync(&store, &vec![0u8; size], &one, 0);
    let two = change(&one, 2, 2);
    commit_unsettled(&store, &one, &two, 1, 3);
    let g = Geometry::new(size as u64, BS).expect("g");
    let recs = records_of(&journal_path(&vol_dir(dir.path())), g);
    assert!(!recs.is_empty(), "the journal holds the sync's blocks");
    assert!(recs.iter().all(|r| r.2.is_none()), "all raw: {recs:?}");
    store.settle("vol").expect("settle");
    let three = change(&two, 3, 3);
    sync(&store, &two, &three, 2);
    let points = store.points("vol").expect("points");
    assert!(
        points.iter().any(|p| p.stored_bytes() < p.logical_bytes()),
        "the settle compressed no point: {points:?}"
    );
    check_all(&store, &[one, two, three], "raw journal, compressed points");
}

#[test]
fn an_open_view_reads_the_compressed_before_images_a_later_settle_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_with(dir.path(), Compression::Zstd(1));
    let size = 24 * BS as usize + 300;
    let mut images = Vec::new();
    sync_more(&store, &mut images, 1, size);
    // Open before point 2 exists: the settle of point 2 tells it where point 1's
    // before-images went (compressed), before it overwrites the replica.
    let view = store.open_view("vol", 1).expect("view");
    sync_more(&store, &mut images, 2, size);
    let p = store.points("vol").expect("points").remove(0);
    assert!(p.stored_bytes() < p.logical_bytes(), "{p:?}");
    assert!(
        read_view(&view) == images[0],
        "the view still shows point 1"
    );
}
