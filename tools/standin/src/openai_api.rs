//! `POST /v1/embeddings`, Ollama's OpenAI-compatible route (reference §3):
//! it runs the same embedding as `/api/embed` and reshapes request and
//! answer.
//!
//! Request `{"model", "input": "text" | ["t1", ...], "dimensions"?,
//! "encoding_format"?: "float" | "base64", "user"?}`. `"input": ""` means one
//! empty text; a missing input or `[]` is 400 `invalid input`; token arrays
//! are 400 `invalid input type`. Over-long inputs are always cut silently:
//! this route cannot pass `truncate`, as in Ollama.
//!
//! Answer `{"object":"list","data":[{"object":"embedding","embedding":…,
//! "index":i}],"model","usage":{"prompt_tokens","total_tokens"}}`. With
//! `base64`, each embedding is the standard (padded) base64 of its
//! little-endian `f32` bytes, which decodes to exactly the float answer.
//!
//! Errors are OpenAI-shaped, `{"error":{"message","type","param":null,
//! "code":null}}`, `type` being `invalid_request_error` (400),
//! `not_found_error` (404) or `api_error` (anything else).

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::Shared;
use super::engine::{CallGuard, EmbedJob, Failure, Route};
use super::faults::Outcome;
use super::ollama_api::{add_retry_after, is_missing, positive};

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new().route("/v1/embeddings", post(embeddings))
}

/// The error `type` OpenAI clients expect for a status.
fn error_type(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "invalid_request_error",
        StatusCode::NOT_FOUND => "not_found_error",
        _ => "api_error",
    }
}

fn error_response(failure: &Failure) -> Response {
    let body = json!({
        "error": {
            "message": failure.message,
            "type": error_type(failure.status),
            "param": null,
            "code": null
        }
    });
    let mut response = (failure.status, Json(body)).into_response();
    add_retry_after(&mut response, failure.retry_after);
    response
}

#[derive(Debug, Deserialize)]
struct EmbeddingsRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    input: Value,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Float,
    Base64,
}

#[derive(Debug, Serialize)]
struct EmbeddingList<'a> {
    object: &'static str,
    data: Vec<EmbeddingItem>,
    model: &'a str,
    usage: Usage,
}

#[derive(Debug, Serialize)]
struct EmbeddingItem {
    object: &'static str,
    embedding: EmbeddingData,
    index: usize,
}

/// An embedding as floats or as base64 text.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum EmbeddingData {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Serialize)]
struct Usage {
    prompt_tokens: u64,
    total_tokens: u64,
}

/// The base64 form of a vector: little-endian `f32` bytes, standard
/// alphabet with padding (what OpenAI and Ollama send).
pub fn encode_base64(vector: &[f32]) -> String {
    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
    STANDARD.encode(bytes)
}

async fn embeddings(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let call = shared.begin(Route::OpenAi);
    let fail = |call: CallGuard<'_>, failure: Failure| {
        call.finish(failure.outcome);
        error_response(&failure)
    };
    if let Some(down) = shared.down_failure() {
        return fail(call, down);
    }
    let (job, encoding) = match parse(&body) {
        Ok(parsed) => parsed,
        Err(failure) => return fail(call, failure),
    };
    let model = job.model.clone();
    match shared.embed(job).await {
        Ok(output) => {
            call.finish(Outcome::Ok);
            let data = output
                .embeddings
                .into_iter()
                .enumerate()
                .map(|(index, vector)| EmbeddingItem {
                    object: "embedding",
                    embedding: match encoding {
                        Encoding::Float => EmbeddingData::Float(vector),
                        Encoding::Base64 => EmbeddingData::Base64(encode_base64(&vector)),
                    },
                    index,
                })
                .collect();
            Json(EmbeddingList {
                object: "list",
                data,
                model: &model,
                usage: Usage {
                    prompt_tokens: output.tokens,
                    total_tokens: output.tokens,
                },
            })
            .into_response()
        }
        Err(failure) => fail(call, failure),
    }
}

