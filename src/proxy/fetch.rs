//! Fetching one NAR into the spool until it verifies: [`NarFetch`], a small state machine whose
//! methods are its transitions.
//!
//! Sources are tried one at a time (a large NAR is first split between peers, see `split`). A
//! source that fails mid-way leaves its bytes for the next one to resume with `Range`; one that
//! sends provably wrong bytes (more than NarSize, corrupt compression) loses them at once. The
//! whole NAR is hashed at the end: a mismatch with one contributor is that source's lie; with
//! several, the fetch starts over one source at a time so the next mismatch is attributable.
//! Every source is tried at most once per fetch, and every source is looked for at most once,
//! except a busy one (issue #24).
//!
//! A peer whose store server is busy (no transfer slot, `SourceError::Busy`) has not failed: the
//! fetch tries the NAR's other sources and, when none is left, waits its `Retry-After` with
//! jitter and re-plans (asks the peers again: hosts that got the path since are found) and resumes
//! with `Range`. Upstreams are asked once the peers are used up and wait while a peer holds the
//! NAR (until `busy::BUSY_WAIT_CAP`): a crowd does not go to the internet. A copy from a peer
//! slower than `busy::SLOW_RATE_FLOOR` goes on from a peer that has the whole NAR now, if any.
//!
//! A fetch into a file spool offers its NAR to peers while it arrives (`partial`, withdrawn
//! when its spool is reset or the fetch ends). A source that is itself such an in-flight copy
//! (`Candidate::partial`) is never passed through nor split over, and a mismatch from it is not
//! judged a lie (it relays its own source's bytes).

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::book::SourceBook;
use super::busy::{BusySources, SlowWatch, MAX_SLOW_SWITCHES};
use super::cache::NarinfoCache;
use super::copy::{ReadShape, SourceRead};
use super::error::{FetchError, LieKind, SourceFailure};
use super::forms::Form;
use super::health::Verdict;
use super::lookup::Lookup;
use super::partial::{Offered, Partials};
use super::passthrough::Tap;
use super::source::{is_transport_error, Candidate, SourceError, SourceId};
use super::split;
use super::spool::{Spool, SpoolError, SpoolLimits};
use super::stats::StatsKeeper;
use super::verified::Verified;
use crate::beacon::wire::NodeId;
use crate::narinfo::{Compression, NarHash, NarInfo, StorePathHash};

/// What a NAR fetch needs of the proxy, and nothing else: shared (`Arc`) so a fetch can run in a
/// task of its own while its request streams the NAR (see `nar`).
pub struct FetchParts {
    /// Which sources to try, and how each did.
    pub book: Arc<SourceBook>,
    /// The narinfo (and sources) known of each path.
    pub cache: Arc<NarinfoCache>,
    pub stats: Arc<StatsKeeper>,
    pub spool: SpoolLimits,
    /// See `ProxyConfig::parallel_min_bytes`.
    pub parallel_min_bytes: u64,
    /// Where a fetch offers its NAR to peers while it arrives (see `partial`).
    pub partials: Option<Arc<Partials>>,
}

/// A verified NAR with the narinfo it was checked against and where it came from.
pub type Fetched = (Verified, Arc<NarInfo>, SourceId);

/// How copying from one source ended.
#[derive(Debug)]
enum CopyError {
    /// The source failed (network, timeout, early end): try another, keep its bytes for a resume.
    Failed(SourceError),
    /// The source sent something provably wrong: discard its bytes.
    Lie(LieKind),
    /// Our side failed (the spool): no source is to blame.
    Spool(SpoolError),
    /// The source ran below `busy::SLOW_RATE_FLOOR` and these peers have the whole NAR: its
    /// bytes are kept, the fetch goes on from them.
    Slow(Vec<Candidate>),
}

