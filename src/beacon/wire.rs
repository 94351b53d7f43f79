//! The beacon wire format (`proto/beacon.md`): a pure codec, no I/O.
//!
//! `decode` checks sizes before it parses and tells "too short" from "invalid"; it never panics
//! and allocates nothing but the hostname. `encode` writes the canonical form (known extensions
//! only), which `decode` round-trips.

use std::fmt;

pub const MAGIC: [u8; 4] = *b"LNCB";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 34;
/// Longest valid datagram.
pub const MAX_DATAGRAM: usize = 512;
pub const MIN_INTERVAL_MS: u32 = 100;
pub const MAX_INTERVAL_MS: u32 = 3_600_000;
const MAX_HOSTNAME: usize = 64;
const EXT_HOSTNAME: u8 = 1;
const EXT_SUMMARY: u8 = 2;
const EXT_COMMITMENT: u8 = 3;
const EXT_PROOF: u8 = 4;
/// In a goodbye: the sender's Ed25519 public key (32 bytes), whose hash is its node id.
pub const EXT_KEY: u8 = 5;
/// In a goodbye, last: the signature (64 bytes) by that key over everything before it
/// (`identity`).
pub const EXT_SIGNATURE: u8 = 6;
/// Length of a goodbye secret and of its commitment.
pub const SECRET_LEN: usize = 16;

pub const FLAG_NAR_NONE: u16 = 0x0001;
pub const FLAG_NAR_ZSTD: u16 = 0x0002;
pub const FLAG_PROXY: u16 = 0x0004;

/// A random id chosen per process; tells own beacons from others'.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub [u8; 16]);

impl NodeId {
    pub fn random() -> Self {
        Self(rand::random())
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Text that is not a node id.
#[derive(Debug, thiserror::Error)]
#[error("not a node id (32 hex digits)")]
pub struct NodeIdText;

/// A node id written as 32 hex digits (as `Display` writes it).
impl std::str::FromStr for NodeId {
    type Err = NodeIdText;

    fn from_str(s: &str) -> Result<Self, NodeIdText> {
        let bytes = data_encoding::HEXLOWER_PERMISSIVE
            .decode(s.as_bytes())
            .map_err(|_| NodeIdText)?;
        bytes.try_into().map(Self).map_err(|_| NodeIdText)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Announce,
    Query,
    Goodbye,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::Announce => 1,
            Kind::Query => 2,
            Kind::Goodbye => 3,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Announce => "announce",
            Kind::Query => "query",
            Kind::Goodbye => "goodbye",
        }
    }
}

/// One decoded beacon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Beacon {
    pub kind: Kind,
    pub flags: u16,
    pub node: NodeId,
    /// The sender's store server port (0 allowed in query and goodbye).
    pub port: u16,
    pub interval_ms: u32,
    pub seq: u32,
    pub hostname: Option<String>,
    /// The version of the sender's content summary (`GET /summary`), when it publishes one.
    pub summary: Option<u64>,
    /// In an announce: the hash of this run's goodbye secret ([`commitment`]).
    pub commitment: Option<[u8; SECRET_LEN]>,
    /// In a goodbye: the secret whose commitment the announces carried.
    pub proof: Option<[u8; SECRET_LEN]>,
}

impl Beacon {
    /// Its node id is its commitment ([`bound_identity`]).
    pub fn bound(&self) -> bool {
        self.commitment == Some(self.node.0)
    }
}

/// Whether sequence number `a` comes after `b` (serial number arithmetic, RFC 1982: `a` is
/// ahead by 1 to 2^31 - 1, wrapping).
pub fn seq_after(a: u32, b: u32) -> bool {
    a != b && a.wrapping_sub(b) < 1 << 31
}

/// The commitment announced for a goodbye secret: the first 16 bytes of its sha256. Only the
/// host that chose the secret can send a goodbye that matches its announces.
pub fn commitment(secret: &[u8; SECRET_LEN]) -> [u8; SECRET_LEN] {
    use sha2::Digest;
    let d = sha2::Sha256::digest(secret);
    let mut out = [0u8; SECRET_LEN];
    out.copy_from_slice(&d[..SECRET_LEN]);
    out
}

