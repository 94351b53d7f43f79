//! Issue #24, the mechanism behind a flash crowd: a holder whose transfer slots are all taken
//! answers its peers' proxies "busy" instead of queueing them into a miss, and the proxies come
//! back (and leave the upstream alone while a peer holds the path).
//!
//! The holder is a real store server (in-process node, private nix-daemon, transfer cap 2: the
//! daemon connections NAR streams may use); its slots are held by two raw clients that read
//! nothing, so every proxy meets a full server, whatever the machine's speed. No timed
//! assertions: the outcome (every proxy delivers the verified NAR) and request counts.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use crate::common::fake::{test_key, FakeCache, FakePath, Reply, Rig};
use crate::common::*;
use local_nix_cache::beacon::wire::FLAG_NAR_NONE;
use local_nix_cache::cache_url;
use local_nix_cache::narinfo::{PublicKey, TrustedKeys};
use local_nix_cache::proxy::Proxy;

/// Proxies fetching the same NAR at once: three times the holder's slots.
const CROWD: usize = 6;

/// A status and a body.
type Answer = (u16, Vec<u8>);

/// A GET whose answer may take long (a crowd on a loaded machine): as `get`, with a 180 s read
/// timeout instead of 30 s. Only for answers with a `Content-Length` (the proxy's NARs).
fn get_slow(addr: SocketAddr, path: &str) -> Answer {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(180))).expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").expect("send");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read response");
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("header end");
    let status = String::from_utf8_lossy(&raw[..end])
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    (status, raw[end + 4..].to_vec())
}

/// The NAR URL of `path` as a store server (and the proxy) serve it.
fn nar_url(host: &Host, node: &TestNode, path: &str) -> (String, Vec<u8>) {
    let info = get(node.addr, &format!("/{}.narinfo", hash_of(path)));
    assert_eq!(info.status, 200, "the holder serves {path}");
    let text = String::from_utf8_lossy(&info.body).to_string();
    let url = text
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .expect("URL line")
        .to_owned();
    (format!("/{url}"), host.dump(path))
}

/// Takes one transfer slot of the server at `addr`: a GET of `url` whose body is not read past
/// its first bytes (the server keeps the slot while its client keeps pace, ten seconds at least).
fn hold_slot(addr: SocketAddr, url: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(s, "GET {url} HTTP/1.1\r\nHost: test\r\n\r\n").expect("send");
    let mut first = [0u8; 64];
    let n = s.read(&mut first).expect("the body started");
    assert!(
        first[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&first[..n])
    );
    s
}

/// A holder with both slots taken, `CROWD` proxies asking it for the same NAR at once; returns
/// the rig, the proxies and the running requests (answers: status and body).
struct Crowd {
    rig: Rig,
    proxies: Vec<Arc<Proxy>>,
    asks: Vec<std::thread::JoinHandle<Answer>>,
    held: Vec<TcpStream>,
}

fn crowd_at_a_full_holder(node: &TestNode, url: &str, upstreams: Vec<String>) -> Crowd {
    crowd_asking(node, url, url, None, upstreams)
}

/// As [`crowd_at_a_full_holder`], the slots held with `held_url` and the crowd asking `url`,
/// after looking up `narinfo` first when given (as Nix does).
fn crowd_asking(node: &TestNode, held_url: &str, url: &str, narinfo: Option<String>, upstreams: Vec<String>) -> Crowd {
    let rig = Rig::new();
    rig.announce(node.addr, node.node_id, FLAG_NAR_NONE, None);
    let held = vec![hold_slot(node.addr, held_url), hold_slot(node.addr, held_url)];
    let mut proxies = Vec::new();
    let mut asks = Vec::new();
    for _ in 0..CROWD {
        let keys = TrustedKeys::new(vec![PublicKey::parse(&fixture().pk).expect("fixture key")]);
        let (addr, p) = rig.proxy_trusting(upstreams.clone(), keys);
        proxies.push(p);
        let (url, narinfo) = (url.to_owned(), narinfo.clone());
        asks.push(std::thread::spawn(move || {
            if let Some(n) = narinfo {
                assert_eq!(get(addr, &n).status, 200, "the lookup of {n}");
            }
            get_slow(addr, &url)
        }));
    }
    Crowd {
        rig,
        proxies,
        asks,
        held,
    }
}

