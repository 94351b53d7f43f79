//! The store server against a real nix-daemon on a chroot store and the real Nix client: this
//! machine's Nix 2.8, and (the `_nix226` tests) the daemon and client of Nix 2.26 from the Debian
//! 13 root that `./run nix-root` builds.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::roots::{self, HOST_MOUNT};
use crate::common::*;
use local_nix_cache::store::{DaemonConnection, StoreAddr};

#[test]
fn handshake_negotiates_the_newest_protocol_both_speak() {
    require!(nix, netns);
    let Some(Some(root)) = roots::nix_under_test(true) else {
        return;
    };
    let f = fixture();
    let old = Host::with_paths(&[&f.top]);
    let new = Host::with_paths_on(&[&f.top], Some(&root));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for (host, minor, version) in [(&old, 34, "2.8"), (&new, 38, "2.26")] {
        rt.block_on(async {
            let s = tokio::net::UnixStream::connect(&host.socket).await.expect("connect");
            let (r, w) = s.into_split();
            let hs = DaemonConnection::handshake(Box::pin(r), Box::pin(w), None);
            let mut c = tokio::time::timeout(Duration::from_secs(20), hs)
                .await
                .unwrap_or_else(|_| panic!("handshake with Nix {version} hangs"))
                .expect("handshake");
            assert_eq!(c.minor(), minor, "protocol with Nix {version}");
            let v = c.daemon_version.clone().unwrap_or_default();
            assert!(v.starts_with(version), "daemon says {v:?}, wanted Nix {version}");
            // The connection works at that version: path info, and a NAR to its end.
            let info = c.query_path_info(f.top.clone()).await.expect("info").expect("valid");
            assert!(info.sigs.iter().any(|s| s.starts_with("test-hydra-1:")), "{info:?}");
            assert_eq!(
                c.query_path_from_hash_part(hash_of(&f.top).to_owned())
                    .await
                    .expect("hash part"),
                Some(f.top.clone())
            );
            c.start_nar_from_path(f.top.clone()).await.expect("NarFromPath");
            let mut framer = local_nix_cache::store::nar::NarFramer::new();
            let mut nar = Vec::new();
            while let Some(chunk) = c
                .read_nar_chunk(&mut framer, Duration::from_secs(20))
                .await
                .expect("NAR chunk")
            {
                nar.extend_from_slice(&chunk);
            }
            assert!(nar == host.dump(&f.top), "NAR from Nix {version}'s daemon");
            assert!(c.is_valid_path(f.top.clone()).await.expect("valid"), "after a NAR");
        });
    }
}

#[test]
fn nix_copies_a_closure_through_the_server_and_it_verifies() {
    require!(nix, netns);
    check_nix_copy(false);
}

/// Nix 2.26's daemon behind the server and Nix 2.26 as the client.
#[test]
fn nix_copies_a_closure_through_the_server_and_it_verifies_nix226() {
    require!(nix, netns);
    check_nix_copy(true);
}

fn check_nix_copy(nix226: bool) {
    let Some(nix_root) = roots::nix_under_test(nix226) else {
        return;
    };
    let f = fixture();
    let host = Host::with_paths_on(&[&f.top], nix_root.as_deref());
    let mut args = serve_args(host.store_addr());
    args.store.real_store_dir = Some(host.physical_store().into());
    let node = TestNode::start(args);
    // The client's chroot store, as its Nix sees it, and that Nix.
    let client = roots::ClientNix::new(nix_root.as_deref());
    let (store, client_nix) = (client.store.clone(), |p: &str| client.cmd(p));
    run(client_nix("nix")
        .args(["copy", "--from", &node.url(), "--to", &store, &f.top])
        .args(["--option", "trusted-public-keys", &f.pk]));
    // Content and signatures verify in the client's store (checked there, not in /nix/store).
    run(client_nix("nix").args(["store", "verify", "--store", &store]).args([
        "-r",
        &f.top,
        "--option",
        "trusted-public-keys",
        &f.pk,
    ]));
    let info = run(client_nix("nix")
        .args(["path-info", "--json", "-r", "--store", &store])
        .arg(&f.top));
    for p in &f.closure {
        assert!(info.contains(p.as_str()), "{p} missing from the copy: {info}");
    }
    assert_eq!(
        info.matches("test-hydra-1:").count(),
        3,
        "upstream signatures kept: {info}"
    );
}

