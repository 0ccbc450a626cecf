//! Loop devices in tests: whether this host has them (where it does not, the test
//! skips, saying why in the fixed form of [`crate::skip`]), and one attached over a
//! file, detached on drop. A host that has them but fails to attach one fails the
//! test: only a missing facility is a skip.

use std::path::{Path, PathBuf};
use std::process::Command;

use bulwark_common::testkit::{have_root, have_tool, skip};

/// Whether loop devices can be used here: root, `/dev/loop-control` and `losetup`.
/// Where one is missing, the calling test skips (this records why) and returns.
pub fn loop_devices(needs: &str) -> bool {
    if !have_root(&format!(
        "{needs} needs loop devices, which only root may attach"
    )) {
        return false;
    }
    if !Path::new("/dev/loop-control").exists() {
        skip(
            "loop-device",
            &format!(
                "{needs} needs loop devices; this kernel or container has no /dev/loop-control"
            ),
        );
        return false;
    }
    have_tool("losetup", "util-linux")
}

/// A loop device over a file; detached on drop.
#[derive(Debug)]
pub struct LoopDevice {
    /// The device, `/dev/loopN`.
    pub dev: PathBuf,
}

impl LoopDevice {
    /// Attaches a free loop device to `backing`; panics saying what failed (call
    /// [`loop_devices`] first: past it, a failure is the test's failure).
    pub fn attach(backing: &Path) -> LoopDevice {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(backing)
            .output()
            .unwrap_or_else(|e| panic!("cannot run losetup: {e}"));
        assert!(
            out.status.success(),
            "losetup --find --show {} failed ({}): {}",
            backing.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            dev.starts_with("/dev/"),
            "losetup --find --show {} printed {dev:?}, not a device",
            backing.display()
        );
        LoopDevice {
            dev: PathBuf::from(dev),
        }
    }

    /// A new file of `size` bytes (sparse) at `backing`, and a loop device over it.
    pub fn over_new_file(backing: &Path, size: u64) -> LoopDevice {
        std::fs::File::create(backing)
            .and_then(|f| f.set_len(size))
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", backing.display()));
        LoopDevice::attach(backing)
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}
