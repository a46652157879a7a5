//! `POST /v1/search`: recall stored conversations by meaning.
//!
//! ```json
//! {"query": "book me a flight to Seattle", "k": 10,
//!  "filter": {"user_id": "u-17", "channel": "web",
//!             "since": "2024-05-01T00:00:00Z", "until": "2024-06-01T00:00:00Z",
//!             "metadata": {"locale": "en-US"}},
//!  "ef_search": 100, "exact": false}
//! ```
//!
//! The query is embedded through the search lane ([`convstore_embed::query`]:
//! the model's query prefix, the L1 cache, backend capacity of its own), so
//! a search never waits behind ingest; then [`convstore_store::search`] finds
//! the nearest conversations. At most `search.max_concurrent` searches run
//! at once; the others wait for a slot, all within `search.timeout_ms`.
//! Every error names the field at fault (400) or says what is unavailable
//! (503; a search over `search.timeout_ms` is a 503 too, not a 504).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::config::SearchSettings;
use convstore_embed::EmbedError;
use convstore_embed::query::QueryEmbedder;
use convstore_store::models::{ModelState, VectorSet};
use convstore_store::search::{
    ConversationText, LexicalHit, LexicalQuery, MAX_EF_SEARCH, MatchedChunk, SearchFilter,
    SearchHit, SearchMode, SearchPlan, SearchQuery, Searcher,
};
use convstore_telemetry::metrics as m;

use super::error::ApiError;
use super::handlers::{read_body, require_content_type};
use super::{IngressState, Transport};
use convstore_core::validate::{refuse_non_object, schema_error};
use convstore_telemetry::events::label;

/// Conversations a search returns when it does not say.
pub const DEFAULT_K: usize = 10;
/// The most conversations one search may ask for.
pub const MAX_K: usize = 100;
/// Longest query accepted, in bytes: a question, not a document. (The
/// model's context may be shorter still; the backend then refuses it and
/// the answer is a 400 on `query`.)
pub const MAX_QUERY_BYTES: usize = 8192;
/// The most neighbouring messages a result may carry on each side.
pub const MAX_CONTEXT: usize = 20;
/// Conversations each list of a hybrid search ranks before fusion:
/// `max(2k, 20)`, at most this.
pub const MAX_FUSION_DEPTH: usize = 200;

/// Which ranked lists a search uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Nearest by meaning (the query's embedding).
    Semantic,
    /// Best by words (PostgreSQL full-text search); needs no embedding.
    Lexical,
    /// Both, fused by reciprocal rank.
    #[default]
    Hybrid,
}

impl Mode {
    fn parse(value: &str) -> Option<Self> {
        match value {
            "semantic" => Some(Self::Semantic),
            "lexical" => Some(Self::Lexical),
            "hybrid" => Some(Self::Hybrid),
            _ => None,
        }
    }
}

/// What a search needs: the query lane, the store, and the limits.
pub struct SearchService {
    embedder: QueryEmbedder,
    /// While a change of model re-embeds: the query lane of the previous
    /// model, whose vectors search reads until the new model covers every
    /// chunk (docs/SEARCH.md "Changing the model").
    previous: Option<QueryEmbedder>,
    /// Which model's vectors search reads, kept up to date by the model
    /// task (`model_task`).
    models: Option<tokio::sync::watch::Receiver<ModelState>>,
    searcher: Searcher,
    slots: Semaphore,
    default_ef_search: u32,
    timeout: Duration,
    rrf_k: u32,
}

impl SearchService {
    pub fn new(embedder: QueryEmbedder, searcher: Searcher, settings: &SearchSettings) -> Self {
        Self {
            embedder,
            previous: None,
            models: None,
            searcher,
            slots: Semaphore::new(settings.max_concurrent.get()),
            default_ef_search: settings.ef_search.get().min(MAX_EF_SEARCH),
            timeout: Duration::from_millis(settings.timeout_ms.get()),
            rrf_k: settings.rrf_k.get(),
        }
    }

    /// Searches follow `models`: the previous model's vectors (queries
    /// embedded by `previous`) while a change of model re-embeds.
    pub fn with_models(
        mut self,
        models: tokio::sync::watch::Receiver<ModelState>,
        previous: Option<QueryEmbedder>,
    ) -> Self {
        self.models = Some(models);
        self.previous = previous;
        self
    }

    pub fn model(&self) -> &str {
        self.embedder.model()
    }

    /// The previous model's query lane when search reads its vectors now.
    fn previous_lane(&self) -> Option<&QueryEmbedder> {
        let models = self.models.as_ref()?.borrow();
        let previous = models.previous.as_ref()?;
        let lane = self.previous.as_ref()?;
        (models.migrating()
            && lane.model() == previous.id.model
            && lane.dimensions() == previous.id.dimensions)
            .then_some(lane)
    }

