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
