//! Reading one source's NAR bytes: the read loop shared by the single-source copy (`fetch`) and
//! the split copy (`split`). [`SourceRead`] reads into reused buffers ([`ReadBufs`]) and holds
//! the source to its floor ([`RateFloor`]: an idle timeout per read, a minimum rate per window and,
//! for peers, an overall deadline); what becomes of each chunk is the caller's business.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use super::source::{NarReader, SourceError, SourceId, Sources};

/// Size of a read buffer; chunks are cut from it read by read until less than
/// [`MIN_READ_ROOM`] is left.
pub(crate) const READ_CHUNK: usize = 256 * 1024;
/// Room a read buffer must still have to be read into.
const MIN_READ_ROOM: usize = 32 * 1024;
/// Read buffers one copy keeps for reuse once every chunk cut from them was dropped (by the
/// spool and a pass-through body): at most 4 MiB per copy; a copy that needs more allocates.
pub(crate) const READ_BUFS: usize = 16;
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
    window_start: Instant,
    in_window: u64,
    deadline: Option<Instant>,
}

impl RateFloor {
    /// For a transfer of `size` bytes from `source`, starting now.
    pub fn new(source: &SourceId, size: u64) -> Self {
        let now = Instant::now();
        let deadline = matches!(source, SourceId::Peer(_))
            .then(|| now + PEER_BUDGET_BASE + Duration::from_secs(size / PEER_BUDGET_RATE));
        Self {
            window_start: now,
            in_window: 0,
            deadline,
        }
    }

    /// Counts `n` bytes received; an error when the source fell under the floor.
    pub fn received(&mut self, n: u64) -> Result<(), SourceError> {
        let now = Instant::now();
        if self.deadline.is_some_and(|d| now > d) {
            return Err(SourceError::Timeout);
        }
        self.in_window += n;
        if now.duration_since(self.window_start) >= RATE_WINDOW {
            if self.in_window < MIN_WINDOW_BYTES {
                return Err(SourceError::TooSlow {
                    min_bytes: MIN_WINDOW_BYTES,
                    window: RATE_WINDOW,
                });
            }
            self.window_start = now;
            self.in_window = 0;
        }
        Ok(())
    }
}

/// The read buffers of one copy. Chunks are cut from a buffer (no copy) and handed to the spool
/// and a pass-through body; a buffer is read into again once all its chunks were dropped,
/// instead of a fresh one each time (fresh 256 KiB buffers cost page faults and zeroing: 12 % of
/// the proxy's CPU at full speed, issue #16).
struct ReadBufs {
    /// The buffer being read into (its unread room).
    cur: BytesMut,
    /// Buffers read full, oldest first, to reclaim once their chunks are gone.
    spent: VecDeque<BytesMut>,
}

impl ReadBufs {
    fn new() -> Self {
        Self {
            cur: BytesMut::with_capacity(READ_CHUNK),
            spent: VecDeque::new(),
        }
    }

    /// The buffer to read into: the current one while it has room, else a spent one whose
    /// chunks are all gone, else a new one.
    fn room(&mut self) -> &mut BytesMut {
        if self.cur.capacity() - self.cur.len() < MIN_READ_ROOM {
            if self.spent.len() >= READ_BUFS {
                // Freed once its chunks are.
                self.spent.pop_front();
            }
            self.spent.push_back(std::mem::take(&mut self.cur));
            self.cur = match self.spent.iter_mut().position(|b| b.try_reclaim(READ_CHUNK)) {
                Some(i) => self.spent.remove(i).unwrap_or_default(),
                None => BytesMut::with_capacity(READ_CHUNK),
            };
        }
        &mut self.cur
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
}

impl SourceRead {
    /// Reads `reader`, opened on `source` for `want` bytes.
    pub fn new(sources: &Sources, source: &SourceId, reader: NarReader, want: u64) -> Self {
        Self {
            reader,
            idle: sources.timeouts(source).idle,
            floor: RateFloor::new(source, want),
            bufs: ReadBufs::new(),
        }
    }

    /// The next chunk the source sent (`None` at its end), cut from the read buffers without a
    /// copy. A read error is [`SourceError::Read`] (the caller tells a decoder's from the
    /// connection's); silence or a drip is [`SourceError::Timeout`] or [`SourceError::TooSlow`].
    pub async fn next(&mut self) -> Result<Option<Bytes>, SourceError> {
        let n = match tokio::time::timeout(self.idle, self.reader.read_buf(self.bufs.room())).await {
            Err(_) => return Err(SourceError::Timeout),
            Ok(r) => r.map_err(SourceError::Read)?,
        };
        if n == 0 {
            return Ok(None);
        }
        self.floor.received(n as u64)?;
        Ok(Some(self.bufs.cut()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fills the read buffer's room and cuts it: a chunk as a read would leave it.
    fn read_full(b: &mut ReadBufs) -> Bytes {
        let r = b.room();
        let n = r.capacity() - r.len();
        r.extend_from_slice(&vec![7u8; n]);
        b.cut()
    }

    /// Issue #16: a read buffer is read into again once every chunk cut from it was dropped
    /// (no fresh 256 KiB buffer, and its page faults, per read), and never while one is held.
    #[test]
    fn read_buffers_are_reused_once_their_chunks_are_dropped() {
        let mut b = ReadBufs::new();
        let first = read_full(&mut b);
        let at = first.as_ptr();
        assert_eq!(first.len(), READ_CHUNK);
        drop(first);
        let second = read_full(&mut b);
        assert_eq!(second.as_ptr(), at, "the buffer whose chunk is gone is read into again");
        let third = read_full(&mut b);
        assert_ne!(third.as_ptr(), at, "a buffer whose chunk is held is not");
        let held = [second.as_ptr(), third.as_ptr()];
        drop((second, third));
        let fourth = read_full(&mut b);
        assert!(held.contains(&fourth.as_ptr()));
        assert!(b.spent.len() <= READ_BUFS);
    }
}
