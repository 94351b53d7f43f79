//! The proxy against in-process fake peers and upstreams on loopback: honest, lying, broken and
//! slow. Each case: the right path still arrives when any honest source has it, wrong bytes are
//! never delivered as a complete response, and no request hangs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::fake::*;
use crate::common::{get, request, wait_for, wait_until};
use bytes::Bytes;
use local_nix_cache::beacon::wire::{NodeId, FLAG_NAR_NONE};

/// What a hostile peer does.
#[derive(Clone, Copy, Debug)]
enum Lie {
    BadSignature,
    UntrustedKey,
    OtherPath,
    MalformedNarinfo,
    ServerError,
    WrongNarBytes,
    TruncatedNar,
    StalledNar,
    EndlessNar,
}

impl Lie {
    /// Lies in the narinfo make the liar lose the race; lies in the NAR are found by the hash.
    fn in_narinfo(self) -> bool {
        matches!(
            self,
            Lie::BadSignature | Lie::UntrustedKey | Lie::OtherPath | Lie::MalformedNarinfo | Lie::ServerError
        )
    }
}

fn liar(p: &FakePath, lie: Lie) -> Arc<FakeCache> {
    let c = Arc::new(FakeCache::default());
    c.serve_path(p);
    let ni = format!("/{}.narinfo", p.hash());
    let nar = format!("/{}", p.info.url);
    match lie {
        Lie::BadSignature => {
            let mut info = p.info.clone();
            info.nar_size += 1; // signature no longer covers the fingerprint
            c.set(&ni, Reply::ok(info.render()));
        }
        Lie::UntrustedKey => {
            let mut info = p.info.clone();
            info.sigs = vec![untrusted_key().sign(&info.fingerprint())];
            c.set(&ni, Reply::ok(info.render()));
        }
        Lie::OtherPath => {
            let other = FakePath::new("other", 1000, 99);
            c.set(&ni, Reply::ok(other.info.render()));
        }
        Lie::MalformedNarinfo => c.set(&ni, Reply::ok("StorePath: nonsense\nNarHash: x\n")),
        Lie::ServerError => c.set(&ni, Reply::Status(500)),
        Lie::WrongNarBytes => {
            let mut bad = p.nar.to_vec();
            let mid = bad.len() / 2;
            bad[mid] ^= 0x55;
            c.set(&nar, Reply::ok(bad));
        }
        Lie::TruncatedNar => c.set(
            &nar,
            Reply::Truncated {
                body: p.nar.clone(),
                cut: p.nar.len() / 3,
            },
        ),
        Lie::StalledNar => c.set(
            &nar,
            Reply::Stall {
                body: p.nar.clone(),
                cut: p.nar.len() / 3,
            },
        ),
        Lie::EndlessNar => c.set(&nar, Reply::Endless),
    }
    c
}

/// Fetches narinfo then NAR through the proxy; returns (narinfo status, NAR status, NAR body).
fn fetch(proxy: std::net::SocketAddr, p: &FakePath) -> (u16, u16, Vec<u8>) {
    let ni = get(proxy, &format!("/{}.narinfo", p.hash()));
    if ni.status != 200 {
        return (ni.status, 0, Vec::new());
    }
    let text = String::from_utf8(ni.body).expect("utf8");
    assert!(text.contains("Compression: none\n"), "{text}");
    assert!(text.contains(&format!("NarHash: {}\n", p.info.nar_hash)), "{text}");
    assert!(text.contains("Sig: test-hydra-1:"), "signature kept: {text}");
    let url = text.lines().find_map(|l| l.strip_prefix("URL: ")).expect("URL");
    assert_eq!(format!("/{url}"), p.nar_url());
    let nar = get(proxy, &format!("/{url}"));
    (200, nar.status, nar.body)
}

#[test]
fn every_lie_loses_to_an_honest_peer_and_is_never_delivered_alone() {
    let p = FakePath::new("hello", 300_000, 1);
    for lie in [
        Lie::BadSignature,
        Lie::UntrustedKey,
        Lie::OtherPath,
        Lie::MalformedNarinfo,
        Lie::ServerError,
        Lie::WrongNarBytes,
        Lie::TruncatedNar,
        Lie::StalledNar,
        Lie::EndlessNar,
    ] {
        // With an honest peer (slower to answer, so the liar is asked first): the right bytes.
        let rig = Rig::new();
        rig.peer(liar(&p, lie), 1);
        let honest = Arc::new(FakeCache::default());
        honest.serve_path(&p);
        honest.set(
            &format!("/{}.narinfo", p.hash()),
            Reply::slow(p.info.render(), Duration::from_millis(100)),
        );
        rig.peer(honest, 2);
        let (proxy, px) = rig.proxy(vec![]);
        let t0 = Instant::now();
        let (ni, nar, body) = fetch(proxy, &p);
        assert_eq!((ni, nar), (200, 200), "{lie:?} with an honest peer");
        assert!(body == p.nar, "{lie:?}: wrong bytes delivered");
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "{lie:?}: took {:?}",
            t0.elapsed()
        );
        if !lie.in_narinfo() {
            // The liar was tried for the NAR and is now backed off.
            let node = local_nix_cache::beacon::wire::NodeId([1; 16]).to_string();
            let st = px.status();
            let peer = st.peers.iter().find(|p| p.node == node).expect("liar still listed");
            assert!(peer.health.consecutive_failures > 0, "{lie:?}: liar not backed off");
        }
        drop(rig);

        // The liar alone: never a complete wrong NAR; a miss instead.
        let rig = Rig::new();
        rig.peer(liar(&p, lie), 1);
        let (proxy, _) = rig.proxy(vec![]);
        let t0 = Instant::now();
        let (ni, nar, body) = fetch(proxy, &p);
        if lie.in_narinfo() {
            assert_eq!(ni, 404, "{lie:?} alone: narinfo must be a miss");
        } else {
            assert_eq!((ni, nar), (200, 404), "{lie:?} alone: NAR must be a miss");
            assert!(body != p.nar.as_ref() || body.is_empty());
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "{lie:?} alone: took {:?}",
            t0.elapsed()
        );
    }
}

