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

/// What `main` needs of a daemon's checked config.
pub trait DaemonConfig {
    /// Its `otlp_endpoint` and `metrics_listen`.
    fn telemetry(&self) -> &crate::config::TelemetryConfig;
}

/// Loads the config with `load`, then runs `run(config, shutdown)` to completion,
/// with OpenTelemetry export and the Prometheus endpoint when configured.
pub fn main<C, F, E>(
    binary: &str,
    args: DaemonArgs,
    load: impl FnOnce(&Path) -> Result<C, ConfigError>,
    run: impl FnOnce(C, CancellationToken) -> F,
) -> ExitCode
where
    C: DaemonConfig,
    F: Future<Output = Result<(), E>>,
    E: Display,
{
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
    let tel = cfg.telemetry().clone();
    // The OTLP exporters' channels live on the runtime: set up inside it.
    let telemetry = {
        let _rt = rt.enter();
        telemetry::init(
            args.log_format,
            "info",
            binary,
            telemetry::otlp_endpoint(tel.otlp_endpoint.as_deref()),
        )
    };
    // The signal handler is a task: it must be spawned inside the runtime.
    let result = rt.block_on(async {
        let shutdown = crate::shutdown::on_signal();
        if let Some(addr) = tel.metrics_listen {
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                format!(
                    "cannot listen on {addr} (key `metrics_listen` in {}): {e}",
                    args.config.display()
                )
            })?;
            tracing::info!(%addr, "serving Prometheus metrics at /metrics");
            tokio::spawn(crate::metrics::serve(listener, shutdown.clone()));
        }
        run(cfg, shutdown).await.map_err(|e| format!("{e:#}"))
    });
    {
        let _rt = rt.enter();
        telemetry.shutdown();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{binary}: {e}");
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
