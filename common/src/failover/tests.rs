//! The list's parsing, and the channel's order, rotation and leader hints against
//! real tonic servers (a health service standing in for a coordinator) on 127.0.0.1.

use super::*;
use crate::config::TlsFiles;
use crate::pki::LeafRequest;
use crate::tls::{Role, TlsIdentity};
use std::sync::atomic::{AtomicUsize, Ordering};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

#[test]
fn lists_parse_in_order_and_name_the_bad_entry() {
    let l =
        CoordinatorList::parse(&["https://a:7443", "b:7443", "https://[::1]:7443"]).expect("ok");
    let shown: Vec<String> = l.targets().iter().map(|t| t.to_string()).collect();
    assert_eq!(
        shown,
        ["https://a:7443", "https://b:7443", "https://[::1]:7443"]
    );
    assert_eq!(l.position("https://B:7443/"), Some(1));
    assert_eq!(l.position("https://b:7444"), None);
    assert_eq!(l.position("not a url"), None);
    assert_eq!(
        CoordinatorList::parse::<&str>(&[]).expect_err("refused"),
        ListError::Empty
    );
    let e = CoordinatorList::parse(&["https://a:1", "http://b:2"]).expect_err("refused");
    assert_eq!(e.index(), Some(1));
    assert!(e.to_string().contains("entry 1 (\"http://b:2\")"), "{e}");
    let e = CoordinatorList::parse(&["https://a:1", "https://b:2", "https://A:1"])
        .expect_err("refused");
    assert_eq!(
        e,
        ListError::Duplicate {
            index: 2,
            first: 0,
            value: "https://A:1".into()
        }
    );
    let c = CoordinatorList::parse_commas(" https://a:1 , https://b:2").expect("commas");
    assert_eq!(c.to_string(), "https://a:1,https://b:2");
    assert_eq!(
        CoordinatorList::parse_commas(" ").expect_err("refused"),
        ListError::Empty
    );
    let e = CoordinatorList::parse_commas("https://a:1,,https://b:2").expect_err("refused");
    assert_eq!(e.index(), Some(1), "{e}");
}

#[test]
fn config_keys_are_one_or_the_other() {
    let list = vec!["https://a:1".to_string(), "https://b:2".to_string()];
    assert_eq!(
        CoordinatorList::from_keys(None, Some(&list))
            .expect("list")
            .len(),
        2
    );
    assert_eq!(
        CoordinatorList::from_keys(Some("https://a:1"), None)
            .expect("one")
            .len(),
        1
    );
    let (key, m) =
        CoordinatorList::from_keys(Some("https://a:1"), Some(&list)).expect_err("refused");
    assert_eq!(key, "coordinators");
    assert!(
        m.contains("`coordinator`") && m.contains("`coordinators`"),
        "{m}"
    );
    let (key, _) = CoordinatorList::from_keys(None, None).expect_err("refused");
    assert_eq!(key, "coordinators");
    let (key, m) = CoordinatorList::from_keys(None, Some(&[])).expect_err("refused");
    assert_eq!(key, "coordinators");
    assert!(m.contains("no coordinator address"), "{m}");
    let bad = vec!["https://a:1".to_string(), "https://a".to_string()];
    let (key, m) = CoordinatorList::from_keys(None, Some(&bad)).expect_err("refused");
    assert_eq!(key, "coordinators[1]");
    assert!(m.contains("\"https://a\""), "{m}");
    let (key, _) = CoordinatorList::from_keys(Some("ftp://a:1"), None).expect_err("refused");
    assert_eq!(key, "coordinator");
}

#[test]
fn the_hint_round_trips_through_a_status() {
    let s = not_leader("https://b:7443");
    assert_eq!(s.code(), tonic::Code::Unavailable);
    assert!(s.message().contains("the leader is https://b:7443"));
    assert_eq!(leader_hint(&s), Some(Some("https://b:7443".to_string())));
    assert_eq!(leader_hint(&no_leader("election")), Some(None));
    assert_eq!(leader_hint(&Status::unavailable("agent gone")), None);
    assert_eq!(leader_hint(&Status::internal("x")), None);
    // Not ASCII metadata: sent as no leader known.
    assert_eq!(leader_hint(&not_leader("https://é:1")), Some(None));
}

/// A fleet CA, one coordinator certificate every stand-in serves, and an agent's.
struct Pki {
    _dir: tempfile::TempDir,
    coordinator: TlsIdentity,
    agent: TlsIdentity,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tmp");
        crate::pki::init(dir.path(), "test.fleet").expect("ca");
        Pki {
            coordinator: issue(dir.path(), Role::Coordinator, "coordinator"),
            agent: issue(dir.path(), Role::Agent, "a1"),
            _dir: dir,
        }
    }
}

