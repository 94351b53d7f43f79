//! The peer table: who announced what, and from where (membership only: how good a peer is as a
//! source is the proxy's business, in `proxy::health`). [`PeerTable`] holds every part below
//! under one lock, so one datagram is handled against one consistent state.
//!
//! Pure logic over `tokio::time::Instant` (so tests can pause time); the network loop feeds it
//! datagrams. A peer leaves after three of its own announce intervals of silence, or at once on
//! a goodbye: one carrying the secret whose commitment its announces carried, or, from a peer
//! that announced no commitment (an older version), one from an address it announced from, or
//! one signed by the key its node id is the hash of.
//!
//! The parts, one noun each: [`peer`] (one entry and the changes an announce makes to it:
//! moves, pinning, proofs), [`admission`] (the caps, and who makes room at one), [`buckets`]
//! (the rate limits), [`contest`] (the addresses queued to prove a contested node id, and what
//! each proved), [`departed`] (goodbyes' sequence numbers: an older announce is a replay),
//! [`expiry`] (when to look for silent peers next), [`outcome`] (what a datagram did, why one
//! was ignored, and their counters), [`changes`] (who is told of joins, leaves and new summary
//! versions).
//!
//! A peer is *established* once it has announced [`ESTABLISHED_ANNOUNCES`] times (what the
//! traffic budget, the query sampling and peer exchange count).
//!
//! A node id is *contested* while a family would list two of its addresses, none proven (or,
//! once proven in one family, when the other family claims it): the announcing address is
//! queued, from its second claim on ([`PeerTable::take_proofs_wanted`]), for the prover
//! (`beacon::prover`) to ask its store server which id it holds; the address that proves the id
//! holds it ([`PeerTable::proof_result`]), and announces of the id from unproven addresses of
//! that family are ignored from then on, as are announces of other ids from that address. A
//! failed request is retried (after 2 s, doubling) while the contest lasts. Until then, and
//! between older hosts that cannot prove their ids: a live peer's node id stays at its
//! address: an established id announced from a new address of a family it is listed with is
//! taken as a move ([`Move`]) only until one of the addresses it left announces again; then the
//! move is undone and the id *pinned* (a second address is ignored while the peer is alive,
//! counted `contested`). A bound id (the node id is its commitment) is never held by an
//! announce with another commitment.
//!
//! Bounds: [`MAX_PEERS`] peers (about 600 bytes each with a hostname and a move being watched:
//! under 1.5 MiB), buckets for [`MAX_SOURCES`] sources (about 64 bytes each),
//! [`contest::MAX_ASKED`] asked addresses (about 120 bytes each), [`departed::MAX_DEPARTED`]
//! goodbyes (about 80 bytes each); constant work per datagram
//! under the lock except a new node id's admission (linear in the table, bounded by the rate
//! limits); a signed goodbye's signature is checked outside the lock, at most
//! [`MAX_SIGNATURE_CHECKS_PER_SEC`].

pub mod admission;
pub mod buckets;
mod changes;
pub mod contest;
pub mod departed;
pub mod expiry;
pub mod outcome;
pub mod peer;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

pub use admission::{MAX_PEERS, MAX_PEERS_PER_ADDR};
pub use buckets::{MAX_SIGNATURE_CHECKS_PER_SEC, MAX_SOURCES, RATE_BURST, RATE_PER_SEC};
pub use expiry::EXPIRY_RESCAN;
pub use outcome::{Counters, IgnoreReason, Outcome};
pub use peer::{Hold, Move, Peer, Standing, ESTABLISHED_ANNOUNCES, EXPIRY_INTERVALS, MOVE_SILENCE_INTERVALS};

use super::identity::{self, Identity};
use super::wire::{self, Beacon, Kind, NodeId};
use buckets::Buckets;
use changes::Changes;
use contest::Contests;
use departed::Departed;
use expiry::ExpiryCache;
use peer::{addr_with_scope, Announced};

