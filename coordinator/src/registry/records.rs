//! Persistence: the encoding of the records ([`crate::records`]) the registry
//! keeps in the state store, the trees they live in, and the plain reads and
//! writes of them.

use super::*;

/// Nodes by name ([`NodeRecord`]).
pub(super) const NODES: TreeName = "nodes";
/// Agents by name ([`AgentRecord`]).
pub(super) const AGENTS: TreeName = "agents";
/// Data sources by name ([`SourceRecord`]).
pub(super) const SOURCES: TreeName = "sources";
/// Alerts by key ([`AlertRecord`]).
pub(super) const ALERTS: TreeName = "alerts";
/// Protection groups by name ([`GroupRecord`]).
pub(super) const GROUPS: TreeName = "groups";
/// Agents' own quotas by agent (`QuotaRecord`).
pub(super) const QUOTAS: TreeName = "quotas";
/// Usage histories of the capacity forecast (see `forecast`).
pub(super) const FORECAST: TreeName = "forecast";

/// How many times [`Registry::update`] reads again after another writer changed
/// the record between its read and its write.
const UPDATE_TRIES: usize = 16;

pub(super) fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| RegistryError::Store(e.to_string()))
}

pub(super) fn dec<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| RegistryError::Store(format!("unreadable record: {e}")))
}

impl Registry {
    /// The record at `key` of `tree`.
    pub(super) fn read<T: for<'de> Deserialize<'de>>(
        &self,
        tree: TreeName,
        key: &str,
    ) -> Result<Option<T>> {
        self.state
            .get(tree, key.as_bytes())?
            .map(|v| dec(&v))
            .transpose()
    }

    /// Every record of `tree`, in key order.
    pub(super) fn read_all<T: for<'de> Deserialize<'de>>(&self, tree: TreeName) -> Result<Vec<T>> {
        self.state
            .scan(tree, b"")?
            .iter()
            .map(|(_, v)| dec(v))
            .collect()
    }

    /// Writes `v` at `key` of `tree`.
    pub(super) fn write<T: Serialize>(&self, tree: TreeName, key: &str, v: &T) -> Result<()> {
        self.state.put(tree, key.as_bytes(), enc(v)?)?;
        Ok(())
    }

    /// Changes the record at `key` of `tree` with `f` (given what is there now;
    /// `None` back: nothing to write) as one commit conditioned on the value read,
    /// read again if another writer changed it in between. Returns what was written.
    pub(super) fn update<T, F>(&self, tree: TreeName, key: &str, mut f: F) -> Result<Option<T>>
    where
        T: Serialize + for<'de> Deserialize<'de>,
        F: FnMut(Option<T>) -> Result<Option<T>>,
    {
        for _ in 0..UPDATE_TRIES {
            let old = self.state.get(tree, key.as_bytes())?;
            let Some(new) = f(old.as_deref().map(dec).transpose()?)? else {
                return Ok(None);
            };
            let txn =
                Txn::new()
                    .when(tree, key.as_bytes(), old)
                    .put(tree, key.as_bytes(), enc(&new)?);
            if self.state.commit(txn)? {
                return Ok(Some(new));
            }
        }
        Err(RegistryError::Store(format!(
            "{tree}/{key}: changed by another writer at each of {UPDATE_TRIES} tries"
        )))
    }

    /// Whether a node is up (reported within the node timeout).
    pub fn node_up(&self, n: &NodeRecord) -> bool {
        now_ms() - n.last_seen_ms <= self.node_timeout.as_millis() as i64
    }

    /// Every node, by name.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>> {
        self.read_all(NODES)
    }

    /// One node.
    pub fn node(&self, name: &str) -> Result<Option<NodeRecord>> {
        self.read(NODES, name)
    }

    /// Every agent, by name.
    pub fn agents(&self) -> Result<Vec<AgentRecord>> {
        self.read_all(AGENTS)
    }

    /// Every data source, by name.
    pub fn sources(&self) -> Result<Vec<SourceRecord>> {
        self.read_all(SOURCES)
    }

    /// One data source.
    pub fn source(&self, name: &str) -> Result<SourceRecord> {
        self.read(SOURCES, name)?
            .ok_or_else(|| RegistryError::UnknownSource(name.to_string()))
    }

    pub(super) fn put_source(&self, s: &SourceRecord) -> Result<()> {
        self.write(SOURCES, &s.name, s)
    }

    /// Adds the write of `s` to `txn`.
    pub(super) fn put_source_in(txn: Txn, s: &SourceRecord) -> Result<Txn> {
        Ok(txn.put(SOURCES, s.name.as_bytes(), enc(s)?))
    }
}
