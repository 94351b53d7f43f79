//! The host-wide breaker on pass-through (issue #25): identities are free, so a ban per node id
//! and address alone let an attacker fail one substitution per identity (prove an identity with
//! three honest NARs, flip a byte mid-NAR while it passes through, take a new node id and a new
//! address alias, again: 4 of 5 realisations failed, about 5 s of work each).
//!
//! A lie by a peer that was allowed to pass through *trips* the breaker for [`BREAKER_FOR`]:
//! meanwhile only *seasoned* peers pass through, those proven (at their address) at least
//! [`SEASONED_AGE`] before the first lie of the window and with at least [`SEASONED_NARS`]
//! verified NARs there; after [`MAX_PASS_THROUGH_LIES`] such lies within the window nobody
//! passes through until the oldest of them is [`BREAKER_FOR`] old. Everything else is fetched
//! verify-first, where a lie costs Nix nothing (the next source delivers). So each failed
//! substitution needs a lie from a peer allowed to pass through, and at most
//! [`MAX_PASS_THROUGH_LIES`] (K) of those are caught per hour, whatever the number of identities:
//! after the first, each further one needs an identity that delivered 16 verified NARs and was
//! proven for 10 minutes before the first lie. Honest halls never trip it.
//!
//! A lie is caught when its NAR ends, so pass-throughs already streaming when the breaker trips
//! could all lie (Nix runs up to 16 substitutions at once by default): peers that are not
//! seasoned pass through [`UNSEASONED_AT_ONCE`] NAR at a time, host-wide (a [`Grant`], held by the
//! pass-through's tap and given back when the tap detaches or its fetch ends); the others are verified
//! first. So a batch of cheap identities proven before the first lie fails one substitution, not
//! one each; only seasoned identities (16 NARs, 10 minutes each) could lie in one burst. The
//! breaker lives in memory (a restarted proxy starts closed; bans persist in `proven`).
//!
//! Bounds: the last [`MAX_PASS_THROUGH_LIES`] lie times and [`UNSEASONED_AT_ONCE`] grants (a
//! few dozen bytes).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::beacon::wire::NodeId;

/// How long a lie by a peer allowed to pass through keeps the breaker tripped.
pub const BREAKER_FOR: Duration = Duration::from_secs(3600);
/// Lies by peers allowed to pass through within [`BREAKER_FOR`] after which nobody passes
/// through: the K of "at most K failed substitutions per hour per host".
pub const MAX_PASS_THROUGH_LIES: usize = 2;
/// How long a peer must have been proven (at its address) before the first lie of the window to
/// pass through while the breaker is tripped.
pub const SEASONED_AGE: Duration = Duration::from_secs(600);
/// Verified NARs a peer must have delivered (at its address) to pass through while the breaker
/// is tripped.
pub const SEASONED_NARS: u32 = 16;

/// Pass-throughs at once from peers that are not seasoned, host-wide.
pub const UNSEASONED_AT_ONCE: usize = 1;

/// What a proven (node, address) pair earned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Earned {
    /// NARs it delivered that verified, at that address.
    pub verified: u32,
    /// When it became proven there.
    pub proven_at: Instant,
}

impl Earned {
    /// Proven for [`SEASONED_AGE`] at `t`, with [`SEASONED_NARS`] verified NARs.
    fn seasoned_at(&self, t: Instant) -> bool {
        self.verified >= SEASONED_NARS && self.proven_at + SEASONED_AGE <= t
    }
}

/// A proven peer: node id and address.
pub type Pair = (NodeId, std::net::IpAddr);

/// Who holds each grant (by the grant's number).
type Holders = Arc<Mutex<Vec<(u64, Pair)>>>;

fn lock(h: &Holders) -> std::sync::MutexGuard<'_, Vec<(u64, Pair)>> {
    h.lock().unwrap_or_else(|p| p.into_inner())
}

/// An unseasoned peer's pass-through of one NAR: given back when dropped.
#[derive(Debug)]
pub struct Grant {
    holders: Holders,
    n: u64,
}

impl Drop for Grant {
    fn drop(&mut self) {
        lock(&self.holders).retain(|(n, _)| *n != self.n);
    }
}

/// What the breaker lets a proven peer do with one NAR.
#[derive(Debug)]
pub enum Pass {
    /// Seasoned: pass through.
    Free,
    /// Unseasoned: pass through while the grant is held.
    Granted(Grant),
}

/// Lies by peers that were allowed to pass through, newest last, and the pass-throughs granted
/// to unseasoned peers.
#[derive(Debug, Default)]
pub struct Breaker {
    lies: VecDeque<Instant>,
    /// Who holds the grants in force.
    holders: Holders,
    /// The next grant's number.
    next: u64,
}

impl Breaker {
    /// A peer allowed to pass through sent a NAR that did not verify.
    pub fn tripped(&mut self, now: Instant) {
        self.lies.push_back(now);
        while self.lies.len() > MAX_PASS_THROUGH_LIES {
            self.lies.pop_front();
        }
    }

