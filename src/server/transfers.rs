//! Admission of NAR (and binary) transfers: a global cap, a share per client address, and one
//! fair queue with a deadline.
//!
//! Invariant: at most `max` bodies (default [`MAX_TRANSFERS`]) are streamed at once, at most
//! [`MAX_TRANSFERS_PER_ADDR`] of them to one client address (IPv6: one /64), and at most
//! [`MAX_WAITING_PER_ADDR`] more of that address wait. A freed slot goes to the waiting request
//! whose address streams the fewest bodies (ties: the address with the fewest waiting, then the
//! earliest), so an honest newcomer gets the next free slot however many requests attacking
//! addresses keep queued (unless they spread over more addresses than there are slots, each
//! with a single request: then it waits its turn among them). A request that
//! cannot start within [`QUEUE_WAIT`] is answered like a miss (404), before any header is sent;
//! a proxy's request (it sends `cache_url::BUSY_OK_HEADER`) waits [`BUSY_WAIT`] at most and is
//! then answered busy (503, `Retry-After:` [`BUSY_RETRY_AFTER`]), so it can try another source
//! or come back, instead of timing out into a miss while the path is here.
//! Together with [`crate::http::Pace`] (a transfer lives only while its client keeps up), this
//! bounds the blocking threads, daemon connections, encoders and buffers clients can make the
//! server hold.
//!
//! Memory per transfer, worst case (a `.nar.zst` from disk): the dump's buffer and channel
//! (3 × 128 KiB), the raw and client channels (2 × 4 × 128 KiB), hyper's write buffer (one
//! chunk), the zstd level-1 encoder (about 1.3 MiB): under 3 MiB, so under 96 MiB for
//! [`MAX_TRANSFERS`]. The table itself: one entry per waiting request and per address present.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::http::addr_key;

/// Bodies streamed at once (NARs, compressed or not, and the installer's binary).
pub const MAX_TRANSFERS: usize = 32;
/// Bodies streamed at once to one client address: a peer's proxy or a Nix client fetching in
/// parallel gets a fair share, and a few addresses cannot take every slot.
pub const MAX_TRANSFERS_PER_ADDR: usize = 8;
/// Requests of one address that may wait for a slot (beyond those it streams); more are 404 at
/// once.
pub const MAX_WAITING_PER_ADDR: usize = 8;
/// Longest wait for a slot; then 404, like a miss (a Nix client moves on to its next substituter).
pub const QUEUE_WAIT: Duration = Duration::from_secs(20);

/// Longest wait for a slot of a request that takes a busy answer (a proxy's): well within the
/// proxy's wait for response headers (`proxy::source::PEER_TIMEOUTS`, 3 s).
pub const BUSY_WAIT: Duration = Duration::from_secs(1);
/// The `Retry-After` of a busy answer: when a slot may be free (the proxy adds jitter).
pub const BUSY_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Copies of one NAR streamed at once to proxies (requests that take a busy answer), counted in
/// bytes: a whole NAR is one copy, a segment of a split fetch the share of it its range is. Past
/// it a proxy is answered busy at once, with the hosts that stream that NAR from here to its end
/// as hints, so a crowd fetching one path forms a tree (each host feeding two others, from the
/// bytes it has so far) instead of a star around the holder, and the segments of a later wave
/// spread over the holders instead of piling onto the ones picked most (issue #24). Nix clients
/// are not counted.
pub const MAX_TRANSFERS_PER_NAR: usize = 2;
/// NARs up to this size are not shared so: a proxy spools them in memory and cannot relay them
/// (`proxy::MEM_SPOOL_ONE`), and they are over in moments.
pub const SHARED_NAR_MIN_BYTES: u64 = crate::proxy::MEM_SPOOL_ONE;

/// The transfer slots of one server.
pub struct Transfers {
    state: Mutex<State>,
    max_per_addr: usize,
    max_waiting_per_addr: usize,
    wait: Duration,
}

