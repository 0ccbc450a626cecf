//! `bulwark forecast`: the coordinator's capacity forecast per data source (its
//! recovery-point space against its allocation), protection group and node (the
//! sums of theirs) and pool disk (used against capacity): used, limit, growth per
//! day and days until full, or `-` where there is no forecast.

use bulwark_common::config::format_size;
use bulwark_proto as pb;
use serde_json::{Value, json};

use crate::admin::Admin;
use crate::output::{print_json, table};

/// `bulwark forecast`.
pub async fn forecast(admin: &mut Admin, json: bool) -> anyhow::Result<()> {
    let r = admin
        .client
        .forecast(pb::ForecastRequest {})
        .await
        .map_err(|s| admin.err(s))?
        .into_inner();
    if json {
        return print_json(&forecast_json(&r));
    }
    let mut rows = Vec::new();
    for (what, list) in [
        ("source", &r.sources),
        ("group", &r.groups),
        ("node", &r.nodes),
        ("disk", &r.disks),
    ] {
        rows.extend(list.iter().map(|f| row(what, f, r.warn_days)));
    }
    table(
        &[
            "KIND",
            "NAME",
            "NODE",
            "USED",
            "LIMIT",
            "GROWTH/DAY",
            "FULL IN",
            "",
        ],
        &rows,
    );
    println!(
        "trend over the last {}; warning under {} days",
        bulwark_common::time::format_duration_ms(r.window_ms),
        r.warn_days
    );
    Ok(())
}

/// The whole answer as JSON: `{warn_days, window_ms, sources, groups, nodes, disks}`.
pub fn forecast_json(r: &pb::ForecastResponse) -> Value {
    let list = |v: &[pb::CapacityForecast]| v.iter().map(row_json).collect::<Vec<_>>();
    json!({
        "warn_days": r.warn_days,
        "window_ms": r.window_ms,
        "sources": list(&r.sources),
        "groups": list(&r.groups),
        "nodes": list(&r.nodes),
        "disks": list(&r.disks),
    })
}

/// One forecast: `growth_bytes_per_day` and `days_until_full` are null where
/// there is no trend or no forecast.
fn row_json(f: &pb::CapacityForecast) -> Value {
    json!({
        "name": f.name, "node": f.node,
        "used_bytes": f.used_bytes, "limit_bytes": f.limit_bytes,
        "growth_bytes_per_day": f.has_trend.then_some(f.growth_bytes_per_day),
        "days_until_full": f.has_days.then_some(f.days_until_full),
        "samples": f.samples,
    })
}

fn row(what: &str, f: &pb::CapacityForecast, warn_days: f64) -> Vec<String> {
    let growth = if !f.has_trend {
        "-".to_string()
    } else if f.growth_bytes_per_day < 0.0 {
        format!("-{}", format_size((-f.growth_bytes_per_day) as u64))
    } else {
        format_size(f.growth_bytes_per_day as u64)
    };
    let (days, mark) = if f.has_days {
        let d = f.days_until_full;
        (
            if d >= 3650.0 {
                "3650+ d".into()
            } else {
                format!("{d:.1} d")
            },
            if d < warn_days { "WARN" } else { "" },
        )
    } else {
        ("-".into(), "")
    };
    vec![
        what.into(),
        f.name.clone(),
        if f.node.is_empty() || what == "node" {
            "-".into()
        } else {
            f.node.clone()
        },
        format_size(f.used_bytes),
        format_size(f.limit_bytes),
        growth,
        days,
        mark.into(),
    ]
}
