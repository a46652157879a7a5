//! Reading the daemon's own `/metrics`: how much it stored during a run,
//! and its server-side latency histograms.
//!
//! The stored rate is taken from the daemon, not inferred from the acks: an
//! ack means "queued", and the rate that matters for capacity is how fast
//! conversations reach PostgreSQL. Counters are compared before and after
//! the run, so a daemon that has been running for a while still works.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::cli::client::Client;
use convstore_telemetry::metrics as m;

/// One scrape of `/metrics` in the Prometheus text format.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    samples: Vec<Sample>,
}

#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

impl Snapshot {
    /// Parses the text format; lines it cannot read (comments, anything
    /// unexpected) are skipped rather than failing the run.
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(parse_line)
            .collect();
        Self { samples }
    }

    /// The sum of every series of `name` (all label sets).
    pub fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum()
    }

    /// The sum of the series of `name` whose `label` is `value`.
    pub fn sum_where(&self, name: &str, label: &str, value: &str) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name && s.labels.iter().any(|(k, v)| k == label && v == value))
            .map(|s| s.value)
            .sum()
    }

    /// Whether any series of `name` is present.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }

    /// A histogram's cumulative buckets `(le, count)`, summed over label
    /// sets, sorted by `le` (+Inf last).
    pub fn buckets(&self, histogram: &str) -> Vec<(f64, f64)> {
        let name = format!("{histogram}_bucket");
        let mut out: Vec<(f64, f64)> = Vec::new();
        for s in self.samples.iter().filter(|s| s.name == name) {
            let Some(le) = s
                .labels
                .iter()
                .find(|(k, _)| k == "le")
                .and_then(|(_, v)| parse_value(v))
            else {
                continue;
            };
            match out.iter_mut().find(|(b, _)| *b == le) {
                Some((_, count)) => *count += s.value,
                None => out.push((le, s.value)),
            }
        }
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        out
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name, rest) = match line.find(['{', ' ', '\t']) {
        Some(i) => line.split_at(i),
        None => return None,
    };
    let (labels, rest) = if let Some(body) = rest.strip_prefix('{') {
        parse_labels(body)?
    } else {
        (Vec::new(), rest)
    };
    // The value, then an optional timestamp.
    let value = parse_value(rest.split_whitespace().next()?)?;
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// `a="x",b="y\"z"} rest` → labels and `rest`.
fn parse_labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches([' ', ',']);
        if let Some(rest) = s.strip_prefix('}') {
            return Some((labels, rest));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_string();
        let body = s[eq + 1..].trim_start().strip_prefix('"')?;
        let mut chars = body.char_indices();
        let mut value = String::new();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => return None,
                },
                '"' => {
                    end = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        s = &body[end? + 1..];
        labels.push((key, value));
    }
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => s.parse().ok(),
    }
}

