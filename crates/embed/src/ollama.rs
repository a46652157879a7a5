//! The Ollama backend: `POST /api/embed` with array input, and a start-up
//! probe of the model through `/api/version` and `/api/show`
//! (`shared/reference/embedding-apis.md` §1, §5, §8).
//!
//! Every embed call sends `"truncate": false`: convstore chunks texts to fit
//! the model's context itself, so an input that is still too long is a bug
//! that must fail loudly (400 → [`EmbedError::Rejected`]) rather than be
//! embedded silently cut.
//!
//! Statuses map to [`EmbedError`] by what the caller should do next:
//!
//! | answer | error |
//! |---|---|
//! | 400, 413, 422 | `Rejected`: one of the inputs is at fault, do not retry as is |
//! | 404, 501 | `ModelUnavailable`: not pulled / cannot embed; an operator must act |
//! | 401, 403, 405 | `ModelUnavailable`: the URL or access is wrong; an operator must act |
//! | 408, 425, 429, 499, other 5xx | `Transient`, with `Retry-After` (seconds) when sent |
//! | connection refused / reset | `Unreachable` |
//! | no answer within the timeout | `Timeout` |
//! | anything else, or a body that is not the protocol | `Protocol` |
//! | vectors that fail [`check_vectors`] (count, dimension, NaN, zero) | `Protocol` / `DimensionMismatch` |
//! | an answer longer than `max_response_bytes` | `Protocol` |

use std::time::Duration;

use async_trait::async_trait;
use reqwest::{Client, StatusCode, Url};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{ClientConfig, EmbedError, Embedder, ModelInfo};
use crate::answer::check_vectors;
use crate::response::read_answer;

/// The text embedded to learn the dimension when `/api/show` does not say.
const PROBE_TEXT: &str = "convstore dimension probe";
/// Longest part of an unexpected body quoted in an error message.
const MAX_QUOTED_BODY: usize = 200;

/// One Ollama server serving one model.
#[derive(Debug, Clone)]
pub struct OllamaBackend {
    name: String,
    model: String,
    timeout: Duration,
    /// `embedding.dimensions`, which every embedded vector must have.
    dimensions: usize,
    max_response_bytes: u64,
    client: Client,
    version_url: Url,
    show_url: Url,
    embed_url: Url,
}

#[derive(Debug, Serialize)]
struct EmbedRequest<'a> {
    model: &'a str,
    input: &'a [String],
    truncate: bool,
}

#[derive(Debug, Deserialize)]
struct EmbedResponse {
    embeddings: Vec<Vec<f32>>,
}

#[derive(Debug, Serialize)]
struct ShowRequest<'a> {
    model: &'a str,
}

impl OllamaBackend {
    /// A client for the Ollama server at `base_url` (e.g.
    /// `http://127.0.0.1:11434`, or a path prefix behind a proxy), embedding
    /// with `model`, within `config`'s timeout and answer size.
    ///
    /// Fails (as `ModelUnavailable`: an operator must fix the configuration)
    /// only if `base_url` is not an http(s) URL.
    pub fn new(
        name: impl Into<String>,
        base_url: &str,
        model: impl Into<String>,
        config: ClientConfig,
    ) -> Result<Self, EmbedError> {
        let ClientConfig {
            timeout,
            dimensions,
            max_response_bytes,
        } = config;
        let name = name.into();
        let config_error = |why: String| {
            EmbedError::ModelUnavailable(format!(
                "backend `{name}`: invalid URL `{base_url}`: {why}"
            ))
        };
        let base = Url::parse(base_url).map_err(|e| config_error(e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(config_error("not an http:// URL".into()));
        }
        // Join onto the base path as a directory, so `http://host/ollama`
        // gives `http://host/ollama/api/embed`, not `http://host/api/embed`.
        let endpoint = |path: &str| {
            let joined = format!("{}/{path}", base.as_str().trim_end_matches('/'));
            Url::parse(&joined).map_err(|e| config_error(e.to_string()))
        };
        let client = Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| config_error(format!("cannot build an HTTP client: {e}")))?;
        Ok(Self {
            version_url: endpoint("api/version")?,
            show_url: endpoint("api/show")?,
            embed_url: endpoint("api/embed")?,
            name,
            model: model.into(),
            timeout,
            dimensions,
            max_response_bytes,
            client,
        })
    }

