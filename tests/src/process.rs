//! Child processes: long-running daemons with their output in a log file, and
//! short commands run with a deadline and their output captured.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a daemon may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Environment variables the harness never passes on from the test's own
/// environment (they would change what a daemon or the CLI does).
const SCRUBBED_ENV: [&str; 9] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_METRIC_EXPORT_INTERVAL",
    "BULWARK_FAILPOINTS",
    "BULWARK_COORDINATOR",
    "BULWARK_CA",
    "BULWARK_CERT",
    "BULWARK_KEY",
];

/// Removes the Bulwark variables of the test's environment from `cmd` and turns
/// colours off, so logs can be searched as plain text.
pub fn scrub_env(cmd: &mut Command) {
    for v in SCRUBBED_ENV {
        cmd.env_remove(v);
    }
    cmd.env("NO_COLOR", "1");
}

/// A command line as a shell would show it, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        s.push(' ');
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '"' || c == '\'') {
            s.push_str(&format!("'{a}'"));
        } else {
            s.push_str(&a);
        }
    }
    s
}

/// Sends SIGTERM to `pid`.
#[allow(unsafe_code)]
fn sigterm(pid: u32) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
    // SAFETY: kill(2) takes two integers and touches no memory of this process. The pid
    // is a child of ours that has not been reaped yet, so it cannot have been reused.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Waits for `child` to exit, up to `timeout`. `None` if it is still running.
fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(e) => panic!("waiting for pid {}: {e}", child.id()),
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A command running in the background whose stdout and stderr are being collected.
pub struct Background {
    described: String,
    child: Child,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
}

