//! When the beacon's sockets are read (issue #27: a laptop in a hall woke once per received
//! datagram, about 58 times a second among 300 hosts).
//!
//! A socket registered with the runtime's reactor wakes it for every datagram that arrives,
//! read or not. So the sockets are registered ([`Reader`] *listening*) only while the loop
//! waits for the first datagram after a quiet spell, while an answer to a query or a defence
//! of our node id is pending (then every announce heard counts at once: the answer's duplicate
//! suppression), and during our own start until its peer exchange (the answers to our query
//! name the peers it asks). Otherwise, once a datagram was read, the sockets are left
//! unregistered and read every [`READ_EVERY`] (at most a tenth of the announce interval),
//! each time draining what queued (at most
//! [`MAX_DRAIN`] datagrams a socket; a socket left with more is drained again at once, so a
//! flood is read as fast as before). A drain that finds nothing goes back to listening.
//!
//! What the wait costs: a query is read up to [`READ_EVERY`] after it arrived, so a newcomer's
//! answers come that much later (within `READ_EVERY` + the 400 ms answer jitter), and so does
//! the defence of our node id against an announce that claims it; the protocol's timing is
//! unchanged (`proto/beacon.md`: the wait is local).
//!
//! The kernel holds what arrives meanwhile: each socket asks for [`RCVBUF_BYTES`] of receive
//! buffer (the kernel doubles it and caps it at `net.core.rmem_max`; 212,992 bytes is the
//! usual default). A beacon datagram of about 100 bytes takes about 830 bytes of it (the
//! kernel counts the buffer it arrived in, measured on loopback), so the usual default holds
//! about 250 datagrams and the request about 1,260: at the 8 KB/s budget (about 40 datagrams a
//! second per family) 6 to 30 seconds of a hall's traffic, against a wait of 0.5 s. A flood
//! that fills the buffer within one wait makes the kernel drop what arrives next, honest
//! announces and forged ones alike (counted in the socket's drops, `/proc/net/udp`); reading
//! without a wait does the same once the reader falls behind, and the drain re-reads at once
//! while a socket stays full, so the wait adds at most one wait's worth of loss at a flood's
//! start. Memory: the two buffers, only while datagrams queue.

use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::time::Instant;

/// How long the sockets are left unread once a datagram was read (while no answer or defence
/// is pending); never more than [`READ_EVERY_INTERVALS`] of the configured announce interval
/// (tests announce every 300 ms, and a goodbye still removes a host within a tenth of that).
pub const READ_EVERY: Duration = Duration::from_millis(500);
/// See [`READ_EVERY`].
pub const READ_EVERY_INTERVALS: f64 = 0.1;
/// Most datagrams read from one socket per drain.
pub const MAX_DRAIN: usize = 512;
/// Receive buffer asked for each beacon socket.
pub const RCVBUF_BYTES: usize = 512 * 1024;

/// A socket's descriptor, as the reactor registers it (owned by `Sockets`, which outlives every
/// registration: a [`Reader`] is dropped before the sockets).
struct Raw(RawFd);

impl AsRawFd for Raw {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// The sockets' registrations while listening.
struct Listening {
    v4: Option<AsyncFd<Raw>>,
    v6: Option<AsyncFd<Raw>>,
}

/// Whether the loop listens (registered) or reads in batches, and when.
pub(super) struct Reader {
    listening: Option<Listening>,
    /// Batching: when the sockets are drained next.
    read_at: Option<Instant>,
    /// The wait between drains ([`READ_EVERY`], or less at a short announce interval).
    every: Duration,
}

/// What the loop should wait for, this turn.
pub(super) enum Wait {
    /// A datagram on a registered socket.
    Datagram,
    /// The next drain.
    Drain(Instant),
}

impl Reader {
    /// A reader for a beacon that announces every `interval` (configured).
    pub(super) fn new(interval: Duration) -> Self {
        Self {
            listening: None,
            read_at: None,
            every: READ_EVERY.min(interval.mul_f64(READ_EVERY_INTERVALS)),
        }
    }

