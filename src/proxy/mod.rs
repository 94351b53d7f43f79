//! The proxy: the local Nix's substituter (`http://127.0.0.1:8381`).
//!
//! Its parts, each a type with its own state: [`book::SourceBook`] owns what is known of every
//! source and picks and judges them ("how does the proxy pick a source for a NAR": `book.rs`);
//! `lookup` races the sources for a narinfo (peers first, upstreams hedged) and gathers every
//! source of a NAR; [`fetch::NarFetch`] brings one NAR into the `spool` until it verifies (`split`
//! shares a large one between peers; both read through `copy`), given only the
//! [`fetch::FetchParts`] it needs; `verified` serves a NAR that verified; `source` talks to peers
//! and upstreams and checks what they send; `cache` remembers verified narinfo and misses;
//! `health`, `proven`, `forms` and `summaries` are what the book knows; `stats` counts;
//! `passthrough` lets a proven peer's NAR reach Nix while it is hashed. [`nar::NarDesk`] answers
//! NAR requests (one fetch per NAR, shared through `inflight`, which owns the tasks); this module
//! wires the parts together and answers HTTP; `error` decides every failure's status.
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

pub mod book;
pub mod breaker;
pub mod busy;
pub mod cache;
mod copy;
pub mod error;
pub mod fetch;
pub mod forms;
pub mod health;
mod inflight;
pub mod lookup;
pub mod nar;
pub mod partial;
pub mod passthrough;
pub mod proven;
pub mod source;
pub mod split;
pub mod spool;
pub mod stats;
pub mod summaries;
pub mod tail;
pub mod verified;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::beacon::{wire::NodeId, PeerTable};
use crate::cache_url::{self, CacheRoute, NarEncoding};
use crate::http::{self as h, Body};
use crate::narinfo::{Compression, NarInfo, StorePathHash, TrustedKeys};
use crate::settings::{PeerCompression, Settings};
use book::SourceBook;
use cache::NarinfoCache;
use fetch::FetchParts;
use lookup::Lookup;
use nar::NarDesk;
use source::{SourceError, SourceId, Sources};
use spool::SpoolLimits;
use stats::{Stats, StatsKeeper, StatusReport};
use summaries::{PeerSummaries, SummarySources};

/// Quoted by docs/ARCHITECTURE.md (checked in `architecture_tests`).
#[cfg(test)]
pub(crate) use copy::{PASS_READS, PASS_READS_MIN_BYTES, READS};
pub use error::ProxyError;
pub use source::ClientError;
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
    /// NARs being fetched, offered to peers by this host's store server while they arrive
    /// (`partial`; none: not offered).
    pub partials: Option<Arc<partial::Partials>>,
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
            partials: None,
        }
    }
}

pub struct Proxy {
    /// Which sources to ask and how each did: the one owner of source selection.
    book: Arc<SourceBook>,
    /// Verified narinfo and recent misses.
    cache: Arc<NarinfoCache>,
    stats: Arc<StatsKeeper>,
    /// `/nix-cache-info`, rendered once.
    cache_info: Bytes,
    /// Answers NAR requests (one fetch per NAR, shared).
    nars: NarDesk,
}

impl Proxy {
    /// The proxy over `peers` (none without a beacon); an error when its HTTP clients cannot be
    /// built with their policies.
    pub fn new(cfg: ProxyConfig, peers: Option<Arc<PeerTable>>) -> Result<Arc<Self>, ClientError> {
        let stats = Arc::new(StatsKeeper::default());
        let book = Arc::new(SourceBook::new(
            Sources::new(
                peers,
                cfg.upstreams,
                cfg.store_dir.clone(),
                cfg.keys,
                cfg.loopback_peers,
            )?,
            forms::PeerForms::new(cfg.peer_compression, cfg.peer_zstd_min_bytes),
            proven::ProvenPeers::load(cfg.state_dir.as_deref()),
            cfg.pass_through,
            stats.clone(),
        ));
        let cache = Arc::new(NarinfoCache::default());
        let parts = Arc::new(FetchParts {
            book: book.clone(),
            cache: cache.clone(),
            stats: stats.clone(),
            spool: cfg.spool,
            parallel_min_bytes: cfg.parallel_min_bytes,
            partials: cfg.partials,
        });
        Ok(Arc::new(Self {
            book,
            cache,
            stats,
            cache_info: Bytes::from(format!(
                "StoreDir: {}\nWantMassQuery: 1\nPriority: {PRIORITY}\n",
                cfg.store_dir
            )),
            nars: NarDesk::new(parts, cfg.delivered),
        }))
    }

    pub fn stats(&self) -> Stats {
        self.stats.get()
    }

    /// Everything the status page, `/metrics` and `status` show.
    pub fn status(&self) -> StatusReport {
        StatusReport {
            peers: self.book.peer_reports(),
            stats: self.stats.get(),
            recent: self.stats.recent(),
            beacon: self.book.table().map(|t| t.counters()),
            upstreams: self.book.upstream_reports(),
            interfaces: Vec::new(),
            seeds: Vec::new(),
            diagnosis: Vec::new(),
            summary_bytes: self.book.summaries().bytes() as u64,
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
        let lookup = Lookup {
            book: &self.book,
            stats: &self.stats,
        };
        let Some(c) = lookup.race(hash).await else {
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
            } => self.nars.answer(req, &hash, &nar_hash).await,
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

/// The summaries' loop runs over the proxy's book (`summaries`).
impl SummarySources for Proxy {
    fn held(&self) -> &PeerSummaries {
        self.book.summaries()
    }

    fn table(&self) -> Option<&Arc<PeerTable>> {
        self.book.table()
    }

    fn usable(&self, node: &NodeId) -> bool {
        self.book.usable(node)
    }

    async fn fetch(&self, node: &NodeId, since: Option<u64>) -> Result<Bytes, SourceError> {
        let r = self.book.sources().summary(node, since).await;
        self.book.heard_summary(node, &r);
        r
    }
}
