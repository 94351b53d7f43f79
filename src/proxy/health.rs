//! How good each source has been: the proxy's policy, kept apart from the beacon's membership.
//!
//! Peers that fail are backed off exponentially, a lie counts as [`LIE_WEIGHT`] failures, a
//! verified NAR clears a peer's failures; the narinfo latency is smoothed for the fan-out order.
//! Back-off demotes, it does not exclude: a backed-off peer is asked last, as a last resort. A
//! wrong NAR counts first against that path on that peer: the peer is not asked for that NAR
//! again (for [`BAD_PATH_FOR`]), but stays a source of everything else, since one bad file on a
//! disk says little about the rest. A node whose announced address is served by another node (or
//! by a server naming none) is an impostor *at that address*: never asked there again, and no
//! other node claiming that address is asked while the address is known to belong to someone
//! else. The mark is per (node, address), not per node: an attacker who announces an honest
//! host's node id from its own address for a moment must not make the proxy distrust the host
//! at its real address. An upstream that could not be
//! reached is skipped for [`UPSTREAM_DOWN_FOR`] (offline: fast misses). A peer that let a lookup
//! wait its whole budget (accepted the connection, then said nothing: a suspended host) is
//! *asleep*: skipped in lookups until it announces again or answers (`Health::silent_since`).
//!
//! Bounds (LRU, least recently used forgotten first): health of [`MAX_TRACKED_PEERS`] peers
//! (about 100 bytes each), [`MAX_BAD_PATHS`] bad (peer, NAR) pairs (about 80 bytes each),
//! [`MAX_ADDR_OWNERS`] address owners and [`MAX_IMPOSTORS`] impostor marks (about 80 bytes
//! each): under 1.5 MiB in all; one slot per
//! configured upstream.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::Duration;

use lru::LruCache;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::source::{SourceError, SourceId};
use crate::beacon::wire::NodeId;
use crate::narinfo::NarHash;

/// First back-off after a failure; doubles per consecutive failure.
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A source caught lying is backed off as after this many failures.
pub const LIE_WEIGHT: u32 = 3;
/// An upstream that could not be reached is skipped for this long (offline: fast misses).
pub const UPSTREAM_DOWN_FOR: Duration = Duration::from_secs(30);
/// Broken summary claims after which a peer's summary may stop being believed.
pub const DISTRUST_AFTER: u32 = 8;
/// Peers whose health is remembered (more than the peer table holds).
pub const MAX_TRACKED_PEERS: usize = 4096;
/// A peer that sent a wrong NAR is not asked for that NAR again for this long.
pub const BAD_PATH_FOR: Duration = Duration::from_secs(3600);
/// (peer, NAR) pairs remembered as bad.
pub const MAX_BAD_PATHS: usize = 4096;
/// Addresses whose real owner (the node id its server names) is remembered.
pub const MAX_ADDR_OWNERS: usize = 4096;
/// (node, address) pairs remembered as impostors.
pub const MAX_IMPOSTORS: usize = 4096;
/// How long an address's owner is trusted without a new answer from it (addresses get reused).
pub const ADDR_OWNER_FOR: Duration = Duration::from_secs(600);

/// What the proxy learned about one peer.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Health {
    pub consecutive_failures: u32,
    pub successes: u64,
    pub failures: u64,
    /// Smoothed time to answer a narinfo request, in ms (none until one answered).
    pub latency_ms: Option<f64>,
    /// Asked only as a last resort before this.
    #[serde(skip)]
    pub backoff_until: Option<Instant>,
    /// The server at this peer's current address named another node (or none): not asked there
    /// again. Filled in for reports ([`SourceHealth::impostor_at`] is the record).
    pub impostor: bool,
    /// Lookups its summary said "maybe" to and its server answered with the narinfo.
    pub claims_kept: u32,
    /// Lookups its summary said "maybe" to and its server answered 404.
    pub claims_broken: u32,
    /// When a lookup last waited its whole budget for this peer's narinfo (a suspended host:
    /// its kernel still accepts connections, nobody answers); until it announces again (or
    /// answers), lookups skip it.
    #[serde(skip)]
    pub silent_since: Option<Instant>,
}

