//! A host taken over: what an attacker holding an agent's key and config can send
//! without going through the agent (which refuses bad names and sizes at load),
//! and the bookkeeping to prove afterwards that no recovery point was lost.
//!
//! - [`RawControl`]: a `Coordinator.Control` stream whose Hello says anything.
//! - [`HeldSync`]: a `Node.Sync` stream held open in the background (silent, or
//!   after a SyncBegin), watched for how and when it ends.
//! - [`raw_restore`]: a `Node.Restore` read to its end.
//! - [`History`]: the volume (or log directory) behind every point a test made,
//!   and [`History::assert_all_restore`].
//! - [`tree`]: every path under a directory, to show nothing new appeared.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bulwark_common::config::TlsFiles;
use bulwark_proto as pb;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::grpc::{coordinator_client, node_client};
use crate::{BLOCK_SIZE, Fleet, assert_same_file, dir_hashes, json_u64};

/// The control sequence an attacker hides in text an admin reads: it sets the
/// terminal's window title.
pub const TITLE_ESCAPE: &str = "\x1b]0;pwned\x07";

/// A volume as an agent describes it in Hello, with 64 KiB blocks.
pub fn volume_spec(name: &str, size_bytes: u64) -> pb::SourceSpec {
    pb::SourceSpec {
        name: name.to_string(),
        kind: pb::SourceKind::Volume as i32,
        size_bytes,
        block_size: BLOCK_SIZE as u32,
        tracker: "fingerprint".into(),
        ..Default::default()
    }
}

/// A `SyncBegin` of an incremental on top of `base_point`.
pub fn sync_begin(source: &str, epoch: u64, size_bytes: u64, base_point: u64) -> pb::SyncBegin {
    pb::SyncBegin {
        source: source.to_string(),
        epoch,
        size_bytes,
        block_size: BLOCK_SIZE as u32,
        base_point,
        consistency: pb::Consistency::Crash as i32,
        kind: pb::PointKind::Incremental as i32,
        want_digests: false,
        deep: false,
    }
}

/// Wraps a message of a sync stream.
pub fn sync_msg(msg: pb::sync_message::Msg) -> pb::SyncMessage {
    pb::SyncMessage { msg: Some(msg) }
}

/// A control stream opened with a Hello of the attacker's choosing.
pub struct RawControl {
    /// What the coordinator answered.
    pub welcome: pb::Welcome,
    tx: mpsc::Sender<pb::AgentMessage>,
    commands: tonic::Streaming<pb::CoordinatorCommand>,
}

impl RawControl {
    /// Opens `Coordinator.Control` at `url` as `id` and sends Hello with `sources`;
    /// returns the stream once the coordinator answered Welcome, or its refusal.
    pub async fn hello(
        url: &str,
        id: &TlsFiles,
        sources: Vec<pb::SourceSpec>,
    ) -> Result<RawControl, Status> {
        let mut client = coordinator_client(url, id).await;
        let (tx, rx) = mpsc::channel(16);
        tx.send(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
                sources,
                version: bulwark_common::VERSION.to_string(),
            })),
        })
        .await
        .expect("the request stream is open");
        let mut commands = client.control(ReceiverStream::new(rx)).await?.into_inner();
        match commands.message().await? {
            Some(pb::CoordinatorCommand {
                cmd: Some(pb::coordinator_command::Cmd::Welcome(welcome)),
            }) => Ok(RawControl {
                welcome,
                tx,
                commands,
            }),
            other => panic!("the coordinator answered Hello with {other:?}"),
        }
    }

    /// The registration of `source` in the Welcome; panics if it is not there.
    pub fn registration(&self, source: &str) -> &pb::SourceRegistration {
        self.welcome
            .sources
            .iter()
            .find(|r| r.source == source)
            .unwrap_or_else(|| {
                panic!(
                    "the Welcome does not mention {source:?}: {:?}",
                    self.welcome
                )
            })
    }

    /// The next command the coordinator relays to this stream (revocation lists
    /// skipped); panics if none comes within `timeout`.
    pub async fn next_command(&mut self, timeout: Duration) -> pb::coordinator_command::Cmd {
        let run = async {
            loop {
                match self.commands.message().await {
                    Ok(Some(pb::CoordinatorCommand {
                        cmd: Some(pb::coordinator_command::Cmd::Revocations(_)) | None,
                    })) => {}
                    Ok(Some(pb::CoordinatorCommand { cmd: Some(c) })) => return c,
                    other => panic!("the control stream ended: {other:?}"),
                }
            }
        };
        tokio::time::timeout(timeout, run)
            .await
            .unwrap_or_else(|_| {
                panic!("no command came down the control stream within {timeout:?}")
            })
    }

    /// Sends one message up the control stream.
    pub async fn send(&self, msg: pb::agent_message::Msg) {
        self.tx
            .send(pb::AgentMessage { msg: Some(msg) })
            .await
            .expect("the control stream is open");
    }
}

