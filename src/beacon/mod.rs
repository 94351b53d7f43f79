//! The beacon: our UDP multicast protocol (`proto/beacon.md`) that announces this host and
//! builds the peer table, over IPv4 and IPv6.
//!
//! [`wire`] is the pure codec, [`table`] the peer table, [`iface`] the interfaces, [`links`] their
//! reported states, [`watch`] the kernel's notices of interface changes, [`wake`] the suspend
//! detector, this module the sockets and the one loop that receives, announces, answers queries,
//! expires peers and follows the interfaces. Invariants: one task per beacon (nothing is spawned
//! per datagram); multicast TTL and hop limit are 1; the beacon never triggers a fetch, it only
//! tells the proxy where it may ask.
//!
//! Roaming: the sockets are bound once; groups are joined and left per interface as interfaces
//! appear, go, come back or change addresses (a netlink notice triggers a re-scan, and a
//! periodic re-scan is the safety net). A new link gets an announce, a query and the start-up
//! burst at once; a departing link gets a goodbye while it still can, and the peers reachable
//! only through it are forgotten. With no usable interface the beacon waits.

pub mod iface;
pub mod links;
pub mod table;
pub mod wake;
pub mod watch;
pub mod wire;

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use socket2::{Domain, InterfaceIndexOrAddress, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use iface::{choose_interfaces, has_multicast_route_v4, list_interfaces, Interface};
pub use links::{LinkReport, LinkState, LinkStates};
pub use table::{Outcome, Peer, PeerTable};
use wire::{Beacon as Datagram, Kind, NodeId};

pub const DEFAULT_PORT: u16 = 8380;
pub const DEFAULT_GROUP_V4: Ipv4Addr = Ipv4Addr::new(239, 255, 83, 80);
pub const DEFAULT_GROUP_V6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x8380);
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// Extra announces right after start (and after a new link or a wake-up), in case the first
/// datagrams are lost.
const START_BURST: [Duration; 2] = [Duration::from_millis(100), Duration::from_millis(300)];
/// Answers to queries are delayed by up to this much, so hosts do not answer in one burst.
const QUERY_REPLY_JITTER_MS: u64 = 50;
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
/// After a wake-up from suspend, peers that have not answered the query within this long are
/// dropped (they may have gone while we slept).
pub const WAKE_GRACE: Duration = Duration::from_secs(2);

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

/// One bound family: its socket and groups.
struct Family {
    sock: UdpSocket,
    groups: Vec<IpAddr>,
}

/// A joined interface: which families joined on it.
#[derive(Clone, Debug)]
struct Link {
    iface: Interface,
    /// The IPv4 address used as the multicast interface, when IPv4 is joined.
    v4: Option<Ipv4Addr>,
    v6: bool,
}

impl Link {
    fn addrs(&self) -> Vec<String> {
        let mut a: Vec<String> = self.iface.v4.iter().map(|a| a.to_string()).collect();
        if self.v6 {
            a.push("fe80::/64".into());
        }
        a
    }
}

/// The addresses a link will use once `i` (its new state) is applied to `l`.
fn addrs_of(i: &Interface, l: &Link) -> String {
    let mut a: Vec<String> = i.v4.iter().map(|a| a.to_string()).collect();
    if l.v6 {
        a.push("fe80::/64".into());
    }
    a.join(", ")
}

/// What a re-scan found.
#[derive(Default, Debug)]
struct Changes {
    /// Links newly joined or with a new address: announce there now.
    fresh: Vec<String>,
    /// Links that left entirely (for the goodbye), as they were.
    gone: Vec<Link>,
    /// IPv4 networks and IPv6 scopes no longer reachable: peers seen through them are forgotten.
    lost_nets: Vec<(Ipv4Addr, Ipv4Addr)>,
    lost_scopes: Vec<u32>,
    /// What to log.
    lines: Vec<String>,
}

/// The sockets of a running beacon and the interfaces it follows.
pub struct Sockets {
    v4: Option<Family>,
    v6: Option<Family>,
    port: u16,
    /// Interface names to use (empty: every suitable one).
    names: Vec<String>,
    links: BTreeMap<String, Link>,
    /// Interface states, for the status page, `status` and `peers`.
    pub states: Arc<LinkStates>,
    /// Human-readable lines: what was joined, and warnings.
    pub report: Vec<String>,
}

