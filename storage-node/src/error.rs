//! The node's errors, and the one place each becomes a gRPC status: the store's
//! ([`StoreError`]), the wire's ([`ProtocolError`]) and the service's own
//! ([`NodeError`]: who may do what to which source).

use tonic::Status;

use crate::store::StoreError;
use crate::wire::ProtocolError;

/// Counts a refusal by reason (see `bulwark_refusals_total`).
pub(crate) fn refused(reason: &str) {
    bulwark_common::metrics::counter_add("bulwark_refusals_total", &[("reason", reason)], 1);
}

/// Why the node refused or failed a call.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("data source {0} is not known to the coordinator")]
    UnknownSource(String),
    /// The coordinator answered and could not place the source.
    #[error("the coordinator has no assignment of {source_name} to give: {why}")]
    NoAssignment { source_name: String, why: String },
    #[error("cannot check the assignment of {source_name}: coordinator unreachable ({why})")]
    CoordinatorUnreachable { source_name: String, why: String },
    #[error("data source {source_name} is assigned to node {node}, not to this node ({this})")]
    NotAssigned {
        source_name: String,
        node: String,
        this: String,
    },
    #[error(
        "data source {source_name} belongs to agent {owner}; {caller} may not write or read it"
    )]
    NotOwner {
        source_name: String,
        owner: String,
        caller: String,
    },
    #[error(
        "stale assignment epoch {epoch} for data source {source_name}: the current epoch is {current}"
    )]
    StaleEpoch {
        source_name: String,
        epoch: u64,
        current: u64,
    },
    /// A sync whose geometry is not the one registered.
    #[error(
        "data source {source_name} is registered as {size_bytes} bytes in blocks of {block_size}, the sync says {sync_size_bytes} bytes in blocks of {sync_block_size}"
    )]
    NotAsRegistered {
        source_name: String,
        size_bytes: u64,
        block_size: u32,
        sync_size_bytes: u64,
        sync_block_size: u32,
    },
    /// A write (`what`: "sync", "ship") of a source that is moving away.
    #[error("data source {source_name} is moving to node {to}; {what} again when the move is done")]
    Moving {
        source_name: String,
        to: String,
        what: &'static str,
    },
    /// An export asked by a node the source is not moving to.
    #[error("data source {source_name} is not moving from {from} to {to}")]
    NotMovingTo {
        source_name: String,
        from: String,
        to: String,
    },
    #[error("data source {0} is assigned to this node; it is not dropped")]
    StillAssigned(String),
    #[error(
        "cannot check the assignment of {source_name} with the coordinator ({why}); nothing is dropped"
    )]
    DropUnchecked { source_name: String, why: String },
    #[error("{0}")]
    Internal(String),
    /// Already a status: a turn refused by admission, an idle or broken stream, a
    /// peer node's answer.
    #[error("{}", .0.message())]
    Status(#[from] Status),
}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Status {
        use NodeError as E;
        match e {
            E::Protocol(p) => p.into(),
            E::Store(s) => s.into(),
            E::Status(s) => s,
            E::UnknownSource(_)
            | E::NotAssigned { .. }
            | E::NotOwner { .. }
            | E::NotMovingTo { .. } => Status::permission_denied(e.to_string()),
            E::NoAssignment { .. } | E::StaleEpoch { .. } | E::StillAssigned(_) => {
                Status::failed_precondition(e.to_string())
            }
            E::CoordinatorUnreachable { .. } | E::Moving { .. } | E::DropUnchecked { .. } => {
                Status::unavailable(e.to_string())
            }
            E::NotAsRegistered { .. } => Status::invalid_argument(e.to_string()),
            E::Internal(_) => Status::internal(e.to_string()),
        }
    }
}

/// Maps store errors to gRPC codes.
/// A request the protocol does not allow is InvalidArgument; a bad source name is
/// also counted as a `bad-name` refusal.
impl From<ProtocolError> for Status {
    fn from(e: ProtocolError) -> Status {
        if matches!(e, ProtocolError::BadName(_)) {
            refused("bad-name");
        }
        Status::invalid_argument(e.to_string())
    }
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        match &e {
            StoreError::BaseMismatch { .. } => Status::failed_precondition(e.to_string()),
            StoreError::GeometryChanged { .. } | StoreError::DuplicateBlock { .. } => {
                Status::invalid_argument(e.to_string())
            }
            StoreError::NoSpace { .. } | StoreError::AllocationFull { .. } => {
                Status::resource_exhausted(e.to_string())
            }
            StoreError::PruneNewest { .. } | StoreError::WrongKind { .. } => {
                Status::failed_precondition(e.to_string())
            }
            StoreError::BadLog(_) | StoreError::BadName(_) => {
                Status::invalid_argument(e.to_string())
            }
            StoreError::Refused { .. }
            | StoreError::Locked { .. }
            | StoreError::DataFormat { .. } => Status::failed_precondition(e.to_string()),
            StoreError::LockedFull { .. } => Status::resource_exhausted(e.to_string()),
            // A failed settle is logged and raised as an alert where it failed.
            StoreError::PointDamaged { .. } | StoreError::SettleFailed { .. } => {
                Status::data_loss(e.to_string())
            }
            StoreError::NoPoints(_) | StoreError::NoSuchPoint { .. } => {
                Status::not_found(e.to_string())
            }
            StoreError::Io { .. }
            | StoreError::Meta(_)
            | StoreError::Damaged { .. }
            | StoreError::Crashed(_)
            | StoreError::MissingDisk(_) => {
                tracing::error!("store error: {e}");
                Status::internal(e.to_string())
            }
        }
    }
}
