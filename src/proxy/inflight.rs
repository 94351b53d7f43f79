//! NAR fetches under way, by NAR hash: concurrent requests for the same NAR (Nix retrying, two
//! clients) share one fetch and one spool ([`InFlight`]), and the tasks a fetch runs in, which
//! the in-flight set owns (aborted with it, never detached).
//!
//! Bounds: one entry per NAR being fetched, at most one per open proxy connection; a finished
//! task is reaped at the next spawn.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::OnceCell;
use tokio::task::{AbortHandle, JoinSet};

use super::error::FetchError;
use super::fetch::Fetched;
use crate::narinfo::NarHash;

/// A fetch's result, shared by every request waiting for the same NAR.
pub type SharedFetch = Result<Fetched, Arc<FetchError>>;

/// One fetch under way: set once, by whichever request (or task) runs it.
pub type FetchCell = Arc<OnceCell<SharedFetch>>;

/// The fetches under way, by NAR hash (a handle: clones share the map, for the tasks that end a
/// fetch).
#[derive(Clone, Default)]
pub struct Fetches(Arc<Mutex<HashMap<NarHash, FetchCell>>>);

impl Fetches {
    fn lock(&self) -> MutexGuard<'_, HashMap<NarHash, FetchCell>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The fetch of `nar_hash` under way, or a new one to run.
    pub fn join(&self, nar_hash: &NarHash) -> FetchCell {
        self.lock().entry(*nar_hash).or_default().clone()
    }

    /// A new fetch of `nar_hash`, unless one is under way (`None`: join that one).
    pub fn start(&self, nar_hash: &NarHash) -> Option<FetchCell> {
        let mut m = self.lock();
        if m.contains_key(nar_hash) {
            return None;
        }
        let cell = FetchCell::default();
        m.insert(*nar_hash, cell.clone());
        Some(cell)
    }

    /// Removes the entry of a fetch that ended (unless another took its place).
    pub fn done(&self, nar_hash: &NarHash, cell: &FetchCell) {
        let mut m = self.lock();
        if m.get(nar_hash).is_some_and(|c| Arc::ptr_eq(c, cell)) {
            m.remove(nar_hash);
        }
    }
}

/// The fetches under way and the tasks they run in (a pass-through's fetch and its body).
#[derive(Default)]
pub struct InFlight {
    fetches: Fetches,
    /// Owned here: aborted when the proxy goes; finished ones reaped at the next spawn.
    tasks: Mutex<JoinSet<()>>,
}

impl InFlight {
    /// The fetches under way.
    pub fn fetches(&self) -> &Fetches {
        &self.fetches
    }

    /// Runs `task` on its own, owned by this set; the handle aborts it earlier.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) -> AbortHandle {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        while tasks.try_join_next().is_some() {}
        tasks.spawn(task)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_fetch_per_nar_and_its_tasks_end_with_their_owner() {
        let f = InFlight::default();
        let h = NarHash::from_digest([1; 32]);
        let first = f.fetches().start(&h).expect("nothing under way");
        assert!(f.fetches().start(&h).is_none(), "a second request joins");
        assert!(Arc::ptr_eq(&first, &f.fetches().join(&h)));
        f.fetches().done(&h, &FetchCell::default());
        assert!(f.fetches().start(&h).is_none(), "another fetch's end leaves this one");
        f.fetches().done(&h, &first);
        assert!(
            f.fetches().start(&h).is_some(),
            "once ended, the next request starts anew"
        );
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        f.spawn(async move {
            let _tx = tx;
            std::future::pending::<()>().await
        });
        drop(f);
        assert!(rx.await.is_err(), "the task was aborted with the set that owns it");
    }
}
