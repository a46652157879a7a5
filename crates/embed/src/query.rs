//! The query lane: embeds search queries apart from ingest.
//!
//! A search is a person or an agent waiting; ingest is a queue that can
//! wait. If queries went through the pipeline's router they would queue
//! behind every batch waiting for a backend's in-flight slots (first come,
//! first served, see [`super::router::limit`]). So search gets its own
//! router over the same backends ([`search_specs`]): its own in-flight slots
//! per backend (`search.backend_in_flight`), its own breakers and retry
//! deadline, its own metric series (backend names get a `:search` suffix).
//! The builtin backend gets its own inference threads too, sharing the loaded
//! weights. What no client-side lane can change: a server such as Ollama
//! that computes one request at a time still finishes the request it is
//! running before it starts the query.
//!
//! The query is embedded with the model's query prefix
//! ([`super::prefix::query`]) and looked up in, then added to, the L1 cache
//! the pipeline uses. Under the same key as a document only when the model
//! embeds queries and documents alike (no prefix, or the same one); under a
//! `model#query` key otherwise, so a query never gets a document's vector.
//! Queries do not use the L2 table: a lookup there costs a database round
//! trip on every miss, and one-off query texts would fill a table every
//! instance shares.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::cache::{CacheKey, EmbeddingCache};
use super::router::{BackendSpec, Router, RouterConfig};
use super::{EmbedError, Embedder, ModelInfo, TokenCounter, prefix};
use crate::settings::{BackendSettings, EmbeddingSettings};
use convstore_core::model::content_hash;

/// A query's vector and where it came from.
#[derive(Debug, Clone)]
pub struct QueryVector {
    pub vector: Arc<[f32]>,
    /// Found in the L1 cache (no backend call).
    pub cached: bool,
}

/// Embeds search queries; see the module docs.
pub struct QueryEmbedder {
    embedder: Arc<dyn Embedder>,
    cache: Arc<EmbeddingCache>,
    model: Arc<str>,
    /// The cache's model key for queries.
    cache_model: Arc<str>,
    dimensions: usize,
}

impl QueryEmbedder {
    /// `embedder`: the search lane's router; `cache`: the pipeline's L1.
    pub fn new(
        embedder: Arc<dyn Embedder>,
        cache: Arc<EmbeddingCache>,
        model: &str,
        dimensions: usize,
    ) -> Self {
        let p = prefix::prefixes(model);
        let cache_model: Arc<str> = if p.query == p.document {
            Arc::from(model)
        } else {
            Arc::from(format!("{model}#query"))
        };
        Self {
            embedder,
            cache,
            model: Arc::from(model),
            cache_model,
            dimensions,
        }
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    /// The query's vector: from the cache, or from a backend (then cached).
    pub async fn embed(&self, query: &str) -> Result<QueryVector, EmbedError> {
        let key = CacheKey {
            model: self.cache_model.clone(),
            hash: content_hash(query),
        };
        if let Some(vector) = self.cache.get(&key) {
            return Ok(QueryVector {
                vector,
                cached: true,
            });
        }
        let text = prefix::query(&self.model, query).into_owned();
        let mut vectors = self.embedder.embed(&[text]).await?;
        let vector = match (vectors.pop(), vectors.is_empty()) {
            (Some(v), true) => v,
            _ => {
                return Err(EmbedError::Protocol(
                    "asked for one query vector, got another number".into(),
                ));
            }
        };
        if vector.len() != self.dimensions {
            return Err(EmbedError::DimensionMismatch {
                expected: self.dimensions,
                got: vector.len(),
            });
        }
        let vector: Arc<[f32]> = Arc::from(vector);
        self.cache.insert(key, vector.clone());
        Ok(QueryVector {
            vector,
            cached: false,
        })
    }
}

/// The search lane's router. `clients`: one per configured backend, in
/// order, with its settings; the same clients ingest uses, except a builtin
/// backend's, which should be a copy with its own inference threads
/// (`convstore_embed_builtin::BuiltinBackend::with_own_threads`). Its retries
/// end at `search.timeout_ms`, not at `embedding.max_wait_ms`: a person is
/// waiting. `in_flight`: `search.backend_in_flight`.
pub fn search_router(
    embedding: &EmbeddingSettings,
    search_timeout: Duration,
    in_flight: usize,
    clients: Vec<(Arc<dyn Embedder>, &BackendSettings)>,
) -> Router {
    let mut config = RouterConfig::from_settings(embedding);
    config.retry.max_wait = search_timeout;
    let specs = search_specs(
        clients.into_iter().map(|(client, backend)| {
            (
                client,
                backend.weight.get(),
                Duration::from_millis(backend.timeout_ms.get()),
            )
        }),
        in_flight,
    );
    Router::new(config, specs)
}

/// Suffix of the search lane's backend names (metric labels, logs).
pub const SEARCH_SUFFIX: &str = ":search";

/// The search lane's backends: the same clients as ingest, renamed
/// `<name>:search`, each with `in_flight` slots of its own and the
/// backend's timeout. `clients` pairs each client with its weight and
/// timeout.
pub fn search_specs(
    clients: impl IntoIterator<Item = (Arc<dyn Embedder>, u32, Duration)>,
    in_flight: usize,
) -> Vec<BackendSpec> {
    clients
        .into_iter()
        .map(|(client, weight, timeout)| BackendSpec {
            client: Arc::new(Renamed::search(client)),
            weight,
            max_in_flight: in_flight.max(1),
            timeout,
            // One query per call, and few of them: not paced (ingest and
            // the backfill are, by the backend's own limits).
            max_batch_tokens: 0,
            pace: crate::router::pace::PaceConfig::default(),
        })
        .collect()
}

/// A client under another name; everything else passes through.
struct Renamed {
    inner: Arc<dyn Embedder>,
    name: String,
}

impl Renamed {
    fn search(inner: Arc<dyn Embedder>) -> Self {
        let name = format!("{}{SEARCH_SUFFIX}", inner.name());
        Self { inner, name }
    }
}

#[async_trait]
impl Embedder for Renamed {
    fn name(&self) -> &str {
        &self.name
    }

