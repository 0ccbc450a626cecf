//! Blocks, extents and their BLAKE3 checksums: the units both ends of a sync agree on.
//!
//! A volume of `size_bytes` is cut into blocks of `block_size` bytes; the last block is
//! short when the size is not a multiple. An extent is a run of whole blocks starting
//! at a block boundary (its last block may be the volume's short one). Every block
//! travels with the BLAKE3 digest of its bytes.

use std::fmt;

/// Default tracking unit of a volume.
pub const DEFAULT_BLOCK_SIZE: u32 = 64 * 1024;
/// Smallest and largest block sizes a data source may use.
pub const MIN_BLOCK_SIZE: u32 = 4096;
/// Largest block size a data source may use.
pub const MAX_BLOCK_SIZE: u32 = 4 * 1024 * 1024;
/// Payload bytes an agent puts in one extent batch (one gRPC message). Larger batches
/// gain nothing on the wire and cost memory on both ends.
pub const MAX_BATCH_BYTES: usize = 1024 * 1024;

/// The most payload one batch of a source with blocks of `block_size` carries:
/// [`MAX_BATCH_BYTES`], or one block when blocks are larger.
pub fn batch_limit(block_size: u32) -> usize {
    MAX_BATCH_BYTES.max(block_size as usize)
}

/// The largest message a node takes from an agent: the largest batch of any
/// geometry plus room for its checksums and framing.
pub const MAX_AGENT_MESSAGE_BYTES: usize = MAX_BLOCK_SIZE as usize + 256 * 1024;
/// Alignment of direct-I/O (`O_DIRECT`) buffers, offsets and lengths.
pub const DIRECT_ALIGN: usize = 4096;

/// A zeroed buffer of `len` bytes whose start is aligned for direct I/O.
pub fn aligned_buffer(len: usize) -> bytes::BytesMut {
    let mut raw = bytes::BytesMut::zeroed(len + DIRECT_ALIGN);
    let pad = raw.as_ptr().align_offset(DIRECT_ALIGN);
    let mut buf = raw.split_off(pad);
    buf.truncate(len);
    buf
}
/// `path` opened with `O_DIRECT`, for reading or else for writing, if the file
/// system allows it.
pub fn open_direct(path: &std::path::Path, read: bool) -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(read)
        .write(!read)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

/// Reads `len` bytes at `offset` (aligned to [`DIRECT_ALIGN`]) from `f`, opened with
/// `O_DIRECT`, into a fresh aligned buffer (see [`read_direct_into`]).
pub fn read_direct_at(f: &std::fs::File, offset: u64, len: usize) -> std::io::Result<bytes::Bytes> {
    read_direct_into(
        f,
        aligned_buffer(len.next_multiple_of(DIRECT_ALIGN)),
        offset,
        len,
    )
}

/// Reads `len` bytes at `offset` from `f`, opened with `O_DIRECT`, into `buf` (aligned,
/// at least `len` rounded up to [`DIRECT_ALIGN`] long, as from [`aligned_buffer`]).
/// Whole aligned units are read, so at the end of the file the read may come up
/// short once `len` bytes are in. `EINVAL` means direct I/O is refused here (an
/// unaligned offset, or an odd short read): read through the page cache instead.
pub fn read_direct_into(
    f: &std::fs::File,
    mut buf: bytes::BytesMut,
    offset: u64,
    len: usize,
) -> std::io::Result<bytes::Bytes> {
    use std::os::unix::fs::FileExt;
    let want = len.next_multiple_of(DIRECT_ALIGN);
    if !offset.is_multiple_of(DIRECT_ALIGN as u64) || buf.len() < want {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut got = 0;
    while got < len {
        let n = f.read_at(&mut buf[got..want], offset + got as u64)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "the data ended at byte {} while reading {len} bytes at {offset}",
                    offset + got as u64
                ),
            ));
        }
        got += n;
        if got < len && !got.is_multiple_of(DIRECT_ALIGN) {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
    }
    buf.truncate(len);
    Ok(buf.freeze())
}

