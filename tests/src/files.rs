//! Volumes as files: random content, in-place block rewrites, digests, comparisons.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rand::RngCore;

use crate::BLOCK_SIZE;

/// Writes a file of `size` random bytes (no block of it reads as zeros).
pub fn write_random_file(path: &Path, size: u64) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    }
    let f = File::create(path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
    let mut w = BufWriter::with_capacity(1 << 20, f);
    let mut rng = rand::rng();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = usize::try_from(left.min(buf.len() as u64)).expect("chunk fits usize");
        rng.fill_bytes(&mut buf[..n]);
        w.write_all(&buf[..n])
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        left -= n as u64;
    }
    let f = w
        .into_inner()
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    f.sync_all()
        .unwrap_or_else(|e| panic!("cannot sync {}: {e}", path.display()));
}

/// Overwrites `count` distinct blocks of 64 KiB, chosen at random across the file,
/// with new random bytes, in place. Returns the number of distinct blocks touched.
pub fn rewrite_random_blocks(path: &Path, count: usize) -> usize {
    rewrite_random_blocks_sized(path, count, BLOCK_SIZE).len()
}

/// Like [`rewrite_random_blocks`] with any block size; returns the sorted indices of
/// the blocks it rewrote.
pub fn rewrite_random_blocks_sized(path: &Path, count: usize, block_size: u64) -> Vec<u64> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    // Seeking to the end sizes block devices too (their metadata length is 0).
    let size = std::io::Seek::seek(&mut &f, std::io::SeekFrom::End(0))
        .unwrap_or_else(|e| panic!("cannot size {}: {e}", path.display()));
    let blocks = usize::try_from(size.div_ceil(block_size)).expect("block count fits usize");
    assert!(
        count <= blocks,
        "cannot rewrite {count} distinct blocks of a {blocks}-block file"
    );
    let mut rng = rand::rng();
    let mut picked: Vec<u64> = rand::seq::index::sample(&mut rng, blocks, count)
        .into_iter()
        .map(|i| i as u64)
        .collect();
    picked.sort_unstable();
    let mut old = vec![0u8; usize::try_from(block_size).expect("block fits usize")];
    let mut new = old.clone();
    for &b in &picked {
        let off = b * block_size;
        let len = usize::try_from(block_size.min(size - off)).expect("block fits usize");
        f.read_exact_at(&mut old[..len], off)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        loop {
            rng.fill_bytes(&mut new[..len]);
            if new[..len] != old[..len] {
                break;
            }
        }
        f.write_all_at(&new[..len], off)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }
    f.sync_all()
        .unwrap_or_else(|e| panic!("cannot sync {}: {e}", path.display()));
    picked
}

