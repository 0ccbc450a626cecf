//! Where a qcow2 image keeps each guest byte, read from the image's own L1 and L2
//! tables (the format of QEMU's `docs/interop/qcow2.txt`), so that a sync reads the
//! dirty clusters of a plain image straight from the file.
//!
//! This replaces running `qemu-img map` at the start of every sync: that took 7-12 ms
//! on an incremental's critical path for a 4 GiB image, and grows with the image.
//! Only the L1 table (8 bytes per 512 MiB of guest disk at 64 KiB clusters) is held;
//! each read looks up the L2 entries of its own clusters with one `pread`, from the
//! page cache in practice.
//!
//! The map answers [`Where::Host`] only where the answer is certain: a standard
//! cluster, allocated, aligned and inside the file, in an image with no encryption,
//! no external data file and no subclusters (those are refused when the map is
//! opened: the caller reads everything through qemu). Everything else — a backing
//! file's data, a compressed cluster, an entry QEMU would call corrupt — is
//! [`Where::Nbd`], for qemu to read or to refuse. The image must be held by a
//! process that lets no writer in (the sync's qemu-storage-daemon), so no cluster
//! moves while the map is used.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

const MAGIC: u32 = 0x5146_49fb; // "QFI\xfb"
/// Incompatible feature bits this map understands: dirty (refcounts may be stale,
/// the L2 tables are not) and the compression type (compressed clusters are read
/// through qemu anyway).
const KNOWN_INCOMPATIBLE: u64 = 1 << 0 | 1 << 3;
const INCOMPATIBLE_NAMES: [&str; 5] = [
    "dirty",
    "corrupt",
    "external data file",
    "compression type",
    "extended L2 entries (subclusters)",
];
/// Bits 9-55 of an L1 or standard L2 entry: a host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard L2 entry (version 3): the cluster reads as zeros.
const ZERO: u64 = 1;
/// Bits of a standard L2 entry that must be clear.
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// The largest L1 table opened: 2 Mi entries, 1 PiB of guest disk at 64 KiB clusters.
const MAX_L1_ENTRIES: u64 = 1 << 21;

/// Where a run of guest bytes is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Where {
    /// In the image file at this offset, as they are.
    Host(u64),
    /// Reads as zeros.
    Zeros,
    /// Anywhere else (a backing file, a compressed cluster): read through qemu.
    Nbd,
}

