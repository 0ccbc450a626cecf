//! Which coordinator leads, and what the others do meanwhile.
//!
//! With the sled backend there is one coordinator and it always leads. With etcd,
//! several coordinators share the state and one of them, elected through an etcd
//! lease (`state::etcd`), leads:
//! - only the leader runs the background workers (schedule, moves, monitor, scrub,
//!   forecast, renewal signing): [`LeaderOnly`] wraps each, and a run on a follower
//!   does nothing;
//! - only the leader takes calls that change state or need its memory (agents'
//!   control streams, node heartbeats, admin changes): [`LeaderGateLayer`] answers
//!   them on a follower with `Unavailable` and the leader's URL in the
//!   `bulwark-leader` metadata (`bulwark_common::failover`: the clients go there
//!   when it is one of their configured coordinators);
//! - every coordinator answers the reads in [`FOLLOWER_METHODS`] from the shared
//!   state, so `bulwark sources`, `alerts`, `status`, ... work whichever one is asked.
//!
//! Fencing, not this gate, is what keeps a deposed leader from changing state: its
//! writes carry the leadership it held and etcd refuses them once another leads.
//! The gate only sends callers to the right place.

use std::task::{Context, Poll};
use std::time::Duration;

use bulwark_common::failover;
use bulwark_common::worker::Worker;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// What this coordinator is, as far as it knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// It leads (always, with the sled backend).
    Leader,
    /// Another coordinator leads (`leader` = its URL, when known), or none does
    /// yet (`leader` = `None`; `why` says what is awaited, e.g. no etcd quorum).
    Follower { leader: Option<String>, why: String },
}

impl Role {
    /// The gate's view of an election's role.
    pub fn from_election(r: &crate::state::etcd::Role) -> Role {
        use crate::state::etcd::Role as E;
        match r {
            E::Leader { .. } => Role::Leader,
            E::Follower { leader } => Role::Follower {
                leader: Some(leader.url.clone()),
                why: format!("{} leads", leader.id),
            },
            E::NoLeader { why } => Role::Follower {
                leader: None,
                why: why.clone(),
            },
        }
    }
}

/// A live view of this coordinator's [`Role`].
#[derive(Debug, Clone)]
pub struct LeaderView(watch::Receiver<Role>);

impl LeaderView {
    /// A coordinator alone (sled): always the leader.
    pub fn always() -> LeaderView {
        let (tx, rx) = watch::channel(Role::Leader);
        // The receiver keeps the last value after the sender is gone.
        drop(tx);
        LeaderView(rx)
    }

    /// A view that follows `rx` (the election's).
    pub fn new(rx: watch::Receiver<Role>) -> LeaderView {
        LeaderView(rx)
    }

    /// A view that follows an etcd election's role (see `state::etcd::election`),
    /// translated on a task of the current runtime.
    pub fn follow(mut rx: watch::Receiver<crate::state::etcd::Role>) -> LeaderView {
        let (tx, out) = watch::channel(Role::from_election(&rx.borrow_and_update()));
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let role = Role::from_election(&rx.borrow_and_update());
                tracing::info!(?role, "coordinator role");
                if tx.send(role).is_err() {
                    break;
                }
            }
        });
        LeaderView(out)
    }

    /// The role now.
    pub fn role(&self) -> Role {
        self.0.borrow().clone()
    }

    /// Whether this coordinator leads now.
    pub fn is_leader(&self) -> bool {
        matches!(*self.0.borrow(), Role::Leader)
    }
}

/// The refusal a follower answers a leader-only call with: the leader's URL in
/// the `bulwark-leader` metadata (`bulwark_common::failover`, where the clients
/// read it), or an empty hint and why when none is known.
pub fn not_leader(role: &Role) -> Status {
    match role {
        Role::Leader => Status::internal("refused as a follower while leading"),
        Role::Follower {
            leader: Some(url), ..
        } => failover::not_leader(url),
        Role::Follower { leader: None, why } => failover::no_leader(why),
    }
}

/// The Coordinator service's methods every coordinator answers, leader or not:
/// reads of the shared state (and of nodes, through it). Everything else needs the
/// leader.
pub const FOLLOWER_METHODS: &[&str] = &[
    "/bulwark.v1.Coordinator/GetAssignment",
    "/bulwark.v1.Coordinator/ListNodes",
    "/bulwark.v1.Coordinator/ListAgents",
    "/bulwark.v1.Coordinator/ListSources",
    "/bulwark.v1.Coordinator/ListPoints",
    "/bulwark.v1.Coordinator/ListAlerts",
    "/bulwark.v1.Coordinator/Locate",
    "/bulwark.v1.Coordinator/ListGroups",
    "/bulwark.v1.Coordinator/ListRevocations",
    "/bulwark.v1.Coordinator/ListQuotas",
    "/bulwark.v1.Coordinator/ListWorkers",
    "/bulwark.v1.Coordinator/Forecast",
    "/bulwark.v1.Coordinator/GetCoordinatorStatus",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
];

