//! Misses answered from the index alone, checked with the daemon afterwards.
//!
//! A request for a path the index does not hold gets its 404 at once, by the same code whatever
//! the path is (absent, unsigned, untrusted): the answer's timing cannot tell them apart, because
//! nothing before the answer depends on the store. The hash is then queued ([`MissChecks::note`])
//! for a check with the daemon ([`index::lookup_daemon`]), so a path added or signed since the
//! last scan is served from the next request on.
//!
//! The checks run one at a time, away from any request. A hash is checked at most once per
//! [`RECHECK_AFTER`], and at most [`CHECKS_PER_SEC`] checks run per second: a peer cannot make the
//! daemon work for it at will, and cannot time the checks of one private path often enough to
//! learn anything from their effect on other requests. Memory: the queue holds [`QUEUE`] hashes,
//! the recent-checks map [`RECENT`] entries (about 100 bytes each, 400 KiB in all).

use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lru::LruCache;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::index::{self, Index};
use crate::narinfo::{StorePathHash, TrustedKeys};
use crate::store::Store;

/// Misses waiting for their check; past that, a miss is not checked (the next scan finds it).
pub const QUEUE: usize = 64;
/// A hash checked this recently is not checked again.
pub const RECHECK_AFTER: Duration = Duration::from_secs(2);
/// Hashes remembered as recently checked (least recently checked forgotten first).
pub const RECENT: usize = 4096;
/// Checks per second, at most; misses over it are not checked.
pub const CHECKS_PER_SEC: u32 = 50;
/// One check (two daemon round trips) gives up after this long.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// The queue of misses to check. Cloning shares it.
#[derive(Clone)]
pub struct MissChecks {
    tx: mpsc::Sender<StorePathHash>,
    rx: Arc<Mutex<Option<mpsc::Receiver<StorePathHash>>>>,
}

impl Default for MissChecks {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        Self {
            tx,
            rx: Arc::new(Mutex::new(Some(rx))),
        }
    }
}

impl MissChecks {
    /// Queues `hash` for a check; never waits (a full queue drops it).
    pub fn note(&self, hash: StorePathHash) {
        let _ = self.tx.try_send(hash);
    }

    /// The receiving end, for the one task that runs the checks ([`run`]); `None` once taken.
    pub fn take_receiver(&self) -> Option<mpsc::Receiver<StorePathHash>> {
        self.rx.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Checks every queued miss with the daemon, indexing what turned servable, until `shutdown`.
pub async fn check_with_daemon(
    rx: mpsc::Receiver<StorePathHash>,
    store: Store,
    index: Arc<Index>,
    keys: TrustedKeys,
    shutdown: CancellationToken,
) {
    run(
        rx,
        |hash| {
            let (store, index, keys) = (store.clone(), index.clone(), keys.clone());
            async move {
                let found =
                    tokio::time::timeout(CHECK_TIMEOUT, index::lookup_daemon(&store, &index, &keys, &hash)).await;
                if let Ok(Some(e)) = found {
                    tracing::debug!(path = %e.path, "a missed path is servable now");
                }
            }
        },
        shutdown,
    )
    .await
}

/// The check loop, over any `check` (tests count the calls).
pub async fn run<F, Fut>(mut rx: mpsc::Receiver<StorePathHash>, mut check: F, shutdown: CancellationToken)
where
    F: FnMut(StorePathHash) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut recent: LruCache<StorePathHash, Instant> =
        LruCache::new(NonZeroUsize::new(RECENT).unwrap_or(NonZeroUsize::MIN));
    let mut second = Instant::now();
    let mut this_second = 0u32;
    loop {
        let hash = tokio::select! {
            h = rx.recv() => match h { Some(h) => h, None => return },
            _ = shutdown.cancelled() => return,
        };
        let now = Instant::now();
        if recent
            .get(&hash)
            .is_some_and(|t| now.duration_since(*t) < RECHECK_AFTER)
        {
            continue;
        }
        if now.duration_since(second) >= Duration::from_secs(1) {
            second = now;
            this_second = 0;
        }
        if this_second >= CHECKS_PER_SEC {
            continue;
        }
        this_second += 1;
        recent.put(hash, now);
        check(hash).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn hash(i: usize) -> StorePathHash {
        StorePathHash::parse(&format!("{i:0>32}")).expect("a valid hash")
    }

    /// Runs the loop over `sent` (all queued at once, `pause` apart in tokio's paused clock) and
    /// returns how many checks ran.
    async fn checks_for(sent: Vec<StorePathHash>, pause: Duration) -> usize {
        let (tx, rx) = mpsc::channel(sent.len().max(1));
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(
            rx,
            move |_| {
                c.fetch_add(1, Ordering::Relaxed);
                async {}
            },
            stop.clone(),
        ));
        for h in sent {
            tx.send(h).await.expect("queue open");
            tokio::time::sleep(pause).await;
        }
        drop(tx);
        task.await.expect("loop ends when the queue closes");
        count.load(Ordering::Relaxed)
    }

    #[tokio::test(start_paused = true)]
    async fn one_hash_is_checked_once_per_recheck_interval() {
        let ten_times = vec![hash(7); 10];
        assert_eq!(checks_for(ten_times.clone(), Duration::from_millis(10)).await, 1);
        // 10 requests 1 s apart: one check every RECHECK_AFTER (2 s), so 5.
        assert_eq!(checks_for(ten_times, Duration::from_secs(1)).await, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn checks_per_second_are_capped() {
        let distinct: Vec<_> = (0..500).map(hash).collect();
        // All within well under a second.
        assert_eq!(
            checks_for(distinct, Duration::from_micros(100)).await,
            CHECKS_PER_SEC as usize
        );
    }

    #[test]
    fn a_full_queue_drops_instead_of_waiting() {
        let m = MissChecks::default();
        for i in 0..QUEUE + 10 {
            m.note(hash(i));
        }
        let mut rx = m.take_receiver().expect("first take");
        assert!(m.take_receiver().is_none());
        let mut n = 0;
        while rx.try_recv().is_ok() {
            n += 1;
        }
        assert_eq!(n, QUEUE);
    }
}
