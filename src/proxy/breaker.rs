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
//! Not covered: pass-throughs already streaming when the breaker trips (their lies are caught
//! when their NAR ends): Nix runs up to `max-substitution-jobs` (16 by default) at once, each
//! from an identity proven before the first lie. The breaker lives in memory (a restarted proxy
//! starts closed; bans persist in `proven`).
//!
//! Bounds: the last [`MAX_PASS_THROUGH_LIES`] lie times (a few bytes).

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

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

/// Lies by peers that were allowed to pass through, newest last.
#[derive(Debug, Default)]
pub struct Breaker {
    lies: VecDeque<Instant>,
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
}
