//! The store server's connection limits: a cap that follows the open-file limit, so the proxy in
//! the same process always keeps descriptors, a share per client address, and how long a
//! connection may sit idle.

use std::time::Duration;

use crate::http::ConnLimits;

/// Store-server connections at most; a low open-file limit lowers it ([`connection_limits`]).
pub const MAX_CONNECTIONS: usize = 1024;
/// Fewest store-server connections, however low the open-file limit.
const MIN_CONNECTIONS: usize = 16;
/// Open files kept out of the store server's connection cap: the proxy's listener and its
/// upstream and peer connections get at least as many as the store server, after this reserve
/// for daemon connections, NAR files being read, spool files, beacon sockets and the binary.
pub const FD_RESERVE: u64 = 256;
/// Connections per client address (IPv6: per /64): a Nix client opens up to 25
/// (`http-connections`), a benchmark 64; past it, the address's own oldest idle connection is
/// closed.
pub const MAX_CONNECTIONS_PER_ADDR: usize = 64;
/// Request headers must arrive within this time (LAN clients send them at once); also the
/// longest a kept-alive connection may sit idle.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The store server's connection limits under an open-file limit of `nofile`: half of what is
/// left after [`FD_RESERVE`], so the proxy on the same process can never be starved of
/// descriptors by LAN clients.
pub fn connection_limits(nofile: Option<u64>) -> ConnLimits {
    let max = match nofile {
        Some(n) => (n.saturating_sub(FD_RESERVE) / 2).clamp(MIN_CONNECTIONS as u64, MAX_CONNECTIONS as u64) as usize,
        None => MAX_CONNECTIONS,
    };
    ConnLimits {
        max,
        per_addr: MAX_CONNECTIONS_PER_ADDR.min(max),
        header_timeout: HEADER_TIMEOUT,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_cap_leaves_descriptors_for_the_proxy() {
        for (nofile, want) in [
            (None, MAX_CONNECTIONS),
            (Some(1024), 384),
            (Some(4096), 1024),
            (Some(524_288), 1024),
            (Some(300), 22),
            (Some(256), MIN_CONNECTIONS),
            (Some(0), MIN_CONNECTIONS),
        ] {
            let l = connection_limits(nofile);
            assert_eq!(l.max, want, "{nofile:?}");
            assert!(l.per_addr <= l.max);
            if let Some(n) = nofile.filter(|&n| n >= 2 * FD_RESERVE) {
                // What the store server may hold leaves at least as much for the rest.
                assert!(l.max as u64 <= n - FD_RESERVE - l.max as u64, "{n}");
            }
        }
    }
}
