//! Rate limits: a token bucket per source address (an LRU of [`MAX_SOURCES`]: a new source
//! evicts the least recently seen one, which starts afresh if it comes back, so spoofed sources
//! cannot lock an honest peer out), and one bucket for the signed goodbyes checked from every
//! source together.

use std::net::IpAddr;
use std::num::NonZeroUsize;

use lru::LruCache;
use tokio::time::Instant;

/// Source addresses tracked for rate limiting (LRU).
pub const MAX_SOURCES: usize = 4096;
/// Datagrams per second allowed per source address (token bucket refill rate).
pub const RATE_PER_SEC: f64 = 20.0;
/// Token bucket size per source address.
pub const RATE_BURST: f64 = 40.0;
/// Signed goodbyes whose signature is checked per second, from all sources together (a
/// hall's goodbyes are a few a second; more are ignored, and their hosts expire instead).
pub const MAX_SIGNATURE_CHECKS_PER_SEC: f64 = 200.0;

/// One token bucket (also the store server's limit on `GET /identity`, `server::proofs`).
#[derive(Clone, Copy, Debug)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A bucket holding `tokens` at `now`.
    pub fn new(tokens: f64, now: Instant) -> Self {
        Self { tokens, last: now }
    }

    /// A token from the bucket refilled at `rate` a second, holding at most `burst`.
    pub fn take(&mut self, now: Instant, rate: f64, burst: f64) -> bool {
        let refill = now.duration_since(self.last).as_secs_f64() * rate;
        self.tokens = (self.tokens + refill).min(burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The table's rate limits.
pub(super) struct Buckets {
    /// By source (LRU: new sources evict the least recently seen).
    by_source: LruCache<IpAddr, Bucket>,
    /// Signed goodbyes checked, from every source together.
    signature_checks: Bucket,
}

impl Default for Buckets {
    fn default() -> Self {
        Self {
            by_source: LruCache::new(NonZeroUsize::new(MAX_SOURCES).unwrap_or(NonZeroUsize::MIN)),
            signature_checks: Bucket {
                tokens: MAX_SIGNATURE_CHECKS_PER_SEC,
                last: Instant::now(),
            },
        }
    }
}

impl Buckets {
    /// A datagram from `ip` may be handled: false when the source is over its rate.
    pub(super) fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        let b = self.by_source.get_or_insert_mut(ip, || Bucket {
            tokens: RATE_BURST,
            last: now,
        });
        b.take(now, RATE_PER_SEC, RATE_BURST)
    }

    /// A goodbye's signature may be checked now (at most [`MAX_SIGNATURE_CHECKS_PER_SEC`]).
    pub(super) fn check_signature(&mut self, now: Instant) -> bool {
        self.signature_checks
            .take(now, MAX_SIGNATURE_CHECKS_PER_SEC, MAX_SIGNATURE_CHECKS_PER_SEC)
    }

    /// Sources tracked.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.by_source.len()
    }
}
