//! The storage pool: allocations that refuse cleanly when full and grow on command,
//! retention that prunes and gives space back, verify and repair, and the ways to
//! get a point out (export to a local file, a read-only NBD export over TLS).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use bulwark_tests::{
    BLOCK_SIZE, Fleet, MIB, assert_same_file, json_str, json_u64, poll, rewrite_random_blocks,
};
use serde_json::Value;

const SOURCE: &str = "host-1-data";
const SIZE: u64 = 4 * MIB;

#[test]
fn a_full_allocation_refuses_cleanly_and_growing_it_lets_the_next_sync_succeed() {
    // 420 KiB of recovery-point space holds one sync of 6 rewritten 64 KiB blocks
    // (6 × (64 KiB + 53 bytes) = 91.5% of it), not two.
    let fleet = Fleet::builder()
        .node("node-1")
        .agent_source("host-1", SOURCE, None, SIZE, "")
        .start();
    // The admin's allocation (an agent may not ask for less recovery-point space).
    fleet.cli(&["allocate", SOURCE, "--points", "420KiB"]);
    let volume = fleet.volume(SOURCE);
    fleet.sync(SOURCE);
    let p1 = fleet.save_volume(SOURCE, "p1.img");
    rewrite_random_blocks(&volume, 6);
    fleet.sync(SOURCE);
    let p2 = fleet.save_volume(SOURCE, "p2.img");
    let alert = poll("the 90% alert", Duration::from_secs(20), || {
        fleet
            .open_alert(&format!("allocation-90/{SOURCE}"))
            .ok_or("not yet".to_string())
    });
    assert_eq!(json_str(&alert, "severity"), "critical", "{alert}");
    assert!(json_str(&alert, "message").contains("92%"), "{alert}");
    let source_dir = fleet.node_source_dir("node-1", SOURCE);
    let replica_before = bulwark_tests::file_hash(&source_dir.join("replica"));

    rewrite_random_blocks(&volume, 6);
    let (_, err) = fleet.cli_expect_fail(&["sync", SOURCE, "--wait", "--json"]);
    assert!(
        err.contains("recovery-point space is full") && err.contains("bulwark allocate"),
        "the refusal does not explain itself: {err}"
    );
    // Nothing of the refused sync was kept.
    assert_eq!(fleet.point_ids(SOURCE), vec![1, 2]);
    assert_eq!(
        bulwark_tests::file_hash(&source_dir.join("replica")),
        replica_before,
        "the refused sync changed the replica"
    );
    fleet.restore_points(SOURCE, &[(1, &p1), (2, &p2)], "after the refusal");
    let alert = poll("the allocation-full alert", Duration::from_secs(20), || {
        fleet
            .open_alert(&format!("allocation-full/{SOURCE}"))
            .ok_or("not yet".to_string())
    });
    assert_eq!(json_str(&alert, "severity"), "critical", "{alert}");
    assert_eq!(json_str(&alert, "subject"), SOURCE, "{alert}");

    let s = fleet.cli_json(&["allocate", SOURCE, "--points", "4MiB", "--json"]);
    assert_eq!(json_str(&s, "name"), SOURCE, "{s}");
    let r = fleet.sync(SOURCE);
    assert_eq!(json_u64(&r, "point"), 3, "{r}");
    let p3 = fleet.save_volume(SOURCE, "p3.img");
    fleet.restore_points(SOURCE, &[(1, &p1), (2, &p2), (3, &p3)], "after growing");
    poll(
        "the node to report the new allocation",
        Duration::from_secs(20),
        || {
            let s = fleet.source_info(SOURCE);
            match json_u64(&s, "points_alloc_bytes") {
                n if n == 4 * MIB => Ok(()),
                n => Err(format!("points_alloc_bytes is {n}")),
            }
        },
    );
    poll(
        "the allocation-full alert to resolve",
        Duration::from_secs(20),
        || match fleet.open_alert(&format!("allocation-full/{SOURCE}")) {
            None => Ok(()),
            Some(a) => Err(format!("still open: {a}")),
        },
    );
    let all = fleet.cli_json(&["alerts", "--all", "--json"]);
    assert!(
        all.as_array().is_some_and(|a| a.iter().any(|x| {
            x.get("key").and_then(Value::as_str) == Some(&format!("allocation-full/{SOURCE}"))
                && x.get("resolved").and_then(Value::as_bool) == Some(true)
        })),
        "the resolved alert is not listed with --all: {all}"
    );
}

