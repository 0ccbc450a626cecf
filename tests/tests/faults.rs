//! Real faults under the storage node (issue 29): a pool disk whose file system
//! really fills up (a small tmpfs the test mounts, with a logical capacity far
//! larger than it), and I/O errors injected at the node's write, fsync and rename
//! calls (`errno(..)` fault points, `common/src/failpoint.rs`). Each must end in a
//! clean refusal naming the error and the file, an alert, the node still up, every
//! earlier point restoring byte for byte, and the next sync succeeding once the
//! fault is gone.
//!
//! Where tmpfs cannot fail for real, the fault points stand in: tmpfs's fsync never
//! fails (it has nothing to write back), and a rename needs no new space on it.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bulwark_tests::{Fleet, MIB, Value, json_str, json_u64, poll};

const SOURCE: &str = "host-1-data";
const NODE: &str = "node-1";

/// A tmpfs mounted over a node's pool disk by the test, unmounted (lazily, so
/// that it works while a process still has files open on it) when dropped, on a
/// panic too.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `mib` MiB on `dir`; `Err` says why this test cannot run
    /// here (not root, or no privilege to mount). Any other failure panics.
    fn mount(dir: &Path, mib: u64) -> Result<Tmpfs, String> {
        let euid = std::fs::metadata("/proc/self")
            .map(|m| m.uid())
            .map_err(|e| format!("cannot read /proc/self: {e}"))?;
        if euid != 0 {
            return Err(format!(
                "mounting a tmpfs needs root (running as uid {euid})"
            ));
        }
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}M"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run mount: {e}"));
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            if err.contains("permission denied") || err.contains("Operation not permitted") {
                return Err(format!("no privilege to mount a tmpfs: {}", err.trim()));
            }
            panic!("mount -t tmpfs on {} failed: {err}", dir.display());
        }
        Ok(Tmpfs {
            dir: dir.to_path_buf(),
        })
    }

    /// Changes its size (growing gives the space back; shrinking needs the files to
    /// fit).
    fn resize(&self, mib: u64) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={mib}M")])
            .arg(&self.dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run mount: {e}"));
        assert!(
            out.status.success(),
            "remounting {} at {mib} MiB failed: {}",
            self.dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Waits for the open alert `key`, and checks it is critical and about `SOURCE`.
fn wait_alert(fleet: &Fleet, key: &str) -> Value {
    let alert = poll(&format!("alert {key}"), Duration::from_secs(30), || {
        fleet
            .open_alert(key)
            .ok_or_else(|| "not raised yet".to_string())
    });
    assert_eq!(json_str(&alert, "severity"), "critical", "{alert}");
    assert_eq!(json_str(&alert, "subject"), SOURCE, "{alert}");
    alert
}

/// Waits until the alert `key` is no longer open.
fn wait_resolved(fleet: &Fleet, key: &str) {
    poll(
        &format!("alert {key} to resolve"),
        Duration::from_secs(30),
        || match fleet.open_alert(key) {
            None => Ok(()),
            Some(a) => Err(format!("still open: {a}")),
        },
    );
}

/// `bulwark verify SOURCE` reads every point and finds nothing damaged.
fn verify_clean(fleet: &Fleet, tag: &str) {
    let v = fleet.cli_json(&["verify", SOURCE, "--json"]);
    assert_eq!(
        v["damaged_points"].as_array().map(Vec::len),
        Some(0),
        "{tag}: verify found damaged points: {v}"
    );
    assert_eq!(
        v["damaged_replica_blocks"].as_array().map(Vec::len),
        Some(0),
        "{tag}: verify found damaged replica blocks: {v}"
    );
}

/// A sync that must fail: returns the CLI's stderr, after checking that it names
/// every one of `words`, and that the node is still up.
fn failing_sync(fleet: &mut Fleet, words: &[&str]) -> String {
    let (_, err) = fleet.cli_expect_fail(&["sync", SOURCE, "--wait", "--json"]);
    for w in words {
        assert!(err.contains(w), "the failed sync does not say `{w}`: {err}");
    }
    fleet.node(NODE).assert_alive();
    err
}

/// A pool disk on a 24 MiB tmpfs (its logical capacity says 10 GiB, so the
/// allocation admits every sync): the first sync (16 MiB) fits; an incremental
/// of 10 MiB runs the file system out of space while its journal is written
/// (ENOSPC on write, for real): refused naming the journal and the error,
/// alerted, rolled back (the journal is gone), point 1 intact. Once the tmpfs
/// grows, the sync succeeds. Then the disk is shrunk so that a sync's journal
/// fits but its settle's before-images do not: the point is acknowledged, the
/// settle fails and is undone (alert `settle/`), the earlier points restore, and
/// once there is room again the settle is tried again by the next read of the
/// point, without a restart.
#[test]
fn a_pool_disk_that_really_fills_up_refuses_cleanly_and_recovers_when_space_returns() {
    let mut fleet = Fleet::builder()
        .node_sized(NODE, "10GiB")
        .agent("host-1", SOURCE, 16 * MIB)
        .build();
    let disk = fleet.node_dir(NODE).join("disk1");
    let tmpfs = match Tmpfs::mount(&disk, 24) {
        Ok(t) => t,
        Err(why) => {
            // `root` (or the privilege to mount) is the facility missing.
            bulwark_tests::skip("root", &why);
            return;
        }
    };
    fleet.start_all();
    let volume = fleet.volume(SOURCE);
    let r = fleet.sync(SOURCE);
    assert_eq!(json_u64(&r, "point"), 1, "{r}");
    let p1 = fleet.save_volume(SOURCE, "p1.img");

    // 10 MiB of changes: the journal cannot fit in the 8 MiB left.
    assert_eq!(bulwark_tests::rewrite_random_blocks(&volume, 160), 160);
    let err = failing_sync(
        &mut fleet,
        &["No space left on device", "write ", "journal"],
    );
    let alert = wait_alert(&fleet, &format!("disk-full/{SOURCE}"));
    assert!(
        json_str(&alert, "message").contains("No space left on device"),
        "{alert}"
    );
    let info = fleet.source_info(SOURCE);
    assert!(
        json_str(&info, "error").contains("No space left on device"),
        "`sources` does not show the error: {info}\n(the CLI said: {err})"
    );
    let source_dir = fleet.node_source_dir(NODE, SOURCE);
    assert!(
        !source_dir.join("journal").exists(),
        "the refused sync's journal was left on the full disk"
    );
    assert_eq!(fleet.point_ids(SOURCE), vec![1]);
    fleet.restore_points(SOURCE, &[(1, &p1)], "after ENOSPC");

    // Space returns: the same changes sync.
    tmpfs.resize(64);
    let r = fleet.sync(SOURCE);
    assert_eq!(json_u64(&r, "point"), 2, "{r}");
    let p2 = fleet.save_volume(SOURCE, "p2.img");
    wait_resolved(&fleet, &format!("disk-full/{SOURCE}"));
    fleet.restore_points(SOURCE, &[(1, &p1), (2, &p2)], "after space returned");

    // About 26 MiB is used now (replica and point 1's delta). At 36 MiB, 6 MiB of
    // changes fit as a journal, but not again as before-images in the settle.
    tmpfs.resize(36);
    assert_eq!(bulwark_tests::rewrite_random_blocks(&volume, 96), 96);
    let r = fleet.sync(SOURCE);
    assert_eq!(
        json_u64(&r, "point"),
        3,
        "the sync is acknowledged before its settle: {r}"
    );
    let p3 = fleet.save_volume(SOURCE, "p3.img");
    let alert = wait_alert(&fleet, &format!("settle/{SOURCE}"));
    let message = json_str(&alert, "message");
    assert!(
        message.contains("No space left on device") && message.contains("tried again"),
        "{alert}"
    );
    fleet.node(NODE).assert_alive();
    fleet.restore_points(SOURCE, &[(1, &p1), (2, &p2)], "after the settle failed");
    // Still no room: reading point 3 tries the settle again, which fails again.
    let to = fleet.scratch("p3-without-room.img");
    let (_, err) = fleet.cli_expect_fail(&[
        "restore",
        SOURCE,
        "--point",
        "3",
        "--to",
        &to.to_string_lossy(),
        "--wait",
        "--json",
    ]);
    assert!(err.contains("No space left on device"), "{err}");

    // Room again: the next read settles the point, no restart needed.
    tmpfs.resize(128);
    fleet.restore_points(SOURCE, &[(3, &p3), (2, &p2), (1, &p1)], "after the settle");
    wait_resolved(&fleet, &format!("settle/{SOURCE}"));
    verify_clean(&fleet, "after the settle");
    assert_eq!(bulwark_tests::rewrite_random_blocks(&volume, 8), 8);
    let r = fleet.sync(SOURCE);
    assert_eq!(json_u64(&r, "point"), 4, "{r}");
    let p4 = fleet.save_volume(SOURCE, "p4.img");
    fleet.restore_points(SOURCE, &[(4, &p4), (1, &p1)], "at the end");
    fleet.node(NODE).assert_alive();
    drop(fleet);
    drop(tmpfs);
}

/// Restarts the node with the fault points `spec` armed (empty: none) and waits
/// for the fleet.
fn restart_node_with(fleet: &mut Fleet, spec: &str) {
    restart_with(fleet, NODE, spec);
    fleet.wait_ready();
}

/// Restarts node `node` with the fault points `spec` armed (empty: none) and
/// waits until it is up.
fn restart_with(fleet: &mut Fleet, node: &str, spec: &str) {
    let env: &[(&str, &str)] = if spec.is_empty() {
        &[]
    } else {
        &[("BULWARK_FAILPOINTS", spec)]
    };
    let status = fleet.node(node).restart_with_env(env);
    assert!(status.success(), "{node} did not stop cleanly: {status}");
    fleet.wait_nodes_up(&[node.to_string()]);
}

/// EIO injected at the node's journal write and journal fsync during a sync, and
/// at its replica write during the settle of an acknowledged point: each sync is
/// refused naming the call, the file and the error (or, for the settle, the point
/// stays unreadable until the fault is gone, the earlier ones readable), an alert
/// is raised, the node stays up, no earlier point is damaged (restores and a
/// verify), and after a restart without the fault the next sync succeeds.
#[test]
fn injected_eio_on_write_and_fsync_refuses_the_sync_and_damages_nothing() {
    let mut fleet = Fleet::builder()
        .node(NODE)
        .agent("host-1", SOURCE, 4 * MIB)
        .start();
    let volume = fleet.volume(SOURCE);
    fleet.sync(SOURCE);
    let p1 = fleet.save_volume(SOURCE, "p1.img");
    bulwark_tests::rewrite_random_blocks(&volume, 5);
    fleet.sync(SOURCE);
    let p2 = fleet.save_volume(SOURCE, "p2.img");
    let mut points: Vec<(u64, PathBuf)> = vec![(1, p1), (2, p2)];
    let check_points = |fleet: &Fleet, points: &[(u64, PathBuf)], tag: &str| {
        let ids: Vec<u64> = points.iter().map(|(id, _)| *id).collect();
        assert_eq!(fleet.point_ids(SOURCE), ids, "{tag}");
        let refs: Vec<(u64, &Path)> = points.iter().map(|(id, p)| (*id, p.as_path())).collect();
        fleet.restore_points(SOURCE, &refs, tag);
        verify_clean(fleet, tag);
    };

    for (point, words) in [
        ("node-io-journal-write", ["write ", "journal"]),
        ("node-io-journal-fsync", ["fsync ", "journal"]),
    ] {
        restart_node_with(&mut fleet, &format!("{point}=errno(EIO)"));
        bulwark_tests::rewrite_random_blocks(&volume, 5);
        let err = failing_sync(&mut fleet, &["Input/output error", words[0], words[1]]);
        fleet.node(NODE).wait_for_log(
            &format!("failpoint {point} reached"),
            Duration::from_secs(10),
        );
        let alert = wait_alert(&fleet, &format!("disk-error/{SOURCE}"));
        assert!(
            json_str(&alert, "message").contains("Input/output error"),
            "{alert}\n(the CLI said: {err})"
        );
        assert!(
            !fleet.node_source_dir(NODE, SOURCE).join("journal").exists(),
            "{point}: the refused sync's journal was left behind"
        );
        check_points(&fleet, &points, point);

        // Without the fault the same changes sync.
        restart_node_with(&mut fleet, "");
        let r = fleet.sync(SOURCE);
        let id = json_u64(&r, "point");
        assert_eq!(id, points.len() as u64 + 1, "after {point}: {r}");
        points.push((id, fleet.save_volume(SOURCE, &format!("p{id}.img"))));
        wait_resolved(&fleet, &format!("disk-error/{SOURCE}"));
        check_points(&fleet, &points, &format!("after {point}"));
    }

    // EIO on the replica write of the settle (an incremental writes the replica
    // only there): the point is acknowledged, its settle fails and is undone;
    // unlike a full disk, an I/O error is not tried again until a restart.
    restart_node_with(&mut fleet, "node-io-replica-write=errno(EIO)");
    bulwark_tests::rewrite_random_blocks(&volume, 5);
    let r = fleet.sync(SOURCE);
    let id = json_u64(&r, "point");
    assert_eq!(id, points.len() as u64 + 1, "{r}");
    let unsettled = fleet.save_volume(SOURCE, &format!("p{id}.img"));
    let alert = wait_alert(&fleet, &format!("settle/{SOURCE}"));
    let message = json_str(&alert, "message");
    assert!(
        message.contains("Input/output error") && message.contains("replica"),
        "{alert}"
    );
    fleet.node(NODE).assert_alive();
    let refs: Vec<(u64, &Path)> = points.iter().map(|(id, p)| (*id, p.as_path())).collect();
    fleet.restore_points(SOURCE, &refs, "after the settle's EIO");
    points.push((id, unsettled));
    restart_node_with(&mut fleet, "");
    wait_resolved(&fleet, &format!("settle/{SOURCE}"));
    check_points(&fleet, &points, "after the restart without EIO");
    bulwark_tests::rewrite_random_blocks(&volume, 5);
    let r = fleet.sync(SOURCE);
    let id = json_u64(&r, "point");
    points.push((id, fleet.save_volume(SOURCE, &format!("p{id}.img"))));
    check_points(&fleet, &points, "at the end");
}

/// ENOSPC injected at the rename that publishes a moved source's copy on its new
/// node. A sync renames nothing (its commit is one sled transaction); the node
/// renames only there and where a prune merges a middle point's delta into its
/// predecessor's, which retention does only across hours or days. The drain fails
/// naming the rename and the error, the target raises `disk-full/<source>` and
/// keeps nothing of the copy, the source stays where it was with every point
/// restoring and still syncs there; without the fault a second drain moves it,
/// every point restores from the new node, and the alert resolves.
#[test]
fn injected_enospc_on_the_rename_of_a_move_keeps_the_source_where_it_was() {
    let mut fleet = Fleet::builder()
        .node("node-1")
        .node("node-2")
        .agent("host-1", SOURCE, 4 * MIB)
        .start();
    let volume = fleet.volume(SOURCE);
    fleet.sync(SOURCE);
    let p1 = fleet.save_volume(SOURCE, "p1.img");
    bulwark_tests::rewrite_random_blocks(&volume, 5);
    fleet.sync(SOURCE);
    let p2 = fleet.save_volume(SOURCE, "p2.img");
    let from = fleet.source_node(SOURCE);
    let to = if from == "node-1" { "node-2" } else { "node-1" };

    restart_with(&mut fleet, to, "node-io-rename=errno(ENOSPC)");
    let out = fleet.cli_as(fleet.admin(), &["drain", &from, "--json"]);
    assert_eq!(out.status.code(), Some(1), "a drain that moved nothing");
    let report: Value = serde_json::from_slice(&out.stdout).expect("drain --json");
    let error = json_str(&report["moves"][0], "error");
    assert!(
        error.contains("No space left on device") && error.contains("rename"),
        "the failed move does not name the rename and the error: {report}"
    );
    fleet
        .node(to)
        .wait_for_log("failpoint node-io-rename reached", Duration::from_secs(10));
    let alert = wait_alert(&fleet, &format!("disk-full/{SOURCE}"));
    assert!(
        json_str(&alert, "message").contains(&format!("stays on {from}")),
        "{alert}"
    );
    fleet.node(to).assert_alive();
    assert_eq!(fleet.source_node(SOURCE), from);
    let target_dir = fleet.node_dir(to).join("disk1").join("bulwark");
    let left: Vec<String> = std::fs::read_dir(&target_dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "the failed move left {left:?} in {}",
        target_dir.display()
    );
    assert_eq!(fleet.point_ids(SOURCE), vec![1, 2]);
    fleet.restore_points(SOURCE, &[(1, &p1), (2, &p2)], "after the failed move");
    bulwark_tests::rewrite_random_blocks(&volume, 5);
    let r = fleet.sync(SOURCE);
    assert_eq!(json_u64(&r, "point"), 3, "{r}");
    let p3 = fleet.save_volume(SOURCE, "p3.img");

    // Without the fault the move goes through.
    restart_with(&mut fleet, to, "");
    let report = fleet.cli_json(&["drain", &from, "--json"]);
    assert_eq!(json_str(&report["moves"][0], "error"), "", "{report}");
    assert_eq!(fleet.source_node(SOURCE), to);
    fleet.restore_points(SOURCE, &[(1, &p1), (2, &p2), (3, &p3)], "after the move");
    wait_resolved(&fleet, &format!("disk-full/{SOURCE}"));
}
