//! The names a narinfo holds, parsed at the edge: [`StorePathHash`], [`StorePath`], [`NarHash`],
//! and [`ParseError`], why one was rejected. Pure; a leaf of `narinfo` (and of `keys`).

use std::fmt;

use data_encoding::{BASE64, HEXLOWER_PERMISSIVE};

/// Nix's base-32 alphabet (no `e`, `o`, `u`, `t`).
const NIX32_ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";
/// Length of the hash part of a store path (160 bits in nix32).
pub const STORE_HASH_LEN: usize = 32;
/// Length of a sha256 digest in nix32.
const SHA256_NIX32_LEN: usize = 52;
/// Longest store path name Nix accepts.
const MAX_NAME_LEN: usize = 211;
/// A narinfo larger than this is rejected before parsing (a big closure's References line is
/// tens of KiB; nothing legitimate comes close).
pub const MAX_NARINFO_BYTES: usize = 512 * 1024;

/// Why a narinfo, hash, path or key was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("store path hash {0:?} is not 32 nix32 characters")]
    StoreHash(String),
    #[error("store path {0:?} is not <store dir>/<hash>-<name>")]
    StorePath(String),
    #[error("NAR hash {0:?} is not a sha256 in nix32, base16 or SRI form")]
    NarHash(String),
    #[error("key {0:?} is not <name>:<base64 of {1} bytes>")]
    Key(String, usize),
    #[error("narinfo is {0} bytes, more than the {MAX_NARINFO_BYTES} allowed")]
    TooLarge(usize),
    #[error("narinfo line {0} has no ': ' separator")]
    Line(usize),
    #[error("narinfo field {0} appears twice")]
    Duplicate(&'static str),
    #[error("narinfo field {0} is missing")]
    Missing(&'static str),
    #[error("narinfo field {field} has a bad value {value:?}")]
    Value { field: &'static str, value: String },
}

/// The hash part of a store path: 32 characters of the nix32 alphabet.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePathHash([u8; STORE_HASH_LEN]);

impl StorePathHash {
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let b = s.as_bytes();
        if b.len() != STORE_HASH_LEN || !b.iter().all(|c| NIX32_ALPHABET.contains(c)) {
            return Err(ParseError::StoreHash(truncate_for_error(s)));
        }
        let mut out = [0u8; STORE_HASH_LEN];
        out.copy_from_slice(b);
        Ok(Self(out))
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII from the nix32 alphabet is ever stored.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl fmt::Display for StorePathHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for StorePathHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePathHash({})", self.as_str())
    }
}

/// A full store path (`/nix/store/<hash>-<name>`), checked.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    /// The full path as Nix prints it; fingerprints are over this string.
    full: String,
    /// Byte offset where the basename (`<hash>-<name>`) starts.
    base_start: usize,
}

impl StorePath {
    /// Parses a full path that must live directly in `store_dir`.
    pub fn parse(store_dir: &str, s: &str) -> Result<Self, ParseError> {
        let err = || ParseError::StorePath(truncate_for_error(s));
        let base = s
            .strip_prefix(store_dir)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(err)?;
        check_basename(base).map_err(|_| err())?;
        Ok(Self {
            full: s.to_owned(),
            base_start: s.len() - base.len(),
        })
    }

    /// Parses a basename (`<hash>-<name>`) and places it in `store_dir`.
    pub fn from_basename(store_dir: &str, base: &str) -> Result<Self, ParseError> {
        check_basename(base).map_err(|_| ParseError::StorePath(truncate_for_error(base)))?;
        Ok(Self {
            full: format!("{store_dir}/{base}"),
            base_start: store_dir.len() + 1,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.full
    }

    pub fn basename(&self) -> &str {
        &self.full[self.base_start..]
    }

    pub fn hash(&self) -> StorePathHash {
        let mut out = [0u8; STORE_HASH_LEN];
        out.copy_from_slice(&self.basename().as_bytes()[..STORE_HASH_LEN]);
        StorePathHash(out)
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({})", self.full)
    }
}

pub(super) fn check_basename(base: &str) -> Result<(), ()> {
    let (hash, name) = (base.get(..STORE_HASH_LEN).ok_or(())?, &base[STORE_HASH_LEN..]);
    StorePathHash::parse(hash).map_err(|_| ())?;
    let name = name.strip_prefix('-').ok_or(())?;
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "+-._?=".contains(c);
    if name.is_empty() || name.len() > MAX_NAME_LEN || name.starts_with('.') || !name.chars().all(ok_char) {
        return Err(());
    }
    Ok(())
}

/// The sha256 of a NAR, the hash that signatures cover.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct NarHash([u8; 32]);

impl NarHash {
    pub fn from_digest(d: [u8; 32]) -> Self {
        Self(d)
    }

    pub fn digest(&self) -> &[u8; 32] {
        &self.0
    }

    /// Accepts `sha256:<nix32>`, `sha256:<base16>`, `sha256-<base64>` (SRI) and bare base16 (as
    /// the nix-daemon sends it).
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let err = || ParseError::NarHash(truncate_for_error(s));
        let bytes = if let Some(rest) = s.strip_prefix("sha256:") {
            match rest.len() {
                SHA256_NIX32_LEN => nix_base32::from_nix_base32(rest),
                64 => HEXLOWER_PERMISSIVE.decode(rest.as_bytes()).ok(),
                _ => None,
            }
        } else if let Some(rest) = s.strip_prefix("sha256-") {
            BASE64.decode(rest.as_bytes()).ok()
        } else if s.len() == 64 {
            HEXLOWER_PERMISSIVE.decode(s.as_bytes()).ok()
        } else {
            None
        };
        let bytes = bytes.ok_or_else(err)?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| err())?;
        Ok(Self(arr))
    }

    /// Just the nix32 digest (52 characters), as used in URLs.
    pub fn to_nix32(&self) -> String {
        nix_base32::to_nix_base32(&self.0)
    }

    /// Parses just a nix32 digest (52 characters), as found in URLs.
    pub fn parse_nix32(s: &str) -> Result<Self, ParseError> {
        if s.len() != SHA256_NIX32_LEN || !s.bytes().all(|c| NIX32_ALPHABET.contains(&c)) {
            return Err(ParseError::NarHash(truncate_for_error(s)));
        }
        Self::parse(&format!("sha256:{s}"))
    }
}

impl fmt::Display for NarHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_nix32())
    }
}

impl fmt::Debug for NarHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NarHash({self})")
    }
}

/// Error messages quote input, but never more than a line's worth of it.
pub(super) fn truncate_for_error(s: &str) -> String {
    const MAX: usize = 120;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}
