//! Live agent sessions: the control stream of each connected agent, the commands
//! relayed down it and waiting for their result, and the progress agents report.
//! Memory only.

use super::*;

/// What an agent answered to a command: its result, relayed to the admin as the
/// agent sent it.
#[derive(Debug, Clone)]
pub enum AgentResult {
    Sync(pb::SyncResult),
    Restore(pb::RestoreResult),
}

/// Outcome of a command an agent ran: its result, or what went wrong.
pub type CommandOutcome = std::result::Result<AgentResult, String>;

/// A command down an agent's control stream.
#[derive(Debug, Clone)]
pub enum Command {
    /// The answer to its Hello: each source's registration.
    Welcome(Vec<Registration>),
    Sync(SyncCommand),
    Restore(Box<RestoreCommand>),
    /// The fleet's revocation list (it wants no answer).
    Revocations(pb::RevocationList),
}

/// Sync (or check) one source.
#[derive(Debug, Clone)]
pub struct SyncCommand {
    pub command_id: u64,
    pub source: String,
    pub check: bool,
    pub deep: bool,
    pub trace_context: HashMap<String, String>,
}

/// One source and point a restore reads, with the assignment that says where.
#[derive(Debug, Clone)]
pub struct RestorePart {
    pub source: String,
    pub point: u64,
    pub assignment: Assignment,
}

/// Restore a volume (and the logs of its group) or a log source to `path`.
#[derive(Debug, Clone)]
pub struct RestoreCommand {
    pub command_id: u64,
    pub path: String,
    pub at_ms: i64,
    pub volume: Option<RestorePart>,
    pub log: Option<RestorePart>,
    pub trace_context: HashMap<String, String>,
}

/// How far a running operation on a source is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    pub source: String,
    pub op: String,
    pub done_bytes: u64,
    pub total_bytes: u64,
}

pub(super) struct Connection {
    id: u64,
    tx: mpsc::Sender<Command>,
}

impl Registry {
    /// Keeps an agent's progress report of one of its own sources.
    pub fn progress(&self, agent: &str, p: Progress) {
        if self.source(&p.source).is_ok_and(|s| s.agent == agent) {
            lock(&self.progress).insert(p.source.clone(), (p, std::time::Instant::now()));
        }
    }

    /// The progress of the operation running on `source`, if one reported lately.
    pub fn current_progress(&self, source: &str) -> Option<Progress> {
        let mut map = lock(&self.progress);
        match map.get(source) {
            Some((p, at)) if at.elapsed() < Duration::from_secs(5) => Some(p.clone()),
            Some(_) => {
                map.remove(source);
                None
            }
            None => None,
        }
    }

    /// Attaches an agent's control stream; returns its connection id.
    pub fn connect(&self, agent: &str, tx: mpsc::Sender<Command>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.connections).insert(agent.to_string(), Connection { id, tx });
        id
    }

    /// Detaches a control stream (if it is still the current one) and fails the
    /// commands that were waiting on it.
    pub fn disconnect(&self, agent: &str, id: u64) {
        let mut conns = lock(&self.connections);
        if conns.get(agent).is_some_and(|c| c.id == id) {
            conns.remove(agent);
            drop(conns);
            let mut pending = lock(&self.pending);
            let ids: Vec<u64> = pending
                .iter()
                .filter(|(_, (a, _))| a == agent)
                .map(|(k, _)| *k)
                .collect();
            for k in ids {
                if let Some((_, tx)) = pending.remove(&k) {
                    let _ = tx.send(Err(format!("agent {agent} disconnected before finishing")));
                }
            }
            // Not under `placement`: conditioned on the record read, so a Hello
            // written meanwhile is not overwritten with the agent's old sources.
            let seen = self.update(AGENTS, agent, |rec: Option<AgentRecord>| {
                Ok(rec.map(|mut rec| {
                    rec.last_seen_ms = now_ms();
                    rec
                }))
            });
            if let Err(e) = seen {
                tracing::warn!(agent, "cannot record when the agent was last seen: {e}");
            }
        }
    }

    /// Whether an agent has a live control stream.
    pub fn connected(&self, agent: &str) -> bool {
        lock(&self.connections).contains_key(agent)
    }

    /// Sends a command that wants no answer (the revocation list) to every agent
    /// connected now. A full queue is waited on in a task of its own, so the caller
    /// never blocks on a slow agent.
    pub fn broadcast(&self, cmd: Command) {
        let txs: Vec<_> = lock(&self.connections)
            .values()
            .map(|c| c.tx.clone())
            .collect();
        for tx in txs {
            if let Err(mpsc::error::TrySendError::Full(cmd)) = tx.try_send(cmd.clone())
                && let Ok(rt) = tokio::runtime::Handle::try_current()
            {
                rt.spawn(async move {
                    let _ = tx.send(cmd).await;
                });
            }
        }
    }

    /// Sends a command to an agent; the receiver gets its outcome.
    pub async fn dispatch(
        &self,
        agent: &str,
        make: impl FnOnce(u64) -> Command,
    ) -> Result<oneshot::Receiver<CommandOutcome>> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let tx = lock(&self.connections)
            .get(agent)
            .map(|c| c.tx.clone())
            .ok_or_else(|| RegistryError::AgentOffline(agent.to_string()))?;
        let (otx, orx) = oneshot::channel();
        lock(&self.pending).insert(id, (agent.to_string(), otx));
        if tx.send(make(id)).await.is_err() {
            lock(&self.pending).remove(&id);
            return Err(RegistryError::AgentOffline(agent.to_string()));
        }
        Ok(orx)
    }

    /// Delivers the outcome of command `command_id` from `agent`.
    pub fn complete(&self, agent: &str, command_id: u64, outcome: CommandOutcome) {
        let mut pending = lock(&self.pending);
        match pending.get(&command_id) {
            Some((a, _)) if a == agent => {}
            _ => {
                tracing::warn!(
                    agent,
                    command = command_id,
                    "result for an unknown command ignored"
                );
                return;
            }
        }
        if let Some((_, tx)) = pending.remove(&command_id) {
            let _ = tx.send(outcome);
        }
    }
}
