//! What is wrong with a request body, independent of any transport. The
//! HTTP layer maps each variant to a status code in one `From`.

/// A body (or one item of a batch) that cannot be accepted, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// The body is not JSON (or not NDJSON).
    #[error("{0}")]
    InvalidJson(String),
    /// A field is missing or wrong; `field` names it (`messages[3].content`).
    #[error("{message}")]
    InvalidField { field: String, message: String },
    /// Anything else about the request (an empty batch…).
    #[error("{0}")]
    BadRequest(String),
    /// Over a size bound (a batch with too many items…).
    #[error("{0}")]
    PayloadTooLarge(String),
}

impl InputError {
    pub fn invalid_json(message: impl Into<String>) -> Self {
        Self::InvalidJson(message.into())
    }

    /// The message is prefixed with the field's name unless it already
    /// starts with it, so it reads on its own in a log line.
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

    /// The stable error code the API answers with (`invalid_json`…).
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidJson(_) => "invalid_json",
            Self::InvalidField { .. } => "invalid_field",
            Self::BadRequest(_) => "bad_request",
            Self::PayloadTooLarge(_) => "payload_too_large",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Self::InvalidJson(m) | Self::BadRequest(m) | Self::PayloadTooLarge(m) => m.clone(),
            Self::InvalidField { message, .. } => message.clone(),
        }
    }

    /// The field at fault, for [`InputError::InvalidField`].
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::InvalidField { field, .. } => Some(field),
            _ => None,
        }
    }
}
