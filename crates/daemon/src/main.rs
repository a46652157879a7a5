//! Thin: parse arguments and hand over to the library's CLI.

fn main() -> std::process::ExitCode {
    convstore::cli::main()
}
