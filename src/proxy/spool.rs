//! The spool: where a NAR's bytes wait until their hash is verified.
//!
//! (The memory spool and the file spool share one set of caps; what they become once verified
//! is `verified`.)
//!
//! A single hash over the whole NAR can only be checked at its end, and Nix keeps the bytes it
//! already got when it resumes a transfer, so unverified bytes reach Nix only from a proven peer,
//! never whole and never resumable (`passthrough`); everything else waits here. Small NARs
//! spool in memory, large ones in an unlinked temp file (gone even if the process dies). Both
//! have global caps, taken as semaphore permits (1 permit = 1 MiB) before the first byte is
//! written. Invariant: a [`Verified`] spool exists only after its size and sha256 matched.
//!
//! A file spool need not keep what a pass-through body already took: bytes that went to Nix
//! from the NAR's start are only hashed (issue #16: writing them into the page cache was a fifth
//! of the proxy's CPU at full speed). Such a spool's [`Verified`] serves only from
//! [`Verified::kept_from`] on; whoever needs the whole NAR fetches it again.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::tail::{Tail, TailWriter};
use super::verified::{Data, Verified};
use crate::narinfo::NarHash;

const MIB: u64 = 1024 * 1024;

/// Caps on spooled bytes.
pub struct SpoolLimits {
    /// Largest NAR spooled in memory.
    pub mem_one: u64,
    /// Permits (MiB) for all in-memory spools together.
    pub mem_total: Arc<Semaphore>,
    /// Permits (MiB) for all file spools together.
    pub disk_total: Arc<Semaphore>,
    /// The number of permits `disk_total` started with: a NAR larger than this never fits.
    disk_cap_mib: usize,
    /// Where spool files are created (unlinked at once).
    pub dir: PathBuf,
}

