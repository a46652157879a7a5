//! Embedding by token budget (issue 18): a chunk a backend refuses as too
//! long is split and every piece embedded (in a batch and in the
//! backfill), a configured `tokenizer.json` makes chunks fit the first
//! time, and `max_batch_tokens` bounds every request.
//!
//! The stand-in counts tokens with the builtin model's real WordPiece
//! tokenizer (`--tokenizer`, installed by scripts/setup.sh), with a
//! 700-token context: ids, code and short alphanumeric words cost it two or
//! three times the chunker's estimate, as real backends do.
// Test code: a panic on what the test set up itself is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use convstore_embed::TokenCounter;
use convstore_embed::tokenizer::FileTokenCounter;
use convstore_standin::standin_vector;
use serde_json::{Value, json};
use sqlx::PgPool;
use support::cluster::require_setup;
use support::daemon::{Daemon, Standin, Workspace, connect_db, parse_vector};
use support::exposition::scrape;

const MODEL: &str = "budget-embed";
const DIMS: usize = 32;
const CONTEXT: usize = 700;

/// The all-MiniLM-L6-v2 tokenizer scripts/setup.sh installs (with the
/// builtin model; a daemon built without it still reads the file here).
fn tokenizer_path() -> PathBuf {
    require_setup();
    let path = PathBuf::from("/usr/local/lib/convstore/models/all-MiniLM-L6-v2/tokenizer.json");
    assert!(
        path.exists(),
        "{} is missing: run scripts/setup.sh",
        path.display()
    );
    path
}

/// ~3,000 characters of short alphanumeric words ("k7 q3x z9b2"): the
/// estimate charges one token a word, WordPiece two or three.
fn short_alphanumeric_words() -> String {
    let letters = b"kqzxjvwbmfhpdgtnrl";
    let mut out = String::new();
    let mut i = 0usize;
    while out.len() < 3_000 {
        let a = letters[i % letters.len()] as char;
        let b = letters[(i * 7 + 3) % letters.len()] as char;
        match i % 3 {
            0 => out.push_str(&format!("{a}{}", i % 10)),
            1 => out.push_str(&format!("{a}{}{b}", (i * 3) % 10)),
            _ => out.push_str(&format!("{a}{}{b}{}", i % 10, (i / 10) % 10)),
        }
        out.push(' ');
        i += 1;
    }
    out.trim_end().to_string()
}

fn chinese() -> String {
    "我们的订单系统在周五晚上出现了延迟，客户反馈付款后没有收到确认邮件。技术团队检查了消息队列，\
     发现有一批任务卡在重试状态。请在下次发布前修复这个问题，并补充监控告警。"
        .repeat(8)
}

fn code() -> String {
    (0..24)
        .map(|i| {
            format!(
                "fn handleOrderEvt{i}(ctx: &mut OrdCtx, evt: &EvtV2) -> Result<u64, ErrKind> {{ \
                 let id = evt.ordId.checked_mul(0x{i:x}f3a).ok_or(ErrKind::Ovf)?; \
                 ctx.pendingQ.push_back((id, evt.tsMs)); Ok(id) }}\n"
            )
        })
        .collect()
}

fn conversation(id: &str) -> Value {
    json!({
        "id": id, "user_id": "u1", "channel": "support",
        "messages": [
            {"role": "user", "content": short_alphanumeric_words()},
            {"role": "assistant", "content": chinese()},
            {"role": "user", "content": code()},
        ]
    })
}

fn standin(extra: &[&str]) -> Standin {
    let tokenizer = tokenizer_path();
    let path = tokenizer.to_str().unwrap().to_string();
    let mut args = vec!["--tokenizer", path.as_str()];
    args.extend_from_slice(extra);
    Standin::start(MODEL, DIMS, CONTEXT, &args)
}

