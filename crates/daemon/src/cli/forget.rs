//! `convstore delete ID` and `convstore erase-user USER`: ask a running
//! daemon to delete one conversation (`DELETE /v1/conversations/{id}`) or
//! everything of one user (`DELETE /v1/users/{user_id}`), and say what
//! went. Exit status 0 when deleted, 1 when the daemon refused (404: not
//! known; 503: the database is unreachable and nothing was deleted).
//! `convstore redrive` asks it to put failed chunks back to pending
//! (`POST /v1/admin/redrive`), the same way.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use bytes::Bytes;
use hyper::Method;
use serde_json::Value;

use super::client::{Client, Endpoint};
use crate::config::Settings;

/// Where the daemon is and how to print its answer.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// Print the daemon's JSON answer as it is.
    #[arg(long)]
    pub json: bool,
    /// Unix socket of the daemon (default: server.unix_socket from the config).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// HTTP base URL instead of the socket, e.g. http://127.0.0.1:7070.
    #[arg(long)]
    pub url: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    /// The conversation's id (yours, or the one convstore assigned).
    pub id: String,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Debug, clap::Args)]
pub struct RedriveArgs {
    #[command(flatten)]
    pub target: Target,
}

#[derive(Debug, clap::Args)]
pub struct EraseUserArgs {
    /// The user whose conversations, chunks, vectors and queued changes go.
    pub user_id: String,
    #[command(flatten)]
    pub target: Target,
}

pub async fn delete(args: DeleteArgs, settings: &Settings) -> anyhow::Result<ExitCode> {
    let path = format!("/v1/conversations/{}", path_segment(&args.id));
    let answer = call(&args.target, settings, Method::DELETE, &path).await?;
    Ok(report(&args.target, &answer, |v| {
        format!(
            "deleted conversation {}: {} chunks, {} queued changes withdrawn",
            v["id"].as_str().unwrap_or(&args.id),
            v["chunks"],
            v["queued_changes"]
        )
    }))
}

pub async fn erase_user(args: EraseUserArgs, settings: &Settings) -> anyhow::Result<ExitCode> {
    let path = format!("/v1/users/{}", path_segment(&args.user_id));
    let answer = call(&args.target, settings, Method::DELETE, &path).await?;
    Ok(report(&args.target, &answer, |v| {
        format!(
            "erased user {}: {} conversations, {} chunks, {} cache entries, {} queued changes withdrawn",
            v["user_id"].as_str().unwrap_or(&args.user_id),
            v["conversations"],
            v["chunks"],
            v["cache_entries"],
            v["queued_changes"]
        )
    }))
}

/// `convstore redrive`: every chunk marked `failed` back to `pending`
/// (`POST /v1/admin/redrive`); the daemon's backfill embeds them again.
pub async fn redrive(args: RedriveArgs, settings: &Settings) -> anyhow::Result<ExitCode> {
    let answer = call(&args.target, settings, Method::POST, "/v1/admin/redrive").await?;
    Ok(report(&args.target, &answer, |v| {
        format!(
            "re-drove {} failed chunks of {} conversations: pending again, the backfill embeds them",
            v["chunks"], v["conversations"]
        )
    }))
}

/// The daemon's status and JSON answer.
pub(super) struct Answer {
    ok: bool,
    status: u16,
    body: Value,
}

pub(super) async fn call(
    target: &Target,
    settings: &Settings,
    method: Method,
    path: &str,
) -> anyhow::Result<Answer> {
    let endpoint = Endpoint::choose(target.url.as_deref(), target.socket.clone(), settings)?;
    let mut client = Client::new(endpoint);
    let response = client.request(method, path, None, Bytes::new()).await?;
    let body: Value = serde_json::from_slice(&response.body).with_context(|| {
        format!(
            "the daemon answered HTTP {} with something that is not JSON: {}",
            response.status,
            String::from_utf8_lossy(&response.body)
        )
    })?;
    Ok(Answer {
        ok: response.status.is_success(),
        status: response.status.as_u16(),
        body,
    })
}

pub(super) fn report(
    target: &Target,
    answer: &Answer,
    done: impl Fn(&Value) -> String,
) -> ExitCode {
    if target.json {
        println!("{}", answer.body);
    } else if answer.ok {
        println!("{}", done(&answer.body));
    } else {
        eprintln!(
            "convstore: HTTP {}: {}",
            answer.status,
            answer.body["error"]["message"]
                .as_str()
                .unwrap_or("(no message)")
        );
    }
    if answer.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `id` as one URL path segment: everything but RFC 3986's unreserved
/// characters percent-encoded, so an id with `/`, `?`, `#` or spaces names
/// itself and nothing else.
fn path_segment(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for byte in id.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_one_path_segment() {
        assert_eq!(path_segment("chat-42_a.b~"), "chat-42_a.b~");
        assert_eq!(path_segment("a/b?c#d e"), "a%2Fb%3Fc%23d%20e");
        assert_eq!(path_segment("é"), "%C3%A9");
    }
}