/// In the table of a node whose proxy reports answers ([`PeerTable::answered`]), an established
/// peer that never answered counts as part of the hall (the traffic budget, the query sampling,
/// the `GET /peers` list) only this long after it joined: time for an honest host's summary to
/// be fetched, while identities forged and kept refreshed stop stretching every interval and
/// silencing the answers to a newcomer's query.
pub const UNANSWERED_COUNTS_FOR: Duration = Duration::from_secs(10);

/// What the lock guards.
#[derive(Default)]
struct Inner {
    peers: HashMap<NodeId, Peer>,
    /// The proof queue and what each asked address proved.
    contests: Contests,
    /// Rate limits by source, and for signature checks.
    buckets: Buckets,
    /// Goodbyes' sequence numbers: older announces of a departed node are replays.
    departed: Departed,
    /// The earliest expiry, cached ([`PeerTable::next_expiry`]).
    expiry: ExpiryCache,
    counters: Counters,
}

/// Counts `b` as ignored for `why`.
fn ignored(counters: &mut Counters, b: Beacon, why: IgnoreReason) -> Outcome {
    why.count(counters);
    Outcome::Ignored(b, why)
}

impl Inner {
    fn ignore(&mut self, b: Beacon, why: IgnoreReason) -> Outcome {
        ignored(&mut self.counters, b, why)
    }

    /// `addr`'s store server proved `node`: the address holds the id; the addresses of its
    /// family that did not prove it are dropped from its entry, and `addr` from every other
    /// entry (they claimed an address that holds another id; an entry left without addresses
    /// goes).
    fn prove(&mut self, node: &NodeId, addr: SocketAddr) {
        let others: Vec<NodeId> = self
            .peers
            .values()
            .filter(|p| p.node != *node && p.addrs.contains(&addr))
            .map(|p| p.node)
            .collect();
        for n in others {
            if let Some(p) = self.peers.get_mut(&n) {
                p.addrs.retain(|a| *a != addr);
                if p.addrs.is_empty() {
                    self.peers.remove(&n);
                }
            }
        }
        if let Some(p) = self.peers.get_mut(node) {
            p.proved_at(addr);
        }
    }
}

pub struct PeerTable {
    /// Our own node id: our beacons come back to us and are ignored.
    own: NodeId,
    /// Our key, when the node id is its hash (goodbyes are signed with it).
    identity: Option<Arc<Identity>>,
    /// This node's proxy reports answers (a `serve` node): peers that never answered are not
    /// counted as the hall after [`UNANSWERED_COUNTS_FOR`].
    answers_tracked: bool,
    /// Woken when a proof is wanted (the prover).
    proofs_wanted: tokio::sync::Notify,
    inner: Mutex<Inner>,
    /// Joins, leaves and summary versions changed: who is told ([`changes`]).
    changes: Changes,
}

impl PeerTable {
    pub fn new(own: NodeId) -> Self {
        Self {
            own,
            identity: None,
            answers_tracked: false,
            proofs_wanted: tokio::sync::Notify::new(),
            inner: Mutex::new(Inner::default()),
            changes: Changes::default(),
        }
    }

    /// The table of the node whose id is `identity`'s.
    pub fn with_identity(identity: Arc<Identity>) -> Self {
        Self {
            identity: Some(identity.clone()),
            // A node with a key is a `serve` node, whose proxy fetches every peer's summary.
            answers_tracked: true,
            ..Self::new(identity.node())
        }
    }

    pub fn own(&self) -> NodeId {
        self.own
    }

    /// Our key, when the node id is its hash.
    pub fn identity(&self) -> Option<&Arc<Identity>> {
        self.identity.as_ref()
    }

    /// The (node, address) pairs whose store server should now be asked to prove the node id.
    pub fn take_proofs_wanted(&self) -> Vec<(NodeId, SocketAddr)> {
        self.lock().contests.take_all()
    }

    /// The next (node, address) pair whose store server should be asked, oldest first.
    pub fn take_proof_wanted(&self) -> Option<(NodeId, SocketAddr)> {
        self.lock().contests.take_one()
    }

    /// Resolves when a proof is wanted.
    pub async fn proofs_wanted(&self) {
        self.proofs_wanted.notified().await
    }

