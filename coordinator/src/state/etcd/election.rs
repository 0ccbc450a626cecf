//! Leadership among the coordinators sharing one etcd prefix.
//!
//! Each coordinator holds an etcd lease of `leader_lease` (kept alive every third of
//! it) and campaigns with one transaction: if `<prefix>/leader` does not exist
//! (`create_revision == 0`), put it, holding `{"id", "url"}` of this coordinator,
//! attached to its lease; otherwise read it, to know whom to redirect to. The winner's
//! identity for fencing is the key's `create_revision`: every commit of a fenced
//! [`EtcdState`](super::EtcdState) carries the compare
//! `create_revision(<prefix>/leader) == mine`, so once the key has gone (lease
//! expired or revoked) or belongs to someone else, the deposed leader's writes fail
//! in etcd whatever it believes.
//!
//! Locally, a leader whose last successful renewal was sent at `t` stops claiming
//! leadership at `t + TTL - margin`, before etcd can have expired the lease (etcd
//! counts the TTL from when it received the renewal, after `t`). A watchdog task
//! publishes that change even while the campaign loop is stuck in a request.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulwark_proto::etcd::{
    Compare, KeyValue, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest, PutRequest,
    RangeRequest, RequestOp, TxnRequest, compare, lease_client::LeaseClient, request_op,
    response_op,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::super::StateError;
use super::Core;
use super::client::{Client, Retry, kv};

/// The coordinator that holds the leadership key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderInfo {
    /// Its id (`[state] advertise` host, or what the caller chose).
    pub id: String,
    /// Where followers redirect writes to (`https://host:port`).
    pub url: String,
    /// The key's create_revision: the leadership's identity for fencing.
    pub revision: i64,
}

/// This coordinator's part, as it knows it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// It leads; fenced commits carry `create_revision(<prefix>/leader) == revision`.
    Leader { revision: i64 },
    /// Another coordinator leads.
    Follower { leader: LeaderInfo },
    /// Nobody is known to lead (etcd unreachable, the previous leader's lease not yet
    /// expired, or this coordinator was just deposed): `why` says which.
    NoLeader { why: String },
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Leader { revision } => write!(f, "leader (revision {revision})"),
            Role::Follower { leader } => write!(
                f,
                "follower of {} at {} (revision {})",
                leader.id, leader.url, leader.revision
            ),
            Role::NoLeader { why } => write!(f, "no leader: {why}"),
        }
    }
}

/// The value of the leadership key.
#[derive(Debug, Serialize, Deserialize)]
struct KeyValueJson {
    id: String,
    url: String,
}

/// What the commit path and the tasks share.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Leading: the key's revision and the instant this coordinator stops claiming it.
    lead: Mutex<Option<(i64, Instant)>>,
    role: watch::Sender<Role>,
}

impl Shared {
    /// The revision to fence a commit with, or why this coordinator does not lead.
    pub(crate) fn leading(&self) -> Result<i64, String> {
        let lead = *self.lead.lock().unwrap_or_else(|p| p.into_inner());
        match lead {
            Some((rev, until)) if Instant::now() < until => Ok(rev),
            Some(_) => Err("its lease was not renewed in time".into()),
            None => Err(format!("this coordinator is {}", *self.role.borrow())),
        }
    }

    /// The role as last published.
    pub(crate) fn role(&self) -> Role {
        self.role.borrow().clone()
    }

    fn set_role(&self, role: Role) {
        self.role.send_if_modified(|r| {
            if *r == role {
                false
            } else {
                tracing::info!("etcd leadership: {role}");
                *r = role;
                true
            }
        });
    }

    fn start_leading(&self, revision: i64, until: Instant) {
        *self.lead.lock().unwrap_or_else(|p| p.into_inner()) = Some((revision, until));
        self.set_role(Role::Leader { revision });
    }

