//! Reading one source's NAR bytes: the read loop shared by the single-source copy (`fetch`) and
//! the split copy (`split`). [`SourceRead`] reads into reused buffers ([`ReadBufs`]) and holds
//! the source to its floor ([`RateFloor`]: an idle timeout per read, a minimum rate per window and,
//! for peers, an overall deadline); what becomes of each chunk is the caller's business.

use std::collections::VecDeque;
use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use super::source::{NarReader, SourceError, SourceId, Sources};

/// How a copy reads: the size of a read buffer (chunks are cut from it read by read until less
/// than [`MIN_READ_ROOM`] is left) and how many buffers it keeps for reuse once every chunk cut
/// from them was dropped (by the spool and a pass-through body); a copy that needs more
/// allocates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadShape {
    pub chunk: usize,
    pub keep: usize,
}

impl ReadShape {
    /// How a copy of a NAR of `size` bytes reads: [`PASS_READS`] when it feeds a pass-through of
    /// a NAR of [`PASS_READS_MIN_BYTES`] or more, else [`READS`].
    pub fn of(passes_through: bool, size: u64) -> ReadShape {
        if passes_through && size >= PASS_READS_MIN_BYTES {
            PASS_READS
        } else {
            READS
        }
    }
}

/// Every other copy: 256 KiB chunks, 16 kept (4 MiB). With 1 MiB chunks for every copy a closure
/// of small and middling NARs, most of them passed through, cost the proxy about a third more
/// CPU (fresh buffers for a few chunks each; issue #27, `docs/benchmarks.md`).
pub(crate) const READS: ReadShape = ReadShape {
    chunk: 256 * 1024,
    keep: 16,
};
/// A copy that feeds a pass-through of a NAR of [`PASS_READS_MIN_BYTES`] or more: 1 MiB chunks,
/// 6 kept (a pass-through holds about five at once: the one read into, the spool's pending
/// block, its channel's and hyper's). Each chunk is one trip through the spool, the tap's channel
/// and a write to Nix; with 256 KiB the trips cost a pass-through about a fifth more CPU per GiB,
/// with 4 MiB the reads found less ready and it cost more again (issue #27).
pub(crate) const PASS_READS: ReadShape = ReadShape {
    chunk: 1024 * 1024,
    keep: 6,
};
/// A pass-through of a NAR this large or larger reads [`PASS_READS`]; a smaller one [`READS`]: its
/// six fresh 1 MiB buffers are not paid back by its few chunks (a closure of 301 NARs, most of
/// them passed through, cost the proxy more CPU with 1 MiB chunks for every NAR; issue #27).
pub(crate) const PASS_READS_MIN_BYTES: u64 = 64 * 1024 * 1024;
/// Room a read buffer must still have to be read into.
const MIN_READ_ROOM: usize = 32 * 1024;
/// A source must send at least [`MIN_WINDOW_BYTES`] in every window of this length, or it is
/// abandoned as a drip (the idle timeout alone lets one byte every few seconds through).
pub const RATE_WINDOW: Duration = Duration::from_secs(3);
/// See [`RATE_WINDOW`]: about 5 KiB/s, far below any real link.
pub const MIN_WINDOW_BYTES: u64 = 16 * 1024;
/// A peer gets this long, plus the NAR's size at [`PEER_BUDGET_RATE`], to deliver a whole NAR.
const PEER_BUDGET_BASE: Duration = Duration::from_secs(30);
/// Bytes per second a peer's budget allows for (a LAN does tens of MB/s).
const PEER_BUDGET_RATE: u64 = 1024 * 1024;

/// The floor under a source's rate: [`MIN_WINDOW_BYTES`] per [`RATE_WINDOW`], and for peers an
/// overall deadline.
pub struct RateFloor {
    window: ByteWindow,
    deadline: Option<Instant>,
}

/// Bytes counted over consecutive windows of one length: the rate floor's, and the slow watch's
/// (`busy::SlowWatch`).
pub struct ByteWindow {
    start: Instant,
    bytes: u64,
}

