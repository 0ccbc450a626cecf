//! Trackers end to end: `nbd-filter` and `qcow2-bitmap` send exactly the blocks a real
//! client (`qemu-io`) wrote; writes made during a sync land in the next point; kill -9
//! of the agent makes the source inconsistent (without the nbd-filter's activity log)
//! and the check that follows sends only the differing blocks, or (with it) costs a
//! re-check of the logged regions only; a clean stop keeps the record; kill -9 of the
//! agent in the middle of a qcow2-bitmap sync frees the image.
//!
//! Needs qemu-io / qemu-img (qemu-utils); each test skips, saying which is missing
//! (`BULWARK-SKIP`), where they are missing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bulwark_tests::qemu::{have, qcow2_to_raw};
use bulwark_tests::{BLOCK_SIZE, Fleet, MIB, Value, assert_same_file, json_str, json_u64};

const SIZE: u64 = 64 * MIB;
const AGENT: &str = "host-1";

/// Runs qemu-io on `target` with one `-c` per command; panics with its output on
/// failure.
fn qemu_io(format: &str, target: &str, commands: &[String]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", format, target]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = cmd.output().expect("cannot run qemu-io");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !stdout.contains("error") && !stdout.contains("failed"),
        "qemu-io {target} {commands:?} failed: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn nbd_url(socket: &Path) -> String {
    format!("nbd+unix:///?socket={}", socket.display())
}

/// Scattered writes: (offset, length, pattern). Some inside one block, one spanning
/// three blocks unaligned, one of 2 MiB (which the nbd-filter takes in pipes), one
/// at the very end.
fn scattered_writes() -> Vec<(u64, u64, u8)> {
    vec![
        (400 * BLOCK_SIZE + 4096, 2 * MIB + 512, 0x77),
        (0, 4096, 0x11),
        (5 * BLOCK_SIZE + 512, 4096, 0x22),
        (
            100 * BLOCK_SIZE + BLOCK_SIZE - 4096,
            2 * BLOCK_SIZE + 8192,
            0x33,
        ),
        (333 * BLOCK_SIZE, BLOCK_SIZE, 0x44),
        (700 * BLOCK_SIZE + 1000, 1, 0x55),
        (SIZE - 512, 512, 0x66),
    ]
}

fn blocks_of(writes: &[(u64, u64, u8)]) -> BTreeSet<u64> {
    let mut set = BTreeSet::new();
    for &(off, len, _) in writes {
        for b in off / BLOCK_SIZE..=(off + len - 1) / BLOCK_SIZE {
            set.insert(b);
        }
    }
    set
}

fn write_commands(writes: &[(u64, u64, u8)]) -> Vec<String> {
    writes
        .iter()
        .map(|(off, len, p)| format!("write -P {p} {off} {len}"))
        .collect()
}

fn source_state(fleet: &Fleet, source: &str) -> Value {
    fleet
        .sources()
        .into_iter()
        .find(|s| json_str(s, "name") == source)
        .unwrap_or_else(|| panic!("source {source} not listed"))
}

fn filter_fleet(source: &str) -> (Fleet, PathBuf) {
    filter_fleet_with(source, "")
}

/// [`filter_fleet`] with `extra` lines in the source's config.
fn filter_fleet_with(source: &str, extra: &str) -> (Fleet, PathBuf) {
    let fleet = Fleet::builder()
        .node("node-1")
        .agent_source(
            AGENT,
            source,
            None,
            SIZE,
            &format!(
                "tracker = \"nbd-filter\"\nnbd_socket = \"{{root}}/{AGENT}/nbd/{source}.sock\"\n{extra}"
            ),
        )
        .start();
    // The agent makes nbd/ (mode 0700) itself.
    let socket = fleet
        .root()
        .join(AGENT)
        .join("nbd")
        .join(format!("{source}.sock"));
    (fleet, socket)
}

