//! Moves: a source copied from node to node (one at a time in the fleet), the
//! drops of stale copies, draining a node and rebalancing the fleet.

use bulwark_common::tls::Identity;
use bulwark_proto as pb;

use super::{CoordinatorService, Result};
use crate::error::CoordinatorError;
use crate::registry::{RegistryError, SourceRecord};

impl CoordinatorService {
    /// Moves `source` to node `to`: marks the move (syncs wait), has `to` copy the
    /// source from its node and verify every checksum, switches the assignment with
    /// a new epoch, then has the old node drop its copy. A move that fails leaves
    /// the source where it was.
    pub async fn move_source(&self, source: &str, to: &str) -> pb::SourceMove {
        let _one = self.moves.lock().await;
        let started = std::time::Instant::now();
        let mut report = pb::SourceMove {
            source: source.to_string(),
            to: to.to_string(),
            ..Default::default()
        };
        if let Err(e) = self.copy_and_switch(source, to, &mut report).await {
            report.error = e.to_string();
        }
        report.duration_ms = started.elapsed().as_millis() as u64;
        report
    }

    /// The steps of [`Self::move_source`], filling `report` as they go.
    async fn copy_and_switch(
        &self,
        source: &str,
        to: &str,
        report: &mut pb::SourceMove,
    ) -> Result<()> {
        let s = self.registry.source(source)?;
        let from = s
            .node
            .clone()
            .ok_or_else(|| RegistryError::Unassigned(source.to_string(), s.error.clone()))?;
        report.from = from.clone();
        if from == to {
            return Err(CoordinatorError::Invalid(format!(
                "{source} is on {to} already"
            )));
        }
        let from_rec = self
            .registry
            .node(&from)?
            .ok_or_else(|| CoordinatorError::NotFound(format!("no storage node named {from}")))?;
        let mut target = self.node_client(to)?;
        self.registry.begin_move(source, to)?;
        tracing::info!(source, %from, to, "move started");
        let imported = target
            .import(pb::ImportRequest {
                source: source.to_string(),
                from_node: from.clone(),
                from_address: from_rec.address.clone(),
            })
            .await;
        match imported {
            Ok(r) => {
                let r = r.into_inner();
                report.bytes = r.bytes;
                report.points = r.points;
                // A crash here leaves a whole copy on the target, not switched to.
                bulwark_common::failpoint::hit("coordinator-move-copied");
                self.registry.finish_move(source)?;
                tracing::info!(source, %from, to, bytes = r.bytes, points = r.points, "move finished: the source is on its new node");
                self.drop_copy(source, &from).await;
                Ok(())
            }
            Err(st) => {
                let partial = self.registry.abort_move(source)?;
                tracing::warn!(source, %from, to, "move failed, the source stays on {from}: {}", st.message());
                self.drop_copy(source, &partial).await;
                Err(CoordinatorError::at_node(to, &st))
            }
        }
    }

