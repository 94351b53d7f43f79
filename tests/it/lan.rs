//! Multi-host end-to-end suite: real Nix hosts on simulated LANs (network namespaces, each host
//! with its own chroot store, nix-daemon and the real `serve` binary), an upstream "hydra" in a
//! namespace of its own. Needs root and Nix; fails rather than skips under CI.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use crate::common::netns::in_netns;
use crate::common::nixlan::NixLan;
use crate::common::{fixture, forge, ok, run, wait_for, wait_until};
use local_nix_cache::beacon::wire::NodeId;

#[test]
fn discovery_hosts_see_each_other_within_a_second_and_a_stopped_host_leaves() {
    require!(nix, netns);
    let mut lan = NixLan::new(&[&[], &[], &[]]);
    let up = lan.upstream.url();
    let t0 = Instant::now();
    lan.serve_all(&up);
    let started = t0.elapsed();
    for (i, others) in [(0, vec![1, 2]), (1, vec![0, 2]), (2, vec![0, 1])] {
        let took = lan.wait_peers(i, &others, Duration::from_secs(5));
        let took = took.unwrap_or_else(|| panic!("host{} sees {:?}", i + 1, lan.hosts[i].peer_addrs()));
        eprintln!(
            "host{} saw its peers {took:?} after all serves were up ({started:?} to start them)",
            i + 1
        );
        assert!(took < Duration::from_secs(1), "discovery took {took:?}");
    }
    // Killed (no goodbye): gone within three announce intervals (1 s each) plus slack.
    lan.hosts[2].stop_serve(true);
    let took = lan
        .wait_peers(0, &[1], Duration::from_secs(5))
        .expect("killed host still listed");
    eprintln!("killed host left host1's table after {took:?}");
    // Stopped cleanly (goodbye): gone at once.
    lan.hosts[1].stop_serve(false);
    let took = lan
        .wait_peers(0, &[], Duration::from_secs(2))
        .expect("stopped host still listed");
    eprintln!("stopped host left host1's table after {took:?}");
    assert!(took < Duration::from_millis(900), "goodbye took {took:?}");
}

#[test]
fn offline_lan_realises_a_closure_only_peers_have() {
    require!(nix, netns);
    let f = fixture();
    let mut lan = NixLan::new(&[&[&f.top], &[]]);
    lan.upstream.stop(); // the internet is gone
    let up = lan.upstream.url();
    lan.serve_all(&up);
    lan.wait_peers(1, &[0], Duration::from_secs(5)).expect("peer not found");
    let out = lan.hosts[1].realise(&[&f.top]);
    ok("nix-store -r through the proxy, offline", &out);
    ok("nix store verify", &lan.hosts[1].verify(&f.top));
    for p in &f.closure {
        assert!(lan.hosts[1].has(p), "{p} not installed");
        assert!(
            lan.hosts[1].sigs(p).contains("test-hydra-1:"),
            "{p} lost its upstream signature"
        );
    }
}

#[test]
fn privacy_an_unsigned_path_is_never_served_nor_fetched() {
    require!(nix, netns);
    let f = fixture();
    let mut lan = NixLan::new(&[&[&f.top], &[]]);
    let private = lan.hosts[0].store.add_unsigned("diary.txt", "dear diary\n");
    lan.serve_all("none");
    lan.wait_peers(1, &[0], Duration::from_secs(5)).expect("peer not found");
    let hash = &private["/nix/store/".len().."/nix/store/".len() + 32];
    let a = lan.hosts[0].net.ip4;
    // Straight from the owner's store server: indistinguishable from absent.
    assert!(lan.hosts[1].http(&format!("http://{a}:8380/{hash}.narinfo")).is_none());
    // Through the other host's proxy: a miss, and the realisation fails.
    assert!(lan.hosts[1]
        .http(&format!("http://127.0.0.1:8381/{hash}.narinfo"))
        .is_none());
    let out = lan.hosts[1].realise(&[&private]);
    assert!(!out.status.success(), "an unsigned path was fetched");
    assert!(!lan.hosts[1].has(&private));
    // A signed path of the same host is served.
    assert!(lan.hosts[1]
        .http(&format!("http://{a}:8380/{}.narinfo", &f.top[11..43]))
        .is_some());
}

