//! What the three daemons' `main` functions share: the command line
//! (`--config FILE --log-format text|json`), config errors reported with the file and
//! key and exit code 2, a Tokio runtime, the shutdown signal, and run errors reported
//! with their cause chain and exit code 1.

use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use crate::config::ConfigError;
use crate::telemetry::{self, LogFormat};

/// The command line every daemon takes.
#[derive(Debug, clap::Args)]
pub struct DaemonArgs {
    /// Path of the daemon's TOML config (see deploy/examples/).
    #[arg(long, short)]
    pub config: PathBuf,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Loads the config with `load`, then runs `run(config, shutdown)` to completion.
pub fn main<C, F, E>(
    binary: &str,
    args: DaemonArgs,
    load: impl FnOnce(&Path) -> Result<C, ConfigError>,
    run: impl FnOnce(C, CancellationToken) -> F,
) -> ExitCode
where
    F: Future<Output = Result<(), E>>,
    E: Display,
{
    telemetry::init(args.log_format, "info");
    let cfg = match load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{binary}: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{binary}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The signal handler is a task: it must be spawned inside the runtime.
    match rt.block_on(async { run(cfg, crate::shutdown::on_signal()).await }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{binary}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Binds a daemon's listen address; the error names the key and the file.
pub async fn bind(addr: SocketAddr, config: &Path) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        format!(
            "cannot listen on {addr} (key `listen` in {}): {e}",
            config.display()
        )
    })
}