/// A node id and goodbye secret where the id is the secret's [`commitment`] (a *bound* id): an
/// announce of this id with any other commitment is then recognisably not this node's.
pub fn bound_identity() -> (NodeId, [u8; SECRET_LEN]) {
    let secret: [u8; SECRET_LEN] = rand::random();
    (NodeId(commitment(&secret)), secret)
}

/// Why a datagram was dropped.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("too short: {0} bytes, a beacon has at least {HEADER_LEN}")]
    TooShort(usize),
    #[error("too long: {0} bytes, a beacon has at most {MAX_DATAGRAM}")]
    TooLong(usize),
    #[error("not a beacon (bad magic)")]
    Magic,
    #[error("unsupported version {0}")]
    Version(u8),
    #[error("unknown message type {0}")]
    Type(u8),
    #[error("announce with port 0")]
    Port,
    #[error("interval {0} ms outside {MIN_INTERVAL_MS}..={MAX_INTERVAL_MS}")]
    Interval(u32),
    #[error("extension at byte {0} runs past the end")]
    Truncated(usize),
    #[error("hostname extension is empty, too long or not UTF-8")]
    Hostname,
    #[error("extension {0} has the wrong length")]
    ExtensionLength(u8),
}

impl DecodeError {
    /// Short stable name, for counters and test vectors.
    pub fn name(&self) -> &'static str {
        match self {
            DecodeError::TooShort(_) => "too-short",
            DecodeError::TooLong(_) => "too-long",
            DecodeError::Magic => "magic",
            DecodeError::Version(_) => "version",
            DecodeError::Type(_) => "type",
            DecodeError::Port => "port",
            DecodeError::Interval(_) => "interval",
            DecodeError::Truncated(_) => "truncated",
            DecodeError::Hostname => "hostname",
            DecodeError::ExtensionLength(_) => "extension-length",
        }
    }
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

pub fn decode(b: &[u8]) -> Result<Beacon, DecodeError> {
    if b.len() < HEADER_LEN {
        return Err(DecodeError::TooShort(b.len()));
    }
    if b.len() > MAX_DATAGRAM {
        return Err(DecodeError::TooLong(b.len()));
    }
    if b[0..4] != MAGIC {
        return Err(DecodeError::Magic);
    }
    if b[4] != VERSION {
        return Err(DecodeError::Version(b[4]));
    }
    let kind = match b[5] {
        1 => Kind::Announce,
        2 => Kind::Query,
        3 => Kind::Goodbye,
        t => return Err(DecodeError::Type(t)),
    };
    let flags = u16_at(b, 6);
    let mut node = [0u8; 16];
    node.copy_from_slice(&b[8..24]);
    let port = u16_at(b, 24);
    if kind == Kind::Announce && port == 0 {
        return Err(DecodeError::Port);
    }
    let interval_ms = u32_at(b, 26);
    if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&interval_ms) {
        return Err(DecodeError::Interval(interval_ms));
    }
    let seq = u32_at(b, 30);
    let mut hostname = None;
    let (mut summary, mut commitment, mut proof) = (None, None, None);
    let fixed = |t: u8, v: &[u8]| -> Result<[u8; SECRET_LEN], DecodeError> {
        v.try_into().map_err(|_| DecodeError::ExtensionLength(t))
    };
    let mut i = HEADER_LEN;
    while i < b.len() {
        if i + 2 > b.len() {
            return Err(DecodeError::Truncated(i));
        }
        let (t, len) = (b[i], b[i + 1] as usize);
        let value = b.get(i + 2..i + 2 + len).ok_or(DecodeError::Truncated(i))?;
        if t == EXT_HOSTNAME {
            let h = std::str::from_utf8(value).map_err(|_| DecodeError::Hostname)?;
            if h.is_empty() || h.len() > MAX_HOSTNAME {
                return Err(DecodeError::Hostname);
            }
            hostname = Some(h.to_owned());
        } else if t == EXT_SUMMARY {
            let v: [u8; 8] = value.try_into().map_err(|_| DecodeError::ExtensionLength(t))?;
            summary = Some(u64::from_be_bytes(v));
        } else if t == EXT_COMMITMENT {
            commitment = Some(fixed(t, value)?);
        } else if t == EXT_PROOF {
            proof = Some(fixed(t, value)?);
        } else if (t == EXT_KEY && len != 32) || (t == EXT_SIGNATURE && len != 64) {
            return Err(DecodeError::ExtensionLength(t));
        }
        i += 2 + len;
    }
    Ok(Beacon {
        kind,
        flags,
        node: NodeId(node),
        port,
        interval_ms,
        seq,
        hostname,
        summary,
        commitment,
        proof,
    })
}