    /// Runs one validated search within the deadline.
    pub async fn run(&self, request: &SearchRequest) -> Result<SearchResponse, ApiError> {
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, self.run_inner(request, started)).await;
        match result {
            Ok(result) => result,
            // 503, not 504: the daemon is overloaded or a backend is slow;
            // the same search may succeed shortly.
            Err(_) => Err(ApiError::Unavailable(format!(
                "the search took longer than search.timeout_ms ({} ms): searches or the \
                 embedding backend are overloaded; try again",
                self.timeout.as_millis()
            ))),
        }
    }

    async fn run_inner(
        &self,
        request: &SearchRequest,
        started: Instant,
    ) -> Result<SearchResponse, ApiError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| ApiError::Unavailable("search is shutting down".into()))?;
        metrics::histogram!(m::SEARCH_WAIT_SECONDS).record(started.elapsed().as_secs_f64());
        let _in_flight = InFlight::enter();

        let depth = match request.mode {
            Mode::Hybrid => (request.k * 2).clamp(20, MAX_FUSION_DEPTH).max(request.k),
            _ => request.k,
        };
        let semantic = async {
            if request.mode == Mode::Lexical {
                return Ok(None);
            }
            self.semantic(request, depth).await.map(Some)
        };
        let lexical = async {
            if request.mode == Mode::Semantic {
                return Ok(None);
            }
            let lexical_started = Instant::now();
            let hits = self
                .searcher
                .lexical(LexicalQuery {
                    query: &request.query,
                    k: depth,
                    filter: &request.filter,
                })
                .await
                .map_err(ApiError::from)?;
            Ok::<_, ApiError>(Some((hits, lexical_started.elapsed().as_secs_f64())))
        };
        let (semantic, lexical) = tokio::join!(semantic, lexical);
        let lexical = lexical?;
        let (semantic, semantic_error) = match semantic {
            Ok(found) => (found, None),
            // Hybrid: the words still answer when the query cannot be
            // embedded (no backend answers, or not within half the
            // deadline); a query the backend refuses is still a 400.
            Err(SemanticError::Embed(e @ ApiError::Unavailable(_)))
                if request.mode == Mode::Hybrid && lexical.is_some() =>
            {
                (None, Some(e))
            }
            Err(SemanticError::Embed(e) | SemanticError::Other(e)) => return Err(e),
        };

        let mut results = fuse(
            semantic.as_ref().map(|s| s.hits.as_slice()),
            lexical.as_ref().map(|(hits, _)| hits.as_slice()),
            self.rrf_k,
            request.mode,
        );
        results.truncate(request.k);
        if request.context > 0 {
            self.add_context(&mut results, request.context).await?;
        }
        let embed_ms = semantic.as_ref().map_or(0.0, |s| s.embed_seconds * 1000.0);
        let semantic_db = semantic.as_ref().map_or(0.0, |s| s.db_seconds);
        let lexical_db = lexical.as_ref().map_or(0.0, |(_, secs)| *secs);
        Ok(SearchResponse {
            model: semantic
                .as_ref()
                .map_or_else(|| self.embedder.model().to_string(), |s| s.model.clone()),
            vectors: semantic.as_ref().map(|s| s.vectors),
            mode: request.mode,
            k: request.k,
            count: results.len(),
            results,
            search: semantic.as_ref().map(|s| s.plan.clone()),
            fusion: (request.mode == Mode::Hybrid).then_some(Fusion {
                rrf_k: self.rrf_k,
                depth,
            }),
            language: (request.mode != Mode::Semantic)
                .then(|| self.searcher.language().as_str().to_string()),
            semantic_error: semantic_error.map(|e| match e {
                ApiError::Unavailable(message) => message,
                other => other.code().to_string(),
            }),
            timings_ms: Timings {
                embed: embed_ms,
                database: (semantic_db + lexical_db) * 1000.0,
                total: started.elapsed().as_secs_f64() * 1000.0,
            },
            query_cached: semantic.as_ref().is_some_and(|s| s.cached),
        })
    }

    /// Embeds the query and finds the `depth` nearest conversations: in
    /// the previous model's vectors while a change of model re-embeds,
    /// else (or when no backend embeds with the previous model) in the
    /// current model's. A change of model never fails a search.
    async fn semantic(
        &self,
        request: &SearchRequest,
        depth: usize,
    ) -> Result<Semantic, SemanticError> {
        if let Some(previous) = self.previous_lane() {
            match self
                .semantic_in(previous, VectorSet::Previous, request, depth)
                .await
            {
                Err(SemanticError::Embed(ApiError::Unavailable(reason))) => {
                    let mut found = self
                        .semantic_in(&self.embedder, VectorSet::Current, request, depth)
                        .await?;
                    found.plan.note = format!(
                        "the previous model `{}` could not embed the query ({reason}): the new \
                         model's vectors answered, which do not cover every chunk yet; {}",
                        previous.model(),
                        found.plan.note
                    );
                    return Ok(found);
                }
                other => return other,
            }
        }
        self.semantic_in(&self.embedder, VectorSet::Current, request, depth)
            .await
    }

    /// The query embedded by `lane`, searched in `vectors` (of that model).
    async fn semantic_in(
        &self,
        lane: &QueryEmbedder,
        vectors: VectorSet,
        request: &SearchRequest,
        depth: usize,
    ) -> Result<Semantic, SemanticError> {
        let embed_started = Instant::now();
        let embedding = lane.embed(&request.query);
        let query = if request.mode == Mode::Hybrid {
            match tokio::time::timeout(self.timeout / 2, embedding).await {
                Ok(result) => result.map_err(|e| SemanticError::Embed(embed_error(e)))?,
                Err(_) => {
                    return Err(SemanticError::Embed(ApiError::Unavailable(format!(
                        "the query was not embedded within half of search.timeout_ms ({} ms)",
                        (self.timeout / 2).as_millis()
                    ))));
                }
            }
        } else {
            embedding
                .await
                .map_err(|e| SemanticError::Embed(embed_error(e)))?
        };
        let embed_seconds = embed_started.elapsed().as_secs_f64();
        metrics::histogram!(m::SEARCH_EMBED_SECONDS).record(embed_seconds);
        let result = if query.cached { "hit" } else { "miss" };
        metrics::counter!(m::SEARCH_EMBED_CACHE, label::RESULT => result).increment(1);

        let db_started = Instant::now();
        let outcome = self
            .searcher
            .search(SearchQuery {
                vector: &query.vector,
                k: depth,
                filter: &request.filter,
                ef_search: request.ef_search.unwrap_or(self.default_ef_search),
                mode: if request.exact {
                    SearchMode::Exact
                } else {
                    SearchMode::Auto
                },
                vectors,
            })
            .await
            .map_err(|e| SemanticError::Other(ApiError::from(e)))?;
        let db_seconds = db_started.elapsed().as_secs_f64();
        metrics::histogram!(m::SEARCH_DATABASE_SECONDS).record(db_seconds);
        metrics::counter!(m::SEARCH_STRATEGY, label::STRATEGY => outcome.plan.strategy.as_str())
            .increment(1);
        metrics::counter!(m::SEARCH_VECTORS, label::VECTORS => vectors.as_str()).increment(1);
        Ok(Semantic {
            hits: outcome.hits,
            plan: outcome.plan,
            cached: query.cached,
            embed_seconds,
            db_seconds,
            model: lane.model().to_string(),
            vectors,
        })
    }

    /// Adds to each result the messages its chunk covers and `n` on each
    /// side. A result whose conversation changed or went since the search
    /// (its chunks no longer cut its messages) gets none.
    async fn add_context(&self, results: &mut [SearchResult], n: usize) -> Result<(), ApiError> {
        let keys: Vec<(String, uuid::Uuid)> = results
            .iter()
            .map(|r| (r.user_id.clone(), r.conversation_id))
            .collect();
        let texts = self
            .searcher
            .conversation_texts(&keys)
            .await
            .map_err(ApiError::from)?;
        for result in results.iter_mut() {
            result.context = texts
                .iter()
                .find(|t| {
                    t.conversation_id == result.conversation_id && t.user_id == result.user_id
                })
                .and_then(|t| context_of(t, result.chunk.seq, n));
        }
        Ok(())
    }
}

