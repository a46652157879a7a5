//! What the conversation lifecycle costs, measured on the real daemon (its
//! managed PostgreSQL, the embedding stand-in in process), on the shared
//! sample when it is there (`../shared/data`), else on generated
//! conversations:
//!
//! 1. **grow**: each conversation posted with its first two messages, then
//!    grown one message at a time by appends (`?wait=stored`), several
//!    conversations at once. Per append: backend inputs (the stand-in's
//!    counter), chunk rows written (`convstore_store_rows_total`), against
//!    the chunk rows of the version (what rewriting it whole would cost),
//!    and the latency to `stored`.
//! 2. **delete**: half of them deleted, several at once: deletes per second.
//! 3. **erase**: every user of the other half erased: users and
//!    conversations per second.
//! 4. **retention**: old conversations loaded, then `[retention]` turned
//!    on by a reload (SIGHUP): conversations reaped per second.
//!
//! `cargo bench --bench lifecycle` (under `cargo test --all-targets`, a
//! smoke run at a twentieth of the size). Knobs (environment):
//! `BENCH_CONVERSATIONS` (200), `BENCH_CONCURRENCY` (8), `BENCH_DIMS`
//! (384), `BENCH_OLD` conversations for retention (5000),
//! `BENCH_MAX_TOKENS` (`chunking.max_tokens`; 0 = the context's, 512 for
//! the stand-in: most sample conversations are then one chunk).
// Test code: a panic on what the bench set up itself is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "support/knobs.rs"]
mod knobs;
use knobs::{env_usize, percentile};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use support::daemon::{Daemon, Standin, Workspace, connect_db};
use support::exposition::scrape;

const MODEL: &str = "lifecycle-bench";

async fn chunk_rows_written(http: &reqwest::Client, base: &str) -> f64 {
    scrape(http, base).await.value(
        "convstore_store_rows_total",
        &[("table", "conversation_chunks")],
    )
}

async fn inputs(standin: &Standin) -> u64 {
    standin.stats().await["inputs"].as_u64().unwrap()
}

