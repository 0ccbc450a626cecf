//! Dirty-block bitmaps: one bit per block, set by writers, frozen by a sync.
//!
//! [`DirtyMap`] is the live record a write-intercepting tracker keeps: writers set
//! bits with atomic ORs after their write has landed; a sync takes the whole set with
//! [`DirtyMap::take`], which swaps each word to zero. A write that finishes before its
//! word is taken belongs to this sync — whose reads start after the take, so they see
//! it; one that finishes after belongs to the next sync. No write is lost either way.
//!
//! [`Bitmap`] is a plain (frozen) set of blocks: what one sync must send.
//!
//! # Saved form
//!
//! On a clean shutdown the live map is written to `<state_dir>/trackers/<source>.bitmap`
//! and on the next start read back and deleted at once, so a crash afterwards leaves no
//! file and the source is known to be inconsistent. Layout, little-endian:
//! `BWDIRTY1` (8 bytes), base point u64, volume size u64, block size u32, word count
//! u64, the words (u64 each), then BLAKE3 of everything before it (32 bytes).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bulwark_common::block::{DIGEST_LEN, Geometry};

const MAGIC: &[u8; 8] = b"BWDIRTY1";

/// A frozen set of blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    blocks: u64,
}

impl Bitmap {
    /// An empty set for `blocks` blocks.
    pub fn new(blocks: u64) -> Bitmap {
        Bitmap {
            words: vec![0; blocks.div_ceil(64) as usize],
            blocks,
        }
    }

    /// Number of blocks it covers.
    pub fn len(&self) -> u64 {
        self.blocks
    }

    /// Whether it covers no block at all.
    pub fn is_empty(&self) -> bool {
        self.blocks == 0
    }

    /// Adds block `b` (ignored past the end).
    pub fn set(&mut self, b: u64) {
        if b < self.blocks {
            self.words[(b / 64) as usize] |= 1 << (b % 64);
        }
    }

    /// Adds blocks `first..first + count` (clipped to the end).
    pub fn set_range(&mut self, first: u64, count: u64) {
        let end = first.saturating_add(count).min(self.blocks);
        for b in first..end {
            self.set(b);
        }
    }

    /// Whether block `b` is in the set.
    pub fn get(&self, b: u64) -> bool {
        b < self.blocks && self.words[(b / 64) as usize] & (1 << (b % 64)) != 0
    }

    /// Number of blocks in the set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Adds every block of `other` (of the same length).
    pub fn union_with(&mut self, other: &Bitmap) {
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w |= *o;
        }
    }

    /// Runs of consecutive set blocks, `(first, count)`, in order.
    pub fn runs(&self) -> Runs<'_> {
        Runs { map: self, next: 0 }
    }
}

/// Iterator of [`Bitmap::runs`].
pub struct Runs<'a> {
    map: &'a Bitmap,
    next: u64,
}

impl Iterator for Runs<'_> {
    type Item = (u64, u64);
    fn next(&mut self) -> Option<(u64, u64)> {
        let m = self.map;
        let mut b = self.next;
        // Skip clear blocks a word at a time.
        while b < m.blocks {
            let w = m.words[(b / 64) as usize] >> (b % 64);
            if w == 0 {
                b = (b / 64 + 1) * 64;
            } else {
                b += u64::from(w.trailing_zeros());
                break;
            }
        }
        if b >= m.blocks {
            self.next = m.blocks;
            return None;
        }
        let first = b;
        while b < m.blocks && m.get(b) {
            b += 1;
        }
        self.next = b;
        Some((first, b - first))
    }
}

/// The live record of written blocks.
#[derive(Debug)]
pub struct DirtyMap {
    words: Vec<AtomicU64>,
    geometry: Geometry,
}

impl DirtyMap {
    /// An empty map for a volume of `geometry`.
    pub fn new(geometry: Geometry) -> DirtyMap {
        let n = geometry.block_count().div_ceil(64) as usize;
        DirtyMap {
            words: (0..n).map(|_| AtomicU64::new(0)).collect(),
            geometry,
        }
    }

