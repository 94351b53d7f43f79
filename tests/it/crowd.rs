//! The keynote flash crowd (issue #24): one host holds a path P, and a crowd of hosts realises P
//! at once, each with its real Nix client through its own proxy. Real `serve` hosts in network
//! namespaces (`common::nixlan`: a chroot store, a private nix-daemon and the real binary per
//! host), every host's egress shaped with `tc tbf` as a laptop's link would be.
//!
//! What a run measures, per wave: when each client's `nix-store -r` ended and how (all done =
//! the last one; a non-zero exit is a failed realisation), the bytes every host put on its link
//! during the wave (its `eth0` transmit counter: see [`Wave::sent`] for why that is the right
//! count), the NARs each client's proxy took from each source (its recent transfers) and the
//! requests the upstream answered (its request log).
//!
//! The CI test holds the issue's goals at small scale: 8 clients, a 16 MiB path, no upstream:
//! zero failed realisations, and no host, the holder included, sends more than 4 copies of P (a
//! star, the behaviour before the mechanism, has the holder send 8). `bench_crowd` (ignored; `bench/crowd.sh` runs
//! it) prints the figures of one scenario as `BENCH-CROWD|key|value` lines.
//! Every process is killed by PID and every namespace deleted on drop, even when a test fails.

use std::collections::BTreeMap;
use std::process::{Child, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::common::nixlan::NixLan;
use crate::common::{fixture, nix as nix_cmd, run, wait_for};

/// Every host's link, as in the issue (`bench_crowd` takes another from `CROWD_RATE`).
const RATE: &str = "200mbit";
const MIB: u64 = 1024 * 1024;
/// Every crowd host's `serve` flags (besides store, upstream, key, spool and state): the
/// product's default announce interval (5 s), not the 1 s of the smaller LAN tests: with 50
/// hosts announcing every second on a loaded 2-core machine, late beacons expired peers faster
/// than the LAN settled.
const SERVE_ARGS: &[&str] = &[
    "--listen",
    "0.0.0.0:8380",
    "--interface",
    "eth0",
    "--announce-interval",
    "5s",
];
/// The holder's `serve` flags in the CI test: every NAR through its nix-daemon, whose 4
/// connections leave 2 for NAR streams (`store::QUERY_RESERVE`), so its transfer cap is 2 (the
/// store server admits no more transfers than the daemon can stream): 8 clients meet a full
/// holder, as 40 meet one with the default 32 slots.
const HOLDER_CAPPED: &[&str] = &["--real-store-dir", "none", "--daemon-connections", "4"];
/// How long a crowd waits, once every host knows the LAN and the holder's summary, for the
/// other hosts' summaries.
const SUMMARIES_WAIT: Duration = Duration::from_secs(15);

/// `mib` MiB of random bytes (nothing compresses it, on the LAN or upstream) as one signed path
/// in the fixture's cache, stored there uncompressed (xz gains nothing on random bytes and costs
/// seconds per MiB). Built once per size per test binary.
fn crowd_path(mib: u64) -> String {
    static BUILT: OnceLock<Mutex<BTreeMap<u64, String>>> = OnceLock::new();
    let mut built = BUILT.get_or_init(Default::default).lock().expect("lock");
    if let Some(p) = built.get(&mib) {
        return p.clone();
    }
    let f = fixture();
    let home = f.root.join("home");
    let expr = f.root.join(format!("crowd-{mib}.nix"));
    std::fs::write(
        &expr,
        format!(
            r#"builtins.derivation {{
                name = "lnc-crowd-{mib}mib";
                system = builtins.currentSystem;
                builder = "/bin/sh";
                PATH = "/usr/bin:/bin";
                args = [ "-c" "head -c {} /dev/urandom > $out" ];
            }}"#,
            mib * MIB
        ),
    )
    .expect("write crowd.nix");
    let path = run(nix_cmd("nix-build", &home).arg(&expr).arg("--no-out-link"));
    let cache = f.cache_url.trim_start_matches("file://");
    let to = format!("file://{cache}?secret-key={}&compression=none", f.sk_file.display());
    run(nix_cmd("nix", &home).args(["copy", "--to", &to, &path]));
    built.insert(mib, path.clone());
    path
}

/// A LAN of one holder (host 0, which holds P at the start) and empty hosts, every link shaped.
struct Crowd {
    lan: NixLan,
    path: String,
    /// P's size in bytes (the NAR is a few hundred bytes more).
    size: u64,
}