/// One NAR being fetched.
pub struct NarFetch<'c> {
    cx: &'c FetchParts,
    hash: StorePathHash,
    nar_hash: NarHash,
    /// The narinfo the NAR is checked against (the first source's when none was cached).
    info: Option<Arc<NarInfo>>,
    /// Sources still to try, in order.
    queue: VecDeque<Candidate>,
    /// Sources already tried.
    tried: HashSet<SourceId>,
    /// Every source was already asked.
    gathered: bool,
    /// The upstreams were asked (or there are none): a gather leaves them alone while a peer
    /// has the NAR, and the fetch asks them once the peers are used up (issue #24).
    upstreams_asked: bool,
    spool: Option<Spool>,
    /// Sources whose bytes are in the spool.
    contributors: Vec<SourceId>,
    /// False after a mismatch with several contributors: no more resuming across sources.
    allow_resume: bool,
    /// The last failure, for the error.
    last_error: Option<SourceFailure>,
    /// Pass-through to the request that started the fetch (see `passthrough`), if any.
    tap: Option<Tap>,
    /// Peers that answered busy, the upstreams held back meanwhile, the hosts they named.
    busy: BusySources,
    /// This NAR offered to peers while it arrives (`partial`), until the spool is reset.
    offered: Option<Offered>,
    /// Lookups this fetch made for a faster peer (at most `busy::MAX_SLOW_SWITCHES`).
    slow_switches: usize,
}

impl<'c> NarFetch<'c> {
    /// Starts from what the cache knows of the NAR, keeping the sources still usable (a cached
    /// peer may have left the table, or lied about this NAR since); backed-off peers go last.
    pub fn new(cx: &'c FetchParts, hash: StorePathHash, nar_hash: NarHash) -> Self {
        let (info, candidates) = match cx.cache.known(&hash) {
            Some(k) if k.info.nar_hash == nar_hash => (Some(k.info), k.candidates),
            _ => (None, Vec::new()),
        };
        let queue = cx.book.usable_candidates(candidates, &nar_hash);
        Self {
            cx,
            hash,
            nar_hash,
            info,
            queue,
            tried: HashSet::new(),
            gathered: false,
            upstreams_asked: false,
            spool: None,
            contributors: Vec::new(),
            allow_resume: true,
            last_error: None,
            tap: None,
            busy: BusySources::default(),
            offered: None,
            slow_switches: 0,
        }
    }

    /// Hands bytes from proven peers to a pass-through body as they are spooled.
    pub fn with_tap(mut self, tap: Tap) -> Self {
        self.tap = Some(tap);
        self
    }

    /// Runs the fetch to a verified NAR or an error.
    pub async fn run(mut self) -> Result<Fetched, FetchError> {
        let peers_known = self
            .queue
            .iter()
            .filter(|c| matches!(c.source, SourceId::Peer(_)))
            .count();
        let large = self
            .info
            .as_ref()
            .is_none_or(|i| i.nar_size >= self.cx.parallel_min_bytes);
        // A large NAR (or one we know nothing of): find every source, to split it between peers.
        if large && peers_known < 2 {
            self.gather().await;
        }
        if let Some(done) = self.try_split().await {
            return Ok(done);
        }
        while let Some(c) = self.next_source().await {
            match self.copy_from(&c).await {
                Ok(()) => {
                    if let Some(done) = self.verify(&c).await {
                        return Ok(done);
                    }
                }
                Err(CopyError::Spool(e)) => return Err(e.into()),
                Err(CopyError::Lie(e)) => {
                    tracing::warn!(source = ?c.source, hash = %self.hash, error = %e, "source sent bad NAR bytes");
                    self.cx.book.judge(&c.source, Verdict::LiedAbout(self.nar_hash));
                    self.reset_spool().await;
                    self.last_error = Some(e.into());
                }
                Err(CopyError::Failed(SourceError::Busy { retry_after, hints })) => {
                    self.busy_source(c, retry_after, hints)
                }
                Err(CopyError::Slow(found)) => self.slow_source(c, found),
                Err(CopyError::Failed(e)) => {
                    let got = self.spool.as_ref().map_or(0, Spool::len);
                    tracing::info!(source = ?c.source, hash = %self.hash, got, error = %e, "NAR source failed; trying the next");
                    // An in-flight copy that is gone (its fetch ended, its store not yet
                    // indexed) answers 404: not the peer's failure.
                    if !(c.partial && matches!(e, SourceError::Status(404))) {
                        self.cx.book.judge(&c.source, Verdict::Failed(&e));
                    }
                    if got > 0 {
                        self.contributors.push(c.source.clone());
                    }
                    self.last_error = Some(SourceFailure::Failed(e));
                }
            }
        }
        Err(match self.last_error {
            None => FetchError::NoSource,
            Some(last) => FetchError::Exhausted {
                tried: self.tried.len(),
                last,
            },
        })
    }

