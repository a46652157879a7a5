//! Reading a request body within a deadline and a memory budget.
//!
//! Each body is capped by `server.max_body_bytes`, but 800 clients each
//! sending a never-ending chunked body held 800 × 1 MiB (RSS 16 → 867 MB,
//! issue 15). So every body read here:
//! - must arrive whole within `server.body_timeout_ms` of the handler
//!   starting to read it (408 `body_timeout`, connection closed);
//! - charges each frame, as it arrives, to one budget shared by all
//!   requests, `server.max_buffered_body_bytes`; a frame that does not fit
//!   ends that request with 503 `bodies_full` and `Retry-After` instead of
//!   growing memory. The charge is held until the request is answered,
//!   since the bytes live that long.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, header};
use bytes::BytesMut;
use http_body_util::BodyExt;

use super::error::ApiError;
use convstore_telemetry::metrics as m;

/// Bytes of request bodies held in memory by all requests together.
#[derive(Debug)]
pub struct BodyBudget {
    held: AtomicUsize,
    max: usize,
    /// `convstore_http_body_buffered_bytes`, resolved once: every request
    /// moves it twice (see `hot_metrics`).
    gauge: metrics::Gauge,
}

impl BodyBudget {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            held: AtomicUsize::new(0),
            max,
            gauge: metrics::gauge!(m::HTTP_BODY_BUFFERED_BYTES),
        })
    }

    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Takes `n` more bytes, or none when they do not fit.
    fn take(&self, n: usize) -> bool {
        let mut held = self.held.load(Ordering::Relaxed);
        loop {
            let Some(next) = held.checked_add(n).filter(|next| *next <= self.max) else {
                return false;
            };
            match self
                .held
                .compare_exchange_weak(held, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.gauge.increment(n as f64);
                    return true;
                }
                Err(now) => held = now,
            }
        }
    }

    fn give_back(&self, n: usize) {
        self.held.fetch_sub(n, Ordering::AcqRel);
        self.gauge.decrement(n as f64);
    }
}

/// A body read whole, with its share of the budget: the bytes count
/// against `server.max_buffered_body_bytes` until this is dropped.
#[derive(Debug)]
pub struct ReadBody {
    pub bytes: Bytes,
    budget: Arc<BodyBudget>,
    charged: usize,
}

impl Drop for ReadBody {
    fn drop(&mut self) {
        self.budget.give_back(self.charged);
    }
}

impl std::ops::Deref for ReadBody {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

/// What a body read may take.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub max_body_bytes: usize,
    pub timeout: Duration,
    pub retry_after_secs: u32,
}

