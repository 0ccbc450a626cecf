//! The metadata store behind a narrow trait: named trees of byte keys and values,
//! read one key or one prefix at a time, changed in [`Batch`]es that apply
//! atomically, made durable by [`MetaStore::flush`]. [`SledMeta`] is the node's
//! (sled in `<data_dir>/meta`); [`MemMeta`] holds everything in memory, for tests
//! of the record logic without a database. What the records mean, and their
//! format version, is `records.rs`'s business.

use std::collections::BTreeMap;
use std::path::Path;

use super::{Result, StoreError};

/// The trees of the metadata store (see the module docs of `store`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Tree {
    /// name → `SourceMeta`.
    Sources,
    /// name ∖0 id → `PointMeta`.
    Points,
    /// name → the sync being received (`Pending`).
    Pending,
    /// name → the committed point still in the journal (`Settle`).
    Settle,
    /// name ∖0 id → `LogFileMeta`.
    LogFiles,
    /// name → the coordinator's assignment, as the service encoded it.
    Assignments,
}

impl Tree {
    const ALL: [Tree; 6] = [
        Tree::Sources,
        Tree::Points,
        Tree::Pending,
        Tree::Settle,
        Tree::LogFiles,
        Tree::Assignments,
    ];

    /// The tree's name in the database (as older nodes wrote it).
    fn name(self) -> &'static str {
        match self {
            Tree::Sources => "sources",
            Tree::Points => "points",
            Tree::Pending => "pending",
            Tree::Settle => "settle",
            Tree::LogFiles => "logfiles",
            Tree::Assignments => "assignments",
        }
    }
}

/// Changes that are applied together or not at all.
#[derive(Debug, Default)]
pub(super) struct Batch {
    ops: Vec<(Tree, Vec<u8>, Option<Vec<u8>>)>,
}

impl Batch {
    /// Sets `key` of `tree` to `value`.
    pub(super) fn put(&mut self, tree: Tree, key: impl AsRef<[u8]>, value: &[u8]) -> &mut Self {
        self.ops
            .push((tree, key.as_ref().to_vec(), Some(value.to_vec())));
        self
    }

    /// Removes `key` from `tree` (nothing if it is absent).
    pub(super) fn remove(&mut self, tree: Tree, key: impl AsRef<[u8]>) -> &mut Self {
        self.ops.push((tree, key.as_ref().to_vec(), None));
        self
    }
}

/// The metadata store as the node uses it.
pub(super) trait MetaStore: Send + Sync {
    /// The value of `key` in `tree`.
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Every key starting with `prefix` (all of them for an empty prefix), in key
    /// order, with its value.
    fn scan(&self, tree: Tree, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;
    /// The value of the last key starting with `prefix`.
    fn last(&self, tree: Tree, prefix: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Applies every change of `batch`, atomically (not yet durable).
    fn apply(&self, batch: &Batch) -> Result<()>;
    /// Makes every change so far durable.
    fn flush(&self) -> Result<()>;
}

/// The node's metadata store: sled.
pub(super) struct SledMeta {
    db: sled::Db,
    /// One per [`Tree`], in the order of [`Tree::ALL`].
    trees: Vec<sled::Tree>,
}

impl SledMeta {
    /// Opens (or creates) the database at `path`.
    pub(super) fn open(path: &Path) -> Result<SledMeta> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(16 * 1024 * 1024)
            .open()
            .map_err(|e| StoreError::Meta(format!("cannot open {}: {e}", path.display())))?;
        let trees = Tree::ALL
            .iter()
            .map(|t| db.open_tree(t.name()))
            .collect::<std::result::Result<_, _>>()?;
        Ok(SledMeta { db, trees })
    }

    fn tree(&self, tree: Tree) -> &sled::Tree {
        &self.trees[tree as usize]
    }
}

impl MetaStore for SledMeta {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.tree(tree).get(key)?.map(|v| v.to_vec()))
    }

    fn scan(&self, tree: Tree, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.tree(tree)
            .scan_prefix(prefix)
            .map(|r| {
                let (k, v) = r?;
                Ok((k.to_vec(), v.to_vec()))
            })
            .collect()
    }

    fn last(&self, tree: Tree, prefix: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.tree(tree).scan_prefix(prefix).next_back() {
            Some(r) => Ok(Some(r?.1.to_vec())),
            None => Ok(None),
        }
    }

    fn apply(&self, batch: &Batch) -> Result<()> {
        use sled::Transactional;
        // One transaction over the trees the batch touches.
        let mut touched: Vec<Tree> = batch.ops.iter().map(|(t, _, _)| *t).collect();
        touched.sort();
        touched.dedup();
        let trees: Vec<&sled::Tree> = touched.iter().map(|t| self.tree(*t)).collect();
        trees
            .as_slice()
            .transaction(|tx| {
                for (t, k, v) in &batch.ops {
                    let i = touched.iter().position(|x| x == t).unwrap_or(0);
                    match v {
                        Some(v) => tx[i].insert(k.as_slice(), v.as_slice())?,
                        None => tx[i].remove(k.as_slice())?,
                    };
                }
                Ok(())
            })
            .map_err(|e: sled::transaction::TransactionError<()>| {
                StoreError::Meta(format!("{e:?}"))
            })
    }

    fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }
}

/// A key of [`MemMeta`]: the tree and the key in it.
type MemKey = (Tree, Vec<u8>);

/// A metadata store in memory (tests).
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Default)]
pub(super) struct MemMeta {
    map: std::sync::Mutex<BTreeMap<MemKey, Vec<u8>>>,
}

impl MetaStore for MemMeta {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        Ok(map.get(&(tree, key.to_vec())).cloned())
    }

    fn scan(&self, tree: Tree, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        Ok(map
            .range((tree, prefix.to_vec())..)
            .take_while(|((t, k), _)| *t == tree && k.starts_with(prefix))
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect())
    }

    fn last(&self, tree: Tree, prefix: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.scan(tree, prefix)?.pop().map(|(_, v)| v))
    }

    fn apply(&self, batch: &Batch) -> Result<()> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        for (t, k, v) in &batch.ops {
            match v {
                Some(v) => map.insert((*t, k.clone()), v.clone()),
                None => map.remove(&(*t, k.clone())),
            };
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }
}
