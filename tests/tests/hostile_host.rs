//! Issue 23: a host taken over cannot destroy or poison any recovery point, nor
//! starve other hosts.
//!
//! The attacker holds agent a1's key and config. It edits the config and restarts
//! the agent, or bypasses the agent (which refuses bad names and sizes when it
//! loads its config) and speaks gRPC to the coordinator and the node with a1's
//! certificate (`bulwark_tests::hostile`). Each attack is refused with an error
//! that says what was wrong (and an alert where an operator should know), no
//! daemon dies, nothing appears outside the pool's source folders, and at the end
//! every point of a1's and a2's sources restores byte for byte.
//!
//! Not here: who may open an nbd-filter export (`nbd_exports.rs`: another user
//! gets permission denied on the socket; over TLS only the configured role).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bulwark_proto as pb;
use bulwark_tests::hostile::{
    HeldSync, History, RawControl, StreamState, TITLE_ESCAPE, assert_only_source_folders,
    raw_restore, sync_begin, sync_msg, tree, volume_spec,
};
use bulwark_tests::{
    BLOCK_SIZE, Fleet, FleetBuilder, MIB, Value, assert_same_file, json_str, json_u64, poll,
    rewrite_random_blocks, runtime,
};
use tokio::runtime::Runtime;
use tonic::Code;

const A1: &str = "a1";
const A2: &str = "a2";
const S1: &str = "a1-data";
const S2: &str = "a2-data";
const SIZE: u64 = 2 * MIB;
const GIB: u64 = 1 << 30;

/// One node n1, agents a1 and a2 with one volume each, and what `extra` adds.
fn two_hosts(extra: impl FnOnce(FleetBuilder) -> FleetBuilder) -> Fleet {
    extra(
        Fleet::builder()
            .node("n1")
            .agent(A1, S1, SIZE)
            .agent(A2, S2, SIZE),
    )
    .start()
}

/// Waits for the open alert `key`.
fn wait_alert(fleet: &Fleet, key: &str) -> Value {
    poll(&format!("alert {key}"), Duration::from_secs(15), || {
        fleet
            .open_alert(key)
            .ok_or_else(|| format!("no open alert {key}"))
    })
}

/// What the attacker does to an agent's config file: inserts `lines` at the end
/// of its last `[[sources]]` table (before `[tls]`).
fn edit_agent_config(fleet: &mut Fleet, agent: &str, lines: &str) {
    let path = fleet.agent(agent).config_path().to_path_buf();
    let text = std::fs::read_to_string(&path).expect("read the agent's config");
    let at = text.find("[tls]").expect("the harness writes [tls] last");
    let edited = format!("{}{lines}\n\n{}", &text[..at], &text[at..]);
    std::fs::write(&path, edited).expect("write the agent's config");
}

/// Restarts an agent and waits until it is connected again with its sources (the
/// way back after a raw control stream took its place).
fn restart_agent(fleet: &mut Fleet, agent: &str) {
    fleet.agent(agent).restart();
    fleet.wait_agents_connected(&[agent.to_string()]);
}

/// A raw `SyncBegin` as a1 for `source` on the node at `address`; returns the
/// status the node refused it with.
fn refused_begin(
    rt: &Runtime,
    address: &str,
    fleet: &Fleet,
    begin: pb::SyncBegin,
) -> tonic::Status {
    let what = format!("a raw sync of {:?}", begin.source);
    let first = sync_msg(pb::sync_message::Msg::Begin(begin));
    let mut s = HeldSync::open(rt, address, &fleet.identity(A1), Some(first));
    s.wait_error(rt, &what, Duration::from_secs(30)).0
}

/// `(code, message)` must match: the code and every one of `words`.
fn assert_refused(status: &tonic::Status, code: Code, words: &[&str], what: &str) {
    assert!(
        status.code() == code && words.iter().all(|w| status.message().contains(w)),
        "{what} should be refused ({code:?}) saying {words:?}: {status:?}"
    );
}

/// The `sources --json` entry of `source` says what it should, within 15 s.
fn wait_source(fleet: &Fleet, source: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    poll(what, Duration::from_secs(15), || {
        let s = fleet.source_info(source);
        if ok(&s) { Ok(s) } else { Err(s.to_string()) }
    })
}

