//! Verify: a source's stored data checked on its node, and damaged replica blocks
//! repaired from its agent.

use bulwark_proto as pb;

use super::relay::command_outcome;
use super::{CoordinatorService, Result};
use crate::error::CoordinatorError;
use crate::registry::{AgentResult, Command, SyncCommand};

impl CoordinatorService {
    /// Verifies a source's stored data on its node. Replica blocks found damaged
    /// are repaired from the agent, when it is connected, by a deep consistency
    /// check (which re-sends exactly the blocks whose bytes no longer match, and
    /// keeps no before-image of damage), and the data is verified again so that
    /// the points' damage marks say what is left.
    pub async fn verify(&self, source: &str, point: u64) -> Result<pb::VerifyReport> {
        let s = self.registry.source(source)?;
        let node = self.node_of(source)?;
        let mut client = self.node_client(&node)?;
        let at_node = |st: tonic::Status| CoordinatorError::at_node(&node, &st);
        let request = pb::NodeVerifyRequest {
            source: source.to_string(),
            point,
        };
        let first = client
            .verify(request.clone())
            .await
            .map_err(at_node)?
            .into_inner();
        if first.damaged_replica_blocks.is_empty() {
            return Ok(first);
        }
        let damaged = first.damaged_replica_blocks.len();
        if !self.registry.connected(&s.agent) {
            return Ok(pb::VerifyReport {
                repair_error: format!(
                    "{damaged} damaged replica block(s) not repaired: agent {} is not connected; run `bulwark check {source} --deep` when it is",
                    s.agent
                ),
                ..first
            });
        }
        tracing::warn!(source, blocks = damaged, agent = %s.agent, "repairing damaged replica blocks from the agent");
        let rx = self
            .registry
            .dispatch(&s.agent, |id| {
                Command::Sync(SyncCommand {
                    command_id: id,
                    source: source.to_string(),
                    check: true,
                    deep: true,
                    trace_context: bulwark_common::telemetry::inject_map(),
                })
            })
            .await?;
        let repaired = match command_outcome(rx, "repair", source, &s.agent).await {
            Ok(AgentResult::Sync(r)) => Ok(r.blocks_sent),
            Ok(_) => Err("the agent answered with another result".to_string()),
            Err(e) => Err(e.to_string()),
        };
        let mut again = client.verify(request).await.map_err(at_node)?.into_inner();
        // What the first pass read is what the operator asked for; the figures of
        // the second pass are only for the damage left.
        again.blocks_checked = first.blocks_checked;
        again.bytes_read = first.bytes_read;
        again.duration_ms += first.duration_ms;
        match repaired {
            Ok(n) => again.repaired_blocks = n,
            Err(e) => again.repair_error = format!("repair by a deep check failed: {e}"),
        }
        // The damage the first pass found, so the report says what was wrong.
        again.damaged_replica_blocks = first.damaged_replica_blocks;
        Ok(again)
    }
}