/// The guest-to-file map of one qcow2 image.
#[derive(Debug)]
pub struct Qcow2Map {
    file: File,
    cluster_bits: u32,
    /// Version 3: bit 0 of an L2 entry means zeros.
    v3: bool,
    /// Unallocated clusters read from a backing file, not as zeros.
    backing: bool,
    l1: Vec<u64>,
    file_len: u64,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// An image the map cannot describe with certainty, and why.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot stat {path}: {source}")]
    Stat {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the qcow2 header of {path}: {source}")]
    Header {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a qcow2 image (bad magic)")]
    Magic { path: String },
    #[error("{path}: qcow2 version {version} is not known")]
    Version { path: String, version: u32 },
    #[error("{path}: cluster_bits {cluster_bits} is out of range")]
    ClusterBits { path: String, cluster_bits: u32 },
    #[error("{path}: the header says {header_size} bytes of guest disk, expected {size}")]
    Size {
        path: String,
        header_size: u64,
        size: u64,
    },
    #[error("{path} is encrypted")]
    Encrypted { path: String },
    #[error("{path} has incompatible feature bit {bit} set ({name})")]
    Incompatible {
        path: String,
        bit: u32,
        name: &'static str,
    },
    #[error("{path}: an L1 table of {entries} entries is too large")]
    L1TooLarge { path: String, entries: u64 },
    #[error("cannot read the L1 table of {path} at {offset}: {source}")]
    L1 {
        path: String,
        offset: u64,
        #[source]
        source: io::Error,
    },
}

impl Qcow2Map {
    /// Reads the header and the L1 table of the image at `path`, whose guest disk
    /// must be `size` bytes. An image the map cannot describe with certainty is an
    /// error that says why.
    pub fn open(path: &Path, size: u64) -> Result<Qcow2Map, MapError> {
        let what = || path.display().to_string();
        let file = File::open(path).map_err(|source| MapError::Open {
            path: what(),
            source,
        })?;
        let file_len = file
            .metadata()
            .map_err(|source| MapError::Stat {
                path: what(),
                source,
            })?
            .len();
        let mut h = [0u8; 104];
        file.read_exact_at(&mut h, 0)
            .map_err(|source| MapError::Header {
                path: what(),
                source,
            })?;
        if be32(&h, 0) != MAGIC {
            return Err(MapError::Magic { path: what() });
        }
        let version = be32(&h, 4);
        if !(2..=3).contains(&version) {
            return Err(MapError::Version {
                path: what(),
                version,
            });
        }
        let backing = be64(&h, 8) != 0;
        let cluster_bits = be32(&h, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(MapError::ClusterBits {
                path: what(),
                cluster_bits,
            });
        }
        let header_size = be64(&h, 24);
        if header_size != size {
            return Err(MapError::Size {
                path: what(),
                header_size,
                size,
            });
        }
        if be32(&h, 32) != 0 {
            return Err(MapError::Encrypted { path: what() });
        }
        if version >= 3 {
            let unknown = be64(&h, 72) & !KNOWN_INCOMPATIBLE;
            if unknown != 0 {
                let bit = unknown.trailing_zeros();
                let name = INCOMPATIBLE_NAMES
                    .get(bit as usize)
                    .copied()
                    .unwrap_or("an unknown feature");
                return Err(MapError::Incompatible {
                    path: what(),
                    bit,
                    name,
                });
            }
        }
        let l1_entries = u64::from(be32(&h, 36));
        if l1_entries > MAX_L1_ENTRIES {
            return Err(MapError::L1TooLarge {
                path: what(),
                entries: l1_entries,
            });
        }
        let l1_offset = be64(&h, 40);
        let mut raw = vec![0u8; l1_entries as usize * 8];
        file.read_exact_at(&mut raw, l1_offset)
            .map_err(|source| MapError::L1 {
                path: what(),
                offset: l1_offset,
                source,
            })?;
        let l1 = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
        Ok(Qcow2Map {
            file,
            cluster_bits,
            v3: version >= 3,
            backing,
            l1,
            file_len,
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Where the cluster with L2 entry `e` is.
    fn cluster(&self, e: u64) -> Where {
        let off = e & OFFSET_MASK;
        if e & COMPRESSED != 0 || e & L2_RESERVED != 0 {
            Where::Nbd
        } else if e & ZERO != 0 {
            if self.v3 { Where::Zeros } else { Where::Nbd }
        } else if off == 0 {
            if self.backing {
                Where::Nbd
            } else {
                Where::Zeros
            }
        } else if off & (self.cluster_size() - 1) != 0
            || off.saturating_add(self.cluster_size()) > self.file_len
        {
            // Misaligned or (partly) past the end of the file: qemu's business.
            Where::Nbd
        } else {
            Where::Host(off)
        }
    }

    /// The runs of guest bytes `[offset, offset + len)`: (guest offset, length,
    /// where), adjacent runs of one kind merged.
    pub fn pieces(&self, offset: u64, len: usize) -> io::Result<Vec<(u64, usize, Where)>> {
        let cb = self.cluster_bits;
        let per_table = self.cluster_size() / 8;
        let end = offset + len as u64;
        let mut out: Vec<(u64, usize, Where)> = Vec::new();
        let mut at = offset;
        let mut entries = Vec::new();
        while at < end {
            let first = at >> cb;
            let table = first / per_table;
            let table_end = ((table + 1) * per_table).saturating_mul(self.cluster_size());
            let stop = end.min(table_end);
            let n = ((stop - 1) >> cb) - first + 1;
            entries.clear();
            match self.l1.get(table as usize).map(|e| e & OFFSET_MASK) {
                None | Some(0) => entries.resize(n as usize, 0),
                Some(t) => {
                    let mut raw = vec![0u8; n as usize * 8];
                    let at_entry = t + (first % per_table) * 8;
                    self.file.read_exact_at(&mut raw, at_entry).map_err(|e| {
                        io::Error::new(
                            e.kind(),
                            format!("reading L2 entries at {at_entry} of the image: {e}"),
                        )
                    })?;
                    entries.extend(raw.chunks_exact(8).map(|c| be64(c, 0)));
                }
            }
            for (k, &e) in entries.iter().enumerate() {
                let c = (first + k as u64) << cb;
                let from = at.max(c);
                let to = stop.min(c + self.cluster_size());
                let how = match self.cluster(e) {
                    Where::Host(h) => Where::Host(h + (from - c)),
                    other => other,
                };
                let n = (to - from) as usize;
                match out.last_mut() {
                    Some((s, l, last))
                        if match (*last, how) {
                            (Where::Host(a), Where::Host(b)) => a + *l as u64 == b,
                            (a, b) => a == b,
                        } && *s + *l as u64 == from =>
                    {
                        *l += n;
                    }
                    _ => out.push((from, n, how)),
                }
            }
            at = stop;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::testutil::{create_qcow2 as create, have, qemu_io, tool};
    use serde::Deserialize;
    use std::path::PathBuf;

    /// qemu-img and qemu-io both run here (else the test skips, saying why).
    fn qemu() -> bool {
        have("qemu-img") && have("qemu-io")
    }

    /// One run of `qemu-img map --output=json`, the reference the map is held to.
    #[derive(Deserialize)]
    struct MapRun {
        start: u64,
        length: u64,
        depth: u64,
        zero: bool,
        data: bool,
        #[serde(default)]
        compressed: bool,
        offset: Option<u64>,
    }

    /// What `qemu-img map` says of every `step` bytes: the answer, and another
    /// answer that is as right. Zeros that qemu sees in a hole of the image file
    /// may be read from the file; anything from a backing file is read through
    /// qemu, even where the backing file has zeros.
    fn reference(img: &Path, size: u64, step: u64) -> Vec<(Where, Where)> {
        let json = tool(
            "qemu-img",
            &[
                "map",
                "--output=json",
                "-f",
                "qcow2",
                &img.to_string_lossy(),
            ],
        );
        let runs: Vec<MapRun> = serde_json::from_slice(&json).expect("map json");
        let mut out = Vec::new();
        for r in runs {
            let mut at = r.start;
            while at < r.start + r.length {
                let host = r.offset.map(|o| Where::Host(o + at - r.start));
                out.push(if r.depth > 0 || r.compressed {
                    (Where::Nbd, Where::Nbd)
                } else if r.zero {
                    (Where::Zeros, host.unwrap_or(Where::Zeros))
                } else if r.data {
                    let h = host.unwrap_or(Where::Nbd);
                    (h, h)
                } else {
                    (Where::Nbd, Where::Nbd)
                });
                at += step;
            }
        }
        assert_eq!(out.len() as u64, size / step);
        out
    }

    /// The map's answer per `step` bytes, asked in reads of `read` bytes.
    fn answers(map: &Qcow2Map, size: u64, step: u64, read: u64) -> Vec<Where> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < size {
            let len = read.min(size - at);
            for (s, l, how) in map.pieces(at, len as usize).expect("pieces") {
                assert_eq!(s % step, 0);
                let mut o = 0;
                while o < l as u64 {
                    out.push(match how {
                        Where::Host(h) => Where::Host(h + o),
                        other => other,
                    });
                    o += step;
                }
            }
            at += len;
        }
        out
    }

    /// Data, zero clusters (aligned `write -z`), a compressed cluster, a partial
    /// cluster write and clusters never written, across several L2 tables.
    fn varied(c: u64) -> Vec<String> {
        vec![
            format!("write -P 0x11 0 {}", 3 * c),
            format!("write -P 0x22 {} {}", 7 * c, c / 2),
            format!("write -z {} {}", 9 * c, 2 * c),
            format!("write -c -P 0x33 {} {c}", 12 * c),
            format!("write -P 0x44 {} {}", 300 * c, 5 * c),
            format!("write -P 0x55 {} {c}", 1000 * c),
            format!("write -P 0x66 {} {c}", 2 * c),
            // Zeroing written data in place: an allocated zero cluster.
            format!("write -z {} {c}", 301 * c),
        ]
    }

    fn check_against_qemu(img: &Path, size: u64, cluster: u64) -> Qcow2Map {
        let map = Qcow2Map::open(img, size).expect("open");
        let want = reference(img, size, 512);
        // Reads of several sizes: within a cluster, across clusters, across tables.
        for read in [512, cluster, 3 * cluster + 1536, 1 << 20] {
            let got = answers(&map, size, 512, read);
            assert_eq!(got.len(), want.len(), "reads of {read} bytes");
            if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i].0 && got[i] != want[i].1) {
                panic!(
                    "reads of {read} bytes: at guest byte {}, the map says {:?}, qemu-img map {:?}",
                    i * 512,
                    got[i],
                    want[i]
                );
            }
        }
        map
    }

    /// The bytes the map places in the file are the guest's bytes.
    fn check_bytes(img: &Path, map: &Qcow2Map, size: u64, dir: &Path) {
        let raw = dir.join("guest.raw");
        tool(
            "qemu-img",
            &[
                "convert",
                "-f",
                "qcow2",
                "-O",
                "raw",
                &img.to_string_lossy(),
                &raw.to_string_lossy(),
            ],
        );
        let guest = std::fs::read(&raw).expect("raw");
        let file = std::fs::read(img).expect("image");
        let mut hosts = 0;
        for (s, l, how) in map.pieces(0, size as usize).expect("pieces") {
            let want = &guest[s as usize..s as usize + l];
            match how {
                Where::Host(h) => {
                    hosts += 1;
                    assert_eq!(
                        &file[h as usize..h as usize + l],
                        want,
                        "bytes at guest {s}"
                    );
                }
                Where::Zeros => assert!(want.iter().all(|&b| b == 0), "zeros at guest {s}"),
                Where::Nbd => {}
            }
        }
        assert!(hosts > 0);
    }

    #[test]
    fn the_map_agrees_with_qemu_img_map() {
        if !qemu() {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        // 4 KiB clusters: an L2 table covers 2 MiB, so the writes span several.
        for (opts, cluster) in [
            ("cluster_size=4096", 4096u64),
            ("cluster_size=65536", 65536),
            ("cluster_size=4096,compat=0.10", 4096),
        ] {
            let img: PathBuf = dir.path().join("vm.qcow2");
            let _ = std::fs::remove_file(&img);
            let size = 1200 * cluster;
            create(&img, opts, &size.to_string(), None);
            qemu_io(&img, &varied(cluster));
            let map = check_against_qemu(&img, size, cluster);
            check_bytes(&img, &map, size, dir.path());
            let kinds: Vec<Where> = map
                .pieces(0, size as usize)
                .expect("pieces")
                .into_iter()
                .map(|p| p.2)
                .collect();
            assert!(kinds.contains(&Where::Zeros), "{opts}: {kinds:?}");
            assert!(
                kinds.contains(&Where::Nbd),
                "{opts}: the compressed cluster"
            );
        }
    }

    #[test]
    fn an_overlay_reads_its_backing_files_data_through_qemu() {
        if !qemu() {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.qcow2");
        let top = dir.path().join("top.qcow2");
        let c = 65536u64;
        let size = 64 * c;
        create(&base, "cluster_size=65536", &size.to_string(), None);
        qemu_io(&base, &[format!("write -P 0x77 0 {}", 8 * c)]);
        create(&top, "cluster_size=65536", &size.to_string(), Some(&base));
        qemu_io(
            &top,
            &[
                format!("write -P 0x88 {c} {c}"),
                format!("write -z {} {c}", 3 * c),
            ],
        );
        let map = check_against_qemu(&top, size, c);
        let p = map.pieces(0, 4 * c as usize).expect("pieces");
        assert_eq!(p[0], (0, c as usize, Where::Nbd), "backing data");
        assert!(matches!(p[1], (65536, 65536, Where::Host(_))), "{p:?}");
        assert_eq!(p[2], (2 * c, c as usize, Where::Nbd));
        assert_eq!(
            p[3],
            (3 * c, c as usize, Where::Zeros),
            "a zero cluster hides the backing data"
        );
        check_bytes(&top, &map, size, dir.path());
    }

    #[test]
    fn images_the_map_cannot_describe_are_refused_with_the_reason() {
        if !qemu() {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("x.qcow2");
        create(&img, "extended_l2=on", "1M", None);
        let e = Qcow2Map::open(&img, 1 << 20).expect_err("subclusters");
        assert!(e.to_string().contains("extended L2"), "{e}");

        std::fs::remove_file(&img).expect("rm");
        create(&img, "cluster_size=65536", "1M", None);
        let e = Qcow2Map::open(&img, 2 << 20).expect_err("size");
        assert!(e.to_string().contains("expected 2097152"), "{e}");

        let not = dir.path().join("raw");
        std::fs::write(&not, vec![0u8; 4096]).expect("write");
        let e = Qcow2Map::open(&not, 4096).expect_err("raw");
        assert!(e.to_string().contains("not a qcow2 image"), "{e}");
        std::fs::write(&not, b"QFI").expect("write");
        let e = Qcow2Map::open(&not, 4096).expect_err("short");
        assert!(
            e.to_string().contains("cannot read the qcow2 header"),
            "{e}"
        );

        // An L2 entry pointing past the end of the file is left to qemu.
        qemu_io(&img, &["write -P 0x99 0 64k"]);
        let map = Qcow2Map::open(&img, 1 << 20).expect("open");
        let Where::Host(h) = map.pieces(0, 65536).expect("pieces")[0].2 else {
            panic!("written data is in the file");
        };
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .expect("open");
        f.set_len(h + 4096).expect("truncate");
        let map = Qcow2Map::open(&img, 1 << 20).expect("open");
        assert_eq!(
            map.pieces(0, 65536).expect("pieces"),
            [(0, 65536, Where::Nbd)]
        );
    }
}
