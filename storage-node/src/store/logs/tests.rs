//! Log sources: ships, restores, refusals, crash cuts, retention.

use std::path::Path;

use super::*;
use crate::store::{Compression, PoolDisk, PoolPolicy, SourcePolicy};
use bulwark_common::name::SourceName;
use bulwark_common::point::PointKind;

fn wal() -> SourceName {
    SourceName::parse("wal").expect("a valid name")
}

/// A store in `dir` with the pool's default compression (zstd).
fn store(dir: &Path) -> Store {
    store_with(dir, Compression::default())
}

/// A store in `dir` whose log chunks are compressed as `c` says.
fn store_with(dir: &Path, c: Compression) -> Store {
    let disk = dir.join("disk");
    std::fs::create_dir_all(&disk).expect("disk");
    // sled lets go of its lock a moment after a drop (see the store's tests).
    for _ in 0..500 {
        match Store::open_with(
            &dir.join("data"),
            vec![PoolDisk {
                path: disk.clone(),
                capacity_bytes: 1 << 40,
            }],
            PoolPolicy {
                compression: c,
                ..PoolPolicy::default()
            },
        ) {
            Err(StoreError::Meta(m)) if m.contains("could not acquire lock") => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => return r.expect("open"),
        }
    }
    panic!("the metadata store stayed locked")
}

fn ship(s: &Store, files: &[(&str, u64, bool, &[u8])]) -> PointMeta {
    let mut t = s.begin_log_ship(&wal(), None).expect("begin");
    for (name, off, restart, data) in files {
        t.start_file(name, *off, *restart, 1, 2, 3, "")
            .expect("start");
        t.append(data, blake3::hash(data).as_bytes())
            .expect("append");
    }
    t.commit().expect("commit").0
}

fn contents(s: &Store, point: u64) -> Vec<(String, Vec<u8>)> {
    let (_, files) = s.log_restore("wal", point).expect("restore");
    files
        .into_iter()
        .map(|f| {
            let copy = f.open().expect("open the copy");
            let mut data = Vec::new();
            for p in &f.pieces {
                data.extend_from_slice(&copy.read(p).expect("read a piece"));
            }
            assert_eq!(data.len() as u64, f.length());
            (f.name.clone(), data)
        })
        .collect()
}

#[test]
fn appends_restarts_and_points_see_their_own_state() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = store(dir.path());
    let p1 = ship(&s, &[("a", 0, false, b"one "), ("b", 0, false, b"x")]);
    let p2 = ship(&s, &[("a", 4, false, b"two")]);
    let p3 = ship(&s, &[("b", 0, true, b"new b")]);
    assert_eq!(p1.kind, PointKind::Log);
    assert_eq!(
        contents(&s, p1.id),
        vec![("a".into(), b"one ".to_vec()), ("b".into(), b"x".to_vec())]
    );
    assert_eq!(
        contents(&s, p2.id),
        vec![
            ("a".into(), b"one two".to_vec()),
            ("b".into(), b"x".to_vec())
        ]
    );
    assert_eq!(
        contents(&s, p3.id),
        vec![
            ("a".into(), b"one two".to_vec()),
            ("b".into(), b"new b".to_vec())
        ]
    );
    // The manifest has the current generations and their anchors.
    let ship = s.begin_log_ship(&wal(), None).expect("begin");
    let m = ship.manifest();
    assert_eq!(m.len(), 2, "current generations only");
    let b = m.iter().find(|f| f.name == "b").expect("b");
    assert_eq!(b.generation, 2);
    assert_eq!(b.head_hash, blake3::hash(b"new b").to_hex().to_string());
    let v = s.verify_logs("wal").expect("verify");
    assert!(v.damaged_points.is_empty());
}

