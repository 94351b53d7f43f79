//! The NAR half of the proxy's handler ([`NarDesk`]): a whole NAR fetched once for every request
//! that wants it at the same time (`inflight`), answered once it verified, or passed through
//! while it is hashed when it comes from a proven peer (see `passthrough`); `HEAD` and `Range`;
//! counts, log lines and the transfer list ([`Ledger`]).

use std::sync::Arc;

use http::{header, Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::book::SourceBook;
use super::error::{CutReason, FetchError, ProxyError};
use super::fetch::{FetchParts, NarFetch};
use super::inflight::{FetchCell, Fetches, InFlight, SharedFetch};
use super::lookup::Lookup;
use super::passthrough;
use super::source::SourceId;
use super::stats::{StatsKeeper, Transfer, TransferFailure, TransferVerdict};
use crate::http::{self as h, Body};
use crate::narinfo::{NarHash, NarInfo, StorePath, StorePathHash};

/// Aborts a pass-through's fetch task when its request is gone (dropped with the body): as when
/// the request running a fetch goes away, a request waiting for the same NAR takes over, and
/// with none waiting the fetch stops.
struct AbortFetch {
    task: tokio::task::AbortHandle,
    fetches: Fetches,
    nar_hash: NarHash,
    cell: FetchCell,
}

impl Drop for AbortFetch {
    fn drop(&mut self) {
        if !self.task.is_finished() {
            self.task.abort();
            if !self.cell.initialized() {
                self.fetches.done(&self.nar_hash, &self.cell);
            }
        }
    }
}

/// Counts, logs and lists NAR requests, and tells the store server what reached Nix. Cheap to
/// clone (for the task that sends a pass-through's body).
#[derive(Clone)]
pub struct Ledger {
    pub stats: Arc<StatsKeeper>,
    /// To describe a source in the transfer list.
    pub book: Arc<SourceBook>,
    /// See `ProxyConfig::delivered`.
    pub delivered: Option<tokio::sync::mpsc::Sender<StorePath>>,
}

impl Ledger {
    /// Counts and logs a NAR that could not be delivered.
    fn failed(&self, hash: &StorePathHash, why: TransferFailure, t0: Instant, verdict: TransferVerdict, sent: u64) {
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
            reason: Some(why.clone()),
        });
        tracing::info!(%hash, ms, verdict = verdict.as_str(), reason = %why, "NAR");
    }

    /// Counts and lists a NAR delivered from `source`, `bytes` long.
    fn record_delivery(&self, info: &NarInfo, source: &SourceId, bytes: u64, ms: u64, verdict: TransferVerdict) {
        self.stats.update(|s| match source {
            SourceId::Peer(_) => s.nars_from_peers += 1,
            SourceId::Upstream(_) => s.nars_from_upstream += 1,
        });
        tracing::info!(path = %info.store_path, source = ?source, bytes, ms, verdict = verdict.as_str(), "NAR");
        self.stats.record(Transfer {
            path: info.store_path.to_string(),
            source: self.book.describe(source),
            bytes,
            ms,
            verdict,
            reason: None,
        });
    }

    /// Counts, records and logs a pass-through whose NAR verified (its tail is sent next).
    fn passed(&self, info: &NarInfo, source: &SourceId, t0: Instant) {
        let ms = t0.elapsed().as_millis() as u64;
        self.stats.update(|s| s.nars_passed_through += 1);
        self.record_delivery(info, source, info.nar_size, ms, TransferVerdict::PassedThrough);
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
                self.failed(hash, TransferFailure::Cut(why), t0, TransferVerdict::Cut, sent);
            }
            passthrough::Outcome::Left { sent } => {
                tracing::info!(%hash, sent, ms, "NAR client left during pass-through");
            }
        }
    }
}

/// Answers NAR requests: one fetch per NAR, shared; a pass-through's tasks owned by `inflight`.
pub struct NarDesk {
    /// What a fetch needs (shared with the fetch task of a pass-through).
    parts: Arc<FetchParts>,
    inflight: InFlight,
    ledger: Ledger,
}

