//! `qcow2-bitmap` on the image of a running VM, reached through the VM's QMP socket
//! (`qmp_socket`): the VM keeps the image open and locked, the guest writes on
//! during syncs, each point is the image at the instant it froze, and the sync sends
//! exactly the blocks the guest wrote.
//!
//! The VM is a `qemu-storage-daemon` holding the image (the same QEMU block layer
//! and QMP as a VM's) with a FUSE export as the guest's disk: writes to that file go
//! through QEMU as a guest's do, so they are seen by the dirty bitmaps and copied
//! before they land by the sync's fleecing job. The test skips, saying why
//! (`BULWARK-SKIP`), where qemu-utils or FUSE (`/dev/fuse`, QEMU's FUSE export) is
//! missing; a stand-in VM that fails to start for another reason fails it.

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bulwark_tests::qemu::{have, random_qcow2};
use bulwark_tests::{BLOCK_SIZE, Fleet, MIB, assert_same_file, json_str, json_u64, skip};

const SIZE: u64 = 64 * MIB;
const AGENT: &str = "host-1";
const SOURCE: &str = "running-vm";

/// The stand-in VM: a qemu-storage-daemon with the image open read-write and its
/// disk exported to the "guest" as a file through FUSE. Stopped with SIGTERM on
/// drop, which unmounts the export and writes the image's bitmaps back.
struct Vm {
    child: Child,
    qmp: PathBuf,
    guest: PathBuf,
}

impl Vm {
    /// `None` where FUSE or QEMU's FUSE export is missing here (the test skips,
    /// recorded with the missing facility); a stand-in VM that fails to start for
    /// any other reason fails the test.
    fn start(dir: &Path, img: &Path) -> Option<Vm> {
        if !Path::new("/dev/fuse").exists() {
            skip(
                "fuse",
                "/dev/fuse is missing; the stand-in VM's guest disk is a FUSE export",
            );
            return None;
        }
        // Only root mounts a FUSE file system by itself; anyone else needs libfuse3's
        // setuid helper.
        if !bulwark_tests::on_path("fusermount3")
            && !bulwark_tests::have_root("a FUSE export needs fusermount3 (package fuse3)")
        {
            return None;
        }
        let qmp = dir.join("vm-qmp.sock");
        let guest = dir.join("guest-disk");
        let pid = dir.join("vm.pid");
        std::fs::write(&guest, b"").expect("mount point");
        let stderr = dir.join("vm.log");
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!("file,node-name=file0,filename={}", img.display()))
            .args(["--blockdev", "qcow2,node-name=disk0,file=file0"])
            .arg("--export")
            .arg(format!(
                "fuse,id=guest,node-name=disk0,mountpoint={},writable=on",
                guest.display()
            ))
            .arg("--chardev")
            .arg(format!(
                "socket,id=qmp,server=on,wait=off,path={}",
                qmp.display()
            ))
            .args(["--monitor", "chardev=qmp,mode=control"])
            .arg("--pidfile")
            .arg(&pid)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("vm.log"))
            .spawn()
            .expect("cannot start qemu-storage-daemon");
        let mut vm = Vm { child, qmp, guest };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !pid.exists() {
            if let Ok(Some(status)) = vm.child.try_wait() {
                let why = std::fs::read_to_string(&stderr).unwrap_or_default();
                // A qemu-storage-daemon built without FUSE export support: absent.
                if why.contains("does not accept value 'fuse'") {
                    skip(
                        "qemu-fuse-export",
                        &format!(
                            "this qemu-storage-daemon has no FUSE export: {}",
                            why.trim()
                        ),
                    );
                    return None;
                }
                panic!(
                    "the stand-in VM (qemu-storage-daemon with a FUSE export) did not start \
                     ({status}): {why}"
                );
            }
            assert!(Instant::now() < deadline, "the stand-in VM did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(vm)
    }

    /// The guest writes `data` at `offset` and flushes it.
    fn write(&self, offset: u64, data: &[u8]) {
        let f = OpenOptions::new()
            .write(true)
            .open(&self.guest)
            .expect("open the guest disk");
        f.write_all_at(data, offset).expect("guest write");
        f.sync_data().expect("guest flush");
    }

    /// What the guest sees now, copied to `to`.
    fn snapshot(&self, to: &Path) {
        std::fs::copy(&self.guest, to).expect("copy the guest disk");
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// Bytes of block `block`, round `round`: every byte says which, so that a point
/// mixing two moments would show.
fn block_bytes(block: u64, round: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE as usize];
    for (i, chunk) in b.chunks_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&block.to_le_bytes());
        chunk[8..].copy_from_slice(&(round ^ i as u64).to_le_bytes());
    }
    b
}

