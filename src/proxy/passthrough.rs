//! Pass-through: a proven peer's NAR bytes go to Nix as they arrive, while the fetch still
//! hashes them, except the last [`TAIL`] bytes, which wait until size and hash matched. See
//! `proven` for who qualifies and `docs/security.md` for the trade.
//!
//! The fetch holds a [`Tap`]; the response body is [`body`], pulled by the connection. Invariants: the tap only
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
//! Memory: at most [`PASS_CHUNKS`] read chunks and [`PASS_BUFFER_KIB`] of bytes wait in a tap's
//! channel (8 chunks of 256 KiB, or 2 of 1 MiB for a NAR of 64 MiB or more: `copy::ReadShape`),
//! and what
//! hyper holds of the one it is sending; one pass-through per open proxy connection at most.

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
/// KiB of chunks a tap may have handed over that the body has not sent yet: as many small chunks
/// as [`PASS_CHUNKS`] allows, and two large ones (with eight of 1 MiB a pass-through cost more
/// CPU per GiB; with two of 256 KiB a closure's did, issue #27).
pub const PASS_BUFFER_KIB: u32 = 2048;
/// A tap whose body does not take a chunk for this long is detached (the fetch goes on at full
/// speed; the body gets the rest once the NAR verified). Shorter than a peer's idle timeout
/// (`source::PEER_TIMEOUTS`): while the tap waits, the fetch reads nothing from the peer, and
/// the HTTP client's idle timer, armed by a read that found nothing ready, counts that wait as
/// the peer's silence (with 10 s against 5 s, a client that stopped reading lost the peer and the
/// NAR, depending on the timing of the last read).
pub const PASS_STALL: Duration = Duration::from_secs(4);
const _: () = assert!(PASS_STALL.as_secs() < super::source::PEER_TIMEOUTS.idle.as_secs());

