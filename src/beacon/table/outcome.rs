//! What one datagram did ([`Outcome`]), why one was ignored ([`IgnoreReason`]), and the counts
//! of both ([`Counters`]): a reason names the counter it bumps, so no path bumps one by hand.

use serde::Serialize;

use crate::beacon::wire::{Beacon, DecodeError};

/// Counts of what arrived and why anything was dropped.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Counters {
    pub received: u64,
    pub announces: u64,
    pub queries: u64,
    pub goodbyes: u64,
    pub too_short: u64,
    pub invalid: u64,
    pub wrong_version: u64,
    pub own: u64,
    pub rate_limited: u64,
    pub table_full: u64,
    /// Failed the on-link checks (unicast, or a source not on the link).
    #[serde(default)]
    pub off_link: u64,
    /// Announces of a live peer's node id from a second address (ignored, or undone).
    #[serde(default)]
    pub contested: u64,
    /// Entries that never answered, pushed out of a full table by a newcomer.
    #[serde(default)]
    pub displaced: u64,
    /// Announces (among `announces`) from one of this host's own addresses: another process on
    /// this host (`peers` beside `serve`), which proves nothing about the network.
    #[serde(default)]
    pub from_this_host: u64,
    pub expired: u64,
}

impl Counters {
    /// Counts a datagram that did not decode.
    pub(super) fn undecoded(&mut self, e: &DecodeError) {
        match e {
            DecodeError::TooShort(_) => self.too_short += 1,
            DecodeError::Version(_) => self.wrong_version += 1,
            _ => self.invalid += 1,
        }
    }
}

/// Why a decoded datagram was ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IgnoreReason {
    /// Our own beacon, come back to us.
    Own,
    /// More signed goodbyes than [`super::MAX_SIGNATURE_CHECKS_PER_SEC`] to check.
    TooManySignatures,
    /// A signed goodbye whose signature did not check (or that came too late).
    BadSignature,
    /// A goodbye without the peer's secret or signature, or naming a peer not in the table.
    UnprovenGoodbye,
    /// The store server at the announcing address proved another node id lately.
    AddressProvedAnother,
    /// The family has a proven address for the id, and the announcing address is not one.
    AddressDidNotProve,
    /// The entry went while the announce was handled (a proof took its last address).
    Gone,
    /// A committed node id announced with another commitment.
    OtherCommitment,
    /// A pinned id announced from a second address while alive at its own.
    SecondAddress,
    /// The source address holds its share of node ids, all of whose servers answered.
    AddressFull,
    /// The table is full of peers whose servers answered.
    TableFull,
    /// An announce of a node that said goodbye, sent before its goodbye (a replay).
    Replayed,
}

impl IgnoreReason {
    /// What `peers --raw` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Own => "own beacon",
            Self::TooManySignatures => "too many signed goodbyes to check",
            Self::BadSignature => "goodbye with a bad signature",
            Self::UnprovenGoodbye => "goodbye without the peer's proof, or from an unknown peer",
            Self::AddressProvedAnother => "node id announced from an address that proved another",
            Self::AddressDidNotProve => "node id announced from an address that did not prove it",
            Self::Gone => "gone",
            Self::OtherCommitment => "announce with another node's commitment",
            Self::SecondAddress => "node id announced from a second address while alive at its own",
            Self::AddressFull => "address holds its share of node ids, all answered",
            Self::TableFull => "peer table full of peers that answered",
            Self::Replayed => "announce older than the node's goodbye (a replay)",
        }
    }

    /// The counter this reason is counted in, if any.
    pub fn counter(self, c: &mut Counters) -> Option<&mut u64> {
        match self {
            Self::Own => Some(&mut c.own),
            Self::TooManySignatures => Some(&mut c.rate_limited),
            Self::AddressProvedAnother | Self::AddressDidNotProve | Self::SecondAddress => Some(&mut c.contested),
            Self::AddressFull | Self::TableFull => Some(&mut c.table_full),
            Self::BadSignature | Self::UnprovenGoodbye | Self::Gone | Self::OtherCommitment | Self::Replayed => None,
        }
    }

    /// Counts it in its counter.
    pub(super) fn count(self, c: &mut Counters) {
        if let Some(n) = self.counter(c) {
            *n += 1;
        }
    }
}

impl std::fmt::Display for IgnoreReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one datagram did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A new peer.
    Joined(Beacon),
    /// A known peer announced again.
    Refreshed(Beacon),
    /// A peer said goodbye and left.
    Left(Beacon),
    /// Someone asks every host to announce now.
    Query(Beacon),
    /// Decoded, but nothing to do (own beacon, goodbye of an unknown peer, table full).
    Ignored(Beacon, IgnoreReason),
    /// Not decoded.
    Invalid(DecodeError),
    /// Not from this link (not decoded): why.
    OffLink(&'static str),
    RateLimited,
}
