//! Where data sources live: the choice of a node for a new data source, and the plan
//! of moves that brings a fleet's fill back within a spread. Pure functions over
//! figures (no I/O), so the registry, `bulwark sources --explain` and the simulation
//! benchmark (`coordinator/examples/placement_sim.rs`) share them.
//!
//! # Choosing a node
//!
//! Candidates are the up nodes whose unallocated space fits the source's allocation.
//! Each gets a score, highest wins, ties by name (so the choice is deterministic):
//!
//! ```text
//! score = headroom × (1 − fill after placing)         fill = allocated / capacity
//!       − fan_in   × (sources + 2 × live streams) / (fleet mean of that + 1)
//!       − busy     × recent ingest / (fleet max ingest + 1)
//! ```
//!
//! Headroom dominates (weight 1), so placement evens out fill ratios; fan-in and
//! recent throughput break near-ties toward nodes with fewer sources and quieter
//! disks.
//!
//! # Rebalancing
//!
//! [`plan_rebalance`] moves sources from the fullest node to the emptiest one that
//! can take them until the spread of fill ratios (max − min over up nodes) is within
//! the bound, each time choosing the source that best cuts the fuller node's excess
//! over the fleet's mean fill (the smallest that brings it under, else the largest
//! that fits). It also reports a lower bound of the bytes any plan must move.

use std::fmt::Write as _;

use bulwark_common::config::format_size;

/// Weights of the placement score (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct Weights {
    pub headroom: f64,
    pub fan_in: f64,
    pub busy: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            headroom: 1.0,
            fan_in: 0.05,
            busy: 0.05,
        }
    }
}

/// A node as placement sees it.
#[derive(Debug, Clone)]
pub struct NodeFigures {
    pub name: String,
    pub up: bool,
    pub capacity_bytes: u64,
    pub allocated_bytes: u64,
    pub sources: u32,
    pub live_streams: u32,
    /// Bytes per second applied recently.
    pub ingest_bytes_per_sec: u64,
}

impl NodeFigures {
    /// Allocated / capacity.
    pub fn fill(&self) -> f64 {
        if self.capacity_bytes == 0 {
            1.0
        } else {
            self.allocated_bytes as f64 / self.capacity_bytes as f64
        }
    }

    fn free(&self) -> u64 {
        self.capacity_bytes.saturating_sub(self.allocated_bytes)
    }
}

/// One node's part in a decision.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub node: String,
    /// `None` when the node could not take the source (why is in `note`).
    pub score: Option<f64>,
    pub fill_after: f64,
    pub note: String,
}

/// A placement decision and how it was reached.
#[derive(Debug, Clone)]
pub struct Decision {
    /// Index into the nodes given, or `None` when none fits.
    pub chosen: Option<usize>,
    pub candidates: Vec<Candidate>,
    pub need_bytes: u64,
}

impl Decision {
    /// Why that node, in plain words, with every node's score.
    pub fn explain(&self) -> String {
        let mut s = String::new();
        match self.chosen {
            Some(i) => {
                let _ = write!(
                    s,
                    "placed on {} (needs {}): the highest score among the up nodes it fits on;",
                    self.candidates[i].node,
                    format_size(self.need_bytes)
                );
            }
            None => {
                let _ = write!(
                    s,
                    "not placed (needs {}): no up node has room;",
                    format_size(self.need_bytes)
                );
            }
        }
        for c in &self.candidates {
            match c.score {
                Some(score) => {
                    let _ = write!(
                        s,
                        " {}: score {score:.3}, fill after {:.1}%{};",
                        c.node,
                        c.fill_after * 100.0,
                        c.note
                    );
                }
                None => {
                    let _ = write!(s, " {}: {};", c.node, c.note);
                }
            }
        }
        s.pop();
        s
    }
}