#[test]
fn a_peer_that_dies_mid_transfer_is_resumed_from_another_with_range() {
    let p = FakePath::new("big", 3_000_000, 2); // spools to disk (over the 1 MiB memory limit)
    let rig = Rig::new();
    let dying = liar(&p, Lie::TruncatedNar);
    rig.peer(dying, 1);
    let honest = Arc::new(FakeCache::default());
    honest.serve_path(&p);
    honest.set(
        &format!("/{}.narinfo", p.hash()),
        Reply::slow(p.info.render(), Duration::from_millis(100)),
    );
    rig.peer(honest.clone(), 2);
    let (proxy, _) = rig.proxy(vec![]);
    let (_, nar, body) = fetch(proxy, &p);
    assert_eq!(nar, 200);
    assert!(body == p.nar, "wrong bytes");
    let ranges = honest.ranges.lock().expect("lock").clone();
    assert_eq!(
        ranges,
        vec![format!("bytes={}-", p.nar.len() / 3)],
        "resumed where the first peer stopped"
    );
}

#[test]
fn upstream_answers_when_no_peer_has_the_path_and_compressed_nars_are_unpacked() {
    let p = FakePath::new("from-upstream", 200_000, 3);
    let rig = Rig::new();
    // A peer that has nothing.
    rig.peer(Arc::new(FakeCache::default()), 1);
    // An upstream with an xz-compressed NAR, like cache.nixos.org.
    let up = Arc::new(FakeCache::default());
    let xz = rig.rt.block_on(async {
        use tokio::io::AsyncReadExt;
        let mut enc = async_compression::tokio::bufread::XzEncoder::new(&p.nar[..]);
        let mut out = Vec::new();
        enc.read_to_end(&mut out).await.expect("xz");
        out
    });
    let mut info = p.info.clone();
    info.compression = local_nix_cache::narinfo::Compression::Xz;
    info.url = format!("nar/{}.nar.xz", p.info.nar_hash.to_nix32());
    up.set(&format!("/{}.narinfo", p.hash()), Reply::ok(info.render()));
    up.set(&format!("/{}", info.url), Reply::ok(Bytes::from(xz)));
    let up_addr = rig.cache(up.clone());
    let (proxy, px) = rig.proxy(vec![format!("http://{up_addr}/")]);
    let (ni, nar, body) = fetch(proxy, &p);
    assert_eq!((ni, nar), (200, 200));
    assert!(body == p.nar, "decompressed NAR differs");
    let s = px.stats();
    assert_eq!((s.narinfo_hits_upstream, s.nars_from_upstream), (1, 1), "{s:?}");
}

#[test]
fn offline_misses_are_fast_and_peers_still_serve() {
    let p = FakePath::new("lan-only", 10_000, 4);
    let rig = Rig::new();
    let honest = Arc::new(FakeCache::default());
    honest.serve_path(&p);
    rig.peer(honest, 1);
    // An upstream nobody listens on: connections are refused.
    let dead_url = crate::common::dead_url();
    let (proxy, _) = rig.proxy(vec![dead_url]);
    let (ni, nar, body) = fetch(proxy, &p);
    assert_eq!((ni, nar), (200, 200));
    assert!(body == p.nar);
    for i in 0..20 {
        let t0 = Instant::now();
        let miss = get(proxy, &format!("/{:0>32}.narinfo", i));
        assert_eq!(miss.status, 404, "a miss is a 404, never a 5xx");
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "miss {i} took {:?}",
            t0.elapsed()
        );
    }
}

/// The "upstream is down" memory: after a refused connection the upstream is skipped for a while
/// (offline laptops get fast misses), even once something listens there again.
#[test]
fn an_unreachable_upstream_is_skipped_for_a_while() {
    let p = FakePath::new("after-outage", 1000, 14);
    let rig = Rig::new();
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let (proxy, px) = rig.proxy(vec![format!("http://{addr}/")]);
    // Nothing listens yet: refused, marked down.
    assert_eq!(get(proxy, &format!("/{:0>32}.narinfo", 1)).status, 404);
    assert!(
        !px.status().upstreams[0].reachable,
        "the refused upstream is marked down"
    );
    // The upstream comes back with the path, but stays skipped until the mark expires.
    let up = Arc::new(FakeCache::default());
    up.serve_path(&p);
    rig.cache_at(up.clone(), addr);
    assert_eq!(get(proxy, &format!("/{}.narinfo", p.hash())).status, 404);
    assert_eq!(
        up.requests.lock().expect("lock").len(),
        0,
        "a down upstream is not asked"
    );
}

/// The negative narinfo cache: a miss is remembered briefly, so Nix asking again at once costs
/// no request to any source; after the TTL the path is found.
#[test]
fn a_miss_is_remembered_briefly() {
    let p = FakePath::new("late", 1000, 15);
    let rig = Rig::new();
    let up = Arc::new(FakeCache::default());
    let addr = rig.cache(up.clone());
    let (proxy, _) = rig.proxy(vec![format!("http://{addr}/")]);
    let ni = format!("/{}.narinfo", p.hash());
    assert_eq!(get(proxy, &ni).status, 404);
    assert_eq!(up.requests_for(".narinfo"), 1);
    up.serve_path(&p);
    assert_eq!(get(proxy, &ni).status, 404, "the miss is remembered");
    assert_eq!(up.requests_for(".narinfo"), 1, "a remembered miss asks no source");
    std::thread::sleep(local_nix_cache::proxy::cache::NEGATIVE_TTL + Duration::from_millis(200));
    assert_eq!(get(proxy, &ni).status, 200, "found once the miss expired");
    assert_eq!(up.requests_for(".narinfo"), 2);
}

/// Graceful drain: on shutdown the proxy stops accepting at once, but a NAR already being
/// fetched for a client is still delivered whole.
#[test]
fn shutdown_drains_requests_in_flight() {
    let p = FakePath::new("in-flight", 300_000, 16);
    let rig = Rig::new();
    let peer = Arc::new(FakeCache::default());
    peer.serve_path(&p);
    peer.set(
        &format!("/{}", p.info.url),
        Reply::slow(p.nar.clone(), Duration::from_millis(1500)),
    );
    rig.peer(peer, 1);
    let (proxy, _) = rig.proxy(vec![]);
    assert_eq!(get(proxy, &format!("/{}.narinfo", p.hash())).status, 200);
    let url = p.nar_url();
    let client = std::thread::spawn(move || get(proxy, &url));
    std::thread::sleep(Duration::from_millis(500));
    rig.shutdown();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        std::net::TcpStream::connect(proxy).is_err(),
        "no new connection after shutdown"
    );
    let r = client.join().expect("client");
    assert_eq!(r.status, 200, "the request in flight was answered");
    assert!(r.body == p.nar, "and delivered whole ({} bytes)", r.body.len());
}

