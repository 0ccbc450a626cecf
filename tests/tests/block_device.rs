//! A block device as a data source, and a block device as a restore target, with
//! loop devices. Needs root and loop devices (`losetup`); elsewhere it says why it
//! skipped.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use bulwark_tests::{BLOCK_SIZE, Fleet, MIB, assert_same_file, json_u64, rewrite_random_blocks};
use rand::RngCore;

const SIZE: u64 = 32 * MIB;
const SOURCE: &str = "host-1-disk";

/// A loop device over a file; detached on drop.
struct Loop {
    dev: PathBuf,
}

impl Loop {
    fn attach(backing: &Path) -> Result<Loop, String> {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(backing)
            .output()
            .map_err(|e| format!("cannot run losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Loop {
            dev: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
        })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// Two loop devices of SIZE bytes, or why there are none.
fn loops(dir: &Path) -> Result<(Loop, Loop), String> {
    if !Path::new("/dev/loop-control").exists() {
        return Err("no /dev/loop-control: this kernel or container has no loop devices".into());
    }
    let mut out = Vec::new();
    for name in ["source.backing", "target.backing"] {
        let path = dir.join(name);
        File::create(&path)
            .and_then(|f| f.set_len(SIZE))
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        out.push(Loop::attach(&path)?);
    }
    let b = out.pop().ok_or("no loop device")?;
    let a = out.pop().ok_or("no loop device")?;
    Ok((a, b))
}

/// Copies the first `len` bytes of a device into a file.
fn snapshot(dev: &Path, to: &Path, len: u64) {
    let mut src = File::open(dev).unwrap_or_else(|e| panic!("cannot open {}: {e}", dev.display()));
    let mut buf = vec![0u8; len as usize];
    src.read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dev.display()));
    std::fs::write(to, &buf).unwrap_or_else(|e| panic!("cannot write {}: {e}", to.display()));
}

#[test]
fn block_device_source_and_restore_target() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (source, target) = match loops(tmp.path()) {
        Ok(l) => l,
        Err(why) => {
            println!("SKIPPED block_device_source_and_restore_target: {why}");
            eprintln!("SKIPPED block_device_source_and_restore_target: {why}");
            return;
        }
    };
    // Random data on the source device, with a hole of zeros in the middle.
    {
        let mut data = vec![0u8; SIZE as usize];
        rand::rng().fill_bytes(&mut data);
        data[(SIZE / 2) as usize..(SIZE / 2 + 4 * MIB) as usize].fill(0);
        let mut dev = OpenOptions::new()
            .write(true)
            .open(&source.dev)
            .expect("open source device");
        dev.write_all(&data).expect("write source device");
        dev.sync_all().expect("fsync source device");
    }
    // Garbage on the target device, which the restore must overwrite, zeros included.
    {
        let mut junk = vec![0u8; SIZE as usize];
        rand::rng().fill_bytes(&mut junk);
        let dev = OpenOptions::new()
            .write(true)
            .open(&target.dev)
            .expect("open target device");
        dev.write_all_at(&junk, 0).expect("write target device");
        dev.sync_all().expect("fsync target device");
    }

    let fleet = Fleet::builder()
        .node("node-1")
        .agent_volume("host-1", SOURCE, &source.dev, SIZE)
        .start();
    let info = fleet.source_info(SOURCE);
    assert_eq!(
        json_u64(&info, "size_bytes"),
        SIZE,
        "the agent measured the device: {info}"
    );

    let blocks = SIZE / BLOCK_SIZE;
    let hole_blocks = 4 * MIB / BLOCK_SIZE;
    let r = fleet.sync(SOURCE);
    assert_eq!(json_u64(&r, "blocks_scanned"), blocks, "{r}");
    assert_eq!(
        json_u64(&r, "blocks_sent"),
        blocks - hole_blocks,
        "zero blocks are not sent: {r}"
    );
    let p1 = fleet.scratch("p1.img");
    snapshot(&source.dev, &p1, SIZE);

    let touched = rewrite_random_blocks(&source.dev, 20);
    let r = fleet.sync(SOURCE);
    assert_eq!(json_u64(&r, "blocks_sent"), touched as u64, "{r}");
    let p2 = fleet.scratch("p2.img");
    snapshot(&source.dev, &p2, SIZE);

    // Point 1 to a new file, point 2 onto the other block device.
    let f1 = fleet.scratch("restored-p1.img");
    fleet.restore(SOURCE, Some(1), &f1, None);
    assert_same_file(&f1, &p1, "point 1 restored to a file");
    fleet.restore(SOURCE, Some(2), &target.dev, None);
    let t2 = fleet.scratch("target-after-restore.img");
    snapshot(&target.dev, &t2, SIZE);
    assert_same_file(&t2, &p2, "point 2 restored onto a block device");

    // The live source device itself is never a restore target.
    let dev = source.dev.to_string_lossy().into_owned();
    let (_, stderr) =
        fleet.cli_expect_fail(&["restore", SOURCE, "--point", "1", "--to", &dev, "--wait"]);
    assert!(
        stderr.contains("a volume this agent protects"),
        "stderr: {stderr}"
    );
    let p2_again = fleet.scratch("source-after-refusal.img");
    snapshot(&source.dev, &p2_again, SIZE);
    assert_same_file(
        &p2_again,
        &p2,
        "the source device after the refused restore",
    );
}
