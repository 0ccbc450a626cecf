//! kill -9 of the storage node in the middle of applying a sync: the data source stays
//! at its last recovery point, and the next sync works; in the middle of settling an
//! acknowledged point: the point survives.

use std::time::Duration;

use bulwark_tests::{
    Fleet, MIB, assert_same_file, differing_blocks, json_u64, rewrite_random_blocks,
};

const SIZE: u64 = 64 * MIB;
const SOURCE: &str = "host-1-data";

/// Blocks [`fleet_with_a_first_point`] rewrites after point 1.
const REWRITTEN: usize = 300;

/// A fleet whose source has point 1 (its image saved, returned), then 300 random
/// blocks rewritten (about 19 MiB), and the node restarted with `failpoints`.
fn fleet_with_a_first_point(failpoints: &str) -> (Fleet, std::path::PathBuf) {
    let mut fleet = Fleet::builder()
        .node("node-1")
        .agent("host-1", SOURCE, SIZE)
        .start();
    let r = fleet.sync(SOURCE);
    assert_eq!(json_u64(&r, "point"), 1, "first sync: {r}");
    let point1 = fleet.save_volume(SOURCE, "p1.img");
    rewrite_random_blocks(&fleet.volume(SOURCE), REWRITTEN);
    // Read back from the disk, not the writer's own count: the syncs below are held
    // to this.
    assert_eq!(
        differing_blocks(&point1, &fleet.volume(SOURCE)).len(),
        REWRITTEN,
        "blocks that differ from point 1 after the rewrite"
    );
    let status = fleet
        .node("node-1")
        .restart_with_env(&[("BULWARK_FAILPOINTS", failpoints)]);
    assert!(
        status.success(),
        "node-1 did not stop cleanly on SIGTERM: {status}"
    );
    fleet.wait_ready();
    (fleet, point1)
}