/// The status page, `/metrics` and `status` render the proxy's real report, not a sample.
#[test]
fn status_renderers_show_the_proxys_real_state() {
    let p = FakePath::new("shown", 5000, 17);
    let rig = Rig::new();
    let peer = Arc::new(FakeCache::default());
    peer.serve_path(&p);
    *peer.node.lock().expect("lock") = Some(NodeId([1; 16]));
    let addr = rig.cache(peer);
    rig.announce(addr, NodeId([1; 16]), FLAG_NAR_NONE, Some("<script>x</script>"));
    let (proxy, px) = rig.proxy(vec![crate::common::dead_url()]);
    let (ni, nar, _) = fetch(proxy, &p);
    assert_eq!((ni, nar), (200, 200));
    assert_eq!(get(proxy, &format!("/{:0>32}.narinfo", 7)).status, 404);
    let st = px.status();
    // The JSON that `status` reads back is the same report.
    let json = get(proxy, "/status.json");
    let back: local_nix_cache::proxy::stats::StatusReport = serde_json::from_slice(&json.body).expect("report");
    assert_eq!(back.stats, st.stats);
    let text = local_nix_cache::status::text(&st);
    assert!(text.contains("peers: 1"), "{text}");
    assert!(
        text.contains("narinfo: 1 from peers, 0 from upstream, 1 misses"),
        "{text}"
    );
    assert!(text.contains("NARs: 1 from peers (5.5 KiB)"), "{text}");
    assert!(text.contains(&format!("verified {}", p.path)), "{text}");
    assert!(text.contains("unreachable"), "the dead upstream is shown: {text}");
    let page = String::from_utf8(get(proxy, "/").body).expect("utf8");
    assert!(
        page.contains("&lt;script&gt;x&lt;/script&gt;") && !page.contains("<script>"),
        "{page}"
    );
    assert!(page.contains(&addr.to_string()), "{page}");
    assert!(page.contains("1 NARs from the LAN"), "{page}");
    let m = String::from_utf8(get(proxy, "/metrics").body).expect("utf8");
    for want in [
        "local_nix_cache_nars_total{source=\"peer\"} 1",
        "local_nix_cache_narinfo_total{result=\"miss\"} 1",
        "local_nix_cache_peers 1",
        "local_nix_cache_upstreams_unreachable 1",
        "local_nix_cache_beacon_datagrams_total{kind=\"announces\"} 1",
        "# TYPE local_nix_cache_nars counter",
        "# EOF",
    ] {
        assert!(m.contains(want), "{want} missing from\n{m}");
    }
}

#[test]
fn the_fastest_honest_peer_wins_the_narinfo_race() {
    let p = FakePath::new("race", 1000, 5);
    let rig = Rig::new();
    // Four peers that never answer, four that answer after a second, one fast honest peer.
    for id in 1..=4 {
        let c = Arc::new(FakeCache::default());
        c.set(
            &format!("/{}.narinfo", p.hash()),
            Reply::Stall {
                body: Bytes::from(p.info.render()),
                cut: 10,
            },
        );
        rig.peer(c, id);
    }
    for id in 5..=7 {
        let c = Arc::new(FakeCache::default());
        c.serve_path(&p);
        c.set(
            &format!("/{}.narinfo", p.hash()),
            Reply::slow(p.info.render(), Duration::from_secs(1)),
        );
        rig.peer(c, id);
    }
    let fast = Arc::new(FakeCache::default());
    fast.serve_path(&p);
    rig.peer(fast, 8);
    let (proxy, _) = rig.proxy(vec![]);
    let t0 = Instant::now();
    let r = get(proxy, &format!("/{}.narinfo", p.hash()));
    assert_eq!(r.status, 200);
    assert!(t0.elapsed() < Duration::from_millis(500), "took {:?}", t0.elapsed());
}

#[test]
fn nar_urls_survive_a_proxy_restart_and_the_winner_leaving() {
    let p = FakePath::new("durable", 50_000, 6);
    let rig = Rig::new();
    let a = Arc::new(FakeCache::default());
    a.serve_path(&p);
    rig.peer(a, 1);
    let (proxy, _) = rig.proxy(vec![]);
    let (_, nar, _) = fetch(proxy, &p);
    assert_eq!(nar, 200);
    let url = p.nar_url();
    // A fresh proxy (as after a restart) knows nothing, yet resolves the URL from the peers.
    let (fresh, _) = rig.proxy(vec![]);
    let r = get(fresh, &url);
    assert_eq!(r.status, 200);
    assert!(r.body == p.nar);
    // The winning peer leaves; another one has the bytes.
    let b = Arc::new(FakeCache::default());
    b.serve_path(&p);
    rig.peer(b, 2);
    let bye = crate::common::forge::goodbye(local_nix_cache::beacon::wire::NodeId([1; 16]))
        .interval_ms(1000)
        .seq(2)
        .encode();
    let first = rig.table.peers()[0].http_addr();
    {
        let _g = rig.rt.enter();
        rig.table.handle(first, &bye, tokio::time::Instant::now());
    }
    assert_eq!(rig.table.peers().len(), 1);
    let (fresh2, _) = rig.proxy(vec![]);
    let r = get(fresh2, &url);
    assert_eq!(r.status, 200);
    assert!(r.body == p.nar);
    // HEAD of a NAR answers from the narinfo: the size, no download.
    let before = rig.table.peers().len();
    let r = request(fresh2, "HEAD", &url, &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some(p.nar.len().to_string().as_str()));
    assert!(r.body.is_empty());
    assert_eq!(rig.table.peers().len(), before);
    assert_eq!(request(fresh2, "HEAD", &bogus_url(&p), &[]).status, 404);
    // Range and HEAD on the proxy's NAR.
    let r = request(fresh2, "GET", &url, &[("Range", "bytes=100-")]);
    assert_eq!(r.status, 206);
    assert!(r.body == p.nar[100..]);
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    let r = request(fresh2, "HEAD", &format!("/{}.narinfo", p.hash()), &[]);
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    // A URL naming a NAR hash nobody has is a 404.
    assert_eq!(get(fresh2, &bogus_url(&p)).status, 404);
}

#[test]
fn concurrent_requests_for_one_nar_share_one_fetch() {
    shared_fetch(false, 2_000_000, 1);
}

/// The same with a proven peer: the first request's NAR passes through, the others join its
/// fetch and get the verified NAR; still one fetch (a NAR spooled in memory is kept whole).
#[test]
fn concurrent_requests_share_one_fetch_when_it_passes_through() {
    shared_fetch(true, 800_000, 1);
}

