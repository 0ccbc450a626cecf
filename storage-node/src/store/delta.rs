//! The delta record codec: encoding, appending and reading records of a delta file or
//! the journal.
//!
//! A record is a 45-byte header (block index u64 LE; kind u8; length u32 LE; the
//! block's digest), an 8-byte check (the first 8 bytes of BLAKE3 of the header),
//! then its stored bytes. The kind says how the block is stored:
//!
//! - 0 ([`KIND_ZEROS`]): the block reads as zeros; no bytes follow; the length is
//!   the block's.
//! - 1 ([`KIND_RAW`]): the block's bytes follow; the length is the block's.
//! - 2 ([`KIND_ZSTD`], data-file format version 2 on): one zstd frame follows; the
//!   length is the frame's, at least 1 and less than the block's (a block that
//!   does not shrink is stored raw). The frame must decode to exactly the block's
//!   length, which the volume's geometry gives (the last block may be short).
//!
//! The digest is always over the block's LOGICAL bytes (after decompression), so a
//! reader decompresses, into a buffer of the block's length and never more, and
//! checks the digest as for a raw record.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use bulwark_common::block::{
    DIGEST_LEN, DIRECT_ALIGN, Digest, DirectWriter, Geometry, aligned_buffer,
};

use super::compress::{Compression, compress_block, decompress_block};
use super::*;

pub(super) const HEADER_LEN: usize = 8 + 1 + 4 + DIGEST_LEN;
pub(super) const CHECK_LEN: usize = 8;

/// A record's kinds (byte 8 of its header): zeros, raw bytes, a zstd frame.
pub(super) const KIND_ZEROS: u8 = 0;
pub(super) const KIND_RAW: u8 = 1;
pub(super) const KIND_ZSTD: u8 = 2;

/// What follows a record's header: nothing (zeros), the block's bytes, or a zstd
/// frame of them.
#[derive(Debug, Clone, Copy)]
pub(super) enum Payload<'a> {
    Zeros,
    Raw(&'a [u8]),
    Zstd(&'a [u8]),
}

impl<'a> Payload<'a> {
    fn kind(self) -> u8 {
        match self {
            Payload::Zeros => KIND_ZEROS,
            Payload::Raw(_) => KIND_RAW,
            Payload::Zstd(_) => KIND_ZSTD,
        }
    }

    /// The bytes stored after the header.
    pub(super) fn stored(self) -> &'a [u8] {
        match self {
            Payload::Zeros => &[],
            Payload::Raw(d) | Payload::Zstd(d) => d,
        }
    }

    /// The payload of `data` (`None`: zeros) compressed with `c` into `scratch`
    /// when that makes it smaller, else raw.
    pub(super) fn of(
        data: Option<&'a [u8]>,
        c: Compression,
        scratch: &'a mut Vec<u8>,
    ) -> Payload<'a> {
        match data {
            None => Payload::Zeros,
            Some(d) if compress_block(c, d, scratch) => Payload::Zstd(scratch),
            Some(d) => Payload::Raw(d),
        }
    }
}

/// Where a record's block is in its file (for views of a point).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stored {
    /// It reads as zeros.
    Zeros,
    /// Its bytes are at this offset.
    Raw { at: u64 },
    /// A zstd frame of `len` bytes at this offset.
    Zstd { at: u64, len: u32 },
}

/// Encodes one record of `block` (whose logical length is `len`) into `buf`.
pub(super) fn encode_record(
    buf: &mut impl bytes::BufMut,
    block: u64,
    digest: Digest,
    payload: Payload<'_>,
    len: usize,
) {
    let stored_len = match payload {
        Payload::Zstd(f) => f.len(),
        Payload::Zeros | Payload::Raw(_) => len,
    };
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(&block.to_le_bytes());
    header[8] = payload.kind();
    header[9..13].copy_from_slice(&(stored_len as u32).to_le_bytes());
    header[13..].copy_from_slice(&digest.0);
    let check = blake3::hash(&header);
    buf.put_slice(&header);
    buf.put_slice(&check.as_bytes()[..CHECK_LEN]);
    buf.put_slice(payload.stored());
}

/// Length of one encoded record.
pub(super) fn record_len(payload: Payload<'_>) -> usize {
    HEADER_LEN + CHECK_LEN + payload.stored().len()
}

