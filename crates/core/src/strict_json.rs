//! JSON values that refuse duplicate object keys.
//!
//! `{"a": 1, "a": 2}` is valid JSON whose meaning parsers disagree on (the
//! first wins, the last wins, both are kept). serde_json keeps the last;
//! another reader of the same bytes might keep the first. Ingress refuses
//! the ambiguity instead of storing one reading of it: wherever a request
//! carries free-form JSON (`metadata`, the items of a batch), it is parsed
//! as a [`StrictValue`]. The fixed fields of a conversation are refused
//! twice over already (serde's derive rejects duplicate fields).
//!
//! It also finds integers that would be rounded: serde_json (without
//! `arbitrary_precision`, which stays off: it would change every number in
//! the workspace) keeps an integer literal within i64/u64 exactly but hands
//! one beyond that range over as the nearest f64, so
//! `18446744073709551616123` would be stored as `1.8446744073709552e22`,
//! silently. The visitor cannot tell such an integer from the float literal
//! `1.8446744073709552e22` (both arrive as the same f64), and a float is
//! legitimate metadata; only the text can. [`may_hold_wide_integer`] is the
//! cheap test on a parsed value, [`wide_integers`] reads the text, only when
//! that test says it must.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// A [`serde_json::Value`] parsed with duplicate keys refused.
#[derive(Debug, Clone, PartialEq)]
pub struct StrictValue(pub Value);

impl StrictValue {
    pub fn into_inner(self) -> Value {
        self.0
    }
}

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("a number that is not finite"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(StrictValue(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                let shown: String = key.chars().take(40).collect();
                return Err(de::Error::custom(format!(
                    "duplicate key `{shown}`: the same key twice in one object is ambiguous"
                )));
            }
            let StrictValue(value) = map.next_value()?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

/// -2^63 (`i64::MIN`): serde_json parses an integer literal below it as an
/// f64 at or below this.
const EXACT_MIN: f64 = -9_223_372_036_854_775_808.0;
/// 2^64 (`u64::MAX + 1`): serde_json parses an integer literal above
/// `u64::MAX` as an f64 at or above this.
const EXACT_END: f64 = 18_446_744_073_709_551_616.0;

/// Whether `value` holds a number that may have been an integer literal
/// beyond i64/u64 (a whole f64 outside their range). False for every value
/// without such a number, so the text need not be read again.
pub fn may_hold_wide_integer(value: &Value) -> bool {
    match value {
        Value::Number(n) => n
            .as_f64()
            .is_some_and(|f| n.is_f64() && f.fract() == 0.0 && !(f > EXACT_MIN && f < EXACT_END)),
        Value::Array(items) => items.iter().any(may_hold_wide_integer),
        Value::Object(map) => map.values().any(may_hold_wide_integer),
        _ => false,
    }
}

/// One step of a JSON path: an object key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathStep {
    Key(String),
    Index(usize),
}

/// An integer literal that neither i64 nor u64 holds, and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WideInteger {
    /// From the root of the text scanned.
    pub path: Vec<PathStep>,
    /// The literal as sent (cut to 40 characters).
    pub literal: String,
}

impl WideInteger {
    /// The path as the API names fields (`metadata.n[2]`), starting at step
    /// `from` (a batch drops the item's index).
    pub fn field(&self, from: usize) -> String {
        let mut out = String::new();
        for step in self.path.iter().skip(from) {
            match step {
                PathStep::Key(k) => {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    // As validate names metadata keys: cut to 40 characters.
                    out.extend(k.chars().take(40));
                }
                PathStep::Index(i) => out.push_str(&format!("[{i}]")),
            }
        }
        out
    }

    /// Why it is refused, for the error message.
    pub fn reason(&self) -> String {
        format!(
            "the integer {} is outside {}..={} and would be rounded; send it as a string \
             (a number with a fraction or an exponent is kept as a float)",
            self.literal,
            i64::MIN,
            u64::MAX
        )
    }
}

