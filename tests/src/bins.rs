//! Building and locating the Bulwark binaries that the tests start.
//!
//! Every test process (nextest runs each test in its own) calls [`bin_dir`], which
//! runs `cargo build --bins` for the three service packages and the CLI once per
//! process, under a file lock in the target directory so that parallel test
//! processes build one at a time (the later ones find everything fresh and return
//! at once).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The coordinator daemon.
pub const COORDINATOR: &str = "bulwark-coordinator";
/// The storage node daemon.
pub const NODE: &str = "bulwark-node";
/// The agent daemon.
pub const AGENT: &str = "bulwark-agent";
/// The admin CLI.
pub const CLI: &str = "bulwark";

/// Packages whose binaries the tests need.
const PACKAGES: [&str; 4] = [
    "bulwark-coordinator",
    "bulwark-node",
    "bulwark-agent",
    "bulwark-cli",
];

/// Set to any value to skip the build (the binaries are already built).
pub const SKIP_BUILD_ENV: &str = "BULWARK_E2E_SKIP_BUILD";

static BUILT: OnceLock<PathBuf> = OnceLock::new();

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent directory")
        .to_path_buf()
}

/// `target/<profile>`: the directory the test binary was built for. The test binary
/// itself lives in `target/<profile>/deps/` (an example in `.../examples/`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("the test binary is in a directory");
    // `deps/` for tests, `examples/` for the load test under bench/.
    if dir
        .file_name()
        .is_some_and(|n| n == "deps" || n == "examples")
    {
        dir.parent()
            .expect("deps/ has a parent directory")
            .to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// The cargo flags that select the profile the test binary was built with.
fn profile_args(profile_dir: &Path) -> Vec<String> {
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("release") => vec!["--release".into()],
        Some("debug") | None => vec![],
        Some(other) => vec!["--profile".into(), other.into()],
    }
}

/// The directory holding the built binaries; builds them on first use in this
/// process.
pub fn bin_dir() -> &'static Path {
    BUILT.get_or_init(|| {
        let dir = profile_dir();
        if std::env::var_os(SKIP_BUILD_ENV).is_none() {
            build(&dir);
        }
        dir
    })
}

/// The path of binary `name`, built if needed.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "binary {} does not exist after `cargo build --bins -p {}`",
        p.display(),
        PACKAGES.join(" -p ")
    );
    p
}

fn build(profile_dir: &Path) {
    std::fs::create_dir_all(profile_dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", profile_dir.display()));
    let lock_path = profile_dir.join(".bulwark-e2e-build.lock");
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", lock_path.display()));
    // flock(LOCK_EX): one test process builds at a time; released when `lock` drops.
    lock.lock()
        .unwrap_or_else(|e| panic!("cannot lock {}: {e}", lock_path.display()));

    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(workspace_root()).args(["build", "--bins"]);
    // Cargo gives this test process CARGO_MANIFEST_DIR, CARGO_PKG_* and the like. Build
    // scripts that read them (ring's does) would see another value than in a plain
    // `cargo build`, and every dependency above them would be rebuilt each time.
    for (key, _) in std::env::vars_os() {
        if let Some(k) = key.to_str()
            && k.starts_with("CARGO_")
            && k != "CARGO_HOME"
            && !k.starts_with("CARGO_BUILD_")
            && !k.starts_with("CARGO_PROFILE_")
            && !k.starts_with("CARGO_REGISTRIES_")
            && !k.starts_with("CARGO_NET_")
        {
            cmd.env_remove(k);
        }
    }
    for p in PACKAGES {
        cmd.args(["-p", p]);
    }
    cmd.args(profile_args(profile_dir));
    if let Some(target_dir) = profile_dir.parent() {
        cmd.arg("--target-dir").arg(target_dir);
    }
    let described = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {described}: {e}"));
    assert!(
        out.status.success(),
        "building the binaries failed ({}): {described}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    drop(lock);
}
