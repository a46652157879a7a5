//! The API's one error type, mapped to an HTTP status in exactly one place.
//!
//! Body: `{"error": {"code", "message", "field"?}}`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use convstore_core::InputError;
use convstore_store::StoreError;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// 400: the body is not JSON (or not NDJSON).
    InvalidJson(String),
    /// 400: a field is missing or wrong.
    InvalidField { field: String, message: String },
    /// 400: anything else about the request (query parameters…).
    BadRequest(String),
    /// 404.
    NotFound(String),
    /// 413: over `server.max_body_bytes`, or larger than the queue can hold.
    PayloadTooLarge(String),
    /// 415: not `application/json` (or NDJSON where allowed).
    UnsupportedMediaType(String),
    /// 429: the queue is full; retry after this many seconds.
    QueueFull { retry_after_secs: u32 },
    /// 429: the journal holds `journal.max_bytes`; retry after this many seconds.
    JournalFull { retry_after_secs: u32 },
    /// 429: this token's rate limit; retry after this many seconds.
    RateLimited { retry_after_secs: u32 },
    /// 401: no bearer token, or not a known one.
    Unauthorized(String),
    /// 403: a known token without the scope the request needs; the message
    /// names both.
    Forbidden(String),
    /// The conversation was accepted (it has an id) but the level the
    /// request waited for was not reached: 504 (still in flight, poll by
    /// id), 503 (not stored by shutdown) or 500 (lost or refused).
    Unfinished {
        id: String,
        status: StatusCode,
        code: &'static str,
        message: String,
    },
    /// 503: the journal cannot write now (disk full); it takes
    /// conversations again by itself once there is room, so the answer
    /// carries `Retry-After` like a 429: a refusal, nothing is lost.
    JournalUnwritable {
        reason: String,
        retry_after_secs: u32,
    },
    /// 503: shutting down or not ready.
    Unavailable(String),
    /// 408: the body did not arrive within `server.body_timeout_ms`.
    BodyTimeout(String),
    /// 503: request bodies being read hold `server.max_buffered_body_bytes`;
    /// retry after this many seconds.
    BodiesFull { retry_after_secs: u32 },
    /// 500: a bug or an internal failure; the message is safe to show.
    Internal(String),
}

impl ApiError {
    pub fn invalid_json(message: impl Into<String>) -> Self {
        InputError::invalid_json(message).into()
    }

    pub fn invalid_field(field: &str, message: impl Into<String>) -> Self {
        InputError::invalid_field(field, message).into()
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidJson(_) | Self::InvalidField { .. } | Self::BadRequest(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::QueueFull { .. } | Self::JournalFull { .. } | Self::RateLimited { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Unfinished { status, .. } => *status,
            Self::Unavailable(_) | Self::JournalUnwritable { .. } | Self::BodiesFull { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidJson(_) => "invalid_json",
            Self::InvalidField { .. } => "invalid_field",
            Self::BadRequest(_) => "bad_request",
            Self::NotFound(_) => "not_found",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            // The word /v1/stats counts as refused for a full queue.
            Self::QueueFull { .. } => convstore_telemetry::events::outcome::QUEUE_FULL,
            Self::JournalFull { .. } => "journal_full",
            Self::RateLimited { .. } => "rate_limited",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::Unfinished { code, .. } => code,
            Self::JournalUnwritable { .. } => "journal_unwritable",
            Self::Unavailable(_) => "unavailable",
            Self::BodyTimeout(_) => "body_timeout",
            Self::BodiesFull { .. } => "bodies_full",
            Self::Internal(_) => "internal",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Self::InvalidJson(m)
            | Self::BadRequest(m)
            | Self::NotFound(m)
            | Self::PayloadTooLarge(m)
            | Self::UnsupportedMediaType(m)
            | Self::Unavailable(m)
            | Self::BodyTimeout(m)
            | Self::Internal(m)
            | Self::Unauthorized(m)
            | Self::Forbidden(m) => m.clone(),
            Self::InvalidField { message, .. } | Self::Unfinished { message, .. } => {
                message.clone()
            }
            Self::JournalFull { retry_after_secs } => {
                format!("the journal is full (journal.max_bytes); retry after {retry_after_secs} s")
            }
            Self::RateLimited { retry_after_secs } => {
                format!("this token's rate limit is reached; retry after {retry_after_secs} s")
            }
            Self::JournalUnwritable {
                reason,
                retry_after_secs,
            } => format!(
                "the journal cannot write ({reason}); the conversation was not accepted, retry after {retry_after_secs} s"
            ),
            Self::QueueFull { retry_after_secs } => {
                format!("the queue is full; retry after {retry_after_secs} s")
            }
            Self::BodiesFull { retry_after_secs } => format!(
                "request bodies being read hold server.max_buffered_body_bytes; retry after {retry_after_secs} s"
            ),
        }
    }

    pub fn field(&self) -> Option<&str> {
        match self {
            Self::InvalidField { field, .. } => Some(field),
            _ => None,
        }
    }

    /// The id of an accepted conversation the error is about.
    pub fn id(&self) -> Option<&str> {
        match self {
            Self::Unfinished { id, .. } => Some(id),
            _ => None,
        }
    }

    /// Seconds a 429 (or a 503 that passes by itself) asks the client to wait.
    pub fn retry_after(&self) -> Option<u32> {
        match self {
            Self::QueueFull { retry_after_secs }
            | Self::JournalFull { retry_after_secs }
            | Self::RateLimited { retry_after_secs }
            | Self::BodiesFull { retry_after_secs }
            | Self::JournalUnwritable {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            _ => None,
        }
    }

    /// The `{"code","message","field"?,"id"?}` object, also used per batch item.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            code: self.code(),
            message: self.message(),
            field: self.field().map(str::to_string),
            id: self.id().map(str::to_string),
        }
    }
}

/// What went wrong: a stable `code`, a message for people, the `field` at
/// fault (400) and the `id` of an accepted conversation (504 and others
/// after acceptance).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub code: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The accepted conversation's id, when the request waited for it and
    /// the wait ended early (504): poll `GET /v1/conversations/{id}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// Every error answer: `{"error": {...}}`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorEnvelope {
    error: ErrorBody,
}

/// A body the core refused: always a 4xx naming what is wrong.
impl From<InputError> for ApiError {
    fn from(e: InputError) -> Self {
        match e {
            InputError::InvalidJson(m) => Self::InvalidJson(m),
            InputError::InvalidField { field, message } => Self::InvalidField { field, message },
            InputError::BadRequest(m) => Self::BadRequest(m),
            InputError::PayloadTooLarge(m) => Self::PayloadTooLarge(m),
        }
    }
}

/// A database failure while serving a request: 503 when the same request
/// can succeed later (the database is unreachable, restarting or busy), 500
/// otherwise, logged: a query or schema problem an operator must see.
impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if e.is_retryable() {
            Self::Unavailable(format!("{e}; try again"))
        } else {
            tracing::error!(error = %e, "A request failed in the database");
            Self::Internal(e.to_string())
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status(),
            axum::Json(ErrorEnvelope { error: self.body() }),
        )
            .into_response();
        if let Some(retry_after_secs) = self.retry_after() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        // The rest of a body that timed out is not worth reading: close.
        if matches!(self, Self::BodyTimeout(_)) {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if matches!(self, Self::Unauthorized(_)) {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"convstore\""),
            );
        }
        response
    }
}
