//! The `dm-era` tracker: Linux device-mapper's era target over a physical block device.
//!
//! The agent puts an era target (`/dev/mapper/<era_device>`, default
//! `bulwark-<source>`) in front of the origin device `path`, with its persistent
//! metadata on `era_metadata`; the host uses the era device instead of the origin.
//! The kernel records, per block, the era in which it was last written; the metadata
//! is updated before a first write to a block lands, so the record survives a crash
//! of the agent and of the host.
//!
//! The agent keeps one bookmark per source in `state_dir/trackers/<source>.era`:
//! "point `N` was taken at era `E`" (two numbers, not a change log). A sync:
//!
//! 1. `dmsetup message <dev> 0 checkpoint` and read the current era `C` from the
//!    status line: writes from now on are in eras ≥ `C`.
//! 2. Incremental: `take_metadata_snap`, `era_invalidate --metadata-snapshot
//!    --written-since E <metadata>` lists the blocks written in eras ≥ `E`,
//!    `drop_metadata_snap`; only those blocks are read (from the origin, which the era
//!    target maps linearly).
//! 3. Committed as point `P`: the bookmark becomes `(P, C)`. Failed: it stays, so the
//!    same blocks (and any written since) are sent next time.
//!
//! A block written during the sync is in era ≥ `C` and goes to the next sync too.
//!
//! Needs device-mapper (`/dev/mapper/control`), `dmsetup` and `era_invalidate`
//! (Debian: dmsetup, thin-provisioning-tools). The metadata device must be zeroed
//! (its first 4 KiB at least) before its first use, so that the target formats it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use bulwark_common::block::Geometry;
use serde::{Deserialize, Serialize};

use super::bitmap::Bitmap;
use super::{Frozen, Plan, ToolError, Tracker, TrackerError, lock, open_volume, run_tool};

