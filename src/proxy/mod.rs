//! The proxy: the local Nix's substituter (`http://127.0.0.1:8381`).
//!
//! For a narinfo it races the live peers of the beacon's table (bounded fan-out) and, hedged after
//! a short delay, the upstream caches; the first answer that parses, names exactly the requested
//! path and carries a trusted signature wins, and the rest are cancelled. It hands Nix a narinfo
//! whose URL is self-describing (`nar/<hash>-<narhash>.nar`, `Compression: none`), so the URL
//! keeps working after a restart or after the winning peer left: it is resolved afresh from any
//! source that has those bytes. A NAR is fetched (decompressed on the fly, resumed from another
//! source with `Range` when one fails mid-way) into a bounded spool and served only after its
//! size and hash match the signed narinfo.
//!
//! Invariants: Nix never receives a byte of a NAR before the whole NAR verified; every miss or
//! failure is a fast 404, never a 5xx (Nix fails a build after retrying a 5xx); a source that
//! errs, stalls or lies is backed off; every cache, fan-out and spool is capped.

pub mod source;
pub mod spool;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use crate::http::{self as h, Body};
use crate::narinfo::{NarHash, NarInfo, StorePathHash};
use crate::server::{index::nar_url, route, Route};
use source::{Candidate, SourceError, SourceId, Sources};
use spool::{PositionalSpool, Spool, SpoolLimits, Verified};

/// Priority in our `/nix-cache-info`: before cache.nixos.org (40) and a peer's store server (30).
pub const PRIORITY: u32 = 20;
/// Most peers asked for one narinfo.
pub const MAX_FANOUT: usize = 16;
/// Upstreams are asked this long after the peers, unless every peer already answered.
pub const HEDGE_DELAY: Duration = Duration::from_millis(150);
/// How long a miss is remembered.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// How long a verified narinfo and its sources are remembered.
pub const POSITIVE_TTL: Duration = Duration::from_secs(3600);
/// Entries in each of the narinfo caches.
pub const MAX_CACHE_ENTRIES: usize = 20_000;
/// An upstream that could not be reached is skipped for this long (offline: fast misses).
pub const UPSTREAM_DOWN_FOR: Duration = Duration::from_secs(30);
/// When looking for every source of a NAR, wait this long after the first one answered.
const GATHER_GRACE: Duration = Duration::from_millis(300);
/// Bytes read from a source per chunk.
const READ_CHUNK: usize = 256 * 1024;
/// NAR chunks buffered towards Nix.
const OUT_CHANNEL_CHUNKS: usize = 4;
/// Transfers listed on the status page.
const RECENT_TRANSFERS: usize = 20;

/// One NAR request, for the status page.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Transfer {
    pub path: String,
    pub source: String,
    pub bytes: u64,
    pub ms: u64,
    pub verdict: &'static str,
}

/// Settings of the proxy, validated.
pub struct ProxyConfig {
    pub store_dir: String,
    pub keys: crate::narinfo::TrustedKeys,
    pub upstreams: Vec<url::Url>,
    pub spool: SpoolLimits,
    /// Ask peers that announce `nar-zstd` for zstd-compressed NARs.
    pub peer_zstd: bool,
    /// A NAR at least this large is fetched in segments from several peers at once, when
    /// several have it.
    pub parallel_min_bytes: u64,
}

/// Default for [`ProxyConfig::parallel_min_bytes`].
pub const PARALLEL_MIN_BYTES: u64 = 64 * 1024 * 1024;
/// Most peers one NAR is split between.
const MAX_PARALLEL_SOURCES: usize = 4;
/// Segment bytes written to the spool at a time.
const SEGMENT_BLOCK: usize = 1024 * 1024;

struct Known {
    /// The verified narinfo as the winning source sent it (shared with its candidate).
    info: Arc<NarInfo>,
    /// Sources known to have this NAR (the winner first).
    candidates: Vec<Candidate>,
    at: Instant,
}

