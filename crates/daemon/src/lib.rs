//! convstore: a daemon that stores chat conversations, with embeddings, in
//! PostgreSQL/pgvector. This crate is the wiring: configuration, the
//! pipeline, the HTTP API, start-up and shutdown, systemd, and the CLI.
//! ARCHITECTURE.md (at the repository root) maps it and the crates below
//! it.
//!
//! The flow, one module per stage:
//! [`http`] (HTTP on TCP and a Unix socket; validation is in
//! `convstore_core`) → the journal (`convstore_journal`, optional durable
//! intake, replayed after a crash by [`journal_startup`]) →
//! [`queue`] (bounded by count and bytes, carrying a [`ticket`] each) →
//! [`pipeline`] (batcher, worker pool; chunking is in `convstore_core`) →
//! `convstore_embed` (backends behind the `Embedder` trait, router, LRU
//! cache) → `convstore_store` (all SQL: one transaction per batch,
//! migrations, the managed cluster).
//! [`app`] wires the stages together and owns start-up and shutdown.
//! [`retention_task`] deletes what is past `[retention]`.
//! [`systemd`] speaks to the service manager (notify, watchdog, socket
//! activation, reload).

pub mod admission;
pub mod app;
pub mod cli;
pub mod config;
pub mod http;
pub mod journal_replay;
pub mod journal_startup;
pub mod model_task;
pub mod pipeline;
pub mod queue;
pub mod retention_task;
pub mod runtimes;
pub mod stamp;
pub mod systemd;
pub mod telemetry_task;
pub mod ticket;
pub mod unix_ids;
