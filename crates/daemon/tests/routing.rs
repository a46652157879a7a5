//! Routing across embedding backends, failure handling, and text that is
//! never lost (issue 4): the daemon as a real process with its managed
//! PostgreSQL, and stand-in backends (`convstore-standin`) on loopback
//! ports, failing on command.
//!
//! Timeouts, backoffs and breaker periods are shortened in the test
//! configuration so every test ends in seconds to a few minutes; nothing
//! here asserts on timing.
// Test code: a panic on what the test set up itself is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use convstore::config::EncodingFormat;
use convstore_embed::openai::OpenAiBackend;
use convstore_embed::response::DEFAULT_MAX_RESPONSE_BYTES;
use convstore_embed::{ClientConfig, Embedder};
use convstore_standin::standin_vector;
use serde_json::{Value, json};
use sqlx::{PgPool, Row};
use support::daemon::{Daemon, Standin, Workspace, connect_db, parse_vector, wait_for_count};

const MODEL: &str = "all-minilm";
const DIMS: usize = 384;
const CONTEXT: usize = 512;

/// One `[[embedding.backends]]` entry.
struct Backend<'a> {
    name: &'a str,
    url: String,
    kind: &'a str,
    /// More keys of the entry (weight, encoding_format...).
    keys: &'a str,
}

fn ollama<'a>(name: &'a str, standin: &Standin) -> Backend<'a> {
    Backend {
        name,
        url: standin.url(),
        kind: "ollama",
        keys: "",
    }
}

/// Writes a configuration with short retry/breaker/health/backfill periods;
/// `embedding` adds `[embedding]` keys, `extra` whole sections. Returns the
/// HTTP address.
fn write_config(ws: &Workspace, backends: &[Backend<'_>], embedding: &str, extra: &str) -> String {
    let http_addr = ws.bind_http();
    let mut toml = format!(
        r#"state_dir = "{state}"

[server]
http_addr = "{http_addr}"
unix_socket = "{socket}"

[queue]
capacity = 20000
max_backlog_seconds = 0

[embedding]
model = "{MODEL}"
dimensions = {DIMS}
retry_initial_ms = 20
retry_max_ms = 200
max_wait_ms = 20000
health_interval_ms = 250
breaker_failures = 3
breaker_open_ms = 200
breaker_max_open_ms = 1000
{embedding}
"#,
        state = ws.path().join("state").display(),
        socket = ws.socket().display(),
    );
    for b in backends {
        toml.push_str(&format!(
            "[[embedding.backends]]\nname = \"{}\"\nkind = \"{}\"\nurl = \"{}\"\ntimeout_ms = 10000\n{}\n\n",
            b.name, b.kind, b.url, b.keys
        ));
    }
    toml.push_str("[backfill]\ninterval_ms = 200\nmax_defer_ms = 2000\n\n");
    toml.push_str(extra);
    std::fs::write(ws.config_path(), toml).expect("write config");
    http_addr
}

async fn post_batch(http: &reqwest::Client, daemon: &Daemon, items: &[Value]) {
    for part in items.chunks(250) {
        let resp = http
            .post(format!("{}/v1/conversations/batch", daemon.base_url()))
            .json(&json!(part))
            .send()
            .await
            .expect("post batch");
        assert_eq!(resp.status(), 202);
        let body: Value = resp.json().await.expect("batch answer");
        assert_eq!(body["accepted"], part.len(), "{body}");
    }
}

async fn reset_stats(standin: &Standin) {
    let resp = reqwest::Client::new()
        .post(format!("{}/_standin/stats/reset", standin.url()))
        .send()
        .await
        .expect("reset standin stats");
    assert!(resp.status().is_success());
}

async fn scrape(http: &reqwest::Client, daemon: &Daemon) -> String {
    http.get(format!("{}/metrics", daemon.base_url()))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text")
}

/// Sum of the samples of `name` whose labels include every `labels` pair.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls `check` every 200 ms until it is true or `limit` passes.
async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return true;
        }
        if started.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn count(db: &PgPool, query: &'static str) -> i64 {
    sqlx::query_scalar(query)
        .fetch_one(db)
        .await
        .expect("count query")
}