/// Writes a file with `O_DIRECT` where the file system allows it: each byte goes to
/// the disk once, as it is written, instead of being copied into the page cache and
/// flushed later (which dominated the CPU of a full sync, and made a restore wait
/// on one long fsync at the end). The aligned part of a write goes through an
/// aligned bounce buffer, unless `data` is aligned in memory already (then it is
/// written as it is); a short tail (the volume's last block), and everything
/// once the file system refuses direct I/O (EINVAL), goes through `buffered`, the
/// same file opened normally, whose fsync then covers it.
#[derive(Debug)]
pub struct DirectWriter {
    direct: Option<std::fs::File>,
    bounce: bytes::BytesMut,
    what: &'static str,
}

impl DirectWriter {
    /// Opens `path` again with `O_DIRECT` (for a file already open, pass
    /// `/proc/self/fd/N`); without it every write goes through the page cache.
    /// `what` names the file in the log line of a fallback.
    pub fn open(path: &std::path::Path, what: &'static str) -> DirectWriter {
        DirectWriter {
            direct: open_direct(path, false),
            bounce: bytes::BytesMut::new(),
            what,
        }
    }

    /// Writes `data` at `offset` (see the type's docs).
    pub fn write_at(
        &mut self,
        buffered: &std::fs::File,
        data: &[u8],
        offset: u64,
    ) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let aligned = data.len() / DIRECT_ALIGN * DIRECT_ALIGN;
        let Some(direct) = self
            .direct
            .as_ref()
            .filter(|_| aligned > 0 && offset.is_multiple_of(DIRECT_ALIGN as u64))
        else {
            return buffered.write_all_at(data, offset);
        };
        let in_place = data.as_ptr().align_offset(DIRECT_ALIGN) == 0;
        if !in_place && self.bounce.len() < MAX_BATCH_BYTES {
            self.bounce = aligned_buffer(MAX_BATCH_BYTES);
        }
        let mut done = 0;
        while done < aligned {
            let (n, chunk) = if in_place {
                (aligned - done, &data[done..aligned])
            } else {
                let n = (aligned - done).min(self.bounce.len());
                self.bounce[..n].copy_from_slice(&data[done..done + n]);
                (n, &self.bounce[..n])
            };
            match direct.write_all_at(chunk, offset + done as u64) {
                Ok(()) => done += n,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::info!(
                        "direct I/O refused for the {}; writing through the page cache",
                        self.what
                    );
                    self.direct = None;
                    return buffered.write_all_at(&data[done..], offset + done as u64);
                }
                Err(e) => return Err(e),
            }
        }
        if aligned < data.len() {
            buffered.write_all_at(&data[aligned..], offset + aligned as u64)?;
        }
        Ok(())
    }
}

/// Length of a block digest.
pub const DIGEST_LEN: usize = 32;

/// The BLAKE3 digest of one block's bytes. All-zero bytes are reserved for
/// [`Digest::UNWRITTEN`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Digest(pub [u8; DIGEST_LEN]);

impl Digest {
    /// Marks a block that was never written: it reads as zeros.
    pub const UNWRITTEN: Digest = Digest([0; DIGEST_LEN]);

    /// Digest of `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest(*blake3::hash(data).as_bytes())
    }

    /// Reads a digest from wire bytes.
    pub fn from_slice(b: &[u8]) -> Option<Digest> {
        <[u8; DIGEST_LEN]>::try_from(b).ok().map(Digest)
    }

    /// True when a block with this stored digest holds the same bytes as a block
    /// whose computed digest is `computed` and whose content `is_zero`.
    pub fn matches(self, computed: Digest, is_zero: bool) -> bool {
        if self == Digest::UNWRITTEN {
            is_zero
        } else {
            self == computed
        }
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("…")
    }
}

