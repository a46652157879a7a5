//! Request body → validated [`Conversation`], or an error naming the field.
//!
//! Everything PostgreSQL would refuse later (NUL bytes in text or JSON,
//! invalid timestamps) is refused here, before acknowledgement, so that an
//! accepted conversation can always be stored.

use std::borrow::Cow;
use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use uuid::Uuid;

use crate::model::{Conversation, Message, Role};

use crate::error::InputError;
use crate::strict_json::{StrictValue, may_hold_wide_integer, wide_integers};

/// Namespace of the row ids derived from callers' ids (UUIDv5), so the
/// same client id always maps to the same row.
const CLIENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6a1f_0c3e_5b7d_4e21_9c8a_2f4d_1e0b_7c55);

/// Limits that come from configuration (`server.max_messages`, `[limits]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_messages: usize,
    /// Bytes of one message's content, the transcript, the summary.
    pub max_content_bytes: usize,
    /// Bytes of `metadata` as compact JSON.
    pub max_metadata_bytes: usize,
    /// Nesting depth of `metadata`.
    pub max_metadata_depth: usize,
    pub max_id_bytes: usize,
    /// `user_id` and `channel`.
    pub max_label_bytes: usize,
}

impl Limits {
    /// The configuration's defaults; `Limits { max_messages: 10, ..Limits::DEFAULT }`.
    pub const DEFAULT: Limits = Limits {
        max_messages: 1000,
        max_content_bytes: 262_144,
        max_metadata_bytes: 65_536,
        max_metadata_depth: 16,
        max_id_bytes: 256,
        max_label_bytes: 256,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A conversation as sent: exactly one of `messages` and `transcript`.
/// Every text is bounded by `[limits]`; NUL characters are refused
/// everywhere (PostgreSQL cannot store them); duplicate keys are refused.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Conversation)]
pub struct ConversationIn<'a> {
    /// Your idempotency key: the same id sent twice is stored once.
    /// Without it convstore assigns a UUIDv7.
    #[schema(min_length = 1, max_length = 256, example = "chat-2024-05-01-42")]
    id: Option<String>,
    #[schema(min_length = 1, max_length = 256, example = "u-17")]
    user_id: String,
    #[schema(min_length = 1, max_length = 256, example = "web")]
    channel: String,
    /// The messages, in order; or give `transcript` instead.
    #[schema(min_items = 1)]
    #[serde(borrow)]
    messages: Option<Vec<MessageIn<'a>>>,
    /// Free-form text of the whole conversation; or give `messages`.
    #[schema(min_length = 1)]
    transcript: Option<String>,
    summary: Option<String>,
    /// Any JSON object (depth and size bounded by `[limits]`).
    #[schema(value_type = Option<Object>)]
    metadata: Option<StrictValue>,
    /// RFC 3339, between 1970 and now + 1 day.
    #[schema(format = DateTime, example = "2024-05-01T10:00:00Z")]
    #[serde(borrow)]
    #[schema(value_type = Option<String>)]
    created_at: Option<TextIn<'a>>,
}

/// One message.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = MessageIn)]
pub struct MessageIn<'a> {
    // Documented as the `Role` it names, whose words it must be. Borrowed:
    // it is never kept.
    #[schema(value_type = Role)]
    #[serde(borrow)]
    role: TextIn<'a>,
    #[schema(min_length = 1, example = "Book me a flight to Seattle on Friday.")]
    content: String,
    /// RFC 3339, between 1970 and now + 1 day.
    #[schema(format = DateTime, example = "2024-05-01T10:00:00Z")]
    // Borrowed from the body when it holds no escape: read once, then
    // dropped, it need not be copied.
    #[serde(borrow)]
    #[schema(value_type = Option<String>)]
    ts: Option<TextIn<'a>>,
    /// Your id for this message: an append that repeats a message id the
    /// conversation already holds does not add that message again.
    #[schema(min_length = 1, max_length = 256, example = "msg-0042")]
    message_id: Option<String>,
}

/// A text read once and then dropped (a timestamp): borrowed from the body
/// when it holds no escape, so it costs no copy. serde's own `Cow` is
/// always owned inside an `Option`; this one borrows whenever it can.
#[derive(Debug)]
pub struct TextIn<'a>(Cow<'a, str>);

