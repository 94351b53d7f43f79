//! The peer table: who announced what, and from where (membership only: how good a peer is as a
//! source is the proxy's business, in `proxy::health`).
//!
//! (About 600 lines: admission, moves and pinning, expiry and the per-source buckets all work
//! under the one lock and share its invariants; the tests are in `table_tests.rs`.)
//!
//! Pure logic over `tokio::time::Instant` (so tests can pause time); the network loop feeds it
//! datagrams. A peer leaves after three of its own announce intervals of silence, or at once on
//! a goodbye: one carrying the secret whose commitment its announces carried, or, from a peer
//! that announced no commitment (an older version), one from an address it announced from.
//!
//! Under pressure, useful peers stay: a peer is *useful* once its store server answered this
//! host's proxy naming its node id at a listed address ([`PeerTable::answered`]: a narinfo, a NAR,
//! or the content-summary fetch every peer that announces a summary gets within a second or so).
//! When the table is full, a new node id takes the place of the entry held longest of those that
//! never answered, established or not (announces cost nothing to forge, from any number of
//! spoofed addresses; an answer over HTTP does). A flood of identities, one-off or kept
//! refreshed, therefore never pushes out the hall's real hosts, and a late-comer gets in and
//! stays until its server answered, unless the attacker re-enters identities faster than the
//! table's unanswered entries per time a newcomer needs to answer (about 1,500 a second).
//! One source address holds at most [`MAX_PEERS_PER_ADDR`] node ids, counting every entry that
//! lists it. A peer is *established* once it has announced [`ESTABLISHED_ANNOUNCES`] times (what
//! the traffic budget, the query sampling and peer exchange count).
//! Rate-limit buckets are an LRU of [`MAX_SOURCES`]: a new source evicts the least recently seen
//! one (which starts afresh if it comes back), so spoofed sources cannot lock an honest peer out.
//!
//! A node id is *contested* while a family would list two of its addresses, none proven (or,
//! once proven in one family, when the other family claims it): the announcing address is
//! queued, from its second claim on ([`PeerTable::take_proofs_wanted`]), for
//! `identity::verify_loop` to ask its store server which id it holds; the address that proves
//! the id holds it ([`PeerTable::proof_result`]), and announces of the id from unproven
//! addresses of that family are ignored from then on, as are announces of other ids from that
//! address. A failed request is retried (after 2 s, doubling) while the contest lasts. Until then, and between older hosts that cannot prove their ids:
//! a live peer's node id stays at its address: an established id announced from a new address of
//! a family it is listed with is taken as a move ([`Move`]) only until one of the addresses it
//! left announces again; then the move is undone and the id *pinned* (a second address is ignored
//! while the peer is alive, counted `contested`). A bound id (the node id is its commitment) is
//! never held by an announce with another commitment.
//!
//! Bounds: [`MAX_PEERS`] peers (about 600 bytes each with a hostname and a move being watched:
//! under 1.5 MiB), buckets for
//! [`MAX_SOURCES`] sources (about 64 bytes each), [`identity::MAX_ASKED`] asked addresses (about
//! 120 bytes each); constant work per datagram under the lock except a new node id's admission
//! (linear in the table, bounded by the rate limits); a signed goodbye's signature is checked
//! outside the lock, at most [`MAX_SIGNATURE_CHECKS_PER_SEC`].

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lru::LruCache;
use serde::Serialize;
use tokio::time::Instant;

use super::identity::{self, Identity};
use super::wire::{self, Beacon, DecodeError, Kind, NodeId};

