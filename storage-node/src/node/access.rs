//! Who may touch a source on this node: the coordinator's assignment (asked afresh,
//! the cached answer when it cannot be reached), the owning agent, the epoch, and
//! the restore grants of [`super::locks`].

use bulwark_common::name::SourceName;
use bulwark_common::tls::{Identity, Role};
use bulwark_proto as pb;
use prost::Message;

use super::NodeService;
use crate::error::{NodeError, refused};
use crate::node::admission::{AgentTurn, TurnKind};

/// The source's read lock, held for a restore.
pub(crate) type ReadLock = tokio::sync::OwnedRwLockReadGuard<()>;

/// Refuses a write (`what`: "sync", "ship") of a source that is moving away.
pub(crate) fn not_moving(
    a: &pb::Assignment,
    source: &SourceName,
    what: &'static str,
) -> Result<(), NodeError> {
    if a.moving_to.is_empty() {
        return Ok(());
    }
    Err(NodeError::Moving {
        source_name: source.to_string(),
        to: a.moving_to.clone(),
        what,
    })
}

impl NodeService {
    /// The current assignment of `source`: the coordinator's answer, or the cached
    /// one when the coordinator cannot be reached.
    pub(crate) async fn assignment(&self, source: &str) -> Result<pb::Assignment, NodeError> {
        let mut client = self.coordinator.clone();
        match client
            .get_assignment(pb::GetAssignmentRequest {
                source: source.to_string(),
            })
            .await
        {
            Ok(r) => {
                let a = r.into_inner();
                self.remember(std::slice::from_ref(&a));
                Ok(a)
            }
            Err(s) if s.code() == tonic::Code::NotFound => {
                Err(NodeError::UnknownSource(source.to_string()))
            }
            // The coordinator answered, and said no (a source it could not place):
            // that is the answer, not a reason to fall back on the cache.
            Err(s) if s.code() == tonic::Code::FailedPrecondition => Err(NodeError::NoAssignment {
                source_name: source.to_string(),
                why: s.message().to_string(),
            }),
            Err(s) => {
                let cached = self
                    .store
                    .cached_assignment(source)
                    .ok()
                    .flatten()
                    .and_then(|v| pb::Assignment::decode(v.as_ref()).ok());
                match cached {
                    Some(a) => {
                        tracing::warn!(
                            source,
                            "coordinator unreachable ({}); using the cached assignment",
                            s.message()
                        );
                        Ok(a)
                    }
                    None => Err(NodeError::CoordinatorUnreachable {
                        source_name: source.to_string(),
                        why: s.message().to_string(),
                    }),
                }
            }
        }
    }

    /// Checks that `caller` owns `source`, that it is assigned here, and the epoch.
    pub(crate) async fn authorize(
        &self,
        caller: &Identity,
        source: &SourceName,
        epoch: Option<u64>,
    ) -> Result<pb::Assignment, NodeError> {
        let a = self.assignment(source).await?;
        if a.node != self.name {
            tracing::warn!(%caller, %source, "refused: source assigned to node {}", a.node);
            refused("not-assigned");
            return Err(NodeError::NotAssigned {
                source_name: source.to_string(),
                node: a.node,
                this: self.name.clone(),
            });
        }
        if a.agent != caller.name {
            tracing::warn!(%caller, %source, "refused: not the owner");
            refused("not-owner");
            return Err(NodeError::NotOwner {
                source_name: source.to_string(),
                owner: a.agent,
                caller: caller.to_string(),
            });
        }
        if let Some(e) = epoch
            && e != a.epoch
        {
            tracing::warn!(%caller, %source, epoch = e, current = a.epoch, "refused: stale epoch");
            refused("stale-epoch");
            return Err(NodeError::StaleEpoch {
                source_name: source.to_string(),
                epoch: e,
                current: a.epoch,
            });
        }
        Ok(a)
    }

    /// Checks that `caller` may read point `point` (0 = newest) of `source` (an
    /// admin's export: any source; an agent: its own source assigned here, or a
    /// point the coordinator granted it for a restore), takes one of the agent's
    /// restore turns, then the source's read lock for the restore.
    pub(crate) async fn authorize_read(
        &self,
        caller: &Identity,
        source: &SourceName,
        point: u64,
    ) -> Result<(ReadLock, Option<AgentTurn>), NodeError> {
        let turn = match caller.role {
            Role::Admin => None,
            _ => {
                if !self.granted(source, &caller.name, point) {
                    self.authorize(caller, source, None).await?;
                }
                Some(self.admission.agent_turn(&caller.name, TurnKind::Read)?)
            }
        };
        Ok((self.locks.get(source).read_owned().await, turn))
    }
}