/// The `q` quantile of what a histogram recorded between two snapshots,
/// interpolated linearly inside its bucket (as PromQL's
/// `histogram_quantile` does). `None` when nothing was recorded; the
/// highest finite bound when the quantile lies in the +Inf bucket.
///
/// `ceiling`, when known, is a value no observation can exceed (e.g. the
/// length of the run): bucket bounds above it are lowered to it, so a wide
/// bucket does not put the estimate beyond what was possible.
pub fn delta_quantile(
    before: &Snapshot,
    after: &Snapshot,
    histogram: &str,
    q: f64,
    ceiling: Option<f64>,
) -> Option<f64> {
    let old = before.buckets(histogram);
    let delta: Vec<(f64, f64)> = after
        .buckets(histogram)
        .into_iter()
        .map(|(le, n)| {
            let prior = old.iter().find(|(b, _)| *b == le).map_or(0.0, |(_, c)| *c);
            (le, (n - prior).max(0.0))
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total;
    let cap = |v: f64| ceiling.map_or(v, |c| v.min(c));
    let (mut lower, mut below) = (0.0, 0.0);
    for (le, count) in &delta {
        if *count >= rank {
            let upper = cap(*le).max(lower);
            if upper.is_infinite() {
                return Some(cap(lower));
            }
            let in_bucket = count - below;
            let share = if in_bucket > 0.0 {
                (rank - below) / in_bucket
            } else {
                1.0
            };
            return Some(cap(lower + (upper - lower) * share));
        }
        lower = *le;
        below = *count;
    }
    Some(cap(lower))
}

/// The mean of what a histogram recorded between two snapshots, from its
/// `_sum` and `_count` (exact, unlike quantiles from buckets).
pub fn delta_mean(before: &Snapshot, after: &Snapshot, histogram: &str) -> Option<f64> {
    let sum = after.sum(&format!("{histogram}_sum")) - before.sum(&format!("{histogram}_sum"));
    let count =
        after.sum(&format!("{histogram}_count")) - before.sum(&format!("{histogram}_count"));
    (count > 0.0).then(|| sum / count)
}

/// `GET /metrics` on `client`.
pub async fn fetch(client: &mut Client) -> anyhow::Result<Snapshot> {
    let response = tokio::time::timeout(Duration::from_secs(10), client.get("/metrics"))
        .await
        .context("/metrics did not answer within 10 s")??;
    if !response.status.is_success() {
        bail!("/metrics answered HTTP {}", response.status);
    }
    let text = std::str::from_utf8(&response.body).context("/metrics is not UTF-8")?;
    let snapshot = Snapshot::parse(text);
    if !snapshot.has(m::CONVERSATIONS_STORED) && !snapshot.has(m::QUEUE_DEPTH) {
        bail!(
            "/metrics has no {} or {}: is this convstore?",
            m::CONVERSATIONS_STORED,
            m::QUEUE_DEPTH
        );
    }
    Ok(snapshot)
}

/// What the daemon committed between two snapshots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Stored {
    /// New conversation rows.
    pub conversations: u64,
    /// Chunk rows, every embedding status.
    pub chunks: u64,
    /// Of `chunks`: stored with a vector.
    pub chunks_embedded: u64,
    /// Already-stored client ids (idempotent repeats): settled, not stored.
    pub duplicates: u64,
    /// Accepted but could not be stored.
    pub failed: u64,
}

impl Stored {
    pub fn between(before: &Snapshot, after: &Snapshot) -> Self {
        let delta = |name: &str| counter_delta(before.sum(name), after.sum(name));
        Self {
            conversations: delta(m::CONVERSATIONS_STORED),
            chunks: delta(m::CHUNKS_STORED),
            chunks_embedded: counter_delta(
                before.sum_where(m::CHUNKS_STORED, "status", "embedded"),
                after.sum_where(m::CHUNKS_STORED, "status", "embedded"),
            ),
            duplicates: delta(m::CONVERSATIONS_DUPLICATE),
            failed: delta(m::CONVERSATIONS_FAILED),
        }
    }

    /// Conversations the daemon is done with, one way or another.
    pub fn settled(&self) -> u64 {
        self.conversations + self.duplicates + self.failed
    }
}

fn counter_delta(before: f64, after: f64) -> u64 {
    let d = (after - before).max(0.0).round();
    if d >= u64::MAX as f64 {
        u64::MAX
    } else {
        d as u64
    }
}

/// The end of a wait for commits.
pub struct Settled {
    pub stored: Stored,
    /// Every accepted conversation was settled.
    pub complete: bool,
    /// When the last change was seen.
    pub last_change: Instant,
    pub after: Snapshot,
}

/// How often the wait polls `/metrics` near the end (and while it cannot
/// tell how far the end is): the error it adds to a stored rate is at most
/// this over the run's length.
const POLL: Duration = Duration::from_millis(25);
/// The longest wait between polls while much is left to commit. Every
/// scrape costs the daemon a render and the load generator a parse on the
/// cores that store (at 25 ms, 9 % of the daemon's CPU in a sample run).
const MAX_POLL: Duration = Duration::from_millis(250);

/// When to poll next: an eighth of the time the commits still to come
/// would take at the rate of the last interval, within [`POLL`,
/// `MAX_POLL`]. The end is still seen within `POLL` unless the commit rate
/// jumps more than eightfold in one interval.
fn next_poll(remaining: u64, committed: u64, interval: Duration) -> Duration {
    if remaining == 0 || committed == 0 || interval.is_zero() {
        return POLL;
    }
    let rate = committed as f64 / interval.as_secs_f64();
    Duration::try_from_secs_f64(remaining as f64 / rate / 8.0)
        .unwrap_or(MAX_POLL)
        .clamp(POLL, MAX_POLL)
}

/// Polls `/metrics` until `accepted` conversations are settled since
/// `before`, nothing changed for `settle_timeout`, or `abandon` is
/// cancelled. `progress` hears the settled count after every poll.
pub async fn wait_for_commit(
    client: &mut Client,
    before: &Snapshot,
    accepted: u64,
    settle_timeout: Duration,
    abandon: &tokio_util::sync::CancellationToken,
    mut progress: impl FnMut(&Stored),
) -> anyhow::Result<Settled> {
    let mut last: Option<Stored> = None;
    let mut last_change = Instant::now();
    // A commit's counters are separate increments, and a scrape renders
    // them one by one: it can see every conversation counted but not yet
    // the last batch's chunks (one CI run: 2,906 chunks reported, 2,977
    // stored). The daemon counts a commit's chunks before its
    // conversations, so a scrape that starts after the conversations are
    // counted sees the chunks too: complete counts are read once more,
    // POLL later, and taken when unchanged.
    let mut complete_once: Option<Stored> = None;
    let mut previous: Option<(Instant, u64)> = None;
    loop {
        let after = fetch(client).await?;
        let now = Instant::now();
        let stored = Stored::between(before, &after);
        let wait = match previous {
            Some((then, settled)) => next_poll(
                accepted.saturating_sub(stored.settled()),
                stored.settled().saturating_sub(settled),
                now.duration_since(then),
            ),
            None => POLL,
        };
        previous = Some((now, stored.settled()));
        if last != Some(stored) {
            last = Some(stored);
            last_change = now;
        }
        progress(&stored);
        let complete = stored.settled() >= accepted;
        let confirmed = complete && complete_once == Some(stored);
        if complete {
            complete_once = Some(stored);
        }
        if confirmed || abandon.is_cancelled() || now.duration_since(last_change) >= settle_timeout
        {
            return Ok(Settled {
                stored,
                complete,
                last_change,
                after,
            });
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = abandon.cancelled() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP convstore_conversations_stored_total Conversations committed.
# TYPE convstore_conversations_stored_total counter
convstore_conversations_stored_total 120
convstore_chunks_stored_total{status="embedded"} 300
convstore_chunks_stored_total{status="pending"} 7 1700000000000
convstore_conversations_failed_total{reason="bad \"x\", y"} 2
convstore_enqueue_duration_seconds_bucket{le="0.00001"} 10
convstore_enqueue_duration_seconds_bucket{le="0.00005"} 90
convstore_enqueue_duration_seconds_bucket{le="+Inf"} 100
convstore_enqueue_duration_seconds_sum 0.004
convstore_enqueue_duration_seconds_count 100
"#;

    #[test]
    fn parses_counters_labels_and_buckets() {
        let s = Snapshot::parse(TEXT);
        assert_eq!(s.sum(m::CONVERSATIONS_STORED), 120.0);
        assert_eq!(s.sum(m::CHUNKS_STORED), 307.0);
        assert_eq!(s.sum_where(m::CHUNKS_STORED, "status", "embedded"), 300.0);
        assert_eq!(
            s.sum_where(m::CONVERSATIONS_FAILED, "reason", "bad \"x\", y"),
            2.0
        );
        assert_eq!(
            s.buckets(m::ENQUEUE_SECONDS),
            vec![(0.00001, 10.0), (0.00005, 90.0), (f64::INFINITY, 100.0)]
        );
    }

    #[test]
    fn stored_is_the_difference_between_scrapes() {
        let before = Snapshot::parse(TEXT);
        let after = Snapshot::parse(
            &TEXT
                .replace("stored_total 120", "stored_total 150")
                .replace("\"embedded\"} 300", "\"embedded\"} 360"),
        );
        let d = Stored::between(&before, &after);
        assert_eq!(d.conversations, 30);
        assert_eq!(d.chunks, 60);
        assert_eq!(d.chunks_embedded, 60);
        assert_eq!(d.settled(), 30);
        assert_eq!(Stored::between(&Snapshot::default(), &before).failed, 2);
    }

    #[test]
    fn quantiles_interpolate_within_the_delta() {
        let before = Snapshot::default();
        let after = Snapshot::parse(TEXT);
        let q = |q, ceiling| delta_quantile(&before, &after, m::ENQUEUE_SECONDS, q, ceiling);
        // 50 of 100: the 40th of 80 in (10 µs, 50 µs].
        let p50 = q(0.5, None).unwrap();
        assert!((p50 - 0.00003).abs() < 1e-12, "{p50}");
        assert_eq!(
            q(0.99, None),
            Some(0.00005),
            "in +Inf: the highest finite bound"
        );
        // With a ceiling of 30 µs the (10, 50] bucket becomes (10, 30].
        let capped = q(0.5, Some(0.00003)).unwrap();
        assert!((capped - 0.00002).abs() < 1e-12, "{capped}");
        let capped = q(0.99, Some(0.00003)).unwrap();
        assert!((capped - 0.00003).abs() < 1e-12, "{capped}");
        assert_eq!(
            delta_quantile(&after, &after, m::ENQUEUE_SECONDS, 0.5, None),
            None,
            "nothing recorded in between"
        );
    }

    #[test]
    fn polls_sparsely_while_much_is_left_and_often_near_the_end() {
        let second = Duration::from_secs(1);
        // 1,000 a second with 4,000 to go: 4 s left, an eighth is 0.5 s.
        assert_eq!(next_poll(4_000, 1_000, second), MAX_POLL);
        // 200 to go at the same rate: 0.2 s left, polled every 25 ms.
        assert_eq!(next_poll(200, 1_000, second), POLL);
        // 1,000 to go: 1 s left, an eighth.
        assert_eq!(next_poll(1_000, 1_000, second), Duration::from_millis(125));
        // Nothing committed in the last interval, nothing left, or no
        // interval: no rate to go by.
        assert_eq!(next_poll(4_000, 0, second), POLL);
        assert_eq!(next_poll(0, 1_000, second), POLL);
        assert_eq!(next_poll(4_000, 1_000, Duration::ZERO), POLL);
    }

    #[test]
    fn means_come_from_sum_and_count() {
        let before = Snapshot::default();
        let after = Snapshot::parse(TEXT);
        let mean = delta_mean(&before, &after, m::ENQUEUE_SECONDS).unwrap();
        assert!((mean - 0.00004).abs() < 1e-12, "{mean}");
        assert_eq!(delta_mean(&after, &after, m::ENQUEUE_SECONDS), None);
    }
}