impl ByteWindow {
    /// A window starting at `now`.
    pub fn new(now: Instant) -> Self {
        Self { start: now, bytes: 0 }
    }

    /// Counts `n` bytes at `now`. Once `len` has passed since the window began: its bytes and
    /// how long it ran, and the next window begins at `now`.
    pub fn add(&mut self, n: u64, now: Instant, len: Duration) -> Option<(u64, Duration)> {
        self.bytes += n;
        let took = now.duration_since(self.start);
        if took < len {
            return None;
        }
        let bytes = self.bytes;
        *self = Self::new(now);
        Some((bytes, took))
    }
}

impl RateFloor {
    /// For a transfer of `size` bytes from `source`, starting now.
    pub fn new(source: &SourceId, size: u64) -> Self {
        let now = Instant::now();
        let deadline = matches!(source, SourceId::Peer(_))
            .then(|| now + PEER_BUDGET_BASE + Duration::from_secs(size / PEER_BUDGET_RATE));
        Self {
            window: ByteWindow::new(now),
            deadline,
        }
    }

    /// Counts `n` bytes received; an error when the source fell under the floor.
    pub fn received(&mut self, n: u64) -> Result<(), SourceError> {
        let now = Instant::now();
        if self.deadline.is_some_and(|d| now > d) {
            return Err(SourceError::Timeout);
        }
        match self.window.add(n, now, RATE_WINDOW) {
            Some((bytes, _)) if bytes < MIN_WINDOW_BYTES => Err(SourceError::TooSlow {
                min_bytes: MIN_WINDOW_BYTES,
                window: RATE_WINDOW,
            }),
            _ => Ok(()),
        }
    }
}

/// The read buffers of one copy. Chunks are cut from a buffer (no copy) and handed to the spool
/// and a pass-through body; a buffer is read into again once all its chunks were dropped,
/// instead of a fresh one each time (fresh 256 KiB buffers cost page faults and zeroing: 12 % of
/// the proxy's CPU at full speed, issue #16).
struct ReadBufs {
    /// Each buffer's size: the shape's chunk, or less for a NAR that is smaller (at least
    /// [`SMALL_READ_BUF`]), so that most NARs of a closure do not take a whole chunk each.
    size: usize,
    /// Buffers kept for reuse.
    keep: usize,
    /// The buffer being read into (its unread room).
    cur: BytesMut,
    /// Buffers read full, oldest first, to reclaim once their chunks are gone.
    spent: VecDeque<BytesMut>,
}

/// The read buffer of a NAR this small or smaller.
const SMALL_READ_BUF: usize = 64 * 1024;

impl ReadBufs {
    /// Buffers for reading `want` bytes.
    fn new(want: u64, shape: ReadShape) -> Self {
        let size = usize::try_from(want)
            .unwrap_or(usize::MAX)
            .clamp(SMALL_READ_BUF, shape.chunk.max(SMALL_READ_BUF));
        Self {
            size,
            keep: shape.keep,
            cur: BytesMut::with_capacity(size),
            spent: VecDeque::new(),
        }
    }

    /// The buffer to read into: the current one while it has room, else a spent one whose
    /// chunks are all gone, else a new one.
    fn room(&mut self) -> &mut BytesMut {
        if self.cur.capacity() - self.cur.len() < MIN_READ_ROOM {
            if self.spent.len() >= self.keep {
                // Freed once its chunks are.
                self.spent.pop_front();
            }
            self.spent.push_back(std::mem::take(&mut self.cur));
            let size = self.size;
            self.cur = match self.spent.iter_mut().position(|b| b.try_reclaim(size)) {
                Some(i) => self.spent.remove(i).unwrap_or_default(),
                None => BytesMut::with_capacity(size),
            };
        }
        &mut self.cur
    }

    /// Room left in the buffer being read into.
    fn cur_room(&self) -> usize {
        self.cur.capacity() - self.cur.len()
    }

