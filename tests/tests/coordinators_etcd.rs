//! Several coordinators on one etcd cluster (issue 25), end to end with the real
//! binaries: a three-member etcd on 127.0.0.1, three coordinators (`[state] backend =
//! "etcd"`), nodes and agents given all three addresses.
//!
//! - The leader is killed (-9) in the middle of a drain: another coordinator leads,
//!   the move is rolled back (or completed) by the new leader, a source's record in
//!   etcd never names a node outside the move, every point restores byte-identical,
//!   the killed coordinator comes back as a follower, and the CLI given all three
//!   addresses works whichever one is down.
//! - The leader is stopped (SIGSTOP) past its lease: another leads; let go
//!   (SIGCONT), it finds itself deposed and follows. One etcd member killed: nothing
//!   changes; two: a change is refused saying the state store is out of reach, and all
//!   resumes when the members are back.
//!
//! Timings (time to a new leader) are printed, not asserted: the benchmark
//! (`bench/coordinators.sh`) holds them to their targets.

use std::time::{Duration, Instant};

use bulwark_coordinator::state::EtcdState;
use bulwark_coordinator::state::etcd::EtcdOptions;
use bulwark_tests::etcd::EtcdCluster;
use bulwark_tests::{Daemon, Fleet, FleetBuilder, MIB, Value, bins, free_port, json_str, poll};

const PREFIX: &str = "/bulwark-e2e";
/// The leader lease of the drain test: short, so the failover is quick.
const LEASE: &str = "2s";

/// A fleet whose coordinator is the first of three on `etcd`, and the other two.
struct Coordinators {
    fleet: Fleet,
    /// Coordinators 2 and 3 (the fleet's own is 1).
    others: Vec<Daemon>,
    urls: Vec<String>,
    etcd: EtcdCluster,
}

fn state_table(etcd: &EtcdCluster, advertise: &str, lease: &str) -> String {
    let endpoints: Vec<String> = etcd
        .endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect();
    format!(
        "[state]\nbackend = \"etcd\"\nendpoints = [{}]\nprefix = \"{PREFIX}\"\nleader_lease = \"{lease}\"\nadvertise = \"{advertise}\"\n",
        endpoints.join(", ")
    )
}

/// Builds the fleet (`builder` with the coordinator list), writes `[state]` into the
/// three coordinators' configs, starts coordinator 1 (with `env`) first so it leads,
/// then the other two, the nodes and the agents.
fn start(
    builder: FleetBuilder,
    n: usize,
    lease: &str,
    env: &[(&str, &str)],
) -> Option<Coordinators> {
    let etcd = EtcdCluster::start(3)?;
    let ports: Vec<u16> = (1..n).map(|_| free_port()).collect();
    let extra: Vec<String> = ports
        .iter()
        .map(|p| format!("https://127.0.0.1:{p}"))
        .collect();
    let mut list = vec!["{coordinator}"];
    list.extend(extra.iter().map(String::as_str));
    let mut fleet = builder.coordinator_list(&list).build();
    let first = fleet.coordinator_url().to_string();
    let config = fleet.coordinator().config_path().to_path_buf();
    let base = std::fs::read_to_string(&config).expect("read coordinator.toml");
    // `[state]` goes before `[tls]`, with the top-level keys above it.
    let with_state = |advertise: &str| {
        let at = base.find("[tls]").expect("coordinator.toml has [tls]");
        format!(
            "{}{}\n{}",
            &base[..at],
            state_table(&etcd, advertise, lease),
            &base[at..]
        )
    };
    std::fs::write(&config, with_state(&first)).expect("write coordinator.toml");
    let mut others = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let name = format!("coordinator-{}", i + 2);
        let dir = fleet.root().join(&name);
        std::fs::create_dir_all(&dir).expect("coordinator dir");
        let old_port = fleet.coordinator_port();
        let text = with_state(&extra[i])
            .replace(
                &format!("127.0.0.1:{old_port}\""),
                &format!("127.0.0.1:{port}\""),
            )
            .replace(
                &fleet.coordinator_data_dir().display().to_string(),
                &dir.join("data").display().to_string(),
            );
        let path = dir.join("coordinator.toml");
        std::fs::write(&path, text).expect("write coordinator.toml");
        others.push(Daemon::new(
            &name,
            bins::bin(bins::COORDINATOR),
            path,
            fleet.root().join("logs").join(format!("{name}.log")),
            Some(*port),
        ));
    }
    fleet.coordinator().start_with_env(env);
    fleet.wait_coordinator();
    for d in &mut others {
        d.start();
    }
    let nodes = fleet.node_names();
    for n in &nodes {
        fleet.node(n).start();
    }
    fleet.wait_nodes_up(&nodes);
    let agents = fleet.agent_names();
    for a in &agents {
        fleet.agent(a).start();
    }
    fleet.wait_agents_connected(&agents);
    let mut urls = vec![first];
    urls.extend(extra);
    Some(Coordinators {
        fleet,
        others,
        urls,
        etcd,
    })
}

