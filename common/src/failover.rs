//! Several coordinators: the list a client is given, the order it tries them in,
//! and the leader hint.
//!
//! Agents, nodes and the CLI take a list of coordinator addresses
//! ([`CoordinatorList`]: `coordinators = [...]` in a config, `coordinator = "..."` as a
//! list of one, a comma-separated `BULWARK_COORDINATOR`). [`CoordinatorChannel`] is
//! their one channel to "the coordinator": one HTTP/2 connection at a time, to one
//! address of the list. A new connection tries the addresses in order, starting from
//! the one the last connection went to (or the one a switch chose), and uses the
//! first that connects; only when every address failed does the connection fail, and
//! the caller's own retry and backoff apply. The connection leaves its address when
//! - it is lost (the coordinator went away): the next connection starts at the next
//!   address of the list;
//! - an answer is the not-leader status ([`not_leader`], in a response's headers or a
//!   stream's trailers): the connection is cut and the next one goes to the address
//!   the hint names if the list holds it, otherwise to the next address. A hint never
//!   makes a client dial an address its operator did not configure (a coordinator's
//!   key can be stolen too). A call so refused whose request had been sent whole
//!   (unary, server-streaming; at most 1 MiB) is re-sent once to the
//!   hinted leader: the follower took nothing.
//!
//! Other `Unavailable` answers (an agent that went away during a relayed command) are
//! answers, not signs of the wrong coordinator: they move nothing. With a list of one
//! nothing ever moves, and a connection is made exactly as [`crate::tls::channel_lazy`]
//! makes it.
//!
//! **The leader hint protocol.** A coordinator that is not the leader answers a write
//! or a stream with `Unavailable`, the message "not the leader; the leader is <url>",
//! and the ASCII metadata `bulwark-leader: <url>` ([`not_leader`]); when it knows no
//! leader, the metadata is empty ([`no_leader`]) and clients try their next address.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body as HttpBody, Frame, SizeHint};
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::Status;
use tonic::metadata::MetadataValue;

use crate::telemetry::TracedChannel;
use crate::tls::{ConnectError, Target, TargetError};

/// The metadata key of a not-leader answer (see [`not_leader`]).
pub use crate::tls::LEADER_METADATA;

/// How long one address of a list of several has to connect (TCP and TLS) before the
/// next is tried. A list of one keeps the channel's own timeout (the same 10 s).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Server side: the answer of a coordinator that is not the leader to a write or a
/// stream, naming the leader at `leader` (`https://host:port`). A `leader` that cannot
/// be ASCII metadata is sent as an empty hint (clients then try their next address).
pub fn not_leader(leader: &str) -> Status {
    let mut status = Status::unavailable(format!("not the leader; the leader is {leader}"));
    let printable = leader.bytes().all(|b| b.is_ascii_graphic());
    let value = MetadataValue::try_from(leader)
        .ok()
        .filter(|_| printable)
        .unwrap_or_else(|| MetadataValue::from_static(""));
    status.metadata_mut().insert(LEADER_METADATA, value);
    status
}

/// Server side: the answer of a coordinator that is not the leader and knows none
/// (`why`: an election in progress, no quorum).
pub fn no_leader(why: &str) -> Status {
    let mut status = Status::unavailable(format!("not the leader, and no leader is known: {why}"));
    status
        .metadata_mut()
        .insert(LEADER_METADATA, MetadataValue::from_static(""));
    status
}

/// What a status says about the leader: `None` when it is not a not-leader answer,
/// `Some(None)` when it is one that names no leader, `Some(Some(url))` otherwise.
pub fn leader_hint(status: &Status) -> Option<Option<String>> {
    if status.code() != tonic::Code::Unavailable {
        return None;
    }
    let v = status.metadata().get(LEADER_METADATA)?;
    Some(hint_text(v.as_encoded_bytes()))
}

fn hint_text(bytes: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(bytes).ok()?.trim();
    (!s.is_empty()).then(|| s.to_string())
}

