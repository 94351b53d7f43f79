//! The fuzz targets, by name.

/// One fuzz target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A beacon datagram: decode, re-encode, decode again.
    BeaconDecode,
    /// A NAR stream in two chunks through the framer.
    NarFramer,
    /// The bytes a nix-daemon sends, on an in-memory stream.
    Daemon,
    /// A content summary (`GET /summary`), and keys through encode and decode.
    Summary,
    /// A `GET /identity` query and the answer a prover reads.
    Identity,
    /// The peer table fed a sequence of datagrams, peer-exchange entries and proofs.
    PeerTable,
    /// narinfo text: parse, render, parse.
    Narinfo,
    /// The TOML config file of `serve`.
    Config,
}

impl Target {
    pub const ALL: [Target; 8] = [
        Target::BeaconDecode,
        Target::NarFramer,
        Target::Daemon,
        Target::Summary,
        Target::Identity,
        Target::PeerTable,
        Target::Narinfo,
        Target::Config,
    ];

    /// The name of its libFuzzer target and corpus folder.
    pub fn name(self) -> &'static str {
        match self {
            Target::BeaconDecode => "beacon_decode",
            Target::NarFramer => "nar_framer",
            Target::Daemon => "daemon",
            Target::Summary => "summary",
            Target::Identity => "identity",
            Target::PeerTable => "peer_table",
            Target::Narinfo => "narinfo",
            Target::Config => "config",
        }
    }

    /// Longest input the mutator makes (each target's inputs are small by nature).
    pub fn max_len(self) -> usize {
        match self {
            Target::BeaconDecode => 600,
            Target::Daemon | Target::Summary => 8192,
            _ => 4096,
        }
    }
}
