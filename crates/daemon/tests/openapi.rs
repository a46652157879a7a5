//! The OpenAPI document (`GET /openapi.json`) against the code it
//! describes, in process (no daemon, no database):
//!
//! - every route the router serves (read from the router's source, so a
//!   route added there without documentation fails here) is a path of the
//!   document with its method, and the document names no route the router
//!   does not serve;
//! - `POST /v1/search` has its request body (the schema of what
//!   `parse_search` deserialises: its properties are exactly the fields the
//!   parser accepts, `query` the only required one), its 200 response (the
//!   properties are exactly the keys a serialised `SearchResponse` has) and
//!   its errors (the `ErrorEnvelope` schema; 503, never 504).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};

use axum::body::to_bytes;
use axum::http::StatusCode;
use chrono::{TimeZone, Utc};
use serde_json::{Value, json};

use convstore::http::openapi::{document, document_json, openapi_json};
use convstore::http::search::{
    ContextMessage, DEFAULT_K, Fusion, HitContext, MAX_K, Mode, Ranks, SearchResponse,
    SearchResult, Timings, parse_search,
};
use convstore_store::search::{MAX_EF_SEARCH, MatchedChunk, SearchPlan, Strategy};

/// The source of `crates/daemon/src/http/mod.rs`, whose `router` function
/// registers every route of the API.
const ROUTER_SOURCE: &str = include_str!("../src/http/mod.rs");

/// Routes served but deliberately left out of the document: not JSON APIs.
const UNDOCUMENTED: &[&str] = &["/", "/metrics"];

/// HTTP methods as axum's `routing` functions name them.
const METHODS: &[&str] = &[
    "get", "post", "put", "patch", "delete", "head", "options", "trace",
];

/// The free function `pub fn router(`, up to its closing brace at column 0.
fn router_fn_source() -> &'static str {
    // At column 0: `IngressState` has a `pub fn router(&self)` method too.
    let start = ROUTER_SOURCE
        .find("\npub fn router(")
        .expect("mod.rs has no `pub fn router(` at column 0")
        + 1;
    let len = ROUTER_SOURCE[start..]
        .find("\n}\n")
        .expect("`router` has no closing brace at column 0");
    &ROUTER_SOURCE[start..start + len]
}

/// `(path, method)` of every `.route("…", method(…)…)` in `router`.
fn served_routes() -> BTreeSet<(String, String)> {
    let source = router_fn_source();
    for unsupported in [".nest(", ".merge(", ".route_service(", ".nest_service("] {
        assert!(
            !source.contains(unsupported),
            "the router uses `{unsupported}`: teach served_routes() to read it"
        );
    }
    let mut routes = BTreeSet::new();
    let mut calls = 0;
    let mut rest = source;
    while let Some(at) = rest.find(".route(") {
        calls += 1;
        let call = &rest[at + ".route(".len()..];
        // The call's arguments, up to its closing parenthesis.
        let mut depth = 1usize;
        let mut end = None;
        for (i, c) in call.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = Some(i);
                        break;
                    }
                }
                _ => {}
            }
        }
        let args = &call[..end.expect("unbalanced `.route(` call")];
        let args = args.trim_start();
        assert!(
            args.starts_with('"'),
            "a route path that is not a string literal: {args}"
        );
        let path_len = args[1..].find('"').expect("unterminated route path");
        let path = &args[1..1 + path_len];
        let handlers = &args[1 + path_len + 1..];
        let mut methods = 0;
        for method in METHODS {
            let needle = format!("{method}(");
            for (i, _) in handlers.match_indices(&needle) {
                let before = handlers[..i].chars().next_back();
                if before.is_none_or(|c| !(c.is_alphanumeric() || c == '_')) {
                    routes.insert((path.to_string(), (*method).to_string()));
                    methods += 1;
                }
            }
        }
        assert!(methods > 0, "no method found for route {path}: {handlers}");
        rest = &call[end.unwrap_or(0)..];
    }
    assert!(calls > 0, "no `.route(` calls found in `router`");
    routes
}

/// `(path, method)` of every operation in the document.
fn documented_routes(doc: &Value) -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("no paths") {
        for method in item.as_object().expect("path item").keys() {
            if METHODS.contains(&method.as_str()) {
                routes.insert((path.clone(), method.clone()));
            }
        }
    }
    routes
}

fn parsed_document() -> Value {
    serde_json::from_str(document_json()).expect("/openapi.json is not JSON")
}

