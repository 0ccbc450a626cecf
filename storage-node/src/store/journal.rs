//! The journal: a sync's new blocks, in the delta record format but carrying the
//! NEW digests (a block of zeros is recorded without data), from the sync's receive
//! until its point is settled (see the crash argument in `store/mod.rs`). Written by
//! [`SyncTxn::apply_prepared`](super::SyncTxn::apply_prepared) through a
//! `DeltaAppender`, read back group by group by the settle.

use std::path::{Path, PathBuf};

use bulwark_common::block::{Digest, Geometry};

use super::*;

pub(super) fn journal_path(dir: &Path) -> PathBuf {
    dir.join("journal")
}

/// The next group of a journal being settled: up to `max_bytes` of new blocks, as
/// extents of consecutive blocks in journal order (none at the end), counted into
/// `blocks`. Every record's checksum is checked as it is read; a record without
/// data must carry the checksum of zeros.
pub(super) fn next_group(
    reader: &mut DeltaReader,
    zero: &ZeroDigests,
    max_bytes: u64,
    blocks: &mut u64,
) -> Result<Vec<VerifiedExtent>> {
    // One group: runs of consecutive blocks as extents, in journal order.
    let mut runs: Vec<(u64, Vec<u8>, Vec<Digest>)> = Vec::new();
    let mut bytes = 0u64;
    while bytes < max_bytes {
        let at = reader.at;
        let Some(r) = reader.next_record(false)? else {
            break;
        };
        let len = reader.geometry.block_len(r.block) as usize;
        let data = match r.data {
            Some(d) => d,
            None if r.digest == zero.of(r.block) => vec![0u8; len],
            None => {
                return Err(StoreError::Damaged {
                    path: reader.path.clone(),
                    at,
                    message: format!(
                        "block {}: a record of zeros does not carry the checksum of zeros",
                        r.block
                    ),
                });
            }
        };
        bytes += len as u64;
        *blocks += 1;
        match runs.last_mut() {
            Some((first, d, ds)) if *first + ds.len() as u64 == r.block => {
                d.extend_from_slice(&data);
                ds.push(r.digest);
            }
            _ => runs.push((r.block, data, vec![r.digest])),
        }
    }
    Ok(runs
        .into_iter()
        .map(|(first_block, d, digests)| VerifiedExtent {
            first_block,
            data: d.into(),
            digests,
        })
        .collect())
}

/// Reads the whole journal at `path` of a volume with `geometry` the way a settle
/// does, group by group of up to `max_bytes` (at least one block each), checking
/// every record; returns the blocks read. The entry point of the fuzz target
/// `journal_record` (fuzz/, cargo-fuzz); not part of the store's API.
#[doc(hidden)]
pub fn read_journal(path: &Path, geometry: Geometry, max_bytes: u64) -> Result<u64> {
    let mut reader = DeltaReader::open(path, geometry)?;
    let zero = ZeroDigests::new(geometry);
    let mut blocks = 0;
    while !next_group(&mut reader, &zero, max_bytes.max(1), &mut blocks)?.is_empty() {}
    Ok(blocks)
}
