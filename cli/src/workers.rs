//! `bulwark workers [--node N]`: a daemon's background loops (heartbeats, the
//! schedule, scrubs, renewal, ...) with their state, last run and last error, read
//! from the coordinator or, with `--node`, from that storage node itself.

use bulwark_common::config::TlsFiles;
use bulwark_common::time::{format_duration_ms, rfc3339_ms};
use bulwark_common::tls::{self, TlsIdentity};
use bulwark_proto as pb;
use clap::Args;
use serde_json::json;

use crate::admin::Admin;
use crate::output::listing;

/// `bulwark workers`.
#[derive(Args, Debug)]
pub struct WorkersArgs {
    /// Ask this storage node instead of the coordinator.
    #[arg(long)]
    pub node: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `bulwark workers`.
pub async fn workers(admin: &mut Admin, files: &TlsFiles, a: WorkersArgs) -> anyhow::Result<()> {
    let request = pb::ListWorkersRequest {};
    let list = match &a.node {
        None => admin
            .client
            .list_workers(request)
            .await
            .map_err(|s| admin.err(s))?
            .into_inner(),
        Some(node) => node_workers(admin, files, node, request).await?,
    };
    listing(
        &list.workers,
        a.json,
        &[
            "WORKER",
            "STATE",
            "EVERY",
            "RUNS",
            "FAILED",
            "LAST RUN",
            "TOOK",
            "LAST ERROR",
        ],
        |w| {
            json!({
                "daemon": list.daemon, "name": w.name, "state": w.state,
                "period_ms": w.period_ms, "runs": w.runs, "failures": w.failures,
                "last_run": when(w.last_run_ms), "last_duration_ms": w.last_duration_ms,
                "last_ok": when(w.last_ok_ms), "last_error_at": when(w.last_error_ms),
                "last_error": w.last_error,
            })
        },
        row,
    )
}

fn when(ms: i64) -> Option<String> {
    (ms > 0).then(|| rfc3339_ms(ms))
}

fn row(w: &pb::WorkerInfo) -> Vec<String> {
    let error = match when(w.last_error_ms) {
        Some(at) => format!("{at}: {}", w.last_error),
        None => "-".to_string(),
    };
    vec![
        w.name.clone(),
        w.state.clone(),
        format_duration_ms(w.period_ms),
        w.runs.to_string(),
        w.failures.to_string(),
        when(w.last_run_ms).unwrap_or_else(|| "never".to_string()),
        if w.runs == 0 {
            "-".to_string()
        } else {
            format!("{} ms", w.last_duration_ms)
        },
        error,
    ]
}

/// Asks node `name` (found through the coordinator) for its workers, checking it
/// presents that node's certificate.
async fn node_workers(
    admin: &mut Admin,
    files: &TlsFiles,
    name: &str,
    request: pb::ListWorkersRequest,
) -> anyhow::Result<pb::ListWorkersResponse> {
    let nodes = admin
        .client
        .list_nodes(pb::ListNodesRequest {})
        .await
        .map_err(|s| admin.err(s))?
        .into_inner()
        .nodes;
    let Some(node) = nodes.iter().find(|n| n.name == name) else {
        let known: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        anyhow::bail!("no storage node {name:?}; the fleet has {known:?}");
    };
    let identity = TlsIdentity::load(files)?;
    let answer = crate::admin::node_client(&identity, name, &node.address)
        .await?
        .list_workers(request)
        .await
        .map_err(|st| anyhow::anyhow!(tls::explain_status(&format!("node {name}"), &st)))?;
    Ok(answer.into_inner())
}