    fn model(&self) -> &str {
        self.inner.model()
    }

    async fn probe(&self) -> Result<ModelInfo, EmbedError> {
        self.inner.probe().await
    }

    async fn embed(&self, inputs: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        self.inner.embed(inputs).await
    }

    fn token_counter(&self) -> Option<Arc<dyn TokenCounter>> {
        self.inner.token_counter()
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroUsize;
    use std::sync::Mutex;

    use super::*;

    /// Records what it was asked to embed; answers fixed-length vectors.
    struct Recorder {
        seen: Mutex<Vec<String>>,
        dims: usize,
    }

    #[async_trait]
    impl Embedder for Recorder {
        fn name(&self) -> &str {
            "rec"
        }
        fn model(&self) -> &str {
            "m"
        }
        async fn probe(&self) -> Result<ModelInfo, EmbedError> {
            Ok(ModelInfo {
                dimensions: self.dims,
                context_length: None,
            })
        }
        async fn embed(&self, inputs: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
            self.seen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(inputs.iter().cloned());
            Ok(inputs.iter().map(|_| vec![1.0; self.dims]).collect())
        }
    }

    fn lane(model: &str, dims: usize) -> (QueryEmbedder, Arc<Recorder>, Arc<EmbeddingCache>) {
        let rec = Arc::new(Recorder {
            seen: Mutex::new(Vec::new()),
            dims,
        });
        let cache = Arc::new(EmbeddingCache::new(NonZeroUsize::new(8).unwrap()));
        let q = QueryEmbedder::new(rec.clone(), cache.clone(), model, 2);
        (q, rec, cache)
    }

    #[tokio::test]
    async fn prefixes_the_query_and_caches_it_apart_from_documents() {
        let (q, rec, cache) = lane("nomic-embed-text", 2);
        let first = q.embed("flights to Seattle").await.unwrap();
        assert!(!first.cached);
        let again = q.embed("flights to Seattle").await.unwrap();
        assert!(again.cached);
        assert_eq!(
            *rec.seen.lock().unwrap(),
            vec!["search_query: flights to Seattle".to_string()]
        );
        // The document key of the same text is not the query's.
        let doc_key = CacheKey {
            model: Arc::from("nomic-embed-text"),
            hash: content_hash("flights to Seattle"),
        };
        assert!(cache.get(&doc_key).is_none());
    }

    #[tokio::test]
    async fn a_model_without_prefixes_shares_document_vectors() {
        let (q, rec, cache) = lane("all-minilm", 2);
        cache.insert(
            CacheKey {
                model: Arc::from("all-minilm"),
                hash: content_hash("hello"),
            },
            Arc::from(vec![0.0f32, 1.0]),
        );
        let hit = q.embed("hello").await.unwrap();
        assert!(hit.cached);
        assert_eq!(&hit.vector[..], &[0.0, 1.0]);
        assert!(rec.seen.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_vector_of_the_wrong_length_is_an_error() {
        let (q, _, _) = lane("all-minilm", 3);
        match q.embed("x").await {
            Err(EmbedError::DimensionMismatch { expected, got }) => {
                assert_eq!((expected, got), (2, 3));
            }
            other => panic!("expected a dimension mismatch, got {other:?}"),
        }
    }

    #[test]
    fn search_backends_are_renamed_with_their_own_slots() {
        let rec: Arc<dyn Embedder> = Arc::new(Recorder {
            seen: Mutex::new(Vec::new()),
            dims: 2,
        });
        let specs = search_specs([(rec, 3, Duration::from_secs(1))], 2);
        assert_eq!(specs.len(), 1);
        assert_eq!(specs[0].client.name(), "rec:search");
        assert_eq!(specs[0].max_in_flight, 2);
        assert_eq!(specs[0].weight, 3);
    }
}