#[test]
fn refuses_gaps_bad_checksums_and_bad_names_and_keeps_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = store(dir.path());
    ship(&s, &[("a", 0, false, b"hello")]);
    let mut t = s.begin_log_ship(&wal(), None).expect("begin");
    let e = t.start_file("a", 3, false, 1, 2, 3, "").expect_err("gap");
    assert!(e.to_string().contains("holds 5 bytes"), "{e}");
    let mut t = s.begin_log_ship(&wal(), None).expect("begin");
    t.start_file("a", 5, false, 1, 2, 3, "").expect("start");
    t.append(b" world", blake3::hash(b" world").as_bytes())
        .expect("append");
    let e = t.append(b"xx", &[0u8; 32]).expect_err("checksum");
    assert!(e.to_string().contains("checksum"), "{e}");
    drop(t);
    for bad in ["", "..", "a/b"] {
        let mut t = s.begin_log_ship(&wal(), None).expect("begin");
        assert!(t.start_file(bad, 0, false, 1, 2, 3, "").is_err(), "{bad:?}");
    }
    // The failed ship left the copy at its committed length.
    assert_eq!(contents(&s, 0), vec![("a".into(), b"hello".to_vec())]);
    let meta = s.source("wal").expect("meta").expect("some");
    assert_eq!(
        std::fs::metadata(copy_path(&meta, 1)).expect("stat").len(),
        5
    );
}

#[test]
fn uncommitted_bytes_are_cut_at_open() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = store(dir.path());
    ship(&s, &[("a", 0, false, b"hello")]);
    let mut t = s.begin_log_ship(&wal(), None).expect("begin");
    t.start_file("a", 5, false, 1, 2, 3, "").expect("start");
    t.append(b" world", blake3::hash(b" world").as_bytes())
        .expect("append");
    t.start_file("c", 0, false, 1, 2, 3, "").expect("start");
    t.append(b"c", blake3::hash(b"c").as_bytes())
        .expect("append");
    // A crash: nothing undone.
    t.done = true;
    drop(t);
    drop(s);
    let s = store(dir.path());
    assert_eq!(contents(&s, 0), vec![("a".into(), b"hello".to_vec())]);
    let meta = s.source("wal").expect("meta").expect("some");
    let left: Vec<_> = std::fs::read_dir(meta.dir().join("logs"))
        .expect("dir")
        .collect();
    assert_eq!(left.len(), 1);
}

#[test]
fn retention_keeps_the_logs_the_groups_oldest_volume_point_needs() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = store(dir.path());
    let mut ids = Vec::new();
    for i in 0..4u8 {
        ids.push(ship(&s, &[(&format!("seg{i}"), 0, false, &[i; 10][..])]).id);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let points = s.points("wal").expect("points");
    let keep_one = SourcePolicy {
        retention: bulwark_common::retention::Retention {
            keep: 1,
            ..Default::default()
        },
        // The oldest volume point was made between the 2nd and 3rd ships.
        keep_after_ms: points[2].created_ms,
        ..Default::default()
    };
    let now = bulwark_common::time::now_ms();
    let dropped = s.set_policy("wal", &keep_one, now).expect("policy");
    assert_eq!(
        dropped,
        vec![ids[0]],
        "only ships before the one before the floor go"
    );
    let no_floor = SourcePolicy {
        keep_after_ms: 0,
        ..keep_one
    };
    let dropped = s.set_policy("wal", &no_floor, now).expect("policy");
    assert_eq!(dropped, vec![ids[1], ids[2]]);
    // The files no remaining point needs went with them... except files still
    // on the host, which stay whole (none here is gone, so all stay).
    assert_eq!(contents(&s, 0).len(), 4);
}

