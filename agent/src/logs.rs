//! Log sources: ship the bytes appended to a directory's log files since the node's
//! last acknowledged offset of each, and restore a log point into a directory.
//!
//! The agent keeps no record of what it shipped: at each ship the node sends its
//! record of every file (length, identity, modification time, and BLAKE3 of the
//! first and last 4 KiB it holds). Per host file matching the glob:
//!
//! - unknown to the node: sent whole;
//! - a different file (device or inode) than the one shipped under that name: it
//!   was **rotated**: sent anew;
//! - shorter than the node's copy: **truncated**: sent anew;
//! - same size and modification time: nothing is read;
//! - otherwise the two 4 KiB anchors are read and compared: a mismatch means the
//!   shipped part was **rewritten**: sent anew; else only the bytes past the node's
//!   length are read and sent.
//!
//! "Sent anew" starts a new generation of the file on the node (older points keep
//! the old one) and is reported as a warning, which the coordinator raises as an
//! alert. A rewrite in the middle of the shipped part that leaves both anchors alone
//! is not seen; files that disappear from the host are reported gone and stay on
//! the node until retention drops them.

use bulwark_common::telemetry::TracedChannel;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use bulwark_proto as pb;
use bulwark_proto::node_client::NodeClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Bytes hashed at each end of a shipped file (the node's `ANCHOR_LEN`).
const ANCHOR_LEN: u64 = 4096;
/// Largest piece sent in one message.
const PIECE: u64 = 1 << 20;

/// A log glob `agent.toml` cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GlobError {
    #[error("is empty")]
    Empty,
    #[error("matches file names in the directory only: it may not contain /")]
    Slash,
    #[error("\"{0}\" has a [ with no closing ]")]
    Unclosed(String),
}

