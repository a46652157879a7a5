//! `convstore-standin`: the stand-in as its own process, for tests that run
//! the daemon and its backends as real processes, and for benchmarks.
//!
//! It prints one line, `listening on ADDR`, on stdout once the socket is
//! bound (so `--listen 127.0.0.1:0` works: read the port from that line),
//! and stops on SIGTERM or Ctrl-C after finishing the requests in flight.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;

use super::{Standin, StandinConfig, faults::millis};

/// Options of `convstore-standin`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "convstore-standin",
    version,
    about = "An Ollama / OpenAI-compatible embedding server stand-in (deterministic vectors, injectable latency and failures) for convstore's tests and benchmarks. Not shipped."
)]
pub struct StandinArgs {
    /// Address to listen on; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:11434")]
    pub listen: SocketAddr,
    /// The one model served (matched case-insensitively; no tag = `:latest`).
    #[arg(long, default_value = "nomic-embed-text")]
    pub model: String,
    /// Length of every vector.
    #[arg(long, default_value_t = 768)]
    pub dimensions: usize,
    /// Serve another model too, with vectors of DIMS dimensions (as an
    /// Ollama that has pulled several); repeat for more.
    #[arg(long = "also-serve", value_name = "NAME=DIMS", value_parser = parse_model)]
    pub also_serve: Vec<(String, usize)>,
    /// The model's context in tokens (an input may use all but one).
    #[arg(long, default_value_t = 2048)]
    pub context_length: usize,
    /// Architecture reported by /api/show (prefix of the model_info keys).
    #[arg(long, default_value = "nomic-bert")]
    pub architecture: String,
    /// Capability reported by /api/show; repeat for several. Default
    /// `embedding`; `--capability completion` imitates a chat model.
    #[arg(long = "capability", value_name = "NAME")]
    pub capabilities: Vec<String>,
    /// Leave `capabilities` out of /api/show (Ollama before 0.9).
    #[arg(long, conflicts_with = "capabilities")]
    pub no_capabilities: bool,
    /// Compute time per embedding request, in milliseconds (fractions allowed).
    #[arg(long, default_value_t = 0.0, value_name = "MS")]
    pub latency_ms: f64,
    /// Extra compute time per input text, in milliseconds (fractions allowed).
    #[arg(long, default_value_t = 0.0, value_name = "MS")]
    pub per_input_ms: f64,
    /// Every Nth embedding call fails (0 = never).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub failure_every: u64,
    /// Share of embedding calls that fail, 0 to 1 (seeded with --seed).
    #[arg(long, default_value_t = 0.0, value_name = "RATE")]
    pub failure_rate: f64,
    /// HTTP status of injected failures.
    #[arg(long, default_value_t = 503, value_name = "STATUS")]
    pub failure_status: u16,
    /// `Retry-After` seconds sent with injected failures and while down.
    #[arg(long, value_name = "SECS")]
    pub retry_after_secs: Option<u64>,
    /// Start "down": every route but /_standin/ answers 503.
    #[arg(long)]
    pub down: bool,
    /// A request with an input containing this substring fails with 400;
    /// repeat for several.
    #[arg(long = "poison", value_name = "SUBSTRING")]
    pub poison: Vec<String>,
    /// Seed of the --failure-rate stream.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Count tokens with this tokenizer.json (a real WordPiece/BPE
    /// tokenizer) instead of the stand-in's rule.
    #[arg(long, value_name = "PATH")]
    pub tokenizer: Option<std::path::PathBuf>,
}

