//! The beacon: our UDP multicast protocol (`proto/beacon.md`) that announces this host and
//! builds the peer table, over IPv4 and IPv6.
//!
//! [`wire`] is the pure codec, [`table`] the peer table, this module the sockets and the one loop
//! that receives, announces, answers queries and expires peers. Invariants: one task per beacon
//! (nothing is spawned per datagram); multicast TTL and hop limit are 1; the beacon never
//! triggers a fetch, it only tells the proxy where it may ask.

pub mod iface;
pub mod table;
pub mod wire;

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use iface::{choose_interfaces, has_multicast_route_v4, list_interfaces, Interface};
pub use table::{Outcome, Peer, PeerTable};
use wire::{Beacon as Datagram, Kind, NodeId};

pub const DEFAULT_PORT: u16 = 8380;
pub const DEFAULT_GROUP_V4: Ipv4Addr = Ipv4Addr::new(239, 255, 83, 80);
pub const DEFAULT_GROUP_V6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x8380);
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// Extra announces right after start, in case the first datagrams are lost.
const START_BURST: [Duration; 2] = [Duration::from_millis(100), Duration::from_millis(300)];
/// Answers to queries are delayed by up to this much, so hosts do not answer in one burst.
const QUERY_REPLY_JITTER_MS: u64 = 50;
/// At most one answer to queries per this long.
const QUERY_REPLY_MIN_GAP: Duration = Duration::from_millis(250);
/// Longest sleep between looks for silent peers (the loop also wakes at the earliest expiry).
const EXPIRE_MAX_WAIT: Duration = Duration::from_secs(1);
/// Receive buffer: larger than any valid datagram, so oversized ones are seen (and counted).
const RECV_BUF: usize = 2048;

/// This machine's host name, for the beacon's informational hostname extension.
pub fn hostname() -> Option<String> {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
}