/// Counters for the status page and logs.
#[derive(Default, Debug, Clone, serde::Serialize)]
pub struct Stats {
    pub narinfo_hits_peer: u64,
    pub narinfo_hits_upstream: u64,
    pub narinfo_misses: u64,
    pub nars_from_peers: u64,
    pub nars_from_upstream: u64,
    pub bytes_from_peers: u64,
    pub bytes_from_upstream: u64,
    pub nar_failures: u64,
    pub lies: u64,
    /// NARs that crossed the LAN zstd-compressed.
    pub nars_zstd_from_peers: u64,
    /// NARs fetched in segments from several peers at once.
    pub nars_split: u64,
}

pub struct Proxy {
    sources: Sources,
    cache_info: Bytes,
    spool: SpoolLimits,
    known: Mutex<HashMap<StorePathHash, Known>>,
    missing: Mutex<HashMap<StorePathHash, Instant>>,
    /// Per upstream: skipped until this instant after a connection failure.
    upstream_down: Mutex<Vec<Option<Instant>>>,
    stats: Mutex<Stats>,
    /// See [`ProxyConfig::parallel_min_bytes`].
    parallel_min_bytes: u64,
    /// The last [`RECENT_TRANSFERS`] NAR requests.
    recent: Mutex<std::collections::VecDeque<Transfer>>,
    /// NAR fetches under way, by NAR hash: concurrent requests for the same NAR (Nix retrying, two
    /// clients) share one fetch and one spool. Bounded by the open connections.
    inflight: Mutex<HashMap<NarHash, Arc<tokio::sync::OnceCell<Option<Fetched>>>>>,
}

/// A verified NAR with the narinfo it was checked against and where it came from.
type Fetched = (Verified, Arc<NarInfo>, SourceId);

type SourceFuture<'a> = Pin<Box<dyn Future<Output = (SourceId, Result<Option<Candidate>, SourceError>)> + Send + 'a>>;

impl Proxy {
    pub fn new(cfg: ProxyConfig, peers: Option<Arc<crate::beacon::PeerTable>>) -> Self {
        let n = cfg.upstreams.len();
        Self {
            cache_info: Bytes::from(format!(
                "StoreDir: {}\nWantMassQuery: 1\nPriority: {PRIORITY}\n",
                cfg.store_dir
            )),
            sources: Sources::new(peers, cfg.upstreams, cfg.store_dir, cfg.keys).with_peer_zstd(cfg.peer_zstd),
            spool: cfg.spool,
            parallel_min_bytes: cfg.parallel_min_bytes,
            known: Mutex::new(HashMap::new()),
            missing: Mutex::new(HashMap::new()),
            upstream_down: Mutex::new(vec![None; n]),
            stats: Mutex::new(Stats::default()),
            recent: Mutex::new(std::collections::VecDeque::new()),
            inflight: Mutex::new(HashMap::new()),
        }
    }

