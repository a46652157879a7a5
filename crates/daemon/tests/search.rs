//! Search (issue 9): recall of the HNSW index against exact search on the
//! shared sample, filters that are exact even when selective, the HTTP
//! and Unix socket API, the CLI, the query lane that does not wait behind
//! ingest, and real vectors from the builtin model.
//!
//! Store-level tests write the sample straight into a real managed
//! PostgreSQL with the stand-in's vectors (`standin_vector`, what the
//! daemon stores with the stand-in), then build the HNSW index, as an
//! operator loading history would. The filter tests compare with an
//! oracle computed here in Rust from the same vectors, not with SQL.
// Test code: a panic on what the test set up itself is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, TimeZone, Utc};
use convstore::config::SearchSettings;
use convstore_core::chunker::Chunker;
use convstore_core::model::{ChunkVector, EmbeddedChunk, ReadyConversation};
use convstore_core::validate::{Limits, parse_conversation};
use convstore_standin::standin_vector;
use convstore_store::Store;
use convstore_store::schema::{HNSW_INDEX, TEXT_INDEX};
use convstore_store::search::{
    SearchFilter, SearchHit, SearchMode, SearchOutcome, SearchQuery, Searcher, Strategy,
    explain_index_round, explain_lexical,
};
use serde_json::{Value, json};
use support::cluster::{TestCluster, require_setup};
use support::daemon::{BIN, Daemon, Standin, Workspace, connect_db, wait_for_count};

const MODEL: &str = "all-minilm";
const DIMS: usize = 384;
/// all-minilm's context in the stand-in: long conversations get 2+ chunks.
const CONTEXT: usize = 512;
const K: usize = 10;
/// Cosine distances from PostgreSQL (float4 sums) and from Rust (f64) agree
/// to about 1e-6; ties within this are ties.
const EPS: f64 = 1e-4;

fn default_ef() -> u32 {
    SearchSettings::default().ef_search.get()
}

/// One stored conversation, as the oracle sees it.
struct Known {
    id: String,
    user_id: String,
    channel: String,
    time: DateTime<Utc>,
    metadata: Value,
    vectors: Vec<Vec<f32>>,
}

/// Channels and times are not in the shared sample (one source, no
/// timestamps): spread them deterministically so that filters have
/// something to select. Three conversations are on channel `fax`, eight
/// carry `{"flag": "rare"}`, one in ten `{"tier": "gold"}`; conversation
/// `i` was created `i` hours after 2024-01-01.
fn decorate(i: usize, mut c: Value) -> Value {
    let channel = if [7, 1507, 3007].contains(&i) {
        "fax"
    } else {
        ["web", "slack", "api"][i % 3]
    };
    let mut metadata = json!({
        "source": "sgd",
        "tier": if i.is_multiple_of(10) { "gold" } else { "basic" },
    });
    if i % 500 == 3 {
        metadata["flag"] = json!("rare");
    }
    c["channel"] = json!(channel);
    c["metadata"] = metadata;
    c["created_at"] = json!(base_time(i).to_rfc3339());
    c
}

fn base_time(i: usize) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::hours(i as i64)
}

/// The sample, chunked as the daemon chunks it, with the stand-in's vectors.
fn prepare(n: usize) -> (Vec<ReadyConversation>, Vec<Known>) {
    let data = convstore_dataset::sample_or_generated(n).expect("test data");
    let chunker = Chunker::new(CONTEXT, 0);
    let mut ready = Vec::with_capacity(data.len());
    let mut known = Vec::with_capacity(data.len());
    for (i, value) in data.into_iter().enumerate() {
        let value = decorate(i, value);
        let body = serde_json::to_vec(&value).expect("serialise");
        let conversation = parse_conversation(&body, Limits::DEFAULT).expect("valid");
        let chunks: Vec<EmbeddedChunk> = chunker
            .chunk(&conversation)
            .into_iter()
            .map(|chunk| {
                let v = standin_vector(&chunk.content, DIMS);
                EmbeddedChunk {
                    chunk,
                    vector: ChunkVector::Embedded(Arc::from(v)),
                }
            })
            .collect();
        known.push(Known {
            id: conversation.client_id.clone().expect("sample ids"),
            user_id: conversation.user_id.clone(),
            channel: conversation.channel.clone(),
            time: conversation.created_at.expect("decorated"),
            metadata: conversation.metadata.clone(),
            vectors: chunks
                .iter()
                .map(|c| c.vector.vector().unwrap_or(&[]).to_vec())
                .collect(),
        });
        ready.push(ReadyConversation {
            conversation,
            chunks,
            model: MODEL.to_string(),
            version: convstore_core::model::RowVersion::default(),
        });
    }
    (ready, known)
}

/// A store holding the whole sample, the HNSW index built after the load.
async fn loaded_store(cluster: &TestCluster, ready: &[ReadyConversation]) -> Store {
    let store = Store::connect(&cluster.url(), 4, Duration::from_secs(60))
        .await
        .expect("connect")
        .with_partitions(support::cluster::test_partitions());
    store.migrate().await.expect("migrate");
    for batch in ready.chunks(250) {
        store.write_batch(batch).await.expect("write batch");
    }
    store.ensure_vector_column(DIMS).await.expect("index");
    sqlx::query("ANALYZE")
        .execute(store.pool())
        .await
        .expect("analyze");
    store
}

