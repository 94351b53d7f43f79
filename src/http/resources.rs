//! Process resources the servers depend on: the open-file limit (raised at start) and memory
//! handed back to the system after bursts ([`release_after_bursts`]).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::tasks::BodyTasks;

/// Raises this process's soft open-file limit to its hard limit (services often start with a
/// soft limit of 1024, too few for a thousand clients) and logs the outcome. Returns the soft
/// limit now in force.
pub fn raise_nofile_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-file limit");
            return None;
        }
    };
    if soft >= hard {
        return Some(soft);
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => {
            tracing::debug!(from = soft, to = hard, "raised the open-file limit");
            Some(hard)
        }
        Err(e) => {
            tracing::warn!(error = %e, soft, hard, "cannot raise the open-file limit");
            Some(soft)
        }
    }
}

/// Hands memory that is free inside the allocator back to the system (glibc keeps what a burst
/// of transfers freed in its per-thread arenas: 27 MiB after a 100-client crowd on one NAR,
/// 64 MiB after the same crowd with zstd, measured by `bench/hostile.sh`). Takes a few ms; the
/// store server calls it when its transfers have gone idle. A no-op outside glibc (musl's
/// allocator returns memory by itself).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only walks the allocator's own free lists (under its locks) and
        // returns unused pages to the kernel; it touches no memory the program owns.
        unsafe {
            nix::libc::malloc_trim(0);
        }
    }
}

/// This process's soft open-file limit (`None` if it cannot be read, or is unlimited).
pub fn nofile_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, Resource};
    getrlimit(Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _)| soft)
        .filter(|&s| s != nix::sys::resource::RLIM_INFINITY)
}

/// Until `shutdown`: when the last of `tasks` ends (a burst of transfers is over), and at least
/// every `safety` (bursts that start no body task: connections alone), asks `burst_over` and,
/// when it says so, runs `release` (e.g. [`release_free_memory`]) off the reactor. Issue #27:
/// the store server looked every 2 s, a wake-up an idle laptop paid for.
pub async fn release_after_bursts(
    tasks: Arc<BodyTasks>,
    mut burst_over: impl FnMut() -> bool,
    release: impl Fn() + Clone + Send + 'static,
    safety: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tasks.went_idle() => {}
            _ = tokio::time::sleep(safety) => {}
            _ = shutdown.cancelled() => return,
        }
        if burst_over() {
            let _ = tokio::task::spawn_blocking(release.clone()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The release runs when the burst's last task ends, not at the next turn of a timer.
    #[tokio::test(start_paused = true)]
    async fn memory_is_released_when_the_last_task_ends() {
        let tasks = Arc::new(BodyTasks::default());
        let released = Arc::new(AtomicUsize::new(0));
        let shutdown = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tasks.spawn(async move {
            let _ = rx.await;
        });
        let mut parts = tokio::task::JoinSet::new();
        let r = released.clone();
        parts.spawn(release_after_bursts(
            tasks.clone(),
            || true,
            move || {
                r.fetch_add(1, Ordering::SeqCst);
            },
            Duration::from_secs(3600),
            shutdown.clone(),
        ));
        let t0 = tokio::time::Instant::now();
        let _ = tx.send(());
        for _ in 0..1000 {
            if released.load(Ordering::SeqCst) == 1 {
                break;
            }
            tokio::task::yield_now().await;
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(released.load(Ordering::SeqCst), 1, "released when the last task ended");
        assert_eq!(t0.elapsed(), Duration::ZERO, "no timer involved");
        shutdown.cancel();
        while parts.join_next().await.is_some() {}
    }
}