#[test]
fn unsigned_path_is_indistinguishable_from_absent() {
    require!(nix, netns);
    check_unsigned(false);
}

#[test]
fn unsigned_path_is_indistinguishable_from_absent_nix226() {
    require!(nix, netns);
    check_unsigned(true);
}

fn check_unsigned(nix226: bool) {
    let Some(nix_root) = roots::nix_under_test(nix226) else {
        return;
    };
    let f = fixture();
    let host = Host::with_paths_on(&[&f.top], nix_root.as_deref());
    let private = host.add_unsigned("secret.txt", "a private note\n");
    let node = TestNode::start(serve_args(host.store_addr()));
    let absent = "/0000000000000000000000000000000a.narinfo";
    let unsigned = format!("/{}.narinfo", hash_of(&private));
    let (a, u) = (get(node.addr, absent), get(node.addr, &unsigned));
    assert_eq!((a.status, u.status), (404, 404));
    assert_eq!(a.body, u.body, "the 404 must not tell unsigned from absent");
    assert_eq!(a.header("content-length"), u.header("content-length"));
    let (ha, hu) = (
        request(node.addr, "HEAD", absent, &[]),
        request(node.addr, "HEAD", &unsigned, &[]),
    );
    assert_eq!((ha.status, hu.status), (404, 404));
    // Its NAR cannot be fetched either, whatever hash the URL names.
    let dump = host.dump(&private);
    let url = local_nix_cache::cache_url::nar_url(
        &local_nix_cache::narinfo::StorePathHash::parse(hash_of(&private)).expect("store hash"),
        &nar_hash_of(&dump),
    );
    let r = get(node.addr, &format!("/{url}"));
    assert_eq!(r.status, 404);
    // A signed path of the same store is served.
    assert_eq!(get(node.addr, &format!("/{}.narinfo", hash_of(&f.top))).status, 200);
    // And so is a path signed after start, without waiting for a rescan: a miss is checked
    // with the daemon after its 404 (`server::misses`, each hash at most once per
    // RECHECK_AFTER), so a request soon after the signature finds it.
    let sk = f.sk_file.to_str().expect("utf8");
    run(nix("nix", &host.home)
        .args(["store", "sign", "--store"])
        .arg(&host.root)
        .args(["--key-file", sk, &private]));
    let found = wait_for(
        local_nix_cache::server::misses::RECHECK_AFTER * 4,
        Duration::from_millis(100),
        || get(node.addr, &unsigned).status == 200,
    );
    assert!(found.is_some(), "signed after start, found by the check of a miss");
}

fn nar_hash_of(nar: &[u8]) -> local_nix_cache::narinfo::NarHash {
    use sha2::Digest;
    local_nix_cache::narinfo::NarHash::from_digest(sha2::Sha256::digest(nar).into())
}

