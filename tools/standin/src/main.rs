//! `convstore-standin`: the embedding-server stand-in as a process, for
//! tests that run the daemon and its backends as real processes, and for
//! benchmarks (scripts/bench.sh). Test tooling: not in the .deb.

use clap::Parser as _;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = convstore_standin::cli::StandinArgs::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match convstore_standin::cli::run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("convstore-standin: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