/// A NAR spooled to a file while it passes through keeps only what its body did not take
/// (issue #16: no page-cache copy of a NAR Nix already has), so the requests that joined it
/// share a second fetch, and every client gets the right bytes.
#[test]
fn requests_that_join_a_pass_through_to_a_file_share_a_second_fetch() {
    shared_fetch(true, 2_000_000, 2);
}

fn shared_fetch(proven: bool, size: usize, fetches: usize) {
    use local_nix_cache::proxy::proven::PROVEN_AFTER;
    let p = FakePath::new("shared", size, 7);
    let rig = Rig::new();
    let peer = Arc::new(FakeCache::default());
    peer.serve_path(&p);
    let earn: Vec<FakePath> = (0..PROVEN_AFTER)
        .map(|i| FakePath::new(&format!("earn{i}"), 1000, 30 + i as u8))
        .collect();
    for e in &earn {
        peer.serve_path(e);
    }
    // A slow NAR, so the requests overlap.
    peer.set(
        &format!("/{}", p.info.url),
        Reply::slow(p.nar.clone(), Duration::from_millis(500)),
    );
    rig.peer(peer.clone(), 1);
    let (proxy, px) = rig.proxy(vec![]);
    if proven {
        for e in &earn {
            assert_eq!(fetch(proxy, e).1, 200);
        }
    }
    assert_eq!(get(proxy, &format!("/{}.narinfo", p.hash())).status, 200);
    let url = p.nar_url();
    let clients: Vec<_> = (0..3)
        .map(|i| {
            let url = url.clone();
            // The first one starts the fetch.
            std::thread::sleep(Duration::from_millis(if i == 0 { 0 } else { 50 }));
            std::thread::spawn(move || get(proxy, &url))
        })
        .collect();
    for c in clients {
        let r = c.join().expect("client");
        assert_eq!(r.status, 200);
        assert!(r.body == p.nar);
    }
    assert_eq!(
        peer.requests_for(&p.info.url),
        fetches,
        "three clients, {fetches} fetch(es)"
    );
    assert_eq!(px.stats().nars_passed_through, u64::from(proven), "{:?}", px.stats());
}

#[test]
fn a_large_nar_is_split_between_peers() {
    let p = FakePath::new("split", 6_000_000, 9);
    let rig = Rig::new();
    let (a, b) = (Arc::new(FakeCache::default()), Arc::new(FakeCache::default()));
    a.serve_path(&p);
    b.serve_path(&p);
    rig.peer(a.clone(), 1);
    rig.peer(b.clone(), 2);
    let (proxy, px) = rig.proxy(vec![]);
    let (ni, nar, body) = fetch(proxy, &p);
    assert_eq!((ni, nar), (200, 200));
    assert!(body == p.nar, "split NAR differs");
    let n = p.nar.len();
    let mut ranges: Vec<String> = a.ranges.lock().expect("lock").clone();
    ranges.extend(b.ranges.lock().expect("lock").clone());
    ranges.sort();
    assert_eq!(
        ranges,
        vec![format!("bytes=0-{}", n / 2 - 1), format!("bytes={}-{}", n / 2, n - 1)]
    );
    assert_eq!(px.stats().nars_split, 1);
}

#[test]
fn a_lying_segment_is_caught_and_the_nar_refetched_whole() {
    let p = FakePath::new("split-lie", 6_000_000, 10);
    let rig = Rig::new();
    // Wrong in both halves, whichever segment it is asked for.
    let liar = Arc::new(FakeCache::default());
    liar.serve_path(&p);
    let mut bad = p.nar.to_vec();
    let n = bad.len();
    bad[n / 4] ^= 1;
    bad[3 * n / 4] ^= 1;
    liar.set(&format!("/{}", p.info.url), Reply::ok(bad));
    rig.peer(liar, 1);
    let honest = Arc::new(FakeCache::default());
    honest.serve_path(&p);
    rig.peer(honest, 2);
    let (proxy, px) = rig.proxy(vec![]);
    let (ni, nar, body) = fetch(proxy, &p);
    assert_eq!((ni, nar), (200, 200));
    assert!(body == p.nar, "wrong bytes delivered");
    let s = px.stats();
    assert_eq!(s.nars_split, 0, "{s:?}");
    assert!(s.lies >= 1, "{s:?}");
}

/// The NAR URL of `p`'s path with a NAR hash nothing has.
fn bogus_url(p: &FakePath) -> String {
    let none = local_nix_cache::narinfo::NarHash::parse_nix32(&"1".repeat(52)).expect("nix32");
    format!("/{}", local_nix_cache::cache_url::nar_url(&p.path.hash(), &none))
}

#[test]
fn head_of_a_nar_downloads_nothing() {
    let p = FakePath::new("head-only", 500_000, 8);
    let rig = Rig::new();
    let peer = Arc::new(FakeCache::default());
    peer.serve_path(&p);
    rig.peer(peer.clone(), 1);
    let (proxy, _) = rig.proxy(vec![]);
    let url = p.nar_url();
    let r = request(proxy, "HEAD", &url, &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some(p.nar.len().to_string().as_str()));
    assert_eq!(peer.requests_for(&p.info.url), 0, "HEAD must not fetch the NAR");
}

#[test]
fn cache_info_is_local_and_bad_requests_are_4xx() {
    let rig = Rig::new();
    let (proxy, _) = rig.proxy(vec![]);
    let r = get(proxy, "/nix-cache-info");
    assert_eq!(r.status, 200);
    let text = String::from_utf8(r.body).expect("utf8");
    assert!(
        text.contains("StoreDir: /nix/store\n") && text.contains("Priority: 20\n"),
        "{text}"
    );
    assert_eq!(get(proxy, "/../etc/passwd.narinfo").status, 400);
    assert_eq!(get(proxy, "/log/x").status, 404);
    assert_eq!(request(proxy, "PUT", "/x.narinfo", &[]).status, 405);
}

