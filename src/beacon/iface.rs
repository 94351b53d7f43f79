//! The interfaces the beacon can use: which are up, their addresses, and which to choose. Read
//! again on every re-scan (the beacon follows links that appear, go and come back).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use super::config::BeaconError;

/// `IFA_F_TENTATIVE`: the address is still in duplicate address detection (not usable yet).
const IFA_F_TENTATIVE: u32 = 0x40;
/// `IFA_F_DADFAILED`: duplicate address detection failed (never usable).
const IFA_F_DADFAILED: u32 = 0x08;

/// A network interface as the beacon sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub v4: Vec<Ipv4Addr>,
    /// The IPv4 networks of `v4`, as (address, netmask), for telling which peers a link reaches.
    pub v4_nets: Vec<(Ipv4Addr, Ipv4Addr)>,
    /// Has a usable IPv6 link-local address (needed to send IPv6 multicast): present and done
    /// with duplicate address detection.
    pub v6_link_local: bool,
    pub multicast: bool,
    pub loopback: bool,
}

impl Interface {
    /// True when `ip` is on one of this interface's IPv4 networks.
    pub fn reaches_v4(&self, ip: Ipv4Addr) -> bool {
        self.v4_nets.iter().any(|(a, m)| {
            let m = u32::from(*m);
            u32::from(*a) & m == u32::from(ip) & m
        })
    }
}

/// Interfaces that are up, with their addresses.
pub fn list_interfaces() -> Result<Vec<Interface>, BeaconError> {
    use nix::net::if_::InterfaceFlags as F;
    let ll_ok = usable_link_local_v6();
    let mut out: Vec<Interface> = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(BeaconError::Interfaces)? {
        if !ifa.flags.contains(F::IFF_UP) {
            continue;
        }
        let pos = match out.iter().position(|i| i.name == ifa.interface_name) {
            Some(p) => p,
            None => {
                let index = nix::net::if_::if_nametoindex(ifa.interface_name.as_str()).unwrap_or(0);
                out.push(Interface {
                    name: ifa.interface_name.clone(),
                    index,
                    v4: Vec::new(),
                    v4_nets: Vec::new(),
                    v6_link_local: index != 0 && ll_ok.contains(&index),
                    multicast: ifa.flags.contains(F::IFF_MULTICAST),
                    loopback: ifa.flags.contains(F::IFF_LOOPBACK),
                });
                out.len() - 1
            }
        };
        if let Some(v4) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) {
            let mask = ifa
                .netmask
                .as_ref()
                .and_then(|m| m.as_sockaddr_in())
                .map_or(Ipv4Addr::BROADCAST, |m| m.ip());
            out[pos].v4.push(v4.ip());
            out[pos].v4_nets.push((v4.ip(), mask));
        }
    }
    Ok(out)
}

/// Indexes of interfaces with an IPv6 link-local address that finished duplicate address
/// detection, from `/proc/net/if_inet6` (empty when IPv6 is off).
fn usable_link_local_v6() -> BTreeSet<u32> {
    read_proc_net("if_inet6")
        .map(|t| parse_if_inet6(&t))
        .unwrap_or_default()
}

/// Reads `/proc/thread-self/net/NAME`: the calling thread's network namespace (`/proc/net` is the
/// process's, which differs for a thread that entered another namespace); `/proc/net` on kernels
/// without `thread-self`.
fn read_proc_net(name: &str) -> std::io::Result<String> {
    std::fs::read_to_string(format!("/proc/thread-self/net/{name}"))
        .or_else(|_| std::fs::read_to_string(format!("/proc/net/{name}")))
}

/// Parses `/proc/net/if_inet6` lines: `ADDR32HEX IFINDEX PREFIXLEN SCOPE FLAGS NAME`.
fn parse_if_inet6(text: &str) -> BTreeSet<u32> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 6 || !f[0].to_ascii_lowercase().starts_with("fe8") {
                return None;
            }
            let index = u32::from_str_radix(f[1], 16).ok()?;
            let flags = u32::from_str_radix(f[4], 16).ok()?;
            (flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED) == 0).then_some(index)
        })
        .collect()
}

/// The interfaces to use now, and the names still waited for. `names` empty: every up,
/// multicast-capable, non-loopback interface (none is waited for by name). Otherwise exactly
/// those named; the ones not up yet are returned as waiting.
pub fn choose_interfaces(all: &[Interface], names: &[String]) -> (Vec<Interface>, Vec<String>) {
    if names.is_empty() {
        let chosen = all.iter().filter(|i| i.multicast && !i.loopback).cloned().collect();
        return (chosen, Vec::new());
    }
    let mut chosen = Vec::new();
    let mut waiting = Vec::new();
    for n in names {
        match all.iter().find(|i| &i.name == n) {
            Some(i) => chosen.push(i.clone()),
            None => waiting.push(n.clone()),
        }
    }
    (chosen, waiting)
}

/// True when the IPv4 routing table sends 224.0.0.0 out of `iface` (a multicast route or a default
/// route on it). Without one, joins and sends may fail or leave by another interface.
pub fn has_multicast_route_v4(iface: &str) -> bool {
    let Ok(text) = read_proc_net("route") else {
        return true; // cannot tell: do not warn
    };
    let group = u32::from_le_bytes([224, 0, 0, 0]);
    text.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 8 || f[0] != iface {
            return false;
        }
        let (Ok(dest), Ok(mask)) = (u32::from_str_radix(f[1], 16), u32::from_str_radix(f[7], 16)) else {
            return false;
        };
        group & mask == dest & mask
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link-local address still in duplicate address detection (or failed it) does not count;
    /// one that finished does; global addresses are not link-local.
    #[test]
    fn tentative_link_local_addresses_are_not_usable() {
        let text = "\
fe800000000000000000000000000001 00000002 40 20 40 eth0
fe800000000000000000000000000002 00000003 40 20 80 eth1
fe800000000000000000000000000003 00000004 40 20 08 eth2
20010db8000000000000000000000001 00000005 40 00 80 eth3
00000000000000000000000000000001 00000001 80 10 80 lo
";
        assert_eq!(parse_if_inet6(text), BTreeSet::from([3]));
    }

    #[test]
    fn named_interfaces_that_are_missing_are_waited_for() {
        let i = |name: &str, loopback| Interface {
            name: name.into(),
            index: 1,
            v4: vec![],
            v4_nets: vec![],
            v6_link_local: true,
            multicast: true,
            loopback,
        };
        let all = [i("lo", true), i("eth0", false)];
        let (c, w) = choose_interfaces(&all, &[]);
        assert_eq!((c.len(), w.len()), (1, 0));
        let (c, w) = choose_interfaces(&all, &["wlan0".into(), "lo".into()]);
        assert_eq!(c.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(), ["lo"]);
        assert_eq!(w, ["wlan0"]);
        let mut e = i("eth0", false);
        e.v4_nets = vec![("10.1.2.3".parse().unwrap(), "255.255.255.0".parse().unwrap())];
        assert!(e.reaches_v4("10.1.2.200".parse().unwrap()));
        assert!(!e.reaches_v4("10.1.3.1".parse().unwrap()));
    }
}
