//! Content summaries: what a store server serves, as a compact filter that a proxy asks "could
//! this peer have path X?" before sending it a request. Shared by the store server (which
//! publishes `GET /summary`) and the proxy (which fetches and reads them). A pure codec, no I/O.
//!
//! A summary is a binary fuse filter (16-bit fingerprints: about 18 bits a path, false positives
//! about 1 in 65,000, no false negatives) over [`key`]s of store path hashes, with a version.
//! `GET /summary?since=V` answers with the keys added since version `V` when the server still
//! has them, so a peer that gained a few paths costs its peers a few bytes, not a new filter.
//! Paths removed from a store stay "maybe" until the next full summary: a false positive costs
//! one request that is answered 404.
//!
//! Layout (big-endian): `LNCS`, format `1`, kind (`1` full, `2` delta), 2 reserved bytes, the
//! version (u64); a full summary then has the key count (u32), the filter's seed (u64), segment
//! length, segment length mask and segment count length (u32 each), the fingerprint count (u32)
//! and the fingerprints (u16 each); a delta has the version it starts from (u64), the key count
//! (u32) and the keys (u64 each). Everything is checked before use: a hostile summary can make a
//! peer look like it has everything (costing its own requests), never crash the reader.

use bytes::{BufMut, Bytes, BytesMut};
use sha2::Digest;
use xorf::{BinaryFuse16, Filter};

use crate::narinfo::StorePathHash;

const MAGIC: &[u8; 4] = b"LNCS";
const FORMAT: u8 = 1;
const KIND_FULL: u8 = 1;
const KIND_DELTA: u8 = 2;
const HEADER: usize = 16;
/// Largest summary accepted (a full one of about 460,000 paths).
pub const MAX_SUMMARY_BYTES: usize = 1024 * 1024;
/// Most keys in a delta (beyond that, a full summary is sent).
pub const MAX_DELTA_KEYS: usize = 16_384;

/// The filter key of a store path hash.
pub fn key(hash: &StorePathHash) -> u64 {
    let d = sha2::Sha256::digest(hash.to_string().as_bytes());
    let mut k = [0u8; 8];
    k.copy_from_slice(&d[..8]);
    u64::from_be_bytes(k)
}

/// A decoded summary.
#[derive(Clone, Debug)]
pub enum Summary {
    /// Everything the server serves at `version` (`None`: nothing at all).
    Full { version: u64, filter: Option<BinaryFuse16> },
    /// Keys added from version `from` to `version`.
    Delta { from: u64, version: u64, keys: Vec<u64> },
}

