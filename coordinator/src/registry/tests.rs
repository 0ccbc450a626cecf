use super::*;
use crate::policy::Quota;
use bulwark_common::retention::Retention;

fn node(reg: &Registry, name: &str, cap: u64) {
    reg.register_node(
        name,
        &NodeRegistration {
            address: format!("https://127.0.0.1:1/{name}"),
            capacity_bytes: cap,
            version: "t".into(),
        },
    )
    .expect("register");
}

fn spec(name: &str, size: u64) -> pb::SourceSpec {
    pb::SourceSpec {
        name: name.into(),
        kind: pb::SourceKind::Volume as i32,
        size_bytes: size,
        block_size: 65536,
        tracker: "fingerprint".into(),
        inconsistent: false,
        recheck_bytes: 0,
        busy: false,
        policy: None,
        group: String::new(),
    }
}

#[test]
fn an_agent_proposes_and_the_admin_decides() {
    let dir = tempfile::tempdir().expect("tempdir");
    let reg = Registry::open(dir.path(), Duration::from_secs(60))
        .expect("open")
        .with_fleet_policy(FleetPolicy {
            quota: Quota {
                max_source_size_bytes: 10 << 30,
                max_total_bytes: 100 << 30,
            },
            ..FleetPolicy::default()
        });
    node(&reg, "n1", 1 << 50);
    let alerts = |reg: &Registry| -> Vec<String> {
        reg.alerts(false)
            .expect("alerts")
            .into_iter()
            .map(|a| a.key)
            .collect()
    };
    // A group named in the config without the admin's leave: no member.
    let mut s1 = spec("s1", 1 << 30);
    s1.group = "other-hosts".into();
    s1.policy = Some(pb::Policy {
        retention: Some(pb::Retention {
            keep: 1,
            ..Default::default()
        }),
        points_alloc_bytes: u64::MAX,
        ..Default::default()
    });
    // Too big for the quota, and a name that would leave its folder.
    let big = spec("s2", 11 << 30);
    let dots = spec("..", 1 << 20);
    let regs = reg
        .hello(
            "a1",
            &Hello::from(pb::Hello {
                sources: vec![s1, big, dots],
                version: "t".into(),
            }),
        )
        .expect("hello");
    assert!(regs[0].assignment.is_some(), "{regs:?}");
    assert!(regs[1].error.contains("quota"), "{regs:?}");
    assert!(
        regs[2].error.contains("must start with a letter"),
        "{regs:?}"
    );
    let s = reg.source("s1").expect("s1");
    assert_eq!(s.group, "", "not a member");
    let e = reg.effective(&s);
    assert!(e.policy.retention.is_keep_all(), "{e:?}");
    assert!(e.policy.points_alloc_bytes < u64::MAX, "{e:?}");
    let keys = alerts(&reg);
    for want in [
        "policy-refused/s1/retention.keep",
        "policy-refused/s1/points_space",
        "group-refused/s1",
    ] {
        assert!(keys.iter().any(|k| k == want), "{want} in {keys:?}");
    }
    assert_eq!(
        keys.iter()
            .filter(|k| k.starts_with("source-refused/a1/"))
            .count(),
        2,
        "{keys:?}"
    );
    assert!(reg.source("..").is_err() && reg.source("s2").is_err());
    // The admin's retention: the agent's proposal of one point is still refused.
    reg.set_retention(
        "s1",
        Some(Retention {
            keep: 3,
            ..Default::default()
        }),
    )
    .expect("retention");
    assert_eq!(
        reg.effective(&reg.source("s1").expect("s1"))
            .policy
            .retention
            .keep,
        3
    );
}

