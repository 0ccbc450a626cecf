//! `bulwark quota`, `bulwark retention` and `bulwark group allow`: the admin's side
//! of policy (see `crate::policy`). An agent's config only proposes; these set what
//! is in force.

use bulwark_common::config::format_size;
use bulwark_common::retention::Retention;
use bulwark_proto as pb;
use clap::Args;
use serde_json::{Value, json};

use super::{Admin, listing, parse_duration_ms, parse_size, print_json};

/// `bulwark quota [AGENT ...]`.
#[derive(Args, Debug)]
pub struct QuotaArgs {
    /// The agent; without it, every agent's quota and the fleet default are listed.
    pub agent: Option<String>,
    /// Largest data source the agent may register (`2TiB`); 0 = no limit.
    #[arg(long, value_parser = parse_size)]
    pub max_source_size: Option<u64>,
    /// Replica plus recovery-point space of all its sources; 0 = no limit.
    #[arg(long, value_parser = parse_size)]
    pub max_total: Option<u64>,
    /// Remove the agent's own quota: the fleet default (coordinator.toml
    /// `[policy]`) applies again.
    #[arg(long, conflicts_with_all = ["max_source_size", "max_total"])]
    pub clear: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `bulwark retention SOURCE ...`.
#[derive(Args, Debug)]
pub struct RetentionArgs {
    /// Data source name.
    pub source: String,
    /// Keep this many newest points.
    #[arg(long)]
    pub keep: Option<u32>,
    /// Keep the newest point of this many hours / days / weeks / months.
    #[arg(long)]
    pub hourly: Option<u32>,
    #[arg(long)]
    pub daily: Option<u32>,
    #[arg(long)]
    pub weekly: Option<u32>,
    #[arg(long)]
    pub monthly: Option<u32>,
    /// Drop points older than this (never the newest).
    #[arg(long, value_parser = parse_duration_ms)]
    pub max_age: Option<u64>,
    /// Keep every point (the source's own retention, not its group's).
    #[arg(long, conflicts_with_all = ["keep", "hourly", "daily", "weekly", "monthly", "max_age", "clear"])]
    pub keep_all: bool,
    /// Remove the source's own retention: its group's, or the fleet minimum,
    /// applies again.
    #[arg(long, conflicts_with_all = ["keep", "hourly", "daily", "weekly", "monthly", "max_age"])]
    pub clear: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn quota_json(q: &pb::Quota) -> Value {
    json!({
        "agent": q.agent,
        "max_source_size_bytes": q.max_source_size_bytes,
        "max_total_bytes": q.max_total_bytes,
        "used_total_bytes": q.used_total_bytes,
    })
}

fn limit(bytes: u64) -> String {
    if bytes == 0 {
        "no limit".into()
    } else {
        format_size(bytes)
    }
}

/// `bulwark quota`.
pub async fn quota(admin: &mut Admin, a: QuotaArgs) -> anyhow::Result<()> {
    let Some(agent) = a.agent else {
        let r = admin
            .client
            .list_quotas(pb::ListQuotasRequest {})
            .await
            .map_err(|s| admin.err(s))?
            .into_inner();
        let default = r.fleet_default.unwrap_or_default();
        if a.json {
            return print_json(&json!({
                "fleet_default": quota_json(&default),
                "agents": r.quotas.iter().map(quota_json).collect::<Vec<_>>(),
            }));
        }
        println!(
            "fleet default: {} per source, {} in all",
            limit(default.max_source_size_bytes),
            limit(default.max_total_bytes)
        );
        return listing(
            &r.quotas,
            false,
            &["AGENT", "MAX SOURCE", "MAX TOTAL", "USED"],
            quota_json,
            |q| {
                vec![
                    q.agent.clone(),
                    limit(q.max_source_size_bytes),
                    limit(q.max_total_bytes),
                    format_size(q.used_total_bytes),
                ]
            },
        );
    };
    if !a.clear && a.max_source_size.is_none() && a.max_total.is_none() {
        anyhow::bail!(
            "say what to set: --max-source-size SIZE and/or --max-total SIZE, or --clear (or leave out AGENT to list quotas)"
        );
    }
    let q = admin
        .client
        .set_quota(pb::Quota {
            agent: agent.clone(),
            max_source_size_bytes: a.max_source_size.unwrap_or(0),
            max_total_bytes: a.max_total.unwrap_or(0),
            clear: a.clear,
            ..Default::default()
        })
        .await
        .map_err(|s| admin.err(s))?
        .into_inner();
    if a.json {
        return print_json(&quota_json(&q));
    }
    println!(
        "agent {agent}: {} per source, {} in all ({} allocated now); it applies to sources the agent registers from now on",
        limit(q.max_source_size_bytes),
        limit(q.max_total_bytes),
        format_size(q.used_total_bytes)
    );
    Ok(())
}

/// `bulwark retention`.
pub async fn retention(admin: &mut Admin, a: RetentionArgs) -> anyhow::Result<()> {
    let set = [a.keep, a.hourly, a.daily, a.weekly, a.monthly]
        .iter()
        .any(Option::is_some)
        || a.max_age.is_some();
    if !set && !a.clear && !a.keep_all {
        anyhow::bail!(
            "say what to keep: --keep N, --hourly/--daily/--weekly/--monthly N, --max-age DUR, --keep-all, or --clear"
        );
    }
    let retention = (!a.clear).then(|| {
        Retention {
            keep: a.keep.unwrap_or(0),
            max_age_ms: a.max_age.unwrap_or(0),
            hourly: a.hourly.unwrap_or(0),
            daily: a.daily.unwrap_or(0),
            weekly: a.weekly.unwrap_or(0),
            monthly: a.monthly.unwrap_or(0),
        }
        .to_proto()
    });
    let s = admin
        .client
        .set_retention(pb::SetRetentionRequest {
            source: a.source.clone(),
            retention,
            clear: a.clear,
        })
        .await
        .map_err(|s| admin.err(s))?
        .into_inner();
    if a.json {
        return print_json(&super::source_json(&s));
    }
    let r = Retention::from_proto(s.retention.as_ref());
    println!(
        "{}: retention {} (from: {}); the node applies it at its next heartbeat{}",
        s.name,
        r.describe(),
        s.retention_from,
        if s.policy_refused.is_empty() {
            String::new()
        } else {
            format!(
                "\n  refused of the agent's proposal: {}",
                bulwark_common::text::escape(&s.policy_refused)
            )
        }
    );
    Ok(())
}

/// `bulwark group allow GROUP PATTERN [--remove]`.
pub async fn group_allow(
    admin: &mut Admin,
    group: String,
    pattern: String,
    remove: bool,
    json: bool,
) -> anyhow::Result<()> {
    let g = admin
        .client
        .allow_group(pb::AllowGroupRequest {
            group,
            pattern,
            remove,
        })
        .await
        .map_err(|s| admin.err(s))?
        .into_inner();
    if json {
        return print_json(&json!({
            "name": g.name, "allow": g.allow, "sources": g.sources,
        }));
    }
    println!(
        "group {}: agents matching {} may join it from their config; members: {}",
        g.name,
        if g.allow.is_empty() {
            "nothing".to_string()
        } else {
            g.allow.join(", ")
        },
        if g.sources.is_empty() {
            "none".to_string()
        } else {
            g.sources.join(", ")
        }
    );
    Ok(())
}

/// A message for a source JSON's `retention` field.
pub fn retention_json(r: Option<&pb::Retention>) -> Value {
    let r = Retention::from_proto(r);
    json!({
        "keep": r.keep, "max_age_ms": r.max_age_ms, "hourly": r.hourly,
        "daily": r.daily, "weekly": r.weekly, "monthly": r.monthly,
        "describe": r.describe(),
    })
}