#[derive(Default)]
struct State {
    free: usize,
    /// All slots (free ones included).
    max: usize,
    /// Slots granted so far: tells whether any transfer ran since the last look.
    granted: u64,
    /// Per client key present: (streaming, waiting). Removed when both are zero.
    keys: HashMap<IpAddr, (usize, usize)>,
    /// Waiting requests in arrival order.
    queue: VecDeque<Waiter>,
    /// Per NAR streamed to proxies: its streams (one entry per held [`Permit`] that names the
    /// NAR, so at most `max` in all).
    per_nar: HashMap<crate::narinfo::NarHash, Vec<NarStream>>,
    next_id: u64,
}

/// One stream of a NAR to a proxy, as the NAR's share counts it.
struct NarStream {
    /// Tells the permit's entry from the others.
    id: u64,
    ip: IpAddr,
    /// Bytes of the NAR it sends.
    sends: u64,
    /// It sends up to the NAR's end: its taker fetches the whole NAR, and can relay it.
    to_end: bool,
}

/// What a proxy's request for a NAR would stream, for the NAR's share (issue #24).
#[derive(Clone, Copy, Debug)]
pub struct NarShare {
    pub nar: crate::narinfo::NarHash,
    /// The NAR's size.
    pub size: u64,
    /// The first and last byte sent.
    pub start: u64,
    pub end: u64,
}

impl NarShare {
    /// The bytes it sends, and whether up to the NAR's end.
    fn counts(&self) -> (u64, bool) {
        ((self.end + 1).saturating_sub(self.start), self.end + 1 >= self.size)
    }
}

struct Waiter {
    id: u64,
    key: IpAddr,
    grant: oneshot::Sender<()>,
}

impl State {
    fn forget_if_idle(&mut self, key: IpAddr) {
        if self.keys.get(&key) == Some(&(0, 0)) {
            self.keys.remove(&key);
        }
    }

    /// Hands free slots to waiters: the address streaming the fewest first, among those the one
    /// with the fewest requests waiting, then the earliest.
    fn dispatch(&mut self, max_per_addr: usize) {
        while self.free > 0 {
            let best = self
                .queue
                .iter()
                .enumerate()
                .filter_map(|(i, w)| {
                    let (streaming, waiting) = self.keys.get(&w.key).copied().unwrap_or((0, 0));
                    (streaming < max_per_addr).then_some((streaming, waiting, i))
                })
                .min();
            let Some((_, _, i)) = best else { return };
            let Some(w) = self.queue.remove(i) else { return };
            let k = self.keys.entry(w.key).or_insert((0, 0));
            k.1 -= 1;
            if w.grant.send(()).is_ok() {
                k.0 += 1;
                self.free -= 1;
                self.granted += 1;
            } else {
                self.forget_if_idle(w.key);
            }
        }
    }
}

/// A held transfer slot, released on drop.
pub struct Permit {
    transfers: Arc<Transfers>,
    key: IpAddr,
    /// The NAR and the stream's id in its share ([`Transfers::acquire_for_nar`]).
    nar: Option<(crate::narinfo::NarHash, u64)>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut st = self.transfers.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((nar, id)) = self.nar {
            if let Some(v) = st.per_nar.get_mut(&nar) {
                if let Some(i) = v.iter().position(|a| a.id == id) {
                    v.swap_remove(i);
                }
                if v.is_empty() {
                    st.per_nar.remove(&nar);
                }
            }
        }
        if let Some(k) = st.keys.get_mut(&self.key) {
            k.0 -= 1;
        }
        st.free += 1;
        st.forget_if_idle(self.key);
        st.dispatch(self.transfers.max_per_addr);
    }
}

