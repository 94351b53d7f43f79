//! A fetch's busy sources (issue #24): peers whose store server had no transfer slot for the
//! NAR (`SourceError::Busy`), the upstreams held back meanwhile, and the hosts the busy answers
//! named as streaming the NAR (they serve what they have).
//!
//! A busy peer is not a failure: it is asked again after its `Retry-After` with jitter (a crowd
//! does not come back at once). While one is, the NAR's upstreams wait, so a crowd does not all
//! go to the internet at once; [`BUSY_WAIT_CAP`] after the first busy answer they are free again
//! (and with none the fetch ends). Bounds: the NAR's sources, and at most [`MAX_HINTED`] named
//! hosts per fetch, each asked once.

use std::collections::HashSet;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use super::copy::ByteWindow;
use super::lookup::Lookup;
use super::source::{Candidate, SourceId};
use crate::beacon::wire::NodeId;
use crate::narinfo::{NarHash, NarInfo, StorePathHash};

/// How long a fetch keeps coming back to busy peers (from their first busy answer) before it
/// takes an upstream or, with none, fails: well below the 300 s Nix waits for a silent download
/// (`stalled-download-timeout`), above the time a holder's 32 slots take to turn over for a
/// crowd of 100.
pub const BUSY_WAIT_CAP: Duration = Duration::from_secs(180);
/// Hosts a fetch asks because busy sources named them (each once per fetch).
pub const MAX_HINTED: usize = 64;

/// A copy from a peer that sends less than this a second (judged over [`SLOW_WINDOW`]) is slow:
/// the fetch asks the NAR's peers again and, if one got the whole NAR since, goes on from it with
/// `Range` (issue #24: a crowd's fetch stayed on a queued holder or a slow relay while other hosts
/// finished). A twelfth of a 200 Mbit/s link, well below what a LAN peer sends; upstreams are
/// not judged so (the internet may be slow, and there is no second upstream copy to move to).
pub const SLOW_RATE_FLOOR: u64 = 2 * 1024 * 1024;
/// How long a copy runs before its rate is judged, and the window each judgement covers: longer
/// than the read floor's window (`copy::RATE_WINDOW`), so a source that all but stopped fails
/// that floor first and is judged for it; this watch is for sources slow, not failing.
pub const SLOW_WINDOW: Duration = Duration::from_secs(super::copy::RATE_WINDOW.as_secs() + 1);
/// Lookups one fetch makes for a faster peer (each asks the NAR's peers once, like a gather).
pub const MAX_SLOW_SWITCHES: usize = 2;

/// Watches one copy's rate (see [`SLOW_RATE_FLOOR`]) and looks for a faster peer.
pub struct SlowWatch<'a> {
    /// Asks the peers (none: not watched, e.g. an upstream, or the fetch's lookups used up).
    lookup: Option<Lookup<'a>>,
    hash: StorePathHash,
    nar_hash: NarHash,
    /// Sources not to move to: tried by the fetch already, and the upstreams.
    skip: HashSet<SourceId>,
    rate: Rate,
}

/// A copy's rate over windows of [`SLOW_WINDOW`].
struct Rate(ByteWindow);

impl Rate {
    fn new() -> Self {
        Self(ByteWindow::new(Instant::now()))
    }

    /// `n` more bytes arrived: true when the window that just ended ran below the floor.
    fn slow(&mut self, n: u64) -> bool {
        self.0
            .add(n, Instant::now(), SLOW_WINDOW)
            .is_some_and(|(bytes, took)| (bytes as f64) < SLOW_RATE_FLOOR as f64 * took.as_secs_f64())
    }
}

impl<'a> SlowWatch<'a> {
    pub fn new(lookup: Option<Lookup<'a>>, info: &NarInfo, skip: HashSet<SourceId>) -> Self {
        Self {
            lookup,
            hash: info.store_path.hash(),
            nar_hash: info.nar_hash,
            skip,
            rate: Rate::new(),
        }
    }

    /// `n` more bytes arrived: when the copy runs slow, the peers that have the whole NAR now
    /// (not in-flight copies), if any. Each lookup uses one of the fetch's switches.
    pub async fn faster(&mut self, n: u64) -> Option<Vec<Candidate>> {
        if !(self.rate.slow(n) && self.lookup.is_some()) {
            return None;
        }
        let lookup = self.lookup.take()?;
        let found = lookup.gather(&self.hash, &self.nar_hash, &self.skip).await.found;
        let found: Vec<Candidate> = found.into_iter().filter(|c| !c.partial).collect();
        tracing::info!(hash = %self.hash, found = found.len(), "NAR source slow; asked the peers for a faster one");
        self.rate = Rate::new();
        (!found.is_empty()).then_some(found)
    }

    /// Whether it looked for a faster peer (used one of the fetch's lookups).
    pub fn looked(&self) -> bool {
        self.lookup.is_none()
    }
}

/// The busy state of one fetch.
#[derive(Default)]
pub struct BusySources {
    /// Peers that answered busy since the last wait: asked again after it.
    busy: Vec<Candidate>,
    /// Upstreams held back while a peer holds the NAR but is busy.
    deferred: Vec<Candidate>,
    /// The first busy answer of this fetch (the cap counts from it).
    since: Option<Instant>,
    /// The longest `Retry-After` among the busy answers since the last wait.
    retry_after: Duration,
    /// Hosts busy answers named, not asked yet.
    hints: Vec<NodeId>,
    /// Every host ever named (each asked once per fetch).
    hinted: HashSet<NodeId>,
}

