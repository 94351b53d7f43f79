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

mod admission;
mod pace;
mod resources;
pub use admission::{addr_key, Admission, ConnLimits};
use admission::{BusyGuard, TrackedBody};
pub use pace::{Pace, PaceError, PACE_WINDOW, PACE_WINDOW_BYTES};
pub use resources::{nofile_limit, raise_nofile_limit, release_free_memory};

/// Open connections per server by default (the store server derives its own cap from the
/// open-file limit). Memory: a few KiB of task state and an 8 KiB buffer per idle connection
/// (about 20 MiB for 1024); a client sending huge headers grows its buffer to at most
/// [`MAX_READ_BUF`] until the header timeout.
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

/// Largest buffer of one connection. hyper applies it to both directions: requests (line and
/// headers must fit; it grows from 8 KiB only as a client sends more, so it bounds what a client
/// can pin with huge headers) and the write queue, which must hold two NAR chunks (128 KiB from
/// disk) for one stream to keep the link busy: at 16 KiB a single NAR stream ran at 0.67x of
/// nginx (bench/store-server.sh), every chunk flushed before the next was asked for.
const MAX_READ_BUF: usize = 256 * 1024;

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
pub fn ok(body: impl Into<Body>, content_type: &'static str) -> Response<Body> {
    let mut r = Response::new(body.into());
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
