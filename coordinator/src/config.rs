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
    /// `[state]`: where the coordinator's state lives (sled in `data_dir`, the
    /// default; or etcd, shared by several coordinators of which one leads).
    #[serde(default)]
    pub state: Option<StateToml>,
}

/// `[state]` of coordinator.toml.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateToml {
    /// `"sled"` (default: one coordinator, state in `data_dir`) or `"etcd"`.
    #[serde(default)]
    pub backend: Option<String>,
    /// etcd client URLs, `http://host:port` or `https://host:port`.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Where Bulwark's keys live in etcd. Optional; default `"/bulwark"`.
    #[serde(default)]
    pub prefix: Option<String>,
    /// TLS to etcd: the CA of the members' certificates, and this coordinator's
    /// client certificate and key. All three or none; required for https://.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// The leadership lease: a leader that cannot renew it for this long is
    /// replaced. Whole seconds, 2s to 60s. Optional; default "5s".
    #[serde(default)]
    pub leader_lease: Option<HumanDuration>,
    /// This coordinator's URL, where the others redirect writes while it leads
    /// (`https://coord-1.example:7440`). Required with etcd.
    #[serde(default)]
    pub advertise: Option<String>,
    /// An etcd request that no endpoint answers within this fails. 1s to 60s.
    /// Optional; default "5s".
    #[serde(default)]
    pub request_timeout: Option<HumanDuration>,
}

/// Checked `[state]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateConfig {
    /// One sled database in `data_dir`.
    Sled,
    /// An etcd cluster.
    Etcd(EtcdStateConfig),
}

/// Checked `[state]` with `backend = "etcd"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdStateConfig {
    pub options: crate::state::etcd::EtcdOptions,
    pub leader_lease: Duration,
    /// This coordinator's URL, as given (`https://host:port`).
    pub advertise: String,
}

/// The default leadership lease.
pub const DEFAULT_LEADER_LEASE: Duration = Duration::from_secs(5);

/// Checks `[state]` (absent: sled).
fn state_config(path: &Path, t: Option<StateToml>) -> Result<StateConfig, ConfigError> {
    let t = t.unwrap_or_default();
    let bad = |key: &str, msg: String| ConfigError::invalid(path, format!("state.{key}"), msg);
    match t.backend.as_deref().unwrap_or("sled") {
        "sled" => {
            let etcd_keys = [
                ("endpoints", !t.endpoints.is_empty()),
                ("prefix", t.prefix.is_some()),
                ("ca", t.ca.is_some()),
                ("cert", t.cert.is_some()),
                ("key", t.key.is_some()),
                ("leader_lease", t.leader_lease.is_some()),
                ("advertise", t.advertise.is_some()),
                ("request_timeout", t.request_timeout.is_some()),
            ];
            match etcd_keys.iter().find(|(_, set)| *set) {
                Some((key, _)) => Err(bad(
                    key,
                    "is only for backend = \"etcd\" (the backend is sled)".into(),
                )),
                None => Ok(StateConfig::Sled),
            }
        }
        "etcd" => etcd_config(path, t).map(StateConfig::Etcd),
        other => Err(bad(
            "backend",
            format!("\"{other}\" is not \"sled\" or \"etcd\""),
        )),
    }
}

