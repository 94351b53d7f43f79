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

use rand::seq::SliceRandom;

use super::health::Verdict;
use super::source::{Candidate, SourceError, SourceId};
use super::summaries::Hint;
use super::Proxy;
use crate::narinfo::{NarHash, StorePathHash};

/// Most peers asked for one narinfo when summaries do not narrow it down.
pub const MAX_FANOUT: usize = 16;
/// Peers whose summary says "maybe" asked for one narinfo.
pub const MAYBE_FANOUT: usize = 3;
/// Peers with no current summary asked besides, when other peers publish summaries.
pub const UNKNOWN_SAMPLE: usize = 2;
/// Peers whose summary says "no", asked when gathering a NAR's sources (see `pick_peers`).
pub const NO_SAMPLE: usize = 4;
/// Upstreams are asked this long after the peers, unless every peer already answered.
pub const HEDGE_DELAY: Duration = Duration::from_millis(150);
/// A peer that could not be reached is asked once more after this long.
const PEER_RETRY_AFTER: Duration = Duration::from_millis(200);
/// When looking for every source of a NAR, wait this long after the first one answered.
const GATHER_GRACE: Duration = Duration::from_millis(300);

type Answer<'a> = Pin<Box<dyn Future<Output = (SourceId, Result<Option<Candidate>, SourceError>)> + Send + 'a>>;

impl Proxy {
    /// Whom to ask for `hash`, in two waves: first peers in good standing whose summary says
    /// "maybe" (at most [`MAYBE_FANOUT`], chosen at random so a crowd fetching one closure
    /// spreads over every host that has it), with a random sample of peers whose summary is
    /// unknown ([`UNKNOWN_SAMPLE`]; up to [`MAX_FANOUT`] when we hold no peer's current summary,
    /// whether none publishes one or none could be fetched yet); then, as a
    /// last resort, backed-off (demoted) peers that may have it. Peers whose current summary
    /// says "no" are not asked in a lookup. With `all` (gathering every source of a NAR a fetch
    /// needs), every candidate, and in the last wave also [`NO_SAMPLE`] peers whose summary says
    /// "no": a host may have gained the path since (built it, copied it) before its index did.
    pub(super) fn pick_peers(&self, hash: &StorePathHash, all: bool) -> (Vec<SourceId>, Vec<SourceId>) {
        let Some(t) = self.sources.table() else {
            return (Vec::new(), Vec::new());
        };
        let now = Instant::now();
        let key = crate::summary::key(hash);
        let mut rng = rand::thread_rng();
        // One node per address: two nodes cannot serve on one address, so while none of them
        // is confirmed only the oldest is asked (forged announces naming a victim's address
        // cost the victim one request, not one per forged node).
        let mut addrs = HashSet::new();
        let mut peers: Vec<_> = t
            .peers()
            .into_iter()
            .filter(|p| self.peer_usable(&p.node))
            .filter(|p| addrs.insert(p.http_addr()))
            .map(|p| {
                let health = self.health.peer(&p.node);
                let mut hint = self.summaries.hint(&p.node, p.summary, key);
                if hint == Hint::Maybe && health.summary_distrusted() {
                    hint = Hint::Unknown;
                }
                (p.node, health, hint)
            })
            .collect();
        // Summaries narrow the fan-out only once we hold some: peers that announce one we
        // could not fetch (yet) say nothing about where a path is.
        let any_summaries = peers.iter().any(|(_, _, hint)| *hint != Hint::Unknown);
        // Random order first, then the stable sort by health keeps ties random.
        peers.shuffle(&mut rng);
        peers.sort_by_key(|(_, h, _)| h.consecutive_failures);
        let ids = |v: Vec<(crate::beacon::wire::NodeId, _, Hint)>, n: usize| -> Vec<SourceId> {
            v.into_iter().take(n).map(|(n, _, _)| SourceId::Peer(n)).collect()
        };
        let (no, peers): (Vec<_>, Vec<_>) = peers.into_iter().partition(|(_, _, hint)| *hint == Hint::No);
        let (good, demoted): (Vec<_>, Vec<_>) = peers.into_iter().partition(|(_, h, _)| !h.backed_off(now));
        let (maybe, unknown): (Vec<_>, Vec<_>) = good.into_iter().partition(|(_, _, hint)| *hint == Hint::Maybe);
        let (maybe_n, unknown_n) = match (all, any_summaries) {
            (true, _) => (MAX_FANOUT, MAX_FANOUT),
            (false, true) => (MAYBE_FANOUT, UNKNOWN_SAMPLE),
            (false, false) => (0, MAX_FANOUT),
        };
        // Maybes beyond the first wave go first in the second one: peers that claim a path
        // they do not serve cannot keep its one honest holder from being asked.
        let (maybe, more_maybe) = maybe.split_at(maybe_n.min(maybe.len()));
        let mut first = ids(maybe.to_vec(), maybe_n);
        first.extend(ids(unknown, unknown_n));
        let mut last = ids(more_maybe.to_vec(), MAX_FANOUT);
        last.extend(ids(demoted, MAX_FANOUT));
        if all {
            last.extend(ids(no, NO_SAMPLE));
        }
        (first, last)
    }

    /// Upstreams not marked unreachable.
    pub(super) fn live_upstreams(&self) -> Vec<SourceId> {
        let now = Instant::now();
        (0..self.sources.upstreams.len())
            .filter(|i| self.health.upstream_up(*i, now))
            .map(SourceId::Upstream)
            .collect()
    }