/// Bytes the files of a directory occupy on disk.
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .expect("read the deltas directory")
        .map(|e| e.expect("entry").metadata().expect("metadata").blocks() * 512)
        .sum()
}

#[test]
fn thirty_syncs_with_keep_5_leave_5_points_and_give_the_space_back() {
    // The admin's floor is one point: the agent's config may ask for five.
    let fleet = Fleet::builder()
        .coordinator_extra("[policy.min_retention]\nkeep = 1")
        .node("node-1")
        .agent_source(
            "host-1",
            SOURCE,
            None,
            SIZE,
            "[sources.retention]\nkeep = 5",
        )
        .start();
    let volume = fleet.volume(SOURCE);
    let deltas = fleet.node_source_dir("node-1", SOURCE).join("deltas");
    let mut images = Vec::new();
    let mut largest_usage = 0;
    for i in 1..=30u64 {
        if i > 1 {
            rewrite_random_blocks(&volume, 3);
        }
        let r = fleet.sync(SOURCE);
        assert_eq!(json_u64(&r, "point"), i, "{r}");
        images.push((i, fleet.save_volume(SOURCE, &format!("p{i}.img"))));
        if images.len() > 5 {
            let (_, old) = images.remove(0);
            std::fs::remove_file(&old).expect("remove an old image");
        }
        largest_usage = largest_usage.max(disk_usage(&deltas));
    }
    // Retention runs just after a sync is acknowledged: the last sync's prune may
    // still be under way when its answer arrives.
    poll(
        "retention to leave points 26-30",
        Duration::from_secs(10),
        || {
            let ids = fleet.point_ids(SOURCE);
            if ids == [26, 27, 28, 29, 30] {
                Ok(())
            } else {
                Err(format!("points {ids:?}"))
            }
        },
    );
    let expected: Vec<(u64, &Path)> = images.iter().map(|(i, p)| (*i, p.as_path())).collect();
    fleet.restore_points(SOURCE, &expected, "keep 5");

    // Four deltas remain (the newest point has none), each of at most 3 blocks.
    let files: Vec<String> = std::fs::read_dir(&deltas)
        .expect("read deltas")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files.len(), 4, "delta files left: {files:?}");
    let record = BLOCK_SIZE + 53;
    let usage = disk_usage(&deltas);
    assert!(
        usage <= 4 * (3 * record).next_multiple_of(4096),
        "the deltas of 4 points of 3 blocks take {usage} bytes on disk"
    );
    let stored: u64 = fleet
        .points(SOURCE)
        .iter()
        .map(|p| json_u64(p, "stored_bytes"))
        .sum();
    let on_disk: u64 = std::fs::read_dir(&deltas)
        .expect("read deltas")
        .map(|e| e.expect("entry").metadata().expect("metadata").len())
        .sum();
    assert_eq!(
        stored, on_disk,
        "the points' accounted bytes differ from the files"
    );
    poll(
        "the node to report the points' space",
        Duration::from_secs(20),
        || {
            let s = fleet.source_info(SOURCE);
            match (json_u64(&s, "points_used_bytes"), json_u64(&s, "points")) {
                (used, 5) if used == on_disk => Ok(()),
                other => Err(format!("points_used_bytes, points = {other:?}")),
            }
        },
    );
    eprintln!(
        "deltas on disk: {usage} bytes after pruning (at most {largest_usage} bytes at any time)"
    );
}

