//! [`StateStore`] on an etcd v3 cluster (`[state] backend = "etcd"`), and the
//! leadership of several coordinators sharing it ([`election`]).
//!
//! Key layout: the value at `key` of tree `t` is etcd key `<prefix>/<t>/<key bytes>`
//! (binary keys as they are); the leadership key is `<prefix>/leader`. A scan is a
//! range over `<prefix>/<t>/<scan prefix>`, read in pages of [`PAGE`] keys at the
//! revision of the first page, so a scan of any size is one consistent snapshot.
//!
//! A [`Txn`] is one etcd transaction: each condition a compare (a value: `value ==`;
//! absent: `create_revision == 0`), then its puts and deletes. A store made with
//! [`EtcdState::fenced`] adds `create_revision(<prefix>/leader) == mine` to every
//! transaction and reads the leadership key when the transaction fails, so a failure
//! of the fence is told apart from a failed condition and returned as
//! [`StateError::Fenced`]. Every transaction also carries a commit marker
//! ([`marker`]), so a commit that got no answer is sent again to the next endpoint
//! without risk of applying it twice. etcd limits a transaction to `--max-txn-ops`
//! (128 by default) operations; a larger one fails with etcd's message.
//!
//! Every request has a deadline (`timeout`); a request that no endpoint answers in
//! time (a cluster without quorum, or none reachable) fails with
//! [`StateError::Unavailable`] naming the endpoints, never hangs. Calls block the
//! calling thread; the async client runs on a runtime of its own (see [`client`]).

mod client;
pub mod election;
mod marker;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulwark_proto::etcd::{
    Compare, DeleteRangeRequest, MemberListRequest, PutRequest, RangeRequest, RequestOp,
    StatusRequest, TxnRequest, cluster_client::ClusterClient, compare,
    maintenance_client::MaintenanceClient, request_op, response_op,
};

use super::{Entries, Op, StateError, StateStore, TreeName, Txn};
use client::{Client, Retry, Runner, kv, status_text};
pub use election::{Election, LeaderInfo, Role};

/// Keys per range request of a scan.
pub const PAGE: i64 = 1000;

/// TLS to etcd: the CA that signed the members' certificates, and this
/// coordinator's client certificate and key (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How to reach the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdOptions {
    /// `http://host:port` or `https://host:port`, tried in order.
    pub endpoints: Vec<String>,
    /// Where Bulwark's keys live (`/bulwark`): starts with `/`, no trailing `/`.
    pub prefix: String,
    /// Required for `https://` endpoints.
    pub tls: Option<EtcdTls>,
    /// A request that no endpoint answers within this fails.
    pub timeout: Duration,
}

/// The default request timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The connection shared by the stores and the election of one coordinator.
pub(crate) struct Core {
    client: Arc<Client>,
    prefix: Vec<u8>,
    markers: Arc<marker::Markers>,
    // Last: dropping it stops the thread the client's tasks run on.
    runner: Runner,
}

impl Core {
    fn tree_prefix(&self, tree: TreeName) -> Vec<u8> {
        let mut k = self.prefix.clone();
        k.push(b'/');
        k.extend_from_slice(tree.as_bytes());
        k.push(b'/');
        k
    }

    fn key(&self, tree: TreeName, key: &[u8]) -> Vec<u8> {
        let mut k = self.tree_prefix(tree);
        k.extend_from_slice(key);
        k
    }

    pub(crate) fn leader_key(&self) -> Vec<u8> {
        let mut k = self.prefix.clone();
        k.extend_from_slice(b"/leader");
        k
    }
}

/// How a store's commits are fenced.
#[derive(Clone)]
enum Fence {
    None,
    Election(Arc<election::Shared>),
    /// A fixed leadership revision (tests of etcd's side of the fence).
    Fixed(i64),
}

/// The etcd backend (see the module docs).
#[derive(Clone)]
pub struct EtcdState {
    core: Arc<Core>,
    fence: Fence,
}

impl std::fmt::Debug for EtcdState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EtcdState({})", self.describe())
    }
}

/// The first key after every key starting with `p` (etcd's "prefix end"); empty
/// (the end of the key space) when `p` is all 0xff.
fn prefix_end(p: &[u8]) -> Vec<u8> {
    let mut end = p.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    Vec::new()
}

/// One status of a member, for `bulwark status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberHealth {
    pub endpoint: String,
    /// `Ok`: the member's version and whether it is the raft leader; `Err`: why it
    /// did not answer.
    pub status: Result<(String, bool), String>,
}