/// The semantic list of a search.
struct Semantic {
    hits: Vec<SearchHit>,
    plan: SearchPlan,
    cached: bool,
    embed_seconds: f64,
    db_seconds: f64,
    /// The model that embedded the query, whose vectors answered.
    model: String,
    vectors: VectorSet,
}

/// Why the semantic list is missing: the query could not be embedded, or
/// something else (the database).
enum SemanticError {
    Embed(ApiError),
    Other(ApiError),
}

/// The messages (or transcript lines) around chunk `seq` of `text`: those
/// the chunk covers and `n` on each side.
fn context_of(text: &ConversationText, seq: i32, n: usize) -> Option<HitContext> {
    let units: Vec<(Option<String>, String, String)> = match &text.messages {
        Some(serde_json::Value::Array(messages)) => messages
            .iter()
            .map(|m| {
                let role = m.get("role").and_then(|r| r.as_str()).unwrap_or_default();
                let content = m
                    .get("content")
                    .and_then(|c| c.as_str())
                    .unwrap_or_default();
                (
                    Some(role.to_string()),
                    format!("{role}: "),
                    format!("{content}\n"),
                )
            })
            .collect(),
        _ => text
            .transcript
            .split_inclusive('\n')
            .map(|line| (None, String::new(), line.to_string()))
            .collect(),
    };
    let pairs: Vec<(&str, &str)> = units
        .iter()
        .map(|(_, prefix, body)| (prefix.as_str(), body.as_str()))
        .collect();
    let chunks: Vec<&str> = text.chunks.iter().map(String::as_str).collect();
    let ranges = convstore_core::chunker::chunk_units(&pairs, &chunks)?;
    let (first, last) = *ranges.get(usize::try_from(seq).ok()?)?;
    let from = first.saturating_sub(n);
    let to = last.saturating_add(n).min(units.len().saturating_sub(1));
    let messages = (from..=to)
        .filter_map(|i| {
            let (role, _, body) = units.get(i)?;
            Some(ContextMessage {
                index: i,
                role: role.clone(),
                content: body.strip_suffix('\n').unwrap_or(body).to_string(),
                in_chunk: (first..=last).contains(&i),
            })
        })
        .collect();
    Some(HitContext {
        first,
        last,
        messages,
    })
}

