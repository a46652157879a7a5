//! Non-zero defaults for settings, checked when they are compiled: used as
//! `const { nz_u64(5_000) }`, a zero fails the build instead of being
//! replaced at run time by some other value.

use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};

pub const fn nz_usize(n: usize) -> NonZeroUsize {
    match NonZeroUsize::new(n) {
        Some(n) => n,
        None => panic!("a non-zero setting has a zero default"),
    }
}

pub const fn nz_u64(n: u64) -> NonZeroU64 {
    match NonZeroU64::new(n) {
        Some(n) => n,
        None => panic!("a non-zero setting has a zero default"),
    }
}

pub const fn nz_u32(n: u32) -> NonZeroU32 {
    match NonZeroU32::new(n) {
        Some(n) => n,
        None => panic!("a non-zero setting has a zero default"),
    }
}
