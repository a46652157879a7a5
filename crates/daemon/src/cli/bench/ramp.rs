//! `--ramp`: open-loop steps at rising rates until one breaks a limit, to
//! find the highest rate the daemon sustains (its "breaking point").
//!
//! A step breaks when its p99 latency passes `--p99-limit-ms`, when more
//! than `--reject-limit` of its requests got 429 (the queue filled: storage
//! is slower than intake), when as large a share failed otherwise, or when
//! the schedule could not be kept at all (requests left unsent).

use std::time::Duration;

use super::args::Ramp;
use super::load::{PhaseResult, Shared, open};
use super::progress::Progress;
use super::report::{PhaseReport, StepReport};
use super::transport::Conn;

/// One step's raw result beside its report.
pub struct Step {
    pub result: PhaseResult,
    pub report: StepReport,
}

/// Runs the steps; stops after the first that breaks (or on Ctrl-C).
pub async fn run(
    mut conns: Vec<Conn>,
    shared: &Shared,
    ramp: Ramp,
    step_duration: Duration,
    drain_limit: Duration,
    show_progress: bool,
) -> anyhow::Result<(Vec<Conn>, Vec<Step>)> {
    let mut steps = Vec::new();
    for rate in ramp.rates() {
        if shared.stop.is_cancelled() {
            break;
        }
        let progress = Progress::phase(
            show_progress,
            format!("{rate:.0}/s"),
            step_duration,
            shared.live.clone(),
        );
        let (back, result) =
            open::run(conns, shared, rate, step_duration, None, drain_limit).await?;
        progress.finish();
        conns = back;
        let phase = PhaseReport::new(&result, Some(rate));
        let broke = judge(&phase, &ramp);
        let stop = broke.is_some();
        steps.push(Step {
            result,
            report: StepReport { rate, phase, broke },
        });
        if stop {
            break;
        }
    }
    Ok((conns, steps))
}

/// Why a step broke the ramp's limits, or `None` if it held.
pub fn judge(step: &PhaseReport, ramp: &Ramp) -> Option<String> {
    let limit_us = ramp.p99_limit.as_secs_f64() * 1e6;
    if step.unsent > 0 {
        return Some(format!(
            "{} requests never sent: the schedule was not kept",
            step.unsent
        ));
    }
    if step.latency.p99_us > limit_us {
        return Some(format!(
            "p99 {:.2} ms > {:.2} ms",
            step.latency.p99_us / 1000.0,
            limit_us / 1000.0
        ));
    }
    if step.reject_share > ramp.reject_limit {
        return Some(format!(
            "429 share {:.2} % > {:.2} %",
            step.reject_share * 100.0,
            ramp.reject_limit * 100.0
        ));
    }
    let error_share = super::report::ratio(step.errors as f64, step.sent as f64);
    if error_share > ramp.reject_limit {
        return Some(format!(
            "error share {:.2} % > {:.2} %",
            error_share * 100.0,
            ramp.reject_limit * 100.0
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::cli::bench::histogram::LatencySummary;

    fn step(p99_us: f64, sent: u64, rejected: u64, errors: u64, unsent: u64) -> PhaseReport {
        PhaseReport {
            duration_s: 1.0,
            target_rate: Some(100.0),
            sent,
            unsent,
            by_status: BTreeMap::new(),
            accepted: sent - rejected - errors,
            rejected,
            errors,
            reject_share: rejected as f64 / sent as f64,
            throughput_rps: sent as f64,
            latency: LatencySummary {
                p99_us,
                ..LatencySummary::default()
            },
            service_time: None,
            failure_samples: Vec::new(),
        }
    }

    #[test]
    fn each_limit_breaks_a_step() {
        let ramp = Ramp {
            start: 100.0,
            step: 100.0,
            max: 1000.0,
            p99_limit: Duration::from_millis(10),
            reject_limit: 0.01,
        };
        assert_eq!(judge(&step(900.0, 100, 1, 0, 0), &ramp), None);
        assert!(
            judge(&step(10_001.0, 100, 0, 0, 0), &ramp)
                .unwrap()
                .contains("p99")
        );
        assert!(
            judge(&step(900.0, 100, 2, 0, 0), &ramp)
                .unwrap()
                .contains("429")
        );
        assert!(
            judge(&step(900.0, 100, 0, 2, 0), &ramp)
                .unwrap()
                .contains("error")
        );
        assert!(
            judge(&step(900.0, 100, 0, 0, 1), &ramp)
                .unwrap()
                .contains("never sent")
        );
    }
}
