//! Seeds (`--peer HOST[:PORT]`): store servers this host is told about, asked for the hall over
//! plain outbound HTTP, so a host that hears no multicast (a stateful firewall with no port
//! open, Wi-Fi that filters multicast, another subnet behind a router) still learns the hall.
//!
//! Each seed is asked `GET /peers` (the peer exchange's list, `pex`) at start and then every
//! [`SEED_REFRESH`] ([`SEED_REFRESH_LARGE`] once the table holds [`SMALL_HALL`] peers); a
//! failure is retried after [`SEED_RETRY_FIRST`], doubling up to [`SEED_RETRY_MAX`] (never a
//! busy loop), and shown in the log, the `peers` tool and the status page ([`SeedReport`]).
//! Names are resolved with `crate::dns`, never `getaddrinfo`.
//!
//! Nothing a seed says is taken on its word: the seed enters the table only under the node id
//! its own store server names ([`NODE_HEADER`]) at the address we reached, and each entry of its
//! list only once the store server at the listed address named that entry's id when asked
//! (`GET /nix-cache-info`); both are then recorded as answered, like an answer to the proxy,
//! with the summary version their store server names ([`SUMMARY_HEADER`]), so the proxy
//! fetches their summaries as it does for peers whose beacons it hears. An entry that never
//! announced to us is probed again at every refresh, which keeps that version current (a host
//! that hears an entry's announces takes the version from them instead).
//! Entries go through the table's admission (per-address cap; peers whose store server
//! answered are never displaced by them). Multicast beacons from off the link stay rejected:
//! only these HTTP answers cross a router.
//!
//! Bounds: at most [`MAX_SEEDS`] seeds; per fetch one list of at most `pex::PEX_MAX_BODY`
//! bytes within `pex::PEX_TIMEOUT`, of which [`MAX_SEED_ENTRIES`] entries are considered and at
//! most [`PROBES_AT_ONCE`] probed at a time, each within [`PROBE_TIMEOUT`]; one task (owned by
//! the beacon's loop) does it all, one seed after the other. A hostile seed costs this host one
//! list and [`MAX_SEED_ENTRIES`] probes per refresh, and can add only hosts that answer with
//! their own node id (at most `MAX_PEERS_PER_ADDR` per address).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::http::url;
use super::pex::{self, Entry, PEX_MAX_BODY, PEX_TIMEOUT};
use super::table::PeerTable;
use super::wire::{self, NodeId};
use crate::cache_url::{NODE_HEADER, SUMMARY_HEADER};
use crate::dns::SystemResolver;

pub mod askers;
mod report;
mod seed;
pub use report::{SeedReport, SeedState, Seeds, MAX_SEEDS};
pub use seed::{Seed, SeedHost, SeedParseError, DEFAULT_SEED_PORT};

/// A seed is asked again this long after it answered, while the table is small.
pub const SEED_REFRESH: Duration = Duration::from_secs(10);
/// ... and this long once the table holds [`SMALL_HALL`] peers.
pub const SEED_REFRESH_LARGE: Duration = Duration::from_secs(60);
/// A table with fewer peers than this is "small": the hall may still be forming.
pub const SMALL_HALL: usize = 32;
/// First retry after a failure; doubles per failure up to [`SEED_RETRY_MAX`].
pub const SEED_RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest wait between two tries of a failing seed.
pub const SEED_RETRY_MAX: Duration = Duration::from_secs(60);
/// The interval entries learnt from a seed are given (they do not announce to us): they stay
/// three of these after their last answer, longer than a refresh.
pub const SEED_ENTRY_INTERVAL: Duration = Duration::from_secs(30);
/// Entries of one seed's list considered per fetch.
pub const MAX_SEED_ENTRIES: usize = 256;
/// Listed store servers asked at once whether they hold the listed id.
pub const PROBES_AT_ONCE: usize = 16;
/// Time a probe (connect and answer) may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Most addresses of one seed's name tried per fetch.
const MAX_ADDRS_PER_NAME: usize = 4;
/// The flags a seed is entered with (a `serve` node's; its own announces, if we hear them, say).
const SEED_FLAGS: u16 = wire::FLAG_NAR_NONE | wire::FLAG_NAR_ZSTD | wire::FLAG_PROXY;

