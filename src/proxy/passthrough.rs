//! Pass-through: a proven peer's NAR bytes go to Nix as they arrive, while the fetch still
//! hashes them, except the last [`TAIL`] bytes, which wait until size and hash matched. See
//! `proven` for who qualifies and `docs/security.md` for the trade.
//!
//! The fetch holds a [`Tap`]; the response body is fed by [`forward`]. Invariants: the tap only
//! ever hands over bytes that the fetch then counts into the spool's hash, contiguous from the
//! NAR's start, all from proven peers, and never past `NarSize - TAIL`; the rest of the body
//! comes from the [`Verified`] spool (which need not keep what the tap took: `spool`). When the
//! spool is reset after bytes were handed over (the NAR did not verify: the lie may be in the
//! held-back tail only), the tap records the sha256 of what it handed over and detaches; the
//! fetch goes on verify-first from other sources, and the body is finished from the NAR that
//! then verifies only if that NAR's same prefix has the same hash (issue #25: a tail-only lie
//! failed the build although an honest holder had the path). A prefix that differs, a failed
//! fetch or a NAR that did not verify ends the body early: Nix sees fewer bytes than the
//! `Content-Length` (NarSize) it was promised, fails that substitution, installs nothing and
//! does not resume (no `Accept-Ranges`).
//!
//! Memory: at most [`PASS_CHUNKS`] read chunks (256 KiB each) wait in a tap's channel, and
//! [`BODY_CHUNKS`] in the body's; one pass-through per open proxy connection at most.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::breaker::Grant;
use super::error::CutReason;
use super::spool::Spool;
use super::verified::Verified;

/// Bytes at the end of a NAR that are never sent before the whole NAR verified: a NAR missing
/// its end never parses, and a body that ends short of its `Content-Length` is a failed
/// download for Nix.
pub const TAIL: u64 = 64 * 1024;
/// Read chunks a tap may have handed over that the body has not sent yet.
pub const PASS_CHUNKS: usize = 8;
/// Chunks waiting between the body task and hyper.
pub const BODY_CHUNKS: usize = 4;
/// A tap whose body does not take a chunk for this long is detached (the fetch goes on at full
/// speed; the body gets the rest once the NAR verified).
pub const PASS_STALL: Duration = Duration::from_secs(10);

/// Bytes handed from the fetch to the body, with the NAR's size (for `Content-Length`).
pub struct Piece {
    pub size: u64,
    pub bytes: Bytes,
}

/// Set when the spool was reset after bytes were handed over: how many, and their sha256 (from
/// the spool's own hasher, `Spool::passed_digest`; `None` if it could not tell, and then the
/// body is cut), which the NAR that finally verifies must match before the body gets a byte more.
pub type Recheck = Arc<OnceLock<(u64, Option<[u8; 32]>)>>;

/// The fetch's end of a pass-through.
pub struct Tap {
    /// None once detached (the body left or stalled, or the tap broke): the body's channel
    /// closes and it waits for the fetch's result.
    tx: Option<mpsc::Sender<Piece>>,
    /// Bytes handed over so far (contiguous from 0, all from proven peers). No hash of its own:
    /// the spool hashes every byte anyway (a second sha256 here was a third of the proxy's CPU
    /// in pass-through, issue #27).
    sent: u64,
    recheck: Recheck,
    /// An unseasoned peer's grant to pass through (`breaker`), held while it feeds the tap.
    grant: std::sync::Mutex<Option<Grant>>,
}

/// The body's end of a pass-through.
pub struct TapEnd {
    pub rx: mpsc::Receiver<Piece>,
    /// See [`Recheck`].
    pub recheck: Recheck,
}

impl Tap {
    pub fn new() -> (Tap, TapEnd) {
        let (tx, rx) = mpsc::channel(PASS_CHUNKS);
        let recheck = Arc::new(OnceLock::new());
        (
            Tap {
                tx: Some(tx),
                sent: 0,
                recheck: recheck.clone(),
                grant: std::sync::Mutex::new(None),
            },
            TapEnd { rx, recheck },
        )
    }