    /// Asks every source not tried yet (once per fetch) and queues those with this NAR.
    async fn gather(&mut self) {
        self.gathered = true;
        let lookup = Lookup {
            book: &self.cx.book,
            stats: &self.cx.stats,
        };
        // A busy peer holds the NAR (it answered busy before this gather, which skips it as
        // tried): the upstreams are not asked now (issue #24: every fetch of a crowd asked the
        // upstream for the narinfo here).
        let held = self.busy.waiting();
        let mut skip = self.tried.clone();
        if held {
            skip.extend((0..self.cx.book.sources().upstreams.len()).map(SourceId::Upstream));
        }
        let g = lookup.gather(&self.hash, &self.nar_hash, &skip).await;
        self.upstreams_asked |= g.upstreams_asked && !held;
        for c in g.found {
            self.cx.cache.remember(self.hash, c.clone());
            if !self.queue.iter().any(|q| q.source == c.source) {
                self.queue.push_back(c);
            }
        }
        if self.info.is_none() {
            self.info = self.queue.front().map(|c| c.info.clone());
        }
    }

    /// A large NAR with several peers: split between them (see `split`).
    async fn try_split(&mut self) -> Option<Fetched> {
        let info = self.info.clone().filter(|i| i.nar_size >= self.cx.parallel_min_bytes)?;
        let peers: Vec<Candidate> = self
            .queue
            .iter()
            // Byte ranges: of uncompressed NARs only.
            .filter(|c| matches!(c.source, SourceId::Peer(_)) && c.resumable() && !c.partial)
            // The first segments' peers and spares for segments that fail.
            .take(split::MAX_PARALLEL_SOURCES + split::MAX_SEGMENT_RETRIES)
            .cloned()
            .collect();
        if peers.len() < 2 {
            return None;
        }
        let v = split::fetch(
            &self.cx.book,
            &self.cx.stats,
            &self.cx.spool,
            &peers,
            info.nar_size,
            &self.nar_hash,
        )
        .await?;
        Some((v, info, peers[0].source.clone()))
    }

    /// The next source not tried yet; when none is left, every source is asked once more; when
    /// only busy peers are left, they are asked again after a wait (see the module's text).
    async fn next_source(&mut self) -> Option<Candidate> {
        loop {
            match self.queue.pop_front() {
                Some(c) => match self.busy.defer(c) {
                    Some(c) if self.tried.insert(c.source.clone()) => return Some(c),
                    _ => continue,
                },
                None if !self.gathered => self.gather().await,
                None if self.busy.waiting() => self.wait_and_replan().await,
                // No busy peer to wait for (or the cap passed): the upstreams' turn.
                None if !self.upstreams_asked => self.ask_upstreams().await,
                None => self.queue.extend(self.busy.release_upstreams()?),
            }
        }
    }

    /// The upstreams, once (the gather left them alone while a peer had the NAR).
    async fn ask_upstreams(&mut self) {
        self.upstreams_asked = true;
        let lookup = Lookup {
            book: &self.cx.book,
            stats: &self.cx.stats,
        };
        for c in lookup.upstreams(&self.hash, &self.nar_hash, &self.tried).await {
            self.cx.cache.remember(self.hash, c.clone());
            self.queue.push_back(c);
        }
    }

    /// `c` ran slow and `found` have the whole NAR: they go first, `c` after them (it goes on
    /// where it stopped if they fail).
    fn slow_source(&mut self, c: Candidate, found: Vec<Candidate>) {
        if !self.contributors.contains(&c.source) {
            self.contributors.push(c.source.clone());
        }
        self.tried.remove(&c.source);
        self.queue.push_back(c);
        for f in found.into_iter().rev() {
            self.cx.cache.remember(self.hash, f.clone());
            self.queue.push_front(f);
        }
    }

