//! A daemon's background work as named workers, in one set per daemon.
//!
//! Every loop that runs beside a daemon's RPC service (heartbeats, the schedule,
//! scrubs, move retries, certificate renewal, ...) is a [`Worker`]: a name, a
//! period, and one run. A [`WorkerSet`] starts each worker on its own task, keeps
//! its [`WorkerStatus`] (state, runs, last run and its duration, last success,
//! last error) where `bulwark workers` reads it through a [`WorkerBoard`], and
//! stops the workers in the reverse of the order they started, each finishing the
//! run it is in: a worker started after another (and perhaps using what it keeps
//! up to date) stops before it.
//!
//! A run that fails, or panics, is recorded as the worker's last error, logged,
//! and the worker runs again after its period: one bad run never ends a loop
//! silently.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bulwark_proto as pb;
use futures::FutureExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// One background loop of a daemon.
pub trait Worker: Send + 'static {
    /// The name `bulwark workers` shows, e.g. `heartbeat` or `scrub`.
    fn name(&self) -> String;

    /// How long to wait before the next run (asked again after every run).
    fn period(&self) -> Duration;

    /// Whether the first run starts at once rather than after one period.
    fn runs_at_start(&self) -> bool {
        false
    }

    /// One run. `stop` is cancelled when the set stops: a run that waits for long
    /// (a stream, a retry) watches it and returns early.
    fn run(&mut self, stop: &CancellationToken) -> impl Future<Output = Result<(), String>> + Send;
}

/// What a worker is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Waiting for its next run.
    Idle,
    /// In a run.
    Running,
    /// Asked to stop, finishing its run.
    Stopping,
    /// Stopped; it will not run again.
    Stopped,
}

impl WorkerState {
    /// The word `bulwark workers` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Idle => "idle",
            WorkerState::Running => "running",
            WorkerState::Stopping => "stopping",
            WorkerState::Stopped => "stopped",
        }
    }
}

/// A worker's state and history, as last recorded.
#[derive(Debug, Clone)]
pub struct WorkerStatus {
    pub name: String,
    pub state: WorkerState,
    /// The current period.
    pub period: Duration,
    /// Runs finished (successful or not).
    pub runs: u64,
    /// Runs that failed or panicked.
    pub failures: u64,
    /// When the last run started.
    pub last_run: Option<SystemTime>,
    /// How long the last finished run took.
    pub last_duration: Option<Duration>,
    /// When a run last succeeded.
    pub last_ok: Option<SystemTime>,
    /// The last failure and when it ended.
    pub last_error: Option<(SystemTime, String)>,
}

impl WorkerStatus {
    fn new(name: String, period: Duration) -> WorkerStatus {
        WorkerStatus {
            name,
            state: WorkerState::Idle,
            period,
            runs: 0,
            failures: 0,
            last_run: None,
            last_duration: None,
            last_ok: None,
            last_error: None,
        }
    }
}

type Shared = Arc<Mutex<WorkerStatus>>;

fn update(status: &Shared, f: impl FnOnce(&mut WorkerStatus)) {
    // A poisoned status only means a panic while recording: the figures are
    // still worth showing.
    let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
    f(&mut s);
}

/// A read-only view of a set's workers, for the daemon's `ListWorkers` RPC.
#[derive(Debug, Clone, Default)]
pub struct WorkerBoard(Arc<Mutex<Vec<Shared>>>);

impl WorkerBoard {
    /// Every worker's status, in the order they started.
    pub fn statuses(&self) -> Vec<WorkerStatus> {
        let list = self.0.lock().unwrap_or_else(|p| p.into_inner());
        list.iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect()
    }
}

struct Running {
    name: String,
    stop: CancellationToken,
    handle: JoinHandle<()>,
    status: Shared,
}

/// The workers of one daemon.
#[derive(Default)]
pub struct WorkerSet {
    board: WorkerBoard,
    running: Vec<Running>,
}

impl std::fmt::Debug for WorkerSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.running.iter().map(|r| r.name.as_str()).collect();
        f.debug_struct("WorkerSet")
            .field("workers", &names)
            .finish()
    }
}