/// The hint in a response's headers or trailers, when they carry the not-leader
/// status (`grpc-status` 14 and the leader metadata).
fn not_leader_in(headers: &http::HeaderMap) -> Option<Option<String>> {
    let unavailable = headers
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"14");
    if !unavailable {
        return None;
    }
    let v = headers.get(LEADER_METADATA)?;
    Some(hint_text(v.as_bytes()))
}

/// A list of coordinator addresses that is not what it must be: which entry, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListError {
    #[error("no coordinator address given: at least one https://host:port is needed")]
    Empty,
    #[error("entry {index} ({value:?}): {source}")]
    Entry {
        index: usize,
        value: String,
        #[source]
        source: TargetError,
    },
    #[error("entry {index} ({value:?}) is entry {first} again: give each coordinator once")]
    Duplicate {
        index: usize,
        first: usize,
        value: String,
    },
}

impl ListError {
    /// The entry's index, when the error is about one entry.
    pub fn index(&self) -> Option<usize> {
        match self {
            ListError::Empty => None,
            ListError::Entry { index, .. } | ListError::Duplicate { index, .. } => Some(*index),
        }
    }
}

/// The coordinators a client may dial, in the order it tries them: at least one, each
/// once, each a valid `https://host:port`.
#[derive(Debug, Clone)]
pub struct CoordinatorList(Vec<Target>);

/// Whether `a` and `b` are the same address (host names compare without case).
fn same(a: &Target, b: &Target) -> bool {
    a.port == b.port && a.host.eq_ignore_ascii_case(&b.host)
}

impl CoordinatorList {
    /// Parses each entry with [`Target::parse`]; errors name the entry (from 0).
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<CoordinatorList, ListError> {
        if entries.is_empty() {
            return Err(ListError::Empty);
        }
        let mut targets: Vec<Target> = Vec::with_capacity(entries.len());
        for (index, value) in entries.iter().enumerate() {
            let value = value.as_ref();
            let t = Target::parse(value.trim()).map_err(|source| ListError::Entry {
                index,
                value: value.to_string(),
                source,
            })?;
            if let Some(first) = targets.iter().position(|o| same(o, &t)) {
                return Err(ListError::Duplicate {
                    index,
                    first,
                    value: value.to_string(),
                });
            }
            targets.push(t);
        }
        Ok(CoordinatorList(targets))
    }

    /// A comma-separated list (`--coordinator`, `BULWARK_COORDINATOR`).
    pub fn parse_commas(s: &str) -> Result<CoordinatorList, ListError> {
        if s.trim().is_empty() {
            return Err(ListError::Empty);
        }
        let entries: Vec<&str> = s.split(',').map(str::trim).collect();
        CoordinatorList::parse(&entries)
    }

    /// A config's `coordinator = "..."` (a list of one) or `coordinators = [...]`:
    /// exactly one of them. The error is the key to name and what is wrong.
    pub fn from_keys(
        single: Option<&str>,
        list: Option<&[String]>,
    ) -> Result<CoordinatorList, (String, String)> {
        match (single, list) {
            (Some(_), Some(_)) => Err((
                "coordinators".into(),
                "both `coordinator` and `coordinators` are set: keep one (`coordinators` \
                 takes a list; `coordinator` is one address)"
                    .into(),
            )),
            (None, None) => Err((
                "coordinators".into(),
                "no coordinator address: set `coordinators = [\"https://host:port\", ...]` \
                 (or `coordinator = \"https://host:port\"`)"
                    .into(),
            )),
            (Some(one), None) => CoordinatorList::parse(&[one]).map_err(|e| match e {
                ListError::Entry { source, .. } => ("coordinator".into(), source.to_string()),
                e => ("coordinator".into(), e.to_string()),
            }),
            (None, Some(list)) => CoordinatorList::parse(list).map_err(|e| {
                let key = match e.index() {
                    Some(i) => format!("coordinators[{i}]"),
                    None => "coordinators".into(),
                };
                (key, e.to_string())
            }),
        }
    }

    /// The addresses, in order.
    pub fn targets(&self) -> &[Target] {
        &self.0
    }

