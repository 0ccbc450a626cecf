//! `bulwark-coordinator migrate`: a sled-backed fleet with a protection group, an
//! open alert, a finished drain and an unused enrollment token is copied into a
//! real etcd member, the coordinator restarts on etcd, and the fleet shows the same
//! state, takes the token, and keeps syncing and restoring byte for byte. Skips
//! (facility `etcd`) without an `etcd` binary.

use std::process::{Command, Output};
use std::time::Duration;

use bulwark_tests::etcd::EtcdCluster;
use bulwark_tests::fleet::Fleet;
use bulwark_tests::{MIB, bins, json_str, poll};
use serde_json::Value;

fn migrate(args: &[&str]) -> Output {
    Command::new(bins::bin(bins::COORDINATOR))
        .arg("migrate")
        .args(args)
        .output()
        .expect("run bulwark-coordinator migrate")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// What must survive the migration, without the fields that change by the second
/// (heartbeats, space used).
fn snapshot(fleet: &Fleet) -> Value {
    let pick = |v: Value, fields: &[&str]| -> Value {
        let mut rows: Vec<Value> = v
            .as_array()
            .expect("a JSON array")
            .iter()
            .map(|x| {
                fields
                    .iter()
                    .map(|f| (f.to_string(), x.get(*f).cloned().unwrap_or(Value::Null)))
                    .collect::<serde_json::Map<_, _>>()
                    .into()
            })
            .collect();
        rows.sort_by_key(|r: &Value| r.to_string());
        Value::Array(rows)
    };
    let mut points = serde_json::Map::new();
    for s in fleet.source_names() {
        let ids: Vec<Value> = fleet
            .points(&s)
            .iter()
            .map(|p| p.get("id").cloned().unwrap_or(Value::Null))
            .collect();
        points.insert(s, ids.into());
    }
    serde_json::json!({
        "sources": pick(fleet.cli_json(&["sources", "--json"]),
            &["name", "node", "epoch", "agent", "group", "size_bytes"]),
        "nodes": pick(fleet.cli_json(&["nodes", "--json"]),
            &["name", "state", "address", "capacity_bytes"]),
        "alerts": pick(fleet.cli_json(&["alerts", "--json"]),
            &["key", "severity", "subject", "message", "opened_at"]),
        "groups": fleet.cli_json(&["group", "list", "--json"]),
        "points": points,
    })
}

#[test]
fn a_sled_coordinator_migrated_to_etcd_shows_the_same_fleet_and_keeps_syncing() {
    let Some(etcd) = EtcdCluster::start(1) else {
        return;
    };
    // A second coordinator address nothing listens on: `status` reports it.
    let dead = format!("https://127.0.0.1:{}", bulwark_tests::free_port());
    let mut fleet = Fleet::builder()
        .coordinator_list(&["{coordinator}", &dead])
        .enrollment()
        .coordinator_extra("node_timeout = \"2s\"")
        .node("node-1")
        .node("node-2")
        .agent("host-1", "s1", 4 * MIB)
        .agent("host-2", "s2", 4 * MIB)
        .start();
    fleet.cli(&["group", "create", "g1", "--interval", "1h", "--keep", "5"]);
    fleet.cli(&["group", "add", "g1", "s1", "s2"]);
    for s in ["s1", "s2"] {
        fleet.sync(s);
    }
    // A finished move: everything leaves the node of s1.
    let drained = fleet.source_node("s1");
    let report = fleet.cli_json(&["drain", &drained, "--json"]);
    for m in report["moves"].as_array().expect("moves") {
        assert_eq!(json_str(m, "error"), "", "{report}");
    }
    bulwark_tests::rewrite_random_blocks(&fleet.volume("s1"), 5);
    fleet.sync("s1");
    let image = fleet.save_volume("s1", "s1-before.img");
    // An open alert: the drained (now empty) node stops.
    fleet.node(&drained).kill9();
    let key = format!("node-down/{drained}");
    poll("the node-down alert", Duration::from_secs(30), || {
        fleet.open_alert(&key).ok_or_else(|| "not yet".to_string())
    });
    // A token nobody used yet.
    let token = json_str(
        &fleet.cli_json(&[
            "token", "create", "--role", "agent", "--name", "host-9", "--ttl", "1h", "--json",
        ]),
        "token",
    );
    let before = snapshot(&fleet);
    // `bulwark status`: one sled coordinator, leading; no etcd.
    let st = fleet.cli_json(&["status", "--json"]);
    assert_eq!(st["coordinators"][0]["leading"], true, "{st}");
    assert!(
        st["coordinators"][0]["backend"]
            .as_str()
            .is_some_and(|b| b.starts_with("sled ")),
        "{st}"
    );
    assert!(st["etcd"].is_null(), "{st}");
    let other = &st["coordinators"][1];
    assert_eq!(other["address"], dead.as_str(), "{st}");
    assert_eq!(other["reachable"], false, "{st}");
    assert!(
        other["error"]
            .as_str()
            .is_some_and(|e| e.contains("refused")),
        "{st}"
    );

    let data = fleet.coordinator_data_dir();
    let from = format!("sled:{}", data.display());
    let to = format!("etcd:{}", etcd.endpoints().join(","));
    // While the coordinator runs, its database is locked.
    let out = migrate(&["--from", &from, "--to", &to]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("locked"), "{}", text(&out));

    fleet.coordinator().stop();
    let out = migrate(&["--from", &from, "--to", &to]);
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    eprintln!("{said}");
    for tree in ["nodes", "agents", "sources", "alerts", "groups", "tokens"] {
        assert!(
            said.lines()
                .any(|l| l.trim_start().starts_with(tree) && l.contains("verified")),
            "no line for tree {tree}: {said}"
        );
    }
    assert!(said.contains("crl.der"), "{said}");
    // A second copy into the same prefix is refused, naming keys.
    let out = migrate(&["--from", &from, "--to", &to]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("already holds") && text(&out).contains("/bulwark/"),
        "{}",
        text(&out)
    );

    // The coordinator on etcd.
    let config = fleet.coordinator().config_path().to_path_buf();
    let toml = std::fs::read_to_string(&config).expect("coordinator.toml");
    let endpoints: Vec<String> = etcd
        .endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect();
    std::fs::write(
        &config,
        format!(
            "{toml}\n[state]\nbackend = \"etcd\"\nendpoints = [{}]\nprefix = \"/bulwark\"\nleader_lease = \"2s\"\nadvertise = \"{}\"\n",
            endpoints.join(", "),
            fleet.coordinator_url()
        ),
    )
    .expect("rewrite coordinator.toml");
    fleet.coordinator().start();
    fleet.wait_coordinator();
    let after = snapshot(&fleet);
    assert_eq!(before, after, "the fleet differs after the migration");

    // The token made under sled enrolls a host now.
    let pki = fleet.scratch("host-9-pki");
    let out = Command::new(bins::bin(bins::AGENT))
        .args(["enroll", "--coordinator", fleet.enrollment_url(), "--dir"])
        .arg(&pki)
        .env("BULWARK_TOKEN", &token)
        .output()
        .expect("run enroll");
    assert!(out.status.success(), "{}", text(&out));

    // Syncs and restores go on (a write: it waits for this coordinator to lead).
    bulwark_tests::rewrite_random_blocks(&fleet.volume("s1"), 5);
    poll(
        "a sync on the etcd coordinator",
        Duration::from_secs(60),
        || {
            fleet
                .cli_json_try(&["sync", "s1", "--wait", "--json"])
                .map(|_| ())
        },
    );
    let image2 = fleet.save_volume("s1", "s1-after.img");
    // `bulwark status` on etcd: the coordinator leads, the member answers.
    let st = fleet.cli_json(&["status", "--json"]);
    let me = &st["coordinators"][0];
    assert_eq!(me["leading"], true, "{st}");
    assert_eq!(me["leader_url"], fleet.coordinator_url(), "{st}");
    assert_eq!(st["etcd"]["endpoints"][0]["healthy"], true, "{st}");
    let out = String::from_utf8_lossy(&fleet.cli(&["status"]).stdout).into_owned();
    eprintln!("{out}");
    assert!(
        out.contains("leader") && out.contains("etcd         1 of 1 endpoints answer"),
        "{out}"
    );
    let ids = fleet.point_ids("s1");
    assert!(ids.len() >= 3, "{ids:?}");
    let last = *ids.last().expect("a point");
    for (id, img) in [(last - 1, &image), (last, &image2)] {
        let to = fleet.scratch(&format!("s1-restore-{id}.img"));
        fleet.restore("s1", Some(id), &to, None);
        bulwark_tests::assert_same_file(&to, img, &format!("s1 point {id} after the migration"));
    }
}

/// The copy in commits: 250 keys of one tree (three commits), a tree the
/// coordinator does not know (a later version's: copied too), binary keys and
/// values.
#[test]
fn migrate_copies_every_tree_in_commits() {
    use bulwark_coordinator::migrate::{Migration, parse_to, run};
    use bulwark_coordinator::state::{EtcdState, SledState, StateStore, Txn};
    let Some(etcd) = EtcdCluster::start(1) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let db = SledState::open(&dir.path().join("registry")).expect("sled");
        let mut t = Txn::new();
        for i in 0..250u32 {
            t = t.put("sources", format!("s{i:04}"), vec![i as u8; 300]);
        }
        assert!(
            db.commit(t.put("later_tree", vec![0u8, 255, 1], vec![0xffu8, 0]))
                .expect("commit")
        );
    }
    // The handle's flusher lets go of sled's lock a moment after the drop.
    let m0 = std::time::Instant::now();
    let opts = parse_to(
        &format!("etcd:{}", etcd.endpoints().join(",")),
        "/migrated",
        None,
        Duration::from_secs(5),
    )
    .expect("target");
    let m = Migration {
        data_dir: dir.path().to_path_buf(),
        etcd: opts.clone(),
    };
    let report = loop {
        match run(&m) {
            Err(e) if e.to_string().contains("locked") && m0.elapsed() < Duration::from_secs(5) => {
                std::thread::sleep(Duration::from_millis(20));
            }
            r => break r.expect("migrate"),
        }
    };
    let keys: Vec<(String, usize)> = report.iter().map(|t| (t.tree.clone(), t.keys)).collect();
    assert_eq!(
        keys,
        vec![("later_tree".to_string(), 1), ("sources".to_string(), 250)]
    );
    let e = EtcdState::connect(&opts).expect("connect");
    let all = e.scan("sources", b"").expect("scan");
    assert_eq!(all.len(), 250);
    assert_eq!(all[249], (b"s0249".to_vec(), vec![249u8; 300]));
    assert_eq!(
        e.scan("later_tree", b"").expect("scan"),
        vec![(vec![0u8, 255, 1], vec![0xffu8, 0])]
    );
    let (n, _) = e.keys_in_prefix(10).expect("keys");
    assert_eq!(n, 251, "only the two trees' keys are under the prefix");
    // Again into the same prefix: refused, nothing changed.
    let err = run(&m).expect_err("a prefix with state");
    assert!(
        err.to_string().contains("already holds 251 key(s)"),
        "{err}"
    );
    assert_eq!(e.scan("sources", b"").expect("scan").len(), 250);
}
