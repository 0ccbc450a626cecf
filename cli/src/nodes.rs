//! `bulwark nodes`, `bulwark agents`, `bulwark drain` and `bulwark rebalance`: the
//! fleet's machines, and moving data sources between nodes.

use anyhow::bail;
use bulwark_common::config::format_size;
use bulwark_common::time::rfc3339_ms;
use bulwark_proto as pb;
use clap::Args;
use serde_json::json;

use crate::admin::Admin;
use crate::output::{listing, print_json};

/// `bulwark drain NODE`.
#[derive(Args, Debug)]
pub struct DrainArgs {
    /// Node name.
    pub node: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `bulwark rebalance`.
#[derive(Args, Debug)]
pub struct RebalanceArgs {
    /// Only say what would move.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `bulwark nodes`.
pub async fn nodes(admin: &mut Admin, json: bool) -> anyhow::Result<()> {
    let nodes = admin
        .client
        .list_nodes(pb::ListNodesRequest {})
        .await
        .map_err(|s| admin.err(s))?
        .into_inner()
        .nodes;
    listing(
        &nodes,
        json,
        &[
            "NAME",
            "ADDRESS",
            "STATE",
            "CAPACITY",
            "ALLOCATED",
            "USED",
            "SOURCES",
        ],
        |n| {
            json!({
                "name": n.name, "address": n.address, "state": n.state,
                "capacity_bytes": n.capacity_bytes, "allocated_bytes": n.allocated_bytes,
                "used_bytes": n.used_bytes, "sources": n.sources,
                "live_streams": n.live_streams, "last_seen": rfc3339_ms(n.last_seen_ms),
                "ingest_bytes_per_sec": n.ingest_bytes_per_sec, "nbd_address": n.nbd_address, "version": n.version,
                "health": n.health,
            })
        },
        |n| {
            vec![
                n.name.clone(),
                n.address.clone(),
                n.state.clone(),
                format_size(n.capacity_bytes),
                format_size(n.allocated_bytes),
                format_size(n.used_bytes),
                n.sources.to_string(),
            ]
        },
    )
}

/// `bulwark agents`.
pub async fn agents(admin: &mut Admin, json: bool) -> anyhow::Result<()> {
    let agents = admin
        .client
        .list_agents(pb::ListAgentsRequest {})
        .await
        .map_err(|s| admin.err(s))?
        .into_inner()
        .agents;
    listing(
        &agents,
        json,
        &["NAME", "STATE", "SOURCES", "LAST SEEN"],
        |g| {
            json!({
                "name": g.name, "connected": g.connected, "sources": g.sources,
                "last_seen": rfc3339_ms(g.last_seen_ms), "version": g.version,
            })
        },
        |g| {
            vec![
                g.name.clone(),
                if g.connected {
                    "connected"
                } else {
                    "disconnected"
                }
                .into(),
                g.sources.join(","),
                rfc3339_ms(g.last_seen_ms),
            ]
        },
    )
}

/// `bulwark drain`.
pub async fn drain(admin: &mut Admin, a: DrainArgs) -> anyhow::Result<()> {
    let r = admin
        .client
        .drain(pb::DrainRequest {
            node: a.node.clone(),
        })
        .await
        .map_err(|s| admin.err(s))?
        .into_inner();
    print_moves(&r, a.json, &format!("drain of {}", a.node))
}

/// `bulwark rebalance`.
pub async fn rebalance(admin: &mut Admin, a: RebalanceArgs) -> anyhow::Result<()> {
    let r = admin
        .client
        .rebalance(pb::RebalanceRequest { dry_run: a.dry_run })
        .await
        .map_err(|s| admin.err(s))?
        .into_inner();
    print_moves(&r, a.json, "rebalance")
}

/// Prints a drain's or rebalance's moves; fails when one failed.
fn print_moves(r: &pb::MoveReport, json: bool, what: &str) -> anyhow::Result<()> {
    if json {
        print_json(&json!({
            "dry_run": r.dry_run,
            "spread_before": r.spread_before, "spread_after": r.spread_after,
            "lower_bound_bytes": r.lower_bound_bytes,
            "moves": r.moves.iter().map(|m| json!({
                "source": m.source, "from": m.from, "to": m.to, "bytes": m.bytes,
                "points": m.points, "duration_ms": m.duration_ms, "error": m.error,
            })).collect::<Vec<_>>(),
        }))?;
    } else {
        for m in &r.moves {
            let verb = if r.dry_run { "would move" } else { "moved" };
            if m.error.is_empty() {
                println!(
                    "{verb} {} from {} to {} ({})",
                    m.source,
                    m.from,
                    m.to,
                    format_size(m.bytes)
                );
            } else {
                println!(
                    "did not move {} from {}: {}",
                    m.source,
                    m.from,
                    bulwark_common::text::escape(&m.error)
                );
            }
        }
        println!(
            "{what}: {} move(s); fill spread {:.1}% -> {:.1}%",
            r.moves.len(),
            r.spread_before * 100.0,
            r.spread_after * 100.0
        );
    }
    let failed: Vec<&str> = r
        .moves
        .iter()
        .filter(|m| !m.error.is_empty())
        .map(|m| m.source.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("{what}: {} not moved: {}", failed.len(), failed.join(", "));
    }
    Ok(())
}