fn cosine_distance(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        dot += f64::from(*x) * f64::from(*y);
        na += f64::from(*x) * f64::from(*x);
        nb += f64::from(*y) * f64::from(*y);
    }
    1.0 - dot / (na.sqrt() * nb.sqrt())
}

/// The exact answer, computed here: every matching conversation's best
/// chunk, nearest first.
fn oracle(
    known: &[Known],
    query: &[f32],
    k: usize,
    keep: impl Fn(&Known) -> bool,
) -> Vec<(String, f64)> {
    let mut all: Vec<(String, f64)> = known
        .iter()
        .filter(|c| keep(c))
        .map(|c| {
            let best = c
                .vectors
                .iter()
                .map(|v| cosine_distance(query, v))
                .fold(f64::INFINITY, f64::min);
            (c.id.clone(), best)
        })
        .collect();
    all.sort_by(|a, b| a.1.total_cmp(&b.1));
    all.truncate(k);
    all
}

/// `got` is a correct answer: as many results as the oracle, nearest
/// first, one per conversation, each at its best chunk's distance, and
/// each among the oracle's answer (or tied with its last one).
fn assert_exact(
    what: &str,
    got: &SearchOutcome,
    want: &[(String, f64)],
    known: &HashMap<String, &Known>,
    query: &[f32],
) {
    let ids: Vec<&str> = got.hits.iter().map(|h| h.id.as_str()).collect();
    assert_eq!(
        got.hits.len(),
        want.len(),
        "{what}: got {ids:?}, want {want:?} ({:?})",
        got.plan
    );
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        ids.len(),
        "{what}: a conversation twice: {ids:?}"
    );
    let last = want.last().map_or(f64::INFINITY, |w| w.1);
    let wanted: HashSet<&str> = want.iter().map(|w| w.0.as_str()).collect();
    let mut previous = f64::NEG_INFINITY;
    for hit in &got.hits {
        assert!(hit.distance >= previous - EPS, "{what}: not nearest first");
        previous = hit.distance;
        let conv = known[&hit.id];
        let best = conv
            .vectors
            .iter()
            .map(|v| cosine_distance(query, v))
            .fold(f64::INFINITY, f64::min);
        assert!(
            (hit.distance - best).abs() < EPS,
            "{what}: {} at {} but its best chunk is at {best}",
            hit.id,
            hit.distance
        );
        assert!((hit.score - (1.0 - hit.distance)).abs() < 1e-9);
        assert!(
            wanted.contains(hit.id.as_str()) || hit.distance <= last + EPS,
            "{what}: {} ({}) is not among the {} nearest ({want:?})",
            hit.id,
            hit.distance,
            want.len()
        );
    }
}

async fn run(
    searcher: &Searcher,
    vector: &[f32],
    k: usize,
    filter: &SearchFilter,
    mode: SearchMode,
) -> SearchOutcome {
    searcher
        .search(SearchQuery {
            vector,
            k,
            filter,
            ef_search: default_ef(),
            mode,
            vectors: convstore_store::models::VectorSet::Current,
        })
        .await
        .expect("search")
}

/// Whether `plan` (EXPLAIN text) reads `index`, or (database.partitions)
/// one of its partitions' indexes.
async fn plan_reads_index(store: &Store, plan: &str, index: &str) -> bool {
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT $1::text UNION ALL \
         SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = to_regclass($1)",
    )
    .bind(index)
    .fetch_all(store.pool())
    .await
    .expect("index names");
    indexes.iter().any(|name| plan.contains(name.as_str()))
}

/// Query texts: a user message of every 26th conversation (the words
/// people use), and a few phrasings of common requests.
fn queries(data: &[Value], n: usize) -> Vec<String> {
    let mut out: Vec<String> = [
        "book me a flight to Seattle",
        "find a cheap hotel in New York for two nights",
        "I want to see a movie tonight",
        "reserve a table at an Italian restaurant",
        "what is the weather like this weekend",
        "I need a ride to the airport",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut i = 5;
    while out.len() < n {
        let c = &data[i % data.len()];
        if let Some(m) = c["messages"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["role"] == "user"))
            .and_then(|m| m["content"].as_str())
        {
            out.push(m.to_string());
        }
        i += 26;
    }
    out
}

