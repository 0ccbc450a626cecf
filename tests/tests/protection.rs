//! The whole protection cycle on a two-node, two-agent fleet: full and incremental
//! syncs, restores of every point, placement on different nodes, a restart of every
//! daemon, and a restore written by another agent.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bulwark_tests::{
    BLOCK_SIZE, Fleet, MIB, Value, assert_same_file, differing_blocks, json_str, json_u64, poll,
    rewrite_random_blocks,
};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const SIZE: u64 = 64 * MIB;
const BLOCKS: u64 = SIZE / BLOCK_SIZE;
const SOURCES: [(&str, &str, usize); 2] =
    [("host-1", "host-1-data", 37), ("host-2", "host-2-data", 53)];

/// Checks a `points SOURCE --json` listing: ids 1..=n oldest first, RFC 3339 times in
/// order, point 1 full and the others incremental.
fn check_points(source: &str, points: &[Value], n: u64) {
    let ids: Vec<u64> = points.iter().map(|p| json_u64(p, "id")).collect();
    assert_eq!(
        ids,
        (1..=n).collect::<Vec<_>>(),
        "points of {source}: {points:?}"
    );
    let mut last: Option<OffsetDateTime> = None;
    for p in points {
        let at = json_str(p, "created_at");
        let t = OffsetDateTime::parse(&at, &Rfc3339)
            .unwrap_or_else(|e| panic!("created_at {at:?} of {source} is not RFC 3339: {e}"));
        if let Some(prev) = last {
            assert!(
                t >= prev,
                "points of {source} are not oldest first: {points:?}"
            );
        }
        last = Some(t);
        let consistency = json_str(p, "consistency");
        assert!(
            consistency == "crash" || consistency == "app",
            "consistency of {p} is {consistency:?}"
        );
        let expected = if json_u64(p, "id") == 1 {
            "full"
        } else {
            "incremental"
        };
        assert_eq!(
            json_str(p, "kind"),
            expected,
            "kind of point {p} of {source}"
        );
    }
}

/// Restores `point` of `source` to a fresh scratch path and checks it against `image`.
fn restore_and_compare(fleet: &Fleet, source: &str, point: u64, image: &Path, tag: &str) {
    let to = fleet.scratch(&format!("{source}-p{point}-{tag}.img"));
    let r = fleet.restore(source, Some(point), &to, None);
    assert_eq!(
        json_str(&r, "agent"),
        fleet.source_agent(source),
        "restore result {r}"
    );
    assert_eq!(json_u64(&r, "bytes_written"), SIZE, "restore result {r}");
    assert_same_file(
        &to,
        image,
        &format!("restore of point {point} of {source} ({tag})"),
    );
}

