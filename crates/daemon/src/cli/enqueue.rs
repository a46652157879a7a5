//! `convstore enqueue FILE|-`: sends conversations to a running daemon in
//! NDJSON batches, resending what a full queue refused after `Retry-After`.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use serde_json::Value;

use super::client::{Client, Endpoint};
use crate::config::Settings;

#[derive(Debug, clap::Args)]
pub struct EnqueueArgs {
    /// JSON object, JSON array or JSONL file of conversations; `-` reads stdin.
    pub file: PathBuf,
    /// The input is in the shared sample's format (conversation_id, source, messages).
    #[arg(long)]
    pub sample: bool,
    /// Unix socket of the daemon (default: server.unix_socket from the config).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// HTTP base URL instead of the socket, e.g. http://127.0.0.1:7070.
    #[arg(long)]
    pub url: Option<String>,
    /// Conversations per request.
    #[arg(long, default_value_t = 500)]
    pub batch_size: usize,
    /// Give up after a full queue refused the same items this many times.
    #[arg(long, default_value_t = 600)]
    pub max_retries: u32,
}

pub async fn run(args: EnqueueArgs, settings: &Settings) -> anyhow::Result<ExitCode> {
    let text = if args.file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read stdin")?;
        s
    } else {
        std::fs::read_to_string(&args.file)
            .with_context(|| format!("cannot read {}", args.file.display()))?
    };
    let items = convstore_dataset::parse_jsonl(&text, args.sample)?;
    let endpoint = Endpoint::choose(args.url.as_deref(), args.socket.clone(), settings)?;
    let mut client = Client::new(endpoint);
    let (mut accepted, mut rejected) = (0usize, 0usize);
    for batch in items.chunks(args.batch_size.max(1)) {
        let (a, r) = send_batch(&mut client, batch, args.max_retries).await?;
        accepted += a;
        rejected += r;
    }
    println!(
        "{accepted} accepted, {rejected} rejected, {} sent",
        items.len()
    );
    Ok(if rejected == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Sends one batch; items refused for a full queue are resent after the
/// server's `Retry-After`. Returns (accepted, rejected for good).
async fn send_batch(
    client: &mut Client,
    batch: &[Value],
    max_retries: u32,
) -> anyhow::Result<(usize, usize)> {
    let mut pending: Vec<&Value> = batch.iter().collect();
    let (mut accepted, mut rejected) = (0, 0);
    let mut retries = 0;
    while !pending.is_empty() {
        let mut body = Vec::new();
        for item in &pending {
            serde_json::to_writer(&mut body, item)?;
            body.push(b'\n');
        }
        let response = client
            .post_json(
                "/v1/conversations/batch",
                "application/x-ndjson",
                Bytes::from(body),
            )
            .await?;
        let parsed: Value = serde_json::from_slice(&response.body).with_context(|| {
            format!(
                "unexpected answer (HTTP {}): {}",
                response.status,
                String::from_utf8_lossy(&response.body)
            )
        })?;
        let Some(results) = parsed.get("results").and_then(Value::as_array) else {
            anyhow::bail!("HTTP {}: {}", response.status, parsed);
        };
        let mut again = Vec::new();
        for (item, result) in pending.iter().zip(results) {
            if result.get("status").and_then(Value::as_str) == Some("queued") {
                accepted += 1;
                continue;
            }
            let code = result
                .pointer("/error/code")
                .and_then(Value::as_str)
                .unwrap_or("");
            if code == "queue_full" {
                again.push(*item);
            } else {
                rejected += 1;
                let id = item.get("id").and_then(Value::as_str).unwrap_or("?");
                let message = result
                    .pointer("/error/message")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                eprintln!("rejected {id}: {code}: {message}");
            }
        }
        if !again.is_empty() {
            retries += 1;
            if retries > max_retries {
                anyhow::bail!(
                    "the queue stayed full; {} conversations not sent",
                    again.len()
                );
            }
            tokio::time::sleep(
                response
                    .retry_after
                    .unwrap_or(Duration::from_secs(1))
                    .min(Duration::from_secs(5)),
            )
            .await;
        }
        pending = again;
    }
    Ok((accepted, rejected))
}