/// Narinfo fields of a served path.
fn narinfo_url(node: &TestNode, path: &str) -> String {
    let r = get(node.addr, &format!("/{}.narinfo", hash_of(path)));
    assert_eq!(r.status, 200);
    let text = String::from_utf8(r.body).expect("utf8");
    assert!(text.contains("Compression: none\n"), "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .map(|u| format!("/{u}"))
        .expect("URL")
}

#[test]
fn nar_streams_with_length_and_ranges_through_the_daemon() {
    require!(nix, netns);
    check_nar_streaming(false, false);
}

#[test]
fn nar_streams_with_length_and_ranges_through_the_daemon_nix226() {
    require!(nix, netns);
    check_nar_streaming(false, true);
}

#[test]
fn nar_streams_with_length_and_ranges_from_disk() {
    require!(nix, netns);
    check_nar_streaming(true, false);
}

/// The NAR served equals `nix-store --dump`, whole and in ranges, read through the daemon's
/// NarFromPath or from the physical store directory.
fn check_nar_streaming(from_disk: bool, nix226: bool) {
    let Some(nix_root) = roots::nix_under_test(nix226) else {
        return;
    };
    let f = fixture();
    let host = Host::with_paths_on(&[&f.big, &f.top], nix_root.as_deref());
    let mut args = serve_args(host.store_addr());
    args.store.real_store_dir = from_disk.then(|| host.physical_store().into());
    let node = TestNode::start(args);
    // A directory tree with an executable, a symlink and references, whole.
    for p in &f.closure {
        let r = get(node.addr, &narinfo_url(&node, p));
        assert_eq!(r.status, 200);
        assert!(r.body == host.dump(p), "NAR of {p} differs from nix-store --dump");
    }
    let url = narinfo_url(&node, &f.big);
    let want = host.dump(&f.big);
    let full = get(node.addr, &url);
    assert_eq!(full.status, 200);
    assert_eq!(full.header("accept-ranges"), Some("bytes"));
    assert_eq!(full.header("content-length"), Some(want.len().to_string().as_str()));
    assert_eq!(full.header("content-encoding"), None);
    assert!(full.body == want, "NAR differs from nix-store --dump");
    let head = request(node.addr, "HEAD", &url, &[]);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some(want.len().to_string().as_str()));
    assert!(head.body.is_empty());
    let n = want.len() as u64;
    for (range, start, end) in [
        (format!("bytes={}-", n / 2 + 3), n / 2 + 3, n - 1),
        ("bytes=10-4000".to_string(), 10, 4000),
        ("bytes=-100".to_string(), n - 100, n - 1),
    ] {
        let r = request(node.addr, "GET", &url, &[("Range", &range)]);
        assert_eq!(r.status, 206, "{range}");
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes {start}-{end}/{n}").as_str())
        );
        assert!(r.body == want[start as usize..=end as usize], "{range}: wrong bytes");
    }
    let r = request(node.addr, "GET", &url, &[("Range", &format!("bytes={n}-"))]);
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some(format!("bytes */{n}").as_str()));
    // The zstd form, as peers fetch it: the same NAR, compressed, no ranges.
    let z = request(node.addr, "GET", &format!("{url}.zst"), &[("Range", "bytes=10-")]);
    assert_eq!(z.status, 200, "zstd ignores Range");
    assert_eq!(z.header("accept-ranges"), None);
    let unz = zstd::stream::decode_all(&z.body[..]).expect("valid zstd");
    assert!(unz == want, "zstd NAR differs");
    assert!(z.body.len() < want.len() / 10, "zeros compress: {} bytes", z.body.len());
    // A NAR URL with the right store hash but another NAR hash is not ours to serve.
    let other = url.replace(&url[url.len() - 56..url.len() - 4], &"1".repeat(52));
    assert_eq!(get(node.addr, &other).status, 404);
}

