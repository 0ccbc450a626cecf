//! Quiesce: making a recovery point application-consistent.
//!
//! Per data source, in this order, all optional:
//!
//! 1. `pre_snapshot` — a command (run by `/bin/sh -c`) that brings the application to
//!    a consistent state (flush tables, `pg_backup_start`, ...).
//! 2. `fsfreeze` — the mount point of a file system on the volume, frozen with the
//!    `FIFREEZE` ioctl so that its on-disk state is complete and unchanging.
//! 3. `snapshot_command` — makes a point-in-time view (an LVM snapshot, a reflink
//!    copy) that the sync reads instead of the live volume. It is told where to put it
//!    (`BULWARK_SNAPSHOT`) and may print another path as its last line of output.
//!    With a snapshot, the file system is thawed and `post_snapshot` runs at once;
//!    without one, they wait until the sync has read its data.
//! 4. `post_snapshot` — releases the application.
//!
//! Every command gets `BULWARK_SOURCE`, `BULWARK_VOLUME` and `BULWARK_PHASE`
//! (`pre`, `snapshot`, `post`, `cleanup`) in its environment and runs at most
//! `hook_timeout`, after which its whole process group is killed. A hook or freeze
//! that fails makes the point `crash`-consistent with a warning, or fails the sync
//! when `require_app_consistent` is set. `post_snapshot` and the thaw always run once
//! the freeze or pre-hook did.
//!
//! A frozen file system blocks every writer on the host, so the freeze is guarded
//! three ways: it is thawed on every path out of a sync (including errors), a
//! watchdog process started in its own session thaws it after `hook_timeout` even if
//! the agent is killed, and the root file system and the one holding the agent's
//! `state_dir` are refused.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bulwark_common::point::Consistency;

/// What a data source asks for.
#[derive(Debug, Clone, Default)]
pub struct QuiesceConfig {
    pub pre_snapshot: Option<String>,
    pub post_snapshot: Option<String>,
    pub snapshot_command: Option<String>,
    pub snapshot_cleanup: Option<String>,
    pub fsfreeze: Option<PathBuf>,
    pub hook_timeout: Duration,
    pub require_app_consistent: bool,
}

impl QuiesceConfig {
    /// Whether anything is configured at all.
    pub fn is_empty(&self) -> bool {
        self.pre_snapshot.is_none()
            && self.post_snapshot.is_none()
            && self.snapshot_command.is_none()
            && self.fsfreeze.is_none()
    }
}

/// A hook, freeze or snapshot that failed: which command or mount, and why.
#[derive(Debug, thiserror::Error)]
pub enum QuiesceError {
    #[error("{what} hook `{cmd}` could not start: {source}")]
    HookStart {
        what: String,
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} hook `{cmd}` failed ({status}){}", colon_then(.stderr_tail))]
    HookFailed {
        what: String,
        cmd: String,
        status: std::process::ExitStatus,
        /// The last 400 characters of its stderr.
        stderr_tail: String,
    },
    #[error("{what} hook `{cmd}`: {source}")]
    HookIo {
        what: String,
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} hook `{cmd}` did not finish within {secs} s and was killed")]
    HookTimeout {
        what: String,
        cmd: String,
        secs: f64,
    },
    #[error("fsfreeze path {mount} must be absolute")]
    NotAbsolute { mount: PathBuf },
    #[error("fsfreeze {mount}: {source}")]
    Freeze {
        mount: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("fsfreeze {mount} is not a directory")]
    NotDir { mount: PathBuf },
    #[error("cannot stat {path}: {source}")]
    Stat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("fsfreeze {mount} is on the root file system; freezing it would stop this host")]
    RootFs { mount: PathBuf },
    #[error(
        "fsfreeze {mount} holds the agent's state_dir {state_dir}; the agent could not work while it is frozen"
    )]
    HoldsState { mount: PathBuf, state_dir: PathBuf },
    #[error("fsfreeze {mount} is not a mount point (it is on the same file system as {parent})")]
    NotMountPoint { mount: PathBuf, parent: PathBuf },
    #[error("the freeze of {mount} lasted longer than hook_timeout and the watchdog thawed it")]
    Overran { mount: PathBuf },
    #[error("thaw {mount}: {source}")]
    Thaw {
        mount: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The blocking freeze or thaw task panicked or was cancelled.
    #[error("{0}")]
    Task(#[source] tokio::task::JoinError),
    #[error("{cause}; the sync is refused because require_app_consistent = true")]
    Refused {
        #[source]
        cause: Box<QuiesceError>,
    },
    #[error("snapshot_command `{cmd}` succeeded but {path} does not exist")]
    NoSnapshot { cmd: String, path: PathBuf },
}

/// `": text"`, or nothing for no text.
fn colon_then(text: &str) -> String {
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

/// Runs `cmd` with `/bin/sh -c` in its own process group, killing the group after
/// `timeout`. Returns its stdout, or what went wrong with the tail of its stderr.
pub async fn run_hook(
    what: &str,
    cmd: &str,
    env: &[(&str, String)],
    timeout: Duration,
) -> Result<String, QuiesceError> {
    let mut c = tokio::process::Command::new("/bin/sh");
    c.arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    for (k, v) in env {
        c.env(k, v);
    }
    let (what, cmd) = (what.to_string(), cmd.to_string());
    let child = match c.spawn() {
        Ok(child) => child,
        Err(source) => return Err(QuiesceError::HookStart { what, cmd, source }),
    };
    let pid = child.id();
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into()),
        Ok(Ok(out)) => {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: String = err
                .trim()
                .chars()
                .rev()
                .take(400)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            Err(QuiesceError::HookFailed {
                what,
                cmd,
                status: out.status,
                stderr_tail: tail,
            })
        }
        Ok(Err(source)) => Err(QuiesceError::HookIo { what, cmd, source }),
        Err(_) => {
            if let Some(pid) = pid {
                // The whole group: a hook's children must not outlive it.
                kill_group(pid);
            }
            Err(QuiesceError::HookTimeout {
                what,
                cmd,
                secs: timeout.as_secs_f64(),
            })
        }
    }
}

