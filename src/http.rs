//! HTTP plumbing shared by the store server and the proxy: binding, the accept loop, the response
//! body type and `Range` parsing.
//!
//! Invariants: at most [`ConnLimits::max`] connections are open per server and
//! [`ConnLimits::per_addr`] per client address; a newcomer past a cap takes the place of the
//! oldest idle connection, so idle connections never lock out honest clients; accept errors back
//! off instead of ending the loop; shutdown stops accepting at once and gives open connections
//! [`DRAIN_TIMEOUT`] to finish. Streamed bodies are fed through [`Pace`], which cuts off a client
//! that stalls or reads too slowly.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Open connections per server by default (the store server derives its own cap from the
/// open-file limit). Memory: at most [`MAX_READ_BUF`] of buffered request plus a few KiB of
/// task state per connection, so about 20 MiB for 1024 idle connections.
pub const MAX_CONNECTIONS: usize = 1024;
/// A client must send its request headers within this time (slowloris guard); also the longest a
/// kept-alive connection may sit idle between requests.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// On shutdown, in-flight responses get this long to finish.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Pending connections the kernel queues per listener.
const BACKLOG: i32 = 1024;

/// A request handler. `peer` is the client's address.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: http::Request<Incoming>, peer: SocketAddr) -> impl Future<Output = Response<Body>> + Send;
}

/// Binds a TCP listener. `[::]:PORT` is dual-stack (IPv4 and IPv6) where the host has IPv6,
/// and falls back to `0.0.0.0:PORT` where it has not.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let sock = match Socket::new(Domain::for_address(addr), Type::STREAM, None) {
        Err(e) if addr.is_ipv6() && addr.ip().is_unspecified() && e.raw_os_error() == Some(libc_eafnosupport()) => {
            return bind(SocketAddr::from(([0, 0, 0, 0], addr.port())));
        }
        r => r?,
    };
    if addr.is_ipv6() {
        sock.set_only_v6(false)?;
    }
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(BACKLOG)?;
    TcpListener::from_std(sock.into())
}

fn libc_eafnosupport() -> i32 {
    97 // EAFNOSUPPORT on Linux
}

/// Serves `handler` on `listener` until `shutdown` is cancelled, then drains: open connections
/// get [`DRAIN_TIMEOUT`] to finish their responses, and whatever is left is aborted. Connection
/// tasks are owned here (a `JoinSet`), so none outlives the server. Admission with the default
/// limits ([`ConnLimits::default`]), a fresh table per listener.
pub async fn serve<H: Handler>(listener: TcpListener, handler: Arc<H>, shutdown: CancellationToken) {
    serve_with(
        listener,
        handler,
        Arc::new(Admission::new(ConnLimits::default())),
        shutdown,
    )
    .await
}

/// Like [`serve`], with an admission table that may be shared by several listeners of one server.
///
/// A connection is accepted, then admitted: past its address's share or the total cap, the
/// oldest *idle* connection (no request in flight) of that address, or else of anyone, is closed
/// to make room; if every connection is busy, the newcomer is closed instead. So idle
/// connections can never lock out a new honest client, and a connection that waits for its
/// request headers is closed after [`ConnLimits::header_timeout`] anyway.
pub async fn serve_with<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    admission: Arc<Admission>,
    shutdown: CancellationToken,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let local = listener.local_addr().ok();
    let mut conns = tokio::task::JoinSet::new();
    loop {
        // Reap finished connections so the set stays as small as the open ones.
        while conns.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, ?local, "accept failed; backing off");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let Some(slot) = admission.admit(peer.ip()) else {
            tracing::debug!(%peer, "every connection busy; refusing a new one");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let h = handler.clone();
        let state = slot.state.clone();
        let svc = service_fn(move |req| {
            let h = h.clone();
            let busy = BusyGuard::new(state.clone());
            async move {
                let resp = h.handle(req, peer).await;
                Ok::<_, Infallible>(resp.map(|body| TrackedBody { body, _busy: busy }))
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(admission.limits.header_timeout)
            .max_buf_size(MAX_READ_BUF)
            .serve_connection(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn);
        conns.spawn(async move {
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                },
                _ = slot.state.shed.cancelled() => tracing::debug!(%peer, "idle connection shed for a newcomer"),
            }
            drop(slot);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(DRAIN_TIMEOUT) => tracing::warn!(?local, "connections still open after the drain timeout"),
    }
    conns.shutdown().await;
}

/// Largest read buffer of one connection (request line and headers must fit): bounds the memory
/// a client can pin by sending huge headers slowly. hyper's minimum is 8 KiB.
const MAX_READ_BUF: usize = 16 * 1024;

/// Connection admission settings of one server.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    /// Open connections in all.
    pub max: usize,
    /// Open connections per client address (IPv6: per /64, which one host may fill alone).
    pub per_addr: usize,
    /// Request headers must arrive within this time, also between requests on a kept-alive
    /// connection, so an idle connection lives at most this long.
    pub header_timeout: Duration,
}

/// Default: [`MAX_CONNECTIONS`] in all, no share per address (the proxy's clients are all local).
impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            max: MAX_CONNECTIONS,
            per_addr: MAX_CONNECTIONS,
            header_timeout: HEADER_READ_TIMEOUT,
        }
    }
}

