//! Who gets a turn on this node, and how long a stream may sit idle.
//!
//! A host taken over must not starve the others. So a data stream is admitted in
//! this order, and nothing is held while the caller is still unknown:
//!
//! 1. its first message arrives within the idle timeout;
//! 2. the caller is authorised for the source (owner, assigned here, epoch);
//! 3. the agent is under its cap (`max_syncs_per_agent` syncs and ships,
//!    `max_restores_per_agent` restores) — past it the stream is refused at once;
//! 4. no other sync or ship of the source is running — else refused at once;
//! 5. then it waits for the source's lock (a restore or a settle may hold it) and
//!    one of the node's `max_concurrent_syncs` turns.
//!
//! Every stream then moves something at least once per `stream_idle_timeout`
//! (agents send an empty batch while they read unchanged blocks) or is aborted and
//! rolled back: [`next_within`] for what the node receives, [`Sender`] for what it
//! sends from a blocking thread (a reader that stops reading is given up on).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulwark_common::name::SourceName;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tonic::{Status, Streaming};

use crate::error::refused;

/// The node's limits on data streams (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Syncs that run at once on the node.
    pub max_syncs: usize,
    /// Syncs and ships one agent may run at once.
    pub syncs_per_agent: usize,
    /// Restores one agent may read at once.
    pub restores_per_agent: usize,
    /// How long a stream may move nothing.
    pub idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_syncs: 64,
            syncs_per_agent: 2,
            restores_per_agent: 4,
            idle: Duration::from_secs(60),
        }
    }
}

/// What kind of turn an agent takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnKind {
    /// A sync or a log ship (writes).
    Write,
    /// A restore (reads).
    Read,
}

/// The turns taken now.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    slots: Arc<Semaphore>,
    writes: Mutex<HashMap<String, usize>>,
    reads: Mutex<HashMap<String, usize>>,
    busy: Mutex<HashSet<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Admission {
    /// Turns under `limits`.
    pub fn new(limits: Limits) -> Arc<Admission> {
        Arc::new(Admission {
            slots: Arc::new(Semaphore::new(limits.max_syncs.max(1))),
            limits,
            writes: Mutex::default(),
            reads: Mutex::default(),
            busy: Mutex::default(),
        })
    }

    /// The idle timeout of every stream.
    pub fn idle(&self) -> Duration {
        self.limits.idle
    }

    /// One of `agent`'s turns, or a refusal when it has all of them already.
    pub fn agent_turn(self: &Arc<Self>, agent: &str, kind: TurnKind) -> Result<AgentTurn, Status> {
        let (map, cap, what, key) = match kind {
            TurnKind::Write => (
                &self.writes,
                self.limits.syncs_per_agent,
                "syncs and log ships",
                "max_syncs_per_agent",
            ),
            TurnKind::Read => (
                &self.reads,
                self.limits.restores_per_agent,
                "restores",
                "max_restores_per_agent",
            ),
        };
        let mut m = lock(map);
        let n = m.entry(agent.to_string()).or_default();
        if *n >= cap {
            drop(m);
            tracing::warn!(agent, cap, "refused: the agent has every turn it may take");
            refused("agent-cap");
            return Err(Status::resource_exhausted(format!(
                "agent {agent} already runs {cap} {what} on this node ({key} = {cap}); wait for one to end"
            )));
        }
        *n += 1;
        Ok(AgentTurn {
            admission: self.clone(),
            agent: agent.to_string(),
            kind,
        })
    }

    /// Marks a sync or ship of `source` as running, or refuses when one is.
    pub fn source_turn(self: &Arc<Self>, source: &SourceName) -> Result<SourceTurn, Status> {
        if !lock(&self.busy).insert(source.to_string()) {
            tracing::warn!(%source, "refused: a sync or ship of the source is running");
            refused("source-busy");
            return Err(Status::failed_precondition(format!(
                "a sync or log ship of data source {source} is already running on this node; one at a time"
            )));
        }
        Ok(SourceTurn {
            admission: self.clone(),
            source: source.to_string(),
        })
    }

    /// One of the node's turns (waits for one).
    pub async fn slot(&self) -> Result<OwnedSemaphorePermit, Status> {
        self.slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Status::unavailable("the node is stopping"))
    }
}

/// An agent's turn; given back when dropped.
#[derive(Debug)]
pub struct AgentTurn {
    admission: Arc<Admission>,
    agent: String,
    kind: TurnKind,
}

