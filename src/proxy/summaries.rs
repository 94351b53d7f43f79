//! Peers' content summaries, kept current, so a lookup asks the peers that may have a path
//! instead of a fixed few (see `crate::summary` for what a summary is).
//!
//! The beacon carries each peer's summary version; [`PeerSummaries::run`] fetches a summary (a
//! delta when it can) whenever a peer announces a version it does not have, at most
//! [`FETCH_AT_ONCE`] at a time and at most once per [`MIN_FETCH_GAP`] per peer, through the
//! proxy's peer client (so the node-id check, the timeouts and the no-redirect rule apply). A
//! fetch that fails (no answer, an error status, a summary that does not decode) doubles that
//! peer's gap, up to [`MAX_FETCH_GAP`], until one succeeds; an answer that does not name the
//! peer's node id marks it an impostor at that address (the proxy's `SummarySources::fetch`),
//! which is then not asked at all.
//! What a summary says is only a hint: "no" for a peer whose summary is stale or missing is
//! treated as "unknown", and every answer is still checked like any other.
//!
//! Bounds: one summary per peer in the table (entries of peers that left are dropped), each at
//! most `summary::MAX_SUMMARY_BYTES` plus [`MAX_ADDED`] keys from deltas (then a full one is
//! fetched); all together at most [`MAX_TOTAL_BYTES`] (beyond it, new peers stay "unknown").
//! A newcomer in a hall of 500 hosts with 20,000 paths each downloads about 23 MB once, then
//! deltas.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use xorf::BinaryFuse16;

use super::source::SourceError;
use crate::beacon::{wire::NodeId, PeerTable};
use crate::summary::{self, Summary};

/// Summaries fetched at once.
pub const FETCH_AT_ONCE: usize = 4;
/// A peer's summary is fetched at most this often.
pub const MIN_FETCH_GAP: Duration = Duration::from_secs(1);
/// Longest gap between fetches of a summary whose fetches keep failing (the gap doubles per
/// failure from [`MIN_FETCH_GAP`]).
pub const MAX_FETCH_GAP: Duration = Duration::from_secs(60);
/// The table is looked at most this often: a change (a join, a leave, a new summary version)
/// is acted on within this long, and a burst of them (a hall booting) costs one pass.
const CHECK_EVERY: Duration = Duration::from_millis(500);
/// With no change in the table, it is still looked at this often (a peer the proxy may ask
/// again, `SummarySources::usable`, changes nothing in the table). Issue #27: an idle loop
/// used to look every [`CHECK_EVERY`], two wake-ups a second on a laptop with nothing to do.
pub const CHECK_SAFETY: Duration = Duration::from_secs(10);
/// Keys kept from deltas per peer before a full summary is fetched instead.
pub const MAX_ADDED: usize = 65_536;
/// Memory for all summaries together.
pub const MAX_TOTAL_BYTES: usize = 48 * 1024 * 1024;

/// What [`PeerSummaries::run`] needs of the summaries' owner (the proxy): where the summaries
/// are kept, the peer table, which peers may be asked, and the peer client that fetches one.
pub trait SummarySources: Send + Sync + 'static {
    /// The summaries kept current.
    fn held(&self) -> &PeerSummaries;
    /// The beacon's peer table (none without a beacon: nothing to do).
    fn table(&self) -> Option<&Arc<PeerTable>>;
    /// Whether a peer may be asked at all (see `book::SourceBook::usable`).
    fn usable(&self, node: &NodeId) -> bool;
    /// Fetches a peer's summary (a delta from `since`, if given).
    fn fetch(
        &self,
        node: &NodeId,
        since: Option<u64>,
    ) -> impl Future<Output = Result<bytes::Bytes, SourceError>> + Send;
}

/// What a peer's summary says of a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hint {
    /// Its current summary holds the path (or a false positive, about 1 in 65,000).
    Maybe,
    /// Its current summary does not hold the path.
    No,
    /// No current summary: it publishes none, it changed since, or it was not fetched yet.
    Unknown,
}

struct Held {
    version: u64,
    filter: Option<BinaryFuse16>,
    added: HashSet<u64>,
    bytes: usize,
}

impl Held {
    fn size(filter: Option<&BinaryFuse16>, added: usize) -> usize {
        filter.map_or(0, |f| f.fingerprints.len() * 2) + added * 16 + 128
    }
}

/// When a peer's summary was last asked for, and how many fetches in a row failed.
#[derive(Clone, Copy)]
struct Asked {
    at: Instant,
    failures: u32,
}

