//! Log sources end to end: each ship sends only appended bytes; rotation,
//! truncation and a rewritten prefix are each found, alerted and sent anew; files
//! deleted on the host stay restorable; every log point restores to exactly the
//! bytes the host had at that ship (nothing lost, nothing twice); and
//! `restore --at` pairs the newest volume point at or before a moment with the
//! first ship at or after it. Log text is stored compressed, and restored as sent.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use bulwark_tests::{Fleet, MIB, Value, json_str, json_u64};

const AGENT: &str = "host-1";
const LOG: &str = "host-1-log";

/// What the test expects a log point to restore: every file, by name.
type Model = BTreeMap<String, Vec<u8>>;

fn random(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed)
        .collect()
}

fn append(path: &Path, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .expect("open for append");
    f.write_all(data).expect("append");
}

/// Reads what a restore wrote: every file, and no partial files left.
fn read_dir(dir: &Path) -> Model {
    let mut out = Model::new();
    for e in std::fs::read_dir(dir).expect("restored dir") {
        let e = e.expect("entry");
        let name = e.file_name().to_string_lossy().to_string();
        assert!(
            !name.contains("bulwark-partial"),
            "a partial file was left in {}",
            dir.display()
        );
        out.insert(name, std::fs::read(e.path()).expect("read restored"));
    }
    out
}

fn ship(fleet: &Fleet) -> Value {
    let r = fleet.sync(LOG);
    assert_eq!(json_str(&r, "kind"), "log", "{r}");
    r
}

fn warnings(r: &Value) -> String {
    r["warnings"].to_string()
}