impl EtcdState {
    /// Connects (lazily: the first request dials) to the cluster of `opts`.
    pub fn connect(opts: &EtcdOptions) -> Result<EtcdState, StateError> {
        let runner = Runner::start()?;
        let client = {
            let _guard = runner.handle().enter();
            Client::new(opts)?
        };
        Ok(EtcdState {
            core: Arc::new(Core {
                client: Arc::new(client),
                prefix: opts.prefix.trim_end_matches('/').as_bytes().to_vec(),
                markers: Arc::new(marker::Markers::new(
                    opts.prefix.trim_end_matches('/').as_bytes(),
                )),
                runner,
            }),
            fence: Fence::None,
        })
    }

    /// Starts this coordinator's campaign for leadership (see [`election`]): `id`
    /// names it, `advertise` is the URL followers redirect to, `lease` the TTL
    /// (whole seconds; etcd may raise a very short one to its minimum).
    pub fn elect(
        &self,
        id: &str,
        advertise: &str,
        lease: Duration,
    ) -> Result<Election, StateError> {
        Election::start(self.core.clone(), id, advertise, lease)
    }

    /// A store on the same connection whose every commit carries the fence of
    /// `election`: refused locally while this coordinator does not lead, and by etcd
    /// once the leadership key is not the one it won.
    pub fn fenced(&self, election: &Election) -> EtcdState {
        EtcdState {
            core: self.core.clone(),
            fence: Fence::Election(election.shared()),
        }
    }

    /// A store fenced at a fixed leadership revision, without a local check: what
    /// a leader's write looks like to etcd after it lost the leadership unaware.
    #[doc(hidden)]
    pub fn fenced_at(&self, revision: i64) -> EtcdState {
        EtcdState {
            core: self.core.clone(),
            fence: Fence::Fixed(revision),
        }
    }

    /// The leadership key as etcd holds it now: `None` when nobody leads.
    pub fn leader(&self) -> Result<Option<LeaderInfo>, StateError> {
        let key = self.core.leader_key();
        let kvs = self.range(key, Vec::new(), "read the leadership key")?;
        Ok(kvs.first().and_then(|kv| match election::observed(kv) {
            Role::Follower { leader } => Some(leader),
            _ => None,
        }))
    }

    /// Each endpoint's answer to a status request, and the members the cluster
    /// lists (`name url`), for `bulwark status`.
    pub fn cluster_health(&self) -> Result<(Vec<MemberHealth>, Vec<String>), StateError> {
        let client = self.core.client.clone();
        self.core.runner.block_on(async move {
            let mut health = Vec::new();
            let per = client.timeout();
            for (url, ch) in client.members() {
                let mut m = MaintenanceClient::new(ch);
                let status = match tokio::time::timeout(per, m.status(StatusRequest {})).await {
                    Ok(Ok(r)) => {
                        let r = r.into_inner();
                        let me = r.header.map_or(0, |h| h.member_id);
                        Ok((r.version, me != 0 && r.leader == me))
                    }
                    Ok(Err(s)) => Err(status_text(&s)),
                    Err(_) => Err(format!("no answer within {per:?}")),
                };
                health.push(MemberHealth {
                    endpoint: url.to_string(),
                    status,
                });
            }
            let members = client
                .call("member list", Retry::Idempotent, |ch| async move {
                    ClusterClient::new(ch)
                        .member_list(MemberListRequest {
                            linearizable: false,
                        })
                        .await
                        .map(|r| r.into_inner())
                })
                .await?
                .members
                .into_iter()
                .map(|m| format!("{} {}", m.name, m.client_ur_ls.join(",")))
                .collect();
            Ok((health, members))
        })?
    }

    /// Keys under the prefix other than commit markers (`<prefix>/_txn/`): how
    /// many, and the first `show` of them (for `migrate`, which copies only into an
    /// empty prefix).
    pub fn keys_in_prefix(&self, show: i64) -> Result<(i64, Vec<Vec<u8>>), StateError> {
        let mut all = self.core.prefix.clone();
        all.push(b'/');
        let mut markers = all.clone();
        markers.extend_from_slice(b"_txn/");
        let spans = [
            (all.clone(), markers.clone()),
            (prefix_end(&markers), prefix_end(&all)),
        ];
        let client = self.core.client.clone();
        self.core.runner.block_on(async move {
            let (mut count, mut keys) = (0, Vec::new());
            for (key, range_end) in spans {
                let req = RangeRequest {
                    key,
                    range_end,
                    limit: show,
                    keys_only: true,
                    ..Default::default()
                };
                let r = client
                    .call("list the keys under the prefix", Retry::Idempotent, |ch| {
                        let req = req.clone();
                        async move { kv(ch).range(req).await.map(|r| r.into_inner()) }
                    })
                    .await?;
                count += r.count;
                keys.extend(r.kvs.into_iter().map(|kv| kv.key));
            }
            keys.truncate(usize::try_from(show).unwrap_or(0));
            Ok((count, keys))
        })?
    }