/// A path one host has just substituted is found on the LAN by the others within two announce
/// intervals (1 s here) plus the fixed delays on the way (the learner looks 1 s after delivery,
/// the summary is rebuilt at most every second, peers check for new versions every 0.5 s: with
/// the default 5 s interval, all of it fits in two intervals): its store server learns it from
/// its own proxy, the next announce carries the new summary version, and the other proxies fetch
/// the delta. The upstream is stopped before the second host asks, so only the LAN can serve it.
#[test]
fn a_path_just_substituted_is_found_on_the_lan_within_two_intervals() {
    require!(nix, netns);
    let f = fixture();
    let mut lan = NixLan::new(&[&[], &[]]);
    let up = lan.upstream.url();
    lan.serve_all(&up);
    lan.wait_peers(1, &[0], Duration::from_secs(5)).expect("peer not found");
    // Host 2 holds host 1's (empty) summary before host 1 gets the path.
    wait_until(
        "no summary fetched",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || !(lan.hosts[1].status()["peers"][0]["summary"].is_null()),
    );
    let summary = || lan.hosts[1].status()["peers"][0]["summary"].as_u64();
    let before = summary();
    ok("host 1 substitutes from upstream", &lan.hosts[0].realise(&[&f.rand]));
    lan.upstream.stop();
    // Host 2 holds host 1's next summary (the one with the path): at most two announce intervals
    // and the fixed delays, as long as this test used to wait.
    let _ = wait_for(
        Duration::from_secs(2) + Duration::from_millis(2500),
        Duration::from_millis(100),
        || summary() > before,
    );
    ok(
        "host 2 realises from host 1, upstream gone",
        &lan.hosts[1].realise(&[&f.rand]),
    );
    assert_eq!(lan.hosts[1].status()["stats"]["nars_from_peers"], 1);
}

#[test]
fn lan_beats_wan_through_the_proxy() {
    require!(nix, netns);
    let f = fixture();
    let mut lan = NixLan::new(&[&[&f.rand], &[]]);
    lan.upstream.shape("16mbit");
    let up = lan.upstream.url();
    lan.serve_all(&up);
    lan.wait_peers(1, &[0], Duration::from_secs(5)).expect("peer not found");
    let t0 = Instant::now();
    ok("realise from the LAN", &lan.hosts[1].realise(&[&f.rand]));
    let lan_time = t0.elapsed();
    // The same path straight from the shaped upstream, into a fresh store on the same host.
    let wan_store = lan.hosts[1].store.dir.path().join("wan-store");
    let mut c = lan.hosts[1].nix_cmd("nix-store");
    c.arg("--store")
        .arg(lan.hosts[1].client_path(&wan_store))
        .args(["-r", &f.rand, "--option", "substituters", &up])
        .args(["--option", "trusted-public-keys", &f.pk]);
    let t0 = Instant::now();
    ok("realise from the shaped upstream", &crate::common::output(&mut c));
    let wan_time = t0.elapsed();
    let ratio = wan_time.as_secs_f64() / lan_time.as_secs_f64();
    println!(
        "LAN vs WAN (8 MiB, upstream at 16 Mbit/s): proxy {lan_time:?}, upstream {wan_time:?}, {ratio:.1}x faster"
    );
    eprintln!("LAN vs WAN: {ratio:.1}x");
    assert!(ratio > 2.0, "LAN only {ratio:.1}x faster than WAN");
    assert_eq!(lan.hosts[1].status()["stats"]["nars_from_peers"], 1);
}

#[test]
fn hostile_peer_with_a_corrupted_store_cannot_poison_anyone() {
    require!(nix, netns);
    let f = fixture();
    // Host 1 holds a corrupted copy, host 2 an honest one; hosts 3 and 4 fetch.
    let mut lan = NixLan::new(&[&[&f.top], &[&f.top], &[], &[]]);
    let mid = f
        .closure
        .iter()
        .find(|p| p.contains("lnc-test-mid"))
        .expect("mid")
        .clone();
    let file = lan.hosts[0]
        .store
        .root
        .join(mid.trim_start_matches('/'))
        .join("share/numbers");
    let dir = file.parent().expect("dir").to_owned();
    run(std::process::Command::new("chmod").arg("u+w").arg(&dir).arg(&file));
    let mut bytes = std::fs::read(&file).expect("read");
    bytes[100] ^= 0x20; // same size, different content
    std::fs::write(&file, &bytes).expect("corrupt");
    lan.serve_all("none");
    for i in 2..4 {
        lan.wait_peers(i, &[0, 1, 5 - i], Duration::from_secs(5))
            .expect("peers");
    }
    ok("realise with an honest peer around", &lan.hosts[2].realise(&[&f.top]));
    ok("verify", &lan.hosts[2].verify(&f.top));
    // Only the corrupt host left: the fetch fails, nothing corrupt is installed.
    lan.hosts[1].stop_serve(false);
    lan.hosts[2].stop_serve(false);
    lan.wait_peers(3, &[0], Duration::from_secs(5))
        .expect("only host1 left");
    let out = lan.hosts[3].realise(&[&f.top]);
    assert!(!out.status.success(), "realised from a corrupt peer only");
    assert!(!lan.hosts[3].has(&mid), "corrupt path installed");
    let lies = lan.hosts[3].status()["stats"]["lies"].as_u64().unwrap_or(0);
    assert!(lies > 0, "the hash mismatch was not recorded");
}

