//! Placement simulation (no network): 100 nodes of mixed capacities and 10,000 data
//! sources arriving, growing and leaving, placed by the coordinator's own
//! `placement::choose`, beside two simpler policies on the same event sequence
//! (the most free bytes, which Bulwark used before, and a random node that fits).
//! Then `placement::plan_rebalance` evens out the fill the random policy left, and
//! its bytes moved are compared with the least any plan could move.
//!
//! Run: `cargo run --release -p bulwark-coordinator --example placement_sim`
//! (`-- --seed N` for another sequence). Prints figures; targets: under 1 ms per
//! decision, fill spread under 10%, rebalance moving under 1.5× the least.

use std::time::Instant;

use bulwark_coordinator::placement::{self, NodeFigures, Placed, Weights};
use bulwark_coordinator::schedule;
use rand::{Rng, SeedableRng};

const NODES: usize = 100;
const SOURCES: usize = 10_000;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

#[derive(Clone, Copy, PartialEq)]
enum Policy {
    Bulwark,
    MostFree,
    RandomFit,
}

impl Policy {
    fn name(self) -> &'static str {
        match self {
            Policy::Bulwark => "bulwark (weighted score)",
            Policy::MostFree => "most free bytes",
            Policy::RandomFit => "random node that fits",
        }
    }
}

enum Event {
    Arrive { id: usize, bytes: u64 },
    Grow { pick: f64, by: f64 },
    Leave { pick: f64 },
}

struct Outcome {
    nodes: Vec<NodeFigures>,
    sources: Vec<Placed>,
    decisions: Vec<f64>,
    refused: usize,
    grow_refused: usize,
}

fn run(policy: Policy, capacities: &[u64], events: &[Event], seed: u64) -> Outcome {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut nodes: Vec<NodeFigures> = capacities
        .iter()
        .enumerate()
        .map(|(i, c)| NodeFigures {
            name: format!("node-{i:03}"),
            up: true,
            capacity_bytes: *c,
            allocated_bytes: 0,
            sources: 0,
            live_streams: 0,
            ingest_bytes_per_sec: 0,
        })
        .collect();
    let mut sources: Vec<Placed> = Vec::new();
    let mut decisions = Vec::new();
    let (mut refused, mut grow_refused) = (0, 0);
    for e in events {
        match *e {
            Event::Arrive { id, bytes } => {
                let t = Instant::now();
                let chosen = match policy {
                    Policy::Bulwark => placement::choose(&nodes, bytes, Weights::default()).chosen,
                    Policy::MostFree => nodes
                        .iter()
                        .enumerate()
                        .filter(|(_, n)| n.capacity_bytes - n.allocated_bytes >= bytes)
                        .max_by_key(|(_, n)| n.capacity_bytes - n.allocated_bytes)
                        .map(|(i, _)| i),
                    Policy::RandomFit => {
                        let fits: Vec<usize> = (0..nodes.len())
                            .filter(|&i| {
                                nodes[i].capacity_bytes - nodes[i].allocated_bytes >= bytes
                            })
                            .collect();
                        (!fits.is_empty()).then(|| fits[rng.random_range(0..fits.len())])
                    }
                };
                decisions.push(t.elapsed().as_secs_f64());
                match chosen {
                    Some(n) => {
                        nodes[n].allocated_bytes += bytes;
                        nodes[n].sources += 1;
                        sources.push(Placed {
                            name: format!("source-{id:05}"),
                            node: n,
                            allocated_bytes: bytes,
                        });
                    }
                    None => refused += 1,
                }
            }
            Event::Grow { pick, by } => {
                if sources.is_empty() {
                    continue;
                }
                let i = ((pick * sources.len() as f64) as usize).min(sources.len() - 1);
                let more = (sources[i].allocated_bytes as f64 * by) as u64;
                let n = sources[i].node;
                // `bulwark allocate` refuses growth the node cannot hold.
                if nodes[n].capacity_bytes - nodes[n].allocated_bytes >= more {
                    nodes[n].allocated_bytes += more;
                    sources[i].allocated_bytes += more;
                } else {
                    grow_refused += 1;
                }
            }
            Event::Leave { pick } => {
                if sources.is_empty() {
                    continue;
                }
                let i = ((pick * sources.len() as f64) as usize).min(sources.len() - 1);
                let s = sources.swap_remove(i);
                nodes[s.node].allocated_bytes -= s.allocated_bytes;
                nodes[s.node].sources -= 1;
            }
        }
    }
    Outcome {
        nodes,
        sources,
        decisions,
        refused,
        grow_refused,
    }
}

