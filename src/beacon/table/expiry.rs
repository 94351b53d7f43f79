//! When to look for silent peers next, without scanning the table per datagram.
//!
//! The beacon's loop asks on every turn, i.e. per datagram (a scan over every peer there was
//! 15-18 % of a steady serve's CPU in a 500-host hall): the minimum found by the last scan is
//! kept, lowered at once by every join or refresh that expires earlier (`ExpiryCache::note`),
//! so it is never late; a refresh or departure can leave it early, and the table is scanned
//! again only once that time has come (a look then finds nothing or the peer that expired), or
//! at most once per [`EXPIRY_RESCAN`] when asked after it.

use std::time::Duration;

use tokio::time::Instant;

/// `PeerTable::next_expiry`, asked again after the cached earliest expiry passed, scans the
/// table at most once per this.
pub const EXPIRY_RESCAN: Duration = Duration::from_millis(100);

#[derive(Default)]
pub(super) struct ExpiryCache {
    /// The last scan for the earliest expiry: when, and what it found.
    last: Option<(Instant, Option<Instant>)>,
    /// Scans for the earliest expiry done (for tests).
    pub(super) scans: u64,
}

impl ExpiryCache {
    /// A peer joined or was refreshed and now expires at `at`: the cached earliest expiry must
    /// not be later.
    pub(super) fn note(&mut self, at: Instant) {
        if let Some((_, min)) = &mut self.last {
            if min.is_none_or(|m| at < m) {
                *min = Some(at);
            }
        }
    }

    /// The earliest expiry at `now`: the cached one, or what `scan` finds when it is due.
    pub(super) fn next(&mut self, now: Instant, scan: impl FnOnce() -> Option<Instant>) -> Option<Instant> {
        if let Some((at, min)) = self.last {
            if min.is_none_or(|m| m > now) || now < at + EXPIRY_RESCAN {
                return min;
            }
        }
        let min = scan();
        self.scans += 1;
        self.last = Some((now, min));
        min
    }
}
