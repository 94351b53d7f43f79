//! What the proxy remembers between requests: verified narinfo with the sources that have the
//! NAR (the positive cache) and recent misses (the negative cache).
//!
//! Both are LRU caches with a time to live: the positive one holds at most
//! [`MAX_KNOWN_ENTRIES`] paths and [`MAX_KNOWN_BYTES`] of narinfo (least recently used evicted
//! first), the negative one [`MAX_MISSING_ENTRIES`] hashes (about 80 bytes each, so under 2 MiB).
//! A miss is remembered only briefly ([`NEGATIVE_TTL`]): a peer with the path may appear any time.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use lru::LruCache;
use tokio::time::Instant;

use super::source::Candidate;
use crate::narinfo::{NarInfo, StorePathHash};

/// How long a miss is remembered.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// How long a verified narinfo and its sources are remembered.
pub const POSITIVE_TTL: Duration = Duration::from_secs(3600);
/// Paths in the positive cache.
pub const MAX_KNOWN_ENTRIES: usize = 20_000;
/// Narinfo bytes (as [`NarInfo::approx_bytes`] counts them, every candidate's copy included) in
/// the positive cache.
pub const MAX_KNOWN_BYTES: usize = 64 * 1024 * 1024;
/// Hashes in the negative cache.
pub const MAX_MISSING_ENTRIES: usize = 20_000;
/// Sources remembered per path (the fan-out plus a few upstreams).
pub const MAX_CANDIDATES_PER_PATH: usize = 24;

/// A verified narinfo and who has its NAR.
#[derive(Clone)]
pub struct Known {
    /// The narinfo as the first source sent it (shared with its candidate).
    pub info: Arc<NarInfo>,
    /// Sources known to have this NAR (the first one first).
    pub candidates: Vec<Candidate>,
    at: Instant,
    bytes: usize,
}

struct Positive {
    map: LruCache<StorePathHash, Known>,
    bytes: usize,
}

pub struct NarinfoCache {
    known: Mutex<Positive>,
    missing: Mutex<LruCache<StorePathHash, Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn cap(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN)
}

impl Default for NarinfoCache {
    fn default() -> Self {
        Self {
            known: Mutex::new(Positive {
                map: LruCache::new(cap(MAX_KNOWN_ENTRIES)),
                bytes: 0,
            }),
            missing: Mutex::new(LruCache::new(cap(MAX_MISSING_ENTRIES))),
        }
    }
}

impl NarinfoCache {
    /// The verified narinfo of `hash` and its sources, if remembered and fresh.
    pub fn known(&self, hash: &StorePathHash) -> Option<Known> {
        let mut k = lock(&self.known);
        let fresh = k.map.get(hash).map(|e| e.at.elapsed() < POSITIVE_TTL)?;
        if !fresh {
            if let Some(old) = k.map.pop(hash) {
                k.bytes -= old.bytes;
            }
            return None;
        }
        k.map.peek(hash).cloned()
    }

    /// Remembers that `c` has the NAR of `hash`. A narinfo with another NAR hash replaces what
    /// was known (the path was rebuilt differently, or an older entry was wrong).
    pub fn remember(&self, hash: StorePathHash, c: Candidate) {
        let mut guard = lock(&self.known);
        let k = &mut *guard;
        let cost = c.info.approx_bytes();
        let now = Instant::now();
        let replace = k.map.peek(&hash).is_none_or(|e| e.info.nar_hash != c.info.nar_hash);
        if replace {
            if let Some(old) = k.map.pop(&hash) {
                k.bytes -= old.bytes;
            }
            k.bytes += cost;
            let entry = Known {
                info: c.info.clone(),
                candidates: vec![c],
                at: now,
                bytes: cost,
            };
            if let Some((_, old)) = k.map.push(hash, entry) {
                k.bytes -= old.bytes;
            }
        } else if let Some(e) = k.map.get_mut(&hash) {
            e.at = now;
            if !e.candidates.iter().any(|x| x.source == c.source) && e.candidates.len() < MAX_CANDIDATES_PER_PATH {
                e.candidates.push(c);
                e.bytes += cost;
                k.bytes += cost;
            }
        }
        while k.bytes > MAX_KNOWN_BYTES {
            match k.map.pop_lru() {
                Some((_, old)) => k.bytes -= old.bytes,
                None => break,
            }
        }
        drop(guard);
        lock(&self.missing).pop(&hash);
    }

