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

    /// The NAR of `hash` being fetched, if offered, once its first bytes landed (a fetch that
    /// waits for a busy source has nothing to give, and must not draw the crowd to itself), and
    /// while they are there to serve (not after a reset, nor when a pass-through took its start:
    /// then its file lacks it).
    pub fn get(&self, hash: &StorePathHash) -> Option<Arc<Partial>> {
        let p = self
            .offers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(hash)
            .cloned()?;
        (!p.tail.abandoned() && p.tail.filled() > 0).then_some(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::narinfo::StorePath;
    use crate::proxy::tail::TailWriter;

    fn info(i: u32) -> NarInfo {
        let hash: String = (0..32)
            .map(|k| b"0123456789abcdfghijklmnpqrsvwxyz"[((i >> (k % 4 * 5)) as usize + k) % 32] as char)
            .collect();
        NarInfo {
            store_path: StorePath::parse("/nix/store", &format!("/nix/store/{hash}-x")).expect("path"),
            url: "nar/elsewhere.nar.xz".into(),
            compression: Compression::Xz,
            file_hash: None,
            file_size: None,
            nar_hash: NarHash::from_digest([1; 32]),
            nar_size: 10,
            references: vec![],
            deriver: None,
            sigs: vec![],
            ca: None,
        }
    }

    fn tail() -> (TailWriter, Tail) {
        TailWriter::new(Arc::new(tempfile::tempfile().expect("file")), 10)
    }

    /// An offer is served with our own NAR URL and `Compression: none`, withdrawn by its guard
    /// (not by a later offer's) and hidden once its tail is abandoned; past the cap nothing new
    /// is offered.
    #[test]
    fn offers_are_withdrawn_with_their_guard_or_their_tail_and_capped() {
        let p = Arc::new(Partials::default());
        let i = info(1);
        let hash = i.store_path.hash();
        let (w, t) = tail();
        let first = p.offer(&i, t).expect("offered");
        assert!(p.get(&hash).is_none(), "nothing landed yet");
        w.filled(4);
        let got = p.get(&hash).expect("served");
        let text = String::from_utf8_lossy(&got.narinfo).to_string();
        assert!(
            text.contains(&format!("URL: {}", cache_url::nar_url(&hash, &i.nar_hash))),
            "{text}"
        );
        assert!(text.contains("Compression: none"), "{text}");
        // A later fetch of the same path replaces it; the first guard no longer withdraws it.
        let (w2, t2) = tail();
        w2.filled(4);
        let second = p.offer(&i, t2).expect("replaced");
        drop(first);
        assert!(p.get(&hash).is_some());
        drop(second);
        assert!(p.get(&hash).is_none(), "withdrawn with its guard");
        // An abandoned tail is not served.
        let (w3, t3) = tail();
        w3.filled(4);
        let _third = p.offer(&i, t3).expect("offered");
        w3.abandon();
        assert!(p.get(&hash).is_none(), "abandoned");
        drop(w);
        // The cap.
        let held: Vec<_> = (100..100 + MAX_PARTIALS as u32)
            .filter_map(|n| p.offer(&info(n), tail().1))
            .collect();
        assert_eq!(held.len(), MAX_PARTIALS - 1, "one place is the abandoned offer's");
        assert!(p.offer(&info(7), tail().1).is_none(), "past the cap");
    }
}
