//! Nearest conversations to a query vector: cosine distance over
//! `conversation_chunks.embedding` with the HNSW index, grouped per
//! conversation (its best chunk wins), with filters on the conversation
//! (user, channel, time window, metadata containment).
//!
//! # Why there are several strategies
//!
//! An HNSW index scan returns the nearest chunks of the *whole* table; a
//! filter is applied to what it returns. Before pgvector 0.8 a scan also
//! stops after `hnsw.ef_search` rows. So "the 10 nearest conversations of
//! user X" can come back with 2 results while X has hundreds, and nothing
//! says so. The rules here make sure a search returns `k` conversations
//! whenever `k` match, and says how it got them ([`SearchPlan`]):
//!
//! 1. **Selective filter → exact.** A filter that matches fewer than
//!    `exact_threshold` conversations (counted first, the count capped at
//!    the threshold, through the filter's own indexes) is answered by an
//!    exact scan of just those conversations' chunks: cheaper than any
//!    index walk that would have to skip everyone else, and exact.
//! 2. **Otherwise the index**, fetching `max(ef_search, 4k)` nearest chunks
//!    (a conversation may own several of the nearest chunks).
//!    - pgvector ≥ 0.8: with `hnsw.iterative_scan = relaxed_order` the
//!      filter is part of the index scan, which keeps walking the graph
//!      until enough rows pass it (up to `hnsw.max_scan_tuples`).
//!    - pgvector < 0.8 (the managed cluster's 0.6.2): **over-fetch**. The
//!      filter is applied to the fetched chunks; if fewer than `k`
//!      conversations pass, the fetch grows 4× (and `ef_search` with it,
//!      since the scan cannot return more rows than that) up to pgvector's
//!      ceiling of 1,000.
//! 3. **Exact fallback.** If the index still cannot deliver `k`, an exact
//!    scan restricted by the filter finishes the job.
//!
//! Every index round runs in one read transaction with `hnsw.ef_search`
//! set by `SET LOCAL`, so a pooled connection never keeps a search's
//! settings. `SET LOCAL` statements rather than `set_config(…, true)`:
//! Citus passes a transaction's `SET LOCAL` on to the shards (with
//! `citus.propagate_set_commands = 'local'`), not a function call
//! (docs/STORAGE.md). The value is a checked integer, formatted in.
//!
//! Exact scans order by `(conversation_id, distance)` (`DISTINCT ON`), an
//! order the HNSW index cannot produce, so they never touch it: they are
//! the reference the recall test compares the index against.

use chrono::{DateTime, Utc};
use pgvector::Vector;
use serde::Serialize;
use sqlx::postgres::{PgConnection, PgRow};
use sqlx::types::Json;
use sqlx::{Postgres, QueryBuilder, Row};
use tokio::sync::OnceCell;
use uuid::Uuid;

use super::models::VectorSet;
use super::{Store, StoreError};

/// pgvector refuses `hnsw.ef_search` above this, and a pre-0.8 index scan
/// returns at most `ef_search` rows: the most one over-fetch round can see.
pub const MAX_EF_SEARCH: u32 = 1000;

/// Nearest chunks fetched per wanted conversation in the first index round:
/// room for conversations that own several of the nearest chunks.
const CHUNKS_PER_RESULT: usize = 4;

/// How much each over-fetch round grows the fetch.
const GROWTH: usize = 4;

/// Conversations matched by a search: who, where, when. Empty = all.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SearchFilter {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// Inclusive; compared with `created_at`, or `received_at` when the
    /// caller gave no `created_at`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    /// Exclusive; same time as `since`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
    /// A JSON object the conversation's metadata must contain (`@>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
}

impl SearchFilter {
    pub fn is_empty(&self) -> bool {
        self.user_id.is_none()
            && self.channel.is_none()
            && self.since.is_none()
            && self.until.is_none()
            && self.metadata.is_none()
    }

    /// ` AND k.user_id = …` on the alias `k` of `conversation_chunks` when
    /// the filter names a user: `user_id` is the partition key (the
    /// distribution column under Citus), so the chunk scan is pruned to
    /// the user's one partition (shard) instead of reaching it only
    /// through the join.
    fn push_chunk_user(&self, qb: &mut QueryBuilder<Postgres>) {
        if let Some(user) = &self.user_id {
            qb.push(" AND k.user_id = ").push_bind(user.clone());
        }
    }

    /// The same on both `c` and `k`: for the outer joins of a query, so
    /// the planner prunes them at plan time, not only while running.
    fn push_users(&self, qb: &mut QueryBuilder<Postgres>) {
        if let Some(user) = &self.user_id {
            qb.push(" AND c.user_id = ").push_bind(user.clone());
        }
        self.push_chunk_user(qb);
    }

