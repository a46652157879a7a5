//! HNSW-indexed ingest at 100k rows: the managed cluster's settings against
//! PostgreSQL's stock settings, same binaries, same rows, same run.
//!
//! `cargo bench --bench hnsw_ingest`. For each profile it starts a fresh
//! private cluster, loads `BENCH_PREFILL` chunk rows (100,000) without the
//! index, builds the index convstore creates (its definition is read back
//! from the database, so the bench measures what the daemon builds), and
//! then times `BENCH_ROWS` more rows (6,000) written through
//! `Store::write_batch` by `BENCH_WRITERS` concurrent batches (4, the
//! daemon's `pipeline.workers`): the daemon's own write path into an index
//! that already holds the prefill. Then recall@10 of `BENCH_QUERIES` (200)
//! queries against exact cosine top-10s computed here, at `hnsw.ef_search`
//! 40 (pgvector's default) and 200 (`search.ef_search`'s default).
//!
//! Profiles (`BENCH_PROFILES`, comma-separated; default all but
//! `managed-256MB`):
//! - `stock-1`: PostgreSQL's own defaults where convstore changes them
//!   (shared_buffers 128MB, maintenance_work_mem 64MB, wal_level replica,
//!   glibc's own malloc behaviour),
//!   one writer: a default-configured server fed by one COPY session, as
//!   `../shared/reference/postgres-bulk-insert.md` measured it;
//! - `stock`: the same server settings, `BENCH_WRITERS` writers (what the
//!   managed settings alone change);
//! - `managed-256MB`: the managed cluster with the fixed shared_buffers it
//!   had before `auto`;
//! - `managed-m16`: the managed cluster's settings with pgvector's default
//!   index (m 16, ef_construction 64), convstore's index before issue 22;
//! - `managed`: `DatabaseSettings::default()`, what `convstore serve` runs
//!   (m 8, ef_construction 100).
//!
//! Exploration knobs: `BENCH_MANAGED_SETTINGS="k=v;k=v"` added to the
//! managed profile's `database.managed_settings`, `BENCH_MANAGED_SHARED_BUFFERS`,
//! `BENCH_MANAGED_HNSW=m/ef_construction` (its index),
//! `BENCH_MANAGED_GLIBC_TUNABLES` (its malloc tunables, `""` = glibc's own),
//! `BENCH_DIMS` (768), `BENCH_VECTORS` (`clustered`, or `uniform`: see
//! `rows::Vectors`), `BENCH_BATCH` conversations per batch (64),
//! `BENCH_CHUNKS` per conversation (2), `BENCH_REPEAT` repetitions (3; the
//! profiles interleaved, medians reported).
// Test code: a panic on what the bench set up itself is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/cluster.rs"]
mod cluster;
#[path = "support/rows.rs"]
mod rows;

#[path = "support/knobs.rs"]
mod knobs;
use knobs::{env_usize, percentile};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use convstore_core::model::ChunkVector;
use convstore_core::model::ReadyConversation;
use convstore_store::Store;
use convstore_store::schema::HnswBuild;
use convstore_store::settings::DatabaseSettings;
use rows::{CpuMeter, Generator, Rng, Vectors, write_all};
use uuid::Uuid;

struct Params {
    prefill: usize,
    rows: usize,
    writers: usize,
    queries: usize,
    dims: usize,
    batch: usize,
    chunks: usize,
    clustered: bool,
}

struct Profile {
    name: &'static str,
    shared_buffers: String,
    settings: BTreeMap<String, String>,
    /// `database.managed_glibc_tunables` (`""` for the stock server).
    glibc_tunables: String,
    /// Concurrent writers (`None`: `BENCH_WRITERS`).
    writers: Option<usize>,
    /// How the index is built.
    hnsw: HnswBuild,
}

