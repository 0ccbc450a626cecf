//! `bulwark-agent`: the daemon on each protected host.

use std::process::ExitCode;

use bulwark_agent::config::AgentConfig;
use bulwark_common::daemon::{self, DaemonArgs};
use clap::Parser;

/// Bulwark agent: protects this host's volumes by sending their changed blocks to a
/// storage node, and restores recovery points on command. Dials out only.
#[derive(Parser)]
#[command(version, about, long_about = None, subcommand_negates_reqs = true)]
struct Args {
    #[command(flatten)]
    daemon: DaemonArgs,
    #[command(subcommand)]
    command: Option<daemon::DaemonCommand>,
}

fn main() -> ExitCode {
    let parsed = Args::parse();
    if let Some(daemon::DaemonCommand::Enroll(e)) = parsed.command {
        return daemon::enroll("bulwark-agent", bulwark_common::tls::Role::Agent, e);
    }
    let args = parsed.daemon;
    daemon::main(
        "bulwark-agent",
        args,
        AgentConfig::load,
        bulwark_agent::server::run,
    )
}