#[test]
fn retention_keeps_files_still_needed_and_drops_deleted_ones() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = store(dir.path());
    let p1 = ship(&s, &[("a", 0, false, b"aaa"), ("b", 0, false, b"bbb")]);
    // b is deleted on the host after shipping.
    let mut t = s.begin_log_ship(&wal(), None).expect("begin");
    t.gone(&["b".to_string()]);
    let p2 = t.commit().expect("commit").0;
    let p3 = ship(&s, &[("a", 3, false, b"A")]);
    // Still restorable at every point while points that shipped it exist.
    assert_eq!(contents(&s, p3.id).len(), 2);
    s.prune("wal", p1.id).expect("prune");
    // p1 shipped b's only bytes and b is gone: dropped. a is kept whole.
    assert_eq!(contents(&s, p3.id), vec![("a".into(), b"aaaA".to_vec())]);
    assert_eq!(contents(&s, p2.id), vec![("a".into(), b"aaa".to_vec())]);
    assert_eq!(s.log_bytes("wal").expect("bytes"), 4);
}

/// Text-like log lines: compressible, different from seed to seed.
fn log_text(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 80);
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(
            format!("2026-12-07T22:{:02}:{:02} seed {seed} line {i}: checkpoint complete, wrote {} buffers\n", i % 60, (i * 7) % 60, i * 13 % 997)
                .as_bytes(),
        );
        i += 1;
    }
    out.truncate(len);
    out
}

/// Ships `data` appended to file `name` (whose node length is `at`) in pieces of
/// at most `piece` bytes.
fn ship_pieces(s: &Store, name: &str, at: u64, data: &[u8], piece: usize) -> PointMeta {
    let mut t = s.begin_log_ship(&wal(), None).expect("begin");
    t.start_file(name, at, false, 1, 2, 3, "").expect("start");
    for p in data.chunks(piece) {
        t.append(p, blake3::hash(p).as_bytes()).expect("append");
    }
    t.commit().expect("commit").0
}

/// Every point restores as `want[point - 1]` (a model of one file, `name`).
fn check_points(s: &Store, name: &str, want: &[Vec<u8>], ctx: &str) {
    for p in s.points("wal").expect("points") {
        let got = contents(s, p.id);
        assert_eq!(got.len(), 1, "{ctx}: point {}", p.id);
        assert_eq!(got[0].0, name);
        assert!(
            got[0].1 == want[p.id as usize - 1],
            "{ctx}: point {} restores byte for byte ({} bytes, want {})",
            p.id,
            got[0].1.len(),
            want[p.id as usize - 1].len()
        );
    }
    let v = s.verify_logs("wal").expect("verify");
    assert!(v.damaged_points.is_empty(), "{ctx}: {v:?}");
}

/// Ships `sizes` of log text into `a.log`, one ship each (pieces of `piece`
/// bytes), and pushes the file as of each new point onto `model`.
fn ship_text(s: &Store, model: &mut Vec<Vec<u8>>, sizes: &[usize], piece: usize) {
    for (i, n) in sizes.iter().enumerate() {
        let mut file = model.last().cloned().unwrap_or_default();
        let more = log_text(*n, model.len() as u64 * 100 + i as u64);
        ship_pieces(s, "a.log", file.len() as u64, &more, piece);
        file.extend_from_slice(&more);
        model.push(file);
    }
}

#[test]
fn compressed_chunks_restore_byte_for_byte_at_every_point_and_take_less() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = store_with(dir.path(), Compression::Zstd(1));
    let mut model = Vec::new();
    // Pieces of one byte to a whole MAX_PIECE, ships smaller and larger than
    // the anchors.
    ship_text(&s, &mut model, &[1, 100, 5000, 300_000], 64 * 1024);
    ship_text(&s, &mut model, &[MAX_PIECE + 17, 3000], MAX_PIECE);
    check_points(&s, "a.log", &model, "zstd");
    let f = &s.log_files("wal").expect("files")[0];
    assert!(f.chunks.iter().any(|c| c.codec == ChunkCodec::Zstd));
    assert!(
        f.chunks.iter().any(|c| c.codec == ChunkCodec::Raw),
        "a one-byte piece does not shrink"
    );
    let (stored, logical) = s.log_bytes_both("wal").expect("bytes");
    let full = model.last().expect("shipped").len() as u64;
    assert_eq!(logical, full);
    assert!(stored * 4 < logical, "stored {stored} of {logical}");
    let meta = s.source("wal").expect("meta").expect("some");
    assert_eq!(
        std::fs::metadata(copy_path(&meta, f.id))
            .expect("stat")
            .len(),
        stored,
        "the copy holds the stored bytes"
    );
    // Points and the source report both.
    for p in s.points("wal").expect("points") {
        assert_eq!(p.logical_bytes(), p.bytes_changed);
        if p.bytes_changed > 1000 {
            assert!(
                p.stored_bytes() < p.logical_bytes(),
                "point {}: {p:?}",
                p.id
            );
        }
    }
    let u = s.usage().expect("usage");
    let src = u.sources.iter().find(|x| x.name == "wal").expect("wal");
    assert_eq!(
        (src.points_used_bytes, src.points_logical_bytes),
        (stored, logical)
    );
}