impl Health {
    pub fn backed_off(&self, now: Instant) -> bool {
        self.backoff_until.is_some_and(|t| t > now)
    }

    /// Silent since before its last announce (`last_announce`): asleep, not to be asked.
    pub fn asleep(&self, last_announce: Instant) -> bool {
        self.silent_since.is_some_and(|t| last_announce <= t)
    }

    /// Its summary claims paths its server does not have, far more often than an honest
    /// filter's false positives (1 in 65,000) or a stale summary would: it is not believed
    /// (the peer is asked as one with no summary).
    pub fn summary_distrusted(&self) -> bool {
        self.claims_broken >= DISTRUST_AFTER && self.claims_broken > 4 * self.claims_kept
    }
}

/// How a source did, as the proxy judged it.
#[derive(Debug)]
pub enum Verdict<'a> {
    /// Delivered a NAR that verified.
    Delivered,
    /// Failed, timed out or sent something unusable; lies among these are weighted.
    Failed(&'a SourceError),
    /// Sent bytes of this NAR that did not match its signed hash and size.
    LiedAbout(NarHash),
}

pub struct SourceHealth {
    peers: Mutex<LruCache<NodeId, Health>>,
    /// (peer, NAR) pairs the peer sent wrong bytes for, and when.
    bad_paths: Mutex<LruCache<(NodeId, NarHash), Instant>>,
    /// Which node the server at an address named (`None`: no node id at all), and when.
    addr_owners: Mutex<LruCache<SocketAddr, (Option<NodeId>, Instant)>>,
    /// (node, address) pairs where the server was not that node.
    impostors: Mutex<LruCache<(NodeId, SocketAddr), ()>>,
    /// Per upstream: skipped until this instant.
    upstream_down: Mutex<Vec<Option<Instant>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn cap(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN)
}

