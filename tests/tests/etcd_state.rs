//! The coordinator's etcd state backend against real etcd members (tests/src/etcd.rs):
//! the state contract every backend meets, fencing of a deposed leader, a 3-member
//! cluster losing one and then two members, and TLS with client certificates.
//! Each test skips (facility `etcd`) where no `etcd` binary is installed.

use std::time::{Duration, Instant};

use bulwark_coordinator::state::etcd::{EtcdOptions, EtcdTls, Role};
use bulwark_coordinator::state::{EtcdState, StateError, StateStore, Txn, contract};
use bulwark_tests::etcd::EtcdCluster;
use bulwark_tests::poll;

fn options(endpoints: Vec<String>, timeout: Duration) -> EtcdOptions {
    EtcdOptions {
        endpoints,
        prefix: "/bulwark-test".into(),
        tls: None,
        timeout,
    }
}

fn connect(c: &EtcdCluster) -> EtcdState {
    EtcdState::connect(&options(c.endpoints(), Duration::from_secs(5))).expect("connect to etcd")
}

/// The contract, durability across a new connection, scans of more than one page
/// (10,500 keys), and prefixes that keep deployments apart.
#[test]
fn etcd_state_meets_the_contract() {
    let Some(cluster) = EtcdCluster::start(1) else {
        return;
    };
    let s = connect(&cluster);
    contract::check(&s);
    drop(s);
    let s = connect(&cluster);
    assert_eq!(
        s.get("nodes", b"n2").expect("get"),
        Some(b"two".to_vec()),
        "a committed put is not there for a new connection"
    );
    assert!(
        s.describe().contains(&cluster.endpoint(0)),
        "{}",
        s.describe()
    );

    // 10,500 keys: eleven pages of a scan, in key order, nothing else in the tree.
    let n = 10_500usize;
    let start = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let mut t = Txn::new();
        for i in chunk {
            t = t.put(
                "sources",
                format!("s{i:06}").into_bytes(),
                i.to_le_bytes().to_vec(),
            );
        }
        assert!(s.commit(t).expect("commit 100 puts"));
    }
    let committed = start.elapsed();
    let start = Instant::now();
    let all = s.scan("sources", b"s").expect("scan 10,500 keys");
    eprintln!(
        "1 member: 105 commits of 100 puts in {committed:?}; a scan of {n} keys in {:?}",
        start.elapsed()
    );
    assert_eq!(all.len(), n, "a large scan lost or repeated keys");
    for (i, (k, v)) in all.iter().enumerate() {
        assert_eq!(k, &format!("s{i:06}").into_bytes());
        assert_eq!(v, &i.to_le_bytes().to_vec());
    }
    assert_eq!(s.scan("sources", b"s0001").expect("scan").len(), 100);

    // One conditional commit at a time, each a round trip to a quorum.
    let mut times: Vec<Duration> = (0..200)
        .map(|i| {
            let t = Instant::now();
            let txn = Txn::new()
                .when("alerts", format!("c{i}").into_bytes(), None)
                .put("alerts", format!("c{i}").into_bytes(), b"x".to_vec());
            assert!(s.commit(txn).expect("commit"));
            t.elapsed()
        })
        .collect();
    times.sort();
    eprintln!(
        "1 member: conditional commit p50 {:?} p99 {:?}",
        times[100], times[197]
    );

    // Another prefix is another state.
    let mut other = options(cluster.endpoints(), Duration::from_secs(5));
    other.prefix = "/other".into();
    let o = EtcdState::connect(&other).expect("connect");
    assert!(o.scan("sources", b"").expect("scan").is_empty());
    assert_eq!(o.get("nodes", b"n2").expect("get"), None);
}

fn wait_role(
    what: &str,
    e: &bulwark_coordinator::state::etcd::Election,
    ok: impl Fn(&Role) -> bool,
) -> Role {
    poll(what, Duration::from_secs(30), || {
        let r = e.role();
        if ok(&r) { Ok(r) } else { Err(r.to_string()) }
    })
}