/// Reciprocal rank fusion of the two lists, per conversation: a list that
/// found a conversation adds `1/(rrf_k + rank)` (rank from 1, the
/// conversation's best chunk's place in that list). With one list the
/// order is that list's; the score is its own (cosine similarity or
/// `ts_rank_cd`).
fn fuse(
    semantic: Option<&[SearchHit]>,
    lexical: Option<&[LexicalHit]>,
    rrf_k: u32,
    mode: Mode,
) -> Vec<SearchResult> {
    let mut out: Vec<SearchResult> = Vec::new();
    let rrf = |rank: usize| 1.0 / (f64::from(rrf_k) + rank as f64);
    // SearchHit and LexicalHit carry the same conversation fields under the
    // same names; a result takes them from either.
    macro_rules! result_of {
        ($hit:expr, $score:expr, $distance:expr, $text_rank:expr, $ranks:expr) => {
            SearchResult {
                id: $hit.id.clone(),
                conversation_id: $hit.conversation_id,
                client_id: $hit.client_id.clone(),
                user_id: $hit.user_id.clone(),
                channel: $hit.channel.clone(),
                summary: $hit.summary.clone(),
                metadata: $hit.metadata.clone(),
                created_at: $hit.created_at,
                received_at: $hit.received_at,
                score: $score,
                distance: $distance,
                text_rank: $text_rank,
                ranks: $ranks,
                chunk: $hit.chunk.clone(),
                context: None,
            }
        };
    }
    for (i, hit) in semantic.unwrap_or_default().iter().enumerate() {
        let rank = i + 1;
        let score = if mode == Mode::Hybrid {
            rrf(rank)
        } else {
            hit.score
        };
        let ranks = Ranks {
            semantic: Some(rank),
            lexical: None,
        };
        out.push(result_of!(hit, score, Some(hit.distance), None, ranks));
    }
    for (i, hit) in lexical.unwrap_or_default().iter().enumerate() {
        let rank = i + 1;
        if let Some(found) = out
            .iter_mut()
            .find(|r| r.conversation_id == hit.conversation_id && r.user_id == hit.user_id)
        {
            found.score += rrf(rank);
            found.text_rank = Some(hit.rank);
            found.ranks.lexical = Some(rank);
            // The chunk of the list that ranks the conversation higher.
            if found.ranks.semantic.is_some_and(|s| rank < s) {
                found.chunk = hit.chunk.clone();
            }
            continue;
        }
        let score = if mode == Mode::Hybrid {
            rrf(rank)
        } else {
            hit.rank
        };
        let ranks = Ranks {
            semantic: None,
            lexical: Some(rank),
        };
        out.push(result_of!(hit, score, None, Some(hit.rank), ranks));
    }
    if mode == Mode::Hybrid {
        // Fused score, then the better single rank, then the id: a total
        // order, so equal inputs give equal answers.
        let best = |r: &SearchResult| {
            r.ranks
                .semantic
                .unwrap_or(usize::MAX)
                .min(r.ranks.lexical.unwrap_or(usize::MAX))
        };
        out.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then_with(|| best(a).cmp(&best(b)))
                .then_with(|| a.id.cmp(&b.id))
        });
    }
    out
}

/// Counts a search in the in-flight gauge while it lives.
struct InFlight;

impl InFlight {
    fn enter() -> Self {
        metrics::gauge!(m::SEARCH_IN_FLIGHT).increment(1.0);
        Self
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!(m::SEARCH_IN_FLIGHT).decrement(1.0);
    }
}

fn embed_error(e: EmbedError) -> ApiError {
    match e {
        // The backend refused this text: too long for the model's
        // context, or something it cannot read.
        EmbedError::Rejected { message, .. } => ApiError::invalid_field(
            "query",
            format!("the embedding backend refused the query: {message}"),
        ),
        EmbedError::TooLong { message, .. } => ApiError::invalid_field(
            "query",
            format!("longer than the embedding model reads; shorten it ({message})"),
        ),
        other => ApiError::Unavailable(format!(
            "cannot embed the query: {other}; see /readyz and /v1/stats for the backends"
        )),
    }
}