impl SourceHealth {
    pub fn new(upstreams: usize) -> Self {
        Self {
            peers: Mutex::new(LruCache::new(cap(MAX_TRACKED_PEERS))),
            bad_paths: Mutex::new(LruCache::new(cap(MAX_BAD_PATHS))),
            addr_owners: Mutex::new(LruCache::new(cap(MAX_ADDR_OWNERS))),
            impostors: Mutex::new(LruCache::new(cap(MAX_IMPOSTORS))),
            upstream_down: Mutex::new(vec![None; upstreams]),
        }
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, LruCache<NodeId, Health>> {
        lock(&self.peers)
    }

    /// Records a verdict. Returns true when it was a lie (for the counters).
    pub fn judge(&self, s: &SourceId, v: Verdict<'_>, now: Instant) -> bool {
        let lie = match &v {
            Verdict::Delivered => false,
            Verdict::Failed(e) => e.is_lie(),
            Verdict::LiedAbout(_) => true,
        };
        match s {
            SourceId::Peer(n) => {
                if let Verdict::LiedAbout(nar) = v {
                    lock(&self.bad_paths).put((*n, nar), now);
                }
                let mut peers = self.peers();
                let h = peers.get_or_insert_mut(*n, Health::default);
                match v {
                    Verdict::Delivered => {
                        h.silent_since = None;
                        h.successes += 1;
                        h.consecutive_failures = 0;
                        h.backoff_until = None;
                    }
                    // Busy is not a failure: the peer has the NAR and said so (issue #24).
                    Verdict::Failed(SourceError::Busy { .. }) => {}
                    // Marked per address by the caller (`impostor_at`).
                    Verdict::Failed(SourceError::NotThePeer { .. }) => {
                        h.failures += 1;
                    }
                    Verdict::Failed(_) | Verdict::LiedAbout(_) => {
                        let weight = if lie { LIE_WEIGHT } else { 1 };
                        h.failures += 1;
                        h.consecutive_failures = h.consecutive_failures.saturating_add(weight);
                        let exp = h.consecutive_failures.saturating_sub(1).min(16);
                        h.backoff_until = Some(now + BACKOFF_BASE.saturating_mul(1 << exp).min(BACKOFF_MAX));
                    }
                }
            }
            SourceId::Upstream(i) => {
                if matches!(v, Verdict::Failed(e) if e.is_unreachable()) {
                    if let Some(slot) = self.upstream_down.lock().unwrap_or_else(|p| p.into_inner()).get_mut(*i) {
                        *slot = Some(now + UPSTREAM_DOWN_FOR);
                    }
                }
            }
        }
        lie
    }

    /// A peer whose summary claimed a path answered (`kept`: with its narinfo; else 404).
    pub fn summary_claim(&self, node: &NodeId, kept: bool) {
        let mut peers = self.peers();
        let h = peers.get_or_insert_mut(*node, Health::default);
        if kept {
            h.claims_kept = h.claims_kept.saturating_add(1);
        } else {
            h.claims_broken = h.claims_broken.saturating_add(1);
        }
    }

    /// A lookup waited its whole budget for `node` at `now`: skipped until it announces again
    /// or answers ([`Health::asleep`]).
    pub fn silent(&self, node: &NodeId, now: Instant) {
        self.peers().get_or_insert_mut(*node, Health::default).silent_since = Some(now);
    }

    /// `node` answered (a narinfo, a summary): awake.
    pub fn awake(&self, node: &NodeId) {
        if let Some(h) = self.peers().get_mut(node) {
            h.silent_since = None;
        }
    }

    /// Whether `node`, which last announced at `last_announce`, is asleep ([`Health::asleep`]).
    pub fn asleep(&self, node: &NodeId, last_announce: Instant) -> bool {
        self.peers().peek(node).is_some_and(|h| h.asleep(last_announce))
    }

    /// A peer answered a narinfo request in `took`.
    pub fn latency(&self, node: &NodeId, took: Duration) {
        let ms = took.as_secs_f64() * 1000.0;
        let mut peers = self.peers();
        let h = peers.get_or_insert_mut(*node, Health::default);
        h.latency_ms = Some(match h.latency_ms {
            Some(old) => old * 0.8 + ms * 0.2,
            None => ms,
        });
    }

    /// The health of a peer (default for one never judged).
    pub fn peer(&self, node: &NodeId) -> Health {
        self.peers().peek(node).cloned().unwrap_or_default()
    }

    /// Backed off: asked only as a last resort.
    pub fn backed_off(&self, node: &NodeId, now: Instant) -> bool {
        self.peers().peek(node).is_some_and(|h| h.backed_off(now))
    }

    /// Whether `node` may be asked at all (for anything) at `addr`: not an impostor, and `addr`
    /// not known (recently) to belong to another node that is still announced, or to none.
    pub fn may_ask(&self, node: &NodeId, addr: SocketAddr, still_announced: impl Fn(&NodeId) -> bool) -> bool {
        if self.is_impostor(node, addr) {
            return false;
        }
        match lock(&self.addr_owners).peek(&addr) {
            Some((owner, at)) if at.elapsed() < ADDR_OWNER_FOR => match owner {
                Some(o) => o == node || !still_announced(o),
                None => false,
            },
            _ => true,
        }
    }

    /// The server at `addr` was not `node` (it named another node, or none).
    pub fn impostor_at(&self, node: &NodeId, addr: SocketAddr) {
        lock(&self.impostors).put((*node, addr), ());
    }

    /// Whether `node` was found an impostor at `addr`.
    pub fn is_impostor(&self, node: &NodeId, addr: SocketAddr) -> bool {
        lock(&self.impostors).contains(&(*node, addr))
    }

    /// Records which node the server at `addr` named (after any answer from a peer).
    pub fn addr_owner(&self, addr: SocketAddr, owner: Option<NodeId>) {
        lock(&self.addr_owners).put(addr, (owner, Instant::now()));
    }

    /// False when `node` sent wrong bytes for this NAR recently.
    pub fn may_ask_for(&self, node: &NodeId, nar: &NarHash) -> bool {
        let mut bad = lock(&self.bad_paths);
        match bad.peek(&(*node, *nar)) {
            Some(at) if at.elapsed() < BAD_PATH_FOR => false,
            Some(_) => {
                bad.pop(&(*node, *nar));
                true
            }
            None => true,
        }
    }

    /// True unless the upstream was found unreachable less than [`UPSTREAM_DOWN_FOR`] ago.
    pub fn upstream_up(&self, i: usize, now: Instant) -> bool {
        let down = self.upstream_down.lock().unwrap_or_else(|p| p.into_inner());
        down.get(i).copied().flatten().is_none_or(|t| t <= now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_lies_weigh_more_and_success_resets() {
        let h = SourceHealth::new(1);
        let now = Instant::now();
        let n = NodeId([2; 16]);
        let p = SourceId::Peer(n);
        assert!(!h.judge(&p, Verdict::Failed(&SourceError::Timeout), now));
        assert!(!h.judge(&p, Verdict::Failed(&SourceError::Timeout), now));
        assert!(h.backed_off(&n, now + Duration::from_millis(1900)));
        assert!(!h.backed_off(&n, now + Duration::from_millis(2001)));
        h.judge(&p, Verdict::Delivered, now);
        assert!(!h.backed_off(&n, now));
        assert_eq!(h.peer(&n).successes, 1);
        // One lie backs off as long as three failures, and marks that NAR on that peer only.
        let (bad, good) = (NarHash::from_digest([1; 32]), NarHash::from_digest([2; 32]));
        assert!(h.judge(&p, Verdict::LiedAbout(bad), now));
        assert_eq!(h.peer(&n).consecutive_failures, LIE_WEIGHT);
        assert!(h.backed_off(&n, now + Duration::from_millis(3900)));
        assert!(!h.backed_off(&n, now + Duration::from_millis(4001)));
        assert!(!h.may_ask_for(&n, &bad));
        assert!(h.may_ask_for(&n, &good), "one bad NAR does not shut the peer out");
        assert!(h.may_ask_for(&NodeId([3; 16]), &bad));
        tokio::time::advance(BAD_PATH_FOR).await;
        assert!(h.may_ask_for(&n, &bad), "forgiven after BAD_PATH_FOR");
    }

    #[tokio::test(start_paused = true)]
    async fn impostors_and_addresses_of_others_are_not_asked() {
        let h = SourceHealth::new(0);
        let (real, forged, other) = (NodeId([1; 16]), NodeId([2; 16]), NodeId([3; 16]));
        let addr: SocketAddr = "10.0.0.5:8380".parse().expect("addr");
        let live = |_: &NodeId| true;
        assert!(h.may_ask(&forged, addr, live), "unknown: asked once");
        h.judge(
            &SourceId::Peer(forged),
            Verdict::Failed(&SourceError::NotThePeer { found: None, at: None }),
            Instant::now(),
        );
        h.impostor_at(&forged, addr);
        h.addr_owner(addr, Some(real));
        assert!(!h.may_ask(&forged, addr, live), "an impostor is never asked again");
        assert!(
            !h.may_ask(&other, addr, live),
            "nor is another node claiming a known address"
        );
        assert!(h.may_ask(&real, addr, live), "its owner is");
        assert!(
            h.may_ask(&other, addr, |n| *n != real),
            "once the owner left, the address is free"
        );
        // A hijacker announced the real node's id from its own address for a moment and its
        // server named nobody: the real node stays trusted at its own address.
        let hijacker: SocketAddr = "10.0.0.9:8380".parse().expect("addr");
        h.impostor_at(&real, hijacker);
        assert!(
            h.may_ask(&real, addr, live),
            "distrusted only at the hijacker's address"
        );
        assert!(!h.may_ask(&real, hijacker, live));
        let nobody: SocketAddr = "10.0.0.6:8380".parse().expect("addr");
        h.addr_owner(nobody, None);
        assert!(
            !h.may_ask(&real, nobody, live),
            "a server that names no node is no peer"
        );
        tokio::time::advance(ADDR_OWNER_FOR).await;
        assert!(
            h.may_ask(&real, nobody, live),
            "address records expire (addresses get reused)"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_upstream_is_skipped_for_a_while() {
        let h = SourceHealth::new(2);
        let now = Instant::now();
        h.judge(&SourceId::Upstream(1), Verdict::Failed(&SourceError::Timeout), now);
        h.judge(&SourceId::Upstream(0), Verdict::Failed(&SourceError::Status(500)), now);
        assert!(h.upstream_up(0, now), "a 500 is an answer, not unreachable");
        assert!(!h.upstream_up(1, now));
        assert!(h.upstream_up(1, now + UPSTREAM_DOWN_FOR));
    }
}
