//! `bulwark-agent`: the daemon on each protected host.

use std::process::ExitCode;

use bulwark_agent::config::AgentConfig;
use bulwark_common::daemon::{self, DaemonArgs};
use clap::Parser;

/// Bulwark agent: protects this host's volumes by sending their changed blocks to a
/// storage node, and restores recovery points on command. Dials out only.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Args {
    #[command(flatten)]
    daemon: DaemonArgs,
}

fn main() -> ExitCode {
    let args = Args::parse().daemon;
    daemon::main(
        "bulwark-agent",
        args,
        AgentConfig::load,
        bulwark_agent::server::run,
    )
}
