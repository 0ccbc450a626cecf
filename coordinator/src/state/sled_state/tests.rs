//! A coordinator's sled data from before the state trait (written as the registry
//! wrote it then: sled at `data_dir/registry`, one tree per kind, JSON values) is
//! read by the registry over [`SledState`] as it is, and what it writes now lands
//! in the same trees.

use std::path::Path;
use std::time::Duration;

use super::{SledState, StateError, StateStore};
use crate::enroll::TOKENS;
use crate::registry::{
    AgentRecord, AlertRecord, GroupRecord, NodeRecord, Registry, RegistryError, SourceRecord,
};
use crate::revocation::REVOCATIONS;

/// The old registry's database, opened as it opened it.
fn old_db(data_dir: &Path) -> sled::Db {
    retry_lock(|| {
        sled::Config::new()
            .path(data_dir.join("registry"))
            .cache_capacity(16 * 1024 * 1024)
            .open()
            .map_err(|e| e.to_string())
    })
}

/// Retries while sled's flusher thread of a dropped handle still holds the file
/// lock (a moment after the drop), for up to 5 s.
fn retry_lock<T>(mut open: impl FnMut() -> Result<T, String>) -> T {
    for _ in 0..500 {
        match open() {
            Err(m) if m.contains("could not acquire lock") => {
                std::thread::sleep(Duration::from_millis(10));
            }
            r => return r.expect("open"),
        }
    }
    panic!("the sled lock stayed taken for 5 s");
}

fn json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).expect("json")
}

fn put<T: serde::Serialize>(db: &sled::Db, tree: &str, key: &[u8], v: &T) {
    db.open_tree(tree)
        .expect("tree")
        .insert(key, serde_json::to_vec(v).expect("json"))
        .expect("insert");
}

#[test]
fn a_registry_written_before_the_state_trait_is_read_as_it_is() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node: NodeRecord = serde_json::from_value(serde_json::json!({
        "v": 1, "name": "n1", "address": "https://n1:7443", "capacity_bytes": 1u64 << 40,
        "allocated_bytes": 0, "used_bytes": 0, "live_streams": 0,
        "last_seen_ms": 1_700_000_000_000i64, "version": "0.9"
    }))
    .expect("node");
    let mut source = SourceRecord::new("vm1", "host-1", "volume", "fingerprint", 1 << 30, 65536);
    source.node = Some("n1".into());
    source.epoch = 3;
    source.group = "db".into();
    let agent = AgentRecord {
        v: 1,
        name: "host-1".into(),
        last_seen_ms: 1_700_000_000_000,
        version: "0.9".into(),
        sources: vec!["vm1".into()],
        cert_not_after_ms: 0,
    };
    let group: GroupRecord = serde_json::from_value(serde_json::json!({
        "v": 1, "name": "db", "interval_ms": 3_600_000u64, "retention": null
    }))
    .expect("group");
    let alert = AlertRecord {
        v: 1,
        key: "disk-slow/n1".into(),
        severity: "warning".into(),
        subject: "n1".into(),
        message: "slow".into(),
        origin: "n1".into(),
        first_seen_ms: 1,
        last_seen_ms: 2,
        resolved_ms: 0,
    };
    let token =
        br#"{"v":1,"role":"agent","name":"host-9","created_ms":1,"expires_ms":2,"used_ms":0}"#;
    {
        let db = old_db(dir.path());
        put(&db, "nodes", b"n1", &node);
        put(&db, "sources", b"vm1", &source);
        put(&db, "agents", b"host-1", &agent);
        put(&db, "groups", b"db", &group);
        put(&db, "alerts", alert.key.as_bytes(), &alert);
        put(&db, "revocations", b"version", &42u64);
        let tokens = db.open_tree("tokens").expect("tree");
        tokens.insert(b"abc", token.as_slice()).expect("insert");
        db.flush().expect("flush");
    }
    let reg = retry_lock(
        || match Registry::open(dir.path(), Duration::from_secs(60)) {
            Err(RegistryError::State(StateError::Unavailable(m))) => Err(m),
            r => Ok(r.expect("open")),
        },
    );
    assert_eq!(json(&reg.node("n1").expect("node")), json(&Some(node)));
    assert_eq!(json(&reg.source("vm1").expect("source")), json(&source));
    assert_eq!(json(&reg.agents().expect("agents")), json(&vec![agent]));
    assert_eq!(json(&reg.groups().expect("groups")), json(&vec![group]));
    assert_eq!(
        json(&reg.alerts(false).expect("alerts")),
        json(&vec![alert])
    );
    let state = reg.state();
    assert_eq!(
        state.get(TOKENS, b"abc").expect("token"),
        Some(token.to_vec())
    );
    assert_eq!(
        state.get(REVOCATIONS, b"version").expect("version"),
        Some(b"42".to_vec())
    );
    // What the registry writes now is where the old code (and a downgrade) reads.
    reg.set_next_sync("vm1", 1234).expect("write");
    drop(reg);
    let db = old_db(dir.path());
    let raw = db
        .open_tree("sources")
        .expect("tree")
        .get(b"vm1")
        .expect("get")
        .expect("the source");
    let back: SourceRecord = serde_json::from_slice(&raw).expect("record");
    assert_eq!((back.next_sync_ms, back.epoch), (1234, 3));
    drop(db);
    // And the sled state opens what the old code wrote, directly.
    let s = retry_lock(|| match SledState::open(&dir.path().join("registry")) {
        Err(StateError::Unavailable(m)) => Err(m),
        r => Ok(r.expect("open")),
    });
    assert_eq!(s.scan("nodes", b"").expect("scan").len(), 1);
}
