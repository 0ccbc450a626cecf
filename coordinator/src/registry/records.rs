//! Persistence: the encoding of the records ([`crate::records`]) the registry
//! keeps in sled, and the plain reads and writes of them.

use super::*;

pub(super) fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| RegistryError::Store(e.to_string()))
}

pub(super) fn dec<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| RegistryError::Store(format!("unreadable record: {e}")))
}

impl Registry {
    /// Whether a node is up (reported within the node timeout).
    pub fn node_up(&self, n: &NodeRecord) -> bool {
        now_ms() - n.last_seen_ms <= self.node_timeout.as_millis() as i64
    }

    /// Every node, by name.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>> {
        self.nodes.iter().map(|r| dec(&r?.1)).collect()
    }

    /// One node.
    pub fn node(&self, name: &str) -> Result<Option<NodeRecord>> {
        self.nodes.get(name)?.map(|v| dec(&v)).transpose()
    }

    /// Every agent, by name.
    pub fn agents(&self) -> Result<Vec<AgentRecord>> {
        self.agents.iter().map(|r| dec(&r?.1)).collect()
    }

    /// Every data source, by name.
    pub fn sources(&self) -> Result<Vec<SourceRecord>> {
        self.sources.iter().map(|r| dec(&r?.1)).collect()
    }

    /// One data source.
    pub fn source(&self, name: &str) -> Result<SourceRecord> {
        self.sources
            .get(name)?
            .map(|v| dec(&v))
            .transpose()?
            .ok_or_else(|| RegistryError::UnknownSource(name.to_string()))
    }

    pub(super) fn put_source(&self, s: &SourceRecord) -> Result<()> {
        self.sources.insert(s.name.as_bytes(), enc(s)?)?;
        Ok(())
    }
}
