//! Ollama's own routes, as the reference (`embedding-apis.md` §1, §5, §8)
//! describes them for version 0.12.6:
//!
//! - `GET|HEAD /` → 200 `text/plain` `Ollama is running`
//! - `GET|HEAD /api/version` → `{"version":"0.12.6"}`
//! - `POST /api/show {"model"}` → `model_info` (`general.architecture`,
//!   `<arch>.embedding_length`, `<arch>.context_length`, ...) and
//!   `capabilities`; 400 `model is required`; 404 for an unknown model
//! - `POST /api/embed {"model", "input", "truncate", "dimensions",
//!   "keep_alive", "options"}` → `{"model", "embeddings", "total_duration",
//!   "load_duration", "prompt_eval_count"}`; `input` missing, `null`, `""` or
//!   `[]` → `{"model", "embeddings": []}` (preload)
//!
//! Errors are `{"error": "<message>"}` with Ollama's statuses and texts:
//! 400 `missing request body`, 400 `<JSON error>`, 400 `invalid input type`,
//! 400 `the input length exceeds the context length` (`truncate: false`),
//! 404 `model "x" not found, try pulling it first`, 404 `model '' not found`,
//! and 503 with Ollama's "server busy" text while down.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::engine::{EmbedJob, Failure, Route};
use super::faults::Outcome;
use super::{OLLAMA_VERSION, Shared};

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/", get(root))
        .route("/api/version", get(version))
        .route("/api/show", post(show))
        .route("/api/embed", post(embed))
}

/// Unknown routes, with gin's default text.
pub(crate) async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "404 page not found").into_response()
}

/// `{"error": message}` with the failure's status and `Retry-After`.
pub(crate) fn error_response(failure: &Failure) -> Response {
    let mut response = (failure.status, Json(json!({ "error": failure.message }))).into_response();
    add_retry_after(&mut response, failure.retry_after);
    response
}

pub(crate) fn add_retry_after(response: &mut Response, secs: Option<u64>) {
    if let Some(secs) = secs {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
}

/// Go's `io.EOF` from an empty body: Ollama answers `missing request body`.
pub(crate) fn is_missing(body: &[u8]) -> bool {
    body.iter().all(u8::is_ascii_whitespace)
}

async fn root(State(shared): State<Arc<Shared>>) -> Response {
    let _call = shared.begin(Route::Root);
    if let Some(down) = shared.down_failure() {
        return error_response(&down);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "Ollama is running",
    )
        .into_response()
}

async fn version(State(shared): State<Arc<Shared>>) -> Response {
    let _call = shared.begin(Route::Version);
    if let Some(down) = shared.down_failure() {
        return error_response(&down);
    }
    Json(json!({ "version": OLLAMA_VERSION })).into_response()
}

#[derive(Debug, Deserialize)]
struct ShowRequest {
    #[serde(default)]
    model: Option<String>,
    /// The older spelling of `model`, still accepted by Ollama.
    #[serde(default)]
    name: Option<String>,
}

async fn show(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let _call = shared.begin(Route::Show);
    if let Some(down) = shared.down_failure() {
        return error_response(&down);
    }
    if is_missing(&body) {
        return error_response(&Failure::bad_request("missing request body"));
    }
    let request: ShowRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return error_response(&Failure::bad_request(e.to_string())),
    };
    let model = request
        .model
        .filter(|m| !m.is_empty())
        .or(request.name)
        .unwrap_or_default();
    if model.is_empty() {
        return error_response(&Failure::bad_request("model is required"));
    }
    if !shared.serves(&model) {
        return error_response(&shared.model_not_found(&model));
    }
    let dimensions = shared.dimensions_of(&model).unwrap_or(shared.dimensions);
    Json(show_body(&shared, dimensions)).into_response()
}