/// Every integer literal (no fraction, no exponent) in `json` that i64 and
/// u64 cannot hold, in document order, with its path.
///
/// `json` is text serde_json has already accepted; on anything else this
/// still terminates without panicking, but its answer means nothing.
pub fn wide_integers(json: &[u8]) -> Vec<WideInteger> {
    enum Frame {
        Array(usize),
        Object {
            key: Option<String>,
            expect_key: bool,
        },
    }
    let path = |stack: &[Frame]| -> Vec<PathStep> {
        stack
            .iter()
            .filter_map(|f| match f {
                Frame::Array(i) => Some(PathStep::Index(*i)),
                Frame::Object { key, .. } => key.clone().map(PathStep::Key),
            })
            .collect()
    };
    let mut found = Vec::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut i = 0;
    while i < json.len() {
        match json[i] {
            b'"' => {
                let start = i;
                i += 1;
                while i < json.len() && json[i] != b'"' {
                    // An escape covers the next byte (`\"` is not the end).
                    i += if json[i] == b'\\' { 2 } else { 1 };
                }
                let end = (i + 1).min(json.len());
                if let Some(Frame::Object { key, expect_key }) = stack.last_mut()
                    && *expect_key
                {
                    // Keys are decoded (`\u00e9` names the key `é`).
                    *key = Some(
                        serde_json::from_slice::<String>(&json[start..end]).unwrap_or_else(|_| {
                            String::from_utf8_lossy(&json[start..end]).into_owned()
                        }),
                    );
                    *expect_key = false;
                }
                i = end;
            }
            b'{' => {
                stack.push(Frame::Object {
                    key: None,
                    expect_key: true,
                });
                i += 1;
            }
            b'[' => {
                stack.push(Frame::Array(0));
                i += 1;
            }
            b'}' | b']' => {
                stack.pop();
                i += 1;
            }
            b',' => {
                match stack.last_mut() {
                    Some(Frame::Array(n)) => *n += 1,
                    Some(Frame::Object { expect_key, .. }) => *expect_key = true,
                    None => {}
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < json.len()
                    && matches!(json[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                {
                    i += 1;
                }
                let token = &json[start..i];
                let integer = !token.iter().any(|b| matches!(b, b'.' | b'e' | b'E'));
                if integer
                    && let Ok(text) = std::str::from_utf8(token)
                    && text.parse::<i64>().is_err()
                    && text.parse::<u64>().is_err()
                {
                    let mut literal: String = text.chars().take(40).collect();
                    if text.len() > 40 {
                        literal.push('…');
                    }
                    found.push(WideInteger {
                        path: path(&stack),
                        literal,
                    });
                }
            }
            _ => i += 1,
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Value, serde_json::Error> {
        serde_json::from_str::<StrictValue>(text).map(StrictValue::into_inner)
    }

    #[test]
    fn same_as_serde_json_without_duplicates() {
        let text = r#"{"a":[1,-2,3.5,"x",null,true,{"b":{}}],"c":"\u00e9"}"#;
        assert_eq!(
            parse(text).unwrap(),
            serde_json::from_str::<Value>(text).unwrap()
        );
    }

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        for text in [
            r#"{"a":1,"a":2}"#,
            r#"{"x":{"a":1,"b":2,"a":3}}"#,
            r#"[{"k":1},{"k":1,"k":1}]"#,
            // The same key spelled two ways is the same key.
            r#"{"é":1,"\u00e9":2}"#,
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains("duplicate key"), "{text}: {err}");
        }
    }

    /// Integers inside i64/u64 are kept exactly; beyond it the value would
    /// be a rounded f64, which the scan finds (with its path), while float
    /// literals of any size stay legitimate.
    #[test]
    fn wide_integer_literals_are_found_floats_are_not() {
        assert_eq!(
            parse("18446744073709551615").unwrap().as_u64(),
            Some(u64::MAX)
        );
        assert_eq!(
            parse("-9223372036854775808").unwrap().as_i64(),
            Some(i64::MIN)
        );
        for text in [
            "18446744073709551615",
            "-9223372036854775808",
            "9007199254740993",
            "1.5",
            "1e19",
            "1e20",
            "-1.5e300",
            "18446744073709551616.0",
            r#"{"a":"18446744073709551616","b":[1,2.0e30]}"#,
            r#"{"k\"99999999999999999999":1}"#,
        ] {
            assert!(wide_integers(text.as_bytes()).is_empty(), "{text}");
        }
        // The plain value of a wide integer is indistinguishable from a float.
        assert!(!may_hold_wide_integer(
            &parse(r#"{"a":[1,-2,1.5,"x"]}"#).unwrap()
        ));
        let fields = |text: &str| -> Vec<(String, String)> {
            assert!(may_hold_wide_integer(&parse(text).unwrap()), "{text}");
            wide_integers(text.as_bytes())
                .iter()
                .map(|w| (w.field(0), w.literal.clone()))
                .collect()
        };
        assert_eq!(
            fields("18446744073709551616"),
            [(String::new(), "18446744073709551616".to_string())]
        );
        assert_eq!(
            fields(r#"{"n": -9223372036854775809}"#),
            [("n".to_string(), "-9223372036854775809".to_string())]
        );
        assert_eq!(
            fields(
                r#"{"a":{"s":"x,y","n":[1, 18446744073709551616123]},"b":"[","\u00e9":{"z":[[],1e40,99999999999999999999]}}"#
            ),
            [
                ("a.n[1]".to_string(), "18446744073709551616123".to_string()),
                ("é.z[2]".to_string(), "99999999999999999999".to_string()),
            ]
        );
        let w = &wide_integers(br#"[{"x":1},{"metadata":{"n":1e2,"m":18446744073709551616}}]"#)[0];
        assert_eq!(w.path[0], PathStep::Index(1));
        assert_eq!(w.field(1), "metadata.m");
        assert!(
            w.reason().contains("18446744073709551615"),
            "{}",
            w.reason()
        );
    }

    #[test]
    fn deep_nesting_stops_at_the_parser_limit_without_overflowing() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let err = parse(&deep).unwrap_err().to_string();
        assert!(err.contains("recursion limit"), "{err}");
    }
}
