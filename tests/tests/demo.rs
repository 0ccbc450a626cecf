//! `bulwark demo`, the first command of README, runs a whole fleet and exits 0.

use std::process::Command;
use std::time::Duration;

use bulwark_tests::bins::{self, CLI};
use bulwark_tests::process::{describe, run, scrub_env, show_output};

#[test]
fn the_demo_runs_start_to_finish() {
    let mut cmd = Command::new(bins::bin(CLI));
    scrub_env(&mut cmd);
    cmd.arg("demo");
    let described = describe(&cmd);
    let out = run(cmd, Duration::from_secs(300));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && stdout.contains("Deep consistency check")
            && stdout.contains("Demo finished: every restored point matched"),
        "{}",
        show_output(&described, &out)
    );
}