    /// Whether a source may go on feeding this tap when the spool holds `spooled` bytes: every
    /// byte spooled so far (up to the held-back tail) was handed over, so nothing from another,
    /// unproven source would be skipped over.
    pub fn continues_at(&self, spooled: u64, size: u64) -> bool {
        self.tx.is_some() && self.sent == spooled.min(size.saturating_sub(TAIL))
    }

    /// `chunk` ends at byte `spooled` of `size` (and goes into the spool next): hands over the
    /// part not yet handed over, short of the tail, and returns how many bytes of it went (all
    /// at the chunk's start). The tap detaches itself when the body left or stalled for
    /// [`PASS_STALL`] (the body then waits for the verified NAR).
    pub async fn offer(&mut self, spooled: u64, size: u64, chunk: &Bytes) -> usize {
        let limit = size.saturating_sub(TAIL);
        let start = spooled.saturating_sub(chunk.len() as u64);
        let upto = spooled.min(limit);
        let Some(tx) = &self.tx else { return 0 };
        if upto <= self.sent {
            return 0;
        }
        if start != self.sent {
            // A gap (cannot happen while `continues_at` is asked first): hand nothing over.
            self.tx = None;
            return 0;
        }
        let bytes = chunk.slice(..(upto - start) as usize);
        let n = bytes.len();
        match tokio::time::timeout(PASS_STALL, tx.send(Piece { size, bytes })).await {
            Ok(Ok(())) => {
                self.sent += n as u64;
                n
            }
            _ => {
                self.tx = None;
                0
            }
        }
    }

    /// Stops handing over bytes (e.g. the next source is not proven); what was handed over stays
    /// good as long as the spool is not reset.
    pub fn detach(&mut self) {
        self.tx = None;
        self.release();
    }

    /// Holds the breaker's grant for the source now feeding the tap (the breaker hook).
    pub fn hold(&self, g: Grant) {
        *self.grant.lock().unwrap_or_else(|p| p.into_inner()) = Some(g);
    }