impl std::ops::Deref for TextIn<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for TextIn<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> serde::de::Visitor<'de> for TextVisitor {
            type Value = TextIn<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(TextIn(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(TextIn(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(TextIn(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(TextVisitor)
    }
}

/// The body of `POST /v1/conversations/{id}/messages`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = AppendMessages)]
pub struct AppendIn<'a> {
    /// The turns to add at the end of the conversation, in order.
    #[schema(min_items = 1)]
    #[serde(borrow)]
    messages: Vec<MessageIn<'a>>,
}

/// Parses and validates the body of an append: the messages to add.
///
/// As [`parse_conversation`]: the plain parser for a valid body, the
/// path-tracking one only to name the field of an error.
pub fn parse_append(body: &[u8], limits: Limits) -> Result<Vec<Message>, InputError> {
    refuse_non_object(body, "the body")?;
    match parse_plain::<AppendIn>(body) {
        Ok(parsed) => validate_messages(parsed.messages, limits),
        Err(plain) => Err(explain_parse_error::<AppendIn>(
            body,
            plain,
            "the messages",
            "body",
        )),
    }
}

/// serde_json's plain parse of a whole body. UTF-8 is checked once for the
/// whole body, then it is parsed as text: from bytes, serde_json checks
/// every string it reads (each key and value) with a call of its own. A
/// body that is not UTF-8 is parsed from bytes, so its error (position and
/// all) is serde_json's as before.
fn parse_plain<'a, T: serde::Deserialize<'a>>(body: &'a [u8]) -> Result<T, serde_json::Error> {
    match std::str::from_utf8(body) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(body),
    }
}

/// Parses and validates one conversation from JSON bytes.
///
/// Valid bodies take serde_json's plain path; only a body it refuses is
/// parsed again with `serde_path_to_error`, to name the field. Tracking the
/// path allocates a string per key and index: on every accepted
/// conversation it was a third of the enqueue time (PERFORMANCE.md).
pub fn parse_conversation(body: &[u8], limits: Limits) -> Result<Conversation, InputError> {
    refuse_non_object(body, "the body")?;
    parse_object_as_conversation(body, limits, "body")
}

/// Parses and validates one item of a batch (its text, from
/// [`crate::batch_body::split_items`]) exactly as a single post's body:
/// the same parser, the same errors, each field named from the item's root.
pub fn parse_batch_item(item: &[u8], limits: Limits) -> Result<Conversation, InputError> {
    refuse_non_object(item, "each item")?;
    // The error is the item's, answered among the others': "body is not
    // valid JSON" would blame the request.
    parse_object_as_conversation(item, limits, "the item")
}

/// [`parse_conversation`] past its check that the text is an object;
/// `text` names the text in errors ("body", "the item").
fn parse_object_as_conversation(
    body: &[u8],
    limits: Limits,
    text: &str,
) -> Result<Conversation, InputError> {
    match parse_plain::<ConversationIn>(body) {
        Ok(parsed) => {
            let conversation = validate(parsed, limits)?;
            // Only metadata can hold a number (every other field is text);
            // the body is read again only when it may hold a rounded one.
            if may_hold_wide_integer(&conversation.metadata)
                && let Some(wide) = wide_integers(body).first()
            {
                return Err(InputError::invalid_field(&wide.field(0), wide.reason()));
            }
            Ok(conversation)
        }
        Err(plain) => Err(explain_parse_error::<ConversationIn>(
            body,
            plain,
            "the conversation",
            text,
        )),
    }
}

/// The error for a body serde_json refused as a `T` (`what` it holds, and
/// `text`, what the messages call the body), naming the field it concerns.
fn explain_parse_error<'a, T: serde::Deserialize<'a>>(
    body: &'a [u8],
    plain: serde_json::Error,
    what: &str,
    text: &str,
) -> InputError {
    let mut de = serde_json::Deserializer::from_slice(body);
    match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Err(e) => schema_error_in(e, text),
        Ok(_) => match de.end() {
            Err(e) => InputError::invalid_json(format!("trailing data after {what}: {e}")),
            // Both parsers read the same grammar; should they ever
            // disagree, the plain error still says what is wrong.
            Ok(()) => InputError::invalid_json(format!("{text} is not valid as {what}: {plain}")),
        },
    }
}

/// Refuses a JSON text that is not an object before serde reads it: serde's
/// derive also reads a struct from an array of its fields in order, so
/// `["id","u","c",…]` would be a conversation, and an error in it would be
/// named by position (`[0]`), which is no field. Blank text, or text that is
/// not JSON, is left to the parser's own error.
pub fn refuse_non_object(body: &[u8], what: &str) -> Result<(), InputError> {
    let kind = match body.iter().find(|b| !b.is_ascii_whitespace()) {
        None | Some(b'{') => return Ok(()),
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b'-' | b'0'..=b'9') => "a number",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        Some(_) => return Ok(()),
    };
    Err(InputError::invalid_json(format!(
        "{what} must be a JSON object, not {kind}"
    )))
}

