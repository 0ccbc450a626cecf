//! Benchmark: how long the coordinators' control plane is without a leader after the
//! leader dies, and, beside it, how long one sled coordinator is gone after it dies.
//!
//! etcd: a 3-member etcd on 127.0.0.1 and three real `bulwark-coordinator` processes
//! on it (`[state] backend = "etcd"`, `leader_lease` from `--lease S`, 2 s by
//! default). `--kills N` times (10): the leader is read from its key in etcd
//! (`/bulwark/leader`), killed with SIGKILL, and the leadership key polled every 20 ms
//! until another coordinator holds it; that time is the failover time. The killed
//! one is started again and answers health checks before the next kill.
//!
//! sled: one coordinator on sled has no failover; the comparison is its restart: kill
//! -9, start again, until its port answers a gRPC health check (polled every 20 ms).
//!
//! Prints figures only (median and max against 2x the lease, no pass/fail);
//! `bash bench/coordinators.sh` runs it. Options: `--lease S` (2), `--kills N` (10),
//! `--sled 0|1` (1).

use std::path::Path;
use std::time::{Duration, Instant};

use bulwark_common::tls::Role;
use bulwark_coordinator::state::{EtcdState, etcd};
use bulwark_tests::etcd::EtcdCluster;
use bulwark_tests::fleet::{Pki, coordinator_toml};
use bulwark_tests::{Daemon, TlsFiles, bins, example_arg, free_port, grpc};

const POLL: Duration = Duration::from_millis(20);
const READY: Duration = Duration::from_secs(60);

/// Whether the coordinator at `url` answers a gRPC health check (as `admin`).
fn healthy(rt: &tokio::runtime::Runtime, url: &str, admin: &TlsFiles) -> bool {
    rt.block_on(async {
        let Ok(ch) = grpc::channel(url, admin, Role::Coordinator).await else {
            return false;
        };
        let mut c = tonic_health::pb::health_client::HealthClient::new(ch);
        let req = tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(2), c.check(req)).await,
            Ok(Ok(r)) if r.get_ref().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        )
    })
}