fn sock_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> BeaconError {
    let what = what.into();
    move |source| BeaconError::Socket { what, source }
}

fn socket_v4(port: u16) -> Result<UdpSocket, BeaconError> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(sock_err("ipv4"))?;
    s.set_reuse_address(true).map_err(sock_err("SO_REUSEADDR"))?;
    s.set_reuse_port(true).map_err(sock_err("SO_REUSEPORT"))?;
    s.set_multicast_all_v4(false).map_err(sock_err("IP_MULTICAST_ALL"))?;
    s.set_multicast_ttl_v4(1).map_err(sock_err("IP_MULTICAST_TTL"))?;
    s.set_multicast_loop_v4(true).map_err(sock_err("IP_MULTICAST_LOOP"))?;
    s.set_nonblocking(true).map_err(sock_err("nonblocking"))?;
    let bind = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    s.bind(&bind.into()).map_err(sock_err(format!("bind {bind}")))?;
    UdpSocket::from_std(s.into()).map_err(sock_err("register"))
}

fn socket_v6(port: u16) -> Result<UdpSocket, BeaconError> {
    let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).map_err(sock_err("ipv6"))?;
    s.set_only_v6(true).map_err(sock_err("IPV6_V6ONLY"))?;
    s.set_reuse_address(true).map_err(sock_err("SO_REUSEADDR"))?;
    s.set_reuse_port(true).map_err(sock_err("SO_REUSEPORT"))?;
    s.set_multicast_all_v6(false).map_err(sock_err("IPV6_MULTICAST_ALL"))?;
    s.set_multicast_hops_v6(1).map_err(sock_err("IPV6_MULTICAST_HOPS"))?;
    s.set_multicast_loop_v6(true).map_err(sock_err("IPV6_MULTICAST_LOOP"))?;
    s.set_nonblocking(true).map_err(sock_err("nonblocking"))?;
    let bind = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    s.bind(&bind.into()).map_err(sock_err(format!("bind {bind}")))?;
    UdpSocket::from_std(s.into()).map_err(sock_err("register"))
}

/// Binds the beacon port and joins the groups on the interfaces usable now. Interfaces that
/// appear later are joined by [`run`]; having none yet is not an error.
pub fn bind(cfg: &BeaconConfig) -> Result<Sockets, BeaconError> {
    for g in &cfg.groups {
        if !g.is_multicast() {
            return Err(BeaconError::NotMulticast(*g));
        }
    }
    let groups4: Vec<IpAddr> = cfg.groups.iter().filter(|g| g.is_ipv4()).copied().collect();
    let groups6: Vec<IpAddr> = cfg.groups.iter().filter(|g| g.is_ipv6()).copied().collect();
    let mut report = Vec::new();
    let v4 = if groups4.is_empty() {
        None
    } else {
        Some(Family {
            sock: socket_v4(cfg.port)?,
            groups: groups4,
        })
    };
    let v6 = match (groups6.is_empty(), v4.is_some()) {
        (true, _) => None,
        (false, has_v4) => match socket_v6(cfg.port) {
            Ok(sock) => Some(Family { sock, groups: groups6 }),
            // IPv6 switched off on this machine: IPv4 alone, if there is IPv4.
            Err(e) if has_v4 => {
                report.push(format!("warning: no IPv6 beacon: {e}"));
                None
            }
            Err(e) => return Err(e),
        },
    };
    let mut s = Sockets {
        v4,
        v6,
        port: cfg.port,
        names: cfg.interfaces.clone(),
        links: BTreeMap::new(),
        states: Arc::new(LinkStates::default()),
        report,
    };
    let changes = s.rescan(Instant::now())?;
    s.report.extend(changes.lines);
    if s.links.is_empty() {
        s.report
            .push("no usable interface yet: waiting for one (the beacon joins it when it appears)".into());
    }
    Ok(s)
}

