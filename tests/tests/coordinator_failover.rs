//! Agents, nodes and the CLI given two coordinator addresses, one of them dead (a
//! free port nothing listens on): everything works through the live one, whichever
//! of the two comes first. Then the coordinator moves to the other address while the
//! fleet runs: its nodes and agents lose their connections and find it there, through
//! their lists, without a restart.

use std::time::Duration;

use bulwark_tests::{Fleet, MIB, free_port, json_u64};

const SOURCE: &str = "host-1-data";

/// Syncs, restores every point byte for byte, and reads `bulwark status`.
fn sync_restore_status(fleet: &Fleet, points: &mut Vec<(u64, std::path::PathBuf)>, tag: &str) {
    bulwark_tests::files::rewrite_random_blocks(&fleet.volume(SOURCE), 16);
    let r = fleet.sync(SOURCE);
    let id = json_u64(&r, "point");
    points.push((id, fleet.save_volume(SOURCE, &format!("{tag}-p{id}.img"))));
    let expected: Vec<(u64, &std::path::Path)> =
        points.iter().map(|(i, p)| (*i, p.as_path())).collect();
    fleet.restore_points(SOURCE, &expected, tag);
    let v = fleet.cli_json(&["status", "--json"]);
    assert_eq!(v["nodes"]["up"], 2, "{tag}: {v}");
    assert_eq!(v["sources"]["ok"], 1, "{tag}: {v}");
    let out = fleet.cli(&["status"]);
    assert!(out.status.success(), "{tag}: `bulwark status` failed");
}

/// The dead address first, then (after the coordinator moved there) the live one
/// first: nodes and agents renew their certificates through the list at start, and
/// reconnect through it when the coordinator goes away.
#[test]
fn a_dead_coordinator_address_is_skipped_first_or_second() {
    let other = free_port();
    let other_url = format!("https://127.0.0.1:{other}");
    let mut fleet = Fleet::builder()
        .coordinator_list(&[&other_url, "{coordinator}"])
        .renew_at_start()
        .node("node-1")
        .node("node-2")
        .agent("host-1", SOURCE, 8 * MIB)
        .start();
    let live = fleet.coordinator_url().to_string();
    let agent_cfg = std::fs::read_to_string(fleet.agent("host-1").config_path()).expect("read");
    assert!(
        agent_cfg.contains(&format!("coordinators = [\"{other_url}\", \"{live}\"]")),
        "{agent_cfg}"
    );
    // Each daemon says which coordinator it uses, and why (the first did not connect).
    let using = format!("using coordinator {live}");
    fleet
        .agent("host-1")
        .wait_for_log(&using, Duration::from_secs(5));
    fleet
        .node("node-1")
        .wait_for_log(&using, Duration::from_secs(5));
    let mut points = Vec::new();
    sync_restore_status(&fleet, &mut points, "dead-first");

    // The order reversed: the coordinator moves to the first address; the second, where
    // the nodes and agents are connected, goes dead.
    fleet.move_coordinator(other);
    // Each lost its connection, started the next one at the next address, and says so.
    let moved = format!("using coordinator {other_url} (the connection to {live} was lost)");
    fleet
        .agent("host-1")
        .wait_for_log(&moved, Duration::from_secs(30));
    for node in ["node-1", "node-2"] {
        fleet
            .node(node)
            .wait_for_log(&moved, Duration::from_secs(30));
    }
    sync_restore_status(&fleet, &mut points, "dead-second");
    fleet.assert_all_alive();
}

/// The CLI alone: with every address dead it fails naming each one; a bad entry in
/// `--coordinator` is refused naming the entry.
#[test]
fn the_cli_names_every_address_it_tried() {
    let (a, b) = (
        format!("https://127.0.0.1:{}", free_port()),
        format!("https://127.0.0.1:{}", free_port()),
    );
    let fleet = Fleet::builder().coordinator_list(&[&a, &b]).build();
    let out = fleet.cli_as(fleet.admin(), &["status"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&a) && err.contains(&b) && err.contains("connection refused"),
        "{err}"
    );

    let fleet = Fleet::builder()
        .coordinator_list(&[&a, "http://x:1"])
        .build();
    let out = fleet.cli_as(fleet.admin(), &["status"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("entry 1 (\"http://x:1\")"), "{err}");
}
