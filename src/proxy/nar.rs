//! The NAR half of the proxy's handler: a whole NAR fetched once for every request that wants it
//! at the same time, answered once it verified, or passed through while it is hashed when it
//! comes from a proven peer (see `passthrough`); `HEAD` and `Range`; counts, log lines and the
//! transfer list.

use super::*;

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

impl Proxy {
    /// A verified NAR, fetched once for every request that wants it at the same time. If the
    /// request doing the fetch goes away, a waiting one takes over. A request that joined a
    /// pass-through whose spool did not keep the NAR's start (its body took it, see `spool`)
    /// joins or starts the next fetch, once.
    async fn fetch_shared(&self, hash: &StorePathHash, nar_hash: &NarHash) -> SharedFetch {
        let mut again = true;
        loop {
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

    pub(super) async fn nar(
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
        let size = v.len();
        let range = h::parse_range(req.headers().get(header::RANGE), size).map_err(|_| ProxyError::Range(size))?;
        let (start, end) = range.map_or((0, size.saturating_sub(1)), |r| (r.start, r.end));
        if start < v.kept_from() {
            // Twice joined a pass-through that kept only the NAR's end (rare): a miss.
            let e = Arc::new(FetchError::NoSource);
            self.nar_failed(hash, &e, t0, TransferVerdict::Unavailable, 0);
            return Err(ProxyError::NarUnavailable(e));
        }
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
}