/// Every chunk of the conversations whose client id is in `ids` is
/// embedded with the stand-in's vector for its text; returns the number of
/// chunks checked.
async fn assert_exact_vectors(db: &PgPool, ids: &HashSet<String>) -> usize {
    let rows = sqlx::query(
        "SELECT c.client_id, c.embedding_status AS conversation_status, k.content, \
         k.embedding_status, k.embedding::text AS v \
         FROM conversations c JOIN conversation_chunks k ON k.conversation_id = c.id",
    )
    .fetch_all(db)
    .await
    .expect("chunks");
    let mut checked = 0;
    let mut seen = HashSet::new();
    for row in &rows {
        let id: String = row.get("client_id");
        if !ids.contains(&id) {
            continue;
        }
        seen.insert(id.clone());
        let content: String = row.get("content");
        let status: String = row.get("embedding_status");
        let conversation_status: String = row.get("conversation_status");
        assert_eq!(status, "embedded", "chunk of {id}: {content:?}");
        assert_eq!(conversation_status, "embedded", "{id}");
        let v: String = row.get("v");
        assert_eq!(
            parse_vector(&v),
            standin_vector(&content, DIMS),
            "vector of {id}: {content:?}"
        );
        checked += 1;
    }
    assert_eq!(seen.len(), ids.len(), "every conversation has chunks");
    checked
}

fn ids_of(items: &[Value]) -> HashSet<String> {
    items
        .iter()
        .map(|c| c["id"].as_str().expect("id").to_string())
        .collect()
}

/// Three backends, one slow, one failing half its calls, one down: every
/// conversation of the shared sample is stored with the right vectors; the
/// healthy two carry the load while the third is down; its breaker opens,
/// and closes once it is back and takes work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_flaky_and_down_backends_every_conversation_stored_with_exact_vectors() {
    let slow = Standin::start(
        MODEL,
        DIMS,
        CONTEXT,
        &["--latency-ms", "40", "--per-input-ms", "1"],
    );
    let flaky = Standin::start(
        MODEL,
        DIMS,
        CONTEXT,
        &[
            "--failure-rate",
            "0.5",
            "--seed",
            "7",
            "--failure-status",
            "500",
        ],
    );
    let down = Standin::start(MODEL, DIMS, CONTEXT, &["--down"]);
    let ws = Workspace::new();
    let addr = write_config(
        &ws,
        &[
            ollama("slow", &slow),
            ollama("flaky", &flaky),
            ollama("down", &down),
        ],
        "",
        "",
    );
    let daemon = Daemon::start(&ws, &addr).await;
    let http = reqwest::Client::new();
    let db = connect_db(&ws.database_url()).await;
    let data = convstore_dataset::sample_or_generated(4000).expect("test data");
    let half = data.len() / 2;

    // 1. The third backend is down.
    post_batch(&http, &daemon, &data[..half]).await;
    let stored = wait_for_count(
        &db,
        "SELECT count(*) FROM conversations WHERE embedding_status = 'embedded'",
        half as i64,
        Duration::from_secs(600),
    )
    .await;
    assert_eq!(stored, half as i64, "log:\n{}", daemon.log_text());
    let metrics = scrape(&http, &daemon).await;
    let opened = metric(
        &metrics,
        "convstore_backend_circuit_transitions_total",
        &[("backend", "down"), ("to", "open")],
    );
    assert!(
        opened >= 1.0,
        "the down backend's breaker opened:\n{metrics}"
    );
    let (slow_1, flaky_1, down_1) = (slow.stats().await, flaky.stats().await, down.stats().await);
    assert_eq!(down_1["outcomes"]["ok"], 0);
    assert!(down_1["outcomes"]["down"].as_u64() > Some(0));
    assert!(slow_1["outcomes"]["ok"].as_u64() > Some(0), "{slow_1}");
    assert!(flaky_1["outcomes"]["ok"].as_u64() > Some(0), "{flaky_1}");
    assert!(
        flaky_1["outcomes"]["injected"].as_u64() > Some(0),
        "the flaky backend failed calls that were retried elsewhere: {flaky_1}"
    );

    // 2. It comes back: its breaker closes after a good trial call, and it
    // takes work again.
    down.set_faults(json!({"down": false})).await;
    post_batch(&http, &daemon, &data[half..]).await;
    let stored = wait_for_count(
        &db,
        "SELECT count(*) FROM conversations WHERE embedding_status = 'embedded'",
        data.len() as i64,
        Duration::from_secs(600),
    )
    .await;
    assert_eq!(stored, data.len() as i64, "log:\n{}", daemon.log_text());
    // If the second half was done before a trial was due, a trickle of
    // extra conversations gives the breaker its trial.
    let extra = convstore_dataset::generate(400, 41);
    let mut sent_extra = 0;
    let closed = eventually(Duration::from_secs(120), || {
        let http = http.clone();
        let batch = extra
            .get(sent_extra..sent_extra + 20)
            .map(<[Value]>::to_vec);
        sent_extra += 20;
        let daemon = &daemon;
        async move {
            let metrics = scrape(&http, daemon).await;
            let closed = metric(
                &metrics,
                "convstore_backend_circuit_transitions_total",
                &[("backend", "down"), ("to", "closed")],
            ) >= 1.0
                && metric(
                    &metrics,
                    "convstore_backend_circuit_state",
                    &[("backend", "down")],
                ) == 0.0;
            if !closed && let Some(batch) = batch {
                post_batch(&http, daemon, &batch).await;
            }
            closed
        }
    })
    .await;
    assert!(closed, "breaker closed again; log:\n{}", daemon.log_text());
    let down_2 = down.stats().await;
    assert!(
        down_2["outcomes"]["ok"].as_u64() > Some(0),
        "the recovered backend embeds again: {down_2}"
    );

    // Every conversation of the sample, every chunk with its exact vector.
    assert_eq!(
        wait_for_count(
            &db,
            "SELECT count(*) FROM conversation_chunks WHERE embedding_status <> 'embedded'",
            0,
            Duration::from_secs(60),
        )
        .await,
        0
    );
    let chunks = assert_exact_vectors(&db, &ids_of(&data)).await;
    assert!(chunks >= data.len());
}

