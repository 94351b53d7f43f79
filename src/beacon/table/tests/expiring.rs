//! Tests of the table: expiry: silence, answers over HTTP, and the cached earliest expiry.
use super::*;

#[tokio::test(start_paused = true)]
async fn an_answer_over_http_keeps_a_peer_whose_announces_are_lost() {
    let t = PeerTable::new(NodeId([0; 16]));
    let t0 = Instant::now();
    t.handle(src(2), &beacon(Kind::Announce, 2, 1000), t0);
    t.handle(src(3), &beacon(Kind::Announce, 3, 1000), t0);
    let (two, three) = (NodeId([2; 16]), NodeId([3; 16]));
    // Both go silent on the beacon; peer 2's store server answers the proxy at 2.5 s, and a
    // forger claims an answer for peer 3 from an address it never announced.
    t.answered(&two, src(2), t0 + Duration::from_millis(2500));
    t.answered(&three, src(9), t0 + Duration::from_millis(2500));
    let gone = t.expire(t0 + Duration::from_millis(3100));
    assert_eq!(gone.iter().map(|p| p.node).collect::<Vec<_>>(), vec![three]);
    assert!(
        t.get(&two).is_some(),
        "answered 2.5 s in: kept past 3 intervals of silence"
    );
    let gone = t.expire(t0 + Duration::from_millis(5600));
    assert_eq!(gone.iter().map(|p| p.node).collect::<Vec<_>>(), vec![two]);
    // An answer never brings back a peer that left.
    t.answered(&two, src(2), t0 + Duration::from_millis(5700));
    assert!(t.get(&two).is_none());
}

/// `next_expiry` (asked by the beacon's loop per datagram) is never later than the scan's
/// minimum (checked against the scan after every datagram of a steady hall, with peers joining,
/// refreshing with shorter or longer intervals, and leaving), and scans rarely; once the time
/// it said has come it is the scan's value again. (Red without the cache: one scan per call.)
#[tokio::test(start_paused = true)]
async fn next_expiry_is_never_late_and_scans_rarely() {
    let t = PeerTable::new(NodeId([0; 16]));
    let scan = |t: &PeerTable| t.lock().peers.values().map(Peer::expires_at).min();
    let mut calls = 0u64;
    for round in 0..20u32 {
        for i in 0..200u32 {
            tokio::time::advance(Duration::from_millis(1)).await;
            // Intervals from 1 s to 3 s; a few new peers each round; some leave.
            let id = if i % 50 == 0 { 1000 * (round + 1) + i } else { i };
            let mut b = wire::decode(&announce_of(id, None)).expect("decode");
            b.interval_ms = 1000 + (id * 37 + round * 11) % 2000;
            t.handle(ip(id), &encode(&b), Instant::now());
            if i % 70 == 0 {
                t.expire(Instant::now());
            }
            let (got, want) = (t.next_expiry(), scan(&t));
            calls += 1;
            if let Some(w) = want {
                let g = got.expect("some");
                assert!(g <= w, "late: {g:?} > {w:?} (round {round}, datagram {i})");
            }
        }
    }
    let scans = t.lock().expiry.scans;
    eprintln!("{calls} calls, {scans} scans");
    assert!(scans * 20 <= calls, "{scans} scans for {calls} calls");
    let due = t.next_expiry().expect("peers");
    tokio::time::advance(due.duration_since(Instant::now()) + EXPIRY_RESCAN).await;
    t.expire(Instant::now());
    assert_eq!(t.next_expiry(), scan(&t));
}