fn parse(body: &[u8]) -> Result<(EmbedJob, Encoding), Failure> {
    if is_missing(body) {
        return Err(Failure::bad_request("missing request body"));
    }
    let request: EmbeddingsRequest =
        serde_json::from_slice(body).map_err(|e| Failure::bad_request(e.to_string()))?;
    let inputs = match request.input {
        Value::String(s) => vec![s],
        Value::Array(items) if items.is_empty() => {
            return Err(Failure::bad_request("invalid input"));
        }
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::String(s) => Ok(s),
                _ => Err(Failure::bad_request("invalid input type")),
            })
            .collect::<Result<_, _>>()?,
        Value::Null => return Err(Failure::bad_request("invalid input")),
        _ => return Err(Failure::bad_request("invalid input type")),
    };
    let encoding = match request.encoding_format.as_deref() {
        None | Some("") => Encoding::Float,
        Some(f) if f.eq_ignore_ascii_case("float") => Encoding::Float,
        Some(f) if f.eq_ignore_ascii_case("base64") => Encoding::Base64,
        Some(other) => {
            return Err(Failure::bad_request(format!(
                "Invalid value for 'encoding_format' = {other}. Supported values: ['float', 'base64']."
            )));
        }
    };
    Ok((
        EmbedJob {
            model: request.model.unwrap_or_default(),
            inputs,
            truncate: true,
            num_ctx: None,
            dimensions: positive(request.dimensions),
        },
        encoding,
    ))
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Method, Request};
    use tower::Service;

    use super::super::{Standin, StandinConfig, standin_vector};
    use super::*;

    async fn post_json(standin: &Standin, body: &str) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(Method::POST)
            .uri("/v1/embeddings")
            .body(Body::from(body.to_string()))
            .unwrap_or_else(|e| panic!("{e}"));
        let mut router = standin.router();
        let response = match router.call(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let value = serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{e}"));
        (status, value)
    }

    fn decode_base64(text: &str) -> Vec<f32> {
        let bytes = STANDARD.decode(text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(bytes.len() % 4, 0);
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    fn small() -> Standin {
        Standin::new(StandinConfig {
            dimensions: 16,
            context_length: 16,
            ..StandinConfig::default()
        })
    }

    #[tokio::test]
    async fn float_response_shape() {
        let s = small();
        let (status, v) = post_json(
            &s,
            r#"{"model":"nomic-embed-text","input":["hello world","second"]}"#,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(v["object"], "list");
        assert_eq!(v["model"], "nomic-embed-text");
        assert_eq!(v["usage"], json!({"prompt_tokens": 4, "total_tokens": 4}));
        let data = v["data"].as_array().cloned().unwrap_or_default();
        assert_eq!(data.len(), 2);
        for (i, (item, text)) in data.iter().zip(["hello world", "second"]).enumerate() {
            assert_eq!(item["object"], "embedding");
            assert_eq!(item["index"], i);
            let got: Vec<f32> =
                serde_json::from_value(item["embedding"].clone()).unwrap_or_default();
            assert_eq!(got, standin_vector(text, 16));
        }
        // A bare string, even empty, is one input.
        let (status, v) = post_json(&s, r#"{"model":"nomic-embed-text","input":""}"#).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(v["data"].as_array().map(Vec::len), Some(1));
    }

    #[tokio::test]
    async fn base64_decodes_to_the_float_vectors() {
        let s = small();
        let texts = ["hello world", "ünïcödé text", "a, b; c."];
        let body =
            json!({"model": "nomic-embed-text", "input": texts, "encoding_format": "BASE64"});
        let (status, v) = post_json(&s, &body.to_string()).await;
        assert_eq!(status, StatusCode::OK);
        let body = json!({"model": "nomic-embed-text", "input": texts, "encoding_format": "float"});
        let (_, floats) = post_json(&s, &body.to_string()).await;
        for (i, text) in texts.iter().enumerate() {
            let encoded = v["data"][i]["embedding"].as_str().unwrap_or_default();
            assert!(encoded.len() % 4 == 0, "padded");
            let decoded = decode_base64(encoded);
            let float: Vec<f32> =
                serde_json::from_value(floats["data"][i]["embedding"].clone()).unwrap_or_default();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&decoded), bits(&float));
            assert_eq!(bits(&decoded), bits(&standin_vector(text, 16)));
        }
    }

    #[tokio::test]
    async fn truncates_silently() {
        let s = small();
        let long = (0..40)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join(" ");
        let fits = (0..15)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join(" ");
        let (status, v) = post_json(
            &s,
            &json!({"model": "nomic-embed-text", "input": long}).to_string(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let got: Vec<f32> =
            serde_json::from_value(v["data"][0]["embedding"].clone()).unwrap_or_default();
        assert_eq!(got, standin_vector(&fits, 16));
    }

    #[tokio::test]
    async fn openai_shaped_errors() {
        let s = Standin::new(StandinConfig {
            dimensions: 16,
            poison: vec!["BAD".into()],
            ..StandinConfig::default()
        });
        let cases: &[(&str, u16, &str, &str)] = &[
            ("", 400, "invalid_request_error", "missing request body"),
            (
                r#"{"model":"nomic-embed-text"}"#,
                400,
                "invalid_request_error",
                "invalid input",
            ),
            (
                r#"{"model":"nomic-embed-text","input":[]}"#,
                400,
                "invalid_request_error",
                "invalid input",
            ),
            (
                r#"{"model":"nomic-embed-text","input":[1,2,3]}"#,
                400,
                "invalid_request_error",
                "invalid input type",
            ),
            (
                r#"{"model":"nomic-embed-text","input":"a","encoding_format":"hex"}"#,
                400,
                "invalid_request_error",
                "Invalid value for 'encoding_format' = hex. Supported values: ['float', 'base64'].",
            ),
            (
                r#"{"model":"foo","input":"a"}"#,
                404,
                "not_found_error",
                "model \"foo\" not found, try pulling it first",
            ),
            (
                r#"{"model":"nomic-embed-text","input":["ok","BAD one"]}"#,
                400,
                "invalid_request_error",
                "standin: input 1 contains the poison substring \"BAD\"",
            ),
        ];
        for &(body, status, kind, message) in cases {
            let (got, v) = post_json(&s, body).await;
            assert_eq!(got.as_u16(), status, "{body}");
            assert_eq!(
                v,
                json!({"error": {"message": message, "type": kind, "param": null, "code": null}}),
                "{body}"
            );
        }
        s.set_faults(super::super::FaultsUpdate {
            failure_every: Some(1),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let (status, v) = post_json(&s, r#"{"model":"nomic-embed-text","input":"a"}"#).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(v["error"]["type"], "api_error");
        let stats = s.stats();
        assert_eq!(stats.calls.openai, 8);
        assert_eq!(stats.calls.embed, 0);
        assert_eq!(
            (
                stats.outcomes.bad_request,
                stats.outcomes.poisoned,
                stats.outcomes.not_found,
                stats.outcomes.injected
            ),
            (5, 1, 1, 1)
        );
    }
}
