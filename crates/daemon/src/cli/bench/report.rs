//! The run's report: one struct, printed as a table, written as JSON
//! (`--json`) and Markdown (`--markdown`).
//!
//! JSON invariants (tests rely on them): in every phase `sent` equals the
//! sum of `by_status` (where `timeout` and `failed` are keys beside the
//! HTTP statuses) and equals `accepted + rejected + errors`; latency
//! percentiles are ordered; `stored.conversations + stored.duplicates +
//! stored.failed == totals.accepted` when `stored.complete`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use super::args::Mode;
use super::data::DataInfo;
use super::histogram::LatencySummary;
use super::load::PhaseResult;
use super::scrape::Stored;
use super::transport::TargetInfo;

/// Version of the JSON layout; bumped when a field changes meaning.
pub const SCHEMA: u32 = 1;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: u32,
    pub run_id: String,
    pub started_at: String,
    pub target: TargetInfo,
    pub mode: ModeInfo,
    pub data: DataInfo,
    pub warmup_s: f64,
    /// The measured phase (without --ramp: the whole run after warm-up;
    /// with it: the last step that held, if any).
    pub measured: Option<PhaseReport>,
    /// Ramp steps in order; empty without --ramp.
    pub steps: Vec<StepReport>,
    pub ramp: Option<RampOutcome>,
    /// Every phase together, warm-up included: what the daemon was sent.
    pub totals: Totals,
    /// What the daemon committed (absent with --no-wait).
    pub stored: Option<StoredReport>,
    /// The daemon's own latency histograms over the run.
    pub server: Option<ServerLatency>,
    /// What embedding the run's chunks took: cache hits and backend calls.
    pub embedding: Option<EmbeddingWork>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModeInfo {
    /// `closed` or `open`.
    pub kind: &'static str,
    pub connections: usize,
    /// Requests per second (open loop; the starting rate with --ramp).
    pub rate: Option<f64>,
}