    /// The first address (the only one of a list of one).
    pub fn first(&self) -> &Target {
        &self.0[0]
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Where `url` is in the list (`None`: not a configured address, or not one).
    pub fn position(&self, url: &str) -> Option<usize> {
        let t = Target::parse(url.trim()).ok()?;
        self.0.iter().position(|o| same(o, &t))
    }
}

impl From<Target> for CoordinatorList {
    fn from(t: Target) -> Self {
        CoordinatorList(vec![t])
    }
}

impl fmt::Display for CoordinatorList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, t) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{t}")?;
        }
        Ok(())
    }
}

/// Where the next connection goes, and the connection in use.
struct State {
    /// The address the next connection tries first.
    next: usize,
    /// Why it starts there (logged when a connection is made).
    why: String,
    /// The connection in use: its id and how to cut it.
    conn: Option<(u64, CancellationToken)>,
    /// The address of the last connection made.
    current: Option<usize>,
    ids: u64,
    /// Bumped when the connection is cut or lost: an answer that came before that
    /// moves nothing.
    epoch: u64,
    /// The addresses whose last attempt failed (said once per outage).
    down: Vec<bool>,
    /// Why the last connection attempt failed at every address.
    last_failure: Option<String>,
}

struct Shared {
    list: CoordinatorList,
    tls: Arc<ClientConfig>,
    state: Mutex<State>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn several(&self) -> bool {
        self.list.len() > 1
    }

    fn target(&self, i: usize) -> &Target {
        &self.list.0[i]
    }

    /// One connection: the addresses in order from `next`, the first that connects.
    async fn connect(self: Arc<Self>) -> io::Result<hyper_util::rt::TokioIo<Link>> {
        let n = self.list.len();
        let (start, why) = {
            let s = self.state();
            (s.next, s.why.clone())
        };
        let mut failures: Vec<String> = Vec::new();
        let mut last = None;
        for k in 0..n {
            let i = (start + k) % n;
            let target = self.target(i);
            let dialled = if n == 1 {
                crate::tls::dial(target, self.tls.clone()).await
            } else {
                tokio::time::timeout(CONNECT_TIMEOUT, crate::tls::dial(target, self.tls.clone()))
                    .await
                    .unwrap_or_else(|_| {
                        Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("no connection within {}s", CONNECT_TIMEOUT.as_secs()),
                        ))
                    })
            };
            match dialled {
                Ok(stream) => {
                    let why = if k == 0 {
                        why
                    } else {
                        format!("{} did not connect", self.target(start))
                    };
                    return Ok(hyper_util::rt::TokioIo::new(
                        self.connected(i, stream, &why),
                    ));
                }
                Err(e) => {
                    let explained = crate::tls::explain_connect_error(target, &e);
                    self.failed(i, &explained);
                    failures.push(explained);
                    last = Some(e);
                }
            }
        }
        let message = format!(
            "no coordinator could be reached ({}): {}",
            self.list,
            failures.join("; ")
        );
        self.state().last_failure = Some(message.clone());
        match last {
            Some(e) if n == 1 => Err(e),
            _ => Err(io::Error::new(io::ErrorKind::NotConnected, message)),
        }
    }

    fn failed(&self, i: usize, explained: &str) {
        let mut s = self.state();
        if !s.down[i] {
            s.down[i] = true;
            if self.several() {
                tracing::warn!(
                    coordinator = %self.target(i),
                    "{explained}; trying the next coordinator of the list"
                );
            }
        }
    }

    fn connected(self: &Arc<Self>, i: usize, io: TlsStream<TcpStream>, why: &str) -> Link {
        let mut s = self.state();
        s.ids += 1;
        let id = s.ids;
        let kill = CancellationToken::new();
        s.conn = Some((id, kill.clone()));
        let back = std::mem::replace(&mut s.down[i], false);
        if self.several() && (s.current != Some(i) || back) {
            tracing::info!(coordinator = %self.target(i), "using coordinator {} ({why})", self.target(i));
        }
        s.current = Some(i);
        s.next = i;
        s.why = "the last one that worked".into();
        s.last_failure = None;
        Link {
            io,
            id,
            shared: self.clone(),
            killed: Box::pin(kill.clone().cancelled_owned()),
            kill,
            ended: false,
        }
    }

    /// Connection `id` ended (the far side closed it, or it failed) without being
    /// cut here: with several addresses, the next connection starts at the next one.
    fn lost(&self, id: u64) {
        let mut s = self.state();
        if s.conn.as_ref().is_none_or(|(c, _)| *c != id) {
            return;
        }
        s.conn = None;
        s.epoch += 1;
        let Some(i) = s.current else { return };
        if self.several() {
            let next = (i + 1) % self.list.len();
            tracing::warn!(
                coordinator = %self.target(i),
                "the connection to coordinator {} was lost; the next connection tries {} first",
                self.target(i),
                self.target(next)
            );
            s.next = next;
            s.why = format!("the connection to {} was lost", self.target(i));
        }
    }

    fn epoch(&self) -> u64 {
        self.state().epoch
    }

    /// An answer (given at `epoch`) was the not-leader status with `hint`: cut the
    /// connection; the next goes to the hinted address if configured, else the next.
    /// Returns the hinted address when it is one of the list (and another one).
    fn not_leader(&self, epoch: u64, hint: Option<String>) -> Option<usize> {
        if !self.several() {
            return None;
        }
        let mut s = self.state();
        let i = s.current?;
        if s.epoch != epoch {
            return None;
        }
        let here = self.target(i).clone();
        let onward = (i + 1) % self.list.len();
        let (next, why, followed) = match hint {
            Some(url) => match self.list.position(&url) {
                Some(j) if j != i => (j, format!("{here} is not the leader and named it"), true),
                Some(_) => (
                    onward,
                    format!("{here} said it is not the leader, naming itself"),
                    false,
                ),
                None => {
                    tracing::warn!(
                        coordinator = %here,
                        "coordinator {here} named {url:?} as the leader, which is not in this \
                         client's list of coordinators ({}): not dialled",
                        self.list
                    );
                    (
                        onward,
                        format!("{here} is not the leader and named an unlisted address"),
                        false,
                    )
                }
            },
            None => (
                onward,
                format!("{here} is not the leader and knows none"),
                false,
            ),
        };
        tracing::info!(coordinator = %here, "{why}; switching to {}", self.target(next));
        s.next = next;
        s.why = why;
        s.epoch += 1;
        if let Some((_, kill)) = s.conn.take() {
            kill.cancel();
        }
        followed.then_some(next)
    }
}