/// What kind of JSON value `value` is, for messages ("got an array").
pub fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

pub fn schema_error<E: std::fmt::Display>(e: serde_path_to_error::Error<E>) -> InputError {
    schema_error_in(e, "body")
}

/// [`schema_error`], calling the text that was parsed `text`.
fn schema_error_in<E: std::fmt::Display>(
    e: serde_path_to_error::Error<E>,
    text: &str,
) -> InputError {
    let path = e.path().to_string();
    let inner = e.inner().to_string();
    let looks_syntactic = inner.contains("at line")
        && (inner.contains("expected") || inner.contains("EOF") || inner.contains("invalid"))
        && !inner.contains("invalid type")
        && !inner.contains("unknown field")
        && !inner.contains("missing field");
    if looks_syntactic {
        return InputError::invalid_json(format!("{text} is not valid JSON: {inner}"));
    }
    if path == "." || path.is_empty() {
        // Missing, unknown or repeated top-level fields: serde names the
        // field in the message. Anything else at the root is about the
        // body as a whole, which is no field: an empty `field`, or a value
        // (`invalid type: integer `5``) quoted as one, helped nobody.
        let named_field = ["missing field", "unknown field", "duplicate field"]
            .iter()
            .any(|kind| inner.starts_with(kind));
        return match quoted_field(&inner).filter(|_| named_field) {
            Some(field) => InputError::invalid_field(&field, inner),
            None => InputError::invalid_json(format!("{text} is not a valid request: {inner}")),
        };
    }
    InputError::invalid_field(&path, inner)
}

/// The first `name` in serde's "missing field `name`" style messages.
fn quoted_field(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_string())
}

fn validate(input: ConversationIn<'_>, limits: Limits) -> Result<Conversation, InputError> {
    let client_id = match input.id {
        Some(id) => {
            check_label("id", &id, limits.max_id_bytes)?;
            Some(id)
        }
        None => None,
    };
    check_label("user_id", &input.user_id, limits.max_label_bytes)?;
    check_label("channel", &input.channel, limits.max_label_bytes)?;

    let (messages, transcript) = match (input.messages, input.transcript) {
        (Some(_), Some(_)) => {
            return Err(InputError::invalid_field(
                "transcript",
                "give either messages or transcript, not both",
            ));
        }
        (None, None) => {
            return Err(InputError::invalid_field(
                "messages",
                "missing: give messages (a non-empty array) or transcript",
            ));
        }
        (Some(messages), None) => (validate_messages(messages, limits)?, None),
        (None, Some(transcript)) => {
            check_text(
                Field::Top("transcript"),
                &transcript,
                limits.max_content_bytes,
            )?;
            (Vec::new(), Some(transcript))
        }
    };

    if let Some(summary) = &input.summary {
        check_size(Field::Top("summary"), summary, limits.max_content_bytes)?;
        check_no_nul(Field::Top("summary"), summary)?;
    }
    let metadata = match input.metadata.map(StrictValue::into_inner) {
        None | Some(serde_json::Value::Null) => serde_json::Value::Object(Default::default()),
        Some(value @ serde_json::Value::Object(_)) => {
            if !json_is_storable(&value, 0, limits.max_metadata_depth) {
                check_json("metadata", &value, 0, limits.max_metadata_depth)?;
            }
            let size = compact_json_len(&value);
            if size > limits.max_metadata_bytes {
                return Err(InputError::invalid_field(
                    "metadata",
                    format!(
                        "{size} bytes as JSON; at most {} (limits.max_metadata_bytes)",
                        limits.max_metadata_bytes
                    ),
                ));
            }
            value
        }
        Some(_) => {
            return Err(InputError::invalid_field(
                "metadata",
                "must be a JSON object",
            ));
        }
    };
    let created_at = input
        .created_at
        .as_deref()
        .map(|s| parse_timestamp(Field::Top("created_at"), s))
        .transpose()?;

    // Without a client id the assigned UUIDv7 is both the row id and the
    // key the caller knows it by: appends, deletes and reads all find a
    // conversation by its key.
    let (id, client_id) = match client_id {
        Some(cid) => (row_id(&cid), Some(cid)),
        None => {
            let id = Uuid::now_v7();
            (id, Some(id.to_string()))
        }
    };
    Ok(Conversation {
        id,
        client_id,
        user_id: input.user_id,
        channel: input.channel,
        messages,
        transcript,
        summary: input.summary,
        metadata,
        created_at,
        received_at: Utc::now(),
        received_instant: Instant::now(),
    })
}

