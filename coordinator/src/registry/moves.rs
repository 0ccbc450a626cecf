//! Moves: draining a node, and the durable steps of copying a source from node
//! to node (begin, finish with a new epoch, abort, stale copies dropped).

use super::*;

impl Registry {
    /// Marks a node draining (or not).
    pub fn set_draining(&self, node: &str, draining: bool) -> Result<NodeRecord> {
        let _g = lock(&self.placement);
        let mut n = self
            .node(node)?
            .ok_or_else(|| RegistryError::UnknownNode(node.to_string()))?;
        n.draining = draining;
        self.write(NODES, node, &n)?;
        Ok(n)
    }

    /// Starts a move of `source` to `to`: from now on syncs wait and the node it is
    /// on lets `to` copy it. Durable before it returns.
    pub fn begin_move(&self, source: &str, to: &str) -> Result<SourceRecord> {
        let _g = lock(&self.placement);
        let mut s = self.source(source)?;
        if !s.moving_to.is_empty() {
            return Err(RegistryError::InvalidSource(
                source.to_string(),
                format!("it is already moving to {}", s.moving_to),
            ));
        }
        s.moving_to = to.to_string();
        s.state = "moving".into();
        self.put_source(&s)?;
        Ok(s)
    }

    /// Switches `source` to the node it was copied to, with a new epoch (the old
    /// node refuses the old one from now on); the old node's copy is to be dropped.
    pub fn finish_move(&self, source: &str) -> Result<SourceRecord> {
        let _g = lock(&self.placement);
        let mut s = self.source(source)?;
        if s.moving_to.is_empty() {
            return Err(RegistryError::InvalidSource(
                source.to_string(),
                "no move is in progress".into(),
            ));
        }
        if let Some(old) = s.node.take() {
            s.stale_copies.push(old);
        }
        s.node = Some(std::mem::take(&mut s.moving_to));
        s.epoch += 1;
        s.state = "ok".into();
        s.usage = Usage::default();
        self.put_source(&s)?;
        Ok(s)
    }

    /// Ends a move that did not finish: the source stays where it was; returns the
    /// node that may hold a partial copy.
    pub fn abort_move(&self, source: &str) -> Result<String> {
        let _g = lock(&self.placement);
        let mut s = self.source(source)?;
        let to = std::mem::take(&mut s.moving_to);
        if !to.is_empty() && !s.stale_copies.contains(&to) {
            s.stale_copies.push(to.clone());
        }
        s.state = "ok".into();
        self.put_source(&s)?;
        Ok(to)
    }

    /// A node no longer holds a stale copy of `source`.
    pub fn copy_dropped(&self, source: &str, node: &str) -> Result<()> {
        let _g = lock(&self.placement);
        let mut s = self.source(source)?;
        s.stale_copies.retain(|n| n != node);
        self.put_source(&s)?;
        Ok(())
    }
}
