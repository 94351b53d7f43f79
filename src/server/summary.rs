//! The store server's content summary (`GET /summary`, format in `crate::summary`), and the
//! learner that puts paths this host just substituted into the index at once.
//!
//! The [`Publisher`] rebuilds the summary from the index when the index changed (woken by it,
//! not polling: issue #27), at most every [`REBUILD_EVERY`] (a scan's burst of changes is one
//! rebuild), bumps the version the beacon announces, and remembers the last
//! [`MAX_LOG`] additions so peers fetch deltas. Nothing is published before the first full scan
//! of the store succeeded (a summary of a half-filled index would tell peers "no" for paths this
//! host has): until then the beacon announces no version, and peers ask this host as one with
//! no summary. Versions carry a random, non-zero per-process epoch in their high 32 bits, so a
//! delta is never computed against another run's numbering.
//! Memory: the set of keys (about 16 bytes a path), the encoded summary (about 2.3 bytes a path)
//! and the log (16 bytes an entry): under 1 MiB for 20,000 paths.
//!
//! The learner: the proxy tells it which store paths it just delivered to the local Nix; once
//! Nix has registered one (checked after [`LEARN_DELAYS`]), a servable path enters the index and
//! so the next summary, so peers can fetch it from this host within about two announce intervals
//! instead of after the next rescan. Bounded: a queue of [`LEARN_QUEUE`] paths (more are
//! dropped: the rescan still finds them), [`LEARN_AT_ONCE`] checked at a time.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::index::{index_if_valid, Index};
use crate::narinfo::{StorePath, TrustedKeys};
use crate::store::Store;
use crate::summary;

/// The version the beacon reads before anything was published (it then announces none).
pub const UNPUBLISHED: u64 = 0;
/// The summary is rebuilt at most this often (when the index changed).
pub const REBUILD_EVERY: Duration = Duration::from_secs(1);
/// Additions remembered for deltas.
pub const MAX_LOG: usize = summary::MAX_DELTA_KEYS;
/// Paths waiting to be learnt.
pub const LEARN_QUEUE: usize = 1024;
/// Paths checked at once.
const LEARN_AT_ONCE: usize = 4;
/// When a delivered path is looked for in the store (Nix registers it after unpacking).
const LEARN_DELAYS: [Duration; 4] = [
    Duration::from_secs(1),
    Duration::from_secs(3),
    Duration::from_secs(10),
    Duration::from_secs(30),
];

struct State {
    /// The index generation the summary was built from.
    generation: Option<u64>,
    version: u64,
    full: Bytes,
    keys: HashSet<u64>,
    /// (version, key) of the latest additions, oldest first.
    log: VecDeque<(u64, u64)>,
    /// Every addition after this version is in `log`.
    log_floor: u64,
}

pub struct Publisher {
    index: Arc<Index>,
    /// The current version, read by the beacon at every announce; [`UNPUBLISHED`] until the
    /// first complete summary.
    version: Arc<AtomicU64>,
    state: Mutex<State>,
    /// Times [`Self::run`] woke to look at the index (tests: an idle publisher does not poll).
    looks: AtomicU64,
}

impl Publisher {
    pub fn new(index: Arc<Index>) -> Self {
        let epoch = u64::from(rand::random::<u32>() | 1) << 32;
        let full = summary::encode_full(epoch, &[]).unwrap_or_default();
        Self {
            index,
            version: Arc::new(AtomicU64::new(UNPUBLISHED)),
            state: Mutex::new(State {
                generation: None,
                version: epoch,
                full,
                keys: HashSet::new(),
                log: VecDeque::new(),
                log_floor: epoch,
            }),
            looks: AtomicU64::new(0),
        }
    }

    /// The version to announce (shared with the beacon).
    pub fn version_handle(&self) -> Arc<AtomicU64> {
        self.version.clone()
    }

    /// The version published now; none before the first complete summary (the beacon does not
    /// announce [`UNPUBLISHED`] either).
    pub fn version(&self) -> Option<u64> {
        Some(self.version.load(Ordering::Acquire)).filter(|v| *v != UNPUBLISHED)
    }

    /// Rebuilds the summary if the index changed since the last build (once it is complete).
    pub fn refresh(&self) {
        if !self.index.complete() {
            return;
        }
        if self.state.lock().unwrap_or_else(|p| p.into_inner()).generation == Some(self.index.generation()) {
            return;
        }
        let (generation, hashes) = self.index.hashes();
        let keys: Vec<u64> = hashes.iter().map(summary::key).collect();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let version = st.version + 1;
        let full = match summary::encode_full(version, &keys) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, paths = keys.len(), "cannot build the content summary");
                return;
            }
        };
        let new: HashSet<u64> = keys.into_iter().collect();
        for k in new.difference(&st.keys).copied().collect::<Vec<_>>() {
            st.log.push_back((version, k));
        }
        while st.log.len() > MAX_LOG {
            if let Some((v, _)) = st.log.pop_front() {
                st.log_floor = v;
            }
        }
        // Entries of one version evicted in part make that version incomplete too.
        let floor = st.log_floor;
        while st.log.front().is_some_and(|(v, _)| *v == floor) {
            st.log.pop_front();
        }
        st.keys = new;
        st.full = full;
        st.version = version;
        st.generation = Some(generation);
        self.version.store(version, Ordering::Release);
    }

    /// The summary for a peer that has version `since` (a delta when possible); `None` before
    /// anything was published.
    pub fn response(&self, since: Option<u64>) -> Option<Bytes> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.generation?;
        match since {
            Some(s) if s >= st.log_floor && s <= st.version => {
                let keys: Vec<u64> = st.log.iter().filter(|(v, _)| *v > s).map(|(_, k)| *k).collect();
                Some(summary::encode_delta(s, st.version, &keys))
            }
            _ => Some(st.full.clone()),
        }
    }

    /// Times the publisher looked at the index.
    pub fn looks(&self) -> u64 {
        self.looks.load(Ordering::Relaxed)
    }

    /// Keeps the summary current until `shutdown`: a rebuild when the index changed, at most
    /// every [`REBUILD_EVERY`].
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            self.looks.fetch_add(1, Ordering::Relaxed);
            self.refresh();
            let rebuilt = tokio::time::Instant::now();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.index.changed() => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(rebuilt + REBUILD_EVERY) => {}
            }
        }
    }
}

