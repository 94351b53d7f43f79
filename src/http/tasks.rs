//! The tasks that feed streamed response bodies (a NAR pump, its encoder, a file reader), owned
//! by their server.
//!
//! Invariant: no body task outlives its owner. A task ends on its own when its body is done or
//! its client went away ([`super::Pace`] notices); finished tasks are reaped as new ones start
//! and by [`BodyTasks::own`], woken by each task's end (not a timer: issue #27, idle wake-ups);
//! [`BodyTasks::went_idle`] tells when the last running one ended (a burst is over); at shutdown the rest get [`DRAIN_TIMEOUT`] (the time open
//! connections get to finish their responses) and are then aborted; dropping the owner aborts
//! whatever is left.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::serve::DRAIN_TIMEOUT;

/// One server's body tasks (a `JoinSet`: aborted when dropped).
#[derive(Default)]
pub struct BodyTasks {
    set: Mutex<JoinSet<()>>,
    /// What the tasks tell as they end.
    ends: Arc<Ends>,
}

/// Told by every task as it ends (finished, or aborted: a drop guard tells).
#[derive(Default)]
struct Ends {
    /// Tasks started and not ended.
    running: AtomicUsize,
    /// A task ended: the owner reaps it (one waiter; a permit is kept).
    ended: Notify,
    /// The last running task ended ([`BodyTasks::went_idle`]; one waiter).
    idle: Notify,
}

/// Held by a running task; tells [`Ends`] when the task is dropped.
struct Running(Arc<Ends>);

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_one();
        }
        self.0.ended.notify_one();
    }
}

impl BodyTasks {
    /// Starts `task`, reaping the ones that finished.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut set = self.lock();
        while set.try_join_next().is_some() {}
        self.ends.running.fetch_add(1, Ordering::AcqRel);
        let running = Running(self.ends.clone());
        // The task (and whatever it holds, a transfer slot) is dropped before `running` tells.
        set.spawn(async move {
            let _running = running;
            task.await;
        });
    }

    /// Resolves once the last running task ended (since the last call): a burst of transfers
    /// is over. For one waiter (the store server's memory release).
    pub async fn went_idle(&self) {
        self.ends.idle.notified().await
    }

    /// Tasks started and not reaped yet.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Owns the tasks until `shutdown`: reaps each as it ends, then at shutdown gives the rest
    /// [`DRAIN_TIMEOUT`] to end and aborts what is left. A part of the node.
    pub async fn own(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = self.ends.ended.notified() => {
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

    /// Issue #27: finished tasks were reaped by a 2 s timer (a wake-up every 2 s on an idle
    /// laptop). The owner now wakes when a task ends, and only then; the last one's end tells
    /// `went_idle`.
    #[tokio::test(start_paused = true)]
    async fn a_task_is_reaped_when_it_ends_and_the_last_one_tells_idle() {
        let tasks = Arc::new(BodyTasks::default());
        let shutdown = CancellationToken::new();
        let mut owner = JoinSet::new();
        owner.spawn(tasks.clone().own(shutdown.clone()));
        let (tx1, rx1) = tokio::sync::oneshot::channel::<()>();
        let (tx2, rx2) = tokio::sync::oneshot::channel::<()>();
        tasks.spawn(async move {
            let _ = rx1.await;
        });
        tasks.spawn(async move {
            let _ = rx2.await;
        });
        let t0 = tokio::time::Instant::now();
        let settle = || async {
            for _ in 0..100 {
                tokio::task::yield_now().await;
            }
        };
        settle().await;
        assert_eq!(tasks.len(), 2);
        let _ = tx1.send(());
        settle().await;
        assert_eq!(tasks.len(), 1, "reaped as it ended");
        let idle = tokio::time::timeout(std::time::Duration::ZERO, tasks.went_idle()).await;
        assert!(idle.is_err(), "one still runs");
        let _ = tx2.send(());
        settle().await;
        assert!(tasks.is_empty(), "reaped as it ended");
        assert_eq!(t0.elapsed(), std::time::Duration::ZERO, "no timer involved");
        let idle = tokio::time::timeout(std::time::Duration::ZERO, tasks.went_idle()).await;
        assert!(idle.is_ok(), "the last one ended: idle");
        shutdown.cancel();
        while owner.join_next().await.is_some() {}
    }
}
