//! convstore's core: what a conversation is, how a request body becomes
//! one (or says which field is wrong), how it is cut into chunks, how a
//! journal record is framed, how retries back off, and how a duration is
//! written in the configuration.
//!
//! A leaf crate: no async runtime, no database, no HTTP, no model. The
//! fuzz target builds on it alone.

pub mod backoff;
pub mod batch_body;
pub mod chunker;
pub mod duration;
pub mod error;
pub mod fuzzing;
pub mod journal;
pub mod lifecycle;
pub mod model;
pub mod nonzero;
pub mod setting;
pub mod strict_json;
pub mod validate;

pub use error::InputError;