/// Polls `f` every 20 ms until it is true; the time it took from `since`.
fn until(what: &str, since: Instant, mut f: impl FnMut() -> bool) -> Duration {
    loop {
        if f() {
            return since.elapsed();
        }
        assert!(since.elapsed() < READY, "timed out waiting for {what}");
        std::thread::sleep(POLL);
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `times` (ms) as one line: each, median, max, and the bound they are held to.
fn summary(what: &str, times: &[f64], bound: Option<f64>) {
    let mut s = times.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let median = if s.is_empty() {
        0.0
    } else if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    let each: Vec<String> = times.iter().map(|t| format!("{t:.0}")).collect();
    println!("  {what} (ms): {}", each.join(" "));
    let max = s.last().copied().unwrap_or(0.0);
    match bound {
        Some(b) => println!(
            "  median {median:.0} ms, max {max:.0} ms; 2x lease = {b:.0} ms (median {:.2}x the lease)",
            median / (b / 2.0)
        ),
        None => println!("  median {median:.0} ms, max {max:.0} ms"),
    }
}

/// A coordinator daemon on `port` with `extra` appended to its config.
fn coordinator(root: &Path, name: &str, port: u16, tls: &TlsFiles, extra: &str) -> Daemon {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).expect("coordinator dir");
    let config = dir.join("coordinator.toml");
    let toml = coordinator_toml(port, &dir.join("data"), tls) + extra;
    std::fs::write(&config, toml).expect("write coordinator.toml");
    Daemon::new(
        name,
        bins::bin(bins::COORDINATOR),
        config,
        dir.join("coordinator.log"),
        Some(port),
    )
}

fn etcd_failover(root: &Path, pki: &Pki, admin: &TlsFiles, lease: u64, kills: usize) {
    let Some(cluster) = EtcdCluster::start(3) else {
        println!("etcd: skipped, no etcd binary (Debian package etcd-server)");
        return;
    };
    println!(
        "etcd: 3 members, 3 coordinators, leader_lease = {lease}s, {kills} kills of the leader"
    );
    let ctls = pki.issue("coordinator", "coordinator");
    let endpoints: Vec<String> = cluster
        .endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect();
    let mut coords: Vec<(String, Daemon)> = (1..=3)
        .map(|i| {
            let port = free_port();
            let url = format!("https://127.0.0.1:{port}");
            let extra = format!(
                "\n[state]\nbackend = \"etcd\"\nendpoints = [{}]\nprefix = \"/bulwark\"\nleader_lease = \"{lease}s\"\nadvertise = \"{url}\"\n",
                endpoints.join(", ")
            );
            (url, coordinator(root, &format!("coordinator-{i}"), port, &ctls, &extra))
        })
        .collect();
    let rt = bulwark_tests::runtime();
    for (url, d) in coords.iter_mut() {
        d.start();
        until("a coordinator to answer", Instant::now(), || {
            healthy(&rt, url, admin)
        });
    }
    let view = EtcdState::connect(&etcd::EtcdOptions {
        endpoints: cluster.endpoints(),
        prefix: "/bulwark".into(),
        tls: None,
        timeout: etcd::DEFAULT_TIMEOUT,
    })
    .expect("connect to etcd");
    let leader = |v: &EtcdState| v.leader().ok().flatten().map(|l| l.url);
    let mut times = Vec::new();
    for k in 0..kills {
        let mut current = None;
        until("a leader", Instant::now(), || {
            current = leader(&view);
            current.is_some()
        });
        let url = current.unwrap_or_default();
        let Some(i) = coords.iter().position(|(u, _)| *u == url) else {
            panic!("the leadership key names {url}, none of the coordinators");
        };
        coords[i].1.kill9();
        let t = Instant::now();
        let took = until("another leader", t, || {
            leader(&view).is_some_and(|l| l != url)
        });
        let next = leader(&view).unwrap_or_default();
        println!(
            "  kill {:>2}: {} killed, {} leads after {:.0} ms",
            k + 1,
            coords[i].1.name(),
            next,
            ms(took)
        );
        times.push(ms(took));
        let (u, d) = &mut coords[i];
        d.start();
        until(
            "the killed coordinator to answer again",
            Instant::now(),
            || healthy(&rt, u, admin),
        );
    }
    summary("failover times", &times, Some(2.0 * lease as f64 * 1000.0));
    for (_, d) in coords.iter_mut() {
        d.kill_quietly();
    }
}

fn sled_restart(root: &Path, pki: &Pki, admin: &TlsFiles, kills: usize) {
    println!(
        "sled: one coordinator, {kills} times kill -9 and start, until it answers a health check"
    );
    let ctls = pki.issue("coordinator", "coordinator-sled");
    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    let mut d = coordinator(root, "coordinator-sled", port, &ctls, "");
    let rt = bulwark_tests::runtime();
    d.start();
    until("the sled coordinator to answer", Instant::now(), || {
        healthy(&rt, &url, admin)
    });
    let mut times = Vec::new();
    for _ in 0..kills {
        d.kill9();
        let t = Instant::now();
        d.start();
        times.push(ms(until("the sled coordinator to answer", t, || {
            healthy(&rt, &url, admin)
        })));
    }
    summary("kill -9 to serving again", &times, None);
    d.kill_quietly();
}

fn main() {
    let lease = example_arg("--lease", 2);
    let kills = example_arg("--kills", 10) as usize;
    let sled = example_arg("--sled", 1) == 1;
    let root = tempfile::tempdir().expect("tempdir");
    let pki = Pki::init(&root.path().join("pki"));
    let admin = pki.issue("admin", "admin");
    etcd_failover(root.path(), &pki, &admin, lease, kills);
    if sled {
        sled_restart(root.path(), &pki, &admin, kills);
    }
}
