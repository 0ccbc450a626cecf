//! `bulwark token create`: one-time enrollment tokens with which a host gets its
//! certificate (the coordinator's `enroll` module signs it).

use std::net::IpAddr;

use bulwark_common::time::rfc3339_ms;
use bulwark_proto as pb;
use clap::{Args, Subcommand};
use serde_json::json;

use crate::admin::Admin;
use crate::output::print_json;
use crate::parse::parse_duration_ms;

/// `bulwark token`.
#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Make a one-time token with which a host gets its certificate
    /// (`bulwark-agent enroll --coordinator https://HOST:7442 --token T`): it is
    /// printed once and can be used once, before it expires.
    Create(CreateArgs),
}

/// `bulwark token create --role ROLE --name NAME`.
#[derive(Args, Debug)]
pub struct CreateArgs {
    /// `agent` or `node`.
    #[arg(long)]
    role: String,
    /// The name the certificate will carry (the agent's or node's `name`).
    #[arg(long)]
    name: String,
    /// How long the token may be used (`1h`).
    #[arg(long, value_parser = parse_duration_ms, default_value = "1h")]
    ttl: u64,
    /// Nodes: a DNS name agents dial it by, put in its certificate
    /// (repeatable). A node's names come from here, never from the node.
    #[arg(long)]
    dns: Vec<String>,
    /// Nodes: an IP address agents dial it by (repeatable).
    #[arg(long)]
    ip: Vec<IpAddr>,
    #[arg(long)]
    json: bool,
}

/// Runs a `bulwark token` command.
pub async fn run(admin: &mut Admin, cmd: TokenCommand) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Create(a) => create(admin, a).await,
    }
}

/// `bulwark token create`: the token on standard output, what it is for on
/// standard error.
async fn create(admin: &mut Admin, a: CreateArgs) -> anyhow::Result<()> {
    let CreateArgs {
        role,
        name,
        ttl,
        dns,
        ip,
        json,
    } = a;
    let r = admin
        .client
        .create_token(pb::CreateTokenRequest {
            role: role.clone(),
            name: name.clone(),
            ttl_ms: ttl,
            dns,
            ips: ip.iter().map(IpAddr::to_string).collect(),
        })
        .await
        .map_err(|s| admin.err(s))?
        .into_inner();
    if json {
        print_json(&json!({
            "token": r.token, "role": role, "name": name,
            "expires_at": rfc3339_ms(r.expires_at_ms),
        }))?;
    } else {
        println!("{}", r.token);
        eprintln!(
            "one-time token for {role} {name}, valid until {}",
            rfc3339_ms(r.expires_at_ms)
        );
    }
    Ok(())
}
