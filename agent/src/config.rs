//! `agent.toml`: what an operator writes, and its checked runtime form.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bulwark_common::block::{DEFAULT_BLOCK_SIZE, Geometry};
use bulwark_common::config::{ByteSize, ConfigError, HumanDuration, TlsFiles, resolve};

use crate::tracker::activity::ActivityConfig;
use bulwark_common::failover::CoordinatorList;
use bulwark_common::tls::Role;
use bulwark_nbd::limits::Limits;
use serde::Deserialize;

use crate::quiesce::QuiesceConfig;

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentToml {
    /// Name of this agent (the protected host) in the fleet; must match its certificate.
    pub name: String,
    /// `https://host:port` of the coordinator (a list of one; or `coordinators`).
    /// The agent only dials out.
    #[serde(default)]
    pub coordinator: Option<String>,
    /// The coordinators, `["https://a:7443", "https://b:7443"]`: tried in order,
    /// moving on when one is unreachable or not the leader. Either this or
    /// `coordinator`.
    #[serde(default)]
    pub coordinators: Option<Vec<String>>,
    /// Where the agent keeps its state (a lock file; later, tracker state).
    pub state_dir: PathBuf,
    /// The data sources this agent protects.
    #[serde(default)]
    pub sources: Vec<SourceToml>,
    /// OTLP/gRPC endpoint for traces and metrics (`http://127.0.0.1:4317`);
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` wins. Unset: no export.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// Serve Prometheus text at `http://ADDR/metrics` (`127.0.0.1:9464`). Unset: off.
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// Most connections each `nbd-filter` export holds at once; one more is closed
    /// at once and logged. Optional; default 64.
    #[serde(default)]
    pub nbd_max_connections: Option<usize>,
    /// How long a client of an `nbd-filter` export has from connecting to choosing
    /// the export (greeting, options and, with `nbd_tls`, the TLS handshake).
    /// Optional; default `10s`, at least `1s`.
    #[serde(default)]
    pub nbd_handshake_timeout: Option<HumanDuration>,
    /// The fleet CA and this agent's certificate.
    pub tls: TlsFiles,
}

/// One `[[sources]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceToml {
    /// Name of the data source, unique in the fleet.
    pub name: String,
    /// `volume` (block device or image file) or `log` (a directory of logs).
    pub kind: String,
    /// The block device, image file or log directory.
    pub path: PathBuf,
    /// How changed blocks are found: `fingerprint`, `nbd-filter`, `qcow2-bitmap` or
    /// `dm-era`.
    #[serde(default = "default_tracker")]
    pub tracker: String,
    /// Tracking unit (`64KiB`); a power of two from 4 KiB to 4 MiB.
    #[serde(default = "default_block_size")]
    pub block_size: ByteSize,
    /// Time between scheduled syncs (`15m`).
    #[serde(default = "default_interval")]
    pub sync_interval: HumanDuration,
    /// For the `nbd-filter` tracker: the unix socket of the NBD export the host
    /// writes through. The agent creates it mode 0600 in a directory of its own,
    /// mode 0700 (see `crate::export`): only the agent's user reaches it.
    #[serde(default)]
    pub nbd_socket: Option<PathBuf>,
    /// For the `nbd-filter` tracker, instead of `nbd_socket`: a loopback address
    /// (`127.0.0.1:10809`) for the export, served over TLS only (`nbd_tls`).
    #[serde(default)]
    pub nbd_listen: Option<String>,
    /// With `nbd_listen`: must be `true`. Clients upgrade with `NBD_OPT_STARTTLS`
    /// and present a fleet certificate of `nbd_client_role`; plain TCP would let any
    /// local user read and write the disk.
    #[serde(default)]
    pub nbd_tls: Option<bool>,
    /// With `nbd_tls`: the role (`agent`, `admin`, ...) of the fleet certificates
    /// that may use the export. Required.
    #[serde(default)]
    pub nbd_client_role: Option<String>,
    /// For the `qcow2-bitmap` tracker: the QMP socket of the VM running on the
    /// image. Syncs then go through the VM (a point-in-time view while the guest
    /// writes on) instead of opening the image.
    #[serde(default)]
    pub qmp_socket: Option<PathBuf>,
    /// For the `dm-era` tracker: the device holding the era target's metadata.
    #[serde(default)]
    pub era_metadata: Option<PathBuf>,
    /// For the `dm-era` tracker: the name of the era device under /dev/mapper
    /// (default `bulwark-<source name>`).
    #[serde(default)]
    pub era_device: Option<String>,
    /// Command run before the point is taken (quiesce the application).
    #[serde(default)]
    pub pre_snapshot: Option<String>,
    /// Command run after the point is taken (release the application).
    #[serde(default)]
    pub post_snapshot: Option<String>,
    /// Longest a hook (or a freeze) may take (`60s`).
    #[serde(default = "default_hook_timeout")]
    pub hook_timeout: HumanDuration,
    /// Mount point of a file system on the volume to freeze while the point is taken.
    #[serde(default)]
    pub fsfreeze: Option<PathBuf>,
    /// Command that makes a point-in-time view to read instead of the live volume.
    #[serde(default)]
    pub snapshot_command: Option<String>,
    /// Command that removes the view afterwards.
    #[serde(default)]
    pub snapshot_cleanup: Option<String>,
    /// Fail the sync rather than take a crash-consistent point when quiescing fails.
    #[serde(default)]
    pub require_app_consistent: bool,
    /// For `log` sources: which files of the directory are logs.
    #[serde(default)]
    pub glob: Option<String>,
    /// Replica space on the node (default 1.5 × the volume).
    #[serde(default)]
    pub replica_space: Option<ByteSize>,
    /// Recovery-point space on the node (default size × 7 days × 2% + 1.6 GiB).
    #[serde(default)]
    pub points_space: Option<ByteSize>,
    /// `[sources.retention]`: which recovery points the node keeps.
    #[serde(default)]
    pub retention: Option<bulwark_common::config::RetentionToml>,
    /// A protection group (`bulwark group create`): the coordinator schedules this
    /// source's syncs and `sync_interval` is not used.
    #[serde(default)]
    pub group: Option<String>,
    /// For the `nbd-filter` tracker: keep an activity log so that a crash costs a
    /// re-check of the regions written lately, not of the whole volume (default true).
    #[serde(default)]
    pub activity_log: Option<bool>,
    /// At most this many regions hot at once (default 1024, 64 to 65536).
    #[serde(default)]
    pub activity_extents: Option<u32>,
    /// Size of a region of the activity log (default `4MiB`): a multiple of
    /// `block_size`, at most 1 GiB.
    #[serde(default)]
    pub activity_region: Option<ByteSize>,
    /// Time between checkpoints of the dirty bitmap (default `60s`, 1s to 1h).
    #[serde(default)]
    pub bitmap_checkpoint: Option<HumanDuration>,
    /// Compression of the sync stream: `"zstd"` or `"off"` (the default).
    #[serde(default)]
    pub compress: Option<String>,
}

