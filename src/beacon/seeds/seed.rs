//! One `--peer HOST[:PORT]` value, parsed at the edge: an IP address or a checked host name,
//! and a port (8380 when none is given).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

/// The store server's port when a seed names none (`serve`'s default `--listen` port).
pub const DEFAULT_SEED_PORT: u16 = 8380;

/// The host part of a seed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SeedHost {
    Ip(IpAddr),
    /// A DNS name (checked: labels of letters, digits and `-`), lower case.
    Name(String),
}

/// One `--peer HOST[:PORT]` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seed {
    pub host: SeedHost,
    pub port: u16,
}

impl fmt::Display for Seed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            SeedHost::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            SeedHost::Ip(ip) => write!(f, "{ip}:{}", self.port),
            SeedHost::Name(n) => write!(f, "{n}:{}", self.port),
        }
    }
}

/// Why a `--peer` value is not `HOST[:PORT]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SeedParseError {
    #[error("empty")]
    Empty,
    #[error("port {0:?} is not a number from 1 to 65535")]
    Port(String),
    #[error(
        "{0:?} is neither an IP address nor a host name (expected HOST[:PORT], e.g. 10.0.0.5 or cache.example:8380)"
    )]
    Host(String),
}

/// A host name: labels of 1-63 letters, digits or `-` (not at either end), at most 253 bytes,
/// and not all-numeric at the end (that is a mistyped IPv4 address).
fn valid_name(s: &str) -> bool {
    let labels_ok = s.split('.').all(|l| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    });
    let numeric_tld = s
        .rsplit('.')
        .next()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
    (1..=253).contains(&s.len()) && labels_ok && !numeric_tld
}

fn port(p: &str) -> Result<u16, SeedParseError> {
    match p.parse::<u16>() {
        Ok(n) if n != 0 => Ok(n),
        _ => Err(SeedParseError::Port(p.to_owned())),
    }
}

impl FromStr for Seed {
    type Err = SeedParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(SeedParseError::Empty);
        }
        let bad_host = || SeedParseError::Host(s.to_owned());
        // `[v6]` or `[v6]:port`.
        if let Some(rest) = s.strip_prefix('[') {
            let (ip, after) = rest.split_once(']').ok_or_else(bad_host)?;
            let ip: std::net::Ipv6Addr = ip.parse().map_err(|_| bad_host())?;
            let port = match after {
                "" => DEFAULT_SEED_PORT,
                a => port(a.strip_prefix(':').ok_or_else(bad_host)?)?,
            };
            return Ok(Self {
                host: SeedHost::Ip(ip.into()),
                port,
            });
        }
        // A bare address (IPv6 has colons of its own).
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Self {
                host: SeedHost::Ip(ip),
                port: DEFAULT_SEED_PORT,
            });
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => (h, port(p)?),
            None => (s, DEFAULT_SEED_PORT),
        };
        let host = if let Ok(ip) = host.parse::<Ipv4Addr>() {
            SeedHost::Ip(ip.into())
        } else if valid_name(host) {
            SeedHost::Name(host.to_ascii_lowercase())
        } else {
            return Err(bad_host());
        };
        Ok(Self { host, port })
    }
}
