//! The connection to the shared intake: the stream and the consumer, the
//! publish path, the look-ups by conversation, and pulling.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::pull::Config as ConsumerConfig;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::context::{Context, PublishErrorKind};
use async_nats::jetstream::message::{AckKind, Message};
use async_nats::jetstream::stream::{
    Config as StreamConfig, DiscardPolicy, LastRawMessageErrorKind, RetentionPolicy, StorageType,
    Stream,
};
use futures::StreamExt;

use convstore_core::journal::entry;
use convstore_core::lifecycle::{Stamp, StampedChange};
use convstore_telemetry::events::label;
use convstore_telemetry::metrics as m;

use crate::replies::{REPLY_HEADER, RemoteOutcome, ReplyInbox};
use crate::settings::Intake;
use crate::subject::subject_for;

/// The header carrying a change's stamp (for operators reading the
/// stream with the `nats` CLI).
const STAMP_HEADER: &str = "Convstore-Stamp";
/// The W3C trace context of the request that sent a change.
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// How long a server-confirmed acknowledgement may take before it is given
/// up: a lost ack is only a redelivery, which the store absorbs, while a
/// long wait would stall the worker behind it during a failover.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("cannot read nats.credentials_file {path}: {reason}")]
    Credentials { path: String, reason: String },
    #[error("JetStream stream `{stream}`: {reason}")]
    Stream { stream: String, reason: String },
    #[error("JetStream consumer `{consumer}`: {reason}")]
    Consumer { consumer: String, reason: String },
    #[error("JetStream: {0}")]
    Other(String),
}

/// Why a publish was not acknowledged by the stream.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The stream is at `max_messages` or `max_bytes`: the client retries
    /// later (429).
    #[error("the shared intake is full: {0}")]
    Full(String),
    /// No answer, or no stream: the change may or may not be in the
    /// stream; the client retries (503), which the store absorbs.
    #[error("the shared intake is unavailable: {0}")]
    Unavailable(String),
    /// The change does not fit in one message (`max_payload`).
    #[error("the change is larger than the shared intake's message limit: {0}")]
    TooLarge(String),
}

/// The stream's acknowledgement of one published change.
#[derive(Debug, Clone, Copy)]
pub struct Published {
    pub sequence: u64,
    /// JetStream had this message id already (a publisher's retry).
    pub duplicate: bool,
}

/// The newest change a conversation has waiting in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHead {
    pub sequence: u64,
    pub stamp: Stamp,
    /// The conversation's row and user as that change has them.
    pub row: uuid::Uuid,
    pub user_id: String,
}

/// What JetStream says about the shared consumer.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConsumerState {
    /// Changes in the stream no instance has pulled yet.
    pub pending: u64,
    /// Pulled and not yet acknowledged, across every instance.
    pub ack_pending: u64,
}

pub struct SharedIntake {
    client: async_nats::Client,
    jetstream: Context,
    stream: Stream,
    consumer: PullConsumer,
    settings: Intake,
    replies: Arc<ReplyInbox>,
}