impl WorkerSet {
    pub fn new() -> WorkerSet {
        WorkerSet::default()
    }

    /// The view `ListWorkers` reads; it sees workers started later too.
    pub fn board(&self) -> WorkerBoard {
        self.board.clone()
    }

    /// Starts `worker` on a task of its own.
    pub fn spawn<W: Worker>(&mut self, mut worker: W) {
        let name = worker.name();
        let status: Shared = Arc::new(Mutex::new(WorkerStatus::new(name.clone(), worker.period())));
        self.board
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(status.clone());
        let stop = CancellationToken::new();
        let (s, st) = (status.clone(), stop.clone());
        let handle = tokio::spawn(async move {
            let mut first = worker.runs_at_start();
            loop {
                let wait = if first {
                    Duration::ZERO
                } else {
                    worker.period()
                };
                first = false;
                update(&s, |s| s.period = worker.period());
                tokio::select! {
                    biased;
                    _ = st.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
                run_once(&mut worker, &s, &st).await;
                if st.is_cancelled() {
                    break;
                }
            }
            update(&s, |s| s.state = WorkerState::Stopped);
        });
        self.running.push(Running {
            name,
            stop,
            handle,
            status,
        });
    }

    /// Stops every worker, the last started first: each finishes its run (it sees
    /// its stop token cancelled) within `grace`, or is aborted and said to be.
    pub async fn stop(self, grace: Duration) {
        for r in self.running.into_iter().rev() {
            update(&r.status, |s| {
                if s.state != WorkerState::Stopped {
                    s.state = WorkerState::Stopping;
                }
            });
            r.stop.cancel();
            let abort = r.handle.abort_handle();
            match tokio::time::timeout(grace, r.handle).await {
                Ok(Ok(())) => tracing::debug!(worker = %r.name, "worker stopped"),
                Ok(Err(e)) => tracing::warn!(worker = %r.name, "worker task ended badly: {e}"),
                Err(_) => {
                    abort.abort();
                    tracing::warn!(
                        worker = %r.name,
                        "worker did not stop within {grace:?}; aborted"
                    );
                }
            }
            update(&r.status, |s| s.state = WorkerState::Stopped);
        }
    }
}

/// One run of `worker`, recorded in `status`; a panic is a failed run.
async fn run_once<W: Worker>(worker: &mut W, status: &Shared, stop: &CancellationToken) {
    let started = Instant::now();
    update(status, |s| {
        s.state = WorkerState::Running;
        s.last_run = Some(SystemTime::now());
    });
    let outcome = AssertUnwindSafe(worker.run(stop)).catch_unwind().await;
    let error = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(panic) => Some(format!("panicked: {}", panic_text(&panic))),
    };
    let name = worker.name();
    if let Some(e) = &error {
        tracing::warn!(worker = %name, "worker run failed: {e}");
    }
    update(status, |s| {
        s.runs += 1;
        s.last_duration = Some(started.elapsed());
        s.state = if stop.is_cancelled() {
            WorkerState::Stopping
        } else {
            WorkerState::Idle
        };
        match error {
            None => s.last_ok = Some(SystemTime::now()),
            Some(e) => {
                s.failures += 1;
                s.last_error = Some((SystemTime::now(), e));
            }
        }
    });
}

