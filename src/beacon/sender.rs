//! The beacons this host sends ([`Sender`]: announce, query, goodbye, signed when the node has a
//! key) and the traffic budget that stretches the announce interval as the hall grows.

use std::sync::Arc;
use std::time::Duration;

use super::config::Announce;
use super::identity::Identity;
use super::membership::Sockets;
use super::wire::{self, Beacon as Datagram, Kind, NodeId};

/// Bytes per second that the periodic announces of the whole hall may take on a link (IP and UDP
/// headers included), like RTCP's report budget: each host stretches its interval so that
/// (hosts x its bytes per round) / interval stays within it. 6 KB/s leaves 2 KB/s of the 8 KB/s
/// beacon budget for queries, their answers and start-up bursts.
pub const ANNOUNCE_BUDGET_BYTES_PER_SEC: u64 = 6_000;
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

/// Builds the beacons this host sends.
pub(super) struct Sender {
    node: NodeId,
    /// This node's key, when its id is the key's hash: announces then carry the id as their
    /// commitment (older receivers see a bound id), goodbyes are signed instead of carrying a
    /// secret.
    identity: Option<Arc<Identity>>,
    announce: Option<Announce>,
    interval: Duration,
    seq: u32,
    /// Length of the last announce, for the traffic budget (the next one is the same size).
    last_len: usize,
}

impl Sender {
    pub(super) fn new(
        node: NodeId,
        identity: Option<Arc<Identity>>,
        announce: Option<Announce>,
        interval: Duration,
    ) -> Self {
        Self {
            node,
            identity,
            announce,
            interval,
            seq: 0,
            last_len: wire::HEADER_LEN,
        }
    }

    /// Whether this host announces (the `peers` tool only listens and queries).
    pub(super) fn announcing(&self) -> bool {
        self.announce.is_some()
    }

    /// The interval the periodic announces carry (stretched by [`Self::budget`]).
    pub(super) fn interval(&self) -> Duration {
        self.interval
    }

    pub(super) fn datagram(&mut self, kind: Kind) -> Vec<u8> {
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
    pub(super) fn budget(&mut self, configured: Duration, peers: usize, s: &Sockets) {
        self.interval = budgeted_interval(configured, peers + 1, s.round_bytes(self.last_len));
    }

    /// An announce (when announcing) and a query, on `only` or every link.
    pub(super) async fn hello(&mut self, s: &Sockets, only: Option<&[String]>) {
        if self.announce.is_some() {
            let a = self.datagram(Kind::Announce);
            s.send(&a, only).await;
        }
        let q = self.datagram(Kind::Query);
        s.send(&q, only).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
