//! `bulwark status`: one screen on the whole fleet — nodes, space, data sources
//! by state, groups, open alerts, and every configured coordinator's part (see
//! [`crate::coordinators`]).

use bulwark_common::config::format_size;
use bulwark_common::time::rfc3339_ms;
use bulwark_proto as pb;
use serde_json::json;

use crate::admin::Admin;
use crate::output::print_json;

/// `bulwark status`.
pub async fn status(admin: &mut Admin, json: bool) -> anyhow::Result<()> {
    let c = &mut admin.client;
    let nodes = c.list_nodes(pb::ListNodesRequest {}).await;
    let sources = c.list_sources(pb::ListSourcesRequest {}).await;
    let alerts = c.list_alerts(pb::ListAlertsRequest { all: false }).await;
    let groups = c.list_groups(pb::ListGroupsRequest {}).await;
    let (nodes, sources, alerts, groups) = match (nodes, sources, alerts, groups) {
        (Ok(n), Ok(s), Ok(a), Ok(g)) => (
            n.into_inner().nodes,
            s.into_inner().sources,
            a.into_inner().alerts,
            g.into_inner().groups,
        ),
        (Err(e), ..) | (_, Err(e), ..) | (_, _, Err(e), _) | (.., Err(e)) => {
            return Err(admin.err(e));
        }
    };
    let count = |xs: Vec<&str>| {
        let mut m: std::collections::BTreeMap<String, usize> = Default::default();
        for x in xs {
            *m.entry(x.to_string()).or_default() += 1;
        }
        m
    };
    let node_states = count(nodes.iter().map(|n| n.state.as_str()).collect());
    let source_states = count(sources.iter().map(|s| s.state.as_str()).collect());
    let severities = count(alerts.iter().map(|a| a.severity.as_str()).collect());
    let capacity: u64 = nodes.iter().map(|n| n.capacity_bytes).sum();
    let allocated: u64 = nodes.iter().map(|n| n.allocated_bytes).sum();
    let used: u64 = nodes.iter().map(|n| n.used_bytes).sum();
    let now = bulwark_common::time::now_ms();
    let oldest_sync = sources
        .iter()
        .filter(|s| s.last_sync_ms > 0)
        .min_by_key(|s| s.last_sync_ms);
    let never = sources.iter().filter(|s| s.last_sync_ms == 0).count();
    let answers = crate::coordinators::ask_all(admin).await;
    if json {
        let (coordinators, etcd) = crate::coordinators::to_json(&answers);
        return print_json(&json!({
            "coordinator": admin.target,
            "nodes": node_states, "capacity_bytes": capacity,
            "allocated_bytes": allocated, "used_bytes": used,
            "sources": source_states, "sources_never_synced": never,
            "oldest_sync": oldest_sync.map(|s| json!({
                "source": s.name, "at": rfc3339_ms(s.last_sync_ms),
            })),
            "groups": groups.len(),
            "alerts": severities,
            "coordinators": coordinators, "etcd": etcd,
        }));
    }
    let list = |m: &std::collections::BTreeMap<String, usize>| {
        if m.is_empty() {
            "none".to_string()
        } else {
            m.iter()
                .map(|(k, v)| format!("{v} {k}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    println!("coordinator  {}", admin.target);
    crate::coordinators::print(&answers);
    println!("nodes        {}", list(&node_states));
    println!(
        "space        {} allocated of {} ({:.0}%), {} used",
        format_size(allocated),
        format_size(capacity),
        allocated as f64 * 100.0 / capacity.max(1) as f64,
        format_size(used)
    );
    println!(
        "sources      {}{}",
        list(&source_states),
        if never > 0 {
            format!("; {never} never synced")
        } else {
            String::new()
        }
    );
    if let Some(s) = oldest_sync {
        println!(
            "oldest sync  {} ({} s ago)",
            s.name,
            (now - s.last_sync_ms).max(0) / 1000
        );
    }
    println!("groups       {}", groups.len());
    println!("alerts       {}", list(&severities));
    for a in alerts.iter().take(5) {
        println!(
            "  {} {}: {}",
            a.severity,
            bulwark_common::text::escape(&a.subject),
            bulwark_common::text::escape(&a.message)
        );
    }
    if alerts.len() > 5 {
        println!("  ... {} more: bulwark alerts", alerts.len() - 5);
    }
    Ok(())
}
