//! [`StateStore`] on one embedded sled database (the default backend).
//!
//! A tree of the state is a sled tree of the same name. A [`Txn`] runs as one sled
//! transaction over the trees it names, then the database is flushed, so a change
//! acknowledged is on disk.

use std::collections::BTreeSet;
use std::path::Path;

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::{Entries, Op, StateError, StateStore, TreeName, Txn};

/// The sled backend.
pub struct SledState {
    db: sled::Db,
    path: std::path::PathBuf,
}

impl std::fmt::Debug for SledState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SledState({})", self.path.display())
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> StateError {
    StateError::Unavailable(format!("sled {what}: {e}"))
}

impl SledState {
    /// Opens (or creates) the database at `path` with a bounded cache.
    pub fn open(path: &Path) -> Result<SledState, StateError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(16 * 1024 * 1024)
            .open()
            .map_err(|e| unavailable(&format!("cannot open {}", path.display()), e))?;
        Ok(SledState {
            db,
            path: path.to_path_buf(),
        })
    }

    /// Opens the coordinator's database in `data_dir` (`data_dir/registry`,
    /// creating the directory), where every version has kept it.
    pub fn open_in(data_dir: &Path) -> Result<SledState, StateError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| unavailable(&format!("cannot create {}", data_dir.display()), e))?;
        SledState::open(&data_dir.join("registry"))
    }

    fn tree(&self, name: TreeName) -> Result<sled::Tree, StateError> {
        self.db
            .open_tree(name)
            .map_err(|e| unavailable(&format!("tree {name}"), e))
    }

    fn flush(&self) -> Result<(), StateError> {
        self.db
            .flush()
            .map(|_| ())
            .map_err(|e| unavailable(&format!("flush {}", self.path.display()), e))
    }
}

impl StateStore for SledState {
    fn get(&self, tree: TreeName, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        let v = self
            .tree(tree)?
            .get(key)
            .map_err(|e| unavailable(&format!("read {tree}"), e))?;
        Ok(v.map(|v| v.to_vec()))
    }

    fn scan(&self, tree: TreeName, prefix: &[u8]) -> Result<Entries, StateError> {
        self.tree(tree)?
            .scan_prefix(prefix)
            .map(|r| {
                r.map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(|e| unavailable(&format!("scan {tree}"), e))
            })
            .collect()
    }

    fn commit(&self, txn: Txn) -> Result<bool, StateError> {
        // The trees this transaction touches, in a fixed order, and each op's index.
        let names: Vec<TreeName> = txn
            .when
            .iter()
            .map(|c| c.tree)
            .chain(txn.then.iter().map(|o| match o {
                Op::Put { tree, .. } | Op::Delete { tree, .. } => *tree,
            }))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if names.is_empty() {
            return Ok(true);
        }
        let trees = names
            .iter()
            .map(|n| self.tree(n))
            .collect::<Result<Vec<_>, _>>()?;
        let at = |n: TreeName| names.iter().position(|x| *x == n).unwrap_or(0);
        let r = trees.as_slice().transaction(|t| {
            for c in &txn.when {
                let cur = t[at(c.tree)].get(&c.key)?;
                if cur.as_deref() != c.value.as_deref() {
                    return Err(ConflictableTransactionError::Abort(()));
                }
            }
            for o in &txn.then {
                match o {
                    Op::Put { tree, key, value } => {
                        t[at(tree)].insert(key.as_slice(), value.as_slice())?;
                    }
                    Op::Delete { tree, key } => {
                        t[at(tree)].remove(key.as_slice())?;
                    }
                }
            }
            Ok(())
        });
        match r {
            Ok(()) => {
                self.flush()?;
                Ok(true)
            }
            Err(TransactionError::Abort(())) => Ok(false),
            Err(TransactionError::Storage(e)) => Err(unavailable("transaction", e)),
        }
    }

    fn describe(&self) -> String {
        format!("sled {}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sled_meets_the_contract() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SledState::open(&dir.path().join("state")).expect("open");
        super::super::contract::check(&s);
        drop(s);
        // Durable: what was committed is there after a reopen (retried while
        // sled's flusher thread of the dropped handle still holds the file lock).
        let mut tries = 0;
        let s = loop {
            match SledState::open(&dir.path().join("state")) {
                Err(StateError::Unavailable(m))
                    if m.contains("could not acquire lock") && tries < 500 =>
                {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                r => break r.expect("reopen"),
            }
        };
        assert_eq!(
            s.get("nodes", b"n2").expect("get"),
            Some(b"two".to_vec()),
            "a committed put was lost over a reopen"
        );
    }
}

#[cfg(test)]
#[path = "sled_state/tests.rs"]
mod layout_tests;