    /// [`Self::fetch_verified`], shared by concurrent requests for the same NAR. If the request
    /// doing the fetch goes away, a waiting one takes over.
    async fn fetch_shared(&self, hash: &StorePathHash, nar_hash: &NarHash) -> Option<Fetched> {
        let cell = self
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(*nar_hash)
            .or_insert_with(|| Arc::new(tokio::sync::OnceCell::new()))
            .clone();
        let r = cell.get_or_init(|| self.fetch_verified(hash, nar_hash)).await.clone();
        let mut m = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if m.get(nar_hash).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            m.remove(nar_hash);
        }
        r
    }

    fn record(&self, t: Transfer) {
        let mut r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if r.len() >= RECENT_TRANSFERS {
            r.pop_back();
        }
        r.push_front(t);
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

    /// Peers (with health) and counters, as JSON, for `GET /status.json`.
    pub fn status_json(&self) -> serde_json::Value {
        let now = Instant::now();
        let peers: Vec<serde_json::Value> = self
            .sources
            .table()
            .map(|t| t.peers().iter().map(|p| crate::peers::peer_json(p, now)).collect())
            .unwrap_or_default();
        let counters = self.sources.table().map(|t| t.counters());
        let recent: Vec<Transfer> = self
            .recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        serde_json::json!({
            "peers": peers,
            "stats": self.stats(),
            "recent": recent,
            "beacon": counters,
            "upstreams": self.sources.upstreams.iter().map(|u| u.to_string()).collect::<Vec<_>>(),
        })
    }

    pub fn stats(&self) -> Stats {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn stat(&self, f: impl FnOnce(&mut Stats)) {
        f(&mut self.stats.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Live, not backed-off peers, at most [`MAX_FANOUT`]: fewest recent failures first, then
    /// fastest (a peer never measured counts as fast, so newcomers get asked).
    fn pick_peers(&self) -> Vec<SourceId> {
        let Some(t) = self.sources.table() else {
            return Vec::new();
        };
        let now = Instant::now();
        let mut peers: Vec<_> = t.peers().into_iter().filter(|p| !p.backed_off(now)).collect();
        peers.sort_by(|a, b| {
            let key = |p: &crate::beacon::Peer| (p.health.consecutive_failures, p.health.latency_ms.unwrap_or(0.0));
            let (ka, kb) = (key(a), key(b));
            ka.0.cmp(&kb.0).then(ka.1.total_cmp(&kb.1))
        });
        peers.truncate(MAX_FANOUT);
        peers.into_iter().map(|p| SourceId::Peer(p.node)).collect()
    }

    fn live_upstreams(&self) -> Vec<SourceId> {
        let now = Instant::now();
        let down = self.upstream_down.lock().unwrap_or_else(|p| p.into_inner());
        (0..self.sources.upstreams.len())
            .filter(|i| down.get(*i).copied().flatten().is_none_or(|t| t <= now))
            .map(SourceId::Upstream)
            .collect()
    }

    /// Records how a source did: backs off peers that failed or lied, marks unreachable upstreams.
    fn judge(&self, s: &SourceId, r: Result<(), &SourceError>) {
        let now = Instant::now();
        match (s, r) {
            (SourceId::Peer(n), Ok(())) => {
                if let Some(t) = self.sources.table() {
                    t.report_success(n);
                }
            }
            (SourceId::Peer(n), Err(e)) => {
                if let Some(t) = self.sources.table() {
                    t.report_failure(n, now);
                    if e.is_lie() {
                        // A lie costs more than a failure: back off as after several failures.
                        t.report_failure(n, now);
                        t.report_failure(n, now);
                    }
                }
                if e.is_lie() {
                    self.stat(|s| s.lies += 1);
                }
            }
            (SourceId::Upstream(i), Err(e)) if e.is_unreachable() => {
                if let Some(slot) = self.upstream_down.lock().unwrap_or_else(|p| p.into_inner()).get_mut(*i) {
                    *slot = Some(now + UPSTREAM_DOWN_FOR);
                }
            }
            (SourceId::Upstream(_), _) => {}
        }
    }

    fn ask<'a>(&'a self, s: SourceId, hash: &'a StorePathHash) -> SourceFuture<'a> {
        Box::pin(async move {
            let t0 = Instant::now();
            let r = self.sources.narinfo(&s, hash).await;
            if let (SourceId::Peer(n), Ok(_), Some(t)) = (&s, &r, self.sources.table()) {
                t.report_latency(n, t0.elapsed());
            }
            (s, r)
        })
    }

    /// Races the sources for the narinfo of `hash`; the first verified answer wins.
    async fn race(&self, hash: &StorePathHash) -> Option<Candidate> {
        let peers = self.pick_peers();
        let mut pending: FuturesUnordered<SourceFuture<'_>> = peers.into_iter().map(|p| self.ask(p, hash)).collect();
        let mut upstreams_started = false;
        let hedge = tokio::time::sleep(if pending.is_empty() {
            Duration::ZERO
        } else {
            HEDGE_DELAY
        });
        tokio::pin!(hedge);
        loop {
            if pending.is_empty() && upstreams_started {
                return None;
            }
            tokio::select! {
                Some((s, r)) = pending.next(), if !pending.is_empty() => {
                    match r {
                        // A good narinfo does not clear a peer's failures: only a verified
                        // NAR does (a peer may answer narinfo honestly and lie in NARs).
                        Ok(Some(c)) => return Some(c),
                        Ok(None) => {}
                        Err(e) => {
                            tracing::debug!(source = ?s, %hash, error = %e, "narinfo source failed");
                            self.judge(&s, Err(&e));
                        }
                    }
                    if pending.is_empty() && !upstreams_started {
                        upstreams_started = true;
                        pending.extend(self.live_upstreams().into_iter().map(|u| self.ask(u, hash)));
                    }
                }
                _ = &mut hedge, if !upstreams_started => {
                    upstreams_started = true;
                    pending.extend(self.live_upstreams().into_iter().map(|u| self.ask(u, hash)));
                }
            }
        }
    }

    /// Every source that has the NAR `nar_hash` of `hash` (peers first), excluding `skip`.
    async fn gather(&self, hash: &StorePathHash, nar_hash: &NarHash, skip: &HashSet<SourceId>) -> Vec<Candidate> {
        let mut all: Vec<SourceId> = self.pick_peers();
        all.extend(self.live_upstreams());
        let mut pending: FuturesUnordered<SourceFuture<'_>> = all
            .into_iter()
            .filter(|s| !skip.contains(s))
            .map(|s| self.ask(s, hash))
            .collect();
        let mut found = Vec::new();
        let mut deadline: Option<Instant> = None;
        while !pending.is_empty() {
            let grace = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some((s, r)) = pending.next() => match r {
                    Ok(Some(c)) if c.info.nar_hash == *nar_hash => {
                        found.push(c);
                        deadline.get_or_insert(Instant::now() + GATHER_GRACE);
                    }
                    Ok(_) => {}
                    Err(e) => self.judge(&s, Err(&e)),
                },
                _ = grace => break,
            }
        }
        found.sort_by_key(|c| matches!(c.source, SourceId::Upstream(_)));
        found
    }

    fn remember(&self, hash: StorePathHash, c: Candidate) {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if known.len() >= MAX_CACHE_ENTRIES {
            known.retain(|_, k| now.duration_since(k.at) < POSITIVE_TTL);
            if known.len() >= MAX_CACHE_ENTRIES {
                if let Some(k) = known.keys().next().copied() {
                    known.remove(&k);
                }
            }
        }
        let entry = known.entry(hash).or_insert_with(|| Known {
            info: c.info.clone(),
            candidates: Vec::new(),
            at: now,
        });
        if entry.info.nar_hash != c.info.nar_hash {
            *entry = Known {
                info: c.info.clone(),
                candidates: Vec::new(),
                at: now,
            };
        }
        entry.at = now;
        if !entry.candidates.iter().any(|k| k.source == c.source) {
            entry.candidates.push(c);
        }
    }

    fn known(&self, hash: &StorePathHash) -> Option<(Arc<NarInfo>, Vec<Candidate>)> {
        let known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let k = known.get(hash)?;
        (Instant::now().duration_since(k.at) < POSITIVE_TTL).then(|| (k.info.clone(), k.candidates.clone()))
    }

    fn is_missing(&self, hash: &StorePathHash) -> bool {
        let mut m = self.missing.lock().unwrap_or_else(|p| p.into_inner());
        match m.get(hash) {
            Some(t) if *t > Instant::now() => true,
            Some(_) => {
                m.remove(hash);
                false
            }
            None => false,
        }
    }

    fn remember_missing(&self, hash: StorePathHash) {
        let mut m = self.missing.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if m.len() >= MAX_CACHE_ENTRIES {
            m.retain(|_, t| *t > now);
            if m.len() >= MAX_CACHE_ENTRIES {
                m.clear();
            }
        }
        m.insert(hash, now + NEGATIVE_TTL);
    }

    /// The narinfo we give Nix: the winner's, pointing at our self-describing NAR URL.
    fn rewrite(info: &NarInfo) -> Bytes {
        let mut out = info.clone();
        out.url = nar_url(&info.store_path.hash(), &info.nar_hash);
        out.compression = Some("none".into());
        out.file_hash = None;
        out.file_size = None;
        Bytes::from(out.render())
    }

    async fn narinfo(&self, hash: &StorePathHash) -> Response<Body> {
        let t0 = Instant::now();
        if let Some((info, _)) = self.known(hash) {
            return h::ok(Self::rewrite(&info), "text/x-nix-narinfo");
        }
        if self.is_missing(hash) {
            return h::not_found();
        }
        match self.race(hash).await {
            Some(c) => {
                let source = c.source.clone();
                self.stat(|s| match source {
                    SourceId::Peer(_) => s.narinfo_hits_peer += 1,
                    SourceId::Upstream(_) => s.narinfo_hits_upstream += 1,
                });
                let body = Self::rewrite(&c.info);
                tracing::info!(path = %c.info.store_path, source = ?source, ms = t0.elapsed().as_millis() as u64, verdict = "hit", "narinfo");
                self.remember(*hash, c);
                h::ok(body, "text/x-nix-narinfo")
            }
            None => {
                self.stat(|s| s.narinfo_misses += 1);
                tracing::info!(%hash, ms = t0.elapsed().as_millis() as u64, verdict = "miss", "narinfo");
                self.remember_missing(*hash);
                h::not_found()
            }
        }
    }

    /// Fetches and verifies the NAR `nar_hash` of `hash` from the first source that delivers it.
    async fn fetch_verified(&self, hash: &StorePathHash, nar_hash: &NarHash) -> Option<Fetched> {
        let (mut info, mut queue) = match self.known(hash) {
            Some((info, cands)) if info.nar_hash == *nar_hash => (Some(info), cands),
            _ => (None, Vec::new()),
        };
        // Cached sources may have left the table (or be backed off) since.
        let now = Instant::now();
        queue.retain(|c| match &c.source {
            SourceId::Peer(n) => self
                .sources
                .table()
                .and_then(|t| t.get(n))
                .is_some_and(|p| !p.backed_off(now)),
            SourceId::Upstream(_) => true,
        });
        let mut tried: HashSet<SourceId> = HashSet::new();
        let mut gathered = false;
        // A large NAR (or one we know nothing of): find every source, to split it between peers.
        let peers_known = queue.iter().filter(|c| matches!(c.source, SourceId::Peer(_))).count();
        if info.as_ref().is_none_or(|i| i.nar_size >= self.parallel_min_bytes) && peers_known < 2 {
            gathered = true;
            for c in self.gather(hash, nar_hash, &tried).await {
                self.remember(*hash, c.clone());
                if !queue.iter().any(|q| q.source == c.source) {
                    queue.push(c);
                }
            }
            if info.is_none() {
                info = queue.first().map(|c| c.info.clone());
            }
        }
        if let Some(i) = info.clone().filter(|i| i.nar_size >= self.parallel_min_bytes) {
            let peers: Vec<Candidate> = queue
                .iter()
                .filter(|c| matches!(c.source, SourceId::Peer(_)))
                .take(MAX_PARALLEL_SOURCES)
                .cloned()
                .collect();
            if peers.len() >= 2 {
                if let Some(v) = self.fetch_parallel(&peers, i.nar_size, nar_hash).await {
                    return Some((v, i, peers[0].source.clone()));
                }
            }
        }
        let mut spool: Option<Spool> = None;
        // Who contributed the bytes now in the spool.
        let mut contributors: Vec<SourceId> = Vec::new();
        let mut allow_resume = true;
        loop {
            if queue.is_empty() {
                if gathered {
                    return None;
                }
                gathered = true;
                queue = self.gather(hash, nar_hash, &tried).await;
                if queue.is_empty() {
                    return None;
                }
                info.get_or_insert_with(|| queue[0].info.clone());
                for c in &queue {
                    self.remember(*hash, c.clone());
                }
            }
            let c = queue.remove(0);
            if !tried.insert(c.source.clone()) {
                continue;
            }
            let size = c.info.nar_size;
            if spool.as_ref().is_none() {
                match Spool::new(&self.spool, size).await {
                    Ok(s) => spool = Some(s),
                    Err(e) => {
                        tracing::warn!(%hash, error = %e, "cannot spool NAR");
                        return None;
                    }
                }
            }
            let sp = spool.as_mut()?;
            if !(sp.is_empty() || allow_resume && c.resumable()) {
                let _ = sp.reset();
                contributors.clear();
            }
            match self.copy_into(&c, sp, size).await {
                Ok(()) => {}
                Err(CopyError::Lie(e)) => {
                    tracing::warn!(source = ?c.source, %hash, error = %e, "source sent bad NAR bytes");
                    self.judge(&c.source, Err(&SourceError::Untrusted));
                    let _ = sp.reset();
                    contributors.clear();
                    continue;
                }
                Err(CopyError::Failed(e)) => {
                    tracing::info!(source = ?c.source, %hash, got = sp.len(), error = %e, "NAR source failed; trying the next");
                    self.judge(&c.source, Err(&e));
                    if !sp.is_empty() {
                        contributors.push(c.source.clone());
                    }
                    continue;
                }
            }
            contributors.push(c.source.clone());
            let full = spool.take()?;
            match full.verify(nar_hash).await {
                Ok(v) => {
                    // Only the source that completed the NAR earns credit; one that failed
                    // mid-way keeps its back-off even though its bytes were right.
                    self.judge(&c.source, Ok(()));
                    return Some((v, info.unwrap_or_else(|| c.info.clone()), c.source));
                }
                Err(mut back) => {
                    self.stat(|s| s.lies += 1);
                    if contributors.len() == 1 {
                        tracing::warn!(source = ?c.source, %hash, "NAR hash mismatch; source backed off");
                        self.judge(&c.source, Err(&SourceError::Untrusted));
                    } else {
                        // Several sources contributed: cannot tell which lied. Start over, one
                        // source per attempt, so the next mismatch is attributable.
                        tracing::warn!(?contributors, %hash, "NAR hash mismatch across sources; refetching whole");
                        allow_resume = false;
                        tried.retain(|s| !contributors.contains(s) || *s == c.source);
                        for s in contributors.iter().filter(|s| **s != c.source) {
                            if let Some(k) = self
                                .known(hash)
                                .and_then(|(_, ks)| ks.into_iter().find(|k| k.source == *s))
                            {
                                queue.push(k);
                            }
                        }
                    }
                    let _ = back.reset();
                    contributors.clear();
                    spool = Some(*back);
                }
            }
        }
    }

    /// Fetches a large NAR in equal segments from several peers at once, written at their
    /// offsets, then hashes it whole. `None` when a segment failed or the whole does not match
    /// (the caller then fetches from one source at a time, where a lie can be attributed).
    async fn fetch_parallel(&self, peers: &[Candidate], size: u64, nar_hash: &NarHash) -> Option<Verified> {
        let spool = match PositionalSpool::new(&self.spool, size).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot spool NAR for a split fetch");
                return None;
            }
        };
        let k = peers.len() as u64;
        let results = futures_util::future::join_all(peers.iter().enumerate().map(|(i, c)| {
            let (start, end) = (size * i as u64 / k, size * (i as u64 + 1) / k - 1);
            self.copy_segment(c, &spool, start, end)
        }))
        .await;
        let mut all_ok = true;
        for (c, r) in peers.iter().zip(&results) {
            if let Err(e) = r {
                tracing::info!(source = ?c.source, error = %e, "NAR segment failed; fetching whole instead");
                self.judge(&c.source, Err(e));
                all_ok = false;
            }
        }
        if !all_ok {
            return None;
        }
        match spool.verify(nar_hash).await {
            Some(v) => {
                for c in peers {
                    self.judge(&c.source, Ok(()));
                }
                self.stat(|s| s.nars_split += 1);
                Some(v)
            }
            None => {
                self.stat(|s| s.lies += 1);
                tracing::warn!("NAR segments from several peers do not match the signed hash; refetching whole");
                None
            }
        }
    }

    /// Copies bytes `start..=end` of a peer's NAR to their place in `spool`.
    async fn copy_segment(
        &self,
        c: &Candidate,
        spool: &PositionalSpool,
        start: u64,
        end: u64,
    ) -> Result<(), SourceError> {
        let mut reader = self.sources.open_range(c, start, end).await?;
        let idle = self.sources.timeouts(&c.source).idle;
        let want = end + 1 - start;
        let (mut pos, mut buf) = (start, BytesMut::with_capacity(SEGMENT_BLOCK));
        loop {
            let n = match tokio::time::timeout(idle, reader.read_buf(&mut buf)).await {
                Err(_) => return Err(SourceError::Timeout),
                Ok(r) => r.map_err(|e| SourceError::Url(format!("read: {e}")))?,
            };
            if pos + buf.len() as u64 > end + 1 {
                return Err(SourceError::Overrun(want));
            }
            if n == 0 || buf.len() >= SEGMENT_BLOCK {
                let block = buf.split().freeze();
                let len = block.len() as u64;
                if len > 0 {
                    spool
                        .write_at(pos, block)
                        .await
                        .map_err(|e| SourceError::Url(e.to_string()))?;
                    pos += len;
                    self.stat(|s| s.bytes_from_peers += len);
                }
                buf.reserve(SEGMENT_BLOCK);
            }
            if n == 0 {
                break;
            }
        }
        if pos != end + 1 {
            return Err(SourceError::Short { got: pos - start, want });
        }
        Ok(())
    }

    /// Copies the NAR of `c` into the spool from where it stands (resuming with `Range`).
    async fn copy_into(&self, c: &Candidate, sp: &mut Spool, size: u64) -> Result<(), CopyError> {
        let from = sp.len();
        let (mut reader, start) = self.sources.open_nar(c, from).await.map_err(CopyError::Failed)?;
        let idle = self.sources.timeouts(&c.source).idle;
        // A source that ignored the range starts at 0: skip what we have.
        // `start` is `from` (the range was honoured) or 0 (it was ignored): skip what we have.
        let mut skip = from - start;
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let mut received = 0u64;
        loop {
            buf.clear();
            let n = match tokio::time::timeout(idle, reader.read_buf(&mut buf)).await {
                Err(_) => return Err(CopyError::Failed(SourceError::Timeout)),
                Ok(Err(e)) => {
                    // A corrupt compressed stream is a lie, a broken connection a failure.
                    return Err(if e.kind() == std::io::ErrorKind::InvalidData {
                        CopyError::Lie(format!("bad compressed data: {e}"))
                    } else {
                        CopyError::Failed(SourceError::Url(format!("read: {e}")))
                    });
                }
                Ok(Ok(n)) => n,
            };
            if n == 0 {
                break;
            }
            let mut data = &buf[..n];
            if skip > 0 {
                let k = (skip as usize).min(data.len());
                data = &data[k..];
                skip -= k as u64;
            }
            if data.is_empty() {
                continue;
            }
            if sp.len() + data.len() as u64 > size {
                return Err(CopyError::Lie(format!("more than the signed NarSize {size}")));
            }
            sp.write(data)
                .await
                .map_err(|e| CopyError::Failed(SourceError::Url(e.to_string())))?;
            received += data.len() as u64;
        }
        let zstd = c.info.compression.as_deref() == Some("zstd");
        self.stat(|s| match c.source {
            SourceId::Peer(_) => {
                s.bytes_from_peers += received;
                s.nars_zstd_from_peers += u64::from(zstd);
            }
            SourceId::Upstream(_) => s.bytes_from_upstream += received,
        });
        if sp.len() < size {
            return Err(CopyError::Failed(SourceError::Url(format!(
                "ended at {} of {size} bytes",
                sp.len()
            ))));
        }
        Ok(())
    }

    /// HEAD of a NAR: answered from what the narinfo says (its size, whether a source has it),
    /// without downloading the NAR, which matters on a metered link.
    async fn nar_head(&self, req: &Request<Incoming>, hash: &StorePathHash, nar_hash: &NarHash) -> Response<Body> {
        let size = match self.known(hash) {
            Some((info, cands)) if info.nar_hash == *nar_hash && !cands.is_empty() => info.nar_size,
            _ => match self.gather(hash, nar_hash, &HashSet::new()).await.first() {
                Some(c) => c.info.nar_size,
                None => return h::not_found(),
            },
        };
        match h::parse_range(req.headers().get(header::RANGE), size) {
            Ok(r) => {
                let (start, end) = r.map_or((0, size.saturating_sub(1)), |r| (r.start, r.end));
                h::nar_response(Body::empty(), size, start, end, r.is_some())
            }
            Err(h::Unsatisfiable) => h::range_not_satisfiable(size),
        }
    }

    async fn nar(&self, req: &Request<Incoming>, hash: &StorePathHash, nar_hash: &NarHash) -> Response<Body> {
        if req.method() == Method::HEAD {
            return self.nar_head(req, hash, nar_hash).await;
        }
        let t0 = Instant::now();
        let Some((v, info, source)) = self.fetch_shared(hash, nar_hash).await else {
            self.stat(|s| s.nar_failures += 1);
            self.record(Transfer {
                path: hash.to_string(),
                source: String::new(),
                bytes: 0,
                ms: t0.elapsed().as_millis() as u64,
                verdict: "unavailable",
            });
            tracing::info!(%hash, ms = t0.elapsed().as_millis() as u64, verdict = "unavailable", "NAR");
            return h::not_found();
        };
        self.stat(|s| match source {
            SourceId::Peer(_) => s.nars_from_peers += 1,
            SourceId::Upstream(_) => s.nars_from_upstream += 1,
        });
        tracing::info!(path = %info.store_path, source = ?source, bytes = v.len(), ms = t0.elapsed().as_millis() as u64, verdict = "verified", "NAR");
        self.record(Transfer {
            path: info.store_path.to_string(),
            source: self.describe(&source),
            bytes: v.len(),
            ms: t0.elapsed().as_millis() as u64,
            verdict: "verified",
        });
        let size = v.len();
        let range = match h::parse_range(req.headers().get(header::RANGE), size) {
            Ok(r) => r,
            Err(h::Unsatisfiable) => return h::range_not_satisfiable(size),
        };
        let (start, end) = range.map_or((0, size.saturating_sub(1)), |r| (r.start, r.end));
        let body = if req.method() == Method::HEAD || size == 0 {
            Body::empty()
        } else {
            let (tx, rx) = tokio::sync::mpsc::channel(OUT_CHANNEL_CHUNKS);
            let (path, t1) = (info.store_path.to_string(), Instant::now());
            v.stream(start, end, tx, move |sent| {
                tracing::info!(%path, bytes = sent, ms = t1.elapsed().as_millis() as u64, "NAR delivered");
            });
            Body::Stream(rx)
        };
        h::nar_response(body, size, start, end, range.is_some())
    }
}