#[test]
fn node_kill9_mid_sync_keeps_last_point() {
    // ~19 MiB of changes: several batches of at most 4 MiB. Pause the node after
    // its second applied batch, then kill it there.
    let (mut fleet, point1) = fleet_with_a_first_point("node-after-batch=pause@2");

    let sync = fleet.cli_spawn(&["sync", SOURCE, "--wait", "--json"]);
    fleet.node("node-1").wait_for_log(
        "failpoint node-after-batch reached",
        Duration::from_secs(120),
    );
    fleet.node("node-1").kill9();

    let out = sync
        .wait(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("the sync did not end after the node was killed: {e}"));
    assert!(
        !out.status.success(),
        "`sync --wait` succeeded although the node was killed mid-sync\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Restart without fault points: the interrupted sync is rolled back at start-up.
    fleet.node("node-1").start();
    fleet.node("node-1").wait_for_log(
        "rolling back a sync that did not commit",
        Duration::from_secs(30),
    );
    fleet.wait_ready();
    assert_eq!(
        fleet.point_ids(SOURCE),
        vec![1],
        "points after a node crash mid-sync"
    );
    let restored1 = fleet.scratch("p1-after-crash.img");
    fleet.restore(SOURCE, Some(1), &restored1, None);
    assert_same_file(&restored1, &point1, "restore of point 1 after the crash");

    // The next sync completes, sends again every block the rolled-back one had (the
    // node's digests are point 1's again), and point 2 is the current volume.
    let r = fleet.sync(SOURCE);
    assert_eq!(json_u64(&r, "point"), 2, "sync after the crash: {r}");
    assert_eq!(
        json_u64(&r, "blocks_sent"),
        REWRITTEN as u64,
        "the sync after the rollback sends every changed block: {r}"
    );
    assert_eq!(fleet.point_ids(SOURCE), vec![1, 2]);
    let restored2 = fleet.scratch("p2.img");
    fleet.restore(SOURCE, Some(2), &restored2, None);
    assert_same_file(&restored2, &fleet.volume(SOURCE), "restore of point 2");
    let restored1 = fleet.scratch("p1-after-sync.img");
    fleet.restore(SOURCE, Some(1), &restored1, None);
    assert_same_file(&restored1, &point1, "restore of point 1 after point 2");
}

/// kill -9 of the storage node while it settles an acknowledged point into the
/// replica (paused at the start of its first settle group): the point was
/// acknowledged, so it must survive; the restarted node finishes the settle from
/// the journal, both points restore exactly, and the next sync sends exactly the
/// blocks changed since (the node's digests are the new point's).
#[test]
fn node_kill9_mid_settle_keeps_the_new_point() {
    // ~19 MiB of changes: several settle groups of 4 MiB. The first sync was fresh
    // (no settle): the first settle group is point 2's.
    let (mut fleet, point1) = fleet_with_a_first_point("node-settle-group=pause");

    let r = fleet.sync(SOURCE);
    assert_eq!(
        json_u64(&r, "point"),
        2,
        "the sync is acknowledged before its settle: {r}"
    );
    assert_eq!(
        json_u64(&r, "blocks_sent"),
        REWRITTEN as u64,
        "the sync sends the changed blocks: {r}"
    );
    fleet.node("node-1").wait_for_log(
        "failpoint node-settle-group reached",
        Duration::from_secs(120),
    );
    let point2 = fleet.save_volume(SOURCE, "p2.img");
    fleet.node("node-1").kill9();

    // Restart without fault points: the settle is finished at start-up.
    fleet.node("node-1").start();
    fleet.node("node-1").wait_for_log(
        "settling a committed point a crash interrupted",
        Duration::from_secs(60),
    );
    fleet
        .node("node-1")
        .wait_for_log("point settled into the replica", Duration::from_secs(60));
    fleet.wait_ready();
    assert_eq!(
        fleet.point_ids(SOURCE),
        vec![1, 2],
        "points after a node crash mid-settle"
    );
    let restored1 = fleet.scratch("p1-after-crash.img");
    fleet.restore(SOURCE, Some(1), &restored1, None);
    assert_same_file(&restored1, &point1, "restore of point 1 after the crash");
    let restored2 = fleet.scratch("p2-after-crash.img");
    fleet.restore(SOURCE, Some(2), &restored2, None);
    assert_same_file(&restored2, &point2, "restore of point 2 after the crash");

    // The next sync sends exactly what changed since point 2.
    let touched = rewrite_random_blocks(&fleet.volume(SOURCE), 20);
    let r = fleet.sync(SOURCE);
    assert_eq!(json_u64(&r, "point"), 3, "sync after the crash: {r}");
    assert_eq!(
        json_u64(&r, "blocks_sent"),
        touched as u64,
        "the next sync sends exactly the changed blocks: {r}"
    );
    let restored3 = fleet.scratch("p3.img");
    fleet.restore(SOURCE, Some(3), &restored3, None);
    assert_same_file(&restored3, &fleet.volume(SOURCE), "restore of point 3");
    let restored2 = fleet.scratch("p2-after-sync.img");
    fleet.restore(SOURCE, Some(2), &restored2, None);
    assert_same_file(&restored2, &point2, "restore of point 2 after point 3");
}

/// A coordinator with agents connected stops promptly on SIGTERM (their control
/// streams must not hold the graceful shutdown open), and the agents reconnect by
/// themselves once it is back.
#[test]
fn coordinator_restart_with_agents_connected() {
    let mut fleet = Fleet::builder()
        .node("node-1")
        .agent("host-1", SOURCE, 4 * MIB)
        .start();
    let status = fleet.coordinator().stop();
    assert!(
        status.success(),
        "the coordinator did not exit cleanly on SIGTERM with an agent connected: {status}"
    );
    fleet.coordinator().start();
    fleet.wait_ready();
    let r = fleet.sync(SOURCE);
    assert_eq!(
        json_u64(&r, "point"),
        1,
        "sync after the coordinator restart: {r}"
    );
}