impl NarDesk {
    pub fn new(parts: Arc<FetchParts>, delivered: Option<tokio::sync::mpsc::Sender<StorePath>>) -> Self {
        let ledger = Ledger {
            stats: parts.stats.clone(),
            book: parts.book.clone(),
            delivered,
        };
        Self {
            parts,
            inflight: InFlight::default(),
            ledger,
        }
    }

    /// A verified NAR, fetched once for every request that wants it at the same time. If the
    /// request doing the fetch goes away, a waiting one takes over. A request that joined a
    /// pass-through whose spool did not keep the NAR's start (its body took it, see `spool`)
    /// joins or starts the next fetch, once.
    async fn fetch_shared(&self, hash: &StorePathHash, nar_hash: &NarHash) -> SharedFetch {
        let fetches = self.inflight.fetches();
        let mut again = true;
        loop {
            let cell = fetches.join(nar_hash);
            let r = cell
                .get_or_init(|| async {
                    NarFetch::new(&self.parts, *hash, *nar_hash)
                        .run()
                        .await
                        .map_err(Arc::new)
                })
                .await
                .clone();
            fetches.done(nar_hash, &cell);
            match &r {
                Ok((v, ..)) if v.kept_from() > 0 && std::mem::take(&mut again) => {
                    tracing::debug!(%hash, "joined a pass-through that kept only the NAR's end; fetching again");
                }
                _ => return r,
            }
        }
    }

    /// HEAD of a NAR: answered from what the narinfo says (its size, whether a source has it),
    /// without downloading the NAR, which matters on a metered link.
    async fn head(
        &self,
        req: &Request<Incoming>,
        hash: &StorePathHash,
        nar_hash: &NarHash,
    ) -> Result<Response<Body>, ProxyError> {
        let size = match self.parts.cache.known(hash) {
            Some(k) if k.info.nar_hash == *nar_hash && !k.candidates.is_empty() => k.info.nar_size,
            _ => {
                let lookup = Lookup {
                    book: &self.parts.book,
                    stats: &self.parts.stats,
                };
                match lookup.gather(hash, nar_hash, &Default::default()).await.found.first() {
                    Some(c) => c.info.nar_size,
                    None => return Err(ProxyError::NarUnavailable(Arc::new(FetchError::NoSource))),
                }
            }
        };
        let range = h::parse_range(req.headers().get(header::RANGE), size).map_err(|_| ProxyError::Range(size))?;
        let (start, end) = range.map_or((0, size.saturating_sub(1)), |r| (r.start, r.end));
        Ok(h::nar_response(Body::empty(), size, start, end, range.is_some()))
    }

    /// Answers a request for the NAR `nar_hash` of `hash`.
    pub async fn answer(
        &self,
        req: &Request<Incoming>,
        hash: &StorePathHash,
        nar_hash: &NarHash,
    ) -> Result<Response<Body>, ProxyError> {
        if req.method() == http::Method::HEAD {
            return self.head(req, hash, nar_hash).await;
        }
        let t0 = Instant::now();
        // A whole NAR (no `Range`) whose fetch this request starts may pass through.
        if self.parts.book.pass_through() && !req.headers().contains_key(header::RANGE) {
            if let Some(r) = self.passing(req, hash, nar_hash, t0).await {
                return r;
            }
        }
        let r = self.fetch_shared(hash, nar_hash).await;
        self.verified(req, hash, r, t0)
    }

