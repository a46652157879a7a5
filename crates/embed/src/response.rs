//! Reading an HTTP backend's answer into memory, at most
//! `max_response_bytes` of it (per backend; `docs/ROUTING.md`).
//!
//! A backend that answers too much (a proxy's error page looping, a
//! misconfigured server, a batch far larger than asked for) must not cost
//! more memory than a legitimate answer: one 200 MB answer once added
//! ~545 MB RSS, the body and its parse held at once. The body is read a
//! chunk at a time and abandoned (the connection dropped) as soon as it
//! passes the cap; a `Content-Length` over the cap is refused before any of
//! the body is read.

use std::time::Duration;

use reqwest::header::RETRY_AFTER;
use reqwest::{Response, StatusCode};

use crate::EmbedError;

/// An HTTP backend's answer, read whole: what both clients act on.
pub struct Answer {
    pub status: StatusCode,
    /// `Retry-After` in its delay-seconds form.
    pub retry_after: Option<Duration>,
    pub body: Vec<u8>,
}

/// Reads `response` into an [`Answer`], its body through [`read_body`].
pub async fn read_answer(
    backend: &str,
    response: Response,
    max_bytes: u64,
    transport: impl Fn(&reqwest::Error) -> EmbedError,
) -> Result<Answer, EmbedError> {
    let status = response.status();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    let body = read_body(backend, response, max_bytes, transport).await?;
    Ok(Answer {
        status,
        retry_after,
        body,
    })
}

/// `Retry-After` in its delay-seconds form. The HTTP-date form is ignored:
/// no backend we speak to sends it, and the caller's own backoff applies.
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Default of `max_response_bytes`: 16 MiB. The largest legitimate answer
/// of the default configuration (32 inputs × 384 dimensions) is under
/// 0.5 MB even as pretty-printed float JSON, and 32 × 3,072 (OpenAI's
/// largest model) under 4 MB, so this leaves room for bigger batches while
/// bounding one call to tens of MB (the body plus its parse), not hundreds.
/// The daemon's configuration check refuses a cap below
/// [`largest_expected_answer`].
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 16 << 20;

/// Bytes per vector component in the bulkiest answer a backend legitimately
/// sends: OpenAI's `float` answers are indented JSON, one number a line
/// (`        -0.006929283495992422,\n`, ~31 bytes; exponent forms ~33), so
/// 40 leaves a margin. Ollama's compact Go `float32` JSON takes ~14, base64
/// 5.3.
pub const ANSWER_BYTES_PER_COMPONENT: u64 = 40;

/// Room for everything in an answer but the vectors: the envelope, the
/// usage counts, `/api/show`'s model metadata and licence text.
pub const ANSWER_ENVELOPE_BYTES: u64 = 1 << 20;

/// The largest answer a backend may legitimately send for a batch of
/// `max_batch_inputs` texts of `dimensions`-long vectors:
/// a `max_response_bytes` below it would refuse good answers.
pub fn largest_expected_answer(max_batch_inputs: usize, dimensions: usize) -> u64 {
    (max_batch_inputs as u64)
        .saturating_mul(dimensions as u64)
        .saturating_mul(ANSWER_BYTES_PER_COMPONENT)
        .saturating_add(ANSWER_ENVELOPE_BYTES)
}

