//! The conversation lifecycle with real processes: the daemon, its managed
//! PostgreSQL, the embedding stand-in (issue 16, docs/LIFECYCLE.md).
//!
//! - `appends_while_queued_apply_in_order`: two appends while the first
//!   version waits behind a slow stand-in, one change per batch on two
//!   workers: every turn stored in order, the backend asked only for the
//!   new turns' chunks, the first version's chunk rows left as they were.
//! - `replace_with_one_edited_turn`: one row, chunks of the new text only,
//!   the old text nowhere, one backend input; a retry changes nothing.
//! - `message_ids_and_unknown_ids`: a re-sent message id is not added
//!   twice; an append to an id never accepted is 404; a delete is 200
//!   then 404; an append after the delete is 404.
//! - `erase_with_journal_and_kill9`: 40 conversations of a user, part
//!   stored, part queued, journal on; erase, `kill -9`, restart: no row of
//!   that user, search finds none of their text, and an append for them
//!   after the erasure is refused; another user's data is untouched.
//! - `an_erasure_on_one_instance_holds_on_another`: two instances on one
//!   database; what B acknowledged before A erased the user is discarded
//!   when B's backend comes back, what B accepts after is kept.
//! - `cli_delete_and_erase_user`: the same over `convstore delete` and
//!   `convstore erase-user`.
//! - `random_histories_with_kill9_end_where_the_model_does`: proptest-made
//!   histories of every operation and `kill -9` against the real daemon,
//!   compared with a sequential model (the seed is printed;
//!   `CONVSTORE_TEST_SEED` replays a run).
// Test code: a panic on what the test set up itself is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::PgPool;
use support::daemon::{Daemon, Standin, Workspace, connect_db};
use support::exposition::scrape;

const MODEL: &str = "lifecycle-embed";
const DIMS: usize = 32;
const CONTEXT: usize = 512;

/// One message a chunk: at most 30 tokens a chunk, each turn ~20.
const ONE_TURN_PER_CHUNK: &str = "[chunking]\nmax_tokens = 30\n";

/// Embedding retried for as long as a test needs (the stand-in is made
/// slow or down on purpose).
const PATIENT: &[(&str, &str)] = &[
    ("CONVSTORE_EMBEDDING__MAX_WAIT_MS", "600000"),
    ("CONVSTORE_EMBEDDING__BREAKER_FAILURES", "1000000"),
];

fn turn(n: usize, topic: &str) -> Value {
    json!({"role": if n.is_multiple_of(2) { "user" } else { "assistant" },
           "content": format!("Turn {n} about {topic}: the kettle order {n}{n} has not shipped yet")})
}

/// A daemon on its own managed PostgreSQL, the stand-in its backend.
struct Setup {
    standin: Standin,
    ws: Workspace,
    addr: String,
    daemon: Daemon,
    base: String,
    db: PgPool,
    http: reqwest::Client,
}

async fn setup(extra: &str, env: &[(&str, &str)]) -> Setup {
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &[]);
    let ws = Workspace::new();
    let addr = ws.write_config(&standin.url(), MODEL, DIMS, extra);
    let daemon = Daemon::start_with_env(&ws, &addr, env).await;
    let base = daemon.base_url();
    let db = connect_db(&ws.database_url()).await;
    Setup {
        standin,
        ws,
        addr,
        daemon,
        base,
        db,
        http: reqwest::Client::new(),
    }
}

async fn inputs(standin: &Standin) -> u64 {
    standin.stats().await["inputs"]
        .as_u64()
        .expect("inputs counter")
}

