//! Pacing of streamed bodies: a client must take each chunk within the stall timeout and at least
//! [`PACE_WINDOW_BYTES`] in every [`PACE_WINDOW`], or the transfer ends and frees what it held.

use std::io;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

/// Bytes a client must accept within every [`PACE_WINDOW`] of a streamed body (on top of never
/// stalling for longer than its stall timeout): 12.8 KiB/s on average, far below any LAN or
/// Wi-Fi client, far above an attacker that reads a few bytes a second to pin the transfer.
pub const PACE_WINDOW_BYTES: u64 = 128 * 1024;
/// See [`PACE_WINDOW_BYTES`].
pub const PACE_WINDOW: Duration = Duration::from_secs(10);

/// Why a paced body stream stopped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PaceError {
    #[error("client accepted no data for {0:?}")]
    Stalled(Duration),
    #[error("client accepted less than {bytes} bytes in {window:?}")]
    TooSlow { bytes: u64, window: Duration },
    #[error("client went away")]
    Gone,
}

/// Feeds a streamed body and cuts off a client that reads too slowly: each chunk must be taken
/// within `stall`, and at least [`PACE_WINDOW_BYTES`] within every [`PACE_WINDOW`]. A transfer
/// therefore holds what it holds (a daemon connection, a disk reader thread, an encoder) only
/// while its client keeps up.
pub struct Pace {
    stall: Duration,
    window_bytes: u64,
    window: Duration,
    /// Start of the current window and the bytes taken in it.
    window_start: tokio::time::Instant,
    in_window: u64,
}

impl Pace {
    pub fn new(stall: Duration) -> Self {
        Self::with_window(stall, PACE_WINDOW_BYTES, PACE_WINDOW)
    }

    pub fn with_window(stall: Duration, window_bytes: u64, window: Duration) -> Self {
        Self {
            stall,
            window_bytes,
            window,
            window_start: tokio::time::Instant::now(),
            in_window: 0,
        }
    }

    /// Sends `chunk` within the deadline; an `Err` chunk is sent as is (it aborts the response).
    pub async fn send(
        &mut self,
        tx: &mpsc::Sender<Result<Bytes, io::Error>>,
        chunk: Result<Bytes, io::Error>,
    ) -> Result<(), PaceError> {
        let len = chunk.as_ref().map_or(0, |c| c.len() as u64);
        match self.within(tx.send(chunk)).await? {
            Err(_) => Err(PaceError::Gone),
            Ok(()) => {
                self.took(len);
                Ok(())
            }
        }
    }

    /// Runs `step` (a step that moves bytes to the client: a send into its body's channel, a
    /// wait for its socket to take more) within the deadline: the stall timeout, or the end of
    /// the current window if that comes first. Count what it moved with [`Self::took`].
    pub async fn within<T>(&mut self, step: impl std::future::Future<Output = T>) -> Result<T, PaceError> {
        let now = tokio::time::Instant::now();
        let window_end = self.window_start + self.window;
        let (deadline, too_slow) = if now + self.stall <= window_end {
            (now + self.stall, false)
        } else {
            (window_end, true)
        };
        match tokio::time::timeout_at(deadline, step).await {
            Err(_) if too_slow => Err(PaceError::TooSlow {
                bytes: self.window_bytes,
                window: self.window,
            }),
            Err(_) => Err(PaceError::Stalled(self.stall)),
            Ok(v) => Ok(v),
        }
    }

    /// Counts `len` bytes the client took.
    pub fn took(&mut self, len: u64) {
        self.in_window += len;
        if self.in_window >= self.window_bytes {
            self.window_start = tokio::time::Instant::now();
            self.in_window = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pace_cuts_off_stalled_and_too_slow_readers_only() {
        let chunk = || Ok(Bytes::from_static(&[7u8; 10]));
        // A reader that never reads: the channel takes one chunk, then the window (10 s) runs out
        // before the 60 s stall timeout.
        let (tx, _rx) = mpsc::channel(1);
        let mut p = Pace::with_window(Duration::from_secs(60), 100, Duration::from_secs(10));
        let t0 = tokio::time::Instant::now();
        p.send(&tx, chunk()).await.expect("first chunk fits the channel");
        let e = p.send(&tx, chunk()).await.expect_err("never read");
        assert!(matches!(e, PaceError::TooSlow { .. }), "{e:?}");
        assert_eq!(t0.elapsed(), Duration::from_secs(10));
        // With a shorter stall timeout, that one fires first.
        let (tx, _rx) = mpsc::channel(1);
        let mut p = Pace::with_window(Duration::from_secs(2), 100, Duration::from_secs(10));
        p.send(&tx, chunk()).await.expect("fits");
        assert_eq!(
            p.send(&tx, chunk()).await,
            Err(PaceError::Stalled(Duration::from_secs(2)))
        );
        // A reader taking 10 bytes a second: 100 bytes per 10 s window, just enough, for a minute.
        let (tx, mut rx) = mpsc::channel(1);
        let reader = tokio::spawn(async move {
            while rx.recv().await.is_some() {
                tokio::time::sleep(Duration::from_millis(990)).await;
            }
        });
        let mut p = Pace::with_window(Duration::from_secs(60), 100, Duration::from_secs(10));
        for i in 0..60 {
            p.send(&tx, chunk()).await.unwrap_or_else(|e| panic!("chunk {i}: {e}"));
        }
        // One taking 5 bytes a second (a chunk every 2 s) is cut off within a window.
        drop(tx);
        reader.await.expect("reader");
        let (tx, mut rx) = mpsc::channel(1);
        tokio::spawn(async move {
            while rx.recv().await.is_some() {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
        let mut p = Pace::with_window(Duration::from_secs(60), 100, Duration::from_secs(10));
        let t0 = tokio::time::Instant::now();
        let mut sent = 0;
        while p.send(&tx, chunk()).await.is_ok() {
            sent += 1;
        }
        assert!(
            sent < 10 && t0.elapsed() <= Duration::from_secs(10),
            "{sent} chunks in {:?}",
            t0.elapsed()
        );
        // A reader that went away.
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        assert_eq!(p.send(&tx, chunk()).await, Err(PaceError::Gone));
    }
}
