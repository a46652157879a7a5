//! Precise waiting for the open loop's schedule.
//!
//! Tokio's timer has millisecond granularity: a request due at t+0.3 ms
//! would leave at t+1 ms, and since latency counts from the scheduled time,
//! the generator's own lateness would be charged to the daemon. A plain
//! thread sleeping with `nanosleep` wakes within microseconds once its
//! timer slack is lowered, so the schedule is kept by such a thread.

use std::time::{Duration, Instant};

/// Longest single sleep, so a stop request is noticed within this time.
const MAX_SLEEP: Duration = Duration::from_millis(50);

/// Lowers this thread's timer slack from Linux's default 50 µs to 1 µs.
pub fn tighten_timer_slack() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl(PR_SET_TIMERSLACK, n) only sets a per-thread scalar; it
    // reads no memory of ours and cannot affect memory safety.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
}

/// Sleeps until `deadline`; returns early (false) when `stopped()` says so.
pub fn sleep_until(deadline: Instant, stopped: impl Fn() -> bool) -> bool {
    loop {
        if stopped() {
            return false;
        }
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        std::thread::sleep((deadline - now).min(MAX_SLEEP));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_until_the_deadline_or_the_stop() {
        tighten_timer_slack();
        let deadline = Instant::now() + Duration::from_millis(5);
        assert!(sleep_until(deadline, || false));
        assert!(Instant::now() >= deadline);
        let far = Instant::now() + Duration::from_secs(3600);
        assert!(!sleep_until(far, || true));
    }
}