/// Two coordinators on one cluster: A leads, B follows and its fenced writes are
/// refused. A stops renewing its lease (as if stopped by SIGSTOP): it stops
/// claiming leadership, B takes over, A's late writes are refused (by its own check,
/// and by etcd's compare for a write that got past that check), none reaches etcd,
/// and A rejoins as a follower. B resigns: A leads again.
#[test]
fn a_deposed_leader_cannot_write() {
    let Some(cluster) = EtcdCluster::start(1) else {
        return;
    };
    let lease = Duration::from_secs(2);
    let a = connect(&cluster);
    let b = connect(&cluster);
    let ea = a
        .elect("coordinator-a", "https://a.test:7440", lease)
        .expect("elect a");
    let rev_a = match wait_role("A to lead", &ea, |r| matches!(r, Role::Leader { .. })) {
        Role::Leader { revision } => revision,
        r => panic!("not leading: {r}"),
    };
    let eb = b
        .elect("coordinator-b", "https://b.test:7440", lease)
        .expect("elect b");
    wait_role("B to follow A", &eb, |r| matches!(r, Role::Follower { .. }));
    assert_eq!(eb.leader_url().as_deref(), Some("https://a.test:7440"));
    assert_eq!(a.leader().expect("leader").map(|l| l.revision), Some(rev_a));

    let fa = a.fenced(&ea);
    let fb = b.fenced(&eb);
    fa.put("sources", b"s1", b"by a".to_vec())
        .expect("the leader writes");
    match fb.put("sources", b"s1", b"by b".to_vec()) {
        Err(StateError::Fenced(m)) => assert!(m.contains("follower"), "{m}"),
        other => panic!("a follower's fenced write was not refused: {other:?}"),
    }
    // A failed condition under a valid fence is a plain `false`, not a fence error.
    let t = Txn::new().when("sources", b"s1".to_vec(), Some(b"other".to_vec()));
    assert!(!fa.commit(t).expect("a failed condition"));

    // A stops renewing; its role goes, then B leads.
    let suspended = Instant::now();
    ea.suspend();
    wait_role("A to stop claiming leadership", &ea, |r| {
        !matches!(r, Role::Leader { .. })
    });
    let deposed = suspended.elapsed();
    let rev_b = match wait_role("B to lead", &eb, |r| matches!(r, Role::Leader { .. })) {
        Role::Leader { revision } => revision,
        r => panic!("not leading: {r}"),
    };
    eprintln!(
        "lease {lease:?}: A stopped claiming leadership {deposed:?} after its renewals stopped; B led after {:?}",
        suspended.elapsed()
    );
    assert_ne!(rev_a, rev_b);
    match fa.put("sources", b"late", b"a's late write".to_vec()) {
        Err(StateError::Fenced(_)) => {}
        other => panic!("the deposed leader's write was not refused: {other:?}"),
    }
    // What etcd does with a write that carries A's old fence: refused as a whole,
    // naming the new leader.
    let stale = a.fenced_at(rev_a);
    let t = Txn::new()
        .put("sources", b"late".to_vec(), b"a's late write".to_vec())
        .delete("sources", b"s1".to_vec());
    match stale.commit(t) {
        Err(StateError::Fenced(m)) => {
            assert!(
                m.contains("coordinator-b") && m.contains("https://b.test:7440"),
                "{m}"
            )
        }
        other => panic!("etcd applied a write under a stale fence: {other:?}"),
    }
    assert_eq!(
        b.get("sources", b"late").expect("get"),
        None,
        "a late write reached etcd"
    );
    assert_eq!(
        b.get("sources", b"s1").expect("get"),
        Some(b"by a".to_vec())
    );
    fb.put("sources", b"s2", b"by b".to_vec())
        .expect("the new leader writes");

    // A comes back: a follower of B.
    ea.resume();
    wait_role("A to follow B", &ea, |r| matches!(r, Role::Follower { .. }));
    assert_eq!(ea.leader_url().as_deref(), Some("https://b.test:7440"));

    // B resigns (clean shutdown): A takes over without waiting for a lease to expire.
    let mut watch = ea.watch();
    eb.resign().expect("resign");
    wait_role("A to lead again", &ea, |r| matches!(r, Role::Leader { .. }));
    assert!(matches!(*watch.borrow_and_update(), Role::Leader { .. }));
    fa.put("sources", b"s3", b"by a again".to_vec())
        .expect("A writes again");
    assert!(matches!(
        fb.put("sources", b"s4", vec![]),
        Err(StateError::Fenced(_))
    ));
}

