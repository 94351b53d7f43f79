//! Who is told when the table changes: waiters for a join or leave (the `peers` tool), and the
//! table's generation, which also moves when a peer's summary version changes (the proxy's
//! summary loop waits on it instead of polling the table; issue #27, idle wake-ups).

use tokio::sync::{watch, Notify};

pub(super) struct Changes {
    /// Woken on every join or leave, for whoever waits for the table to change.
    membership: Notify,
    /// Bumped on every join or leave and every change of a peer's summary version. A watch, so
    /// a change made while its receiver was busy is seen at its next wait, never lost.
    generation: watch::Sender<u64>,
}

impl Default for Changes {
    fn default() -> Self {
        Self {
            membership: Notify::new(),
            generation: watch::Sender::new(0),
        }
    }
}

impl Changes {
    /// A peer joined or left.
    pub(super) fn membership(&self) {
        self.membership.notify_waiters();
        self.summaries();
    }

    /// A peer's summary version changed.
    pub(super) fn summaries(&self) {
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// After an announce: a peer `joined`, or its summary version changed (`resummed`).
    pub(super) fn told(&self, joined: bool, resummed: bool) {
        if joined {
            self.membership();
        } else if resummed {
            self.summaries();
        }
    }

    /// Resolves at the next join or leave.
    pub(super) async fn joined_or_left(&self) {
        self.membership.notified().await
    }

    pub(super) fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}
