//! `convstore bench` options, and the checked plan they describe.
//!
//! Options are checked once, here, so the load engines never meet a zero
//! rate or an empty duration.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};

/// Which of the configuration's listeners to load when neither `--url` nor
/// `--socket` is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportChoice {
    /// `server.http_addr`.
    Http,
    /// `server.unix_socket`.
    Unix,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Unix socket of the daemon (default: server.unix_socket from the config).
    #[arg(long, conflicts_with = "url")]
    pub socket: Option<PathBuf>,
    /// HTTP base URL instead of the socket, e.g. http://127.0.0.1:7070.
    #[arg(long)]
    pub url: Option<String>,
    /// With neither --url nor --socket: which listener of the config to load.
    #[arg(long, value_enum, conflicts_with_all = ["url", "socket"])]
    pub transport: Option<TransportChoice>,
    /// Where to read the daemon's /metrics (default: the loaded endpoint),
    /// e.g. http://127.0.0.1:9100.
    #[arg(long)]
    pub metrics_url: Option<String>,

    /// Open loop: requests per second on a fixed schedule, whatever the
    /// answers do. Latency counts from each request's scheduled send time,
    /// so a stall shows up in full (no coordinated omission). Without it the
    /// loop is closed: each connection sends its next request when the
    /// last one is answered.
    #[arg(long, value_name = "PER_SECOND")]
    pub rate: Option<f64>,
    /// Connections. Closed loop: each sends back to back (default 16). Open
    /// loop: the most requests in flight at once (default 64); a request
    /// that finds every connection busy waits, and the wait counts.
    #[arg(long, value_name = "N")]
    pub concurrency: Option<usize>,
    /// Length of the measured run in seconds (with --ramp: of each step).
    #[arg(long, short = 'd', default_value_t = 10.0, value_name = "SECS")]
    pub duration: f64,
    /// Stop after this many requests, even if --duration has not passed.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Seconds of load before measuring starts (sent and stored, not timed).
    #[arg(long, default_value_t = 0.0, value_name = "SECS")]
    pub warmup: f64,
    /// A request not answered within this many milliseconds counts as an error.
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    pub timeout_ms: u64,

    /// Step the open-loop rate up from --rate until p99 or the share of 429s
    /// passes its limit; reports the highest rate that held.
    #[arg(long, requires = "rate")]
    pub ramp: bool,
    /// Rate added at each ramp step (default: the starting --rate).
    #[arg(long, value_name = "PER_SECOND", requires = "ramp")]
    pub ramp_step: Option<f64>,
    /// Highest rate the ramp tries.
    #[arg(long, default_value_t = 1_000_000.0, value_name = "PER_SECOND")]
    pub ramp_max: f64,
    /// Ramp limit: a step whose p99 latency passes this breaks.
    #[arg(long, default_value_t = 10.0, value_name = "MS")]
    pub p99_limit_ms: f64,
    /// Ramp limit: a step where more than this share of requests got 429 breaks.
    #[arg(long, default_value_t = 0.01, value_name = "SHARE")]
    pub reject_limit: f64,

    /// Conversations to send, JSONL (or a JSON array); requests cycle
    /// through them. Default: the shared sample, else generated ones.
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// --data is in the shared sample's format (conversation_id, source, messages).
    #[arg(long, requires = "data")]
    pub sample_format: bool,
    /// Send each conversation's own id (or none) instead of a fresh
    /// `bench-<run>-<n>`: repeats are then idempotent no-ops for the daemon.
    #[arg(long)]
    pub reuse_ids: bool,
    /// End each request's last message (or transcript) with ` [bench
    /// <run>-<n>]`, so every request brings new chunks: new cache entries,
    /// new vectors, new index elements, as fresh traffic would. Without it a
    /// run longer than the data re-sends texts the daemon has seen.
    #[arg(long, conflicts_with = "reuse_ids")]
    pub unique_text: bool,
    /// The `<run>` part of generated ids (default: derived from the clock).
    #[arg(long, value_name = "ID")]
    pub run_id: Option<String>,

    /// Do not wait for the accepted conversations to be committed.
    #[arg(long)]
    pub no_wait: bool,
    /// While waiting for commits, give up after this many seconds without progress.
    #[arg(long, default_value_t = 60.0, value_name = "SECS")]
    pub settle_timeout: f64,

    /// Also write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Also write the report as a Markdown table to this file.
    #[arg(long, value_name = "FILE")]
    pub markdown: Option<PathBuf>,
    /// No progress bar (it is hidden anyway when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
}