/// The index of the member that leads etcd's raft group, as the members say.
fn raft_leader(cluster: &EtcdCluster) -> usize {
    let probe = connect(cluster);
    poll("etcd's raft leader", Duration::from_secs(30), || {
        let (health, _) = probe.cluster_health().map_err(|e| e.to_string())?;
        health
            .iter()
            .position(|m| matches!(m.status, Ok((_, true))))
            .ok_or_else(|| format!("no member says it leads: {health:?}"))
    })
}

/// Three members. A member that does not lead etcd's raft group killed (the client's
/// first endpoint, so the client fails over) changes nothing. Two killed: writes and
/// reads fail within the request timeout saying why, and the coordinator that led
/// stops leading, saying why. Both back: everything works again with nothing lost.
/// Then etcd's raft leader killed: the next commit succeeds (sent again to another
/// member once the first send got no answer).
#[test]
fn three_members_tolerate_one_loss_and_say_when_quorum_is_gone() {
    let Some(mut cluster) = EtcdCluster::start(3) else {
        return;
    };
    let leader = raft_leader(&cluster);
    let follower = (leader + 1) % 3;
    let other = 3 - leader - follower;
    let endpoints = [follower, leader, other]
        .map(|i| cluster.endpoint(i))
        .to_vec();
    let s = EtcdState::connect(&options(endpoints, Duration::from_secs(5))).expect("connect");
    s.put("nodes", b"n1", b"before".to_vec()).expect("put");
    let election = s
        .elect("c1", "https://c1.test:7440", Duration::from_secs(2))
        .expect("elect");
    wait_role("c1 to lead", &election, |r| {
        matches!(r, Role::Leader { .. })
    });
    let fenced = s.fenced(&election);

    cluster.kill(follower);
    s.put("nodes", b"n2", b"one member down".to_vec())
        .expect("put with one member down");
    assert_eq!(
        s.get("nodes", b"n1").expect("get"),
        Some(b"before".to_vec())
    );
    assert_eq!(s.scan("nodes", b"").expect("scan").len(), 2);
    assert!(election.is_leader(), "{}", election.role());
    fenced
        .put("nodes", b"n2f", b"fenced, one member down".to_vec())
        .expect("the leader writes with one member down");

    cluster.kill(other);
    let start = Instant::now();
    let e = s
        .put("nodes", b"n3", b"no quorum".to_vec())
        .expect_err("a write without quorum");
    eprintln!(
        "a write without quorum failed after {:?}: {e}",
        start.elapsed()
    );
    match &e {
        StateError::Unavailable(m) => {
            assert!(m.contains("no quorum / unreachable"), "{m}");
            assert!(
                m.contains(&cluster.endpoint(leader)),
                "no endpoint named: {m}"
            );
        }
        other => panic!("not Unavailable: {other:?}"),
    }
    let e = s.get("nodes", b"n1").expect_err("a read without quorum");
    assert!(e.to_string().contains("no quorum / unreachable"), "{e}");
    // The leader cannot renew: it stops leading and says why; its writes are refused.
    let r = wait_role(
        "c1 to say there is no quorum",
        &election,
        |r| matches!(r, Role::NoLeader { why } if why.contains("no quorum")),
    );
    eprintln!("without quorum: {r}");
    assert!(matches!(
        fenced.put("nodes", b"n3f", vec![]),
        Err(StateError::Fenced(_))
    ));

    cluster.start_member(follower);
    cluster.start_member(other);
    for i in 0..3 {
        cluster.wait_healthy(i);
    }
    poll(
        "a write after quorum is back",
        Duration::from_secs(30),
        || {
            s.put("nodes", b"n4", b"back".to_vec())
                .map_err(|e| e.to_string())
        },
    );
    assert_eq!(
        s.get("nodes", b"n1").expect("get"),
        Some(b"before".to_vec())
    );
    assert_eq!(
        s.get("nodes", b"n2").expect("get"),
        Some(b"one member down".to_vec())
    );
    assert_eq!(s.get("nodes", b"n3f").expect("get"), None);
    wait_role("c1 to lead again", &election, |r| {
        matches!(r, Role::Leader { .. })
    });
    fenced
        .put("nodes", b"n5f", b"leading again".to_vec())
        .expect("the leader writes again");

    // etcd's raft leader killed: a commit caught in etcd's election is sent again
    // to another member (its marker makes that harmless) and succeeds.
    let raft = raft_leader(&cluster);
    cluster.kill(raft);
    let start = Instant::now();
    let t = Txn::new().when("nodes", b"n6".to_vec(), None).put(
        "nodes",
        b"n6".to_vec(),
        b"new raft leader".to_vec(),
    );
    assert!(
        s.commit(t)
            .expect("a commit while etcd elects a new raft leader")
    );
    eprintln!(
        "etcd's raft leader killed: the next commit succeeded after {:?}",
        start.elapsed()
    );
    assert_eq!(
        s.get("nodes", b"n6").expect("get"),
        Some(b"new raft leader".to_vec())
    );
}

