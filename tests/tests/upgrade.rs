//! Rolling upgrades: the coordinator serves agents (and nodes) at its own minor
//! version or one older, and refuses newer or more distant ones with a message that
//! says what to upgrade. Raw control streams stand in for agents of other versions.

use bulwark_proto as pb;
use bulwark_tests::{Fleet, grpc};

/// Opens a control stream as agent `name` saying it runs `version`; returns the
/// coordinator's answer to Hello: Ok(welcome) or the refusal.
fn hello(fleet: &Fleet, name: &str, version: &str) -> Result<pb::Welcome, tonic::Status> {
    let id = fleet.pki().issue("agent", name);
    let url = fleet.coordinator_url().to_string();
    let version = version.to_string();
    bulwark_tests::block_on(async move {
        let mut c = grpc::coordinator_client(&url, &id).await;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
                sources: vec![],
                version,
            })),
        })
        .await
        .expect("queue hello");
        let mut replies = c
            .control(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        match replies.message().await? {
            Some(pb::CoordinatorCommand {
                cmd: Some(pb::coordinator_command::Cmd::Welcome(w)),
            }) => Ok(w),
            other => panic!("unexpected answer to Hello: {other:?}"),
        }
    })
}

#[test]
fn agents_one_minor_version_behind_are_served_newer_ones_are_refused() {
    let fleet = Fleet::builder().node("node-1").start();
    let (major, minor) = {
        let mut v = bulwark_common::VERSION.split('.');
        let major: u64 = v.next().and_then(|x| x.parse().ok()).expect("major");
        let minor: u64 = v.next().and_then(|x| x.parse().ok()).expect("minor");
        (major, minor)
    };
    assert!(hello(&fleet, "same", bulwark_common::VERSION).is_ok());
    if minor > 0 {
        let older = format!("{major}.{}.7", minor - 1);
        assert!(hello(&fleet, "older", &older).is_ok(), "{older} is served");
    }
    let newer = format!("{major}.{}.0", minor + 1);
    let e = hello(&fleet, "newer", &newer).expect_err("a newer agent is refused");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(
        e.message().contains("upgrade the coordinator"),
        "{}",
        e.message()
    );
    let e = hello(&fleet, "other-major", &format!("{}.0.0", major + 1)).expect_err("refused");
    assert!(e.message().contains("newer"), "{}", e.message());
    let e = hello(&fleet, "garbage", "latest").expect_err("refused");
    assert!(e.message().contains("MAJOR.MINOR.PATCH"), "{}", e.message());
}
