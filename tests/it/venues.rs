//! Real venue networks (issue #23), simulated with the Linux bridge and nftables: Wi-Fi that
//! filters multicast, a host behind a NixOS-style stateful firewall with no port open, two
//! subnets joined by a router, and client isolation with a venue cache. In each, a fresh host
//! given one seed (`--peer`) learns the hall over plain outbound HTTP and realises a path that
//! only another host holds, with the upstream gone.

use std::time::{Duration, Instant};

use crate::common::netns::{detach, stateful_firewall, Lan, Router};
use crate::common::nixlan::{NixLan, DEFAULT_SERVE_ARGS};
use crate::common::{fixture, hash_of, ok, signed_paths, wait_until};

/// Paths only the holder holds that the newcomer looks up (narinfo through its proxy) for the
/// found rate, besides realising the fixture's closure.
const LOOKUPS: usize = 100;

/// The holder's store: `first` and the [`LOOKUPS`] signed paths.
fn holding<'a>(first: &[&'a str], many: &'a [String]) -> Vec<&'a str> {
    first.iter().copied().chain(many.iter().map(String::as_str)).collect()
}

/// `serve`'s flags for a venue host (nixlan's defaults) plus its seeds.
fn args_with_seeds(seeds: &[String]) -> Vec<String> {
    let mut v: Vec<String> = DEFAULT_SERVE_ARGS.iter().map(|a| a.to_string()).collect();
    for s in seeds {
        v.push("--peer".into());
        v.push(s.clone());
    }
    v
}

fn start_seeded(lan: &mut NixLan, i: usize, seeds: &[String]) {
    let up = lan.upstream.url();
    let args = args_with_seeds(seeds);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    lan.hosts[i].start_serve_args(&up, &args);
}

/// Realises the fixture's closure on host `i` (upstream gone: only the holder has it), looks up
/// the [`LOOKUPS`] paths the holder also holds through host `i`'s proxy (each its first lookup),
/// and prints the found rate as a `VENUE` line for `bench/run`. The issue asks >= 99 %.
fn realises_from_the_holder(lan: &NixLan, i: usize, venue: &str) {
    let f = fixture();
    ok("nix-store -r through the proxy", &lan.hosts[i].realise(&[&f.top]));
    let realised = f.closure.iter().filter(|p| lan.hosts[i].has(p)).count();
    assert_eq!(realised, f.closure.len(), "the closure was realised");
    let urls: Vec<String> = signed_paths(LOOKUPS)
        .iter()
        .map(|p| format!("http://127.0.0.1:8381/{}.narinfo", hash_of(p)))
        .collect();
    // One curl for all, one status per line.
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &lan.hosts[i].net.ns, "curl", "-s", "--max-time", "10"])
        .args(["-o", "/dev/null", "-w", "%{http_code}\\n"])
        .args(&urls)
        .output()
        .expect("curl");
    let codes = String::from_utf8_lossy(&out.stdout);
    let looked_up = codes.lines().filter(|c| *c == "200").count();
    let (found, all) = (realised + looked_up, f.closure.len() + LOOKUPS);
    eprintln!(
        "VENUE {venue}: found {found} of {all} paths only the holder has ({realised} realised, {looked_up} of {LOOKUPS} looked up)"
    );
    assert!(found * 100 >= all * 99, "found {found} of {all}: {codes}");
}

/// Waits until host `i`'s status page says what is wrong with the network as `kind` (a
/// `beacon::diagnose::Diagnosis`; silence means something once a link was joined for 15 s).
fn wait_diagnosis(lan: &NixLan, i: usize, kind: &str) {
    wait_until(
        &format!("host{} diagnoses {kind}", i + 1),
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            lan.hosts[i].status()["diagnosis"]
                .as_array()
                .is_some_and(|d| d.iter().any(|d| d["kind"] == kind))
        },
    );
    eprintln!("host{}: {}", i + 1, lan.hosts[i].status()["diagnosis"]);
}