    /// Appends ` AND …` for every condition, on the alias `c` of
    /// `conversations`, with bind parameters.
    fn push_conditions(&self, qb: &mut QueryBuilder<Postgres>) {
        if let Some(user) = &self.user_id {
            qb.push(" AND c.user_id = ").push_bind(user.clone());
        }
        if let Some(channel) = &self.channel {
            qb.push(" AND c.channel = ").push_bind(channel.clone());
        }
        if let Some(since) = self.since {
            qb.push(" AND coalesce(c.created_at, c.received_at) >= ")
                .push_bind(since);
        }
        if let Some(until) = self.until {
            qb.push(" AND coalesce(c.created_at, c.received_at) < ")
                .push_bind(until);
        }
        if let Some(metadata) = &self.metadata {
            qb.push(" AND c.metadata @> ")
                .push_bind(Json(metadata.clone()))
                .push("::jsonb");
        }
    }
}

/// `search.lexical_max_matches`'s default: chunks a lexical search ranks
/// at most. Measured (benches/search_modes.rs, 100k chunks): 2,000 gave a
/// hybrid p99 of 4.15× the semantic one, 200 gave 1.42×, with the same
/// recall@10 on the labelled query set.
pub const DEFAULT_LEXICAL_MAX_MATCHES: usize = 200;

/// How to search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SearchMode {
    /// The strategies of the module docs.
    #[default]
    Auto,
    /// An exact scan, whatever the filter (the reference for recall; also
    /// offered to callers who want exact answers and can wait for them).
    Exact,
}

/// One search.
#[derive(Debug, Clone, Copy)]
pub struct SearchQuery<'a> {
    /// The query's embedding (same model and dimension as the column).
    pub vector: &'a [f32],
    /// Conversations wanted.
    pub k: usize,
    pub filter: &'a SearchFilter,
    /// `hnsw.ef_search` of the first index round (1..=1000).
    pub ef_search: u32,
    pub mode: SearchMode,
    /// Whose vectors to compare with (`vector` must be of that model).
    pub vectors: VectorSet,
}

/// The chunk of a conversation nearest to the query.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct MatchedChunk {
    pub seq: i32,
    pub content: String,
}

/// One conversation found, with its best chunk.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct SearchHit {
    /// The caller's id when it gave one, else the row id: the id
    /// `GET /v1/conversations/{id}` takes.
    pub id: String,
    pub conversation_id: Uuid,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    pub user_id: String,
    pub channel: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    pub metadata: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
    pub received_at: DateTime<Utc>,
    /// Cosine similarity of the best chunk, `1 - distance` (1 = same
    /// direction).
    pub score: f64,
    /// Cosine distance of the best chunk (pgvector's `<=>`).
    pub distance: f64,
    pub chunk: MatchedChunk,
}

/// How the results were found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// One HNSW index scan, no filter.
    Hnsw,
    /// HNSW with the filter applied to over-fetched chunks (pgvector < 0.8),
    /// or more than one round.
    HnswOverfetch,
    /// HNSW with the filter inside an iterative index scan (pgvector ≥ 0.8).
    HnswIterative,
    /// An exact scan: asked for, or the filter is selective.
    Exact,
    /// The index could not deliver `k`; an exact scan restricted by the
    /// filter did.
    ExactFallback,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hnsw => "hnsw",
            Self::HnswOverfetch => "hnsw_overfetch",
            Self::HnswIterative => "hnsw_iterative",
            Self::Exact => "exact",
            Self::ExactFallback => "exact_fallback",
        }
    }

    /// Whether the results are exact (every matching conversation was
    /// compared): fewer than `k` then means fewer match.
    pub fn is_exact(self) -> bool {
        matches!(self, Self::Exact | Self::ExactFallback)
    }
}

/// What a search did, for the response and the metrics.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct SearchPlan {
    pub strategy: Strategy,
    /// The server's pgvector version.
    pub pgvector: String,
    /// Whether the server has iterative index scans (pgvector ≥ 0.8).
    pub iterative_scan: bool,
    /// `hnsw.ef_search` of the last index round (absent for exact scans).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ef_search: Option<u32>,
    /// Index rounds run (0 for an exact scan chosen up front).
    pub rounds: u32,
    /// Nearest chunks the last index round returned.
    pub candidates: usize,
    /// Conversations matching the filter, counted up to the exact
    /// threshold (absent without a filter).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter_matches: Option<u64>,
    /// The same in words.
    pub note: String,
}

/// Results and how they were found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SearchOutcome {
    pub hits: Vec<SearchHit>,
    pub plan: SearchPlan,
}

/// What the server's pgvector can do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexCapabilities {
    /// `pg_extension.extversion` of `vector`.
    pub pgvector: String,
    /// `hnsw.iterative_scan` exists (0.8.0 and later).
    pub iterative_scan: bool,
}

impl IndexCapabilities {
    pub fn from_version(version: &str) -> Self {
        Self {
            pgvector: version.to_string(),
            iterative_scan: version_at_least(version, (0, 8)),
        }
    }
}