impl Coordinators {
    fn state(&self) -> EtcdState {
        EtcdState::connect(&EtcdOptions {
            endpoints: self.etcd.endpoints(),
            prefix: PREFIX.into(),
            tls: None,
            timeout: Duration::from_secs(5),
        })
        .expect("connect to etcd")
    }

    /// The URL of the coordinator that holds the leadership key now.
    fn leader(&self) -> Option<String> {
        self.state().leader().ok().flatten().map(|l| l.url)
    }

    /// Waits until a coordinator other than `not` leads; returns its URL and the time
    /// it took.
    fn new_leader(&self, not: &str, since: Instant) -> (String, Duration) {
        let url = poll(
            "another coordinator to lead",
            Duration::from_secs(60),
            || match self.leader() {
                Some(u) if u != not => Ok(u),
                other => Err(format!("leader {other:?}")),
            },
        );
        (url, since.elapsed())
    }

    /// Every source record in etcd: (name, node, epoch).
    fn assignments(&self) -> Vec<(String, String, u64)> {
        use bulwark_coordinator::state::StateStore;
        let rows = self
            .state()
            .scan("sources", b"")
            .expect("scan sources in etcd");
        rows.iter()
            .map(|(k, v)| {
                let r: Value = serde_json::from_slice(v).expect("a source record is JSON");
                (
                    String::from_utf8_lossy(k).into_owned(),
                    r.get("node")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                    r.get("epoch").and_then(Value::as_u64).unwrap_or(0),
                )
            })
            .collect()
    }

    /// The daemon of the coordinator at `url`.
    fn daemon(&mut self, url: &str) -> &mut Daemon {
        match self.urls.iter().position(|u| u == url) {
            Some(0) => self.fleet.coordinator(),
            Some(i) => &mut self.others[i - 1],
            None => panic!("no coordinator at {url}"),
        }
    }
}