/// Reads `body` whole under `limits` and `budget`. A declared
/// `Content-Length` over the limit is refused before a byte is read.
pub async fn read(
    budget: &Arc<BodyBudget>,
    limits: BodyLimits,
    headers: &HeaderMap,
    body: Body,
) -> Result<ReadBody, ApiError> {
    let limit = limits.max_body_bytes;
    let too_large =
        || ApiError::PayloadTooLarge(format!("body over server.max_body_bytes ({limit} bytes)"));
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(too_large());
    }
    let mut read = ReadBody {
        bytes: Bytes::new(),
        budget: budget.clone(),
        charged: 0,
    };
    // A body that arrives in one frame (most do: hyper hands over what one
    // read brought) is kept as that frame, without a copy; a second frame
    // starts the buffer. Small first: a declared length is the client's
    // word, not memory to hand out before the bytes arrive.
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    let initial = declared.map_or(8 * 1024, |n| n.min(64 * 1024) as usize);
    let deadline = tokio::time::Instant::now() + limits.timeout;
    let mut body = body;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                return Err(ApiError::BodyTimeout(format!(
                    "the body did not arrive within server.body_timeout_ms ({} ms); {} bytes came",
                    limits.timeout.as_millis(),
                    read.charged
                )));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(ApiError::BadRequest(format!(
                    "could not read the request body: {e}"
                )));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        if read.charged + data.len() > limit {
            return Err(too_large());
        }
        if !budget.take(data.len()) {
            return Err(ApiError::BodiesFull {
                retry_after_secs: limits.retry_after_secs,
            });
        }
        read.charged += data.len();
        if data.is_empty() {
            continue;
        }
        if first.is_none() && buf.is_empty() {
            first = Some(data);
            continue;
        }
        if let Some(earlier) = first.take() {
            buf.reserve(initial.max(earlier.len() + data.len()));
            buf.extend_from_slice(&earlier);
        }
        buf.extend_from_slice(&data);
    }
    read.bytes = first.unwrap_or_else(|| buf.freeze());
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{StreamExt as _, stream};
    use http_body_util::StreamBody;
    use hyper::body::Frame;

    fn limits(max_body_bytes: usize) -> BodyLimits {
        BodyLimits {
            max_body_bytes,
            timeout: Duration::from_secs(5),
            retry_after_secs: 1,
        }
    }

    #[tokio::test]
    async fn a_read_body_holds_its_bytes_in_the_budget_until_dropped() {
        let budget = BodyBudget::new(100);
        let body = read(
            &budget,
            limits(64),
            &HeaderMap::new(),
            Body::from("x".repeat(40)),
        )
        .await
        .unwrap();
        assert_eq!(body.len(), 40);
        assert_eq!(budget.held(), 40);
        // A second body of 70 does not fit beside it: refused, not grown.
        let refused = read(
            &budget,
            limits(80),
            &HeaderMap::new(),
            Body::from("y".repeat(70)),
        )
        .await;
        assert_eq!(refused.unwrap_err().code(), "bodies_full");
        assert_eq!(budget.held(), 40);
        drop(body);
        assert_eq!(budget.held(), 0);
    }

    /// One frame is kept as it came; several are joined in order, and the
    /// budget holds every byte of them either way.
    #[tokio::test]
    async fn a_body_in_several_frames_is_joined_in_order_and_charged_whole() {
        let budget = BodyBudget::new(1 << 20);
        let frames = ["{\"user_id\":", "", "\"u\",", "\"channel\":\"web\"}"];
        let chunked =
            StreamBody::new(stream::iter(frames.map(|f| {
                Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(f.as_bytes())))
            })));
        let body = read(&budget, limits(1024), &HeaderMap::new(), Body::new(chunked))
            .await
            .unwrap();
        assert_eq!(&body[..], frames.concat().as_bytes());
        assert_eq!(budget.held(), frames.concat().len());
        drop(body);
        assert_eq!(budget.held(), 0);

        let whole = Bytes::from_static(b"{\"user_id\":\"u\"}");
        let body = read(
            &budget,
            limits(1024),
            &HeaderMap::new(),
            Body::from(whole.clone()),
        )
        .await
        .unwrap();
        assert_eq!(body.bytes, whole);
        // The same bytes, not a copy of them.
        assert_eq!(body.bytes.as_ptr(), whole.as_ptr());
    }

    #[tokio::test]
    async fn over_the_body_limit_is_413_and_gives_back_what_it_took() {
        let budget = BodyBudget::new(1 << 20);
        let refused = read(
            &budget,
            limits(10),
            &HeaderMap::new(),
            Body::from("z".repeat(11)),
        )
        .await;
        assert_eq!(refused.unwrap_err().code(), "payload_too_large");
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_arriving_times_out_and_gives_back_what_it_took() {
        let budget = BodyBudget::new(1 << 20);
        let first = stream::iter(vec![Ok::<_, std::io::Error>(Frame::data(
            Bytes::from_static(b"{\"user_id\":"),
        ))]);
        let stalled = StreamBody::new(first.chain(stream::pending()));
        let refused = read(&budget, limits(1024), &HeaderMap::new(), Body::new(stalled)).await;
        let e = refused.unwrap_err();
        assert_eq!(e.code(), "body_timeout");
        assert_eq!(e.status(), axum::http::StatusCode::REQUEST_TIMEOUT);
        assert!(e.message().contains("11 bytes came"), "{}", e.message());
        assert_eq!(budget.held(), 0);
    }
}
