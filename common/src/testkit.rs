//! For tests only (every crate's unit tests and the end-to-end tests): a skipped test
//! says so in one fixed form, so that a run can list its skips and CI can refuse a
//! skip of something it is equipped for (`.ci/test`, `.ci/run`).
//!
//! The line is `BULWARK-SKIP <test> facility=<facility>: <reason>`, on stderr, and
//! appended to the file named by `BULWARK_SKIP_LOG` when that is set. `<test>` is the
//! name of the calling thread, which libtest and nextest name after the test; a skip
//! decided on another thread names that thread instead. `<facility>` is one word: the
//! tool, device or privilege that is missing (`qemu-io`, `loop-device`, `root`, ...).

use std::io::Write;

/// The environment variable naming the file every skip line is appended to.
pub const SKIP_LOG_ENV: &str = "BULWARK_SKIP_LOG";

/// The skip line for `test`, without its newline. A facility is one word (spaces
/// become `-`), and the line is one line (newlines in the reason become spaces).
pub fn skip_line(test: &str, facility: &str, reason: &str) -> String {
    let facility: String = facility
        .trim()
        .chars()
        .map(|c| if c.is_whitespace() { '-' } else { c })
        .collect();
    let reason = reason.replace(['\n', '\r'], " ");
    format!("BULWARK-SKIP {test} facility={facility}: {}", reason.trim())
}

/// Says that the calling test skips because `facility` is missing, and why: prints
/// the skip line to stderr and appends it to `$BULWARK_SKIP_LOG` when set. The caller
/// then returns. A log that cannot be written is a panic: a skip that cannot be
/// recorded would pass silently.
pub fn skip(facility: &str, reason: &str) {
    let test = std::thread::current()
        .name()
        .map_or_else(|| "<unnamed thread>".to_string(), str::to_string);
    let line = skip_line(&test, facility, reason);
    eprintln!("{line}");
    if let Some(path) = std::env::var_os(SKIP_LOG_ENV)
        && let Err(e) = append_line(std::path::Path::new(&path), &line)
    {
        panic!(
            "cannot append the skip line to {}: {e}",
            path.to_string_lossy()
        );
    }
}

/// Appends `line` and a newline to `path` in one `write` on a file opened with
/// `O_APPEND`, so that lines from test processes running side by side do not
/// interleave.
pub fn append_line(path: &std::path::Path, line: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let buf = format!("{line}\n");
    let n = f.write(buf.as_bytes())?;
    if n != buf.len() {
        return Err(std::io::Error::other(format!(
            "short write: {n} of {} bytes",
            buf.len()
        )));
    }
    Ok(())
}

/// Whether `tool` is installed: an executable file of that name in a directory of
/// `PATH` (where [`std::process::Command`] finds it too).
pub fn on_path(tool: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            std::fs::metadata(d.join(tool))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// Whether `tool` is installed ([`on_path`]). Where it is not, the calling test
/// skips: this records the skip with `tool` as the facility and `package` as where
/// it comes from, and the caller returns. (A tool that is installed but fails is
/// the test's failure, not a skip.)
pub fn have_tool(tool: &str, package: &str) -> bool {
    let found = on_path(tool);
    if !found {
        skip(tool, &format!("{tool} is not installed ({package})"));
    }
    found
}

/// Whether this process runs as root; where it does not, the calling test skips
/// (facility `root`) because `needs` and the caller returns.
pub fn have_root(needs: &str) -> bool {
    let root = euid() == 0;
    if !root {
        skip("root", &format!("not running as root, and {needs}"));
    }
    root
}

/// The effective user id of this process.
#[allow(unsafe_code)]
fn euid() -> u32 {
    // SAFETY: geteuid(2) takes no arguments, touches no memory and cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_has_one_fixed_form() {
        assert_eq!(
            skip_line("m::t", "qemu-io", "qemu-io is not installed (qemu-utils)"),
            "BULWARK-SKIP m::t facility=qemu-io: qemu-io is not installed (qemu-utils)"
        );
        assert_eq!(
            skip_line("t", " loop device ", "no\nloop devices\n"),
            "BULWARK-SKIP t facility=loop-device: no loop devices"
        );
    }

    #[test]
    fn finds_tools_on_path() {
        assert!(on_path("sh"), "sh is on PATH wherever tests run");
        assert!(!on_path("bulwark-no-such-tool"));
    }

    #[test]
    fn lines_from_many_writers_stay_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("skips.log");
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..200 {
                        let line =
                            skip_line(&format!("t{t}"), "x", &format!("{i} {}", "y".repeat(300)));
                        append_line(&log, &line).expect("append");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("writer thread");
        }
        let text = std::fs::read_to_string(&log).expect("read the log");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 8 * 200);
        for l in lines {
            assert!(l.starts_with("BULWARK-SKIP t"), "torn line: {l}");
            assert!(l.ends_with(&"y".repeat(300)), "torn line: {l}");
        }
    }
}
