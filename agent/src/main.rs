//! `bulwark-agent`: the daemon on each protected host.

use std::path::PathBuf;
use std::process::ExitCode;

use bulwark_agent::config::AgentConfig;
use bulwark_common::telemetry::{self, LogFormat};
use clap::Parser;

/// Bulwark agent: protects this host's volumes by sending their changed blocks to a
/// storage node, and restores recovery points on command. Dials out only.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// Path of agent.toml (see deploy/examples/agent.toml).
    #[arg(long, short)]
    config: PathBuf,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let args = Args::parse();
    telemetry::init(args.log_format, "info");
    let cfg = match AgentConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bulwark-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let result = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|rt| {
            // on_signal spawns a task: it must run inside the runtime.
            rt.block_on(async {
                bulwark_agent::server::run(cfg, bulwark_common::shutdown::on_signal()).await
            })
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bulwark-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
