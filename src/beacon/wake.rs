//! Noticing a wake-up from suspend. `CLOCK_MONOTONIC` (what Tokio's `Instant` reads) stops while
//! the machine sleeps, `CLOCK_BOOTTIME` does not: when boot time advanced clearly more than
//! monotonic time between two looks, the machine slept for the difference.

use std::time::Duration;

use nix::time::{clock_gettime, ClockId};
use tokio::time::Instant;

use super::{Peer, PeerTable};

/// After a wake-up from suspend, peers that have not answered the query within this long are
/// dropped (they may have gone while we slept; without this they would be tried until three of
/// their intervals passed, and monotonic time did not count the sleep).
pub const WAKE_GRACE: Duration = Duration::from_secs(2);

/// A gap between the two clocks larger than this is a sleep (the loop looks at least once a
/// second, so scheduling delays stay far below it).
pub const SLEEP_THRESHOLD: Duration = Duration::from_secs(3);

/// Compares the two clocks from one look to the next.
#[derive(Clone, Copy, Debug)]
pub struct SleepDetector {
    mono: Duration,
    boot: Duration,
}

/// Reads (monotonic, boot time); zero when a clock cannot be read (then no sleep is seen).
pub fn clocks() -> (Duration, Duration) {
    let read = |id| clock_gettime(id).map(Duration::from).unwrap_or_default();
    (read(ClockId::CLOCK_MONOTONIC), read(ClockId::CLOCK_BOOTTIME))
}

impl SleepDetector {
    pub fn new((mono, boot): (Duration, Duration)) -> Self {
        Self { mono, boot }
    }

    /// Takes a new reading; returns how long the machine slept since the last one, if it did.
    pub fn check(&mut self, (mono, boot): (Duration, Duration)) -> Option<Duration> {
        let dm = mono.saturating_sub(self.mono);
        let db = boot.saturating_sub(self.boot);
        self.mono = mono;
        self.boot = boot;
        let slept = db.saturating_sub(dm);
        (slept > SLEEP_THRESHOLD).then_some(slept)
    }
}

/// The beacon loop's view of suspend: notices a wake-up ([`WakeWatch::look`], after which the
/// loop re-announces and queries) and, [`WAKE_GRACE`] later, drops the peers not heard since.
#[derive(Debug)]
pub struct WakeWatch {
    detector: SleepDetector,
    /// The last wake-up, while its grace runs.
    woke: Option<Instant>,
}

impl WakeWatch {
    pub fn new(clocks: (Duration, Duration)) -> Self {
        Self {
            detector: SleepDetector::new(clocks),
            woke: None,
        }
    }

    /// Takes a clock reading at `now`; on a wake-up returns how long the machine slept.
    pub fn look(&mut self, clocks: (Duration, Duration), now: Instant) -> Option<Duration> {
        let slept = self.detector.check(clocks)?;
        self.woke = Some(now);
        Some(slept)
    }

    /// When the peers not heard since the wake-up are due to be dropped.
    pub fn due(&self) -> Option<Instant> {
        self.woke.map(|w| w + WAKE_GRACE)
    }

    /// Once the grace is over: drops the peers silent since the wake-up, and returns them.
    pub fn drop_silent(&mut self, table: &PeerTable, now: Instant) -> Vec<Peer> {
        match self.woke {
            Some(w) if now >= w + WAKE_GRACE => {
                self.woke = None;
                table.drop_unheard_since(w)
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::beacon::wire::{encode, Beacon, Kind, NodeId};

    /// After a wake-up, a peer that answers within the grace stays, one that went while we slept
    /// is dropped at the end of the grace (not three intervals later).
    #[tokio::test(start_paused = true)]
    async fn peers_silent_since_a_wake_up_are_dropped_after_the_grace() {
        let table = PeerTable::new(NodeId([0; 16]));
        let announce = |n: u8| {
            encode(&Beacon {
                kind: Kind::Announce,
                flags: 0,
                node: NodeId([n; 16]),
                port: 8380,
                interval_ms: 30_000,
                seq: 1,
                hostname: None,
                summary: None,
                commitment: None,
                proof: None,
            })
        };
        let src = |n: u8| std::net::SocketAddr::from(([10, 0, 0, n], 8380));
        let t0 = Instant::now();
        table.handle(src(1), &announce(1), t0);
        table.handle(src(2), &announce(2), t0);
        let mut w = WakeWatch::new((s(10), s(10)));
        assert_eq!(w.look((s(11), s(11)), t0), None);
        assert!(
            w.drop_silent(&table, t0 + WAKE_GRACE * 2).is_empty(),
            "no wake-up, no drop"
        );
        // Monotonic time advanced 1 s, boot time an hour: we slept.
        let woke = t0 + Duration::from_secs(1);
        assert!(w.look((s(12), s(3611)), woke).is_some());
        assert_eq!(w.due(), Some(woke + WAKE_GRACE));
        table.handle(src(1), &announce(1), woke + Duration::from_millis(100));
        assert!(
            w.drop_silent(&table, woke + WAKE_GRACE / 2).is_empty(),
            "grace not over"
        );
        let gone = w.drop_silent(&table, woke + WAKE_GRACE);
        assert_eq!(gone.iter().map(|p| p.node).collect::<Vec<_>>(), [NodeId([2; 16])]);
        assert_eq!(table.peers().len(), 1);
        assert_eq!(w.due(), None);
    }

    fn s(x: u64) -> Duration {
        Duration::from_secs(x)
    }

    #[test]
    fn a_jump_of_boot_time_over_monotonic_time_is_a_sleep() {
        let mut d = SleepDetector::new((s(100), s(100)));
        assert_eq!(d.check((s(101), s(101))), None, "both clocks ran");
        assert_eq!(d.check((s(102), s(104))), None, "small skew is not a sleep");
        assert_eq!(d.check((s(103), s(605))), Some(s(500)), "slept 500 s");
        assert_eq!(d.check((s(104), s(606))), None, "once only");
        // Unreadable clocks (zeros) never report a sleep.
        assert_eq!(SleepDetector::new((s(0), s(0))).check((s(0), s(0))), None);
        let (m, b) = clocks();
        assert!(b >= m, "boot time includes monotonic time");
    }
}
