//! A sync's journal of arbitrary bytes read the way a settle reads it: group by
//! group, every record's checksum checked, a record without data carrying the
//! checksum of zeros (`read_journal`: storage-node/src/store/journal.rs with the
//! record codec of delta.rs and the header of header.rs). Input: see
//! `RecordInput`; `extra` is the group size in bytes. Must never panic or hang.
#![no_main]

use bulwark_fuzz::{RecordInput, fix_records, scratch_file};
use bulwark_node::store::read_journal;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(input) = RecordInput::parse(data) else {
        return;
    };
    let mut file = input.file.to_vec();
    fix_records(&mut file, b"BWKJRNL1", input.geometry, input.fixes());
    // The reader tells a journal from a delta by its name.
    let path = scratch_file("journal", &file);
    if let Ok(blocks) = read_journal(&path, input.geometry, u64::from(input.extra)) {
        assert!(
            blocks <= (file.len() / 53) as u64,
            "more blocks than records"
        );
    }
});