#[test]
fn a_copy_of_raw_and_compressed_chunks_restores_and_old_records_read() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut model = Vec::new();
    {
        let s = store_with(dir.path(), Compression::Off);
        ship_text(&s, &mut model, &[10_000, 70_000], 32 * 1024);
        let f = &s.log_files("wal").expect("files")[0];
        assert!(
            f.chunks
                .iter()
                .all(|c| c.codec == ChunkCodec::Raw && c.stored_end.is_none())
        );
        // A record of a node before log compression has neither field.
        let json = String::from_utf8(encode(f).expect("encode")).expect("utf8");
        assert!(
            !json.contains("stored_end") && !json.contains("codec"),
            "{json}"
        );
    }
    {
        let s = store_with(dir.path(), Compression::Zstd(3));
        check_points(&s, "a.log", &model, "raw, read by a compressing store");
        ship_text(&s, &mut model, &[50_000, 200_000], 64 * 1024);
    }
    let s = store_with(dir.path(), Compression::Off);
    ship_text(&s, &mut model, &[40_000], 16 * 1024);
    check_points(&s, "a.log", &model, "mixed");
    let f = &s.log_files("wal").expect("files")[0];
    let last = f.chunks.last().expect("chunks");
    assert_eq!(last.codec, ChunkCodec::Raw);
    assert!(
        last.stored_end.is_some_and(|e| e < last.end),
        "a raw chunk after compressed ones records where it is stored: {last:?}"
    );
    assert!(f.chunks.iter().any(|c| c.codec == ChunkCodec::Zstd));
}

#[test]
fn anchors_are_over_the_logical_bytes_whatever_the_codec() {
    let text = log_text(3 * MAX_PIECE / 2, 7);
    let mut anchors = Vec::new();
    for c in [Compression::Off, Compression::Zstd(1)] {
        let dir = tempfile::tempdir().expect("tmp");
        let s = store_with(dir.path(), c);
        ship_pieces(&s, "a.log", 0, &text[..3000], 1000);
        ship_pieces(&s, "a.log", 3000, &text[3000..], 100_000);
        let t = s.begin_log_ship(&wal(), None).expect("begin");
        let m = t.manifest();
        anchors.push((m[0].head_hash.clone(), m[0].tail_hash.clone()));
    }
    let n = ANCHOR_LEN as usize;
    let want = (
        blake3::hash(&text[..n]).to_hex().to_string(),
        blake3::hash(&text[text.len() - n..]).to_hex().to_string(),
    );
    assert_eq!(anchors[0], want, "off");
    assert_eq!(anchors[1], want, "zstd");
    // A tail anchor spanning a tiny raw chunk and a compressed one.
    let dir = tempfile::tempdir().expect("tmp");
    let s = store(dir.path());
    ship_pieces(&s, "a.log", 0, &text[..100_000], 100_000);
    ship_pieces(&s, "a.log", 100_000, &text[100_000..100_010], 100);
    let f = &s.log_files("wal").expect("files")[0];
    assert_eq!(
        f.tail_hash,
        blake3::hash(&text[100_010 - n..100_010])
            .to_hex()
            .to_string()
    );
}

