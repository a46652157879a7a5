//! Search modes side by side, and changing the model (issue 20), on the
//! real daemon (release build) with its managed PostgreSQL:
//!
//! 1. **quality**: the builtin all-MiniLM-L6-v2 (the zero-set-up default,
//!    no `[embedding]` section) embeds the shared sample (else generated
//!    conversations); a labelled query set is built from the same data
//!    (`labels` below): *topic* queries, worded without the words that
//!    label the topic ("a plane ticket to Chicago" for conversations that
//!    mention a flight), and *entity* queries, a name that occurs in one to
//!    three conversations ("Chris Webby"). recall@10 (relevant results in
//!    the top 10 / min(10, relevant)) per mode and query class.
//! 2. **latency**: `BENCH_CONVERSATIONS` conversations (100,000 when
//!    measuring: the sample's texts made unique, 1,000 users) embedded by the
//!    stand-in at zero latency; 200 queries (first user messages) per mode,
//!    k = 10, one at a time over HTTP, client-side p50 / p95 / p99.
//! 3. **migration**: on that database, a restart with another model and
//!    dimension (the stand-in serves all of them): chunks re-embedded per
//!    second until search switched, searches answered meanwhile; then
//!    another change while an ingest driver posts conversations at
//!    `BENCH_INGEST_RATE` per second throughout.
//!
//! `cargo bench --bench search_modes` (under `cargo test --all-targets`, a
//! smoke run on a few hundred conversations). Knobs (environment):
//! `BENCH_CONVERSATIONS` (100000), `BENCH_QUALITY` (conversations of phase
//! 1; all of the sample), `BENCH_QUERIES` (200), `BENCH_INGEST_RATE` (50),
//! `BENCH_PHASES` (`quality,latency,migration`).
// Test code: a panic on what the bench set up itself is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "support/knobs.rs"]
mod knobs;
use knobs::{env_usize, percentile};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use sqlx::PgPool;
use support::daemon::{Daemon, Standin, Workspace, connect_db};
use support::labels::{K, MODES, id_of, labels, measure, render};

/// The stand-in's models for phases 2 and 3: name and dimension.
const MODEL_A: (&str, usize) = ("bench-model-a", 384);
const MODEL_B: (&str, usize) = ("bench-model-b", 256);
const MODEL_C: (&str, usize) = ("bench-model-c", 384);

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this
    // binary without it: a small smoke run then keeps the bench working.
    let measuring = std::env::args().any(|a| a == "--bench");
    let phases =
        std::env::var("BENCH_PHASES").unwrap_or_else(|_| "quality,latency,migration".into());
    let data = convstore_dataset::sample_or_generated(4000).unwrap();
    let source = if convstore_dataset::sample_path().is_some() {
        "the shared sample"
    } else {
        "generated conversations"
    };
    if phases.contains("quality") {
        let n = env_usize("BENCH_QUALITY", if measuring { data.len() } else { 150 });
        quality(&data[..n.min(data.len())], source).await;
    }
    if phases.contains("latency") || phases.contains("migration") {
        let n = env_usize("BENCH_CONVERSATIONS", if measuring { 100_000 } else { 300 });
        let queries = env_usize("BENCH_QUERIES", if measuring { 200 } else { 10 });
        let rate = env_usize("BENCH_INGEST_RATE", 50);
        latency_and_migration(&data, source, n, queries, rate, &phases).await;
    }
}

// ---------------------------------------------------------------- phase 1

async fn quality(data: &[Value], source: &str) {
    support::cluster::require_setup();
    let ws = Workspace::new();
    let http_addr = ws.write_default_config("[backfill]\ninterval_ms = 500\n");
    let mut daemon = Daemon::start(&ws, &http_addr).await;
    let base = daemon.base_url();
    let http = reqwest::Client::new();
    let db = connect_db(&ws.database_url()).await;
    let started = Instant::now();
    load(&http, &base, data.to_vec()).await;
    wait_embedded(&db, data.len()).await;
    println!(
        "search_modes quality: {} conversations of {source}, builtin all-MiniLM-L6-v2, loaded and embedded in {:.1} s",
        data.len(),
        started.elapsed().as_secs_f64()
    );
    let labelled = labels(data);
    let table = measure(&http, &base, &labelled).await;
    print!("{}", render(&table));
    daemon.terminate(Duration::from_secs(60));
}

// ------------------------------------------------------------ phases 2, 3

/// `n` distinct conversations from `data`: copies made unique (id, a
/// reference number in the first message), spread over 1,000 users.
fn unique(data: &[Value], n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let mut c = data[i % data.len()].clone();
            let copy = i / data.len();
            c["id"] = json!(format!("{}-{copy}", id_of(&c)));
            c["user_id"] = json!(format!("user-{}", (i * 7919) % 1000));
            if let Some(first) = c["messages"][0]["content"].as_str() {
                c["messages"][0]["content"] = json!(format!("{first} (ref {copy}-{i})"));
            }
            c
        })
        .collect()
}

