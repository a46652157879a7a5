//! The judgements in `/v1/stats`: the bottleneck stage and the health
//! verdict.
//!
//! The thresholds are the ones of `monitoring/prometheus/alerts.yml`, so
//! `convstore status` and the pager agree; the alerts add a `for:` duration
//! and a 5-minute rate, `/v1/stats` looks at the last minute.

use super::window::Summary;
use convstore_api::stats::{
    BackendView, Bottleneck, Health, Latencies, PendingView, QueueView, Reason, StageShare,
    Verdict, ms,
};

/// Queue fuller than this (by count or bytes): warning / critical.
pub const QUEUE_WARNING: f64 = 0.5;
pub const QUEUE_CRITICAL: f64 = 0.9;
/// p95 of enqueue above this (seconds): warning.
pub const ENQUEUE_P95_WARNING: f64 = 0.010;
/// p95 of one embedding request: warning / critical.
pub const EMBED_P95_WARNING: f64 = 0.200;
pub const EMBED_P95_CRITICAL: f64 = 0.500;
/// p95 of one batch transaction: warning / critical.
pub const STORE_P95_WARNING: f64 = 0.050;
pub const STORE_P95_CRITICAL: f64 = 0.100;
/// Stored ÷ (stored + failed) below this: warning / critical.
pub const SUCCESS_WARNING: f64 = 0.95;
pub const SUCCESS_CRITICAL: f64 = 0.90;
/// Workers busier than this: the queue wait is their doing.
pub const SATURATED: f64 = 0.8;

/// The window's distributions the bottleneck is computed from.
pub struct StageTimes<'a> {
    pub end_to_end: &'a Summary,
    pub queue_wait: &'a Summary,
    /// Per embedding request.
    pub embed: &'a Summary,
    /// Per batch: its whole embedding stage.
    pub embed_batch: &'a Summary,
    /// Per batch transaction.
    pub store: &'a Summary,
    /// Workers' busy share, when known.
    pub utilization: Option<f64>,
    /// Each ingest backend's time spent answering calls in the window
    /// (seconds): who does the embedding when it is the bottleneck.
    pub backend_busy: &'a [(String, f64)],
}

/// Which stage holds conversations longest, and its share of the time.
///
/// Per conversation, on average over the window:
/// - `queue_wait`: accepted → its batch taken off the queue (measured);
/// - `embed`: its batch's embedding stage (cache tiers, backend calls,
///   retries), measured per batch; without that measurement, the window's
///   backend-call time divided by the batches stored;
/// - `store`: its batch's transaction (measured per batch);
/// - `other`: the rest of end-to-end: chunking, waiting for a free worker,
///   and database retries.
///
/// The bottleneck is the work stage (embed, store, other) with the largest
/// time. Queue wait is a symptom, not a cause: when the workers are
/// saturated it is charged to that work stage; when they are not and it
/// still dominates, the bottleneck is `queue_wait` itself (batching waits
/// `batch.max_wait_ms`, or arrivals are too sparse to fill batches).
pub fn bottleneck(t: &StageTimes<'_>) -> Option<Bottleneck> {
    let e2e = t.end_to_end.mean()?;
    let queue = t.queue_wait.mean().unwrap_or(0.0);
    let batches = t.store.count;
    let store = t.store.mean().unwrap_or(0.0);
    let embed = match t.embed_batch.mean() {
        Some(mean) => mean,
        None if batches > 0 => t.embed.sum() / batches as f64,
        None => 0.0,
    };
    let other = (e2e - queue - embed - store).max(0.0);
    let stages = [
        ("queue_wait", queue),
        ("embed", embed),
        ("store", store),
        ("other", other),
    ];
    let sum: f64 = stages.iter().map(|(_, v)| v).sum();
    if sum <= 0.0 {
        return None;
    }
    let share = |v: f64| v / sum;
    let (work, work_time) =
        stages[1..].iter().copied().fold(
            ("embed", f64::MIN),
            |best, s| if s.1 > best.1 { s } else { best },
        );
    let saturated = t.utilization.is_some_and(|u| u >= SATURATED);
    let (stage, charged) = if saturated {
        (work, work_time + queue)
    } else if queue > work_time {
        ("queue_wait", queue)
    } else {
        (work, work_time)
    };
    // Embedding is the bottleneck: say at which backend the time goes
    // (with one builtin backend, the in-process model on these cores).
    let backend = (stage == "embed")
        .then(|| {
            t.backend_busy
                .iter()
                .filter(|(_, busy)| *busy > 0.0)
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(name, _)| name.clone())
        })
        .flatten();
    let embedding = match &backend {
        Some(name) => format!("embedding (mostly at backend `{name}`)"),
        None => describe("embed").to_string(),
    };
    let describe = |s: &str| {
        if s == "embed" {
            embedding.clone()
        } else {
            describe(s).to_string()
        }
    };
    let summary = match (stage, saturated) {
        ("queue_wait", _) => format!(
            "conversations wait longest in the queue ({:.0} ms of {:.0} ms); workers are not saturated, so batching (batch.max_wait_ms) or sparse arrivals set the pace",
            ms(queue),
            ms(e2e)
        ),
        (s, true) => format!(
            "{} takes {:.0} ms per batch and keeps the workers busy, so conversations also wait {:.0} ms in the queue: {:.0} % of end-to-end time",
            describe(s),
            ms(work_time),
            ms(queue),
            share(charged) * 100.0
        ),
        (s, false) => format!(
            "{} takes {:.0} ms per batch, {:.0} % of end-to-end time",
            describe(s),
            ms(work_time),
            share(charged) * 100.0
        ),
    };
    Some(Bottleneck {
        stage: stage.to_string(),
        backend,
        share: share(charged).min(1.0),
        utilization: t.utilization,
        saturated,
        summary,
        stages: stages
            .iter()
            .map(|&(stage, v)| StageShare {
                stage: stage.to_string(),
                mean_ms: ms(v),
                share: share(v),
            })
            .collect(),
    })
}