    /// The response for a NAR that verified before a byte of it is sent (or for its failure).
    fn verified(
        &self,
        req: &Request<Incoming>,
        hash: &StorePathHash,
        r: SharedFetch,
        t0: Instant,
    ) -> Result<Response<Body>, ProxyError> {
        let (v, info, source) = match r {
            Ok(f) => f,
            Err(e) => {
                let why = TransferFailure::Fetch(e.clone());
                self.ledger.failed(hash, why, t0, TransferVerdict::Unavailable, 0);
                return Err(ProxyError::NarUnavailable(e));
            }
        };
        let size = v.len();
        let range = h::parse_range(req.headers().get(header::RANGE), size).map_err(|_| ProxyError::Range(size))?;
        let (start, end) = range.map_or((0, size.saturating_sub(1)), |r| (r.start, r.end));
        if start < v.kept_from() {
            // Twice joined a pass-through that kept only the NAR's end (rare): a miss.
            let e = Arc::new(FetchError::NoSource);
            let why = TransferFailure::Fetch(e.clone());
            self.ledger.failed(hash, why, t0, TransferVerdict::Unavailable, 0);
            return Err(ProxyError::NarUnavailable(e));
        }
        let ms = t0.elapsed().as_millis() as u64;
        self.ledger
            .record_delivery(&info, &source, v.len(), ms, TransferVerdict::Verified);
        let (path, t1) = (info.store_path.clone(), Instant::now());
        let delivered = self.ledger.delivered.clone().filter(|_| end + 1 == size);
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
    /// The fetch runs in its own task (the response is returned before the NAR is complete),
    /// owned by `inflight`; the body is pulled by the connection (`passthrough::body`). The task
    /// is aborted when this request or its body goes away first, and a request waiting for the
    /// same NAR then takes over, as with any fetch.
    async fn passing(
        &self,
        req: &Request<Incoming>,
        hash: &StorePathHash,
        nar_hash: &NarHash,
        t0: Instant,
    ) -> Option<Result<Response<Body>, ProxyError>> {
        let fetches = self.inflight.fetches().clone();
        let cell = fetches.start(nar_hash)?;
        let (tap, mut end) = passthrough::Tap::new();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<SharedFetch>();
        let (hash, nar_hash) = (*hash, *nar_hash);
        let task = self.inflight.spawn({
            let (cell, parts, fetches) = (cell.clone(), self.parts.clone(), fetches.clone());
            async move {
                let r = cell
                    .get_or_init(|| async {
                        NarFetch::new(&parts, hash, nar_hash)
                            .with_tap(tap)
                            .run()
                            .await
                            .map_err(Arc::new)
                    })
                    .await
                    .clone();
                fetches.done(&nar_hash, &cell);
                let _ = done_tx.send(r);
            }
        });
        let guard = AbortFetch {
            task,
            fetches,
            nar_hash,
            cell,
        };
        let Some(first) = end.rx.recv().await else {
            // Nothing passed through: the fetch is over (or was never proven-sourced).
            drop(end);
            let r = done_rx.await.unwrap_or_else(|_| Err(Arc::new(FetchError::NoSource)));
            drop(guard);
            return Some(self.verified(req, &hash, r, t0));
        };
        let size = first.size;
        let ledger = self.ledger.clone();
        let done = async move {
            match done_rx.await {
                Ok(Ok((v, info, source))) => Ok((v, (info, source))),
                Ok(Err(e)) => Err(CutReason::Fetch(e)),
                Err(_) => Err(CutReason::FetchEnded),
            }
        };
        let verified = {
            let ledger = ledger.clone();
            move |(info, source): &(Arc<NarInfo>, SourceId)| ledger.passed(info, source, t0)
        };
        // The guard goes with the body: a body dropped early (the client left) aborts the fetch.
        let ended = move |outcome| {
            ledger.pass_done(&hash, outcome, t0);
            drop(guard);
        };
        let body = passthrough::body(first, end, done, verified, ended);
        tracing::debug!(%hash, size, "NAR passing through");
        let mut resp = h::nar_response(Body::Pull(body), size, 0, size.saturating_sub(1), false);
        // A cut body must not be resumed with `Range`: the bytes Nix already has might be the
        // liar's. Without `Accept-Ranges`, Nix fails the download instead.
        resp.headers_mut().remove(header::ACCEPT_RANGES);
        Some(Ok(resp))
    }
}