impl Crowd {
    /// Waits until every proxy met the full holder (a busy answer each), then frees its slots.
    fn release_once_all_met_busy(&mut self) {
        wait_until(
            "every proxy got a busy answer from the full holder",
            Duration::from_secs(30),
            Duration::from_millis(50),
            || self.proxies.iter().all(|p| p.stats().busy_answers >= 1),
        );
        self.held.clear();
    }

    /// Every answer, once all came.
    fn answers(self) -> (Rig, Vec<Arc<Proxy>>, Vec<Answer>) {
        let answers = self
            .asks
            .into_iter()
            .map(|t| t.join().expect("request thread"))
            .collect();
        (self.rig, self.proxies, answers)
    }
}

/// Issue #24: a crowd past the holder's transfer cap, no upstream (an offline hall). Before, the
/// holder queued the requests past its cap, the proxies gave up on its headers after 3 s and
/// answered Nix 404: failed builds while the holder had the path. Now every proxy delivers it.
#[test]
fn a_crowd_past_the_holders_cap_all_get_the_nar_without_an_upstream() {
    require!(nix);
    let f = fixture();
    let host = Host::with_paths(&[&f.big]);
    let node = TestNode::start(serve_args(host.store_addr()));
    let (url, nar) = nar_url(&host, &node, &f.big);
    let mut crowd = crowd_at_a_full_holder(&node, &url, vec![]);
    crowd.release_once_all_met_busy();
    let (_rig, proxies, answers) = crowd.answers();
    for (i, (status, body)) in answers.iter().enumerate() {
        assert_eq!(*status, 200, "proxy {i} answered {status}");
        assert!(*body == nar, "proxy {i} delivered the wrong bytes");
    }
    for p in &proxies {
        let s = p.stats();
        assert_eq!((s.nars_from_peers, s.nar_failures), (1, 0), "{s:?}");
    }
}

/// The signed fixture cache's narinfo and xz NAR of `path`, served by a fake upstream that
/// counts requests (with the rig that runs it, and its URL).
fn upstream_with(path: &str) -> (Arc<FakeCache>, Rig, String) {
    let f = fixture();
    let upstream = Arc::new(FakeCache::default());
    let cache_dir = f.cache_url.trim_start_matches("file://");
    let narinfo = std::fs::read_to_string(format!("{cache_dir}/{}.narinfo", hash_of(path))).expect("narinfo");
    let xz_url = narinfo
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .expect("URL")
        .to_owned();
    let xz = std::fs::read(format!("{cache_dir}/{xz_url}")).expect("xz NAR");
    upstream.set(&format!("/{}.narinfo", hash_of(path)), Reply::ok(narinfo));
    upstream.set(&format!("/{xz_url}"), Reply::ok(xz));
    let rig = Rig::new();
    let url = format!("http://{}/", rig.cache(upstream.clone()));
    (upstream, rig, url)
}

/// Issue #24: the same crowd with an upstream that has the path: while the holder is busy the
/// proxies wait for it instead of all going to the internet at once (before: one upstream NAR
/// per proxy).
#[test]
fn a_crowd_at_a_busy_holder_leaves_the_upstream_alone() {
    require!(nix);
    let f = fixture();
    let host = Host::with_paths(&[&f.big]);
    let node = TestNode::start(serve_args(host.store_addr()));
    let (url, nar) = nar_url(&host, &node, &f.big);
    let (upstream, _up_rig, up) = upstream_with(&f.big);
    let mut crowd = crowd_at_a_full_holder(&node, &url, vec![up]);
    crowd.release_once_all_met_busy();
    let (_rig, proxies, answers) = crowd.answers();
    for (i, (status, body)) in answers.iter().enumerate() {
        assert_eq!(*status, 200, "proxy {i} answered {status}");
        assert!(*body == nar, "proxy {i} delivered the wrong bytes");
    }
    assert_eq!(
        upstream.requests_for(".nar.xz"),
        0,
        "the upstream was asked for the NAR"
    );
    // Nor for its narinfo (each fetch gathered the NAR's sources and asked the upstream too,
    // once per proxy, while the holder had it).
    assert!(
        upstream.requests_for(".narinfo") <= UPSTREAM_ASKS,
        "the upstream was asked for the narinfo {} times",
        upstream.requests_for(".narinfo")
    );
    let from_peers: u64 = proxies.iter().map(|p| p.stats().nars_from_peers).sum();
    assert_eq!(from_peers, CROWD as u64);
}