/// How requests are paced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// `connections` loops, each sending when its last answer arrived.
    Closed { connections: usize },
    /// `rate` requests per second on a schedule, over up to `connections`.
    Open { rate: f64, connections: usize },
}

impl Mode {
    pub fn connections(self) -> usize {
        match self {
            Self::Closed { connections } | Self::Open { connections, .. } => connections,
        }
    }

    /// The same mode at another rate (ramp steps); closed loops are unchanged.
    pub fn with_rate(self, rate: f64) -> Self {
        match self {
            Self::Open { connections, .. } => Self::Open { rate, connections },
            closed => closed,
        }
    }
}

/// The ramp: rates `start, start + step, …` up to `max`, each for the run's
/// duration, until a step breaks a limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ramp {
    pub start: f64,
    pub step: f64,
    pub max: f64,
    pub p99_limit: Duration,
    pub reject_limit: f64,
}

impl Ramp {
    pub fn rates(&self) -> impl Iterator<Item = f64> + '_ {
        (0u32..)
            .map(|i| self.start + self.step * f64::from(i))
            .take_while(|r| *r <= self.max * (1.0 + 1e-9))
    }
}

/// The checked options.
#[derive(Debug, Clone)]
pub struct Plan {
    pub mode: Mode,
    pub duration: Duration,
    pub count: Option<u64>,
    pub warmup: Duration,
    pub timeout: Duration,
    pub ramp: Option<Ramp>,
    pub settle_timeout: Duration,
}

const MAX_CONNECTIONS: usize = 10_000;

impl BenchArgs {
    pub fn plan(&self) -> anyhow::Result<Plan> {
        let duration = seconds("--duration", self.duration)?;
        if duration.is_zero() {
            bail!("--duration must be more than 0 seconds");
        }
        let warmup = seconds("--warmup", self.warmup)?;
        let settle_timeout = seconds("--settle-timeout", self.settle_timeout)?;
        if self.timeout_ms == 0 {
            bail!("--timeout-ms must be at least 1");
        }
        if self.count == Some(0) {
            bail!("--count must be at least 1");
        }
        let mode = match self.rate {
            Some(rate) => {
                check_rate("--rate", rate)?;
                Mode::Open {
                    rate,
                    connections: connections(self.concurrency, 64)?,
                }
            }
            None => Mode::Closed {
                connections: connections(self.concurrency, 16)?,
            },
        };
        let ramp = match (self.ramp, self.rate) {
            (true, Some(start)) => {
                let step = self.ramp_step.unwrap_or(start);
                check_rate("--ramp-step", step)?;
                check_rate("--ramp-max", self.ramp_max)?;
                if self.ramp_max < start {
                    bail!(
                        "--ramp-max ({}) is below the starting --rate ({start})",
                        self.ramp_max
                    );
                }
                if !(self.p99_limit_ms.is_finite() && self.p99_limit_ms > 0.0) {
                    bail!(
                        "--p99-limit-ms must be a positive number of milliseconds (got {})",
                        self.p99_limit_ms
                    );
                }
                if !(0.0..=1.0).contains(&self.reject_limit) {
                    bail!(
                        "--reject-limit is a share between 0 and 1 (got {})",
                        self.reject_limit
                    );
                }
                Some(Ramp {
                    start,
                    step,
                    max: self.ramp_max,
                    p99_limit: Duration::from_secs_f64(self.p99_limit_ms / 1000.0),
                    reject_limit: self.reject_limit,
                })
            }
            (true, None) => bail!("--ramp needs a starting --rate"),
            (false, _) => None,
        };
        if let Some(id) = &self.run_id
            && (id.is_empty() || id.len() > 64 || id.contains(char::is_whitespace))
        {
            bail!("--run-id must be 1 to 64 characters without spaces (got {id:?})");
        }
        Ok(Plan {
            mode,
            duration,
            count: self.count,
            warmup,
            timeout: Duration::from_millis(self.timeout_ms),
            ramp,
            settle_timeout,
        })
    }
}

