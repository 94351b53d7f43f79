//! The beacon: our UDP multicast protocol (`proto/beacon.md`) that announces this host and
//! builds the peer table, over IPv4 and IPv6.
//!
//! [`config`] is what the beacon is told, [`wire`] the pure codec, [`table`] the peer table,
//! [`identity`] this run's key and its proofs, [`prover`] the task that asks contested ids'
//! claimants for proofs, [`pex`] the peer exchange, [`seeds`] the `--peer` seeds asked over
//! HTTP, [`diagnose`] what is wrong with the network, [`http`] their requests, [`iface`] the
//! interfaces, [`links`] their reported states, `membership` the sockets, the groups joined per
//! interface and the on-link checks, [`watch`] the kernel's notices of interface changes,
//! [`wake`] the suspend detector, `sender` the beacons this host sends (within the hall's
//! traffic budget), `receive` what a received datagram does (the table, a sampled answer to a
//! query, the defence of our node id), `schedule` the loop's timers, and this module the one
//! loop ([`run`]) that waits for a datagram, a netlink notice or whatever the schedule says is
//! due next.
//!
//! Invariants: one task per beacon, plus its proof task ([`prover::verify_loop`]), its seed task
//! ([`seeds::run`]) and at most one peer-exchange task at a time, all owned by the loop and
//! cancelled with it (nothing is spawned per datagram); multicast TTL and hop limit are 1, and
//! only datagrams from the link count; the beacon never triggers a narinfo or NAR fetch (its only
//! requests are the peer exchange's `GET /peers`, at most 3 after our own start or a new link,
//! the seeds' `GET /peers` and their entries' `GET /nix-cache-info` ([`seeds`]), and `GET /identity` to
//! the claimants of a contested node id, from a claimant's second claim on and at most once per
//! store-server address per 30 s, failures retried after 2 s doubling), it only tells the proxy
//! where it may ask.
//!
//! Roaming: the sockets are bound once; groups are joined and left per interface as interfaces
//! appear, go, come back or change addresses (a netlink notice triggers a re-scan, and a
//! periodic re-scan is the safety net). A new link gets an announce, a query and the start-up
//! burst at once; a departing link gets a goodbye while it still can, and the peers reachable
//! only through it are forgotten. With no usable interface the beacon waits.

pub mod config;
pub mod diagnose;
pub mod http;
pub mod identity;
pub mod iface;
pub mod links;
mod membership;
pub mod pex;
pub mod prover;
mod reading;
mod receive;
mod schedule;
pub mod seeds;
mod sender;
pub mod table;
pub mod wake;
pub use wake::WAKE_GRACE;
pub mod watch;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use config::{
    Announce, BeaconConfig, BeaconError, DEFAULT_GROUP_V4, DEFAULT_GROUP_V6, DEFAULT_INTERVAL, DEFAULT_PORT, MAX_LINKS,
};
pub use iface::{choose_interfaces, has_multicast_route_v4, list_interfaces, Interface};
pub use links::{LinkReport, LinkState, LinkStates};
pub use membership::{bind, Sockets};
use membership::{lost, try_recv};
pub use reading::{MAX_DRAIN, RCVBUF_BYTES, READ_EVERY, READ_EVERY_INTERVALS};
use receive::{receive, Reply};
pub use receive::{RawDatagram, DEFEND_MIN_GAP, QUERY_ANSWERS};
use schedule::{Due, Schedule};
pub use schedule::{RESCAN_INTERVAL, RESCAN_INTERVAL_NO_NETLINK};
use sender::Sender;
pub use sender::{budgeted_interval, ANNOUNCE_BUDGET_BYTES_PER_SEC};
pub use table::{Outcome, Peer, PeerTable};
use wire::Kind;

/// Receive buffer: larger than any valid datagram, so oversized ones are seen (and counted).
const RECV_BUF: usize = 2048;

/// This machine's host name, for the beacon's informational hostname extension.
pub fn hostname() -> Option<String> {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
}