/// The whole body of `response`, if it holds at most `max_bytes`; else a
/// [`EmbedError::Protocol`] naming `backend` and the cap, after reading at
/// most `max_bytes` plus one chunk of it. `transport` maps a failure to read
/// (timeout, connection lost) as the caller maps its other I/O errors.
pub async fn read_body(
    backend: &str,
    mut response: Response,
    max_bytes: u64,
    transport: impl Fn(&reqwest::Error) -> EmbedError,
) -> Result<Vec<u8>, EmbedError> {
    let too_large = |what: String| {
        EmbedError::Protocol(format!(
            "backend `{backend}` {what}, over its max_response_bytes = {max_bytes}; \
             the rest was not read (raise max_response_bytes if this backend's answers are \
             legitimately that large)"
        ))
    };
    if let Some(announced) = response.content_length()
        && announced > max_bytes
    {
        return Err(too_large(format!("announced a {announced}-byte answer")));
    }
    // Sized by what was announced (already known to fit), else grown as
    // chunks come: never more than the cap up front.
    let capacity = response.content_length().unwrap_or(0).min(max_bytes);
    let mut body = Vec::with_capacity(usize::try_from(capacity).unwrap_or(0));
    while let Some(chunk) = response.chunk().await.map_err(|e| transport(&e))? {
        if body.len() as u64 + chunk.len() as u64 > max_bytes {
            // Dropping `response` unread closes the connection: the rest
            // of the answer is never received.
            return Err(too_large(format!(
                "sent an answer longer than {max_bytes} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A loopback server answering one request with a flood: a body far over
/// any cap, sent in 64 KiB pieces, counting what it got out before the
/// client hung up. Raw HTTP/1.1, because the point is what a server that
/// does not follow the protocol sends.
#[cfg(test)]
pub(crate) mod flood {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    /// 200 MB, the answer of the incident.
    pub const FLOOD_BYTES: u64 = 200_000_000;
    const PIECE: usize = 64 << 10;

    /// How the flood's length is told.
    #[derive(Debug, Clone, Copy)]
    pub enum Framing {
        /// `Content-Length: FLOOD_BYTES`, so the client can refuse before
        /// reading.
        ContentLength,
        /// `Transfer-Encoding: chunked`: the client learns the size only by
        /// reading.
        Chunked,
    }

    /// What the server managed to send.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Sent {
        /// Body bytes written into the socket (the kernel's buffers
        /// included: up to a few MB more than the client read).
        pub body_bytes: u64,
        /// The client closed the connection before the whole body was out.
        pub cut_short: bool,
    }

    /// Serves one flood on 127.0.0.1; returns its base URL and what it
    /// sent, known once the connection ends.
    pub async fn serve(framing: Framing) -> (String, JoinHandle<Sent>) {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let url = format!(
            "http://{}",
            listener.local_addr().unwrap_or_else(|e| panic!("{e}"))
        );
        let task = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap_or_else(|e| panic!("{e}"));
            read_request(&mut socket).await;
            let head = match framing {
                Framing::ContentLength => format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {FLOOD_BYTES}\r\n\r\n"
                ),
                Framing::Chunked => "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n".to_string(),
            };
            if socket.write_all(head.as_bytes()).await.is_err() {
                return Sent {
                    body_bytes: 0,
                    cut_short: true,
                };
            }
            // A JSON answer that never ends: `{"embeddings":[[0.1,0.1,...`.
            let mut piece = b"0.1,".repeat(PIECE / 4);
            piece[..16].copy_from_slice(b"{\"embeddings\":[[");
            let mut sent = 0u64;
            while sent < FLOOD_BYTES {
                let n = (FLOOD_BYTES - sent).min(PIECE as u64) as usize;
                let written = match framing {
                    Framing::ContentLength => socket.write_all(&piece[..n]).await,
                    Framing::Chunked => {
                        let mut framed = format!("{n:x}\r\n").into_bytes();
                        framed.extend_from_slice(&piece[..n]);
                        framed.extend_from_slice(b"\r\n");
                        socket.write_all(&framed).await
                    }
                };
                if written.is_err() {
                    return Sent {
                        body_bytes: sent,
                        cut_short: true,
                    };
                }
                sent += n as u64;
                piece[..16].copy_from_slice(b"0.1,0.1,0.1,0.1,");
            }
            if let Framing::Chunked = framing {
                let _ = socket.write_all(b"0\r\n\r\n").await;
            }
            Sent {
                body_bytes: sent,
                cut_short: false,
            }
        });
        (url, task)
    }

    /// Reads the request's head and body (by its Content-Length), so the
    /// client is never refused for writing.
    async fn read_request(socket: &mut tokio::net::TcpStream) {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let Ok(n) = socket.read(&mut buf).await else {
                return;
            };
            if n == 0 {
                return;
            }
            seen.extend_from_slice(&buf[..n]);
            if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&seen[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                let mut have = seen.len() - (end + 4);
                while have < length {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => have += n,
                    }
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_cap_covers_the_default_configuration_and_openais_largest_model() {
        assert_eq!(largest_expected_answer(32, 384), 32 * 384 * 40 + (1 << 20));
        assert!(largest_expected_answer(32, 384) < DEFAULT_MAX_RESPONSE_BYTES);
        assert!(largest_expected_answer(32, 3072) < DEFAULT_MAX_RESPONSE_BYTES);
        assert_eq!(largest_expected_answer(usize::MAX, usize::MAX), u64::MAX);
    }

    const CAP: u64 = 1 << 20;

    /// Reads a flood through `read_body` with a 1 MiB cap; the error and
    /// what the server got out.
    async fn read_flood(framing: flood::Framing) -> (String, flood::Sent) {
        let (url, server) = flood::serve(framing).await;
        let client = reqwest::Client::new();
        let response = client
            .post(&url)
            .body("{}")
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let result = read_body("flooder", response, CAP, |e| {
            EmbedError::Unreachable(e.to_string())
        })
        .await;
        // Closes any connection the client might still hold, so the server
        // ends even if the body were kept open.
        drop(client);
        let sent = server.await.unwrap_or_else(|e| panic!("{e}"));
        match result {
            Err(EmbedError::Protocol(message)) => (message, sent),
            other => panic!("not a protocol error: {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_announced_length_over_the_cap_is_refused_unread() {
        let (message, sent) = read_flood(flood::Framing::ContentLength).await;
        assert!(message.contains("backend `flooder`"), "{message}");
        assert!(
            message.contains("announced a 200000000-byte answer"),
            "{message}"
        );
        assert!(
            message.contains("max_response_bytes = 1048576"),
            "{message}"
        );
        assert!(sent.cut_short, "{sent:?}");
        assert!(sent.body_bytes < flood::FLOOD_BYTES / 4, "{sent:?}");
    }

    #[tokio::test]
    async fn a_streamed_answer_is_cut_at_the_cap() {
        let (message, sent) = read_flood(flood::Framing::Chunked).await;
        assert!(message.contains("backend `flooder`"), "{message}");
        assert!(message.contains("longer than 1048576 bytes"), "{message}");
        // The client hung up after about the cap: what the server got out
        // beyond it sat in the two sockets' kernel buffers (a few MB on
        // loopback), never in the client's memory.
        assert!(sent.cut_short, "{sent:?}");
        assert!(sent.body_bytes < 32 << 20, "{sent:?}");
        eprintln!(
            "streamed flood: the server got {} of {} bytes out before the client hung up",
            sent.body_bytes,
            flood::FLOOD_BYTES
        );
    }
}