#[test]
fn full_and_incremental_syncs_restore_every_point() {
    let mut builder = Fleet::builder().node("node-1").node("node-2");
    for (agent, source, _) in SOURCES {
        builder = builder.agent(agent, source, SIZE);
    }
    let mut fleet = builder.start();

    // Full syncs.
    let mut images: HashMap<(&str, u64), PathBuf> = HashMap::new();
    for (_, source, _) in SOURCES {
        let r = fleet.sync(source);
        assert_eq!(json_u64(&r, "point"), 1, "first sync of {source}: {r}");
        assert_eq!(
            json_u64(&r, "blocks_scanned"),
            BLOCKS,
            "first sync of {source}: {r}"
        );
        assert_eq!(
            json_u64(&r, "blocks_sent"),
            BLOCKS,
            "first sync of {source}: {r}"
        );
        assert_eq!(
            json_u64(&r, "bytes_sent"),
            SIZE,
            "first sync of {source}: {r}"
        );
        images.insert(
            (source, 1),
            fleet.save_volume(source, &format!("{source}-p1.img")),
        );
    }

    // Incremental syncs send exactly the rewritten blocks.
    for (_, source, changes) in SOURCES {
        rewrite_random_blocks(&fleet.volume(source), changes);
        // What the rewrite changed, read back from the disk (not the writer's count).
        let changed = differing_blocks(&images[&(source, 1)], &fleet.volume(source));
        assert_eq!(
            changed.len(),
            changes,
            "blocks of {source} that differ from point 1 after rewriting {changes}"
        );
        let r = fleet.sync(source);
        assert_eq!(json_u64(&r, "point"), 2, "second sync of {source}: {r}");
        assert_eq!(
            json_u64(&r, "blocks_scanned"),
            BLOCKS,
            "second sync of {source}: {r}"
        );
        assert_eq!(
            json_u64(&r, "blocks_sent"),
            changes as u64,
            "second sync of {source} after rewriting {changes} blocks: {r}"
        );
        assert_eq!(
            json_u64(&r, "bytes_sent"),
            changes as u64 * BLOCK_SIZE,
            "second sync of {source}: {r}"
        );
        // The node's own count of the blocks point 2 changed.
        let listed = fleet.points(source);
        let p2 = listed
            .iter()
            .find(|p| json_u64(p, "id") == 2)
            .unwrap_or_else(|| panic!("no point 2 of {source}: {listed:?}"));
        assert_eq!(
            json_u64(p2, "blocks_changed"),
            changed.len() as u64,
            "point 2 of {source} changed the blocks that differ from point 1: {p2}"
        );
        images.insert(
            (source, 2),
            fleet.save_volume(source, &format!("{source}-p2.img")),
        );
    }

    // Placement spread the two sources over the two nodes; the listing shows the
    // newest points (polled: the listing may trail the sync result briefly).
    let sources = poll(
        "`sources --json` to show point 2 of both sources",
        Duration::from_secs(10),
        || {
            let all = fleet.sources();
            for (_, source, _) in SOURCES {
                let last = all
                    .iter()
                    .find(|s| s.get("name").and_then(Value::as_str) == Some(source))
                    .and_then(|s| s.get("last_point"))
                    .and_then(Value::as_u64);
                if last != Some(2) {
                    return Err(format!("last_point of {source} is {last:?} in {all:?}"));
                }
            }
            Ok(all)
        },
    );
    let mut nodes = Vec::new();
    for (agent, source, _) in SOURCES {
        let s = sources
            .iter()
            .find(|s| s.get("name").and_then(Value::as_str) == Some(source))
            .unwrap_or_else(|| panic!("`sources --json` has no {source}: {sources:?}"));
        assert_eq!(json_str(s, "agent"), agent, "{s}");
        assert_eq!(json_str(s, "kind"), "volume", "{s}");
        assert_eq!(json_u64(s, "size_bytes"), SIZE, "{s}");
        assert_eq!(json_u64(s, "last_point"), 2, "{s}");
        nodes.push(json_str(s, "node"));
    }
    assert_ne!(
        nodes[0], nodes[1],
        "both sources were placed on the same node: {sources:?}"
    );
    for n in &nodes {
        assert!(
            n == "node-1" || n == "node-2",
            "unknown node {n} in {sources:?}"
        );
    }

    // Every point restores byte for byte.
    let mut listed = HashMap::new();
    for (_, source, _) in SOURCES {
        let points = fleet.points(source);
        check_points(source, &points, 2);
        listed.insert(source, points);
        for point in [1, 2] {
            restore_and_compare(
                &fleet,
                source,
                point,
                &images[&(source, point)],
                "before-restart",
            );
        }
    }

    // Restart every daemon: points and data survive.
    for (name, status) in fleet.stop_all() {
        assert!(
            status.success(),
            "{name} did not exit cleanly on SIGTERM: {status}"
        );
    }
    fleet.start_all();
    for (_, source, _) in SOURCES {
        let points = fleet.points(source);
        assert_eq!(
            points, listed[source],
            "points of {source} changed across a restart"
        );
        for point in [1, 2] {
            restore_and_compare(
                &fleet,
                source,
                point,
                &images[&(source, point)],
                "after-restart",
            );
        }
    }

    // Another agent restores host-1-data (its newest point) on its own host.
    let to = fleet.scratch("host-1-data-by-host-2.img");
    let r = fleet.restore("host-1-data", None, &to, Some("host-2"));
    assert_eq!(json_u64(&r, "point"), 2, "restore by host-2: {r}");
    assert_eq!(json_str(&r, "agent"), "host-2", "restore by host-2: {r}");
    assert_same_file(
        &to,
        &images[&("host-1-data", 2)],
        "restore of host-1-data written by host-2",
    );
}

/// With no command at all, each data source syncs every `sync_interval`, and the
/// scheduled points are listed and restore like any other.
#[test]
fn scheduled_syncs_run_on_their_interval() {
    let fleet = Fleet::builder()
        .node("node-1")
        .sync_interval("2s")
        .agent("host-1", "host-1-data", 4 * MIB)
        .start();
    let ids = poll(
        "two scheduled syncs of host-1-data",
        Duration::from_secs(30),
        || {
            let ids = fleet.point_ids("host-1-data");
            if ids.len() >= 2 {
                Ok(ids)
            } else {
                Err(format!("points so far: {ids:?}"))
            }
        },
    );
    assert_eq!(&ids[..2], &[1, 2], "scheduled points");
    let to = fleet.scratch("scheduled.img");
    fleet.restore("host-1-data", Some(ids[0]), &to, None);
    assert_same_file(
        &to,
        &fleet.volume("host-1-data"),
        "restore of a scheduled point",
    );
}

/// Restores that cannot be done say why and write nothing: a point that does not
/// exist, a target file that already exists, a relative path.
#[test]
fn impossible_restores_are_refused_clearly() {
    let fleet = Fleet::builder()
        .node("node-1")
        .agent("host-1", "host-1-data", 4 * MIB)
        .start();
    fleet.sync("host-1-data");

    let to = fleet.scratch("never.img");
    let to_s = to.to_string_lossy().into_owned();
    let (_, stderr) = fleet.cli_expect_fail(&[
        "restore",
        "host-1-data",
        "--point",
        "99",
        "--to",
        &to_s,
        "--wait",
    ]);
    assert!(stderr.contains("no point 99"), "stderr: {stderr}");
    assert!(!to.exists(), "a refused restore left {}", to.display());

    let existing = fleet.save_volume("host-1-data", "existing.img");
    let before = std::fs::read(&existing).expect("read");
    let existing_s = existing.to_string_lossy().into_owned();
    let (_, stderr) =
        fleet.cli_expect_fail(&["restore", "host-1-data", "--to", &existing_s, "--wait"]);
    assert!(stderr.contains("already exists"), "stderr: {stderr}");
    assert!(
        std::fs::read(&existing).expect("read") == before,
        "a refused restore changed {}",
        existing.display()
    );

    let (_, stderr) =
        fleet.cli_expect_fail(&["restore", "host-1-data", "--to", "relative.img", "--wait"]);
    assert!(stderr.contains("absolute path"), "stderr: {stderr}");
}
