//! The LAN-facing store server: the host's own store as an HTTP binary cache.
//!
//! This file holds `StoreServer`, the routing of a request and the lookups; `error` decides the
//! status of every failure (`ServeError`), `streams` feeds streamed bodies (the NAR pump, its
//! tasks), `install` answers the one-liner's paths; limits, transfers and summary are modules.
//!
//! Serves `/nix-cache-info`, `/<hash>.narinfo` and `/nar/<hash>-<narhash>.nar` (GET and HEAD,
//! `Range` on NARs), everything else is 404. Invariant: a path is visible only if one of its
//! signatures verifies against a trusted key; an unsigned, untrusted or absent path gets the
//! very same 404, and a daemon failure during a lookup answers like a miss (a Nix client fails
//! its build on a 5xx, but moves on after a 404).

pub mod compress;
pub mod elf;
mod error;
pub mod index;
pub mod install;
pub mod limits;
pub mod misses;
pub mod partial;
pub mod proofs;
mod raw;
mod route;
pub mod source;
pub mod store_watch;
mod streams;
pub mod summary;
pub mod transfers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{header, HeaderValue, Method, Request, Response};
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;

use crate::cache_url::{self, CacheRoute, NarEncoding};
use crate::http::{self as h, Body};
use crate::narinfo::{NarHash, StorePathHash, TrustedKeys};
use crate::store::Store;
use index::{Entry, Index};
pub use limits::{connection_limits, MAX_CONNECTIONS};
use streams::{NarPart, Streams};
use transfers::Transfers;

pub use error::ServeError;
pub use route::{route, Route};
pub use streams::NAR_CHANNEL_CHUNKS;

/// Priority in `/nix-cache-info`: before cache.nixos.org (40), for clients pointed straight at us.
pub const PRIORITY: u32 = 30;
/// The server looks whether its transfers went idle, to hand freed memory back, when its last
/// body task ends, and at least this often (a burst of connections without transfers; issue
/// #27: it looked every 2 s, a wake-up an idle laptop paid for).
const TRIM_CHECK: Duration = Duration::from_secs(30);

/// Before the first scan of the store completed, a miss asks the daemon and is answered this long
/// after the request arrived, not sooner (the daemon answers sooner for a path it lacks than for
/// one it holds unsigned). Afterwards misses are answered from the index alone (`misses`).
pub const MISS_FLOOR_BEFORE_SCAN: Duration = Duration::from_millis(5);

/// The store server of one host.
pub struct StoreServer {
    store: Store,
    index: Arc<Index>,
    keys: TrustedKeys,
    /// `/nix-cache-info`, rendered once.
    cache_info: Bytes,
    /// Transfer slots, stall timeout and feeding tasks of the streamed bodies.
    streams: Streams,
    /// The one-liner's script and this process's binary.
    install: install::Installer,
    /// This node's id, sent in [`cache_url::NODE_HEADER`] on every response, so a proxy can
    /// confirm it talks to the node that announced this address.
    node_header: Option<HeaderValue>,
    /// The content summary, when published.
    summary: Option<Arc<summary::Publisher>>,
    /// The beacon's peer table, for `GET /peers` (none without a beacon: 404).
    peers: Option<Arc<crate::beacon::PeerTable>>,
    /// Hosts that asked for `GET /peers` naming their store-server port, handed to the
    /// beacon to be asked back (none without a beacon).
    askers: Option<crate::beacon::seeds::askers::Askers>,
    /// This node's key, for `GET /identity` (none: 404).
    identity: Option<Arc<crate::beacon::identity::Identity>>,
    /// How many `GET /identity` answers each source may have (each costs a signature).
    proofs: proofs::ProofLimits,
    /// Misses, checked with the daemon after their 404 (see `misses`).
    misses: misses::MissChecks,
    /// NARs this host's proxy is fetching, served to peers' proxies as they arrive (`partial`).
    partials: Option<Arc<crate::proxy::partial::Partials>>,
}