#[test]
fn peer_dies_mid_transfer_and_another_peer_completes_it() {
    require!(nix, netns);
    let f = fixture();
    let mut lan = NixLan::new(&[&[&f.rand], &[], &[]]);
    // Host 1's link is slow, so its 8 MiB of random bytes (which zstd cannot shrink) take
    // about four seconds.
    lan.hosts[0].shape_egress("16mbit");
    lan.serve_all("none");
    lan.wait_peers(2, &[0, 1], Duration::from_secs(5)).expect("peers");
    let big = f.rand.clone();
    let fetcher = {
        let mut c = lan.hosts[2].nix_cmd("nix-store");
        c.arg("--store")
            .arg(lan.hosts[2].client_store())
            .args(["-r", &big, "--option", "substituters", "http://127.0.0.1:8381"])
            .args(["--option", "trusted-public-keys", &f.pk])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        c.spawn().expect("spawn nix-store")
    };
    std::thread::sleep(Duration::from_millis(1500));
    // Host 2 gets the path meanwhile; host 1 dies mid-transfer.
    lan.hosts[1].store.add_paths(&[&big]);
    lan.hosts[0].stop_serve(true);
    let out = fetcher.wait_with_output().expect("nix-store");
    ok("realise after the source died", &out);
    ok("verify", &lan.hosts[2].verify(&big));
    let log = lan.hosts[2].log();
    assert!(log.contains("trying the next"), "no failover in the proxy log:\n{log}");
}

#[test]
fn beacon_flood_leaves_every_serve_up_and_tables_right() {
    require!(nix, netns);
    let mut lan = NixLan::new(&[&[], &[], &[]]);
    lan.serve_all("none");
    for (i, others) in [(0, vec![1, 2]), (1, vec![0, 2]), (2, vec![0, 1])] {
        lan.wait_peers(i, &others, Duration::from_secs(5)).expect("peers");
    }
    // The upstream's namespace (on the same LAN) floods the beacon group with garbage.
    let ns = lan.upstream.net.ns.clone();
    let sent = in_netns(&ns, || {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        let t0 = Instant::now();
        let mut sent = 0u32;
        for i in 0..20_000u32 {
            if t0.elapsed() > Duration::from_secs(10) {
                break;
            }
            // Never a valid beacon: bad magic, wrong version, cut short, oversized, or an
            // announce with an interval of 0 ms. (Valid forged announces would be peers.)
            let d: Vec<u8> = match i % 5 {
                0 => i.to_be_bytes().repeat(1 + (i % 150) as usize),
                1 => [&b"LNCB\x09\x01"[..], &[0u8; 40]].concat(),
                2 => b"LNCB\x01\x01\x00\x01".repeat(3)[..20].to_vec(),
                3 => [&b"LNCB\x01\x01"[..], &vec![7u8; 700]].concat(),
                _ => [&b"LNCB\x01\x01\x00\x01"[..], &[9u8; 16], &[0x20, 0xbc], &[0u8; 8]].concat(),
            };
            if s.send_to(&d, "239.255.83.80:8380").is_ok() {
                sent += 1;
            }
        }
        sent
    })
    .join()
    .expect("flooder");
    assert!(sent > 10_000, "sent {sent}");
    // Proof that every host got through the flood: a query sent after it from hosts 1 and 2 (the
    // flooder's own address is rate-limited), counted by each host's beacon.
    let queries = |i: usize| lan.hosts[i].status()["beacon"]["queries"].as_u64();
    let before: Vec<Option<u64>> = (0..3).map(queries).collect();
    for (h, node) in [(0, 0xa1), (1, 0xa2)] {
        in_netns(&lan.hosts[h].net.ns, move || {
            let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
            let query = forge::query(NodeId([node; 16])).encode();
            s.send_to(&query, "239.255.83.80:8380").expect("send query");
        })
        .join()
        .expect("query sender");
    }
    for (i, before) in before.into_iter().enumerate() {
        let _ = wait_for(Duration::from_secs(3), Duration::from_millis(50), || {
            queries(i) > before
        });
    }
    for i in 0..3 {
        assert!(
            lan.hosts[i].serving(),
            "host{} died in the flood:\n{}",
            i + 1,
            lan.hosts[i].log()
        );
        let others: Vec<usize> = (0..3).filter(|j| *j != i).collect();
        lan.wait_peers(i, &others, Duration::from_secs(3))
            .unwrap_or_else(|| panic!("host{} table wrong: {:?}", i + 1, lan.hosts[i].peer_addrs()));
        let b = &lan.hosts[i].status()["beacon"];
        let dropped = ["too_short", "invalid", "rate_limited"]
            .iter()
            .map(|k| b[k].as_u64().unwrap_or(0))
            .sum::<u64>();
        assert!(dropped > 0, "host{}: flood not counted: {b}", i + 1);
    }
}