/// PostgreSQL 16's defaults for what the managed cluster sets on the
/// command line, so that only the binaries are ours.
fn stock_settings() -> BTreeMap<String, String> {
    [
        ("maintenance_work_mem", "64MB"),
        ("autovacuum_work_mem", "-1"),
        ("wal_level", "replica"),
        ("max_wal_senders", "10"),
        ("max_wal_size", "1GB"),
        ("checkpoint_timeout", "5min"),
        ("synchronous_commit", "on"),
        ("jit", "on"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// `BENCH_MANAGED_HNSW=m/ef_construction` for the `managed` profile.
fn managed_hnsw(defaults: HnswBuild) -> HnswBuild {
    std::env::var("BENCH_MANAGED_HNSW").map_or(defaults, |text| {
        let (m, ef) = text
            .split_once('/')
            .expect("BENCH_MANAGED_HNSW=m/ef_construction");
        HnswBuild {
            m: m.trim().parse().expect("m"),
            ef_construction: ef.trim().parse().expect("ef_construction"),
        }
    })
}

fn profiles() -> Vec<Profile> {
    let wanted = std::env::var("BENCH_PROFILES")
        .unwrap_or_else(|_| "stock-1,stock,managed-m16,managed".into());
    let defaults = DatabaseSettings::default();
    wanted
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|name| match name {
            "stock-1" => Profile {
                name: "stock-1",
                shared_buffers: "128MB".into(),
                settings: stock_settings(),
                glibc_tunables: String::new(),
                writers: Some(1),
                hnsw: HnswBuild::default(),
            },
            "stock" => Profile {
                name: "stock",
                shared_buffers: "128MB".into(),
                settings: stock_settings(),
                glibc_tunables: String::new(),
                writers: None,
                hnsw: HnswBuild::default(),
            },
            "managed-256MB" => Profile {
                name: "managed-256MB",
                shared_buffers: "256MB".into(),
                settings: defaults.managed_settings.clone(),
                glibc_tunables: defaults.managed_glibc_tunables.clone(),
                writers: None,
                hnsw: defaults.hnsw(),
            },
            "managed-m16" => Profile {
                name: "managed-m16",
                shared_buffers: defaults.managed_shared_buffers.clone(),
                settings: defaults.managed_settings.clone(),
                glibc_tunables: defaults.managed_glibc_tunables.clone(),
                writers: None,
                hnsw: HnswBuild::default(),
            },
            "managed" => {
                let mut settings = defaults.managed_settings.clone();
                if let Ok(extra) = std::env::var("BENCH_MANAGED_SETTINGS") {
                    for pair in extra.split(';').filter(|p| !p.trim().is_empty()) {
                        let (k, v) = pair
                            .split_once('=')
                            .expect("BENCH_MANAGED_SETTINGS: k=v;k=v");
                        settings.insert(k.trim().to_string(), v.trim().to_string());
                    }
                }
                Profile {
                    name: "managed",
                    shared_buffers: std::env::var("BENCH_MANAGED_SHARED_BUFFERS")
                        .unwrap_or_else(|_| defaults.managed_shared_buffers.clone()),
                    settings,
                    glibc_tunables: std::env::var("BENCH_MANAGED_GLIBC_TUNABLES")
                        .unwrap_or_else(|_| defaults.managed_glibc_tunables.clone()),
                    writers: None,
                    hnsw: managed_hnsw(defaults.hnsw()),
                }
            }
            other => panic!(
                "BENCH_PROFILES: unknown profile `{other}` (stock-1, stock, managed-256MB, managed-m16, managed)"
            ),
        })
        .collect()
}

/// A chunk row's key and vector, kept for the exact top-10s.
struct Stored {
    conversation_id: Uuid,
    seq: i32,
    vector: Arc<[f32]>,
}

fn keep(stored: &mut Vec<Stored>, batches: &[Vec<ReadyConversation>]) {
    for conversation in batches.iter().flatten() {
        for chunk in &conversation.chunks {
            if let ChunkVector::Embedded(v) = &chunk.vector {
                stored.push(Stored {
                    conversation_id: conversation.conversation.id,
                    seq: chunk.chunk.seq,
                    vector: v.clone(),
                });
            }
        }
    }
}

struct Outcome {
    name: &'static str,
    writers: usize,
    rows: usize,
    elapsed: Duration,
    server_cpu: Duration,
    index_mb: i64,
    recall: Vec<(u32, f64)>,
    /// Per `ef_search`: p50 and p99 of one search, ms (queries one after
    /// another on one connection, nothing else running).
    search_ms: Vec<(u32, f64, f64)>,
    settings: String,
}

impl Outcome {
    fn rate(&self) -> f64 {
        self.rows as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn server_us_per_row(&self) -> f64 {
        self.server_cpu.as_secs_f64() * 1e6 / self.rows.max(1) as f64
    }

    fn search_ms_at(&self, ef_search: u32) -> (f64, f64) {
        self.search_ms
            .iter()
            .find(|(e, _, _)| *e == ef_search)
            .map_or((0.0, 0.0), |&(_, p50, p99)| (p50, p99))
    }

    fn recall_at(&self, ef_search: u32) -> f64 {
        self.recall
            .iter()
            .find(|(e, _)| *e == ef_search)
            .map_or(0.0, |(_, r)| *r)
    }
}

async fn run_profile(profile: &Profile, p: &Params) -> Outcome {
    let writers = profile.writers.unwrap_or(p.writers);
    let cluster = cluster::TestCluster::start_with(|s| {
        s.database.managed_shared_buffers = profile.shared_buffers.clone();
        s.database.managed_settings = profile.settings.clone();
        s.database.managed_glibc_tunables = profile.glibc_tunables.clone();
        s.database.pool_size = std::num::NonZeroU32::new(writers as u32 + 2).unwrap();
    })
    .await;
    let cpu = CpuMeter::new(Some(cluster.cluster().data_dir().to_path_buf()));
    let store = Store::connect(&cluster.url(), writers as u32 + 2, Duration::from_secs(60))
        .await
        .expect("connect")
        .with_hnsw(profile.hnsw);
    store.migrate().await.expect("migrate");
    store.ensure_vector_column(p.dims).await.expect("index");
    let settings: String = sqlx::query_scalar(
        "SELECT string_agg(name || '=' || current_setting(name), ', ' ORDER BY name) \
         FROM pg_settings WHERE name IN ('shared_buffers', 'maintenance_work_mem', 'wal_level', \
         'max_wal_size', 'checkpoint_timeout', 'synchronous_commit', 'full_page_writes', \
         'wal_compression', 'effective_cache_size')",
    )
    .fetch_one(store.pool())
    .await
    .expect("settings");
    let index_def: String = sqlx::query_scalar(
        "SELECT pg_get_indexdef(to_regclass('conversation_chunks_embedding_hnsw_idx'))",
    )
    .fetch_one(store.pool())
    .await
    .expect("index definition");
    println!(
        "[{}] {settings}\n[{}] {index_def}",
        profile.name, profile.name
    );
    sqlx::query("DROP INDEX conversation_chunks_embedding_hnsw_idx")
        .execute(store.pool())
        .await
        .expect("drop index");

    // The same rows for every profile: the generator restarts per profile.
    let mut rng = Rng(0xc1_5eed);
    let vectors = if p.clustered {
        Vectors::clustered(&mut rng, p.dims, 200, 50)
    } else {
        Vectors::Uniform
    };
    let mut gen_ = Generator::new(0x5eed, p.dims, p.chunks, vectors);
    let mut stored = Vec::with_capacity(p.prefill + p.rows);
    let per_batch = p.batch * p.chunks;

    let started = Instant::now();
    let mut loaded = 0;
    while loaded < p.prefill {
        // A thousand batches at most in memory at a time.
        let n = (p.prefill - loaded).div_ceil(per_batch).min(100);
        let batches: Vec<_> = (0..n).map(|_| gen_.batch(p.batch)).collect();
        keep(&mut stored, &batches);
        let (rows, _) = write_all(&store, batches, 2).await;
        loaded += rows;
    }
    println!(
        "[{}] prefill: {loaded} rows without the index in {:.1}s",
        profile.name,
        started.elapsed().as_secs_f64()
    );

    // Built in one pass with room for the whole graph (setup, not measured;
    // the stock server would otherwise build for many minutes), then a
    // checkpoint so the measurement starts with nothing dirty.
    let started = Instant::now();
    {
        let mut conn = store.pool().acquire().await.expect("connection");
        sqlx::query("SET maintenance_work_mem = '2GB'")
            .execute(&mut *conn)
            .await
            .expect("set");
        sqlx::query(sqlx::AssertSqlSafe(index_def.clone()))
            .execute(&mut *conn)
            .await
            .expect("build index");
        sqlx::query("RESET maintenance_work_mem")
            .execute(&mut *conn)
            .await
            .expect("reset");
        sqlx::query("CHECKPOINT").execute(&mut *conn).await.ok();
    }
    println!(
        "[{}] index built in {:.1}s",
        profile.name,
        started.elapsed().as_secs_f64()
    );

    let batches: Vec<_> = (0..p.rows.div_ceil(per_batch))
        .map(|_| gen_.batch(p.batch))
        .collect();
    keep(&mut stored, &batches);
    let (server_before, _) = cpu.sample();
    let (rows, elapsed) = write_all(&store, batches, writers).await;
    let (server_after, _) = cpu.sample();
    let index_mb: i64 = sqlx::query_scalar(
        "SELECT pg_relation_size(to_regclass('conversation_chunks_embedding_hnsw_idx')) / 1048576",
    )
    .fetch_one(store.pool())
    .await
    .expect("index size");
    println!(
        "[{}] {rows} rows into the indexed table by {writers} writer(s) in {:.1}s = {:.0} rows/s",
        profile.name,
        elapsed.as_secs_f64(),
        rows as f64 / elapsed.as_secs_f64()
    );

    let queries: Vec<Vec<f32>> = (0..p.queries).map(|_| gen_.query_vector()).collect();
    let exact: Vec<Vec<(Uuid, i32)>> = queries.iter().map(|q| exact_top10(&stored, q)).collect();
    let mut recall = Vec::new();
    let mut search_ms = Vec::new();
    for ef in [40u32, 200] {
        let (r, p50, p99) = index_recall(&store, &queries, &exact, ef).await;
        recall.push((ef, r));
        search_ms.push((ef, p50, p99));
    }
    store.close().await;
    drop(cluster);
    Outcome {
        name: profile.name,
        writers,
        rows,
        elapsed,
        server_cpu: server_after.saturating_sub(server_before),
        index_mb,
        recall,
        search_ms,
        settings,
    }
}

fn exact_top10(stored: &[Stored], query: &[f32]) -> Vec<(Uuid, i32)> {
    let mut scored: Vec<(f32, usize)> = stored
        .iter()
        .enumerate()
        .map(|(i, s)| {
            (
                s.vector.iter().zip(query).map(|(a, b)| a * b).sum::<f32>(),
                i,
            )
        })
        .collect();
    scored.select_nth_unstable_by(9, |a, b| b.0.total_cmp(&a.0));
    scored[..10]
        .iter()
        .map(|&(_, i)| (stored[i].conversation_id, stored[i].seq))
        .collect()
}

async fn index_recall(
    store: &Store,
    queries: &[Vec<f32>],
    exact: &[Vec<(Uuid, i32)>],
    ef_search: u32,
) -> (f64, f64, f64) {
    let mut conn = store.pool().acquire().await.expect("connection");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SET hnsw.ef_search = {ef_search}"
    )))
    .execute(&mut *conn)
    .await
    .expect("ef_search");
    let sql = "SELECT conversation_id, seq FROM conversation_chunks \
               ORDER BY embedding <=> $1::text::vector LIMIT 10";
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN {sql}")))
        .bind(vector_text(&queries[0]))
        .fetch_all(&mut *conn)
        .await
        .expect("explain");
    assert!(
        plan.iter()
            .any(|l| l.contains("conversation_chunks_embedding_hnsw_idx")),
        "the query must read the index: {plan:?}"
    );
    let mut found = 0usize;
    let mut millis = Vec::with_capacity(queries.len());
    for (query, truth) in queries.iter().zip(exact) {
        let text = vector_text(query);
        let started = Instant::now();
        let rows: Vec<(Uuid, i32)> = sqlx::query_as(sql)
            .bind(text)
            .fetch_all(&mut *conn)
            .await
            .expect("search");
        millis.push(started.elapsed().as_secs_f64() * 1e3);
        found += rows.iter().filter(|r| truth.contains(r)).count();
    }
    millis.sort_by(f64::total_cmp);
    (
        found as f64 / (queries.len() * 10).max(1) as f64,
        percentile(&millis, 0.5),
        percentile(&millis, 0.99),
    )
}

