//! The OpenAPI document of the HTTP API, generated from the types the
//! handlers use (`utoipa`), served as `GET /openapi.json`.
//!
//! What the document cannot say, the descriptions do: limits come from
//! configuration (`[limits]`, `server.*`), and a conversation carries
//! exactly one of `messages` and `transcript`. The routes of the monitoring
//! and search features document themselves when they add `#[utoipa::path]`
//! and are listed here.

use std::sync::OnceLock;

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use super::handlers;

pub use super::error::ErrorBody as ErrorObject;
pub use super::error::ErrorEnvelope as ErrorResponse;
pub use super::validate::ConversationIn as ConversationSchema;

/// `GET /v1/conversations/{id}`: stored, or still in flight.
#[derive(ToSchema)]
#[serde(untagged)]
// Only its schema is used; no value of it is ever built.
#[allow(dead_code, clippy::large_enum_variant)]
pub enum ConversationView {
    Stored(handlers::StoredView),
    InFlight(handlers::InFlightView),
}

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
        handlers::healthz,
        handlers::readyz,
        openapi_json,
    ),
    components(schemas(
        ConversationSchema,
        handlers::Accepted,
        handlers::BatchResponse,
        handlers::ItemResult,
        ConversationView,
        ErrorResponse,
        ErrorObject,
    )),
    modifiers(&BearerAuth),
    security(("bearer" = []), ()),
    tags(
        (name = "ingest", description = "Hand conversations over"),
        (name = "read", description = "Read them back"),
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
        let wait = &doc["paths"]["/v1/conversations"]["post"]["parameters"];
        assert!(
            wait.as_array().unwrap().iter().any(|p| p["name"] == "wait"),
            "{wait}"
        );
    }
}
