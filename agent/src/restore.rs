//! Restore of one recovery point to a path on this host.
//!
//! A new file is written as `PATH.bulwark-partial`, checked block by block against
//! the node's digests and for full coverage, fsync'd, and only then renamed to
//! `PATH`: a failed restore leaves no file that looks finished. An existing block
//! device is written in place (zeros written out, since it is not sparse) unless it is
//! mounted. An existing regular file, and any volume this agent protects, is never
//! overwritten. New files are owner-only (0600): they hold the source's data.

use bulwark_common::telemetry::TracedChannel;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bulwark_common::block::{DirectWriter, ExtentError, Geometry, MAX_BATCH_BYTES};
use bulwark_common::metrics::Progress;
use bulwark_proto as pb;
use bulwark_proto::node_client::NodeClient;
use tonic::Status;

/// A restore that failed: the target path, or what the node sent.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{path} is a volume this agent protects ({live}); restore to another path, then swap")]
    Protected { path: PathBuf, live: PathBuf },
    #[error(
        "block device {path} (or a partition of it) is mounted; unmount it before restoring onto it"
    )]
    Mounted { path: PathBuf },
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot size {path}: {source}")]
    Size {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("block device {path} holds {dev_size} bytes, the point needs {size}")]
    TooSmall {
        path: PathBuf,
        dev_size: u64,
        size: u64,
    },
    #[error("{path} already exists; restore to a new path (or to a block device)")]
    Exists { path: PathBuf },
    #[error("cannot create {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot use {path}: {source}")]
    Use {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The header's geometry, or an extent outside it.
    #[error(transparent)]
    Extent(#[from] ExtentError),
    #[error("block {0} arrived twice")]
    Twice(u64),
    #[error("node refused the restore: {}", .0.message())]
    Refused(#[source] Status),
    /// The node's stream failed: its message.
    #[error("{}", .0.message())]
    Node(#[source] Status),
    #[error("the node's restore stream did not start with a header")]
    NoHeader,
    /// A blocking task panicked or was cancelled.
    #[error("{0}")]
    Task(#[source] tokio::task::JoinError),
    #[error("the restore stream was cut")]
    Cut,
    #[error("restored data failed its check: {0}")]
    Check(#[source] ExtentError),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("a second header in the restore stream")]
    SecondHeader,
    #[error("the restore stream ended after {covered} of {blocks} blocks")]
    Short { covered: u64, blocks: u64 },
    #[error("cannot fsync: {0}")]
    Fsync(#[source] std::io::Error),
    #[error("cannot rename {from} to {to}: {source}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot fsync {path}: {source}")]
    FsyncDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("restore stream broke: {}", .0.message())]
    Broke(#[source] Status),
    #[error("an empty message in the restore stream")]
    Empty,
}

/// What a finished restore did.
#[derive(Debug, Clone)]
pub struct RestoreOutcome {
    pub point: u64,
    pub path: PathBuf,
    pub bytes_written: u64,
    pub duration_ms: u64,
}

struct Target {
    file: File,
    path: PathBuf,
    partial: Option<PathBuf>,
    is_device: bool,
}

/// Whether the block device `dev` (or a partition of it) is mounted.
fn mounted(dev: &Path) -> bool {
    let Ok(canon) = std::fs::canonicalize(dev) else {
        return false;
    };
    let dev = canon.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines()
                .filter_map(|l| l.split_whitespace().next())
                .any(|src| {
                    std::fs::canonicalize(src)
                        .map(|c| c.to_string_lossy().starts_with(&dev))
                        .unwrap_or(false)
                })
        })
        .unwrap_or(false)
}

fn open_target(path: &Path, size: u64, protected: &[PathBuf]) -> Result<Target, RestoreError> {
    let path_buf = || path.to_path_buf();
    let canon = std::fs::canonicalize(path).ok();
    if let Some(live) = protected.iter().find(|p| {
        std::fs::canonicalize(p)
            .ok()
            .is_some_and(|c| Some(c) == canon)
    }) {
        return Err(RestoreError::Protected {
            path: path_buf(),
            live: live.clone(),
        });
    }
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_block_device() => {
            if mounted(path) {
                return Err(RestoreError::Mounted { path: path_buf() });
            }
            let file = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|source| RestoreError::Open {
                    path: path_buf(),
                    source,
                })?;
            let dev_size = crate::volume::Volume::open(path)
                .map_err(|source| RestoreError::Size {
                    path: path_buf(),
                    source,
                })?
                .size_bytes();
            if dev_size < size {
                return Err(RestoreError::TooSmall {
                    path: path_buf(),
                    dev_size,
                    size,
                });
            }
            Ok(Target {
                file,
                path: path.to_path_buf(),
                partial: None,
                is_device: true,
            })
        }
        Ok(_) => Err(RestoreError::Exists { path: path_buf() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut name = path.as_os_str().to_owned();
            name.push(".bulwark-partial");
            let partial = PathBuf::from(name);
            let _ = std::fs::remove_file(&partial);
            // A restored volume holds whatever the source held: owner-only.
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&partial)
                .map_err(|source| RestoreError::Create {
                    path: partial.clone(),
                    source,
                })?;
            file.set_len(size).map_err(|source| RestoreError::Size {
                path: partial.clone(),
                source,
            })?;
            Ok(Target {
                file,
                path: path.to_path_buf(),
                partial: Some(partial),
                is_device: false,
            })
        }
        Err(source) => Err(RestoreError::Use {
            path: path_buf(),
            source,
        }),
    }
}

/// Marks the blocks a restore has written; each exactly once.
struct Coverage {
    bits: Vec<u64>,
    geometry: Geometry,
    covered: u64,
}

impl Coverage {
    fn mark(&mut self, offset: u64, len: u64) -> Result<(), RestoreError> {
        let (first, count) = self.geometry.check_extent(offset, len)?;
        for b in first..first + count {
            let (w, bit) = ((b / 64) as usize, b % 64);
            if self.bits[w] & (1 << bit) != 0 {
                return Err(RestoreError::Twice(b));
            }
            self.bits[w] |= 1 << bit;
        }
        self.covered += count;
        Ok(())
    }
}

/// Restores `point` (0 = newest) of `source` into `path`. `protected` are the live
/// volumes of this agent, which a restore never overwrites. `progress`, when given,
/// gets the point's size and the bytes written so far (for a progress display).
///
/// Receiving and writing overlap: this task takes messages off the stream while a
/// blocking writer checks each extent's checksums and writes it, with a few
/// messages queued between them.
pub async fn restore_point(
    source: &str,
    point: u64,
    path: &Path,
    protected: Vec<PathBuf>,
    mut node: NodeClient<TracedChannel>,
    progress: Option<Arc<Progress>>,
) -> Result<RestoreOutcome, RestoreError> {
    let started = Instant::now();
    let mut stream = node
        .restore(pb::NodeRestoreRequest {
            source: source.to_string(),
            point,
        })
        .await
        .map_err(RestoreError::Refused)?
        .into_inner();
    let header = match stream.message().await.map_err(RestoreError::Node)? {
        Some(pb::RestoreChunk {
            msg: Some(pb::restore_chunk::Msg::Header(h)),
        }) => h,
        _ => return Err(RestoreError::NoHeader),
    };
    let geometry = Geometry::new(header.size_bytes, header.block_size)?;
    let point_id = header.point.map_or(point, |p| p.id);
    if let Some(p) = &progress {
        p.total
            .store(geometry.size_bytes, std::sync::atomic::Ordering::Relaxed);
    }
    let p = path.to_path_buf();
    let size = geometry.size_bytes;
    let target = tokio::task::spawn_blocking(move || open_target(&p, size, &protected))
        .await
        .map_err(RestoreError::Task)??;
    let target = Arc::new(target);
    // `None` says the stream ended cleanly: only then is the file finished.
    let (tx, rx) = tokio::sync::mpsc::channel::<Option<pb::restore_chunk::Msg>>(4);
    let t = target.clone();
    let writer = tokio::task::spawn_blocking(move || write_target(&t, geometry, rx, progress));
    let received = receive(stream, tx).await;
    let written = writer.await.map_err(RestoreError::Task)?;
    let result = match (received, written) {
        (Err(e), _) | (Ok(()), Err(e)) => Err(e),
        (Ok(()), Ok(n)) => Ok(n),
    };
    match result {
        Ok(written) => Ok(RestoreOutcome {
            point: point_id,
            path: path.to_path_buf(),
            bytes_written: written,
            duration_ms: started.elapsed().as_millis() as u64,
        }),
        Err(e) => {
            if let Some(partial) = &target.partial {
                let _ = std::fs::remove_file(partial);
            }
            Err(e)
        }
    }
}

/// Takes the stream's messages and queues them for the writer; `None` once the
/// stream ended cleanly. The sender is dropped on return.
async fn receive(
    mut stream: tonic::Streaming<pb::RestoreChunk>,
    tx: tokio::sync::mpsc::Sender<Option<pb::restore_chunk::Msg>>,
) -> Result<(), RestoreError> {
    while let Some(chunk) = stream.message().await.map_err(RestoreError::Broke)? {
        let Some(msg) = chunk.msg else {
            return Err(RestoreError::Empty);
        };
        if tx.send(Some(msg)).await.is_err() {
            return Ok(()); // the writer stopped: its error says why
        }
    }
    let _ = tx.send(None).await;
    Ok(())
}

/// The blocking writer: checks and writes every extent of `rx` into `t`, checks
/// that every block came exactly once, then makes the file durable and puts it in
/// place. Returns the bytes written.
fn write_target(
    t: &Target,
    geometry: Geometry,
    mut rx: tokio::sync::mpsc::Receiver<Option<pb::restore_chunk::Msg>>,
    progress: Option<Arc<Progress>>,
) -> Result<u64, RestoreError> {
    // The restore's bytes go to the disk as they arrive instead of waiting for
    // the final fsync (reopened through /proc: the same file, whatever its path).
    let mut out = DirectWriter::open(
        Path::new(&format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&t.file)
        )),
        "restore target",
    );
    let mut coverage = Coverage {
        bits: vec![0u64; geometry.block_count().div_ceil(64) as usize],
        geometry,
        covered: 0,
    };
    let mut written = 0u64;
    let mut zeros: Vec<u8> = Vec::new();
    let write_err = |source| RestoreError::Write {
        path: t.path.clone(),
        source,
    };
    loop {
        let msg = match rx.blocking_recv() {
            Some(Some(msg)) => msg,
            Some(None) => break,
            None => return Err(RestoreError::Cut),
        };
        match msg {
            pb::restore_chunk::Msg::Extent(e) => {
                geometry
                    .verify_extent(e.offset, &e.data, &e.checksums)
                    .map_err(RestoreError::Check)?;
                coverage.mark(e.offset, e.data.len() as u64)?;
                out.write_at(&t.file, &e.data, e.offset)
                    .map_err(write_err)?;
                written += e.data.len() as u64;
                bulwark_common::failpoint::hit("agent-mid-restore");
            }
            pb::restore_chunk::Msg::Zeros(z) => {
                coverage.mark(z.offset, z.len)?;
                if t.is_device {
                    // A device is not sparse: its old bytes must go.
                    if zeros.is_empty() {
                        zeros = vec![0u8; MAX_BATCH_BYTES];
                    }
                    let mut at = z.offset;
                    let end = z.offset + z.len;
                    while at < end {
                        let n = zeros.len().min((end - at) as usize);
                        out.write_at(&t.file, &zeros[..n], at).map_err(write_err)?;
                        at += n as u64;
                    }
                }
                written += z.len;
            }
            pb::restore_chunk::Msg::Header(_) => return Err(RestoreError::SecondHeader),
        }
        if let Some(p) = &progress {
            p.done.store(written, std::sync::atomic::Ordering::Relaxed);
        }
    }
    if coverage.covered != geometry.block_count() {
        return Err(RestoreError::Short {
            covered: coverage.covered,
            blocks: geometry.block_count(),
        });
    }
    finish_target(t)?;
    Ok(written)
}

/// Makes a fully written target durable and, for a new file, renames it from
/// `PATH.bulwark-partial` into place and makes the rename durable.
fn finish_target(t: &Target) -> Result<(), RestoreError> {
    t.file.sync_all().map_err(RestoreError::Fsync)?;
    let Some(partial) = &t.partial else {
        return Ok(());
    };
    std::fs::rename(partial, &t.path).map_err(|source| RestoreError::Rename {
        from: partial.clone(),
        to: t.path.clone(),
        source,
    })?;
    if let Some(dir) = t.path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| RestoreError::FsyncDir {
                path: dir.to_path_buf(),
                source,
            })?;
    }
    Ok(())
}
