//! The store against a real (managed, hermetic) PostgreSQL with pgvector:
//! migrations, the vector column and its dimension check, batch writes by
//! COPY and by UNNEST, idempotency, pending chunks, reads and counts.
// Test code: a panic on what the test set up itself is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/cluster.rs"]
mod cluster;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use cluster::TestCluster;
use convstore::config::WriteMethod;
use convstore_core::model::{
    Chunk, ChunkVector, Conversation, EmbeddedChunk, EmbeddingStatus, Message, ReadyConversation,
    content_hash,
};
use convstore_store::copy::CopyEncoder;
use convstore_store::{Store, StoreError};
use sqlx::Row;
use uuid::Uuid;

const DIMS: usize = 16;

/// A URL for another database of the same cluster.
fn database_url(cluster: &TestCluster, name: &str) -> String {
    cluster
        .url()
        .replacen("/convstore?", &format!("/{name}?"), 1)
}

/// A fresh database `name`, migrated, with `vector(DIMS)`, written by `method`.
async fn fresh_store(cluster: &TestCluster, name: &str, method: WriteMethod) -> Store {
    let admin = Store::connect(&cluster.url(), 1, Duration::from_secs(30))
        .await
        .expect("connect");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(admin.pool())
        .await
        .expect("create database");
    admin.close().await;
    let store = Store::connect(&database_url(cluster, name), 4, Duration::from_secs(30))
        .await
        .expect("connect")
        .with_write_method(method);
    store.migrate().await.expect("migrate");
    store
        .ensure_vector_column(DIMS)
        .await
        .expect("vector column");
    store
}

/// A deterministic unit-ish vector for a text.
fn vector_for(text: &str) -> Arc<[f32]> {
    let h = content_hash(text);
    (0..DIMS)
        .map(|i| (f32::from(h[i % 32]) - 127.5) / 128.0)
        .collect()
}

fn embedded(seq: i32, text: &str) -> EmbeddedChunk {
    EmbeddedChunk {
        chunk: Chunk {
            seq,
            content: text.to_string(),
            content_hash: content_hash(text),
        },
        vector: ChunkVector::Embedded(vector_for(text)),
    }
}

fn without_vector(seq: i32, text: &str, status: EmbeddingStatus) -> EmbeddedChunk {
    EmbeddedChunk {
        chunk: Chunk {
            seq,
            content: text.to_string(),
            content_hash: content_hash(text),
        },
        vector: match status {
            EmbeddingStatus::Failed => ChunkVector::Failed("input rejected: too long".to_string()),
            _ => ChunkVector::Pending,
        },
    }
}

fn ts(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_763_000_000 + secs, 123_456_000)
        .single()
        .expect("valid timestamp")
}

fn conversation(id: Uuid, client_id: Option<&str>, n: usize) -> Conversation {
    Conversation {
        id,
        client_id: client_id.map(str::to_string),
        user_id: format!("user-{}", n % 3),
        channel: "web".into(),
        messages: vec![
            Message {
                role: "user".into(),
                content: format!("Book me a flight to Seattle, number {n} — ünïcode"),
                ts: Some(ts(n as i64)),
                message_id: None,
            },
            Message {
                role: "assistant".into(),
                content: "Done.".into(),
                ts: None,
                message_id: None,
            },
        ],
        transcript: None,
        summary: n.is_multiple_of(2).then(|| format!("summary {n}")),
        metadata: serde_json::json!({"n": n, "tags": ["a", "b"]}),
        created_at: (n % 2 == 1).then(|| ts(n as i64)),
        received_at: ts(1000 + n as i64),
        received_instant: Instant::now(),
    }
}

/// `count` conversations of three embedded chunks each.
fn batch(first: u128, count: usize) -> Vec<ReadyConversation> {
    (0..count)
        .map(|n| {
            let id = Uuid::from_u128(first + n as u128);
            ReadyConversation {
                conversation: conversation(id, Some(&format!("client-{}", first + n as u128)), n),
                chunks: (0..3)
                    .map(|seq| embedded(seq, &format!("conversation {id} chunk {seq}")))
                    .collect(),
                model: "test-model".into(),
                version: convstore_core::model::RowVersion::default(),
            }
        })
        .collect()
}

