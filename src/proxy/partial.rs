//! NARs this host's proxy is fetching into a file spool, offered to peers while they arrive
//! (issue #24: a crowd forms a chain or a tree instead of a star around the one holder).
//!
//! A fetch offers its NAR ([`Partials::offer`]) once it has a file spool and the signed narinfo
//! it checks the NAR against; this host's store server answers a peer's proxy for that path with
//! that narinfo (marked [`crate::cache_url::PARTIAL_HEADER`]) and with the bytes landed so far,
//! following the spool's tail (`tail`). The offer ends when the fetch ends, resets its spool (a
//! liar) or is dropped ([`Offered`] is a guard).
//!
//! Invariants: only narinfo this proxy accepted (signed by a trusted key, naming the path) is
//! offered; the bytes are unverified and marked so, and a receiving proxy verifies the whole NAR
//! against the signed hash and never passes them through. Bounds: at most [`MAX_PARTIALS`]
//! offers (more are not offered), each a narinfo (at most `narinfo::MAX_NARINFO_BYTES`) and a
//! handle on its spool file.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::tail::Tail;
use crate::cache_url;
use crate::narinfo::{Compression, NarHash, NarInfo, StorePathHash};

/// NARs offered at once (a fetch past it is not offered; it still fetches).
pub const MAX_PARTIALS: usize = 64;

/// One NAR being fetched, as peers are offered it.
pub struct Partial {
    /// The narinfo peers get: the signed one this proxy checked, its URL the self-describing NAR
    /// URL, `Compression: none`.
    pub narinfo: Bytes,
    pub nar_hash: NarHash,
    /// Where its bytes stand.
    pub tail: Tail,
    /// Which offer this is (a later fetch of the same path replaces it).
    id: u64,
}

/// The NARs offered now, by store path hash (shared by the proxy's fetches and the store
/// server).
#[derive(Default)]
pub struct Partials {
    offers: Mutex<HashMap<StorePathHash, Arc<Partial>>>,
    next_id: AtomicU64,
}

/// An offer, withdrawn when dropped.
pub struct Offered {
    partials: Arc<Partials>,
    hash: StorePathHash,
    id: u64,
}

impl Drop for Offered {
    fn drop(&mut self) {
        let mut m = self.partials.offers.lock().unwrap_or_else(|p| p.into_inner());
        if m.get(&self.hash).is_some_and(|p| p.id == self.id) {
            m.remove(&self.hash);
        }
    }
}

impl Partials {
    /// Offers the NAR of `info` (a narinfo this proxy accepted) whose bytes land in `tail`;
    /// `None` when [`MAX_PARTIALS`] are offered already.
    pub fn offer(self: &Arc<Self>, info: &NarInfo, tail: Tail) -> Option<Offered> {
        let hash = info.store_path.hash();
        let mut out = info.clone();
        out.url = cache_url::nar_url(&hash, &info.nar_hash);
        out.compression = Compression::None;
        out.file_hash = None;
        out.file_size = None;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let p = Arc::new(Partial {
            narinfo: Bytes::from(out.render()),
            nar_hash: info.nar_hash,
            tail,
            id,
        });
        let mut m = self.offers.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= MAX_PARTIALS && !m.contains_key(&hash) {
            return None;
        }
        m.insert(hash, p);
        Some(Offered {
            partials: self.clone(),
            hash,
            id,
        })
    }

    /// The NAR of `hash` being fetched, if offered.
    pub fn get(&self, hash: &StorePathHash) -> Option<Arc<Partial>> {
        self.offers.lock().unwrap_or_else(|p| p.into_inner()).get(hash).cloned()
    }
}
