//! What this host does with a received datagram: the table takes it ([`PeerTable::handle`]);
//! a query may get an answer (sampled: about [`QUERY_ANSWERS`] hosts answer, whatever the size
//! of the hall, each after a jitter and only if not enough others answered first), and our own
//! node id heard from another host's address gets our announce at once ([`Reply`]).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::membership::{Received, Sockets};
use super::table::{Outcome, PeerTable};
use super::wire::{Kind, NodeId};

/// Answers to queries are delayed by up to this much, so hosts do not answer in one burst and
/// each can hear the others' answers before its own (duplicate suppression).
const QUERY_REPLY_JITTER_MS: u64 = 400;
/// Hosts that answer one query, on average: each answers with probability
/// `min(1, QUERY_ANSWERS / hosts)`, and keeps quiet once it heard this many other hosts announce
/// after the query (mDNS-style duplicate suppression). A newcomer's start therefore costs its own
/// 8 datagrams (announce and query, then two more announces, on IPv4 and IPv6) plus about
/// `2 x QUERY_ANSWERS` answers, whatever the size of the hall; it learns the rest of the hall from
/// their periodic announces.
pub const QUERY_ANSWERS: usize = 12;
/// Queries from one node this close together are one query (sent over IPv4 and IPv6, or on
/// several links): answered or not once.
const QUERY_SAME: Duration = Duration::from_secs(1);
/// At most one answer to queries per this long.
const QUERY_REPLY_MIN_GAP: Duration = Duration::from_millis(250);
/// One received datagram, for `peers --raw`.
#[derive(Clone, Debug)]
pub struct RawDatagram {
    pub src: SocketAddr,
    pub bytes: Vec<u8>,
    pub outcome: Outcome,
}

/// This host's answers to what it hears: a pending answer to a query, and the defence of its
/// node id.
pub(super) struct Reply {
    /// When to answer; `None`: no answer due.
    at: Option<Instant>,
    /// When we last answered (answers are at least [`QUERY_REPLY_MIN_GAP`] apart).
    last: Instant,
    /// Other hosts heard announcing since the query (at most [`QUERY_ANSWERS`] node ids).
    heard: Vec<NodeId>,
    /// The last query we decided on: who asked, and when.
    asked: Option<(NodeId, Instant)>,
    /// When to announce because our node id was heard from another host's address (a hijack
    /// attempt: our announce undoes the "move" in every table at once, `table` pins the id).
    defend_at: Option<Instant>,
    /// When we last did (at most once per [`DEFEND_MIN_GAP`]).
    defended: Option<Instant>,
    /// This host's own addresses, for telling our beacons' echoes from someone else's copy of
    /// our node id. Read when a source is not in it and they may have changed since the last
    /// read (a re-scan of the interfaces since, [`Reply::own_addresses_changed`], or the read
    /// failed), at most once per [`DEFEND_MIN_GAP`]. Issue #27: re-read for any stranger, every
    /// `serve` in a hall made a netlink dump a second.
    own_ips: Vec<IpAddr>,
    own_ips_at: Option<Instant>,
    own_ips_stale: bool,
    /// Announces count as answers heard ([`Reply::batch`]).
    counting: bool,
}

/// Least time between two announces made because our node id was heard from another address,
/// and between two reads of this host's addresses for that check.
pub const DEFEND_MIN_GAP: Duration = Duration::from_secs(1);
/// Most own addresses remembered for that check.
const MAX_OWN_IPS: usize = 64;

impl Reply {
    /// No answer due, none sent yet (so the first query is answered after the jitter alone).
    pub(super) fn new(start: Instant) -> Self {
        Self {
            at: None,
            last: start.checked_sub(QUERY_REPLY_MIN_GAP).unwrap_or(start),
            heard: Vec::new(),
            asked: None,
            defend_at: None,
            defended: None,
            own_ips: Vec::new(),
            own_ips_at: None,
            own_ips_stale: true,
            counting: true,
        }
    }

    /// When to answer a query, if an answer is due.
    pub(super) fn answer_at(&self) -> Option<Instant> {
        self.at
    }

    /// When to announce in defence of our node id, if due.
    pub(super) fn defend_at(&self) -> Option<Instant> {
        self.defend_at
    }

    /// The answer to the query went out at `now`.
    pub(super) fn answered(&mut self, now: Instant) {
        self.at = None;
        self.last = now;
    }

    /// A batch of datagrams is read (`reading`): when no answer was pending as it began, the
    /// announces in it do not count as answers to a query read in it (the other family's
    /// socket is drained second, so some arrived before the query). `false` when it ends.
    pub(super) fn batch(&mut self, begins: bool) {
        self.counting = !begins || self.at.is_some();
    }

