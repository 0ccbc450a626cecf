//! Lifecycle of an agent, in order: load the identity, lock the state directory,
//! measure the volumes, open the control stream to the coordinator (reconnecting
//! with backoff), run scheduled syncs and the commands the coordinator relays, and on
//! shutdown let running work stop.
//!
//! The agent dials out only: a protected host listens on no network port (an
//! nbd-filter export is a private Unix socket or a TLS loopback port, see
//! [`crate::export`]).

use bulwark_common::failover::CoordinatorChannel;
use bulwark_common::telemetry::TracedChannel;
use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bulwark_common::renewal::{RENEWAL_CHECK, Renewal};
use bulwark_common::tls::{self, Role, Target, TlsIdentity};
use bulwark_common::worker::WorkerSet;
use bulwark_proto as pb;
use bulwark_proto::coordinator_client::CoordinatorClient;
use bulwark_proto::node_client::NodeClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{AgentConfig, SourceConfig, SourceKind};
use crate::restore::restore_point;
use crate::sync::{SyncOptions, SyncOutcome, sync_source};
use crate::tracker::era::EraTracker;
use crate::tracker::filter::FilterTracker;
use crate::tracker::qcow2::{self, Qcow2Tracker};
use crate::tracker::{FingerprintTracker, Tracker};
use crate::volume::Volume;
use crate::workers::ScheduledSync;
use bulwark_common::block::Geometry;
use bulwark_common::metrics::Progress;

