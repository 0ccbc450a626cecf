//! The crash campaign (issue 29): a real fleet (coordinator, two nodes, two agents:
//! a `fingerprint` volume with a log source, and an `nbd-filter` volume written
//! through its export with qemu-io) under a steady load of syncs, log ships, restores
//! and a move. Each iteration kill -9's one daemon, either at an armed failpoint (each
//! failpoint is chosen in turn until every one was hit) or at a random moment, restarts
//! it, and checks:
//!
//! - every point that was acknowledged is still listed and restores byte-identical;
//! - nothing unacknowledged is visible unless it is whole: a point the node committed
//!   though its acknowledgement was lost restores to exactly the data of its sync;
//! - the fleet converges: the next syncs of every source succeed.
//!
//! It prints iterations, failpoints hit, points checked, and lost or corrupt points
//! (which must be 0), with the seed it ran from, so that a failure replays:
//!
//! ```sh
//! cargo run -p bulwark-tests --example crash_campaign -- --iterations 200 --seed 7
//! ```
//!
//! Between syncs nothing writes, so every point of a "generation" (the data between
//! two mutations) must restore to the same bytes, whichever sync made it. Needs
//! qemu-io (qemu-utils) for the nbd-filter volume.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bulwark_tests::{BLOCK_SIZE, Fleet, MIB, example_arg, json_str, json_u64};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SIZE: u64 = 8 * MIB;
const FP: &str = "a-disk";
const LOGS: &str = "a-logs";
const NBD: &str = "b-disk";
const HOST_A: &str = "host-a";
const HOST_B: &str = "host-b";
const QCOW: &str = "c-vm";
const SOURCES: [&str; 4] = [FP, NBD, QCOW, LOGS];

