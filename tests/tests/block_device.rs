//! A block device as a data source, and a block device as a restore target, with
//! loop devices; and the size of a block device as the tests measure it. Needs root
//! and loop devices (`losetup`); elsewhere each test skips, saying why
//! (`BULWARK-SKIP`). A loop device that cannot be attached where they exist fails.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use bulwark_tests::loopdev::{LoopDevice, loop_devices};
use bulwark_tests::{
    BLOCK_SIZE, Fleet, MIB, assert_same_file, byte_size, compare_files, json_u64,
    rewrite_random_blocks,
};
use rand::RngCore;

const SIZE: u64 = 32 * MIB;
const SOURCE: &str = "host-1-disk";

/// Copies the first `len` bytes of a device into a file.
fn snapshot(dev: &Path, to: &Path, len: u64) {
    let mut src = File::open(dev).unwrap_or_else(|e| panic!("cannot open {}: {e}", dev.display()));
    let mut buf = vec![0u8; len as usize];
    src.read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dev.display()));
    std::fs::write(to, &buf).unwrap_or_else(|e| panic!("cannot write {}: {e}", to.display()));
}

/// The tests' size of a file or device is its real size: a block device's metadata
/// says 0 bytes (which made a comparison of a restored file with a device fail), and
/// the comparison of a device with its backing file holds.
#[test]
fn a_block_device_is_sized_and_compared_by_its_contents() {
    if !loop_devices("sizing a block device") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let size = 3 * MIB + 4096;
    let backing = tmp.path().join("dev.backing");
    bulwark_tests::write_random_file(&backing, size);
    let dev = LoopDevice::attach(&backing);
    let meta = std::fs::metadata(&dev.dev).expect("stat the loop device");
    assert_eq!(meta.len(), 0, "a block device's metadata length");
    assert_eq!(byte_size(&dev.dev), Ok(size), "the device's size");
    assert_eq!(byte_size(&backing), Ok(size), "a regular file's size");
    compare_files(&dev.dev, &backing).expect("the device holds its backing file's bytes");
    // A file one byte shorter is not the same.
    let short = tmp.path().join("short");
    std::fs::write(
        &short,
        &std::fs::read(&backing).expect("backing")[..size as usize - 1],
    )
    .expect("write the short copy");
    let e = compare_files(&short, &dev.dev).expect_err("a shorter file differs");
    assert!(e.contains(&format!("({size} bytes)")), "{e}");
}

#[test]
fn block_device_source_and_restore_target() {
    if !loop_devices("a block device source") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let source = LoopDevice::over_new_file(&tmp.path().join("source.backing"), SIZE);
    let target = LoopDevice::over_new_file(&tmp.path().join("target.backing"), SIZE);
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