#[test]
fn export_writes_a_checked_copy_of_any_point_to_a_local_file() {
    let fleet = Fleet::builder()
        .node("node-1")
        .agent("host-1", SOURCE, SIZE)
        .start();
    let volume = fleet.volume(SOURCE);
    fleet.sync(SOURCE);
    let p1 = fleet.save_volume(SOURCE, "p1.img");
    rewrite_random_blocks(&volume, 9);
    fleet.sync(SOURCE);
    let p2 = fleet.save_volume(SOURCE, "p2.img");

    let to = fleet.scratch("export-1.img");
    let to_s = to.display().to_string();
    let r = fleet.cli_json(&["export", SOURCE, "--point", "1", "--to", &to_s, "--json"]);
    assert_eq!(json_u64(&r, "point"), 1, "{r}");
    assert_eq!(json_u64(&r, "bytes_written"), SIZE, "{r}");
    assert_same_file(&to, &p1, "export of point 1");
    let newest = fleet.scratch("export-newest.img");
    fleet.cli(&["export", SOURCE, "--to", &newest.display().to_string()]);
    assert_same_file(&newest, &p2, "export of the newest point");
    // An existing file is never overwritten.
    let (_, err) = fleet.cli_expect_fail(&["export", SOURCE, "--to", &to_s]);
    assert!(err.contains("already exists"), "{err}");
    assert_same_file(&to, &p1, "the existing file after a refused export");
}