fn vector_text(v: &[f32]) -> String {
    let parts: Vec<String> = v.iter().map(|x| x.to_string()).collect();
    format!("[{}]", parts.join(","))
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this
    // binary without it: no measurement then, it takes minutes.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let p = Params {
        prefill: env_usize("BENCH_PREFILL", 100_000),
        rows: env_usize("BENCH_ROWS", 6_000),
        writers: env_usize("BENCH_WRITERS", 4),
        queries: env_usize("BENCH_QUERIES", 200),
        dims: env_usize("BENCH_DIMS", 768),
        batch: env_usize("BENCH_BATCH", 64),
        chunks: env_usize("BENCH_CHUNKS", 2),
        clustered: std::env::var("BENCH_VECTORS").map_or(true, |v| v != "uniform"),
    };
    println!(
        "{} rows prefilled, {} timed by {} writers, {} dims ({} vectors), {} conversations x {} chunks per batch",
        p.prefill,
        p.rows,
        p.writers,
        p.dims,
        if p.clustered { "clustered" } else { "uniform" },
        p.batch,
        p.chunks
    );
    // Repetitions interleave the profiles, so that a slow spell of the
    // machine falls on all of them rather than on one.
    let repeat = env_usize("BENCH_REPEAT", 3);
    let profiles = profiles();
    let mut runs: Vec<Vec<Outcome>> = profiles.iter().map(|_| Vec::new()).collect();
    for rep in 1..=repeat {
        for (i, profile) in profiles.iter().enumerate() {
            println!("== repetition {rep}/{repeat}: {}", profile.name);
            runs[i].push(run_profile(profile, &p).await);
        }
    }
    println!("\nEach run (rows/s, recall@10 at ef_search 40 / 200):");
    for outcomes in &runs {
        for o in outcomes {
            let (p50, p99) = o.search_ms_at(200);
            println!(
                "  {}: {:.0} rows/s, {:.0} µs server CPU/row, recall {:.3} / {:.3}, search at ef_search 200 p50 {p50:.1} ms p99 {p99:.1} ms",
                o.name,
                o.rate(),
                o.server_us_per_row(),
                o.recall_at(40),
                o.recall_at(200)
            );
        }
    }
    let medians: Vec<Median> = runs.iter().map(|o| Median::of(o)).collect();
    let rate_of = |name: &str| medians.iter().find(|m| m.name == name).map(|m| m.rate);
    let (base_one, base) = (rate_of("stock-1"), rate_of("stock"));
    println!(
        "\nMedians of {repeat}:\n\n| profile | writers | rows/s into the indexed table (min–max) | × stock-1 | × stock | server CPU µs/row | index MB | recall@10 ef_search 40 | recall@10 ef_search 200 | search p50 / p99 at 200 |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for m in &medians {
        let ratio_to = |b: Option<f64>| b.map_or("-".to_string(), |b| format!("{:.2}", m.rate / b));
        println!(
            "| {} | {} | {:.0} ({:.0}–{:.0}) | {} | {} | {:.0} | {} | {:.3} | {:.3} | {:.1} / {:.1} ms |",
            m.name,
            m.writers,
            m.rate,
            m.min_rate,
            m.max_rate,
            ratio_to(base_one),
            ratio_to(base),
            m.server_us_per_row,
            m.index_mb,
            m.recall_40,
            m.recall_200,
            m.search_p50,
            m.search_p99
        );
    }
    for outcomes in &runs {
        if let Some(o) = outcomes.first() {
            println!("{}: {}", o.name, o.settings);
        }
    }
}