#[test]
fn keep_one_in_the_hosts_config_and_a_zeroed_sync_drop_no_point() {
    let mut fleet = two_hosts(|b| b);
    let mut h = History::new();
    for _ in 0..3 {
        h.sync(&fleet, S1);
        rewrite_random_blocks(&fleet.volume(S1), 4);
    }
    h.sync(&fleet, S2);

    // Keep one point, then wipe the volume and sync it.
    edit_agent_config(&mut fleet, A1, "[sources.retention]\nkeep = 1");
    restart_agent(&mut fleet, A1);
    let alert = wait_alert(&fleet, &format!("policy-refused/{S1}/retention.keep"));
    let msg = json_str(&alert, "message");
    assert!(
        msg.contains("agent a1") && msg.contains("keep") && msg.contains("no point is lost"),
        "the alert should name the agent and the refused key: {alert}"
    );
    let info = fleet.source_info(S1);
    assert!(
        json_str(&info, "policy_refused").contains("retention.keep")
            && info["retention"]["describe"] == "keep all",
        "the admin's retention (keep every point) should apply: {info}"
    );
    let volume = fleet.volume(S1);
    std::fs::write(&volume, vec![0u8; SIZE as usize]).expect("zero the volume");
    h.sync(&fleet, S1);
    // Retention runs right after each commit; a restore waits for it, so the
    // check below sees what it left.
    rewrite_random_blocks(&volume, 2);
    h.sync(&fleet, S1);
    h.assert_all_restore(&fleet, &[S1, S2], "keep = 1 and a zeroed sync");
    fleet.assert_all_alive();
}

#[test]
fn a_small_points_space_in_the_hosts_config_cannot_make_the_pool_prune() {
    // The admin lets full pools prune the oldest points. The host asks for
    // recovery-point space that holds its next sync's before-images but not the
    // older points': the pool must not drop them to make room.
    let mut fleet = two_hosts(|b| b.node_extra("[pool]\non_full = \"prune-oldest\""));
    let mut h = History::new();
    let volume = fleet.volume(S1);
    h.sync(&fleet, S1);
    for _ in 0..2 {
        rewrite_random_blocks(&volume, 4);
        h.sync(&fleet, S1);
    }
    h.sync(&fleet, S2);
    edit_agent_config(&mut fleet, A1, "points_space = \"256KiB\"");
    restart_agent(&mut fleet, A1);
    rewrite_random_blocks(&volume, 2);
    let before = fleet.save_volume(S1, "a1-before-small-space");
    let out = fleet.cli_as(fleet.admin(), &["sync", S1, "--wait", "--json"]);
    if out.status.success() {
        let r: Value = serde_json::from_slice(&out.stdout).expect("sync --json");
        h.record_volume(S1, json_u64(&r, "point"), &before);
    }
    fleet.assert_all_alive();
    h.assert_all_restore(
        &fleet,
        &[S1, S2],
        "a small points_space in a prune-oldest pool",
    );
}