impl Asked {
    /// The gap before the next fetch: [`MIN_FETCH_GAP`], doubled per failure in a row, at
    /// most [`MAX_FETCH_GAP`].
    fn gap(&self) -> Duration {
        MIN_FETCH_GAP
            .saturating_mul(1 << self.failures.min(16))
            .min(MAX_FETCH_GAP)
    }
}

#[derive(Default)]
struct Inner {
    held: HashMap<NodeId, Held>,
    /// When each peer's summary was last asked for (one entry per peer of the table).
    asked: HashMap<NodeId, Asked>,
    bytes: usize,
}

#[derive(Default)]
pub struct PeerSummaries {
    inner: Mutex<Inner>,
    /// Passes of [`Self::run`] over the table (what an idle proxy wakes for; tests).
    passes: std::sync::atomic::AtomicU64,
}

impl PeerSummaries {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What `node`'s summary says of `key`, given the version it announces now.
    pub fn hint(&self, node: &NodeId, announced: Option<u64>, key: u64) -> Hint {
        let Some(announced) = announced else {
            return Hint::Unknown;
        };
        let inner = self.lock();
        let Some(h) = inner.held.get(node) else {
            return Hint::Unknown;
        };
        if h.added.contains(&key) || summary::may_contain(h.filter.as_ref(), key) {
            Hint::Maybe
        } else if h.version == announced {
            Hint::No
        } else {
            Hint::Unknown
        }
    }

    /// Applies a fetched summary. False when it did not fit (a delta from another version, or
    /// over a memory cap): then nothing is held for the peer, so its next summary is a full one.
    fn apply(&self, node: NodeId, s: Summary) -> bool {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let old = inner.held.remove(&node);
        if let Some(o) = &old {
            inner.bytes -= o.bytes;
        }
        let held = match (s, old) {
            (Summary::Full { version, filter }, _) => Held {
                bytes: Held::size(filter.as_ref(), 0),
                version,
                filter,
                added: HashSet::new(),
            },
            (Summary::Delta { from, version, keys }, Some(mut o)) if o.version == from => {
                o.added.extend(keys);
                if o.added.len() > MAX_ADDED {
                    return false;
                }
                o.version = version;
                o.bytes = Held::size(o.filter.as_ref(), o.added.len());
                o
            }
            _ => return false,
        };
        if inner.bytes + held.bytes > MAX_TOTAL_BYTES {
            return false;
        }
        inner.bytes += held.bytes;
        inner.held.insert(node, held);
        true
    }