/// The row id of the conversation with client id `id`: a UUIDv5 of the id
/// as sent, so the same client id always maps to the same row.
///
/// Every id is hashed, UUIDs included. Using a UUID-shaped id as the row id
/// itself let one caller claim another's row: posting the id
/// `uuid5(NS, "victim")` first made the victim's later post collide with
/// it (issue 15). A hash leaves no id another id maps to, and two
/// spellings of one UUID (upper case, braces) are two client ids, as the
/// `client_id` key says. Rows written before (UUID ids as row ids) are
/// still found by client id; a write whose row id such a row holds is
/// stored under a fresh id instead (`convstore_store::write`).
pub fn row_id(id: &str) -> Uuid {
    Uuid::new_v5(&CLIENT_ID_NAMESPACE, id.as_bytes())
}

fn validate_messages(
    messages: Vec<MessageIn<'_>>,
    limits: Limits,
) -> Result<Vec<Message>, InputError> {
    if messages.is_empty() {
        return Err(InputError::invalid_field("messages", "must not be empty"));
    }
    if messages.len() > limits.max_messages {
        return Err(InputError::invalid_field(
            "messages",
            format!(
                "{} messages; at most {} are allowed (server.max_messages)",
                messages.len(),
                limits.max_messages
            ),
        ));
    }
    // Built at its final size: collecting a `Result` iterator grows the
    // list by doubling and shrinks it at the end, an allocation each time.
    let mut validated = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        let Some(role) = Role::from_word(&m.role) else {
            return Err(InputError::invalid_field(
                &format!("messages[{i}].role"),
                format!(
                    "`{}` is not one of {}",
                    truncate_for_message(&m.role),
                    Role::ALL.map(Role::as_str).join(", ")
                ),
            ));
        };
        check_text(
            Field::Message(i, "content"),
            &m.content,
            limits.max_content_bytes,
        )?;
        let ts =
            m.ts.as_deref()
                .map(|s| parse_timestamp(Field::Message(i, "ts"), s))
                .transpose()?;
        if let Some(message_id) = &m.message_id
            && let Err(why) = label_problem(message_id, limits.max_id_bytes)
        {
            return Err(Field::Message(i, "message_id").error(why));
        }
        validated.push(Message {
            role,
            content: m.content,
            ts,
            message_id: m.message_id,
        });
    }
    Ok(validated)
}

/// A field's name for an error message, formatted only when there is an
/// error: formatting `messages[{i}].content` for every message of every
/// accepted conversation cost more than checking the message.
#[derive(Debug, Clone, Copy)]
enum Field<'a> {
    Top(&'a str),
    /// `messages[index].part`.
    Message(usize, &'static str),
}

impl Field<'_> {
    fn name(self) -> String {
        match self {
            Self::Top(name) => name.to_string(),
            Self::Message(index, part) => format!("messages[{index}].{part}"),
        }
    }

    fn error(self, message: impl Into<String>) -> InputError {
        InputError::invalid_field(&self.name(), message)
    }
}

/// Non-empty text of at most `max` bytes without NUL bytes (PostgreSQL
/// `text` cannot hold NUL).
fn check_text(field: Field<'_>, text: &str, max: usize) -> Result<(), InputError> {
    if text.trim().is_empty() {
        return Err(field.error("must not be empty"));
    }
    check_size(field, text, max)?;
    check_no_nul(field, text)
}

fn check_size(field: Field<'_>, text: &str, max: usize) -> Result<(), InputError> {
    if text.len() > max {
        return Err(field.error(format!(
            "{} bytes; at most {max} (limits.max_content_bytes)",
            text.len()
        )));
    }
    Ok(())
}

fn check_no_nul(field: Field<'_>, text: &str) -> Result<(), InputError> {
    if text.contains('\0') {
        return Err(
            field.error("contains a NUL character (\\u0000), which PostgreSQL cannot store")
        );
    }
    Ok(())
}

/// Ids and labels: 1..=max bytes, no control characters.
pub fn check_label(field: &str, value: &str, max: usize) -> Result<(), InputError> {
    label_problem(value, max).map_err(|why| InputError::invalid_field(field, why))
}

/// What is wrong with a label, if anything: the check of [`check_label`]
/// without a field name, so a message's field is named only on an error.
fn label_problem(value: &str, max: usize) -> Result<(), String> {
    if value.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if value.len() > max {
        return Err(format!("{} bytes; at most {max}", value.len()));
    }
    if value.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    Ok(())
}