/// Waits until host `i`'s store server lists `addr` in `GET /peers` (the hall it hands out).
fn wait_listed(lan: &NixLan, i: usize, addr: std::net::Ipv4Addr) {
    let me = lan.hosts[i].net.ip4;
    wait_until(
        "the seed lists the holder",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            lan.hosts[i]
                .http(&format!("http://{me}:8380/peers"))
                .is_some_and(|b| b.contains(&format!(" {addr}:8380 ")))
        },
    );
}

/// Starts host `i` with `seeds` and waits (at most the 10 s from its start) until it
/// lists exactly the hosts `others`; prints how long that took from the start of its `serve`
/// (a `VENUE` line, which `bench/run` reports) and returns it.
fn starts_and_learns_the_hall(lan: &mut NixLan, i: usize, seeds: &[String], others: &[usize], venue: &str) -> Duration {
    let t0 = Instant::now();
    start_seeded(lan, i, seeds);
    let left = Duration::from_secs(10).saturating_sub(t0.elapsed());
    lan.wait_peers(i, others, left).unwrap_or_else(|| {
        panic!(
            "host{} sees {:?} after {:?}; its log:\n{}",
            i + 1,
            lan.hosts[i].peer_addrs(),
            t0.elapsed(),
            lan.hosts[i].log()
        )
    });
    let took = t0.elapsed();
    eprintln!(
        "VENUE {venue}: a newcomer with one seed knew the hall {} ms after its serve started",
        took.as_millis()
    );
    took
}

/// Guest Wi-Fi that drops the beacon groups' multicast (neighbour discovery still works): no
/// host hears another's beacons; host2 has host1 as its seed (and host1 asks host2 back), and
/// the newcomer host3, given only host2, learns both within 10 s and realises a path only host1
/// holds.
#[test]
fn multicast_filtered_wifi_a_host_with_one_seed_learns_the_hall_and_fetches() {
    require!(nix, netns, nft);
    let f = fixture();
    let many = signed_paths(LOOKUPS);
    let mut lan = NixLan::new(&[&holding(&[&f.top], &many), &[], &[]]);
    lan.lan.filter_beacon_multicast();
    lan.upstream.stop();
    let (holder, seed) = (lan.hosts[0].net.ip4, lan.hosts[1].net.ip4);
    start_seeded(&mut lan, 0, &[]);
    start_seeded(&mut lan, 1, &[holder.to_string()]);
    wait_listed(&lan, 1, holder);
    // The `peers` tool on the newcomer, given the same seed, says what is wrong too (after
    // `diagnose::QUIET_AFTER`, 15 s, of silence on the link).
    let tool = lan.hosts[2]
        .net
        .command(crate::common::nixlan::bin())
        .args(["peers", "--json", "--timeout", "17s", "--interface", "eth0", "--peer"])
        .arg(seed.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run peers");
    let mut tool = crate::common::roots::Reap(tool);
    starts_and_learns_the_hall(&mut lan, 2, &[seed.to_string()], &[0, 1], "multicast filtered");
    realises_from_the_holder(&lan, 2, "multicast filtered");
    ok("nix store verify", &lan.hosts[2].verify(&f.top));
    assert!(
        lan.lan.multicast_dropped() > 0,
        "the bridge dropped no beacon: the venue was not simulated"
    );
    // The holder, with no seed, hears no beacon: it knows only the host that seeds it, which it
    // asked back over HTTP (`seeds::askers`), never the newcomer, which seeds another host.
    let seed_addr = format!("{seed}:8380");
    assert_eq!(
        lan.hosts[0].peer_addrs(),
        vec![seed_addr],
        "the holder learnt only its asker"
    );
    // And each says why: their peers answer over HTTP only, no multicast arrives.
    wait_diagnosis(&lan, 2, "multicast_filtered");
    wait_diagnosis(&lan, 0, "multicast_filtered");
    let status = tool.0.wait().expect("peers ends at its timeout");
    let mut stderr = String::new();
    if let Some(mut e) = tool.0.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut stderr).expect("peers' stderr");
    }
    assert!(status.success(), "peers failed: {stderr}");
    for want in [
        format!("seed {seed}:8380: ok"),
        "this network filters multicast".to_owned(),
        "fix: nothing to do while a seed answers".to_owned(),
    ] {
        assert!(
            stderr.contains(&want),
            "{want:?} not in the peers tool's stderr:\n{stderr}"
        );
    }
}