    /// Registers or unregisters the sockets for this turn of the loop: registered when no
    /// batch is running or when `urgent` (an answer or a defence pending).
    /// `fds`: the IPv4 and IPv6 sockets' descriptors (`Sockets::fd_v4`, `fd_v6`).
    pub(super) fn prepare(&mut self, (v4, v6): (Option<RawFd>, Option<RawFd>), urgent: bool) -> Wait {
        match self.read_at {
            Some(at) if !urgent => {
                self.listening = None;
                Wait::Drain(at)
            }
            _ => {
                if self.listening.is_none() {
                    self.listening = Some(Listening {
                        v4: register(v4),
                        v6: register(v6),
                    });
                }
                Wait::Datagram
            }
        }
    }

    /// Resolves when a registered socket has a datagram (its readiness is cleared: the drain
    /// that follows reads until the socket is empty). Pending while not listening.
    pub(super) async fn readable(&self) {
        let Some(l) = &self.listening else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = ready(l.v4.as_ref()) => {}
            _ = ready(l.v6.as_ref()) => {}
        }
    }

    /// A drain read `read` datagrams at `now` (`full`: a socket had more than [`MAX_DRAIN`]):
    /// the next after the wait, at once when full, none (listen again) when nothing came.
    pub(super) fn drained(&mut self, read: usize, full: bool, now: Instant) {
        self.read_at = match (read, full) {
            (_, true) => Some(now),
            (0, _) => None,
            _ => Some(now + self.every),
        };
    }

    /// Whether the sockets are registered now (tests).
    #[cfg(test)]
    fn listening(&self) -> bool {
        self.listening.is_some()
    }
}

/// Resolves when `f` is readable, clearing its readiness; pending without a socket.
async fn ready(f: Option<&AsyncFd<Raw>>) {
    match f {
        Some(f) => match f.readable().await {
            Ok(mut g) => g.clear_ready(),
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Registers `fd` for readability; `None` when there is no such socket or it fails (then it is
/// still drained on the batch timer, at least every [`READ_EVERY`] while traffic comes).
fn register(fd: Option<RawFd>) -> Option<AsyncFd<Raw>> {
    let fd = fd?;
    // SAFETY: `fd` is a beacon socket owned by `Sockets`, open for as long as the beacon loop
    // runs; the registration lives in the loop's `Reader`, dropped before the sockets.
    match unsafe { AsyncFd::register_with_interest(Raw(fd), Interest::READABLE) } {
        Ok(a) => Some(a),
        Err(e) => {
            tracing::warn!(error = %e, "beacon: cannot register a socket with the reactor");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue #27: the loop woke for every datagram. After a read it now leaves the sockets
    /// unregistered for `READ_EVERY`, unless an answer or a defence is pending; a drain that
    /// found nothing listens again, one that filled up drains again at once.
    #[tokio::test(start_paused = true)]
    async fn after_a_read_the_sockets_are_read_in_batches_unless_a_reply_is_pending() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        sock.set_nonblocking(true).expect("nonblocking");
        let sockets = (Some(sock.as_raw_fd()), None);
        let mut r = Reader::new(Duration::from_secs(5));
        let t0 = Instant::now();
        assert!(matches!(r.prepare(sockets, false), Wait::Datagram));
        assert!(r.listening());
        r.drained(3, false, t0);
        assert!(matches!(r.prepare(sockets, false), Wait::Drain(at) if at == t0 + READ_EVERY));
        assert!(!r.listening(), "unregistered while batching");
        assert!(matches!(r.prepare(sockets, true), Wait::Datagram), "a reply pending");
        assert!(r.listening());
        r.drained(MAX_DRAIN, true, t0);
        assert!(matches!(r.prepare(sockets, false), Wait::Drain(at) if at == t0));
        r.drained(0, false, t0);
        assert!(matches!(r.prepare(sockets, false), Wait::Datagram), "quiet: listening");
    }
}
