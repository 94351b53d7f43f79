//! Tests of `table`: the shared helpers and the whole-table cases here, one file per noun
//! beside.
use super::*;
use std::net::IpAddr;

use crate::beacon::wire::{encode, DecodeError, FLAG_NAR_NONE};

mod caps;
mod contests;
mod expiring;
mod goodbyes;
mod moves;

/// A peer heard of through peer exchange is on probation until it announces; its own
/// announce replaces the listed address and sets its commitment; a known node is not
/// overwritten; a silent one expires after three of its (listed) intervals.
#[test]
fn a_peer_heard_of_is_replaced_by_its_own_announce() {
    let t = PeerTable::new(NodeId([0; 16]));
    let now = Instant::now();
    let bogus = SocketAddr::from(([10, 0, 0, 66], 8380));
    assert!(t.learn(NodeId([1; 16]), bogus, 0, Duration::from_secs(5), None, now));
    assert!(
        !t.learn(NodeId([1; 16]), src(9), 0, Duration::from_secs(5), None, now),
        "known"
    );
    assert!(
        !t.learn(NodeId([0; 16]), src(9), 0, Duration::from_secs(5), None, now),
        "own"
    );
    let p = t.get(&NodeId([1; 16])).expect("learnt");
    assert_eq!((p.standing, p.established()), (Standing::Hearsay, false));
    let c = [5u8; 16];
    let a = encode(&Beacon {
        kind: Kind::Announce,
        flags: FLAG_NAR_NONE,
        node: NodeId([1; 16]),
        port: 8380,
        interval_ms: 5000,
        seq: 1,
        hostname: None,
        summary: None,
        commitment: Some(c),
        proof: None,
    });
    assert!(matches!(
        t.handle(src(1), &a, now + Duration::from_secs(1)),
        Outcome::Refreshed(_)
    ));
    let p = t.get(&NodeId([1; 16])).expect("still there");
    assert_eq!(
        p.addrs,
        [SocketAddr::new(src(1).ip(), 8380)],
        "the listed address is gone"
    );
    assert_eq!(p.commitment, Some(c));
    assert!(t.learn(NodeId([2; 16]), src(2), 0, Duration::from_secs(5), None, now));
    let gone = t.expire(now + Duration::from_secs(15));
    assert_eq!(gone.iter().map(|p| p.node).collect::<Vec<_>>(), [NodeId([2; 16])]);
}

/// A peer heard of through a list keeps the summary version its store server names (issue
/// #23: seed-learnt peers had none, so the proxy never fetched their summaries), updated by
/// each later answer at a listed address; once it announces, its beacons' version wins and an
/// HTTP answer no longer changes it.
#[test]
fn a_listed_peer_keeps_the_summary_version_its_server_names_until_it_announces() {
    let t = PeerTable::new(NodeId([0; 16]));
    let now = Instant::now();
    let at = SocketAddr::from(([10, 0, 0, 1], 8380));
    assert!(t.learn(NodeId([1; 16]), at, 0, Duration::from_secs(5), Some(7), now));
    assert_eq!(t.get(&NodeId([1; 16])).map(|p| p.summary), Some(Some(7)));
    t.heard_summary(&NodeId([1; 16]), at, Some(8));
    assert_eq!(t.get(&NodeId([1; 16])).map(|p| p.summary), Some(Some(8)));
    t.heard_summary(&NodeId([1; 16]), src(9), Some(99));
    assert_eq!(
        t.get(&NodeId([1; 16])).map(|p| p.summary),
        Some(Some(8)),
        "an address it is not listed with"
    );
    let mut a = announce_of(0, None);
    a = {
        let mut b = crate::beacon::wire::decode(&a).expect("decodes");
        b.node = NodeId([1; 16]);
        b.summary = Some(20);
        encode(&b)
    };
    assert!(matches!(t.handle(src(1), &a, now), Outcome::Refreshed(_)));
    t.heard_summary(&NodeId([1; 16]), src(1), Some(9));
    assert_eq!(
        t.get(&NodeId([1; 16])).map(|p| p.summary),
        Some(Some(20)),
        "its beacon's"
    );
}

fn beacon(kind: Kind, node: u8, interval_ms: u32) -> Vec<u8> {
    encode(&Beacon {
        kind,
        flags: FLAG_NAR_NONE,
        node: NodeId([node; 16]),
        port: 8380,
        interval_ms,
        seq: 1,
        hostname: Some(format!("host{node}")),
        summary: None,
        commitment: None,
        proof: None,
    })
}

/// An announce of node `id` (4 bytes, so thousands of distinct ids).
fn announce_of(id: u32, commitment: Option<[u8; 16]>) -> Vec<u8> {
    let mut node = [7u8; 16];
    node[..4].copy_from_slice(&id.to_be_bytes());
    encode(&Beacon {
        kind: Kind::Announce,
        flags: FLAG_NAR_NONE,
        node: NodeId(node),
        port: 8380,
        interval_ms: 1000,
        seq: 1,
        hostname: None,
        summary: Some(5),
        commitment,
        proof: None,
    })
}

fn ip(i: u32) -> SocketAddr {
    SocketAddr::from(([10, 1, (i >> 8) as u8, i as u8], 8380))
}

fn src(last: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, last], 8380))
}

