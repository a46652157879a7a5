//! Giving freed glibc heap back to the system.
//!
//! The daemon's own allocations go to jemalloc (the binary's global
//! allocator), whose background thread returns pages left free for 10 s.
//! What C libraries allocate (the OpenVINO runtime of the builtin model)
//! still goes to glibc's malloc, which keeps memory freed inside its arenas
//! for reuse and returns only what sits at the top of the main heap: before
//! jemalloc, RSS stayed at its peak after a flood of connections or bodies
//! ended (59 → 376 MB after four rounds of idle connections, issue 15).
//! `malloc_trim(0)` releases the free pages of every glibc arena
//! (`madvise(MADV_DONTNEED)`) while keeping the memory in use where it is.
//! It walks the free lists, so it runs on a timer, not after every free:
//! once per [`TRIM_INTERVAL`], on a blocking thread so it never delays a
//! request. Test binaries that link the library keep glibc as their
//! allocator, and this trims theirs.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub const TRIM_INTERVAL: Duration = Duration::from_secs(10);

/// Trims every [`TRIM_INTERVAL`] until `stop`.
pub async fn return_freed_memory(stop: CancellationToken) {
    let mut tick = tokio::time::interval(TRIM_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate: nothing to trim yet
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {
                let _ = tokio::task::spawn_blocking(trim).await;
            }
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only releases free pages; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other C allocators (musl's) return memory themselves.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
