//! The tail of a file spool being filled, for readers that follow it as it grows (issue #24:
//! a host serves its peers the bytes of a NAR it is still fetching, see `partial`).
//!
//! The spool's writer publishes [`Progress`]: the bytes written contiguously from the NAR's
//! start and landed in the file (a block is published once its `pwrite` returned), or that the
//! spool was reset or abandoned. A [`Tail`] reads bytes from the file up to that mark and waits
//! for more, at most `idle` at a time; a reset, an abandoned spool or the wait running out ends
//! the reader with an error (the body it feeds is cut, never completed with other bytes).
//!
//! These bytes are **unverified**: they are what this host's source sent so far. Whoever reads
//! them (a peer's proxy) verifies the whole NAR against its signed hash, as for any source.
//! Memory: one chunk of [`TAIL_CHUNK`] per reader at a time; the file is shared (an `Arc`), so
//! a reader keeps a spool file's disk in use until it ends (bounded by its idle wait and the
//! store server's transfer slots and pace).

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;

/// Bytes a tail reader reads from the file at a time.
pub const TAIL_CHUNK: usize = 128 * 1024;

/// How far a spool's bytes stand, as its readers see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// This many bytes from the NAR's start are in the file.
    Filled(u64),
    /// The spool was reset (a source lied) or its bytes are not all in the file: readers stop.
    Abandoned,
}

/// The writer's side: kept by the spool, told each landed block.
#[derive(Clone)]
pub struct TailWriter(Arc<watch::Sender<Progress>>);

impl TailWriter {
    /// The writer and the first reader's view of a spool that has `size` bytes to come in `file`.
    pub fn new(file: Arc<std::fs::File>, size: u64) -> (Self, Tail) {
        let (tx, rx) = watch::channel(Progress::Filled(0));
        (Self(Arc::new(tx)), Tail { file, size, rx })
    }

    /// Bytes `..filled` from the start are in the file.
    pub fn filled(&self, filled: u64) {
        self.0.send_if_modified(|p| match p {
            Progress::Filled(n) if *n < filled => {
                *n = filled;
                true
            }
            _ => false,
        });
    }

    /// Readers stop (a reset, or bytes that will not be written).
    pub fn abandon(&self) {
        self.0.send_replace(Progress::Abandoned);
    }
}

/// Why a tail reader stopped before its end.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error("the spool was reset or abandoned")]
    Abandoned,
    #[error("no new bytes for {0:?}")]
    Idle(Duration),
    #[error("reading the spool: {0}")]
    Io(#[from] io::Error),
}

/// A reader's view of a spool being filled: cheap to clone.
#[derive(Clone)]
pub struct Tail {
    file: Arc<std::fs::File>,
    size: u64,
    rx: watch::Receiver<Progress>,
}

impl Tail {
    /// The NAR's size (the signed NarSize the spool was made for).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes from the start in the file now (0 once abandoned).
    pub fn filled(&self) -> u64 {
        match *self.rx.borrow() {
            Progress::Filled(n) => n,
            Progress::Abandoned => 0,
        }
    }

    /// The spool was reset, or its start is not in the file (a pass-through took it): nothing
    /// to offer.
    pub fn abandoned(&self) -> bool {
        *self.rx.borrow() == Progress::Abandoned
    }

    /// Reads the next chunk at `pos` (at most `TAIL_CHUNK`, never past `end`, inclusive),
    /// waiting at most `idle` for the writer to get there.
    pub async fn read_at(&mut self, pos: u64, end: u64, idle: Duration) -> Result<Bytes, TailError> {
        let filled = loop {
            match *self.rx.borrow_and_update() {
                Progress::Abandoned => return Err(TailError::Abandoned),
                Progress::Filled(n) if n > pos => break n,
                Progress::Filled(_) => {}
            }
            match tokio::time::timeout(idle, self.rx.changed()).await {
                Err(_) => return Err(TailError::Idle(idle)),
                // The writer is gone: whatever it published is all there will be.
                Ok(Err(_)) if self.filled() > pos => continue,
                Ok(Err(_)) => return Err(TailError::Abandoned),
                Ok(Ok(())) => {}
            }
        };
        let n = (filled.min(end + 1) - pos).min(TAIL_CHUNK as u64) as usize;
        let file = self.file.clone();
        let buf = tokio::task::spawn_blocking(move || -> io::Result<Bytes> {
            let mut b = BytesMut::zeroed(n);
            file.read_exact_at(&mut b, pos)?;
            Ok(b.freeze())
        })
        .await
        .map_err(io::Error::other)??;
        // A reset after the read: these bytes may be another attempt's; stop rather than mix.
        if *self.rx.borrow() == Progress::Abandoned {
            return Err(TailError::Abandoned);
        }
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(data: &[u8]) -> Arc<std::fs::File> {
        let mut f = tempfile::tempfile().expect("temp file");
        f.write_all(data).expect("write");
        Arc::new(f)
    }

    /// A reader follows the tail as it grows: it gets what is there, waits for more, stops at
    /// its end; a reset stops it; a writer that went quiet makes it give up after its idle wait.
    #[tokio::test(start_paused = true)]
    async fn a_reader_follows_the_tail_and_stops_on_reset_or_silence() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (w, tail) = TailWriter::new(file_with(&data), data.len() as u64);
        let idle = Duration::from_secs(5);
        w.filled(1000);
        let mut r = tail.clone();
        assert_eq!(r.read_at(0, 299_999, idle).await.expect("first bytes"), data[..1000]);
        // Waits for the writer.
        let reader = tokio::spawn({
            let mut r = tail.clone();
            async move {
                let mut got = Vec::new();
                let mut pos = 1000u64;
                while pos < 250_000 {
                    let c = r.read_at(pos, 249_999, idle).await?;
                    pos += c.len() as u64;
                    got.extend_from_slice(&c);
                }
                Ok::<_, TailError>(got)
            }
        });
        tokio::task::yield_now().await;
        w.filled(200_000);
        tokio::task::yield_now().await;
        w.filled(300_000);
        let got = reader.await.expect("join").expect("read to its end");
        assert!(
            got == data[1000..250_000],
            "the reader got the bytes in order, up to its end"
        );
        // Silence: the idle wait ends the reader.
        let (w2, mut t2) = TailWriter::new(file_with(&data), data.len() as u64);
        w2.filled(10);
        let t0 = tokio::time::Instant::now();
        assert!(matches!(t2.read_at(10, 99, idle).await, Err(TailError::Idle(_))));
        assert_eq!(t0.elapsed(), idle);
        // A reset stops a waiting reader at once.
        let waiting = tokio::spawn(async move { t2.read_at(10, 99, Duration::from_secs(60)).await });
        tokio::task::yield_now().await;
        w2.abandon();
        assert!(matches!(waiting.await.expect("join"), Err(TailError::Abandoned)));
        // A writer gone after publishing: its bytes are still read, nothing past them.
        let (w3, mut t3) = TailWriter::new(file_with(&data), data.len() as u64);
        w3.filled(50);
        drop(w3);
        assert_eq!(t3.read_at(0, 99, idle).await.expect("published bytes"), data[..50]);
        assert!(matches!(t3.read_at(50, 99, idle).await, Err(TailError::Abandoned)));
    }
}
