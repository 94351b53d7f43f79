//! Signing keys and the fingerprint Nix signs: who may vouch for a path.
//!
//! Invariant: [`TrustedKeys::verify`] returns true only for an ed25519 signature by a trusted key
//! over the exact fingerprint `1;<path>;<narHash>;<narSize>;<sorted full references>`.

use std::collections::BTreeSet;
use std::fmt;

use data_encoding::BASE64;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

use super::path::{truncate_for_error, NarHash, ParseError, StorePath};

/// The fingerprint Nix signs: `1;<path>;<narHash>;<narSize>;<refs>`, references as full paths,
/// sorted, comma-joined.
pub fn fingerprint(path: &StorePath, nar_hash: &NarHash, nar_size: u64, references: &[StorePath]) -> String {
    let refs: BTreeSet<&str> = references.iter().map(StorePath::as_str).collect();
    let refs: Vec<&str> = refs.into_iter().collect();
    format!("1;{path};{nar_hash};{nar_size};{}", refs.join(","))
}

fn split_key(s: &str, len: usize) -> Result<(&str, Vec<u8>), ParseError> {
    let err = || ParseError::Key(truncate_for_error(s), len);
    let (name, b64) = s.trim().split_once(':').ok_or_else(err)?;
    if name.is_empty() {
        return Err(err());
    }
    let bytes = BASE64.decode(b64.as_bytes()).map_err(|_| err())?;
    if bytes.len() != len {
        return Err(err());
    }
    Ok((name, bytes))
}

/// A public key Nix style: `name:base64(32 bytes)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey {
    pub name: String,
    key: VerifyingKey,
}

impl PublicKey {
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let (name, bytes) = split_key(s, 32)?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| ParseError::Key(truncate_for_error(s), 32))?;
        let key = VerifyingKey::from_bytes(&arr).map_err(|_| ParseError::Key(truncate_for_error(s), 32))?;
        Ok(Self {
            name: name.to_owned(),
            key,
        })
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, BASE64.encode(self.key.as_bytes()))
    }
}

/// A secret key as `nix-store --generate-binary-cache-key` writes it: `name:base64(64 bytes)`.
/// Used by tests and test peers; the daemon itself never signs.
pub struct SecretKey {
    pub name: String,
    key: SigningKey,
}

impl SecretKey {
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let (name, bytes) = split_key(s, 64)?;
        let arr: [u8; 64] = bytes
            .try_into()
            .map_err(|_| ParseError::Key(truncate_for_error(s), 64))?;
        let key = SigningKey::from_keypair_bytes(&arr).map_err(|_| ParseError::Key(truncate_for_error(s), 64))?;
        Ok(Self {
            name: name.to_owned(),
            key,
        })
    }

    /// A key from a 32-byte seed (tests and test peers make throwaway keys with it).
    pub fn from_seed(name: &str, seed: [u8; 32]) -> Self {
        Self {
            name: name.to_owned(),
            key: SigningKey::from_bytes(&seed),
        }
    }

    pub fn public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// A `name:base64` signature over `fingerprint`.
    pub fn sign(&self, fingerprint: &str) -> String {
        let sig = self.key.sign(fingerprint.as_bytes());
        format!("{}:{}", self.name, BASE64.encode(&sig.to_bytes()))
    }
}

/// The keys whose signatures make a path servable (store server) or acceptable (proxy).
#[derive(Clone, Debug, Default)]
pub struct TrustedKeys {
    keys: Vec<PublicKey>,
}

impl TrustedKeys {
    pub fn new(keys: Vec<PublicKey>) -> Self {
        Self { keys }
    }

    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    /// True when at least one of `sigs` (`name:base64`) is a valid signature of `fingerprint` by a
    /// trusted key of that name. Malformed signatures are ignored, not errors: a path may carry
    /// signatures by keys we know nothing of.
    pub fn verify<'a>(&self, fingerprint: &str, sigs: impl IntoIterator<Item = &'a str>) -> bool {
        sigs.into_iter().any(|sig| {
            let Some((name, b64)) = sig.split_once(':') else {
                return false;
            };
            let Some(key) = self.keys.iter().find(|k| k.name == name) else {
                return false;
            };
            let Ok(bytes) = BASE64.decode(b64.as_bytes()) else {
                return false;
            };
            let Ok(sig) = ed25519_dalek::Signature::from_slice(&bytes) else {
                return false;
            };
            key.key.verify_strict(fingerprint.as_bytes(), &sig).is_ok()
        })
    }
}