fn unix_ms(t: Option<SystemTime>) -> i64 {
    t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl From<WorkerStatus> for pb::WorkerInfo {
    fn from(s: WorkerStatus) -> pb::WorkerInfo {
        let (error_at, error) = match s.last_error {
            Some((at, e)) => (Some(at), e),
            None => (None, String::new()),
        };
        pb::WorkerInfo {
            name: s.name,
            state: s.state.as_str().to_string(),
            period_ms: millis(s.period),
            runs: s.runs,
            failures: s.failures,
            last_run_ms: unix_ms(s.last_run),
            last_duration_ms: s.last_duration.map_or(0, millis),
            last_ok_ms: unix_ms(s.last_ok),
            last_error_ms: unix_ms(error_at),
            last_error: error,
        }
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

/// A worker from a name, a period and a closure making each run's future: for
/// loops whose state lives in what the closure captures.
pub struct FnWorker<F> {
    name: String,
    period: Duration,
    at_start: bool,
    run: F,
}

impl<F, Fut> FnWorker<F>
where
    F: FnMut(CancellationToken) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    /// A worker called `name` running `run` every `period`.
    pub fn new(name: impl Into<String>, period: Duration, run: F) -> FnWorker<F> {
        FnWorker {
            name: name.into(),
            period,
            at_start: false,
            run,
        }
    }

    /// Runs once at start, before the first period has passed.
    pub fn at_start(mut self) -> FnWorker<F> {
        self.at_start = true;
        self
    }
}

impl<F, Fut> Worker for FnWorker<F>
where
    F: FnMut(CancellationToken) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    fn name(&self) -> String {
        self.name.clone()
    }

    fn period(&self) -> Duration {
        self.period
    }

    fn runs_at_start(&self) -> bool {
        self.at_start
    }

    fn run(&mut self, stop: &CancellationToken) -> impl Future<Output = Result<(), String>> + Send {
        (self.run)(stop.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test]
    async fn runs_are_counted_failures_and_panics_recorded_and_the_loop_goes_on() {
        let mut set = WorkerSet::new();
        let n = Arc::new(AtomicUsize::new(0));
        let seen = n.clone();
        set.spawn(
            FnWorker::new("flaky", ms(5), move |_| {
                let i = seen.fetch_add(1, Ordering::SeqCst);
                async move {
                    match i % 3 {
                        0 => Ok(()),
                        1 => Err(format!("run {i} failed")),
                        _ => panic!("run {i} panicked"),
                    }
                }
            })
            .at_start(),
        );
        let board = set.board();
        tokio::time::timeout(Duration::from_secs(10), async {
            while n.load(Ordering::SeqCst) < 7 {
                tokio::time::sleep(ms(5)).await;
            }
        })
        .await
        .expect("the worker keeps running after a failure and a panic");
        set.stop(Duration::from_secs(5)).await;
        let s = &board.statuses()[0];
        assert_eq!(s.name, "flaky");
        assert_eq!(s.state, WorkerState::Stopped);
        assert!(s.runs >= 6, "{s:?}");
        assert!(s.failures >= 4 && s.failures < s.runs, "{s:?}");
        assert!(s.last_ok.is_some() && s.last_run.is_some(), "{s:?}");
        let (_, e) = s.last_error.clone().expect("a failure was recorded");
        assert!(e.contains("failed") || e.contains("panicked: run"), "{e}");
    }

    #[tokio::test]
    async fn stop_is_ordered_last_started_first_and_lets_a_run_finish() {
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut set = WorkerSet::new();
        for name in ["first", "second", "third"] {
            let order = order.clone();
            set.spawn(
                FnWorker::new(name, Duration::from_secs(3600), move |stop| {
                    let order = order.clone();
                    async move {
                        // A long run: it ends when asked to stop, then records it.
                        stop.cancelled().await;
                        tokio::time::sleep(ms(20)).await;
                        order.lock().expect("order").push(name);
                        Ok(())
                    }
                })
                .at_start(),
            );
        }
        let board = set.board();
        tokio::time::sleep(ms(50)).await;
        assert!(
            board
                .statuses()
                .iter()
                .all(|s| s.state == WorkerState::Running),
            "{:?}",
            board.statuses()
        );
        set.stop(Duration::from_secs(5)).await;
        assert_eq!(*order.lock().expect("order"), ["third", "second", "first"]);
        for s in board.statuses() {
            assert_eq!(s.state, WorkerState::Stopped, "{s:?}");
            assert_eq!(s.runs, 1, "the run in progress finished: {s:?}");
        }
    }

    #[tokio::test]
    async fn a_worker_that_ignores_stop_is_aborted_after_the_grace() {
        let mut set = WorkerSet::new();
        set.spawn(
            FnWorker::new("stubborn", ms(1), |_| async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(())
            })
            .at_start(),
        );
        let board = set.board();
        tokio::time::sleep(ms(20)).await;
        let started = Instant::now();
        set.stop(ms(100)).await;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(board.statuses()[0].state, WorkerState::Stopped);
        assert_eq!(board.statuses()[0].runs, 0);
    }
}