fn fills(nodes: &[NodeFigures]) -> (f64, f64) {
    let f: Vec<f64> = nodes.iter().map(NodeFigures::fill).collect();
    (
        f.iter().copied().fold(f64::MAX, f64::min),
        f.iter().copied().fold(f64::MIN, f64::max),
    )
}

fn main() {
    let seed: u64 = std::env::args()
        .skip_while(|a| a != "--seed")
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let capacities: Vec<u64> = (0..NODES)
        .map(|_| [20, 40, 60, 100][rng.random_range(0..4)] * TIB)
        .collect();
    // Sizes log-uniform from 10 GiB to 1 TiB; allocation by the default rule.
    let mut events = Vec::new();
    for id in 0..SOURCES {
        let size = (10.0 * GIB as f64 * (102.4f64).powf(rng.random::<f64>())) as u64;
        events.push(Event::Arrive {
            id,
            bytes: bulwark_common::alloc::default_total(size),
        });
        if rng.random::<f64>() < 0.10 {
            events.push(Event::Grow {
                pick: rng.random(),
                by: 0.25,
            });
        }
        if rng.random::<f64>() < 0.05 {
            events.push(Event::Leave { pick: rng.random() });
        }
    }
    let total_cap: u64 = capacities.iter().sum();
    println!(
        "placement simulation, seed {seed}: {NODES} nodes ({:.1} PiB, 20-100 TiB each), {SOURCES} sources arriving (10 GiB-1 TiB, default allocation), 10% of arrivals followed by a 25% growth, 5% by a departure",
        total_cap as f64 / (1u64 << 50) as f64
    );
    println!();
    println!(
        "{:<26} {:>10} {:>10} {:>9} {:>9} {:>8} {:>8} {:>8}",
        "policy", "mean/dec", "p99/dec", "min fill", "max fill", "spread", "refused", "no-grow"
    );
    let mut random_outcome = None;
    for policy in [Policy::Bulwark, Policy::MostFree, Policy::RandomFit] {
        let o = run(policy, &capacities, &events, seed);
        let mut d = o.decisions.clone();
        d.sort_by(f64::total_cmp);
        let mean = d.iter().sum::<f64>() / d.len().max(1) as f64;
        let p99 = d[(d.len() * 99 / 100).min(d.len().saturating_sub(1))];
        let (min, max) = fills(&o.nodes);
        println!(
            "{:<26} {:>8.1}µs {:>8.1}µs {:>8.1}% {:>8.1}% {:>7.1}% {:>8} {:>8}",
            policy.name(),
            mean * 1e6,
            p99 * 1e6,
            min * 100.0,
            max * 100.0,
            (max - min) * 100.0,
            o.refused,
            o.grow_refused
        );
        if policy == Policy::Bulwark {
            println!(
                "  target: decision under 1 ms ({}), fill spread under 10% ({})",
                if p99 < 1e-3 { "met" } else { "missed" },
                if max - min < 0.10 { "met" } else { "missed" }
            );
        }
        if policy == Policy::RandomFit {
            random_outcome = Some(o);
        }
    }
    let Some(o) = random_outcome else { return };
    println!();
    for bound in [0.10, 0.05] {
        let t = Instant::now();
        let plan = placement::plan_rebalance(&o.nodes, &o.sources, bound);
        let took = t.elapsed();
        let ratio = plan.bytes() as f64 / plan.lower_bound_bytes.max(1) as f64;
        println!(
            "rebalance of the random policy's fleet to a spread of {:.0}%: spread {:.1}% -> {:.1}%, {} moves, {:.1} TiB moved, least possible {:.1} TiB ({ratio:.2}x; target under 1.5x: {}), planned in {:.0} ms",
            bound * 100.0,
            plan.spread_before * 100.0,
            plan.spread_after * 100.0,
            plan.moves.len(),
            plan.bytes() as f64 / TIB as f64,
            plan.lower_bound_bytes as f64 / TIB as f64,
            if ratio < 1.5 { "met" } else { "missed" },
            took.as_secs_f64() * 1e3
        );
    }
    // A drain: the fullest node of the Bulwark-placed fleet marked down.
    let o = run(Policy::Bulwark, &capacities, &events, seed);
    println!();
    let interval = 15 * 60 * 1000;
    for (spread, cap) in [(true, 4), (false, 4), (true, usize::MAX)] {
        let (peak, wait) = schedule_sim(&o, interval, cap, spread, 200e6);
        println!(
            "schedule, every 15 min, 1% of each volume changed, 200 MB/s per sync, {}, {}: peak concurrent syncs on a node {peak}, longest wait {wait:.0} s",
            if spread {
                "start times spread by source"
            } else {
                "every source at :00"
            },
            if cap == usize::MAX {
                "no cap".to_string()
            } else {
                format!("at most {cap} per node")
            }
        );
    }
    let mut nodes = o.nodes.clone();
    let fullest = (0..nodes.len())
        .max_by(|&a, &b| nodes[a].allocated_bytes.cmp(&nodes[b].allocated_bytes))
        .unwrap_or(0);
    nodes[fullest].up = false;
    let t = Instant::now();
    let plan = placement::plan_rebalance(&nodes, &o.sources, 0.10);
    let left = o.sources.iter().filter(|s| s.node == fullest).count()
        - plan.moves.iter().filter(|m| m.from == fullest).count();
    println!(
        "drain of {} ({} sources, {:.1} TiB): {} moves, {:.1} TiB moved (least {:.1} TiB), {} left behind, spread after {:.1}%, planned in {:.0} ms",
        nodes[fullest].name,
        nodes[fullest].sources,
        nodes[fullest].allocated_bytes as f64 / TIB as f64,
        plan.moves.len(),
        plan.bytes() as f64 / TIB as f64,
        plan.lower_bound_bytes as f64 / TIB as f64,
        left,
        plan.spread_after * 100.0,
        t.elapsed().as_secs_f64() * 1e3
    );
}