    /// A peer answered busy: not a failure (no back-off, its bytes kept for a resume); it is
    /// asked again after the wait, and the hosts it named (streaming the NAR from it) at once,
    /// each once per fetch.
    fn busy_source(&mut self, c: Candidate, retry_after: Duration, hints: Vec<NodeId>) {
        tracing::debug!(source = ?c.source, hash = %self.hash, ?retry_after, ?hints, "NAR source busy; trying the next");
        self.cx.stats.update(|s| s.busy_answers += 1);
        let e = SourceError::Busy {
            retry_after,
            hints: Vec::new(),
        };
        self.cx.book.judge(&c.source, Verdict::Failed(&e));
        self.last_error = Some(SourceFailure::Failed(e));
        self.busy.note(c, retry_after, hints);
    }

    /// Every source left is a busy peer. Hosts the busy answers named are asked first, without a
    /// wait; otherwise it waits the `Retry-After` with jitter (a crowd does not come back at
    /// once), then asks the peers again, busy ones included (hosts that got the NAR since are
    /// found; each answers with its load), and queues them least loaded first. The upstreams are
    /// not asked again (their candidates wait in `BusySources`).
    async fn wait_and_replan(&mut self) {
        let lookup = Lookup {
            book: &self.cx.book,
            stats: &self.cx.stats,
        };
        let named: Vec<SourceId> = (self.busy.take_hints().into_iter().map(SourceId::Peer))
            .filter(|s| !self.tried.contains(s) && !self.queue.iter().any(|q| q.source == *s))
            .collect();
        if !named.is_empty() {
            let found = lookup.named(&self.hash, &self.nar_hash, named).await;
            if !found.is_empty() {
                for c in found {
                    self.cx.cache.remember(self.hash, c.clone());
                    self.queue.push_back(c);
                }
                self.cx.book.rank(self.queue.make_contiguous());
                return;
            }
        }
        let wait = self.busy.wait();
        self.cx.stats.update(|s| s.busy_waits += 1);
        tracing::debug!(hash = %self.hash, busy = self.busy.busy_len(), ?wait, "every source busy; waiting");
        tokio::time::sleep(wait).await;
        let busy = self.busy.take_busy();
        for c in &busy {
            self.tried.remove(&c.source);
        }
        let mut skip = self.tried.clone();
        skip.extend((0..self.cx.book.sources().upstreams.len()).map(SourceId::Upstream));
        let mut found = lookup.gather(&self.hash, &self.nar_hash, &skip).await.found;
        // A busy peer that did not answer this time keeps its place, after the others.
        for c in busy {
            if !found.iter().any(|f| f.source == c.source) {
                found.push(c);
            }
        }
        for c in found {
            self.cx.cache.remember(self.hash, c.clone());
            if !self.queue.iter().any(|q| q.source == c.source) {
                self.queue.push_back(c);
            }
        }
        self.cx.book.rank(self.queue.make_contiguous());
    }

    async fn reset_spool(&mut self) {
        self.offered = None;
        if let Some(sp) = self.spool.as_mut() {
            if let Some(t) = self.tap.as_mut() {
                t.spool_reset(sp).await;
            }
            let _ = sp.reset().await;
        }
        self.contributors.clear();
    }

