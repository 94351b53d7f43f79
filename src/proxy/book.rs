//! How the proxy picks a source for a NAR (or a narinfo): this file, [`SourceBook`].
//!
//! The book is the one owner of what the proxy knows of its sources: the peer table's view and
//! the upstreams (`source`), each source's health (`health`), which peers are proven for
//! pass-through (`proven`), the form each peer's NARs come in best (`forms`) and the peers'
//! content summaries (`summaries`). Everything that chooses or judges a source goes through its
//! narrow methods: [`SourceBook::pick_peers`] (whom to ask for a narinfo),
//! [`SourceBook::usable_candidates`] and [`SourceBook::rank`] (in which order a NAR's sources are
//! tried), [`SourceBook::usable`], [`SourceBook::passes_through`], [`SourceBook::judge`] (how a
//! source did) and [`SourceBook::describe`]. The race and the gathering that use it are `lookup`;
//! the fetch that tries the sources in order is `fetch`.
//!
//! Invariant: a peer is asked only while it is announced, not an impostor at its address, and its
//! address is not known to belong to another node (and, in a lookup, not asleep); its bytes pass
//! through only if, besides, it is proven at that address and never lied.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use rand::seq::SliceRandom;
use tokio::time::Instant;

use super::breaker::Pass;
use super::forms::PeerForms;
use super::health::{ClaimRecord, SourceHealth, Verdict};
use super::passthrough::Tap;
use super::proven::ProvenPeers;
use super::source::{Candidate, SourceError, SourceId, Sources};
use super::stats::{PeerReport, StatsKeeper, UpstreamReport};
use super::summaries::{Hint, PeerSummaries};
use crate::beacon::{wire::NodeId, PeerTable};
use crate::narinfo::{NarHash, StorePathHash};

/// Most peers asked for one narinfo when summaries do not narrow it down.
pub const MAX_FANOUT: usize = 16;
/// Peers whose summary says "maybe" asked for one narinfo.
pub const MAYBE_FANOUT: usize = 3;
/// Peers with no current summary asked besides, when other peers publish summaries.
pub const UNKNOWN_SAMPLE: usize = 2;
/// Peers whose summary says "no", asked when gathering a NAR's sources (see `pick_peers`).
pub const NO_SAMPLE: usize = 4;

/// Everything the proxy knows of its sources, and the choices made from it.
pub struct SourceBook {
    /// The HTTP clients, the upstreams and the peer table.
    sources: Sources,
    /// Back-off, lies, impostors, unreachable upstreams.
    health: SourceHealth,
    /// Peers whose NARs may pass through, and the banned ones (persisted).
    proven: ProvenPeers,
    /// Plain or zstd, per peer, by what each delivered.
    forms: PeerForms,
    /// Peers' content summaries (kept current by [`PeerSummaries::run`]).
    summaries: PeerSummaries,
    /// Whether proven peers' NARs pass through at all (`ProxyConfig::pass_through`).
    pass_through: bool,
    /// Where a judged lie is counted.
    stats: Arc<StatsKeeper>,
}

impl SourceBook {
    pub fn new(
        sources: Sources,
        forms: PeerForms,
        proven: ProvenPeers,
        pass_through: bool,
        stats: Arc<StatsKeeper>,
    ) -> Self {
        Self {
            health: SourceHealth::new(sources.upstreams.len()),
            sources,
            proven,
            forms,
            summaries: PeerSummaries::default(),
            pass_through,
            stats,
        }
    }

    /// The clients that talk to the sources.
    pub fn sources(&self) -> &Sources {
        &self.sources
    }

    /// How each peer's NARs are best fetched.
    pub fn forms(&self) -> &PeerForms {
        &self.forms
    }

    /// The peers' content summaries.
    pub fn summaries(&self) -> &PeerSummaries {
        &self.summaries
    }

    /// The beacon's peer table (none without a beacon).
    pub fn table(&self) -> Option<&Arc<PeerTable>> {
        self.sources.table()
    }

    /// Whether proven peers' NARs may pass through at all.
    pub fn pass_through(&self) -> bool {
        self.pass_through
    }