/// The key a client is counted under: its IPv4 address, or the /64 of its IPv6 address (IPv4
/// mapped into IPv6 by a dual-stack socket counts as IPv4).
pub fn addr_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// The open connections of one server: who holds them and which are idle.
/// Memory: one entry per open connection and one per client key, both at most `limits.max`.
pub struct Admission {
    limits: ConnLimits,
    table: Mutex<ConnTable>,
    /// Zero point of `ConnState::last_active`.
    epoch: std::time::Instant,
}

#[derive(Default)]
struct ConnTable {
    /// Most connections open at once since [`Admission::take_peak`] last looked.
    peak: usize,
    next_id: u64,
    conns: HashMap<u64, Arc<ConnState>>,
    per_key: HashMap<IpAddr, usize>,
}

/// What the admission table knows of one connection.
struct ConnState {
    id: u64,
    key: IpAddr,
    /// Requests whose response (body included) is still being produced or sent.
    busy: AtomicUsize,
    /// When it last accepted or finished a request (ms since `Admission::epoch`): the oldest idle
    /// connection is shed first.
    last_active: AtomicU64,
    /// Cancelled to close the connection (it was idle and a newcomer needed its place).
    shed: CancellationToken,
    epoch: std::time::Instant,
}

impl ConnState {
    fn touch(&self) {
        self.last_active
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl Admission {
    pub fn new(limits: ConnLimits) -> Self {
        Self {
            limits: ConnLimits {
                max: limits.max.max(1),
                per_addr: limits.per_addr.max(1),
                ..limits
            },
            table: Mutex::new(ConnTable::default()),
            epoch: std::time::Instant::now(),
        }
    }

    pub fn limits(&self) -> ConnLimits {
        self.limits
    }

    /// Most connections open at once since the last call (and now).
    pub fn take_peak(&self) -> usize {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let peak = t.peak.max(t.conns.len());
        t.peak = t.conns.len();
        peak
    }

    /// Open connections now.
    pub fn open(&self) -> usize {
        self.table.lock().unwrap_or_else(|p| p.into_inner()).conns.len()
    }

    /// Makes room for a connection from `ip`, shedding an idle one if needed. `None`: no room.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let key = addr_key(ip);
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if t.per_key.get(&key).copied().unwrap_or(0) >= self.limits.per_addr {
            let victim = oldest_idle(&t, Some(key))?;
            t.remove(victim);
        }
        if t.conns.len() >= self.limits.max {
            let victim = oldest_idle(&t, None)?;
            t.remove(victim);
        }
        t.next_id += 1;
        let state = Arc::new(ConnState {
            id: t.next_id,
            key,
            busy: AtomicUsize::new(0),
            last_active: AtomicU64::new(0),
            shed: CancellationToken::new(),
            epoch: self.epoch,
        });
        state.touch();
        t.conns.insert(state.id, state.clone());
        t.peak = t.peak.max(t.conns.len());
        *t.per_key.entry(key).or_insert(0) += 1;
        Some(Slot {
            state,
            admission: self.clone(),
        })
    }
}

/// The idle connection (of `key`, or of anyone) that has been idle longest.
fn oldest_idle(t: &ConnTable, key: Option<IpAddr>) -> Option<u64> {
    t.conns
        .values()
        .filter(|c| key.is_none_or(|k| c.key == k) && c.busy.load(Ordering::Acquire) == 0)
        .min_by_key(|c| (c.last_active.load(Ordering::Relaxed), c.id))
        .map(|c| c.id)
}

impl ConnTable {
    /// Forgets connection `id` and tells it to close.
    fn remove(&mut self, id: u64) {
        if let Some(c) = self.conns.remove(&id) {
            c.shed.cancel();
            if let Some(n) = self.per_key.get_mut(&c.key) {
                *n -= 1;
                if *n == 0 {
                    self.per_key.remove(&c.key);
                }
            }
        }
    }
}

/// An admitted connection's place in the table, given back when the connection ends.
struct Slot {
    state: Arc<ConnState>,
    admission: Arc<Admission>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.admission
            .table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(self.state.id);
    }
}