impl SharedIntake {
    /// Connects (retrying in the background after the first connection),
    /// creates the stream and the consumer when missing, or checks them
    /// when another instance created them first.
    pub async fn connect(settings: Intake, instance: uuid::Uuid) -> Result<Self, IntakeError> {
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("convstore {instance}"))
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(settings.publish_timeout))
            // Keep reconnecting: the stream holds what was accepted, and a
            // broker restart must not end the daemon.
            .max_reconnects(None);
        if let Some(path) = &settings.credentials_file {
            options =
                options
                    .credentials_file(path)
                    .await
                    .map_err(|e| IntakeError::Credentials {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
        }
        let urls: Vec<&str> = settings.urls.split(',').map(str::trim).collect();
        let client = options
            .connect(urls.as_slice())
            .await
            .map_err(|e| IntakeError::Connect {
                url: settings.urls.clone(),
                reason: e.to_string(),
            })?;
        let jetstream = async_nats::jetstream::context::ContextBuilder::new()
            .timeout(settings.publish_timeout)
            .build(client.clone());
        let stream = ensure_stream(&jetstream, &settings).await?;
        let consumer = ensure_consumer(&stream, &settings).await?;
        let replies = ReplyInbox::start(&client, instance)
            .await
            .map_err(|e| IntakeError::Other(format!("cannot subscribe to the reply inbox: {e}")))?;
        Ok(Self {
            client,
            jetstream,
            stream,
            consumer,
            settings,
            replies,
        })
    }

    pub fn settings(&self) -> &Intake {
        &self.settings
    }

    pub fn replies(&self) -> &Arc<ReplyInbox> {
        &self.replies
    }

    /// Sends `change` to the stream and returns the stream's answer, to be
    /// awaited *after* the caller released whatever orders its changes:
    /// messages on one connection reach the stream in the order they were
    /// sent, so a conversation's changes keep their stamp order.
    /// `reply`: where the outcome goes when the client waits for `stored`.
    pub async fn send(
        &self,
        change: &StampedChange,
        reply: Option<&str>,
        traceparent: Option<&str>,
    ) -> Result<PendingPublish, PublishError> {
        let key = change.change.key();
        let subject = subject_for(&self.settings.subject, &key);
        let mut headers = HeaderMap::new();
        // A change is its conversation and its stamp: the broker drops a
        // publisher's retry of it, never a later change (a replacement or
        // an append reuses the conversation id). A client's retry is a new
        // change that the store finds unchanged.
        headers.insert("Nats-Msg-Id", format!("{key}@{}", change.stamp).as_str());
        headers.insert(STAMP_HEADER, change.stamp.to_string().as_str());
        if let Some(reply) = reply {
            headers.insert(REPLY_HEADER, reply);
        }
        // The change's trace goes on in the instance that applies it.
        if let Some(traceparent) = traceparent {
            headers.insert(TRACEPARENT_HEADER, traceparent);
        }
        let payload = bytes::Bytes::from(entry::encode(change));
        let started = Instant::now();
        let ack = self
            .jetstream
            .publish_with_headers(subject, headers, payload)
            .await
            .map_err(publish_error)?;
        Ok(PendingPublish { ack, started })
    }

    /// The newest change of `key` still in the stream (not yet applied).
    pub async fn head(&self, key: &str) -> Result<Option<StreamHead>, IntakeError> {
        let subject = subject_for(&self.settings.subject, key);
        match self.stream.get_last_raw_message_by_subject(&subject).await {
            Ok(message) => {
                let change = entry::decode(&message.payload).map_err(|e| {
                    IntakeError::Other(format!(
                        "the stream's message {} is not a change: {e}",
                        message.sequence
                    ))
                })?;
                Ok(Some(StreamHead {
                    sequence: message.sequence,
                    stamp: change.stamp,
                    row: change.change.row_id(),
                    user_id: change.change.user_id().to_string(),
                }))
            }
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(IntakeError::Other(format!(
                "cannot look up `{key}` in the stream: {e}"
            ))),
        }
    }

    /// The stream sequences of `key`'s changes still in the stream before
    /// `before` (oldest first, at most `limit`).
    pub async fn earlier(
        &self,
        key: &str,
        before: u64,
        limit: usize,
    ) -> Result<Vec<u64>, IntakeError> {
        let subject = subject_for(&self.settings.subject, key);
        let mut found = Vec::new();
        let mut from = 1;
        while found.len() < limit {
            match self
                .stream
                .get_first_raw_message_by_subject(&subject, from)
                .await
            {
                Ok(message) if message.sequence < before => {
                    found.push(message.sequence);
                    from = message.sequence + 1;
                }
                Ok(_) => break,
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => break,
                Err(e) => {
                    return Err(IntakeError::Other(format!(
                        "cannot look up the changes before {before} of `{key}`: {e}"
                    )));
                }
            }
        }
        Ok(found)
    }

    /// A pull of up to `max` changes, each handed out as it arrives; the
    /// request ends when `max` arrived or after `expires`.
    pub async fn pull(&self, max: usize, expires: Duration) -> Result<PullBatch, IntakeError> {
        let batch = self
            .consumer
            .batch()
            .max_messages(max)
            .expires(expires)
            .messages()
            .await
            .map_err(|e| IntakeError::Other(format!("cannot pull from the consumer: {e}")))?;
        Ok(PullBatch { batch })
    }

    /// Pending and in-flight counts of the shared consumer.
    pub async fn consumer_state(&self) -> Result<ConsumerState, IntakeError> {
        let mut consumer = self.consumer.clone();
        let info = consumer
            .info()
            .await
            .map_err(|e| IntakeError::Other(format!("cannot read the consumer's state: {e}")))?;
        Ok(ConsumerState {
            pending: info.num_pending,
            ack_pending: info.num_ack_pending as u64,
        })
    }

    /// Sends `outcome` to the instance waiting for it (see `replies`).
    pub async fn reply(&self, reply: &str, outcome: &RemoteOutcome) {
        crate::replies::send(&self.client, reply, outcome).await;
    }
}

