//! `local-nix-cache peers`: the multicast debug tool. Works without a running `serve`.
//!
//! Joins the beacon groups, asks every host to announce now (a query), and prints the live peer
//! table: as it changes, and once more at the end (`--timeout`). `--json` prints one JSON object
//! per peer (stdout stays pure JSON lines; diagnostics go to stderr), `--raw` every datagram with
//! its decoded form or decode error, `--announce` makes this tool a test host. With no usable
//! interface it waits for one (interfaces are reported on stderr as they are joined and left).
//! `--peer HOST` seeds are asked for the hall over HTTP; their states and what is wrong with the
//! network (`beacon::diagnose`, each with its fix) go to stderr as they change.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::beacon::diagnose::{diagnose, Diagnosis};
use crate::beacon::wire::{NodeId, FLAG_NAR_NONE, FLAG_NAR_ZSTD, FLAG_PROXY};
use crate::beacon::{self, BeaconConfig, LinkState, Outcome, Peer, PeerTable, RawDatagram};

/// Options of the `peers` command, already validated.
pub struct PeersOptions {
    pub beacon: BeaconConfig,
    pub timeout: Option<Duration>,
    pub json: bool,
    pub raw: bool,
}

/// Flag names for a flags word.
pub fn flag_names(flags: u16) -> Vec<&'static str> {
    let mut v = Vec::new();
    for (bit, name) in [
        (FLAG_NAR_NONE, "nar-none"),
        (FLAG_NAR_ZSTD, "nar-zstd"),
        (FLAG_PROXY, "proxy"),
    ] {
        if flags & bit != 0 {
            v.push(name);
        }
    }
    v
}

/// `http://ADDR` for a peer address; IPv6 link-local addresses carry their zone.
pub fn http_url(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V6(a) if a.scope_id() != 0 => {
            let zone = nix::net::if_::if_indextoname(a.scope_id())
                .ok()
                .and_then(|n| n.into_string().ok())
                .unwrap_or_else(|| a.scope_id().to_string());
            format!("http://[{}%25{zone}]:{}", a.ip(), a.port())
        }
        a => format!("http://{a}"),
    }
}

/// A peer as one JSON object.
pub fn peer_json(p: &Peer, now: Instant) -> serde_json::Value {
    json!({
        "node": p.node.to_string(),
        "addr": p.http_addr().to_string(),
        "url": http_url(p.http_addr()),
        "addrs": p.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "hostname": p.hostname,
        "flags": flag_names(p.flags),
        "interval_ms": p.interval.as_millis() as u64,
        "seq": p.seq,
        "first_seen_ms_ago": now.duration_since(p.first_seen).as_millis() as u64,
        "last_seen_ms_ago": now.duration_since(p.last_seen).as_millis() as u64,
    })
}

fn peer_line(p: &Peer) -> String {
    format!(
        "{:<28} node={} host={} flags={} interval={}ms",
        http_url(p.http_addr()),
        p.node,
        p.hostname.as_deref().unwrap_or("-"),
        flag_names(p.flags).join(","),
        p.interval.as_millis()
    )
}

fn raw_line(d: &RawDatagram, json: bool) -> String {
    let hex = data_encoding::HEXLOWER.encode(&d.bytes);
    let (verdict, decoded) = match &d.outcome {
        Outcome::Joined(b) => ("joined", Some(b)),
        Outcome::Refreshed(b) => ("refreshed", Some(b)),
        Outcome::Left(b) => ("left", Some(b)),
        Outcome::Query(b) => ("query", Some(b)),
        Outcome::Ignored(b, _) => ("ignored", Some(b)),
        Outcome::Invalid(_) => ("invalid", None),
        Outcome::RateLimited => ("rate-limited", None),
        Outcome::OffLink(_) => ("off-link", None),
    };
    let detail = match &d.outcome {
        Outcome::Invalid(e) => e.to_string(),
        Outcome::Ignored(_, why) => why.as_str().to_owned(),
        Outcome::OffLink(why) => (*why).to_owned(),
        _ => String::new(),
    };
    if json {
        let b = decoded.map(|b| {
            json!({"type": b.kind.name(), "node": b.node.to_string(), "port": b.port, "flags": flag_names(b.flags),
                   "interval_ms": b.interval_ms, "seq": b.seq, "hostname": b.hostname})
        });
        json!({"raw": true, "src": d.src.to_string(), "len": d.bytes.len(), "verdict": verdict,
               "detail": detail, "decoded": b, "hex": hex})
        .to_string()
    } else {
        let what = match decoded {
            Some(b) => format!(
                "{} node={} port={} seq={} interval={}ms host={}",
                b.kind.name(),
                b.node,
                b.port,
                b.seq,
                b.interval_ms,
                b.hostname.as_deref().unwrap_or("-")
            ),
            None => detail.clone(),
        };
        let mut hex_short = hex;
        if hex_short.len() > 96 {
            hex_short.truncate(96);
            hex_short.push_str("...");
        }
        format!("raw {} {}B {verdict}: {what}\n    {hex_short}", d.src, d.bytes.len())
    }
}

