//! Splitting a large NAR between several peers: equal byte ranges fetched at once with `Range`,
//! each written at its offset in a positional spool, then hashed whole. Any failure or a
//! mismatch gives up the split (the caller then fetches from one source at a time, where a lie
//! can be attributed). At most [`MAX_PARALLEL_SOURCES`] peers; blocks of [`SEGMENT_BLOCK`].

use bytes::BytesMut;
use tokio::io::AsyncReadExt;

use super::fetch::RateFloor;
use super::health::Verdict;
use super::source::{Candidate, SourceError};
use super::spool::{PositionalSpool, SpoolError, Verified};
use super::Proxy;
use crate::narinfo::NarHash;

/// A NAR at least this large is split between peers when several have it.
pub const PARALLEL_MIN_BYTES: u64 = 64 * 1024 * 1024;
/// Most peers one NAR is split between.
pub const MAX_PARALLEL_SOURCES: usize = 4;
/// Segment bytes written to the spool at a time.
const SEGMENT_BLOCK: usize = 1024 * 1024;

/// Why a segment was not fetched.
#[derive(Debug, thiserror::Error)]
enum SegmentError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("spool: {0}")]
    Spool(SpoolError),
}

impl Proxy {
    /// Fetches a large NAR in equal segments from several peers at once, written at their
    /// offsets, then hashes it whole. `None` when a segment failed or the whole does not match
    /// (the caller then fetches from one source at a time, where a lie can be attributed).
    pub(super) async fn fetch_parallel(&self, peers: &[Candidate], size: u64, nar_hash: &NarHash) -> Option<Verified> {
        let spool = match PositionalSpool::new(&self.spool, size).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot spool NAR for a split fetch");
                return None;
            }
        };
        let k = peers.len() as u64;
        let results = futures_util::future::join_all(peers.iter().enumerate().map(|(i, c)| {
            let (start, end) = (size * i as u64 / k, size * (i as u64 + 1) / k - 1);
            self.copy_segment(c, &spool, start, end)
        }))
        .await;
        let mut all_ok = true;
        for (c, r) in peers.iter().zip(&results) {
            match r {
                Ok(()) => {}
                Err(SegmentError::Source(e)) => {
                    tracing::info!(source = ?c.source, error = %e, "NAR segment failed; fetching whole instead");
                    self.judge(&c.source, Verdict::Failed(e));
                    all_ok = false;
                }
                Err(e @ SegmentError::Spool(_)) => {
                    tracing::warn!(error = %e, "cannot spool a NAR segment; fetching whole instead");
                    all_ok = false;
                }
            }
        }
        if !all_ok {
            return None;
        }
        match spool.verify(nar_hash).await {
            Some(v) => {
                for c in peers {
                    self.judge(&c.source, Verdict::Delivered);
                }
                self.stats.update(|s| s.nars_split += 1);
                Some(v)
            }
            None => {
                self.stats.update(|s| s.lies += 1);
                tracing::warn!("NAR segments from several peers do not match the signed hash; refetching whole");
                None
            }
        }
    }

    /// Copies bytes `start..=end` of a peer's NAR to their place in `spool`.
    async fn copy_segment(
        &self,
        c: &Candidate,
        spool: &PositionalSpool,
        start: u64,
        end: u64,
    ) -> Result<(), SegmentError> {
        let mut reader = self.sources.open_range(c, start, end).await?;
        let idle = self.sources.timeouts(&c.source).idle;
        let want = end + 1 - start;
        let (mut pos, mut buf) = (start, BytesMut::with_capacity(SEGMENT_BLOCK));
        let mut floor = RateFloor::new(&c.source, want);
        loop {
            let n = match tokio::time::timeout(idle, reader.read_buf(&mut buf)).await {
                Err(_) => return Err(SourceError::Timeout.into()),
                Ok(r) => r.map_err(SourceError::Read)?,
            };
            floor.received(n as u64)?;
            if pos + buf.len() as u64 > end + 1 {
                return Err(SourceError::Overrun(want).into());
            }
            if n == 0 || buf.len() >= SEGMENT_BLOCK {
                let block = buf.split().freeze();
                let len = block.len() as u64;
                if len > 0 {
                    spool.write_at(pos, block).await.map_err(SegmentError::Spool)?;
                    pos += len;
                    self.stats.update(|s| s.bytes_from_peers += len);
                }
                buf.reserve(SEGMENT_BLOCK);
            }
            if n == 0 {
                break;
            }
        }
        if pos != end + 1 {
            return Err(SourceError::Short { got: pos - start, want }.into());
        }
        Ok(())
    }
}