impl StoreServer {
    pub fn new(store: Store, index: Arc<Index>, keys: TrustedKeys) -> Self {
        let daemon_streams = store.daemon_nar_streams();
        let cache_info = Bytes::from(format!(
            "StoreDir: {}\nWantMassQuery: 1\nPriority: {PRIORITY}\n",
            store.store_dir()
        ));
        Self {
            store,
            index,
            keys,
            cache_info,
            // Through the daemon, a transfer holds a daemon connection: no more transfers than
            // the connections NAR streams may use, so the fair queue decides who gets them.
            streams: Streams::new(match daemon_streams {
                Some(n) => Transfers::new(
                    n.min(transfers::MAX_TRANSFERS),
                    transfers::MAX_TRANSFERS_PER_ADDR,
                    transfers::MAX_WAITING_PER_ADDR,
                    transfers::QUEUE_WAIT,
                ),
                None => Transfers::default(),
            }),
            install: install::Installer::default(),
            node_header: None,
            summary: None,
            peers: None,
            askers: None,
            identity: None,
            proofs: proofs::ProofLimits::default(),
            misses: misses::MissChecks::default(),
            partials: None,
        }
    }

    /// Serves peers' proxies the NARs this host's proxy is fetching (`partial`).
    pub fn with_partials(mut self, p: Arc<crate::proxy::partial::Partials>) -> Self {
        self.partials = Some(p);
        self
    }

    /// Hands out `binary` (checked with [`install::check_install_binary`]) to the one-liner
    /// instead of this process's own.
    pub fn with_install_binary(mut self, binary: Option<install::InstallBinary>) -> Self {
        self.install = install::Installer::with_binary(binary);
        self
    }

    pub fn with_summary(mut self, p: Arc<summary::Publisher>) -> Self {
        self.summary = Some(p);
        self
    }

    /// Answers `GET /identity` with proofs by `id`'s key.
    pub fn with_identity(mut self, id: Arc<crate::beacon::identity::Identity>) -> Self {
        self.identity = Some(id);
        self
    }

    pub fn with_peers(mut self, t: Option<Arc<crate::beacon::PeerTable>>) -> Self {
        self.peers = t;
        self
    }

    pub fn with_askers(mut self, a: Option<crate::beacon::seeds::askers::Askers>) -> Self {
        self.askers = a;
        self
    }

