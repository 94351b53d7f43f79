//! Process resources the servers depend on: the open-file limit (raised at start) and memory
//! handed back to the system after bursts.

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
