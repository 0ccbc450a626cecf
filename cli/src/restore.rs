//! `bulwark restore`: a recovery point, or a moment (`--at`), written to a path on
//! an agent's host by that agent; the coordinator relays the command.

use std::path::PathBuf;

use anyhow::bail;
use bulwark_common::config::format_size;
use bulwark_common::text::escape;
use bulwark_common::time::rfc3339_ms;
use bulwark_proto as pb;
use clap::Args;
use serde_json::{Value, json};

use crate::admin::Admin;
use crate::output::print_json;
use crate::parse::parse_time;
use crate::progress::{end_progress, watch_progress};

/// `bulwark restore SOURCE --to PATH`.
#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Data source name.
    pub source: String,
    /// Point id (default: the newest).
    #[arg(long, conflicts_with = "at")]
    pub point: Option<u64>,
    /// Restore to a moment (RFC 3339, e.g. 2026-12-02T15:04:05Z): the newest
    /// volume point at or before it plus the logs up to it, from the volume and
    /// log sources of SOURCE's protection group, into the directory --to:
    /// `volume`, `logs/` and `restore.json` (which says how to replay).
    #[arg(long, value_parser = parse_time)]
    pub at: Option<i64>,
    /// Absolute path on the agent's host: a new file, or a block device; for a
    /// log source or --at, a new or empty directory.
    #[arg(long)]
    pub to: PathBuf,
    /// Agent that writes the restore (default: the source's own agent).
    #[arg(long)]
    pub agent: Option<String>,
    /// Wait until the restore is written and checked.
    #[arg(long)]
    pub wait: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `bulwark restore`.
pub async fn restore(admin: &mut Admin, a: RestoreArgs) -> anyhow::Result<()> {
    if !a.to.is_absolute() {
        bail!(
            "--to {} must be an absolute path on the agent's host",
            a.to.display()
        );
    }
    let req = pb::RestoreRequest {
        source: a.source.clone(),
        point: a.point.unwrap_or(0),
        path: a.to.display().to_string(),
        agent: a.agent.clone().unwrap_or_default(),
        wait: a.wait,
        at_ms: a.at.unwrap_or(0),
    };
    if a.wait {
        let shown = (!a.json).then(|| watch_progress(admin, "restore", &a.source));
        let r = admin.restore_request(req).await;
        end_progress(shown);
        let r = r?;
        if a.json {
            print_json(&result_json(&r))?;
        } else {
            print_result(&r);
        }
    } else {
        let r = admin
            .client
            .restore(req)
            .await
            .map_err(|s| admin.err(s))?
            .into_inner();
        if a.json {
            print_json(&json!({"source": a.source, "agent": r.agent, "started": true}))?;
        } else {
            println!("restore of {} started on agent {}", a.source, r.agent);
        }
    }
    Ok(())
}

/// A finished restore as `--json` prints it.
fn result_json(r: &pb::RestoreResult) -> Value {
    let mut v = json!({
        "source": r.source, "point": r.point, "path": r.path, "agent": r.agent,
        "bytes_written": r.bytes_written, "duration_ms": r.duration_ms,
    });
    if !r.log_source.is_empty() {
        v["log_source"] = json!(r.log_source);
        v["log_point"] = json!(r.log_point);
        v["log_files"] = json!(r.log_files);
        v["log_point_created_at"] = json!(rfc3339_ms(r.log_point_created_ms));
    }
    if r.at_ms != 0 {
        v["at"] = json!(rfc3339_ms(r.at_ms));
    }
    v
}

/// A finished restore for people: to a moment, of a log point, or of a volume
/// point.
fn print_result(r: &pb::RestoreResult) {
    if r.at_ms != 0 {
        println!(
            "{}: restored to {} in {} on agent {} ({} in {:.1} s), every byte checked",
            escape(&r.source),
            rfc3339_ms(r.at_ms),
            escape(&r.path),
            r.agent,
            format_size(r.bytes_written),
            r.duration_ms as f64 / 1000.0
        );
        if r.point != 0 {
            println!("  volume  point {} -> {}/volume", r.point, escape(&r.path));
        }
        if !r.log_source.is_empty() {
            println!(
                "  logs    {} point {} (shipped {}), {} files -> {}/logs",
                escape(&r.log_source),
                r.log_point,
                rfc3339_ms(r.log_point_created_ms),
                r.log_files,
                escape(&r.path)
            );
        }
        println!(
            "  see {}/restore.json for how to replay the logs",
            escape(&r.path)
        );
    } else if !r.log_source.is_empty() {
        println!(
            "{}: log point {} restored to {} on agent {} ({} files, {} in {:.1} s), every byte checked",
            escape(&r.source),
            r.point,
            escape(&r.path),
            r.agent,
            r.log_files,
            format_size(r.bytes_written),
            r.duration_ms as f64 / 1000.0
        );
    } else {
        println!(
            "{}: point {} restored to {} on agent {} ({} in {:.1} s), every block checked",
            escape(&r.source),
            r.point,
            escape(&r.path),
            r.agent,
            format_size(r.bytes_written),
            r.duration_ms as f64 / 1000.0
        );
    }
}