/// Chooses a node for a source needing `need` bytes (see the module docs).
pub fn choose(nodes: &[NodeFigures], need: u64, w: Weights) -> Decision {
    let up: Vec<&NodeFigures> = nodes.iter().filter(|n| n.up).collect();
    let fan = |n: &NodeFigures| f64::from(n.sources) + 2.0 * f64::from(n.live_streams);
    let mean_fan = if up.is_empty() {
        0.0
    } else {
        up.iter().map(|n| fan(n)).sum::<f64>() / up.len() as f64
    };
    let max_ingest = up.iter().map(|n| n.ingest_bytes_per_sec).max().unwrap_or(0);
    let mut best: Option<(f64, usize)> = None;
    let mut candidates = Vec::with_capacity(nodes.len());
    for (i, n) in nodes.iter().enumerate() {
        let fill_after = if n.capacity_bytes == 0 {
            1.0
        } else {
            (n.allocated_bytes.saturating_add(need)) as f64 / n.capacity_bytes as f64
        };
        if !n.up {
            candidates.push(Candidate {
                node: n.name.clone(),
                score: None,
                fill_after,
                note: "down".into(),
            });
            continue;
        }
        if n.free() < need {
            candidates.push(Candidate {
                node: n.name.clone(),
                score: None,
                fill_after,
                note: format!("only {} unallocated", format_size(n.free())),
            });
            continue;
        }
        let fan_term = fan(n) / (mean_fan + 1.0);
        let busy_term = n.ingest_bytes_per_sec as f64 / (max_ingest as f64 + 1.0);
        let score = w.headroom * (1.0 - fill_after) - w.fan_in * fan_term - w.busy * busy_term;
        candidates.push(Candidate {
            node: n.name.clone(),
            score: Some(score),
            fill_after,
            note: format!(
                ", {} sources, {} live streams, ingest {}/s",
                n.sources,
                n.live_streams,
                format_size(n.ingest_bytes_per_sec)
            ),
        });
        let better = match best {
            None => true,
            Some((b, j)) => score > b || (score == b && n.name < nodes[j].name),
        };
        if better {
            best = Some((score, i));
        }
    }
    Decision {
        chosen: best.map(|(_, i)| i),
        candidates,
        need_bytes: need,
    }
}

/// A data source as the rebalancer sees it.
#[derive(Debug, Clone)]
pub struct Placed {
    pub name: String,
    /// Index of its node.
    pub node: usize,
    pub allocated_bytes: u64,
}

/// One move of a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Move {
    pub source: String,
    pub from: usize,
    pub to: usize,
    pub bytes: u64,
}

/// A rebalance plan.
#[derive(Debug, Clone)]
pub struct Plan {
    pub moves: Vec<Move>,
    pub spread_before: f64,
    pub spread_after: f64,
    /// Bytes any plan must move to reach `spread_after`: every node's fill must end
    /// at or below (mean fill + spread), so what is above that must leave it.
    pub lower_bound_bytes: u64,
}

impl Plan {
    /// Bytes the plan moves.
    pub fn bytes(&self) -> u64 {
        self.moves.iter().map(|m| m.bytes).sum()
    }
}

/// Max − min fill ratio over the up nodes.
pub fn spread(nodes: &[NodeFigures]) -> f64 {
    let fills: Vec<f64> = nodes
        .iter()
        .filter(|n| n.up)
        .map(NodeFigures::fill)
        .collect();
    let max = fills.iter().copied().fold(f64::MIN, f64::max);
    let min = fills.iter().copied().fold(f64::MAX, f64::min);
    if fills.is_empty() { 0.0 } else { max - min }
}

