//! Access control: optional bearer tokens with per-token rate limits, and
//! the Unix socket file's owner and group.
//!
//! Tokens are configured by their sha256 (`[[auth.tokens]] sha256 = …`),
//! never in clear: the configuration file can be read by more people than
//! should be able to write conversations. A request's token is hashed and
//! compared with every configured hash in constant time (no early exit, no
//! data-dependent branch), so response timing says nothing about how close
//! a guess was. With no tokens configured, nothing is asked.
//!
//! Which requests need a token: every route on TCP except `/healthz`,
//! `/readyz`, `/metrics`, `/v1/stats`, the status page `/` and
//! `/openapi.json` (probes, scrapers and dashboards carry no secrets and
//! reveal no conversation). On the Unix socket only with
//! `auth.require_on_unix_socket`: by default the socket file's owner, group
//! and mode are its access control.
//!
//! Scopes: each token has some of `ingest`, `read`, `delete`, `admin`
//! (`[[auth.tokens]] scopes`, default `ingest` and `read`). The scope a
//! request needs is decided from its method and path alone
//! ([`required_scope`]), before routing, so a route added later is covered
//! without a list to update; a known token without that scope gets 403
//! `forbidden`. `admin` grants every scope.
//!
//! Rate limit: a token bucket per token (`rate_per_sec`, `burst`); an
//! empty bucket answers 429 with `Retry-After`. A request refused for its
//! scope takes nothing from the bucket.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::Request;
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::config::{AuthSettings, Scope, Settings};
use convstore_telemetry::metrics as m;

use super::Transport;
use super::error::ApiError;
use convstore_telemetry::events::label;

/// Routes that never need a token.
const OPEN_ROUTES: &[&str] = &[
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
    "/v1/stats",
    "/",
];

/// A token bucket: `rate` tokens per second up to `burst`.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u32, burst: u32) -> Self {
        let burst = f64::from(if burst == 0 { rate } else { burst }).max(1.0);
        Self {
            rate: f64::from(rate),
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// Takes one token at `now`, or says how many seconds until one is there.
    fn take(&mut self, now: Instant) -> Result<(), u32> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - self.tokens) / self.rate;
            Err((wait.ceil() as u32).max(1))
        }
    }
}

struct Token {
    name: String,
    hash: [u8; 32],
    scopes: Vec<Scope>,
    bucket: Option<Mutex<Bucket>>,
}

impl Token {
    fn allows(&self, needed: Scope) -> bool {
        self.scopes.contains(&Scope::Admin) || self.scopes.contains(&needed)
    }
}

/// The scope a request needs, from its method and path:
/// - anything under `/v1/admin/` → `admin`;
/// - `DELETE` → `delete` (a conversation, a user's everything);
/// - `POST /v1/search` and `GET`/`HEAD` → `read`;
/// - `POST`/`PUT`/`PATCH` under `/v1/conversations` → `ingest` (a post, a
///   batch, an append);
/// - any other method or path → `admin`: a request nothing here knows
///   needs the broadest right, so a new kind of write is never open to a
///   token given less.
pub fn required_scope(method: &Method, path: &str) -> Scope {
    let under = |prefix: &str| {
        path.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    };
    if under("/v1/admin") {
        Scope::Admin
    } else if method == Method::DELETE {
        Scope::Delete
    } else if method == Method::GET
        || method == Method::HEAD
        || (method == Method::POST && path == "/v1/search")
    {
        Scope::Read
    } else if (method == Method::POST || method == Method::PUT || method == Method::PATCH)
        && under("/v1/conversations")
    {
        Scope::Ingest
    } else {
        Scope::Admin
    }
}

/// The configured tokens; `None` from [`Auth::from_settings`] when there
/// are none.
pub struct Auth {
    tokens: Vec<Token>,
    require_on_unix_socket: bool,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.tokens.iter().map(|t| t.name.as_str()).collect();
        f.debug_struct("Auth")
            .field("tokens", &names)
            .field("require_on_unix_socket", &self.require_on_unix_socket)
            .finish()
    }
}

