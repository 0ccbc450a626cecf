//! The agent's background work, each loop a [`Worker`] of one
//! [`bulwark_common::worker::WorkerSet`] beside the control stream:
//! - `sync/<source>` — a source's own schedule (`sync_interval`), for sources not in
//!   a protection group (the coordinator schedules those), and log sources;
//! - `renewal` — renews the agent's certificate through the coordinator
//!   ([`bulwark_common::renewal::Renewal`]).

use std::future::Future;
use std::time::{Duration, Instant};

use bulwark_common::worker::Worker;
use tokio_util::sync::CancellationToken;

/// Runs a source's sync (`sync`) every `interval`, start to start: a sync that
/// overruns the interval is followed at once by the next.
pub struct ScheduledSync<F> {
    source: String,
    interval: Duration,
    sync: F,
    /// When the last run started (the worker's creation before the first).
    started: Instant,
}

impl<F, Fut> ScheduledSync<F>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    pub fn new(source: &str, interval: Duration, sync: F) -> ScheduledSync<F> {
        ScheduledSync {
            source: source.to_string(),
            interval,
            sync,
            started: Instant::now(),
        }
    }
}

impl<F, Fut> Worker for ScheduledSync<F>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    fn name(&self) -> String {
        format!("sync/{}", self.source)
    }

    fn period(&self) -> Duration {
        self.interval.saturating_sub(self.started.elapsed())
    }

    async fn run(&mut self, _stop: &CancellationToken) -> Result<(), String> {
        self.started = Instant::now();
        (self.sync)().await
    }
}