/// Length of the record of `data` (`None`: zeros) were it stored raw: what a
/// record counts in a delta's logical bytes.
pub(super) fn logical_record_len(data: Option<&[u8]>) -> usize {
    HEADER_LEN + CHECK_LEN + data.map_or(0, <[u8]>::len)
}

/// Bytes an append wrote: as stored, and as they would be raw.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Appended {
    pub(super) stored: u64,
    pub(super) logical: u64,
}

/// Appends records to a delta file (a settle's before-images) or to a journal (a
/// sync's new blocks) through a
/// [`DirectWriter`]: the records are built in a page-aligned buffer that starts with
/// the file's last partial page, so whole pages go to the disk with `O_DIRECT` and no
/// bounce copy, and only the new partial last page through the page cache (the next
/// append rewrites that page whole, its leading bytes unchanged). 41 MiB of
/// scattered before-images took 60-110 ms through the page cache and fdatasync, 30 ms
/// direct. The buffer is one reused chunk of [`DELTA_CHUNK`], written whenever it
/// fills: a buffer as large as each group (16 MiB and more) was fresh memory every
/// time, and faulting and zeroing its pages took most of the node's CPU in a
/// scattered incremental.
pub(super) struct DeltaAppender {
    pub(super) file: File,
    pub(super) path: PathBuf,
    pub(super) writer: DirectWriter,
    /// The file's bytes from its last page boundary on (fewer than a page).
    pub(super) tail: Vec<u8>,
    /// The chunk, kept between appends (page-aligned).
    pub(super) chunk: Option<bytes::BytesMut>,
    /// The I/O fault point of its writes: `node-io-journal-write` or
    /// `node-io-delta-write` (see `bulwark_common::failpoint`).
    pub(super) fault: &'static str,
    /// How data records are compressed (see `compress.rs`).
    pub(super) compression: Compression,
    /// A record's zstd frame, kept between records.
    pub(super) scratch: Vec<u8>,
}

/// Bytes of records built before they are written: below the allocator's mmap
/// threshold, so that a sync's chunk comes from (and goes back to) the heap. Tiny in
/// unit tests, so that the crash tests cross chunk boundaries.
pub(super) const DELTA_CHUNK: usize = if cfg!(test) {
    3 * DIRECT_ALIGN
} else {
    2 << 20
};

impl DeltaAppender {
    /// Starts a new, empty file of `kind` (a delta or the journal) with its header
    /// (see `header.rs`): the file is then [`FILE_HEADER_LEN`] bytes long.
    pub(super) fn create(
        file: File,
        path: &Path,
        kind: DataFile,
        compression: Compression,
    ) -> Result<DeltaAppender> {
        kind.write_header(&file, path)?;
        let (what, fault) = if kind == DataFile::Journal {
            ("journal", "node-io-journal-write")
        } else {
            ("delta", "node-io-delta-write")
        };
        Ok(DeltaAppender {
            file,
            path: path.to_path_buf(),
            writer: DirectWriter::open(path, what),
            // The header is the start of the first page, which the first append
            // writes again whole.
            tail: kind.header().to_vec(),
            chunk: None,
            fault,
            compression,
            scratch: Vec::new(),
        })
    }

