//! The tasks that feed streamed response bodies (a NAR pump, its encoder, a file reader), owned
//! by their server.
//!
//! Invariant: no body task outlives its owner. A task ends on its own when its body is done or
//! its client went away ([`super::Pace`] notices); finished tasks are reaped as new ones start
//! and by [`BodyTasks::own`]; at shutdown the rest get [`DRAIN_TIMEOUT`] (the time open
//! connections get to finish their responses) and are then aborted; dropping the owner aborts
//! whatever is left.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::serve::DRAIN_TIMEOUT;

/// How often [`BodyTasks::own`] reaps finished tasks, so their memory goes back after a burst
/// even when no new transfer starts.
const REAP_EVERY: Duration = Duration::from_secs(2);

/// One server's body tasks (a `JoinSet`: aborted when dropped).
#[derive(Default)]
pub struct BodyTasks {
    set: Mutex<JoinSet<()>>,
}

impl BodyTasks {
    /// Starts `task`, reaping the ones that finished.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut set = self.lock();
        while set.try_join_next().is_some() {}
        set.spawn(task);
    }

    /// Tasks started and not reaped yet.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Owns the tasks until `shutdown`: reaps finished ones, then at shutdown gives the rest
    /// [`DRAIN_TIMEOUT`] to end and aborts what is left. A part of the node.
    pub async fn own(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(REAP_EVERY) => {
                    let mut set = self.lock();
                    while set.try_join_next().is_some() {}
                }
                _ = shutdown.cancelled() => break,
            }
        }
        let mut set = std::mem::take(&mut *self.lock());
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async { while set.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::debug!(
                left = set.len(),
                "body tasks still running after the drain timeout; aborting them"
            );
        }
        set.shutdown().await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, JoinSet<()>> {
        self.set.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn finished_tasks_are_reaped_and_the_rest_aborted_after_the_drain() {
        let tasks = Arc::new(BodyTasks::default());
        for _ in 0..3 {
            tasks.spawn(async {});
        }
        tokio::task::yield_now().await;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        // A task that never ends on its own; it holds `tx` until aborted.
        tasks.spawn(async move {
            let _tx = tx;
            std::future::pending::<()>().await
        });
        assert_eq!(tasks.len(), 1, "the finished ones were reaped");
        let shutdown = CancellationToken::new();
        let owner = tokio::spawn(tasks.clone().own(shutdown.clone()));
        shutdown.cancel();
        let t0 = tokio::time::Instant::now();
        owner.await.expect("owner");
        assert_eq!(t0.elapsed(), DRAIN_TIMEOUT);
        assert!(rx.await.is_err(), "the stuck task was aborted");
        assert!(tasks.is_empty());
    }
}
