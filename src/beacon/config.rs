//! What the beacon is told: its groups, port, interfaces and what it announces
//! ([`BeaconConfig`], [`Announce`]), the defaults, and its error ([`BeaconError`]). A leaf: it
//! uses no other beacon module but the codec.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use super::wire;

pub const DEFAULT_PORT: u16 = 8380;
pub const DEFAULT_GROUP_V4: Ipv4Addr = Ipv4Addr::new(239, 255, 83, 80);
pub const DEFAULT_GROUP_V6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x8380);
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// Most interfaces joined at once; further ones are left waiting (with a warning in the states).
pub const MAX_LINKS: usize = 16;
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
    /// Store servers asked for the hall over HTTP (`--peer`), and their reported states.
    pub seeds: super::seeds::Seeds,
    /// Hosts that asked our store server for its peer list, asked back (`seeds::askers`).
    pub askers: super::seeds::askers::Askers,
}

impl Default for BeaconConfig {
    fn default() -> Self {
        Self {
            groups: vec![DEFAULT_GROUP_V4.into(), DEFAULT_GROUP_V6.into()],
            interfaces: Vec::new(),
            port: DEFAULT_PORT,
            announce: None,
            interval: DEFAULT_INTERVAL,
            seeds: super::seeds::Seeds::default(),
            askers: super::seeds::askers::Askers::default(),
        }
    }
}
