//! The acknowledgement clock: every change a client makes is stamped when
//! it is accepted, and a delete or erasure is stamped the same way, so
//! "acknowledged before the delete" is a comparison of two numbers
//! (`convstore_core::lifecycle`).
//!
//! Microseconds since the Unix epoch, made strictly increasing in this
//! process (a hybrid logical clock: the wall clock, or one more than the
//! last stamp when the wall clock has not moved on or went back). Across
//! instances on one database the stamps compare as well as the machines'
//! clocks agree: docs/LIFECYCLE.md says what that means for erasure.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use convstore_core::lifecycle::Stamp;

static LAST: AtomicI64 = AtomicI64::new(0);

fn wall_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// A stamp later than every stamp this process handed out or saw.
pub fn next() -> Stamp {
    let wall = wall_micros();
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let stamp = wall.max(last.saturating_add(1));
        match LAST.compare_exchange_weak(last, stamp, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => return stamp,
            Err(now) => last = now,
        }
    }
}

/// Makes every later stamp greater than `stamp` (one read back from the
/// journal: a clock that went back across a restart must not stamp new
/// changes before replayed ones).
pub fn observe(stamp: Stamp) {
    LAST.fetch_max(stamp, Ordering::AcqRel);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_strictly_increase_and_pass_what_was_observed() {
        let a = next();
        let b = next();
        assert!(b > a);
        observe(b + 10_000_000_000);
        assert!(next() > b + 10_000_000_000);
    }
}
