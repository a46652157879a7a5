//! Changing the embedding model without downtime (issue 20, docs/SEARCH.md
//! "Changing the model"), with the real daemon, a real PostgreSQL and the
//! stand-in as a backend that serves both models (as an Ollama that has
//! pulled both): after a restart with another model and dimension, search
//! keeps answering from the previous model's vectors while the backfill
//! re-embeds every chunk, then switches; the previous vectors follow
//! deletions, and the next start drops them.
// Test code: a panic on what the test set up itself is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::daemon::{Daemon, Standin, Workspace, connect_db};
use support::exposition::Scrape;

const OLD_MODEL: &str = "migrate-old";
const OLD_DIMS: usize = 24;
const NEW_MODEL: &str = "migrate-new";
const NEW_DIMS: usize = 40;
const CONVERSATIONS: usize = 30;
/// Appears in one conversation only.
const ORDER_CODE: &str = "ORD-5521-KZQ";
/// Re-embedding is slowed (per input) so that searches run while it is
/// under way: about 30 chunks × 120 ms.
const PER_INPUT_MS: f64 = 120.0;

fn conversation(i: usize) -> Value {
    let extra = if i == 7 {
        format!(" My order number is {ORDER_CODE}.")
    } else {
        String::new()
    };
    json!({
        "id": format!("conv-{i}"),
        "user_id": format!("user-{}", i % 4),
        "channel": "chat",
        "messages": [
            {"role": "user", "content": format!("Question {i}: how do I reset the router in room {i}?{extra}")},
            {"role": "assistant", "content": format!("For room {i}, hold the reset button for ten seconds.")}
        ]
    })
}

/// The `models` entry of `role`, once sampled.
fn model_view<'a>(stats: &'a Value, role: &str) -> Option<&'a Value> {
    stats["models"]
        .as_array()?
        .iter()
        .find(|m| m["role"] == role)
}

