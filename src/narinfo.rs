//! Narinfo files and the names inside them: store path hashes, NAR hashes, signing keys.
//!
//! Everything here is pure (no I/O) and parses at the edge into newtypes, so the rest of the
//! crate never handles an unchecked hash or path string. The one invariant this module keeps:
//! [`TrustedKeys::verify`] returns true only for an ed25519 signature by a trusted key over the
//! exact fingerprint `1;<path>;<narHash>;<narSize>;<sorted full references>` that Nix signs.

use std::fmt;

mod keys;
mod path;
pub use keys::{fingerprint, PublicKey, SecretKey, TrustedKeys};
use path::{check_basename, truncate_for_error};
pub use path::{NarHash, ParseError, StorePath, StorePathHash, MAX_NARINFO_BYTES, STORE_HASH_LEN};

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
    /// lenient where Nix is (unknown fields are ignored). Round trip: for any text that parses,
    /// `parse(render(info)) == info` (values keep every byte but `\n`, including a trailing `\r`).
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
        // Lines end at `\n` only, as Nix reads them: a `\r` before it is part of the value
        // (`str::lines` would drop one, so a value ending in `\r` would not survive a render
        // and parse, and the proxy re-renders what it parsed for Nix).
        for (i, line) in text.split('\n').enumerate() {
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

#[cfg(test)]
mod tests;