/// Checks `[state]` with `backend = "etcd"`.
fn etcd_config(path: &Path, t: StateToml) -> Result<EtcdStateConfig, ConfigError> {
    let bad = |key: &str, msg: String| ConfigError::invalid(path, format!("state.{key}"), msg);
    if t.endpoints.is_empty() {
        return Err(bad(
            "endpoints",
            "is required with backend = \"etcd\" (e.g. [\"https://etcd-1:2379\"])".into(),
        ));
    }
    for e in &t.endpoints {
        check_endpoint(e).map_err(|m| bad("endpoints", format!("\"{e}\": {m}")))?;
    }
    let prefix = t.prefix.unwrap_or_else(|| "/bulwark".into());
    if !prefix.starts_with('/')
        || prefix.len() < 2
        || prefix.ends_with('/')
        || prefix.contains("//")
        || !prefix.chars().all(|c| c.is_ascii_graphic())
    {
        return Err(bad(
            "prefix",
            format!(
                "\"{prefix}\" is not a key prefix like \"/bulwark\" (starts with /, no trailing /, printable ASCII)"
            ),
        ));
    }
    let tls = match (t.ca, t.cert, t.key) {
        (None, None, None) => None,
        (Some(ca), Some(cert), Some(key)) => Some(crate::state::etcd::EtcdTls {
            ca: resolve(path, &ca),
            cert: resolve(path, &cert),
            key: resolve(path, &key),
        }),
        (ca, cert, _) => {
            let missing = if ca.is_none() {
                "ca"
            } else if cert.is_none() {
                "cert"
            } else {
                "key"
            };
            return Err(bad(
                missing,
                "is missing: TLS to etcd takes ca, cert and key together".into(),
            ));
        }
    };
    let https = t.endpoints.iter().any(|e| e.starts_with("https://"));
    let http = t.endpoints.iter().find(|e| e.starts_with("http://"));
    match (&tls, https, http) {
        (None, true, _) => {
            return Err(bad(
                "endpoints",
                "an https:// endpoint needs ca, cert and key in [state]".into(),
            ));
        }
        (Some(_), _, Some(e)) => {
            return Err(bad(
                "endpoints",
                format!("\"{e}\" is http:// but ca, cert and key are set: use https://"),
            ));
        }
        _ => {}
    }
    let leader_lease = t.leader_lease.map_or(DEFAULT_LEADER_LEASE, |d| d.0);
    if leader_lease.subsec_nanos() != 0
        || !(Duration::from_secs(2)..=Duration::from_secs(60)).contains(&leader_lease)
    {
        return Err(bad(
            "leader_lease",
            format!("{leader_lease:?} is not whole seconds from 2s to 60s"),
        ));
    }
    let timeout = t
        .request_timeout
        .map_or(crate::state::etcd::DEFAULT_TIMEOUT, |d| d.0);
    if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&timeout) {
        return Err(bad(
            "request_timeout",
            format!("{timeout:?} is not between 1s and 60s"),
        ));
    }
    let advertise = t.advertise.ok_or_else(|| {
        bad(
            "advertise",
            "is required with backend = \"etcd\": this coordinator's URL (https://host:port)"
                .into(),
        )
    })?;
    bulwark_common::tls::Target::parse(&advertise).map_err(|e| bad("advertise", e.to_string()))?;
    Ok(EtcdStateConfig {
        options: crate::state::etcd::EtcdOptions {
            endpoints: t.endpoints,
            prefix,
            tls,
            timeout,
        },
        leader_lease,
        advertise,
    })
}