    /// An announce of `node` was heard while an answer is pending: counted once (never the
    /// asker's own); once [`QUERY_ANSWERS`] others were, our answer would add nothing.
    fn heard(&mut self, node: NodeId) {
        if self.at.is_none() || !self.counting {
            return;
        }
        // The asker's own announces (its start burst) are no answers.
        let asker = self.asked.is_some_and(|(n, _)| n == node);
        if !asker && !self.heard.contains(&node) {
            self.heard.push(node);
        }
        if self.heard.len() >= QUERY_ANSWERS {
            self.at = None;
            self.heard.clear();
        }
    }

    /// The defending announce went out.
    pub(super) fn defended(&mut self) {
        self.defend_at = None;
    }

    /// The interfaces were re-scanned: this host's addresses may have changed.
    pub(super) fn own_addresses_changed(&mut self) {
        self.own_ips_stale = true;
    }

    /// Whether `ip` is one of this host's addresses.
    fn is_own(&mut self, ip: IpAddr, now: Instant) -> bool {
        self.is_own_with(ip, now, read_own_ips)
    }

    /// [`Self::is_own`], reading the addresses with `read` (`None`: unreadable) when they may
    /// have changed.
    fn is_own_with(&mut self, ip: IpAddr, now: Instant, read: impl FnOnce() -> Option<Vec<IpAddr>>) -> bool {
        if self.own_ips.contains(&ip) {
            return true;
        }
        if !self.own_ips_stale || self.own_ips_at.is_some_and(|t| now < t + DEFEND_MIN_GAP) {
            // Unknown, and the addresses are current or were read a moment ago: not ours.
            return false;
        }
        self.own_ips_at = Some(now);
        self.own_ips = read().unwrap_or_default();
        self.own_ips_stale = self.own_ips.is_empty();
        // Unreadable: assume ours rather than announce on every echo.
        self.own_ips.is_empty() || self.own_ips.contains(&ip)
    }
}

/// This host's addresses (at most [`MAX_OWN_IPS`]); `None` when they cannot be read.
fn read_own_ips() -> Option<Vec<IpAddr>> {
    let mut addrs = super::identity::own_addresses()?;
    addrs.truncate(MAX_OWN_IPS);
    Some(addrs)
}

/// Whether this host answers a query in a hall of `hosts`, given a uniform draw `u` in [0, 1).
fn answers(hosts: usize, u: f64) -> bool {
    u * (hosts as f64) < QUERY_ANSWERS as f64
}