/// Most peers in the table (a hall of hundreds of hosts, with room to spare).
pub const MAX_PEERS: usize = 2048;
/// Most node ids announced from one source address: a host restarting gets a new id while its
/// old one has not expired yet, and a test bed may run a few `serve` on one address.
pub const MAX_PEERS_PER_ADDR: usize = 4;
/// Announces after which a peer is established (no longer on probation).
pub const ESTABLISHED_ANNOUNCES: u32 = 3;
/// Source addresses tracked for rate limiting (LRU).
pub const MAX_SOURCES: usize = 4096;
/// Datagrams per second allowed per source address (token bucket refill rate).
pub const RATE_PER_SEC: f64 = 20.0;
/// Signed goodbyes whose signature is checked per second, from all sources together (a
/// hall's goodbyes are a few a second; more are ignored, and their hosts expire instead).
pub const MAX_SIGNATURE_CHECKS_PER_SEC: f64 = 200.0;
/// Token bucket size per source address.
pub const RATE_BURST: f64 = 40.0;
/// In the table of a node whose proxy reports answers ([`PeerTable::answered`]), an established
/// peer that never answered counts as part of the hall (the traffic budget, the query sampling,
/// the `GET /peers` list) only this long after it joined: time for an honest host's summary to
/// be fetched, while identities forged and kept refreshed stop stretching every interval and
/// silencing the answers to a newcomer's query.
pub const UNANSWERED_COUNTS_FOR: Duration = Duration::from_secs(10);
/// [`PeerTable::next_expiry`], asked again after the cached earliest expiry passed, scans the
/// table at most once per this.
pub const EXPIRY_RESCAN: Duration = Duration::from_millis(100);
/// A peer silent for this many of its intervals is dropped.
pub const EXPIRY_INTERVALS: u32 = 3;
/// Addresses remembered per peer (a host on several links or with IPv4 and IPv6).
const MAX_ADDRS_PER_PEER: usize = 4;
/// A node id contested once (announced from a second address while alive at its first) moves
/// to a new address only after its listed addresses were silent for this many of its intervals
/// (more than one interval plus the ±20 % jitter: it really left them).
pub const MOVE_SILENCE_INTERVALS: f64 = 1.5;

/// An established peer's move to a new address of one family, kept until the addresses it left
/// have been silent for [`EXPIRY_INTERVALS`] of its interval: if one of them announces again
/// meanwhile, the node did not move; someone else announced its id from `to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    /// The new address.
    pub to: SocketAddr,
    /// The addresses of the same family it was listed with before.
    pub from: Vec<SocketAddr>,
    pub at: Instant,
}
#[derive(Clone, Debug)]
pub struct Peer {
    pub node: NodeId,
    /// Source addresses with the beacon's store port, most recently seen first.
    pub addrs: Vec<SocketAddr>,
    pub flags: u16,
    pub hostname: Option<String>,
    pub first_seen: Instant,
    pub last_seen: Instant,
    /// The peer's own announce interval.
    pub interval: Duration,
    pub seq: u32,
    /// Version of the peer's content summary, when it publishes one.
    pub summary: Option<u64>,
    /// Commitment to its goodbye secret, when it announced one.
    pub commitment: Option<[u8; wire::SECRET_LEN]>,
    /// Announces received from it.
    pub announces: u32,
    /// Its latest move to another address, while the move can still be undone.
    pub moved: Option<Move>,
    /// Its id was announced from a second address while it was alive at its first: from now on
    /// it moves only after [`MOVE_SILENCE_INTERVALS`] of silence at its listed addresses.
    pub pinned: bool,
    /// Its store server last answered this host's proxy, naming its node id, at one of its
    /// addresses ([`PeerTable::answered`]): a sign of life when its announces are lost (a link
    /// saturated by a download drops multicast first).
    pub answered: Option<Instant>,
    /// Addresses (with port, and scope for IPv6 link-local) whose store server proved the node
    /// id (`identity`): once a family has one, announces of the id from other addresses of that
    /// family are ignored until they prove it.
    pub proven: Vec<SocketAddr>,
}

impl Peer {
    /// The store server address to use: the most recent IPv4 one, else the most recent.
    pub fn http_addr(&self) -> SocketAddr {
        self.addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(self.addrs.first())
            .copied()
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Announced often enough to be kept over newcomers when the table is full.
    pub fn established(&self) -> bool {
        self.announces >= ESTABLISHED_ANNOUNCES
    }

    /// Its node id was made from its commitment ([`wire::bound_identity`]).
    pub fn bound(&self) -> bool {
        self.commitment == Some(self.node.0)
    }

    /// A new entry for an announce of `b` from `addr`.
    fn new(b: &Beacon, addr: SocketAddr, now: Instant) -> Self {
        Self {
            node: b.node,
            addrs: vec![addr],
            flags: b.flags,
            hostname: b.hostname.clone(),
            first_seen: now,
            last_seen: now,
            interval: Duration::from_millis(b.interval_ms.into()),
            seq: b.seq,
            summary: b.summary,
            commitment: b.commitment,
            announces: 1,
            moved: None,
            pinned: false,
            answered: None,
            proven: Vec::new(),
        }
    }

    /// Three intervals after it was last heard: announced, or answered over HTTP.
    fn expires_at(&self) -> Instant {
        self.last_seen.max(self.answered.unwrap_or(self.last_seen)) + self.interval * EXPIRY_INTERVALS
    }
}

/// Counts of what arrived and why anything was dropped.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Counters {
    pub received: u64,
    pub announces: u64,
    pub queries: u64,
    pub goodbyes: u64,
    pub too_short: u64,
    pub invalid: u64,
    pub wrong_version: u64,
    pub own: u64,
    pub rate_limited: u64,
    pub table_full: u64,
    /// Failed the on-link checks (unicast, or a source not on the link).
    #[serde(default)]
    pub off_link: u64,
    /// Announces of a live peer's node id from a second address (ignored, or undone).
    #[serde(default)]
    pub contested: u64,
    /// Entries that never answered, pushed out of a full table by a newcomer.
    #[serde(default)]
    pub displaced: u64,
    pub expired: u64,
}