const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// Sends SIGKILL to process group `pgid`.
#[allow(unsafe_code)]
fn kill_group(pgid: u32) {
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is
    // passed.
    unsafe {
        libc::kill(-(pgid as libc::pid_t), libc::SIGKILL);
    }
}

/// FIFREEZE / FITHAW on the file system of `fd`; 0 on success.
#[allow(unsafe_code)]
fn fs_ioctl(fd: std::os::fd::RawFd, request: libc::c_ulong) -> libc::c_int {
    // SAFETY: both requests take an unused integer argument and act on the file
    // system of a valid open descriptor; no memory is passed.
    unsafe { libc::ioctl(fd, request as _, 0) }
}

/// A frozen file system; thawed on drop.
pub struct Freeze {
    mount: PathBuf,
    dir: std::fs::File,
    watchdog: Option<std::process::Child>,
    thawed: bool,
}

/// Checks that `mount` may be frozen by an agent whose state lives in `state_dir`.
pub fn check_freezable(mount: &Path, state_dir: &Path) -> Result<(), QuiesceError> {
    let mount_buf = || mount.to_path_buf();
    if !mount.is_absolute() {
        return Err(QuiesceError::NotAbsolute { mount: mount_buf() });
    }
    let m = std::fs::metadata(mount).map_err(|source| QuiesceError::Freeze {
        mount: mount_buf(),
        source,
    })?;
    if !m.is_dir() {
        return Err(QuiesceError::NotDir { mount: mount_buf() });
    }
    let stat = |path: &Path| {
        std::fs::metadata(path).map_err(|source| QuiesceError::Stat {
            path: path.to_path_buf(),
            source,
        })
    };
    let root = stat(Path::new("/"))?;
    if m.dev() == root.dev() {
        return Err(QuiesceError::RootFs { mount: mount_buf() });
    }
    if let Ok(s) = std::fs::metadata(state_dir)
        && s.dev() == m.dev()
    {
        return Err(QuiesceError::HoldsState {
            mount: mount_buf(),
            state_dir: state_dir.to_path_buf(),
        });
    }
    let parent = mount.parent().unwrap_or(Path::new("/"));
    let p = stat(parent)?;
    if p.dev() == m.dev() && p.ino() != m.ino() {
        return Err(QuiesceError::NotMountPoint {
            mount: mount_buf(),
            parent: parent.to_path_buf(),
        });
    }
    Ok(())
}