fn messages_of(conversation: &Value) -> Vec<Value> {
    conversation["messages"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// POSTs `body` to `path` and insists on `201 stored`.
async fn store(http: &reqwest::Client, url: String, body: &Value) {
    let resp = http.post(url).json(body).send().await.unwrap();
    assert_eq!(
        resp.status(),
        201,
        "{}",
        resp.text().await.unwrap_or_default()
    );
}

/// A conversation's first version: its first two messages.
async fn post_first(http: reqwest::Client, base: String, conversation: Value) {
    let mut first = conversation.clone();
    first["messages"] = json!(messages_of(&conversation)[..2]);
    store(
        &http,
        format!("{base}/v1/conversations?wait=stored"),
        &first,
    )
    .await;
}

/// One conversation grown turn by turn from its first version: (append
/// latencies in seconds, chunk rows of each version after an append).
async fn grow(http: reqwest::Client, base: String, conversation: Value) -> (Vec<f64>, Vec<usize>) {
    let id = conversation["id"].as_str().unwrap().to_string();
    let mut latencies = Vec::new();
    let mut versions = Vec::new();
    for m in &messages_of(&conversation)[2..] {
        let started = Instant::now();
        store(
            &http,
            format!("{base}/v1/conversations/{id}/messages?wait=stored"),
            &json!({"messages": [m]}),
        )
        .await;
        latencies.push(started.elapsed().as_secs_f64());
        let view: Value = http
            .get(format!("{base}/v1/conversations/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        versions.push(view["chunks"].as_array().map_or(0, Vec::len));
    }
    (latencies, versions)
}

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
    // binary without it: then a small smoke run keeps the bench working
    // without taking a minute.
    let measuring = std::env::args().any(|a| a == "--bench");
    let scale = |full: usize| if measuring { full } else { (full / 20).max(2) };
    let n = env_usize("BENCH_CONVERSATIONS", scale(200));
    let concurrency = env_usize("BENCH_CONCURRENCY", 8);
    let dims = env_usize("BENCH_DIMS", 384);
    let old = env_usize("BENCH_OLD", scale(5000));
    let max_tokens = std::env::var("BENCH_MAX_TOKENS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    let source = if convstore_dataset::sample_path().is_some() {
        "the shared sample"
    } else {
        "generated conversations"
    };
    let mut data: Vec<Value> = convstore_dataset::sample_or_generated(n.max(old))
        .unwrap()
        .into_iter()
        .filter(|c| c["messages"].as_array().is_some_and(|m| m.len() >= 3))
        .collect();
    let old_set: Vec<Value> = data.split_off(n.min(data.len()));
    for (i, c) in data.iter_mut().enumerate() {
        c["id"] = json!(format!("grow-{i}"));
    }
    println!(
        "lifecycle bench: {} conversations of {source} (>= 3 messages), {concurrency} at once, {dims} dimensions",
        data.len()
    );

    let standin = Standin::start(MODEL, dims, 512, &[]);
    let ws = Workspace::new();
    let addr = ws.write_config(
        &standin.url(),
        MODEL,
        dims,
        &format!("[chunking]\nmax_tokens = {max_tokens}\n"),
    );
    let mut daemon = Daemon::start(&ws, &addr).await;
    let base = daemon.base_url();
    let http = reqwest::Client::new();
    let db = connect_db(&ws.database_url()).await;

    // 1. grow
    futures::stream::iter(data.clone())
        .map(|c| post_first(http.clone(), base.clone(), c))
        .buffer_unordered(concurrency)
        .collect::<Vec<()>>()
        .await;
    let posts = data.len();
    let first_rows = chunk_rows_written(&http, &base).await;
    let rows_before = chunk_rows_written(&http, &base).await;
    let inputs_before = inputs(&standin).await;
    let started = Instant::now();
    let results: Vec<(Vec<f64>, Vec<usize>)> = futures::stream::iter(data.clone())
        .map(|c| grow(http.clone(), base.clone(), c))
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    let mut latencies: Vec<f64> = results
        .iter()
        .flat_map(|(l, _)| l.iter().copied())
        .collect();
    latencies.sort_by(f64::total_cmp);
    let appends = latencies.len();
    let version_chunks: usize = results.iter().flat_map(|(_, v)| v.iter()).sum();
    let rows = chunk_rows_written(&http, &base).await - rows_before;
    let backend = inputs(&standin).await - inputs_before;
    let first_chunks: i64 = sqlx::query_scalar("SELECT count(*) FROM conversation_chunks")
        .fetch_one(&db)
        .await
        .unwrap();
    println!(
        "\n## grow: {posts} posts of 2 messages ({first_rows} chunk rows), then {appends} appends of 1 message (?wait=stored), chunks of at most {} tokens",
        if max_tokens == 0 {
            "the context's".to_string()
        } else {
            max_tokens.to_string()
        }
    );
    println!(
        "wall {elapsed:.1} s; {:.1} appends/s",
        appends as f64 / elapsed
    );
    println!(
        "append to stored: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms",
        percentile(&latencies, 0.5) * 1e3,
        percentile(&latencies, 0.9) * 1e3,
        percentile(&latencies, 0.99) * 1e3
    );
    println!(
        "backend inputs: {backend} ({:.2} per append); embedding each version whole would have sent {version_chunks} ({:.2} per append)",
        backend as f64 / appends.max(1) as f64,
        version_chunks as f64 / appends.max(1) as f64
    );
    println!(
        "chunk rows written: {} ({:.2} per append); rewriting each version whole would have written {version_chunks} ({:.2} per append)",
        rows as u64,
        rows / appends.max(1) as f64,
        version_chunks as f64 / appends.max(1) as f64
    );
    println!(
        "chunk rows stored at the end: {first_chunks} ({:.1} per conversation)",
        first_chunks as f64 / posts.max(1) as f64
    );

    // 2. delete half
    let half: Vec<String> = (0..posts / 2).map(|i| format!("grow-{i}")).collect();
    let started = Instant::now();
    let mut delete_latencies: Vec<f64> = futures::stream::iter(half.clone())
        .map(|id| {
            let http = http.clone();
            let base = base.clone();
            async move {
                let t = Instant::now();
                let resp = http
                    .delete(format!("{base}/v1/conversations/{id}"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 200);
                t.elapsed().as_secs_f64()
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    delete_latencies.sort_by(f64::total_cmp);
    println!(
        "\n## delete: {} conversations, {concurrency} at once",
        half.len()
    );
    println!(
        "{:.0} deletes/s; p50 {:.1} ms, p99 {:.1} ms",
        half.len() as f64 / elapsed,
        percentile(&delete_latencies, 0.5) * 1e3,
        percentile(&delete_latencies, 0.99) * 1e3
    );

    // 3. erase every user of the rest
    let users: Vec<String> = {
        let mut u: Vec<String> = data[posts / 2..]
            .iter()
            .filter_map(|c| c["user_id"].as_str().map(str::to_string))
            .collect();
        u.sort();
        u.dedup();
        u
    };
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM conversations")
        .fetch_one(&db)
        .await
        .unwrap();
    let started = Instant::now();
    let erased: Vec<u64> = futures::stream::iter(users.clone())
        .map(|user| {
            let http = http.clone();
            let base = base.clone();
            async move {
                let resp = http
                    .delete(format!("{base}/v1/users/{}", user.replace('/', "%2F")))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 200);
                resp.json::<Value>().await.unwrap()["conversations"]
                    .as_u64()
                    .unwrap()
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    let total: u64 = erased.iter().sum();
    println!(
        "\n## erase: {} users ({left} conversations left before), {concurrency} at once",
        users.len()
    );
    println!(
        "{:.0} users/s, {:.0} conversations/s ({total} erased)",
        users.len() as f64 / elapsed,
        total as f64 / elapsed
    );

    // 4. retention
    let old_set: Vec<Value> = old_set
        .into_iter()
        .take(old)
        .enumerate()
        .map(|(i, mut c)| {
            c["id"] = json!(format!("old-{i}"));
            c["created_at"] =
                json!((chrono::Utc::now() - chrono::Duration::days(800)).to_rfc3339());
            c
        })
        .collect();
    for chunk in old_set.chunks(500) {
        let resp = http
            .post(format!(
                "{base}/v1/conversations/batch?wait=stored&timeout_ms=300000"
            ))
            .json(&json!(chunk))
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            201,
            "{}",
            resp.text().await.unwrap_or_default()
        );
    }
    let loaded: i64 = sqlx::query_scalar("SELECT count(*) FROM conversations")
        .fetch_one(&db)
        .await
        .unwrap();
    let config = std::fs::read_to_string(ws.config_path()).unwrap();
    std::fs::write(
        ws.config_path(),
        format!("{config}\n[retention]\nmax_age = \"365d\"\ninterval = \"1s\"\n"),
    )
    .unwrap();
    let started = Instant::now();
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(daemon.pid() as i32, libc::SIGHUP) };
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM conversations")
            .fetch_one(&db)
            .await
            .unwrap();
        if n == 0 || started.elapsed() > Duration::from_secs(600) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "\n## retention: {loaded} conversations 800 days old, reaper turned on by SIGHUP (interval 1 s)"
    );
    println!(
        "all reaped in {elapsed:.2} s (reload and first run included): {:.0} conversations/s",
        loaded as f64 / elapsed
    );
    assert!(daemon.terminate(Duration::from_secs(60)).success());
}