/// TLS to etcd with client certificates: the coordinator's certificate is
/// accepted; one from another CA is refused, and the error says so.
#[test]
fn etcd_over_tls_with_client_certificates() {
    let Some(cluster) = EtcdCluster::start_tls(1) else {
        return;
    };
    let files = cluster.tls().expect("a TLS cluster").clone();
    let mut opts = options(cluster.endpoints(), Duration::from_secs(5));
    assert!(opts.endpoints[0].starts_with("https://"));
    opts.tls = Some(EtcdTls {
        ca: files.ca.clone(),
        cert: files.client_cert.clone(),
        key: files.client_key.clone(),
    });
    let s = EtcdState::connect(&opts).expect("connect");
    s.put("nodes", b"n1", b"over tls".to_vec())
        .expect("put over TLS");
    assert_eq!(
        s.get("nodes", b"n1").expect("get"),
        Some(b"over tls".to_vec())
    );
    let e = s
        .elect("c", "https://c.test:7440", Duration::from_secs(2))
        .expect("elect");
    wait_role("leadership over TLS", &e, |r| {
        matches!(r, Role::Leader { .. })
    });

    // A client certificate of another CA.
    let other = cluster.dir().join("other-pki");
    bulwark_common::pki::init(&other, "other.test").expect("other CA");
    let stranger = bulwark_common::pki::issue(
        &other,
        &bulwark_common::pki::LeafRequest {
            role: bulwark_common::pki::Role::Coordinator,
            name: "stranger".into(),
            dns: vec![],
            ips: vec![],
            days: 30,
        },
    )
    .expect("issue");
    opts.tls = Some(EtcdTls {
        ca: files.ca.clone(),
        cert: stranger.cert,
        key: stranger.key,
    });
    opts.timeout = Duration::from_secs(2);
    let s = EtcdState::connect(&opts).expect("connect");
    let e = s
        .get("nodes", b"n1")
        .expect_err("a stranger's certificate was accepted");
    eprintln!("stranger: {e}");
    assert!(
        matches!(&e, StateError::Unavailable(m) if m.contains("TLS refused")),
        "{e:?}"
    );
}
