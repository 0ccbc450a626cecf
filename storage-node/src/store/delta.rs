//! The delta record codec: encoding, appending and reading records of a delta file or
//! the journal.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use bulwark_common::block::{
    DIGEST_LEN, DIRECT_ALIGN, Digest, DirectWriter, Geometry, aligned_buffer,
};

use super::*;

pub(super) const HEADER_LEN: usize = 8 + 1 + 4 + DIGEST_LEN;
pub(super) const CHECK_LEN: usize = 8;

pub(super) fn encode_record(
    buf: &mut impl bytes::BufMut,
    block: u64,
    digest: Digest,
    data: Option<&[u8]>,
    len: usize,
) {
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(&block.to_le_bytes());
    header[8] = u8::from(data.is_some());
    header[9..13].copy_from_slice(&(len as u32).to_le_bytes());
    header[13..].copy_from_slice(&digest.0);
    let check = blake3::hash(&header);
    buf.put_slice(&header);
    buf.put_slice(&check.as_bytes()[..CHECK_LEN]);
    if let Some(d) = data {
        buf.put_slice(d);
    }
}

/// Length of one encoded record.
pub(super) fn record_len(data: Option<&[u8]>) -> usize {
    HEADER_LEN + CHECK_LEN + data.map_or(0, <[u8]>::len)
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
    pub(super) fn create(file: File, path: &Path, kind: DataFile) -> Result<DeltaAppender> {
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
        })
    }

    /// Appends `records` (block, old digest, old bytes or none for zeros, block
    /// length) to the file, which is `end` bytes long; not yet durable.
    pub(super) fn append<'a>(
        &mut self,
        end: u64,
        records: impl Iterator<Item = (u64, Digest, Option<&'a [u8]>, usize)>,
    ) -> std::io::Result<()> {
        bulwark_common::failpoint::io(self.fault)?;
        let mut page_start = end - self.tail.len() as u64;
        let mut buf = self
            .chunk
            .take()
            .unwrap_or_else(|| aligned_buffer(DELTA_CHUNK));
        buf.clear();
        buf.extend_from_slice(&self.tail);
        for (block, digest, data, len) in records {
            let need = record_len(data);
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
            encode_record(&mut buf, block, digest, data, len);
        }
        self.writer.write_at(&self.file, &buf, page_start)?;
        self.tail = buf[buf.len() / DIRECT_ALIGN * DIRECT_ALIGN..].to_vec();
        self.chunk = Some(buf);
        Ok(())
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
    /// Where the record's data starts in the file (`None`: the block reads as zeros).
    pub data_offset: Option<u64>,
}

/// Reads a delta file's records in order.
pub struct DeltaReader {
    pub(super) reader: BufReader<File>,
    pub(super) path: PathBuf,
    pub(super) geometry: Geometry,
    pub(super) at: u64,
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
        if block >= self.geometry.block_count() || len != self.geometry.block_len(block) || kind > 1
        {
            return self.bad(tolerate_tail, "record names a block outside the volume");
        }
        let mut intact = true;
        let data = if kind == 1 && skip(block) {
            self.reader
                .seek_relative(len as i64)
                .map_err(io("seek", &self.path))?;
            None
        } else if kind == 1 {
            let mut d = vec![0u8; len as usize];
            match read_full(&mut self.reader, &mut d) {
                Ok(n) if n == d.len() => {}
                Ok(_) => return self.bad(tolerate_tail, "torn record data"),
                Err(e) => return Err(io("read", &self.path)(e)),
            }
            if Digest::of(&d) != digest {
                if !keep_bad_data {
                    return self.bad(
                        tolerate_tail,
                        &format!("block {block}: record data does not match its checksum"),
                    );
                }
                intact = false;
            }
            Some(d)
        } else {
            None
        };
        let data_offset = (kind == 1).then_some(self.at + head.len() as u64);
        self.at += head.len() as u64 + if kind == 1 { len } else { 0 };
        Ok(Some(DeltaRecord {
            block,
            digest,
            data,
            intact,
            data_offset,
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
