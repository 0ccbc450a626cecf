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
    #[arg(long, short, required = true)]
    pub config: Option<PathBuf>,
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
    crate::malloc::tune();
    let Some(config_path) = args.config.clone() else {
        eprintln!("{binary}: --config FILE is required");
        return ExitCode::from(2);
    };
    let cfg = match load(&config_path) {
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
                    config_path.display()
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

/// `bulwark-agent enroll` / `bulwark-node enroll`.
#[derive(Debug, clap::Subcommand)]
pub enum DaemonCommand {
    /// Get this host's certificate with a one-time token (`bulwark token create`):
    /// the key is made here and never leaves; the coordinator signs a request for
    /// it. Writes DIR/ca.crt, DIR/NAME.crt and DIR/NAME.key (0600).
    Enroll(EnrollArgs),
}

/// Arguments of `enroll`.
#[derive(Debug, clap::Args)]
pub struct EnrollArgs {
    /// The coordinator's enrollment address (`https://host:7442`, its
    /// `[enrollment] listen`).
    #[arg(long)]
    pub coordinator: String,
    /// The token (or set BULWARK_TOKEN, which keeps it out of the process list).
    #[arg(long, env = "BULWARK_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Where to write the files.
    #[arg(long, default_value = "/etc/bulwark/pki")]
    pub dir: PathBuf,
    /// No longer taken: a node's DNS names come from its token (`bulwark token
    /// create --role node --name N --dns H --ip A`), never from the host itself.
    #[arg(long, hide = true)]
    pub dns: Vec<String>,
    /// No longer taken (see --dns).
    #[arg(long, hide = true)]
    pub ip: Vec<String>,
}

/// Runs `enroll` for a process of `role`; prints what it wrote and the `[tls]`
/// table to put in the config.
pub fn enroll(binary: &str, role: crate::tls::Role, args: EnrollArgs) -> ExitCode {
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{binary}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !args.dns.is_empty() || !args.ip.is_empty() {
        eprintln!(
            "{binary}: --dns/--ip are not taken at enrollment: a node's names come from its token; make one with `bulwark token create --role node --name NAME --dns HOST --ip ADDRESS`"
        );
        return ExitCode::from(2);
    }
    match rt.block_on(crate::enroll::enroll(
        &args.coordinator,
        &args.token,
        role,
        &args.dir,
    )) {
        Ok(e) => {
            println!("enrolled as {role} {}; wrote:", e.name);
            println!(
                "  {}
  {}
  {} (private, 0600)",
                e.ca.display(),
                e.cert.display(),
                e.key.display()
            );
            println!("\nin the config (name = \"{}\"):\n[tls]", e.name);
            println!(
                "ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"",
                e.ca.display(),
                e.cert.display(),
                e.key.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{binary}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A listen address that could not be bound, and the config file that names it.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} (key `listen` in {config}): {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    pub config: std::path::PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Binds a daemon's listen address; the error names the key and the file.
pub async fn bind(addr: SocketAddr, config: &Path) -> Result<tokio::net::TcpListener, BindError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| BindError {
            addr,
            config: config.to_path_buf(),
            source,
        })
}