/// What one wave of clients did.
struct Wave {
    clients: Vec<usize>,
    /// Per client (same order): when its `nix-store -r` ended after the wave's start, and
    /// whether it succeeded (exit 0 and P valid in its store). `None`: still running at the
    /// limit (killed; counts as failed).
    ended: Vec<Option<(Duration, bool)>>,
    /// Per host of the LAN: bytes it put on its link during the wave, from its `eth0` transmit
    /// counter. That counter sees every byte the host sends, whichever part of `serve` sent it
    /// (the store server's NARs, whole or in ranges, from its store or from a fetch in flight),
    /// so it needs no trust in the mechanism's own accounting. It also counts headers, the
    /// acknowledgements of what the host downloads and beacons, so it reads a little high:
    /// measured, a holder that streamed 8 NARs of 16 MiB (and nothing else) read 8.12 × P.
    sent: Vec<u64>,
    /// NARs of P the wave's proxies took, per source as their recent transfers name it.
    sources: BTreeMap<String, usize>,
    /// GETs the upstream answered during the wave: narinfo of P, NARs.
    upstream_narinfos: usize,
    upstream_nars: usize,
    upstream_sent: u64,
    /// The machine's CPU time busy during the wave, as a share of all its cores' time
    /// (`/proc/stat`): every host shares this machine's cores, so a wave that keeps them busy is
    /// bound by the CPU, not by the links.
    cpu_busy: f64,
}

/// The machine's CPU time from `/proc/stat`'s first line: (busy, total), in ticks.
fn cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: idle and iowait are not busy.
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    let total: u64 = ticks.iter().take(8).sum();
    (total.saturating_sub(idle), total)
}

impl Wave {
    fn failed(&self) -> usize {
        self.ended.iter().filter(|e| !matches!(e, Some((_, true)))).count()
    }

    /// When the last client ended (succeeded or failed); none while one was still running at
    /// the limit.
    fn all_done(&self) -> Option<Duration> {
        let ends: Option<Vec<Duration>> = self.ended.iter().map(|e| e.map(|(d, _)| d)).collect();
        ends?.into_iter().max()
    }

    fn done_times(&self) -> Vec<Duration> {
        let mut v: Vec<Duration> = self.ended.iter().filter_map(|e| e.map(|(d, _)| d)).collect();
        v.sort();
        v
    }
}

impl Crowd {
    /// `clients` empty hosts besides the holder; `upstream`: whether the proxies have one (the
    /// fixture's cache, shaped like the hosts) or none (an offline hall); `holder_args`: more
    /// `serve` flags for the holder.
    fn new(clients: usize, mib: u64, upstream: bool, holder_args: &[&str]) -> Self {
        Self::with_rate(clients, mib, upstream, holder_args, RATE)
    }

    /// [`Crowd::new`] with every link shaped to `rate` (a tc rate: "50mbit").
    fn with_rate(clients: usize, mib: u64, upstream: bool, holder_args: &[&str], rate: &str) -> Self {
        let path = crowd_path(mib);
        let mut stores: Vec<&[&str]> = vec![&[]; clients + 1];
        let held = [path.as_str()];
        stores[0] = &held;
        let mut lan = NixLan::new(&stores);
        for h in &lan.hosts {
            h.shape_egress(rate);
        }
        let up = if upstream {
            lan.upstream.shape(rate);
            lan.upstream.url()
        } else {
            lan.upstream.stop();
            "none".to_owned()
        };
        let mut args = SERVE_ARGS.to_vec();
        args.extend_from_slice(holder_args);
        lan.hosts[0].start_serve_args(&up, &args);
        for h in &mut lan.hosts[1..] {
            h.start_serve_args(&up, SERVE_ARGS);
        }
        let me = Self {
            lan,
            path,
            size: mib * MIB,
        };
        me.wait_ready(&(0..=clients).collect::<Vec<_>>(), Duration::from_secs(150));
        me
    }

    fn hosts(&self) -> usize {
        self.lan.hosts.len()
    }

