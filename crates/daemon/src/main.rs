//! Thin: choose the allocator, parse arguments and hand over to the
//! library's CLI.

/// jemalloc, not glibc's malloc: while conversations arrive faster than
/// they are stored, the queue's memory grows, and glibc grows a thread's
/// arena a page at a time (an `mprotect` and a fault per page, about a
/// third of an acknowledging thread's CPU). With jemalloc the daemon
/// answered 30–55 % more requests at 16 connections while storing, with
/// less memory (docs/PERFORMANCE.md, "jemalloc"). Here, in the binary, so
/// the test binaries that count allocations keep their own allocator.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    convstore::cli::main()
}
