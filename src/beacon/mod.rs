//! The beacon: our UDP multicast protocol (`proto/beacon.md`) that announces this host and
//! builds the peer table, over IPv4 and IPv6.
//!
//! (Over 500 lines on purpose: `run` is the one loop whose states (announce timer, query
//! answers, expiry, re-scans, wake-ups, peer exchange) interact; the parts that stand alone are
//! modules of their own.)
//!
//! [`wire`] is the pure codec, [`table`] the peer table, [`iface`] the interfaces, [`links`] their
//! reported states, `membership` the sockets, the groups joined per interface and the on-link
//! checks, [`watch`] the kernel's notices of interface changes, [`wake`] the suspend detector,
//! [`pex`] the peer exchange, this module the one loop that receives, announces (within the
//! hall's traffic budget), answers queries (sampled), expires peers and follows the interfaces.
//! Invariants: one task per beacon, plus its proof task ([`prover::verify_loop`]) and at most
//! one peer-exchange task at a time (nothing is spawned per datagram); multicast TTL and hop
//! limit are 1, and only datagrams from the link count; the beacon never triggers a narinfo or
//! NAR fetch (its only requests are the peer exchange's `GET /peers`, at most 3 after our own
//! start or a new link, and `GET /identity` to the claimants of a contested node id, from a
//! claimant's second claim on and at most once per store-server address per 30 s, failures
//! retried after 2 s doubling), it only tells the proxy where it may ask.
//!
//! Roaming: the sockets are bound once; groups are joined and left per interface as interfaces
//! appear, go, come back or change addresses (a netlink notice triggers a re-scan, and a
//! periodic re-scan is the safety net). A new link gets an announce, a query and the start-up
//! burst at once; a departing link gets a goodbye while it still can, and the peers reachable
//! only through it are forgotten. With no usable interface the beacon waits.

pub mod http;
pub mod identity;
pub mod iface;
pub mod links;
mod membership;
pub mod pex;
pub mod prover;
pub mod table;
pub mod wake;
pub use wake::WAKE_GRACE;
pub mod watch;
pub mod wire;

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use iface::{choose_interfaces, has_multicast_route_v4, list_interfaces, Interface};
pub use links::{LinkReport, LinkState, LinkStates};
pub use membership::{bind, Sockets};
use membership::{lost, recv, Received};
pub use table::{Outcome, Peer, PeerTable};
use wire::{Beacon as Datagram, Kind, NodeId};

pub const DEFAULT_PORT: u16 = 8380;
pub const DEFAULT_GROUP_V4: Ipv4Addr = Ipv4Addr::new(239, 255, 83, 80);
pub const DEFAULT_GROUP_V6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x8380);
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// Extra announces right after start (and after a new link or a wake-up), in case the first
/// datagrams are lost.
const START_BURST: [Duration; 2] = [Duration::from_millis(100), Duration::from_millis(300)];
/// Answers to queries are delayed by up to this much, so hosts do not answer in one burst and
/// each can hear the others' answers before its own (duplicate suppression).
const QUERY_REPLY_JITTER_MS: u64 = 400;
/// Hosts that answer one query, on average: each answers with probability
/// `min(1, QUERY_ANSWERS / hosts)`, and keeps quiet once it heard this many other hosts announce
/// after the query (mDNS-style duplicate suppression). A newcomer's start therefore costs its own
/// 8 datagrams (announce and query, then two more announces, on IPv4 and IPv6) plus about
/// `2 x QUERY_ANSWERS` answers, whatever the size of the hall; it learns the rest of the hall from
/// their periodic announces.
pub const QUERY_ANSWERS: usize = 12;
/// Queries from one node this close together are one query (sent over IPv4 and IPv6, or on
/// several links): answered or not once.
const QUERY_SAME: Duration = Duration::from_secs(1);
/// At most one answer to queries per this long.
const QUERY_REPLY_MIN_GAP: Duration = Duration::from_millis(250);
/// Longest sleep between looks for silent peers (the loop also wakes at the earliest expiry).
const EXPIRE_MAX_WAIT: Duration = Duration::from_secs(1);
/// Receive buffer: larger than any valid datagram, so oversized ones are seen (and counted).
const RECV_BUF: usize = 2048;
/// Periodic re-scan of the interfaces: the safety net behind the netlink notices.
pub const RESCAN_INTERVAL: Duration = Duration::from_secs(10);
/// Periodic re-scan when netlink notices are unavailable.
pub const RESCAN_INTERVAL_NO_NETLINK: Duration = Duration::from_secs(2);
/// Wait after a netlink notice before re-scanning, so a burst of notices costs one re-scan.
const RESCAN_DEBOUNCE: Duration = Duration::from_millis(100);
/// Most interfaces joined at once; further ones are left waiting (with a warning in the states).
pub const MAX_LINKS: usize = 16;
/// Bytes per second that the periodic announces of the whole hall may take on a link (IP and UDP
/// headers included), like RTCP's report budget: each host stretches its interval so that
/// (hosts x its bytes per round) / interval stays within it. 6 KB/s leaves 2 KB/s of the 8 KB/s
/// beacon budget for queries, their answers and start-up bursts.
pub const ANNOUNCE_BUDGET_BYTES_PER_SEC: u64 = 6_000;
/// IPv4 (20) and UDP (8) header bytes of a beacon on the link.
pub(crate) const V4_OVERHEAD: usize = 28;
/// IPv6 (40) and UDP (8) header bytes of a beacon on the link.
pub(crate) const V6_OVERHEAD: usize = 48;

