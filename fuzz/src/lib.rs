//! The fuzz target's library side: convstore-core's parsing and
//! validation, the same code the daemon runs, re-exported where the target
//! finds it. convstore-core has no database driver, async runtime or model,
//! so building it with coverage instrumentation stays quick.

pub use convstore_core::fuzzing;
