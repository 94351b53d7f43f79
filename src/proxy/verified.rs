//! A NAR whose size and hash were verified, served from memory or its spool file: whole, as a
//! `Range`, or as the rest of a pass-through. Invariant: one exists only once a spool (see
//! `spool`) checked its size and sha256; its disk or memory reservation lives as long as it.

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::OwnedSemaphorePermit;

/// Where a verified NAR's bytes are.
#[derive(Clone)]
pub enum Data {
    Mem(Bytes),
    File(Arc<std::fs::File>),
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
        const CHUNK: u64 = 512 * 1024;
        if start < self.kept_from {
            let e = io::Error::other(format!("bytes before {} were not kept", self.kept_from));
            return Box::pin(futures_util::stream::once(async move { Err(e) }));
        }
        let stream = futures_util::stream::unfold((self.clone(), start), move |(v, pos)| async move {
            if pos > end || v.len == 0 {
                return None;
            }
            let n = (end + 1 - pos).min(CHUNK);
            let chunk = match &v.data {
                Data::Mem(b) => Ok(b.slice(pos as usize..(pos + n) as usize)),
                Data::File(f) => {
                    let f = f.clone();
                    tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0u8; n as usize];
                        f.read_exact_at(&mut buf, pos).map(|()| Bytes::from(buf))
                    })
                    .await
                    .unwrap_or_else(|e| Err(io::Error::other(e)))
                }
            };
            match chunk {
                Ok(c) => Some((Ok(c), (v, pos + n))),
                // An error ends the stream after it is sent.
                Err(e) => Some((Err(e), (v, end + 1))),
            }
        });
        Box::pin(stream)
    }
}