/// Whether [`check_json`] would pass, without building the path of every
/// value it visits (that is only needed for an error message).
fn json_is_storable(value: &serde_json::Value, depth: usize, max_depth: usize) -> bool {
    if depth > max_depth {
        return false;
    }
    match value {
        serde_json::Value::String(s) => !s.contains('\0'),
        serde_json::Value::Array(items) => items
            .iter()
            .all(|v| json_is_storable(v, depth + 1, max_depth)),
        serde_json::Value::Object(map) => map
            .iter()
            .all(|(k, v)| !k.contains('\0') && json_is_storable(v, depth + 1, max_depth)),
        _ => true,
    }
}

/// No NUL anywhere (keys included; `jsonb` refuses `\u0000`), bounded depth.
fn check_json(
    field: &str,
    value: &serde_json::Value,
    depth: usize,
    max_depth: usize,
) -> Result<(), InputError> {
    if depth > max_depth {
        return Err(InputError::invalid_field(
            field,
            format!("nested deeper than {max_depth} levels (limits.max_metadata_depth)"),
        ));
    }
    match value {
        serde_json::Value::String(s) => check_no_nul(Field::Top(field), s),
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, v)| check_json(&format!("{field}[{i}]"), v, depth + 1, max_depth)),
        serde_json::Value::Object(map) => map.iter().try_for_each(|(k, v)| {
            let path = format!("{field}.{}", truncate_for_message(k));
            check_no_nul(Field::Top(&path), k)?;
            check_json(&path, v, depth + 1, max_depth)
        }),
        _ => Ok(()),
    }
}