/// One TLS connection to one coordinator, which can be cut from this side (a
/// not-leader answer) and says when it ends from the other.
struct Link {
    io: TlsStream<TcpStream>,
    id: u64,
    shared: Arc<Shared>,
    kill: CancellationToken,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
    ended: bool,
}

impl Link {
    /// Whether the connection was cut (registers to be woken when it is).
    fn cut(&mut self, cx: &mut Context<'_>) -> bool {
        self.kill.is_cancelled() || self.killed.as_mut().poll(cx).is_ready()
    }

    fn end(&mut self) {
        if !self.ended {
            self.ended = true;
            self.shared.lost(self.id);
        }
    }
}

/// A connection hyper closed (after the coordinator's GOAWAY, say) ends too.
impl Drop for Link {
    fn drop(&mut self) {
        self.end();
    }
}

fn cut_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "connection left for another coordinator (not-leader answer)",
    )
}

impl AsyncRead for Link {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.cut(cx) {
            return Poll::Ready(Err(cut_error()));
        }
        let (room, before) = (buf.remaining() > 0, buf.filled().len());
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(res) = &r
            && (res.is_err() || (room && buf.filled().len() == before))
        {
            this.end();
        }
        r
    }
}

impl AsyncWrite for Link {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.cut(cx) {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.cut(cx) {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The channel to "the coordinator" of a [`CoordinatorList`] (see the module): use it
/// as `CoordinatorClient<CoordinatorChannel>`. Clones share the connection and the
/// place in the list.
#[derive(Clone)]
pub struct CoordinatorChannel {
    inner: TracedChannel,
    shared: Arc<Shared>,
}

impl fmt::Debug for CoordinatorChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CoordinatorChannel({})", self.shared.list)
    }
}

impl CoordinatorChannel {
    fn parts(
        list: &CoordinatorList,
        tls: Arc<ClientConfig>,
    ) -> Result<(tonic::transport::Endpoint, Arc<Shared>), ConnectError> {
        let n = list.len();
        let mut endpoint = crate::tls::endpoint(list.first())?;
        if n > 1 {
            // Every address its own timeout, and a little for the handshakes.
            let per = u32::try_from(n).unwrap_or(u32::MAX);
            endpoint = endpoint.connect_timeout(CONNECT_TIMEOUT * per + Duration::from_secs(1));
        }
        let shared = Arc::new(Shared {
            list: list.clone(),
            tls,
            state: Mutex::new(State {
                next: 0,
                why: "the first of the list".into(),
                conn: None,
                current: None,
                ids: 0,
                epoch: 0,
                down: vec![false; n],
                last_failure: None,
            }),
        });
        Ok((endpoint, shared))
    }