/// Handles one received datagram `r` (its bytes in `buf`): the table takes it, this host
/// decides whether to answer a query or defend its node id, and `raw` gets a copy.
pub(super) async fn receive(
    table: &PeerTable,
    raw: &Option<mpsc::Sender<RawDatagram>>,
    sockets: &Sockets,
    r: io::Result<Received>,
    buf: &[u8],
    reply: &mut Reply,
    announcing: bool,
) {
    let r = match r {
        Ok(x) => x,
        Err(e) => {
            tracing::debug!(error = %e, "beacon receive failed");
            // Avoid spinning on a persistent error.
            tokio::time::sleep(Duration::from_millis(10)).await;
            return;
        }
    };
    let (n, src) = (r.len.min(buf.len()), r.src);
    let now = Instant::now();
    let outcome = match sockets.on_link(&r) {
        Ok(()) => table.handle(src, &buf[..n], now),
        Err(why) => table.off_link(why),
    };
    if let Outcome::Joined(b) | Outcome::Refreshed(b) = &outcome {
        if b.kind == Kind::Announce && b.node != table.own() && reply.is_own(src.ip(), now) {
            table.from_this_host();
        }
    }
    match &outcome {
        Outcome::Joined(b) => tracing::info!(node = %b.node, %src, port = b.port, "peer joined"),
        Outcome::Left(b) => tracing::info!(node = %b.node, %src, "peer said goodbye"),
        Outcome::Ignored(b, _)
            if announcing
                && b.node == table.own()
                && b.kind == Kind::Announce
                && reply.defended.is_none_or(|t| now >= t + DEFEND_MIN_GAP)
                && !reply.is_own(src.ip(), now) =>
        {
            // Someone announces our node id from its address: our own announce, now, undoes
            // the "move" in every table and pins the id to our address.
            tracing::warn!(%src, "beacon: our node id announced from another address; announcing ours");
            reply.defended = Some(now);
            reply.defend_at = Some(now);
        }
        Outcome::Query(q)
            if announcing
                && reply.at.is_none()
                // The same query over the other family (or link): decided already.
                && !reply.asked.is_some_and(|(n, t)| n == q.node && now < t + QUERY_SAME) =>
        {
            reply.asked = Some((q.node, now));
            let mut rng = rand::thread_rng();
            if answers(table.established_len() + 1, rng.gen()) {
                let earliest = reply.last + QUERY_REPLY_MIN_GAP;
                let jitter = Duration::from_millis(rng.gen_range(0..=QUERY_REPLY_JITTER_MS));
                reply.at = Some((now + jitter).max(earliest));
                reply.heard.clear();
            }
        }
        _ => {}
    }
    match &outcome {
        Outcome::Joined(b) | Outcome::Refreshed(b) => reply.heard(b.node),
        _ => {}
    }
    if let Some(tx) = raw {
        let _ = tx.try_send(RawDatagram {
            src,
            bytes: buf[..n].to_vec(),
            outcome,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_is_answered_by_about_query_answers_hosts_whatever_the_hall() {
        // Small halls: everyone answers.
        for hosts in 1..=QUERY_ANSWERS {
            assert!(answers(hosts, 0.999));
        }
        for hosts in [50usize, 100, 500, 2049] {
            let draws = 10_000;
            let yes = (0..draws)
                .filter(|i| answers(hosts, (*i as f64 + 0.5) / draws as f64))
                .count() as f64;
            let expected = QUERY_ANSWERS as f64 / hosts as f64 * draws as f64;
            assert!(
                (yes - expected).abs() <= 1.0,
                "{hosts} hosts: {yes} of {draws} vs {expected}"
            );
        }
    }

    /// Issue #27 (batched reads): a query read in a batch was followed by the batch's other
    /// announces, some older than the query (the IPv6 socket is drained after the IPv4 one),
    /// which counted as answers and silenced ours (2 answers to a newcomer in a hall of 100
    /// instead of about 24). Announces of the batch the query came in do not count; those read
    /// afterwards do.
    #[test]
    fn announces_read_in_the_querys_batch_do_not_silence_the_answer() {
        let t0 = Instant::now();
        let mut r = Reply::new(t0);
        r.batch(true);
        r.asked = Some((NodeId([99; 16]), t0));
        r.at = Some(t0 + Duration::from_millis(100));
        for n in 0..QUERY_ANSWERS as u8 {
            r.heard(NodeId([n; 16]));
        }
        assert!(r.answer_at().is_some(), "the batch's announces silenced the answer");
        r.batch(false);
        for n in 0..QUERY_ANSWERS as u8 {
            r.heard(NodeId([n; 16]));
        }
        assert!(r.answer_at().is_none(), "announces read afterwards count");
        // A batch that begins with an answer pending counts: all of it came after the query.
        r.at = Some(t0 + Duration::from_millis(100));
        r.batch(true);
        for n in 0..QUERY_ANSWERS as u8 {
            r.heard(NodeId([n; 16]));
        }
        assert!(r.answer_at().is_none());
    }

    /// Issue #27: in a hall nearly every announce comes from a stranger's address, and the own
    /// addresses were read again (a netlink dump) for one of them every [`DEFEND_MIN_GAP`]:
    /// once a second in every `serve`. They are read again only after a re-scan of the
    /// interfaces (on a netlink notice, at least every `RESCAN_INTERVAL`) or a failed read.
    #[test]
    fn strangers_do_not_make_the_own_addresses_be_read_again() {
        let t0 = Instant::now();
        let mut r = Reply::new(t0);
        let own: IpAddr = [10, 0, 0, 1].into();
        let added: IpAddr = [10, 0, 0, 2].into();
        let reads = std::cell::Cell::new(0);
        let read = |addrs: Vec<IpAddr>| {
            reads.set(reads.get() + 1);
            Some(addrs)
        };
        for i in 0..20u64 {
            let stranger = IpAddr::from([10, 0, 1, i as u8]);
            let now = t0 + Duration::from_secs(2 * i);
            assert!(!r.is_own_with(stranger, now, || read(vec![own])));
            assert!(r.is_own_with(own, now, || read(vec![own])));
        }
        assert_eq!(reads.get(), 1, "read once, not once per stranger");
        // A new address of ours, then a re-scan: read again, once.
        r.own_addresses_changed();
        let later = t0 + Duration::from_secs(60);
        assert!(r.is_own_with(added, later, || read(vec![own, added])));
        assert!(
            !r.is_own_with([10, 0, 1, 99].into(), later + Duration::from_secs(2), || read(vec![
                own, added
            ]))
        );
        assert_eq!(reads.get(), 2);
        // Unreadable: taken as ours, and tried again after the gap (not before).
        r.own_addresses_changed();
        let t = later + Duration::from_secs(10);
        assert!(r.is_own_with([10, 0, 1, 1].into(), t, || None));
        assert!(!r.is_own_with([10, 0, 1, 2].into(), t + Duration::from_millis(10), || read(vec![own])));
        assert!(!r.is_own_with([10, 0, 1, 2].into(), t + DEFEND_MIN_GAP, || read(vec![own])));
        assert_eq!(reads.get(), 3);
    }
}
