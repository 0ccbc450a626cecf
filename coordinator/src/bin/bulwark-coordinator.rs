//! `bulwark-coordinator`: the fleet's coordinator daemon, and `migrate` (its sled
//! state copied into etcd).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bulwark_common::daemon::{self, DaemonArgs};
use bulwark_coordinator::config::CoordinatorConfig;
use bulwark_coordinator::migrate;
use bulwark_coordinator::state::etcd::{DEFAULT_TIMEOUT, EtcdTls};
use clap::{Parser, Subcommand};

/// Bulwark coordinator: registers storage nodes and agents, places each data source
/// on a node, keeps the fleet's registry, and relays admin commands to agents.
#[derive(Parser)]
#[command(version, about, long_about = None, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    daemon: Option<DaemonArgs>,
}

#[derive(Subcommand)]
enum Command {
    /// Copies a stopped coordinator's sled state into an empty etcd prefix, then
    /// reads every key back and compares it.
    Migrate {
        /// sled:DIR, DIR being the coordinator's data_dir (the database is DIR/registry).
        #[arg(long)]
        from: String,
        /// etcd:URL[,URL...], e.g. etcd:https://10.0.0.1:2379,https://10.0.0.2:2379.
        #[arg(long)]
        to: String,
        /// The key prefix, as `[state] prefix` will be.
        #[arg(long, default_value = "/bulwark")]
        prefix: String,
        /// CA of the etcd members' certificates (PEM), for https endpoints.
        #[arg(long, requires_all = ["cert", "key"])]
        ca: Option<PathBuf>,
        /// Client certificate for etcd (PEM).
        #[arg(long, requires_all = ["ca", "key"])]
        cert: Option<PathBuf>,
        /// Its private key (PEM).
        #[arg(long, requires_all = ["ca", "cert"])]
        key: Option<PathBuf>,
        /// Deadline of each etcd request, in seconds.
        #[arg(long, default_value_t = DEFAULT_TIMEOUT.as_secs())]
        timeout: u64,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Migrate {
        from,
        to,
        prefix,
        ca,
        cert,
        key,
        timeout,
    }) = args.command
    {
        let tls = match (ca, cert, key) {
            (Some(ca), Some(cert), Some(key)) => Some(EtcdTls { ca, cert, key }),
            _ => None,
        };
        let m = migrate::parse_from(&from).and_then(|data_dir| {
            migrate::parse_to(&to, &prefix, tls, Duration::from_secs(timeout.max(1)))
                .map(|etcd| migrate::Migration { data_dir, etcd })
        });
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                eprintln!("bulwark-coordinator migrate: {e}");
                return ExitCode::from(2);
            }
        };
        return match migrate::run(&m) {
            Ok(report) => {
                print!("{}", migrate::summary(&m, &report));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("bulwark-coordinator migrate: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let Some(args) = args.daemon else {
        eprintln!("bulwark-coordinator: give --config FILE (or a command: migrate)");
        return ExitCode::from(2);
    };
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