/// A ship or a log restore that failed: which file, or what the node did.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot stat {path}: {source}")]
    Stat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} was replaced while it was being shipped; the next ship sends it")]
    Replaced { path: PathBuf },
    #[error("cannot list {path}: {source}")]
    List {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the node closed the ship")]
    Closed,
    #[error("node refused the ship: {}", .0.message())]
    ShipRefused(#[source] tonic::Status),
    /// The node's stream failed: its message.
    #[error("{}", .0.message())]
    Node(#[source] tonic::Status),
    #[error("the node did not answer the ship with its manifest")]
    NoManifest,
    #[error("log reader failed: {0}")]
    Reader(#[source] tokio::task::JoinError),
    #[error("the node ended the ship without committing it")]
    NotCommitted,
    #[error("node refused the log restore: {}", .0.message())]
    RestoreRefused(#[source] tonic::Status),
    #[error("the node's log restore did not start with its point")]
    NoPoint,
    #[error("the node sent log data before any file")]
    DataBeforeFile,
    #[error("the node sent two points")]
    TwoPoints,
    #[error("cannot fsync {path}: {source}")]
    Fsync {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("log writer failed: {0}")]
    Writer(#[source] tokio::task::JoinError),
    #[error("{path} is not empty: restore into a new or empty directory")]
    NotEmpty { path: PathBuf },
    #[error("cannot create {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot use {path}: {source}")]
    Use {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the node sent a bad log file name {0:?}")]
    BadName(String),
    #[error(
        "{path} at byte {at}: the data does not match its checksum; nothing was renamed into place"
    )]
    Checksum { path: PathBuf, at: u64 },
    #[error("{path}: the node sent more than the {length} bytes it announced")]
    TooLong { path: PathBuf, length: u64 },
    #[error("{path}: the node sent {at} of {length} bytes")]
    Short { path: PathBuf, at: u64, length: u64 },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot rename into {path}: {source}")]
    Rename {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A [`LogError`] variant with `path` and an io error as its source.
fn io_err(
    make: fn(PathBuf, std::io::Error) -> LogError,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |e| make(path.to_path_buf(), e)
}

/// What a ship did.
#[derive(Debug, Clone, Default)]
pub struct ShipOutcome {
    pub point: pb::Point,
    /// Bytes sent and files that got any.
    pub bytes_sent: u64,
    pub files_sent: u64,
    /// Bytes read on the host (the bytes sent plus the anchors compared).
    pub bytes_read: u64,
    /// Files matching the glob.
    pub files_scanned: u64,
    pub duration_ms: u64,
    /// Files sent anew (rotated, truncated, rewritten), one line each.
    pub warnings: Vec<String>,
}

/// Whether `name` matches a shell-style `pattern`: `*` any run, `?` one
/// character, `[abc]`, `[a-z]`, `[!x]` one of (or none of) a set. As in a shell, a
/// leading `.` is matched only by a pattern that starts with `.`.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    if name.starts_with('.') && !pattern.starts_with('.') {
        return false;
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() {
            match p[pi] {
                '*' => {
                    star = Some((pi, ni));
                    pi += 1;
                    continue;
                }
                '?' => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                '[' => {
                    if let Some((matched, len)) = class_match(&p[pi..], n[ni])
                        && matched
                    {
                        pi += len;
                        ni += 1;
                        continue;
                    }
                }
                c if c == n[ni] => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, sn)) => {
                pi = sp + 1;
                ni = sn + 1;
                star = Some((sp, sn + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Matches `c` against the class at the start of `p` (`[...]`); returns whether it
/// matched and the class's length, or `None` when `p` holds no closed class.
fn class_match(p: &[char], c: char) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = matches!(p.get(i), Some('!') | Some('^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    while i < p.len() {
        if p[i] == ']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
            if p[i] <= c && c <= p[i + 2] {
                matched = true;
            }
            i += 3;
        } else {
            if p[i] == c {
                matched = true;
            }
            i += 1;
        }
    }
    None
}

/// Checks a glob for `agent.toml`: one path component, classes closed.
pub fn check_glob(pattern: &str) -> Result<(), GlobError> {
    if pattern.is_empty() {
        return Err(GlobError::Empty);
    }
    if pattern.contains('/') {
        return Err(GlobError::Slash);
    }
    let p: Vec<char> = pattern.chars().collect();
    let mut i = 0;
    while i < p.len() {
        if p[i] == '[' {
            match class_match(&p[i..], 'x') {
                Some((_, len)) => i += len,
                None => return Err(GlobError::Unclosed(pattern.to_string())),
            }
        } else {
            i += 1;
        }
    }
    Ok(())
}

/// A host file matching the glob, as found.
struct HostFile {
    name: String,
    path: PathBuf,
    /// Opened on first read only: an unchanged file is never opened.
    file: std::cell::OnceCell<File>,
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
}

fn mtime_ns(m: &std::fs::Metadata) -> i64 {
    m.mtime().saturating_mul(1_000_000_000) + m.mtime_nsec()
}

impl HostFile {
    /// The file, opened now if it was not; refused if the name no longer leads to
    /// the file that was looked at (replaced in between: the next ship sends it).
    fn open(&self) -> Result<&File, LogError> {
        if let Some(f) = self.file.get() {
            return Ok(f);
        }
        let f = File::open(&self.path).map_err(io_err(
            |path, source| LogError::Open { path, source },
            &self.path,
        ))?;
        let m = f.metadata().map_err(io_err(
            |path, source| LogError::Stat { path, source },
            &self.path,
        ))?;
        if (m.dev(), m.ino()) != (self.dev, self.ino) {
            return Err(LogError::Replaced {
                path: self.path.clone(),
            });
        }
        Ok(self.file.get_or_init(|| f))
    }
}

/// The regular files of `dir` matching `glob` (not opened), sorted by name.
fn scan(dir: &Path, glob: &str) -> Result<Vec<HostFile>, LogError> {
    let list = |path, source| LogError::List { path, source };
    let entries = std::fs::read_dir(dir).map_err(io_err(list, dir))?;
    let mut out = Vec::new();
    for e in entries {
        let e = e.map_err(io_err(list, dir))?;
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            tracing::warn!(file = ?e.file_name(), "skipping a log file whose name is not UTF-8");
            continue;
        };
        if !glob_match(glob, &name) {
            continue;
        }
        let path = e.path();
        // Not following links: a link could lead the agent out of the directory.
        // Deleted between listing and looking: it is gone.
        let m = match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => m,
            _ => continue,
        };
        out.push(HostFile {
            name,
            path,
            file: std::cell::OnceCell::new(),
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime_ns: mtime_ns(&m),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn read_at(f: &HostFile, offset: u64, len: u64) -> Result<Vec<u8>, LogError> {
    let mut buf = vec![0u8; len as usize];
    f.open()?.read_exact_at(&mut buf, offset).map_err(io_err(
        |path, source| LogError::Read { path, source },
        &f.path,
    ))?;
    Ok(buf)
}

fn anchor_hash(f: &HostFile, start: u64, len: u64) -> Result<Vec<u8>, LogError> {
    if len == 0 {
        return Ok(Vec::new());
    }
    Ok(blake3::hash(&read_at(f, start, len)?).as_bytes().to_vec())
}

/// What to do with one host file.
#[derive(Debug, PartialEq, Eq)]
enum Action {
    /// Nothing changed: not read.
    Skip,
    /// Send bytes `[from, size)` (maybe none: the record's mtime is refreshed).
    Append { from: u64 },
    /// Send it whole as a new generation, for this reason (empty = a new file).
    Restart { why: String },
}

/// Decides, reading at most the two anchors (counted into `read`).
fn decide(
    f: &HostFile,
    known: Option<&pb::LogFileState>,
    read: &mut u64,
) -> Result<Action, LogError> {
    let Some(k) = known else {
        return Ok(Action::Restart { why: String::new() });
    };
    if (f.dev, f.ino) != (k.dev, k.ino) {
        return Ok(Action::Restart {
            why: "rotated: another file now has this name".into(),
        });
    }
    if f.size < k.length {
        return Ok(Action::Restart {
            why: format!(
                "truncated: it has {} bytes, {} were shipped",
                f.size, k.length
            ),
        });
    }
    if f.size == k.length && f.mtime_ns == k.mtime_ns && !k.gone {
        return Ok(Action::Skip);
    }
    let n = k.length.min(ANCHOR_LEN);
    let head = anchor_hash(f, 0, n)?;
    let tail = anchor_hash(f, k.length - n, n)?;
    *read += 2 * n;
    if head != k.head_hash.as_ref() || tail != k.tail_hash.as_ref() {
        return Ok(Action::Restart {
            why: "rewritten: the bytes already shipped changed".into(),
        });
    }
    Ok(Action::Append { from: k.length })
}

/// Ships the new bytes of log source `name` (directory `dir`) to its node.
pub async fn ship(
    name: &str,
    dir: &Path,
    glob: &str,
    a: &pb::Assignment,
    mut node: NodeClient<TracedChannel>,
) -> Result<ShipOutcome, LogError> {
    use pb::log_message::Msg;
    let started = Instant::now();
    let (tx, rx) = mpsc::channel::<pb::LogMessage>(4);
    let send = |tx: &mpsc::Sender<pb::LogMessage>, m: Msg| {
        let tx = tx.clone();
        async move {
            tx.send(pb::LogMessage { msg: Some(m) })
                .await
                .map_err(|_| LogError::Closed)
        }
    };
    send(
        &tx,
        Msg::Begin(pb::LogBegin {
            source: name.to_string(),
            epoch: a.epoch,
        }),
    )
    .await?;
    let mut replies = node
        .ship_log(ReceiverStream::new(rx))
        .await
        .map_err(LogError::ShipRefused)?
        .into_inner();
    let mut manifest: HashMap<String, pb::LogFileState> = HashMap::new();
    loop {
        match replies.message().await.map_err(LogError::Node)? {
            Some(pb::LogReply {
                msg: Some(pb::log_reply::Msg::Manifest(m)),
            }) => manifest.extend(m.files.into_iter().map(|f| (f.name.clone(), f))),
            Some(pb::LogReply {
                msg: Some(pb::log_reply::Msg::Ready(_)),
            }) => break,
            _ => return Err(LogError::NoManifest),
        }
    }
    // The reading runs on a blocking thread and feeds the stream; its result says
    // what it did.
    let (dir, glob, txr) = (dir.to_path_buf(), glob.to_string(), tx.clone());
    let reader = tokio::task::spawn_blocking(move || read_and_send(&dir, &glob, &manifest, &txr));
    let outcome = match reader.await {
        Ok(r) => r,
        Err(e) => Err(LogError::Reader(e)),
    };
    let mut o = match outcome {
        Ok(o) => o,
        Err(e) => {
            // Whatever the node says is the better explanation.
            drop(tx);
            if let Err(s) = replies.message().await {
                return Err(LogError::Node(s));
            }
            return Err(e);
        }
    };
    let gone = std::mem::take(&mut o.1);
    send(&tx, Msg::Commit(pb::LogCommit { gone })).await?;
    drop(tx);
    let point = match replies.message().await.map_err(LogError::Node)? {
        Some(pb::LogReply {
            msg: Some(pb::log_reply::Msg::Committed(c)),
        }) => c.point.unwrap_or_default(),
        _ => return Err(LogError::NotCommitted),
    };
    let mut out = o.0;
    out.point = point;
    out.duration_ms = started.elapsed().as_millis() as u64;
    Ok(out)
}

/// Scans, decides, reads and sends; returns the outcome so far and the names the
/// host no longer has.
fn read_and_send(
    dir: &Path,
    glob: &str,
    manifest: &HashMap<String, pb::LogFileState>,
    tx: &mpsc::Sender<pb::LogMessage>,
) -> Result<(ShipOutcome, Vec<String>), LogError> {
    use pb::log_message::Msg;
    let send = |m: Msg| {
        tx.blocking_send(pb::LogMessage { msg: Some(m) })
            .map_err(|_| LogError::Closed)?;
        bulwark_common::failpoint::hit("agent-mid-ship");
        Ok(())
    };
    let files = scan(dir, glob)?;
    let mut o = ShipOutcome {
        files_scanned: files.len() as u64,
        ..Default::default()
    };
    let present: std::collections::HashSet<&str> = files.iter().map(|f| f.name.as_str()).collect();
    let gone: Vec<String> = manifest
        .values()
        .filter(|k| !k.gone && !present.contains(k.name.as_str()))
        .map(|k| k.name.clone())
        .collect();
    for f in &files {
        let known = manifest.get(&f.name);
        let from = match decide(f, known, &mut o.bytes_read)? {
            Action::Skip => continue,
            Action::Append { from } => {
                send(Msg::File(pb::LogFile {
                    name: f.name.clone(),
                    offset: from,
                    restart: false,
                    dev: f.dev,
                    ino: f.ino,
                    mtime_ns: f.mtime_ns,
                    reason: String::new(),
                }))?;
                from
            }
            Action::Restart { why } => {
                if !why.is_empty() {
                    let generation = known.map_or(1, |k| k.generation + 1);
                    tracing::warn!(file = %f.name, generation, "log file {why}; sending it anew");
                    o.warnings
                        .push(format!("log file {} {why}; sent anew", f.name));
                }
                send(Msg::File(pb::LogFile {
                    name: f.name.clone(),
                    offset: 0,
                    restart: known.is_some(),
                    dev: f.dev,
                    ino: f.ino,
                    mtime_ns: f.mtime_ns,
                    reason: why,
                }))?;
                0
            }
        };
        let mut at = from;
        while at < f.size {
            let n = PIECE.min(f.size - at);
            let data = read_at(f, at, n)?;
            o.bytes_read += n;
            o.bytes_sent += n;
            let checksum = blake3::hash(&data).as_bytes().to_vec();
            send(Msg::Data(pb::LogData {
                data: data.into(),
                checksum: checksum.into(),
            }))?;
            at += n;
        }
        if f.size > from || known.is_none() {
            o.files_sent += 1;
        }
    }
    Ok((o, gone))
}

/// What a log restore wrote.
#[derive(Debug, Clone)]
pub struct LogRestoreOutcome {
    pub point: pb::Point,
    pub files: u64,
    pub bytes_written: u64,
}

/// Writes the files of log point `point` (0 = newest) of `source` into `dir`,
/// which must not exist or be empty. Each file is written as
/// `.NAME.bulwark-partial`, every piece checked against its BLAKE3, made durable,
/// and renamed when whole.
pub async fn restore_logs(
    source: &str,
    point: u64,
    dir: &Path,
    mut node: NodeClient<TracedChannel>,
) -> Result<LogRestoreOutcome, LogError> {
    prepare_dir(dir)?;
    let mut stream = node
        .restore_log(pb::NodeRestoreRequest {
            source: source.to_string(),
            point,
        })
        .await
        .map_err(LogError::RestoreRefused)?
        .into_inner();
    let p = match stream.message().await.map_err(LogError::Node)? {
        Some(pb::LogChunk {
            msg: Some(pb::log_chunk::Msg::Point(p)),
        }) => p,
        _ => return Err(LogError::NoPoint),
    };
    let mut out = LogRestoreOutcome {
        point: p,
        files: 0,
        bytes_written: 0,
    };
    let (tx, mut rx) = mpsc::channel::<pb::log_chunk::Msg>(4);
    let d = dir.to_path_buf();
    let writer = tokio::task::spawn_blocking(move || {
        let mut cur: Option<Writing> = None;
        let mut files = 0u64;
        let mut bytes = 0u64;
        while let Some(m) = rx.blocking_recv() {
            match m {
                pb::log_chunk::Msg::File(h) => {
                    if let Some(w) = cur.take() {
                        w.finish()?;
                    }
                    cur = Some(Writing::new(&d, h)?);
                    files += 1;
                }
                pb::log_chunk::Msg::Data(data) => {
                    let w = cur.as_mut().ok_or(LogError::DataBeforeFile)?;
                    w.write(&data)?;
                    bytes += data.data.len() as u64;
                }
                pb::log_chunk::Msg::Point(_) => return Err(LogError::TwoPoints),
            }
        }
        if let Some(w) = cur.take() {
            w.finish()?;
        }
        File::open(&d)
            .and_then(|f| f.sync_all())
            .map_err(io_err(|path, source| LogError::Fsync { path, source }, &d))?;
        Ok::<_, LogError>((files, bytes))
    });
    let received = async {
        while let Some(c) = stream.message().await.map_err(LogError::Node)? {
            if let Some(m) = c.msg
                && tx.send(m).await.is_err()
            {
                break;
            }
        }
        Ok::<_, LogError>(())
    }
    .await;
    drop(tx);
    let written = writer.await.map_err(LogError::Writer)?;
    let (files, bytes) = written?;
    received?;
    out.files = files;
    out.bytes_written = bytes;
    Ok(out)
}

/// Creates `dir`, or accepts it empty.
pub fn prepare_dir(dir: &Path) -> Result<(), LogError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(LogError::NotEmpty {
                    path: dir.to_path_buf(),
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir_all(dir).map_err(
            io_err(|path, source| LogError::Create { path, source }, dir),
        ),
        Err(source) => Err(LogError::Use {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// One file of a log restore being written.
struct Writing {
    file: File,
    partial: PathBuf,
    path: PathBuf,
    length: u64,
    at: u64,
    mtime_ns: i64,
}

impl Writing {
    fn new(dir: &Path, h: pb::LogFileHeader) -> Result<Writing, LogError> {
        if h.name.is_empty() || h.name.contains('/') || h.name == "." || h.name == ".." {
            return Err(LogError::BadName(h.name));
        }
        let path = dir.join(&h.name);
        let partial = dir.join(format!(".{}.bulwark-partial", h.name));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&partial)
            .map_err(io_err(
                |path, source| LogError::Create { path, source },
                &partial,
            ))?;
        Ok(Writing {
            file,
            partial,
            path,
            length: h.length,
            at: 0,
            mtime_ns: h.mtime_ns,
        })
    }

    fn write(&mut self, d: &pb::LogData) -> Result<(), LogError> {
        if blake3::hash(&d.data).as_bytes() != d.checksum.as_ref() {
            return Err(LogError::Checksum {
                path: self.path.clone(),
                at: self.at,
            });
        }
        if self.at + d.data.len() as u64 > self.length {
            return Err(LogError::TooLong {
                path: self.path.clone(),
                length: self.length,
            });
        }
        self.file.write_all_at(&d.data, self.at).map_err(io_err(
            |path, source| LogError::Write { path, source },
            &self.partial,
        ))?;
        self.at += d.data.len() as u64;
        Ok(())
    }

    fn finish(self) -> Result<(), LogError> {
        if self.at != self.length {
            return Err(LogError::Short {
                path: self.path.clone(),
                at: self.at,
                length: self.length,
            });
        }
        let when = std::time::UNIX_EPOCH
            + std::time::Duration::from_nanos(u64::try_from(self.mtime_ns).unwrap_or(0));
        let _ = self.file.set_modified(when);
        self.file.sync_all().map_err(io_err(
            |path, source| LogError::Fsync { path, source },
            &self.partial,
        ))?;
        std::fs::rename(&self.partial, &self.path).map_err(io_err(
            |path, source| LogError::Rename { path, source },
            &self.path,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_a_shell() {
        assert!(glob_match("*", "000000010000000000000001"));
        assert!(!glob_match("*", ".000000010000000000000001.tmp"));
        assert!(glob_match(".*", ".hidden"));
        assert!(glob_match("0*", "00000002.history"));
        assert!(glob_match("*.log", "app.log"));
        assert!(!glob_match("*.log", "app.log.1"));
        assert!(glob_match("app.log*", "app.log.1"));
        assert!(glob_match("binlog.[0-9][0-9]?", "binlog.12x"));
        assert!(!glob_match("binlog.[!0-9]*", "binlog.1"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("*a*b*", "xxaxxbxx"));
        assert!(!glob_match("*a*b", "xxaxxbxx"));
        assert!(check_glob("a/b").is_err());
        assert!(check_glob("[ab").is_err());
        assert!(check_glob("*.log").is_ok());
    }

    fn host(dir: &Path, name: &str) -> HostFile {
        scan(dir, "*")
            .expect("scan")
            .into_iter()
            .find(|f| f.name == name)
            .expect("file")
    }

    fn state(dir: &Path, name: &str, shipped: &[u8]) -> pb::LogFileState {
        let f = host(dir, name);
        let n = (shipped.len() as u64).min(ANCHOR_LEN) as usize;
        let hash = |b: &[u8]| {
            if b.is_empty() {
                bytes::Bytes::new()
            } else {
                bytes::Bytes::copy_from_slice(blake3::hash(b).as_bytes())
            }
        };
        pb::LogFileState {
            name: name.into(),
            length: shipped.len() as u64,
            head_hash: hash(&shipped[..n]),
            tail_hash: hash(&shipped[shipped.len() - n..]),
            dev: f.dev,
            ino: f.ino,
            mtime_ns: f.mtime_ns,
            generation: 1,
            gone: false,
        }
    }

    #[test]
    fn decides_append_skip_rotation_truncation_and_rewrite() {
        let tmp = tempfile::tempdir().expect("tmp");
        let d = tmp.path();
        let p = d.join("app.log");
        let shipped: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &shipped).expect("write");
        let k = state(d, "app.log", &shipped);
        let mut read = 0;
        let unchanged = host(d, "app.log");
        assert_eq!(
            decide(&unchanged, Some(&k), &mut read).expect("decide"),
            Action::Skip
        );
        assert_eq!(read, 0, "an unchanged file is not read");
        assert!(unchanged.file.get().is_none(), "nor even opened");
        // Appended.
        let mut longer = shipped.clone();
        longer.extend_from_slice(b"more");
        std::fs::write(&p, &longer).expect("write");
        assert_eq!(
            decide(&host(d, "app.log"), Some(&k), &mut read).expect("decide"),
            Action::Append { from: 10_000 }
        );
        assert_eq!(read, 2 * ANCHOR_LEN);
        // Rewritten at the start.
        let mut rewritten = longer.clone();
        rewritten[10] ^= 1;
        std::fs::write(&p, &rewritten).expect("write");
        assert!(matches!(
            decide(&host(d, "app.log"), Some(&k), &mut read),
            Ok(Action::Restart { why }) if why.starts_with("rewritten")
        ));
        // Truncated.
        std::fs::write(&p, b"short").expect("write");
        assert!(matches!(
            decide(&host(d, "app.log"), Some(&k), &mut read),
            Ok(Action::Restart { why }) if why.starts_with("truncated")
        ));
        // Replaced between the look and the read: refused, not read from the new file.
        let looked = host(d, "app.log");
        // (The old file is held open so its inode number cannot be reused.)
        let _hold = File::open(&p).expect("hold");
        std::fs::write(d.join("new"), b"another file").expect("write");
        std::fs::rename(d.join("new"), &p).expect("replace");
        assert!(
            looked
                .open()
                .is_err_and(|e| e.to_string().contains("replaced"))
        );
        std::fs::write(&p, b"short").expect("write");
        // Rotated: a new file under the name.
        std::fs::rename(&p, d.join("app.log.1")).expect("rename");
        std::fs::write(&p, &longer).expect("write");
        assert!(matches!(
            decide(&host(d, "app.log"), Some(&k), &mut read),
            Ok(Action::Restart { why }) if why.starts_with("rotated")
        ));
        // Unknown to the node.
        assert_eq!(
            decide(&host(d, "app.log.1"), None, &mut read).expect("decide"),
            Action::Restart { why: String::new() }
        );
    }
}
