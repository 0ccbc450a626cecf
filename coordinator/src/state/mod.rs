//! The coordinator's durable state, behind one trait with two backends.
//!
//! State is a set of named *trees* (`nodes`, `sources`, `tokens`, ...), each a sorted
//! map from byte keys to byte values (JSON records with a format version). Two
//! backends implement [`StateStore`]:
//! - [`SledState`] (the default): one embedded sled database in the data directory;
//!   one coordinator, nothing else to run.
//! - [`EtcdState`] (`[state] backend = "etcd"`): keys under a prefix in an etcd v3
//!   cluster, shared by several coordinators of which one leads. Every change is one
//!   etcd transaction that also checks the writer still holds the leadership key
//!   (*fencing*), so a deposed leader's write fails as a whole, never half-applied.
//!
//! The rule for callers: every change that must be atomic is one [`Txn`]; a
//! read-check-write that must not race another writer carries its check as a
//! [`Cmp`] in the same [`Txn`] rather than relying on a process-local lock, because
//! with etcd the other writer may be another process.

pub mod etcd;
mod sled_state;

pub use etcd::EtcdState;
pub use sled_state::SledState;

/// The most operations callers put in one [`Txn`]: etcd refuses transactions of
/// more than `--max-txn-ops` (128 by default); a batch larger than this is split
/// into several commits.
pub const MAX_TXN_OPS: usize = 100;

/// A tree of the state (a sled tree; an etcd key range `<prefix>/<tree>/`).
/// Names are short ASCII words without `/`.
pub type TreeName = &'static str;

/// `(key, value)` pairs of a scan, in key order.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// A state operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The backend could not be read or written (I/O, network, no quorum): the
    /// message says which backend and what failed.
    #[error("state store: {0}")]
    Unavailable(String),
    /// This coordinator no longer holds the leadership it wrote under: the change
    /// was refused as a whole.
    #[error("not the leader: {0}")]
    Fenced(String),
}

/// A condition of a [`Txn`]: the value at `key` of `tree` is exactly `value`
/// (`None`: the key is absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmp {
    pub tree: TreeName,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// A change of a [`Txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        tree: TreeName,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        tree: TreeName,
        key: Vec<u8>,
    },
}

/// Changes applied together or not at all, if every condition holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub when: Vec<Cmp>,
    pub then: Vec<Op>,
}

impl Txn {
    /// A transaction with no conditions.
    pub fn new() -> Txn {
        Txn::default()
    }

    /// Adds the condition that `key` of `tree` holds `value` (`None`: absent).
    pub fn when(mut self, tree: TreeName, key: impl Into<Vec<u8>>, value: Option<Vec<u8>>) -> Txn {
        self.when.push(Cmp {
            tree,
            key: key.into(),
            value,
        });
        self
    }

    /// Adds a put.
    pub fn put(mut self, tree: TreeName, key: impl Into<Vec<u8>>, value: Vec<u8>) -> Txn {
        self.then.push(Op::Put {
            tree,
            key: key.into(),
            value,
        });
        self
    }

    /// Adds a delete.
    pub fn delete(mut self, tree: TreeName, key: impl Into<Vec<u8>>) -> Txn {
        self.then.push(Op::Delete {
            tree,
            key: key.into(),
        });
        self
    }
}

/// Where the state lives and who leads, as one coordinator sees it (`bulwark
/// status`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendStatus {
    /// [`StateStore::describe`].
    pub backend: String,
    /// This coordinator's part: `leader ...`, `follower of ...`, `no leader: why`.
    pub role: String,
    /// Whether it leads now.
    pub leading: bool,
    /// The leader as the backend holds it (empty with sled, or when nobody leads).
    pub leader_id: String,
    pub leader_url: String,
    /// With etcd: each endpoint's answer, and the members the cluster lists.
    pub members: Vec<etcd::MemberHealth>,
    pub cluster: Vec<String>,
    /// With etcd: what could not be read (no quorum, unreachable).
    pub errors: Vec<String>,
}

/// The coordinator's durable state (see the module docs).
///
/// Calls block the calling thread for one round trip to the backend (a local sled
/// read or write; an etcd request). They are safe from inside a tokio runtime and
/// from plain threads.
pub trait StateStore: Send + Sync + std::fmt::Debug + 'static {
    /// The value at `key` of `tree`.
    fn get(&self, tree: TreeName, key: &[u8]) -> Result<Option<Vec<u8>>, StateError>;

    /// Every `(key, value)` of `tree` whose key starts with `prefix` (all of it for
    /// an empty prefix), in key order.
    fn scan(&self, tree: TreeName, prefix: &[u8]) -> Result<Entries, StateError>;

    /// Applies `txn.then` atomically if every condition of `txn.when` holds:
    /// `Ok(true)` applied, `Ok(false)` a condition failed and nothing changed.
    /// Durable when it returns `Ok(true)` (sled is flushed; etcd has committed it
    /// to a quorum). `Err(Fenced)` when the writer no longer leads.
    fn commit(&self, txn: Txn) -> Result<bool, StateError>;

    /// A short description for logs and `bulwark status` (`sled /var/lib/...`,
    /// `etcd https://a:2379,... prefix /bulwark`).
    fn describe(&self) -> String;

    /// Where the state lives and who leads (one backend round trip or a few).
    /// The default: an embedded store of one coordinator, which always leads.
    fn status(&self) -> BackendStatus {
        BackendStatus {
            backend: self.describe(),
            role: "leader (the only coordinator: embedded state)".into(),
            leading: true,
            ..BackendStatus::default()
        }
    }

    /// One put, no conditions.
    fn put(&self, tree: TreeName, key: &[u8], value: Vec<u8>) -> Result<(), StateError> {
        self.commit(Txn::new().put(tree, key, value)).map(|_| ())
    }

    /// One delete, no conditions.
    fn delete(&self, tree: TreeName, key: &[u8]) -> Result<(), StateError> {
        self.commit(Txn::new().delete(tree, key)).map(|_| ())
    }
}

/// The contract every backend meets, public (hidden) so that the etcd backend's
/// tests in `tests/` run it against a real cluster.
#[doc(hidden)]
pub mod contract;