    fn summary<B>(&self, req: &Request<B>) -> Result<Response<Body>, ServeError> {
        let p = self.summary.as_ref().ok_or(ServeError::NoSummary)?;
        let since = req
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("since="))
            .and_then(|v| v.parse::<u64>().ok());
        let b = p.response(since).ok_or(ServeError::NoSummary)?;
        Ok(h::ok(b, "application/octet-stream"))
    }

    fn peers(&self, query: Option<&str>, peer: SocketAddr) -> Result<Response<Body>, ServeError> {
        let t = self.peers.as_ref().ok_or(ServeError::NoPeerTable)?;
        // A seeding host names its store server's port: it is asked back (`seeds::askers`).
        let port = query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .find_map(|kv| kv.strip_prefix("port="))
            .and_then(|p| p.parse::<u16>().ok());
        if let (Some(askers), Some(port)) = (&self.askers, port) {
            askers.offer(SocketAddr::new(peer.ip(), port));
        }
        Ok(h::ok(Bytes::from(crate::beacon::pex::render(t)), "text/plain"))
    }

    fn identity<B>(&self, req: &Request<B>, peer: SocketAddr) -> Result<Response<Body>, ServeError> {
        let id = self.identity.as_ref().ok_or(ServeError::NoIdentity)?;
        if !self.proofs.allow(peer.ip(), tokio::time::Instant::now()) {
            return Err(ServeError::TooManyProofs { peer });
        }
        let body = crate::beacon::identity::answer(id, req.uri().query(), crate::beacon::identity::is_own_address)
            .map_err(|source| ServeError::IdentityRefused { peer, source })?;
        Ok(h::ok(Bytes::from(body), "text/plain"))
    }

    pub fn with_node_id(mut self, node: crate::beacon::wire::NodeId) -> Self {
        self.node_header = HeaderValue::from_str(&node.to_string()).ok();
        self
    }

    /// Replaces the transfer limits (tests use small ones).
    pub fn with_transfers(mut self, t: Transfers) -> Self {
        self.streams.transfers = Arc::new(t);
        self
    }

    pub fn with_stall_timeout(mut self, d: Duration) -> Self {
        self.streams.stall = d;
        self
    }

    /// The hosts (node ids, from the beacon's table) that a refusal names as streaming the NAR,
    /// for a busy answer (`cache_url::TRY_HEADER`).
    fn hints(&self, r: &transfers::Refused) -> Vec<crate::beacon::wire::NodeId> {
        hints_in(self.peers.as_deref(), r)
    }

    /// The servable entry for `hash`, from the index alone: a miss is answered at once, the same
    /// way for every kind of path, and checked with the daemon afterwards (`misses`), so a path
    /// added or signed since the last scan is served from the next request on. Until the first
    /// scan completed (moments after start) the index is not the store yet: a miss asks the
    /// daemon first and is answered [`MISS_FLOOR_BEFORE_SCAN`] after `arrived` at the earliest.
    async fn lookup(&self, hash: &StorePathHash, arrived: tokio::time::Instant) -> Option<Arc<Entry>> {
        let found = self.index.get(hash);
        if found.is_some() {
            return found;
        }
        if self.index.complete() {
            self.misses.note(*hash);
            return None;
        }
        let found = index::lookup_daemon(&self.store, &self.index, &self.keys, hash).await;
        if found.is_none() {
            tokio::time::sleep_until(arrived + MISS_FLOOR_BEFORE_SCAN).await;
        }
        found
    }

    /// A path's narinfo; a miss that this host's proxy is fetching is answered to a peer's proxy
    /// from the fetch (`partial`).
    async fn narinfo<B: Sync>(
        &self,
        req: &Request<B>,
        hash: &StorePathHash,
        arrived: tokio::time::Instant,
    ) -> Result<Response<Body>, ServeError> {
        match self.lookup(hash, arrived).await {
            Some(e) => Ok(h::ok(e.narinfo.clone(), "text/x-nix-narinfo")),
            None => {
                let proxy = req.headers().contains_key(cache_url::BUSY_OK_HEADER);
                partial::narinfo(self.partials.as_deref(), proxy, hash)
            }
        }
    }

    async fn nar<B: Sync>(
        &self,
        req: &Request<B>,
        peer: SocketAddr,
        hash: &StorePathHash,
        nar_hash: &NarHash,
        zstd: bool,
        arrived: tokio::time::Instant,
    ) -> Result<Response<Body>, ServeError> {
        let started = Instant::now();
        let Some(entry) = self.lookup(hash, arrived).await.filter(|e| e.nar_hash == *nar_hash) else {
            if zstd {
                return Err(ServeError::Miss);
            }
            let hints = |r: &transfers::Refused| self.hints(r);
            return partial::nar(
                self.partials.as_deref(),
                &self.streams,
                req,
                peer,
                hash,
                nar_hash,
                hints,
            )
            .await;
        };
        // A slot first (the queue may take a while), then the validity check right before the NAR.
        let permit = if req.method() == Method::HEAD {
            None
        } else {
            // A proxy takes a busy answer (it tries another source or comes back); a Nix
            // client waits in the queue and gets a miss after it (it fails a build on a 5xx).
            let busy_ok = req.headers().contains_key(cache_url::BUSY_OK_HEADER);
            // A proxy also shares one NAR with at most `MAX_TRANSFERS_PER_NAR` others at once
            // (and is told whom to try instead).
            let t = &self.streams.transfers;
            // Only NARs a downloader can relay (file-spooled ones) are shared so: a small one is
            // over in moments, and its takers could only wait. A segment of a split fetch counts
            // by its length (a busy one goes on from another of the NAR's holders).
            let (start, end) = match h::parse_range(req.headers().get(header::RANGE), entry.nar_size) {
                Ok(Some(r)) => (r.start, r.end),
                _ => (0, entry.nar_size.saturating_sub(1)),
            };
            let share = transfers::NarShare {
                nar: *nar_hash,
                size: entry.nar_size,
                start,
                end,
            };
            let shared = entry.nar_size > transfers::SHARED_NAR_MIN_BYTES;
            let got = match (busy_ok, shared) {
                (true, true) => {
                    t.acquire_for_nar(peer.ip(), share, transfers::MAX_TRANSFERS_PER_NAR)
                        .await
                }
                (true, false) => t.acquire_within(peer.ip(), transfers::BUSY_WAIT).await,
                (false, _) => t.acquire(peer.ip()).await,
            };
            let p = got.map_err(|source| {
                let path = entry.path.clone();
                match busy_ok {
                    true => {
                        let hints = self.hints(&source);
                        ServeError::Busy {
                            peer,
                            path,
                            source,
                            hints,
                        }
                    }
                    false => ServeError::NoSlot { peer, path, source },
                }
            })?;
            Some(Arc::new(p))
        };
        // The daemon's NarFromPath does not check validity: ask for the path info right before,
        // and make sure it still is the NAR the URL names.
        let info = match self.store.path_info(&entry.path).await {
            Ok(Some(i)) if i.nar_hash == *nar_hash && i.nar_size == entry.nar_size => i,
            Ok(_) => {
                self.index.remove(hash);
                return Err(ServeError::Gone {
                    path: entry.path.clone(),
                });
            }
            Err(source) => {
                return Err(ServeError::PathInfo {
                    path: entry.path.clone(),
                    source,
                })
            }
        };
        let size = info.nar_size;
        let range_header = if zstd { None } else { req.headers().get(header::RANGE) };
        let range = h::parse_range(range_header, size).map_err(|h::Unsatisfiable| ServeError::Range { size })?;
        let (start, end) = range.map_or((0, size - 1), |r| (r.start, r.end));
        let part = NarPart {
            path: entry.path.to_string(),
            size,
            start,
            end,
            zstd,
        };
        let (body, disk) = match raw::on_disk(req, &self.store, &info) {
            _ if req.method() == Method::HEAD => (Body::empty(), None),
            Some(p) => (
                Body::empty(),
                Some(raw::DiskNar::new(p, info.clone(), part, permit, started)),
            ),
            None => {
                let stream = self.store.nar(&info).await.map_err(|source| ServeError::DaemonNar {
                    path: entry.path.clone(),
                    source,
                })?;
                (self.streams.nar_body(stream, part, permit, started), None)
            }
        };
        if zstd {
            // Length unknown until compressed: chunked, and no ranges.
            return Ok(raw::with_disk(h::ok(body, "application/zstd"), disk));
        }
        Ok(raw::with_disk(
            h::nar_response(body, size, start, end, range.is_some()),
            disk,
        ))
    }

    /// Answers one GET or HEAD request (errors still to be turned into responses).
    async fn respond<B: Sync>(
        &self,
        req: &Request<B>,
        peer: SocketAddr,
        head: bool,
        arrived: tokio::time::Instant,
    ) -> Result<Response<Body>, ServeError> {
        match route(req.uri().path())? {
            Route::Cache(CacheRoute::CacheInfo) => Ok(h::ok(self.cache_info.clone(), "text/x-nix-cache-info")),
            Route::Install => self.install.script(req.headers().get(header::HOST)).await,
            Route::InstallBinary => self.install.binary(peer, head, &self.streams).await,
            Route::InstallSource => Ok(h::ok(Bytes::from_static(source::TARBALL), "application/x-tar")),
            Route::Summary => self.summary(req),
            Route::Peers => self.peers(req.uri().query(), peer),
            Route::Identity => self.identity(req, peer),
            Route::Cache(CacheRoute::NarInfo(hash)) => self.narinfo(req, &hash, arrived).await,
            Route::Cache(CacheRoute::Nar {
                hash,
                nar_hash,
                encoding,
            }) => {
                self.nar(req, peer, &hash, &nar_hash, encoding == NarEncoding::Zstd, arrived)
                    .await
            }
        }
    }

    /// The response to `req`, the same whether hyper or `raw` sends it; for a request served
    /// raw (`h::raw::Raw`), a NAR read from disk comes as a `raw::DiskNar` in its extensions.
    async fn answer<B: Sync>(&self, req: &Request<B>, peer: SocketAddr) -> Response<Body> {
        // One request per turn of the runtime: a connection with pipelined requests queued
        // (a flood) would otherwise answer up to tokio's budget of them before another
        // connection's request is looked at.
        tokio::task::yield_now().await;
        let arrived = tokio::time::Instant::now();
        let Some(head) = h::is_head(req.method()) else {
            // Answered before anything else, without the node id.
            return ServeError::Method.into_response();
        };
        let mut resp = self
            .respond(req, peer, head, arrived)
            .await
            .unwrap_or_else(ServeError::into_response);
        if head {
            h::strip_for_head(&mut resp);
        }
        if let Some(n) = &self.node_header {
            resp.headers_mut().insert(cache_url::NODE_HEADER, n.clone());
        }
        if let Some(v) = self.summary.as_ref().and_then(|p| p.version()) {
            resp.headers_mut()
                .insert(cache_url::SUMMARY_HEADER, HeaderValue::from(v));
        }
        // The load, for a proxy choosing among the holders of a NAR (issue #24).
        if let Ok(v) = HeaderValue::from_str(&self.streams.transfers.load().render()) {
            resp.headers_mut().insert(cache_url::LOAD_HEADER, v);
        }
        resp
    }
}

