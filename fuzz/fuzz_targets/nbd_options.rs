//! The NBD server's handshake after its greeting: arbitrary bytes as everything
//! the client sends (its flags, then options with their data), through the
//! server's own greeting and option haggling (nbd/src/handshake.rs, the option
//! decoders of proto.rs), in-process over a byte slice. The first byte chooses
//! the export (size, read-only) and whether TLS is required (a TLS listener
//! before STARTTLS). Must never panic or hang.
#![no_main]

use std::sync::{Arc, OnceLock};

use bulwark_fuzz::MemBackend;
use libfuzzer_sys::fuzz_target;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, client)) = data.split_first() else {
        return;
    };
    let backend = Arc::new(MemBackend::new(
        usize::from(mode >> 2) * 512 + 4096,
        mode & 1 != 0,
    ));
    let tls_required = mode & 2 != 0;
    let _ = runtime().block_on(bulwark_nbd::fuzzing::handshake(
        client,
        backend,
        tls_required,
    ));
});
