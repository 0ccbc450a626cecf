//! `node.toml`: what an operator writes, and its checked runtime form.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bulwark_common::config::{ByteSize, ConfigError, HumanDuration, TlsFiles, resolve};
use bulwark_common::failover::CoordinatorList;
use bulwark_common::tls::Target;
use serde::Deserialize;

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeToml {
    /// Name of this node in the fleet; must match its certificate.
    pub name: String,
    /// Address to listen on for agents and the coordinator (`127.0.0.1:7441`).
    pub listen: String,
    /// `https://host:port` agents dial, when it differs from `listen`.
    #[serde(default)]
    pub advertise: Option<String>,
    /// `https://host:port` of the coordinator (a list of one; or `coordinators`).
    #[serde(default)]
    pub coordinator: Option<String>,
    /// The coordinators, `["https://a:7443", "https://b:7443"]`: tried in order,
    /// moving on when one is unreachable or not the leader. Either this or
    /// `coordinator`.
    #[serde(default)]
    pub coordinators: Option<Vec<String>>,
    /// Where the node keeps its metadata (sled).
    pub data_dir: PathBuf,
    /// Where to serve read-only NBD exports of recovery points (TLS only, admin
    /// certificates), e.g. `127.0.0.1:10809`; absent = no exports.
    #[serde(default)]
    pub nbd_listen: Option<String>,
    /// Most NBD connections open at once on `nbd_listen`; one more is closed at
    /// once and logged. Optional; default 64.
    #[serde(default)]
    pub nbd_max_connections: Option<usize>,
    /// How long an NBD client has from connecting to choosing an export (greeting,
    /// options, TLS handshake), after which it is disconnected. Optional; default
    /// `10s`, at least `1s`.
    #[serde(default)]
    pub nbd_handshake_timeout: Option<HumanDuration>,
    /// Syncs that run at once; more wait (before any data is sent) for a turn.
    /// Optional; default 64.
    #[serde(default = "default_max_syncs")]
    pub max_concurrent_syncs: usize,
    /// Syncs and log ships one agent may run at once on this node (over all its
    /// sources); more are refused at once, so one host cannot take every turn.
    /// Optional; default 2.
    #[serde(default = "default_max_syncs_per_agent")]
    pub max_syncs_per_agent: usize,
    /// Restores one agent may read at once from this node. Optional; default 4.
    #[serde(default = "default_max_restores_per_agent")]
    pub max_restores_per_agent: usize,
    /// A sync, ship, restore, export or import stream that moves nothing for this
    /// long is aborted (and rolled back). Optional; default 60s.
    #[serde(default = "default_stream_idle_timeout")]
    pub stream_idle_timeout: HumanDuration,
    /// How often the node reports to the coordinator.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_interval: HumanDuration,
    /// The storage pool.
    pub pool: PoolToml,
    /// OTLP/gRPC endpoint for traces and metrics (`http://127.0.0.1:4317`);
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` wins. Unset: no export.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// Serve Prometheus text at `http://ADDR/metrics` (`127.0.0.1:9464`). Unset: off.
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// The fleet CA and this node's certificate.
    pub tls: TlsFiles,
}

fn default_max_syncs() -> usize {
    64
}

fn default_max_syncs_per_agent() -> usize {
    2
}

fn default_max_restores_per_agent() -> usize {
    4
}

fn default_stream_idle_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}

fn default_heartbeat() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}

/// `[pool]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolToml {
    /// `[[pool.disks]]`: directories with a capacity.
    pub disks: Vec<DiskToml>,
    /// Grow a full recovery-point allocation by this step from the disk's
    /// unallocated capacity (`"1GiB"`); absent or 0 = never.
    #[serde(default)]
    pub auto_grow: Option<ByteSize>,
    /// When a sync's before-images do not fit: `"refuse"` (default) or
    /// `"prune-oldest"`.
    #[serde(default)]
    pub on_full: Option<String>,
    /// How the node compresses the before-images and journal records it stores:
    /// `"zstd:N"` (N = zstd level, 1 to 19) or `"off"`; a record that does not
    /// shrink is kept raw. Optional; default `"zstd:1"`.
    #[serde(default)]
    pub compression: Option<String>,
    /// How the node compresses a sync's journal records (kept until the sync's
    /// settle): `"zstd:N"` or `"off"`. Optional; default `"off"`, because a
    /// compressed journal slows every sync and saves space only until the settle.
    #[serde(default)]
    pub journal_compression: Option<String>,
}

/// One `[[pool.disks]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskToml {
    /// A directory on the disk.
    pub path: PathBuf,
    /// Bytes Bulwark may allocate there (`500GiB`).
    pub capacity: ByteSize,
}

