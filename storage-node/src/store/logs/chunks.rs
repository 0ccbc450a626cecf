//! One log chunk as stored in its copy, and reading it back as the host's bytes.
//!
//! A copy holds its chunks' *stored* bytes one after another: a chunk is either its
//! bytes as shipped (raw) or one zstd frame of them, smaller than the chunk
//! (`[pool] compression`, kept raw when it does not shrink; see `compress.rs`).
//! Every reader goes through [`LogCopy`]: it finds a chunk by its stored offsets,
//! decodes it into exactly the chunk's logical length (never more: a frame that
//! claims or decodes to more is refused before anything that size is allocated)
//! and checks its BLAKE3, which is over the logical bytes. A chunk recorded before
//! compression has no `stored_end` and is raw, so its stored offsets are its
//! logical ones: every existing copy reads as it did.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::super::compress;
use super::super::{Result, StoreError, io};
use super::{ANCHOR_LEN, LogChunk, MAX_PIECE};

/// How a chunk's bytes are stored in its copy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChunkCodec {
    /// The bytes as shipped.
    #[default]
    Raw,
    /// One zstd frame of them, smaller than the chunk.
    Zstd,
}

impl ChunkCodec {
    /// Raw (the default, left out of the record).
    pub fn is_raw(&self) -> bool {
        *self == ChunkCodec::Raw
    }
}

/// A chunk laid out: where it starts and ends in the file (logical) and in its
/// copy (stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogPiece {
    pub start: u64,
    pub end: u64,
    pub stored_start: u64,
    pub stored_end: u64,
    pub codec: ChunkCodec,
    /// BLAKE3 of its logical bytes, hex.
    pub hash: String,
    /// The point (ship) that brought it.
    pub point: u64,
}

/// Chunks laid out end to end (each starts where the previous one ends, in the
/// file and in the copy).
pub fn pieces<'a>(chunks: impl IntoIterator<Item = &'a LogChunk>) -> Vec<LogPiece> {
    let (mut start, mut stored_start) = (0, 0);
    chunks
        .into_iter()
        .map(|c| {
            let p = LogPiece {
                start,
                end: c.end,
                stored_start,
                stored_end: c.stored_end(),
                codec: c.codec,
                hash: c.hash.clone(),
                point: c.point,
            };
            start = c.end;
            stored_start = p.stored_end;
            p
        })
        .collect()
}

/// A copy open for reading its chunks as the host's bytes.
pub struct LogCopy {
    file: File,
    path: PathBuf,
    /// What errors name: the source, the host file and its generation.
    what: String,
}

impl LogCopy {
    /// Opens the copy at `path` of host file `file` (generation `generation`) of
    /// log source `source`.
    pub fn open(path: &Path, source: &str, file: &str, generation: u32) -> Result<LogCopy> {
        Ok(LogCopy {
            file: File::open(path).map_err(io("open", path))?,
            path: path.to_path_buf(),
            what: format!(
                "log source {source}, file {} (generation {generation})",
                file.escape_debug()
            ),
        })
    }

    fn damaged(&self, p: &LogPiece, message: String) -> StoreError {
        StoreError::Damaged {
            path: self.path.clone(),
            at: p.stored_start,
            message: format!(
                "{}, the piece shipped at point {} (bytes {}..{} of the file): {message}",
                self.what, p.point, p.start, p.end
            ),
        }
    }

    /// The piece's logical bytes, checked against its BLAKE3. A record whose
    /// offsets make no sense, a frame that does not decode into exactly the piece's
    /// length, or bytes that do not hash to the piece's checksum are
    /// [`StoreError::Damaged`] naming the source, file, point and bytes.
    pub fn read(&self, p: &LogPiece) -> Result<Vec<u8>> {
        let len = p
            .end
            .checked_sub(p.start)
            .filter(|l| *l <= MAX_PIECE as u64)
            .ok_or_else(|| {
                self.damaged(
                    p,
                    format!("the record's length is not that of a piece (at most {MAX_PIECE})"),
                )
            })?;
        let stored = p.stored_end.checked_sub(p.stored_start).unwrap_or(u64::MAX);
        let fits = match p.codec {
            ChunkCodec::Raw => stored == len,
            ChunkCodec::Zstd => stored < len,
        };
        if !fits {
            return Err(self.damaged(
                p,
                format!(
                    "{stored} stored bytes cannot hold a {} piece of {len} bytes",
                    if p.codec.is_raw() {
                        "raw"
                    } else {
                        "compressed"
                    }
                ),
            ));
        }
        let mut buf = vec![0u8; stored as usize];
        self.file
            .read_exact_at(&mut buf, p.stored_start)
            .map_err(|e| self.damaged(p, format!("cannot read its {stored} stored bytes: {e}")))?;
        let data = match p.codec {
            ChunkCodec::Raw => buf,
            ChunkCodec::Zstd => {
                compress::decompress_block(&buf, len as usize).map_err(|m| self.damaged(p, m))?
            }
        };
        if blake3::hash(&data).to_hex().as_str() != p.hash {
            return Err(self.damaged(p, "its bytes do not match its checksum".into()));
        }
        Ok(data)
    }

    /// Logical bytes `start..start + len` of the file whose chunks are `pieces`.
    pub fn read_range(&self, pieces: &[LogPiece], start: u64, len: u64) -> Result<Vec<u8>> {
        let end = start + len;
        let mut out = Vec::with_capacity(len as usize);
        for p in pieces.iter().filter(|p| p.end > start && p.start < end) {
            let data = self.read(p)?;
            let from = start.max(p.start) - p.start;
            let to = end.min(p.end) - p.start;
            out.extend_from_slice(&data[from as usize..to as usize]);
        }
        if out.len() as u64 != len {
            return Err(StoreError::Damaged {
                path: self.path.clone(),
                at: start,
                message: format!(
                    "{}: its chunks hold {} of the bytes {start}..{end}",
                    self.what,
                    out.len()
                ),
            });
        }
        Ok(out)
    }

    fn hash_range(&self, pieces: &[LogPiece], start: u64, len: u64) -> Result<String> {
        if len == 0 {
            return Ok(String::new());
        }
        let data = self.read_range(pieces, start, len)?;
        Ok(blake3::hash(&data).to_hex().to_string())
    }

    /// The anchors of the file whose chunks are `pieces`: BLAKE3 of its first and
    /// its last [`ANCHOR_LEN`] logical bytes (empty strings when it is empty).
    pub fn anchors(&self, pieces: &[LogPiece]) -> Result<(String, String)> {
        let len = pieces.last().map_or(0, |p| p.end);
        let n = len.min(ANCHOR_LEN);
        Ok((
            self.hash_range(pieces, 0, n)?,
            self.hash_range(pieces, len - n, n)?,
        ))
    }
}