    /// The reqwest error as an `EmbedError`.
    fn transport_error(&self, e: &reqwest::Error) -> EmbedError {
        if e.is_timeout() {
            EmbedError::Timeout(self.timeout)
        } else if e.is_decode() {
            EmbedError::Protocol(format!("backend `{}`: {e}", self.name))
        } else {
            // Connect errors, and connections dropped mid-answer: the
            // server is not (or no longer) there.
            EmbedError::Unreachable(format!("backend `{}`: {}", self.name, chain(e)))
        }
    }

    /// Sends `request` and reads the whole answer, body included, within
    /// the timeout and `max_response_bytes`.
    async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<(StatusCode, Option<Duration>, Vec<u8>), EmbedError> {
        let response = request
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| self.transport_error(&e))?;
        let answer = read_answer(&self.name, response, self.max_response_bytes, |e| {
            self.transport_error(e)
        })
        .await?;
        Ok((answer.status, answer.retry_after, answer.body))
    }

    /// The error for a non-200 answer to `what`.
    fn status_error(
        &self,
        what: &str,
        status: StatusCode,
        retry_after: Option<Duration>,
        body: &[u8],
    ) -> EmbedError {
        let message = error_message(body);
        let code = status.as_u16();
        match code {
            400 | 413 | 422 => EmbedError::refused(code, message),
            404 => EmbedError::ModelUnavailable(format!(
                "backend `{}` has no model `{}` ({message}); run `ollama pull {}` on it",
                self.name, self.model, self.model
            )),
            501 => EmbedError::ModelUnavailable(format!(
                "backend `{}`: model `{}` cannot embed ({message}); configure an embedding model",
                self.name, self.model
            )),
            401 | 403 | 405 => EmbedError::ModelUnavailable(format!(
                "backend `{}` refused {what} with HTTP {code} ({message}); check its URL and access",
                self.name
            )),
            408 | 425 | 429 | 499 => EmbedError::Transient {
                status: code,
                message,
                retry_after,
            },
            _ if status.is_server_error() => EmbedError::Transient {
                status: code,
                message,
                retry_after,
            },
            _ => EmbedError::Protocol(format!(
                "backend `{}` answered {what} with HTTP {code}: {message}",
                self.name
            )),
        }
    }

    /// Reads the dimension and context length out of an `/api/show` answer,
    /// after checking the model can embed.
    fn read_show(&self, body: &[u8]) -> Result<(Option<usize>, Option<usize>), EmbedError> {
        let show: Value = serde_json::from_slice(body).map_err(|e| {
            EmbedError::Protocol(format!(
                "backend `{}`: /api/show answer is not JSON: {e}",
                self.name
            ))
        })?;
        if let Some(capabilities) = show.get("capabilities").and_then(Value::as_array) {
            let can_embed = capabilities.iter().any(|c| c.as_str() == Some("embedding"));
            if !can_embed {
                return Err(EmbedError::ModelUnavailable(format!(
                    "backend `{}`: `{}` is not an embedding model (capabilities: {}); \
                     configure an embedding model such as nomic-embed-text",
                    self.name,
                    self.model,
                    Value::Array(capabilities.clone())
                )));
            }
        }
        let empty = Map::new();
        let info = show
            .get("model_info")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let dimensions = model_info_number(info, "embedding_length");
        let mut context_length = model_info_number(info, "context_length");
        // A Modelfile may cap the context below what the model was trained
        // for (mxbai-embed-large sets num_ctx 512); Ollama then cuts there.
        if let Some(num_ctx) = show
            .get("parameters")
            .and_then(Value::as_str)
            .and_then(parameter_num_ctx)
        {
            context_length = Some(context_length.map_or(num_ctx, |c| c.min(num_ctx)));
        }
        Ok((dimensions, context_length))
    }

    /// `POST /api/embed`; the vectors must be `dimensions` long when given.
    async fn embed_any(
        &self,
        inputs: &[String],
        dimensions: Option<usize>,
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        if inputs.is_empty() {
            // Ollama would answer `[]` after loading the model: nothing to
            // ask.
            return Ok(Vec::new());
        }
        let request = self
            .client
            .post(self.embed_url.clone())
            .json(&EmbedRequest {
                model: &self.model,
                input: inputs,
                truncate: false,
            });
        let (status, retry_after, body) = self.send(request).await?;
        if status != StatusCode::OK {
            return Err(self.status_error("/api/embed", status, retry_after, &body));
        }
        let response: EmbedResponse = serde_json::from_slice(&body).map_err(|e| {
            EmbedError::Protocol(format!(
                "backend `{}`: /api/embed answer is not {{\"embeddings\": [[number]]}}: {e}",
                self.name
            ))
        })?;
        check_vectors(&self.name, inputs.len(), dimensions, &response.embeddings)?;
        Ok(response.embeddings)
    }
}