/// Issue #24: as Nix does, each proxy of the crowd looks the path up (the holder answers) and
/// then fetches its NAR, a small one (fetched from one source, its other sources not gathered
/// first); the holder's slots are full. The gather that followed the busy answer skipped the
/// holder (tried), found no other peer with the NAR and asked the upstream for the narinfo, once
/// per proxy (the crowd benchmark: 16 narinfo requests for 40 hosts). Now a fetch that knows a
/// busy peer holds the NAR leaves the upstreams out of its gathers.
#[test]
fn a_crowd_that_looked_the_path_up_leaves_the_upstream_alone_at_a_busy_holder() {
    require!(nix);
    let f = fixture();
    let small = f.closure.iter().find(|p| **p != f.top).expect("a small path").clone();
    let host = Host::with_paths(&[&f.big, &small]);
    let node = TestNode::start(serve_args(host.store_addr()));
    let (held_url, _) = nar_url(&host, &node, &f.big);
    let (url, nar) = nar_url(&host, &node, &small);
    let (upstream, _up_rig, up) = upstream_with(&small);
    let lookup = format!("/{}.narinfo", hash_of(&small));
    let mut crowd = crowd_asking(&node, &held_url, &url, Some(lookup), vec![up]);
    crowd.release_once_all_met_busy();
    let (_rig, _proxies, answers) = crowd.answers();
    for (i, (status, body)) in answers.iter().enumerate() {
        assert_eq!(*status, 200, "proxy {i} answered {status}");
        assert!(*body == nar, "proxy {i} delivered the wrong bytes");
    }
    let asked = upstream.requests_for(".narinfo") + upstream.requests_for(".nar.xz");
    assert!(
        asked <= UPSTREAM_ASKS,
        "{asked} upstream requests for one path from {CROWD} proxies"
    );
}

/// "A few" upstream requests per path for a whole crowd (issue #24's goal).
const UPSTREAM_ASKS: usize = 2;

/// Issue #24: a crowd with an upstream, looking the path up and fetching it, while its one
/// holder (whose summary claims it) answers narinfo later than the hedge, as a loaded holder
/// does (400 ms). Before, every proxy's lookup asked the upstream 150 ms after the peers, and
/// every fetch that gathered the NAR's sources asked it again: twice per host (the crowd
/// benchmark: 97 narinfo requests for 100 hosts). Now the upstream waits for the claiming peer,
/// and a gather leaves it alone while a peer has the NAR.
#[test]
fn a_crowd_leaves_the_upstream_alone_while_a_slow_holder_claims_the_path() {
    let rig = Rig::new();
    // Past the rig's split size (4 MiB), so each fetch gathers the NAR's sources.
    let p = FakePath::new("crowd-upstream", 5 << 20, 24);
    let holder = Arc::new(FakeCache::default());
    holder.serve_path(&p);
    holder.set(
        &format!("/{}.narinfo", p.hash()),
        Reply::slow(p.info.render(), Duration::from_millis(400)),
    );
    rig.peer_with_summary(holder.clone(), 1);
    let upstream = Arc::new(FakeCache::default());
    upstream.serve_path(&p);
    let up_rig = Rig::new();
    let up = format!("http://{}/", up_rig.cache(upstream.clone()));
    let proxies: Vec<(SocketAddr, Arc<Proxy>)> = (0..CROWD).map(|_| rig.proxy(vec![up.clone()])).collect();
    wait_until(
        "every proxy has the holder's summary",
        Duration::from_secs(20),
        Duration::from_millis(50),
        || {
            proxies
                .iter()
                .all(|(_, px)| px.status().peers.iter().any(|x| x.summary.is_some()))
        },
    );
    let asks: Vec<_> = proxies
        .iter()
        .map(|(addr, _)| {
            let (addr, info, url) = (*addr, format!("/{}.narinfo", p.hash()), p.nar_url());
            std::thread::spawn(move || (get(addr, &info).status, get_slow(addr, &url)))
        })
        .collect();
    for (i, t) in asks.into_iter().enumerate() {
        let (info, (status, body)) = t.join().expect("request thread");
        assert_eq!((info, status), (200, 200), "proxy {i}");
        assert!(body == p.nar, "proxy {i} delivered the wrong bytes");
    }
    let asked = upstream.requests_for(".narinfo") + upstream.requests_for(".nar");
    assert!(
        asked <= UPSTREAM_ASKS,
        "{asked} upstream requests for one path from {CROWD} proxies"
    );
}

