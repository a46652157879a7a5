//! `convstore search "text"`: asks a running daemon (`POST /v1/search`,
//! over its Unix socket or HTTP) for the conversations nearest in meaning,
//! and prints them readably (score, who, where, when, a snippet of the
//! best-matching chunk) or as the daemon's JSON (`--json`).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use bytes::Bytes;
use chrono::{DateTime, Duration as ChronoDuration, NaiveDate, Utc};
use serde_json::{Value, json};

use super::client::{Client, Endpoint};
use crate::config::Settings;

#[derive(Debug, clap::Args)]
pub struct SearchArgs {
    /// What to look for, in plain words.
    pub query: String,
    /// Conversations to return (1 to 100).
    #[arg(short, long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub k: u32,
    /// Only this user's conversations.
    #[arg(long)]
    pub user: Option<String>,
    /// Only conversations from this channel.
    #[arg(long)]
    pub channel: Option<String>,
    /// Only conversations from this time on: RFC 3339
    /// (2024-05-01T10:00:00Z), a date (2024-05-01, UTC), or an age
    /// (30m, 12h, 7d, 2w = that long ago).
    #[arg(long, value_parser = parse_time)]
    pub since: Option<DateTime<Utc>>,
    /// Only conversations before this time (same forms as --since).
    #[arg(long, value_parser = parse_time)]
    pub until: Option<DateTime<Utc>>,
    /// Only conversations whose metadata contains this JSON object, e.g.
    /// '{"locale":"en-US"}'.
    #[arg(long, value_parser = parse_metadata)]
    pub metadata: Option<Value>,
    /// HNSW candidate list size for this search (1 to 1000; default
    /// search.ef_search).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub ef_search: Option<u32>,
    /// Compare every stored chunk instead of using the index (slow, exact).
    #[arg(long)]
    pub exact: bool,
    /// semantic (by meaning), lexical (by words; needs no embedding
    /// backend) or hybrid (both, fused; the daemon's default).
    #[arg(long, value_parser = ["semantic", "lexical", "hybrid"])]
    pub mode: Option<String>,
    /// Messages to show on each side of the best chunk's (0 to 20).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=20))]
    pub context: u32,
    /// Print the daemon's JSON answer as it is.
    #[arg(long)]
    pub json: bool,
    /// Characters of each snippet.
    #[arg(long, default_value_t = 160)]
    pub width: usize,
    /// Unix socket of the daemon (default: server.unix_socket from the config).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// HTTP base URL instead of the socket, e.g. http://127.0.0.1:7070.
    #[arg(long)]
    pub url: Option<String>,
}

pub async fn run(args: SearchArgs, settings: &Settings) -> anyhow::Result<ExitCode> {
    let endpoint = Endpoint::choose(args.url.as_deref(), args.socket.clone(), settings)?;
    let body = request_body(&args);
    let mut client = Client::new(endpoint);
    let response = client
        .post_json(
            "/v1/search",
            "application/json",
            Bytes::from(serde_json::to_vec(&body)?),
        )
        .await?;
    let answer: Value = serde_json::from_slice(&response.body).with_context(|| {
        format!(
            "the daemon answered HTTP {} with something that is not JSON: {}",
            response.status,
            String::from_utf8_lossy(&response.body)
        )
    })?;
    if !response.status.is_success() {
        let message = answer["error"]["message"]
            .as_str()
            .unwrap_or("no message")
            .to_string();
        bail!("search refused (HTTP {}): {message}", response.status);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        print!("{}", render(&answer, &args.query, args.width));
    }
    Ok(ExitCode::SUCCESS)
}

/// The `POST /v1/search` body for these arguments.
fn request_body(args: &SearchArgs) -> Value {
    let mut filter = serde_json::Map::new();
    if let Some(user) = &args.user {
        filter.insert("user_id".into(), json!(user));
    }
    if let Some(channel) = &args.channel {
        filter.insert("channel".into(), json!(channel));
    }
    if let Some(since) = args.since {
        filter.insert("since".into(), json!(since.to_rfc3339()));
    }
    if let Some(until) = args.until {
        filter.insert("until".into(), json!(until.to_rfc3339()));
    }
    if let Some(metadata) = &args.metadata {
        filter.insert("metadata".into(), metadata.clone());
    }
    let mut body = json!({"query": args.query, "k": args.k});
    if !filter.is_empty() {
        body["filter"] = Value::Object(filter);
    }
    if let Some(ef) = args.ef_search {
        body["ef_search"] = json!(ef);
    }
    if args.exact {
        body["exact"] = json!(true);
    }
    if let Some(mode) = &args.mode {
        body["mode"] = json!(mode);
    }
    if args.context > 0 {
        body["context"] = json!(args.context);
    }
    body
}