/// Everything stored, as text, for comparing two databases.
async fn dump(store: &Store) -> Vec<String> {
    let conversations = sqlx::query(
        "SELECT row(id, client_id, user_id, channel, summary, transcript, messages, metadata, \
         created_at, received_at, embedding_status)::text AS r FROM conversations ORDER BY id",
    )
    .fetch_all(store.pool())
    .await
    .expect("dump conversations");
    let chunks = sqlx::query(
        "SELECT row(conversation_id, seq, content, content_hash, model, embedding, \
         embedding_status, error, embedded_at IS NOT NULL)::text AS r \
         FROM conversation_chunks ORDER BY conversation_id, seq",
    )
    .fetch_all(store.pool())
    .await
    .expect("dump chunks");
    conversations
        .iter()
        .chain(chunks.iter())
        .map(|row| row.get::<String, _>("r"))
        .collect()
}

#[tokio::test]
async fn copy_and_unnest_store_the_same_rows() {
    let cluster = TestCluster::start().await;
    let by_copy = fresh_store(&cluster, "by_copy", WriteMethod::Copy).await;
    let by_unnest = fresh_store(&cluster, "by_unnest", WriteMethod::Unnest).await;

    let mut rows = batch(1, 20);
    // A transcript-only conversation, and one with pending and failed chunks.
    rows[3].conversation.messages.clear();
    rows[3].conversation.transcript = Some("free-form transcript".into());
    rows[5].chunks[1] = without_vector(1, "pending text", EmbeddingStatus::Pending);
    rows[5].chunks[2] = without_vector(2, "failed text", EmbeddingStatus::Failed);

    for store in [&by_copy, &by_unnest] {
        let outcome = store.write_batch(&rows).await.expect("write");
        assert_eq!(outcome.conversations_inserted, 20);
        assert_eq!(outcome.duplicates, 0);
        assert_eq!(outcome.chunks_inserted, 60);
        assert_eq!(outcome.chunks_pending, 1);
        assert_eq!(outcome.chunks_failed, 1);
    }
    let copied = dump(&by_copy).await;
    assert_eq!(copied.len(), 80);
    assert_eq!(copied, dump(&by_unnest).await);

    // The vectors are exactly the f32 values sent, and the COPY path's
    // timestamps are within the write.
    for store in [&by_copy, &by_unnest] {
        let rows = sqlx::query(
            "SELECT content, embedding FROM conversation_chunks WHERE embedding IS NOT NULL",
        )
        .fetch_all(store.pool())
        .await
        .expect("vectors");
        assert_eq!(rows.len(), 58);
        for row in rows {
            let content: String = row.get("content");
            let v: pgvector::Vector = row.get("embedding");
            assert_eq!(v.as_slice(), &*vector_for(&content));
        }
    }

    let stored = by_copy
        .get_conversation(rows[5].conversation.id)
        .await
        .expect("read")
        .expect("present");
    assert_eq!(stored.embedding_status, EmbeddingStatus::Pending);
    assert_eq!(
        stored.messages.as_ref(),
        Some(&rows[5].conversation.messages)
    );
    assert_eq!(stored.created_at, rows[5].conversation.created_at);
    assert_eq!(stored.received_at, rows[5].conversation.received_at);
    let statuses: Vec<_> = stored.chunks.iter().map(|c| c.embedding_status).collect();
    assert_eq!(
        statuses,
        [
            EmbeddingStatus::Embedded,
            EmbeddingStatus::Pending,
            EmbeddingStatus::Failed
        ]
    );
    assert_eq!(
        stored.chunks[2].error.as_deref(),
        Some("input rejected: too long")
    );
    assert!(stored.chunks[0].embedded_at.is_some());
    assert!(stored.chunks[1].embedded_at.is_none());

    let transcript_only = by_unnest
        .get_conversation_by_client_id("client-4")
        .await
        .expect("read")
        .expect("present");
    assert_eq!(transcript_only.transcript, "free-form transcript");
    assert!(transcript_only.messages.is_none());
    let json = serde_json::to_value(&transcript_only).expect("serialises");
    assert_eq!(json["chunks"][0]["embedding_status"], "embedded");
    assert!(json["chunks"][0].get("embedding").is_none());

    assert!(
        by_copy
            .get_conversation(Uuid::from_u128(999_999))
            .await
            .expect("read")
            .is_none()
    );

    for store in [&by_copy, &by_unnest] {
        let counts = store.counts().await.expect("counts");
        assert_eq!(counts.conversations, 20);
        assert_eq!(counts.chunks.embedded, 58);
        assert_eq!(counts.chunks.pending, 1);
        assert_eq!(counts.chunks.failed, 1);
    }
}

