//! The in-memory index of servable paths: store hash → rendered narinfo.
//!
//! A path enters the index only after one of its signatures verified against a trusted key, so a
//! narinfo hit costs one hash lookup and no daemon round trip. The index is filled by a full scan
//! at start, refreshed by periodic rescans (new paths added, vanished paths dropped), and a miss
//! is checked with the daemon after its 404 ([`lookup_daemon`], queued by `server::misses`), so
//! a path added or signed between scans is served from the next request on. Invariant: every
//! entry was verified against the trusted keys; memory is capped at `max_bytes` of rendered
//! narinfo (past that, paths are not indexed and not served until a rescan finds room). A miss
//! is answered from the index alone, the same way whether the path is absent, unsigned or
//! untrusted, so its timing does not tell them apart; the check afterwards costs the daemon the
//! same two round trips for every kind of miss.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::narinfo::{Compression, NarHash, NarInfo, StorePath, StorePathHash, TrustedKeys};
use crate::store::{PathInfo, Store};

/// Path-info queries in flight during a scan (leaves pool connections for live requests).
const SCAN_CONCURRENCY: usize = 4;
/// After a failed scan the next one comes this soon, doubling per failure up to the rescan interval.
pub const SCAN_RETRY_FIRST: Duration = Duration::from_secs(1);
/// Rough per-entry overhead beyond the narinfo text (map slot, Arc, path string).
const ENTRY_OVERHEAD: usize = 192;

/// One servable path.
#[derive(Debug)]
pub struct Entry {
    pub path: StorePath,
    pub nar_hash: NarHash,
    pub nar_size: u64,
    /// The narinfo as served, rendered once.
    pub narinfo: Bytes,
}

impl Entry {
    /// The entry for `info` if it may be served: a signature verifies against `keys` and the NAR
    /// size is known (old databases hold 0, which Nix rejects).
    pub fn servable(info: &PathInfo, keys: &TrustedKeys) -> Option<Self> {
        if info.nar_size == 0 {
            return None;
        }
        let ni = NarInfo {
            store_path: info.path.clone(),
            url: crate::cache_url::nar_url(&info.path.hash(), &info.nar_hash),
            compression: Compression::None,
            file_hash: None,
            file_size: None,
            nar_hash: info.nar_hash,
            nar_size: info.nar_size,
            references: info.references.clone(),
            deriver: info.deriver.as_ref().map(|d| d.basename().to_owned()),
            sigs: info.sigs.clone(),
            ca: info.ca.clone(),
        };
        if !ni.is_trusted(keys) {
            return None;
        }
        Some(Self {
            path: info.path.clone(),
            nar_hash: info.nar_hash,
            nar_size: info.nar_size,
            narinfo: Bytes::from(ni.render()),
        })
    }

    fn cost(&self) -> usize {
        self.narinfo.len() + self.path.as_str().len() + ENTRY_OVERHEAD
    }
}

pub struct Index {
    map: RwLock<HashMap<StorePathHash, Arc<Entry>>>,
    /// Approximate memory held by entries.
    bytes: AtomicUsize,
    /// Cap on `bytes`.
    max_bytes: usize,
    /// Bumped on every change of the set of hashes (for the content summary).
    generation: AtomicU64,
    /// A full scan of the store succeeded: the index holds every servable path (up to the
    /// memory cap), so a summary of it is complete.
    complete: std::sync::atomic::AtomicBool,
    /// Woken when `generation` moves or the index is marked complete: the summary publisher
    /// waits on it instead of polling (one waiter; a permit is kept, no change is missed).
    changed: tokio::sync::Notify,
}

impl Index {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            map: RwLock::new(HashMap::new()),
            bytes: AtomicUsize::new(0),
            max_bytes,
            generation: AtomicU64::new(0),
            complete: std::sync::atomic::AtomicBool::new(false),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// Resolves once the index changed or was marked complete since the last call.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// Marks the index complete (after a full scan; tests).
    pub fn mark_complete(&self) {
        self.complete.store(true, Ordering::Release);
        self.changed.notify_one();
    }

    /// True once a full scan succeeded (see the field).
    pub fn complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    /// Changes whenever a hash enters or leaves the index.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Every hash in the index, with the generation they belong to.
    pub fn hashes(&self) -> (u64, Vec<StorePathHash>) {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        (self.generation(), map.keys().copied().collect())
    }

    pub fn get(&self, hash: &StorePathHash) -> Option<Arc<Entry>> {
        self.map.read().unwrap_or_else(|p| p.into_inner()).get(hash).cloned()
    }

    /// Inserts unless the memory cap is reached; returns the entry either way.
    pub fn insert(&self, e: Entry) -> Arc<Entry> {
        let e = Arc::new(e);
        let cost = e.cost();
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if self.bytes.load(Ordering::Relaxed) + cost > self.max_bytes {
            return e;
        }
        match map.insert(e.path.hash(), e.clone()) {
            Some(old) => {
                self.bytes.fetch_sub(old.cost(), Ordering::Relaxed);
            }
            None => {
                self.generation.fetch_add(1, Ordering::AcqRel);
                self.changed.notify_one();
            }
        }
        self.bytes.fetch_add(cost, Ordering::Relaxed);
        e
    }

    pub fn remove(&self, hash: &StorePathHash) {
        if let Some(old) = self.map.write().unwrap_or_else(|p| p.into_inner()).remove(hash) {
            self.bytes.fetch_sub(old.cost(), Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::AcqRel);
            self.changed.notify_one();
        }
    }