fn collect(mut r: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

impl Background {
    /// Starts `cmd` with stdin closed and stdout/stderr captured.
    pub fn spawn(mut cmd: Command) -> Background {
        let described = describe(&cmd);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {described}: {e}"));
        let stdout = child.stdout.take().map(collect);
        let stderr = child.stderr.take().map(collect);
        Background {
            described,
            child,
            stdout,
            stderr,
        }
    }

    /// The command line.
    pub fn command(&self) -> &str {
        &self.described
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the command is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the command to exit and returns its output; if it has not exited
    /// within `timeout`, kills it and returns `Err` with what it printed so far.
    pub fn wait(mut self, timeout: Duration) -> Result<Output, String> {
        let status = wait_timeout(&mut self.child, timeout);
        let status = match status {
            Some(s) => Some(s),
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                None
            }
        };
        let stdout = self
            .stdout
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        let stderr = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        match status {
            Some(status) => Ok(Output {
                status,
                stdout,
                stderr,
            }),
            None => Err(format!(
                "`{}` did not finish within {timeout:?} (killed)\n--- stdout ---\n{}\n--- stderr ---\n{}",
                self.described,
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            )),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `cmd` to completion with captured output; panics if it takes longer than
/// `timeout`.
pub fn run(cmd: Command, timeout: Duration) -> Output {
    Background::spawn(cmd)
        .wait(timeout)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Renders an [`Output`] for a failure message.
pub fn show_output(command: &str, out: &Output) -> String {
    format!(
        "command: {command}\nexit: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The last `n` lines of a text file (empty if it cannot be read).
pub fn tail(path: &Path, n: usize) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A daemon started with `--config FILE`, stdout and stderr appended to its log file.
pub struct Daemon {
    name: String,
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    port: Option<u16>,
    child: Option<Child>,
    /// Length of the log when the current process was started: [`Daemon::wait_for_log`]
    /// looks only at what this run wrote.
    log_start: u64,
}

impl Daemon {
    /// A daemon that is not started yet. `port` is the address it listens on, if any.
    pub fn new(name: &str, bin: PathBuf, config: PathBuf, log: PathBuf, port: Option<u16>) -> Self {
        Daemon {
            name: name.to_string(),
            bin,
            config,
            log,
            port,
            child: None,
            log_start: 0,
        }
    }

    /// Its name in the fleet.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its config file.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Its log file (all runs, appended).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The port it listens on, if it listens.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// Says it listens on `port` from its next start (its config says so too).
    pub fn set_port(&mut self, port: Option<u16>) {
        self.port = port;
    }

    /// The pid of the running process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts it without extra environment.
    pub fn start(&mut self) {
        self.start_with_env(&[]);
    }

    /// Starts it with extra environment variables (for this run only; a later
    /// [`Daemon::start`] or [`Daemon::restart`] does not repeat them).
    pub fn start_with_env(&mut self, env: &[(&str, &str)]) {
        assert!(
            self.child.is_none(),
            "{} is already running (pid {:?})",
            self.name,
            self.pid()
        );
        if let Some(dir) = self.log.parent() {
            std::fs::create_dir_all(dir)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        }
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.log.display()));
        let env_text: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(
            log,
            "===== harness: starting {} {} --config {} {}",
            self.name,
            self.bin.display(),
            self.config.display(),
            env_text.join(" ")
        );
        self.log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot duplicate {}: {e}", self.log.display()));
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--config").arg(&self.config);
        scrub_env(&mut cmd);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", describe(&cmd)));
        self.child = Some(child);
    }

    /// Whether the process is running (it was started and has not exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Panics, showing the end of the log, if the process was started and has exited.
    pub fn assert_alive(&mut self) {
        if let Some(c) = self.child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            panic!(
                "{} exited unexpectedly ({status}); end of {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 40)
            );
        }
    }

    /// SIGTERM, then waits up to [`STOP_TIMEOUT`]; returns the exit status. Panics
    /// (after a SIGKILL) if it does not exit in time, or if it was not running.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self
            .child
            .take()
            .unwrap_or_else(|| panic!("stop(): {} is not running", self.name));
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        if let Err(e) = sigterm(child.id()) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("cannot send SIGTERM to {}: {e}", self.name);
        }
        match wait_timeout(&mut child, STOP_TIMEOUT) {
            Some(status) => status,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not exit within {STOP_TIMEOUT:?} of SIGTERM (killed with SIGKILL)",
                    self.name
                );
            }
        }
    }

    /// SIGKILL, and reaps the process.
    pub fn kill9(&mut self) {
        let mut child = self
            .child
            .take()
            .unwrap_or_else(|| panic!("kill9(): {} is not running", self.name));
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Stops it (SIGTERM) and starts it again with the same config; returns the exit
    /// status of the stopped run.
    pub fn restart(&mut self) -> ExitStatus {
        let status = self.stop();
        self.start();
        status
    }

    /// Stops it (SIGTERM) and starts it again with the same config and extra
    /// environment variables for the new run.
    pub fn restart_with_env(&mut self, env: &[(&str, &str)]) -> ExitStatus {
        let status = self.stop();
        self.start_with_env(env);
        status
    }

    /// Waits for the process to exit on its own (up to `timeout`).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self
            .child
            .as_mut()
            .unwrap_or_else(|| panic!("wait_exit(): {} was not started", self.name));
        match wait_timeout(child, timeout) {
            Some(s) => {
                self.child = None;
                s
            }
            None => panic!(
                "{} is still running after {timeout:?}; end of {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 40)
            ),
        }
    }

    /// The whole log, every run.
    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// What the current (or last) run wrote to the log.
    pub fn log_since_start(&self) -> String {
        let mut f = match File::open(&self.log) {
            Ok(f) => f,
            Err(_) => return String::new(),
        };
        let mut buf = Vec::new();
        let _ = f.read_to_end(&mut buf);
        let start = usize::try_from(self.log_start)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        String::from_utf8_lossy(&buf[start..]).into_owned()
    }

    /// Whether any run wrote `pattern` to the log.
    pub fn log_contains(&self, pattern: &str) -> bool {
        self.log_text().contains(pattern)
    }

    /// Waits until the current run has written `pattern` to its log. Panics on
    /// timeout or if the process exits first.
    pub fn wait_for_log(&mut self, pattern: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log_since_start().contains(pattern) {
                return;
            }
            if self.child.is_some() && !self.is_running() {
                // One last look: it may have written the line just before exiting.
                if self.log_since_start().contains(pattern) {
                    return;
                }
                panic!(
                    "{} exited before logging {pattern:?}; end of {}:\n{}",
                    self.name,
                    self.log.display(),
                    tail(&self.log, 60)
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} did not log {pattern:?} within {timeout:?}; end of {}:\n{}",
                    self.name,
                    self.log.display(),
                    tail(&self.log, 60)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs the process if it is running (used on drop).
    pub fn kill_quietly(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill_quietly();
    }
}