/// One interval of a protection group's schedule on every node: each source starts
/// at its slot (or all at once, `spread = false`), runs for its changed bytes at
/// `rate` bytes/s, and a node runs at most `cap` at once (the rest wait, oldest
/// first). Returns (peak concurrent syncs on any node, longest wait in seconds).
fn schedule_sim(
    o: &Outcome,
    interval_ms: u64,
    cap: usize,
    spread: bool,
    rate: f64,
) -> (usize, f64) {
    let mut by_node: Vec<Vec<(i64, f64)>> = vec![Vec::new(); o.nodes.len()];
    for s in &o.sources {
        let size = s.allocated_bytes as f64 / 1.64;
        let start = if spread {
            schedule::phase(&s.name, interval_ms) as i64
        } else {
            0
        };
        by_node[s.node].push((start, 0.01 * size / rate));
    }
    let (mut peak, mut wait) = (0usize, 0f64);
    for mut list in by_node {
        list.sort_by_key(|e| e.0);
        // Running syncs' end times (seconds).
        let mut running: Vec<f64> = Vec::new();
        let mut queue: std::collections::VecDeque<(f64, f64)> = Default::default();
        let mut events = list
            .into_iter()
            .map(|(t, d)| (t as f64 / 1000.0, d))
            .peekable();
        let mut now = 0f64;
        loop {
            running.retain(|&end| end > now);
            while running.len() < cap {
                let Some((due, d)) = queue.pop_front() else {
                    break;
                };
                wait = wait.max(now - due);
                running.push(now + d);
            }
            peak = peak.max(running.len());
            let next_arrival = events.peek().map(|e| e.0);
            let next_end = running.iter().copied().fold(f64::INFINITY, f64::min);
            match next_arrival {
                Some(t) if t <= next_end => {
                    now = t;
                    while let Some(e) = events.next_if(|e| e.0 <= now) {
                        queue.push_back(e);
                    }
                }
                _ if next_end.is_finite() => now = next_end,
                _ => break,
            }
        }
    }
    (peak, wait)
}
