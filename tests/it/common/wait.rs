//! The one way the tests wait for an event: poll a check until it holds or a limit passes. A
//! test waits for the state that proves the event happened (a table entry, a counter, a status
//! field), never for a fixed time.

use std::time::{Duration, Instant};

/// What a check returns: `true`/`false`, or `Some(value)`/`None`.
pub trait Ready {
    type Value;
    /// `Some` once the awaited state is there.
    fn ready(self, waited: Duration) -> Option<Self::Value>;
}

/// A `bool` check yields the time it took to become true.
impl Ready for bool {
    type Value = Duration;
    fn ready(self, waited: Duration) -> Option<Duration> {
        self.then_some(waited)
    }
}

/// An `Option` check yields its value.
impl<T> Ready for Option<T> {
    type Value = T;
    fn ready(self, _: Duration) -> Option<T> {
        self
    }
}

/// Runs `check` every `every` until it is ready (`true`: gives the time it took; `Some(v)`: gives
/// `v`), for at most `limit` (checked once more at the limit); `None` when it never was. The
/// check runs at least once.
pub fn wait_for<R: Ready>(limit: Duration, every: Duration, mut check: impl FnMut() -> R) -> Option<R::Value> {
    let t0 = Instant::now();
    loop {
        let r = check();
        let waited = t0.elapsed();
        if let Some(v) = r.ready(waited) {
            return Some(v);
        }
        if waited >= limit {
            return None;
        }
        std::thread::sleep(every.min(limit.saturating_sub(t0.elapsed())));
    }
}

/// [`wait_for`], panicking with `what` when the limit passes.
#[track_caller]
pub fn wait_until<R: Ready>(what: &str, limit: Duration, every: Duration, check: impl FnMut() -> R) -> R::Value {
    match wait_for(limit, every, check) {
        Some(v) => v,
        None => panic!("timed out after {limit:?} waiting: {what}"),
    }
}