/// Why a seed could not be used this time (shown, and retried with back-off).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SeedFailure {
    #[error("cannot resolve the name: {0}")]
    Resolve(String),
    #[error("the name has no address")]
    NoAddress,
    #[error("unreachable over TCP ({0}): is it running, and does a firewall drop its port?")]
    Unreachable(String),
    #[error("answered HTTP {0} to GET /peers: not a local-nix-cache store server")]
    Status(u16),
    #[error("answered without a node id: not a local-nix-cache store server")]
    NoNodeId,
    #[error("its peer list is unreadable (over the size cap or not text)")]
    Body,
}

/// The wait before the next try after `failures` failures in a row.
pub fn retry_after(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    SEED_RETRY_FIRST.saturating_mul(1 << doublings).min(SEED_RETRY_MAX)
}

/// The wait before asking a seed again after it answered, given the table's size.
pub fn refresh_after(table_len: usize) -> Duration {
    if table_len < SMALL_HALL {
        SEED_REFRESH
    } else {
        SEED_REFRESH_LARGE
    }
}

/// Where an entry of a seed's list may be reached: any unicast address (a seed may be across a
/// router), except loopback and unspecified ones; an IPv6 link-local address only when the seed
/// itself was reached over a link-local address (its scope is then ours).
pub fn place(addr: SocketAddr, from: SocketAddr) -> Option<SocketAddr> {
    let ip = addr.ip();
    if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() || addr.port() == 0 {
        return None;
    }
    if let IpAddr::V4(v4) = ip {
        if v4.is_broadcast() {
            return None;
        }
    }
    match (addr, from) {
        (SocketAddr::V6(mut a), SocketAddr::V6(f)) if is_link_local(&a) => (is_link_local(&f) && f.scope_id() != 0)
            .then(|| {
                a.set_scope_id(f.scope_id());
                SocketAddr::V6(a)
            }),
        (SocketAddr::V6(a), _) if is_link_local(&a) => None,
        _ => Some(addr),
    }
}

fn is_link_local(a: &std::net::SocketAddrV6) -> bool {
    (a.ip().segments()[0] & 0xffc0) == 0xfe80
}

/// A short description of a request error (no URL, which the report names already).
fn short(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "connection refused or dropped".into()
    } else {
        "request failed".into()
    }
}

/// A store server's answer: the node id and summary version it named, and the body.
pub(super) struct Named {
    pub node: NodeId,
    /// The version of the content summary it publishes now ([`SUMMARY_HEADER`]), if any.
    pub summary: Option<u64>,
    pub body: String,
}

/// `GET path` at `addr`: what the store server named, and the body (at most `max` bytes).
pub(super) async fn get_named(
    client: &reqwest::Client,
    addr: SocketAddr,
    path: &str,
    max: usize,
) -> Result<Named, SeedFailure> {
    let mut resp = client
        .get(url(addr, path))
        .send()
        .await
        .map_err(|e| SeedFailure::Unreachable(short(&e)))?;
    if !resp.status().is_success() {
        return Err(SeedFailure::Status(resp.status().as_u16()));
    }
    let node = resp
        .headers()
        .get(NODE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|n| n.parse::<NodeId>().ok())
        .ok_or(SeedFailure::NoNodeId)?;
    let summary = resp
        .headers()
        .get(SUMMARY_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) if body.len() + chunk.len() <= max => body.extend_from_slice(&chunk),
            Ok(Some(_)) => return Err(SeedFailure::Body),
            Ok(None) => break,
            Err(e) => return Err(SeedFailure::Unreachable(short(&e))),
        }
    }
    String::from_utf8(body)
        .map(|body| Named { node, summary, body })
        .map_err(|_| SeedFailure::Body)
}