/// The announce interval under the traffic budget: `configured`, or longer when `hosts` (the
/// table's peers plus this host) each sending `round_bytes` per interval would exceed
/// [`ANNOUNCE_BUDGET_BYTES_PER_SEC`]. Capped at the wire's maximum interval.
pub fn budgeted_interval(configured: Duration, hosts: usize, round_bytes: usize) -> Duration {
    let need_ms = (hosts as u64)
        .saturating_mul(round_bytes as u64)
        .saturating_mul(1000)
        .div_ceil(ANNOUNCE_BUDGET_BYTES_PER_SEC);
    configured
        .max(Duration::from_millis(need_ms))
        .min(Duration::from_millis(wire::MAX_INTERVAL_MS.into()))
}

/// This machine's host name, for the beacon's informational hostname extension.
pub fn hostname() -> Option<String> {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
}

#[derive(Debug, thiserror::Error)]
pub enum BeaconError {
    #[error("{0} is not a multicast group")]
    NotMulticast(IpAddr),
    #[error("listing interfaces: {0}")]
    Interfaces(#[source] nix::Error),
    #[error("beacon socket ({what}): {source}")]
    Socket {
        what: String,
        #[source]
        source: io::Error,
    },
}

/// What this host announces about itself.
#[derive(Clone, Debug)]
pub struct Announce {
    /// The store server's TCP port.
    pub store_port: u16,
    pub flags: u16,
    pub hostname: Option<String>,
    /// The current version of the store server's content summary, read at every announce.
    pub summary: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// This run's goodbye secret: announces carry its commitment, the goodbye the secret, so a
    /// goodbye cannot be forged.
    pub secret: [u8; wire::SECRET_LEN],
}

#[derive(Clone, Debug)]
pub struct BeaconConfig {
    /// Multicast groups; each must be IPv4 (224.0.0.0/4) or IPv6 (ff00::/8).
    pub groups: Vec<IpAddr>,
    /// Interface names; empty: every up, multicast-capable, non-loopback interface. Named ones
    /// that do not exist yet are waited for.
    pub interfaces: Vec<String>,
    /// UDP port of the beacon.
    pub port: u16,
    /// `None`: listen and query only (the `peers` tool).
    pub announce: Option<Announce>,
    pub interval: Duration,
}

impl Default for BeaconConfig {
    fn default() -> Self {
        Self {
            groups: vec![DEFAULT_GROUP_V4.into(), DEFAULT_GROUP_V6.into()],
            interfaces: Vec::new(),
            port: DEFAULT_PORT,
            announce: None,
            interval: DEFAULT_INTERVAL,
        }
    }
}

/// One received datagram, for `peers --raw`.
#[derive(Clone, Debug)]
pub struct RawDatagram {
    pub src: SocketAddr,
    pub bytes: Vec<u8>,
    pub outcome: Outcome,
}

/// Builds the beacons this host sends.
struct Sender {
    node: NodeId,
    /// This node's key, when its id is the key's hash: announces then carry the id as their
    /// commitment (older receivers see a bound id), goodbyes are signed instead of carrying a
    /// secret.
    identity: Option<Arc<identity::Identity>>,
    announce: Option<Announce>,
    interval: Duration,
    seq: u32,
    /// Length of the last announce, for the traffic budget (the next one is the same size).
    last_len: usize,
}

impl Sender {
    fn datagram(&mut self, kind: Kind) -> Vec<u8> {
        self.seq = self.seq.wrapping_add(1);
        let a = self.announce.as_ref();
        let keyed = self.identity.as_ref();
        let mut bytes = wire::encode(&Datagram {
            kind,
            flags: a.map_or(0, |a| a.flags),
            node: self.node,
            port: a.map_or(0, |a| a.store_port),
            interval_ms: self
                .interval
                .as_millis()
                .clamp(wire::MIN_INTERVAL_MS.into(), wire::MAX_INTERVAL_MS.into()) as u32,
            seq: self.seq,
            hostname: a.and_then(|a| a.hostname.clone()),
            summary: a
                .and_then(|a| a.summary.as_ref())
                .filter(|_| kind == Kind::Announce)
                .map(|v| v.load(std::sync::atomic::Ordering::Relaxed))
                // 0: nothing published yet.
                .filter(|v| *v != 0),
            commitment: a
                .filter(|_| kind == Kind::Announce)
                .map(|a| keyed.map_or_else(|| wire::commitment(&a.secret), |_| self.node.0)),
            proof: a.filter(|_| kind == Kind::Goodbye && keyed.is_none()).map(|a| a.secret),
        });
        if let (Kind::Goodbye, Some(id), Some(_)) = (kind, keyed, a) {
            id.sign_datagram(&mut bytes);
        }
        if kind == Kind::Announce {
            self.last_len = bytes.len();
        }
        bytes
    }

