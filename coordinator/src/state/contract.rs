//! What every [`StateStore`] must do, checked against a backend by its tests.
//! Leaves `nodes/n2 = "two"` behind, for a durability check after a reopen.

use super::{StateStore, Txn};

/// Runs the contract against an empty store.
pub fn check(s: &dyn StateStore) {
    assert_eq!(s.get("nodes", b"n1").expect("get"), None);
    s.put("nodes", b"n1", b"one".to_vec()).expect("put");
    s.put("nodes", b"n2", b"two".to_vec()).expect("put");
    s.put("nodes", b"m1", b"em".to_vec()).expect("put");
    s.put("sources", b"n1", b"other tree".to_vec())
        .expect("put");
    assert_eq!(s.get("nodes", b"n1").expect("get"), Some(b"one".to_vec()));

    // Scans: by prefix, in key order, one tree only.
    let all: Vec<Vec<u8>> = s
        .scan("nodes", b"")
        .expect("scan")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(all, vec![b"m1".to_vec(), b"n1".to_vec(), b"n2".to_vec()]);
    let n = s.scan("nodes", b"n").expect("scan");
    assert_eq!(
        n,
        vec![
            (b"n1".to_vec(), b"one".to_vec()),
            (b"n2".to_vec(), b"two".to_vec())
        ]
    );
    assert!(s.scan("alerts", b"").expect("scan").is_empty());

    // A failed condition changes nothing, not even the ops before the failing one.
    let t = Txn::new()
        .when("nodes", b"n1".to_vec(), Some(b"one".to_vec()))
        .when("sources", b"n1".to_vec(), Some(b"not this".to_vec()))
        .put("nodes", b"n1".to_vec(), b"changed".to_vec())
        .delete("nodes", b"m1".to_vec());
    assert!(!s.commit(t).expect("commit"));
    assert_eq!(s.get("nodes", b"n1").expect("get"), Some(b"one".to_vec()));
    assert_eq!(s.get("nodes", b"m1").expect("get"), Some(b"em".to_vec()));

    // Conditions that hold (a value, an absence) apply every op across trees.
    let t = Txn::new()
        .when("nodes", b"n1".to_vec(), Some(b"one".to_vec()))
        .when("alerts", b"a".to_vec(), None)
        .put("nodes", b"n1".to_vec(), b"changed".to_vec())
        .put("alerts", b"a".to_vec(), b"raised".to_vec())
        .delete("nodes", b"m1".to_vec());
    assert!(s.commit(t).expect("commit"));
    assert_eq!(
        s.get("nodes", b"n1").expect("get"),
        Some(b"changed".to_vec())
    );
    assert_eq!(
        s.get("alerts", b"a").expect("get"),
        Some(b"raised".to_vec())
    );
    assert_eq!(s.get("nodes", b"m1").expect("get"), None);

    // Compare-and-swap: of two swaps from the same old value, one wins.
    let swap = |new: &[u8]| {
        s.commit(
            Txn::new()
                .when("alerts", b"a".to_vec(), Some(b"raised".to_vec()))
                .put("alerts", b"a".to_vec(), new.to_vec()),
        )
        .expect("commit")
    };
    assert!(swap(b"first"));
    assert!(!swap(b"second"));
    assert_eq!(s.get("alerts", b"a").expect("get"), Some(b"first".to_vec()));

    // Binary keys and values survive as they are.
    let key = [0u8, 0xff, b'/', 7];
    s.put("forecast", &key, vec![0, 1, 2, 0xff]).expect("put");
    assert_eq!(
        s.get("forecast", &key).expect("get"),
        Some(vec![0, 1, 2, 0xff])
    );
    s.delete("forecast", &key).expect("delete");
    assert_eq!(s.get("forecast", &key).expect("get"), None);
}
