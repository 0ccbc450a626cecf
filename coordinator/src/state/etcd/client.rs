//! The etcd connection: one gRPC channel per endpoint, failover between them, a
//! deadline on every request, and the runtime the async calls run on.
//!
//! [`StateStore`](super::super::StateStore) is synchronous. The async client runs on a
//! small current-thread tokio runtime of its own, on its own thread ([`Runner`]); a
//! caller hands it a future and blocks on a channel for the reply. That works the
//! same from a plain thread and from inside another tokio runtime's worker (where
//! `Runtime::block_on` would panic), and the runtime is dropped on its own thread,
//! never inside the caller's async context. A worker of the caller's runtime is
//! blocked for one etcd round trip, as it is for a sled flush.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tonic::Status;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::super::StateError;
use super::{EtcdOptions, EtcdTls};

/// The thread and runtime the etcd client runs on.
pub(crate) struct Runner {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Runner {
    /// Starts the thread `bulwark-etcd` with a current-thread runtime that runs
    /// until the runner is dropped.
    pub(crate) fn start() -> Result<Runner, StateError> {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (handle_tx, handle_rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("bulwark-etcd".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(rt.handle().clone()));
                // Runs every spawned task until the runner is dropped.
                let _ = rt.block_on(stop_rx);
            })
            .map_err(|e| unavailable(format!("cannot start the etcd client thread: {e}")))?;
        let handle = handle_rx
            .recv()
            .map_err(|_| unavailable("the etcd client thread ended at start".into()))?
            .map_err(|e| unavailable(format!("cannot build the etcd client runtime: {e}")))?;
        Ok(Runner {
            handle,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The runtime's handle, to spawn background tasks (the election) on it.
    pub(crate) fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    /// Runs `f` on the runtime and blocks the calling thread until it is done.
    pub(crate) fn block_on<T: Send + 'static>(
        &self,
        f: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, StateError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let _ = tx.send(f.await);
        });
        rx.recv()
            .map_err(|_| unavailable("the etcd client runtime has stopped".into()))
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take()
            && t.thread().id() != std::thread::current().id()
        {
            let _ = t.join();
        }
    }
}

pub(crate) fn unavailable(msg: String) -> StateError {
    StateError::Unavailable(msg)
}

/// Whether a failed request may be sent again to another endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// A read, or a write whose repetition is harmless: retried on any transport
    /// failure or timeout while the deadline allows.
    Idempotent,
    /// A conditional write: retried only when it certainly did not reach a member
    /// that could apply it (no connection, or the member has no raft leader). After
    /// a timeout its outcome is unknown and the error says so.
    NotSent,
}

struct Member {
    url: String,
    channel: Channel,
}

/// The endpoints of one etcd cluster.
pub(crate) struct Client {
    members: Vec<Member>,
    /// The endpoint that answered last; requests start there.
    current: AtomicUsize,
    timeout: Duration,
}

/// gRPC messages of a large range page can be large: values are JSON records.
const MAX_MESSAGE: usize = 256 * 1024 * 1024;

