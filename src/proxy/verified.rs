//! A NAR whose size and hash were verified, served from memory or its spool file: whole, as a
//! `Range`, or as the rest of a pass-through. Invariant: one exists only once a spool (see
//! `spool`) checked its size and sha256; its disk or memory reservation lives as long as it.
//!
//! A spool file is served through one read-only shared mapping of it ([`Mapping`], made when the
//! NAR verified): its chunks are slices of the page cache handed to hyper as they are, with no
//! copy into a buffer and no blocking-thread trip per chunk (issue #27: the read-back was a copy of
//! every byte and a thread hop per 512 KiB in verify-first). Memory: a mapping is address space,
//! not memory of its own; the pages it touches are the file's page cache, which the kernel can
//! drop as before. It is unmapped when the last clone of its [`Verified`] and the last chunk
//! cut from it are dropped. A mapped file that shrank would fault (`SIGBUS`) on a read past its
//! new end: nothing truncates or writes a spool file once it verified (the spool that wrote it
//! was consumed by the check, and the file is unlinked, so no other process opens it by name).
//! If the mapping cannot be made, the file is read back with `pread` on a blocking thread.

use std::collections::VecDeque;
use std::ffi::c_void;
use std::io;
use std::num::NonZeroUsize;
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;
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

/// A read-only shared mapping of a verified spool file, unmapped when dropped (see the module's
/// doc for why the file cannot shrink under it).
struct Mapping {
    at: NonNull<c_void>,
    len: usize,
}

// SAFETY: the mapping is read-only and its pages stay valid until `Drop` unmaps them; nothing
// writes or truncates the file once it verified.
unsafe impl Send for Mapping {}
// SAFETY: as for `Send`: shared reads of memory nobody writes.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the first `len` bytes of `file` (`None` for an empty file or when `mmap` fails).
    fn new(file: &std::fs::File, len: u64) -> Option<Self> {
        use nix::sys::mman::{madvise, mmap, MapFlags, MmapAdvise, ProtFlags};
        let n = NonZeroUsize::new(usize::try_from(len).ok()?)?;
        // SAFETY: a fresh read-only shared mapping of a file this process owns; see `Mapping`.
        let at = unsafe { mmap(None, n, ProtFlags::PROT_READ, MapFlags::MAP_SHARED, file, 0) }.ok()?;
        // SAFETY: advice on the mapping just made. Read in order: larger read-ahead on a fault.
        let _ = unsafe { madvise(at, n.get(), MmapAdvise::MADV_SEQUENTIAL) };
        Some(Self { at, len: n.get() })
    }

    /// Asks the kernel to read `start..start + len` (clipped) into the page cache now, in the
    /// background, so that a page the kernel dropped does not stall a runtime thread later.
    /// `start` is a multiple of [`CHUNK`] (the mapping starts on a page boundary).
    fn will_need(&self, start: usize, len: usize) {
        use nix::sys::mman::{madvise, MmapAdvise};
        let len = len.min(self.len.saturating_sub(start));
        if len == 0 {
            return;
        }
        // SAFETY: a page-aligned range inside the mapping; advice only.
        let at = unsafe { NonNull::new_unchecked(self.at.as_ptr().cast::<u8>().add(start).cast()) };
        // SAFETY: see above.
        let _ = unsafe { madvise(at, len, MmapAdvise::MADV_WILLNEED) };
    }
}

impl AsRef<[u8]> for Mapping {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `len` readable bytes at `at` for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.at.as_ptr().cast::<u8>(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; no slice of it outlives `self`
        // (`Bytes::from_owner` drops the owner after its last slice).
        let _ = unsafe { nix::sys::mman::munmap(self.at, self.len) };
    }
}

/// The owner of the [`Bytes`] over a mapping (the `Verified` keeps the mapping too, to advise it).
struct ArcMapping(Arc<Mapping>);

impl AsRef<[u8]> for ArcMapping {
    fn as_ref(&self) -> &[u8] {
        self.0.as_ref().as_ref()
    }
}

/// A NAR whose size and hash were verified. Cheap to clone; the reservation is released when the
/// last clone is dropped.
#[derive(Clone)]
pub struct Verified {
    data: Data,
    /// A file spool's bytes, mapped once (see [`Mapping`]); `None` for a memory spool or when
    /// the mapping failed (then the file is read back).
    mapped: Option<(Bytes, Arc<Mapping>)>,
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
        let mapped = match &data {
            Data::File(f) => Mapping::new(f, len).map(|m| {
                let m = Arc::new(m);
                (Bytes::from_owner(ArcMapping(m.clone())), m)
            }),
            Data::Mem(_) => None,
        };
        Self {
            data,
            mapped,
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
            let chunk = match (&v.data, &v.mapped) {
                (Data::Mem(b), _) | (Data::File(_), Some((b, _))) => {
                    if let Some((_, m)) = &v.mapped {
                        // The next chunk: read ahead while this one is sent.
                        let next = (pos + n) as usize;
                        m.will_need(next - next % CHUNK as usize, 2 * CHUNK as usize);
                    }
                    Ok(b.slice(pos as usize..(pos + n) as usize))
                }
                (Data::File(f), None) => {
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

    /// Issue #27: a verified spool file is served as slices of one mapping of it (no copy into a
    /// buffer): the chunks of a stream are exactly the file's bytes, one after the other in
    /// memory; the mapping lives while the `Verified` or a chunk of it does, and is gone after.
    #[tokio::test]
    async fn a_spool_file_is_served_from_one_mapping_gone_with_its_last_chunk() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let data: Vec<u8> = (0..3_000_001u32).map(|i| (i % 251) as u8).collect();
        let mut f = tempfile::tempfile().expect("file");
        f.write_all(&data).expect("write");
        let name = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd())).expect("fd");
        let name = name.to_string_lossy().trim_end_matches(" (deleted)").to_owned();
        let mapped = || {
            let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
            maps.lines().any(|l| l.contains(&name))
        };
        let permit = Arc::new(tokio::sync::Semaphore::new(1))
            .try_acquire_owned()
            .expect("permit");
        let v = Verified::new(Data::File(Arc::new(f)), data.len() as u64, 0, permit);
        assert!(mapped(), "the file is mapped once it verified");
        let last = data.len() as u64 - 1;
        for (start, end) in [(0, last), (12_345, 2_500_000), (last, last)] {
            let chunks: Vec<Bytes> = v.stream(start, end).map(|c| c.expect("a chunk")).collect().await;
            let got: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
            assert!(got == data[start as usize..=end as usize], "bytes {start}-{end}");
            for w in chunks.windows(2) {
                assert_eq!(
                    w[0].as_ptr().wrapping_add(w[0].len()),
                    w[1].as_ptr(),
                    "one mapping, in order"
                );
            }
        }
        let held = v.stream(100, 200).next().await.expect("a chunk").expect("read");
        drop(v);
        assert!(mapped(), "a chunk still held keeps the mapping");
        assert_eq!(held[..], data[100..=200]);
        drop(held);
        assert!(!mapped(), "unmapped with the last chunk");
    }

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
