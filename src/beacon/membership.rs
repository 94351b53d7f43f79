//! The beacon's sockets and their group memberships: one socket per family, bound once, and
//! the groups joined and left per interface as interfaces come and go ([`Sockets::rescan`]).
//! Invariants: at most [`MAX_LINKS`] interfaces joined; joins are by interface index, so an
//! address change needs no re-join; errors on leaving are ignored (a removed interface has no
//! memberships left), errors on sending only logged at debug (a link may be going as we send;
//! a send that would block, a full send buffer, is such an error: the datagram is lost).
//!
//! (Just over 500 lines: the two families' socket set-up, joins and packet-info reads are
//! alike but not the same calls, and read best side by side.)

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::Arc;

use std::io::IoSliceMut;
use std::os::fd::AsRawFd;

use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, SockaddrStorage};
use socket2::{Domain, InterfaceIndexOrAddress, Protocol, Socket, Type};
use std::net::UdpSocket;
use std::os::fd::RawFd;
use tokio::time::Instant;

use super::config::{BeaconConfig, BeaconError, MAX_LINKS};
use super::iface::{choose_interfaces, has_multicast_route_v4, list_interfaces, Interface};
use super::links::{LinkState, LinkStates};
use super::pex::OnLink;
use super::reading::RCVBUF_BYTES;

/// IPv4 (20) and UDP (8) header bytes of a beacon on the link.
const V4_OVERHEAD: usize = 28;
/// IPv6 (40) and UDP (8) header bytes of a beacon on the link.
const V6_OVERHEAD: usize = 48;

/// One bound family: its socket (non-blocking, registered with the reactor only while
/// `reading::Reader` listens) and groups.
pub(super) struct Family {
    sock: UdpSocket,
    groups: Vec<IpAddr>,
}

/// A joined interface: which families joined on it.
#[derive(Clone, Debug)]
pub(super) struct Link {
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
pub(super) struct Changes {
    /// Links newly joined or with a new address: announce there now.
    pub(super) fresh: Vec<String>,
    /// Links that left entirely (for the goodbye), as they were.
    pub(super) gone: Vec<Link>,
    /// IPv4 networks and IPv6 scopes no longer reachable: peers seen through them are forgotten.
    pub(super) lost_nets: Vec<(Ipv4Addr, Ipv4Addr)>,
    pub(super) lost_scopes: Vec<u32>,
    /// What to log.
    pub(super) lines: Vec<String>,
}

/// The sockets of a running beacon and the interfaces it follows.
pub struct Sockets {
    pub(super) v4: Option<Family>,
    pub(super) v6: Option<Family>,
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

/// Asks for [`RCVBUF_BYTES`] of receive buffer (the reads are batched, `reading`); a refusal
/// leaves the system's default, logged.
fn with_rcvbuf(s: Socket) -> Socket {
    if let Err(e) = s.set_recv_buffer_size(RCVBUF_BYTES) {
        tracing::debug!(error = %e, "beacon: SO_RCVBUF refused; the default stays");
    }
    s
}

fn socket_v4(port: u16) -> Result<UdpSocket, BeaconError> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(sock_err("ipv4"))?;
    s.set_reuse_address(true).map_err(sock_err("SO_REUSEADDR"))?;
    s.set_reuse_port(true).map_err(sock_err("SO_REUSEPORT"))?;
    s.set_multicast_all_v4(false).map_err(sock_err("IP_MULTICAST_ALL"))?;
    s.set_multicast_ttl_v4(1).map_err(sock_err("IP_MULTICAST_TTL"))?;
    s.set_multicast_loop_v4(true).map_err(sock_err("IP_MULTICAST_LOOP"))?;
    // Each datagram's destination and arrival interface, for the on-link checks.
    setsockopt(&s, sockopt::Ipv4PacketInfo, &true).map_err(|e| sock_err("IP_PKTINFO")(e.into()))?;
    s.set_nonblocking(true).map_err(sock_err("nonblocking"))?;
    let bind = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    s.bind(&bind.into()).map_err(sock_err(format!("bind {bind}")))?;
    Ok(with_rcvbuf(s).into())
}

fn socket_v6(port: u16) -> Result<UdpSocket, BeaconError> {
    let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).map_err(sock_err("ipv6"))?;
    s.set_only_v6(true).map_err(sock_err("IPV6_V6ONLY"))?;
    s.set_reuse_address(true).map_err(sock_err("SO_REUSEADDR"))?;
    s.set_reuse_port(true).map_err(sock_err("SO_REUSEPORT"))?;
    s.set_multicast_all_v6(false).map_err(sock_err("IPV6_MULTICAST_ALL"))?;
    s.set_multicast_hops_v6(1).map_err(sock_err("IPV6_MULTICAST_HOPS"))?;
    s.set_multicast_loop_v6(true).map_err(sock_err("IPV6_MULTICAST_LOOP"))?;
    setsockopt(&s, sockopt::Ipv6RecvPacketInfo, &true).map_err(|e| sock_err("IPV6_RECVPKTINFO")(e.into()))?;
    s.set_nonblocking(true).map_err(sock_err("nonblocking"))?;
    let bind = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    s.bind(&bind.into()).map_err(sock_err(format!("bind {bind}")))?;
    Ok(with_rcvbuf(s).into())
}