    /// Records how a source did (one call, whatever happened) and counts lies. A peer's verified
    /// NAR counts towards its being proven; a wrong NAR bans it from pass-through for good.
    pub fn judge(&self, s: &SourceId, v: Verdict<'_>) {
        if let SourceId::Peer(n) = s {
            let addr = self.table().and_then(|t| t.get(n)).map(|p| p.http_addr());
            // Marked where the request went (the table may have moved the node since).
            if let Verdict::Failed(SourceError::NotThePeer { at, .. }) = &v {
                if let Some(a) = at.or(addr) {
                    self.health.impostor_at(n, a);
                }
            }
            let ip = addr.map(|a| a.ip());
            match (&v, ip) {
                (Verdict::Delivered, Some(ip)) => {
                    if let (Some(t), Some(a)) = (self.table(), addr) {
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
    pub fn usable(&self, node: &NodeId) -> bool {
        let Some(t) = self.table() else {
            return false;
        };
        t.get(node)
            .is_some_and(|p| self.health.may_ask(node, p.http_addr(), |other| t.get(other).is_some()))
    }

    /// Whether `s` may be asked for the NAR `nar_hash` (a peer that sent wrong bytes of it
    /// recently may not).
    pub fn may_ask_for(&self, s: &SourceId, nar_hash: &NarHash) -> bool {
        match s {
            SourceId::Peer(n) => self.health.may_ask_for(n, nar_hash),
            SourceId::Upstream(_) => true,
        }
    }

    /// Whether bytes from `s` may go to Nix before the whole NAR verified: a peer still usable
    /// (announced, no impostor, its address its own), proven at its current address, and let
    /// through by the host-wide breaker (`breaker`).
    /// An unseasoned peer's grant goes to `tap`, given back when it detaches or ends.
    pub fn passes_through(&self, s: &SourceId, tap: &Tap) -> bool {
        let SourceId::Peer(n) = s else { return false };
        let Some(addr) = self.table().and_then(|t| t.get(n)).map(|p| p.http_addr()) else {
            return false;
        };
        if !(self.pass_through && self.usable(n)) {
            return false;
        }
        tap.release();
        match self.proven.may_pass_through(n, addr.ip()) {
            Some(Pass::Granted(g)) => {
                tap.hold(g);
                true
            }
            Some(Pass::Free) => true,
            None => false,
        }
    }

    /// A source as a person reads it.
    pub fn describe(&self, s: &SourceId) -> String {
        match s {
            SourceId::Peer(n) => match self.table().and_then(|t| t.get(n)) {
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

    /// The cached sources of a NAR still usable (a cached peer may have left the table, or lied
    /// about this NAR since), in the order to try them: backed-off peers go last.
    pub fn usable_candidates(&self, candidates: Vec<Candidate>, nar_hash: &NarHash) -> VecDeque<Candidate> {
        let mut usable: Vec<Candidate> = candidates
            .into_iter()
            .filter(|c| match &c.source {
                SourceId::Peer(n) => self.usable(n) && self.health.may_ask_for(n, nar_hash),
                SourceId::Upstream(_) => true,
            })
            .collect();
        self.rank(&mut usable);
        VecDeque::from(usable)
    }

    /// Orders the sources found for a NAR: peers in good standing, backed-off peers, upstreams;
    /// among peers of one standing the least loaded first (the load their store server told with
    /// the narinfo), at random among equals, never in answer order: a crowd spreads over the
    /// holders instead of piling onto the first to answer (issue #24).
    pub fn rank(&self, found: &mut [Candidate]) {
        let now = Instant::now();
        found.shuffle(&mut rand::thread_rng());
        found.sort_by_key(|c| match &c.source {
            SourceId::Peer(n) => (
                u8::from(self.health.backed_off(n, now)),
                c.load.map_or(0, |l| l.weight()),
            ),
            SourceId::Upstream(_) => (2, 0),
        });
    }

    /// Whom to ask for `hash`, in two waves: first peers in good standing whose summary says
    /// "maybe" (at most [`MAYBE_FANOUT`], chosen at random so a crowd fetching one closure
    /// spreads over every host that has it; those that kept their claims first, and none that
    /// broke more than they kept, by id or at its address: `health::ClaimRecord`), with a random sample of peers whose summary is
    /// unknown ([`UNKNOWN_SAMPLE`]); when no believed summary says "maybe" (also when we hold no
    /// peer's current summary, whether none publishes one or none could be fetched yet), the
    /// peers whose summary is unknown are the only ones that may have the path, and up to
    /// [`MAX_FANOUT`] of them are asked instead of the sample; then, as a last resort,
    /// backed-off (demoted) peers that may have it. Peers whose current summary
    /// says "no" are not asked in a lookup. With `all` (gathering every source of a NAR a fetch
    /// needs), every candidate, and in the last wave also [`NO_SAMPLE`] peers whose summary says
    /// "no": a host may have gained the path since (built it, copied it) before its index did.
    pub fn pick_peers(&self, hash: &StorePathHash, all: bool) -> (Vec<SourceId>, Vec<SourceId>) {
        let Some(t) = self.table() else {
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
            .filter(|p| self.usable(&p.node))
            // Asleep (it let a lookup wait its whole budget and has not announced since): not
            // asked until it wakes (a suspended host's kernel accepts, nobody answers).
            .filter(|p| !self.health.asleep(&p.node, p.last_seen))
            .filter(|p| addrs.insert(p.http_addr()))
            .map(|p| {
                let health = self.health.peer_at(&p.node, p.http_addr().ip());
                let mut hint = self.summaries.hint(&p.node, p.summary, key);
                if hint == Hint::Maybe && health.summary_distrusted() {
                    hint = Hint::Unknown;
                }
                (p.node, health, hint)
            })
            .collect();
        // Random order first, then the stable sort by health keeps ties random; among equals,
        // peers that kept their summary's claims first, those that broke more than they kept
        // (by id or at their address) last.
        peers.shuffle(&mut rng);
        peers.sort_by_key(|(_, h, _)| (h.consecutive_failures, h.claim_record()));
        let ids = |v: Vec<(NodeId, _, Hint)>, n: usize| -> Vec<SourceId> {
            v.into_iter().take(n).map(|(n, _, _)| SourceId::Peer(n)).collect()
        };
        let (no, peers): (Vec<_>, Vec<_>) = peers.into_iter().partition(|(_, _, hint)| *hint == Hint::No);
        let (good, demoted): (Vec<_>, Vec<_>) = peers.into_iter().partition(|(_, h, _)| !h.backed_off(now));
        let (maybe, unknown): (Vec<_>, Vec<_>) = good.into_iter().partition(|(_, _, hint)| *hint == Hint::Maybe);
        let maybe_n = if all { MAX_FANOUT } else { MAYBE_FANOUT };
        // Maybes beyond the first wave go first in the second one: peers that claim a path
        // they do not serve cannot keep its one honest holder from being asked. Peers that broke
        // more claims than they kept wait for the second wave (issue #25).
        let believed = maybe
            .iter()
            .take(maybe_n)
            .take_while(|(_, h, _)| h.claim_record() != ClaimRecord::Broken);
        let (maybe, more_maybe) = maybe.split_at(believed.count());
        // Summaries narrow the fan-out only where a believed one claims the path. Where none
        // does, if anyone has it, it is a peer whose summary we do not hold (none is published,
        // or it was not fetched yet: a newcomer's first second, when only some summaries came),
        // so those are all asked (up to the cap), not a sample that may miss the one holder.
        let unknown_n = if all || maybe.is_empty() {
            MAX_FANOUT
        } else {
            UNKNOWN_SAMPLE
        };
        let mut first = ids(maybe.to_vec(), maybe_n);
        first.extend(ids(unknown, unknown_n));
        let mut last = ids(more_maybe.to_vec(), MAX_FANOUT);
        last.extend(ids(demoted, MAX_FANOUT));
        if all {
            last.extend(ids(no, NO_SAMPLE));
        }
        (first, last)
    }

    /// Whether `s` is a peer whose current summary claims `hash` and is believed (not distrusted
    /// for broken claims): a lookup holds the upstreams back while such a peer has not answered
    /// (`lookup`, issue #24).
    pub fn claims(&self, s: &SourceId, hash: &StorePathHash) -> bool {
        let SourceId::Peer(n) = s else { return false };
        let Some(p) = self.table().and_then(|t| t.get(n)) else {
            return false;
        };
        self.summaries.hint(n, p.summary, crate::summary::key(hash)) == Hint::Maybe
            && !self.health.peer_at(n, p.http_addr().ip()).summary_distrusted()
    }

    /// Upstreams not marked unreachable.
    pub fn live_upstreams(&self) -> Vec<SourceId> {
        let now = Instant::now();
        (0..self.sources.upstreams.len())
            .filter(|i| self.health.upstream_up(*i, now))
            .map(SourceId::Upstream)
            .collect()
    }

    /// Notes a peer's narinfo answer (asked at `t0`): its latency for the fan-out order, and
    /// which node the server at its address named.
    pub fn heard(&self, s: &SourceId, r: &Result<Option<Candidate>, SourceError>, t0: Instant) {
        let SourceId::Peer(n) = s else { return };
        let addr = self.table().and_then(|t| t.get(n)).map(|p| p.http_addr());
        match (r, addr) {
            (Ok(_), Some(a)) => {
                self.health.awake(n);
                self.health.latency(n, t0.elapsed());
                self.health.addr_owner(a, Some(*n));
                if let Some(t) = self.table() {
                    t.answered(n, a, Instant::now());
                }
            }
            (Err(SourceError::NotThePeer { found, .. }), Some(a)) => {
                self.health.addr_owner(a, *found);
            }
            _ => {}
        }
    }

    /// Notes a peer's summary answer as [`Self::heard`] does a narinfo answer: which node the
    /// server at its address named, and, when that was not the peer (another node, or none),
    /// the peer is an impostor at that address, never asked there again (issue #25: such an
    /// answer was only logged, and the summary fetched again every second).
    pub fn heard_summary(&self, n: &NodeId, r: &Result<bytes::Bytes, SourceError>) {
        let Some(a) = self.table().and_then(|t| t.get(n)).map(|p| p.http_addr()) else {
            return;
        };
        match r {
            Ok(_) => {
                self.health.awake(n);
                self.health.addr_owner(a, Some(*n));
            }
            Err(e @ SourceError::NotThePeer { found, .. }) => {
                self.health.addr_owner(a, *found);
                self.judge(&SourceId::Peer(*n), Verdict::Failed(e));
            }
            Err(_) => {}
        }
    }

    /// A lookup waited its whole budget for peer `n`: asleep until it announces again or
    /// answers (see `health`).
    pub fn silent(&self, n: &NodeId) {
        tracing::info!(node = %n, "peer accepted but did not answer: skipped until it announces again");
        self.health.silent(n, Instant::now());
    }

    /// When a peer's summary claimed `hash`, records whether its answer bore that out (a summary
    /// that keeps claiming paths its server does not have stops being believed).
    pub fn note_summary_claim(&self, s: &SourceId, hash: &StorePathHash, r: &Result<Option<Candidate>, SourceError>) {
        let SourceId::Peer(n) = s else { return };
        let Some((announced, ip)) = self
            .table()
            .and_then(|t| t.get(n))
            .map(|p| (p.summary, p.http_addr().ip()))
        else {
            return;
        };
        if self.summaries.hint(n, announced, crate::summary::key(hash)) != Hint::Maybe {
            return;
        }
        match r {
            Ok(Some(_)) => self.health.summary_claim(n, ip, true),
            Ok(None) => self.health.summary_claim(n, ip, false),
            Err(_) => {}
        }
    }

    /// Every peer of the table with what the proxy found of it, for the status report.
    pub fn peer_reports(&self) -> Vec<PeerReport> {
        let now = Instant::now();
        let Some(t) = self.table() else {
            return Vec::new();
        };
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
    }

    /// Every upstream and whether it is reachable, for the status report.
    pub fn upstream_reports(&self) -> Vec<UpstreamReport> {
        let now = Instant::now();
        self.sources
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| UpstreamReport {
                url: u.to_string(),
                reachable: self.health.upstream_up(i, now),
            })
            .collect()
    }
}
