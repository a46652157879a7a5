//! Outcomes sent back to the instance that accepted a change, when its
//! client waits for `stored`: the change carries a reply subject under
//! that instance's inbox (header [`REPLY_HEADER`]); the worker that
//! commits it publishes the outcome there (core NATS, at most once).
//!
//! A lost reply costs the waiting client a timeout (504 with the id, as
//! any wait), never the change: the stream still holds it until commit.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// The header naming where a change's outcome goes.
pub const REPLY_HEADER: &str = "Convstore-Reply";

/// What became of a change, as the accepting instance hears it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum RemoteOutcome {
    /// Committed (or already there: a retry).
    Stored,
    /// Never will be: deleted or erased before it was stored, or an append
    /// to a conversation that is gone.
    Discarded { why: String },
    /// The database refused it for good (recorded as a dead letter).
    Rejected { reason: String },
}

/// The accepting side: one subscription to this instance's inbox, and the
/// requests waiting on it.
pub struct ReplyInbox {
    prefix: String,
    next: AtomicU64,
    waiting: Mutex<HashMap<u64, oneshot::Sender<RemoteOutcome>>>,
}

impl ReplyInbox {
    /// Subscribes to `_CONVSTORE.<instance>.>` and routes what arrives to
    /// the request waiting for it until the client closes.
    pub async fn start(
        client: &async_nats::Client,
        instance: uuid::Uuid,
    ) -> Result<std::sync::Arc<Self>, async_nats::SubscribeError> {
        let prefix = format!("_CONVSTORE.{}", instance.simple());
        let mut subscription = client.subscribe(format!("{prefix}.*")).await?;
        let inbox = std::sync::Arc::new(Self {
            prefix,
            next: AtomicU64::new(1),
            waiting: Mutex::new(HashMap::new()),
        });
        let routes = std::sync::Arc::downgrade(&inbox);
        tokio::spawn(async move {
            while let Some(message) = subscription.next().await {
                let Some(inbox) = routes.upgrade() else { break };
                inbox.deliver(message.subject.as_str(), &message.payload);
            }
        });
        Ok(inbox)
    }

    /// A fresh reply subject and the receiver its outcome arrives on.
    pub fn expect(self: &std::sync::Arc<Self>) -> (String, Expected) {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.lock().insert(token, tx);
        (
            format!("{}.{token}", self.prefix),
            Expected {
                inbox: self.clone(),
                token,
                rx: Some(rx),
            },
        )
    }

    fn deliver(&self, subject: &str, payload: &[u8]) {
        let Some(token) = subject
            .rsplit('.')
            .next()
            .and_then(|t| t.parse::<u64>().ok())
        else {
            return;
        };
        let Ok(outcome) = serde_json::from_slice::<RemoteOutcome>(payload) else {
            tracing::warn!(subject, "Ignoring a reply that is not an outcome");
            return;
        };
        if let Some(tx) = self.lock().remove(&token) {
            let _ = tx.send(outcome);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<RemoteOutcome>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A request's claim on one outcome; dropping it forgets the wait (a
/// client that timed out leaves nothing behind).
pub struct Expected {
    inbox: std::sync::Arc<ReplyInbox>,
    token: u64,
    rx: Option<oneshot::Receiver<RemoteOutcome>>,
}

impl Expected {
    /// The outcome, or `None` when the inbox closed.
    pub async fn outcome(mut self) -> Option<RemoteOutcome> {
        let rx = self.rx.take()?;
        rx.await.ok()
    }
}

impl Drop for Expected {
    fn drop(&mut self) {
        self.inbox.lock().remove(&self.token);
    }
}

/// Sends `outcome` to `reply` (best effort: see the module).
pub async fn send(client: &async_nats::Client, reply: &str, outcome: &RemoteOutcome) {
    let Ok(payload) = serde_json::to_vec(outcome) else {
        return;
    };
    if let Err(e) = client.publish(reply.to_string(), payload.into()).await {
        tracing::debug!(error = %e, reply, "Could not send a change's outcome to the instance that accepted it");
    }
}