#[test]
fn upstream_fallback_for_a_path_no_peer_has() {
    require!(nix, netns);
    let f = fixture();
    let mut lan = NixLan::new(&[&[&f.top], &[]]);
    let up = lan.upstream.url();
    lan.serve_all(&up);
    lan.wait_peers(1, &[0], Duration::from_secs(5)).expect("peer");
    ok("realise from upstream", &lan.hosts[1].realise(&[&f.rand]));
    ok("verify", &lan.hosts[1].verify(&f.rand));
    assert!(lan.hosts[1].sigs(&f.rand).contains("test-hydra-1:"));
    let stats = &lan.hosts[1].status()["stats"];
    assert_eq!(stats["nars_from_upstream"], 1, "{stats}");
    // What a person sees: `status` in the terminal, the page, the metrics.
    let out = crate::common::output(
        std::process::Command::new("ip")
            .args(["netns", "exec", &lan.hosts[1].net.ns])
            .args([crate::common::nixlan::bin(), "status"]),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("peers: 1"), "{text}");
    assert!(text.contains("1 from upstream"), "{text}");
    assert!(text.contains("lnc-test-rand"), "recent transfer missing: {text}");
    let page = lan.hosts[1].http("http://127.0.0.1:8381/").expect("status page");
    assert!(
        page.contains("<h1>local-nix-cache</h1>") && page.contains("lnc-test-rand"),
        "{page}"
    );
    let metrics = lan.hosts[1].http("http://127.0.0.1:8381/metrics").expect("metrics");
    assert!(
        metrics.contains("local_nix_cache_nars_total{source=\"upstream\"} 1"),
        "{metrics}"
    );
}

/// Nix 2.8 and Nix 2.26 hosts share with each other both ways, offline: 2.26's client gets a
/// closure from a 2.8 host's daemon, 2.8's client a path from a 2.26 host's daemon.
#[test]
fn mixed_lan_nix_2_8_and_2_26_hosts_share_both_ways() {
    require!(nix, netns);
    if crate::common::roots::nix226_root().is_none() {
        return;
    }
    let f = fixture();
    let mut lan = NixLan::new(&[&[&f.top], &[&f.rand]]);
    assert!(
        lan.hosts[0].nix_version().contains("2.8"),
        "{}",
        lan.hosts[0].nix_version()
    );
    assert!(
        lan.hosts[1].nix_version().contains("2.26"),
        "{}",
        lan.hosts[1].nix_version()
    );
    lan.upstream.stop();
    let up = lan.upstream.url();
    lan.serve_all(&up);
    lan.wait_peers(0, &[1], Duration::from_secs(5))
        .expect("host2 not found");
    lan.wait_peers(1, &[0], Duration::from_secs(5))
        .expect("host1 not found");
    ok("2.26 realises from a 2.8 host", &lan.hosts[1].realise(&[&f.top]));
    ok("2.26 verifies", &lan.hosts[1].verify(&f.top));
    ok("2.8 realises from a 2.26 host", &lan.hosts[0].realise(&[&f.rand]));
    ok("2.8 verifies", &lan.hosts[0].verify(&f.rand));
    for (i, n) in [(0, 1), (1, 3)] {
        assert_eq!(lan.hosts[i].status()["stats"]["nars_from_peers"], n, "host{}", i + 1);
    }
}