    /// Appends `records` (block, digest, bytes or none for zeros, their zstd frame
    /// if the caller made one, block length) to the file, which is `end` bytes
    /// long; a record without a frame is compressed as the appender's
    /// [`Compression`] says when that shrinks it. Not yet durable. With `located`,
    /// where each record's block went is pushed there (views of a point).
    pub(super) fn append<'a>(
        &mut self,
        end: u64,
        records: impl Iterator<Item = (u64, Digest, Option<&'a [u8]>, Option<&'a [u8]>, usize)>,
        mut located: Option<&mut Vec<(u64, Stored)>>,
    ) -> std::io::Result<Appended> {
        bulwark_common::failpoint::io(self.fault)?;
        let mut page_start = end - self.tail.len() as u64;
        let mut buf = self
            .chunk
            .take()
            .unwrap_or_else(|| aligned_buffer(DELTA_CHUNK));
        buf.clear();
        buf.extend_from_slice(&self.tail);
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut appended = Appended::default();
        for (block, digest, data, frame, len) in records {
            let payload = match (frame, data) {
                (Some(f), Some(_)) => Payload::Zstd(f),
                _ => Payload::of(data, self.compression, &mut scratch),
            };
            let need = record_len(payload);
            if buf.len() + need > buf.capacity() {
                // Write the whole pages built so far; the partial page moves to the
                // front and is written again with what follows it.
                let whole = buf.len() / DIRECT_ALIGN * DIRECT_ALIGN;
                if whole > 0 {
                    self.writer
                        .write_at(&self.file, &buf[..whole], page_start)?;
                    page_start += whole as u64;
                    buf.copy_within(whole.., 0);
                    buf.truncate(buf.len() - whole);
                }
                if buf.len() + need > buf.capacity() {
                    // One record larger than a chunk (a huge block size).
                    let mut bigger =
                        aligned_buffer((buf.len() + need).next_multiple_of(DIRECT_ALIGN));
                    bigger.clear();
                    bigger.extend_from_slice(&buf);
                    buf = bigger;
                }
            }
            if let Some(located) = located.as_deref_mut() {
                let at = page_start + (buf.len() + HEADER_LEN + CHECK_LEN) as u64;
                located.push((
                    block,
                    match payload {
                        Payload::Zeros => Stored::Zeros,
                        Payload::Raw(_) => Stored::Raw { at },
                        Payload::Zstd(f) => Stored::Zstd {
                            at,
                            len: f.len() as u32,
                        },
                    },
                ));
            }
            encode_record(&mut buf, block, digest, payload, len);
            appended.stored += need as u64;
            appended.logical += logical_record_len(data) as u64;
        }
        self.scratch = scratch;
        self.writer.write_at(&self.file, &buf, page_start)?;
        self.tail = buf[buf.len() / DIRECT_ALIGN * DIRECT_ALIGN..].to_vec();
        self.chunk = Some(buf);
        Ok(appended)
    }
}

/// One before-image read back from a delta file.
#[derive(Debug)]
pub struct DeltaRecord {
    pub block: u64,
    pub digest: Digest,
    /// `None` when the block read as zeros (or its data was skipped).
    pub data: Option<Vec<u8>>,
    /// The data matches the digest (always, unless bad data was asked for).
    pub intact: bool,
    /// Where the record's stored bytes start in the file (`None`: the block reads
    /// as zeros).
    pub data_offset: Option<u64>,
    /// A compressed record: its zstd frame's length (at `data_offset`).
    pub compressed_len: Option<u32>,
    /// A compressed record's frame as stored, when the reader keeps frames (a
    /// merge copies it as it is) and its data was read.
    pub frame: Option<Vec<u8>>,
}

/// Reads a delta file's records in order.
pub struct DeltaReader {
    pub(super) reader: BufReader<File>,
    pub(super) path: PathBuf,
    pub(super) geometry: Geometry,
    pub(super) at: u64,
    /// Hand out compressed records' frames (see [`DeltaRecord::frame`]).
    pub(super) keep_frames: bool,
}

impl DeltaReader {
    /// Opens a delta file of a volume with `geometry`.
    /// Its header is checked first (see `header.rs`): a file of a newer format, or
    /// not a delta (or journal), is refused with an error naming it.
    pub fn open(path: &Path, geometry: Geometry) -> Result<DeltaReader> {
        use std::io::{Seek, SeekFrom};
        let mut f = File::open(path).map_err(io("open", path))?;
        let kind = if path.file_name().is_some_and(|n| n == "journal") {
            DataFile::Journal
        } else {
            DataFile::Delta
        };
        let start = content_start(&f, path, kind)?;
        f.seek(SeekFrom::Start(start)).map_err(io("seek", path))?;
        Ok(DeltaReader {
            reader: BufReader::with_capacity(1 << 20, f),
            path: path.to_path_buf(),
            geometry,
            at: start,
            keep_frames: false,
        })
    }

    /// The next valid record. With `tolerate_tail`, a torn or damaged record ends the
    /// file (recovery after a crash); without, it is an error (restore of a committed
    /// delta, which must be whole).
    pub fn next_record(&mut self, tolerate_tail: bool) -> Result<Option<DeltaRecord>> {
        self.next_record_where(tolerate_tail, &|_| false, false)
    }