/// How a volume source's changed blocks travel to the node (`compress`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compress {
    /// Raw bytes.
    #[default]
    Off,
    /// Each extent as a zstd frame when that is smaller (a fast level): for links
    /// slower than the agent's CPU compresses.
    Zstd,
}

/// `compress` of a source: only volume sources have a sync stream of blocks.
fn compress_config(
    s: &SourceToml,
    kind: SourceKind,
    bad: &impl Fn(String, String) -> ConfigError,
    key: &impl Fn(&str) -> String,
) -> Result<Compress, ConfigError> {
    let c = match s.compress.as_deref() {
        None | Some("off") => Compress::Off,
        Some("zstd") => Compress::Zstd,
        Some(other) => {
            return Err(bad(
                key("compress"),
                format!("\"{other}\" is not a compression; use \"zstd\" or \"off\""),
            ));
        }
    };
    if c != Compress::Off && kind != SourceKind::Volume {
        return Err(bad(
            key("compress"),
            "only used with kind = \"volume\"".into(),
        ));
    }
    Ok(c)
}

fn default_tracker() -> String {
    "fingerprint".into()
}
fn default_block_size() -> ByteSize {
    ByteSize(u64::from(DEFAULT_BLOCK_SIZE))
}
fn default_hook_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(15 * 60))
}

/// Where an `nbd-filter` export listens, and who may use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdEndpoint {
    /// A Unix socket, 0600 in a 0700 directory of the agent's: its file
    /// permissions decide (the agent's user only).
    Unix(PathBuf),
    /// A loopback TCP address, TLS required, for fleet certificates of
    /// `client_role` only.
    Tls {
        addr: std::net::SocketAddr,
        client_role: Role,
    },
}

impl std::fmt::Display for NbdEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdEndpoint::Unix(p) => write!(f, "nbd+unix:///?socket={}", p.display()),
            NbdEndpoint::Tls { addr, client_role } => {
                write!(f, "nbds://{addr}/ (TLS, {client_role} certificates)")
            }
        }
    }
}

/// The era target of a `dm-era` source.
#[derive(Debug, Clone)]
pub struct EraConfig {
    /// The metadata device.
    pub metadata: PathBuf,
    /// Name under /dev/mapper.
    pub device: String,
}

/// What a data source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// A block device or image file, synced block by block.
    Volume,
    /// A directory of append-only log files, shipped by appended bytes.
    Log,
}

