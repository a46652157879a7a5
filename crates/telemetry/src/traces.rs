//! Traces: OpenTelemetry spans exported over OTLP/HTTP (protobuf) when
//! `[telemetry] otlp_endpoint` is set, through `tracing` spans and the
//! `tracing-opentelemetry` layer that [`crate::logging::init`] installs.
//!
//! What a trace shows (docs/MONITORING.md, "Traces"): a request's W3C
//! `traceparent` is continued ([`request_span`]); the conversation's trace
//! follows it past the queue with a `queue.wait` span held open from its
//! enqueue to the batch that takes it ([`Carried`]), then an `ack` span
//! when its change is settled, linked to the batch. A batch's span
//! (`batch`, [`batch_span`]) continues the first traced conversation it
//! carries and links to every one of them; its children are the stages:
//! `chunk`, `embed` (`cache.lookup`, `embed.attempt`, `embed.request` per
//! backend), `store.transaction`.
//!
//! Off costs nothing on the hot path: every per-conversation span is made
//! only when [`enabled`] (one relaxed load), and the stage spans of a batch
//! are a few per batch. The spans are `tracing` spans of the target
//! `convstore::trace` at INFO, let through whatever `log.level` says while
//! traces are on; log lines written inside them show them, with the trace
//! id.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider,
};
use serde::{Deserialize, Serialize};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// `[telemetry]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// Where traces are sent, OTLP/HTTP with protobuf: the collector's
    /// traces URL (`http://127.0.0.1:4318/v1/traces`; a URL without a path
    /// gets `/v1/traces`). Empty: no traces.
    pub otlp_endpoint: String,
    /// Share of traces kept (0 to 1) for requests without a `traceparent`;
    /// a request with one keeps its caller's decision.
    pub trace_sample_ratio: f64,
    /// `service.name` of the spans.
    pub service_name: String,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            trace_sample_ratio: 1.0,
            service_name: "convstore".into(),
        }
    }
}

impl TelemetrySettings {
    /// Checks the values a type cannot; the key of the first bad one.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(0.0..=1.0).contains(&self.trace_sample_ratio) {
            return Err((
                "trace_sample_ratio",
                format!("{} is not between 0 and 1", self.trace_sample_ratio),
            ));
        }
        if self.service_name.trim().is_empty() {
            return Err(("service_name", "must not be empty".into()));
        }
        if !self.otlp_endpoint.is_empty() {
            traces_url(&self.otlp_endpoint).map_err(|e| ("otlp_endpoint", e))?;
        }
        Ok(())
    }
}

/// The traces URL for `endpoint`: as given when it has a path, else with
/// OTLP's `/v1/traces`.
pub fn traces_url(endpoint: &str) -> Result<String, String> {
    let rest = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .ok_or_else(|| format!("`{endpoint}` is not an http:// or https:// URL"))?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() {
        return Err(format!("`{endpoint}` has no host"));
    }
    let path = &rest[host.len()..];
    Ok(if path.is_empty() || path == "/" {
        format!("{}/v1/traces", endpoint.trim_end_matches('/'))
    } else {
        endpoint.to_string()
    })
}

/// The directive for every span that makes a trace (target
/// `convstore::trace`, INFO): the log filter lets them through while
/// traces are on (`crate::logging`).
pub const SPAN_DIRECTIVE: &str = "convstore::trace=info";

/// A traced change's context, which a batch continues or links to.
pub type Link = SpanContext;

static ENABLED: AtomicBool = AtomicBool::new(false);
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Whether spans are exported (set once, by [`crate::logging::init`]).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// How often finished spans are sent, and the most kept waiting.
const EXPORT_EVERY: Duration = Duration::from_secs(1);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_QUEUED_SPANS: usize = 8192;

/// The exporting layer for `settings`, or `None` when traces are off. The
/// exporter runs on a thread of its own (a blocking HTTP client): it never
/// takes a thread of the daemon's runtimes.
pub(crate) fn layer<S>(
    settings: &TelemetrySettings,
) -> Result<
    Option<tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>>,
    String,
>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    if settings.otlp_endpoint.is_empty() {
        return Ok(None);
    }
    let url = traces_url(&settings.otlp_endpoint)?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url)
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| format!("cannot build the OTLP exporter: {e}"))?;
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_scheduled_delay(EXPORT_EVERY)
                .with_max_queue_size(MAX_QUEUED_SPANS)
                .build(),
        )
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            settings.trace_sample_ratio,
        ))))
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(settings.service_name.clone())
                .build(),
        )
        .build();
    let tracer = provider.tracer("convstore");
    let _ = PROVIDER.set(provider);
    ENABLED.store(true, Ordering::Relaxed);
    Ok(Some(tracing_opentelemetry::layer().with_tracer(tracer)))
}

/// Sends the spans still queued (at shutdown).
pub fn shutdown() {
    if let Some(provider) = PROVIDER.get()
        && let Err(e) = provider.shutdown()
    {
        tracing::warn!(error = %e, "Cannot flush the last traces");
    }
}

/// The span of one request, continuing the caller's `traceparent` (and
/// `tracestate`) when it sent one; [`Span::none`] when traces are off.
/// `name`: what the request does (`conversation.post`, `messages.append`).
pub fn request_span(
    name: &'static str,
    traceparent: Option<&str>,
    tracestate: Option<&str>,
) -> Span {
    if !enabled() {
        return Span::none();
    }
    // One call site; `otel.name` names the exported span after the route.
    let span = tracing::info_span!(
        target: "convstore::trace",
        "request",
        otel.name = name,
        trace_id = tracing::field::Empty
    );
    if let Some(traceparent) = traceparent {
        // A malformed traceparent extracts as no parent: a new trace.
        let _ = span.set_parent(extract(traceparent, tracestate));
    }
    record_trace_id(&span);
    span
}

