//! Data files of a newer format: a node given a source whose delta says a format
//! version it does not read refuses that source (an alert naming the file and the
//! version), and serves its other sources.

use std::os::unix::fs::FileExt;
use std::time::Duration;

use bulwark_tests::{Fleet, MIB, assert_same_file, json_str, poll, rewrite_random_blocks};
use serde_json::Value;

const OLD: &str = "host-1-data";
const OTHER: &str = "host-2-data";
const SIZE: u64 = 4 * MIB;

#[test]
fn a_source_with_a_data_file_of_a_newer_format_is_refused_and_the_others_are_served() {
    let mut fleet = Fleet::builder()
        .node("node-1")
        .agent_source("host-1", OLD, None, SIZE, "")
        .agent_source("host-2", OTHER, None, SIZE, "")
        .start();
    fleet.sync(OLD);
    rewrite_random_blocks(&fleet.volume(OLD), 4);
    fleet.sync(OLD);
    fleet.sync(OTHER);
    let other = fleet.save_volume(OTHER, "other-p1.img");

    // A newer node wrote point 1's delta (format version 9).
    fleet.node("node-1").stop();
    let delta = fleet
        .node_source_dir("node-1", OLD)
        .join("deltas")
        .join(format!("{:020}.delta", 1));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&delta)
        .expect("point 1's delta");
    f.write_all_at(&9u32.to_le_bytes(), 8)
        .expect("write a newer format version");
    drop(f);
    fleet.node("node-1").start();
    fleet.wait_ready();

    let key = format!("refused-source/{OLD}");
    let alert = poll("the refused-source alert", Duration::from_secs(30), || {
        fleet
            .cli_json(&["alerts", "--json"])
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|x| x.get("key").and_then(Value::as_str) == Some(&key))
                    .cloned()
            })
            .ok_or_else(|| "not yet".to_string())
    });
    let message = json_str(&alert, "message");
    assert!(
        message.contains(&delta.display().to_string())
            && message.contains("format version 9, this node reads 2"),
        "the alert names the file and the version: {alert}"
    );
    let (_, err) = fleet.cli_expect_fail(&["sync", OLD, "--wait", "--json"]);
    assert!(
        err.contains("format version 9"),
        "a sync of it is refused: {err}"
    );

    // The other source is served: restored, and synced again.
    let restored = fleet.scratch("other-restored.img");
    fleet.restore(OTHER, Some(1), &restored, None);
    assert_same_file(&restored, &other, "the other source restores");
    rewrite_random_blocks(&fleet.volume(OTHER), 3);
    fleet.sync(OTHER);
    assert_eq!(fleet.point_ids(OTHER), vec![1, 2]);
}