/// Bytes of `value` as compact JSON, counted without building the text.
fn compact_json_len(value: &serde_json::Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing to a counter cannot fail; a value serde_json built serialises.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// RFC 3339, between 1970 and a day from now (clock skew allowed).
fn parse_timestamp(field: Field<'_>, value: &str) -> Result<DateTime<Utc>, InputError> {
    let parsed = DateTime::parse_from_rfc3339(value).map_err(|e| {
        field.error(format!(
            "`{}` is not an RFC 3339 timestamp ({e})",
            truncate_for_message(value)
        ))
    })?;
    let utc = parsed.with_timezone(&Utc);
    let earliest = DateTime::<Utc>::UNIX_EPOCH;
    let latest = Utc::now() + chrono::Duration::days(1);
    if utc < earliest || utc > latest {
        return Err(field.error(format!("`{value}` is outside 1970-01-01 .. now + 1 day")));
    }
    Ok(utc)
}

fn truncate_for_message(s: &str) -> String {
    s.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_messages: 10,
        ..Limits::DEFAULT
    };

    fn field_of(body: &str) -> String {
        match parse_conversation(body.as_bytes(), LIMITS) {
            Ok(_) => panic!("accepted: {body}"),
            Err(e) => e.field().unwrap_or("<none>").to_string(),
        }
    }

    #[test]
    fn valid_conversation_gets_v7_id() {
        let c = parse_conversation(
            br#"{"user_id":"u1","channel":"web","messages":[{"role":"user","content":"hi","ts":"2024-05-01T10:00:00Z"}],"metadata":{"k":[1,2]}}"#,
            LIMITS,
        )
        .expect("valid");
        assert_eq!(c.id.get_version_num(), 7);
        // The assigned id is the key the caller knows it by.
        assert_eq!(c.client_id, Some(c.id.to_string()));
        assert_eq!(c.messages.len(), 1);
        assert!(c.messages[0].ts.is_some());
    }

    #[test]
    fn client_id_is_stable() {
        let body = br#"{"id":"conv-42","user_id":"u","channel":"c","transcript":"hello"}"#;
        let a = parse_conversation(body, LIMITS).unwrap();
        let b = parse_conversation(body, LIMITS).unwrap();
        assert_eq!(a.id, b.id);
        assert_eq!(a.client_id.as_deref(), Some("conv-42"));
        let uuid = "0191e6f3-0000-7000-8000-000000000001";
        let c = parse_conversation(
            format!(r#"{{"id":"{uuid}","user_id":"u","channel":"c","transcript":"x"}}"#).as_bytes(),
            LIMITS,
        )
        .unwrap();
        // A UUID-shaped client id is hashed like any other: no id can name
        // the row another id maps to (issue 15).
        assert_eq!(c.id, row_id(uuid));
        assert_ne!(c.id.to_string(), uuid);
    }

    #[test]
    fn spellings_of_one_uuid_are_distinct_client_ids() {
        let victim = row_id("victim-conversation-42");
        let spellings = [
            victim.to_string(),
            victim.to_string().to_uppercase(),
            format!("{{{victim}}}"),
            format!("urn:uuid:{victim}"),
            victim.simple().to_string(),
        ];
        let mut rows: Vec<Uuid> = spellings.iter().map(|s| row_id(s)).collect();
        assert!(!rows.contains(&victim), "{rows:?}");
        rows.sort();
        rows.dedup();
        assert_eq!(rows.len(), spellings.len());
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            field_of(r#"{"channel":"c","messages":[{"role":"user","content":"x"}]}"#),
            "user_id"
        );
        assert_eq!(
            field_of(r#"{"user_id":"u","channel":"c","messages":[]}"#),
            "messages"
        );
        assert_eq!(field_of(r#"{"user_id":"u","channel":"c"}"#), "messages");
        assert_eq!(
            field_of(
                r#"{"user_id":"u","channel":"c","messages":[{"role":"user","content":"  "}]}"#
            ),
            "messages[0].content"
        );
        assert_eq!(
            field_of(
                r#"{"user_id":"u","channel":"c","messages":[{"role":"user","content":"a"},{"role":"robot","content":"b"}]}"#
            ),
            "messages[1].role"
        );
        assert_eq!(
            field_of(
                r#"{"user_id":"u","channel":"c","messages":[{"role":"user","content":"a\u0000b"}]}"#
            ),
            "messages[0].content"
        );
        assert_eq!(
            field_of(
                r#"{"user_id":"u","channel":"c","messages":[{"role":"user","content":"a","ts":"yesterday"}]}"#
            ),
            "messages[0].ts"
        );
        assert_eq!(
            field_of(
                r#"{"user_id":"u","channel":"c","transcript":"x","created_at":"2024-13-01T00:00:00Z"}"#
            ),
            "created_at"
        );
        assert_eq!(
            field_of(
                r#"{"user_id":"u","channel":"c","transcript":"x","created_at":"3024-01-01T00:00:00Z"}"#
            ),
            "created_at"
        );
        assert_eq!(
            field_of(r#"{"user_id":"u","channel":"c","transcript":"x","metadata":[1]}"#),
            "metadata"
        );
        assert_eq!(
            field_of(r#"{"user_id":"u","channel":"c","transcript":"x","metadata":{"a":"\u0000"}}"#),
            "metadata.a"
        );
        assert_eq!(
            field_of(r#"{"user_id":"u","channel":"c","transcript":"x","colour":"red"}"#),
            "colour"
        );
        assert_eq!(
            field_of(r#"{"user_id":5,"channel":"c","transcript":"x"}"#),
            "user_id"
        );
        assert_eq!(
            field_of(r#"{"user_id":"u","channel":"c","messages":[{"role":"user","content":1}]}"#),
            "messages[0].content"
        );
        assert_eq!(
            field_of(
                r#"{"user_id":"u","channel":"c","messages":[{"role":"user","content":"x"}],"transcript":"y"}"#
            ),
            "transcript"
        );
    }

    /// Every `field` is the JSON path of the offending field: never empty,
    /// never a value. A body (or batch item) that is not an object has no
    /// field at fault: it is `invalid_json`, without one.
    #[test]
    fn every_field_is_a_path_never_empty_nor_a_value() {
        // (body, field); the batch item path is checked too where a parsed
        // value still shows the fault (duplicate keys and wide integers are
        // split_items' to find, from the text).
        let cases: &[(&str, &str)] = &[
            (
                r#"{"user_id":"u","channel":"c","transcript":"x","summary":5}"#,
                "summary",
            ),
            (
                r#"{"user_id":"u","channel":"","transcript":"x"}"#,
                "channel",
            ),
            (
                r#"{"id":"","user_id":"u","channel":"c","transcript":"x"}"#,
                "id",
            ),
            (
                r#"{"user_id":"u","channel":"c","transcript":"  "}"#,
                "transcript",
            ),
            (
                r#"{"user_id":"u","channel":"c","transcript":"x","summary":"\u0000"}"#,
                "summary",
            ),
            (
                r#"{"user_id":"u","channel":"c","messages":{"role":"user"}}"#,
                "messages",
            ),
            (
                r#"{"user_id":"u","channel":"c","messages":[5]}"#,
                "messages[0]",
            ),
            (
                r#"{"user_id":"u","channel":"c","messages":[{"content":"x"}]}"#,
                "messages[0]",
            ),
            (
                r#"{"user_id":"u","channel":"c","messages":[{"role":"user","content":"x"},{"role":"user","content":"y","ts":5}]}"#,
                "messages[1].ts",
            ),
            (
                r#"{"user_id":"u","channel":"c","transcript":"x","metadata":{"a":{"b":[1,"\u0000"]}}}"#,
                "metadata.a.b[1]",
            ),
            (
                r#"{"user_id":"u","channel":"c","transcript":"x","metadata":{"n":1e400}}"#,
                "metadata.n",
            ),
            (
                r#"{"user_id":"u","channel":"c","transcript":"x","metadata":{"n":-99999999999999999999}}"#,
                "metadata.n",
            ),
            (
                r#"{"user_id":"u","channel":"c","transcript":"x","metadata":"x"}"#,
                "metadata",
            ),
            (
                r#"{"user_id":"u","channel":"c","transcript":"x","created_at":5}"#,
                "created_at",
            ),
            (
                r#"{"user_id":"u","user_id":"v","channel":"c","transcript":"x"}"#,
                "user_id",
            ),
            (r#"{"user_id":"u","transcript":"x"}"#, "channel"),
        ];
        for (body, field) in cases {
            let err = parse_conversation(body.as_bytes(), LIMITS).unwrap_err();
            assert_eq!(err.field(), Some(*field), "{body}: {err:?}");
            // The same conversation as a batch item names the same field.
            let err = parse_batch_item(body.as_bytes(), LIMITS).unwrap_err();
            assert_eq!(err.field(), Some(*field), "item {body}: {err:?}");
        }
        // Not an object: no field (these were `[0]`, `5`, `true` or empty),
        // and an array is not read as the fields in order.
        for body in [
            "5",
            "true",
            "null",
            r#""conversation""#,
            "[1,2]",
            " [[[]]]",
            "[]",
            r#"["id-1","u","c",null,"hello",null,null,null]"#,
        ] {
            let err = parse_conversation(body.as_bytes(), LIMITS).unwrap_err();
            assert_eq!(
                (err.code(), err.field()),
                ("invalid_json", None),
                "{body}: {err:?}"
            );
            let err = parse_batch_item(body.as_bytes(), LIMITS).unwrap_err();
            assert_eq!(
                (err.code(), err.field()),
                ("invalid_json", None),
                "item {body}: {err:?}"
            );
            assert!(err.message().starts_with("each item must be"), "{err:?}");
        }
    }

    /// An item's syntax errors are the item's: they say "the item", never
    /// "body" (which would blame the request the item came in).
    #[test]
    fn an_items_errors_blame_the_item() {
        for item in [
            &b"{\"user_id\": "[..],
            br#"{"user_id":"u","channel":"c","transcript":"x"} {}"#,
            b"{\"user_id\":\"\xff\"}",
        ] {
            let err = parse_batch_item(item, LIMITS).unwrap_err();
            assert_eq!(err.code(), "invalid_json", "{err:?}");
            assert!(!err.message().contains("body"), "{err:?}");
        }
        let item =
            br#"{"user_id":"u","channel":"c","messages":[{"role":"user","content":"caf\u00e9"}]}"#;
        let conversation = parse_batch_item(item, LIMITS).unwrap();
        assert_eq!(conversation.messages[0].content, "café");
    }

    #[test]
    fn invalid_json_is_not_a_field_error() {
        let err = parse_conversation(b"{\"user_id\": ", LIMITS).unwrap_err();
        assert_eq!(err.code(), "invalid_json");
        let err = parse_conversation(
            br#"{"user_id":"u","channel":"c","transcript":"x"} {}"#,
            LIMITS,
        )
        .unwrap_err();
        assert_eq!(err.code(), "invalid_json");
        let err = parse_conversation(b"\xff\xfe", LIMITS).unwrap_err();
        assert_eq!(err.code(), "invalid_json");
    }

    /// An append takes the plain parser when valid and names the field of
    /// what it refuses, as a conversation does.
    #[test]
    fn append_errors_name_their_field_and_valid_appends_parse() {
        let append_field = |body: &str| match parse_append(body.as_bytes(), LIMITS) {
            Ok(_) => panic!("accepted: {body}"),
            Err(e) => (e.code(), e.field().unwrap_or("<none>").to_string()),
        };
        assert_eq!(
            append_field(
                r#"{"messages":[{"role":"user","content":"a"},{"role":"user","content":7}]}"#
            ),
            ("invalid_field", "messages[1].content".to_string())
        );
        assert_eq!(
            append_field(r#"{"messages":[{"role":"user","content":"a","colour":"red"}]}"#),
            ("invalid_field", "messages[0].colour".to_string())
        );
        let (code, _) = append_field(r#"{"messages":[{"role":"user","content":"a"}]} {}"#);
        assert_eq!(code, "invalid_json");
        let messages = parse_append(
            "{\"messages\":[{\"role\":\"user\",\"content\":\"caf\u{e9} \\u00e9\",\"message_id\":\"m1\"}]}"
                .as_bytes(),
            LIMITS,
        )
        .unwrap();
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].content, "caf\u{e9} \u{e9}");
        assert_eq!(messages[0].message_id.as_deref(), Some("m1"));
    }

    /// A valid body is parsed as text after one UTF-8 check of the whole;
    /// one with a byte that is not UTF-8 is parsed from bytes, so its error
    /// still says where the byte is.
    #[test]
    fn bytes_that_are_not_utf8_keep_their_position_in_the_error() {
        let body = b"{\"user_id\":\"u\",\"channel\":\"c\",\"messages\":[{\"role\":\"user\",\"content\":\"ok\"},{\"role\":\"user\",\"content\":\"caf\xe9\"}]}";
        let err = parse_conversation(body, LIMITS).unwrap_err();
        assert_eq!(err.code(), "invalid_json");
        assert!(
            err.to_string()
                .contains("invalid unicode code point at line 1 column 102"),
            "{err}"
        );
        let mut fixed = body.to_vec();
        let at = fixed.iter().position(|&b| b == 0xe9).unwrap();
        fixed.splice(at..=at, "\u{e9}".bytes());
        let conversation = parse_conversation(&fixed, LIMITS).unwrap();
        assert_eq!(conversation.messages[1].content, "caf\u{e9}");
    }

    /// Valid bodies skip the path-tracking parser; the errors of invalid
    /// ones still come from it and name the exact place.
    #[test]
    fn errors_deep_in_a_body_keep_their_path() {
        assert_eq!(
            field_of(
                r#"{"user_id":"u","channel":"c","messages":[{"role":"user","content":"a"},{"role":"user","content":"b"},{"role":"user","content":[]}]}"#
            ),
            "messages[2].content"
        );
        assert_eq!(
            field_of(
                r#"{"user_id":"u","channel":"c","messages":[{"role":"user","content":"a"},{"role":"user","content":"b","tone":"x"}]}"#
            ),
            "messages[1].tone"
        );
        assert_eq!(
            field_of(
                r#"{"user_id":"u","channel":"c","transcript":"x","metadata":{"a":["ok","\u0000"]}}"#
            ),
            "metadata.a[1]"
        );
        let err = parse_conversation(
            br#"{"user_id":"u","channel":"c","transcript":"x"} trailing"#,
            LIMITS,
        )
        .unwrap_err();
        assert_eq!(err.code(), "invalid_json");
        assert!(err.message().contains("trailing data"), "{err:?}");
    }

    /// An integer beyond i64/u64 would be stored rounded: refused, naming
    /// its field. A float of any size is metadata like any other.
    #[test]
    fn wide_integers_in_metadata_are_refused_by_field() {
        let body = |meta: &str| {
            format!(r#"{{"user_id":"u","channel":"c","transcript":"x","metadata":{meta}}}"#)
        };
        assert_eq!(
            field_of(&body(r#"{"n":18446744073709551616}"#)),
            "metadata.n"
        );
        assert_eq!(
            field_of(&body(r#"{"a":[1,{"b":-9223372036854775809}]}"#)),
            "metadata.a[1].b"
        );
        let err = parse_conversation(body(r#"{"n":18446744073709551616123}"#).as_bytes(), LIMITS)
            .unwrap_err();
        assert_eq!(err.code(), "invalid_field");
        assert!(err.message().contains("18446744073709551616123"), "{err:?}");
        let c = parse_conversation(
            body(r#"{"max":18446744073709551615,"min":-9223372036854775808,"f":1e20,"g":1.5e300}"#)
                .as_bytes(),
            LIMITS,
        )
        .unwrap();
        assert_eq!(c.metadata["max"].as_u64(), Some(u64::MAX));
        assert_eq!(c.metadata["min"].as_i64(), Some(i64::MIN));
        assert_eq!(c.metadata["f"].as_f64(), Some(1e20));
    }

    #[test]
    fn too_many_messages() {
        let msgs: Vec<String> = (0..11)
            .map(|_| r#"{"role":"user","content":"x"}"#.to_string())
            .collect();
        let body = format!(
            r#"{{"user_id":"u","channel":"c","messages":[{}]}}"#,
            msgs.join(",")
        );
        assert_eq!(field_of(&body), "messages");
    }

    #[test]
    fn deep_metadata_rejected() {
        let deep = format!("{}1{}", "{\"a\":".repeat(20), "}".repeat(20));
        let body = format!(r#"{{"user_id":"u","channel":"c","transcript":"x","metadata":{deep}}}"#);
        assert!(field_of(&body).starts_with("metadata"));
    }
}