    /// Queues `addr`'s store server to be asked for a proof of `node`, waking the prover when
    /// it was queued.
    fn want_proof(&self, g: &mut Inner, node: NodeId, addr: SocketAddr, now: Instant) {
        if g.contests.want_proof(node, addr, now) {
            self.proofs_wanted.notify_one();
        }
    }

    /// `addr`'s store server proved `node` (`identity`): the address holds the id; the
    /// addresses of its family that did not prove it are dropped, and announces of the id from
    /// them are ignored from now on.
    pub fn prove(&self, node: &NodeId, addr: SocketAddr) {
        self.lock().prove(node, addr);
    }

    /// The store server at `addr` was asked for a proof (the prover): it proved `holder` (the
    /// id its key hashes to, whatever id was claimed there), or nothing. A proof settles the
    /// address ([`Self::prove`]) for every claim made there during
    /// [`contest::ASK_AGAIN_AFTER`]; no proof is asked again after a growing wait, as long as
    /// the contest lasts (a claimant announcing again).
    pub fn proof_result(&self, addr: SocketAddr, holder: Option<NodeId>, now: Instant) {
        let mut g = self.lock();
        g.contests.answered(addr, holder, now);
        if let Some(n) = holder {
            g.prove(&n, addr);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enters a peer heard of through peer exchange (`pex`), on probation with zero announces,
    /// unless it is known already or the table's admission refuses it. True when entered.
    pub fn learn(
        &self,
        node: NodeId,
        addr: SocketAddr,
        flags: u16,
        interval: Duration,
        summary: Option<u64>,
        now: Instant,
    ) -> bool {
        let mut g = self.lock();
        if node == self.own || g.peers.contains_key(&node) || g.departed.contains(&node) {
            return false;
        }
        let Inner { peers, counters, .. } = &mut *g;
        if admission::admit(peers, addr.ip(), self.answers_tracked, &mut counters.displaced).is_err() {
            return false;
        }
        let p = Peer::heard_of(node, addr, flags, interval, summary, now);
        g.expiry.note(p.expires_at());
        g.peers.insert(node, p);
        drop(g);
        self.changes.membership();
        true
    }

    /// Counts a datagram that failed the on-link checks (`why`), and says so.
    pub fn off_link(&self, why: &'static str) -> Outcome {
        let mut g = self.lock();
        g.counters.received += 1;
        g.counters.off_link += 1;
        Outcome::OffLink(why)
    }

    /// Handles one datagram from `src`: rate limit, decode, then by kind.
    pub fn handle(&self, src: SocketAddr, data: &[u8], now: Instant) -> Outcome {
        let mut g = self.lock();
        g.counters.received += 1;
        if !g.buckets.allow(src.ip(), now) {
            g.counters.rate_limited += 1;
            return Outcome::RateLimited;
        }
        let b = match wire::decode(data) {
            Ok(b) => b,
            Err(e) => {
                g.counters.undecoded(&e);
                return Outcome::Invalid(e);
            }
        };
        if b.node == self.own {
            return g.ignore(b, IgnoreReason::Own);
        }
        match b.kind {
            Kind::Query => {
                g.counters.queries += 1;
                Outcome::Query(b)
            }
            Kind::Goodbye => {
                g.counters.goodbyes += 1;
                self.goodbye(g, src, data, b, now)
            }
            Kind::Announce => {
                g.counters.announces += 1;
                let addr = addr_with_scope(SocketAddr::new(src.ip(), b.port), src);
                let before = g.peers.get(&b.node).map(|p| p.summary);
                let outcome = match before {
                    Some(_) => self.announce_known(&mut g, b, addr, now),
                    None => self.announce_new(&mut g, b, addr, now),
                };
                if let Outcome::Joined(b) | Outcome::Refreshed(b) = &outcome {
                    let Inner { peers, expiry, .. } = &mut *g;
                    let p = peers.get(&b.node).inspect(|p| expiry.note(p.expires_at()));
                    let resummed = p.is_some_and(|p| before != Some(p.summary));
                    drop(g);
                    self.changes.told(matches!(outcome, Outcome::Joined(_)), resummed);
                }
                outcome
            }
        }
    }

    /// A goodbye `b` (the whole datagram: `data`) from `src`. Older proofs are cheap and
    /// checked under the lock; a signature (about 50 us) outside it, at most
    /// [`MAX_SIGNATURE_CHECKS_PER_SEC`] a second (anyone can copy a host's key from its
    /// `GET /identity` answer and send bad signatures under it).
    fn goodbye(&self, mut g: MutexGuard<'_, Inner>, src: SocketAddr, data: &[u8], b: Beacon, now: Instant) -> Outcome {
        let (genuine, verify) = g.peers.get(&b.node).map_or((false, false), |p| {
            let genuine = p.goodbye_proven(&b, src);
            // Signed by the key whose hash is its node id (checked only for a peer in the
            // table whose goodbye is fresh and names a key that hashes to its id), and newer
            // than its last announce: a signed goodbye copied off the link (a host sends one
            // when a link loses an address and keeps its key) cannot be replayed after the
            // host's next announce.
            let verify = !genuine
                && p.fresh_goodbye(&b)
                && wire::signature(data).is_some_and(|s| identity::node_of(&s.key) == b.node);
            (genuine, verify)
        });
        if genuine {
            g.peers.remove(&b.node);
            g.departed.left(b.node, b.seq);
            drop(g);
            self.changes.membership();
            return Outcome::Left(b);
        }
        if !verify {
            return g.ignore(b, IgnoreReason::UnprovenGoodbye);
        }
        if !g.buckets.check_signature(now) {
            return g.ignore(b, IgnoreReason::TooManySignatures);
        }
        drop(g);
        let signed = identity::signed_by(data, &b.node);
        let mut g = self.lock();
        if signed && g.peers.get(&b.node).is_some_and(|p| p.fresh_goodbye(&b)) {
            g.peers.remove(&b.node);
            g.departed.left(b.node, b.seq);
            drop(g);
            self.changes.membership();
            return Outcome::Left(b);
        }
        g.ignore(b, IgnoreReason::BadSignature)
    }

    /// An announce `b` of a listed node id from `addr`. A second address of a family the id is
    /// listed with is a contest (or a move): the store servers at every such address are asked
    /// to prove the id, and once one did, the family's other addresses are ignored.
    fn announce_known(&self, g: &mut Inner, b: Beacon, addr: SocketAddr, now: Instant) -> Outcome {
        // The store server there proved another id lately: the announce is someone else's (no
        // request needed).
        let holder = g.contests.holder(addr, now);
        if holder.is_some_and(|n| n != b.node) {
            return g.ignore(b, IgnoreReason::AddressProvedAnother);
        }
        let Some(claim) = g.peers.get(&b.node).map(|p| p.claim(addr, holder)) else {
            return g.ignore(b, IgnoreReason::Gone);
        };
        if claim.unproven {
            self.want_proof(g, b.node, addr, now);
            return g.ignore(b, IgnoreReason::AddressDidNotProve);
        }
        if claim.contest {
            // Now: the paths below may return early (a claim ignored while the id is pinned is
            // still asked about).
            self.want_proof(g, b.node, addr, now);
        }
        if holder == Some(b.node) {
            g.prove(&b.node, addr);
        }
        let Inner { peers, counters, .. } = g;
        // An entry that would list a new address takes a place of that address's share, as a
        // new id does (issue #25: ids announced first elsewhere put 5 ids at one address).
        let room = match peers.get(&b.node) {
            None => return ignored(counters, b, IgnoreReason::Gone),
            Some(p) if p.addrs.iter().any(|a| a.ip() == addr.ip()) => None,
            Some(_) => match admission::room_at_addr(peers, addr.ip(), Some(&b.node)) {
                Ok(room) => room,
                Err(why) => return ignored(counters, b, why),
            },
        };
        let Some(p) = peers.get_mut(&b.node) else {
            return ignored(counters, b, IgnoreReason::Gone);
        };
        let outcome = if p.commitment.is_some() && b.commitment != p.commitment {
            // An id made from its commitment (bound) cannot be announced with another one; an
            // entry that is not bound came from an older peer or from a forger who announced
            // the id first with a commitment of its own: a bound announce takes it over.
            if !b.bound() || p.bound() {
                // A node that committed to a goodbye secret keeps that commitment: announces
                // naming it with another one are someone else's.
                return ignored(counters, b, IgnoreReason::OtherCommitment);
            }
            *p = Peer::new(&b, addr, now);
            counters.contested += 1;
            Outcome::Refreshed(b)
        } else {
            match p.announced(&b, addr, now) {
                Ok(Announced::Refreshed) => Outcome::Refreshed(b),
                Ok(Announced::MoveUndone) => {
                    counters.contested += 1;
                    Outcome::Refreshed(b)
                }
                Err(why) => return ignored(counters, b, why),
            }
        };
        admission::make_room_at_addr(peers, addr.ip(), room, &mut counters.displaced);
        outcome
    }

    /// An announce `b` of a node id not in the table, from `addr`: admitted, unless the address
    /// proved another id or admission refuses it.
    fn announce_new(&self, g: &mut Inner, b: Beacon, addr: SocketAddr, now: Instant) -> Outcome {
        if g.contests.holder(addr, now).is_some_and(|n| n != b.node) {
            return g.ignore(b, IgnoreReason::AddressProvedAnother);
        }
        if g.departed.replayed(&b.node, b.seq) {
            return g.ignore(b, IgnoreReason::Replayed);
        }
        let Inner { peers, counters, .. } = g;
        if let Err(why) = admission::admit(peers, addr.ip(), self.answers_tracked, &mut counters.displaced) {
            return ignored(counters, b, why);
        }
        peers.insert(b.node, Peer::new(&b, addr, now));
        Outcome::Joined(b)
    }

    /// `node`'s store server at `addr` answered this host's proxy, naming its node id: it is
    /// alive, even if its announces were lost. Only for an address the entry lists; never
    /// creates an entry, never undoes a goodbye.
    pub fn answered(&self, node: &NodeId, addr: SocketAddr, now: Instant) {
        if let Some(p) = self.lock().peers.get_mut(node) {
            if p.addrs.contains(&addr) {
                p.answered = Some(now);
            }
        }
    }

    /// `node`'s store server at `addr` named `summary` as its summary version now
    /// (`cache_url::SUMMARY_HEADER`): kept for a peer that never announced to us (see
    /// [`Peer::heard_summary`]).
    pub fn heard_summary(&self, node: &NodeId, addr: SocketAddr, summary: Option<u64>) {
        if self
            .lock()
            .peers
            .get_mut(node)
            .is_some_and(|p| p.heard_summary(addr, summary))
        {
            self.changes.summaries();
        }
    }

    /// Drops peers silent (no announce, no answer) for three of their intervals; returns them.
    pub fn expire(&self, now: Instant) -> Vec<Peer> {
        let mut g = self.lock();
        let gone: Vec<NodeId> = g
            .peers
            .values()
            .filter(|p| p.expires_at() <= now)
            .map(|p| p.node)
            .collect();
        let removed: Vec<Peer> = gone.iter().filter_map(|n| g.peers.remove(n)).collect();
        g.counters.expired += removed.len() as u64;
        drop(g);
        if !removed.is_empty() {
            self.changes.membership();
        }
        removed
    }

    /// Forgets the addresses `gone` matches (reached through a link that went away); a peer left
    /// with none is dropped. Returns the dropped peers.
    pub fn forget_addrs(&self, gone: impl Fn(&SocketAddr) -> bool) -> Vec<Peer> {
        self.remove_where(|p| {
            p.addrs.retain(|a| !gone(a));
            p.addrs.is_empty()
        })
    }

    /// Drops the peers not heard from since `since` (after a wake-up from suspend, those that
    /// did not answer the query); returns them.
    /// Of those, only the ones `due` says.
    pub fn drop_unheard_since(&self, since: Instant, due: impl Fn(&Peer) -> bool) -> Vec<Peer> {
        self.remove_where(|p| p.last_seen < since && due(p))
    }

    /// How many peers were not heard from since `since`.
    pub fn unheard_since(&self, since: Instant) -> usize {
        self.lock().peers.values().filter(|p| p.last_seen < since).count()
    }

    fn remove_where(&self, mut pred: impl FnMut(&mut Peer) -> bool) -> Vec<Peer> {
        let mut g = self.lock();
        let gone: Vec<NodeId> = g.peers.values_mut().filter_map(|p| pred(p).then_some(p.node)).collect();
        let removed: Vec<Peer> = gone.iter().filter_map(|n| g.peers.remove(n)).collect();
        drop(g);
        if !removed.is_empty() {
            self.changes.membership();
        }
        removed
    }

    /// When to look for expired peers next: never later than the next peer's expiry, if it
    /// stays silent; asked by the beacon's loop per datagram, so the table is scanned rarely
    /// (see [`expiry`]).
    pub fn next_expiry(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut g = self.lock();
        let Inner { peers, expiry, .. } = &mut *g;
        expiry.next(now, || peers.values().map(Peer::expires_at).min())
    }

    /// Each peer's node id and announced summary version, in one pass under the lock without
    /// copying the entries (the proxy's summary loop asks twice a second).
    pub fn summaries(&self) -> Vec<(NodeId, Option<u64>)> {
        self.lock().peers.values().map(|p| (p.node, p.summary)).collect()
    }

    /// Live peers, oldest first.
    pub fn peers(&self) -> Vec<Peer> {
        let mut v: Vec<Peer> = self.lock().peers.values().cloned().collect();
        v.sort_by_key(|p| (p.first_seen, p.node));
        v
    }

    /// Number of peers that count as the hall: what the traffic budget and the query-answer
    /// sampling count (a flood of forged identities must not stretch every honest host's
    /// announce interval, nor silence the answers to a newcomer's query).
    pub fn established_len(&self) -> usize {
        let now = Instant::now();
        self.lock().peers.values().filter(|p| self.counts(p, now)).count()
    }

    /// The peers that count as the hall (oldest first), for `GET /peers`.
    pub fn hall(&self) -> Vec<Peer> {
        let now = Instant::now();
        let mut v: Vec<Peer> = self
            .lock()
            .peers
            .values()
            .filter(|p| self.counts(p, now))
            .cloned()
            .collect();
        v.sort_by_key(|p| (p.first_seen, p.node));
        v
    }

    /// Answered (its store server named its node id at a listed address: a host, not a forged
    /// datagram), or established and, where answers are reported, joined in the last
    /// [`UNANSWERED_COUNTS_FOR`]: one-off forgeries never count, forgeries kept refreshed stop
    /// counting. An answered peer counts before its third announce: right after a hall boots,
    /// a host that started late heard the others in one answer to its query, and at a long
    /// interval three announces take minutes; its `GET /peers` would list only the hosts that
    /// started after it.
    fn counts(&self, p: &Peer, now: Instant) -> bool {
        p.answered.is_some()
            || (p.established() && (!self.answers_tracked || now < p.first_seen + UNANSWERED_COUNTS_FOR))
    }

    /// Number of peers in the table.
    pub fn len(&self) -> usize {
        self.lock().peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, node: &NodeId) -> Option<Peer> {
        self.lock().peers.get(node).cloned()
    }

    pub fn counters(&self) -> Counters {
        self.lock().counters.clone()
    }

    /// An announce came from one of this host's own addresses (another process here).
    pub fn from_this_host(&self) {
        self.lock().counters.from_this_host += 1;
    }

    /// Resolves when the table next gains or loses a peer.
    pub async fn changed(&self) {
        self.changes.joined_or_left().await
    }

    /// The table's generation, which changes whenever a peer joins or leaves or a peer's
    /// summary version changes: what the proxy's summary loop waits on.
    pub fn watch_summaries(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests;