#[derive(Debug)]
enum CopyError {
    /// The source failed (network, timeout, early end): try another, keep what verified-length
    /// bytes we have for a resume.
    Failed(SourceError),
    /// The source sent something provably wrong: discard its bytes.
    Lie(String),
}

impl h::Handler for Proxy {
    async fn handle(&self, req: Request<Incoming>, _peer: SocketAddr) -> Response<Body> {
        let Some(head) = h::is_head(req.method()) else {
            return h::method_not_allowed();
        };
        let page = match req.uri().path() {
            "/status.json" => Some((self.status_json().to_string(), "application/json")),
            "/" => Some((crate::status::html(&self.status_json()), "text/html; charset=utf-8")),
            "/metrics" => Some((
                crate::status::metrics(&self.status_json()),
                "text/plain; version=0.0.4; charset=utf-8",
            )),
            _ => None,
        };
        let mut resp = match page {
            Some((body, content_type)) => h::ok(Bytes::from(body), content_type),
            None => match route(req.uri().path()) {
                Route::CacheInfo => h::ok(self.cache_info.clone(), "text/x-nix-cache-info"),
                Route::NarInfo(hash) => self.narinfo(&hash).await,
                Route::Nar {
                    hash,
                    nar_hash,
                    zstd: false,
                } => self.nar(&req, &hash, &nar_hash).await,
                // Nix never asks the proxy for compressed NARs; the installer is the store
                // server's (LAN-facing), the proxy is local only.
                Route::Nar { zstd: true, .. }
                | Route::NotFound
                | Route::Install
                | Route::InstallBinary
                | Route::InstallSource => h::not_found(),
                Route::BadRequest => h::text(StatusCode::BAD_REQUEST, "bad request\n"),
                Route::TooLong => h::text(StatusCode::URI_TOO_LONG, "request path too long\n"),
            },
        };
        if head {
            h::strip_for_head(&mut resp);
        }
        resp
    }
}