    /// Waits until every host of `who` lists every other serving host of `who` and holds the
    /// holder's content summary (so the holder is found on the first lookup), then (at most
    /// [`SUMMARIES_WAIT`] more) until it holds every other host's summary too. A host's first
    /// summary fetches can fail while many start at once (they back off, up to a minute): a
    /// peer without a summary is still asked now and then, as in a real hall.
    fn wait_ready(&self, who: &[usize], limit: Duration) {
        let t0 = Instant::now();
        let want = who.len() - 1;
        let holder = format!("{}:8380", self.lan.hosts[0].net.ip4);
        let peers = |i: usize| {
            self.lan.hosts[i].status()["peers"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        };
        for &i in who {
            let ready = wait_for(limit.saturating_sub(t0.elapsed()), Duration::from_millis(200), || {
                let peers = peers(i);
                let holder_summary = i == 0
                    || peers
                        .iter()
                        .any(|p| p["addr"].as_str() == Some(holder.as_str()) && !p["summary"].is_null());
                (peers.len() >= want && holder_summary).then_some(())
            });
            if ready.is_none() {
                let listed = peers(i);
                let known: Vec<&str> = listed.iter().filter_map(|p| p["addr"].as_str()).collect();
                let missing: Vec<String> = who
                    .iter()
                    .map(|&j| format!("{}:8380", self.lan.hosts[j].net.ip4))
                    .filter(|a| *a != format!("{}:8380", self.lan.hosts[i].net.ip4) && !known.contains(&a.as_str()))
                    .collect();
                let holder_entry = listed.iter().find(|p| p["addr"].as_str() == Some(holder.as_str()));
                let of_missing: Vec<String> = who
                    .iter()
                    .filter(|&&j| missing.contains(&format!("{}:8380", self.lan.hosts[j].net.ip4)))
                    .take(3)
                    .map(|&j| {
                        let st = self.lan.hosts[j].status();
                        format!(
                            "{} lists {} peers, beacon {}, log tail {:?}",
                            self.lan.hosts[j].name,
                            st["peers"].as_array().map_or(0, Vec::len),
                            st["beacon"],
                            self.lan.hosts[j].log().lines().rev().take(3).collect::<Vec<_>>()
                        )
                    })
                    .collect();
                eprintln!("missing hosts: {of_missing:#?}");
                panic!(
                    "host{} does not know the LAN after {:?}: {} of {want} peers listed, missing {missing:?}; \
                     the holder's entry: {holder_entry:?}; beacon: {}",
                    i + 1,
                    t0.elapsed(),
                    listed.len(),
                    self.lan.hosts[i].status()["beacon"]
                );
            }
        }
        let t1 = Instant::now();
        for &i in who {
            let _ = wait_for(
                SUMMARIES_WAIT.saturating_sub(t1.elapsed()),
                Duration::from_millis(200),
                || (peers(i).iter().filter(|p| !p["summary"].is_null()).count() >= want).then_some(()),
            );
        }
    }

    /// All of `clients` realise P at once; waits (at most `limit`) until each ends.
    fn wave(&self, clients: &[usize], limit: Duration) -> Wave {
        let before: Vec<u64> = self.lan.hosts.iter().map(|h| h.tx_bytes()).collect();
        let up = &self.lan.upstream;
        let (narinfo_part, up_narinfos, up_nars) = {
            let part = format!("{}.narinfo", crate::common::hash_of(&self.path));
            let (a, b) = (up.gets(&part), up.gets("/nar/"));
            (part, a, b)
        };
        let up_sent = up.tx_bytes();
        let cpu0 = cpu_ticks();
        let t0 = Instant::now();
        let mut children: Vec<Child> = clients
            .iter()
            .map(|&c| {
                let h = &self.lan.hosts[c];
                let err = std::fs::File::create(h.store.dir.path().join("realise.err")).expect("err file");
                h.realise_cmd(&[&self.path])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(err)
                    .spawn()
                    .expect("spawn nix-store -r")
            })
            .collect();
        let mut ended: Vec<Option<(Duration, bool)>> = vec![None; clients.len()];
        let _ = wait_for(limit, Duration::from_millis(20), || {
            for (k, ch) in children.iter_mut().enumerate() {
                if ended[k].is_none() {
                    if let Ok(Some(st)) = ch.try_wait() {
                        ended[k] = Some((t0.elapsed(), st.success()));
                    }
                }
            }
            ended.iter().all(Option::is_some).then_some(())
        });
        let cpu1 = cpu_ticks();
        for (k, ch) in children.iter_mut().enumerate() {
            if ended[k].is_none() {
                let _ = ch.kill();
                let _ = ch.wait();
            }
        }
        // Really there: exit 0 is not enough, P must be valid in the client's store.
        for (k, &c) in clients.iter().enumerate() {
            if let Some((_, ok)) = &mut ended[k] {
                *ok = *ok && self.lan.hosts[c].has(&self.path);
            }
        }
        let sent = self
            .lan
            .hosts
            .iter()
            .zip(&before)
            .map(|(h, b)| h.tx_bytes().saturating_sub(*b))
            .collect();
        let base = self.path.rsplit('/').next().unwrap_or_default().to_owned();
        let mut sources = BTreeMap::new();
        for &c in clients {
            for t in self.lan.hosts[c].status()["recent"].as_array().into_iter().flatten() {
                if t["path"]
                    .as_str()
                    .is_some_and(|p| p.contains(&base) || base.contains(p))
                {
                    let src = t["source"].as_str().unwrap_or("?");
                    *sources.entry(self.name_source(src)).or_default() += 1;
                }
            }
        }
        Wave {
            clients: clients.to_vec(),
            ended,
            sent,
            sources,
            upstream_narinfos: up.gets(&narinfo_part) - up_narinfos,
            upstream_nars: up.gets("/nar/") - up_nars,
            upstream_sent: up.tx_bytes().saturating_sub(up_sent),
            cpu_busy: (cpu1.0 - cpu0.0) as f64 / (cpu1.1 - cpu0.1).max(1) as f64,
        }
    }

    /// A transfer's source as the report names it: `H` (the holder), `hostN`, or as given.
    fn name_source(&self, src: &str) -> String {
        if src.is_empty() {
            return "none (unavailable)".into();
        }
        for (i, h) in self.lan.hosts.iter().enumerate() {
            if src.contains(&format!("{}:", h.net.ip4)) {
                return if i == 0 { "H".into() } else { h.name.clone() };
            }
        }
        if src.contains(&self.lan.upstream.net.ip4.to_string()) {
            return "upstream".into();
        }
        src.to_owned()
    }

    /// `bytes` as a multiple of P.
    fn times_p(&self, bytes: u64) -> f64 {
        bytes as f64 / self.size as f64
    }

    /// The failed clients' `nix-store` errors and their hosts' serve logs' last lines.
    fn failures(&self, w: &Wave) -> String {
        let mut out = String::new();
        let failed: Vec<usize> = (0..w.clients.len())
            .filter(|k| !matches!(w.ended[*k], Some((_, true))))
            .collect();
        out += &format!(
            " {} of {}: {}",
            failed.len(),
            w.clients.len(),
            failed
                .iter()
                .map(|k| self.lan.hosts[w.clients[*k]].name.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        );
        // The first two in detail.
        for &k in failed.iter().take(2) {
            let c = w.clients[k];
            {
                let h = &self.lan.hosts[c];
                let err = std::fs::read_to_string(h.store.dir.path().join("realise.err")).unwrap_or_default();
                let log = h.log();
                let tail: Vec<&str> = log.lines().rev().take(8).collect();
                out += &format!(
                    "\n{} ({:?}): {}\n  serve log tail: {}",
                    h.name,
                    w.ended[k],
                    err.trim(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n    ")
                );
            }
        }
        out
    }

    /// One line per figure of `w`, as the bench prints them.
    fn report(&self, w: &Wave) -> Vec<(&'static str, String)> {
        let times = w.done_times();
        let holder = self.times_p(w.sent[0]);
        let (max_i, max) = w
            .sent
            .iter()
            .enumerate()
            .max_by_key(|(_, b)| **b)
            .map(|(i, b)| (i, *b))
            .unwrap_or_default();
        let over_2p = w.sent.iter().filter(|b| self.times_p(**b) > 2.0).count();
        vec![
            ("clients", w.clients.len().to_string()),
            (
                "all_done_s",
                w.all_done().map_or("—".into(), |d| format!("{:.1}", d.as_secs_f64())),
            ),
            (
                "median_done_s",
                times
                    .get(times.len() / 2)
                    .map_or("—".into(), |d| format!("{:.1}", d.as_secs_f64())),
            ),
            ("failed", w.failed().to_string()),
            ("holder_xp", format!("{holder:.2}")),
            (
                "max_xp",
                format!("{:.2} × P ({})", self.times_p(max), self.lan.hosts[max_i].name),
            ),
            ("hosts_over_2p", over_2p.to_string()),
            ("total_xp", format!("{:.2}", self.times_p(w.sent.iter().sum()))),
            ("sources", sources_text(&w.sources)),
            ("cpu_busy_pct", format!("{:.0}", w.cpu_busy * 100.0)),
            (
                "upstream",
                format!(
                    "{} narinfo, {} NAR GETs, {:.2} × P sent",
                    w.upstream_narinfos,
                    w.upstream_nars,
                    self.times_p(w.upstream_sent)
                ),
            ),
        ]
    }
}

/// NARs per source, short: each source when there are few, else the holder's, the upstream's,
/// and how many other hosts served how many (the most from one).
fn sources_text(sources: &BTreeMap<String, usize>) -> String {
    if sources.len() <= 5 {
        return sources
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ");
    }
    let named = ["H", "upstream", "none (unavailable)"];
    let mut parts: Vec<String> = named
        .iter()
        .filter_map(|k| sources.get(*k).map(|v| format!("{k}: {v}")))
        .collect();
    let others: Vec<usize> = sources
        .iter()
        .filter(|(k, _)| !named.contains(&k.as_str()))
        .map(|(_, v)| *v)
        .collect();
    parts.push(format!(
        "{} other hosts: {} (at most {} from one)",
        others.len(),
        others.iter().sum::<usize>(),
        others.iter().max().unwrap_or(&0)
    ));
    parts.join(", ")
}

/// What a host's `eth0` transmit counter reads per byte of NAR it sent, at most: a holder that
/// sent P once reads 1.03-1.04 × P (measured; `docs/benchmarks.md`).
const LINK_OVERHEAD: f64 = 1.05;

/// Issue #24's CI scale: 8 clients at once on one holder of a 16 MiB path, 200 Mbit/s links, no
/// upstream, the holder's transfer cap lowered to 2 ([`HOLDER_CAPPED`]). Before the mechanism,
/// the proxies form a star on the holder (it sends 8 × P) and those queued past its cap get a
/// 404 (failed realisations). Asserted: every realisation succeeds, and neither the holder nor
/// any host sends more than 4 copies of P (outcomes and bytes, never wall-clock time; the issue's
/// "holder <= 3 × P" at 24 hosts is a `bench/crowd.sh` figure: 2.08 × P).
#[test]
fn a_crowd_of_eight_on_one_holder_all_succeed_and_no_host_sends_more_than_four_copies() {
    require!(nix, netns);
    let crowd = Crowd::new(8, 16, false, HOLDER_CAPPED);
    let clients: Vec<usize> = (1..crowd.hosts()).collect();
    let w = crowd.wave(&clients, Duration::from_secs(120));
    for (k, v) in crowd.report(&w) {
        eprintln!("crowd of 8: {k} = {v}");
    }
    assert_eq!(w.failed(), 0, "failed realisations:{}", crowd.failures(&w));
    // Copies, from the link's counter: one copy of P reads 1.03-1.04 × P (headers,
    // retransmissions, acknowledgements, beacons), so three copies read up to about 3.13 × P.
    let copies = |b: u64| crowd.times_p(b) / LINK_OVERHEAD;
    // The holder streams one NAR to at most 2 proxies at once and serves again as its relays
    // finish: 2 or 3 copies in most runs, 4 in some (timing decides); a star is 8.
    let holder = copies(w.sent[0]);
    assert!(holder <= 4.0, "the holder sent {holder:.2} copies of P (a star)");
    for (i, b) in w.sent.iter().enumerate() {
        let x = copies(*b);
        assert!(x <= 4.0, "{} sent {x:.2} copies of P", crowd.lan.hosts[i].name);
    }
}

/// One scenario of `bench/crowd.sh`, from the environment: `CROWD_N` clients at once (12),
/// `CROWD_MIB` (64), `CROWD_UPSTREAM=1` (the proxies have the shaped upstream; default none),
/// `CROWD_WAVE2` (a second wave of that many, 10 s after the first is all done; 0),
/// `CROWD_HOLDER_ARGS` (more `serve` flags for the holder, space-separated), `CROWD_SERVE_LOGS`
/// (a directory: every host's `serve` log is written there at the end), `CROWD_RATE` (every
/// link's rate, [`RATE`] by default: a slower one spreads the same CPU work over a longer
/// time, which tells a crowd limited by this machine's two cores from one limited by its
/// links). T1 first: one more
/// host realises P alone, then stops its `serve` (a goodbye) before the crowd starts.
#[test]
#[ignore]
fn bench_crowd() {
    require!(nix, netns);
    let env = |k: &str, d: u64| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let n = env("CROWD_N", 12) as usize;
    let mib = env("CROWD_MIB", 64);
    let wave2 = env("CROWD_WAVE2", 0) as usize;
    let upstream = env("CROWD_UPSTREAM", 0) == 1;
    let holder_args = std::env::var("CROWD_HOLDER_ARGS").unwrap_or_default();
    let holder_args: Vec<&str> = holder_args.split_whitespace().collect();
    let t_setup = Instant::now();
    // Host 1 is the solo client for T1; then the first wave, then the second.
    let rate = std::env::var("CROWD_RATE").unwrap_or_else(|_| RATE.to_owned());
    let mut crowd = Crowd::with_rate(1 + n + wave2, mib, upstream, &holder_args, &rate);
    let figure = |k: &str, v: &dyn std::fmt::Display| println!("BENCH-CROWD|{k}|{v}");
    figure("rate", &rate);
    figure("setup_s", &format!("{:.0}", t_setup.elapsed().as_secs_f64()));
    figure(
        "machine",
        &format!(
            "load {}",
            std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
        ),
    );
    let solo = crowd.wave(&[1], Duration::from_secs(120));
    assert_eq!(solo.failed(), 0, "T1 failed:{}", crowd.failures(&solo));
    let t1 = solo.all_done().expect("T1");
    figure("t1_s", &format!("{:.2}", t1.as_secs_f64()));
    figure("t1_holder_xp", &format!("{:.2}", crowd.times_p(solo.sent[0])));
    crowd.lan.hosts[1].stop_serve(false);
    let rest: Vec<usize> = std::iter::once(0).chain(2..crowd.hosts()).collect();
    crowd.wait_ready_without(&rest, 1);
    let first: Vec<usize> = (2..2 + n).collect();
    let limit = Duration::from_secs(env("CROWD_LIMIT_S", 240));
    let w1 = crowd.wave(&first, limit);
    for (k, v) in crowd.report(&w1) {
        figure(&format!("w1_{k}"), &v);
    }
    if let Some(d) = w1.all_done() {
        figure("w1_all_done_t1", &format!("{:.1}", d.as_secs_f64() / t1.as_secs_f64()));
    }
    if w1.failed() > 0 {
        eprintln!("first wave failures:{}", crowd.failures(&w1));
    }
    if wave2 > 0 {
        std::thread::sleep(Duration::from_secs(10));
        let second: Vec<usize> = (2 + n..2 + n + wave2).collect();
        let w2 = crowd.wave(&second, limit);
        for (k, v) in crowd.report(&w2) {
            figure(&format!("w2_{k}"), &v);
        }
        if let Some(d) = w2.all_done() {
            figure("w2_all_done_t1", &format!("{:.1}", d.as_secs_f64() / t1.as_secs_f64()));
        }
        let first_max = first.iter().map(|&i| crowd.times_p(w2.sent[i])).fold(0.0, f64::max);
        figure("w2_first_wave_max_xp", &format!("{first_max:.2}"));
        if w2.failed() > 0 {
            eprintln!("second wave failures:{}", crowd.failures(&w2));
        }
    }
    // The hosts' `serve` logs, for a look at where the time and the bytes went.
    if let Some(dir) = std::env::var("CROWD_SERVE_LOGS").ok().filter(|d| !d.is_empty()) {
        for h in &crowd.lan.hosts {
            let _ = std::fs::write(std::path::Path::new(&dir).join(format!("{}.log", h.name)), h.log());
        }
    }
}

impl Crowd {
    /// Waits (at most 10 s) until no host of `who` lists host `gone` any more (it said goodbye).
    fn wait_ready_without(&self, who: &[usize], gone: usize) {
        let addr = format!("{}:8380", self.lan.hosts[gone].net.ip4);
        for &i in who {
            let _ = wait_for(Duration::from_secs(10), Duration::from_millis(100), || {
                (!self.lan.hosts[i].peer_addrs().contains(&addr)).then_some(())
            });
        }
    }
}