/// `http://host:port` or `https://host:port`.
fn check_endpoint(e: &str) -> Result<(), String> {
    let rest = e
        .strip_prefix("http://")
        .or_else(|| e.strip_prefix("https://"))
        .ok_or("not http:// or https://")?;
    let rest = rest.trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':').ok_or("no port")?;
    if host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .is_empty()
        || host.contains('/')
    {
        return Err("no host".into());
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("\"{port}\" is not a port number")),
    }
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
    /// `[state]`: sled (default) or etcd.
    pub state: StateConfig,
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
        let state = state_config(path, t.state)?;
        Ok(CoordinatorConfig {
            state,
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

    fn load_state(dir: &std::path::Path, state: &str) -> Result<super::StateConfig, String> {
        let path = dir.join("coordinator.toml");
        std::fs::write(
            &path,
            format!(
                "listen = \"127.0.0.1:7440\"\ndata_dir = \"data\"\n[tls]\nca = \"ca.crt\"\ncert = \"c.crt\"\nkey = \"c.key\"\n{state}\n"
            ),
        )
        .expect("write");
        super::CoordinatorConfig::load(&path)
            .map(|c| c.state)
            .map_err(|e| e.to_string())
    }

    /// `[state]`: sled by default; etcd with its endpoints, prefix, TLS files
    /// (relative to the config file), lease, timeout and advertised URL.
    #[test]
    fn state_backend_loads() {
        use super::StateConfig;
        use std::time::Duration;
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(load_state(dir.path(), ""), Ok(StateConfig::Sled));
        assert_eq!(
            load_state(dir.path(), "[state]\nbackend = \"sled\""),
            Ok(StateConfig::Sled)
        );
        let c = load_state(
            dir.path(),
            "[state]\nbackend = \"etcd\"\nendpoints = [\"http://10.0.0.1:2379\", \"http://[::1]:2379\"]\nadvertise = \"https://c1.test:7440\"",
        )
        .expect("etcd defaults");
        let StateConfig::Etcd(e) = c else {
            panic!("not etcd: {c:?}")
        };
        assert_eq!(e.options.prefix, "/bulwark");
        assert_eq!(e.options.endpoints.len(), 2);
        assert_eq!(e.options.tls, None);
        assert_eq!(e.options.timeout, Duration::from_secs(5));
        assert_eq!(e.leader_lease, Duration::from_secs(5));
        assert_eq!(e.advertise, "https://c1.test:7440");
        let c = load_state(
            dir.path(),
            "[state]\nbackend = \"etcd\"\nendpoints = [\"https://e1:2379\"]\nprefix = \"/fleet-a\"\nca = \"etcd/ca.crt\"\ncert = \"etcd/c.crt\"\nkey = \"/abs/c.key\"\nleader_lease = \"10s\"\nrequest_timeout = \"2s\"\nadvertise = \"https://c1.test:7440\"",
        )
        .expect("etcd with TLS");
        let StateConfig::Etcd(e) = c else {
            panic!("not etcd: {c:?}")
        };
        let tls = e.options.tls.expect("tls");
        assert_eq!(tls.ca, dir.path().join("etcd/ca.crt"));
        assert_eq!(tls.key, std::path::PathBuf::from("/abs/c.key"));
        assert_eq!(e.options.prefix, "/fleet-a");
        assert_eq!(e.leader_lease, Duration::from_secs(10));
        assert_eq!(e.options.timeout, Duration::from_secs(2));
    }

    /// Bad `[state]` values are refused naming the key and the value.
    #[test]
    fn bad_state_values_name_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let etcd = "backend = \"etcd\"\nadvertise = \"https://c1:7440\"";
        let ok_ep = "endpoints = [\"http://e1:2379\"]";
        for (state, key, value) in [
            (
                "backend = \"zookeeper\"".to_string(),
                "state.backend",
                "zookeeper",
            ),
            (
                "endpoints = [\"http://e1:2379\"]".into(),
                "state.endpoints",
                "etcd",
            ),
            (etcd.into(), "state.endpoints", "required"),
            (
                format!("{etcd}\nendpoints = [\"e1:2379\"]"),
                "state.endpoints",
                "e1:2379",
            ),
            (
                format!("{etcd}\nendpoints = [\"http://e1\"]"),
                "state.endpoints",
                "http://e1",
            ),
            (
                format!("{etcd}\nendpoints = [\"http://e1:99999\"]"),
                "state.endpoints",
                "99999",
            ),
            (
                format!("{etcd}\nendpoints = [\"https://e1:2379\"]"),
                "state.endpoints",
                "https://",
            ),
            (
                format!("{etcd}\n{ok_ep}\nprefix = \"bulwark\""),
                "state.prefix",
                "bulwark",
            ),
            (
                format!("{etcd}\n{ok_ep}\nprefix = \"/b/\""),
                "state.prefix",
                "/b/",
            ),
            (
                format!("{etcd}\n{ok_ep}\nca = \"ca.crt\""),
                "state.cert",
                "ca, cert and key",
            ),
            (
                format!("{etcd}\n{ok_ep}\nca = \"a\"\ncert = \"b\"\nkey = \"c\""),
                "state.endpoints",
                "http://e1:2379",
            ),
            (
                format!("{etcd}\n{ok_ep}\nleader_lease = \"1s\""),
                "state.leader_lease",
                "1s",
            ),
            (
                format!("{etcd}\n{ok_ep}\nleader_lease = \"2500ms\""),
                "state.leader_lease",
                "2.5s",
            ),
            (
                format!("{etcd}\n{ok_ep}\nrequest_timeout = \"0s\""),
                "state.request_timeout",
                "0ns",
            ),
            (
                format!("backend = \"etcd\"\n{ok_ep}"),
                "state.advertise",
                "required",
            ),
            (
                format!("backend = \"etcd\"\n{ok_ep}\nadvertise = \"ftp://c1:7440\""),
                "state.advertise",
                "ftp://c1:7440",
            ),
        ] {
            let e = load_state(dir.path(), &format!("[state]\n{state}")).expect_err(&state);
            assert!(
                e.contains(key) && e.contains(value) && e.contains("coordinator.toml"),
                "{state}: {e}"
            );
        }
    }
}
