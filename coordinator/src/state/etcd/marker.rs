//! Commit markers: what makes a commit safe to send again.
//!
//! A commit whose request timed out may or may not have been applied (etcd answers a
//! write caught in a raft leader change only after its own 7 s timeout). So every
//! commit carries, besides its own conditions and changes, the condition "my marker
//! key `<prefix>/_txn/<session>/<seq>` does not exist" and the put of that key; its
//! failure branch reads the marker. Sending it again (to the next endpoint) is then
//! harmless: if an earlier send was applied, the new one fails on the marker and the
//! read shows it, which means "applied". A delayed earlier send that lands after a
//! later one also fails on the marker.
//!
//! Markers are put with a lease of [`MARKER_TTL`] (re-granted every half of it), so
//! a crashed coordinator's markers go by themselves, and markers older than
//! [`SETTLED`] (when no send of their commit can still be in flight) are deleted by
//! later commits, a few at a time, in the same transaction.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bulwark_proto::etcd::{LeaseGrantRequest, lease_client::LeaseClient};

use super::super::StateError;
use super::client::{Client, Retry};

/// How long a marker lives at most (its lease).
pub(crate) const MARKER_TTL: Duration = Duration::from_secs(600);
/// A marker this old is deleted by a later commit.
const SETTLED: Duration = Duration::from_secs(30);
/// Most markers one commit deletes.
pub(crate) const DELETE_PER_COMMIT: usize = 8;

/// The markers of one store connection.
pub(crate) struct Markers {
    prefix: Vec<u8>,
    seq: AtomicU64,
    /// The lease markers are put with, and when it was granted.
    lease: tokio::sync::Mutex<Option<(i64, Instant)>>,
    /// Markers to delete, with when their commit was sent.
    old: Mutex<VecDeque<(Instant, Vec<u8>)>>,
}

impl Markers {
    /// Markers under `<prefix>/_txn/<random session>/`.
    pub(crate) fn new(prefix: &[u8]) -> Markers {
        let mut p = prefix.to_vec();
        p.extend_from_slice(format!("/_txn/{:016x}/", rand::random::<u64>()).as_bytes());
        Markers {
            prefix: p,
            seq: AtomicU64::new(0),
            lease: tokio::sync::Mutex::new(None),
            old: Mutex::new(VecDeque::new()),
        }
    }

    /// A fresh marker key.
    pub(crate) fn next(&self) -> Vec<u8> {
        let mut k = self.prefix.clone();
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        k.extend_from_slice(format!("{n:016x}").as_bytes());
        k
    }

    /// The lease to put markers with, granting a new one when the current one is
    /// older than half its TTL.
    pub(crate) async fn lease(&self, client: &Client) -> Result<i64, StateError> {
        let mut l = self.lease.lock().await;
        if let Some((id, at)) = *l
            && at.elapsed() < MARKER_TTL / 2
        {
            return Ok(id);
        }
        let ttl = MARKER_TTL.as_secs() as i64;
        let r = client
            .call(
                "grant the commit markers' lease",
                Retry::Idempotent,
                |ch| async move {
                    LeaseClient::new(ch)
                        .lease_grant(LeaseGrantRequest { ttl, id: 0 })
                        .await
                        .map(|r| r.into_inner())
                },
            )
            .await?;
        if !r.error.is_empty() {
            return Err(StateError::Unavailable(format!(
                "etcd lease grant for commit markers: {}",
                r.error
            )));
        }
        *l = Some((r.id, Instant::now()));
        Ok(r.id)
    }

    /// Up to `max` settled markers to delete.
    pub(crate) fn take_settled(&self, max: usize) -> Vec<Vec<u8>> {
        let mut old = self.old.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        while out.len() < max {
            match old.front() {
                Some((at, _)) if at.elapsed() >= SETTLED => {
                    if let Some((_, k)) = old.pop_front() {
                        out.push(k);
                    }
                }
                _ => break,
            }
        }
        out
    }

    /// Markers to delete later: `sent` is when their commit was first sent.
    pub(crate) fn retire(&self, sent: Instant, keys: Vec<Vec<u8>>) {
        let mut old = self.old.lock().unwrap_or_else(|p| p.into_inner());
        for k in keys {
            old.push_back((sent, k));
        }
        // Keep the queue in send order (keys put back are older than new ones).
        old.make_contiguous().sort_by_key(|(at, _)| *at);
    }
}
