//! A NAR whose size and hash were verified, served from memory or its spool file: whole, as a
//! `Range`, or as the rest of a pass-through. Invariant: one exists only once a spool (see
//! `spool`) checked its size and sha256; its disk or memory reservation lives as long as it.

use std::collections::VecDeque;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::sync::OwnedSemaphorePermit;

/// Where a verified NAR's bytes are.
#[derive(Clone)]
pub enum Data {
    Mem(Bytes),
    File(Arc<std::fs::File>),
}

/// Bytes a stream of a verified NAR reads (from its spool file) and hands on at a time.
const CHUNK: u64 = 512 * 1024;
/// Read-back buffers one stream keeps: one is read into again once every chunk cut from it was
/// dropped (sent), instead of a fresh zeroed one per chunk (cold memory: its zeroing was 4 % of
/// the proxy's CPU in verify-first, issue #27). At most this many x [`CHUNK`] (2 MiB) per stream,
/// plus what the client's connection still holds.
const READ_BACK_BUFS: usize = 4;

/// The read-back buffers of one stream (see [`READ_BACK_BUFS`]).
#[derive(Default)]
struct ReadBack {
    /// Buffers whose chunks may still be held, oldest first.
    spent: VecDeque<BytesMut>,
    /// Buffers allocated so far (the reuse test counts them).
    allocated: usize,
}

impl ReadBack {
    /// A buffer with room for a chunk: a spent one whose chunks are all gone, else a new one.
    fn take(&mut self) -> BytesMut {
        match self.spent.iter_mut().position(|b| b.try_reclaim(CHUNK as usize)) {
            Some(i) => self.spent.remove(i).unwrap_or_default(),
            None => {
                self.allocated += 1;
                BytesMut::with_capacity(CHUNK as usize)
            }
        }
    }

    /// Cuts the chunk read into `buf` and keeps `buf` for reuse.
    fn cut(&mut self, mut buf: BytesMut) -> Bytes {
        let chunk = buf.split().freeze();
        if self.spent.len() >= READ_BACK_BUFS {
            // Freed once its chunk is.
            self.spent.pop_front();
        }
        self.spent.push_back(buf);
        chunk
    }
}

/// A NAR whose size and hash were verified. Cheap to clone; the reservation is released when the
/// last clone is dropped.
#[derive(Clone)]
pub struct Verified {
    data: Data,
    len: u64,
    /// The first byte kept: those before it went to a pass-through body only (see
    /// `Spool::write`) and cannot be served from here.
    kept_from: u64,
    _permit: Arc<OwnedSemaphorePermit>,
}

impl Verified {
    /// A spool whose size and sha256 matched (only the spools call this, right after checking):
    /// `len` bytes in `data`, servable from `kept_from` on, holding the spool's reservation.
    pub fn new(data: Data, len: u64, kept_from: u64, permit: OwnedSemaphorePermit) -> Self {
        Self {
            data,
            len,
            kept_from,
            _permit: Arc::new(permit),
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first byte this spool can serve (0 unless a pass-through body took the NAR's start).
    pub fn kept_from(&self) -> u64 {
        self.kept_from
    }

    /// Bytes `start..=end` as a response body that reads a chunk each time the client is ready
    /// for one (see [`Self::stream`]). `done` is called with the bytes delivered when the body is
    /// finished or dropped (the client left).
    pub fn body(&self, start: u64, end: u64, done: impl FnOnce(u64) + Send + 'static) -> crate::http::Body {
        struct Sent<F: FnOnce(u64)> {
            bytes: u64,
            done: Option<F>,
        }
        impl<F: FnOnce(u64)> Drop for Sent<F> {
            fn drop(&mut self) {
                if let Some(f) = self.done.take() {
                    f(self.bytes);
                }
            }
        }
        let mut sent = Sent {
            bytes: 0,
            done: Some(done),
        };
        let stream = self.stream(start, end).map(move |c| {
            // The whole `Sent` moves into the closure (its drop reports), not just the counter.
            let s: &mut Sent<_> = &mut sent;
            if let Ok(c) = &c {
                s.bytes += c.len() as u64;
            }
            c
        });
        crate::http::Body::Pull(Box::pin(stream))
    }

    /// Bytes `start..=end`, one chunk per poll (a file spool reads it on a blocking thread, one
    /// chunk at a time, so a reader that stops holds no thread). An error ends the stream; bytes
    /// before [`Self::kept_from`] are one.
    pub fn stream(&self, start: u64, end: u64) -> futures_util::stream::BoxStream<'static, io::Result<Bytes>> {
        if start < self.kept_from {
            let e = io::Error::other(format!("bytes before {} were not kept", self.kept_from));
            return Box::pin(futures_util::stream::once(async move { Err(e) }));
        }
        let state = (self.clone(), start, ReadBack::default());
        let stream = futures_util::stream::unfold(state, move |(v, pos, mut bufs)| async move {
            if pos > end || v.len == 0 {
                return None;
            }
            let n = (end + 1 - pos).min(CHUNK);
            let chunk = match &v.data {
                Data::Mem(b) => Ok(b.slice(pos as usize..(pos + n) as usize)),
                Data::File(f) => {
                    let (f, mut buf) = (f.clone(), bufs.take());
                    let read = tokio::task::spawn_blocking(move || {
                        buf.resize(n as usize, 0);
                        f.read_exact_at(&mut buf, pos).map(|()| buf)
                    })
                    .await;
                    match read {
                        Ok(Ok(buf)) => Ok(bufs.cut(buf)),
                        Ok(Err(e)) => Err(e),
                        Err(e) => Err(io::Error::other(e)),
                    }
                }
            };
            match chunk {
                Ok(c) => Some((Ok(c), (v, pos + n, bufs))),
                // An error ends the stream after it is sent.
                Err(e) => Some((Err(e), (v, end + 1, bufs))),
            }
        });
        Box::pin(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue #27: a stream reads its spool file back into a few reused buffers: a client that
    /// sends each chunk before the next is read costs one buffer; one that holds 3 at a time about
    /// 4; never more than [`READ_BACK_BUFS`] kept.
    #[test]
    fn read_back_buffers_are_reused_once_their_chunks_are_sent() {
        for held in [0usize, 3] {
            let mut r = ReadBack::default();
            let mut out = VecDeque::new();
            for i in 0..50u8 {
                let mut b = r.take();
                b.resize(CHUNK as usize, i);
                out.push_back((i, r.cut(b)));
                while out.len() > held {
                    let (i, c) = out.pop_front().expect("a chunk");
                    assert!(c.iter().all(|x| *x == i), "a chunk was overwritten while held");
                }
            }
            assert!(r.allocated <= held + 1, "held {held}: {} buffers", r.allocated);
            assert!(r.spent.len() <= READ_BACK_BUFS);
        }
    }
}
