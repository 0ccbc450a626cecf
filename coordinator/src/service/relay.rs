//! The relay of admin commands down an agent's control stream: `sync` (and
//! `check`), and waiting for what the agent answers.

use bulwark_common::tls::Identity;
use bulwark_proto as pb;

use super::{CoordinatorService, Result};
use crate::error::CoordinatorError;
use crate::registry::{AgentResult, Command, CommandOutcome, SyncCommand};

/// `Sync`: what the admin asked.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncOrder {
    pub source: String,
    /// Wait for the agent's result (else return once the command is sent).
    pub wait: bool,
    /// A consistency check (every block compared) rather than a sync.
    pub check: bool,
    /// A check that re-reads the node's stored bytes too.
    pub deep: bool,
}

impl CoordinatorService {
    /// Has the owner of `order.source` sync (or check) it; returns the agent and,
    /// when waited for, its result.
    pub async fn sync(
        &self,
        admin: &Identity,
        order: SyncOrder,
    ) -> Result<(String, Option<pb::SyncResult>)> {
        let s = self.registry.source(&order.source)?;
        if order.deep && !order.check {
            return Err(CoordinatorError::Invalid("deep is only for a check".into()));
        }
        tracing::info!(%admin, source = %order.source, agent = %s.agent, check = order.check, deep = order.deep, "sync requested");
        let rx = self
            .registry
            .dispatch(&s.agent, |id| {
                Command::Sync(SyncCommand {
                    command_id: id,
                    source: order.source.clone(),
                    check: order.check,
                    deep: order.deep,
                    trace_context: bulwark_common::telemetry::inject_map(),
                })
            })
            .await?;
        if !order.wait {
            return Ok((s.agent, None));
        }
        match command_outcome(rx, "sync", &order.source, &s.agent).await? {
            AgentResult::Sync(res) => Ok((s.agent, Some(res))),
            _ => Err(CoordinatorError::Internal(
                "the agent answered a sync with another result".into(),
            )),
        }
    }
}

/// Waits for the result of a command relayed to `agent`.
pub(super) async fn command_outcome(
    rx: tokio::sync::oneshot::Receiver<CommandOutcome>,
    what: &str,
    source: &str,
    agent: &str,
) -> Result<AgentResult> {
    match rx.await {
        Ok(Ok(outcome)) => Ok(outcome),
        Ok(Err(e)) => Err(CoordinatorError::Aborted(format!(
            "{what} of {source} on agent {agent} failed: {e}"
        ))),
        Err(_) => Err(CoordinatorError::Unavailable(format!(
            "agent {agent} went away during the {what}"
        ))),
    }
}