/// What one datagram did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A new peer.
    Joined(Beacon),
    /// A known peer announced again.
    Refreshed(Beacon),
    /// A peer said goodbye and left.
    Left(Beacon),
    /// Someone asks every host to announce now.
    Query(Beacon),
    /// Decoded, but nothing to do (own beacon, goodbye of an unknown peer, table full).
    Ignored(Beacon, &'static str),
    /// Not decoded.
    Invalid(DecodeError),
    /// Not from this link (not decoded): why.
    OffLink(&'static str),
    RateLimited,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// What this host knows of the store server at one address (IP, port and scope).
#[derive(Clone, Copy, Debug)]
struct Asked {
    /// When it was last asked.
    at: Instant,
    /// What it answered.
    state: AskState,
    /// Requests in a row that proved nothing (no answer, 404, or a bad proof).
    failures: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AskState {
    /// A claim came from it once: asked only when one comes again (a single spoofed datagram
    /// never makes the hall send requests to a third host).
    Heard,
    /// Queued or being asked.
    Pending,
    /// It proved this node id (whatever id the announce that made us ask named: the answer
    /// carries the key, so one request settles every claim made at the address).
    Holds(NodeId),
    /// No proof.
    Failed,
}

/// How long after `failures` requests in a row that proved nothing an address is asked again
/// (2 s, doubling, at most [`identity::ASK_AGAIN_AFTER`]).
fn retry_after(failures: u32) -> Duration {
    identity::FIRST_RETRY
        .saturating_mul(1 << failures.saturating_sub(1).min(8))
        .min(identity::ASK_AGAIN_AFTER)
}

struct Inner {
    peers: HashMap<NodeId, Peer>,
    /// Addresses whose store server should be asked to prove a node id (a contest), with the id
    /// claimed there (for the log), at most [`identity::MAX_PENDING`].
    proofs: VecDeque<(NodeId, SocketAddr)>,
    /// Per store-server address (IP, port, scope; LRU of [`identity::MAX_ASKED`]): when it was
    /// last asked and what it proved. An address is asked at most once per
    /// [`identity::ASK_AGAIN_AFTER`] when it answered (its answer names the id it holds, so
    /// forged contests for any number of ids at a victim's address cost it one request per
    /// window from each host), and again after [`retry_after`] when it did not.
    asked: LruCache<SocketAddr, Asked>,
    /// Rate-limit buckets by source (LRU: new sources evict the least recently seen).
    buckets: LruCache<IpAddr, Bucket>,
    /// Signed goodbyes checked, from every source together.
    signature_checks: Bucket,
    /// The last scan for the earliest expiry: when, and what it found ([`PeerTable::next_expiry`]).
    expiry_cache: Option<(Instant, Option<Instant>)>,
    /// Scans for the earliest expiry done (for tests).
    expiry_scans: u64,
    counters: Counters,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            peers: HashMap::new(),
            proofs: VecDeque::new(),
            asked: LruCache::new(NonZeroUsize::new(identity::MAX_ASKED).unwrap_or(NonZeroUsize::MIN)),
            buckets: LruCache::new(NonZeroUsize::new(MAX_SOURCES).unwrap_or(NonZeroUsize::MIN)),
            signature_checks: Bucket {
                tokens: MAX_SIGNATURE_CHECKS_PER_SEC,
                last: Instant::now(),
            },
            expiry_cache: None,
            expiry_scans: 0,
            counters: Counters::default(),
        }
    }
}

impl Inner {
    /// The node id the store server at `addr` proved within the last
    /// [`identity::ASK_AGAIN_AFTER`].
    fn holder(&mut self, addr: SocketAddr, now: Instant) -> Option<NodeId> {
        match self.asked.peek(&addr) {
            Some(Asked {
                at,
                state: AskState::Holds(n),
                ..
            }) if now < *at + identity::ASK_AGAIN_AFTER => Some(*n),
            _ => None,
        }
    }

    /// Queues `addr`'s store server to be asked for a proof of `node` (unless it is being
    /// asked, answered lately, or failed lately); true when queued. A full queue gives up a
    /// random waiting address for it (asked again when it announces again): a flood of
    /// contests at addresses where nothing answers cannot keep a real claimant out for good.
    fn want_proof(&mut self, node: NodeId, addr: SocketAddr, now: Instant) -> bool {
        let failures = match self.asked.get(&addr) {
            None => {
                self.asked.put(
                    addr,
                    Asked {
                        at: now,
                        state: AskState::Heard,
                        failures: 0,
                    },
                );
                return false;
            }
            Some(a) => {
                let wait = match a.state {
                    AskState::Heard => Duration::ZERO,
                    AskState::Pending | AskState::Holds(_) => identity::ASK_AGAIN_AFTER,
                    AskState::Failed => retry_after(a.failures),
                };
                if now < a.at + wait {
                    return false;
                }
                a.failures
            }
        };
        if self.proofs.len() >= identity::MAX_PENDING {
            let i = rand::Rng::gen_range(&mut rand::thread_rng(), 0..self.proofs.len());
            if let Some((_, dropped)) = self.proofs.remove(i) {
                self.asked.pop(&dropped);
            }
        }
        self.asked.put(
            addr,
            Asked {
                at: now,
                state: AskState::Pending,
                failures,
            },
        );
        self.proofs.push_back((node, addr));
        true
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
        let Some(p) = self.peers.get_mut(node) else {
            return;
        };
        if !p.proven.contains(&addr) {
            p.proven.insert(0, addr);
            p.proven.truncate(MAX_ADDRS_PER_PEER);
        }
        let proven = p.proven.clone();
        p.addrs.retain(|a| a.is_ipv4() != addr.is_ipv4() || proven.contains(a));
        if !p.addrs.contains(&addr) {
            p.addrs.insert(0, addr);
            p.addrs.truncate(MAX_ADDRS_PER_PEER);
        }
        p.moved = None;
        p.pinned = true;
    }

    /// A peer joined or was refreshed and now expires at `at`: the cached earliest expiry
    /// ([`PeerTable::next_expiry`]) must not be later.
    fn note_expiry(&mut self, at: Instant) {
        if let Some((_, min)) = &mut self.expiry_cache {
            if min.is_none_or(|m| at < m) {
                *min = Some(at);
            }
        }
    }

    /// Makes room for a new node id from `ip` (`answers_tracked`: this table's node reports
    /// answers, see [`PeerTable::answered`]): false when its address already holds its share
    /// (every entry listing the address counts, not only those first heard there), or the table
    /// is full of peers whose store servers answered this host.
    ///
    /// At its share, the address makes room from its own entries whose store server never
    /// answered and never proved the id there (longest held first; an entry that lists other
    /// addresses too only loses this one): four ids announced from a host's address by someone
    /// else, before the host's new per-run id, do not lock the host out.
    fn admit(&mut self, ip: IpAddr, answers_tracked: bool) -> Result<(), &'static str> {
        let mut at_addr: Vec<&Peer> = self
            .peers
            .values()
            .filter(|p| p.addrs.iter().any(|a| a.ip() == ip))
            .collect();
        if at_addr.len() >= MAX_PEERS_PER_ADDR {
            at_addr.retain(|p| p.answered.is_none() && !p.proven.iter().any(|a| a.ip() == ip));
            let Some(v) = at_addr.iter().min_by_key(|p| (p.first_seen, p.node)).map(|p| p.node) else {
                return Err("address holds its share of node ids, all answered");
            };
            if let Some(p) = self.peers.get_mut(&v) {
                p.addrs.retain(|a| a.ip() != ip);
                if p.addrs.is_empty() {
                    self.peers.remove(&v);
                }
            }
            self.counters.displaced += 1;
        }
        if self.peers.len() < MAX_PEERS {
            return Ok(());
        }
        // Full: the entry held longest of those whose store server never answered this host
        // makes room, established or not. Announcing is free and any number of source addresses
        // can be spoofed on a link, so announces prove nothing; an answer over HTTP naming the
        // node id at a listed address does (`answered`). Oldest first: a persistent flood is
        // pushed out by newcomers one at a time, and a newcomer is the last of the unanswered to
        // go, with time to answer.
        // A proof over `GET /identity` names the id at an address as an answer does. In a
        // table without answers reported (the `peers` tool), nobody ever answered: there only
        // entries on probation (not established) make room, so a flood cannot push out the
        // established hall first.
        let victim = self
            .peers
            .values()
            .filter(|p| p.answered.is_none() && p.proven.is_empty() && (answers_tracked || !p.established()))
            .min_by_key(|p| (p.first_seen, p.node))
            .map(|p| p.node);
        match victim {
            Some(v) => {
                self.peers.remove(&v);
                self.counters.displaced += 1;
                Ok(())
            }
            None => Err("peer table full of peers that answered"),
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
    /// Woken when a proof is wanted (`identity::verify_loop`).
    proofs_wanted: tokio::sync::Notify,
    inner: Mutex<Inner>,
    /// Woken on every join or leave, for whoever waits for the table to change.
    changed: tokio::sync::Notify,
}

impl PeerTable {
    pub fn new(own: NodeId) -> Self {
        Self {
            own,
            identity: None,
            answers_tracked: false,
            proofs_wanted: tokio::sync::Notify::new(),
            inner: Mutex::new(Inner::default()),
            changed: tokio::sync::Notify::new(),
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
        self.lock().proofs.drain(..).collect()
    }

    /// The next (node, address) pair whose store server should be asked, oldest first.
    pub fn take_proof_wanted(&self) -> Option<(NodeId, SocketAddr)> {
        self.lock().proofs.pop_front()
    }

    /// Resolves when a proof is wanted.
    pub async fn proofs_wanted(&self) {
        self.proofs_wanted.notified().await
    }

    /// `addr`'s store server proved `node` (`identity`): the address holds the id; the
    /// addresses of its family that did not prove it are dropped, and announces of the id from
    /// them are ignored from now on.
    pub fn prove(&self, node: &NodeId, addr: SocketAddr) {
        self.lock().prove(node, addr);
    }

    /// The store server at `addr` was asked for a proof (`identity::verify_loop`): it proved
    /// `holder` (the id its key hashes to, whatever id was claimed there), or nothing. A proof
    /// settles the address ([`Self::prove`]) for every claim made there during
    /// [`identity::ASK_AGAIN_AFTER`]; no proof is asked again after [`retry_after`], as long as
    /// the contest lasts (a claimant announcing again).
    pub fn proof_result(&self, addr: SocketAddr, holder: Option<NodeId>, now: Instant) {
        let mut g = self.lock();
        let failures = g.asked.peek(&addr).map_or(0, |a| a.failures);
        let (state, failures) = match holder {
            Some(n) => (AskState::Holds(n), 0),
            None => (AskState::Failed, failures.saturating_add(1)),
        };
        g.asked.put(
            addr,
            Asked {
                at: now,
                state,
                failures,
            },
        );
        if let Some(n) = holder {
            g.prove(&n, addr);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
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
        if node == self.own || g.peers.contains_key(&node) || g.admit(addr.ip(), self.answers_tracked).is_err() {
            return false;
        }
        g.peers.insert(
            node,
            Peer {
                node,
                addrs: vec![addr],
                flags,
                hostname: None,
                first_seen: now,
                last_seen: now,
                interval,
                seq: 0,
                summary,
                commitment: None,
                announces: 0,
                moved: None,
                pinned: false,
                answered: None,
                proven: Vec::new(),
            },
        );
        g.note_expiry(now + interval * EXPIRY_INTERVALS);
        drop(g);
        self.changed.notify_waiters();
        true
    }

    /// Counts a datagram that failed the on-link checks (`why`), and says so.
    pub fn off_link(&self, why: &'static str) -> Outcome {
        let mut g = self.lock();
        g.counters.received += 1;
        g.counters.off_link += 1;
        Outcome::OffLink(why)
    }

    /// Handles one datagram from `src`.
    pub fn handle(&self, src: SocketAddr, data: &[u8], now: Instant) -> Outcome {
        let mut wanted = false;
        let mut g = self.lock();
        let inner = &mut *g;
        inner.counters.received += 1;
        if !allow(&mut inner.buckets, src.ip(), now) {
            inner.counters.rate_limited += 1;
            return Outcome::RateLimited;
        }
        let b = match wire::decode(data) {
            Ok(b) => b,
            Err(e) => {
                match e {
                    DecodeError::TooShort(_) => inner.counters.too_short += 1,
                    DecodeError::Version(_) => inner.counters.wrong_version += 1,
                    _ => inner.counters.invalid += 1,
                }
                return Outcome::Invalid(e);
            }
        };
        if b.node == self.own {
            inner.counters.own += 1;
            return Outcome::Ignored(b, "own beacon");
        }
        let outcome = match b.kind {
            Kind::Query => {
                inner.counters.queries += 1;
                Outcome::Query(b)
            }
            Kind::Goodbye => {
                inner.counters.goodbyes += 1;
                // Older proofs, cheap, under the lock.
                let (genuine, verify) = inner.peers.get(&b.node).map_or((false, false), |p| {
                    let genuine = match p.commitment {
                        // It committed to a secret: only that secret says goodbye.
                        Some(c) => b.proof.is_some_and(|s| wire::commitment(&s) == c),
                        // An older peer: from an address it announced from.
                        None => p.addrs.iter().any(|a| a.ip() == src.ip()),
                    };
                    // Signed by the key whose hash is its node id (checked only for a peer in
                    // the table whose goodbye is fresh and names a key that hashes to its id),
                    // and newer than its last announce: a signed goodbye copied off the link (a
                    // host sends one when a link loses an address and keeps its key) cannot be
                    // replayed after the host's next announce.
                    let verify = !genuine
                        && fresh_goodbye(p, &b)
                        && wire::signature(data).is_some_and(|s| identity::node_of(&s.key) == b.node);
                    (genuine, verify)
                });
                if genuine {
                    inner.peers.remove(&b.node);
                    Outcome::Left(b)
                } else if verify {
                    // The signature (about 50 us) is checked outside the lock, at most
                    // `MAX_SIGNATURE_CHECKS_PER_SEC` a second (anyone can copy a host's key from
                    // its `GET /identity` answer and send bad signatures under it).
                    if !take(&mut inner.signature_checks, now, MAX_SIGNATURE_CHECKS_PER_SEC) {
                        inner.counters.rate_limited += 1;
                        return Outcome::Ignored(b, "too many signed goodbyes to check");
                    }
                    drop(g);
                    let signed = identity::signed_by(data, &b.node);
                    let mut g = self.lock();
                    if signed && g.peers.get(&b.node).is_some_and(|p| fresh_goodbye(p, &b)) {
                        g.peers.remove(&b.node);
                        drop(g);
                        self.changed.notify_waiters();
                        return Outcome::Left(b);
                    }
                    return Outcome::Ignored(b, "goodbye with a bad signature");
                } else {
                    Outcome::Ignored(b, "goodbye without the peer's proof, or from an unknown peer")
                }
            }
            Kind::Announce => {
                inner.counters.announces += 1;
                let addr = SocketAddr::new(src.ip(), b.port);
                match addr_with_scope(addr, src) {
                    addr if inner.peers.contains_key(&b.node) => {
                        // A second address of a family the id is listed with: a contest (or a
                        // move); the store servers at every such address are asked to prove the
                        // id. Once one did, the family's other addresses are ignored.
                        // The store server there proved another id lately: the announce is
                        // someone else's (no request needed).
                        let holder = inner.holder(addr, now);
                        if holder.is_some_and(|n| n != b.node) {
                            inner.counters.contested += 1;
                            return Outcome::Ignored(b, "node id announced from an address that proved another");
                        }
                        let (unproven, contest) = inner.peers.get(&b.node).map_or((false, false), |p| {
                            let family = |a: &SocketAddr| a.is_ipv4() == addr.is_ipv4();
                            let unproven = p.proven.iter().any(family) && !p.proven.contains(&addr) && holder.is_none();
                            // A contest while the family would list two or more addresses, none
                            // proven: every announce of the id from one of them asks its store
                            // server (the second announce from an address, then again only after
                            // `retry_after` or the window), so a proof that failed is retried,
                            // also for an entry not established yet that listed both addresses.
                            let listed = p.addrs.iter().filter(|a| family(a) && **a != addr).count() + 1;
                            let other = p.addrs.iter().any(|a| !family(a));
                            let contest = p.announces > 0
                                && !p.proven.contains(&addr)
                                && ((listed >= 2 && !p.proven.iter().any(family))
                                    // A claim from another family, once the id is proven in one:
                                    // a contest too (listed after the proven addresses meanwhile,
                                    // so it is not tried first). Only then: every dual-stack host
                                    // would otherwise be asked by every host of the hall.
                                    || (other && !p.proven.is_empty()));
                            (unproven, contest)
                        });
                        if unproven {
                            wanted |= inner.want_proof(b.node, addr, now);
                            inner.counters.contested += 1;
                            if wanted {
                                self.proofs_wanted.notify_one();
                            }
                            return Outcome::Ignored(b, "node id announced from an address that did not prove it");
                        }
                        if contest && inner.want_proof(b.node, addr, now) {
                            // Now: the paths below may return early (a claim ignored while the
                            // id is pinned is still asked about).
                            self.proofs_wanted.notify_one();
                        }
                        if holder == Some(b.node) {
                            inner.prove(&b.node, addr);
                        }
                        let Some(p) = inner.peers.get_mut(&b.node) else {
                            return Outcome::Ignored(b, "gone");
                        };
                        if p.commitment.is_some() && b.commitment != p.commitment {
                            // An id made from its commitment (bound) cannot be announced with
                            // another one; an entry that is not bound came from an older peer
                            // or from a forger who announced the id first with a commitment
                            // of its own: a bound announce takes it over.
                            if b.bound() && !p.bound() {
                                *p = Peer::new(&b, addr, now);
                                inner.counters.contested += 1;
                                return Outcome::Refreshed(b);
                            }
                            // A node that committed to a goodbye secret keeps that commitment:
                            // announces naming it with another one are someone else's.
                            return Outcome::Ignored(b, "announce with another node's commitment");
                        }
                        if p.moved
                            .as_ref()
                            .is_some_and(|m| now >= m.at + p.interval * EXPIRY_INTERVALS)
                        {
                            // The addresses it left stayed silent: it moved.
                            p.moved = None;
                        }
                        if p.announces == 0 {
                            // Heard of through peer exchange: its own announce replaces
                            // what the list said, and its commitment now counts.
                            p.addrs.clear();
                            p.commitment = b.commitment;
                            p.first_seen = now;
                        } else if let Some(m) = p.moved.take_if(|m| m.from.contains(&addr) && p.addrs.contains(&m.to)) {
                            // The address it "moved" from speaks again: it never moved; another
                            // host announced its id from `m.to`. Undone, and pinned.
                            p.addrs.retain(|a| *a != m.to);
                            p.pinned = true;
                            inner.counters.contested += 1;
                        } else if p.established() && !p.addrs.contains(&addr) {
                            let from: Vec<SocketAddr> = p
                                .addrs
                                .iter()
                                .filter(|a| a.is_ipv4() == addr.is_ipv4())
                                .copied()
                                .collect();
                            if !from.is_empty() {
                                // Another address of a family it is listed with: a move, or
                                // someone announcing its id (node ids and commitments are in
                                // every announce), which cannot be told apart yet.
                                if p.pinned && now < p.last_seen + p.interval.mul_f64(MOVE_SILENCE_INTERVALS) {
                                    inner.counters.contested += 1;
                                    return Outcome::Ignored(
                                        b,
                                        "node id announced from a second address while alive at its own",
                                    );
                                }
                                p.moved = Some(Move {
                                    to: addr,
                                    from,
                                    at: now,
                                });
                            }
                        }
                        p.addrs.retain(|a| *a != addr);
                        p.addrs.insert(0, addr);
                        // Proven addresses first, then IPv4 ones (what `Peer::http_addr`
                        // prefers: a link-local claim for a host listed by IPv4 is not tried
                        // first); stable, so most recent first within each.
                        let proven = &p.proven;
                        p.addrs.sort_by_key(|a| (!proven.contains(a), a.is_ipv6()));
                        p.addrs.truncate(MAX_ADDRS_PER_PEER);
                        p.flags = b.flags;
                        p.hostname = b.hostname.clone();
                        p.last_seen = now;
                        p.interval = Duration::from_millis(b.interval_ms.into());
                        p.seq = b.seq;
                        p.summary = b.summary;
                        p.announces = p.announces.saturating_add(1);
                        Outcome::Refreshed(b)
                    }
                    addr => {
                        if inner.holder(addr, now).is_some_and(|n| n != b.node) {
                            inner.counters.contested += 1;
                            return Outcome::Ignored(b, "node id announced from an address that proved another");
                        }
                        if let Err(why) = inner.admit(addr.ip(), self.answers_tracked) {
                            inner.counters.table_full += 1;
                            return Outcome::Ignored(b, why);
                        }
                        inner.peers.insert(b.node, Peer::new(&b, addr, now));
                        Outcome::Joined(b)
                    }
                }
            }
        };
        if let Outcome::Joined(b) | Outcome::Refreshed(b) = &outcome {
            if let Some(at) = g.peers.get(&b.node).map(Peer::expires_at) {
                g.note_expiry(at);
            }
        }
        drop(g);
        if wanted {
            self.proofs_wanted.notify_one();
        }
        if matches!(outcome, Outcome::Joined(_) | Outcome::Left(_)) {
            self.changed.notify_waiters();
        }
        outcome
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
            self.changed.notify_waiters();
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
            self.changed.notify_waiters();
        }
        removed
    }

    /// When to look for expired peers next: never later than the next peer's expiry, if it
    /// stays silent. The beacon's loop asks on every turn, i.e. per datagram (a scan over every
    /// peer there was 15-18 % of a steady serve's CPU in a 500-host hall): the minimum found by
    /// the last scan is kept, lowered at once by every join or refresh that expires earlier
    /// ([`Inner::note_expiry`]), so it is never late; a refresh or departure can leave it early,
    /// and the table is scanned again only once that time has come (a look then finds nothing
    /// or the peer that expired), or at most once per [`EXPIRY_RESCAN`] when asked after it.
    pub fn next_expiry(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut g = self.lock();
        if let Some((at, min)) = g.expiry_cache {
            if min.is_none_or(|m| m > now) || now < at + EXPIRY_RESCAN {
                return min;
            }
        }
        let min = g.peers.values().map(Peer::expires_at).min();
        g.expiry_scans += 1;
        g.expiry_cache = Some((now, min));
        min
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

    /// Resolves when the table next gains or loses a peer.
    pub async fn changed(&self) {
        self.changed.notified().await
    }
}

/// IPv6 link-local addresses need the scope (interface) they were seen on to be reachable.
fn addr_with_scope(addr: SocketAddr, src: SocketAddr) -> SocketAddr {
    match (addr, src) {
        (SocketAddr::V6(mut a), SocketAddr::V6(s)) => {
            a.set_scope_id(s.scope_id());
            SocketAddr::V6(a)
        }
        _ => addr,
    }
}

/// Token bucket per source (the least recently seen source's bucket makes room for a new one);
/// false when the source is over its rate.
fn allow(buckets: &mut LruCache<IpAddr, Bucket>, ip: IpAddr, now: Instant) -> bool {
    let b = buckets.get_or_insert_mut(ip, || Bucket {
        tokens: RATE_BURST,
        last: now,
    });
    take_at(b, now, RATE_PER_SEC, RATE_BURST)
}

/// A goodbye that comes after `p`'s last announce (serial sequence numbers), or names a peer
/// that has not announced yet (heard of through peer exchange).
fn fresh_goodbye(p: &Peer, b: &Beacon) -> bool {
    p.announces == 0 || wire::seq_after(b.seq, p.seq)
}

/// A token from a bucket refilled at `rate` a second, holding at most `rate`.
fn take(b: &mut Bucket, now: Instant, rate: f64) -> bool {
    take_at(b, now, rate, rate)
}

fn take_at(b: &mut Bucket, now: Instant, rate: f64, burst: f64) -> bool {
    let refill = now.duration_since(b.last).as_secs_f64() * rate;
    b.tokens = (b.tokens + refill).min(burst);
    b.last = now;
    if b.tokens >= 1.0 {
        b.tokens -= 1.0;
        true
    } else {
        false
    }
}

#[cfg(test)]
mod tests;