#[test]
fn nbd_filter_sends_exactly_the_written_blocks() {
    if !have("qemu-io") {
        return;
    }
    let source = "vm-disk";
    let (fleet, socket) = filter_fleet(source);
    let first = fleet.sync(source);
    assert_eq!(json_u64(&first, "point"), 1);
    assert_eq!(json_str(&first, "kind"), "full", "first sync: {first}");
    let p1 = fleet.save_volume(source, "p1.img");

    let writes = scattered_writes();
    qemu_io("raw", &nbd_url(&socket), &write_commands(&writes));
    let want = blocks_of(&writes);

    let r = fleet.sync(source);
    assert_eq!(json_str(&r, "kind"), "incremental", "{r}");
    assert_eq!(
        json_u64(&r, "blocks_sent"),
        want.len() as u64,
        "the sync must send exactly the written blocks {want:?}: {r}"
    );
    assert_eq!(
        json_u64(&r, "blocks_scanned"),
        want.len() as u64,
        "only the dirty blocks are read on the host: {r}"
    );
    // Read back through the export: the writes reached the backing file.
    qemu_io(
        "raw",
        &nbd_url(&socket),
        &writes
            .iter()
            .map(|(o, l, p)| format!("read -P {p} {o} {l}"))
            .collect::<Vec<_>>(),
    );
    let out = fleet.scratch("p2.img");
    fleet.restore(source, None, &out, None);
    assert_same_file(&out, &fleet.volume(source), "restore of the newest point");
    let out1 = fleet.scratch("p1-restored.img");
    fleet.restore(source, Some(1), &out1, None);
    assert_same_file(&out1, &p1, "restore of point 1");

    // Nothing written since: an empty incremental.
    let r = fleet.sync(source);
    assert_eq!(json_u64(&r, "blocks_sent"), 0, "{r}");
}

/// How many batches the node applied (each says so at its `node-after-batch`
/// failpoint) in the text of its log after byte `from`.
fn batches_after(log: &str, from: usize) -> usize {
    log.get(from..)
        .unwrap_or_else(|| panic!("the node's log is shorter than {from} bytes"))
        .matches("failpoint node-after-batch reached")
        .count()
}

