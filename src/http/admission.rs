//! Connection admission: who holds the open connections of one server, which are idle, and who
//! makes room for a newcomer. Past a cap (per server, per client address), the oldest *idle*
//! connection of that address, or else of anyone, is closed; a busy one never is.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio_util::sync::CancellationToken;

use super::body::Body;

/// Open connections per server by default (the store server derives its own cap from the
/// open-file limit). Memory: a few KiB of task state and an 8 KiB buffer per idle connection
/// (about 20 MiB for 1024); a client sending huge headers grows its buffer to at most
/// the connection buffer (`serve::MAX_READ_BUF`) until the header timeout.
pub const MAX_CONNECTIONS: usize = 1024;
/// A client must send its request headers within this time (slowloris guard); also the longest a
/// kept-alive connection may sit idle between requests.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Connection admission settings of one server.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    /// Open connections in all.
    pub max: usize,
    /// Open connections per client address (IPv6: per /64, which one host may fill alone).
    pub per_addr: usize,
    /// Request headers must arrive within this time, also between requests on a kept-alive
    /// connection, so an idle connection lives at most this long.
    pub header_timeout: Duration,
}

/// Default: [`MAX_CONNECTIONS`] in all, no share per address (the proxy's clients are all local).
impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            max: MAX_CONNECTIONS,
            per_addr: MAX_CONNECTIONS,
            header_timeout: HEADER_READ_TIMEOUT,
        }
    }
}

/// The key a client is counted under: its IPv4 address, or the /64 of its IPv6 address (IPv4
/// mapped into IPv6 by a dual-stack socket counts as IPv4).
pub fn addr_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// The open connections of one server: who holds them and which are idle.
/// Memory: one entry per open connection and one per client key, both at most `limits.max`.
pub struct Admission {
    pub(super) limits: ConnLimits,
    table: Mutex<ConnTable>,
    /// Zero point of `ConnState::last_active`.
    epoch: std::time::Instant,
}

#[derive(Default)]
struct ConnTable {
    /// Most connections open at once since [`Admission::take_peak`] last looked.
    peak: usize,
    next_id: u64,
    conns: HashMap<u64, Arc<ConnState>>,
    per_key: HashMap<IpAddr, usize>,
}

/// What the admission table knows of one connection.
pub(super) struct ConnState {
    id: u64,
    key: IpAddr,
    /// Requests whose response (body included) is still being produced or sent.
    busy: AtomicUsize,
    /// When it last accepted or finished a request (ms since `Admission::epoch`): the oldest idle
    /// connection is shed first.
    last_active: AtomicU64,
    /// Cancelled to close the connection (it was idle and a newcomer needed its place).
    pub(super) shed: CancellationToken,
    epoch: std::time::Instant,
}

