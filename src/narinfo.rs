//! Narinfo files and the names inside them: store path hashes, NAR hashes, signing keys.
//!
//! Everything here is pure (no I/O) and parses at the edge into newtypes, so the rest of the
//! crate never handles an unchecked hash or path string. The one invariant this module keeps:
//! [`TrustedKeys::verify`] returns true only for an ed25519 signature by a trusted key over the
//! exact fingerprint `1;<path>;<narHash>;<narSize>;<sorted full references>` that Nix signs.

use std::fmt;

use data_encoding::{BASE64, HEXLOWER_PERMISSIVE};

mod keys;
pub use keys::{fingerprint, PublicKey, SecretKey, TrustedKeys};

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

fn check_basename(base: &str) -> Result<(), ()> {
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

/// How a binary cache compressed a NAR (the narinfo's `Compression:` field).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum Compression {
    None,
    Xz,
    Zstd,
    /// Also what Nix reads when the field is absent.
    #[default]
    Bzip2,
    /// Valid for Nix (`br`, `gzip`, `lz4`...) but not decoded here.
    Other(String),
}

impl Compression {
    pub fn parse(s: &str) -> Self {
        match s {
            "none" => Self::None,
            "xz" => Self::Xz,
            "zstd" => Self::Zstd,
            "bzip2" => Self::Bzip2,
            other => Self::Other(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::None => "none",
            Self::Xz => "xz",
            Self::Zstd => "zstd",
            Self::Bzip2 => "bzip2",
            Self::Other(s) => s,
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One narinfo, as served by a binary cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NarInfo {
    pub store_path: StorePath,
    /// Where the (possibly compressed) NAR is, relative to the cache root or absolute.
    pub url: String,
    /// An absent field is read as bzip2, as Nix does.
    pub compression: Compression,
    pub file_hash: Option<String>,
    pub file_size: Option<u64>,
    pub nar_hash: NarHash,
    pub nar_size: u64,
    pub references: Vec<StorePath>,
    pub deriver: Option<String>,
    pub sigs: Vec<String>,
    pub ca: Option<String>,
}

impl NarInfo {
    /// Parses narinfo text. Strict where it matters for trust (duplicates, sizes, hashes, paths),
    /// lenient where Nix is (unknown fields are ignored).
    pub fn parse(store_dir: &str, text: &str) -> Result<Self, ParseError> {
        if text.len() > MAX_NARINFO_BYTES {
            return Err(ParseError::TooLarge(text.len()));
        }
        #[derive(Default)]
        struct Raw<'a> {
            store_path: Option<&'a str>,
            url: Option<&'a str>,
            compression: Option<&'a str>,
            file_hash: Option<&'a str>,
            file_size: Option<&'a str>,
            nar_hash: Option<&'a str>,
            nar_size: Option<&'a str>,
            references: Option<&'a str>,
            deriver: Option<&'a str>,
            ca: Option<&'a str>,
        }
        let mut raw = Raw::default();
        let mut sigs = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.is_empty() {
                continue;
            }
            let (key, value) = line
                .split_once(": ")
                .or_else(|| line.split_once(':').map(|(k, v)| (k, v.trim_start())))
                .ok_or(ParseError::Line(i + 1))?;
            let slot = match key {
                "StorePath" => (&mut raw.store_path, "StorePath"),
                "URL" => (&mut raw.url, "URL"),
                "Compression" => (&mut raw.compression, "Compression"),
                "FileHash" => (&mut raw.file_hash, "FileHash"),
                "FileSize" => (&mut raw.file_size, "FileSize"),
                "NarHash" => (&mut raw.nar_hash, "NarHash"),
                "NarSize" => (&mut raw.nar_size, "NarSize"),
                "References" => (&mut raw.references, "References"),
                "Deriver" => (&mut raw.deriver, "Deriver"),
                "CA" => (&mut raw.ca, "CA"),
                "Sig" => {
                    sigs.push(value.to_owned());
                    continue;
                }
                _ => continue,
            };
            if slot.0.replace(value).is_some() {
                return Err(ParseError::Duplicate(slot.1));
            }
        }
        let bad = |field: &'static str, value: &str| ParseError::Value {
            field,
            value: truncate_for_error(value),
        };
        let store_path = StorePath::parse(store_dir, raw.store_path.ok_or(ParseError::Missing("StorePath"))?)?;
        let url = raw.url.ok_or(ParseError::Missing("URL"))?;
        if url.is_empty() {
            return Err(bad("URL", url));
        }
        let nar_hash = NarHash::parse(raw.nar_hash.ok_or(ParseError::Missing("NarHash"))?)?;
        let nar_size_s = raw.nar_size.ok_or(ParseError::Missing("NarSize"))?;
        let nar_size: u64 = nar_size_s.parse().map_err(|_| bad("NarSize", nar_size_s))?;
        if nar_size == 0 {
            return Err(bad("NarSize", nar_size_s));
        }
        let file_size = raw
            .file_size
            .map(|s| s.parse::<u64>().map_err(|_| bad("FileSize", s)))
            .transpose()?;
        let references = raw
            .references
            .unwrap_or("")
            .split(' ')
            .filter(|r| !r.is_empty())
            .map(|r| StorePath::from_basename(store_dir, r))
            .collect::<Result<Vec<_>, _>>()?;
        let deriver = match raw.deriver {
            None | Some("") | Some("unknown-deriver") => None,
            Some(d) => {
                check_basename(d).map_err(|_| bad("Deriver", d))?;
                Some(d.to_owned())
            }
        };
        Ok(Self {
            store_path,
            url: url.to_owned(),
            compression: raw.compression.map(Compression::parse).unwrap_or_default(),
            file_hash: raw.file_hash.map(str::to_owned),
            file_size,
            nar_hash,
            nar_size,
            references,
            deriver,
            sigs,
            ca: raw.ca.filter(|c| !c.is_empty()).map(str::to_owned),
        })
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(&self.store_path, &self.nar_hash, self.nar_size, &self.references)
    }

    /// Roughly the heap memory this narinfo holds, for the caches that keep many of them.
    pub fn approx_bytes(&self) -> usize {
        const FIXED: usize = 256;
        FIXED
            + self.store_path.as_str().len()
            + self.url.len()
            + self.references.iter().map(|r| r.as_str().len() + 24).sum::<usize>()
            + self.sigs.iter().map(|s| s.len() + 24).sum::<usize>()
            + self.deriver.as_ref().map_or(0, String::len)
            + self.ca.as_ref().map_or(0, String::len)
            + self.file_hash.as_ref().map_or(0, String::len)
    }

    /// True when a signature on this narinfo verifies against `keys`.
    pub fn is_trusted(&self, keys: &TrustedKeys) -> bool {
        keys.verify(&self.fingerprint(), self.sigs.iter().map(String::as_str))
    }

    /// Renders the narinfo text (fields in Nix's order; `Compression` always written, since a
    /// missing one means bzip2 to Nix).
    pub fn render(&self) -> String {
        use fmt::Write;
        let mut s = String::with_capacity(256 + 64 * self.references.len());
        let _ = writeln!(s, "StorePath: {}", self.store_path);
        let _ = writeln!(s, "URL: {}", self.url);
        let _ = writeln!(s, "Compression: {}", self.compression);
        if let Some(h) = &self.file_hash {
            let _ = writeln!(s, "FileHash: {h}");
        }
        if let Some(n) = self.file_size {
            let _ = writeln!(s, "FileSize: {n}");
        }
        let _ = writeln!(s, "NarHash: {}", self.nar_hash);
        let _ = writeln!(s, "NarSize: {}", self.nar_size);
        let refs: Vec<&str> = self.references.iter().map(StorePath::basename).collect();
        let _ = writeln!(s, "References: {}", refs.join(" "));
        if let Some(d) = &self.deriver {
            let _ = writeln!(s, "Deriver: {d}");
        }
        for sig in &self.sigs {
            let _ = writeln!(s, "Sig: {sig}");
        }
        if let Some(ca) = &self.ca {
            let _ = writeln!(s, "CA: {ca}");
        }
        s
    }
}

/// Error messages quote input, but never more than a line's worth of it.
fn truncate_for_error(s: &str) -> String {
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

#[cfg(test)]
mod tests;