/// The schema a `$ref` names (`#/components/schemas/…`), or the schema
/// itself; through `oneOf`/`anyOf`/`allOf` wrappers (an `Option<T>` is
/// `oneOf: [null, T]`), the first that resolves to an object schema.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    if let Some(reference) = schema["$ref"].as_str() {
        let name = reference
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("not a component reference: {reference}"));
        let target = &doc["components"]["schemas"][name];
        assert!(target.is_object(), "{reference} names no schema");
        return resolve(doc, target);
    }
    for wrapper in ["oneOf", "anyOf", "allOf"] {
        if let Some(variants) = schema[wrapper].as_array() {
            for variant in variants {
                let resolved = resolve(doc, variant);
                if resolved["properties"].is_object() || resolved["enum"].is_array() {
                    return resolved;
                }
            }
        }
    }
    schema
}

/// The name of the component schema `schema` refers to, directly or
/// through `oneOf`/`anyOf`/`allOf`.
fn reference_name(schema: &Value) -> Option<String> {
    if let Some(reference) = schema["$ref"].as_str() {
        return reference
            .strip_prefix("#/components/schemas/")
            .map(str::to_string);
    }
    ["oneOf", "anyOf", "allOf"]
        .iter()
        .find_map(|wrapper| schema[*wrapper].as_array()?.iter().find_map(reference_name))
}