#[async_trait]
impl Embedder for OllamaBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn model(&self) -> &str {
        &self.model
    }

    /// `/api/version` (is the server there?), then `/api/show` (is the
    /// model pulled, can it embed, how long are its vectors and its
    /// context?). If `/api/show` does not give the dimension, one probe text
    /// is embedded to measure it.
    async fn probe(&self) -> Result<ModelInfo, EmbedError> {
        let (status, retry_after, body) =
            self.send(self.client.get(self.version_url.clone())).await?;
        if status == StatusCode::NOT_FOUND {
            // Not "model missing": there is no Ollama at this URL at all.
            return Err(EmbedError::ModelUnavailable(format!(
                "backend `{}` answered 404 to {}: is this an Ollama server? check its url",
                self.name, self.version_url
            )));
        }
        if status != StatusCode::OK {
            return Err(self.status_error("/api/version", status, retry_after, &body));
        }
        let version = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v.get("version").and_then(Value::as_str).map(str::to_owned));
        tracing::debug!(backend = %self.name, version = ?version, "Ollama answered");

        let show = self
            .client
            .post(self.show_url.clone())
            .json(&ShowRequest { model: &self.model });
        let (status, retry_after, body) = self.send(show).await?;
        if status != StatusCode::OK {
            return Err(self.status_error("/api/show", status, retry_after, &body));
        }
        let (dimensions, context_length) = self.read_show(&body)?;
        let dimensions = match dimensions {
            Some(d) => d,
            None => {
                // Any dimension: a wrong one is the health check's to
                // report (the backend is refused), not a failed probe.
                let vectors = self.embed_any(&[PROBE_TEXT.to_string()], None).await?;
                vectors.first().map_or(0, Vec::len)
            }
        };
        if dimensions == 0 {
            return Err(EmbedError::Protocol(format!(
                "backend `{}`: model `{}` reports 0-dimensional vectors",
                self.name, self.model
            )));
        }
        Ok(ModelInfo {
            dimensions,
            context_length,
        })
    }

    async fn embed(&self, inputs: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        self.embed_any(inputs, Some(self.dimensions)).await
    }
}

/// `model_info["<arch>.<key>"]` where `<arch>` is
/// `model_info["general.architecture"]`; failing that, the first key ending
/// in `.<key>` (keys come sorted, so the choice is stable).
fn model_info_number(info: &Map<String, Value>, key: &str) -> Option<usize> {
    let as_usize = |v: &Value| v.as_u64().and_then(|n| usize::try_from(n).ok());
    let by_arch = info
        .get("general.architecture")
        .and_then(Value::as_str)
        .and_then(|arch| info.get(&format!("{arch}.{key}")))
        .and_then(as_usize);
    by_arch.or_else(|| {
        let suffix = format!(".{key}");
        info.iter()
            .filter(|(k, _)| k.ends_with(&suffix))
            .find_map(|(_, v)| as_usize(v))
    })
}

/// `num_ctx` from `/api/show`'s `parameters`, a text of `name value` lines.
fn parameter_num_ctx(parameters: &str) -> Option<usize> {
    parameters.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("num_ctx"), Some(n)) => n.parse().ok().filter(|&n: &usize| n > 0),
            _ => None,
        }
    })
}

