//! The beacon loop's timers, as one [`Schedule`] that says which is due next ([`Due`]) and
//! when: the periodic announce and the start-up burst, the interface re-scan, the peer
//! exchange after a start or a new link, the looks for silent peers (and for a wake-up from
//! suspend), and the [`super::receive::Reply`]'s answer to a query and defence of our node id.
//! A look is never more than the schedule's `look_every` away ([`EXPIRE_MAX_WAIT`], or
//! `wake::LOOK_SAFETY` when a wake-up from suspend wakes the loop by itself), so something is
//! always due.

use std::collections::VecDeque;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use super::pex::PEX_DELAY;

/// Extra announces right after start (and after a new link or a wake-up), in case the first
/// datagrams are lost.
const START_BURST: [Duration; 2] = [Duration::from_millis(100), Duration::from_millis(300)];
/// Longest sleep between looks for silent peers and wake-ups when nothing tells the loop of a
/// wake-up from suspend (no timerfd; the loop also wakes at the earliest expiry).
pub const EXPIRE_MAX_WAIT: Duration = Duration::from_secs(1);
/// Periodic re-scan of the interfaces: the safety net behind the netlink notices.
pub const RESCAN_INTERVAL: Duration = Duration::from_secs(10);
/// Periodic re-scan when netlink notices are unavailable.
pub const RESCAN_INTERVAL_NO_NETLINK: Duration = Duration::from_secs(2);
/// Wait after a netlink notice before re-scanning, so a burst of notices costs one re-scan.
const RESCAN_DEBOUNCE: Duration = Duration::from_millis(100);

/// What the beacon loop does when its next deadline comes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Due {
    /// Re-scan the interfaces.
    Rescan,
    /// The periodic announce, or one of the start-up burst.
    Announce,
    /// Start a peer exchange.
    PeerExchange,
    /// Announce because our node id was heard from another address.
    Defend,
    /// Answer a query.
    Answer,
    /// Look for a wake-up from suspend and for silent peers.
    Look,
}

/// The loop's own deadlines (the reply's are the [`super::receive::Reply`]'s, the looks the
/// table's and the suspend detector's).
pub(super) struct Schedule {
    /// This host announces (the `peers` tool does not: no announce is ever due).
    announcing: bool,
    rescan_every: Duration,
    /// Longest wait between two looks (expiries have their own deadline, the table's).
    look_every: Duration,
    rescan_at: Instant,
    next_announce: Instant,
    /// The start-up burst's announces still to send.
    burst: VecDeque<Instant>,
    /// When to start a peer exchange, after the sampled answers to our query came in.
    pex_at: Option<Instant>,
}

/// `interval` within ±20 %.
fn jittered(interval: Duration) -> Duration {
    let f = rand::thread_rng().gen_range(0.8..1.2);
    interval.mul_f64(f)
}

impl Schedule {
    /// The timers of a beacon started (its hello sent) at `start`.
    pub(super) fn new(
        start: Instant,
        announcing: bool,
        interval: Duration,
        rescan_every: Duration,
        look_every: Duration,
    ) -> Self {
        let mut s = Self {
            announcing,
            rescan_every,
            look_every,
            rescan_at: start + rescan_every,
            next_announce: start + jittered(interval),
            burst: VecDeque::new(),
            pex_at: Some(start + PEX_DELAY),
        };
        s.burst_from(start);
        s
    }

    fn burst_from(&mut self, t: Instant) {
        self.burst = if self.announcing {
            START_BURST.iter().map(|d| t + *d).collect()
        } else {
            VecDeque::new()
        };
    }

    /// What is due next, and when: the earliest of the loop's timers, the reply's (`answer_at`,
    /// `defend_at`) and the next look (at the earliest `expiry` or `wake` check, at most
    /// `look_every` after `now`).
    pub(super) fn next(
        &self,
        answer_at: Option<Instant>,
        defend_at: Option<Instant>,
        expiry: Option<Instant>,
        wake: Option<Instant>,
        now: Instant,
    ) -> (Instant, Due) {
        let look = expiry.into_iter().chain(wake).fold(now + self.look_every, Instant::min);
        let send = self.announcing.then(|| {
            self.burst
                .front()
                .map_or(self.next_announce, |b| self.next_announce.min(*b))
        });
        [
            (Some(self.rescan_at), Due::Rescan),
            (send, Due::Announce),
            (self.pex_at, Due::PeerExchange),
            (defend_at, Due::Defend),
            (answer_at, Due::Answer),
        ]
        .into_iter()
        .filter_map(|(at, due)| at.map(|at| (at, due)))
        .fold((look, Due::Look), |a, b| if b.0 < a.0 { b } else { a })
    }