    /// Copies the NAR of `c` into the spool, resuming where the bytes stand when `c` allows it.
    async fn copy_from(&mut self, c: &Candidate) -> Result<(), CopyError> {
        let size = c.info.nar_size;
        if self.spool.is_none() {
            let sp = Spool::new(&self.cx.spool, size).await.map_err(CopyError::Spool)?;
            // Peers may fetch the bytes so far from this host's store server (issue #24).
            let info = self.info.clone().unwrap_or_else(|| c.info.clone());
            self.offered = match (&self.cx.partials, sp.tail()) {
                (Some(p), Some(tail)) => p.offer(&info, tail),
                _ => None,
            };
            self.spool = Some(sp);
        }
        let resume = self.allow_resume && c.resumable();
        if self.spool.as_ref().is_some_and(|sp| !sp.is_empty() && !resume) {
            self.reset_spool().await;
        }
        let Some(sp) = self.spool.as_mut() else {
            return Err(CopyError::Spool(SpoolError::Io(std::io::Error::other("spool missing"))));
        };
        // Only a proven peer feeds the tap, and only if everything spooled so far went through
        // it (so no byte of another source is passed on unverified).
        let tap = match self.tap.as_mut() {
            Some(t) if t.continues_at(sp.len(), size) && !c.partial && self.cx.book.passes_through(&c.source, t) => {
                Some(t)
            }
            Some(t) => {
                if t.sent() > 0 {
                    t.detach();
                }
                None
            }
            None => None,
        };
        // A peer's copy is watched for a slow rate while the fetch has lookups left for it.
        let watched = matches!(c.source, SourceId::Peer(_)) && self.slow_switches < MAX_SLOW_SWITCHES;
        let lookup = Lookup {
            book: &self.cx.book,
            stats: &self.cx.stats,
        };
        let mut skip = self.tried.clone();
        skip.extend((0..self.cx.book.sources().upstreams.len()).map(SourceId::Upstream));
        let mut watch = SlowWatch::new(watched.then_some(lookup), &c.info, skip);
        let r = self.cx.copy_into(c, sp, size, tap, &mut watch).await;
        self.slow_switches += usize::from(watched && watch.looked());
        r
    }

    /// Hashes the full spool: a verified NAR, or (on a mismatch) the liar judged and the spool
    /// emptied for the next source.
    async fn verify(&mut self, c: &Candidate) -> Option<Fetched> {
        if !self.contributors.contains(&c.source) {
            self.contributors.push(c.source.clone());
        }
        let full = self.spool.take()?;
        match full.verify(&self.nar_hash).await {
            Ok(v) => {
                // Only the source that completed the NAR earns credit; one that failed mid-way
                // keeps its back-off even though its bytes were right.
                self.cx.book.judge(&c.source, Verdict::Delivered);
                let info = self.info.clone().unwrap_or_else(|| c.info.clone());
                Some((v, info, c.source.clone()))
            }
            Err(mut back) => {
                if self.contributors.len() == 1 && c.partial {
                    // An in-flight copy relays its own source's bytes: its lie may be another's.
                    // It costs this fetch the attempt, and is not tried again in it.
                    tracing::info!(source = ?c.source, hash = %self.hash, "in-flight copy did not verify");
                } else if self.contributors.len() == 1 {
                    tracing::warn!(source = ?c.source, hash = %self.hash, "NAR hash mismatch; source backed off");
                    self.cx.book.judge(&c.source, Verdict::LiedAbout(self.nar_hash));
                } else {
                    // Several sources contributed: cannot tell which lied. Start over, one
                    // source per attempt, so the next mismatch is attributable.
                    tracing::warn!(contributors = ?self.contributors, hash = %self.hash, "NAR hash mismatch across sources; refetching whole");
                    self.cx.stats.update(|s| s.lies += 1);
                    self.allow_resume = false;
                    let others: Vec<SourceId> = self.contributors.iter().filter(|s| **s != c.source).cloned().collect();
                    self.tried.retain(|s| !others.contains(s) && *s != c.source);
                    if let Some(k) = self.cx.cache.known(&self.hash) {
                        self.queue
                            .extend(k.candidates.into_iter().filter(|k| others.contains(&k.source)));
                    }
                    // The last one too, after them: the liar may be one that can no longer
                    // answer (an in-flight copy that ended), and the honest one must get its
                    // whole attempt (issue #24).
                    self.queue.push_back(c.clone());
                }
                self.last_error = Some(LieKind::HashMismatch.into());
                self.offered = None;
                if let Some(t) = self.tap.as_mut() {
                    t.spool_reset(&mut back).await;
                }
                let _ = back.reset().await;
                self.contributors.clear();
                self.spool = Some(*back);
                None
            }
        }
    }
}

