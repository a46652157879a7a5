//! Retention (issue 16) against a real PostgreSQL: the store's reaper
//! deletes by `created_at`, else `received_at`, per channel, in bounded
//! batches that skip locked rows and walk the age indexes; and the real
//! daemon, with `[retention]` set, deletes an old conversation it stored
//! and keeps a recent one.
// Test code: a panic on what the test set up itself is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use convstore_store::Store;
use convstore_store::retention::{
    BatchOutcome, REAP_CHANNEL_SQL, REAP_OTHER_CHANNELS_SQL, REAP_TOMBSTONES_SQL, REAPER_LOCK,
    ReapTarget, RetentionPolicy,
};
use serde_json::{Value, json};
use support::cluster::TestCluster;
use support::daemon::{Daemon, Standin, Workspace};
use support::exposition::Scrape;
use uuid::Uuid;

const DAY: u64 = 86_400;

/// A fresh migrated database `name` of the cluster.
async fn fresh_store(cluster: &TestCluster, name: &str) -> Store {
    let admin = Store::connect(&cluster.url(), 1, Duration::from_secs(30))
        .await
        .expect("connect");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(admin.pool())
        .await
        .expect("create database");
    admin.close().await;
    let url = cluster
        .url()
        .replacen("/convstore?", &format!("/{name}?"), 1);
    let store = Store::connect(&url, 4, Duration::from_secs(30))
        .await
        .expect("connect")
        .with_partitions(support::cluster::test_partitions());
    store.migrate().await.expect("migrate");
    store
}

fn days_ago(now: DateTime<Utc>, days: i64) -> DateTime<Utc> {
    now - TimeDelta::days(days)
}

/// A conversation row and one chunk, written as SQL (not through the
/// batch writer: what is reaped is rows, however they got there).
async fn insert(
    store: &Store,
    label: &str,
    channel: &str,
    created_at: Option<DateTime<Utc>>,
    received_at: DateTime<Utc>,
) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO conversations (id, client_id, user_id, channel, transcript, created_at, received_at, embedding_status)
         VALUES ($1, $2, 'u', $3, 'user: hello', $4, $5, 'pending')",
    )
    .bind(id)
    .bind(label)
    .bind(channel)
    .bind(created_at)
    .bind(received_at)
    .execute(store.pool())
    .await
    .expect("insert conversation");
    sqlx::query(
        "INSERT INTO conversation_chunks (user_id, conversation_id, seq, content, content_hash, model, embedding_status)
         VALUES ('u', $1, 0, 'user: hello', $2, 'm', 'pending')",
    )
    .bind(id)
    .bind(vec![7u8; 32])
    .execute(store.pool())
    .await
    .expect("insert chunk");
    id
}

async fn labels(store: &Store) -> BTreeSet<String> {
    sqlx::query_scalar::<_, String>("SELECT client_id FROM conversations")
        .fetch_all(store.pool())
        .await
        .unwrap()
        .into_iter()
        .collect()
}

async fn count(store: &Store, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(store.pool())
        .await
        .unwrap()
}

