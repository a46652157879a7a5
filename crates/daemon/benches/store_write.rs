//! COPY vs UNNEST for chunk rows, measured through `Store::write_batch`
//! (one transaction per batch, conversations + chunks), with and without
//! the HNSW index.
//!
//! `cargo bench --bench store_write`. By default it starts a private managed
//! PostgreSQL (shared_buffers 256MB, the managed default) in a temp
//! directory; `CONVSTORE_BENCH_DATABASE_URL` points it at a server instead
//! (it creates and drops its own databases there).
//!
//! The two methods write alternating blocks into the *same* table, so both
//! see the same index size and the same background noise: HNSW insert cost
//! grows with the graph, and a method measured second on a bigger index
//! would look slower for no fault of its own.
//!
//! Knobs (environment): `BENCH_ROWS` chunk rows per method with the index
//! (6000), `BENCH_ROWS_NO_INDEX` (20000), `BENCH_DIMS` (768),
//! `BENCH_BATCH` conversations per batch (64), `BENCH_CHUNKS` chunks per
//! conversation (2), `BENCH_BLOCK` batches per alternating block (4),
//! `BENCH_WRITERS` concurrent batches (1), `BENCH_PREFILL` rows loaded
//! by COPY before the HNSW index is built and the measurement starts (0),
//! `BENCH_NO_FK` (set: drop the chunks' foreign key, to see its cost).
// Test code: a panic on what the test set up itself is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/cluster.rs"]
mod cluster;
#[path = "support/rows.rs"]
mod rows;

use std::time::{Duration, Instant};

use convstore::config::WriteMethod;
use convstore_store::Store;
use rows::{CpuMeter, Generator, Vectors, with_database, write_all};

struct Params {
    rows: usize,
    rows_no_index: usize,
    dims: usize,
    batch: usize,
    chunks: usize,
    block: usize,
    writers: usize,
    prefill: usize,
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0 || name == "BENCH_PREFILL")
        .unwrap_or(default)
}

#[derive(Default)]
struct Tally {
    rows: usize,
    elapsed: Duration,
    /// CPU time of all server processes while this method wrote (managed
    /// cluster only): robust against other load on the machine, unlike
    /// wall time.
    server_cpu: Duration,
    /// CPU time of this process (encoding, validation, sqlx).
    client_cpu: Duration,
}

impl Tally {
    fn rate(&self) -> f64 {
        self.rows as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn server_us_per_row(&self) -> f64 {
        self.server_cpu.as_secs_f64() * 1e6 / self.rows.max(1) as f64
    }

    fn client_us_per_row(&self) -> f64 {
        self.client_cpu.as_secs_f64() * 1e6 / self.rows.max(1) as f64
    }
}

/// Alternates blocks of `block` batches between the methods until each has
/// written `rows` chunk rows; prints the running rates.
async fn alternate(
    copy: &Store,
    unnest: &Store,
    gen_: &mut Generator,
    p: &Params,
    rows: usize,
    label: &str,
    cpu: &CpuMeter,
) -> (Tally, Tally) {
    let mut tallies = (Tally::default(), Tally::default());
    let rows_per_block = p.block * p.batch * p.chunks;
    let blocks = rows.div_ceil(rows_per_block);
    for b in 0..blocks {
        // Swap who goes first each block, so neither always meets the
        // slightly bigger index.
        let order = if b.is_multiple_of(2) { [0, 1] } else { [1, 0] };
        for which in order {
            let batches: Vec<_> = (0..p.block).map(|_| gen_.batch(p.batch)).collect();
            let store = if which == 0 { copy } else { unnest };
            let (server_before, client_before) = cpu.sample();
            let (n, elapsed) = write_all(store, batches, p.writers).await;
            let (server_after, client_after) = cpu.sample();
            let t = if which == 0 {
                &mut tallies.0
            } else {
                &mut tallies.1
            };
            t.rows += n;
            t.elapsed += elapsed;
            t.server_cpu += server_after.saturating_sub(server_before);
            t.client_cpu += client_after.saturating_sub(client_before);
        }
        if (b + 1).is_multiple_of(5) || b + 1 == blocks {
            println!(
                "  {label}: {:>6} rows per method so far — COPY {:>8.0} rows/s ({:.0} µs server CPU/row), \
                 UNNEST {:>8.0} rows/s ({:.0} µs server CPU/row)",
                tallies.0.rows,
                tallies.0.rate(),
                tallies.0.server_us_per_row(),
                tallies.1.rate(),
                tallies.1.server_us_per_row()
            );
        }
    }
    (tallies.0, tallies.1)
}

async fn table_rows(store: &Store) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM conversation_chunks")
        .fetch_one(store.pool())
        .await
        .expect("count")
}

