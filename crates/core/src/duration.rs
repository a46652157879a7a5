//! Durations as people write them in the configuration: a whole number and
//! one unit, `s`, `m`, `h` or `d` (`"30s"`, `"90m"`, `"1h"`, `"365d"`).
//!
//! Deliberately small: no fractions, no compound forms (`"1h30m"`), no
//! months or years (their length varies; `"365d"` says exactly what it
//! means). A value this parser refuses is an error for the key that holds
//! it, never a silent default.

use std::time::Duration;

/// `text` as a duration, or why it is not one (for a message that also
/// names the key). Zero is refused: every setting written this way means
/// "some time", and zero would be a surprising way to say "never" or
/// "always".
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let usage = || {
        format!(
            "`{text}` is not a duration: write a whole number and a unit, s, m, h or d (e.g. \"90s\", \"15m\", \"1h\", \"365d\")"
        )
    };
    if digits.is_empty() {
        return Err(usage());
    }
    let seconds_per_unit: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(usage()),
    };
    let n: u64 = digits.parse().map_err(|_| usage())?;
    if n == 0 {
        return Err(format!("`{text}` is zero: give a duration above zero"));
    }
    // Beyond about 29 million years chrono's arithmetic gives up anyway.
    const MAX_SECONDS: u64 = 100_000 * 365 * 86_400;
    match n.checked_mul(seconds_per_unit) {
        Some(secs) if secs <= MAX_SECONDS => Ok(Duration::from_secs(secs)),
        _ => Err(format!("`{text}` is too long: at most 100000 years")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_each_unit() {
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("90m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3_600)));
        assert_eq!(
            parse_duration(" 365d "),
            Ok(Duration::from_secs(365 * 86_400))
        );
    }

    #[test]
    fn refuses_everything_else() {
        for bad in [
            "", "d", "10", "10 d", "1.5h", "-1d", "+1d", "1w", "1y", "1D", "1h30m", "1ms", "PT1H",
            "day", "1dd",
        ] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains("not a duration"), "{bad}: {e}");
        }
        assert!(parse_duration("0d").unwrap_err().contains("zero"));
        assert!(parse_duration("99999999999999999999d").is_err());
        assert!(
            parse_duration("999999999999d")
                .unwrap_err()
                .contains("too long")
        );
    }
}