    /// Stretches the interval to the traffic budget for a table of `peers` (called before each
    /// periodic announce, which then carries it).
    fn budget(&mut self, configured: Duration, peers: usize, s: &Sockets) {
        self.interval = budgeted_interval(configured, peers + 1, s.round_bytes(self.last_len));
    }

    /// An announce (when announcing) and a query, on `only` or every link.
    async fn hello(&mut self, s: &Sockets, only: Option<&[String]>) {
        if self.announce.is_some() {
            let a = self.datagram(Kind::Announce);
            s.send(&a, only).await;
        }
        let q = self.datagram(Kind::Query);
        s.send(&q, only).await;
    }
}

async fn watch_changed(w: &Option<watch::Watcher>) {
    match w {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}

fn jittered(interval: Duration) -> Duration {
    let f = rand::thread_rng().gen_range(0.8..1.2);
    interval.mul_f64(f)
}

/// Runs the beacon until `shutdown`: answers queries, announces (if configured), expires peers,
/// follows the interfaces, and says goodbye at the end. `raw`, if given, receives every datagram
/// (for `peers --raw`). `goodbye: false` skips the goodbye (tests of a host that dies).
pub async fn run(
    mut sockets: Sockets,
    cfg: BeaconConfig,
    table: Arc<PeerTable>,
    raw: Option<mpsc::Sender<RawDatagram>>,
    shutdown: CancellationToken,
    goodbye: bool,
) {
    let mut sender = Sender {
        node: table.own(),
        identity: table.identity().cloned(),
        announce: cfg.announce.clone(),
        interval: cfg.interval,
        seq: 0,
        last_len: wire::HEADER_LEN,
    };
    let announcing = cfg.announce.is_some();
    let watcher = match watch::Watcher::new() {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "no netlink notices of interface changes; re-scanning every {:?}", RESCAN_INTERVAL_NO_NETLINK);
            None
        }
    };
    let rescan_every = if watcher.is_some() {
        RESCAN_INTERVAL
    } else {
        RESCAN_INTERVAL_NO_NETLINK
    };
    // Contested node ids: their claimants' store servers are asked for proofs.
    let prover = tokio::spawn(prover::verify_loop(table.clone(), shutdown.child_token()));
    let start = Instant::now();
    sender.hello(&sockets, None).await;
    let burst_from = |t: Instant| -> VecDeque<Instant> {
        if announcing {
            START_BURST.iter().map(|d| t + *d).collect()
        } else {
            VecDeque::new()
        }
    };
    let mut burst = burst_from(start);
    // Peer exchange after the sampled answers to our query came in (one task at a time).
    let mut pex_at = Some(start + pex::PEX_DELAY);
    let mut pex_task: Option<tokio::task::JoinHandle<usize>> = None;
    let mut next_announce = start + jittered(cfg.interval);
    let mut rescan_at = start + rescan_every;
    let mut scan_failing = false;
    let mut wake_watch = wake::WakeWatch::new(wake::clocks());
    let mut reply = Reply {
        at: None,
        // No reply sent yet: the first query is answered after the jitter alone.
        last: start.checked_sub(QUERY_REPLY_MIN_GAP).unwrap_or(start),
        heard: Vec::new(),
        asked: None,
        defend_at: None,
        defended: None,
        own_ips: Vec::new(),
        own_ips_at: None,
    };
    let (mut buf4, mut buf6) = (vec![0u8; RECV_BUF], vec![0u8; RECV_BUF]);
    let (mut cmsg4, mut cmsg6) = (membership::cmsg_buffer(), membership::cmsg_buffer());
    let far = start + Duration::from_secs(86_400 * 365);
    loop {
        let next_burst = burst.front().copied().unwrap_or(far);
        let next_send = if announcing { next_announce.min(next_burst) } else { far };
        let next_look = table
            .next_expiry()
            .unwrap_or(far)
            .min(wake_watch.due().unwrap_or(far))
            .min(Instant::now() + EXPIRE_MAX_WAIT);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = recv(&sockets.v4, &mut buf4, &mut cmsg4) => handle(&table, &raw, &sockets, r, &buf4, &mut reply, announcing).await,
            r = recv(&sockets.v6, &mut buf6, &mut cmsg6) => handle(&table, &raw, &sockets, r, &buf6, &mut reply, announcing).await,
            _ = watch_changed(&watcher) => {
                rescan_at = rescan_at.min(Instant::now() + RESCAN_DEBOUNCE);
            }
            _ = tokio::time::sleep_until(rescan_at) => {
                let now = Instant::now();
                rescan_at = now + rescan_every;
                match sockets.rescan(now) {
                    Ok(ch) => {
                        scan_failing = false;
                        for line in &ch.lines {
                            tracing::info!("beacon: {line}");
                        }
                        if !ch.gone.is_empty() && announcing && goodbye {
                            // While it still can: a link that lost an address or was excluded
                            // can still carry it; one that is down or removed cannot (ignored).
                            let bye = sender.datagram(Kind::Goodbye);
                            for l in &ch.gone {
                                sockets.send_on(l, &bye).await;
                            }
                        }
                        if !ch.lost_nets.is_empty() || !ch.lost_scopes.is_empty() {
                            for p in table.forget_addrs(|a| lost(&ch, a)) {
                                tracing::info!(node = %p.node, "peer dropped: its link went away");
                            }
                        }
                        if !ch.fresh.is_empty() {
                            sender.hello(&sockets, Some(&ch.fresh)).await;
                            burst = burst_from(Instant::now());
                            pex_at = Some(Instant::now() + pex::PEX_DELAY);
                        }
                    }
                    Err(e) => {
                        if !scan_failing {
                            tracing::warn!(error = %e, "beacon: cannot list interfaces (will retry)");
                        }
                        scan_failing = true;
                    }
                }
            }
            _ = tokio::time::sleep_until(next_send) => {
                sender.budget(cfg.interval, table.established_len(), &sockets);
                let a = sender.datagram(Kind::Announce);
                sockets.send(&a, None).await;
                let now = Instant::now();
                if burst.front().is_some_and(|t| *t <= now) {
                    burst.pop_front();
                } else {
                    next_announce = now + jittered(sender.interval);
                }
            }
            _ = tokio::time::sleep_until(pex_at.unwrap_or(far)) => {
                pex_at = None;
                if pex_task.as_ref().is_none_or(|t| t.is_finished()) {
                    let (t, on) = (table.clone(), sockets.pex_on_link());
                    pex_task = Some(tokio::spawn(async move {
                        let n = pex::exchange(t, on).await;
                        tracing::debug!(learnt = n, "beacon: peer exchange");
                        n
                    }));
                }
            }
            _ = tokio::time::sleep_until(reply.defend_at.unwrap_or(far)) => {
                reply.defend_at = None;
                let a = sender.datagram(Kind::Announce);
                sockets.send(&a, None).await;
            }
            _ = tokio::time::sleep_until(reply.at.unwrap_or(far)) => {
                let a = sender.datagram(Kind::Announce);
                sockets.send(&a, None).await;
                reply.at = None;
                reply.last = Instant::now();
            }
            _ = tokio::time::sleep_until(next_look) => {
                let now = Instant::now();
                if let Some(slept) = wake_watch.look(wake::clocks(), now) {
                    tracing::info!(?slept, "beacon: woke up from suspend; re-announcing and asking who is still here");
                    rescan_at = now;
                    sender.hello(&sockets, None).await;
                    burst = burst_from(now);
                }
                for p in wake_watch.drop_silent(&table, now) {
                    tracing::info!(node = %p.node, "peer dropped: silent since the wake-up");
                }
                for p in table.expire(now) {
                    tracing::info!(node = %p.node, addr = %p.http_addr(), "peer expired");
                }
            }
        }
    }
    if let Some(t) = pex_task {
        t.abort();
    }
    prover.abort();
    if announcing && goodbye {
        let bye = sender.datagram(Kind::Goodbye);
        sockets.send(&bye, None).await;
    }
}