/// Whether a follower answers `path` itself.
pub fn follower_answers(path: &str) -> bool {
    FOLLOWER_METHODS.contains(&path)
}

/// A tower layer that refuses leader-only calls on a follower (see the module docs).
#[derive(Debug, Clone)]
pub struct LeaderGateLayer {
    view: LeaderView,
}

impl LeaderGateLayer {
    pub fn new(view: LeaderView) -> LeaderGateLayer {
        LeaderGateLayer { view }
    }
}

impl<S> tower::Layer<S> for LeaderGateLayer {
    type Service = LeaderGate<S>;
    fn layer(&self, inner: S) -> LeaderGate<S> {
        LeaderGate {
            inner,
            view: self.view.clone(),
        }
    }
}

/// See [`LeaderGateLayer`].
#[derive(Debug, Clone)]
pub struct LeaderGate<S> {
    inner: S,
    view: LeaderView,
}

impl<S, B, RB> tower::Service<http::Request<B>> for LeaderGate<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    RB: Default,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = futures::future::Either<
        futures::future::Ready<Result<Self::Response, S::Error>>,
        S::Future,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let role = self.view.role();
        if role == Role::Leader || follower_answers(req.uri().path()) {
            return futures::future::Either::Right(self.inner.call(req));
        }
        tracing::debug!(method = %req.uri().path(), ?role, "leader-only call on a follower");
        futures::future::Either::Left(futures::future::ready(Ok(
            not_leader(&role).into_http::<RB>()
        )))
    }
}

/// A worker that runs only while this coordinator leads; a run on a follower does
/// nothing (and says so in `bulwark workers` as a successful, empty run).
pub struct LeaderOnly<W> {
    pub inner: W,
    pub view: LeaderView,
}

impl<W: Worker> LeaderOnly<W> {
    /// `inner`, run only while `view` says this coordinator leads.
    pub fn new(inner: W, view: &LeaderView) -> LeaderOnly<W> {
        LeaderOnly {
            inner,
            view: view.clone(),
        }
    }
}

impl<W: Worker> Worker for LeaderOnly<W> {
    fn name(&self) -> String {
        self.inner.name()
    }

    fn period(&self) -> Duration {
        self.inner.period()
    }

    fn runs_at_start(&self) -> bool {
        self.inner.runs_at_start()
    }

    async fn run(&mut self, stop: &CancellationToken) -> Result<(), String> {
        if !self.view.is_leader() {
            return Ok(());
        }
        self.inner.run(stop).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulwark_common::access::RULES;

    /// Every method a follower answers exists (has an access rule) and only reads:
    /// its name is a read's, never one of the calls that change state.
    #[test]
    fn follower_methods_are_known_reads() {
        for m in FOLLOWER_METHODS {
            if m.starts_with("/grpc.health.v1.") {
                continue;
            }
            assert!(RULES.iter().any(|(p, _)| p == m), "{m} has no access rule");
            let name = m.rsplit('/').next().unwrap_or_default();
            assert!(
                ["List", "Get", "Locate", "Forecast"]
                    .iter()
                    .any(|p| name.starts_with(p)),
                "{m} does not look like a read"
            );
        }
        for write in [
            "Control",
            "NodeHeartbeat",
            "RegisterNode",
            "Drain",
            "Sync",
            "Renew",
        ] {
            assert!(
                !follower_answers(&format!("/bulwark.v1.Coordinator/{write}")),
                "{write} must need the leader"
            );
        }
    }

    #[test]
    fn a_follower_names_the_leader_or_says_why_there_is_none() {
        let s = not_leader(&Role::Follower {
            leader: Some("https://10.0.0.2:7443".into()),
            why: String::new(),
        });
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert_eq!(
            failover::leader_hint(&s),
            Some(Some("https://10.0.0.2:7443".to_string()))
        );
        let s = not_leader(&Role::Follower {
            leader: None,
            why: "no etcd quorum".into(),
        });
        assert!(s.message().contains("no etcd quorum"), "{}", s.message());
        assert_eq!(failover::leader_hint(&s), Some(None));
    }

    #[tokio::test]
    async fn a_worker_runs_only_while_leading() {
        struct Count(std::sync::Arc<std::sync::atomic::AtomicU32>);
        impl Worker for Count {
            fn name(&self) -> String {
                "count".into()
            }
            fn period(&self) -> Duration {
                Duration::from_secs(1)
            }
            async fn run(&mut self, _: &CancellationToken) -> Result<(), String> {
                self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            }
        }
        let n = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (tx, rx) = watch::channel(Role::Follower {
            leader: None,
            why: "starting".into(),
        });
        let mut w = LeaderOnly {
            inner: Count(n.clone()),
            view: LeaderView::new(rx),
        };
        let stop = CancellationToken::new();
        w.run(&stop).await.expect("run");
        assert_eq!(n.load(std::sync::atomic::Ordering::SeqCst), 0);
        tx.send(Role::Leader).expect("send");
        w.run(&stop).await.expect("run");
        assert_eq!(n.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(LeaderView::always().is_leader());
    }
}
