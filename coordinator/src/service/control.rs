//! Agents' control streams: admitting an agent's Hello, the session it opens in the
//! registry (Welcome first, then the revocation list), and the loop that reads
//! what the agent sends up the stream.

use std::sync::Arc;

use bulwark_common::tls::Identity;
use bulwark_proto as pb;
use tokio::sync::mpsc;
use tonic::Streaming;

use super::{CoordinatorService, Result};
use crate::error::CoordinatorError;
use crate::registry::{AgentResult, Command, CommandOutcome, Hello, Registry};

impl CoordinatorService {
    /// Admits `agent`'s Hello (a compatible version, at most
    /// [`crate::registry::MAX_SOURCES_PER_AGENT`] sources), registers its sources
    /// and opens its session: the receiver yields Welcome, the revocation list, then
    /// the commands relayed to it. Returns the session's connection id too.
    pub async fn open_session(
        &self,
        agent: &Identity,
        cert_expiry_ms: Option<i64>,
        hello: &Hello,
    ) -> Result<(u64, mpsc::Receiver<Command>)> {
        if let Err(why) = bulwark_common::compatible(bulwark_common::VERSION, &hello.version) {
            tracing::warn!(%agent, version = %hello.version, "refused: {why}");
            return Err(CoordinatorError::Refused(format!(
                "agent {}: {why}",
                agent.name
            )));
        }
        let most = crate::registry::MAX_SOURCES_PER_AGENT;
        if hello.sources.len() > most {
            tracing::warn!(%agent, sources = hello.sources.len(), "refused: a Hello with too many sources");
            return Err(CoordinatorError::Invalid(format!(
                "agent {}: its Hello lists {} data sources; an agent may have at most {most}",
                agent.name,
                hello.sources.len()
            )));
        }
        let registry = &self.registry;
        let sources = registry.hello(&agent.name, hello)?;
        if let Some(t) = cert_expiry_ms {
            registry.saw_certificate(bulwark_common::tls::Role::Agent, &agent.name, t)?;
        }
        let (tx, rx) = mpsc::channel(16);
        let _ = tx.send(Command::Welcome(sources)).await;
        let conn = registry.connect(&agent.name, tx.clone());
        // Right after Welcome (changes follow on the same stream, see
        // `Registry::broadcast`; the agent takes only a newer list).
        if let Some(r) = &self.revocations {
            let _ = tx.send(Command::Revocations(r.list())).await;
        }
        tracing::info!(agent = %agent.name, sources = hello.sources.len(), "agent connected");
        Ok((conn, rx))
    }

    /// The idle timeout of control streams.
    pub fn stream_idle_timeout(&self) -> std::time::Duration {
        self.idle
    }

    /// Cancelled when the coordinator shuts down (control streams end then).
    pub fn shutdown_token(&self) -> tokio_util::sync::CancellationToken {
        self.shutdown.clone()
    }
}

/// Reads what `agent` sends up its control stream (results, progress, sync
/// reports, pings) until it ends, breaks or stays idle too long; then closes the
/// session `conn`.
pub async fn control_loop(
    registry: Arc<Registry>,
    agent: Identity,
    conn: u64,
    mut inbound: Streaming<pb::AgentMessage>,
    idle: std::time::Duration,
) {
    use pb::agent_message::Msg;
    loop {
        let Ok(next) = tokio::time::timeout(idle, inbound.message()).await else {
            tracing::warn!(agent = %agent.name, idle_s = idle.as_secs(), "control stream cut: the agent sent nothing for the idle timeout");
            bulwark_common::metrics::counter_add(
                "bulwark_refusals_total",
                &[("reason", "idle")],
                1,
            );
            break;
        };
        match next {
            Ok(Some(pb::AgentMessage {
                msg: Some(Msg::Ping(_)),
            })) => {}
            Ok(Some(pb::AgentMessage {
                msg: Some(Msg::Result(r)),
            })) => {
                let (id, outcome) = command_result(r);
                registry.complete(&agent.name, id, outcome)
            }
            Ok(Some(pb::AgentMessage {
                msg: Some(Msg::Progress(p)),
            })) => registry.progress(&agent.name, p.into()),
            Ok(Some(pb::AgentMessage {
                msg: Some(Msg::Report(r)),
            })) => {
                if let Err(e) = registry.sync_report(&agent.name, &r.into()) {
                    tracing::warn!(agent = %agent.name, "sync report refused: {e}");
                }
            }
            Ok(Some(_)) => {
                tracing::warn!(agent = %agent.name, "unexpected message on the control stream ignored")
            }
            Ok(None) => break,
            Err(s) => {
                tracing::info!(agent = %agent.name, "control stream broke: {}", s.message());
                break;
            }
        }
    }
    tracing::info!(agent = %agent.name, "agent disconnected");
    registry.disconnect(&agent.name, conn);
}

/// A command's result from the agent: its id and outcome.
fn command_result(r: pb::CommandResult) -> (u64, CommandOutcome) {
    let outcome = match r.outcome {
        Some(pb::command_result::Outcome::Error(e)) => Err(e),
        Some(pb::command_result::Outcome::Sync(s)) => Ok(AgentResult::Sync(s)),
        Some(pb::command_result::Outcome::Restore(s)) => Ok(AgentResult::Restore(s)),
        None => Err("the agent sent an empty result".into()),
    };
    (r.command_id, outcome)
}
