//! Log sources: ships, restores, refusals, crash cuts, retention.

use super::*;
use crate::store::{PoolDisk, SourcePolicy};
use bulwark_common::name::SourceName;
use bulwark_common::point::PointKind;

fn wal() -> SourceName {
    SourceName::parse("wal").expect("a valid name")
}

fn store(dir: &Path) -> Store {
    let disk = dir.join("disk");
    std::fs::create_dir_all(&disk).expect("disk");
    // sled lets go of its lock a moment after a drop (see the store's tests).
    for _ in 0..500 {
        match Store::open(
            &dir.join("data"),
            vec![PoolDisk {
                path: disk.clone(),
                capacity_bytes: 1 << 40,
            }],
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
            let data = std::fs::read(&f.path).expect("read");
            (f.name.clone(), data[..f.length() as usize].to_vec())
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