    fn connector(
        shared: Arc<Shared>,
    ) -> impl tower::Service<
        http::Uri,
        Response = hyper_util::rt::TokioIo<Link>,
        Error = io::Error,
        Future = impl Send,
    > + Clone
    + Send
    + 'static {
        tower::service_fn(move |_: http::Uri| shared.clone().connect())
    }

    /// A channel that connects on first use and again after a failure (daemons keep
    /// one for their lifetime).
    pub fn lazy(
        list: &CoordinatorList,
        tls: Arc<ClientConfig>,
    ) -> Result<CoordinatorChannel, ConnectError> {
        let (endpoint, shared) = Self::parts(list, tls)?;
        let inner = endpoint
            .connect_with_connector_lazy(Self::connector(shared.clone()))
            .into();
        Ok(CoordinatorChannel { inner, shared })
    }

    /// Connects now (the CLI); the error says what failed at each address.
    pub async fn connect(
        list: &CoordinatorList,
        tls: Arc<ClientConfig>,
    ) -> Result<CoordinatorChannel, ConnectError> {
        let (endpoint, shared) = Self::parts(list, tls)?;
        match endpoint
            .connect_with_connector(Self::connector(shared.clone()))
            .await
        {
            Ok(c) => Ok(CoordinatorChannel {
                inner: c.into(),
                shared,
            }),
            Err(source) => {
                let explained = match shared.state().last_failure.clone() {
                    Some(m) if shared.several() => m,
                    _ => crate::tls::explain_connect_error(list.first(), &source),
                };
                Err(ConnectError::Connect { explained, source })
            }
        }
    }

    /// The configured list.
    pub fn list(&self) -> &CoordinatorList {
        &self.shared.list
    }