/// The answer as text: one block per conversation, then how it was found.
fn render(answer: &Value, query: &str, width: usize) -> String {
    let mut out = String::new();
    let empty = Vec::new();
    let results = answer["results"].as_array().unwrap_or(&empty);
    if results.is_empty() {
        out.push_str("No matching conversations.\n");
    }
    for (i, hit) in results.iter().enumerate() {
        let when = hit["created_at"]
            .as_str()
            .or(hit["received_at"].as_str())
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc).format("%Y-%m-%d %H:%M").to_string())
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{:>2}. {:.3}  {}  ({} · {} · {})",
            i + 1,
            hit["score"].as_f64().unwrap_or(0.0),
            hit["id"].as_str().unwrap_or("?"),
            hit["user_id"].as_str().unwrap_or("?"),
            hit["channel"].as_str().unwrap_or("?"),
            when,
        );
        let ranks = &hit["ranks"];
        let mut found = Vec::new();
        if let Some(r) = ranks["semantic"].as_u64() {
            found.push(format!("semantic #{r}"));
        }
        if let Some(r) = ranks["lexical"].as_u64() {
            found.push(format!("lexical #{r}"));
        }
        if !found.is_empty() {
            let _ = writeln!(out, "    [{}]", found.join(", "));
        }
        let context = hit["context"]["messages"].as_array();
        match context {
            Some(messages) => {
                for m in messages {
                    let marker = if m["in_chunk"].as_bool().unwrap_or(false) {
                        '>'
                    } else {
                        ' '
                    };
                    let text = match m["role"].as_str() {
                        Some(role) => format!("{role}: {}", m["content"].as_str().unwrap_or("")),
                        None => m["content"].as_str().unwrap_or("").to_string(),
                    };
                    let _ = writeln!(out, "   {marker}{}", snippet(&text, query, width));
                }
            }
            None => {
                let content = hit["chunk"]["content"].as_str().unwrap_or("");
                let _ = writeln!(out, "    {}", snippet(content, query, width));
            }
        }
    }
    let plan = &answer["search"];
    let _ = writeln!(
        out,
        "-- {} of k={} · {} · {} · {} · {:.1} ms (embed {:.1}, database {:.1})",
        answer["count"].as_u64().unwrap_or(0),
        answer["k"].as_u64().unwrap_or(0),
        answer["mode"].as_str().unwrap_or("?"),
        answer["model"].as_str().unwrap_or("?"),
        plan["strategy"].as_str().unwrap_or("lexical"),
        answer["timings_ms"]["total"].as_f64().unwrap_or(0.0),
        answer["timings_ms"]["embed"].as_f64().unwrap_or(0.0),
        answer["timings_ms"]["database"].as_f64().unwrap_or(0.0),
    );
    if let Some(note) = plan["note"].as_str().filter(|n| !n.is_empty()) {
        let _ = writeln!(out, "-- {note}");
    }
    if let Some(error) = answer["semantic_error"].as_str() {
        let _ = writeln!(out, "-- lexical results only: {error}");
    }
    out
}

/// Up to `width` characters of `text` on one line, around the first query
/// word (of 3+ letters) it contains, with `…` where it was cut.
fn snippet(text: &str, query: &str, width: usize) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let chars: Vec<char> = flat.chars().collect();
    let width = width.max(20);
    if chars.len() <= width {
        return flat;
    }
    let lower = flat.to_lowercase();
    let hit_byte = query
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.chars().count() >= 3)
        .filter_map(|w| lower.find(&w.to_lowercase()))
        .min();
    // Lower-casing can change byte lengths; count characters in the
    // lower-cased text up to the hit, a close enough position.
    let hit_char = hit_byte.map_or(0, |b| lower[..b].chars().count());
    let start = hit_char.saturating_sub(width / 4).min(chars.len() - width);
    let end = (start + width).min(chars.len());
    let mut s = String::new();
    if start > 0 {
        s.push('…');
    }
    s.extend(&chars[start..end]);
    if end < chars.len() {
        s.push('…');
    }
    s
}