/// `major.minor[.patch…]` ≥ `want`; an unparsable version is "no".
fn version_at_least(version: &str, want: (u32, u32)) -> bool {
    let mut parts = version.trim().split(['.', '-']);
    let major = parts.next().and_then(|p| p.parse::<u32>().ok());
    let minor = parts.next().and_then(|p| p.parse::<u32>().ok());
    match (major, minor) {
        (Some(major), Some(minor)) => (major, minor) >= want,
        _ => false,
    }
}

/// Searches one store. Learns the server's pgvector version on first use
/// (an `ALTER EXTENSION vector UPDATE` is seen after a restart).
#[derive(Debug)]
pub struct Searcher {
    store: Store,
    /// Filters matching fewer conversations than this are answered exactly.
    exact_threshold: u64,
    capabilities: OnceCell<IndexCapabilities>,
    /// Text search configuration of lexical search (`search.language`).
    language: TextSearchLanguage,
    /// Chunks a lexical search ranks at most (`search.lexical_max_matches`).
    lexical_max_matches: usize,
}

impl Searcher {
    pub fn new(store: Store, exact_threshold: u64) -> Self {
        Self {
            store,
            exact_threshold,
            capabilities: OnceCell::new(),
            language: TextSearchLanguage::default(),
            lexical_max_matches: DEFAULT_LEXICAL_MAX_MATCHES,
        }
    }

    /// Lexical search ranks at most `n` matching chunks (at least 1).
    pub fn with_lexical_max_matches(mut self, n: usize) -> Self {
        self.lexical_max_matches = n.max(1);
        self
    }

    /// Lexical search with this text search configuration (the full-text
    /// index must be built for it: [`Store::ensure_text_index`]).
    pub fn with_language(mut self, language: TextSearchLanguage) -> Self {
        self.language = language;
        self
    }

    pub fn language(&self) -> &TextSearchLanguage {
        &self.language
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The server's pgvector capabilities (queried once).
    pub async fn capabilities(&self) -> Result<&IndexCapabilities, StoreError> {
        self.capabilities
            .get_or_try_init(|| async {
                let version: Option<String> = sqlx::query_scalar(
                    "SELECT extversion FROM pg_extension WHERE extname = 'vector'",
                )
                .fetch_optional(self.store.pool())
                .await?;
                let version = version.ok_or_else(|| {
                    StoreError::Schema(
                        "the pgvector extension is not installed in this database \
                         (run `convstore migrate`)"
                            .into(),
                    )
                })?;
                Ok(IndexCapabilities::from_version(&version))
            })
            .await
    }

    /// The nearest conversations; see the module docs for how.
    pub async fn search(&self, q: SearchQuery<'_>) -> Result<SearchOutcome, StoreError> {
        let caps = self.capabilities().await?.clone();
        let ef = q.ef_search.clamp(1, MAX_EF_SEARCH);
        let mut plan = SearchPlan {
            strategy: Strategy::Exact,
            pgvector: caps.pgvector.clone(),
            iterative_scan: caps.iterative_scan,
            ef_search: None,
            rounds: 0,
            candidates: 0,
            filter_matches: None,
            note: String::new(),
        };
        if q.k == 0 {
            plan.note = "k = 0: nothing asked".into();
            return Ok(SearchOutcome {
                hits: Vec::new(),
                plan,
            });
        }
        let vector = Vector::from(q.vector.to_vec());
        let mut tx = self.store.pool().begin().await?;
        // A search is short; JIT compiling its plan (PostgreSQL ≥ 11 with
        // LLVM) would cost more than running it.
        sqlx::query("SET LOCAL jit = off").execute(&mut *tx).await?;

        if q.mode == SearchMode::Exact {
            let hits = exact(&mut tx, q.vectors, &vector, q.k, q.filter).await?;
            plan.note = "exact scan, as asked".into();
            tx.commit().await?;
            return Ok(SearchOutcome { hits, plan });
        }

        let filtered = !q.filter.is_empty();
        if filtered {
            let matches = count_matches(&mut tx, q.filter, self.exact_threshold).await?;
            plan.filter_matches = Some(matches);
            if matches < self.exact_threshold {
                let hits = exact(&mut tx, q.vectors, &vector, q.k, q.filter).await?;
                plan.note = format!(
                    "the filter matches {matches} conversations (fewer than {}, \
                     search.exact_threshold): exact scan of their chunks",
                    self.exact_threshold
                );
                tx.commit().await?;
                return Ok(SearchOutcome { hits, plan });
            }
        }

        let iterative = filtered && caps.iterative_scan;
        if iterative {
            sqlx::query("SET LOCAL hnsw.iterative_scan = relaxed_order")
                .execute(&mut *tx)
                .await?;
        }
        let ceiling = MAX_EF_SEARCH as usize;
        let mut limit = (q.k.saturating_mul(CHUNKS_PER_RESULT))
            .max(ef as usize)
            .min(ceiling);
        loop {
            // A pre-0.8 scan returns at most ef_search rows.
            let round_ef = ef.max(u32::try_from(limit).unwrap_or(MAX_EF_SEARCH));
            plan.rounds += 1;
            plan.ef_search = Some(round_ef);
            let round = hnsw_round(
                &mut tx, q.vectors, &vector, q.k, q.filter, limit, round_ef, iterative,
            )
            .await?;
            plan.candidates = round.scanned;
            if round.hits.len() >= q.k {
                plan.strategy = if iterative {
                    Strategy::HnswIterative
                } else if filtered || plan.rounds > 1 {
                    Strategy::HnswOverfetch
                } else {
                    Strategy::Hnsw
                };
                plan.note = index_note(&plan, filtered);
                tx.commit().await?;
                return Ok(SearchOutcome {
                    hits: round.hits,
                    plan,
                });
            }
            // Fewer rows than asked: the index has nothing more to give
            // (or, iterative, hit hnsw.max_scan_tuples).
            let exhausted = round.scanned < limit;
            if exhausted || limit >= ceiling {
                break;
            }
            limit = limit.saturating_mul(GROWTH).min(ceiling);
        }

        let hits = exact(&mut tx, q.vectors, &vector, q.k, q.filter).await?;
        plan.strategy = Strategy::ExactFallback;
        plan.note = format!(
            "the index gave fewer than k = {} matching conversations after {} round(s) \
             ({} nearest chunks, ef_search {}); an exact scan{} finished the search",
            q.k,
            plan.rounds,
            plan.candidates,
            plan.ef_search.unwrap_or(ef),
            if filtered {
                " restricted by the filter"
            } else {
                ""
            }
        );
        tx.commit().await?;
        Ok(SearchOutcome { hits, plan })
    }
}

impl Searcher {
    /// The conversations whose chunks best match `q.query` as words:
    /// PostgreSQL full-text search (`websearch_to_tsquery` in the configured
    /// language) through the GIN index, ranked by `ts_rank_cd` of each
    /// conversation's best chunk, filtered exactly. Every chunk counts,
    /// embedded or not. Needs no embedding.
    pub async fn lexical(&self, q: LexicalQuery<'_>) -> Result<Vec<LexicalHit>, StoreError> {
        if q.k == 0 {
            return Ok(Vec::new());
        }
        let mut tx = self.store.pool().begin().await?;
        sqlx::query("SET LOCAL jit = off").execute(&mut *tx).await?;
        let mut qb = lexical_query(
            "",
            &self.language,
            q.query,
            q.k,
            q.filter,
            self.lexical_max_matches,
        );
        let rows = qb.build().fetch_all(&mut *tx).await?;
        tx.commit().await?;
        rows.iter().map(lexical_hit_from_row).collect()
    }

