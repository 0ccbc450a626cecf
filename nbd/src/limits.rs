//! How many connections an NBD listener holds, and how long a client may take to
//! choose an export.
//!
//! Both limits act when a connection is accepted and while it shakes hands, never per
//! request: the transmission phase is untouched (see the performance notes of
//! [`super::server`]).
//!
//! - [`ConnectionLimit`]: at most [`ServerOptions::max_connections`] connections
//!   of one listener are open at once, whatever phase they are in. One more is
//!   accepted and closed at once (the client sees the connection end before the
//!   greeting), with a warning that is logged at most every
//!   [`REFUSAL_LOG_EVERY`], so a flood of connections does not become a flood of log
//!   lines.
//! - [`within`]: the handshake (greeting, option haggling and, on a TLS listener,
//!   the TLS handshake and the haggling inside it) must be over within
//!   [`ServerOptions::handshake_timeout`] of the *client's* time. Time the server
//!   spends on its own work meanwhile ([`server_work`]: looking an export up,
//!   which on a storage node waits for a running sync to release the source) does
//!   not count, so a slow lookup never cuts off a client that did nothing wrong. One
//!   deadline for the whole handshake, not one per read: a client that trickles one
//!   option every few seconds would otherwise hold its connection for hours.
//!
//! Without these, a client that connects and sends nothing, or a few hundred of
//! them, would hold the listener's connections (and their tasks) forever.
//!
//! [`ServerOptions::max_connections`]: super::ServerOptions::max_connections
//! [`ServerOptions::handshake_timeout`]: super::ServerOptions::handshake_timeout

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::{NbdError, ServerOptions};
use bulwark_common::config::{ConfigError, HumanDuration};

/// Refusals past the connection limit are logged at most this often (the first at
/// once); the line counts the ones in between.
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// A daemon's `nbd_max_connections` and `nbd_handshake_timeout`, checked: the
/// two [`ServerOptions`] an operator sets. The node and the agent use the same key
/// names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// [`ServerOptions::max_connections`].
    pub max_connections: usize,
    /// [`ServerOptions::handshake_timeout`].
    pub handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        let d = ServerOptions::default();
        Limits {
            max_connections: d.max_connections,
            handshake_timeout: d.handshake_timeout,
        }
    }
}

impl Limits {
    /// The keys as written (unset: the default); `bad(key, message)` makes the
    /// error that names the file and key.
    pub fn check(
        max_connections: Option<usize>,
        handshake_timeout: Option<HumanDuration>,
        bad: impl Fn(&str, String) -> ConfigError,
    ) -> Result<Limits, ConfigError> {
        let mut limits = Limits::default();
        if let Some(n) = max_connections {
            if n == 0 {
                return Err(bad("nbd_max_connections", "must be at least 1".into()));
            }
            limits.max_connections = n;
        }
        if let Some(t) = handshake_timeout {
            if t.0 < Duration::from_secs(1) {
                return Err(bad(
                    "nbd_handshake_timeout",
                    "must be at least 1s (a client on a slow link needs a few round trips and \
                     a TLS handshake)"
                        .into(),
                ));
            }
            limits.handshake_timeout = t.0;
        }
        Ok(limits)
    }

