//! Roaming laptops (issue #14): the network comes and goes while `serve` runs, and `serve`
//! follows it. Real Nix hosts in network namespaces (tests/it/common/nixlan.rs), the real binary;
//! the "holder" runs `serve` on every interface (no `--interface`), as the NixOS module and the
//! one-liner run it. Each scenario has its own LAN and holder, so one failure hides no other.
//! Needs root and Nix; fails rather than skips under CI.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::netns::{detach, ip_in, sysctl_in, Lan, TestBeacon};
use crate::common::nixlan::{NixHost, NixLan};
use crate::common::{fixture, ok, wait_for};
use local_nix_cache::beacon::BeaconConfig;

/// `serve` on every interface, as installed (1 s announces, so the tests stay short).
const EVERY_INTERFACE: &[&str] = &["--listen", "0.0.0.0:8380", "--announce-interval", "1s"];
/// `serve` on every interface, announcing only every 30 s: a peer that finds it within the
/// [`REACH_LIMIT`] found it through the announce made at once when a link appeared or changed.
const EVERY_INTERFACE_RARELY: &[&str] = &["--listen", "0.0.0.0:8380", "--announce-interval", "30s"];
/// The holder's path is realised by a peer within this long of the change that made it reachable.
const REACH_LIMIT: Duration = Duration::from_secs(15);

/// The state `host`'s status report gives interface `name` ("joined", "waiting", "left").
fn iface_state(host: &NixHost, name: &str) -> Option<String> {
    host.status()["interfaces"]
        .as_array()?
        .iter()
        .find(|i| i["name"] == name)
        .and_then(|i| i["state"].as_str().map(str::to_owned))
}

/// Waits until `peer` lists exactly `addrs` (store server addresses), then realises the fixture's
/// top path through `peer`'s proxy and verifies it; panics with both logs otherwise. Returns the
/// time from `t0` to the realised path.
fn peer_realises(peer: &NixHost, holder: &NixHost, addrs: &[String], t0: Instant) -> Duration {
    let f = fixture();
    let mut want = addrs.to_vec();
    want.sort();
    if wait_for(REACH_LIMIT, Duration::from_millis(50), || peer.peer_addrs() == want).is_none() {
        panic!(
            "{} lists {:?}, not {want:?}\n--- holder log ---\n{}\n--- peer log ---\n{}",
            peer.name,
            peer.peer_addrs(),
            holder.log(),
            peer.log()
        );
    }
    let seen = t0.elapsed();
    ok("nix-store -r through the proxy", &peer.realise(&[&f.top]));
    ok("nix store verify", &peer.verify(&f.top));
    let took = t0.elapsed();
    eprintln!(
        "{}: holder listed after {seen:?}, path realised after {took:?}",
        peer.name
    );
    assert!(took < REACH_LIMIT, "took {took:?}");
    took
}

fn no_error_loop(host: &NixHost) {
    let log = host.log();
    let errors = log.lines().filter(|l| l.contains("ERROR")).count();
    let warnings = log.lines().filter(|l| l.contains("WARN")).count();
    assert_eq!(errors, 0, "{} logged errors:\n{log}", host.name);
    assert!(warnings <= 3, "{} logged {warnings} warnings:\n{log}", host.name);
}

