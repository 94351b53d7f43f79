//! Tests of the table: a node id announced from another address: moves, pinning, bound ids.
use super::*;

/// Node-id hijack: another host announcing a live peer's id with its commitment (both are in
/// every announce) from its own address moves the entry only until the peer's next announce,
/// which undoes the move and pins the id to its address; later claims from other addresses are
/// ignored while the peer is alive. A real move (the old address falls silent) stays.
#[tokio::test(start_paused = true)]
async fn a_node_id_announced_from_another_address_does_not_take_the_entry() {
    let t = PeerTable::new(NodeId([0; 16]));
    let (node, _) = wire::bound_identity();
    let a = claim(node, node.0, 1000);
    let (honest, attacker) = (src(1), src(66));
    let mut now = Instant::now();
    for _ in 0..ESTABLISHED_ANNOUNCES {
        t.handle(honest, &a, now);
        now += Duration::from_millis(300);
    }
    assert!(t.get(&node).is_some_and(|p| p.established()));
    // The first claim from elsewhere looks like a move.
    t.handle(attacker, &a, now);
    assert_eq!(t.get(&node).map(|p| p.http_addr()), Some(attacker));
    // The honest host announces again from its address: it never moved.
    now += Duration::from_millis(500);
    assert!(matches!(t.handle(honest, &a, now), Outcome::Refreshed(_)));
    let p = t.get(&node).expect("entry");
    assert_eq!((p.addrs.clone(), p.hold.pinned()), (vec![honest], true));
    // Further claims, from that address or any other, are ignored while it is alive.
    for (i, from) in [attacker, src(67), src(68)].into_iter().enumerate() {
        now += Duration::from_millis(100);
        assert!(matches!(t.handle(from, &a, now), Outcome::Ignored(..)), "claim {i}");
        assert_eq!(t.get(&node).map(|p| p.addrs), Some(vec![honest]));
    }
    assert!(t.counters().contested >= 4);
    // A pinned node that really moves: its old address silent for 1.5 intervals, it is taken.
    now += Duration::from_millis(1600);
    let new = src(2);
    assert!(matches!(t.handle(new, &a, now), Outcome::Refreshed(_)));
    assert_eq!(t.get(&node).map(|p| p.http_addr()), Some(new));

    // An unpinned node's move (a new lease) is taken at once, and stays: the address it left
    // stays silent.
    let (other, _) = wire::bound_identity();
    let b = claim(other, other.0, 1000);
    for _ in 0..ESTABLISHED_ANNOUNCES {
        t.handle(src(3), &b, now);
    }
    t.handle(src(4), &b, now);
    assert_eq!(t.get(&other).map(|p| p.http_addr()), Some(src(4)));
    for _ in 0..5 {
        now += Duration::from_millis(1000);
        t.handle(src(4), &b, now);
    }
    let p = t.get(&other).expect("entry");
    assert_eq!(
        (p.http_addr(), p.hold.moved().is_none(), p.hold.pinned()),
        (src(4), true, false)
    );
}

/// A forger who announces a node's id first, with a commitment of its own, holds the entry only
/// until the node's own announce arrives: the node's id is its commitment (bound), the forger's
/// claim is not, and a bound claim takes an unbound entry over; the forger's announces are then
/// ignored. Against a bound entry, an unbound claim never wins.
#[tokio::test(start_paused = true)]
async fn a_bound_node_id_cannot_be_kept_by_a_forger_with_another_commitment() {
    let t = PeerTable::new(NodeId([0; 16]));
    let (node, _) = wire::bound_identity();
    let now = Instant::now();
    let forged = claim(node, [9; 16], 1000);
    for _ in 0..ESTABLISHED_ANNOUNCES {
        t.handle(src(66), &forged, now);
    }
    assert!(t.get(&node).is_some_and(|p| p.established() && !p.bound()));
    assert!(matches!(
        t.handle(src(1), &claim(node, node.0, 1000), now),
        Outcome::Refreshed(_)
    ));
    let p = t.get(&node).expect("entry");
    assert_eq!((p.http_addr(), p.bound()), (src(1), true));
    assert!(matches!(t.handle(src(66), &forged, now), Outcome::Ignored(..)));
    assert_eq!(t.get(&node).map(|p| p.http_addr()), Some(src(1)));
}
