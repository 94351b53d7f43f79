//! The store server's raw path (issue #27): a connection that starts with a plain NAR request is
//! served on the socket (NARs from disk with `sendfile`) until a request it is not sure about,
//! when hyper takes the connection over. Its answers are the hyper path's, byte for byte, apart
//! from `Date`; `http::raw::RAW_RESPONSES` shows the raw path answered.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::common::*;
use local_nix_cache::http::raw::RAW_RESPONSES;

/// A kept-alive connection that sends requests and reads answers one by one.
struct Conn {
    r: BufReader<TcpStream>,
}

impl Conn {
    fn open(addr: SocketAddr) -> Self {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        Self { r: BufReader::new(s) }
    }

    fn send(&mut self, raw: &str) {
        self.r.get_mut().write_all(raw.as_bytes()).expect("send");
    }

    fn ask(&mut self, method: &str, path: &str, headers: &[(&str, &str)]) -> Resp {
        self.send(&head(method, path, headers));
        self.read(method == "HEAD")
    }

    /// One answer (every answer here carries its `Content-Length`).
    fn read(&mut self, head: bool) -> Resp {
        let mut line = String::new();
        self.r.read_line(&mut line).expect("status line");
        let status = line.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status");
        let mut headers = Vec::new();
        loop {
            let mut l = String::new();
            self.r.read_line(&mut l).expect("header");
            let l = l.trim_end();
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').expect("header line");
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
        let mut resp = Resp {
            status,
            headers,
            body: Vec::new(),
        };
        if head {
            return resp;
        }
        if resp.header("transfer-encoding") == Some("chunked") {
            resp.body = self.read_chunks();
            return resp;
        }
        let len: usize = resp
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .expect("length");
        resp.body = vec![0; len];
        self.r.read_exact(&mut resp.body).expect("body");
        resp
    }

    /// A chunked body, through its last chunk (no trailers), dechunked.
    fn read_chunks(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let mut line = String::new();
            self.r.read_line(&mut line).expect("chunk size");
            let size = usize::from_str_radix(line.trim_end(), 16).expect("chunk size line");
            let at = body.len();
            body.resize(at + size, 0);
            self.r.read_exact(&mut body[at..]).expect("chunk");
            let mut crlf = [0; 2];
            self.r.read_exact(&mut crlf).expect("chunk end");
            assert_eq!(&crlf, b"\r\n", "chunk not ended by CRLF");
            if size == 0 {
                return body;
            }
        }
    }
}

fn head(method: &str, path: &str, headers: &[(&str, &str)]) -> String {
    let mut s = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n");
    for (k, v) in headers {
        s.push_str(&format!("{k}: {v}\r\n"));
    }
    s + "\r\n"
}

/// Headers that must agree between the two paths (all but `date` and `connection`; the load
/// header's value is the moment's: a transfer that just ended on the other connection may still
/// hold its slot).
fn comparable(r: &Resp) -> Vec<(String, String)> {
    let load = local_nix_cache::cache_url::LOAD_HEADER;
    let mut h: Vec<_> = r
        .headers
        .iter()
        .filter(|(k, _)| k != "date" && k != "connection")
        .map(|(k, v)| {
            let k = k.to_ascii_lowercase();
            let v = if k.eq_ignore_ascii_case(load) {
                "*".to_owned()
            } else {
                v.clone()
            };
            (k, v)
        })
        .collect();
    h.sort();
    h
}

fn nar_url(node: &TestNode, path: &str) -> String {
    let r = get(node.addr, &format!("/{}.narinfo", hash_of(path)));
    assert_eq!(r.status, 200);
    let text = String::from_utf8(r.body).expect("utf8");
    text.lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .map(|u| format!("/{u}"))
        .expect("URL")
}

fn disk_node(host: &Host, stall: Option<Duration>) -> TestNode {
    let mut args = serve_args(host.store_addr());
    args.store.real_store_dir = Some(host.physical_store().into());
    if let Some(s) = stall {
        args.server.client_stall_timeout = s;
    }
    TestNode::start(args)
}