/// True when every byte is zero (fast path: compares 16-byte words).
pub fn is_zero(data: &[u8]) -> bool {
    let chunks = data.chunks_exact(16);
    let tail = chunks.remainder();
    chunks
        .map(|c| {
            let mut w = [0u8; 16];
            w.copy_from_slice(c);
            u128::from_ne_bytes(w)
        })
        .all(|w| w == 0)
        && tail.iter().all(|&b| b == 0)
}

/// Block geometry of one volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Volume size in bytes.
    pub size_bytes: u64,
    /// Block size in bytes.
    pub block_size: u32,
}

/// Why an extent or geometry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtentError {
    #[error("block size {0} is not a power of two between 4 KiB and 4 MiB")]
    BadBlockSize(u32),
    #[error("extent at offset {offset} is not aligned to the {block_size}-byte block size")]
    Unaligned { offset: u64, block_size: u32 },
    #[error(
        "extent at offset {offset} of {len} bytes reaches past the volume's end ({size_bytes} bytes)"
    )]
    PastEnd {
        offset: u64,
        len: u64,
        size_bytes: u64,
    },
    #[error("extent at offset {offset} of {len} bytes does not end on a block boundary")]
    PartialBlock { offset: u64, len: u64 },
    #[error("extent at offset {offset} is empty")]
    Empty { offset: u64 },
    #[error("extent at offset {offset} carries {got} checksums for {want} blocks")]
    ChecksumCount { offset: u64, got: usize, want: u64 },
    #[error("checksum of block {block} (offset {offset}) is not {DIGEST_LEN} bytes")]
    ChecksumLength { block: u64, offset: u64 },
    #[error("checksum mismatch in block {block} (offset {offset}): the data arrived damaged")]
    ChecksumMismatch { block: u64, offset: u64 },
}