impl Client {
    /// Channels to every endpoint, connecting on first use. Call inside the
    /// runner's runtime (tonic spawns each channel's worker there).
    pub(crate) fn new(opts: &EtcdOptions) -> Result<Client, StateError> {
        let tls = match &opts.tls {
            Some(t) => Some(tls_config(t)?),
            None => None,
        };
        let n = opts.endpoints.len().max(1) as u32;
        let mut members = Vec::new();
        for url in &opts.endpoints {
            let mut ep = Endpoint::from_shared(url.clone())
                .map_err(|e| unavailable(format!("etcd endpoint {url}: {e}")))?
                .connect_timeout((opts.timeout / n).max(Duration::from_millis(500)))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true);
            if url.starts_with("https://") {
                let Some(tls) = &tls else {
                    return Err(unavailable(format!(
                        "etcd endpoint {url} is https:// but no TLS files (ca, cert, key) are set"
                    )));
                };
                ep = ep
                    .tls_config(tls.clone())
                    .map_err(|e| unavailable(format!("etcd endpoint {url}: TLS: {e}")))?;
            }
            members.push(Member {
                url: url.clone(),
                channel: ep.connect_lazy(),
            });
        }
        if members.is_empty() {
            return Err(unavailable("no etcd endpoints".into()));
        }
        Ok(Client {
            members,
            current: AtomicUsize::new(0),
            timeout: opts.timeout,
        })
    }

    /// The endpoints, comma-separated, for messages.
    pub(crate) fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.url.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The request timeout.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Each endpoint's URL and channel, for per-member calls (status).
    pub(crate) fn members(&self) -> impl Iterator<Item = (&str, Channel)> {
        self.members
            .iter()
            .map(|m| (m.url.as_str(), m.channel.clone()))
    }

    /// Calls `f` with a channel, starting at the endpoint that answered last and
    /// moving to the next when one fails, until `f` succeeds, fails for a reason no
    /// other endpoint would change, or the request timeout has passed. `what` names
    /// the request in the error.
    pub(crate) async fn call<T, F, Fut>(
        &self,
        what: &str,
        retry: Retry,
        f: F,
    ) -> Result<T, StateError>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let start = Instant::now();
        let deadline = start + self.timeout;
        let n = self.members.len();
        // One endpoint must not take the whole deadline while others may answer.
        let per_try = (self.timeout / n as u32).max(Duration::from_secs(1));
        let mut i = self.current.load(Ordering::Relaxed) % n;
        let mut errors: Vec<String> = Vec::new();
        let mut tried = 0usize;
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let m = &self.members[i];
            // A write that times out cannot be sent elsewhere: it gets all the time.
            let budget = match retry {
                Retry::Idempotent => per_try.min(deadline - now),
                Retry::NotSent => deadline - now,
            };
            match tokio::time::timeout(budget, f(m.channel.clone())).await {
                Ok(Ok(v)) => {
                    self.current.store(i, Ordering::Relaxed);
                    return Ok(v);
                }
                Ok(Err(s)) if !transient(&s) => {
                    return Err(unavailable(format!(
                        "etcd {what} at {}: {}",
                        m.url,
                        status_text(&s)
                    )));
                }
                Ok(Err(s)) => {
                    errors.push(format!("{}: {}", m.url, status_text(&s)));
                    if retry == Retry::NotSent && !not_sent(&s) {
                        return Err(self.unknown_outcome(what, &errors));
                    }
                }
                Err(_) => {
                    errors.push(format!("{}: no answer within {budget:?}", m.url));
                    if retry == Retry::NotSent {
                        return Err(self.unknown_outcome(what, &errors));
                    }
                }
            }
            tried += 1;
            i = (i + 1) % n;
            if tried.is_multiple_of(n) {
                // Every endpoint failed once: wait a little before the next round.
                let pause = Duration::from_millis(200)
                    .min(deadline.saturating_duration_since(Instant::now()));
                tokio::time::sleep(pause).await;
            }
        }
        errors.dedup();
        Err(unavailable(format!(
            "etcd {what}: {}: no member of {} answered within {:?} ({})",
            why(&errors),
            self.endpoints(),
            self.timeout,
            last_errors(&errors)
        )))
    }

    fn unknown_outcome(&self, what: &str, errors: &[String]) -> StateError {
        unavailable(format!(
            "etcd {what}: {}, and the request may or may not have been applied ({}; endpoints {})",
            why(errors),
            last_errors(errors),
            self.endpoints()
        ))
    }
}

/// What the failures of a request amount to.
fn why(errors: &[String]) -> &'static str {
    if errors
        .iter()
        .any(|e| e.contains("certificate") || e.contains("Certificate") || e.contains("alert"))
    {
        "TLS refused (check [state] ca, cert and key against the members' CA)"
    } else {
        "no quorum / unreachable"
    }
}

/// The last few distinct errors, for a message of reasonable length.
fn last_errors(errors: &[String]) -> String {
    let mut seen: Vec<&String> = Vec::new();
    for e in errors.iter().rev() {
        if !seen.contains(&e) {
            seen.push(e);
        }
        if seen.len() == 3 {
            break;
        }
    }
    seen.iter()
        .rev()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join("; ")
}

/// A status worth trying another endpoint for: the member is unreachable, has no
/// leader, or timed out.
fn transient(s: &Status) -> bool {
    use tonic::Code;
    matches!(
        s.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
    )
}

/// A failure that certainly happened before any member could apply the request: no
/// connection was made, or the member refused it for want of a raft leader.
fn not_sent(s: &Status) -> bool {
    let text = status_text(s).to_lowercase();
    [
        "tcp connect",
        "error trying to connect",
        "connection refused",
        "etcdserver: no leader",
    ]
    .iter()
    .any(|p| text.contains(p))
}

/// The status's message and the chain of its source errors.
pub(crate) fn status_text(s: &Status) -> String {
    let mut text = s.message().to_string();
    let mut src = std::error::Error::source(s);
    while let Some(e) = src {
        let t = e.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        src = e.source();
    }
    if text.is_empty() {
        format!("{:?}", s.code())
    } else {
        text
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, StateError> {
    std::fs::read(path).map_err(|e| unavailable(format!("etcd TLS {what} {}: {e}", path.display())))
}

fn tls_config(t: &EtcdTls) -> Result<ClientTlsConfig, StateError> {
    let ca = read(&t.ca, "ca")?;
    let cert = read(&t.cert, "cert")?;
    let key = read(&t.key, "key")?;
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key)))
}

/// Sets the message size limits of a generated client to what a range page needs.
pub(crate) fn kv(ch: Channel) -> bulwark_proto::etcd::kv_client::KvClient<Channel> {
    bulwark_proto::etcd::kv_client::KvClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}