impl Auth {
    /// Access control from `[auth]`, or `None` when no token is configured.
    /// The hashes were checked by [`Settings::validate`]; a malformed one
    /// here matches nothing.
    pub fn from_settings(settings: &AuthSettings) -> Option<Arc<Auth>> {
        if settings.tokens.is_empty() {
            return None;
        }
        let tokens = settings
            .tokens
            .iter()
            .map(|t| {
                let mut hash = [0u8; 32];
                if let Ok(bytes) = hex::decode(t.sha256.trim())
                    && bytes.len() == 32
                {
                    hash.copy_from_slice(&bytes);
                }
                Token {
                    name: t.name.clone(),
                    hash,
                    // Checked by `Settings::validate`; a name that is not a
                    // scope here grants nothing.
                    scopes: t.parsed_scopes().unwrap_or_default(),
                    bucket: (t.rate_per_sec > 0)
                        .then(|| Mutex::new(Bucket::new(t.rate_per_sec, t.burst))),
                }
            })
            .collect();
        Some(Arc::new(Auth {
            tokens,
            require_on_unix_socket: settings.require_on_unix_socket,
        }))
    }

    /// Whether a request to `path` over `transport` needs a token.
    pub fn applies_to(&self, path: &str, transport: Transport) -> bool {
        if OPEN_ROUTES.contains(&path) {
            return false;
        }
        transport == Transport::Tcp || self.require_on_unix_socket
    }

    /// The name of the token in `headers` if it may do what needs
    /// `needed`, or why the request is refused.
    pub fn check(&self, headers: &HeaderMap, needed: Scope) -> Result<&str, ApiError> {
        let Some(presented) = bearer(headers) else {
            metrics::counter!(m::AUTH_REJECTED, label::REASON => "missing").increment(1);
            return Err(ApiError::Unauthorized(
                "this route needs `Authorization: Bearer <token>`".into(),
            ));
        };
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        // Compare with every token, always: the time taken does not depend
        // on which (if any) matched, nor on how many bytes did.
        let mut found: Option<&Token> = None;
        for token in &self.tokens {
            if constant_time_eq(&digest, &token.hash) {
                found = Some(token);
            }
        }
        let Some(token) = found else {
            metrics::counter!(m::AUTH_REJECTED, label::REASON => "invalid").increment(1);
            return Err(ApiError::Unauthorized("unknown bearer token".into()));
        };
        if !token.allows(needed) {
            metrics::counter!(m::AUTH_REJECTED, label::REASON => "scope").increment(1);
            return Err(ApiError::Forbidden(format!(
                "token `{}` does not have the `{needed}` scope this request needs ([[auth.tokens]] scopes)",
                token.name
            )));
        }
        if let Some(bucket) = &token.bucket {
            let taken = bucket
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(Instant::now());
            if let Err(retry_after_secs) = taken {
                metrics::counter!(m::AUTH_REJECTED, label::REASON => "rate_limited").increment(1);
                return Err(ApiError::RateLimited { retry_after_secs });
            }
        }
        Ok(&token.name)
    }
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Equality of two digests without a data-dependent branch or early exit.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    // Keeps the optimiser from turning the fold back into an early exit.
    std::hint::black_box(diff) == 0
}

/// The middleware: refuses requests without a valid token where one is
/// needed. Added to the router only when tokens are configured.
pub async fn require_token(
    auth: Arc<Auth>,
    transport: Transport,
    request: Request,
    next: Next,
) -> Response {
    if auth.applies_to(request.uri().path(), transport) {
        let needed = required_scope(request.method(), request.uri().path());
        match auth.check(request.headers(), needed) {
            Ok(name) => tracing::trace!(token = %name, "Authenticated"),
            Err(e) => return e.into_response(),
        }
    }
    next.run(request).await
}

/// Warns when TCP listens beyond loopback without tokens: anyone who can
/// reach the port can then write and read conversations.
pub fn warn_if_exposed(settings: &Settings) {
    let exposed = settings
        .server
        .http_addr
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|a| !a.ip().is_loopback());
    if exposed && settings.auth.tokens.is_empty() {
        tracing::warn!(
            addr = %settings.server.http_addr,
            "server.http_addr is not a loopback address and no [[auth.tokens]] are configured: anyone who can reach it can write and read conversations"
        );
    }
}