    /// Every key-value in `[key, end)` (`end` empty: the one key), in pages.
    fn range(
        &self,
        key: Vec<u8>,
        end: Vec<u8>,
        what: &'static str,
    ) -> Result<Vec<bulwark_proto::etcd::KeyValue>, StateError> {
        let client = self.core.client.clone();
        self.core.runner.block_on(async move {
            let mut out = Vec::new();
            let mut from = key;
            let mut revision = 0;
            loop {
                let req = RangeRequest {
                    key: from.clone(),
                    range_end: end.clone(),
                    limit: PAGE,
                    revision,
                    ..Default::default()
                };
                let r = client
                    .call(what, Retry::Idempotent, |ch| {
                        let req = req.clone();
                        async move { kv(ch).range(req).await.map(|r| r.into_inner()) }
                    })
                    .await?;
                if revision == 0 {
                    revision = r.header.as_ref().map_or(0, |h| h.revision);
                }
                let more = r.more && !end.is_empty();
                out.extend(r.kvs);
                match out.last() {
                    Some(last) if more => {
                        from = last.key.clone();
                        from.push(0);
                    }
                    _ => return Ok(out),
                }
            }
        })?
    }

    fn fence_revision(&self) -> Result<Option<i64>, StateError> {
        match &self.fence {
            Fence::None => Ok(None),
            Fence::Fixed(r) => Ok(Some(*r)),
            Fence::Election(s) => s.leading().map(Some).map_err(StateError::Fenced),
        }
    }

    fn txn_request(&self, txn: Txn, fence: Option<i64>) -> TxnRequest {
        let mut compare: Vec<Compare> = txn
            .when
            .into_iter()
            .map(|c| {
                let key = self.core.key(c.tree, &c.key);
                match c.value {
                    Some(v) => cmp(
                        key,
                        compare::CompareTarget::Value,
                        compare::TargetUnion::Value(v),
                    ),
                    None => cmp(
                        key,
                        compare::CompareTarget::Create,
                        compare::TargetUnion::CreateRevision(0),
                    ),
                }
            })
            .collect();
        let mut failure = Vec::new();
        if let Some(rev) = fence {
            let leader = self.core.leader_key();
            compare.push(cmp(
                leader.clone(),
                compare::CompareTarget::Create,
                compare::TargetUnion::CreateRevision(rev),
            ));
            failure.push(range_op(leader));
        }
        // etcd refuses two operations on one key in a transaction; as in sled, the
        // last one wins.
        let mut ops: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        for op in txn.then {
            let (k, v) = match op {
                Op::Put { tree, key, value } => (self.core.key(tree, &key), Some(value)),
                Op::Delete { tree, key } => (self.core.key(tree, &key), None),
            };
            ops.retain(|(o, _)| *o != k);
            ops.push((k, v));
        }
        let success = ops
            .into_iter()
            .map(|(key, v)| RequestOp {
                request: Some(match v {
                    Some(value) => request_op::Request::RequestPut(PutRequest {
                        key,
                        value,
                        ..Default::default()
                    }),
                    None => request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                        key,
                        ..Default::default()
                    }),
                }),
            })
            .collect();
        TxnRequest {
            compare,
            success,
            failure,
        }
    }
}

/// etcd's default `--max-txn-ops`.
const MAX_TXN_OPS: usize = 128;

fn range_op(key: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestRange(RangeRequest {
            key,
            ..Default::default()
        })),
    }
}

fn cmp(key: Vec<u8>, target: compare::CompareTarget, value: compare::TargetUnion) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: target as i32,
        key,
        target_union: Some(value),
        range_end: Vec::new(),
    }
}

impl StateStore for EtcdState {
    fn get(&self, tree: TreeName, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        let kvs = self.range(self.core.key(tree, key), Vec::new(), "get")?;
        Ok(kvs.into_iter().next().map(|kv| kv.value))
    }

    fn scan(&self, tree: TreeName, prefix: &[u8]) -> Result<Entries, StateError> {
        let strip = self.core.tree_prefix(tree).len();
        let from = self.core.key(tree, prefix);
        let end = prefix_end(&from);
        let kvs = self.range(from, end, "scan")?;
        Ok(kvs
            .into_iter()
            .map(|kv| (kv.key.get(strip..).unwrap_or_default().to_vec(), kv.value))
            .collect())
    }