#[derive(Debug, thiserror::Error)]
pub enum BeaconError {
    #[error("no usable interface for multicast{0}")]
    NoInterface(String),
    #[error("interface {0} not found or not up")]
    UnknownInterface(String),
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
    /// Interface names; empty: every up, multicast-capable, non-loopback interface.
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

/// One bound family: its socket and the interfaces it joined on.
struct Family {
    sock: UdpSocket,
    groups: Vec<IpAddr>,
    ifaces: Vec<Interface>,
}

/// The sockets of a running beacon, with a description of what it listens on.
pub struct Sockets {
    v4: Option<Family>,
    v6: Option<Family>,
    /// Human-readable lines: what was joined, and warnings.
    pub report: Vec<String>,
}

/// Binds the beacon port and joins the groups on the chosen interfaces.
pub fn bind(cfg: &BeaconConfig) -> Result<Sockets, BeaconError> {
    for g in &cfg.groups {
        if !g.is_multicast() {
            return Err(BeaconError::NotMulticast(*g));
        }
    }
    let all = list_interfaces()?;
    let ifaces = choose_interfaces(&all, &cfg.interfaces)?;
    let mut report = Vec::new();
    let sock_err = |what: String| move |source| BeaconError::Socket { what, source };
    let groups4: Vec<Ipv4Addr> = cfg
        .groups
        .iter()
        .filter_map(|g| match g {
            IpAddr::V4(a) => Some(*a),
            _ => None,
        })
        .collect();
    let groups6: Vec<Ipv6Addr> = cfg
        .groups
        .iter()
        .filter_map(|g| match g {
            IpAddr::V6(a) => Some(*a),
            _ => None,
        })
        .collect();

    let mut v4 = None;
    let if4: Vec<Interface> = ifaces.iter().filter(|i| !i.v4.is_empty()).cloned().collect();
    if !groups4.is_empty() && !if4.is_empty() {
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(sock_err("ipv4".into()))?;
        s.set_reuse_address(true).map_err(sock_err("SO_REUSEADDR".into()))?;
        s.set_reuse_port(true).map_err(sock_err("SO_REUSEPORT".into()))?;
        s.set_multicast_all_v4(false)
            .map_err(sock_err("IP_MULTICAST_ALL".into()))?;
        s.set_multicast_ttl_v4(1).map_err(sock_err("IP_MULTICAST_TTL".into()))?;
        s.set_multicast_loop_v4(true)
            .map_err(sock_err("IP_MULTICAST_LOOP".into()))?;
        s.set_nonblocking(true).map_err(sock_err("nonblocking".into()))?;
        let bind = SocketAddr::from((Ipv4Addr::UNSPECIFIED, cfg.port));
        s.bind(&bind.into()).map_err(sock_err(format!("bind {bind}")))?;
        let mut joined = Vec::new();
        for i in &if4 {
            for g in &groups4 {
                match s.join_multicast_v4(g, &i.v4[0]) {
                    Ok(()) => report.push(format!("listening on {g}:{} via {} ({})", cfg.port, i.name, i.v4[0])),
                    Err(e) => report.push(format!("warning: cannot join {g} on {}: {e}", i.name)),
                }
            }
            if !i.loopback && !has_multicast_route_v4(&i.name) {
                report.push(format!(
                    "warning: no IPv4 multicast route on {0}; if peers do not show up: ip route add 224.0.0.0/4 dev {0}",
                    i.name
                ));
            }
            joined.push(i.clone());
        }
        let sock = UdpSocket::from_std(s.into()).map_err(sock_err("register".into()))?;
        v4 = Some(Family {
            sock,
            groups: groups4.iter().map(|g| IpAddr::V4(*g)).collect(),
            ifaces: joined,
        });
    }

    let mut v6 = None;
    let if6: Vec<Interface> = ifaces
        .iter()
        .filter(|i| i.v6_link_local && i.index != 0)
        .cloned()
        .collect();
    if !groups6.is_empty() && !if6.is_empty() {
        let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).map_err(sock_err("ipv6".into()))?;
        s.set_only_v6(true).map_err(sock_err("IPV6_V6ONLY".into()))?;
        s.set_reuse_address(true).map_err(sock_err("SO_REUSEADDR".into()))?;
        s.set_reuse_port(true).map_err(sock_err("SO_REUSEPORT".into()))?;
        s.set_multicast_all_v6(false)
            .map_err(sock_err("IPV6_MULTICAST_ALL".into()))?;
        s.set_multicast_hops_v6(1)
            .map_err(sock_err("IPV6_MULTICAST_HOPS".into()))?;
        s.set_multicast_loop_v6(true)
            .map_err(sock_err("IPV6_MULTICAST_LOOP".into()))?;
        s.set_nonblocking(true).map_err(sock_err("nonblocking".into()))?;
        let bind = SocketAddr::from((Ipv6Addr::UNSPECIFIED, cfg.port));
        s.bind(&bind.into()).map_err(sock_err(format!("bind {bind}")))?;
        let mut joined = Vec::new();
        for i in &if6 {
            for g in &groups6 {
                match s.join_multicast_v6(g, i.index) {
                    Ok(()) => report.push(format!(
                        "listening on [{g}]:{} via {} (index {})",
                        cfg.port, i.name, i.index
                    )),
                    Err(e) => report.push(format!("warning: cannot join {g} on {}: {e}", i.name)),
                }
            }
            joined.push(i.clone());
        }
        let sock = UdpSocket::from_std(s.into()).map_err(sock_err("register".into()))?;
        v6 = Some(Family {
            sock,
            groups: groups6.iter().map(|g| IpAddr::V6(*g)).collect(),
            ifaces: joined,
        });
    }
    for i in &ifaces {
        if i.v4.is_empty() && !i.v6_link_local {
            report.push(format!(
                "warning: {} has no IPv4 address and no IPv6 link-local address",
                i.name
            ));
        }
    }
    if v4.is_none() && v6.is_none() {
        return Err(BeaconError::NoInterface(format!(
            " among {:?} for groups {:?}",
            ifaces.iter().map(|i| &i.name).collect::<Vec<_>>(),
            cfg.groups
        )));
    }
    Ok(Sockets { v4, v6, report })
}

/// One received datagram, for `peers --raw`.
#[derive(Clone, Debug)]
pub struct RawDatagram {
    pub src: SocketAddr,
    pub bytes: Vec<u8>,
    pub outcome: Outcome,
}

/// Sends beacons of one kind on every interface of every family.
struct Sender {
    node: NodeId,
    announce: Option<Announce>,
    interval: Duration,
    port: u16,
    seq: u32,
}

