//! The proxy: the local Nix's substituter (`http://127.0.0.1:8381`).
//!
//! Its parts: `lookup` races the sources for a narinfo (peers first, upstreams hedged) and
//! gathers every source of a NAR; `fetch` brings one NAR into the `spool` until it verifies
//! (`split` shares a large one between peers); `source` talks to peers and upstreams and checks
//! what they send; `cache` remembers verified narinfo and misses; `health` judges the sources;
//! `stats` counts. This module wires them together and answers HTTP.
//!
//! Nix gets a narinfo whose URL is self-describing (`nar/<hash>-<narhash>.nar`, `Compression:
//! none`), resolved afresh from any source that has those bytes, so it keeps working after a
//! restart or after the first source left.
//!
//! Invariants: Nix never receives a byte of a NAR before the whole NAR verified; every miss or
//! failure is a 404 decided in one place ([`ProxyError::into_response`]), never a 5xx (Nix fails
//! a build after retrying a 5xx); every cache, fan-out and spool is capped.

pub mod cache;
pub mod fetch;
pub mod health;
pub mod lookup;
pub mod passthrough;
pub mod proven;
pub mod source;
pub mod split;
pub mod spool;
pub mod stats;
pub mod summaries;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{header, Request, Response};
use hyper::body::Incoming;
use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::cache_url::{self, CacheRoute, NarEncoding, RouteError};
use crate::http::{self as h, Body};
use crate::narinfo::{Compression, NarHash, NarInfo, StorePathHash, TrustedKeys};
use crate::settings::{PeerCompression, Settings};
use fetch::{FetchError, Fetched, NarFetch};
use health::{SourceHealth, Verdict};
use source::{SourceId, Sources};
use spool::SpoolLimits;
use stats::{PeerReport, Stats, StatsKeeper, StatusReport, Transfer, TransferVerdict, UpstreamReport};

pub use split::PARALLEL_MIN_BYTES;

/// Priority in our `/nix-cache-info`: before cache.nixos.org (40) and a peer's store server (30).
pub const PRIORITY: u32 = 20;
/// Largest NAR spooled in memory (larger ones go to a file).
pub const MEM_SPOOL_ONE: u64 = 8 * 1024 * 1024;

/// What the proxy needs, from the settings (tests build one directly).
pub struct ProxyConfig {
    pub store_dir: String,
    pub keys: TrustedKeys,
    /// Upstream caches, each ending with `/`.
    pub upstreams: Vec<url::Url>,
    pub spool: SpoolLimits,
    pub peer_compression: PeerCompression,
    /// A NAR at least this large is fetched in segments from several peers at once.
    pub parallel_min_bytes: u64,
    /// Peers on loopback addresses may be asked: only for tests and one-machine benchmarks
    /// (beacons from the network never carry one; anything else pointing the proxy at this host's
    /// own services is refused).
    pub loopback_peers: bool,
    /// Told every store path delivered to the local Nix, so this host's store server can offer
    /// it to peers soon (see `server::summary::learn`).
    pub delivered: Option<tokio::sync::mpsc::Sender<crate::narinfo::StorePath>>,
    /// Proven peers' NARs pass through while they are hashed (see `passthrough`).
    pub pass_through: bool,
    /// Where the proven and banned peers are kept across restarts (none: in memory only).
    pub state_dir: Option<std::path::PathBuf>,
}

impl ProxyConfig {
    pub fn from_settings(s: &Settings) -> Self {
        let sp = &s.proxy.spool;
        Self {
            store_dir: s.store.store_dir.clone(),
            keys: s.server.keys.clone(),
            upstreams: s.proxy.upstreams.clone(),
            spool: SpoolLimits::new(MEM_SPOOL_ONE, sp.mem_total_mib, sp.disk_total_mib, sp.dir.clone()),
            peer_compression: s.proxy.peer_compression,
            parallel_min_bytes: PARALLEL_MIN_BYTES,
            loopback_peers: false,
            delivered: None,
            pass_through: s.proxy.pass_through_proven_peers,
            state_dir: Some(s.proxy.state_dir.clone()),
        }
    }
}

/// A fetch's result, shared by every request waiting for the same NAR.
type SharedFetch = Result<Fetched, Arc<FetchError>>;