    fn renewed(&self, until: Instant) {
        if let Some((_, u)) = self.lead.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            *u = until;
        }
    }

    fn revision(&self) -> Option<i64> {
        self.lead
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|(r, _)| r)
    }

    /// Stops claiming leadership (and says why) if it did.
    fn depose(&self, why: String) {
        let was = self.lead.lock().unwrap_or_else(|p| p.into_inner()).take();
        if was.is_some() {
            tracing::warn!("etcd leadership lost: {why}");
            self.set_role(Role::NoLeader { why });
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    Run,
    Suspend,
}

/// This coordinator's campaign: a background task on the etcd client's runtime
/// until [`Election::resign`] or drop.
pub struct Election {
    core: Arc<Core>,
    shared: Arc<Shared>,
    control: watch::Sender<Control>,
    lease: Arc<AtomicI64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Election {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Election({})", self.role())
    }
}

impl Election {
    pub(super) fn start(
        core: Arc<Core>,
        id: &str,
        advertise: &str,
        lease: Duration,
    ) -> Result<Election, StateError> {
        let value = serde_json::to_vec(&KeyValueJson {
            id: id.to_string(),
            url: advertise.to_string(),
        })
        .map_err(|e| StateError::Unavailable(format!("etcd leadership value: {e}")))?;
        let (role, _) = watch::channel(Role::NoLeader {
            why: "campaign starting".into(),
        });
        let shared = Arc::new(Shared {
            lead: Mutex::new(None),
            role,
        });
        let (control, control_rx) = watch::channel(Control::Run);
        let lease_id = Arc::new(AtomicI64::new(0));
        let ttl = lease.as_secs().max(1) as i64;
        let ctx = Campaign {
            client: core.client.clone(),
            key: core.leader_key(),
            value,
            ttl,
            margin: margin(Duration::from_secs(ttl as u64)),
            shared: shared.clone(),
            lease: lease_id.clone(),
        };
        let tick = Duration::from_secs(ttl as u64) / 3;
        let tasks = vec![
            core.runner.handle().spawn(ctx.run(tick, control_rx)),
            core.runner.handle().spawn(watchdog(shared.clone())),
        ];
        Ok(Election {
            core,
            shared,
            control,
            lease: lease_id,
            tasks,
        })
    }

    /// The role now.
    pub fn role(&self) -> Role {
        match self.shared.leading() {
            Ok(revision) => Role::Leader { revision },
            Err(_) => match self.shared.role.borrow().clone() {
                // Past its deadline: the watchdog is about to say so.
                Role::Leader { .. } => Role::NoLeader {
                    why: "its lease was not renewed in time".into(),
                },
                r => r,
            },
        }
    }

    /// Whether this coordinator leads now.
    pub fn is_leader(&self) -> bool {
        self.shared.leading().is_ok()
    }

    /// The leader's URL when another coordinator leads (where to redirect writes).
    pub fn leader_url(&self) -> Option<String> {
        match self.role() {
            Role::Follower { leader } => Some(leader.url),
            _ => None,
        }
    }

    /// Changes of the role, as they happen.
    pub fn watch(&self) -> watch::Receiver<Role> {
        self.shared.role.subscribe()
    }

    pub(super) fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Stops campaigning and revokes the lease, which deletes the leadership key if
    /// this coordinator held it, so another takes over at once (clean shutdown).
    pub fn resign(&self) -> Result<(), StateError> {
        for t in &self.tasks {
            t.abort();
        }
        self.shared.depose("resigned".into());
        self.shared.set_role(Role::NoLeader {
            why: "resigned".into(),
        });
        let id = self.lease.swap(0, Ordering::SeqCst);
        if id == 0 {
            return Ok(());
        }
        let client = self.core.client.clone();
        self.core.runner.block_on(async move {
            client
                .call("lease revoke", Retry::Idempotent, |ch| async move {
                    LeaseClient::new(ch)
                        .lease_revoke(LeaseRevokeRequest { id })
                        .await
                        .map(|_| ())
                })
                .await
        })?
    }

    /// Stops renewing the lease and campaigning, as a process stopped by SIGSTOP
    /// would, but keeps the watchdog running (tests of fencing).
    #[doc(hidden)]
    pub fn suspend(&self) {
        self.control.send_replace(Control::Suspend);
    }

    /// Resumes after [`Election::suspend`].
    #[doc(hidden)]
    pub fn resume(&self) {
        self.control.send_replace(Control::Run);
    }
}

impl Drop for Election {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// How long before the lease's TTL a leader stops claiming it: a fifth of the TTL,
/// at least 300 ms (the renewal's own round trip and clock rate differences).
fn margin(ttl: Duration) -> Duration {
    (ttl / 5).max(Duration::from_millis(300))
}

/// Deposes the leader locally once its deadline has passed.
async fn watchdog(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let lead = *shared.lead.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, until)) = lead
            && Instant::now() >= until
        {
            shared
                .depose("its lease was not renewed within the lease time: stopped leading".into());
        }
    }
}

struct Campaign {
    client: Arc<Client>,
    key: Vec<u8>,
    value: Vec<u8>,
    ttl: i64,
    margin: Duration,
    shared: Arc<Shared>,
    /// The lease held now (0: none), for resign.
    lease: Arc<AtomicI64>,
}

impl Campaign {
    async fn run(self, tick: Duration, mut control: watch::Receiver<Control>) {
        // The lease held and the instant this coordinator stops trusting it.
        let mut lease: Option<(i64, Instant)> = None;
        loop {
            while *control.borrow_and_update() == Control::Suspend {
                if control.changed().await.is_err() {
                    return;
                }
            }
            let t0 = Instant::now();
            match self.step(&mut lease).await {
                Ok(()) => {}
                Err(e) => {
                    if self.shared.revision().is_none() {
                        self.shared.set_role(Role::NoLeader { why: e });
                    } else {
                        tracing::warn!("etcd leadership: {e}");
                    }
                }
            }
            tokio::time::sleep_until((t0 + tick).into()).await;
        }
    }

