//! Where the load goes (HTTP or the Unix socket) and the connections that
//! carry it: one kept-alive HTTP/1.1 connection per [`Conn`], through the
//! CLI's hyper client, so both transports take the same code path and
//! differ only in the socket underneath.

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use serde::Serialize;

use super::args::{BenchArgs, TransportChoice};
use crate::cli::client::{Client, Endpoint};
use crate::config::Settings;

pub const INGEST_PATH: &str = "/v1/conversations";

/// The endpoints of a run.
#[derive(Debug, Clone)]
pub struct Target {
    pub endpoint: Endpoint,
    /// Where `/metrics` is read (the same endpoint unless `--metrics-url`).
    pub metrics: Endpoint,
}

/// For the report.
#[derive(Debug, Clone, Serialize)]
pub struct TargetInfo {
    /// `http` or `unix`.
    pub transport: &'static str,
    /// The address or socket path.
    pub address: String,
}

impl Target {
    pub fn resolve(args: &BenchArgs, settings: &Settings) -> anyhow::Result<Self> {
        let endpoint = match (args.transport, &args.url, &args.socket) {
            (Some(TransportChoice::Http), None, None) => {
                if settings.server.http_addr.is_empty() {
                    bail!(
                        "--transport http: server.http_addr is empty in the configuration; pass --url"
                    );
                }
                Endpoint::Tcp(settings.server.http_addr.clone())
            }
            (Some(TransportChoice::Unix), None, None) => {
                if settings.server.unix_socket.is_empty() {
                    bail!(
                        "--transport unix: server.unix_socket is empty in the configuration; pass --socket"
                    );
                }
                Endpoint::Unix(settings.server.unix_socket.clone().into())
            }
            _ => Endpoint::choose(args.url.as_deref(), args.socket.clone(), settings)?,
        };
        let metrics = match &args.metrics_url {
            Some(url) => Endpoint::choose(Some(url), None, settings)
                .context("--metrics-url must look like http://127.0.0.1:7070")?,
            None => endpoint.clone(),
        };
        Ok(Self { endpoint, metrics })
    }

    pub fn info(&self) -> TargetInfo {
        match &self.endpoint {
            Endpoint::Tcp(addr) => TargetInfo {
                transport: "http",
                address: format!("http://{addr}"),
            },
            Endpoint::Unix(path) => TargetInfo {
                transport: "unix",
                address: path.display().to_string(),
            },
        }
    }
}

/// What one request came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// An HTTP answer with this status.
    Status(u16),
    /// No answer within the timeout.
    Timeout,
    /// The connection failed; the message says how.
    Failed(String),
}

/// One connection to the daemon.
pub struct Conn {
    client: Client,
    timeout: Duration,
}

impl Conn {
    /// Opens a connection and proves it with `GET /healthz`, so connection
    /// set-up is not timed as part of the first request.
    pub async fn open(endpoint: &Endpoint, timeout: Duration) -> anyhow::Result<Self> {
        let mut client = Client::new(endpoint.clone());
        let answer = tokio::time::timeout(timeout, client.get("/healthz"))
            .await
            .with_context(|| {
                format!(
                    "{} did not answer /healthz in {timeout:?}",
                    describe(endpoint)
                )
            })??;
        if !answer.status.is_success() {
            bail!(
                "{} answered /healthz with HTTP {}: is this convstore?",
                describe(endpoint),
                answer.status
            );
        }
        Ok(Self { client, timeout })
    }

    /// Posts one conversation. The response body is read (the connection
    /// is reused), not parsed.
    pub async fn post(&mut self, body: Bytes) -> Outcome {
        let sent = self.client.post_json(INGEST_PATH, "application/json", body);
        match tokio::time::timeout(self.timeout, sent).await {
            Ok(Ok(response)) => Outcome::Status(response.status.as_u16()),
            // The client drops a connection that failed mid-request and
            // opens a new one for the next.
            Ok(Err(e)) => Outcome::Failed(format!("{e:#}")),
            Err(_) => Outcome::Timeout,
        }
    }
}

/// Opens `n` connections, one after another (a burst of connects would be
/// timed by nobody but would still compete with the first requests).
pub async fn open_all(
    endpoint: &Endpoint,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<Conn>> {
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let conn = Conn::open(endpoint, timeout)
            .await
            .with_context(|| format!("opening connection {} of {n}", i + 1))?;
        conns.push(conn);
    }
    Ok(conns)
}

pub fn describe(endpoint: &Endpoint) -> String {
    match endpoint {
        Endpoint::Tcp(addr) => format!("http://{addr}"),
        Endpoint::Unix(path) => format!("the socket {}", path.display()),
    }
}