#[test]
fn serve_started_before_its_link_exists_is_found_once_the_link_appears() {
    require!(nix, netns);
    let f = fixture();
    let mut lan = NixLan::new(&[&[&f.top], &[]]);
    lan.upstream.stop(); // offline: only the holder has the path
    let up = lan.upstream.url();
    let ns = lan.hosts[0].net.ns.clone();
    detach(&ns, "eth0"); // only loopback: a laptop at boot
    lan.hosts[0].start_serve_args(&up, EVERY_INTERFACE_RARELY);
    lan.hosts[1].start_serve(&up);
    // Host 2's beacon is up on the LAN, so its table still empty two seconds later means
    // something (a beacon slow to start passed this check before).
    let joined = wait_for(Duration::from_secs(5), Duration::from_millis(50), || {
        iface_state(&lan.hosts[1], "eth0").as_deref() == Some("joined")
    });
    assert!(joined.is_some(), "host 2's beacon did not join the LAN");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        lan.hosts[0].serving(),
        "serve exited without a link:\n{}",
        lan.hosts[0].log()
    );
    assert!(lan.hosts[1].peer_addrs().is_empty());
    assert!(
        !lan.hosts[0].log().contains("not started"),
        "the beacon must always run:\n{}",
        lan.hosts[0].log()
    );
    let t0 = Instant::now();
    lan.lan
        .attach(&ns, "eth0", Some(&format!("{}/24", lan.hosts[0].net.ip4)));
    let addr = format!("{}:8380", lan.hosts[0].net.ip4);
    peer_realises(&lan.hosts[1], &lan.hosts[0], &[addr], t0);
    assert_eq!(iface_state(&lan.hosts[0], "eth0").as_deref(), Some("joined"));
    no_error_loop(&lan.hosts[0]);
}

#[test]
fn a_second_lan_joined_later_finds_the_host() {
    require!(nix, netns);
    let f = fixture();
    let mut lan = NixLan::new(&[&[&f.top], &[], &[]]);
    lan.upstream.stop();
    let up = lan.upstream.url();
    // Host 3 moves to a second LAN of its own; the holder is not on it yet.
    let lan2 = Lan::new(0);
    let ns3 = lan.hosts[2].net.ns.clone();
    detach(&ns3, "eth0");
    lan2.attach(&ns3, "eth0", Some("10.78.0.3/24"));
    lan.hosts[0].start_serve_args(&up, EVERY_INTERFACE_RARELY);
    lan.hosts[1].start_serve(&up);
    lan.hosts[2].start_serve(&up);
    lan.wait_peers(1, &[0], Duration::from_secs(5))
        .expect("the first LAN sees the holder");
    // Host 3's beacon is up on the second LAN, so its table still empty a second later means
    // something (a beacon slow to start passed this check before).
    let joined = wait_for(Duration::from_secs(5), Duration::from_millis(50), || {
        iface_state(&lan.hosts[2], "eth0").as_deref() == Some("joined")
    });
    assert!(joined.is_some(), "host 3's beacon did not join the second LAN");
    std::thread::sleep(Duration::from_secs(1));
    assert!(lan.hosts[2].peer_addrs().is_empty(), "nobody on the second LAN yet");
    let t0 = Instant::now();
    lan2.attach(&lan.hosts[0].net.ns, "eth1", Some("10.78.0.1/24"));
    peer_realises(&lan.hosts[2], &lan.hosts[0], &["10.78.0.1:8380".into()], t0);
    assert_eq!(iface_state(&lan.hosts[0], "eth1").as_deref(), Some("joined"));
    // The first LAN still sees it.
    let first = format!("{}:8380", lan.hosts[0].net.ip4);
    assert_eq!(lan.hosts[1].peer_addrs(), [first]);
    no_error_loop(&lan.hosts[0]);
}

#[test]
fn a_link_down_long_enough_to_be_dropped_then_up_is_found_again() {
    require!(nix, netns);
    let f = fixture();
    let mut lan = NixLan::new(&[&[&f.top], &[]]);
    lan.upstream.stop();
    let up = lan.upstream.url();
    let ns = lan.hosts[0].net.ns.clone();
    lan.hosts[0].start_serve_args(&up, EVERY_INTERFACE);
    lan.hosts[1].start_serve(&up);
    lan.wait_peers(1, &[0], Duration::from_secs(5))
        .expect("the peer sees the holder");
    ip_in(&ns, &["link", "set", "eth0", "down"]);
    // Three silent 1 s intervals: the peer drops the holder.
    lan.wait_peers(1, &[], Duration::from_secs(10))
        .expect("the peer dropped the silent holder");
    assert!(
        wait_for(Duration::from_secs(5), Duration::from_millis(50), || iface_state(
            &lan.hosts[0],
            "eth0"
        )
        .as_deref()
            == Some("left"))
        .is_some(),
        "the holder reports eth0 as left: {}",
        lan.hosts[0].status()["interfaces"]
    );
    let t0 = Instant::now();
    ip_in(&ns, &["link", "set", "eth0", "up"]);
    let addr = format!("{}:8380", lan.hosts[0].net.ip4);
    peer_realises(&lan.hosts[1], &lan.hosts[0], &[addr], t0);
    no_error_loop(&lan.hosts[0]);
}