#[tokio::test]
async fn same_client_id_stores_one_row() {
    let cluster = TestCluster::start().await;
    for (name, method) in [
        ("dup_copy", WriteMethod::Copy),
        ("dup_unnest", WriteMethod::Unnest),
    ] {
        let store = fresh_store(&cluster, name, method).await;
        let first = batch(100, 5);

        // Repeated in the batch: by id, and by client id under another id.
        let mut doubled = first.clone();
        doubled.push(first[0].clone());
        let mut other_id = first[1].clone();
        other_id.conversation.id = Uuid::from_u128(555);
        doubled.push(other_id);
        let outcome = store.write_batch(&doubled).await.expect("write");
        assert_eq!(outcome.conversations_inserted, 5, "{name}");
        assert_eq!(outcome.duplicates, 2, "{name}");
        assert_eq!(outcome.chunks_inserted, 15, "{name}");

        // The whole batch again (a retry or a journal replay): nothing new.
        let again = store.write_batch(&first).await.expect("write again");
        assert_eq!(again.conversations_inserted, 0, "{name}");
        assert_eq!(again.duplicates, 5, "{name}");
        assert_eq!(again.chunks_inserted, 0, "{name}");

        // Two writers racing with the same client id under different ids
        // (two instances): one row.
        let mut a = batch(200, 1);
        let mut b = batch(300, 1);
        a[0].conversation.client_id = Some("raced".into());
        b[0].conversation.client_id = Some("raced".into());
        let (ra, rb) = tokio::join!(store.write_batch(&a), store.write_batch(&b));
        let inserted =
            ra.expect("a").conversations_inserted + rb.expect("b").conversations_inserted;
        assert_eq!(inserted, 1, "{name}");

        // Overlapping batches in opposite orders (a redelivery racing the
        // original): both succeed, each row once. Whether the two inserts
        // overlap is up to timing; `write_batch` inserts in id order so
        // that, when they do, one waits for the other instead of the two
        // deadlocking.
        for round in 0..5u128 {
            let forward = batch(10_000 + round * 1_000, 64);
            let mut backward = forward.clone();
            backward.reverse();
            let (f, b) = tokio::join!(store.write_batch(&forward), store.write_batch(&backward));
            let (f, b) = (f.expect("forward"), b.expect("backward"));
            assert_eq!(
                f.conversations_inserted + b.conversations_inserted,
                64,
                "{name}"
            );
            assert_eq!(f.duplicates + b.duplicates, 64, "{name}");
        }

        let counts = store.counts().await.expect("counts");
        assert_eq!(counts.conversations, 6 + 5 * 64, "{name}");
        assert_eq!(counts.chunks.total(), 18 + 5 * 64 * 3, "{name}");
    }
}