impl From<Mode> for ModeInfo {
    fn from(mode: Mode) -> Self {
        match mode {
            Mode::Closed { connections } => Self {
                kind: "closed",
                connections,
                rate: None,
            },
            Mode::Open { rate, connections } => Self {
                kind: "open",
                connections,
                rate: Some(rate),
            },
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    /// First (scheduled) send to last answer.
    pub duration_s: f64,
    /// The schedule's rate (open loop).
    pub target_rate: Option<f64>,
    /// Requests sent (every one was answered, timed out or failed).
    pub sent: u64,
    /// Scheduled but never sent: the run fell too far behind its schedule.
    pub unsent: u64,
    /// HTTP status (as a string) → count, plus `timeout` and `failed`.
    pub by_status: BTreeMap<String, u64>,
    /// 2xx answers.
    pub accepted: u64,
    /// 429 answers (queue full).
    pub rejected: u64,
    /// Everything else: other statuses, timeouts, connection failures.
    pub errors: u64,
    /// `rejected / sent`.
    pub reject_share: f64,
    /// Answers per second over `duration_s`.
    pub throughput_rps: f64,
    /// Open loop: from the scheduled send time; closed: from the send.
    pub latency: LatencySummary,
    /// From the actual send (open loop only; equals `latency` otherwise).
    pub service_time: Option<LatencySummary>,
    pub failure_samples: Vec<String>,
}

impl PhaseReport {
    pub fn new(phase: &PhaseResult, target_rate: Option<f64>) -> Self {
        let rec = &phase.record;
        let mut by_status: BTreeMap<String, u64> = rec
            .statuses
            .iter()
            .map(|(s, n)| (s.to_string(), *n))
            .collect();
        if rec.timeouts > 0 {
            by_status.insert("timeout".into(), rec.timeouts);
        }
        if rec.failures > 0 {
            by_status.insert("failed".into(), rec.failures);
        }
        let sent = rec.completed();
        let accepted = rec.accepted();
        let rejected = rec.statuses.get(&429).copied().unwrap_or(0);
        let seconds = phase.elapsed.as_secs_f64();
        Self {
            duration_s: seconds,
            target_rate,
            sent,
            unsent: rec.unsent,
            by_status,
            accepted,
            rejected,
            errors: sent - accepted - rejected,
            reject_share: ratio(rejected as f64, sent as f64),
            throughput_rps: ratio(sent as f64, seconds),
            latency: rec.latency.summary(),
            service_time: target_rate.map(|_| rec.service.summary()),
            failure_samples: rec.failure_samples.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub rate: f64,
    pub phase: PhaseReport,
    /// Why this step broke the ramp, if it did.
    pub broke: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RampOutcome {
    /// The highest rate whose step stayed within the limits.
    pub sustained_rate: Option<f64>,
    /// The first rate that broke a limit (none if the ramp reached its max).
    pub breaking_rate: Option<f64>,
    pub p99_limit_ms: f64,
    pub reject_limit: f64,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Totals {
    pub sent: u64,
    pub accepted: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StoredReport {
    #[serde(flatten)]
    pub counts: Stored,
    /// Every accepted conversation was stored, found a duplicate, or failed.
    pub complete: bool,
    /// From the first request to the last commit seen.
    pub seconds: f64,
    /// From the last answer to the last commit seen: the backlog's drain.
    pub drain_s: f64,
    pub conversations_per_s: f64,
    pub chunks_per_s: f64,
}

/// Quantiles are interpolated within the daemon's histogram buckets, so
/// they are only as fine as the buckets around them (end-to-end ones use
/// the run's stored window, which no conversation can exceed, as the top
/// bucket's bound); means come from `_sum / _count` and are exact.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServerLatency {
    /// `convstore_enqueue_duration_seconds`: body read → queued.
    pub enqueue_mean_us: Option<f64>,
    pub enqueue_p50_us: Option<f64>,
    pub enqueue_p99_us: Option<f64>,
    /// `convstore_end_to_end_seconds` (received → committed).
    pub end_to_end_mean_ms: Option<f64>,
    pub end_to_end_p50_ms: Option<f64>,
    pub end_to_end_p95_ms: Option<f64>,
    pub end_to_end_p99_ms: Option<f64>,
    /// The stages end to end is made of, at p95: waiting in the queue
    /// (`convstore_queue_wait_seconds`), one embedding call
    /// (`convstore_embed_duration_seconds`), one batch's transaction
    /// (`convstore_store_duration_seconds`).
    pub queue_wait_p95_ms: Option<f64>,
    pub embed_p95_ms: Option<f64>,
    pub store_p95_ms: Option<f64>,
}

/// The daemon's embedding counters over the run (first request to last
/// commit). Lookups count distinct texts per batch; a text the L1 missed is
/// looked up in the L2 (the `embedding_cache` table), and what both missed
/// goes to a backend.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EmbeddingWork {
    pub l1_hits: u64,
    pub l1_misses: u64,
    pub l2_hits: u64,
    pub l2_misses: u64,
    /// Of all lookups, the share found in either cache.
    pub hit_ratio: f64,
    /// Requests sent to embedding backends, whatever their outcome.
    pub backend_requests: u64,
    /// Texts in those requests.
    pub backend_inputs: u64,
}

pub fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

/// `85.1 µs`, `1.23 ms`, `2.50 s`.
pub fn fmt_us(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.1} µs")
    } else if us < 1_000_000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{:.2} s", us / 1_000_000.0)
    }
}

fn fmt_opt_us(us: Option<f64>) -> String {
    us.map_or_else(|| "–".into(), fmt_us)
}

fn statuses(p: &PhaseReport) -> String {
    p.by_status
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn percentiles(l: &LatencySummary) -> String {
    format!(
        "p50 {} · p90 {} · p95 {} · p99 {} · p99.9 {} · max {}",
        fmt_us(l.p50_us),
        fmt_us(l.p90_us),
        fmt_us(l.p95_us),
        fmt_us(l.p99_us),
        fmt_us(l.p999_us),
        fmt_us(l.max_us)
    )
}

impl Report {
    fn headline(&self) -> String {
        let mode = match self.mode.rate {
            Some(rate) if self.ramp.is_some() => format!(
                "open-loop ramp from {rate} req/s, {} connections",
                self.mode.connections
            ),
            Some(rate) => format!(
                "open loop at {rate} req/s, {} connections",
                self.mode.connections
            ),
            None => format!("closed loop, {} connections", self.mode.connections),
        };
        format!(
            "convstore bench {} · {mode} · {} {}",
            self.run_id, self.target.transport, self.target.address
        )
    }

    fn data_line(&self) -> String {
        format!(
            "{} ({} conversations, {} B mean{})",
            self.data.source,
            self.data.conversations,
            self.data.mean_body_bytes,
            match (self.data.reuse_ids, self.data.unique_text) {
                (true, _) => ", own ids reused",
                (false, true) => ", fresh ids and texts",
                (false, false) => ", fresh ids",
            }
        )
    }

    fn stored_line(&self) -> Option<String> {
        let s = self.stored.as_ref()?;
        Some(format!(
            "{} conversations, {} chunks in {:.2} s = {:.0} conversations/s, {:.0} chunks/s{}{}",
            s.counts.conversations,
            s.counts.chunks,
            s.seconds,
            s.conversations_per_s,
            s.chunks_per_s,
            if s.counts.duplicates + s.counts.failed > 0 {
                format!(
                    " ({} duplicates, {} failed)",
                    s.counts.duplicates, s.counts.failed
                )
            } else {
                String::new()
            },
            if s.complete {
                format!("; drained {:.2} s after the last answer", s.drain_s)
            } else {
                format!(
                    "; INCOMPLETE: {} of {} accepted settled",
                    s.counts.settled(),
                    self.totals.accepted
                )
            }
        ))
    }

    fn embedding_line(&self) -> Option<String> {
        let e = self.embedding.as_ref()?;
        Some(format!(
            "cache hits {:.1} % (L1 {} hit / {} missed, L2 {} / {}) · backend calls {} with {} texts (from /metrics)",
            e.hit_ratio * 100.0,
            e.l1_hits,
            e.l1_misses,
            e.l2_hits,
            e.l2_misses,
            e.backend_requests,
            e.backend_inputs
        ))
    }

    fn server_line(&self) -> Option<String> {
        let s = self.server.as_ref()?;
        let ms = |v: Option<f64>| v.map_or_else(|| "–".into(), |v| format!("{v:.1} ms"));
        Some(format!(
            "enqueue mean {} · p50 {} · p99 {} · received→committed mean {} · p50 {} · p95 {} · p99 {} · p95 of queue wait {}, embedding call {}, batch store {} (from /metrics)",
            fmt_opt_us(s.enqueue_mean_us),
            fmt_opt_us(s.enqueue_p50_us),
            fmt_opt_us(s.enqueue_p99_us),
            ms(s.end_to_end_mean_ms),
            ms(s.end_to_end_p50_ms),
            ms(s.end_to_end_p95_ms),
            ms(s.end_to_end_p99_ms),
            ms(s.queue_wait_p95_ms),
            ms(s.embed_p95_ms),
            ms(s.store_p95_ms)
        ))
    }

    /// The table printed on stdout.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{}", self.headline());
        let _ = writeln!(out, "data       {}", self.data_line());
        if !self.steps.is_empty() {
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "{:>10} {:>9} {:>9} {:>7} {:>7} {:>11} {:>11} {:>11}  result",
                "rate/s", "sent", "accepted", "429", "errors", "p50", "p99", "max"
            );
            for step in &self.steps {
                let p = &step.phase;
                let _ = writeln!(
                    out,
                    "{:>10.0} {:>9} {:>9} {:>7} {:>7} {:>11} {:>11} {:>11}  {}",
                    step.rate,
                    p.sent,
                    p.accepted,
                    p.rejected,
                    p.errors,
                    fmt_us(p.latency.p50_us),
                    fmt_us(p.latency.p99_us),
                    fmt_us(p.latency.max_us),
                    step.broke.as_deref().unwrap_or("held")
                );
            }
            if let Some(r) = &self.ramp {
                let _ = writeln!(
                    out,
                    "ramp       sustained {} · broke at {} (limits: p99 {} ms, 429 share {})",
                    r.sustained_rate
                        .map_or_else(|| "no step".into(), |r| format!("{r:.0} req/s")),
                    r.breaking_rate.map_or_else(
                        || "none (reached --ramp-max)".into(),
                        |r| format!("{r:.0} req/s")
                    ),
                    r.p99_limit_ms,
                    r.reject_limit
                );
            }
            let _ = writeln!(out);
        }
        if let Some(p) = &self.measured {
            let label = if self.ramp.is_some() {
                " (last step that held)"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "requests   {} in {:.2} s = {:.0} req/s{label} · {}",
                p.sent,
                p.duration_s,
                p.throughput_rps,
                statuses(p)
            );
            if p.unsent > 0 {
                let _ = writeln!(
                    out,
                    "           {} scheduled requests never sent: the rate was not sustained",
                    p.unsent
                );
            }
            let _ = writeln!(out, "latency    {}", percentiles(&p.latency));
            if let Some(service) = &p.service_time {
                let _ = writeln!(out, "service    {}", percentiles(service));
            }
            for m in &p.failure_samples {
                let _ = writeln!(out, "failure    {m}");
            }
        }
        if let Some(line) = self.stored_line() {
            let _ = writeln!(out, "stored     {line}");
        }
        if let Some(line) = self.server_line() {
            let _ = writeln!(out, "server     {line}");
        }
        if let Some(line) = self.embedding_line() {
            let _ = writeln!(out, "embedding  {line}");
        }
        out
    }

    /// The report as Markdown: a summary table, and the ramp's steps.
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "### {}\n", self.headline());
        let _ = writeln!(out, "| | |\n|---|---|");
        let _ = writeln!(out, "| data | {} |", self.data_line());
        let _ = writeln!(out, "| started | {} |", self.started_at);
        if let Some(p) = &self.measured {
            let _ = writeln!(
                out,
                "| requests | {} in {:.2} s = {:.0} req/s |",
                p.sent, p.duration_s, p.throughput_rps
            );
            let _ = writeln!(out, "| outcomes | {} |", statuses(p));
            if p.unsent > 0 {
                let _ = writeln!(out, "| never sent | {} |", p.unsent);
            }
            for (name, l) in [
                ("latency", Some(&p.latency)),
                ("service time", p.service_time.as_ref()),
            ] {
                let Some(l) = l else { continue };
                for (q, v) in [
                    ("p50", l.p50_us),
                    ("p90", l.p90_us),
                    ("p95", l.p95_us),
                    ("p99", l.p99_us),
                    ("p99.9", l.p999_us),
                    ("max", l.max_us),
                ] {
                    let _ = writeln!(out, "| {name} {q} | {} |", fmt_us(v));
                }
            }
        }
        if let Some(line) = self.stored_line() {
            let _ = writeln!(out, "| stored | {line} |");
        }
        if let Some(line) = self.server_line() {
            let _ = writeln!(out, "| server | {line} |");
        }
        if let Some(line) = self.embedding_line() {
            let _ = writeln!(out, "| embedding | {line} |");
        }
        if !self.steps.is_empty() {
            let _ = writeln!(
                out,
                "\n| rate/s | sent | accepted | 429 | errors | p50 | p99 | max | result |\n|---:|---:|---:|---:|---:|---:|---:|---:|---|"
            );
            for s in &self.steps {
                let p = &s.phase;
                let _ = writeln!(
                    out,
                    "| {:.0} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    s.rate,
                    p.sent,
                    p.accepted,
                    p.rejected,
                    p.errors,
                    fmt_us(p.latency.p50_us),
                    fmt_us(p.latency.p99_us),
                    fmt_us(p.latency.max_us),
                    s.broke.as_deref().unwrap_or("held")
                );
            }
        }
        out
    }

    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write the JSON report to {}", path.display()))
    }

    pub fn write_markdown(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, self.to_markdown())
            .with_context(|| format!("cannot write the Markdown report to {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::cli::bench::load::Recorder;

    #[test]
    fn phase_counts_add_up() {
        let mut record = Recorder::default();
        record.statuses.insert(202, 7);
        record.statuses.insert(429, 2);
        record.statuses.insert(400, 1);
        record.timeouts = 1;
        record.failures = 1;
        record.last_completion = Some(Instant::now());
        let phase = PhaseResult {
            record,
            elapsed: Duration::from_secs(2),
        };
        let p = PhaseReport::new(&phase, Some(10.0));
        assert_eq!(p.sent, 12);
        assert_eq!(p.by_status.values().sum::<u64>(), p.sent);
        assert_eq!((p.accepted, p.rejected, p.errors), (7, 2, 3));
        assert_eq!(p.throughput_rps, 6.0);
        assert!(p.service_time.is_some());
    }

    #[test]
    fn units_scale() {
        assert_eq!(fmt_us(85.14), "85.1 µs");
        assert_eq!(fmt_us(1234.0), "1.23 ms");
        assert_eq!(fmt_us(2_500_000.0), "2.50 s");
    }
}