/// RFC 3339, a date (midnight UTC), or an age (`30m`, `12h`, `7d`, `2w`).
fn parse_time(value: &str) -> Result<DateTime<Utc>, String> {
    parse_time_at(value, Utc::now())
}

fn parse_time_at(value: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let value = value.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(value) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(date) = NaiveDate::parse_from_str(value, "%Y-%m-%d")
        && let Some(t) = date.and_hms_opt(0, 0, 0)
    {
        return Ok(t.and_utc());
    }
    let unit_at = value.len().saturating_sub(1);
    if let (Ok(n), Some(unit)) = (value[..unit_at].parse::<i64>(), value.get(unit_at..)) {
        let age = match unit {
            "s" => ChronoDuration::try_seconds(n),
            "m" => ChronoDuration::try_minutes(n),
            "h" => ChronoDuration::try_hours(n),
            "d" => ChronoDuration::try_days(n),
            "w" => ChronoDuration::try_weeks(n),
            _ => None,
        };
        if let Some(t) = age
            .filter(|_| n >= 0)
            .and_then(|a| now.checked_sub_signed(a))
        {
            return Ok(t);
        }
    }
    Err(format!(
        "`{value}` is not a time: use RFC 3339 (2024-05-01T10:00:00Z), a date (2024-05-01) \
         or an age (30m, 12h, 7d, 2w)"
    ))
}

fn parse_metadata(value: &str) -> Result<Value, String> {
    match serde_json::from_str::<Value>(value) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err("must be a JSON object, e.g. '{\"locale\":\"en-US\"}'".into()),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_in_every_form() {
        let now = DateTime::parse_from_rfc3339("2024-05-10T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let at = |v| parse_time_at(v, now).map(|t| t.to_rfc3339());
        assert_eq!(
            at("2024-05-01T10:00:00+02:00").unwrap(),
            "2024-05-01T08:00:00+00:00"
        );
        assert_eq!(at("2024-05-01").unwrap(), "2024-05-01T00:00:00+00:00");
        assert_eq!(at("7d").unwrap(), "2024-05-03T12:00:00+00:00");
        assert_eq!(at("90m").unwrap(), "2024-05-10T10:30:00+00:00");
        assert_eq!(at("2w").unwrap(), "2024-04-26T12:00:00+00:00");
        for bad in ["yesterday", "7x", "-3d", "", "d", "2024-13-01"] {
            assert!(at(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn snippet_centres_on_a_query_word() {
        let text = format!(
            "{} I need a flight to Seattle on Friday {}",
            "a".repeat(300),
            "b".repeat(300)
        );
        let s = snippet(&text, "flight Seattle", 60);
        assert!(s.contains("flight to Seattle"), "{s}");
        assert!(s.starts_with('…') && s.ends_with('…'), "{s}");
        assert_eq!(snippet("short\n text", "x", 60), "short text");
    }

    #[test]
    fn body_carries_only_what_was_given() {
        let args = SearchArgs {
            query: "flights".into(),
            k: 5,
            user: Some("u-1".into()),
            channel: None,
            since: None,
            until: None,
            metadata: Some(json!({"a": 1})),
            ef_search: None,
            exact: false,
            mode: None,
            context: 0,
            json: false,
            width: 160,
            socket: None,
            url: None,
        };
        assert_eq!(
            request_body(&args),
            json!({"query": "flights", "k": 5, "filter": {"user_id": "u-1", "metadata": {"a": 1}}})
        );
    }

    #[test]
    fn renders_hits_and_the_plan() {
        let answer = json!({
            "model": "all-minilm", "mode": "semantic", "k": 10, "count": 1,
            "results": [{"id": "c-1", "user_id": "u-1", "channel": "web",
                         "received_at": "2024-05-01T10:00:00Z", "score": 0.8123,
                         "chunk": {"seq": 0, "content": "user: book a flight\nassistant: ok"}}],
            "search": {"strategy": "hnsw", "note": "HNSW index scan"},
            "timings_ms": {"embed": 1.0, "database": 2.0, "total": 3.5}
        });
        let text = render(&answer, "flight", 160);
        assert!(
            text.contains(" 1. 0.812  c-1  (u-1 · web · 2024-05-01 10:00)"),
            "{text}"
        );
        assert!(text.contains("user: book a flight assistant: ok"), "{text}");
        assert!(
            text.contains("1 of k=10 · semantic · all-minilm · hnsw"),
            "{text}"
        );
    }
}