/// What `/api/show` says about the model: the shape of a real answer, with
/// the keys a client reads (`general.architecture`,
/// `<arch>.embedding_length`, `<arch>.context_length`, `capabilities`) set
/// from the configuration and the rest plausible filler.
fn show_body(shared: &Shared, dimensions: usize) -> Value {
    let arch = shared.architecture.as_str();
    let mut model_info = Map::new();
    model_info.insert("general.architecture".into(), json!(arch));
    model_info.insert("general.file_type".into(), json!(1));
    model_info.insert("general.parameter_count".into(), json!(136_727_040u64));
    model_info.insert("general.quantization_version".into(), json!(2));
    model_info.insert(format!("{arch}.attention.head_count"), json!(12));
    model_info.insert(format!("{arch}.block_count"), json!(12));
    model_info.insert(
        format!("{arch}.context_length"),
        json!(shared.context_length),
    );
    model_info.insert(format!("{arch}.embedding_length"), json!(dimensions));
    model_info.insert(format!("{arch}.pooling_type"), json!(1));
    model_info.insert("tokenizer.ggml.model".into(), json!("bert"));

    let mut body = json!({
        "license": "",
        "modelfile": format!(
            "# Modelfile of the convstore stand-in\nFROM {}\nPARAMETER num_ctx {}\n",
            shared.model, shared.context_length
        ),
        "parameters": format!("num_ctx                        {}", shared.context_length),
        "template": "{{ .Prompt }}",
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": arch,
            "families": [arch],
            "parameter_size": "137M",
            "quantization_level": "F16"
        },
        "model_info": model_info,
        "modified_at": "2025-10-16T00:00:00Z"
    });
    if let (Some(capabilities), Some(map)) = (&shared.capabilities, body.as_object_mut()) {
        map.insert("capabilities".into(), json!(capabilities));
    }
    body
}

#[derive(Debug, Deserialize)]
struct EmbedRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    input: Value,
    #[serde(default)]
    truncate: Option<bool>,
    #[serde(default)]
    dimensions: Option<i64>,
    #[serde(default)]
    keep_alive: Value,
    #[serde(default)]
    options: Option<Map<String, Value>>,
}

#[derive(Debug, Serialize)]
struct EmbedResponse<'a> {
    model: &'a str,
    embeddings: Vec<Vec<f32>>,
    /// Nanoseconds, as Ollama reports durations.
    #[serde(skip_serializing_if = "Option::is_none")]
    total_duration: Option<u64>,
    /// Here: nanoseconds spent waiting for the compute slot.
    #[serde(skip_serializing_if = "Option::is_none")]
    load_duration: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_eval_count: Option<u64>,
}

async fn embed(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let started = Instant::now();
    let call = shared.begin(Route::Embed);
    let fail = |call: super::engine::CallGuard<'_>, failure: Failure| {
        call.finish(failure.outcome);
        error_response(&failure)
    };
    if let Some(down) = shared.down_failure() {
        return fail(call, down);
    }
    let request = match parse_embed(&body) {
        Ok(request) => request,
        Err(failure) => return fail(call, failure),
    };
    let model = request.model.clone();
    match shared.embed(request).await {
        Ok(output) => {
            call.finish(Outcome::Ok);
            let computed = !output.embeddings.is_empty();
            Json(EmbedResponse {
                model: &model,
                embeddings: output.embeddings,
                total_duration: computed.then(|| nanos(started.elapsed())),
                load_duration: computed.then(|| nanos(output.load)),
                prompt_eval_count: computed.then_some(output.tokens),
            })
            .into_response()
        }
        Err(failure) => fail(call, failure),
    }
}