/// A checked data source.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub name: String,
    pub kind: SourceKind,
    /// `log` sources: which files of the directory are logs.
    pub glob: String,
    pub path: PathBuf,
    pub tracker: String,
    pub block_size: u32,
    pub sync_interval: Duration,
    /// The export of an `nbd-filter` source.
    pub nbd: Option<NbdEndpoint>,
    /// The QMP socket of the VM running on a `qcow2-bitmap` source's image.
    pub qmp_socket: Option<PathBuf>,
    /// The era target of a `dm-era` source.
    pub era: Option<EraConfig>,
    pub quiesce: QuiesceConfig,
    /// Space and retention asked of the node.
    pub policy: bulwark_proto::Policy,
    /// Its protection group, if any (the coordinator schedules it).
    pub group: Option<String>,
    /// The activity log of an `nbd-filter` source (`None`: off, or another tracker).
    pub activity: Option<ActivityConfig>,
    /// `compress`: how changed blocks travel to the node.
    pub compress: Compress,
}

/// Checked configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub name: String,
    pub coordinators: CoordinatorList,
    pub state_dir: PathBuf,
    pub sources: Vec<SourceConfig>,
    /// `nbd_max_connections` and `nbd_handshake_timeout`, for every `nbd-filter`
    /// export.
    pub nbd_limits: Limits,
    /// OpenTelemetry export and the Prometheus endpoint.
    pub telemetry: bulwark_common::config::TelemetryConfig,
    pub tls: TlsFiles,
}

impl AgentConfig {
    /// Loads and checks `path`.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let t: AgentToml = bulwark_common::config::load(path)?;
        let bad = |key: String, msg: String| ConfigError::invalid(path, key, msg);
        if !bulwark_common::pki::valid_name(&t.name) {
            return Err(bad(
                "name".into(),
                format!("\"{}\" is not a valid name", t.name),
            ));
        }
        let coordinators =
            CoordinatorList::from_keys(t.coordinator.as_deref(), t.coordinators.as_deref())
                .map_err(|(key, m)| bad(key, m))?;
        let mut sources: Vec<SourceConfig> = Vec::new();
        for (i, s) in t.sources.into_iter().enumerate() {
            let source = source_config(path, i, s, &sources, &bad)?;
            sources.push(source);
        }
        let nbd_filters = sources.iter().any(|s| s.nbd.is_some());
        for (k, set) in [
            ("nbd_max_connections", t.nbd_max_connections.is_some()),
            ("nbd_handshake_timeout", t.nbd_handshake_timeout.is_some()),
        ] {
            if set && !nbd_filters {
                return Err(bad(
                    k.into(),
                    "only used with an nbd-filter data source (it limits the NBD export)".into(),
                ));
            }
        }
        let nbd_limits = Limits::check(t.nbd_max_connections, t.nbd_handshake_timeout, |k, m| {
            bad(k.into(), m)
        })?;
        Ok(AgentConfig {
            name: t.name,
            coordinators,
            state_dir: resolve(path, &t.state_dir),
            sources,
            nbd_limits,
            telemetry: bulwark_common::config::TelemetryConfig::check(
                path,
                t.otlp_endpoint,
                t.metrics_listen,
            )?,
            tls: t.tls.relative_to(path),
        })
    }
}