    /// Each hit's conversation as messages and its chunks' text in order:
    /// what [`chunk_messages`](convstore_core::chunker::chunk_messages)
    /// needs to say which messages a chunk covers. Keyed by
    /// `(user_id, conversation_id)`; a conversation deleted since the search
    /// is missing.
    pub async fn conversation_texts(
        &self,
        keys: &[(String, Uuid)],
    ) -> Result<Vec<ConversationText>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let users: Vec<String> = keys.iter().map(|(u, _)| u.clone()).collect();
        let ids: Vec<Uuid> = keys.iter().map(|(_, id)| *id).collect();
        let rows = sqlx::query(
            "SELECT c.id, c.user_id, c.messages, c.transcript, \
             array_agg(k.content ORDER BY k.seq) AS chunks \
             FROM unnest($1::text[], $2::uuid[]) AS w(user_id, id) \
             JOIN conversations c ON c.user_id = w.user_id AND c.id = w.id \
             JOIN conversation_chunks k ON k.user_id = c.user_id AND k.conversation_id = c.id \
             GROUP BY c.id, c.user_id, c.messages, c.transcript",
        )
        .bind(&users)
        .bind(&ids)
        .fetch_all(self.store.pool())
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let messages: Option<serde_json::Value> = row.try_get("messages")?;
            out.push(ConversationText {
                conversation_id: row.try_get("id")?,
                user_id: row.try_get("user_id")?,
                messages,
                transcript: row.try_get("transcript")?,
                chunks: row.try_get("chunks")?,
            });
        }
        Ok(out)
    }
}

/// A conversation's text as [`Searcher::conversation_texts`] reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct ConversationText {
    pub conversation_id: Uuid,
    pub user_id: String,
    /// The message list as received (`[{role, content, …}]`), or `None`
    /// when the caller sent a transcript.
    pub messages: Option<serde_json::Value>,
    pub transcript: String,
    /// Chunk contents by `seq`.
    pub chunks: Vec<String>,
}

/// The text search configuration lexical search uses (`search.language`):
/// a PostgreSQL `regconfig` name such as `simple` (the default) or
/// `english`. Checked to be a plain identifier, because it is written into
/// the SQL (the index expression must match the query's, so it cannot be a
/// bind parameter); [`Store::ensure_text_index`] checks that the server
/// has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextSearchLanguage(String);

