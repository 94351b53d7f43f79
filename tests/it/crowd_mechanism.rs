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

use crate::common::fake::{FakeCache, Reply, Rig};
use crate::common::*;
use local_nix_cache::beacon::wire::FLAG_NAR_NONE;
use local_nix_cache::narinfo::{PublicKey, TrustedKeys};
use local_nix_cache::proxy::Proxy;

/// Proxies fetching the same NAR at once: three times the holder's slots.
const CROWD: usize = 6;

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
    asks: Vec<std::thread::JoinHandle<Resp>>,
    held: Vec<TcpStream>,
}

fn crowd_at_a_full_holder(node: &TestNode, url: &str, upstreams: Vec<String>) -> Crowd {
    let rig = Rig::new();
    rig.announce(node.addr, node.node_id, FLAG_NAR_NONE, None);
    let held = vec![hold_slot(node.addr, url), hold_slot(node.addr, url)];
    let mut proxies = Vec::new();
    let mut asks = Vec::new();
    for _ in 0..CROWD {
        let keys = TrustedKeys::new(vec![PublicKey::parse(&fixture().pk).expect("fixture key")]);
        let (addr, p) = rig.proxy_trusting(upstreams.clone(), keys);
        proxies.push(p);
        let url = url.to_owned();
        asks.push(std::thread::spawn(move || get(addr, &url)));
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
    fn answers(self) -> (Rig, Vec<Arc<Proxy>>, Vec<Resp>) {
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
    for (i, r) in answers.iter().enumerate() {
        assert_eq!(r.status, 200, "proxy {i} answered {}", r.status);
        assert!(r.body == nar, "proxy {i} delivered the wrong bytes");
    }
    for p in &proxies {
        let s = p.stats();
        assert_eq!((s.nars_from_peers, s.nar_failures), (1, 0), "{s:?}");
    }
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
    // The upstream: the signed fixture cache (xz NARs), served by a fake that counts requests.
    let upstream = Arc::new(FakeCache::default());
    let cache_dir = f.cache_url.trim_start_matches("file://");
    let narinfo = std::fs::read_to_string(format!("{cache_dir}/{}.narinfo", hash_of(&f.big))).expect("narinfo");
    let xz_url = narinfo
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .expect("URL")
        .to_owned();
    let xz = std::fs::read(format!("{cache_dir}/{xz_url}")).expect("xz NAR");
    upstream.set(&format!("/{}.narinfo", hash_of(&f.big)), Reply::ok(narinfo));
    upstream.set(&format!("/{xz_url}"), Reply::ok(xz));
    let rig_upstream = Rig::new();
    let up = format!("http://{}/", rig_upstream.cache(upstream.clone()));
    let mut crowd = crowd_at_a_full_holder(&node, &url, vec![up]);
    crowd.release_once_all_met_busy();
    let (_rig, proxies, answers) = crowd.answers();
    for (i, r) in answers.iter().enumerate() {
        assert_eq!(r.status, 200, "proxy {i} answered {}", r.status);
        assert!(r.body == nar, "proxy {i} delivered the wrong bytes");
    }
    assert_eq!(
        upstream.requests_for(".nar.xz"),
        0,
        "the upstream was asked for the NAR"
    );
    let from_peers: u64 = proxies.iter().map(|p| p.stats().nars_from_peers).sum();
    assert_eq!(from_peers, CROWD as u64);
}
