//! `coordinator.toml`: what an operator writes, and its checked runtime form.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bulwark_common::config::{ConfigError, HumanDuration, TlsFiles, resolve};
use serde::Deserialize;

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorToml {
    /// Address to listen on for nodes, agents and the CLI (`127.0.0.1:7440`).
    pub listen: String,
    /// Where the registry (sled) lives.
    pub data_dir: PathBuf,
    /// A node that has not reported for this long is `down` and gets no new sources.
    #[serde(default = "default_node_timeout")]
    pub node_timeout: HumanDuration,
    /// How often every data source's stored data is re-read and checked on its node
    /// (a scrub, as `bulwark verify`, repairing what the agent still has). `"0"`
    /// turns it off. Optional; default `"7d"`.
    #[serde(default = "default_scrub_interval")]
    pub scrub_interval: HumanDuration,
    /// `bulwark rebalance` moves data sources until the fill ratios of the up nodes
    /// are within this many percent of each other. Optional; default 10.
    #[serde(default = "default_rebalance_spread")]
    pub rebalance_spread_percent: f64,
    /// Most syncs of protection groups one node runs at once; the rest wait their
    /// turn. Optional; default 4.
    #[serde(default = "default_max_syncs")]
    pub max_syncs_per_node: u32,
    /// OTLP/gRPC endpoint for traces and metrics (`http://127.0.0.1:4317`);
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` wins. Unset: no export.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// Serve Prometheus text at `http://ADDR/metrics` (`127.0.0.1:9464`). Unset: off.
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// The fleet CA and the coordinator's certificate.
    pub tls: TlsFiles,
    /// `[enrollment]`: hosts enroll with one-time tokens instead of copied keys.
    #[serde(default)]
    pub enrollment: Option<EnrollmentToml>,
}

/// `[enrollment]` of coordinator.toml.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollmentToml {
    /// Address of the enrollment listener (server-authenticated TLS only; it serves
    /// nothing but Enroll), e.g. `0.0.0.0:7442`.
    pub listen: String,
    /// The fleet CA's private key: the coordinator signs enrolled and renewed
    /// certificates with it. Keep it 0600, owned by the coordinator's user.
    pub ca_key: PathBuf,
    /// Validity of the certificates it signs (`90d`). Optional; default 90 days.
    #[serde(default = "default_cert_validity")]
    pub cert_validity: HumanDuration,
}

fn default_cert_validity() -> HumanDuration {
    HumanDuration(Duration::from_secs(90 * 24 * 3600))
}

/// Checked `[enrollment]`.
#[derive(Debug, Clone)]
pub struct EnrollmentConfig {
    pub listen: SocketAddr,
    pub ca_key: PathBuf,
    pub cert_days: i64,
}

fn default_max_syncs() -> u32 {
    4
}

fn default_rebalance_spread() -> f64 {
    10.0
}

fn default_scrub_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(7 * 24 * 3600))
}

fn default_node_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

/// Checked configuration.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub node_timeout: Duration,
    /// `None`: no scheduled scrub.
    pub scrub_interval: Option<Duration>,
    /// Largest fill spread a rebalance leaves, as a fraction.
    pub rebalance_spread: f64,
    pub max_syncs_per_node: u32,
    /// OpenTelemetry export and the Prometheus endpoint.
    pub telemetry: bulwark_common::config::TelemetryConfig,
    pub tls: TlsFiles,
    pub enrollment: Option<EnrollmentConfig>,
}

impl CoordinatorConfig {
    /// Loads and checks `path`.
    pub fn load(path: &Path) -> Result<CoordinatorConfig, ConfigError> {
        let t: CoordinatorToml = bulwark_common::config::load(path)?;
        let listen: SocketAddr = t.listen.parse().map_err(|_| {
            ConfigError::invalid(path, "listen", format!("\"{}\" is not host:port", t.listen))
        })?;
        Ok(CoordinatorConfig {
            listen,
            data_dir: resolve(path, &t.data_dir),
            node_timeout: t.node_timeout.0,
            scrub_interval: Some(t.scrub_interval.0).filter(|d| !d.is_zero()),
            max_syncs_per_node: if t.max_syncs_per_node == 0 {
                return Err(ConfigError::invalid(
                    path,
                    "max_syncs_per_node",
                    "must be at least 1".to_string(),
                ));
            } else {
                t.max_syncs_per_node
            },
            rebalance_spread: {
                let p = t.rebalance_spread_percent;
                if !(0.5..=100.0).contains(&p) {
                    return Err(ConfigError::invalid(
                        path,
                        "rebalance_spread_percent",
                        format!("{p} is not between 0.5 and 100"),
                    ));
                }
                p / 100.0
            },
            telemetry: bulwark_common::config::TelemetryConfig::check(
                path,
                t.otlp_endpoint,
                t.metrics_listen,
            )?,
            tls: t.tls.relative_to(path),
            enrollment: match t.enrollment {
                None => None,
                Some(e) => Some(EnrollmentConfig {
                    listen: e.listen.parse().map_err(|_| {
                        ConfigError::invalid(
                            path,
                            "enrollment.listen",
                            format!("\"{}\" is not host:port", e.listen),
                        )
                    })?,
                    ca_key: resolve(path, &e.ca_key),
                    cert_days: {
                        let days = e.cert_validity.0.as_secs() / 86_400;
                        if days < 1 {
                            return Err(ConfigError::invalid(
                                path,
                                "enrollment.cert_validity",
                                "must be at least 1d".to_string(),
                            ));
                        }
                        days as i64
                    },
                }),
            },
        })
    }
}

impl bulwark_common::daemon::DaemonConfig for CoordinatorConfig {
    fn telemetry(&self) -> &bulwark_common::config::TelemetryConfig {
        &self.telemetry
    }
}

#[cfg(test)]
mod tests {
    /// The commented example in deploy/examples/ is a config this version accepts.
    #[test]
    fn the_example_config_loads() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/examples/coordinator.toml");
        if let Err(e) = super::CoordinatorConfig::load(&path) {
            panic!("{} does not load: {e}", path.display());
        }
    }
}
