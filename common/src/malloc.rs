//! Settings of glibc's allocator for the data path, applied first thing in every
//! binary.
//!
//! A sync moves megabyte buffers through several owners: the agent's read chunks, the
//! gRPC encoder's message buffer, the node's decode buffer. glibc serves an
//! allocation of 128 KiB or more with a fresh `mmap` of its own (the threshold rises
//! only after such a block is freed) and hands freed heap tops back to the kernel
//! beyond 128 KiB, so each megabyte message cost page faults and page zeroing on
//! both ends: about a sixth of the CPU of a full sync. Raising both thresholds keeps
//! those buffers in the heap and reuses them. Measured with `bench/sync-throughput.sh`
//! (1 GiB, 2 vCPUs): full sync from about 700 to about 900-960 MB/s, CPU of node and
//! agent from 2.5 to 1.9 core-seconds, peak RSS of each about 40 MiB.
//!
//! An operator's own `GLIBC_TUNABLES` for malloc wins: nothing is changed then.

/// Blocks up to this size come from the heap, not from a mapping of their own
/// (a message buffer is 1-2 MiB; the rare larger block still gets a mapping).
pub const MMAP_THRESHOLD: usize = 4 << 20;
/// Free memory at a heap's top kept for reuse rather than returned to the kernel:
/// enough for a few message buffers, small enough that an idle agent stays small
/// (64 MiB here raised the agent's peak RSS in `bench/trackers.sh` from about 50 to
/// 70 MiB for no gain).
pub const TRIM_THRESHOLD: usize = 8 << 20;

/// Applies the settings above (glibc on Linux only; elsewhere nothing happens).
/// Returns whether they were applied.
pub fn tune() -> bool {
    if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.")) {
        return false;
    }
    apply()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn apply() -> bool {
    // SAFETY: mallopt only changes allocator parameters; it is called before any
    // other thread exists (first thing in main) and takes plain integers.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> bool {
    false
}

#[cfg(test)]
mod tests {
    #[test]
    fn glibc_takes_the_settings() {
        // mallopt answers 1 when it accepts a value; a threshold past glibc's bound
        // (HEAP_MAX_SIZE / 2) would be refused with 0.
        if cfg!(all(target_os = "linux", target_env = "gnu")) {
            assert!(super::apply(), "mallopt refused the thresholds");
        }
    }
}