impl Drop for AgentTurn {
    fn drop(&mut self) {
        let map = match self.kind {
            TurnKind::Write => &self.admission.writes,
            TurnKind::Read => &self.admission.reads,
        };
        let mut m = lock(map);
        if let Some(n) = m.get_mut(&self.agent) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.agent);
            }
        }
    }
}

/// A running sync or ship of a source; the source is free again when dropped.
#[derive(Debug)]
pub struct SourceTurn {
    admission: Arc<Admission>,
    source: String,
}

impl Drop for SourceTurn {
    fn drop(&mut self) {
        lock(&self.admission.busy).remove(&self.source);
    }
}

/// The next message of an inbound stream, or an error when none came within
/// `idle` (`what` names the stream for the message: "sync", "log ship").
pub async fn next_within<T>(
    inbound: &mut Streaming<T>,
    idle: Duration,
    what: &str,
) -> Result<Option<T>, Status> {
    match tokio::time::timeout(idle, inbound.message()).await {
        Ok(r) => r,
        Err(_) => {
            refused("idle");
            Err(Status::deadline_exceeded(format!(
                "the {what} stream sent nothing for {} s (stream_idle_timeout); it was aborted and nothing of it was kept",
                idle.as_secs()
            )))
        }
    }
}

/// Sends a stream's replies from a blocking thread, giving up on a receiver that
/// takes nothing for the idle timeout (a client that stopped reading).
#[derive(Clone)]
pub struct Sender<T> {
    tx: mpsc::Sender<Result<T, Status>>,
    idle: Duration,
    runtime: tokio::runtime::Handle,
}

impl<T: Send + 'static> Sender<T> {
    /// A sender on `tx`; call from within the runtime (it keeps its handle).
    pub fn new(tx: mpsc::Sender<Result<T, Status>>, idle: Duration) -> Sender<T> {
        Sender {
            tx,
            idle,
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Sends `msg`; `false` when the receiver is gone or took nothing for the idle
    /// timeout (the stream is then over: stop producing).
    pub fn send(&self, msg: Result<T, Status>) -> bool {
        let tx = self.tx.clone();
        let idle = self.idle;
        match self
            .runtime
            .block_on(async move { tokio::time::timeout(idle, tx.send(msg)).await })
        {
            Ok(Ok(())) => true,
            // The receiver is gone: the client went away.
            Ok(Err(_)) => false,
            Err(_) => {
                refused("idle");
                tracing::warn!(
                    idle_s = idle.as_secs(),
                    "a client read nothing for the idle timeout; its stream is given up"
                );
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_gets_its_cap_and_no_more() {
        let a = Admission::new(Limits::default());
        let t1 = a.agent_turn("a1", TurnKind::Write).expect("first");
        let _t2 = a.agent_turn("a1", TurnKind::Write).expect("second");
        let e = a.agent_turn("a1", TurnKind::Write).expect_err("third");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(
            e.message().contains("max_syncs_per_agent"),
            "{}",
            e.message()
        );
        // Another agent and another kind are counted apart.
        let _b = a.agent_turn("a2", TurnKind::Write).expect("a2");
        let _r = a.agent_turn("a1", TurnKind::Read).expect("a read");
        drop(t1);
        let _t3 = a
            .agent_turn("a1", TurnKind::Write)
            .expect("a turn came back");
    }

    #[test]
    fn one_sync_per_source() {
        let a = Admission::new(Limits::default());
        let s: SourceName = "s1".parse().expect("name");
        let t = a.source_turn(&s).expect("first");
        assert_eq!(
            a.source_turn(&s).expect_err("second").code(),
            tonic::Code::FailedPrecondition
        );
        drop(t);
        let _again = a.source_turn(&s).expect("free again");
    }

    #[tokio::test]
    async fn a_reader_that_stops_reading_is_given_up() {
        let (tx, mut rx) = mpsc::channel::<Result<u32, Status>>(1);
        let sender = Sender::new(tx, Duration::from_millis(200));
        let sent = tokio::task::spawn_blocking(move || {
            let first = sender.send(Ok(1));
            let second = sender.send(Ok(2));
            (first, second)
        })
        .await
        .expect("thread");
        assert_eq!(sent, (true, false));
        assert_eq!(rx.recv().await.map(|r| r.ok()), Some(Some(1)));
    }
}
