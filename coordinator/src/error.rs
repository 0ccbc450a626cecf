//! The coordinator's domain errors, and the one place they become a gRPC
//! [`Status`]: every variant keeps the code (and the words) the caller sees.

use tonic::{Code, Status};

use crate::registry::RegistryError;
use crate::state::StateError;

/// What a caller sent that cannot be used, whatever the state of the fleet: the
/// words say what and how to put it right.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProtocolError {
    /// A field (or a combination of fields) out of what the protocol allows.
    #[error("{0}")]
    Invalid(String),
    /// A stream whose messages come in another order than the protocol's.
    #[error("{0}")]
    OutOfOrder(&'static str),
}

/// What a domain operation of the coordinator refused or could not do.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The registry's own (its store, an unknown source, an owner, ...).
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// What the wire sent cannot be used.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// A thing named that does not exist (`NotFound`).
    #[error("{0}")]
    NotFound(String),
    /// An argument that cannot be right whatever the state (`InvalidArgument`).
    #[error("{0}")]
    Invalid(String),
    /// Refused in the state the fleet is in (`FailedPrecondition`).
    #[error("{0}")]
    Refused(String),
    /// The caller may not do this (`PermissionDenied`).
    #[error("{0}")]
    Forbidden(String),
    /// Not offered by this coordinator, or gone away (`Unavailable`).
    #[error("{0}")]
    Unavailable(String),
    /// A command an agent ran failed (`Aborted`).
    #[error("{0}")]
    Aborted(String),
    /// The coordinator's own fault (`Internal`).
    #[error("{0}")]
    Internal(String),
    /// A node's answer, passed on with its code; `message` names the node.
    #[error("{message}")]
    Node { code: Code, message: String },
}

impl CoordinatorError {
    /// A node's refusal `st`, as `node NAME: its message` with its code.
    pub fn at_node(node: &str, st: &Status) -> CoordinatorError {
        CoordinatorError::Node {
            code: st.code(),
            message: format!("node {node}: {}", st.message()),
        }
    }
}

impl From<RegistryError> for Status {
    fn from(e: RegistryError) -> Status {
        match &e {
            RegistryError::Store(_) => {
                tracing::error!("{e}");
                Status::internal(e.to_string())
            }
            // The state store cannot be reached (with etcd: no quorum): every
            // coordinator would say the same, so the caller retries later.
            RegistryError::State(StateError::Unavailable(_)) => {
                tracing::error!("{e}");
                Status::unavailable(e.to_string())
            }
            // Another coordinator leads now: the not-leader answer, so the caller's
            // failover tries its next coordinator.
            RegistryError::State(StateError::Fenced(_)) => {
                tracing::warn!("{e}");
                bulwark_common::failover::no_leader(&e.to_string())
            }
            RegistryError::UnknownSource(_) | RegistryError::UnknownNode(_) => {
                Status::not_found(e.to_string())
            }
            RegistryError::NotOwner { .. } => Status::permission_denied(e.to_string()),
            RegistryError::Unassigned(..) | RegistryError::AgentOffline(_) => {
                Status::failed_precondition(e.to_string())
            }
            RegistryError::InvalidSource(..) => Status::invalid_argument(e.to_string()),
            RegistryError::Forbidden(_) => Status::permission_denied(e.to_string()),
            RegistryError::Locked(_) => Status::failed_precondition(e.to_string()),
        }
    }
}

impl From<ProtocolError> for Status {
    fn from(e: ProtocolError) -> Status {
        Status::invalid_argument(e.to_string())
    }
}

impl From<CoordinatorError> for Status {
    fn from(e: CoordinatorError) -> Status {
        match e {
            CoordinatorError::Registry(e) => e.into(),
            CoordinatorError::Protocol(e) => e.into(),
            CoordinatorError::NotFound(m) => Status::not_found(m),
            CoordinatorError::Invalid(m) => Status::invalid_argument(m),
            CoordinatorError::Refused(m) => Status::failed_precondition(m),
            CoordinatorError::Forbidden(m) => Status::permission_denied(m),
            CoordinatorError::Unavailable(m) => Status::unavailable(m),
            CoordinatorError::Aborted(m) => Status::aborted(m),
            CoordinatorError::Internal(m) => Status::internal(m),
            CoordinatorError::Node { code, message } => Status::new(code, message),
        }
    }
}