    /// Gives back the grant held, if any.
    pub fn release(&self) {
        self.grant.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Bytes handed over so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// `sp` is about to be emptied: if any byte was handed over, the tap detaches and records
    /// their hash (the spool's, see [`Recheck`]); the body goes on only once a NAR verified whose
    /// prefix matches it.
    pub async fn spool_reset(&mut self, sp: &mut Spool) {
        if self.sent > 0 {
            let digest = sp.passed_digest(self.sent).await;
            let _ = self.recheck.set((self.sent, digest));
            self.tx = None;
            self.release();
        }
    }
}

/// How a pass-through body ended.
pub enum Outcome {
    /// Every byte sent, the NAR verified.
    Delivered,
    /// Cut short (after `sent` bytes): the NAR did not verify, or no source finished it.
    Cut { sent: u64, why: CutReason },
    /// The client went away after `sent` bytes.
    Left { sent: u64 },
}

/// Ends a pass-through body with an error (hyper then closes the connection short of its
/// `Content-Length`).
async fn cut<T>(sent: u64, why: CutReason, out: mpsc::Sender<std::io::Result<Bytes>>) -> (Outcome, Option<T>) {
    let _ = out.send(Err(std::io::Error::other(format!("NAR cut: {why}")))).await;
    (Outcome::Cut { sent, why }, None)
}

/// Feeds a pass-through body: `first`, the rest of the tap, then (once the fetch delivered a
/// verified NAR, and, when the spool was reset after bytes were handed over, that NAR's prefix
/// matched what was sent) the remainder from the spool. Errors cut the body.
///
/// `done` is the fetch's result (the verified spool and what the caller wants back with a
/// delivered NAR); it is awaited only once the tap is closed, and dropped when the body is cut
/// or left early.
/// `verified` is told once the NAR verified, before its tail is sent.
pub async fn forward<T>(
    first: Piece,
    mut tap: TapEnd,
    done: impl std::future::Future<Output = Result<(Verified, T), CutReason>>,
    verified: impl FnOnce(&T),
    out: mpsc::Sender<std::io::Result<Bytes>>,
) -> (Outcome, Option<T>) {
    let size = first.size;
    let mut sent = first.bytes.len() as u64;
    if out.send(Ok(first.bytes)).await.is_err() {
        return (Outcome::Left { sent: 0 }, None);
    }
    // A client that leaves while nothing is ready to send is noticed at once (its fetch is
    // then aborted with this task's guard), not at the next send.
    loop {
        let p = tokio::select! {
            p = tap.rx.recv() => p,
            () = out.closed() => return (Outcome::Left { sent }, None),
        };
        let Some(p) = p else { break };
        let n = p.bytes.len() as u64;
        if out.send(Ok(p.bytes)).await.is_err() {
            return (Outcome::Left { sent }, None);
        }
        sent += n;
    }
    let done = tokio::select! {
        d = done => d,
        () = out.closed() => return (Outcome::Left { sent }, None),
    };
    let (v, extra) = match done {
        Ok((v, x)) if v.len() == size => (v, x),
        Ok(_) => return cut(sent, CutReason::NotVerified, out).await,
        Err(why) => return cut(sent, why, out).await,
    };
    if let Some((n, digest)) = tap.recheck.get() {
        // The NAR came from elsewhere: what was sent must be its start.
        let Some(digest) = digest else {
            return cut(sent, CutReason::NotVerified, out).await;
        };
        if *n != sent || !prefix_matches(&v, sent, digest).await {
            return cut(sent, CutReason::NotVerified, out).await;
        }
    }
    verified(&extra);
    let mut rest = v.stream(sent, size.saturating_sub(1));
    while let Some(c) = rest.next().await {
        let c = match c {
            Ok(c) => c,
            Err(e) => return cut(sent, CutReason::Spool(Arc::new(e)), out).await,
        };
        let n = c.len() as u64;
        if out.send(Ok(c)).await.is_err() {
            return (Outcome::Left { sent }, None);
        }
        sent += n;
    }
    (Outcome::Delivered, Some(extra))
}

/// Whether the first `n` bytes of `v` hash to `digest`.
async fn prefix_matches(v: &Verified, n: u64, digest: &[u8; 32]) -> bool {
    let mut h = Sha256::new();
    let mut bytes = v.stream(0, n.saturating_sub(1));
    while let Some(c) = bytes.next().await {
        match c {
            Ok(c) => h.update(&c),
            Err(_) => return false,
        }
    }
    <[u8; 32]>::from(h.finalize()) == *digest
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::narinfo::NarHash;
    use crate::proxy::spool::SpoolLimits;

    /// Issue #27: the digest of what a pass-through body took comes from the spool's one hasher
    /// (no second sha256 in the tap): right wherever the passed bytes end (inside a chunk, at a
    /// chunk's end, at a block's end, past several blocks), for file and memory spools, and
    /// `None` for any other length.
    #[tokio::test]
    async fn the_digest_of_the_passed_bytes_comes_from_the_spools_hasher() {
        let data: Vec<u8> = (0..3_500_000u32).map(|i| (i % 233) as u8).collect();
        let chunk = 100_000;
        for took in [1, 99_999, 100_000, 1_000_000, 2 * 1024 * 1024 + 7, 3_000_000] {
            for mem_one in [0, 8 << 20] {
                let l = SpoolLimits::new(mem_one, 4, 64, std::env::temp_dir().join("lnc-spool-test"));
                let mut s = Spool::new(&l, data.len() as u64).await.expect("spool");
                // A wrong byte after the passed ones: the spool does not verify and is reset.
                let mut bytes = data.clone();
                bytes[took + 5] ^= 1;
                for (i, c) in bytes.chunks(chunk).enumerate() {
                    let passed = took.saturating_sub(i * chunk).min(c.len());
                    s.write(Bytes::copy_from_slice(c), passed).await.expect("write");
                }
                let mut back = s
                    .verify(&NarHash::from_digest(Sha256::digest(&data).into()))
                    .await
                    .err()
                    .expect("a wrong byte");
                let want: [u8; 32] = Sha256::digest(&data[..took]).into();
                assert_eq!(
                    back.passed_digest(took as u64).await,
                    Some(want),
                    "took {took}, mem_one {mem_one}"
                );
                if mem_one == 0 {
                    assert_eq!(back.passed_digest(took as u64 + 1).await, None);
                }
                back.reset().await.expect("reset");
                assert_eq!(back.passed_digest(took as u64).await, None, "gone with the reset");
            }
        }
    }
}