impl ConnState {
    fn touch(&self) {
        self.last_active
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl Admission {
    pub fn new(limits: ConnLimits) -> Self {
        Self {
            limits: ConnLimits {
                max: limits.max.max(1),
                per_addr: limits.per_addr.max(1),
                ..limits
            },
            table: Mutex::new(ConnTable::default()),
            epoch: std::time::Instant::now(),
        }
    }

    pub fn limits(&self) -> ConnLimits {
        self.limits
    }

    /// Most connections open at once since the last call (and now).
    pub fn take_peak(&self) -> usize {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let peak = t.peak.max(t.conns.len());
        t.peak = t.conns.len();
        peak
    }

    /// Open connections now.
    pub fn open(&self) -> usize {
        self.table.lock().unwrap_or_else(|p| p.into_inner()).conns.len()
    }

    /// Makes room for a connection from `ip`, shedding an idle one if needed. `None`: no room.
    pub(super) fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let key = addr_key(ip);
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if t.per_key.get(&key).copied().unwrap_or(0) >= self.limits.per_addr {
            let victim = oldest_idle(&t, Some(key))?;
            t.remove(victim);
        }
        if t.conns.len() >= self.limits.max {
            let victim = oldest_idle(&t, None)?;
            t.remove(victim);
        }
        t.next_id += 1;
        let state = Arc::new(ConnState {
            id: t.next_id,
            key,
            busy: AtomicUsize::new(0),
            last_active: AtomicU64::new(0),
            shed: CancellationToken::new(),
            epoch: self.epoch,
        });
        state.touch();
        t.conns.insert(state.id, state.clone());
        t.peak = t.peak.max(t.conns.len());
        *t.per_key.entry(key).or_insert(0) += 1;
        Some(Slot {
            state,
            admission: self.clone(),
        })
    }
}

/// The idle connection (of `key`, or of anyone) that has been idle longest.
fn oldest_idle(t: &ConnTable, key: Option<IpAddr>) -> Option<u64> {
    t.conns
        .values()
        .filter(|c| key.is_none_or(|k| c.key == k) && c.busy.load(Ordering::Acquire) == 0)
        .min_by_key(|c| (c.last_active.load(Ordering::Relaxed), c.id))
        .map(|c| c.id)
}

impl ConnTable {
    /// Forgets connection `id` and tells it to close.
    fn remove(&mut self, id: u64) {
        if let Some(c) = self.conns.remove(&id) {
            c.shed.cancel();
            if let Some(n) = self.per_key.get_mut(&c.key) {
                *n -= 1;
                if *n == 0 {
                    self.per_key.remove(&c.key);
                }
            }
        }
    }
}

/// An admitted connection's place in the table, given back when the connection ends.
pub(super) struct Slot {
    pub(super) state: Arc<ConnState>,
    admission: Arc<Admission>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.admission
            .table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(self.state.id);
    }
}

/// Marks a connection busy from the start of a request until its response body is gone.
pub(super) struct BusyGuard(Arc<ConnState>);

impl BusyGuard {
    pub(super) fn new(state: Arc<ConnState>) -> Self {
        state.busy.fetch_add(1, Ordering::AcqRel);
        state.touch();
        Self(state)
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its connection marked busy until it is dropped.
pub(super) struct TrackedBody {
    pub(super) body: Body,
    pub(super) _busy: BusyGuard,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_sheds_the_oldest_idle_connection_never_a_busy_one() {
        let adm = Arc::new(Admission::new(ConnLimits {
            max: 3,
            per_addr: 2,
            header_timeout: HEADER_READ_TIMEOUT,
        }));
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let a1 = adm.admit(ip("10.0.0.1")).expect("a1");
        let a2 = adm.admit(ip("10.0.0.1")).expect("a2");
        // Past the address's share: its own oldest idle connection makes room.
        let a3 = adm.admit(ip("10.0.0.1")).expect("a3");
        assert!(a1.state.shed.is_cancelled() && !a2.state.shed.is_cancelled());
        drop(a1);
        assert_eq!(adm.open(), 2);
        // A busy connection is never shed: with both of 10.0.0.1's busy, a third is refused.
        let (_b2, _b3) = (BusyGuard::new(a2.state.clone()), BusyGuard::new(a3.state.clone()));
        assert!(adm.admit(ip("10.0.0.1")).is_none());
        // Another address gets in; at the total cap the oldest idle one of anyone goes.
        let c = adm.admit(ip("10.0.0.2")).expect("c");
        assert_eq!(adm.open(), 3);
        let d = adm
            .admit(ip("::ffff:10.0.0.3"))
            .expect("d takes c's place, the only idle one");
        assert!(c.state.shed.is_cancelled() && !d.state.shed.is_cancelled());
        drop(c);
        assert_eq!(adm.open(), 3);
        // All busy: refused.
        let _bd = BusyGuard::new(d.state.clone());
        assert!(adm.admit(ip("10.0.0.4")).is_none());
    }

    #[test]
    fn ipv6_clients_count_per_64() {
        let k = |s: &str| addr_key(s.parse().expect("ip"));
        assert_eq!(k("fd00:1:2:3:4:5:6:7"), k("fd00:1:2:3::9"));
        assert_ne!(k("fd00:1:2:3::1"), k("fd00:1:2:4::1"));
        assert_eq!(k("::ffff:192.0.2.1"), k("192.0.2.1"));
    }
}
