//! One peer of the table: where it announced from, what it announced, its [`Standing`] (heard
//! of, on probation, established), its [`Hold`] on its addresses (free, moved, pinned), and the
//! evidence that it is a host (its store server answered, or proved its id at an address). Each change an announce makes
//! to one entry is a method here; what involves other entries (admission, proofs that take an
//! address from another entry) is the table's.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use super::outcome::IgnoreReason;
use crate::beacon::wire::{self, Beacon, NodeId};

/// Announces after which a peer is established (no longer on probation).
pub const ESTABLISHED_ANNOUNCES: u32 = 3;
/// A peer silent for this many of its intervals is dropped.
pub const EXPIRY_INTERVALS: u32 = 3;
/// Addresses remembered per peer (a host on several links or with IPv4 and IPv6).
pub(super) const MAX_ADDRS_PER_PEER: usize = 4;
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
    /// Heard of, on probation or established: what its announces earned it.
    pub standing: Standing,
    /// Free, moved, or pinned: what a claim of its id from a new address can do.
    pub hold: Hold,
    /// Its store server last answered this host's proxy, naming its node id, at one of its
    /// addresses (`PeerTable::answered`): a sign of life when its announces are lost (a link
    /// saturated by a download drops multicast first).
    pub answered: Option<Instant>,
    /// Addresses (with port, and scope for IPv6 link-local) whose store server proved the node
    /// id (`identity`): once a family has one, announces of the id from other addresses of that
    /// family are ignored until they prove it.
    pub proven: Vec<SocketAddr>,
}

/// What a peer's own announces earned it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Heard of through peer exchange only: it has not announced itself (its address and
    /// interval are what a list said; its first announce replaces them).
    Hearsay,
    /// On probation: announced this many times, fewer than [`ESTABLISHED_ANNOUNCES`].
    Probation(u32),
    /// Announced [`ESTABLISHED_ANNOUNCES`] times or more: counted by the traffic budget, the
    /// query sampling and peer exchange, and taken to have moved when it announces from a new
    /// address.
    Established,
}

impl Standing {
    /// The standing after one more announce.
    fn announced(self) -> Self {
        let n = match self {
            Self::Hearsay => 1,
            Self::Probation(n) => n.saturating_add(1),
            Self::Established => return Self::Established,
        };
        if n >= ESTABLISHED_ANNOUNCES {
            Self::Established
        } else {
            Self::Probation(n)
        }
    }
}

/// How a peer's node id is held at its listed addresses: what an announce of it from a new
/// address of a family it is listed with does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hold {
    /// Never contested: the announce is taken as a move (when the peer is established).
    Free,
    /// It moved, and the move can still be undone: if an address it left announces again, it
    /// never moved (someone else announced its id from the new address).
    Moved(Move),
    /// Contested once (a move undone, or an address proved the id): a new address is ignored
    /// while the peer is alive; it moves only after [`MOVE_SILENCE_INTERVALS`] of silence at
    /// its listed addresses.
    Pinned,
    /// Pinned, and moved after that silence; the move can still be undone.
    PinnedMoved(Move),
}

impl Hold {
    pub fn pinned(&self) -> bool {
        matches!(self, Self::Pinned | Self::PinnedMoved(_))
    }

    /// Its latest move, while it can still be undone.
    pub fn moved(&self) -> Option<&Move> {
        match self {
            Self::Moved(m) | Self::PinnedMoved(m) => Some(m),
            Self::Free | Self::Pinned => None,
        }
    }

    /// The move being watched stands (the addresses it left stayed silent).
    fn settle(&mut self) {
        *self = if self.pinned() { Self::Pinned } else { Self::Free };
    }

    /// A move to `m.to`.
    fn move_to(&mut self, m: Move) {
        *self = if self.pinned() {
            Self::PinnedMoved(m)
        } else {
            Self::Moved(m)
        };
    }
}

/// What a claim of a listed peer's id from `addr` means for its proofs.
pub(super) struct Claim {
    /// The family has a proven address and this is not one (nor does the address hold the id).
    pub unproven: bool,
    /// The claimant's store server should be asked for a proof.
    pub contest: bool,
}

