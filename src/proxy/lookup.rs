//! Finding who has a narinfo: the hedged race (first verified answer wins) and the gathering of
//! every source of one NAR (for a fetch, a resume or a split). Whom to ask, and in which order,
//! is the [`SourceBook`]'s choice; this file asks them.
//!
//! Peers are asked first, at most `book::MAX_FANOUT` of them (fewest recent failures, then
//! fastest; a peer never measured counts as fast so newcomers get asked); the upstreams are asked
//! [`HEDGE_DELAY`] later, or at once when every peer has answered, but not while a peer whose
//! summary claims the path has not answered (at most [`CLAIMED_WAIT`]); when gathering a NAR's
//! sources, not at all if a peer has it (issue #24). A source's failure is judged
//! (back-off, upstream down) as it comes in. A peer gets at most [`PEER_LOOKUP_BUDGET`] per
//! lookup; one that used it all is skipped until it announces again (`health`).

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::time::Instant;

use super::book::SourceBook;
use super::health::Verdict;
use super::source::{Candidate, SourceError, SourceId};
use super::stats::StatsKeeper;
use crate::narinfo::{NarHash, StorePathHash};

/// Upstreams are asked this long after the peers, unless every peer already answered.
pub const HEDGE_DELAY: Duration = Duration::from_millis(150);
/// A peer that could not be reached is asked once more after this long.
const PEER_RETRY_AFTER: Duration = Duration::from_millis(200);
/// The longest a lookup waits for one peer's narinfo, retry included (a LAN store server
/// answers from its index in a millisecond). A peer that used it all is asleep until it
/// announces again (issue #25: a suspended host, whose kernel still accepts connections, cost
/// 3 s, a retry and 3 s again, per lookup).
pub const PEER_LOOKUP_BUDGET: Duration = Duration::from_secs(1);
/// The longest the upstreams wait for a peer whose summary claims the path (each peer's answer
/// is bounded by [`PEER_LOOKUP_BUDGET`] anyway: this is that bound, named where it is used).
pub const CLAIMED_WAIT: Duration = PEER_LOOKUP_BUDGET;
/// When looking for every source of a NAR, wait this long after the first one answered.
const GATHER_GRACE: Duration = Duration::from_millis(300);

type Answer<'a> = Pin<Box<dyn Future<Output = (SourceId, Result<Option<Candidate>, SourceError>)> + Send + 'a>>;

/// Asks the sources the book picks, counting the requests sent to peers.
#[derive(Clone, Copy)]
pub struct Lookup<'a> {
    pub book: &'a SourceBook,
    pub stats: &'a StatsKeeper,
}

