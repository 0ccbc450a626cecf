//! The coordinator runs a fleet: a node that stops reporting is `down` with an alert
//! and comes back `up` by itself; placement says why a source went where it did.

use std::time::Duration;

use bulwark_tests::{Fleet, MIB, json_str, json_u64, poll};
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

    // A node reports its disks' health: a pool directory that vanished is a warning.
    assert_eq!(json_str(&fleet.node_info("node-1"), "health"), "ok");
    let empty = if fleet.source_node("host-1-data") == "node-1" {
        "node-2"
    } else {
        "node-1"
    };
    let pool = fleet.node_dir(empty).join("disk1").join("bulwark");
    let aside = fleet.node_dir(empty).join("disk1").join("moved-away");
    std::fs::rename(&pool, &aside).expect("move the pool directory away");
    let key = format!("node-health/{empty}");
    let a = poll("the node-health alert", Duration::from_secs(20), || {
        alert(&fleet, &key, false).ok_or("not yet".to_string())
    });
    assert!(json_str(&a, "message").contains("not writable"), "{a}");
    assert_ne!(json_str(&fleet.node_info(empty), "health"), "ok");
    std::fs::rename(&aside, &pool).expect("put the pool directory back");
    poll(
        "the node-health alert to resolve",
        Duration::from_secs(20),
        || match alert(&fleet, &key, false) {
            None => Ok(()),
            Some(a) => Err(format!("{a}")),
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

/// A `SyncBegin` for `source` at `epoch` on top of `base`.
fn begin(source: &str, epoch: u64, base: u64) -> bulwark_proto::SyncBegin {
    bulwark_proto::SyncBegin {
        source: source.to_string(),
        epoch,
        size_bytes: SIZE,
        block_size: bulwark_tests::BLOCK_SIZE as u32,
        base_point: base,
        consistency: bulwark_proto::Consistency::Crash as i32,
        kind: bulwark_proto::PointKind::Incremental as i32,
        want_digests: false,
        deep: false,
    }
}

const SIZE: u64 = 8 * MIB;

#[test]
fn draining_a_node_while_syncs_run_moves_every_source_and_fences_the_old_node() {
    let names: Vec<String> = (1..=6).map(|i| format!("host-{i}-data")).collect();
    let mut b = Fleet::builder()
        .node("node-1")
        .node("node-2")
        .node("node-3");
    for (i, n) in names.iter().enumerate() {
        b = b.agent(&format!("host-{}", i + 1), n, SIZE);
    }
    let fleet = b.start();
    let mut images: std::collections::HashMap<String, Vec<std::path::PathBuf>> = Default::default();
    for n in &names {
        fleet.sync(n);
        let p1 = fleet.save_volume(n, &format!("{n}-1.img"));
        bulwark_tests::rewrite_random_blocks(&fleet.volume(n), 5);
        fleet.sync(n);
        let p2 = fleet.save_volume(n, &format!("{n}-2.img"));
        images.insert(n.clone(), vec![p1, p2]);
    }
    // The node holding the first source, and what it holds.
    let drained = fleet.source_node(&names[0]);
    let on_it: Vec<String> = names
        .iter()
        .filter(|n| fleet.source_node(n) == drained)
        .cloned()
        .collect();
    let before: Vec<(String, u64)> = on_it
        .iter()
        .map(|n| (n.clone(), json_u64(&fleet.source_info(n), "epoch")))
        .collect();
    let old_address = fleet.node_address(&drained);

    // Syncs of every source run while the drain does.
    let syncs: Vec<_> = names
        .iter()
        .map(|n| fleet.cli_spawn(&["sync", n, "--wait", "--json"]))
        .collect();
    let report = fleet.cli_json(&["drain", &drained, "--json"]);
    let moves = report["moves"].as_array().expect("moves");
    assert_eq!(moves.len(), on_it.len(), "{report}");
    for m in moves {
        assert_eq!(json_str(m, "error"), "", "{m}");
        assert_ne!(json_str(m, "to"), drained, "{m}");
    }
    for s in syncs {
        let out = s.wait(Duration::from_secs(120)).expect("a sync ended");
        assert!(
            out.status.success(),
            "a sync during the drain failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(json_str(&fleet.node_info(&drained), "state"), "draining");
    for n in &names {
        let info = fleet.source_info(n);
        assert_ne!(json_str(&info, "node"), drained, "{info}");
        // The sync that ran beside the drain made point 3, of the volume as it was.
        assert_eq!(fleet.point_ids(n), vec![1, 2, 3], "{n}");
        let imgs = &images[n];
        for (id, image) in [(1, &imgs[0]), (2, &imgs[1]), (3, &imgs[1])] {
            let to = fleet.scratch(&format!("{n}-restore-{id}.img"));
            fleet.restore(n, Some(id), &to, None);
            bulwark_tests::assert_same_file(&to, image, &format!("{n} point {id} after the drain"));
        }
    }
    // The old node refuses a write at the old epoch, and dropped its copies.
    for (n, epoch) in &before {
        assert!(json_u64(&fleet.source_info(n), "epoch") > *epoch);
        let agent = fleet.source_agent(n);
        let ex = bulwark_tests::block_on(async {
            let mut c =
                bulwark_tests::grpc::node_client(&old_address, &fleet.identity(&agent)).await;
            bulwark_tests::grpc::sync_exchange(
                &mut c,
                begin(n, *epoch, 3),
                Vec::new(),
                Duration::from_secs(30),
            )
            .await
        });
        assert!(!ex.committed(), "the old node took a sync of {n}: {ex:?}");
        let st = ex.expect_error("a sync at the stale epoch");
        assert!(
            st.message().contains("assigned to node") || st.message().contains("stale"),
            "{st:?}"
        );
        poll(
            "the old copy to be dropped",
            Duration::from_secs(20),
            || {
                let dir = fleet.node_source_dir(&drained, n);
                if dir.exists() {
                    Err(format!("{} exists", dir.display()))
                } else {
                    Ok(())
                }
            },
        );
    }
    // A node being drained gets no new sources: a fresh rebalance plans nothing onto it.
    let plan = fleet.cli_json(&["rebalance", "--dry-run", "--json"]);
    assert!(
        plan["moves"]
            .as_array()
            .is_some_and(|m| m.iter().all(|x| json_str(x, "to") != drained)),
        "{plan}"
    );
}

#[test]
fn kill9_of_the_coordinator_during_a_drain_rolls_the_move_back_and_loses_nothing() {
    let mut fleet = Fleet::builder()
        .node("node-1")
        .node("node-2")
        .agent("host-1", "host-1-data", SIZE)
        .start();
    let source = "host-1-data";
    fleet.sync(source);
    let p1 = fleet.save_volume(source, "p1.img");
    bulwark_tests::rewrite_random_blocks(&fleet.volume(source), 5);
    fleet.sync(source);
    let p2 = fleet.save_volume(source, "p2.img");
    let from = fleet.source_node(source);
    let to = if from == "node-1" { "node-2" } else { "node-1" };
    let epoch = json_u64(&fleet.source_info(source), "epoch");

    // Hold the coordinator once the target has the whole copy, before the switch.
    let status = fleet
        .coordinator()
        .restart_with_env(&[("BULWARK_FAILPOINTS", "coordinator-move-copied=pause")]);
    assert!(
        status.success(),
        "the coordinator did not stop cleanly: {status}"
    );
    fleet.wait_ready();
    let drain = fleet.cli_spawn(&["drain", &from, "--json"]);
    fleet.coordinator().wait_for_log(
        "failpoint coordinator-move-copied reached",
        Duration::from_secs(60),
    );
    assert!(
        fleet.node_source_dir(to, source).exists(),
        "the target has no copy at the failpoint"
    );
    fleet.coordinator().kill9();
    let out = drain
        .wait(Duration::from_secs(60))
        .expect("the drain command ended");
    assert!(
        !out.status.success(),
        "the drain reported success through a crash"
    );

    // Restart: the move is rolled back, the target's copy dropped, nothing lost.
    // (The node stays `draining`, as the operator asked, so the harness's "every node
    // up" wait does not apply.)
    fleet.coordinator().start();
    fleet.wait_coordinator();
    poll(
        "the move to be rolled back",
        Duration::from_secs(30),
        || {
            let info = fleet.source_info(source);
            let copy = fleet.node_source_dir(to, source);
            match (
                json_str(&info, "node"),
                json_str(&info, "state"),
                copy.exists(),
            ) {
                (n, s, false) if n == from && s == "ok" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    );
    assert_eq!(json_u64(&fleet.source_info(source), "epoch"), epoch);
    assert_eq!(fleet.point_ids(source), vec![1, 2]);
    poll(
        "the agent to reconnect",
        Duration::from_secs(30),
        || match fleet
            .agents()
            .first()
            .and_then(|a| a.get("connected"))
            .and_then(Value::as_bool)
        {
            Some(true) => Ok(()),
            other => Err(format!("connected: {other:?}")),
        },
    );
    for (id, image) in [(1, &p1), (2, &p2)] {
        let to = fleet.scratch(&format!("after-crash-{id}.img"));
        fleet.restore(source, Some(id), &to, None);
        bulwark_tests::assert_same_file(&to, image, &format!("point {id} after the crash"));
    }
    // The source still syncs where it is, and a second drain moves it.
    fleet.sync(source);
    let report = fleet.cli_json(&["drain", &from, "--json"]);
    assert_eq!(json_str(&report["moves"][0], "error"), "", "{report}");
    assert_eq!(fleet.source_node(source), to);
    assert_eq!(fleet.point_ids(source), vec![1, 2, 3]);
    let last = fleet.scratch("after-move-3.img");
    fleet.restore(source, Some(3), &last, None);
    bulwark_tests::assert_same_file(&last, &p2, "point 3 from the new node");
}

#[test]
fn a_protection_group_runs_the_schedule_keeps_its_retention_and_flags_missed_syncs() {
    let mut fleet = Fleet::builder()
        .coordinator_extra("max_syncs_per_node = 1")
        .node("node-1")
        .agent("host-1", "s1", 4 * MIB)
        .agent("host-2", "s2", 4 * MIB)
        .agent("host-3", "s3", 4 * MIB)
        .start();
    let (_, err) =
        fleet.cli_expect_fail(&["group", "create", "g1", "--interval", "2s", "--at", "25:00"]);
    assert!(err.contains("HH:MM"), "{err}");
    let g = fleet.cli_json(&[
        "group",
        "create",
        "g1",
        "--interval",
        "2s",
        "--keep",
        "3",
        "--at",
        "02:00",
        "--points-space",
        "3MiB",
        "--json",
    ]);
    assert_eq!(json_u64(&g, "interval_ms"), 2000, "{g}");
    assert_eq!(g["point_times"], serde_json::json!(["02:00"]), "{g}");
    fleet.cli(&["group", "add", "g1", "s1", "s2", "s3"]);
    let groups = fleet.cli_json(&["group", "list", "--json"]);
    assert_eq!(
        groups[0]["sources"],
        serde_json::json!(["s1", "s2", "s3"]),
        "{groups}"
    );
    // The table says the interval the way it was written (`2s`, not `2.0 s`).
    let out = fleet.cli(&["group", "list"]);
    let table = String::from_utf8_lossy(&out.stdout);
    let row = table
        .lines()
        .find(|l| l.starts_with("g1 "))
        .unwrap_or_else(|| panic!("no row for g1:\n{table}"));
    assert_eq!(row.split_whitespace().nth(1), Some("2s"), "{table}");
    // No sync command: the coordinator's schedule makes the points, and the group's
    // retention keeps three.
    for s in ["s1", "s2", "s3"] {
        poll(
            &format!("scheduled syncs of {s}"),
            Duration::from_secs(60),
            || {
                let info = fleet.source_info(s);
                let ids = fleet.point_ids(s);
                if json_u64(&info, "last_point") >= 4 && ids.len() == 3 {
                    Ok(())
                } else {
                    Err(format!(
                        "last point {}, points {ids:?}",
                        json_u64(&info, "last_point")
                    ))
                }
            },
        );
        assert_eq!(json_str(&fleet.source_info(s), "group"), "g1");
        // The group's allocation reaches the node.
        poll(
            &format!("the group's allocation of {s}"),
            Duration::from_secs(20),
            || match json_u64(&fleet.source_info(s), "points_alloc_bytes") {
                n if n == 3 * MIB => Ok(()),
                n => Err(format!("points_alloc_bytes {n}")),
            },
        );
    }
    // An agent that is gone misses its syncs: a critical alert, resolved when it is back.
    fleet.agent("host-2").kill9();
    let a = poll("the missed-sync alert", Duration::from_secs(30), || {
        alert(&fleet, "sync-missed/s2", false).ok_or("not yet".to_string())
    });
    assert_eq!(json_str(&a, "severity"), "critical", "{a}");
    fleet.agent("host-2").start();
    poll(
        "the alert to resolve",
        Duration::from_secs(30),
        || match alert(&fleet, "sync-missed/s2", false) {
            None => Ok(()),
            Some(a) => Err(format!("{a}")),
        },
    );
    let (_, err) = fleet.cli_expect_fail(&["group", "delete", "g1"]);
    assert!(err.contains("still has sources"), "{err}");
    let r = fleet.cli_json(&["group", "remove", "s1", "s2", "s3", "--json"]);
    assert_eq!(r["sources"], serde_json::json!(["s1", "s2", "s3"]), "{r}");
    fleet.cli(&["group", "delete", "g1"]);
    assert_eq!(
        fleet.cli_json(&["group", "list", "--json"]),
        serde_json::json!([])
    );
}

/// `nodes --json` as name → (state, capacity, allocated).
fn node_fill(fleet: &Fleet) -> Vec<(String, String, u64, u64)> {
    fleet
        .nodes()
        .iter()
        .map(|n| {
            (
                json_str(n, "name"),
                json_str(n, "state"),
                json_u64(n, "capacity_bytes"),
                json_u64(n, "allocated_bytes"),
            )
        })
        .collect()
}

fn spread(fill: &[(String, String, u64, u64)]) -> f64 {
    let f: Vec<f64> = fill
        .iter()
        .filter(|n| n.1 == "up")
        .map(|n| n.3 as f64 / n.2 as f64)
        .collect();
    f.iter().copied().fold(f64::MIN, f64::max) - f.iter().copied().fold(f64::MAX, f64::min)
}

#[test]
fn placement_across_unequal_nodes_stays_within_capacity_and_spread_and_rebalance_fills_a_new_node()
{
    let mut b = Fleet::builder()
        .node_sized("node-1", "30GiB")
        .node_sized("node-2", "60GiB")
        .node_sized("node-3", "90GiB");
    let names: Vec<String> = (1..=12).map(|i| format!("host-{i}-data")).collect();
    for (i, n) in names.iter().enumerate() {
        b = b.agent(&format!("host-{}", i + 1), n, (1 + i as u64 % 4) * 2 * MIB);
    }
    let mut fleet = b.build();
    // node-3 joins later: the first twelve sources land on node-1 and node-2.
    fleet.coordinator().start();
    fleet.wait_coordinator();
    fleet.node("node-1").start();
    fleet.node("node-2").start();
    poll("two nodes up", Duration::from_secs(30), || {
        let up = node_fill(&fleet).iter().filter(|n| n.1 == "up").count();
        if up == 2 {
            Ok(())
        } else {
            Err(format!("{up} up"))
        }
    });
    for i in 1..=12 {
        fleet.agent(&format!("host-{i}")).start();
    }
    poll("every source placed", Duration::from_secs(60), || {
        let unplaced: Vec<String> = fleet
            .sources()
            .iter()
            .filter(|s| json_str(s, "node").is_empty())
            .map(|s| json_str(s, "name"))
            .collect();
        if fleet.sources().len() == 12 && unplaced.is_empty() {
            Ok(())
        } else {
            Err(format!("unplaced: {unplaced:?}"))
        }
    });
    let fill = node_fill(&fleet);
    for n in &fill {
        assert!(n.3 <= n.2, "{} is over capacity: {fill:?}", n.0);
    }
    assert!(
        spread(&fill) <= 0.10,
        "placement left a spread of {:.3}: {fill:?}",
        spread(&fill)
    );
    let mut images = std::collections::HashMap::new();
    for n in &names {
        fleet.sync(n);
        images.insert(n.clone(), fleet.save_volume(n, &format!("{n}.img")));
    }

    // node-3 arrives empty: a dry run plans moves onto it, a real rebalance makes them.
    fleet.node("node-3").start();
    poll("node-3 up", Duration::from_secs(30), || {
        match node_fill(&fleet).iter().find(|n| n.0 == "node-3") {
            Some(n) if n.1 == "up" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let plan = fleet.cli_json(&["rebalance", "--dry-run", "--json"]);
    let planned = plan["moves"].as_array().map_or(0, Vec::len);
    assert!(planned > 0, "{plan}");
    assert!(
        plan["moves"]
            .as_array()
            .is_some_and(|m| m.iter().all(|x| json_str(x, "to") == "node-3")),
        "{plan}"
    );
    let done = fleet.cli_json(&["rebalance", "--json"]);
    let moves = done["moves"].as_array().expect("moves");
    assert_eq!(moves.len(), planned, "{done}");
    for m in moves {
        assert_eq!(json_str(m, "error"), "", "{m}");
    }
    // The nodes' own reports catch up with the moves at their next heartbeat.
    poll(
        "the spread after the rebalance",
        Duration::from_secs(20),
        || {
            let fill = node_fill(&fleet);
            if spread(&fill) <= 0.10 {
                Ok(())
            } else {
                Err(format!("spread {:.3}: {fill:?}", spread(&fill)))
            }
        },
    );
    for m in moves {
        let n = json_str(m, "source");
        assert_eq!(fleet.source_node(&n), "node-3");
        let to = fleet.scratch(&format!("{n}-after.img"));
        fleet.restore(&n, Some(1), &to, None);
        bulwark_tests::assert_same_file(&to, &images[&n], &format!("{n} after the rebalance"));
        std::fs::remove_file(&to).expect("remove the restored file");
    }

    // Drain the smallest node while every source syncs: its sources go to the other
    // two, which stay within capacity, and every point restores from its new node.
    let on_1: Vec<String> = names
        .iter()
        .filter(|n| fleet.source_node(n) == "node-1")
        .cloned()
        .collect();
    assert!(!on_1.is_empty(), "node-1 holds nothing to drain");
    let syncs: Vec<_> = names
        .iter()
        .map(|n| fleet.cli_spawn(&["sync", n, "--wait", "--json"]))
        .collect();
    let report = fleet.cli_json(&["drain", "node-1", "--json"]);
    assert_eq!(
        report["moves"].as_array().map(Vec::len),
        Some(on_1.len()),
        "{report}"
    );
    for s in syncs {
        let out = s.wait(Duration::from_secs(120)).expect("a sync ended");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for n in &names {
        assert_ne!(fleet.source_node(n), "node-1");
        assert_eq!(fleet.point_ids(n), vec![1, 2], "{n}");
    }
    for n in &on_1 {
        for id in [1, 2] {
            let to = fleet.scratch(&format!("{n}-drained-{id}.img"));
            fleet.restore(n, Some(id), &to, None);
            bulwark_tests::assert_same_file(
                &to,
                &images[n],
                &format!("{n} point {id} after the drain"),
            );
            std::fs::remove_file(&to).expect("remove the restored file");
        }
    }
    let fill = node_fill(&fleet);
    for n in &fill {
        assert!(
            n.3 <= n.2,
            "{} is over capacity after the drain: {fill:?}",
            n.0
        );
    }
}

#[test]
fn every_server_answers_the_grpc_health_check_and_status_sums_up_the_fleet() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let fleet = Fleet::builder()
        .node("node-1")
        .agent("host-1", "host-1-data", 4 * MIB)
        .start();
    fleet.sync("host-1-data");
    let targets = [
        (
            fleet.coordinator_url().to_string(),
            bulwark_common::tls::Role::Coordinator,
            "bulwark.v1.Coordinator",
        ),
        (
            fleet.node_address("node-1"),
            bulwark_common::tls::Role::Node,
            "bulwark.v1.Node",
        ),
    ];
    for (url, role, service) in targets {
        let statuses = bulwark_tests::block_on(async {
            let ch = bulwark_tests::grpc::channel(&url, fleet.admin(), role)
                .await
                .expect("connect");
            let mut h = HealthClient::new(ch);
            let mut out = Vec::new();
            for s in ["", service, "no.such.Service"] {
                out.push(
                    h.check(HealthCheckRequest { service: s.into() })
                        .await
                        .map(|r| r.into_inner().status),
                );
            }
            out
        });
        assert_eq!(
            statuses[0].as_ref().ok(),
            Some(&(ServingStatus::Serving as i32)),
            "{url}"
        );
        assert_eq!(
            statuses[1].as_ref().ok(),
            Some(&(ServingStatus::Serving as i32)),
            "{url}"
        );
        assert!(
            statuses[2].is_err(),
            "{url}: an unknown service is not found"
        );
    }
    let out = fleet.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("nodes        1 up"), "{text}");
    assert!(text.contains("sources      1 ok"), "{text}");
    let v = fleet.cli_json(&["status", "--json"]);
    assert_eq!(v["nodes"]["up"], 1, "{v}");
    assert_eq!(v["sources"]["ok"], 1, "{v}");
    assert_eq!(v["sources_never_synced"], 0, "{v}");
}

#[test]
fn a_certificate_expiring_within_30_days_raises_an_alert() {
    let mut fleet = Fleet::builder()
        .node("node-1")
        .agent("host-1", "host-1-data", 4 * MIB)
        .start();
    assert!(alert(&fleet, "cert-expiring/agent/host-1", true).is_none());
    // The agent gets a certificate valid for 10 more days and reconnects with it.
    fleet.agent("host-1").stop();
    let key = fleet.pki().dir().join("host-1.key");
    let crt = fleet.pki().dir().join("host-1.crt");
    std::fs::remove_file(&key).expect("remove the old key");
    std::fs::remove_file(&crt).expect("remove the old certificate");
    fleet.pki().issue_with("agent", "host-1", &["--days", "10"]);
    fleet.agent("host-1").start();
    let a = poll("the cert-expiring alert", Duration::from_secs(30), || {
        alert(&fleet, "cert-expiring/agent/host-1", false).ok_or("not yet".to_string())
    });
    assert_eq!(json_str(&a, "severity"), "warning", "{a}");
    assert!(json_str(&a, "message").contains("expires in 9 days"), "{a}");
}
