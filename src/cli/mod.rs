//! The command line: one binary, one subcommand per job.

pub mod client;
mod enqueue;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Settings;

#[derive(Debug, Parser)]
#[command(
    name = "convstore",
    version,
    about = "Stores chat conversations, with embeddings, in PostgreSQL/pgvector"
)]
pub struct Cli {
    /// Configuration file (TOML). Every key can also be set as CONVSTORE_SECTION__KEY.
    #[arg(long, short, global = true, env = "CONVSTORE_CONFIG")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Serve,
    /// Apply database migrations and prepare the vector index, then exit.
    Migrate,
    /// Print the effective configuration, or say which key is wrong (exit 2).
    CheckConfig,
    /// Send conversations (JSON object, array or JSONL; `-` for stdin) to a running daemon.
    Enqueue(enqueue::EnqueueArgs),
    /// Run an Ollama stand-in (deterministic vectors, injectable latency and failures) for tests and benchmarks.
    Standin(crate::standin::cli::StandinArgs),
}

/// Parses arguments and runs the chosen command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::CheckConfig = cli.command {
        return check_config(cli.config.as_deref());
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("convstore: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    match result {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("convstore: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve => {
            let settings = load(cli.config.as_deref())?;
            crate::telemetry::logging::init(&settings.log);
            tracing::info!(version = env!("CARGO_PKG_VERSION"), state_dir = %settings.state_dir.display(), "Starting convstore");
            let status = crate::server::run(settings, crate::server::shutdown_signal()).await?;
            Ok(match status {
                crate::server::ExitStatus::Clean => ExitCode::SUCCESS,
                crate::server::ExitStatus::DrainIncomplete => ExitCode::FAILURE,
            })
        }
        Command::Migrate => {
            let settings = load(cli.config.as_deref())?;
            crate::telemetry::logging::init(&settings.log);
            crate::server::migrate_only(&settings).await?;
            println!("migrations applied");
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig => Ok(check_config(cli.config.as_deref())),
        Command::Enqueue(args) => {
            let settings = load(cli.config.as_deref())?;
            enqueue::run(args, &settings).await
        }
        Command::Standin(args) => {
            crate::telemetry::logging::init(&crate::config::LogSettings::default());
            crate::standin::cli::run(args).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn load(path: Option<&std::path::Path>) -> anyhow::Result<Settings> {
    Settings::load(path).map_err(|e| anyhow::anyhow!("{e}"))
}

fn check_config(path: Option<&std::path::Path>) -> ExitCode {
    match Settings::load(path) {
        Ok(settings) => {
            print!("{}", settings.to_toml());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("convstore: {e}");
            ExitCode::from(2)
        }
    }
}
