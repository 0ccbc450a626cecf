//! `coordinator.toml`: what an operator writes, and its checked runtime form.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bulwark_common::config::{
    ByteSize, ConfigError, HumanDuration, RetentionToml, TlsFiles, resolve,
};
use serde::Deserialize;

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorToml {
    /// Address to listen on for nodes, agents and the CLI (`127.0.0.1:7440`).
    pub listen: String,
    /// Where the registry (its sled state, `data_dir/registry`) lives.
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
    /// `[policy]`: what the admin sets for every data source; agents' configs only
    /// propose within it.
    #[serde(default)]
    pub policy: Option<PolicyToml>,
    /// An agent's control stream that carries nothing for this long is cut (agents
    /// ping every 15 s). Optional; default 60s.
    #[serde(default = "default_stream_idle_timeout")]
    pub stream_idle_timeout: HumanDuration,
    /// A pool disk or a source's recovery-point allocation forecast to be full in
    /// fewer days than this raises a warning (`forecast/<node>/<disk>`,
    /// `forecast/<source>`). Fractions allowed. Optional; default 14.
    #[serde(default = "default_forecast_warn_days")]
    pub forecast_warn_days: f64,
    /// How far back the forecast's growth trend looks. Optional; default "7d".
    #[serde(default = "default_forecast_window")]
    pub forecast_window: HumanDuration,
}

fn default_forecast_warn_days() -> f64 {
    crate::forecast::ForecastSettings::default().warn_days
}

fn default_forecast_window() -> HumanDuration {
    HumanDuration(crate::forecast::ForecastSettings::default().window)
}

/// `[policy]` of coordinator.toml (see `bulwark_coordinator::policy`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyToml {
    /// `[policy.min_retention]`: the retention every source keeps at least unless
    /// the admin sets its own (`bulwark retention`) or its group's; an agent's
    /// proposal can only lengthen it. Absent: every point is kept.
    #[serde(default)]
    pub min_retention: Option<RetentionToml>,
    /// Default replica space, percent of the source's size. Optional; default 150.
    #[serde(default)]
    pub replica_percent: Option<u64>,
    /// Default recovery-point space: size × days × 2% + 1.6 GiB. Optional; default 7.
    #[serde(default)]
    pub points_days: Option<u64>,
    /// Each agent's quota unless `bulwark quota` sets its own: the largest source
    /// (`"2TiB"`), and the space of all its sources. Absent: no limit.
    #[serde(default)]
    pub max_source_size: Option<ByteSize>,
    #[serde(default)]
    pub max_total: Option<ByteSize>,
}

fn default_stream_idle_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
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
    pub policy: crate::policy::FleetPolicy,
    pub stream_idle_timeout: Duration,
    pub forecast: crate::forecast::ForecastSettings,
}

impl CoordinatorConfig {
    /// Loads and checks `path`.
    pub fn load(path: &Path) -> Result<CoordinatorConfig, ConfigError> {
        let t: CoordinatorToml = bulwark_common::config::load(path)?;
        let listen: SocketAddr = t.listen.parse().map_err(|_| {
            ConfigError::invalid(path, "listen", format!("\"{}\" is not host:port", t.listen))
        })?;
        let policy = fleet_policy(path, t.policy.unwrap_or_default())?;
        if t.stream_idle_timeout.0 < Duration::from_secs(20) {
            return Err(ConfigError::invalid(
                path,
                "stream_idle_timeout",
                "must be at least 20s (agents ping every 15 s)".to_string(),
            ));
        }
        let forecast = forecast_settings(path, t.forecast_warn_days, t.forecast_window.0)?;
        Ok(CoordinatorConfig {
            forecast,
            policy,
            stream_idle_timeout: t.stream_idle_timeout.0,
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

/// Checks `forecast_warn_days` and `forecast_window`.
fn forecast_settings(
    path: &Path,
    warn_days: f64,
    window: Duration,
) -> Result<crate::forecast::ForecastSettings, ConfigError> {
    if !(warn_days.is_finite() && warn_days > 0.0 && warn_days <= 3650.0) {
        return Err(ConfigError::invalid(
            path,
            "forecast_warn_days",
            format!("{warn_days} is not a number of days above 0 and at most 3650"),
        ));
    }
    if !(Duration::from_secs(10)..=Duration::from_secs(366 * 86_400)).contains(&window) {
        return Err(ConfigError::invalid(
            path,
            "forecast_window",
            format!(
                "{} is not between 10s and 366d",
                bulwark_common::time::format_duration_ms(window.as_millis() as u64)
            ),
        ));
    }
    Ok(crate::forecast::ForecastSettings { warn_days, window })
}

/// Checks `[policy]`.
fn fleet_policy(path: &Path, p: PolicyToml) -> Result<crate::policy::FleetPolicy, ConfigError> {
    let d = crate::policy::FleetPolicy::default();
    let replica_percent = p.replica_percent.unwrap_or(d.replica_percent);
    if !(100..=1000).contains(&replica_percent) {
        return Err(ConfigError::invalid(
            path,
            "policy.replica_percent",
            format!("{replica_percent} is not between 100 and 1000"),
        ));
    }
    let points_days = p.points_days.unwrap_or(d.points_days);
    if points_days > 3650 {
        return Err(ConfigError::invalid(
            path,
            "policy.points_days",
            format!("{points_days} is more than 3650"),
        ));
    }
    Ok(crate::policy::FleetPolicy {
        min_retention: p.min_retention.map_or(d.min_retention, |r| r.retention()),
        replica_percent,
        points_days,
        quota: crate::policy::Quota {
            max_source_size_bytes: p.max_source_size.map_or(0, |b| b.0),
            max_total_bytes: p.max_total.map_or(0, |b| b.0),
        },
    })
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

    /// `forecast_warn_days` takes fractions; zero, negative or absurd values, and a
    /// window too short to hold a trend, are refused naming the key and the file.
    #[test]
    fn forecast_settings_are_checked_at_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let load = |extra: &str| {
            let path = dir.path().join("coordinator.toml");
            std::fs::write(
                &path,
                format!(
                    "listen = \"127.0.0.1:7440\"\ndata_dir = \"data\"\n{extra}\n[tls]\nca = \"ca.crt\"\ncert = \"c.crt\"\nkey = \"c.key\"\n"
                ),
            )
            .expect("write");
            super::CoordinatorConfig::load(&path).map_err(|e| e.to_string())
        };
        let d = load("").expect("defaults");
        assert_eq!(d.forecast.warn_days, 14.0);
        assert_eq!(d.forecast.window.as_secs(), 7 * 86_400);
        let c = load("forecast_warn_days = 0.002\nforecast_window = \"1m\"").expect("fractions");
        assert_eq!(c.forecast.warn_days, 0.002);
        assert_eq!(c.forecast.window.as_secs(), 60);
        for (extra, key) in [
            ("forecast_warn_days = 0", "forecast_warn_days"),
            ("forecast_warn_days = -3", "forecast_warn_days"),
            ("forecast_warn_days = nan", "forecast_warn_days"),
            ("forecast_window = \"2s\"", "forecast_window"),
        ] {
            let e = load(extra).expect_err(extra);
            assert!(
                e.contains(key) && e.contains("coordinator.toml"),
                "{extra}: {e}"
            );
        }
    }
}
