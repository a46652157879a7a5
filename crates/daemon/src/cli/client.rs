//! A small HTTP/1.1 client for the CLI, over the Unix socket or TCP.
//! (reqwest cannot speak over a Unix socket; hyper's connection API can.)

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpStream, UnixStream};

/// Where the daemon listens.
#[derive(Debug, Clone)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

impl Endpoint {
    /// `--url http://127.0.0.1:7070` wins; else `--socket`, else the config's
    /// socket, else its TCP address.
    pub fn choose(
        url: Option<&str>,
        socket: Option<PathBuf>,
        settings: &crate::config::Settings,
    ) -> anyhow::Result<Self> {
        if let Some(url) = url {
            let rest = url
                .strip_prefix("http://")
                .with_context(|| format!("--url must start with http:// (got {url})"))?;
            return Ok(Self::Tcp(rest.trim_end_matches('/').to_string()));
        }
        if let Some(path) = socket {
            return Ok(Self::Unix(path));
        }
        if !settings.server.unix_socket.is_empty() {
            return Ok(Self::Unix(PathBuf::from(&settings.server.unix_socket)));
        }
        if !settings.server.http_addr.is_empty() {
            return Ok(Self::Tcp(settings.server.http_addr.clone()));
        }
        bail!("no endpoint: pass --url or --socket")
    }
}

pub struct Response {
    pub status: StatusCode,
    pub retry_after: Option<Duration>,
    pub body: Bytes,
}

/// One connection, kept alive across requests.
pub struct Client {
    endpoint: Endpoint,
    sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
}

impl Client {
    pub fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            sender: None,
        }
    }

    async fn connect(
        &self,
    ) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
        macro_rules! handshake {
            ($stream:expr) => {{
                let (sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new($stream)).await?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                sender
            }};
        }
        Ok(match &self.endpoint {
            Endpoint::Unix(path) => {
                let stream = UnixStream::connect(path).await.with_context(|| {
                    format!(
                        "cannot connect to {} (is convstore running?)",
                        path.display()
                    )
                })?;
                handshake!(stream)
            }
            Endpoint::Tcp(addr) => {
                let stream = TcpStream::connect(addr)
                    .await
                    .with_context(|| format!("cannot connect to {addr} (is convstore running?)"))?;
                stream.set_nodelay(true)?;
                handshake!(stream)
            }
        })
    }

    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Bytes,
    ) -> anyhow::Result<Response> {
        let sender = match self.sender.take() {
            Some(s) if !s.is_closed() => s,
            _ => self.connect().await?,
        };
        let mut sender = sender;
        sender.ready().await?;
        let host = match &self.endpoint {
            Endpoint::Tcp(addr) => addr.clone(),
            Endpoint::Unix(_) => "localhost".to_string(),
        };
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, host);
        if let Some(ct) = content_type {
            builder = builder.header(hyper::header::CONTENT_TYPE, ct);
        }
        let response = sender.send_request(builder.body(Full::new(body))?).await?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(hyper::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = response.into_body().collect().await?.to_bytes();
        self.sender = Some(sender);
        Ok(Response {
            status,
            retry_after,
            body,
        })
    }

    pub async fn get(&mut self, path: &str) -> anyhow::Result<Response> {
        self.request(Method::GET, path, None, Bytes::new()).await
    }

    pub async fn post_json(
        &mut self,
        path: &str,
        content_type: &str,
        body: Bytes,
    ) -> anyhow::Result<Response> {
        self.request(Method::POST, path, Some(content_type), body)
            .await
    }
}
