//! Monitoring end to end: `/metrics` against PostgreSQL and the stand-in,
//! `/v1/stats` naming the real bottleneck, `convstore status`, the alert
//! rules under promtool, a real scrape under `promtool check metrics`, the
//! Grafana dashboard, and the status page in headless Chromium.
//!
//! The daemon, the Ollama stand-in and PostgreSQL run as real processes.
//! promtool (Debian's `prometheus`) and `chromium` are installed by
//! scripts/setup.sh; a test that needs one skips with a loud message when it
//! is missing, except under CI (`CI` set), where it fails.
// Test code: a panic on what the test set up itself is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use convstore_telemetry::stats::StatsSnapshot;
use serde_json::{Value, json};
use support::daemon::{BIN, Daemon, Standin, Workspace, connect_db, unused_port, wait_for_count};
use support::exposition::Scrape;

const MODEL: &str = "all-minilm";
const DIMS: usize = 384;
/// all-minilm's context: long conversations become several chunks.
const CONTEXT: usize = 512;
const POISON: &str = "XYZZY-POISON";

/// The repository root (this crate is `crates/daemon`).
const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

// ---- helpers ---------------------------------------------------------------

/// `n` conversations of the shared sample (or the generator), each message
/// made unique with a marker, so no two chunks share a text (and the cache
/// counts are exact).
fn unique_conversations(n: usize, tag: &str) -> Vec<Value> {
    let mut data = convstore_dataset::sample_or_generated(n).expect("test data");
    data.truncate(n);
    assert_eq!(data.len(), n, "not enough test conversations");
    for (i, conv) in data.iter_mut().enumerate() {
        conv["id"] = json!(format!("{tag}-{i}"));
        if let Some(messages) = conv["messages"].as_array_mut() {
            for (j, m) in messages.iter_mut().enumerate() {
                let content = m["content"].as_str().unwrap_or_default();
                m["content"] = json!(format!("{content} [{tag} {i}.{j}]"));
            }
        }
    }
    data
}

async fn get_text(url: &str) -> String {
    let resp = reqwest::get(url).await.expect("GET");
    assert!(resp.status().is_success(), "GET {url}: {}", resp.status());
    resp.text().await.expect("body")
}

async fn scrape(url: &str) -> Scrape {
    let text = get_text(url).await;
    Scrape::parse(&text).unwrap_or_else(|e| panic!("{url} is not valid exposition text: {e}"))
}

async fn stats(daemon: &Daemon) -> StatsSnapshot {
    let text = get_text(&format!("{}/v1/stats", daemon.base_url())).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("/v1/stats: {e}: {text}"))
}

/// Polls until `f` is true about the scrape, or `limit` passes.
async fn wait_for_metrics(url: &str, limit: Duration, f: impl Fn(&Scrape) -> bool) -> Scrape {
    let started = Instant::now();
    loop {
        let s = scrape(url).await;
        if f(&s) || started.elapsed() > limit {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The external tool `name`, or `None` (with a loud message) when it is
/// missing outside CI. Under CI a missing tool fails the test.
fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let msg = format!(
            "`{name}` is not installed: run scripts/setup.sh as root (or apt-get install {})",
            if name == "promtool" {
                "prometheus"
            } else {
                name
            }
        );
        if std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false") {
            panic!("{msg}; CI must have it");
        }
        eprintln!("\n{}\nSKIPPED: {msg}\n{}\n", "!".repeat(78), "!".repeat(78));
    }
    found
}

/// Metric names declared in src/telemetry/metrics.rs (the one place).
fn declared_metrics() -> BTreeSet<String> {
    let source = std::fs::read_to_string(Path::new(REPO).join("crates/telemetry/src/metrics.rs"))
        .expect("read metrics.rs");
    metric_names_in(&source)
}

fn metric_names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("convstore_") {
        let start = i + pos;
        let before_ok =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end].is_ascii_digit()
                || bytes[end] == b'_')
        {
            end += 1;
        }
        if before_ok {
            names.insert(text[start..end].to_string());
        }
        i = end;
    }
    names
}

/// The declared family a name used in PromQL refers to.
fn family_for(name: &str, declared: &BTreeSet<String>) -> Option<String> {
    if declared.contains(name) {
        return Some(name.to_string());
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|s| {
        name.strip_suffix(s)
            .filter(|base| declared.contains(*base))
            .map(str::to_string)
    })
}

async fn post(client: &reqwest::Client, url: String, ct: &str, body: Vec<u8>) -> reqwest::Response {
    client
        .post(url)
        .header("content-type", ct)
        .body(body)
        .send()
        .await
        .expect("post")
}

// ---- /metrics agrees with PostgreSQL and the stand-in ------------------------