/// Issue 15: a row id held by another client id (a row an older version
/// keyed by a UUID-shaped client id) must not make a new conversation
/// "stored" without its row. It is stored under a fresh row id; the
/// client id stays the key for reads, retries and the journal's replay.
#[tokio::test]
async fn a_row_id_held_by_another_client_id_is_not_reported_stored() {
    let cluster = TestCluster::start().await;
    for (name, method) in [
        ("alias_copy", WriteMethod::Copy),
        ("alias_unnest", WriteMethod::Unnest),
    ] {
        let store = fresh_store(&cluster, name, method).await;
        let victim_row = convstore_core::validate::row_id("victim-conversation-42");
        let mut squatter = batch(1, 1);
        squatter[0].conversation.id = victim_row;
        squatter[0].conversation.client_id = Some(victim_row.to_string());
        assert_eq!(
            store
                .write_batch(&squatter)
                .await
                .expect("squat")
                .conversations_inserted,
            1
        );

        let mut victim = batch(2, 1);
        victim[0].conversation.id = victim_row;
        victim[0].conversation.client_id = Some("victim-conversation-42".into());
        let key = [(victim_row, Some("victim-conversation-42"))];
        assert!(
            store.stored_ids(&key).await.expect("lookup").is_empty(),
            "{name}"
        );

        let outcome = store.write_batch(&victim).await.expect("write the victim");
        assert_eq!(outcome.conversations_inserted, 1, "{name}");
        assert_eq!(outcome.relocated, 1, "{name}");
        assert_eq!(outcome.duplicates, 0, "{name}");
        assert_eq!(outcome.chunks_inserted, 3, "{name}");

        let stored = store
            .get_conversation_by_client_id("victim-conversation-42")
            .await
            .expect("read")
            .expect("the victim's row exists");
        assert_ne!(stored.id, victim_row, "{name}");
        assert_eq!(
            stored.messages,
            Some(victim[0].conversation.messages.clone())
        );
        assert_eq!(stored.chunks.len(), 3, "{name}");
        let squatted = store
            .get_conversation(victim_row)
            .await
            .expect("read")
            .expect("squatter");
        assert_eq!(squatted.client_id, Some(victim_row.to_string()), "{name}");
        assert_eq!(
            store.stored_ids(&key).await.expect("lookup").len(),
            1,
            "{name}"
        );

        // A retry (or a journal replay) of the victim is now a duplicate.
        let again = store.write_batch(&victim).await.expect("retry");
        assert_eq!(again.conversations_inserted, 0, "{name}");
        assert_eq!(again.duplicates, 1, "{name}");
        assert_eq!(
            store.counts().await.expect("counts").conversations,
            2,
            "{name}"
        );
    }
}

#[tokio::test]
async fn dimension_check_errors_clearly() {
    let cluster = TestCluster::start().await;
    let store = fresh_store(&cluster, "dims", WriteMethod::Copy).await;
    assert_eq!(store.dimensions(), Some(DIMS));

    // Again with the same dimension: nothing to do. Several instances at once.
    let other = store.clone();
    let (a, b) = tokio::join!(
        store.ensure_vector_column(DIMS),
        other.ensure_vector_column(DIMS)
    );
    a.expect("same dimension again");
    b.expect("same dimension, concurrently");

    let err = store
        .ensure_vector_column(DIMS * 2)
        .await
        .expect_err("another dimension");
    assert!(matches!(err, StoreError::Schema(_)), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&format!("{DIMS}-dimensional")), "{text}");
    assert!(
        text.contains(&format!("embedding.dimensions is {}", DIMS * 2)),
        "{text}"
    );
    assert!(!err.is_retryable());

    // A vector of the wrong size is refused before the database, by id.
    let mut bad = batch(1, 2);
    bad[1].chunks[0].vector = ChunkVector::Embedded(Arc::from(vec![0.5f32; DIMS + 1]));
    match store.write_batch(&bad).await {
        Err(StoreError::InvalidConversation { id, reason }) => {
            assert_eq!(id, bad[1].conversation.id);
            assert!(reason.contains("dimensions"), "{reason}");
        }
        other => panic!("expected InvalidConversation, got {other:?}"),
    }
    assert_eq!(store.counts().await.expect("counts").conversations, 0);

    // A database whose bare column already holds vectors of another size
    // (written before the column was fixed) is refused the same way.
    let admin = Store::connect(&cluster.url(), 1, Duration::from_secs(30))
        .await
        .expect("connect");
    sqlx::query("CREATE DATABASE legacy")
        .execute(admin.pool())
        .await
        .expect("create database");
    let legacy = Store::connect(
        &database_url(&cluster, "legacy"),
        2,
        Duration::from_secs(30),
    )
    .await
    .expect("connect");
    legacy.migrate().await.expect("migrate");
    legacy.migrate().await.expect("migrate is idempotent");
    sqlx::query(
        "INSERT INTO conversations (id, user_id, channel, transcript, received_at, embedding_status) \
         VALUES ('00000000-0000-0000-0000-000000000001', 'u', 'c', 't', now(), 'embedded')",
    )
    .execute(legacy.pool())
    .await
    .expect("conversation");
    sqlx::query(
        "INSERT INTO conversation_chunks (conversation_id, seq, content, content_hash, model, \
         embedding, embedding_status) VALUES ('00000000-0000-0000-0000-000000000001', 0, 't', \
         sha256('t'), 'old-model', '[1,2,3,4]', 'embedded')",
    )
    .execute(legacy.pool())
    .await
    .expect("chunk");
    let text = legacy
        .ensure_vector_column(DIMS)
        .await
        .expect_err("stored 4-dimensional vectors")
        .to_string();
    assert!(text.contains("4-dimensional"), "{text}");
    assert!(text.contains("old-model"), "{text}");
    legacy
        .ensure_vector_column(4)
        .await
        .expect("matching dimension");
}