    /// Drops what is held of peers that left.
    fn retain(&self, live: &HashSet<NodeId>) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let mut freed = 0;
        inner.held.retain(|n, h| {
            let keep = live.contains(n);
            if !keep {
                freed += h.bytes;
            }
            keep
        });
        inner.bytes -= freed;
        inner.asked.retain(|n, _| live.contains(n));
    }

    /// Bytes held, for the status report.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// The version held of `node`'s summary.
    pub fn version(&self, node: &NodeId) -> Option<u64> {
        self.lock().held.get(node).map(|h| h.version)
    }

    /// Peers whose announced version we lack and that were not asked too recently, marked as
    /// asked now; with the version we hold (for a delta).
    fn due(&self, announced: &[(NodeId, u64)]) -> Vec<(NodeId, Option<u64>)> {
        let mut inner = self.lock();
        let now = Instant::now();
        let mut out = Vec::new();
        for (node, v) in announced {
            let have = inner.held.get(node).map(|h| h.version);
            if have == Some(*v) {
                continue;
            }
            let failures = match inner.asked.get(node) {
                Some(a) if now.duration_since(a.at) < a.gap() => continue,
                Some(a) => a.failures,
                None => 0,
            };
            inner.asked.insert(*node, Asked { at: now, failures });
            out.push((*node, have));
        }
        out
    }

    /// When the first of `announced` whose version is not held may be asked next (its gap
    /// after the last ask); `None` when every version is held.
    fn next_due(&self, announced: &[(NodeId, u64)]) -> Option<Instant> {
        let inner = self.lock();
        announced
            .iter()
            .filter(|(n, v)| inner.held.get(n).map(|h| h.version) != Some(*v))
            .map(|(n, _)| inner.asked.get(n).map_or_else(Instant::now, |a| a.at + a.gap()))
            .min()
    }

    /// Passes over the table so far.
    pub fn passes(&self) -> u64 {
        self.passes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A fetch of `node`'s summary ended: `ok` (it came and decoded) clears its failures, a
    /// failure doubles its gap.
    fn fetched(&self, node: &NodeId, ok: bool) {
        if let Some(a) = self.lock().asked.get_mut(node) {
            a.failures = if ok { 0 } else { a.failures.saturating_add(1) };
        }
    }

    /// Keeps the summaries of the table's peers current until `shutdown`: a pass over the table
    /// when it changed (at most every [`CHECK_EVERY`]), when a fetch that failed or came too
    /// soon is due again, and every [`CHECK_SAFETY`].
    pub async fn run(proxy: Arc<impl SummarySources>, shutdown: CancellationToken) {
        let Some(table) = proxy.table().cloned() else {
            return shutdown.cancelled().await;
        };
        let me = proxy.held();
        let mut generation = table.watch_summaries();
        loop {
            generation.borrow_and_update();
            let pass_at = Instant::now();
            me.passes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // One pass over the table without copying its entries, and the (costlier) usability
            // check only for peers announcing a version not held: in a steady hall, none
            // (copying every entry here, twice over, was 13-27 % of a steady serve's CPU).
            let peers = table.summaries();
            me.retain(&peers.iter().map(|(n, _)| *n).collect());
            let announced: Vec<(NodeId, u64)> = peers
                .iter()
                .filter_map(|(n, v)| v.map(|v| (*n, v)))
                .filter(|(n, v)| me.version(n) != Some(*v))
                .filter(|(n, _)| proxy.usable(n))
                .collect();
            let due = me.due(&announced);
            let table_ref = &table;
            let work = futures_util::stream::iter(due)
                .map(|(node, have)| {
                    let proxy = &proxy;
                    async move { (node, have, proxy.fetch(&node, have).await) }
                })
                .buffer_unordered(FETCH_AT_ONCE)
                .for_each(|(node, have, r)| async move {
                    if r.is_ok() {
                        // Its server answered, naming its node id: a useful peer, kept over
                        // new identities when the table is full (`beacon::table`).
                        if let Some(p) = table_ref.get(&node) {
                            table_ref.answered(&node, p.http_addr(), Instant::now());
                        }
                    }
                    let decoded = r.map(|b| summary::decode(&b));
                    me.fetched(&node, matches!(decoded, Ok(Ok(_))));
                    match decoded {
                        // One that does not fit leaves nothing held: the next fetch is full.
                        Ok(Ok(s)) => {
                            if !me.apply(node, s) {
                                tracing::debug!(%node, ?have, "summary not kept");
                            }
                        }
                        Ok(Err(e)) => tracing::debug!(%node, error = %e, "bad summary"),
                        Err(e) => tracing::debug!(%node, error = %e, "summary not fetched"),
                    }
                });
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = work => {}
            }
            let retry = me.next_due(&announced).map(|at| at.max(pass_at + CHECK_EVERY));
            let safety = Instant::now() + CHECK_SAFETY;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                // The table changed: looked at again, but not sooner than `CHECK_EVERY` after
                // the last pass. (A closed channel, the table gone, leaves the timers.)
                Ok(()) = generation.changed() => {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep_until(pass_at + CHECK_EVERY) => {}
                    }
                }
                _ = tokio::time::sleep_until(retry.map_or(safety, |r| r.min(safety))) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u64) -> u64 {
        i.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    #[tokio::test]
    async fn hints_follow_the_announced_version_and_deltas() {
        let s = PeerSummaries::default();
        let n = NodeId([1; 16]);
        let keys: Vec<u64> = (0..1000).map(key).collect();
        assert_eq!(s.hint(&n, Some(1), key(5)), Hint::Unknown, "nothing fetched yet");
        let full = summary::decode(&summary::encode_full(1, &keys).expect("encode")).expect("decode");
        assert!(s.apply(n, full));
        assert_eq!(s.hint(&n, Some(1), key(5)), Hint::Maybe);
        assert_eq!(s.hint(&n, Some(1), key(5000)), Hint::No);
        assert_eq!(s.hint(&n, None, key(5)), Hint::Unknown, "it stopped publishing");
        // It announces version 2: what we hold is stale, so "no" becomes "unknown".
        assert_eq!(s.hint(&n, Some(2), key(5000)), Hint::Unknown);
        assert!(s.apply(
            n,
            Summary::Delta {
                from: 1,
                version: 2,
                keys: vec![key(5000)]
            }
        ));
        assert_eq!(s.hint(&n, Some(2), key(5000)), Hint::Maybe);
        assert_eq!(s.hint(&n, Some(2), key(6000)), Hint::No);
        assert_eq!(s.due(&[(n, 2)]), vec![], "current");
        // A delta from a version we do not hold does not apply, and leaves nothing held, so
        // the next fetch is a full summary.
        assert!(!s.apply(
            n,
            Summary::Delta {
                from: 7,
                version: 8,
                keys: vec![]
            }
        ));
        assert_eq!(s.hint(&n, Some(8), key(5)), Hint::Unknown);
        tokio::time::sleep(MIN_FETCH_GAP).await;
        assert_eq!(s.due(&[(n, 8)]), vec![(n, None)]);
        assert_eq!(s.due(&[(NodeId([2; 16]), 1)]), vec![(NodeId([2; 16]), None)]);
        assert_eq!(s.due(&[(NodeId([2; 16]), 1)]), vec![], "not asked again at once");
        s.retain(&HashSet::new());
        assert_eq!(s.bytes(), 0, "peers that left take their summaries along");
    }

    /// Issue #25: a peer whose summary fetches fail was asked once a second, for ever. Each
    /// failure in a row doubles the gap (up to `MAX_FETCH_GAP`); a success resets it.
    #[tokio::test(start_paused = true)]
    async fn failed_summary_fetches_back_off() {
        let s = PeerSummaries::default();
        let n = NodeId([1; 16]);
        let due = |s: &PeerSummaries| s.due(&[(n, 1)]).len();
        let ms = Duration::from_millis(1);
        assert_eq!(due(&s), 1);
        for k in 1..=8u32 {
            s.fetched(&n, false);
            let gap = (MIN_FETCH_GAP * (1u32 << k)).min(MAX_FETCH_GAP);
            tokio::time::advance(gap - ms).await;
            assert_eq!(due(&s), 0, "after {k} failures: not before {gap:?}");
            tokio::time::advance(ms).await;
            assert_eq!(due(&s), 1, "after {k} failures: at {gap:?}");
        }
        s.fetched(&n, true);
        tokio::time::advance(MIN_FETCH_GAP - ms).await;
        assert_eq!(due(&s), 0);
        tokio::time::advance(ms).await;
        assert_eq!(due(&s), 1, "a success resets the gap");
    }

    /// A proxy whose peers are a bare table, whose fetches count and always succeed.
    struct Fake {
        held: PeerSummaries,
        table: Arc<PeerTable>,
        fetches: std::sync::atomic::AtomicU64,
    }

    impl SummarySources for Fake {
        fn held(&self) -> &PeerSummaries {
            &self.held
        }
        fn table(&self) -> Option<&Arc<PeerTable>> {
            Some(&self.table)
        }
        fn usable(&self, _: &NodeId) -> bool {
            true
        }
        async fn fetch(&self, node: &NodeId, _: Option<u64>) -> Result<bytes::Bytes, SourceError> {
            self.fetches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let v = self.table.get(node).and_then(|p| p.summary).unwrap_or(1);
            Ok(summary::encode_full(v, &[key(1)]).expect("encode"))
        }
    }

    fn announce(summary: u64) -> Vec<u8> {
        crate::beacon::wire::encode(&crate::beacon::wire::Beacon {
            kind: crate::beacon::wire::Kind::Announce,
            flags: 0,
            node: NodeId([1; 16]),
            port: 8380,
            interval_ms: 10_000,
            seq: 1,
            hostname: None,
            summary: Some(summary),
            commitment: None,
            proof: None,
        })
    }

    /// Issue #27: the loop looked at the table every 500 ms whatever happened (two wake-ups a
    /// second on an idle laptop). It now looks when the table changes (a join, a new summary
    /// version), within `CHECK_EVERY`, and otherwise every `CHECK_SAFETY`.
    #[tokio::test(start_paused = true)]
    async fn the_summary_loop_wakes_on_table_changes_not_on_a_timer() {
        let proxy = Arc::new(Fake {
            held: PeerSummaries::default(),
            table: Arc::new(PeerTable::new(NodeId([0; 16]))),
            fetches: Default::default(),
        });
        let shutdown = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(PeerSummaries::run(proxy.clone(), shutdown.clone()));
        let minute = Duration::from_secs(60);
        tokio::time::sleep(minute).await;
        let idle = proxy.held.passes();
        let most = 1 + (minute.as_secs() / CHECK_SAFETY.as_secs());
        assert!(idle <= most, "{idle} passes in a quiet minute (at most {most})");
        let src = std::net::SocketAddr::from(([10, 0, 0, 1], 8380));
        let n = NodeId([1; 16]);
        for version in [7, 8] {
            proxy.table.handle(src, &announce(version), Instant::now());
            tokio::time::sleep(CHECK_EVERY + MIN_FETCH_GAP).await;
            assert_eq!(proxy.held.version(&n), Some(version), "fetched once announced");
        }
        assert_eq!(proxy.fetches.load(std::sync::atomic::Ordering::Relaxed), 2);
        let before = proxy.held.passes();
        tokio::time::sleep(minute).await;
        let quiet = proxy.held.passes() - before;
        assert!(
            quiet <= most,
            "{quiet} passes in a quiet minute with a peer (at most {most})"
        );
        shutdown.cancel();
        while tasks.join_next().await.is_some() {}
    }
}