#[test]
fn hostile_names_and_sizes_are_refused_and_create_nothing() {
    let mut fleet = two_hosts(|b| b);
    let mut h = History::new();
    h.sync(&fleet, S1);
    h.sync(&fleet, S2);
    let node_dir = fleet.node_dir("n1");
    let top = |dir: &Path| -> BTreeSet<PathBuf> {
        tree(dir)
            .into_iter()
            .filter(|p| p.components().count() == 1)
            .collect()
    };
    let node_top = top(&node_dir);
    let allocated = json_u64(&fleet.node_info("n1"), "allocated_bytes");
    let address = fleet.node_address("n1");
    let url = fleet.coordinator_url().to_string();
    let a1 = fleet.identity(A1);
    let rt = runtime();

    // Names a real agent refuses at load, straight to the coordinator and node.
    const START: &str = "must start with a letter or a digit";
    let names = [
        (".", START),
        ("..", START),
        (".x", START),
        ("deltas", "reserved for the node's and agent's own folders"),
        ("a.import", "reserved for temporary files"),
        ("a/b", "'/' is not allowed"),
        (S2, "belongs to agent a2"),
    ];
    let specs = names.iter().map(|(n, ..)| volume_spec(n, SIZE)).collect();
    let control = rt
        .block_on(RawControl::hello(&url, &a1, specs))
        .expect("a Hello with bad names is answered source by source");
    for (name, why) in names {
        let reg = control.registration(name);
        assert!(
            reg.assignment.is_none() && reg.error.contains(why),
            "registering {name:?} should be refused saying {why:?}: {reg:?}"
        );
        let key = format!(
            "source-refused/a1/{}",
            &blake3::hash(name.as_bytes()).to_hex()[..12]
        );
        let alert = fleet
            .open_alert(&key)
            .unwrap_or_else(|| panic!("no alert {key} for {name:?}"));
        assert!(json_str(&alert, "message").contains(why), "{alert}");
        let status = refused_begin(&rt, &address, &fleet, sync_begin(name, 1, SIZE, 0));
        let code = match name {
            S2 => Code::PermissionDenied,
            _ => Code::InvalidArgument,
        };
        assert_refused(&status, code, &[why], &format!("a sync of {name:?}"));
    }
    drop(control);

    // More sources than one agent may have: the whole Hello is refused.
    let many = (0..1025)
        .map(|i| volume_spec(&format!("a1-many-{i}"), SIZE))
        .collect();
    let err = rt
        .block_on(RawControl::hello(&url, &a1, many))
        .err()
        .expect("a Hello listing 1025 sources should be refused");
    assert!(
        err.code() == Code::InvalidArgument && err.message().contains("at most 1024"),
        "the refusal should name the limit: {err:?}"
    );

    // Sizes: registration refused, nothing allocated or created.
    let with_policy = |name: &str, size: u64, replica: u64, points: u64| {
        let mut s = volume_spec(name, size);
        s.policy = Some(pb::Policy {
            replica_alloc_bytes: replica,
            points_alloc_bytes: points,
            ..Default::default()
        });
        s
    };
    // The admin's quota, checked before anything is placed, on the space the node
    // will really take: less replica space than the volume holds saves nothing.
    fleet.cli(&["quota", A1, "--max-total", "20GiB"]);
    let thin = vec![with_policy("a1-thin", 60 * GIB, 4096, 0)];
    let control = rt
        .block_on(RawControl::hello(&url, &a1, thin))
        .expect("Hello answered");
    let reg = control.registration("a1-thin");
    let why = "over its quota of 20 GiB in all";
    assert!(
        reg.assignment.is_none() && reg.error.contains(why),
        "a 60 GiB volume asking for 4 KiB of replica space should be refused saying {why:?}: {reg:?}"
    );
    drop(control);
    fleet.cli(&["quota", A1, "--clear"]);

    let sizes = vec![
        volume_spec("a1-2e62", 1 << 62),
        volume_spec("a1-eib", 1 << 60),
        volume_spec("a1-max", u64::MAX),
        volume_spec("a1-over-capacity", 200 * GIB),
        // Replica and points space that would wrap their sum.
        with_policy("a1-wrap", 1 << 63, u64::MAX - 10, u64::MAX - 10),
        // Less replica space than the volume holds saves nothing: the node needs
        // the whole volume, and 90 GiB plus its points space does not fit.
        with_policy("a1-tiny-replica", 90 * GIB, 4096, 0),
        // More space than the fleet default is the admin's to give.
        with_policy("a1-points-max", SIZE, u64::MAX, u64::MAX),
    ];
    let control = rt
        .block_on(RawControl::hello(&url, &a1, sizes))
        .expect("Hello answered");
    for (name, size) in [
        ("a1-2e62", 1 << 62),
        ("a1-eib", 1 << 60),
        ("a1-max", u64::MAX),
        ("a1-over-capacity", 200 * GIB),
        ("a1-wrap", 1 << 63),
        ("a1-tiny-replica", 90 * GIB),
    ] {
        // Refused outright (no record is kept): no node could ever hold it.
        let reg = control.registration(name);
        assert!(
            reg.assignment.is_none()
                && reg
                    .error
                    .contains("more than the largest storage node holds"),
            "registering {name} should be refused for want of room: {reg:?}"
        );
        let status = refused_begin(&rt, &address, &fleet, sync_begin(name, 1, size, 0));
        assert_refused(
            &status,
            Code::PermissionDenied,
            &[name, "not known to the coordinator"],
            "a sync of a refused source",
        );
    }
    assert!(control.registration("a1-points-max").assignment.is_some());
    for key in ["points_space", "replica_space"] {
        let alert = wait_alert(&fleet, &format!("policy-refused/a1-points-max/{key}"));
        assert!(
            json_str(&alert, "message").contains("more than the fleet default"),
            "{alert}"
        );
    }
    let placed = json_u64(&fleet.source_info("a1-points-max"), "allocated_bytes");
    assert!(placed < 2 * GIB, "a1-points-max got {placed} bytes");
    drop(control);

    // The quota on the largest source.
    fleet.cli(&["quota", A1, "--max-source-size", "1TiB"]);
    let over = vec![volume_spec("a1-over-quota", 2 << 40)];
    let control = rt
        .block_on(RawControl::hello(&url, &a1, over))
        .expect("Hello answered");
    let reg = control.registration("a1-over-quota");
    let why = "over agent a1's quota of 1 TiB per source";
    assert!(
        reg.assignment.is_none() && reg.error.contains(why),
        "a 2 TiB source should be refused saying {why:?}: {reg:?}"
    );
    drop(control);

    fleet.assert_all_alive();
    assert_only_source_folders(
        &node_dir.join("disk1"),
        &[S1, S2],
        "hostile names and sizes",
    );
    assert_eq!(
        top(&node_dir),
        node_top,
        "the node's directory gained entries"
    );
    let now = json_u64(&fleet.node_info("n1"), "allocated_bytes");
    assert!(
        now <= allocated + placed,
        "n1 has {now} bytes allocated: {allocated} before, {placed} planned for a1-points-max"
    );
    restart_agent(&mut fleet, A1);
    rewrite_random_blocks(&fleet.volume(S1), 2);
    h.sync(&fleet, S1);
    h.assert_all_restore(&fleet, &[S1, S2], "hostile names and sizes");
}

