//! `bulwark sources` (and `--explain`) and `bulwark allocate`: the fleet's data
//! sources, where they live, and their space on their node.

use anyhow::anyhow;
use bulwark_common::config::format_size;
use bulwark_proto as pb;
use clap::Args;
use serde_json::json;

use crate::admin::Admin;
use crate::json::source_json;
use crate::output::{dash_if_empty, listing, print_json};
use crate::parse::parse_size;

/// `bulwark sources`.
#[derive(Args, Debug)]
pub struct SourcesArgs {
    /// Say why one data source lives on its node instead of listing.
    #[arg(long, value_name = "NAME")]
    pub explain: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `bulwark allocate SOURCE`.
#[derive(Args, Debug)]
pub struct AllocateArgs {
    /// Data source name.
    pub source: String,
    /// Replica space (at least the volume plus its checksums).
    #[arg(long, value_parser = parse_size)]
    pub replica: Option<u64>,
    /// Recovery-point space.
    #[arg(long, value_parser = parse_size)]
    pub points: Option<u64>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// The columns of `bulwark sources`.
const HEADER: [&str; 9] = [
    "NAME",
    "AGENT",
    "NODE",
    "STATE",
    "TRACKER",
    "SIZE",
    "POINT SPACE",
    "LAST POINT",
    "ERROR",
];

/// `bulwark sources`.
pub async fn sources(admin: &mut Admin, a: SourcesArgs) -> anyhow::Result<()> {
    let sources = admin
        .client
        .list_sources(pb::ListSourcesRequest {})
        .await
        .map_err(|s| admin.err(s))?
        .into_inner()
        .sources;
    if let Some(name) = a.explain {
        let s = sources
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| anyhow!("no data source named {name}"))?;
        let why = if s.placement.is_empty() {
            "placed before this coordinator recorded its reasons".to_string()
        } else {
            s.placement.clone()
        };
        if a.json {
            print_json(&json!({"name": s.name, "node": s.node, "explain": why}))?;
        } else {
            println!("{}: {}", s.name, why.replace("; ", "\n  "));
        }
        return Ok(());
    }
    listing(&sources, a.json, &HEADER, source_json, source_row)
}

/// What finds a source's changes, for the TRACKER column: a volume's block
/// tracker, or `log` for a log source (which ships appended bytes and has no
/// block tracker, whatever its record's default tracker name says).
fn tracker_word(s: &pb::SourceInfo) -> String {
    if s.kind == pb::SourceKind::Log as i32 {
        "log".into()
    } else {
        s.tracker.clone()
    }
}

/// One row of `bulwark sources`.
fn source_row(s: &pb::SourceInfo) -> Vec<String> {
    vec![
        s.name.clone(),
        s.agent.clone(),
        dash_if_empty(&s.node),
        if s.state == "recovering" {
            format!("recovering ({} to re-check)", format_size(s.recheck_bytes))
        } else {
            s.state.clone()
        },
        tracker_word(s),
        format_size(s.size_bytes),
        if s.points_alloc_bytes == 0 {
            "-".into()
        } else {
            format!(
                "{} of {}",
                format_size(s.points_used_bytes),
                format_size(s.points_alloc_bytes)
            )
        },
        if s.last_point == 0 {
            "-".into()
        } else {
            s.last_point.to_string()
        },
        if s.error.is_empty() {
            s.warning.clone()
        } else {
            s.error.clone()
        },
    ]
}

/// `bulwark allocate`.
pub async fn allocate(admin: &mut Admin, a: AllocateArgs) -> anyhow::Result<()> {
    let s = admin
        .client
        .allocate(pb::AllocateRequest {
            source: a.source.clone(),
            replica_alloc_bytes: a.replica.unwrap_or(0),
            points_alloc_bytes: a.points.unwrap_or(0),
        })
        .await
        .map_err(|s| admin.err(s))?
        .into_inner()
        .source
        .ok_or_else(|| anyhow!("the coordinator returned no source"))?;
    if a.json {
        print_json(&source_json(&s))?;
    } else {
        println!(
            "{}: allocation set to {} in all on node {} (the node applies it now, and at the next sync at the latest)",
            s.name,
            format_size(s.allocated_bytes),
            dash_if_empty(&s.node)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(kind: pb::SourceKind, tracker: &str) -> pb::SourceInfo {
        pb::SourceInfo {
            name: "s".into(),
            kind: kind as i32,
            tracker: tracker.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_log_source_shows_log_as_its_tracker() {
        // A log source's record carries the default tracker name `fingerprint`,
        // which it does not use.
        let row = source_row(&source(pb::SourceKind::Log, "fingerprint"));
        assert_eq!(HEADER[4], "TRACKER");
        assert_eq!(row[4], "log");
    }

    #[test]
    fn a_volume_shows_its_block_tracker() {
        for t in ["fingerprint", "nbd-filter", "qcow2-bitmap", "dm-era"] {
            assert_eq!(source_row(&source(pb::SourceKind::Volume, t))[4], t);
        }
    }
}