    /// True when `hash` was a miss less than [`NEGATIVE_TTL`] ago.
    pub fn is_missing(&self, hash: &StorePathHash) -> bool {
        let mut m = lock(&self.missing);
        match m.get(hash) {
            Some(t) if t.elapsed() < NEGATIVE_TTL => true,
            Some(_) => {
                m.pop(hash);
                false
            }
            None => false,
        }
    }

    pub fn remember_missing(&self, hash: StorePathHash) {
        lock(&self.missing).put(hash, Instant::now());
    }

    /// Entries and approximate bytes of the positive cache.
    pub fn usage(&self) -> (usize, usize) {
        let k = lock(&self.known);
        (k.map.len(), k.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::narinfo::{Compression, NarHash, StorePath};
    use crate::proxy::source::SourceId;

    fn candidate(i: u32, refs: usize, source: usize) -> (StorePathHash, Candidate) {
        let hash: String = format!("{i:0>32}");
        let path = StorePath::parse("/nix/store", &format!("/nix/store/{hash}-p")).expect("path");
        let references = (0..refs).map(|_| path.clone()).collect();
        let info = NarInfo {
            store_path: path.clone(),
            url: "nar/x.nar".into(),
            compression: Compression::None,
            file_hash: None,
            file_size: None,
            nar_hash: NarHash::from_digest([i as u8; 32]),
            nar_size: 1,
            references,
            deriver: None,
            sigs: vec![],
            ca: None,
        };
        let c = Candidate {
            source: SourceId::Upstream(source),
            info: Arc::new(info),
            nar_url: url::Url::parse("http://x/nar/x.nar").expect("url"),
            zstd: false,
            load: None,
            partial: false,
        };
        (path.hash(), c)
    }

    #[test]
    fn the_positive_cache_keeps_its_byte_cap_by_evicting_the_least_recently_used() {
        let cache = NarinfoCache::default();
        // About 120 KiB each: the byte cap holds a few hundred.
        let (first, c) = candidate(0, 1500, 0);
        let each = c.info.approx_bytes();
        cache.remember(first, c);
        let n = (MAX_KNOWN_BYTES / each + 50) as u32;
        for i in 1..n {
            let (h, c) = candidate(i, 1500, 0);
            cache.remember(h, c);
            if i == 1 {
                // Touching the first keeps it: the least recently used go first.
                assert!(cache.known(&first).is_some());
            }
        }
        let (entries, bytes) = cache.usage();
        assert!(bytes <= MAX_KNOWN_BYTES, "{bytes} bytes cached");
        assert!(entries < n as usize, "{entries} of {n} kept");
        assert!(cache.known(&candidate(2, 0, 0).0).is_none(), "an old entry was evicted");
        assert!(cache.known(&candidate(n - 1, 0, 0).0).is_some(), "the newest is kept");
        // A second source of a known path joins it, once.
        let (h, c) = candidate(n - 1, 1500, 1);
        cache.remember(h, c.clone());
        cache.remember(h, c);
        assert_eq!(cache.known(&h).map(|k| k.candidates.len()), Some(2));
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire() {
        let cache = NarinfoCache::default();
        let (h, c) = candidate(1, 0, 0);
        cache.remember(h, c);
        let (m, _) = candidate(2, 0, 0);
        cache.remember_missing(m);
        assert!(cache.is_missing(&m) && cache.known(&h).is_some());
        tokio::time::advance(NEGATIVE_TTL).await;
        assert!(!cache.is_missing(&m), "a miss is forgotten after NEGATIVE_TTL");
        assert!(cache.known(&h).is_some());
        tokio::time::advance(POSITIVE_TTL).await;
        assert!(cache.known(&h).is_none(), "a hit is forgotten after POSITIVE_TTL");
        assert_eq!(cache.usage(), (0, 0), "and its bytes released");
    }
}