    /// [`DeltaReader::next_record`], but the data of a record whose block `skip`
    /// names is not read (seeked over, so that a restore reads each stored block at
    /// most once), and with `keep_bad_data` a record whose data does not match its
    /// digest is returned with `intact: false` instead of failing (a verify, or a
    /// merge that must carry the damage along).
    pub fn next_record_where(
        &mut self,
        tolerate_tail: bool,
        skip: &dyn Fn(u64) -> bool,
        keep_bad_data: bool,
    ) -> Result<Option<DeltaRecord>> {
        let mut head = [0u8; HEADER_LEN + CHECK_LEN];
        match read_full(&mut self.reader, &mut head) {
            Ok(0) => return Ok(None),
            Ok(n) if n < head.len() => return self.bad(tolerate_tail, "torn record header"),
            Ok(_) => {}
            Err(e) => return Err(io("read", &self.path)(e)),
        }
        let check = blake3::hash(&head[..HEADER_LEN]);
        if check.as_bytes()[..CHECK_LEN] != head[HEADER_LEN..] {
            return self.bad(tolerate_tail, "record header check failed");
        }
        let block = u64::from_le_bytes(head[0..8].try_into().unwrap_or([0; 8]));
        let kind = head[8];
        let len = u32::from_le_bytes(head[9..13].try_into().unwrap_or([0; 4])) as u64;
        let digest = Digest::from_slice(&head[13..HEADER_LEN]).unwrap_or(Digest::UNWRITTEN);
        if block >= self.geometry.block_count() || kind > KIND_ZSTD {
            return self.bad(tolerate_tail, "record names a block outside the volume");
        }
        let block_len = self.geometry.block_len(block);
        // A frame is never empty and always smaller than its block: so reading
        // one takes at most a block, as a raw record does.
        let len_ok = if kind == KIND_ZSTD {
            len > 0 && len < block_len
        } else {
            len == block_len
        };
        if !len_ok {
            return self.bad(
                tolerate_tail,
                &format!("record of block {block}: a stored length of {len} bytes does not fit the block's {block_len}"),
            );
        }
        let has_data = kind != KIND_ZEROS;
        let mut intact = true;
        let mut frame = None;
        let data = if has_data && skip(block) {
            self.reader
                .seek_relative(len as i64)
                .map_err(io("seek", &self.path))?;
            None
        } else if has_data {
            let mut d = vec![0u8; len as usize];
            match read_full(&mut self.reader, &mut d) {
                Ok(n) if n == d.len() => {}
                Ok(_) => return self.bad(tolerate_tail, "torn record data"),
                Err(e) => return Err(io("read", &self.path)(e)),
            }
            let plain = if kind == KIND_ZSTD {
                let plain = decompress_block(&d, block_len as usize);
                if self.keep_frames {
                    frame = Some(d);
                }
                plain
            } else {
                Ok(d)
            };
            let checked = match plain {
                Ok(d) if Digest::of(&d) == digest => Ok(d),
                Ok(d) => Err((
                    Some(d),
                    "record data does not match its checksum".to_string(),
                )),
                // Nothing to hand out: the frame does not decode.
                Err(why) => Err((None, why)),
            };
            match checked {
                Ok(d) => Some(d),
                Err((_, why)) if !keep_bad_data => {
                    return self.bad(tolerate_tail, &format!("block {block}: {why}"));
                }
                Err((d, _)) => {
                    intact = false;
                    d
                }
            }
        } else {
            None
        };
        let data_offset = has_data.then_some(self.at + head.len() as u64);
        self.at += head.len() as u64 + if has_data { len } else { 0 };
        Ok(Some(DeltaRecord {
            block,
            digest,
            data,
            intact,
            data_offset,
            compressed_len: (kind == KIND_ZSTD).then_some(len as u32),
            frame,
        }))
    }

    pub(super) fn bad(&self, tolerate_tail: bool, message: &str) -> Result<Option<DeltaRecord>> {
        if tolerate_tail {
            Ok(None)
        } else {
            Err(StoreError::Damaged {
                path: self.path.clone(),
                at: self.at,
                message: message.to_string(),
            })
        }
    }
}

pub(super) fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