#[tokio::test]
async fn copy_encoder_round_trips_through_postgres() {
    let cluster = TestCluster::start().await;
    let store = fresh_store(&cluster, "roundtrip", WriteMethod::Copy).await;
    let mut conn = store.pool().acquire().await.expect("connection");
    sqlx::query(
        "CREATE TEMP TABLE t (u uuid, i int4, s text, b bytea, ts timestamptz, v vector, n text)",
    )
    .execute(&mut *conn)
    .await
    .expect("temp table");

    let times = [
        Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0)
            .single()
            .expect("ts"),
        Utc.with_ymd_and_hms(1969, 7, 20, 20, 17, 40)
            .single()
            .expect("ts"),
        ts(0),
    ];
    let vectors: [&[f32]; 3] = [
        &[1.0, -2.5, 3.25e-7],
        &[0.0],
        &[f32::MAX, f32::MIN_POSITIVE],
    ];
    let texts = ["", "héllo\nworld\t\"quoted\"\\", "🦀"];
    let mut enc = CopyEncoder::new();
    for i in 0..3 {
        enc.begin_row(7).expect("row");
        enc.uuid(&Uuid::from_u128(i as u128 + 1));
        enc.int4([i32::MIN, 0, i32::MAX][i]);
        enc.text(texts[i]).expect("text");
        enc.bytea(&[0, 255, i as u8][..i + 1]).expect("bytea");
        enc.timestamptz(times[i]).expect("ts");
        enc.vector(vectors[i]).expect("vector");
        enc.null();
    }
    let mut copy = conn
        .copy_in_raw("COPY t FROM STDIN (FORMAT BINARY)")
        .await
        .expect("copy");
    copy.send(enc.take()).await.expect("send");
    copy.send(enc.finish().expect("complete"))
        .await
        .expect("send");
    assert_eq!(copy.finish().await.expect("finish"), 3);

    let rows = sqlx::query("SELECT u, i, s, b, ts, v, n FROM t ORDER BY u")
        .fetch_all(&mut *conn)
        .await
        .expect("read back");
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row.get::<Uuid, _>("u"), Uuid::from_u128(i as u128 + 1));
        assert_eq!(row.get::<i32, _>("i"), [i32::MIN, 0, i32::MAX][i]);
        assert_eq!(row.get::<String, _>("s"), texts[i]);
        assert_eq!(
            row.get::<Vec<u8>, _>("b"),
            [0, 255, i as u8][..i + 1].to_vec()
        );
        assert_eq!(row.get::<DateTime<Utc>, _>("ts"), times[i]);
        assert_eq!(row.get::<pgvector::Vector, _>("v").as_slice(), vectors[i]);
        assert_eq!(row.get::<Option<String>, _>("n"), None);
    }
}

#[tokio::test]
async fn unavailable_database_is_retryable() {
    let mut cluster = TestCluster::start().await;
    let store = fresh_store(&cluster, "gone", WriteMethod::Copy).await;
    store.write_batch(&batch(1, 2)).await.expect("write");
    store.ping().await.expect("ping");
    cluster.stop().await;

    let err = store
        .write_batch(&batch(10, 2))
        .await
        .expect_err("server is down");
    assert!(err.is_retryable(), "{err:?}");
    assert!(store.ping().await.expect_err("down").is_retryable());

    let missing = Store::connect(
        "postgres://convstore@localhost/convstore?host=/nonexistent-socket-dir",
        1,
        Duration::from_millis(500),
    )
    .await
    .expect_err("no server");
    assert!(missing.is_retryable(), "{missing:?}");
}
