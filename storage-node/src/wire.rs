//! The node's wire boundary: each request is parsed into domain types once, where it
//! is received (`TryFrom` the proto message), and domain values become messages here.
//! A message the protocol does not allow is a [`ProtocolError`], answered as
//! `InvalidArgument`; past this module the node's code sees checked names,
//! geometries and points, never a raw request.

use bulwark_common::block::Geometry;
use bulwark_common::name::{AgentName, NodeName, SourceName};
use bulwark_common::point::{Consistency, PointKind};
use bulwark_common::retention::Retention;
use bulwark_common::tls::Target;
use bulwark_proto as pb;

use crate::store::lock::{LockMode, RetentionLock};
use crate::store::{PointMeta, SourcePolicy, VerifyOutcome};

/// A request the protocol does not allow.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// A data source name that is not one (counted as a `bad-name` refusal).
    #[error("{0}")]
    BadName(String),
    /// Anything else that breaks the protocol.
    #[error("{0}")]
    Invalid(String),
}

impl ProtocolError {
    fn invalid(why: impl Into<String>) -> ProtocolError {
        ProtocolError::Invalid(why.into())
    }
}

/// Parses a data source name received on the wire.
pub fn source(s: &str) -> Result<SourceName, ProtocolError> {
    SourceName::parse(s).map_err(|e| ProtocolError::BadName(e.to_string()))
}

/// A sync's opening `SyncBegin`, checked.
#[derive(Debug, Clone)]
pub struct SyncStart {
    pub source: SourceName,
    pub geometry: Geometry,
    /// The assignment epoch the agent syncs under.
    pub epoch: u64,
    /// The point the agent's changes are relative to (ignored with `want_digests`).
    pub base_point: u64,
    pub consistency: Consistency,
    /// `None`: not said (an incremental).
    pub kind: Option<PointKind>,
    /// The agent wants the newest point's digests (a check).
    pub want_digests: bool,
    /// The digests are recomputed from the replica (needs `want_digests`).
    pub deep: bool,
}

impl SyncStart {
    /// The store's sync for this start, given the source's `newest` point here (0:
    /// none) and the coordinator's `policy`: its base is the newest point for a
    /// check (`want_digests`), else the agent's base; its kind the agent's (a source
    /// with no point yet gets a full one).
    pub fn spec(&self, newest: u64, policy: Option<SourcePolicy>) -> crate::store::SyncSpec {
        let base_point = if self.want_digests {
            newest
        } else {
            self.base_point
        };
        let kind = match self.kind {
            _ if base_point == 0 => PointKind::Full,
            Some(k) => k,
            None => PointKind::Incremental,
        };
        crate::store::SyncSpec {
            source: self.source.clone(),
            geometry: self.geometry,
            base_point,
            consistency: self.consistency,
            kind,
            policy,
        }
    }
}

/// The first message of a sync stream (`None`: the stream ended).
impl TryFrom<Option<pb::SyncMessage>> for SyncStart {
    type Error = ProtocolError;
    fn try_from(first: Option<pb::SyncMessage>) -> Result<SyncStart, ProtocolError> {
        let begin = match first {
            Some(pb::SyncMessage {
                msg: Some(pb::sync_message::Msg::Begin(b)),
            }) => b,
            _ => return Err(ProtocolError::invalid("a sync must start with SyncBegin")),
        };
        // Not counted as a bad-name refusal, as it never was for a sync.
        let source = SourceName::parse(begin.source.as_str())
            .map_err(|e| ProtocolError::Invalid(e.to_string()))?;
        let geometry = Geometry::new(begin.size_bytes, begin.block_size)
            .map_err(|e| ProtocolError::Invalid(format!("data source {source}: {e}")))?;
        if begin.deep && !begin.want_digests {
            return Err(ProtocolError::invalid(
                "a deep check (deep) needs want_digests",
            ));
        }
        Ok(SyncStart {
            source,
            geometry,
            epoch: begin.epoch,
            base_point: begin.base_point,
            consistency: Consistency::from_proto(begin.consistency),
            kind: PointKind::from_proto(begin.kind),
            want_digests: begin.want_digests,
            deep: begin.deep,
        })
    }
}

/// A log ship's opening `LogBegin`, checked.
#[derive(Debug, Clone)]
pub struct ShipStart {
    pub source: SourceName,
    pub epoch: u64,
}

/// The first message of a log ship stream (`None`: the stream ended).
impl TryFrom<Option<pb::LogMessage>> for ShipStart {
    type Error = ProtocolError;
    fn try_from(first: Option<pb::LogMessage>) -> Result<ShipStart, ProtocolError> {
        match first {
            Some(pb::LogMessage {
                msg: Some(pb::log_message::Msg::Begin(b)),
            }) => Ok(ShipStart {
                source: source(&b.source)?,
                epoch: b.epoch,
            }),
            _ => Err(ProtocolError::invalid(
                "a log ship must start with LogBegin",
            )),
        }
    }
}

