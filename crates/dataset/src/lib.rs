//! Conversations for `convstore bench`, `convstore enqueue --sample`,
//! tests and demos.
//!
//! Two sources, both in the ingest API's format:
//! - the shared sample (`../shared/data/conversations-sample.jsonl`, CC BY-SA,
//!   not part of this repository), mapped from its own format;
//! - a deterministic generator of realistic task-oriented conversations, so
//!   a fresh clone without the sample still has data of the same shape.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::{Value, json};

/// Where the shared sample lives relative to the repository root.
pub const SAMPLE_RELATIVE: &str = "../shared/data/conversations-sample.jsonl";

/// The shared sample next to the repository, if it is there
/// (`CONVSTORE_SAMPLE` overrides the location).
pub fn sample_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CONVSTORE_SAMPLE") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    // This crate is crates/dataset: the repository root is two levels up.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(SAMPLE_RELATIVE);
    if manifest.is_file() {
        return Some(manifest);
    }
    let cwd = PathBuf::from(SAMPLE_RELATIVE);
    cwd.is_file().then_some(cwd)
}

/// Maps one line of the shared sample (`conversation_id`, `source`,
/// `messages`) to the ingest API's format. The user id is the SGD shard
/// (`sgd-train-100_00004` → `user-100`), which gives ~100 distinct users for
/// filter tests; the channel is the source.
pub fn sample_to_api(line: &Value) -> anyhow::Result<Value> {
    let id = line
        .get("conversation_id")
        .and_then(Value::as_str)
        .context("sample line without conversation_id")?;
    let messages = line
        .get("messages")
        .context("sample line without messages")?;
    let source = line
        .get("source")
        .and_then(Value::as_str)
        .unwrap_or("sample");
    let shard = id
        .rsplit('-')
        .next()
        .and_then(|s| s.split('_').next())
        .unwrap_or("0");
    Ok(json!({
        "id": id,
        "user_id": format!("user-{shard}"),
        "channel": source,
        "messages": messages,
        "metadata": {"source": source},
    }))
}

/// Reads a JSONL file of API-format conversations; with `sample_format`,
/// maps each line from the shared sample's format first.
pub fn read_jsonl(path: &Path, sample_format: bool) -> anyhow::Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_jsonl(&text, sample_format).with_context(|| format!("in {}", path.display()))
}

pub fn parse_jsonl(text: &str, sample_format: bool) -> anyhow::Result<Vec<Value>> {
    let trimmed = text.trim_start();
    // A JSON array or a single object is accepted too.
    if trimmed.starts_with('[') {
        let items: Vec<Value> = serde_json::from_str(trimmed).context("invalid JSON array")?;
        return items
            .iter()
            .map(|v| {
                if sample_format {
                    sample_to_api(v)
                } else {
                    Ok(v.clone())
                }
            })
            .collect();
    }
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line)
            .with_context(|| format!("line {} is not valid JSON", n + 1))?;
        out.push(if sample_format {
            sample_to_api(&value)?
        } else {
            value
        });
    }
    Ok(out)
}

/// The shared sample in API format, or `n` generated conversations when the
/// sample is not there.
pub fn sample_or_generated(n: usize) -> anyhow::Result<Vec<Value>> {
    match sample_path() {
        Some(path) => read_jsonl(&path, true),
        None => Ok(generate(n, 20_240_611)),
    }
}

/// splitmix64: tiny, fast, and the same sequence on every platform.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const CITIES: &[&str] = &[
    "Seattle",
    "San Francisco",
    "New York",
    "Chicago",
    "Portland",
    "Denver",
    "Austin",
    "Boston",
    "Los Angeles",
    "Atlanta",
    "Phoenix",
    "San Diego",
    "Vancouver",
    "London",
    "Paris",
];
const DAYS: &[&str] = &[
    "today",
    "tomorrow",
    "next Monday",
    "this Friday",
    "March 12th",
    "the 3rd",
    "next weekend",
];
const CUISINES: &[&str] = &[
    "Italian",
    "Thai",
    "Mexican",
    "Indian",
    "Japanese",
    "vegetarian",
    "seafood",
];