/// The body as received; every field optional but `query`, so that the
/// errors can name what is wrong.
///
/// Its schema is the request body of `POST /v1/search` in the OpenAPI
/// document (`SearchRequest`): what the document says is what this
/// deserialises.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(
    as = SearchRequest,
    description = "A search: what to look for, how many conversations, which ones may match. \
        Every field but `query` is optional (`null` = not given); unknown fields are refused.",
    examples(json!({"query": "book me a flight to Seattle", "k": 10,
        "filter": {"user_id": "u-17", "since": "2024-05-01T00:00:00Z"}}))
)]
struct SearchIn {
    /// What to look for, embedded with the model's query prefix: not
    /// empty or blank, at most 8192 bytes (UTF-8), no NUL character.
    #[schema(min_length = 1)]
    query: String,
    /// Conversations wanted (default 10). `null` = not given.
    #[schema(minimum = 1, maximum = 100, default = 10)]
    k: Option<i64>,
    /// Which conversations may match (all conditions AND); leave out or
    /// `null` for all.
    filter: Option<FilterIn>,
    /// HNSW candidate list size of the first index round (default
    /// `search.ef_search`, 200): higher trades speed for recall. `null` =
    /// not given.
    #[schema(minimum = 1, maximum = 1000)]
    ef_search: Option<i64>,
    /// `true`: compare every matching chunk instead of using the index
    /// (slow, exact). Default `false`.
    #[schema(default = false)]
    exact: Option<bool>,
    /// `semantic` (by meaning), `lexical` (by words, PostgreSQL full-text
    /// search: needs no embedding) or `hybrid` (both, fused by reciprocal
    /// rank; the default). `null` = not given.
    #[schema(value_type = Option<Mode>, default = "hybrid")]
    mode: Option<String>,
    /// Neighbouring messages to return on each side of the messages the
    /// best chunk covers, 0 to 20 (default 0: no `context`).
    #[schema(minimum = 0, maximum = 20, default = 0)]
    context: Option<i64>,
}

/// Conversations a search may return; every condition is optional
/// (`null` = not given) and they combine with AND.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = SearchFilter)]
struct FilterIn {
    /// Only this user's conversations (must not be `""`).
    #[schema(min_length = 1)]
    user_id: Option<String>,
    /// Only this channel (must not be `""`).
    #[schema(min_length = 1)]
    channel: Option<String>,
    /// RFC 3339, inclusive: compared with `created_at`, or `received_at`
    /// when the conversation has none.
    #[schema(format = DateTime)]
    since: Option<String>,
    /// RFC 3339, exclusive, same time as `since`; must be after `since`.
    #[schema(format = DateTime)]
    until: Option<String>,
    /// A JSON object the conversation's metadata must contain (PostgreSQL
    /// `@>`: `{"locale":"en-US"}` matches `{"locale":"en-US","tier":"gold"}`).
    #[schema(value_type = Option<Object>)]
    metadata: Option<serde_json::Value>,
}

/// A validated search.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchRequest {
    pub query: String,
    pub k: usize,
    pub filter: SearchFilter,
    pub ef_search: Option<u32>,
    pub exact: bool,
    pub mode: Mode,
    /// Messages on each side of the best chunk's (0 = no context).
    pub context: usize,
}

/// Parses and validates a search body; errors name the field.
pub fn parse_search(body: &[u8]) -> Result<SearchRequest, ApiError> {
    // serde would read `["flights", 3]` as {query, k}: refused, as no field.
    refuse_non_object(body, "the body")?;
    let mut de = serde_json::Deserializer::from_slice(body);
    let input: SearchIn = serde_path_to_error::deserialize(&mut de).map_err(schema_error)?;
    de.end()
        .map_err(|e| ApiError::invalid_json(format!("trailing data after the search: {e}")))?;

    let query = input.query;
    if query.trim().is_empty() {
        return Err(ApiError::invalid_field("query", "must not be empty"));
    }
    if query.len() > MAX_QUERY_BYTES {
        return Err(ApiError::invalid_field(
            "query",
            format!(
                "{} bytes; at most {MAX_QUERY_BYTES} (search for a question, not a document)",
                query.len()
            ),
        ));
    }
    if query.contains('\0') {
        return Err(ApiError::invalid_field("query", "contains a NUL character"));
    }
    let k = match input.k {
        None => DEFAULT_K,
        Some(k) if (1..=MAX_K as i64).contains(&k) => k as usize,
        Some(k) => {
            return Err(ApiError::invalid_field(
                "k",
                format!("{k} is out of range: 1 to {MAX_K}"),
            ));
        }
    };
    let ef_search = match input.ef_search {
        None => None,
        Some(ef) if (1..=i64::from(MAX_EF_SEARCH)).contains(&ef) => u32::try_from(ef).ok(),
        Some(ef) => {
            return Err(ApiError::invalid_field(
                "ef_search",
                format!("{ef} is out of range: 1 to {MAX_EF_SEARCH}"),
            ));
        }
    };
    let mode = match input.mode.as_deref() {
        None => Mode::default(),
        Some(value) => Mode::parse(value).ok_or_else(|| {
            ApiError::invalid_field(
                "mode",
                format!("`{value}` is not a mode: semantic, lexical or hybrid"),
            )
        })?,
    };
    let context = match input.context {
        None => 0,
        Some(n) if (0..=MAX_CONTEXT as i64).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::invalid_field(
                "context",
                format!("{n} is out of range: 0 to {MAX_CONTEXT} messages on each side"),
            ));
        }
    };
    let filter = validate_filter(input.filter.unwrap_or_default())?;
    Ok(SearchRequest {
        query,
        k,
        filter,
        ef_search,
        exact: input.exact.unwrap_or(false),
        mode,
        context,
    })
}

