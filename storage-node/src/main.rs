//! `bulwark-node`: the storage node daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use bulwark_common::telemetry::{self, LogFormat};
use bulwark_node::config::NodeConfig;
use clap::Parser;

/// Bulwark storage node: keeps replicas and recovery points of the data sources the
/// coordinator assigns to it, in the storage pool named in its config.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// Path of node.toml (see deploy/examples/node.toml).
    #[arg(long, short)]
    config: PathBuf,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let args = Args::parse();
    telemetry::init(args.log_format, "info");
    let cfg = match NodeConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bulwark-node: {e}");
            return ExitCode::from(2);
        }
    };
    let result = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|rt| {
            rt.block_on(async {
                let listener = tokio::net::TcpListener::bind(cfg.listen)
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "cannot listen on {} (key `listen` in {}): {e}",
                            cfg.listen,
                            args.config.display()
                        )
                    })?;
                bulwark_node::server::run(cfg, listener, bulwark_common::shutdown::on_signal())
                    .await
            })
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bulwark-node: {e:#}");
            ExitCode::FAILURE
        }
    }
}
