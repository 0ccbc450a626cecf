//! `bulwark-node`: the storage node daemon.

use std::process::ExitCode;

use bulwark_common::daemon::{self, DaemonArgs};
use bulwark_node::config::NodeConfig;
use clap::Parser;

/// Bulwark storage node: keeps replicas and recovery points of the data sources the
/// coordinator assigns to it, in the storage pool named in its config.
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
        return daemon::enroll("bulwark-node", bulwark_common::tls::Role::Node, e);
    }
    let args = parsed.daemon;
    let path = args.config.clone().unwrap_or_default();
    daemon::main(
        "bulwark-node",
        args,
        NodeConfig::load,
        async move |cfg, shutdown| {
            let listener = daemon::bind(cfg.listen, &path)
                .await
                .map_err(anyhow::Error::msg)?;
            bulwark_node::server::run(cfg, listener, shutdown).await
        },
    )
}
