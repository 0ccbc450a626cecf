//! `agent.toml`: what an operator writes, and its checked runtime form.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bulwark_common::block::{DEFAULT_BLOCK_SIZE, Geometry};
use bulwark_common::config::{ByteSize, ConfigError, HumanDuration, TlsFiles, resolve};
use bulwark_common::tls::Target;
use serde::Deserialize;

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentToml {
    /// Name of this agent (the protected host) in the fleet; must match its certificate.
    pub name: String,
    /// `https://host:port` of the coordinator. The agent only dials out.
    pub coordinator: String,
    /// Where the agent keeps its state (a lock file; later, tracker state).
    pub state_dir: PathBuf,
    /// The data sources this agent protects.
    #[serde(default)]
    pub sources: Vec<SourceToml>,
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
    /// How changed blocks are found: `fingerprint` (more trackers are planned).
    #[serde(default = "default_tracker")]
    pub tracker: String,
    /// Tracking unit (`64KiB`); a power of two from 4 KiB to 4 MiB.
    #[serde(default = "default_block_size")]
    pub block_size: ByteSize,
    /// Time between scheduled syncs (`15m`).
    #[serde(default = "default_interval")]
    pub sync_interval: HumanDuration,
    /// For the `nbd-filter` tracker: the NBD socket the host writes through.
    #[serde(default)]
    pub nbd_socket: Option<PathBuf>,
    /// For `log` sources: which files of the directory are logs.
    #[serde(default)]
    pub glob: Option<String>,
}

fn default_tracker() -> String {
    "fingerprint".into()
}
fn default_block_size() -> ByteSize {
    ByteSize(u64::from(DEFAULT_BLOCK_SIZE))
}
fn default_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(15 * 60))
}

/// A checked data source.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub name: String,
    pub path: PathBuf,
    pub tracker: String,
    pub block_size: u32,
    pub sync_interval: Duration,
}

/// Checked configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub name: String,
    pub coordinator: Target,
    pub state_dir: PathBuf,
    pub sources: Vec<SourceConfig>,
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
        let coordinator =
            Target::parse(&t.coordinator).map_err(|m| bad("coordinator".into(), m))?;
        let mut sources: Vec<SourceConfig> = Vec::new();
        for (i, s) in t.sources.into_iter().enumerate() {
            let key = |k: &str| format!("sources[{i}].{k}");
            if !bulwark_common::pki::valid_name(&s.name) {
                return Err(bad(
                    key("name"),
                    format!("\"{}\" is not a valid name", s.name),
                ));
            }
            if sources.iter().any(|x| x.name == s.name) {
                return Err(bad(
                    key("name"),
                    format!("data source \"{}\" is listed twice", s.name),
                ));
            }
            match s.kind.as_str() {
                "volume" => {}
                "log" => {
                    return Err(bad(
                        key("kind"),
                        "log sources are not supported by this version yet; use kind = \"volume\""
                            .into(),
                    ));
                }
                other => {
                    return Err(bad(
                        key("kind"),
                        format!("\"{other}\" is not volume or log"),
                    ));
                }
            }
            match s.tracker.as_str() {
                "fingerprint" => {}
                "qcow2-bitmap" | "nbd-filter" | "dm-era" => {
                    return Err(bad(
                        key("tracker"),
                        format!(
                            "tracker \"{}\" is not available in this version yet; use \"fingerprint\"",
                            s.tracker
                        ),
                    ));
                }
                other => {
                    return Err(bad(
                        key("tracker"),
                        format!(
                            "unknown tracker \"{other}\" (fingerprint, qcow2-bitmap, nbd-filter, dm-era)"
                        ),
                    ));
                }
            }
            if s.nbd_socket.is_some() {
                return Err(bad(
                    key("nbd_socket"),
                    "only used with tracker = \"nbd-filter\"".into(),
                ));
            }
            if s.glob.is_some() {
                return Err(bad(key("glob"), "only used with kind = \"log\"".into()));
            }
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
            if s.sync_interval.0 < Duration::from_secs(1) {
                return Err(bad(key("sync_interval"), "must be at least 1s".into()));
            }
            sources.push(SourceConfig {
                name: s.name,
                path: resolve(path, &s.path),
                tracker: s.tracker,
                block_size,
                sync_interval: s.sync_interval.0,
            });
        }
        Ok(AgentConfig {
            name: t.name,
            coordinator,
            state_dir: resolve(path, &t.state_dir),
            sources,
            tls: t.tls.relative_to(path),
        })
    }
}
