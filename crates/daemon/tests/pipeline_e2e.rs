//! The core pipeline end to end: the daemon as a real process, a real
//! managed PostgreSQL with pgvector, the Ollama stand-in as a real process,
//! over real TCP and Unix sockets.
// Test code: a panic on what the test set up itself is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use convstore_standin::standin_vector;
use serde_json::{Value, json};
use sqlx::Row;
use support::daemon::{Daemon, Standin, Workspace, connect_db, wait_for_count};

const MODEL: &str = "all-minilm";
const DIMS: usize = 384;
/// all-minilm's context: long conversations split into several chunks.
const CONTEXT: usize = 512;

fn conversations() -> Vec<Value> {
    convstore_dataset::sample_or_generated(4000).expect("test data")
}

async fn post_json(client: &reqwest::Client, url: &str, body: &Value) -> reqwest::Response {
    client.post(url).json(body).send().await.expect("post")
}

/// Every conversation of the sample, sent over HTTP (single and batch) and
/// the Unix socket (single and batch), is stored once with the stand-in's
/// vector for every chunk; sending everything again changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_is_stored_over_every_transport_with_exact_vectors() {
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &[]);
    let ws = Workspace::new();
    let addr = ws.write_config(
        &standin.url(),
        MODEL,
        DIMS,
        "[queue]\ncapacity = 20000\nmax_backlog_seconds = 0\n",
    );
    let daemon = Daemon::start(&ws, &addr).await;
    let data = conversations();
    let n = data.len();
    let quarter = n / 4;
    let http = reqwest::Client::new();

    // 1. HTTP, one by one.
    for conv in &data[..quarter] {
        let resp = post_json(
            &http,
            &format!("{}/v1/conversations", daemon.base_url()),
            conv,
        )
        .await;
        assert_eq!(resp.status(), 202);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["status"], "queued");
        assert_eq!(body["id"], conv["id"]);
    }
    // 2. HTTP, JSON-array batches.
    for batch in data[quarter..2 * quarter].chunks(250) {
        let resp = post_json(
            &http,
            &format!("{}/v1/conversations/batch", daemon.base_url()),
            &json!(batch),
        )
        .await;
        assert_eq!(resp.status(), 202);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["accepted"], batch.len());
    }
    // 3. Unix socket, one by one.
    let mut unix = daemon.unix_client();
    for conv in &data[2 * quarter..3 * quarter] {
        let resp = unix
            .post_json(
                "/v1/conversations",
                "application/json",
                Bytes::from(serde_json::to_vec(conv).unwrap()),
            )
            .await
            .expect("unix post");
        assert_eq!(resp.status, 202, "{}", String::from_utf8_lossy(&resp.body));
    }
    // 4. Unix socket, NDJSON batches.
    for batch in data[3 * quarter..].chunks(300) {
        let mut body = Vec::new();
        for conv in batch {
            serde_json::to_writer(&mut body, conv).unwrap();
            body.push(b'\n');
        }
        let resp = unix
            .post_json(
                "/v1/conversations/batch",
                "application/x-ndjson",
                Bytes::from(body),
            )
            .await
            .expect("unix batch");
        assert_eq!(resp.status, 202, "{}", String::from_utf8_lossy(&resp.body));
    }

    let db = connect_db(&ws.database_url()).await;
    let stored = wait_for_count(
        &db,
        "SELECT count(*) FROM conversations",
        n as i64,
        Duration::from_secs(600),
    )
    .await;
    assert_eq!(stored, n as i64, "log:\n{}", daemon.log_text());
    let pending = wait_for_count(
        &db,
        "SELECT count(*) FROM conversation_chunks WHERE embedding_status <> 'embedded'",
        0,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(pending, 0);

    // Every client id once; every chunk's vector is the stand-in's for its text.
    let ids: HashSet<String> = sqlx::query_scalar("SELECT client_id FROM conversations")
        .fetch_all(&db)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let sent: HashSet<String> = data
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, sent);
    let rows = sqlx::query("SELECT content, embedding::text AS v, model FROM conversation_chunks")
        .fetch_all(&db)
        .await
        .unwrap();
    assert!(rows.len() >= n);
    for row in &rows {
        let content: String = row.get("content");
        let text: String = row.get("v");
        let model: String = row.get("model");
        assert_eq!(model, MODEL);
        let stored: Vec<f32> = text
            .trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .map(|x| x.parse().unwrap())
            .collect();
        assert_eq!(
            stored,
            standin_vector(&content, DIMS),
            "vector of chunk {content:?}"
        );
    }
    // Chunks reassemble each conversation's text, in order.
    let texts: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.client_id, string_agg(k.content, '' ORDER BY k.seq) FROM conversations c \
         JOIN conversation_chunks k ON k.conversation_id = c.id GROUP BY c.client_id",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    let by_id: HashMap<String, &Value> = data
        .iter()
        .map(|c| (c["id"].as_str().unwrap().to_string(), c))
        .collect();
    for (id, joined) in &texts {
        let expected: String = by_id[id]["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                format!(
                    "{}: {}\n",
                    m["role"].as_str().unwrap(),
                    m["content"].as_str().unwrap()
                )
            })
            .collect();
        assert_eq!(joined, &expected, "chunks of {id}");
    }
    let chunk_count = rows.len() as i64;

    // Everything again: nothing changes.
    for batch in data.chunks(500) {
        let resp = post_json(
            &http,
            &format!("{}/v1/conversations/batch", daemon.base_url()),
            &json!(batch),
        )
        .await;
        assert_eq!(resp.status(), 202);
    }
    // The duplicates are written (and skipped) by the pipeline: wait until
    // the daemon reports them all, then compare.
    let started = std::time::Instant::now();
    loop {
        let metrics = http
            .get(format!("{}/metrics", daemon.base_url()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let dup = metric_value(&metrics, "convstore_conversations_duplicate_total");
        if dup >= n as f64 || started.elapsed() > Duration::from_secs(300) {
            assert_eq!(dup, n as f64, "duplicates seen by the daemon");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM conversations")
        .fetch_one(&db)
        .await
        .unwrap();
    let chunks_after: i64 = sqlx::query_scalar("SELECT count(*) FROM conversation_chunks")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(after, n as i64);
    assert_eq!(chunks_after, chunk_count);
}

fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A full queue answers 429 with Retry-After; everything accepted before is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_answers_429_and_keeps_what_it_accepted() {
    // A slow backend holds the first batches while the queue fills.
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &["--latency-ms", "3000"]);
    let ws = Workspace::new();
    let addr = ws.write_config(
        &standin.url(),
        MODEL,
        DIMS,
        "[queue]\ncapacity = 20\nretry_after_secs = 3\n[batch]\nmax_size = 4\n[pipeline]\nworkers = 1\n",
    );
    let daemon = Daemon::start(&ws, &addr).await;
    let http = reqwest::Client::new();
    let data = convstore_dataset::generate(200, 1);
    let mut accepted = Vec::new();
    let mut saw_429 = false;
    for conv in &data {
        let resp = post_json(
            &http,
            &format!("{}/v1/conversations", daemon.base_url()),
            conv,
        )
        .await;
        match resp.status().as_u16() {
            202 => accepted.push(conv["id"].as_str().unwrap().to_string()),
            429 => {
                assert_eq!(resp.headers()["retry-after"], "3");
                let body: Value = resp.json().await.unwrap();
                assert_eq!(body["error"]["code"], "queue_full");
                saw_429 = true;
                break;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(saw_429, "the queue never filled");
    assert!(
        accepted.len() >= 20,
        "accepted {} before 429",
        accepted.len()
    );

    standin
        .set_faults(json!({"latency_per_request_ms": 0.0}))
        .await;
    let db = connect_db(&ws.database_url()).await;
    let stored = wait_for_count(
        &db,
        "SELECT count(*) FROM conversations",
        accepted.len() as i64,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(stored, accepted.len() as i64, "log:\n{}", daemon.log_text());
    let ids: HashSet<String> = sqlx::query_scalar("SELECT client_id FROM conversations")
        .fetch_all(&db)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(ids, accepted.into_iter().collect::<HashSet<_>>());
}

/// SIGTERM with a full queue: everything accepted is stored, then exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_full_queue_stores_everything_then_exits_zero() {
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &["--latency-ms", "150"]);
    let ws = Workspace::new();
    let addr = ws.write_config(
        &standin.url(),
        MODEL,
        DIMS,
        "[queue]\ncapacity = 300\n[batch]\nmax_size = 16\n[pipeline]\nworkers = 2\n[shutdown]\ntimeout_ms = 120000\n",
    );
    let mut daemon = Daemon::start(&ws, &addr).await;
    let http = reqwest::Client::new();
    let data = convstore_dataset::generate(600, 2);
    let mut accepted = Vec::new();
    for batch in data.chunks(100) {
        let resp = post_json(
            &http,
            &format!("{}/v1/conversations/batch", daemon.base_url()),
            &json!(batch),
        )
        .await;
        let body: Value = resp.json().await.unwrap();
        for (item, result) in batch.iter().zip(body["results"].as_array().unwrap()) {
            if result["status"] == "queued" {
                accepted.push(item["id"].as_str().unwrap().to_string());
            }
        }
        if body["rejected"].as_u64().unwrap_or(0) > 0 {
            break;
        }
    }
    assert!(
        accepted.len() >= 300,
        "queue not filled: {}",
        accepted.len()
    );
    let status = daemon.terminate(Duration::from_secs(180));
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        daemon.log_text()
    );

    // The daemon stopped its cluster; bring the same cluster up to look.
    let settings = convstore::config::Settings::load(Some(&ws.config_path())).unwrap();
    let cluster = convstore_store::managed::ManagedCluster::start(&settings.managed_cluster())
        .await
        .unwrap();
    let db = connect_db(&cluster.url()).await;
    let ids: HashSet<String> = sqlx::query_scalar("SELECT client_id FROM conversations")
        .fetch_all(&db)
        .await
        .unwrap()
        .into_iter()
        .collect();
    db.close().await;
    cluster.stop().await.unwrap();
    assert_eq!(ids.len(), accepted.len());
    assert_eq!(ids, accepted.into_iter().collect::<HashSet<_>>());
}

/// Each malformed input gets its 4xx naming the field; nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_is_refused_with_the_field_and_nothing_is_stored() {
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &[]);
    let ws = Workspace::new();
    let addr = ws.write_config(&standin.url(), MODEL, DIMS, "");
    // The environment overrides the file (CONVSTORE_SECTION__KEY).
    let daemon =
        Daemon::start_with_env(&ws, &addr, &[("CONVSTORE_SERVER__MAX_BODY_BYTES", "4096")]).await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/conversations", daemon.base_url());

    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("not json", b"{\"user_id\": ".to_vec(), 400, ""),
        ("missing user_id", br#"{"channel":"c","messages":[{"role":"user","content":"x"}]}"#.to_vec(), 400, "user_id"),
        ("empty messages", br#"{"user_id":"u","channel":"c","messages":[]}"#.to_vec(), 400, "messages"),
        ("empty content", br#"{"user_id":"u","channel":"c","messages":[{"role":"user","content":""}]}"#.to_vec(), 400, "messages[0].content"),
        ("NUL byte", br#"{"user_id":"u","channel":"c","messages":[{"role":"user","content":"a\u0000b"}]}"#.to_vec(), 400, "messages[0].content"),
        ("bad timestamp", br#"{"user_id":"u","channel":"c","messages":[{"role":"user","content":"a","ts":"not-a-time"}]}"#.to_vec(), 400, "messages[0].ts"),
        ("bad created_at", br#"{"user_id":"u","channel":"c","transcript":"a","created_at":"2024-02-30T00:00:00Z"}"#.to_vec(), 400, "created_at"),
        ("bad role", br#"{"user_id":"u","channel":"c","messages":[{"role":"wizard","content":"a"}]}"#.to_vec(), 400, "messages[0].role"),
        ("metadata not object", br#"{"user_id":"u","channel":"c","transcript":"a","metadata":"x"}"#.to_vec(), 400, "metadata"),
        ("unknown field", br#"{"user_id":"u","channel":"c","transcript":"a","extra":1}"#.to_vec(), 400, "extra"),
        ("invalid utf-8", b"{\"user_id\":\"\xff\",\"channel\":\"c\",\"transcript\":\"a\"}".to_vec(), 400, ""),
    ];
    for (name, body, status, field) in &cases {
        let resp = http
            .post(&url)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), *status, "{name}");
        let err: Value = resp.json().await.unwrap();
        assert!(
            err["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{name}: {err}"
        );
        if !field.is_empty() {
            assert_eq!(err["error"]["field"], *field, "{name}: {err}");
            assert!(
                err["error"]["message"].as_str().unwrap().contains(field),
                "{name}: {err}"
            );
        } else {
            assert_eq!(err["error"]["code"], "invalid_json", "{name}: {err}");
        }
    }
    // 413 over max_body_bytes; 415 wrong content type.
    let big = json!({"user_id":"u","channel":"c","transcript":"x".repeat(5000)});
    let resp = post_json(&http, &url, &big).await;
    assert_eq!(resp.status(), 413);
    let resp = http
        .post(&url)
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "unsupported_media_type");
    // A batch: per-item results name the field; the valid item is accepted.
    let resp = post_json(
        &http,
        &format!("{}/v1/conversations/batch", daemon.base_url()),
        &json!([{"user_id":"u","channel":"c","messages":[]}, {"id":"good-1","user_id":"u","channel":"c","transcript":"fine"}]),
    )
    .await;
    assert_eq!(resp.status(), 202);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["results"][0]["error"]["field"], "messages");
    assert_eq!(body["results"][1]["status"], "queued");

    // The valid item is the barrier: once it is stored, nothing else is.
    let db = connect_db(&ws.database_url()).await;
    let n = wait_for_count(
        &db,
        "SELECT count(*) FROM conversations",
        1,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(n, 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ids: Vec<String> = sqlx::query_scalar("SELECT client_id FROM conversations")
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(ids, vec!["good-1".to_string()]);
}

/// A restart reuses the managed cluster and its data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_reuses_the_managed_cluster() {
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &[]);
    let ws = Workspace::new();
    let addr = ws.write_config(&standin.url(), MODEL, DIMS, "");
    let data = convstore_dataset::generate(10, 3);
    {
        let mut daemon = Daemon::start(&ws, &addr).await;
        let http = reqwest::Client::new();
        let resp = post_json(
            &http,
            &format!("{}/v1/conversations/batch", daemon.base_url()),
            &json!(data),
        )
        .await;
        assert_eq!(resp.status(), 202);
        let db = connect_db(&ws.database_url()).await;
        assert_eq!(
            wait_for_count(
                &db,
                "SELECT count(*) FROM conversations",
                10,
                Duration::from_secs(60)
            )
            .await,
            10
        );
        db.close().await;
        assert!(daemon.terminate(Duration::from_secs(60)).success());
    }
    let daemon = Daemon::start(&ws, &addr).await;
    let http = reqwest::Client::new();
    let id = data[0]["id"].as_str().unwrap();
    let resp = http
        .get(format!("{}/v1/conversations/{id}", daemon.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let stored: Value = resp.json().await.unwrap();
    assert_eq!(stored["client_id"], id);
    let db = connect_db(&ws.database_url()).await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM conversations")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(n, 10);
}