/// Where the kill lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Victim {
    /// The node holding the source, at this failpoint, during an op that reaches it.
    NodeAt(&'static str),
    /// The coordinator during a move, once the target holds the whole copy.
    CoordinatorMoveCopied,
    /// The agent of the source, at this failpoint, during an op that reaches it.
    AgentAt(&'static str),
    /// The agent or the node of the source, at this failpoint of its certificate
    /// renewal (which runs at every start: the fleet's `renew_before` is longer than
    /// any certificate's life).
    RenewalAt(&'static str),
    /// A daemon at a random moment of a sync.
    Random,
}

/// Every failpoint the fleet's code has, with the op that reaches it.
const FAILPOINTS: &[Victim] = &[
    Victim::NodeAt("node-before-replica-write"),
    Victim::NodeAt("node-after-batch"),
    Victim::NodeAt("node-before-commit"),
    Victim::NodeAt("node-after-commit"),
    Victim::NodeAt("node-settle-group"),
    Victim::NodeAt("node-after-log-commit"),
    Victim::NodeAt("node-mid-restore"),
    Victim::NodeAt("node-mid-prune"),
    Victim::CoordinatorMoveCopied,
    Victim::AgentAt("agent-mid-sync"),
    Victim::AgentAt("agent-mid-ship"),
    Victim::AgentAt("agent-mid-restore"),
    Victim::AgentAt("agent-qcow2-frozen"),
    Victim::RenewalAt("renew-after-write"),
    Victim::RenewalAt("renew-between-renames"),
];

/// The agent protecting `source`.
fn agent_of(source: &str) -> &'static str {
    if source == NBD || source == QCOW {
        HOST_B
    } else {
        HOST_A
    }
}

/// The fingerprint volume keeps its newest points only: its syncs prune.
const KEEP: usize = 6;

#[derive(Default)]
struct Stats {
    iterations: u64,
    hit: BTreeSet<String>,
    missed: BTreeMap<String, u64>,
    kills: u64,
    points_checked: u64,
    lost: Vec<String>,
    corrupt: Vec<String>,
}

struct Campaign {
    fleet: Fleet,
    rng: StdRng,
    /// Per source: the BLAKE3 of what each point must restore to.
    expected: BTreeMap<String, BTreeMap<u64, [u8; 32]>>,
    /// Per source: the acknowledged points.
    acked: BTreeMap<String, BTreeSet<u64>>,
    /// Per source: the hash of its data now (the current generation).
    current: BTreeMap<String, [u8; 32]>,
    stats: Stats,
    moved: bool,
    log_dir: PathBuf,
    /// The qcow2-bitmap source's image, and a directory for it and its raw copies.
    qcow: PathBuf,
    images: PathBuf,
    nbd_socket: PathBuf,
}

fn main() {
    let iterations = example_arg("--iterations", 20);
    let seed = example_arg(
        "--seed",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs()),
    );
    println!("crash campaign: {iterations} iterations, seed {seed}");
    if !bulwark_tests::have_tool("qemu-io", "qemu-utils") {
        return;
    }
    let mut c = Campaign::start(seed);
    let started = Instant::now();
    for i in 0..iterations {
        c.iteration(i);
    }
    c.final_check();
    let s = &c.stats;
    let all: BTreeSet<String> = FAILPOINTS.iter().map(|v| name(*v)).collect();
    let not_hit: Vec<&String> = all.difference(&s.hit).collect();
    println!(
        "crash campaign done in {:.0} s: seed {seed}, {} iterations, {} kills, failpoints hit {}/{} {:?}, \
         points checked {}, lost {}, corrupt {}",
        started.elapsed().as_secs_f64(),
        s.iterations,
        s.kills,
        s.hit.len(),
        all.len(),
        s.hit,
        s.points_checked,
        s.lost.len(),
        s.corrupt.len()
    );
    if !s.missed.is_empty() {
        println!("armed but not reached (the op ended first): {:?}", s.missed);
    }
    let mut failed = false;
    if !s.lost.is_empty() || !s.corrupt.is_empty() {
        println!("LOST: {:?}\nCORRUPT: {:?}", s.lost, s.corrupt);
        failed = true;
    }
    if iterations >= FAILPOINTS.len() as u64 * 2 && !not_hit.is_empty() {
        println!("failpoints never hit: {not_hit:?}");
        failed = true;
    }
    if failed {
        c.fleet.dump_logs();
        println!("FAIL (replay with --seed {seed})");
        std::process::exit(1);
    }
    println!("PASS");
}

/// Polls `reached` for up to 60 s, and for 5 s more once `op` has ended (a settle
/// runs after the sync that made it was acknowledged).
fn wait_for(mut reached: impl FnMut() -> bool, op: &mut bulwark_tests::Background) -> bool {
    let mut deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if reached() {
            return true;
        }
        if !op.is_running() {
            deadline = deadline.min(Instant::now() + Duration::from_secs(5));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The node (`on_node`) or the agent called `name`.
fn daemon_of<'a>(fleet: &'a mut Fleet, on_node: bool, name: &str) -> &'a mut bulwark_tests::Daemon {
    if on_node {
        fleet.node(name)
    } else {
        fleet.agent(name)
    }
}

fn name(v: Victim) -> String {
    match v {
        Victim::NodeAt(f) | Victim::AgentAt(f) => f.to_string(),
        Victim::RenewalAt(f) => f.to_string(),
        Victim::CoordinatorMoveCopied => "coordinator-move-copied".into(),
        Victim::Random => "random".into(),
    }
}

/// BLAKE3 of a file, or of a directory's files (names and bytes, in name order).
fn hash_path(p: &Path) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    if p.is_dir() {
        let mut names: Vec<PathBuf> = std::fs::read_dir(p)
            .unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
            .map(|e| e.expect("dir entry").path())
            .collect();
        names.sort();
        for n in names {
            h.update(n.file_name().expect("file name").as_encoded_bytes());
            h.update(&[0]);
            h.update(&std::fs::read(&n).unwrap_or_else(|e| panic!("read {}: {e}", n.display())));
            h.update(&[0]);
        }
    } else {
        h.update(&std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display())));
    }
    *h.finalize().as_bytes()
}