/// Every chunk of `id` embedded with the stand-in's vector for its whole
/// text, numbered 0..n, holding the transcript in order, and within the
/// stand-in's context by the real tokenizer. Returns the chunk count.
async fn assert_whole_and_embedded(db: &PgPool, id: &str) -> usize {
    let transcript: String =
        sqlx::query_scalar("SELECT transcript FROM conversations WHERE client_id = $1")
            .bind(id)
            .fetch_one(db)
            .await
            .unwrap();
    let rows: Vec<(i32, String, String, Option<String>)> = sqlx::query_as(
        "SELECT k.seq, k.content, k.embedding_status, k.embedding::text \
         FROM conversation_chunks k JOIN conversations c \
           ON c.user_id = k.user_id AND c.id = k.conversation_id \
         WHERE c.client_id = $1 ORDER BY k.seq",
    )
    .bind(id)
    .fetch_all(db)
    .await
    .unwrap();
    let counter = FileTokenCounter::load(&tokenizer_path()).unwrap();
    let mut joined = String::new();
    for (i, (seq, content, status, vector)) in rows.iter().enumerate() {
        assert_eq!(*seq, i as i32, "chunks numbered 0..n");
        assert_eq!(status, "embedded", "chunk {seq} of {id}: {content:?}");
        let stored = parse_vector(vector.as_deref().unwrap());
        let expected = standin_vector(content, DIMS);
        for (a, b) in stored.iter().zip(&expected) {
            assert!(
                (a - b).abs() < 1e-6,
                "chunk {seq}: not the stand-in's vector for its text"
            );
        }
        let tokens = counter.count_tokens(content);
        assert!(tokens < CONTEXT, "chunk {seq} has {tokens} tokens");
        joined.push_str(content);
    }
    // The chunker starts each piece of a long message with its role, as
    // the chunk's context; the role labels aside, the chunks hold the
    // transcript exactly.
    let bare = |t: &str| t.replace("user: ", "").replace("assistant: ", "");
    let (joined, transcript) = (bare(&joined), bare(&transcript));
    assert!(
        joined == transcript,
        "chunks of {id} do not hold the transcript: {} bytes against {}",
        joined.len(),
        transcript.len()
    );
    rows.len()
}

