//! Finding who has a narinfo: the hedged race (first verified answer wins) and the gathering of
//! every source of one NAR (for a fetch, a resume or a split).
//!
//! Peers are asked first, at most [`MAX_FANOUT`] of them (fewest recent failures, then fastest;
//! a peer never measured counts as fast so newcomers get asked); the upstreams are asked
//! [`HEDGE_DELAY`] later, or at once when every peer has answered. A source's failure is judged
//! (back-off, upstream down) as it comes in.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::time::Instant;

use super::health::Verdict;
use super::source::{Candidate, SourceError, SourceId};
use super::Proxy;
use crate::narinfo::{NarHash, StorePathHash};

/// Most peers asked for one narinfo.
pub const MAX_FANOUT: usize = 16;
/// Upstreams are asked this long after the peers, unless every peer already answered.
pub const HEDGE_DELAY: Duration = Duration::from_millis(150);
/// When looking for every source of a NAR, wait this long after the first one answered.
const GATHER_GRACE: Duration = Duration::from_millis(300);

type Answer<'a> = Pin<Box<dyn Future<Output = (SourceId, Result<Option<Candidate>, SourceError>)> + Send + 'a>>;

impl Proxy {
    /// Live, not backed-off peers, at most [`MAX_FANOUT`], best first.
    pub(super) fn pick_peers(&self) -> Vec<SourceId> {
        let Some(t) = self.sources.table() else {
            return Vec::new();
        };
        let now = Instant::now();
        let mut peers: Vec<_> = t
            .peers()
            .into_iter()
            .map(|p| (p.node, self.health.peer(&p.node)))
            .filter(|(_, h)| !h.backed_off(now))
            .collect();
        peers.sort_by(|(_, a), (_, b)| {
            a.consecutive_failures
                .cmp(&b.consecutive_failures)
                .then(a.latency_ms.unwrap_or(0.0).total_cmp(&b.latency_ms.unwrap_or(0.0)))
        });
        peers.truncate(MAX_FANOUT);
        peers.into_iter().map(|(n, _)| SourceId::Peer(n)).collect()
    }

    /// Upstreams not marked unreachable.
    pub(super) fn live_upstreams(&self) -> Vec<SourceId> {
        let now = Instant::now();
        (0..self.sources.upstreams.len())
            .filter(|i| self.health.upstream_up(*i, now))
            .map(SourceId::Upstream)
            .collect()
    }

    /// Asks one source, timing peers for the fan-out order.
    fn ask<'a>(&'a self, s: SourceId, hash: &'a StorePathHash) -> Answer<'a> {
        Box::pin(async move {
            let t0 = Instant::now();
            let r = self.sources.narinfo(&s, hash).await;
            if let (SourceId::Peer(n), Ok(_)) = (&s, &r) {
                self.health.latency(n, t0.elapsed());
            }
            (s, r)
        })
    }

    /// Records a source's failure to answer.
    fn judge_answer(&self, s: &SourceId, hash: &StorePathHash, e: &SourceError) {
        tracing::debug!(source = ?s, %hash, error = %e, "narinfo source failed");
        self.judge(s, Verdict::Failed(e));
    }

    /// Races the sources for the narinfo of `hash`; the first verified answer wins.
    pub(super) async fn race(&self, hash: &StorePathHash) -> Option<Candidate> {
        let mut pending: FuturesUnordered<Answer<'_>> =
            self.pick_peers().into_iter().map(|p| self.ask(p, hash)).collect();
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
                        Err(e) => self.judge_answer(&s, hash, &e),
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

    /// Every source that has the NAR `nar_hash` of `hash` (peers first), excluding `skip`;
    /// waits [`GATHER_GRACE`] after the first for the others.
    pub(super) async fn gather(
        &self,
        hash: &StorePathHash,
        nar_hash: &NarHash,
        skip: &HashSet<SourceId>,
    ) -> Vec<Candidate> {
        let mut all: Vec<SourceId> = self.pick_peers();
        all.extend(self.live_upstreams());
        let mut pending: FuturesUnordered<Answer<'_>> = all
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
                    Err(e) => self.judge_answer(&s, hash, &e),
                },
                _ = grace => break,
            }
        }
        found.sort_by_key(|c| matches!(c.source, SourceId::Upstream(_)));
        found
    }
}