    /// What was read since the last cut, as a chunk.
    fn cut(&mut self) -> Bytes {
        self.cur.split().freeze()
    }
}

/// One source's NAR being read, chunk by chunk.
pub struct SourceRead {
    reader: NarReader,
    /// Longest silence allowed between two reads.
    idle: Duration,
    floor: RateFloor,
    bufs: ReadBufs,
    /// What a read after the first of a chunk met (the end, or an error), told at the next call.
    after: Option<io::Result<()>>,
}

impl SourceRead {
    /// Reads `reader`, opened on `source` for `want` bytes, in chunks as `shape` says.
    pub fn new(sources: &Sources, source: &SourceId, reader: NarReader, want: u64, shape: ReadShape) -> Self {
        Self {
            reader,
            idle: sources.timeouts(source).idle,
            floor: RateFloor::new(source, want),
            bufs: ReadBufs::new(want, shape),
            after: None,
        }
    }

    /// The next chunk the source sent (`None` at its end), cut from the read buffers without a
    /// copy. A read error is [`SourceError::Read`] (the caller tells a decoder's from the
    /// connection's); silence or a drip is [`SourceError::Timeout`] or [`SourceError::TooSlow`].
    ///
    /// A chunk holds what one read gave and whatever more the source has ready at once, up to
    /// the buffer's room (the [`ReadShape`]'s chunk): a decoder or a socket gives 8-64 KiB a read, and each
    /// chunk costs a trip through the spool, the pass-through's channels and a write to Nix
    /// (wake-ups and context switches were a seventh of the proxy's CPU, issue #27).
    pub async fn next(&mut self) -> Result<Option<Bytes>, SourceError> {
        match self.after.take() {
            Some(Ok(())) => return Ok(None),
            Some(Err(e)) => return Err(SourceError::Read(e)),
            None => {}
        }
        let mut n = match tokio::time::timeout(self.idle, self.reader.read_buf(self.bufs.room())).await {
            Err(_) => return Err(SourceError::Timeout),
            Ok(r) => r.map_err(SourceError::Read)?,
        };
        if n == 0 {
            return Ok(None);
        }
        // More, while it is ready now and the buffer has room (a read that would wait is
        // dropped: it took nothing, and the next call asks again).
        while self.bufs.cur_room() >= MIN_READ_ROOM {
            match self.reader.read_buf(&mut self.bufs.cur).now_or_never() {
                None => break,
                Some(Ok(0)) => {
                    self.after = Some(Ok(()));
                    break;
                }
                Some(Ok(m)) => n += m,
                Some(Err(e)) => {
                    self.after = Some(Err(e));
                    break;
                }
            }
        }
        self.floor.received(n as u64)?;
        Ok(Some(self.bufs.cut()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source read through a channel of pieces (a `None` piece: the sender is dropped: the end).
    fn piped() -> (tokio::sync::mpsc::UnboundedSender<io::Result<Bytes>>, SourceRead) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<io::Result<Bytes>>();
        let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let read = SourceRead {
            reader: Box::pin(tokio_util::io::StreamReader::new(stream)),
            idle: Duration::from_secs(5),
            floor: RateFloor::new(&SourceId::Upstream(0), 1 << 20),
            bufs: ReadBufs::new(1 << 20, READS),
            after: None,
        };
        (tx, read)
    }

    fn piece(b: u8) -> io::Result<Bytes> {
        Ok(Bytes::from(vec![b; 1000]))
    }

    /// Issue #27: what the source has ready at once becomes one chunk (one trip through the
    /// spool and the pass-through), not one chunk per read; a read that would wait ends the
    /// chunk; the end and an error met after the first read come after that chunk's bytes.
    #[tokio::test]
    async fn ready_reads_make_one_chunk_and_the_end_or_an_error_follows_it() {
        let (tx, mut read) = piped();
        for b in 1..=5 {
            tx.send(piece(b)).expect("send");
        }
        let c = read.next().await.expect("read").expect("a chunk");
        assert_eq!(c.len(), 5000, "five ready reads, one chunk");
        assert!(c[..1000].iter().all(|x| *x == 1) && c[4000..].iter().all(|x| *x == 5));
        // Nothing ready: the next chunk waits for the source, and holds what came then.
        let later = tokio::spawn(async move {
            let c = read.next().await.expect("read").expect("a chunk");
            (c, read)
        });
        tokio::task::yield_now().await;
        tx.send(piece(6)).expect("send");
        let (c, mut read) = later.await.expect("task");
        assert!(c.len() == 1000 && c.iter().all(|x| *x == 6));
        // The end right after ready bytes: the bytes first, then the end.
        tx.send(piece(7)).expect("send");
        drop(tx);
        let c = read.next().await.expect("read").expect("the last bytes");
        assert!(c.len() == 1000 && c.iter().all(|x| *x == 7));
        assert!(read.next().await.expect("read").is_none(), "then the end");
        // An error after ready bytes: the bytes first, then the error.
        let (tx, mut read) = piped();
        tx.send(piece(8)).expect("send");
        tx.send(Err(io::Error::other("broken"))).expect("send");
        let c = read.next().await.expect("the bytes before the error").expect("a chunk");
        assert_eq!(c.len(), 1000);
        assert!(matches!(read.next().await, Err(SourceError::Read(_))));
    }

    /// Fills the read buffer's room and cuts it: a chunk as a read would leave it.
    fn read_full(b: &mut ReadBufs) -> Bytes {
        let r = b.room();
        let n = r.capacity() - r.len();
        r.extend_from_slice(&vec![7u8; n]);
        b.cut()
    }

    /// Issue #27: 1 MiB chunks only for a pass-through of a NAR of [`PASS_READS_MIN_BYTES`] or
    /// more; a smaller pass-through and every other copy read 256 KiB chunks.
    #[test]
    fn only_a_large_pass_through_reads_large_chunks() {
        assert_eq!(ReadShape::of(true, PASS_READS_MIN_BYTES), PASS_READS);
        assert_eq!(ReadShape::of(true, PASS_READS_MIN_BYTES - 1), READS);
        assert_eq!(ReadShape::of(false, u64::MAX), READS);
    }

    /// A NAR smaller than a read chunk gets a buffer of its size (at least [`SMALL_READ_BUF`]),
    /// not a MiB: most NARs of a closure are small, and many are copied at once.
    #[test]
    fn a_small_nars_read_buffer_is_its_size() {
        assert_eq!(ReadBufs::new(1000, PASS_READS).cur.capacity(), SMALL_READ_BUF);
        assert_eq!(ReadBufs::new(300 * 1024, PASS_READS).cur.capacity(), 300 * 1024);
        assert_eq!(ReadBufs::new(u64::MAX, PASS_READS).cur.capacity(), PASS_READS.chunk);
        assert_eq!(ReadBufs::new(300 * 1024, READS).cur.capacity(), READS.chunk);
    }

    /// Issue #16: a read buffer is read into again once every chunk cut from it was dropped
    /// (no fresh 256 KiB buffer, and its page faults, per read), and never while one is held.
    #[test]
    fn read_buffers_are_reused_once_their_chunks_are_dropped() {
        let mut b = ReadBufs::new(u64::MAX, READS);
        let first = read_full(&mut b);
        let at = first.as_ptr();
        assert_eq!(first.len(), READS.chunk);
        drop(first);
        let second = read_full(&mut b);
        assert_eq!(second.as_ptr(), at, "the buffer whose chunk is gone is read into again");
        let third = read_full(&mut b);
        assert_ne!(third.as_ptr(), at, "a buffer whose chunk is held is not");
        let held = [second.as_ptr(), third.as_ptr()];
        drop((second, third));
        let fourth = read_full(&mut b);
        assert!(held.contains(&fourth.as_ptr()));
        assert!(b.spent.len() <= READS.keep);
    }
}