/// A point of a source (point 0: the newest), as restores and verifies name it.
#[derive(Debug, Clone)]
pub struct PointRef {
    pub source: SourceName,
    pub point: u64,
}

impl TryFrom<pb::NodeRestoreRequest> for PointRef {
    type Error = ProtocolError;
    fn try_from(r: pb::NodeRestoreRequest) -> Result<PointRef, ProtocolError> {
        Ok(PointRef {
            source: source(&r.source)?,
            point: r.point,
        })
    }
}

impl TryFrom<pb::NodeVerifyRequest> for PointRef {
    type Error = ProtocolError;
    fn try_from(r: pb::NodeVerifyRequest) -> Result<PointRef, ProtocolError> {
        Ok(PointRef {
            source: source(&r.source)?,
            point: r.point,
        })
    }
}

/// Where to copy a moving source in from.
#[derive(Debug, Clone)]
pub struct ImportFrom {
    pub source: SourceName,
    /// The exporting node's name (only that node may answer at the address).
    pub node: String,
    pub address: Target,
}

impl TryFrom<pb::ImportRequest> for ImportFrom {
    type Error = ProtocolError;
    fn try_from(r: pb::ImportRequest) -> Result<ImportFrom, ProtocolError> {
        let source = source(&r.source)?;
        NodeName::parse(r.from_node.as_str()).map_err(|e| ProtocolError::Invalid(e.to_string()))?;
        let address = Target::parse(&r.from_address)
            .map_err(|m| ProtocolError::Invalid(format!("from_address: {m}")))?;
        Ok(ImportFrom {
            source,
            node: r.from_node,
            address,
        })
    }
}

/// A retention lock to set: mode and minimum age (`None`: no lock).
#[derive(Debug, Clone)]
pub struct LockChange {
    pub source: SourceName,
    pub want: Option<(LockMode, u64)>,
}

impl TryFrom<pb::SetLockRequest> for LockChange {
    type Error = ProtocolError;
    fn try_from(r: pb::SetLockRequest) -> Result<LockChange, ProtocolError> {
        let source = source(&r.source)?;
        let want = r.lock.as_ref().and_then(lock_from_proto);
        if r.lock
            .as_ref()
            .is_some_and(|l| l.min_age_ms > 0 && want.is_none())
        {
            return Err(ProtocolError::invalid(
                "a lock needs a mode: governance or compliance",
            ));
        }
        Ok(LockChange { source, want })
    }
}

/// A restore grant the coordinator gives (or with `withdraw` takes back).
#[derive(Debug, Clone)]
pub struct GrantChange {
    pub source: SourceName,
    pub agent: String,
    pub expires_at_ms: i64,
    /// The points covered; never 0 in a grant (a withdrawal of none: all).
    pub points: Vec<u64>,
    pub withdraw: bool,
}

impl TryFrom<pb::GrantRestoreRequest> for GrantChange {
    type Error = ProtocolError;
    fn try_from(g: pb::GrantRestoreRequest) -> Result<GrantChange, ProtocolError> {
        let source = source(&g.source)?;
        AgentName::parse(g.agent.as_str()).map_err(|e| ProtocolError::Invalid(e.to_string()))?;
        if !g.withdraw && (g.points.is_empty() || g.points.contains(&0)) {
            return Err(ProtocolError::invalid(
                "a restore grant names the points it covers (no 0)",
            ));
        }
        Ok(GrantChange {
            source,
            agent: g.agent,
            expires_at_ms: g.expires_at_ms,
            points: g.points,
            withdraw: g.withdraw,
        })
    }
}

/// Converts a stored point for the wire.
pub fn point_to_proto(p: &PointMeta) -> pb::Point {
    pb::Point {
        id: p.id,
        created_at_ms: p.created_ms,
        consistency: p.consistency.to_proto(),
        kind: p.kind.to_proto(),
        blocks_changed: p.blocks_changed,
        bytes_changed: p.bytes_changed,
        stored_bytes: p.stored_bytes(),
        logical_bytes: p.logical_bytes(),
        damaged_blocks: p.damaged.clone(),
        files_changed: p.files_changed,
        lock_mode: pb::LockMode::None as i32,
        locked_until_ms: 0,
    }
}

/// A source's points for the wire, each with the lock that holds it at `now_ms`.
pub fn points_to_proto(
    points: &[PointMeta],
    lock: Option<RetentionLock>,
    now_ms: i64,
) -> pb::ListPointsResponse {
    pb::ListPointsResponse {
        points: points
            .iter()
            .map(|p| {
                let mut out = point_to_proto(p);
                if let Some(l) = lock.filter(|l| l.holds(p.created_ms, now_ms)) {
                    out.lock_mode = lock_to_proto(Some(l)).mode;
                    out.locked_until_ms = l.until(p.created_ms);
                }
                out
            })
            .collect(),
    }
}

