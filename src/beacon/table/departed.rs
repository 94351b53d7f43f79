//! Peers that said goodbye, and the sequence number of their goodbye: an announce of theirs
//! that does not come after it (serial arithmetic, `wire::seq_after`) is a replay, recorded off
//! the link before the goodbye, and must not bring the peer back (issue #25: older announces
//! replayed from a departed host's address re-created its entry, and the proxy sent the next
//! occupant of that address its requests).
//!
//! Bounds: [`MAX_DEPARTED`] goodbyes (LRU, about 80 bytes each: under 100 KiB). Only goodbyes
//! that removed an entry are remembered (a proven goodbye, so an attacker needs an entry of its
//! own per goodbye, each through admission); one that floods its own goodbyes can push an
//! honest host's out, after which that host's older announces could be replayed again.

use std::num::NonZeroUsize;

use lru::LruCache;

use crate::beacon::wire::{self, NodeId};

/// Goodbyes remembered (least recently used forgotten first).
pub const MAX_DEPARTED: usize = 1024;

pub(super) struct Departed {
    /// The sequence number of each remembered goodbye, by node id.
    goodbyes: LruCache<NodeId, u32>,
}

impl Default for Departed {
    fn default() -> Self {
        Self {
            goodbyes: LruCache::new(NonZeroUsize::new(MAX_DEPARTED).unwrap_or(NonZeroUsize::MIN)),
        }
    }
}

impl Departed {
    /// `node` left with a goodbye numbered `seq`.
    pub(super) fn left(&mut self, node: NodeId, seq: u32) {
        self.goodbyes.put(node, seq);
    }

    /// Whether an announce of `node` numbered `seq` was sent before its goodbye (a replay).
    /// An announce after it is the node back (the goodbye came from a link it left): forgotten.
    pub(super) fn replayed(&mut self, node: &NodeId, seq: u32) -> bool {
        match self.goodbyes.peek(node) {
            Some(bye) if !wire::seq_after(seq, *bye) => true,
            Some(_) => {
                self.goodbyes.pop(node);
                false
            }
            None => false,
        }
    }

    /// Whether `node` said goodbye and has not announced since (peer exchange must not bring
    /// it back on hearsay).
    pub(super) fn contains(&self, node: &NodeId) -> bool {
        self.goodbyes.contains(node)
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.goodbyes.len()
    }
}