/// After a known set is ingested over both transports (with invalid
/// requests, a poison input, duplicates and re-sent texts), every counter
/// in `/metrics` equals what PostgreSQL holds, what the stand-in counted,
/// and what the test sent; `/v1/stats` and `convstore status` agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_agree_exactly_with_postgres_and_the_standin() {
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &["--poison", POISON]);
    let ws = Workspace::new();
    let addr = ws.write_config(
        &standin.url(),
        MODEL,
        DIMS,
        "[queue]\ncapacity = 20000\nmax_backlog_seconds = 0\n[cache]\nmax_entries = 100000\n",
    );
    let daemon = Daemon::start(&ws, &addr).await;
    let base = daemon.base_url();
    let http = reqwest::Client::new();
    // Start-up (probe, warm-up) may already have called the stand-in.
    let at_start = standin.stats().await;

    let mut data = unique_conversations(200, "m");
    // One chunk the stand-in refuses (stored as failed), outside the
    // conversations re-sent below (a failed chunk is not cached).
    data[150]["messages"][0]["content"] = json!(format!("please {POISON} me"));

    // Phase 1: 200 conversations over every route, plus refused requests.
    for conv in &data[..50] {
        let resp = post(
            &http,
            format!("{base}/v1/conversations"),
            "application/json",
            serde_json::to_vec(conv).unwrap(),
        )
        .await;
        assert_eq!(resp.status(), 202);
    }
    // Refused requests: the metrics must count each under the code the
    // daemon answered with.
    let mut refused: BTreeMap<String, f64> = BTreeMap::new();
    for (ct, body, status) in [
        (
            "application/json",
            &br#"{"channel":"web","messages":[{"role":"user","content":"no user"}]}"#[..],
            400,
        ),
        ("application/json", &b"{\"user_id\": "[..], 400),
        ("text/plain", &b"hello"[..], 415),
    ] {
        let resp = post(&http, format!("{base}/v1/conversations"), ct, body.to_vec()).await;
        assert_eq!(resp.status(), status);
        let err: Value = resp.json().await.expect("JSON error body");
        let code = err["error"]["code"]
            .as_str()
            .expect("error code")
            .to_string();
        *refused.entry(code).or_default() += 1.0;
    }
    assert_eq!(refused.len(), 3, "three different refusals: {refused:?}");
    let mut batch: Vec<Value> = data[50..100].to_vec();
    batch.push(json!({"user_id": "u", "channel": "web"}));
    batch.push(json!({"user_id": "u", "channel": "web", "messages": []}));
    let resp = post(
        &http,
        format!("{base}/v1/conversations/batch"),
        "application/json",
        serde_json::to_vec(&batch).unwrap(),
    )
    .await;
    assert_eq!(resp.status(), 202);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        (body["accepted"].as_u64(), body["rejected"].as_u64()),
        (Some(50), Some(2))
    );

    let mut unix = daemon.unix_client();
    for conv in &data[100..150] {
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
    for part in data[150..200].chunks(25) {
        let mut ndjson = Vec::new();
        for conv in part {
            ndjson.extend(serde_json::to_vec(conv).unwrap());
            ndjson.push(b'\n');
        }
        let resp = unix
            .post_json(
                "/v1/conversations/batch",
                "application/x-ndjson",
                Bytes::from(ndjson),
            )
            .await
            .expect("unix batch");
        assert_eq!(resp.status, 202, "{}", String::from_utf8_lossy(&resp.body));
    }
    let pool = connect_db(&ws.database_url()).await;
    let stored = wait_for_count(
        &pool,
        "SELECT count(*) FROM conversations",
        200,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(
        stored,
        200,
        "phase 1 not stored; log:\n{}",
        daemon.log_text()
    );
    let after_phase_1 =
        wait_for_metrics(&format!("{base}/metrics"), Duration::from_secs(10), |s| {
            s.sum("convstore_conversations_stored_total", &[]) == 200.0
        })
        .await;
    // Every conversation of phase 1 is new: each batch wrote once.
    let transactions = |s: &Scrape| s.value("convstore_store_duration_seconds_count", &[]);
    let batches = |s: &Scrape| s.value("convstore_batch_conversations_count", &[]);
    assert_eq!(
        batches(&after_phase_1),
        transactions(&after_phase_1),
        "one transaction per batch"
    );

    // Phase 2, once phase 1 is cached: 20 duplicates (same ids) over TCP and
    // 20 copies under new ids over the socket; every chunk is a cache hit.
    for conv in &data[..20] {
        let resp = post(
            &http,
            format!("{base}/v1/conversations"),
            "application/json",
            serde_json::to_vec(conv).unwrap(),
        )
        .await;
        assert_eq!(resp.status(), 202);
    }
    for (i, conv) in data[20..40].iter().enumerate() {
        let mut copy = conv.clone();
        copy["id"] = json!(format!("again-{}", i + 20));
        let resp = unix
            .post_json(
                "/v1/conversations",
                "application/json",
                Bytes::from(serde_json::to_vec(&copy).unwrap()),
            )
            .await
            .expect("unix post");
        assert_eq!(resp.status, 202);
    }
    let stored = wait_for_count(
        &pool,
        "SELECT count(*) FROM conversations",
        220,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(stored, 220);
    let m = wait_for_metrics(&format!("{base}/metrics"), Duration::from_secs(10), |s| {
        s.sum("convstore_conversations_stored_total", &[]) == 220.0
            && s.sum("convstore_conversations_duplicate_total", &[]) == 20.0
    })
    .await;

    // --- PostgreSQL ---
    let count = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pool)
                .await
                .expect(sql) as f64
        }
    };
    let conversations = count("SELECT count(*) FROM conversations").await;
    let chunks = count("SELECT count(*) FROM conversation_chunks").await;
    assert_eq!(
        m.value("convstore_conversations_stored_total", &[]),
        conversations
    );
    assert_eq!(
        m.value("convstore_store_rows_total", &[("table", "conversations")]),
        conversations
    );
    assert_eq!(
        m.value(
            "convstore_store_rows_total",
            &[("table", "conversation_chunks")]
        ),
        chunks
    );
    for status in ["embedded", "pending", "failed"] {
        let n = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM conversation_chunks WHERE embedding_status = $1",
        )
        .bind(status)
        .fetch_one(&pool)
        .await
        .unwrap() as f64;
        assert_eq!(
            m.value("convstore_chunks_stored_total", &[("status", status)]),
            n,
            "chunks {status}"
        );
    }
    let failed_chunks = m.value("convstore_chunks_stored_total", &[("status", "failed")]);
    assert!(failed_chunks >= 1.0, "the poison chunk is stored as failed");
    assert_eq!(
        m.value("convstore_conversations_duplicate_total", &[]),
        20.0
    );
    assert_eq!(m.sum("convstore_conversations_failed_total", &[]), 0.0);

    // --- what the test sent ---
    let ingest = |t: &str, o: &str| {
        m.sum(
            "convstore_ingest_conversations_total",
            &[("transport", t), ("outcome", o)],
        )
    };
    assert_eq!(ingest("tcp", "accepted"), 50.0 + 50.0 + 20.0);
    assert_eq!(ingest("unix", "accepted"), 50.0 + 50.0 + 20.0);
    assert_eq!(ingest("tcp", "rejected"), 2.0);
    for (code, n) in &refused {
        assert_eq!(ingest("tcp", code), *n, "refused with {code}");
    }
    assert_eq!(
        m.sum(
            "convstore_ingest_conversations_total",
            &[("transport", "unix")]
        ),
        120.0
    );
    let requests = |t: &str, e: &str, o: &str| {
        m.sum(
            "convstore_ingest_requests_total",
            &[("transport", t), ("endpoint", e), ("outcome", o)],
        )
    };
    assert_eq!(requests("tcp", "conversations", "accepted"), 70.0);
    assert_eq!(requests("tcp", "batch", "partial"), 1.0);
    assert_eq!(requests("unix", "conversations", "accepted"), 70.0);
    assert_eq!(requests("unix", "batch", "accepted"), 2.0);
    // Every accepted conversation went through each stage once.
    let accepted = 240.0;
    for h in [
        "convstore_enqueue_duration_seconds",
        "convstore_queue_wait_seconds",
        "convstore_end_to_end_seconds",
    ] {
        assert_eq!(m.value(&format!("{h}_count"), &[]), accepted, "{h}");
    }
    assert_eq!(m.value("convstore_batch_conversations_sum", &[]), accepted);
    // Phase 2's batches write at most once each: one made only of the
    // duplicates has nothing to write (their stored versions stand).
    let phase_2_batches = batches(&m) - batches(&after_phase_1);
    let phase_2_transactions = transactions(&m) - transactions(&after_phase_1);
    assert!(
        phase_2_transactions <= phase_2_batches && phase_2_transactions >= 1.0,
        "phase 2: {phase_2_transactions} transactions for {phase_2_batches} batches"
    );

    // --- the stand-in ---
    let s = standin.stats().await;
    let n = |v: &Value| v.as_f64().expect("number");
    let embed_calls = n(&s["calls"]["embed"]) + n(&s["calls"]["openai"]);
    assert_eq!(
        m.sum("convstore_embed_requests_total", &[]),
        embed_calls,
        "stand-in: {s}"
    );
    assert_eq!(
        m.sum("convstore_embed_requests_total", &[("outcome", "rejected")]),
        n(&s["outcomes"]["poisoned"])
    );
    assert_eq!(m.sum("convstore_embed_inputs_total", &[]), n(&s["inputs"]));
    assert_eq!(
        m.sum("convstore_embed_inputs_total", &[("outcome", "ok")]),
        n(&s["embedded"])
    );
    assert_eq!(
        m.sum("convstore_embed_duration_seconds_count", &[]),
        embed_calls
    );

    // --- the cache ---
    let phase1_chunks = count("SELECT count(*) FROM conversation_chunks ch JOIN conversations c ON c.id = ch.conversation_id WHERE c.client_id LIKE 'm-%'").await;
    // Texts sent again under new ids hit the cache; a retry under the same
    // id with the same content is folded away before chunking (issue 16):
    // no chunk, no lookup.
    let resent_chunks = count(
        "SELECT count(*) FROM conversation_chunks ch JOIN conversations c ON c.id = ch.conversation_id \
         WHERE c.client_id LIKE 'again-%'",
    )
    .await;
    assert_eq!(
        m.value("convstore_cache_misses_total", &[("tier", "l1")]),
        phase1_chunks,
        "every phase-1 chunk missed once"
    );
    assert_eq!(
        m.value("convstore_cache_hits_total", &[("tier", "l1")]),
        resent_chunks,
        "every re-sent chunk hit"
    );
    // A second tier, when there is one, saw exactly the first tier's misses.
    if !m
        .samples("convstore_cache_misses_total", &[("tier", "l2")])
        .is_empty()
    {
        let l2 = m.sum("convstore_cache_hits_total", &[("tier", "l2")])
            + m.sum("convstore_cache_misses_total", &[("tier", "l2")]);
        assert_eq!(l2, phase1_chunks);
    }
    // Since start-up, the stand-in embedded every chunk that missed, except
    // the poison.
    assert_eq!(
        n(&s["embedded"]) - n(&at_start["embedded"]),
        phase1_chunks - failed_chunks
    );

    // --- /v1/stats tells the same story ---
    let st = stats(&daemon).await;
    assert_eq!(st.totals.stored as f64, conversations);
    assert_eq!(st.totals.duplicates, 20);
    assert_eq!(st.totals.accepted as f64, accepted);
    assert_eq!(st.totals.rejected, 5);
    assert_eq!(st.totals.chunks_failed as f64, failed_chunks);
    assert_eq!(st.totals.embed_requests as f64, embed_calls);
    let l1 = st
        .cache
        .tiers
        .iter()
        .find(|t| t.tier == "l1")
        .expect("l1 tier in /v1/stats");
    assert_eq!(
        (l1.hits as f64, l1.misses as f64),
        (resent_chunks, phase1_chunks)
    );
    assert_eq!(st.queue.capacity, 20_000);
    assert!(
        st.latency.end_to_end.count > 0 && st.latency.enqueue.p99_ms.is_some(),
        "{st:?}"
    );
    let b = st.bottleneck.as_ref().expect("a bottleneck after storing");
    assert!((0.0..=1.0).contains(&b.share), "{b:?}");

    // --- convstore status, over the Unix socket ---
    let out = Command::new(BIN)
        .args(["status", "--socket"])
        .arg(&daemon.socket)
        .output()
        .expect("run convstore status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("convstore status:\n{text}");
    for needle in [
        "HEALTH: ",
        "QUEUE",
        "LATENCY",
        "end to end",
        "BOTTLENECK",
        "stored 220",
        "duplicates 20",
        "standin",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    assert!(!text.contains('\x1b'), "no colours when not on a terminal");
    let out = Command::new(BIN)
        .args(["status", "--json", "--url", &base])
        .output()
        .expect("run convstore status --json");
    assert!(out.status.success());
    let json: StatsSnapshot =
        serde_json::from_slice(&out.stdout).expect("status --json is /v1/stats");
    assert_eq!(json.totals.stored, 220);
    let out = Command::new(BIN)
        .args(["status", "--socket", "/nonexistent/convstore.sock"])
        .output()
        .expect("run convstore status");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is convstore running"));
}

// ---- the bottleneck ----------------------------------------------------------

/// Sends `n` conversations in batches of 10, a few per second, and waits
/// until PostgreSQL has them all.
async fn trickle(daemon: &Daemon, ws: &Workspace, data: &[Value]) {
    let http = reqwest::Client::new();
    for batch in data.chunks(10) {
        let resp = post(
            &http,
            format!("{}/v1/conversations/batch", daemon.base_url()),
            "application/json",
            serde_json::to_vec(batch).unwrap(),
        )
        .await;
        assert_eq!(resp.status(), 202);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let pool = connect_db(&ws.database_url()).await;
    let n = wait_for_count(
        &pool,
        "SELECT count(*) FROM conversations",
        data.len() as i64,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(
        n,
        data.len() as i64,
        "not all stored; log:\n{}",
        daemon.log_text()
    );
}

/// With the stand-in answering slowly, `/v1/stats` names embedding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bottleneck_is_the_slow_embedder() {
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &[]);
    let ws = Workspace::new();
    let addr = ws.write_config(&standin.url(), MODEL, DIMS, "");
    let daemon = Daemon::start(&ws, &addr).await;
    standin
        .set_faults(json!({"latency_per_request_ms": 300.0}))
        .await;

    trickle(&daemon, &ws, &unique_conversations(60, "slow-embed")).await;
    let st = stats(&daemon).await;
    let b = st.bottleneck.clone().expect("bottleneck");
    println!("bottleneck: {b:#?}");
    assert_eq!(b.stage, "embed", "{b:#?}");
    assert!(b.share > 0.5, "{b:#?}");
    let embed = b.stages.iter().find(|s| s.stage == "embed").unwrap();
    let store = b.stages.iter().find(|s| s.stage == "store").unwrap();
    assert!(embed.mean_ms > store.mean_ms, "{b:#?}");
    assert!(
        st.latency.embed.p50_ms.unwrap() >= 250.0,
        "{:?}",
        st.latency.embed
    );
    assert!(
        st.health.reasons.iter().any(|r| r.code == "embed_slow"),
        "{:#?}",
        st.health
    );
    assert_ne!(
        st.health.status,
        convstore_telemetry::stats::Verdict::Healthy
    );
}

/// A chunk the backend refused is stored `failed`, visible in GET and the
/// metrics; `convstore redrive` puts it back to `pending`, and the
/// backfill embeds it once the backend takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_chunks_are_visible_and_redriven() {
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &["--poison", POISON]);
    let ws = Workspace::new();
    let addr = ws.write_config(
        &standin.url(),
        MODEL,
        DIMS,
        "[backfill]\ninterval_ms = 300\n",
    );
    let daemon = Daemon::start(&ws, &addr).await;
    let base = daemon.base_url();
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{base}/v1/conversations?wait=stored"))
        .json(&json!({"id": "poisoned", "user_id": "u", "channel": "web",
                      "messages": [{"role": "user", "content": format!("please {POISON} me")}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let statuses = |body: &Value| -> Vec<String> {
        body["chunks"]
            .as_array()
            .map(|c| {
                c.iter()
                    .filter_map(|c| c["embedding_status"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let got: Value = http
        .get(format!("{base}/v1/conversations/poisoned"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(statuses(&got), ["failed"], "{got}");
    assert_eq!(got["embedding_status"], "failed", "{got}");

    // The backend takes it now; a redrive puts it back for the backfill.
    standin.set_faults(json!({"poison": []})).await;
    let redrive = |expect: &'static str| {
        let out = Command::new(BIN)
            .args(["redrive", "--url", &base])
            .arg("--config")
            .arg(ws.config_path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(text.contains(expect), "{text}");
    };
    redrive("re-drove 1 failed chunks of 1 conversations");
    let started = Instant::now();
    loop {
        let got: Value = http
            .get(format!("{base}/v1/conversations/poisoned"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if statuses(&got) == ["embedded"] && got["embedding_status"] == "embedded" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not embedded after the redrive: {got}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Nothing left to re-drive: safe to repeat.
    redrive("re-drove 0 failed chunks of 0 conversations");
    let s = scrape(&format!("{base}/metrics")).await;
    assert_eq!(s.value("convstore_chunks_redriven_total", &[]), 1.0);
}

/// Freshness during a backend outage: conversations stored without
/// vectors show in the pending age and the coverage (metrics and
/// `/v1/stats`), and both recover once the backend is back and the
/// backfill has embedded them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freshness_shows_a_backend_outage_and_its_recovery() {
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &[]);
    let ws = Workspace::new();
    let addr = ws.write_config(
        &standin.url(),
        MODEL,
        DIMS,
        "[backfill]\ninterval_ms = 500\nmax_defer_ms = 1000\n",
    );
    let daemon = Daemon::start(&ws, &addr).await;
    let base = daemon.base_url();
    let metrics_url = format!("{base}/metrics");
    let http = reqwest::Client::new();
    // Some embedded before the outage.
    for conv in unique_conversations(10, "fresh-before") {
        let resp = http
            .post(format!("{base}/v1/conversations?wait=stored"))
            .json(&conv)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
    }
    standin.set_faults(json!({"down": true})).await;
    for conv in unique_conversations(10, "fresh-outage") {
        let resp = http
            .post(format!("{base}/v1/conversations?wait=stored"))
            .json(&conv)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201, "stored without a vector");
    }
    // Sampled from the database every 10 s.
    let during = wait_for_metrics(&metrics_url, Duration::from_secs(40), |s| {
        s.value("convstore_pending_embedding_oldest_age_seconds", &[]) > 0.0
            && s.value("convstore_embedding_coverage_ratio", &[]) < 1.0
    })
    .await;
    let coverage = during.value("convstore_embedding_coverage_ratio", &[]);
    let age = during.value("convstore_pending_embedding_oldest_age_seconds", &[]);
    let pool = connect_db(&ws.database_url()).await;
    let (embedded, total): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE embedding_status = 'embedded'), count(*) FROM conversation_chunks",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        total > embedded && embedded > 0,
        "{embedded} of {total} embedded"
    );
    assert!(coverage > 0.0 && coverage < 1.0, "coverage {coverage}");
    let st = stats(&daemon).await;
    let pending = st.pending_embedding.clone().expect("pending sampled");
    assert!(
        pending.oldest_age_seconds.is_some_and(|a| a > 0.0),
        "{pending:?}"
    );
    assert!(pending.coverage.is_some_and(|c| c < 1.0), "{pending:?}");
    assert_eq!(st.queue.oldest_age_seconds, None, "the queue is empty");
    println!(
        "during the outage: coverage {coverage:.3} ({embedded} of {total} chunks), oldest pending {age:.1} s"
    );

    standin.set_faults(json!({"down": false})).await;
    let after = wait_for_metrics(&metrics_url, Duration::from_secs(60), |s| {
        s.value("convstore_embedding_coverage_ratio", &[]) == 1.0
            && s.value("convstore_pending_embedding_oldest_age_seconds", &[]) == 0.0
    })
    .await;
    assert_eq!(after.value("convstore_queue_oldest_age_seconds", &[]), 0.0);
    let st = stats(&daemon).await;
    let pending = st.pending_embedding.expect("pending sampled");
    assert_eq!(pending.coverage, Some(1.0));
    assert_eq!(pending.oldest_age_seconds, None);
}

/// With every insert into `conversations` sleeping in a trigger, the
/// database is the slow part and `/v1/stats` names the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bottleneck_is_the_slow_database() {
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &[]);
    let ws = Workspace::new();
    let addr = ws.write_config(&standin.url(), MODEL, DIMS, "");
    let daemon = Daemon::start(&ws, &addr).await;
    let pool = connect_db(&ws.database_url()).await;
    for sql in [
        "CREATE FUNCTION test_slow_insert() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_sleep(0.3); RETURN NULL; END $$",
        "CREATE TRIGGER test_slow_insert AFTER INSERT ON conversations \
         FOR EACH STATEMENT EXECUTE FUNCTION test_slow_insert()",
    ] {
        sqlx::query(sql).execute(&pool).await.expect(sql);
    }

    trickle(&daemon, &ws, &unique_conversations(60, "slow-db")).await;
    let st = stats(&daemon).await;
    let b = st.bottleneck.clone().expect("bottleneck");
    println!("bottleneck: {b:#?}");
    assert_eq!(b.stage, "store", "{b:#?}");
    assert!(b.share > 0.5, "{b:#?}");
    // Each batch sleeps 300 ms in the trigger; the window's percentiles
    // come from log-linear buckets (~19 % wide), so p50 may read a little
    // under it (294.9 ms was seen), as in the slow-embedder test.
    assert!(
        st.latency.store.p50_ms.unwrap() >= 250.0,
        "{:?}",
        st.latency.store
    );
    let store_slow = st.health.reasons.iter().find(|r| r.code == "store_slow");
    assert_eq!(
        store_slow.map(|r| r.severity),
        Some(convstore_telemetry::stats::Verdict::Critical),
        "{:#?}",
        st.health
    );
    assert_eq!(
        st.health.status,
        convstore_telemetry::stats::Verdict::Critical
    );
}

// ---- promtool ---------------------------------------------------------------

/// The rules load, every unit test passes, and every alert has a test where
/// it fires and one where it stays silent.
#[test]
fn alert_rules_pass_promtool_and_every_alert_fires_and_stays_silent() {
    let dir = Path::new(REPO).join("monitoring/prometheus");
    let rules = std::fs::read_to_string(dir.join("alerts.yml")).expect("alerts.yml");
    let tests = std::fs::read_to_string(dir.join("alerts_test.yml")).expect("alerts_test.yml");

    // Coverage, from the YAML itself.
    let rules_doc = &yaml_rust2::YamlLoader::load_from_str(&rules).expect("alerts.yml is YAML")[0];
    let mut alerts = BTreeSet::new();
    let declared = declared_metrics();
    for group in rules_doc["groups"].as_vec().expect("groups") {
        for rule in group["rules"].as_vec().expect("rules") {
            let name = rule["alert"].as_str().expect("alert name").to_string();
            let expr = rule["expr"].as_str().expect("expr");
            for metric in metric_names_in(expr) {
                assert!(
                    family_for(&metric, &declared).is_some(),
                    "{name} uses {metric}, which src/telemetry/metrics.rs does not declare"
                );
            }
            assert!(
                matches!(
                    rule["labels"]["severity"].as_str(),
                    Some("warning" | "critical")
                ),
                "{name}: severity"
            );
            assert!(
                rule["annotations"]["summary"].as_str().is_some(),
                "{name}: summary"
            );
            alerts.insert(name);
        }
    }
    for required in [
        "ConvstoreQueueHalfFull",
        "ConvstoreQueueNearlyFull",
        "ConvstoreEnqueueSlow",
        "ConvstoreEmbeddingSlow",
        "ConvstoreEmbeddingVerySlow",
        "ConvstoreStoreSlow",
        "ConvstoreStoreVerySlow",
        "ConvstoreSuccessRateLow",
        "ConvstoreSuccessRateCritical",
        "ConvstoreBackendDown",
        "ConvstorePendingEmbeddingsGrowing",
        "ConvstoreDown",
    ] {
        assert!(
            alerts.contains(required),
            "{required} missing from alerts.yml"
        );
    }
    let tests_doc =
        &yaml_rust2::YamlLoader::load_from_str(&tests).expect("alerts_test.yml is YAML")[0];
    let mut fires: BTreeMap<String, usize> = BTreeMap::new();
    let mut silent: BTreeMap<String, usize> = BTreeMap::new();
    for case in tests_doc["tests"].as_vec().expect("tests") {
        for check in case["alert_rule_test"].as_vec().expect("alert_rule_test") {
            let name = check["alertname"].as_str().expect("alertname").to_string();
            let expected = check["exp_alerts"].as_vec().map_or(0, Vec::len);
            *if expected == 0 {
                &mut silent
            } else {
                &mut fires
            }
            .entry(name)
            .or_default() += 1;
        }
    }
    for alert in &alerts {
        assert!(fires.contains_key(alert), "no test where {alert} fires");
        assert!(
            silent.contains_key(alert),
            "no test where {alert} stays silent"
        );
    }

    let Some(promtool) = tool("promtool") else {
        return;
    };
    let run = |args: &[&str]| {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("run promtool");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
        text
    };
    let checked = run(&["check", "rules", "alerts.yml"]);
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", alerts.len())),
        "{checked}"
    );
    let tested = run(&["test", "rules", "alerts_test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
    println!("{checked}{tested}");
}

/// A real scrape of a running daemon, on the API listener and on the
/// metrics-only listener, passes `promtool check metrics`; and the status
/// page, loaded by headless Chromium from the daemon, renders numbers from
/// `/v1/stats` (the screenshot path is printed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_scrape_passes_promtool_and_the_status_page_renders_in_chromium() {
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &[]);
    let ws = Workspace::new();
    let metrics_addr = format!("127.0.0.1:{}", unused_port());
    let addr = ws.write_config(
        &standin.url(),
        MODEL,
        DIMS,
        &format!("[metrics]\nlisten = \"{metrics_addr}\"\n"),
    );
    let daemon = Daemon::start(&ws, &addr).await;
    let data = unique_conversations(40, "scrape");
    let http = reqwest::Client::new();
    let resp = post(
        &http,
        format!("{}/v1/conversations/batch", daemon.base_url()),
        "application/json",
        serde_json::to_vec(&data).unwrap(),
    )
    .await;
    assert_eq!(resp.status(), 202);
    let pool = connect_db(&ws.database_url()).await;
    assert_eq!(
        wait_for_count(
            &pool,
            "SELECT count(*) FROM conversations",
            40,
            Duration::from_secs(60)
        )
        .await,
        40
    );

    let main_text = get_text(&format!("{}/metrics", daemon.base_url())).await;
    let side_text = get_text(&format!("http://{metrics_addr}/metrics")).await;
    let main = Scrape::parse(&main_text).expect("main scrape parses");
    let side = Scrape::parse(&side_text).expect("metrics listener scrape parses");
    assert_eq!(
        main.value("convstore_conversations_stored_total", &[]),
        40.0
    );
    assert_eq!(
        side.value("convstore_conversations_stored_total", &[]),
        40.0
    );
    let only_metrics = reqwest::get(format!("http://{metrics_addr}/v1/stats"))
        .await
        .unwrap();
    assert_eq!(
        only_metrics.status(),
        404,
        "the metrics listener serves only /metrics"
    );

    // Every family is declared in metrics.rs, has help, and the process
    // metrics are there.
    let declared = declared_metrics();
    for (name, family) in &main.families {
        assert!(
            declared.contains(name),
            "{name} is exported but not declared in src/telemetry/metrics.rs"
        );
        assert!(family.help.is_some(), "{name} has no HELP");
    }
    for name in [
        "convstore_process_resident_memory_bytes",
        "convstore_process_cpu_seconds_total",
        "convstore_process_open_fds",
        "convstore_queue_capacity",
        "convstore_build_info",
        "convstore_backend_up",
        "convstore_end_to_end_seconds",
    ] {
        assert!(
            main.family(name).is_some(),
            "{name} missing from the scrape"
        );
    }
    assert!(main.value("convstore_process_resident_memory_bytes", &[]) > 1e6);
    println!("--- /metrics sample ---\n{}", sample_of(&main_text));

    if let Some(promtool) = tool("promtool") {
        for (what, text) in [
            ("API listener", &main_text),
            ("metrics listener", &side_text),
        ] {
            let mut child = Command::new(&promtool)
                .args(["check", "metrics"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("run promtool");
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            let report = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.status.success() && report.trim().is_empty(),
                "promtool check metrics ({what}):\n{report}"
            );
        }
    }

    let Some(chromium) = tool("chromium") else {
        return;
    };
    let st = stats(&daemon).await;
    assert_eq!(st.totals.stored, 40);
    let profile = tempfile::tempdir().unwrap();
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("monitoring");
    std::fs::create_dir_all(&shots).unwrap();
    let png = shots.join("status-page.png");
    let _ = std::fs::remove_file(&png);
    let url = format!("{}/", daemon.base_url());
    let headless = |extra: &[String]| {
        let out = Command::new(&chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--virtual-time-budget=10000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(&url)
            .output()
            .expect("run chromium");
        assert!(
            out.status.success(),
            "chromium failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    headless(&[
        format!("--screenshot={}", png.display()),
        "--window-size=1400,1800".into(),
    ]);
    let image = std::fs::read(&png).expect("screenshot written");
    assert!(
        image.starts_with(b"\x89PNG\r\n\x1a\n") && image.len() > 20_000,
        "not a real screenshot"
    );
    println!("status page screenshot: {}", png.display());

    let dom = headless(&["--dump-dom".into()]);
    let rendered = |path: &str| -> Option<String> {
        let marker = format!("data-stat=\"{path}\"");
        let at = dom.find(&marker)?;
        let tag_end = at + dom[at..].find('>')?;
        let tag = &dom[dom[..at].rfind('<')?..tag_end];
        let value = tag
            .split("data-value=\"")
            .nth(1)?
            .split('"')
            .next()?
            .to_string();
        let text_end = tag_end + 1 + dom[tag_end + 1..].find('<')?;
        let text = &dom[tag_end + 1..text_end];
        Some(format!("{value}|{text}"))
    };
    assert_eq!(
        rendered("totals.stored").as_deref(),
        Some("40|40"),
        "DOM:\n{dom}"
    );
    assert_eq!(
        rendered("queue.capacity"),
        Some(format!(
            "{}|{}",
            st.queue.capacity,
            group(st.queue.capacity)
        ))
    );
    assert_eq!(rendered("totals.accepted").as_deref(), Some("40|40"));
    assert!(rendered("health.status").is_some_and(|v| v.ends_with(st.health.status.as_str())));
    assert!(
        dom.contains("data-stat=\"latency.end_to_end.count\""),
        "latency table rendered"
    );
    // The page's script holds the error text too: look at the error box.
    let error_box = dom
        .find("id=\"error\"")
        .and_then(|at| {
            let open_end = at + dom[at..].find('>')?;
            let close = open_end + dom[open_end..].find("</div>")?;
            Some(dom[open_end + 1..close].trim().to_string())
        })
        .expect("the page has its error box");
    assert!(
        error_box.is_empty(),
        "the page could not read /v1/stats: {error_box}"
    );
}

/// 10000 → "10,000", as the page's en-US formatting writes it.
fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A few families of a scrape, for the test output.
fn sample_of(text: &str) -> String {
    let wanted = [
        "convstore_ingest_conversations_total",
        "convstore_queue_depth",
        "convstore_end_to_end_seconds",
        "convstore_process_resident_memory_bytes",
    ];
    let mut out = String::new();
    for line in text.lines() {
        if wanted.iter().any(|w| line.contains(w)) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

// ---- Grafana ----------------------------------------------------------------

/// The dashboard is Grafana JSON with a datasource variable; every panel
/// queries through it, every query is valid PromQL (promtool parses it as a
/// rule) over metrics declared in src/telemetry/metrics.rs, and the panels
/// cover what operators need.
#[test]
fn grafana_dashboard_is_valid_and_queries_real_metrics() {
    let path = Path::new(REPO).join("monitoring/grafana/convstore.json");
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard"))
        .expect("dashboard is JSON");
    assert!(
        dash["title"]
            .as_str()
            .is_some_and(|t| t.contains("convstore"))
    );
    assert!(dash["schemaVersion"].as_u64().is_some_and(|v| v >= 30));
    let vars = dash["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let ds = vars
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(ds["query"], "prometheus");
    let ds_name = ds["name"].as_str().unwrap().to_string();

    let declared = declared_metrics();
    let mut exprs = Vec::new();
    let mut titles = Vec::new();
    let mut ids = BTreeSet::new();
    for panel in dash["panels"].as_array().expect("panels") {
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "duplicate panel id"
        );
        let title = panel["title"].as_str().unwrap_or_default().to_string();
        if panel["type"] == "row" {
            continue;
        }
        assert!(panel["gridPos"]["w"].as_u64().is_some(), "{title}: gridPos");
        assert_eq!(
            panel["datasource"]["uid"],
            format!("${{{ds_name}}}"),
            "{title}: datasource"
        );
        let targets = panel["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("panel {title} has no targets"));
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{title}: target without expr"));
            let names = metric_names_in(expr);
            assert!(
                !names.is_empty(),
                "{title}: {expr} queries no convstore metric"
            );
            for name in names {
                assert!(
                    family_for(&name, &declared).is_some(),
                    "{title}: {name} is not declared in src/telemetry/metrics.rs"
                );
            }
            exprs.push((title.clone(), expr.to_string()));
        }
        titles.push(title.to_lowercase());
    }
    for topic in [
        "ingest", "queue", "latency", "cache", "backend", "pending", "rows", "memory", "cpu",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(topic)),
            "no panel about {topic}: {titles:?}"
        );
    }
    for stage in [
        "enqueue",
        "queue_wait",
        "embed_duration",
        "store_duration",
        "end_to_end",
    ] {
        assert!(
            exprs
                .iter()
                .any(|(_, e)| e.contains(stage) && e.contains("histogram_quantile")),
            "no percentile panel for {stage}"
        );
    }

    // PromQL validity: every expression as a recording rule, variables
    // replaced as Grafana would.
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in exprs.iter().enumerate() {
        let concrete = expr
            .replace("$__rate_interval", "5m")
            .replace("$__interval", "1m")
            .replace("${instance:regex}", ".+")
            .replace("$instance", ".+")
            .replace("$job", "convstore");
        rules.push_str(&format!(
            "      - record: dashboard:expr{i}\n        expr: {}\n",
            serde_json::to_string(&concrete).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-rules.yml");
    std::fs::write(&file, rules).unwrap();
    let out = Command::new(promtool)
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("promtool");
    assert!(
        out.status.success(),
        "dashboard queries are not valid PromQL:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The test parser refuses what Prometheus would refuse.
#[test]
fn exposition_parser_is_strict() {
    let ok = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"z\"} 3\n\
              # TYPE h histogram\nh_bucket{le=\"0.1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.3\nh_count 2\n";
    let s = Scrape::parse(ok).unwrap();
    assert_eq!(s.value("a_total", &[("y", "q\"z")]), 3.0);
    assert_eq!(s.value("h_count", &[]), 2.0);
    for bad in [
        "a 1\n",
        "# TYPE a gauge\na{x=1} 1\n",
        "# TYPE a gauge\na 1\na 2\n",
        "# TYPE a gauge\na one\n",
        "# TYPE a counter\na 1\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n",
    ] {
        assert!(Scrape::parse(bad).is_err(), "accepted {bad:?}");
    }
}