/// Filtered Wi-Fi where every laptop was given the same seed (the venue host, which has no seed
/// itself and hears nobody): the seed asks back the hosts that seed it (`GET /peers?port=P`),
/// so a newcomer learns the other laptops from it within 10 s and realises a path only one of
/// them holds. Before, the seed knew nobody but itself, and every laptop learnt only the seed.
#[test]
fn multicast_filtered_wifi_laptops_that_all_seed_one_host_learn_each_other() {
    require!(nix, netns, nft);
    let f = fixture();
    let many = signed_paths(LOOKUPS);
    let mut lan = NixLan::new(&[&[], &holding(&[&f.top], &many), &[]]);
    lan.lan.filter_beacon_multicast();
    lan.upstream.stop();
    let venue = lan.hosts[0].net.ip4;
    start_seeded(&mut lan, 0, &[]);
    start_seeded(&mut lan, 1, &[venue.to_string()]);
    // The venue host, told of nobody, learns the laptop that seeds it.
    wait_listed(&lan, 0, lan.hosts[1].net.ip4);
    starts_and_learns_the_hall(&mut lan, 2, &[venue.to_string()], &[0, 1], "one seed for all");
    realises_from_the_holder(&lan, 2, "one seed for all");
    assert!(
        lan.lan.multicast_dropped() > 0,
        "the bridge dropped no beacon: the venue was not simulated"
    );
}

/// A NixOS laptop with its default firewall (stateful, no port open, `openFirewall = false`):
/// with a seed it learns the hall over outbound HTTP and realises a path a peer holds.
#[test]
fn stateful_firewall_with_no_port_open_a_seed_gives_a_working_client() {
    require!(nix, netns, nft);
    let f = fixture();
    let many = signed_paths(LOOKUPS);
    let mut lan = NixLan::new(&[&holding(&[&f.top], &many), &[]]);
    stateful_firewall(&lan.hosts[1].net.ns);
    let holder = lan.hosts[0].net.ip4;
    start_seeded(&mut lan, 0, &[]);
    starts_and_learns_the_hall(&mut lan, 1, &[format!("{holder}:8380")], &[0], "stateful firewall");
    // The `peers` tool takes seeds too, and shows each: the store server answering, an address
    // where nothing answers, and an HTTP server that is not a local-nix-cache store server
    // (the upstream), each failing seed retried, and none of them a crash.
    let nobody = lan.lan.addr(99);
    let other_http = format!("{}:8080", lan.upstream.net.ip4);
    let out = lan.hosts[1]
        .net
        .command(crate::common::nixlan::bin())
        .args(["peers", "--json", "--timeout", "3s", "--interface", "eth0"])
        .args([
            "--peer",
            &holder.to_string(),
            "--peer",
            &nobody.to_string(),
            "--peer",
            &other_http,
        ])
        .output()
        .expect("run peers");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "peers failed: {stderr}");
    assert!(
        stdout.contains(&format!("\"addr\":\"{holder}:8380\"")),
        "{stdout}\n{stderr}"
    );
    for want in [
        format!("seed {holder}:8380: ok"),
        format!("seed {nobody}:8380: failing"),
        format!("seed {other_http}: failing"),
        "not a local-nix-cache store server".to_owned(),
    ] {
        assert!(stderr.contains(&want), "{want:?} not in:\n{stderr}");
    }
    // Only the holder can serve the path now.
    lan.upstream.stop();
    realises_from_the_holder(&lan, 1, "stateful firewall");
    // Its own beacons never come back through its firewall: it says so, with the fix.
    wait_diagnosis(&lan, 1, "own_beacons_not_heard");
}

