//! A delta file (`deltas/<P>.delta`) of arbitrary bytes read back record by
//! record, as a restore, verify, merge or crash recovery reads it
//! (`DeltaReader::open` and `next_record_where`, storage-node/src/store/delta.rs
//! and header.rs). Input: see `RecordInput`; flag bits 0-2 choose tolerating a
//! torn tail, keeping bad data and skipping odd blocks, bits 3-5 which checksums
//! are fixed up first. Must never panic, hang or read past what the file holds.
#![no_main]

use bulwark_fuzz::{RecordInput, fix_records, scratch_file};
use bulwark_node::store::DeltaReader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(input) = RecordInput::parse(data) else {
        return;
    };
    let mut file = input.file.to_vec();
    fix_records(&mut file, b"BWKDELTA", input.geometry, input.fixes());
    let path = scratch_file("1.delta", &file);
    let Ok(mut reader) = DeltaReader::open(&path, input.geometry) else {
        return;
    };
    let tolerate_tail = input.flags & 1 != 0;
    let keep_bad_data = input.flags & 2 != 0;
    let skip_odd = input.flags & 4 != 0;
    let skip = move |block: u64| skip_odd && block % 2 == 1;
    // Every record takes at least its 53-byte header: the file bounds the count.
    let mut records = 0usize;
    while let Ok(Some(r)) = reader.next_record_where(tolerate_tail, &skip, keep_bad_data) {
        records += 1;
        assert!(
            records <= file.len() / 53,
            "more records than the file can hold"
        );
        assert!(r.block < input.geometry.block_count());
        if let Some(d) = &r.data {
            assert_eq!(d.len() as u64, input.geometry.block_len(r.block));
        }
    }
});
