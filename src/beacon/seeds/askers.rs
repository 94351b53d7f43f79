//! Hosts that asked this store server for its peer list: a seed that hears no multicast (the
//! venue cache on filtered Wi-Fi, or the host every laptop was told about) learns the hall from
//! the hosts that seed *it*, so hosts that all seed the same one still learn each other.
//!
//! A seed's `GET /peers?port=P` names the asker's store-server port; the asker's address is the
//! TCP connection's own (it cannot name another host). [`Askers::offer`] queues that address;
//! [`run`] asks its store server (`GET /nix-cache-info`) and enters the node id it names, as
//! answered, the way a seed's listed entries are entered (table admission, per-address cap,
//! never displacing answered peers). A client-only host (no port open) is simply not entered.
//!
//! Bounds: at most [`MAX_ASKERS_QUEUED`] addresses wait (more are dropped); an address is
//! queued at most once per [`ASK_AGAIN_AFTER`] (remembered in an LRU of [`MAX_ASKERS_REMEMBERED`]
//! addresses, about 64 bytes each); probes run [`super::PROBES_AT_ONCE`] at a time, each within
//! [`super::PROBE_TIMEOUT`]. An attacker can make this host ask its own address (at any port)
//! at most [`MAX_ASKERS_QUEUED`] times per [`ASK_AGAIN_AFTER`], and add only ids whose store
//! server answers at that address, at most `MAX_PEERS_PER_ADDR` per address.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use lru::LruCache;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    get_named, http_client, note, place, SeedFailure, PROBES_AT_ONCE, PROBE_TIMEOUT, SEED_ENTRY_INTERVAL, SEED_FLAGS,
};
use crate::beacon::table::PeerTable;
use crate::beacon::wire::NodeId;

/// Askers waiting to be asked back.
pub const MAX_ASKERS_QUEUED: usize = 64;
/// Addresses remembered as recently queued.
pub const MAX_ASKERS_REMEMBERED: usize = 1024;
/// An address is queued again only this long after it was last queued (an asker refreshes every
/// `SEED_REFRESH`, 10 s; its entry lives three `SEED_ENTRY_INTERVAL`s after its last answer).
pub const ASK_AGAIN_AFTER: Duration = Duration::from_secs(30);
/// ... or this long, when its store server named no summary version yet (a host asks its seeds
/// as it starts, before its first summary is published; its entry needs the version for the
/// proxy to fetch its summary).
pub const ASK_UNPUBLISHED_AGAIN: Duration = Duration::from_secs(2);

/// The queue the store server fills and the beacon's askers task drains.
#[derive(Clone)]
pub struct Askers {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    ready: Notify,
}

struct State {
    queue: VecDeque<SocketAddr>,
    recent: LruCache<SocketAddr, Instant>,
}

impl Default for Askers {
    fn default() -> Self {
        let cap = NonZeroUsize::new(MAX_ASKERS_REMEMBERED).unwrap_or(NonZeroUsize::MIN);
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    queue: VecDeque::new(),
                    recent: LruCache::new(cap),
                }),
                ready: Notify::new(),
            }),
        }
    }
}

impl std::fmt::Debug for Askers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Askers")
    }
}

impl Askers {
    /// A host at `asker` (its connection's address, with the store-server port it named) asked
    /// for our peer list: ask it back, unless it was queued recently or the queue is full.
    /// Returns whether it was queued.
    pub fn offer(&self, asker: SocketAddr) -> bool {
        let asker = SocketAddr::new(asker.ip().to_canonical(), asker.port());
        // Its own connection's address: only where an entry could be placed at all.
        let Some(asker) = place(asker, asker) else { return false };
        let now = Instant::now();
        let mut s = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.recent
            .get(&asker)
            .is_some_and(|t| now.duration_since(*t) < ASK_AGAIN_AFTER)
        {
            return false;
        }
        if s.queue.len() >= MAX_ASKERS_QUEUED {
            return false;
        }
        s.recent.put(asker, now);
        s.queue.push_back(asker);
        drop(s);
        self.inner.ready.notify_one();
        true
    }