/// A sync, ship or restore this agent could not run, and why.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("this agent does not protect {0}")]
    NotProtected(String),
    #[error(
        "{0} is a log source: a consistency check applies to volumes (each ship already compares what the node holds)"
    )]
    LogCheck(String),
    #[error("a sync or restore of {0} is already running")]
    Busy(String),
    #[error("coordinator unreachable and no assignment known for {name}: {}", .status.message())]
    NoAssignment {
        name: String,
        #[source]
        status: tonic::Status,
    },
    #[error("coordinator: {}", .0.message())]
    Coordinator(#[source] tonic::Status),
    #[error("data source {0} has been moving for an hour")]
    Moving(String),
    #[error(transparent)]
    Target(#[from] bulwark_common::tls::TargetError),
    #[error(transparent)]
    Tls(#[from] bulwark_common::tls::TlsError),
    #[error(transparent)]
    Connect(#[from] bulwark_common::tls::ConnectError),
    #[error(transparent)]
    Sync(#[from] crate::sync::SyncError),
    #[error(transparent)]
    Log(#[from] crate::logs::LogError),
    #[error(transparent)]
    Restore(#[from] crate::restore::RestoreError),
    #[error("restore path {0} must be absolute")]
    RelativePath(String),
    #[error("the restore command carries no assignment")]
    NoRestoreAssignment,
    #[error("{0}")]
    ManifestJson(#[source] serde_json::Error),
    #[error("cannot create {path}: {source}")]
    ManifestCreate {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    ManifestWrite {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot fsync {path}: {source}")]
    ManifestFsync {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl AgentError {
    /// Whether the node refused because the source is moving to another node
    /// (the sync waits for the move, then follows it).
    fn is_move(&self) -> bool {
        self.to_string().contains("is moving to node")
    }
}

/// Shared state of a running agent.
pub struct Agent {
    cfg: AgentConfig,
    coordinator: CoordinatorClient<CoordinatorChannel>,
    /// Dials nodes with the agent's certificate, checking that the node answering
    /// is the one the coordinator assigned.
    identity: TlsIdentity,
    /// Channels to nodes by address, with the node's name and the revocation list
    /// version they were made under (a new list makes new connections).
    node_channels: Mutex<HashMap<String, (String, u64, TracedChannel)>>,
    assignments: Mutex<HashMap<String, pb::Assignment>>,
    running: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    control_tx: Mutex<Option<mpsc::Sender<pb::AgentMessage>>>,
    trackers: HashMap<String, Arc<dyn Tracker>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Agent {
    /// A sync of `s` on its own schedule, unless the source was put in a protection
    /// group with `bulwark group add` (the coordinator schedules it then).
    pub(crate) async fn scheduled_sync(&self, s: &SourceConfig) -> Result<(), AgentError> {
        let grouped = s.kind == SourceKind::Volume
            && lock(&self.assignments)
                .get(&s.name)
                .is_some_and(|x| !x.group.is_empty());
        if grouped {
            return Ok(());
        }
        tracing::info!(source = %s.name, "scheduled sync");
        self.sync(&s.name, SyncOptions::default()).await.map(drop)
    }

    fn source(&self, name: &str) -> Option<&SourceConfig> {
        self.cfg.sources.iter().find(|s| s.name == name)
    }

    /// A client of node `node` at `address`: a process there with any other
    /// certificate (another node's, one the fleet revoked) is refused in the
    /// handshake, so a volume never goes to a node it was not assigned to.
    fn node_client(
        &self,
        node: &str,
        address: &str,
    ) -> Result<NodeClient<TracedChannel>, AgentError> {
        let version = self.identity.revocations().version();
        let mut map = lock(&self.node_channels);
        let ch = match map.get(address) {
            Some((n, v, c)) if n == node && *v == version => c.clone(),
            _ => {
                let target = Target::parse(address)?;
                let cfg = self.identity.client_config_for(Role::Node, Some(node))?;
                let c = tls::channel_lazy(&target, cfg)?;
                map.insert(address.to_string(), (node.to_string(), version, c.clone()));
                c
            }
        };
        Ok(NodeClient::new(ch)
            .max_decoding_message_size(bulwark_common::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(bulwark_common::MAX_MESSAGE_BYTES))
    }

    /// The current assignment, from the coordinator when it answers.
    async fn assignment(&self, source: &str) -> Result<pb::Assignment, AgentError> {
        let mut c = self.coordinator.clone();
        match c
            .get_assignment(pb::GetAssignmentRequest {
                source: source.to_string(),
            })
            .await
        {
            Ok(r) => {
                let a = r.into_inner();
                lock(&self.assignments).insert(source.to_string(), a.clone());
                Ok(a)
            }
            Err(s) if s.code() == tonic::Code::Unavailable || s.code() == tonic::Code::Unknown => {
                lock(&self.assignments).get(source).cloned().ok_or_else(|| {
                    AgentError::NoAssignment {
                        name: source.to_string(),
                        status: s,
                    }
                })
            }
            Err(s) => Err(AgentError::Coordinator(s)),
        }
    }

    fn report(&self, msg: pb::agent_message::Msg) {
        let tx = lock(&self.control_tx).clone();
        if let Some(tx) = tx {
            let _ = tx.try_send(pb::AgentMessage { msg: Some(msg) });
        }
    }

    /// Reports `progress` of `op` on `source` to the coordinator about twice a
    /// second until the returned task is aborted.
    fn report_progress(
        &self,
        source: &str,
        op: &'static str,
        progress: Arc<Progress>,
    ) -> tokio::task::JoinHandle<()> {
        let tx = lock(&self.control_tx).clone();
        let source = source.to_string();
        tokio::spawn(async move {
            let Some(tx) = tx else { return };
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let msg = pb::OpProgress {
                    source: source.clone(),
                    op: op.to_string(),
                    done_bytes: progress.done.load(std::sync::atomic::Ordering::Relaxed),
                    total_bytes: progress.total.load(std::sync::atomic::Ordering::Relaxed),
                };
                if tx
                    .try_send(pb::AgentMessage {
                        msg: Some(pb::agent_message::Msg::Progress(msg)),
                    })
                    .is_err()
                    && tx.is_closed()
                {
                    return;
                }
            }
        })
    }

    fn tracker(&self, name: &str) -> Result<Arc<dyn Tracker>, AgentError> {
        self.trackers
            .get(name)
            .cloned()
            .ok_or_else(|| AgentError::NotProtected(name.to_string()))
    }

    fn inconsistent(&self, name: &str) -> bool {
        self.trackers.get(name).is_some_and(|t| !t.consistent())
    }

    /// Tells the coordinator a sync of `name` started (no result, no error) or ended,
    /// with the state of its record.
    fn report_sync(&self, name: &str, result: Option<pb::SyncResult>, error: String) {
        self.report(pb::agent_message::Msg::Report(pb::SyncReport {
            source: name.to_string(),
            result,
            error,
            inconsistent: self.inconsistent(name),
            recheck_bytes: self.recheck_bytes(name),
        }));
    }

    fn recheck_bytes(&self, name: &str) -> u64 {
        self.trackers.get(name).map_or(0, |t| t.recheck_bytes())
    }

    /// Runs one sync (or check) of `name`, unless one is already running.
    pub async fn sync(&self, name: &str, opts: SyncOptions) -> Result<SyncOutcome, AgentError> {
        let source = self
            .source(name)
            .ok_or_else(|| AgentError::NotProtected(name.to_string()))?
            .clone();
        let tracker = match source.kind {
            SourceKind::Volume => Some(self.tracker(name)?),
            SourceKind::Log if opts.check => return Err(AgentError::LogCheck(name.to_string())),
            SourceKind::Log => None,
        };
        let gate = lock(&self.running)
            .entry(name.to_string())
            .or_default()
            .clone();
        let _running = gate
            .try_lock()
            .map_err(|_| AgentError::Busy(name.to_string()))?;
        self.report_sync(name, None, String::new());
        let span = if opts.check {
            tracing::info_span!("check", source = %name, deep = opts.deep, point = tracing::field::Empty)
        } else if tracker.is_none() {
            tracing::info_span!("ship", source = %name, point = tracing::field::Empty)
        } else {
            tracing::info_span!("sync", source = %name, point = tracing::field::Empty)
        };
        let result = async {
            // A move in progress: wait for it (the node refuses syncs meanwhile), then
            // follow the new assignment. A move can also begin between the look-up
            // and the node's answer: the node's refusal says so, and the sync waits.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3600);
            loop {
                let a = self.assignment(name).await?;
                if a.moving_to.is_empty() {
                    let node = self.node_client(&a.node, &a.node_address)?;
                    tracing::info!(node = %a.node, epoch = a.epoch, "sync started");
                    let done = match &tracker {
                        Some(t) => {
                            let op = if opts.check { "check" } else { "sync" };
                            let progress = Arc::new(Progress::default());
                            let reporter = self.report_progress(name, op, progress.clone());
                            let r = sync_source(
                                &source,
                                t.clone(),
                                &self.cfg.state_dir,
                                &a,
                                node,
                                opts,
                                progress,
                            )
                            .await
                            .map_err(AgentError::from);
                            reporter.abort();
                            r
                        }
                        None => {
                            crate::logs::ship(&source.name, &source.path, &source.glob, &a, node)
                                .await
                                .map(ship_outcome)
                                .map_err(AgentError::from)
                        }
                    };
                    match done {
                        Ok(o) => return Ok(o),
                        Err(e) if e.is_move() => {}
                        Err(e) => return Err(e),
                    }
                }
                if std::time::Instant::now() > deadline {
                    return Err(AgentError::Moving(name.to_string()));
                }
                tracing::info!("the source is moving to another node; the sync waits");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
        .instrument(span.clone())
        .await;
        let _e = span.enter();
        bulwark_common::metrics::record_sync(
            name,
            result
                .as_ref()
                .ok()
                .map(|o| bulwark_common::metrics::SyncFigures {
                    log: tracker.is_none(),
                    bytes: o.bytes_sent,
                    blocks: o.blocks_sent,
                    seconds: o.duration_ms as f64 / 1000.0,
                }),
        );
        match &result {
            Ok(o) => tracing::info!(
                point = o.point.id,
                blocks_sent = o.blocks_sent,
                blocks_scanned = o.blocks_scanned,
                bytes_sent = o.bytes_sent,
                wire_bytes = o.wire_bytes,
                duration_ms = o.duration_ms,
                damaged_blocks = o.damaged_blocks,
                consistency = o.consistency.as_str(),
                "sync committed"
            ),
            Err(e) => tracing::warn!("sync failed: {e}"),
        }
        self.report_sync(
            name,
            result.as_ref().ok().map(|o| sync_result(name, o)),
            result
                .as_ref()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default(),
        );
        result
    }

    async fn restore(&self, cmd: &pb::RestoreCommand) -> Result<pb::RestoreResult, AgentError> {
        let path = std::path::PathBuf::from(&cmd.path);
        if !path.is_absolute() {
            return Err(AgentError::RelativePath(cmd.path.clone()));
        }
        let started = std::time::Instant::now();
        let mut out = pb::RestoreResult {
            source: cmd.source.clone(),
            path: cmd.path.clone(),
            agent: self.cfg.name.clone(),
            at_ms: cmd.at_ms,
            ..Default::default()
        };
        let is_log = cmd.kind == pb::SourceKind::Log as i32;
        let span = tracing::info_span!("restore", source = %cmd.source, point = cmd.point, path = %cmd.path, at_ms = cmd.at_ms);
        async {
            if cmd.at_ms != 0 {
                crate::logs::prepare_dir(&path)?;
            }
            // The volume part: the whole restore, or `volume` in an --at directory.
            if !cmd.source.is_empty() && !is_log {
                let a = cmd
                    .assignment
                    .as_ref()
                    .ok_or(AgentError::NoRestoreAssignment)?;
                let node = self.node_client(&a.node, &a.node_address)?;
                let target = if cmd.at_ms != 0 {
                    path.join("volume")
                } else {
                    path.clone()
                };
                let protected = self.cfg.sources.iter().map(|s| s.path.clone()).collect();
                let progress = Arc::new(Progress::default());
                let reporter = self.report_progress(&cmd.source, "restore", progress.clone());
                let r = restore_point(
                    &cmd.source,
                    cmd.point,
                    &target,
                    protected,
                    node,
                    Some(progress),
                )
                .await;
                reporter.abort();
                let o = r?;
                tracing::info!(point = o.point, path = %o.path.display(), bytes = o.bytes_written, "volume restored");
                out.point = o.point;
                out.bytes_written += o.bytes_written;
            }
            // The log part: a log point restored on its own, or `logs/` for --at.
            let log = if is_log {
                cmd.assignment.as_ref().map(|a| (cmd.source.clone(), cmd.point, a.clone()))
            } else {
                cmd.log
                    .as_ref()
                    .and_then(|l| l.assignment.clone().map(|a| (l.source.clone(), l.point, a)))
            };
            if let Some((source, point, a)) = log {
                let node = self.node_client(&a.node, &a.node_address)?;
                let dir = if cmd.at_ms != 0 {
                    path.join("logs")
                } else {
                    path.clone()
                };
                let o = crate::logs::restore_logs(&source, point, &dir, node).await?;
                tracing::info!(log_source = %source, point = o.point.id, files = o.files, bytes = o.bytes_written, "logs restored");
                out.log_source = source;
                out.log_point = o.point.id;
                out.log_point_created_ms = o.point.created_at_ms;
                out.log_files = o.files;
                out.bytes_written += o.bytes_written;
                if is_log {
                    out.point = o.point.id;
                    out.point_created_ms = o.point.created_at_ms;
                }
            }
            if cmd.at_ms != 0 {
                write_restore_manifest(&path, cmd, &out)?;
            }
            Ok::<_, AgentError>(())
        }
        .instrument(span)
        .await?;
        out.duration_ms = started.elapsed().as_millis() as u64;
        tracing::info!(source = %cmd.source, point = out.point, path = %cmd.path, bytes = out.bytes_written, "restore finished");
        Ok(out)
    }

    fn hello(&self) -> pb::Hello {
        pb::Hello {
            sources: self
                .cfg
                .sources
                .iter()
                .map(|s| pb::SourceSpec {
                    name: s.name.clone(),
                    kind: match s.kind {
                        SourceKind::Volume => pb::SourceKind::Volume,
                        SourceKind::Log => pb::SourceKind::Log,
                    } as i32,
                    size_bytes: self.trackers.get(&s.name).map_or(0, |t| t.size_bytes()),
                    block_size: s.block_size,
                    tracker: s.tracker.clone(),
                    inconsistent: self.inconsistent(&s.name),
                    recheck_bytes: self.recheck_bytes(&s.name),
                    busy: lock(&self.running)
                        .get(&s.name)
                        .is_some_and(|gate| gate.try_lock().is_err()),
                    policy: Some(s.policy),
                    group: s.group.clone().unwrap_or_default(),
                })
                .collect(),
            version: bulwark_common::VERSION.to_string(),
        }
    }
}

fn sync_result(name: &str, o: &SyncOutcome) -> pb::SyncResult {
    pb::SyncResult {
        source: name.to_string(),
        point: o.point.id,
        bytes_sent: o.bytes_sent,
        wire_bytes: o.wire_bytes,
        blocks_sent: o.blocks_sent,
        blocks_scanned: o.blocks_scanned,
        duration_ms: o.duration_ms,
        kind: o.point.kind,
        consistency: o.consistency.to_proto(),
        damaged_blocks: o.damaged_blocks,
        warnings: o.warnings.clone(),
        blocks_read: o.blocks_scanned,
        files_sent: o.files_sent,
        bytes_read: o.bytes_read,
    }
}

/// `restore.json` of a restore to a moment: what is in the directory, and how a
/// database replays it.
fn write_restore_manifest(
    dir: &std::path::Path,
    cmd: &pb::RestoreCommand,
    r: &pb::RestoreResult,
) -> Result<(), AgentError> {
    use std::io::Write;
    let at = bulwark_common::time::rfc3339_ms(cmd.at_ms);
    let mut doc = serde_json::json!({
        "at": at,
        "restored_by": r.agent,
    });
    if !cmd.source.is_empty() && cmd.kind != pb::SourceKind::Log as i32 {
        doc["volume"] = serde_json::json!({
            "source": cmd.source,
            "point": r.point,
            "path": "volume",
        });
    }
    if !r.log_source.is_empty() {
        doc["logs"] = serde_json::json!({
            "source": r.log_source,
            "point": r.log_point,
            "point_created_at": bulwark_common::time::rfc3339_ms(r.log_point_created_ms),
            "files": r.log_files,
            "path": "logs",
        });
        // PostgreSQL reads recovery_target_time before it knows zone abbreviations:
        // "Z" is refused there, "+00:00" is not.
        let pg_time = match at.strip_suffix('Z') {
            Some(t) => format!("{t}+00:00"),
            None => at.clone(),
        };
        doc["postgresql"] = serde_json::json!({
            "restore_command": format!("cp {}/logs/%f %p", dir.display()),
            "recovery_target_time": pg_time,
        });
    }
    let path = dir.join("restore.json");
    let text = serde_json::to_string_pretty(&doc).map_err(AgentError::ManifestJson)?;
    let mut f = File::create(&path).map_err(|source| AgentError::ManifestCreate {
        path: path.clone(),
        source,
    })?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.write_all(b"\n"))
        .and_then(|()| f.sync_all())
        .map_err(|source| AgentError::ManifestWrite {
            path: path.clone(),
            source,
        })?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| AgentError::ManifestFsync {
            path: dir.to_path_buf(),
            source,
        })
}

/// A log ship in the shape of a sync's outcome.
fn ship_outcome(o: crate::logs::ShipOutcome) -> SyncOutcome {
    SyncOutcome {
        consistency: bulwark_common::point::Consistency::from_proto(o.point.consistency),
        point: o.point,
        bytes_sent: o.bytes_sent,
        wire_bytes: o.bytes_sent,
        blocks_sent: 0,
        blocks_scanned: 0,
        duration_ms: o.duration_ms,
        damaged_blocks: 0,
        warnings: o.warnings,
        files_sent: o.files_sent,
        bytes_read: o.bytes_read,
    }
}

/// Makes the tracker of each data source (and starts the NBD exports of
/// `nbd-filter` sources, which must be up before the host can use its volumes).
async fn open_trackers(
    cfg: &AgentConfig,
    identity: &TlsIdentity,
    exports: &mut tokio::task::JoinSet<()>,
    stop_exports: &CancellationToken,
) -> anyhow::Result<HashMap<String, Arc<dyn Tracker>>> {
    let mut trackers: HashMap<String, Arc<dyn Tracker>> = HashMap::new();
    for s in &cfg.sources {
        if s.kind == SourceKind::Log {
            if !s.path.is_dir() {
                anyhow::bail!(
                    "data source {}: {} is not a directory (a log source is a directory of log files)",
                    s.name,
                    s.path.display()
                );
            }
            continue;
        }
        let cannot_open = || format!("data source {}: cannot open {}", s.name, s.path.display());
        let tracker: Arc<dyn Tracker> = match s.tracker.as_str() {
            "qcow2-bitmap" => {
                let size = qcow2::virtual_size(&s.path)
                    .map_err(anyhow::Error::msg)
                    .with_context(cannot_open)?;
                let g = Geometry::new(size, s.block_size)
                    .map_err(|e| anyhow::anyhow!("data source {}: {e}", s.name))?;
                Arc::new(Qcow2Tracker::new(
                    &s.name,
                    &s.path,
                    g,
                    &cfg.state_dir,
                    s.qmp_socket.as_deref(),
                ))
            }
            "nbd-filter" => {
                let size = Volume::open(&s.path)
                    .with_context(cannot_open)?
                    .size_bytes();
                let g = Geometry::new(size, s.block_size)
                    .map_err(|e| anyhow::anyhow!("data source {}: {e}", s.name))?;
                let f = Arc::new(
                    FilterTracker::open(&s.name, &s.path, g, &cfg.state_dir, s.activity)
                        .with_context(|| {
                            format!(
                                "data source {}: cannot keep its record of changes under {}",
                                s.name,
                                cfg.state_dir.display()
                            )
                        })?,
                );
                let endpoint = s.nbd.clone().ok_or_else(|| {
                    anyhow::anyhow!("data source {}: no NBD export configured", s.name)
                })?;
                let backend = f.backend().with_context(cannot_open)?;
                crate::export::start_export(
                    &s.name,
                    endpoint,
                    backend,
                    cfg.nbd_limits,
                    identity,
                    exports,
                    stop_exports.clone(),
                )
                .await?;
                tracing::info!(source = %s.name, bitmap_bytes = f.memory_bytes(), "nbd-filter tracking");
                f
            }
            "dm-era" => {
                let size = Volume::open(&s.path)
                    .with_context(cannot_open)?
                    .size_bytes();
                let g = Geometry::new(size, s.block_size)
                    .map_err(|e| anyhow::anyhow!("data source {}: {e}", s.name))?;
                let era = s.era.clone().ok_or_else(|| {
                    anyhow::anyhow!("data source {}: no era_metadata configured", s.name)
                })?;
                let (name, path, state) = (s.name.clone(), s.path.clone(), cfg.state_dir.clone());
                tokio::task::spawn_blocking(move || {
                    EraTracker::open(&name, &path, &era.metadata, &era.device, g, &state)
                })
                .await?
                .map_err(|e| anyhow::anyhow!("data source {}: {e}", s.name))?
            }
            _ => {
                let size = Volume::open(&s.path)
                    .with_context(cannot_open)?
                    .size_bytes();
                Arc::new(FingerprintTracker::new(&s.path, size))
            }
        };
        trackers.insert(s.name.clone(), tracker);
    }
    Ok(trackers)
}

/// Holds the state directory for one agent process.
fn lock_state_dir(cfg: &AgentConfig) -> anyhow::Result<File> {
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("cannot create state_dir {}", cfg.state_dir.display()))?;
    let path = cfg.state_dir.join("agent.lock");
    let f = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
    f.try_lock().map_err(|_| {
        anyhow::anyhow!(
            "another bulwark-agent holds {}; only one agent may use a state_dir",
            path.display()
        )
    })?;
    Ok(f)
}

/// Where an agent keeps the fleet's revocation list, in its `state_dir`.
pub const REVOCATIONS_FILE: &str = "revocations.json";

/// How long each background worker gets to finish its run at shutdown.
const WORKER_GRACE: Duration = Duration::from_secs(10);

/// Runs the agent until `shutdown` is cancelled.
pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let identity = TlsIdentity::load_as(&cfg.tls, Role::Agent, Some(&cfg.name))?;
    let _state_lock = lock_state_dir(&cfg)?;
    // The last revocation list the coordinator sent, in force before the agent
    // dials anyone; kept up to date from the control stream.
    identity
        .revocations()
        .persist_at(&cfg.state_dir.join(REVOCATIONS_FILE))
        .map_err(anyhow::Error::msg)?;
    let mut exports = tokio::task::JoinSet::new();
    let stop_exports = CancellationToken::new();
    let trackers = match open_trackers(&cfg, &identity, &mut exports, &stop_exports).await {
        Ok(t) => t,
        Err(e) => {
            stop_exports.cancel();
            while exports.join_next().await.is_some() {}
            return Err(e);
        }
    };
    let channel = CoordinatorChannel::lazy(
        &cfg.coordinators,
        identity.client_config(Role::Coordinator)?,
    )
    .map_err(anyhow::Error::msg)?;
    let agent = Arc::new(Agent {
        coordinator: CoordinatorClient::new(channel),
        identity: identity.clone(),
        node_channels: Mutex::new(HashMap::new()),
        assignments: Mutex::new(HashMap::new()),
        running: Mutex::new(HashMap::new()),
        control_tx: Mutex::new(None),
        trackers,
        cfg,
    });
    tracing::info!(agent = %agent.cfg.name, sources = agent.cfg.sources.len(), "agent started");
    let mut workers = WorkerSet::new();
    workers.spawn(Renewal::new(
        identity.clone(),
        agent.cfg.tls.clone(),
        bulwark_common::enroll::coordinator_signer(agent.coordinator.clone()),
        RENEWAL_CHECK,
    ));
    for s in agent.cfg.sources.clone() {
        // A log source ships on its own interval, in a group or not.
        if let Some(g) = &s.group
            && s.kind == SourceKind::Volume
        {
            tracing::info!(source = %s.name, group = %g, "syncs scheduled by the coordinator (protection group)");
            continue;
        }
        let a = agent.clone();
        let (name, interval) = (s.name.clone(), s.sync_interval);
        workers.spawn(ScheduledSync::new(&name, interval, move || {
            let (a, s) = (a.clone(), s.clone());
            async move {
                a.scheduled_sync(&s)
                    .await
                    .map_err(|e| format!("scheduled sync of {}: {e}", s.name))
            }
        }));
    }
    control_loop(agent.clone(), shutdown).await;
    // The schedules stop first (a sync running finishes within the grace).
    workers.stop(WORKER_GRACE).await;
    // The exports stop first, so no write lands after the record is saved.
    stop_exports.cancel();
    while exports.join_next().await.is_some() {}
    let trackers: Vec<_> = agent.trackers.values().cloned().collect();
    let _ = tokio::task::spawn_blocking(move || {
        for t in trackers {
            t.shutdown();
        }
    })
    .await;
    tracing::info!("agent stopped");
    Ok(())
}

/// Why a control stream to the coordinator ended (the loop reconnects).
#[derive(Debug, thiserror::Error)]
enum ControlError {
    #[error("control channel closed")]
    ChannelClosed,
    /// The coordinator refused the stream: what to check.
    #[error("{0}")]
    Refused(String),
    #[error("the control stream closed")]
    StreamClosed,
    /// The stream failed: the status's message.
    #[error("{}", .0.message())]
    Status(#[source] tonic::Status),
    #[error("the coordinator closed the control stream")]
    CoordinatorClosed,
}

/// How often the agent pings the coordinator on its control stream.
const CONTROL_PING: Duration = Duration::from_secs(15);

/// Keeps the control stream open: Hello, then commands; reconnects with backoff.
async fn control_loop(agent: Arc<Agent>, shutdown: CancellationToken) {
    let mut failures = 0u32;
    loop {
        let session = control_session(agent.clone(), &shutdown);
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = session => r,
        };
        *lock(&agent.control_tx) = None;
        match result {
            Ok(()) => failures = 0,
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(10) {
                    tracing::warn!(
                        "control stream to the coordinator failed (attempt {failures}): {e}"
                    );
                }
            }
        }
        let wait = Duration::from_millis(500 * u64::from(failures.clamp(1, 20)))
            .min(Duration::from_secs(10));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn control_session(
    agent: Arc<Agent>,
    shutdown: &CancellationToken,
) -> Result<(), ControlError> {
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(32);
    tx.send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(agent.hello())),
    })
    .await
    .map_err(|_| ControlError::ChannelClosed)?;
    let mut client = agent.coordinator.clone();
    let mut commands = client
        .control(ReceiverStream::new(rx))
        .await
        .map_err(|s| {
            ControlError::Refused(tls::explain_status(&agent.cfg.coordinators.to_string(), &s))
        })?
        .into_inner();
    *lock(&agent.control_tx) = Some(tx.clone());
    // The coordinator cuts a control stream idle for its stream_idle_timeout
    // (60 s by default): say something well within it.
    let mut ping = tokio::time::interval(CONTROL_PING);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let cmd = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = ping.tick() => {
                let msg = pb::AgentMessage {
                    msg: Some(pb::agent_message::Msg::Ping(pb::Ping {})),
                };
                if tx.send(msg).await.is_err() {
                    return Err(ControlError::StreamClosed);
                }
                continue;
            }
            c = commands.message() => c.map_err(ControlError::Status)?,
        };
        let Some(cmd) = cmd else {
            return Err(ControlError::CoordinatorClosed);
        };
        match cmd.cmd {
            Some(pb::coordinator_command::Cmd::Welcome(w)) => {
                tracing::info!("connected to the coordinator");
                for r in w.sources {
                    match r.assignment {
                        Some(a) => {
                            tracing::info!(source = %r.source, node = %a.node, epoch = a.epoch, "assignment");
                            lock(&agent.assignments).insert(r.source, a);
                        }
                        None => tracing::warn!(source = %r.source, "not assigned yet: {}", r.error),
                    }
                }
            }
            Some(pb::coordinator_command::Cmd::Sync(s)) => {
                let (a, tx) = (agent.clone(), tx.clone());
                let opts = SyncOptions {
                    check: s.check,
                    deep: s.deep,
                };
                let span = tracing::info_span!("command", command = if s.check { "check" } else { "sync" }, source = %s.source, trace_id = tracing::field::Empty);
                bulwark_common::telemetry::set_parent_from_map(&span, &s.trace_context);
                tokio::spawn(async move {
                    let outcome = match a.sync(&s.source, opts).instrument(span).await {
                        Ok(o) => pb::command_result::Outcome::Sync(sync_result(&s.source, &o)),
                        Err(e) => pb::command_result::Outcome::Error(e.to_string()),
                    };
                    let _ = tx
                        .send(pb::AgentMessage {
                            msg: Some(pb::agent_message::Msg::Result(pb::CommandResult {
                                command_id: s.command_id,
                                outcome: Some(outcome),
                            })),
                        })
                        .await;
                });
            }
            Some(pb::coordinator_command::Cmd::Restore(r)) => {
                let (a, tx) = (agent.clone(), tx.clone());
                let span = tracing::info_span!("command", command = "restore", source = %r.source, trace_id = tracing::field::Empty);
                bulwark_common::telemetry::set_parent_from_map(&span, &r.trace_context);
                tokio::spawn(async move {
                    let outcome = match a.restore(&r).instrument(span).await {
                        Ok(res) => pb::command_result::Outcome::Restore(res),
                        Err(e) => {
                            tracing::warn!(source = %r.source, "restore failed: {e}");
                            pb::command_result::Outcome::Error(e.to_string())
                        }
                    };
                    let _ = tx
                        .send(pb::AgentMessage {
                            msg: Some(pb::agent_message::Msg::Result(pb::CommandResult {
                                command_id: r.command_id,
                                outcome: Some(outcome),
                            })),
                        })
                        .await;
                });
            }
            // Put in force in the agent's TLS verifiers (and kept in state_dir).
            Some(pb::coordinator_command::Cmd::Revocations(list)) => {
                if let Err(e) = agent.identity.revocations().apply_newer(list) {
                    tracing::error!("the coordinator's revocation list was not taken: {e}");
                }
            }
            None => {}
        }
    }
}