/// Plans moves until the spread of fill ratios over the up nodes is at most
/// `max_spread`, or no move helps. Sources on down nodes are moved off first
/// (a drain is a rebalance of a node marked down), and never onto one.
pub fn plan_rebalance(nodes: &[NodeFigures], sources: &[Placed], max_spread: f64) -> Plan {
    let mut nodes: Vec<NodeFigures> = nodes.to_vec();
    let mut placed: Vec<Placed> = sources.to_vec();
    let spread_before = spread(&nodes);
    let mut moves = Vec::new();
    let total_cap: u64 = nodes
        .iter()
        .filter(|n| n.up)
        .map(|n| n.capacity_bytes)
        .sum();
    let total_alloc: u64 = placed.iter().map(|p| p.allocated_bytes).sum();
    let mean = if total_cap == 0 {
        0.0
    } else {
        total_alloc as f64 / total_cap as f64
    };
    // Per node, its sources by size, largest first (indices into `placed`).
    let mut by_node: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for (i, p) in placed.iter().enumerate() {
        if p.node < nodes.len() {
            by_node[p.node].push(i);
        }
    }
    let do_move = |nodes: &mut Vec<NodeFigures>,
                   placed: &mut Vec<Placed>,
                   by_node: &mut Vec<Vec<usize>>,
                   moves: &mut Vec<Move>,
                   si: usize,
                   to: usize| {
        let from = placed[si].node;
        let bytes = placed[si].allocated_bytes;
        nodes[from].allocated_bytes = nodes[from].allocated_bytes.saturating_sub(bytes);
        nodes[from].sources = nodes[from].sources.saturating_sub(1);
        nodes[to].allocated_bytes += bytes;
        nodes[to].sources += 1;
        by_node[from].retain(|&x| x != si);
        by_node[to].push(si);
        placed[si].node = to;
        moves.push(Move {
            source: placed[si].name.clone(),
            from,
            to,
            bytes,
        });
    };
    // 1. Everything off down nodes.
    for from in 0..nodes.len() {
        if nodes[from].up {
            continue;
        }
        let mut list = by_node[from].clone();
        list.sort_by_key(|&i| std::cmp::Reverse(placed[i].allocated_bytes));
        for si in list {
            if let Some(to) = target(&nodes, placed[si].allocated_bytes, from) {
                do_move(&mut nodes, &mut placed, &mut by_node, &mut moves, si, to);
            }
        }
    }
    // 2. Fullest to emptiest until within the bound.
    let limit = placed.len() * 2 + 16;
    for _ in 0..limit {
        if spread(&nodes) <= max_spread {
            break;
        }
        let up: Vec<usize> = (0..nodes.len()).filter(|&i| nodes[i].up).collect();
        let Some(&full) = up
            .iter()
            .max_by(|&&a, &&b| nodes[a].fill().total_cmp(&nodes[b].fill()))
        else {
            break;
        };
        let cap = nodes[full].capacity_bytes as f64;
        let excess = ((nodes[full].fill() - mean) * cap).max(0.0) as u64;
        // Candidates that some node can take and that leave the move worthwhile: the
        // receiving node must end below the giving node's current fill.
        let mut best: Option<(usize, usize)> = None;
        let mut list = by_node[full].clone();
        // Smallest source that clears the excess, else the largest below it.
        list.sort_by_key(|&i| placed[i].allocated_bytes);
        let clearing = list
            .iter()
            .copied()
            .find(|&i| placed[i].allocated_bytes >= excess);
        let order: Vec<usize> = clearing
            .into_iter()
            .chain(
                list.iter()
                    .rev()
                    .copied()
                    .filter(|&i| placed[i].allocated_bytes < excess),
            )
            .collect();
        for si in order {
            let bytes = placed[si].allocated_bytes;
            if let Some(to) = target(&nodes, bytes, full) {
                let to_after = (nodes[to].allocated_bytes + bytes) as f64
                    / nodes[to].capacity_bytes.max(1) as f64;
                if to_after < nodes[full].fill() {
                    best = Some((si, to));
                    break;
                }
            }
        }
        match best {
            Some((si, to)) => do_move(&mut nodes, &mut placed, &mut by_node, &mut moves, si, to),
            None => break,
        }
    }
    let spread_after = spread(&nodes);
    Plan {
        moves,
        spread_before,
        spread_after,
        lower_bound_bytes: lower_bound(sources, &nodes, mean + spread_after),
    }
}