/// The HNSW index finds at least 95% of what an exact scan finds (recall@10
/// over 150 queries, same query vectors), using the index for real.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hnsw_recall_at_10_against_exact_search_on_the_sample() {
    let (ready, _) = prepare(4000);
    let data = convstore_dataset::sample_or_generated(4000).expect("test data");
    let cluster = TestCluster::start().await;
    let store = loaded_store(&cluster, &ready).await;
    let chunks: i64 = sqlx::query_scalar("SELECT count(*) FROM conversation_chunks")
        .fetch_one(store.pool())
        .await
        .unwrap();
    eprintln!("{} conversations, {chunks} chunks stored", ready.len());
    assert!(ready.len() >= 4000 || std::env::var_os("CONVSTORE_SAMPLE").is_some());

    let searcher = Searcher::new(store.clone(), 2000);
    let caps = searcher.capabilities().await.expect("capabilities").clone();
    eprintln!(
        "pgvector {} (iterative scans: {})",
        caps.pgvector, caps.iterative_scan
    );

    // The index round really is an index scan.
    let probe = standin_vector("book me a flight to Seattle", DIMS);
    let plan = explain_index_round(&store, &probe, K, default_ef())
        .await
        .expect("explain");
    assert!(
        plan_reads_index(&store, &plan, HNSW_INDEX).await,
        "not an index scan:\n{plan}"
    );
    // And lexical search reads the GIN index, not every chunk's text.
    let plan = explain_lexical(
        &searcher,
        "book a flight to Seattle",
        K,
        &SearchFilter::default(),
    )
    .await
    .expect("explain lexical");
    assert!(
        plan_reads_index(&store, &plan, TEXT_INDEX).await,
        "lexical search does not use the full-text index:\n{plan}"
    );

    let texts = queries(&data, 150);
    let vectors: Vec<Vec<f32>> = texts.iter().map(|t| standin_vector(t, DIMS)).collect();
    let none = SearchFilter::default();
    let mut exact_answers = Vec::with_capacity(vectors.len());
    for v in &vectors {
        let exact = run(&searcher, v, K, &none, SearchMode::Exact).await;
        assert_eq!(exact.plan.strategy, Strategy::Exact);
        assert_eq!(exact.hits.len(), K);
        exact_answers.push(exact);
    }

    let mut recall_at_default = 0.0;
    for ef in [40u32, default_ef(), 200] {
        let mut found = 0usize;
        let mut strategies: HashMap<Strategy, usize> = HashMap::new();
        for (v, exact) in vectors.iter().zip(&exact_answers) {
            let approx = searcher
                .search(SearchQuery {
                    vector: v,
                    k: K,
                    filter: &none,
                    ef_search: ef,
                    mode: SearchMode::Auto,
                    vectors: convstore_store::models::VectorSet::Current,
                })
                .await
                .expect("search");
            *strategies.entry(approx.plan.strategy).or_default() += 1;
            let ids: HashSet<&str> = approx.hits.iter().map(|h| h.id.as_str()).collect();
            assert_eq!(ids.len(), approx.hits.len(), "one result per conversation");
            // Tie-aware: a hit at or within the exact 10th distance is a
            // correct member of the top 10 (identical chunk texts tie).
            let tenth = exact.hits[K - 1].distance;
            found += approx
                .hits
                .iter()
                .filter(|h| h.distance <= tenth + 1e-6)
                .count()
                .min(K);
        }
        let recall = found as f64 / (K * vectors.len()) as f64;
        eprintln!(
            "ef_search {ef}: recall@{K} = {recall:.4} over {} queries; strategies {strategies:?}",
            vectors.len()
        );
        if ef == default_ef() {
            recall_at_default = recall;
            assert!(
                strategies.get(&Strategy::Hnsw).copied().unwrap_or(0) * 10 >= vectors.len() * 9,
                "the index answered too few searches itself: {strategies:?}"
            );
        }
    }
    assert!(
        recall_at_default >= 0.95,
        "recall@{K} at ef_search {} is {recall_at_default:.4}",
        default_ef()
    );
}