    /// Lies within the last [`BREAKER_FOR`], oldest first.
    fn recent(&self, now: Instant) -> impl Iterator<Item = &Instant> {
        self.lies
            .iter()
            .filter(move |t| now.saturating_duration_since(**t) < BREAKER_FOR)
    }

    /// Whether a proven peer that earned `e` may pass through at `now`.
    pub fn allows(&self, e: &Earned, now: Instant) -> bool {
        let mut recent = self.recent(now);
        match recent.next() {
            None => true,
            Some(first) => self.recent(now).count() < MAX_PASS_THROUGH_LIES && e.seasoned_at(*first),
        }
    }

    /// Whether `who` (which earned `e`) may pass one NAR through now; an unseasoned peer takes
    /// one of the [`UNSEASONED_AT_ONCE`] grants, or is refused when none is free.
    pub fn pass(&mut self, who: Pair, e: &Earned, now: Instant) -> Option<Pass> {
        if !self.allows(e, now) {
            return None;
        }
        if e.seasoned_at(now) {
            return Some(Pass::Free);
        }
        let mut holders = lock(&self.holders);
        if holders.len() >= UNSEASONED_AT_ONCE {
            return None;
        }
        self.next += 1;
        holders.push((self.next, who));
        Some(Pass::Granted(Grant {
            holders: self.holders.clone(),
            n: self.next,
        }))
    }

    /// Whether `who` (which earned `e`) may have been passing a NAR through when it lied: let
    /// through by the breaker, and seasoned or holding a grant. (A lie by a proven peer that was
    /// verified first cost Nix nothing and does not count.)
    pub fn was_passing(&self, who: Pair, e: &Earned, now: Instant) -> bool {
        self.allows(e, now) && (e.seasoned_at(now) || lock(&self.holders).iter().any(|(_, p)| *p == who))
    }

    /// Lies counted within the last [`BREAKER_FOR`] (for the status page and tests).
    pub fn recent_lies(&self, now: Instant) -> usize {
        self.recent(now).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_lie_leaves_only_seasoned_peers_and_k_lies_nobody() {
        let t0 = Instant::now();
        let seasoned = Earned {
            verified: SEASONED_NARS,
            proven_at: t0,
        };
        let fresh = Earned {
            verified: 100,
            proven_at: t0 + SEASONED_AGE,
        };
        let few = Earned {
            verified: SEASONED_NARS - 1,
            proven_at: t0,
        };
        let mut b = Breaker::default();
        let lie = t0 + SEASONED_AGE;
        assert!(
            b.allows(&fresh, lie) && b.allows(&few, lie),
            "closed: every proven peer"
        );
        b.tripped(lie);
        assert!(b.allows(&seasoned, lie), "proven 10 min before the lie, 16 NARs");
        assert!(!b.allows(&fresh, lie), "proven too late");
        assert!(!b.allows(&few, lie), "too few NARs");
        // A peer proven after the lie never counts as seasoned for this window.
        let later = lie + BREAKER_FOR - Duration::from_secs(1);
        let after = Earned {
            verified: 1000,
            proven_at: lie + Duration::from_secs(1),
        };
        assert!(!b.allows(&after, later));
        assert!(b.allows(&after, lie + BREAKER_FOR), "closed again after an hour");
        b.tripped(lie + Duration::from_secs(5));
        assert_eq!(b.recent_lies(lie + Duration::from_secs(5)), MAX_PASS_THROUGH_LIES);
        assert!(!b.allows(&seasoned, lie + Duration::from_secs(5)), "K lies: nobody");
        assert!(
            b.allows(&seasoned, lie + BREAKER_FOR + Duration::from_secs(5)),
            "an hour after the second lie, closed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn unseasoned_peers_pass_through_one_nar_at_a_time() {
        let now = Instant::now() + SEASONED_AGE;
        let fresh = Earned {
            verified: 3,
            proven_at: now,
        };
        let seasoned = Earned {
            verified: SEASONED_NARS,
            proven_at: now - SEASONED_AGE,
        };
        let (a, b) = (
            (NodeId([1; 16]), "10.0.0.1".parse().expect("ip")),
            (NodeId([2; 16]), "10.0.0.2".parse().expect("ip")),
        );
        let mut br = Breaker::default();
        let grant = br.pass(a, &fresh, now);
        assert!(
            matches!(grant, Some(Pass::Granted(_))),
            "the first unseasoned pass-through"
        );
        assert!(br.was_passing(a, &fresh, now) && !br.was_passing(b, &fresh, now));
        assert!(
            br.pass(b, &fresh, now).is_none(),
            "a second one at once: verified first"
        );
        assert!(br.pass(a, &fresh, now).is_none(), "also from the same peer");
        assert!(
            matches!(br.pass(b, &seasoned, now), Some(Pass::Free)),
            "seasoned: not limited"
        );
        drop(grant);
        assert!(
            br.pass(b, &fresh, now).is_some(),
            "free again once the pass-through ended"
        );
    }
}