#[test]
fn the_leader_killed_mid_drain_is_replaced_and_the_move_rolled_back() {
    let builder = Fleet::builder()
        .node("node-1")
        .node("node-2")
        .agent("host-1", "host-1-data", 8 * MIB)
        .agent("host-2", "host-2-data", 8 * MIB)
        .agent("host-3", "host-3-data", 8 * MIB)
        .agent("host-4", "host-4-data", 8 * MIB);
    // Coordinator 1 leads and pauses a move once the target holds the copy.
    let Some(mut c) = start(
        builder,
        3,
        LEASE,
        &[("BULWARK_FAILPOINTS", "coordinator-move-copied=pause")],
    ) else {
        return;
    };
    let first = c.urls[0].clone();
    assert_eq!(
        c.leader().as_deref(),
        Some(first.as_str()),
        "coordinator 1 leads"
    );
    let sources = ["host-1-data", "host-2-data", "host-3-data", "host-4-data"];
    let mut saved: Vec<(String, Vec<(u64, std::path::PathBuf)>)> = Vec::new();
    for s in sources {
        c.fleet.sync(s);
        let p1 = c.fleet.save_volume(s, &format!("{s}-1.img"));
        bulwark_tests::rewrite_random_blocks(&c.fleet.volume(s), 4);
        c.fleet.sync(s);
        let p2 = c.fleet.save_volume(s, &format!("{s}-2.img"));
        saved.push((s.to_string(), vec![(1, p1), (2, p2)]));
    }
    let before = c.assignments();
    assert_eq!(before.len(), sources.len(), "{before:?}");
    let from = c.fleet.source_node("host-1-data");
    let to = if from == "node-1" { "node-2" } else { "node-1" };

    // A drain of `from`; coordinator 1 (the leader) pauses it once the first copy is
    // on `to`, and is killed there.
    let drain = c.fleet.cli_spawn(&["drain", &from, "--json"]);
    c.fleet.coordinator().wait_for_log(
        "failpoint coordinator-move-copied reached",
        Duration::from_secs(60),
    );
    let killed = Instant::now();
    c.fleet.coordinator().kill9();
    let (leader, took) = c.new_leader(&first, killed);
    eprintln!("coordinator 1 killed mid-drain: {leader} leads after {took:?} (lease {LEASE})");
    let out = drain
        .wait(Duration::from_secs(60))
        .expect("the drain ended");
    eprintln!(
        "the drain command: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );

    // The new leader rolls the move back (its copy on `to` dropped): meanwhile no
    // record names a node outside {from, to}, and no epoch goes back.
    let epochs: std::collections::HashMap<String, u64> =
        before.iter().map(|(s, _, e)| (s.clone(), *e)).collect();
    poll(
        "the interrupted move to be settled by the new leader",
        Duration::from_secs(90),
        || {
            for (s, node, epoch) in c.assignments() {
                assert!(
                    node == from || node == to || !before.iter().any(|b| b.0 == s && b.1 == from),
                    "{s} is assigned to {node}, outside the move {from} -> {to}"
                );
                assert!(epoch >= epochs[&s], "{s}: epoch went back to {epoch}");
            }
            let info = c.fleet.source_info("host-1-data");
            let (node, state) = (json_str(&info, "node"), json_str(&info, "state"));
            let stale = if node == from { to } else { from.as_str() };
            match (
                state.as_str(),
                c.fleet.node_source_dir(stale, "host-1-data").exists(),
            ) {
                ("ok", false) => Ok(()),
                other => Err(format!("on {node}: {other:?}")),
            }
        },
    );

    // The killed coordinator comes back as a follower.
    c.fleet.coordinator().start();
    c.fleet.wait_coordinator();
    assert_eq!(
        c.leader().as_deref(),
        Some(leader.as_str()),
        "the leader changed again"
    );

    // The CLI given all three addresses works whichever one is down: a read and a
    // change (an allocation) through each.
    for down in c.urls.clone() {
        c.daemon(&down).stop();
        let (new, _) = if c.leader().as_deref() == Some(down.as_str()) || c.leader().is_none() {
            c.new_leader(&down, Instant::now())
        } else {
            (c.leader().unwrap_or_default(), Duration::ZERO)
        };
        let sources_now = c.fleet.cli_json(&["sources", "--json"]);
        assert_eq!(
            sources_now.as_array().map(Vec::len),
            Some(sources.len()),
            "with {down} down: {sources_now}"
        );
        // A follower may name the stopped leader for a moment after etcd has a new
        // one (it reads the key again within a third of the lease): retried.
        let asked = Instant::now();
        poll("a change through the list", Duration::from_secs(30), || {
            let out = c.fleet.cli_as(
                c.fleet.admin(),
                &["allocate", "host-2-data", "--points", "96MiB"],
            );
            match out.status.success() {
                true => Ok(()),
                false => Err(String::from_utf8_lossy(&out.stderr).to_string()),
            }
        });
        eprintln!(
            "with {down} down: reads work, a change went through after {:?} (leader {new})",
            asked.elapsed()
        );
        c.daemon(&down).start();
        poll(
            &format!("{down} to answer again"),
            Duration::from_secs(60),
            || c.fleet.cli_json_try(&["nodes", "--json"]).map(|_| ()),
        );
    }

    // Nothing lost: every point restores byte-identical, and each source syncs (once
    // the agents are back on the current leader's control stream).
    let agents = c.fleet.agent_names();
    c.fleet.wait_agents_connected(&agents);
    for (s, points) in &saved {
        let expected: Vec<(u64, &std::path::Path)> =
            points.iter().map(|(id, p)| (*id, p.as_path())).collect();
        c.fleet.restore_points(s, &expected, "after the failover");
    }
    for s in sources {
        c.fleet.sync(s);
        assert_eq!(c.fleet.point_ids(s), vec![1, 2, 3], "{s}");
    }
}

/// The points of `source` made between `from` and `to` (RFC 3339 UTC times of one
/// format compare as strings).
fn points_between(fleet: &Fleet, source: &str, from: &str, to: &str) -> usize {
    fleet
        .points(source)
        .iter()
        .filter(|p| {
            let at = json_str(p, "created_at");
            at.as_str() > from && at.as_str() < to
        })
        .count()
}

fn now() -> String {
    bulwark_common::time::rfc3339_ms(bulwark_common::time::now_ms())
}

#[test]
fn a_stopped_leader_is_deposed_and_lost_quorum_stops_changes_not_syncs() {
    let builder =
        Fleet::builder()
            .node("node-1")
            .sync_interval("2s")
            .agent("host-1", "host-1-data", 8 * MIB);
    // The default lease (5 s): etcd's own election when its raft leader is the member
    // killed takes 1-2 s, which a 2 s lease does not ride out.
    let Some(mut c) = start(builder, 2, "5s", &[]) else {
        return;
    };
    let (first, second) = (c.urls[0].clone(), c.urls[1].clone());
    assert_eq!(
        c.leader().as_deref(),
        Some(first.as_str()),
        "coordinator 1 leads"
    );

    // SIGSTOP past the lease: coordinator 2 leads. SIGCONT: coordinator 1 finds its
    // leadership gone and follows; the key stays coordinator 2's.
    let pid = c.fleet.coordinator().pid().expect("coordinator 1 runs");
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid}");
    };
    signal("-STOP");
    let stopped = Instant::now();
    let (leader, took) = c.new_leader(&first, stopped);
    eprintln!("coordinator 1 stopped: {leader} leads after {took:?} (lease 5s)");
    assert_eq!(leader, second);
    signal("-CONT");
    c.fleet
        .coordinator()
        .wait_for_log("follower", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        c.leader().as_deref(),
        Some(second.as_str()),
        "coordinator 1 took the lead back"
    );
    c.fleet
        .cli(&["allocate", "host-1-data", "--points", "80MiB"]);
    let info = c.fleet.source_info("host-1-data");
    assert_eq!(
        info["allocated_bytes"].as_u64().unwrap_or(0)
            - info["replica_alloc_bytes"].as_u64().unwrap_or(0),
        80 * MIB,
        "the change through the list did not land: {info}"
    );

    // One etcd member down: changes go on. Not yet "nothing to notice": in about one
    // run in three here the leader's lease renewal did not get through etcd's own
    // election in time, and nobody led for a few seconds (see docs/ARCHITECTURE.md,
    // Known limits). The change is retried and the wait printed.
    c.etcd.kill(2);
    let asked = Instant::now();
    poll(
        "a change with one etcd member down",
        Duration::from_secs(60),
        || {
            let out = c.fleet.cli_as(
                c.fleet.admin(),
                &["allocate", "host-1-data", "--points", "88MiB"],
            );
            match out.status.success() {
                true => Ok(()),
                false => Err(String::from_utf8_lossy(&out.stderr).to_string()),
            }
        },
    );
    eprintln!(
        "one etcd member down: a change went through after {:?}",
        asked.elapsed()
    );
    let before = c.fleet.point_ids("host-1-data").len();
    poll(
        "a scheduled sync with one member down",
        Duration::from_secs(60),
        || match c.fleet.point_ids("host-1-data").len() {
            n if n > before => Ok(()),
            n => Err(format!("{n} points")),
        },
    );

    // Two down: no quorum. Changes are refused, saying why; the agent's scheduled
    // syncs still commit on the node, from the assignment it holds.
    c.etcd.kill(1);
    let lost = now();
    let since_lost = Instant::now();
    std::thread::sleep(Duration::from_secs(8));
    let out = c.fleet.cli_as(
        c.fleet.admin(),
        &["allocate", "host-1-data", "--points", "96MiB"],
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    eprintln!("without quorum, a change: {err}");
    assert!(
        !out.status.success(),
        "a change was accepted without quorum"
    );
    assert!(
        err.contains("quorum") || err.contains("unreachable") || err.contains("no leader"),
        "the refusal does not say why: {err}"
    );
    // Long enough for a scheduled sync: each call an agent or node makes to a
    // coordinator waits for that coordinator's etcd request timeout (5 s) before it
    // falls back to what it holds.
    let left = Duration::from_secs(30).saturating_sub(since_lost.elapsed());
    std::thread::sleep(left);
    assert!(
        !err.contains("certificate"),
        "a no-quorum refusal is explained as a certificate problem: {err}"
    );
    let back = now();
    c.etcd.restart(1);
    c.etcd.restart(2);
    poll("a leader again", Duration::from_secs(90), || {
        match c.leader() {
            Some(u) => Ok(u),
            None => Err("none".into()),
        }
    });
    poll("changes to work again", Duration::from_secs(90), || {
        let out = c.fleet.cli_as(
            c.fleet.admin(),
            &["allocate", "host-1-data", "--points", "96MiB"],
        );
        match out.status.success() {
            true => Ok(()),
            false => Err(String::from_utf8_lossy(&out.stderr).to_string()),
        }
    });
    let made = points_between(&c.fleet, "host-1-data", &lost, &back);
    eprintln!("points committed without quorum: {made}");
    assert!(made >= 1, "no sync committed while etcd had no quorum");
}