/// Appends `data` to `path` (a log file).
fn append(path: &Path, data: &[u8]) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .expect("open the log file");
    f.write_all(data).expect("append to the log file");
}

#[test]
fn a_group_claim_joins_nothing_pairs_with_no_other_host_and_pins_no_log() {
    let logs1 = tempfile::tempdir().expect("tmp");
    let logs2 = tempfile::tempdir().expect("tmp");
    let (wal1, wal2) = (logs1.path().join("000001"), logs2.path().join("000001"));
    append(&wal1, b"a1 log one\n");
    append(&wal2, b"a2 log one\n");
    // a1's config names a2's protection group for both its sources; a2's sources
    // are put there by the admin.
    let claim = "group = \"g2\"";
    let mut fleet = Fleet::builder()
        .node("n1")
        .agent_source(A1, S1, None, SIZE, claim)
        .agent_log(A1, "a1-wal", logs1.path(), claim)
        .agent(A2, "a2-db", SIZE)
        .agent_log(A2, "a2-wal", logs2.path(), "")
        .start();
    // A long interval: the group's schedule starts no sync during the test.
    fleet.cli(&["group", "create", "g2", "--interval", "24h"]);
    fleet.cli(&["group", "add", "g2", "a2-db", "a2-wal"]);
    let members = |fleet: &Fleet| -> BTreeSet<String> {
        let groups = fleet.cli_json(&["group", "list", "--json"]);
        let g2 = groups
            .as_array()
            .and_then(|a| a.iter().find(|g| g["name"] == "g2"))
            .cloned()
            .unwrap_or_else(|| panic!("no group g2 in {groups}"));
        let list = g2["sources"].as_array().cloned().unwrap_or_default();
        list.iter()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect()
    };
    let a2_only: BTreeSet<String> = ["a2-db", "a2-wal"].map(String::from).into();
    assert_eq!(members(&fleet), a2_only, "a1's claim made it a member");
    for source in [S1, "a1-wal"] {
        let alert = wait_alert(&fleet, &format!("group-refused/{source}"));
        let msg = json_str(&alert, "message");
        assert!(msg.contains("agent a1") && msg.contains("g2"), "{alert}");
        assert_eq!(json_str(&fleet.source_info(source), "group"), "");
    }

    // The admin lets every agent join g2 from its config: a1's sources join, and
    // still go with nothing of a2's.
    fleet.cli(&["group", "allow", "g2", "*"]);
    let all: BTreeSet<String> = [S1, "a1-wal", "a2-db", "a2-wal"].map(String::from).into();
    assert_eq!(
        members(&fleet),
        all,
        "the admin allowed every agent into g2"
    );
    assert!(fleet.open_alert("group-refused/a1-wal").is_none());

    // a1's volume holds the group's oldest point. a2's log must keep what a2's
    // volume needs (from its oldest point on, and the ship before), not what a1's
    // older point would: a host must not make another's logs pile up.
    let mut h = History::new();
    h.sync(&fleet, S1);
    let t1 = h.ship(&fleet, "a1-wal", logs1.path());
    let mut ships = Vec::new();
    for i in 0..2 {
        append(&wal2, format!("a2 log {i}\n").as_bytes());
        ships.push(h.ship(&fleet, "a2-wal", logs2.path()));
    }
    h.sync(&fleet, "a2-db");
    // The coordinator learns each volume's oldest point from heartbeats; the log
    // floors follow.
    for source in [S1, "a2-db"] {
        wait_source(
            &fleet,
            source,
            &format!("{source}'s point in a heartbeat"),
            |s| json_u64(s, "points") >= 1,
        );
    }
    fleet.cli(&["retention", "a2-wal", "--keep", "1"]);
    append(&wal2, b"a2 log after\n");
    let last = h.ship(&fleet, "a2-wal", logs2.path());
    append(&wal1, b"a1 log after\n");
    let t2 = h.ship(&fleet, "a1-wal", logs1.path());
    h.dropped_by_admin("a2-wal", ships[0]);
    h.assert_all_restore(&fleet, &[S1, "a1-wal", "a2-db", "a2-wal"], "a group claim");
    assert_eq!(fleet.point_ids("a2-wal"), vec![ships[1], last]);
    assert_eq!(fleet.point_ids("a1-wal"), vec![t1, t2]);

    // a2's restore to a moment takes a2's log, not a1's (two logs would be refused).
    let to = fleet.scratch("a2-at");
    let at = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("format the time");
    let r = fleet.cli_json(&[
        "restore",
        "a2-db",
        "--at",
        &at,
        "--to",
        &to.to_string_lossy(),
        "--wait",
        "--json",
    ]);
    assert_eq!(json_str(&r, "log_source"), "a2-wal", "{r}");
    assert_eq!(json_u64(&r, "log_point"), last, "{r}");
    assert_same_file(
        &to.join("volume"),
        &fleet.volume("a2-db"),
        "a2-db at the moment",
    );
    fleet.assert_all_alive();
}