/// Binds the beacon port and joins the groups on the interfaces usable now. Interfaces that
/// appear later are joined by [`super::run`]; having none yet is not an error.
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
    pub(super) fn rescan(&mut self, now: Instant) -> Result<Changes, BeaconError> {
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
    pub(super) async fn send_on(&self, l: &Link, bytes: &[u8]) {
        if let (Some(a), Some(f)) = (l.v4, &self.v4) {
            let sock = socket2::SockRef::from(&f.sock);
            match sock.set_multicast_if_v4(&a) {
                Err(e) => tracing::debug!(iface = %l.iface.name, error = %e, "IP_MULTICAST_IF"),
                Ok(()) => {
                    for g in &f.groups {
                        if let Err(e) = f.sock.send_to(bytes, SocketAddr::new(*g, self.port)) {
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
                if let Err(e) = f.sock.send_to(bytes, to) {
                    tracing::debug!(iface = %l.iface.name, %g, error = %e, "beacon send failed");
                }
            }
        }
    }

    /// Where entries learnt by peer exchange may point: the subnets of the joined IPv4 links.
    pub(super) fn pex_on_link(&self) -> OnLink {
        OnLink {
            v4_nets: self
                .links
                .values()
                .filter(|l| l.v4.is_some())
                .flat_map(|l| l.iface.v4_nets.iter().copied())
                .collect(),
        }
    }

    /// Bytes on the wire of one round of a `len`-byte beacon: one datagram per group on every
    /// joined link and family, headers included (for the traffic budget).
    pub(super) fn round_bytes(&self, len: usize) -> usize {
        let n4 = self.v4.as_ref().map_or(0, |f| f.groups.len());
        let n6 = self.v6.as_ref().map_or(0, |f| f.groups.len());
        self.links
            .values()
            .map(|l| {
                let v4 = if l.v4.is_some() { n4 * (len + V4_OVERHEAD) } else { 0 };
                let v6 = if l.v6 { n6 * (len + V6_OVERHEAD) } else { 0 };
                v4 + v6
            })
            .sum()
    }

    /// Sends on every joined link, or only on those named in `only`.
    pub(super) async fn send(&self, bytes: &[u8], only: Option<&[String]>) {
        for (n, l) in &self.links {
            if only.is_none_or(|o| o.contains(n)) {
                self.send_on(l, bytes).await;
            }
        }
    }
}

/// One received datagram: its length, source, and (from `IP_PKTINFO` / `IPV6_RECVPKTINFO`) the
/// destination address in its IP header and the interface it arrived on.
#[derive(Clone, Copy, Debug)]
pub(super) struct Received {
    pub(super) len: usize,
    pub(super) src: SocketAddr,
    pub(super) dst: Option<IpAddr>,
    pub(super) ifindex: u32,
}

/// A control-message buffer for [`recv`], allocated once per socket (room for either family's
/// packet info).
pub(super) fn cmsg_buffer() -> Vec<u8> {
    nix::cmsg_space!(nix::libc::in6_pktinfo)
}

/// The next queued datagram of `f`, without waiting: `None` when there is none (or no such
/// socket).
pub(super) fn try_recv(f: &Option<Family>, buf: &mut [u8], cmsg: &mut Vec<u8>) -> Option<io::Result<Received>> {
    match recv_pktinfo(&f.as_ref()?.sock, buf, cmsg) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
        r => Some(r),
    }
}

/// `recvmsg` with the packet-info control message (non-blocking; `WouldBlock` when empty).
fn recv_pktinfo(sock: &UdpSocket, buf: &mut [u8], cmsg: &mut Vec<u8>) -> io::Result<Received> {
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(sock.as_raw_fd(), &mut iov, Some(cmsg), MsgFlags::MSG_DONTWAIT)?;
    let src = msg
        .address
        .as_ref()
        .and_then(|a| {
            a.as_sockaddr_in()
                .map(|v4| SocketAddr::from(std::net::SocketAddrV4::from(*v4)))
                .or_else(|| a.as_sockaddr_in6().map(|v6| SocketAddr::from(SocketAddrV6::from(*v6))))
        })
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "datagram without a source address"))?;
    let (mut dst, mut ifindex) = (None, 0);
    for c in msg.cmsgs()? {
        match c {
            ControlMessageOwned::Ipv4PacketInfo(p) => {
                dst = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(p.ipi_addr.s_addr))));
                ifindex = u32::try_from(p.ipi_ifindex).unwrap_or(0);
            }
            ControlMessageOwned::Ipv6PacketInfo(p) => {
                dst = Some(IpAddr::V6(Ipv6Addr::from(p.ipi6_addr.s6_addr)));
                ifindex = p.ipi6_ifindex;
            }
            _ => {}
        }
    }
    Ok(Received {
        len: msg.bytes,
        src,
        dst,
        ifindex,
    })
}

