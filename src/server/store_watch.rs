//! Paths added to the store behind our back (a local build, `nix copy`, another substituter)
//! are indexed within moments of becoming valid, not at the next rescan.
//!
//! Two inotify watches: the physical store directory, where a new path's directory appears
//! (while Nix is still writing it; its name gives the hash), and Nix's database directory
//! (`<store>/../var/nix/db`), written when Nix registers a path as valid. A new name in the store
//! makes its hash *pending*; a database write checks the pending hashes with the daemon
//! ([`index::check_new`]) once writes pause for [`DB_SETTLE`]: a valid one leaves the pending set
//! (and enters the index if servable, and so the content summary), an invalid one stays until
//! [`PENDING_FOR`] passed (then the periodic rescan finds it). Only local processes cause these
//! events; a peer cannot. Memory: at most [`PENDING_MAX`] pending hashes (about 64 bytes each)
//! and an event buffer of [`EVENT_BUFFER`] bytes. Without a store directory here (a remote
//! daemon) or without inotify, it logs why and the rescans alone keep the index in step.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use inotify::{Inotify, WatchMask};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::index::{self, Index};
use crate::narinfo::{StorePathHash, TrustedKeys};
use crate::store::Store;

/// Hashes of new store entries waiting to become valid; past this, new ones are left to the rescan.
pub const PENDING_MAX: usize = 1024;
/// A pending hash not valid after this long is dropped (a failed build leaves its directory).
pub const PENDING_FOR: Duration = Duration::from_secs(120);
/// Pending hashes are checked once the database saw no write for this long (Nix registers a
/// closure in several writes).
pub const DB_SETTLE: Duration = Duration::from_millis(50);
/// Bytes read from the inotify descriptor at once (about 100 events).
pub const EVENT_BUFFER: usize = 4096;

/// Where Nix keeps its database for the store whose files are in `store_dir`.
pub fn db_dir(store_dir: &Path) -> Option<PathBuf> {
    Some(store_dir.parent()?.join("var/nix/db"))
}

/// The hash of a store directory entry's name, unless it is not a store path (a lock, a temp).
fn hash_of_entry(name: &OsStr) -> Option<StorePathHash> {
    let name = name.to_str()?;
    if name.starts_with('.') || name.ends_with(".lock") || name.ends_with(".chroot") {
        return None;
    }
    let (hash, rest) = name.split_once('-')?;
    if rest.is_empty() {
        return None;
    }
    StorePathHash::parse(hash).ok()
}

/// Follows the store until `shutdown` (see the module doc).
pub async fn watch(store: Store, index: Arc<Index>, keys: TrustedKeys, shutdown: CancellationToken) {
    let dir = store.physical_store_dir();
    if let Err(e) = run(&dir, &store, &index, &keys, &shutdown).await {
        tracing::info!(dir = %dir.display(), error = %e, "not watching the store; new paths are found by the rescans");
        shutdown.cancelled().await;
    }
}

async fn run(
    dir: &Path,
    store: &Store,
    index: &Index,
    keys: &TrustedKeys,
    shutdown: &CancellationToken,
) -> std::io::Result<()> {
    let db = db_dir(dir).ok_or_else(|| std::io::Error::other("the store directory has no parent"))?;
    let inotify = Inotify::init()?;
    let store_wd = inotify
        .watches()
        .add(dir, WatchMask::CREATE | WatchMask::MOVED_TO | WatchMask::ONLYDIR)?;
    inotify
        .watches()
        .add(&db, WatchMask::MODIFY | WatchMask::CLOSE_WRITE | WatchMask::ONLYDIR)?;
    tracing::debug!(store = %dir.display(), db = %db.display(), "watching the store for new paths");
    let mut events = inotify.into_event_stream(vec![0u8; EVENT_BUFFER])?;
    let mut pending: HashMap<StorePathHash, Instant> = HashMap::new();
    // When the pending hashes are checked next (armed by a database write).
    let mut check_at: Option<Instant> = None;
    loop {
        let sleep = async {
            match check_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = sleep => {
                check_at = None;
                check_pending(&mut pending, store, index, keys).await;
            }
            ev = events.next() => match ev {
                None => return Err(std::io::Error::other("the inotify stream ended")),
                Some(Err(e)) => return Err(e),
                Some(Ok(ev)) if ev.wd == store_wd => {
                    if let Some(h) = ev.name.as_deref().and_then(hash_of_entry) {
                        if pending.len() < PENDING_MAX || pending.contains_key(&h) {
                            pending.insert(h, Instant::now());
                        }
                    }
                }
                // The database was written (or the queue overflowed: check anyway).
                Some(Ok(_)) => {
                    if !pending.is_empty() {
                        check_at = Some(Instant::now() + DB_SETTLE);
                    }
                }
            }
        }
    }
}

/// Checks every pending hash once; keeps those not valid yet and not too old.
async fn check_pending(
    pending: &mut HashMap<StorePathHash, Instant>,
    store: &Store,
    index: &Index,
    keys: &TrustedKeys,
) {
    let now = Instant::now();
    pending.retain(|_, since| now.duration_since(*since) < PENDING_FOR);
    let hashes: Vec<StorePathHash> = pending.keys().copied().collect();
    for h in hashes {
        match index::check_new(store, index, keys, &h).await {
            Ok(true) => {
                pending.remove(&h);
            }
            Ok(false) => {}
            Err(e) => tracing::debug!(hash = %h, error = %e, "cannot check a new store path"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_entry_names() {
        let h = "0c0rjlk3z6ck5c0csd5fcjzvd5ch5iw8";
        assert!(hash_of_entry(OsStr::new(&format!("{h}-hello-2.12"))).is_some());
        assert!(hash_of_entry(OsStr::new(&format!("{h}-hello-2.12.lock"))).is_none());
        assert!(hash_of_entry(OsStr::new(&format!("{h}-x.drv.chroot"))).is_none());
        assert!(hash_of_entry(OsStr::new(".links")).is_none());
        assert!(hash_of_entry(OsStr::new(&format!("{h}-"))).is_none());
        assert!(hash_of_entry(OsStr::new("not-a-hash")).is_none());
        assert_eq!(
            db_dir(Path::new("/nix/store")).as_deref(),
            Some(Path::new("/nix/var/nix/db"))
        );
    }
}