/// The client for seeds and their entries: never through a proxy, never following a redirect,
/// connecting within [`PROBE_TIMEOUT`], whole requests within `timeout`.
fn http_client(timeout: Duration) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(PROBE_TIMEOUT)
        .timeout(timeout)
        .build()
}

/// The addresses to try for `seed` (a name through `crate::dns`; IPv4 first).
async fn resolve(seed: &Seed, dns: &SystemResolver) -> Result<Vec<SocketAddr>, SeedFailure> {
    let mut addrs = match &seed.host {
        SeedHost::Ip(ip) => vec![SocketAddr::new(*ip, seed.port)],
        SeedHost::Name(n) => dns
            .lookup(n)
            .await
            .map_err(|e| SeedFailure::Resolve(e.to_string()))?
            .into_iter()
            .map(|a| SocketAddr::new(a.ip(), seed.port))
            .collect(),
    };
    addrs.sort_by_key(|a| !a.is_ipv4());
    addrs.truncate(MAX_ADDRS_PER_NAME);
    if addrs.is_empty() {
        return Err(SeedFailure::NoAddress);
    }
    Ok(addrs)
}

/// What one fetch of a seed did.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fetched {
    node: NodeId,
    addr: SocketAddr,
    listed: usize,
    reachable: usize,
    unreachable: usize,
}

/// The probe of one listed entry: did its store server name the listed id?
enum Probe {
    /// It did, and named this summary version.
    Named(Entry, SocketAddr, Option<u64>),
    /// Answered with another id (or none): not entered.
    Other,
    /// No TCP connection or no answer in time.
    Unreachable,
}

async fn probe(client: &reqwest::Client, e: Entry, at: SocketAddr) -> Probe {
    let asked = tokio::time::timeout(PROBE_TIMEOUT, get_named(client, at, "/nix-cache-info", 4096)).await;
    match asked {
        Ok(Ok(n)) if n.node == e.node => Probe::Named(e, at, n.summary),
        Ok(Err(SeedFailure::Unreachable(_))) | Err(_) => Probe::Unreachable,
        Ok(_) => Probe::Other,
    }
}