/// Checks data source `i` of `path` (`earlier` are the ones before it).
fn source_config(
    path: &Path,
    i: usize,
    s: SourceToml,
    earlier: &[SourceConfig],
    bad: &impl Fn(String, String) -> ConfigError,
) -> Result<SourceConfig, ConfigError> {
    let key = |k: &str| format!("sources[{i}].{k}");
    let kind = source_kind(&s, earlier, bad, &key)?;
    let nbd = nbd_endpoint(&s, path, bad, &key)?;
    if let Some(e) = &nbd
        && let Some(other) = earlier
            .iter()
            .find(|x| x.nbd.as_ref().is_some_and(|o| o.same_place(e)))
    {
        let k = match e {
            NbdEndpoint::Unix(_) => "nbd_socket",
            NbdEndpoint::Tls { .. } => "nbd_listen",
        };
        return Err(bad(
            key(k),
            format!("{e} is already the export of data source {}", other.name),
        ));
    }
    let era = era_config(&s, path, bad, &key)?;
    let qmp_socket = qmp_socket(&s, path, earlier, bad, &key)?;
    let quiesce = quiesce_config(&s, path, bad, &key)?;
    let glob = match (kind, s.glob.clone()) {
        (SourceKind::Volume, Some(_)) => {
            return Err(bad(key("glob"), "only used with kind = \"log\"".into()));
        }
        (SourceKind::Volume, None) => String::new(),
        (SourceKind::Log, g) => {
            let g = g.unwrap_or_else(|| "*".into());
            crate::logs::check_glob(&g).map_err(|m| bad(key("glob"), m.to_string()))?;
            g
        }
    };
    let block_size = u32::try_from(s.block_size.0)
        .ok()
        .filter(|b| Geometry::new(0, *b).is_ok())
        .ok_or_else(|| {
            bad(
                key("block_size"),
                format!(
                    "{} is not a power of two between 4KiB and 4MiB",
                    s.block_size.0
                ),
            )
        })?;
    let activity = activity_config(&s, block_size, bad, &key)?;
    let compress = compress_config(&s, kind, bad, &key)?;
    if s.sync_interval.0 < Duration::from_secs(1) {
        return Err(bad(key("sync_interval"), "must be at least 1s".into()));
    }
    let policy = bulwark_proto::Policy {
        replica_alloc_bytes: s.replica_space.map_or(0, |b| b.0),
        points_alloc_bytes: s.points_space.map_or(0, |b| b.0),
        // No table, no proposal: the admin's retention applies as it is.
        retention: s.retention.map(|r| r.retention().to_proto()),
        keep_after_ms: 0,
        lock: None,
    };
    Ok(SourceConfig {
        kind,
        glob,
        name: s.name,
        path: resolve(path, &s.path),
        tracker: s.tracker,
        block_size,
        sync_interval: s.sync_interval.0,
        nbd,
        qmp_socket,
        era,
        quiesce,
        policy,
        group: match s.group {
            Some(g) if !bulwark_common::pki::valid_name(&g) => {
                return Err(bad(key("group"), format!("\"{g}\" is not a valid name")));
            }
            g => g,
        },
        activity,
        compress,
    })
}

/// `activity_log`, `activity_extents`, `activity_region` and `bitmap_checkpoint`:
/// only for `nbd-filter`, where the log is on unless `activity_log = false`.
fn activity_config(
    s: &SourceToml,
    block_size: u32,
    bad: &impl Fn(String, String) -> ConfigError,
    key: &impl Fn(&str) -> String,
) -> Result<Option<ActivityConfig>, ConfigError> {
    let set = [
        ("activity_log", s.activity_log.is_some()),
        ("activity_extents", s.activity_extents.is_some()),
        ("activity_region", s.activity_region.is_some()),
        ("bitmap_checkpoint", s.bitmap_checkpoint.is_some()),
    ];
    if s.tracker != "nbd-filter" || s.activity_log == Some(false) {
        if let Some((k, _)) = set.iter().skip(1).find(|(_, set)| *set) {
            let why = if s.tracker != "nbd-filter" {
                "only used with tracker = \"nbd-filter\""
            } else {
                "not used with activity_log = false"
            };
            return Err(bad(key(k), why.into()));
        }
        if s.tracker != "nbd-filter" && s.activity_log.is_some() {
            return Err(bad(
                key("activity_log"),
                "only used with tracker = \"nbd-filter\"".into(),
            ));
        }
        return Ok(None);
    }
    let d = ActivityConfig::DEFAULT;
    let extents = s.activity_extents.unwrap_or(d.extents);
    if !(ActivityConfig::MIN_EXTENTS..=ActivityConfig::MAX_EXTENTS).contains(&extents) {
        return Err(bad(
            key("activity_extents"),
            format!(
                "{extents} is not between {} and {}",
                ActivityConfig::MIN_EXTENTS,
                ActivityConfig::MAX_EXTENTS
            ),
        ));
    }
    let region_bytes = s.activity_region.map_or(d.region_bytes, |b| b.0);
    if region_bytes == 0
        || !region_bytes.is_multiple_of(u64::from(block_size))
        || region_bytes > 1 << 30
    {
        return Err(bad(
            key("activity_region"),
            format!(
                "{region_bytes} bytes is not a multiple of block_size ({block_size}) up to 1GiB"
            ),
        ));
    }
    let checkpoint = s.bitmap_checkpoint.map_or(d.checkpoint, |h| h.0);
    if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&checkpoint) {
        return Err(bad(
            key("bitmap_checkpoint"),
            "must be between 1s and 1h".into(),
        ));
    }
    Ok(Some(ActivityConfig {
        extents,
        region_bytes,
        checkpoint,
    }))
}

