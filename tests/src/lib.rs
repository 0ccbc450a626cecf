//! End-to-end test harness: real `bulwark-coordinator`, `bulwark-node`,
//! `bulwark-agent` and `bulwark` binaries on 127.0.0.1 with a fresh CA per test, real
//! TLS and real files. No mocks.
//!
//! - [`bins`]: builds the binaries once per test process (under a file lock) and finds
//!   them next to the test binary.
//! - [`fleet`]: [`Fleet`] / [`FleetBuilder`]: temporary directory, PKI through the CLI,
//!   config files, daemons, readiness waits, the CLI as admin or as anyone.
//! - [`process`]: [`Daemon`] (start, stop by SIGTERM, kill -9, restart, wait for a log
//!   line) and commands run with a deadline.
//! - [`etcd`]: [`etcd::EtcdCluster`]: real 1- or 3-member etcd clusters (optionally
//!   TLS with client certificates), members killed and restarted.
//! - [`files`]: random volumes, in-place block rewrites, BLAKE3, comparisons.
//! - [`grpc`]: raw gRPC clients with any certificate, and a TLS client without one.
//! - [`hostile`]: what a host taken over sends, and proof that no point was lost.
//! - [`otlp`]: a small OTLP collector the telemetry tests point daemons at.
//! - [`qemu`]: whether a qemu-utils tool is installed, random qcow2 images.
//! - [`loopdev`]: whether loop devices can be used, one attached over a file.
//! - [`skip`]: a test that cannot run here says so in one fixed form
//!   (`BULWARK-SKIP <test> facility=<facility>: <reason>`, also appended to
//!   `$BULWARK_SKIP_LOG`), which `.ci/test` lists and CI checks.

pub mod bins;
pub mod etcd;
pub mod files;
pub mod fleet;
pub mod grpc;
pub mod hostile;
pub mod loopdev;
pub mod otlp;
pub mod process;
pub mod qemu;

use std::future::Future;
use std::time::{Duration, Instant};

pub use bulwark_common::config::TlsFiles;
pub use bulwark_common::testkit::{have_root, have_tool, on_path, skip};
pub use files::{
    assert_same_file, byte_size, compare_files, differing_blocks, dir_hashes, file_hash,
    rewrite_random_blocks, write_random_file,
};
pub use fleet::{Fleet, FleetBuilder, Pki};
pub use process::{Background, Daemon};
pub use serde_json::Value;

/// The block size every test source uses.
pub const BLOCK_SIZE: u64 = 64 * 1024;
/// One MiB.
pub const MIB: u64 = 1024 * 1024;

/// A port that was free a moment ago on 127.0.0.1 (bound, then released), for a
/// daemon to listen on. Picked at random below Linux's ephemeral range (32768 and
/// up): a port the kernel hands out for port 0 is also what it gives outgoing
/// connections, so one picked that way can be taken by any client socket (another
/// test's CLI or agent) before the daemon binds it.
pub fn free_port() -> u16 {
    for _ in 0..1000 {
        let port = 15_000 + rand::random::<u16>() % 17_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("cannot bind 127.0.0.1:0");
    l.local_addr()
        .expect("a bound listener has an address")
        .port()
}

/// Calls `f` every 100 ms until it returns `Ok`, and returns that value; panics with
/// `what` and the last error after `timeout`.
pub fn poll<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) => {
                if start.elapsed() >= timeout {
                    panic!("timed out after {timeout:?} waiting for {what}; last: {e}");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs a future to completion on a fresh current-thread runtime.
pub fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cannot build a tokio runtime")
        .block_on(f)
}

/// A multi-thread tokio runtime for a test's async parts.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("cannot build a tokio runtime")
}

/// The number after `--NAME` on the command line of an example, or `default`.
pub fn example_arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Field `key` of a JSON object as a u64; panics naming the object otherwise.
pub fn json_u64(v: &Value, key: &str) -> u64 {
    v.get(key)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no unsigned integer field `{key}` in {v}"))
}

/// Field `key` of a JSON object as a string; panics naming the object otherwise.
pub fn json_str(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string field `{key}` in {v}"))
        .to_string()
}

/// Field `key` of a JSON object as a bool; panics naming the object otherwise.
pub fn json_bool(v: &Value, key: &str) -> bool {
    v.get(key)
        .and_then(Value::as_bool)
        .unwrap_or_else(|| panic!("no boolean field `{key}` in {v}"))
}