    pub fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn contains(&self, hash: &StorePathHash) -> bool {
        self.map.read().unwrap_or_else(|p| p.into_inner()).contains_key(hash)
    }

    /// Drops entries whose hash is not in `valid`.
    fn retain(&self, valid: &HashSet<StorePathHash>) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        map.retain(|h, e| {
            let keep = valid.contains(h);
            if !keep {
                self.bytes.fetch_sub(e.cost(), Ordering::Relaxed);
                self.generation.fetch_add(1, Ordering::AcqRel);
                self.changed.notify_one();
            }
            keep
        });
    }
}

/// Keeps the index in step with the store until `shutdown`: a scan now, then one every
/// `interval`. Paths found unservable are remembered (until they leave the store) so a rescan
/// only queries new paths; a path signed later is found by the check of a miss (`server::misses`).
pub async fn maintain(
    store: Store,
    index: Arc<Index>,
    keys: TrustedKeys,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut unservable: HashSet<StorePathHash> = HashSet::new();
    let mut failures = 0u32;
    loop {
        let t0 = Instant::now();
        let mut next = interval;
        match scan(&store, &index, &keys, &mut unservable).await {
            Ok((valid, added)) => {
                failures = 0;
                index.mark_complete();
                tracing::info!(
                    servable = index.len(),
                    valid,
                    added,
                    ms = t0.elapsed().as_millis() as u64,
                    "store scanned"
                )
            }
            Err(e) => {
                // Soon again (a daemon still starting, a connect refused under load), backing
                // off up to the interval: until a scan succeeds no summary is published.
                next = interval.min(SCAN_RETRY_FIRST * 2u32.saturating_pow(failures.min(16)));
                failures += 1;
                tracing::warn!(error = %e, retry_in = ?next, "store scan failed; serving from the daemon directly until one succeeds")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// One scan: returns (valid paths, entries added).
async fn scan(
    store: &Store,
    index: &Index,
    keys: &TrustedKeys,
    unservable: &mut HashSet<StorePathHash>,
) -> Result<(usize, usize), crate::store::Error> {
    let all = store.all_valid_paths().await?;
    let valid: HashSet<StorePathHash> = all.iter().map(StorePath::hash).collect();
    index.retain(&valid);
    unservable.retain(|h| valid.contains(h));
    let new: Vec<StorePath> = all
        .into_iter()
        .filter(|p| {
            let h = p.hash();
            !index.contains(&h) && !unservable.contains(&h)
        })
        .collect();
    let mut results = stream::iter(new)
        .map(|p| async move { (p.hash(), store.path_info(&p).await) })
        .buffer_unordered(SCAN_CONCURRENCY);
    let mut added = 0;
    while let Some((hash, r)) = results.next().await {
        match r {
            Ok(Some(info)) => match Entry::servable(&info, keys) {
                Some(e) => {
                    index.insert(e);
                    added += 1;
                }
                None => {
                    unservable.insert(hash);
                }
            },
            Ok(None) => {}
            Err(e) => tracing::debug!(%hash, error = %e, "path info failed during scan"),
        }
    }
    Ok((valid.len(), added))
}

/// Asks the daemon for `hash` and indexes it if servable. Two round trips whether or not the
/// path exists (for an absent one, the second asks for a path that cannot be valid), so the
/// daemon's work hardly differs between an unsigned and an absent path. Daemon errors are logged
/// and count as a miss.
pub async fn lookup_daemon(
    store: &Store,
    index: &Index,
    keys: &TrustedKeys,
    hash: &StorePathHash,
) -> Option<Arc<Entry>> {
    let r = async {
        match store.path_from_hash_part(hash).await? {
            Some(path) => store.path_info(&path).await,
            None => {
                let decoy = format!("{}/{hash}-absent", store.store_dir());
                if let Ok(p) = StorePath::parse(store.store_dir(), &decoy) {
                    store.path_info(&p).await?;
                }
                Ok(None)
            }
        }
    }
    .await;
    match r {
        Ok(Some(info)) => Entry::servable(&info, keys).map(|e| index.insert(e)),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(%hash, error = %e, "daemon lookup failed; answering 404");
            None
        }
    }
}

/// Whether `path` is valid in the store now; if it is and it is servable, it enters the index.
/// For paths known to have been added (delivered by the proxy, seen appearing in the store).
pub async fn index_if_valid(
    store: &Store,
    index: &Index,
    keys: &TrustedKeys,
    path: &StorePath,
) -> Result<bool, crate::store::Error> {
    if index.contains(&path.hash()) {
        return Ok(true);
    }
    match store.path_info(path).await? {
        Some(info) => {
            if let Some(e) = Entry::servable(&info, keys) {
                index.insert(e);
            }
            Ok(true)
        }
        None => Ok(false),
    }
}

/// As [`index_if_valid`], for a path known by its hash only (`server::store_watch`).
pub async fn check_new(
    store: &Store,
    index: &Index,
    keys: &TrustedKeys,
    hash: &StorePathHash,
) -> Result<bool, crate::store::Error> {
    if index.contains(hash) {
        return Ok(true);
    }
    match store.path_from_hash_part(hash).await? {
        Some(path) => index_if_valid(store, index, keys, &path).await,
        None => Ok(false),
    }
}
