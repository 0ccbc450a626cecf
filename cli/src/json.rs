//! The JSON shapes several commands print: a data source (`sources`, `allocate`,
//! `retention`), a point (`points`), and the retention and lock inside them.

use bulwark_common::point::Consistency;
use bulwark_common::retention::Retention;
use bulwark_common::time::rfc3339_ms;
use bulwark_proto as pb;
use serde_json::{Value, json};

use crate::output::kind_word;

/// A source as `bulwark sources --json` prints it.
pub fn source_json(s: &pb::SourceInfo) -> Value {
    json!({
        "name": s.name, "agent": s.agent, "node": s.node,
        "kind": if s.kind == pb::SourceKind::Log as i32 { "log" } else { "volume" },
        "state": s.state, "recheck_bytes": s.recheck_bytes,
        "size_bytes": s.size_bytes, "last_point": s.last_point,
        "epoch": s.epoch, "block_size": s.block_size,
        "last_sync": rfc3339_ms(s.last_sync_ms), "error": s.error,
        "allocated_bytes": s.allocated_bytes,
        "replica_alloc_bytes": s.replica_alloc_bytes,
        "points_alloc_bytes": s.points_alloc_bytes,
        "points_used_bytes": s.points_used_bytes,
        // The recovery points' bytes before and after the node's compression.
        "logical_bytes": s.points_logical_bytes,
        "stored_bytes": s.points_used_bytes,
        "used_bytes": s.used_bytes, "points": s.points,
        "last_verify": if s.last_verify_ms > 0 { rfc3339_ms(s.last_verify_ms) } else { String::new() },
        "verify_result": s.verify_result,
        "group": s.group,
        "next_sync": if s.next_sync_ms > 0 { rfc3339_ms(s.next_sync_ms) } else { String::new() },
        "progress": s.progress.as_ref().map(|p| json!({
            "op": p.op, "done_bytes": p.done_bytes, "total_bytes": p.total_bytes,
        })),
        "tracker": s.tracker, "warning": s.warning,
        "retention": retention_json(s.retention.as_ref()),
        "retention_from": s.retention_from,
        "policy_refused": s.policy_refused,
        "lock": lock_json(s.lock.as_ref()),
    })
}

/// JSON of a point, as `bulwark points --json` prints it.
pub fn point_json(p: &pb::Point) -> Value {
    json!({
        "id": p.id,
        "created_at": rfc3339_ms(p.created_at_ms),
        "consistency": Consistency::from_proto(p.consistency).as_str(),
        "kind": kind_word(p.kind),
        "blocks_changed": p.blocks_changed,
        "bytes_changed": p.bytes_changed,
        "stored_bytes": p.stored_bytes,
        "logical_bytes": p.logical_bytes,
        "damaged_blocks": p.damaged_blocks,
        "files_changed": p.files_changed,
        "lock": point_lock_json(p),
    })
}

/// A message for a source JSON's `retention` field.
pub fn retention_json(r: Option<&pb::Retention>) -> Value {
    let r = Retention::from_proto(r);
    json!({
        "keep": r.keep, "max_age_ms": r.max_age_ms, "hourly": r.hourly,
        "daily": r.daily, "weekly": r.weekly, "monthly": r.monthly,
        "describe": r.describe(),
    })
}

/// A point's lock for `points --json`: `{mode, until}`, or null.
pub fn point_lock_json(p: &pb::Point) -> Value {
    if p.locked_until_ms == 0 {
        return Value::Null;
    }
    json!({
        "mode": match pb::LockMode::try_from(p.lock_mode) {
            Ok(pb::LockMode::Compliance) => "compliance",
            _ => "governance",
        },
        "until": rfc3339_ms(p.locked_until_ms),
    })
}

/// A source's lock for `sources --json`: `{mode, min_age_ms}`, or null.
pub fn lock_json(l: Option<&pb::RetentionLock>) -> Value {
    match l {
        Some(l) if l.min_age_ms > 0 => json!({
            "mode": match pb::LockMode::try_from(l.mode) {
                Ok(pb::LockMode::Compliance) => "compliance",
                _ => "governance",
            },
            "min_age_ms": l.min_age_ms,
        }),
        _ => Value::Null,
    }
}
