//! Peer exchange over HTTP (`GET /peers` on a store server): how a newcomer learns the whole
//! hall within seconds while only a sample of hosts answers its query (`proto/beacon.md`).
//!
//! A store server lists the *established* peers its beacon heard directly (at least
//! `ESTABLISHED_ANNOUNCES` announces; never entries it only heard of, nor probation entries, so
//! a one-off flood of forged identities is not passed on to every newcomer), one per line. A newcomer fetches the list from a few of the hosts
//! that answered its query and enters each entry on one of its own links as a probation entry
//! (zero announces) that lasts at most three [`HEARSAY_MAX_INTERVAL`]s unless the node announces
//! itself; its first announce replaces the hearsay address. Bounds: [`PEX_SOURCES`] requests per
//! start, each with [`PEX_TIMEOUT`] and at most [`PEX_MAX_BODY`] bytes; entries go through the
//! table's admission (per-address cap, useful peers kept).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::http::{get_text, url};
use super::table::PeerTable;
use super::wire::NodeId;

/// Hosts asked for their peer list after a start (or a new link).
pub const PEX_SOURCES: usize = 3;
/// Wait after the query before asking: the sampled answers arrive within 0.4 s.
pub const PEX_DELAY: Duration = Duration::from_millis(800);
/// Whole-request timeout of one `GET /peers`.
pub const PEX_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest peer list read (2,048 lines of about 90 bytes fit).
pub const PEX_MAX_BODY: usize = 256 * 1024;
/// A learnt entry lasts at most three of this (whatever interval the list claims) unless the
/// node announces itself: a lying list cannot keep bogus entries for long.
pub const HEARSAY_MAX_INTERVAL: Duration = Duration::from_secs(90);

/// One line of `GET /peers`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub node: NodeId,
    pub addr: SocketAddr,
    pub flags: u16,
    pub interval: Duration,
    pub summary: Option<u64>,
}

/// The body of `GET /peers`: `NODE ADDR FLAGS INTERVAL_MS SUMMARY` per line (`SUMMARY` is `-`
/// when the peer publishes none), for every peer heard directly that counts as the hall
/// (`PeerTable::hall`: answered, or established and, in a `serve` table, answered or joined in
/// the last 10 s).
pub fn render(table: &PeerTable) -> String {
    let mut out = String::new();
    for p in &table.hall() {
        let summary = p.summary.map_or_else(|| "-".to_owned(), |s| s.to_string());
        out.push_str(&format!(
            "{} {} {} {} {}\n",
            p.node,
            p.http_addr(),
            p.flags,
            p.interval.as_millis(),
            summary
        ));
    }
    out
}

/// Parses a peer list; malformed lines are skipped.
pub fn parse(body: &str) -> Vec<Entry> {
    body.lines()
        .filter_map(|l| {
            let mut f = l.split_ascii_whitespace();
            let node = f.next()?.parse::<NodeId>().ok()?;
            let addr = f.next()?.parse::<SocketAddr>().ok()?;
            let flags = f.next()?.parse::<u16>().ok()?;
            let interval = Duration::from_millis(f.next()?.parse::<u64>().ok()?);
            let summary = match f.next()? {
                "-" => None,
                s => Some(s.parse::<u64>().ok()?),
            };
            (addr.port() != 0).then_some(Entry {
                node,
                addr,
                flags,
                interval,
                summary,
            })
        })
        .collect()
}

/// Where learnt entries may point: the IPv4 subnets of our joined links, and IPv6 link-local
/// addresses (given the scope of the link the list came over).
#[derive(Clone, Debug, Default)]
pub struct OnLink {
    pub v4_nets: Vec<(Ipv4Addr, Ipv4Addr)>,
}

impl OnLink {
    /// The address to use for `addr` learnt from a list fetched from `from`, if it is on our link.
    pub fn place(&self, addr: SocketAddr, from: SocketAddr) -> Option<SocketAddr> {
        match (addr, from) {
            (SocketAddr::V4(a), _) => {
                let ip = u32::from(*a.ip());
                let on = self.v4_nets.iter().any(|(n, m)| {
                    let m = u32::from(*m);
                    u32::from(*n) & m == ip & m
                });
                (on && !a.ip().is_loopback() && !a.ip().is_unspecified()).then_some(addr)
            }
            (SocketAddr::V6(mut a), SocketAddr::V6(f)) if (a.ip().segments()[0] & 0xffc0) == 0xfe80 => {
                a.set_scope_id(f.scope_id());
                Some(SocketAddr::V6(a))
            }
            _ => None,
        }
    }
}

