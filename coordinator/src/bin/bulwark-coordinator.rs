//! `bulwark-coordinator`: the fleet's coordinator daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use bulwark_common::telemetry::{self, LogFormat};
use bulwark_coordinator::config::CoordinatorConfig;
use clap::Parser;

/// Bulwark coordinator: registers storage nodes and agents, places each data source
/// on a node, keeps the fleet's registry, and relays admin commands to agents.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// Path of coordinator.toml (see deploy/examples/coordinator.toml).
    #[arg(long, short)]
    config: PathBuf,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let args = Args::parse();
    telemetry::init(args.log_format, "info");
    let cfg = match CoordinatorConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bulwark-coordinator: {e}");
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
                bulwark_coordinator::server::run(
                    cfg,
                    listener,
                    bulwark_common::shutdown::on_signal(),
                )
                .await
            })
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bulwark-coordinator: {e:#}");
            ExitCode::FAILURE
        }
    }
}
