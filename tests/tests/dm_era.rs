//! The `dm-era` tracker on a real block device: the agent puts an era target in
//! front of a loop device, writes through /dev/mapper are tracked by the kernel, and
//! the sync sends exactly the written blocks. Needs root, loop devices,
//! device-mapper, dmsetup and era_invalidate; elsewhere it prints why it skipped.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use bulwark_tests::{BLOCK_SIZE, Fleet, MIB, assert_same_file, json_str, json_u64};

const SIZE: u64 = 64 * MIB;
const SOURCE: &str = "era-disk";

struct Loop(PathBuf);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

struct EraDevice(String);

impl Drop for EraDevice {
    fn drop(&mut self) {
        let _ = Command::new("dmsetup").args(["remove", &self.0]).status();
    }
}

fn missing() -> Option<String> {
    if !Path::new("/dev/loop-control").exists() {
        return Some("no loop devices".into());
    }
    if !Path::new("/dev/mapper/control").exists() {
        return Some("no device-mapper (/dev/mapper/control is missing)".into());
    }
    for tool in ["dmsetup", "era_invalidate", "losetup"] {
        if Command::new(tool).arg("--version").output().is_err() {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

fn attach(path: &Path, size: u64) -> Loop {
    File::create(path)
        .and_then(|f| f.set_len(size))
        .expect("backing file");
    let out = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(path)
        .output()
        .expect("losetup");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Loop(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

#[test]
fn dm_era_sends_exactly_the_written_blocks() {
    if let Some(why) = missing() {
        println!("SKIPPED dm_era_sends_exactly_the_written_blocks: {why}");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let origin = attach(&tmp.path().join("origin"), SIZE);
    let meta = attach(&tmp.path().join("meta"), 16 * MIB);
    bulwark_tests::write_random_file(&tmp.path().join("seed"), SIZE);
    std::fs::write(
        &origin.0,
        std::fs::read(tmp.path().join("seed")).expect("seed"),
    )
    .expect("fill the origin");
    let device = format!("bulwark-test-{}", std::process::id());
    let _era = EraDevice(device.clone());
    let mut fleet = Fleet::builder()
        .node("node-1")
        .agent_source(
            "host-1",
            SOURCE,
            Some(&origin.0),
            SIZE,
            &format!(
                "tracker = \"dm-era\"\nera_metadata = \"{}\"\nera_device = \"{device}\"",
                meta.0.display()
            ),
        )
        .start();
    let mapped = PathBuf::from("/dev/mapper").join(&device);
    assert!(mapped.exists(), "the agent made the era device");

    let r = fleet.sync(SOURCE);
    assert_eq!(json_str(&r, "kind"), "full", "{r}");

    let mut want = BTreeSet::new();
    {
        let f = OpenOptions::new()
            .write(true)
            .open(&mapped)
            .expect("era device");
        for b in [1u64, 2, 77, 500, SIZE / BLOCK_SIZE - 1] {
            f.write_all_at(&[0x5a; 4096], b * BLOCK_SIZE)
                .expect("write");
            want.insert(b);
        }
        f.sync_all().expect("fsync");
    }
    let r = fleet.sync(SOURCE);
    assert_eq!(json_str(&r, "kind"), "incremental", "{r}");
    assert_eq!(json_u64(&r, "blocks_sent"), want.len() as u64, "{r}");
    let out = fleet.scratch("era.img");
    fleet.restore(SOURCE, None, &out, None);
    assert_same_file(&out, &origin.0, "restore of the dm-era source");

    // The record survives kill -9 of the agent (it is the kernel's).
    fleet.agent("host-1").kill9();
    fleet.agent("host-1").start();
    fleet.wait_ready();
    {
        let f = OpenOptions::new()
            .write(true)
            .open(&mapped)
            .expect("era device");
        f.write_all_at(&[0x77; 4096], 9 * BLOCK_SIZE)
            .expect("write");
        f.sync_all().expect("fsync");
    }
    let r = fleet.sync(SOURCE);
    assert_eq!(json_str(&r, "kind"), "incremental", "{r}");
    assert_eq!(json_u64(&r, "blocks_sent"), 1, "{r}");
    drop(fleet);
}