    /// One round: a live lease of our own, then leadership held or campaigned for.
    async fn step(&self, lease: &mut Option<(i64, Instant)>) -> Result<(), String> {
        let t0 = Instant::now();
        let (id, ttl) = match *lease {
            None => self.grant().await?,
            Some((id, _)) => match self.keep_alive(id).await? {
                Some(ttl) => (id, ttl),
                None => {
                    *lease = None;
                    self.lease.store(0, Ordering::SeqCst);
                    self.shared.depose("the lease expired in etcd".into());
                    return Err("the lease expired in etcd; granting a new one".into());
                }
            },
        };
        let until = (t0 + ttl).checked_sub(self.margin).unwrap_or(t0);
        *lease = Some((id, until));
        self.lease.store(id, Ordering::SeqCst);
        self.shared.renewed(until);
        match self.campaign(id).await? {
            Ok(revision) => {
                if self.shared.revision() != Some(revision) && Instant::now() < until {
                    self.shared.start_leading(revision, until);
                }
            }
            Err(role) => {
                if let Some(mine) = self.shared.revision() {
                    self.shared.depose(format!(
                        "the leadership key no longer has this coordinator's revision {mine}"
                    ));
                }
                self.shared.set_role(role);
            }
        }
        Ok(())
    }

    async fn grant(&self) -> Result<(i64, Duration), String> {
        let ttl = self.ttl;
        let r = self
            .client
            .call("lease grant", Retry::Idempotent, |ch| async move {
                LeaseClient::new(ch)
                    .lease_grant(LeaseGrantRequest { ttl, id: 0 })
                    .await
                    .map(|r| r.into_inner())
            })
            .await
            .map_err(|e| e.to_string())?;
        if !r.error.is_empty() {
            return Err(format!("etcd lease grant: {}", r.error));
        }
        Ok((r.id, Duration::from_secs(r.ttl.max(0) as u64)))
    }

    /// Renews lease `id` once: `Some(ttl)`, or `None` when it has expired.
    async fn keep_alive(&self, id: i64) -> Result<Option<Duration>, String> {
        let r = self
            .client
            .call("lease keep-alive", Retry::Idempotent, |ch| async move {
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                tx.send(LeaseKeepAliveRequest { id })
                    .await
                    .map_err(|_| tonic::Status::internal("keep-alive stream closed"))?;
                let mut stream = LeaseClient::new(ch)
                    .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await?
                    .into_inner();
                let reply = stream.message().await?;
                drop(tx);
                reply.ok_or_else(|| tonic::Status::unavailable("keep-alive stream ended"))
            })
            .await
            .map_err(|e| e.to_string())?;
        Ok((r.ttl > 0).then(|| Duration::from_secs(r.ttl as u64)))
    }

    /// Creates the key if absent; `Ok(revision)` when it is ours (just created, or
    /// created earlier under the same lease), else the role it shows.
    async fn campaign(&self, lease: i64) -> Result<Result<i64, Role>, String> {
        let req = TxnRequest {
            compare: vec![Compare {
                result: compare::CompareResult::Equal as i32,
                target: compare::CompareTarget::Create as i32,
                key: self.key.clone(),
                target_union: Some(compare::TargetUnion::CreateRevision(0)),
                range_end: Vec::new(),
            }],
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: self.key.clone(),
                    value: self.value.clone(),
                    lease,
                    ..Default::default()
                })),
            }],
            failure: vec![RequestOp {
                request: Some(request_op::Request::RequestRange(RangeRequest {
                    key: self.key.clone(),
                    ..Default::default()
                })),
            }],
        };
        let r = self
            .client
            .call("campaign", Retry::NotSent, |ch| {
                let req = req.clone();
                async move { kv(ch).txn(req).await.map(|r| r.into_inner()) }
            })
            .await
            .map_err(|e| e.to_string())?;
        if r.succeeded {
            return Ok(Ok(r.header.map_or(0, |h| h.revision)));
        }
        let kv = r.responses.into_iter().find_map(|op| match op.response {
            Some(response_op::Response::ResponseRange(rr)) => rr.kvs.into_iter().next(),
            _ => None,
        });
        Ok(match kv {
            // Ours: an earlier campaign whose reply was lost, or a lease that outlived
            // a local deposition (still valid in etcd: it was just renewed).
            Some(kv) if kv.lease == lease => Ok(kv.create_revision),
            Some(kv) => Err(observed(&kv)),
            None => Err(Role::NoLeader {
                why: "the leadership key vanished during the campaign".into(),
            }),
        })
    }
}

/// The role a follower sees from the leadership key.
pub(crate) fn observed(kv: &KeyValue) -> Role {
    match serde_json::from_slice::<KeyValueJson>(&kv.value) {
        Ok(v) => Role::Follower {
            leader: LeaderInfo {
                id: v.id,
                url: v.url,
                revision: kv.create_revision,
            },
        },
        Err(e) => Role::NoLeader {
            why: format!(
                "the leadership key {} holds something unreadable ({e})",
                String::from_utf8_lossy(&kv.key)
            ),
        },
    }
}