/// `strategy = "weighted"`: each backend's share of the embedding calls
/// follows its weight within ±3 percentage points.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_strategy_shares_follow_the_weights() {
    let standins: Vec<Standin> = (0..3)
        .map(|_| Standin::start(MODEL, DIMS, CONTEXT, &[]))
        .collect();
    let ws = Workspace::new();
    let weights = [1u32, 2, 3];
    let keys: Vec<String> = weights.iter().map(|w| format!("weight = {w}")).collect();
    let names = ["w1", "w2", "w3"];
    let backends: Vec<Backend<'_>> = standins
        .iter()
        .zip(names)
        .zip(&keys)
        .map(|((s, name), keys)| Backend {
            name,
            url: s.url(),
            kind: "ollama",
            keys,
        })
        .collect();
    let addr = write_config(
        &ws,
        &backends,
        "strategy = \"weighted\"\nmax_batch_inputs = 4",
        "",
    );
    let daemon = Daemon::start(&ws, &addr).await;
    for s in &standins {
        reset_stats(s).await; // The warm-up calls.
    }
    let data = convstore_dataset::generate(600, 11);
    let http = reqwest::Client::new();
    post_batch(&http, &daemon, &data).await;
    let db = connect_db(&ws.database_url()).await;
    let stored = wait_for_count(
        &db,
        "SELECT count(*) FROM conversations",
        data.len() as i64,
        Duration::from_secs(300),
    )
    .await;
    assert_eq!(stored, data.len() as i64, "log:\n{}", daemon.log_text());

    let mut calls = Vec::new();
    for s in &standins {
        calls.push(s.stats().await["calls"]["embed"].as_u64().unwrap_or(0) as f64);
    }
    let total: f64 = calls.iter().sum();
    let weight_sum: u32 = weights.iter().sum();
    assert!(total >= 150.0, "enough calls to measure shares: {calls:?}");
    for ((name, calls), weight) in names.iter().zip(&calls).zip(weights) {
        let share = calls / total;
        let expected = f64::from(weight) / f64::from(weight_sum);
        assert!(
            (share - expected).abs() <= 0.03,
            "{name}: {calls} of {total} calls = {share:.3}, weight share {expected:.3}"
        );
    }
    assert_exact_vectors(&db, &ids_of(&data)).await;
}