fn seconds(flag: &str, value: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| *d <= Duration::from_secs(7 * 24 * 3600))
        .with_context(|| {
            format!("{flag} must be a number of seconds from 0 to a week (got {value})")
        })
}

fn check_rate(flag: &str, rate: f64) -> anyhow::Result<()> {
    if rate.is_finite() && rate > 0.0 && rate <= 10_000_000.0 {
        Ok(())
    } else {
        bail!("{flag} must be more than 0 and at most 10000000 requests per second (got {rate})")
    }
}

fn connections(given: Option<usize>, default: usize) -> anyhow::Result<usize> {
    match given {
        None => Ok(default),
        Some(n) if (1..=MAX_CONNECTIONS).contains(&n) => Ok(n),
        Some(n) => bail!("--concurrency must be 1 to {MAX_CONNECTIONS} (got {n})"),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: BenchArgs,
    }

    fn plan(argv: &[&str]) -> Result<Plan, String> {
        Cli::try_parse_from(std::iter::once("bench").chain(argv.iter().copied()))
            .map_err(|e| e.to_string())
            .and_then(|c| c.args.plan().map_err(|e| e.to_string()))
    }

    #[test]
    fn the_subcommand_fits_the_whole_command_line() {
        use clap::CommandFactory;
        // Catches clashes with global options (e.g. a short flag).
        crate::cli::Cli::command().debug_assert();
    }

    #[test]
    fn defaults_are_a_closed_loop_of_16_for_10_seconds() {
        let p = plan(&[]).unwrap();
        assert_eq!(p.mode, Mode::Closed { connections: 16 });
        assert_eq!(p.duration, Duration::from_secs(10));
        assert!(p.ramp.is_none());
    }

    #[test]
    fn rate_makes_an_open_loop() {
        let p = plan(&["--rate", "2500", "--concurrency", "8"]).unwrap();
        assert_eq!(
            p.mode,
            Mode::Open {
                rate: 2500.0,
                connections: 8
            }
        );
    }

    #[test]
    fn ramp_steps_by_the_start_rate_up_to_the_max() {
        let p = plan(&["--rate", "100", "--ramp", "--ramp-max", "350"]).unwrap();
        let rates: Vec<f64> = p.ramp.unwrap().rates().collect();
        assert_eq!(rates, vec![100.0, 200.0, 300.0]);
        let p = plan(&[
            "--rate",
            "0.1",
            "--ramp",
            "--ramp-step",
            "0.1",
            "--ramp-max",
            "0.3",
        ])
        .unwrap();
        assert_eq!(
            p.ramp.unwrap().rates().count(),
            3,
            "float steps reach the max"
        );
    }

    #[test]
    fn bad_values_name_the_flag() {
        for (argv, flag) in [
            (&["--duration", "0"][..], "--duration"),
            (&["--duration=-1"][..], "--duration"),
            (&["--rate", "0"][..], "--rate"),
            (&["--rate", "NaN"][..], "--rate"),
            (&["--concurrency", "0"][..], "--concurrency"),
            (&["--count", "0"][..], "--count"),
            (
                &["--rate", "10", "--ramp", "--ramp-max", "5"][..],
                "--ramp-max",
            ),
            (
                &["--rate", "10", "--ramp", "--reject-limit", "2"][..],
                "--reject-limit",
            ),
            (&["--run-id", "a b"][..], "--run-id"),
        ] {
            let err = plan(argv).expect_err(&format!("{argv:?} should be refused"));
            assert!(err.contains(flag), "{argv:?}: {err}");
        }
        assert!(plan(&["--ramp"]).is_err(), "--ramp needs --rate");
        assert!(
            plan(&["--url", "http://x", "--socket", "/s"]).is_err(),
            "one endpoint"
        );
    }
}