/// A source's name (valid, not listed before), kind (and nothing a log source
/// does not use) and tracker.
fn source_kind(
    s: &SourceToml,
    earlier: &[SourceConfig],
    bad: &impl Fn(String, String) -> ConfigError,
    key: &impl Fn(&str) -> String,
) -> Result<SourceKind, ConfigError> {
    if !bulwark_common::pki::valid_name(&s.name) {
        return Err(bad(
            key("name"),
            format!("\"{}\" is not a valid name", s.name),
        ));
    }
    if earlier.iter().any(|x| x.name == s.name) {
        return Err(bad(
            key("name"),
            format!("data source \"{}\" is listed twice", s.name),
        ));
    }
    let kind = match s.kind.as_str() {
        "volume" => SourceKind::Volume,
        "log" => SourceKind::Log,
        other => {
            return Err(bad(
                key("kind"),
                format!("\"{other}\" is not volume or log"),
            ));
        }
    };
    if kind == SourceKind::Log {
        // What only a volume has.
        let volume_only = [
            ("tracker", s.tracker != "fingerprint"),
            ("nbd_socket", s.nbd_socket.is_some()),
            ("nbd_listen", s.nbd_listen.is_some()),
            ("nbd_tls", s.nbd_tls.is_some()),
            ("nbd_client_role", s.nbd_client_role.is_some()),
            ("qmp_socket", s.qmp_socket.is_some()),
            ("era_metadata", s.era_metadata.is_some()),
            ("era_device", s.era_device.is_some()),
            ("pre_snapshot", s.pre_snapshot.is_some()),
            ("post_snapshot", s.post_snapshot.is_some()),
            ("fsfreeze", s.fsfreeze.is_some()),
            ("snapshot_command", s.snapshot_command.is_some()),
            ("snapshot_cleanup", s.snapshot_cleanup.is_some()),
            ("require_app_consistent", s.require_app_consistent),
            ("replica_space", s.replica_space.is_some()),
        ];
        if let Some((k, _)) = volume_only.iter().find(|(_, set)| *set) {
            return Err(bad(
                key(k),
                "only used with kind = \"volume\" (a log source ships appended bytes)".into(),
            ));
        }
    }
    match s.tracker.as_str() {
        "fingerprint" | "qcow2-bitmap" | "nbd-filter" | "dm-era" => {}
        other => {
            return Err(bad(
                key("tracker"),
                format!(
                    "unknown tracker \"{other}\" (fingerprint, qcow2-bitmap, nbd-filter, dm-era)"
                ),
            ));
        }
    }
    Ok(kind)
}

/// The era target of a `dm-era` source (`era_metadata`, `era_device`).
fn era_config(
    s: &SourceToml,
    path: &Path,
    bad: &impl Fn(String, String) -> ConfigError,
    key: &impl Fn(&str) -> String,
) -> Result<Option<EraConfig>, ConfigError> {
    Ok(match (s.tracker.as_str(), &s.era_metadata, &s.era_device) {
        ("dm-era", Some(m), d) => {
            let device = d.clone().unwrap_or_else(|| format!("bulwark-{}", s.name));
            if !bulwark_common::pki::valid_name(&device) {
                return Err(bad(
                    key("era_device"),
                    format!("\"{device}\" is not a valid device-mapper name"),
                ));
            }
            Some(EraConfig {
                metadata: resolve(path, m),
                device,
            })
        }
        ("dm-era", None, _) => {
            return Err(bad(
                        key("era_metadata"),
                        "tracker = \"dm-era\" needs era_metadata: a (zeroed) device for the era target's metadata".into(),
                    ));
        }
        (_, Some(_), _) => {
            return Err(bad(
                key("era_metadata"),
                "only used with tracker = \"dm-era\"".into(),
            ));
        }
        (_, _, Some(_)) => {
            return Err(bad(
                key("era_device"),
                "only used with tracker = \"dm-era\"".into(),
            ));
        }
        _ => None,
    })
}

/// The QMP socket of the VM running a `qcow2-bitmap` source's image: one data
/// source per VM.
fn qmp_socket(
    s: &SourceToml,
    path: &Path,
    earlier: &[SourceConfig],
    bad: &impl Fn(String, String) -> ConfigError,
    key: &impl Fn(&str) -> String,
) -> Result<Option<PathBuf>, ConfigError> {
    Ok(match (&s.qmp_socket, s.tracker.as_str()) {
        (Some(q), "qcow2-bitmap") => {
            let q = resolve(path, q);
            // A sync adds fixed names to the VM (its one NBD server among
            // them) and clears them away before and after: one data source
            // per VM.
            if earlier.iter().any(|x| x.qmp_socket.as_ref() == Some(&q)) {
                return Err(bad(
                    key("qmp_socket"),
                    format!(
                        "{} is already the QMP socket of another data source; one qcow2 image per VM can be protected",
                        q.display()
                    ),
                ));
            }
            Some(q)
        }
        (Some(_), _) => {
            return Err(bad(
                key("qmp_socket"),
                "only used with tracker = \"qcow2-bitmap\"".into(),
            ));
        }
        (None, _) => None,
    })
}