/// Every backend down while conversations arrive: each is stored at once
/// as `pending` (readiness says why); when the backends come back, the
/// backfill embeds everything with the stand-in's vectors — run by two
/// instances sharing the database at the same time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_backends_down_stores_pending_then_backfills_exact_vectors() {
    let a = Standin::start(MODEL, DIMS, CONTEXT, &[]);
    let b = Standin::start(MODEL, DIMS, CONTEXT, &[]);
    let ws = Workspace::new();
    let addr = write_config(&ws, &[ollama("a", &a), ollama("b", &b)], "", "");
    let daemon = Daemon::start(&ws, &addr).await;
    let http = reqwest::Client::new();
    a.set_faults(json!({"down": true})).await;
    b.set_faults(json!({"down": true})).await;

    let data = convstore_dataset::generate(300, 21);
    post_batch(&http, &daemon, &data).await;
    let db = connect_db(&ws.database_url()).await;
    let stored = wait_for_count(
        &db,
        "SELECT count(*) FROM conversations WHERE embedding_status = 'pending'",
        data.len() as i64,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(stored, data.len() as i64, "log:\n{}", daemon.log_text());
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM conversation_chunks WHERE embedding_status <> 'pending'"
        )
        .await,
        0,
        "no chunk has a vector"
    );
    let not_ready = eventually(Duration::from_secs(30), || {
        let http = http.clone();
        let url = format!("{}/readyz", daemon.base_url());
        async move {
            match http.get(url).send().await {
                Ok(resp) if resp.status() == 503 => {
                    let body: Value = resp.json().await.unwrap_or_default();
                    body["reasons"]
                        .to_string()
                        .contains("no embedding backend ready")
                }
                _ => false,
            }
        }
    })
    .await;
    assert!(not_ready, "/readyz says no backend is ready");

    // A second instance on the same database, to backfill alongside.
    let ws2 = Workspace::new();
    let addr2 = write_config(
        &ws2,
        &[ollama("a", &a), ollama("b", &b)],
        "",
        &format!("[database]\nurl = \"{}\"\n", ws.database_url()),
    );
    a.set_faults(json!({"down": false})).await;
    b.set_faults(json!({"down": false})).await;
    let daemon2 = Daemon::start(&ws2, &addr2).await;

    let left = wait_for_count(
        &db,
        "SELECT count(*) FROM conversation_chunks WHERE embedding_status <> 'embedded'",
        0,
        Duration::from_secs(300),
    )
    .await;
    assert_eq!(left, 0, "log:\n{}", daemon.log_text());
    let chunks = assert_exact_vectors(&db, &ids_of(&data)).await;
    let first = metric(
        &scrape(&http, &daemon).await,
        "convstore_backfill_chunks_total",
        &[("outcome", "embedded")],
    );
    let second = metric(
        &scrape(&http, &daemon2).await,
        "convstore_backfill_chunks_total",
        &[("outcome", "embedded")],
    );
    assert_eq!(
        first + second,
        chunks as f64,
        "each pending chunk was backfilled exactly once (first {first}, second {second})"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM conversations WHERE embedding_status <> 'embedded'"
        )
        .await,
        0
    );
}