async fn watch_changed(w: &Option<watch::Watcher>) {
    match w {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The receive buffers, one per family (allocated once).
struct Buffers {
    v4: (Vec<u8>, Vec<u8>),
    v6: (Vec<u8>, Vec<u8>),
}

impl Default for Buffers {
    fn default() -> Self {
        let one = || (vec![0u8; RECV_BUF], membership::cmsg_buffer());
        Self { v4: one(), v6: one() }
    }
}

async fn clock_jumped(j: &Option<wake::ClockJumps>) {
    match j {
        Some(j) => j.jumped().await,
        None => std::future::pending().await,
    }
}

/// Runs the beacon until `shutdown`: answers queries, announces (if configured), expires peers,
/// follows the interfaces, and says goodbye at the end. `raw`, if given, receives every datagram
/// (for `peers --raw`). `goodbye: false` skips the goodbye (tests of a host that dies).
pub async fn run(
    sockets: Sockets,
    cfg: BeaconConfig,
    table: Arc<PeerTable>,
    raw: Option<mpsc::Sender<RawDatagram>>,
    shutdown: CancellationToken,
    goodbye: bool,
) {
    let sender = Sender::new(
        table.own(),
        table.identity().cloned(),
        cfg.announce.clone(),
        cfg.interval,
    );
    let watcher = match watch::Watcher::new() {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "no netlink notices of interface changes; re-scanning every {:?}", RESCAN_INTERVAL_NO_NETLINK);
            None
        }
    };
    let rescan_every = if watcher.is_some() {
        RESCAN_INTERVAL
    } else {
        RESCAN_INTERVAL_NO_NETLINK
    };
    // Contested node ids: their claimants' store servers are asked for proofs, by a task owned
    // here (cancelled with `shutdown`, aborted when the beacon ends).
    let mut proofs = JoinSet::new();
    proofs.spawn(prover::verify_loop(table.clone(), shutdown.child_token()));
    // Seeds (`--peer`): asked for the hall over HTTP by one task owned here, like the prover.
    let store_port = cfg.announce.as_ref().map(|a| a.store_port);
    proofs.spawn(seeds::run(
        cfg.seeds.clone(),
        table.clone(),
        store_port,
        shutdown.child_token(),
    ));
    // Hosts that seed us: asked back, so hosts that all seed this one learn each other.
    proofs.spawn(seeds::askers::run(
        cfg.askers.clone(),
        table.clone(),
        shutdown.child_token(),
    ));
    // A wake-up from suspend wakes the loop by itself (the wall clock's timerfd); without it
    // the loop looks once a second.
    let jumps = match wake::ClockJumps::new() {
        Ok(j) => Some(j),
        Err(e) => {
            tracing::debug!(error = %e, "no timerfd for wake-ups; looking every {:?}", schedule::EXPIRE_MAX_WAIT);
            None
        }
    };
    let look_every = if jumps.is_some() {
        wake::LOOK_SAFETY
    } else {
        schedule::EXPIRE_MAX_WAIT
    };
    let start = Instant::now();
    let mut b = BeaconLoop {
        schedule: Schedule::new(start, sender.announcing(), cfg.interval, rescan_every, look_every),
        announcing: sender.announcing(),
        goodbye,
        configured: cfg.interval,
        sockets,
        sender,
        table,
        reply: Reply::new(start),
        wake_watch: wake::WakeWatch::new(wake::clocks()),
        scan_failing: false,
        exchange: JoinSet::new(),
        seeds: cfg.seeds.clone(),
        shutdown,
    };
    b.sender.hello(&b.sockets, None).await;
    // Read at once while listening, in batches otherwise (`reading`).
    let mut reader = reading::Reader::new(cfg.interval);
    let mut bufs = Buffers::default();
    loop {
        let (at, due) = b.schedule.next(
            b.reply.answer_at(),
            b.reply.defend_at(),
            b.table.next_expiry(),
            b.wake_watch.due(),
            Instant::now(),
        );
        // Every datagram read at once while it counts: an answer's duplicate suppression, a
        // defence, our own start's answers before its peer exchange.
        let urgent = b.reply.answer_at().is_some() || b.reply.defend_at().is_some() || b.schedule.starting();
        let drain_at = match reader.prepare((b.sockets.fd_v4(), b.sockets.fd_v6()), urgent) {
            reading::Wait::Datagram => None,
            reading::Wait::Drain(at) => Some(at),
        };
        tokio::select! {
            _ = b.shutdown.cancelled() => break,
            _ = reader.readable() => b.drain(&mut reader, &mut bufs, &raw).await,
            _ = sleep_until_some(drain_at) => b.drain(&mut reader, &mut bufs, &raw).await,
            _ = watch_changed(&watcher) => b.schedule.rescan_soon(Instant::now()),
            _ = clock_jumped(&jumps) => b.on(Due::Look).await,
            _ = tokio::time::sleep_until(at) => b.on(due).await,
        }
    }
    b.exchange.abort_all();
    proofs.abort_all();
    if b.announcing && goodbye {
        let bye = b.sender.datagram(Kind::Goodbye);
        b.sockets.send(&bye, None).await;
    }
}

/// The beacon loop's state, apart from the receive buffers.
struct BeaconLoop {
    sockets: Sockets,
    sender: Sender,
    table: Arc<PeerTable>,
    schedule: Schedule,
    reply: Reply,
    wake_watch: wake::WakeWatch,
    /// This host announces (not the `peers` tool).
    announcing: bool,
    /// Goodbyes are sent (tests of a host that dies turn them off).
    goodbye: bool,
    /// The configured announce interval (the traffic budget may stretch it).
    configured: Duration,
    /// The last interface scan failed (warned once until one succeeds).
    scan_failing: bool,
    /// The peer exchange, at most one at a time, owned here.
    exchange: JoinSet<()>,
    /// The seeds, asked again at once on a new link or after a wake-up.
    seeds: seeds::Seeds,
    shutdown: CancellationToken,
}

