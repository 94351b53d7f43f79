//! Noticing a wake-up from suspend. `CLOCK_MONOTONIC` (what Tokio's `Instant` reads) stops while
//! the machine sleeps, `CLOCK_BOOTTIME` does not: when boot time advanced clearly more than
//! monotonic time between two looks, the machine slept for the difference.

use std::time::Duration;

use nix::time::{clock_gettime, ClockId};

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

#[cfg(test)]
mod tests {
    use super::*;

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