#[test]
fn ships_appends_and_handles_rotation_truncation_and_rewrite() {
    let logs = tempfile::tempdir().expect("tmp");
    let d = logs.path();
    std::fs::write(d.join("a.log"), random(1000, 1)).expect("a");
    std::fs::write(d.join("b.log"), random(70_000, 2)).expect("b");
    // Not logs: a hidden file (a copy in progress) and a name the glob leaves out.
    std::fs::write(d.join(".a.log.part"), b"partial").expect("hidden");
    std::fs::write(d.join("notes.txt"), b"not a log").expect("txt");
    std::fs::create_dir(d.join("sub.log")).expect("subdir");
    let fleet = Fleet::builder()
        .node("node-1")
        .agent_log(AGENT, LOG, d, "glob = \"*.log*\"")
        .start();

    let mut model = Model::new();
    let mut points: Vec<(u64, Model)> = Vec::new();
    let mut record = |r: &Value, model: &Model| points.push((json_u64(r, "point"), model.clone()));

    // `sources` says a log source is one in its TRACKER column (its record carries
    // the default block tracker's name, which it does not use).
    let out = fleet.cli(&["sources"]);
    let table = String::from_utf8_lossy(&out.stdout);
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or("")
        .split("  ")
        .filter(|c| !c.is_empty())
        .map(str::trim)
        .collect();
    let column = header
        .iter()
        .position(|c| *c == "TRACKER")
        .unwrap_or_else(|| panic!("no TRACKER column:\n{table}"));
    let row = table
        .lines()
        .find(|l| l.starts_with(&format!("{LOG} ")))
        .unwrap_or_else(|| panic!("no row for {LOG}:\n{table}"));
    assert_eq!(row.split_whitespace().nth(column), Some("log"), "{table}");

    // 1. First ship: both files whole.
    let r = ship(&fleet);
    assert_eq!(json_u64(&r, "bytes_sent"), 71_000, "{r}");
    assert_eq!(json_u64(&r, "files_sent"), 2, "{r}");
    model.insert("a.log".into(), random(1000, 1));
    model.insert("b.log".into(), random(70_000, 2));
    record(&r, &model);

    // 2. Appends: only the new bytes are sent, and only the anchors re-read.
    let more = random(500, 3);
    append(&d.join("a.log"), &more);
    model.get_mut("a.log").expect("a").extend_from_slice(&more);
    let r = ship(&fleet);
    assert_eq!(json_u64(&r, "bytes_sent"), 500, "{r}");
    assert_eq!(json_u64(&r, "files_sent"), 1, "{r}");
    assert!(
        json_u64(&r, "bytes_read") <= 500 + 2 * 4096,
        "shipped bytes were read again: {r}"
    );
    record(&r, &model);

    // 3. Nothing changed: nothing read, nothing sent, still a point.
    let r = ship(&fleet);
    assert_eq!(json_u64(&r, "bytes_sent"), 0, "{r}");
    assert_eq!(json_u64(&r, "bytes_read"), 0, "{r}");
    record(&r, &model);

    // 4. Rotation: a.log renamed to a.log.1 (which grew first), a new a.log.
    let tail = random(300, 4);
    append(&d.join("a.log"), &tail);
    std::fs::rename(d.join("a.log"), d.join("a.log.1")).expect("rotate");
    std::fs::write(d.join("a.log"), random(100, 5)).expect("new a");
    let mut rotated = model.remove("a.log").expect("a");
    rotated.extend_from_slice(&tail);
    model.insert("a.log.1".into(), rotated);
    model.insert("a.log".into(), random(100, 5));
    let r = ship(&fleet);
    assert!(warnings(&r).contains("a.log rotated"), "{r}");
    assert_eq!(json_u64(&r, "bytes_sent"), 1800 + 100, "{r}");
    record(&r, &model);

    // 5. Truncation (copytruncate): b.log cut to nothing, then written again.
    std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("b.log"))
        .expect("open b")
        .set_len(0)
        .expect("truncate");
    append(&d.join("b.log"), b"after truncation\n");
    model.insert("b.log".into(), b"after truncation\n".to_vec());
    let r = ship(&fleet);
    assert!(warnings(&r).contains("b.log truncated"), "{r}");
    assert_eq!(json_u64(&r, "bytes_sent"), 17, "{r}");
    record(&r, &model);

    // 6. A rewritten prefix, same inode, same length, plus an append.
    let mut rewritten = model["a.log.1"].clone();
    rewritten[7] ^= 0xff;
    rewritten.extend_from_slice(b"appended");
    std::fs::write(d.join("a.log.1"), &rewritten).expect("rewrite");
    model.insert("a.log.1".into(), rewritten.clone());
    let r = ship(&fleet);
    assert!(warnings(&r).contains("a.log.1 rewritten"), "{r}");
    assert_eq!(json_u64(&r, "bytes_sent"), rewritten.len() as u64, "{r}");
    record(&r, &model);

    // 7. Deleted on the host after shipping: still in later points.
    std::fs::remove_file(d.join("a.log.1")).expect("delete");
    append(&d.join("a.log"), b"x");
    model.get_mut("a.log").expect("a").push(b'x');
    let r = ship(&fleet);
    assert_eq!(json_u64(&r, "bytes_sent"), 1, "{r}");
    record(&r, &model);

    // 8. Log text is stored compressed (the pool's default zstd:1): the point's
    // stored bytes are under half its logical bytes, which are the bytes sent.
    let text: Vec<u8> = (0..6000)
        .flat_map(|i| {
            format!(
                "2026-12-07 22:00:{:02} LOG: checkpoint {i} complete\n",
                i % 60
            )
            .into_bytes()
        })
        .collect();
    append(&d.join("a.log"), &text);
    model.get_mut("a.log").expect("a").extend_from_slice(&text);
    let r = ship(&fleet);
    assert_eq!(json_u64(&r, "bytes_sent"), text.len() as u64, "{r}");
    record(&r, &model);
    let point = json_u64(&r, "point");
    let p = fleet
        .points(LOG)
        .into_iter()
        .find(|p| json_u64(p, "id") == point)
        .expect("the new point is listed");
    assert_eq!(json_u64(&p, "logical_bytes"), text.len() as u64, "{p}");
    assert!(
        json_u64(&p, "stored_bytes") * 2 < text.len() as u64,
        "log text is stored compressed: {p}"
    );

    // Every point restores to exactly what the host had at its ship.
    let listed = fleet.points(LOG);
    assert_eq!(listed.len(), points.len());
    assert!(listed.iter().all(|p| json_str(p, "kind") == "log"));
    for (point, want) in &points {
        let to = fleet.scratch(&format!("restore-{point}"));
        let v = fleet.restore(LOG, Some(*point), &to, None);
        assert_eq!(json_u64(&v, "log_files"), want.len() as u64, "{v}");
        let got = read_dir(&to);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "files of point {point}"
        );
        for (name, bytes) in want {
            assert!(
                got[name] == *bytes,
                "point {point}: {name} restored as {} bytes, expected {} (lost or duplicated bytes)",
                got[name].len(),
                bytes.len()
            );
        }
    }

    // Each event is an alert; a restore into a non-empty directory is refused.
    let alerts = fleet.cli_json(&["alerts", "--all", "--json"]).to_string();
    for what in ["rotated", "truncated", "rewritten"] {
        assert!(alerts.contains(what), "no alert says {what}: {alerts}");
    }
    let to = fleet.scratch("restore-1");
    let (code, err) =
        fleet.cli_expect_fail(&["restore", LOG, "--to", &to.to_string_lossy(), "--wait"]);
    assert_eq!(code, 1);
    assert!(err.contains("not empty"), "{err}");
    // A check applies to volumes only.
    let (_, err) = fleet.cli_expect_fail(&["check", LOG, "--wait"]);
    assert!(err.contains("log source"), "{err}");
}