#[test]
fn hostile_requests_get_4xx_and_the_server_keeps_serving() {
    require!(nix, netns);
    let f = fixture();
    let host = Host::with_paths(&[&f.top]);
    let node = TestNode::start(serve_args(host.store_addr()));
    let h = hash_of(&f.top);
    let long = format!("/{}.narinfo", "a".repeat(5000));
    let cases: Vec<(&str, String, u16)> = vec![
        ("GET", "/../../../etc/passwd".into(), 400),
        ("GET", format!("/..%2f..%2f{h}.narinfo"), 400),
        ("GET", format!("/%2e%2e/{h}.narinfo"), 400),
        ("GET", format!("/{}.narinfo", &h[..31]), 400),
        ("GET", format!("/{h}0.narinfo"), 400),
        (
            "GET",
            format!("/{}.narinfo", h.replace(|c: char| c.is_ascii_digit(), "e")),
            400,
        ),
        ("GET", format!("/{}.narinfo", h.to_uppercase()), 400),
        ("GET", format!("/nar/{h}-zzz.nar"), 400),
        ("GET", format!("/nar/{h}-{}.nar", "e".repeat(52)), 400),
        ("GET", "/nar/../../etc/shadow.nar".into(), 400),
        ("GET", long, 414),
        ("GET", format!("/{h}.ls"), 404),
        ("GET", "/log/0000000000000000000000000000000a-x.drv".into(), 404),
        ("GET", "/realisations/sha256:0!out.doi".into(), 404),
        ("GET", "/".into(), 404),
        ("POST", format!("/{h}.narinfo"), 405),
        ("DELETE", "/nix-cache-info".into(), 405),
    ];
    for (method, path, want) in cases {
        let r = request(node.addr, method, &path, &[]);
        assert_eq!(r.status, want, "{method} {}", &path[..path.len().min(80)]);
    }
    // Garbage that is not HTTP at all.
    for garbage in [&b"\x00\x01\x02garbage\r\n\r\n"[..], b"GET\r\n\r\n", &[b'A'; 100_000]] {
        let mut s = TcpStream::connect(node.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let _ = s.write_all(garbage);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out);
        assert!(out.is_empty() || text.starts_with("HTTP/1.1 4"), "garbage got {text:?}");
    }
    // Still serving.
    assert_eq!(get(node.addr, "/nix-cache-info").status, 200);
    assert_eq!(get(node.addr, &format!("/{h}.narinfo")).status, 200);
}

#[test]
fn nix_cache_info_advertises_the_store() {
    require!(nix, netns);
    let host = Host::with_paths(&[]);
    let node = TestNode::start(serve_args(host.store_addr()));
    let r = get(node.addr, "/nix-cache-info");
    assert_eq!(r.status, 200);
    let text = String::from_utf8(r.body).expect("utf8");
    assert!(text.contains("StoreDir: /nix/store\n"), "{text}");
    assert!(text.contains("WantMassQuery: 1\n"), "{text}");
    let prio: u32 = text
        .lines()
        .find_map(|l| l.strip_prefix("Priority: "))
        .and_then(|p| p.parse().ok())
        .expect("Priority");
    assert!(prio < 40, "must come before cache.nixos.org (40): {prio}");
    let head = request(node.addr, "HEAD", "/nix-cache-info", &[]);
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
}

#[test]
fn daemon_restart_is_survived() {
    require!(nix, netns);
    check_daemon_restart(false);
}

#[test]
fn daemon_restart_is_survived_nix226() {
    require!(nix, netns);
    check_daemon_restart(true);
}

fn check_daemon_restart(nix226: bool) {
    let Some(nix_root) = roots::nix_under_test(nix226) else {
        return;
    };
    let f = fixture();
    let mut host = Host::with_paths_on(&[&f.top], nix_root.as_deref());
    let node = TestNode::start(serve_args(host.store_addr()));
    let url = narinfo_url(&node, &f.top); // also warms the pool
    assert_eq!(get(node.addr, &url).status, 200);
    host.stop_daemon();
    // With the daemon gone: a lookup that needs it answers like a miss, quickly, never a 5xx.
    let t0 = Instant::now();
    let miss = get(node.addr, "/0000000000000000000000000000000b.narinfo");
    assert_eq!(miss.status, 404);
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "a dead daemon must not hang requests"
    );
    let nar = get(node.addr, &url);
    assert_eq!(nar.status, 404, "NAR without a daemon is a miss, not a 5xx");
    // Indexed narinfo still answers from memory.
    assert_eq!(get(node.addr, &format!("/{}.narinfo", hash_of(&f.top))).status, 200);
    host.start_daemon();
    let nar = get(node.addr, &url);
    assert_eq!(nar.status, 200, "recovers once the daemon is back");
    assert!(nar.body == host.dump(&f.top));
    // And again, for a path only the daemon can answer (not yet requested).
    assert_eq!(
        get(node.addr, &format!("/{}.narinfo", hash_of(&f.closure[0]))).status,
        200
    );
}