/// Fetches `GET /peers` from `from` (bounded in time and size).
async fn fetch(client: &reqwest::Client, from: SocketAddr) -> Option<String> {
    get_text(client, &url(from, "/peers"), PEX_MAX_BODY).await
}

/// Asks up to [`PEX_SOURCES`] of the peers heard directly for their lists and enters what is on
/// our links; returns how many entries were new.
pub async fn exchange(table: Arc<PeerTable>, on_link: OnLink) -> usize {
    use rand::seq::SliceRandom;
    // Peers whose store server answered us first, then established ones (in a flooded hall
    // most heard peers are forgeries, and identities kept refreshed are established too).
    let heard: Vec<_> = table.peers().into_iter().filter(|p| !p.hearsay()).collect();
    let mut tiers: [Vec<SocketAddr>; 3] = Default::default();
    for p in &heard {
        let tier = if p.answered.is_some() {
            0
        } else if p.established() {
            1
        } else {
            2
        };
        tiers[tier].push(p.http_addr());
    }
    let mut sources = Vec::new();
    for mut t in tiers {
        t.shuffle(&mut rand::thread_rng());
        sources.extend(t);
    }
    sources.truncate(PEX_SOURCES);
    if sources.is_empty() {
        return 0;
    }
    let Ok(client) = reqwest::Client::builder().no_proxy().timeout(PEX_TIMEOUT).build() else {
        return 0;
    };
    let mut learnt = 0;
    for from in sources {
        let Some(body) = fetch(&client, from).await else {
            continue;
        };
        let now = Instant::now();
        for e in parse(&body) {
            if let Some(addr) = on_link.place(e.addr, from) {
                let interval = e.interval.min(HEARSAY_MAX_INTERVAL);
                if table.learn(e.node, addr, e.flags, interval, e.summary, now) {
                    learnt += 1;
                }
            }
        }
    }
    learnt
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_round_trips_and_only_on_link_entries_are_placed() {
        let t = PeerTable::new(NodeId([0; 16]));
        let a = crate::beacon::wire::encode(&crate::beacon::wire::Beacon {
            kind: crate::beacon::wire::Kind::Announce,
            flags: 3,
            node: NodeId([1; 16]),
            port: 8380,
            interval_ms: 5000,
            seq: 1,
            hostname: None,
            summary: Some(7),
            commitment: None,
            proof: None,
        });
        let now = Instant::now();
        // Listed once established; a peer heard once (on probation) is not.
        for _ in 0..crate::beacon::table::ESTABLISHED_ANNOUNCES {
            t.handle(SocketAddr::from(([10, 1, 0, 5], 9)), &a, now);
        }
        let mut once = crate::beacon::wire::decode(&a).expect("decode");
        once.node = NodeId([3; 16]);
        t.handle(
            SocketAddr::from(([10, 1, 0, 7], 9)),
            &crate::beacon::wire::encode(&once),
            now,
        );
        assert_eq!(t.len(), 2);
        let body = render(&t);
        let got = parse(&format!(
            "{body}garbage line\n{} 10.1.0.6:0 1 5000 -\n",
            NodeId([2; 16])
        ));
        assert_eq!(
            got,
            [Entry {
                node: NodeId([1; 16]),
                addr: SocketAddr::from(([10, 1, 0, 5], 8380)),
                flags: 3,
                interval: Duration::from_secs(5),
                summary: Some(7),
            }]
        );
        let on = OnLink {
            v4_nets: vec![(Ipv4Addr::new(10, 1, 0, 1), Ipv4Addr::new(255, 255, 255, 0))],
        };
        let from = SocketAddr::from(([10, 1, 0, 9], 8380));
        assert!(on.place(got[0].addr, from).is_some());
        assert!(
            on.place(SocketAddr::from(([192, 0, 2, 1], 8380)), from).is_none(),
            "off our subnets"
        );
        assert!(on.place("[2001:db8::1]:8380".parse().unwrap_or(from), from).is_none());
    }
}