fn validate_filter(input: FilterIn) -> Result<SearchFilter, ApiError> {
    let label = |field: &str, value: Option<String>| -> Result<Option<String>, ApiError> {
        match value {
            Some(v) if v.is_empty() => Err(ApiError::invalid_field(
                field,
                "must not be empty (leave it out to match every value)",
            )),
            Some(v) if v.contains('\0') => {
                Err(ApiError::invalid_field(field, "contains a NUL character"))
            }
            other => Ok(other),
        }
    };
    let user_id = label("filter.user_id", input.user_id)?;
    let channel = label("filter.channel", input.channel)?;
    let since = input
        .since
        .map(|v| parse_time("filter.since", &v))
        .transpose()?;
    let until = input
        .until
        .map(|v| parse_time("filter.until", &v))
        .transpose()?;
    if let (Some(since), Some(until)) = (since, until)
        && until <= since
    {
        return Err(ApiError::invalid_field(
            "filter.until",
            format!("{until} is not after filter.since ({since}): the window is empty"),
        ));
    }
    let metadata = match input.metadata {
        None | Some(serde_json::Value::Null) => None,
        Some(value @ serde_json::Value::Object(_)) => {
            // On the decoded value, not its text: the six characters
            // `\\u0000` (an escaped backslash, then `u0000`) are ordinary
            // text and used to be refused as a NUL.
            if let Some(path) = nul_in_json("filter.metadata", &value) {
                return Err(ApiError::invalid_field(
                    &path,
                    "contains a NUL character (\\u0000), which PostgreSQL jsonb cannot hold",
                ));
            }
            Some(value)
        }
        Some(other) => {
            return Err(ApiError::invalid_field(
                "filter.metadata",
                format!(
                    "must be a JSON object the conversation's metadata contains, got {}",
                    convstore_core::validate::json_kind(&other)
                ),
            ));
        }
    };
    Ok(SearchFilter {
        user_id,
        channel,
        since,
        until,
        metadata,
    })
}

/// The path of the first key or string in `value` holding a real NUL
/// character (`jsonb` refuses it: the filter could never match), as
/// `filter.metadata.a[2]`; keys are cut to 40 characters, as in
/// conversation metadata.
fn nul_in_json(path: &str, value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => s.contains('\0').then(|| path.to_string()),
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| nul_in_json(&format!("{path}[{i}]"), v)),
        serde_json::Value::Object(map) => map.iter().find_map(|(k, v)| {
            let path = format!("{path}.{}", k.chars().take(40).collect::<String>());
            if k.contains('\0') {
                Some(path)
            } else {
                nul_in_json(&path, v)
            }
        }),
        _ => None,
    }
}

fn parse_time(field: &str, value: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(value)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            ApiError::invalid_field(
                field,
                format!("`{value}` is not an RFC 3339 time like 2024-05-01T10:00:00Z ({e})"),
            )
        })
}

/// Milliseconds spent, for the caller's own latency accounting.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = SearchTimings)]
pub struct Timings {
    pub embed: f64,
    pub database: f64,
    pub total: f64,
}

/// One conversation found, with its best chunk.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct SearchResult {
    /// The caller's id when it gave one, else the row id: the id
    /// `GET /v1/conversations/{id}` takes.
    pub id: String,
    pub conversation_id: uuid::Uuid,
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
    /// What the results are ordered by: `semantic`, the cosine similarity
    /// of the best chunk (`1 - distance`); `lexical`, its `ts_rank_cd`;
    /// `hybrid`, the reciprocal rank fusion score (sum of `1/(rrf_k +
    /// rank)` over the lists that found it).
    pub score: f64,
    /// Cosine distance of the best chunk (pgvector's `<=>`), when the
    /// semantic list found the conversation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distance: Option<f64>,
    /// `ts_rank_cd` of the best chunk, when the lexical list found it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_rank: Option<f64>,
    /// Its rank (from 1) in each list that found it.
    pub ranks: Ranks,
    /// The best chunk (of the list ranking the conversation higher).
    pub chunk: MatchedChunk,
    /// The messages around the best chunk (with `context` ≥ 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<HitContext>,
}

/// A result's rank in each list; absent = not in that list's top.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Ranks {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub semantic: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lexical: Option<usize>,
}

/// The best chunk in place: the messages it covers (`first` to `last`,
/// indices in the conversation's messages, or transcript lines) and
/// `context` more on each side.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct HitContext {
    pub first: usize,
    pub last: usize,
    pub messages: Vec<ContextMessage>,
}

/// One message of a result's context.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ContextMessage {
    /// Its index in the conversation (from 0).
    pub index: usize,
    /// Absent for a transcript line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    pub content: String,
    /// Part of the best chunk.
    pub in_chunk: bool,
}

/// How a hybrid search fused its lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Fusion {
    pub rrf_k: u32,
    /// Conversations each list ranked before fusion: `max(2k, 20)`, at
    /// most 200.
    pub depth: usize,
}

