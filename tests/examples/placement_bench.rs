//! Benchmark: the coordinator's registry placing data sources, with its state in sled
//! (a temporary directory) and in etcd (real members on 127.0.0.1 started here: one,
//! and three with `--etcd3 1`), side by side in one run.
//!
//! Per backend: 100 storage nodes register and send a heartbeat (capacity, a pool
//! disk); 100 agents send one Hello of 10 new volumes each and the registry places
//! every source (`Registry::hello`, as the control stream calls it). Each Hello is
//! timed; its time divided by its sources is the per-source placement figure: the
//! decision, the reads it makes, and the source's commit. Then placed sources are
//! added straight to the state up to `--total` (10,000; commits of 100, spread over
//! the nodes) so that the late Hellos (`--late`, 20 agents) are placed among that
//! many; a round of heartbeats in which every node reports new usage of each of its
//! sources (node and sources in one commit per 100 records) is timed; and half as
//! many Hellos again while a thread sends heartbeats without pause (both take the
//! registry's placement mutex). With `--rounds N` the backends' order alternates.
//!
//! Prints figures only (no targets are checked); `bash bench/coordinators.sh` runs it.
//! Options: `--nodes N` (100), `--agents N` (100), `--per-agent N` (10), `--total N`
//! (10000), `--late N` (20), `--rounds N` (1), `--etcd3 0|1` (0), `--sled 0|1` (1).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bulwark_coordinator::registry::{
    DiskFigures, Heartbeat, Hello, NodeRegistration, Registry, SourceKind, SourceRecord,
    SourceSpec, SourceUsage, Usage,
};
use bulwark_coordinator::state::{EtcdState, MAX_TXN_OPS, SledState, StateStore, Txn, etcd};
use bulwark_tests::etcd::EtcdCluster;
use bulwark_tests::example_arg;

const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

struct Shape {
    nodes: usize,
    /// Agents whose Hellos place sources from none.
    agents: usize,
    per_agent: usize,
    /// Sources in the state before the late Hellos (the rest seeded).
    total: usize,
    /// Agents whose Hellos place sources at `total`.
    late: usize,
}

/// Milliseconds, sorted.
struct Figures(Vec<f64>);

impl Figures {
    fn new(mut v: Vec<f64>) -> Figures {
        v.sort_by(|a, b| a.total_cmp(b));
        Figures(v)
    }

    fn pct(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        let i = ((self.0.len() as f64 - 1.0) * p).round() as usize;
        self.0[i]
    }

    fn line(&self) -> String {
        let sum: f64 = self.0.iter().sum();
        format!(
            "n={:<6} p50 {:>8.3}  p90 {:>8.3}  p99 {:>8.3}  max {:>8.3}  total {:>8.1} s",
            self.0.len(),
            self.pct(0.5),
            self.pct(0.9),
            self.pct(0.99),
            self.0.last().copied().unwrap_or(0.0),
            sum / 1000.0
        )
    }
}

fn node_name(i: usize) -> String {
    format!("node-{i:03}")
}

fn heartbeat(sources: &[String], round: u64) -> Heartbeat {
    Heartbeat {
        capacity_bytes: 100 * TIB,
        allocated_bytes: 0,
        used_bytes: round * GIB,
        health: "ok".into(),
        nbd_address: String::new(),
        disks: vec![DiskFigures {
            path: "/srv/bulwark/pool-0".into(),
            capacity_bytes: 100 * TIB,
            used_bytes: round * GIB,
        }],
        sources: sources
            .iter()
            .map(|s| SourceUsage {
                source: s.clone(),
                newest_point: round,
                allocated_bytes: 0,
                usage: Usage {
                    used_bytes: round * GIB,
                    points: round,
                    ..Usage::default()
                },
            })
            .collect(),
        ..Heartbeat::default()
    }
}

fn spec(name: String) -> SourceSpec {
    SourceSpec {
        name,
        kind: Some(SourceKind::Volume),
        size_bytes: 20 * GIB,
        block_size: 65536,
        tracker: "fingerprint".into(),
        inconsistent: false,
        recheck_bytes: 0,
        busy: false,
        policy: Default::default(),
        proposes_retention: false,
        group: String::new(),
    }
}

/// Sends one Hello per agent of `agents` (named by `tag`); returns the per-Hello
/// times (ms) and how many sources were not placed.
fn hellos(
    reg: &Registry,
    shape: &Shape,
    tag: &str,
    agents: std::ops::Range<usize>,
) -> (Vec<f64>, usize) {
    let mut times = Vec::new();
    let mut unplaced = 0;
    for a in agents {
        let hello = Hello {
            version: "bench".into(),
            sources: (0..shape.per_agent)
                .map(|s| spec(format!("{tag}-host-{a:05}-vol-{s}")))
                .collect(),
        };
        let t = Instant::now();
        let regs = reg
            .hello(&format!("{tag}-host-{a:05}"), &hello)
            .unwrap_or_else(|e| panic!("Hello of agent {a}: {e}"));
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        unplaced += regs.iter().filter(|r| r.assignment.is_none()).count();
    }
    (times, unplaced)
}