/// The trace context a W3C `traceparent` (and `tracestate`) carries.
fn extract(traceparent: &str, tracestate: Option<&str>) -> opentelemetry::Context {
    let mut carrier = HashMap::with_capacity(2);
    carrier.insert("traceparent".to_string(), traceparent.to_string());
    if let Some(state) = tracestate {
        carrier.insert("tracestate".to_string(), state.to_string());
    }
    TraceContextPropagator::new().extract(&carrier)
}

/// The current span's W3C `traceparent`, to carry a trace where a span
/// cannot go (the shared intake's stream); `None` when traces are off or
/// nothing is traced here.
pub fn current_traceparent() -> Option<String> {
    if !enabled() {
        return None;
    }
    let context = Span::current().context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier: HashMap<String, String> = HashMap::with_capacity(2);
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove("traceparent")
}

/// Puts the span's trace id in its `trace_id` field, so log lines written
/// inside it carry it.
fn record_trace_id(span: &Span) {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if span_context.is_valid() {
        span.record("trace_id", tracing::field::display(span_context.trace_id()));
    }
}

/// A conversation's trace while it travels from the queue to its ack: the
/// open `queue.wait` span, then the batch it went with.
#[derive(Debug)]
pub struct Carried {
    queue_wait: Span,
    parent: SpanContext,
    batch: Option<SpanContext>,
}

impl Carried {
    /// Opens the `queue.wait` span under the current span (the request's),
    /// when traces are on and the request is traced.
    pub fn enqueued() -> Option<Carried> {
        if !enabled() {
            return None;
        }
        let parent = Span::current().context().span().span_context().clone();
        Self::open(parent)
    }

    /// The same for a change that arrived with its `traceparent` (pulled
    /// from the shared intake's stream): its trace goes on here.
    pub fn continued(traceparent: &str) -> Option<Carried> {
        if !enabled() {
            return None;
        }
        let parent = extract(traceparent, None).span().span_context().clone();
        Self::open(parent)
    }

    fn open(parent: SpanContext) -> Option<Carried> {
        if !parent.is_valid() {
            return None;
        }
        // Not a `tracing` child of the request: that would keep the
        // request's span open until the dequeue. Its OTel parent is the
        // request all the same.
        let queue_wait =
            tracing::info_span!(target: "convstore::trace", parent: None, "queue.wait");
        let _ = queue_wait
            .set_parent(opentelemetry::Context::new().with_remote_span_context(parent.clone()));
        Some(Carried {
            queue_wait,
            parent,
            batch: None,
        })
    }

    /// Closes `queue.wait` (a batch took the change); the context a batch
    /// links to.
    pub fn dequeued(&mut self) -> Link {
        self.queue_wait = Span::none();
        self.parent.clone()
    }

    /// Remembers the batch that carried it, for the ack's link.
    pub fn carried_by(&mut self, batch: &Span) {
        let context = batch.context().span().span_context().clone();
        if context.is_valid() {
            self.batch = Some(context);
        }
    }

    /// The `ack` span: the change is settled (`outcome`), in the
    /// conversation's trace, linked to its batch.
    pub fn acked(self, outcome: &'static str) {
        let span = tracing::info_span!(target: "convstore::trace", "ack", outcome);
        let parent = opentelemetry::Context::new().with_remote_span_context(self.parent);
        let _ = span.set_parent(parent);
        if let Some(batch) = self.batch {
            span.add_link(batch);
        }
        drop(span);
    }
}

/// The span of a batch: in the trace of the first traced conversation it
/// carries (`links[0]`), linked to every one of them; a root span when none
/// is traced (or traces are off: then a plain `tracing` span for the log).
pub fn batch_span(conversations: usize, links: &[Link]) -> Span {
    let span = tracing::info_span!(
        target: "convstore::trace",
        "batch",
        conversations,
        trace_id = tracing::field::Empty
    );
    if !enabled() {
        return span;
    }
    if let Some(first) = links.first() {
        let parent = opentelemetry::Context::new().with_remote_span_context(first.clone());
        let _ = span.set_parent(parent);
    }
    for link in links {
        span.add_link(link.clone());
    }
    record_trace_id(&span);
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_url_adds_the_signal_path_only_to_a_bare_endpoint() {
        assert_eq!(
            traces_url("http://127.0.0.1:4318").as_deref(),
            Ok("http://127.0.0.1:4318/v1/traces")
        );
        assert_eq!(
            traces_url("http://collector:4318/").as_deref(),
            Ok("http://collector:4318/v1/traces")
        );
        assert_eq!(
            traces_url("https://otel.example/custom/traces").as_deref(),
            Ok("https://otel.example/custom/traces")
        );
        assert!(traces_url("127.0.0.1:4318").is_err());
        assert!(traces_url("http:///v1/traces").is_err());
    }

    #[test]
    fn settings_refuse_a_ratio_outside_zero_to_one() {
        let bad = TelemetrySettings {
            trace_sample_ratio: 1.5,
            ..TelemetrySettings::default()
        };
        assert_eq!(bad.validate().map_err(|e| e.0), Err("trace_sample_ratio"));
        assert!(TelemetrySettings::default().validate().is_ok());
    }

    #[test]
    fn off_makes_no_request_or_queue_spans() {
        assert!(!enabled());
        assert!(
            request_span(
                "conversation.post",
                Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
                None
            )
            .is_none()
        );
        assert!(Carried::enqueued().is_none());
    }
}
