//! The proxy: the local Nix's substituter (`http://127.0.0.1:8381`).
//!
//! Its parts: `lookup` races the sources for a narinfo (peers first, upstreams hedged) and
//! gathers every source of a NAR; `fetch` brings one NAR into the `spool` until it verifies
//! (`split` shares a large one between peers); `source` talks to peers and upstreams and checks
//! what they send; `cache` remembers verified narinfo and misses; `health` judges the sources;
//! `stats` counts; `proven` and `passthrough` let a proven peer's NAR reach Nix while it is
//! hashed. This module wires them together and answers HTTP; `nar` answers NAR requests.
//!
//! Nix gets a narinfo whose URL is self-describing (`nar/<hash>-<narhash>.nar`, `Compression:
//! none`), resolved afresh from any source that has those bytes, so it keeps working after a
//! restart or after the first source left.
//!
//! Invariants: Nix never receives a whole NAR that did not verify (a NAR is sent once it
//! verified, or, from a proven peer, while it is hashed and short of its last 64 KiB until it
//! verified; a mismatch cuts the body and bans the peer from pass-through for good); every miss or
//! failure is a 404 decided in one place ([`ProxyError::into_response`]), never a 5xx (Nix fails
//! a build after retrying a 5xx); every cache, fan-out and spool is capped.

pub mod cache;
pub mod fetch;
pub mod forms;
pub mod health;
pub mod lookup;
mod nar;
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
    /// Smaller NARs are fetched plain from peers that offer zstd (`source::PEER_ZSTD_MIN_BYTES`).
    pub peer_zstd_min_bytes: u64,
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
            peer_zstd_min_bytes: source::PEER_ZSTD_MIN_BYTES,
            loopback_peers: false,
            delivered: None,
            pass_through: s.proxy.pass_through_proven_peers,
            state_dir: Some(s.proxy.state_dir.clone()),
        }
    }
}

/// A fetch's result, shared by every request waiting for the same NAR.
type SharedFetch = Result<Fetched, Arc<FetchError>>;

pub struct Proxy {
    sources: Sources,
    /// Plain or zstd, per peer, by what each delivered.
    forms: forms::PeerForms,
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
            sources: Sources::new(peers, cfg.upstreams, cfg.store_dir, cfg.keys, cfg.loopback_peers),
            forms: forms::PeerForms::new(cfg.peer_compression, cfg.peer_zstd_min_bytes),
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
                            forms: self.forms.rates(&p.node),
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