/// Hooks, fsfreeze and snapshots of a source.
fn quiesce_config(
    s: &SourceToml,
    path: &Path,
    bad: &impl Fn(String, String) -> ConfigError,
    key: &impl Fn(&str) -> String,
) -> Result<QuiesceConfig, ConfigError> {
    let fsfreeze = s.fsfreeze.as_ref().map(|p| resolve(path, p));
    if let Some(m) = &fsfreeze
        && m == Path::new("/")
    {
        return Err(bad(
            key("fsfreeze"),
            "freezing / would stop this host; name the mount point of a file system on the volume"
                .into(),
        ));
    }
    if s.snapshot_command.is_some() && s.tracker == "qcow2-bitmap" {
        return Err(bad(
                    key("snapshot_command"),
                    "not supported with tracker = \"qcow2-bitmap\" (the tracker reads the image itself, through qemu-storage-daemon)".into(),
                ));
    }
    if s.hook_timeout.0 < Duration::from_secs(1) {
        return Err(bad(key("hook_timeout"), "must be at least 1s".into()));
    }
    let quiesce = QuiesceConfig {
        pre_snapshot: s.pre_snapshot.clone(),
        post_snapshot: s.post_snapshot.clone(),
        snapshot_command: s.snapshot_command.clone(),
        snapshot_cleanup: s.snapshot_cleanup.clone(),
        fsfreeze,
        hook_timeout: s.hook_timeout.0,
        require_app_consistent: s.require_app_consistent,
    };
    if quiesce.require_app_consistent && quiesce.is_empty() {
        return Err(bad(
            key("require_app_consistent"),
            "set, but no pre_snapshot, fsfreeze or snapshot_command makes a point app-consistent"
                .into(),
        ));
    }
    Ok(quiesce)
}

impl NbdEndpoint {
    /// Whether two exports would fight over one socket or port (port 0 never does).
    fn same_place(&self, other: &NbdEndpoint) -> bool {
        match (self, other) {
            (NbdEndpoint::Unix(a), NbdEndpoint::Unix(b)) => a == b,
            (NbdEndpoint::Tls { addr: a, .. }, NbdEndpoint::Tls { addr: b, .. }) => {
                a.port() != 0 && a == b
            }
            _ => false,
        }
    }
}

/// The export of one source from `nbd_socket`, `nbd_listen`, `nbd_tls` and
/// `nbd_client_role`: `None` for a tracker other than `nbd-filter` (which may set
/// none of them). Plain TCP is refused: on a loopback port any local user, or any
/// container sharing the host's network, could read and write the disk.
fn nbd_endpoint(
    s: &SourceToml,
    path: &Path,
    bad: &impl Fn(String, String) -> ConfigError,
    key: &impl Fn(&str) -> String,
) -> Result<Option<NbdEndpoint>, ConfigError> {
    if s.tracker != "nbd-filter" {
        let set = [
            ("nbd_socket", s.nbd_socket.is_some()),
            ("nbd_listen", s.nbd_listen.is_some()),
            ("nbd_tls", s.nbd_tls.is_some()),
            ("nbd_client_role", s.nbd_client_role.is_some()),
        ];
        if let Some((k, _)) = set.iter().find(|(_, set)| *set) {
            return Err(bad(
                key(k),
                "only used with tracker = \"nbd-filter\"".into(),
            ));
        }
        return Ok(None);
    }
    match (&s.nbd_socket, &s.nbd_listen) {
        (Some(_), Some(_)) => Err(bad(
            key("nbd_listen"),
            "set nbd_socket or nbd_listen, not both".into(),
        )),
        (None, None) => Err(bad(
            key("nbd_socket"),
            "tracker = \"nbd-filter\" needs nbd_socket (or nbd_listen with nbd_tls): the export the host writes through".into(),
        )),
        (Some(p), None) => {
            let k = if s.nbd_tls.is_some() {
                Some("nbd_tls")
            } else if s.nbd_client_role.is_some() {
                Some("nbd_client_role")
            } else {
                None
            };
            if let Some(k) = k {
                return Err(bad(
                    key(k),
                    "only used with nbd_listen (nbd_socket is guarded by its file permissions: the agent's user only)".into(),
                ));
            }
            Ok(Some(NbdEndpoint::Unix(resolve(path, p))))
        }
        (None, Some(a)) => {
            let addr: std::net::SocketAddr = a.parse().map_err(|_| {
                bad(key("nbd_listen"), format!("\"{a}\" is not an address:port"))
            })?;
            if !addr.ip().is_loopback() {
                return Err(bad(
                    key("nbd_listen"),
                    format!(
                        "{a} is not a loopback address; a protected host listens on no network port"
                    ),
                ));
            }
            if s.nbd_tls != Some(true) {
                return Err(bad(
                    key("nbd_listen"),
                    "plain TCP would let any local user read and write the disk (and any container sharing the host's network); use nbd_socket, or set nbd_tls = true and nbd_client_role".into(),
                ));
            }
            let role = s.nbd_client_role.as_deref().ok_or_else(|| {
                bad(
                    key("nbd_client_role"),
                    "nbd_tls = true needs nbd_client_role: the role (agent, admin, ...) of the fleet certificates that may use the export".into(),
                )
            })?;
            let client_role = role
                .parse::<Role>()
                .map_err(|m| bad(key("nbd_client_role"), m.to_string()))?;
            Ok(Some(NbdEndpoint::Tls { addr, client_role }))
        }
    }
}