/// A source shown as syncing when its agent says hello with no sync running (the
/// agent was killed mid-sync) is no longer shown as syncing; one whose sync is
/// still running after a reconnect stays so.
#[test]
fn a_sync_whose_agent_came_back_without_it_is_not_shown_as_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    let reg = Registry::open(dir.path(), Duration::from_secs(60)).expect("open");
    node(&reg, "n1", 100 << 30);
    let hello = |busy: bool, inconsistent: bool| {
        let mut s = spec("vm", 1 << 30);
        s.busy = busy;
        s.inconsistent = inconsistent;
        reg.hello(
            "host-1",
            &Hello::from(pb::Hello {
                sources: vec![s],
                version: "t".into(),
            }),
        )
        .expect("hello");
    };
    let started = pb::SyncReport {
        source: "vm".into(),
        result: None,
        error: String::new(),
        inconsistent: false,
        recheck_bytes: 0,
    };
    hello(false, false);
    reg.sync_report("host-1", &SyncReport::from(started.clone()))
        .expect("report");
    assert_eq!(reg.source("vm").expect("vm").state, "syncing");
    // The stream came back while the sync still runs.
    hello(true, false);
    assert_eq!(reg.source("vm").expect("vm").state, "syncing");
    // The agent came back (kill -9) with no sync and no record.
    hello(false, true);
    let s = reg.source("vm").expect("vm");
    assert_eq!(s.state, "error");
    assert!(
        s.error.contains("outcome is unknown") && s.error.contains("consistency check"),
        "{}",
        s.error
    );
    assert!(s.inconsistent);
}

#[test]
fn a_grouped_log_source_keeps_what_the_groups_oldest_volume_point_needs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let reg = Registry::open(dir.path(), Duration::from_secs(60)).expect("open");
    node(&reg, "n1", 100 << 30);
    reg.put_group(GroupRecord {
        v: 1,
        name: "db".into(),
        interval_ms: 60_000,
        retention: None,
        point_times: vec![],
        replica_alloc_bytes: 0,
        points_alloc_bytes: 0,
        allow: vec![],
        lock: None,
    })
    .expect("group");
    // The agents' configs may put their sources in the group.
    reg.allow_group("db", "host-*", false).expect("allow");
    let mut vol = spec("db-data", 1 << 30);
    vol.group = "db".into();
    let mut wal = spec("db-wal", 0);
    wal.kind = pb::SourceKind::Log as i32;
    wal.group = "db".into();
    reg.hello(
        "host-1",
        &Hello::from(pb::Hello {
            sources: vec![vol, wal],
            version: "t".into(),
        }),
    )
    .expect("hello");
    let floor = || reg.assignment("db-wal").expect("wal").policy.keep_after_ms;
    assert_eq!(floor(), 0, "no volume point yet");
    let beat = |oldest: i64| {
        reg.heartbeat(
            "n1",
            &Heartbeat::from(pb::NodeHeartbeatRequest {
                sources: vec![pb::SourceUsage {
                    source: "db-data".into(),
                    newest_point: 3,
                    points: 3,
                    oldest_point_ms: oldest,
                    ..Default::default()
                }],
                ..Default::default()
            }),
        )
        .expect("heartbeat");
    };
    beat(1000);
    assert_eq!(floor(), 1000);
    // Another host joins the group by its own claim with an older volume
    // point: it does not pin host-1's logs (it is not paired with them).
    let mut other = spec("web-data", 1 << 30);
    other.group = "db".into();
    reg.hello(
        "host-2",
        &Hello::from(pb::Hello {
            sources: vec![other],
            version: "t".into(),
        }),
    )
    .expect("hello");
    assert_eq!(reg.source("web-data").expect("web").group, "db");
    reg.heartbeat(
        "n1",
        &Heartbeat::from(pb::NodeHeartbeatRequest {
            sources: vec![pb::SourceUsage {
                source: "web-data".into(),
                newest_point: 1,
                points: 1,
                oldest_point_ms: 10,
                ..Default::default()
            }],
            ..Default::default()
        }),
    )
    .expect("heartbeat");
    assert_eq!(
        floor(),
        1000,
        "another host's point does not hold these logs"
    );
    // Retention pruned the oldest volume point: the logs before the next go.
    beat(5000);
    assert_eq!(floor(), 5000);
    // Out of the group, the volume no longer holds the logs back.
    reg.set_group("", &["db-data".to_string()])
        .expect("ungroup");
    assert_eq!(floor(), 0);
}

