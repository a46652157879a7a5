//! `[nats]`: the shared intake. Owned here; the daemon's `Settings`
//! composes it and validates across sections (a shared intake refuses the
//! managed database).

use std::time::Duration;

use convstore_core::duration::parse_duration;
use convstore_core::setting::InvalidSetting;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NatsSettings {
    /// Empty: the local queue and journal (one instance). `nats://host:port`
    /// (several, comma-separated, for a cluster): the shared intake.
    pub url: String,
    /// The JetStream stream every instance publishes to.
    pub stream: String,
    /// Subject prefix; each conversation publishes on `<subject>.<key hash>`.
    pub subject: String,
    /// The durable pull consumer every instance's workers share.
    pub consumer: String,
    /// A NATS `.creds` file (JWT and NKey seed); empty = no credentials.
    pub credentials_file: String,
    /// How long a pulled change may stay unacknowledged before JetStream
    /// delivers it again (a worker sends progress while it embeds).
    pub ack_wait: String,
    /// Deliveries of one change before it is terminated and recorded as a
    /// dead letter (`dead_letters` table).
    pub max_deliver: i64,
    /// Stream replicas (1, or 3/5 on a JetStream cluster).
    pub replicas: usize,
    /// Stream bounds: past either, a publish is refused and the client
    /// hears 429 with Retry-After.
    pub max_messages: i64,
    pub max_bytes: i64,
    /// Broker-side de-duplication window of a publisher's retries.
    pub duplicate_window: String,
    /// How long a request waits for the stream's acknowledgement.
    pub publish_timeout: String,
}

impl Default for NatsSettings {
    fn default() -> Self {
        Self {
            url: String::new(),
            stream: "CONVSTORE".into(),
            subject: "convstore.conversations".into(),
            consumer: "convstore".into(),
            credentials_file: String::new(),
            ack_wait: "30s".into(),
            max_deliver: 20,
            replicas: 1,
            max_messages: 1_000_000,
            max_bytes: 1 << 30,
            duplicate_window: "2m".into(),
            publish_timeout: "5s".into(),
        }
    }
}

/// `[nats]` checked, durations parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Intake {
    pub urls: String,
    pub stream: String,
    pub subject: String,
    pub consumer: String,
    pub credentials_file: Option<String>,
    pub ack_wait: Duration,
    pub max_deliver: i64,
    pub replicas: usize,
    pub max_messages: i64,
    pub max_bytes: i64,
    pub duplicate_window: Duration,
    pub publish_timeout: Duration,
}

impl NatsSettings {
    pub fn enabled(&self) -> bool {
        !self.url.trim().is_empty()
    }

    /// The checked settings, or the first key that cannot be used.
    pub fn resolve(&self) -> Result<Intake, InvalidSetting> {
        let invalid =
            |key: &str, reason: String| InvalidSetting::new(format!("nats.{key}"), reason);
        let duration = |key: &str, value: &str| {
            parse_duration(value)
                .map_err(|e| invalid(key, e))
                .and_then(|d| {
                    Some(d)
                        .filter(|d| !d.is_zero())
                        .ok_or_else(|| invalid(key, "must be a positive duration".into()))
                })
        };
        for (key, name) in [("stream", &self.stream), ("consumer", &self.consumer)] {
            if !valid_token(name) {
                return Err(invalid(
                    key,
                    format!("`{name}` must be 1-64 letters, digits, `-` or `_`"),
                ));
            }
        }
        if !valid_subject(&self.subject) {
            return Err(invalid(
                "subject",
                format!(
                    "`{}` must be dot-separated tokens of letters, digits, `-` or `_` (no wildcards)",
                    self.subject
                ),
            ));
        }
        let ack_wait = duration("ack_wait", &self.ack_wait)?;
        if ack_wait < Duration::from_secs(1) {
            return Err(invalid("ack_wait", "must be at least 1s".into()));
        }
        if self.max_deliver < 1 {
            return Err(invalid("max_deliver", "must be at least 1".into()));
        }
        if !matches!(self.replicas, 1..=5) {
            return Err(invalid("replicas", "must be 1 to 5".into()));
        }
        if self.max_messages < 1 {
            return Err(invalid("max_messages", "must be positive".into()));
        }
        if self.max_bytes < 1024 {
            return Err(invalid("max_bytes", "must be at least 1024".into()));
        }
        Ok(Intake {
            urls: self.url.trim().to_string(),
            stream: self.stream.clone(),
            subject: self.subject.clone(),
            consumer: self.consumer.clone(),
            credentials_file: Some(self.credentials_file.trim().to_string())
                .filter(|f| !f.is_empty()),
            ack_wait,
            max_deliver: self.max_deliver,
            replicas: self.replicas,
            max_messages: self.max_messages,
            max_bytes: self.max_bytes,
            duplicate_window: duration("duplicate_window", &self.duplicate_window)?,
            publish_timeout: duration("publish_timeout", &self.publish_timeout)?,
        })
    }
}

fn valid_token(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 64
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn valid_subject(subject: &str) -> bool {
    subject.len() <= 200 && subject.split('.').all(valid_token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_resolve_and_bad_values_name_their_key() {
        let ok = NatsSettings {
            url: "nats://127.0.0.1:4222".into(),
            ..NatsSettings::default()
        };
        assert!(ok.enabled());
        let intake = ok.resolve().unwrap();
        assert_eq!(intake.ack_wait, Duration::from_secs(30));
        assert!(!NatsSettings::default().enabled());
        for (bad, key) in [
            (
                NatsSettings {
                    subject: "convstore.*".into(),
                    ..ok.clone()
                },
                "nats.subject",
            ),
            (
                NatsSettings {
                    stream: "a.b".into(),
                    ..ok.clone()
                },
                "nats.stream",
            ),
            (
                NatsSettings {
                    ack_wait: "0s".into(),
                    ..ok.clone()
                },
                "nats.ack_wait",
            ),
            (
                NatsSettings {
                    replicas: 2 + 4,
                    ..ok.clone()
                },
                "nats.replicas",
            ),
            (
                NatsSettings {
                    max_deliver: 0,
                    ..ok.clone()
                },
                "nats.max_deliver",
            ),
        ] {
            let e = bad.resolve().unwrap_err();
            assert_eq!(e.key, key, "{e:?}");
        }
    }
}
