//! The metric handles an accepted request records through, resolved once
//! when the ingress state is built (after the recorder is installed).
//!
//! A `metrics::counter!(...)` call looks its series up in the recorder on
//! every call: a hash of the name and labels and a read lock on a shard of
//! the Prometheus registry; and for a labelled name the `/v1/stats` tap
//! builds (allocates) its combined handle each time. Through a resolved
//! handle a record is an atomic add (a histogram's, a lock-free bucket
//! append). Only what an accepted request records is resolved: refusals are
//! the cold path and keep the macros, with their outcome as a label.
//!
//! A handle stays valid for the life of the process: the recorder keeps
//! every series it registered (no idle timeout is configured).

use metrics::{Counter, Histogram};

use super::Transport;
use convstore_telemetry::events::{self, label};
use convstore_telemetry::metrics as m;

/// The accepted outcome's series of one transport.
#[derive(Clone)]
pub struct AcceptedOn {
    /// `convstore_ingest_requests_total{endpoint="conversations", outcome="accepted"}`.
    pub conversation_requests: Counter,
    /// `…{endpoint="messages", outcome="accepted"}`.
    pub append_requests: Counter,
    /// `convstore_ingest_conversations_total{outcome="accepted"}`.
    pub conversations: Counter,
}

impl AcceptedOn {
    fn resolve(transport: Transport) -> Self {
        let t = transport.as_str();
        let accepted = events::outcome::ACCEPTED;
        Self {
            conversation_requests: metrics::counter!(m::INGEST_REQUESTS, label::TRANSPORT => t, label::ENDPOINT => "conversations", label::OUTCOME => accepted),
            append_requests: metrics::counter!(m::INGEST_REQUESTS, label::TRANSPORT => t, label::ENDPOINT => "messages", label::OUTCOME => accepted),
            conversations: metrics::counter!(m::INGEST_CONVERSATIONS, label::TRANSPORT => t, label::OUTCOME => accepted),
        }
    }
}

/// What the enqueue path records, resolved.
#[derive(Clone)]
pub struct HotMetrics {
    tcp: AcceptedOn,
    unix: AcceptedOn,
    /// `convstore_enqueue_seconds`: parse to queued, per conversation.
    pub enqueue_seconds: Histogram,
}

impl HotMetrics {
    /// Resolves every handle against the recorder in effect now.
    pub fn resolve() -> Self {
        Self {
            tcp: AcceptedOn::resolve(Transport::Tcp),
            unix: AcceptedOn::resolve(Transport::Unix),
            enqueue_seconds: metrics::histogram!(m::ENQUEUE_SECONDS),
        }
    }

    pub fn accepted_on(&self, transport: Transport) -> &AcceptedOn {
        match transport {
            Transport::Tcp => &self.tcp,
            Transport::Unix => &self.unix,
        }
    }
}

#[cfg(test)]
mod tests {
    // Test code: a panic on what the test set up itself is the failure report.
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The resolved handles land in the same series the macros write, under
    /// the daemon's recorder (Prometheus with the `/v1/stats` tap).
    #[test]
    fn resolved_handles_write_the_series_the_macros_name() {
        let prometheus = convstore_telemetry::recorder::prometheus_recorder();
        let handle = prometheus.handle();
        let stats = std::sync::Arc::new(convstore_telemetry::stats::Stats::new(
            std::time::Instant::now(),
        ));
        let tapped = convstore_telemetry::tap::StatsRecorder::new(prometheus, stats.clone());
        metrics::with_local_recorder(&tapped, || {
            let hot = HotMetrics::resolve();
            hot.accepted_on(Transport::Unix)
                .conversation_requests
                .increment(2);
            hot.accepted_on(Transport::Unix).conversations.increment(3);
            hot.accepted_on(Transport::Tcp).append_requests.increment(1);
            hot.enqueue_seconds.record(0.000_02);
            // And the macro, on the same series: the two add up.
            metrics::counter!(m::INGEST_CONVERSATIONS, label::TRANSPORT => "unix", label::OUTCOME => "accepted").increment(1);
        });
        let text = handle.render();
        let value_of = |series: &str| -> Option<f64> {
            text.lines()
                .find(|l| l.starts_with(series))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
        };
        assert_eq!(
            value_of(
                "convstore_ingest_requests_total{transport=\"unix\",endpoint=\"conversations\",outcome=\"accepted\"}"
            ),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            value_of(
                "convstore_ingest_conversations_total{transport=\"unix\",outcome=\"accepted\"}"
            ),
            Some(4.0),
            "{text}"
        );
        assert_eq!(
            value_of(
                "convstore_ingest_requests_total{transport=\"tcp\",endpoint=\"messages\",outcome=\"accepted\"}"
            ),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            value_of(&format!("{}_count", m::ENQUEUE_SECONDS)),
            Some(1.0),
            "{text}"
        );
        // The tap saw them too: /v1/stats counts accepted conversations.
        let snapshot = stats.snapshot(convstore_telemetry::stats::LiveQueue::default());
        assert_eq!(
            snapshot.totals.accepted, 4,
            "the /v1/stats tap saw every accepted conversation"
        );
        assert_eq!(snapshot.latency.enqueue.count, 1);
    }
}