/// Every target of `policy` at `now`, reaped to the end; the counts per
/// batch, in order.
async fn reap_all(store: &Store, policy: &RetentionPolicy, now: DateTime<Utc>) -> Vec<u64> {
    let mut batches = Vec::new();
    for target in policy.targets(now) {
        let done = store
            .reap(&target, 500, |n| batches.push(n))
            .await
            .expect("reap");
        assert!(done, "no other reaper runs here");
    }
    batches
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_reaps_by_age_per_channel_in_bounded_batches() {
    let cluster = TestCluster::start().await;
    let store = fresh_store(&cluster, "reap_rules").await;
    let now = Utc::now();

    // Default 365 days; web 30 days; legal kept forever.
    insert(&store, "chat-800d", "chat", Some(days_ago(now, 800)), now).await;
    insert(&store, "chat-10d", "chat", Some(days_ago(now, 10)), now).await;
    // No created_at: received_at decides.
    insert(
        &store,
        "chat-received-800d",
        "chat",
        None,
        days_ago(now, 800),
    )
    .await;
    insert(&store, "chat-received-10d", "chat", None, days_ago(now, 10)).await;
    // created_at wins over received_at when both are there.
    insert(
        &store,
        "chat-created-10d-received-800d",
        "chat",
        Some(days_ago(now, 10)),
        days_ago(now, 800),
    )
    .await;
    insert(&store, "web-40d", "web", Some(days_ago(now, 40)), now).await;
    insert(&store, "web-10d", "web", Some(days_ago(now, 10)), now).await;
    insert(&store, "legal-800d", "legal", Some(days_ago(now, 800)), now).await;
    assert_eq!(
        count(&store, "SELECT count(*) FROM conversation_chunks").await,
        8
    );

    let policy = RetentionPolicy {
        max_age: Some(Duration::from_secs(365 * DAY)),
        channels: BTreeMap::from([
            ("web".to_string(), Some(Duration::from_secs(30 * DAY))),
            ("legal".to_string(), None),
        ]),
        tombstone_max_age: None,
        interval: Duration::from_secs(3600),
    };
    let batches = reap_all(&store, &policy, now).await;
    assert_eq!(batches.iter().sum::<u64>(), 3, "{batches:?}");
    assert_eq!(
        labels(&store).await,
        [
            "chat-10d",
            "chat-received-10d",
            "chat-created-10d-received-800d",
            "web-10d",
            "legal-800d"
        ]
        .into_iter()
        .map(String::from)
        .collect()
    );
    // Their chunks went with them.
    assert_eq!(
        count(&store, "SELECT count(*) FROM conversation_chunks").await,
        5
    );
    // A second run finds nothing.
    assert!(reap_all(&store, &policy, now).await.is_empty());

    // Batches are bounded: 5 old rows with batches of 2 go as 2, 2, 1.
    for i in 0..5 {
        insert(
            &store,
            &format!("bulk-{i}"),
            "bulk",
            Some(days_ago(now, 900)),
            now,
        )
        .await;
    }
    let target = ReapTarget::Channel {
        channel: "bulk".into(),
        cutoff: days_ago(now, 365),
    };
    let mut sizes = Vec::new();
    assert!(store.reap(&target, 2, |n| sizes.push(n)).await.unwrap());
    assert_eq!(sizes, vec![2, 2, 1]);
    assert_eq!(
        count(
            &store,
            "SELECT count(*) FROM conversations WHERE channel = 'bulk'"
        )
        .await,
        0
    );

    // A row another transaction holds is skipped, not waited for.
    insert(&store, "held-900d", "held", Some(days_ago(now, 900)), now).await;
    insert(&store, "free-900d", "held", Some(days_ago(now, 900)), now).await;
    let mut holder = store.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM conversations WHERE client_id = 'held-900d' FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let target = ReapTarget::Channel {
        channel: "held".into(),
        cutoff: days_ago(now, 365),
    };
    let outcome = tokio::time::timeout(Duration::from_secs(20), store.reap_batch(&target, 10))
        .await
        .expect("the reaper waited for a locked row")
        .unwrap();
    assert_eq!(outcome, BatchOutcome::Deleted(1));
    holder.rollback().await.unwrap();
    assert!(labels(&store).await.contains("held-900d"));
    assert_eq!(
        store.reap_batch(&target, 10).await.unwrap(),
        BatchOutcome::Deleted(1)
    );

    // While another instance reaps (holds the reaper's lock), this one
    // stops at once and deletes nothing.
    insert(&store, "busy-900d", "busy", Some(days_ago(now, 900)), now).await;
    let mut other = store.pool().begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(REAPER_LOCK)
        .execute(&mut *other)
        .await
        .unwrap();
    let target = ReapTarget::Channel {
        channel: "busy".into(),
        cutoff: days_ago(now, 365),
    };
    assert_eq!(
        store.reap_batch(&target, 10).await.unwrap(),
        BatchOutcome::Busy
    );
    assert!(!store.reap(&target, 10, |_| {}).await.unwrap());
    assert!(labels(&store).await.contains("busy-900d"));
    other.rollback().await.unwrap();
    assert!(store.reap(&target, 10, |_| {}).await.unwrap());
    assert!(!labels(&store).await.contains("busy-900d"));

    // Tombstones past their age are dropped; younger ones stay.
    for (i, age) in [100, 95, 91, 10].into_iter().enumerate() {
        sqlx::query(
            "INSERT INTO tombstones (kind, key_sha, stamp, created_at) VALUES ('conversation', $1, 1, $2)",
        )
        .bind(vec![i as u8; 32])
        .bind(days_ago(now, age))
        .execute(store.pool())
        .await
        .unwrap();
    }
    let mut sizes = Vec::new();
    let target = ReapTarget::Tombstones {
        cutoff: days_ago(now, 90),
    };
    assert!(store.reap(&target, 2, |n| sizes.push(n)).await.unwrap());
    assert_eq!(sizes, vec![2, 1]);
    assert_eq!(count(&store, "SELECT count(*) FROM tombstones").await, 1);
    store.close().await;
}

/// The plan of `sql` with its parameters, as text.
async fn plan(
    store: &Store,
    query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
) -> String {
    let rows: Vec<String> = query
        .fetch_all(store.pool())
        .await
        .expect("explain")
        .into_iter()
        .map(|row| sqlx::Row::get::<String, _>(&row, 0))
        .collect();
    rows.join("\n")
}

/// Whether `plan` uses index `name` or, on partitioned tables
/// (`database.partitions`), one of the partitions' indexes attached to it.
async fn uses_index(store: &Store, plan: &str, name: &str) -> bool {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT $1::text UNION ALL \
         SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = to_regclass($1)",
    )
    .bind(name)
    .fetch_all(store.pool())
    .await
    .expect("index names");
    names.iter().any(|n| plan.contains(n.as_str()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_reap_walks_an_index_not_the_table() {
    let cluster = TestCluster::start().await;
    let store = fresh_store(&cluster, "reap_plans").await;
    // Enough rows, over enough channels and ages, that a sequential scan
    // would be the planner's choice if the indexes did not fit the query.
    sqlx::query(
        "INSERT INTO conversations (id, user_id, channel, transcript, created_at, received_at, embedding_status)
         SELECT gen_random_uuid(), 'u' || (i % 50), 'c' || (i % 20), 'text',
                CASE WHEN i % 3 = 0 THEN NULL ELSE now() - (i || ' hours')::interval END,
                now() - (i || ' hours')::interval, 'pending'
         FROM generate_series(1, 20000) AS i",
    )
    .execute(store.pool())
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO tombstones (kind, key_sha, stamp, created_at)
         SELECT 'user', sha256(i::text::bytea), i, now() - (i || ' hours')::interval
         FROM generate_series(1, 20000) AS i",
    )
    .execute(store.pool())
    .await
    .unwrap();
    sqlx::query("ANALYZE conversations, tombstones")
        .execute(store.pool())
        .await
        .unwrap();
    let cutoff = Utc::now() - TimeDelta::days(365);

    let explain = |sql: &str| sqlx::AssertSqlSafe(format!("EXPLAIN {sql}"));
    let channel = plan(
        &store,
        sqlx::query(explain(REAP_CHANNEL_SQL))
            .bind("c7")
            .bind(cutoff)
            .bind(500i64),
    )
    .await;
    assert!(
        uses_index(&store, &channel, "conversations_channel_age_idx").await,
        "{channel}"
    );
    assert!(!channel.contains("Seq Scan"), "{channel}");

    let others = plan(
        &store,
        sqlx::query(explain(REAP_OTHER_CHANNELS_SQL))
            .bind(vec!["c1".to_string(), "c2".to_string()])
            .bind(cutoff)
            .bind(500i64),
    )
    .await;
    assert!(
        uses_index(&store, &others, "conversations_age_idx").await,
        "{others}"
    );
    assert!(!others.contains("Seq Scan"), "{others}");

    let tombstones = plan(
        &store,
        sqlx::query(explain(REAP_TOMBSTONES_SQL))
            .bind(cutoff)
            .bind(500i64),
    )
    .await;
    assert!(
        tombstones.contains("tombstones_created_at_idx"),
        "{tombstones}"
    );
    assert!(!tombstones.contains("Seq Scan"), "{tombstones}");
    store.close().await;
}

const MODEL: &str = "retention-embed";
const DIMS: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_deletes_what_is_past_max_age_and_keeps_the_rest() {
    let standin = Standin::start(MODEL, DIMS, 512, &[]);
    let ws = Workspace::new();
    let addr = ws.write_config(
        &standin.url(),
        MODEL,
        DIMS,
        "[retention]\nmax_age = \"365d\"\ninterval = \"1s\"\n",
    );
    let daemon = Daemon::start(&ws, &addr).await;
    let base = daemon.base_url();
    let http = reqwest::Client::new();
    let now = Utc::now();
    for (id, created_at) in [
        ("old-conversation", now - TimeDelta::days(800)),
        ("recent-conversation", now - TimeDelta::days(1)),
    ] {
        let resp = http
            .post(format!("{base}/v1/conversations?wait=stored"))
            .json(&json!({
                "id": id,
                "user_id": "u",
                "channel": "chat",
                "messages": [{"role": "user", "content": format!("hello from {id}")}],
                "created_at": created_at.to_rfc3339(),
            }))
            .send()
            .await
            .unwrap();
        let status = resp.status();
        assert!(
            status.is_success(),
            "{id}: {status} {}",
            resp.text().await.unwrap_or_default()
        );
    }

    let get = |id: &'static str| {
        let http = http.clone();
        let url = format!("{base}/v1/conversations/{id}");
        async move { http.get(url).send().await.unwrap().status().as_u16() }
    };
    // Generous and bounded: the reaper runs every second.
    let started = Instant::now();
    while get("old-conversation").await != 404 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the old conversation is still there after 30 s; log:\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(get("recent-conversation").await, 200);

    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let scrape = Scrape::parse(&text).unwrap();
    let deleted = |reason: &str| {
        scrape.value(
            "convstore_conversations_deleted_total",
            &[("reason", reason)],
        )
    };
    assert_eq!(deleted("retention"), 1.0);
    assert_eq!(deleted("api"), 0.0);
    assert_eq!(deleted("erase"), 0.0);
    assert!(
        scrape.sum("convstore_retention_runs_total", &[("outcome", "ok")]) >= 1.0,
        "{text}"
    );
    let stats: Value = reqwest::get(format!("{base}/v1/stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["deleted"]["retention"], 1, "{stats}");
    // One more run must not count it again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        Scrape::parse(&text).unwrap().value(
            "convstore_conversations_deleted_total",
            &[("reason", "retention")]
        ),
        1.0
    );
    let log = daemon.log_text();
    assert!(log.contains("Retention removed"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}