/// What an announce from a listed peer did to its addresses.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Announced {
    /// Taken: a refresh, a first own announce after peer exchange, or a (still undoable) move.
    Refreshed,
    /// An address it "moved" from spoke again: the move was undone and the id pinned.
    MoveUndone,
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
        self.standing == Standing::Established
    }

    /// Heard of through peer exchange only: it has not announced itself yet.
    pub fn hearsay(&self) -> bool {
        self.standing == Standing::Hearsay
    }

    /// Its node id was made from its commitment ([`wire::bound_identity`]).
    pub fn bound(&self) -> bool {
        self.commitment == Some(self.node.0)
    }

    /// A new entry for an announce of `b` from `addr`.
    pub(super) fn new(b: &Beacon, addr: SocketAddr, now: Instant) -> Self {
        Self {
            standing: Standing::Hearsay.announced(),
            seq: b.seq,
            commitment: b.commitment,
            hostname: b.hostname.clone(),
            ..Self::heard_of(
                b.node,
                addr,
                b.flags,
                Duration::from_millis(b.interval_ms.into()),
                b.summary,
                now,
            )
        }
    }

    /// Its store server at `addr` named `summary` as its summary version now. Kept only while
    /// it has never announced to us (no beacon keeps its version current) and for an address
    /// it is listed with; a peer that announces keeps the version its beacons carry. True when
    /// the version changed.
    pub(super) fn heard_summary(&mut self, addr: SocketAddr, summary: Option<u64>) -> bool {
        let before = self.summary;
        if self.standing == Standing::Hearsay && self.addrs.contains(&addr) {
            self.summary = summary;
        }
        self.summary != before
    }

    /// A new entry for a peer heard of through peer exchange: on probation, zero announces.
    pub(super) fn heard_of(
        node: NodeId,
        addr: SocketAddr,
        flags: u16,
        interval: Duration,
        summary: Option<u64>,
        now: Instant,
    ) -> Self {
        Self {
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
            standing: Standing::Hearsay,
            hold: Hold::Free,
            answered: None,
            proven: Vec::new(),
        }
    }

    /// Three intervals after it was last heard: announced, or answered over HTTP.
    pub(super) fn expires_at(&self) -> Instant {
        self.last_seen.max(self.answered.unwrap_or(self.last_seen)) + self.interval * EXPIRY_INTERVALS
    }

    /// A goodbye that comes after its last announce (serial sequence numbers), or names a peer
    /// that has not announced yet (heard of through peer exchange).
    pub(super) fn fresh_goodbye(&self, b: &Beacon) -> bool {
        self.hearsay() || wire::seq_after(b.seq, self.seq)
    }

    /// Whether a goodbye `b` from `src` is its own without a signature check: it carries the
    /// secret whose commitment the peer announced or, from a peer that announced none (an older
    /// version), comes from an address it announced from.
    pub(super) fn goodbye_proven(&self, b: &Beacon, src: SocketAddr) -> bool {
        match self.commitment {
            // It committed to a secret: only that secret says goodbye.
            Some(c) => b.proof.is_some_and(|s| wire::commitment(&s) == c),
            // An older peer: from an address it announced from.
            None => self.addrs.iter().any(|a| a.ip() == src.ip()),
        }
    }

    /// What a claim of its id from `addr` (whose store server lately proved `holder`, if any)
    /// means for its proofs.
    pub(super) fn claim(&self, addr: SocketAddr, holder: Option<NodeId>) -> Claim {
        let family = |a: &SocketAddr| a.is_ipv4() == addr.is_ipv4();
        let unproven = self.proven.iter().any(family) && !self.proven.contains(&addr) && holder.is_none();
        // A contest while the family would list two or more addresses, none
        // proven: every announce of the id from one of them asks its store
        // server (the second announce from an address, then again only after
        // `retry_after` or the window), so a proof that failed is retried,
        // also for an entry not established yet that listed both addresses.
        let listed = self.addrs.iter().filter(|a| family(a) && **a != addr).count() + 1;
        let other = self.addrs.iter().any(|a| !family(a));
        let contest = !self.hearsay()
            && !self.proven.contains(&addr)
            && ((listed >= 2 && !self.proven.iter().any(family))
                // A claim from another family, once the id is proven in one:
                // a contest too (listed after the proven addresses meanwhile,
                // so it is not tried first). Only then: every dual-stack host
                // would otherwise be asked by every host of the hall.
                || (other && !self.proven.is_empty()));
        Claim { unproven, contest }
    }

    /// An announce `b` of its id from `addr` (its commitment checked already): a refresh, a
    /// move, or a move undone; ignored while pinned and alive at its listed addresses.
    pub(super) fn announced(&mut self, b: &Beacon, addr: SocketAddr, now: Instant) -> Result<Announced, IgnoreReason> {
        let mut outcome = Announced::Refreshed;
        if self
            .hold
            .moved()
            .is_some_and(|m| now >= m.at + self.interval * EXPIRY_INTERVALS)
        {
            // The addresses it left stayed silent: it moved.
            self.hold.settle();
        }
        if self.hearsay() {
            // Heard of through peer exchange: its own announce replaces
            // what the list said, and its commitment now counts.
            self.addrs.clear();
            self.commitment = b.commitment;
            self.first_seen = now;
        } else if let Some(to) = self
            .hold
            .moved()
            .filter(|m| m.from.contains(&addr) && self.addrs.contains(&m.to))
            .map(|m| m.to)
        {
            // The address it "moved" from speaks again: it never moved; another
            // host announced its id from `to`. Undone, and pinned.
            self.addrs.retain(|a| *a != to);
            self.hold = Hold::Pinned;
            outcome = Announced::MoveUndone;
        } else if self.established() && !self.addrs.contains(&addr) {
            let from: Vec<SocketAddr> = self
                .addrs
                .iter()
                .filter(|a| a.is_ipv4() == addr.is_ipv4())
                .copied()
                .collect();
            if !from.is_empty() {
                // Another address of a family it is listed with: a move, or
                // someone announcing its id (node ids and commitments are in
                // every announce), which cannot be told apart yet.
                if self.hold.pinned() && now < self.last_seen + self.interval.mul_f64(MOVE_SILENCE_INTERVALS) {
                    return Err(IgnoreReason::SecondAddress);
                }
                self.hold.move_to(Move {
                    to: addr,
                    from,
                    at: now,
                });
            }
        }
        self.refresh(b, addr, now);
        Ok(outcome)
    }

    /// Takes `b`'s fields and lists `addr` first (after the proven addresses).
    fn refresh(&mut self, b: &Beacon, addr: SocketAddr, now: Instant) {
        self.addrs.retain(|a| *a != addr);
        self.addrs.insert(0, addr);
        // Proven addresses first, then IPv4 ones (what `Peer::http_addr`
        // prefers: a link-local claim for a host listed by IPv4 is not tried
        // first); stable, so most recent first within each.
        let proven = &self.proven;
        self.addrs.sort_by_key(|a| (!proven.contains(a), a.is_ipv6()));
        self.addrs.truncate(MAX_ADDRS_PER_PEER);
        self.flags = b.flags;
        self.hostname = b.hostname.clone();
        self.last_seen = now;
        self.interval = Duration::from_millis(b.interval_ms.into());
        self.seq = b.seq;
        self.summary = b.summary;
        self.standing = self.standing.announced();
    }

    /// Its store server at `addr` proved its id: the address holds it, the addresses of that
    /// family that did not prove it are dropped, and the id is pinned.
    pub(super) fn proved_at(&mut self, addr: SocketAddr) {
        if !self.proven.contains(&addr) {
            self.proven.insert(0, addr);
            self.proven.truncate(MAX_ADDRS_PER_PEER);
        }
        let proven = self.proven.clone();
        self.addrs
            .retain(|a| a.is_ipv4() != addr.is_ipv4() || proven.contains(a));
        if !self.addrs.contains(&addr) {
            self.addrs.insert(0, addr);
            self.addrs.truncate(MAX_ADDRS_PER_PEER);
        }
        self.hold = Hold::Pinned;
    }
}

/// IPv6 link-local addresses need the scope (interface) they were seen on to be reachable.
pub(super) fn addr_with_scope(addr: SocketAddr, src: SocketAddr) -> SocketAddr {
    match (addr, src) {
        (SocketAddr::V6(mut a), SocketAddr::V6(s)) => {
            a.set_scope_id(s.scope_id());
            SocketAddr::V6(a)
        }
        _ => addr,
    }
}
