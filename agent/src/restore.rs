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
use std::time::Instant;

use bulwark_common::block::{DirectWriter, Geometry, MAX_BATCH_BYTES};
use bulwark_proto as pb;
use bulwark_proto::node_client::NodeClient;

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

fn open_target(path: &Path, size: u64, protected: &[PathBuf]) -> Result<Target, String> {
    let canon = std::fs::canonicalize(path).ok();
    if let Some(live) = protected.iter().find(|p| {
        std::fs::canonicalize(p)
            .ok()
            .is_some_and(|c| Some(c) == canon)
    }) {
        return Err(format!(
            "{} is a volume this agent protects ({}); restore to another path, then swap",
            path.display(),
            live.display()
        ));
    }
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_block_device() => {
            if mounted(path) {
                return Err(format!(
                    "block device {} (or a partition of it) is mounted; unmount it before restoring onto it",
                    path.display()
                ));
            }
            let file = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            let dev_size = crate::volume::Volume::open(path)
                .map_err(|e| format!("cannot size {}: {e}", path.display()))?
                .size_bytes();
            if dev_size < size {
                return Err(format!(
                    "block device {} holds {dev_size} bytes, the point needs {size}",
                    path.display()
                ));
            }
            Ok(Target {
                file,
                path: path.to_path_buf(),
                partial: None,
                is_device: true,
            })
        }
        Ok(_) => Err(format!(
            "{} already exists; restore to a new path (or to a block device)",
            path.display()
        )),
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
                .map_err(|e| format!("cannot create {}: {e}", partial.display()))?;
            file.set_len(size)
                .map_err(|e| format!("cannot size {}: {e}", partial.display()))?;
            Ok(Target {
                file,
                path: path.to_path_buf(),
                partial: Some(partial),
                is_device: false,
            })
        }
        Err(e) => Err(format!("cannot use {}: {e}", path.display())),
    }
}

/// Marks the blocks a restore has written; each exactly once.
struct Coverage {
    bits: Vec<u64>,
    geometry: Geometry,
    covered: u64,
}

impl Coverage {
    fn mark(&mut self, offset: u64, len: u64) -> Result<(), String> {
        let (first, count) = self
            .geometry
            .check_extent(offset, len)
            .map_err(|e| e.to_string())?;
        for b in first..first + count {
            let (w, bit) = ((b / 64) as usize, b % 64);
            if self.bits[w] & (1 << bit) != 0 {
                return Err(format!("block {b} arrived twice"));
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
    progress: Option<std::sync::Arc<bulwark_common::metrics::Progress>>,
) -> Result<RestoreOutcome, String> {
    let started = Instant::now();
    let mut stream = node
        .restore(pb::NodeRestoreRequest {
            source: source.to_string(),
            point,
        })
        .await
        .map_err(|s| format!("node refused the restore: {}", s.message()))?
        .into_inner();
    let header = match stream
        .message()
        .await
        .map_err(|s| s.message().to_string())?
    {
        Some(pb::RestoreChunk {
            msg: Some(pb::restore_chunk::Msg::Header(h)),
        }) => h,
        _ => return Err("the node's restore stream did not start with a header".into()),
    };
    let geometry =
        Geometry::new(header.size_bytes, header.block_size).map_err(|e| e.to_string())?;
    let point_id = header.point.map_or(point, |p| p.id);
    if let Some(p) = &progress {
        p.total
            .store(geometry.size_bytes, std::sync::atomic::Ordering::Relaxed);
    }
    let p = path.to_path_buf();
    let size = geometry.size_bytes;
    let target = tokio::task::spawn_blocking(move || open_target(&p, size, &protected))
        .await
        .map_err(|e| e.to_string())??;
    let target = std::sync::Arc::new(target);
    // `None` says the stream ended cleanly: only then is the file finished.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Option<pb::restore_chunk::Msg>>(4);
    let t = target.clone();
    let writer = tokio::task::spawn_blocking(move || -> Result<u64, String> {
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
        loop {
            let msg = match rx.blocking_recv() {
                Some(Some(msg)) => msg,
                Some(None) => break,
                None => return Err("the restore stream was cut".into()),
            };
            match msg {
                pb::restore_chunk::Msg::Extent(e) => {
                    geometry
                        .verify_extent(e.offset, &e.data, &e.checksums)
                        .map_err(|err| format!("restored data failed its check: {err}"))?;
                    coverage.mark(e.offset, e.data.len() as u64)?;
                    out.write_at(&t.file, &e.data, e.offset)
                        .map_err(|err| format!("cannot write {}: {err}", t.path.display()))?;
                    written += e.data.len() as u64;
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
                            out.write_at(&t.file, &zeros[..n], at).map_err(|err| {
                                format!("cannot write {}: {err}", t.path.display())
                            })?;
                            at += n as u64;
                        }
                    }
                    written += z.len;
                }
                pb::restore_chunk::Msg::Header(_) => {
                    return Err("a second header in the restore stream".into());
                }
            }
            if let Some(p) = &progress {
                p.done.store(written, std::sync::atomic::Ordering::Relaxed);
            }
        }
        if coverage.covered != geometry.block_count() {
            return Err(format!(
                "the restore stream ended after {} of {} blocks",
                coverage.covered,
                geometry.block_count()
            ));
        }
        t.file
            .sync_all()
            .map_err(|e| format!("cannot fsync: {e}"))?;
        if let Some(partial) = &t.partial {
            std::fs::rename(partial, &t.path).map_err(|e| {
                format!(
                    "cannot rename {} to {}: {e}",
                    partial.display(),
                    t.path.display()
                )
            })?;
            if let Some(dir) = t.path.parent() {
                let dir = if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                };
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| format!("cannot fsync {}: {e}", dir.display()))?;
            }
        }
        Ok(written)
    });
    let received: Result<(), String> = async {
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(|s| format!("restore stream broke: {}", s.message()))?
        {
            let Some(msg) = chunk.msg else {
                return Err("an empty message in the restore stream".into());
            };
            if tx.send(Some(msg)).await.is_err() {
                return Ok(()); // the writer stopped: its error says why
            }
        }
        let _ = tx.send(None).await;
        Ok(())
    }
    .await;
    drop(tx);
    let written = writer.await.map_err(|e| e.to_string())?;
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