/// Writes made while a sync runs land in the next point, and none is lost. That the
/// writes overlapped the sync is proven from the node's side: each burst of writes
/// starts only after the node applied the sync's first batch (so after the agent
/// froze its record, which comes before any batch is read), and at least one burst
/// ends while the node still had batches of that sync to apply (so before its
/// commit).
#[test]
fn writes_during_a_sync_land_in_the_next_point() {
    if !have("qemu-io") {
        return;
    }
    let source = "busy-disk";
    let (mut fleet, socket) = filter_fleet(source);
    // Slow the node down (1 s after each group of batches, of at most 16 MiB) so the
    // writer below runs while the sync reads and sends: each sync has three groups or
    // more, and a burst of writes has a second to end before the next.
    fleet
        .node("node-1")
        .restart_with_env(&[("BULWARK_FAILPOINTS", "node-after-batch=sleep(1000)")]);
    fleet.wait_ready();
    let url = nbd_url(&socket);

    for round in 0..2u64 {
        if round == 1 {
            // Make the second sync an incremental of many blocks (640 distinct ones,
            // 40 MiB: three groups at the node).
            let cmds: Vec<String> = (0..640u64)
                .map(|i| format!("write -P 7 {} 65536", (i * 5 % 1024) * BLOCK_SIZE))
                .collect();
            qemu_io("raw", &url, &cmds);
        }
        let log_before = fleet.node("node-1").log_since_start().len();
        let sync = fleet.cli_spawn(&["sync", source, "--wait", "--json"]);
        bulwark_tests::poll(
            &format!("the node to apply the first batch of sync {round}"),
            Duration::from_secs(60),
            || match batches_after(&fleet.node("node-1").log_since_start(), log_before) {
                0 => Err("no batch yet".to_string()),
                _ => Ok(()),
            },
        );
        // Writes spread over the whole volume, each a new pattern, while the sync
        // runs; after each burst, how far the node's log had come.
        let mut burst_ends = Vec::new();
        for burst in 0..8u64 {
            let cmds: Vec<String> = (0..40u64)
                .map(|i| {
                    let block = (i * 97 + burst * 13 + round * 7) % 1024;
                    format!(
                        "write -P {} {} 4096",
                        (burst * 40 + i) % 250 + 1,
                        block * BLOCK_SIZE + (i % 16) * 4096
                    )
                })
                .collect();
            qemu_io("raw", &url, &cmds);
            burst_ends.push(fleet.node("node-1").log_since_start().len());
        }
        let out = sync
            .wait(Duration::from_secs(300))
            .unwrap_or_else(|e| panic!("sync during writes: {e}"));
        assert!(
            out.status.success(),
            "sync during writes failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let log = fleet.node("node-1").log_since_start();
        let later: Vec<usize> = burst_ends
            .iter()
            .map(|&at| batches_after(&log, at))
            .collect();
        eprintln!("sync {round}: batches the node applied after each burst of writes: {later:?}");
        assert!(
            later[0] > 0,
            "sync {round}: the first burst of writes did not end before the sync's last \
             batch (batches the node applied after each burst: {later:?}); the writes did \
             not overlap the sync"
        );
    }
    // One more sync with no writer: the replica must now equal the volume exactly,
    // so no write made during the earlier syncs was lost.
    let r = fleet.sync(source);
    assert!(
        json_u64(&r, "blocks_sent") > 0,
        "the writes during the sync must be sent by the next one: {r}"
    );
    let out = fleet.scratch("final.img");
    fleet.restore(source, None, &out, None);
    assert_same_file(
        &out,
        &fleet.volume(source),
        "restore after writes during syncs",
    );
}

#[test]
fn agent_kill9_makes_the_source_inconsistent_and_the_check_repairs_it() {
    if !have("qemu-io") {
        return;
    }
    let source = "crashy-disk";
    // Without the activity log (see activity_log_bounds_the_recheck_after_kill9 for
    // the default).
    let (mut fleet, socket) = filter_fleet_with(source, "activity_log = false");
    fleet.sync(source);

    // A clean stop keeps the record: the next sync is still incremental.
    let w1 = vec![(3 * BLOCK_SIZE, 4096, 0x31), (900 * BLOCK_SIZE, 4096, 0x32)];
    qemu_io("raw", &nbd_url(&socket), &write_commands(&w1));
    let status = fleet.agent(AGENT).restart();
    assert!(status.success(), "agent did not stop cleanly: {status}");
    fleet.wait_ready();
    assert_eq!(json_str(&source_state(&fleet, source), "state"), "ok");
    let r = fleet.sync(source);
    assert_eq!(
        json_str(&r, "kind"),
        "incremental",
        "after a clean restart: {r}"
    );
    assert_eq!(
        json_u64(&r, "blocks_sent"),
        2,
        "the saved record is used: {r}"
    );

    // kill -9 loses the in-memory record.
    let w2 = scattered_writes();
    qemu_io("raw", &nbd_url(&socket), &write_commands(&w2));
    fleet.agent(AGENT).kill9();
    fleet.agent(AGENT).start();
    fleet.wait_ready();
    let s = source_state(&fleet, source);
    assert_eq!(json_str(&s, "state"), "inconsistent", "after kill -9: {s}");
    let alert_key = format!("inconsistent/{source}");
    bulwark_tests::poll("an inconsistent alert", Duration::from_secs(20), || {
        let a = fleet.cli_json(&["alerts", "--json"]).to_string();
        if a.contains(&alert_key) {
            Ok(())
        } else {
            Err(a)
        }
    });

    let r = fleet.sync(source);
    assert_eq!(
        json_str(&r, "kind"),
        "check",
        "the sync after kill -9 is a check: {r}"
    );
    assert_eq!(json_u64(&r, "blocks_scanned"), SIZE / BLOCK_SIZE, "{r}");
    assert_eq!(
        json_u64(&r, "blocks_sent"),
        blocks_of(&w2).len() as u64,
        "the check sends only the differing blocks: {r}"
    );
    assert_eq!(json_str(&source_state(&fleet, source), "state"), "ok");
    bulwark_tests::poll(
        "the inconsistent alert resolved",
        Duration::from_secs(20),
        || {
            let a = fleet.cli_json(&["alerts", "--json"]).to_string();
            if a.contains(&alert_key) {
                Err(a)
            } else {
                Ok(())
            }
        },
    );
    let out = fleet.scratch("after-check.img");
    fleet.restore(source, None, &out, None);
    assert_same_file(&out, &fleet.volume(source), "restore after the check");
    // And tracking resumes.
    qemu_io("raw", &nbd_url(&socket), &write_commands(&w1));
    let r = fleet.sync(source);
    assert_eq!(json_str(&r, "kind"), "incremental", "{r}");
    assert_eq!(json_u64(&r, "blocks_sent"), 2, "{r}");
}

/// The qcow2 image's bitmaps, by name.
fn image_bitmaps(img: &Path) -> Vec<String> {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-U", "-f", "qcow2"])
        .arg(img)
        .output()
        .expect("qemu-img info");
    let v: Value = serde_json::from_slice(&out.stdout).expect("qemu-img info JSON");
    v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|b| b["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// A fleet (one node, one agent) protecting `source`: a qcow2 image of SIZE random
/// bytes made in `dir`, with the qcow2-bitmap tracker. Returns the image's path too;
/// `None` (the reason printed) where qemu's tools are missing.
fn qcow2_fleet(dir: &Path, source: &str) -> Option<(Fleet, PathBuf)> {
    if !have("qemu-img") || !have("qemu-io") || !have("qemu-storage-daemon") {
        return None;
    }
    let img = bulwark_tests::qemu::random_qcow2(dir, SIZE);
    let fleet = Fleet::builder()
        .node("node-1")
        .agent_source(
            AGENT,
            source,
            Some(&img),
            SIZE,
            "tracker = \"qcow2-bitmap\"",
        )
        .start();
    Some((fleet, img))
}

#[test]
fn qcow2_bitmap_sends_exactly_the_written_blocks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = "vm-qcow2";
    let Some((mut fleet, img)) = qcow2_fleet(dir.path(), source) else {
        return;
    };

    let r = fleet.sync(source);
    assert_eq!(json_str(&r, "kind"), "full", "{r}");
    assert_eq!(json_u64(&r, "blocks_sent"), SIZE / BLOCK_SIZE, "{r}");
    assert_eq!(image_bitmaps(&img), vec!["bulwark-p1".to_string()]);
    let p1 = fleet.scratch("p1.raw");
    qcow2_to_raw(&img, &p1);

    // Writes by a real client while the agent does not hold the image.
    let writes = scattered_writes();
    qemu_io(
        "qcow2",
        &img.display().to_string(),
        &write_commands(&writes),
    );
    let want = blocks_of(&writes);
    // A sync that fails (the node is down) leaves the image's bitmaps as they were.
    let status = fleet.node("node-1").stop();
    assert!(status.success(), "node stop: {status}");
    let (code, err) = fleet.cli_expect_fail(&["sync", source, "--wait", "--json"]);
    assert_ne!(code, 0, "{err}");
    assert_eq!(
        image_bitmaps(&img),
        vec!["bulwark-p1".to_string()],
        "after a failed sync"
    );
    fleet.node("node-1").start();
    fleet.wait_ready();
    let r = fleet.sync(source);
    assert_eq!(json_str(&r, "kind"), "incremental", "{r}");
    assert_eq!(
        json_u64(&r, "blocks_sent"),
        want.len() as u64,
        "exactly the written blocks {want:?}: {r}"
    );
    assert_eq!(json_u64(&r, "blocks_scanned"), want.len() as u64, "{r}");
    assert_eq!(image_bitmaps(&img), vec!["bulwark-p2".to_string()]);
    // Between syncs the agent's qemu-storage-daemon (kept idle for the next sync)
    // holds nothing of the image.
    assert_eq!(daemons_holding(&img), Vec::<u32>::new(), "after a sync");

    let now = fleet.scratch("now.raw");
    qcow2_to_raw(&img, &now);
    let out = fleet.scratch("restored2.raw");
    fleet.restore(source, None, &out, None);
    assert_same_file(&out, &now, "restore of the newest qcow2 point");
    let out1 = fleet.scratch("restored1.raw");
    fleet.restore(source, Some(1), &out1, None);
    assert_same_file(&out1, &p1, "restore of point 1");

    // A check compares everything and finds nothing to send.
    let r = fleet.cli_json(&["check", source, "--wait", "--json"]);
    assert_eq!(json_str(&r, "kind"), "check", "{r}");
    assert_eq!(json_u64(&r, "blocks_sent"), 0, "{r}");
    assert_eq!(json_u64(&r, "blocks_scanned"), SIZE / BLOCK_SIZE, "{r}");
    assert_eq!(image_bitmaps(&img), vec!["bulwark-p3".to_string()]);

    // A bitmap that stopped recording (disabled behind the agent's back) is not
    // trusted: the next sync is a check, and the record starts afresh.
    let out = Command::new("qemu-img")
        .args(["bitmap", "--disable", "-f", "qcow2"])
        .arg(&img)
        .arg("bulwark-p3")
        .output()
        .expect("qemu-img bitmap");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = fleet.sync(source);
    assert_eq!(json_str(&r, "kind"), "check", "{r}");
    assert_eq!(json_u64(&r, "blocks_sent"), 0, "{r}");
    assert_eq!(image_bitmaps(&img), vec!["bulwark-p4".to_string()]);
    let log = fleet.agent(AGENT).log_text();
    assert!(
        log.contains("bitmap bulwark-p3") && log.contains("not recording"),
        "the agent says why"
    );
}

/// Processes of `qemu-storage-daemon` that have `img` open.
fn daemons_holding(img: &Path) -> Vec<u32> {
    let want = std::fs::canonicalize(img).expect("canonical image path");
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if !cmdline.starts_with(b"qemu-storage-daemon") {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == want))
        {
            pids.push(pid);
        }
    }
    pids
}

