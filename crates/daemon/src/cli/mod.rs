//! The command line: one binary, one subcommand per job.

pub mod bench;
pub mod client;
mod enqueue;
mod forget;
mod reload;
mod search;
pub mod status;

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
    CheckConfig(CheckConfigArgs),
    /// Validate the configuration, then ask a running daemon to reload it (SIGHUP); systemd's ExecReload.
    Reload(reload::ReloadArgs),
    /// Send conversations (JSON object, array or JSONL; `-` for stdin) to a running daemon.
    Enqueue(enqueue::EnqueueArgs),
    /// Live view of a running daemon's /v1/stats: queue, rates, latencies, bottleneck, health (--watch to refresh, --json for scripts).
    Status(status::StatusArgs),
    /// Find stored conversations by meaning (POST /v1/search): scores and snippets, or --json.
    Search(search::SearchArgs),
    /// Load a running daemon (HTTP or Unix socket): latency percentiles, throughput, stored rate.
    Bench(bench::BenchArgs),
    /// Delete one conversation with its chunks, vectors and queued changes (DELETE /v1/conversations/{id}).
    Delete(forget::DeleteArgs),
    /// Erase everything of one user: conversations, chunks, vectors, cached vectors, queued changes (DELETE /v1/users/{user_id}).
    EraseUser(forget::EraseUserArgs),
    /// Put every chunk marked failed back to pending, for the backfill to embed again (POST /v1/admin/redrive).
    Redrive(forget::RedriveArgs),
}

#[derive(Debug, clap::Args)]
pub struct CheckConfigArgs {
    /// Print the commented example configuration (every key with its
    /// default; /etc/convstore/convstore.toml in the package) and exit.
    #[arg(long)]
    pub print_default: bool,
    /// Print nothing when the configuration is valid (systemd's
    /// ExecStartPre/ExecReload); errors still go to stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

/// The example configuration shipped as /etc/convstore/convstore.toml.
pub const EXAMPLE_CONFIG: &str = include_str!("../../../../packaging/convstore.toml");

/// Parses arguments and runs the chosen command. The daemon builds its own
/// runtimes (`serve_main`); the commands that only read the configuration
/// need none; the clients run on one built for them.
pub fn main() -> ExitCode {
    let Cli { config, command } = Cli::parse();
    let config_path = config.as_deref();
    match command {
        Command::Serve => serve_main(config),
        Command::CheckConfig(args) => check_config(config_path, &args),
        Command::Reload(args) => reload::run(config_path, &args),
        Command::Migrate => on_a_runtime(async {
            let settings = load(config_path)?;
            convstore_telemetry::logging::init(&settings.log);
            crate::app::migrate_only(&settings).await?;
            println!("migrations applied");
            Ok(ExitCode::SUCCESS)
        }),
        Command::Enqueue(args) => {
            on_a_runtime(async { enqueue::run(args, &load(config_path)?).await })
        }
        Command::Status(args) => {
            on_a_runtime(async { status::run(args, &load(config_path)?).await })
        }
        Command::Search(args) => {
            on_a_runtime(async { search::run(args, &load(config_path)?).await })
        }
        Command::Delete(args) => {
            on_a_runtime(async { forget::delete(args, &load(config_path)?).await })
        }
        Command::EraseUser(args) => {
            on_a_runtime(async { forget::erase_user(args, &load(config_path)?).await })
        }
        Command::Redrive(args) => {
            on_a_runtime(async { forget::redrive(args, &load(config_path)?).await })
        }
        Command::Bench(args) => on_a_runtime(async { bench::run(args, &load(config_path)?).await }),
    }
}

/// Runs a client command to completion on a runtime of its own; its error,
/// if any, is the exit's.
fn on_a_runtime(command: impl Future<Output = anyhow::Result<ExitCode>>) -> ExitCode {
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
    match runtime.block_on(command) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("convstore: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `convstore serve`: the settings first, for the runtimes they ask for
/// (`crate::runtimes`: the acknowledgement path apart from the lowered
/// pipeline), then the daemon on them.
fn serve_main(config: Option<std::path::PathBuf>) -> ExitCode {
    let settings = match load(config.as_deref()) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("convstore: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let runtimes = match crate::runtimes::build(&settings) {
        Ok(runtimes) => runtimes,
        Err(e) => {
            eprintln!("convstore: cannot start the async runtimes: {e}");
            return ExitCode::FAILURE;
        }
    };
    let pipeline = runtimes.pipeline.as_ref().map(|r| r.handle().clone());
    let result = runtimes.ingress.block_on(serve(settings, config, pipeline));
    // After a clean stop nothing is left on the pipeline runtime; whatever
    // is (a task that ignored its cancellation) must not hold the exit.
    if let Some(pipeline) = runtimes.pipeline {
        pipeline.shutdown_timeout(std::time::Duration::from_secs(5));
    }
    match result {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("convstore: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the daemon until SIGTERM or SIGINT; everything behind the queue on
/// `pipeline` when given.
async fn serve(
    settings: Settings,
    config: Option<std::path::PathBuf>,
    pipeline: Option<tokio::runtime::Handle>,
) -> anyhow::Result<ExitCode> {
    convstore_telemetry::logging::init_with_traces(&settings.log, &settings.telemetry)
        .map_err(|e| anyhow::anyhow!("telemetry.otlp_endpoint: {e}"))?;
    tracing::info!(version = env!("CARGO_PKG_VERSION"), state_dir = %settings.state_dir.display(), traces = convstore_telemetry::traces::enabled(), pipeline_nice = settings.pipeline.nice, "Starting convstore");
    let status = crate::app::serve(settings, config, crate::app::shutdown_signal(), pipeline).await;
    // The last spans go out before the process does (a blocking
    // flush, bounded by the exporter's timeout).
    tokio::task::spawn_blocking(convstore_telemetry::traces::shutdown)
        .await
        .ok();
    let status = status?;
    Ok(match status {
        crate::app::ExitStatus::Clean => ExitCode::SUCCESS,
        crate::app::ExitStatus::DrainIncomplete => ExitCode::FAILURE,
    })
}

fn load(path: Option<&std::path::Path>) -> anyhow::Result<Settings> {
    Settings::load(path).map_err(|e| anyhow::anyhow!("{e}"))
}

fn check_config(path: Option<&std::path::Path>, args: &CheckConfigArgs) -> ExitCode {
    if args.print_default {
        print!("{EXAMPLE_CONFIG}");
        return ExitCode::SUCCESS;
    }
    match Settings::load(path) {
        Ok(settings) => {
            if !args.quiet {
                print!("{}", settings.to_toml());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("convstore: {e}");
            ExitCode::from(2)
        }
    }
}
