//! One glibc malloc arena for `convstore serve` (docs/PERFORMANCE.md "One
//! malloc arena").
//!
//! The daemon allocates a conversation on an ingress thread and frees it on
//! a pipeline thread once stored. glibc gives each thread that contends for
//! a lock an arena of its own (up to 8 per core), and an arena other than
//! the first grows its heap by the page it needs at that moment, each time
//! with an `mprotect(2)`. A burst of conversations arriving faster than they
//! are stored therefore cost the acknowledging threads about one
//! `mprotect` every two requests (measured), while the pipeline's frees went
//! back to heaps those threads no longer allocated from. With one arena the
//! heap grows by `brk(2)` in 128 KiB steps and what the pipeline frees is
//! what the next request reuses: at 16 connections while storing, 35–45 %
//! more requests a second and a p99 2–4× lower (A/B, 3 rounds).
//!
//! Only glibc has arenas (other C libraries and other allocators are left
//! alone), and an operator's own choice wins: `MALLOC_ARENA_MAX` or
//! `glibc.malloc.arena_max` in `GLIBC_TUNABLES` in the environment.

/// What [`limit`] did, for the start-up log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arenas {
    /// The arena count was set to this.
    Limited(u32),
    /// The environment sets the arena count; it was left as set.
    SetByEnvironment,
    /// Not glibc, or glibc refused the setting.
    Unchanged,
}

/// How many arenas `convstore serve` uses.
pub const ARENAS: u32 = 1;

/// Limits glibc malloc to [`ARENAS`] arena(s) unless the environment says
/// otherwise. Call before the runtimes start threads: a thread that already
/// has an arena keeps it.
pub fn limit() -> Arenas {
    let tunables = std::env::var_os("GLIBC_TUNABLES");
    let arena_max_env = std::env::var_os("MALLOC_ARENA_MAX");
    if set_by_environment(
        tunables.as_deref().and_then(|v| v.to_str()),
        arena_max_env.is_some(),
    ) {
        return Arenas::SetByEnvironment;
    }
    set_arena_max(ARENAS)
}

/// Whether the environment already chooses the arena count.
fn set_by_environment(glibc_tunables: Option<&str>, malloc_arena_max: bool) -> bool {
    malloc_arena_max
        || glibc_tunables.is_some_and(|t| {
            // `name=value` pairs separated by colons.
            t.split(':')
                .any(|pair| pair.split('=').next() == Some("glibc.malloc.arena_max"))
        })
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_arena_max(arenas: u32) -> Arenas {
    let Ok(value) = libc::c_int::try_from(arenas) else {
        return Arenas::Unchanged;
    };
    // SAFETY: mallopt(3) with a valid parameter and value changes the
    // allocator's settings under its own lock; it touches no memory of ours.
    let ok = unsafe { libc::mallopt(libc::M_ARENA_MAX, value) };
    if ok == 1 {
        Arenas::Limited(arenas)
    } else {
        Arenas::Unchanged
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_arena_max(_arenas: u32) -> Arenas {
    Arenas::Unchanged
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_wins_when_it_names_the_arena_count() {
        assert!(set_by_environment(None, true));
        assert!(set_by_environment(Some("glibc.malloc.arena_max=4"), false));
        assert!(set_by_environment(
            Some("glibc.malloc.tcache_count=0:glibc.malloc.arena_max=2"),
            false
        ));
    }

    #[test]
    fn other_tunables_leave_the_arena_count_to_convstore() {
        assert!(!set_by_environment(None, false));
        assert!(!set_by_environment(Some(""), false));
        assert!(!set_by_environment(
            Some("glibc.malloc.trim_threshold=1000:glibc.malloc.arena_test=2"),
            false
        ));
        // A prefix of the name is another tunable.
        assert!(!set_by_environment(
            Some("glibc.malloc.arena_max_x=1"),
            false
        ));
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn glibc_accepts_the_setting() {
        // Harmless in the test process: only threads that have no arena yet
        // are affected.
        assert_eq!(set_arena_max(ARENAS), Arenas::Limited(ARENAS));
    }
}