    /// Asks `node` to delete its copy of `source` (not assigned there); what fails
    /// stays listed on the source and is retried by the monitor.
    pub async fn drop_copy(&self, source: &str, node: &str) {
        let key = (source.to_string(), node.to_string());
        let now = std::time::Instant::now();
        if self
            .drops_held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .is_some_and(|until| *until > now)
        {
            return;
        }
        let Ok(mut client) = self.node_client(node) else {
            return;
        };
        match client
            .drop_source(pb::DropSourceRequest {
                source: source.to_string(),
            })
            .await
        {
            Ok(_) => {
                if let Err(e) = self.registry.copy_dropped(source, node) {
                    tracing::warn!(source, node, "cannot record a dropped copy: {e}");
                }
            }
            Err(st)
                if st.code() == tonic::Code::FailedPrecondition
                    && st.message().contains("retention lock") =>
            {
                // Kept until its points age out of the lock: asked again hourly.
                tracing::info!(
                    source,
                    node,
                    "stale copy kept by its retention lock: {}",
                    st.message()
                );
                self.drops_held
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key, now + std::time::Duration::from_secs(3600));
            }
            Err(st) => {
                tracing::warn!(source, node, "stale copy not dropped yet: {}", st.message())
            }
        }
    }

    /// Ends the moves a coordinator crash interrupted (they roll back: the source
    /// stays on its node; the partial copy is dropped), and retries the drops of
    /// stale copies.
    pub async fn tidy_moves(&self) {
        let Ok(sources) = self.registry.sources() else {
            return;
        };
        for s in sources {
            if !s.moving_to.is_empty() && self.moves.try_lock().is_ok() {
                tracing::warn!(source = %s.name, to = %s.moving_to, "rolling back a move the coordinator did not finish");
                match self.registry.abort_move(&s.name) {
                    Ok(to) => self.drop_copy(&s.name, &to).await,
                    Err(e) => tracing::warn!(source = %s.name, "cannot roll back the move: {e}"),
                }
            }
            for n in &s.stale_copies {
                self.drop_copy(&s.name, n).await;
            }
        }
    }

    /// `Drain`: marks `node` draining and moves its sources off, the largest
    /// first, each where placement puts it now.
    pub async fn drain(&self, admin: &Identity, node: String) -> Result<pb::MoveReport> {
        self.registry.set_draining(&node, true)?;
        tracing::info!(%admin, node, "drain started");
        let before = crate::placement::spread(&self.registry.node_figures()?);
        let mut moves = Vec::new();
        let mut on_node: Vec<SourceRecord> = self
            .registry
            .sources()?
            .into_iter()
            .filter(|s| s.node.as_deref() == Some(node.as_str()))
            .collect();
        on_node.sort_by_key(|s| std::cmp::Reverse(s.allocated_bytes));
        for s in on_node {
            let figures = self.registry.node_figures()?;
            let d = crate::placement::choose(
                &figures,
                s.allocated_bytes,
                crate::placement::Weights::default(),
            );
            let m = match d.chosen {
                Some(i) => self.move_source(&s.name, &figures[i].name).await,
                None => pb::SourceMove {
                    source: s.name.clone(),
                    from: node.clone(),
                    bytes: s.allocated_bytes,
                    error: d.explain(),
                    ..Default::default()
                },
            };
            moves.push(m);
        }
        let after = crate::placement::spread(&self.registry.node_figures()?);
        let failed = moves.iter().filter(|m| !m.error.is_empty()).count();
        tracing::info!(node, moved = moves.len() - failed, failed, "drain finished");
        Ok(move_report(moves, before, after, 0, false))
    }

    /// `Rebalance`: plans the moves that bring the nodes' fill within the spread,
    /// and (unless `dry_run`) makes them.
    pub async fn rebalance(&self, admin: &Identity, dry_run: bool) -> Result<pb::MoveReport> {
        let figures = self.registry.node_figures()?;
        let placed: Vec<crate::placement::Placed> = self
            .registry
            .sources()?
            .into_iter()
            .filter_map(|s| {
                let node = figures
                    .iter()
                    .position(|n| Some(&n.name) == s.node.as_ref())?;
                Some(crate::placement::Placed {
                    name: s.name,
                    node,
                    allocated_bytes: s.allocated_bytes,
                })
            })
            .collect();
        let plan = crate::placement::plan_rebalance(&figures, &placed, self.rebalance_spread);
        tracing::info!(%admin, dry_run, moves = plan.moves.len(), bytes = plan.bytes(), "rebalance planned");
        let mut moves = Vec::new();
        for m in &plan.moves {
            let planned = pb::SourceMove {
                source: m.source.clone(),
                from: figures[m.from].name.clone(),
                to: figures[m.to].name.clone(),
                bytes: m.bytes,
                ..Default::default()
            };
            if dry_run {
                moves.push(planned);
            } else {
                moves.push(self.move_source(&m.source, &figures[m.to].name).await);
            }
        }
        let after = if dry_run {
            plan.spread_after
        } else {
            crate::placement::spread(&self.registry.node_figures()?)
        };
        Ok(move_report(
            moves,
            plan.spread_before,
            after,
            plan.lower_bound_bytes,
            dry_run,
        ))
    }
}

/// The report of a list of moves.
fn move_report(
    moves: Vec<pb::SourceMove>,
    before: f64,
    after: f64,
    lower: u64,
    dry_run: bool,
) -> pb::MoveReport {
    pb::MoveReport {
        moves,
        spread_before: before,
        spread_after: after,
        lower_bound_bytes: lower,
        dry_run,
    }
}