impl<'a> Lookup<'a> {
    /// Asks one source, timing peers for the fan-out order and noting who answers at a peer's
    /// address.
    fn ask(self, s: SourceId, hash: &'a StorePathHash) -> Answer<'a> {
        if matches!(s, SourceId::Peer(_)) {
            self.stats.update(|st| st.narinfo_peer_requests += 1);
        }
        let sources = self.book.sources();
        Box::pin(async move {
            let t0 = Instant::now();
            let r = match &s {
                SourceId::Peer(n) => {
                    let asked = async {
                        let mut r = sources.narinfo(&s, hash).await;
                        // A peer that could not be connected to may be on a link that just came
                        // up (neighbour discovery, a bridge port not yet forwarding): one more
                        // try, a moment later. One that accepted and said nothing is not retried.
                        if matches!(&r, Err(e) if e.is_connect_failure()) {
                            tokio::time::sleep(PEER_RETRY_AFTER).await;
                            r = sources.narinfo(&s, hash).await;
                        }
                        r
                    };
                    let r = tokio::time::timeout(PEER_LOOKUP_BUDGET, asked)
                        .await
                        .unwrap_or(Err(SourceError::Timeout));
                    if matches!(r, Err(SourceError::Timeout)) {
                        self.book.silent(n);
                    }
                    r
                }
                SourceId::Upstream(_) => sources.narinfo(&s, hash).await,
            };
            self.book.heard(&s, &r, t0);
            (s, r)
        })
    }

    /// Records a source's failure to answer.
    fn judge_answer(self, s: &SourceId, hash: &StorePathHash, e: &SourceError) {
        tracing::debug!(source = ?s, %hash, error = %e, "narinfo source failed");
        self.book.judge(s, Verdict::Failed(e));
    }

    /// Races the sources for the narinfo of `hash`; the first verified answer wins. Demoted
    /// peers are asked with the upstreams, after the peers in good standing, when the [`Hedge`]
    /// says so.
    pub async fn race(self, hash: &'a StorePathHash) -> Option<Candidate> {
        let (good, demoted) = self.book.pick_peers(hash, false);
        // Which peers a lookup asked: a miss can then be told from a holder left out.
        tracing::debug!(%hash, asked = ?good, demoted = ?demoted, "narinfo lookup");
        let mut hedge = Hedge::new(good.iter().filter(|s| self.book.claims(s, hash)).cloned());
        let mut pending: FuturesUnordered<Answer<'_>> = good.into_iter().map(|p| self.ask(p, hash)).collect();
        // The second wave: demoted peers and the upstreams, when the hedge is due or once every
        // peer in good standing has answered.
        let mut second_wave = Some(demoted);
        let timer = tokio::time::sleep_until(if pending.is_empty() {
            Instant::now()
        } else {
            hedge.due()
        });
        tokio::pin!(timer);
        loop {
            if pending.is_empty() && second_wave.is_none() {
                return None;
            }
            let start_second_wave = tokio::select! {
                Some((s, r)) = pending.next(), if !pending.is_empty() => {
                    self.book.note_summary_claim(&s, hash, &r);
                    match r {
                        // A good narinfo does not clear a peer's failures: only a verified
                        // NAR does (a peer may answer narinfo honestly and lie in NARs).
                        Ok(Some(c)) => return Some(c),
                        Ok(None) => {}
                        Err(e) => self.judge_answer(&s, hash, &e),
                    }
                    hedge.answered(&s);
                    timer.as_mut().reset(hedge.due());
                    pending.is_empty()
                }
                _ = &mut timer, if second_wave.is_some() => true,
            };
            if start_second_wave {
                if let Some(mut wave) = second_wave.take() {
                    wave.extend(self.book.live_upstreams());
                    pending.extend(wave.into_iter().map(|s| self.ask(s, hash)));
                }
            }
        }
    }

    /// The named peers (hosts a busy source named, issue #24) that have the NAR `nar_hash` of
    /// `hash`: only usable peers of the table, not marked for lying about it, asked at once.
    pub async fn named(self, hash: &'a StorePathHash, nar_hash: &NarHash, named: Vec<SourceId>) -> Vec<Candidate> {
        let asks: FuturesUnordered<Answer<'_>> = named
            .into_iter()
            .filter(|s| matches!(s, SourceId::Peer(n) if self.book.usable(n)) && self.book.may_ask_for(s, nar_hash))
            .map(|s| self.ask(s, hash))
            .collect();
        let answers: Vec<_> = asks.collect().await;
        let mut found: Vec<Candidate> = answers
            .into_iter()
            .filter_map(|(_, r)| r.ok().flatten())
            .filter(|c| c.info.nar_hash == *nar_hash)
            .collect();
        self.book.rank(&mut found);
        found
    }

    /// Every source that has the NAR `nar_hash` of `hash`, excluding `skip`: the peers at once,
    /// the upstreams only if no peer has the NAR by the time the [`Hedge`] is due (a fetch asks
    /// them later, [`Self::upstreams`], if those peers fail: issue #24, a crowd's fetches all
    /// asked the upstream for the narinfo of a NAR a peer held); waits [`GATHER_GRACE`] after
    /// the first for the others. Peers that lied about this NAR are not asked; demoted peers come
    /// after those in good standing.
    pub async fn gather(self, hash: &'a StorePathHash, nar_hash: &NarHash, skip: &HashSet<SourceId>) -> Gathered {
        let (mut peers, demoted) = self.book.pick_peers(hash, true);
        peers.extend(demoted);
        let askable = |s: &SourceId| !skip.contains(s) && self.book.may_ask_for(s, nar_hash);
        peers.retain(|s| askable(s));
        let mut hedge = Hedge::new(peers.iter().filter(|s| self.book.claims(s, hash)).cloned());
        let mut upstreams: Option<Vec<SourceId>> =
            Some(self.book.live_upstreams().into_iter().filter(|s| askable(s)).collect());
        let mut pending: FuturesUnordered<Answer<'_>> = peers.into_iter().map(|s| self.ask(s, hash)).collect();
        let mut found = Vec::new();
        let mut upstreams_asked = false;
        let timer = tokio::time::sleep_until(hedge.due());
        tokio::pin!(timer);
        let mut deadline: Option<Instant> = None;
        loop {
            if pending.is_empty() || timer.is_elapsed() {
                // The peers' turn is over: the upstreams, unless a peer has the NAR.
                if let Some(ups) = upstreams.take() {
                    upstreams_asked = found.is_empty();
                    if upstreams_asked {
                        pending.extend(ups.into_iter().map(|s| self.ask(s, hash)));
                    }
                }
                if pending.is_empty() {
                    break;
                }
            }
            let grace = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some((s, r)) = pending.next() => {
                    match r {
                        Ok(Some(c)) if c.info.nar_hash == *nar_hash => {
                            found.push(c);
                            deadline.get_or_insert(Instant::now() + GATHER_GRACE);
                        }
                        Ok(_) => {}
                        Err(e) => self.judge_answer(&s, hash, &e),
                    }
                    hedge.answered(&s);
                    timer.as_mut().reset(hedge.due());
                }
                _ = &mut timer, if upstreams.is_some() => {}
                _ = grace => break,
            }
        }
        self.book.rank(&mut found);
        Gathered { found, upstreams_asked }
    }