/// Bytes handed from the fetch to the body, with the NAR's size (for `Content-Length`).
pub struct Piece {
    pub size: u64,
    pub bytes: Bytes,
    /// Its share of [`PASS_BUFFER_KIB`], given back when the piece is dropped.
    _room: tokio::sync::OwnedSemaphorePermit,
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
    /// [`PASS_BUFFER_KIB`] permits, one per KiB in the channel.
    room: Arc<tokio::sync::Semaphore>,
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
                room: Arc::new(tokio::sync::Semaphore::new(PASS_BUFFER_KIB as usize)),
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
        let kib = u32::try_from(n.div_ceil(1024)).unwrap_or(u32::MAX).min(PASS_BUFFER_KIB);
        let send = async {
            let _room = self.room.clone().acquire_many_owned(kib).await.ok()?;
            tx.send(Piece { size, bytes, _room }).await.ok()
        };
        match tokio::time::timeout(PASS_STALL, send).await {
            Ok(Some(())) => {
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

/// Reports how a pass-through body ended, once: [`Outcome::Left`] when the body is dropped (the
/// client went away, or the connection was shut down) before it ended.
struct Ending<E: FnOnce(Outcome)> {
    /// Bytes handed to hyper so far.
    sent: u64,
    report: Option<E>,
}

impl<E: FnOnce(Outcome)> Ending<E> {
    fn report(&mut self, outcome: Outcome) {
        if let Some(f) = self.report.take() {
            f(outcome);
        }
    }
}

impl<E: FnOnce(Outcome)> Drop for Ending<E> {
    fn drop(&mut self) {
        let sent = self.sent;
        self.report(Outcome::Left { sent });
    }
}

/// Where a pass-through body stands.
enum Phase<D> {
    /// Handing on the tap's pieces; then waiting for the fetch's result (`done`).
    Tap { tap: TapEnd, done: D },
    /// The rest, from the verified spool.
    Rest(futures_util::stream::BoxStream<'static, std::io::Result<Bytes>>),
    /// Ended (delivered or cut).
    Over,
}

/// A pass-through body: `first`, the rest of the tap, then (once the fetch delivered a verified
/// NAR, and, when the spool was reset after bytes were handed over, that NAR's prefix matched
/// what was sent) the remainder from the spool. A cut ends it with an error (hyper then closes
/// the connection short of its `Content-Length`).
///
/// The body is pulled by the connection that sends it: each chunk the fetch hands the tap goes
/// from the tap's channel to the socket with no task in between (issue #27: a body task of its
/// own, with a channel to hyper, cost a wake-up per chunk). A client that leaves while nothing is
/// ready drops the body (hyper notices the closed connection), and with it `done`, which holds
/// what aborts the fetch.
///
/// `done` is the fetch's result (the verified spool and what the caller wants back with a
/// delivered NAR); it is awaited only once the tap is closed. `verified` is told once the NAR
/// verified, before its tail is sent; `ended` how the body ended, once.
pub fn body<T, D, V, E>(
    first: Piece,
    tap: TapEnd,
    done: D,
    verified: V,
    ended: E,
) -> futures_util::stream::BoxStream<'static, std::io::Result<Bytes>>
where
    T: Send + 'static,
    D: std::future::Future<Output = Result<(Verified, T), CutReason>> + Send + 'static,
    V: FnOnce(&T) + Send + 'static,
    E: FnOnce(Outcome) + Send + 'static,
{
    let size = first.size;
    let state = (
        Some(first.bytes),
        Phase::Tap {
            tap,
            done: Box::pin(done),
        },
        Some(verified),
        Ending {
            sent: 0,
            report: Some(ended),
        },
    );
    let stream = futures_util::stream::unfold(
        state,
        move |(mut first, mut phase, mut verified, mut ending)| async move {
            let cut = |why: CutReason, ending: &mut Ending<E>| {
                let e = std::io::Error::other(format!("NAR cut: {why}"));
                let sent = ending.sent;
                ending.report(Outcome::Cut { sent, why });
                Err(e)
            };
            loop {
                if let Some(b) = first.take() {
                    ending.sent += b.len() as u64;
                    return Some((Ok(b), (None, phase, verified, ending)));
                }
                phase = match phase {
                    Phase::Over => return None,
                    Phase::Tap { mut tap, done } => {
                        if let Some(p) = tap.rx.recv().await {
                            ending.sent += p.bytes.len() as u64;
                            return Some((Ok(p.bytes), (None, Phase::Tap { tap, done }, verified, ending)));
                        }
                        let sent = ending.sent;
                        let checked = match done.await {
                            Ok((v, x)) if v.len() == size => match tap.recheck.get() {
                                None => Ok((v, x)),
                                // The NAR came from elsewhere: what was sent must be its start.
                                Some((n, Some(digest))) if *n == sent && prefix_matches(&v, sent, digest).await => {
                                    Ok((v, x))
                                }
                                Some(_) => Err(CutReason::NotVerified),
                            },
                            Ok(_) => Err(CutReason::NotVerified),
                            Err(why) => Err(why),
                        };
                        match checked {
                            Ok((v, x)) => {
                                if let Some(f) = verified.take() {
                                    f(&x);
                                }
                                Phase::Rest(v.stream(sent, size.saturating_sub(1)))
                            }
                            Err(why) => {
                                let e = cut(why, &mut ending);
                                return Some((e, (None, Phase::Over, verified, ending)));
                            }
                        }
                    }
                    Phase::Rest(mut rest) => match rest.next().await {
                        Some(Ok(c)) => {
                            ending.sent += c.len() as u64;
                            return Some((Ok(c), (None, Phase::Rest(rest), verified, ending)));
                        }
                        Some(Err(e)) => {
                            let e = cut(CutReason::Spool(Arc::new(e)), &mut ending);
                            return Some((e, (None, Phase::Over, verified, ending)));
                        }
                        None => {
                            ending.report(Outcome::Delivered);
                            Phase::Over
                        }
                    },
                };
            }
        },
    );
    Box::pin(stream)
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
    use futures_util::FutureExt;

    /// A verified memory spool of `data`.
    async fn verified(data: &[u8]) -> Verified {
        let l = SpoolLimits::new(8 << 20, 16, 16, std::env::temp_dir().join("lnc-spool-test"));
        let mut s = Spool::new(&l, data.len() as u64).await.expect("spool");
        s.write(Bytes::copy_from_slice(data), 0).await.expect("write");
        s.verify(&NarHash::from_digest(Sha256::digest(data).into()))
            .await
            .unwrap_or_else(|_| panic!("verify"))
    }

    /// Issue #27: a tap's channel holds at most [`PASS_BUFFER_KIB`] of bytes, whatever the
    /// number of chunks: two chunks of 1 MiB wait, a third stalls the tap (which then detaches),
    /// though [`PASS_CHUNKS`] slots would take it; chunks of 256 KiB fill the slots.
    #[tokio::test(start_paused = true)]
    async fn a_taps_channel_is_bounded_by_bytes_as_well_as_chunks() {
        let mib = Bytes::from(vec![7u8; 1 << 20]);
        let size = 64 << 20;
        let (mut tap, _end) = Tap::new();
        assert_eq!(tap.offer(1 << 20, size, &mib).await, 1 << 20);
        assert_eq!(tap.offer(2 << 20, size, &mib).await, 1 << 20);
        assert_eq!(tap.offer(3 << 20, size, &mib).await, 0, "2 MiB wait: the third stalls");
        assert!(!tap.continues_at(3 << 20, size), "and the tap detached");
        let quarter = mib.slice(..256 * 1024);
        let (mut tap, _end) = Tap::new();
        for i in 1..=PASS_CHUNKS as u64 {
            assert_eq!(tap.offer(i * 256 * 1024, size, &quarter).await, 256 * 1024, "chunk {i}");
        }
    }

    type Ended = Arc<std::sync::Mutex<Vec<String>>>;

    /// Issue #27: the pass-through body is a stream the connection pulls (no task of its own):
    /// the tap's chunks in order, nothing of the held-back tail before the NAR verified, then the
    /// tail from the spool; `verified` told before the tail; `ended` told once, how it ended
    /// (delivered, cut with an error item, or left when dropped early).
    #[tokio::test]
    async fn the_pulled_body_keeps_order_and_the_tail_rule_and_reports_how_it_ended() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
        let size = data.len() as u64;
        let v = verified(&data).await;
        // Delivered, Cut and Left in turn.
        for case in 0..3 {
            let (mut tap, mut end) = Tap::new();
            let mut spooled = 0;
            // As many chunks as the channel holds (the body is pulled only below).
            for c in data.chunks(data.len().div_ceil(PASS_CHUNKS)) {
                spooled += c.len() as u64;
                tap.offer(spooled, size, &Bytes::copy_from_slice(c)).await;
            }
            assert_eq!(tap.sent(), size - TAIL);
            drop(tap);
            let first = end.rx.recv().await.expect("a first piece");
            let (done_tx, done_rx) = tokio::sync::oneshot::channel::<Result<(Verified, u8), CutReason>>();
            let told: Ended = Arc::default();
            let (t1, t2) = (told.clone(), told.clone());
            let mut b = body(
                first,
                end,
                async move { done_rx.await.unwrap_or(Err(CutReason::FetchEnded)) },
                move |x: &u8| t1.lock().expect("lock").push(format!("verified {x}")),
                move |o| {
                    let o = match o {
                        Outcome::Delivered => "delivered".to_owned(),
                        Outcome::Cut { sent, .. } => format!("cut {sent}"),
                        Outcome::Left { sent } => format!("left {sent}"),
                    };
                    t2.lock().expect("lock").push(o);
                },
            );
            let mut got = Vec::new();
            while (got.len() as u64) < size - TAIL {
                let c = b.next().await.expect("a chunk").expect("bytes");
                got.extend_from_slice(&c);
            }
            assert!(got == data[..got.len()], "the tap's bytes, in order");
            assert_eq!(got.len() as u64, size - TAIL, "none of the tail");
            assert!(b.next().now_or_never().is_none(), "the tail waits for the verdict");
            assert!(told.lock().expect("lock").is_empty());
            match case {
                0 => {
                    done_tx.send(Ok((v.clone(), 7))).ok().expect("send");
                    while let Some(c) = b.next().await {
                        got.extend_from_slice(&c.expect("bytes"));
                    }
                    assert!(got == data, "the whole NAR");
                    assert_eq!(*told.lock().expect("lock"), ["verified 7", "delivered"]);
                }
                1 => {
                    done_tx.send(Err(CutReason::NotVerified)).ok().expect("send");
                    assert!(b.next().await.expect("an item").is_err(), "a cut ends with an error");
                    assert!(b.next().await.is_none());
                    assert_eq!(*told.lock().expect("lock"), [format!("cut {}", size - TAIL)]);
                }
                _ => {
                    drop(b);
                    assert!(done_tx.is_closed(), "the fetch's result is dropped with the body");
                    assert_eq!(*told.lock().expect("lock"), [format!("left {}", size - TAIL)]);
                }
            }
        }
    }

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
