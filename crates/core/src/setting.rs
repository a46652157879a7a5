//! What each crate's settings say when a value cannot be used; the
//! daemon's configuration turns it into its error with the key at fault.

/// A setting that cannot be used: its full key and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidSetting {
    pub key: String,
    pub reason: String,
}

impl InvalidSetting {
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            reason: reason.into(),
        }
    }
}
