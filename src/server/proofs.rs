//! The rate limits on `GET /identity`: each answer costs an Ed25519 signature and a listing of
//! the host's interfaces (about 70 us), so pipelined requests from one host were a CPU lever
//! (issue #25: 18,000 answers a second, 1.3 cores, honest narinfo p99 from 0.8 ms to 18 ms).
//!
//! A token bucket per source address ([`PROOFS_PER_SEC_PER_SOURCE`], bursts of
//! [`PROOF_BURST_PER_SOURCE`]; the whole address, not its /64: hosts on one link share the
//! link-local /64), in an LRU of [`MAX_PROOF_SOURCES`], and one for every source together
//! ([`PROOFS_PER_SEC`]). An honest asker (a beacon's prover) asks one address at most once per
//! 30 s while a contest lasts, with a few retries while it gets no answer; a refused request is
//! answered 404, which the prover takes as "no proof" and retries after 2 s, doubling.
//!
//! What an attacker gets: 2 proofs a second per address it holds (8 at once), at most
//! [`PROOFS_PER_SEC`] from all its addresses together: about 3.5 % of one core. Memory: about
//! 64 bytes per tracked source, under 100 KiB.

use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::Mutex;

use lru::LruCache;
use tokio::time::Instant;

use crate::beacon::table::buckets::Bucket;

/// Proofs signed per second for one source address.
pub const PROOFS_PER_SEC_PER_SOURCE: f64 = 2.0;
/// Proofs one source address may ask for at once.
pub const PROOF_BURST_PER_SOURCE: f64 = 8.0;
/// Proofs signed per second, all sources together.
pub const PROOFS_PER_SEC: f64 = 500.0;
/// Source addresses whose buckets are kept (least recently seen forgotten: it starts afresh).
pub const MAX_PROOF_SOURCES: usize = 1024;

struct Inner {
    by_source: LruCache<IpAddr, Bucket>,
    all: Bucket,
}

/// The limits of one store server.
pub struct ProofLimits {
    inner: Mutex<Inner>,
}

impl Default for ProofLimits {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                by_source: LruCache::new(NonZeroUsize::new(MAX_PROOF_SOURCES).unwrap_or(NonZeroUsize::MIN)),
                all: Bucket::new(PROOFS_PER_SEC, Instant::now()),
            }),
        }
    }
}

impl ProofLimits {
    /// Whether a proof may be signed for `ip` now (a token from its bucket, then from the
    /// shared one).
    pub fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let g = &mut *g;
        let mine = g
            .by_source
            .get_or_insert_mut(ip.to_canonical(), || Bucket::new(PROOF_BURST_PER_SOURCE, now));
        mine.take(now, PROOFS_PER_SEC_PER_SOURCE, PROOF_BURST_PER_SOURCE)
            && g.all.take(now, PROOFS_PER_SEC, PROOFS_PER_SEC)
    }

    #[cfg(test)]
    fn sources(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).by_source.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// One source gets its burst, then its rate; another source is not affected; all sources
    /// together get at most the shared rate; the table stays bounded.
    #[tokio::test(start_paused = true)]
    async fn proofs_are_limited_per_source_and_in_all() {
        let l = ProofLimits::default();
        let now = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let granted = (0..1000).filter(|_| l.allow(a, now)).count();
        assert_eq!(granted, PROOF_BURST_PER_SOURCE as usize);
        let later = now + Duration::from_secs(1);
        let granted = (0..1000).filter(|_| l.allow(a, later)).count();
        assert_eq!(granted, PROOFS_PER_SEC_PER_SOURCE as usize);
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
        assert!(!l.allow(mapped, later), "the same address written as IPv6");
        assert!(l.allow("10.0.0.2".parse().expect("ip"), later), "another source");
        // Many sources: at most the shared rate a second.
        let t = now + Duration::from_secs(10);
        let granted = (0..5000u32)
            .filter(|i| l.allow(IpAddr::from([10, 1, (i >> 8) as u8, *i as u8]), t))
            .count();
        assert_eq!(granted, PROOFS_PER_SEC as usize);
        assert!(l.sources() <= MAX_PROOF_SOURCES);
    }
}