fn describe(stage: &str) -> &'static str {
    match stage {
        "embed" => "embedding",
        "store" => "storing (the database transaction)",
        "queue_wait" => "waiting in the queue",
        _ => "chunking, waiting for a free worker and database retries",
    }
}

/// Counts in the window the verdict needs.
#[derive(Debug, Clone, Copy, Default)]
pub struct WindowCounts {
    pub stored: u64,
    pub failed: u64,
    pub queue_full: u64,
}

pub struct Inputs<'a> {
    pub queue: &'a QueueView,
    /// `None` without a journal; `false` while it cannot write.
    pub journal_writable: Option<bool>,
    pub latency: &'a Latencies,
    pub backends: &'a [BackendView],
    pub pending: Option<&'a PendingView>,
    pub counts: WindowCounts,
}

/// `healthy`, `warning` or `critical`, with every reason that fired.
pub fn judge(i: &Inputs<'_>) -> Health {
    let mut reasons = Vec::new();
    let mut fire = |severity: Verdict, code: &str, message: String| {
        reasons.push(Reason {
            severity,
            code: code.to_string(),
            message,
        })
    };

    let q = i.queue;
    let by_bytes = if q.max_bytes > 0 {
        q.bytes as f64 / q.max_bytes as f64
    } else {
        0.0
    };
    let fill = q.utilization.unwrap_or(0.0).max(by_bytes);
    if fill >= QUEUE_CRITICAL {
        fire(
            Verdict::Critical,
            "queue_nearly_full",
            format!(
                "queue {:.0} % full ({} of {} conversations, {} of {} bytes)",
                fill * 100.0,
                q.depth,
                q.capacity,
                q.bytes,
                q.max_bytes
            ),
        );
    } else if fill >= QUEUE_WARNING {
        fire(
            Verdict::Warning,
            "queue_half_full",
            format!(
                "queue {:.0} % full ({} of {} conversations)",
                fill * 100.0,
                q.depth,
                q.capacity
            ),
        );
    }
    if i.counts.queue_full > 0 {
        fire(
            Verdict::Warning,
            "queue_full_rejections",
            format!(
                "{} conversations refused with 429 (queue full) in the last minute",
                i.counts.queue_full
            ),
        );
    }
    if i.journal_writable == Some(false) {
        fire(
            Verdict::Critical,
            "journal_unwritable",
            "the journal cannot write (disk full, or a failed fsync): conversations are refused with 503; /readyz says why".into(),
        );
    }
    if !q.accepting {
        fire(
            Verdict::Warning,
            "shutting_down",
            "shutting down: new conversations are refused while the queue drains".into(),
        );
    }

    let mut latency = |name: &str, code: &str, p95: Option<f64>, warn: f64, crit: Option<f64>| {
        let Some(p95) = p95 else { return };
        let p95 = p95 / 1000.0;
        if let Some(crit) = crit.filter(|c| p95 > *c) {
            fire(
                Verdict::Critical,
                code,
                format!(
                    "{name} p95 {:.1} ms is above {:.0} ms",
                    p95 * 1000.0,
                    crit * 1000.0
                ),
            );
        } else if p95 > warn {
            fire(
                Verdict::Warning,
                code,
                format!(
                    "{name} p95 {:.1} ms is above {:.0} ms",
                    p95 * 1000.0,
                    warn * 1000.0
                ),
            );
        }
    };
    latency(
        "enqueue",
        "enqueue_slow",
        i.latency.enqueue.p95_ms,
        ENQUEUE_P95_WARNING,
        None,
    );
    latency(
        "embedding",
        "embed_slow",
        i.latency.embed.p95_ms,
        EMBED_P95_WARNING,
        Some(EMBED_P95_CRITICAL),
    );
    latency(
        "store",
        "store_slow",
        i.latency.store.p95_ms,
        STORE_P95_WARNING,
        Some(STORE_P95_CRITICAL),
    );

    let finished = i.counts.stored + i.counts.failed;
    if finished > 0 {
        let success = i.counts.stored as f64 / finished as f64;
        let message = || {
            format!(
                "success rate {:.1} %: {} of {} conversations were not stored",
                success * 100.0,
                i.counts.failed,
                finished
            )
        };
        if success < SUCCESS_CRITICAL {
            fire(Verdict::Critical, "success_rate_low", message());
        } else if success < SUCCESS_WARNING {
            fire(Verdict::Warning, "success_rate_low", message());
        }
    }

    let known: Vec<&BackendView> = i.backends.iter().filter(|b| b.up.is_some()).collect();
    let down: Vec<&str> = known
        .iter()
        .filter(|b| b.up == Some(false))
        .map(|b| b.name.as_str())
        .collect();
    if !known.is_empty() && down.len() == known.len() {
        fire(
            Verdict::Critical,
            "all_backends_down",
            format!(
                "no embedding backend is up ({}): conversations are stored without vectors",
                down.join(", ")
            ),
        );
    } else if !down.is_empty() {
        fire(
            Verdict::Warning,
            "backend_down",
            format!("embedding backend down: {}", down.join(", ")),
        );
    }

    if let Some(p) = i.pending.filter(|p| p.growing && p.conversations > 0) {
        fire(
            Verdict::Warning,
            "pending_growing",
            format!(
                "{} conversations ({} chunks) wait for an embedding, and the number grows",
                p.conversations, p.chunks
            ),
        );
    }

    reasons.sort_by_key(|r| std::cmp::Reverse(r.severity));
    let status = reasons.first().map_or(Verdict::Healthy, |r| r.severity);
    Health { status, reasons }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::StageLatency;
    use crate::window::WindowHistogram;

    fn summary(values: &[f64]) -> Summary {
        let h = WindowHistogram::seconds();
        for &v in values {
            h.record(0, v);
        }
        h.summary(&[0])
    }

    fn lat(p95_ms: Option<f64>) -> StageLatency {
        StageLatency {
            count: p95_ms.map_or(0, |_| 10),
            mean_ms: p95_ms,
            p50_ms: p95_ms,
            p95_ms,
            p99_ms: p95_ms,
            max_ms: p95_ms,
        }
    }

    fn latencies(enqueue: f64, embed: f64, store: f64) -> Latencies {
        Latencies {
            enqueue: lat(Some(enqueue)),
            queue_wait: lat(None),
            embed: lat(Some(embed)),
            store: lat(Some(store)),
            end_to_end: lat(None),
        }
    }

    fn queue(depth: u64) -> QueueView {
        QueueView {
            depth,
            capacity: 100,
            admission_limit: None,
            utilization: Some(depth as f64 / 100.0),
            bytes: 0,
            max_bytes: 1000,
            in_flight: None,
            workers: None,
            accepting: true,
            oldest_age_seconds: None,
            backlog_seconds: None,
        }
    }

    fn backend(name: &str, up: bool) -> BackendView {
        BackendView {
            name: name.into(),
            up: Some(up),
            requests_per_second: 0.0,
            error_ratio: None,
            p50_ms: None,
            p95_ms: None,
            requests: 0,
            errors: 0,
            gauges: Default::default(),
            engine: None,
        }
    }

    #[test]
    fn slow_embedding_is_the_bottleneck() {
        // 10 batches: 300 ms of embedding and 10 ms of storing each, 20 ms
        // in the queue, 335 ms end to end.
        let e2e = summary(&[0.335; 50]);
        let queue = summary(&[0.020; 50]);
        // Requests alone would say 3 × 50 ms per batch; the batch stage
        // (with the cache lookups) is what counts.
        let embed = summary(&[0.050; 30]);
        let embed_batch = summary(&[0.300; 10]);
        let store = summary(&[0.010; 10]);
        let b = bottleneck(&StageTimes {
            end_to_end: &e2e,
            queue_wait: &queue,
            embed: &embed,
            embed_batch: &embed_batch,
            store: &store,
            utilization: Some(0.3),
            backend_busy: &[("ollama".into(), 0.5), ("builtin".into(), 1.5)],
        })
        .unwrap();
        assert_eq!(b.stage, "embed");
        assert!(b.share > 0.85 && b.share < 0.95, "{b:?}");
        assert!(!b.saturated);
        assert_eq!(b.backend.as_deref(), Some("builtin"));
        assert!(b.summary.contains("backend `builtin`"), "{}", b.summary);
    }

    #[test]
    fn saturated_workers_charge_the_queue_to_the_slow_stage() {
        let e2e = summary(&[3.0; 50]);
        let queue = summary(&[2.6; 50]);
        let embed = summary(&[0.001; 10]);
        let store = summary(&[0.35; 10]);
        let times = StageTimes {
            end_to_end: &e2e,
            queue_wait: &queue,
            embed: &embed,
            embed_batch: &summary(&[]),
            store: &store,
            utilization: Some(0.97),
            backend_busy: &[("builtin".into(), 0.01)],
        };
        let b = bottleneck(&times).unwrap();
        assert_eq!(b.stage, "store");
        assert!(b.saturated && b.share > 0.95, "{b:?}");
        assert_eq!(b.backend, None, "a backend is named only for embedding");
        // The same times with idle workers: the queue wait is batching.
        let idle = bottleneck(&StageTimes {
            utilization: Some(0.1),
            ..times
        })
        .unwrap();
        assert_eq!(idle.stage, "queue_wait");
    }

    #[test]
    fn nothing_stored_means_no_bottleneck() {
        let empty = summary(&[]);
        assert!(
            bottleneck(&StageTimes {
                end_to_end: &empty,
                queue_wait: &empty,
                embed: &empty,
                embed_batch: &empty,
                store: &empty,
                utilization: None,
                backend_busy: &[],
            })
            .is_none()
        );
    }

    #[test]
    fn verdicts_follow_the_alert_thresholds() {
        let healthy = judge(&Inputs {
            queue: &queue(10),
            journal_writable: None,
            latency: &latencies(0.05, 50.0, 10.0),
            backends: &[backend("a", true)],
            pending: None,
            counts: WindowCounts {
                stored: 100,
                ..Default::default()
            },
        });
        assert_eq!(healthy.status, Verdict::Healthy, "{healthy:?}");
        assert!(healthy.reasons.is_empty());

        let warning = judge(&Inputs {
            queue: &queue(60),
            journal_writable: None,
            latency: &latencies(12.0, 300.0, 60.0),
            backends: &[backend("a", true), backend("b", false)],
            pending: None,
            counts: WindowCounts {
                // 93 %: under the 95 % warning line, over the 90 % critical one.
                stored: 93,
                failed: 7,
                queue_full: 0,
            },
        });
        assert_eq!(warning.status, Verdict::Warning);
        let codes: Vec<&str> = warning.reasons.iter().map(|r| r.code.as_str()).collect();
        for code in [
            "queue_half_full",
            "enqueue_slow",
            "embed_slow",
            "store_slow",
            "success_rate_low",
            "backend_down",
        ] {
            assert!(codes.contains(&code), "{code} missing from {codes:?}");
        }

        let critical = judge(&Inputs {
            queue: &queue(95),
            journal_writable: None,
            latency: &latencies(0.05, 600.0, 150.0),
            backends: &[backend("a", false)],
            pending: Some(&PendingView {
                conversations: 5,
                chunks: 7,
                age_seconds: 1.0,
                growing: true,
                oldest_age_seconds: Some(30.0),
                coverage: Some(0.9),
                failed_chunks: Some(0),
            }),
            counts: WindowCounts {
                stored: 80,
                failed: 20,
                queue_full: 3,
            },
        });
        assert_eq!(critical.status, Verdict::Critical);
        assert_eq!(critical.reasons[0].severity, Verdict::Critical);
        let crit: Vec<&str> = critical
            .reasons
            .iter()
            .filter(|r| r.severity == Verdict::Critical)
            .map(|r| r.code.as_str())
            .collect();
        for code in [
            "queue_nearly_full",
            "embed_slow",
            "store_slow",
            "success_rate_low",
            "all_backends_down",
        ] {
            assert!(crit.contains(&code), "{code} missing from {crit:?}");
        }
        assert!(critical.reasons.iter().any(|r| r.code == "pending_growing"));
    }

    #[test]
    fn a_journal_that_cannot_write_is_critical() {
        let judge_with = |journal_writable| {
            judge(&Inputs {
                queue: &queue(10),
                journal_writable,
                latency: &latencies(0.05, 50.0, 10.0),
                backends: &[backend("a", true)],
                pending: None,
                counts: WindowCounts::default(),
            })
        };
        for healthy in [None, Some(true)] {
            assert_eq!(judge_with(healthy).status, Verdict::Healthy);
        }
        let h = judge_with(Some(false));
        assert_eq!(h.status, Verdict::Critical, "{h:?}");
        assert_eq!(h.reasons[0].code, "journal_unwritable");
    }
}
