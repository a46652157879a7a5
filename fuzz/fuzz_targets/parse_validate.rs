//! Request parsing and validation: arbitrary bytes must never panic the
//! parser, and whatever is accepted must be storable
//! (`convstore_core::fuzzing::check` states the promises).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    convstore_fuzz::fuzzing::check(data);
});
