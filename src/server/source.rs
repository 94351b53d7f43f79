//! This project's own source, embedded at build time by `build.rs`, for NixOS newcomers: a peer
//! serves it at `GET /install/source.tar`, and the install script's NixOS path prints a module
//! snippet that fetches it with `builtins.fetchTarball` and imports `nixos/module.nix`.
//! Invariant: [`NAR_HASH`] is the NAR hash of exactly the tree [`TARBALL`] unpacks to (both made
//! from one tree in `build.rs`), so the snippet's `sha256` is the one Nix computes.

/// Plain ustar archive with one top directory, `local-nix-cache-VERSION/` (about 1.4 MB). A
/// `static`, so the binary holds it once: as a `const` every function using it (the store
/// server's answer, built for both request types, hyper's and the raw path's) had its own copy.
pub static TARBALL: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/source.tar"));
/// sha256 NAR hash (nix32) of the unpacked top directory: `builtins.fetchTarball`'s `sha256`.
pub const NAR_HASH: &str = include_str!(concat!(env!("OUT_DIR"), "/source.narhash"));
/// [`NAR_HASH`] as flakes write it: `sha256-<base64>` (SRI).
pub const NAR_HASH_SRI: &str = include_str!(concat!(env!("OUT_DIR"), "/source.sri"));