impl Sockets {
    /// Reads the interfaces again, joins and leaves groups to match, and records the states.
    fn rescan(&mut self, now: Instant) -> Result<Changes, BeaconError> {
        let all = list_interfaces()?;
        let (chosen, waiting) = choose_interfaces(&all, &self.names);
        let mut ch = Changes::default();
        let mut want: BTreeMap<String, Interface> = BTreeMap::new();
        for i in chosen {
            let v4 = self.v4.is_some() && !i.v4.is_empty();
            let v6 = self.v6.is_some() && i.v6_link_local && i.index != 0;
            if (v4 || v6) && (want.len() < MAX_LINKS) {
                want.insert(i.name.clone(), i);
            } else if self.states.set(&i.name, LinkState::Waiting, Vec::new(), now) {
                let why = if v4 || v6 {
                    format!("more than {MAX_LINKS} interfaces")
                } else {
                    "no IPv4 address and no usable IPv6 link-local address yet".into()
                };
                ch.lines.push(format!("waiting for {}: {why}", i.name));
            }
        }
        for n in &waiting {
            if self.states.set(n, LinkState::Waiting, Vec::new(), now) {
                ch.lines.push(format!("waiting for interface {n} to appear"));
            }
        }
        // Links that went away, or came back as another interface (a new index).
        let gone: Vec<String> = self
            .links
            .iter()
            .filter(|(n, l)| want.get(*n).is_none_or(|i| i.index != l.iface.index))
            .map(|(n, _)| n.clone())
            .collect();
        for n in gone {
            if let Some(l) = self.links.remove(&n) {
                self.leave(&l, true, true);
                ch.lost_nets.extend(l.iface.v4_nets.iter().copied());
                if l.v6 {
                    ch.lost_scopes.push(l.iface.index);
                }
                if !want.contains_key(&n) && self.states.get(&n) != Some(LinkState::Waiting) {
                    self.states.set(&n, LinkState::Left, Vec::new(), now);
                }
                ch.lines.push(format!("left {n}"));
                ch.gone.push(l);
            }
        }
        for (n, i) in want {
            let old = self.links.get(&n).cloned();
            let mut l = old.clone().unwrap_or(Link {
                iface: i.clone(),
                v4: None,
                v6: false,
            });
            let mut fresh = old.is_none();
            // IPv4: joined by interface index (survives address changes); sent from the first
            // address, so a changed address is announced at once.
            let want4 = self.v4.is_some() && !i.v4.is_empty();
            match (l.v4, want4) {
                (None, true) => {
                    self.join_v4(&i, &mut ch.lines);
                    fresh = true;
                }
                (Some(_), false) => self.leave(&l, true, false),
                (Some(a), true) if a != i.v4[0] => fresh = true,
                _ => {}
            }
            for net in &l.iface.v4_nets {
                if !i.v4_nets.contains(net) {
                    ch.lost_nets.push(*net);
                }
            }
            l.v4 = want4.then(|| i.v4[0]);
            let want6 = self.v6.is_some() && i.v6_link_local && i.index != 0;
            match (l.v6, want6) {
                (false, true) => {
                    self.join_v6(&i, &mut ch.lines);
                    fresh = true;
                }
                (true, false) => {
                    self.leave(&l, false, true);
                    ch.lost_scopes.push(i.index);
                }
                _ => {}
            }
            l.v6 = want6;
            if fresh {
                ch.fresh.push(n.clone());
                let what = if old.is_some() { "announcing again on" } else { "joined" };
                ch.lines.push(format!("{what} {n} ({})", addrs_of(&i, &l)));
            }
            l.iface = i;
            self.states.set(&n, LinkState::Joined, l.addrs(), now);
            self.links.insert(n, l);
        }
        // A network or scope still reachable through another link is not lost.
        ch.lost_nets
            .retain(|(a, _)| !self.links.values().any(|l| l.v4.is_some() && l.iface.reaches_v4(*a)));
        ch.lost_scopes
            .retain(|s| !self.links.values().any(|l| l.v6 && l.iface.index == *s));
        Ok(ch)
    }

    fn join_v4(&self, i: &Interface, lines: &mut Vec<String>) {
        let Some(f) = &self.v4 else { return };
        let sock = socket2::SockRef::from(&f.sock);
        for g in &f.groups {
            let IpAddr::V4(g4) = g else { continue };
            match sock.join_multicast_v4_n(g4, &InterfaceIndexOrAddress::Index(i.index)) {
                Ok(()) => lines.push(format!("listening on {g}:{} via {} ({})", self.port, i.name, i.v4[0])),
                // Still a member from before (a link that went down and came back).
                Err(e) if e.raw_os_error() == Some(nix::libc::EADDRINUSE) => {}
                Err(e) => lines.push(format!("warning: cannot join {g} on {}: {e}", i.name)),
            }
        }
        if !i.loopback && !has_multicast_route_v4(&i.name) {
            lines.push(format!(
                "warning: no IPv4 multicast route on {0}; if peers do not show up: ip route add 224.0.0.0/4 dev {0}",
                i.name
            ));
        }
    }