/// Benchmark (run by `bench/proxy.sh`): narinfo latency through the proxy with 16 peers, of which
/// 4 never answer and 4 answer after one second, against asking the fastest honest peer alone.
#[test]
#[ignore = "benchmark; bench/proxy.sh runs it"]
fn bench_narinfo_latency_16_peers() {
    const N: usize = 300;
    let paths: Vec<FakePath> = (0..N).map(|i| FakePath::new(&format!("p{i}"), 64, i as u8)).collect();
    let rig = Rig::new();
    let mut fastest = None;
    for id in 1..=16u8 {
        let c = Arc::new(FakeCache::default());
        for p in &paths {
            let ni = format!("/{}.narinfo", p.hash());
            match id {
                1..=4 => c.set(
                    &ni,
                    Reply::Stall {
                        body: Bytes::from(p.info.render()),
                        cut: 1,
                    },
                ),
                5..=8 => c.set(&ni, Reply::slow(p.info.render(), Duration::from_secs(1))),
                _ => c.set(&ni, Reply::ok(p.info.render())),
            }
        }
        let addr = rig.peer(c, id);
        if id == 9 {
            fastest = Some(addr);
        }
    }
    let fastest = fastest.expect("peer 9");
    let (proxy, _) = rig.proxy(vec![]);
    let measure = |addr: std::net::SocketAddr| -> Vec<f64> {
        let mut v: Vec<f64> = paths
            .iter()
            .map(|p| {
                let t0 = Instant::now();
                let r = get(addr, &format!("/{}.narinfo", p.hash()));
                assert_eq!(r.status, 200);
                t0.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let direct = measure(fastest);
    let via = measure(proxy);
    let pct = |v: &[f64], q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    println!(
        "BENCH narinfo latency, {N} distinct paths, 16 peers (4 dead, 4 slow 1 s): \
         proxy p50 {:.2} ms p99 {:.2} ms max {:.2} ms; fastest honest peer alone p50 {:.2} ms p99 {:.2} ms; \
         p99 difference {:+.2} ms (target <= +50)",
        pct(&via, 0.5),
        pct(&via, 0.99),
        via[via.len() - 1],
        pct(&direct, 0.5),
        pct(&direct, 0.99),
        pct(&via, 0.99) - pct(&direct, 0.99)
    );
}

/// A raw GET that keeps what arrived when the server cuts the body short: the status, the
/// `Content-Length` and the body bytes received.
pub(crate) fn get_cut(addr: std::net::SocketAddr, path: &str) -> (u16, Option<u64>, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").expect("send");
    let mut raw = Vec::new();
    let mut buf = [0u8; 65536];
    // A reset after the cut is an end like EOF.
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("header end");
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status");
    let len = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok());
    (status, len, raw[end + 4..].to_vec())
}

fn proven(px: &local_nix_cache::proxy::Proxy, id: u8) -> bool {
    let node = NodeId([id; 16]).to_string();
    px.status().peers.iter().any(|p| p.node == node && p.proven)
}

/// A proxy for which peer 1 is proven by fetching `honest` through it, that has asked for `big`'s
/// narinfo; returns it with `big`'s NAR URL.
fn proxy_with_proven_peer(
    rig: &Rig,
    honest: &[FakePath],
    big: &FakePath,
) -> (std::net::SocketAddr, Arc<local_nix_cache::proxy::Proxy>, String) {
    let (proxy, px) = rig.proxy(vec![]);
    for p in honest {
        assert_eq!(fetch(proxy, p).1, 200);
    }
    assert!(proven(&px, 1));
    assert_eq!(get(proxy, &format!("/{}.narinfo", big.hash())).status, 200);
    let url = big.nar_url();
    (proxy, px, url)
}

/// Pass-through (issue #16): a peer that delivered `PROVEN_AFTER` verified NARs has its next NAR
/// streamed while it is hashed. When that NAR is a lie (same size, one byte changed), the client
/// gets fewer bytes than the `Content-Length` (the held-back tail never leaves), the peer loses
/// the privilege, also for a restarted proxy, and the next request gets the right bytes from
/// another peer.
#[test]
fn a_proven_peer_that_lies_never_gets_its_tail_sent() {
    use local_nix_cache::proxy::passthrough::TAIL;
    use local_nix_cache::proxy::proven::PROVEN_AFTER;
    let rig = Rig::new();
    let (honest, lie) = rig.proven_liar("tail", 300_000, 2_000_000, 40, 1_000_000);
    let (proxy, px) = rig.proxy(vec![]);
    for (i, p) in honest.iter().enumerate() {
        assert!(!proven(&px, 1), "proven after {i} NARs only");
        let (ni, nar, body) = fetch(proxy, p);
        assert_eq!((ni, nar), (200, 200));
        assert!(body == p.nar);
    }
    assert!(proven(&px, 1), "proven after {PROVEN_AFTER} verified NARs");
    assert_eq!(get(proxy, &format!("/{}.narinfo", lie.hash())).status, 200);
    let (status, len, body) = get_cut(proxy, &lie.nar_url());
    let size = lie.info.nar_size;
    assert_eq!(status, 200, "the lie was being passed through");
    assert_eq!(len, Some(size), "Content-Length is NarSize, so a cut body is short");
    assert!(!body.is_empty(), "bytes were passed through before the hash was known");
    assert!(
        (body.len() as u64) < size,
        "the client got {} of {size} bytes: the tail must never be sent",
        body.len()
    );
    assert!((body.len() as u64) <= size - TAIL);
    let s = px.stats();
    assert_eq!((s.nars_cut, s.nars_passed_through), (1, 0), "{s:?}");
    assert!(s.lies >= 1, "{s:?}");
    assert!(!proven(&px, 1), "a liar is never proven again");
    // The next request gets the right NAR (from the other peer, verified first).
    let (_, nar, body) = fetch(proxy, &lie);
    assert_eq!(nar, 200);
    assert!(body == lie.nar, "the right bytes from the honest peer");
    // A restarted proxy (same state directory) still does not trust the liar, however many
    // honest NARs it delivers again.
    let (proxy2, px2) = rig.proxy(vec![]);
    for p in &honest {
        let (ni, nar, _) = fetch(proxy2, p);
        assert_eq!((ni, nar), (200, 200));
    }
    assert!(!proven(&px2, 1), "the ban survives a restart");
}

/// Issue #25: a proven peer whose lie is in the held-back tail only (every byte passed through
/// was right) failed the build although another peer held the path. The bytes passed are now
/// checked against the NAR that then verifies from the other peer, and the body is finished
/// from it: Nix gets the whole, right NAR; the liar is still banned. (A lie in the passed part
/// is still cut: `a_proven_peer_that_lies_never_gets_its_tail_sent`.)
#[test]
fn a_tail_only_lie_is_finished_from_another_source() {
    use local_nix_cache::proxy::passthrough::TAIL;
    let rig = Rig::new();
    let size = 2_000_000;
    let (honest, lie) = rig.proven_liar("tailonly", 300_000, size, 90, size - TAIL as usize / 2);
    let (proxy, px) = rig.proxy(vec![]);
    for p in &honest {
        let (ni, nar, body) = fetch(proxy, p);
        assert_eq!((ni, nar), (200, 200));
        assert!(body == p.nar);
    }
    assert!(proven(&px, 1), "proven");
    assert_eq!(get(proxy, &format!("/{}.narinfo", lie.hash())).status, 200);
    let (status, len, body) = get_cut(proxy, &lie.nar_url());
    assert_eq!((status, len), (200, Some(lie.info.nar_size)));
    assert_eq!(body.len() as u64, lie.info.nar_size, "the whole NAR arrived");
    assert!(body == lie.nar, "the right bytes");
    let s = px.stats();
    assert_eq!(s.nars_cut, 0, "{s:?}");
    assert!(s.lies >= 1, "{s:?}");
    assert!(!proven(&px, 1), "the liar is banned all the same");
}

/// An honest proven peer's NAR passes through whole and right; with the setting off, or for a
/// request with `Range`, the NAR is verified first.
#[test]
fn an_honest_proven_peers_nar_passes_through_whole() {
    use local_nix_cache::proxy::proven::PROVEN_AFTER;
    let paths: Vec<FakePath> = (0..=PROVEN_AFTER)
        .map(|i| FakePath::new(&format!("pt{i}"), 1_500_000, 60 + i as u8))
        .collect();
    let peer = Arc::new(FakeCache::default());
    for p in &paths {
        peer.serve_path(p);
    }
    let rig = Rig::new();
    rig.peer(peer, 1);
    let (proxy, px) = rig.proxy(vec![]);
    for p in &paths {
        let (ni, nar, body) = fetch(proxy, p);
        assert_eq!((ni, nar), (200, 200));
        assert!(body == p.nar, "{}: right bytes", p.path);
    }
    let s = px.stats();
    assert_eq!(s.nars_passed_through, 1, "{s:?}");
    assert_eq!(s.nars_from_peers, PROVEN_AFTER as u64 + 1, "{s:?}");
    let recent = px.status().recent;
    assert_eq!(
        recent[0].verdict.as_str(),
        "passed through",
        "the last NAR passed through: {recent:?}"
    );
    assert_eq!(recent[0].bytes, paths[PROVEN_AFTER as usize].info.nar_size);
    assert!(recent[1..].iter().all(|t| t.verdict.as_str() == "verified"));
    // A restarted proxy still knows the peer is proven.
    let (proxy2, px2) = rig.proxy(vec![]);
    assert!(proven(&px2, 1), "proven across a restart");
    // A `Range` request is answered from the verified spool.
    let p = &paths[0];
    let url = p.nar_url();
    let r = request(proxy2, "GET", &url, &[("Range", "bytes=100-")]);
    assert_eq!(r.status, 206);
    assert!(r.body[..] == p.nar[100..]);
    assert_eq!(px2.stats().nars_passed_through, 0);
    // The setting off: verified first, even from a proven peer.
    rig.pass_through.store(false, std::sync::atomic::Ordering::Relaxed);
    let (proxy3, px3) = rig.proxy(vec![]);
    let (_, nar, body) = fetch(proxy3, &paths[1]);
    assert_eq!(nar, 200);
    assert!(body == paths[1].nar);
    assert_eq!(px3.stats().nars_passed_through, 0);
    assert_eq!(px3.status().recent[0].verdict.as_str(), "verified");
}

/// Reads a whole response, counting the body bytes (not kept); returns (bytes, seconds).
fn drain(addr: std::net::SocketAddr, path: &str) -> (u64, f64) {
    use std::io::{Read, Write};
    let t0 = Instant::now();
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").expect("send");
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    let mut head = Vec::new();
    let mut body = 0u64;
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        total += n as u64;
        if head.len() < 4096 && body == 0 {
            head.extend_from_slice(&buf[..n.min(4096)]);
            if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                body = total - (end as u64 + 4);
                continue;
            }
        }
        if body > 0 {
            body += n as u64;
        }
    }
    if body == 0 || head.starts_with(b"HTTP/1.1 4") {
        eprintln!("{path}: {}", String::from_utf8_lossy(&head[..head.len().min(300)]));
    }
    (body, t0.elapsed().as_secs_f64())
}

