//! `bulwark revoke ROLE NAME` and `bulwark revocations`: the CLI's side of the
//! fleet's revocation list (the coordinator's `revocation` module).

use anyhow::anyhow;
use bulwark_common::time::rfc3339_ms;
use bulwark_proto as pb;
use clap::Args;
use serde_json::{Value, json};

use crate::admin::Admin;

/// `bulwark revoke ROLE NAME`.
#[derive(Args, Debug)]
pub struct RevokeArgs {
    /// coordinator, node, agent, admin or officer.
    pub role: String,
    /// The name in the certificate (node or agent name, ...).
    pub name: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// One entry as `--json` prints it.
pub fn revocation_json(r: &pb::Revocation) -> Value {
    json!({
        "role": r.role,
        "name": r.name,
        "revoked_at": rfc3339_ms(r.revoked_at_ms),
        "by": r.by,
        "serials": r.serials,
    })
}

fn print(list: &[pb::Revocation], json: bool) -> anyhow::Result<()> {
    if json {
        let v: Vec<Value> = list.iter().map(revocation_json).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if list.is_empty() {
        println!("nothing is revoked");
        return Ok(());
    }
    println!(
        "{:<12} {:<24} {:<30} {:<12} SERIALS",
        "ROLE", "NAME", "REVOKED AT", "BY"
    );
    for r in list {
        println!(
            "{:<12} {:<24} {:<30} {:<12} {}",
            r.role,
            r.name,
            rfc3339_ms(r.revoked_at_ms),
            r.by,
            if r.serials.is_empty() {
                "-".to_string()
            } else {
                r.serials.join(",")
            }
        );
    }
    Ok(())
}

/// `bulwark revoke`.
pub async fn revoke(admin: &mut Admin, a: RevokeArgs) -> anyhow::Result<()> {
    let json = a.json;
    let r = admin
        .client
        .revoke(pb::RevokeRequest {
            role: a.role,
            name: a.name,
        })
        .await
        .map_err(|s| admin.err(s))?
        .into_inner();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&vec![revocation_json(&r)])?
        );
    } else {
        println!(
            "revoked {} {} as of {}: its certificates are refused and its connections cut within a heartbeat; a certificate issued for the name from now on (a new token) is accepted",
            r.role,
            r.name,
            rfc3339_ms(r.revoked_at_ms)
        );
        if !r.serials.is_empty() {
            println!("serials in the CRL: {}", r.serials.join(", "));
        }
    }
    Ok(())
}

/// `bulwark revocations`.
pub async fn list(admin: &mut Admin, json: bool) -> anyhow::Result<()> {
    let l = admin
        .client
        .list_revocations(pb::ListRevocationsRequest {})
        .await
        .map_err(|s| admin.err(s))?
        .into_inner();
    print(&l.revocations, json).map_err(|e| anyhow!("{e}"))
}