impl bulwark_common::daemon::DaemonConfig for AgentConfig {
    fn telemetry(&self) -> &bulwark_common::config::TelemetryConfig {
        &self.telemetry
    }
}

#[cfg(test)]
mod tests {
    /// `coordinators = [...]` or `coordinator = "..."`, never both; errors name the
    /// key and the entry.
    #[test]
    fn coordinators_are_a_list_or_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        let load = |lines: &str| {
            let text = format!(
                "name = \"host-1\"\n{lines}state_dir = \"/var/lib/bulwark\"\n[tls]\nca = \"ca.crt\"\ncert = \"a.crt\"\nkey = \"a.key\"\n"
            );
            std::fs::write(&path, text).expect("write");
            super::AgentConfig::load(&path).map(|c| c.coordinators.to_string())
        };
        assert_eq!(
            load("coordinator = \"https://a:7443\"\n").expect("one"),
            "https://a:7443"
        );
        assert_eq!(
            load("coordinators = [\"https://b:7443\", \"https://a:7443\"]\n").expect("two"),
            "https://b:7443,https://a:7443"
        );
        for (lines, wants) in [
            (
                "coordinator = \"https://a:1\"\ncoordinators = [\"https://b:1\"]\n",
                &["key `coordinators`", "both"][..],
            ),
            (
                "coordinators = []\n",
                &["key `coordinators`", "no coordinator"],
            ),
            ("", &["key `coordinators`", "no coordinator"]),
            (
                "coordinators = [\"https://a:1\", \"https://b\"]\n",
                &["key `coordinators[1]`", "entry 1 (\"https://b\")"],
            ),
            (
                "coordinators = [\"https://a:1\", \"https://a:1\"]\n",
                &["key `coordinators[1]`", "entry 0 again"],
            ),
        ] {
            let e = load(lines).expect_err(lines).to_string();
            for w in wants {
                assert!(e.contains(w), "{lines:?}: {e} (wants {w:?})");
            }
        }
    }

    /// `compress`: "zstd" or "off" (the default) on volume sources; anything else,
    /// or compression of a log source, is refused naming the key.
    #[test]
    fn compress_is_typed_at_load() {
        use super::Compress;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        let load = |source: &str| {
            let text = format!(
                "name = \"host-1\"\ncoordinator = \"https://127.0.0.1:7443\"\nstate_dir = \"/var/lib/bulwark\"\n[tls]\nca = \"ca.crt\"\ncert = \"a.crt\"\nkey = \"a.key\"\n[[sources]]\nname = \"data\"\n{source}"
            );
            std::fs::write(&path, text).expect("write");
            super::AgentConfig::load(&path).map(|c| c.sources[0].compress)
        };
        let volume = "kind = \"volume\"\npath = \"/dev/vdb\"\n";
        for (line, want) in [
            ("", Compress::Off),
            ("compress = \"off\"\n", Compress::Off),
            ("compress = \"zstd\"\n", Compress::Zstd),
        ] {
            match load(&format!("{volume}{line}")) {
                Ok(c) => assert_eq!(c, want, "{line:?}"),
                Err(e) => panic!("{line:?}: {e}"),
            }
        }
        let e = load(&format!("{volume}compress = \"lz4\"\n"))
            .expect_err("lz4 is refused")
            .to_string();
        assert!(
            e.contains("sources[0].compress") && e.contains("\"lz4\" is not a compression"),
            "{e}"
        );
        let e = load("kind = \"log\"\npath = \"/var/log/app\"\ncompress = \"zstd\"\n")
            .expect_err("a log source is refused")
            .to_string();
        assert!(
            e.contains("sources[0].compress") && e.contains("only used with kind = \"volume\""),
            "{e}"
        );
    }

    /// Two data sources on one VM's QMP socket are refused, naming the key.
    #[test]
    fn one_source_per_vm() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        let source = |name: &str| {
            format!(
                "[[sources]]\nname = \"{name}\"\nkind = \"volume\"\npath = \"/var/lib/{name}.qcow2\"\ntracker = \"qcow2-bitmap\"\nqmp_socket = \"/run/vm1/qmp.sock\"\n"
            )
        };
        let text = format!(
            "name = \"host-1\"\ncoordinator = \"https://127.0.0.1:7443\"\nstate_dir = \"/var/lib/bulwark\"\n[tls]\nca = \"ca.crt\"\ncert = \"a.crt\"\nkey = \"a.key\"\n{}{}",
            source("disk-a"),
            source("disk-b")
        );
        std::fs::write(&path, &text).expect("write");
        let e = super::AgentConfig::load(&path)
            .expect_err("refused")
            .to_string();
        assert!(
            e.contains("qmp_socket") && e.contains("already the QMP socket of another data source"),
            "{e}"
        );
        // One of them alone loads.
        std::fs::write(&path, text.replace(&source("disk-b"), "")).expect("write");
        if let Err(e) = super::AgentConfig::load(&path) {
            panic!("one source on the VM: {e}");
        }
    }

    /// The nbd-filter's export: a socket, or TLS with a role; plain TCP, a role
    /// without TLS or TLS without a role are refused, naming the key.
    #[test]
    fn nbd_exports() {
        use super::NbdEndpoint;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        let load = |lines: &str, top: &str| {
            let text = format!(
                "name = \"host-1\"\ncoordinator = \"https://127.0.0.1:7443\"\nstate_dir = \"/var/lib/bulwark\"\n{top}\n[[sources]]\nname = \"vm\"\nkind = \"volume\"\npath = \"/srv/vm.img\"\ntracker = \"nbd-filter\"\n{lines}\n[tls]\nca = \"ca.crt\"\ncert = \"a.crt\"\nkey = \"a.key\"\n"
            );
            std::fs::write(&path, text).expect("write");
            super::AgentConfig::load(&path)
        };
        let endpoint = |lines: &str| match load(lines, "") {
            Ok(c) => c.sources[0].nbd.clone(),
            Err(e) => panic!("{lines}: {e}"),
        };
        let refused = |lines: &str, top: &str, key: &str, why: &str| {
            let e = load(lines, top).map(|_| ()).expect_err(lines).to_string();
            assert!(
                e.contains(&format!("`{key}`")) && e.contains(why),
                "{lines}: {e}"
            );
        };
        assert_eq!(
            endpoint("nbd_socket = \"/run/bulwark/nbd/vm.sock\""),
            Some(NbdEndpoint::Unix("/run/bulwark/nbd/vm.sock".into()))
        );
        assert_eq!(
            endpoint(
                "nbd_listen = \"127.0.0.1:10809\"\nnbd_tls = true\nnbd_client_role = \"agent\""
            ),
            Some(NbdEndpoint::Tls {
                addr: "127.0.0.1:10809".parse().expect("addr"),
                client_role: super::Role::Agent
            })
        );
        let plain = "plain TCP would let any local user";
        refused(
            "nbd_listen = \"127.0.0.1:10809\"",
            "",
            "sources[0].nbd_listen",
            plain,
        );
        refused(
            "nbd_listen = \"127.0.0.1:10809\"\nnbd_tls = false",
            "",
            "sources[0].nbd_listen",
            plain,
        );
        refused(
            "nbd_listen = \"127.0.0.1:10809\"\nnbd_tls = true",
            "",
            "sources[0].nbd_client_role",
            "needs nbd_client_role",
        );
        refused(
            "nbd_listen = \"127.0.0.1:10809\"\nnbd_tls = true\nnbd_client_role = \"root\"",
            "",
            "sources[0].nbd_client_role",
            "unknown role",
        );
        refused(
            "nbd_socket = \"/run/x.sock\"\nnbd_tls = true",
            "",
            "sources[0].nbd_tls",
            "only used with nbd_listen",
        );
        refused(
            "nbd_socket = \"/run/x.sock\"\nnbd_client_role = \"agent\"",
            "",
            "sources[0].nbd_client_role",
            "only used with nbd_listen",
        );
        // The limits, top level.
        let sock = "nbd_socket = \"/run/bulwark/nbd/vm.sock\"";
        match load(
            sock,
            "nbd_max_connections = 4\nnbd_handshake_timeout = \"3s\"",
        ) {
            Ok(c) => assert_eq!(
                (c.nbd_limits.max_connections, c.nbd_limits.handshake_timeout),
                (4, std::time::Duration::from_secs(3))
            ),
            Err(e) => panic!("{e}"),
        }
        refused(
            sock,
            "nbd_max_connections = 0",
            "nbd_max_connections",
            "at least 1",
        );
        refused(
            sock,
            "nbd_handshake_timeout = \"10ms\"",
            "nbd_handshake_timeout",
            "at least 1s",
        );
    }

    /// The commented example in deploy/examples/ is a config this version accepts.
    #[test]
    fn the_example_config_loads() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/agent.toml");
        if let Err(e) = super::AgentConfig::load(&path) {
            panic!("{} does not load: {e}", path.display());
        }
    }
}