/// Puts paths the proxy delivered into the index once the store has them (see the module doc).
pub async fn learn(
    store: Store,
    index: Arc<Index>,
    keys: TrustedKeys,
    rx: mpsc::Receiver<StorePath>,
    shutdown: CancellationToken,
) {
    let stream = tokio_stream_from(rx).map(|path| {
        let (store, index, keys) = (store.clone(), index.clone(), keys.clone());
        async move {
            for delay in LEARN_DELAYS {
                tokio::time::sleep(delay).await;
                match index_if_valid(&store, &index, &keys, &path).await {
                    Ok(true) => return,
                    Ok(false) => {}
                    Err(e) => {
                        tracing::debug!(%path, error = %e, "cannot check a delivered path");
                        return;
                    }
                }
            }
        }
    });
    let all = stream.buffer_unordered(LEARN_AT_ONCE).for_each(|()| async {});
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = all => {}
    }
}

fn tokio_stream_from<T: Send + 'static>(rx: mpsc::Receiver<T>) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::narinfo::{NarHash, StorePathHash};
    use crate::server::index::Entry;
    use crate::summary::{decode, may_contain, Summary};

    fn entry(i: u32) -> Entry {
        let hash: String = format!("{i:0>32}");
        Entry {
            path: StorePath::parse("/nix/store", &format!("/nix/store/{hash}-x")).expect("path"),
            nar_hash: NarHash::from_digest([0; 32]),
            nar_size: 1,
            narinfo: Bytes::new(),
        }
    }

    fn key(i: u32) -> u64 {
        summary::key(&StorePathHash::parse(&format!("{i:0>32}")).expect("hash"))
    }

    #[test]
    fn the_summary_follows_the_index_with_deltas() {
        let index = Arc::new(Index::new(1 << 30));
        let p = Publisher::new(index.clone());
        for i in 0..100 {
            index.insert(entry(i));
        }
        p.refresh();
        assert_eq!(
            p.version_handle().load(Ordering::Acquire),
            UNPUBLISHED,
            "not before a full scan"
        );
        assert!(p.response(None).is_none());
        index.mark_complete();
        p.refresh();
        let v1 = p.version_handle().load(Ordering::Acquire);
        let Summary::Full { version, filter } = decode(&p.response(None).expect("published")).expect("full") else {
            panic!("full")
        };
        assert_eq!(version, v1);
        assert!((0..100).all(|i| may_contain(filter.as_ref(), key(i))));
        // Unchanged index: same version.
        p.refresh();
        assert_eq!(p.version_handle().load(Ordering::Acquire), v1);
        // Two paths gained: a peer at v1 gets just those.
        index.insert(entry(500));
        index.insert(entry(501));
        p.refresh();
        let v2 = p.version_handle().load(Ordering::Acquire);
        assert!(v2 > v1);
        let Summary::Delta { from, version, keys } = decode(&p.response(Some(v1)).expect("published")).expect("delta")
        else {
            panic!("delta")
        };
        assert_eq!((from, version), (v1, v2));
        let mut keys = keys;
        keys.sort_unstable();
        let mut want = vec![key(500), key(501)];
        want.sort_unstable();
        assert_eq!(keys, want);
        // A version from another run, or too old: the full summary.
        assert!(matches!(
            decode(&p.response(Some(3)).expect("published")).expect("full"),
            Summary::Full { .. }
        ));
        assert!(matches!(
            decode(&p.response(Some(v2 + 1)).expect("published")).expect("full"),
            Summary::Full { .. }
        ));
    }

    /// Issue #27: the publisher looked at the index every second whatever happened. It now
    /// sleeps until the index changes, and a change is published within `REBUILD_EVERY`.
    #[tokio::test(start_paused = true)]
    async fn the_publisher_wakes_on_index_changes_not_on_a_timer() {
        let index = Arc::new(Index::new(1 << 30));
        index.insert(entry(1));
        index.mark_complete();
        let p = Arc::new(Publisher::new(index.clone()));
        let shutdown = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(p.clone().run(shutdown.clone()));
        tokio::time::sleep(REBUILD_EVERY * 2).await;
        let v1 = p.version().expect("published");
        let looks = p.looks();
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(p.looks(), looks, "no look without a change");
        index.insert(entry(2));
        tokio::time::sleep(REBUILD_EVERY).await;
        assert!(p.version().expect("published") > v1, "the change is published");
        assert_eq!(p.looks(), looks + 1);
        shutdown.cancel();
        while tasks.join_next().await.is_some() {}
    }
}
