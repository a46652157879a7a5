//! The API's one error type, mapped to an HTTP status in exactly one place.
//!
//! Body: `{"error": {"code", "message", "field"?}}`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
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
    /// 503: shutting down or not ready.
    Unavailable(String),
    /// 500: a bug or an internal failure; the message is safe to show.
    Internal(String),
}

impl ApiError {
    pub fn invalid_json(message: impl Into<String>) -> Self {
        Self::InvalidJson(message.into())
    }

    pub fn invalid_field(field: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        let message = if field.is_empty() || message.starts_with(field) {
            message
        } else {
            format!("{field}: {message}")
        };
        Self::InvalidField {
            field: field.to_string(),
            message,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidJson(_) | Self::InvalidField { .. } | Self::BadRequest(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
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
            Self::QueueFull { .. } => "queue_full",
            Self::Unavailable(_) => "unavailable",
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
            | Self::Internal(m) => m.clone(),
            Self::InvalidField { message, .. } => message.clone(),
            Self::QueueFull { retry_after_secs } => {
                format!("the queue is full; retry after {retry_after_secs} s")
            }
        }
    }

    pub fn field(&self) -> Option<&str> {
        match self {
            Self::InvalidField { field, .. } => Some(field),
            _ => None,
        }
    }

    /// The `{"code","message","field"?}` object, also used per batch item.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            code: self.code(),
            message: self.message(),
            field: self.field().map(str::to_string),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody {
    pub code: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

#[derive(Serialize)]
struct ErrorEnvelope {
    error: ErrorBody,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status(),
            axum::Json(ErrorEnvelope { error: self.body() }),
        )
            .into_response();
        if let Self::QueueFull { retry_after_secs } = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        response
    }
}