/// Asks one seed for its list and enters what its store servers confirm.
async fn fetch(
    client: &reqwest::Client,
    dns: &SystemResolver,
    seed: &Seed,
    table: &PeerTable,
    path: &str,
) -> Result<Fetched, SeedFailure> {
    let mut last = SeedFailure::NoAddress;
    for addr in resolve(seed, dns).await? {
        match get_named(client, addr, path, PEX_MAX_BODY).await {
            Ok(named) => return Ok(enter(client, table, named, addr).await),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Enters the seed (what its store server at `addr` named) and the entries of its list whose
/// store servers name the listed id.
async fn enter(client: &reqwest::Client, table: &PeerTable, seed: Named, addr: SocketAddr) -> Fetched {
    let now = Instant::now();
    let node = seed.node;
    if node != table.own() {
        note(table, node, addr, SEED_FLAGS, SEED_ENTRY_INTERVAL, seed.summary, now);
    }
    let entries: Vec<Entry> = pex::parse(&seed.body)
        .into_iter()
        .filter(|e| e.node != table.own() && e.node != node)
        .take(MAX_SEED_ENTRIES)
        .collect();
    let listed = entries.len();
    // Entries we may reach; of those, the ones whose announces we hear are not probed (they
    // keep themselves alive and their summary version current); the others are, at every
    // refresh, which keeps their version current.
    let placed: Vec<(Entry, SocketAddr)> = entries
        .into_iter()
        .filter_map(|e| place(e.addr, addr).map(|a| (e, a)))
        .collect();
    let placed_len = placed.len();
    let to_probe: Vec<(Entry, SocketAddr)> = placed
        .into_iter()
        .filter(|(e, _)| table.get(&e.node).is_none_or(|p| p.hearsay()))
        .collect();
    let alive = placed_len - to_probe.len();
    let probes: Vec<Probe> = stream::iter(to_probe)
        .map(|(e, a)| probe(client, e, a))
        .buffer_unordered(PROBES_AT_ONCE)
        .collect()
        .await;
    let (mut reachable, mut unreachable) = (alive, 0);
    let now = Instant::now();
    for p in probes {
        match p {
            Probe::Named(e, a, summary) => {
                reachable += 1;
                let interval = e.interval.clamp(SEED_ENTRY_INTERVAL, pex::HEARSAY_MAX_INTERVAL);
                note(table, e.node, a, e.flags, interval, summary, now);
            }
            Probe::Unreachable => unreachable += 1,
            Probe::Other => {}
        }
    }
    Fetched {
        node,
        addr,
        listed,
        reachable,
        unreachable,
    }
}

/// Enters `node`, whose store server at `addr` named its id and `summary` version (or, when it
/// is listed already, keeps that version if it never announced to us), as answered.
pub(super) fn note(
    table: &PeerTable,
    node: NodeId,
    addr: SocketAddr,
    flags: u16,
    interval: Duration,
    summary: Option<u64>,
    now: Instant,
) {
    if !table.learn(node, addr, flags, interval, summary, now) {
        table.heard_summary(&node, addr, summary);
    }
    table.answered(&node, addr, now);
}

/// Asks every seed, at start and then every [`refresh_after`] (failures: [`retry_after`]),
/// until `stop`. Nothing to do without seeds. `store_port`, when this host runs a store server,
/// is named in the request (`GET /peers?port=P`) so the seed asks it back ([`askers`]).
pub async fn run(seeds: Seeds, table: Arc<PeerTable>, store_port: Option<u16>, stop: CancellationToken) {
    if seeds.is_empty() {
        return;
    }
    let path = match store_port {
        Some(p) => format!("/peers?port={p}"),
        None => "/peers".to_owned(),
    };
    let client = match http_client(PEX_TIMEOUT) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "seeds: no HTTP client; seeds are not used");
            return;
        }
    };
    let dns = SystemResolver::default();
    let mut next = vec![Instant::now(); seeds.list().len()];
    let mut reports = seeds.snapshot();
    let mut last_nudge = Instant::now();
    loop {
        for (i, seed) in seeds.list().iter().enumerate() {
            if next[i] > Instant::now() {
                continue;
            }
            let got = tokio::select! {
                _ = stop.cancelled() => return,
                got = fetch(&client, &dns, seed, &table, &path) => got,
            };
            let r = &mut reports[i];
            match got {
                Ok(f) => {
                    if r.state != SeedState::Ok {
                        tracing::info!(seed = %seed, node = %f.node, addr = %f.addr, listed = f.listed, "seed answered");
                    }
                    r.state = SeedState::Ok;
                    r.node = Some(f.node.to_string());
                    r.addr = Some(f.addr.to_string());
                    (r.listed, r.reachable, r.unreachable) = (f.listed, f.reachable, f.unreachable);
                    r.failures = 0;
                    r.error = None;
                    next[i] = Instant::now() + refresh_after(table.len());
                }
                Err(e) => {
                    r.failures = r.failures.saturating_add(1);
                    let wait = retry_after(r.failures);
                    if r.state != SeedState::Failing || r.error.as_deref() != Some(&e.to_string()) {
                        tracing::warn!(seed = %seed, error = %e, retry_in = ?wait, "seed failed (retried with back-off)");
                    }
                    r.state = SeedState::Failing;
                    r.error = Some(e.to_string());
                    next[i] = Instant::now() + wait;
                }
            }
            seeds.set(i, r.clone());
        }
        let at = next
            .iter()
            .copied()
            .min()
            .unwrap_or_else(|| Instant::now() + SEED_REFRESH);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(at) => {}
            _ = seeds.nudged() => {
                // A new link or a wake-up: every seed now, but not more than once per
                // `SEED_RETRY_FIRST` however often the network changes.
                let soon = Instant::now().max(last_nudge + SEED_RETRY_FIRST);
                last_nudge = soon;
                next.iter_mut().for_each(|t| *t = (*t).min(soon));
            }
        }
    }
}

#[cfg(test)]
mod tests;
