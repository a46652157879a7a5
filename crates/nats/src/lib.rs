//! The shared durable intake on NATS JetStream (docs/SCALING.md).
//!
//! Every instance publishes the changes it accepts to one stream (work-queue
//! retention: a message is gone once acknowledged) and its workers pull
//! from one durable consumer that all instances share. A pulled change is
//! acknowledged only after the transaction that applied it commits; until
//! then JetStream delivers it again (after `ack_wait`, or at once after a
//! worker's `nak`), so nothing acknowledged to a client is lost with an
//! instance, and a redelivery is absorbed by the store's version checks.
//!
//! The payload is the journal's entry codec (`convstore_core::journal::entry`):
//! the stream is this mode's journal.
//!
//! - [`SharedIntake`] connects, creates (or checks) the stream and the
//!   consumer, publishes, looks up what a conversation has in the stream,
//!   and pulls.
//! - [`Pulled`] is one pulled change with its acknowledgement handle.
//! - [`replies`]: the outcome of a change, sent back to the instance that
//!   accepted it when its client waits for `stored`.

pub mod replies;
pub mod settings;
mod shared;
mod subject;

pub use shared::{
    ConsumerState, IntakeError, PendingPublish, PublishError, Published, PullBatch, Pulled,
    SharedIntake, StreamHead,
};
pub use subject::subject_for;