/// One poison input in a batch: only its chunk fails (with the backend's
/// reason, visible in the API and the metrics) and is never retried; every
/// other chunk of the batch is stored with its vector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_input_fails_alone_and_is_never_retried() {
    const SMALL_CONTEXT: usize = 64;
    let standin = Standin::start(MODEL, DIMS, SMALL_CONTEXT, &["--poison", "POISON-PILL"]);
    let ws = Workspace::new();
    let addr = write_config(&ws, &[ollama("s", &standin)], "max_batch_inputs = 16", "");
    let daemon = Daemon::start(&ws, &addr).await;
    let http = reqwest::Client::new();
    // A small context: each message is its own chunk.
    let sentence = "Please book a table for two at the Italian place near the central station \
                    tonight at seven, and ask them for a quiet corner by the window if they have one";
    let poisoned = json!({
        "id": "poisoned",
        "user_id": "u",
        "channel": "test",
        "messages": [
            {"role": "user", "content": format!("{sentence} one.")},
            {"role": "assistant", "content": format!("{sentence} two.")},
            {"role": "user", "content": format!("{sentence} POISON-PILL three.")},
            {"role": "assistant", "content": format!("{sentence} four.")},
        ]
    });
    let mut data = convstore_dataset::generate(30, 31);
    data.insert(10, poisoned);
    post_batch(&http, &daemon, &data).await;
    let db = connect_db(&ws.database_url()).await;
    let stored = wait_for_count(
        &db,
        "SELECT count(*) FROM conversations",
        data.len() as i64,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(stored, data.len() as i64, "log:\n{}", daemon.log_text());

    let failed = sqlx::query(
        "SELECT c.client_id, k.content, k.error FROM conversation_chunks k \
         JOIN conversations c ON c.id = k.conversation_id WHERE k.embedding_status = 'failed'",
    )
    .fetch_all(&db)
    .await
    .expect("failed chunks");
    assert_eq!(failed.len(), 1, "exactly one chunk failed");
    let content: String = failed[0].get("content");
    let error: String = failed[0].get("error");
    assert_eq!(failed[0].get::<String, _>("client_id"), "poisoned");
    assert!(content.contains("POISON-PILL"), "{content}");
    assert!(error.contains("poison"), "the backend's reason: {error}");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM conversation_chunks WHERE embedding_status = 'pending'"
        )
        .await,
        0
    );
    // Everything else has its vector; the poisoned conversation's other
    // chunks too.
    let others: HashSet<String> = ids_of(&data)
        .into_iter()
        .filter(|id| id != "poisoned")
        .collect();
    assert_exact_vectors(&db, &others).await;
    let siblings = sqlx::query(
        "SELECT k.content, k.embedding::text AS v FROM conversation_chunks k \
         JOIN conversations c ON c.id = k.conversation_id \
         WHERE c.client_id = 'poisoned' AND k.embedding_status = 'embedded'",
    )
    .fetch_all(&db)
    .await
    .expect("siblings");
    assert_eq!(
        siblings.len(),
        3,
        "the poisoned conversation's other chunks"
    );
    for row in &siblings {
        let content: String = row.get("content");
        let v: String = row.get("v");
        assert_eq!(parse_vector(&v), standin_vector(&content, DIMS));
    }

    // The API shows the dead letter.
    let view: Value = http
        .get(format!("{}/v1/conversations/poisoned", daemon.base_url()))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(view["embedding_status"], "failed", "{view}");
    let dead: Vec<&Value> = view["chunks"]
        .as_array()
        .expect("chunks")
        .iter()
        .filter(|c| c["embedding_status"] == "failed")
        .collect();
    assert_eq!(dead.len(), 1, "{view}");
    assert!(
        dead[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("poison"))
    );

    // Never retried: the metrics count it, and the backend sees no new
    // poisoned call while the backfill runs (every 200 ms).
    let in_metrics = eventually(Duration::from_secs(30), || {
        let http = http.clone();
        let daemon = &daemon;
        async move {
            metric(
                &scrape(&http, daemon).await,
                "convstore_chunks_failed_embedding",
                &[],
            ) == 1.0
        }
    })
    .await;
    assert!(in_metrics, "convstore_chunks_failed_embedding is 1");
    let poisoned_calls = standin.stats().await["outcomes"]["poisoned"].clone();
    assert!(poisoned_calls.as_u64() > Some(0));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        standin.stats().await["outcomes"]["poisoned"],
        poisoned_calls
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM conversation_chunks WHERE embedding_status = 'failed'"
        )
        .await,
        1
    );
}