/// A verify's outcome for the wire: `points` are the source's points (those the
/// verify found damaged are listed), `duration_ms` how long it took.
pub fn verify_report(
    source: &SourceName,
    out: &VerifyOutcome,
    points: &[PointMeta],
    duration_ms: u64,
) -> pb::VerifyReport {
    let damaged_points = points
        .iter()
        .filter(|p| out.damaged_points.iter().any(|(id, _)| *id == p.id))
        .map(point_to_proto)
        .collect();
    pb::VerifyReport {
        source: source.to_string(),
        blocks_checked: out.blocks_checked,
        bytes_read: out.bytes_read,
        damaged_replica_blocks: out.damaged_replica.clone(),
        damaged_points,
        duration_ms,
        repaired_blocks: 0,
        repair_error: String::new(),
    }
}

/// The coordinator's policy for a source, for the store.
pub fn policy_from_proto(p: &pb::Policy) -> SourcePolicy {
    SourcePolicy {
        replica_alloc_bytes: p.replica_alloc_bytes,
        points_alloc_bytes: p.points_alloc_bytes,
        retention: Retention::from_proto(p.retention.as_ref()),
        keep_after_ms: p.keep_after_ms,
        lock: p.lock.as_ref().and_then(lock_from_proto),
    }
}

/// A lock on the wire: mode and minimum age (`None`: no lock).
pub fn lock_from_proto(l: &pb::RetentionLock) -> Option<(LockMode, u64)> {
    let mode = match pb::LockMode::try_from(l.mode) {
        Ok(pb::LockMode::Governance) => LockMode::Governance,
        Ok(pb::LockMode::Compliance) => LockMode::Compliance,
        _ => return None,
    };
    (l.min_age_ms > 0).then_some((mode, l.min_age_ms))
}

/// A lock for the wire.
pub fn lock_to_proto(l: Option<RetentionLock>) -> pb::RetentionLock {
    match l {
        None => pb::RetentionLock::default(),
        Some(l) => pb::RetentionLock {
            mode: match l.mode {
                LockMode::Governance => pb::LockMode::Governance,
                LockMode::Compliance => pb::LockMode::Compliance,
            } as i32,
            min_age_ms: l.min_age_ms,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn begin(b: pb::SyncBegin) -> Option<pb::SyncMessage> {
        Some(pb::SyncMessage {
            msg: Some(pb::sync_message::Msg::Begin(b)),
        })
    }

    fn status(e: ProtocolError) -> tonic::Status {
        e.into()
    }

    #[test]
    fn a_sync_starts_with_a_checked_begin() {
        let ok = pb::SyncBegin {
            source: "s1".into(),
            epoch: 3,
            size_bytes: 1 << 20,
            block_size: 65536,
            ..Default::default()
        };
        let start = SyncStart::try_from(begin(ok.clone())).expect("a good begin");
        assert_eq!((start.source.as_str(), start.epoch), ("s1", 3));
        assert_eq!(start.geometry.block_count(), 16);

        let e = status(SyncStart::try_from(None).expect_err("no begin"));
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert_eq!(e.message(), "a sync must start with SyncBegin");

        let bad_size = pb::SyncBegin {
            block_size: 1000,
            ..ok.clone()
        };
        let e = status(SyncStart::try_from(begin(bad_size)).expect_err("block size"));
        assert_eq!(
            e.message(),
            "data source s1: block size 1000 is not a power of two between 4 KiB and 4 MiB"
        );

        let deep = pb::SyncBegin { deep: true, ..ok };
        let e = status(SyncStart::try_from(begin(deep)).expect_err("deep alone"));
        assert_eq!(e.message(), "a deep check (deep) needs want_digests");
    }

    #[test]
    fn grants_and_locks_are_checked_at_the_edge() {
        let grant = pb::GrantRestoreRequest {
            source: "s1".into(),
            agent: "a1".into(),
            points: vec![0],
            ..Default::default()
        };
        let e = status(GrantChange::try_from(grant.clone()).expect_err("point 0"));
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            e.message(),
            "a restore grant names the points it covers (no 0)"
        );
        // Withdrawing names no points, or any.
        let withdraw = pb::GrantRestoreRequest {
            withdraw: true,
            points: vec![],
            ..grant
        };
        GrantChange::try_from(withdraw).expect("a withdrawal of all");

        let lock = pb::SetLockRequest {
            source: "s1".into(),
            lock: Some(pb::RetentionLock {
                mode: pb::LockMode::None as i32,
                min_age_ms: 1000,
            }),
        };
        let e = status(LockChange::try_from(lock).expect_err("no mode"));
        assert_eq!(e.message(), "a lock needs a mode: governance or compliance");
    }

    #[test]
    fn an_import_names_a_node_and_an_https_address() {
        let r = pb::ImportRequest {
            source: "s1".into(),
            from_node: "node-1".into(),
            from_address: "http://n1:7443".into(),
        };
        let e = status(ImportFrom::try_from(r).expect_err("plain http"));
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("from_address: "), "{}", e.message());
        let e = status(source("../x").expect_err("a path is no name"));
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }
}