async fn fresh_database(admin: &Store, base_url: &str, name: &str) -> String {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name}"
    )))
    .execute(admin.pool())
    .await
    .expect("drop database");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(admin.pool())
        .await
        .expect("create database");
    with_database(base_url, name)
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this
    // binary without it (and `--list` to enumerate): no measurement then,
    // it takes minutes.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let p = Params {
        rows: env_usize("BENCH_ROWS", 6000),
        rows_no_index: env_usize("BENCH_ROWS_NO_INDEX", 20_000),
        dims: env_usize("BENCH_DIMS", 768),
        batch: env_usize("BENCH_BATCH", 64),
        chunks: env_usize("BENCH_CHUNKS", 2),
        block: env_usize("BENCH_BLOCK", 4),
        writers: env_usize("BENCH_WRITERS", 1),
        prefill: env_usize("BENCH_PREFILL", 0),
    };

    let external = std::env::var("CONVSTORE_BENCH_DATABASE_URL").ok();
    let _cluster;
    let (base_url, cpu) = match external {
        Some(url) => (url, CpuMeter::new(None)),
        None => {
            let c = cluster::TestCluster::start_with(|s| {
                s.database.managed_shared_buffers = "256MB".into();
            })
            .await;
            let url = c.url();
            let cpu = CpuMeter::new(Some(c.cluster().data_dir().to_path_buf()));
            _cluster = c;
            (url, cpu)
        }
    };
    let admin = Store::connect(&base_url, 1, Duration::from_secs(60))
        .await
        .expect("connect");
    let version: String = sqlx::query_scalar(
        "SELECT current_setting('server_version') || ', pgvector ' || \
         coalesce((SELECT extversion FROM pg_extension WHERE extname = 'vector'), '?') || \
         ', shared_buffers ' || current_setting('shared_buffers')",
    )
    .fetch_one(admin.pool())
    .await
    .expect("version");
    println!(
        "PostgreSQL {version}; {} dims, {} conversations x {} chunks per batch ({} rows), {} writer(s)",
        p.dims,
        p.batch,
        p.chunks,
        p.batch * p.chunks,
        p.writers
    );

    let mut gen_ = Generator::new(0x5eed, p.dims, p.chunks, Vectors::Uniform);

    // The two methods share one database (one table) per phase.
    for (phase, with_index, rows) in [
        ("no index", false, p.rows_no_index),
        ("HNSW index", true, p.rows),
    ] {
        let url = fresh_database(&admin, &base_url, "convstore_bench").await;
        let copy = Store::connect(&url, p.writers as u32 + 1, Duration::from_secs(60))
            .await
            .expect("connect")
            .with_write_method(WriteMethod::Copy);
        copy.migrate().await.expect("migrate");
        // The column gets its dimension; the index comes after the prefill
        // (the fast way to load a big table, and what users of a fresh
        // install with an existing archive would do).
        copy.ensure_vector_column(p.dims)
            .await
            .expect("vector column");
        sqlx::query("DROP INDEX conversation_chunks_embedding_hnsw_idx")
            .execute(copy.pool())
            .await
            .expect("drop index");
        if std::env::var_os("BENCH_NO_FK").is_some() {
            // To see what the per-row foreign-key check costs.
            sqlx::query(
                "ALTER TABLE conversation_chunks \
                 DROP CONSTRAINT conversation_chunks_conversation_id_fkey",
            )
            .execute(copy.pool())
            .await
            .expect("drop foreign key");
        }
        let unnest = copy.clone().with_write_method(WriteMethod::Unnest);
        if with_index && p.prefill > 0 {
            let batches: Vec<_> = (0..p.prefill.div_ceil(p.batch * p.chunks))
                .map(|_| gen_.batch(p.batch))
                .collect();
            let (n, elapsed) = write_all(&copy, batches, p.writers.max(2)).await;
            println!(
                "  prefill without index: {n} rows in {:.1}s ({:.0} rows/s)",
                elapsed.as_secs_f64(),
                n as f64 / elapsed.as_secs_f64()
            );
        }
        if with_index {
            let started = Instant::now();
            copy.ensure_vector_column(p.dims)
                .await
                .expect("build index");
            println!(
                "  HNSW index built in {:.1}s",
                started.elapsed().as_secs_f64()
            );
        }
        let start_rows = table_rows(&copy).await;
        println!("{phase}: table starts with {start_rows} chunk rows");
        let (c, u) = alternate(&copy, &unnest, &mut gen_, &p, rows, phase, &cpu).await;
        let end_rows = table_rows(&copy).await;
        let index_mb: Option<i64> = sqlx::query_scalar(
            "SELECT pg_relation_size(to_regclass('conversation_chunks_embedding_hnsw_idx')) / 1048576",
        )
        .fetch_one(copy.pool())
        .await
        .expect("index size");
        println!(
            "RESULT {phase}: rows {start_rows} -> {end_rows}; index {} MB\n  \
             COPY   {} rows in {:.1}s = {:.0} rows/s; server CPU {:.0} µs/row, client CPU {:.1} µs/row\n  \
             UNNEST {} rows in {:.1}s = {:.0} rows/s; server CPU {:.0} µs/row, client CPU {:.1} µs/row\n  \
             COPY/UNNEST throughput = {:.2}",
            index_mb.unwrap_or(0),
            c.rows,
            c.elapsed.as_secs_f64(),
            c.rate(),
            c.server_us_per_row(),
            c.client_us_per_row(),
            u.rows,
            u.elapsed.as_secs_f64(),
            u.rate(),
            u.server_us_per_row(),
            u.client_us_per_row(),
            c.rate() / u.rate().max(1e-9)
        );
        copy.close().await;
    }
    sqlx::query("DROP DATABASE IF EXISTS convstore_bench")
        .execute(admin.pool())
        .await
        .expect("drop database");
    admin.close().await;
}
