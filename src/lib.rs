//! convstore: a daemon that stores chat conversations, with embeddings, in
//! PostgreSQL/pgvector.
//!
//! The flow, one module per stage:
//! [`ingress`] (HTTP on TCP and a Unix socket, validation) →
//! [`journal`] (optional durable intake, replayed after a crash) →
//! [`queue`] (bounded by count and bytes) →
//! [`pipeline`] (batcher, worker pool, chunker) →
//! [`embed`] (backends behind the `Embedder` trait, LRU cache) →
//! [`store`] (migrations, one transaction per batch, managed cluster).
//! [`server`] wires the stages together and owns start-up and shutdown.
//! [`systemd`] speaks to the service manager (notify, watchdog, socket
//! activation, reload).

pub mod backoff;
pub mod cli;
pub mod config;
pub mod dataset;
pub mod embed;
pub mod ingress;
pub mod journal;
pub mod model;
pub mod pipeline;
pub mod queue;
pub mod server;
pub mod standin;
pub mod store;
pub mod systemd;
pub mod telemetry;
