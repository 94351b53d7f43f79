//! The conference hall at a scale a test can afford (issue: 500 hosts on one link): many peers,
//! one holder of each path. In-process fake peers on loopback addresses, publishing content
//! summaries as store servers do; the proxy must find the one holder on the first lookup with
//! few requests, instead of asking a fixed few.

use std::sync::Arc;
use std::time::Duration;

use crate::common::fake::*;
use crate::common::{get, wait_until};

const PEERS: u8 = 48;
const PATHS: usize = 24;

/// Each path is held by exactly one peer, the holders spread over the whole table.
fn hall(rig: &Rig, with_summaries: bool) -> Vec<FakePath> {
    let paths: Vec<FakePath> = (0..PATHS)
        .map(|i| FakePath::new(&format!("p{i}"), 2000, i as u8))
        .collect();
    for id in 1..=PEERS {
        let c = Arc::new(FakeCache::default());
        // Peers 2, 4, 6, ... hold one path each: half the hall has nothing we want.
        if id % 2 == 0 {
            c.serve_path(&paths[(id as usize / 2 - 1) % PATHS]);
        }
        if with_summaries {
            rig.peer_with_summary(c, id);
        } else {
            rig.peer(c, id);
        }
    }
    paths
}

/// With summaries: every path is found on its first lookup, from its one holder, asking about
/// one peer per lookup.
#[test]
fn one_holder_among_many_is_found_with_few_requests() {
    let rig = Rig::new();
    let paths = hall(&rig, true);
    let (proxy, px) = rig.proxy(vec![]);
    // The proxy fetches every peer's summary first (a newcomer learns the hall).
    wait_until(
        "every summary fetched",
        Duration::from_secs(20),
        Duration::from_millis(50),
        || px.status().peers.iter().filter(|p| p.summary.is_some()).count() >= PEERS as usize,
    );
    for p in &paths {
        assert_eq!(get(proxy, &format!("/{}.narinfo", p.hash())).status, 200, "{}", p.path);
        let nar = get(proxy, &p.nar_url());
        assert_eq!(nar.status, 200);
        assert!(nar.body == p.nar);
    }
    let s = px.stats();
    assert_eq!(s.narinfo_hits_peer, PATHS as u64);
    let per_lookup = s.narinfo_peer_requests as f64 / PATHS as f64;
    assert!(per_lookup <= 2.0, "{per_lookup} peer requests per lookup ({s:?})");
    // A miss asks no peer at all.
    let before = px.stats().narinfo_peer_requests;
    assert_eq!(get(proxy, &format!("/{:0>32}.narinfo", 9)).status, 404);
    assert_eq!(
        px.stats().narinfo_peer_requests,
        before,
        "a path no summary holds asks no peer"
    );
}

/// Without summaries (an older hall): the fan-out is a random sample, not the same peers every
/// time, so over a few lookups every peer is asked (a fixed fan-out never asks a holder outside
/// its first 16).
#[test]
fn without_summaries_the_fan_out_rotates() {
    let rig = Rig::new();
    let caches: Vec<Arc<FakeCache>> = (1..=PEERS)
        .map(|id| {
            let c = Arc::new(FakeCache::default());
            rig.peer(c.clone(), id);
            c
        })
        .collect();
    let (proxy, _) = rig.proxy(vec![]);
    for i in 0..20 {
        assert_eq!(get(proxy, &format!("/{:0>32}.narinfo", i)).status, 404);
    }
    let asked = caches.iter().filter(|c| c.requests_for(".narinfo") > 0).count();
    assert!(asked > 40, "only {asked} of {PEERS} peers were ever asked");
}

/// Hostile hall: peers whose summaries claim paths they do not serve cannot keep the one honest
/// holder from being asked (claims beyond the first wave come next), and once their claims keep
/// failing they are no longer believed, so lookups cost few requests again.
#[test]
fn lying_summaries_cannot_hide_the_honest_holder() {
    const LIARS: u8 = 8;
    const N: usize = 40;
    let rig = Rig::new();
    let paths: Vec<FakePath> = (0..N)
        .map(|i| FakePath::new(&format!("q{i}"), 1000, 100 + i as u8))
        .collect();
    let keys: Vec<u64> = paths
        .iter()
        .map(|p| local_nix_cache::summary::key(&p.path.hash()))
        .collect();
    for id in 1..=LIARS {
        let liar = Arc::new(FakeCache::default());
        liar.set(
            "/summary",
            Reply::ok(local_nix_cache::summary::encode_full(1, &keys).expect("summary")),
        );
        rig.peer_with_announced_summary(liar, id, 1);
    }
    let honest = Arc::new(FakeCache::default());
    for p in &paths {
        honest.serve_path(p);
    }
    rig.peer_with_summary(honest, 100);
    let (proxy, px) = rig.proxy(vec![]);
    wait_until(
        "every summary fetched",
        Duration::from_secs(20),
        Duration::from_millis(50),
        || px.status().peers.iter().filter(|p| p.summary.is_some()).count() > LIARS as usize,
    );
    let mut before_last = 0;
    for (i, p) in paths.iter().enumerate() {
        if i == N - 10 {
            before_last = px.stats().narinfo_peer_requests;
        }
        assert_eq!(get(proxy, &format!("/{}.narinfo", p.hash())).status, 200, "{}", p.path);
    }
    let last10 = px.stats().narinfo_peer_requests - before_last;
    assert!(last10 <= 40, "{last10} peer requests for the last 10 lookups");
    let distrusted = px
        .status()
        .peers
        .iter()
        .filter(|p| p.health.claims_broken > 0 && p.health.claims_kept == 0)
        .count();
    assert!(distrusted >= LIARS as usize / 2, "{distrusted} liars caught");
}

