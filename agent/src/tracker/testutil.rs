//! Helpers for unit tests that make real qcow2 images with qemu's tools.

use std::path::Path;
use std::process::Command;

/// Whether `tool` (qemu-utils) is installed; where it is not, the test skips
/// (`BULWARK-SKIP`, facility `tool`) and returns.
pub fn have(tool: &str) -> bool {
    bulwark_common::testkit::have_tool(tool, "qemu-utils")
}

/// Runs `name` with `args`: its standard output, or a panic with what it printed.
pub fn tool(name: &str, args: &[&str]) -> Vec<u8> {
    let out = Command::new(name).args(args).output().expect(name);
    assert!(
        out.status.success(),
        "{name} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A new qcow2 image at `img` of `size` (as qemu-img takes it), with the creation
/// options `opts` (none if empty) and an optional qcow2 backing file.
pub fn create_qcow2(img: &Path, opts: &str, size: &str, backing: Option<&Path>) {
    let img = img.to_string_lossy();
    let backing = backing.map(|p| p.to_string_lossy().into_owned());
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    if let Some(b) = &backing {
        args.extend(["-b", b, "-F", "qcow2"]);
    }
    args.extend([&*img, size]);
    tool("qemu-img", &args);
}

/// Runs qemu-io on the qcow2 image at `img`, one `-c` per command.
pub fn qemu_io(img: &Path, commands: &[impl AsRef<str>]) {
    let img = img.to_string_lossy();
    let mut args = vec!["-f", "qcow2"];
    for c in commands {
        args.extend(["-c", c.as_ref()]);
    }
    args.push(&img);
    tool("qemu-io", &args);
}