/// One domain: how its conversations open, what the assistant asks, and how
/// they close. `{city}`, `{city2}`, `{day}`, `{cuisine}`, `{n}` are filled in.
struct Domain {
    name: &'static str,
    openers: &'static [&'static str],
    exchanges: &'static [(&'static str, &'static str)],
    closers: &'static [(&'static str, &'static str)],
}

const DOMAINS: &[Domain] = &[
    Domain {
        name: "flights",
        openers: &[
            "I need a flight to {city2} {day}.",
            "Can you book me a flight from {city} to {city2}?",
            "Find me a one-way flight to {city2} leaving {day}.",
        ],
        exchanges: &[
            ("Where will you be flying from?", "From {city}, please."),
            (
                "Do you prefer economy or business class?",
                "Economy is fine.",
            ),
            (
                "I found a {n}:45 am flight with Alaska Airlines for ${n}99. Does that work?",
                "Is there anything later in the day?",
            ),
            ("How many passengers?", "Just {n} of us."),
        ],
        closers: &[
            (
                "Your flight to {city2} is booked. Anything else?",
                "No, that's all. Thanks!",
            ),
            ("Shall I confirm the ticket?", "Yes, please book it."),
        ],
    },
    Domain {
        name: "restaurants",
        openers: &[
            "Find me a {cuisine} restaurant in {city}.",
            "I want to book a table for dinner {day}.",
            "Any good {cuisine} places near downtown {city}?",
        ],
        exchanges: &[
            ("For how many people?", "A table for {n}."),
            ("What time would you like to eat?", "Around {n}:30 pm."),
            (
                "There is a nice {cuisine} place called Luigi's with 4.5 stars. Should I reserve?",
                "Do they have outdoor seating?",
            ),
            ("Which city are you in?", "I'm in {city}."),
        ],
        closers: &[
            (
                "Your table is reserved. Enjoy your meal!",
                "Great, thank you.",
            ),
            ("Would you like directions?", "No thanks, I know the way."),
        ],
    },
    Domain {
        name: "hotels",
        openers: &[
            "I need a hotel in {city2} for {n} nights.",
            "Book me a room in {city} from {day}.",
            "Are there cheap hotels near the airport in {city2}?",
        ],
        exchanges: &[
            ("How many rooms do you need?", "Just one room."),
            (
                "The Grand Plaza has a room for ${n}49 per night. Interested?",
                "Does it include breakfast?",
            ),
            ("When will you check in?", "Checking in {day}."),
        ],
        closers: &[
            (
                "Your room is booked. Anything else?",
                "That's everything, thanks.",
            ),
            ("Should I add parking?", "Yes, add parking please."),
        ],
    },
    Domain {
        name: "weather",
        openers: &[
            "What's the weather like in {city} {day}?",
            "Will it rain in {city2} {day}?",
            "Do I need an umbrella in {city} tomorrow?",
        ],
        exchanges: &[
            (
                "It will be {n}5 degrees and partly cloudy in {city}.",
                "What about the humidity?",
            ),
            ("The chance of rain is {n}0 percent.", "And the wind?"),
        ],
        closers: &[
            ("Anything else I can check?", "No, thanks a lot."),
            ("Have a nice day!", "You too."),
        ],
    },
    Domain {
        name: "events",
        openers: &[
            "Are there any concerts in {city} {day}?",
            "I'm looking for something fun to do in {city2}.",
            "Find me a music event this weekend.",
        ],
        exchanges: &[
            ("Do you prefer music, sports or theatre?", "Music, please."),
            (
                "There is a jazz show at the Blue Note {day} at {n} pm.",
                "How much are the tickets?",
            ),
            ("How many tickets do you need?", "{n} tickets."),
        ],
        closers: &[
            ("Your tickets are booked.", "Awesome, thank you!"),
            ("Would you like me to buy tickets?", "Not yet, maybe later."),
        ],
    },
    Domain {
        name: "banks",
        openers: &[
            "What's my checking account balance?",
            "I want to transfer ${n}00 to my savings.",
            "Send ${n}0 to Jessica from my checking account.",
        ],
        exchanges: &[
            ("Which account should I use?", "My checking account."),
            ("Your balance is ${n},{n}12.50.", "Thanks. And my savings?"),
            (
                "Please confirm: transfer ${n}00 to savings.",
                "Yes, confirm.",
            ),
        ],
        closers: &[
            ("The transfer is complete.", "Thank you."),
            ("Anything else with your accounts?", "No, that's it."),
        ],
    },
];