async fn search(http: &reqwest::Client, base: &str, body: Value) -> Value {
    let resp = http
        .post(format!("{base}/v1/search"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert_eq!(status, 200, "search {body}: {text}");
    serde_json::from_str(&text).unwrap()
}

fn top_id(found: &Value) -> &str {
    found["results"][0]["id"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_model_re_embeds_in_the_background_while_search_keeps_answering() {
    let also = format!("{OLD_MODEL}={OLD_DIMS}");
    let standin = Standin::start(NEW_MODEL, NEW_DIMS, 512, &["--also-serve", &also]);
    let ws = Workspace::new();
    let backfill = "[backfill]\ninterval_ms = 100\nbatch_size = 8\n";
    let addr = ws.write_config(&standin.url(), OLD_MODEL, OLD_DIMS, backfill);
    let mut daemon = Daemon::start(&ws, &addr).await;
    let http = reqwest::Client::new();
    let base = daemon.base_url();
    for i in 0..CONVERSATIONS {
        let resp = http
            .post(format!("{base}/v1/conversations?wait=stored"))
            .json(&conversation(i))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "conv-{i}: {}", resp.status());
    }
    let db = connect_db(&ws.database_url()).await;
    let chunk_of = |id: &'static str| {
        let db = db.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT k.content FROM conversation_chunks k JOIN conversations c \
                 ON c.user_id = k.user_id AND c.id = k.conversation_id \
                 WHERE c.client_id = $1 ORDER BY k.seq LIMIT 1",
            )
            .bind(id)
            .fetch_one(&db)
            .await
            .unwrap()
        }
    };
    let probe_text = chunk_of("conv-12").await;
    let found = search(
        &http,
        &base,
        json!({"query": probe_text, "mode": "semantic", "k": 3}),
    )
    .await;
    assert_eq!(found["model"], OLD_MODEL, "{found}");
    assert_eq!(top_id(&found), "conv-12", "{found}");
    daemon.terminate(Duration::from_secs(30));

    // Restart with another model and dimension; re-embedding is slowed.
    standin
        .set_faults(json!({"latency_per_input_ms": PER_INPUT_MS}))
        .await;
    let addr = ws.write_config(&standin.url(), NEW_MODEL, NEW_DIMS, backfill);
    let changed_at = Instant::now();
    let mut daemon = Daemon::start(&ws, &addr).await;
    let base = daemon.base_url();

    // Right after the start: the previous model's vectors answer, the new
    // model covers little. Every search during the migration succeeds.
    let found = search(
        &http,
        &base,
        json!({"query": probe_text, "mode": "semantic", "k": 3}),
    )
    .await;
    assert_eq!(found["model"], OLD_MODEL, "{found}");
    assert_eq!(found["vectors"], "previous", "{found}");
    assert_eq!(top_id(&found), "conv-12", "{found}");
    let hybrid = search(&http, &base, json!({"query": ORDER_CODE, "k": 3})).await;
    assert_eq!(top_id(&hybrid), "conv-7", "{hybrid}");
    let lexical = search(
        &http,
        &base,
        json!({"query": ORDER_CODE, "mode": "lexical", "k": 3}),
    )
    .await;
    assert_eq!(top_id(&lexical), "conv-7", "{lexical}");

    // Sampled coverage while the migration is under way (the sampler runs
    // every 2 s while migrating; the re-embedding takes several seconds).
    let mut seen_partial = false;
    let started = Instant::now();
    loop {
        let s = daemon.stats().await;
        if let (Some(current), Some(previous)) =
            (model_view(&s, "current"), model_view(&s, "previous"))
        {
            assert_eq!(current["model"], NEW_MODEL, "{s}");
            assert_eq!(current["dimensions"], NEW_DIMS, "{s}");
            assert_eq!(previous["model"], OLD_MODEL, "{s}");
            assert_eq!(previous["coverage"], 1.0, "{s}");
            let coverage = current["coverage"].as_f64().unwrap();
            if previous["searched"] == true {
                assert!(coverage < 1.0 || current["pending"] == 0, "{s}");
                if coverage < 1.0 {
                    seen_partial = true;
                    // A search in the middle of it still answers.
                    let found = search(
                        &http,
                        &base,
                        json!({"query": probe_text, "mode": "hybrid", "k": 3}),
                    )
                    .await;
                    assert_eq!(top_id(&found), "conv-12", "{found}");
                }
            } else {
                assert_eq!(current["searched"], true, "{s}");
                assert_eq!(current["coverage"], 1.0, "{s}");
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "search did not switch within 120 s: {s}\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        seen_partial,
        "no sample showed the migration under way (re-embedding finished in {:?})",
        changed_at.elapsed()
    );

    // Switched: the new model answers, and a chunk's own text is its
    // nearest neighbour.
    let found = search(
        &http,
        &base,
        json!({"query": probe_text, "mode": "semantic", "k": 3}),
    )
    .await;
    assert_eq!(found["model"], NEW_MODEL, "{found}");
    assert_eq!(found["vectors"], "current", "{found}");
    assert_eq!(top_id(&found), "conv-12", "{found}");
    let score = found["results"][0]["score"].as_f64().unwrap();
    assert!(score > 0.9999, "{found}");
    let dims: i32 = sqlx::query_scalar(
        "SELECT vector_dims(embedding) FROM conversation_chunks WHERE embedding IS NOT NULL LIMIT 1",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(dims as usize, NEW_DIMS);
    let pending: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM conversation_chunks WHERE embedding_status <> 'embedded' OR model <> $1",
    )
    .bind(NEW_MODEL)
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(pending, 0);

    // The previous vectors are kept until the next start, and follow a
    // deletion.
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM previous_chunk_embeddings")
        .fetch_one(&db)
        .await
        .unwrap();
    let chunks: i64 = sqlx::query_scalar("SELECT count(*) FROM conversation_chunks")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(kept, chunks);
    let resp = http
        .delete(format!("{base}/v1/conversations/conv-3"))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM previous_chunk_embeddings p \
         WHERE NOT EXISTS (SELECT 1 FROM conversation_chunks k WHERE k.user_id = p.user_id \
           AND k.conversation_id = p.conversation_id AND k.seq = p.seq)",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(left, 0, "a deleted chunk's previous vector was left behind");

    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let scrape = Scrape::parse(&text).unwrap();
    let current_coverage = scrape.value(
        "convstore_embedding_model_coverage_ratio",
        &[("model", NEW_MODEL), ("role", "current")],
    );
    assert_eq!(current_coverage, 1.0, "{text}");
    assert_eq!(
        scrape.value("convstore_embedding_model_migrating", &[]),
        0.0
    );
    assert!(
        scrape.value("convstore_search_vectors_total", &[("vectors", "previous")]) >= 2.0,
        "{text}"
    );
    assert!(
        scrape.value("convstore_search_vectors_total", &[("vectors", "current")]) >= 1.0,
        "{text}"
    );
    daemon.terminate(Duration::from_secs(30));

    // The next start drops them.
    standin
        .set_faults(json!({"latency_per_input_ms": 0.0}))
        .await;
    let addr = ws.write_config(&standin.url(), NEW_MODEL, NEW_DIMS, backfill);
    let mut daemon = Daemon::start(&ws, &addr).await;
    let table: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('previous_chunk_embeddings')::text")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(table, None);
    let found = search(
        &http,
        &daemon.base_url(),
        json!({"query": probe_text, "mode": "semantic", "k": 3}),
    )
    .await;
    assert_eq!(found["model"], NEW_MODEL, "{found}");
    assert_eq!(top_id(&found), "conv-12", "{found}");
    daemon.terminate(Duration::from_secs(30));
}

/// When no backend embeds with the previous model any more, semantic
/// search reads the new model's vectors (what is re-embedded so far)
/// instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_previous_model_search_reads_the_new_vectors_instead_of_failing() {
    let old = Standin::start(OLD_MODEL, OLD_DIMS, 512, &[]);
    let ws = Workspace::new();
    let backfill = "[backfill]\ninterval_ms = 100\nbatch_size = 8\n";
    let addr = ws.write_config(&old.url(), OLD_MODEL, OLD_DIMS, backfill);
    let mut daemon = Daemon::start(&ws, &addr).await;
    let http = reqwest::Client::new();
    let base = daemon.base_url();
    for i in 0..10 {
        let resp = http
            .post(format!("{base}/v1/conversations?wait=stored"))
            .json(&conversation(i))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success());
    }
    daemon.terminate(Duration::from_secs(30));
    drop(old);

    // The new backend serves the new model only, slowly enough that the
    // search below runs while the re-embedding is under way.
    let new = Standin::start(NEW_MODEL, NEW_DIMS, 512, &["--per-input-ms", "300"]);
    let addr = ws.write_config(&new.url(), NEW_MODEL, NEW_DIMS, backfill);
    let mut daemon = Daemon::start(&ws, &addr).await;
    let base = daemon.base_url();
    let found = search(
        &http,
        &base,
        json!({"query": "reset the router in room 4", "mode": "semantic", "k": 3}),
    )
    .await;
    assert_eq!(found["model"], NEW_MODEL, "{found}");
    assert_eq!(found["vectors"], "current", "{found}");
    let note = found["search"]["note"].as_str().unwrap_or_default();
    assert!(
        note.contains(&format!(
            "the previous model `{OLD_MODEL}` could not embed the query"
        )),
        "{found}"
    );
    let hybrid = search(&http, &base, json!({"query": ORDER_CODE, "k": 3})).await;
    assert_eq!(top_id(&hybrid), "conv-7", "{hybrid}");
    daemon.terminate(Duration::from_secs(30));
}