/// How a held stream stands.
#[derive(Debug, Clone)]
pub enum StreamState {
    /// Nothing came back yet.
    Open,
    /// The node answered `SyncReady`.
    Ready,
    /// The stream ended: with this status (`None`: cleanly), at this instant.
    Ended(Option<Status>, Instant),
}

/// A `Node.Sync` stream on its own connection, held open in the background until
/// dropped (dropping it closes the request stream).
pub struct HeldSync {
    tx: Option<mpsc::Sender<pb::SyncMessage>>,
    state: watch::Receiver<StreamState>,
    task: tokio::task::JoinHandle<()>,
}

impl HeldSync {
    /// Opens a Sync stream to the node at `address` as `id` on `rt`; sends `first`
    /// if given (a silent stream sends nothing) and nothing after it.
    pub fn open(
        rt: &tokio::runtime::Runtime,
        address: &str,
        id: &TlsFiles,
        first: Option<pb::SyncMessage>,
    ) -> HeldSync {
        let mut client = rt.block_on(node_client(address, id));
        let (tx, rx) = mpsc::channel(4);
        if let Some(m) = first {
            tx.try_send(m).expect("room for the first message");
        }
        let (state_tx, state) = watch::channel(StreamState::Open);
        let task = rt.spawn(async move {
            let end = match client.sync(ReceiverStream::new(rx)).await {
                Err(s) => Some(s),
                Ok(r) => {
                    let mut replies = r.into_inner();
                    loop {
                        match replies.message().await {
                            Ok(Some(pb::SyncReply {
                                msg: Some(pb::sync_reply::Msg::Ready(_)),
                            })) => {
                                let _ = state_tx.send(StreamState::Ready);
                            }
                            Ok(Some(_)) => {}
                            Ok(None) => break None,
                            Err(s) => break Some(s),
                        }
                    }
                }
            };
            let _ = state_tx.send(StreamState::Ended(end, Instant::now()));
        });
        HeldSync {
            tx: Some(tx),
            state,
            task,
        }
    }

    /// How the stream stands now.
    pub fn state(&self) -> StreamState {
        self.state.borrow().clone()
    }

    /// Whether the stream has ended.
    pub fn ended(&self) -> bool {
        matches!(self.state(), StreamState::Ended(..))
    }

    /// Sends one more message on the stream.
    pub fn send(&self, rt: &tokio::runtime::Runtime, msg: pb::SyncMessage) {
        let tx = self.tx.as_ref().expect("the request stream is open");
        rt.block_on(tx.send(msg))
            .expect("the request stream is open");
    }