#[test]
fn idle_streams_of_one_host_do_not_starve_another() {
    let mut fleet = Fleet::builder()
        .node("n1")
        .agent(A1, S1, MIB)
        .agent(A1, "a1-b", MIB)
        .agent(A1, "a1-c", MIB)
        .agent(A2, S2, SIZE)
        .start();
    let mut h = History::new();
    for s in [S1, "a1-b", "a1-c", S2] {
        h.sync(&fleet, s);
    }
    let rt = runtime();
    let address = fleet.node_address("n1");
    let a1 = fleet.identity(A1);
    let begin = |fleet: &Fleet, source: &str| {
        let base = *fleet.point_ids(source).last().expect("a point");
        let b = sync_begin(source, 1, fleet.volume_size(source), base);
        Some(sync_msg(pb::sync_message::Msg::Begin(b)))
    };

    // a1 takes its two turns and holds them idle; the ones past them are refused
    // at once, saying why.
    let mut held = Vec::new();
    let mut first = HeldSync::open(&rt, &address, &a1, begin(&fleet, S1));
    first.wait_ready(&rt, "a1's first sync");
    held.push(first);
    let mut dup = HeldSync::open(&rt, &address, &a1, begin(&fleet, S1));
    let (status, _) = dup.wait_error(&rt, "a second sync of a1-data", Duration::from_secs(30));
    assert_refused(
        &status,
        Code::FailedPrecondition,
        &[S1, "one at a time"],
        "a second sync",
    );
    let mut second = HeldSync::open(&rt, &address, &a1, begin(&fleet, "a1-b"));
    second.wait_ready(&rt, "a1's second sync");
    held.push(second);
    let mut third = HeldSync::open(&rt, &address, &a1, begin(&fleet, "a1-c"));
    let (status, _) = third.wait_error(&rt, "a third sync of a1", Duration::from_secs(30));
    assert_refused(
        &status,
        Code::ResourceExhausted,
        &["max_syncs_per_agent = 2"],
        "a third sync",
    );
    // And streams that say nothing at all, each on its own connection.
    for _ in 0..62 {
        held.push(HeldSync::open(&rt, &address, &a1, None));
    }
    // The node reports a1's two syncs as live streams.
    poll(
        "n1 to report a1's two syncs",
        Duration::from_secs(15),
        || match json_u64(&fleet.node_info("n1"), "live_streams") {
            2 => Ok(()),
            n => Err(format!("live_streams = {n}")),
        },
    );
    let open = |held: &[HeldSync]| held.iter().filter(|s| !s.ended()).count();
    assert_eq!(open(&held), 64, "a1's 64 streams are open before a2 syncs");

    rewrite_random_blocks(&fleet.volume(S2), 8);
    let started = Instant::now();
    h.sync(&fleet, S2);
    let took = started.elapsed();
    eprintln!("a2's sync on n1 took {took:?} beside a1's 64 idle streams");
    assert_eq!(
        open(&held),
        64,
        "a1's streams were still open when a2's sync ended"
    );
    assert!(took < Duration::from_secs(10), "a2's sync took {took:?}");
    assert!(
        matches!(held[0].state(), StreamState::Ready),
        "{:?}",
        held[0].state()
    );
    drop(held);

    // A stream that sends nothing is cut after stream_idle_timeout, and so is a
    // sync that goes quiet after Ready; neither keeps anything.
    fleet.node("n1").stop();
    let config = fleet.node("n1").config_path().to_path_buf();
    let text = std::fs::read_to_string(&config).expect("node.toml");
    let text = text.replacen(
        "heartbeat_interval",
        "stream_idle_timeout = \"2s\"\nheartbeat_interval",
        1,
    );
    std::fs::write(&config, text).expect("node.toml");
    fleet.node("n1").start();
    fleet.wait_nodes_up(&["n1".to_string()]);
    let opened = Instant::now();
    let mut silent = HeldSync::open(&rt, &address, &a1, None);
    let mut quiet = HeldSync::open(&rt, &address, &a1, begin(&fleet, S1));
    quiet.wait_ready(&rt, "a sync that goes quiet");
    for (s, what) in [
        (&mut silent, "a silent stream"),
        (&mut quiet, "a quiet sync"),
    ] {
        let (status, at) = s.wait_error(&rt, what, Duration::from_secs(20));
        let words = ["stream_idle_timeout", "nothing of it was kept"];
        assert_refused(&status, Code::DeadlineExceeded, &words, what);
        let after = at - opened;
        assert!(
            after >= Duration::from_secs(2),
            "{what} was cut after {after:?}"
        );
    }

    // Batches over the protocol's size: over the batch limit, and over the
    // node's message limit.
    for (blocks, code, words) in [
        (
            32usize,
            Code::InvalidArgument,
            &["batches hold at most 1048576"][..],
        ),
        (80, Code::OutOfRange, &["too large", "limit"][..]),
    ] {
        let mut s = HeldSync::open(&rt, &address, &a1, begin(&fleet, S1));
        s.wait_ready(&rt, "a sync with an oversized batch");
        let data = vec![7u8; blocks * BLOCK_SIZE as usize];
        let checksums = data
            .chunks(BLOCK_SIZE as usize)
            .map(|b| blake3::hash(b).as_bytes().to_vec().into())
            .collect();
        let batch = pb::ExtentBatch {
            extents: vec![pb::Extent {
                offset: 0,
                data: data.into(),
                checksums,
                ..Default::default()
            }],
        };
        s.send(&rt, sync_msg(pb::sync_message::Msg::Extents(batch)));
        let (status, _) = s.wait_error(&rt, "an oversized batch", Duration::from_secs(20));
        eprintln!("{blocks} blocks in one batch: {status:?}");
        assert_refused(&status, code, words, &format!("a batch of {blocks} blocks"));
    }
    fleet.assert_all_alive();
    let disk = fleet.node_dir("n1").join("disk1");
    assert_only_source_folders(&disk, &[S1, "a1-b", "a1-c", S2], "idle streams");
    rewrite_random_blocks(&fleet.volume(S1), 2);
    h.sync(&fleet, S1);
    h.assert_all_restore(
        &fleet,
        &[S1, "a1-b", "a1-c", S2],
        "idle and oversized streams",
    );
}

