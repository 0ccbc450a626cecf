//! `bulwark pki`: make the fleet CA and sign certificates, offline (no
//! coordinator needed).

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context;
use bulwark_common::tls::Role;
use clap::Subcommand;

/// `bulwark pki`.
#[derive(Subcommand, Debug)]
pub enum PkiCommand {
    /// Create a fleet CA (ca.crt, ca.key) in DIR.
    Init {
        /// Directory for the CA files.
        #[arg(long)]
        dir: PathBuf,
        /// Trust domain of the fleet (in every SPIFFE id).
        #[arg(long, default_value = "bulwark.local")]
        trust_domain: String,
    },
    /// Sign a certificate for one process: writes DIR/NAME.crt and DIR/NAME.key.
    Issue {
        /// Directory holding ca.crt and ca.key.
        #[arg(long)]
        dir: PathBuf,
        /// coordinator, node, agent, admin or officer (lifts governance locks;
        /// keep its key apart from the admin's).
        #[arg(long, value_parser = |s: &str| s.parse::<Role>())]
        role: Role,
        /// Name of the process (node name, agent name, ...).
        #[arg(long)]
        name: String,
        /// DNS name others dial this server by (repeatable).
        #[arg(long)]
        dns: Vec<String>,
        /// IP address others dial this server by (repeatable).
        #[arg(long)]
        ip: Vec<IpAddr>,
        /// Validity in days.
        #[arg(long, default_value_t = 365, allow_negative_numbers = true)]
        days: i64,
    },
}

/// Runs a `bulwark pki` command.
pub fn run(cmd: PkiCommand) -> anyhow::Result<()> {
    match cmd {
        PkiCommand::Init { dir, trust_domain } => {
            let crt = bulwark_common::pki::init(&dir, &trust_domain)?;
            println!(
                "fleet CA for trust domain {trust_domain} written to {} (key: {})",
                crt.display(),
                dir.join("ca.key").display()
            );
            println!("keep ca.key offline; copy only ca.crt to the fleet's hosts");
        }
        PkiCommand::Issue {
            dir,
            role,
            name,
            dns,
            ip,
            days,
        } => {
            let issued = bulwark_common::pki::issue(
                &dir,
                &bulwark_common::pki::LeafRequest {
                    role,
                    name,
                    dns,
                    ips: ip,
                    days,
                },
            )
            .with_context(|| {
                format!(
                    "cannot issue a certificate with the CA in {}",
                    dir.display()
                )
            })?;
            println!(
                "{} signed: {} (key {})",
                issued.spiffe_id,
                issued.cert.display(),
                issued.key.display()
            );
        }
    }
    Ok(())
}