impl SpoolLimits {
    pub fn new(mem_one: u64, mem_total_mib: usize, disk_total_mib: usize, dir: PathBuf) -> Self {
        Self {
            mem_one,
            mem_total: Arc::new(Semaphore::new(mem_total_mib.max(1))),
            disk_total: Arc::new(Semaphore::new(disk_total_mib.max(1))),
            disk_cap_mib: disk_total_mib.max(1),
            dir,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("NAR of {0} bytes exceeds the spool capacity")]
    TooLarge(u64),
    #[error("spool I/O: {0}")]
    Io(#[from] io::Error),
}

/// File spools are written in blocks of this size, hashed and written on a blocking thread so
/// that hashing and disk writes overlap with reading the network: one block is hashed and
/// written while the next one fills (at most two blocks per spool in memory, held as the chunks
/// the network gave, not copied). A block a pass-through body took whole has nothing to write:
/// it is hashed on the fetch's own task (about 0.6 ms a block with SHA-NI), because a trip to a
/// blocking thread and back per block, with the wake-ups of the threads in between, cost more
/// CPU than the hash's overlap saved (issue #27, `docs/benchmarks.md`).
const FILE_BLOCK: usize = 1024 * 1024;

/// A block hashed (and written): the hasher back, with its state where the bytes a pass-through
/// body took end (if they end in or at the end of this block), and the bytes written.
type Landed = (Sha256, Option<Prefix>, io::Result<u64>);

/// A block being hashed and written.
enum InFlight {
    /// On a blocking thread.
    Blocking(tokio::task::JoinHandle<Landed>),
    /// Already hashed on the fetch's task (nothing of it to write).
    Done(Box<Landed>),
}

/// The hasher's state after the first `.0` bytes: those a pass-through body took. One sha256
/// serves both the NAR's check and, should the spool be reset, the check of what the body
/// already sent (`passthrough`), instead of a second sha256 over every passed byte.
type Prefix = (u64, Sha256);

enum Store {
    Mem(BytesMut),
    File {
        file: Arc<std::fs::File>,
        /// Chunks not yet hashed and written (shared with a pass-through body, not copied).
        pending: Vec<Bytes>,
        /// Bytes in `pending`.
        pending_len: usize,
        /// Where the next block goes (bytes written, and being written by `inflight`).
        written: u64,
        /// The block being hashed and written (it holds the hasher until it is done).
        inflight: Option<InFlight>,
    },
}

/// A spool being filled, with its running hash.
pub struct Spool {
    store: Store,
    /// Taken out while a block is hashed on a blocking thread.
    hasher: Option<Sha256>,
    len: u64,
    expected: u64,
    /// Bytes at the start of a file spool that were hashed but not written, because a
    /// pass-through body took them (see [`Spool::write`]). Always 0 for a memory spool.
    unkept: u64,
    /// File spools: the hasher's state at the end of the `unkept` bytes, as of the last block
    /// hashed (see [`Spool::passed_digest`]).
    prefix: Option<Prefix>,
    /// A file spool's tail, for peers served the bytes so far (`tail`, `partial`); none for a
    /// memory spool, and none after a reset.
    tail: Option<(TailWriter, Tail)>,
    _permit: OwnedSemaphorePermit,
}

fn mib(n: u64) -> u32 {
    n.div_ceil(MIB).max(1).min(u32::MAX as u64) as u32
}

impl Spool {
    /// Reserves room for a NAR of `size` bytes: memory if small and available, else disk.
    pub async fn new(limits: &SpoolLimits, size: u64) -> Result<Self, SpoolError> {
        let need = mib(size);
        if size <= limits.mem_one {
            if let Ok(p) = limits.mem_total.clone().try_acquire_many_owned(need) {
                return Ok(Self {
                    store: Store::Mem(BytesMut::with_capacity(size as usize)),
                    hasher: Some(Sha256::new()),
                    len: 0,
                    expected: size,
                    unkept: 0,
                    prefix: None,
                    tail: None,
                    _permit: p,
                });
            }
        }
        let (permit, file) = reserve_disk(limits, size).await?;
        let file = Arc::new(file);
        let tail = Some(TailWriter::new(file.clone(), size));
        Ok(Self {
            store: Store::File {
                file,
                pending: Vec::new(),
                pending_len: 0,
                written: 0,
                inflight: None,
            },
            hasher: Some(Sha256::new()),
            len: 0,
            expected: size,
            unkept: 0,
            prefix: None,
            tail,
            _permit: permit,
        })
    }

    /// The bytes landed so far, for readers that follow them (a file spool until its first
    /// reset; see `tail`).
    pub fn tail(&self) -> Option<Tail> {
        self.tail.as_ref().map(|(_, t)| t.clone())
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends bytes (the caller checked they fit in the expected size). The first `passed`
    /// bytes of `chunk` were handed to a pass-through body: while nothing but such bytes came
    /// before them, a file spool only hashes them (it keeps the rest, and a memory spool keeps
    /// everything: cheap, and a request that joins the fetch gets the whole NAR).
    pub async fn write(&mut self, chunk: Bytes, passed: usize) -> Result<(), SpoolError> {
        let at = self.len;
        self.len += chunk.len() as u64;
        match &mut self.store {
            Store::Mem(b) => {
                if let Some(h) = self.hasher.as_mut() {
                    h.update(&chunk);
                }
                b.extend_from_slice(&chunk);
                Ok(())
            }
            Store::File {
                pending, pending_len, ..
            } => {
                if self.unkept == at {
                    self.unkept += passed.min(chunk.len()) as u64;
                }
                *pending_len += chunk.len();
                pending.push(chunk);
                if *pending_len >= FILE_BLOCK {
                    self.flush().await?;
                }
                Ok(())
            }
        }
    }

    /// Waits for the block being hashed and written (if any) and takes the hasher back.
    async fn land(&mut self) -> Result<(), SpoolError> {
        let Store::File { inflight, .. } = &mut self.store else {
            return Ok(());
        };
        let Some(h) = inflight.take() else {
            return Ok(());
        };
        let (hasher, prefix, r) = match h {
            InFlight::Blocking(h) => h.await.map_err(io::Error::other)?,
            InFlight::Done(landed) => *landed,
        };
        self.hasher = Some(hasher);
        if prefix.is_some() {
            self.prefix = prefix;
        }
        r?;
        Ok(())
    }

    /// Starts hashing and writing the pending block of a file spool, off the reactor, once the
    /// previous block is done (the hash runs in order; reading the network goes on meanwhile).
    async fn flush(&mut self) -> Result<(), SpoolError> {
        self.land().await?;
        let Store::File {
            file,
            pending,
            pending_len,
            written,
            inflight,
        } = &mut self.store
        else {
            return Ok(());
        };
        if pending.is_empty() {
            return Ok(());
        }
        let block = std::mem::take(pending);
        let (file, offset, keep_from) = (file.clone(), *written, self.unkept);
        let nothing_to_write = keep_from >= offset + *pending_len as u64;
        *written += *pending_len as u64;
        *pending_len = 0;
        let mut hasher = self.hasher.take().unwrap_or_default();
        let tail = self.tail.as_ref().map(|(w, _)| w.clone());
        let job = move || -> Landed {
            // Every byte is hashed; only those from `keep_from` on are written. The hasher's
            // state where the passed bytes end is kept (the last block that reaches them).
            let (mut pos, mut r, mut prefix) = (offset, Ok(()), None);
            for piece in &block {
                let end = pos + piece.len() as u64;
                if keep_from > 0 && pos <= keep_from && keep_from < end {
                    let at = (keep_from - pos) as usize;
                    hasher.update(&piece[..at]);
                    prefix = Some((keep_from, hasher.clone()));
                    hasher.update(&piece[at..]);
                } else {
                    hasher.update(piece);
                }
                if end > keep_from && r.is_ok() {
                    let skip = keep_from.saturating_sub(pos) as usize;
                    r = file.write_all_at(&piece[skip..], pos + skip as u64);
                }
                pos = end;
            }
            if keep_from > 0 && keep_from == pos {
                prefix = Some((keep_from, hasher.clone()));
            }
            // Readers of the tail see the block once it is in the file, and only while the
            // file holds every byte from the start.
            match (&tail, &r) {
                (Some(t), Ok(())) if keep_from == 0 => t.filled(pos),
                (Some(t), _) => t.abandon(),
                (None, _) => {}
            }
            (hasher, prefix, r.map(|()| pos - offset))
        };
        *inflight = Some(if nothing_to_write {
            InFlight::Done(Box::new(job()))
        } else {
            InFlight::Blocking(tokio::task::spawn_blocking(job))
        });
        Ok(())
    }

    /// Starts over (after a source that lied), keeping the reservation. A block still being
    /// written lands first, so no late write reaches the emptied file.
    pub async fn reset(&mut self) -> Result<(), SpoolError> {
        if let Some((w, _)) = self.tail.take() {
            w.abandon();
        }
        let landed = self.land().await;
        self.hasher = Some(Sha256::new());
        self.len = 0;
        self.unkept = 0;
        self.prefix = None;
        match &mut self.store {
            Store::Mem(b) => b.clear(),
            Store::File {
                file,
                pending,
                pending_len,
                written,
                ..
            } => {
                pending.clear();
                *pending_len = 0;
                *written = 0;
                file.set_len(0)?;
            }
        }
        landed
    }

    /// The sha256 of the first `n` bytes, where `n` is what a pass-through body took (asked before
    /// a reset, `passthrough`): from a memory spool's bytes, or from the file spool's hasher
    /// state where the passed bytes end (they are not in the file). `None` when the spool cannot
    /// tell (`n` is not where its passed bytes end, or a block failed).
    pub async fn passed_digest(&mut self, n: u64) -> Option<[u8; 32]> {
        if let Store::Mem(b) = &self.store {
            return b.get(..usize::try_from(n).ok()?).map(|p| Sha256::digest(p).into());
        }
        self.flush().await.ok()?;
        self.land().await.ok()?;
        match &self.prefix {
            Some((at, h)) if *at == n => Some(h.clone().finalize().into()),
            _ => None,
        }
    }

    /// Checks size and hash; on success the spool becomes servable, else it comes back (boxed)
    /// for another attempt.
    pub async fn verify(mut self, want: &NarHash) -> Result<Verified, Box<Spool>> {
        if self.len != self.expected || self.flush().await.is_err() || self.land().await.is_err() {
            return Err(Box::new(self));
        }
        let digest: [u8; 32] = self.hasher.clone().unwrap_or_default().finalize().into();
        if NarHash::from_digest(digest) != *want {
            return Err(Box::new(self));
        }
        let data = match self.store {
            Store::Mem(b) => Data::Mem(b.freeze()),
            Store::File { file, .. } => Data::File(file),
        };
        Ok(Verified::new(data, self.len, self.unkept, self._permit))
    }
}

/// Reserves disk for a NAR of `size` bytes (waiting up to a minute for room) and opens an
/// unlinked temp file for it.
async fn reserve_disk(limits: &SpoolLimits, size: u64) -> Result<(OwnedSemaphorePermit, std::fs::File), SpoolError> {
    let need = mib(size);
    if need as usize > limits.disk_cap_mib {
        return Err(SpoolError::TooLarge(size));
    }
    let permit = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        limits.disk_total.clone().acquire_many_owned(need),
    )
    .await
    .map_err(|_| SpoolError::TooLarge(size))?
    .map_err(|_| SpoolError::TooLarge(size))?;
    std::fs::create_dir_all(&limits.dir)?;
    Ok((permit, tempfile::tempfile_in(&limits.dir)?))
}

/// A file spool filled out of order (segments from several sources at once) and hashed once, at
/// the end. Same caps as [`Spool`].
pub struct PositionalSpool {
    file: Arc<std::fs::File>,
    size: u64,
    _permit: OwnedSemaphorePermit,
}

impl PositionalSpool {
    pub async fn new(limits: &SpoolLimits, size: u64) -> Result<Self, SpoolError> {
        let (permit, file) = reserve_disk(limits, size).await?;
        file.set_len(size)?;
        Ok(Self {
            file: Arc::new(file),
            size,
            _permit: permit,
        })
    }

    /// Writes `block` (chunks in order, one after the other) at `offset`, on a blocking thread
    /// (the caller keeps segments inside the size).
    pub async fn write_at(&self, offset: u64, block: Vec<Bytes>) -> Result<(), SpoolError> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || write_all_vectored_at(&file, &block, offset))
            .await
            .map_err(io::Error::other)??;
        Ok(())
    }

