//! Quiesce: pre/post hooks make `app` points; a failing or hanging hook gives a
//! `crash` point with a warning, or a refused sync with `require_app_consistent`; a
//! snapshot command makes the sync read a point-in-time view; fsfreeze freezes and
//! thaws a real file system (on a loop device; where root, loop devices or a tool
//! is missing, it skips, saying which: `BULWARK-SKIP`; a failure to make or mount
//! the file system where they exist fails the test).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bulwark_tests::loopdev::{LoopDevice, loop_devices};
use bulwark_tests::{Fleet, MIB, assert_same_file, have_tool, json_str, json_u64};

const SIZE: u64 = 4 * MIB;
const AGENT: &str = "host-1";

fn hooks(log: &str) -> String {
    format!(
        "pre_snapshot = 'echo \"pre $BULWARK_SOURCE $BULWARK_PHASE\" >> {{root}}/{log}'\n\
         post_snapshot = 'echo \"post $BULWARK_SOURCE $BULWARK_PHASE\" >> {{root}}/{log}'"
    )
}

#[test]
fn hooks_snapshots_and_their_failures() {
    let fleet = Fleet::builder()
        .node("node-1")
        .agent_source(AGENT, "app-ok", None, SIZE, &hooks("ok.log"))
        .agent_source(
            AGENT,
            "app-fail",
            None,
            SIZE,
            "pre_snapshot = 'echo cannot flush tables >&2; exit 3'\n\
             post_snapshot = 'echo post >> {root}/fail.log'",
        )
        .agent_source(
            AGENT,
            "app-strict",
            None,
            SIZE,
            "pre_snapshot = 'exit 1'\nrequire_app_consistent = true",
        )
        .agent_source(
            AGENT,
            "app-slow",
            None,
            SIZE,
            "pre_snapshot = 'sleep 30'\nhook_timeout = \"1s\"",
        )
        .agent_source(
            AGENT,
            "app-snap",
            None,
            SIZE,
            // The post hook changes the live volume after the snapshot: the point must
            // not see that change.
            "snapshot_command = 'cp \"$BULWARK_VOLUME\" \"$BULWARK_SNAPSHOT\"'\n\
             post_snapshot = 'printf XXXXXXXX | dd of=\"$BULWARK_VOLUME\" bs=1 seek=0 conv=notrunc 2>/dev/null'",
        )
        .start();

    // Hooks that work: an app point, pre before post, each told its phase.
    let r = fleet.sync("app-ok");
    assert_eq!(json_str(&r, "consistency"), "app", "{r}");
    let log = std::fs::read_to_string(fleet.root().join("ok.log")).expect("hook log");
    assert_eq!(log, "pre app-ok pre\npost app-ok post\n");
    let points = fleet.points("app-ok");
    assert_eq!(json_str(&points[0], "consistency"), "app");

    // A failing pre-hook: a crash point with the hook's message; post still runs.
    let r = fleet.sync("app-fail");
    assert_eq!(json_str(&r, "consistency"), "crash", "{r}");
    let warnings = r["warnings"].to_string();
    assert!(
        warnings.contains("pre_snapshot") && warnings.contains("cannot flush tables"),
        "the warning names the hook and its error: {r}"
    );
    assert_eq!(
        std::fs::read_to_string(fleet.root().join("fail.log")).expect("post log"),
        "post\n"
    );
    let src = fleet
        .sources()
        .into_iter()
        .find(|s| json_str(s, "name") == "app-fail")
        .expect("listed");
    assert!(
        json_str(&src, "warning").contains("cannot flush tables"),
        "sources shows the warning: {src}"
    );

    // require_app_consistent: the sync is refused and no point is made.
    let (code, err) = fleet.cli_expect_fail(&["sync", "app-strict", "--wait", "--json"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("require_app_consistent"),
        "the refusal says why: {err}"
    );
    assert!(
        fleet.point_ids("app-strict").is_empty(),
        "no point after a refused sync"
    );

    // A hook that hangs is killed at hook_timeout.
    let r = fleet.sync("app-slow");
    assert_eq!(json_str(&r, "consistency"), "crash", "{r}");
    assert!(
        r["warnings"]
            .to_string()
            .contains("did not finish within 1 s"),
        "{r}"
    );

    // The snapshot is read, not the live volume.
    let before = fleet.save_volume("app-snap", "before.img");
    let r = fleet.sync("app-snap");
    assert_eq!(json_str(&r, "consistency"), "app", "{r}");
    let live = std::fs::read(fleet.volume("app-snap")).expect("volume");
    assert_eq!(
        &live[..8],
        b"XXXXXXXX",
        "the post hook changed the live volume"
    );
    let out = fleet.scratch("snap-restored.img");
    fleet.restore("app-snap", None, &out, None);
    assert_same_file(&out, &before, "the point is the snapshot's content");
    let snap = fleet
        .root()
        .join(AGENT)
        .join("state/snapshots/app-snap.snap");
    assert!(!snap.exists(), "the snapshot is removed after the sync");
    assert_eq!(json_u64(&r, "point"), 1);
}

/// A mounted ext4 file system on a loop device; unmounted (and thawed, should a
/// failed test leave it frozen) on drop, before its loop device is detached.
struct Mounted {
    mount: PathBuf,
    dev: LoopDevice,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze")
            .arg("--unfreeze")
            .arg(&self.mount)
            .stderr(std::process::Stdio::null())
            .status();
        let _ = Command::new("umount").arg(&self.mount).status();
    }
}