/// Benchmark (issue #16): one large NAR of random-looking bytes from an in-process peer on
/// loopback, read whole by a client: straight from the peer, through the proxy passing it
/// through (the peer proven), and through the proxy verifying first. Measures the proxy's own
/// cost, without Nix or a link. `BENCH_PT_MIB` sets the size (default 128; the test rig's spool holds 256 MiB).
#[test]
#[ignore = "benchmark; run with --release (or --profile profiling) -- --ignored --nocapture"]
fn bench_pass_through_throughput() {
    use local_nix_cache::proxy::proven::PROVEN_AFTER;
    let mib: usize = std::env::var("BENCH_PT_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128);
    let big = FakePath::new("bench-big", mib << 20, 7);
    let small: Vec<FakePath> = (0..PROVEN_AFTER)
        .map(|i| FakePath::new(&format!("bench-small{i}"), 1000, i as u8))
        .collect();
    let peer = Arc::new(FakeCache::default());
    peer.serve_path(&big);
    for p in &small {
        peer.serve_path(p);
    }
    let rig = Rig::new();
    let peer_addr = rig.peer(peer, 1);
    let (pass, _) = rig.proxy(vec![]);
    for p in &small {
        assert_eq!(fetch(pass, p).1, 200);
    }
    rig.pass_through.store(false, std::sync::atomic::Ordering::Relaxed);
    let (verify, _) = rig.proxy(vec![]);
    let url = big.nar_url();
    for p in [pass, verify] {
        assert_eq!(get(p, &format!("/{}.narinfo", big.hash())).status, 200);
    }
    let size = big.info.nar_size;
    let mbs = |(n, s): (u64, f64)| {
        assert_eq!(n, size, "whole body (direct URL /{})", big.info.url);
        size as f64 / s / 1e6
    };
    for round in 1..=3 {
        let direct = mbs(drain(peer_addr, &format!("/{}", big.info.url)));
        let through = mbs(drain(pass, &url));
        let first = mbs(drain(verify, &url));
        println!(
            "BENCH pass-through {mib} MiB, round {round}: direct {direct:.0} MB/s, pass-through {through:.0} MB/s \
             ({:.2}x), verify-first {first:.0} MB/s ({:.2}x)",
            through / direct,
            first / direct
        );
    }
}

/// A client that leaves while its NAR is passing through stops the fetch at once (the fetch task
/// is aborted and no longer in flight), instead of the fetch running on until its source fails:
/// a request for the same NAR right after starts a fetch of its own. Without the abort it would
/// join the abandoned fetch, and the peer would be asked for the NAR once, not twice.
#[test]
fn a_client_that_leaves_a_pass_through_stops_its_fetch() {
    use local_nix_cache::proxy::proven::PROVEN_AFTER;
    use std::io::{Read, Write};
    let honest: Vec<FakePath> = (0..PROVEN_AFTER)
        .map(|i| FakePath::new(&format!("left{i}"), 300_000, 70 + i as u8))
        .collect();
    let big = FakePath::new("left-big", 4_000_000, 80);
    let peer = Arc::new(FakeCache::default());
    for p in &honest {
        peer.serve_path(p);
    }
    peer.serve_path(&big);
    // Half the NAR at once, then nothing (the fetch would give up only at the rate floor).
    peer.set(
        &format!("/{}", big.info.url),
        Reply::Stall {
            body: big.nar.clone(),
            cut: 2_000_000,
        },
    );
    let rig = Rig::new();
    rig.peer(peer.clone(), 1);
    let (proxy, _px, url) = proxy_with_proven_peer(&rig, &honest, &big);
    let start = || {
        let mut s = std::net::TcpStream::connect(proxy).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        write!(s, "GET {url} HTTP/1.1\r\nHost: test\r\n\r\n").expect("send");
        let mut buf = vec![0u8; 256 * 1024];
        let n = s.read(&mut buf).expect("the pass-through starts");
        assert!(String::from_utf8_lossy(&buf[..n.min(12)]).starts_with("HTTP/1.1 200"));
        s
    };
    let nar_requests = || peer.requests_for(".nar");
    let before = nar_requests();
    drop(start());
    std::thread::sleep(Duration::from_millis(500));
    let second = start();
    let _ = wait_for(Duration::from_secs(2), Duration::from_millis(20), || {
        nar_requests() >= before + 2
    });
    assert_eq!(
        nar_requests(),
        before + 2,
        "the second request joined the fetch its client had left"
    );
    drop(second);
}

/// Opens a NAR request and reads until the first body bytes arrived; returns the stream and
/// what was read (head included).
fn open_nar_stream(proxy: std::net::SocketAddr, url: &str) -> (std::net::TcpStream, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(proxy).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    write!(s, "GET {url} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").expect("send");
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while !raw.windows(4).any(|w| w == b"\r\n\r\n") || raw.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut buf).expect("the pass-through starts");
        assert!(n > 0, "closed before the body");
        raw.extend_from_slice(&buf[..n]);
    }
    assert!(
        raw.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&raw[..40])
    );
    (s, raw)
}