/// Filters are exact: every result matches, and the count is k when k
/// match, all of them when fewer do; through the exact path for selective
/// filters, through over-fetch and its exact fallback when the index is
/// forced; results equal an oracle computed in Rust.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_are_exact_including_selective_ones() {
    let (ready, known) = prepare(4000);
    let cluster = TestCluster::start().await;
    let store = loaded_store(&cluster, &ready).await;
    let by_id: HashMap<String, &Known> = known.iter().map(|k| (k.id.clone(), k)).collect();
    // Default: selective filters are scanned exactly.
    let auto = Searcher::new(
        store.clone(),
        SearchSettings::default().exact_threshold.get(),
    );
    // Threshold 1: every filter goes through the index first (over-fetch,
    // then exact fallback when it cannot deliver).
    let indexed = Searcher::new(store.clone(), 1);
    let query = standin_vector("I need to book a flight for tomorrow morning", DIMS);

    let mut users: HashMap<&str, usize> = HashMap::new();
    for c in &known {
        *users.entry(c.user_id.as_str()).or_default() += 1;
    }
    let mut users: Vec<(&str, usize)> = users.into_iter().collect();
    users.sort();
    let picked: Vec<&str> = users
        .iter()
        .step_by(users.len().div_ceil(5))
        .map(|u| u.0)
        .collect();

    struct Case {
        name: String,
        filter: SearchFilter,
        keep: Box<dyn Fn(&Known) -> bool>,
        k: usize,
    }
    let mut cases: Vec<Case> = Vec::new();
    for user in &picked {
        let u = user.to_string();
        cases.push(Case {
            name: format!("user {user}"),
            filter: SearchFilter {
                user_id: Some(u.clone()),
                ..SearchFilter::default()
            },
            keep: Box::new(move |c| c.user_id == u),
            k: K,
        });
    }
    cases.push(Case {
        name: "channel fax (3 < k)".into(),
        filter: SearchFilter {
            channel: Some("fax".into()),
            ..SearchFilter::default()
        },
        keep: Box::new(|c| c.channel == "fax"),
        k: K,
    });
    cases.push(Case {
        name: "channel web".into(),
        filter: SearchFilter {
            channel: Some("web".into()),
            ..SearchFilter::default()
        },
        keep: Box::new(|c| c.channel == "web"),
        k: K,
    });
    let (from, to) = (base_time(100), base_time(105));
    cases.push(Case {
        name: "5-hour window".into(),
        filter: SearchFilter {
            since: Some(from),
            until: Some(to),
            ..SearchFilter::default()
        },
        keep: Box::new(move |c| c.time >= from && c.time < to),
        k: K,
    });
    let late = base_time(3000);
    cases.push(Case {
        name: "since hour 3000".into(),
        filter: SearchFilter {
            since: Some(late),
            ..SearchFilter::default()
        },
        keep: Box::new(move |c| c.time >= late),
        k: 25,
    });
    cases.push(Case {
        name: "metadata tier gold".into(),
        filter: SearchFilter {
            metadata: Some(json!({"tier": "gold"})),
            ..SearchFilter::default()
        },
        keep: Box::new(|c| c.metadata["tier"] == "gold"),
        k: K,
    });
    cases.push(Case {
        name: "metadata flag rare (8 < k)".into(),
        filter: SearchFilter {
            metadata: Some(json!({"flag": "rare"})),
            ..SearchFilter::default()
        },
        keep: Box::new(|c| c.metadata["flag"] == "rare"),
        k: K,
    });
    let combined_user = picked[0].to_string();
    cases.push(Case {
        name: "user + channel + since + metadata".into(),
        filter: SearchFilter {
            user_id: Some(combined_user.clone()),
            channel: Some("slack".into()),
            since: Some(base_time(0)),
            until: None,
            metadata: Some(json!({"source": "sgd"})),
        },
        keep: Box::new(move |c| c.user_id == combined_user && c.channel == "slack"),
        k: K,
    });
    cases.push(Case {
        name: "nobody".into(),
        filter: SearchFilter {
            user_id: Some("nobody".into()),
            ..SearchFilter::default()
        },
        keep: Box::new(|_| false),
        k: K,
    });

    for case in &cases {
        let want = oracle(&known, &query, case.k, &case.keep);
        let matching = known.iter().filter(|c| (case.keep)(c)).count();
        assert_eq!(want.len(), matching.min(case.k), "{}", case.name);

        // Default searcher: exact answers (selective filters are scanned).
        let got = run(&auto, &query, case.k, &case.filter, SearchMode::Auto).await;
        eprintln!(
            "{}: {matching} match; auto {:?} -> {}",
            case.name,
            got.plan.strategy,
            got.hits.len()
        );
        if (matching as u64) < SearchSettings::default().exact_threshold.get() {
            assert_eq!(got.plan.strategy, Strategy::Exact, "{}", case.name);
            assert_exact(&case.name, &got, &want, &by_id, &query);
        }
        assert_filter(&case.name, &got.hits, &by_id, &case.keep);
        assert_eq!(got.hits.len(), want.len(), "{}", case.name);

        // The index path: the same count, every result matching; exact
        // answers whenever it had to fall back.
        let got = run(&indexed, &query, case.k, &case.filter, SearchMode::Auto).await;
        eprintln!(
            "{}: indexed {:?} after {} round(s), {} candidates -> {}; {}",
            case.name,
            got.plan.strategy,
            got.plan.rounds,
            got.plan.candidates,
            got.hits.len(),
            got.plan.note
        );
        assert_filter(&case.name, &got.hits, &by_id, &case.keep);
        assert_eq!(got.hits.len(), want.len(), "{} (indexed)", case.name);
        // A filter that matches nothing has nothing to scan for: the
        // exact path answers it at once (search.exact_threshold = 1 here).
        let matches_nothing = got.plan.filter_matches == Some(0);
        assert!(
            matches!(
                got.plan.strategy,
                Strategy::HnswOverfetch | Strategy::HnswIterative | Strategy::ExactFallback
            ) || (matches_nothing && got.plan.strategy == Strategy::Exact),
            "{}: {:?}",
            case.name,
            got.plan
        );
        if got.plan.strategy == Strategy::ExactFallback {
            assert_exact(&case.name, &got, &want, &by_id, &query);
        }
        if matching < case.k && !matches_nothing {
            assert_eq!(
                got.plan.strategy,
                Strategy::ExactFallback,
                "{}: fewer than k match, only an exact scan can know",
                case.name
            );
        }
        if !got.plan.iterative_scan && got.plan.strategy == Strategy::HnswOverfetch {
            assert!(got.plan.note.contains("over-fetch"), "{}", got.plan.note);
        }

        // Asking for an exact scan gives the oracle's answer too.
        let exact = run(&auto, &query, case.k, &case.filter, SearchMode::Exact).await;
        assert_exact(&case.name, &exact, &want, &by_id, &query);
    }

    // Unfiltered, k = 100: one result per conversation, nearest first, and
    // as good as exact (tie-aware recall).
    let none = SearchFilter::default();
    let got = run(&auto, &query, 100, &none, SearchMode::Auto).await;
    let want = oracle(&known, &query, 100, |_| true);
    assert_eq!(got.hits.len(), 100);
    let ids: HashSet<&str> = got.hits.iter().map(|h| h.id.as_str()).collect();
    assert_eq!(ids.len(), 100);
    let last = want[99].1;
    let good = got.hits.iter().filter(|h| h.distance <= last + EPS).count();
    assert!(good >= 95, "k=100 recall {good}/100 ({:?})", got.plan);
}

fn assert_filter(
    what: &str,
    hits: &[SearchHit],
    known: &HashMap<String, &Known>,
    keep: &dyn Fn(&Known) -> bool,
) {
    for hit in hits {
        let conv = known[&hit.id];
        assert!(keep(conv), "{what}: {} does not match the filter", hit.id);
        assert_eq!(hit.user_id, conv.user_id);
        assert_eq!(hit.channel, conv.channel);
        assert_eq!(hit.created_at, Some(conv.time));
    }
}