/// Peers that announce a summary the proxy cannot fetch (an overloaded host, a firewall) say
/// nothing about where a path is: the fan-out must not shrink to the small sample it takes when
/// other summaries are held, or a holder among them is almost never asked. Over 20 lookups
/// nearly every peer is asked (with the old rule: 2 per lookup, at most 40 of 48).
#[test]
fn summaries_announced_but_not_fetched_do_not_narrow_the_fan_out() {
    let rig = Rig::new();
    let caches: Vec<Arc<FakeCache>> = (1..=PEERS)
        .map(|id| {
            let c = Arc::new(FakeCache::default());
            // Announces version 1; its GET /summary answers 404.
            rig.peer_with_announced_summary(c.clone(), id, 1);
            c
        })
        .collect();
    let (proxy, _) = rig.proxy(vec![]);
    for i in 0..20 {
        assert_eq!(get(proxy, &format!("/{:0>32}.narinfo", i)).status, 404);
    }
    let asked = caches.iter().filter(|c| c.requests_for(".narinfo") > 0).count();
    assert!(asked > 40, "only {asked} of {PEERS} peers were ever asked");
}

/// A peer whose store server answered this host's proxy is *useful*, and a full peer table keeps
/// it over new identities (`beacon::table`): the proxy's summary fetch, which checks that the
/// server names the node id, counts as an answer. A peer that announces a summary its server
/// does not name its node id for (a forged announce at someone's address) never does. (Red
/// with the summary fetch not telling the table: `answered` stays unset.)
#[test]
fn a_summary_fetch_naming_the_node_marks_the_peer_useful() {
    let rig = Rig::new();
    for id in 1..=4u8 {
        rig.peer_with_summary(Arc::new(FakeCache::default()), id);
    }
    // A forged announce of node 9 at peer 1's address: its server names node 1.
    let at = rig
        .table
        .get(&local_nix_cache::beacon::wire::NodeId([1; 16]))
        .expect("peer 1")
        .http_addr();
    let forged = local_nix_cache::beacon::wire::NodeId([9; 16]);
    let b = crate::common::forge::announce(forged, at.port())
        .flags(1)
        .summary(Some(1))
        .encode();
    rig.table.handle(at, &b, tokio::time::Instant::now());
    let (_, px) = rig.proxy(vec![]);
    wait_until(
        "every summary fetched",
        Duration::from_secs(20),
        Duration::from_millis(50),
        || px.status().peers.iter().filter(|p| p.summary.is_some()).count() >= 4,
    );
    for id in 1..=4u8 {
        let p = rig
            .table
            .get(&local_nix_cache::beacon::wire::NodeId([id; 16]))
            .expect("peer");
        assert!(p.answered.is_some(), "peer {id} not marked as answered");
    }
    assert!(rig.table.get(&forged).is_some_and(|p| p.answered.is_none()));
}

/// A holder whose summary the proxy does not hold (it publishes none, or the proxy has not
/// fetched it yet: a newcomer's first second, when only some summaries came) is asked whenever
/// no held summary claims the path. Before, once any summary was held, a lookup took only a
/// sample of 2 such peers: it missed the holder, answered Nix "not found" in a few ms and
/// remembered the miss (the crowd test's 1-in-10 flake: `crowd_mechanism`, a host's first
/// lookup a second after it started). Here each of 8 paths is held by one of 8 peers without a
/// summary, beside 4 with summaries: with the old sample, each lookup found its holder 1 time
/// in 4.
#[test]
fn a_holder_whose_summary_is_not_held_is_asked_when_no_summary_claims_the_path() {
    let rig = Rig::new();
    let paths: Vec<FakePath> = (0..8u8)
        .map(|i| FakePath::new(&format!("u{i}"), 1000, 200 + i))
        .collect();
    for (id, p) in (1..).zip(&paths) {
        let c = Arc::new(FakeCache::default());
        c.serve_path(p);
        rig.peer(c, id);
    }
    for id in 9..=12u8 {
        rig.peer_with_summary(Arc::new(FakeCache::default()), id);
    }
    let (proxy, px) = rig.proxy(vec![]);
    wait_until(
        "the published summaries fetched",
        Duration::from_secs(20),
        Duration::from_millis(50),
        || px.status().peers.iter().filter(|p| p.summary.is_some()).count() >= 4,
    );
    for p in &paths {
        let r = get(proxy, &format!("/{}.narinfo", p.hash()));
        assert_eq!(r.status, 200, "{} ({:?})", p.path, px.stats());
    }
}
