//! Consistency checks: `bulwark check` compares every block with the node's stored
//! checksums; `check --deep` recomputes them from the replica's bytes, so bytes
//! flipped inside the replica on the node are found and exactly those blocks repaired.

use std::os::unix::fs::FileExt;

use bulwark_tests::{BLOCK_SIZE, Fleet, MIB, assert_same_file, json_str, json_u64};

const SIZE: u64 = 64 * MIB;
const SOURCE: &str = "host-1-data";

#[test]
fn deep_check_finds_and_repairs_flipped_replica_bytes() {
    let fleet = Fleet::builder()
        .node("node-1")
        .agent("host-1", SOURCE, SIZE)
        .start();
    fleet.sync(SOURCE);
    let replica = fleet.node_source_dir("node-1", SOURCE).join("replica");
    let damaged_blocks = [10u64, 500, SIZE / BLOCK_SIZE - 1];
    {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&replica)
            .expect("open the replica");
        for (i, b) in damaged_blocks.iter().enumerate() {
            let at = b * BLOCK_SIZE + 1000 + i as u64 * 7;
            let mut byte = [0u8; 1];
            f.read_exact_at(&mut byte, at).expect("read");
            byte[0] ^= 0xa5;
            f.write_all_at(&byte, at).expect("flip a byte");
        }
        f.sync_all().expect("fsync");
    }

    // The stored checksums still match the source: a plain check sends nothing.
    let r = fleet.cli_json(&["check", SOURCE, "--wait", "--json"]);
    assert_eq!(json_str(&r, "kind"), "check", "{r}");
    assert_eq!(json_u64(&r, "blocks_scanned"), SIZE / BLOCK_SIZE, "{r}");
    assert_eq!(
        json_u64(&r, "blocks_sent"),
        0,
        "stored checksums match: {r}"
    );

    let r = fleet.cli_json(&["check", SOURCE, "--deep", "--wait", "--json"]);
    assert_eq!(json_str(&r, "kind"), "check", "{r}");
    assert_eq!(
        json_u64(&r, "damaged_blocks"),
        damaged_blocks.len() as u64,
        "the node finds exactly the damaged blocks: {r}"
    );
    assert_eq!(
        json_u64(&r, "blocks_sent"),
        damaged_blocks.len() as u64,
        "the agent re-sends exactly the damaged blocks: {r}"
    );
    assert_eq!(
        json_u64(&r, "bytes_sent"),
        damaged_blocks.len() as u64 * BLOCK_SIZE,
        "{r}"
    );

    // Every point restores the source's bytes again, the old ones included.
    for p in fleet.point_ids(SOURCE) {
        let out = fleet.scratch(&format!("p{p}.img"));
        fleet.restore(SOURCE, Some(p), &out, None);
        assert_same_file(
            &out,
            &fleet.volume(SOURCE),
            &format!("point {p} after the repair"),
        );
    }
    let r = fleet.cli_json(&["check", SOURCE, "--deep", "--wait", "--json"]);
    assert_eq!(json_u64(&r, "damaged_blocks"), 0, "repaired: {r}");
    assert_eq!(json_u64(&r, "blocks_sent"), 0, "{r}");
}