/// kill -9 of the agent while a qcow2-bitmap sync holds the image: the
/// qemu-storage-daemon it started goes too (the image is free for the VM again), the
/// source is inconsistent after the restart, and the check sends exactly the blocks
/// written since the last point, before and after the kill.
#[test]
fn agent_kill9_mid_qcow2_sync_frees_the_image_and_the_check_repairs_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = "vm-killed";
    let Some((mut fleet, img)) = qcow2_fleet(dir.path(), source) else {
        return;
    };
    fleet.sync(source);

    let before = scattered_writes();
    qemu_io(
        "qcow2",
        &img.display().to_string(),
        &write_commands(&before),
    );
    // The node stops after the first batch it applies, so the sync holds the image.
    let status = fleet
        .node("node-1")
        .restart_with_env(&[("BULWARK_FAILPOINTS", "node-after-batch=pause")]);
    assert!(status.success(), "node stop: {status}");
    fleet.wait_ready();
    let sync = fleet.cli_spawn(&["sync", source, "--wait", "--json"]);
    fleet.node("node-1").wait_for_log(
        "failpoint node-after-batch reached",
        Duration::from_secs(60),
    );
    assert_eq!(
        daemons_holding(&img).len(),
        1,
        "a qemu-storage-daemon holds the image during the sync"
    );
    fleet.agent(AGENT).kill9();
    bulwark_tests::poll(
        "the qemu-storage-daemon to exit",
        Duration::from_secs(20),
        || match daemons_holding(&img) {
            pids if pids.is_empty() => Ok(()),
            pids => Err(format!("still running: {pids:?}")),
        },
    );
    // The image is free: a writer can open it at once.
    let after = vec![
        (5 * BLOCK_SIZE, 4096, 0x51),
        (700 * BLOCK_SIZE + 8192, 4096, 0x52),
    ];
    qemu_io("qcow2", &img.display().to_string(), &write_commands(&after));
    let out = sync
        .wait(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("the sync did not end after the agent was killed: {e}"));
    assert!(
        !out.status.success(),
        "the sync cannot succeed without its agent"
    );

    // The node rolls its half-applied sync back; the agent comes back inconsistent.
    fleet.node("node-1").kill9();
    fleet.node("node-1").start();
    fleet.agent(AGENT).start();
    fleet.wait_ready();
    // Not shown as syncing any more: the sync's outcome is unknown to the
    // coordinator, and the agent lost its record.
    let s = source_state(&fleet, source);
    assert_eq!(json_str(&s, "state"), "error", "after kill -9: {s}");
    assert!(
        json_str(&s, "error").contains("outcome is unknown")
            && json_str(&s, "error").contains("consistency check"),
        "{s}"
    );
    let alert_key = format!("inconsistent/{source}");
    bulwark_tests::poll("an inconsistent alert", Duration::from_secs(20), || {
        let a = fleet.cli_json(&["alerts", "--json"]).to_string();
        if a.contains(&alert_key) {
            Ok(())
        } else {
            Err(a)
        }
    });
    assert_eq!(fleet.point_ids(source), vec![1], "no partial point");

    // A check that fails (the node is down) leaves the source inconsistent, also
    // across a clean restart of the agent: the marker stays until a sync commits.
    let status = fleet.node("node-1").stop();
    assert!(status.success(), "node stop: {status}");
    let (code, err) = fleet.cli_expect_fail(&["sync", source, "--wait", "--json"]);
    assert_ne!(code, 0, "{err}");
    let status = fleet.agent(AGENT).restart();
    assert!(status.success(), "agent did not stop cleanly: {status}");
    fleet.node("node-1").start();
    fleet.wait_ready();
    let log = fleet.agent(AGENT).log_text();
    assert_eq!(
        log.matches("stopped in the middle of a sync").count(),
        2,
        "both restarts found the marker"
    );

    let r = fleet.sync(source);
    assert_eq!(json_str(&r, "kind"), "check", "{r}");
    assert_eq!(json_str(&source_state(&fleet, source), "state"), "ok");
    let mut want = blocks_of(&before);
    want.extend(blocks_of(&after));
    assert_eq!(
        json_u64(&r, "blocks_sent"),
        want.len() as u64,
        "exactly the blocks written since point 1 {want:?}: {r}"
    );
    assert_eq!(
        image_bitmaps(&img),
        vec![format!("bulwark-p{}", json_u64(&r, "point"))]
    );
    let now = fleet.scratch("now.raw");
    qcow2_to_raw(&img, &now);
    let restored = fleet.scratch("restored.raw");
    fleet.restore(source, None, &restored, None);
    assert_same_file(&restored, &now, "restore after the check");
    let log = fleet.agent(AGENT).log_text();
    assert!(
        !log.contains("refused the record's base point"),
        "the agent knew to check; it did not need the node's refusal"
    );
    // And tracking resumes: the next sync is incremental again.
    qemu_io("qcow2", &img.display().to_string(), &write_commands(&after));
    let r = fleet.sync(source);
    assert_eq!(json_str(&r, "kind"), "incremental", "{r}");
}