/// A node D (real `serve` in-process: store server and proxy) fetching `p` from a slow upstream
/// that sends 128 KiB every 100 ms until the test opens `gate`; `bad_at`: a byte of the NAR the
/// upstream flips (a lying source behind D).
struct Downloader {
    _host: Host,
    node: TestNode,
    upstream: Arc<FakeCache>,
    gate: Arc<tokio::sync::Semaphore>,
    /// D's own Nix asking its proxy for the NAR (what starts D's fetch).
    own: Option<std::thread::JoinHandle<Answer>>,
    _upstream_rig: Rig,
}

impl Downloader {
    fn start(p: &FakePath, bad_at: Option<usize>) -> Self {
        let host = Host::with_paths(&[]);
        let upstream = Arc::new(FakeCache::default());
        upstream.set(&format!("/{}.narinfo", p.hash()), Reply::ok(p.info.render()));
        let mut nar = p.nar.to_vec();
        if let Some(at) = bad_at {
            nar[at] ^= 1;
        }
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        upstream.set(
            &format!("/{}", p.info.url),
            Reply::Gated {
                body: nar.into(),
                piece: 128 * 1024,
                every: Duration::from_millis(100),
                gate: gate.clone(),
            },
        );
        let upstream_rig = Rig::new();
        let up = format!("http://{}/", upstream_rig.cache(upstream.clone()));
        let state = tempfile::tempdir().expect("state").keep();
        let settings = local_nix_cache::cli::serve_settings([
            "--state-dir",
            &state.display().to_string(),
            "--store",
            &host.store_addr().to_string(),
            "--listen",
            "127.0.0.1:0",
            "--proxy-listen",
            "127.0.0.1:0",
            "--trusted-public-key",
            &test_key().public().to_string(),
            "--daemon-connections",
            "4",
            "--no-beacon",
            "--upstream",
            &up,
        ])
        .expect("settings");
        let node = TestNode::start(settings);
        Self {
            _host: host,
            node,
            upstream,
            gate,
            own: None,
            _upstream_rig: upstream_rig,
        }
    }

    /// D's Nix asks D's proxy for the NAR; returns once D's store server offers it to proxies
    /// (its narinfo answered, marked in flight).
    fn fetch_and_offer(&mut self, p: &FakePath, proxy: SocketAddr) {
        let url = p.nar_url();
        self.own = Some(std::thread::spawn(move || get_slow(proxy, &url)));
        let addr = self.node.addr;
        let path = format!("/{}.narinfo", p.hash());
        wait_until(
            "D's store server offers the NAR it is fetching",
            Duration::from_secs(20),
            Duration::from_millis(20),
            || {
                let r = request(addr, "GET", &path, &[(cache_url::BUSY_OK_HEADER, "1")]);
                r.status == 200 && r.header(cache_url::PARTIAL_HEADER).is_some()
            },
        );
        // A Nix client (no proxy header) is never offered an in-flight path.
        assert_eq!(get(addr, &path).status, 404);
    }

    /// Waits until D's store server streams a NAR body to a peer, then lets its upstream finish.
    fn open_gate_once_serving(&self) {
        let addr = self.node.addr;
        wait_until(
            "D's store server streams the in-flight NAR to a peer",
            Duration::from_secs(20),
            Duration::from_millis(20),
            || {
                let r = get(addr, "/nix-cache-info");
                r.header(cache_url::LOAD_HEADER)
                    .and_then(cache_url::Load::parse)
                    .is_some_and(|l| l.streaming >= 1)
            },
        );
        self.gate.add_permits(1 << 20);
    }
}

/// The proxy address of a node (its store server's address is `node.addr`).
fn proxy_addr(node: &TestNode) -> SocketAddr {
    node.proxy_addr.expect("the node's proxy listens")
}

/// Issue #24: a host that is itself fetching P answers another proxy's request for P with the
/// bytes it has, following its spool as it grows, and that proxy gets a verified P. Before, only
/// imported paths were served: the other proxy, with no other source, answered 404.
#[test]
fn a_host_fetching_a_nar_serves_it_to_a_peer_while_it_arrives() {
    require!(nix);
    let p = FakePath::new("crowd-inflight", 24 << 20, 31);
    let mut d = Downloader::start(&p, None);
    d.fetch_and_offer(&p, proxy_addr(&d.node));
    let rig = Rig::new();
    rig.announce(d.node.addr, d.node.node_id, FLAG_NAR_NONE, None);
    let (r_addr, r) = rig.proxy(vec![]);
    let url = p.nar_url();
    let asked = std::thread::spawn(move || get_slow(r_addr, &url));
    d.open_gate_once_serving();
    let (status, body) = asked.join().expect("R's request");
    assert_eq!(status, 200);
    assert!(body == p.nar, "R delivered the NAR");
    let (status, body) = d.own.take().expect("D's request").join().expect("D's request");
    assert!(status == 200 && body == p.nar, "D delivered it too");
    assert_eq!(r.stats().nars_from_peers, 1);
    assert_eq!(
        d.upstream.requests_for(&p.info.url),
        1,
        "only D fetched the NAR from the upstream"
    );
}