#[test]
fn verify_repairs_damaged_replica_blocks_and_marks_points_it_cannot_repair() {
    let fleet = Fleet::builder()
        .node("node-1")
        .agent("host-1", SOURCE, SIZE)
        .start();
    let volume = fleet.volume(SOURCE);
    fleet.sync(SOURCE);
    let p1 = fleet.save_volume(SOURCE, "p1.img");
    rewrite_random_blocks(&volume, 5);
    fleet.sync(SOURCE);
    let p2 = fleet.save_volume(SOURCE, "p2.img");
    rewrite_random_blocks(&volume, 5);
    fleet.sync(SOURCE);
    let p3 = fleet.save_volume(SOURCE, "p3.img");

    // A clean verify reads everything and finds nothing.
    let clean = fleet.cli_json(&["verify", SOURCE, "--json"]);
    assert_eq!(
        json_u64(&clean, "blocks_checked"),
        SIZE / BLOCK_SIZE + 10,
        "{clean}"
    );
    assert_eq!(
        clean["damaged_points"].as_array().map(Vec::len),
        Some(0),
        "{clean}"
    );

    // Damage one replica block and the data of point 1's first before-image.
    let dir = fleet.node_source_dir("node-1", SOURCE);
    let flip = |path: &Path, at: u64| {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .expect("open a stored file");
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).expect("read");
        b[0] ^= 0x5a;
        f.write_all_at(&b, at).expect("write");
        f.sync_all().expect("fsync");
    };
    let damaged_block = 17;
    flip(&dir.join("replica"), damaged_block * BLOCK_SIZE + 999);
    let delta1 = dir.join("deltas").join(format!("{:020}.delta", 1));
    flip(&delta1, 53 + 100);

    let out = fleet.cli_as(fleet.admin(), &["verify", SOURCE, "--json"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "verify with damage left must exit 1"
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("verify --json");
    assert_eq!(
        report["damaged_replica_blocks"],
        serde_json::json!([damaged_block]),
        "{report}"
    );
    assert_eq!(json_u64(&report, "repaired_blocks"), 1, "{report}");
    let damaged: Vec<u64> = report["damaged_points"]
        .as_array()
        .expect("damaged_points")
        .iter()
        .map(|p| json_u64(p, "id"))
        .collect();
    assert_eq!(damaged, vec![1], "{report}");

    // The repair was a deep check: a new point; every other point restores.
    assert_eq!(fleet.point_ids(SOURCE), vec![1, 2, 3, 4]);
    fleet.restore_points(SOURCE, &[(2, &p2), (3, &p3), (4, &p3)], "after the repair");
    let (_, err) = fleet.cli_expect_fail(&[
        "restore",
        SOURCE,
        "--point",
        "1",
        "--to",
        &fleet.scratch("p1-restore.img").display().to_string(),
        "--wait",
    ]);
    assert!(err.contains("damaged"), "{err}");
    assert!(!fleet.scratch("p1-restore.img").exists());
    let points = fleet.points(SOURCE);
    assert!(
        points[0]["damaged_blocks"]
            .as_array()
            .is_some_and(|b| !b.is_empty()),
        "point 1 is not marked damaged: {points:?}"
    );
    let alert = poll("the damaged alert", Duration::from_secs(20), || {
        fleet
            .open_alert(&format!("damaged/{SOURCE}"))
            .ok_or("not yet".to_string())
    });
    assert_eq!(json_str(&alert, "severity"), "critical");
    // Point 1's saved image is what it would have restored to.
    assert!(p1.exists());
}

/// Runs a qemu tool; returns (success, stdout + stderr).
fn qemu(program: &str, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn an_old_point_is_served_read_only_over_nbd_with_tls_to_qemu() {
    if !bulwark_tests::qemu::have("qemu-img") || !bulwark_tests::qemu::have("qemu-io") {
        return;
    }
    let fleet = Fleet::builder()
        .node("node-1")
        .node_extra("nbd_listen = \"127.0.0.1:0\"")
        .agent("host-1", SOURCE, SIZE)
        .start();
    let volume = fleet.volume(SOURCE);
    fleet.sync(SOURCE);
    let p1 = fleet.save_volume(SOURCE, "p1.img");
    for _ in 0..2 {
        rewrite_random_blocks(&volume, 7);
        fleet.sync(SOURCE);
    }
    let creds = fleet.scratch("qemu-tls");
    let creds_s = creds.display().to_string();
    // The node reports its NBD address with its heartbeat.
    let m = poll("the node's NBD address", Duration::from_secs(20), || {
        fleet.cli_json_try(&[
            "mount",
            SOURCE,
            "--point",
            "1",
            "--tls-dir",
            &creds_s,
            "--json",
        ])
    });
    let url = json_str(&m, "url");
    let rest = url
        .strip_prefix("nbd://")
        .unwrap_or_else(|| panic!("not an nbd URL: {url}"));
    let (addr, export) = rest.split_once('/').expect("nbd://HOST:PORT/NAME");
    assert_eq!(export, format!("{SOURCE}@1"));
    let (host, port) = addr.rsplit_once(':').expect("HOST:PORT");
    let object = |dir: &str| format!("tls-creds-x509,id=tls0,dir={dir},endpoint=client");
    let image = format!(
        "driver=nbd,server.type=inet,server.host={host},server.port={port},export={export},tls-creds=tls0"
    );

    // Rewrite more while the export is used: the point it shows does not change.
    rewrite_random_blocks(&volume, 7);
    fleet.sync(SOURCE);
    let copy = fleet.scratch("p1-from-nbd.raw");
    let copy_s = copy.display().to_string();
    let (ok, out) = qemu(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            "--object",
            &object(&creds_s),
            "--image-opts",
            &image,
            &copy_s,
        ],
    );
    assert!(ok, "qemu-img convert failed: {out}");
    assert_same_file(&copy, &p1, "point 1 copied by qemu-img from the NBD export");

    // Writes are refused.
    let (ok, out) = qemu(
        "qemu-io",
        &[
            "--object",
            &object(&creds_s),
            "--image-opts",
            &image,
            "-c",
            "write -P 0x55 0 64k",
        ],
    );
    assert!(
        !ok || out.contains("denied") || out.contains("read-only"),
        "a write went through: {out}"
    );
    let copy2 = fleet.scratch("p1-again.raw");
    let (ok, out) = qemu(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            "--object",
            &object(&creds_s),
            "--image-opts",
            &image,
            &copy2.display().to_string(),
        ],
    );
    assert!(ok, "second qemu-img convert failed: {out}");
    assert_same_file(&copy2, &p1, "point 1 after a refused write");

    // No TLS: refused before any export is named.
    let (ok, out) = qemu("qemu-img", &["info", &url]);
    assert!(
        !ok && out.contains("TLS"),
        "a client without TLS was not refused: {out}"
    );
    // qemu's credentials directory for a certificate, trusting the fleet CA.
    let creds_for = |files: &bulwark_tests::TlsFiles, tag: &str| {
        let dir = fleet.scratch(tag);
        std::fs::create_dir_all(&dir).expect("mkdir");
        for (from, name) in [
            (&fleet.pki().ca(), "ca-cert.pem"),
            (&files.cert, "client-cert.pem"),
            (&files.key, "client-key.pem"),
        ] {
            std::fs::copy(from, dir.join(name)).expect("copy a certificate");
        }
        dir.display().to_string()
    };
    // A fleet certificate of another role (the agent's): refused.
    let agent_dir = creds_for(&fleet.identity("host-1"), "agent-tls");
    let (ok, out) = qemu(
        "qemu-img",
        &[
            "info",
            "--object",
            &object(&agent_dir),
            "--image-opts",
            &image,
        ],
    );
    assert!(
        !ok && out.contains("admin"),
        "an agent certificate was not refused: {out}"
    );
    // An admin certificate of another CA: the TLS handshake fails. (qemu first checks
    // its own certificate against the CA it trusts; sanity-check=off lets it try, so
    // that it is the node that refuses.)
    let other = bulwark_tests::Pki::init(&fleet.scratch("other-ca"));
    let mallory_dir = creds_for(&other.issue("admin", "mallory"), "mallory-tls");
    let (ok, out) = qemu(
        "qemu-img",
        &[
            "info",
            "--object",
            &format!("{},sanity-check=off", object(&mallory_dir)),
            "--image-opts",
            &image,
        ],
    );
    assert!(!ok, "a certificate of another CA was not refused: {out}");
    // A point that does not exist.
    let (ok, out) = qemu(
        "qemu-img",
        &[
            "info",
            "--object",
            &object(&creds_s),
            "--image-opts",
            &image.replace(
                &format!("export={SOURCE}@1"),
                &format!("export={SOURCE}@99"),
            ),
        ],
    );
    assert!(
        !ok && out.contains("no point 99"),
        "a missing point was not refused: {out}"
    );
}

