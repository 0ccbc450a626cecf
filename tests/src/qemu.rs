//! QEMU's tools in tests: whether one is installed (a test that needs a missing one
//! says so and skips), and qcow2 images of random data.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Whether `tool` (qemu-utils) is installed; where it is not, the calling test
/// skips ([`crate::skip`], facility `tool`) and returns.
pub fn have(tool: &str) -> bool {
    crate::have_tool(tool, "qemu-utils")
}

/// A qcow2 image `vm.qcow2` in `dir` holding `size` random bytes (through
/// `seed.raw`, kept next to it).
pub fn random_qcow2(dir: &Path, size: u64) -> PathBuf {
    let raw = dir.join("seed.raw");
    crate::write_random_file(&raw, size);
    let img = dir.join("vm.qcow2");
    convert(&["-f", "raw", "-O", "qcow2"], &raw, &img);
    img
}

/// The guest's bytes of the qcow2 image `img` as the raw file `raw` (`-U`: the
/// image may be open elsewhere).
pub fn qcow2_to_raw(img: &Path, raw: &Path) {
    convert(&["-U", "-f", "qcow2", "-O", "raw"], img, raw);
}

fn convert(args: &[&str], from: &Path, to: &Path) {
    let out = Command::new("qemu-img")
        .arg("convert")
        .args(args)
        .arg(from)
        .arg(to)
        .output()
        .expect("cannot run qemu-img convert");
    assert!(
        out.status.success(),
        "qemu-img convert {args:?} {}: {}",
        from.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}
