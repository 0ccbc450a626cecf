//! The `dm-era` tracker on a real block device: the agent puts an era target in
//! front of a loop device, writes through /dev/mapper are tracked by the kernel, and
//! the sync sends exactly the written blocks. Needs root, loop devices,
//! device-mapper, dmsetup and era_invalidate; elsewhere it skips, saying which is
//! missing (`BULWARK-SKIP`).

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use bulwark_tests::loopdev::{LoopDevice, loop_devices};
use bulwark_tests::{
    BLOCK_SIZE, Fleet, MIB, assert_same_file, have_tool, json_str, json_u64, skip,
};

const SIZE: u64 = 64 * MIB;
const SOURCE: &str = "era-disk";

struct EraDevice(String);

impl Drop for EraDevice {
    fn drop(&mut self) {
        let _ = Command::new("dmsetup").args(["remove", &self.0]).status();
    }
}

/// Whether dm-era can run here; where not, the test skips (recorded with the
/// missing facility) and returns.
fn dm_era_here() -> bool {
    if !loop_devices("dm-era's origin and metadata") {
        return false;
    }
    // The node alone proves nothing: dmsetup makes /dev/mapper/control when it is
    // missing, and opening it then fails with ENODEV where the kernel has no
    // device-mapper.
    let control = Path::new("/dev/mapper/control");
    if let Err(e) = OpenOptions::new().read(true).write(true).open(control) {
        let absent = e.kind() == std::io::ErrorKind::NotFound
            || matches!(e.raw_os_error(), Some(libc::ENODEV | libc::ENXIO));
        assert!(absent, "cannot open {}: {e}", control.display());
        skip(
            "device-mapper",
            &format!(
                "this kernel or container has no device-mapper ({}: {e})",
                control.display()
            ),
        );
        return false;
    }
    have_tool("dmsetup", "dmsetup") && have_tool("era_invalidate", "thin-provisioning-tools")
}

#[test]
fn dm_era_sends_exactly_the_written_blocks() {
    if !dm_era_here() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    // The origin's backing file holds random data from the start; the metadata
    // device is zeroed (a new sparse file), as the era target needs.
    bulwark_tests::write_random_file(&tmp.path().join("origin"), SIZE);
    let origin = LoopDevice::attach(&tmp.path().join("origin"));
    let meta = LoopDevice::over_new_file(&tmp.path().join("meta"), 16 * MIB);
    let device = format!("bulwark-test-{}", std::process::id());
    let _era = EraDevice(device.clone());
    let mut fleet = Fleet::builder()
        .node("node-1")
        .agent_source(
            "host-1",
            SOURCE,
            Some(&origin.dev),
            SIZE,
            &format!(
                "tracker = \"dm-era\"\nera_metadata = \"{}\"\nera_device = \"{device}\"",
                meta.dev.display()
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
    // Held to what the host sees: the era device, which is what it wrote through
    // (and whose page cache has those writes). Its size is its real size
    // (`compare_files` seeks to the end: a device's metadata says 0 bytes).
    assert_eq!(
        bulwark_tests::byte_size(&mapped),
        Ok(SIZE),
        "the era device's size"
    );
    assert_same_file(&out, &mapped, "restore of the dm-era source");

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
