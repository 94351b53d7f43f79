//! Embeds this project's own source in the binary, so a peer can hand it to a NixOS newcomer
//! (`GET /install/source.tar`, see src/server/source.rs): a plain ustar archive of the files a
//! Nix build needs, under one top directory, and the sha256 NAR hash (nix32) of that directory as
//! `builtins.fetchTarball` computes it after unpacking (the `sha256` a NixOS module snippet
//! needs). Both come from one in-memory tree, so they always agree.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Files and directories (recursively) that make up the buildable source.
const SOURCES: &[&str] = &[
    "Cargo.toml",
    "Cargo.lock",
    "build.rs",
    "rustfmt.toml",
    "README.md",
    "default.nix",
    "flake.nix",
    "flake.lock",
    "nixos",
    "src",
];

/// One file of the tree: its bytes and whether it is executable.
struct File {
    data: Vec<u8>,
    executable: bool,
}

enum Node {
    File(File),
    Dir(BTreeMap<String, Node>),
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let mut tree = BTreeMap::new();
    for s in SOURCES {
        println!("cargo:rerun-if-changed={s}");
        let p = root.join(s);
        if p.exists() {
            tree.insert((*s).to_owned(), read_node(&p));
        }
    }
    let top = format!(
        "local-nix-cache-{}",
        std::env::var("CARGO_PKG_VERSION").expect("version")
    );
    let mut tar = Vec::new();
    tar_dir(&mut tar, &top, &tree);
    tar.extend_from_slice(&[0u8; 1024]);

    let mut nar = Vec::new();
    nar_str(&mut nar, b"nix-archive-1");
    nar_node(&mut nar, &Node::Dir(tree));
    use sha2::Digest;
    let digest = sha2::Sha256::digest(&nar);
    let nix32 = nix_base32::to_nix_base32(&digest);

    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    std::fs::write(out.join("source.tar"), &tar).expect("write source.tar");
    std::fs::write(out.join("source.narhash"), nix32).expect("write source.narhash");
    // The same hash as flakes write it (`narHash=sha256-<base64>`), for the flake-input snippet.
    std::fs::write(out.join("source.sri"), format!("sha256-{}", base64(&digest))).expect("write source.sri");
    std::fs::write(out.join("source.top"), &top).expect("write source.top");
}

/// Standard base64 with padding (RFC 4648), as SRI hashes use.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn read_node(p: &Path) -> Node {
    let meta = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    if meta.is_dir() {
        let mut entries = BTreeMap::new();
        for e in std::fs::read_dir(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())) {
            let e = e.expect("dir entry");
            let name = e.file_name().into_string().expect("UTF-8 file name");
            // Editor leftovers are no part of the source.
            if name.starts_with('.') || name.ends_with('~') {
                continue;
            }
            entries.insert(name, read_node(&e.path()));
        }
        Node::Dir(entries)
    } else if meta.is_file() {
        use std::os::unix::fs::PermissionsExt;
        Node::File(File {
            data: std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
            executable: meta.permissions().mode() & 0o100 != 0,
        })
    } else {
        panic!("{}: only files and directories belong in the source", p.display());
    }
}

fn tar_dir(out: &mut Vec<u8>, path: &str, entries: &BTreeMap<String, Node>) {
    tar_header(out, &format!("{path}/"), 0o755, 0, b'5');
    for (name, node) in entries {
        let p = format!("{path}/{name}");
        match node {
            Node::Dir(d) => tar_dir(out, &p, d),
            Node::File(f) => {
                tar_header(out, &p, if f.executable { 0o755 } else { 0o644 }, f.data.len(), b'0');
                out.extend_from_slice(&f.data);
                out.resize(out.len().div_ceil(512) * 512, 0);
            }
        }
    }
}

/// A ustar header; names up to 100 bytes (ours are short), mtime 0, owner 0.
fn tar_header(out: &mut Vec<u8>, name: &str, mode: u32, size: usize, kind: u8) {
    assert!(name.len() <= 100, "source path too long for a plain tar header: {name}");
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    let octal = |h: &mut [u8; 512], at: usize, width: usize, v: u64| {
        let s = format!("{v:0w$o}", w = width - 1);
        h[at..at + width - 1].copy_from_slice(s.as_bytes());
    };
    octal(&mut h, 100, 8, u64::from(mode));
    octal(&mut h, 108, 8, 0);
    octal(&mut h, 116, 8, 0);
    octal(&mut h, 124, 12, size as u64);
    octal(&mut h, 136, 12, 0);
    h[148..156].copy_from_slice(b"        ");
    h[156] = kind;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    out.extend_from_slice(&h);
}

fn nar_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
    out.resize(out.len().div_ceil(8) * 8, 0);
}

fn nar_node(out: &mut Vec<u8>, node: &Node) {
    nar_str(out, b"(");
    nar_str(out, b"type");
    match node {
        Node::File(f) => {
            nar_str(out, b"regular");
            if f.executable {
                nar_str(out, b"executable");
                nar_str(out, b"");
            }
            nar_str(out, b"contents");
            nar_str(out, &f.data);
        }
        Node::Dir(entries) => {
            nar_str(out, b"directory");
            for (name, child) in entries {
                nar_str(out, b"entry");
                nar_str(out, b"(");
                nar_str(out, b"name");
                nar_str(out, name.as_bytes());
                nar_str(out, b"node");
                nar_node(out, child);
                nar_str(out, b")");
            }
        }
    }
    nar_str(out, b")");
}
