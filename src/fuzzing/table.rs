//! Invariants of the peer table fed a sequence of datagrams, peer-exchange entries, proofs,
//! answers and expiries.
//!
//! Input: steps of `[op, source, time step, length]` and `length` bytes. After every step: at
//! most `MAX_PEERS` entries and `MAX_PEERS_PER_ADDR` at any address, never our own id, every
//! entry lists an address, every datagram counted, a join is in the table, and a node that left
//! with a goodbye comes back only with a newer sequence number (no replay; once back, its
//! goodbye is forgotten, as the table does).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::time::Instant;

use crate::beacon::identity::Identity;
use crate::beacon::table::{Outcome, PeerTable, MAX_PEERS, MAX_PEERS_PER_ADDR};
use crate::beacon::wire::{self, Beacon, Kind, NodeId, SECRET_LEN};

/// Six keyed nodes (signed goodbyes), one bound by a goodbye secret, and our own id.
struct Cast {
    keyed: Vec<Identity>,
    bound: (NodeId, [u8; SECRET_LEN]),
    own: NodeId,
}

fn cast() -> &'static Cast {
    static CAST: OnceLock<Cast> = OnceLock::new();
    CAST.get_or_init(|| Cast {
        keyed: (0..6).map(|_| Identity::generate()).collect(),
        bound: wire::bound_identity(),
        own: NodeId([0xee; 16]),
    })
}

fn node(i: u8) -> NodeId {
    let c = cast();
    match i % 8 {
        6 => c.bound.0,
        7 => c.own,
        k => c.keyed[k as usize].node(),
    }
}

fn source(i: u8) -> SocketAddr {
    match i % 8 {
        6 | 7 => SocketAddr::V6(SocketAddrV6::new(
            format!("fe80::{}", i % 8 - 5).parse().expect("an address"),
            8381,
            0,
            2,
        )),
        k => SocketAddr::from(([10, 0, 0, 1 + k], 8381)),
    }
}

fn at(p: &[u8], i: usize) -> u8 {
    p.get(i).copied().unwrap_or(0)
}

fn beacon(kind: Kind, p: &[u8]) -> Beacon {
    let n = node(at(p, 0));
    Beacon {
        kind,
        flags: wire::FLAG_NAR_NONE,
        node: n,
        port: 8380 + u16::from(at(p, 1) % 2),
        interval_ms: 100 + 50 * u32::from(at(p, 7)),
        seq: u32::from(at(p, 2)),
        hostname: None,
        summary: (at(p, 5) % 2 == 1).then(|| u64::from(at(p, 6))),
        commitment: match at(p, 3) % 3 {
            0 => None,
            1 => Some(n.0),
            _ => Some([at(p, 4); 16]),
        },
        proof: None,
    }
}

/// A goodbye of node `p[0]`, signed when keyed, with the secret when bound.
fn goodbye(p: &[u8]) -> Vec<u8> {
    let c = cast();
    let mut b = beacon(Kind::Goodbye, p);
    b.commitment = None;
    if b.node == c.bound.0 {
        b.proof = Some(c.bound.1);
    }
    let mut bytes = wire::encode(&b);
    if let Some(id) = c.keyed.iter().find(|k| k.node() == b.node) {
        id.sign_datagram(&mut bytes);
    }
    bytes
}

pub fn check(data: &[u8]) {
    let c = cast();
    let t = PeerTable::new(c.own);
    let mut now = Instant::now();
    let mut handled = 0u64;
    let mut departed: HashMap<NodeId, u32> = HashMap::new();
    let mut rest = data;
    while let [op, src, dt, len, tail @ ..] = rest {
        let (p, next) = tail.split_at((*len as usize).min(tail.len()));
        rest = next;
        now += Duration::from_millis(50 * u64::from(*dt));
        let src = source(*src);
        let datagram = match op % 8 {
            0 => Some(p.to_vec()),
            1 | 2 => Some(wire::encode(&beacon(Kind::Announce, p))),
            3 => Some(goodbye(p)),
            4 => {
                let b = beacon(Kind::Announce, p);
                let addr = SocketAddr::new(src.ip(), b.port);
                t.learn(
                    b.node,
                    addr,
                    b.flags,
                    Duration::from_millis(b.interval_ms.into()),
                    b.summary,
                    now,
                );
                None
            }
            5 => {
                let holder = (at(p, 0) % 9 < 8).then(|| node(at(p, 0)));
                t.proof_result(SocketAddr::new(src.ip(), 8380), holder, now);
                None
            }
            6 => {
                t.expire(now);
                None
            }
            _ => {
                t.answered(&node(at(p, 0)), SocketAddr::new(src.ip(), 8380), now);
                None
            }
        };
        if let Some(d) = datagram {
            handled += 1;
            match t.handle(src, &d, now) {
                Outcome::Joined(b) => assert!(t.get(&b.node).is_some(), "joined but not listed"),
                Outcome::Left(b) => {
                    assert!(t.get(&b.node).is_none(), "left but still listed");
                    departed.insert(b.node, b.seq);
                }
                _ => {}
            }
        }
        let peers = t.peers();
        assert!(peers.len() <= MAX_PEERS);
        assert_eq!(t.counters().received, handled, "a datagram not counted");
        let mut at_ip: HashMap<IpAddr, usize> = HashMap::new();
        for p in &peers {
            assert_ne!(p.node, c.own, "our own id in the table");
            assert!(!p.addrs.is_empty(), "an entry without an address");
            let mut ips: Vec<IpAddr> = p.addrs.iter().map(SocketAddr::ip).collect();
            ips.sort();
            ips.dedup();
            for ip in ips {
                *at_ip.entry(ip).or_default() += 1;
            }
            if let Some(left) = departed.remove(&p.node) {
                // Back with a newer number: its goodbye is forgotten (`table::departed`), as is
                // any entry's past once it expires.
                assert!(
                    wire::seq_after(p.seq, left),
                    "{} back with seq {} after its goodbye at {left}",
                    p.node,
                    p.seq
                );
            }
        }
        if let Some((ip, n)) = at_ip.iter().find(|(_, n)| **n > MAX_PEERS_PER_ADDR) {
            panic!("{n} entries list {ip}");
        }
    }
}