/// An OpenAI-compatible server answering base64 gives exactly the vectors
/// it gives as floats: through the client, and through the daemon with one
/// backend of each encoding (round robin), everything stored with the
/// stand-in's vectors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_base64_and_float_answers_decode_to_the_same_vectors() {
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &[]);
    let texts: Vec<String> = convstore_dataset::generate(20, 51)
        .iter()
        .flat_map(|c| {
            c["messages"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| m["content"].as_str().map(str::to_string))
                .collect::<Vec<_>>()
        })
        .collect();
    let client = |encoding| {
        OpenAiBackend::new(
            "oa",
            &format!("{}/v1", standin.url()),
            MODEL,
            Some("sk-test"),
            encoding,
            ClientConfig {
                timeout: Duration::from_secs(10),
                dimensions: DIMS,
                max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            },
        )
        .expect("client")
    };
    let float = client(EncodingFormat::Float)
        .embed(&texts)
        .await
        .expect("float");
    let base64 = client(EncodingFormat::Base64)
        .embed(&texts)
        .await
        .expect("base64");
    assert_eq!(float, base64);
    let expected: Vec<Vec<f32>> = texts.iter().map(|t| standin_vector(t, DIMS)).collect();
    assert_eq!(base64, expected);

    let other = Standin::start(MODEL, DIMS, CONTEXT, &[]);
    let ws = Workspace::new();
    let addr = write_config(
        &ws,
        &[
            Backend {
                name: "oa-float",
                url: standin.url(),
                kind: "openai",
                keys: "encoding_format = \"float\"",
            },
            Backend {
                name: "oa-base64",
                url: format!("{}/v1", other.url()),
                kind: "openai",
                keys: "encoding_format = \"base64\"\napi_key_env = \"CONVSTORE_TEST_OPENAI_KEY\"",
            },
        ],
        "strategy = \"round_robin\"\nmax_batch_inputs = 8",
        "",
    );
    let daemon =
        Daemon::start_with_env(&ws, &addr, &[("CONVSTORE_TEST_OPENAI_KEY", "sk-test")]).await;
    let data = convstore_dataset::generate(200, 52);
    post_batch(&reqwest::Client::new(), &daemon, &data).await;
    let db = connect_db(&ws.database_url()).await;
    let stored = wait_for_count(
        &db,
        "SELECT count(*) FROM conversations WHERE embedding_status = 'embedded'",
        data.len() as i64,
        Duration::from_secs(300),
    )
    .await;
    assert_eq!(stored, data.len() as i64, "log:\n{}", daemon.log_text());
    assert_exact_vectors(&db, &ids_of(&data)).await;
    for s in [&standin, &other] {
        let stats = s.stats().await;
        assert!(stats["calls"]["openai"].as_u64() > Some(5), "{stats}");
    }
}

/// A second daemon start (empty L1) re-ingesting the same texts makes no
/// backend call: every vector comes from the shared `embedding_cache` (L2),
/// and is the right one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_an_empty_l1_embeds_nothing_again() {
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &[]);
    let ws = Workspace::new();
    let addr = write_config(&ws, &[ollama("s", &standin)], "", "");
    let data = convstore_dataset::generate(300, 61);
    let http = reqwest::Client::new();
    {
        let mut daemon = Daemon::start(&ws, &addr).await;
        post_batch(&http, &daemon, &data).await;
        let db = connect_db(&ws.database_url()).await;
        let stored = wait_for_count(
            &db,
            "SELECT count(*) FROM conversations WHERE embedding_status = 'embedded'",
            data.len() as i64,
            Duration::from_secs(300),
        )
        .await;
        assert_eq!(stored, data.len() as i64, "log:\n{}", daemon.log_text());
        db.close().await;
        assert!(daemon.terminate(Duration::from_secs(60)).success());
    }
    assert!(standin.stats().await["embedded"].as_u64() > Some(0));

    let daemon = Daemon::start(&ws, &addr).await;
    reset_stats(&standin).await; // The start-up warm-up call.
    // The same texts under new ids, so they are stored again, not skipped
    // as duplicates.
    let again: Vec<Value> = data
        .iter()
        .map(|c| {
            let mut c = c.clone();
            c["id"] = json!(format!("{}-again", c["id"].as_str().unwrap_or("")));
            c
        })
        .collect();
    post_batch(&http, &daemon, &again).await;
    let db = connect_db(&ws.database_url()).await;
    let stored = wait_for_count(
        &db,
        "SELECT count(*) FROM conversations WHERE embedding_status = 'embedded'",
        (2 * data.len()) as i64,
        Duration::from_secs(300),
    )
    .await;
    assert_eq!(
        stored,
        (2 * data.len()) as i64,
        "log:\n{}",
        daemon.log_text()
    );
    let stats = standin.stats().await;
    assert_eq!(stats["calls"]["embed"], 0, "no backend call: {stats}");
    assert_exact_vectors(&db, &ids_of(&again)).await;
    let metrics = scrape(&http, &daemon).await;
    assert!(metric(&metrics, "convstore_cache_hits_total", &[("tier", "l2")]) > 0.0);
    assert_eq!(
        metric(&metrics, "convstore_cache_misses_total", &[("tier", "l2")]),
        0.0
    );
}