/// Files named `*.fleece.qcow2` under `dir` (fleecing overlays left behind).
fn overlays(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(".fleece.qcow2") {
                found.push(p);
            }
        }
    }
    found
}

#[test]
fn qcow2_bitmap_syncs_a_running_vm_through_qmp() {
    if !have("qemu-img") || !have("qemu-storage-daemon") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let img = random_qcow2(dir.path(), SIZE);
    let Some(vm) = Vm::start(dir.path(), &img) else {
        return;
    };
    let extra = format!(
        "tracker = \"qcow2-bitmap\"\nqmp_socket = \"{}\"",
        vm.qmp.display()
    );
    let mut fleet = Fleet::builder()
        .node("node-1")
        .agent_source(AGENT, SOURCE, Some(&img), SIZE, &extra)
        .start();

    // Point 1, of the whole disk, while the VM holds the image.
    let r = fleet.sync(SOURCE);
    assert_eq!(json_str(&r, "kind"), "full", "{r}");
    assert_eq!(json_u64(&r, "blocks_sent"), SIZE / BLOCK_SIZE, "{r}");
    let p1 = fleet.scratch("p1.raw");
    vm.snapshot(&p1);

    // The guest writes scattered blocks; the next sync sends exactly those.
    let written: BTreeSet<u64> = [0, 7, 8, 300, 511, SIZE / BLOCK_SIZE - 1].into();
    for &b in &written {
        vm.write(b * BLOCK_SIZE, &block_bytes(b, 1));
    }
    let r = fleet.sync(SOURCE);
    assert_eq!(json_str(&r, "kind"), "incremental", "{r}");
    assert_eq!(
        json_u64(&r, "blocks_sent"),
        written.len() as u64,
        "exactly the blocks the guest wrote, {written:?}: {r}"
    );
    let p2 = fleet.scratch("p2.raw");
    vm.snapshot(&p2);

    // The guest writes all through the next sync, which is held for a while just
    // after it froze the record. Each point is one instant of the disk: none of the
    // writes made while the sync was held reaches it; they go to the next one.
    let status = fleet
        .agent(AGENT)
        .restart_with_env(&[("BULWARK_FAILPOINTS", "agent-qcow2-frozen=sleep(1500)")]);
    assert!(status.success(), "agent stop: {status}");
    fleet.wait_ready();
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    // The last round the guest finished before it saw the sync held.
    let frozen_by = Arc::new(AtomicU64::new(u64::MAX));
    let agent_log = fleet.agent(AGENT).log_path().to_path_buf();
    let writer = {
        let (stop, rounds, frozen_by) = (stop.clone(), rounds.clone(), frozen_by.clone());
        let guest = vm.guest.clone();
        std::thread::spawn(move || {
            let f = OpenOptions::new()
                .write(true)
                .open(&guest)
                .expect("open the guest disk");
            let mut round = 2;
            while !stop.load(Ordering::Relaxed) {
                for b in (0..SIZE / BLOCK_SIZE).step_by(37) {
                    f.write_all_at(&block_bytes(b, round), b * BLOCK_SIZE)
                        .expect("guest write");
                }
                f.sync_data().expect("guest flush");
                rounds.store(round, Ordering::Relaxed);
                if frozen_by.load(Ordering::Relaxed) == u64::MAX
                    && std::fs::read_to_string(&agent_log)
                        .is_ok_and(|l| l.contains("failpoint agent-qcow2-frozen reached"))
                {
                    frozen_by.store(round, Ordering::Relaxed);
                }
                round += 1;
            }
        })
    };
    while rounds.load(Ordering::Relaxed) < 3 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let r = fleet.sync(SOURCE);
    assert_eq!(json_str(&r, "kind"), "incremental", "{r}");
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    let frozen_by = frozen_by.load(Ordering::Relaxed);
    let last = rounds.load(Ordering::Relaxed);
    assert!(
        frozen_by != u64::MAX && last > frozen_by + 2,
        "the guest went on writing while the sync was held (rounds {frozen_by}..{last})"
    );
    let r = fleet.sync(SOURCE);
    assert_eq!(json_str(&r, "kind"), "incremental", "{r}");
    let p4 = fleet.scratch("p4.raw");
    vm.snapshot(&p4);

    for (point, want) in [(1, &p1), (2, &p2), (4, &p4)] {
        let out = fleet.scratch(&format!("restored{point}.raw"));
        fleet.restore(SOURCE, Some(point), &out, None);
        assert_same_file(&out, want, &format!("restore of point {point}"));
    }
    // Point 3 was taken while the guest wrote: each rewritten block is whole, from
    // one round no later than the one the guest had finished when it saw the sync
    // held, and the rounds never run backwards along the disk (the writer goes
    // front to back, so a later block may be a round behind, never ahead).
    let out = fleet.scratch("restored3.raw");
    fleet.restore(SOURCE, Some(3), &out, None);
    let got = std::fs::read(&out).expect("read point 3");
    let mut last_round = u64::MAX;
    for b in (0..SIZE / BLOCK_SIZE).step_by(37) {
        let at = (b * BLOCK_SIZE) as usize;
        let block = &got[at..at + BLOCK_SIZE as usize];
        let round = u64::from_le_bytes(block[8..16].try_into().expect("8 bytes"));
        assert_eq!(
            block,
            &block_bytes(b, round)[..],
            "block {b} of point 3 is not one whole write"
        );
        assert!(
            round <= frozen_by,
            "block {b} of point 3 holds round {round}, written after the point froze (by round {frozen_by})"
        );
        assert!(
            round <= last_round,
            "point 3 is not one instant: block {b} is from round {round}, an earlier block from {last_round}"
        );
        last_round = round;
    }

    // kill -9 of the agent while a sync holds its export, job and overlay in the
    // VM: the next sync clears them away and is a consistency check, which finds
    // nothing to send (the guest wrote nothing since point 4).
    let status = fleet
        .agent(AGENT)
        .restart_with_env(&[("BULWARK_FAILPOINTS", "agent-qcow2-frozen=pause")]);
    assert!(status.success(), "agent stop: {status}");
    fleet.wait_ready();
    let sync = fleet.cli_spawn(&["sync", SOURCE, "--wait", "--json"]);
    fleet.agent(AGENT).wait_for_log(
        "failpoint agent-qcow2-frozen reached",
        Duration::from_secs(60),
    );
    assert_eq!(overlays(fleet.root()).len(), 1, "the held sync's overlay");
    fleet.agent(AGENT).kill9();
    let out = sync
        .wait(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("the sync did not end after the agent was killed: {e}"));
    assert!(
        !out.status.success(),
        "the sync cannot succeed without its agent"
    );
    fleet.agent(AGENT).start();
    fleet.wait_ready();
    let r = fleet.sync(SOURCE);
    assert_eq!(json_str(&r, "kind"), "check", "{r}");
    assert_eq!(json_u64(&r, "blocks_sent"), 0, "{r}");
    let r = fleet.sync(SOURCE);
    assert_eq!(json_str(&r, "kind"), "incremental", "{r}");
    let newest = json_u64(&r, "point");
    let out = fleet.scratch("restored-last.raw");
    fleet.restore(SOURCE, None, &out, None);
    assert_same_file(&out, &p4, "restore after the agent was killed");

    // The VM ran throughout and still holds the image; nothing of the syncs is left
    // in it or on the host.
    let mut vm = vm;
    assert!(
        matches!(vm.child.try_wait(), Ok(None)),
        "the VM stopped during the syncs"
    );
    assert_eq!(
        overlays(fleet.root()),
        Vec::<PathBuf>::new(),
        "fleecing overlays left"
    );
    drop(vm);
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "qcow2"])
        .arg(&img)
        .output()
        .expect("qemu-img info");
    let info = String::from_utf8_lossy(&out.stdout);
    assert!(
        info.contains(&format!("\"bulwark-p{newest}\""))
            && !info.contains("\"bulwark-p4\"")
            && !info.contains("bulwark-frozen"),
        "the image keeps only the newest point's bitmap: {info}"
    );
}