    /// Waits until the state satisfies `pred`; panics after `timeout` naming `what`.
    pub fn wait_for(
        &mut self,
        rt: &tokio::runtime::Runtime,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&StreamState) -> bool,
    ) -> StreamState {
        let mut state = self.state.clone();
        let got = rt.block_on(async move {
            tokio::time::timeout(timeout, state.wait_for(|s| pred(s)))
                .await
                .map(|r| r.map(|s| s.clone()))
        });
        match got {
            Ok(Ok(s)) => s,
            Ok(Err(_)) => panic!("{what}: the stream's task went away"),
            Err(_) => panic!(
                "{what}: not within {timeout:?}; the stream is {:?}",
                self.state()
            ),
        }
    }

    /// Waits until the node answered Ready; panics if the stream ended instead.
    pub fn wait_ready(&mut self, rt: &tokio::runtime::Runtime, what: &str) {
        match self.wait_for(rt, what, Duration::from_secs(30), |s| {
            !matches!(s, StreamState::Open)
        }) {
            StreamState::Ready => {}
            other => panic!("{what}: the node did not answer Ready: {other:?}"),
        }
    }

    /// Waits for the end of the stream; returns its error status (panics if it
    /// ended cleanly) and when it ended.
    pub fn wait_error(
        &mut self,
        rt: &tokio::runtime::Runtime,
        what: &str,
        timeout: Duration,
    ) -> (Status, Instant) {
        match self.wait_for(rt, what, timeout, |s| matches!(s, StreamState::Ended(..))) {
            StreamState::Ended(Some(s), at) => (s, at),
            other => panic!("{what}: the stream ended without an error: {other:?}"),
        }
    }
}

impl Drop for HeldSync {
    fn drop(&mut self) {
        self.tx.take();
        self.task.abort();
    }
}

/// Reads `point` (0 = newest) of `source` from the node at `address` as `id`, to
/// the end of the stream; returns the number of chunks or the status it ended with.
pub async fn raw_restore(
    address: &str,
    id: &TlsFiles,
    source: &str,
    point: u64,
) -> Result<usize, Status> {
    let mut client = node_client(address, id).await;
    let mut chunks = client
        .restore(pb::NodeRestoreRequest {
            source: source.to_string(),
            point,
        })
        .await?
        .into_inner();
    let mut n = 0;
    while chunks.message().await?.is_some() {
        n += 1;
    }
    Ok(n)
}

