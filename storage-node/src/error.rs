//! The node's errors, and the one place each becomes a gRPC status: the store's
//! ([`StoreError`]), the wire's ([`ProtocolError`]) and the service's own
//! ([`NodeError`]: who may do what to which source).

use tonic::Status;

use crate::store::{DiskFault, StoreError};

/// The status metadata that carries a [`DiskFault`] (its key) from the failed
/// store call to the service that raises its alert.
const DISK_FAULT: &str = "bulwark-disk-fault";

/// The disk fault a status carries (see [`DISK_FAULT`]).
pub(crate) fn disk_fault(status: &Status) -> Option<DiskFault> {
    status
        .metadata()
        .get(DISK_FAULT)
        .and_then(|v| v.to_str().ok())
        .and_then(DiskFault::from_key)
}
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
            // A pool disk that is full is out of a resource; one that fails, an
            // internal error. Both carry the fault for the node's alert.
            StoreError::Io { .. } => {
                tracing::error!("store error: {e}");
                let fault = e.disk_fault().unwrap_or(DiskFault::Failed);
                let mut status = match fault {
                    DiskFault::Full => Status::resource_exhausted(e.to_string()),
                    DiskFault::Failed => Status::internal(e.to_string()),
                };
                status.metadata_mut().insert(
                    DISK_FAULT,
                    tonic::metadata::MetadataValue::from_static(fault.key()),
                );
                status
            }
            StoreError::Meta(_)
            | StoreError::Damaged { .. }
            | StoreError::Crashed(_)
            | StoreError::MissingDisk(_) => {
                tracing::error!("store error: {e}");
                Status::internal(e.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io_error(errno: i32) -> StoreError {
        StoreError::Io {
            op: "write",
            path: "/pool/bulwark/vol/journal".into(),
            error: std::io::Error::from_raw_os_error(errno),
        }
    }

    /// A full pool disk is out of a resource, a failing one an internal error;
    /// both name the call and the file, and carry their fault for the alert.
    #[test]
    fn a_disk_fault_keeps_its_kind_through_the_status() {
        let full = Status::from(io_error(libc::ENOSPC));
        assert_eq!(full.code(), tonic::Code::ResourceExhausted);
        assert!(
            full.message().contains("write /pool/bulwark/vol/journal")
                && full.message().contains("No space left on device"),
            "{}",
            full.message()
        );
        assert_eq!(disk_fault(&full), Some(DiskFault::Full));
        let quota = Status::from(io_error(libc::EDQUOT));
        assert_eq!(disk_fault(&quota), Some(DiskFault::Full));
        let eio = Status::from(io_error(libc::EIO));
        assert_eq!(eio.code(), tonic::Code::Internal);
        assert!(eio.message().contains("Input/output error"), "{eio:?}");
        assert_eq!(disk_fault(&eio), Some(DiskFault::Failed));
        // Not an I/O error: no fault.
        let other = Status::from(StoreError::NoPoints("vol".into()));
        assert_eq!(disk_fault(&other), None);
        let full_allocation = Status::from(StoreError::AllocationFull {
            source_name: "vol".into(),
            need: 1,
            allocated: 0,
            used: 0,
        });
        assert_eq!(full_allocation.code(), tonic::Code::ResourceExhausted);
        assert_eq!(disk_fault(&full_allocation), None);
    }
}
