//! Invariants of the pure codecs: beacon datagrams, the NAR framer, content summaries, narinfo
//! and the config file.

use std::path::Path;
use std::sync::OnceLock;

use crate::beacon::wire::{self, decode, encode};
use crate::narinfo::NarInfo;
use crate::store::nar::{NarFramer, Progress};
use crate::summary::{self, Summary};

/// Any datagram: decoding never panics; whatever decodes re-encodes within a datagram's size to
/// something that decodes to the same beacon; the signature extension is read within bounds.
pub fn beacon_decode(data: &[u8]) {
    let _ = wire::signature(data);
    if let Ok(b) = decode(data) {
        let bytes = encode(&b);
        assert!(bytes.len() <= wire::MAX_DATAGRAM, "re-encoded to {} bytes", bytes.len());
        let again = decode(&bytes).expect("the canonical encoding decodes");
        assert_eq!(again, b);
    }
}

/// Any byte stream, in two chunks: the framer never reports an end beyond its input, and counts
/// exactly the bytes it consumed.
pub fn nar_framer(data: &[u8]) {
    let split = data.first().map_or(0, |b| *b as usize).min(data.len());
    let mut f = NarFramer::new();
    let mut seen = 0;
    for part in [&data[..split], &data[split..]] {
        match f.feed(part) {
            Ok(Progress::NeedMore) => {
                seen += part.len();
                assert!(!f.is_done(), "done without saying so");
                assert_eq!(f.bytes_seen() as usize, seen);
            }
            Ok(Progress::Done { consumed }) => {
                assert!(consumed <= part.len());
                assert!(f.is_done());
                assert_eq!(f.bytes_seen() as usize, seen + consumed);
                return;
            }
            Err(_) => return,
        }
    }
}

/// Up to 64 distinct keys read from `data`, 8 bytes each.
fn keys_of(data: &[u8]) -> Vec<u64> {
    let mut keys: Vec<u64> = data
        .chunks_exact(8)
        .take(64)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// Any bytes as a summary: decoding never panics, holds no more than the input's size, and a
/// decoded filter answers any key without panicking (its descriptor keeps lookups in bounds).
/// Any keys through encode and decode: a full summary holds every key (no false negatives) at
/// its version, a delta gives back its keys.
pub fn summary(data: &[u8]) {
    match summary::decode(data) {
        Ok(Summary::Full { filter, .. }) => {
            if let Some(f) = &filter {
                assert!(2 * f.fingerprints.len() <= data.len(), "more fingerprints than bytes");
            }
            for k in keys_of(data).into_iter().chain([0, u64::MAX]) {
                let _ = summary::may_contain(filter.as_ref(), k);
            }
        }
        Ok(Summary::Delta { keys, .. }) => {
            assert!(keys.len() <= summary::MAX_DELTA_KEYS);
            assert!(8 * keys.len() <= data.len(), "more keys than bytes");
        }
        Err(_) => {}
    }
    let keys = keys_of(data);
    let version = keys.first().copied().unwrap_or(0);
    let bytes = summary::encode_full(version, &keys).expect("64 distinct keys encode");
    match summary::decode(&bytes) {
        Ok(Summary::Full { version: v, filter }) => {
            assert_eq!(v, version);
            assert_eq!(filter.is_none(), keys.is_empty());
            for k in &keys {
                assert!(summary::may_contain(filter.as_ref(), *k), "key {k:#x} lost");
            }
        }
        other => panic!("a full summary decoded as {other:?}"),
    }
    let delta = summary::decode(&summary::encode_delta(version / 2, version, &keys));
    match delta {
        Ok(Summary::Delta {
            from,
            version: v,
            keys: got,
        }) => {
            assert_eq!((from, v, &got), (version / 2, version, &keys));
        }
        other => panic!("a delta decoded as {other:?}"),
    }
}

const STORE: &str = "/nix/store";

/// Any text as narinfo: whatever parses renders to text that parses to the same narinfo (the
/// proxy re-renders what it parsed for Nix), and its size estimate covers its values.
pub fn narinfo(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(info) = NarInfo::parse(STORE, text) {
        let rendered = info.render();
        assert_eq!(
            NarInfo::parse(STORE, &rendered),
            Ok(info.clone()),
            "render: {rendered:?}"
        );
        assert!(info.approx_bytes() >= info.url.len() + info.sigs.iter().map(String::len).sum::<usize>());
        let _ = info.fingerprint();
    }
}

/// `serve`'s clap command, built once.
fn serve_command() -> &'static clap::Command {
    static CMD: OnceLock<clap::Command> = OnceLock::new();
    CMD.get_or_init(|| {
        use clap::CommandFactory;
        crate::cli::Cli::command()
            .find_subcommand("serve")
            .cloned()
            .expect("serve is a subcommand")
    })
}

/// Any text as the config file: a file that passes its checks starts `serve` (its arguments
/// parse into settings together, not only key by key, unless two of them conflict), keys the command line gives are left
/// out, and an error names a line of the file.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let cmd = serve_command();
    let path = Path::new("fuzz.toml");
    match crate::config::to_args(cmd, path, text, &|_| false) {
        Ok(args) => {
            // Flags that exclude each other (`no-beacon` and `peer`) are refused together, by
            // clap, as on the command line; nothing else may be.
            if let Err(e) = crate::cli::serve_settings(args.iter().cloned()) {
                assert_eq!(
                    e.kind(),
                    clap::error::ErrorKind::ArgumentConflict,
                    "the file's arguments {args:?} were each accepted but not together: {e}"
                );
            }
            let none = crate::config::to_args(cmd, path, text, &|_| true).expect("the same file");
            assert!(none.is_empty(), "given on the command line, yet {none:?}");
        }
        Err(crate::config::ConfigError::Value { line, .. }) => {
            let lines = text.split('\n').count();
            assert!((1..=lines).contains(&line), "line {line} of a file of {lines}");
        }
        Err(_) => {}
    }
}