    /// `asker` named no summary version: it may be queued again [`ASK_UNPUBLISHED_AGAIN`] after
    /// it was asked, not [`ASK_AGAIN_AFTER`].
    fn again_soon(&self, asker: SocketAddr) {
        let mut s = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = s.recent.get_mut(&asker) {
            *t = Instant::now()
                .checked_sub(ASK_AGAIN_AFTER.saturating_sub(ASK_UNPUBLISHED_AGAIN))
                .unwrap_or(*t);
        }
    }

    fn take(&self) -> Vec<SocketAddr> {
        let mut s = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        s.queue.drain(..).collect()
    }

    /// Addresses waiting (for tests).
    pub fn waiting(&self) -> usize {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner()).queue.len()
    }
}

/// The node id and summary version the store server at `at` names, if it answers in time.
async fn ask(client: &reqwest::Client, at: SocketAddr) -> Option<(NodeId, SocketAddr, Option<u64>)> {
    match tokio::time::timeout(PROBE_TIMEOUT, get_named(client, at, "/nix-cache-info", 4096)).await {
        Ok(Ok(n)) => Some((n.node, at, n.summary)),
        Ok(Err(SeedFailure::Unreachable(_))) | Ok(Err(_)) | Err(_) => None,
    }
}

/// Asks back every queued asker and enters the ids their store servers name, until `stop`.
pub async fn run(askers: Askers, table: Arc<PeerTable>, stop: CancellationToken) {
    let client = match http_client(PROBE_TIMEOUT) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "askers: no HTTP client; hosts that seed this one are not asked back");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = askers.inner.ready.notified() => {}
        }
        let batch = askers.take();
        let named: Vec<Option<(NodeId, SocketAddr, Option<u64>)>> = tokio::select! {
            _ = stop.cancelled() => return,
            named = stream::iter(batch).map(|a| ask(&client, a)).buffer_unordered(PROBES_AT_ONCE).collect() => named,
        };
        let now = Instant::now();
        for (node, at, summary) in named.into_iter().flatten() {
            if node == table.own() {
                continue;
            }
            note(&table, node, at, SEED_FLAGS, SEED_ENTRY_INTERVAL, summary, now);
            if summary.is_none() {
                askers.again_soon(at);
            }
            tracing::debug!(%node, addr = %at, "a host that seeds us answered: entered");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    #[tokio::test(start_paused = true)]
    async fn an_asker_is_queued_once_per_interval_and_the_queue_is_capped() {
        let a = Askers::default();
        assert!(a.offer(addr("10.0.0.2:8380")));
        assert!(!a.offer(addr("10.0.0.2:8380")), "queued again at once");
        assert!(!a.offer(addr("127.0.0.1:8380")), "never loopback");
        assert!(!a.offer(addr("10.0.0.3:0")), "a port is needed");
        // An IPv4 client of a dual-stack listener arrives as ::ffff:a.b.c.d: the same host.
        assert!(!a.offer(addr("[::ffff:10.0.0.2]:8380")));
        assert_eq!(a.take(), vec![addr("10.0.0.2:8380")]);
        tokio::time::advance(ASK_AGAIN_AFTER).await;
        assert!(a.offer(addr("10.0.0.2:8380")), "asked again after the interval");
        for port in 1..=MAX_ASKERS_QUEUED as u16 * 2 {
            a.offer(SocketAddr::new(addr("10.0.0.9:1").ip(), port));
        }
        assert_eq!(a.waiting(), MAX_ASKERS_QUEUED, "capped");
    }

    /// An asker whose server named no summary version yet (it asked as it started) is asked
    /// again soon, so its entry gets the version the proxy needs to fetch its summary.
    #[tokio::test(start_paused = true)]
    async fn an_asker_with_no_summary_yet_is_asked_again_soon() {
        let a = Askers::default();
        let at = addr("10.0.0.2:8380");
        assert!(a.offer(at));
        assert_eq!(a.take(), vec![at]);
        a.again_soon(at);
        tokio::time::advance(ASK_UNPUBLISHED_AGAIN / 2).await;
        assert!(!a.offer(at), "not at once");
        tokio::time::advance(ASK_UNPUBLISHED_AGAIN).await;
        assert!(a.offer(at), "queued again after {ASK_UNPUBLISHED_AGAIN:?}");
    }
}
