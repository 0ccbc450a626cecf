//! The NBD server's transmission phase: arbitrary bytes as everything the client
//! sends after the handshake (request headers, writes followed by their payload),
//! admitted, checked, run against an in-memory export and answered with encoded
//! replies by the server's own code (nbd/src/transmission.rs, the request decoder
//! of proto.rs, replies.rs), one request at a time. The first byte chooses the
//! export (size, read-only) and what was negotiated (structured replies,
//! base:allocation). Must never panic or hang.
#![no_main]

use std::sync::Arc;

use bulwark_fuzz::MemBackend;
use bulwark_nbd::fuzzing::Negotiated;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, requests)) = data.split_first() else {
        return;
    };
    // 4 KiB to 68 KiB, not always a multiple of 512.
    let size = usize::from(mode >> 3) * 2048 + 4096 + usize::from(mode & 4) * 100;
    let backend = Arc::new(MemBackend::new(size, mode & 1 != 0));
    let negotiated = Negotiated {
        structured: mode & 2 != 0,
        base_allocation: mode & 6 == 6,
    };
    let _ = bulwark_nbd::fuzzing::requests(requests, backend, negotiated);
});