async fn post_search(http: &reqwest::Client, daemon: &Daemon, body: &Value) -> (u16, Value) {
    let resp = http
        .post(format!("{}/v1/search", daemon.base_url()))
        .json(body)
        .send()
        .await
        .expect("post search");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("search answer is JSON"))
}

fn hit_ids(answer: &Value) -> Vec<String> {
    answer["results"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .filter_map(|r| r["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The API over TCP and the Unix socket, its errors, its metrics, and the
/// CLI, against a real daemon storing through the stand-in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_over_http_unix_socket_and_cli() {
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &[]);
    let ws = Workspace::new();
    let addr = ws.write_config(&standin.url(), MODEL, DIMS, "");
    let daemon = Daemon::start(&ws, &addr).await;
    let data: Vec<Value> = convstore_dataset::sample_or_generated(300)
        .expect("test data")
        .into_iter()
        .take(300)
        .enumerate()
        .map(|(i, c)| decorate(i, c))
        .collect();
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{}/v1/conversations/batch", daemon.base_url()))
        .json(&data)
        .send()
        .await
        .expect("post batch");
    assert_eq!(resp.status(), 202);
    let db = connect_db(&ws.database_url()).await;
    let stored = wait_for_count(
        &db,
        "SELECT count(*) FROM conversations",
        data.len() as i64,
        Duration::from_secs(300),
    )
    .await;
    assert_eq!(stored, data.len() as i64, "log:\n{}", daemon.log_text());

    // What the daemon answers is what the store answers for the stand-in's
    // vector of the query (all-minilm: no query prefix).
    let query = "I want to book a flight to Seattle";
    let searcher = Searcher::new(Store::from_pool(db.clone()), 2000);
    let expected = run(
        &searcher,
        &standin_vector(query, DIMS),
        5,
        &SearchFilter::default(),
        SearchMode::Auto,
    )
    .await;
    let (status, answer) = post_search(
        &http,
        &daemon,
        &json!({"query": query, "k": 5, "mode": "semantic"}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let want: Vec<String> = expected.hits.iter().map(|h| h.id.clone()).collect();
    assert_eq!(hit_ids(&answer), want, "{answer}");
    assert_eq!(answer["count"], 5);
    assert_eq!(answer["model"], MODEL);
    assert_eq!(answer["search"]["strategy"], "hnsw", "{answer}");
    assert_eq!(answer["query_cached"], false);
    let first = &answer["results"][0];
    for field in [
        "id",
        "conversation_id",
        "user_id",
        "channel",
        "metadata",
        "received_at",
        "score",
        "distance",
    ] {
        assert!(!first[field].is_null(), "result without {field}: {first}");
    }
    assert!(
        first["chunk"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
    );
    // The same search again: the query vector comes from the cache.
    let (_, again) = post_search(
        &http,
        &daemon,
        &json!({"query": query, "k": 5, "mode": "semantic"}),
    )
    .await;
    assert_eq!(again["query_cached"], true);
    assert_eq!(hit_ids(&again), want);

    // A filter; the conversation can be read back by the id returned.
    let user = data[0]["user_id"].as_str().unwrap().to_string();
    let (status, answer) = post_search(
        &http,
        &daemon,
        &json!({"query": query, "k": 100, "mode": "semantic", "filter": {"user_id": user, "channel": "web"}}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let matching = data
        .iter()
        .filter(|c| c["user_id"] == user.as_str() && c["channel"] == "web")
        .count();
    assert_eq!(answer["count"], matching, "{answer}");
    assert_eq!(answer["search"]["strategy"], "exact", "{answer}");
    for r in answer["results"].as_array().unwrap() {
        assert_eq!(r["user_id"], user.as_str());
        assert_eq!(r["channel"], "web");
    }
    let id = hit_ids(&answer)[0].clone();
    let conv: Value = http
        .get(format!("{}/v1/conversations/{id}", daemon.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(conv["user_id"], user.as_str());

    // Errors name the field.
    for (body, field) in [
        (json!({}), "query"),
        (json!({"query": ""}), "query"),
        (json!({"query": "x", "k": 0}), "k"),
        (json!({"query": "x", "mode": "fuzzy"}), "mode"),
        (json!({"query": "x", "mode": 3}), "mode"),
        (json!({"query": "x", "context": 21}), "context"),
        (json!({"query": "x", "context": -1}), "context"),
        (json!({"query": "x", "k": 101}), "k"),
        (json!({"query": "x", "ef_search": 0}), "ef_search"),
        (
            json!({"query": "x", "filter": {"since": "last week"}}),
            "filter.since",
        ),
        (
            json!({"query": "x", "filter": {"metadata": "gold"}}),
            "filter.metadata",
        ),
        (
            json!({"query": "x", "filter": {"user": "u"}}),
            "filter.user",
        ),
    ] {
        let (status, answer) = post_search(&http, &daemon, &body).await;
        assert_eq!(status, 400, "{body} -> {answer}");
        assert_eq!(answer["error"]["field"], field, "{body} -> {answer}");
    }
    let resp = http
        .post(format!("{}/v1/search", daemon.base_url()))
        .body(r#"{"query":"x"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);

    // The Unix socket answers the same.
    let mut unix = daemon.unix_client();
    let resp = unix
        .post_json(
            "/v1/search",
            "application/json",
            Bytes::from(json!({"query": query, "k": 5, "mode": "semantic"}).to_string()),
        )
        .await
        .expect("unix search");
    assert_eq!(resp.status, 200);
    let answer: Value = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(hit_ids(&answer), want);

    // The CLI, over the socket: readable, and JSON.
    let cli = |args: &[&str]| {
        let out = Command::new(BIN)
            .arg("search")
            .args(["--mode", "semantic"])
            .args(args)
            .arg("--socket")
            .arg(ws.socket())
            .output()
            .expect("run convstore search");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, stdout, stderr) = cli(&[query, "-k", "3"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains(&format!(" 1. {:.3}  {}", expected.hits[0].score, want[0])),
        "{stdout}"
    );
    assert!(stdout.contains(" 3. "), "{stdout}");
    assert!(stdout.contains("3 of k=3"), "{stdout}");
    let (ok, stdout, stderr) = cli(&[query, "-k", "2", "--json", "--user", &user]);
    assert!(ok, "{stderr}");
    let answer: Value = serde_json::from_str(&stdout).expect("--json prints JSON");
    assert_eq!(answer["count"], 2);
    for r in answer["results"].as_array().unwrap() {
        assert_eq!(r["user_id"], user.as_str());
    }
    let (ok, stdout, _) = cli(&[query, "--until", "2020-01-01"]);
    assert!(ok);
    assert!(stdout.contains("No matching conversations."), "{stdout}");
    let (ok, _, stderr) = cli(&[query, "--since", "yesterday"]);
    assert!(!ok);
    assert!(stderr.contains("is not a time"), "{stderr}");

    // Its own metrics.
    let metrics = http
        .get(format!("{}/metrics", daemon.base_url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "convstore_search_requests_total{",
        "convstore_search_duration_seconds_bucket",
        "convstore_search_embed_duration_seconds_bucket",
        "convstore_search_database_duration_seconds_bucket",
        "convstore_search_strategy_total{strategy=\"hnsw\"}",
        "convstore_search_embed_cache_total{result=\"hit\"}",
    ] {
        assert!(metrics.contains(name), "no {name} in /metrics");
    }
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("convstore_search_requests_total")
                && l.contains("outcome=\"invalid_field\"")),
        "400s are counted"
    );
}

/// Search does not wait behind ingest: with a slow, one-at-a-time backend
/// and a backlog of conversations holding all of ingest's in-flight slots,
/// a search is answered while that backlog is still being embedded (its
/// query embedding takes the search lane's own slot at the backend).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_is_answered_while_ingest_has_a_backlog() {
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &["--latency-ms", "300"]);
    let ws = Workspace::new();
    let addr = ws.write_config(
        &standin.url(),
        MODEL,
        DIMS,
        "[batch]\nmax_size = 1\n\n[search]\ntimeout_ms = 30000\n",
    );
    // The backend section is written by write_config; squeeze ingest to one
    // call of one text at a time.
    let daemon = Daemon::start_with_env(
        &ws,
        &addr,
        &[("CONVSTORE_EMBEDDING__MAX_BATCH_INPUTS", "1")],
    )
    .await;
    let http = reqwest::Client::new();
    let data: Vec<Value> = convstore_dataset::sample_or_generated(80)
        .expect("test data")
        .into_iter()
        .take(80)
        .collect();
    let resp = http
        .post(format!("{}/v1/conversations/batch", daemon.base_url()))
        .json(&data)
        .send()
        .await
        .expect("post batch");
    assert_eq!(resp.status(), 202);
    let db = connect_db(&ws.database_url()).await;
    // Wait until ingest is busy (something stored), so the backend has a queue.
    wait_for_count(
        &db,
        "SELECT least(count(*), 1) FROM conversations",
        1,
        Duration::from_secs(60),
    )
    .await;

    let (status, answer) = post_search(
        &http,
        &daemon,
        &json!({"query": "a flight to Seattle", "k": 3, "mode": "semantic"}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM conversations")
        .fetch_one(&db)
        .await
        .unwrap();
    assert!(
        stored < data.len() as i64,
        "the search was answered only after ingest drained ({stored} stored)"
    );
    eprintln!(
        "search answered in {} ms with {stored}/{} conversations stored",
        answer["timings_ms"]["total"],
        data.len()
    );
    let metrics = http
        .get(format!("{}/metrics", daemon.base_url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("backend=\"standin:search\""),
        "the query went through the search lane"
    );
}

/// With real vectors (the builtin all-MiniLM-L6-v2, the zero-configuration
/// default that scripts/setup.sh installs): "book me a flight to Seattle"
/// finds flight conversations first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_model_finds_flight_conversations() {
    require_setup();
    let ws = Workspace::new();
    let http_addr = ws.bind_http();
    std::fs::write(
        ws.config_path(),
        format!(
            "state_dir = \"{}\"\n\n[server]\nhttp_addr = \"{http_addr}\"\nunix_socket = \"{}\"\n",
            ws.path().join("state").display(),
            ws.socket().display()
        ),
    )
    .expect("write config");
    let daemon = Daemon::start(&ws, &http_addr).await;

    let is_flight = |c: &Value| c["messages"].to_string().to_lowercase().contains("flight");
    let all = convstore_dataset::sample_or_generated(1000).expect("test data");
    let flights: Vec<Value> = all
        .iter()
        .filter(|c| is_flight(c))
        .take(15)
        .cloned()
        .collect();
    let others: Vec<Value> = all
        .iter()
        .filter(|c| !is_flight(c))
        .take(85)
        .cloned()
        .collect();
    assert!(
        flights.len() >= 10,
        "too few flight conversations in the data"
    );
    let data: Vec<Value> = flights.iter().chain(&others).cloned().collect();
    let flight_ids: HashSet<String> = flights
        .iter()
        .filter_map(|c| c["id"].as_str().map(str::to_string))
        .collect();
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{}/v1/conversations/batch", daemon.base_url()))
        .json(&data)
        .send()
        .await
        .expect("post batch");
    assert_eq!(resp.status(), 202);
    let db = connect_db(&ws.database_url()).await;
    let stored = wait_for_count(
        &db,
        "SELECT count(*) FROM conversations WHERE embedding_status = 'embedded'",
        data.len() as i64,
        Duration::from_secs(600),
    )
    .await;
    assert_eq!(stored, data.len() as i64, "log:\n{}", daemon.log_text());

    let (status, answer) = post_search(
        &http,
        &daemon,
        &json!({"query": "book me a flight to Seattle", "k": 5, "mode": "semantic"}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let ids = hit_ids(&answer);
    let flights_in_top: Vec<bool> = ids.iter().map(|id| flight_ids.contains(id)).collect();
    eprintln!(
        "top 5: {:?}",
        answer["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (
                r["score"].as_f64().unwrap_or(0.0),
                r["id"].as_str().unwrap_or("")
            ))
            .collect::<Vec<_>>()
    );
    assert_eq!(answer["model"], "all-minilm");
    assert!(
        flights_in_top[0],
        "the nearest is not a flight conversation: {answer}"
    );
    assert!(
        flights_in_top.iter().filter(|f| **f).count() >= 4,
        "fewer than 4 of the top 5 are flight conversations: {flights_in_top:?}\n{answer}"
    );
}

/// Lexical and hybrid search against a real daemon: an order code in one
/// conversation is its top lexical and hybrid hit while the stand-in's hash
/// vectors cannot find it by meaning; filters apply exactly to the lexical
/// list; `context` returns the messages around the best chunk; a lexical
/// search needs no embedding backend, and a hybrid one answers lexically
/// without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lexical_and_hybrid_find_an_order_code_with_context() {
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &[]);
    let ws = Workspace::new();
    let addr = ws.write_config(&standin.url(), MODEL, DIMS, "");
    let daemon = Daemon::start(&ws, &addr).await;
    let mut data: Vec<Value> = convstore_dataset::sample_or_generated(300)
        .expect("test data")
        .into_iter()
        .take(300)
        .enumerate()
        .map(|(i, c)| decorate(i, c))
        .collect();
    // Twelve messages, the code in message 6 only; long enough to be cut
    // into several chunks.
    let filler = "The weather was fine and the train left on time, nothing else happened. ";
    let mut messages = Vec::new();
    for i in 0..12 {
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        let content = if i == 6 {
            "Where is my parcel? The order code is ORD-88213 and it is late.".to_string()
        } else {
            format!("message {i}: {}", filler.repeat(6))
        };
        messages.push(json!({"role": role, "content": content}));
    }
    data.push(
        json!({"id": "order-conv", "user_id": "u-order", "channel": "email",
        "messages": messages, "metadata": {"tier": "gold"},
        "created_at": "2024-03-01T00:00:00Z"}),
    );
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{}/v1/conversations/batch", daemon.base_url()))
        .json(&data)
        .send()
        .await
        .expect("post batch");
    assert_eq!(resp.status(), 202);
    let db = connect_db(&ws.database_url()).await;
    wait_for_count(
        &db,
        "SELECT count(*) FROM conversations WHERE embedding_status = 'embedded'",
        data.len() as i64,
        Duration::from_secs(300),
    )
    .await;
    let chunks: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM conversation_chunks k JOIN conversations c \
         ON c.id = k.conversation_id WHERE c.client_id = 'order-conv'",
    )
    .fetch_one(&db)
    .await
    .expect("chunks");
    assert!(chunks >= 3, "the order conversation is {chunks} chunk(s)");

    let query = "ORD-88213";
    for mode in ["lexical", "hybrid"] {
        let (status, answer) = post_search(
            &http,
            &daemon,
            &json!({"query": query, "k": 5, "mode": mode}),
        )
        .await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["mode"], mode);
        assert_eq!(
            hit_ids(&answer).first().map(String::as_str),
            Some("order-conv"),
            "{mode}: {answer}"
        );
        assert_eq!(answer["results"][0]["ranks"]["lexical"], 1, "{answer}");
    }
    let (_, semantic) = post_search(
        &http,
        &daemon,
        &json!({"query": query, "k": 5, "mode": "semantic"}),
    )
    .await;
    let semantic_ids = hit_ids(&semantic);
    println!("semantic top 5 for {query}: {semantic_ids:?}");
    assert_ne!(
        semantic_ids.first().map(String::as_str),
        Some("order-conv"),
        "the stand-in's hash vectors found the code by meaning: {semantic}"
    );
    // Lexical mode: no semantic plan; hybrid: both, fused.
    let (_, hybrid) = post_search(&http, &daemon, &json!({"query": query, "k": 5})).await;
    assert_eq!(hybrid["mode"], "hybrid");
    assert_eq!(hybrid["fusion"]["rrf_k"], 60, "{hybrid}");
    assert!(hybrid["search"]["strategy"].is_string(), "{hybrid}");

    // Context: the chunk holding message 6, and two messages each side.
    let (status, answer) = post_search(
        &http,
        &daemon,
        &json!({"query": query, "k": 1, "mode": "lexical", "context": 2}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let context = &answer["results"][0]["context"];
    let first = context["first"].as_u64().expect("first") as usize;
    let last = context["last"].as_u64().expect("last") as usize;
    assert!(first <= 6 && 6 <= last, "{context}");
    let indices: Vec<u64> = context["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["index"].as_u64().unwrap())
        .collect();
    let want: Vec<u64> = (first.saturating_sub(2) as u64..=(last + 2).min(11) as u64).collect();
    assert_eq!(indices, want, "{context}");
    for m in context["messages"].as_array().unwrap() {
        let i = m["index"].as_u64().unwrap() as usize;
        assert_eq!(m["in_chunk"], (first..=last).contains(&i), "{m}");
        assert_eq!(m["content"], messages[i]["content"], "{m}");
        assert_eq!(m["role"], messages[i]["role"], "{m}");
    }
    let chunk = answer["results"][0]["chunk"]["content"].as_str().unwrap();
    assert!(chunk.contains("ORD-88213"), "{chunk}");
    // No context unless asked.
    let (_, plain) = post_search(&http, &daemon, &json!({"query": query, "k": 1})).await;
    assert!(plain["results"][0].get("context").is_none(), "{plain}");

    // Filters apply exactly to the lexical list: every hit matches, and
    // with k above the matches, every matching conversation is there.
    let word_in = |c: &Value, word: &str| -> bool {
        let text = c["messages"]
            .as_array()
            .map(|ms| {
                ms.iter()
                    .map(|m| m["content"].as_str().unwrap_or("").to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .or_else(|| c["transcript"].as_str().map(str::to_string))
            .unwrap_or_default()
            .to_lowercase();
        text.split(|ch: char| !ch.is_alphanumeric())
            .any(|w| w == word)
    };
    let word = "restaurant";
    for filter in [
        json!({"channel": "web"}),
        json!({"channel": "fax"}),
        json!({"metadata": {"tier": "gold"}}),
        json!({"since": "2024-01-03T00:00:00Z", "until": "2024-01-08T00:00:00Z"}),
        json!({"user_id": "u-order"}),
    ] {
        let matches = |c: &Value| -> bool {
            let ok_channel = filter["channel"]
                .as_str()
                .is_none_or(|ch| c["channel"] == ch);
            let ok_user = filter["user_id"].as_str().is_none_or(|u| c["user_id"] == u);
            let ok_meta = filter["metadata"]["tier"]
                .as_str()
                .is_none_or(|t| c["metadata"]["tier"] == t);
            let time = c["created_at"]
                .as_str()
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&Utc));
            let ok_since = filter["since"].as_str().is_none_or(|s| {
                time >= Some(DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc))
            });
            let ok_until = filter["until"].as_str().is_none_or(|s| {
                time < Some(DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc))
            });
            ok_channel && ok_user && ok_meta && ok_since && ok_until
        };
        let oracle: BTreeSet<String> = data
            .iter()
            .filter(|c| matches(c) && word_in(c, word))
            .map(|c| c["id"].as_str().unwrap().to_string())
            .collect();
        assert!(oracle.len() < 100, "{filter}: {} matches", oracle.len());
        let (status, answer) = post_search(
            &http,
            &daemon,
            &json!({"query": word, "k": 100, "mode": "lexical", "filter": filter}),
        )
        .await;
        assert_eq!(status, 200, "{answer}");
        let got: BTreeSet<String> = hit_ids(&answer).into_iter().collect();
        println!(
            "lexical {word:?} with {filter}: {} (oracle {})",
            got.len(),
            oracle.len()
        );
        assert_eq!(got, oracle, "lexical, {filter}");
        // Hybrid: every result matches the filter too.
        let (_, answer) = post_search(
            &http,
            &daemon,
            &json!({"query": word, "k": 20, "mode": "hybrid", "filter": filter}),
        )
        .await;
        for r in answer["results"].as_array().unwrap() {
            let id = r["id"].as_str().unwrap();
            let c = data.iter().find(|c| c["id"] == id).expect("known id");
            assert!(matches(c), "hybrid, {filter}: {id} does not match");
        }
    }

    // Without the embedding backend: lexical still answers, hybrid answers
    // lexically and says why, semantic is a 503.
    drop(standin);
    let fresh = "ORD-88213 parcel";
    let (status, answer) = post_search(
        &http,
        &daemon,
        &json!({"query": fresh, "k": 3, "mode": "lexical"}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        hit_ids(&answer).first().map(String::as_str),
        Some("order-conv")
    );
    let (status, answer) = post_search(&http, &daemon, &json!({"query": fresh, "k": 3})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        hit_ids(&answer).first().map(String::as_str),
        Some("order-conv")
    );
    assert!(answer["semantic_error"].is_string(), "{answer}");
    assert!(answer.get("search").is_none(), "{answer}");
    let (status, answer) = post_search(
        &http,
        &daemon,
        &json!({"query": fresh, "k": 3, "mode": "semantic"}),
    )
    .await;
    assert_eq!(status, 503, "{answer}");
}