/// Full NARs, ranges (first byte, middle, last, past the end), HEAD, keep-alive, pipelining and
/// the handoff to hyper: the raw answers equal hyper's, and the raw path answered them.
#[test]
fn raw_answers_equal_hypers_and_hand_over_to_it() {
    require!(nix, netns);
    let f = fixture();
    let host = Host::with_paths(&[&f.big, &f.top]);
    let node = disk_node(&host, None);
    let url = nar_url(&node, &f.big);
    let want = host.dump(&f.big);
    let n = want.len() as u64;
    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("GET", vec![]),
        ("HEAD", vec![]),
        ("GET", vec![("Range", "bytes=0-0".into())]),
        (
            "GET",
            vec![("Range", format!("bytes={}-{}", n / 2 - 7, n / 2 + 100_000))],
        ),
        ("GET", vec![("Range", "bytes=-1".into())]),
        ("GET", vec![("Range", format!("bytes={n}-"))]),
    ];
    let before = RAW_RESPONSES.load(Ordering::Relaxed);
    // One connection served raw throughout (keep-alive), one handed to hyper by a narinfo first.
    let mut raw = Conn::open(node.addr);
    let mut hyper = Conn::open(node.addr);
    let info = hyper.ask("GET", &format!("/{}.narinfo", hash_of(&f.big)), &[]);
    assert_eq!(info.status, 200);
    for (method, hs) in &cases {
        let hs: Vec<(&str, &str)> = hs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let a = raw.ask(method, &url, &hs);
        let b = hyper.ask(method, &url, &hs);
        assert_eq!(
            (a.status, comparable(&a)),
            (b.status, comparable(&b)),
            "{method} {hs:?}"
        );
        assert!(a.body == b.body, "{method} {hs:?}: the bodies differ");
    }
    assert!(
        RAW_RESPONSES.load(Ordering::Relaxed) >= before + cases.len() as u64,
        "the raw path did not answer"
    );
    // What it sent is the NAR: whole, and the ranges.
    let full = raw.ask("GET", &url, &[]);
    assert!(full.body == want, "the raw NAR differs from nix-store --dump");
    let mid = raw.ask("GET", &url, &[("Range", "bytes=10-4000")]);
    assert_eq!(mid.status, 206);
    assert!(mid.body == want[10..=4000]);
    // Every NAR of a tree (directories, an executable, a symlink), from disk.
    for p in &f.closure {
        let u = nar_url(&node, p);
        assert!(raw.ask("GET", &u, &[]).body == host.dump(p), "NAR of {p}");
    }
    // The same connection, now a narinfo: hyper answers it, and what follows.
    let info_raw = raw.ask("GET", &format!("/{}.narinfo", hash_of(&f.top)), &[]);
    assert_eq!(info_raw.status, 200);
    assert!(raw.ask("GET", &url, &[("Range", "bytes=0-99")]).body == want[..100]);
    // A pipelined pair in one write: a NAR range (raw), then a narinfo (handed over).
    let mut pipe = Conn::open(node.addr);
    let top_url = nar_url(&node, &f.top);
    pipe.send(&(head("GET", &top_url, &[]) + &head("GET", &format!("/{}.narinfo", hash_of(&f.top)), &[])));
    assert!(pipe.read(false).body == host.dump(&f.top));
    let second = pipe.read(false);
    assert_eq!(second.status, 200);
    assert!(String::from_utf8_lossy(&second.body).contains("StorePath: "));
    // A head over the raw cap goes to hyper, which answers it the same.
    let pad = "x".repeat(local_nix_cache::http::raw::MAX_RAW_HEAD);
    let long = request(node.addr, "GET", &top_url, &[("X-Pad", &pad)]);
    assert_eq!(long.status, 200);
    assert!(long.body == host.dump(&f.top));
    // `Connection: close` is honoured: the answer, then the end of the connection.
    let mut c = Conn::open(node.addr);
    let r = c.ask("GET", &top_url, &[("Connection", "close")]);
    assert_eq!(r.header("connection"), Some("close"));
    let mut rest = Vec::new();
    assert_eq!(c.r.read_to_end(&mut rest).expect("closed"), 0);
}

