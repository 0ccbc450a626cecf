//! An agent sends a volume only to the node the coordinator assigned, by the
//! certificate's SPIFFE id, not just to any node: with the assigned node stopped
//! and a real node process holding another node's certificate listening at its
//! address, the sync is refused in the handshake and nothing reaches the impostor;
//! with the assigned node back, the sync goes through.

use std::time::Duration;

use bulwark_tests::bins::{self, NODE};
use bulwark_tests::fleet::node_toml;
use bulwark_tests::{Daemon, Fleet, json_u64, poll};

#[test]
fn an_agent_refuses_to_sync_to_another_nodes_certificate_at_its_nodes_address() {
    let mut fleet = Fleet::builder()
        .node("n1")
        .node("n2")
        .agent("a1", "a1-data", 4 << 20)
        .start();
    assert_eq!(json_u64(&fleet.sync("a1-data"), "point"), 1);
    let assigned = fleet.source_node("a1-data");
    let other = if assigned == "n1" { "n2" } else { "n1" };
    let port = fleet.node(&assigned).port().expect("nodes listen");
    fleet.node(&assigned).stop();

    // A real node with the other node's certificate, at the assigned node's address.
    let dir = fleet.scratch("impostor");
    let disk = dir.join("disk1");
    std::fs::create_dir_all(&disk).expect("impostor disk");
    let config = dir.join("node.toml");
    std::fs::write(
        &config,
        node_toml(
            other,
            port,
            fleet.coordinator_url(),
            &dir,
            &disk,
            "10GiB",
            &fleet.identity(other),
        ),
    )
    .expect("impostor config");
    let mut impostor = Daemon::new(
        "impostor",
        bins::bin(NODE),
        config,
        fleet.root().join("logs").join("impostor.log"),
        Some(port),
    );
    impostor.start();
    poll("the impostor listening", Duration::from_secs(30), || {
        fleet.node_tls_ready(port)
    });

    let (_, stderr) = fleet.cli_expect_fail(&["sync", "a1-data", "--wait"]);
    let want = format!("expected node {assigned}");
    assert!(
        stderr.contains(&want) && stderr.contains(&format!("node {other}")),
        "the refusal does not say which node answered and which was expected: {stderr}"
    );
    assert!(fleet.agent("a1").log_text().contains(&want));
    assert!(
        !dir.join("disk1").join("bulwark").join("a1-data").exists(),
        "the impostor received a1-data"
    );
    impostor.assert_alive();
    impostor.stop();

    fleet.node(&assigned).start();
    fleet.wait_nodes_up(std::slice::from_ref(&assigned));
    let r = poll(
        "a sync to the assigned node",
        Duration::from_secs(30),
        || fleet.cli_json_try(&["sync", "a1-data", "--wait", "--json"]),
    );
    assert_eq!(json_u64(&r, "point"), 2, "{r}");
}