    /// The volume's geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Marks every block that bytes `offset..offset + len` touch. Call it after the
    /// write has landed (see the module docs for why).
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.geometry.size_bytes {
            return;
        }
        let bs = u64::from(self.geometry.block_size);
        let first = offset / bs;
        let last = (offset.saturating_add(len) - 1).min(self.geometry.size_bytes - 1) / bs;
        let mut b = first;
        while b <= last {
            let w = (b / 64) as usize;
            let lo = b % 64;
            let hi = (last - (b - lo)).min(63);
            let mask = if hi - lo == 63 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo + 1)) - 1) << lo
            };
            self.words[w].fetch_or(mask, Ordering::AcqRel);
            b = b - lo + hi + 1;
        }
    }

    /// Takes every set bit, leaving the map empty (the generation a sync sends).
    pub fn take(&self) -> Bitmap {
        Bitmap {
            words: self
                .words
                .iter()
                .map(|w| w.swap(0, Ordering::AcqRel))
                .collect(),
            blocks: self.geometry.block_count(),
        }
    }

    /// Puts the blocks of a failed sync back, to be sent by the next one.
    pub fn restore(&self, frozen: &Bitmap) {
        for (w, f) in self.words.iter().zip(&frozen.words) {
            if *f != 0 {
                w.fetch_or(*f, Ordering::AcqRel);
            }
        }
    }

    /// A copy of the current bits (for saving).
    pub fn snapshot(&self) -> Bitmap {
        Bitmap {
            words: self
                .words
                .iter()
                .map(|w| w.load(Ordering::Acquire))
                .collect(),
            blocks: self.geometry.block_count(),
        }
    }

    /// Bytes the map occupies in memory.
    pub fn memory_bytes(&self) -> usize {
        self.words.len() * 8
    }
}

/// Where a source's saved bitmap lives.
pub fn saved_path(state_dir: &Path, source: &str) -> PathBuf {
    state_dir.join("trackers").join(format!("{source}.bitmap"))
}

/// Writes `map` (relative to point `base`) durably to `path`, replacing it atomically.
pub fn save(path: &Path, base: u64, geometry: Geometry, map: &Bitmap) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(36 + map.words.len() * 8 + DIGEST_LEN);
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&base.to_le_bytes());
    push_body(&mut buf, geometry, map);
    write_atomically(path, "bitmap.tmp", buf)
}

/// Where a source's checkpoint of the record lives (with the activity log).
pub fn checkpoint_path(state_dir: &Path, source: &str) -> PathBuf {
    state_dir.join("trackers").join(format!("{source}.ckpt"))
}

/// A checkpoint: the dirty bits relative to point `base` (`None`: no consistent
/// record), and whether a bounded re-check is owed (`recovering`: the bits are blocks
/// to compare with the node's digests, not only blocks to send).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    pub base: Option<u64>,
    pub recovering: bool,
    pub bits: Bitmap,
}

const CKPT_MAGIC: &[u8; 8] = b"BWDIRTY2";

/// Writes checkpoint `saved` durably to `path`, replacing the previous one atomically.
/// Layout, little-endian: `BWDIRTY2`, flags u8 (1: has a base, 2: recovering), base
/// u64, volume size u64, block size u32, word count u64, the words, then BLAKE3 of
/// everything before it.
pub fn save_checkpoint(path: &Path, geometry: Geometry, saved: &Saved) -> std::io::Result<()> {
    let flags = u8::from(saved.base.is_some()) | (u8::from(saved.recovering) << 1);
    let mut buf = Vec::with_capacity(37 + saved.bits.words.len() * 8 + DIGEST_LEN);
    buf.extend_from_slice(CKPT_MAGIC);
    buf.push(flags);
    buf.extend_from_slice(&saved.base.unwrap_or(0).to_le_bytes());
    push_body(&mut buf, geometry, &saved.bits);
    write_atomically(path, "ckpt.tmp", buf)
}