async fn get(http: &reqwest::Client, base: &str, id: &str) -> (u16, Value) {
    let resp = http
        .get(format!("{base}/v1/conversations/{id}"))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Polls GET until `done` holds for the stored view, or 60 s pass.
async fn wait_stored(
    http: &reqwest::Client,
    base: &str,
    id: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let started = Instant::now();
    loop {
        let (status, view) = get(http, base, id).await;
        if status == 200 && view["status"] == "stored" && done(&view) {
            return view;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{id} never reached the expected state: {status} {view}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn contents(view: &Value) -> Vec<String> {
    view["messages"]
        .as_array()
        .map(|m| {
            m.iter()
                .map(|m| m["content"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

async fn chunk_rows(
    db: &PgPool,
    id: &str,
) -> Vec<(i32, String, Option<chrono::DateTime<chrono::Utc>>)> {
    sqlx::query_as(
        "SELECT k.seq, k.content, k.embedded_at FROM conversations c \
         JOIN conversation_chunks k ON k.conversation_id = c.id WHERE c.client_id = $1 ORDER BY k.seq",
    )
    .bind(id)
    .fetch_all(db)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_while_queued_apply_in_order() {
    let Setup {
        standin,
        base,
        db,
        http,
        daemon: _daemon,
        ws: _ws,
        addr: _addr,
    } = setup(
        &format!("{ONE_TURN_PER_CHUNK}\n[batch]\nmax_size = 1\nmax_wait_ms = 5\n\n[pipeline]\nworkers = 2\n"),
        PATIENT,
    )
    .await;

    // The stand-in answers each request after 1.5 s: the first version
    // is still in flight while both appends are acknowledged.
    standin
        .set_faults(json!({"latency_per_request_ms": 1500.0}))
        .await;
    let before = inputs(&standin).await;
    let first: Vec<Value> = (0..3).map(|n| turn(n, "shipping")).collect();
    let resp = http
        .post(format!("{base}/v1/conversations"))
        .json(&json!({"id": "grows", "user_id": "u1", "channel": "web", "messages": first}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    for n in [3, 4] {
        let resp = http
            .post(format!("{base}/v1/conversations/grows/messages"))
            .json(&json!({"messages": [turn(n, "shipping")]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202, "append {n}");
        assert_eq!(
            resp.json::<Value>().await.unwrap(),
            json!({"id": "grows", "status": "queued"})
        );
    }
    let (status, view) = get(&http, &base, "grows").await;
    assert_eq!(
        (status, view["status"].as_str()),
        (200, Some("queued")),
        "{view}"
    );

    let view = wait_stored(&http, &base, "grows", |v| contents(v).len() == 5).await;
    let expected: Vec<String> = (0..5)
        .map(|n| turn(n, "shipping")["content"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(contents(&view), expected);
    let rows = chunk_rows(&db, "grows").await;
    assert_eq!(rows.len(), 5, "{rows:?}");
    for (n, (seq, content, _)) in rows.iter().enumerate() {
        assert_eq!(*seq as usize, n);
        assert!(content.contains(&expected[n]), "chunk {n}: {content}");
    }
    // Five turns, five chunks, five inputs: each turn's chunk was embedded
    // once, whatever version it first appeared in.
    assert_eq!(inputs(&standin).await - before, 5);

    // One more turn on the stored conversation: one input, one chunk row
    // written; the five rows before it untouched.
    standin
        .set_faults(json!({"latency_per_request_ms": 0.0}))
        .await;
    let before = inputs(&standin).await;
    let resp = http
        .post(format!(
            "{base}/v1/conversations/grows/messages?wait=stored"
        ))
        .json(&json!({"messages": [turn(5, "shipping")]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(inputs(&standin).await - before, 1);
    let after = chunk_rows(&db, "grows").await;
    assert_eq!(after.len(), 6);
    assert_eq!(
        &after[..5],
        &rows[..],
        "the first five chunk rows were rewritten"
    );
    let (versions,): (i32,) =
        sqlx::query_as("SELECT versions FROM conversations WHERE client_id = 'grows'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert!(versions >= 2, "versions {versions}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_with_one_edited_turn() {
    let Setup {
        standin,
        base,
        db,
        http,
        daemon: _daemon,
        ws: _ws,
        addr: _addr,
    } = setup(ONE_TURN_PER_CHUNK, &[]).await;

    let mut messages: Vec<Value> = (0..4).map(|n| turn(n, "refunds")).collect();
    let body = |messages: &Vec<Value>| {
        json!({"id": "edited", "user_id": "u2", "channel": "web", "messages": messages,
               "metadata": {"ticket": 7}})
    };
    let resp = http
        .post(format!("{base}/v1/conversations?wait=stored"))
        .json(&body(&messages))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let rows = chunk_rows(&db, "edited").await;
    assert_eq!(rows.len(), 4);

    // Turn 2 corrected.
    messages[2] = json!({"role": "user", "content": "Correction: the parcel number is PX-5521, not the one above"});
    let before = inputs(&standin).await;
    let resp = http
        .post(format!("{base}/v1/conversations?wait=stored"))
        .json(&body(&messages))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(
        inputs(&standin).await - before,
        1,
        "only the edited turn is embedded"
    );

    let count: i64 =
        sqlx::query_scalar("SELECT count(*) FROM conversations WHERE client_id = 'edited'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(count, 1);
    let after = chunk_rows(&db, "edited").await;
    assert_eq!(after.len(), 4);
    assert_eq!(after[0], rows[0]);
    assert_eq!(after[1], rows[1]);
    assert_eq!(after[3], rows[3]);
    assert!(after[2].1.contains("PX-5521"), "{:?}", after[2]);
    let old = turn(2, "refunds")["content"].as_str().unwrap().to_string();
    let left: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM conversation_chunks WHERE content LIKE '%' || $1 || '%') + \
                (SELECT count(*) FROM conversations WHERE transcript LIKE '%' || $1 || '%' \
                   OR messages::text LIKE '%' || $1 || '%')",
    )
    .bind(&old)
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(left, 0, "the old text is still stored");

    // The same content again is a retry: nothing changes.
    let before = inputs(&standin).await;
    let resp = http
        .post(format!("{base}/v1/conversations?wait=stored"))
        .json(&body(&messages))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(inputs(&standin).await, before);
    let (versions, updated): (i32, Option<chrono::DateTime<chrono::Utc>>) =
        sqlx::query_as("SELECT versions, updated_at FROM conversations WHERE client_id = 'edited'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(versions, 2);
    assert_eq!(chunk_rows(&db, "edited").await, after);
    assert!(updated.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_ids_and_unknown_ids() {
    let Setup {
        base,
        http,
        daemon: _daemon,
        standin: _standin,
        ws: _ws,
        addr: _addr,
        db: _db,
    } = setup("", &[("CONVSTORE_SERVER__MAX_MESSAGES", "4")]).await;

    let resp = http
        .post(format!("{base}/v1/conversations/never-posted/messages"))
        .json(&json!({"messages": [{"role": "user", "content": "hello?"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "not_found"
    );

    // Posted without an id: the assigned id is the key appends use.
    let resp = http
        .post(format!("{base}/v1/conversations?wait=stored"))
        .json(&json!({"user_id": "u3", "channel": "sms",
                      "messages": [{"role": "user", "content": "first", "message_id": "m1"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    for _ in 0..2 {
        let resp = http
            .post(format!("{base}/v1/conversations/{id}/messages?wait=stored"))
            .json(&json!({"messages": [
                {"role": "user", "content": "first", "message_id": "m1"},
                {"role": "assistant", "content": "second", "message_id": "m2"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
    }
    let (_, view) = get(&http, &base, &id).await;
    assert_eq!(contents(&view), ["first", "second"], "{view}");
    assert_eq!(view["messages"][1]["message_id"], "m2");

    // Bad bodies name the field and change nothing.
    for (body, field) in [
        (json!({"messages": []}), "messages"),
        (
            json!({"messages": [{"role": "robot", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x", "message_id": ""}]}),
            "messages[0].message_id",
        ),
        (json!({"turns": []}), "turns"),
    ] {
        let resp = http
            .post(format!("{base}/v1/conversations/{id}/messages"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{body}");
        let e: Value = resp.json().await.unwrap();
        assert!(
            e["error"]["field"]
                .as_str()
                .unwrap_or_default()
                .contains(field)
                || e["error"]["message"]
                    .as_str()
                    .unwrap_or_default()
                    .contains(field),
            "{body}: {e}"
        );
    }
    let (_, view) = get(&http, &base, &id).await;
    assert_eq!(contents(&view).len(), 2);
    // Appends grow a conversation no further than server.max_messages.
    let resp = http
        .post(format!("{base}/v1/conversations/{id}/messages"))
        .json(&json!({"messages": [
            {"role": "user", "content": "3"}, {"role": "user", "content": "4"},
            {"role": "user", "content": "5"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let e: Value = resp.json().await.unwrap();
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("server.max_messages"),
        "{e}"
    );

    // Delete: 200, then gone; again: 404; an append after it: 404.
    let resp = http
        .delete(format!("{base}/v1/conversations/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        (v["id"].as_str(), v["deleted"].as_bool()),
        (Some(id.as_str()), Some(true))
    );
    assert_eq!(get(&http, &base, &id).await.0, 404);
    let resp = http
        .delete(format!("{base}/v1/conversations/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let resp = http
        .post(format!("{base}/v1/conversations/{id}/messages"))
        .json(&json!({"messages": [{"role": "user", "content": "late"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);

    let scrape = scrape(&http, &base).await;
    assert_eq!(
        scrape.value(
            "convstore_conversations_deleted_total",
            &[("reason", "api")]
        ),
        1.0
    );
    assert_eq!(scrape.value("convstore_messages_appended_total", &[]), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erase_with_journal_and_kill9() {
    let Setup {
        standin,
        ws,
        addr,
        mut daemon,
        base,
        db,
        http,
    } = setup(
        "[journal]\nenabled = true\n\n[batch]\nmax_size = 8\nmax_wait_ms = 5\n",
        PATIENT,
    )
    .await;
    let secret =
        |i: usize| format!("My home address is 12 Quiet Lane, flat {i}, and my card ends 4242");
    let post = |id: String, user: &str, text: String, wait: &str| {
        let http = http.clone();
        let url = format!("{base}/v1/conversations?wait={wait}");
        let body = json!({"id": id, "user_id": user, "channel": "web",
                          "messages": [{"role": "user", "content": text}]});
        async move {
            http.post(url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };

    // 20 of the user's conversations stored, one of another user.
    for i in 0..20 {
        assert_eq!(
            post(format!("erase-{i}"), "erase-me", secret(i), "stored").await,
            201
        );
    }
    assert_eq!(
        post(
            "keep-0".into(),
            "keep-me",
            "I keep my data".into(),
            "stored"
        )
        .await,
        201
    );
    // The stand-in goes down: 20 more stay queued (journaled), with an
    // append to one of the stored ones and one more of the other user.
    standin.set_faults(json!({"down": true})).await;
    for i in 20..40 {
        assert_eq!(
            post(format!("erase-{i}"), "erase-me", secret(i), "durable").await,
            202
        );
    }
    let resp = http
        .post(format!(
            "{base}/v1/conversations/erase-3/messages?wait=durable"
        ))
        .json(&json!({"messages": [{"role": "user", "content": "and my phone is 555-0199"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    assert_eq!(
        post("keep-1".into(), "keep-me", "Still mine".into(), "durable").await,
        202
    );

    let resp = http
        .delete(format!("{base}/v1/users/erase-me"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let erased: Value = resp.json().await.unwrap();
    assert_eq!(erased["conversations"], 20, "{erased}");
    assert_eq!(erased["erased"], true);
    assert!(erased["chunks"].as_u64().unwrap() >= 20, "{erased}");
    // Right after: kill -9, then restart with the backend back.
    daemon.kill9();
    standin.set_faults(json!({"down": false})).await;
    let mut daemon = Daemon::start_with_env(&ws, &addr, PATIENT).await;
    let base = daemon.base_url();

    // The other user's queued conversation is stored after the replay...
    let started = Instant::now();
    loop {
        let (status, view) = get(&http, &base, "keep-1").await;
        if status == 200 && view["status"] == "stored" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "keep-1: {status} {view}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ...and nothing of the erased user came back.
    // Every replayed change has come to something (stored, or discarded
    // by the tombstone) before the rows are counted.
    let settle = Instant::now();
    loop {
        let scrape = scrape(&http, &base).await;
        let replayed = scrape.value("convstore_journal_replayed_total", &[("outcome", "queued")]);
        let done = scrape.sum("convstore_conversation_changes_total", &[]);
        if replayed > 0.0 && done >= replayed {
            break;
        }
        assert!(
            settle.elapsed() < Duration::from_secs(60),
            "{done} of {replayed} replayed changes applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM conversations WHERE user_id = 'erase-me'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(rows, 0);
    let text: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM conversation_chunks WHERE content LIKE '%Quiet Lane%' OR content LIKE '%555-0199%'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(text, 0);
    let kept: i64 =
        sqlx::query_scalar("SELECT count(*) FROM conversations WHERE user_id = 'keep-me'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(kept, 2);
    let resp = http
        .post(format!("{base}/v1/search"))
        .json(&json!({"query": secret(3), "k": 50}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let found: Value = resp.json().await.unwrap();
    let hits = found["results"].as_array().cloned().unwrap_or_default();
    assert!(
        hits.iter().all(|h| h["user_id"] != "erase-me"),
        "search found erased data: {found}"
    );
    // An append for the erased user's conversation, after the erasure.
    let resp = http
        .post(format!("{base}/v1/conversations/erase-25/messages"))
        .json(&json!({"messages": [{"role": "user", "content": "late turn"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    daemon.kill9();
}

/// `convstore delete` and `convstore erase-user` over the Unix socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_delete_and_erase_user() {
    let Setup {
        ws,
        base,
        http,
        daemon: _daemon,
        standin: _standin,
        addr: _addr,
        db: _db,
    } = setup("", &[]).await;
    for (id, user) in [
        ("cli/one two", "cli-u1"),
        ("cli-2", "cli-u2"),
        ("cli-3", "cli-u2"),
    ] {
        let resp = http
            .post(format!("{base}/v1/conversations?wait=stored"))
            .json(&json!({"id": id, "user_id": user, "channel": "web",
                          "messages": [{"role": "user", "content": format!("hello from {id}")}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
    }
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(support::daemon::BIN)
            .arg("--config")
            .arg(ws.config_path())
            .args(args)
            .output()
            .expect("run convstore");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    // An id with a slash and a space names exactly that conversation.
    let (ok, stdout, stderr) = cli(&["delete", "cli/one two"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("deleted conversation cli/one two"),
        "{stdout}"
    );
    assert_eq!(get(&http, &base, "cli%2Fone%20two").await.0, 404);
    let (ok, _, stderr) = cli(&["delete", "cli/one two"]);
    assert!(!ok);
    assert!(stderr.contains("404"), "{stderr}");
    let (ok, stdout, stderr) = cli(&["erase-user", "cli-u2", "--json"]);
    assert!(ok, "{stdout}{stderr}");
    let answer: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(answer["conversations"], 2, "{answer}");
    assert_eq!(get(&http, &base, "cli-2").await.0, 404);
    assert_eq!(get(&http, &base, "cli-3").await.0, 404);
}

/// Two instances on one database: changes instance B acknowledged before
/// instance A erased their user never reach the database, even though B
/// knew nothing of the erasure; what B accepts after it is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_on_one_instance_holds_on_another() {
    let Setup {
        base: base_a,
        db,
        http,
        daemon: _a,
        standin: _standin_a,
        ws: ws_a,
        addr: _addr_a,
    } = setup("[journal]\nenabled = true\n", &[]).await;
    // B: its own state, queue and journal; A's PostgreSQL; a backend that
    // is down, so what B accepts stays in flight there.
    let standin_b = Standin::start(MODEL, DIMS, CONTEXT, &[]);
    let ws_b = Workspace::new();
    let addr_b = ws_b.write_config(&standin_b.url(), MODEL, DIMS, "[journal]\nenabled = true\n");
    let database = ws_a.database_url();
    let mut env: Vec<(&str, &str)> = PATIENT.to_vec();
    env.push(("CONVSTORE_DATABASE__URL", &database));
    let b = Daemon::start_with_env(&ws_b, &addr_b, &env).await;
    let base_b = b.base_url();
    standin_b.set_faults(json!({"down": true})).await;

    let post = |base: &str, id: &str, wait: &str| {
        let http = http.clone();
        let url = format!("{base}/v1/conversations?wait={wait}");
        let body = json!({"id": id, "user_id": "multi-user", "channel": "web",
                          "messages": [{"role": "user", "content": format!("private text of {id}")}]});
        async move {
            http.post(url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(post(&base_a, "multi-1", "stored").await, 201);
    assert_eq!(post(&base_b, "multi-2", "durable").await, 202);
    let resp = http
        .post(format!(
            "{base_b}/v1/conversations/multi-1/messages?wait=durable"
        ))
        .json(&json!({"messages": [{"role": "user", "content": "appended through B"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202, "B finds multi-1 in the shared database");

    let resp = http
        .delete(format!("{base_a}/v1/users/multi-user"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // After the erasure, B accepts a new conversation of that user.
    assert_eq!(post(&base_b, "multi-3", "durable").await, 202);

    standin_b.set_faults(json!({"down": false})).await;
    // B stores what came after the erasure and discards the two changes
    // acknowledged before it.
    wait_stored(&http, &base_b, "multi-3", |_| true).await;
    let started = Instant::now();
    loop {
        let scrape = scrape(&http, &base_b).await;
        let discarded = scrape.value(
            "convstore_conversation_changes_total",
            &[("outcome", "discarded")],
        );
        if discarded >= 2.0 {
            assert_eq!(discarded, 2.0);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "B discarded {discarded}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left: Vec<(String, String)> = sqlx::query_as(
        "SELECT client_id, transcript FROM conversations WHERE user_id = 'multi-user' ORDER BY client_id",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(
        left.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
        ["multi-3"],
        "{left:?}"
    );
    assert!(!left[0].1.contains("appended through B"));
}

/// One step of a random history (`random_histories_with_kill9_end_where_the_model_does`).
#[derive(Debug, Clone)]
enum Step {
    Post {
        id: u8,
        user: u8,
        text: u8,
    },
    Append {
        id: u8,
        text: u8,
        message_id: Option<u8>,
    },
    Delete {
        id: u8,
    },
    Erase {
        user: u8,
    },
    /// `kill -9`, then a restart (the journal replays).
    Crash,
    /// Let the pipeline catch up for a moment.
    Pause,
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    prop_oneof![
        5 => (0u8..3, 0u8..2, 0u8..3).prop_map(|(id, user, text)| Step::Post { id, user, text }),
        5 => (0u8..3, 0u8..4, proptest::option::of(0u8..3))
            .prop_map(|(id, text, message_id)| Step::Append { id, text, message_id }),
        1 => (0u8..3).prop_map(|id| Step::Delete { id }),
        1 => (0u8..2).prop_map(|user| Step::Erase { user }),
        1 => Just(Step::Crash),
        2 => Just(Step::Pause),
    ]
}

/// The API as a client reads it: each request applied at once, in order.
/// By id: (user, messages as (content, message id), messages of the last post).
type Model =
    std::collections::BTreeMap<String, (String, Vec<(String, Option<String>)>, Vec<String>)>;

/// Random histories of posts, appends, replacements, deletes, erasures
/// and `kill -9` at random points (journal on), generated by proptest,
/// against the real daemon: once everything settled, every conversation
/// reads back exactly as a sequential model of the API says, and what the
/// model says is gone stays gone. (The same property, with shrinking and
/// thousands of cases, is checked on the fold itself in
/// `crates/core/tests/lifecycle_model.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_histories_with_kill9_end_where_the_model_does() {
    use proptest::strategy::{Strategy, ValueTree};
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

    let Setup {
        ws,
        addr,
        mut daemon,
        mut base,
        http,
        standin: _standin,
        db: _db,
    } = setup(
        "[journal]\nenabled = true\n\n[batch]\nmax_size = 4\nmax_wait_ms = 5\n",
        &[],
    )
    .await;
    let seed: u64 = std::env::var("CONVSTORE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand_seed);
    println!("seed {seed} (CONVSTORE_TEST_SEED replays it)");
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &{
            let mut bytes = [0u8; 32];
            bytes[..8].copy_from_slice(&seed.to_le_bytes());
            bytes
        }),
    );
    let histories = proptest::collection::vec(step(), 8..24);
    for case in 0..6 {
        let steps = histories.new_tree(&mut runner).unwrap().current();
        println!("case {case}: {steps:?}");
        let key = |id: u8| format!("r{case}-c{id}");
        let user = |u: u8| format!("r{case}-u{u}");
        let mut model = Model::new();
        for step in &steps {
            match step {
                Step::Post { id, user: u, text } => {
                    let contents = vec![format!("post {text} of {}", key(*id))];
                    let resp = http
                        .post(format!("{base}/v1/conversations"))
                        .json(
                            &json!({"id": key(*id), "user_id": user(*u), "channel": "web",
                                      "messages": [{"role": "user", "content": contents[0]}]}),
                        )
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(resp.status(), 202, "{step:?}");
                    let same = model
                        .get(&key(*id))
                        .is_some_and(|(owner, current, posted)| {
                            *owner == user(*u)
                                && (*posted == contents
                                    || current.iter().map(|(c, _)| c.clone()).collect::<Vec<_>>()
                                        == contents)
                        });
                    if !same {
                        model.insert(
                            key(*id),
                            (user(*u), vec![(contents[0].clone(), None)], contents),
                        );
                    }
                }
                Step::Append {
                    id,
                    text,
                    message_id,
                } => {
                    let message_id = message_id.map(|m| format!("m{m}"));
                    let content = format!("appended {text}");
                    let resp = http
                        .post(format!("{base}/v1/conversations/{}/messages", key(*id)))
                        .json(&json!({"messages": [{"role": "user", "content": content,
                                                    "message_id": message_id}]}))
                        .send()
                        .await
                        .unwrap();
                    match model.get_mut(&key(*id)) {
                        Some((_, current, _)) => {
                            assert_eq!(resp.status(), 202, "{step:?}");
                            let known = message_id.as_ref().is_some_and(|m| {
                                current.iter().any(|(_, id)| id.as_ref() == Some(m))
                            });
                            if !known {
                                current.push((content, message_id));
                            }
                        }
                        // Gone for the model; the daemon may still hold a
                        // change of it in flight (then the append is
                        // discarded with it).
                        None => assert!(
                            [202, 404].contains(&resp.status().as_u16()),
                            "{step:?}: {}",
                            resp.status()
                        ),
                    }
                }
                Step::Delete { id } => {
                    let resp = http
                        .delete(format!("{base}/v1/conversations/{}", key(*id)))
                        .send()
                        .await
                        .unwrap();
                    let expected: &[u16] = if model.remove(&key(*id)).is_some() {
                        &[200]
                    } else {
                        &[200, 404]
                    };
                    assert!(expected.contains(&resp.status().as_u16()), "{step:?}");
                }
                Step::Erase { user: u } => {
                    let resp = http
                        .delete(format!("{base}/v1/users/{}", user(*u)))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(resp.status(), 200, "{step:?}");
                    model.retain(|_, (owner, ..)| *owner != user(*u));
                }
                Step::Crash => {
                    daemon.kill9();
                    daemon = Daemon::start(&ws, &addr).await;
                    base = daemon.base_url();
                }
                Step::Pause => tokio::time::sleep(Duration::from_millis(30)).await,
            }
        }
        // Everything settles where the model is, and stays there.
        let expected = |id: u8| {
            model
                .get(&key(id))
                .map(|(_, m, _)| m.iter().map(|(c, _)| c.clone()).collect::<Vec<_>>())
        };
        let read = |id: u8| {
            let http = http.clone();
            let url = format!("{base}/v1/conversations/{}", key(id));
            async move {
                let resp = http.get(url).send().await.unwrap();
                let status = resp.status().as_u16();
                let view: Value = resp.json().await.unwrap_or(Value::Null);
                match (status, view["status"].as_str()) {
                    (404, _) => Some(None),
                    (200, Some("stored")) if view["changes_in_flight"] != true => {
                        Some(Some(contents(&view)))
                    }
                    _ => None, // still in flight
                }
            }
        };
        for round in 0..2 {
            let started = Instant::now();
            for id in 0..3u8 {
                loop {
                    let got = read(id).await;
                    if got.as_ref() == Some(&expected(id)) {
                        break;
                    }
                    assert!(
                        started.elapsed() < Duration::from_secs(60),
                        "case {case} (seed {seed}), {}: read {got:?}, the model says {:?}; steps {steps:?}",
                        key(id),
                        expected(id)
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            if round == 0 {
                // Anything that could still bring one back has had time to.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    daemon.kill9();
}

fn rand_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}