/// Takes a waiter out of the queue if its request gave up (timeout, or the client went away).
struct WaitGuard<'a> {
    transfers: &'a Arc<Transfers>,
    id: u64,
    key: IpAddr,
    rx: oneshot::Receiver<()>,
    /// The grant was taken over by a [`Permit`].
    granted: bool,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        if self.granted {
            return;
        }
        let mut st = self.transfers.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = st.queue.iter().position(|w| w.id == self.id) {
            st.queue.remove(i);
            if let Some(k) = st.keys.get_mut(&self.key) {
                k.1 -= 1;
            }
            st.forget_if_idle(self.key);
        } else if self.rx.try_recv().is_ok() {
            // Granted, but nobody will use it: give the slot back.
            if let Some(k) = st.keys.get_mut(&self.key) {
                k.0 -= 1;
            }
            st.free += 1;
            st.forget_if_idle(self.key);
            st.dispatch(self.transfers.max_per_addr);
        }
    }
}

/// Why no slot was given.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("too many transfers from this address waiting")]
    AddrQueueFull,
    #[error("no transfer slot within {0:?}")]
    Timeout(Duration),
    /// [`MAX_TRANSFERS_PER_NAR`] copies of this NAR are streamed already: to these addresses up
    /// to its end (the hosts that can relay it; segments' takers are not named).
    #[error("this NAR's share is taken ({} proxies fetch it whole)", .0.len())]
    NarShared(Vec<IpAddr>),
}

impl Default for Transfers {
    fn default() -> Self {
        Self::new(MAX_TRANSFERS, MAX_TRANSFERS_PER_ADDR, MAX_WAITING_PER_ADDR, QUEUE_WAIT)
    }
}

impl Transfers {
    pub fn new(max: usize, max_per_addr: usize, max_waiting_per_addr: usize, wait: Duration) -> Self {
        Self {
            state: Mutex::new(State {
                free: max.max(1),
                max: max.max(1),
                ..State::default()
            }),
            max_per_addr: max_per_addr.max(1),
            max_waiting_per_addr,
            wait,
        }
    }

    /// Waits (at most the queue wait) for a slot for a client at `ip`.
    pub async fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<Permit, Refused> {
        self.acquire_within(ip, self.wait).await
    }