/// Runs `cmd`; panics with its output unless it succeeds.
fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Whether a file system on a loop device can be made, mounted, frozen and checked
/// here; where something is missing, the test skips (recorded) and returns.
fn file_systems_here() -> bool {
    loop_devices("freezing a real file system")
        && have_tool("mkfs.ext4", "e2fsprogs")
        && have_tool("e2fsck", "e2fsprogs")
        && have_tool("debugfs", "e2fsprogs")
        && have_tool("mount", "mount")
        && have_tool("fsfreeze", "util-linux")
}

/// A new ext4 file system of 32 MiB on a loop device, mounted in `dir`. Past
/// [`file_systems_here`], any failure is the test's.
fn mounted_fs(dir: &Path) -> Mounted {
    let dev = LoopDevice::over_new_file(&dir.join("fs.backing"), 32 * MIB);
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&dev.dev));
    let mount = dir.join("mnt");
    std::fs::create_dir_all(&mount)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", mount.display()));
    run(Command::new("mount").arg(&dev.dev).arg(&mount));
    Mounted { mount, dev }
}

#[test]
fn fsfreeze_freezes_and_thaws_a_real_file_system() {
    if !file_systems_here() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let fs = mounted_fs(tmp.path());
    std::fs::write(fs.mount.join("data.txt"), b"committed before the point\n").expect("write");
    let dev = fs.dev.dev.clone();
    let fleet = Fleet::builder()
        .node("node-1")
        .agent_source(
            AGENT,
            "fs-disk",
            Some(&dev),
            32 * MIB,
            &format!(
                "fsfreeze = \"{}\"\nhook_timeout = \"30s\"",
                fs.mount.display()
            ),
        )
        .start();
    let r = fleet.sync("fs-disk");
    assert_eq!(json_str(&r, "consistency"), "app", "{r}");
    let log = std::fs::read_to_string(fleet.root().join("logs").join(format!("{AGENT}.log")))
        .expect("agent log");
    assert!(
        log.contains("file system frozen") && log.contains("file system thawed"),
        "{log}"
    );

    // Thawed: writing works at once (a frozen file system would block this).
    let path = fs.mount.join("after.txt");
    let writer = std::thread::spawn(move || {
        std::fs::write(&path, b"after\n").and_then(|()| std::fs::File::open(&path)?.sync_all())
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !writer.is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "the file system is still frozen after the sync"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    writer
        .join()
        .expect("writer")
        .expect("write after the sync");

    // The point holds a clean file system with the file: restore it and fsck it.
    let out = fleet.scratch("fs.img");
    fleet.restore("fs-disk", None, &out, None);
    let fsck = Command::new("e2fsck")
        .args(["-n", "-f"])
        .arg(&out)
        .output()
        .expect("e2fsck");
    assert!(
        fsck.status.success(),
        "the restored file system is not clean: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let listing = Command::new("debugfs")
        .args(["-R", "cat /data.txt"])
        .arg(&out)
        .output()
        .expect("debugfs");
    assert_eq!(
        String::from_utf8_lossy(&listing.stdout),
        "committed before the point\n",
        "{}",
        String::from_utf8_lossy(&listing.stderr)
    );
}