/// Checked configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub name: String,
    pub listen: SocketAddr,
    pub advertise: Option<Target>,
    pub coordinators: CoordinatorList,
    pub data_dir: PathBuf,
    pub heartbeat_interval: Duration,
    pub nbd_listen: Option<SocketAddr>,
    /// The limits of the NBD listener (`nbd_max_connections`,
    /// `nbd_handshake_timeout`).
    pub nbd_limits: bulwark_nbd::limits::Limits,
    pub max_concurrent_syncs: usize,
    pub max_syncs_per_agent: usize,
    pub max_restores_per_agent: usize,
    pub stream_idle_timeout: Duration,
    pub disks: Vec<crate::store::PoolDisk>,
    pub pool_policy: crate::store::PoolPolicy,
    /// OpenTelemetry export and the Prometheus endpoint.
    pub telemetry: bulwark_common::config::TelemetryConfig,
    pub tls: TlsFiles,
}

impl NodeConfig {
    /// Loads and checks `path`.
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let t: NodeToml = bulwark_common::config::load(path)?;
        let bad = |key: &str, msg: String| ConfigError::invalid(path, key, msg);
        if !bulwark_common::pki::valid_name(&t.name) {
            return Err(bad("name", format!("\"{}\" is not a valid name", t.name)));
        }
        let listen: SocketAddr = t
            .listen
            .parse()
            .map_err(|_| bad("listen", format!("\"{}\" is not host:port", t.listen)))?;
        let coordinators =
            CoordinatorList::from_keys(t.coordinator.as_deref(), t.coordinators.as_deref())
                .map_err(|(key, m)| bad(&key, m))?;
        let advertise = t
            .advertise
            .as_deref()
            .map(Target::parse)
            .transpose()
            .map_err(|m| bad("advertise", m.to_string()))?;
        if t.pool.disks.is_empty() {
            return Err(bad("pool.disks", "at least one disk is needed".into()));
        }
        let mut disks = Vec::new();
        for (i, d) in t.pool.disks.iter().enumerate() {
            if d.capacity.0 == 0 {
                return Err(bad(
                    &format!("pool.disks[{i}].capacity"),
                    "must be more than 0".into(),
                ));
            }
            if disks
                .iter()
                .any(|x: &crate::store::PoolDisk| x.path == d.path)
            {
                return Err(bad(&format!("pool.disks[{i}].path"), "listed twice".into()));
            }
            disks.push(crate::store::PoolDisk {
                path: resolve(path, &d.path),
                capacity_bytes: d.capacity.0,
            });
        }
        let pool_policy = pool_policy(&t.pool, &bad)?;
        if t.heartbeat_interval.0 < Duration::from_millis(100) {
            return Err(bad("heartbeat_interval", "must be at least 100ms".into()));
        }
        let nbd_listen = t
            .nbd_listen
            .as_deref()
            .map(|a| {
                a.parse::<SocketAddr>()
                    .map_err(|_| bad("nbd_listen", format!("\"{a}\" is not host:port")))
            })
            .transpose()?;
        if nbd_listen.is_none() {
            for (key, set) in [
                ("nbd_max_connections", t.nbd_max_connections.is_some()),
                ("nbd_handshake_timeout", t.nbd_handshake_timeout.is_some()),
            ] {
                if set {
                    return Err(bad(key, "only used with nbd_listen".into()));
                }
            }
        }
        let nbd_limits = bulwark_nbd::limits::Limits::check(
            t.nbd_max_connections,
            t.nbd_handshake_timeout,
            bad,
        )?;
        if t.max_concurrent_syncs == 0 {
            return Err(bad("max_concurrent_syncs", "must be at least 1".into()));
        }
        if t.max_syncs_per_agent == 0 {
            return Err(bad("max_syncs_per_agent", "must be at least 1".into()));
        }
        if t.max_restores_per_agent == 0 {
            return Err(bad("max_restores_per_agent", "must be at least 1".into()));
        }
        if t.stream_idle_timeout.0 < Duration::from_secs(1) {
            return Err(bad("stream_idle_timeout", "must be at least 1s".into()));
        }
        Ok(NodeConfig {
            max_concurrent_syncs: t.max_concurrent_syncs,
            max_syncs_per_agent: t.max_syncs_per_agent,
            max_restores_per_agent: t.max_restores_per_agent,
            stream_idle_timeout: t.stream_idle_timeout.0,
            nbd_listen,
            nbd_limits,
            name: t.name,
            listen,
            advertise,
            coordinators,
            data_dir: resolve(path, &t.data_dir),
            heartbeat_interval: t.heartbeat_interval.0,
            disks,
            pool_policy,
            telemetry: bulwark_common::config::TelemetryConfig::check(
                path,
                t.otlp_endpoint,
                t.metrics_listen,
            )?,
            tls: t.tls.relative_to(path),
        })
    }
}

/// `[pool]`'s policy keys (`on_full`, `auto_grow`, `compression`,
/// `journal_compression`), checked.
fn pool_policy(
    pool: &PoolToml,
    bad: &dyn Fn(&str, String) -> ConfigError,
) -> Result<crate::store::PoolPolicy, ConfigError> {
    let on_full = match pool.on_full.as_deref() {
        None | Some("refuse") => crate::store::OnFull::Refuse,
        Some("prune-oldest") => crate::store::OnFull::PruneOldest,
        Some(other) => {
            return Err(bad(
                "pool.on_full",
                format!("\"{other}\" is not one of \"refuse\", \"prune-oldest\""),
            ));
        }
    };
    let compression = match pool.compression.as_deref() {
        None => crate::store::Compression::default(),
        Some(s) => crate::store::Compression::parse(s).map_err(|m| bad("pool.compression", m))?,
    };
    let journal_compression = match pool.journal_compression.as_deref() {
        None => crate::store::Compression::Off,
        Some(s) => {
            crate::store::Compression::parse(s).map_err(|m| bad("pool.journal_compression", m))?
        }
    };
    Ok(crate::store::PoolPolicy {
        auto_grow_bytes: pool.auto_grow.map_or(0, |b| b.0),
        on_full,
        compression,
        journal_compression,
    })
}