/// Pass-through's stall detach (`PASS_STALL`, issue #16): a client that stops reading its NAR
/// mid-way does not hold up the fetch: after `PASS_STALL` the tap detaches, the fetch completes
/// on its own (the NAR's rest is kept in the spool from where the body stopped), and once the
/// client reads again it gets the rest, whole and right, from one request to the peer. With a
/// lying peer the client gets the bytes that were passed through and never the tail: the body is
/// cut. Without the detach the fetch waits for the client for ever (red: the wait times out).
#[test]
fn a_stalled_pass_through_body_detaches_and_gets_the_rest() {
    stalled_pass_through(false);
}

#[test]
fn a_stalled_pass_through_body_of_a_lie_is_cut() {
    stalled_pass_through(true);
}

fn stalled_pass_through(lie: bool) {
    use local_nix_cache::proxy::passthrough::{PASS_STALL, TAIL};
    use std::io::Read;
    // Far more than the socket buffers and the pass-through channels hold: the client's receive
    // buffer alone may grow to `tcp_rmem`'s maximum, 32 MiB on recent kernels, the send buffer to
    // 4 MiB, the channels hold 12 chunks of up to 256 KiB (3 MiB): 40 MiB was not (issue #27).
    const SIZE: usize = 64 << 20;
    let rig = Rig::new();
    // One peer (with two, the NAR would be split between them, verify-first).
    let honest: Vec<FakePath> = (0..local_nix_cache::proxy::proven::PROVEN_AFTER)
        .map(|i| FakePath::new(&format!("stall{i}"), 300_000, 90 + i as u8))
        .collect();
    let big = FakePath::new(if lie { "stall-lie" } else { "stall-big" }, SIZE, 99);
    let peer = Arc::new(FakeCache::default());
    for p in honest.iter().chain([&big]) {
        peer.serve_path(p);
    }
    if lie {
        // One byte flipped in the tail, after the stall.
        let mut bad = big.nar.to_vec();
        let at = bad.len() - 1000;
        bad[at] ^= 1;
        peer.set(&format!("/{}", big.info.url), Reply::ok(bad));
    }
    rig.peer(peer, 1);
    let (proxy, px, url) = proxy_with_proven_peer(&rig, &honest, &big);
    let before = px.stats();
    let t0 = Instant::now();
    let (mut s, mut raw) = open_nar_stream(proxy, &url);
    // The client reads nothing more: the fetch must go on without it.
    if lie {
        wait_until(
            "the fetch finds the lie while the client does not read",
            Duration::from_secs(120),
            Duration::from_millis(100),
            || px.stats().lies > before.lies,
        );
    } else {
        wait_until(
            "the fetch completes while the client does not read",
            Duration::from_secs(120),
            Duration::from_millis(100),
            || px.stats().bytes_from_peers >= before.bytes_from_peers + big.nar.len() as u64,
        );
    }
    assert!(t0.elapsed() >= PASS_STALL, "the body stalled for PASS_STALL first");
    let mut buf = vec![0u8; 1 << 20];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4;
    let body = &raw[end..];
    if lie {
        assert!(
            (body.len() as u64) <= big.info.nar_size - TAIL,
            "got {} bytes: the tail was sent",
            body.len()
        );
        assert!(
            body == &big.nar[..body.len()],
            "what was passed through is the liar's prefix, as sent"
        );
        assert_eq!(px.stats().nars_cut, before.nars_cut + 1);
        assert!(!proven(&px, 1));
    } else {
        assert_eq!(body.len(), big.nar.len(), "the whole NAR");
        assert!(body == &big.nar[..], "the right bytes");
        let s = px.stats();
        assert_eq!(s.nars_passed_through, before.nars_passed_through + 1, "{s:?}");
        assert_eq!(
            s.bytes_from_peers,
            before.bytes_from_peers + big.nar.len() as u64,
            "one fetch of the NAR: {s:?}"
        );
    }
}

