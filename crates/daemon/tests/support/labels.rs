//! A labelled query set built from the conversations themselves, for
//! measuring search quality per mode (benches/search_modes.rs, the
//! builtin model's test): *topic* queries, worded without the words that
//! label the topic ("a plane ticket to Chicago" for conversations that
//! mention a flight and no other topic), and *entity* queries, a name that
//! occurs in one to three conversations. The shared sample carries no
//! labels; the generator's conversations carry `metadata.domain`.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::{Value, json};

/// Results a query is judged on.
pub const K: usize = 10;

/// A topic: the words that label a conversation as being about it, and
/// queries about it that use none of them.
pub struct Topic {
    pub name: &'static str,
    pub markers: &'static [&'static str],
    queries: &'static [&'static str],
}

pub const TOPICS: &[Topic] = &[
    Topic {
        name: "flights",
        markers: &["flight", "airline"],
        queries: &[
            "I need a plane ticket to Chicago for next Tuesday",
            "book me an economy seat to Seattle on Friday",
            "which carrier departs for New York in the morning",
        ],
    },
    Topic {
        name: "restaurants",
        markers: &["restaurant"],
        queries: &[
            "reserve a table for dinner tonight",
            "somewhere to eat Italian food nearby",
            "book a table for four people at a sushi place",
        ],
    },
    Topic {
        name: "hotels",
        markers: &["hotel"],
        queries: &[
            "I need a room to stay for three nights",
            "find accommodation with a pool downtown",
        ],
    },
    Topic {
        name: "weather",
        markers: &["weather"],
        queries: &[
            "will it rain tomorrow in San Francisco",
            "how hot is it going to be this weekend",
        ],
    },
    Topic {
        name: "movies",
        markers: &["movie", "film"],
        queries: &[
            "what is playing at the cinema this weekend",
            "I want to watch something at the theater tonight",
        ],
    },
    Topic {
        name: "buses",
        markers: &["bus"],
        queries: &["coach tickets to Los Angeles for two adults"],
    },
    Topic {
        name: "homes",
        markers: &["apartment"],
        queries: &["looking for a place to live with two bedrooms"],
    },
    Topic {
        name: "doctors",
        markers: &["dentist"],
        queries: &["I need to get my teeth cleaned"],
    },
];

/// A labelled query and the conversations that answer it.
pub struct Labelled {
    /// `topic` or `entity`.
    pub class: &'static str,
    pub query: String,
    /// Ids of the conversations that answer it.
    pub relevant: HashSet<String>,
}