/// A record relative to a point the node does not have as its newest (here: a saved
/// bitmap whose base was altered while the agent was stopped) is refused by the node;
/// the agent falls back to a consistency check in the same sync, and nothing is lost.
#[test]
fn a_record_with_the_wrong_base_falls_back_to_a_check() {
    if !have("qemu-io") {
        return;
    }
    let source = "rebased-disk";
    let (mut fleet, socket) = filter_fleet(source);
    fleet.sync(source);
    let writes = scattered_writes();
    qemu_io("raw", &nbd_url(&socket), &write_commands(&writes));
    let status = fleet.agent(AGENT).stop();
    assert!(status.success(), "clean stop: {status}");

    // Layout (agent/src/tracker/bitmap.rs): magic, flags u8, base u64 LE at byte 9,
    // ..., BLAKE3 of everything before the last 32 bytes.
    let saved = fleet
        .root()
        .join(AGENT)
        .join("state/trackers")
        .join(format!("{source}.ckpt"));
    let mut raw = std::fs::read(&saved).expect("the clean stop checkpointed the bitmap");
    assert_eq!(&raw[..8], b"BWDIRTY2");
    raw[9..17].copy_from_slice(&7u64.to_le_bytes());
    let body = raw.len() - 32;
    let sum = blake3::hash(&raw[..body]);
    raw[body..].copy_from_slice(sum.as_bytes());
    std::fs::write(&saved, &raw).expect("rewrite the bitmap");

    fleet.agent(AGENT).start();
    fleet.wait_ready();
    let r = fleet.sync(source);
    assert_eq!(json_str(&r, "kind"), "check", "fell back to a check: {r}");
    assert_eq!(
        json_u64(&r, "blocks_sent"),
        blocks_of(&writes).len() as u64,
        "{r}"
    );
    let out = fleet.scratch("rebased.img");
    fleet.restore(source, None, &out, None);
    assert_same_file(&out, &fleet.volume(source), "restore after the fallback");
    let log = fleet.agent(AGENT).log_text();
    assert!(
        log.contains("refused the record's base point"),
        "the agent says why"
    );
}