#[test]
fn stdio_children_serve_without_a_socket() {
    require!(nix, netns);
    let f = fixture();
    let mut host = Host::with_paths(&[&f.top]);
    host.stop_daemon();
    let store = StoreAddr::Stdio {
        store: Some(host.root.display().to_string()),
    };
    let node = TestNode::start(serve_args(store));
    let url = narinfo_url(&node, &f.top);
    let r = get(node.addr, &url);
    assert_eq!(r.status, 200);
    assert!(r.body == host.dump(&f.top));
}

/// `serve --store stdio://...` with Nix 2.26's `nix-daemon --stdio` children: the real binary in
/// a network namespace of its own (its `PATH` finds a wrapper that runs 2.26's daemon chrooted).
#[test]
fn stdio_children_serve_without_a_socket_nix226() {
    require!(nix, netns);
    let Some(Some(root)) = roots::nix_under_test(true) else {
        return;
    };
    let f = fixture();
    let mut host = Host::with_paths_on(&[&f.top], Some(&root));
    host.stop_daemon();
    let bin_dir = host.dir.path().join("bin");
    std::fs::create_dir_all(&bin_dir).expect("bin dir");
    let wrapper = bin_dir.join("nix-daemon");
    std::fs::write(&wrapper, roots::nix_root_wrapper(&root, host.dir.path(), "nix-daemon")).expect("wrapper");
    run(Command::new("chmod").arg("755").arg(&wrapper));
    let lan = netns::Lan::new(1);
    let ns = lan.hosts[0].ns.clone();
    let log_path = host.dir.path().join("serve.log");
    let serve = Command::new("ip")
        .args(["netns", "exec", &ns, "env"])
        .arg(format!("PATH={}:/usr/sbin:/usr/bin:/sbin:/bin", bin_dir.display()))
        .args([nixlan::bin(), "serve", "--no-beacon", "--upstream", "none"])
        .args(["--listen", "127.0.0.1:8380", "--proxy-listen", "127.0.0.1:8381"])
        .args([
            "--store",
            &format!("stdio://{HOST_MOUNT}/store"),
            "--real-store-dir",
            "none",
        ])
        .args(["--trusted-public-key", &f.pk, "--spool-dir"])
        .arg(host.dir.path().join("spool"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).expect("log"))
        .spawn()
        .expect("spawn serve");
    let _serve = roots::Reap(serve);
    let narinfo_url = format!("http://127.0.0.1:8380/{}.narinfo", hash_of(&f.top));
    let narinfo = wait_for(Duration::from_secs(30), Duration::from_millis(100), || {
        roots::curl(&ns, &narinfo_url)
    })
    .map(|n| String::from_utf8_lossy(&n).into_owned())
    .unwrap_or_else(|| {
        panic!(
            "serve with 2.26 stdio children did not serve {narinfo_url}: {}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        )
    });
    let url = narinfo.lines().find_map(|l| l.strip_prefix("URL: ")).expect("URL");
    let nar = roots::curl(&ns, &format!("http://127.0.0.1:8380/{url}")).expect("NAR");
    // `HOST_MOUNT/store` exists only inside the 2.26 root's mount namespace: only children
    // started through the wrapper can have served this.
    assert!(nar == host.dump(&f.top), "NAR through 2.26 stdio children");
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(!log.contains("ERROR"), "{log}");
}

#[test]
fn stalled_client_releases_its_daemon_connection() {
    require!(nix, netns);
    check_stalled(false);
}

#[test]
fn stalled_client_releases_its_daemon_connection_nix226() {
    require!(nix, netns);
    check_stalled(true);
}

fn check_stalled(nix226: bool) {
    let Some(nix_root) = roots::nix_under_test(nix226) else {
        return;
    };
    let f = fixture();
    let host = Host::with_paths_on(&[&f.big, &f.top], nix_root.as_deref());
    let mut args = serve_args(host.store_addr());
    args.store.daemon_connections = 1;
    args.server.client_stall_timeout = std::time::Duration::from_secs(1);
    let node = TestNode::start(args);
    let url = narinfo_url(&node, &f.big);
    let top_url = narinfo_url(&node, &f.top);
    // A client that starts the 32 MiB NAR and then reads nothing holds the only connection.
    let mut stalled = TcpStream::connect(node.addr).expect("connect");
    stalled.set_read_buffer_size_hint();
    write!(stalled, "GET {url} HTTP/1.1\r\nHost: t\r\n\r\n").expect("send");
    std::thread::sleep(Duration::from_millis(300));
    // Another client still gets its NAR once the stalled one is dropped.
    let t0 = Instant::now();
    let r = get(node.addr, &top_url);
    assert_eq!(r.status, 200, "the stalled client pinned the daemon connection");
    assert!(t0.elapsed() < Duration::from_secs(8), "took {:?}", t0.elapsed());
    drop(stalled);
}

/// Keeps the stalled client's kernel buffer small so the server really blocks.
trait SmallBuf {
    fn set_read_buffer_size_hint(&mut self);
}

impl SmallBuf for TcpStream {
    fn set_read_buffer_size_hint(&mut self) {
        let sock = socket2::SockRef::from(&*self);
        let _ = sock.set_recv_buffer_size(4096);
    }
}

/// A path that enters the store behind the server's back (a local build, `nix copy`) is indexed
/// as soon as Nix registers it (`server::store_watch`): its content summary changes and its
/// very first request is served, long before the next rescan (60 s) and without a miss check.
#[test]
fn a_path_added_behind_the_servers_back_is_served_at_once() {
    require!(nix);
    let f = fixture();
    let host = Host::with_paths(&[]);
    let mut args = serve_args(host.store_addr());
    args.store.real_store_dir = Some(host.physical_store().into());
    let node = TestNode::start(args);
    let summary = || get(node.addr, "/summary");
    let before = wait_for(Duration::from_secs(10), Duration::from_millis(50), || {
        Some(summary()).filter(|r| r.status == 200)
    })
    .expect("the first scan published a summary");
    host.add_paths(&[&f.top]);
    let changed = wait_for(Duration::from_secs(10), Duration::from_millis(50), || {
        summary().body != before.body
    });
    eprintln!("summary changed {changed:?} after the paths were added");
    for p in &f.closure {
        assert_eq!(
            get(node.addr, &format!("/{}.narinfo", hash_of(p))).status,
            200,
            "{p}: first request after it was added"
        );
    }
}

/// A first scan that fails (the daemon not up yet, a connect refused under load) is retried
/// within seconds (`server::index::SCAN_RETRY_FIRST`, doubling), not at the next rescan a
/// minute later: until a scan succeeds the server publishes no content summary, so peers in a
/// hall would not ask it.
#[test]
fn a_failed_first_scan_is_retried_soon() {
    require!(nix);
    let f = fixture();
    let mut host = Host::with_paths(&[&f.top]);
    host.stop_daemon();
    let node = TestNode::start(serve_args(host.store_addr()));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(get(node.addr, "/summary").status, 404, "no summary without a scan");
    host.start_daemon();
    let published = wait_for(Duration::from_secs(20), Duration::from_millis(100), || {
        get(node.addr, "/summary").status == 200
    });
    eprintln!("summary published {published:?} after the daemon came up");
    assert_eq!(get(node.addr, "/summary").status, 200);
}
