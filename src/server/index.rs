//! The in-memory index of servable paths: store hash → rendered narinfo.
//!
//! A path enters the index only after one of its signatures verified against a trusted key, so a
//! narinfo hit costs one hash lookup and no daemon round trip. The index is filled by a full scan
//! at start and refreshed by periodic rescans (new paths added, vanished paths dropped). A miss is
//! answered from the index alone (404), so an absent path and an unsigned one cost the very same
//! work and time; the [`MissQueue`] then checks the missed hash against the daemon in the
//! background, so a path added or signed between scans is served from the next request on.
//! Invariant: every entry was verified against the trusted keys; memory is capped at `max_bytes`
//! of rendered narinfo (past that, paths are served through the daemon, uncached, and a miss asks
//! the daemon before answering, with the same number of round trips for every kind of miss).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::narinfo::{NarHash, NarInfo, StorePath, StorePathHash, TrustedKeys};
use crate::store::{PathInfo, Store};

/// Path-info queries in flight during a scan (leaves pool connections for live requests).
const SCAN_CONCURRENCY: usize = 4;
/// Rough per-entry overhead beyond the narinfo text (map slot, Arc, path string).
const ENTRY_OVERHEAD: usize = 192;
/// The index counts as full when less than this is left (about one large narinfo).
const FULL_MARGIN: usize = 64 * 1024;
/// Missed hashes waiting for their background check; more are dropped (the next periodic scan
/// still finds new paths). Memory: a hash and a set slot each, a few KiB in all.
pub const MISS_QUEUE: usize = 256;

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
            url: nar_url(&info.path.hash(), &info.nar_hash),
            compression: Some("none".into()),
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

/// The NAR URL written into our narinfo: self-describing, so it stays valid as long as any store
/// holds those exact bytes.
pub fn nar_url(hash: &StorePathHash, nar_hash: &NarHash) -> String {
    format!("nar/{hash}-{}.nar", nar_hash.to_nix32())
}

pub struct Index {
    map: RwLock<HashMap<StorePathHash, Arc<Entry>>>,
    /// Approximate memory held by entries.
    bytes: AtomicUsize,
    /// Cap on `bytes`.
    max_bytes: usize,
    /// A scan completed: the index holds every servable path, so a miss may be answered from it.
    ready: AtomicBool,
    /// Cancelled once the first scan ended, well or not (the listeners wait for it).
    first_scan: CancellationToken,
}

impl Index {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            map: RwLock::new(HashMap::new()),
            bytes: AtomicUsize::new(0),
            max_bytes,
            ready: AtomicBool::new(false),
            first_scan: CancellationToken::new(),
        }
    }

    /// True once a scan has completed.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Cancelled when the first scan has ended (successfully or not).
    pub fn first_scan_done(&self) -> CancellationToken {
        self.first_scan.clone()
    }

    /// True when another entry might not fit.
    pub fn is_full(&self) -> bool {
        self.bytes.load(Ordering::Relaxed) + FULL_MARGIN > self.max_bytes
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
        if let Some(old) = map.insert(e.path.hash(), e.clone()) {
            self.bytes.fetch_sub(old.cost(), Ordering::Relaxed);
        }
        self.bytes.fetch_add(cost, Ordering::Relaxed);
        e
    }

    pub fn remove(&self, hash: &StorePathHash) {
        if let Some(old) = self.map.write().unwrap_or_else(|p| p.into_inner()).remove(hash) {
            self.bytes.fetch_sub(old.cost(), Ordering::Relaxed);
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
            }
            keep
        });
    }
}

/// Keeps the index in step with the store until `shutdown`: a scan now, then one every
/// `interval`. Paths found unservable are remembered (until they leave the store) so a rescan
/// only queries new paths; a path signed later is found by the miss path of the server.
pub async fn maintain(
    store: Store,
    index: Arc<Index>,
    keys: TrustedKeys,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut unservable: HashSet<StorePathHash> = HashSet::new();
    loop {
        let t0 = Instant::now();
        match scan(&store, &index, &keys, &mut unservable).await {
            Ok((valid, added)) => {
                index.ready.store(true, Ordering::Release);
                if index.is_full() {
                    tracing::warn!("index full (--index-max-mib): misses now ask the daemon before answering");
                }
                tracing::info!(
                    servable = index.len(),
                    valid,
                    added,
                    ms = t0.elapsed().as_millis() as u64,
                    "store scanned"
                )
            }
            Err(e) => {
                tracing::warn!(error = %e, "store scan failed; serving from the daemon directly until the next one")
            }
        }
        index.first_scan.cancel();
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
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

/// Hashes that missed the index, waiting to be checked against the daemon off the response path.
pub struct MissQueue {
    tx: mpsc::Sender<StorePathHash>,
    /// Taken by [`check_misses`].
    rx: Mutex<Option<mpsc::Receiver<StorePathHash>>>,
    /// Queued hashes, so a hash asked for again and again is checked once.
    pending: Mutex<HashSet<StorePathHash>>,
}

impl Default for MissQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl MissQueue {
    pub fn new() -> Self {
        let (tx, rx) = mpsc::channel(MISS_QUEUE);
        Self {
            tx,
            rx: Mutex::new(Some(rx)),
            pending: Mutex::new(HashSet::new()),
        }
    }

    /// Queues `hash` for a check unless it is queued already or the queue is full. Constant work,
    /// whatever the hash.
    pub fn push(&self, hash: StorePathHash) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.len() < MISS_QUEUE && pending.insert(hash) && self.tx.try_send(hash).is_err() {
            pending.remove(&hash);
        }
    }
}

/// Checks missed hashes against the daemon, one at a time (so live requests keep the rest of
/// the daemon connections), indexing those that turn out servable, until `shutdown`.
pub async fn check_misses(
    store: Store,
    index: Arc<Index>,
    keys: TrustedKeys,
    queue: Arc<MissQueue>,
    shutdown: CancellationToken,
) {
    let Some(mut rx) = queue.rx.lock().unwrap_or_else(|p| p.into_inner()).take() else {
        return;
    };
    loop {
        let hash = tokio::select! {
            h = rx.recv() => match h { Some(h) => h, None => return },
            _ = shutdown.cancelled() => return,
        };
        if index.get(&hash).is_none() {
            lookup_daemon(&store, &index, &keys, &hash).await;
        }
        queue.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&hash);
    }
}

/// Asks the daemon for `hash` and indexes it if servable. Two round trips whether or not the
/// path exists (for an absent one, the second asks for a path that cannot be valid), so the
/// daemon's work does not tell an unsigned path from an absent one. Daemon errors are logged and
/// count as a miss.
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
