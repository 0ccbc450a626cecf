//! `bulwark group ...`: protection groups — a sync schedule, retention and space
//! shared by data sources — and which agents may put their sources in one.

use bulwark_common::retention::Retention;
use bulwark_common::time::format_duration_ms;
use bulwark_proto as pb;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::admin::Admin;
use crate::output::{ListArgs, listing, print_json};
use crate::parse::{parse_duration_ms, parse_size, parse_time_of_day};

/// `bulwark group`.
#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    /// Create a group, or change one: its sync interval and (optionally) retention,
    /// which then wins over what agents' configs say.
    Create(CreateArgs),
    /// List groups with their sources.
    List(ListArgs),
    /// Put data sources in a group.
    Add {
        group: String,
        sources: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Take data sources out of their group (back to their agent's schedule).
    Remove {
        sources: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Delete a group that has no sources.
    Delete {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Let agents whose name matches PATTERN (`*` = anything, e.g. `db-*`) put
    /// their sources in the group from their own config; `--remove` takes it back.
    Allow {
        group: String,
        pattern: String,
        #[arg(long)]
        remove: bool,
        #[arg(long)]
        json: bool,
    },
}

/// `bulwark group create NAME --interval DUR`.
#[derive(Args, Debug)]
pub struct CreateArgs {
    name: String,
    /// Time between syncs of each source (`15m`); the coordinator spreads the
    /// sources' start times over it.
    #[arg(long, value_parser = parse_duration_ms)]
    interval: u64,
    /// Keep this many newest points.
    #[arg(long)]
    keep: Option<u32>,
    /// Keep the newest point of this many hours / days / weeks / months.
    #[arg(long)]
    hourly: Option<u32>,
    #[arg(long)]
    daily: Option<u32>,
    #[arg(long)]
    weekly: Option<u32>,
    #[arg(long)]
    monthly: Option<u32>,
    /// Drop points older than this (never the newest).
    #[arg(long, value_parser = parse_duration_ms)]
    max_age: Option<u64>,
    /// Also make a point at this time of day, UTC (`02:00`); repeatable.
    #[arg(long = "at", value_parser = parse_time_of_day)]
    at: Vec<u32>,
    /// Replica space of each member (over its agent's config).
    #[arg(long, value_parser = parse_size)]
    replica_space: Option<u64>,
    /// Recovery-point space of each member (over its agent's config).
    #[arg(long, value_parser = parse_size)]
    points_space: Option<u64>,
    #[arg(long)]
    json: bool,
}

/// Runs a `bulwark group` command.
pub async fn run(admin: &mut Admin, cmd: GroupCommand) -> anyhow::Result<()> {
    match cmd {
        GroupCommand::Create(a) => create(admin, a).await,
        GroupCommand::List(a) => list(admin, a.json).await,
        GroupCommand::Add {
            group,
            sources,
            json,
        } => set(admin, Some(group), sources, json).await,
        GroupCommand::Remove { sources, json } => set(admin, None, sources, json).await,
        GroupCommand::Delete { name, json } => delete(admin, name, json).await,
        GroupCommand::Allow {
            group,
            pattern,
            remove,
            json,
        } => allow(admin, group, pattern, remove, json).await,
    }
}

/// A group as `--json` prints it.
fn group_json(g: &pb::Group) -> Value {
    json!({
        "name": g.name, "interval_ms": g.interval_ms, "sources": g.sources,
        "replica_alloc_bytes": g.replica_alloc_bytes, "points_alloc_bytes": g.points_alloc_bytes,
        "point_times": g.point_times.iter().map(|m| format!("{:02}:{:02}", m / 60, m % 60)).collect::<Vec<_>>(),
        "retention": g.retention.as_ref().map(|r| json!({
            "keep": r.keep, "max_age_ms": r.max_age_ms, "hourly": r.hourly,
            "daily": r.daily, "weekly": r.weekly, "monthly": r.monthly,
        })),
    })
}

/// A group's sync interval the way people write it (`1d`, `6h`, `90m`, `30s`),
/// which `--interval` reads back.
fn interval_words(g: &pb::Group) -> String {
    format_duration_ms(g.interval_ms)
}

/// One row of `bulwark group list`.
fn group_row(g: &pb::Group) -> Vec<String> {
    vec![
        g.name.clone(),
        interval_words(g),
        g.retention.as_ref().map_or("agents' own".to_string(), |r| {
            Retention::from_proto(Some(r)).describe()
        }),
        g.sources.join(","),
    ]
}

/// `bulwark group create`.
async fn create(admin: &mut Admin, a: CreateArgs) -> anyhow::Result<()> {
    let any = a.keep.is_some()
        || a.hourly.is_some()
        || a.daily.is_some()
        || a.weekly.is_some()
        || a.monthly.is_some()
        || a.max_age.is_some();
    let retention = any.then(|| pb::Retention {
        keep: a.keep.unwrap_or(0),
        max_age_ms: a.max_age.unwrap_or(0),
        hourly: a.hourly.unwrap_or(0),
        daily: a.daily.unwrap_or(0),
        weekly: a.weekly.unwrap_or(0),
        monthly: a.monthly.unwrap_or(0),
    });
    let g = admin
        .client
        .put_group(pb::Group {
            name: a.name,
            interval_ms: a.interval,
            retention,
            sources: Vec::new(),
            point_times: a.at,
            replica_alloc_bytes: a.replica_space.unwrap_or(0),
            points_alloc_bytes: a.points_space.unwrap_or(0),
            ..Default::default()
        })
        .await
        .map_err(|s| admin.err(s))?
        .into_inner();
    if a.json {
        print_json(&group_json(&g))?;
    } else {
        println!(
            "group {}: a sync every {}, {} source(s)",
            g.name,
            interval_words(&g),
            g.sources.len()
        );
    }
    Ok(())
}

/// `bulwark group list`.
async fn list(admin: &mut Admin, json: bool) -> anyhow::Result<()> {
    let groups = admin
        .client
        .list_groups(pb::ListGroupsRequest {})
        .await
        .map_err(|s| admin.err(s))?
        .into_inner()
        .groups;
    listing(
        &groups,
        json,
        &["NAME", "INTERVAL", "RETENTION", "SOURCES"],
        group_json,
        group_row,
    )
}

/// `bulwark group add` (`Some` group) and `bulwark group remove` (`None`: no
/// group, `""` on the wire).
async fn set(
    admin: &mut Admin,
    group: Option<String>,
    sources: Vec<String>,
    json: bool,
) -> anyhow::Result<()> {
    let name = group.clone().unwrap_or_default();
    admin
        .client
        .set_group(pb::SetGroupRequest {
            group: name.clone(),
            sources: sources.clone(),
        })
        .await
        .map_err(|s| admin.err(s))?;
    if json {
        print_json(&json!({"group": name, "sources": sources}))?;
    } else if let Some(group) = group {
        println!("{} now in group {group}", sources.join(", "));
    } else {
        println!("{} in no group now", sources.join(", "));
    }
    Ok(())
}

/// `bulwark group delete`.
async fn delete(admin: &mut Admin, name: String, json: bool) -> anyhow::Result<()> {
    admin
        .client
        .delete_group(pb::DeleteGroupRequest { name: name.clone() })
        .await
        .map_err(|s| admin.err(s))?;
    if json {
        print_json(&json!({"deleted": name}))?;
    } else {
        println!("group {name} deleted");
    }
    Ok(())
}

/// `bulwark group allow GROUP PATTERN [--remove]`.
async fn allow(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn group(interval_ms: u64) -> pb::Group {
        pb::Group {
            name: "g".into(),
            interval_ms,
            ..Default::default()
        }
    }

    #[test]
    fn intervals_print_the_way_people_write_them() {
        for (ms, words) in [
            (86_400_000, "1d"),
            (6 * 3_600_000, "6h"),
            (90 * 60_000, "90m"),
            (30_000, "30s"),
        ] {
            assert_eq!(group_row(&group(ms))[1], words);
        }
    }

    #[test]
    fn a_printed_interval_reads_back_as_the_same_interval() {
        for ms in [
            1000,
            30_000,
            90 * 60_000,
            6 * 3_600_000,
            86_400_000,
            7 * 86_400_000,
        ] {
            let words = interval_words(&group(ms));
            assert_eq!(parse_duration_ms(&words), Ok(ms), "{words}");
        }
    }
}