#[test]
fn the_scheduled_scrub_finds_and_repairs_replica_damage() {
    let fleet = Fleet::builder()
        .coordinator_extra("scrub_interval = \"2s\"")
        .node("node-1")
        .agent("host-1", SOURCE, SIZE)
        .start();
    fleet.sync(SOURCE);
    let p1 = fleet.save_volume(SOURCE, "p1.img");
    let replica = fleet.node_source_dir("node-1", SOURCE).join("replica");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&replica)
        .expect("open the replica");
    f.write_all_at(b"rot", 40 * BLOCK_SIZE + 5)
        .expect("damage a block");
    f.sync_all().expect("fsync");
    // The scrub verifies, finds the block, and repairs it with a deep check: a new
    // point that restores to the volume as it is.
    let s = poll(
        "the scrub to repair the replica",
        Duration::from_secs(30),
        || {
            let s = fleet.source_info(SOURCE);
            let r = json_str(&s, "verify_result");
            if r.contains("1 damaged replica blocks (1 repaired)") {
                Ok(s)
            } else {
                Err(format!("verify_result: {r:?}"))
            }
        },
    );
    assert!(!json_str(&s, "last_verify").is_empty(), "{s}");
    assert_eq!(fleet.point_ids(SOURCE), vec![1, 2]);
    fleet.restore_points(SOURCE, &[(1, &p1), (2, &p1)], "after the scrub");
}

#[test]
fn a_pool_that_auto_grows_lets_the_sync_through_and_accounts_for_it() {
    let fleet = Fleet::builder()
        .node("node-1")
        .node_extra("[pool]\nauto_grow = \"1MiB\"")
        .agent_source("host-1", SOURCE, None, SIZE, "")
        .start();
    // The admin's allocation (an agent may not ask for less recovery-point space).
    fleet.cli(&["allocate", SOURCE, "--points", "420KiB"]);
    let volume = fleet.volume(SOURCE);
    let mut images = Vec::new();
    for i in 1..=3u64 {
        if i > 1 {
            rewrite_random_blocks(&volume, 6);
        }
        let r = fleet.sync(SOURCE);
        assert_eq!(json_u64(&r, "point"), i, "{r}");
        images.push((i, fleet.save_volume(SOURCE, &format!("p{i}.img"))));
    }
    let expected: Vec<(u64, &Path)> = images.iter().map(|(i, p)| (*i, p.as_path())).collect();
    fleet.restore_points(SOURCE, &expected, "auto-grow");
    poll("the grown allocation", Duration::from_secs(20), || {
        let s = fleet.source_info(SOURCE);
        match json_u64(&s, "points_alloc_bytes") {
            n if n == 420 * 1024 + MIB => Ok(()),
            n => Err(format!("points_alloc_bytes is {n}")),
        }
    });
}