fn nanos(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn parse_embed(body: &[u8]) -> Result<EmbedJob, Failure> {
    if is_missing(body) {
        return Err(Failure::bad_request("missing request body"));
    }
    let request: EmbedRequest =
        serde_json::from_slice(body).map_err(|e| Failure::bad_request(e.to_string()))?;
    check_keep_alive(&request.keep_alive)?;
    let inputs = match request.input {
        Value::Null => Vec::new(),
        Value::String(s) if s.is_empty() => Vec::new(),
        Value::String(s) => vec![s],
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::String(s) => Ok(s),
                _ => Err(Failure::bad_request("invalid input type")),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(Failure::bad_request("invalid input type")),
    };
    let num_ctx = request
        .options
        .as_ref()
        .and_then(|o| o.get("num_ctx"))
        .and_then(Value::as_f64)
        .filter(|&n| n >= 1.0)
        .map(|n| n as usize);
    Ok(EmbedJob {
        model: request.model.unwrap_or_default(),
        inputs,
        truncate: request.truncate.unwrap_or(true),
        num_ctx,
        dimensions: positive(request.dimensions),
    })
}

/// `dimensions` as Ollama reads it: only a positive value means anything.
pub(crate) fn positive(dimensions: Option<i64>) -> Option<usize> {
    dimensions
        .filter(|&d| d > 0)
        .and_then(|d| usize::try_from(d).ok())
}

/// `keep_alive` is a number (seconds) or a duration string; anything else is
/// a 400 naming the Go type, as `api.Duration.UnmarshalJSON` does.
fn check_keep_alive(value: &Value) -> Result<(), Failure> {
    let go_type = match value {
        Value::Null | Value::Number(_) | Value::String(_) => return Ok(()),
        Value::Bool(_) => "bool",
        Value::Array(_) => "[]interface {}",
        Value::Object(_) => "map[string]interface {}",
    };
    Err(Failure::bad_request(format!(
        "Unsupported type: '{go_type}'"
    )))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::body::Body;
    use axum::http::{Method, Request};
    use tower::Service;

    use super::super::{Standin, StandinConfig, standin_vector};
    use super::*;

    async fn call(
        standin: &Standin,
        method: Method,
        path: &str,
        body: &str,
    ) -> (StatusCode, Response) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::from(body.to_string()))
            .unwrap_or_else(|e| panic!("{e}"));
        let mut router = standin.router();
        let response = match router.call(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        (response.status(), response)
    }

    async fn body_of(response: Response) -> Vec<u8> {
        axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .map(|b| b.to_vec())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    async fn json_call(
        standin: &Standin,
        method: Method,
        path: &str,
        body: &str,
    ) -> (StatusCode, Value) {
        let (status, response) = call(standin, method, path, body).await;
        let bytes = body_of(response).await;
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{path}: {e}: {}", String::from_utf8_lossy(&bytes)));
        (status, value)
    }

    fn small() -> Standin {
        Standin::new(StandinConfig {
            dimensions: 8,
            context_length: 16,
            ..StandinConfig::default()
        })
    }

    #[tokio::test]
    async fn root_and_version() {
        let s = small();
        let (status, response) = call(&s, Method::GET, "/", "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            response
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok()),
            Some("text/plain; charset=utf-8")
        );
        assert_eq!(body_of(response).await, b"Ollama is running");
        let (status, response) = call(&s, Method::HEAD, "/", "").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body_of(response).await.is_empty());

        let (status, v) = json_call(&s, Method::GET, "/api/version", "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(v, json!({"version": "0.12.6"}));
        let (status, _) = call(&s, Method::HEAD, "/api/version", "").await;
        assert_eq!(status, StatusCode::OK);

        let (status, response) = call(&s, Method::GET, "/api/nope", "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body_of(response).await, b"404 page not found");

        let stats = s.stats();
        assert_eq!((stats.calls.root, stats.calls.version), (2, 2));
    }

    #[tokio::test]
    async fn show_reports_model_info_and_errors() {
        let s = small();
        for name in [
            "nomic-embed-text",
            "nomic-embed-text:latest",
            "NOMIC-embed-text",
        ] {
            let (status, v) = json_call(
                &s,
                Method::POST,
                "/api/show",
                &json!({"model": name}).to_string(),
            )
            .await;
            assert_eq!(status, StatusCode::OK, "{name}");
            assert_eq!(v["model_info"]["general.architecture"], "nomic-bert");
            assert_eq!(v["model_info"]["nomic-bert.embedding_length"], 8);
            assert_eq!(v["model_info"]["nomic-bert.context_length"], 16);
            assert_eq!(v["capabilities"], json!(["embedding"]));
        }
        let (status, v) = json_call(
            &s,
            Method::POST,
            "/api/show",
            r#"{"name":"nomic-embed-text"}"#,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(v["details"]["family"], "nomic-bert");

        let (status, v) = json_call(&s, Method::POST, "/api/show", r#"{"model":"x"}"#).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(
            v,
            json!({"error": "model \"x\" not found, try pulling it first"})
        );
        let (status, v) = json_call(
            &s,
            Method::POST,
            "/api/show",
            r#"{"model":"nomic-embed-text:v2"}"#,
        )
        .await;
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "another tag is another model: {v}"
        );
        let (status, v) = json_call(&s, Method::POST, "/api/show", "").await;
        assert_eq!(
            (status, v),
            (
                StatusCode::BAD_REQUEST,
                json!({"error": "missing request body"})
            )
        );
        let (status, v) = json_call(&s, Method::POST, "/api/show", "{}").await;
        assert_eq!(
            (status, v),
            (
                StatusCode::BAD_REQUEST,
                json!({"error": "model is required"})
            )
        );
        let (status, v) = json_call(&s, Method::POST, "/api/show", "{").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(v["error"].is_string());
    }

    #[tokio::test]
    async fn show_capabilities_follow_config() {
        let chat = Standin::new(StandinConfig {
            capabilities: Some(vec!["completion".into()]),
            ..StandinConfig::default()
        });
        let (_, v) = json_call(
            &chat,
            Method::POST,
            "/api/show",
            r#"{"model":"nomic-embed-text"}"#,
        )
        .await;
        assert_eq!(v["capabilities"], json!(["completion"]));
        let old = Standin::new(StandinConfig {
            capabilities: None,
            ..StandinConfig::default()
        });
        let (_, v) = json_call(
            &old,
            Method::POST,
            "/api/show",
            r#"{"model":"nomic-embed-text"}"#,
        )
        .await;
        assert!(v.get("capabilities").is_none());
    }

    #[tokio::test]
    async fn embed_returns_standin_vectors_in_order() {
        let s = small();
        let body =
            json!({"model": "nomic-embed-text", "input": ["first text", "second", "first text"]});
        let (status, v) = json_call(&s, Method::POST, "/api/embed", &body.to_string()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(v["model"], "nomic-embed-text");
        let got: Vec<Vec<f32>> =
            serde_json::from_value(v["embeddings"].clone()).unwrap_or_default();
        assert_eq!(
            got,
            vec![
                standin_vector("first text", 8),
                standin_vector("second", 8),
                standin_vector("first text", 8)
            ]
        );
        assert_eq!(v["prompt_eval_count"], 2 + 2 + 2);
        assert!(v["total_duration"].is_u64());
        assert!(v["load_duration"].is_u64());

        // A bare string is one input.
        let (status, v) = json_call(
            &s,
            Method::POST,
            "/api/embed",
            r#"{"model":"nomic-embed-text","input":"second"}"#,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let got: Vec<Vec<f32>> =
            serde_json::from_value(v["embeddings"].clone()).unwrap_or_default();
        assert_eq!(got, vec![standin_vector("second", 8)]);

        // [""] is one input (the empty text), unlike a bare "".
        let (_, v) = json_call(
            &s,
            Method::POST,
            "/api/embed",
            r#"{"model":"nomic-embed-text","input":[""]}"#,
        )
        .await;
        assert_eq!(v["embeddings"].as_array().map(Vec::len), Some(1));

        // Matryoshka: a shorter, renormalised prefix.
        let (_, v) = json_call(
            &s,
            Method::POST,
            "/api/embed",
            r#"{"model":"nomic-embed-text","input":["second"],"dimensions":4}"#,
        )
        .await;
        let got: Vec<Vec<f32>> =
            serde_json::from_value(v["embeddings"].clone()).unwrap_or_default();
        assert_eq!(
            got,
            vec![super::super::vectors::shorten(
                standin_vector("second", 8),
                4
            )]
        );
    }

    #[tokio::test]
    async fn embed_empty_input_is_a_preload() {
        let s = small();
        for input in ["", r#","input":"""#, r#","input":[]"#, r#","input":null"#] {
            let body = format!(r#"{{"model":"nomic-embed-text"{input}}}"#);
            let (status, v) = json_call(&s, Method::POST, "/api/embed", &body).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert_eq!(
                v,
                json!({"model": "nomic-embed-text", "embeddings": []}),
                "{body}"
            );
        }
        assert_eq!(s.stats().embedded, 0);
    }

    #[tokio::test]
    async fn embed_error_shapes() {
        let s = small();
        let cases: &[(&str, StatusCode, &str)] = &[
            ("", StatusCode::BAD_REQUEST, "missing request body"),
            (
                r#"{"model":"nomic-embed-text","input":[1,2]}"#,
                StatusCode::BAD_REQUEST,
                "invalid input type",
            ),
            (
                r#"{"model":"nomic-embed-text","input":["a",2]}"#,
                StatusCode::BAD_REQUEST,
                "invalid input type",
            ),
            (
                r#"{"model":"nomic-embed-text","input":{"a":1}}"#,
                StatusCode::BAD_REQUEST,
                "invalid input type",
            ),
            (
                r#"{"model":"nomic-embed-text","input":"a","keep_alive":true}"#,
                StatusCode::BAD_REQUEST,
                "Unsupported type: 'bool'",
            ),
            (
                r#"{"model":"foo","input":"a"}"#,
                StatusCode::NOT_FOUND,
                "model \"foo\" not found, try pulling it first",
            ),
            (
                r#"{"input":"a"}"#,
                StatusCode::NOT_FOUND,
                "model '' not found",
            ),
        ];
        for &(body, status, message) in cases {
            let (got, v) = json_call(&s, Method::POST, "/api/embed", body).await;
            assert_eq!(got, status, "{body}");
            assert_eq!(v, json!({ "error": message }), "{body}");
        }
        // Wrong field type: a JSON error, still in the {"error"} shape.
        let (status, v) = json_call(
            &s,
            Method::POST,
            "/api/embed",
            r#"{"model":"nomic-embed-text","truncate":"yes"}"#,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            v["error"]
                .as_str()
                .is_some_and(|m| m.contains("invalid type")),
            "{v}"
        );
        let (status, _) = json_call(&s, Method::POST, "/api/embed", "{not json").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);

        let stats = s.stats();
        assert_eq!(stats.calls.embed, 9);
        assert_eq!(stats.outcomes.bad_request, 7);
        assert_eq!(stats.outcomes.not_found, 2);
    }

    #[tokio::test]
    async fn context_limit_truncates_or_refuses() {
        // context 16 → at most 15 tokens per input; each "word" is 1 token.
        let s = small();
        let long = (0..20)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join(" ");
        let fits = (0..15)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join(" ");

        let body = json!({"model": "nomic-embed-text", "input": [long.clone()], "truncate": false});
        let (status, v) = json_call(&s, Method::POST, "/api/embed", &body.to_string()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            v,
            json!({"error": "the input length exceeds the context length"})
        );

        let body = json!({"model": "nomic-embed-text", "input": [fits.clone()], "truncate": false});
        let (status, _) = json_call(&s, Method::POST, "/api/embed", &body.to_string()).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "exactly context_length - 1 tokens fit"
        );

        // Default truncate = true: cut silently to what fits.
        let body = json!({"model": "nomic-embed-text", "input": [long.clone()]});
        let (status, v) = json_call(&s, Method::POST, "/api/embed", &body.to_string()).await;
        assert_eq!(status, StatusCode::OK);
        let got: Vec<Vec<f32>> =
            serde_json::from_value(v["embeddings"].clone()).unwrap_or_default();
        assert_eq!(got, vec![standin_vector(&fits, 8)]);
        assert_eq!(v["prompt_eval_count"], 15);

        // options.num_ctx lowers the limit further.
        let body = json!({"model": "nomic-embed-text", "input": [fits], "truncate": false, "options": {"num_ctx": 8}});
        let (status, _) = json_call(&s, Method::POST, "/api/embed", &body.to_string()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(s.stats().outcomes.too_long, 2);
    }

    #[tokio::test]
    async fn other_models_answer_with_their_own_dimension() {
        let s = Standin::new(StandinConfig {
            dimensions: 8,
            other_models: vec![("all-minilm".into(), 5)],
            ..StandinConfig::default()
        });
        for (model, dims) in [("nomic-embed-text", 8), ("ALL-MINILM:latest", 5)] {
            let body = json!({"model": model, "input": ["hello there"]});
            let (status, v) = json_call(&s, Method::POST, "/api/embed", &body.to_string()).await;
            assert_eq!(status, StatusCode::OK, "{model}: {v}");
            assert_eq!(
                v["embeddings"][0].as_array().map(Vec::len),
                Some(dims),
                "{model}"
            );
            let body = json!({"model": model});
            let (status, v) = json_call(&s, Method::POST, "/api/show", &body.to_string()).await;
            assert_eq!(status, StatusCode::OK, "{model}: {v}");
            assert_eq!(
                v["model_info"]["nomic-bert.embedding_length"].as_u64(),
                Some(dims as u64),
                "{model}"
            );
        }
        let body = json!({"model": "mxbai-embed-large", "input": ["hello"]});
        let (status, _) = json_call(&s, Method::POST, "/api/embed", &body.to_string()).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn poison_fails_the_whole_request() {
        let s = Standin::new(StandinConfig {
            dimensions: 8,
            poison: vec!["POISON".into()],
            ..StandinConfig::default()
        });
        let body = json!({"model": "nomic-embed-text", "input": ["fine", "this is POISON here", "also fine"]});
        let (status, v) = json_call(&s, Method::POST, "/api/embed", &body.to_string()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            v["error"].as_str().is_some_and(|m| m.contains("input 1")),
            "{v}"
        );
        let body = json!({"model": "nomic-embed-text", "input": ["fine", "also fine"]});
        let (status, _) = json_call(&s, Method::POST, "/api/embed", &body.to_string()).await;
        assert_eq!(status, StatusCode::OK);
        let stats = s.stats();
        assert_eq!(
            (stats.outcomes.poisoned, stats.outcomes.ok, stats.embedded),
            (1, 1, 2)
        );
    }

    #[tokio::test]
    async fn injected_failures_every_nth_with_retry_after() {
        let s = Standin::new(StandinConfig {
            dimensions: 8,
            failure_every: 2,
            failure_status: 503,
            retry_after_secs: Some(3),
            ..StandinConfig::default()
        });
        let body = json!({"model": "nomic-embed-text", "input": ["a", "b"]}).to_string();
        let mut statuses = Vec::new();
        for _ in 0..6 {
            let (status, response) = call(&s, Method::POST, "/api/embed", &body).await;
            if status == StatusCode::SERVICE_UNAVAILABLE {
                assert_eq!(
                    response
                        .headers()
                        .get(header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok()),
                    Some("3")
                );
                let v: Value = serde_json::from_slice(&body_of(response).await).unwrap_or_default();
                assert_eq!(
                    v,
                    json!({"error": "server busy, please try again.  maximum pending requests exceeded"})
                );
            }
            statuses.push(status.as_u16());
        }
        assert_eq!(statuses, [200, 503, 200, 503, 200, 503]);
        let stats = s.stats();
        assert_eq!(stats.calls.embed, 6);
        assert_eq!((stats.outcomes.ok, stats.outcomes.injected), (3, 3));
        assert_eq!((stats.inputs, stats.embedded), (12, 6));

        // Changed at run time: 500s, every call.
        s.set_faults(FaultsUpdate {
            failure_every: Some(1),
            failure_status: Some(500),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let (status, _) = call(&s, Method::POST, "/api/embed", &body).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[tokio::test]
    async fn down_switch_answers_503_everywhere_but_control() {
        let s = small();
        s.set_faults(FaultsUpdate {
            down: Some(true),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("{e}"));
        for (method, path, body) in [
            (Method::GET, "/", ""),
            (Method::GET, "/api/version", ""),
            (Method::POST, "/api/show", r#"{"model":"nomic-embed-text"}"#),
            (
                Method::POST,
                "/api/embed",
                r#"{"model":"nomic-embed-text","input":"a"}"#,
            ),
        ] {
            let (status, _) = call(&s, method, path, body).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{path}");
        }
        let (status, v) = json_call(&s, Method::GET, "/_standin/stats", "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(v["outcomes"]["down"], 1);
        let (status, v) =
            json_call(&s, Method::POST, "/_standin/faults", r#"{"down":false}"#).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(v["down"], false);
        let (status, _) = call(&s, Method::GET, "/api/version", "").await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn control_routes() {
        let s = small();
        let (status, v) = json_call(
            &s,
            Method::POST,
            "/_standin/faults",
            r#"{"latency_per_request_ms":15,"latency_per_input_ms":0.5,"poison":["BAD"]}"#,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let view: FaultsView = serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(view.latency_per_request_ms, 15.0);
        assert_eq!(view.latency_per_input_ms, 0.5);
        assert_eq!(view.poison, ["BAD"]);
        assert_eq!(s.faults(), view);

        let (status, v) = json_call(
            &s,
            Method::POST,
            "/_standin/faults",
            r#"{"failure_rate":2}"#,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            v["error"]
                .as_str()
                .is_some_and(|m| m.contains("failure_rate"))
        );
        let (status, _) = json_call(
            &s,
            Method::POST,
            "/_standin/faults",
            r#"{"no_such_knob":1}"#,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);

        let _ = call(&s, Method::GET, "/api/version", "").await;
        let (_, v) = json_call(&s, Method::POST, "/_standin/stats/reset", "").await;
        assert_eq!(v["calls"]["version"], 1);
        let (_, v) = json_call(&s, Method::GET, "/_standin/stats", "").await;
        let stats: StandinStats = serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(stats, StandinStats::default());
    }

    #[tokio::test(start_paused = true)]
    async fn latency_is_serial_per_instance() {
        let s = Standin::new(StandinConfig {
            dimensions: 8,
            latency_per_request: Duration::from_millis(100),
            latency_per_input: Duration::from_millis(10),
            ..StandinConfig::default()
        });
        let body = json!({"model": "nomic-embed-text", "input": ["a", "b"]}).to_string();
        let start = tokio::time::Instant::now();
        let finished: Vec<Duration> = futures::future::join_all((0..4).map(|_| {
            let s = s.clone();
            let body = body.clone();
            async move {
                let (status, _) = call(&s, Method::POST, "/api/embed", &body).await;
                assert_eq!(status, StatusCode::OK);
                start.elapsed()
            }
        }))
        .await;
        // Each call holds the one compute slot for 100 + 2 × 10 ms, one
        // after the other: they finish at 120, 240, 360 and 480 ms.
        let mut ms: Vec<u128> = finished.iter().map(Duration::as_millis).collect();
        ms.sort_unstable();
        assert_eq!(ms, [120, 240, 360, 480]);
        assert_eq!(s.stats().max_in_flight, 4);

        // Two instances do run in parallel.
        let other = Standin::new(StandinConfig {
            dimensions: 8,
            latency_per_request: Duration::from_millis(100),
            latency_per_input: Duration::from_millis(10),
            ..StandinConfig::default()
        });
        let start = tokio::time::Instant::now();
        let _ = tokio::join!(
            call(&s, Method::POST, "/api/embed", &body),
            call(&other, Method::POST, "/api/embed", &body)
        );
        assert_eq!(start.elapsed().as_millis(), 120);
    }

    #[tokio::test(start_paused = true)]
    async fn abandoned_calls_are_counted() {
        let s = Standin::new(StandinConfig {
            dimensions: 8,
            latency_per_request: Duration::from_secs(10),
            ..StandinConfig::default()
        });
        let body = json!({"model": "nomic-embed-text", "input": ["a"]}).to_string();
        let timed_out = tokio::time::timeout(
            Duration::from_secs(1),
            call(&s, Method::POST, "/api/embed", &body),
        )
        .await;
        assert!(timed_out.is_err());
        let stats = s.stats();
        assert_eq!(
            (stats.calls.embed, stats.outcomes.abandoned, stats.embedded),
            (1, 1, 0)
        );
    }

    use super::super::{FaultsUpdate, FaultsView, StandinStats};
}