impl Freeze {
    /// Freezes the file system mounted at `mount`; a watchdog thaws it after `limit`
    /// if this process cannot.
    pub fn start(mount: &Path, state_dir: &Path, limit: Duration) -> Result<Freeze, QuiesceError> {
        check_freezable(mount, state_dir)?;
        let dir = std::fs::File::open(mount).map_err(|source| QuiesceError::Freeze {
            mount: mount.to_path_buf(),
            source,
        })?;
        // Started before the freeze: after it, exec of a binary on that file system
        // could block. `setsid` keeps it alive if the agent is killed.
        let watchdog = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg("sleep \"$1\"; exec fsfreeze --unfreeze \"$2\" 2>/dev/null")
            .arg("bulwark-thaw-watchdog")
            .arg(limit.as_secs().max(1).to_string())
            .arg(mount)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| tracing::warn!("cannot start the thaw watchdog: {e}"))
            .ok();
        use std::os::fd::AsRawFd;
        let r = fs_ioctl(dir.as_raw_fd(), FIFREEZE);
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if let Some(mut w) = watchdog {
                let _ = w.kill();
                let _ = w.wait();
            }
            return Err(QuiesceError::Freeze {
                mount: mount.to_path_buf(),
                source: e,
            });
        }
        tracing::info!(mount = %mount.display(), "file system frozen");
        Ok(Freeze {
            mount: mount.to_path_buf(),
            dir,
            watchdog,
            thawed: false,
        })
    }

    /// Thaws it; returns an error if the thaw failed (for example, the watchdog
    /// thawed it first because the freeze lasted too long).
    pub fn thaw(&mut self) -> Result<(), QuiesceError> {
        if self.thawed {
            return Ok(());
        }
        self.thawed = true;
        use std::os::fd::AsRawFd;
        let r = fs_ioctl(self.dir.as_raw_fd(), FITHAW);
        let watchdog_done = match self.watchdog.take() {
            Some(mut w) => {
                let done = matches!(w.try_wait(), Ok(Some(_)));
                let _ = w.kill();
                let _ = w.wait();
                done
            }
            None => false,
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            let mount = self.mount.clone();
            return Err(if watchdog_done {
                QuiesceError::Overran { mount }
            } else {
                QuiesceError::Thaw { mount, source: e }
            });
        }
        tracing::info!(mount = %self.mount.display(), "file system thawed");
        Ok(())
    }
}

impl Drop for Freeze {
    fn drop(&mut self) {
        if let Err(e) = self.thaw() {
            tracing::warn!("{e}");
        }
    }
}

/// A quiesced data source: what to read and what is still to be released.
pub struct Quiesced {
    cfg: QuiesceConfig,
    env: Vec<(&'static str, String)>,
    pub consistency: Consistency,
    pub warnings: Vec<String>,
    /// The point-in-time view to read, when a snapshot was made.
    pub snapshot: Option<PathBuf>,
    /// Where snapshot_command is asked to put it; removed afterwards when it is
    /// there and no snapshot_cleanup is set.
    default_snapshot: PathBuf,
    freeze: Option<Freeze>,
    post_pending: bool,
    released: bool,
}

impl Quiesced {
    /// Nothing configured: a crash-consistent point of the live volume.
    pub fn none() -> Quiesced {
        Quiesced {
            cfg: QuiesceConfig::default(),
            env: Vec::new(),
            consistency: Consistency::Crash,
            warnings: Vec::new(),
            snapshot: None,
            default_snapshot: PathBuf::new(),
            freeze: None,
            post_pending: false,
            released: true,
        }
    }

    fn problem(&mut self, why: QuiesceError) -> Result<(), QuiesceError> {
        if self.cfg.require_app_consistent {
            return Err(QuiesceError::Refused {
                cause: Box::new(why),
            });
        }
        tracing::warn!("{why}; this point will be crash-consistent only");
        self.consistency = Consistency::Crash;
        self.warnings.push(why.to_string());
        Ok(())
    }