/// The stream's answer to a sent change, still to come.
pub struct PendingPublish {
    ack: async_nats::jetstream::context::PublishAckFuture,
    started: Instant,
}

impl PendingPublish {
    pub async fn acknowledged(self) -> Result<Published, PublishError> {
        let answer = self.ack.await.map_err(publish_error);
        let outcome = match &answer {
            Ok(ack) if ack.duplicate => "duplicate",
            Ok(_) => "ok",
            Err(PublishError::Full(_)) => "full",
            Err(_) => "error",
        };
        metrics::counter!(m::NATS_PUBLISHED, label::OUTCOME => outcome).increment(1);
        metrics::histogram!(m::NATS_PUBLISH_SECONDS).record(self.started.elapsed().as_secs_f64());
        let ack = answer?;
        Ok(Published {
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        })
    }
}

fn publish_error(e: async_nats::jetstream::context::PublishError) -> PublishError {
    let text = e.to_string();
    match e.kind() {
        PublishErrorKind::MaxPayloadExceeded => PublishError::TooLarge(text),
        // JetStream's own refusals: 10077 "maximum messages exceeded",
        // 10047/10078 "... bytes exceeded" / "insufficient resources".
        PublishErrorKind::Other
            if text.contains("maximum messages")
                || text.contains("maximum bytes")
                || text.contains("insufficient resources")
                || text.contains("exceeded") =>
        {
            PublishError::Full(text)
        }
        _ => PublishError::Unavailable(text),
    }
}

async fn ensure_stream(jetstream: &Context, settings: &Intake) -> Result<Stream, IntakeError> {
    let config = StreamConfig {
        name: settings.stream.clone(),
        subjects: vec![format!("{}.*", settings.subject)],
        // A change leaves the stream when a worker acknowledges it, after
        // its commit: the stream is the queue and the journal.
        retention: RetentionPolicy::WorkQueue,
        storage: StorageType::File,
        num_replicas: settings.replicas,
        max_messages: settings.max_messages,
        max_bytes: settings.max_bytes,
        // Full means refuse the new, never drop the accepted.
        discard: DiscardPolicy::New,
        duplicate_window: settings.duplicate_window,
        ..Default::default()
    };
    let stream_error = |reason: String| IntakeError::Stream {
        stream: settings.stream.clone(),
        reason,
    };
    match jetstream.get_stream(&settings.stream).await {
        Ok(mut stream) => {
            let info = stream
                .info()
                .await
                .map_err(|e| stream_error(e.to_string()))?;
            if info.config.retention != RetentionPolicy::WorkQueue {
                return Err(stream_error(
                    "exists without work-queue retention; convstore needs its own stream".into(),
                ));
            }
            let wanted = format!("{}.*", settings.subject);
            if !info.config.subjects.contains(&wanted) {
                return Err(stream_error(format!(
                    "exists for subjects {:?}, not `{wanted}` (nats.subject)",
                    info.config.subjects
                )));
            }
            Ok(stream)
        }
        Err(_) => jetstream
            .get_or_create_stream(config)
            .await
            .map_err(|e| stream_error(with_storage_hint(e.to_string(), settings.max_bytes))),
    }
}

/// JetStream reserves a stream's whole `max_bytes` when it is created and
/// refuses it (10047, or 10005 in a cluster) when its storage limit, by
/// default 75 % of the disk's free space, cannot hold that: say which two
/// numbers meet, or the operator is left with "insufficient storage".
fn with_storage_hint(reason: String, max_bytes: i64) -> String {
    if !reason.contains("insufficient storage") {
        return reason;
    }
    format!(
        "{reason}; the stream reserves nats.max_bytes = {max_bytes} bytes on every replica: \
         lower nats.max_bytes, or give the server more (jetstream {{ max_file_store }}, \
         which defaults to 75 % of the free disk)"
    )
}