/// Marks a connection busy from the start of a request until its response body is gone.
struct BusyGuard(Arc<ConnState>);

impl BusyGuard {
    fn new(state: Arc<ConnState>) -> Self {
        state.busy.fetch_add(1, Ordering::AcqRel);
        state.touch();
        Self(state)
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its connection marked busy until it is dropped.
struct TrackedBody {
    body: Body,
    _busy: BusyGuard,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Raises this process's soft open-file limit to its hard limit (services often start with a
/// soft limit of 1024, too few for a thousand clients) and logs the outcome. Returns the soft
/// limit now in force.
pub fn raise_nofile_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-file limit");
            return None;
        }
    };
    if soft >= hard {
        return Some(soft);
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => {
            tracing::debug!(from = soft, to = hard, "raised the open-file limit");
            Some(hard)
        }
        Err(e) => {
            tracing::warn!(error = %e, soft, hard, "cannot raise the open-file limit");
            Some(soft)
        }
    }
}

/// Hands memory that is free inside the allocator back to the system (glibc keeps what a burst
/// of transfers freed in its per-thread arenas: 27 MiB after a 100-client crowd on one NAR,
/// 64 MiB after the same crowd with zstd, measured by `bench/hostile.sh`). Takes a few ms; the
/// store server calls it when its transfers have gone idle. A no-op outside glibc (musl's
/// allocator returns memory by itself).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only walks the allocator's own free lists (under its locks) and
        // returns unused pages to the kernel; it touches no memory the program owns.
        unsafe {
            nix::libc::malloc_trim(0);
        }
    }
}

/// This process's soft open-file limit (`None` if it cannot be read, or is unlimited).
pub fn nofile_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, Resource};
    getrlimit(Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _)| soft)
        .filter(|&s| s != nix::sys::resource::RLIM_INFINITY)
}

/// Bytes a client must accept within every [`PACE_WINDOW`] of a streamed body (on top of never
/// stalling for longer than its stall timeout): 12.8 KiB/s on average, far below any LAN or
/// Wi-Fi client, far above an attacker that reads a few bytes a second to pin the transfer.
pub const PACE_WINDOW_BYTES: u64 = 128 * 1024;
/// See [`PACE_WINDOW_BYTES`].
pub const PACE_WINDOW: Duration = Duration::from_secs(10);

/// Why a paced body stream stopped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PaceError {
    #[error("client accepted no data for {0:?}")]
    Stalled(Duration),
    #[error("client accepted less than {bytes} bytes in {window:?}")]
    TooSlow { bytes: u64, window: Duration },
    #[error("client went away")]
    Gone,
}

/// Feeds a streamed body and cuts off a client that reads too slowly: each chunk must be taken
/// within `stall`, and at least [`PACE_WINDOW_BYTES`] within every [`PACE_WINDOW`]. A transfer
/// therefore holds what it holds (a daemon connection, a disk reader thread, an encoder) only
/// while its client keeps up.
pub struct Pace {
    stall: Duration,
    window_bytes: u64,
    window: Duration,
    /// Start of the current window and the bytes taken in it.
    window_start: tokio::time::Instant,
    in_window: u64,
}