/// Registers the nodes and sends each one heartbeat (capacity, a pool disk).
fn nodes_up(reg: &Registry, shape: &Shape) {
    let t = Instant::now();
    for i in 0..shape.nodes {
        let n = node_name(i);
        let r = NodeRegistration {
            address: format!("https://127.0.0.1:{}", 20_000 + i),
            capacity_bytes: 100 * TIB,
            version: "bench".into(),
        };
        reg.register_node(&n, &r).expect("register node");
        reg.heartbeat(&n, &heartbeat(&[], 0))
            .expect("heartbeat")
            .expect("a registered node");
    }
    println!(
        "  {} nodes registered and up: {:.2} s",
        shape.nodes,
        t.elapsed().as_secs_f64()
    );
}

/// Prints the figures of one round of Hellos.
fn print_hellos(what: &str, shape: &Shape, times: &[f64], unplaced: usize) {
    let per: Vec<f64> = times.iter().map(|t| t / shape.per_agent as f64).collect();
    let tenth = (per.len() / 10).max(1);
    let (first, last) = (
        Figures::new(per[..tenth].to_vec()),
        Figures::new(per[per.len() - tenth..].to_vec()),
    );
    println!(
        "  {what}: {} sources placed, {unplaced} not",
        per.len() * shape.per_agent
    );
    println!(
        "    Hello of {:<3} (ms)   {}",
        shape.per_agent,
        Figures::new(times.to_vec()).line()
    );
    println!("    per source (ms)    {}", Figures::new(per).line());
    println!(
        "    per source p50, first tenth {:.3} ms, last tenth {:.3} ms",
        first.pct(0.5),
        last.pct(0.5)
    );
}

/// The sources of each node.
fn sources_by_node(reg: &Registry, nodes: usize) -> Vec<Vec<String>> {
    let mut on: Vec<Vec<String>> = vec![Vec::new(); nodes];
    for s in reg.sources().expect("sources") {
        let i = s.node.as_deref().and_then(|n| n.strip_prefix("node-"));
        if let Some(i) = i
            .and_then(|i| i.parse::<usize>().ok())
            .filter(|i| *i < nodes)
        {
            on[i].push(s.name);
        }
    }
    on
}

/// One heartbeat per node, each reporting new usage of every source it holds.
fn heartbeat_round(reg: &Registry, on: &[Vec<String>], round: u64) -> Vec<f64> {
    let mut times = Vec::new();
    for (i, sources) in on.iter().enumerate() {
        let hb = heartbeat(sources, round);
        let t = Instant::now();
        reg.heartbeat(&node_name(i), &hb)
            .expect("heartbeat")
            .expect("known node");
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    times
}

/// Adds placed sources straight to the state (commits of 100) until there are
/// `total`, spread over the nodes: the registry then decides among that many.
fn seed(state: &dyn StateStore, shape: &Shape, have: usize, total: usize) {
    let t = Instant::now();
    let mut txn = Txn::new();
    for i in have..total {
        let agent = format!("seed-host-{:05}", i / shape.per_agent.max(1));
        let name = format!("{agent}-vol-{}", i % shape.per_agent.max(1));
        let mut rec = SourceRecord::new(&name, &agent, "volume", "fingerprint", 20 * GIB, 65536);
        rec.node = Some(node_name(i % shape.nodes));
        rec.epoch = 1;
        rec.allocated_bytes = 40 * GIB;
        let value = serde_json::to_vec(&rec).expect("encode a source record");
        txn = txn.put("sources", name.into_bytes(), value);
        if txn.then.len() >= MAX_TXN_OPS {
            state.commit(std::mem::take(&mut txn)).expect("seed commit");
        }
    }
    if !txn.then.is_empty() {
        state.commit(txn).expect("seed commit");
    }
    println!(
        "  seeded {} more placed sources (to {total}) in {:.1} s",
        total.saturating_sub(have),
        t.elapsed().as_secs_f64()
    );
}

/// One backend's run (see the module docs).
fn run(name: &str, state: Arc<dyn StateStore>, shape: &Shape) {
    println!("--- {name}: {}", state.describe());
    let reg = Arc::new(Registry::with_state(
        state.clone(),
        Duration::from_secs(3600),
    ));
    nodes_up(&reg, shape);
    let (times, unplaced) = hellos(&reg, shape, "a", 0..shape.agents);
    print_hellos("from none", shape, &times, unplaced);
    let placed = shape.agents * shape.per_agent;
    seed(state.as_ref(), shape, placed, shape.total);
    // What each decision reads: every source (the agent's count and quota, each
    // node's load), and the nodes' figures built from them.
    let reads = |f: &dyn Fn()| {
        Figures::new(
            (0..5)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed().as_secs_f64() * 1000.0
                })
                .collect(),
        )
    };
    let all = reads(&|| drop(reg.sources().expect("sources")));
    let figures = reads(&|| drop(reg.node_figures().expect("node figures")));
    println!(
        "  reads at {}: every source {:.1} ms, node figures {:.1} ms (p50 of 5)",
        shape.total,
        all.pct(0.5),
        figures.pct(0.5)
    );
    let on = sources_by_node(&reg, shape.nodes);
    let hb = Figures::new(heartbeat_round(&reg, &on, 1));
    println!(
        "  heartbeats, ~{} changed sources each (ms) {}",
        shape.total / shape.nodes.max(1),
        hb.line()
    );
    let (times, unplaced) = hellos(&reg, shape, "b", 0..shape.late);
    print_hellos(&format!("at {}", shape.total), shape, &times, unplaced);

    // Hellos while every node heartbeats without pause (the placement mutex).
    let stop = Arc::new(AtomicBool::new(false));
    let beater = {
        let (reg, stop) = (reg.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut round, mut n, mut times) = (2, 0usize, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let i = n % on.len();
                let hb = heartbeat(&on[i], round);
                let t = Instant::now();
                reg.heartbeat(&node_name(i), &hb)
                    .expect("heartbeat")
                    .expect("known node");
                times.push(t.elapsed().as_secs_f64() * 1000.0);
                n += 1;
                round += u64::from(i + 1 == on.len());
            }
            times
        })
    };
    let (times, unplaced) = hellos(&reg, shape, "c", 0..shape.late / 2);
    stop.store(true, Ordering::Relaxed);
    let beats = Figures::new(beater.join().expect("heartbeat thread"));
    print_hellos(
        &format!("at {}, nodes heartbeating", shape.total),
        shape,
        &times,
        unplaced,
    );
    println!("    heartbeats meanwhile (ms) {}", beats.line());
}