    fn join_v6(&self, i: &Interface, lines: &mut Vec<String>) {
        let Some(f) = &self.v6 else { return };
        let sock = socket2::SockRef::from(&f.sock);
        for g in &f.groups {
            let IpAddr::V6(g6) = g else { continue };
            match sock.join_multicast_v6(g6, i.index) {
                Ok(()) => lines.push(format!(
                    "listening on [{g}]:{} via {} (index {})",
                    self.port, i.name, i.index
                )),
                Err(e) if e.raw_os_error() == Some(nix::libc::EADDRINUSE) => {}
                Err(e) => lines.push(format!("warning: cannot join {g} on {}: {e}", i.name)),
            }
        }
    }

    /// Leaves the groups on a link (errors ignored: a removed interface has no memberships left).
    fn leave(&self, l: &Link, v4: bool, v6: bool) {
        if let (true, Some(_), Some(f)) = (v4, l.v4, &self.v4) {
            let sock = socket2::SockRef::from(&f.sock);
            for g in &f.groups {
                if let IpAddr::V4(g4) = g {
                    let _ = sock.leave_multicast_v4_n(g4, &InterfaceIndexOrAddress::Index(l.iface.index));
                }
            }
        }
        if let (true, true, Some(f)) = (v6, l.v6, &self.v6) {
            let sock = socket2::SockRef::from(&f.sock);
            for g in &f.groups {
                if let IpAddr::V6(g6) = g {
                    let _ = sock.leave_multicast_v6(g6, l.iface.index);
                }
            }
        }
    }

    /// Sends `bytes` to every group on one link (errors only logged at debug: a link may be
    /// going away as we send).
    async fn send_on(&self, l: &Link, bytes: &[u8]) {
        if let (Some(a), Some(f)) = (l.v4, &self.v4) {
            let sock = socket2::SockRef::from(&f.sock);
            match sock.set_multicast_if_v4(&a) {
                Err(e) => tracing::debug!(iface = %l.iface.name, error = %e, "IP_MULTICAST_IF"),
                Ok(()) => {
                    for g in &f.groups {
                        if let Err(e) = f.sock.send_to(bytes, SocketAddr::new(*g, self.port)).await {
                            tracing::debug!(iface = %l.iface.name, %g, error = %e, "beacon send failed");
                        }
                    }
                }
            }
        }
        if let (true, Some(f)) = (l.v6, &self.v6) {
            let sock = socket2::SockRef::from(&f.sock);
            if let Err(e) = sock.set_multicast_if_v6(l.iface.index) {
                tracing::debug!(iface = %l.iface.name, error = %e, "IPV6_MULTICAST_IF");
                return;
            }
            for g in &f.groups {
                let IpAddr::V6(g6) = g else { continue };
                let to = SocketAddrV6::new(*g6, self.port, 0, l.iface.index);
                if let Err(e) = f.sock.send_to(bytes, to).await {
                    tracing::debug!(iface = %l.iface.name, %g, error = %e, "beacon send failed");
                }
            }
        }
    }

