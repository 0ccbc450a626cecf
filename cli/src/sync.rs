//! `bulwark sync` and `bulwark check`, and how a finished sync is told: one line
//! for people ([`sync_line`], also the demo's) or JSON ([`sync_json`]).

use anyhow::bail;
use bulwark_common::config::format_size;
use bulwark_common::point::{Consistency, PointKind};
use bulwark_proto as pb;
use clap::Args;
use serde_json::{Value, json};

use crate::admin::Admin;
use crate::output::{format_ms, kind_word, print_json};
use crate::progress::{end_progress, watch_progress};

/// `bulwark sync SOURCE`.
#[derive(Args, Debug)]
pub struct SyncArgs {
    /// Data source name.
    pub source: String,
    /// Wait until the sync has made its recovery point.
    #[arg(long)]
    pub wait: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `bulwark check SOURCE`.
#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Data source name.
    pub source: String,
    /// Recompute the node's checksums from the replica's bytes (finds and repairs
    /// damage inside the replica; reads the whole replica on the node).
    #[arg(long)]
    pub deep: bool,
    /// Wait until the check has made its recovery point.
    #[arg(long)]
    pub wait: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `bulwark sync`.
pub async fn sync(admin: &mut Admin, a: SyncArgs) -> anyhow::Result<()> {
    sync_command(admin, &a.source, a.wait, false, false, a.json).await
}

/// `bulwark check`.
pub async fn check(admin: &mut Admin, a: CheckArgs) -> anyhow::Result<()> {
    sync_command(admin, &a.source, a.wait, true, a.deep, a.json).await
}

/// `bulwark sync` and `bulwark check`.
async fn sync_command(
    admin: &mut Admin,
    source: &str,
    wait: bool,
    check: bool,
    deep: bool,
    json: bool,
) -> anyhow::Result<()> {
    if deep && !check {
        bail!("--deep is only for check");
    }
    if !wait && json {
        let r = admin
            .client
            .sync(pb::SyncRequest {
                source: source.into(),
                wait: false,
                check,
                deep,
            })
            .await
            .map_err(|s| admin.err(s))?
            .into_inner();
        return print_json(&json!({"source": source, "agent": r.agent, "started": true}));
    }
    let op = if check { "check" } else { "sync" };
    let shown = (wait && !json).then(|| watch_progress(admin, op, source));
    let done = admin.sync_request(source, wait, check, deep).await;
    end_progress(shown);
    if let Some((r, agent)) = done? {
        if json {
            print_json(&sync_json(&r, &agent))?;
        } else {
            println!("{}", sync_line(&r));
        }
    }
    Ok(())
}

/// JSON of a sync result, as `bulwark sync --wait --json` prints it.
pub fn sync_json(r: &pb::SyncResult, agent: &str) -> Value {
    json!({
        "source": r.source,
        "agent": agent,
        "point": r.point,
        "kind": kind_word(r.kind),
        "bytes_sent": r.bytes_sent,
        "wire_bytes": r.wire_bytes,
        "blocks_sent": r.blocks_sent,
        "blocks_scanned": r.blocks_scanned,
        "blocks_read": r.blocks_read,
        "duration_ms": r.duration_ms,
        "consistency": Consistency::from_proto(r.consistency).as_str(),
        "damaged_blocks": r.damaged_blocks,
        "warnings": r.warnings,
        "files_sent": r.files_sent,
        "bytes_read": r.bytes_read,
    })
}

/// One line about a finished sync, for people.
pub fn sync_line(r: &pb::SyncResult) -> String {
    let kind = PointKind::from_proto(r.kind);
    let mut line = if kind == Some(PointKind::Log) {
        format!(
            "{}: point {} (log): {} appended to {} files sent ({} read on the host) in {}",
            r.source,
            r.point,
            format_size(r.bytes_sent),
            r.files_sent,
            format_size(r.bytes_read),
            format_ms(r.duration_ms)
        )
    } else if kind == Some(PointKind::Check) {
        format!(
            "{}: point {} (check, {}): {} blocks compared, {} differed and were sent ({}) in {}",
            r.source,
            r.point,
            Consistency::from_proto(r.consistency).as_str(),
            r.blocks_scanned,
            r.blocks_sent,
            format_size(r.bytes_sent),
            format_ms(r.duration_ms)
        )
    } else {
        format!(
            "{}: point {} ({}, {}): {} of {} blocks sent ({}) in {}",
            r.source,
            r.point,
            kind_word(r.kind),
            Consistency::from_proto(r.consistency).as_str(),
            r.blocks_sent,
            r.blocks_scanned,
            format_size(r.bytes_sent),
            format_ms(r.duration_ms)
        )
    };
    if r.damaged_blocks > 0 {
        line.push_str(&format!(
            "; {} damaged replica blocks repaired",
            r.damaged_blocks
        ));
    }
    for w in &r.warnings {
        line.push_str(&format!("\n  warning: {}", bulwark_common::text::escape(w)));
    }
    line
}