fn push_body(buf: &mut Vec<u8>, geometry: Geometry, map: &Bitmap) {
    buf.extend_from_slice(&geometry.size_bytes.to_le_bytes());
    buf.extend_from_slice(&geometry.block_size.to_le_bytes());
    buf.extend_from_slice(&(map.words.len() as u64).to_le_bytes());
    for w in &map.words {
        buf.extend_from_slice(&w.to_le_bytes());
    }
}

fn write_atomically(path: &Path, tmp_ext: &str, mut buf: Vec<u8>) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let sum = blake3::hash(&buf);
    buf.extend_from_slice(sum.as_bytes());
    let tmp = path.with_extension(tmp_ext);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&buf)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Reads the checkpoint at `path` (and leaves it there).
pub fn load_checkpoint(path: &Path, geometry: Geometry) -> Result<Saved, LoadError> {
    let buf = read_saved(path)?;
    if buf.len() < 17 || &buf[..8] != CKPT_MAGIC {
        return Err(LoadError::Damaged {
            path: path.to_path_buf(),
            why: "not a Bulwark checkpoint".into(),
        });
    }
    let flags = buf[8];
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[9..17]);
    let base = u64::from_le_bytes(b);
    let bits = parse_at(&buf, 17, path, geometry, CKPT_MAGIC)?;
    Ok(Saved {
        base: (flags & 1 != 0).then_some(base),
        recovering: flags & 2 != 0,
        bits,
    })
}

/// Removes `path` if it exists, durably.
pub fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => std::fs::File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn read_saved(path: &Path) -> Result<Vec<u8>, LoadError> {
    match std::fs::read(path) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(LoadError::Missing(path.to_path_buf()))
        }
        Err(error) => Err(LoadError::Io {
            path: path.to_path_buf(),
            error,
        }),
    }
}

/// Why a saved bitmap could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "no saved bitmap at {0} (the agent did not stop cleanly, or never tracked this source)"
    )]
    Missing(PathBuf),
    #[error("cannot read {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path} is damaged: {why}")]
    Damaged { path: PathBuf, why: String },
    #[error(
        "{path} was saved for {saved_size} bytes in blocks of {saved_block}, the volume is {size} bytes in blocks of {block}"
    )]
    Geometry {
        path: PathBuf,
        saved_size: u64,
        saved_block: u32,
        size: u64,
        block: u32,
    },
}

/// Reads a saved bitmap and deletes the file (durably) before returning it: from now
/// on only memory holds the record, and a crash leaves the source inconsistent.
pub fn load_and_remove(path: &Path, geometry: Geometry) -> Result<(u64, Bitmap), LoadError> {
    let buf = read_saved(path)?;
    let parsed = parse_at(&buf, 16, path, geometry, MAGIC).map(|map| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&buf[8..16]);
        (u64::from_le_bytes(b), map)
    });
    let removed = std::fs::remove_file(path)
        .and_then(|()| std::fs::File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all());
    if let Err(error) = removed {
        return Err(LoadError::Io {
            path: path.to_path_buf(),
            error,
        });
    }
    parsed
}