/// Every path (files and directories) under `dir`, relative to it.
pub fn tree(dir: &Path) -> BTreeSet<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<PathBuf>) {
        let entries =
            std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
        for entry in entries {
            let path = entry
                .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
                .path();
            out.insert(path.strip_prefix(root).unwrap_or(&path).to_path_buf());
            if path.is_dir() && !path.is_symlink() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

/// Panics unless everything under the node's pool disk `disk` lies in
/// `bulwark/<one of sources>/` (or is `bulwark/` itself): no folder of a hostile
/// name, nothing beside the source folders.
pub fn assert_only_source_folders(disk: &Path, sources: &[&str], after: &str) {
    for p in tree(disk) {
        let mut parts = p.components().map(|c| c.as_os_str().to_string_lossy());
        let top = parts.next().unwrap_or_default();
        let ok = top == "bulwark" && parts.next().is_none_or(|s| sources.contains(&s.as_ref()));
        assert!(
            ok,
            "after {after}: {} exists under the pool disk {}; only bulwark/{{{}}}/ may",
            p.display(),
            disk.display(),
            sources.join(",")
        );
    }
}

/// What a recovery point must restore to.
#[derive(Debug, Clone)]
enum Expected {
    /// A copy of the volume as synced.
    Volume(PathBuf),
    /// A copy of the log directory as shipped.
    Logs(PathBuf),
}

/// The content behind every point a test made, to restore and compare at the end.
#[derive(Debug, Default)]
pub struct History {
    points: BTreeMap<(String, u64), Expected>,
    /// Points the admin's own retention was allowed to drop.
    dropped_by_admin: BTreeSet<(String, u64)>,
}

impl History {
    /// An empty history.
    pub fn new() -> History {
        History::default()
    }

    /// `bulwark sync SOURCE --wait` of a volume; keeps a copy of the volume as it
    /// was synced. Returns the new point's id.
    pub fn sync(&mut self, fleet: &Fleet, source: &str) -> u64 {
        let point = json_u64(&fleet.sync(source), "point");
        let copy = fleet.save_volume(source, &format!("{source}@{point}"));
        self.points
            .insert((source.to_string(), point), Expected::Volume(copy));
        point
    }

    /// Records that `point` of `source` holds the volume copied to `copy` (a sync
    /// the test ran another way than [`History::sync`]).
    pub fn record_volume(&mut self, source: &str, point: u64, copy: &Path) {
        self.points.insert(
            (source.to_string(), point),
            Expected::Volume(copy.to_path_buf()),
        );
    }

    /// A ship of log source `source` whose directory is `dir`; keeps a copy of it.
    pub fn ship(&mut self, fleet: &Fleet, source: &str, dir: &Path) -> u64 {
        let point = json_u64(&fleet.sync(source), "point");
        let copy = fleet.scratch(&format!("{source}@{point}"));
        std::fs::create_dir_all(&copy).expect("create the copy's directory");
        for (rel, _) in dir_hashes(dir) {
            std::fs::copy(dir.join(&rel), copy.join(&rel)).expect("copy a log file");
        }
        self.points
            .insert((source.to_string(), point), Expected::Logs(copy));
        point
    }

    /// Allows `point` of `source` to be gone at the end: the admin's retention
    /// (not the attacker) dropped it.
    pub fn dropped_by_admin(&mut self, source: &str, point: u64) {
        self.dropped_by_admin.insert((source.to_string(), point));
    }

    /// The copy of the volume behind `point` of `source`.
    pub fn copy(&self, source: &str, point: u64) -> PathBuf {
        match self.points.get(&(source.to_string(), point)) {
            Some(Expected::Volume(p)) => p.clone(),
            other => panic!("no volume copy of {source} point {point}: {other:?}"),
        }
    }

    /// The points recorded for `source`, oldest first.
    pub fn points_of(&self, source: &str) -> Vec<u64> {
        self.points
            .keys()
            .filter(|(s, _)| s == source)
            .map(|(_, p)| *p)
            .collect()
    }

    /// Panics unless every point this history made of each of `sources` is still
    /// listed (but the ones the admin dropped), no point appeared that it did not
    /// make, and each restores byte for byte to what was synced.
    pub fn assert_all_restore(&self, fleet: &Fleet, sources: &[&str], after: &str) {
        for source in sources {
            let made: Vec<u64> = self
                .points_of(source)
                .into_iter()
                .filter(|p| !self.dropped_by_admin.contains(&(source.to_string(), *p)))
                .collect();
            // Restored first: a restore waits for whatever still holds the source
            // (a settle, retention after a commit), so the listing below is final.
            for &p in &made {
                let tag = after.replace(' ', "-");
                let to = fleet.scratch(&format!("restore-{source}-{p}-{tag}"));
                let out = fleet.cli_as(
                    fleet.admin(),
                    &[
                        "restore",
                        source,
                        "--point",
                        &p.to_string(),
                        "--to",
                        &to.to_string_lossy(),
                        "--wait",
                        "--json",
                    ],
                );
                assert!(
                    out.status.success(),
                    "after {after}: point {p} of {source} does not restore: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                match &self.points[&(source.to_string(), p)] {
                    Expected::Volume(v) => {
                        assert_same_file(&to, v, &format!("after {after}: point {p} of {source}"));
                        std::fs::remove_file(&to).expect("remove the restored file");
                    }
                    Expected::Logs(d) => {
                        assert_eq!(
                            dir_hashes(&to),
                            dir_hashes(d),
                            "after {after}: log point {p} of {source} restores other files"
                        );
                        std::fs::remove_dir_all(&to).expect("remove the restored directory");
                    }
                }
            }
            assert_eq!(
                fleet.point_ids(source),
                made,
                "after {after}: the points of {source} are not the ones synced (listed, then made)"
            );
        }
    }
}
