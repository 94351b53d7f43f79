//! The accept loop: binding (dual-stack), admission of each connection, one owned task per
//! connection (which first serves the requests its handler takes raw, `run_raw` and `raw`, then
//! hands the connection to hyper), and the drain at shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Response;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::admission::{Admission, BusyGuard, ConnLimits, ConnState, TrackedBody};
use super::body::Body;
use super::raw::{self, Rewind};

/// On shutdown, in-flight responses get this long to finish.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Pending connections the kernel queues per listener.
const BACKLOG: i32 = 1024;

/// A request handler. `peer` is the client's address.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: http::Request<Incoming>, peer: SocketAddr) -> impl Future<Output = Response<Body>> + Send;

    /// Whether this handler serves some requests itself on the raw connection (`raw`): if not,
    /// each connection goes straight to hyper.
    const RAW: bool = false;

    /// Whether to serve `req` (a plain head: `raw::plain_head`) with [`Self::serve_raw`]; at
    /// the first `false` the connection goes to hyper.
    fn sure(&self, _req: &http::Request<()>) -> bool {
        false
    }

    /// Answers `req` by writing the whole response to `stream` (see `raw::RawOut`); returns
    /// whether the connection may serve another request.
    fn serve_raw(
        &self,
        _req: http::Request<()>,
        _peer: SocketAddr,
        _stream: &tokio::net::TcpStream,
    ) -> impl Future<Output = Result<bool, super::raw::RawError>> + Send {
        async { Ok(false) }
    }
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
        let header_timeout = admission.limits.header_timeout;
        let watcher = graceful.watcher();
        let stop = shutdown.clone();
        conns.spawn(async move {
            let conn = async {
                // A handler that serves some requests raw reads the first heads itself.
                let io = match H::RAW {
                    false => Rewind::new(bytes::Bytes::new(), stream),
                    true => match run_raw(&*h, stream, peer, &state, header_timeout, &stop).await {
                        Outcome::Done => return,
                        Outcome::Handoff(io) => io,
                    },
                };
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
                    .header_read_timeout(header_timeout)
                    .max_buf_size(MAX_READ_BUF)
                    .serve_connection(TokioIo::new(io), svc);
                if let Err(e) = watcher.watch(conn).await {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            };
            tokio::select! {
                _ = conn => {}
                _ = slot.state.shed.cancelled() => tracing::debug!(%peer, "idle connection shed for a newcomer"),
            }
            drop(slot);
        });
    }
    drop(listener);
    // hyper's connections finish their responses and close; raw ones (`run_raw`) close when
    // idle and after the response they are writing (each holds a watcher until it ends).
    let drained = async {
        graceful.shutdown().await;
        while conns.join_next().await.is_some() {}
    };
    tokio::select! {
        _ = drained => {}
        _ = tokio::time::sleep(DRAIN_TIMEOUT) => tracing::warn!(?local, "connections still open after the drain timeout"),
    }
    conns.shutdown().await;
}

/// What became of a connection's raw part.
enum Outcome {
    /// Closed (client gone, timeout, `Connection: close`, shutdown, an error).
    Done,
    /// A request this module is not sure about: hyper serves the rest, these bytes first.
    Handoff(raw::Rewind<TcpStream>),
}

/// Serves `stream`'s requests raw while `handler` is sure about them; see the module doc.
async fn run_raw<H: Handler>(
    handler: &H,
    stream: TcpStream,
    peer: SocketAddr,
    state: &std::sync::Arc<ConnState>,
    header_timeout: Duration,
    shutdown: &CancellationToken,
) -> Outcome {
    let mut buf = bytes::BytesMut::new();
    let mut stream = stream;
    loop {
        let head = tokio::select! {
            h = tokio::time::timeout(header_timeout, raw::read_head(&mut stream, &mut buf)) => h,
            // Between requests a raw connection is idle: it closes at once at shutdown.
            _ = shutdown.cancelled(), if buf.is_empty() => return Outcome::Done,
        };
        let (req, len) = match head {
            Err(_) | Ok(Err(_)) | Ok(Ok(raw::Head::Closed)) => return Outcome::Done,
            Ok(Ok(raw::Head::Unsure)) => return Outcome::Handoff(raw::Rewind::new(buf.freeze(), stream)),
            Ok(Ok(raw::Head::Complete(req, len))) => (req, len),
        };
        if !handler.sure(&req) {
            return Outcome::Handoff(raw::Rewind::new(buf.freeze(), stream));
        }
        bytes::Buf::advance(&mut buf, len);
        let close = raw::wants_close(req.headers());
        // Counted as taken, before a byte of the answer is written.
        raw::RAW_RESPONSES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let busy = BusyGuard::new(state.clone());
        let keep = handler.serve_raw(*req, peer, &stream).await;
        drop(busy);
        match keep {
            Ok(true) if !close && !shutdown.is_cancelled() => {}
            Ok(_) => return Outcome::Done,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "raw response ended early");
                return Outcome::Done;
            }
        }
    }
}

/// Largest buffer of one connection. hyper applies it to both directions: requests (line and
/// headers must fit; it grows from 8 KiB only as a client sends more, so it bounds what a client
/// can pin with huge headers) and the write queue, which must hold two NAR chunks (128 KiB from
/// disk) for one stream to keep the link busy: at 16 KiB a single NAR stream ran at 0.67x of
/// nginx (bench/store-server.sh), every chunk flushed before the next was asked for.
pub const MAX_READ_BUF: usize = 256 * 1024;
