//! The store against a real (managed, hermetic) PostgreSQL with pgvector:
//! migrations, the vector column and its dimension check, batch writes by
//! COPY and by UNNEST, idempotency, pending chunks, reads and counts.
// Test code: a panic on what the test set up itself is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/cluster.rs"]
mod cluster;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use cluster::TestCluster;
use convstore::config::WriteMethod;
use convstore_core::model::{
    Chunk, ChunkVector, Conversation, EmbeddedChunk, EmbeddingStatus, Message, ReadyConversation,
    Role, content_hash,
};
use convstore_store::copy::CopyEncoder;
use convstore_store::layout::Layout;
use convstore_store::schema::HnswBuild;
use convstore_store::search::{SearchFilter, SearchMode, SearchQuery, Searcher, explain_exact};
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
        .with_write_method(method)
        .with_partitions(cluster::test_partitions());
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
                role: Role::User,
                content: format!("Book me a flight to Seattle, number {n} — ünïcode"),
                ts: Some(ts(n as i64)),
                message_id: None,
            },
            Message {
                role: Role::Assistant,
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

/// The HNSW index's storage options, `m` and `ef_construction` as numbers.
async fn index_build(store: &Store) -> (u32, u32) {
    let options: Vec<String> = sqlx::query_scalar(
        "SELECT coalesce(reloptions, '{}'::text[]) FROM pg_class \
         WHERE oid = 'conversation_chunks_embedding_hnsw_idx'::regclass",
    )
    .fetch_one(store.pool())
    .await
    .expect("index options");
    let get = |name: &str| {
        options
            .iter()
            .find_map(|o| o.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("{name} in {options:?}"))
            .parse()
            .expect("a number")
    };
    (get("m"), get("ef_construction"))
}

#[tokio::test]
async fn the_index_is_built_with_the_configured_parameters_and_keeps_them() {
    let cluster = TestCluster::start().await;
    let defaults = fresh_store(&cluster, "hnsw_defaults", WriteMethod::Copy).await;
    assert_eq!(
        index_build(&defaults).await,
        (16, 64),
        "pgvector's defaults"
    );
    defaults.close().await;

    let admin = Store::connect(&cluster.url(), 1, Duration::from_secs(30))
        .await
        .expect("connect");
    sqlx::query("CREATE DATABASE hnsw_custom")
        .execute(admin.pool())
        .await
        .expect("create database");
    admin.close().await;
    let custom = Store::connect(
        &database_url(&cluster, "hnsw_custom"),
        2,
        Duration::from_secs(30),
    )
    .await
    .expect("connect")
    .with_partitions(cluster::test_partitions())
    .with_hnsw(HnswBuild {
        m: 8,
        ef_construction: 100,
    });
    custom.migrate().await.expect("migrate");
    custom.ensure_vector_column(DIMS).await.expect("index");
    assert_eq!(index_build(&custom).await, (8, 100));

    // Another start with other parameters keeps the index as built.
    let restarted = custom.clone().with_hnsw(HnswBuild::default());
    restarted.ensure_vector_column(DIMS).await.expect("again");
    assert_eq!(index_build(&restarted).await, (8, 100));

    // Out of pgvector's range: refused before anything is built.
    let err = restarted
        .clone()
        .with_hnsw(HnswBuild {
            m: 16,
            ef_construction: 16,
        })
        .ensure_vector_column(DIMS)
        .await
        .expect_err("ef_construction below 2 m");
    assert!(err.to_string().contains("at least twice m"), "{err}");
    custom.close().await;
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
    .expect("connect")
    .with_partitions(cluster::test_partitions());
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
        "INSERT INTO conversation_chunks (user_id, conversation_id, seq, content, content_hash, \
         model, embedding, embedding_status) VALUES ('u', '00000000-0000-0000-0000-000000000001', 0, 't', \
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

/// A fresh database `name`, migrated with `database.partitions =
/// partitions` (whatever `CONVSTORE_TEST_PARTITIONS` says), with
/// `vector(DIMS)`.
async fn store_with_partitions(cluster: &TestCluster, name: &str, partitions: u32) -> Store {
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
        .with_partitions(partitions);
    store.migrate().await.expect("migrate");
    store
        .ensure_vector_column(DIMS)
        .await
        .expect("vector column");
    store
}

/// The partition numbers of `table` (`<table>_p<N>`) an `EXPLAIN` names.
fn partitions_in(plan: &str, table: &str) -> BTreeSet<u32> {
    let prefix = format!("{table}_p");
    plan.match_indices(&prefix)
        .filter_map(|(at, _)| {
            let digits: String = plan[at + prefix.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .collect()
}

/// `database.partitions = 8`: both tables hash-partitioned by user, an
/// HNSW index on every chunk partition, each user's rows (and chunks) in
/// one partition, and a search filtered by user reads one partition of
/// each table.
#[tokio::test]
async fn partitioned_layout_keeps_each_user_in_one_partition() {
    let cluster = TestCluster::start().await;
    let store = store_with_partitions(&cluster, "parts", 8).await;
    assert_eq!(
        store.layout().await.expect("layout"),
        Layout::Partitioned { partitions: 8 }
    );
    for table in ["conversations", "conversation_chunks"] {
        let (strategy, parts): (String, i64) = sqlx::query_as(
            "SELECT p.partstrat::text, \
                    (SELECT count(*) FROM pg_inherits i WHERE i.inhparent = p.partrelid) \
             FROM pg_partitioned_table p WHERE p.partrelid = $1::regclass",
        )
        .bind(table)
        .fetch_one(store.pool())
        .await
        .expect("pg_partitioned_table");
        assert_eq!((strategy.as_str(), parts), ("h", 8), "{table}");
    }
    let hnsw: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'conversation_chunks_embedding_hnsw_idx'::regclass",
    )
    .fetch_one(store.pool())
    .await
    .expect("hnsw partitions");
    assert_eq!(hnsw, 8, "an HNSW index on every partition");
    let column: String = sqlx::query_scalar(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute \
         WHERE attrelid = 'conversation_chunks_p3'::regclass AND attname = 'embedding'",
    )
    .fetch_one(store.pool())
    .await
    .expect("column type");
    assert_eq!(column, format!("vector({DIMS})"));

    // 24 users, two conversations each, by both write methods.
    let ready: Vec<ReadyConversation> = (0..48u128)
        .map(|n| {
            let mut r = batch(1_000 + n * 10, 1).remove(0);
            r.conversation.user_id = format!("user-{}", n % 24);
            r
        })
        .collect();
    let first = store.write_batch(&ready[..24]).await.expect("copy");
    let second = store
        .clone()
        .with_write_method(WriteMethod::Unnest)
        .write_batch(&ready[24..])
        .await
        .expect("unnest");
    assert_eq!(
        first.conversations_inserted + second.conversations_inserted,
        48
    );
    let placement: Vec<(String, i64, i64, String, String)> = sqlx::query_as(
        "SELECT c.user_id, count(DISTINCT c.tableoid), count(DISTINCT k.tableoid), \
                min(c.tableoid::regclass::text), min(k.tableoid::regclass::text) \
         FROM conversations c \
         JOIN conversation_chunks k ON k.user_id = c.user_id AND k.conversation_id = c.id \
         GROUP BY c.user_id",
    )
    .fetch_all(store.pool())
    .await
    .expect("placement");
    assert_eq!(placement.len(), 24);
    let mut used = BTreeSet::new();
    for (user, conversation_parts, chunk_parts, conversations, chunks) in &placement {
        assert_eq!((*conversation_parts, *chunk_parts), (1, 1), "{user}");
        // Same hash, same remainder: partition N of both tables.
        assert_eq!(
            conversations.trim_start_matches("conversations_"),
            chunks.trim_start_matches("conversation_chunks_"),
            "{user}"
        );
        used.insert(conversations.clone());
    }
    assert!(used.len() > 1, "24 users all in one partition: {used:?}");

    // A search filtered by user reads one partition of each table.
    let query = vector_for("where do I fly");
    let filter = SearchFilter {
        user_id: Some("user-5".into()),
        ..SearchFilter::default()
    };
    let plan = explain_exact(&store, &query, 5, &filter)
        .await
        .expect("explain");
    assert_eq!(
        partitions_in(&plan, "conversation_chunks").len(),
        1,
        "{plan}"
    );
    assert_eq!(partitions_in(&plan, "conversations").len(), 1, "{plan}");
    let everyone = explain_exact(&store, &query, 5, &SearchFilter::default())
        .await
        .expect("explain");
    assert_eq!(
        partitions_in(&everyone, "conversation_chunks").len(),
        8,
        "{everyone}"
    );
    let found = Searcher::new(store.clone(), 1_000)
        .search(SearchQuery {
            vector: &query,
            k: 5,
            filter: &filter,
            ef_search: 40,
            mode: SearchMode::Auto,
            vectors: convstore_store::models::VectorSet::Current,
        })
        .await
        .expect("search");
    assert_eq!(found.hits.len(), 2);
    assert!(found.hits.iter().all(|h| h.user_id == "user-5"));

    // A delete and an erasure find their rows in the partitions.
    let victim = ready[5].conversation.client_id.clone().expect("client id");
    let deleted = store
        .delete_conversation(&victim, ready[5].conversation.id, i64::MAX / 2, false)
        .await
        .expect("delete")
        .expect("known");
    assert_eq!((deleted.row, deleted.chunks), (true, 3));
    let erased = store
        .erase_user("user-6", i64::MAX / 2)
        .await
        .expect("erase");
    assert_eq!((erased.conversations, erased.chunks), (2, 6));
    assert_eq!(
        store.counts().await.expect("counts").conversations,
        48 - 1 - 2
    );

    // The count is fixed once made; 0 takes whatever is found.
    let err = store
        .clone()
        .with_partitions(4)
        .migrate()
        .await
        .expect_err("another count");
    assert!(err.to_string().contains("8 hash partitions"), "{err}");
    assert_eq!(
        store.clone().with_partitions(0).migrate().await.expect("0"),
        Layout::Partitioned { partitions: 8 }
    );
}

/// What the migrations make and what `sql/partitioned.sql` makes are the
/// same tables: columns, defaults, constraints and indexes.
#[tokio::test]
async fn partitioned_layout_matches_the_migrations() {
    /// (PostgreSQL's own clones of a foreign key onto each referenced
    /// partition, `conparentid <> 0`, are left out.)
    async fn shape(store: &Store) -> Vec<String> {
        let mut lines: Vec<String> = sqlx::query_scalar(
            "SELECT table_name || '.' || column_name || ' ' || udt_name || ' ' || is_nullable \
                    || ' ' || coalesce(column_default, '') \
             FROM information_schema.columns \
             WHERE table_name IN ('conversations', 'conversation_chunks') \
             ORDER BY table_name, ordinal_position",
        )
        .fetch_all(store.pool())
        .await
        .expect("columns");
        lines.extend(
            sqlx::query_scalar::<_, String>(
                "SELECT conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid) \
                 FROM pg_constraint \
                 WHERE conrelid IN ('conversations'::regclass, 'conversation_chunks'::regclass) \
                   AND conparentid = 0 \
                 ORDER BY 1",
            )
            .fetch_all(store.pool())
            .await
            .expect("constraints"),
        );
        lines.extend(
            sqlx::query_scalar::<_, String>(
                "SELECT replace(indexdef, ' ON ONLY ', ' ON ') FROM pg_indexes \
                 WHERE tablename IN ('conversations', 'conversation_chunks') ORDER BY indexname",
            )
            .fetch_all(store.pool())
            .await
            .expect("indexes"),
        );
        lines
    }
    let cluster = TestCluster::start().await;
    let plain = store_with_partitions(&cluster, "shape_plain", 0).await;
    let parted = store_with_partitions(&cluster, "shape_parted", 8).await;
    assert_eq!(plain.layout().await.expect("layout"), Layout::Plain);
    let (plain, parted) = (shape(&plain).await, shape(&parted).await);
    assert!(plain.len() > 30, "{plain:#?}");
    assert_eq!(plain, parted);
}

/// A database written at migration 0003 (the keys without `user_id`)
/// migrates to 0004 without losing a row or a vector; a non-empty plain
/// database is refused partitions.
#[tokio::test]
async fn a_database_at_0003_migrates_to_0004_keeping_rows_and_vectors() {
    let cluster = TestCluster::start().await;
    let admin = Store::connect(&cluster.url(), 1, Duration::from_secs(30))
        .await
        .expect("connect");
    sqlx::query("CREATE DATABASE upgrade")
        .execute(admin.pool())
        .await
        .expect("create database");
    admin.close().await;
    let store = Store::connect(
        &database_url(&cluster, "upgrade"),
        4,
        Duration::from_secs(30),
    )
    .await
    .expect("connect");
    let at_0003 = sqlx::migrate::Migrator::with_migrations(
        convstore_store::MIGRATOR
            .migrations
            .iter()
            .filter(|m| m.version <= 3)
            .cloned()
            .collect(),
    );
    at_0003.run(store.pool()).await.expect("migrations 1 to 3");
    store.ensure_vector_column(DIMS).await.expect("vector(16)");
    sqlx::raw_sql(
        "INSERT INTO conversations (id, client_id, user_id, channel, transcript, received_at, \
                                    embedding_status, version_stamp) \
         SELECT ('00000000-0000-0000-0000-' || lpad(i::text, 12, '0'))::uuid, 'c-' || i, \
                'u' || (i % 7), 'web', 'text ' || i, now(), \
                CASE WHEN i % 5 = 0 THEN 'pending' ELSE 'embedded' END, i \
         FROM generate_series(1, 60) AS i;
         INSERT INTO conversation_chunks (conversation_id, seq, content, content_hash, model, \
                                          embedding, embedding_status) \
         SELECT c.id, s, c.transcript || ' ' || s, sha256(convert_to(c.transcript || s, 'UTF8')), 'm', \
                CASE WHEN c.embedding_status = 'embedded' THEN \
                  ('[' || array_to_string(ARRAY(SELECT ((c.version_stamp * 16 + s * 3 + d) % 11 + 1)::float4 / 11 \
                                                FROM generate_series(1, 16) AS d), ',') || ']')::vector \
                END, \
                c.embedding_status \
         FROM conversations c, generate_series(0, 2) AS s;
         INSERT INTO embedding_cache (model, content_hash, embedding) \
         VALUES ('m', sha256('x'), '[1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1]');
         INSERT INTO tombstones (kind, key_sha, stamp) VALUES ('user', sha256('gone'), 1);",
    )
    .execute(store.pool())
    .await
    .expect("rows at 0003");

    async fn snapshot(store: &Store) -> (Vec<String>, Vec<String>, i64, i64) {
        let conversations = sqlx::query_scalar(
            "SELECT id::text || ' ' || client_id || ' ' || user_id || ' ' || md5(transcript) \
                    || ' ' || embedding_status FROM conversations ORDER BY id",
        )
        .fetch_all(store.pool())
        .await
        .expect("conversations");
        let chunks = sqlx::query_scalar(
            "SELECT conversation_id::text || ' ' || seq || ' ' || content || ' ' \
                    || coalesce(embedding::text, '-') || ' ' || embedding_status \
             FROM conversation_chunks ORDER BY conversation_id, seq",
        )
        .fetch_all(store.pool())
        .await
        .expect("chunks");
        let cache = sqlx::query_scalar("SELECT count(*) FROM embedding_cache")
            .fetch_one(store.pool())
            .await
            .expect("cache");
        let tombstones = sqlx::query_scalar("SELECT count(*) FROM tombstones")
            .fetch_one(store.pool())
            .await
            .expect("tombstones");
        (conversations, chunks, cache, tombstones)
    }
    let before = snapshot(&store).await;
    assert_eq!((before.0.len(), before.1.len()), (60, 180));

    // Partitions are not made of a database that holds conversations.
    let err = store
        .clone()
        .with_partitions(8)
        .migrate()
        .await
        .expect_err("non-empty plain database");
    assert!(
        err.to_string().contains("database.partitions is 8"),
        "{err}"
    );
    // The migrations ran before the layout check refused: 0004 is applied.
    assert_eq!(store.migrate().await.expect("migrate"), Layout::Plain);
    store.ensure_vector_column(DIMS).await.expect("index again");
    let after = snapshot(&store).await;
    assert_eq!(before, after);

    let version: i64 = sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations")
        .fetch_one(store.pool())
        .await
        .expect("version");
    assert!(version >= 4);
    // Every chunk carries its conversation's user, through the new key.
    let joined: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM conversation_chunks k \
         JOIN conversations c ON c.user_id = k.user_id AND c.id = k.conversation_id",
    )
    .fetch_one(store.pool())
    .await
    .expect("join");
    assert_eq!(joined, 180);
    let index: bool = sqlx::query_scalar(
        "SELECT to_regclass('conversation_chunks_embedding_hnsw_idx') IS NOT NULL",
    )
    .fetch_one(store.pool())
    .await
    .expect("index");
    assert!(index, "the HNSW index is built again at start-up");

    // The migrated rows serve reads, searches and new writes.
    let stored = store
        .get_conversation_by_client_id("c-4")
        .await
        .expect("read")
        .expect("c-4");
    assert_eq!((stored.user_id.as_str(), stored.chunks.len()), ("u4", 3));
    let filter = SearchFilter {
        user_id: Some("u3".into()),
        ..SearchFilter::default()
    };
    let found = Searcher::new(store.clone(), 1_000)
        .search(SearchQuery {
            vector: &vector_for("anything"),
            k: 3,
            filter: &filter,
            ef_search: 40,
            mode: SearchMode::Auto,
            vectors: convstore_store::models::VectorSet::Current,
        })
        .await
        .expect("search");
    assert_eq!(found.hits.len(), 3);
    assert!(found.hits.iter().all(|h| h.user_id == "u3"));
    let outcome = store.write_batch(&batch(9_000, 4)).await.expect("write");
    assert_eq!(outcome.conversations_inserted, 4);
}

/// A change of model at the store (issue 20; `convstore_store::models`),
/// on plain tables and, in `scripts/test.sh`'s partitioned pass, on
/// hash-partitioned ones: the previous vectors are kept and searchable
/// in their own table at their own dimension, every chunk waits for the
/// new model, a deletion takes the previous vectors along, search switches
/// only once nothing is pending, and the next start drops the table.
#[tokio::test]
async fn a_change_of_model_keeps_the_previous_vectors_until_the_switch() {
    use convstore_store::models::{KeepPrevious, ModelId, VectorSet};
    let cluster = TestCluster::start().await;
    let store = fresh_store(&cluster, "models", WriteMethod::Copy).await;
    store.write_batch(&batch(1, 6)).await.expect("write");
    let old = ModelId::new("test-model", DIMS);
    let state = store
        .prepare_vectors(&old, KeepPrevious::UntilNextStart)
        .await
        .expect("same model");
    assert_eq!(state.current, old);
    assert!(state.previous.is_none());

    let new = ModelId::new("next-model", 8);
    let state = store
        .prepare_vectors(&new, KeepPrevious::UntilNextStart)
        .await
        .expect("change");
    assert_eq!(state.current, new);
    assert!(state.migrating());
    assert_eq!(state.searched(), VectorSet::Previous);
    assert_eq!(state.previous.as_ref().map(|p| &p.id), Some(&old));
    let coverage = store.model_coverage().await.expect("coverage");
    assert_eq!(
        (coverage.chunks, coverage.embedded, coverage.pending),
        (18, 0, 18)
    );
    assert_eq!(coverage.previous_vectors, Some(18));

    // The previous vectors answer a search, at their own dimension.
    let text = format!("conversation {} chunk 1", Uuid::from_u128(3));
    let searcher = Searcher::new(store.clone(), 2000);
    let found = searcher
        .search(SearchQuery {
            vector: &vector_for(&text),
            k: 1,
            filter: &SearchFilter::default(),
            ef_search: 40,
            mode: SearchMode::Auto,
            vectors: VectorSet::Previous,
        })
        .await
        .expect("search the previous vectors");
    assert_eq!(found.hits[0].chunk.content, text);

    // A deletion takes them along.
    sqlx::query("DELETE FROM conversations WHERE id = $1")
        .bind(Uuid::from_u128(3))
        .execute(store.pool())
        .await
        .expect("delete");
    let coverage = store.model_coverage().await.expect("coverage");
    assert_eq!(coverage.previous_vectors, Some(15));

    // No switch while anything is pending; then the switch, once.
    assert!(!store.retire_previous().await.expect("retire"));
    sqlx::query(
        "UPDATE conversation_chunks SET embedding = array_fill(0.5, ARRAY[8])::vector, \
         embedding_status = 'embedded', embedded_at = now()",
    )
    .execute(store.pool())
    .await
    .expect("embed for the new model");
    assert!(store.retire_previous().await.expect("retire"));
    assert!(!store.retire_previous().await.expect("retire again"));
    let state = store.model_state(&new).await.expect("state");
    assert!(!state.migrating());
    assert_eq!(state.searched(), VectorSet::Current);

    // Kept while this "daemon" runs; dropped by the next start.
    let table = || async {
        sqlx::query_scalar::<_, Option<String>>(
            "SELECT to_regclass('previous_chunk_embeddings')::text",
        )
        .fetch_one(store.pool())
        .await
        .expect("table")
    };
    assert!(table().await.is_some());
    let state = store
        .prepare_vectors(&new, KeepPrevious::UntilNextStart)
        .await
        .expect("restart");
    assert!(state.previous.is_none());
    assert_eq!(table().await, None);
}