/// A raw client that takes nothing is cut off after the stall timeout (1 s here) and its transfer
/// slot freed, though it never read (reading what was sent before the cut would not tell: a
/// 4 KiB receive window on loopback crawls on the sender's window probes).
#[test]
fn raw_slow_reader_is_cut_off_by_the_pace() {
    require!(nix, netns);
    let f = fixture();
    let host = Host::with_paths(&[&f.big]);
    let node = disk_node(&host, Some(Duration::from_secs(1)));
    let url = nar_url(&node, &f.big);
    let s = TcpStream::connect(node.addr).expect("connect");
    let _ = socket2::SockRef::from(&s).set_recv_buffer_size(4096);
    let mut c = Conn { r: BufReader::new(s) };
    c.send(&head("GET", &url, &[]));
    // Its transfer runs (the load every answer carries), then ends though it never read.
    let streaming = |n: &str| {
        let r = get(node.addr, &format!("/{}.narinfo", hash_of(&f.big)));
        r.header(local_nix_cache::cache_url::LOAD_HEADER)
            .is_some_and(|l| l.starts_with(&format!("{n} ")))
    };
    let wait = |what, n| {
        wait_until(what, Duration::from_secs(20), Duration::from_millis(20), || {
            streaming(n)
        })
    };
    wait("the transfer to start", "1");
    wait("the stalled transfer to be cut off", "0");
    drop(c);
}

/// When the NAR's shares are taken, a proxy's raw request gets the busy answer (503,
/// `Retry-After`), the same code path as through hyper.
#[test]
fn raw_busy_answer_when_the_nar_is_shared_out() {
    require!(nix, netns);
    let f = fixture();
    let host = Host::with_paths(&[&f.big]);
    let node = disk_node(&host, None);
    let url = nar_url(&node, &f.big);
    let busy = [(local_nix_cache::cache_url::BUSY_OK_HEADER, "1")];
    // Two proxies stream the 32 MiB NAR and read nothing: its two shares are taken.
    let holders: Vec<Conn> = (0..2)
        .map(|_| {
            let s = TcpStream::connect(node.addr).expect("connect");
            let _ = socket2::SockRef::from(&s).set_recv_buffer_size(4096);
            let mut c = Conn { r: BufReader::new(s) };
            c.send(&head("GET", &url, &busy));
            let mut line = String::new();
            c.r.read_line(&mut line).expect("status");
            assert!(line.contains(" 200 "), "{line}");
            c
        })
        .collect();
    let before = RAW_RESPONSES.load(Ordering::Relaxed);
    let mut c = Conn::open(node.addr);
    let r = c.ask("GET", &url, &busy);
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.header("retry-after").is_some(), "{r:?}");
    assert!(
        RAW_RESPONSES.load(Ordering::Relaxed) > before,
        "the raw path did not answer"
    );
    drop(holders);
}

/// At shutdown a raw response being written is finished within the drain time, then the
/// connection closes (no further request on it). Checked: with the drain waiting for hyper's
/// connections only (no watcher held through the raw part, no join of the tasks), the NAR is cut.
#[test]
fn a_raw_response_in_flight_is_drained_at_shutdown() {
    require!(nix, netns);
    let f = fixture();
    let host = Host::with_paths(&[&f.big]);
    let node = disk_node(&host, None);
    let url = nar_url(&node, &f.big);
    let want = host.dump(&f.big);
    let mut c = Conn::open(node.addr);
    c.send(&head("GET", &url, &[]));
    let mut line = String::new();
    c.r.read_line(&mut line).expect("status");
    assert!(line.contains(" 200 "), "{line}");
    // Stop the node (its drop waits for the drain) while the 32 MiB are still on their way.
    let stopping = std::thread::spawn(move || drop(node));
    let mut rest = Vec::new();
    c.r.read_to_end(&mut rest).expect("read to the end");
    stopping.join().expect("node stopped");
    let body_at = rest.windows(4).position(|w| w == b"\r\n\r\n").expect("end of head") + 4;
    assert!(
        rest[body_at..] == want[..],
        "the NAR was cut at shutdown ({} bytes)",
        rest.len() - body_at
    );
}