impl BusySources {
    /// `c` answered busy, to come back after `retry_after`, naming `hints`.
    pub fn note(&mut self, c: Candidate, retry_after: Duration, hints: Vec<NodeId>) {
        self.since.get_or_insert_with(Instant::now);
        self.retry_after = self.retry_after.max(retry_after);
        for n in hints {
            if self.hinted.len() < MAX_HINTED && self.hinted.insert(n) {
                self.hints.push(n);
            }
        }
        self.busy.push(c);
    }

    /// Busy peers worth waiting for (within the cap).
    pub fn waiting(&self) -> bool {
        !self.busy.is_empty() && self.since.is_none_or(|t| t.elapsed() < BUSY_WAIT_CAP)
    }

    /// Holds `c` back if it is an upstream while a peer is busy; gives it back otherwise.
    pub fn defer(&mut self, c: Candidate) -> Option<Candidate> {
        if matches!(c.source, SourceId::Upstream(_)) && self.waiting() {
            self.deferred.push(c);
            return None;
        }
        Some(c)
    }

    /// The upstreams held back, once no busy peer is worth waiting for (none: none held).
    pub fn release_upstreams(&mut self) -> Option<Vec<Candidate>> {
        if self.deferred.is_empty() {
            return None;
        }
        self.busy.clear();
        self.since = None;
        Some(std::mem::take(&mut self.deferred))
    }

    /// The named hosts not asked yet.
    pub fn take_hints(&mut self) -> Vec<NodeId> {
        std::mem::take(&mut self.hints)
    }

    /// How long to wait before asking again: the longest `Retry-After` since the last wait,
    /// times 0.5 to 1.5, never past the cap.
    pub fn wait(&mut self) -> Duration {
        let left = self
            .since
            .map_or(BUSY_WAIT_CAP, |t| BUSY_WAIT_CAP.saturating_sub(t.elapsed()));
        let jitter = rand::thread_rng().gen_range(0.5..1.5);
        std::mem::take(&mut self.retry_after).mul_f64(jitter).min(left)
    }

    /// The busy peers, to be asked again.
    pub fn take_busy(&mut self) -> Vec<Candidate> {
        std::mem::take(&mut self.busy)
    }

    pub fn busy_len(&self) -> usize {
        self.busy.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::narinfo::{Compression, NarHash, NarInfo, StorePath};
    use std::sync::Arc;

    fn candidate(source: SourceId) -> Candidate {
        let info = NarInfo {
            store_path: StorePath::parse("/nix/store", "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-x").expect("path"),
            url: "nar/x.nar".into(),
            compression: Compression::None,
            file_hash: None,
            file_size: None,
            nar_hash: NarHash::from_digest([1; 32]),
            nar_size: 1,
            references: vec![],
            deriver: None,
            sigs: vec![],
            ca: None,
        };
        Candidate {
            source,
            info: Arc::new(info),
            nar_url: url::Url::parse("http://x/nar/x.nar").expect("url"),
            zstd: false,
            load: None,
            partial: false,
        }
    }

    /// A copy is slow once a window passed below the floor, judged again over the next window.
    #[tokio::test(start_paused = true)]
    async fn a_copy_is_slow_after_a_window_below_the_floor() {
        let at_floor = SLOW_RATE_FLOOR * SLOW_WINDOW.as_secs();
        let mut r = Rate::new();
        assert!(!r.slow(1), "not judged before a window passed");
        tokio::time::advance(SLOW_WINDOW).await;
        assert!(r.slow(at_floor / 2), "half the floor over the window");
        tokio::time::advance(SLOW_WINDOW).await;
        assert!(!r.slow(at_floor * 2), "above the floor");
    }

    /// Upstreams wait while a peer is busy, until the cap; waits are jittered around the
    /// `Retry-After` and never pass the cap; a named host is asked once.
    #[tokio::test(start_paused = true)]
    async fn upstreams_wait_for_a_busy_peer_until_the_cap() {
        let mut b = BusySources::default();
        let up = candidate(SourceId::Upstream(0));
        assert!(b.defer(up.clone()).is_some(), "no busy peer: the upstream goes");
        let n = NodeId([3; 16]);
        b.note(
            candidate(SourceId::Peer(NodeId([1; 16]))),
            Duration::from_secs(2),
            vec![n, n],
        );
        assert_eq!(b.take_hints(), vec![n]);
        b.note(
            candidate(SourceId::Peer(NodeId([2; 16]))),
            Duration::from_secs(1),
            vec![n],
        );
        assert!(b.take_hints().is_empty(), "each named host once");
        assert!(b.defer(up.clone()).is_none(), "held back");
        let w = b.wait();
        assert!(w >= Duration::from_secs(1) && w <= Duration::from_secs(3), "{w:?}");
        assert_eq!(b.take_busy().len(), 2);
        b.note(
            candidate(SourceId::Peer(NodeId([1; 16]))),
            Duration::from_secs(5),
            vec![],
        );
        tokio::time::advance(BUSY_WAIT_CAP - Duration::from_secs(1)).await;
        assert!(b.wait() <= Duration::from_secs(1), "never past the cap");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!b.waiting(), "the cap passed");
        assert!(b.defer(candidate(SourceId::Upstream(1))).is_some());
        assert_eq!(b.release_upstreams().map(|v| v.len()), Some(1));
        assert!(b.release_upstreams().is_none());
    }
}
