//! Beacon datagrams as the tests write them (forged announces, goodbyes, floods): one builder,
//! every field a test does not name at a plain default.

use local_nix_cache::beacon::wire::{self, Beacon, Kind, NodeId};

/// A beacon under construction; [`Self::encode`] gives the datagram.
#[derive(Clone, Debug)]
pub struct BeaconBuilder(Beacon);

/// An announce from `node` for store port `port`: no flags, an interval of an hour, sequence 1,
/// no hostname, summary, commitment or proof.
pub fn announce(node: NodeId, port: u16) -> BeaconBuilder {
    BeaconBuilder(Beacon {
        kind: Kind::Announce,
        flags: 0,
        node,
        port,
        interval_ms: 3_600_000,
        seq: 1,
        hostname: None,
        summary: None,
        commitment: None,
        proof: None,
    })
}

/// A query from `node` (port 0: every host is asked to announce now), otherwise as [`announce`].
pub fn query(node: NodeId) -> BeaconBuilder {
    let mut b = announce(node, 0);
    b.0.kind = Kind::Query;
    b
}

/// A goodbye from `node` (port 0), otherwise as [`announce`].
pub fn goodbye(node: NodeId) -> BeaconBuilder {
    let mut b = announce(node, 0);
    b.0.kind = Kind::Goodbye;
    b
}

impl BeaconBuilder {
    pub fn flags(mut self, flags: u16) -> Self {
        self.0.flags = flags;
        self
    }

    pub fn interval_ms(mut self, ms: u32) -> Self {
        self.0.interval_ms = ms;
        self
    }

    pub fn seq(mut self, seq: u32) -> Self {
        self.0.seq = seq;
        self
    }

    pub fn hostname(mut self, hostname: Option<&str>) -> Self {
        self.0.hostname = hostname.map(str::to_owned);
        self
    }

    pub fn summary(mut self, version: Option<u64>) -> Self {
        self.0.summary = version;
        self
    }

    /// The datagram ([`wire::encode`]).
    pub fn encode(&self) -> Vec<u8> {
        wire::encode(&self.0)
    }
}
