//! Thin: parse arguments and hand over to the library's CLI.

/// mimalloc, not glibc's malloc. With glibc every Tokio worker thread has
/// its own arena, grown and trimmed back around each burst of requests: an
/// idle daemon paid `mprotect` calls and faults on fresh pages inside the
/// enqueue path of nearly every request (docs/PERFORMANCE.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    convstore::cli::main()
}