#[test]
fn an_address_change_is_announced() {
    require!(nix, netns);
    let f = fixture();
    let mut lan = NixLan::new(&[&[&f.top], &[]]);
    lan.upstream.stop();
    let up = lan.upstream.url();
    let ns = lan.hosts[0].net.ns.clone();
    let old = lan.hosts[0].net.ip4;
    let new = std::net::Ipv4Addr::new(old.octets()[0], old.octets()[1], old.octets()[2], 101);
    lan.hosts[0].start_serve_args(&up, EVERY_INTERFACE_RARELY);
    lan.hosts[1].start_serve(&up);
    lan.wait_peers(1, &[0], Duration::from_secs(5))
        .expect("the peer sees the holder");
    // Past the start-up burst, so only the announce made for the change can tell the peer.
    std::thread::sleep(Duration::from_secs(1));
    // A new lease: the old address goes, a new one comes (same network).
    let t0 = Instant::now();
    ip_in(&ns, &["addr", "del", &format!("{old}/24"), "dev", "eth0"]);
    ip_in(&ns, &["addr", "add", &format!("{new}/24"), "dev", "eth0"]);
    peer_realises(&lan.hosts[1], &lan.hosts[0], &[format!("{new}:8380")], t0);
    no_error_loop(&lan.hosts[0]);
}

#[test]
fn an_ipv6_link_local_only_lan_whose_address_is_still_in_dad_at_start() {
    require!(nix, netns);
    let f = fixture();
    let mut lan = NixLan::new(&[&[&f.top], &[]]);
    lan.upstream.stop();
    let up = lan.upstream.url();
    let ns = lan.hosts[0].net.ns.clone();
    // The peer: IPv6 only.
    ip_in(&lan.hosts[1].net.ns, &["-4", "addr", "flush", "dev", "eth0"]);
    // The holder's link appears after start with no IPv4, and duplicate address detection on: its
    // link-local address is tentative for a while.
    detach(&ns, "eth0");
    for k in ["all", "default"] {
        sysctl_in(&ns, &format!("net.ipv6.conf.{k}.accept_dad"), "1");
    }
    let v6_args = ["--listen", "[::]:8380", "--announce-interval", "30s"];
    lan.hosts[0].start_serve_args(&up, &v6_args);
    lan.hosts[1].start_serve_args(
        &up,
        &[
            "--listen",
            "[::]:8380",
            "--interface",
            "eth0",
            "--announce-interval",
            "1s",
        ],
    );
    let t0 = Instant::now();
    lan.lan.attach(&ns, "eth0", None);
    let tentative = std::process::Command::new("ip")
        .args(["-n", &ns, "-6", "addr", "show", "dev", "eth0"])
        .output()
        .expect("ip addr");
    eprintln!(
        "holder's eth0 right after it appeared:\n{}",
        String::from_utf8_lossy(&tentative.stdout)
    );
    let seen = wait_for(REACH_LIMIT, Duration::from_millis(50), || {
        lan.hosts[1].peer_addrs().iter().any(|a| a.starts_with("[fe80::"))
    });
    assert!(
        seen.is_some(),
        "the peer lists {:?}\n--- holder log ---\n{}",
        lan.hosts[1].peer_addrs(),
        lan.hosts[0].log()
    );
    let addrs = lan.hosts[1].peer_addrs();
    assert_eq!(addrs.len(), 1, "{addrs:?}");
    peer_realises(&lan.hosts[1], &lan.hosts[0], &addrs, t0);
    no_error_loop(&lan.hosts[0]);
}