impl h::Handler for StoreServer {
    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        self.answer(&req, peer).await
    }

    const RAW: bool = true;

    fn sure(&self, req: &Request<()>) -> bool {
        raw::sure(req)
    }

    async fn serve_raw(
        &self,
        req: Request<()>,
        peer: SocketAddr,
        stream: &tokio::net::TcpStream,
    ) -> Result<bool, h::raw::RawError> {
        let mut out = h::raw::RawOut::new(stream, self.streams.pace(), &req);
        let resp = self.answer(&req, peer).await;
        raw::send(resp, req.method() == Method::HEAD, &mut out, &self.store, &self.streams).await
    }
}

/// The store server's bound addresses and the tasks to run, by name (the node owns them).
pub struct Running {
    pub addrs: Vec<SocketAddr>,
    pub parts: Vec<(&'static str, BoxFuture<'static, ()>)>,
}

/// The store server's parts: the index keeper, the store watch, the miss checks, the owner of
/// the streamed bodies' tasks, the task that hands memory back after bursts, and one accept loop
/// per listener. The connection cap follows this process's open-file limit
/// ([`connection_limits`]).
pub fn parts(
    server: Arc<StoreServer>,
    listeners: Vec<tokio::net::TcpListener>,
    rescan: Duration,
    shutdown: CancellationToken,
) -> Running {
    let mut addrs = Vec::new();
    let mut parts: Vec<(&'static str, BoxFuture<'static, ()>)> = Vec::new();
    parts.push((
        "store index",
        Box::pin(index::maintain(
            server.store.clone(),
            server.index.clone(),
            server.keys.clone(),
            rescan,
            shutdown.clone(),
        )),
    ));
    parts.push((
        "store watch",
        Box::pin(store_watch::watch(
            server.store.clone(),
            server.index.clone(),
            server.keys.clone(),
            shutdown.clone(),
        )),
    ));
    if let Some(rx) = server.misses.take_receiver() {
        parts.push((
            "miss checks",
            Box::pin(misses::check_with_daemon(
                rx,
                server.store.clone(),
                server.index.clone(),
                server.keys.clone(),
                shutdown.clone(),
            )),
        ));
    }
    parts.push((
        "body tasks",
        Box::pin(server.streams.tasks.clone().own(shutdown.clone())),
    ));
    let limits = connection_limits(h::nofile_limit());
    tracing::info!(
        connections = limits.max,
        per_address = limits.per_addr,
        transfers = transfers::MAX_TRANSFERS,
        "store server limits"
    );
    let admission = Arc::new(h::Admission::new(limits));
    parts.push((
        "memory release",
        Box::pin(release_memory_when_idle(
            server.streams.transfers.clone(),
            server.streams.tasks.clone(),
            admission.clone(),
            shutdown.clone(),
        )),
    ));
    for l in listeners {
        if let Ok(a) = l.local_addr() {
            tracing::info!(addr = %a, "store server listening");
            addrs.push(a);
        }
        parts.push((
            "store server listener",
            Box::pin(h::serve_with(l, server.clone(), admission.clone(), shutdown.clone())),
        ));
    }
    Running { addrs, parts }
}