    /// Sends on every joined link, or only on those named in `only`.
    async fn send(&self, bytes: &[u8], only: Option<&[String]>) {
        for (n, l) in &self.links {
            if only.is_none_or(|o| o.contains(n)) {
                self.send_on(l, bytes).await;
            }
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
    announce: Option<Announce>,
    interval: Duration,
    seq: u32,
}

impl Sender {
    fn datagram(&mut self, kind: Kind) -> Vec<u8> {
        self.seq = self.seq.wrapping_add(1);
        let a = self.announce.as_ref();
        wire::encode(&Datagram {
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
        })
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

async fn recv(f: &Option<Family>, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
    match f {
        Some(f) => f.sock.recv_from(buf).await,
        None => std::future::pending().await,
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

/// True when `a` was reached through a network or IPv6 scope in `ch`'s lost ones.
fn lost(ch: &Changes, a: &SocketAddr) -> bool {
    match a {
        SocketAddr::V4(a) => ch.lost_nets.iter().any(|(n, m)| {
            let m = u32::from(*m);
            u32::from(*n) & m == u32::from(*a.ip()) & m
        }),
        SocketAddr::V6(a) => a.scope_id() != 0 && ch.lost_scopes.contains(&a.scope_id()),
    }
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
        announce: cfg.announce.clone(),
        interval: cfg.interval,
        seq: 0,
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
    let mut next_announce = start + jittered(cfg.interval);
    let mut rescan_at = start + rescan_every;
    let mut scan_failing = false;
    let mut sleep = wake::SleepDetector::new(wake::clocks());
    // After a wake-up: when it was, and when peers not heard since are dropped.
    let mut woke: Option<(Instant, Instant)> = None;
    let mut reply_at: Option<Instant> = None;
    // No reply sent yet: the first query is answered after the jitter alone.
    let mut last_reply = start.checked_sub(QUERY_REPLY_MIN_GAP).unwrap_or(start);
    let (mut buf4, mut buf6) = (vec![0u8; RECV_BUF], vec![0u8; RECV_BUF]);
    let far = start + Duration::from_secs(86_400 * 365);
    loop {
        let next_burst = burst.front().copied().unwrap_or(far);
        let next_send = if announcing { next_announce.min(next_burst) } else { far };
        let next_look = table
            .next_expiry()
            .unwrap_or(far)
            .min(woke.map_or(far, |w| w.1))
            .min(Instant::now() + EXPIRE_MAX_WAIT);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = recv(&sockets.v4, &mut buf4) => handle(&table, &raw, r, &buf4, &mut reply_at, last_reply, announcing).await,
            r = recv(&sockets.v6, &mut buf6) => handle(&table, &raw, r, &buf6, &mut reply_at, last_reply, announcing).await,
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
                let a = sender.datagram(Kind::Announce);
                sockets.send(&a, None).await;
                let now = Instant::now();
                if burst.front().is_some_and(|t| *t <= now) {
                    burst.pop_front();
                } else {
                    next_announce = now + jittered(cfg.interval);
                }
            }
            _ = tokio::time::sleep_until(reply_at.unwrap_or(far)) => {
                let a = sender.datagram(Kind::Announce);
                sockets.send(&a, None).await;
                reply_at = None;
                last_reply = Instant::now();
            }
            _ = tokio::time::sleep_until(next_look) => {
                let now = Instant::now();
                if let Some(slept) = sleep.check(wake::clocks()) {
                    tracing::info!(?slept, "beacon: woke up from suspend; re-announcing and asking who is still here");
                    rescan_at = now;
                    sender.hello(&sockets, None).await;
                    burst = burst_from(now);
                    woke = Some((now, now + WAKE_GRACE));
                }
                if let Some((at, until)) = woke {
                    if now >= until {
                        woke = None;
                        for p in table.drop_unheard_since(at) {
                            tracing::info!(node = %p.node, "peer dropped: silent since the wake-up");
                        }
                    }
                }
                for p in table.expire(now) {
                    tracing::info!(node = %p.node, addr = %p.http_addr(), "peer expired");
                }
            }
        }
    }
    if announcing && goodbye {
        let bye = sender.datagram(Kind::Goodbye);
        sockets.send(&bye, None).await;
    }
}

async fn handle(
    table: &PeerTable,
    raw: &Option<mpsc::Sender<RawDatagram>>,
    r: io::Result<(usize, SocketAddr)>,
    buf: &[u8],
    reply_at: &mut Option<Instant>,
    last_reply: Instant,
    announcing: bool,
) {
    let (n, src) = match r {
        Ok(x) => x,
        Err(e) => {
            tracing::debug!(error = %e, "beacon receive failed");
            // Avoid spinning on a persistent error.
            tokio::time::sleep(Duration::from_millis(10)).await;
            return;
        }
    };
    let now = Instant::now();
    let outcome = table.handle(src, &buf[..n], now);
    match &outcome {
        Outcome::Joined(b) => tracing::info!(node = %b.node, %src, port = b.port, "peer joined"),
        Outcome::Left(b) => tracing::info!(node = %b.node, %src, "peer said goodbye"),
        Outcome::Query(_) if announcing && reply_at.is_none() => {
            let earliest = last_reply + QUERY_REPLY_MIN_GAP;
            let jitter = Duration::from_millis(rand::thread_rng().gen_range(0..=QUERY_REPLY_JITTER_MS));
            *reply_at = Some((now + jitter).max(earliest));
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