#[test]
fn a_new_source_is_first_scrubbed_one_interval_after_it_was_added() {
    let dir = tempfile::tempdir().expect("tempdir");
    let reg = Registry::open(dir.path(), Duration::from_secs(60)).expect("open");
    node(&reg, "n1", 100 << 30);
    reg.hello(
        "host-1",
        &Hello::from(pb::Hello {
            sources: vec![spec("vol", 1 << 30)],
            version: "t".into(),
        }),
    )
    .expect("hello");
    let hour = Duration::from_secs(3600);
    assert_eq!(reg.due_for_scrub(hour).expect("due"), None, "no point yet");
    reg.heartbeat(
        "n1",
        &Heartbeat::from(pb::NodeHeartbeatRequest {
            sources: vec![pb::SourceUsage {
                source: "vol".into(),
                newest_point: 1,
                points: 1,
                ..Default::default()
            }],
            ..Default::default()
        }),
    )
    .expect("heartbeat");
    assert_eq!(
        reg.due_for_scrub(hour).expect("due"),
        None,
        "its first sync was checked on arrival"
    );
    std::thread::sleep(Duration::from_millis(5));
    let soon = Duration::from_millis(1);
    assert_eq!(
        reg.due_for_scrub(soon).expect("due").as_deref(),
        Some("vol")
    );
    reg.verified("vol", "ok".into()).expect("verified");
    assert_eq!(reg.due_for_scrub(hour).expect("due"), None);
}

#[test]
fn places_on_the_node_with_most_free_space_and_keeps_owners() {
    let dir = tempfile::tempdir().expect("tempdir");
    let reg = Registry::open(dir.path(), Duration::from_secs(60)).expect("open");
    let gib = 1u64 << 30;
    let hello = Hello::from(pb::Hello {
        sources: vec![spec("a", gib)],
        version: "t".into(),
    });
    // No node yet: registered, not placed, with a reason.
    let r = reg.hello("host-1", &hello).expect("hello");
    assert!(r[0].assignment.is_none());
    assert!(
        r[0].error.contains("no storage node has registered"),
        "{}",
        r[0].error
    );
    assert_eq!(reg.source("a").expect("a").state, "error");

    node(&reg, "n1", 100 * gib);
    node(&reg, "n2", 100 * gib);
    let a = reg.assignment("a").expect("placed");
    assert_eq!((a.node.as_str(), a.epoch), ("n1", 1));
    let r = reg
        .hello(
            "host-2",
            &Hello::from(pb::Hello {
                sources: vec![spec("b", gib)],
                version: "t".into(),
            }),
        )
        .expect("hello");
    assert_eq!(
        r[0].assignment.as_ref().map(|a| a.node.as_str()),
        Some("n2")
    );

    // Another agent cannot claim a source, and nothing fits a 1 PiB volume.
    let r = reg
        .hello(
            "host-2",
            &Hello::from(pb::Hello {
                sources: vec![spec("a", gib), spec("huge", 1 << 50)],
                version: "t".into(),
            }),
        )
        .expect("hello");
    assert!(
        r[0].error.contains("belongs to agent host-1"),
        "{}",
        r[0].error
    );
    // No node could ever hold it: refused, and no record is kept.
    assert!(r[1].assignment.is_none());
    assert!(
        r[1].error
            .contains("more than the largest storage node holds"),
        "{}",
        r[1].error
    );
    assert!(reg.source("huge").is_err());
    drop(reg);
    let reg = reopen(dir.path());
    assert_eq!(reg.source("b").expect("b").node.as_deref(), Some("n2"));
}

