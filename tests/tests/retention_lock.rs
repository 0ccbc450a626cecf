//! Retention locks: a compliance-locked point survives everything an admin, a
//! stolen admin key, an officer and a wiped coordinator can do; a governance lock
//! yields to the officer role only. The node enforces the lock from its own store.

use std::time::Duration;

use bulwark_tests::{Fleet, assert_same_file, json_str, json_u64, poll, rewrite_random_blocks};

const MIB: u64 = 1 << 20;

/// Syncs `source` `n` times, rewriting blocks in between; returns the saved image of
/// each point, by id.
fn points(fleet: &Fleet, source: &str, n: u64) -> Vec<(u64, std::path::PathBuf)> {
    let mut out = Vec::new();
    for i in 0..n {
        if i > 0 {
            rewrite_random_blocks(&fleet.volume(source), 4);
        }
        let id = json_u64(&fleet.sync(source), "point");
        out.push((id, fleet.save_volume(source, &format!("{source}-p{id}"))));
    }
    out
}

fn restore_all(fleet: &Fleet, source: &str, images: &[(u64, std::path::PathBuf)], what: &str) {
    for (id, image) in images {
        let to = fleet.scratch(&format!("{source}-{what}-r{id}"));
        fleet.restore(source, Some(*id), &to, None);
        assert_same_file(&to, image, &format!("{source} point {id} ({what})"));
    }
}

#[test]
fn a_compliance_locked_point_survives_admins_officers_and_a_wiped_coordinator() {
    let mut fleet = Fleet::builder()
        .node("n1")
        .agent("a1", "s1", 4 * MIB)
        .start();
    let officer = fleet.pki().issue("officer", "sec-1");
    let images = points(&fleet, "s1", 3);

    let locked = fleet.cli_json(&[
        "lock",
        "s1",
        "--min-age",
        "1h",
        "--mode",
        "compliance",
        "--json",
    ]);
    assert_eq!(json_str(&locked[0], "lock"), "compliance 1h", "{locked}");
    let listed = fleet.points("s1");
    for p in &listed {
        assert_eq!(p["lock"]["mode"], "compliance", "{p}");
        assert!(!json_str(&p["lock"], "until").is_empty(), "{p}");
    }

    // An admin shortens the retention to one point: nothing goes.
    fleet.cli(&["retention", "s1", "--keep", "1"]);
    let more = points(&fleet, "s1", 1);
    // A few heartbeats for the node to apply the policy (and prune if it could).
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(fleet.point_ids("s1").len(), 4, "the lock keeps every point");

    // An admin removes the source: refused, naming the lock.
    let (_, err) = fleet.cli_expect_fail(&["remove", "s1"]);
    assert!(err.contains("retention lock"), "{err}");

    // An admin (or a stolen admin key) lowers the lock: refused.
    let (_, err) =
        fleet.cli_expect_fail(&["lock", "s1", "--min-age", "1m", "--mode", "compliance"]);
    assert!(err.contains("can only be lengthened"), "{err}");

    // The officer tries to lift or shorten it: refused too (compliance).
    let (_, err) = fleet.cli_expect_fail_as(&officer, &["lock", "s1", "--min-age", "0", "--lift"]);
    assert!(err.contains("can only be lengthened"), "{err}");

    // The coordinator's host is lost: a new coordinator on an empty data directory
    // knows nothing of the lock, but the node does.
    fleet.coordinator().stop();
    std::fs::remove_dir_all(fleet.coordinator_data_dir()).expect("wipe the coordinator");
    fleet.coordinator().start();
    fleet.wait_nodes_up(&["n1".to_string()]);
    // The agent registers s1 again; its next sync places it (on n1, the only node,
    // which still holds its points and its lock).
    rewrite_random_blocks(&fleet.volume("s1"), 4);
    let again = poll(
        "a sync through the new coordinator",
        Duration::from_secs(30),
        || {
            fleet
                .cli_json_try(&["sync", "s1", "--wait", "--json"])
                .and_then(|v| {
                    if v.is_object() {
                        Ok(v)
                    } else {
                        Err(format!("{v}"))
                    }
                })
        },
    );
    let id = json_u64(&again, "point");
    let after = vec![(id, fleet.save_volume("s1", &format!("s1-p{id}")))];
    fleet.cli(&["retention", "s1", "--keep", "1"]);
    let (_, err) = fleet.cli_expect_fail(&["remove", "s1"]);
    assert!(err.contains("retention lock"), "{err}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        fleet.point_ids("s1").len(),
        5,
        "the node still holds its lock"
    );
    for p in fleet.points("s1") {
        assert_eq!(p["lock"]["mode"], "compliance", "{p}");
    }
    let all: Vec<_> = images.into_iter().chain(more).chain(after).collect();
    restore_all(&fleet, "s1", &all, "locked");
    fleet.assert_all_alive();
}