/// What went wrong with the dm-era target, its tools or its bookmark.
#[derive(Debug, thiserror::Error)]
pub enum EraError {
    #[error("tracker dm-era: {0}")]
    Unavailable(String),
    #[error("tracker dm-era: {origin} is not a whole number of 512-byte sectors")]
    NotSectors { origin: PathBuf },
    #[error("tracker dm-era: /dev/mapper/{device} exists and is not an era target ({table})")]
    NotEraTarget { device: String, table: String },
    #[error("tracker dm-era: {0}")]
    Create(#[source] ToolError),
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error("unexpected era status: {0}")]
    Status(String),
    #[error("not an era target status: {0}")]
    NotEraStatus(String),
    #[error("era_invalidate output: no {name} in <{tag}>")]
    NoAttr { name: String, tag: String },
    #[error("era_invalidate output: unterminated {name} in <{tag}>")]
    Unterminated { name: String, tag: String },
    #[error("era_invalidate output: bad {name} in <{tag}>")]
    BadAttr { name: String, tag: String },
    #[error("era_invalidate output has no <blocks> element: {0}")]
    NoBlocks(String),
    #[error("era_invalidate output: range {begin}..{end} outside {blocks} blocks")]
    RangeOutside { begin: u64, end: u64, blocks: u64 },
    #[error("era_invalidate output: block {block} outside {blocks} blocks")]
    BlockOutside { block: u64, blocks: u64 },
    #[error("cannot write {path}: {source}")]
    Save {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// [`run_tool`] with its output as text.
fn run(tool: &str, args: &[&str]) -> Result<String, ToolError> {
    run_tool(tool, args).map(|o| String::from_utf8_lossy(&o).into_owned())
}

/// Why dm-era cannot work on this host, if it cannot.
pub fn unavailable() -> Option<String> {
    // dmsetup creates the node even where the kernel has no device-mapper: only an
    // open of it says the kernel has one.
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/mapper/control")
    {
        return Some(format!(
            "this host has no device-mapper (/dev/mapper/control: {e})"
        ));
    }
    for (tool, package) in [
        ("dmsetup", "dmsetup"),
        ("era_invalidate", "thin-provisioning-tools"),
    ] {
        if Command::new(tool).arg("--version").output().is_err() {
            return Some(format!(
                "{tool} is not installed (Debian package {package})"
            ));
        }
    }
    None
}

/// The current era from a `dmsetup status` line of an era target:
/// `<start> <len> era <md block size> <used>/<total> <current era> <held root|->`.
pub fn parse_status(line: &str) -> Result<u32, EraError> {
    let f: Vec<&str> = line.split_whitespace().collect();
    match f.iter().position(|w| *w == "era") {
        Some(i) if f.len() > i + 3 => f[i + 3]
            .parse()
            .map_err(|_| EraError::Status(line.to_string())),
        _ => Err(EraError::NotEraStatus(line.to_string())),
    }
}

/// The blocks `era_invalidate` lists: `<range begin="B" end="E"/>` (end exclusive)
/// and `<block block="N"/>` inside `<blocks>`.
pub fn parse_invalidate(xml: &str, blocks: u64) -> Result<Bitmap, EraError> {
    let mut map = Bitmap::new(blocks);
    let attr = |tag: &str, name: &str| -> Result<u64, EraError> {
        let name_s = || name.to_string();
        let tag_s = || tag.to_string();
        let key = format!("{name}=\"");
        let start = tag.find(&key).ok_or_else(|| EraError::NoAttr {
            name: name_s(),
            tag: tag_s(),
        })? + key.len();
        let end = tag[start..]
            .find('"')
            .ok_or_else(|| EraError::Unterminated {
                name: name_s(),
                tag: tag_s(),
            })?;
        tag[start..start + end]
            .parse()
            .map_err(|_| EraError::BadAttr {
                name: name_s(),
                tag: tag_s(),
            })
    };
    if !xml.contains("<blocks") {
        return Err(EraError::NoBlocks(xml.chars().take(200).collect()));
    }
    for piece in xml.split('<').skip(1) {
        let tag = piece.split('>').next().unwrap_or("");
        if tag.starts_with("range ") {
            let (b, e) = (attr(tag, "begin")?, attr(tag, "end")?);
            if e < b || e > blocks {
                return Err(EraError::RangeOutside {
                    begin: b,
                    end: e,
                    blocks,
                });
            }
            map.set_range(b, e - b);
        } else if tag.starts_with("block ") {
            let b = attr(tag, "block")?;
            if b >= blocks {
                return Err(EraError::BlockOutside { block: b, blocks });
            }
            map.set(b);
        }
    }
    Ok(map)
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
struct Bookmark {
    point: u64,
    era: u32,
}

struct State {
    bookmark: Option<Bookmark>,
    /// The era the running sync checkpointed at.
    pending_era: Option<u32>,
}

/// See the module docs.
pub struct EraTracker {
    source: String,
    origin: PathBuf,
    metadata: PathBuf,
    device: String,
    geometry: Geometry,
    bookmark_path: PathBuf,
    state: Mutex<State>,
}

impl EraTracker {
    /// Sets up (or finds) the era target over `origin` and reads the bookmark.
    pub fn open(
        source: &str,
        origin: &Path,
        metadata: &Path,
        device: &str,
        geometry: Geometry,
        state_dir: &Path,
    ) -> Result<Arc<EraTracker>, EraError> {
        if let Some(why) = unavailable() {
            return Err(EraError::Unavailable(why));
        }
        if !geometry.size_bytes.is_multiple_of(512) {
            return Err(EraError::NotSectors {
                origin: origin.to_path_buf(),
            });
        }
        let t = EraTracker {
            source: source.to_string(),
            origin: origin.to_path_buf(),
            metadata: metadata.to_path_buf(),
            device: device.to_string(),
            geometry,
            bookmark_path: state_dir.join("trackers").join(format!("{source}.era")),
            state: Mutex::new(State {
                bookmark: None,
                pending_era: None,
            }),
        };
        t.ensure_device()?;
        let bookmark = match std::fs::read(&t.bookmark_path) {
            Ok(b) => serde_json::from_slice::<Bookmark>(&b).ok(),
            Err(_) => None,
        };
        if bookmark.is_none() {
            tracing::warn!(
                source,
                "no dm-era bookmark: the next sync is a consistency check"
            );
        }
        lock(&t.state).bookmark = bookmark;
        Ok(Arc::new(t))
    }

    /// The device the host must use.
    pub fn device_path(&self) -> PathBuf {
        Path::new("/dev/mapper").join(&self.device)
    }

    fn ensure_device(&self) -> Result<(), EraError> {
        if let Ok(table) = run("dmsetup", &["table", &self.device]) {
            if !table.split_whitespace().any(|w| w == "era") {
                return Err(EraError::NotEraTarget {
                    device: self.device.clone(),
                    table: table.trim().to_string(),
                });
            }
            return Ok(());
        }
        let sectors = self.geometry.size_bytes / 512;
        let table = format!(
            "0 {sectors} era {} {} {}",
            self.metadata.display(),
            self.origin.display(),
            self.geometry.block_size / 512
        );
        run("dmsetup", &["create", &self.device, "--table", &table]).map_err(EraError::Create)?;
        tracing::info!(source = %self.source, device = %self.device_path().display(), "dm-era target created; the host must use it instead of {}", self.origin.display());
        Ok(())
    }

    fn current_era(&self) -> Result<u32, EraError> {
        parse_status(run("dmsetup", &["status", &self.device])?.trim())
    }

    fn message(&self, m: &str) -> Result<(), EraError> {
        run("dmsetup", &["message", &self.device, "0", m])?;
        Ok(())
    }

    fn written_since(&self, era: u32) -> Result<Bitmap, EraError> {
        self.message("take_metadata_snap")?;
        let meta = self.metadata.display().to_string();
        let out = run(
            "era_invalidate",
            &[
                "--metadata-snapshot",
                "--written-since",
                &era.to_string(),
                &meta,
            ],
        );
        if let Err(e) = self.message("drop_metadata_snap") {
            tracing::warn!(source = %self.source, "{e}");
        }
        parse_invalidate(&out?, self.geometry.block_count())
    }

    fn save(&self, b: Bookmark) -> Result<(), EraError> {
        let dir = self.bookmark_path.parent().unwrap_or(Path::new("."));
        let tmp = self.bookmark_path.with_extension("era.tmp");
        let text = serde_json::to_vec(&b).map_err(std::io::Error::other);
        (|| -> std::io::Result<()> {
            let text = text?;
            std::fs::create_dir_all(dir)?;
            let f = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut &f, &text)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.bookmark_path)?;
            std::fs::File::open(dir)?.sync_all()
        })()
        .map_err(|source| EraError::Save {
            path: self.bookmark_path.clone(),
            source,
        })
    }
}

impl Tracker for EraTracker {
    fn name(&self) -> &'static str {
        "dm-era"
    }
    fn size_bytes(&self) -> u64 {
        self.geometry.size_bytes
    }
    fn consistent(&self) -> bool {
        lock(&self.state).bookmark.is_some()
    }
    fn mark_inconsistent(&self, why: &str) {
        tracing::warn!(source = %self.source, "{why}; the next sync is a consistency check");
        lock(&self.state).bookmark = None;
        let _ = std::fs::remove_file(&self.bookmark_path);
    }
    fn begin(&self, scan: bool, read_from: Option<&Path>) -> Result<Frozen, TrackerError> {
        let reader = open_volume(read_from.unwrap_or(&self.origin))?;
        let mut st = lock(&self.state);
        self.message("checkpoint")?;
        let era = self.current_era()?;
        st.pending_era = Some(era);
        let plan = match st.bookmark {
            Some(b) if !scan => Plan::Dirty {
                base: b.point,
                blocks: Arc::new(self.written_since(b.era)?),
            },
            _ => Plan::Scan,
        };
        Ok(Frozen { plan, reader })
    }
    fn committed(&self, point: u64) {
        let mut st = lock(&self.state);
        let Some(era) = st.pending_era.take() else {
            return;
        };
        let b = Bookmark { point, era };
        match self.save(b) {
            Ok(()) => st.bookmark = Some(b),
            Err(e) => {
                tracing::error!(source = %self.source, "{e}; the next sync is a consistency check");
                st.bookmark = None;
            }
        }
    }
    fn failed(&self) {
        lock(&self.state).pending_era = None;
    }
    fn shutdown(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_status_line() {
        assert_eq!(
            parse_status("0 131072 era 8 28/4096 17 -").expect("era status"),
            17
        );
        assert_eq!(
            parse_status("0 131072 era 8 28/4096 3 120").expect("era status"),
            3
        );
        assert!(parse_status("0 131072 linear").is_err());
        assert!(parse_status("0 131072 era 8 28/4096 x -").is_err());
    }

    #[test]
    fn parses_era_invalidate_output() {
        let xml = "<blocks>\n  <range begin=\"0\" end=\"3\"/>\n  <block block=\"10\"/>\n  <range begin=\"62\" end=\"66\"/>\n</blocks>\n";
        let m = parse_invalidate(xml, 100).expect("parse");
        assert_eq!(m.runs().collect::<Vec<_>>(), vec![(0, 3), (10, 1), (62, 4)]);
        assert_eq!(
            parse_invalidate("<blocks>\n</blocks>", 5)
                .expect("empty")
                .count(),
            0
        );
        assert!(parse_invalidate("<blocks><block block=\"5\"/></blocks>", 5).is_err());
        assert!(parse_invalidate("<blocks><range begin=\"4\" end=\"2\"/></blocks>", 5).is_err());
        assert!(parse_invalidate("garbage", 5).is_err());
    }
}
