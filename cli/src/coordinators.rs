//! The coordinators part of `bulwark status`: each configured coordinator asked
//! on its own (`GetCoordinatorStatus`), one line each (address, reachable or why
//! not, its role), then the etcd cluster's health once.

use bulwark_proto as pb;
use serde_json::{Value, json};

use crate::admin::Admin;

/// One configured coordinator's answer, or why there is none.
pub struct Answer {
    pub address: String,
    pub reply: Result<pb::GetCoordinatorStatusResponse, String>,
}

/// Asks every coordinator of the admin's list, in list order.
pub async fn ask_all(admin: &Admin) -> Vec<Answer> {
    let mut out = Vec::new();
    for target in admin.list.targets() {
        let address = target.to_string();
        let reply = match admin.connect_one(target).await {
            Ok(mut c) => c
                .get_coordinator_status(pb::GetCoordinatorStatusRequest {})
                .await
                .map(|r| r.into_inner())
                .map_err(|s| {
                    bulwark_common::tls::explain_status(&format!("coordinator {address}"), &s)
                }),
            Err(e) => Err(format!("{e:#}")),
        };
        out.push(Answer { address, reply });
    }
    out
}

/// The etcd health of the first coordinator that reported one.
fn etcd_of(answers: &[Answer]) -> Option<&pb::GetCoordinatorStatusResponse> {
    answers
        .iter()
        .filter_map(|a| a.reply.as_ref().ok())
        .find(|r| r.backend.starts_with("etcd"))
}

/// The JSON of `status --json`: `coordinators` and `etcd` (null with sled).
pub fn to_json(answers: &[Answer]) -> (Value, Value) {
    let list = answers
        .iter()
        .map(|a| match &a.reply {
            Ok(r) => json!({
                "address": a.address, "reachable": true, "error": "",
                "name": r.coordinator, "backend": r.backend, "role": r.role,
                "leading": r.leading, "leader_id": r.leader_id, "leader_url": r.leader_url,
            }),
            Err(e) => json!({ "address": a.address, "reachable": false, "error": e }),
        })
        .collect::<Vec<_>>();
    let etcd = etcd_of(answers).map_or(Value::Null, |r| {
        json!({
            "endpoints": r.etcd_endpoints.iter().map(|m| json!({
                "endpoint": m.endpoint, "healthy": m.error.is_empty(), "error": m.error,
                "version": m.version, "raft_leader": m.raft_leader,
            })).collect::<Vec<_>>(),
            "members": r.etcd_members,
            "errors": r.etcd_errors,
        })
    });
    (Value::Array(list), etcd)
}

/// The text lines: one per coordinator, then the etcd cluster's.
pub fn print(answers: &[Answer]) {
    let esc = bulwark_common::text::escape;
    for a in answers {
        match &a.reply {
            Ok(r) => println!(
                "state        {}: {}; {}",
                a.address,
                esc(&r.role),
                esc(&r.backend)
            ),
            Err(e) => println!("state        {}: unreachable: {}", a.address, esc(e)),
        }
    }
    let Some(r) = etcd_of(answers) else {
        return;
    };
    let healthy = r
        .etcd_endpoints
        .iter()
        .filter(|m| m.error.is_empty())
        .count();
    println!(
        "etcd         {healthy} of {} endpoints answer; members: {}",
        r.etcd_endpoints.len(),
        esc(&r.etcd_members.join("; "))
    );
    for m in &r.etcd_endpoints {
        if m.error.is_empty() {
            println!(
                "  {} etcd {}{}",
                m.endpoint,
                esc(&m.version),
                if m.raft_leader { ", raft leader" } else { "" }
            );
        } else {
            println!("  {} unhealthy: {}", m.endpoint, esc(&m.error));
        }
    }
    for e in &r.etcd_errors {
        println!("  {}", esc(e));
    }
}