/// Gives the socket file the configured owner and group (`auth.socket_owner`,
/// `auth.socket_group`; names or numeric ids). Changing the owner needs
/// root; the group can be any group convstore's user belongs to.
pub fn apply_socket_owner(path: &Path, settings: &AuthSettings) -> Result<(), String> {
    if settings.socket_owner.is_empty() && settings.socket_group.is_empty() {
        return Ok(());
    }
    let uid = if settings.socket_owner.is_empty() {
        None
    } else {
        Some(
            crate::unix_ids::user_id(&settings.socket_owner)
                .map_err(|e| format!("auth.socket_owner: {e}"))?,
        )
    };
    let gid = if settings.socket_group.is_empty() {
        None
    } else {
        Some(
            crate::unix_ids::group_id(&settings.socket_group)
                .map_err(|e| format!("auth.socket_group: {e}"))?,
        )
    };
    std::os::unix::fs::chown(path, uid, gid).map_err(|e| {
        format!(
            "cannot give {} owner `{}` and group `{}` (auth.socket_owner, auth.socket_group): {e}; \
             changing the owner needs root, the group must be one convstore's user belongs to",
            path.display(),
            settings.socket_owner,
            settings.socket_group
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TokenSettings;
    use std::time::Duration;

    fn settings(rate: u32, burst: u32) -> AuthSettings {
        AuthSettings {
            tokens: vec![
                TokenSettings {
                    name: "ingest".into(),
                    sha256: hex::encode(Sha256::digest(b"s3cret")),
                    rate_per_sec: rate,
                    burst,
                    ..TokenSettings::default()
                },
                TokenSettings {
                    name: "other".into(),
                    sha256: hex::encode(Sha256::digest(b"another")),
                    ..TokenSettings::default()
                },
            ],
            ..AuthSettings::default()
        }
    }

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, value.parse().unwrap());
        h
    }

    #[test]
    fn no_tokens_means_no_auth() {
        assert!(Auth::from_settings(&AuthSettings::default()).is_none());
    }

    #[test]
    fn tokens_are_checked_by_hash() {
        let auth = Auth::from_settings(&settings(0, 0)).unwrap();
        assert_eq!(
            auth.check(&headers("Bearer s3cret"), Scope::Ingest)
                .unwrap(),
            "ingest"
        );
        assert_eq!(
            auth.check(&headers("bearer  another "), Scope::Read)
                .unwrap(),
            "other"
        );
        for bad in [
            "Bearer s3cre",
            "Bearer S3CRET",
            "Basic s3cret",
            "Bearer",
            "s3cret",
        ] {
            let e = auth.check(&headers(bad), Scope::Read).unwrap_err();
            assert_eq!(e.code(), "unauthorized", "{bad}");
        }
        let e = auth.check(&HeaderMap::new(), Scope::Read).unwrap_err();
        assert_eq!(e.status(), axum::http::StatusCode::UNAUTHORIZED);
        // The hash itself is not a token.
        let hash = hex::encode(Sha256::digest(b"s3cret"));
        assert!(
            auth.check(&headers(&format!("Bearer {hash}")), Scope::Read)
                .is_err()
        );
    }

    #[test]
    fn open_routes_and_the_socket() {
        let auth = Auth::from_settings(&settings(0, 0)).unwrap();
        assert!(!auth.applies_to("/healthz", Transport::Tcp));
        assert!(!auth.applies_to("/openapi.json", Transport::Tcp));
        assert!(auth.applies_to("/v1/conversations", Transport::Tcp));
        assert!(!auth.applies_to("/v1/conversations", Transport::Unix));
        let mut s = settings(0, 0);
        s.require_on_unix_socket = true;
        let auth = Auth::from_settings(&s).unwrap();
        assert!(auth.applies_to("/v1/conversations", Transport::Unix));
    }

    #[test]
    fn bucket_allows_burst_then_rate() {
        let start = Instant::now();
        let mut b = Bucket::new(2, 3);
        b.last = start;
        for _ in 0..3 {
            b.take(start).unwrap();
        }
        assert_eq!(b.take(start), Err(1));
        // Half a second refills one token at 2/s.
        b.take(start + Duration::from_millis(500)).unwrap();
        assert!(b.take(start + Duration::from_millis(500)).is_err());
        // A long pause refills up to the burst, not beyond.
        let later = start + Duration::from_secs(60);
        for _ in 0..3 {
            b.take(later).unwrap();
        }
        assert!(b.take(later).is_err());
    }

    #[test]
    fn rate_limit_answers_429_with_retry_after() {
        let auth = Auth::from_settings(&settings(1, 1)).unwrap();
        auth.check(&headers("Bearer s3cret"), Scope::Ingest)
            .unwrap();
        let e = auth
            .check(&headers("Bearer s3cret"), Scope::Ingest)
            .unwrap_err();
        assert_eq!(e.code(), "rate_limited");
        assert_eq!(e.retry_after(), Some(1));
        // Other tokens have their own bucket (none here).
        auth.check(&headers("Bearer another"), Scope::Read).unwrap();
    }

    #[test]
    fn the_scope_a_request_needs() {
        let cases = [
            (Method::POST, "/v1/conversations", Scope::Ingest),
            (Method::POST, "/v1/conversations/batch", Scope::Ingest),
            (
                Method::POST,
                "/v1/conversations/abc/messages",
                Scope::Ingest,
            ),
            (Method::GET, "/v1/conversations/abc", Scope::Read),
            (Method::HEAD, "/v1/conversations/abc", Scope::Read),
            (Method::POST, "/v1/search", Scope::Read),
            (Method::GET, "/v1/stats", Scope::Read),
            (Method::DELETE, "/v1/conversations/abc", Scope::Delete),
            (Method::DELETE, "/v1/users/u-1", Scope::Delete),
            (Method::GET, "/v1/admin/retention", Scope::Admin),
            (Method::POST, "/v1/admin", Scope::Admin),
            (Method::DELETE, "/v1/admin/x", Scope::Admin),
            // Not a prefix match on text: `/v1/administer` is no admin route.
            (Method::GET, "/v1/administer", Scope::Read),
            (Method::POST, "/v1/conversationsx", Scope::Admin),
            // Writes nothing here knows need the broadest right.
            (Method::POST, "/v1/users/u-1", Scope::Admin),
            (Method::PUT, "/v1/something", Scope::Admin),
            (Method::OPTIONS, "/v1/conversations", Scope::Admin),
        ];
        for (method, path, scope) in cases {
            assert_eq!(required_scope(&method, path), scope, "{method} {path}");
        }
    }

    #[test]
    fn a_token_without_the_scope_gets_403_and_admin_gets_everything() {
        let mut s = settings(1, 1);
        s.tokens[1].scopes = vec!["admin".into()];
        s.tokens.push(TokenSettings {
            name: "reader".into(),
            sha256: hex::encode(Sha256::digest(b"reader")),
            scopes: vec!["read".into()],
            ..TokenSettings::default()
        });
        let auth = Auth::from_settings(&s).unwrap();
        // Default scopes: ingest and read, not delete nor admin.
        let e = auth
            .check(&headers("Bearer s3cret"), Scope::Delete)
            .unwrap_err();
        assert_eq!(e.status(), axum::http::StatusCode::FORBIDDEN);
        assert_eq!(e.code(), "forbidden");
        let message = e.message();
        assert!(
            message.contains("`ingest`") && message.contains("`delete`"),
            "names the token and the scope: {message}"
        );
        assert!(auth.check(&headers("Bearer s3cret"), Scope::Admin).is_err());
        // A refusal for the scope takes nothing from the bucket (burst 1).
        assert_eq!(
            auth.check(&headers("Bearer s3cret"), Scope::Ingest)
                .unwrap(),
            "ingest"
        );
        for scope in Scope::ALL {
            assert_eq!(
                auth.check(&headers("Bearer another"), scope).unwrap(),
                "other"
            );
        }
        assert!(auth.check(&headers("Bearer reader"), Scope::Read).is_ok());
        assert_eq!(
            auth.check(&headers("Bearer reader"), Scope::Ingest)
                .unwrap_err()
                .code(),
            "forbidden"
        );
    }

    #[test]
    fn constant_time_eq_is_equality() {
        let a = [7u8; 32];
        let mut b = a;
        assert!(constant_time_eq(&a, &b));
        b[31] ^= 1;
        assert!(!constant_time_eq(&a, &b));
    }

    #[test]
    fn socket_group_is_applied_and_unknown_names_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, b"").unwrap();
        // SAFETY: getgid has no preconditions.
        let gid = unsafe { libc::getgid() };
        let ok = AuthSettings {
            socket_group: gid.to_string(),
            ..AuthSettings::default()
        };
        apply_socket_owner(&path, &ok).unwrap();
        let bad = AuthSettings {
            socket_owner: "no-such-user-convstore".into(),
            ..AuthSettings::default()
        };
        let e = apply_socket_owner(&path, &bad).unwrap_err();
        assert!(e.contains("no user `no-such-user-convstore`"), "{e}");
    }
}