/// Issue #24: an in-flight copy whose source lied costs time only: the receiving proxy does not
/// pass its bytes on, verifies the NAR whole and gets it from an honest holder.
#[test]
fn a_corrupt_in_flight_copy_costs_time_only() {
    require!(nix);
    let p = FakePath::new("crowd-inflight-bad", 24 << 20, 37);
    let mut d = Downloader::start(&p, Some(5 << 20));
    d.fetch_and_offer(&p, proxy_addr(&d.node));
    let rig = Rig::new();
    rig.announce(d.node.addr, d.node.node_id, FLAG_NAR_NONE, None);
    // An honest holder, whose narinfo comes a moment after D's: R asks D first.
    let honest = Arc::new(FakeCache::default());
    honest.serve_path(&p);
    honest.set(
        &format!("/{}.narinfo", p.hash()),
        Reply::slow(p.info.render(), Duration::from_millis(150)),
    );
    rig.peer(honest.clone(), 9);
    let (r_addr, r) = rig.proxy(vec![]);
    // Nix asks for the narinfo first: D answers first and wins the race.
    let info = get(r_addr, &format!("/{}.narinfo", p.hash()));
    assert_eq!(info.status, 200);
    let url = p.nar_url();
    let asked = std::thread::spawn(move || get_slow(r_addr, &url));
    d.open_gate_once_serving();
    let (status, body) = asked.join().expect("R's request");
    assert_eq!(status, 200);
    assert!(body == p.nar, "R delivered the right NAR");
    assert!(honest.requests_for(&p.info.url) >= 1, "the honest holder sent it");
    let s = r.stats();
    assert_eq!(
        (s.nars_from_peers, s.nar_failures, s.nars_passed_through),
        (1, 0, 0),
        "{s:?}"
    );
    let _ = d.own.take().map(|t| t.join());
}

/// Bytes a host's namespace sent on its LAN link so far.
fn tx_bytes(ns: &str) -> u64 {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "cat", "/sys/class/net/eth0/statistics/tx_bytes"])
        .output()
        .expect("ip netns exec");
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("tx_bytes")
}

/// Issue #24 with real `serve` hosts and real Nix: one holder, six hosts realising its 8 MiB
/// path of random bytes (zstd cannot shrink it) at once, offline. Every host realises it, and the holder sends at most three copies
/// (before: one per host, a star): it streams the NAR to two proxies at once and names them to
/// the others, which fetch from their bytes so far (a tree). Byte counts, no timing.
#[test]
fn a_real_crowd_forms_a_tree_and_the_holder_sends_at_most_three_copies() {
    require!(nix, netns);
    let f = fixture();
    const HOSTS: usize = 6;
    let mut stores: Vec<&[&str]> = vec![&[]; HOSTS + 1];
    let held = [f.rand.as_str()];
    stores[0] = &held;
    let mut lan = crate::common::nixlan::NixLan::new(&stores);
    // The holder's link is slower than the others' (a speaker's laptop on Wi-Fi): hosts that
    // wait for it are better served by those that already get it.
    lan.hosts[0].shape_egress("50mbit");
    lan.upstream.stop();
    let up = lan.upstream.url();
    lan.serve_all(&up);
    for i in 1..=HOSTS {
        wait_until(
            "every host knows the holder",
            Duration::from_secs(20),
            Duration::from_millis(50),
            || {
                lan.hosts[i]
                    .peer_addrs()
                    .contains(&format!("{}:8380", lan.hosts[0].net.ip4))
            },
        );
    }
    let size = std::fs::metadata(lan.hosts[0].store.root.join(f.rand.trim_start_matches('/')))
        .map(|m| m.len())
        .expect("held path");
    let before = tx_bytes(&lan.hosts[0].net.ns);
    let outs: Vec<std::process::Output> = std::thread::scope(|s| {
        let runs: Vec<_> = (1..=HOSTS)
            .map(|i| {
                let h = &lan.hosts[i];
                let p = f.rand.as_str();
                s.spawn(move || h.realise(&[p]))
            })
            .collect();
        runs.into_iter().map(|r| r.join().expect("realise thread")).collect()
    });
    let sent = tx_bytes(&lan.hosts[0].net.ns) - before;
    for (i, o) in outs.iter().enumerate() {
        assert!(
            o.status.success(),
            "host {} failed: {}\n--- its serve log:\n{}",
            i + 1,
            String::from_utf8_lossy(&o.stderr),
            lan.hosts[i + 1].log()
        );
        assert!(lan.hosts[i + 1].has(&f.rand), "host {} lacks the path", i + 1);
    }
    eprintln!("holder sent {sent} bytes for {HOSTS} hosts of a {size}-byte path");
    for (i, h) in lan.hosts.iter().enumerate() {
        let st = &h.status()["stats"];
        eprintln!(
            "host {i}: sent {} busy answers {}",
            tx_bytes(&h.net.ns),
            st["busy_answers"]
        );
    }
    assert!(
        sent <= 3 * size + size / 2,
        "the holder sent {sent} bytes, {:.1} copies",
        sent as f64 / size as f64
    );
}

