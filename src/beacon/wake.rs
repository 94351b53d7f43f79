//! Noticing a wake-up from suspend. `CLOCK_MONOTONIC` (what Tokio's `Instant` reads) stops while
//! the machine sleeps, `CLOCK_BOOTTIME` does not: when boot time advanced clearly more than
//! monotonic time between two looks, the machine slept for the difference.
//!
//! When to look: [`ClockJumps`], a timerfd on `CLOCK_REALTIME` armed with
//! `TFD_TIMER_CANCEL_ON_SET`, becomes readable when the kernel resumes from suspend (it treats a
//! resume as a clock set: `timerfd_resume`) or the wall clock is set, so the beacon loop looks
//! at once after a wake-up instead of once a second (issue #27: a wake-up a second on an idle
//! laptop); with it the loop's periodic look is only a safety net ([`LOOK_SAFETY`]). Without a
//! timerfd (it cannot be created) the loop looks every second, as before.

use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{self, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use nix::time::{clock_gettime, ClockId};
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

use super::receive::QUERY_ANSWERS;
use super::table::{Peer, PeerTable};

/// After a wake-up from suspend, peers that have not answered the query within this long are
/// dropped (they may have gone while we slept; without this they would be tried until three of
/// their intervals passed, and monotonic time did not count the sleep).
pub const WAKE_GRACE: Duration = Duration::from_secs(2);

/// A gap between the two clocks larger than this is a sleep (the loop looks at least once a
/// second, so scheduling delays stay far below it).
pub const SLEEP_THRESHOLD: Duration = Duration::from_secs(3);

/// With [`ClockJumps`], the longest wait between two looks for a wake-up (a kernel that does not
/// report resumes to timerfds is noticed this late; the clocks' comparison does not depend on
/// how long ago the last look was).
pub const LOOK_SAFETY: Duration = Duration::from_secs(60);

/// Wakes the beacon loop when the wall clock jumps, which the kernel also reports on a resume
/// from suspend (see the module doc). One file descriptor; nothing else is kept.
pub struct ClockJumps {
    fd: AsyncFd<Timer>,
}

/// The timerfd, as the raw descriptor Tokio's reactor registers.
struct Timer(TimerFd);

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl ClockJumps {
    /// A timerfd on `CLOCK_REALTIME`, armed far in the future with `TFD_TIMER_CANCEL_ON_SET`.
    pub fn new() -> std::io::Result<Self> {
        let fd = TimerFd::new(
            timerfd::ClockId::CLOCK_REALTIME,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        let now = clock_gettime(ClockId::CLOCK_REALTIME)?;
        // About 68 years on: it never expires, only its cancellation matters.
        let far = TimeSpec::new(now.tv_sec().saturating_add(i32::MAX as _), 0);
        fd.set(
            Expiration::OneShot(far),
            TimerSetTimeFlags::TFD_TIMER_ABSTIME | TimerSetTimeFlags::TFD_TIMER_CANCEL_ON_SET,
        )?;
        // SAFETY: the descriptor is the `TimerFd`'s `OwnedFd`, owned by the `AsyncFd` from here
        // on, never closed or replaced before the `AsyncFd` is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(Timer(fd), tokio::io::Interest::READABLE) }
            .map_err(std::io::Error::from)?;
        Ok(Self { fd })
    }

    /// Resolves at the next jump of the wall clock (a resume from suspend, a clock set).
    pub async fn jumped(&self) {
        loop {
            let Ok(mut ready) = self.fd.readable().await else {
                return std::future::pending().await;
            };
            let mut tick = [0u8; 8];
            match nix::unistd::read(self.fd.get_ref().as_raw_fd(), &mut tick) {
                // Cancelled: the clock jumped (the next read waits for the next jump).
                Err(nix::errno::Errno::ECANCELED) => return,
                Err(nix::errno::Errno::EAGAIN) => ready.clear_ready(),
                // Expired (decades on) or failed: nothing more to wait for.
                Ok(_) | Err(_) => return std::future::pending().await,
            }
        }
    }
}

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
/// In a hall larger than [`QUERY_ANSWERS`] hosts only a sample answers the query, so a peer not
/// heard since the wake-up is dropped only once it also missed its next periodic announce
/// ([`WAKE_MISSED`] of its interval: the next announce is due within 1.2).
#[derive(Debug)]
pub struct WakeWatch {
    detector: SleepDetector,
    /// The last wake-up, while peers not heard since remain.
    woke: Option<Instant>,
    /// When to look again at the peers not heard since the wake-up.
    next: Option<Instant>,
}

/// After a wake-up in a large hall, a peer is dropped when silent for this many of its
/// intervals (its next announce was due within 1.2 of them).
pub const WAKE_MISSED: f64 = 1.25;
/// How often the peers not heard since a wake-up are looked at after the grace.
const WAKE_RECHECK: Duration = Duration::from_secs(1);

impl WakeWatch {
    pub fn new(clocks: (Duration, Duration)) -> Self {
        Self {
            detector: SleepDetector::new(clocks),
            woke: None,
            next: None,
        }
    }

    /// Takes a clock reading at `now`; on a wake-up returns how long the machine slept.
    pub fn look(&mut self, clocks: (Duration, Duration), now: Instant) -> Option<Duration> {
        let slept = self.detector.check(clocks)?;
        self.woke = Some(now);
        self.next = Some(now + WAKE_GRACE);
        Some(slept)
    }

    /// When the peers not heard since the wake-up are next due to be looked at.
    pub fn due(&self) -> Option<Instant> {
        self.woke.and(self.next)
    }

    /// Once the grace is over: drops the peers silent since the wake-up (in a large hall, only
    /// those that also missed their next announce), and returns them.
    pub fn drop_silent(&mut self, table: &PeerTable, now: Instant) -> Vec<Peer> {
        let Some(w) = self.woke else { return Vec::new() };
        if self.next.is_some_and(|n| now < n) {
            return Vec::new();
        }
        // Everyone answers a query in a small hall (see `answers`).
        let all_answer = table.len() < QUERY_ANSWERS;
        let gone = table.drop_unheard_since(w, |p| {
            all_answer || now >= w + WAKE_GRACE.max(p.interval.mul_f64(WAKE_MISSED))
        });
        if table.unheard_since(w) == 0 {
            self.woke = None;
            self.next = None;
        } else {
            self.next = Some(now + WAKE_RECHECK);
        }
        gone
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

    /// In a hall where only a sample answers the query, a peer not heard since the wake-up stays
    /// until it missed its next periodic announce.
    #[tokio::test(start_paused = true)]
    async fn in_a_large_hall_a_silent_peer_is_dropped_once_it_missed_its_announce() {
        let table = PeerTable::new(NodeId([0; 16]));
        let announce = |n: u8| {
            encode(&Beacon {
                kind: Kind::Announce,
                flags: 0,
                node: NodeId([n; 16]),
                port: 8380,
                interval_ms: 10_000,
                seq: 1,
                hostname: None,
                summary: None,
                commitment: None,
                proof: None,
            })
        };
        let src = |n: u8| std::net::SocketAddr::from(([10, 0, 0, n], 8380));
        let t0 = Instant::now();
        for n in 1..=30 {
            table.handle(src(n), &announce(n), t0);
        }
        let mut w = WakeWatch::new((s(10), s(10)));
        let woke = t0 + Duration::from_secs(1);
        assert!(w.look((s(12), s(3611)), woke).is_some());
        // A sample answers the query; the others announce later.
        for n in 1..=12 {
            table.handle(src(n), &announce(n), woke + Duration::from_millis(200));
        }
        assert!(
            w.drop_silent(&table, woke + WAKE_GRACE).is_empty(),
            "they may be sampled out"
        );
        for n in 13..=29 {
            table.handle(src(n), &announce(n), woke + Duration::from_secs(8));
        }
        assert!(w.drop_silent(&table, woke + Duration::from_secs(9)).is_empty());
        let gone = w.drop_silent(&table, woke + Duration::from_millis(12_500));
        assert_eq!(gone.iter().map(|p| p.node).collect::<Vec<_>>(), [NodeId([30; 16])]);
        assert_eq!(table.peers().len(), 29);
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
