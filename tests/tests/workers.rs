//! `bulwark workers`: every daemon's background loops, with their state, runs and
//! last error, read from the coordinator and (with `--node`) from a node itself;
//! and a daemon stops its workers in order when asked to stop.

use std::time::Duration;

use bulwark_tests::{Fleet, json_str, json_u64, poll};
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn worker<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .and_then(|a| a.iter().find(|w| w["name"] == name))
        .unwrap_or_else(|| panic!("no worker {name} in {list:#}"))
}

#[test]
fn workers_are_listed_with_their_runs_and_a_failure_is_kept_as_the_last_error() {
    let mut fleet = Fleet::builder()
        .node("n1")
        .agent("a1", "s1", 4 * MIB)
        .start();
    fleet.sync("s1");

    // The coordinator's loops: all listed, none failed; those that run at start
    // have run (monitor, scrub and forecast may first wait one period).
    let list = fleet.cli_json(&["workers", "--json"]);
    for name in ["monitor", "scrub", "forecast"] {
        let w = worker(&list, name);
        assert_eq!(json_u64(w, "failures"), 0, "{w}");
        assert!(json_u64(w, "period_ms") > 0, "{w}");
    }
    for name in ["schedule", "moves"] {
        let w = worker(&list, name);
        assert_eq!(json_str(w, "daemon"), "coordinator", "{w}");
        assert!(
            ["idle", "running"].contains(&json_str(w, "state").as_str()),
            "{w}"
        );
        assert!(json_u64(w, "runs") >= 1, "{name} never ran: {w}");
        assert_eq!(json_u64(w, "failures"), 0, "{w}");
        assert!(w["last_error"] == "" && w["last_ok"].is_string(), "{w}");
    }
    assert_eq!(json_u64(worker(&list, "schedule"), "period_ms"), 500);

    // The node's, asked of the node itself.
    let list = fleet.cli_json(&["workers", "--node", "n1", "--json"]);
    for name in ["heartbeat", "renewal"] {
        let w = worker(&list, name);
        assert_eq!(json_str(w, "daemon"), "n1", "{w}");
        assert!(json_u64(w, "runs") >= 1, "{name} never ran: {w}");
    }
    let (_, err) = fleet.cli_expect_fail(&["workers", "--node", "n9"]);
    assert!(err.contains("no storage node \"n9\""), "{err}");

    // The coordinator away for a few heartbeats: the node's heartbeat fails, says
    // why, and goes on; once the coordinator is back it succeeds again.
    let status = fleet.coordinator().stop();
    assert!(status.success(), "the coordinator stopped with {status}");
    std::thread::sleep(Duration::from_millis(2500));
    fleet.coordinator().start();
    fleet.wait_coordinator();
    fleet.wait_nodes_up(&["n1".to_string()]);
    let hb = poll(
        "a heartbeat after the failures",
        Duration::from_secs(20),
        || {
            let list = fleet.cli_json(&["workers", "--node", "n1", "--json"]);
            let w = worker(&list, "heartbeat").clone();
            let failed_before_ok = w["last_error_at"]
                .as_str()
                .is_some_and(|at| json_str(&w, "last_ok").as_str() > at);
            if json_u64(&w, "failures") >= 1 && failed_before_ok {
                Ok(w)
            } else {
                Err(format!("heartbeat worker: {w}"))
            }
        },
    );
    assert!(
        json_str(&hb, "last_error").contains("cannot report to the coordinator"),
        "{hb}"
    );
    assert!(json_u64(&hb, "runs") > json_u64(&hb, "failures"), "{hb}");

    // Each daemon stops its workers and exits cleanly on SIGTERM.
    for (name, status) in fleet.stop_all() {
        assert!(status.success(), "{name} exited with {status}");
    }
}