impl Pace {
    pub fn new(stall: Duration) -> Self {
        Self::with_window(stall, PACE_WINDOW_BYTES, PACE_WINDOW)
    }

    pub fn with_window(stall: Duration, window_bytes: u64, window: Duration) -> Self {
        Self {
            stall,
            window_bytes,
            window,
            window_start: tokio::time::Instant::now(),
            in_window: 0,
        }
    }

    /// Sends `chunk` within the deadline; an `Err` chunk is sent as is (it aborts the response).
    pub async fn send(
        &mut self,
        tx: &mpsc::Sender<Result<Bytes, io::Error>>,
        chunk: Result<Bytes, io::Error>,
    ) -> Result<(), PaceError> {
        let len = chunk.as_ref().map_or(0, |c| c.len() as u64);
        let now = tokio::time::Instant::now();
        let window_end = self.window_start + self.window;
        let (deadline, too_slow) = if now + self.stall <= window_end {
            (now + self.stall, false)
        } else {
            (window_end, true)
        };
        match tokio::time::timeout_at(deadline, tx.send(chunk)).await {
            Err(_) if too_slow => Err(PaceError::TooSlow {
                bytes: self.window_bytes,
                window: self.window,
            }),
            Err(_) => Err(PaceError::Stalled(self.stall)),
            Ok(Err(_)) => Err(PaceError::Gone),
            Ok(Ok(())) => {
                self.in_window += len;
                if self.in_window >= self.window_bytes {
                    self.window_start = tokio::time::Instant::now();
                    self.in_window = 0;
                }
                Ok(())
            }
        }
    }
}

/// Response body: nothing, one buffer, or a stream of chunks fed by a producer task through a
/// bounded channel (so a slow client slows the producer: backpressure). An `Err` item aborts the
/// response, which the client sees as a truncated transfer.
pub enum Body {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Result<Bytes, io::Error>>),
    Pull(futures_util::stream::BoxStream<'static, Result<Bytes, io::Error>>),
}

impl Body {
    pub fn empty() -> Self {
        Body::Full(None)
    }
}

impl From<Bytes> for Body {
    fn from(b: Bytes) -> Self {
        Body::Full(Some(b))
    }
}

impl From<&'static str> for Body {
    fn from(s: &'static str) -> Self {
        Body::Full(Some(Bytes::from_static(s.as_bytes())))
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match &mut *self {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Stream(rx) => rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data))),
            Body::Pull(s) => s.as_mut().poll_next(cx).map(|o| o.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Stream(_) | Body::Pull(_) => SizeHint::default(),
        }
    }
}