impl Sender {
    async fn send(&mut self, s: &Sockets, kind: Kind) {
        self.seq = self.seq.wrapping_add(1);
        let a = self.announce.as_ref();
        let d = Datagram {
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
                .map(|a| wire::commitment(&a.secret)),
            proof: a.filter(|_| kind == Kind::Goodbye).map(|a| a.secret),
        };
        let bytes = wire::encode(&d);
        if let Some(f) = &s.v4 {
            for i in &f.ifaces {
                let sock = socket2::SockRef::from(&f.sock);
                if let Err(e) = sock.set_multicast_if_v4(&i.v4[0]) {
                    tracing::debug!(iface = %i.name, error = %e, "IP_MULTICAST_IF");
                    continue;
                }
                for g in &f.groups {
                    if let Err(e) = f.sock.send_to(&bytes, SocketAddr::new(*g, self.port)).await {
                        tracing::debug!(iface = %i.name, %g, error = %e, "beacon send failed");
                    }
                }
            }
        }
        if let Some(f) = &s.v6 {
            for i in &f.ifaces {
                let sock = socket2::SockRef::from(&f.sock);
                if let Err(e) = sock.set_multicast_if_v6(i.index) {
                    tracing::debug!(iface = %i.name, error = %e, "IPV6_MULTICAST_IF");
                    continue;
                }
                for g in &f.groups {
                    let IpAddr::V6(g6) = g else { continue };
                    let to = SocketAddrV6::new(*g6, self.port, 0, i.index);
                    if let Err(e) = f.sock.send_to(&bytes, to).await {
                        tracing::debug!(iface = %i.name, %g, error = %e, "beacon send failed");
                    }
                }
            }
        }
    }
}

async fn recv(f: &Option<Family>, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
    match f {
        Some(f) => f.sock.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

fn jittered(interval: Duration) -> Duration {
    let f = rand::thread_rng().gen_range(0.8..1.2);
    interval.mul_f64(f)
}

/// Runs the beacon until `shutdown`: answers queries, announces (if configured), expires peers,
/// and says goodbye at the end. `raw`, if given, receives every datagram (for `peers --raw`).
/// `goodbye: false` skips the goodbye (tests of a host that dies).
pub async fn run(
    sockets: Sockets,
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
        port: cfg.port,
        seq: 0,
    };
    let announcing = cfg.announce.is_some();
    let start = Instant::now();
    if announcing {
        sender.send(&sockets, Kind::Announce).await;
    }
    sender.send(&sockets, Kind::Query).await;
    let mut burst: VecDeque<Instant> = if announcing {
        START_BURST.iter().map(|d| start + *d).collect()
    } else {
        VecDeque::new()
    };
    let mut next_announce = start + jittered(cfg.interval);
    let mut reply_at: Option<Instant> = None;
    // No reply sent yet: the first query is answered after the jitter alone.
    let mut last_reply = start.checked_sub(QUERY_REPLY_MIN_GAP).unwrap_or(start);
    let (mut buf4, mut buf6) = (vec![0u8; RECV_BUF], vec![0u8; RECV_BUF]);
    let far = start + Duration::from_secs(86_400 * 365);
    loop {
        let next_burst = burst.front().copied().unwrap_or(far);
        let next_send = if announcing { next_announce.min(next_burst) } else { far };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = recv(&sockets.v4, &mut buf4) => handle(&table, &raw, r, &buf4, &mut reply_at, last_reply, announcing).await,
            r = recv(&sockets.v6, &mut buf6) => handle(&table, &raw, r, &buf6, &mut reply_at, last_reply, announcing).await,
            _ = tokio::time::sleep_until(next_send) => {
                sender.send(&sockets, Kind::Announce).await;
                let now = Instant::now();
                if burst.front().is_some_and(|t| *t <= now) {
                    burst.pop_front();
                } else {
                    next_announce = now + jittered(cfg.interval);
                }
            }
            _ = tokio::time::sleep_until(reply_at.unwrap_or(far)) => {
                sender.send(&sockets, Kind::Announce).await;
                reply_at = None;
                last_reply = Instant::now();
            }
            _ = tokio::time::sleep_until(table.next_expiry().unwrap_or(far).min(Instant::now() + EXPIRE_MAX_WAIT)) => {
                for p in table.expire(Instant::now()) {
                    tracing::info!(node = %p.node, addr = %p.http_addr(), "peer expired");
                }
            }
        }
    }
    if announcing && goodbye {
        sender.send(&sockets, Kind::Goodbye).await;
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
