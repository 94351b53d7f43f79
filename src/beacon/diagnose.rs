//! What is wrong with this network, in one line each with its fix, from what the beacon already
//! knows: its interfaces (how long each is joined), its counters (beacons heard from others, our
//! own heard back) and the seeds' reports. Pure: the status page and the `peers` tool call
//! [`diagnose`] on their snapshots.
//!
//! Told apart: our own beacons never come back (a host firewall drops UDP 8380 in); no beacon of
//! anyone else heard while peers are known over HTTP (the network filters multicast); no beacon
//! and no peer at all (alone, or filtered, and no seed); peers a seed lists that do not answer
//! over TCP (client isolation, or their firewall).

use std::time::Duration;

use super::links::{LinkReport, LinkState};
use super::seeds::{SeedReport, SeedState};
use super::table::Counters;

/// How long a link must have been joined before silence on it means something (three default
/// announce intervals).
pub const QUIET_AFTER: Duration = Duration::from_secs(15);

/// One finding.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Diagnosis {
    /// Our own beacons (multicast looped back to us) were never heard on a joined link.
    OwnBeaconsNotHeard { iface: String, quiet_s: u64 },
    /// No one else's beacon heard, while peers are known through HTTP.
    MulticastFiltered {
        iface: String,
        quiet_s: u64,
        peers: usize,
        seeds: Vec<String>,
    },
    /// No beacon heard, no peer known, no seed answering.
    Alone { iface: String, quiet_s: u64 },
    /// Peers listed by seeds whose store servers do not answer over TCP.
    PeersUnreachable { count: usize },
}

impl Diagnosis {
    /// What is wrong, in one line.
    pub fn problem(&self) -> String {
        match self {
            Self::OwnBeaconsNotHeard { iface, quiet_s } => format!(
                "our own beacons are not heard back on {iface} after {quiet_s} s: a host firewall drops UDP 8380 coming in"
            ),
            Self::MulticastFiltered {
                iface,
                quiet_s,
                peers,
                seeds,
            } => format!(
                "no multicast beacon heard on {iface} for {quiet_s} s while {peers} peer(s) answer over HTTP: this network filters multicast; seeds in use: {}",
                if seeds.is_empty() { "none".to_owned() } else { seeds.join(", ") }
            ),
            Self::Alone { iface, quiet_s } => format!(
                "no beacon heard on {iface} for {quiet_s} s and no seed answers: this host is alone here, or the network filters multicast"
            ),
            Self::PeersUnreachable { count } => format!(
                "{count} peer(s) listed by a seed do not answer over TCP: clients are isolated from each other, or a firewall drops TCP 8380"
            ),
        }
    }

    /// The one-line fix.
    pub fn fix(&self) -> &'static str {
        match self {
            Self::OwnBeaconsNotHeard { .. } => {
                "open UDP and TCP 8380 (NixOS: services.local-nix-cache.openFirewall = true), or give a seed (--peer HOST), which needs no open port"
            }
            Self::MulticastFiltered { .. } => {
                "nothing to do while a seed answers; give every newcomer a seed all can reach (--peer HOST)"
            }
            Self::Alone { .. } => "give a peer's address as a seed: --peer HOST (NixOS: services.local-nix-cache.peers)",
            Self::PeersUnreachable { .. } => {
                "use a venue cache on the wired side as everyone's --peer; hosts behind a firewall open TCP 8380 to share"
            }
        }
    }

    /// `problem; fix: fix`, for logs and the terminal.
    pub fn line(&self) -> String {
        format!("{}\n  fix: {}", self.problem(), self.fix())
    }
}