/// Panics if `out` holds a raw escape byte, or (with `shown`) does not show
/// `shown` escaped.
fn assert_escaped(out: &[u8], shown: Option<&str>, what: &str) {
    let text = String::from_utf8_lossy(out);
    assert!(
        !out.contains(&0x1b),
        "{what} prints a raw escape byte:\n{text:?}"
    );
    if let Some(s) = shown {
        assert!(text.contains(s), "{what} does not show {s:?}:\n{text}");
    }
}

#[test]
fn escapes_reach_no_terminal_and_restore_grants_end_with_the_restore() {
    let mut fleet = two_hosts(|b| b);
    let mut h = History::new();
    h.sync(&fleet, S1);
    let p1 = h.sync(&fleet, S2);
    rewrite_random_blocks(&fleet.volume(S2), 3);
    let p2 = h.sync(&fleet, S2);
    let rt = runtime();
    let url = fleet.coordinator_url().to_string();
    let address = fleet.node_address("n1");
    let a1 = fleet.identity(A1);

    // Text a1 chooses: a tracker name, a refused source name, a sync warning, a
    // sync error and a command's error, each carrying a terminal escape.
    let mut spec = volume_spec(S1, SIZE);
    spec.tracker = format!("fp{TITLE_ESCAPE}");
    let bad_name = format!("x{TITLE_ESCAPE}");
    let mut control = rt
        .block_on(RawControl::hello(
            &url,
            &a1,
            vec![spec, volume_spec(&bad_name, SIZE)],
        ))
        .expect("Hello answered");
    assert!(control.registration(S1).assignment.is_some());
    let warning = format!("{TITLE_ESCAPE}quiesce failed\x1b[2J");
    let report = |result: Option<pb::SyncResult>, error: String| {
        pb::agent_message::Msg::Report(pb::SyncReport {
            source: S1.into(),
            result,
            error,
            inconsistent: false,
            recheck_bytes: 0,
        })
    };
    let result = pb::SyncResult {
        source: S1.into(),
        point: 1,
        warnings: vec![warning],
        ..Default::default()
    };
    rt.block_on(control.send(report(Some(result), String::new())));
    rt.block_on(control.send(report(None, format!("{TITLE_ESCAPE}disk on fire"))));
    wait_source(&fleet, S1, "a1's error report", |s| {
        json_str(s, "error").contains("disk on fire")
    });
    let sync = fleet.cli_spawn(&["sync", S1, "--wait"]);
    let cmd = rt.block_on(control.next_command(Duration::from_secs(30)));
    let pb::coordinator_command::Cmd::Sync(c) = cmd else {
        panic!("expected a sync command, got {cmd:?}");
    };
    rt.block_on(
        control.send(pb::agent_message::Msg::Result(pb::CommandResult {
            command_id: c.command_id,
            outcome: Some(pb::command_result::Outcome::Error(format!(
                "{TITLE_ESCAPE}no"
            ))),
        })),
    );
    let out = sync
        .wait(Duration::from_secs(60))
        .expect("the sync command ends");
    assert!(!out.status.success());
    assert_escaped(
        &out.stderr,
        Some("\\x1b]0;pwned\\x07no"),
        "`bulwark sync`'s error",
    );
    for (args, shown) in [
        (&["sources"][..], Some("fp\\x1b]0;pwned\\x07")),
        (&["sources"][..], Some("\\x1b]0;pwned\\x07disk on fire")),
        (
            &["alerts"][..],
            Some("\\x1b]0;pwned\\x07quiesce failed\\x1b[2J"),
        ),
        (&["alerts"][..], Some("x\\x1b]0;pwned\\x07")),
        (&["status"][..], None),
        (&["agents"][..], None),
        (&["sources", "--json"][..], None),
        (&["alerts", "--json"][..], None),
    ] {
        let out = fleet.cli(args);
        assert_escaped(&out.stdout, shown, &format!("`bulwark {}`", args.join(" ")));
    }

    // Restore grants: the admin restores a2's point p1 to a1's host. While the
    // restore runs a1 may read p1 and nothing else of a2's; after it, nothing.
    let to = fleet.scratch("a2-on-a1");
    let to_s = to.to_string_lossy().to_string();
    let p1_s = p1.to_string();
    let restore = fleet.cli_spawn(&[
        "restore", S2, "--point", &p1_s, "--to", &to_s, "--agent", A1, "--wait",
    ]);
    let cmd = rt.block_on(control.next_command(Duration::from_secs(30)));
    let pb::coordinator_command::Cmd::Restore(c) = cmd else {
        panic!("expected a restore command, got {cmd:?}");
    };
    assert_eq!((c.source.as_str(), c.point), (S2, p1));
    let read = |point: u64| rt.block_on(raw_restore(&address, &a1, S2, point));
    assert!(
        read(p1).is_ok_and(|n| n > 1),
        "a1 cannot read the point granted to it"
    );
    for point in [p2, 0] {
        let e = read(point).expect_err("a1 read a point of a2's not granted to it");
        assert_refused(
            &e,
            Code::PermissionDenied,
            &["belongs to agent a2"],
            "a point not granted",
        );
    }
    rt.block_on(
        control.send(pb::agent_message::Msg::Result(pb::CommandResult {
            command_id: c.command_id,
            outcome: Some(pb::command_result::Outcome::Error("not today".into())),
        })),
    );
    let out = restore
        .wait(Duration::from_secs(60))
        .expect("the restore command ends");
    assert!(!out.status.success());
    let e = read(p1).expect_err("a1 read a2's point after the restore ended");
    assert_refused(
        &e,
        Code::PermissionDenied,
        &["belongs to agent a2"],
        "an ended grant",
    );
    drop(control);

    // The real agent back: a restore of a2's point to a1 works, and ends the grant.
    restart_agent(&mut fleet, A1);
    fleet.restore(S2, Some(p1), &to, Some(A1));
    assert_same_file(&to, &h.copy(S2, p1), "a2's point restored on a1's host");
    let e = read(p1).expect_err("a1 read a2's point after the restore ended");
    assert_refused(
        &e,
        Code::PermissionDenied,
        &["belongs to agent a2"],
        "an ended grant",
    );
    rewrite_random_blocks(&fleet.volume(S1), 2);
    h.sync(&fleet, S1);
    let info = fleet.source_info(S1);
    assert_eq!(json_str(&info, "tracker"), "fingerprint", "{info}");
    h.assert_all_restore(&fleet, &[S1, S2], "escapes and restore grants");
    fleet.assert_all_alive();
    let disk = fleet.node_dir("n1").join("disk1");
    assert_only_source_folders(&disk, &[S1, S2], "escapes and restore grants");
}

/// The attacker opens a control stream with a1's key, which takes the place of the
/// real agent's: when it goes, the real agent is connected again by itself (its
/// stream was closed, so it reconnects), and its sources sync.
#[test]
fn a_control_stream_with_a_stolen_key_does_not_cut_the_agent_off_for_good() {
    let fleet = two_hosts(|b| b);
    let rt = runtime();
    let url = fleet.coordinator_url().to_string();
    let key = fleet.identity(A1);
    let raw = rt
        .block_on(RawControl::hello(&url, &key, vec![]))
        .expect("a control stream with a1's key");
    drop(raw);
    poll("a1 connected again", Duration::from_secs(30), || {
        let agents = fleet.cli_json(&["agents", "--json"]);
        let a1 = agents
            .as_array()
            .and_then(|a| a.iter().find(|x| x["name"] == A1).cloned())
            .ok_or("no a1")?;
        if a1["connected"] == true {
            Ok(())
        } else {
            Err(format!("{a1}"))
        }
    });
    let r = fleet.sync(S1);
    assert!(json_u64(&r, "point") >= 1, "{r}");
}
