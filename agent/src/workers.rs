//! The agent's background work, each loop a [`Worker`] of one
//! [`bulwark_common::worker::WorkerSet`] beside the control stream:
//! - `sync/<source>` — a source's own schedule (`sync_interval`), for sources not in
//!   a protection group (the coordinator schedules those), and log sources;
//! - `renewal` — renews the agent's certificate through the coordinator.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bulwark_common::worker::Worker;
use tokio_util::sync::CancellationToken;

use crate::config::SourceConfig;
use crate::server::Agent;

/// Syncs one source every `sync_interval`, start to start: a sync that overruns
/// the interval is followed at once by the next.
pub struct ScheduledSync {
    agent: Arc<Agent>,
    source: SourceConfig,
    /// When the last run started (the worker's creation before the first).
    started: Instant,
}

impl ScheduledSync {
    pub fn new(agent: Arc<Agent>, source: SourceConfig) -> ScheduledSync {
        ScheduledSync {
            agent,
            source,
            started: Instant::now(),
        }
    }
}

impl Worker for ScheduledSync {
    fn name(&self) -> String {
        format!("sync/{}", self.source.name)
    }

    fn period(&self) -> Duration {
        self.source
            .sync_interval
            .saturating_sub(self.started.elapsed())
    }

    async fn run(&mut self, _stop: &CancellationToken) -> Result<(), String> {
        self.started = Instant::now();
        self.agent
            .scheduled_sync(&self.source)
            .await
            .map_err(|e| format!("scheduled sync of {}: {e}", self.source.name))
    }
}