    /// The upstreams not in `skip` that have the NAR `nar_hash` of `hash`, asked at once: a
    /// fetch's last resort when [`Self::gather`] left them alone and the peers failed.
    pub async fn upstreams(
        self,
        hash: &'a StorePathHash,
        nar_hash: &NarHash,
        skip: &HashSet<SourceId>,
    ) -> Vec<Candidate> {
        let asks: FuturesUnordered<Answer<'_>> = (self.book.live_upstreams().into_iter())
            .filter(|s| !skip.contains(s))
            .map(|s| self.ask(s, hash))
            .collect();
        let answers: Vec<_> = asks.collect().await;
        let mut found = Vec::new();
        for (s, r) in answers {
            match r {
                Ok(Some(c)) if c.info.nar_hash == *nar_hash => found.push(c),
                Ok(_) => {}
                Err(e) => self.judge_answer(&s, hash, &e),
            }
        }
        found
    }
}

/// What [`Lookup::gather`] found.
pub struct Gathered {
    /// The sources with the NAR, in the order to try them.
    pub found: Vec<Candidate>,
    /// Whether the upstreams (not skipped) were asked; when not, a peer had the NAR.
    pub upstreams_asked: bool,
}

/// When a lookup's upstreams are due: [`HEDGE_DELAY`] after the peers were asked; but while a
/// peer whose summary claims the path (`SourceBook::claims`) has not answered, not before
/// [`CLAIMED_WAIT`] (issue #24: the holder of a crowd's path, loaded, took more than 150 ms to
/// answer, and every host's lookup asked the upstream). A miss no peer claims stays fast.
struct Hedge {
    asked: Instant,
    /// The claiming peers that have not answered yet.
    claimed: HashSet<SourceId>,
}

impl Hedge {
    fn new(claimed: impl Iterator<Item = SourceId>) -> Self {
        Self {
            asked: Instant::now(),
            claimed: claimed.collect(),
        }
    }

    /// `s` answered (or failed).
    fn answered(&mut self, s: &SourceId) {
        self.claimed.remove(s);
    }

    /// When the upstreams are due.
    fn due(&self) -> Instant {
        self.asked
            + if self.claimed.is_empty() {
                HEDGE_DELAY
            } else {
                CLAIMED_WAIT
            }
    }
}