/// Issue #24 (later waves): a split fetch whose segment's peer fails hands that segment to
/// another peer, from where it stood, once one is free. Before, the split was given up, the
/// other segments (fetched whole meanwhile) thrown away and the NAR fetched again whole from one
/// peer: its senders paid 5/3 of it here, bytes nobody kept (in the crowd benchmark's second
/// wave, 38.6 × P sent for 24 × P received).
#[test]
fn a_failed_segment_goes_on_from_another_peer_and_no_byte_is_fetched_twice() {
    let p = FakePath::new("split-moved", 6_000_000, 12);
    let rig = Rig::new();
    let peers: Vec<Arc<FakeCache>> = (0..3).map(|_| Arc::new(FakeCache::default())).collect();
    for (i, c) in peers.iter().enumerate() {
        c.serve_path(&p);
        rig.peer(c.clone(), i as u8 + 1);
    }
    // The second peer fails every NAR request (whichever segment it is given).
    peers[1].set(&format!("/{}", p.info.url), Reply::Status(500));
    let (proxy, px) = rig.proxy(vec![]);
    assert_eq!(get(proxy, &format!("/{}.narinfo", p.hash())).status, 200);
    let nar = get_slow(proxy, &p.nar_url());
    assert_eq!(nar.0, 200);
    assert!(nar.1 == p.nar, "wrong bytes delivered");
    let s = px.stats();
    let n = p.nar.len() as u64;
    assert!(
        s.bytes_from_peers <= n + n / 10,
        "{} bytes fetched for a NAR of {n} ({s:?})",
        s.bytes_from_peers
    );
}

/// Issue #24: a fetch whose source runs slow (a holder queued behind a crowd, a slow relay)
/// goes on with `Range` from a peer that got the whole NAR since. Before, a fetch kept its
/// first source to the end: here a holder sending 160 KB/s, while a host that got the path a
/// moment after the fetch began could send it at once.
#[test]
fn a_slow_fetch_goes_on_from_a_peer_that_got_the_nar_since() {
    let p = FakePath::new("slow-then-fast", 3_000_000, 13);
    let rig = Rig::new();
    let slow = Arc::new(FakeCache::default());
    slow.serve_path(&p);
    slow.set(
        &format!("/{}", p.info.url),
        Reply::Gated {
            body: p.nar.clone(),
            piece: 16 * 1024,
            every: Duration::from_millis(100),
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
        },
    );
    rig.peer(slow.clone(), 1);
    // A host with nothing yet: it gets the path once the fetch is under way.
    let fast = Arc::new(FakeCache::default());
    rig.peer(fast.clone(), 2);
    let (proxy, px) = rig.proxy(vec![]);
    assert_eq!(get(proxy, &format!("/{}.narinfo", p.hash())).status, 200);
    let url = p.nar_url();
    let nar = std::thread::spawn(move || get_slow(proxy, &url));
    wait_until(
        "the fetch began at the slow holder",
        Duration::from_secs(20),
        Duration::from_millis(20),
        || slow.requests_for(&p.info.url) >= 1,
    );
    fast.serve_path(&p);
    let (status, body) = nar.join().expect("request thread");
    assert_eq!(status, 200);
    assert!(body == p.nar, "wrong bytes delivered");
    let ranges = fast.ranges.lock().expect("lock").clone();
    assert!(
        ranges.iter().any(|r| !r.starts_with("bytes=0-")),
        "the fast peer was not asked to go on where the slow one stood: {ranges:?} ({:?})",
        px.stats()
    );
}