impl Default for TextSearchLanguage {
    fn default() -> Self {
        Self("simple".into())
    }
}

impl TextSearchLanguage {
    /// `name` if it is a lower-case identifier (`[a-z_][a-z0-9_]*`, at most
    /// 63 bytes); else why not.
    pub fn parse(name: &str) -> Result<Self, String> {
        let mut chars = name.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
        let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if first_ok && rest_ok && name.len() <= 63 {
            Ok(Self(name.to_string()))
        } else {
            Err(format!(
                "{name:?} is not a text search configuration name (lower-case letters, digits \
                 and _, such as simple or english; see `\\dF` in psql)"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `to_tsvector('<language>'::regconfig, <column>)`: the expression the
    /// full-text index is built on.
    pub fn tsvector(&self, column: &str) -> String {
        format!("to_tsvector('{}'::regconfig, {column})", self.0)
    }
}

/// One lexical search.
#[derive(Debug, Clone, Copy)]
pub struct LexicalQuery<'a> {
    /// The words, in web search syntax (`websearch_to_tsquery`: `"a phrase"`,
    /// `or`, `-word`).
    pub query: &'a str,
    /// Conversations wanted.
    pub k: usize,
    pub filter: &'a SearchFilter,
}

/// One conversation found by its words, with its best chunk.
#[derive(Debug, Clone, PartialEq)]
pub struct LexicalHit {
    pub id: String,
    pub conversation_id: Uuid,
    pub client_id: Option<String>,
    pub user_id: String,
    pub channel: String,
    pub summary: Option<String>,
    pub metadata: serde_json::Value,
    pub created_at: Option<DateTime<Utc>>,
    pub received_at: DateTime<Utc>,
    /// `ts_rank_cd` of the best chunk (higher = better).
    pub rank: f64,
    pub chunk: MatchedChunk,
}

/// The SQL of a lexical search (`prefix`: `""`, or `"EXPLAIN "`): matching
/// chunks through the GIN index (the expression repeated exactly), best
/// chunk per conversation by `ts_rank_cd`, filtered, best `k`.
fn lexical_query(
    prefix: &str,
    language: &TextSearchLanguage,
    query: &str,
    k: usize,
    filter: &SearchFilter,
    max_matches: usize,
) -> QueryBuilder<Postgres> {
    let lang = language.as_str();
    // The tsquery is written out where it is used: `content_tsv @@
    // <expression of parameters>` is an index condition for the GIN index
    // on the stored column (migration 0008), and ranking reads the stored
    // tsvector instead of parsing the text again. The conversation is
    // joined only for a filter.
    let tsquery = format!("websearch_to_tsquery('{lang}'::regconfig, ");
    let mut qb = QueryBuilder::<Postgres>::new(format!(
        "{prefix}WITH matches AS MATERIALIZED (SELECT k.conversation_id, k.user_id, k.seq, \
         ts_rank_cd(k.content_tsv, {tsquery}"
    ));
    qb.push_bind(query.to_string())
        .push(")) AS rank FROM conversation_chunks k");
    if !filter.is_empty() {
        qb.push(" JOIN conversations c ON c.user_id = k.user_id AND c.id = k.conversation_id");
    }
    qb.push(format!(" WHERE k.content_tsv @@ {tsquery}"));
    qb.push_bind(query.to_string()).push(")");
    filter.push_chunk_user(&mut qb);
    filter.push_conditions(&mut qb);
    // Ranking reads every matching chunk's text again: a query of common
    // words matches a large share of the chunks, so at most `max_matches`
    // are ranked (the first the index gives), which bounds its latency.
    qb.push(" LIMIT ")
        .push_bind(i64::try_from(max_matches).unwrap_or(i64::MAX));
    qb.push(
        "), best AS (SELECT DISTINCT ON (conversation_id) conversation_id, user_id, seq, rank \
         FROM matches ORDER BY conversation_id, rank DESC, seq) \
         SELECT b.rank, b.seq, k.content, c.id, c.client_id, c.user_id, c.channel, c.summary, \
         c.metadata, c.created_at, c.received_at \
         FROM best b JOIN conversations c ON c.user_id = b.user_id AND c.id = b.conversation_id \
         JOIN conversation_chunks k ON k.user_id = b.user_id \
         AND k.conversation_id = b.conversation_id AND k.seq = b.seq WHERE TRUE",
    );
    filter.push_users(&mut qb);
    qb.push(" ORDER BY b.rank DESC, c.id LIMIT ")
        .push_bind(i64::try_from(k).unwrap_or(i64::MAX));
    qb
}

/// `EXPLAIN` of a lexical search, for tests and operators who want to see
/// that the full-text index is used.
pub async fn explain_lexical(
    searcher: &Searcher,
    query: &str,
    k: usize,
    filter: &SearchFilter,
) -> Result<String, StoreError> {
    let rows = lexical_query(
        "EXPLAIN ",
        &searcher.language,
        query,
        k,
        filter,
        searcher.lexical_max_matches,
    )
    .build()
    .fetch_all(searcher.store.pool())
    .await?;
    plan_text(&rows)
}

/// The lines of an `EXPLAIN`'s rows, one per line.
fn plan_text(rows: &[PgRow]) -> Result<String, StoreError> {
    let mut plan = String::new();
    for row in rows {
        let line: String = row.try_get(0)?;
        plan.push_str(&line);
        plan.push('\n');
    }
    Ok(plan)
}

fn lexical_hit_from_row(row: &PgRow) -> Result<LexicalHit, StoreError> {
    let rank: f32 = row.try_get("rank")?;
    let conversation_id: Uuid = row.try_get("id")?;
    let client_id: Option<String> = row.try_get("client_id")?;
    Ok(LexicalHit {
        id: client_id
            .clone()
            .unwrap_or_else(|| conversation_id.to_string()),
        conversation_id,
        client_id,
        user_id: row.try_get("user_id")?,
        channel: row.try_get("channel")?,
        summary: row.try_get("summary")?,
        metadata: row.try_get("metadata")?,
        created_at: row.try_get("created_at")?,
        received_at: row.try_get("received_at")?,
        rank: f64::from(rank),
        chunk: MatchedChunk {
            seq: row.try_get("seq")?,
            content: row.try_get("content")?,
        },
    })
}

fn index_note(plan: &SearchPlan, filtered: bool) -> String {
    let ef = plan.ef_search.unwrap_or(0);
    match plan.strategy {
        Strategy::Hnsw => format!(
            "HNSW index scan: {} nearest chunks (ef_search {ef}), best chunk per conversation",
            plan.candidates
        ),
        Strategy::HnswIterative => format!(
            "HNSW iterative index scan (pgvector {}) with the filter inside the scan, \
             ef_search {ef}",
            plan.pgvector
        ),
        _ if filtered && !plan.iterative_scan => format!(
            "pgvector {} has no iterative index scans (0.8+): over-fetch, the filter was \
             applied to the {} nearest chunks (ef_search {ef}, {} round(s))",
            plan.pgvector, plan.candidates, plan.rounds
        ),
        _ => format!(
            "HNSW index scan over-fetched to {} nearest chunks (ef_search {ef}, {} rounds) \
             to find k conversations",
            plan.candidates, plan.rounds
        ),
    }
}

/// The columns every search query returns, from `best b` (conversation_id,
/// seq, distance), `conversations c` and `conversation_chunks k`.
const HIT_COLUMNS: &str = "b.distance, b.seq, k.content, c.id, c.client_id, c.user_id, \
     c.channel, c.summary, c.metadata, c.created_at, c.received_at";

/// Conversations matching `filter`, counted up to `cap` (through the
/// filter's indexes; the cap bounds the work for broad filters).
async fn count_matches(
    conn: &mut PgConnection,
    filter: &SearchFilter,
    cap: u64,
) -> Result<u64, StoreError> {
    let mut qb = QueryBuilder::<Postgres>::new(
        "SELECT count(*) FROM (SELECT 1 FROM conversations c WHERE TRUE",
    );
    filter.push_conditions(&mut qb);
    qb.push(" LIMIT ")
        .push_bind(i64::try_from(cap).unwrap_or(i64::MAX))
        .push(") AS matching");
    let n: i64 = qb.build_query_scalar().fetch_one(&mut *conn).await?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Exact: every embedded chunk of every matching conversation is compared.
async fn exact(
    conn: &mut PgConnection,
    vectors: VectorSet,
    vector: &Vector,
    k: usize,
    filter: &SearchFilter,
) -> Result<Vec<SearchHit>, StoreError> {
    let mut qb = exact_query("", vectors, vector, k, filter);
    let rows = qb.build().fetch_all(&mut *conn).await?;
    rows.iter().map(hit_from_row).collect()
}

/// The SQL of an exact scan (`prefix`: `""`, or `"EXPLAIN "`) of the
/// `vectors` table (aliased `k` in the scan).
fn exact_query(
    prefix: &str,
    vectors: VectorSet,
    vector: &Vector,
    k: usize,
    filter: &SearchFilter,
) -> QueryBuilder<Postgres> {
    let mut qb = QueryBuilder::<Postgres>::new(format!(
        "{prefix}WITH best AS (SELECT DISTINCT ON (k.conversation_id) k.conversation_id, k.user_id, \
         k.seq, k.embedding <=> "
    ));
    qb.push_bind(vector.clone())
        .push(" AS distance FROM ")
        .push(vectors.table())
        .push(
            " k JOIN conversations c ON c.user_id = k.user_id AND c.id = k.conversation_id \
             WHERE k.embedding IS NOT NULL",
        );
    filter.push_chunk_user(&mut qb);
    filter.push_conditions(&mut qb);
    qb.push(" ORDER BY k.conversation_id, distance, k.seq) SELECT ")
        .push(HIT_COLUMNS)
        .push(
            " FROM best b JOIN conversations c ON c.user_id = b.user_id AND c.id = b.conversation_id \
             JOIN conversation_chunks k ON k.user_id = b.user_id \
             AND k.conversation_id = b.conversation_id AND k.seq = b.seq WHERE TRUE",
        );
    filter.push_users(&mut qb);
    qb.push(" ORDER BY b.distance, c.id LIMIT ")
        .push_bind(i64::try_from(k).unwrap_or(i64::MAX));
    qb
}

struct Round {
    hits: Vec<SearchHit>,
    /// Chunks the index scan returned.
    scanned: usize,
}

/// One index round: the `limit` nearest chunks (with the filter inside the
/// scan when `filter_in_scan`), best chunk per conversation, filtered,
/// nearest `k`.
#[allow(clippy::too_many_arguments)] // one round's parameters, all distinct
async fn hnsw_round(
    conn: &mut PgConnection,
    vectors: VectorSet,
    vector: &Vector,
    k: usize,
    filter: &SearchFilter,
    limit: usize,
    ef_search: u32,
    filter_in_scan: bool,
) -> Result<Round, StoreError> {
    set_ef_search(conn, ef_search).await?;
    let mut qb = hnsw_query("", vectors, vector, k, filter, limit, filter_in_scan);
    let rows = qb.build().fetch_all(&mut *conn).await?;
    let mut scanned = 0;
    let mut hits = Vec::with_capacity(rows.len());
    for row in &rows {
        let n: i64 = row.try_get("scanned")?;
        scanned = usize::try_from(n).unwrap_or(0);
        // The one row of an empty result has NULL hit columns.
        let distance: Option<f64> = row.try_get("distance")?;
        if distance.is_some() {
            hits.push(hit_from_row(row)?);
        }
    }
    Ok(Round { hits, scanned })
}

/// The SQL of an index round. The candidate scan is a `MATERIALIZED` CTE
/// so the planner cannot fold the filter or the grouping into it (which
/// would turn the index scan into a full scan); `scanned` comes from a
/// one-row side so that it is known even when no candidate passes the
/// filter.
fn hnsw_query(
    prefix: &str,
    vectors: VectorSet,
    vector: &Vector,
    k: usize,
    filter: &SearchFilter,
    limit: usize,
    filter_in_scan: bool,
) -> QueryBuilder<Postgres> {
    let mut qb = QueryBuilder::<Postgres>::new(format!(
        "{prefix}WITH candidates AS MATERIALIZED \
         (SELECT k.conversation_id, k.user_id, k.seq, k.embedding <=> "
    ));
    qb.push_bind(vector.clone())
        .push(" AS distance FROM ")
        .push(vectors.table())
        .push(" k");
    if filter_in_scan {
        qb.push(
            " JOIN conversations c ON c.user_id = k.user_id AND c.id = k.conversation_id \
             WHERE TRUE",
        );
        filter.push_chunk_user(&mut qb);
        filter.push_conditions(&mut qb);
    }
    qb.push(" ORDER BY k.embedding <=> ")
        .push_bind(vector.clone())
        .push(" LIMIT ")
        .push_bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .push(
            "), best AS (SELECT DISTINCT ON (conversation_id) conversation_id, user_id, seq, distance \
             FROM candidates ORDER BY conversation_id, distance, seq) \
             SELECT s.scanned, r.* FROM (SELECT count(*) AS scanned FROM candidates) s \
             LEFT JOIN LATERAL (SELECT ",
        )
        .push(HIT_COLUMNS)
        .push(
            " FROM best b JOIN conversations c ON c.user_id = b.user_id AND c.id = b.conversation_id \
             JOIN conversation_chunks k ON k.user_id = b.user_id \
             AND k.conversation_id = b.conversation_id AND k.seq = b.seq WHERE TRUE",
        );
    filter.push_conditions(&mut qb);
    filter.push_chunk_user(&mut qb);
    qb.push(" ORDER BY b.distance, c.id LIMIT ")
        .push_bind(i64::try_from(k).unwrap_or(i64::MAX))
        .push(") r ON TRUE ORDER BY r.distance, r.id");
    qb
}

/// `SET LOCAL hnsw.ef_search`: a setting takes no bind parameter, and the
/// value is an integer clamped to pgvector's range, so it is formatted in.
async fn set_ef_search(conn: &mut PgConnection, ef_search: u32) -> Result<(), StoreError> {
    let ef = ef_search.clamp(1, MAX_EF_SEARCH);
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SET LOCAL hnsw.ef_search = {ef}"
    )))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// `EXPLAIN` of the first index round of an unfiltered search, for tests
/// and operators who want to see that the HNSW index is used.
pub async fn explain_index_round(
    store: &Store,
    vector: &[f32],
    k: usize,
    ef_search: u32,
) -> Result<String, StoreError> {
    let vector = Vector::from(vector.to_vec());
    let mut tx = store.pool().begin().await?;
    set_ef_search(&mut tx, ef_search).await?;
    let limit = k.saturating_mul(CHUNKS_PER_RESULT).max(ef_search as usize);
    let filter = SearchFilter::default();
    let rows = hnsw_query(
        "EXPLAIN ",
        VectorSet::Current,
        &vector,
        k,
        &filter,
        limit,
        false,
    )
    .build()
    .fetch_all(&mut *tx)
    .await?;
    tx.rollback().await?;
    plan_text(&rows)
}

/// `EXPLAIN` of the exact scan for `filter`: with a `user_id` filter on
/// hash-partitioned tables it names one partition of each table (partition
/// pruning), which the partitioned-layout test checks.
pub async fn explain_exact(
    store: &Store,
    vector: &[f32],
    k: usize,
    filter: &SearchFilter,
) -> Result<String, StoreError> {
    let vector = Vector::from(vector.to_vec());
    let rows = exact_query("EXPLAIN ", VectorSet::Current, &vector, k, filter)
        .build()
        .fetch_all(store.pool())
        .await?;
    plan_text(&rows)
}

fn hit_from_row(row: &PgRow) -> Result<SearchHit, StoreError> {
    let distance: f64 = row.try_get("distance")?;
    let conversation_id: Uuid = row.try_get("id")?;
    let client_id: Option<String> = row.try_get("client_id")?;
    Ok(SearchHit {
        id: client_id
            .clone()
            .unwrap_or_else(|| conversation_id.to_string()),
        conversation_id,
        client_id,
        user_id: row.try_get("user_id")?,
        channel: row.try_get("channel")?,
        summary: row.try_get("summary")?,
        metadata: row.try_get("metadata")?,
        created_at: row.try_get("created_at")?,
        received_at: row.try_get("received_at")?,
        score: 1.0 - distance,
        distance,
        chunk: MatchedChunk {
            seq: row.try_get("seq")?,
            content: row.try_get("content")?,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iterative_scans_from_pgvector_0_8() {
        assert!(!IndexCapabilities::from_version("0.6.2").iterative_scan);
        assert!(!IndexCapabilities::from_version("0.7.4").iterative_scan);
        assert!(IndexCapabilities::from_version("0.8.0").iterative_scan);
        assert!(IndexCapabilities::from_version("0.10.1").iterative_scan);
        assert!(IndexCapabilities::from_version("1.0").iterative_scan);
        assert!(!IndexCapabilities::from_version("garbage").iterative_scan);
        assert!(!IndexCapabilities::from_version("").iterative_scan);
    }

    #[test]
    fn filter_conditions_bind_every_value() {
        let filter = SearchFilter {
            user_id: Some("u' OR 1=1 --".into()),
            channel: Some("web".into()),
            since: Some(DateTime::<Utc>::MIN_UTC),
            until: None,
            metadata: Some(serde_json::json!({"a": 1})),
        };
        let mut qb = QueryBuilder::<Postgres>::new("SELECT 1 FROM conversations c WHERE TRUE");
        filter.push_conditions(&mut qb);
        let sql = qb.sql().as_str().to_string();
        assert!(!sql.contains("OR 1=1"), "{sql}");
        assert!(sql.contains("c.user_id = $1"), "{sql}");
        assert!(sql.contains("c.channel = $2"), "{sql}");
        assert!(
            sql.contains("coalesce(c.created_at, c.received_at) >= $3"),
            "{sql}"
        );
        assert!(sql.contains("c.metadata @> $4::jsonb"), "{sql}");
        assert!(!sql.contains(" < "), "{sql}");
        assert!(SearchFilter::default().is_empty());
        assert!(!filter.is_empty());
    }

    #[test]
    fn index_query_filters_after_the_scan_unless_iterative() {
        let vector = Vector::from(vec![1.0, 0.0]);
        let filter = SearchFilter {
            user_id: Some("u".into()),
            ..SearchFilter::default()
        };
        let post = hnsw_query("", VectorSet::Current, &vector, 10, &filter, 40, false)
            .sql()
            .as_str()
            .to_string();
        let scan = post.split("), best AS").next().unwrap_or_default();
        assert!(!scan.contains("user_id ="), "{post}");
        assert!(post.contains("MATERIALIZED"), "{post}");
        let inside = hnsw_query("", VectorSet::Current, &vector, 10, &filter, 40, true)
            .sql()
            .as_str()
            .to_string();
        let scan = inside.split("), best AS").next().unwrap_or_default();
        assert!(scan.contains("c.user_id ="), "{inside}");
        // The partition key on the chunks too: the scan is pruned to one
        // partition (shard).
        assert!(scan.contains("k.user_id ="), "{inside}");
    }
}