#[test]
fn an_interface_that_goes_away_drops_its_peers_without_an_error_loop() {
    require!(nix, netns);
    let f = fixture();
    let mut lan = NixLan::new(&[&[&f.top], &[]]);
    lan.upstream.stop();
    let up = lan.upstream.url();
    // The holder announces rarely: its peer would keep it for a minute if it only expired.
    lan.hosts[0].start_serve_args(
        &up,
        &[
            "--listen",
            "0.0.0.0:8380",
            "--interface",
            "eth0",
            "--announce-interval",
            "20s",
        ],
    );
    lan.hosts[1].start_serve_args(&up, EVERY_INTERFACE);
    lan.wait_peers(1, &[0], Duration::from_secs(5))
        .expect("the peer sees the holder");
    let ns = lan.hosts[1].net.ns.clone();
    detach(&ns, "eth0");
    let took = lan
        .wait_peers(1, &[], Duration::from_secs(5))
        .unwrap_or_else(|| panic!("the holder is still listed:\n{}", lan.hosts[1].log()));
    eprintln!("peer behind the removed interface dropped after {took:?}");
    assert_eq!(iface_state(&lan.hosts[1], "eth0").as_deref(), Some("left"));
    // Past a periodic re-scan: still up, quiet.
    std::thread::sleep(beacon_rescan() + Duration::from_secs(1));
    assert!(lan.hosts[1].serving());
    no_error_loop(&lan.hosts[1]);
    let text = lan.hosts[1].http("http://127.0.0.1:8381/").expect("status page");
    assert!(text.contains("eth0") && text.contains("left"), "{text}");
}

/// `peers --announce` on a named interface that does not exist yet waits for it (no error), joins
/// it when it appears, and is heard there.
#[test]
fn peers_announce_waits_for_its_named_interface() {
    require!(nix, netns);
    let lan = Lan::new(2);
    let (a, b) = (lan.hosts[0].clone(), lan.hosts[1].clone());
    detach(&a.ns, "eth0");
    let listener = TestBeacon::start(&b, BeaconConfig::default());
    let child = a
        .command(crate::common::nixlan::bin())
        .args([
            "peers",
            "--announce",
            "--interface",
            "eth0",
            "--interval",
            "30s",
            "--timeout",
            "6s",
        ])
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn peers");
    std::thread::sleep(Duration::from_secs(2));
    lan.attach(&a.ns, "eth0", Some(&format!("{}/24", a.ip4)));
    let heard = wait_for(Duration::from_secs(4), Duration::from_millis(50), || {
        listener
            .table
            .peers()
            .iter()
            .any(|p| p.addrs.iter().any(|s| s.ip() == std::net::IpAddr::V4(a.ip4)))
    });
    let out = child.wait_with_output().expect("peers ran");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "peers failed: {err}");
    assert!(err.contains("interface eth0: waiting"), "{err}");
    assert!(err.contains("interface eth0: joined"), "{err}");
    assert!(
        heard.is_some(),
        "the announce on the new link was not heard; peers said:\n{err}"
    );
}

fn beacon_rescan() -> Duration {
    local_nix_cache::beacon::RESCAN_INTERVAL
}

/// The NixOS module starts `serve` without waiting for the network to be online.
#[test]
fn the_module_does_not_wait_for_the_network() {
    require!(nix, netns);
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/nixos/module.nix")).expect("module");
    for l in text.lines().filter(|l| {
        let t = l.trim_start();
        t.starts_with("after =") || t.starts_with("wants =") || t.starts_with("requires =")
    }) {
        assert!(!l.contains("network-online"), "{l}");
    }
}
