//! Splitting a large NAR between several peers: equal byte ranges fetched at once with `Range`,
//! each written at its offset in a positional spool, then hashed whole. A failed segment goes on
//! from where it stopped with another peer (at most [`MAX_SEGMENT_RETRIES`] per split); past that,
//! or on a mismatch, the split is given up (the caller then fetches from one source at a time, where a lie
//! can be attributed). At most [`MAX_PARALLEL_SOURCES`] peers; blocks of [`SEGMENT_BLOCK`].

use std::collections::VecDeque;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};

use super::book::SourceBook;
use super::copy::{SourceRead, READS};
use super::health::Verdict;
use super::source::{Candidate, SourceError, SourceId};
use super::spool::{PositionalSpool, SpoolError, SpoolLimits};
use super::stats::StatsKeeper;
use super::verified::Verified;
use crate::narinfo::NarHash;

/// A NAR at least this large is split between peers when several have it.
pub const PARALLEL_MIN_BYTES: u64 = 64 * 1024 * 1024;
/// Most peers one NAR is split between.
pub const MAX_PARALLEL_SOURCES: usize = 4;
/// Failed segments handed to another peer within one split (each goes on from where it stopped);
/// past it the split is given up. Twice the segments: on a loaded machine (the crowd bench's
/// second wave, CPU 100 % busy) 5 of 24 splits used up 4 hand-overs, mostly segments that fell
/// under the read floor, and fell back to whole fetches.
pub const MAX_SEGMENT_RETRIES: usize = 8;
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

/// Fetches a large NAR in equal segments from up to [`MAX_PARALLEL_SOURCES`] of `peers` at once,
/// written at their offsets, then hashes it whole; judges the peers in `book`. A segment whose
/// peer fails (busy, gone, slow past its idle limit) goes on from where it stopped with the next
/// of `peers` not used yet, or (after a wait) one whose segment is done, at most
/// [`MAX_SEGMENT_RETRIES`] times per split (issue #24: a failed segment gave up the split, and the other segments, fetched
/// whole meanwhile, were thrown away: bytes their senders paid for and nobody kept). `None`
/// when a segment fails past that or the whole does not match (the caller then fetches from one
/// source at a time, where a lie can be attributed); the segments still running stop then.
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
    let k = peers.len().min(MAX_PARALLEL_SOURCES) as u64;
    let (first, spares) = peers.split_at(k as usize);
    let mut spares: VecDeque<&Candidate> = spares.iter().collect();
    let written = &spool;
    let segment = |c: &'_ Candidate, start: u64, end: u64| {
        let c = c.clone();
        async move {
            let r = copy_segment(book, stats, &c, written, start, end).await;
            (c, end, r)
        }
    };
    let mut running: FuturesUnordered<_> = first
        .iter()
        .enumerate()
        .map(|(i, c)| segment(c, size * i as u64 / k, size * (i as u64 + 1) / k - 1))
        .collect();
    let mut done: Vec<Candidate> = Vec::new();
    // Failed segments waiting for a peer: where they stand, where they end, whose they were.
    let mut orphans: Vec<(u64, u64, SourceId)> = Vec::new();
    let mut retries = 0;
    loop {
        while let Some((pos, end, from)) = orphans.pop() {
            let Some(next) = spares
                .iter()
                .position(|p| p.source != from)
                .and_then(|i| spares.remove(i))
            else {
                // None free now: it waits for a running segment to end.
                orphans.push((pos, end, from));
                break;
            };
            if retries == MAX_SEGMENT_RETRIES {
                tracing::info!("NAR segments failed {retries} times; fetching whole instead");
                return None;
            }
            retries += 1;
            stats.update(|s| s.segments_moved += 1);
            tracing::info!(?from, to = ?next.source, at = pos, "NAR segment goes on from another peer");
            running.push(segment(next, pos, end));
        }
        let Some((c, end, r)) = running.next().await else {
            if orphans.is_empty() {
                break;
            }
            tracing::info!("NAR segment failed with no peer left to take it; fetching whole instead");
            return None;
        };
        match r {
            Ok(()) => {
                // Done: it may take over a segment that failed.
                if let Some(p) = peers.iter().find(|p| p.source == c.source) {
                    spares.push_back(p);
                }
                done.push(c);
            }
            Err((SegmentError::Source(e), pos)) => {
                tracing::info!(source = ?c.source, error = %e, at = pos, "NAR segment failed");
                book.judge(&c.source, Verdict::Failed(&e));
                orphans.push((pos, end, c.source));
            }
            Err((e @ SegmentError::Spool(_), _)) => {
                tracing::warn!(error = %e, "cannot spool a NAR segment; fetching whole instead");
                return None;
            }
        }
    }
    drop(running);
    match spool.verify(nar_hash).await {
        Some(v) => {
            for c in &done {
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
/// [`SEGMENT_BLOCK`] (the chunks read, not copied); on an error, also where the bytes written
/// end (the segment goes on from there).
async fn copy_segment(
    book: &SourceBook,
    stats: &StatsKeeper,
    c: &Candidate,
    spool: &PositionalSpool,
    start: u64,
    end: u64,
) -> Result<(), (SegmentError, u64)> {
    let sources = book.sources();
    let reader = sources.open_range(c, start, end).await.map_err(|e| (e.into(), start))?;
    let want = end + 1 - start;
    let mut read = SourceRead::new(sources, &c.source, reader, want, READS);
    let (mut pos, mut block, mut block_len): (u64, Vec<Bytes>, usize) = (start, Vec::new(), 0);
    loop {
        // A failed read loses the block not written yet: the segment goes on from `pos`.
        let chunk = read.next().await.map_err(|e| (e.into(), pos))?;
        if let Some(chunk) = &chunk {
            if pos + (block_len + chunk.len()) as u64 > end + 1 {
                return Err((SourceError::Overrun(want).into(), pos));
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
                    .map_err(|e| (SegmentError::Spool(e), pos))?;
                pos += len;
                stats.update(|s| s.bytes_from_peers += len);
            }
        }
        if chunk.is_none() {
            break;
        }
    }
    if pos != end + 1 {
        return Err((SourceError::Short { got: pos - start, want }.into(), pos));
    }
    Ok(())
}
