//! `bulwark points` and `bulwark verify`: a data source's recovery points, and a
//! re-read of its stored data on the node against every checksum.

use anyhow::{anyhow, bail};
use bulwark_common::config::format_size;
use bulwark_common::point::{Consistency, PointKind};
use bulwark_common::time::rfc3339_ms;
use bulwark_proto as pb;
use clap::Args;
use serde_json::json;

use crate::admin::Admin;
use crate::json::point_json;
use crate::output::{kind_word, listing, print_json};

/// `bulwark points SOURCE`.
#[derive(Args, Debug)]
pub struct PointsArgs {
    /// Data source name.
    pub source: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `bulwark verify SOURCE`.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Data source name.
    pub source: String,
    /// Only this point (and the data it depends on); default: every point.
    #[arg(long)]
    pub point: Option<u64>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `bulwark points`.
pub async fn points(admin: &mut Admin, a: PointsArgs) -> anyhow::Result<()> {
    let points = admin.points(&a.source).await?;
    listing(
        &points,
        a.json,
        &[
            "ID",
            "CREATED",
            "CONSISTENCY",
            "KIND",
            "BLOCKS",
            "CHANGED",
            "LOCKED UNTIL",
        ],
        point_json,
        |p| {
            vec![
                p.id.to_string(),
                rfc3339_ms(p.created_at_ms),
                Consistency::from_proto(p.consistency).as_str().into(),
                kind_word(p.kind).into(),
                if PointKind::from_proto(p.kind) == Some(PointKind::Log) {
                    format!("{} files", p.files_changed)
                } else {
                    p.blocks_changed.to_string()
                },
                format_size(p.bytes_changed),
                if p.locked_until_ms > 0 {
                    rfc3339_ms(p.locked_until_ms)
                } else {
                    "-".into()
                },
            ]
        },
    )
}

/// `bulwark verify`; fails when damage remains.
pub async fn verify(admin: &mut Admin, a: VerifyArgs) -> anyhow::Result<()> {
    let r = admin
        .client
        .verify(pb::VerifyRequest {
            source: a.source.clone(),
            point: a.point.unwrap_or(0),
        })
        .await
        .map_err(|s| admin.err(s))?
        .into_inner()
        .report
        .ok_or_else(|| anyhow!("the coordinator returned no report"))?;
    let left: Vec<u64> = r.damaged_points.iter().map(|p| p.id).collect();
    if a.json {
        print_json(&json!({
            "source": r.source, "blocks_checked": r.blocks_checked,
            "bytes_read": r.bytes_read, "duration_ms": r.duration_ms,
            "damaged_replica_blocks": r.damaged_replica_blocks,
            "repaired_blocks": r.repaired_blocks, "repair_error": r.repair_error,
            "damaged_points": r.damaged_points.iter().map(|p| json!({
                "id": p.id, "damaged_blocks": p.damaged_blocks,
            })).collect::<Vec<_>>(),
        }))?;
    } else {
        print_verify(&r, left.is_empty());
    }
    if !left.is_empty() {
        bail!("{}: points {left:?} are damaged", a.source);
    }
    Ok(())
}

/// A verify report for people.
fn print_verify(r: &pb::VerifyReport, intact: bool) {
    println!(
        "{}: {} blocks checked ({} read in {:.1} s)",
        r.source,
        r.blocks_checked,
        format_size(r.bytes_read),
        r.duration_ms as f64 / 1000.0
    );
    if !r.damaged_replica_blocks.is_empty() {
        println!(
            "  {} replica block(s) were damaged; {} re-sent by the agent{}",
            r.damaged_replica_blocks.len(),
            r.repaired_blocks,
            if r.repair_error.is_empty() {
                String::new()
            } else {
                format!(" ({})", r.repair_error)
            }
        );
    }
    for p in &r.damaged_points {
        println!(
            "  point {} is damaged: blocks {:?} cannot be restored",
            p.id, p.damaged_blocks
        );
    }
    if intact {
        println!("  every point is intact");
    }
}