/// A pending answer to a query.
struct Reply {
    /// When to answer; `None`: no answer due.
    at: Option<Instant>,
    /// When we last answered (answers are at least [`QUERY_REPLY_MIN_GAP`] apart).
    last: Instant,
    /// Other hosts heard announcing since the query (at most [`QUERY_ANSWERS`] node ids).
    heard: Vec<NodeId>,
    /// The last query we decided on: who asked, and when.
    asked: Option<(NodeId, Instant)>,
    /// When to announce because our node id was heard from another host's address (a hijack
    /// attempt: our announce undoes the "move" in every table at once, `table` pins the id).
    defend_at: Option<Instant>,
    /// When we last did (at most once per [`DEFEND_MIN_GAP`]).
    defended: Option<Instant>,
    /// This host's own addresses, for telling our beacons' echoes from someone else's copy of
    /// our node id; re-read at most once per [`DEFEND_MIN_GAP`], when a source is not in it.
    own_ips: Vec<IpAddr>,
    own_ips_at: Option<Instant>,
}

/// Least time between two announces made because our node id was heard from another address,
/// and between two reads of this host's addresses for that check.
pub const DEFEND_MIN_GAP: Duration = Duration::from_secs(1);
/// Most own addresses remembered for that check.
const MAX_OWN_IPS: usize = 64;