/// See [`StoreServer::hints`].
fn hints_in(table: Option<&crate::beacon::PeerTable>, r: &transfers::Refused) -> Vec<crate::beacon::wire::NodeId> {
    let (Some(t), transfers::Refused::NarShared(ips)) = (table, r) else {
        return Vec::new();
    };
    t.peers()
        .into_iter()
        .filter(|p| {
            ips.iter()
                .any(|ip| ip.to_canonical() == p.http_addr().ip().to_canonical())
        })
        .map(|p| p.node)
        .take(crate::cache_url::MAX_TRY_HINTS)
        .collect()
}

/// Connections that count as a burst: once the open ones fall to a quarter of such a peak,
/// the memory they freed is handed back.
const CONNECTION_BURST: usize = 256;

/// After a burst (of transfers, once none runs or waits; of connections, once most have
/// closed), hands the memory it freed back to the system ([`h::release_free_memory`]), so RSS
/// returns near its baseline.
async fn release_memory_when_idle(
    transfers: Arc<Transfers>,
    tasks: Arc<h::BodyTasks>,
    admission: Arc<h::Admission>,
    shutdown: CancellationToken,
) {
    let mut seen = 0;
    let mut conn_peak = 0;
    let burst_over = move || {
        conn_peak = conn_peak.max(admission.take_peak());
        let open = admission.open();
        let conns_gone = conn_peak >= CONNECTION_BURST && open <= conn_peak / 4;
        if conns_gone {
            conn_peak = open;
        }
        transfers.went_idle(&mut seen) || conns_gone
    };
    h::release_after_bursts(tasks, burst_over, h::release_free_memory, TRIM_CHECK, shutdown).await
}

#[cfg(test)]
mod tests;
