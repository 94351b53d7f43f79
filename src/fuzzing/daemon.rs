//! Invariants of the nix-daemon protocol decoder, run on an in-memory stream.
//!
//! Input: a mode byte, then bytes. Mode bit 0 clear: the bytes are all the daemon says (after
//! the handshake, the three operations bits 1-6 pick run one after another): the decoder never
//! panics, ends on any input, never decodes more than it was given (strings, lists, NAR bytes),
//! and after any error the connection is broken and refuses the next operation. Mode bit 0 set:
//! the bytes pick a daemon version, log messages and a path info, which are written as a daemon
//! of that version would and must decode to the same path info.

use std::io::Cursor;
use std::time::Duration;

use crate::store::daemon::{DaemonConnection, RawPathInfo, CLIENT_VERSION};
use crate::store::nar::NarFramer;

thread_local! {
    /// One current-thread runtime per thread (the timeouts need a timer; the stream never waits).
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime");
}

async fn connect(stream: Vec<u8>) -> Result<DaemonConnection, crate::store::Error> {
    DaemonConnection::handshake(Box::pin(Cursor::new(stream)), Box::pin(tokio::io::sink()), None).await
}

pub fn check(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    RUNTIME.with(|rt| {
        if mode & 1 == 0 {
            rt.block_on(raw(mode, rest));
        } else {
            rt.block_on(round_trip(rest));
        }
    });
}

/// After an error: broken, and the next operation is refused without reading.
async fn after_error(c: &mut DaemonConnection) {
    assert!(c.is_broken(), "an error left the connection usable");
    assert!(
        c.is_valid_path("/nix/store/x".into()).await.is_err(),
        "a broken connection was used"
    );
}

async fn raw(mode: u8, stream: &[u8]) {
    let n = stream.len();
    let Ok(mut c) = connect(stream.to_vec()).await else {
        return;
    };
    assert!(c.minor() <= CLIENT_VERSION & 0xff);
    assert!(c.daemon_features.iter().map(|f| 8 + f.len()).sum::<usize>() <= n);
    assert!(c.daemon_version.as_ref().map_or(0, String::len) <= n);
    assert!(!c.is_broken());
    for op in 0..3 {
        let ok = match (mode >> (1 + 2 * op)) & 3 {
            0 => match c.query_path_info("/nix/store/x".into()).await {
                Ok(Some(info)) => {
                    let strings = [&info.deriver, &info.nar_hash, &info.ca]
                        .into_iter()
                        .chain(&info.references)
                        .chain(&info.sigs);
                    assert!(
                        strings.map(|s| 8 + s.len()).sum::<usize>() <= n,
                        "decoded more than given"
                    );
                    true
                }
                Ok(None) => true,
                Err(_) => false,
            },
            1 => c
                .query_path_from_hash_part("x".into())
                .await
                .map(|p| {
                    assert!(p.map_or(0, |p| p.len()) <= n);
                })
                .is_ok(),
            2 => c
                .query_all_valid_paths()
                .await
                .map(|ps| {
                    assert!(
                        ps.iter().map(|p| 8 + p.len()).sum::<usize>() <= n,
                        "decoded more than given"
                    );
                })
                .is_ok(),
            _ => nar(&mut c, n).await,
        };
        if !ok {
            return after_error(&mut c).await;
        }
    }
}

/// Starts a NAR and reads it to its end or an error: never more bytes than given, always ends.
async fn nar(c: &mut DaemonConnection, n: usize) -> bool {
    if c.start_nar_from_path("/nix/store/x".into()).await.is_err() {
        return false;
    }
    let mut framer = NarFramer::new();
    let mut got = 0;
    // Every chunk but the last (None) holds at least one byte.
    for _ in 0..n + 2 {
        match c.read_nar_chunk(&mut framer, Duration::from_secs(1)).await {
            Ok(Some(chunk)) => {
                assert!(!chunk.is_empty(), "an empty chunk");
                got += chunk.len();
                assert!(got <= n, "more NAR than given");
                assert_eq!(framer.bytes_seen() as usize, got);
            }
            Ok(None) => {
                assert!(framer.is_done());
                assert!(!c.is_broken(), "a whole NAR left the connection broken");
                return true;
            }
            Err(_) => return false,
        }
    }
    panic!("the NAR never ended on {n} bytes");
}

/// Reads the fuzz bytes as choices.
struct Choices<'a>(&'a [u8]);