fn issue(dir: &std::path::Path, role: Role, name: &str) -> TlsIdentity {
    let server = role == Role::Coordinator;
    let issued = crate::pki::issue(
        dir,
        &LeafRequest {
            role,
            name: name.into(),
            dns: vec![],
            ips: if server {
                vec!["127.0.0.1".parse().expect("ip")]
            } else {
                vec![]
            },
            days: 30,
        },
    )
    .expect("issue");
    TlsIdentity::load(&TlsFiles {
        ca: dir.join("ca.crt"),
        cert: issued.cert,
        key: issued.key,
        renew_before: None,
    })
    .expect("identity")
}

/// How a stand-in coordinator answers `Check`; `Watch` sends one message and then
/// ends with `watch_ends` (the not-leader status naming that URL) or stays open.
#[derive(Clone)]
enum Answer {
    Serve,
    NotLeader(String),
}

struct Stub {
    answer: Answer,
    watch_ends: Option<String>,
    calls: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl Health for Stub {
    async fn check(
        &self,
        _: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match &self.answer {
            Answer::Serve => Ok(tonic::Response::new(HealthCheckResponse {
                status: ServingStatus::Serving as i32,
            })),
            Answer::NotLeader(url) => Err(not_leader(url)),
        }
    }

    type WatchStream =
        Pin<Box<dyn futures::Stream<Item = Result<HealthCheckResponse, Status>> + Send + 'static>>;

    async fn watch(
        &self,
        _: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let first = Ok(HealthCheckResponse {
            status: ServingStatus::Serving as i32,
        });
        let s: Self::WatchStream = match self.watch_ends.clone() {
            Some(url) => Box::pin(futures::stream::iter([first, Err(not_leader(&url))])),
            None => Box::pin(futures::stream::iter([first]).chain(futures::stream::pending())),
        };
        Ok(tonic::Response::new(s))
    }
}

use futures::StreamExt;

/// A stand-in coordinator on 127.0.0.1.
struct Server {
    url: String,
    calls: Arc<AtomicUsize>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(pki: &Pki, answer: Answer, watch_ends: Option<String>) -> Server {
        let id = &pki.coordinator;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("https://{}", listener.local_addr().expect("addr"));
        let stop = CancellationToken::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let incoming = crate::tls::incoming(
            listener,
            id.server_config().expect("server config"),
            None,
            stop.clone(),
        );
        let stub = Stub {
            answer,
            watch_ends,
            calls: calls.clone(),
        };
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let _ = crate::tls::server_builder()
                .add_service(HealthServer::new(stub))
                .serve_with_incoming_shutdown(incoming, s.cancelled())
                .await;
        });
        Server {
            url,
            calls,
            stop,
            task,
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Stops the server and waits until its connections are closed.
    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// An address where nothing listens.
async fn dead_url() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    format!("https://{}", l.local_addr().expect("addr"))
}

fn client_tls(pki: &Pki) -> Arc<ClientConfig> {
    pki.agent
        .client_config(Role::Coordinator)
        .expect("client config")
}

async fn check(ch: &CoordinatorChannel) -> Result<(), Status> {
    HealthClient::new(ch.clone())
        .check(HealthCheckRequest::default())
        .await
        .map(drop)
}

/// Checks until one succeeds (the switch after a lost or cut connection takes
/// effect when the channel reconnects); the statuses of the failed ones.
async fn check_until_ok(ch: &CoordinatorChannel) -> Vec<Status> {
    let mut failed = Vec::new();
    for _ in 0..50 {
        match check(ch).await {
            Ok(()) => return failed,
            Err(s) => failed.push(s),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no check succeeded: {failed:?}");
}

fn list(urls: &[&str]) -> CoordinatorList {
    CoordinatorList::parse(urls).expect("list")
}

#[tokio::test]
async fn dead_addresses_are_skipped_in_order_and_a_lost_one_moves_on() {
    let pki = Pki::new();
    let dead = dead_url().await;
    let a = Server::start(&pki, Answer::Serve, None).await;
    let b = Server::start(&pki, Answer::Serve, None).await;
    let ch = CoordinatorChannel::lazy(&list(&[&dead, &a.url, &b.url]), client_tls(&pki))
        .expect("channel");
    // The dead first address costs nothing visible: the first call is answered.
    check(&ch).await.expect("answered past the dead address");
    assert_eq!((a.calls(), b.calls()), (1, 0));
    assert_eq!(ch.address().to_string(), a.url);
    check(&ch).await.expect("again");
    assert_eq!(
        (a.calls(), b.calls()),
        (2, 0),
        "the last that worked is kept"
    );

    // `a` goes away: the connection is lost and the next one goes on to `b`.
    a.stop().await;
    check_until_ok(&ch).await;
    assert_eq!(b.calls(), 1);
    assert_eq!(ch.address().to_string(), b.url);

    // An eager connection over the same list also starts at the first that answers.
    let eager = CoordinatorChannel::connect(&list(&[&dead, &b.url]), client_tls(&pki))
        .await
        .expect("connect");
    assert_eq!(eager.address().to_string(), b.url);
    b.stop().await;
}

#[tokio::test]
async fn every_address_dead_is_one_error_naming_each() {
    let pki = Pki::new();
    let (d1, d2) = (dead_url().await, dead_url().await);
    let e = CoordinatorChannel::connect(&list(&[&d1, &d2]), client_tls(&pki))
        .await
        .expect_err("nothing listens");
    let m = e.to_string();
    assert!(m.contains(&d1) && m.contains(&d2), "{m}");
    assert!(m.contains("connection refused"), "{m}");
    // A list of one says what it said before lists.
    let e = CoordinatorChannel::connect(&list(&[&d1]), client_tls(&pki))
        .await
        .expect_err("nothing listens");
    assert!(
        e.to_string()
            .starts_with(&format!("cannot connect to {d1}: connection refused")),
        "{e}"
    );
}

#[tokio::test]
async fn a_hint_to_a_configured_address_is_followed() {
    let pki = Pki::new();
    let leader = Server::start(&pki, Answer::Serve, None).await;
    let follower = Server::start(&pki, Answer::NotLeader(leader.url.clone()), None).await;
    let between = Server::start(&pki, Answer::Serve, None).await;
    let ch = CoordinatorChannel::lazy(
        &list(&[&follower.url, &between.url, &leader.url]),
        client_tls(&pki),
    )
    .expect("channel");
    // The follower refuses; the call is re-sent to the leader it named, whole.
    check(&ch).await.expect("answered by the leader");
    assert_eq!((follower.calls(), leader.calls()), (1, 1));
    check_until_ok(&ch).await;
    // Straight to the leader: the address between them in the list is skipped.
    assert_eq!(between.calls(), 0);
    assert_eq!(follower.calls(), 1, "the channel stayed on the follower");
    assert_eq!(ch.address().to_string(), leader.url);
    for s in [leader, follower, between] {
        s.stop().await;
    }
}

#[tokio::test]
async fn a_hint_to_an_unconfigured_address_is_not_dialled() {
    let pki = Pki::new();
    let stranger = Server::start(&pki, Answer::Serve, None).await;
    let follower = Server::start(&pki, Answer::NotLeader(stranger.url.clone()), None).await;
    let next = Server::start(&pki, Answer::Serve, None).await;
    let ch = CoordinatorChannel::lazy(&list(&[&follower.url, &next.url]), client_tls(&pki))
        .expect("channel");
    check(&ch).await.expect_err("the follower refuses");
    check_until_ok(&ch).await;
    assert_eq!(stranger.calls(), 0, "the hinted address was dialled");
    assert_eq!(next.calls(), 1);
    assert_eq!(ch.address().to_string(), next.url);
    for s in [stranger, follower, next] {
        s.stop().await;
    }
}

#[tokio::test]
async fn a_stream_ended_by_not_leader_moves_the_channel() {
    let pki = Pki::new();
    let leader = Server::start(&pki, Answer::Serve, None).await;
    // Answers reads (Check) but ends its streams: it lost the leadership.
    let deposed = Server::start(&pki, Answer::Serve, Some(leader.url.clone())).await;
    let between = Server::start(&pki, Answer::Serve, None).await;
    let ch = CoordinatorChannel::lazy(
        &list(&[&deposed.url, &between.url, &leader.url]),
        client_tls(&pki),
    )
    .expect("channel");
    let mut stream = HealthClient::new(ch.clone())
        .watch(HealthCheckRequest::default())
        .await
        .expect("watch opens")
        .into_inner();
    stream
        .message()
        .await
        .expect("one message")
        .expect("not ended");
    let end = stream.message().await.expect_err("ends with not-leader");
    assert_eq!(leader_hint(&end), Some(Some(leader.url.clone())));
    check_until_ok(&ch).await;
    assert_eq!((between.calls(), leader.calls()), (0, 1));
    for s in [leader, deposed, between] {
        s.stop().await;
    }
}

#[tokio::test]
async fn one_address_never_moves() {
    let pki = Pki::new();
    let only = Server::start(&pki, Answer::NotLeader("https://127.0.0.1:1".into()), None).await;
    let ch = CoordinatorChannel::lazy(&list(&[&only.url]), client_tls(&pki)).expect("channel");
    for _ in 0..3 {
        check(&ch).await.expect_err("not the leader");
    }
    assert_eq!(only.calls(), 3);
    only.stop().await;
}
