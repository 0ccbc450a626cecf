//! Benchmark of log shipping (issue 6): 1,000 small appends across 10 log files,
//! then one ship; repeated for several rounds. Prints, per round, the bytes
//! appended, sent and read on the host, the ship's duration inside the agent and as
//! `bulwark sync --wait` sees it (CLI start to answer), and beside it
//! `rsync -a --append` of the same directory to a local copy. Also ships every 100
//! appends, for the latency of frequent ships.
//!
//! Run with `bash bench/logship.sh` (release binaries).

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bulwark_tests::{Fleet, json_u64};

const FILES: usize = 10;
const HISTORY: usize = 1 << 20;

fn append_round(dir: &Path, appends: usize, seed: &mut u64) -> u64 {
    let mut total = 0;
    for i in 0..appends {
        *seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let len = 64 + (*seed >> 33) as usize % 449; // 64..512 bytes, like log records
        let line: Vec<u8> = (0..len).map(|j| b'a' + ((j + i) % 26) as u8).collect();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join(format!("log-{:02}", i % FILES)))
            .expect("open log");
        f.write_all(&line).expect("append");
        total += len as u64;
    }
    total
}

fn rsync(src: &Path, dst: &Path) -> Option<Duration> {
    let t = Instant::now();
    let ok = Command::new("rsync")
        .args(["-a", "--append"])
        .arg(format!("{}/", src.display()))
        .arg(dst)
        .status()
        .ok()?
        .success();
    ok.then(|| t.elapsed())
}

fn main() {
    let logs = tempfile::tempdir().expect("tmp");
    let dir = logs.path().join("logs");
    std::fs::create_dir(&dir).expect("dir");
    for i in 0..FILES {
        let history: Vec<u8> = (0..HISTORY).map(|j| (j % 251) as u8).collect();
        std::fs::write(dir.join(format!("log-{i:02}")), history).expect("history");
    }
    let copy = logs.path().join("rsync-copy");
    let fleet = Fleet::builder()
        .node("node-1")
        .agent_log("host-1", "host-1-log", &dir, "")
        .start();
    let have_rsync = rsync(&dir, &copy).is_some();
    let first = fleet.sync("host-1-log");
    println!(
        "history: {FILES} files of {} KiB shipped: {} bytes in {} ms",
        HISTORY / 1024,
        json_u64(&first, "bytes_sent"),
        json_u64(&first, "duration_ms")
    );
    println!();
    println!(
        "{:<28} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9}",
        "round", "appended", "sent", "read", "agent_ms", "cli_ms", "rsync_ms"
    );
    let mut seed = 42u64;
    let row = |label: String, appends: usize, seed: &mut u64| {
        let appended = append_round(&dir, appends, seed);
        let t = Instant::now();
        let r = fleet.sync("host-1-log");
        let cli = t.elapsed();
        let rs = if have_rsync {
            rsync(&dir, &copy).map_or("-".into(), |d| format!("{:.1}", d.as_secs_f64() * 1e3))
        } else {
            "n/a".into()
        };
        assert_eq!(json_u64(&r, "bytes_sent"), appended, "{r}");
        println!(
            "{:<28} {:>9} {:>9} {:>9} {:>9} {:>10.1} {:>9}",
            label,
            appended,
            json_u64(&r, "bytes_sent"),
            json_u64(&r, "bytes_read"),
            json_u64(&r, "duration_ms"),
            cli.as_secs_f64() * 1e3,
            rs
        );
    };
    for round in 1..=5 {
        row(format!("1000 appends, round {round}"), 1000, &mut seed);
    }
    for round in 1..=10 {
        row(format!("100 appends, ship {round}"), 100, &mut seed);
    }
    if !have_rsync {
        println!("(rsync is not installed: no peer figures)");
    }
    // The restore of the newest point equals the directory.
    let to = fleet.scratch("restore");
    fleet.restore("host-1-log", None, &to, None);
    for i in 0..FILES {
        let name = format!("log-{i:02}");
        let a = std::fs::read(dir.join(&name)).expect("host");
        let b = std::fs::read(to.join(&name)).expect("restored");
        assert!(a == b, "{name} restored differently");
    }
    println!("\nnewest point restored: all {FILES} files identical to the host's");
}