    fn commit(&self, txn: Txn) -> Result<bool, StateError> {
        let fence = self.fence_revision()?;
        let mut req = self.txn_request(txn, fence);
        // The commit marker makes sending it again harmless (see `marker`).
        let markers = self.core.markers.clone();
        let marker = markers.next();
        let sent = Instant::now();
        let room = MAX_TXN_OPS
            .saturating_sub(req.success.len() + 1)
            .min(marker::DELETE_PER_COMMIT);
        let old = markers.take_settled(room);
        req.compare.push(cmp(
            marker.clone(),
            compare::CompareTarget::Create,
            compare::TargetUnion::CreateRevision(0),
        ));
        req.failure.push(range_op(marker.clone()));
        req.success.extend(old.iter().map(|k| RequestOp {
            request: Some(request_op::Request::RequestDeleteRange(
                DeleteRangeRequest {
                    key: k.clone(),
                    ..Default::default()
                },
            )),
        }));
        let client = self.core.client.clone();
        let (m, key) = (markers.clone(), marker.clone());
        let r = self.core.runner.block_on(async move {
            let lease = m.lease(&client).await?;
            req.success.push(RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key,
                    lease,
                    ..Default::default()
                })),
            });
            client
                .call("commit", Retry::Idempotent, |ch| {
                    let req = req.clone();
                    async move { kv(ch).txn(req).await.map(|r| r.into_inner()) }
                })
                .await
        })?;
        // This commit's marker goes later in every case (a delayed send may yet
        // create it); the old ones go now only if this commit deleted them.
        markers.retire(sent, vec![marker]);
        let r = match r {
            Ok(r) if r.succeeded => return Ok(true),
            Ok(r) => r,
            Err(e) => {
                markers.retire(sent, old);
                return Err(e);
            }
        };
        markers.retire(sent, old);
        // The failure branch's reads: [the leadership key when fenced], the marker.
        let mut reads: Vec<Option<bulwark_proto::etcd::KeyValue>> = r
            .responses
            .into_iter()
            .filter_map(|op| match op.response {
                Some(response_op::Response::ResponseRange(rr)) => Some(rr.kvs.into_iter().next()),
                _ => None,
            })
            .collect();
        if reads.pop().flatten().is_some() {
            // An earlier send of this commit was applied.
            return Ok(true);
        }
        let Some(mine) = fence else {
            return Ok(false);
        };
        match reads.pop() {
            Some(Some(kv)) if kv.create_revision == mine => Ok(false),
            Some(Some(kv)) => Err(StateError::Fenced(format!(
                "this coordinator led at revision {mine}; now {}",
                match election::observed(&kv) {
                    Role::Follower { leader } => format!(
                        "{} at {} leads (revision {})",
                        leader.id, leader.url, leader.revision
                    ),
                    other => other.to_string(),
                }
            ))),
            _ => Err(StateError::Fenced(format!(
                "this coordinator led at revision {mine}; etcd now has no leader"
            ))),
        }
    }

    fn status(&self) -> super::BackendStatus {
        let (role, leading) = match &self.fence {
            Fence::Election(s) => (s.role().to_string(), s.leading().is_ok()),
            Fence::None => ("not campaigning (no election)".to_string(), false),
            Fence::Fixed(r) => (format!("fenced at revision {r}"), false),
        };
        let mut st = super::BackendStatus {
            backend: self.describe(),
            role,
            leading,
            ..Default::default()
        };
        match self.leader() {
            Ok(Some(l)) => (st.leader_id, st.leader_url) = (l.id, l.url),
            Ok(None) => {}
            Err(e) => st.errors.push(format!("leadership key: {e}")),
        }
        match self.cluster_health() {
            Ok((members, cluster)) => (st.members, st.cluster) = (members, cluster),
            Err(e) => st.errors.push(format!("cluster: {e}")),
        }
        st
    }

    fn describe(&self) -> String {
        format!(
            "etcd {} prefix {}",
            self.core.client.endpoints(),
            String::from_utf8_lossy(&self.core.prefix)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_is_the_first_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/b/nodes/"), b"/b/nodes0".to_vec());
        assert_eq!(prefix_end(&[b'a', 0xff, 0xff]), b"b".to_vec());
        assert_eq!(prefix_end(&[0xff]), Vec::<u8>::new());
    }
}