/// The key and signature extensions of a signed datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signed {
    pub key: [u8; 32],
    pub signature: [u8; 64],
    /// The signed bytes: the datagram up to the signature extension, which must be last.
    pub signed_len: usize,
}

/// The key and signature of a datagram that [`decode`] accepted, when it carries both and the
/// signature is its last extension.
pub fn signature(b: &[u8]) -> Option<Signed> {
    let (mut key, mut sig) = (None, None);
    let mut i = HEADER_LEN;
    while i + 2 <= b.len() {
        let (t, len) = (b[i], b[i + 1] as usize);
        let value = b.get(i + 2..i + 2 + len)?;
        if t == EXT_KEY {
            key = value.try_into().ok();
        } else if t == EXT_SIGNATURE {
            sig = Some((value.try_into().ok()?, i));
        }
        i += 2 + len;
    }
    let (signature, signed_len) = sig?;
    (signed_len + 2 + 64 == b.len()).then_some(Signed {
        key: key?,
        signature,
        signed_len,
    })
}

/// Encodes `b`. A hostname longer than 64 bytes is cut at a character boundary.
pub fn encode(b: &Beacon) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + 2 + MAX_HOSTNAME);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(b.kind.code());
    out.extend_from_slice(&b.flags.to_be_bytes());
    out.extend_from_slice(&b.node.0);
    out.extend_from_slice(&b.port.to_be_bytes());
    out.extend_from_slice(&b.interval_ms.to_be_bytes());
    out.extend_from_slice(&b.seq.to_be_bytes());
    if let Some(h) = b.hostname.as_deref().filter(|h| !h.is_empty()) {
        let mut end = h.len().min(MAX_HOSTNAME);
        while !h.is_char_boundary(end) {
            end -= 1;
        }
        out.push(EXT_HOSTNAME);
        out.push(end as u8);
        out.extend_from_slice(&h.as_bytes()[..end]);
    }
    if let Some(v) = b.summary {
        out.extend_from_slice(&[EXT_SUMMARY, 8]);
        out.extend_from_slice(&v.to_be_bytes());
    }
    for (t, v) in [(EXT_COMMITMENT, b.commitment), (EXT_PROOF, b.proof)] {
        if let Some(v) = v {
            out.extend_from_slice(&[t, SECRET_LEN as u8]);
            out.extend_from_slice(&v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The test vectors in `proto/vectors/beacons.txt`: blocks of `key: value` lines.
    fn vectors() -> Vec<std::collections::BTreeMap<String, String>> {
        let text = include_str!("../../proto/vectors/beacons.txt");
        let mut out = Vec::new();
        let mut cur = std::collections::BTreeMap::new();
        for line in text.lines().chain(std::iter::once("")) {
            let line = line.trim();
            if line.starts_with('#') {
                continue;
            }
            if line.is_empty() {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                continue;
            }
            let (k, v) = line.split_once(':').expect("key: value");
            let v = v.trim().to_owned();
            cur.entry(k.trim().to_owned())
                .and_modify(|old: &mut String| old.push_str(&v))
                .or_insert(v);
        }
        out
    }

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        data_encoding::HEXLOWER_PERMISSIVE.decode(s.as_bytes()).expect("hex")
    }

    #[test]
    fn every_vector_decodes_as_documented() {
        let vs = vectors();
        assert!(vs.len() >= 12, "expected the committed vectors, found {}", vs.len());
        for v in vs {
            let name = &v["name"];
            let bytes = unhex(&v["hex"]);
            let got = decode(&bytes);
            if let Some(err) = v.get("error") {
                assert_eq!(got.as_ref().map_err(DecodeError::name), Err(err.as_str()), "{name}");
                continue;
            }
            let b = got.unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(b.kind.name(), v["type"], "{name}");
            assert_eq!(b.node.to_string(), v["node"], "{name}");
            assert_eq!(b.port.to_string(), v["port"], "{name}");
            assert_eq!(format!("{:#06x}", b.flags), v["flags"], "{name}");
            assert_eq!(b.interval_ms.to_string(), v["interval_ms"], "{name}");
            assert_eq!(b.seq.to_string(), v["seq"], "{name}");
            assert_eq!(b.hostname.as_deref().unwrap_or("-"), v["hostname"], "{name}");
            let hex = |x: Option<[u8; SECRET_LEN]>| x.map_or("-".into(), |x| data_encoding::HEXLOWER.encode(&x));
            let field = |k: &str| v.get(k).map_or("-", String::as_str).to_owned();
            assert_eq!(
                b.summary.map_or("-".into(), |s| s.to_string()),
                field("summary"),
                "{name}"
            );
            assert_eq!(hex(b.commitment), field("commitment"), "{name}");
            assert_eq!(hex(b.proof), field("proof"), "{name}");
            // Signed goodbyes (`identity`): the key found, and whether the signature holds.
            let signed = signature(&bytes);
            assert_eq!(
                signed
                    .as_ref()
                    .map_or("-".into(), |s| data_encoding::HEXLOWER.encode(&s.key)),
                field("key"),
                "{name}"
            );
            if let Some(want) = v.get("signed") {
                assert_eq!(
                    crate::beacon::identity::signed_by(&bytes, &b.node),
                    want == "yes",
                    "{name}: signature"
                );
            }
            if v.get("canonical").map(String::as_str) != Some("no") {
                assert_eq!(encode(&b), bytes, "{name}: canonical encoding");
            }
        }
    }

    fn beacon() -> impl Strategy<Value = Beacon> {
        (
            prop_oneof![Just(Kind::Announce), Just(Kind::Query), Just(Kind::Goodbye)],
            any::<u16>(),
            any::<[u8; 16]>(),
            1u16..,
            MIN_INTERVAL_MS..=MAX_INTERVAL_MS,
            any::<u32>(),
            proptest::option::of("[a-zA-Z0-9.-]{1,64}"),
            (
                proptest::option::of(any::<u64>()),
                proptest::option::of(any::<[u8; SECRET_LEN]>()),
                proptest::option::of(any::<[u8; SECRET_LEN]>()),
            ),
        )
            .prop_map(
                |(kind, flags, node, port, interval_ms, seq, hostname, (summary, commitment, proof))| Beacon {
                    kind,
                    flags,
                    node: NodeId(node),
                    port,
                    interval_ms,
                    seq,
                    hostname,
                    summary,
                    commitment,
                    proof,
                },
            )
    }

    proptest! {
        #[test]
        fn round_trip(b in beacon()) {
            let bytes = encode(&b);
            prop_assert!(bytes.len() <= MAX_DATAGRAM);
            prop_assert_eq!(decode(&bytes), Ok(b));
        }

        #[test]
        fn unknown_extensions_are_skipped(b in beacon(), t in 7u8.., value in proptest::collection::vec(any::<u8>(), 0..100)) {
            let mut bytes = encode(&b);
            bytes.push(t);
            bytes.push(value.len() as u8);
            bytes.extend_from_slice(&value);
            prop_assert_eq!(decode(&bytes), Ok(b));
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn any_truncation_of_an_extension_is_an_error(b in beacon(), cut in 1usize..10) {
            let b = Beacon { hostname: Some("host-name.example".into()), ..b };
            let bytes = encode(&b);
            let short = &bytes[..bytes.len() - cut];
            prop_assert!(decode(short).is_err());
        }
    }
}