async fn ensure_consumer(stream: &Stream, settings: &Intake) -> Result<PullConsumer, IntakeError> {
    let config = ConsumerConfig {
        durable_name: Some(settings.consumer.clone()),
        description: Some("convstore workers (shared by every instance)".into()),
        ack_policy: AckPolicy::Explicit,
        deliver_policy: DeliverPolicy::All,
        ack_wait: settings.ack_wait,
        max_deliver: settings.max_deliver,
        filter_subject: format!("{}.*", settings.subject),
        max_ack_pending: 100_000,
        ..Default::default()
    };
    stream
        .get_or_create_consumer(&settings.consumer, config)
        .await
        .map_err(|e| IntakeError::Consumer {
            consumer: settings.consumer.clone(),
            reason: e.to_string(),
        })
}

/// One open pull request.
pub struct PullBatch {
    batch: async_nats::jetstream::consumer::pull::Batch,
}

impl PullBatch {
    /// The next change, or `None` when the request is done.
    pub async fn next(&mut self) -> Option<Pulled> {
        match self.batch.next().await? {
            Ok(message) => Some(Pulled::new(message)),
            Err(e) => {
                tracing::debug!(error = %e, "A pull ended early");
                None
            }
        }
    }
}

/// One pulled change and its acknowledgement handle.
pub struct Pulled {
    message: Message,
}

impl Pulled {
    fn new(message: Message) -> Self {
        let pulled = Self { message };
        metrics::counter!(m::NATS_PULLED).increment(1);
        if pulled.delivered() > 1 {
            metrics::counter!(m::NATS_REDELIVERED).increment(1);
        }
        pulled
    }

    /// The change, or why the payload is not one (a poison message: see
    /// [`Pulled::terminate`]).
    pub fn change(&self) -> Result<StampedChange, String> {
        entry::decode(&self.message.payload).map_err(|e| e.to_string())
    }

    pub fn sequence(&self) -> u64 {
        self.message.info().map_or(0, |i| i.stream_sequence)
    }

    /// 1 on the first delivery.
    pub fn delivered(&self) -> i64 {
        self.message.info().map_or(1, |i| i.delivered)
    }

    pub fn payload(&self) -> &[u8] {
        &self.message.payload
    }

    /// The W3C `traceparent` of the request that sent it, when traced.
    pub fn traceparent(&self) -> Option<String> {
        self.message
            .headers
            .as_ref()?
            .get(TRACEPARENT_HEADER)
            .map(|v| v.as_str().to_string())
    }

    /// Where the outcome goes, when the accepting client waits for it.
    pub fn reply_to(&self) -> Option<String> {
        self.message
            .headers
            .as_ref()?
            .get(REPLY_HEADER)
            .map(|v| v.as_str().to_string())
    }

    /// Done: the commit that applied it (or found it moot) is behind us.
    /// Confirmed by the server within [`ACK_TIMEOUT`], else given up: a
    /// lost ack is a redelivery the store absorbs.
    pub async fn ack(&self) -> bool {
        let ok = matches!(
            tokio::time::timeout(ACK_TIMEOUT, self.message.double_ack()).await,
            Ok(Ok(()))
        );
        if ok {
            metrics::counter!(m::NATS_ACKED).increment(1);
        } else {
            metrics::counter!(m::NATS_ACK_FAILURES).increment(1);
        }
        ok
    }

    /// Still working (embedding is slow): resets `ack_wait`.
    pub async fn progress(&self) {
        let _ = tokio::time::timeout(ACK_TIMEOUT, self.message.ack_with(AckKind::Progress)).await;
    }

    /// Not now: deliver again after `delay` (to any instance).
    pub async fn defer(&self, delay: Duration) {
        metrics::counter!(m::NATS_DEFERRED).increment(1);
        let _ = tokio::time::timeout(
            ACK_TIMEOUT,
            self.message.ack_with(AckKind::Nak(Some(delay))),
        )
        .await;
    }

    /// Never: stop delivering it (the caller recorded it as a dead letter).
    pub async fn terminate(&self) {
        metrics::counter!(m::NATS_TERMINATED).increment(1);
        let _ = tokio::time::timeout(ACK_TIMEOUT, self.message.ack_with(AckKind::Term)).await;
    }
}
