//! The coordinator runs a fleet: a node that stops reporting is `down` with an alert
//! and comes back `up` by itself; placement says why a source went where it did.

use std::time::Duration;

use bulwark_tests::{Fleet, MIB, json_str, poll};
use serde_json::Value;

fn alert(fleet: &Fleet, key: &str, all: bool) -> Option<Value> {
    let args: &[&str] = if all {
        &["alerts", "--all", "--json"]
    } else {
        &["alerts", "--json"]
    };
    fleet.cli_json(args).as_array().and_then(|a| {
        a.iter()
            .find(|x| x.get("key").and_then(Value::as_str) == Some(key))
            .cloned()
    })
}

#[test]
fn a_silent_node_is_down_with_an_alert_and_comes_back_up_by_itself() {
    let mut fleet = Fleet::builder()
        .coordinator_extra("node_timeout = \"2s\"")
        .node("node-1")
        .node("node-2")
        .agent("host-1", "host-1-data", 4 * MIB)
        .start();
    fleet.node("node-2").kill9();
    poll(
        "node-2 to be down",
        Duration::from_secs(20),
        || match json_str(&fleet.node_info("node-2"), "state").as_str() {
            "down" => Ok(()),
            s => Err(format!("state {s}")),
        },
    );
    let a = poll("the node-down alert", Duration::from_secs(20), || {
        alert(&fleet, "node-down/node-2", false).ok_or("not yet".to_string())
    });
    assert_eq!(json_str(&a, "severity"), "critical", "{a}");
    assert_eq!(json_str(&a, "subject"), "node-2", "{a}");
    assert_eq!(json_str(&fleet.node_info("node-1"), "state"), "up");
    assert!(alert(&fleet, "node-down/node-1", true).is_none());

    fleet.node("node-2").start();
    poll(
        "node-2 to be up again",
        Duration::from_secs(20),
        || match json_str(&fleet.node_info("node-2"), "state").as_str() {
            "up" => Ok(()),
            s => Err(format!("state {s}")),
        },
    );
    poll(
        "the alert to resolve",
        Duration::from_secs(20),
        || match alert(&fleet, "node-down/node-2", true) {
            Some(a) if a.get("resolved").and_then(Value::as_bool) == Some(true) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
}

#[test]
fn sources_explain_says_why_a_source_is_on_its_node() {
    let fleet = Fleet::builder()
        .node("node-1")
        .node("node-2")
        .agent("host-1", "host-1-data", 4 * MIB)
        .start();
    let node = fleet.source_node("host-1-data");
    let out = fleet.cli(&["sources", "--explain", "host-1-data"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("placed on {node}")), "{text}");
    assert!(
        text.contains("node-1: score") && text.contains("node-2: score"),
        "every candidate is scored: {text}"
    );
    let v = fleet.cli_json(&["sources", "--explain", "host-1-data", "--json"]);
    assert_eq!(json_str(&v, "node"), node);
    let (_, err) = fleet.cli_expect_fail(&["sources", "--explain", "nope"]);
    assert!(err.contains("no data source named nope"), "{err}");
}