/// The message of an error answer: Ollama's `{"error": "..."}`, the
/// OpenAI-style `{"error": {"message": "..."}}` a proxy may send, or the
/// start of the body as text.
pub(crate) fn error_message(body: &[u8]) -> String {
    if let Ok(value) = serde_json::from_slice::<Value>(body) {
        let error = value.get("error");
        if let Some(message) = error
            .and_then(Value::as_str)
            .or_else(|| error.and_then(|e| e.get("message")).and_then(Value::as_str))
        {
            return message.to_string();
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return "no message".into();
    }
    match text.char_indices().nth(MAX_QUOTED_BODY) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

/// An error with its sources, which is where reqwest puts "connection
/// refused".
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::http::StatusCode as AxumStatus;
    use axum::routing::{get, post};
    use serde_json::json;

    use super::*;
    use convstore_standin::{
        self as standin, FaultsUpdate, SpawnedStandin, StandinConfig, standin_vector,
    };

    const TIMEOUT: Duration = Duration::from_secs(10);
    /// The stand-in's default model's (nomic-embed-text's).
    const DIMS: usize = 768;

    fn config(timeout: Duration) -> ClientConfig {
        ClientConfig {
            timeout,
            dimensions: DIMS,
            max_response_bytes: crate::response::DEFAULT_MAX_RESPONSE_BYTES,
        }
    }

    async fn standin(config: StandinConfig) -> SpawnedStandin {
        standin::spawn(config)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn backend(url: &str, model: &str) -> OllamaBackend {
        OllamaBackend::new("test", url, model, config(TIMEOUT)).unwrap_or_else(|e| panic!("{e}"))
    }

    fn texts(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    /// Serves a hand-written router, for answers the stand-in never gives.
    async fn fake(router: Router) -> (String, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let url = format!(
            "http://{}",
            listener.local_addr().unwrap_or_else(|e| panic!("{e}"))
        );
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        (url, task)
    }

    #[tokio::test]
    async fn probe_reads_dimension_and_context() {
        let s = standin(StandinConfig::default()).await;
        let info = backend(&s.url(), "nomic-embed-text").probe().await;
        assert_eq!(
            info.ok(),
            Some(ModelInfo {
                dimensions: 768,
                context_length: Some(2048)
            })
        );
        let other = standin(StandinConfig {
            model: "all-minilm".into(),
            architecture: "bert".into(),
            dimensions: 384,
            context_length: 512,
            ..StandinConfig::default()
        })
        .await;
        let info = backend(&other.url(), "all-minilm:latest").probe().await;
        assert_eq!(
            info.ok(),
            Some(ModelInfo {
                dimensions: 384,
                context_length: Some(512)
            })
        );
        let stats = other.standin.stats();
        assert_eq!(
            (stats.calls.version, stats.calls.show, stats.calls.embed),
            (1, 1, 0)
        );
    }

    #[tokio::test]
    async fn probe_tells_the_operator_to_pull_a_missing_model() {
        let s = standin(StandinConfig::default()).await;
        match backend(&s.url(), "mxbai-embed-large").probe().await {
            Err(EmbedError::ModelUnavailable(m)) => {
                assert!(m.contains("ollama pull mxbai-embed-large"), "{m}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn probe_refuses_a_chat_model() {
        let s = standin(StandinConfig {
            capabilities: Some(vec!["completion".into()]),
            ..StandinConfig::default()
        })
        .await;
        match backend(&s.url(), "nomic-embed-text").probe().await {
            Err(EmbedError::ModelUnavailable(m)) => {
                assert!(m.contains("not an embedding model"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        // No capabilities field at all (old Ollama): trusted.
        let old = standin(StandinConfig {
            capabilities: None,
            ..StandinConfig::default()
        })
        .await;
        assert!(
            backend(&old.url(), "nomic-embed-text")
                .probe()
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn probe_falls_back_to_key_scan_then_to_a_probe_embedding() {
        // No general.architecture: scan for *.embedding_length; parameters
        // cap the context.
        let router = Router::new()
            .route(
                "/api/version",
                get(|| async { axum::Json(json!({"version": "0.12.6"})) }),
            )
            .route(
                "/api/show",
                post(|| async {
                    axum::Json(json!({
                        "parameters": "num_ctx                        512\nstop \"x\"",
                        "model_info": {"bert.embedding_length": 1024, "bert.context_length": 8192},
                        "capabilities": ["embedding"]
                    }))
                }),
            );
        let (url, _task) = fake(router).await;
        let info = backend(&url, "m").probe().await;
        assert_eq!(
            info.ok(),
            Some(ModelInfo {
                dimensions: 1024,
                context_length: Some(512)
            })
        );

        // No model_info at all: embed a probe text and measure it.
        let router = Router::new()
            .route(
                "/api/version",
                get(|| async { axum::Json(json!({"version": "0.5.7"})) }),
            )
            .route(
                "/api/show",
                post(|| async { axum::Json(json!({"details": {}})) }),
            )
            .route(
                "/api/embed",
                post(|| async {
                    axum::Json(json!({"model": "m", "embeddings": [[0.6, 0.8, 0.0]]}))
                }),
            );
        let (url, _task) = fake(router).await;
        let info = backend(&url, "m").probe().await;
        assert_eq!(
            info.ok(),
            Some(ModelInfo {
                dimensions: 3,
                context_length: None
            })
        );
    }

    #[tokio::test]
    async fn embed_returns_the_standins_vectors_in_order() {
        let s = standin(StandinConfig::default()).await;
        let b = backend(&s.url(), "nomic-embed-text");
        let inputs = texts(&["first", "second text", "first", "ünïcödé"]);
        let vectors = b.embed(&inputs).await.unwrap_or_else(|e| panic!("{e}"));
        let expected: Vec<Vec<f32>> = inputs.iter().map(|t| standin_vector(t, 768)).collect();
        assert_eq!(vectors, expected, "bit-for-bit after the JSON round trip");
        assert_eq!(b.embed(&[]).await.ok(), Some(Vec::new()));
        let stats = s.standin.stats();
        assert_eq!(
            (stats.calls.embed, stats.embedded),
            (1, 4),
            "an empty batch sends nothing"
        );
    }

    #[tokio::test]
    async fn embed_with_a_base_path() {
        // Behind a proxy at /ollama/: the endpoints hang below it.
        let s = standin(StandinConfig::default()).await;
        let proxy = Router::new().nest_service("/ollama", s.standin.router());
        let (url, _task) = fake(proxy).await;
        for base in [format!("{url}/ollama"), format!("{url}/ollama/")] {
            let b = backend(&base, "nomic-embed-text");
            assert!(b.probe().await.is_ok(), "{base}");
            assert_eq!(
                b.embed(&texts(&["x"])).await.ok(),
                Some(vec![standin_vector("x", 768)])
            );
        }
    }

    #[tokio::test]
    async fn over_long_input_is_rejected_not_truncated() {
        let s = standin(StandinConfig {
            context_length: 8,
            ..StandinConfig::default()
        })
        .await;
        let b = backend(&s.url(), "nomic-embed-text");
        match b
            .embed(&texts(&[
                "short",
                "one two three four five six seven eight",
            ]))
            .await
        {
            Err(EmbedError::TooLong {
                status: 400,
                message,
            }) => {
                assert!(message.contains("context length"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.standin.stats().outcomes.too_long, 1);
    }

    #[tokio::test]
    async fn poison_is_rejected() {
        let s = standin(StandinConfig {
            poison: vec!["\u{0}POISON".into()],
            ..StandinConfig::default()
        })
        .await;
        let b = backend(&s.url(), "nomic-embed-text");
        let result = b.embed(&texts(&["fine", "x\u{0}POISONx"])).await;
        assert!(
            matches!(result, Err(EmbedError::Rejected { status: 400, .. })),
            "{result:?}"
        );
        assert!(result.is_err_and(|e| !e.is_retryable()));
    }

    #[tokio::test]
    async fn injected_failures_are_transient_with_retry_after() {
        let s = standin(StandinConfig {
            failure_every: 1,
            failure_status: 503,
            retry_after_secs: Some(2),
            ..StandinConfig::default()
        })
        .await;
        let b = backend(&s.url(), "nomic-embed-text");
        match b.embed(&texts(&["a"])).await {
            Err(
                e @ EmbedError::Transient {
                    status: 503,
                    retry_after: Some(d),
                    ..
                },
            ) => {
                assert_eq!(d, Duration::from_secs(2));
                assert!(e.is_retryable());
            }
            other => panic!("{other:?}"),
        }
        for (status, expected) in [(500, 500), (429, 429), (499, 499)] {
            s.standin
                .set_faults(FaultsUpdate {
                    failure_status: Some(status),
                    retry_after_secs: Some(0),
                    ..Default::default()
                })
                .unwrap_or_else(|e| panic!("{e}"));
            match b.embed(&texts(&["a"])).await {
                Err(EmbedError::Transient {
                    status,
                    retry_after: None,
                    ..
                }) => assert_eq!(status, expected),
                other => panic!("{status}: {other:?}"),
            }
        }
        // Down: 503 for every route, the probe included.
        s.standin
            .set_faults(FaultsUpdate {
                failure_every: Some(0),
                down: Some(true),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            b.probe().await,
            Err(EmbedError::Transient { status: 503, .. })
        ));
        assert!(matches!(
            b.embed(&texts(&["a"])).await,
            Err(EmbedError::Transient { status: 503, .. })
        ));
    }

    #[tokio::test]
    async fn missing_model_on_embed_is_model_unavailable() {
        let s = standin(StandinConfig::default()).await;
        let b = backend(&s.url(), "gone");
        assert!(matches!(
            b.embed(&texts(&["a"])).await,
            Err(EmbedError::ModelUnavailable(_))
        ));
    }

    #[tokio::test]
    async fn a_stopped_server_is_unreachable() {
        let s = standin(StandinConfig::default()).await;
        let url = s.url();
        let b = backend(&url, "nomic-embed-text");
        assert!(b.embed(&texts(&["a"])).await.is_ok());
        s.stop().await.unwrap_or_else(|e| panic!("{e}"));
        for result in [
            b.embed(&texts(&["a"])).await.map(|_| ()),
            b.probe().await.map(|_| ()),
        ] {
            match result {
                Err(e @ EmbedError::Unreachable(_)) => assert!(e.is_retryable()),
                other => panic!("{other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_slow_server_times_out() {
        let s = standin(StandinConfig {
            latency_per_request: Duration::from_secs(30),
            ..StandinConfig::default()
        })
        .await;
        let b = OllamaBackend::new(
            "slow",
            &s.url(),
            "nomic-embed-text",
            config(Duration::from_millis(200)),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        match b.embed(&texts(&["a"])).await {
            Err(EmbedError::Timeout(d)) => assert_eq!(d, Duration::from_millis(200)),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn protocol_violations() {
        let router = Router::new()
            .route(
                "/count/api/embed",
                post(|| async { axum::Json(json!({"embeddings": [[1.0]]})) }),
            )
            .route(
                "/ragged/api/embed",
                post(|| async { axum::Json(json!({"embeddings": [[1.0, 0.0], [1.0]]})) }),
            )
            .route("/text/api/embed", post(|| async { "not json" }))
            .route(
                "/empty/api/embed",
                post(|| async { axum::Json(json!({"embeddings": [[], []]})) }),
            )
            .route(
                "/shape/api/embed",
                post(|| async { axum::Json(json!({"embedding": [1.0, 0.0]})) }),
            )
            .route(
                "/teapot/api/embed",
                post(|| async { (AxumStatus::IM_A_TEAPOT, "<html>short and stout</html>") }),
            )
            .route(
                "/chat/api/embed",
                post(|| async {
                    (
                        AxumStatus::NOT_IMPLEMENTED,
                        axum::Json(json!({"error": "This server does not support embeddings."})),
                    )
                }),
            );
        let (url, _task) = fake(router).await;
        let two = texts(&["a", "b"]);
        for path in ["count", "ragged", "text", "empty", "shape", "teapot"] {
            let result = backend(&format!("{url}/{path}"), "m").embed(&two).await;
            assert!(
                matches!(result, Err(EmbedError::Protocol(_))),
                "{path}: {result:?}"
            );
        }
        let result = backend(&format!("{url}/chat"), "m").embed(&two).await;
        assert!(
            matches!(result, Err(EmbedError::ModelUnavailable(_))),
            "{result:?}"
        );
    }

    /// Ollama's `normalize` leaves an all-zero vector all zero, so a
    /// broken model gets one through; a number too big for `f32` parses
    /// as infinity. Both are that backend's failure, never stored.
    #[tokio::test]
    async fn zero_and_non_finite_vectors_are_backend_errors() {
        let zeros = json!({"embeddings": [vec![0.6f32; DIMS], vec![0.0f32; DIMS]]});
        let mut huge = vec![json!(0.5); DIMS];
        huge[7] = json!(1e39);
        let huge = json!({"embeddings": [huge]});
        let router = Router::new()
            .route(
                "/zero/api/embed",
                post(move || {
                    let zeros = zeros.clone();
                    async move { axum::Json(zeros) }
                }),
            )
            .route(
                "/huge/api/embed",
                post(move || {
                    let huge = huge.clone();
                    async move { axum::Json(huge) }
                }),
            );
        let (url, _task) = fake(router).await;
        match backend(&format!("{url}/zero"), "m")
            .embed(&texts(&["a", "b"]))
            .await
        {
            Err(EmbedError::Protocol(m)) => {
                assert!(m.contains("backend `test`"), "{m}");
                assert!(m.contains("zero vector (input 1)"), "{m}");
            }
            other => panic!("{other:?}"),
        }
        match backend(&format!("{url}/huge"), "m")
            .embed(&texts(&["a"]))
            .await
        {
            Err(EmbedError::Protocol(m)) => {
                assert!(m.contains("NaN or infinite values (input 0)"), "{m}")
            }
            other => panic!("{other:?}"),
        }
    }

    /// A vector of another length than `embedding.dimensions` fails the
    /// call; the probe still measures it, for the health check to refuse
    /// the backend by name.
    #[tokio::test]
    async fn embed_checks_the_configured_dimension_probe_measures_any() {
        let s = standin(StandinConfig {
            dimensions: 384,
            ..StandinConfig::default()
        })
        .await;
        let b = backend(&s.url(), "nomic-embed-text");
        assert!(matches!(
            b.embed(&texts(&["a"])).await,
            Err(EmbedError::DimensionMismatch {
                expected: DIMS,
                got: 384
            })
        ));
        assert_eq!(b.probe().await.ok().map(|i| i.dimensions), Some(384));
    }

    #[tokio::test]
    async fn an_answer_over_max_response_bytes_is_a_backend_error() {
        use crate::response::flood::{self, FLOOD_BYTES, Framing};
        for framing in [Framing::ContentLength, Framing::Chunked] {
            let (url, server) = flood::serve(framing).await;
            let b = OllamaBackend::new(
                "flooder",
                &url,
                "m",
                ClientConfig {
                    max_response_bytes: 1 << 20,
                    ..config(TIMEOUT)
                },
            )
            .unwrap_or_else(|e| panic!("{e}"));
            let result = b.embed(&texts(&["a"])).await;
            drop(b);
            let sent = server.await.unwrap_or_else(|e| panic!("{e}"));
            match result {
                Err(EmbedError::Protocol(m)) => {
                    assert!(m.contains("backend `flooder`"), "{framing:?}: {m}");
                    assert!(
                        m.contains("max_response_bytes = 1048576"),
                        "{framing:?}: {m}"
                    );
                }
                other => panic!("{framing:?}: {other:?}"),
            }
            assert!(sent.cut_short, "{framing:?}: {sent:?}");
            assert!(sent.body_bytes < FLOOD_BYTES / 4, "{framing:?}: {sent:?}");
        }
    }

    #[tokio::test]
    async fn not_an_ollama_server() {
        let (url, _task) = fake(Router::new()).await;
        match backend(&url, "m").probe().await {
            Err(EmbedError::ModelUnavailable(m)) => {
                assert!(m.contains("is this an Ollama server"), "{m}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_urls_are_refused() {
        for url in ["", "not a url", "ftp://host/", "mailto:someone@example.com"] {
            assert!(
                matches!(
                    OllamaBackend::new("b", url, "m", config(TIMEOUT)),
                    Err(EmbedError::ModelUnavailable(_))
                ),
                "{url}"
            );
        }
    }

    #[test]
    fn helpers() {
        use crate::response::parse_retry_after;
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(error_message(br#"{"error":"boom"}"#), "boom");
        assert_eq!(
            error_message(br#"{"error":{"message":"nested","type":"x"}}"#),
            "nested"
        );
        assert_eq!(error_message(b""), "no message");
        assert_eq!(
            error_message(&[b'x'; 500]).chars().count(),
            MAX_QUOTED_BODY + 1
        );
        assert_eq!(parameter_num_ctx("stop \"a\"\nnum_ctx 8192"), Some(8192));
        assert_eq!(parameter_num_ctx("num_ctx zero"), None);
    }
}