/// The up node with the lowest fill after taking `bytes`, if any has room.
fn target(nodes: &[NodeFigures], bytes: u64, except: usize) -> Option<usize> {
    nodes
        .iter()
        .enumerate()
        .filter(|(i, n)| *i != except && n.up && n.free() >= bytes)
        .min_by(|(_, a), (_, b)| {
            let fa = (a.allocated_bytes + bytes) as f64 / a.capacity_bytes.max(1) as f64;
            let fb = (b.allocated_bytes + bytes) as f64 / b.capacity_bytes.max(1) as f64;
            fa.total_cmp(&fb).then(a.name.cmp(&b.name))
        })
        .map(|(i, _)| i)
}

/// Bytes any plan must move so that every up node ends at or below `ceiling` fill
/// and every down node empty (`sources` as placed before the plan).
fn lower_bound(sources: &[Placed], nodes: &[NodeFigures], ceiling: f64) -> u64 {
    sources
        .iter()
        .fold(vec![0u64; nodes.len()], |mut acc, p| {
            if p.node < acc.len() {
                acc[p.node] += p.allocated_bytes;
            }
            acc
        })
        .iter()
        .zip(nodes.iter())
        .map(|(alloc, n)| {
            if !n.up {
                *alloc
            } else {
                alloc.saturating_sub((ceiling * n.capacity_bytes as f64) as u64)
            }
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cap: u64, alloc: u64) -> NodeFigures {
        NodeFigures {
            name: name.into(),
            up: true,
            capacity_bytes: cap,
            allocated_bytes: alloc,
            sources: 0,
            live_streams: 0,
            ingest_bytes_per_sec: 0,
        }
    }

    #[test]
    fn picks_the_emptiest_fit_and_explains() {
        let nodes = vec![node("a", 100, 50), node("b", 200, 50), node("c", 100, 95)];
        let d = choose(&nodes, 10, Weights::default());
        assert_eq!(d.chosen, Some(1));
        let e = d.explain();
        assert!(e.contains("placed on b"), "{e}");
        assert!(e.contains("c: only 5 B unallocated"), "{e}");
        let d = choose(&nodes, 500, Weights::default());
        assert_eq!(d.chosen, None);
        assert!(d.explain().contains("no up node has room"));
    }

    #[test]
    fn down_nodes_are_never_chosen_and_ties_go_by_name() {
        let mut nodes = vec![node("b", 100, 0), node("a", 100, 0), node("c", 1000, 0)];
        nodes[2].up = false;
        assert_eq!(choose(&nodes, 1, Weights::default()).chosen, Some(1));
    }

    #[test]
    fn fan_in_breaks_near_ties() {
        let mut nodes = vec![node("a", 1000, 100), node("b", 1000, 101)];
        nodes[0].sources = 40;
        nodes[0].live_streams = 10;
        assert_eq!(choose(&nodes, 1, Weights::default()).chosen, Some(1));
    }

    #[test]
    fn rebalance_reaches_the_spread_and_drains_down_nodes() {
        let mut nodes = vec![node("a", 1000, 0), node("b", 1000, 0), node("c", 1000, 0)];
        let mut sources = Vec::new();
        for i in 0..30 {
            sources.push(Placed {
                name: format!("s{i}"),
                node: 0,
                allocated_bytes: 20 + i,
            });
            nodes[0].allocated_bytes += 20 + i;
        }
        let plan = plan_rebalance(&nodes, &sources, 0.05);
        assert!(plan.spread_after <= 0.05, "{plan:?}");
        assert!(plan.bytes() >= plan.lower_bound_bytes);
        assert!(
            plan.bytes() as f64 <= 1.5 * plan.lower_bound_bytes as f64,
            "{plan:?}"
        );
        nodes[0].up = false;
        let plan = plan_rebalance(&nodes, &sources, 0.05);
        assert!(plan.moves.iter().all(|m| m.from == 0 && m.to != 0));
        assert_eq!(plan.moves.len(), 30);
    }
}
