//! The OpenAPI document of the HTTP API, generated from the types the
//! handlers use (`utoipa`), served as `GET /openapi.json`.
//!
//! What the document cannot say, the descriptions do: limits come from
//! configuration (`[limits]`, `server.*`), and a conversation carries
//! exactly one of `messages` and `transcript`. Every route the router
//! serves under `/v1/` is listed here (`tests/openapi.rs` checks it against
//! the router): `POST /v1/search` documents itself in `search.rs`, with the
//! very types it deserialises and serialises; `GET /v1/stats`, whose
//! snapshot type lives in `convstore_api` (serde only), is documented
//! below as an object.

use std::sync::OnceLock;

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{admin, handlers, lifecycle, search};

pub use super::error::ErrorBody as ErrorObject;
pub use super::error::ErrorEnvelope as ErrorResponse;
pub use convstore_core::validate::ConversationIn as ConversationSchema;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "convstore",
        description = "Stores chat conversations, with embeddings, in PostgreSQL/pgvector. \
            Accepting costs microseconds; embedding and storage happen behind a bounded queue. \
            See README.md and docs/DURABILITY.md."
    ),
    paths(
        handlers::post_conversation,
        handlers::post_batch,
        handlers::get_conversation,
        lifecycle::append_messages,
        lifecycle::delete_conversation,
        lifecycle::erase_user,
        admin::redrive,
        search::post_search,
        stats_doc,
        handlers::healthz,
        handlers::readyz,
        openapi_json,
    ),
    components(schemas(
        ConversationSchema,
        handlers::Accepted,
        handlers::BatchResponse,
        handlers::ItemResult,
        handlers::ConversationView,
        lifecycle::Deleted,
        lifecycle::Erased,
        admin::Redriven,
        ErrorResponse,
        ErrorObject,
    )),
    modifiers(&BearerAuth, &ScopeRefusals),
    security(("bearer" = []), ()),
    tags(
        (name = "ingest", description = "Hand conversations over"),
        (name = "read", description = "Read them back"),
        (name = "lifecycle", description = "Delete conversations, erase users"),
        (name = "search", description = "Recall stored conversations by meaning, by words, or both"),
        (name = "admin", description = "Operator actions (the `admin` scope)"),
        (name = "monitoring", description = "What the daemon is doing"),
        (name = "health", description = "Liveness and readiness"),
    )
)]
struct ApiDoc;

/// Bearer tokens are optional (`[[auth.tokens]]`); when configured, every
/// route but health, metrics and this document needs one.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// A token lacking the scope a route needs gets 403 (`http::auth`): said
/// once here, for every operation that can answer 401, rather than in each
/// handler's list.
struct ScopeRefusals;

impl Modify for ScopeRefusals {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::RefOr;
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
                &mut item.head,
                &mut item.options,
            ];
            for operation in operations.into_iter().flatten() {
                let responses = &mut operation.responses.responses;
                let Some(RefOr::T(unauthorized)) = responses.get("401") else {
                    continue;
                };
                let mut forbidden = unauthorized.clone();
                forbidden.description = "`forbidden`: the bearer token does not have the scope this \
                    route needs (`[[auth.tokens]] scopes`: `ingest` to post, `read` to get and search, \
                    `delete` to delete, `admin` for everything); the message names the token and the scope"
                    .into();
                responses.entry("403".into()).or_insert(RefOr::T(forbidden));
            }
        }
    }
}

/// The document.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as JSON, rendered once.
pub fn document_json() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| {
        document().to_pretty_json().unwrap_or_else(|e| {
            format!("{{\"error\": \"cannot render the OpenAPI document: {e}\"}}")
        })
    })
}

// `GET /v1/stats` is served by `stats::get_stats`; this function only
// documents it and is never routed. The snapshot's type
// (`convstore_api::stats::StatsSnapshot`) has no schema, so the
// document says what it holds in words. (The doc comment below is the
// operation's summary in the document.)
/// `GET /v1/stats`: what the daemon is doing, from memory.
#[utoipa::path(
    get,
    path = "/v1/stats",
    operation_id = "get_stats",
    tag = "monitoring",
    security(()),
    responses((
        status = 200,
        description = "A JSON snapshot from memory (no database round trip), `Cache-Control: no-store`: \
            `version`, `uptime_seconds`, `window_seconds`, `health` (`status`: healthy, warning or critical, \
            and `reasons`), `queue`, `rates`, `latency` (per-stage percentiles in ms), `cache`, `backends`, \
            `pending_embedding`, `totals`, `deleted` (conversations deleted since start by reason: `api`, `erase`, \
            `retention`), `bottleneck`, `process`. Rates and latencies cover the last \
            `window_seconds`; totals count since start; `null` where nothing happened or nothing is known.",
        content_type = "application/json",
        body = Object
    ))
)]
#[allow(dead_code)]
fn stats_doc() {}

/// `GET /openapi.json`: this API's OpenAPI document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "health",
    security(()),
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object))
)]
pub async fn openapi_json() -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        document_json(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_names_every_route_and_the_conversation_fields() {
        let doc: serde_json::Value = serde_json::from_str(document_json()).unwrap();
        for path in [
            "/v1/conversations",
            "/v1/conversations/batch",
            "/v1/conversations/{id}",
            "/v1/conversations/{id}/messages",
            "/v1/users/{user_id}",
            "/v1/search",
            "/v1/stats",
            "/healthz",
            "/readyz",
            "/openapi.json",
        ] {
            assert!(doc["paths"][path].is_object(), "{path} missing");
        }
        let conversation = &doc["components"]["schemas"]["Conversation"];
        for field in [
            "id",
            "user_id",
            "channel",
            "messages",
            "transcript",
            "metadata",
        ] {
            assert!(
                conversation["properties"][field].is_object(),
                "Conversation.{field} missing: {conversation}"
            );
        }
        assert_eq!(conversation["additionalProperties"], false);
        // Every operation that can refuse a token can refuse its scope.
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                let responses = &operation["responses"];
                if responses.get("401").is_some() {
                    let forbidden = responses["403"]["description"].as_str().unwrap_or("");
                    assert!(
                        forbidden.contains("forbidden"),
                        "{method} {path}: {responses}"
                    );
                }
            }
        }
        assert!(doc["paths"]["/v1/search"]["post"]["responses"]["403"].is_object());
        let wait = &doc["paths"]["/v1/conversations"]["post"]["parameters"];
        assert!(
            wait.as_array().unwrap().iter().any(|p| p["name"] == "wait"),
            "{wait}"
        );
    }
}