#[tokio::test(start_paused = true)]
async fn join_refresh_expire_goodbye() {
    let t = PeerTable::new(NodeId([0; 16]));
    let now = Instant::now();
    assert!(matches!(
        t.handle(src(2), &beacon(Kind::Announce, 2, 1000), now),
        Outcome::Joined(_)
    ));
    assert!(matches!(
        t.handle(src(3), &beacon(Kind::Announce, 3, 1000), now),
        Outcome::Joined(_)
    ));
    assert!(matches!(
        t.handle(src(2), &beacon(Kind::Announce, 2, 1000), now),
        Outcome::Refreshed(_)
    ));
    assert_eq!(t.peers().len(), 2);
    assert_eq!(t.peers()[0].http_addr(), src(2));
    // Peer 3 keeps announcing, peer 2 goes silent: gone after three of its intervals.
    for s in 1..=3 {
        let at = now + Duration::from_millis(1000 * s - 1);
        t.handle(src(3), &beacon(Kind::Announce, 3, 1000), at);
        assert!(t.expire(at).is_empty(), "{s}");
    }
    let gone = t.expire(now + Duration::from_millis(3000));
    assert_eq!(gone.iter().map(|p| p.node).collect::<Vec<_>>(), vec![NodeId([2; 16])]);
    // A goodbye from another address does not remove peer 3; from its own it does, at once.
    let bye = beacon(Kind::Goodbye, 3, 1000);
    assert!(matches!(t.handle(src(9), &bye, now), Outcome::Ignored(..)));
    assert!(matches!(t.handle(src(3), &bye, now), Outcome::Left(_)));
    assert!(t.peers().is_empty());
    let c = t.counters();
    assert_eq!((c.expired, c.goodbyes), (1, 2));
}

/// A peer seen through a link that went away loses that address, and goes when it has no
/// other; after a wake-up, peers not heard since are dropped.
#[tokio::test(start_paused = true)]
async fn departed_links_and_wake_ups_drop_peers() {
    let t = PeerTable::new(NodeId([0; 16]));
    let now = Instant::now();
    let v6: SocketAddr = "[fe80::2%7]:8380".parse().expect("addr");
    t.handle(src(2), &beacon(Kind::Announce, 2, 1000), now);
    t.handle(v6, &beacon(Kind::Announce, 2, 1000), now);
    t.handle(src(3), &beacon(Kind::Announce, 3, 1000), now);
    let on_v4_link = |a: &SocketAddr| a.is_ipv4();
    let gone = t.forget_addrs(on_v4_link);
    assert_eq!(gone.iter().map(|p| p.node).collect::<Vec<_>>(), vec![NodeId([3; 16])]);
    let p2 = t.get(&NodeId([2; 16])).expect("peer 2 is still reachable over IPv6");
    assert_eq!(p2.addrs.len(), 1);
    assert!(p2.addrs[0].is_ipv6());
    let later = now + Duration::from_millis(500);
    t.handle(src(4), &beacon(Kind::Announce, 4, 1000), later);
    let gone = t.drop_unheard_since(later, |_| true);
    assert_eq!(gone.iter().map(|p| p.node).collect::<Vec<_>>(), vec![NodeId([2; 16])]);
    assert_eq!(t.peers().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn own_beacons_queries_and_garbage() {
    let t = PeerTable::new(NodeId([7; 16]));
    let now = Instant::now();
    assert!(matches!(
        t.handle(src(2), &beacon(Kind::Announce, 7, 1000), now),
        Outcome::Ignored(..)
    ));
    assert!(matches!(
        t.handle(src(2), &beacon(Kind::Query, 2, 1000), now),
        Outcome::Query(_)
    ));
    assert!(matches!(
        t.handle(src(2), b"short", now),
        Outcome::Invalid(DecodeError::TooShort(5))
    ));
    let mut v2 = beacon(Kind::Announce, 2, 1000);
    v2[4] = 2;
    assert!(matches!(
        t.handle(src(2), &v2, now),
        Outcome::Invalid(DecodeError::Version(2))
    ));
    assert!(t.peers().is_empty(), "a query does not add a peer");
    let c = t.counters();
    assert_eq!((c.own, c.queries, c.too_short, c.wrong_version), (1, 1, 1, 1));
}

/// An announce of the node id `node` with `commitment`, announcing `interval_ms`.
fn claim(node: NodeId, commitment: [u8; 16], interval_ms: u32) -> Vec<u8> {
    encode(&Beacon {
        kind: Kind::Announce,
        flags: FLAG_NAR_NONE,
        node,
        port: 8380,
        interval_ms,
        seq: 1,
        hostname: None,
        summary: Some(5),
        commitment: Some(commitment),
        proof: None,
    })
}

/// The node id `announce_of(id, ..)` announces.
fn id_of(id: u32) -> NodeId {
    let mut node = [7u8; 16];
    node[..4].copy_from_slice(&id.to_be_bytes());
    NodeId(node)
}

/// `summaries` lists what `peers` holds: every node id with its announced summary version.
#[tokio::test(start_paused = true)]
async fn summaries_list_every_peer_and_its_version() {
    let t = PeerTable::new(NodeId([0; 16]));
    let now = Instant::now();
    for i in 0..10 {
        t.handle(ip(i), &announce_of(i, None), now);
    }
    t.handle(src(1), &beacon(Kind::Announce, 1, 1000), now);
    let mut got = t.summaries();
    let mut want: Vec<(NodeId, Option<u64>)> = t.peers().iter().map(|p| (p.node, p.summary)).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    assert_eq!(got.len(), 11);
    assert!(got.iter().any(|(_, v)| v.is_none()) && got.iter().any(|(_, v)| v.is_some()));
}