impl FetchParts {
    /// Copies the NAR of `c` into the spool from where it stands (resuming with `Range`).
    /// Bytes written to the spool are also offered to `tap` (a pass-through), if given.
    async fn copy_into(
        &self,
        c: &Candidate,
        sp: &mut Spool,
        size: u64,
        tap: Option<&mut Tap>,
        watch: &mut SlowWatch<'_>,
    ) -> Result<(), CopyError> {
        let from = sp.len();
        // The form: chosen per peer (`forms`) for a whole NAR its peer offers as zstd; a resume
        // asks for a byte range of the plain NAR.
        let measured = match &c.source {
            SourceId::Peer(node) if c.zstd && from == 0 => Some(node),
            _ => None,
        };
        let form = measured.map_or(Form::Plain, |node| self.book.forms().choose(node, size));
        let began = Instant::now();
        let r = self.copy_form(c, sp, size, tap, form, watch).await;
        // What this form delivered, also when it failed (a form that keeps failing looks slow).
        if let Some(node) = measured {
            let took = began.elapsed();
            self.book.forms().record(node, form, size, sp.len(), took);
            tracing::debug!(%node, ?form, size, delivered = sp.len(), ms = took.as_millis() as u64, "NAR form");
        }
        r
    }

    /// [`Self::copy_into`] in one form.
    async fn copy_form(
        &self,
        c: &Candidate,
        sp: &mut Spool,
        size: u64,
        mut tap: Option<&mut Tap>,
        form: Form,
        watch: &mut SlowWatch<'_>,
    ) -> Result<(), CopyError> {
        let from = sp.len();
        let sources = self.book.sources();
        let (reader, start) = sources.open_nar(c, from, form).await.map_err(CopyError::Failed)?;
        // `start` is `from` (the range was honoured) or 0 (it was ignored): skip what we have.
        let mut skip = from - start;
        let mut received = 0u64;
        let shape = ReadShape::of(tap.is_some(), size);
        let mut read = SourceRead::new(sources, &c.source, reader, size.saturating_sub(from), shape);
        let mut faster = None;
        loop {
            // The bytes read become the chunk for the spool and the tap (no copy).
            let mut data: Bytes = match read.next().await {
                Ok(Some(data)) => data,
                Ok(None) => break,
                Err(SourceError::Read(e)) => {
                    // A corrupt (or refused) compressed stream is a lie, a broken connection a
                    // failure.
                    let decoded = form == Form::Zstd || c.info.compression != Compression::None;
                    return Err(if decoded && !is_transport_error(&e) {
                        CopyError::Lie(LieKind::BadCompression(e))
                    } else {
                        CopyError::Failed(SourceError::Read(e))
                    });
                }
                Err(e) => return Err(CopyError::Failed(e)),
            };
            if skip > 0 {
                let k = (skip as usize).min(data.len());
                data = data.slice(k..);
                skip -= k as u64;
            }
            if data.is_empty() {
                continue;
            }
            let end = sp.len() + data.len() as u64;
            if end > size {
                return Err(CopyError::Lie(LieKind::OverNarSize(size)));
            }
            received += data.len() as u64;
            // Handed to the tap first: what it took need not be kept by a file spool.
            let mut passed = 0;
            if let Some(t) = tap.as_deref_mut() {
                passed = t.offer(end, size, &data).await;
            }
            let n = data.len() as u64;
            sp.write(data, passed).await.map_err(CopyError::Spool)?;
            if sp.len() < size {
                faster = watch.faster(n).await;
                if faster.is_some() {
                    break;
                }
            }
        }
        let zstd = form == Form::Zstd || c.info.compression == Compression::Zstd;
        self.stats.update(|s| match c.source {
            SourceId::Peer(_) => {
                s.bytes_from_peers += received;
                s.nars_zstd_from_peers += u64::from(zstd);
            }
            SourceId::Upstream(_) => s.bytes_from_upstream += received,
        });
        if let Some(found) = faster {
            return Err(CopyError::Slow(found));
        }
        if sp.len() < size {
            return Err(CopyError::Failed(SourceError::Short {
                got: sp.len(),
                want: size,
            }));
        }
        Ok(())
    }
}
