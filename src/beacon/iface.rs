//! The interfaces the beacon can use: which are up, their addresses, and which to choose.

use std::net::Ipv4Addr;

use super::BeaconError;

/// A network interface as the beacon sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub v4: Vec<Ipv4Addr>,
    /// Has an IPv6 link-local address (needed to send IPv6 multicast).
    pub v6_link_local: bool,
    pub multicast: bool,
    pub loopback: bool,
}

/// Interfaces that are up, with their addresses.
pub fn list_interfaces() -> Result<Vec<Interface>, BeaconError> {
    use nix::net::if_::InterfaceFlags as F;
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
                    v6_link_local: false,
                    multicast: ifa.flags.contains(F::IFF_MULTICAST),
                    loopback: ifa.flags.contains(F::IFF_LOOPBACK),
                });
                out.len() - 1
            }
        };
        if let Some(addr) = ifa.address {
            if let Some(v4) = addr.as_sockaddr_in() {
                out[pos].v4.push(v4.ip());
            } else if let Some(v6) = addr.as_sockaddr_in6() {
                if (v6.ip().segments()[0] & 0xffc0) == 0xfe80 {
                    out[pos].v6_link_local = true;
                }
            }
        }
    }
    Ok(out)
}

/// The interfaces to use: those named, or every up, multicast-capable, non-loopback one.
pub fn choose_interfaces(all: &[Interface], names: &[String]) -> Result<Vec<Interface>, BeaconError> {
    if names.is_empty() {
        let chosen: Vec<Interface> = all.iter().filter(|i| i.multicast && !i.loopback).cloned().collect();
        if chosen.is_empty() {
            return Err(BeaconError::NoInterface(
                " (no up, multicast-capable, non-loopback interface)".into(),
            ));
        }
        return Ok(chosen);
    }
    names
        .iter()
        .map(|n| {
            all.iter()
                .find(|i| &i.name == n)
                .cloned()
                .ok_or_else(|| BeaconError::UnknownInterface(n.clone()))
        })
        .collect()
}

/// True when the IPv4 routing table sends 224.0.0.0 out of `iface` (a multicast route or a default
/// route on it). Without one, joins and sends may fail or leave by another interface.
pub fn has_multicast_route_v4(iface: &str) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/net/route") else {
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