/// A response with a status and a short plain-text body.
pub fn text(status: StatusCode, msg: &'static str) -> Response<Body> {
    let mut r = Response::new(Body::from(msg));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

pub fn not_found() -> Response<Body> {
    text(StatusCode::NOT_FOUND, "not found\n")
}

/// A 200 response with `body` of type `content_type`.
pub fn ok(body: Bytes, content_type: &'static str) -> Response<Body> {
    let mut r = Response::new(Body::from(body));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// `Some(true)` for HEAD, `Some(false)` for GET, `None` for any other method.
pub fn is_head(method: &http::Method) -> Option<bool> {
    match *method {
        http::Method::GET => Some(false),
        http::Method::HEAD => Some(true),
        _ => None,
    }
}

/// The 405 for methods other than GET and HEAD.
pub fn method_not_allowed() -> Response<Body> {
    let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    r
}

/// HEAD answers like GET without the body: drops a full body, keeping its length.
pub fn strip_for_head(resp: &mut Response<Body>) {
    if let Body::Full(Some(b)) = resp.body() {
        let len = b.len();
        *resp.body_mut() = Body::empty();
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
}

/// The 416 for a range past the end of a body of `size` bytes.
pub fn range_not_satisfiable(size: u64) -> Response<Body> {
    let mut r = text(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable\n");
    r.headers_mut().insert(
        header::CONTENT_RANGE,
        HeaderValue::from_str(&format!("bytes */{size}")).unwrap_or(HeaderValue::from_static("bytes */0")),
    );
    r
}

/// A NAR response: `Accept-Ranges`, the length of `start..=end`, and for a range request 206 with
/// `Content-Range`. No `Content-Encoding`, so Nix resumes a broken transfer with `Range`.
pub fn nar_response(body: Body, size: u64, start: u64, end: u64, ranged: bool) -> Response<Body> {
    let mut r = Response::new(body);
    let hd = r.headers_mut();
    hd.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-nix-nar"));
    hd.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let len = if size == 0 { 0 } else { end + 1 - start };
    hd.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if ranged {
        *r.status_mut() = StatusCode::PARTIAL_CONTENT;
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{size}")) {
            r.headers_mut().insert(header::CONTENT_RANGE, v);
        }
    }
    r
}

/// A `Range` that starts past the end of the body (answer 416).
#[derive(Debug, PartialEq, Eq)]
pub struct Unsatisfiable;

/// A `bytes=` range resolved against a known size: first and last byte, inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

/// Parses a `Range` header for a body of `size` bytes. `Ok(None)`: serve the whole body (no
/// header, or a form we do not honour, like multiple ranges, which RFC 9110 lets us ignore).
/// `Err`: unsatisfiable, answer 416.
pub fn parse_range(value: Option<&HeaderValue>, size: u64) -> Result<Option<ByteRange>, Unsatisfiable> {
    let Some(v) = value.and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let num = |s: &str| s.trim().parse::<u64>().ok();
    let range = match (a.trim().is_empty(), b.trim().is_empty()) {
        (false, true) => num(a).map(|s| (s, size.saturating_sub(1))),
        (false, false) => match (num(a), num(b)) {
            (Some(s), Some(e)) if e >= s => Some((s, e.min(size.saturating_sub(1)))),
            _ => None,
        },
        (true, false) => num(b)
            .filter(|&n| n > 0)
            .map(|n| (size.saturating_sub(n), size.saturating_sub(1))),
        (true, true) => None,
    };
    match range {
        None => Ok(None),
        Some((start, _)) if start >= size => Err(Unsatisfiable),
        Some((start, end)) => Ok(Some(ByteRange { start, end })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pace_cuts_off_stalled_and_too_slow_readers_only() {
        let chunk = || Ok(Bytes::from_static(&[7u8; 10]));
        // A reader that never reads: the channel takes one chunk, then the window (10 s) runs out
        // before the 60 s stall timeout.
        let (tx, _rx) = mpsc::channel(1);
        let mut p = Pace::with_window(Duration::from_secs(60), 100, Duration::from_secs(10));
        let t0 = tokio::time::Instant::now();
        p.send(&tx, chunk()).await.expect("first chunk fits the channel");
        let e = p.send(&tx, chunk()).await.expect_err("never read");
        assert!(matches!(e, PaceError::TooSlow { .. }), "{e:?}");
        assert_eq!(t0.elapsed(), Duration::from_secs(10));
        // With a shorter stall timeout, that one fires first.
        let (tx, _rx) = mpsc::channel(1);
        let mut p = Pace::with_window(Duration::from_secs(2), 100, Duration::from_secs(10));
        p.send(&tx, chunk()).await.expect("fits");
        assert_eq!(
            p.send(&tx, chunk()).await,
            Err(PaceError::Stalled(Duration::from_secs(2)))
        );
        // A reader taking 10 bytes a second: 100 bytes per 10 s window, just enough, for a minute.
        let (tx, mut rx) = mpsc::channel(1);
        let reader = tokio::spawn(async move {
            while rx.recv().await.is_some() {
                tokio::time::sleep(Duration::from_millis(990)).await;
            }
        });
        let mut p = Pace::with_window(Duration::from_secs(60), 100, Duration::from_secs(10));
        for i in 0..60 {
            p.send(&tx, chunk()).await.unwrap_or_else(|e| panic!("chunk {i}: {e}"));
        }
        // One taking 5 bytes a second (a chunk every 2 s) is cut off within a window.
        drop(tx);
        reader.await.expect("reader");
        let (tx, mut rx) = mpsc::channel(1);
        tokio::spawn(async move {
            while rx.recv().await.is_some() {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
        let mut p = Pace::with_window(Duration::from_secs(60), 100, Duration::from_secs(10));
        let t0 = tokio::time::Instant::now();
        let mut sent = 0;
        while p.send(&tx, chunk()).await.is_ok() {
            sent += 1;
        }
        assert!(
            sent < 10 && t0.elapsed() <= Duration::from_secs(10),
            "{sent} chunks in {:?}",
            t0.elapsed()
        );
        // A reader that went away.
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        assert_eq!(p.send(&tx, chunk()).await, Err(PaceError::Gone));
    }

    #[test]
    fn admission_sheds_the_oldest_idle_connection_never_a_busy_one() {
        let adm = Arc::new(Admission::new(ConnLimits {
            max: 3,
            per_addr: 2,
            header_timeout: HEADER_READ_TIMEOUT,
        }));
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let a1 = adm.admit(ip("10.0.0.1")).expect("a1");
        let a2 = adm.admit(ip("10.0.0.1")).expect("a2");
        // Past the address's share: its own oldest idle connection makes room.
        let a3 = adm.admit(ip("10.0.0.1")).expect("a3");
        assert!(a1.state.shed.is_cancelled() && !a2.state.shed.is_cancelled());
        drop(a1);
        assert_eq!(adm.open(), 2);
        // A busy connection is never shed: with both of 10.0.0.1's busy, a third is refused.
        let (_b2, _b3) = (BusyGuard::new(a2.state.clone()), BusyGuard::new(a3.state.clone()));
        assert!(adm.admit(ip("10.0.0.1")).is_none());
        // Another address gets in; at the total cap the oldest idle one of anyone goes.
        let c = adm.admit(ip("10.0.0.2")).expect("c");
        assert_eq!(adm.open(), 3);
        let d = adm
            .admit(ip("::ffff:10.0.0.3"))
            .expect("d takes c's place, the only idle one");
        assert!(c.state.shed.is_cancelled() && !d.state.shed.is_cancelled());
        drop(c);
        assert_eq!(adm.open(), 3);
        // All busy: refused.
        let _bd = BusyGuard::new(d.state.clone());
        assert!(adm.admit(ip("10.0.0.4")).is_none());
    }

    #[test]
    fn ipv6_clients_count_per_64() {
        let k = |s: &str| addr_key(s.parse().expect("ip"));
        assert_eq!(k("fd00:1:2:3:4:5:6:7"), k("fd00:1:2:3::9"));
        assert_ne!(k("fd00:1:2:3::1"), k("fd00:1:2:4::1"));
        assert_eq!(k("::ffff:192.0.2.1"), k("192.0.2.1"));
    }

    #[test]
    fn ranges() {
        let check = |h: Option<&str>, size: u64, want: Result<Option<(u64, u64)>, Unsatisfiable>| {
            let hv = h.map(|s| HeaderValue::from_str(s).expect("header"));
            let got = parse_range(hv.as_ref(), size).map(|o| o.map(|r| (r.start, r.end)));
            assert_eq!(got, want, "{h:?} of {size}");
        };
        check(None, 100, Ok(None));
        check(Some("bytes=0-"), 100, Ok(Some((0, 99))));
        check(Some("bytes=10-"), 100, Ok(Some((10, 99))));
        check(Some("bytes=10-19"), 100, Ok(Some((10, 19))));
        check(Some("bytes=10-1000"), 100, Ok(Some((10, 99))));
        check(Some("bytes=-10"), 100, Ok(Some((90, 99))));
        check(Some("bytes=-1000"), 100, Ok(Some((0, 99))));
        check(Some("bytes=99-"), 100, Ok(Some((99, 99))));
        check(Some("bytes=100-"), 100, Err(Unsatisfiable));
        check(Some("bytes=200-300"), 100, Err(Unsatisfiable));
        check(Some("bytes=20-10"), 100, Ok(None));
        check(Some("bytes=0-1,5-6"), 100, Ok(None));
        check(Some("items=0-1"), 100, Ok(None));
        check(Some("bytes=x-"), 100, Ok(None));
        check(Some("bytes=-0"), 100, Ok(None));
        check(Some("bytes=18446744073709551615-"), 100, Err(Unsatisfiable));
    }
}