/// BLAKE3 of a file's contents.
pub fn file_hash(path: &Path) -> blake3::Hash {
    let f = File::open(path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let mut h = blake3::Hasher::new();
    h.update_reader(f)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    h.finalize()
}

/// The size in bytes of a regular file or a block device (whose metadata length is
/// 0): how far the end is, found by seeking there.
pub fn byte_size(path: &Path) -> Result<u64, String> {
    let f = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    size_of(&f).map_err(|e| format!("cannot size {}: {e}", path.display()))
}

fn size_of(f: &File) -> std::io::Result<u64> {
    std::io::Seek::seek(&mut &*f, std::io::SeekFrom::End(0))
}

/// The indices of the 64 KiB blocks in which two files (or block devices) of the
/// same size differ; panics if they cannot be read or their sizes differ.
pub fn differing_blocks(a: &Path, b: &Path) -> Vec<u64> {
    let (la, lb) = (byte_size(a), byte_size(b));
    let (la, lb) = (
        la.unwrap_or_else(|e| panic!("{e}")),
        lb.unwrap_or_else(|e| panic!("{e}")),
    );
    assert_eq!(la, lb, "{} and {} differ in size", a.display(), b.display());
    let open =
        |p: &Path| File::open(p).unwrap_or_else(|e| panic!("cannot open {}: {e}", p.display()));
    let (fa, fb) = (open(a), open(b));
    let bs = usize::try_from(BLOCK_SIZE).expect("block fits usize");
    let (mut xa, mut xb) = (vec![0u8; bs], vec![0u8; bs]);
    let mut out = Vec::new();
    for block in 0..la.div_ceil(BLOCK_SIZE) {
        let off = block * BLOCK_SIZE;
        let n = usize::try_from(BLOCK_SIZE.min(la - off)).expect("block fits usize");
        fa.read_exact_at(&mut xa[..n], off)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", a.display()));
        fb.read_exact_at(&mut xb[..n], off)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", b.display()));
        if xa[..n] != xb[..n] {
            out.push(block);
        }
    }
    out
}

/// `Ok` if the two files (or block devices) hold the same bytes; otherwise what
/// differs (sizes, the first differing offset, how many 64 KiB blocks differ).
pub fn compare_files(a: &Path, b: &Path) -> Result<(), String> {
    let fa = File::open(a).map_err(|e| format!("cannot open {}: {e}", a.display()))?;
    let fb = File::open(b).map_err(|e| format!("cannot open {}: {e}", b.display()))?;
    // The real sizes: a block device's metadata says 0 bytes.
    let la = size_of(&fa).map_err(|e| format!("cannot size {}: {e}", a.display()))?;
    let lb = size_of(&fb).map_err(|e| format!("cannot size {}: {e}", b.display()))?;
    let mut ra = std::io::BufReader::with_capacity(1 << 20, fa);
    let mut rb = std::io::BufReader::with_capacity(1 << 20, fb);
    let bs = usize::try_from(BLOCK_SIZE).expect("block fits usize");
    let (mut xa, mut xb) = (vec![0u8; bs], vec![0u8; bs]);
    let mut offset = 0u64;
    let mut first: Option<u64> = None;
    let mut differing = 0u64;
    loop {
        let na = read_full(&mut ra, &mut xa).map_err(|e| format!("{}: {e}", a.display()))?;
        let nb = read_full(&mut rb, &mut xb).map_err(|e| format!("{}: {e}", b.display()))?;
        if na == 0 && nb == 0 {
            break;
        }
        if xa[..na] != xb[..nb] {
            differing += 1;
            if first.is_none() {
                let at = xa[..na.min(nb)]
                    .iter()
                    .zip(&xb[..na.min(nb)])
                    .position(|(x, y)| x != y)
                    .unwrap_or(na.min(nb));
                first = Some(offset + at as u64);
            }
        }
        offset += na.max(nb) as u64;
    }
    if la == lb && first.is_none() {
        return Ok(());
    }
    Err(format!(
        "{} ({la} bytes) and {} ({lb} bytes) differ: first difference at byte {}, {differing} \
         differing 64 KiB block(s)",
        a.display(),
        b.display(),
        first.map_or("-".to_string(), |o| o.to_string()),
    ))
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Panics unless the two files hold the same bytes; `what` says which comparison.
pub fn assert_same_file(actual: &Path, expected: &Path, what: &str) {
    if let Err(e) = compare_files(actual, expected) {
        panic!("{what}: {e}");
    }
}

/// BLAKE3 of every regular file under `dir`, by path relative to `dir`.
pub fn dir_hashes(dir: &Path) -> BTreeMap<PathBuf, blake3::Hash> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, blake3::Hash>) {
        let entries =
            std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
        for entry in entries {
            let entry = entry.unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
            let path = entry.path();
            let ft = entry
                .file_type()
                .unwrap_or_else(|e| panic!("cannot stat {}: {e}", path.display()));
            if ft.is_dir() {
                walk(root, &path, out);
            } else if ft.is_file() {
                let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
                out.insert(rel, file_hash(&path));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}
