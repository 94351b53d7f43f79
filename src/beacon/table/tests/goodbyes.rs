//! Tests of the table: goodbyes: secrets, signatures, replays and the signature-check budget.
use super::*;

/// `id`'s node's datagram of `kind` with sequence number `seq`, bound to its key (a goodbye
/// signed by it).
fn datagram_of(id: &identity::Identity, seq: u32, kind: Kind) -> Vec<u8> {
    let node = id.node();
    let mut b = encode(&Beacon {
        kind,
        seq,
        ..wire::decode(&claim(node, node.0, 1000)).expect("decode")
    });
    if kind == Kind::Goodbye {
        id.sign_datagram(&mut b);
    }
    b
}

/// A goodbye needs the secret whose commitment the announces carried; a forged one (from the
/// peer's own address even) is ignored.
#[tokio::test(start_paused = true)]
async fn only_the_committed_secret_says_goodbye() {
    let t = PeerTable::new(NodeId([0; 16]));
    let now = Instant::now();
    let secret = [9u8; 16];
    assert!(matches!(
        t.handle(ip(1), &announce_of(1, Some(wire::commitment(&secret))), now),
        Outcome::Joined(_)
    ));
    let bye = |proof: Option<[u8; 16]>| {
        let mut b = wire::decode(&announce_of(1, None)).expect("decode");
        b.kind = Kind::Goodbye;
        b.proof = proof;
        encode(&b)
    };
    assert!(matches!(t.handle(ip(1), &bye(None), now), Outcome::Ignored(..)));
    assert!(matches!(
        t.handle(ip(1), &bye(Some([8; 16])), now),
        Outcome::Ignored(..)
    ));
    assert_eq!(t.peers().len(), 1, "forged goodbyes leave the peer in");
    // Its commitment cannot be replaced by another announce under its node id either.
    assert!(matches!(
        t.handle(ip(2), &announce_of(1, Some([1; 16])), now),
        Outcome::Ignored(..)
    ));
    assert_eq!(t.peers()[0].http_addr(), ip(1));
    assert!(matches!(t.handle(ip(3), &bye(Some(secret)), now), Outcome::Left(_)));
    assert!(t.peers().is_empty());
}

/// A signed goodbye copied off the link cannot be replayed after the host's next announce
/// (review of issue #12): its sequence number must come after the last announce's.
/// (Red before: the replay removed the host from the table after each of its announces.)
#[tokio::test(start_paused = true)]
async fn a_signed_goodbye_cannot_be_replayed() {
    let t = PeerTable::new(NodeId([0; 16]));
    let id = identity::Identity::generate();
    let node = id.node();
    let at = |seq: u32, kind: Kind| datagram_of(&id, seq, kind);
    let h = src(1);
    let now = Instant::now();
    for seq in 1..=3 {
        t.handle(h, &at(seq, Kind::Announce), now);
    }
    // A link lost an address: the host said goodbye there (seq 4) and keeps announcing.
    let bye = at(4, Kind::Goodbye);
    assert!(matches!(t.handle(h, &bye, now), Outcome::Left(_)));
    t.handle(h, &at(5, Kind::Announce), now);
    assert!(matches!(t.handle(src(66), &bye, now), Outcome::Ignored(..)), "replayed");
    assert!(t.get(&node).is_some());
    // Wrapping sequence numbers.
    assert!(wire::seq_after(0, u32::MAX) && !wire::seq_after(u32::MAX, 0) && !wire::seq_after(7, 7));
}

/// Signed goodbyes are checked at most `MAX_SIGNATURE_CHECKS_PER_SEC` a second from all sources
/// together (review of issue #12: bad signatures under a host's real key, copied from its
/// `GET /identity` answer, from unlimited sources); the host's own goodbye a second later
/// counts. (Red without the bound: every bad signature was checked.)
#[tokio::test(start_paused = true)]
async fn bad_signatures_are_checked_at_a_bounded_rate() {
    let t = PeerTable::new(NodeId([0; 16]));
    let id = identity::Identity::generate();
    let mut now = Instant::now();
    t.handle(src(1), &datagram_of(&id, 1, Kind::Announce), now);
    let bye = datagram_of(&id, 2, Kind::Goodbye);
    let mut bad = bye.clone();
    let n = bad.len();
    bad[n - 1] ^= 1;
    let before = t.counters().rate_limited;
    for i in 0..1000u32 {
        assert!(matches!(t.handle(ip(i), &bad, now), Outcome::Ignored(..)));
    }
    let skipped = t.counters().rate_limited - before;
    assert_eq!(
        skipped,
        1000 - MAX_SIGNATURE_CHECKS_PER_SEC as u64,
        "checked at most the bound"
    );
    now += Duration::from_secs(1);
    assert!(matches!(t.handle(src(1), &bye, now), Outcome::Left(_)));
}

/// Issue #25: after a host left with its signed goodbye, its older announces replayed from its
/// address re-created the entry (and the proxy sent the next occupant of the address requests).
/// The goodbye's sequence number is remembered: an announce not after it is a replay, ignored;
/// peer exchange does not bring the node back either; an announce after it is the host back.
#[tokio::test(start_paused = true)]
async fn announces_replayed_after_a_goodbye_do_not_bring_the_host_back() {
    let t = PeerTable::new(NodeId([0; 16]));
    let id = identity::Identity::generate();
    let node = id.node();
    let at = |seq: u32, kind: Kind| datagram_of(&id, seq, kind);
    let h = src(1);
    let mut now = Instant::now();
    let recorded: Vec<Vec<u8>> = (1..=3).map(|seq| at(seq, Kind::Announce)).collect();
    for a in &recorded {
        t.handle(h, a, now);
    }
    assert!(matches!(t.handle(h, &at(4, Kind::Goodbye), now), Outcome::Left(_)));
    for a in &recorded {
        now += Duration::from_millis(100);
        assert!(
            matches!(t.handle(h, a, now), Outcome::Ignored(_, IgnoreReason::Replayed)),
            "a replay"
        );
    }
    assert!(t.get(&node).is_none(), "the host stays gone");
    assert!(
        !t.learn(node, h, 0, Duration::from_secs(1), None, now),
        "not on hearsay either"
    );
    assert!(
        matches!(t.handle(h, &at(5, Kind::Announce), now), Outcome::Joined(_)),
        "back"
    );
    // The memory is bounded (LRU).
    let mut g = t.lock();
    for i in 0..departed::MAX_DEPARTED as u32 + 10 {
        g.departed.left(id_of(i), 1);
    }
    assert_eq!(g.departed.len(), departed::MAX_DEPARTED);
}