#[test]
fn restore_at_a_moment_pairs_volume_and_log_points() {
    let logs = tempfile::tempdir().expect("tmp");
    let d = logs.path();
    std::fs::write(d.join("000001"), random(5000, 1)).expect("seg");
    let fleet = Fleet::builder()
        .node("node-1")
        .node("node-2")
        .agent_source(AGENT, "host-1-db", None, 4 * MIB, "group = \"db\"")
        .agent_log(AGENT, LOG, d, "group = \"db\"")
        .start();
    fleet.cli(&["group", "create", "db", "--interval", "1h"]);
    // The agent's config asks for the group; the admin lets the host join it.
    fleet.cli(&["group", "allow", "db", AGENT]);

    let v1 = json_u64(&fleet.sync("host-1-db"), "point");
    let before = fleet.save_volume("host-1-db", "v1");
    let l1 = json_u64(&ship(&fleet), "point");
    std::thread::sleep(Duration::from_millis(1100));
    let at = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("format");
    std::thread::sleep(Duration::from_millis(1100));
    append(&d.join("000001"), &random(700, 2));
    std::fs::write(d.join("000002"), random(300, 3)).expect("seg 2");
    let l2 = json_u64(&ship(&fleet), "point");
    bulwark_tests::rewrite_random_blocks(&fleet.volume("host-1-db"), 5);
    let v2 = json_u64(&fleet.sync("host-1-db"), "point");
    std::fs::write(d.join("000003"), random(10, 4)).expect("seg 3");
    ship(&fleet);
    assert!(v2 > v1 && l2 > l1);

    // Named by either source of the group.
    for (i, source) in ["host-1-db", LOG].iter().enumerate() {
        let to = fleet.scratch(&format!("at-{i}"));
        let to_s = to.to_string_lossy().to_string();
        let r = fleet.cli_json(&[
            "restore", source, "--at", &at, "--to", &to_s, "--wait", "--json",
        ]);
        assert_eq!(
            json_u64(&r, "point"),
            v1,
            "the volume point at or before: {r}"
        );
        assert_eq!(json_u64(&r, "log_point"), l2, "the first ship after: {r}");
        bulwark_tests::assert_same_file(&to.join("volume"), &before, "volume at the moment");
        let got = read_dir(&to.join("logs"));
        let mut seg1 = random(5000, 1);
        seg1.extend_from_slice(&random(700, 2));
        assert_eq!(got.len(), 2, "{:?}", got.keys());
        assert!(got["000001"] == seg1 && got["000002"] == random(300, 3));
        let manifest: Value =
            serde_json::from_slice(&std::fs::read(to.join("restore.json")).expect("restore.json"))
                .expect("json");
        assert_eq!(manifest["volume"]["point"], v1);
        assert_eq!(manifest["logs"]["source"], LOG);
        assert!(
            manifest["postgresql"]["restore_command"]
                .as_str()
                .is_some_and(|c| c.contains(&format!("{to_s}/logs/%f"))),
            "{manifest}"
        );
    }

    // A log source moves with its node's drain: the copy restores the same files,
    // and the next ship appends to it.
    let node = fleet.source_node(LOG);
    let drained = fleet.cli_json(&["drain", &node, "--json"]);
    let moves = drained["moves"].as_array().cloned().unwrap_or_default();
    assert!(
        moves.iter().any(|m| m["source"] == LOG)
            && moves
                .iter()
                .all(|m| m["error"].as_str().unwrap_or("").is_empty()),
        "{drained}"
    );
    assert_ne!(fleet.source_node(LOG), node);
    let to = fleet.scratch("after-move");
    fleet.restore(LOG, Some(l2), &to, None);
    let mut seg1 = random(5000, 1);
    seg1.extend_from_slice(&random(700, 2));
    let got = read_dir(&to);
    assert!(got["000001"] == seg1 && got["000002"] == random(300, 3));
    append(&d.join("000002"), b"after the move");
    let r = ship(&fleet);
    assert_eq!(json_u64(&r, "bytes_sent"), 14, "{r}");

    // Before the first volume point: refused, saying why.
    let to = fleet.scratch("too-early");
    let (_, err) = fleet.cli_expect_fail(&[
        "restore",
        "host-1-db",
        "--at",
        "2020-01-01T00:00:00Z",
        "--to",
        &to.to_string_lossy(),
        "--wait",
    ]);
    assert!(err.contains("no point at or before"), "{err}");
    let (_, err) =
        fleet.cli_expect_fail(&["restore", "host-1-db", "--at", "yesterday", "--to", "/x"]);
    assert!(err.contains("RFC 3339"), "{err}");
}