fn etcd_state(cluster: &EtcdCluster) -> (EtcdState, etcd::Election) {
    let base = EtcdState::connect(&etcd::EtcdOptions {
        endpoints: cluster.endpoints(),
        prefix: "/bench".into(),
        tls: None,
        timeout: etcd::DEFAULT_TIMEOUT,
    })
    .expect("connect to etcd");
    let election = base
        .elect("bench", "https://127.0.0.1:1", Duration::from_secs(5))
        .expect("campaign");
    let t = Instant::now();
    while !election.is_leader() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "never became the leader"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Like the coordinator: every commit fenced by the leadership it holds.
    (base.fenced(&election), election)
}

fn main() {
    let shape = Shape {
        nodes: example_arg("--nodes", 100) as usize,
        agents: example_arg("--agents", 100) as usize,
        per_agent: example_arg("--per-agent", 10) as usize,
        total: example_arg("--total", 10_000) as usize,
        late: example_arg("--late", 20) as usize,
    };
    let rounds = example_arg("--rounds", 1);
    let etcd3 = example_arg("--etcd3", 0) == 1;
    let sled = example_arg("--sled", 1) == 1;
    println!(
        "placement: {} nodes; Hellos of {} agents x {} sources from none; seeded to {}; Hellos of {} agents then, {} more while nodes heartbeat",
        shape.nodes,
        shape.agents,
        shape.per_agent,
        shape.total,
        shape.late,
        shape.late / 2
    );
    for round in 0..rounds {
        println!("== round {}", round + 1);
        let mut backends: Vec<&str> = Vec::new();
        if sled {
            backends.push("sled");
        }
        backends.push("etcd-1");
        if etcd3 {
            backends.push("etcd-3");
        }
        if round % 2 == 1 {
            backends.reverse();
        }
        for b in backends {
            match b {
                "sled" => {
                    let dir = tempfile::tempdir().expect("tempdir");
                    let state = SledState::open(&dir.path().join("registry")).expect("sled");
                    run(b, Arc::new(state), &shape);
                }
                _ => {
                    let n = if b == "etcd-1" { 1 } else { 3 };
                    let Some(cluster) = EtcdCluster::start(n) else {
                        println!("--- {b}: skipped, no etcd binary (Debian package etcd-server)");
                        continue;
                    };
                    let (state, election) = etcd_state(&cluster);
                    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run(b, Arc::new(state), &shape)
                    }));
                    if let Err(e) = ran {
                        for i in 0..n {
                            println!("etcd member {i}'s log:\n{}", cluster.log_tail(i, 40));
                        }
                        std::panic::resume_unwind(e);
                    }
                    let _ = election.resign();
                }
            }
        }
    }
}