/// Throughput with 1, 2 and 3 stand-in backends computing one request at a
/// time at 15 ms + 0.5 ms per input (Ollama-like; CONVSTORE_BENCH_LATENCY_MS
/// and CONVSTORE_BENCH_PER_INPUT_MS change them: at 0.5 ms per input the
/// database, not the embedder, bounds the rate). Not a test: run with
/// `cargo test --release --test routing -- --ignored --nocapture throughput`
/// and read the printed conversations/s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; prints throughput"]
async fn throughput_with_one_two_and_three_backends() {
    let n: usize = std::env::var("CONVSTORE_BENCH_CONVERSATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let data = convstore_dataset::sample_or_generated(n).expect("data");
    let knob = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
    let latency_ms = knob("CONVSTORE_BENCH_LATENCY_MS", "15");
    let per_input_ms = knob("CONVSTORE_BENCH_PER_INPUT_MS", "0.5");
    println!(
        "stand-in latency {latency_ms} ms + {per_input_ms} ms per input, one request at a time"
    );
    let mut results = Vec::new();
    for backends in 1..=3usize {
        let standins: Vec<Standin> = (0..backends)
            .map(|_| {
                Standin::start(
                    MODEL,
                    DIMS,
                    CONTEXT,
                    &["--latency-ms", &latency_ms, "--per-input-ms", &per_input_ms],
                )
            })
            .collect();
        let names: Vec<String> = (0..backends).map(|i| format!("b{i}")).collect();
        let list: Vec<Backend<'_>> = standins
            .iter()
            .zip(&names)
            .map(|(s, name)| Backend {
                name,
                url: s.url(),
                kind: "ollama",
                keys: "max_in_flight = 2",
            })
            .collect();
        let ws = Workspace::new();
        let addr = write_config(&ws, &list, "", "[pipeline]\nworkers = 8\n");
        let daemon = Daemon::start(&ws, &addr).await;
        let db = connect_db(&ws.database_url()).await;
        let http = reqwest::Client::new();
        let started = Instant::now();
        post_batch(&http, &daemon, &data).await;
        let stored = wait_for_count(
            &db,
            "SELECT count(*) FROM conversations",
            data.len() as i64,
            Duration::from_secs(1800),
        )
        .await;
        let elapsed = started.elapsed().as_secs_f64();
        assert_eq!(stored, data.len() as i64);
        let mut embedded = 0;
        let mut calls = 0;
        for s in &standins {
            let stats = s.stats().await;
            embedded += stats["embedded"].as_u64().unwrap_or(0);
            calls += stats["calls"]["embed"].as_u64().unwrap_or(0);
        }
        let rate = data.len() as f64 / elapsed;
        println!(
            "{backends} backend(s): {} conversations, {embedded} texts in {calls} calls, {elapsed:.1} s, {rate:.0} conversations/s, {:.0} texts/s",
            data.len(),
            embedded as f64 / elapsed
        );
        results.push((backends, rate));
    }
    println!("{results:?}");
}