    /// A netlink notice: re-scan soon (a burst of notices costs one re-scan).
    pub(super) fn rescan_soon(&mut self, now: Instant) {
        self.rescan_at = self.rescan_at.min(now + RESCAN_DEBOUNCE);
    }

    /// Re-scan at once (after a wake-up).
    pub(super) fn rescan_now(&mut self, now: Instant) {
        self.rescan_at = now;
    }

    /// Re-scanned at `now`: the next periodic re-scan.
    pub(super) fn rescanned(&mut self, now: Instant) {
        self.rescan_at = now + self.rescan_every;
    }

    /// Said hello at `now` after a wake-up: the start-up burst again.
    pub(super) fn hello_again(&mut self, now: Instant) {
        self.burst_from(now);
    }

    /// Said hello on a new link at `now`: the start-up burst and a peer exchange again.
    pub(super) fn new_link(&mut self, now: Instant) {
        self.burst_from(now);
        self.pex_at = Some(now + PEX_DELAY);
    }

    /// An announce went out at `now`: one of the burst, or the periodic one (the next after
    /// `interval`, jittered).
    pub(super) fn announced(&mut self, now: Instant, interval: Duration) {
        if self.burst.front().is_some_and(|t| *t <= now) {
            self.burst.pop_front();
        } else {
            self.next_announce = now + jittered(interval);
        }
    }

    /// A start (or a new link) is under way: its query was sent and the peer exchange that
    /// follows it is not due yet (the loop then reads every datagram at once, `reading`).
    pub(super) fn starting(&self) -> bool {
        self.pex_at.is_some()
    }

    /// The peer exchange was started (or one is still running).
    pub(super) fn exchanged(&mut self) {
        self.pex_at = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The earliest deadline wins; a listening-only beacon never announces; with nothing else
    /// due, a look comes within `EXPIRE_MAX_WAIT`.
    #[tokio::test(start_paused = true)]
    async fn the_schedule_names_the_earliest_deadline() {
        let t0 = Instant::now();
        let s = Schedule::new(t0, true, Duration::from_secs(5), RESCAN_INTERVAL, EXPIRE_MAX_WAIT);
        assert_eq!(s.next(None, None, None, None, t0), (t0 + START_BURST[0], Due::Announce));
        let answer = t0 + Duration::from_millis(50);
        assert_eq!(s.next(Some(answer), None, None, None, t0), (answer, Due::Answer));
        let quiet = Schedule::new(t0, false, Duration::from_secs(5), RESCAN_INTERVAL, EXPIRE_MAX_WAIT);
        assert_eq!(
            quiet.next(None, None, None, None, t0),
            (t0 + PEX_DELAY, Due::PeerExchange)
        );
        let mut quiet = quiet;
        quiet.exchanged();
        assert_eq!(
            quiet.next(None, None, None, None, t0),
            (t0 + EXPIRE_MAX_WAIT, Due::Look)
        );
        let soon = t0 + Duration::from_millis(10);
        assert_eq!(quiet.next(None, None, Some(soon), None, t0), (soon, Due::Look));
        quiet.rescan_soon(t0);
        assert_eq!(
            quiet.next(None, None, None, None, t0),
            (t0 + RESCAN_DEBOUNCE, Due::Rescan)
        );
    }

    /// Issue #27: the loop looked for expired peers and wake-ups every second, whatever the
    /// table held. With a timerfd telling it of wake-ups, the next look is the table's earliest
    /// expiry, or `LOOK_SAFETY` away.
    #[tokio::test(start_paused = true)]
    async fn with_wake_ups_told_the_loop_looks_at_the_earliest_expiry_only() {
        use super::super::wake::LOOK_SAFETY;
        let t0 = Instant::now();
        let mut s = Schedule::new(
            t0,
            false,
            Duration::from_secs(5),
            Duration::from_secs(3600),
            LOOK_SAFETY,
        );
        s.exchanged();
        assert_eq!(s.next(None, None, None, None, t0), (t0 + LOOK_SAFETY, Due::Look));
        let expiry = t0 + Duration::from_secs(31);
        assert_eq!(s.next(None, None, Some(expiry), None, t0), (expiry, Due::Look));
    }

    /// The wall clock's timerfd can be made and stays quiet while the clock does not jump (a
    /// resume cannot be caused in a test: the kernel's cancellation is what tells the loop).
    #[tokio::test]
    async fn the_clock_jump_timer_is_armed_and_quiet() {
        let jumps = super::super::wake::ClockJumps::new().expect("timerfd");
        let quiet = tokio::time::timeout(Duration::from_millis(50), jumps.jumped()).await;
        assert!(quiet.is_err(), "no jump, no wake-up");
    }
}