    /// Hashes the whole file; servable only if it matches.
    pub async fn verify(self, want: &NarHash) -> Option<Verified> {
        let (file, size) = (self.file.clone(), self.size);
        let digest = tokio::task::spawn_blocking(move || -> io::Result<[u8; 32]> {
            let mut h = Sha256::new();
            let mut buf = vec![0u8; FILE_BLOCK];
            let mut pos = 0;
            while pos < size {
                let n = (size - pos).min(FILE_BLOCK as u64) as usize;
                file.read_exact_at(&mut buf[..n], pos)?;
                h.update(&buf[..n]);
                pos += n as u64;
            }
            Ok(h.finalize().into())
        })
        .await
        .ok()?
        .ok()?;
        (NarHash::from_digest(digest) == *want)
            .then(|| Verified::new(Data::File(self.file), self.size, 0, self._permit))
    }
}

/// Most pieces handed to one `pwritev` (below the kernel's `IOV_MAX`, 1,024).
const MAX_IOVECS: usize = 512;

/// Writes `pieces` one after the other at `offset`: one `pwritev` per block of pieces (the
/// chunks one read each gave), not one `pwrite` per chunk; partial writes continue where they
/// stopped.
fn write_all_vectored_at(file: &std::fs::File, pieces: &[Bytes], mut offset: u64) -> io::Result<()> {
    let mut rest: Vec<&[u8]> = pieces.iter().map(|p| &p[..]).filter(|p| !p.is_empty()).collect();
    let mut first = 0;
    while first < rest.len() {
        let iov: Vec<io::IoSlice<'_>> = rest[first..(first + MAX_IOVECS).min(rest.len())]
            .iter()
            .map(|p| io::IoSlice::new(p))
            .collect();
        let at = i64::try_from(offset).map_err(io::Error::other)?;
        let n = nix::sys::uio::pwritev(file, &iov, at).map_err(io::Error::from)?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        offset += n as u64;
        let mut left = n;
        while left > 0 && first < rest.len() {
            let len = rest[first].len();
            if left >= len {
                left -= len;
                first += 1;
            } else {
                rest[first] = &rest[first][left..];
                left = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
