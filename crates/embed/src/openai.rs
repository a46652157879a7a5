//! The OpenAI-compatible backend: `POST /v1/embeddings` (OpenAI itself,
//! Ollama's compatibility route, TEI, vLLM, LiteLLM...; reference
//! `shared/reference/embedding-apis.md` §3, §4).
//!
//! The base URL may name the API root with or without `/v1`
//! (`http://host:8080` and `http://host:8080/v1` both reach
//! `http://host:8080/v1/embeddings`), as OpenAI clients accept either.
//!
//! Vectors are asked for as `base64` by default (little-endian `f32` bytes:
//! about a third of the JSON floats' size and no float parsing) or `float`
//! (`encoding_format` in the backend's config). Either answer is decoded,
//! whatever was asked: servers that ignore the field (Ollama before 0.12.7)
//! answer floats.
//!
//! With `api_key_env`, the key is read from that environment variable once,
//! at start-up, and sent as `Authorization: Bearer`; it never appears in logs
//! or errors.
//!
//! This protocol has no model metadata, so [`Embedder::probe`] embeds one
//! short text and measures it; the context length stays unknown (chunks are
//! cut to `chunking.fallback_context_tokens` unless another backend says).
//! Statuses map to [`EmbedError`] as for Ollama (see [`super::ollama`]):
//! 400/413/422 → `Rejected`; 401/403/404/405/501 → `ModelUnavailable`;
//! 408/425/429/499/5xx → `Transient` with `Retry-After`; vectors failing
//! [`check_vectors`] and answers over `max_response_bytes` → `Protocol`
//! (`DimensionMismatch` for another dimension).

use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use reqwest::header::{AUTHORIZATION, HeaderValue};
use reqwest::{Client, StatusCode, Url};
use serde::{Deserialize, Serialize};

use super::ollama::{chain, error_message};
use super::{ClientConfig, EmbedError, Embedder, ModelInfo};
use crate::answer::check_vectors;
use crate::response::read_answer;
use crate::settings::EncodingFormat;

/// The text embedded to learn the dimension.
const PROBE_TEXT: &str = "convstore dimension probe";

/// One OpenAI-compatible server serving one model.
#[derive(Debug, Clone)]
pub struct OpenAiBackend {
    name: String,
    model: String,
    timeout: Duration,
    /// `embedding.dimensions`, which every embedded vector must have.
    dimensions: usize,
    max_response_bytes: u64,
    encoding: EncodingFormat,
    client: Client,
    embeddings_url: Url,
    /// `Bearer <key>`, marked sensitive so it is never printed.
    authorization: Option<HeaderValue>,
}

#[derive(Debug, Serialize)]
struct EmbeddingsRequest<'a> {
    model: &'a str,
    input: &'a [String],
    encoding_format: &'static str,
}

#[derive(Debug, Deserialize)]
struct EmbeddingsResponse {
    data: Vec<EmbeddingItem>,
}

