//! Benchmark (ignored; `bench/hall.sh` runs it with `BENCH_HALL_SIM_SIZES`): the beacon's
//! traffic in a simulated hall of up to 1,000 hosts (issue #27). Real `serve` processes stop at
//! about 500 on this machine (`bench/hall-serve.sh`); here each host is an in-process beacon
//! (`TestBeacon`: the real `beacon::run` on its own thread and runtime) in a network namespace of
//! its own, one per namespace as a real hall has one address per laptop, on one bridge, with the
//! default configuration (5 s asked for), so the announce budget
//! (`beacon::sender::ANNOUNCE_BUDGET_BYTES_PER_SEC`), not the config, sets every interval. A
//! passive sniffer host counts what crosses the link over a window longer than one round.
//! Checked: at most 8,000 B/s and no host's table short of the hall (after it filled). Timing
//! is only reported.

use std::time::{Duration, Instant};

use crate::common::netns::{Lan, Sniffer, TestBeacon};
use crate::common::wait::wait_for;
use local_nix_cache::beacon::{self, BeaconConfig};

/// Bytes one host's round of periodic announces puts on the link (IPv4 and IPv6 datagrams with
/// their headers), about: the hostname's length moves it by a few bytes.
const ROUND_BYTES: usize = 208;

/// The hall's size: `LNC_HALL_SIM_SIZE` (default 1,000).
fn size() -> usize {
    std::env::var("LNC_HALL_SIM_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

/// Datagrams the kernel dropped on the beacon port of every host (`/proc/net/udp{,6}`, the
/// `drops` column of sockets bound to the beacon port).
fn drops(lan: &Lan) -> u64 {
    let port = format!(":{:04X} ", beacon::DEFAULT_PORT);
    lan.hosts
        .iter()
        .map(|h| {
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", &h.ns, "cat", "/proc/net/udp", "/proc/net/udp6"])
                .output()
                .expect("read /proc/net/udp");
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .is_some_and(|local| format!("{local} ").ends_with(&port))
                })
                .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

#[test]
#[ignore = "benchmark: bench/hall.sh (BENCH_HALL_SIM_SIZES)"]
fn bench_a_simulated_hall_stays_within_the_beacon_budget() {
    require!(netns);
    let n = size();
    let t0 = Instant::now();
    // hosts[0]: the sniffer (sends nothing); 1..=n: the hall.
    let lan = Lan::new(n + 1);
    let wired = t0.elapsed();
    let cfg = BeaconConfig {
        groups: vec![beacon::DEFAULT_GROUP_V4.into(), beacon::DEFAULT_GROUP_V6.into()],
        ..BeaconConfig::default()
    };
    let t1 = Instant::now();
    let hall: Vec<TestBeacon> = lan.hosts[1..]
        .iter()
        .map(|h| TestBeacon::start(h, cfg.clone()))
        .collect();
    let started = t1.elapsed();
    // Every table full: within a few of the budget's rounds (`beacon::budgeted_interval`).
    let full = wait_for(Duration::from_secs(300), Duration::from_millis(500), || {
        hall.iter().all(|b| b.table.peers().len() == n - 1)
    });
    let converged = t1.elapsed();
    let mut sizes: Vec<usize> = hall.iter().map(|b| b.table.peers().len()).collect();
    sizes.sort_unstable();
    assert!(
        full.is_some(),
        "tables not full after {converged:?}: smallest {}, median {}",
        sizes[0],
        sizes[n / 2]
    );
    // A window of whole rounds (a part of a round holds a part of the hosts' announces), at
    // least 40 s (34.7 s a round at 1,000 hosts), after one more round to settle.
    let round = beacon::budgeted_interval(beacon::DEFAULT_INTERVAL, n, ROUND_BYTES);
    std::thread::sleep(round.min(Duration::from_secs(40)));
    let window = round * (40_000 / round.as_millis() as u32 + 1);
    let seen = Sniffer::start(&lan.hosts[0], window).finish();
    let bytes: usize = seen.iter().map(|s| s.wire_bytes()).sum();
    let bps = bytes as f64 / window.as_secs_f64();
    let mut after: Vec<usize> = hall.iter().map(|b| b.table.peers().len()).collect();
    after.sort_unstable();
    let dropped = drops(&lan);
    eprintln!(
        "HALL-SIM hosts={n} wired_s={:.1} started_s={:.1} full_s={:.1} window_s={:.1} datagrams={} \
         dgrams_per_s={:.1} bytes_per_s={bps:.0} formula_bytes_per_s={:.0} table_min={} table_median={} dropped={dropped}",
        wired.as_secs_f64(),
        started.as_secs_f64(),
        converged.as_secs_f64(),
        window.as_secs_f64(),
        seen.len(),
        seen.len() as f64 / window.as_secs_f64(),
        (n * ROUND_BYTES) as f64 / round.as_secs_f64(),
        after[0],
        after[n / 2],
    );
    assert!(bps <= 8_000.0, "{bps:.0} B/s on the link in a hall of {n}");
    assert_eq!(after[0], n - 1, "a host lost peers in the window");
}