/// `n` deterministic conversations in API format (ids `gen-<seed>-<i>`).
pub fn generate(n: usize, seed: u64) -> Vec<Value> {
    let mut rng = SplitMix(seed);
    (0..n).map(|i| generate_one(&mut rng, seed, i)).collect()
}

fn generate_one(rng: &mut SplitMix, seed: u64, index: usize) -> Value {
    let domain = &DOMAINS[rng.below(DOMAINS.len())];
    let city = rng.pick(CITIES);
    let mut city2 = rng.pick(CITIES);
    if city2 == city {
        city2 = CITIES[(CITIES.iter().position(|c| *c == city).unwrap_or(0) + 1) % CITIES.len()];
    }
    let day = rng.pick(DAYS);
    let cuisine = rng.pick(CUISINES);
    let fill = |template: &str, rng: &mut SplitMix| {
        template
            .replace("{city2}", city2)
            .replace("{city}", city)
            .replace("{day}", day)
            .replace("{cuisine}", cuisine)
            .replace("{n}", &(2 + rng.below(7)).to_string())
    };
    let mut messages = Vec::new();
    let opener = domain.openers[rng.below(domain.openers.len())];
    messages.push(json!({"role": "user", "content": fill(opener, rng)}));
    let turns = 1 + rng.below(domain.exchanges.len() + 3);
    for _ in 0..turns {
        let (ask, answer) = domain.exchanges[rng.below(domain.exchanges.len())];
        messages.push(json!({"role": "assistant", "content": fill(ask, rng)}));
        messages.push(json!({"role": "user", "content": fill(answer, rng)}));
    }
    let (close_a, close_u) = domain.closers[rng.below(domain.closers.len())];
    messages.push(json!({"role": "assistant", "content": fill(close_a, rng)}));
    messages.push(json!({"role": "user", "content": fill(close_u, rng)}));
    json!({
        "id": format!("gen-{seed}-{index}"),
        "user_id": format!("user-{}", rng.below(100)),
        "channel": "generated",
        "messages": messages,
        "metadata": {"source": "generator", "domain": domain.name},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_is_deterministic_and_valid() {
        let a = generate(50, 7);
        let b = generate(50, 7);
        assert_eq!(a, b);
        assert_ne!(a, generate(50, 8));
        for v in &a {
            let body = serde_json::to_vec(v).unwrap();
            convstore_core::validate::parse_conversation(
                &body,
                convstore_core::validate::Limits::DEFAULT,
            )
            .expect("generated conversations pass validation");
        }
    }

    #[test]
    fn sample_line_maps_to_api_format() {
        let line = json!({"conversation_id": "sgd-train-100_00004", "source": "schema-guided-dialogue",
            "messages": [{"role": "user", "content": "hi"}]});
        let api = sample_to_api(&line).unwrap();
        assert_eq!(api["id"], "sgd-train-100_00004");
        assert_eq!(api["user_id"], "user-100");
        assert_eq!(api["channel"], "schema-guided-dialogue");
    }
}