/// The copy of `a.log` and its second chunk (compressed).
fn second_chunk(s: &Store) -> (PathBuf, LogPiece) {
    let meta = s.source("wal").expect("meta").expect("some");
    let f = &s.log_files("wal").expect("files")[0];
    let p = pieces(&f.chunks)[1].clone();
    assert_eq!(p.codec, ChunkCodec::Zstd);
    (copy_path(&meta, f.id), p)
}

fn write_at(path: &Path, at: u64, data: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).expect("open");
    std::os::unix::fs::FileExt::write_all_at(&f, data, at).expect("write");
}

#[test]
fn a_damaged_compressed_chunk_fails_its_restore_and_its_verify() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = store(dir.path());
    let mut model = Vec::new();
    ship_text(&s, &mut model, &[50_000, 50_000, 50_000], MAX_PIECE);
    let (path, p) = second_chunk(&s);
    let mid = (p.stored_start + p.stored_end) / 2;
    write_at(&path, mid, b"\xff\x00\xffdamage\x00\xff");
    let (_, files) = s.log_restore("wal", 0).expect("restore");
    let copy = files[0].open().expect("open");
    assert!(
        copy.read(&files[0].pieces[0]).is_ok(),
        "the first piece is whole"
    );
    let e = copy
        .read(&files[0].pieces[1])
        .expect_err("damaged")
        .to_string();
    for want in ["log source wal", "a.log", "point 2", "bytes 50000..100000"] {
        assert!(e.contains(want), "{want}: {e}");
    }
    let v = s.verify_logs("wal").expect("verify");
    assert_eq!(
        v.damaged_points.iter().map(|d| d.0).collect::<Vec<_>>(),
        vec![1, 2, 3],
        "every point that sees the file is marked (the store marks files)"
    );
    // From now on a restore of a marked point is refused up front.
    let e = s.log_restore("wal", 2).expect_err("marked");
    assert!(
        matches!(e, StoreError::PointDamaged { point: 2, .. }),
        "{e}"
    );
}

#[test]
fn hostile_frames_and_records_are_refused_within_the_pieces_length() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = store(dir.path());
    let mut model = Vec::new();
    ship_text(&s, &mut model, &[50_000, 50_000], MAX_PIECE);
    let (path, p) = second_chunk(&s);
    // A frame that decodes to 4 MiB in the piece's stored bytes (padded with a
    // skippable frame): refused, never decoded past the piece's 50,000 bytes.
    let mut bomb = Vec::new();
    assert!(crate::store::compress::compress_block(
        Compression::Zstd(19),
        &vec![b'x'; 4 << 20],
        &mut bomb
    ));
    let room = (p.stored_end - p.stored_start) as usize;
    assert!(bomb.len() + 8 <= room, "{} in {room}", bomb.len());
    let pad = room - bomb.len() - 8;
    bomb.extend_from_slice(&0x184D_2A50u32.to_le_bytes());
    bomb.extend_from_slice(&(pad as u32).to_le_bytes());
    bomb.resize(room, 0);
    write_at(&path, p.stored_start, &bomb);
    let (_, files) = s.log_restore("wal", 0).expect("restore");
    let copy = files[0].open().expect("open");
    let e = copy
        .read(&files[0].pieces[1])
        .expect_err("bomb")
        .to_string();
    assert!(e.contains("a.log") && e.contains("point 2"), "{e}");
    // Records whose lengths no ship makes.
    let mut bad = files[0].pieces[1].clone();
    bad.end = bad.start + MAX_PIECE as u64 + 1;
    let e = copy.read(&bad).expect_err("too long").to_string();
    assert!(e.contains("at most"), "{e}");
    let mut bad = files[0].pieces[1].clone();
    bad.stored_end = bad.end + 1;
    let e = copy.read(&bad).expect_err("not smaller").to_string();
    assert!(e.contains("cannot hold a compressed piece"), "{e}");
    let mut bad = files[0].pieces[0].clone();
    bad.codec = ChunkCodec::Raw;
    bad.stored_end -= 1;
    let e = copy.read(&bad).expect_err("raw, short").to_string();
    assert!(e.contains("cannot hold a raw piece"), "{e}");
}