/// Aborts a pass-through's fetch task when its request is gone (dropped with the body): as when
/// the request running a fetch goes away, a request waiting for the same NAR takes over, and
/// with none waiting the fetch stops.
struct AbortFetch {
    task: tokio::task::AbortHandle,
    proxy: Arc<Proxy>,
    nar_hash: NarHash,
    cell: Arc<OnceCell<SharedFetch>>,
}

impl Drop for AbortFetch {
    fn drop(&mut self) {
        if !self.task.is_finished() {
            self.task.abort();
            if !self.cell.initialized() {
                self.proxy.fetch_done(&self.nar_hash, &self.cell);
            }
        }
    }
}

pub struct Proxy {
    sources: Sources,
    health: SourceHealth,
    cache: cache::NarinfoCache,
    /// Peers' content summaries (kept current by [`summaries::PeerSummaries::run`]).
    summaries: summaries::PeerSummaries,
    stats: StatsKeeper,
    /// `/nix-cache-info`, rendered once.
    cache_info: Bytes,
    spool: SpoolLimits,
    /// See [`ProxyConfig::parallel_min_bytes`].
    parallel_min_bytes: u64,
    /// See [`ProxyConfig::delivered`].
    delivered: Option<tokio::sync::mpsc::Sender<crate::narinfo::StorePath>>,
    /// NAR fetches under way, by NAR hash: concurrent requests for the same NAR (Nix retrying, two
    /// clients) share one fetch and one spool. Bounded by the open connections.
    inflight: Mutex<HashMap<NarHash, Arc<OnceCell<SharedFetch>>>>,
    /// Peers whose NARs may pass through, and the banned ones (persisted).
    proven: proven::ProvenPeers,
    /// See [`ProxyConfig::pass_through`].
    pass_through: bool,
    /// This proxy, for the fetch task a pass-through leaves running behind its response.
    me: std::sync::Weak<Proxy>,
}

/// Why a request did not get what it asked for. One place decides the status of each
/// ([`Self::into_response`]): every miss or failure is a 404, which Nix takes as "not here" and
/// moves on, where a 5xx would be retried and then fail the build.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}")]
    Route(#[from] RouteError),
    #[error("no source has the narinfo")]
    NarinfoMiss,
    #[error("a recent miss")]
    RecentMiss,
    #[error("NAR unavailable: {0}")]
    NarUnavailable(Arc<FetchError>),
    #[error("compressed NARs are for peers, not for the local Nix")]
    CompressedNar,
    #[error("range not satisfiable for {0} bytes")]
    Range(u64),
}

impl ProxyError {
    pub fn into_response(self) -> Response<Body> {
        match self {
            Self::Route(e) => e.into_response(),
            Self::NarinfoMiss | Self::RecentMiss | Self::NarUnavailable(_) | Self::CompressedNar => h::not_found(),
            Self::Range(size) => h::range_not_satisfiable(size),
        }
    }
}

impl Proxy {
    pub fn new(cfg: ProxyConfig, peers: Option<Arc<crate::beacon::PeerTable>>) -> Arc<Self> {
        let upstreams = cfg.upstreams.len();
        let proven = proven::ProvenPeers::load(cfg.state_dir.as_deref());
        Arc::new_cyclic(|me| Self {
            proven,
            pass_through: cfg.pass_through,
            me: me.clone(),
            cache_info: Bytes::from(format!(
                "StoreDir: {}\nWantMassQuery: 1\nPriority: {PRIORITY}\n",
                cfg.store_dir
            )),
            sources: Sources::new(
                peers,
                cfg.upstreams,
                cfg.store_dir,
                cfg.keys,
                cfg.peer_compression,
                cfg.loopback_peers,
            ),
            health: SourceHealth::new(upstreams),
            cache: cache::NarinfoCache::default(),
            summaries: summaries::PeerSummaries::default(),
            stats: StatsKeeper::default(),
            spool: cfg.spool,
            parallel_min_bytes: cfg.parallel_min_bytes,
            delivered: cfg.delivered,
            inflight: Mutex::new(HashMap::new()),
        })
    }