    /// Runs the pre-hook, freezes and snapshots as configured.
    pub async fn begin(
        cfg: &QuiesceConfig,
        source: &str,
        volume: &Path,
        state_dir: &Path,
    ) -> Result<Quiesced, QuiesceError> {
        if cfg.is_empty() {
            return Ok(Quiesced::none());
        }
        let mut q = Quiesced {
            cfg: cfg.clone(),
            env: vec![
                ("BULWARK_SOURCE", source.to_string()),
                ("BULWARK_VOLUME", volume.display().to_string()),
            ],
            consistency: Consistency::App,
            warnings: Vec::new(),
            snapshot: None,
            default_snapshot: state_dir.join("snapshots").join(format!("{source}.snap")),
            freeze: None,
            post_pending: false,
            released: false,
        };
        let timeout = cfg.hook_timeout;
        // post_snapshot runs once whatever happens below (even after a failed
        // pre-hook, which may have done half its work).
        q.post_pending = cfg.post_snapshot.is_some();
        if let Some(cmd) = &cfg.pre_snapshot
            && let Err(e) = run_hook("pre_snapshot", cmd, &q.env_with("pre"), timeout).await
            && let Err(e) = q.problem(e)
        {
            q.release().await;
            return Err(e);
        }
        if let Some(mount) = &cfg.fsfreeze {
            let (mount, state_dir) = (mount.clone(), state_dir.to_path_buf());
            let frozen =
                tokio::task::spawn_blocking(move || Freeze::start(&mount, &state_dir, timeout))
                    .await
                    .map_err(QuiesceError::Task)
                    .and_then(|r| r);
            match frozen {
                Ok(f) => q.freeze = Some(f),
                Err(e) => {
                    if let Err(e) = q.problem(e) {
                        q.release().await;
                        return Err(e);
                    }
                }
            }
        }
        if let Some(cmd) = &cfg.snapshot_command {
            let default = q.default_snapshot.clone();
            if let Some(dir) = default.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            let mut env = q.env_with("snapshot");
            env.push(("BULWARK_SNAPSHOT", default.display().to_string()));
            match run_hook("snapshot_command", cmd, &env, timeout).await {
                Ok(out) => {
                    let printed = out
                        .lines()
                        .rev()
                        .find(|l| !l.trim().is_empty())
                        .map(|l| PathBuf::from(l.trim()));
                    let path = printed.unwrap_or(default);
                    if path.exists() {
                        q.snapshot = Some(path);
                    } else {
                        let why = QuiesceError::NoSnapshot {
                            cmd: cmd.clone(),
                            path,
                        };
                        q.release().await;
                        return Err(why);
                    }
                }
                Err(e) => {
                    // Without its snapshot the sync reads the live volume.
                    if let Err(e) = q.problem(e) {
                        q.release().await;
                        return Err(e);
                    }
                }
            }
            // The view is fixed: let the application go at once.
            q.release().await;
        }
        Ok(q)
    }

    /// Whether a read of the live volume from now on would happen after the
    /// application was released (the point could no longer be `app`).
    pub fn live_view_released(&self) -> bool {
        self.released && self.snapshot.is_none() && self.consistency == Consistency::App
    }

    /// Records that the point cannot be `app`-consistent after all.
    pub fn downgrade(&mut self, why: String) {
        tracing::warn!("{why}; this point is crash-consistent only");
        self.consistency = Consistency::Crash;
        self.warnings.push(why);
    }

    fn env_with(&self, phase: &str) -> Vec<(&'static str, String)> {
        let mut e = self.env.clone();
        e.push(("BULWARK_PHASE", phase.to_string()));
        e
    }

    /// Thaws and runs the post-hook (once). A failure here downgrades the point.
    pub async fn release(&mut self) {
        if self.released {
            return;
        }
        self.released = true;
        if let Some(mut f) = self.freeze.take() {
            let r = tokio::task::spawn_blocking(move || f.thaw())
                .await
                .map_err(QuiesceError::Task)
                .and_then(|r| r);
            if let Err(e) = r {
                // Released anyway: the point read during the freeze may have been
                // read after it ended.
                self.consistency = Consistency::Crash;
                tracing::warn!("{e}; this point is crash-consistent only");
                self.warnings.push(e.to_string());
            }
        }
        if std::mem::take(&mut self.post_pending)
            && let Some(cmd) = self.cfg.post_snapshot.clone()
            && let Err(e) = run_hook(
                "post_snapshot",
                &cmd,
                &self.env_with("post"),
                self.cfg.hook_timeout,
            )
            .await
        {
            tracing::warn!("{e}");
            self.warnings.push(e.to_string());
        }
    }

    /// Releases (if not yet) and removes the snapshot.
    pub async fn finish(&mut self) {
        self.release().await;
        let Some(snap) = self.snapshot.take() else {
            return;
        };
        if let Some(cmd) = self.cfg.snapshot_cleanup.clone() {
            let mut env = self.env_with("cleanup");
            env.push(("BULWARK_SNAPSHOT", snap.display().to_string()));
            if let Err(e) = run_hook("snapshot_cleanup", &cmd, &env, self.cfg.hook_timeout).await {
                tracing::warn!("{e}");
            }
        } else if snap == self.default_snapshot
            && snap.is_file()
            && let Err(e) = std::fs::remove_file(&snap)
        {
            tracing::warn!("cannot remove snapshot {}: {e}", snap.display());
        }
    }
}
