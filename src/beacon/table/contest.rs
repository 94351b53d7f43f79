//! Contested node ids: the store-server addresses to ask for a proof of the id claimed there
//! (a queue of at most [`MAX_PENDING`]), and what each address answered (an LRU of
//! [`MAX_ASKED`]). The prover (`beacon::prover`) takes from the queue and reports back.
//!
//! An address is asked at most once per [`ASK_AGAIN_AFTER`] when it answered (its answer names
//! the id it holds, so forged contests for any number of ids at a victim's address cost it one
//! request per window from each host), and again after `retry_after` when it did not; a single
//! claim never has it asked (a single spoofed datagram never makes the hall send requests to a
//! third host).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::time::Duration;

use lru::LruCache;
use tokio::time::Instant;

use crate::beacon::wire::NodeId;

/// Addresses waiting for their store server to be asked.
pub const MAX_PENDING: usize = 64;
/// Store-server addresses remembered as asked (about 120 bytes each in the LRU: a 32-byte
/// address key, a 40-byte state, list links and the hash slot; under 0.5 MiB).
pub const MAX_ASKED: usize = 4096;
/// An address that answered (or is being asked) is asked again after this long.
pub const ASK_AGAIN_AFTER: Duration = Duration::from_secs(30);
/// First wait before an address whose proof failed is asked again (doubling, at most
/// [`ASK_AGAIN_AFTER`]).
pub const FIRST_RETRY: Duration = Duration::from_secs(2);

/// What this host knows of the store server at one address (IP, port and scope).
#[derive(Clone, Copy, Debug)]
struct Asked {
    /// When it was last asked.
    at: Instant,
    /// What it answered.
    state: AskState,
    /// Requests in a row that proved nothing (no answer, 404, or a bad proof).
    failures: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AskState {
    /// A claim came from it once: asked only when one comes again (a single spoofed datagram
    /// never makes the hall send requests to a third host).
    Heard,
    /// Queued or being asked.
    Pending,
    /// It proved this node id (whatever id the announce that made us ask named: the answer
    /// carries the key, so one request settles every claim made at the address).
    Holds(NodeId),
    /// No proof.
    Failed,
}

/// How long after `failures` requests in a row that proved nothing an address is asked again
/// (2 s, doubling, at most [`ASK_AGAIN_AFTER`]).
pub(super) fn retry_after(failures: u32) -> Duration {
    FIRST_RETRY
        .saturating_mul(1 << failures.saturating_sub(1).min(8))
        .min(ASK_AGAIN_AFTER)
}

/// The proof queue and what every asked address answered.
pub(super) struct Contests {
    /// Addresses whose store server should be asked to prove a node id, with the id claimed
    /// there (for the log), at most [`MAX_PENDING`].
    proofs: VecDeque<(NodeId, SocketAddr)>,
    /// Per store-server address (IP, port, scope; LRU of [`MAX_ASKED`]): when it was last
    /// asked and what it proved.
    asked: LruCache<SocketAddr, Asked>,
}

impl Default for Contests {
    fn default() -> Self {
        Self {
            proofs: VecDeque::new(),
            asked: LruCache::new(NonZeroUsize::new(MAX_ASKED).unwrap_or(NonZeroUsize::MIN)),
        }
    }
}

impl Contests {
    /// The node id the store server at `addr` proved within the last [`ASK_AGAIN_AFTER`].
    pub(super) fn holder(&self, addr: SocketAddr, now: Instant) -> Option<NodeId> {
        match self.asked.peek(&addr) {
            Some(Asked {
                at,
                state: AskState::Holds(n),
                ..
            }) if now < *at + ASK_AGAIN_AFTER => Some(*n),
            _ => None,
        }
    }

    /// Queues `addr`'s store server to be asked for a proof of `node` (unless it is being
    /// asked, answered lately, or failed lately); true when queued. A full queue gives up a
    /// random waiting address for it (asked again when it announces again): a flood of
    /// contests at addresses where nothing answers cannot keep a real claimant out for good.
    pub(super) fn want_proof(&mut self, node: NodeId, addr: SocketAddr, now: Instant) -> bool {
        let failures = match self.asked.get(&addr) {
            None => {
                self.asked.put(
                    addr,
                    Asked {
                        at: now,
                        state: AskState::Heard,
                        failures: 0,
                    },
                );
                return false;
            }
            Some(a) => {
                let wait = match a.state {
                    AskState::Heard => Duration::ZERO,
                    AskState::Pending | AskState::Holds(_) => ASK_AGAIN_AFTER,
                    AskState::Failed => retry_after(a.failures),
                };
                if now < a.at + wait {
                    return false;
                }
                a.failures
            }
        };
        if self.proofs.len() >= MAX_PENDING {
            let i = rand::Rng::gen_range(&mut rand::thread_rng(), 0..self.proofs.len());
            if let Some((_, dropped)) = self.proofs.remove(i) {
                self.asked.pop(&dropped);
            }
        }
        self.asked.put(
            addr,
            Asked {
                at: now,
                state: AskState::Pending,
                failures,
            },
        );
        self.proofs.push_back((node, addr));
        true
    }

    /// Every queued (node, address) pair.
    pub(super) fn take_all(&mut self) -> Vec<(NodeId, SocketAddr)> {
        self.proofs.drain(..).collect()
    }

    /// The oldest queued (node, address) pair.
    pub(super) fn take_one(&mut self) -> Option<(NodeId, SocketAddr)> {
        self.proofs.pop_front()
    }

    /// The store server at `addr` was asked: it proved `holder`, or nothing (one more failure
    /// in a row).
    pub(super) fn answered(&mut self, addr: SocketAddr, holder: Option<NodeId>, now: Instant) {
        let failures = self.asked.peek(&addr).map_or(0, |a| a.failures);
        let (state, failures) = match holder {
            Some(n) => (AskState::Holds(n), 0),
            None => (AskState::Failed, failures.saturating_add(1)),
        };
        self.asked.put(
            addr,
            Asked {
                at: now,
                state,
                failures,
            },
        );
    }
}