impl bulwark_common::daemon::DaemonConfig for NodeConfig {
    fn telemetry(&self) -> &bulwark_common::config::TelemetryConfig {
        &self.telemetry
    }
}

#[cfg(test)]
mod tests {
    /// The commented example in deploy/examples/ is a config this version accepts.
    #[test]
    fn the_example_config_loads() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/node.toml");
        if let Err(e) = super::NodeConfig::load(&path) {
            panic!("{} does not load: {e}", path.display());
        }
    }

    /// `[pool] compression` is parsed at load: a bad value is refused naming the
    /// key and the value; absent is zstd level 1.
    #[test]
    fn pool_compression_is_checked_at_load() {
        use crate::store::Compression;
        let example =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/node.toml");
        let text = std::fs::read_to_string(&example).expect("example");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.toml");
        let with = |value: Option<&str>| {
            let line = value.map_or(String::new(), |v| format!("compression = \"{v}\"\n"));
            let t = text.replacen("[pool]\n", &format!("[pool]\n{line}"), 1);
            std::fs::write(&path, t).expect("write");
            super::NodeConfig::load(&path)
        };
        let c = |v| with(v).expect("loads").pool_policy.compression;
        assert_eq!(c(None), Compression::Zstd(1));
        assert_eq!(c(Some("off")), Compression::Off);
        assert_eq!(c(Some("zstd:9")), Compression::Zstd(9));
        for bad in ["zstd:0", "zstd:42", "gzip", "zstd:three"] {
            let e = with(Some(bad)).expect_err(bad).to_string();
            assert!(
                e.contains("pool.compression") && e.contains(&format!("\"{bad}\"")),
                "{bad}: {e}"
            );
        }
        // The journal is raw unless asked, whatever `compression` says.
        assert_eq!(
            with(None).expect("loads").pool_policy.journal_compression,
            Compression::Off
        );
        let journal = |v: &str| {
            let t = text.replacen(
                "[pool]\n",
                &format!("[pool]\njournal_compression = \"{v}\"\n"),
                1,
            );
            std::fs::write(&path, t).expect("write");
            super::NodeConfig::load(&path)
        };
        let p = journal("zstd:3").expect("loads").pool_policy;
        assert_eq!(
            (p.compression, p.journal_compression),
            (Compression::Zstd(1), Compression::Zstd(3))
        );
        let e = journal("lz4").expect_err("lz4").to_string();
        assert!(
            e.contains("pool.journal_compression") && e.contains("\"lz4\""),
            "{e}"
        );
    }

    /// `coordinators = [...]` or `coordinator = "..."` (a list of one), never both;
    /// a bad or repeated entry is named by its index and value.
    #[test]
    fn coordinators_are_a_list_or_one() {
        let example =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/node.toml");
        let text = std::fs::read_to_string(&example).expect("example");
        let single = "coordinator = \"https://coordinator.example.net:7440\"\n";
        assert!(text.contains(single), "the example sets one coordinator");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.toml");
        let with = |lines: &str| {
            std::fs::write(&path, text.replacen(single, lines, 1)).expect("write");
            super::NodeConfig::load(&path)
        };
        let one = with(single).expect("one address");
        assert_eq!(
            one.coordinators.to_string(),
            "https://coordinator.example.net:7440"
        );
        let two = with("coordinators = [\"https://a:7440\", \"https://b:7440\"]\n").expect("two");
        assert_eq!(
            two.coordinators.to_string(),
            "https://a:7440,https://b:7440"
        );
        for (lines, wants) in [
            (
                format!("{single}coordinators = [\"https://a:7440\"]\n"),
                &[
                    "key `coordinators`",
                    "both `coordinator` and `coordinators`",
                ][..],
            ),
            (
                "coordinators = []\n".into(),
                &["key `coordinators`", "no coordinator address"],
            ),
            (
                String::new(),
                &["key `coordinators`", "no coordinator address"],
            ),
            (
                "coordinators = [\"https://a:7440\", \"http://b:7440\"]\n".into(),
                &["key `coordinators[1]`", "\"http://b:7440\"", "https://"],
            ),
            (
                "coordinators = [\"https://a:7440\", \"https://A:7440\"]\n".into(),
                &["key `coordinators[1]`", "is entry 0 again"],
            ),
            (
                "coordinator = \"https://a\"\n".into(),
                &["key `coordinator`", "host:port"],
            ),
        ] {
            let e = with(&lines).expect_err(&lines).to_string();
            for w in wants {
                assert!(e.contains(w), "{lines:?}: {e} (wants {w:?})");
            }
        }
    }
}