impl Choices<'_> {
    fn byte(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }
    fn u64(&mut self) -> u64 {
        (0..8).fold(0, |acc, _| (acc << 8) | u64::from(self.byte()))
    }
    /// A string of up to 40 bytes (any UTF-8 text the bytes make).
    fn string(&mut self) -> String {
        let len = (self.byte() % 41) as usize;
        let (s, rest) = self.0.split_at(len.min(self.0.len()));
        self.0 = rest;
        String::from_utf8_lossy(s).into_owned()
    }
    fn strings(&mut self) -> Vec<String> {
        (0..self.byte() % 5).map(|_| self.string()).collect()
    }
}

/// What a daemon writes.
#[derive(Default)]
pub(super) struct Daemon(pub(super) Vec<u8>);

impl Daemon {
    pub(super) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn string(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
        self.0.resize(self.0.len() + (8 - s.len() % 8) % 8, 0);
    }
    pub(super) fn strings(&mut self, v: &[String]) {
        self.u64(v.len() as u64);
        v.iter().for_each(|s| self.string(s));
    }
    /// Log messages the client reads past, then the end of them.
    fn logs(&mut self, ch: &mut Choices) {
        for _ in 0..ch.byte() % 4 {
            match ch.byte() % 3 {
                0 => {
                    self.u64(0x6f6c_6d67); // STDERR_NEXT
                    self.string(&ch.string());
                }
                1 => {
                    self.u64(0x5354_5254); // STDERR_START_ACTIVITY
                    (0..3).for_each(|_| self.u64(ch.u64()));
                    self.string(&ch.string());
                    self.u64(2);
                    self.u64(0);
                    self.u64(ch.u64());
                    self.u64(1);
                    self.string(&ch.string());
                    self.u64(ch.u64());
                }
                _ => {
                    self.u64(0x5354_4f50); // STDERR_STOP_ACTIVITY
                    self.u64(ch.u64());
                }
            }
        }
        self.u64(0x616c_7473); // STDERR_LAST
    }
}

/// A daemon of a version the bytes pick answers a path info query: the client reads exactly it.
async fn round_trip(data: &[u8]) {
    let mut ch = Choices(data);
    let minor = 21 + u64::from(ch.byte() % 20);
    let mut d = Daemon::default();
    d.u64(0x6478_696f); // WORKER_MAGIC_2
    d.u64((1 << 8) | minor);
    let used = minor.min(CLIENT_VERSION & 0xff);
    let features = ch.strings();
    if used >= 38 {
        d.strings(&features);
    }
    let version = ch.string();
    if used >= 33 {
        d.string(&version);
    }
    if used >= 35 {
        d.u64(1);
    }
    d.logs(&mut ch);
    let want = RawPathInfo {
        deriver: ch.string(),
        nar_hash: ch.string(),
        references: ch.strings(),
        registration_time: ch.u64(),
        nar_size: ch.u64(),
        sigs: if used >= 16 { ch.strings() } else { Vec::new() },
        ca: if used >= 16 { ch.string() } else { String::new() },
    };
    let valid = ch.byte() % 2 == 1 || used < 17;
    d.logs(&mut ch);
    if used >= 17 {
        d.u64(u64::from(valid));
    }
    if valid {
        d.string(&want.deriver);
        d.string(&want.nar_hash);
        d.strings(&want.references);
        d.u64(want.registration_time);
        d.u64(want.nar_size);
        if used >= 16 {
            d.u64(0);
            d.strings(&want.sigs);
            d.string(&want.ca);
        }
    }
    let mut c = connect(d.0).await.expect("an honest daemon's handshake");
    assert_eq!(c.minor(), used);
    assert_eq!(c.daemon_version, (used >= 33).then_some(version));
    assert_eq!(c.daemon_features, if used >= 38 { features } else { Vec::new() });
    let got = c
        .query_path_info("/nix/store/x".into())
        .await
        .expect("an honest answer");
    assert_eq!(got, valid.then_some(want));
    assert!(!c.is_broken());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The raw seeds are whole conversations: each operation succeeds, so mutations start deep.
    #[test]
    fn the_raw_seeds_get_through_every_operation() {
        let seeds = crate::fuzzing::seeds(crate::fuzzing::Target::Daemon);
        RUNTIME.with(|rt| {
            rt.block_on(async {
                let mut c = connect(seeds[0][1..].to_vec()).await.expect("handshake");
                let info = c.query_path_info("/nix/store/x".into()).await.expect("path info");
                assert_eq!(info.map(|i| i.nar_size), Some(528));
                assert!(c
                    .query_path_from_hash_part("x".into())
                    .await
                    .expect("hash part")
                    .is_some());
                assert_eq!(c.query_all_valid_paths().await.expect("all").len(), 1);
                let mut c = connect(seeds[1][1..].to_vec()).await.expect("handshake");
                assert!(nar(&mut c, seeds[1].len()).await, "the NAR seed reads whole");
            })
        });
    }
}
