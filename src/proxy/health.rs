//! How good each source has been: the proxy's policy, kept apart from the beacon's membership.
//!
//! Peers that fail are backed off exponentially, a lie counts as [`LIE_WEIGHT`] failures, a
//! verified NAR clears a peer's failures; the narinfo latency is smoothed for the fan-out order.
//! An upstream that could not be reached is skipped for [`UPSTREAM_DOWN_FOR`] (offline: fast
//! misses). Bounds: health of at most [`MAX_TRACKED_PEERS`] peers (least recently reported
//! forgotten first, about 100 bytes each); one slot per configured upstream.

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::Duration;

use lru::LruCache;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::source::{SourceError, SourceId};
use crate::beacon::wire::NodeId;

/// First back-off after a failure; doubles per consecutive failure.
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A source caught lying is backed off as after this many failures.
pub const LIE_WEIGHT: u32 = 3;
/// An upstream that could not be reached is skipped for this long (offline: fast misses).
pub const UPSTREAM_DOWN_FOR: Duration = Duration::from_secs(30);
/// Peers whose health is remembered (more than the peer table holds).
pub const MAX_TRACKED_PEERS: usize = 4096;

/// What the proxy learned about one peer.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Health {
    pub consecutive_failures: u32,
    pub successes: u64,
    pub failures: u64,
    /// Smoothed time to answer a narinfo request, in ms (none until one answered).
    pub latency_ms: Option<f64>,
    /// Not asked again before this.
    #[serde(skip)]
    pub backoff_until: Option<Instant>,
}

impl Health {
    pub fn backed_off(&self, now: Instant) -> bool {
        self.backoff_until.is_some_and(|t| t > now)
    }
}

/// How a source did, as the proxy judged it.
#[derive(Debug)]
pub enum Verdict<'a> {
    /// Delivered a NAR that verified.
    Delivered,
    /// Failed, timed out or sent something unusable; lies among these are weighted.
    Failed(&'a SourceError),
    /// Sent bytes that did not match the signed hash.
    Lied,
}

pub struct SourceHealth {
    peers: Mutex<LruCache<NodeId, Health>>,
    /// Per upstream: skipped until this instant.
    upstream_down: Mutex<Vec<Option<Instant>>>,
}

impl SourceHealth {
    pub fn new(upstreams: usize) -> Self {
        Self {
            peers: Mutex::new(LruCache::new(
                NonZeroUsize::new(MAX_TRACKED_PEERS).unwrap_or(NonZeroUsize::MIN),
            )),
            upstream_down: Mutex::new(vec![None; upstreams]),
        }
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, LruCache<NodeId, Health>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a verdict. Returns true when it was a lie (for the counters).
    pub fn judge(&self, s: &SourceId, v: Verdict<'_>, now: Instant) -> bool {
        let lie = match &v {
            Verdict::Delivered => false,
            Verdict::Failed(e) => e.is_lie(),
            Verdict::Lied => true,
        };
        match s {
            SourceId::Peer(n) => {
                let mut peers = self.peers();
                let h = peers.get_or_insert_mut(*n, Health::default);
                match v {
                    Verdict::Delivered => {
                        h.successes += 1;
                        h.consecutive_failures = 0;
                        h.backoff_until = None;
                    }
                    Verdict::Failed(_) | Verdict::Lied => {
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

    pub fn backed_off(&self, node: &NodeId, now: Instant) -> bool {
        self.peers().peek(node).is_some_and(|h| h.backed_off(now))
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
        // One lie backs off as long as three failures.
        assert!(h.judge(&p, Verdict::Lied, now));
        assert_eq!(h.peer(&n).consecutive_failures, LIE_WEIGHT);
        assert!(h.backed_off(&n, now + Duration::from_millis(3900)));
        assert!(!h.backed_off(&n, now + Duration::from_millis(4001)));
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