async fn post_stored(base: &str, body: &Value) -> Value {
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/conversations?wait=stored"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, 201, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_refused_as_too_long_are_split_and_every_piece_embedded() {
    let standin = standin(&[]);
    let ws = Workspace::new();
    let addr = ws.write_config(&standin.url(), MODEL, DIMS, "");
    let daemon = Daemon::start(&ws, &addr).await;
    let base = daemon.base_url();
    post_stored(&base, &conversation("long-1")).await;

    let db = connect_db(&ws.database_url()).await;
    let chunks = assert_whole_and_embedded(&db, "long-1").await;
    let stats = standin.stats().await;
    let refused = stats["outcomes"]["too_long"].as_u64().unwrap();
    assert!(refused >= 1, "the estimate's chunks were refused: {stats}");
    let failed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM conversation_chunks WHERE embedding_status = 'failed'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(failed, 0);

    let scrape = scrape(&reqwest::Client::new(), &base).await;
    assert!(scrape.value("convstore_chunks_split_on_refusal_total", &[]) >= 1.0);
    let budget = scrape.value("convstore_chunk_budget_tokens", &[]);
    assert!(
        budget > 0.0 && budget < (CONTEXT - 4) as f64,
        "the refusal lowered the chunk budget: {budget}"
    );

    // Learnt: the same conversation again (another id) is cut to fit, so
    // the backend refuses far less of it.
    post_stored(&base, &conversation("long-2")).await;
    assert_whole_and_embedded(&db, "long-2").await;
    let again = standin.stats().await["outcomes"]["too_long"]
        .as_u64()
        .unwrap()
        - refused;
    assert!(
        again < refused,
        "{again} refusals the second time, {refused} the first"
    );
    eprintln!(
        "{chunks} chunks; refusals: {refused} then {again}; chunk budget {budget} estimated tokens"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backfill_splits_a_pending_chunk_refused_as_too_long() {
    let standin = standin(&[]);
    let ws = Workspace::new();
    let addr = ws.write_config(
        &standin.url(),
        MODEL,
        DIMS,
        "[backfill]\ninterval_ms = 300\n",
    );
    // Not a minute (the default) for a batch to give up on a dead backend.
    let daemon =
        Daemon::start_with_env(&ws, &addr, &[("CONVSTORE_EMBEDDING__MAX_WAIT_MS", "1000")]).await;
    let base = daemon.base_url();
    // Every backend down: stored now, without vectors, as cut by the
    // estimate.
    standin.set_faults(json!({"down": true})).await;
    post_stored(&base, &conversation("later")).await;
    let db = connect_db(&ws.database_url()).await;
    let status: String =
        sqlx::query_scalar("SELECT embedding_status FROM conversations WHERE client_id = 'later'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(status, "pending");
    let before: i64 = sqlx::query_scalar("SELECT count(*) FROM conversation_chunks")
        .fetch_one(&db)
        .await
        .unwrap();

    standin.set_faults(json!({"down": false})).await;
    let started = Instant::now();
    loop {
        let status: String = sqlx::query_scalar(
            "SELECT embedding_status FROM conversations WHERE client_id = 'later'",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        if status == "embedded" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "still {status}; log:\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = assert_whole_and_embedded(&db, "later").await;
    assert!(after > before as usize, "{before} chunks became {after}");
    let scrape = scrape(&reqwest::Client::new(), &base).await;
    assert!(
        scrape.value("convstore_backfill_chunks_total", &[("outcome", "split")]) >= 1.0,
        "counted as split by the backfill"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_models_tokenizer_chunks_fit_the_first_time() {
    let standin = standin(&[]);
    let ws = Workspace::new();
    let tokenizer = tokenizer_path();
    // Before any section header: a key of the backend's table.
    let addr = ws.write_config(
        &standin.url(),
        MODEL,
        DIMS,
        &format!("tokenizer = \"{}\"\n", tokenizer.display()),
    );
    let daemon = Daemon::start(&ws, &addr).await;
    post_stored(&daemon.base_url(), &conversation("counted")).await;
    let db = connect_db(&ws.database_url()).await;
    assert_whole_and_embedded(&db, "counted").await;
    let stats = standin.stats().await;
    assert_eq!(stats["outcomes"]["too_long"], 0, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_batch_tokens_bounds_every_request() {
    // The stand-in's own rule counts at most the estimate, which packs.
    let standin = Standin::start(MODEL, DIMS, 512, &[]);
    let ws = Workspace::new();
    let addr = ws.write_config(
        &standin.url(),
        MODEL,
        DIMS,
        "max_batch_tokens = 200\n\n[chunking]\nmax_tokens = 120\n",
    );
    let daemon = Daemon::start(&ws, &addr).await;
    let base = daemon.base_url();
    for c in convstore_dataset::generate(12, 7) {
        post_stored(&base, &c).await;
    }
    // One conversation of many chunks: its chunks travel as one group of
    // inputs, about 700 tokens, which must go as several requests.
    let long: String = (0..40)
        .map(|i| {
            format!(
                "Parcel {i} left depot {} at noon and reached the sorting centre by six. ",
                i * 7
            )
        })
        .collect();
    post_stored(
        &base,
        &json!({"id": "long-packed", "user_id": "u", "channel": "web",
                "messages": [{"role": "user", "content": long}]}),
    )
    .await;
    let stats = standin.stats().await;
    let most = stats["max_call_tokens"].as_u64().unwrap();
    eprintln!(
        "max_batch_tokens 200: {} calls, at most {most} tokens and {} inputs in one",
        stats["calls"]["embed"], stats["max_call_inputs"]
    );
    assert!(most > 0 && most <= 200, "{stats}");
    assert!(
        stats["calls"]["embed"].as_u64().unwrap() >= 12 + 3,
        "the long conversation went as several requests: {stats}"
    );
    assert!(
        stats["max_call_inputs"].as_u64().unwrap() >= 2,
        "requests were packed: {stats}"
    );
    let db = connect_db(&ws.database_url()).await;
    let pending: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM conversation_chunks WHERE embedding_status <> 'embedded'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(pending, 0);
}