    /// Asks one source, timing peers for the fan-out order and noting who answers at a peer's
    /// address.
    fn ask<'a>(&'a self, s: SourceId, hash: &'a StorePathHash) -> Answer<'a> {
        if matches!(s, SourceId::Peer(_)) {
            self.stats.update(|st| st.narinfo_peer_requests += 1);
        }
        Box::pin(async move {
            let t0 = Instant::now();
            let mut r = self.sources.narinfo(&s, hash).await;
            // A peer that could not be reached may be on a link that just came up (neighbour
            // discovery, a bridge port not yet forwarding): one more try, a moment later.
            if matches!((&s, &r), (SourceId::Peer(_), Err(e)) if e.is_unreachable()) {
                tokio::time::sleep(PEER_RETRY_AFTER).await;
                r = self.sources.narinfo(&s, hash).await;
            }
            if let SourceId::Peer(n) = &s {
                let addr = self.sources.table().and_then(|t| t.get(n)).map(|p| p.http_addr());
                match (&r, addr) {
                    (Ok(_), Some(a)) => {
                        self.health.latency(n, t0.elapsed());
                        self.health.addr_owner(a, Some(*n));
                        if let Some(t) = self.sources.table() {
                            t.answered(n, a, Instant::now());
                        }
                    }
                    (Err(SourceError::NotThePeer { found, .. }), Some(a)) => {
                        let owner = found.as_deref().and_then(|n| n.parse().ok());
                        self.health.addr_owner(a, owner);
                    }
                    _ => {}
                }
            }
            (s, r)
        })
    }

    /// When a peer's summary claimed `hash`, records whether its answer bore that out (a summary
    /// that keeps claiming paths its server does not have stops being believed).
    fn note_summary_claim(&self, s: &SourceId, hash: &StorePathHash, r: &Result<Option<Candidate>, SourceError>) {
        let SourceId::Peer(n) = s else { return };
        let Some(announced) = self.sources.table().and_then(|t| t.get(n)).map(|p| p.summary) else {
            return;
        };
        if self.summaries.hint(n, announced, crate::summary::key(hash)) != Hint::Maybe {
            return;
        }
        match r {
            Ok(Some(_)) => self.health.summary_claim(n, true),
            Ok(None) => self.health.summary_claim(n, false),
            Err(_) => {}
        }
    }

    /// Records a source's failure to answer.
    fn judge_answer(&self, s: &SourceId, hash: &StorePathHash, e: &SourceError) {
        tracing::debug!(source = ?s, %hash, error = %e, "narinfo source failed");
        self.judge(s, Verdict::Failed(e));
    }

    /// Races the sources for the narinfo of `hash`; the first verified answer wins. Demoted
    /// peers are asked with the upstreams, after the peers in good standing.
    pub(super) async fn race(&self, hash: &StorePathHash) -> Option<Candidate> {
        let (good, demoted) = self.pick_peers(hash, false);
        let mut pending: FuturesUnordered<Answer<'_>> = good.into_iter().map(|p| self.ask(p, hash)).collect();
        // The second wave: demoted peers and the upstreams, after the hedge delay or once every
        // peer in good standing has answered.
        let mut second_wave = Some(demoted);
        let hedge = tokio::time::sleep(if pending.is_empty() {
            Duration::ZERO
        } else {
            HEDGE_DELAY
        });
        tokio::pin!(hedge);
        loop {
            if pending.is_empty() && second_wave.is_none() {
                return None;
            }
            let start_second_wave = tokio::select! {
                Some((s, r)) = pending.next(), if !pending.is_empty() => {
                    self.note_summary_claim(&s, hash, &r);
                    match r {
                        // A good narinfo does not clear a peer's failures: only a verified
                        // NAR does (a peer may answer narinfo honestly and lie in NARs).
                        Ok(Some(c)) => return Some(c),
                        Ok(None) => {}
                        Err(e) => self.judge_answer(&s, hash, &e),
                    }
                    pending.is_empty()
                }
                _ = &mut hedge, if second_wave.is_some() => true,
            };
            if start_second_wave {
                if let Some(mut wave) = second_wave.take() {
                    wave.extend(self.live_upstreams());
                    pending.extend(wave.into_iter().map(|s| self.ask(s, hash)));
                }
            }
        }
    }

    /// Every source that has the NAR `nar_hash` of `hash` (peers first), excluding `skip`;
    /// waits [`GATHER_GRACE`] after the first for the others. Peers that lied about this NAR
    /// are not asked; demoted peers come after those in good standing.
    pub(super) async fn gather(
        &self,
        hash: &StorePathHash,
        nar_hash: &NarHash,
        skip: &HashSet<SourceId>,
    ) -> Vec<Candidate> {
        let (mut all, demoted) = self.pick_peers(hash, true);
        all.extend(demoted);
        all.extend(self.live_upstreams());
        let mut pending: FuturesUnordered<Answer<'_>> = all
            .into_iter()
            .filter(|s| !skip.contains(s))
            .filter(|s| !matches!(s, SourceId::Peer(n) if !self.health.may_ask_for(n, nar_hash)))
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
        let now = Instant::now();
        found.sort_by_key(|c| match &c.source {
            SourceId::Peer(n) => u8::from(self.health.backed_off(n, now)),
            SourceId::Upstream(_) => 2,
        });
        found
    }
}
