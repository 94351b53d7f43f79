//! Splitting a large NAR between several peers: equal byte ranges fetched at once with `Range`,
//! each written at its offset in a positional spool, then hashed whole. Any failure or a
//! mismatch gives up the split (the caller then fetches from one source at a time, where a lie
//! can be attributed). At most [`MAX_PARALLEL_SOURCES`] peers; blocks of [`SEGMENT_BLOCK`].

use bytes::Bytes;

use super::book::SourceBook;
use super::copy::SourceRead;
use super::health::Verdict;
use super::source::{Candidate, SourceError};
use super::spool::{PositionalSpool, SpoolError, SpoolLimits};
use super::stats::StatsKeeper;
use super::verified::Verified;
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

/// Fetches a large NAR in equal segments from several peers at once, written at their offsets,
/// then hashes it whole; judges the peers in `book`. `None` when a segment failed or the whole
/// does not match (the caller then fetches from one source at a time, where a lie can be
/// attributed).
pub async fn fetch(
    book: &SourceBook,
    stats: &StatsKeeper,
    limits: &SpoolLimits,
    peers: &[Candidate],
    size: u64,
    nar_hash: &NarHash,
) -> Option<Verified> {
    let spool = match PositionalSpool::new(limits, size).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot spool NAR for a split fetch");
            return None;
        }
    };
    let k = peers.len() as u64;
    let results = futures_util::future::join_all(peers.iter().enumerate().map(|(i, c)| {
        let (start, end) = (size * i as u64 / k, size * (i as u64 + 1) / k - 1);
        copy_segment(book, stats, c, &spool, start, end)
    }))
    .await;
    let mut all_ok = true;
    for (c, r) in peers.iter().zip(&results) {
        match r {
            Ok(()) => {}
            Err(SegmentError::Source(e)) => {
                tracing::info!(source = ?c.source, error = %e, "NAR segment failed; fetching whole instead");
                book.judge(&c.source, Verdict::Failed(e));
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
                book.judge(&c.source, Verdict::Delivered);
            }
            stats.update(|s| s.nars_split += 1);
            Some(v)
        }
        None => {
            stats.update(|s| s.lies += 1);
            tracing::warn!("NAR segments from several peers do not match the signed hash; refetching whole");
            None
        }
    }
}

/// Copies bytes `start..=end` of a peer's NAR to their place in `spool`, in blocks of
/// [`SEGMENT_BLOCK`] (the chunks read, not copied).
async fn copy_segment(
    book: &SourceBook,
    stats: &StatsKeeper,
    c: &Candidate,
    spool: &PositionalSpool,
    start: u64,
    end: u64,
) -> Result<(), SegmentError> {
    let sources = book.sources();
    let reader = sources.open_range(c, start, end).await?;
    let want = end + 1 - start;
    let mut read = SourceRead::new(sources, &c.source, reader, want);
    let (mut pos, mut block, mut block_len): (u64, Vec<Bytes>, usize) = (start, Vec::new(), 0);
    loop {
        let chunk = read.next().await?;
        if let Some(chunk) = &chunk {
            if pos + (block_len + chunk.len()) as u64 > end + 1 {
                return Err(SourceError::Overrun(want).into());
            }
            block_len += chunk.len();
            block.push(chunk.clone());
        }
        if chunk.is_none() || block_len >= SEGMENT_BLOCK {
            let len = std::mem::take(&mut block_len) as u64;
            if len > 0 {
                spool
                    .write_at(pos, std::mem::take(&mut block))
                    .await
                    .map_err(SegmentError::Spool)?;
                pos += len;
                stats.update(|s| s.bytes_from_peers += len);
            }
        }
        if chunk.is_none() {
            break;
        }
    }
    if pos != end + 1 {
        return Err(SourceError::Short { got: pos - start, want }.into());
    }
    Ok(())
}