impl Sockets {
    /// The IPv4 socket's descriptor (for `reading`'s registrations).
    pub(super) fn fd_v4(&self) -> Option<RawFd> {
        self.v4.as_ref().map(|f| f.sock.as_raw_fd())
    }

    /// The IPv6 socket's descriptor.
    pub(super) fn fd_v6(&self) -> Option<RawFd> {
        self.v6.as_ref().map(|f| f.sock.as_raw_fd())
    }

    /// Whether a datagram came from this link (`proto/beacon.md`, on-link checks): sent to one
    /// of our groups (not unicast), on an interface we joined, from a source on that link (IPv4:
    /// in one of the interface's subnets; IPv6: link-local; on a loopback link, loopback).
    /// `Err` says why not.
    pub(super) fn on_link(&self, r: &Received) -> Result<(), &'static str> {
        let groups = match r.src {
            SocketAddr::V4(_) => self.v4.as_ref().map(|f| &f.groups),
            SocketAddr::V6(_) => self.v6.as_ref().map(|f| &f.groups),
        };
        let to_group = r.dst.is_some_and(|d| groups.is_some_and(|g| g.contains(&d)));
        if !to_group {
            return Err("not sent to the beacon group (a unicast beacon)");
        }
        let Some(l) = self.links.values().find(|l| l.iface.index == r.ifindex) else {
            return Err("arrived on an interface the beacon has not joined");
        };
        let ok = match r.src.ip() {
            IpAddr::V4(a) => l.iface.reaches_v4(a) || (l.iface.loopback && a.is_loopback()),
            IpAddr::V6(a) => (a.segments()[0] & 0xffc0) == 0xfe80 || (l.iface.loopback && a.is_loopback()),
        };
        if ok {
            Ok(())
        } else {
            Err("source address not on the link it arrived on")
        }
    }
}
/// True when `a` was reached through a network or IPv6 scope in `ch`'s lost ones.
pub(super) fn lost(ch: &Changes, a: &SocketAddr) -> bool {
    match a {
        SocketAddr::V4(a) => ch.lost_nets.iter().any(|(n, m)| {
            let m = u32::from(*m);
            u32::from(*n) & m == u32::from(*a.ip()) & m
        }),
        SocketAddr::V6(a) => a.scope_id() != 0 && ch.lost_scopes.contains(&a.scope_id()),
    }
}