impl Summary {
    pub fn version(&self) -> u64 {
        match self {
            Summary::Full { version, .. } | Summary::Delta { version, .. } => *version,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SummaryError {
    #[error("summary of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("not a summary (bad magic or format)")]
    Magic,
    #[error("summary cut short")]
    Truncated,
    #[error("summary filter is inconsistent")]
    Filter,
    #[error("cannot build a filter over these keys")]
    Build,
}

fn header(kind: u8, version: u64, extra: usize) -> BytesMut {
    let mut b = BytesMut::with_capacity(HEADER + extra);
    b.put_slice(MAGIC);
    b.put_u8(FORMAT);
    b.put_u8(kind);
    b.put_u16(0);
    b.put_u64(version);
    b
}

/// A full summary of `keys` (distinct) at `version`.
pub fn encode_full(version: u64, keys: &[u64]) -> Result<Bytes, SummaryError> {
    let filter = if keys.is_empty() {
        None
    } else {
        Some(BinaryFuse16::try_from(keys).map_err(|_| SummaryError::Build)?)
    };
    let fps = filter.as_ref().map_or(0, |f| f.fingerprints.len());
    let mut b = header(KIND_FULL, version, 28 + 2 * fps);
    b.put_u32(u32::try_from(keys.len()).map_err(|_| SummaryError::Build)?);
    match &filter {
        None => b.put_bytes(0, 24),
        Some(f) => {
            let d = &f.descriptor;
            b.put_u64(d.seed);
            b.put_u32(d.segment_length);
            b.put_u32(d.segment_length_mask);
            b.put_u32(d.segment_count_length);
            b.put_u32(u32::try_from(fps).map_err(|_| SummaryError::Build)?);
            for fp in f.fingerprints.iter() {
                b.put_u16(*fp);
            }
        }
    }
    if b.len() > MAX_SUMMARY_BYTES {
        return Err(SummaryError::TooLarge(b.len()));
    }
    Ok(b.freeze())
}

/// The keys added from version `from` to `version`.
pub fn encode_delta(from: u64, version: u64, keys: &[u64]) -> Bytes {
    let mut b = header(KIND_DELTA, version, 12 + 8 * keys.len());
    b.put_u64(from);
    b.put_u32(keys.len() as u32);
    for k in keys {
        b.put_u64(*k);
    }
    b.freeze()
}

/// A cursor that fails instead of panicking.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], SummaryError> {
        let (head, rest) = self.0.split_at_checked(N).ok_or(SummaryError::Truncated)?;
        self.0 = rest;
        head.try_into().map_err(|_| SummaryError::Truncated)
    }
    fn u16(&mut self) -> Result<u16, SummaryError> {
        self.take::<2>().map(u16::from_be_bytes)
    }
    fn u32(&mut self) -> Result<u32, SummaryError> {
        self.take::<4>().map(u32::from_be_bytes)
    }
    fn u64(&mut self) -> Result<u64, SummaryError> {
        self.take::<8>().map(u64::from_be_bytes)
    }
}

pub fn decode(bytes: &[u8]) -> Result<Summary, SummaryError> {
    if bytes.len() > MAX_SUMMARY_BYTES {
        return Err(SummaryError::TooLarge(bytes.len()));
    }
    let mut r = Reader(bytes);
    if &r.take::<4>()? != MAGIC || r.take::<1>()? != [FORMAT] {
        return Err(SummaryError::Magic);
    }
    let kind = r.take::<1>()?[0];
    r.u16()?;
    let version = r.u64()?;
    match kind {
        KIND_FULL => {
            let count = r.u32()?;
            let seed = r.u64()?;
            let (segment_length, segment_length_mask, segment_count_length) = (r.u32()?, r.u32()?, r.u32()?);
            let n = r.u32()? as usize;
            if r.0.len() != 2 * n {
                return Err(SummaryError::Truncated);
            }
            if count == 0 {
                return if n == 0 {
                    Ok(Summary::Full { version, filter: None })
                } else {
                    Err(SummaryError::Filter)
                };
            }
            // What `contains` relies on to stay in bounds: a power-of-two segment length, its
            // mask, whole segments, and exactly two segments beyond the count length.
            let consistent = segment_length.is_power_of_two()
                && segment_length_mask == segment_length - 1
                && segment_count_length % segment_length == 0
                && segment_count_length > 0
                && u64::from(segment_count_length) + 2 * u64::from(segment_length) == n as u64;
            if !consistent {
                return Err(SummaryError::Filter);
            }
            let fingerprints: Box<[u16]> = (0..n).map(|_| r.u16()).collect::<Result<_, _>>()?;
            let filter = BinaryFuse16 {
                descriptor: xorf::Descriptor {
                    seed,
                    segment_length,
                    segment_length_mask,
                    segment_count_length,
                },
                fingerprints,
            };
            Ok(Summary::Full {
                version,
                filter: Some(filter),
            })
        }
        KIND_DELTA => {
            let from = r.u64()?;
            let n = r.u32()? as usize;
            if n > MAX_DELTA_KEYS || r.0.len() != 8 * n {
                return Err(SummaryError::Truncated);
            }
            let keys = (0..n).map(|_| r.u64()).collect::<Result<_, _>>()?;
            Ok(Summary::Delta { from, version, keys })
        }
        _ => Err(SummaryError::Magic),
    }
}

/// Whether a filter may hold `key` (`None`: an empty summary holds nothing).
pub fn may_contain(filter: Option<&BinaryFuse16>, key: u64) -> bool {
    filter.is_some_and(|f| f.contains(&key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keys(n: u64, salt: u64) -> Vec<u64> {
        (0..n)
            .map(|i| {
                u64::from_be_bytes(
                    sha2::Sha256::digest((i ^ (salt << 40)).to_be_bytes())[..8]
                        .try_into()
                        .unwrap_or_default(),
                )
            })
            .collect()
    }

    #[test]
    fn a_full_summary_holds_its_keys_and_few_others() {
        let ks = keys(20_000, 1);
        let bytes = encode_full(7, &ks).expect("encode");
        // About 18 bits a path: 20,000 paths in about 45 KB.
        assert!(bytes.len() < 50_000, "{} bytes", bytes.len());
        let Summary::Full { version, filter } = decode(&bytes).expect("decode") else {
            panic!("full")
        };
        assert_eq!(version, 7);
        assert!(
            ks.iter().all(|k| may_contain(filter.as_ref(), *k)),
            "no false negatives"
        );
        let others = keys(100_000, 2);
        let fp = others.iter().filter(|k| may_contain(filter.as_ref(), **k)).count();
        assert!(fp < 20, "{fp} false positives in 100,000");
        let empty = decode(&encode_full(1, &[]).expect("empty")).expect("decode");
        assert!(matches!(empty, Summary::Full { filter: None, .. }));
    }

    #[test]
    fn deltas_round_trip() {
        let ks = keys(10, 3);
        let Summary::Delta { from, version, keys } = decode(&encode_delta(4, 9, &ks)).expect("decode") else {
            panic!("delta")
        };
        assert_eq!((from, version, keys), (4, 9, ks));
    }

    #[test]
    fn a_hostile_filter_is_refused_not_used() {
        let bytes = encode_full(1, &keys(1000, 4)).expect("encode").to_vec();
        // Segment length field (after header, count and seed): not a power of two.
        let mut bad = bytes.clone();
        bad[HEADER + 12..HEADER + 16].copy_from_slice(&3u32.to_be_bytes());
        assert_eq!(decode(&bad).err(), Some(SummaryError::Filter));
        // Fewer fingerprints than the descriptor needs.
        let mut short = bytes.clone();
        let n_at = HEADER + 24;
        let n = u32::from_be_bytes(short[n_at..n_at + 4].try_into().expect("4"));
        short[n_at..n_at + 4].copy_from_slice(&(n - 1).to_be_bytes());
        short.truncate(short.len() - 2);
        assert_eq!(decode(&short).err(), Some(SummaryError::Filter));
        assert_eq!(decode(&bytes[..bytes.len() - 1]).err(), Some(SummaryError::Truncated));
        assert_eq!(decode(b"LNCX").err(), Some(SummaryError::Magic));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn a_mangled_summary_never_panics_a_reader(at in 0usize..200, byte in any::<u8>(), probe in any::<u64>()) {
            let mut bytes = encode_full(1, &keys(50, 5)).expect("encode").to_vec();
            let at = at % bytes.len();
            bytes[at] = byte;
            if let Ok(Summary::Full { filter, .. }) = decode(&bytes) {
                let _ = may_contain(filter.as_ref(), probe);
            }
        }
    }
}