/// Checks a saved file (`magic`, then from byte `at` the volume size, block size,
/// word count and words, then the BLAKE3 of all that) and returns its bits.
fn parse_at(
    buf: &[u8],
    at: usize,
    path: &Path,
    geometry: Geometry,
    magic: &[u8; 8],
) -> Result<Bitmap, LoadError> {
    let damaged = |why: &str| LoadError::Damaged {
        path: path.to_path_buf(),
        why: why.to_string(),
    };
    let head = at + 8 + 4 + 8;
    if buf.len() < head + DIGEST_LEN {
        return Err(damaged("too short"));
    }
    let (body, sum) = buf.split_at(buf.len() - DIGEST_LEN);
    if blake3::hash(body).as_bytes() != sum {
        return Err(damaged("checksum mismatch"));
    }
    if &body[..8] != magic {
        return Err(damaged("not a Bulwark bitmap"));
    }
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&body[i..i + 8]);
        u64::from_le_bytes(b)
    };
    let size = u64_at(at);
    let mut bb = [0u8; 4];
    bb.copy_from_slice(&body[at + 8..at + 12]);
    let block = u32::from_le_bytes(bb);
    let words = u64_at(at + 12);
    if size != geometry.size_bytes || block != geometry.block_size {
        return Err(LoadError::Geometry {
            path: path.to_path_buf(),
            saved_size: size,
            saved_block: block,
            size: geometry.size_bytes,
            block: geometry.block_size,
        });
    }
    let want = geometry.block_count().div_ceil(64);
    if words != want || body.len() as u64 != head as u64 + words * 8 {
        return Err(damaged("wrong length"));
    }
    let mut map = Bitmap::new(geometry.block_count());
    for (i, w) in map.words.iter_mut().enumerate() {
        *w = u64_at(head + i * 8);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(blocks: u64) -> Geometry {
        Geometry::new(blocks * 65536 - 100, 65536).expect("geometry")
    }

    #[test]
    fn marks_every_block_a_write_touches() {
        let m = DirtyMap::new(geo(200));
        m.mark(65535, 2); // blocks 0 and 1
        m.mark(64 * 65536, 65536 * 70); // blocks 64..=133
        m.mark(199 * 65536 + 10, 1_000_000); // clipped at the end: block 199
        m.mark(200 * 65536, 5); // past the end: nothing
        let b = m.take();
        let runs: Vec<_> = b.runs().collect();
        assert_eq!(runs, vec![(0, 2), (64, 70), (199, 1)]);
        assert_eq!(b.count(), 73);
        assert_eq!(m.take().count(), 0, "take leaves the map empty");
    }

    /// The record is one bit per block: 8 KiB for a 4 GiB volume of 64 KiB blocks,
    /// rounded up to whole 64-bit words otherwise.
    #[test]
    fn one_bit_per_block() {
        let g = Geometry::new(4 << 30, 65536).expect("geometry");
        assert_eq!(DirtyMap::new(g).memory_bytes(), 8192);
        assert_eq!(DirtyMap::new(geo(65)).memory_bytes(), 16);
    }

    #[test]
    fn a_failed_generation_goes_back() {
        let m = DirtyMap::new(geo(130));
        m.mark(0, 1);
        let frozen = m.take();
        m.mark(129 * 65536, 1); // a write during the sync
        m.restore(&frozen);
        let runs: Vec<_> = m.take().runs().collect();
        assert_eq!(runs, vec![(0, 1), (129, 1)]);
    }

    #[test]
    fn saved_maps_load_once_and_damage_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = saved_path(dir.path(), "s");
        let g = geo(100);
        let mut b = Bitmap::new(100);
        b.set_range(3, 5);
        b.set(99);
        save(&path, 7, g, &b).expect("save");
        let (base, got) = load_and_remove(&path, g).expect("load");
        assert_eq!((base, got), (7, b.clone()));
        assert!(matches!(
            load_and_remove(&path, g),
            Err(LoadError::Missing(_))
        ));

        save(&path, 7, g, &b).expect("save");
        let other = Geometry::new(g.size_bytes, 4096).expect("geometry");
        assert!(matches!(
            load_and_remove(&path, other),
            Err(LoadError::Geometry { .. })
        ));
        save(&path, 7, g, &b).expect("save");
        let mut raw = std::fs::read(&path).expect("read");
        raw[40] ^= 1;
        std::fs::write(&path, &raw).expect("write");
        assert!(matches!(
            load_and_remove(&path, g),
            Err(LoadError::Damaged { .. })
        ));
        assert!(!path.exists(), "a damaged file is removed too");
    }
}
