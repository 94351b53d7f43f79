//! The store server's streamed bodies (NARs and its own binary): the transfer slots they take,
//! the pace their clients must keep, and the tasks that feed them.
//!
//! Invariants: a streamed body holds its transfer slot until its task ends; each chunk goes
//! through a channel of [`NAR_CHANNEL_CHUNKS`] and [`Pace`], so a client that stops reading
//! stops its producer and is cut off; every feeding task belongs to [`Streams::tasks`]
//! (`http::BodyTasks`), which the node owns.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::compress;
use super::transfers::{Permit, Transfers};
use crate::http::{Body, BodyTasks, Pace, PaceError};
use crate::store::NarStream;

/// Chunks buffered between a body's source and its client (64 KiB from the daemon, 128 KiB from
/// disk): with the source's own buffer, about 1 MiB per stream.
pub const NAR_CHANNEL_CHUNKS: usize = 4;
/// How long a client may accept no bytes of a streamed body by default.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// What the store server needs to stream bodies.
pub struct Streams {
    /// Slots for streamed bodies: a cap, a share per address, a queue with a deadline.
    pub transfers: Arc<Transfers>,
    /// A client that accepts no bytes for this long is dropped, freeing its daemon connection.
    pub stall: Duration,
    /// The tasks feeding the bodies (run as a part of the node: [`BodyTasks::own`]).
    pub tasks: Arc<BodyTasks>,
}

/// Which bytes of which NAR a body carries.
#[derive(Clone)]
pub struct NarPart {
    /// For the log.
    pub path: String,
    pub size: u64,
    /// First and last byte sent, inclusive.
    pub start: u64,
    pub end: u64,
    /// zstd-compressed (whole NARs only).
    pub zstd: bool,
}

impl Streams {
    pub fn new(transfers: Transfers) -> Self {
        Self {
            transfers: Arc::new(transfers),
            stall: STALL_TIMEOUT,
            tasks: Arc::default(),
        }
    }

    /// The pace a client of a streamed body must keep.
    pub fn pace(&self) -> Pace {
        Pace::new(self.stall)
    }

    /// The body for `part` of `stream`, fed by a pump task (and with zstd an encoder task behind
    /// it) that holds `permit` until the transfer ends.
    pub fn nar_body(&self, stream: NarStream, part: NarPart, permit: Option<Arc<Permit>>, started: Instant) -> Body {
        let (tx, rx) = mpsc::channel(NAR_CHANNEL_CHUNKS);
        // With zstd, the pump feeds an encoder task, which feeds the client.
        let tx = if part.zstd {
            let (raw_tx, raw_rx) = mpsc::channel(NAR_CHANNEL_CHUNKS);
            self.tasks
                .spawn(compress::compress(raw_rx, tx, part.size, self.pace(), permit.clone()));
            raw_tx
        } else {
            tx
        };
        let pace = self.pace();
        self.tasks.spawn(async move {
            let _permit = permit;
            let r = pump(stream, &tx, part.start, part.end, pace).await;
            let ms = started.elapsed().as_millis() as u64;
            let path = part.path;
            match r {
                Ok(bytes) => tracing::info!(%path, bytes, ms, "NAR served"),
                Err(e) => {
                    tracing::warn!(%path, ms, error = %e, "NAR transfer aborted");
                    let _ = tx.try_send(Err(std::io::Error::other(e)));
                }
            }
        });
        Body::Stream(rx)
    }
}

impl Streams {
    /// The body for bytes `start..=end` of a NAR still arriving in `tail` (`server::partial`),
    /// fed by a task that holds `permit`, reads what landed, waits at most `idle` for more and
    /// keeps its client's pace; a reset spool or a silent one ends the body with an error.
    pub fn tail_body(
        &self,
        mut tail: crate::proxy::tail::Tail,
        path: String,
        start: u64,
        end: u64,
        permit: Arc<Permit>,
        idle: Duration,
    ) -> Body {
        let (tx, rx) = mpsc::channel(NAR_CHANNEL_CHUNKS);
        let mut pace = self.pace();
        self.tasks.spawn(async move {
            let _permit = permit;
            let mut pos = start;
            while pos <= end {
                match tail.read_at(pos, end, idle).await {
                    Ok(chunk) => {
                        pos += chunk.len() as u64;
                        if pace.send(&tx, Ok(chunk)).await.is_err() {
                            tracing::info!(%path, sent = pos - start, "in-flight NAR client left");
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::info!(%path, sent = pos - start, error = %e, "in-flight NAR transfer ended early");
                        let _ = tx.try_send(Err(std::io::Error::other(e)));
                        return;
                    }
                }
            }
            tracing::info!(%path, bytes = pos - start, "in-flight NAR served");
        });
        Body::Stream(rx)
    }
}

/// Why a NAR transfer stopped early.
#[derive(Debug, thiserror::Error)]
enum PumpError {
    #[error(transparent)]
    Store(#[from] crate::store::Error),
    #[error(transparent)]
    Client(#[from] PaceError),
}

/// Copies bytes `start..=end` of the NAR to the client. Returns the bytes sent.
async fn pump(
    mut stream: NarStream,
    tx: &mpsc::Sender<Result<Bytes, std::io::Error>>,
    start: u64,
    end: u64,
    mut pace: Pace,
) -> Result<u64, PumpError> {
    let mut pos = 0u64;
    let mut sent = 0u64;
    while let Some(chunk) = stream.next_chunk().await? {
        let (c_start, c_end) = (pos, pos + chunk.len() as u64);
        pos = c_end;
        if c_end <= start {
            continue;
        }
        let from = start.saturating_sub(c_start) as usize;
        let to = ((end + 1).min(c_end) - c_start) as usize;
        let piece = chunk.slice(from..to);
        sent += piece.len() as u64;
        pace.send(tx, Ok(piece)).await?;
        if c_end > end {
            // The client asked for less than the whole NAR; the connection is dropped mid-NAR.
            return Ok(sent);
        }
    }
    Ok(sent)
}