/// The answer.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SearchResponse {
    /// The embedding model whose vectors answered the semantic list (the
    /// configured model, or the previous one while a change of model
    /// re-embeds); the configured model when no semantic list ran.
    pub model: String,
    /// Whose vectors answered the semantic list: `current` (the
    /// configured model's) or `previous` (while a change of model
    /// re-embeds); absent when no semantic list ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vectors: Option<VectorSet>,
    pub mode: Mode,
    pub k: usize,
    /// Results returned: `k`, unless fewer conversations match.
    pub count: usize,
    /// Best first.
    pub results: Vec<SearchResult>,
    /// How the semantic list was found (index or exact scan, over-fetch
    /// rounds, …); absent in `lexical` mode, or when a hybrid search
    /// could not embed the query.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub search: Option<SearchPlan>,
    /// `hybrid`: the fusion's parameters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fusion: Option<Fusion>,
    /// The text search configuration of the lexical list
    /// (`search.language`), in `lexical` and `hybrid` modes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    /// `hybrid`: why the query could not be embedded; the results are
    /// then the lexical list alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub semantic_error: Option<String>,
    pub timings_ms: Timings,
    /// The query's vector came from the cache.
    pub query_cached: bool,
}

/// `POST /v1/search`: the `k` stored conversations nearest to a query, by
/// meaning, each with its best-matching chunk.
#[utoipa::path(
    post,
    path = "/v1/search",
    tag = "search",
    request_body(
        content = SearchIn,
        content_type = "application/json",
        description = "The query, how many results, and an optional filter. Unknown fields are refused (400 naming them)."
    ),
    responses(
        (status = 200, description = "The nearest conversations, nearest first, and how they were found", body = SearchResponse),
        (status = 400, description = "`invalid_field`, with `field` naming the one at fault: `query` (missing, blank, over 8192 bytes, NUL, or refused by the embedding backend), `k`, `ef_search`, `exact`, `filter`, `filter.user_id`, `filter.channel`, `filter.since`, `filter.until` (also when not after `filter.since`), `filter.metadata` (or the path inside it holding a NUL, `filter.metadata.a[1]`), or an unknown field; `invalid_json` for broken JSON, trailing data or a body that is not a JSON object; `bad_request` when the body cannot be read", body = super::error::ErrorEnvelope,
            example = json!({"error": {"code": "invalid_field", "message": "k: 0 is out of range: 1 to 100", "field": "k"}})),
        (status = 401, description = "Bearer token missing or unknown", body = super::error::ErrorEnvelope),
        (status = 408, description = "The body did not arrive within `server.body_timeout_ms`", body = super::error::ErrorEnvelope),
        (status = 413, description = "Body over `server.max_body_bytes`", body = super::error::ErrorEnvelope),
        (status = 415, description = "Not application/json", body = super::error::ErrorEnvelope),
        (status = 429, description = "This token's rate limit; see Retry-After", body = super::error::ErrorEnvelope),
        (status = 500, description = "The database failed the search (logged)", body = super::error::ErrorEnvelope),
        (status = 503, description = "`unavailable`: the daemon is still starting, the query cannot be embedded (no backend answers), the database is unavailable, or the search took longer than `search.timeout_ms` (a timeout is a 503, never a 504: the same search may succeed shortly)", body = super::error::ErrorEnvelope),
    )
)]
pub async fn post_search(
    State(state): State<Arc<IngressState>>,
    State(transport): State<Transport>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let result = search(&state, &headers, body).await;
    let outcome = match &result {
        Ok(_) => "ok",
        Err(e) => e.code(),
    };
    metrics::counter!(m::SEARCH_REQUESTS, label::TRANSPORT => transport.as_str(), label::OUTCOME => outcome)
        .increment(1);
    metrics::histogram!(m::SEARCH_SECONDS).record(started.elapsed().as_secs_f64());
    match result {
        Ok(response) => (StatusCode::OK, axum::Json(response)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn search(
    state: &IngressState,
    headers: &HeaderMap,
    body: Body,
) -> Result<SearchResponse, ApiError> {
    require_content_type(headers, false)?;
    let bytes = read_body(state, headers, body).await?;
    let request = parse_search(&bytes)?;
    let Some(service) = state.search() else {
        return Err(ApiError::Unavailable(
            "search is not available: the daemon is still starting".into(),
        ));
    };
    service.run(&request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(body: &str) -> Option<String> {
        match parse_search(body.as_bytes()) {
            Err(e) => e.field().map(str::to_string),
            Ok(r) => panic!("accepted {body}: {r:?}"),
        }
    }

    #[test]
    fn defaults_and_full_requests() {
        let r = parse_search(br#"{"query":"flights"}"#).unwrap();
        assert_eq!(r.k, DEFAULT_K);
        assert!(r.filter.is_empty());
        assert_eq!(r.ef_search, None);
        assert!(!r.exact);
        let r = parse_search(
            br#"{"query":"flights","k":3,"ef_search":200,"exact":true,
                 "filter":{"user_id":"u","channel":"web","since":"2024-05-01T00:00:00Z",
                           "until":"2024-05-02T00:00:00+02:00","metadata":{"a":[1]}}}"#,
        )
        .unwrap();
        assert_eq!(r.k, 3);
        assert_eq!(r.ef_search, Some(200));
        assert!(r.exact);
        assert_eq!(r.filter.user_id.as_deref(), Some("u"));
        assert_eq!(
            r.filter.until.map(|t| t.to_rfc3339()),
            Some("2024-05-01T22:00:00+00:00".to_string())
        );
        assert_eq!(r.filter.metadata, Some(serde_json::json!({"a": [1]})));
        // null is "not given".
        let r = parse_search(br#"{"query":"x","k":null,"filter":{"metadata":null}}"#).unwrap();
        assert_eq!(r.k, DEFAULT_K);
        assert!(r.filter.is_empty());
    }

    #[test]
    fn every_error_names_its_field() {
        assert_eq!(field_of(r#"{}"#).as_deref(), Some("query"));
        assert_eq!(field_of(r#"{"query":"  "}"#).as_deref(), Some("query"));
        assert_eq!(field_of(r#"{"query":5}"#).as_deref(), Some("query"));
        assert_eq!(field_of(r#"{"query":"x","k":0}"#).as_deref(), Some("k"));
        assert_eq!(field_of(r#"{"query":"x","k":101}"#).as_deref(), Some("k"));
        assert_eq!(field_of(r#"{"query":"x","k":2.5}"#).as_deref(), Some("k"));
        assert_eq!(field_of(r#"{"query":"x","k":"3"}"#).as_deref(), Some("k"));
        assert_eq!(
            field_of(r#"{"query":"x","ef_search":1001}"#).as_deref(),
            Some("ef_search")
        );
        assert_eq!(
            field_of(r#"{"query":"x","filter":{"user_id":""}}"#).as_deref(),
            Some("filter.user_id")
        );
        assert_eq!(
            field_of(r#"{"query":"x","filter":{"since":"yesterday"}}"#).as_deref(),
            Some("filter.since")
        );
        assert_eq!(
            field_of(
                r#"{"query":"x","filter":{"since":"2024-05-02T00:00:00Z","until":"2024-05-01T00:00:00Z"}}"#
            )
            .as_deref(),
            Some("filter.until")
        );
        assert_eq!(
            field_of(r#"{"query":"x","filter":{"metadata":[1]}}"#).as_deref(),
            Some("filter.metadata")
        );
        assert_eq!(
            field_of(r#"{"query":"x","filter":{"colour":"red"}}"#).as_deref(),
            Some("filter.colour")
        );
        assert_eq!(field_of(r#"{"query":"x","top":3}"#).as_deref(), Some("top"));
        let long = format!(r#"{{"query":"{}"}}"#, "a".repeat(MAX_QUERY_BYTES + 1));
        assert_eq!(field_of(&long).as_deref(), Some("query"));
    }

    /// The six characters `\u0000` (JSON `"\\u0000"`) are text like any
    /// other; a real NUL (JSON `"\u0000"`) is refused naming where it is.
    #[test]
    fn only_a_real_nul_in_the_metadata_filter_is_refused() {
        for body in [
            r#"{"query":"x","filter":{"metadata":{"path":"C:\\u0000"}}}"#,
            r#"{"query":"x","filter":{"metadata":{"\\u0000":["\\u0000"]}}}"#,
        ] {
            let r = parse_search(body.as_bytes()).unwrap();
            let text = r.filter.metadata.unwrap().to_string();
            assert!(text.contains(r"\\u0000"), "{text}");
        }
        assert_eq!(
            field_of(r#"{"query":"x","filter":{"metadata":{"a":[1,"b\u0000"]}}}"#).as_deref(),
            Some("filter.metadata.a[1]")
        );
        assert_eq!(
            field_of(r#"{"query":"x","filter":{"metadata":{"k\u0000":1}}}"#).as_deref(),
            Some("filter.metadata.k\u{0}")
        );
        let e = parse_search(br#"{"query":"x","filter":{"metadata":{"a":"\u0000"}}}"#).unwrap_err();
        assert!(e.message().contains("NUL"), "{e:?}");
    }

    #[test]
    fn broken_json_is_not_a_field_error() {
        let e = parse_search(b"{\"query\": ").unwrap_err();
        assert_eq!(e.code(), "invalid_json");
        // A body that is not an object is no field (an array used to be
        // read as the fields in order, `["x", 0]` refused as `k`).
        for body in [
            r#"["flights", 3]"#,
            r#"["x", 0]"#,
            "5",
            "true",
            r#""x""#,
            "null",
        ] {
            let e = parse_search(body.as_bytes()).unwrap_err();
            assert_eq!(
                (e.code(), e.field()),
                ("invalid_json", None),
                "{body}: {e:?}"
            );
        }
        let e = parse_search(br#"{"query":"x"} trailing"#).unwrap_err();
        assert_eq!(e.code(), "invalid_json");
    }
}