#[test]
fn a_pool_that_prunes_when_full_keeps_the_newest_points() {
    let fleet = Fleet::builder()
        .node("node-1")
        .node_extra("[pool]\non_full = \"prune-oldest\"")
        .agent_source("host-1", SOURCE, None, SIZE, "")
        .start();
    // The admin's allocation (an agent may not ask for less recovery-point space).
    fleet.cli(&["allocate", SOURCE, "--points", "420KiB"]);
    let volume = fleet.volume(SOURCE);
    let mut images = Vec::new();
    for i in 1..=4u64 {
        if i > 1 {
            rewrite_random_blocks(&volume, 6);
        }
        let r = fleet.sync(SOURCE);
        assert_eq!(json_u64(&r, "point"), i, "{r}");
        images.push((i, fleet.save_volume(SOURCE, &format!("p{i}.img"))));
    }
    // Room for one point's before-images: each sync pruned the oldest.
    assert_eq!(fleet.point_ids(SOURCE), vec![3, 4]);
    let expected: Vec<(u64, &Path)> = images[2..].iter().map(|(i, p)| (*i, p.as_path())).collect();
    fleet.restore_points(SOURCE, &expected, "prune-oldest");
}

/// The node compresses before-images by default (`[pool] compression`, zstd:1):
/// a point whose delta holds compressible blocks reports fewer stored than logical
/// bytes in `points --json` and `sources --json`, and restores byte for byte.
#[test]
fn compressible_before_images_are_stored_compressed_and_reported_both_ways() {
    let fleet = Fleet::builder()
        .node("node-1")
        .agent("host-1", SOURCE, SIZE)
        .start();
    let volume = fleet.volume(SOURCE);
    // Text, as logs and configuration files are.
    let mut text = Vec::with_capacity(SIZE as usize);
    let mut i = 0u64;
    while (text.len() as u64) < SIZE {
        text.extend_from_slice(format!("{i:09} a line of an ordinary log file\n").as_bytes());
        i += 1;
    }
    text.truncate(SIZE as usize);
    std::fs::write(&volume, &text).expect("write the volume");
    fleet.sync(SOURCE);
    let p1 = fleet.save_volume(SOURCE, "p1.img");
    rewrite_random_blocks(&volume, 6);
    fleet.sync(SOURCE);
    let p2 = fleet.save_volume(SOURCE, "p2.img");
    // Point 1's delta is written by the settle, just after the sync's answer.
    let first = poll("point 1's delta", Duration::from_secs(20), || {
        let points = fleet.points(SOURCE);
        match points.iter().find(|p| json_u64(p, "id") == 1) {
            Some(p) if json_u64(p, "stored_bytes") > 0 => Ok(p.clone()),
            other => Err(format!("point 1: {other:?}")),
        }
    });
    let first = &first;
    let (stored, logical) = (
        json_u64(first, "stored_bytes"),
        json_u64(first, "logical_bytes"),
    );
    // Six before-images of 64 KiB blocks, raw: the file header and six records.
    assert_eq!(logical, 16 + 6 * (BLOCK_SIZE + 53), "{first}");
    assert!(stored < logical / 4, "{first}");
    let delta = fleet
        .node_source_dir("node-1", SOURCE)
        .join("deltas")
        .join(format!("{:020}.delta", 1));
    assert_eq!(
        std::fs::metadata(&delta).expect("delta").len(),
        stored,
        "stored bytes are the delta's length on disk"
    );
    poll(
        "the node to report logical and stored bytes",
        Duration::from_secs(20),
        || {
            let s = fleet.source_info(SOURCE);
            match (json_u64(&s, "logical_bytes"), json_u64(&s, "stored_bytes")) {
                (l, s) if (l, s) == (logical, stored) => Ok(()),
                other => Err(format!("logical_bytes, stored_bytes = {other:?}")),
            }
        },
    );
    fleet.restore_points(SOURCE, &[(1, p1.as_path()), (2, p2.as_path())], "zstd");
}