/// Two subnets joined by a router (multicast is not routed): a host on the second subnet,
/// given one host of the first as its seed, learns the first subnet's hall (the holder it
/// never heard of) and realises a path only the holder has.
#[test]
fn two_subnets_joined_by_a_router_a_seed_across_it_is_enough() {
    require!(nix, netns);
    let f = fixture();
    let many = signed_paths(LOOKUPS);
    let mut lan = NixLan::new(&[&holding(&[&f.top], &many), &[], &[]]);
    let lan2 = Lan::new(0);
    let router = Router::new(&lan.lan, &lan2);
    let fresh = lan.hosts[2].net.ns.clone();
    detach(&fresh, "eth0");
    lan2.attach(&fresh, "eth0", Some(&format!("{}/24", lan2.addr(3))));
    router.route_from(&fresh, &lan2, &lan.lan);
    for i in [0, 1] {
        router.route_from(&lan.hosts[i].net.ns, &lan.lan, &lan2);
    }
    lan.upstream.stop();
    let (holder, seed) = (lan.hosts[0].net.ip4, lan.hosts[1].net.ip4);
    start_seeded(&mut lan, 0, &[]);
    start_seeded(&mut lan, 1, &[]);
    wait_listed(&lan, 1, holder);
    starts_and_learns_the_hall(&mut lan, 2, &[seed.to_string()], &[0, 1], "across a router");
    realises_from_the_holder(&lan, 2, "across a router");
}

/// Client isolation with a venue cache: host1 (the venue cache, on a non-isolated port) holds
/// the workshop's path; the laptops host2 and host3 are on isolated ports, each seeded with the
/// venue cache. Host3 gets the venue cache's path; host2's path is out of its reach, and its
/// seed report says so (listed, unreachable over TCP).
#[test]
fn client_isolation_laptops_get_the_venue_caches_paths_and_are_told_why_not_the_others() {
    require!(nix, netns);
    let f = fixture();
    let many = signed_paths(LOOKUPS);
    let mut lan = NixLan::new(&[&holding(&[&f.top], &many), &[&f.rand], &[]]);
    lan.lan.isolate(1);
    lan.lan.isolate(2);
    lan.upstream.stop();
    let venue = lan.hosts[0].net.ip4;
    let laptop = lan.hosts[1].net.ip4;
    start_seeded(&mut lan, 0, &[]);
    start_seeded(&mut lan, 1, &[venue.to_string()]);
    wait_listed(&lan, 0, laptop);
    start_seeded(&mut lan, 2, &[venue.to_string()]);
    let want = format!("{venue}:8380");
    wait_until(
        "host3 lists the venue cache",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || lan.hosts[2].peer_addrs().contains(&want),
    );
    realises_from_the_holder(&lan, 2, "client isolation, from the venue cache");
    wait_until(
        "host3's seed report counts host2 unreachable",
        Duration::from_secs(15),
        Duration::from_millis(100),
        || lan.hosts[2].status()["seeds"][0]["unreachable"].as_u64() >= Some(1),
    );
    wait_diagnosis(&lan, 2, "peers_unreachable");
    let t0 = Instant::now();
    let out = lan.hosts[2].realise(&[&f.rand]);
    assert!(
        !out.status.success(),
        "a path only an unreachable laptop holds was fetched"
    );
    // Reported, not asserted (speed lives in benchmarks): the bound is 3 s.
    eprintln!(
        "VENUE client isolation: a path only an unreachable laptop holds was answered (not found) in {} ms",
        t0.elapsed().as_millis()
    );
}