impl Geometry {
    /// Checks the block size; any volume size is fine.
    pub fn new(size_bytes: u64, block_size: u32) -> Result<Geometry, ExtentError> {
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) || !block_size.is_power_of_two()
        {
            return Err(ExtentError::BadBlockSize(block_size));
        }
        Ok(Geometry {
            size_bytes,
            block_size,
        })
    }

    /// Number of blocks, counting a short last block.
    pub fn block_count(&self) -> u64 {
        self.size_bytes.div_ceil(u64::from(self.block_size))
    }

    /// Byte offset of block `index`.
    pub fn offset_of(&self, index: u64) -> u64 {
        index * u64::from(self.block_size)
    }

    /// Length in bytes of block `index` (the last one may be short).
    pub fn block_len(&self, index: u64) -> u64 {
        let start = self.offset_of(index);
        u64::from(self.block_size).min(self.size_bytes.saturating_sub(start))
    }

    /// Checks that `[offset, offset+len)` is a run of whole blocks inside the volume,
    /// and returns its first block index and block count.
    pub fn check_extent(&self, offset: u64, len: u64) -> Result<(u64, u64), ExtentError> {
        let bs = u64::from(self.block_size);
        if len == 0 {
            return Err(ExtentError::Empty { offset });
        }
        if !offset.is_multiple_of(bs) {
            return Err(ExtentError::Unaligned {
                offset,
                block_size: self.block_size,
            });
        }
        let end = offset.checked_add(len).ok_or(ExtentError::PastEnd {
            offset,
            len,
            size_bytes: self.size_bytes,
        })?;
        if end > self.size_bytes {
            return Err(ExtentError::PastEnd {
                offset,
                len,
                size_bytes: self.size_bytes,
            });
        }
        if !end.is_multiple_of(bs) && end != self.size_bytes {
            return Err(ExtentError::PartialBlock { offset, len });
        }
        Ok((offset / bs, len.div_ceil(bs)))
    }

    /// Checks an extent and every block's checksum; returns the digests in order.
    pub fn verify_extent(
        &self,
        offset: u64,
        data: &[u8],
        checksums: &[impl AsRef<[u8]>],
    ) -> Result<(u64, Vec<Digest>), ExtentError> {
        let (first, count) = self.check_extent(offset, data.len() as u64)?;
        if checksums.len() as u64 != count {
            return Err(ExtentError::ChecksumCount {
                offset,
                got: checksums.len(),
                want: count,
            });
        }
        let mut digests = Vec::with_capacity(checksums.len());
        for (i, (chunk, sum)) in data
            .chunks(self.block_size as usize)
            .zip(checksums)
            .enumerate()
        {
            let block = first + i as u64;
            let want = Digest::from_slice(sum.as_ref()).ok_or(ExtentError::ChecksumLength {
                block,
                offset: self.offset_of(block),
            })?;
            let got = Digest::of(chunk);
            if got != want {
                return Err(ExtentError::ChecksumMismatch {
                    block,
                    offset: self.offset_of(block),
                });
            }
            digests.push(got);
        }
        Ok((first, digests))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn geometry_and_extents() {
        let g = Geometry::new(10 * 4096 + 100, 4096).expect("valid");
        assert_eq!(g.block_count(), 11);
        assert_eq!(g.block_len(10), 100);
        assert_eq!(g.check_extent(0, 4096), Ok((0, 1)));
        assert!(matches!(
            g.check_extent(8192, 2 * 4096 + 100),
            Err(ExtentError::PartialBlock { .. })
        ));
        assert_eq!(g.check_extent(9 * 4096, 4096 + 100), Ok((9, 2)));
        assert!(matches!(
            g.check_extent(1, 4096),
            Err(ExtentError::Unaligned { .. })
        ));
        assert!(matches!(
            g.check_extent(10 * 4096, 4096),
            Err(ExtentError::PastEnd { .. })
        ));
        assert!(matches!(
            g.check_extent(0, 100),
            Err(ExtentError::PartialBlock { .. })
        ));
        assert!(matches!(
            g.check_extent(u64::MAX - 4095, 8192),
            Err(ExtentError::Unaligned { .. }) | Err(ExtentError::PastEnd { .. })
        ));
        assert!(Geometry::new(1, 1000).is_err());
        assert!(Geometry::new(1, 1 << 30).is_err());
    }

    #[test]
    fn verify_catches_damage() {
        let g = Geometry::new(3 * 4096, 4096).expect("valid");
        let data = vec![7u8; 8192];
        let sums: Vec<Vec<u8>> = data
            .chunks(4096)
            .map(|c| Digest::of(c).0.to_vec())
            .collect();
        assert!(g.verify_extent(4096, &data, &sums).is_ok());
        let mut bad = data.clone();
        bad[5000] ^= 1;
        assert_eq!(
            g.verify_extent(4096, &bad, &sums),
            Err(ExtentError::ChecksumMismatch {
                block: 2,
                offset: 8192
            })
        );
        assert!(matches!(
            g.verify_extent(4096, &data, &sums[..1]),
            Err(ExtentError::ChecksumCount { .. })
        ));
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0; 65536]));
        assert!(is_zero(&[0; 17]));
        let mut v = vec![0u8; 4099];
        v[4098] = 1;
        assert!(!is_zero(&v));
        v[4098] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
        assert!(Digest::UNWRITTEN.matches(Digest::of(&[1]), true));
        assert!(!Digest::UNWRITTEN.matches(Digest::of(&[1]), false));
    }

    proptest! {
        #[test]
        fn accepted_extents_stay_inside(size in 1u64..1_000_000, shift in 12u32..16, off in 0u64..1_100_000, len in 0u64..300_000) {
            let g = Geometry::new(size, 1 << shift).expect("valid");
            if let Ok((first, count)) = g.check_extent(off, len) {
                prop_assert!(off + len <= size);
                prop_assert_eq!(first * u64::from(g.block_size), off);
                let covered: u64 = (first..first + count).map(|b| g.block_len(b)).sum();
                prop_assert_eq!(covered, len);
            }
        }
    }
}
