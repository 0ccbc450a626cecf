//! `bulwark alerts`: what nodes, agents and the coordinator raised.

use bulwark_common::time::rfc3339_ms;
use bulwark_proto as pb;
use clap::Args;
use serde_json::json;

use crate::admin::Admin;
use crate::output::listing;

/// `bulwark alerts`.
#[derive(Args, Debug)]
pub struct AlertsArgs {
    /// Also resolved alerts.
    #[arg(long)]
    pub all: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `bulwark alerts`.
pub async fn alerts(admin: &mut Admin, a: AlertsArgs) -> anyhow::Result<()> {
    let alerts = admin
        .client
        .list_alerts(pb::ListAlertsRequest { all: a.all })
        .await
        .map_err(|s| admin.err(s))?
        .into_inner()
        .alerts;
    listing(
        &alerts,
        a.json,
        &["SEVERITY", "SUBJECT", "SINCE", "STATE", "MESSAGE"],
        |a| {
            json!({
                "key": a.key, "severity": a.severity, "subject": a.subject,
                "message": a.message, "origin": a.origin,
                "first_seen": rfc3339_ms(a.first_seen_ms),
                "last_seen": rfc3339_ms(a.last_seen_ms),
                "resolved": a.resolved,
                "resolved_at": if a.resolved { rfc3339_ms(a.resolved_ms) } else { String::new() },
            })
        },
        |a| {
            vec![
                a.severity.clone(),
                a.subject.clone(),
                rfc3339_ms(a.first_seen_ms),
                if a.resolved { "resolved" } else { "open" }.into(),
                a.message.clone(),
            ]
        },
    )
}