    /// Records how a source did (one call, whatever happened) and counts lies. A peer's verified
    /// NAR counts towards its being proven; a wrong NAR bans it from pass-through for good.
    fn judge(&self, s: &SourceId, v: Verdict<'_>) {
        if let SourceId::Peer(n) = s {
            let addr = self.sources.table().and_then(|t| t.get(n)).map(|p| p.http_addr());
            // Marked where the request went (the table may have moved the node since).
            if let Verdict::Failed(source::SourceError::NotThePeer { at, .. }) = &v {
                if let Some(a) = at.or(addr) {
                    self.health.impostor_at(n, a);
                }
            }
            let ip = addr.map(|a| a.ip());
            match (&v, ip) {
                (Verdict::Delivered, Some(ip)) => {
                    if let (Some(t), Some(a)) = (self.sources.table(), addr) {
                        t.answered(n, a, Instant::now());
                    }
                    self.proven.delivered(n, ip);
                }
                (Verdict::LiedAbout(_), ip) => {
                    tracing::warn!(node = %n, ?ip, "peer sent a wrong NAR: never passed through again");
                    self.proven.lied(n, ip);
                }
                _ => {}
            }
        }
        if self.health.judge(s, v, Instant::now()) {
            self.stats.update(|st| st.lies += 1);
        }
    }

    /// Whether a peer may be asked at all: still announced, not an impostor, and its address not
    /// known to belong to another node.
    fn peer_usable(&self, node: &crate::beacon::wire::NodeId) -> bool {
        let Some(t) = self.sources.table() else {
            return false;
        };
        t.get(node)
            .is_some_and(|p| self.health.may_ask(node, p.http_addr(), |other| t.get(other).is_some()))
    }

    /// Whether bytes from `s` may go to Nix before the whole NAR verified: a peer still usable
    /// (announced, no impostor, its address its own) and proven at its current address.
    pub(crate) fn passes_through(&self, s: &SourceId) -> bool {
        let SourceId::Peer(n) = s else { return false };
        let Some(addr) = self.sources.table().and_then(|t| t.get(n)).map(|p| p.http_addr()) else {
            return false;
        };
        self.pass_through && self.peer_usable(n) && self.proven.is_proven(n, addr.ip())
    }

    pub fn stats(&self) -> Stats {
        self.stats.get()
    }

    /// A source as a person reads it.
    fn describe(&self, s: &SourceId) -> String {
        match s {
            SourceId::Peer(n) => match self.sources.table().and_then(|t| t.get(n)) {
                Some(p) => format!("peer {}", p.http_addr()),
                None => format!("peer {n}"),
            },
            SourceId::Upstream(i) => self
                .sources
                .upstreams
                .get(*i)
                .map_or("upstream".into(), |u| u.to_string()),
        }
    }