impl Reply {
    /// Whether `ip` is one of this host's addresses (re-reading them when it is not known and
    /// the last read is old enough).
    fn is_own(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.own_ips.contains(&ip) {
            return true;
        }
        if self.own_ips_at.is_some_and(|t| now < t + DEFEND_MIN_GAP) {
            // Unknown, and read a moment ago: not ours.
            return false;
        }
        self.own_ips_at = Some(now);
        self.own_ips = nix::ifaddrs::getifaddrs()
            .map(|addrs| {
                addrs
                    .filter_map(|a| {
                        let sa = a.address?;
                        sa.as_sockaddr_in()
                            .map(|v4| IpAddr::V4(v4.ip()))
                            .or_else(|| sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
                    })
                    .take(MAX_OWN_IPS)
                    .collect()
            })
            .unwrap_or_default();
        // Unreadable: assume ours rather than announce on every echo.
        self.own_ips.is_empty() || self.own_ips.contains(&ip)
    }
}

/// Whether this host answers a query in a hall of `hosts`, given a uniform draw `u` in [0, 1).
fn answers(hosts: usize, u: f64) -> bool {
    u * (hosts as f64) < QUERY_ANSWERS as f64
}

async fn handle(
    table: &PeerTable,
    raw: &Option<mpsc::Sender<RawDatagram>>,
    sockets: &Sockets,
    r: io::Result<Received>,
    buf: &[u8],
    reply: &mut Reply,
    announcing: bool,
) {
    let r = match r {
        Ok(x) => x,
        Err(e) => {
            tracing::debug!(error = %e, "beacon receive failed");
            // Avoid spinning on a persistent error.
            tokio::time::sleep(Duration::from_millis(10)).await;
            return;
        }
    };
    let (n, src) = (r.len.min(buf.len()), r.src);
    let now = Instant::now();
    let outcome = match sockets.on_link(&r) {
        Ok(()) => table.handle(src, &buf[..n], now),
        Err(why) => table.off_link(why),
    };
    match &outcome {
        Outcome::Joined(b) => tracing::info!(node = %b.node, %src, port = b.port, "peer joined"),
        Outcome::Left(b) => tracing::info!(node = %b.node, %src, "peer said goodbye"),
        Outcome::Ignored(b, _)
            if announcing
                && b.node == table.own()
                && b.kind == Kind::Announce
                && reply.defended.is_none_or(|t| now >= t + DEFEND_MIN_GAP)
                && !reply.is_own(src.ip(), now) =>
        {
            // Someone announces our node id from its address: our own announce, now, undoes
            // the "move" in every table and pins the id to our address.
            tracing::warn!(%src, "beacon: our node id announced from another address; announcing ours");
            reply.defended = Some(now);
            reply.defend_at = Some(now);
        }
        Outcome::Query(q)
            if announcing
                && reply.at.is_none()
                // The same query over the other family (or link): decided already.
                && !reply.asked.is_some_and(|(n, t)| n == q.node && now < t + QUERY_SAME) =>
        {
            reply.asked = Some((q.node, now));
            let mut rng = rand::thread_rng();
            if answers(table.established_len() + 1, rng.gen()) {
                let earliest = reply.last + QUERY_REPLY_MIN_GAP;
                let jitter = Duration::from_millis(rng.gen_range(0..=QUERY_REPLY_JITTER_MS));
                reply.at = Some((now + jitter).max(earliest));
                reply.heard.clear();
            }
        }
        _ => {}
    }
    match &outcome {
        Outcome::Joined(b) | Outcome::Refreshed(b) if reply.at.is_some() => {
            // The asker's own announces (its start burst) are no answers.
            let asker = reply.asked.is_some_and(|(n, _)| n == b.node);
            if !asker && !reply.heard.contains(&b.node) {
                reply.heard.push(b.node);
            }
            if reply.heard.len() >= QUERY_ANSWERS {
                // Enough hosts answered already: ours would add nothing.
                reply.at = None;
                reply.heard.clear();
            }
        }
        _ => {}
    }
    if let Some(tx) = raw {
        let _ = tx.try_send(RawDatagram {
            src,
            bytes: buf[..n].to_vec(),
            outcome,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_is_answered_by_about_query_answers_hosts_whatever_the_hall() {
        // Small halls: everyone answers.
        for hosts in 1..=QUERY_ANSWERS {
            assert!(answers(hosts, 0.999));
        }
        for hosts in [50usize, 100, 500, 2049] {
            let draws = 10_000;
            let yes = (0..draws)
                .filter(|i| answers(hosts, (*i as f64 + 0.5) / draws as f64))
                .count() as f64;
            let expected = QUERY_ANSWERS as f64 / hosts as f64 * draws as f64;
            assert!(
                (yes - expected).abs() <= 1.0,
                "{hosts} hosts: {yes} of {draws} vs {expected}"
            );
        }
    }

    #[test]
    fn the_interval_stretches_so_the_hall_stays_within_the_budget() {
        let five = Duration::from_secs(5);
        // A small hall keeps the configured interval.
        assert_eq!(budgeted_interval(five, 10, 200), five);
        // 500 hosts of 200 bytes a round: 100 KB per round, over 6 KB/s: 16.7 s.
        let i = budgeted_interval(five, 500, 200);
        assert_eq!(
            i,
            Duration::from_millis((500 * 200 * 1000u64).div_ceil(ANNOUNCE_BUDGET_BYTES_PER_SEC))
        );
        for hosts in [1usize, 10, 100, 300, 500, 2049] {
            let i = budgeted_interval(Duration::from_millis(100), hosts, 220);
            let rate = (hosts * 220) as f64 / i.as_secs_f64();
            assert!(
                rate <= ANNOUNCE_BUDGET_BYTES_PER_SEC as f64 + 1.0,
                "{hosts} hosts: {rate} B/s"
            );
        }
        // Never beyond what the wire can carry.
        assert_eq!(
            budgeted_interval(five, usize::MAX, usize::MAX),
            Duration::from_millis(wire::MAX_INTERVAL_MS.into())
        );
    }
}