fn config(ws: &Workspace, standin: &Standin, model: (&str, usize)) -> String {
    let lexical = std::env::var("BENCH_LEXICAL_MAX_MATCHES")
        .map(|n| format!("[search]\nlexical_max_matches = {n}\n"))
        .unwrap_or_default();
    ws.write_config(
        &standin.url(),
        model.0,
        model.1,
        &format!("[backfill]\ninterval_ms = 200\n[queue]\ncapacity = 20000\n{lexical}"),
    )
}

async fn latency_and_migration(
    data: &[Value],
    source: &str,
    n: usize,
    queries: usize,
    ingest_rate: usize,
    phases: &str,
) {
    let also_b = format!("{}={}", MODEL_B.0, MODEL_B.1);
    let also_c = format!("{}={}", MODEL_C.0, MODEL_C.1);
    let standin = Standin::start(
        MODEL_A.0,
        MODEL_A.1,
        512,
        &["--also-serve", &also_b, "--also-serve", &also_c],
    );
    let ws = Workspace::new();
    let addr = config(&ws, &standin, MODEL_A);
    let mut daemon = Daemon::start(&ws, &addr).await;
    let http = reqwest::Client::new();
    let db = connect_db(&ws.database_url()).await;
    let conversations = unique(data, n);
    let started = Instant::now();
    load(&http, &daemon.base_url(), conversations).await;
    wait_embedded(&db, n).await;
    let chunks: i64 = sqlx::query_scalar("SELECT count(*) FROM conversation_chunks")
        .fetch_one(&db)
        .await
        .unwrap();
    println!(
        "search_modes latency: {n} conversations of {source} made unique, {chunks} chunks, {} dimensions, loaded in {:.1} s",
        MODEL_A.1,
        started.elapsed().as_secs_f64()
    );
    let query_texts: Vec<String> = data
        .iter()
        .step_by((data.len() / queries).max(1))
        .take(queries)
        .filter_map(|c| c["messages"][0]["content"].as_str().map(str::to_string))
        .collect();
    if phases.contains("latency") {
        let base = daemon.base_url();
        // Warm-up: caches, plans, the index's pages.
        for q in &query_texts {
            for mode in MODES {
                search(&http, &base, q, mode).await;
            }
        }
        println!("mode | p50 ms | p95 ms | p99 ms | max ms | mean results");
        let mut p99s = HashMap::new();
        for mode in MODES {
            let mut latencies = Vec::with_capacity(query_texts.len());
            let mut results = 0usize;
            for q in &query_texts {
                let t = Instant::now();
                // A text not embedded yet (punctuation changes the
                // stand-in's vector, not the words), per mode: every
                // semantic and hybrid query pays its embedding.
                let suffix = match mode {
                    "semantic" => " ?",
                    "hybrid" => " ??",
                    _ => "",
                };
                let found = search(&http, &base, &format!("{q}{suffix}"), mode).await;
                latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                results += found["count"].as_u64().unwrap_or(0) as usize;
            }
            latencies.sort_by(f64::total_cmp);
            let p99 = percentile(&latencies, 0.99);
            p99s.insert(mode, p99);
            println!(
                "{mode} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1}",
                percentile(&latencies, 0.5),
                percentile(&latencies, 0.95),
                p99,
                latencies.last().copied().unwrap_or_default(),
                results as f64 / query_texts.len().max(1) as f64
            );
        }
        println!(
            "hybrid p99 / semantic p99 = {:.2}",
            p99s["hybrid"] / p99s["semantic"].max(f64::EPSILON)
        );
    }
    if phases.contains("migration") {
        daemon.terminate(Duration::from_secs(120));
        let addr = config(&ws, &standin, MODEL_B);
        let (d, rate) = migrate(&ws, &addr, &db, &query_texts, None).await;
        println!(
            "migration {} -> {} without ingest: {rate}",
            MODEL_A.0, MODEL_B.0
        );
        daemon = d;
        daemon.terminate(Duration::from_secs(120));
        let addr = config(&ws, &standin, MODEL_C);
        let (d, rate) = migrate(&ws, &addr, &db, &query_texts, Some(ingest_rate)).await;
        println!(
            "migration {} -> {} with ingest at {ingest_rate}/s: {rate}",
            MODEL_B.0, MODEL_C.0
        );
        daemon = d;
    }
    daemon.terminate(Duration::from_secs(120));
}