/// Runs the tool until the timeout or Ctrl-C. Returns the number of peers seen at the end.
pub async fn run(opts: PeersOptions, stop: CancellationToken) -> Result<usize, beacon::BeaconError> {
    let sockets = beacon::bind(&opts.beacon)?;
    for line in &sockets.report {
        eprintln!("{line}");
    }
    let links = sockets.states.clone();
    let mut link_seen: Vec<(String, LinkState)> = Vec::new();
    let seeds = opts.beacon.seeds.clone();
    let mut seeds_seen: Vec<String> = Vec::new();
    let mut told: Vec<std::mem::Discriminant<Diagnosis>> = Vec::new();
    let table = Arc::new(PeerTable::new(NodeId::random()));
    let (raw_tx, mut raw_rx) = mpsc::channel::<RawDatagram>(1024);
    // The beacon runs as a task owned here: cancelled with `stop` or at the end, and waited for
    // (its goodbye sent) before the final list.
    let shutdown = stop.child_token();
    let mut task = JoinSet::new();
    task.spawn(beacon::run(
        sockets,
        opts.beacon.clone(),
        table.clone(),
        opts.raw.then_some(raw_tx),
        shutdown.clone(),
        true,
    ));
    let deadline = opts.timeout.map(|t| Instant::now() + t);
    let mut known: BTreeSet<NodeId> = BTreeSet::new();
    let mut out = std::io::stdout();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => break,
            Some(d) = raw_rx.recv() => { let _ = writeln!(out, "{}", raw_line(&d, opts.json)); }
            _ = table.changed() => {}
            _ = links.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        // Interfaces as they change (stderr: stdout stays the peer list or pure JSON).
        let now_links: Vec<(String, LinkState)> = links
            .snapshot(Instant::now())
            .into_iter()
            .map(|l| (l.name, l.state))
            .collect();
        for (name, state) in now_links.iter().filter(|l| !link_seen.contains(l)) {
            eprintln!("interface {name}: {}", state.as_str());
        }
        link_seen = now_links;
        // Seeds as their state changes (stderr too).
        let now_seeds: Vec<String> = seeds.snapshot().iter().map(|r| r.line()).collect();
        for line in now_seeds.iter().filter(|l| !seeds_seen.contains(l)) {
            eprintln!("{line}");
        }
        seeds_seen = now_seeds;
        // What is wrong with the network, once per finding (stderr).
        let found = diagnose(
            &links.snapshot(Instant::now()),
            &table.counters(),
            table.len(),
            &seeds.snapshot(),
        );
        // Once per kind of finding (its figures change every second).
        for d in found.iter().filter(|d| !told.contains(&std::mem::discriminant(*d))) {
            eprintln!("problem: {}", d.line());
        }
        told = found.iter().map(std::mem::discriminant).collect();
        // Report joins and leaves (the table notifies on both; expiry is checked by the beacon).
        let now = Instant::now();
        let peers = table.peers();
        let current: BTreeSet<NodeId> = peers.iter().map(|p| p.node).collect();
        for p in peers.iter().filter(|p| !known.contains(&p.node)) {
            if opts.json {
                if deadline.is_none() {
                    let mut v = peer_json(p, now);
                    v["event"] = json!("joined");
                    let _ = writeln!(out, "{v}");
                }
            } else {
                let _ = writeln!(out, "+ {}", peer_line(p));
            }
        }
        for n in known.difference(&current) {
            if opts.json {
                if deadline.is_none() {
                    let _ = writeln!(out, "{}", json!({"event": "left", "node": n.to_string()}));
                }
            } else {
                let _ = writeln!(out, "- node={n} left");
            }
        }
        known = current;
        let _ = out.flush();
    }
    shutdown.cancel();
    let _ = task.join_next().await;
    let now = Instant::now();
    let peers = table.peers();
    if opts.json {
        if deadline.is_some() {
            for p in &peers {
                let _ = writeln!(out, "{}", peer_json(p, now));
            }
        }
    } else {
        let _ = writeln!(out, "{} peer(s):", peers.len());
        for p in &peers {
            let _ = writeln!(out, "  {}", peer_line(p));
        }
    }
    let c = table.counters();
    eprintln!(
        "datagrams: {} received, {} announces, {} queries, {} goodbyes; dropped: {} too short, {} invalid, {} wrong version, {} own, {} rate limited, {} table full, {} off the link; {} expired",
        c.received, c.announces, c.queries, c.goodbyes, c.too_short, c.invalid, c.wrong_version, c.own, c.rate_limited, c.table_full, c.off_link, c.expired
    );
    let _ = out.flush();
    Ok(peers.len())
}