fn property_names(schema: &Value) -> BTreeSet<String> {
    schema["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("no properties: {schema}"))
        .keys()
        .cloned()
        .collect()
}

fn required_names(schema: &Value) -> BTreeSet<String> {
    schema["required"]
        .as_array()
        .map(|names| {
            names
                .iter()
                .map(|n| n.as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn keys(value: &Value) -> BTreeSet<String> {
    value.as_object().unwrap().keys().cloned().collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| (*n).to_string()).collect()
}

#[tokio::test]
async fn the_served_document_is_the_generated_one() {
    let response = openapi_json().await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"],
        "application/json",
        "content type"
    );
    let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
    assert_eq!(body, document_json().as_bytes());
    let served: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(served, serde_json::to_value(document()).unwrap());
}

#[test]
fn every_served_route_is_documented_with_its_method() {
    let served = served_routes();
    // The parser found what the router is known to serve (a guard against a
    // parser that silently finds nothing).
    for known in [
        ("/v1/conversations", "post"),
        ("/v1/conversations/batch", "post"),
        ("/v1/conversations/{id}", "get"),
        ("/v1/search", "post"),
        ("/v1/stats", "get"),
        ("/healthz", "get"),
        ("/openapi.json", "get"),
    ] {
        assert!(
            served.contains(&(known.0.to_string(), known.1.to_string())),
            "{} {} not found in the router source: {served:?}",
            known.1,
            known.0
        );
    }

    let doc = parsed_document();
    let documented = documented_routes(&doc);
    let v1: Vec<_> = served
        .iter()
        .filter(|(p, _)| p.starts_with("/v1/"))
        .collect();
    assert!(v1.len() >= 5, "{v1:?}");
    for (path, method) in &served {
        if UNDOCUMENTED.contains(&path.as_str()) {
            continue;
        }
        assert!(
            documented.contains(&(path.clone(), method.clone())),
            "{} {path} is served but not in /openapi.json (documented: {documented:?})",
            method.to_uppercase()
        );
    }
    // And the document claims nothing the router does not serve.
    for (path, method) in &documented {
        assert!(
            served.contains(&(path.clone(), method.clone())),
            "{} {path} is documented but not served",
            method.to_uppercase()
        );
    }
}

#[test]
fn search_request_body_is_what_the_parser_accepts() {
    let doc = parsed_document();
    let operation = &doc["paths"]["/v1/search"]["post"];
    assert!(operation.is_object(), "POST /v1/search missing");
    let body = &operation["requestBody"];
    assert_eq!(body["required"], true, "{body}");
    let schema = resolve(&doc, &body["content"]["application/json"]["schema"]);

    let properties = property_names(schema);
    for field in ["query", "k", "filter", "ef_search"] {
        assert!(properties.contains(field), "{field} missing: {schema}");
    }
    assert_eq!(
        properties,
        set(&[
            "query",
            "k",
            "filter",
            "ef_search",
            "exact",
            "mode",
            "context"
        ])
    );
    assert_eq!(required_names(schema), set(&["query"]), "{schema}");
    assert_eq!(
        schema["additionalProperties"], false,
        "unknown fields are refused"
    );
    let k = &schema["properties"]["k"];
    assert_eq!(k["minimum"], 1, "{k}");
    assert_eq!(k["maximum"].as_u64(), Some(MAX_K as u64), "{k}");
    assert_eq!(k["default"].as_u64(), Some(DEFAULT_K as u64), "{k}");
    let ef = &schema["properties"]["ef_search"];
    assert_eq!(ef["minimum"], 1, "{ef}");
    assert_eq!(
        ef["maximum"].as_u64(),
        Some(u64::from(MAX_EF_SEARCH)),
        "{ef}"
    );

    let filter = resolve(&doc, &schema["properties"]["filter"]);
    assert_eq!(
        property_names(filter),
        set(&["user_id", "channel", "since", "until", "metadata"]),
        "{filter}"
    );
    assert!(required_names(filter).is_empty(), "{filter}");
    assert_eq!(filter["additionalProperties"], false, "{filter}");
    for time in ["since", "until"] {
        assert_eq!(
            filter["properties"][time]["format"], "date-time",
            "{filter}"
        );
    }

    // The schema's example, and a body with every property it names, parse.
    let examples = schema["examples"].as_array().expect("no example request");
    for example in examples {
        parse_search(example.to_string().as_bytes())
            .unwrap_or_else(|e| panic!("the example {example} is refused: {e:?}"));
    }
    let everything = json!({
        "query": "book me a flight to Seattle",
        "k": 5,
        "filter": {
            "user_id": "u-17",
            "channel": "web",
            "since": "2024-05-01T00:00:00Z",
            "until": "2024-06-01T00:00:00Z",
            "metadata": {"locale": "en-US"},
        },
        "ef_search": 100,
        "exact": false,
        "mode": "hybrid",
        "context": 2,
    });
    assert_eq!(keys(&everything), properties);
    assert_eq!(keys(&everything["filter"]), property_names(filter));
    parse_search(everything.to_string().as_bytes()).expect("every documented field");
    // And a field the schema does not name is refused, by name.
    let e = parse_search(br#"{"query":"x","top":3}"#).unwrap_err();
    assert_eq!((e.code(), e.field()), ("invalid_field", Some("top")));
    let e = parse_search(br#"{"k":3}"#).unwrap_err();
    assert_eq!((e.code(), e.field()), ("invalid_field", Some("query")));
}

/// A response with every optional field present, as the handler would
/// serialise it.
fn full_response() -> SearchResponse {
    let at = Utc.with_ymd_and_hms(2024, 5, 1, 10, 0, 0).unwrap();
    SearchResponse {
        model: "all-minilm".into(),
        vectors: Some(convstore_store::models::VectorSet::Previous),
        mode: Mode::Hybrid,
        k: 1,
        count: 1,
        results: vec![SearchResult {
            id: "chat-1".into(),
            conversation_id: uuid::Uuid::nil(),
            client_id: Some("chat-1".into()),
            user_id: "u-17".into(),
            channel: "web".into(),
            summary: Some("flight booking".into()),
            metadata: json!({"locale": "en-US"}),
            created_at: Some(at),
            received_at: at,
            score: 0.032,
            distance: Some(0.2),
            text_rank: Some(0.1),
            ranks: Ranks {
                semantic: Some(1),
                lexical: Some(2),
            },
            chunk: MatchedChunk {
                seq: 0,
                content: "book me a flight".into(),
            },
            context: Some(HitContext {
                first: 0,
                last: 0,
                messages: vec![ContextMessage {
                    index: 0,
                    role: Some("user".into()),
                    content: "book me a flight".into(),
                    in_chunk: true,
                }],
            }),
        }],
        search: Some(SearchPlan {
            strategy: Strategy::HnswOverfetch,
            pgvector: "0.6.2".into(),
            iterative_scan: false,
            ef_search: Some(200),
            rounds: 1,
            candidates: 200,
            filter_matches: Some(12),
            note: "over-fetched".into(),
        }),
        fusion: Some(Fusion {
            rrf_k: 60,
            depth: 20,
        }),
        language: Some("simple".into()),
        semantic_error: Some("no backend answers".into()),
        timings_ms: Timings {
            embed: 1.5,
            database: 2.5,
            total: 4.0,
        },
        query_cached: false,
    }
}

#[test]
fn search_200_response_is_what_the_handler_serialises() {
    let doc = parsed_document();
    let responses = &doc["paths"]["/v1/search"]["post"]["responses"];
    let ok = &responses["200"]["content"]["application/json"]["schema"];
    assert_eq!(
        reference_name(ok).as_deref(),
        Some("SearchResponse"),
        "{ok}"
    );
    let schema = resolve(&doc, ok);
    let actual = serde_json::to_value(full_response()).unwrap();

    // Top level: exactly the serialised keys, all of them always present.
    assert_eq!(property_names(schema), keys(&actual), "{schema}");
    for field in ["model", "k", "count", "results", "search", "timings_ms"] {
        assert!(schema["properties"][field].is_object(), "{field}: {schema}");
    }
    let optional = set(&["search", "fusion", "language", "semantic_error", "vectors"]);
    let always: BTreeSet<String> = keys(&actual).difference(&optional).cloned().collect();
    assert_eq!(required_names(schema), always, "{schema}");

    let results = &schema["properties"]["results"];
    assert_eq!(results["type"], "array", "{results}");
    let hit = resolve(&doc, &results["items"]);
    let actual_hit = &actual["results"][0];
    assert_eq!(property_names(hit), keys(actual_hit), "{hit}");
    for field in ["id", "score", "ranks", "chunk", "conversation_id"] {
        assert!(required_names(hit).contains(field), "{field}: {hit}");
    }
    for optional in [
        "client_id",
        "summary",
        "created_at",
        "distance",
        "text_rank",
        "context",
    ] {
        assert!(!required_names(hit).contains(optional), "{optional}: {hit}");
    }
    let chunk = resolve(&doc, &hit["properties"]["chunk"]);
    assert_eq!(property_names(chunk), keys(&actual_hit["chunk"]), "{chunk}");

    let plan = resolve(&doc, &schema["properties"]["search"]);
    assert_eq!(property_names(plan), keys(&actual["search"]), "{plan}");
    let strategy = resolve(&doc, &plan["properties"]["strategy"]);
    let documented: BTreeSet<String> = strategy["enum"]
        .as_array()
        .unwrap_or_else(|| panic!("strategy is not an enum: {strategy}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    let all = [
        Strategy::Hnsw,
        Strategy::HnswOverfetch,
        Strategy::HnswIterative,
        Strategy::Exact,
        Strategy::ExactFallback,
    ];
    let serialised: BTreeSet<String> = all
        .iter()
        .map(|s| {
            serde_json::to_value(s)
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(documented, serialised);
    assert!(
        serialised
            .iter()
            .all(|s| all.iter().any(|v| v.as_str() == s))
    );

    let timings = resolve(&doc, &schema["properties"]["timings_ms"]);
    assert_eq!(
        property_names(timings),
        keys(&actual["timings_ms"]),
        "{timings}"
    );
}

#[test]
fn search_errors_use_the_error_envelope() {
    let doc = parsed_document();
    let responses = doc["paths"]["/v1/search"]["post"]["responses"]
        .as_object()
        .expect("no responses");
    let statuses: BTreeSet<&str> = responses.keys().map(String::as_str).collect();
    // A search over search.timeout_ms is a 503, not a 504; a body that
    // does not arrive within server.body_timeout_ms is a 408 (issue 15).
    assert_eq!(
        statuses,
        [
            "200", "400", "401", "403", "408", "413", "415", "429", "500", "503"
        ]
        .into_iter()
        .collect()
    );
    let envelope = &doc["components"]["schemas"]["ErrorEnvelope"];
    assert!(envelope["properties"]["error"].is_object(), "{envelope}");
    let mut described = BTreeMap::new();
    for (status, response) in responses {
        if status == "200" {
            continue;
        }
        let schema = &response["content"]["application/json"]["schema"];
        assert_eq!(
            reference_name(schema).as_deref(),
            Some("ErrorEnvelope"),
            "{status}: {response}"
        );
        described.insert(status.as_str(), response["description"].as_str().unwrap());
    }
    let bad = described["400"];
    for named in [
        "invalid_field",
        "invalid_json",
        "`query`",
        "`k`",
        "`ef_search`",
        "`filter.since`",
    ] {
        assert!(bad.contains(named), "400 does not mention {named}: {bad}");
    }
    assert!(
        described["503"].contains("search.timeout_ms"),
        "{}",
        described["503"]
    );

    // The 400 example is the envelope the handler sends for `k: 0`.
    let example = &responses["400"]["content"]["application/json"]["example"];
    let e = parse_search(br#"{"query":"x","k":0}"#).unwrap_err();
    assert_eq!(
        example["error"],
        json!({"code": e.code(), "message": e.message(), "field": e.field()}),
    );
}