/// A proxy asks peers for NARs on connections of their own (`proxy::source`), so its NAR
/// requests start them and the peer serves them raw, though the proxy asked the narinfo just
/// before: real `serve` hosts, real Nix, offline. Checked: with the NAR requests on the narinfo's
/// pooled connections, the peer's log has no raw line.
#[test]
fn a_proxys_nar_requests_reach_the_raw_path() {
    require!(nix, netns);
    let f = fixture();
    let mut lan = crate::common::nixlan::NixLan::new(&[&[&f.top], &[]]);
    lan.upstream.stop();
    let up = lan.upstream.url();
    lan.serve_all(&up);
    lan.wait_peers(1, &[0], Duration::from_secs(5)).expect("peer not found");
    ok("nix-store -r through the proxy", &lan.hosts[1].realise(&[&f.top]));
    let log = lan.hosts[0].log();
    let raw = log
        .lines()
        .filter(|l| l.contains("NAR served") && l.contains("raw=true"))
        .count();
    assert_eq!(
        raw,
        f.closure.len(),
        "NARs the peer served raw, of {}:\n{log}",
        f.closure.len()
    );
}

/// Issue #27: a `.nar.zst` GET is served raw too, chunked as hyper sends it. A NAR that compresses
/// (32 MiB of zeros) stays compressed; one that does not (8 MiB of random bytes) goes on as raw
/// blocks once the encoder gave up on it, their contents sent with `sendfile` from the file and
/// the framing after it. Both decode to the NAR, the answers' headers equal hyper's, the raw
/// path answered, and the connection serves the next request.
#[test]
fn raw_zstd_answers_decode_to_the_nar_and_keep_the_connection() {
    require!(nix, netns);
    let f = fixture();
    let host = Host::with_paths(&[&f.big, &f.rand]);
    let node = disk_node(&host, None);
    let mut raw = Conn::open(node.addr);
    let mut hyper = Conn::open(node.addr);
    assert_eq!(
        hyper.ask("GET", &format!("/{}.narinfo", hash_of(&f.big)), &[]).status,
        200
    );
    for path in [&f.big, &f.rand] {
        let url = format!("{}.zst", nar_url(&node, path));
        let want = host.dump(path);
        let before = RAW_RESPONSES.load(Ordering::Relaxed);
        let a = raw.ask("GET", &url, &[]);
        assert_eq!(
            RAW_RESPONSES.load(Ordering::Relaxed),
            before + 1,
            "{path}: not served raw"
        );
        let b = hyper.ask("GET", &url, &[]);
        assert_eq!((a.status, comparable(&a)), (b.status, comparable(&b)), "{path}");
        assert_eq!(a.header("transfer-encoding"), Some("chunked"));
        let decoded = zstd::stream::decode_all(&a.body[..]).expect("one zstd frame");
        assert!(decoded == want, "{path}: the raw .nar.zst does not decode to the NAR");
        assert!(zstd::stream::decode_all(&b.body[..]).expect("hyper's frame") == want);
        if path == &f.big {
            assert!(
                a.body.len() < want.len() / 100,
                "zeros not compressed: {} bytes",
                a.body.len()
            );
        } else {
            assert!(a.body.len() > want.len(), "random bytes shrank: {} bytes", a.body.len());
        }
        // The same connection goes on, still raw.
        let plain = nar_url(&node, path);
        assert!(raw.ask("GET", &plain, &[("Range", "bytes=0-99")]).body == want[..100]);
    }
}