/// One profile's repetitions, summarised.
struct Median {
    name: &'static str,
    writers: usize,
    rate: f64,
    min_rate: f64,
    max_rate: f64,
    server_us_per_row: f64,
    index_mb: i64,
    recall_40: f64,
    recall_200: f64,
    search_p50: f64,
    search_p99: f64,
}

impl Median {
    fn of(outcomes: &[Outcome]) -> Median {
        let median = |mut values: Vec<f64>| {
            values.sort_by(f64::total_cmp);
            percentile(&values, 0.5)
        };
        let rates: Vec<f64> = outcomes.iter().map(Outcome::rate).collect();
        Median {
            name: outcomes.first().map_or("?", |o| o.name),
            writers: outcomes.first().map_or(0, |o| o.writers),
            rate: median(rates.clone()),
            min_rate: rates.iter().copied().fold(f64::INFINITY, f64::min),
            max_rate: rates.iter().copied().fold(0.0, f64::max),
            server_us_per_row: median(outcomes.iter().map(Outcome::server_us_per_row).collect()),
            index_mb: outcomes.first().map_or(0, |o| o.index_mb),
            recall_40: median(outcomes.iter().map(|o| o.recall_at(40)).collect()),
            recall_200: median(outcomes.iter().map(|o| o.recall_at(200)).collect()),
            search_p50: median(outcomes.iter().map(|o| o.search_ms_at(200).0).collect()),
            search_p99: median(outcomes.iter().map(|o| o.search_ms_at(200).1).collect()),
        }
    }
}