/// The 1 MiB regions (16 blocks of 64 KiB) that `writes` touch.
fn regions_of(writes: &[(u64, u64, u8)]) -> BTreeSet<u64> {
    blocks_of(writes).into_iter().map(|b| b / 16).collect()
}

/// With the activity log (the default), kill -9 of the agent costs a re-check of the
/// regions written lately: writes before a sync, during it (qemu-io while the sync
/// runs) and after it, then kill -9; the source is `recovering` with the exact
/// bound; the next sync reads only those regions, sends what differs, and the points
/// restore identical. A damaged log then falls back to a full check and says why.
#[test]
fn activity_log_bounds_the_recheck_after_kill9() {
    if !have("qemu-io") {
        return;
    }
    let source = "al-disk";
    let (mut fleet, socket) = filter_fleet_with(source, "activity_region = \"1MiB\"");
    fleet.sync(source);
    let url = nbd_url(&socket);

    let w1 = vec![(3 * BLOCK_SIZE, 4096, 0x31), (900 * BLOCK_SIZE, 8192, 0x32)];
    qemu_io("raw", &url, &write_commands(&w1));
    let r = fleet.sync(source);
    assert_eq!(json_u64(&r, "blocks_sent"), 2, "{r}");
    let p2 = fleet.save_volume(source, "p2.img");

    // A writer goes on while a sync runs: some writes land before its freeze, some
    // after. At least one qemu-io run must end while the sync command runs.
    let w2: Vec<(u64, u64, u8)> = (0..24u64)
        .map(|i| ((200 + i * 5) * BLOCK_SIZE + 4096, 4096, (i + 1) as u8))
        .collect();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (started, ended, finishes) = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut finishes = Vec::new();
            let mut round = 0u8;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                round = round.wrapping_add(1);
                for chunk in w2.chunks(4) {
                    let cmds: Vec<(u64, u64, u8)> =
                        chunk.iter().map(|&(o, l, p)| (o, l, p ^ round)).collect();
                    qemu_io("raw", &url, &write_commands(&cmds));
                    finishes.push(std::time::Instant::now());
                }
            }
            finishes
        });
        std::thread::sleep(Duration::from_millis(100));
        let started = std::time::Instant::now();
        let out = fleet
            .cli_spawn(&["sync", source, "--wait", "--json"])
            .wait(Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("sync during writes: {e}"));
        let ended = std::time::Instant::now();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let finishes = writer.join().expect("writer");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (started, ended, finishes)
    });
    assert!(
        finishes.iter().any(|t| *t > started && *t < ended),
        "no write ended while the sync ran"
    );
    let w3 = scattered_writes();
    qemu_io("raw", &url, &write_commands(&w3));
    let before_crash = fleet.save_volume(source, "before-crash.img");
    fleet.agent(AGENT).kill9();
    fleet.agent(AGENT).start();
    fleet.wait_ready();

    let mut all = w1.clone();
    all.extend(&w2);
    all.extend(&w3);
    let regions = regions_of(&all);
    let bound = regions.len() as u64 * 16 * BLOCK_SIZE;
    let s = source_state(&fleet, source);
    assert_eq!(json_str(&s, "state"), "recovering", "after kill -9: {s}");
    assert_eq!(
        json_u64(&s, "recheck_bytes"),
        bound,
        "the bound is the logged regions: {s}"
    );
    let listing = String::from_utf8_lossy(&fleet.cli(&["sources"]).stdout).into_owned();
    assert!(listing.contains("recovering ("), "{listing}");

    let r = fleet.sync(source);
    assert_ne!(
        json_str(&r, "kind"),
        "check",
        "a bounded re-check, not a check: {r}"
    );
    assert_eq!(
        json_u64(&r, "blocks_read"),
        bound / BLOCK_SIZE,
        "reads only the logged regions: {r}"
    );
    assert!(
        bound / BLOCK_SIZE < SIZE / BLOCK_SIZE / 2,
        "the bound is far below the volume"
    );
    let sent = json_u64(&r, "blocks_sent");
    let w3_blocks = blocks_of(&w3).len() as u64;
    assert!(
        sent >= w3_blocks && sent <= w3_blocks + blocks_of(&w2).len() as u64,
        "sends the blocks written after the last point: {r}"
    );
    assert_eq!(json_str(&source_state(&fleet, source), "state"), "ok");
    let out = fleet.scratch("recovered.img");
    fleet.restore(source, None, &out, None);
    assert_same_file(
        &out,
        &before_crash,
        "restore of the recovering sync's point",
    );
    let out = fleet.scratch("p2-again.img");
    fleet.restore(source, Some(2), &out, None);
    assert_same_file(&out, &p2, "restore of point 2");
    let r = fleet.sync(source);
    assert_eq!(
        json_u64(&r, "blocks_sent"),
        0,
        "nothing owed after recovery: {r}"
    );

    // A damaged log: the full check, and the agent says why.
    let w4 = vec![(10 * BLOCK_SIZE, 4096, 0x41)];
    qemu_io("raw", &url, &write_commands(&w4));
    fleet.agent(AGENT).kill9();
    let log = fleet
        .root()
        .join(AGENT)
        .join("state/trackers")
        .join(format!("{source}.al"));
    let mut raw = std::fs::read(&log).expect("the activity log is on disk");
    raw[0] ^= 0xff;
    std::fs::write(&log, &raw).expect("damage the log");
    fleet.agent(AGENT).start();
    fleet.wait_ready();
    let s = source_state(&fleet, source);
    assert_eq!(json_str(&s, "state"), "inconsistent", "a damaged log: {s}");
    let r = fleet.sync(source);
    assert_eq!(json_str(&r, "kind"), "check", "{r}");
    assert_eq!(json_u64(&r, "blocks_sent"), 1, "{r}");
    assert!(
        fleet
            .agent(AGENT)
            .log_text()
            .contains("is damaged: bad header"),
        "the agent says why it checks everything"
    );
    let out = fleet.scratch("after-damage.img");
    fleet.restore(source, None, &out, None);
    assert_same_file(&out, &fleet.volume(source), "restore after the fallback");
}
