//! `convstore bench`: a load generator for a running daemon, over HTTP or
//! the Unix socket.
//!
//! A run: read the data ([`data`]), scrape `/metrics` ([`scrape`]), open
//! the connections ([`transport`]), an optional warm-up, then the measured
//! load ([`load`]: closed loop, open loop, or an open-loop [`ramp`]); then
//! wait until the daemon has committed everything it accepted and read the
//! stored rate from its own counters; print and write the [`report`].

pub mod args;
pub mod data;
pub mod histogram;
pub mod load;
pub mod progress;
pub mod ramp;
pub mod report;
pub mod scrape;
pub mod transport;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

pub use args::BenchArgs;
use args::{Mode, Plan};
use data::Payloads;
use load::{Live, PhaseResult, Shared, Slots};
use progress::Progress;
use report::{
    EmbeddingWork, PhaseReport, RampOutcome, Report, ServerLatency, StoredReport, Totals,
};
use scrape::Snapshot;
use transport::{Conn, Target};

use crate::cli::client::Client;
use crate::config::Settings;
use convstore_telemetry::metrics as m;

pub async fn run(args: BenchArgs, settings: &Settings) -> anyhow::Result<ExitCode> {
    let plan = args.plan()?;
    let run_id = args.run_id.clone().unwrap_or_else(data::default_run_id);
    let payloads = Arc::new(Payloads::load(
        args.data.as_deref(),
        args.sample_format,
        data::BodyOptions {
            run_id: &run_id,
            reuse_ids: args.reuse_ids,
            unique_text: args.unique_text,
        },
    )?);
    let target = Target::resolve(&args, settings)?;
    let show_progress = !args.no_progress;

    let mut metrics = Client::new(target.metrics.clone());
    let before = if args.no_wait {
        None
    } else {
        let snapshot = scrape::fetch(&mut metrics).await.with_context(|| {
            format!(
                "cannot read the daemon's /metrics at {} (pass --metrics-url, or --no-wait to skip the stored rate)",
                transport::describe(&target.metrics)
            )
        })?;
        let backlog = snapshot.sum(m::QUEUE_DEPTH);
        if backlog > 0.0 {
            eprintln!(
                "convstore bench: warning: {backlog} conversations already queued; the stored rate counts them too"
            );
        }
        Some(snapshot)
    };

    let conns = transport::open_all(&target.endpoint, plan.mode.connections(), plan.timeout)
        .await
        .with_context(|| format!("cannot reach {}", transport::describe(&target.endpoint)))?;

    let shared = Shared {
        payloads: payloads.clone(),
        slots: Arc::new(Slots::default()),
        live: Arc::new(Live::default()),
        stop: tokio_util::sync::CancellationToken::new(),
    };
    // Ctrl-C while loading stops the load (the report covers what ran);
    // Ctrl-C while waiting for commits stops the wait.
    let abandon_wait = tokio_util::sync::CancellationToken::new();
    let ctrl_c = tokio::spawn(interrupts(shared.stop.clone(), abandon_wait.clone()));

    let started_at = chrono::Utc::now().to_rfc3339();
    let first_send = Instant::now();
    let outcome = drive(conns, &shared, &plan, show_progress).await;
    // The load is over: from here on Ctrl-C means "stop waiting".
    shared.stop.cancel();
    let Driven {
        measured,
        steps,
        totals,
        last_answer,
    } = outcome?;

    let (stored, server, embedding) = match &before {
        Some(before) => {
            let waiting = Progress::waiting(show_progress);
            let accepted = totals.accepted;
            let settled = scrape::wait_for_commit(
                &mut metrics,
                before,
                accepted,
                plan.settle_timeout,
                &abandon_wait,
                |s| {
                    waiting.message(format!(
                        "waiting for commits: {} of {accepted} settled (Ctrl-C to stop waiting)",
                        s.settled()
                    ))
                },
            )
            .await?;
            waiting.finish();
            let seconds = settled
                .last_change
                .saturating_duration_since(first_send)
                .as_secs_f64();
            let drain = settled
                .last_change
                .saturating_duration_since(last_answer.unwrap_or(first_send));
            let stored = StoredReport {
                counts: settled.stored,
                complete: settled.complete,
                seconds,
                drain_s: drain.as_secs_f64(),
                conversations_per_s: report::ratio(settled.stored.conversations as f64, seconds),
                chunks_per_s: report::ratio(settled.stored.chunks as f64, seconds),
            };
            let server = server_latency(before, &settled.after, seconds);
            let embedding = embedding_work(before, &settled.after);
            (Some(stored), Some(server), Some(embedding))
        }
        None => (None, None, None),
    };

    let ramp = plan.ramp.map(|r| RampOutcome {
        sustained_rate: steps
            .iter()
            .rev()
            .find(|s| s.broke.is_none())
            .map(|s| s.rate),
        breaking_rate: steps.iter().find(|s| s.broke.is_some()).map(|s| s.rate),
        p99_limit_ms: r.p99_limit.as_secs_f64() * 1000.0,
        reject_limit: r.reject_limit,
    });
    let report = Report {
        schema: report::SCHEMA,
        run_id,
        started_at,
        target: target.info(),
        mode: plan.mode.into(),
        data: payloads.info().clone(),
        warmup_s: plan.warmup.as_secs_f64(),
        measured,
        steps,
        ramp,
        totals,
        stored,
        server,
        embedding,
    };
    ctrl_c.abort();
    print!("{}", report.to_text());
    if let Some(path) = &args.json {
        report.write_json(path)?;
    }
    if let Some(path) = &args.markdown {
        report.write_markdown(path)?;
    }
    if let Some(s) = &report.stored
        && !s.complete
    {
        let why = if abandon_wait.is_cancelled() {
            "when the wait was interrupted".to_string()
        } else {
            format!(
                "after {:.0} s without progress",
                plan.settle_timeout.as_secs_f64()
            )
        };
        eprintln!(
            "convstore bench: only {} of {} accepted conversations were settled (stored, duplicate or failed) {why}",
            s.counts.settled(),
            report.totals.accepted,
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Turns Ctrl-C into cancellations: the first stops the load, any later
/// one (or one after the load ended) stops the wait for commits. Once
/// tokio handles SIGINT the default action (exit) no longer applies, so
/// every phase must listen.
async fn interrupts(
    stop_load: tokio_util::sync::CancellationToken,
    abandon_wait: tokio_util::sync::CancellationToken,
) {
    while tokio::signal::ctrl_c().await.is_ok() {
        if stop_load.is_cancelled() {
            eprintln!("convstore bench: not waiting for commits (Ctrl-C)");
            abandon_wait.cancel();
        } else {
            eprintln!("convstore bench: stopping the load (Ctrl-C); reporting what was measured");
            stop_load.cancel();
        }
    }
}

/// What the load phases produced.
struct Driven {
    measured: Option<PhaseReport>,
    steps: Vec<report::StepReport>,
    totals: Totals,
    last_answer: Option<Instant>,
}

/// Warm-up, then the measured phase or the ramp.
async fn drive(
    conns: Vec<Conn>,
    shared: &Shared,
    plan: &Plan,
    show_progress: bool,
) -> anyhow::Result<Driven> {
    let mut totals = Totals::default();
    let mut last_answer: Option<Instant> = None;
    let mut account = |phase: &PhaseResult| {
        totals.sent += phase.record.completed();
        totals.accepted += phase.record.accepted();
        last_answer = match (last_answer, phase.record.last_completion) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    };
    let mut conns = conns;
    if !plan.warmup.is_zero() {
        let (back, warm) = phase(
            conns,
            shared,
            plan,
            plan.warmup,
            None,
            "warm-up",
            show_progress,
        )
        .await?;
        conns = back;
        account(&warm);
    }
    let (measured, steps) = match plan.ramp {
        None => {
            let (_, result) = phase(
                conns,
                shared,
                plan,
                plan.duration,
                plan.count,
                "load",
                show_progress,
            )
            .await?;
            account(&result);
            let rate = match plan.mode {
                Mode::Open { rate, .. } => Some(rate),
                Mode::Closed { .. } => None,
            };
            (Some(PhaseReport::new(&result, rate)), Vec::new())
        }
        Some(r) => {
            let (_, steps) =
                ramp::run(conns, shared, r, plan.duration, plan.timeout, show_progress).await?;
            for step in &steps {
                account(&step.result);
            }
            let measured = steps
                .iter()
                .rev()
                .find(|s| s.report.broke.is_none())
                .map(|s| s.report.phase.clone());
            (measured, steps.into_iter().map(|s| s.report).collect())
        }
    };
    Ok(Driven {
        measured,
        steps,
        totals,
        last_answer,
    })
}

async fn phase(
    conns: Vec<Conn>,
    shared: &Shared,
    plan: &Plan,
    duration: Duration,
    count: Option<u64>,
    label: &str,
    show_progress: bool,
) -> anyhow::Result<(Vec<Conn>, PhaseResult)> {
    let progress = Progress::phase(
        show_progress,
        label.to_string(),
        duration,
        shared.live.clone(),
    );
    let result = match plan.mode {
        Mode::Closed { .. } => load::closed::run(conns, shared, duration, count).await,
        Mode::Open { rate, .. } => {
            load::open::run(conns, shared, rate, duration, count, plan.timeout).await
        }
    };
    progress.finish();
    result
}

/// The daemon's cache and backend counters over the run.
fn embedding_work(before: &Snapshot, after: &Snapshot) -> EmbeddingWork {
    let delta = |name: &str, tier: Option<&str>| {
        let value = |s: &Snapshot| match tier {
            Some(tier) => s.sum_where(name, "tier", tier),
            None => s.sum(name),
        };
        (value(after) - value(before)).max(0.0).round() as u64
    };
    let l1_hits = delta(m::CACHE_HITS, Some("l1"));
    let l1_misses = delta(m::CACHE_MISSES, Some("l1"));
    let l2_hits = delta(m::CACHE_HITS, Some("l2"));
    EmbeddingWork {
        l1_hits,
        l1_misses,
        l2_hits,
        l2_misses: delta(m::CACHE_MISSES, Some("l2")),
        hit_ratio: report::ratio((l1_hits + l2_hits) as f64, (l1_hits + l1_misses) as f64),
        backend_requests: delta(m::EMBED_REQUESTS, None),
        backend_inputs: delta(m::EMBED_INPUTS, None),
    }
}

/// The daemon's latency histograms over the run. End-to-end quantiles are
/// interpolated with `window_s` (first request to last commit) as a
/// ceiling: no conversation of the run took longer, and the top buckets
/// are wide (10 s, 30 s, 60 s).
fn server_latency(before: &Snapshot, after: &Snapshot, window_s: f64) -> ServerLatency {
    let enqueue_us = |q: f64| {
        scrape::delta_quantile(before, after, m::ENQUEUE_SECONDS, q, None).map(|v| v * 1e6)
    };
    let e2e_ms = |q: f64| {
        scrape::delta_quantile(before, after, m::END_TO_END_SECONDS, q, Some(window_s))
            .map(|v| v * 1e3)
    };
    let stage_p95_ms = |histogram: &str| {
        scrape::delta_quantile(before, after, histogram, 0.95, Some(window_s)).map(|v| v * 1e3)
    };
    ServerLatency {
        queue_wait_p95_ms: stage_p95_ms(m::QUEUE_WAIT_SECONDS),
        embed_p95_ms: stage_p95_ms(m::EMBED_SECONDS),
        store_p95_ms: stage_p95_ms(m::STORE_SECONDS),
        enqueue_mean_us: scrape::delta_mean(before, after, m::ENQUEUE_SECONDS).map(|v| v * 1e6),
        enqueue_p50_us: enqueue_us(0.50),
        enqueue_p99_us: enqueue_us(0.99),
        end_to_end_mean_ms: scrape::delta_mean(before, after, m::END_TO_END_SECONDS)
            .map(|v| v * 1e3),
        end_to_end_p50_ms: e2e_ms(0.50),
        end_to_end_p95_ms: e2e_ms(0.95),
        end_to_end_p99_ms: e2e_ms(0.99),
    }
}