    /// The address of the connection in use (or last made; the first of the list
    /// before any).
    pub fn address(&self) -> Target {
        let i = self.shared.state().current.unwrap_or(0);
        self.shared.target(i).clone()
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for CoordinatorChannel {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        if !self.shared.several() {
            return Box::pin(tower::Service::call(&mut self.inner, req));
        }
        let epoch = self.shared.epoch();
        let (req, resend) = Resend::keep(req);
        let fut = tower::Service::call(&mut self.inner, req);
        let shared = self.shared.clone();
        Box::pin(async move {
            let resp = fut.await?;
            let hint = not_leader_in(resp.headers());
            let leader = hint.and_then(|h| shared.not_leader(epoch, h));
            let again = resend.finish();
            if leader.is_some() && again.is_none() {
                tracing::info!(
                    "a not-leader answer came before the whole call was sent: not re-sent"
                );
            }
            if let (Some(j), Some(req)) = (leader, again) {
                // The follower took nothing: the whole request goes to the leader it
                // named, on a connection of its own (the shared one reconnects there).
                let target = shared.target(j).clone();
                tracing::info!(coordinator = %target, "call re-sent to the leader");
                if let Ok(ch) = crate::tls::channel_lazy(&target, shared.tls.clone()) {
                    return tower::ServiceExt::oneshot(ch, req).await;
                }
            }
            Ok(resp.map(|body| {
                tonic::body::Body::new(Trailers {
                    body,
                    shared,
                    epoch,
                })
            }))
        })
    }
}

/// Most request bytes kept to re-send a call to the leader (calls to the coordinator
/// are small; a longer stream is not re-sent).
const RESEND_LIMIT: usize = 1 << 20;

/// A copy of a request's head and body frames, kept until its answer comes, so that
/// a call a follower refused can go to the leader whole.
struct Resend {
    head: http::request::Parts,
    copy: Arc<Mutex<Copy>>,
}

#[derive(Default)]
struct Copy {
    frames: Vec<bytes::Bytes>,
    bytes: usize,
    /// The body ended (everything the caller sent is in `frames`).
    ended: bool,
    /// Not to be re-sent (too long, trailers, an error) or answered already.
    spoilt: bool,
}

impl Resend {
    fn keep(req: http::Request<tonic::body::Body>) -> (http::Request<tonic::body::Body>, Resend) {
        let (parts, body) = req.into_parts();
        let mut head = http::Request::new(()).into_parts().0;
        head.method = parts.method.clone();
        head.uri = parts.uri.clone();
        head.version = parts.version;
        head.headers = parts.headers.clone();
        head.extensions = parts.extensions.clone();
        let copy = Arc::new(Mutex::new(Copy::default()));
        let tee = Tee {
            body,
            copy: copy.clone(),
        };
        let req = http::Request::from_parts(parts, tonic::body::Body::new(tee));
        (req, Resend { head, copy })
    }

    /// The request again, if its whole body was sent before the answer came; either
    /// way the copying stops.
    fn finish(self) -> Option<http::Request<tonic::body::Body>> {
        let mut c = self.copy.lock().unwrap_or_else(|e| e.into_inner());
        let whole = c.ended && !c.spoilt;
        c.spoilt = true;
        let frames = std::mem::take(&mut c.frames);
        whole.then(|| {
            http::Request::from_parts(self.head, tonic::body::Body::new(Replay { frames }))
        })
    }
}

/// A request body that copies its frames into a [`Copy`] until the answer comes.
struct Tee {
    body: tonic::body::Body,
    copy: Arc<Mutex<Copy>>,
}

impl HttpBody for Tee {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(x) = &r {
            let mut c = this.copy.lock().unwrap_or_else(|e| e.into_inner());
            if !c.spoilt {
                match x {
                    None => c.ended = true,
                    Some(Ok(f)) => match f.data_ref() {
                        Some(d) if c.bytes + d.len() <= RESEND_LIMIT => {
                            c.bytes += d.len();
                            c.frames.push(d.clone());
                        }
                        _ => c.spoilt = true,
                    },
                    Some(Err(_)) => c.spoilt = true,
                }
                // The HTTP/2 client ends the stream with the last data frame when
                // the body says it is over, without polling it for its end.
                if !c.spoilt && this.body.is_end_stream() {
                    c.ended = true;
                }
                if c.spoilt {
                    c.frames.clear();
                }
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        let end = self.body.is_end_stream();
        if end {
            let mut c = self.copy.lock().unwrap_or_else(|e| e.into_inner());
            if !c.spoilt {
                c.ended = true;
            }
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The copied frames, sent again.
struct Replay {
    frames: Vec<bytes::Bytes>,
}

impl HttpBody for Replay {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if this.frames.is_empty() {
            return Poll::Ready(None);
        }
        Poll::Ready(Some(Ok(Frame::data(this.frames.remove(0)))))
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
    }
}

/// A response body whose trailers are read for the not-leader status (a stream a
/// deposed leader ends).
struct Trailers {
    body: tonic::body::Body,
    shared: Arc<Shared>,
    epoch: u64,
}

impl HttpBody for Trailers {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &r
            && let Some(hint) = frame.trailers_ref().and_then(not_leader_in)
        {
            this.shared.not_leader(this.epoch, hint);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests;