impl StandinArgs {
    /// The configuration these options describe, checked.
    pub fn config(&self) -> anyhow::Result<StandinConfig> {
        let ms = |flag: &str, value: f64| -> anyhow::Result<Duration> {
            millis(flag, value).map_err(anyhow::Error::msg)
        };
        let capabilities = if self.no_capabilities {
            None
        } else if self.capabilities.is_empty() {
            Some(vec!["embedding".to_string()])
        } else {
            Some(self.capabilities.clone())
        };
        let config = StandinConfig {
            model: self.model.clone(),
            architecture: self.architecture.clone(),
            dimensions: self.dimensions,
            other_models: self.also_serve.clone(),
            context_length: self.context_length,
            capabilities,
            latency_per_request: ms("--latency-ms", self.latency_ms)?,
            latency_per_input: ms("--per-input-ms", self.per_input_ms)?,
            failure_every: self.failure_every,
            failure_rate: self.failure_rate,
            failure_status: self.failure_status,
            retry_after_secs: self.retry_after_secs,
            down: self.down,
            poison: self.poison.clone(),
            seed: self.seed,
            tokenizer: self.tokenizer.clone(),
        };
        config.validate().map_err(anyhow::Error::msg)?;
        Ok(config)
    }
}

/// `NAME=DIMS` of `--also-serve`.
fn parse_model(value: &str) -> Result<(String, usize), String> {
    let (name, dims) = value
        .rsplit_once('=')
        .ok_or_else(|| format!("`{value}`: write NAME=DIMS, e.g. all-minilm=384"))?;
    let dims: usize = dims
        .parse()
        .map_err(|_| format!("`{value}`: DIMS must be a whole number"))?;
    if name.trim().is_empty() || dims == 0 {
        return Err(format!("`{value}`: a name and at least 1 dimension"));
    }
    Ok((name.to_string(), dims))
}

/// Runs the stand-in until SIGTERM or Ctrl-C.
pub async fn run(args: StandinArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    // The contract with tests: exactly this line, first, on stdout, only
    // once the socket accepts connections. println! flushes on newline.
    println!("listening on {addr}");
    tracing::info!(
        %addr,
        model = %config.model,
        dimensions = config.dimensions,
        context_length = config.context_length,
        "Ollama stand-in listening"
    );
    Standin::new(config).serve(listener, stop_signal()).await?;
    tracing::info!("Ollama stand-in stopped");
    Ok(())
}

/// Completes on SIGTERM or SIGINT. If a handler cannot be installed, that
/// signal keeps its default action (terminate), which is still a stop.
async fn stop_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => ctrl_c.await,
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await;
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: StandinArgs,
    }

    fn parse(argv: &[&str]) -> Result<StandinArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("standin").chain(argv.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn defaults_match_nomic_embed_text() {
        let config = parse(&[])
            .map_err(|e| e.to_string())
            .and_then(|a| a.config().map_err(|e| e.to_string()))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config, StandinConfig::default());
    }

    #[test]
    fn flags_map_to_config() {
        let args = parse(&[
            "--listen",
            "127.0.0.1:0",
            "--model",
            "all-minilm",
            "--dimensions",
            "384",
            "--context-length",
            "512",
            "--latency-ms",
            "15",
            "--per-input-ms",
            "0.5",
            "--failure-every",
            "2",
            "--failure-status",
            "500",
            "--retry-after-secs",
            "1",
            "--poison",
            "BAD",
            "--poison",
            "WORSE",
            "--capability",
            "completion",
            "--down",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let config = args.config().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.model, "all-minilm");
        assert_eq!(config.dimensions, 384);
        assert_eq!(config.context_length, 512);
        assert_eq!(config.latency_per_request, Duration::from_millis(15));
        assert_eq!(config.latency_per_input, Duration::from_micros(500));
        assert_eq!((config.failure_every, config.failure_status), (2, 500));
        assert_eq!(config.retry_after_secs, Some(1));
        assert_eq!(config.poison, ["BAD", "WORSE"]);
        assert_eq!(config.capabilities, Some(vec!["completion".to_string()]));
        assert!(config.down);
    }

    #[test]
    fn bad_values_are_refused() {
        for argv in [
            &["--dimensions", "0"][..],
            &["--latency-ms", "-1"],
            &["--failure-rate", "1.5"],
            &["--failure-status", "200"],
            &["--context-length", "1"],
        ] {
            let result = parse(argv)
                .map_err(|e| e.to_string())
                .and_then(|a| a.config().map_err(|e| e.to_string()));
            assert!(result.is_err(), "{argv:?}");
        }
    }
}