#[test]
fn a_governance_lock_yields_to_the_officer_only() {
    let fleet = Fleet::builder()
        .node("n1")
        .agent("a1", "s1", 4 * MIB)
        .start();
    let officer = fleet.pki().issue("officer", "sec-1");
    let images = points(&fleet, "s1", 3);
    fleet.cli(&["lock", "s1", "--min-age", "1h", "--mode", "governance"]);
    fleet.cli(&["retention", "s1", "--keep", "1"]);

    // The admin cannot lift or shorten it, at the coordinator or at the node.
    let (_, err) = fleet.cli_expect_fail(&["lock", "s1", "--min-age", "0", "--lift"]);
    assert!(err.contains("only an officer"), "{err}");
    let (_, err) =
        fleet.cli_expect_fail(&["lock", "s1", "--min-age", "1m", "--mode", "governance"]);
    assert!(err.contains("only an officer"), "{err}");
    let addr = fleet.node_address("n1");
    let admin_call = bulwark_tests::block_on(async {
        let mut node = bulwark_tests::grpc::node_client(&addr, fleet.admin()).await;
        node.set_lock(bulwark_proto::SetLockRequest {
            source: "s1".into(),
            lock: Some(bulwark_proto::RetentionLock::default()),
        })
        .await
    });
    let st = admin_call.expect_err("an admin cannot lower the node's lock");
    assert!(st.message().contains("only an officer"), "{}", st.message());
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(fleet.point_ids("s1").len(), 3, "still locked");
    restore_all(&fleet, "s1", &images, "governance");

    // The officer lifts it: the node prunes what the retention no longer keeps,
    // and the lowering is an alert.
    fleet.cli_as(&officer, &["lock", "s1", "--min-age", "0", "--lift"]);
    poll(
        "the prune after the lift",
        Duration::from_secs(30),
        || match fleet.point_ids("s1") {
            ids if ids.len() == 1 => Ok(()),
            ids => Err(format!("{ids:?}")),
        },
    );
    let alerts = fleet.cli_json(&["alerts", "--json"]);
    let lowered = alerts
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| json_str(a, "key").starts_with("lock-lowered/"))
        .count();
    assert!(lowered >= 1, "{alerts}");
    let newest = images.last().expect("a point");
    restore_all(&fleet, "s1", std::slice::from_ref(newest), "after-lift");
}

#[test]
fn a_lock_moves_with_its_source_and_keeps_the_old_copy_until_it_ages_out() {
    let fleet = Fleet::builder()
        .node("n1")
        .node("n2")
        .agent("a1", "s1", 4 * MIB)
        .start();
    let images = points(&fleet, "s1", 2);
    let from = fleet.source_node("s1");
    let to = if from == "n1" { "n2" } else { "n1" };
    fleet.cli(&["lock", "s1", "--min-age", "1h", "--mode", "compliance"]);
    let report = fleet.cli_json(&["drain", &from, "--json"]);
    assert_eq!(fleet.source_node("s1"), to, "{report}");
    // The lock came along in the source's record: the new node holds it.
    for p in fleet.points("s1") {
        assert_eq!(p["lock"]["mode"], "compliance", "{p}");
    }
    // The old node refuses to drop its copy while the lock holds its points.
    let old = fleet.node_source_dir(&from, "s1");
    std::thread::sleep(Duration::from_secs(2));
    assert!(old.join("replica").exists(), "{} kept", old.display());
    let log = std::fs::read_to_string(fleet.root().join("logs").join("coordinator.log"))
        .expect("coordinator log");
    assert!(
        log.contains("kept by its retention lock"),
        "the coordinator says why"
    );
    restore_all(&fleet, "s1", &images, "moved");
}