impl Campaign {
    fn start(seed: u64) -> Campaign {
        let tmp = std::env::temp_dir().join(format!(
            "bulwark-campaign-logs-{seed}-{}",
            std::process::id()
        ));
        let images = tmp.with_extension("images");
        std::fs::create_dir_all(&images).expect("image dir");
        let qcow = bulwark_tests::qemu::random_qcow2(&images, SIZE);
        std::fs::create_dir_all(&tmp).expect("log dir");
        std::fs::write(tmp.join("app.log"), b"first line\n").expect("log file");
        let fleet = Fleet::builder()
            .renew_at_start()
            .node("node-1")
            .node("node-2")
            .agent(HOST_A, FP, SIZE)
            .agent_log(HOST_A, LOGS, &tmp, "glob = \"*.log\"")
            .agent_source(
                HOST_B,
                NBD,
                None,
                SIZE,
                &format!(
                    "tracker = \"nbd-filter\"\nnbd_socket = \"{{root}}/{HOST_B}/nbd/{NBD}.sock\""
                ),
            )
            .agent_source(
                HOST_B,
                QCOW,
                Some(&qcow),
                SIZE,
                "tracker = \"qcow2-bitmap\"",
            )
            .start();
        let nbd_socket = fleet
            .root()
            .join(HOST_B)
            .join("nbd")
            .join(format!("{NBD}.sock"));
        let mut c = Campaign {
            fleet,
            rng: StdRng::seed_from_u64(seed),
            expected: BTreeMap::new(),
            acked: BTreeMap::new(),
            current: BTreeMap::new(),
            stats: Stats::default(),
            moved: false,
            log_dir: tmp,
            qcow,
            images,
            nbd_socket,
        };
        for s in SOURCES {
            c.refresh(s);
        }
        c.fleet.cli(&["retention", FP, "--keep", &KEEP.to_string()]);
        // The only step that writes the replica directly is a source's first sync:
        // kill the node there once, at the start.
        c.kill_node_at("node-before-replica-write", FP);
        for s in SOURCES {
            c.converge(s);
        }
        c
    }

    fn data_path(&self, source: &str) -> PathBuf {
        if source == LOGS {
            self.log_dir.clone()
        } else {
            self.fleet.volume(source)
        }
    }

    /// Records the hash of `source`'s data now (a new generation).
    fn refresh(&mut self, source: &str) {
        let h = if source == QCOW {
            let raw = self.images.join("now.raw");
            bulwark_tests::qemu::qcow2_to_raw(&self.qcow, &raw);
            let h = hash_path(&raw);
            let _ = std::fs::remove_file(&raw);
            h
        } else {
            hash_path(&self.data_path(source))
        };
        self.current.insert(source.to_string(), h);
    }

