//! The proxy's counters, its last few transfers and the report built from them for the status
//! page, `/metrics` and `status`. Bounded: fixed counters and at most [`RECENT_TRANSFERS`]
//! transfers.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::error::{CutReason, FetchError};
use super::health::Health;
use crate::beacon::table::Counters;
use crate::beacon::LinkReport;

/// Transfers listed on the status page.
pub const RECENT_TRANSFERS: usize = 20;

/// Counters since start.
#[derive(Default, Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub narinfo_hits_peer: u64,
    pub narinfo_hits_upstream: u64,
    pub narinfo_misses: u64,
    /// Narinfo requests sent to peers (lookups and gathering).
    pub narinfo_peer_requests: u64,
    pub nars_from_peers: u64,
    pub nars_from_upstream: u64,
    pub bytes_from_peers: u64,
    pub bytes_from_upstream: u64,
    /// NAR requests answered 404 because no source delivered.
    pub nar_failures: u64,
    /// Answers rejected as false (signature, path, hash).
    pub lies: u64,
    /// NARs that crossed the LAN zstd-compressed.
    pub nars_zstd_from_peers: u64,
    /// NARs fetched in segments from several peers at once.
    pub nars_split: u64,
    /// NARs from proven peers sent to Nix while they were hashed (see `passthrough`).
    #[serde(default)]
    pub nars_passed_through: u64,
    /// Pass-throughs cut short (the NAR did not verify or no source finished it): each is one
    /// failed download for Nix.
    #[serde(default)]
    pub nars_cut: u64,
    /// Busy answers from peers' store servers (no transfer slot free): the fetch tried the
    /// NAR's other sources or came back later (issue #24).
    #[serde(default)]
    pub busy_answers: u64,
    /// Waits (with jitter) of a fetch whose every source was busy, before asking again.
    #[serde(default)]
    pub busy_waits: u64,
    /// Segments of split fetches that went on from another peer after theirs failed (`split`).
    #[serde(default)]
    pub segments_moved: u64,
}

/// What became of one NAR request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransferVerdict {
    /// Delivered after its hash matched.
    Verified,
    /// No source delivered it: answered 404.
    Unavailable,
    /// Sent while it was hashed (a proven peer), its tail after the hash matched.
    #[serde(rename = "passed through")]
    PassedThrough,
    /// Passed through, then cut short before its tail: the NAR did not verify.
    Cut,
}

impl TransferVerdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Verified => "verified",
            Self::Unavailable => "unavailable",
            Self::PassedThrough => "passed through",
            Self::Cut => "cut",
        }
    }
}

/// One NAR request, for the status page.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    pub path: String,
    pub source: String,
    pub bytes: u64,
    pub ms: u64,
    pub verdict: TransferVerdict,
    /// Why it was unavailable or cut (none when delivered); in JSON, its text ("" for none).
    #[serde(with = "reason_text")]
    pub reason: Option<TransferFailure>,
}

/// Why a NAR request was not (fully) delivered, for the transfer list.
#[derive(Clone, Debug)]
pub enum TransferFailure {
    /// The fetch failed: no source had it, the spool refused it, or every source failed.
    Fetch(Arc<FetchError>),
    /// A pass-through body was cut short.
    Cut(CutReason),
    /// As a node's status JSON gave it (what `status` reads from a running node): text only.
    Reported(String),
}

impl fmt::Display for TransferFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fetch(e) => e.fmt(f),
            Self::Cut(c) => c.fmt(f),
            Self::Reported(t) => f.write_str(t),
        }
    }
}

/// Two reasons are the same when a person reads the same (a report read back from JSON holds
/// only the text).
impl PartialEq for TransferFailure {
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}

impl Eq for TransferFailure {}

/// [`Transfer::reason`] in JSON: its text, `""` for none (the format the status JSON always had).
mod reason_text {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::TransferFailure;

    pub fn serialize<S: Serializer>(r: &Option<TransferFailure>, s: S) -> Result<S::Ok, S::Error> {
        match r {
            Some(r) => s.collect_str(r),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<TransferFailure>, D::Error> {
        let text = String::deserialize(d)?;
        Ok((!text.is_empty()).then_some(TransferFailure::Reported(text)))
    }
}

#[derive(Default)]
pub struct StatsKeeper {
    stats: Mutex<Stats>,
    recent: Mutex<VecDeque<Transfer>>,
}

impl StatsKeeper {
    pub fn update(&self, f: impl FnOnce(&mut Stats)) {
        f(&mut self.stats.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub fn get(&self) -> Stats {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn record(&self, t: Transfer) {
        let mut r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if r.len() >= RECENT_TRANSFERS {
            r.pop_back();
        }
        r.push_front(t);
    }

    /// The last transfers, newest first.
    pub fn recent(&self) -> Vec<Transfer> {
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

/// The proxy's state, for people and for Prometheus.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub peers: Vec<PeerReport>,
    pub stats: Stats,
    /// The last NAR requests, newest first.
    pub recent: Vec<Transfer>,
    /// What the beacon received (none without a beacon).
    pub beacon: Option<Counters>,
    pub upstreams: Vec<UpstreamReport>,
    /// The beacon's interfaces (joined, waiting, left); filled in by the node's status pages
    /// (the proxy itself does not know them). Empty without a beacon.
    #[serde(default)]
    pub interfaces: Vec<LinkReport>,
    /// The seeds (`--peer`) and how each last answered; filled in by the node's status pages.
    #[serde(default)]
    pub seeds: Vec<crate::beacon::seeds::SeedReport>,
    /// What is wrong with the network, each with its fix (`beacon::diagnose`); filled in by the
    /// node's status pages.
    #[serde(default)]
    pub diagnosis: Vec<crate::beacon::diagnose::Diagnosis>,
    /// Memory held by peers' content summaries.
    pub summary_bytes: u64,
}

/// One peer of the table, with the health the proxy found.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerReport {
    pub node: String,
    /// The store server's address.
    pub addr: String,
    pub hostname: Option<String>,
    pub health: Health,
    pub backed_off: bool,
    /// Its NARs pass through while they are hashed (see `proxy::proven`).
    #[serde(default)]
    pub proven: bool,
    /// The version of its content summary this proxy holds (none: not fetched, or none published).
    pub summary: Option<u64>,
    /// How fast each form of its NARs (plain, zstd) delivered (`proxy::forms`; none: nothing
    /// measured).
    #[serde(default)]
    pub forms: Option<super::forms::PeerRates>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamReport {
    pub url: String,
    /// False while skipped after a failed connection.
    pub reachable: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The status JSON carries a failure's text, as it always did ("" for none), and reads back
    /// as the same reason.
    #[test]
    fn a_transfers_reason_is_its_text_in_json() {
        for (reason, text) in [
            (None, ""),
            (
                Some(TransferFailure::Fetch(Arc::new(FetchError::NoSource))),
                "no source has the NAR",
            ),
            (
                Some(TransferFailure::Cut(CutReason::NotVerified)),
                "the NAR did not verify",
            ),
        ] {
            let t = Transfer {
                path: "/nix/store/x".into(),
                source: String::new(),
                bytes: 1,
                ms: 2,
                verdict: TransferVerdict::Unavailable,
                reason,
            };
            let json = serde_json::to_value(&t).expect("json");
            assert_eq!(json["reason"], text);
            let back: Transfer = serde_json::from_value(json).expect("reads back");
            assert_eq!(back, t);
        }
    }
}
