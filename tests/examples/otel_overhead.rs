//! Benchmark: sync throughput with OpenTelemetry export off and on (issue 7's
//! target: under 3% apart). One volume file of random data; a fleet with export off
//! and a fleet exporting to an OTLP collector in this process (tests/src/otlp.rs)
//! with traces and metrics; each fleet runs full syncs of the same volume (a fresh
//! source each time) and incremental syncs after scattered rewrites, alternating,
//! several rounds. Prints each run and the medians.
//!
//! Run with `bash bench/otel-overhead.sh` (release binaries). Options:
//! `--mib N` volume size (512), `--rounds N` (3).

use std::path::Path;
use std::time::Duration;

use bulwark_tests::otlp::{Collector, start_collector};
use bulwark_tests::{Fleet, MIB, json_u64};

fn start(volume: &Path, size: u64, env: &[(&str, &str)]) -> Fleet {
    let mut fleet = Fleet::builder()
        .node("node-1")
        .agent_volume("host-1", "vol", volume, size)
        .build();
    fleet.coordinator().start_with_env(env);
    fleet.wait_coordinator();
    fleet.node("node-1").start_with_env(env);
    fleet.wait_nodes_up(&["node-1".to_string()]);
    fleet.agent("host-1").start_with_env(env);
    fleet.wait_agents_connected(&["host-1".to_string()]);
    fleet
}

/// CPU time (user + system) a process has used, in milliseconds.
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command name (in parentheses): fields 14 and 15 are utime, stime.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| f.get(*i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    ticks * 10.0 // USER_HZ is 100 on Linux
}

fn mb_s(bytes: u64, ms: u64) -> f64 {
    bytes as f64 / 1e6 / (ms.max(1) as f64 / 1000.0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let size = bulwark_tests::example_arg("--mib", 512) * MIB;
    let rounds = bulwark_tests::example_arg("--rounds", 3);
    let rt = bulwark_tests::runtime();
    let collector = Collector::default();
    let endpoint = start_collector(&rt, collector.clone());
    let work = tempfile::Builder::new()
        .prefix("bulwark-otel-bench-")
        .tempdir_in("/var/tmp")
        .expect("work dir");
    let volume = work.path().join("volume.img");
    bulwark_tests::write_random_file(&volume, size);
    println!(
        "volume {} MiB of random data; OTLP collector at {endpoint}\n",
        size / MIB
    );
    println!(
        "{:<6} {:<7} {:>12} {:>16} {:>14}",
        "round", "export", "full MB/s", "incremental ms", "cpu ms (full)"
    );
    let on_env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_METRIC_EXPORT_INTERVAL", "1000"),
    ];
    let mut full = [Vec::new(), Vec::new()];
    let mut incr = [Vec::new(), Vec::new()];
    let mut cpu = [Vec::new(), Vec::new()];
    for round in 1..=rounds {
        // Alternate which goes first, so neither always follows the other.
        let mut order = [(0, "off", &[][..]), (1, "on", &on_env[..])];
        if round % 2 == 0 {
            order.reverse();
        }
        for (i, label, env) in order {
            let mut fleet = start(&volume, size, env);
            let pids: Vec<u32> = [
                fleet.node("node-1").pid(),
                fleet.agent("host-1").pid(),
                fleet.coordinator().pid(),
            ]
            .into_iter()
            .flatten()
            .collect();
            let before: f64 = pids.iter().map(|p| cpu_ms(*p)).sum();
            let r = fleet.sync("vol");
            let used = pids.iter().map(|p| cpu_ms(*p)).sum::<f64>() - before;
            let f = mb_s(json_u64(&r, "bytes_sent"), json_u64(&r, "duration_ms"));
            bulwark_tests::rewrite_random_blocks(&volume, (size / 65536 / 100) as usize);
            let r = fleet.sync("vol");
            let ms = json_u64(&r, "duration_ms");
            println!("{round:<6} {label:<7} {f:>12.1} {ms:>16} {used:>14.0}");
            full[i].push(f);
            incr[i].push(ms as f64);
            cpu[i].push(used);
            fleet.stop_all();
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    let (off, on) = (median(&mut full[0]), median(&mut full[1]));
    let (ioff, ion) = (median(&mut incr[0]), median(&mut incr[1]));
    println!(
        "\nmedian full sync: off {off:.1} MB/s, on {on:.1} MB/s ({:+.1}%)",
        (on - off) / off * 100.0
    );
    println!(
        "median incremental: off {ioff:.0} ms, on {ion:.0} ms ({:+.1}%)",
        (ion - ioff) / ioff * 100.0
    );
    let (coff, con) = (median(&mut cpu[0]), median(&mut cpu[1]));
    println!(
        "median CPU of coordinator + node + agent per full sync: off {coff:.0} ms, on {con:.0} ms ({:+.1}%)",
        (con - coff) / coff * 100.0
    );
    let spans = collector.0.lock().map(|r| r.spans.len()).unwrap_or(0);
    println!("spans received by the collector: {spans}");
}