    /// Everything the status page, `/metrics` and `status` show.
    pub fn status(&self) -> StatusReport {
        let now = Instant::now();
        let peers = self
            .sources
            .table()
            .map(|t| {
                t.peers()
                    .iter()
                    .map(|p| {
                        let mut health = self.health.peer(&p.node);
                        health.impostor = self.health.is_impostor(&p.node, p.http_addr());
                        PeerReport {
                            proven: self.proven.is_proven(&p.node, p.http_addr().ip()),
                            node: p.node.to_string(),
                            addr: p.http_addr().to_string(),
                            hostname: p.hostname.clone(),
                            backed_off: health.backed_off(now),
                            health,
                            summary: self.summaries.version(&p.node),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        StatusReport {
            peers,
            stats: self.stats.get(),
            recent: self.stats.recent(),
            beacon: self.sources.table().map(|t| t.counters()),
            upstreams: self
                .sources
                .upstreams
                .iter()
                .enumerate()
                .map(|(i, u)| UpstreamReport {
                    url: u.to_string(),
                    reachable: self.health.upstream_up(i, now),
                })
                .collect(),
            interfaces: Vec::new(),
            summary_bytes: self.summaries.bytes() as u64,
        }
    }

    /// The narinfo we give Nix: the winner's, pointing at our self-describing NAR URL.
    fn rewrite(info: &NarInfo) -> Bytes {
        let mut out = info.clone();
        out.url = cache_url::nar_url(&info.store_path.hash(), &info.nar_hash);
        out.compression = Compression::None;
        out.file_hash = None;
        out.file_size = None;
        Bytes::from(out.render())
    }

    async fn narinfo(&self, hash: &StorePathHash) -> Result<Response<Body>, ProxyError> {
        let t0 = Instant::now();
        if let Some(k) = self.cache.known(hash) {
            return Ok(h::ok(Self::rewrite(&k.info), "text/x-nix-narinfo"));
        }
        if self.cache.is_missing(hash) {
            return Err(ProxyError::RecentMiss);
        }
        let ms = || t0.elapsed().as_millis() as u64;
        let Some(c) = self.race(hash).await else {
            self.stats.update(|s| s.narinfo_misses += 1);
            tracing::info!(%hash, ms = ms(), verdict = "miss", "narinfo");
            self.cache.remember_missing(*hash);
            return Err(ProxyError::NarinfoMiss);
        };
        self.stats.update(|s| match c.source {
            SourceId::Peer(_) => s.narinfo_hits_peer += 1,
            SourceId::Upstream(_) => s.narinfo_hits_upstream += 1,
        });
        let body = Self::rewrite(&c.info);
        tracing::info!(path = %c.info.store_path, source = ?c.source, ms = ms(), verdict = "hit", "narinfo");
        self.cache.remember(*hash, c);
        Ok(h::ok(body, "text/x-nix-narinfo"))
    }

    /// A verified NAR, fetched once for every request that wants it at the same time. If the
    /// request doing the fetch goes away, a waiting one takes over.
    async fn fetch_shared(&self, hash: &StorePathHash, nar_hash: &NarHash) -> SharedFetch {
        let cell = self
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(*nar_hash)
            .or_insert_with(|| Arc::new(OnceCell::new()))
            .clone();
        let r = cell
            .get_or_init(|| async { NarFetch::new(self, *hash, *nar_hash).run().await.map_err(Arc::new) })
            .await
            .clone();
        self.fetch_done(nar_hash, &cell);
        r
    }

    /// HEAD of a NAR: answered from what the narinfo says (its size, whether a source has it),
    /// without downloading the NAR, which matters on a metered link.
    async fn nar_head(
        &self,
        req: &Request<Incoming>,
        hash: &StorePathHash,
        nar_hash: &NarHash,
    ) -> Result<Response<Body>, ProxyError> {
        let size = match self.cache.known(hash) {
            Some(k) if k.info.nar_hash == *nar_hash && !k.candidates.is_empty() => k.info.nar_size,
            _ => match self.gather(hash, nar_hash, &Default::default()).await.first() {
                Some(c) => c.info.nar_size,
                None => return Err(ProxyError::NarUnavailable(Arc::new(FetchError::NoSource))),
            },
        };
        let range = h::parse_range(req.headers().get(header::RANGE), size).map_err(|_| ProxyError::Range(size))?;
        let (start, end) = range.map_or((0, size.saturating_sub(1)), |r| (r.start, r.end));
        Ok(h::nar_response(Body::empty(), size, start, end, range.is_some()))
    }

    async fn nar(
        &self,
        req: &Request<Incoming>,
        hash: &StorePathHash,
        nar_hash: &NarHash,
    ) -> Result<Response<Body>, ProxyError> {
        if req.method() == http::Method::HEAD {
            return self.nar_head(req, hash, nar_hash).await;
        }
        let t0 = Instant::now();
        // A whole NAR (no `Range`) whose fetch this request starts may pass through.
        if self.pass_through && !req.headers().contains_key(header::RANGE) {
            if let Some(me) = self.me.upgrade() {
                if let Some(r) = me.nar_passing(req, hash, nar_hash, t0).await {
                    return r;
                }
            }
        }
        let r = self.fetch_shared(hash, nar_hash).await;
        self.nar_verified(req, hash, r, t0)
    }

    /// Counts and logs a NAR that could not be delivered.
    fn nar_failed(&self, hash: &StorePathHash, e: &FetchError, t0: Instant, verdict: TransferVerdict, sent: u64) {
        let ms = t0.elapsed().as_millis() as u64;
        self.stats.update(|s| match verdict {
            TransferVerdict::Cut => s.nars_cut += 1,
            _ => s.nar_failures += 1,
        });
        self.stats.record(Transfer {
            path: hash.to_string(),
            source: String::new(),
            bytes: sent,
            ms,
            verdict,
            reason: e.to_string(),
        });
        tracing::info!(%hash, ms, verdict = verdict.as_str(), reason = %e, "NAR");
    }

    /// Counts a NAR delivered from `source`.
    fn nar_counted(&self, source: &SourceId) {
        self.stats.update(|s| match source {
            SourceId::Peer(_) => s.nars_from_peers += 1,
            SourceId::Upstream(_) => s.nars_from_upstream += 1,
        });
    }

    /// The response for a NAR that verified before a byte of it is sent (or for its failure).
    fn nar_verified(
        &self,
        req: &Request<Incoming>,
        hash: &StorePathHash,
        r: SharedFetch,
        t0: Instant,
    ) -> Result<Response<Body>, ProxyError> {
        let ms = || t0.elapsed().as_millis() as u64;
        let (v, info, source) = match r {
            Ok(f) => f,
            Err(e) => {
                self.nar_failed(hash, &e, t0, TransferVerdict::Unavailable, 0);
                return Err(ProxyError::NarUnavailable(e));
            }
        };
        self.nar_counted(&source);
        tracing::info!(path = %info.store_path, source = ?source, bytes = v.len(), ms = ms(), verdict = "verified", "NAR");
        self.stats.record(Transfer {
            path: info.store_path.to_string(),
            source: self.describe(&source),
            bytes: v.len(),
            ms: ms(),
            verdict: TransferVerdict::Verified,
            reason: String::new(),
        });
        let size = v.len();
        let range = h::parse_range(req.headers().get(header::RANGE), size).map_err(|_| ProxyError::Range(size))?;
        let (start, end) = range.map_or((0, size.saturating_sub(1)), |r| (r.start, r.end));
        let (path, t1) = (info.store_path.clone(), Instant::now());
        let delivered = self.delivered.clone().filter(|_| end + 1 == size);
        let body = v.body(start, end, move |sent| {
            tracing::info!(%path, bytes = sent, ms = t1.elapsed().as_millis() as u64, "NAR delivered");
            if sent == size - start {
                // Full queue: the store rescan finds it later.
                if let Some(tx) = delivered {
                    let _ = tx.try_send(path);
                }
            }
        });
        Ok(h::nar_response(body, size, start, end, range.is_some()))
    }

    /// A whole NAR whose fetch this request starts, passed through while it is hashed if the
    /// fetch copies it from a proven peer (see `passthrough`); otherwise answered as a verified
    /// NAR. `None` when a fetch of this NAR is already under way (the caller joins it).
    ///
    /// The fetch runs in its own task (the response is returned before the NAR is complete);
    /// the task is aborted when this request goes away first, and a request waiting for the
    /// same NAR then takes over, as with any fetch.
    async fn nar_passing(
        self: Arc<Self>,
        req: &Request<Incoming>,
        hash: &StorePathHash,
        nar_hash: &NarHash,
        t0: Instant,
    ) -> Option<Result<Response<Body>, ProxyError>> {
        let cell = {
            let mut m = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            if m.contains_key(nar_hash) {
                return None;
            }
            let cell = Arc::new(OnceCell::new());
            m.insert(*nar_hash, cell.clone());
            cell
        };
        let (tap, mut end) = passthrough::Tap::new();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<SharedFetch>();
        let me = self.clone();
        let (hash, nar_hash) = (*hash, *nar_hash);
        let task = tokio::spawn({
            let cell = cell.clone();
            async move {
                let r = cell
                    .get_or_init(|| async {
                        NarFetch::new(&me, hash, nar_hash)
                            .with_tap(tap)
                            .run()
                            .await
                            .map_err(Arc::new)
                    })
                    .await
                    .clone();
                me.fetch_done(&nar_hash, &cell);
                let _ = done_tx.send(r);
            }
        });
        let guard = AbortFetch {
            task: task.abort_handle(),
            proxy: self.clone(),
            nar_hash,
            cell,
        };
        let Some(first) = end.rx.recv().await else {
            // Nothing passed through: the fetch is over (or was never proven-sourced).
            drop(end);
            let r = done_rx.await.unwrap_or_else(|_| Err(Arc::new(FetchError::NoSource)));
            drop(guard);
            return Some(self.nar_verified(req, &hash, r, t0));
        };
        let size = first.size;
        let (out_tx, out_rx) = tokio::sync::mpsc::channel(passthrough::BODY_CHUNKS);
        let me = self.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let done = async move {
                match done_rx.await {
                    Ok(Ok((v, info, source))) => Ok((v, (info, source))),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("the fetch ended".to_owned()),
                }
            };
            let verified = |(info, source): &(Arc<NarInfo>, SourceId)| me.pass_verified(info, source, t0);
            let (outcome, _) = passthrough::forward(first, end, done, verified, out_tx).await;
            me.pass_done(&hash, outcome, t0);
        });
        tracing::debug!(%hash, size, "NAR passing through");
        let mut resp = h::nar_response(Body::Stream(out_rx), size, 0, size.saturating_sub(1), false);
        // A cut body must not be resumed with `Range`: the bytes Nix already has might be the
        // liar's. Without `Accept-Ranges`, Nix fails the download instead.
        resp.headers_mut().remove(header::ACCEPT_RANGES);
        Some(Ok(resp))
    }

    /// Removes the in-flight entry of a fetch that ended (unless another took its place).
    fn fetch_done(&self, nar_hash: &NarHash, cell: &Arc<OnceCell<SharedFetch>>) {
        let mut m = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if m.get(nar_hash).is_some_and(|c| Arc::ptr_eq(c, cell)) {
            m.remove(nar_hash);
        }
    }

    /// Counts, records and logs a pass-through whose NAR verified (its tail is sent next).
    fn pass_verified(&self, info: &NarInfo, source: &SourceId, t0: Instant) {
        let ms = t0.elapsed().as_millis() as u64;
        self.nar_counted(source);
        self.stats.update(|s| s.nars_passed_through += 1);
        tracing::info!(path = %info.store_path, source = ?source, bytes = info.nar_size, ms, verdict = "passed through", "NAR");
        self.stats.record(Transfer {
            path: info.store_path.to_string(),
            source: self.describe(source),
            bytes: info.nar_size,
            ms,
            verdict: TransferVerdict::PassedThrough,
            reason: String::new(),
        });
        if let Some(tx) = &self.delivered {
            // Full queue: the store rescan finds it later.
            let _ = tx.try_send(info.store_path.clone());
        }
    }

    /// Logs how a pass-through ended, and counts a cut one.
    fn pass_done(&self, hash: &StorePathHash, outcome: passthrough::Outcome, t0: Instant) {
        let ms = t0.elapsed().as_millis() as u64;
        match outcome {
            passthrough::Outcome::Delivered => {
                tracing::info!(%hash, ms, "NAR delivered");
            }
            passthrough::Outcome::Cut { sent, why } => {
                tracing::warn!(%hash, sent, %why, "pass-through cut: Nix gets a short NAR and installs nothing");
                let e = FetchError::Exhausted { tried: 0, last: why };
                self.nar_failed(hash, &e, t0, TransferVerdict::Cut, sent);
            }
            passthrough::Outcome::Left { sent } => {
                tracing::info!(%hash, sent, ms, "NAR client left during pass-through");
            }
        }
    }

    /// Answers one request (errors still to be turned into responses).
    async fn respond(&self, req: &Request<Incoming>) -> Result<Response<Body>, ProxyError> {
        match cache_url::parse(req.uri().path())? {
            CacheRoute::CacheInfo => Ok(h::ok(self.cache_info.clone(), "text/x-nix-cache-info")),
            CacheRoute::NarInfo(hash) => self.narinfo(&hash).await,
            CacheRoute::Nar {
                hash,
                nar_hash,
                encoding: NarEncoding::Plain,
            } => self.nar(req, &hash, &nar_hash).await,
            // Nix never asks the proxy for compressed NARs.
            CacheRoute::Nar {
                encoding: NarEncoding::Zstd,
                ..
            } => Err(ProxyError::CompressedNar),
        }
    }
}

impl h::Handler for Proxy {
    async fn handle(&self, req: Request<Incoming>, _peer: SocketAddr) -> Response<Body> {
        let Some(head) = h::is_head(req.method()) else {
            return h::method_not_allowed();
        };
        let mut resp = self.respond(&req).await.unwrap_or_else(|e| {
            tracing::debug!(path = req.uri().path(), error = %e, "answered with an error status");
            e.into_response()
        });
        if head {
            h::strip_for_head(&mut resp);
        }
        resp
    }
}
