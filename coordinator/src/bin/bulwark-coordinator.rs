//! `bulwark-coordinator`: the fleet's coordinator daemon.

use std::process::ExitCode;

use bulwark_common::daemon::{self, DaemonArgs};
use bulwark_coordinator::config::CoordinatorConfig;
use clap::Parser;

/// Bulwark coordinator: registers storage nodes and agents, places each data source
/// on a node, keeps the fleet's registry, and relays admin commands to agents.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Args {
    #[command(flatten)]
    daemon: DaemonArgs,
}

fn main() -> ExitCode {
    let args = Args::parse().daemon;
    let path = args.config.clone().unwrap_or_default();
    daemon::main(
        "bulwark-coordinator",
        args,
        CoordinatorConfig::load,
        async move |cfg, shutdown| {
            let listener = daemon::bind(cfg.listen, &path)
                .await
                .map_err(anyhow::Error::msg)?;
            bulwark_coordinator::server::run(cfg, listener, shutdown).await
        },
    )
}