    /// As [`Self::acquire`], waiting at most `wait` (and never longer than the queue wait): a
    /// request that takes a busy answer waits [`BUSY_WAIT`].
    pub async fn acquire_within(self: &Arc<Self>, ip: IpAddr, wait: Duration) -> Result<Permit, Refused> {
        let wait = wait.min(self.wait);
        let key = addr_key(ip);
        let (id, rx) = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let free = st.free;
            let k = st.keys.entry(key).or_insert((0, 0));
            if k.0 + k.1 >= self.max_per_addr + self.max_waiting_per_addr {
                return Err(Refused::AddrQueueFull);
            }
            // Free slots are always handed to waiters first, so with a free slot nobody who
            // could use it is waiting.
            if free > 0 && k.0 < self.max_per_addr {
                k.0 += 1;
                st.free -= 1;
                st.granted += 1;
                return Ok(Permit {
                    transfers: self.clone(),
                    key,
                    nar: None,
                });
            }
            k.1 += 1;
            st.next_id += 1;
            let id = st.next_id;
            let (tx, rx) = oneshot::channel();
            st.queue.push_back(Waiter { id, key, grant: tx });
            (id, rx)
        };
        let mut guard = WaitGuard {
            transfers: self,
            id,
            key,
            rx,
            granted: false,
        };
        match tokio::time::timeout(wait, &mut guard.rx).await {
            Ok(Ok(())) => {
                // Granted: the slot is ours; the guard must not give it back.
                guard.granted = true;
                Ok(Permit {
                    transfers: self.clone(),
                    key,
                    nar: None,
                })
            }
            _ => Err(Refused::Timeout(wait)),
        }
    }

    /// A slot for a proxy at `ip` streaming `share` of a NAR, waiting at most [`BUSY_WAIT`];
    /// refused at once while the NAR's streams, with this one, would send more than `max` copies
    /// of it (one stream is always let through; [`Refused::NarShared`] names the takers
    /// of whole copies).
    pub async fn acquire_for_nar(self: &Arc<Self>, ip: IpAddr, share: NarShare, max: usize) -> Result<Permit, Refused> {
        let nar = share.nar;
        let cap = share.size.saturating_mul(max.max(1) as u64);
        let shared = |st: &State| {
            let v = st.per_nar.get(&nar)?;
            let sent: u64 = v.iter().map(|s| s.sends).sum();
            (sent.saturating_add(share.counts().0) > cap)
                .then(|| v.iter().filter(|s| s.to_end).map(|s| s.ip).collect::<Vec<_>>())
        };
        if let Some(v) = shared(&self.state.lock().unwrap_or_else(|p| p.into_inner())) {
            return Err(Refused::NarShared(v));
        }
        let mut p = self.acquire_within(ip, BUSY_WAIT).await?;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // Another proxy may have taken the NAR's last share while this one waited.
        if let Some(v) = shared(&st) {
            drop(st);
            return Err(Refused::NarShared(v));
        }
        st.next_id += 1;
        let id = st.next_id;
        let (sends, to_end) = share.counts();
        st.per_nar
            .entry(nar)
            .or_default()
            .push(NarStream { id, ip, sends, to_end });
        p.nar = Some((nar, id));
        Ok(p)
    }

    /// True if no transfer runs or waits now but some ran since the last call that said so
    /// (`seen` keeps the count of grants between calls).
    pub fn went_idle(&self, seen: &mut u64) -> bool {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.free == st.max && st.queue.is_empty() && st.granted != *seen {
            *seen = st.granted;
            return true;
        }
        false
    }

    /// Transfers streaming and waiting now (the store server's load header).
    pub fn load(&self) -> crate::cache_url::Load {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let n = |x: usize| u32::try_from(x).unwrap_or(u32::MAX);
        crate::cache_url::Load {
            streaming: n(st.max - st.free),
            waiting: n(st.queue.len()),
        }
    }

    /// Slots free now.
    pub fn available(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).free
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[tokio::test(start_paused = true)]
    async fn caps_per_address_and_in_all() {
        let t = Arc::new(Transfers::new(3, 2, 1, Duration::from_secs(5)));
        let a1 = t.acquire(ip("10.0.0.1")).await.expect("a1");
        let _a2 = t.acquire(ip("10.0.0.1")).await.expect("a2");
        // The address's share is used up: a third waits (its one waiting place), a fourth is refused.
        let t3 = t.clone();
        let a3 = tokio::spawn(async move { t3.acquire(ip("10.0.0.1")).await });
        tokio::task::yield_now().await;
        assert_eq!(t.acquire(ip("10.0.0.1")).await.err(), Some(Refused::AddrQueueFull));
        // Another address still gets the last slot at once, though a3 waits.
        let _b1 = t.acquire(ip("10.0.0.2")).await.expect("b1");
        assert_eq!(t.available(), 0);
        // a1's slot goes to a3.
        drop(a1);
        assert!(a3.await.expect("join").is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_freed_slot_goes_to_the_address_streaming_least() {
        let t = Arc::new(Transfers::new(4, 4, 8, Duration::from_secs(60)));
        // An attacker at one address holds every slot and queues more.
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(t.acquire(ip("10.0.0.66")).await.expect("attacker"));
        }
        let mut queued = Vec::new();
        for _ in 0..4 {
            let t = t.clone();
            queued.push(tokio::spawn(async move { t.acquire(ip("10.0.0.66")).await }));
            tokio::task::yield_now().await;
        }
        // The honest client comes last but gets the first slot freed.
        let th = t.clone();
        let honest = tokio::spawn(async move { th.acquire(ip("10.0.0.7")).await });
        tokio::task::yield_now().await;
        held.pop();
        let p = honest.await.expect("join").expect("honest got the freed slot");
        assert!(
            queued.iter().all(|q| !q.is_finished()),
            "no attacker request overtook it"
        );
        drop(p);
        drop(held);
        for q in queued {
            assert!(q.await.expect("join").is_ok());
        }
        assert!(
            t.state.lock().expect("lock").keys.is_empty(),
            "entries of gone clients are dropped"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn among_addresses_streaming_nothing_the_one_asking_least_goes_first() {
        let t = Arc::new(Transfers::new(1, 4, 8, Duration::from_secs(60)));
        let held = t.acquire(ip("10.0.0.1")).await.expect("held");
        // Three requests from an address that streams nothing yet, queued before the honest one.
        let mut queued = Vec::new();
        for _ in 0..3 {
            let t = t.clone();
            queued.push(tokio::spawn(async move { t.acquire(ip("10.0.0.66")).await }));
            tokio::task::yield_now().await;
        }
        let th = t.clone();
        let honest = tokio::spawn(async move { th.acquire(ip("10.0.0.7")).await });
        tokio::task::yield_now().await;
        drop(held);
        let p = honest.await.expect("join").expect("honest first");
        assert!(queued.iter().all(|q| !q.is_finished()));
        drop(p);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_server_refuses_after_the_queue_wait_and_a_given_up_wait_leaves_no_trace() {
        let t = Arc::new(Transfers::new(1, 1, 4, Duration::from_secs(5)));
        let held = t.acquire(ip("10.0.0.1")).await.expect("held");
        let t0 = tokio::time::Instant::now();
        assert_eq!(
            t.acquire(ip("10.0.0.2")).await.err(),
            Some(Refused::Timeout(Duration::from_secs(5)))
        );
        assert_eq!(t0.elapsed(), Duration::from_secs(5));
        // A waiter whose client went away (future dropped) leaves the queue.
        let t2 = t.clone();
        let gone = tokio::spawn(async move { t2.acquire(ip("10.0.0.3")).await });
        tokio::task::yield_now().await;
        gone.abort();
        let _ = gone.await;
        drop(held);
        assert_eq!(t.available(), 1, "the slot is free again, not given to the gone waiter");
        let st = t.state.lock().expect("lock");
        assert!(st.keys.is_empty() && st.queue.is_empty());
    }

    /// Issue #24: a proxy's request waits [`BUSY_WAIT`], not the queue wait, and the load tells
    /// who streams and who waits.
    #[tokio::test(start_paused = true)]
    async fn a_busy_taking_request_gives_up_after_the_busy_wait_and_load_counts() {
        let t = Arc::new(Transfers::new(1, 4, 4, Duration::from_secs(20)));
        let held = t.acquire(ip("10.0.0.1")).await.expect("held");
        let t2 = t.clone();
        let waiting = tokio::spawn(async move { t2.acquire(ip("10.0.0.2")).await });
        tokio::task::yield_now().await;
        assert_eq!(
            t.load(),
            crate::cache_url::Load {
                streaming: 1,
                waiting: 1
            }
        );
        let t0 = tokio::time::Instant::now();
        assert_eq!(
            t.acquire_within(ip("10.0.0.3"), BUSY_WAIT).await.err(),
            Some(Refused::Timeout(BUSY_WAIT))
        );
        assert_eq!(t0.elapsed(), BUSY_WAIT);
        drop(held);
        let p = waiting.await.expect("join").expect("the queued one streams");
        assert_eq!(t.load().streaming, 1);
        drop(p);
        assert_eq!(t.load(), crate::cache_url::Load::default());
    }

    /// Issue #24: at most `max_per_nar` proxies stream one NAR; the next is refused at once with
    /// their addresses, another NAR still gets a slot, and a finished transfer frees its share.
    #[tokio::test(start_paused = true)]
    async fn a_nar_is_streamed_to_at_most_its_share_of_proxies() {
        let t = Arc::new(Transfers::new(8, 8, 8, Duration::from_secs(20)));
        let (x, y) = (whole(1, 1000), whole(2, 1000));
        let a = t.acquire_for_nar(ip("10.0.0.1"), x, 2).await.expect("a");
        let _b = t.acquire_for_nar(ip("10.0.0.2"), x, 2).await.expect("b");
        let t0 = tokio::time::Instant::now();
        match t.acquire_for_nar(ip("10.0.0.3"), x, 2).await {
            Err(Refused::NarShared(mut v)) => {
                v.sort();
                assert_eq!(v, vec![ip("10.0.0.1"), ip("10.0.0.2")]);
            }
            other => panic!("{:?}", other.err()),
        }
        assert_eq!(t0.elapsed(), Duration::ZERO, "refused at once");
        assert!(t.acquire_for_nar(ip("10.0.0.3"), y, 2).await.is_ok(), "another NAR");
        drop(a);
        let _c = t
            .acquire_for_nar(ip("10.0.0.3"), x, 2)
            .await
            .expect("a's share is free");
        assert_eq!(t.state.lock().expect("lock").per_nar[&x.nar].len(), 2);
    }

    /// The whole NAR of digest byte `d`, `size` bytes.
    fn whole(d: u8, size: u64) -> NarShare {
        NarShare {
            nar: crate::narinfo::NarHash::from_digest([d; 32]),
            size,
            start: 0,
            end: size - 1,
        }
    }

    /// Issue #24, later waves: segments of split fetches count towards a NAR's share by their
    /// length (before, not at all: a host picked by many splits sent 3 copies in a wave where 25
    /// hosts had the NAR); a segment's taker is never named to try (it cannot relay the NAR); a
    /// resume counts what is left.
    #[tokio::test(start_paused = true)]
    async fn segments_count_towards_a_nars_share_by_their_length() {
        let t = Arc::new(Transfers::new(32, 32, 8, Duration::from_secs(20)));
        let n = whole(1, 1000);
        let part = |start: u64, end: u64| NarShare { start, end, ..n };
        let at = |k: u64| ip(&format!("10.0.0.{k}"));
        let mut held = Vec::new();
        for k in 0..8 {
            // Quarters short of the end (a last one is taken for a resume: named, harmlessly).
            let p = t.acquire_for_nar(at(k), part(k % 3 * 250, k % 3 * 250 + 249), 2);
            held.push(p.await.expect("8 quarters"));
        }
        let refused = |r: Result<Permit, Refused>| match r {
            Err(Refused::NarShared(v)) => v,
            other => panic!("{:?}", other.err()),
        };
        let r = t.acquire_for_nar(at(9), part(0, 249), 2).await;
        assert!(refused(r).is_empty(), "a 9th quarter");
        held.truncate(4);
        let _w = t.acquire_for_nar(at(20), n, 2).await.expect("a whole copy fits");
        let v = refused(t.acquire_for_nar(at(21), part(500, 749), 2).await);
        assert_eq!(v, vec![at(20)], "only the whole copy's taker is named");
        held.clear();
        let r = t.acquire_for_nar(at(21), part(900, 999), 2).await;
        assert!(r.is_ok(), "a resume fits");
    }

    #[tokio::test(start_paused = true)]
    async fn went_idle_once_per_burst() {
        let t = Arc::new(Transfers::new(2, 2, 0, Duration::from_secs(1)));
        let mut seen = 0;
        assert!(!t.went_idle(&mut seen), "nothing ran yet");
        let p = t.acquire(ip("10.0.0.1")).await.expect("p");
        assert!(!t.went_idle(&mut seen), "still running");
        drop(p);
        assert!(t.went_idle(&mut seen));
        assert!(!t.went_idle(&mut seen), "once per burst");
    }

    #[tokio::test(start_paused = true)]
    async fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let t = Arc::new(Transfers::new(8, 1, 0, Duration::from_secs(1)));
        let _x = t.acquire(ip("fd00:1:2:3::1")).await.expect("first of the /64");
        assert!(
            t.acquire(ip("fd00:1:2:3:ffff::9")).await.is_err(),
            "same /64, same share"
        );
        assert!(t.acquire(ip("fd00:1:2:4::1")).await.is_ok(), "another /64");
        let _v4 = t.acquire(ip("192.0.2.7")).await.expect("v4");
        assert!(
            t.acquire(ip("::ffff:192.0.2.7")).await.is_err(),
            "mapped v4 is the same client"
        );
    }
}