impl BeaconLoop {
    /// Reads every queued datagram of both sockets (at most `MAX_DRAIN` each) into the table.
    async fn drain(
        &mut self,
        reader: &mut reading::Reader,
        bufs: &mut Buffers,
        raw: &Option<mpsc::Sender<RawDatagram>>,
    ) {
        let mut read = 0;
        let mut full = false;
        self.reply.batch(true);
        for (fam, (buf, cmsg)) in [(&self.sockets.v4, &mut bufs.v4), (&self.sockets.v6, &mut bufs.v6)] {
            let mut n = 0;
            while n < MAX_DRAIN {
                let Some(r) = try_recv(fam, buf, cmsg) else { break };
                receive(
                    &self.table,
                    raw,
                    &self.sockets,
                    r,
                    buf,
                    &mut self.reply,
                    self.announcing,
                )
                .await;
                n += 1;
            }
            read += n;
            full |= n == MAX_DRAIN;
        }
        self.reply.batch(false);
        reader.drained(read, full, Instant::now());
    }

    /// Does what `due` names.
    async fn on(&mut self, due: Due) {
        match due {
            Due::Rescan => self.rescan().await,
            Due::Announce => {
                self.sender
                    .budget(self.configured, self.table.established_len(), &self.sockets);
                let a = self.sender.datagram(Kind::Announce);
                self.sockets.send(&a, None).await;
                self.schedule.announced(Instant::now(), self.sender.interval());
            }
            Due::PeerExchange => self.exchange(),
            Due::Defend => {
                self.reply.defended();
                let a = self.sender.datagram(Kind::Announce);
                self.sockets.send(&a, None).await;
            }
            Due::Answer => {
                let a = self.sender.datagram(Kind::Announce);
                self.sockets.send(&a, None).await;
                self.reply.answered(Instant::now());
            }
            Due::Look => self.look().await,
        }
    }

    /// Re-scans the interfaces: a goodbye on the links that go (while they still can), the
    /// peers reachable only through a lost link forgotten, a hello on the new ones.
    async fn rescan(&mut self) {
        let now = Instant::now();
        self.schedule.rescanned(now);
        self.reply.own_addresses_changed();
        match self.sockets.rescan(now) {
            Ok(ch) => {
                self.scan_failing = false;
                for line in &ch.lines {
                    tracing::info!("beacon: {line}");
                }
                if !ch.gone.is_empty() && self.announcing && self.goodbye {
                    // While it still can: a link that lost an address or was excluded
                    // can still carry it; one that is down or removed cannot (ignored).
                    let bye = self.sender.datagram(Kind::Goodbye);
                    for l in &ch.gone {
                        self.sockets.send_on(l, &bye).await;
                    }
                }
                if !ch.lost_nets.is_empty() || !ch.lost_scopes.is_empty() {
                    for p in self.table.forget_addrs(|a| lost(&ch, a)) {
                        tracing::info!(node = %p.node, "peer dropped: its link went away");
                    }
                }
                if !ch.fresh.is_empty() {
                    self.sender.hello(&self.sockets, Some(&ch.fresh)).await;
                    self.schedule.new_link(Instant::now());
                    self.seeds.nudge();
                }
            }
            Err(e) => {
                if !self.scan_failing {
                    tracing::warn!(error = %e, "beacon: cannot list interfaces (will retry)");
                }
                self.scan_failing = true;
            }
        }
    }

    /// Starts a peer exchange, unless one is still running.
    fn exchange(&mut self) {
        self.schedule.exchanged();
        while self.exchange.try_join_next().is_some() {}
        if !self.exchange.is_empty() {
            return;
        }
        let (t, on, stop) = (
            self.table.clone(),
            self.sockets.pex_on_link(),
            self.shutdown.child_token(),
        );
        self.exchange.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                n = pex::exchange(t, on) => tracing::debug!(learnt = n, "beacon: peer exchange"),
            }
        });
    }

    /// After a wake-up from suspend: a re-scan, a hello and the burst; then the peers silent
    /// since the wake-up and the expired ones are dropped.
    async fn look(&mut self) {
        let now = Instant::now();
        if let Some(slept) = self.wake_watch.look(wake::clocks(), now) {
            tracing::info!(
                ?slept,
                "beacon: woke up from suspend; re-announcing and asking who is still here"
            );
            self.schedule.rescan_now(now);
            self.sender.hello(&self.sockets, None).await;
            self.schedule.hello_again(now);
            self.seeds.nudge();
        }
        for p in self.wake_watch.drop_silent(&self.table, now) {
            tracing::info!(node = %p.node, "peer dropped: silent since the wake-up");
        }
        for p in self.table.expire(now) {
            tracing::info!(node = %p.node, addr = %p.http_addr(), "peer expired");
        }
    }
}