    /// Changes `source`'s data: random blocks of the fingerprint volume, writes through
    /// the nbd-filter's export, an append to the log.
    fn mutate(&mut self, source: &str) {
        match source {
            FP => {
                let path = self.fleet.volume(FP);
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .expect("open volume");
                for _ in 0..self.rng.random_range(1..40u64) {
                    let b = self.rng.random_range(0..SIZE / BLOCK_SIZE);
                    let mut data = vec![0u8; BLOCK_SIZE as usize];
                    self.rng.fill(&mut data[..]);
                    std::os::unix::fs::FileExt::write_all_at(&f, &data, b * BLOCK_SIZE)
                        .expect("write");
                }
                f.sync_all().expect("fsync volume");
            }
            NBD | QCOW => {
                let url = format!("nbd+unix:///?socket={}", self.nbd_socket.display());
                let mut cmd = Command::new("qemu-io");
                if source == NBD {
                    cmd.args(["-f", "raw", &url]);
                } else {
                    cmd.args(["-f", "qcow2"]).arg(&self.qcow);
                }
                for _ in 0..self.rng.random_range(1..20u64) {
                    let off = self.rng.random_range(0..SIZE / 4096) * 4096;
                    let len = 4096 * self.rng.random_range(1..=32u64).min((SIZE - off) / 4096);
                    let pat = self.rng.random_range(1..=255u8);
                    cmd.args(["-c", &format!("write -P {pat} {off} {len}")]);
                }
                let out = cmd.output().expect("run qemu-io");
                assert!(
                    out.status.success(),
                    "qemu-io: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            _ => {
                let n = self.rng.random_range(1..5000usize);
                let line: Vec<u8> = (0..n).map(|i| b'a' + (i % 26) as u8).collect();
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(self.log_dir.join("app.log"))
                    .expect("open log");
                f.write_all(&line).expect("append");
                f.write_all(b"\n").expect("append");
                f.sync_all().expect("fsync log");
            }
        }
        self.refresh(source);
    }

    /// Syncs `source` until one succeeds (the fleet converges); every point that
    /// appears meanwhile belongs to the current generation.
    fn converge(&mut self, source: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match self
                .fleet
                .cli_json_try(&["sync", source, "--wait", "--json"])
            {
                Ok(r) => {
                    let p = json_u64(&r, "point");
                    if p > 0 {
                        self.acked.entry(source.to_string()).or_default().insert(p);
                    }
                    break;
                }
                Err(e) if Instant::now() < deadline => {
                    println!(
                        "  {source}: sync not yet converging: {}",
                        e.lines().next().unwrap_or("")
                    );
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => panic!("{source} did not converge within 120 s: {e}"),
            }
        }
        self.adopt_new_points(source);
    }

    /// Points listed that have no expectation yet were made from the current data.
    fn adopt_new_points(&mut self, source: &str) {
        let h = self.current[source];
        let exp = self.expected.entry(source.to_string()).or_default();
        for p in self.fleet.point_ids(source) {
            exp.entry(p).or_insert(h);
        }
    }

    fn restore_matches(&mut self, source: &str, point: u64) {
        let Some(want) = self
            .expected
            .get(source)
            .and_then(|e| e.get(&point))
            .copied()
        else {
            return;
        };
        let to = self.fleet.scratch(&format!(
            "check-{source}-{point}-{}",
            self.stats.points_checked
        ));
        self.stats.points_checked += 1;
        match self.fleet.cli_json_try(&[
            "restore",
            source,
            "--point",
            &point.to_string(),
            "--to",
            &to.to_string_lossy(),
            "--wait",
            "--json",
        ]) {
            Ok(_) if hash_path(&to) == want => {}
            Ok(_) => self.stats.corrupt.push(format!("{source} point {point}")),
            Err(e) => self
                .stats
                .corrupt
                .push(format!("{source} point {point}: restore failed: {e}")),
        }
        if to.is_dir() {
            let _ = std::fs::remove_dir_all(&to);
        } else {
            let _ = std::fs::remove_file(&to);
        }
    }

    /// Acknowledged points of `source` that are not `listed` and that no retention
    /// explains: the fingerprint volume keeps its KEEP newest, so an acknowledged
    /// point older than the oldest listed one was pruned; any other is lost.
    fn lost_points(&mut self, source: &str, listed: &BTreeSet<u64>) -> Vec<u64> {
        let oldest = listed.first().copied().unwrap_or(0);
        let acked = self.acked.entry(source.to_string()).or_default();
        let lost: Vec<u64> = acked
            .iter()
            .copied()
            .filter(|p| {
                let pruned = source == FP && *p < oldest && listed.len() >= KEEP;
                !listed.contains(p) && !pruned
            })
            .collect();
        // Pruned ones are no longer owed.
        acked.retain(|p| listed.contains(p) || lost.contains(p));
        lost
    }

    /// Every acknowledged point listed; the newest and a random older one restore.
    fn check(&mut self, source: &str) {
        let listed: BTreeSet<u64> = self.fleet.point_ids(source).into_iter().collect();
        for p in self.lost_points(source, &listed) {
            self.stats.lost.push(format!("{source} point {p}"));
        }
        let ids: Vec<u64> = listed.into_iter().collect();
        if let Some(&newest) = ids.last() {
            self.restore_matches(source, newest);
        }
        if !ids.is_empty() {
            let p = ids[self.rng.random_range(0..ids.len())];
            self.restore_matches(source, p);
        }
    }

    fn pick_victim(&mut self) -> Victim {
        let unhit: Vec<Victim> = FAILPOINTS
            .iter()
            .copied()
            .filter(|v| !self.stats.hit.contains(&name(*v)))
            .filter(|v| *v != Victim::CoordinatorMoveCopied || !self.moved)
            .filter(|v| *v != Victim::NodeAt("node-before-replica-write"))
            .collect();
        if let Some(v) = unhit.first().filter(|_| self.rng.random_bool(0.7)) {
            return *v;
        }
        let pool: Vec<Victim> = FAILPOINTS
            .iter()
            .copied()
            .filter(|v| {
                *v != Victim::CoordinatorMoveCopied
                    && *v != Victim::NodeAt("node-before-replica-write")
            })
            .chain([Victim::Random, Victim::Random])
            .collect();
        pool[self.rng.random_range(0..pool.len())]
    }

    fn iteration(&mut self, i: u64) {
        self.stats.iterations += 1;
        let victim = self.pick_victim();
        let source = match victim {
            Victim::NodeAt("node-after-log-commit") | Victim::AgentAt("agent-mid-ship") => LOGS,
            Victim::NodeAt("node-mid-prune") => FP,
            Victim::AgentAt("agent-qcow2-frozen") => QCOW,
            Victim::NodeAt(_)
            | Victim::AgentAt(_)
            | Victim::CoordinatorMoveCopied
            | Victim::RenewalAt(_)
            | Victim::Random => [FP, NBD, QCOW][self.rng.random_range(0..3)],
        };
        println!("iteration {i}: {} on {source}", name(victim));
        self.mutate(source);
        match victim {
            Victim::NodeAt(fp) => self.kill_node_at(fp, source),
            Victim::AgentAt(fp) => self.kill_agent_at(fp, source),
            Victim::CoordinatorMoveCopied => self.kill_coordinator_mid_move(),
            Victim::RenewalAt(fp) => self.kill_at_renewal(fp, source),
            Victim::Random => self.kill_at_random(source),
        }
        for s in SOURCES {
            self.converge(s);
            self.check(s);
        }
    }

    /// Restarts the node holding `source` with `fp` armed, runs the op that reaches
    /// it, kills the node there, restarts it clean.
    fn kill_node_at(&mut self, fp: &'static str, source: &str) {
        let node = self.fleet.source_node(source);
        let spec = format!("{fp}=pause");
        let status = self
            .fleet
            .node(&node)
            .restart_with_env(&[("BULWARK_FAILPOINTS", &spec)]);
        assert!(status.success(), "{node} did not stop cleanly: {status}");
        self.ready();
        let (mut op, target) = self.op_for(fp, source);
        let reached = format!("failpoint {fp} reached");
        let hit = wait_for(
            || self.fleet.node(&node).log_since_start().contains(&reached),
            &mut op,
        );
        self.count(fp, hit);
        self.fleet.node(&node).kill9();
        self.end_op(op, source, target);
        self.fleet.node(&node).start();
        self.ready();
    }

    /// Restarts the agent of `source` with `fp` armed, runs the op that reaches it,
    /// kills the agent there, restarts it clean.
    fn kill_agent_at(&mut self, fp: &'static str, source: &str) {
        let agent = agent_of(source);
        let spec = format!("{fp}=pause");
        let status = self
            .fleet
            .agent(agent)
            .restart_with_env(&[("BULWARK_FAILPOINTS", &spec)]);
        assert!(status.success(), "{agent} did not stop cleanly: {status}");
        self.ready();
        let (mut op, target) = self.op_for(fp, source);
        let reached = format!("failpoint {fp} reached");
        let hit = wait_for(
            || self.fleet.agent(agent).log_since_start().contains(&reached),
            &mut op,
        );
        self.count(fp, hit);
        self.fleet.agent(agent).kill9();
        self.end_op(op, source, target);
        self.fleet.agent(agent).start();
        self.ready();
    }

    /// Restarts the agent or the node of `source` with `fp` armed: its renewal
    /// at start reaches it; kills it there, restarts it clean. The restarted daemon
    /// must load a matching key and certificate (an interrupted renewal is finished
    /// at load) and renew again; the convergence that follows proves it serves.
    fn kill_at_renewal(&mut self, fp: &'static str, source: &str) {
        let spec = format!("{fp}=pause");
        let reached = format!("failpoint {fp} reached");
        let on_node = self.rng.random_bool(0.5);
        let daemon = if on_node {
            self.fleet.source_node(source)
        } else {
            agent_of(source).to_string()
        };
        let status = daemon_of(&mut self.fleet, on_node, &daemon)
            .restart_with_env(&[("BULWARK_FAILPOINTS", &spec)]);
        assert!(status.success(), "{daemon} did not stop cleanly: {status}");
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut hit = false;
        while Instant::now() < deadline && !hit {
            hit = daemon_of(&mut self.fleet, on_node, &daemon)
                .log_since_start()
                .contains(&reached);
            std::thread::sleep(Duration::from_millis(50));
        }
        self.count(fp, hit);
        daemon_of(&mut self.fleet, on_node, &daemon).kill9();
        daemon_of(&mut self.fleet, on_node, &daemon).start();
        let renewed = "certificate renewed";
        let deadline = Instant::now() + Duration::from_secs(60);
        while !daemon_of(&mut self.fleet, on_node, &daemon)
            .log_since_start()
            .contains(renewed)
        {
            if Instant::now() > deadline {
                self.stats
                    .corrupt
                    .push(format!("{daemon}: no renewal after a kill at {fp}"));
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.ready();
    }

    /// The op that reaches `fp`: a restore of the newest point (to a new path, which
    /// it returns), or a sync.
    fn op_for(&mut self, fp: &str, source: &str) -> (bulwark_tests::Background, Option<PathBuf>) {
        if !fp.ends_with("-restore") {
            return (
                self.fleet.cli_spawn(&["sync", source, "--wait", "--json"]),
                None,
            );
        }
        let newest = self.fleet.point_ids(source).last().copied().unwrap_or(1);
        let to = self
            .fleet
            .scratch(&format!("killed-restore-{}", self.stats.kills));
        let to_s = to.to_string_lossy().into_owned();
        let op = self.fleet.cli_spawn(&[
            "restore",
            source,
            "--point",
            &newest.to_string(),
            "--to",
            &to_s,
            "--wait",
            "--json",
        ]);
        (op, Some(to))
    }

    /// Waits for the op a kill interrupted: a sync that succeeded acknowledged a
    /// point; a restore that failed must leave nothing at its target path.
    fn end_op(&mut self, op: bulwark_tests::Background, source: &str, target: Option<PathBuf>) {
        let Some(to) = target else {
            self.ack_from(op, source);
            return;
        };
        let ok = op
            .wait(Duration::from_secs(120))
            .is_ok_and(|o| o.status.success());
        if !ok && to.exists() {
            self.stats.corrupt.push(format!(
                "{source}: a restore killed mid-way left {}",
                to.display()
            ));
        }
        if to.is_dir() {
            let _ = std::fs::remove_dir_all(&to);
        } else {
            let _ = std::fs::remove_file(&to);
        }
    }

    /// A move (a drain of the node holding the sources) with the coordinator paused
    /// once the target holds the whole copy, killed there, restarted.
    fn kill_coordinator_mid_move(&mut self) {
        self.moved = true;
        let from = self.fleet.source_node(FP);
        let status = self
            .fleet
            .coordinator()
            .restart_with_env(&[("BULWARK_FAILPOINTS", "coordinator-move-copied=pause")]);
        assert!(
            status.success(),
            "the coordinator did not stop cleanly: {status}"
        );
        self.ready();
        let mut op = self.fleet.cli_spawn(&["drain", &from, "--json"]);
        let hit = wait_for(
            || {
                self.fleet
                    .coordinator()
                    .log_since_start()
                    .contains("failpoint coordinator-move-copied reached")
            },
            &mut op,
        );
        self.count("coordinator-move-copied", hit);
        self.fleet.coordinator().kill9();
        let _ = op.wait(Duration::from_secs(60));
        self.fleet.coordinator().start();
        self.ready();
    }

    /// The coordinator answers, every node accepts connections (a drained node shows
    /// `draining`, not `up`, so the harness's wait_ready does not apply), every agent
    /// is connected with its sources placed.
    fn ready(&mut self) {
        self.fleet.wait_coordinator();
        for n in self.fleet.node_names() {
            let port = self.fleet.node(&n).port().expect("nodes listen");
            let fleet = &self.fleet;
            bulwark_tests::poll(
                &format!("{n} to accept connections"),
                Duration::from_secs(60),
                || fleet.node_tls_ready(port),
            );
        }
        let names = self.fleet.agent_names();
        self.fleet.wait_agents_connected(&names);
    }

    /// A sync of `source`, and kill -9 of a random daemon a random moment later.
    fn kill_at_random(&mut self, source: &str) {
        let op = self.fleet.cli_spawn(&["sync", source, "--wait", "--json"]);
        std::thread::sleep(Duration::from_millis(self.rng.random_range(0..400)));
        let node = self.fleet.source_node(source);
        let agent = agent_of(source);
        let which = self.rng.random_range(0..3);
        self.stats.kills += 1;
        match which {
            0 => self.fleet.coordinator().kill9(),
            1 => self.fleet.node(&node).kill9(),
            _ => self.fleet.agent(agent).kill9(),
        }
        self.ack_from(op, source);
        match which {
            0 => self.fleet.coordinator().start(),
            1 => self.fleet.node(&node).start(),
            _ => self.fleet.agent(agent).start(),
        }
        self.ready();
    }

    /// Counts a kill, at failpoint `fp` if it was reached.
    fn count(&mut self, fp: &str, hit: bool) {
        self.stats.kills += 1;
        if hit {
            self.stats.hit.insert(fp.to_string());
        } else {
            *self.stats.missed.entry(fp.to_string()).or_default() += 1;
        }
    }

    /// Waits for a sync started before a kill: a success acknowledged a point.
    fn ack_from(&mut self, op: bulwark_tests::Background, source: &str) {
        if let Ok(out) = op.wait(Duration::from_secs(120))
            && out.status.success()
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
        {
            let p = json_u64(&v, "point");
            if p > 0 && json_str(&v, "source") == source {
                self.acked.entry(source.to_string()).or_default().insert(p);
                self.expected
                    .entry(source.to_string())
                    .or_default()
                    .entry(p)
                    .or_insert(self.current[source]);
            }
        }
    }

    /// Every point of every source restores to what its generation held.
    fn final_check(&mut self) {
        for s in SOURCES {
            let ids = self.fleet.point_ids(s);
            let listed: BTreeSet<u64> = ids.iter().copied().collect();
            for p in self.lost_points(s, &listed) {
                self.stats.lost.push(format!("{s} point {p} (final)"));
            }
            for p in ids {
                self.restore_matches(s, p);
            }
        }
        let _ = std::fs::remove_dir_all(&self.log_dir);
        let _ = std::fs::remove_dir_all(&self.images);
    }
}