/// Small NARs are fetched plain from a peer that offers zstd, larger ones compressed (issue #16:
/// most NARs of a closure are small, and each compressed one costs the peer an encoder and the
/// proxy a decoder for a few milliseconds of link time saved at most).
#[test]
fn small_nars_are_fetched_plain_from_a_zstd_peer() {
    use local_nix_cache::proxy::source::PEER_ZSTD_MIN_BYTES;
    let small = FakePath::new("zsmall", 100_000, 3);
    let large = FakePath::new("zlarge", 2 * PEER_ZSTD_MIN_BYTES as usize, 4);
    let peer = Arc::new(FakeCache::default());
    for p in [&small, &large] {
        peer.serve_path(p);
        let zst = zstd::encode_all(&p.nar[..], 1).expect("zstd");
        peer.set(&format!("/{}.zst", p.info.url), Reply::ok(zst));
    }
    let rig = Rig::new();
    rig.zstd_peer(peer.clone(), 1);
    let (proxy, px) = rig.proxy(vec![]);
    for p in [&small, &large] {
        let (_, nar, body) = fetch(proxy, p);
        assert_eq!(nar, 200);
        assert!(body == p.nar, "{}: right bytes", p.path);
    }
    let zst = |p: &FakePath| peer.requests_for(&format!("{}.zst", p.info.url));
    assert_eq!(
        (zst(&small), peer.requests_for(&small.info.url)),
        (0, 1),
        "small: plain"
    );
    assert_eq!((zst(&large), peer.requests_for(&large.info.url)), (1, 0), "large: zstd");
    assert_eq!(px.stats().nars_zstd_from_peers, 1);
}

/// Issue #16: with `peer-compression = "auto"`, each peer is fetched in the form that delivered
/// faster from it. Peer A sends its `.nar.zst` form late (a busy encoder) and its plain form at
/// once; peer B the other way round (a slow link, where fewer bytes win).
#[test]
fn auto_fetches_each_peer_in_the_form_that_delivered_faster() {
    use local_nix_cache::proxy::forms::{FIRST_TRIALS, MEASURE_MIN_BYTES};
    use local_nix_cache::settings::PeerCompression;
    const N: usize = 12;
    // Far longer than a 1.5 MiB transfer takes on loopback, even on a loaded machine.
    let late = Duration::from_secs(1);
    let rig = Rig::new();
    *rig.peer_compression.lock().expect("lock") = PeerCompression::Auto;
    let mut peers = Vec::new();
    for (id, zstd_late) in [(1u8, true), (2u8, false)] {
        let peer = Arc::new(FakeCache::default());
        let paths: Vec<FakePath> = (0..N)
            .map(|i| {
                FakePath::new(
                    &format!("auto{id}-{i}"),
                    MEASURE_MIN_BYTES as usize * 3 / 2,
                    id * 16 + i as u8,
                )
            })
            .collect();
        for p in &paths {
            let zst = Bytes::from(zstd::encode_all(&p.nar[..], 1).expect("zstd"));
            let (plain, zst) = if zstd_late {
                (Reply::ok(p.nar.clone()), Reply::slow(zst, late))
            } else {
                (Reply::slow(p.nar.clone(), late), Reply::ok(zst))
            };
            peer.serve_path(p);
            peer.set(&format!("/{}", p.info.url), plain);
            peer.set(&format!("/{}.zst", p.info.url), zst);
        }
        rig.zstd_peer(peer.clone(), id);
        peers.push((peer, paths, zstd_late));
    }
    let (proxy, px) = rig.proxy(vec![]);
    let mut zst_total = 0;
    for (peer, paths, zstd_late) in &peers {
        for p in paths {
            let (ni, nar, body) = fetch(proxy, p);
            assert_eq!((ni, nar), (200, 200), "{}", p.path);
            assert!(body == p.nar, "{}: right bytes", p.path);
        }
        let zst: usize = paths
            .iter()
            .map(|p| peer.requests_for(&format!("{}.zst", p.info.url)))
            .sum();
        let plain: usize = paths.iter().map(|p| peer.requests_for(&p.info.url)).sum();
        assert_eq!(zst + plain, N, "one fetch per NAR");
        zst_total += zst;
        let (fast, slow) = if *zstd_late { (plain, zst) } else { (zst, plain) };
        // Its trials, then the faster form but for one try of the other.
        assert!(
            slow <= FIRST_TRIALS as usize + 1,
            "peer {}: {fast} NARs in the faster form, {slow} in the slower",
            if *zstd_late {
                "with a late encoder"
            } else {
                "on a slow link"
            }
        );
    }
    assert_eq!(px.stats().nars_zstd_from_peers, zst_total as u64);
}

/// A peer's `.nar.zst` that stops mid-way leaves its decompressed bytes; the next peer is
/// asked for the rest of the plain NAR with `Range` (a compressed form cannot be resumed).
#[test]
fn a_broken_zstd_transfer_is_resumed_plain_from_the_next_peer() {
    let p = FakePath::new("zresume", 2 << 20, 9);
    let zst = Bytes::from(zstd::encode_all(&p.nar[..], 1).expect("zstd"));
    let rig = Rig::new();
    let peers: Vec<Arc<FakeCache>> = (1..=2u8)
        .map(|id| {
            let peer = Arc::new(FakeCache::default());
            peer.serve_path(&p);
            peer.set(
                &format!("/{}.zst", p.info.url),
                // All but its end, then nothing: the rate floor ends it (an abort could lose
                // what was sent; the fixture compresses so well that half its frame decodes to
                // nothing yet).
                Reply::Stall {
                    body: zst.clone(),
                    cut: zst.len() - 8,
                },
            );
            rig.zstd_peer(peer.clone(), id);
            peer
        })
        .collect();
    let (proxy, _px) = rig.proxy(vec![]);
    let (ni, nar, body) = fetch(proxy, &p);
    assert_eq!((ni, nar), (200, 200));
    assert!(body == p.nar, "right bytes");
    let zst_asked: usize = peers
        .iter()
        .map(|c| c.requests_for(&format!("{}.zst", p.info.url)))
        .sum();
    let ranges: Vec<String> = peers
        .iter()
        .flat_map(|c| c.ranges.lock().expect("lock").clone())
        .collect();
    assert_eq!(zst_asked, 1, "one peer was asked for the zstd form; ranges: {ranges:?}");
    let resumed_at: Vec<u64> = ranges
        .iter()
        .filter_map(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok())
        .collect();
    assert!(
        resumed_at.len() == 1 && resumed_at[0] > 0,
        "the rest of the plain NAR from the other peer: {ranges:?}"
    );
}