/// The findings for a beacon with these `links`, `counters`, `peers` (table entries) and
/// `seeds`.
pub fn diagnose(links: &[LinkReport], counters: &Counters, peers: usize, seeds: &[SeedReport]) -> Vec<Diagnosis> {
    let mut out = Vec::new();
    // The link joined longest, if long enough for silence to mean something.
    let quiet = links
        .iter()
        .filter(|l| l.state == LinkState::Joined && l.since_s >= QUIET_AFTER.as_secs())
        .max_by_key(|l| l.since_s);
    if let Some(l) = quiet {
        let (iface, quiet_s) = (l.name.clone(), l.since_s);
        let answering: Vec<String> = seeds
            .iter()
            .filter(|s| s.state == SeedState::Ok)
            .map(|s| s.seed.clone())
            .collect();
        // Announces from another process on this host prove nothing about the network.
        let heard = counters.announces.saturating_sub(counters.from_this_host);
        if counters.own == 0 {
            out.push(Diagnosis::OwnBeaconsNotHeard { iface, quiet_s });
        } else if heard == 0 && peers > 0 {
            out.push(Diagnosis::MulticastFiltered {
                iface,
                quiet_s,
                peers,
                seeds: answering,
            });
        } else if heard == 0 && answering.is_empty() {
            out.push(Diagnosis::Alone { iface, quiet_s });
        }
    }
    let unreachable: usize = seeds
        .iter()
        .filter(|s| s.state == SeedState::Ok)
        .map(|s| s.unreachable)
        .sum();
    if unreachable > 0 {
        out.push(Diagnosis::PeersUnreachable { count: unreachable });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(since_s: u64) -> LinkReport {
        LinkReport {
            name: "eth0".into(),
            state: LinkState::Joined,
            addrs: vec!["10.0.0.2".into()],
            since_s,
        }
    }

    fn seed(state: SeedState, unreachable: usize) -> SeedReport {
        SeedReport {
            seed: "10.0.0.5:8380".into(),
            state,
            node: None,
            addr: None,
            listed: unreachable,
            reachable: 0,
            unreachable,
            failures: 0,
            error: None,
        }
    }

    fn counters(own: u64, announces: u64) -> Counters {
        Counters {
            own,
            announces,
            ..Counters::default()
        }
    }

    /// Each venue gets its own finding, and none before the link was joined long enough.
    #[test]
    fn each_venue_is_told_apart() {
        let ok = [seed(SeedState::Ok, 0)];
        let kinds = |d: Vec<Diagnosis>| -> Vec<&'static str> {
            d.iter()
                .map(|d| match d {
                    Diagnosis::OwnBeaconsNotHeard { .. } => "firewall",
                    Diagnosis::MulticastFiltered { .. } => "filtered",
                    Diagnosis::Alone { .. } => "alone",
                    Diagnosis::PeersUnreachable { .. } => "isolated",
                })
                .collect()
        };
        // A healthy hall: our beacons come back, others' are heard.
        assert!(diagnose(&[link(60)], &counters(12, 40), 3, &[]).is_empty());
        // Too early to tell.
        assert!(diagnose(&[link(3)], &counters(0, 0), 0, &[]).is_empty());
        // A host firewall: our own beacons never come back (whatever else).
        assert_eq!(kinds(diagnose(&[link(20)], &counters(0, 0), 1, &ok)), ["firewall"]);
        // Filtered multicast: ours come back (loopback), nobody else's, peers known by HTTP.
        let d = diagnose(&[link(20)], &counters(5, 0), 2, &ok);
        assert_eq!(kinds(d.clone()), ["filtered"]);
        assert!(
            d[0].problem().contains("seeds in use: 10.0.0.5:8380"),
            "{}",
            d[0].problem()
        );
        // ... also when another process on this host announces (`peers` beside `serve`): its
        // beacons loop back without crossing the network.
        let local = Counters {
            from_this_host: 7,
            ..counters(5, 7)
        };
        assert_eq!(kinds(diagnose(&[link(20)], &local, 2, &ok)), ["filtered"]);
        // Nobody at all and no seed.
        assert_eq!(kinds(diagnose(&[link(20)], &counters(5, 0), 0, &[])), ["alone"]);
        assert_eq!(
            kinds(diagnose(
                &[link(20)],
                &counters(5, 0),
                0,
                &[seed(SeedState::Failing, 0)]
            )),
            ["alone"]
        );
        // Client isolation: the seed lists peers we cannot reach.
        assert_eq!(
            kinds(diagnose(&[link(20)], &counters(5, 3), 1, &[seed(SeedState::Ok, 2)])),
            ["isolated"]
        );
        for d in diagnose(&[link(20)], &counters(0, 0), 0, &[seed(SeedState::Ok, 2)]) {
            assert!(!d.fix().is_empty() && !d.line().contains('\r'));
        }
    }
}
