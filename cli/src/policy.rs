//! `bulwark quota`, `bulwark retention`, `bulwark lock` and `bulwark remove`: the
//! admin's side of policy (the coordinator's `policy` module; `bulwark group allow`
//! is in [`crate::groups`]). An agent's config only proposes; these set what is in
//! force.

use bulwark_common::config::format_size;
use bulwark_common::retention::Retention;
use bulwark_proto as pb;
use clap::Args;
use serde_json::{Value, json};

use crate::admin::Admin;
use crate::json::source_json;
use crate::output::{listing, print_json};
use crate::parse::{parse_duration_ms, parse_size};

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
        return print_json(&source_json(&s));
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

/// `bulwark lock SOURCE|--group G --min-age DUR --mode governance|compliance`.
#[derive(Args, Debug)]
pub struct LockArgs {
    /// Data source name (or --group).
    #[arg(required_unless_present = "group", conflicts_with = "group")]
    pub source: Option<String>,
    /// Lock every source of this protection group, now and joining later.
    #[arg(long)]
    pub group: Option<String>,
    /// No point younger than this can be pruned, merged or dropped (`30d`); `0`
    /// lifts a governance lock (officer certificate only).
    #[arg(long, value_parser = parse_duration_ms)]
    pub min_age: u64,
    /// governance: an officer certificate may shorten or lift it; compliance:
    /// nobody can, it can only be lengthened.
    #[arg(long, value_parser = ["governance", "compliance"], required_unless_present = "lift")]
    pub mode: Option<String>,
    /// With --min-age 0: lift the lock (governance only, officer certificate).
    #[arg(long)]
    pub lift: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn lock_words(l: Option<&pb::RetentionLock>) -> String {
    match l {
        Some(l) if l.min_age_ms > 0 => format!(
            "{} {}",
            match pb::LockMode::try_from(l.mode) {
                Ok(pb::LockMode::Compliance) => "compliance",
                Ok(pb::LockMode::Governance) => "governance",
                _ => "?",
            },
            bulwark_common::time::format_duration_ms(l.min_age_ms)
        ),
        _ => "none".into(),
    }
}

/// `bulwark lock`. The coordinator records the lock and relays a raise to the
/// nodes; a lowering (governance only, officer certificate) is refused by the nodes
/// to everyone but the officer, so this CLI then tells each node itself.
pub async fn lock(
    admin: &mut Admin,
    files: &bulwark_common::config::TlsFiles,
    a: LockArgs,
) -> anyhow::Result<()> {
    let mode = match (a.mode.as_deref(), a.lift || a.min_age == 0) {
        (_, true) => pb::LockMode::None,
        (Some("compliance"), _) => pb::LockMode::Compliance,
        _ => pb::LockMode::Governance,
    };
    let want = pb::RetentionLock {
        mode: mode as i32,
        min_age_ms: if mode == pb::LockMode::None {
            0
        } else {
            a.min_age
        },
    };
    let r = admin
        .client
        .lock(pb::LockRequest {
            source: a.source.clone().unwrap_or_default(),
            group: a.group.clone().unwrap_or_default(),
            lock: Some(want),
        })
        .await
        .map_err(|s| admin.err(s))?
        .into_inner();
    let identity = bulwark_common::tls::TlsIdentity::load(files)?;
    let officer = identity.me.role == bulwark_common::tls::Role::Officer;
    let mut out = Vec::new();
    for mut s in r.sources {
        if officer && !s.error.is_empty() && !s.node_address.is_empty() {
            // The node lowers its lock only for the officer's own certificate.
            let answer = async {
                crate::admin::node_client(&identity, &s.node, &s.node_address)
                    .await
                    .map_err(|e| e.to_string())?
                    .set_lock(pb::SetLockRequest {
                        source: s.source.clone(),
                        lock: Some(want),
                    })
                    .await
                    .map(|r| r.into_inner().lock)
                    .map_err(|st| {
                        bulwark_common::tls::explain_status(&format!("node {}", s.node), &st)
                    })
            }
            .await;
            match answer {
                Ok(l) => {
                    s.lock = l;
                    s.error.clear();
                }
                Err(e) => s.error = format!("node {}: {e}", s.node),
            }
        }
        out.push(s);
    }
    let failed = out.iter().filter(|s| !s.error.is_empty()).count();
    if a.json {
        print_json(&Value::Array(
            out.iter()
                .map(|s| {
                    json!({"source": s.source, "node": s.node, "lock": lock_words(s.lock.as_ref()), "error": s.error})
                })
                .collect(),
        ))?;
    } else {
        for s in &out {
            if s.error.is_empty() {
                println!(
                    "{}: lock {} on node {}",
                    s.source,
                    lock_words(s.lock.as_ref()),
                    s.node
                );
            } else {
                println!("{}: {}", s.source, bulwark_common::text::escape(&s.error));
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} source(s) did not take the lock (see above)");
    }
    Ok(())
}

/// `bulwark remove SOURCE`.
#[derive(Args, Debug)]
pub struct RemoveArgs {
    /// Data source name.
    pub source: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `bulwark remove`.
pub async fn remove(admin: &mut Admin, a: RemoveArgs) -> anyhow::Result<()> {
    let RemoveArgs { source, json } = a;
    let r = admin
        .client
        .remove_source(pb::RemoveSourceRequest {
            source: source.clone(),
        })
        .await
        .map_err(|s| admin.err(s))?
        .into_inner();
    if json {
        return print_json(&json!({"source": source, "node": r.node, "points": r.points}));
    }
    println!(
        "{source}: removed; node {} deleted its {} point(s); its agent's config should stop naming it",
        if r.node.is_empty() { "-" } else { &r.node },
        r.points
    );
    Ok(())
}