    /// `opts` with these limits.
    pub fn apply(self, opts: ServerOptions) -> ServerOptions {
        ServerOptions {
            max_connections: self.max_connections,
            handshake_timeout: self.handshake_timeout,
            ..opts
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The open connections of one listener, at most `max`.
pub struct ConnectionLimit {
    open: Arc<AtomicUsize>,
    max: usize,
    /// When a refusal was last logged, and refusals since then not logged.
    log: Mutex<(Option<Instant>, u64)>,
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnectionLimit {
    /// A limit of `max` open connections (at least one).
    pub fn new(max: usize) -> ConnectionLimit {
        ConnectionLimit {
            open: Arc::new(AtomicUsize::new(0)),
            max: max.max(1),
            log: Mutex::new((None, 0)),
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// A place for one more connection from `peer`, or `None` (logged) when `max`
    /// are open: the caller closes the connection.
    pub fn admit(&self, peer: &str) -> Option<Slot> {
        let max = self.max;
        match self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            }) {
            Ok(_) => Some(Slot(Arc::clone(&self.open))),
            Err(open) => {
                self.refused(peer, open);
                None
            }
        }
    }

    fn refused(&self, peer: &str, open: usize) {
        let now = Instant::now();
        let mut log = lock(&self.log);
        log.1 += 1;
        if log
            .0
            .is_none_or(|last| now.duration_since(last) >= REFUSAL_LOG_EVERY)
        {
            tracing::warn!(
                peer,
                open,
                refused = log.1,
                "NBD connection refused: {open} connections are open, the most this listener \
                 allows (nbd_max_connections = {}); `refused` counts the refusals since the \
                 last such line",
                self.max
            );
            *log = (Some(now), 0);
        }
    }
}

tokio::task_local! {
    /// The handshake clock of the connection this task is shaking hands with.
    static CLOCK: Arc<Clock>;
}

/// A deadline that stands still while the server works (see [`server_work`]).
struct Clock {
    state: Mutex<ClockState>,
    /// Woken when the clock runs again after a pause.
    resumed: Notify,
}

struct ClockState {
    deadline: Instant,
    /// [`server_work`] calls running (they may nest).
    paused: u32,
    /// When the outermost of them began.
    paused_at: Instant,
}

impl Clock {
    fn new(limit: Duration) -> Clock {
        let now = Instant::now();
        Clock {
            state: Mutex::new(ClockState {
                deadline: now + limit,
                paused: 0,
                paused_at: now,
            }),
            resumed: Notify::new(),
        }
    }

    /// Returns once the deadline has passed with the clock running.
    async fn expired(&self) {
        loop {
            // Registered before the state is read, so a resume in between is not
            // missed.
            let resumed = self.resumed.notified();
            tokio::pin!(resumed);
            resumed.as_mut().enable();
            let deadline = {
                let s = lock(&self.state);
                (s.paused == 0).then_some(s.deadline)
            };
            match deadline {
                None => resumed.await,
                Some(deadline) => {
                    tokio::time::sleep_until(deadline).await;
                    // A pause may have begun, or moved the deadline, meanwhile.
                    let s = lock(&self.state);
                    if s.paused == 0 && Instant::now() >= s.deadline {
                        return;
                    }
                }
            }
        }
    }

    fn pause(self: &Arc<Clock>) -> Paused {
        let mut s = lock(&self.state);
        if s.paused == 0 {
            s.paused_at = Instant::now();
        }
        s.paused += 1;
        Paused(Arc::clone(self))
    }
}

/// The clock stands still until this is dropped.
struct Paused(Arc<Clock>);

impl Drop for Paused {
    fn drop(&mut self) {
        let mut s = lock(&self.0.state);
        s.paused = s.paused.saturating_sub(1);
        if s.paused == 0 {
            let stood = s.paused_at.elapsed();
            s.deadline += stood;
            drop(s);
            self.0.resumed.notify_waiters();
        }
    }
}

/// Runs `handshake` with at most `limit` of the client's time (see the module
/// docs); past it the handshake is dropped (and with it, as the caller returns, the
/// connection) and the error says how long the client had.
pub async fn within<T, F>(limit: Duration, handshake: F) -> Result<T, NbdError>
where
    F: Future<Output = Result<T, NbdError>>,
{
    let clock = Arc::new(Clock::new(limit));
    let work = CLOCK.scope(Arc::clone(&clock), handshake);
    tokio::select! {
        biased;
        out = work => out,
        () = clock.expired() => Err(NbdError::Negotiation(format!(
            "the client did not finish the handshake (greeting, options, TLS) within \
             {limit:?} (nbd_handshake_timeout); connection closed"
        ))),
    }
}

/// Runs `work`, the server's own part of a handshake, without counting its time
/// against the client's deadline. Outside [`within`] it just runs `work`.
pub async fn server_work<F: Future>(work: F) -> F::Output {
    let paused = CLOCK.try_with(|c| c.pause()).ok();
    let out = work.await;
    drop(paused);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_as_configured() {
        let path = std::path::Path::new("/etc/bulwark/node.toml");
        let bad = |k: &str, m: String| ConfigError::invalid(path, k, m);
        assert_eq!(Limits::check(None, None, bad).ok(), Some(Limits::default()));
        let l = Limits::check(Some(3), Some(HumanDuration(Duration::from_secs(2))), bad);
        assert_eq!(
            l.ok(),
            Some(Limits {
                max_connections: 3,
                handshake_timeout: Duration::from_secs(2)
            })
        );
        let e = Limits::check(Some(0), None, bad)
            .map(|_| ())
            .expect_err("0 connections");
        assert!(e.to_string().contains("`nbd_max_connections`"), "{e}");
        let short = HumanDuration(Duration::from_millis(500));
        let e = Limits::check(None, Some(short), bad)
            .map(|_| ())
            .expect_err("500ms");
        assert!(e.to_string().contains("`nbd_handshake_timeout`"), "{e}");
    }

    #[test]
    fn the_limit_admits_up_to_max_and_frees_places() {
        let limit = ConnectionLimit::new(2);
        let a = limit.admit("a");
        let b = limit.admit("b");
        assert!(a.is_some() && b.is_some());
        assert!(
            limit.admit("c").is_none(),
            "a third connection was admitted"
        );
        assert_eq!(limit.open(), 2);
        drop(a);
        assert_eq!(limit.open(), 1);
        let c = limit.admit("c");
        assert!(c.is_some(), "a freed place was not given out again");
        assert!(limit.admit("d").is_none());
        drop((b, c));
        assert_eq!(limit.open(), 0);
        // Zero would refuse everything; it is raised to one.
        let one = ConnectionLimit::new(0);
        let x = one.admit("x");
        assert!(x.is_some() && one.admit("y").is_none());
    }

    #[tokio::test]
    async fn a_handshake_that_takes_too_long_is_cut_off() {
        let limit = Duration::from_millis(100);
        let start = Instant::now();
        let r: Result<(), NbdError> = within(limit, std::future::pending()).await;
        let e = r.expect_err("a handshake that never ends was not cut off");
        assert!(start.elapsed() >= limit, "cut off before its time");
        assert!(e.to_string().contains("nbd_handshake_timeout"), "{e}");
        // One that finishes in time keeps its result.
        let r = within(limit, async { Ok::<_, NbdError>(7) }).await;
        assert_eq!(r.ok(), Some(7));
    }

    /// The server's own work (three times the limit here) does not count against
    /// the client; the client's own time after it still does.
    #[tokio::test]
    async fn server_work_does_not_count() {
        let limit = Duration::from_millis(100);
        let r = within(limit, async {
            server_work(tokio::time::sleep(limit * 3)).await;
            // Nested: still paused, once.
            server_work(server_work(tokio::time::sleep(limit))).await;
            Ok::<_, NbdError>("through")
        })
        .await;
        assert_eq!(r.ok(), Some("through"));
        let r: Result<(), NbdError> = within(limit, async {
            server_work(tokio::time::sleep(limit * 2)).await;
            std::future::pending().await
        })
        .await;
        assert!(
            r.is_err(),
            "the client's time after server work was not counted"
        );
        // Outside a handshake it just runs.
        assert_eq!(server_work(async { 3 }).await, 3);
    }
}