/// Starts the daemon on a changed model and waits until search switched;
/// searches run meanwhile (one every 200 ms), and with `ingest`, new
/// conversations are posted at that rate throughout. Returns the daemon
/// and a line of figures.
async fn migrate(
    ws: &Workspace,
    addr: &str,
    db: &PgPool,
    queries: &[String],
    ingest: Option<usize>,
) -> (Daemon, String) {
    let start_began = Instant::now();
    let daemon = Daemon::start(ws, addr).await;
    let start_seconds = start_began.elapsed().as_secs_f64();
    let base = daemon.base_url();
    let http = reqwest::Client::new();
    let chunks: i64 = sqlx::query_scalar("SELECT count(*) FROM conversation_chunks")
        .fetch_one(db)
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let posted = Arc::new(AtomicU64::new(0));
    let driver = ingest.map(|rate| {
        let (stop, posted, http, base) = (stop.clone(), posted.clone(), http.clone(), base.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
            let mut i = 0u64;
            let fresh = convstore_dataset::generate(4096, 7);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let mut c = fresh[(i as usize) % fresh.len()].clone();
                c["id"] = json!(format!("during-migration-{i}"));
                let resp = http
                    .post(format!("{base}/v1/conversations"))
                    .json(&c)
                    .send()
                    .await;
                if resp.is_ok_and(|r| r.status() == 202) {
                    posted.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        })
    });
    let began = Instant::now();
    let mut searches = 0u64;
    let mut previous_answers = 0u64;
    let mut failed = 0u64;
    loop {
        let q = &queries[(searches as usize) % queries.len().max(1)];
        let resp = http
            .post(format!("{base}/v1/search"))
            .json(&json!({"query": q, "k": K, "mode": "semantic"}))
            .send()
            .await
            .unwrap();
        searches += 1;
        if resp.status() == 200 {
            let found: Value = resp.json().await.unwrap();
            if found["vectors"] == "previous" {
                previous_answers += 1;
            }
        } else {
            failed += 1;
        }
        let stats: Value = http
            .get(format!("{base}/v1/stats"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let switched = stats["models"].as_array().is_some_and(|ms| {
            ms.iter()
                .any(|m| m["role"] == "current" && m["searched"] == true)
        });
        if switched {
            break;
        }
        assert!(
            began.elapsed() < Duration::from_secs(3600),
            "no switch within an hour: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let seconds = began.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    if let Some(driver) = driver {
        driver.await.unwrap();
    }
    let posted = posted.load(Ordering::Relaxed);
    let line = format!(
        "start-up (copy + reset + retype) {start_seconds:.1} s; {chunks} chunks re-embedded in {seconds:.1} s = {:.0} chunks/s; \
         {searches} searches meanwhile, {previous_answers} answered from the previous vectors, {failed} failed; \
         {posted} conversations accepted meanwhile ({:.1}/s)",
        chunks as f64 / seconds,
        posted as f64 / seconds
    );
    (daemon, line)
}

// ---------------------------------------------------------------- helpers

/// Posts every conversation in batches of 200, two at a time; items a full
/// queue refused (a batch answer lists them, `status: "rejected"`) are sent
/// again after a pause.
async fn load(http: &reqwest::Client, base: &str, conversations: Vec<Value>) {
    let batches: Vec<Vec<Value>> = conversations.chunks(200).map(<[Value]>::to_vec).collect();
    futures::stream::iter(batches)
        .map(|batch| {
            let (http, url) = (http.clone(), format!("{base}/v1/conversations/batch"));
            async move {
                let mut batch = batch;
                while !batch.is_empty() {
                    let resp = http.post(&url).json(&batch).send().await.unwrap();
                    let status = resp.status().as_u16();
                    let answer: Value = resp.json().await.unwrap_or_default();
                    let refused: Vec<usize> = answer["results"]
                        .as_array()
                        .map(|r| {
                            r.iter()
                                .filter(|item| item["status"] == "rejected")
                                .filter_map(|item| item["index"].as_u64())
                                .map(|i| i as usize)
                                .collect()
                        })
                        .unwrap_or_default();
                    match status {
                        202 if refused.is_empty() => return,
                        202 | 429 | 503 => {
                            if status == 202 {
                                batch = refused
                                    .iter()
                                    .filter_map(|&i| batch.get(i).cloned())
                                    .collect();
                            }
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        other => panic!("batch: {other} {answer}"),
                    }
                }
            }
        })
        .buffer_unordered(2)
        .collect::<Vec<()>>()
        .await;
}

/// Waits until `n` conversations are stored and no chunk is pending.
async fn wait_embedded(db: &PgPool, n: usize) {
    let started = Instant::now();
    loop {
        let (stored, pending): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM conversations), \
                    (SELECT count(*) FROM conversation_chunks WHERE embedding_status = 'pending')",
        )
        .fetch_one(db)
        .await
        .unwrap();
        if stored as usize >= n && pending == 0 {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(7200),
            "{stored} of {n} stored, {pending} chunks pending after two hours"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn search(http: &reqwest::Client, base: &str, query: &str, mode: &str) -> Value {
    let resp = http
        .post(format!("{base}/v1/search"))
        .json(&json!({"query": query, "k": K, "mode": mode}))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert_eq!(status, 200, "{mode} search {query:?}: {text}");
    serde_json::from_str(&text).unwrap()
}