#[derive(Debug, Deserialize)]
struct EmbeddingItem {
    #[serde(default)]
    index: Option<usize>,
    embedding: EmbeddingData,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum EmbeddingData {
    Float(Vec<f32>),
    Base64(String),
}

impl OpenAiBackend {
    /// A client for the server at `base_url`, embedding with `model`.
    /// `api_key` is the bearer key, if the server needs one; `config` gives
    /// the timeout and the answer size.
    ///
    /// Fails (as `ModelUnavailable`: an operator must fix the configuration)
    /// if `base_url` is not an http(s) URL or the key is not a valid header.
    pub fn new(
        name: impl Into<String>,
        base_url: &str,
        model: impl Into<String>,
        api_key: Option<&str>,
        encoding: EncodingFormat,
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
        let root = base.as_str().trim_end_matches('/');
        let joined = if root.ends_with("/v1") {
            format!("{root}/embeddings")
        } else {
            format!("{root}/v1/embeddings")
        };
        let embeddings_url = Url::parse(&joined).map_err(|e| config_error(e.to_string()))?;
        let authorization = match api_key {
            Some(key) => {
                let mut value = HeaderValue::from_str(&format!("Bearer {}", key.trim()))
                    .map_err(|_| {
                        EmbedError::ModelUnavailable(format!(
                            "backend `{name}`: the API key holds characters an HTTP header cannot carry"
                        ))
                    })?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        let client = Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| config_error(format!("cannot build an HTTP client: {e}")))?;
        Ok(Self {
            name,
            model: model.into(),
            timeout,
            dimensions,
            max_response_bytes,
            encoding,
            client,
            embeddings_url,
            authorization,
        })
    }

    fn transport_error(&self, e: &reqwest::Error) -> EmbedError {
        if e.is_timeout() {
            EmbedError::Timeout(self.timeout)
        } else if e.is_decode() {
            EmbedError::Protocol(format!("backend `{}`: {e}", self.name))
        } else {
            EmbedError::Unreachable(format!("backend `{}`: {}", self.name, chain(e)))
        }
    }

    fn status_error(
        &self,
        status: StatusCode,
        retry_after: Option<Duration>,
        body: &[u8],
    ) -> EmbedError {
        let message = error_message(body);
        let code = status.as_u16();
        match code {
            400 | 413 | 422 => EmbedError::refused(code, message),
            401 | 403 => EmbedError::ModelUnavailable(format!(
                "backend `{}` refused the key with HTTP {code} ({message}); check api_key_env and the key",
                self.name
            )),
            404 => EmbedError::ModelUnavailable(format!(
                "backend `{}` answered 404 for model `{}` at {} ({message}); check the model name and the url",
                self.name, self.model, self.embeddings_url
            )),
            405 | 501 => EmbedError::ModelUnavailable(format!(
                "backend `{}` does not serve embeddings at {} (HTTP {code}: {message}); check its url",
                self.name, self.embeddings_url
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
                "backend `{}` answered /v1/embeddings with HTTP {code}: {message}",
                self.name
            )),
        }
    }

    /// The vectors of a 200 answer, in input order, `dimensions` long when
    /// given.
    fn read_answer(
        &self,
        body: &[u8],
        inputs: usize,
        dimensions: Option<usize>,
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        let response: EmbeddingsResponse = serde_json::from_slice(body).map_err(|e| {
            EmbedError::Protocol(format!(
                "backend `{}`: /v1/embeddings answer is not {{\"data\": [{{\"embedding\": …}}]}}: {e}",
                self.name
            ))
        })?;
        let mut slots: Vec<Option<Vec<f32>>> = vec![None; response.data.len()];
        for (position, item) in response.data.into_iter().enumerate() {
            // The items carry their input's index; OpenAI sends them in
            // order, but nothing in the protocol promises it.
            let index = item.index.unwrap_or(position);
            let vector = match item.embedding {
                EmbeddingData::Float(v) => v,
                EmbeddingData::Base64(text) => decode_base64(&text).map_err(|why| {
                    EmbedError::Protocol(format!(
                        "backend `{}`: embedding {index} is not base64 of little-endian f32: {why}",
                        self.name
                    ))
                })?,
            };
            match slots.get_mut(index) {
                Some(slot @ None) => *slot = Some(vector),
                _ => {
                    return Err(EmbedError::Protocol(format!(
                        "backend `{}` returned embedding index {index} twice or out of range",
                        self.name
                    )));
                }
            }
        }
        let vectors: Vec<Vec<f32>> = slots.into_iter().flatten().collect();
        check_vectors(&self.name, inputs, dimensions, &vectors)?;
        Ok(vectors)
    }

    /// `POST /v1/embeddings`; the vectors must be `dimensions` long when
    /// given.
    async fn embed_any(
        &self,
        inputs: &[String],
        dimensions: Option<usize>,
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let mut request = self
            .client
            .post(self.embeddings_url.clone())
            .timeout(self.timeout)
            .json(&EmbeddingsRequest {
                model: &self.model,
                input: inputs,
                encoding_format: match self.encoding {
                    EncodingFormat::Base64 => "base64",
                    EncodingFormat::Float => "float",
                },
            });
        if let Some(auth) = &self.authorization {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        let response = request.send().await.map_err(|e| self.transport_error(&e))?;
        let answer = read_answer(&self.name, response, self.max_response_bytes, |e| {
            self.transport_error(e)
        })
        .await?;
        if answer.status != StatusCode::OK {
            return Err(self.status_error(answer.status, answer.retry_after, &answer.body));
        }
        self.read_answer(&answer.body, inputs.len(), dimensions)
    }
}

/// Little-endian `f32` values from standard base64 (padding optional).
pub fn decode_base64(text: &str) -> Result<Vec<f32>, String> {
    let bytes = STANDARD
        .decode(text.trim())
        .or_else(|_| {
            base64::engine::general_purpose::STANDARD_NO_PAD.decode(text.trim_end_matches('='))
        })
        .map_err(|e| e.to_string())?;
    if bytes.len() % 4 != 0 {
        return Err(format!(
            "{} bytes is not a whole number of f32",
            bytes.len()
        ));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

#[async_trait]
impl Embedder for OpenAiBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn model(&self) -> &str {
        &self.model
    }

    /// Embeds one short text: the protocol has no other way to learn the
    /// dimension or whether the key and model are right.
    async fn probe(&self) -> Result<ModelInfo, EmbedError> {
        // Any dimension: a wrong one is the health check's to report (the
        // backend is refused), not a failed probe.
        let vectors = self.embed_any(&[PROBE_TEXT.to_string()], None).await?;
        let dimensions = vectors.first().map_or(0, Vec::len);
        Ok(ModelInfo {
            dimensions,
            context_length: None,
        })
    }

    async fn embed(&self, inputs: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        self.embed_any(inputs, Some(self.dimensions)).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::Router;
    use axum::http::{HeaderMap, StatusCode as AxumStatus};
    use axum::routing::post;
    use serde_json::{Value, json};

    use super::*;
    use convstore_standin::openai_api::encode_base64;
    use convstore_standin::{self as standin, FaultsUpdate, StandinConfig, standin_vector};

    const TIMEOUT: Duration = Duration::from_secs(10);
    /// The stand-in's default model's (nomic-embed-text's).
    const DIMS: usize = 768;

    fn config(dimensions: usize) -> ClientConfig {
        ClientConfig {
            timeout: TIMEOUT,
            dimensions,
            max_response_bytes: crate::response::DEFAULT_MAX_RESPONSE_BYTES,
        }
    }

    fn texts(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn backend(url: &str, encoding: EncodingFormat, key: Option<&str>) -> OpenAiBackend {
        OpenAiBackend::new("oa", url, "nomic-embed-text", key, encoding, config(DIMS))
            .unwrap_or_else(|e| panic!("{e}"))
    }

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
    async fn float_and_base64_decode_to_the_standins_vectors() {
        let s = standin::spawn(StandinConfig::default())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let inputs = texts(&["first", "second text", "ünïcödé"]);
        let expected: Vec<Vec<f32>> = inputs.iter().map(|t| standin_vector(t, 768)).collect();
        for base in [
            s.url(),
            format!("{}/v1", s.url()),
            format!("{}/v1/", s.url()),
        ] {
            for encoding in [EncodingFormat::Float, EncodingFormat::Base64] {
                let b = backend(&base, encoding, None);
                let got = b.embed(&inputs).await.unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(got, expected, "{base} {encoding:?}");
            }
        }
        let info = backend(&s.url(), EncodingFormat::Base64, None)
            .probe()
            .await;
        assert_eq!(
            info.ok(),
            Some(ModelInfo {
                dimensions: 768,
                context_length: None
            })
        );
        assert_eq!(s.standin.stats().calls.openai, 7);
    }

    #[tokio::test]
    async fn sends_the_bearer_key_and_sorts_by_index() {
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let record = seen.clone();
        let router = Router::new().route(
            "/v1/embeddings",
            post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let record = record.clone();
                async move {
                    let auth = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    record.lock().unwrap_or_else(|p| p.into_inner()).push(auth);
                    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    assert_eq!(request["encoding_format"], "base64");
                    axum::Json(json!({
                        "object": "list",
                        "data": [
                            {"object": "embedding", "index": 1, "embedding": encode_base64(&[0.0, 1.0])},
                            {"object": "embedding", "index": 0, "embedding": [1.0, 0.0]}
                        ],
                        "model": "m"
                    }))
                }
            }),
        );
        let (url, _task) = fake(router).await;
        let b = OpenAiBackend::new(
            "oa",
            &url,
            "nomic-embed-text",
            Some("sk-test"),
            EncodingFormat::Base64,
            config(2),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let got = b.embed(&texts(&["a", "b"])).await;
        assert_eq!(got.ok(), Some(vec![vec![1.0, 0.0], vec![0.0, 1.0]]));
        assert_eq!(
            *seen.lock().unwrap_or_else(|p| p.into_inner()),
            vec!["Bearer sk-test".to_string()]
        );
        assert!(
            !format!("{b:?}").contains("sk-test"),
            "the key must not be printed"
        );
    }

    #[tokio::test]
    async fn statuses_map_to_what_the_caller_should_do() {
        let router = Router::new()
            .route(
                "/auth/v1/embeddings",
                post(|| async {
                    (
                        AxumStatus::UNAUTHORIZED,
                        axum::Json(json!({"error": {"message": "bad key", "type": "x"}})),
                    )
                }),
            )
            .route(
                "/long/v1/embeddings",
                post(|| async {
                    (
                        AxumStatus::BAD_REQUEST,
                        axum::Json(
                            json!({"error": {"message": "maximum context length is 8192 tokens"}}),
                        ),
                    )
                }),
            )
            .route(
                "/busy/v1/embeddings",
                post(|| async {
                    (
                        AxumStatus::TOO_MANY_REQUESTS,
                        [("retry-after", "3")],
                        axum::Json(json!({"error": {"message": "rate limit"}})),
                    )
                }),
            )
            .route(
                "/bad64/v1/embeddings",
                post(|| async { axum::Json(json!({"data": [{"index": 0, "embedding": "AAA"}]})) }),
            )
            .route(
                "/count/v1/embeddings",
                post(|| async { axum::Json(json!({"data": [{"index": 0, "embedding": [1.0]}]})) }),
            )
            .route(
                "/dup/v1/embeddings",
                post(|| async {
                    axum::Json(json!({"data": [
                        {"index": 0, "embedding": [1.0]},
                        {"index": 0, "embedding": [1.0]}
                    ]}))
                }),
            );
        let (url, _task) = fake(router).await;
        let two = texts(&["a", "b"]);
        let call = |path: &str| {
            let b = backend(&format!("{url}/{path}"), EncodingFormat::Base64, None);
            let two = two.clone();
            async move { b.embed(&two).await }
        };
        assert!(matches!(
            call("auth").await,
            Err(EmbedError::ModelUnavailable(m)) if m.contains("api_key_env")
        ));
        assert!(matches!(
            call("long").await,
            Err(EmbedError::TooLong { status: 400, message }) if message.contains("context length")
        ));
        assert!(matches!(
            call("busy").await,
            Err(EmbedError::Transient { status: 429, retry_after: Some(d), .. }) if d == Duration::from_secs(3)
        ));
        for path in ["bad64", "count", "dup"] {
            let result = call(path).await;
            assert!(
                matches!(result, Err(EmbedError::Protocol(_))),
                "{path}: {result:?}"
            );
        }
        let result = call("missing").await;
        assert!(
            matches!(result, Err(EmbedError::ModelUnavailable(_))),
            "{result:?}"
        );
    }

    /// NaN and infinity can only come as base64 (JSON has no such
    /// numbers); zero vectors come either way. All are that backend's
    /// failure, never stored.
    #[tokio::test]
    async fn zero_and_non_finite_vectors_are_backend_errors() {
        let mut nan = vec![0.5f32; DIMS];
        nan[3] = f32::NAN;
        let mut inf = vec![0.5f32; DIMS];
        inf[5] = f32::NEG_INFINITY;
        let answer = |embedding: Value| json!({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": embedding}], "model": "m"});
        let answers = [
            (
                "zero-float",
                answer(json!(vec![0.0f32; DIMS])),
                "zero vector",
            ),
            (
                "zero-b64",
                answer(json!(encode_base64(&vec![0.0f32; DIMS]))),
                "zero vector",
            ),
            ("nan", answer(json!(encode_base64(&nan))), "NaN or infinite"),
            ("inf", answer(json!(encode_base64(&inf))), "NaN or infinite"),
        ];
        let mut router = Router::new();
        for (path, body, _) in &answers {
            let body = body.clone();
            router = router.route(
                &format!("/{path}/v1/embeddings"),
                post(move || {
                    let body = body.clone();
                    async move { axum::Json(body) }
                }),
            );
        }
        let (url, _task) = fake(router).await;
        for (path, _, expected) in answers {
            let result = backend(&format!("{url}/{path}"), EncodingFormat::Base64, None)
                .embed(&texts(&["a"]))
                .await;
            match result {
                Err(EmbedError::Protocol(m)) => {
                    assert!(m.contains("backend `oa`"), "{path}: {m}");
                    assert!(m.contains(expected), "{path}: {m}");
                }
                other => panic!("{path}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn an_answer_over_max_response_bytes_is_a_backend_error() {
        use crate::response::flood::{self, FLOOD_BYTES, Framing};
        let (url, server) = flood::serve(Framing::Chunked).await;
        let b = OpenAiBackend::new(
            "flooder",
            &url,
            "m",
            None,
            EncodingFormat::Float,
            ClientConfig {
                max_response_bytes: 1 << 20,
                ..config(DIMS)
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let result = b.embed(&texts(&["a"])).await;
        drop(b);
        let sent = server.await.unwrap_or_else(|e| panic!("{e}"));
        match result {
            Err(EmbedError::Protocol(m)) => {
                assert!(m.contains("backend `flooder`"), "{m}");
                assert!(m.contains("max_response_bytes = 1048576"), "{m}");
            }
            other => panic!("{other:?}"),
        }
        assert!(sent.cut_short, "{sent:?}");
        assert!(sent.body_bytes < FLOOD_BYTES / 4, "{sent:?}");
    }

    #[tokio::test]
    async fn down_and_stopped_servers_are_retryable() {
        let s = standin::spawn(StandinConfig::default())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let b = backend(&s.url(), EncodingFormat::Float, None);
        s.standin
            .set_faults(FaultsUpdate {
                down: Some(true),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("{e}"));
        let result = b.embed(&texts(&["a"])).await;
        assert!(
            matches!(&result, Err(e @ EmbedError::Transient { status: 503, .. }) if e.is_retryable()),
            "{result:?}"
        );
        s.stop().await.unwrap_or_else(|e| panic!("{e}"));
        let result = b.probe().await;
        assert!(
            matches!(&result, Err(e @ EmbedError::Unreachable(_)) if e.is_retryable()),
            "{result:?}"
        );
    }

    #[test]
    fn base64_round_trip_and_bad_urls() {
        let v = vec![0.25f32, -1.5, f32::MIN_POSITIVE];
        assert_eq!(decode_base64(&encode_base64(&v)), Ok(v.clone()));
        assert_eq!(
            decode_base64(encode_base64(&v).trim_end_matches('=')),
            Ok(v)
        );
        assert!(decode_base64("AAAAAAAA").is_err(), "6 bytes");
        assert!(decode_base64("not base64!").is_err());
        for url in ["", "nope", "ftp://h/"] {
            assert!(
                OpenAiBackend::new("b", url, "m", None, EncodingFormat::Float, config(DIMS))
                    .is_err(),
                "{url}"
            );
        }
        assert!(
            OpenAiBackend::new(
                "b",
                "http://h",
                "m",
                Some("bad\nkey"),
                EncodingFormat::Float,
                config(DIMS)
            )
            .is_err()
        );
    }
}