/// Opens the registry again after a drop. sled's flusher thread lets go of the
/// database's file lock a moment after the last handle is dropped, so the open
/// is retried for up to 5 s while it reports the lock taken.
fn reopen(dir: &std::path::Path) -> Registry {
    let mut tries = 0;
    loop {
        match Registry::open(dir, Duration::from_secs(60)) {
            Err(RegistryError::State(StateError::Unavailable(m)))
                if m.contains("could not acquire lock") && tries < 500 =>
            {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            r => return r.expect("reopen"),
        }
    }
}

/// An agent's word on how much a re-check owes is only shown, and never more than
/// its volume: a hostile agent cannot make `sources` print absurd figures.
#[test]
fn the_recheck_an_agent_reports_is_bounded_by_its_volume() {
    let dir = tempfile::tempdir().expect("tempdir");
    let reg = Registry::open(dir.path(), Duration::from_secs(60)).expect("open");
    node(&reg, "n1", 100 << 30);
    let mut s = spec("vm", 1 << 30);
    s.recheck_bytes = u64::MAX;
    let hello = pb::Hello {
        sources: vec![s],
        version: "t".into(),
    };
    reg.hello("host-1", &Hello::from(hello)).expect("hello");
    assert_eq!(reg.source("vm").expect("vm").recheck_bytes, 1 << 30);
    let report = pb::SyncReport {
        source: "vm".into(),
        result: None,
        error: String::new(),
        inconsistent: false,
        recheck_bytes: (1 << 30) + 1,
    };
    reg.sync_report("host-1", &SyncReport::from(report))
        .expect("report");
    assert_eq!(reg.source("vm").expect("vm").recheck_bytes, 1 << 30);
}

/// A source whose points grew 1.2 GiB a day toward a 20 GiB allocation: the
/// forecast is within 10% of the true 8.3 days, the history survives a reopen,
/// `forecast/<source>` opens under 14 days and resolves when the allocation grows;
/// the disk (41 days away) raises nothing.
#[test]
fn the_forecast_warns_before_an_allocation_fills_and_resolves_when_it_grows() {
    const GIB: u64 = 1 << 30;
    let dir = tempfile::tempdir().expect("tempdir");
    let open = || {
        Registry::open(dir.path(), Duration::from_secs(60))
            .expect("open")
            .with_forecast(crate::forecast::ForecastSettings::default())
    };
    let reg = open();
    node(&reg, "n1", 100 * GIB);
    let regs = reg
        .hello(
            "a1",
            &Hello::from(pb::Hello {
                sources: vec![spec("s1", GIB)],
                version: "t".into(),
            }),
        )
        .expect("hello");
    assert!(regs[0].assignment.is_some(), "{regs:?}");
    let per_2h = 1.2 * GIB as f64 / 12.0;
    let now = now_ms();
    for i in (1..=24).rev() {
        let t = now - i * 2 * 3_600_000;
        let k = i as f64 * per_2h;
        reg.record_sample(
            &forecast::source_key("s1"),
            t,
            (10.0 * GIB as f64 - k) as u64,
        )
        .expect("sample");
        reg.record_sample(
            &forecast::disk_key("n1", "/d1"),
            t,
            (50.0 * GIB as f64 - k) as u64,
        )
        .expect("sample");
    }
    let beat = |points_alloc: u64| Heartbeat {
        sources: vec![SourceUsage {
            source: "s1".into(),
            newest_point: 1,
            allocated_bytes: points_alloc,
            usage: Usage {
                points_used_bytes: 10 * GIB,
                points_alloc_bytes: points_alloc,
                ..Default::default()
            },
        }],
        disks: vec![DiskFigures {
            path: "/d1".into(),
            capacity_bytes: 100 * GIB,
            used_bytes: 50 * GIB,
        }],
        ..Default::default()
    };
    reg.heartbeat("n1", &beat(20 * GIB)).expect("heartbeat");
    let report = reg.forecast_report().expect("report");
    let days = report.sources[0]
        .forecast
        .days_until_full
        .expect("a forecast");
    let truth = 10.0 / 1.2;
    assert!((days - truth).abs() < truth * 0.1, "{days} vs {truth}");
    let disk = report.disks[0]
        .forecast
        .days_until_full
        .expect("a forecast");
    assert!((disk - 50.0 / 1.2).abs() < 50.0 / 1.2 * 0.1, "{disk}");
    assert_eq!(report.nodes[0].name, "n1");
    reg.report_forecast_alerts(&report).expect("alerts");
    let open_keys = |reg: &Registry| -> Vec<String> {
        let mut k: Vec<String> = reg
            .alerts(false)
            .expect("alerts")
            .into_iter()
            .map(|a| a.key)
            .filter(|k| k.starts_with("forecast/"))
            .collect();
        k.sort();
        k
    };
    assert_eq!(open_keys(&reg), ["forecast/s1"]);
    // A tiny threshold for the disk: its key names node and path.
    let mut tight = report.clone();
    tight.settings.warn_days = 60.0;
    let keys: Vec<String> = forecast_alerts(&tight).into_iter().map(|a| a.key).collect();
    assert_eq!(keys, ["forecast/n1/d1", "forecast/s1"]);

    drop(reg);
    let reg = open();
    let again = reg.forecast_report().expect("report after a reopen");
    assert_eq!(again.sources[0].forecast, report.sources[0].forecast);
    reg.heartbeat("n1", &beat(200 * GIB)).expect("heartbeat");
    let grown = reg.forecast_report().expect("report");
    assert!(grown.sources[0].forecast.days_until_full.expect("days") > 100.0);
    reg.report_forecast_alerts(&grown).expect("alerts");
    assert!(open_keys(&reg).is_empty());
    assert_eq!(reg.prune_forecast_histories(&grown).expect("prune"), 0);
}

/// A backend that refuses every write as a deposed leader's (fencing), reading
/// through to sled.
#[derive(Debug)]
struct Deposed(crate::state::SledState);

impl StateStore for Deposed {
    fn get(&self, tree: TreeName, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        self.0.get(tree, key)
    }
    fn scan(&self, tree: TreeName, prefix: &[u8]) -> Result<crate::state::Entries, StateError> {
        self.0.scan(tree, prefix)
    }
    fn commit(&self, _: Txn) -> Result<bool, StateError> {
        Err(StateError::Fenced("another coordinator leads".into()))
    }
    fn describe(&self) -> String {
        "deposed".into()
    }
}

/// Over any backend (`with_state`): what it has is read, and a write refused by
/// fencing stays a "not the leader" error up to the gRPC status (`Unavailable`,
/// not the `Internal` of a store that fails), and changes nothing.
#[test]
fn a_fenced_write_is_told_apart_from_a_failing_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let reg = Registry::open(dir.path(), Duration::from_secs(60)).expect("open");
    node(&reg, "n1", 1 << 40);
    drop(reg);
    let sled = loop {
        match crate::state::SledState::open(&dir.path().join("registry")) {
            Err(StateError::Unavailable(m)) if m.contains("could not acquire lock") => {
                std::thread::sleep(Duration::from_millis(10));
            }
            r => break r.expect("sled"),
        }
    };
    let reg = Registry::with_state(Arc::new(Deposed(sled)), Duration::from_secs(60));
    assert_eq!(reg.nodes().expect("nodes").len(), 1);
    let e = reg.set_draining("n1", true).expect_err("fenced");
    assert!(
        matches!(e, RegistryError::State(StateError::Fenced(_))),
        "{e:?}"
    );
    let st = tonic::Status::from(e);
    assert_eq!(st.code(), tonic::Code::Unavailable, "{st:?}");
    assert!(st.message().contains("not the leader"), "{st:?}");
    assert!(!reg.node("n1").expect("node").expect("n1").draining);
    // The fenced write carries the not-leader mark (clients move on); a store out of
    // reach is Unavailable too, but without it (every coordinator would say the same).
    assert_eq!(
        bulwark_common::failover::leader_hint(&st),
        Some(None),
        "{st:?}"
    );
    let failing = tonic::Status::from(RegistryError::State(StateError::Unavailable(
        "disk gone".into(),
    )));
    assert_eq!(failing.code(), tonic::Code::Unavailable, "{failing:?}");
    assert_eq!(bulwark_common::failover::leader_hint(&failing), None);
}