pub fn text_of(c: &Value) -> String {
    c["messages"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| m["content"].as_str().unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

pub fn id_of(c: &Value) -> String {
    c["id"].as_str().unwrap_or_default().to_string()
}

/// Topic queries (conversations carrying one topic's markers and no other
/// topic's; or the generator's `metadata.domain`) and entity queries.
pub fn labels(data: &[Value]) -> Vec<Labelled> {
    let texts: Vec<(String, String)> = data
        .iter()
        .map(|c| (id_of(c), text_of(c).to_lowercase()))
        .collect();
    let mut out = Vec::new();
    for topic in TOPICS {
        let relevant: HashSet<String> = data
            .iter()
            .zip(&texts)
            .filter(|(c, (_, text))| match c["metadata"]["domain"].as_str() {
                Some(domain) => domain == topic.name,
                None => {
                    let has = |t: &Topic| t.markers.iter().any(|m| text.contains(m));
                    has(topic)
                        && TOPICS
                            .iter()
                            .filter(|t| t.name != topic.name)
                            .all(|t| !has(t))
                }
            })
            .map(|(_, (id, _))| id.clone())
            .collect();
        if relevant.len() < K {
            continue;
        }
        for query in topic.queries {
            out.push(Labelled {
                class: "topic",
                query: (*query).to_string(),
                relevant: relevant.clone(),
            });
        }
    }
    // Names: two or three capitalised words inside a sentence, found in one
    // to three conversations.
    let mut frequency: HashMap<String, (String, HashSet<String>)> = HashMap::new();
    for c in data {
        let text = text_of(c);
        let words: Vec<&str> = text.split_whitespace().collect();
        for i in 1..words.len() {
            if words[i - 1].ends_with(['.', '!', '?', ':']) {
                continue;
            }
            for len in [2usize, 3] {
                let Some(run) = words.get(i..i + len) else {
                    continue;
                };
                let clean: Vec<&str> = run
                    .iter()
                    .map(|w| w.trim_end_matches([',', '.', '!', '?', ';', ':']))
                    .collect();
                let capitalised = clean.iter().all(|w| {
                    let mut chars = w.chars();
                    chars.next().is_some_and(char::is_uppercase)
                        && w.len() >= 3
                        && chars.all(char::is_lowercase)
                });
                // A run whose words end a sentence inside it is not a name.
                let inside = run[..len - 1]
                    .iter()
                    .all(|w| !w.ends_with(['.', ',', '!', '?']));
                if capitalised && inside {
                    let name = clean.join(" ");
                    frequency
                        .entry(name.to_lowercase())
                        .or_insert_with(|| (name, HashSet::new()))
                        .1
                        .insert(id_of(c));
                }
            }
        }
    }
    let mut names: Vec<(String, HashSet<String>)> = frequency
        .into_values()
        .filter(|(name, ids)| (1..=3).contains(&ids.len()) && name.len() >= 9)
        .collect();
    // A deterministic spread, not the alphabet's first.
    names.sort_by_key(|(name, _)| {
        name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
    });
    for (name, ids) in names.into_iter().take(40) {
        out.push(Labelled {
            class: "entity",
            query: name,
            relevant: ids,
        });
    }
    out
}

/// recall@K of one query: relevant ids among `found` (best first, the
/// first K counted) / min(K, relevant).
pub fn recall(l: &Labelled, found: &[String]) -> f64 {
    let hits = found
        .iter()
        .take(K)
        .filter(|id| l.relevant.contains(*id))
        .count();
    hits as f64 / l.relevant.len().clamp(1, K) as f64
}

/// The search modes, in the order tables print them.
pub const MODES: [&str; 3] = ["semantic", "lexical", "hybrid"];

/// Mean recall@K per (class, mode), with the number of queries.
pub type RecallTable = BTreeMap<(&'static str, &'static str), (f64, usize)>;

/// Runs every labelled query in every mode against the daemon at `base`
/// (k = K) and averages recall@K per class and mode.
pub async fn measure(http: &reqwest::Client, base: &str, labelled: &[Labelled]) -> RecallTable {
    let mut sums: BTreeMap<(&'static str, &'static str), (f64, usize)> = BTreeMap::new();
    for l in labelled {
        for mode in MODES {
            let resp = http
                .post(format!("{base}/v1/search"))
                .json(&json!({"query": l.query, "k": K, "mode": mode}))
                .send()
                .await
                .expect("search");
            let status = resp.status();
            let found: Value = resp.json().await.expect("search answer");
            assert_eq!(status, 200, "{mode} search {:?}: {found}", l.query);
            let ids: Vec<String> = found["results"]
                .as_array()
                .map(|r| {
                    r.iter()
                        .map(|h| h["id"].as_str().unwrap_or_default().to_string())
                        .collect()
                })
                .unwrap_or_default();
            let entry = sums.entry((l.class, mode)).or_default();
            entry.0 += recall(l, &ids);
            entry.1 += 1;
        }
    }
    sums.into_iter()
        .map(|(key, (sum, n))| (key, (sum / n.max(1) as f64, n)))
        .collect()
}

/// The table as text, one line per class.
pub fn render(table: &RecallTable) -> String {
    let mut out = format!("recall@{K} | semantic | lexical | hybrid | queries\n");
    for class in ["topic", "entity"] {
        let cell = |mode| table.get(&(class, mode)).map_or(f64::NAN, |(r, _)| *r);
        let n = table.get(&(class, "hybrid")).map_or(0, |(_, n)| *n);
        out.push_str(&format!(
            "{class} | {:.3} | {:.3} | {:.3} | {n}\n",
            cell("semantic"),
            cell("lexical"),
            cell("hybrid")
        ));
    }
    out
}