#[test]
fn uncommitted_compressed_bytes_are_cut_at_open() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = store(dir.path());
    let mut model = Vec::new();
    ship_text(&s, &mut model, &[80_000, 80_000], 40_000);
    let committed = s.log_files("wal").expect("files")[0].stored_length();
    let mut t = s.begin_log_ship(&wal(), None).expect("begin");
    t.start_file("a.log", 160_000, false, 1, 2, 3, "")
        .expect("start");
    let more = log_text(90_000, 99);
    t.append(&more, blake3::hash(&more).as_bytes())
        .expect("append");
    // A crash: nothing undone.
    t.done = true;
    drop(t);
    drop(s);
    let s = store(dir.path());
    let meta = s.source("wal").expect("meta").expect("some");
    let f = &s.log_files("wal").expect("files")[0];
    assert_eq!(
        std::fs::metadata(copy_path(&meta, f.id))
            .expect("stat")
            .len(),
        committed,
        "cut at the stored length"
    );
    check_points(&s, "a.log", &model, "after the cut");
    // The next ship appends at the logical length, its bytes after the cut.
    ship_text(&s, &mut model, &[30_000], 8192);
    check_points(&s, "a.log", &model, "after the next ship");
}

#[test]
fn a_move_carries_compressed_copies_as_stored() {
    let from = tempfile::tempdir().expect("tmp");
    let s = store(from.path());
    let mut model = Vec::new();
    ship_text(&s, &mut model, &[100_000, 7, 200_000], 64 * 1024);
    let (meta, files) = s.export("wal").expect("export");
    let to = tempfile::tempdir().expect("tmp");
    let t = store_with(to.path(), Compression::Off);
    let mut import = t.import(meta).expect("import");
    for (name, path) in files {
        let data = std::fs::read(&path).expect("read copy");
        import
            .write(&name, 0, &data, data.len() as u64)
            .expect("write");
    }
    import.commit().expect("commit: every piece verified");
    check_points(&t, "a.log", &model, "moved");
    // A copy sent at its logical length is not the stored one: refused.
    let (meta, _) = s.export("wal").expect("export");
    let other = tempfile::tempdir().expect("tmp");
    let u = store(other.path());
    let mut import = u.import(meta).expect("import");
    let logical = model.last().expect("shipped").len() as u64;
    let e = import
        .write(&copy_name(1), 0, b"x", logical)
        .expect_err("wrong length");
    assert!(e.to_string().contains("bytes"), "{e}");
}

#[test]
fn pruning_a_compressed_generation_frees_its_stored_bytes() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = store(dir.path());
    let b = log_text(300_000, 5);
    let p1 = ship(&s, &[("a", 0, false, b"aaa"), ("b", 0, false, &b)]);
    let stored_b = s.log_files("wal").expect("files")[1].stored_length();
    assert!(stored_b * 4 < b.len() as u64, "{stored_b}");
    assert_eq!(
        s.points("wal").expect("points")[0].stored_bytes(),
        stored_b + 3
    );
    let mut t = s.begin_log_ship(&wal(), None).expect("begin");
    t.gone(&["b".to_string()]);
    t.commit().expect("commit");
    ship(&s, &[("a", 3, false, b"A")]);
    assert_eq!(s.log_bytes("wal").expect("bytes"), stored_b + 4);
    let freed = s.prune("wal", p1.id).expect("prune");
    assert_eq!(freed, stored_b, "b's copy as stored");
    assert_eq!(s.log_bytes_both("wal").expect("bytes"), (4, 4));
}
